//! Subscriptions: [`Client::subscribe`] opens one and returns a
//! [`Subscription`], a stream of [`SubscriptionItem`]s.
//!
//! The node never sends more events than the subscriber granted. By default
//! the [`Subscription`] manages the credit itself ([`Credit::Window`]): it
//! grants a window with the start and tops it up as the application takes
//! events, so a slow application slows the node's sending, and a stopped one
//! stops it, without any buffer growing. [`Credit::Manual`] leaves granting
//! to the caller ([`Subscription::grant`]).

use edgebus_proto::convert::{ClientMessage, ServerMessage, SubscribeFrom, SubscribeStart, SubscriptionFilter};
use edgebus_proto::v1;
use edgebus_types::RecordedEvent;
use tokio::sync::mpsc;

use crate::{Client, ClientError};

/// Credit window a subscription grants unless told otherwise (events).
pub const CREDIT_WINDOW_DEFAULT: u64 = 1024;

/// Grants queued towards the node before `grant` waits.
const GRANTS_QUEUED_MAX: usize = 16;

/// Who grants the node credit to send events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    /// The subscription does: `window` events with the start, and more each
    /// time the application has taken half of them.
    Window(u64),
    /// The caller does, with [`Subscription::grant`]; `initial` goes with
    /// the start (0: nothing is sent until the first grant).
    Manual {
        /// Events granted with the start.
        initial: u64,
    },
}

impl Default for Credit {
    fn default() -> Self {
        Self::Window(CREDIT_WINDOW_DEFAULT)
    }
}

/// One message of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionItem {
    /// A matching event.
    Event(RecordedEvent),
    /// Catch-up is over: every matching event below `position` came before
    /// this; what follows is live. Sent once.
    CaughtUp {
        /// The first log position not yet delivered or skipped.
        position: u64,
    },
    /// Progress over events the filter skipped: a consumer stores
    /// `position` as its checkpoint.
    Checkpoint {
        /// The first log position not yet delivered or skipped.
        position: u64,
    },
}

/// An open subscription. Dropping it ends the subscription on the node.
#[derive(Debug)]
pub struct Subscription {
    responses: tonic::Streaming<v1::SubscribeResponse>,
    requests: mpsc::Sender<v1::SubscribeRequest>,
    /// For [`Credit::Window`]: the window, and events taken since the last grant.
    window: Option<u64>,
    taken_since_grant: u64,
    addr: String,
    ended: bool,
}

impl Client {
    /// Opens a subscription to the events that pass `filter`, starting at
    /// `from`, with `credit` deciding who grants credit. Fails with the
    /// node's refusal: an invalid filter (a predicate that does not compile
    /// comes back with the compiler's message), or too many subscriptions.
    pub async fn subscribe(
        &self,
        filter: SubscriptionFilter,
        from: SubscribeFrom,
        credit: Credit,
    ) -> Result<Subscription, ClientError> {
        let (window, initial_grant_events) = match credit {
            Credit::Window(window) => (Some(window.max(1)), window.max(1)),
            Credit::Manual { initial } => (None, initial),
        };
        let start = ClientMessage::Start(SubscribeStart { filter, from, initial_grant_events });
        let (requests, outgoing) = mpsc::channel(GRANTS_QUEUED_MAX);
        requests.try_send(start.into()).expect("an empty channel takes the start");
        let mut inner = self.inner.clone();
        let response = inner
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
            .map_err(|status| self.status(status))?;
        Ok(Subscription {
            responses: response.into_inner(),
            requests,
            window,
            taken_since_grant: 0,
            addr: self.addr.clone(),
            ended: false,
        })
    }
}

impl Subscription {
    /// The next item; `None` once the node ended the subscription cleanly
    /// (it never does on its own while running: a stopping node ends it
    /// with an `UNAVAILABLE` error).
    pub async fn next(&mut self) -> Option<Result<SubscriptionItem, ClientError>> {
        if self.ended {
            return None;
        }
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
        let item = match ServerMessage::try_from(response) {
            Ok(ServerMessage::Event(event)) => SubscriptionItem::Event(event),
            Ok(ServerMessage::CaughtUp { position }) => SubscriptionItem::CaughtUp { position },
            Ok(ServerMessage::Checkpoint { position }) => SubscriptionItem::Checkpoint { position },
            Ok(ServerMessage::Error(detail)) => {
                self.ended = true;
                return Some(Err(ClientError::Refused { detail }));
            }
            Err(e) => {
                self.ended = true;
                return Some(Err(ClientError::InvalidResponse(e)));
            }
        };
        if let (SubscriptionItem::Event(_), Some(window)) = (&item, self.window) {
            self.taken_since_grant += 1;
            if self.taken_since_grant >= window.div_ceil(2) {
                let grant = std::mem::take(&mut self.taken_since_grant);
                if let Err(e) = self.grant(grant).await {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
        }
        Some(Ok(item))
    }

    /// Grants the node `events` more events (additive). With
    /// [`Credit::Window`] the subscription grants by itself; extra grants
    /// add to its window.
    pub async fn grant(&mut self, events: u64) -> Result<(), ClientError> {
        let grant = ClientMessage::Credit { grant_events: events };
        self.requests.send(grant.into()).await.map_err(|_| ClientError::Rpc {
            addr: self.addr.clone(),
            status: Box::new(tonic::Status::cancelled("the subscription has ended")),
        })
    }
}
