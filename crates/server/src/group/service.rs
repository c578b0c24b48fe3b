//! The `edgebus.v1.ConsumerGroups` gRPC service: group management over the
//! registry ([`super::Groups`]), and `Consume`, a consumer's call.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use edgebus_proto::convert::status_from_error_detail;
use edgebus_proto::v1;
use edgebus_proto::v1::consumer_groups_server::ConsumerGroups;
use edgebus_types::limits::{GROUP_ACK_POSITIONS_MAX, GROUP_MAX_IN_FLIGHT_MAX};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::def::{FilterDef, GroupRequest, SettingsRequest, StartRequest};
use super::engine::{Command, NackAction};
use crate::state::NodeState;

/// How long a new consumer may take to send its `join` message.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest consumer name, in bytes.
const CONSUMER_NAME_BYTES_MAX: usize = 128;

/// Messages queued towards one consumer beyond its window (joins, refusals,
/// the last error).
const CONSUMER_OUTBOX_EXTRA: usize = 64;

/// The service; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsumerGroupsService {
    state: Arc<NodeState>,
}

impl ConsumerGroupsService {
    /// A service over the node's `state`.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }
}

fn invalid(message: impl Into<String>) -> Status {
    status_from_error_detail(v1::ErrorDetail {
        code: v1::ErrorCode::InvalidArgument as u32,
        message: message.into(),
        ..v1::ErrorDetail::default()
    })
}

fn refused(detail: Box<v1::ErrorDetail>) -> Status {
    status_from_error_detail(*detail)
}

fn nack_action(action: i32) -> Result<NackAction, String> {
    match v1::NackAction::try_from(action) {
        Ok(v1::NackAction::Retry) => Ok(NackAction::Retry),
        Ok(v1::NackAction::Park) => Ok(NackAction::Park),
        Ok(v1::NackAction::Skip) => Ok(NackAction::Skip),
        Ok(v1::NackAction::Stop) => Ok(NackAction::Stop),
        Ok(v1::NackAction::Unspecified) => Err("a nack needs an action: retry, park, skip or stop".to_owned()),
        Err(_) => Err(format!("unknown nack action {action}")),
    }
}

/// Checks a consumer name: 1 to 128 bytes of printable ASCII without spaces;
/// empty lets the engine name it.
fn consumer_name(name: String) -> Result<Option<String>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    if name.len() > CONSUMER_NAME_BYTES_MAX {
        return Err(invalid(format!("consumer name is {} bytes; the most is {CONSUMER_NAME_BYTES_MAX}", name.len())));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(format!("consumer name {name:?} has {c:?}; use printable ASCII without spaces")));
    }
    Ok(Some(name))
}

/// A consumer's messages after its join, with a look at what has arrived
/// already: acks that came back to back are merged without waiting for
/// more, so merging adds no latency.
struct Inbound {
    messages: tonic::Streaming<v1::ConsumeRequest>,
    /// A message taken while looking for acks that was not one: next.
    held: Option<v1::ConsumeRequest>,
    /// The call ended (cleanly or not) while looking ahead.
    ended: bool,
}

impl Inbound {
    fn new(messages: tonic::Streaming<v1::ConsumeRequest>) -> Self {
        Self { messages, held: None, ended: false }
    }

    /// The next message; `None` once the call has ended or broken.
    async fn next(&mut self) -> Option<v1::ConsumeRequest> {
        if let Some(held) = self.held.take() {
            return Some(held);
        }
        if self.ended {
            return None;
        }
        self.messages.message().await.ok().flatten()
    }

    /// The next message if it has arrived already and is an ack; never
    /// waits.
    async fn next_ack_if_ready(&mut self) -> Option<v1::consume_request::Ack> {
        use std::task::Poll;
        use tokio_stream::Stream as _;
        if self.held.is_some() || self.ended {
            return None;
        }
        let polled = std::future::poll_fn(|context| Poll::Ready(Pin::new(&mut self.messages).poll_next(context))).await;
        match polled {
            Poll::Pending => None,
            Poll::Ready(Some(Ok(v1::ConsumeRequest { kind: Some(v1::consume_request::Kind::Ack(ack)) }))) => Some(ack),
            Poll::Ready(Some(Ok(other))) => {
                self.held = Some(other);
                None
            }
            Poll::Ready(Some(Err(_)) | None) => {
                self.ended = true;
                None
            }
        }
    }
}

type ConsumeStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ConsumeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConsumerGroups for ConsumerGroupsService {
    async fn create_group(&self, request: Request<v1::CreateGroupRequest>) -> Result<Response<v1::GroupInfo>, Status> {
        let request = request.into_inner();
        let group = GroupRequest {
            name: request.name,
            filter: Some(FilterDef::from_wire(request.filter)),
            settings: SettingsRequest::from_wire(request.settings).map_err(|e| refused(Box::new(e.detail())))?,
            start: Some(StartRequest::from_wire(request.start_at).map_err(|e| refused(Box::new(e.detail())))?),
        };
        let info = self.state.groups.create(&self.state, group).await.map_err(refused)?;
        Ok(Response::new(info))
    }

    async fn update_group(&self, request: Request<v1::UpdateGroupRequest>) -> Result<Response<v1::GroupInfo>, Status> {
        let request = request.into_inner();
        let group = GroupRequest {
            name: request.name.clone(),
            filter: request.filter.map(|f| FilterDef::from_wire(Some(f))),
            settings: SettingsRequest::from_wire(request.settings).map_err(|e| refused(Box::new(e.detail())))?,
            start: None,
        };
        let info = self.state.groups.update(&self.state, &request.name, group).await.map_err(refused)?;
        Ok(Response::new(info))
    }

    async fn delete_group(
        &self,
        request: Request<v1::DeleteGroupRequest>,
    ) -> Result<Response<v1::DeleteGroupResponse>, Status> {
        self.state.groups.delete(&self.state, &request.into_inner().name).await.map_err(refused)?;
        Ok(Response::new(v1::DeleteGroupResponse {}))
    }

    async fn list_groups(
        &self,
        _request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        Ok(Response::new(v1::ListGroupsResponse { groups: self.state.groups.list().await }))
    }

    async fn describe_group(
        &self,
        request: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::GroupInfo>, Status> {
        let info = self.state.groups.describe(&request.into_inner().name).await.map_err(refused)?;
        Ok(Response::new(info))
    }

    async fn list_parked(
        &self,
        request: Request<v1::ListParkedRequest>,
    ) -> Result<Response<v1::ListParkedResponse>, Status> {
        let request = request.into_inner();
        let (events, total) = self
            .state
            .groups
            .list_parked(&self.state, &request.name, request.offset, request.limit)
            .await
            .map_err(refused)?;
        Ok(Response::new(v1::ListParkedResponse { events, total }))
    }

    async fn replay_parked(
        &self,
        request: Request<v1::ReplayParkedRequest>,
    ) -> Result<Response<v1::ReplayParkedResponse>, Status> {
        let replaying =
            self.state.groups.replay_parked(&self.state, &request.into_inner().name).await.map_err(refused)?;
        Ok(Response::new(v1::ReplayParkedResponse { replaying }))
    }

    type ConsumeStream = ConsumeStream;

    async fn consume(
        &self,
        request: Request<tonic::Streaming<v1::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        use v1::consume_request::Kind;
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(JOIN_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(invalid(format!("no join message within {} s", JOIN_TIMEOUT.as_secs()))),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(invalid("the call ended before its join message")),
            Ok(Ok(Some(first))) => first,
        };
        let Some(Kind::Join(join)) = first.kind else {
            return Err(invalid("the first message of a consumer must be `join`"));
        };
        if join.max_in_flight > GROUP_MAX_IN_FLIGHT_MAX {
            return Err(invalid(format!(
                "max_in_flight {} is too large: give 1 to {GROUP_MAX_IN_FLIGHT_MAX} (0: the group's)",
                join.max_in_flight
            )));
        }
        let name = consumer_name(join.consumer)?;
        let commands = self.state.groups.commands(&join.group).map_err(refused)?;
        let (outbox, messages) = mpsc::channel(GROUP_MAX_IN_FLIGHT_MAX as usize + CONSUMER_OUTBOX_EXTRA);
        let (reply, replied) = oneshot::channel();
        let unavailable = || {
            status_from_error_detail(v1::ErrorDetail {
                code: v1::ErrorCode::Unavailable as u32,
                message: format!("group {} stopped", join.group),
                ..v1::ErrorDetail::default()
            })
        };
        let command = Command::Join { name, max_in_flight: join.max_in_flight, outbox: outbox.clone(), reply };
        commands.send(command).await.map_err(|_| unavailable())?;
        let consumer = replied.await.map_err(|_| unavailable())?.map_err(refused)?;
        // The engine holds the outbox; this task only a weak handle for
        // protocol errors, so the call ends when the engine lets go of it.
        let outbox = outbox.downgrade();
        tokio::spawn(async move {
            // Ends when the consumer half-closes, the call breaks, or the
            // consumer breaks the protocol; then it leaves the group, and its
            // events go to the others.
            let mut inbound = Inbound::new(inbound);
            while let Some(message) = inbound.next().await {
                let command = match message.kind {
                    Some(Kind::Ack(ack)) => {
                        // Acks received already behind this one go with it:
                        // one engine command for many, same order.
                        let mut positions = ack.positions;
                        while positions.len() < GROUP_ACK_POSITIONS_MAX {
                            let Some(more) = inbound.next_ack_if_ready().await else { break };
                            positions.extend(more.positions);
                        }
                        Command::Ack { consumer, positions }
                    }
                    Some(Kind::Nack(nack)) => match nack_action(nack.action) {
                        Ok(action) => {
                            Command::Nack { consumer, positions: nack.positions, action, reason: nack.reason }
                        }
                        Err(message) => {
                            let detail = v1::ErrorDetail {
                                code: v1::ErrorCode::InvalidArgument as u32,
                                message,
                                ..v1::ErrorDetail::default()
                            };
                            let refusal =
                                v1::consume_response::Refused { positions: nack.positions, error: Some(detail) };
                            let kind = v1::consume_response::Kind::Refused(refusal);
                            let Some(outbox) = outbox.upgrade() else { break };
                            if outbox.try_send(Ok(v1::ConsumeResponse { kind: Some(kind) })).is_err() {
                                break;
                            }
                            continue;
                        }
                    },
                    Some(Kind::Join(_)) | None => {
                        let detail = v1::ErrorDetail {
                            code: v1::ErrorCode::InvalidArgument as u32,
                            message: "a consumer joins once; only ack and nack may follow".to_owned(),
                            ..v1::ErrorDetail::default()
                        };
                        if let Some(outbox) = outbox.upgrade() {
                            let _ = outbox.try_send(Ok(v1::ConsumeResponse {
                                kind: Some(v1::consume_response::Kind::Error(detail)),
                            }));
                        }
                        break;
                    }
                };
                if commands.send(command).await.is_err() {
                    break;
                }
            }
            let _ = commands.send(Command::Leave { consumer }).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(messages))))
    }
}
