//! `AppendStream`: many appends in flight over one gRPC stream.
//!
//! Why: a unary call per append costs an HTTP/2 stream (headers, data,
//! trailers both ways) and a task hand-off at each end, which is most of an
//! append's cost on the node once the disk is batched; over one stream an
//! append is a length-prefixed message each way, and the frames of many
//! appends share writes. Each request is answered exactly as `Append`
//! answers (same validation, quotas, metrics, idempotent retries).
//!
//! How: the stream of answers is itself the driver. Polled by the task that
//! sends the response, it takes requests and polls the appends in flight
//! (a `FuturesUnordered`), so no task is spawned per append and a group
//! commit that completes hundreds of appends wakes that task once.
//!
//! Bounds: at most [`IN_FLIGHT_MAX`] requests of one stream are being
//! written or waiting to be answered; no more are taken until one is
//! answered, and answers are produced only as fast as they are sent, so a
//! fast writer or a slow reader is held by HTTP/2 flow control rather than
//! buffered. When the node stops, no more requests are taken; those in
//! flight are answered and the stream then ends. If the client goes away,
//! the appends it had in flight still happen (a queued write is not
//! withdrawn); only their answers are lost with it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use edgebus_proto::convert;
use edgebus_proto::v1;
use futures_util::stream::{FuturesUnordered, Stream, StreamExt as _};
use tonic::{Status, Streaming};

use crate::grpc::EventStoreService;

/// Requests of one stream in flight at once.
pub(crate) const IN_FLIGHT_MAX: usize = 1024;

type Answer = Pin<Box<dyn Future<Output = v1::AppendStreamResponse> + Send>>;

/// The answers of one `AppendStream` call, in the order they complete.
pub struct Answers {
    service: EventStoreService,
    /// `None` once the client finished sending, went away, or the node stops.
    inbound: Option<Streaming<v1::AppendStreamRequest>>,
    in_flight: FuturesUnordered<Answer>,
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answers")
            .field("taking_requests", &self.inbound.is_some())
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

/// Starts answering `inbound`; the returned stream carries the answers.
pub(crate) fn serve(service: EventStoreService, inbound: Streaming<v1::AppendStreamRequest>) -> Answers {
    let mut stopping = service.state().stopping.clone();
    Answers {
        service,
        inbound: Some(inbound),
        in_flight: FuturesUnordered::new(),
        stopping: Box::pin(async move {
            // A dropped sender means the node is gone: stop as well.
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }),
    }
}

impl Answers {
    fn answer(&self, request: v1::AppendStreamRequest) -> Answer {
        let service = self.service.clone();
        Box::pin(async move {
            let result = match request.append {
                Some(append) => service.append_one(append).await,
                None => Err(missing_append()),
            };
            let result = match result {
                Ok(appended) => v1::append_stream_response::Result::Appended(appended),
                Err(status) => v1::append_stream_response::Result::Error(detail_of(&status)),
            };
            v1::AppendStreamResponse { correlation: request.correlation, result: Some(result) }
        })
    }

    /// Takes the requests that are ready while there is room.
    fn take_requests(&mut self, cx: &mut Context<'_>) {
        if self.inbound.is_some() && self.stopping.as_mut().poll(cx).is_ready() {
            self.inbound = None;
        }
        while self.in_flight.len() < IN_FLIGHT_MAX {
            let Some(inbound) = self.inbound.as_mut() else { return };
            match Pin::new(inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => {
                    let answer = self.answer(request);
                    self.in_flight.push(answer);
                }
                // The client finished sending, or went away: answer what is
                // in flight, then end.
                Poll::Ready(None | Some(Err(_))) => self.inbound = None,
                Poll::Pending => return,
            }
        }
    }
}

impl Stream for Answers {
    type Item = Result<v1::AppendStreamResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.take_requests(cx);
        match this.in_flight.poll_next_unpin(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(Some(Ok(answer))),
            // Nothing in flight: done if no more requests can come.
            Poll::Ready(None) if this.inbound.is_none() => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
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
