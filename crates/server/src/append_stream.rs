//! `AppendStream`: many appends in flight over one gRPC stream.
//!
//! Why: a unary call per append costs an HTTP/2 stream (headers, data,
//! trailers both ways) and a task hand-off at each end, which is most of an
//! append's cost on the node once the disk is batched; over one stream an
//! append is a length-prefixed message each way, and the frames of many
//! appends share writes. Each request is answered exactly as `Append`
//! answers (same validation, quotas, metrics, idempotent retries).
//!
//! Bounds: at most [`IN_FLIGHT_MAX`] requests of one stream are being
//! written or waiting to be answered; the reader takes no more until one is
//! answered, so a fast writer is slowed by HTTP/2 flow control rather than
//! buffered. When the node stops, the reader stops taking requests; those
//! in flight are answered and the stream then ends.

use std::sync::Arc;

use edgebus_proto::convert;
use edgebus_proto::v1;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::grpc::EventStoreService;

/// Requests of one stream in flight at once.
pub(crate) const IN_FLIGHT_MAX: usize = 1024;

/// Starts answering `inbound`; the returned stream carries the answers.
pub(crate) fn serve(
    service: EventStoreService,
    mut inbound: Streaming<v1::AppendStreamRequest>,
) -> ReceiverStream<Result<v1::AppendStreamResponse, Status>> {
    let (answers, receiver) = mpsc::channel(IN_FLIGHT_MAX);
    let permits = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut stopping = service.state().stopping.clone();
    tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
            let message = tokio::select! {
                message = inbound.message() => message,
                _ = stopping.wait_for(|stopping| *stopping) => return,
            };
            let request = match message {
                Ok(Some(request)) => request,
                // The client finished sending, or went away: answer what is
                // in flight (the answers channel closes after the last).
                Ok(None) | Err(_) => return,
            };
            let (service, answers) = (service.clone(), answers.clone());
            tokio::spawn(async move {
                let correlation = request.correlation;
                let result = match request.append {
                    Some(append) => service.append_one(append).await,
                    None => Err(missing_append()),
                };
                let result = match result {
                    Ok(appended) => v1::append_stream_response::Result::Appended(appended),
                    Err(status) => v1::append_stream_response::Result::Error(detail_of(&status)),
                };
                // A client that went away no longer reads its answers.
                let _ = answers.send(Ok(v1::AppendStreamResponse { correlation, result: Some(result) })).await;
                drop(permit);
            });
        }
    });
    ReceiverStream::new(receiver)
}

fn missing_append() -> Status {
    convert::status_from_error_detail(v1::ErrorDetail {
        code: v1::ErrorCode::InvalidArgument as u32,
        message: "an AppendStream request needs `append`".into(),
        field: "append".into(),
        ..v1::ErrorDetail::default()
    })
}

/// The detail a refusal carries (every refusal of `append_one` has one; a
/// status without is passed on with code UNSPECIFIED and its message).
fn detail_of(status: &Status) -> v1::ErrorDetail {
    convert::error_detail_from_status(status).unwrap_or_else(|| v1::ErrorDetail {
        code: v1::ErrorCode::Unspecified as u32,
        message: status.message().to_owned(),
        ..v1::ErrorDetail::default()
    })
}
