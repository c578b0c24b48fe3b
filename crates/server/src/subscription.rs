//! One subscription: catch-up from the log, then live from the feed, under
//! the subscriber's credit.
//!
//! # Lifecycle
//!
//! A transport (the gRPC `Subscribe` call, the SSE route) validates the
//! start, takes a [`SubscriptionSlot`] from the node's limit, and spawns
//! [`run`] with a [`Credit`] it feeds and an outbox it drains. `run` ends when
//! the outbox's receiver is gone (the subscriber left), when the node stops,
//! or on a failure, which it sends as the last message.
//!
//! # How delivery works
//!
//! The subscription keeps one number, `next`: the first log position it has
//! neither delivered nor skipped. Everything below `next` is settled; every
//! step moves `next` forward and never back, so nothing is delivered twice
//! and order is the log's.
//!
//! - **Catch-up** reads pages from the store: `read_stream` for a single
//!   stream whose version is known (cheap however long the log is), else
//!   `read_all` with the stream, type and system filters. When a read finds
//!   the end of the log, the subscription subscribes to the live feed and
//!   reads once more, so that nothing committed between the read and the
//!   subscribe is missed; then it sends `caught_up` (once) and goes live.
//! - **Live** takes batches from the feed. A batch must start at or below
//!   `next` (events below `next` are skipped); a batch that starts above it,
//!   a `Lagged` receiver (the ring overtook the subscriber) or a matching
//!   event with no credit left all send the subscription back to catch-up,
//!   which resumes at `next`. So a subscriber that stops granting credit
//!   costs no memory: it simply stops reading, and reads the log later.
//! - **Credit**: one event, one unit. Without credit nothing is sent; a
//!   subscription waits for credit before reading a page.
//! - **Checkpoints**: a filtered subscription that skipped
//!   [`SUBSCRIPTION_CHECKPOINT_INTERVAL`] positions since its last message
//!   reports `next` in a checkpoint, so a consumer's stored position moves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use edgebus_proto::convert::{
    ServerMessage, StreamSelector as ProtoSelector, SubscribeFrom, SubscribeStart, SubscriptionFilter,
    error_detail_from_read_error,
};
use edgebus_proto::v1;
use edgebus_store::{AllFilter, Direction, ReadError, StreamFrom};
use edgebus_types::limits::{
    SUBSCRIPTION_CHECKPOINT_INTERVAL, SUBSCRIPTION_CREDIT_MAX, SUBSCRIPTION_OUTBOX_MESSAGES,
    SUBSCRIPTION_PAGE_EVENTS_MAX,
};
use edgebus_types::{RecordedEvent, StreamName};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use crate::filter::{Evaluation, EventFilter, FilterError, Predicate, StreamSelector};
use crate::live::{LiveBatch, LiveEvent};
use crate::metrics::SubscriptionMetrics;
use crate::state::NodeState;

/// Events a subscriber may still receive; granted by the subscriber,
/// consumed one per event.
#[derive(Debug, Default)]
pub struct Credit {
    available: AtomicU64,
    /// Never runs out: for transports whose own flow control is enough (SSE
    /// over TCP, where the bounded outbox holds the subscription back).
    unlimited: bool,
    granted: Notify,
}

impl Credit {
    /// Credit starting at `initial` events.
    pub fn new(initial: u64) -> Self {
        Self {
            available: AtomicU64::new(initial.min(SUBSCRIPTION_CREDIT_MAX)),
            unlimited: false,
            granted: Notify::new(),
        }
    }

    /// Credit that never runs out.
    pub fn unlimited() -> Self {
        Self { available: AtomicU64::new(SUBSCRIPTION_CREDIT_MAX), unlimited: true, granted: Notify::new() }
    }

    /// Adds `events` (additive), capped at [`SUBSCRIPTION_CREDIT_MAX`].
    pub fn grant(&self, events: u64) {
        let _ = self.available.fetch_update(Ordering::AcqRel, Ordering::Acquire, |available| {
            Some(available.saturating_add(events).min(SUBSCRIPTION_CREDIT_MAX))
        });
        self.granted.notify_one();
    }

    /// Events that may be sent now.
    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Acquire)
    }

    /// Uses one unit; the caller checked that one is available (only the
    /// subscription itself consumes).
    fn consume(&self) {
        if !self.unlimited {
            let before = self.available.fetch_sub(1, Ordering::AcqRel);
            assert!(before > 0, "an event was sent without credit");
        }
    }

    /// Waits until some credit is available.
    async fn wait(&self) {
        loop {
            let granted = self.granted.notified();
            if self.available() > 0 {
                return;
            }
            granted.await;
        }
    }
}

/// One of the node's limited subscription places; released when dropped.
#[derive(Debug)]
pub struct SubscriptionSlot {
    open: Arc<AtomicUsize>,
}

impl SubscriptionSlot {
    /// Takes a place if fewer than `max` subscriptions are open.
    pub fn try_take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Self { open: Arc::clone(open) })
    }
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a subscription delivers and from where.
#[derive(Debug)]
pub struct SubscriptionSpec {
    /// The filter (compiled predicate included).
    pub filter: EventFilter,
    /// Where it starts.
    pub from: SubscribeFrom,
}

impl SubscriptionSpec {
    /// The label of this subscription in the metrics: its stream, its
    /// pattern, or `*`.
    pub fn metrics_label(&self) -> String {
        match &self.filter.stream {
            StreamSelector::Any => "*".to_owned(),
            StreamSelector::Exact(name) => name.as_str().to_owned(),
            StreamSelector::Pattern(pattern) => pattern.as_str().to_owned(),
        }
    }
}

/// Why delivery stopped.
enum Stop {
    /// The subscriber is gone (its outbox closed): nothing more to do.
    Gone,
    /// The subscription failed; tell the subscriber.
    Failed(Box<v1::ErrorDetail>),
}

/// Whether a catch-up page was delivered whole.
#[derive(Debug, PartialEq, Eq)]
enum Delivered {
    All,
    /// A matching event is waiting for credit at `next`.
    NeedCredit,
}

/// How a live phase ended.
enum LiveEnd {
    /// Back to catch-up at `next`.
    FellBehind,
    Stop(Stop),
}

/// Runs one subscription (holding its `slot`) until the subscriber leaves, the node stops, or
/// it fails (then the failure is its last message). See the module docs.
async fn run(
    state: Arc<NodeState>,
    spec: SubscriptionSpec,
    credit: Arc<Credit>,
    outbox: mpsc::Sender<ServerMessage>,
    aborted: oneshot::Receiver<v1::ErrorDetail>,
    metrics: SubscriptionMetrics,
    slot: SubscriptionSlot,
) {
    let mut stopping = state.stopping.clone();
    let mut session = Session::new(state, spec, credit, outbox.clone(), metrics);
    let stop = tokio::select! {
        stop = session.deliver() => stop,
        Ok(detail) = aborted => Stop::Failed(Box::new(detail)),
        _ = stopping.wait_for(|stopping| *stopping) => Stop::Failed(Box::new(v1::ErrorDetail {
            code: v1::ErrorCode::Unavailable as u32,
            message: "the node is shutting down".to_owned(),
            ..v1::ErrorDetail::default()
        })),
    };
    if let Stop::Failed(detail) = stop {
        // Best effort: the subscriber may be gone already.
        let _ = outbox.send(ServerMessage::Error(*detail)).await;
    }
    drop(slot);
}

struct Session {
    state: Arc<NodeState>,
    filter: Arc<EventFilter>,
    /// The store's part of the filter, for `read_all`.
    all_filter: AllFilter,
    /// The one stream followed, if the filter names one.
    exact: Option<StreamName>,
    /// For `exact`: a version at or below the stream's first event at or
    /// after `next`, when known; catch-up then reads the stream itself.
    exact_version: Option<u64>,
    from: SubscribeFrom,
    /// The first position neither delivered nor skipped.
    next: u64,
    /// `next` as last told to the subscriber (by an event, a checkpoint or
    /// `caught_up`).
    reported: u64,
    caught_up_sent: bool,
    credit: Arc<Credit>,
    outbox: mpsc::Sender<ServerMessage>,
    metrics: SubscriptionMetrics,
}

/// A page read by catch-up.
struct Page {
    events: Vec<RecordedEvent>,
    /// Where the page ends: every event below it was in the page or
    /// filtered out by the store.
    next: u64,
    /// The highest version of `exact` seen below `next`, if any.
    exact_version_seen: Option<u64>,
    end_of_log: bool,
}

impl Session {
    fn new(
        state: Arc<NodeState>,
        spec: SubscriptionSpec,
        credit: Arc<Credit>,
        outbox: mpsc::Sender<ServerMessage>,
        metrics: SubscriptionMetrics,
    ) -> Self {
        let exact = match &spec.filter.stream {
            StreamSelector::Exact(name) => Some(name.clone()),
            StreamSelector::Any | StreamSelector::Pattern(_) => None,
        };
        let all_filter = AllFilter {
            stream: match &spec.filter.stream {
                StreamSelector::Any => None,
                StreamSelector::Exact(name) => Some(edgebus_types::StreamPattern::literal(name)),
                StreamSelector::Pattern(pattern) => Some(pattern.clone()),
            },
            event_types: spec.filter.event_types.clone(),
            include_system: spec.filter.include_system,
        };
        Self {
            state,
            filter: Arc::new(spec.filter),
            all_filter,
            exact,
            exact_version: None,
            from: spec.from,
            next: 0,
            reported: 0,
            caught_up_sent: false,
            credit,
            outbox,
            metrics,
        }
    }

    /// Catch-up and live phases until the subscription stops.
    async fn deliver(&mut self) -> Stop {
        if let Err(stop) = self.resolve_start().await {
            return stop;
        }
        loop {
            let receiver = match self.catch_up().await {
                Ok(receiver) => receiver,
                Err(stop) => return stop,
            };
            match self.live(receiver).await {
                LiveEnd::FellBehind => self.metrics.fell_behind(),
                LiveEnd::Stop(stop) => return stop,
            }
        }
    }

    /// Sets `next` (and the stream version, when known) from the start.
    async fn resolve_start(&mut self) -> Result<(), Stop> {
        let store = Arc::clone(&self.state.store);
        match self.from {
            SubscribeFrom::Beginning => {
                self.next = store.log().start_position();
                self.exact_version = self.exact.as_ref().map(|_| 0);
            }
            SubscribeFrom::Position(position) => self.next = position,
            SubscribeFrom::StreamVersion(version) => self.exact_version = Some(version),
            SubscribeFrom::End => {
                // The end first, then the stream's version: an event written
                // in between has a version above the one read and a position
                // at or above `next`, so it is delivered, once.
                self.next = store.log().end_position();
                if let Some(stream) = self.exact.clone() {
                    let info = blocking(move || store.stream_info(&stream)).await?;
                    self.exact_version = Some(info.and_then(|i| i.current_version).map_or(0, |v| v + 1));
                }
            }
        }
        self.reported = self.next;
        Ok(())
    }

    /// Reads the log from `next` until the end, then joins the live feed.
    async fn catch_up(&mut self) -> Result<broadcast::Receiver<Arc<LiveBatch>>, Stop> {
        let mut receiver = None;
        loop {
            // Without credit, a page of one still moves over skipped events
            // and finds the end, so that `caught_up` needs no credit.
            let credit = usize::try_from(self.credit.available()).unwrap_or(usize::MAX);
            let page = self.read_page(credit.clamp(1, SUBSCRIPTION_PAGE_EVENTS_MAX)).await?;
            let end_of_log = page.end_of_log;
            if self.deliver_page(page).await? == Delivered::NeedCredit {
                self.wait_for_credit().await?;
                continue;
            }
            if end_of_log {
                match receiver {
                    // Subscribed before this read: every later event is in
                    // the feed.
                    Some(receiver) => {
                        if !self.caught_up_sent {
                            self.caught_up_sent = true;
                            self.reported = self.next;
                            self.send(ServerMessage::CaughtUp { position: self.next }).await?;
                        }
                        return Ok(receiver);
                    }
                    None => receiver = Some(self.state.live.subscribe()),
                }
            }
        }
    }

    /// Waits for credit (or for the subscriber to leave).
    async fn wait_for_credit(&self) -> Result<(), Stop> {
        if self.credit.available() > 0 {
            return Ok(());
        }
        tokio::select! {
            () = self.credit.wait() => Ok(()),
            () = self.outbox.closed() => Err(Stop::Gone),
        }
    }

    /// Reads one page of at most `limit` events from `next`.
    async fn read_page(&mut self, limit: usize) -> Result<Page, Stop> {
        let store = Arc::clone(&self.state.store);
        let next = self.next;
        if let (Some(stream), Some(version)) = (self.exact.clone(), self.exact_version) {
            let page = blocking(move || {
                // The end first: every event below it is in the stream's
                // index when the stream is read.
                let end = store.log().end_position();
                let now = crate::grpc::now_ms();
                match store.read_stream(&stream, StreamFrom::Version(version), Direction::Forward, limit, now) {
                    Ok(events) => Ok((end, events)),
                    Err(ReadError::StreamNotFound { .. }) => Ok((end, Vec::new())),
                    Err(e) => Err(e),
                }
            })
            .await?;
            let (end, events) = page;
            let end_of_log = events.len() < limit;
            let exact_version_seen = events.last().map(|e| e.version);
            let page_next = if end_of_log {
                next.max(end).max(events.last().map_or(0, |e| e.position + 1))
            } else {
                next.max(events.last().map_or(next, |e| e.position + 1))
            };
            let events = events.into_iter().filter(|e| e.position >= next).collect();
            return Ok(Page { events, next: page_next, exact_version_seen, end_of_log });
        }
        let filter = self.all_filter.clone();
        let slice = blocking(move || store.read_all(next, Direction::Forward, limit, &filter)).await?;
        let exact = self.exact.as_ref();
        let exact_version_seen = slice.events.iter().rev().find(|e| Some(&e.stream) == exact).map(|e| e.version);
        Ok(Page {
            next: slice.next_position.unwrap_or(next).max(next),
            events: slice.events,
            exact_version_seen,
            end_of_log: slice.end_of_log,
        })
    }

    /// Delivers the events of `page` that pass the predicate and moves
    /// `next` to its end, or, when the credit runs out, to the first
    /// matching event not sent.
    async fn deliver_page(&mut self, page: Page) -> Result<Delivered, Stop> {
        let filter = Arc::clone(&self.filter);
        // Predicates run on the blocking pool: a page is up to 256 of them.
        let matching = if filter.predicate.is_some() {
            let (events, errors) = tokio::task::spawn_blocking(move || {
                let mut errors = 0u64;
                let events: Vec<RecordedEvent> = page
                    .events
                    .into_iter()
                    .filter(|event| match filter.evaluate(event) {
                        Evaluation::Match => true,
                        Evaluation::NoMatch => false,
                        Evaluation::Error(_) => {
                            errors += 1;
                            false
                        }
                    })
                    .collect();
                (events, errors)
            })
            .await
            .map_err(|e| Stop::Failed(internal(format!("predicate task failed: {e}"))))?;
            for _ in 0..errors {
                self.metrics.predicate_error();
            }
            events
        } else {
            page.events.into_iter().filter(|event| filter.matches_without_predicate(event)).collect()
        };
        for event in matching {
            debug_assert!(event.position >= self.next, "catch-up never goes back");
            if self.credit.available() == 0 {
                self.next = event.position;
                self.progress().await?;
                return Ok(Delivered::NeedCredit);
            }
            self.next = event.position + 1;
            self.send_event(event).await?;
        }
        self.next = self.next.max(page.next);
        if let Some(version) = page.exact_version_seen {
            self.exact_version = Some(self.exact_version.map_or(version + 1, |v| v.max(version + 1)));
        }
        self.progress().await?;
        Ok(Delivered::All)
    }

    /// Live phase: batches from the feed until the subscription falls
    /// behind or stops.
    async fn live(&mut self, mut receiver: broadcast::Receiver<Arc<LiveBatch>>) -> LiveEnd {
        loop {
            let batch = tokio::select! {
                received = receiver.recv() => received,
                () = self.outbox.closed() => return LiveEnd::Stop(Stop::Gone),
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(broadcast::error::RecvError::Lagged(_)) => return LiveEnd::FellBehind,
                Err(broadcast::error::RecvError::Closed) => {
                    return LiveEnd::Stop(Stop::Failed(internal("the live feed stopped".to_owned())));
                }
            };
            match self.apply_batch(&batch).await {
                Ok(true) => {}
                Ok(false) => return LiveEnd::FellBehind,
                Err(stop) => return LiveEnd::Stop(stop),
            }
        }
    }

    /// Delivers what `batch` holds beyond `next`; false when the
    /// subscription must go back to catch-up (a gap, or no credit for a
    /// matching event).
    async fn apply_batch(&mut self, batch: &LiveBatch) -> Result<bool, Stop> {
        if batch.first_position > self.next {
            return Ok(false);
        }
        let skip = usize::try_from(self.next - batch.first_position).unwrap_or(usize::MAX);
        for LiveEvent { event, inline } in batch.events.iter().skip(skip) {
            debug_assert_eq!(event.position, self.next, "live batches are contiguous");
            if self.exact.as_ref() == Some(&event.stream) {
                self.exact_version = Some(event.version + 1);
            }
            if !self.filter.matches_without_predicate(event) {
                self.next = event.position + 1;
                continue;
            }
            let event = if *inline { event.clone() } else { self.read_one(event.position).await? };
            let matches = match &self.filter.predicate {
                None => true,
                Some(predicate) => match predicate.evaluate(&event) {
                    Evaluation::Match => true,
                    Evaluation::NoMatch => false,
                    Evaluation::Error(_) => {
                        self.metrics.predicate_error();
                        false
                    }
                },
            };
            if matches {
                if self.credit.available() == 0 {
                    // Resume at this event once credit comes, from the log.
                    return Ok(false);
                }
                self.next = event.position + 1;
                self.send_event(event).await?;
            } else {
                self.next = event.position + 1;
            }
        }
        self.progress().await?;
        Ok(true)
    }

    /// Reads the event at `position` (a large one the feed carried without
    /// its payload).
    async fn read_one(&self, position: u64) -> Result<RecordedEvent, Stop> {
        let store = Arc::clone(&self.state.store);
        let events = blocking(move || store.read_log(position, 1, u64::MAX)).await?;
        events
            .into_iter()
            .next()
            .filter(|e| e.position == position)
            .ok_or_else(|| Stop::Failed(internal(format!("position {position} is not in the log"))))
    }

    async fn send_event(&mut self, event: RecordedEvent) -> Result<(), Stop> {
        self.credit.consume();
        self.reported = self.next;
        self.send(ServerMessage::Event(event)).await?;
        self.metrics.delivered(1);
        Ok(())
    }

    /// Updates the lag and sends a checkpoint when skipped events add up.
    async fn progress(&mut self) -> Result<(), Stop> {
        self.metrics.set_lag(self.state.store.log().end_position().saturating_sub(self.next));
        if self.next.saturating_sub(self.reported) >= SUBSCRIPTION_CHECKPOINT_INTERVAL {
            self.reported = self.next;
            self.send(ServerMessage::Checkpoint { position: self.next }).await?;
        }
        Ok(())
    }

    async fn send(&self, message: ServerMessage) -> Result<(), Stop> {
        self.outbox.send(message).await.map_err(|_| Stop::Gone)
    }
}

/// Runs a store read on the blocking pool; a failure ends the subscription.
async fn blocking<T: Send + 'static>(call: impl FnOnce() -> Result<T, ReadError> + Send + 'static) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Stop::Failed(Box::new(error_detail_from_read_error(&e)))),
        Err(join) => Err(Stop::Failed(internal(format!("store call failed: {join}")))),
    }
}

fn internal(message: String) -> Box<v1::ErrorDetail> {
    Box::new(v1::ErrorDetail { code: v1::ErrorCode::Corrupt as u32, message, ..v1::ErrorDetail::default() })
}

/// How long a client waiting for a subscription place is told to wait.
const SUBSCRIPTIONS_FULL_RETRY_AFTER_MS: u64 = 1000;

/// A running subscription, as a transport holds it.
#[derive(Debug)]
pub struct Opened {
    /// Feed the subscriber's grants here.
    pub credit: Arc<Credit>,
    /// What to send to the subscriber, in order; ends after an error
    /// message or when the node stops.
    pub messages: mpsc::Receiver<ServerMessage>,
    /// Ends the subscription with this error as its last message (the
    /// subscriber broke the protocol).
    pub abort: oneshot::Sender<v1::ErrorDetail>,
}

/// Opens a subscription: the transports' shared entry. Takes a place from
/// the node's limit, compiles the filter (refusing a predicate that does
/// not compile with the compiler's message), and starts delivery with
/// `credit`.
pub async fn open(
    state: &Arc<NodeState>,
    start: SubscribeStart,
    credit: Credit,
) -> Result<Opened, Box<v1::ErrorDetail>> {
    let slot = SubscriptionSlot::try_take(&state.subscriptions_open, state.subscriptions_max).ok_or_else(|| {
        Box::new(v1::ErrorDetail {
            code: v1::ErrorCode::ResourceExhausted as u32,
            message: format!("too many subscriptions: the node serves at most {}", state.subscriptions_max),
            retry_after_ms: Some(SUBSCRIPTIONS_FULL_RETRY_AFTER_MS),
            ..v1::ErrorDetail::default()
        })
    })?;
    let SubscribeStart { filter, from, initial_grant_events: _ } = start;
    let spec = tokio::task::spawn_blocking(move || spec(filter, from))
        .await
        .map_err(|e| internal(format!("filter compile task failed: {e}")))??;
    let credit = Arc::new(credit);
    let (outbox, messages) = mpsc::channel(SUBSCRIPTION_OUTBOX_MESSAGES);
    let (abort, aborted) = oneshot::channel();
    let metrics = state.metrics.subscription_opened(&spec.metrics_label());
    tokio::spawn(run(Arc::clone(state), spec, Arc::clone(&credit), outbox, aborted, metrics, slot));
    Ok(Opened { credit, messages, abort })
}

/// Builds the spec of a validated start: compiles the predicate (blocking).
fn spec(filter: SubscriptionFilter, from: SubscribeFrom) -> Result<SubscriptionSpec, Box<v1::ErrorDetail>> {
    let invalid_filter = |field: &str, error: FilterError| {
        Box::new(v1::ErrorDetail {
            code: v1::ErrorCode::InvalidFilter as u32,
            message: error.to_string(),
            field: field.to_owned(),
            ..v1::ErrorDetail::default()
        })
    };
    let predicate = match &filter.predicate {
        Some(source) => Some(Predicate::compile(source).map_err(|e| invalid_filter("predicate", e))?),
        None => None,
    };
    let stream = match filter.streams {
        ProtoSelector::All => StreamSelector::Any,
        ProtoSelector::Stream(name) => StreamSelector::Exact(name),
        ProtoSelector::Pattern(pattern) => StreamSelector::Pattern(pattern),
    };
    let filter = EventFilter::new(stream, filter.event_types, predicate, filter.include_system)
        .map_err(|e| invalid_filter("event_types", e))?;
    Ok(SubscriptionSpec { filter, from })
}
