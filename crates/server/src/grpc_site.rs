//! The `edgebus.v1.Site` gRPC service (site.proto): the node's site as a
//! gateway in its own process (`edgebus gateway`, through
//! [`edgebus_gateway::RemoteSite`]) sees it. It serves the node's one
//! [`LocalSite`](edgebus_gateway::LocalSite) (`NodeState::site`), so the
//! terms a remote gateway's links teach it fence an embedded gateway's
//! writes too, and the other way round.
//!
//! - Reads and appends go to the store on the blocking pool and fail with
//!   the store's stable codes, as `EventStore` does; a stream that does not
//!   exist reads as empty. Appends take only `$gateway` and `$gateway.*`
//!   streams (`PERMISSION_DENIED` otherwise): the node stamps their time.
//! - `Replicate` admits the fence and writes through the site; a deposed
//!   gateway's call fails whole with `FENCED`.
//! - `WatchEnd` sends the log's end at once and then whenever it grows,
//!   through a bounded queue: a reader that falls behind gets the latest
//!   value, never a backlog. It ends when the node starts to stop, so it
//!   never holds up the drain.

use std::pin::Pin;
use std::sync::Arc;

use edgebus_gateway::LocalSite;
use edgebus_gateway::gateway::GATEWAY_STREAM;
use edgebus_gateway::site::remote::{answer_to_wire, status_of_site_error};
use edgebus_gateway::{Fence, Site as _};
use edgebus_proto::convert::{self, ReadLogArgs, ReadStreamArgs, SiteAppendArgs};
use edgebus_proto::v1;
use edgebus_proto::v1::site_server::Site;
use edgebus_store::{ReadError, Store, WriteError};
use edgebus_types::SiteName;
use edgebus_types::limits::SITE_REPLICATE_WRITES_MAX;
use prost::Message as _;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::grpc::now_ms;
use crate::node::GRPC_MESSAGE_BYTES_MAX;
use crate::state::NodeState;

/// End positions queued towards one `WatchEnd` reader; while they wait, the
/// newer ones coalesce into the latest.
pub const WATCH_END_QUEUE: usize = 2;

/// Whether a gateway may append to `stream` through the service.
pub fn is_gateway_stream(stream: &str) -> bool {
    stream == GATEWAY_STREAM || stream.strip_prefix(GATEWAY_STREAM).is_some_and(|rest| rest.starts_with('.'))
}

/// The service; cheap to clone.
#[derive(Debug, Clone)]
pub struct SiteService {
    state: Arc<NodeState>,
}

impl SiteService {
    /// A service over the node's `state` (whose `site` is set at start).
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    fn site(&self) -> Result<Arc<LocalSite>, Status> {
        self.state.site.get().cloned().ok_or_else(|| {
            detail_status(v1::ErrorCode::Unavailable, "the node is starting: its site is not open yet".into())
        })
    }

    async fn blocking<T: Send + 'static, E: Send + 'static>(
        &self,
        call: impl FnOnce(&Store) -> Result<T, E> + Send + 'static,
    ) -> Result<Result<T, E>, Status> {
        let store = Arc::clone(&self.state.store);
        tokio::task::spawn_blocking(move || call(&store))
            .await
            .map_err(|join| Status::internal(format!("store call failed: {join}")))
    }
}

fn detail_status(code: v1::ErrorCode, message: String) -> Status {
    convert::status_from_error_detail(v1::ErrorDetail { code: code as u32, message, ..v1::ErrorDetail::default() })
}

type WatchEndStream = Pin<Box<dyn Stream<Item = Result<v1::LogEnd, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Site for SiteService {
    async fn read_log(&self, request: Request<v1::ReadLogRequest>) -> Result<Response<v1::ReadLogResponse>, Status> {
        let args = ReadLogArgs::from(request.into_inner());
        let events = self
            .blocking(move |store| store.read_log(args.from, args.max_records, args.max_bytes))
            .await?
            .map_err(|e| convert::status_from_read_error(&e))?;
        self.state.metrics.record_read(Some(events.len() as u64));
        Ok(Response::new(v1::ReadLogResponse { events: events.into_iter().map(Into::into).collect() }))
    }

    async fn read_stream(
        &self,
        request: Request<v1::ReadStreamRequest>,
    ) -> Result<Response<v1::ReadStreamResponse>, Status> {
        let args = ReadStreamArgs::try_from(request.into_inner())?;
        let now = now_ms();
        let stream = args.stream.clone();
        let events = match self
            .blocking(move |store| store.read_stream(&args.stream, args.from, args.direction, args.max_count, now))
            .await?
        {
            Ok(events) => events,
            Err(ReadError::StreamNotFound { .. }) => Vec::new(),
            Err(e) => return Err(convert::status_from_read_error(&e)),
        };
        self.state.metrics.record_read(Some(events.len() as u64));
        let response = v1::ReadStreamResponse::from(events);
        // Pages of `$gateway` streams are small; a page of large events of
        // another stream could outgrow a message: say so rather than fail
        // in the transport.
        if response.encoded_len() > GRPC_MESSAGE_BYTES_MAX {
            return Err(detail_status(
                v1::ErrorCode::InvalidArgument,
                format!(
                    "a page of {} events of {stream} is {} bytes, more than a message carries ({GRPC_MESSAGE_BYTES_MAX}); ask for fewer",
                    response.events.len(),
                    response.encoded_len()
                ),
            ));
        }
        Ok(Response::new(response))
    }

    async fn append(&self, request: Request<v1::SiteAppendRequest>) -> Result<Response<v1::AppendResponse>, Status> {
        let args = SiteAppendArgs::from_wire(request.into_inner(), now_ms())?;
        if !is_gateway_stream(args.stream.as_str()) {
            let mut detail = v1::ErrorDetail {
                code: v1::ErrorCode::PermissionDenied as u32,
                message: format!(
                    "the Site service appends only to {GATEWAY_STREAM} and {GATEWAY_STREAM}.* streams, not to {}",
                    args.stream
                ),
                field: "stream".into(),
                ..v1::ErrorDetail::default()
            };
            detail.stream = Some(args.stream.as_str().to_owned());
            return Err(convert::status_from_error_detail(detail));
        }
        let written = self
            .blocking(move |store| store.append_system(&args.stream, args.expected, args.events))
            .await?
            .map_err(|e: WriteError| convert::status_from_write_error(&e))?;
        Ok(Response::new(written.into()))
    }

    async fn replicate(
        &self,
        request: Request<v1::ReplicateRequest>,
    ) -> Result<Response<v1::ReplicateResponse>, Status> {
        let request = request.into_inner();
        if request.writes.len() > SITE_REPLICATE_WRITES_MAX {
            return Err(detail_status(
                v1::ErrorCode::InvalidArgument,
                format!(
                    "{} writes in one Replicate call, more than the maximum of {SITE_REPLICATE_WRITES_MAX}",
                    request.writes.len()
                ),
            ));
        }
        let origin = SiteName::new(&request.fence_origin).map_err(|e| {
            convert::status_from_error_detail(v1::ErrorDetail {
                code: v1::ErrorCode::InvalidName as u32,
                message: format!("fence_origin: {e}"),
                field: "fence_origin".into(),
                ..v1::ErrorDetail::default()
            })
        })?;
        let writes = convert::replica_writes(request.writes)?;
        let fence = Fence { origin: origin.to_string(), term: request.fence_term };
        let answers = self.site()?.replicate(fence, writes).await.map_err(|e| status_of_site_error(&e))?;
        Ok(Response::new(v1::ReplicateResponse { answers: answers.iter().map(answer_to_wire).collect() }))
    }

    type WatchEndStream = WatchEndStream;

    async fn watch_end(&self, _request: Request<v1::WatchEndRequest>) -> Result<Response<WatchEndStream>, Status> {
        let mut end = self.site()?.end();
        let mut stopping = self.state.stopping.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_END_QUEUE);
        tokio::spawn(async move {
            let mut sent = None;
            loop {
                let current = *end.borrow_and_update();
                if sent != Some(current) {
                    // While this waits for room, newer ends coalesce in the watch.
                    if sender.send(Ok(v1::LogEnd { end_position: current })).await.is_err() {
                        return; // the reader went away
                    }
                    sent = Some(current);
                }
                tokio::select! {
                    changed = end.changed() => if changed.is_err() { return },
                    () = sender.closed() => return,
                    _ = stopping.wait_for(|stopping| *stopping) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_append_to_gateway_streams_only() {
        for stream in ["$gateway", "$gateway.lease", "$gateway.members", "$gateway.cursors.to-eu"] {
            assert!(is_gateway_stream(stream), "{stream}");
        }
        for stream in ["$gateways", "$gateway-x", "$groups", "$sys.streams", "orders", "gateway.lease", ""] {
            assert!(!is_gateway_stream(stream), "{stream}");
        }
    }
}
