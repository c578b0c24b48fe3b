//! The `edgebus.v1.EventStore` gRPC service over the store: each request is
//! validated by `edgebus-proto` (errors name the field), run on the blocking
//! pool (the store's calls block until durable), and answered with the
//! store's result or a status carrying the stable error code.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use edgebus_proto::convert::ClientMessage;
use edgebus_proto::convert::{
    self, AppendArgs, DeleteSnapshotArgs, DeleteStreamArgs, ExistsOrWriteArgs, ListSnapshotsArgs, ListStreamsArgs,
    ReadAllArgs, ReadSnapshotArgs, ReadStreamArgs, RecordSnapshotArgs, SetStreamMetadataArgs, StreamInfoArgs,
};
use edgebus_proto::v1;
use edgebus_proto::v1::event_store_server::EventStore;
use edgebus_store::{ExistsOrWrite, ReadError, Store, WriteError};
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};

use crate::metrics::{NodeStats, Outcome};
use crate::state::NodeState;
use crate::subscription::{self, Credit, Opened};

/// How long a new subscription may take to send its `start` message.
pub const SUBSCRIBE_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Milliseconds since the Unix epoch: the node stamps events before they are
/// logged, so the store itself never reads a clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Payload bytes (data and metadata) of a wire event, for the metrics.
fn wire_payload_bytes(event: &v1::NewEvent) -> u64 {
    (event.data.len() + event.metadata.len()) as u64
}

/// The outcome label of a refusal: its stable code (0 if it carries none).
fn refused(status: &Status) -> Outcome {
    Outcome::Refused(convert::error_detail_from_status(status).map_or(0, |detail| detail.code))
}

/// A write refused by an ingest quota (checked before the store sees it),
/// answered after its hold (see `crate::quota`; the caller has dropped the
/// request) as `RESOURCE_EXHAUSTED` with the retry delay.
async fn refused_by_quota(refusal: crate::quota::QuotaRefusal) -> Status {
    tokio::time::sleep(refusal.hold).await;
    convert::status_from_error_detail(refusal.to_error_detail())
}

/// The service; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventStoreService {
    state: Arc<NodeState>,
}

impl EventStoreService {
    /// A service over the node's `state`.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    /// Runs a blocking store write on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Store) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.state.store);
        match tokio::task::spawn_blocking(move || call(&store)).await {
            Ok(result) => result.map_err(|e| convert::status_from_write_error(&e)),
            Err(join) => Err(Status::internal(format!("store call failed: {join}"))),
        }
    }

    /// Runs a blocking store read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Store) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.state.store);
        match tokio::task::spawn_blocking(move || call(&store)).await {
            Ok(result) => result.map_err(|e| convert::status_from_read_error(&e)),
            Err(join) => Err(Status::internal(format!("store call failed: {join}"))),
        }
    }
}

impl EventStoreService {
    /// One append, as `Append` answers it (and each request of `AppendStream`).
    pub(crate) async fn append_one(&self, request: v1::AppendRequest) -> Result<v1::AppendResponse, Status> {
        let events = request.events.len() as u64;
        let bytes = request.events.iter().map(wire_payload_bytes).sum();
        let result = async {
            let args = AppendArgs::from_wire(request, now_ms())?;
            if let Err(refusal) = self.state.quotas.admit(&args.stream, events, bytes) {
                drop(args);
                return Err(refused_by_quota(refusal).await);
            }
            let started = Instant::now();
            let result = self.state.store.append_async(&args.stream, args.expected, args.events).await;
            let result = result.map_err(|e| convert::status_from_write_error(&e));
            self.state.metrics.record_append_latency(started.elapsed());
            result
        }
        .await;
        self.state.metrics.record_append(result.as_ref().map_or_else(refused, |_| Outcome::Ok), events, bytes);
        result.map(Into::into)
    }

    /// The node's state.
    pub(crate) fn state(&self) -> &NodeState {
        &self.state
    }
}

#[tonic::async_trait]
impl EventStore for EventStoreService {
    async fn append(&self, request: Request<v1::AppendRequest>) -> Result<Response<v1::AppendResponse>, Status> {
        Ok(Response::new(self.append_one(request.into_inner()).await?))
    }

    type AppendStreamStream = crate::append_stream::Answers;

    async fn append_stream(
        &self,
        request: Request<tonic::Streaming<v1::AppendStreamRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        Ok(Response::new(crate::append_stream::serve(self.clone(), request.into_inner())))
    }

    async fn exists_or_write(
        &self,
        request: Request<v1::ExistsOrWriteRequest>,
    ) -> Result<Response<v1::ExistsOrWriteResponse>, Status> {
        let bytes = request.get_ref().event.as_ref().map_or(0, wire_payload_bytes);
        let result = async {
            let args = ExistsOrWriteArgs::from_wire(request.into_inner(), now_ms())?;
            if let Err(refusal) = self.state.quotas.admit(&args.stream, 1, bytes) {
                drop(args);
                return Err(refused_by_quota(refusal).await);
            }
            let started = Instant::now();
            let result = self.state.store.exists_or_write_async(&args.stream, args.index, args.event).await;
            let result = result.map_err(|e| convert::status_from_write_error(&e));
            self.state.metrics.record_append_latency(started.elapsed());
            result
        }
        .await;
        let outcome = match &result {
            Ok(ExistsOrWrite::Written { .. }) => Outcome::Written,
            Ok(ExistsOrWrite::Exists { same: true, .. }) => Outcome::ExistsSame,
            Ok(ExistsOrWrite::Exists { same: false, .. }) => Outcome::ExistsDifferent,
            Err(status) => refused(status),
        };
        self.state.metrics.record_exists_or_write(outcome, bytes);
        Ok(Response::new(result?.into()))
    }

    async fn read_stream(
        &self,
        request: Request<v1::ReadStreamRequest>,
    ) -> Result<Response<v1::ReadStreamResponse>, Status> {
        let args = ReadStreamArgs::try_from(request.into_inner())?;
        let now = now_ms();
        let events = self
            .read(move |store| store.read_stream(&args.stream, args.from, args.direction, args.max_count, now))
            .await;
        self.state.metrics.record_read(events.as_ref().ok().map(|events| events.len() as u64));
        Ok(Response::new(events?.into()))
    }

    async fn read_all(&self, request: Request<v1::ReadAllRequest>) -> Result<Response<v1::ReadAllResponse>, Status> {
        let args = ReadAllArgs::try_from(request.into_inner())?;
        let slice =
            self.read(move |store| store.read_all(args.from, args.direction, args.max_count, &args.filter)).await;
        self.state.metrics.record_read(slice.as_ref().ok().map(|slice| slice.events.len() as u64));
        Ok(Response::new(slice?.into()))
    }

    async fn stream_info(
        &self,
        request: Request<v1::StreamInfoRequest>,
    ) -> Result<Response<v1::StreamInfoResponse>, Status> {
        let args = StreamInfoArgs::try_from(request.into_inner())?;
        let info = self.read(move |store| store.stream_info(&args.stream)).await?;
        Ok(Response::new(info.into()))
    }

    async fn delete_stream(
        &self,
        request: Request<v1::DeleteStreamRequest>,
    ) -> Result<Response<v1::DeleteStreamResponse>, Status> {
        let args = DeleteStreamArgs::try_from(request.into_inner())?;
        let now = now_ms();
        let position =
            self.write(move |store| store.delete_stream(&args.stream, args.expected, args.hard, now)).await?;
        Ok(Response::new(v1::DeleteStreamResponse { position }))
    }

    async fn set_stream_metadata(
        &self,
        request: Request<v1::SetStreamMetadataRequest>,
    ) -> Result<Response<v1::SetStreamMetadataResponse>, Status> {
        let args = SetStreamMetadataArgs::try_from(request.into_inner())?;
        let now = now_ms();
        let position = self.write(move |store| store.set_stream_metadata(&args.stream, args.metadata, now)).await?;
        Ok(Response::new(v1::SetStreamMetadataResponse { position }))
    }

    async fn record_snapshot(
        &self,
        request: Request<v1::RecordSnapshotRequest>,
    ) -> Result<Response<v1::RecordSnapshotResponse>, Status> {
        let args = RecordSnapshotArgs::try_from(request.into_inner())?;
        let now = now_ms();
        let position = self
            .write(move |store| store.record_snapshot(&args.source, &args.stream, args.version, args.state, now))
            .await?;
        Ok(Response::new(v1::RecordSnapshotResponse { position }))
    }

    async fn read_snapshot(
        &self,
        request: Request<v1::ReadSnapshotRequest>,
    ) -> Result<Response<v1::ReadSnapshotResponse>, Status> {
        let args = ReadSnapshotArgs::try_from(request.into_inner())?;
        let snapshot =
            self.read(move |store| store.read_snapshot(&args.source, &args.stream, args.at_or_below)).await?;
        Ok(Response::new(snapshot.into()))
    }

    async fn delete_snapshot(
        &self,
        request: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        let args = DeleteSnapshotArgs::try_from(request.into_inner())?;
        let now = now_ms();
        let position =
            self.write(move |store| store.delete_snapshot(&args.source, &args.stream, args.version, now)).await?;
        Ok(Response::new(v1::DeleteSnapshotResponse { position }))
    }

    async fn list_snapshots(
        &self,
        request: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        let args = ListSnapshotsArgs::try_from(request.into_inner())?;
        let snapshots = self
            .read(move |store| store.list_snapshots(args.source.as_deref(), args.stream.as_ref(), args.limit))
            .await?;
        Ok(Response::new(snapshots.into()))
    }

    async fn list_streams(
        &self,
        request: Request<v1::ListStreamsRequest>,
    ) -> Result<Response<v1::ListStreamsResponse>, Status> {
        let args = ListStreamsArgs::from(request.into_inner());
        let streams =
            self.read(move |store| store.list_streams(args.after.as_deref(), args.limit, args.include_system)).await?;
        Ok(Response::new(streams.into()))
    }

    async fn stats(&self, _request: Request<v1::StatsRequest>) -> Result<Response<v1::StatsResponse>, Status> {
        let state = Arc::clone(&self.state);
        // Gathering takes the log's and the store's queue locks: off the async workers.
        match tokio::task::spawn_blocking(move || NodeStats::gather(&state)).await {
            Ok(stats) => Ok(Response::new(stats.into())),
            Err(join) => Err(Status::internal(format!("gathering the stats failed: {join}"))),
        }
    }

    type SubscribeStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::SubscribeResponse, Status>> + Send + 'static>>;

    /// Reads the `start` message, opens the subscription (refusals are the
    /// call's status), then forwards the subscriber's credit grants while
    /// the delivered messages stream back.
    async fn subscribe(
        &self,
        request: Request<tonic::Streaming<v1::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let invalid = |message: String| {
            convert::status_from_error_detail(v1::ErrorDetail {
                code: v1::ErrorCode::InvalidArgument as u32,
                message,
                ..v1::ErrorDetail::default()
            })
        };
        let first = match tokio::time::timeout(SUBSCRIBE_START_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(invalid(format!(
                    "no start message within {} s of opening the subscription",
                    SUBSCRIBE_START_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(invalid("the subscription ended before its start message".to_owned())),
            Ok(Ok(Some(first))) => first,
        };
        let start = match ClientMessage::try_from(first)? {
            ClientMessage::Start(start) => start,
            ClientMessage::Credit { .. } => {
                return Err(invalid("the first message of a subscription must be `start`, not `credit`".to_owned()));
            }
        };
        let credit = Credit::new(start.initial_grant_events);
        let opened = subscription::open(&self.state, start, credit)
            .await
            .map_err(|detail| convert::status_from_error_detail(*detail))?;
        let Opened { credit, messages, abort } = opened;
        tokio::spawn(async move {
            // Ends when the subscriber half-closes or the call ends.
            while let Ok(Some(message)) = inbound.message().await {
                let violation = match ClientMessage::try_from(message) {
                    Ok(ClientMessage::Credit { grant_events }) => {
                        credit.grant(grant_events);
                        continue;
                    }
                    Ok(ClientMessage::Start(_)) => "a subscription takes one start message; a second one came".into(),
                    Err(e) => format!("invalid subscription message: {e}"),
                };
                let _ = abort.send(v1::ErrorDetail {
                    code: v1::ErrorCode::InvalidArgument as u32,
                    message: violation,
                    ..v1::ErrorDetail::default()
                });
                break;
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(messages)
            .map(|message| Ok(v1::SubscribeResponse::from(message)));
        Ok(Response::new(Box::pin(stream)))
    }
}
