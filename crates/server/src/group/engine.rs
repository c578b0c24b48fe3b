//! One consumer group's engine: a task that owns the group's state, reads
//! matching events from the log into a bounded buffer, hands them to the
//! consumers within their windows, applies acks, nacks and timeouts, parks
//! what fails too often, and writes checkpoints in batches.
//!
//! # State
//!
//! - `main`: events read from the log and not yet behind the low-water
//!   mark, by position: waiting, in flight, or settled out of order. The
//!   low-water mark (the first key, or `read_next` when empty) is the
//!   checkpoint position: every matching event below it is settled.
//! - `replay`: parked events handed back by `ReplayParked`, by parked
//!   version.
//! - Both together hold at most `buffer_events` entries and
//!   [`GROUP_BUFFER_BYTES_MAX`] payload bytes (reading stops beyond), so a
//!   group's memory does not grow with its backlog, which stays in the log.
//!   The log is read a page at a time, on the blocking pool and beside the
//!   engine's work: acks and deliveries go on while the next page is read.
//!   A page read before a filter change is dropped and read again.
//!
//! # Checkpoints
//!
//! A checkpoint records the low-water mark, the ranges settled above it,
//! and the replay's progress. It is started after `checkpoint_after`
//! settled events or `checkpoint_interval_ms`, whichever comes first, and
//! written beside the engine's work (an async append: no thread waits for
//! it), one at a time; while one is written and the next is already due,
//! the engine takes no more commands. A restart resumes from the last
//! checkpoint written, so it redelivers at most what was in flight plus
//! what settled after the checkpoint before it was started: fewer than
//! twice `checkpoint_after` plus two ack commands' worth (a command is one
//! ack message, or acks of one consumer that arrived back to back, merged
//! up to [`GROUP_ACK_POSITIONS_MAX`](edgebus_types::limits::GROUP_ACK_POSITIONS_MAX)
//! positions). At least once, never more than that window. The node's
//! stop writes a last checkpoint.
//!
//! # Strategies
//!
//! - `round_robin`: the next consumer with room takes the oldest waiting
//!   events, a run of up to 32 (so acks settle contiguous ranges).
//! - `by_stream`: a stream has at most one event in flight, and goes to
//!   the consumer that rendezvous hashing picks among those connected; so
//!   a stream's events are processed one after the other in order, retries
//!   included, and a stream moves to another consumer only between two of
//!   its events (never two holders at once).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use edgebus_proto::v1;
use edgebus_store::{AllFilter, Direction, ReadError, StreamFrom};
use edgebus_types::limits::{GROUP_BUFFER_BYTES_MAX, GROUP_BUFFER_EVENTS_MAX, SUBSCRIPTION_PAGE_EVENTS_MAX};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinError;
use tokio::time::Instant;

use super::def::{
    CheckpointRecord, GroupRecord, ParkedRecord, Settings, Strategy, TYPE_CHECKPOINT, checkpoint_stream, hex,
    parked_stream, to_ranges, unhex,
};
use crate::filter::{Evaluation, EventFilter, StreamSelector};
use crate::grpc::now_ms;
use crate::state::NodeState;

/// What a consumer's call receives.
pub type Outbox = mpsc::Sender<Result<v1::ConsumeResponse, tonic::Status>>;

/// Most consecutive events one consumer takes in one turn of round robin.
const ROUND_ROBIN_RUN: u32 = 32;

/// A consumer's id within its group's engine.
pub type ConsumerId = u64;

/// What a nack asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackAction {
    /// Deliver again, counting a retry.
    Retry,
    /// Park now.
    Park,
    /// Settle without processing.
    Skip,
    /// Give back without a retry, and leave.
    Stop,
}

/// A request to a group's engine.
#[derive(Debug)]
pub enum Command {
    /// A consumer joins: the engine sends `joined` first on `outbox`.
    Join {
        /// Its name (`None`: the engine names it).
        name: Option<String>,
        /// Its window (0: the group's).
        max_in_flight: u32,
        outbox: Outbox,
        reply: oneshot::Sender<Result<ConsumerId, super::Refusal>>,
    },
    /// A consumer's call ended.
    Leave { consumer: ConsumerId },
    /// Acks.
    Ack { consumer: ConsumerId, positions: Vec<u64> },
    /// Nacks.
    Nack { consumer: ConsumerId, positions: Vec<u64>, action: NackAction, reason: String },
    /// The group's figures.
    Describe { reply: oneshot::Sender<v1::GroupInfo> },
    /// New filter and settings.
    Update { record: Box<GroupRecord>, filter: Box<EventFilter>, reply: oneshot::Sender<()> },
    /// Hand parked events below `end` (a parked-stream version) back.
    ReplayParked { end: u64, reply: oneshot::Sender<u64> },
    /// The group was deleted: end every consumer's call with `detail`,
    /// then stop (without a checkpoint).
    Delete { detail: v1::ErrorDetail, reply: oneshot::Sender<()> },
}

/// Where a buffered event came from. Replays sort first: they are old.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    /// A parked event, by its version in the parked stream.
    Replay(u64),
    /// An event read from the log, by position.
    Main(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Waiting,
    InFlight { consumer: ConsumerId, deadline: Instant },
    Settled,
}

#[derive(Debug)]
struct Entry {
    /// `None` once settled (the payload is released).
    event: Option<Arc<RecordedEvent>>,
    stream: StreamName,
    state: EntryState,
    /// Deliveries so far.
    attempts: u32,
    /// The consumer that held it last (shared with [`Consumer::name`]).
    last_consumer: Arc<str>,
    /// Payload bytes, counted in the buffer until settled.
    bytes: u64,
}

#[derive(Debug)]
struct Consumer {
    name: Arc<str>,
    window: u32,
    in_flight: u32,
    outbox: Outbox,
    delivered: u64,
    acked: u64,
    nacked: u64,
}

/// `by_stream` scheduling: waiting keys per stream, the streams that may
/// send (none in flight), and who holds each busy stream.
#[derive(Debug, Default)]
struct ByStream {
    waiting: HashMap<StreamName, BTreeSet<Key>>,
    /// `(head key, stream)` for streams with waiting keys and nothing in
    /// flight.
    runnable: BTreeSet<(Key, StreamName)>,
    busy: HashMap<StreamName, ConsumerId>,
}

impl ByStream {
    fn push(&mut self, key: Key, stream: &StreamName) {
        let keys = self.waiting.entry(stream.clone()).or_default();
        let old_head = keys.first().copied();
        keys.insert(key);
        if self.busy.contains_key(stream) {
            return;
        }
        if let Some(old) = old_head {
            self.runnable.remove(&(old, stream.clone()));
        }
        let head = *keys.first().expect("just inserted");
        self.runnable.insert((head, stream.clone()));
    }

    /// `stream` has nothing in flight any more.
    fn release(&mut self, stream: &StreamName) {
        if self.busy.remove(stream).is_none() {
            return;
        }
        if let Some(head) = self.waiting.get(stream).and_then(|keys| keys.first().copied()) {
            self.runnable.insert((head, stream.clone()));
        }
    }

    /// `key` of `stream` goes in flight with `consumer`.
    fn take(&mut self, key: Key, stream: &StreamName, consumer: ConsumerId) {
        if let Some(keys) = self.waiting.get_mut(stream) {
            keys.remove(&key);
            if keys.is_empty() {
                self.waiting.remove(stream);
            }
        }
        self.runnable.remove(&(key, stream.clone()));
        self.busy.insert(stream.clone(), consumer);
    }
}

/// Settled positions above the low-water mark as ranges of consecutive
/// positions: `start → end` (exclusive), disjoint and not adjacent.
#[derive(Debug, Default)]
struct SettledRanges {
    ranges: BTreeMap<u64, u64>,
}

impl SettledRanges {
    /// Adds `position`, which must not be in a range yet.
    fn insert(&mut self, position: u64) {
        let before = self.ranges.range(..=position).next_back().map(|(&start, &end)| (start, end));
        if let Some((_, end)) = before {
            assert!(end <= position, "position {position} settled twice");
        }
        let after_end = self.ranges.remove(&(position + 1));
        match before {
            Some((start, end)) if end == position => {
                self.ranges.insert(start, after_end.unwrap_or(position + 1));
            }
            _ => {
                self.ranges.insert(position, after_end.unwrap_or(position + 1));
            }
        }
    }

    /// Forgets the ranges below `low_water`: the low-water mark only moves
    /// over settled positions, so no range reaches past it.
    fn drop_below(&mut self, low_water: u64) {
        while let Some(first) = self.ranges.first_entry() {
            if *first.key() >= low_water {
                break;
            }
            debug_assert!(*first.get() <= low_water, "a settled range spans the low-water mark");
            first.remove();
        }
    }

    fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&start, &end)| (start, end))
    }
}

/// Totals since the node started.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    delivered: u64,
    acked: u64,
    retried: u64,
    skipped: u64,
}

/// The engine's state; see the module docs.
#[derive(Debug)]
pub struct Engine {
    state: Arc<NodeState>,
    record: GroupRecord,
    generation: u64,
    filter: Arc<EventFilter>,
    all_filter: AllFilter,
    checkpoint_stream: StreamName,
    parked_stream: StreamName,
    commands: mpsc::Receiver<Command>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    next_consumer_id: ConsumerId,
    /// Round robin: the consumer that had the last delivery.
    rr_last: ConsumerId,
    main: BTreeMap<u64, Entry>,
    /// The positions of `main` that are settled, as ranges of consecutive
    /// positions (start → end, exclusive), kept as acks arrive so that a
    /// checkpoint costs the number of ranges, not the size of the buffer.
    main_settled: SettledRanges,
    replay: BTreeMap<u64, Entry>,
    /// Waiting keys in order (both strategies).
    waiting: BTreeSet<Key>,
    by_stream: ByStream,
    deadlines: BTreeSet<(Instant, Key)>,
    in_flight: u32,
    buffer_bytes: u64,
    /// The next log position to read.
    read_next: u64,
    /// Ranges settled before a restart, not read again yet: skipped when
    /// read, and carried into later checkpoints until then.
    restored_settled: Vec<(u64, u64)>,
    /// The replay: next parked version to read, end (exclusive), and
    /// versions settled before a restart.
    replay_read: u64,
    replay_end: u64,
    restored_replay_settled: Vec<(u64, u64)>,
    end_of_log: bool,
    settled_since_checkpoint: u64,
    last_checkpoint: Instant,
    checkpointed_position: u64,
    totals: Totals,
    /// Parked events of this incarnation.
    parked: u64,
    /// After a failed read, no read before this.
    read_retry_at: Option<Instant>,
    /// Counts filter changes: a page read with an older filter is dropped
    /// and read again.
    filter_generation: u64,
}

/// What a group's engine starts from.
#[derive(Debug)]
pub struct EngineStart {
    /// The group as last recorded.
    pub record: GroupRecord,
    /// The position of the event that created this incarnation.
    pub generation: u64,
    /// The record's filter, compiled.
    pub filter: EventFilter,
    /// The last checkpoint of this incarnation, if any.
    pub checkpoint: Option<CheckpointRecord>,
    /// Events in the parked stream now (all incarnations).
    pub parked_count: u64,
}

fn detail(code: v1::ErrorCode, message: impl Into<String>) -> v1::ErrorDetail {
    v1::ErrorDetail { code: code as u32, message: message.into(), ..v1::ErrorDetail::default() }
}

fn in_ranges(ranges: &[(u64, u64)], value: u64) -> bool {
    let i = ranges.partition_point(|&(_, end)| end <= value);
    ranges.get(i).is_some_and(|&(start, _)| start <= value)
}

fn all_filter(filter: &EventFilter) -> AllFilter {
    AllFilter {
        stream: match &filter.stream {
            StreamSelector::Any => None,
            StreamSelector::Exact(name) => Some(edgebus_types::StreamPattern::literal(name)),
            StreamSelector::Pattern(pattern) => Some(pattern.clone()),
        },
        event_types: filter.event_types.clone(),
        include_system: false,
    }
}

/// Rendezvous hashing: the consumer (by name) with the highest score for
/// `stream` owns it.
fn owner<'a>(
    stream: &StreamName,
    consumers: impl Iterator<Item = (&'a ConsumerId, &'a Consumer)>,
) -> Option<ConsumerId> {
    consumers
        .map(|(id, c)| {
            let mut hasher = std::hash::DefaultHasher::new();
            stream.as_str().hash(&mut hasher);
            c.name.hash(&mut hasher);
            (hasher.finish(), *id)
        })
        .max()
        .map(|(_, id)| id)
}

impl Engine {
    /// An engine for `start`, fed by `commands`.
    pub fn new(state: Arc<NodeState>, start: EngineStart, commands: mpsc::Receiver<Command>) -> Self {
        let EngineStart { record, generation, filter, checkpoint, parked_count } = start;
        let checkpoint = checkpoint.unwrap_or(CheckpointRecord {
            generation,
            position: record.start_position,
            replay_next: record.parked_base,
            replay_end: record.parked_base,
            ..CheckpointRecord::default()
        });
        let name = record.name.clone();
        Self {
            all_filter: all_filter(&filter),
            filter: Arc::new(filter),
            checkpoint_stream: checkpoint_stream(&name),
            parked_stream: parked_stream(&name),
            state,
            generation,
            commands,
            consumers: BTreeMap::new(),
            next_consumer_id: 1,
            rr_last: 0,
            main: BTreeMap::new(),
            main_settled: SettledRanges::default(),
            replay: BTreeMap::new(),
            waiting: BTreeSet::new(),
            by_stream: ByStream::default(),
            deadlines: BTreeSet::new(),
            in_flight: 0,
            buffer_bytes: 0,
            read_next: checkpoint.position,
            restored_settled: checkpoint.settled,
            replay_read: checkpoint.replay_next.max(record.parked_base),
            replay_end: checkpoint.replay_end.max(record.parked_base),
            restored_replay_settled: checkpoint.replay_settled,
            end_of_log: false,
            settled_since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            checkpointed_position: checkpoint.position,
            totals: Totals::default(),
            parked: parked_count.saturating_sub(record.parked_base),
            read_retry_at: None,
            filter_generation: 0,
            record,
        }
    }

    fn settings(&self) -> Settings {
        self.record.settings
    }

    fn buffer_events_max(&self) -> usize {
        (self.settings().max_in_flight as usize * 4).clamp(1024, GROUP_BUFFER_EVENTS_MAX)
    }

    fn has_room(&self) -> bool {
        self.main.len() + self.replay.len() < self.buffer_events_max() && self.buffer_bytes < GROUP_BUFFER_BYTES_MAX
    }

    /// Whether a read from the log is worth its trip through the blocking
    /// pool now: a whole page fits, or nothing is left to hand out. Acks
    /// free a few places at a time; reading each time would cost a trip per
    /// handful of events.
    fn worth_reading(&self) -> bool {
        let room = self.buffer_events_max().saturating_sub(self.main.len() + self.replay.len());
        room >= SUBSCRIPTION_PAGE_EVENTS_MAX || self.waiting.is_empty()
    }

    /// Runs until the group is deleted or the node stops.
    pub async fn run(mut self) {
        // The group reads the log itself: it only needs to know that the
        // log grew, not the live feed's batches (so it does not make the
        // feed read and decode them).
        let mut end = self.state.live.watch_end();
        let mut stopping = self.state.stopping.clone();
        // At most one checkpoint is written at a time, beside the engine's
        // work; while it is written and another is due, no command is taken.
        let mut writing: Option<CheckpointWrite> = None;
        // At most one page of the log is read at a time, also beside the
        // engine's work: acks and deliveries go on while it is read.
        let mut reading: Option<MainRead> = None;
        loop {
            // A page being read has its room in the buffer kept: nothing
            // else is read meanwhile.
            if reading.is_none() {
                self.fill_replay().await;
                if self.wants_main_page() {
                    reading = Some(self.start_main_read());
                }
            }
            self.dispatch();
            if writing.is_none() && self.checkpoint_due(false) {
                writing = Some(self.start_checkpoint());
            }
            let checkpoint_after = u64::from(self.settings().checkpoint_after);
            let blocked = writing.is_some() && self.settled_since_checkpoint >= checkpoint_after;
            let deadline = self.deadlines.first().map(|(at, _)| *at);
            let checkpoint_at = (writing.is_none()
                && (self.settled_since_checkpoint > 0 || self.read_next != self.checkpointed_position))
                .then(|| self.last_checkpoint + Duration::from_millis(self.settings().checkpoint_interval_ms));
            let read_retry_at = self.read_retry_at;
            tokio::select! {
                command = self.commands.recv(), if !blocked => {
                    let Some(command) = command else { break };
                    if self.handle(command).await {
                        return;
                    }
                    // Take what else is queued before the next dispatch, but
                    // no more than a checkpoint's worth: what settled since
                    // the last checkpoint is what a crash redelivers.
                    for _ in 0..256 {
                        if self.settled_since_checkpoint >= checkpoint_after {
                            break;
                        }
                        let Ok(command) = self.commands.try_recv() else { break };
                        if self.handle(command).await {
                            return;
                        }
                    }
                }
                written = wait_for(&mut writing), if writing.is_some() => {
                    writing = None;
                    self.checkpoint_written(written);
                }
                (generation, page) = wait_for_page(&mut reading), if reading.is_some() => {
                    reading = None;
                    self.main_page_read(generation, page);
                }
                changed = end.changed(), if self.end_of_log => {
                    if changed.is_err() {
                        // The feed is gone: the node is stopping.
                        break;
                    }
                    self.end_of_log = false;
                }
                () = sleep_until(deadline), if deadline.is_some() => self.expire(Instant::now()).await,
                () = sleep_until(checkpoint_at), if checkpoint_at.is_some() => {
                    if self.checkpoint_due(true) {
                        writing = Some(self.start_checkpoint());
                    }
                }
                () = sleep_until(read_retry_at), if read_retry_at.is_some() => self.read_retry_at = None,
                () = stopped(&mut stopping) => break,
            }
        }
        // The node stops: keep what settled, and tell the consumers.
        if writing.is_some() {
            let written = wait_for(&mut writing).await;
            self.checkpoint_written(written);
        }
        let last = self.start_checkpoint();
        let written = last.await.unwrap_or_else(|e| Err(format!("checkpoint task failed: {e}")));
        self.checkpoint_written(written);
        self.end_consumers(&detail(v1::ErrorCode::Unavailable, "the node is shutting down"));
    }

    /// Handles one command; true when the engine must stop now.
    async fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Join { name, max_in_flight, outbox, reply } => {
                let _ = reply.send(self.join(name, max_in_flight, outbox));
            }
            Command::Leave { consumer } => self.leave(consumer, "left the group").await,
            Command::Ack { consumer, positions } => self.ack(consumer, &positions),
            Command::Nack { consumer, positions, action, reason } => {
                self.nack(consumer, &positions, action, &reason).await;
            }
            Command::Describe { reply } => {
                let _ = reply.send(self.describe());
            }
            Command::Update { record, filter, reply } => {
                self.update(*record, *filter);
                let _ = reply.send(());
            }
            Command::ReplayParked { end, reply } => {
                let before = self.replay_end;
                self.replay_end = self.replay_end.max(end);
                let _ = reply.send(self.replay_end - before);
            }
            Command::Delete { detail, reply } => {
                self.end_consumers(&detail);
                let _ = reply.send(());
                return true;
            }
        }
        false
    }

    fn end_consumers(&mut self, detail: &v1::ErrorDetail) {
        for (_, consumer) in std::mem::take(&mut self.consumers) {
            let message = v1::ConsumeResponse { kind: Some(v1::consume_response::Kind::Error(detail.clone())) };
            let _ = consumer.outbox.try_send(Ok(message));
        }
    }

    fn join(&mut self, name: Option<String>, window: u32, outbox: Outbox) -> Result<ConsumerId, super::Refusal> {
        if self.consumers.len() >= edgebus_types::limits::GROUP_CONSUMERS_MAX {
            let mut refusal = detail(
                v1::ErrorCode::ResourceExhausted,
                format!(
                    "group {} has {} consumers, the most it takes",
                    self.record.name,
                    edgebus_types::limits::GROUP_CONSUMERS_MAX
                ),
            );
            refusal.retry_after_ms = Some(1000);
            return Err(Box::new(refusal));
        }
        let id = self.next_consumer_id;
        self.next_consumer_id += 1;
        let name: Arc<str> = Arc::from(name.unwrap_or_else(|| format!("consumer-{id}")));
        if self.consumers.values().any(|c| *c.name == *name) {
            return Err(Box::new(detail(
                v1::ErrorCode::ConsumerExists,
                format!("a consumer named {name} is connected to group {} already", self.record.name),
            )));
        }
        let window =
            if window == 0 { self.settings().max_in_flight } else { window.min(self.settings().max_in_flight) };
        let joined = v1::ConsumeResponse {
            kind: Some(v1::consume_response::Kind::Joined(v1::consume_response::Joined {
                consumer: name.to_string(),
                max_in_flight: window,
            })),
        };
        outbox.try_send(Ok(joined)).map_err(|_| Box::new(detail(v1::ErrorCode::Unavailable, "the consumer left")))?;
        self.consumers.insert(id, Consumer { name, window, in_flight: 0, outbox, delivered: 0, acked: 0, nacked: 0 });
        Ok(id)
    }

    /// A consumer is gone: its events go back to waiting, each counting a
    /// delivery that failed.
    async fn leave(&mut self, consumer: ConsumerId, why: &str) {
        let Some(gone) = self.consumers.remove(&consumer) else { return };
        if gone.in_flight == 0 {
            return;
        }
        let keys: Vec<Key> = self
            .main
            .iter()
            .map(|(p, e)| (Key::Main(*p), e))
            .chain(self.replay.iter().map(|(v, e)| (Key::Replay(*v), e)))
            .filter(|(_, e)| matches!(e.state, EntryState::InFlight { consumer: c, .. } if c == consumer))
            .map(|(key, _)| key)
            .collect();
        let reason = format!("consumer {} {why} with the event in flight", gone.name);
        for key in keys {
            self.take_back(key);
            self.retry_or_park(key, &reason).await;
        }
    }

    fn entry(&self, key: Key) -> Option<&Entry> {
        match key {
            Key::Main(p) => self.main.get(&p),
            Key::Replay(v) => self.replay.get(&v),
        }
    }

    fn entry_mut(&mut self, key: Key) -> Option<&mut Entry> {
        match key {
            Key::Main(p) => self.main.get_mut(&p),
            Key::Replay(v) => self.replay.get_mut(&v),
        }
    }

    /// The key in flight with `consumer` for `position`.
    fn in_flight_key(&self, consumer: ConsumerId, position: u64) -> Option<Key> {
        let held = |e: &Entry| matches!(e.state, EntryState::InFlight { consumer: c, .. } if c == consumer);
        if self.main.get(&position).is_some_and(held) {
            return Some(Key::Main(position));
        }
        // A replayed event: few at a time.
        self.replay
            .iter()
            .find(|(_, e)| held(e) && e.event.as_ref().is_some_and(|ev| ev.position == position))
            .map(|(v, _)| Key::Replay(*v))
    }

    /// Takes `key` out of flight: its holder's count, its deadline, its
    /// stream's hold.
    fn take_back(&mut self, key: Key) {
        let Some(entry) = self.entry(key) else { return };
        let EntryState::InFlight { consumer: holder, deadline } = entry.state else { return };
        let stream = entry.stream.clone();
        self.deadlines.remove(&(deadline, key));
        self.in_flight -= 1;
        if let Some(c) = self.consumers.get_mut(&holder) {
            c.in_flight -= 1;
        }
        if self.settings().strategy == Strategy::ByStream {
            self.by_stream.release(&stream);
        }
        if let Some(entry) = self.entry_mut(key) {
            entry.state = EntryState::Waiting;
        }
    }

    fn refuse(&self, consumer: ConsumerId, positions: Vec<u64>, what: &str) {
        let Some(c) = self.consumers.get(&consumer) else { return };
        let list = positions.iter().take(8).map(u64::to_string).collect::<Vec<_>>().join(", ");
        let more = if positions.len() > 8 { format!(" and {} more", positions.len() - 8) } else { String::new() };
        let message = format!(
            "cannot {what} position{} {list}{more}: not in flight for consumer {} (never delivered to it, settled already, or taken back after a timeout)",
            if positions.len() == 1 { "" } else { "s" },
            c.name
        );
        let refused =
            v1::consume_response::Refused { positions, error: Some(detail(v1::ErrorCode::NotInFlight, message)) };
        let _ = c.outbox.try_send(Ok(v1::ConsumeResponse { kind: Some(v1::consume_response::Kind::Refused(refused)) }));
    }

    fn ack(&mut self, consumer: ConsumerId, positions: &[u64]) {
        let mut refused = Vec::new();
        for &position in positions {
            let Some(key) = self.in_flight_key(consumer, position) else {
                refused.push(position);
                continue;
            };
            self.take_back(key);
            if let Some(c) = self.consumers.get_mut(&consumer) {
                c.acked += 1;
            }
            self.totals.acked += 1;
            self.settle(key);
        }
        if !refused.is_empty() {
            self.refuse(consumer, refused, "ack");
        }
    }

    async fn nack(&mut self, consumer: ConsumerId, positions: &[u64], action: NackAction, reason: &str) {
        let mut refused = Vec::new();
        let name = self.consumers.get(&consumer).map(|c| c.name.to_string()).unwrap_or_default();
        for &position in positions {
            let Some(key) = self.in_flight_key(consumer, position) else {
                refused.push(position);
                continue;
            };
            self.take_back(key);
            if let Some(c) = self.consumers.get_mut(&consumer) {
                c.nacked += 1;
            }
            match action {
                NackAction::Retry => {
                    self.retry_or_park(key, &format!("consumer {name} nacked it: {reason}")).await;
                }
                NackAction::Park => self.park(key, &format!("consumer {name} parked it: {reason}")).await,
                NackAction::Skip => {
                    self.totals.skipped += 1;
                    self.settle(key);
                }
                NackAction::Stop => {
                    // Given back as it was: this delivery does not count.
                    if let Some(entry) = self.entry_mut(key) {
                        entry.attempts = entry.attempts.saturating_sub(1);
                    }
                    self.push_waiting(key);
                }
            }
        }
        if !refused.is_empty() {
            self.refuse(consumer, refused, "nack");
        }
        if action == NackAction::Stop {
            // Leaving drops the consumer's outbox: its call ends cleanly.
            self.leave(consumer, "stopped").await;
        }
    }

    /// A delivery of `key` failed: wait again, or park after `max_retries`.
    async fn retry_or_park(&mut self, key: Key, reason: &str) {
        let max_retries = self.settings().max_retries;
        let Some(entry) = self.entry(key) else { return };
        if entry.attempts > max_retries {
            let reason =
                format!("{reason}; delivered {} times, more than max_retries ({max_retries}) allows", entry.attempts);
            self.park(key, &reason).await;
        } else {
            self.totals.retried += 1;
            self.push_waiting(key);
        }
    }

    /// Writes `key`'s event to the parked stream, then settles it. If the
    /// write fails the event waits again (it is never dropped).
    async fn park(&mut self, key: Key, reason: &str) {
        let Some(entry) = self.entry(key) else { return };
        let Some(event) = entry.event.clone() else { return };
        let record = ParkedRecord {
            generation: self.generation,
            reason: reason.to_owned(),
            attempts: entry.attempts,
            consumer: entry.last_consumer.to_string(),
            parked_at_ms: now_ms(),
            stream: event.stream.as_str().to_owned(),
            version: event.version,
            position: event.position,
            id: hex(event.id.as_bytes()),
            timestamp_ms: event.timestamp_ms,
            metadata_hex: hex(&event.metadata),
        };
        let parked = NewEvent {
            id: EventId::generate(),
            event_type: event.event_type.clone(),
            data: event.data.clone(),
            metadata: serde_json::to_vec(&record).expect("a parked record serializes"),
            timestamp_ms: now_ms(),
        };
        let store = Arc::clone(&self.state.store);
        let stream = self.parked_stream.clone();
        let written =
            tokio::task::spawn_blocking(move || store.append_system(&stream, ExpectedVersion::Any, vec![parked])).await;
        match written {
            Ok(Ok(_)) => {
                self.parked += 1;
                self.settle(key);
            }
            Ok(Err(e)) => {
                eprintln!("edgebus: group {}: cannot park position {}: {e}", self.record.name, event.position);
                self.push_waiting(key);
            }
            Err(e) => {
                eprintln!("edgebus: group {}: park task failed: {e}", self.record.name);
                self.push_waiting(key);
            }
        }
    }

    fn push_waiting(&mut self, key: Key) {
        let Some(entry) = self.entry_mut(key) else { return };
        entry.state = EntryState::Waiting;
        let stream = entry.stream.clone();
        self.waiting.insert(key);
        if self.settings().strategy == Strategy::ByStream {
            self.by_stream.push(key, &stream);
        }
    }

    /// `key` is done: release its payload and move the low-water marks.
    fn settle(&mut self, key: Key) {
        let Some(entry) = self.entry_mut(key) else { return };
        entry.state = EntryState::Settled;
        entry.event = None;
        let bytes = std::mem::take(&mut entry.bytes);
        self.buffer_bytes -= bytes;
        self.settled_since_checkpoint += 1;
        match key {
            Key::Main(position) => {
                self.main_settled.insert(position);
                while let Some(first) = self.main.first_entry() {
                    if first.get().state != EntryState::Settled {
                        break;
                    }
                    first.remove();
                }
                let low_water = self.main.first_key_value().map_or(self.read_next, |(p, _)| *p);
                self.main_settled.drop_below(low_water);
            }
            Key::Replay(_) => {
                while let Some(first) = self.replay.first_entry() {
                    if first.get().state != EntryState::Settled {
                        break;
                    }
                    first.remove();
                }
            }
        }
    }

    /// Times out every delivery whose deadline is at or before `now`.
    async fn expire(&mut self, now: Instant) {
        let timeout = self.settings().message_timeout_ms;
        while let Some(&(at, key)) = self.deadlines.first() {
            if at > now {
                break;
            }
            let holder = match self.entry(key).map(|e| e.state) {
                Some(EntryState::InFlight { consumer, .. }) => consumer,
                _ => {
                    self.deadlines.remove(&(at, key));
                    continue;
                }
            };
            let name = self.consumers.get(&holder).map(|c| c.name.to_string()).unwrap_or_default();
            self.take_back(key);
            self.retry_or_park(key, &format!("message timeout ({timeout} ms) expired on consumer {name}")).await;
        }
    }

    /// Reads parked events being replayed while the buffer has room.
    async fn fill_replay(&mut self) {
        if self.read_retry_at.is_some() {
            return;
        }
        while self.replay_read < self.replay_end && self.has_room() {
            if !self.read_replay().await {
                return;
            }
        }
    }

    /// Whether to read the next page of the log now.
    fn wants_main_page(&self) -> bool {
        self.read_retry_at.is_none() && !self.end_of_log && self.has_room() && self.worth_reading()
    }

    fn read_failed(&mut self, what: &str, error: &str) {
        eprintln!("edgebus: group {}: cannot read {what}: {error}; retrying in 1 s", self.record.name);
        self.read_retry_at = Some(Instant::now() + Duration::from_secs(1));
    }

    /// Starts reading the next page of the log, on the blocking pool.
    fn start_main_read(&self) -> MainRead {
        let room = self.buffer_events_max() - (self.main.len() + self.replay.len());
        let limit = room.clamp(1, SUBSCRIPTION_PAGE_EVENTS_MAX);
        let store = Arc::clone(&self.state.store);
        let (from, filter, predicate_filter) = (self.read_next, self.all_filter.clone(), Arc::clone(&self.filter));
        let read = tokio::task::spawn_blocking(move || {
            let slice = store.read_all(from, Direction::Forward, limit, &filter)?;
            let events: Vec<RecordedEvent> = slice
                .events
                .into_iter()
                .filter(|e| match &predicate_filter.predicate {
                    None => true,
                    Some(p) => p.evaluate(e) == Evaluation::Match,
                })
                .collect();
            Ok(MainPage { events, next: slice.next_position, end: slice.end_of_log })
        });
        (self.filter_generation, read)
    }

    /// A page of the log was read (with the filter of `generation`): its
    /// events join the buffer.
    fn main_page_read(&mut self, generation: u64, page: Result<Result<MainPage, ReadError>, JoinError>) {
        if generation != self.filter_generation {
            return; // read with a filter since changed: read again
        }
        let MainPage { events, next, end } = match page {
            Ok(Ok(page)) => page,
            Ok(Err(ReadError::Log(edgebus_log::ReadError::Removed { start: first_position, .. }))) => {
                // The log no longer holds the group's next events: what was
                // removed cannot be delivered; go on from the log's start.
                eprintln!(
                    "edgebus: group {}: positions {}..{first_position} were removed from the log before the group read them",
                    self.record.name, self.read_next
                );
                self.read_next = first_position;
                return;
            }
            Ok(Err(e)) => return self.read_failed("the log", &e.to_string()),
            Err(e) => return self.read_failed("the log", &e.to_string()),
        };
        for event in events {
            if event.position < self.read_next {
                continue;
            }
            if in_ranges(&self.restored_settled, event.position) {
                continue;
            }
            let key = Key::Main(event.position);
            let bytes = (event.data.len() + event.metadata.len()) as u64;
            self.buffer_bytes += bytes;
            self.main.insert(
                event.position,
                Entry {
                    stream: event.stream.clone(),
                    event: Some(Arc::new(event)),
                    state: EntryState::Waiting,
                    attempts: 0,
                    last_consumer: Arc::from(""),
                    bytes,
                },
            );
            self.push_waiting(key);
        }
        self.read_next = next.unwrap_or(self.read_next).max(self.read_next);
        let read_next = self.read_next;
        self.restored_settled.retain(|&(_, end)| end > read_next);
        self.end_of_log = end;
    }

    /// One page of the parked stream being replayed; false on failure.
    async fn read_replay(&mut self) -> bool {
        let room = self.buffer_events_max() - (self.main.len() + self.replay.len());
        let limit = usize::try_from(self.replay_end - self.replay_read).unwrap_or(usize::MAX).min(room).clamp(1, 256);
        let store = Arc::clone(&self.state.store);
        let (stream, from) = (self.parked_stream.clone(), self.replay_read);
        let read = tokio::task::spawn_blocking(move || {
            store.read_stream(&stream, StreamFrom::Version(from), Direction::Forward, limit, now_ms())
        })
        .await;
        let events = match read {
            Ok(Ok(events)) => events,
            Ok(Err(ReadError::StreamNotFound { .. })) => Vec::new(),
            Ok(Err(e)) => {
                self.read_failed("the parked stream", &e.to_string());
                return false;
            }
            Err(e) => {
                self.read_failed("the parked stream", &e.to_string());
                return false;
            }
        };
        if events.is_empty() {
            // Nothing more there (read below the end asked for).
            self.replay_read = self.replay_end;
            return true;
        }
        for parked in events {
            let version = parked.version;
            self.replay_read = version + 1;
            if version >= self.replay_end || in_ranges(&self.restored_replay_settled, version) {
                continue;
            }
            let Some(original) = original_event(&parked) else {
                eprintln!(
                    "edgebus: group {}: parked event {version} has unreadable metadata; skipped",
                    self.record.name
                );
                continue;
            };
            // Parked twice (a crash between parking and a checkpoint) and
            // both copies replayed: one delivery is enough.
            let duplicate =
                self.replay.values().any(|e| e.event.as_ref().is_some_and(|ev| ev.position == original.position))
                    || self.main.get(&original.position).is_some_and(|e| e.state != EntryState::Settled);
            if duplicate {
                continue;
            }
            let bytes = (original.data.len() + original.metadata.len()) as u64;
            self.buffer_bytes += bytes;
            self.replay.insert(
                version,
                Entry {
                    stream: original.stream.clone(),
                    event: Some(Arc::new(original)),
                    state: EntryState::Waiting,
                    attempts: 0,
                    last_consumer: Arc::from(""),
                    bytes,
                },
            );
            self.push_waiting(Key::Replay(version));
        }
        let replay_read = self.replay_read;
        self.restored_replay_settled.retain(|&(_, end)| end > replay_read);
        true
    }

    /// Hands waiting events to consumers with room, within the group's
    /// window.
    fn dispatch(&mut self) {
        if self.consumers.is_empty() {
            return;
        }
        match self.settings().strategy {
            Strategy::RoundRobin => self.dispatch_round_robin(),
            Strategy::ByStream => self.dispatch_by_stream(),
        }
    }

    /// Round robin in runs: each consumer with room in turn takes a run of
    /// up to [`ROUND_ROBIN_RUN`] consecutive waiting events, so that acks
    /// settle contiguous ranges and checkpoints stay small.
    fn dispatch_round_robin(&mut self) {
        while self.in_flight < self.settings().max_in_flight {
            if self.waiting.is_empty() {
                return;
            }
            let after = self.consumers.range(self.rr_last + 1..).find(|(_, c)| c.in_flight < c.window);
            let next = after.or_else(|| self.consumers.range(..=self.rr_last).find(|(_, c)| c.in_flight < c.window));
            let Some((&consumer, _)) = next else { return };
            self.rr_last = consumer;
            for _ in 0..ROUND_ROBIN_RUN {
                let has_room = self.consumers.get(&consumer).is_some_and(|c| c.in_flight < c.window);
                if !has_room || self.in_flight >= self.settings().max_in_flight {
                    break;
                }
                let Some(key) = self.waiting.pop_first() else { return };
                self.deliver(key, consumer);
            }
        }
    }

    fn dispatch_by_stream(&mut self) {
        let mut skipped = Vec::new();
        while self.in_flight < self.settings().max_in_flight {
            if self.consumers.values().all(|c| c.in_flight >= c.window) {
                break;
            }
            let Some((key, stream)) = self.by_stream.runnable.pop_first() else { break };
            let Some(holder) = owner(&stream, self.consumers.iter()) else {
                skipped.push((key, stream));
                break;
            };
            let has_room = self.consumers.get(&holder).is_some_and(|c| c.in_flight < c.window);
            if !has_room {
                skipped.push((key, stream));
                continue;
            }
            self.by_stream.take(key, &stream, holder);
            self.waiting.remove(&key);
            self.deliver(key, holder);
        }
        self.by_stream.runnable.extend(skipped);
    }

    /// Sends `key` to `consumer`.
    fn deliver(&mut self, key: Key, consumer: ConsumerId) {
        let deadline = Instant::now() + Duration::from_millis(self.settings().message_timeout_ms);
        let Some(c) = self.consumers.get_mut(&consumer) else { return };
        let name = Arc::clone(&c.name);
        let Some(entry) = (match key {
            Key::Main(p) => self.main.get_mut(&p),
            Key::Replay(v) => self.replay.get_mut(&v),
        }) else {
            return;
        };
        let Some(event) = entry.event.clone() else { return };
        entry.attempts += 1;
        entry.last_consumer = name;
        entry.state = EntryState::InFlight { consumer, deadline };
        let delivery = v1::consume_response::Delivery {
            event: Some(wire_event(&event)),
            attempt: entry.attempts,
            replayed: matches!(key, Key::Replay(_)),
        };
        c.in_flight += 1;
        c.delivered += 1;
        self.in_flight += 1;
        self.totals.delivered += 1;
        self.deadlines.insert((deadline, key));
        // The outbox holds the consumer's window and more, so it is full
        // only if the consumer is gone; the deadline then takes it back.
        let _ =
            c.outbox.try_send(Ok(v1::ConsumeResponse { kind: Some(v1::consume_response::Kind::Delivery(delivery)) }));
    }

    fn checkpoint_record(&self) -> CheckpointRecord {
        let position = self.main.first_key_value().map_or(self.read_next, |(p, _)| *p);
        debug_assert_eq!(
            self.main_settled.ranges().collect::<Vec<_>>(),
            to_ranges(self.main.iter().filter(|(_, e)| e.state == EntryState::Settled).map(|(p, _)| *p)),
        );
        let mut settled: Vec<(u64, u64)> = self.main_settled.ranges().collect();
        settled.extend(self.restored_settled.iter().copied().filter(|&(_, end)| end > position));
        settled.sort_unstable();
        let replay_next = self.replay.first_key_value().map_or(self.replay_read, |(v, _)| *v);
        let mut replay_settled =
            to_ranges(self.replay.iter().filter(|(_, e)| e.state == EntryState::Settled).map(|(v, _)| *v));
        replay_settled.extend(self.restored_replay_settled.iter().copied());
        replay_settled.sort_unstable();
        CheckpointRecord {
            generation: self.generation,
            position,
            settled,
            replay_next,
            replay_end: self.replay_end,
            replay_settled,
        }
    }

    /// Whether a checkpoint is due: `checkpoint_after` settled events, or
    /// (`timer`) progress older than `checkpoint_interval_ms`.
    fn checkpoint_due(&self, timer: bool) -> bool {
        self.settled_since_checkpoint >= u64::from(self.settings().checkpoint_after)
            || (timer
                && (self.settled_since_checkpoint > 0 || self.read_next != self.checkpointed_position)
                && self.last_checkpoint.elapsed() >= Duration::from_millis(self.settings().checkpoint_interval_ms))
    }

    /// Starts writing a checkpoint of the state now; its result comes back
    /// to [`Engine::checkpoint_written`].
    fn start_checkpoint(&mut self) -> CheckpointWrite {
        let record = self.checkpoint_record();
        let event = NewEvent {
            id: EventId::generate(),
            event_type: EventType::new(TYPE_CHECKPOINT).expect("a valid type"),
            data: serde_json::to_vec(&record).expect("a checkpoint serializes"),
            metadata: Vec::new(),
            timestamp_ms: now_ms(),
        };
        let settled = std::mem::take(&mut self.settled_since_checkpoint);
        self.last_checkpoint = Instant::now();
        let write = self.state.store.append_system_async(&self.checkpoint_stream, ExpectedVersion::Any, vec![event]);
        tokio::spawn(async move {
            match write.await {
                Ok(_) => Ok(record.position),
                Err(e) => Err(format!("{e} ({settled} settled events wait for the next checkpoint)")),
            }
        })
    }

    /// A checkpoint write ended. A failure is reported; the next checkpoint
    /// covers the same events (the previous one stays valid, only older).
    fn checkpoint_written(&mut self, written: Result<u64, String>) {
        match written {
            Ok(position) => self.checkpointed_position = position,
            Err(e) => eprintln!("edgebus: group {}: cannot write a checkpoint: {e}", self.record.name),
        }
    }

    fn update(&mut self, record: GroupRecord, filter: EventFilter) {
        self.filter_generation += 1;
        let strategy_changed = record.settings.strategy != self.record.settings.strategy;
        self.all_filter = all_filter(&filter);
        self.filter = Arc::new(filter);
        self.record = record;
        if strategy_changed {
            // Rebuild the stream schedule from what is waiting and in flight.
            self.by_stream = ByStream::default();
            if self.record.settings.strategy == Strategy::ByStream {
                let entries = self.main.iter().map(|(p, e)| (Key::Main(*p), e));
                let entries: Vec<_> = entries
                    .chain(self.replay.iter().map(|(v, e)| (Key::Replay(*v), e)))
                    .map(|(k, e)| (k, e.stream.clone(), e.state))
                    .collect();
                for (key, stream, state) in entries {
                    match state {
                        EntryState::InFlight { consumer, .. } => {
                            self.by_stream.busy.insert(stream, consumer);
                        }
                        EntryState::Waiting => self.by_stream.push(key, &stream),
                        EntryState::Settled => {}
                    }
                }
                // `push` made streams runnable before their holders were
                // known; drop those that are busy.
                let busy = &self.by_stream.busy;
                self.by_stream.runnable.retain(|(_, s)| !busy.contains_key(s));
            }
        }
    }

    fn describe(&self) -> v1::GroupInfo {
        let checkpoint = self.checkpointed_position;
        let pending = self.main.values().chain(self.replay.values()).filter(|e| e.state != EntryState::Settled).count();
        v1::GroupInfo {
            name: self.record.name.clone(),
            filter: Some(self.record.filter.to_wire()),
            settings: Some(self.record.settings.to_wire()),
            start_position: self.record.start_position,
            checkpoint,
            read_position: self.read_next,
            pending: pending as u64,
            in_flight: u64::from(self.in_flight),
            parked: self.parked,
            consumers: self
                .consumers
                .values()
                .map(|c| v1::ConsumerInfo {
                    name: c.name.to_string(),
                    max_in_flight: c.window,
                    in_flight: c.in_flight,
                    delivered: c.delivered,
                    acked: c.acked,
                    nacked: c.nacked,
                })
                .collect(),
            delivered: self.totals.delivered,
            acked: self.totals.acked,
            retried: self.totals.retried,
            skipped: self.totals.skipped,
            lag: self.state.store.log().end_position().saturating_sub(self.read_next),
        }
    }
}

/// `event` as sent to a consumer, copied once rather than cloned and then
/// converted (events from other sites, rarer, take the general path).
fn wire_event(event: &RecordedEvent) -> v1::RecordedEvent {
    if event.origin.is_some() {
        return v1::RecordedEvent::from(event.clone());
    }
    v1::RecordedEvent {
        stream: event.stream.as_str().to_owned(),
        version: event.version,
        position: event.position,
        id: event.id.as_bytes().to_vec(),
        r#type: event.event_type.as_str().to_owned(),
        data: event.data.clone(),
        metadata: event.metadata.clone(),
        timestamp_ms: event.timestamp_ms,
        origin: None,
    }
}

/// The event a parked copy stands for.
pub fn original_event(parked: &RecordedEvent) -> Option<RecordedEvent> {
    let record: ParkedRecord = serde_json::from_slice(&parked.metadata).ok()?;
    let id: [u8; 16] = unhex(&record.id)?.try_into().ok()?;
    Some(RecordedEvent {
        stream: StreamName::new(&record.stream).ok()?,
        version: record.version,
        position: record.position,
        id: EventId::from_bytes(id),
        event_type: parked.event_type.clone(),
        data: parked.data.clone(),
        metadata: unhex(&record.metadata_hex)?,
        timestamp_ms: record.timestamp_ms,
        origin: None,
    })
}

/// A checkpoint being written: the position it records, or why it failed.
type CheckpointWrite = tokio::task::JoinHandle<Result<u64, String>>;

/// One page of the log read for the group: matching events, the position
/// to read from next, whether it reached the end of the log.
#[derive(Debug)]
struct MainPage {
    events: Vec<RecordedEvent>,
    next: Option<u64>,
    end: bool,
}

/// A page being read: the filter generation it is read with, and the read.
type MainRead = (u64, tokio::task::JoinHandle<Result<MainPage, ReadError>>);

/// The end of the read in `reading` (which must be some).
async fn wait_for_page(reading: &mut Option<MainRead>) -> (u64, Result<Result<MainPage, ReadError>, JoinError>) {
    match reading.as_mut() {
        Some((generation, read)) => (*generation, read.await),
        None => std::future::pending().await,
    }
}

/// The end of the write in `writing` (which must be some).
async fn wait_for(writing: &mut Option<CheckpointWrite>) -> Result<u64, String> {
    match writing.as_mut() {
        Some(write) => write.await.unwrap_or_else(|e| Err(format!("checkpoint task failed: {e}"))),
        None => std::future::pending().await,
    }
}

async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::def::FilterDef;

    fn event() -> NewEvent {
        NewEvent {
            id: EventId::generate(),
            event_type: EventType::new("t").unwrap(),
            data: b"{}".to_vec(),
            metadata: Vec::new(),
            timestamp_ms: 0,
        }
    }

    /// A group on `x.>` whose filter changes to `y.>` while a page of the
    /// log is being read: that page (read with the old filter) is dropped,
    /// and the next read takes the new filter's events from the same place.
    #[tokio::test]
    async fn a_page_read_before_a_filter_change_is_dropped_and_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(edgebus_store::Store::open(dir.path(), edgebus_store::StoreConfig::default()).unwrap());
        for stream in ["x.a", "y.b", "x.a", "y.b"] {
            store.append(&StreamName::new(stream).unwrap(), ExpectedVersion::Any, vec![event()]).unwrap();
        }
        let live = crate::live::LiveFeed::start(Arc::clone(&store)).unwrap();
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let quotas = crate::quota::Quotas::new(Vec::new(), std::time::Instant::now()).unwrap();
        let state = NodeState::new(Arc::clone(&store), live, stopping, &crate::limits::NodeLimits::default(), quotas);
        let def = |pattern: &str| FilterDef { stream_pattern: Some(pattern.to_owned()), ..FilterDef::default() };
        let record = |pattern: &str| GroupRecord {
            name: "g".to_owned(),
            filter: def(pattern),
            settings: Settings::default(),
            start_position: 0,
            parked_base: 0,
        };
        let start = EngineStart {
            record: record("x.>"),
            generation: 0,
            filter: def("x.>").compile().unwrap(),
            checkpoint: None,
            parked_count: 0,
        };
        let mut engine = Engine::new(state, start, mpsc::channel(1).1);
        let streams = |engine: &Engine| engine.main.values().map(|e| e.stream.as_str().to_owned()).collect::<Vec<_>>();

        let mut reading = Some(engine.start_main_read());
        engine.update(record("y.>"), def("y.>").compile().unwrap());
        let (generation, page) = wait_for_page(&mut reading).await;
        engine.main_page_read(generation, page);
        assert!(engine.main.is_empty(), "the old filter's page was taken: {:?}", streams(&engine));
        assert_eq!(engine.read_next, 0, "reading goes on from where the dropped page started");

        let mut reading = Some(engine.start_main_read());
        let (generation, page) = wait_for_page(&mut reading).await;
        engine.main_page_read(generation, page);
        assert_eq!(streams(&engine), vec!["y.b", "y.b"]);
        assert!(engine.end_of_log);
    }

    #[test]
    fn ranges_answer_membership() {
        let ranges = [(3, 6), (9, 10)];
        let inside: Vec<u64> = (0..12).filter(|v| in_ranges(&ranges, *v)).collect();
        assert_eq!(inside, vec![3, 4, 5, 9]);
    }

    #[test]
    fn settled_ranges_merge_neighbours_and_follow_the_low_water_mark() {
        let mut settled = SettledRanges::default();
        for position in [5, 7, 6, 10, 3, 11, 9] {
            settled.insert(position);
        }
        assert_eq!(settled.ranges().collect::<Vec<_>>(), vec![(3, 4), (5, 8), (9, 12)]);
        assert_eq!(
            settled.ranges().collect::<Vec<_>>(),
            to_ranges([3, 5, 6, 7, 9, 10, 11]),
            "the same ranges as a scan of the buffer"
        );
        // 4 settles: everything up to 8 leaves the buffer.
        settled.insert(4);
        settled.drop_below(8);
        assert_eq!(settled.ranges().collect::<Vec<_>>(), vec![(9, 12)]);
        settled.drop_below(12);
        assert_eq!(settled.ranges().count(), 0);
    }

    #[test]
    #[should_panic(expected = "settled twice")]
    fn settled_ranges_refuse_a_position_twice() {
        let mut settled = SettledRanges::default();
        settled.insert(4);
        settled.insert(5);
        settled.insert(4);
    }

    #[test]
    fn by_stream_keeps_one_in_flight_per_stream_in_order() {
        let a = StreamName::new("a").expect("valid");
        let b = StreamName::new("b").expect("valid");
        let mut s = ByStream::default();
        s.push(Key::Main(5), &a);
        s.push(Key::Main(3), &a);
        s.push(Key::Main(4), &b);
        let heads: Vec<_> = s.runnable.iter().cloned().collect();
        assert_eq!(heads, vec![(Key::Main(3), a.clone()), (Key::Main(4), b.clone())]);
        s.take(Key::Main(3), &a, 1);
        // `a` is busy: its next event waits even though it is the oldest.
        assert_eq!(s.runnable.iter().cloned().collect::<Vec<_>>(), vec![(Key::Main(4), b.clone())]);
        s.push(Key::Main(6), &a);
        assert!(!s.runnable.iter().any(|(_, st)| st == &a));
        s.release(&a);
        assert_eq!(s.runnable.first().cloned(), Some((Key::Main(4), b)));
        assert!(s.runnable.contains(&(Key::Main(5), a)));
    }
}
