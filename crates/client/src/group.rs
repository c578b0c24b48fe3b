//! Consumer groups: management calls on [`Client`], and [`Consumer`], one
//! member of a group receiving deliveries and settling them.
//!
//! Management takes and returns the wire messages of `edgebus.v1`
//! (`CreateGroupRequest`, `GroupInfo`, …): they are plain records,
//! documented in `groups.proto`.
//!
//! A consumer receives at most its window of unsettled deliveries; each is
//! settled with [`Consumer::ack`] or [`Consumer::nack`] by the event's log
//! position. Delivery is at least once: an event whose consumer leaves or
//! times out goes to another, and a restarted node redelivers what its last
//! checkpoint did not cover. Write effects with `exists_or_write` (or check
//! the event id) to make them exactly once.

use std::pin::Pin;
use std::task::{Context, Poll};

use edgebus_proto::v1;
use edgebus_types::RecordedEvent;
use edgebus_types::limits::GROUP_ACK_POSITIONS_MAX;
use tokio::sync::mpsc;

use crate::{Client, ClientError};

/// Acks and nacks queued towards the node before `ack` waits.
const SETTLEMENTS_QUEUED_MAX: usize = 1024;

impl Client {
    /// Creates a consumer group.
    pub async fn create_group(&self, request: v1::CreateGroupRequest) -> Result<v1::GroupInfo, ClientError> {
        let response = self.groups.clone().create_group(request).await.map_err(|s| self.status(s))?;
        Ok(response.into_inner())
    }

    /// Changes a group's filter or settings (the fields set).
    pub async fn update_group(&self, request: v1::UpdateGroupRequest) -> Result<v1::GroupInfo, ClientError> {
        let response = self.groups.clone().update_group(request).await.map_err(|s| self.status(s))?;
        Ok(response.into_inner())
    }

    /// Deletes a group.
    pub async fn delete_group(&self, name: &str) -> Result<(), ClientError> {
        let request = v1::DeleteGroupRequest { name: name.to_owned() };
        self.groups.clone().delete_group(request).await.map_err(|s| self.status(s))?;
        Ok(())
    }

    /// Every group, in name order.
    pub async fn list_groups(&self) -> Result<Vec<v1::GroupInfo>, ClientError> {
        let response = self.groups.clone().list_groups(v1::ListGroupsRequest {}).await.map_err(|s| self.status(s))?;
        Ok(response.into_inner().groups)
    }

    /// One group's settings and figures.
    pub async fn describe_group(&self, name: &str) -> Result<v1::GroupInfo, ClientError> {
        let request = v1::DescribeGroupRequest { name: name.to_owned() };
        let response = self.groups.clone().describe_group(request).await.map_err(|s| self.status(s))?;
        Ok(response.into_inner())
    }

    /// A page of a group's parked events, oldest first (`limit` 0: the
    /// node's maximum page).
    pub async fn list_parked(
        &self,
        name: &str,
        offset: u64,
        limit: u32,
    ) -> Result<v1::ListParkedResponse, ClientError> {
        let request = v1::ListParkedRequest { name: name.to_owned(), offset, limit };
        let response = self.groups.clone().list_parked(request).await.map_err(|s| self.status(s))?;
        Ok(response.into_inner())
    }

    /// Hands a group's parked events back to its consumers; returns how many.
    pub async fn replay_parked(&self, name: &str) -> Result<u64, ClientError> {
        let request = v1::ReplayParkedRequest { name: name.to_owned() };
        let response = self.groups.clone().replay_parked(request).await.map_err(|s| self.status(s))?;
        Ok(response.into_inner().replaying)
    }

    /// Joins group `group` as a consumer named `consumer` (`None`: the node
    /// names it) with a window of `max_in_flight` unsettled deliveries (0:
    /// the group's). Returns once the node accepted the join.
    pub async fn consume(
        &self,
        group: &str,
        consumer: Option<&str>,
        max_in_flight: u32,
    ) -> Result<Consumer, ClientError> {
        let join = v1::consume_request::Join {
            group: group.to_owned(),
            consumer: consumer.unwrap_or_default().to_owned(),
            max_in_flight,
        };
        let (requests, outgoing) = mpsc::channel(SETTLEMENTS_QUEUED_MAX);
        let first = v1::ConsumeRequest { kind: Some(v1::consume_request::Kind::Join(join)) };
        requests.try_send(first).expect("an empty channel takes the join");
        let response =
            self.groups.clone().consume(Outgoing { queued: outgoing, held: None }).await.map_err(|s| self.status(s))?;
        let mut responses = response.into_inner();
        let joined = match responses.message().await {
            Ok(Some(v1::ConsumeResponse { kind: Some(v1::consume_response::Kind::Joined(joined)) })) => joined,
            Ok(Some(v1::ConsumeResponse { kind: Some(v1::consume_response::Kind::Error(detail)) })) => {
                return Err(ClientError::Refused { detail });
            }
            Ok(other) => {
                return Err(ClientError::Rpc {
                    addr: self.addr.clone(),
                    status: Box::new(tonic::Status::internal(format!("expected `joined` first, got {other:?}"))),
                });
            }
            Err(status) => return Err(self.status(status)),
        };
        Ok(Consumer {
            responses,
            requests,
            name: joined.consumer,
            window: joined.max_in_flight,
            addr: self.addr.clone(),
            ended: false,
        })
    }
}

/// A consumer's messages to the node, in the order queued, as the
/// connection takes them: acks queued back to back while it was busy go as
/// one message (up to [`GROUP_ACK_POSITIONS_MAX`] positions). Nothing waits
/// to be merged: an ack queued alone goes alone, at once.
struct Outgoing {
    queued: mpsc::Receiver<v1::ConsumeRequest>,
    /// A message taken while merging acks that was not an ack: next.
    held: Option<v1::ConsumeRequest>,
}

impl tokio_stream::Stream for Outgoing {
    type Item = v1::ConsumeRequest;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use v1::consume_request::Kind;
        let this = self.get_mut();
        let first = match this.held.take() {
            Some(held) => held,
            None => match this.queued.poll_recv(context) {
                Poll::Ready(Some(request)) => request,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            },
        };
        let mut ack = match first.kind {
            Some(Kind::Ack(ack)) => ack,
            kind => return Poll::Ready(Some(v1::ConsumeRequest { kind })),
        };
        while ack.positions.len() < GROUP_ACK_POSITIONS_MAX {
            match this.queued.try_recv() {
                Ok(v1::ConsumeRequest { kind: Some(Kind::Ack(more)) }) => ack.positions.extend(more.positions),
                Ok(other) => {
                    this.held = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        Poll::Ready(Some(v1::ConsumeRequest { kind: Some(Kind::Ack(ack)) }))
    }
}

/// What a [`Consumer`] receives.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerItem {
    /// An event to process; settle it by `event.position`.
    Delivery {
        /// The event.
        event: RecordedEvent,
        /// 1 on its first delivery.
        attempt: u32,
        /// Handed back from the parked stream.
        replayed: bool,
    },
    /// Acks or nacks the node could not apply (for example: taken back
    /// after a timeout). Nothing changed; the consumer goes on.
    Refused {
        /// The positions concerned.
        positions: Vec<u64>,
        /// Why (`NOT_IN_FLIGHT`, …).
        detail: v1::ErrorDetail,
    },
}

/// One member of a consumer group. Dropping it leaves the group: its
/// unsettled deliveries go to other consumers.
#[derive(Debug)]
pub struct Consumer {
    responses: tonic::Streaming<v1::ConsumeResponse>,
    requests: mpsc::Sender<v1::ConsumeRequest>,
    name: String,
    window: u32,
    addr: String,
    ended: bool,
}

impl Consumer {
    /// This consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This consumer's window: the most unsettled deliveries it holds.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// The next delivery or refusal; `None` when the node ended the call
    /// cleanly. The node ends it with an error when the group is deleted
    /// (`GROUP_NOT_FOUND`) or the node stops (`UNAVAILABLE`).
    pub async fn next(&mut self) -> Option<Result<ConsumerItem, ClientError>> {
        use v1::consume_response::Kind;
        if self.ended {
            return None;
        }
        loop {
            let response = match self.responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => {
                    self.ended = true;
                    return None;
                }
                Err(status) => {
                    self.ended = true;
                    return Some(Err(ClientError::from_status(&self.addr, status)));
                }
            };
            return Some(match response.kind {
                Some(Kind::Delivery(delivery)) => {
                    let Some(event) = delivery.event else {
                        continue;
                    };
                    match RecordedEvent::try_from(event) {
                        Ok(event) => {
                            Ok(ConsumerItem::Delivery { event, attempt: delivery.attempt, replayed: delivery.replayed })
                        }
                        Err(e) => Err(ClientError::InvalidResponse(e)),
                    }
                }
                Some(Kind::Refused(refused)) => Ok(ConsumerItem::Refused {
                    positions: refused.positions,
                    detail: refused.error.unwrap_or_default(),
                }),
                Some(Kind::Error(detail)) => {
                    self.ended = true;
                    Err(ClientError::Refused { detail })
                }
                Some(Kind::Joined(_)) | None => continue,
            });
        }
    }

    /// Leaves the group after the node has taken every ack and nack sent:
    /// half-closes the call and waits (at most `timeout`) for the node to
    /// end it. Deliveries that arrive meanwhile go back to the group.
    pub async fn close(mut self, timeout: std::time::Duration) {
        let Self { responses, requests, .. } = &mut self;
        drop(std::mem::replace(requests, mpsc::channel(1).0));
        let _ = tokio::time::timeout(timeout, async { while let Ok(Some(_)) = responses.message().await {} }).await;
    }

    async fn send(&self, kind: v1::consume_request::Kind) -> Result<(), ClientError> {
        self.requests.send(v1::ConsumeRequest { kind: Some(kind) }).await.map_err(|_| ClientError::Rpc {
            addr: self.addr.clone(),
            status: Box::new(tonic::Status::cancelled("the consumer's call has ended")),
        })
    }

    /// Acks deliveries by their events' positions: processed. Returns once
    /// queued (waits only when [`SETTLEMENTS_QUEUED_MAX`] messages are
    /// queued); acks queued back to back go to the node as one message.
    pub async fn ack(&self, positions: Vec<u64>) -> Result<(), ClientError> {
        self.send(v1::consume_request::Kind::Ack(v1::consume_request::Ack { positions })).await
    }

    /// Nacks deliveries: `action` says what the group does with them, and
    /// `reason` goes to the parked stream and the node's logs.
    pub async fn nack(&self, positions: Vec<u64>, action: v1::NackAction, reason: &str) -> Result<(), ClientError> {
        let nack = v1::consume_request::Nack { positions, action: action as i32, reason: reason.to_owned() };
        self.send(v1::consume_request::Kind::Nack(nack)).await
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    fn ack(positions: Vec<u64>) -> v1::ConsumeRequest {
        v1::ConsumeRequest { kind: Some(v1::consume_request::Kind::Ack(v1::consume_request::Ack { positions })) }
    }

    fn nack(positions: Vec<u64>) -> v1::ConsumeRequest {
        let nack = v1::consume_request::Nack { positions, action: v1::NackAction::Retry as i32, reason: String::new() };
        v1::ConsumeRequest { kind: Some(v1::consume_request::Kind::Nack(nack)) }
    }

    #[tokio::test]
    async fn queued_acks_go_as_one_message_in_order_with_nacks_between() {
        let (requests, queued) = mpsc::channel(16);
        for request in [ack(vec![1]), ack(vec![2, 3]), nack(vec![4]), ack(vec![5]), ack(vec![6])] {
            requests.try_send(request).expect("room");
        }
        drop(requests);
        let sent: Vec<_> = Outgoing { queued, held: None }.collect().await;
        assert_eq!(sent, vec![ack(vec![1, 2, 3]), nack(vec![4]), ack(vec![5, 6])]);
    }

    #[tokio::test]
    async fn a_merged_ack_stops_at_the_most_positions() {
        let (requests, queued) = mpsc::channel(GROUP_ACK_POSITIONS_MAX + 1);
        for position in 0..=GROUP_ACK_POSITIONS_MAX as u64 {
            requests.try_send(ack(vec![position])).expect("room");
        }
        drop(requests);
        let sent: Vec<_> = Outgoing { queued, held: None }.collect().await;
        let sizes: Vec<usize> = sent
            .iter()
            .map(|r| match &r.kind {
                Some(v1::consume_request::Kind::Ack(a)) => a.positions.len(),
                other => panic!("not an ack: {other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![GROUP_ACK_POSITIONS_MAX, 1]);
    }
}
