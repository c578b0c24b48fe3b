//! The sending end of a route: one task per route.
//!
//! Each lane is a cursor over the local log: it reads ahead a bounded
//! amount (at most its read-ahead, itself at most the route's window),
//! applies the policy in effect at each event's position (skip, drop,
//! sample, compact), and sends batches while the credit core allows. The
//! backlog stays in the log. On a grant, acknowledged events advance each
//! lane's acknowledged cursor, which is checkpointed to
//! `$gateway.cursors.ROUTE` every second; after a reconnect or a restart the
//! lanes resume from it and the receiver's exists-or-write absorbs the
//! overlap.
//!
//! Memory per route: lanes × read-ahead (each ≤ min(window_max, 4 MiB, 4096
//! events)) + one `(seq, position)` pair per event in flight (≤ window_max
//! events). Nothing depends on the backlog.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use edgebus_proto::v1;
use edgebus_store::{Direction, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, SiteName, StreamName};
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::credit::{Amount, CreditSender, Grant, Headroom, LaneShare, Stall};
use crate::def::{Action, Route};
use crate::gateway::{GATEWAY_STREAM, TYPE_POLICY_REMOVED, TYPE_POLICY_SET};
use crate::lease::driver::Authority;
use crate::metrics::{LatencyHistogram, now_ms};
use crate::policy::{Decision, PolicyHistory, compact_key, sample_keeps};
use crate::receiver::{PROTOCOL_VERSION, WAN_FRAME_BYTES_MAX, WAN_H2_WINDOW_BYTES};
use crate::site::Site;

/// Most events a lane reads ahead of what it sent.
pub const LANE_READ_AHEAD_EVENTS_MAX: u64 = 4096;
/// Most bytes a lane reads ahead of what it sent.
pub const LANE_READ_AHEAD_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Records scanned per read of the log.
const READ_RECORDS: usize = 1024;
/// Bytes scanned per read of the log.
const READ_BYTES: u64 = 1024 * 1024;
/// Largest batch frame built (one larger event travels alone).
const FRAME_BYTES_TARGET: u64 = 512 * 1024;
/// A frame carries at most this fraction (1/N) of the current window, so
/// that several frames are in flight at once (see `build_batch`).
const FRAME_WINDOW_DIVISOR: u64 = 4;
/// Smallest frame limit in bytes whatever the window (per-frame costs stay small).
const FRAME_BYTES_MIN: u64 = 4 * 1024;
/// A frame carries at most this many milliseconds of the link's measured
/// bandwidth: a frame on the wire delays every other lane's next event by
/// its transmission time.
const FRAME_LINK_MS: u64 = 5;
/// ...and at most this many while another lane has sent within
/// [`LANE_ACTIVE_MS`]: that lane's next event (a critical one beside bulk)
/// then waits behind a shorter frame. A lane alone keeps the longer frames,
/// which cost less per byte.
const FRAME_LINK_MS_SHARED: u64 = 2;
/// A lane that sent within this many milliseconds counts as active.
const LANE_ACTIVE_MS: u64 = 1000;
/// Most per-stream sampling buckets remembered per lane; when full the
/// memory is cleared (one extra event per stream may then be kept).
const SAMPLE_STREAMS_MAX: usize = 65_536;
/// Cursors that moved by fewer positions than this with nothing
/// acknowledged since the last checkpoint are not checkpointed: they moved
/// only over events the route does not send (every checkpoint record, of
/// this route and of the others, is such an event), which a restart reads
/// and skips again at little cost. Without this an idle route, or two
/// routes of one site, would write a checkpoint every interval forever.
const SKIPPED_CHECKPOINT: u64 = 65_536;
/// First and longest reconnect delays (with ±50 % jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Consecutive failed sessions after which the route reports `open`
/// (circuit open) and waits the longest delay.
const OPEN_AFTER_FAILURES: u32 = 5;

/// The system stream holding a route's acknowledged cursors.
pub fn cursor_stream(route: &str) -> StreamName {
    StreamName::system(&format!("$gateway.cursors.{route}")).expect("route names are valid stream tokens")
}

/// Settings shared by every route of a gateway.
#[derive(Debug, Clone, Copy)]
pub struct SenderSettings {
    /// Idle sessions send a heartbeat this often.
    pub heartbeat: Duration,
    /// A session with no control message for this long is dead.
    pub dead_after: Duration,
    /// How often acknowledged cursors are checkpointed.
    pub checkpoint_every: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
}

/// Route states, as shown to operators.
pub mod state {
    /// Connecting to a remote gateway.
    pub const CONNECTING: u8 = 0;
    /// A session is up.
    pub const CONNECTED: u8 = 1;
    /// Waiting before the next attempt.
    pub const BACKOFF: u8 = 2;
    /// Failing repeatedly: held open, retried at the longest delay.
    pub const OPEN: u8 = 3;
    /// Stopped.
    pub const STOPPED: u8 = 4;
    /// Names, by value.
    pub const NAMES: [&str; 5] = ["connecting", "connected", "backoff", "open", "stopped"];
}

/// Why a lane is not sending although it has data.
pub mod stall {
    /// Not stalled.
    pub const NONE: u8 = 0;
    /// No link session.
    pub const NO_LINK: u8 = 1;
    /// The receiver's credit is used up.
    pub const NO_CREDIT: u8 = 2;
    /// The lane's share of the window is used up.
    pub const LANE_SHARE: u8 = 3;
    /// The lane's cap is reached.
    pub const LANE_CAP: u8 = 4;
    /// A stream moved to this lane and the old lane has not passed the change.
    pub const LANE_MOVE: u8 = 5;
    /// The route has the link's pace in flight; the lane's reservation is used.
    pub const PACE: u8 = 6;
    /// Another lane is active and the lane's pool bytes have used the
    /// headroom's rate (`credit::rate`): the link keeps room for the other lane.
    pub const HEADROOM: u8 = 7;
    /// Names, by value.
    pub const NAMES: [&str; 8] =
        ["none", "no link", "no credit", "lane share", "lane cap", "lane move", "pace", "headroom"];
}

/// Counters of one lane.
#[derive(Debug, Default)]
pub struct LaneMetrics {
    /// The lane's name.
    pub name: String,
    /// Next log position the lane reads.
    pub read_position: AtomicU64,
    /// Every event of the lane below this is durable at the remote site.
    pub acked_position: AtomicU64,
    /// Events sent (all sessions).
    pub sent_events: AtomicU64,
    /// Bytes sent.
    pub sent_bytes: AtomicU64,
    /// Events acknowledged durable by the remote site.
    pub acked_events: AtomicU64,
    /// Events in flight now.
    pub in_flight_events: AtomicU64,
    /// Bytes in flight now.
    pub in_flight_bytes: AtomicU64,
    /// Events read ahead, not yet sent.
    pub buffered_events: AtomicU64,
    /// Current [`stall`] reason.
    pub stall: AtomicU8,
    /// Times the lane started waiting, by [`stall`] reason (index).
    pub stalls: [AtomicU64; stall::NAMES.len()],
    /// Since when (ms since epoch) the acknowledged cursor has not moved
    /// while the lane had backlog; 0 when moving or idle.
    pub stalled_since_ms: AtomicU64,
    /// Timestamp (ms since epoch) of the oldest event not yet acknowledged; 0: none.
    pub oldest_unacked_ms: AtomicU64,
    /// Send → durable acknowledgement latency.
    pub ack_latency: LatencyHistogram,
}

impl LaneMetrics {
    /// Records the lane's current stall reason, counting each start of a wait.
    pub fn set_stall(&self, reason: u8) {
        let before = self.stall.swap(reason, Ordering::Relaxed);
        if before != reason && reason != stall::NONE {
            self.stalls[usize::from(reason)].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Per topic pattern counters of a route.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct TopicCounts {
    /// Events sent.
    pub sent: u64,
    /// Events a sample policy left out.
    pub sampled_out: u64,
    /// Events a compact policy replaced by a later one.
    pub compacted: u64,
    /// Events a drop policy dropped.
    pub dropped: u64,
}

/// Counters of one route.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// Route name.
    pub name: String,
    /// Remote site.
    pub remote_site: String,
    /// Current [`state`].
    pub state: AtomicU8,
    /// Sessions started after the first.
    pub reconnects: AtomicU64,
    /// Consecutive failed sessions.
    pub failures: AtomicU64,
    /// The last failure, for operators.
    pub last_error: Mutex<String>,
    /// The address of the current or last session.
    pub address: Mutex<String>,
    /// Credit granted (events, summed over sessions).
    pub credit_granted_events: AtomicU64,
    /// Credit used (events sent, summed over sessions).
    pub credit_used_events: AtomicU64,
    /// Credit granted in the current session (its highest limit, events).
    pub session_granted_events: AtomicU64,
    /// Credit used in the current session (events sent).
    pub session_used_events: AtomicU64,
    /// Demand fulfillment samples: at each grant while the route has
    /// backlog, the share of the granted window in use (per mille), summed.
    pub fulfillment_permille_sum: AtomicU64,
    /// How many samples `fulfillment_permille_sum` holds.
    pub fulfillment_samples: AtomicU64,
    /// Window of the current session (events).
    pub window_events: AtomicU64,
    /// Window of the current session (bytes).
    pub window_bytes: AtomicU64,
    /// Lanes, in route order.
    pub lanes: Vec<LaneMetrics>,
    /// Per deciding topic pattern.
    pub topics: Mutex<BTreeMap<String, TopicCounts>>,
    /// Events read ahead or in flight now, per deciding topic pattern.
    pub topics_queued: Mutex<BTreeMap<String, u64>>,
}

impl LaneMetrics {
    /// Renders the lane's acknowledgement latency histogram.
    pub fn ack_latency_render(&self, out: &mut String, name: &str, labels: &str) {
        self.ack_latency.render(out, name, labels);
    }
}

impl RouteMetrics {
    /// The mean share of the granted window in use while data waited (0..1);
    /// `None` before any sample.
    pub fn demand_fulfillment(&self) -> Option<f64> {
        let samples = self.fulfillment_samples.load(Ordering::Relaxed);
        (samples > 0).then(|| self.fulfillment_permille_sum.load(Ordering::Relaxed) as f64 / samples as f64 / 1000.0)
    }

    fn new(route: &Route) -> Self {
        Self {
            name: route.name.clone(),
            remote_site: route.remote_site.to_string(),
            lanes: route.lanes.iter().map(|l| LaneMetrics { name: l.name.clone(), ..LaneMetrics::default() }).collect(),
            ..Self::default()
        }
    }

    fn count(&self, topic: &str, change: impl FnOnce(&mut TopicCounts)) {
        let mut topics = self.topics.lock();
        // Bounded: topics are policy patterns (at most POLICIES_MAX) and `>`.
        match topics.get_mut(topic) {
            Some(counts) => change(counts),
            None => change(topics.entry(topic.to_owned()).or_default()),
        }
    }

    fn fail(&self, error: &str) {
        *self.last_error.lock() = error.to_owned();
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// One event read ahead.
#[derive(Debug)]
struct Item {
    position: u64,
    event: v1::ReplicatedEvent,
    bytes: u64,
    timestamp_ms: u64,
    topic: Arc<str>,
}

/// One event sent and not yet acknowledged.
#[derive(Debug, Clone)]
struct InFlight {
    topic: Arc<str>,
    seq: u64,
    position: u64,
    bytes: u64,
    sent_at_ms: u64,
    timestamp_ms: u64,
}

#[derive(Debug)]
struct Lane {
    index: usize,
    read_pos: u64,
    buffer: VecDeque<Item>,
    buffer_bytes: u64,
    /// `(seq, position, sent at ms, event timestamp)` of events in flight, in seq order.
    in_flight: VecDeque<InFlight>,
    /// Events read ahead or in flight, per deciding topic pattern.
    queued: HashMap<Arc<str>, u64>,
    /// Sum of `bytes` over `in_flight`.
    in_flight_bytes: u64,
    blocked: bool,
    last_bucket: HashMap<String, u64>,
    read_ahead: Amount,
    at_end: bool,
    /// Policy outcomes below this position were counted already (a lane
    /// re-reads after a reconnect; nothing is counted twice).
    counted_to: u64,
    /// When it last sent a frame (ms since the epoch; 0: never).
    last_sent_ms: u64,
}

impl Lane {
    fn acked_pos(&self) -> u64 {
        self.in_flight
            .front()
            .map(|f| f.position)
            .or_else(|| self.buffer.front().map(|i| i.position))
            .unwrap_or(self.read_pos)
    }

    fn rewind(&mut self) {
        self.read_pos = self.acked_pos();
        self.buffer.clear();
        self.buffer_bytes = 0;
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.queued.clear();
        self.blocked = false;
        self.at_end = false;
    }

    fn wants_read(&self) -> bool {
        !self.at_end
            && !self.blocked
            && (self.buffer.len() as u64) < self.read_ahead.events / 2
            && self.buffer_bytes < self.read_ahead.bytes / 2
    }
}

/// A running route: its task and counters.
#[derive(Debug)]
pub struct RouteHandle {
    /// The route as validated.
    pub route: Route,
    /// Its counters.
    pub metrics: Arc<RouteMetrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RouteHandle {
    /// Stops the route (its cursors are checkpointed first) and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// What a route task needs.
#[derive(Debug, Clone)]
pub struct RouteContext {
    /// The local site.
    pub site: Arc<dyn Site>,
    /// This site's name.
    pub site_name: SiteName,
    /// This gateway's name.
    pub gateway: String,
    /// The lease term the route sends under.
    pub term: u64,
    /// Consulted before every frame: is the lease still held under `term`.
    pub authority: Arc<Authority>,
    /// The log's end position, as it grows.
    pub end: watch::Receiver<u64>,
    /// Policy versions.
    pub policies: watch::Receiver<Arc<PolicyHistory>>,
    /// Timing.
    pub settings: SenderSettings,
}

/// Starts `route`.
pub fn start(route: Route, context: RouteContext) -> RouteHandle {
    let metrics = Arc::new(RouteMetrics::new(&route));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(route.clone(), context, Arc::clone(&metrics), stop_rx));
    RouteHandle { route, metrics, stop, task }
}

/// How a session ended.
enum Ended {
    Stopped,
    Failed { error: String, progressed: bool },
}

struct RouteTask {
    route: Route,
    context: RouteContext,
    metrics: Arc<RouteMetrics>,
    lanes: Vec<Lane>,
    last_checkpoint: Vec<u64>,
    /// The link's delivery rate as the receiver last measured it (0: unknown).
    bandwidth: u64,
    /// The headroom (`credit::rate`): pool bytes while another lane is
    /// active, on the task's clock (`clock`).
    headroom: Headroom,
    clock: tokio::time::Instant,
    /// The headroom held a lane since the last frame: the next frame says
    /// `app_limited`, so the receiver does not take the lower rate for the link's.
    headroom_held: bool,
    /// Events acknowledged when the last checkpoint was written: progress
    /// made only of skipped records (the checkpoints themselves among them)
    /// writes no checkpoint, so an idle route writes none.
    acked_at_checkpoint: u64,
}

async fn run(route: Route, context: RouteContext, metrics: Arc<RouteMetrics>, mut stop: watch::Receiver<bool>) {
    let cursors = load_cursors(context.site.as_ref(), &route).await;
    // A lane the checkpoint does not know starts where the slowest known
    // lane is: what it now carries was sent (or not yet) by another lane.
    let fresh_start = cursors.values().copied().min().unwrap_or(0);
    let read_ahead = Amount {
        events: route.window_max.events.clamp(1, LANE_READ_AHEAD_EVENTS_MAX),
        bytes: route.window_max.bytes.clamp(1, LANE_READ_AHEAD_BYTES_MAX),
    };
    let lanes = route
        .lanes
        .iter()
        .enumerate()
        .map(|(index, lane)| Lane {
            index,
            read_pos: cursors.get(&lane.name).copied().unwrap_or(fresh_start),
            buffer: VecDeque::new(),
            buffer_bytes: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            queued: HashMap::new(),
            blocked: false,
            last_bucket: HashMap::new(),
            read_ahead,
            at_end: false,
            counted_to: 0,
            last_sent_ms: 0,
        })
        .collect::<Vec<_>>();
    let last_checkpoint = lanes.iter().map(|l| l.read_pos).collect();
    let mut task = RouteTask::new(route, context, metrics, lanes, last_checkpoint);
    task.publish_positions();
    let mut failures = 0u32;
    let mut address = 0usize;
    loop {
        let target = task.route.addresses[address % task.route.addresses.len()].clone();
        address += 1;
        task.metrics.state.store(state::CONNECTING, Ordering::Relaxed);
        *task.metrics.address.lock() = target.clone();
        let ended = task.session(&target, &mut stop).await;
        task.set_stall_all(stall::NO_LINK);
        for lane in &mut task.lanes {
            lane.rewind();
        }
        task.publish_positions();
        task.checkpoint(false).await;
        match ended {
            Ended::Stopped => break,
            Ended::Failed { error, progressed } => {
                task.metrics.fail(&format!("{target}: {error}"));
                task.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                failures = if progressed { 1 } else { failures.saturating_add(1) };
            }
        }
        let open = failures >= OPEN_AFTER_FAILURES;
        task.metrics.state.store(if open { state::OPEN } else { state::BACKOFF }, Ordering::Relaxed);
        let base = BACKOFF_MIN.saturating_mul(1u32 << failures.min(10)).min(BACKOFF_MAX);
        let delay = base.mul_f64(rand::random_range(0.5..1.5));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    task.checkpoint(true).await;
    task.metrics.state.store(state::STOPPED, Ordering::Relaxed);
}

async fn load_cursors(site: &dyn Site, route: &Route) -> HashMap<String, u64> {
    let read = site.read_stream(cursor_stream(&route.name), StreamFrom::End, Direction::Backward, 1).await;
    let Ok(events) = read else { return HashMap::new() };
    events
        .first()
        .and_then(|e| serde_json::from_slice::<CursorRecord>(&e.data).ok())
        .map(|r| r.lanes)
        .unwrap_or_default()
}

/// The checkpoint event's data.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CursorRecord {
    /// Lane name → acknowledged position.
    lanes: HashMap<String, u64>,
}

impl RouteTask {
    fn new(
        route: Route,
        context: RouteContext,
        metrics: Arc<RouteMetrics>,
        lanes: Vec<Lane>,
        last_checkpoint: Vec<u64>,
    ) -> Self {
        RouteTask {
            route,
            context,
            metrics,
            lanes,
            last_checkpoint,
            acked_at_checkpoint: 0,
            bandwidth: 0,
            headroom: Headroom::default(),
            clock: tokio::time::Instant::now(),
            headroom_held: false,
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Has a lane other than `lane` sent within [`LANE_ACTIVE_MS`]?
    fn shared(&self, lane: usize, now_ms: u64) -> bool {
        self.lanes
            .iter()
            .any(|l| l.index != lane && l.last_sent_ms > 0 && now_ms.saturating_sub(l.last_sent_ms) < LANE_ACTIVE_MS)
    }

    /// The headroom's rate for `lane`'s sends: while another lane is
    /// active and the link's pace is measured (not in startup or an RTT
    /// probe) and the headroom is not probing; `None` otherwise.
    fn headroom_rate(&mut self, credit: &CreditSender, lane: usize, now_ms: u64, now_us: u64) -> Option<u64> {
        if self.bandwidth == 0 || credit.pace_bytes() == 0 || !self.shared(lane, now_ms) {
            return None;
        }
        // The pace covers a credit cycle and its queue allowance.
        let cycle_us = u128::from(credit.pace_bytes()) * 1_000_000 / u128::from(self.bandwidth);
        self.headroom.rate(now_us, self.bandwidth, u64::try_from(cycle_us).unwrap_or(u64::MAX))
    }

    fn publish_positions(&self) {
        let mut queued: BTreeMap<String, u64> = BTreeMap::new();
        for lane in &self.lanes {
            for (topic, n) in &lane.queued {
                *queued.entry(topic.to_string()).or_default() += n;
            }
        }
        *self.metrics.topics_queued.lock() = queued;
        for lane in &self.lanes {
            let m = &self.metrics.lanes[lane.index];
            m.read_position.store(lane.read_pos, Ordering::Relaxed);
            let acked = lane.acked_pos();
            if m.acked_position.swap(acked, Ordering::Relaxed) != acked {
                m.stalled_since_ms.store(0, Ordering::Relaxed);
            }
            m.buffered_events.store(lane.buffer.len() as u64, Ordering::Relaxed);
            m.in_flight_events.store(lane.in_flight.len() as u64, Ordering::Relaxed);
            m.in_flight_bytes.store(lane.in_flight_bytes, Ordering::Relaxed);
            let oldest =
                lane.in_flight.front().map(|f| f.timestamp_ms).or_else(|| lane.buffer.front().map(|i| i.timestamp_ms));
            m.oldest_unacked_ms.store(oldest.unwrap_or(0), Ordering::Relaxed);
            let backlog = *self.context.end.borrow() > acked;
            if backlog {
                let _ = m.stalled_since_ms.compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
            } else {
                m.stalled_since_ms.store(0, Ordering::Relaxed);
            }
        }
    }

    fn set_stall_all(&self, reason: u8) {
        for m in &self.metrics.lanes {
            m.set_stall(reason);
        }
    }

    /// Writes the acknowledged cursors if they moved and events were
    /// acknowledged since the last checkpoint; `last` (the route stopping)
    /// writes them if they moved at all.
    async fn checkpoint(&mut self, last: bool) {
        let positions: Vec<u64> = self.lanes.iter().map(Lane::acked_pos).collect();
        let acked: u64 = self.metrics.lanes.iter().map(|l| l.acked_events.load(Ordering::Relaxed)).sum();
        // Long runs of skipped records are checkpointed too, so a restart
        // does not scan them again.
        let far = positions.iter().zip(&self.last_checkpoint).any(|(p, l)| p.saturating_sub(*l) >= SKIPPED_CHECKPOINT);
        if positions == self.last_checkpoint || (acked == self.acked_at_checkpoint && !last && !far) {
            return;
        }
        let record = CursorRecord {
            lanes: self.route.lanes.iter().zip(&positions).map(|(l, p)| (l.name.clone(), *p)).collect(),
        };
        let event = NewEvent {
            id: EventId::generate(),
            event_type: EventType::new("$cursor").expect("valid type"),
            data: serde_json::to_vec(&record).expect("serializable"),
            metadata: Vec::new(),
            timestamp_ms: now_ms(),
        };
        let written =
            self.context.site.append(cursor_stream(&self.route.name), ExpectedVersion::Any, vec![event]).await;
        match written {
            Ok(_) => {
                self.last_checkpoint = positions;
                self.acked_at_checkpoint = acked;
            }
            Err(e) => eprintln!("edgebus gateway: route {}: cursor checkpoint failed: {e}", self.route.name),
        }
    }

    async fn session(&mut self, address: &str, stop: &mut watch::Receiver<bool>) -> Ended {
        let failed = |error: String| Ended::Failed { error, progressed: false };
        let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
            Ok(e) => e
                .connect_timeout(self.context.settings.connect_timeout)
                .tcp_nodelay(true)
                // HTTP/2's own flow control must not be what limits the
                // route: the credit window (which bounds memory) is.
                .initial_stream_window_size(Some(WAN_H2_WINDOW_BYTES))
                .initial_connection_window_size(Some(WAN_H2_WINDOW_BYTES)),
            Err(e) => return failed(format!("bad address: {e}")),
        };
        let channel = tokio::select! {
            c = endpoint.connect() => match c {
                Ok(c) => c,
                Err(e) => return failed(format!("cannot connect: {}", source_chain(&e))),
            },
            _ = stop.changed() => return Ended::Stopped,
        };
        let mut client = v1::wan_client::WanClient::new(channel)
            .max_decoding_message_size(WAN_FRAME_BYTES_MAX)
            .max_encoding_message_size(WAN_FRAME_BYTES_MAX);
        let (tx, rx) = mpsc::channel::<v1::LinkFrame>(4);
        let hello = v1::LinkHello {
            protocol_version: PROTOCOL_VERSION,
            site: self.context.site_name.to_string(),
            target_site: self.route.remote_site.to_string(),
            route: self.route.name.clone(),
            lanes: self.route.lanes.iter().map(|l| l.name.clone()).collect(),
            window_min_events: self.route.window_min.events,
            window_min_bytes: self.route.window_min.bytes,
            window_max_events: self.route.window_max.events,
            window_max_bytes: self.route.window_max.bytes,
            term: self.context.term,
            gateway: self.context.gateway.clone(),
        };
        let _ = tx.try_send(v1::LinkFrame { kind: Some(v1::link_frame::Kind::Hello(hello)) });
        let timeout = self.context.settings.dead_after;
        let mut inbound = match tokio::time::timeout(timeout, client.link(ReceiverStream::new(rx))).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return failed(format!("link refused: {}", status.message())),
            Err(_) => return failed("no answer to the link request".into()),
        };
        match tokio::time::timeout(timeout, inbound.message()).await {
            Ok(Ok(Some(v1::LinkControl { kind: Some(v1::link_control::Kind::Welcome(welcome)) }))) => {
                if welcome.site != self.route.remote_site.as_str() {
                    return failed(format!(
                        "the gateway at {address} is site {:?}, not {}",
                        welcome.site, self.route.remote_site
                    ));
                }
            }
            Ok(Ok(Some(v1::LinkControl { kind: Some(v1::link_control::Kind::Close(close)) }))) => {
                return failed(format!("refused by the remote site: {} (code {})", close.reason, close.code));
            }
            Ok(Ok(_)) => return failed("the remote gateway did not welcome the session".into()),
            Ok(Err(status)) => return failed(format!("link failed: {}", status.message())),
            Err(_) => return failed("no welcome from the remote gateway".into()),
        }
        self.metrics.state.store(state::CONNECTED, Ordering::Relaxed);
        self.metrics.failures.store(0, Ordering::Relaxed);
        let shares =
            self.route.lanes.iter().map(|l| LaneShare { reserved_permille: l.reserved_permille, cap: l.cap }).collect();
        let mut credit = match CreditSender::try_new(shares) {
            Ok(c) => c,
            Err(e) => return failed(format!("invalid lane shares: {e}")),
        };
        let progressed_before = self.metrics.lanes.iter().map(|l| l.acked_events.load(Ordering::Relaxed)).sum::<u64>();
        let error = self.pump(&mut credit, &tx, &mut inbound, stop).await;
        let progressed =
            self.metrics.lanes.iter().map(|l| l.acked_events.load(Ordering::Relaxed)).sum::<u64>() > progressed_before;
        self.metrics.credit_granted_events.fetch_add(credit.limit().events, Ordering::Relaxed);
        self.metrics.credit_used_events.fetch_add(credit.sent().events, Ordering::Relaxed);
        self.metrics.session_granted_events.store(0, Ordering::Relaxed);
        self.metrics.session_used_events.store(0, Ordering::Relaxed);
        match error {
            None => Ended::Stopped,
            Some(error) => Ended::Failed { error, progressed },
        }
    }

    /// Runs a session until it fails (the reason) or the route stops (`None`).
    async fn pump(
        &mut self,
        credit: &mut CreditSender,
        tx: &mpsc::Sender<v1::LinkFrame>,
        inbound: &mut tonic::Streaming<v1::LinkControl>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<String> {
        let settings = self.context.settings;
        let mut heartbeat = tokio::time::interval(settings.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checkpoint = tokio::time::interval(settings.checkpoint_every);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut end = self.context.end.clone();
        let mut policies = self.context.policies.clone();
        let mut last_control = tokio::time::Instant::now();
        let mut last_sent = tokio::time::Instant::now();
        let mut echoed = 0u64;
        // The end's watch closes when the node stops; then it is not polled.
        let mut end_open = true;
        loop {
            let more = match self.refill().await {
                Ok(more) => more,
                Err(e) => return Some(e),
            };
            let (next, headroom_wait) = self.next_lane(credit);
            self.publish_positions();
            let echo_due = credit.echo() != echoed;
            tokio::select! {
                biased;
                _ = stop.changed() => return None,
                message = inbound.message() => {
                    last_control = tokio::time::Instant::now();
                    match message {
                        Ok(Some(v1::LinkControl { kind: Some(v1::link_control::Kind::Grant(grant)) })) => {
                            if let Err(e) = self.on_grant(credit, &grant) {
                                return Some(e);
                            }
                        }
                        Ok(Some(v1::LinkControl { kind: Some(v1::link_control::Kind::Close(close)) })) => {
                            return Some(format!("closed by the remote site: {} (code {})", close.reason, close.code));
                        }
                        Ok(Some(_)) => return Some("unexpected control message".into()),
                        Ok(None) => return Some("the remote gateway ended the session".into()),
                        Err(status) => return Some(format!("link failed: {}", status.message())),
                    }
                }
                permit = tx.reserve(), if next.is_some() || echo_due => {
                    let Ok(permit) = permit else { return Some("the link's send side closed".into()) };
                    if !self.context.authority.allows(self.context.term) {
                        return Some(format!("the lease of term {} is no longer held: this gateway sends no more", self.context.term));
                    }
                    let frame = match next {
                        Some(lane) => self.build_batch(credit, lane),
                        None => v1::LinkFrame { kind: Some(v1::link_frame::Kind::Heartbeat(v1::LinkHeartbeat {
                            echo: credit.echo(),
                            sent_events: credit.sent().events,
                        })) },
                    };
                    echoed = credit.echo();
                    permit.send(frame);
                    last_sent = tokio::time::Instant::now();
                }
                changed = policies.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    // A lane waiting for a policy change to reach it reads on.
                    for lane in &mut self.lanes {
                        lane.blocked = false;
                    }
                }
                changed = end.changed(), if end_open => {
                    end_open = changed.is_ok();
                    for lane in &mut self.lanes {
                        lane.at_end = false;
                    }
                }
                _ = heartbeat.tick() => {
                    if last_control.elapsed() > settings.dead_after {
                        return Some(format!("no control message for {} ms", settings.dead_after.as_millis()));
                    }
                    if last_sent.elapsed() >= settings.heartbeat {
                        let beat = v1::LinkFrame { kind: Some(v1::link_frame::Kind::Heartbeat(v1::LinkHeartbeat {
                            echo: credit.echo(),
                            sent_events: credit.sent().events,
                        })) };
                        if tx.try_send(beat).is_ok() {
                            echoed = credit.echo();
                            last_sent = tokio::time::Instant::now();
                        }
                    }
                }
                _ = checkpoint.tick() => self.checkpoint(false).await,
                () = tokio::time::sleep(headroom_wait.unwrap_or_default()), if headroom_wait.is_some() => {}
                () = std::future::ready(()), if more => {}
            }
        }
    }

    fn on_grant(&mut self, credit: &mut CreditSender, grant: &v1::LinkGrant) -> Result<(), String> {
        let bandwidth = grant.bandwidth_bytes_per_s;
        let grant = Grant {
            up_to: Amount::new(grant.up_to_events, grant.up_to_bytes),
            durable: Amount::new(grant.durable_events, grant.durable_bytes),
            window: Amount::new(grant.window_events, grant.window_bytes),
            ping: grant.ping,
            ping_sent_ms: grant.ping_sent_ms,
            pace_bytes: grant.pace_bytes,
        };
        // Demand fulfillment, sampled before the grant is applied: while data
        // waits, how much of what the receiver granted is in use.
        let granted = credit.limit().saturating_sub(credit.durable());
        if granted.events > 0 && self.lanes.iter().any(|l| !l.buffer.is_empty()) {
            let used = credit.sent().saturating_sub(credit.durable());
            let permille = (used.events * 1000 / granted.events).min(1000);
            self.metrics.fulfillment_permille_sum.fetch_add(permille, Ordering::Relaxed);
            self.metrics.fulfillment_samples.fetch_add(1, Ordering::Relaxed);
        }
        let durable = credit.on_grant(&grant).map_err(|e| format!("bad grant from the remote site: {e}"))?;
        self.bandwidth = bandwidth;
        self.metrics.window_events.store(grant.window.events, Ordering::Relaxed);
        self.metrics.session_granted_events.store(credit.limit().events, Ordering::Relaxed);
        self.metrics.window_bytes.store(grant.window.bytes, Ordering::Relaxed);
        let now = now_ms();
        for lane in &mut self.lanes {
            // Acknowledgements may release a stream that moved lanes.
            lane.blocked = false;
            let m = &self.metrics.lanes[lane.index];
            while lane.in_flight.front().is_some_and(|f| f.seq < durable.events) {
                let done = lane.in_flight.pop_front().expect("checked");
                lane.in_flight_bytes -= done.bytes;
                if let Some(n) = lane.queued.get_mut(&done.topic) {
                    *n -= 1;
                    if *n == 0 {
                        lane.queued.remove(&done.topic);
                    }
                }
                let sent_at = done.sent_at_ms;
                m.acked_events.fetch_add(1, Ordering::Relaxed);
                m.ack_latency.observe(now.saturating_sub(sent_at));
            }
        }
        Ok(())
    }

    /// The highest-priority lane that has an event and may send it, noting
    /// why the others wait; and, if the headroom holds a lane, how long
    /// until it may send.
    fn next_lane(&mut self, credit: &CreditSender) -> (Option<usize>, Option<Duration>) {
        let (now_ms, now_us) = (now_ms(), self.now_us());
        let mut chosen = None;
        let mut headroom_wait: Option<Duration> = None;
        for index in 0..self.lanes.len() {
            let rate = self.headroom_rate(credit, index, now_ms, now_us);
            let lane = &self.lanes[index];
            let m = &self.metrics.lanes[lane.index];
            let reason = match lane.buffer.front() {
                None if lane.blocked => stall::LANE_MOVE,
                None => stall::NONE,
                Some(item) => match credit.stall(lane.index, item.bytes) {
                    None => match rate {
                        Some(rate)
                            if credit.needs_pool(lane.index, item.bytes) && !self.headroom.allows(now_us, rate) =>
                        {
                            let wait = Duration::from_micros(self.headroom.wait_us(now_us, rate));
                            headroom_wait = Some(headroom_wait.map_or(wait, |w| w.min(wait)));
                            stall::HEADROOM
                        }
                        _ => {
                            chosen = chosen.or(Some(lane.index));
                            stall::NONE
                        }
                    },
                    Some(Stall::NoCredit) => stall::NO_CREDIT,
                    Some(Stall::LaneShare) => stall::LANE_SHARE,
                    Some(Stall::LaneCap) => stall::LANE_CAP,
                    Some(Stall::Pace) => stall::PACE,
                },
            };
            m.set_stall(reason);
        }
        self.headroom_held |= headroom_wait.is_some();
        (chosen, headroom_wait)
    }

    fn build_batch(&mut self, credit: &mut CreditSender, lane_index: usize) -> v1::LinkFrame {
        let now = now_ms();
        let shared = self.shared(lane_index, now);
        let headroom = self.headroom_rate(credit, lane_index, now, self.now_us());
        let frame_link_ms = if shared { FRAME_LINK_MS_SHARED } else { FRAME_LINK_MS };
        let lane = &mut self.lanes[lane_index];
        lane.last_sent_ms = now;
        let m = &self.metrics.lanes[lane_index];
        let first_seq = credit.sent().events;
        // A frame holds a fraction of the window. The receiver writes and
        // acknowledges a frame only once it has all of it, so a frame as
        // large as the window makes the route stop and wait every round
        // trip: the link idles while the last bytes travel, are written and
        // acknowledged (`edgebus bench wan` measured 0.69x of raw TCP at
        // 10 Mbit/s and 50 ms with 256 KiB frames in a 256 KiB window).
        let window = credit.window();
        let by_link = match self.bandwidth {
            0 => FRAME_BYTES_TARGET,
            bandwidth => bandwidth.saturating_mul(frame_link_ms) / 1000,
        };
        let frame_bytes_max =
            (window.bytes / FRAME_WINDOW_DIVISOR).min(by_link).clamp(FRAME_BYTES_MIN, FRAME_BYTES_TARGET);
        let frame_events_max = (window.events / FRAME_WINDOW_DIVISOR).max(1);
        let mut events = Vec::new();
        let mut bytes = 0u64;
        // Sent per topic, counted once per batch.
        let mut sent: Vec<(Arc<str>, u64)> = Vec::new();
        while let Some(item) = lane.buffer.front() {
            if !events.is_empty() && (bytes + item.bytes > frame_bytes_max || events.len() as u64 >= frame_events_max) {
                break;
            }
            if !credit.may_send(lane_index, item.bytes) {
                break;
            }
            let item = lane.buffer.pop_front().expect("checked");
            lane.buffer_bytes -= item.bytes;
            let seq = credit.on_sent(lane_index, item.bytes);
            lane.in_flight.push_back(InFlight {
                topic: Arc::clone(&item.topic),
                seq,
                position: item.position,
                bytes: item.bytes,
                sent_at_ms: now,
                timestamp_ms: item.timestamp_ms,
            });
            lane.in_flight_bytes += item.bytes;
            m.sent_events.fetch_add(1, Ordering::Relaxed);
            m.sent_bytes.fetch_add(item.bytes, Ordering::Relaxed);
            match sent.iter_mut().find(|(t, _)| Arc::ptr_eq(t, &item.topic) || **t == *item.topic) {
                Some((_, n)) => *n += 1,
                None => sent.push((Arc::clone(&item.topic), 1)),
            }
            bytes += item.bytes;
            events.push(item.event);
            if bytes > frame_bytes_max {
                break;
            }
        }
        if let Some(rate) = headroom {
            // Whatever the lane sent, inside its reservation or not, took
            // its time on the link.
            let now_us = self.now_us();
            self.headroom.spend(now_us, rate, bytes);
        }
        for (topic, n) in sent {
            self.metrics.count(&topic, |c| c.sent += n);
        }
        self.metrics.session_used_events.store(credit.sent().events, Ordering::Relaxed);
        // Nothing else to send: no lane has an event read ahead or more to
        // read. (`at_end` alone is not enough: a trickle's event is read and
        // sent before the lane ever finds the end, so it would never be set.)
        let end = *self.context.end.borrow();
        let app_limited = std::mem::take(&mut self.headroom_held)
            || self.lanes.iter().all(|l| l.buffer.is_empty() && (l.at_end || l.blocked || l.read_pos >= end));
        crate::wire::elide_repeats(&mut events);
        let batch = v1::LinkBatch {
            first_seq,
            lane: u32::try_from(lane_index).expect("at most LANES_MAX lanes"),
            events,
            echo: credit.echo(),
            app_limited,
        };
        v1::LinkFrame { kind: Some(v1::link_frame::Kind::Batch(batch)) }
    }

    /// Reads ahead for every lane that wants it, a bounded number of reads
    /// per call; true if some lane wants to read more at once.
    async fn refill(&mut self) -> Result<bool, String> {
        // One read per lane and call: a lane's new event (a critical one)
        // then waits for at most one read of another lane, not for eight;
        // the pump calls again at once while a lane wants more.
        const READS_PER_CALL: usize = 1;
        let history = Arc::clone(&self.context.policies.borrow());
        let acked: Vec<u64> = self.lanes.iter().map(Lane::acked_pos).collect();
        for i in (0..self.lanes.len()).cycle().take(self.lanes.len() * READS_PER_CALL) {
            if !self.lanes[i].wants_read() {
                continue;
            }
            let from = self.lanes[i].read_pos;
            if from >= *self.context.end.borrow() {
                self.lanes[i].at_end = true;
                continue;
            }
            let events = (self.context.site.read_log(from, READ_RECORDS, READ_BYTES).await)
                .map_err(|e| format!("cannot read the log at position {from}: {e}"))?;
            if events.is_empty() {
                self.lanes[i].at_end = true;
                continue;
            }
            self.take(i, events, &history, &acked);
        }
        Ok(self.lanes.iter().any(Lane::wants_read))
    }

    /// Applies policy to `events` read for lane `i` (in position order).
    fn take(&mut self, i: usize, events: Vec<RecordedEvent>, history: &PolicyHistory, acked: &[u64]) {
        let since = acked.iter().copied().min().unwrap_or(0);
        let route = &self.route;
        let metrics = &self.metrics;
        let lane = &mut self.lanes[i];
        // Compaction: the latest event per key within this read.
        let mut latest: HashMap<String, u64> = HashMap::new();
        let mut decided = Vec::with_capacity(events.len());
        for event in events {
            let decision = history.at(event.position).decide(route, &event);
            if let Decision::Send { lane: l, action, .. } = &decision
                && *l == i
                && let Some(key) = compact_key(action, &event)
            {
                latest.insert(key, event.position);
            }
            decided.push((event, decision));
        }
        for (event, decision) in decided {
            let position = event.position;
            // A policy change is in the log but not yet in the history this
            // lane decides with: wait for it, so that no event after the
            // change is decided under the old policy.
            if event.stream.as_str() == GATEWAY_STREAM
                && matches!(event.event_type.as_str(), TYPE_POLICY_SET | TYPE_POLICY_REMOVED)
                && history.versions.last().is_none_or(|(from, _)| *from < position)
            {
                lane.blocked = true;
                return;
            }
            let fresh = position >= lane.counted_to;
            lane.counted_to = lane.counted_to.max(position + 1);
            let count = |topic: &str, change: fn(&mut TopicCounts)| {
                if fresh {
                    metrics.count(topic, change);
                }
            };
            match decision {
                Decision::Skip => {}
                Decision::Drop { topic } => {
                    if i == 0 {
                        count(&topic, |c| c.dropped += 1);
                    }
                }
                Decision::Send { lane: l, .. } if l != i => {}
                Decision::Send { action, topic, .. } => {
                    // A stream that moved here from another lane waits until
                    // that lane has acknowledged everything before the change.
                    let moved = history.changes_between(since, position).any(|(at, before, _)| {
                        matches!(before.decide(route, &event), Decision::Send { lane: old, .. } if old != i && acked[old] < at)
                    });
                    if moved {
                        lane.blocked = true;
                        if fresh {
                            lane.counted_to = position;
                        }
                        return;
                    }
                    if let Some(key) = compact_key(&action, &event)
                        && latest.get(&key) != Some(&position)
                    {
                        count(&topic, |c| c.compacted += 1);
                        lane.read_pos = position + 1;
                        continue;
                    }
                    if let Action::SamplePer(ms) = action {
                        let bucket = event.timestamp_ms / ms;
                        let last = lane.last_bucket.get(event.stream.as_str()).copied();
                        if !sample_keeps(&action, &event, last) {
                            count(&topic, |c| c.sampled_out += 1);
                            lane.read_pos = position + 1;
                            continue;
                        }
                        if lane.last_bucket.len() >= SAMPLE_STREAMS_MAX {
                            lane.last_bucket.clear();
                        }
                        lane.last_bucket.insert(event.stream.as_str().to_owned(), bucket);
                    } else if !sample_keeps(&action, &event, None) {
                        count(&topic, |c| c.sampled_out += 1);
                        lane.read_pos = position + 1;
                        continue;
                    }
                    let item = to_item(event, &action, &self.context.site_name, topic);
                    *lane.queued.entry(Arc::clone(&item.topic)).or_default() += 1;
                    lane.buffer_bytes += item.bytes;
                    lane.buffer.push_back(item);
                }
            }
            lane.read_pos = position + 1;
        }
    }
}

fn to_item(event: RecordedEvent, action: &Action, site: &SiteName, topic: Arc<str>) -> Item {
    let (origin_site, origin_position) = match &event.origin {
        Some(origin) => (origin.site.to_string(), origin.position),
        None => (site.to_string(), event.position),
    };
    let inherited = event.origin.as_ref().map(|o| o.note.clone()).unwrap_or_default();
    let note = match (inherited.is_empty(), action.note()) {
        (true, note) => note,
        (false, note) if note.is_empty() => inherited,
        (false, note) => format!("{inherited}; {note}"),
    };
    let timestamp_ms = event.timestamp_ms;
    let position = event.position;
    let wire = v1::ReplicatedEvent {
        stream: event.stream.as_str().to_owned(),
        version: event.version,
        id: event.id.as_bytes().to_vec(),
        r#type: event.event_type.as_str().to_owned(),
        data: event.data,
        metadata: event.metadata,
        timestamp_ms,
        origin_site,
        origin_position,
        note,
    };
    let bytes = wire.encoded_len() as u64;
    Item { position, event: wire, bytes, timestamp_ms, topic }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use edgebus_store::{Store, StoreConfig};
    use edgebus_types::{EventId, EventType, NewEvent};

    use super::*;
    use crate::def::{PolicyDef, RouteDef};
    use crate::policy::PolicySet;

    fn route() -> Route {
        let def: RouteDef = serde_json::from_str(
            r#"{"remote_site":"us","addresses":["h:1"],"lanes":[{"name":"critical","reserved_permille":250},{"name":"bulk"}]}"#,
        )
        .unwrap();
        def.validate(&SiteName::new("eu").unwrap()).unwrap()
    }

    fn policy(pattern: &str, action: &str, lane: Option<&str>) -> crate::def::Policy {
        PolicyDef { pattern: pattern.into(), action: action.into(), lane: lane.map(Into::into), destinations: vec![] }
            .validate()
            .unwrap()
    }

    fn event(stream: &str, version: u64, position: u64, data: &str) -> RecordedEvent {
        let new = NewEvent {
            id: EventId::from_u128(u128::from(position) + 1),
            event_type: EventType::new("t").unwrap(),
            data: data.as_bytes().to_vec(),
            metadata: vec![],
            timestamp_ms: 1_000 + position,
        };
        RecordedEvent::new(StreamName::new(stream).unwrap(), version, position, new)
    }

    fn task(dir: &std::path::Path, history: PolicyHistory) -> RouteTask {
        let route = route();
        let store = Arc::new(Store::open(dir, StoreConfig::default()).unwrap());
        let (_, end) = watch::channel(100);
        let (_, policies) = watch::channel(Arc::new(history));
        let context = RouteContext {
            site: Arc::new(crate::site::LocalSite::new(store, end.clone())),
            site_name: SiteName::new("eu").unwrap(),
            gateway: "gw-eu".into(),
            term: 0,
            authority: Arc::new(Authority::new(Arc::new(crate::lease::driver::MonotonicClock::default()))),
            end,
            policies,
            settings: SenderSettings {
                heartbeat: Duration::from_millis(250),
                dead_after: Duration::from_secs(5),
                checkpoint_every: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(1),
            },
        };
        let metrics = Arc::new(RouteMetrics::new(&route));
        let lanes = (0..route.lanes.len())
            .map(|index| Lane {
                index,
                read_pos: 0,
                buffer: VecDeque::new(),
                buffer_bytes: 0,
                in_flight: VecDeque::new(),
                in_flight_bytes: 0,
                queued: HashMap::new(),
                blocked: false,
                last_bucket: HashMap::new(),
                read_ahead: Amount::new(4096, 1 << 22),
                at_end: false,
                counted_to: 0,
                last_sent_ms: 0,
            })
            .collect();
        RouteTask::new(route, context, metrics, lanes, vec![0, 0])
    }

    fn positions(lane: &Lane) -> Vec<u64> {
        lane.buffer.iter().map(|i| i.position).collect()
    }

    #[test]
    fn a_lane_counts_each_start_of_a_wait_by_reason() {
        let m = LaneMetrics::default();
        for reason in [stall::NO_CREDIT, stall::NO_CREDIT, stall::NONE, stall::NO_CREDIT, stall::LANE_CAP, stall::NONE]
        {
            m.set_stall(reason);
        }
        assert_eq!(m.stalls[usize::from(stall::NO_CREDIT)].load(Ordering::Relaxed), 2, "two credit stalls");
        assert_eq!(m.stalls[usize::from(stall::LANE_CAP)].load(Ordering::Relaxed), 1);
        assert_eq!(m.stalls[usize::from(stall::NONE)].load(Ordering::Relaxed), 0, "moving is not a stall");
        assert_eq!(m.stall.load(Ordering::Relaxed), stall::NONE);
    }

    /// A sender with the task's lanes, granted `window` from sequence 0.
    fn granted(task: &RouteTask, window: Amount) -> CreditSender {
        let shares = task.route.lanes.iter().map(|l| LaneShare { reserved_permille: l.reserved_permille, cap: l.cap });
        let mut credit = CreditSender::new(shares.collect());
        let grant = Grant { up_to: window, durable: Amount::ZERO, window, ping: 1, ping_sent_ms: 0, pace_bytes: 0 };
        credit.on_grant(&grant).unwrap();
        credit
    }

    #[test]
    fn a_frame_says_app_limited_once_every_lane_has_read_to_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = PolicyHistory::default();
        history.push(0, PolicySet { rules: vec![policy("critical.>", "replicate", Some("critical"))] });
        let mut task = task(dir.path(), history.clone());
        let mut credit = granted(&task, Amount::new(100, 1 << 20));
        let app_limited = |frame: v1::LinkFrame| match frame.kind {
            Some(v1::link_frame::Kind::Batch(batch)) => (batch.events.len(), batch.app_limited),
            other => panic!("not a batch: {other:?}"),
        };
        // The log ends at 100 (the task's end). The critical lane read its
        // event at 98 and sends it; the bulk lane has only read to 50.
        task.take(0, vec![event("critical.a", 0, 98, "{}")], &history, &[0, 0]);
        task.lanes[1].read_pos = 50;
        assert_eq!(app_limited(task.build_batch(&mut credit, 0)), (1, false), "the bulk lane has more to read");
        // A trickle: the event at 99 is read and sent at once, before
        // either lane ever found the end (`at_end` stays false) ...
        task.take(0, vec![event("critical.a", 1, 99, "{}")], &history, &[0, 0]);
        task.lanes[1].read_pos = 100;
        assert!(!task.lanes[0].at_end && !task.lanes[1].at_end);
        // ... and still, nothing more is there to send.
        assert_eq!(app_limited(task.build_batch(&mut credit, 0)), (1, true));
    }

    /// A task with a critical and a bulk lane on a 10 MB/s link, the bulk
    /// lane holding 200 events of about 1 KB read ahead.
    fn bulk_beside_critical(dir: &std::path::Path) -> (RouteTask, PolicyHistory) {
        let mut history = PolicyHistory::default();
        let rules =
            vec![policy("critical.>", "replicate", Some("critical")), policy("bulk.>", "replicate", Some("bulk"))];
        history.push(0, PolicySet { rules });
        let mut task = task(dir, history.clone());
        task.bandwidth = 10_000_000;
        let data = format!("{{\"p\":\"{}\"}}", "x".repeat(1000));
        let bulk: Vec<_> = (0..200).map(|p| event("bulk.a", p, p, &data)).collect();
        task.take(1, bulk, &history, &[0, 0]);
        (task, history)
    }

    #[test]
    fn frames_are_shorter_while_another_lane_is_active() {
        let dir = tempfile::tempdir().unwrap();
        let (mut task, history) = bulk_beside_critical(dir.path());
        let mut credit = granted(&task, Amount::new(10_000, 64 << 20));
        // 10 MB/s: 5 ms of the link is 50,000 bytes, 2 ms 20,000.
        let bytes = |frame: v1::LinkFrame| match frame.kind {
            Some(v1::link_frame::Kind::Batch(batch)) => batch.events.iter().map(|e| e.encoded_len()).sum::<usize>(),
            other => panic!("not a batch: {other:?}"),
        };
        let alone = bytes(task.build_batch(&mut credit, 1));
        assert!((45_000..=56_000).contains(&alone), "bulk alone: 5 ms frames, got {alone} bytes");
        task.take(0, vec![event("critical.a", 0, 200, "{}")], &history, &[0, 0]);
        bytes(task.build_batch(&mut credit, 0));
        let beside = bytes(task.build_batch(&mut credit, 1));
        assert!((15_000..=23_000).contains(&beside), "bulk beside critical: 2 ms frames, got {beside} bytes");
        // Once the other lane has been quiet long enough, long frames again.
        task.lanes[0].last_sent_ms = now_ms() - LANE_ACTIVE_MS;
        let again = bytes(task.build_batch(&mut credit, 1));
        assert!((45_000..=56_000).contains(&again), "bulk alone again: 5 ms frames, got {again} bytes");
    }

    #[test]
    fn the_headroom_holds_a_pool_lane_beside_an_active_lane_and_its_next_frame_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (mut task, history) = bulk_beside_critical(dir.path());
        // 10 MB/s, a pace far above anything sent here; the task's clock
        // started a second ago, so the bucket is full (18,000 bytes).
        task.clock -= Duration::from_secs(1);
        let mut credit = granted(&task, Amount::new(10_000, 64 << 20));
        let window = Amount::new(10_000, 64 << 20);
        let paced =
            Grant { up_to: window, durable: Amount::ZERO, window, ping: 2, ping_sent_ms: 0, pace_bytes: 1 << 30 };
        credit.on_grant(&paced).unwrap();
        let flagged = |frame: v1::LinkFrame| match frame.kind {
            Some(v1::link_frame::Kind::Batch(batch)) => batch.app_limited,
            other => panic!("not a batch: {other:?}"),
        };
        let stall = |task: &RouteTask| task.metrics.lanes[1].stall.load(Ordering::Relaxed);
        // Alone, the bulk lane is not held, however much it sends.
        for _ in 0..3 {
            assert_eq!(task.next_lane(&credit), (Some(1), None));
            assert!(!flagged(task.build_batch(&mut credit, 1)));
        }
        // Beside an active critical lane, one 2 ms frame empties the bucket ...
        task.take(0, vec![event("critical.a", 0, 200, "{}")], &history, &[0, 0]);
        assert!(!flagged(task.build_batch(&mut credit, 0)));
        assert_eq!(task.next_lane(&credit), (Some(1), None));
        assert!(!flagged(task.build_batch(&mut credit, 1)));
        // ... and the lane waits for it to refill, as `headroom`.
        let (next, wait) = task.next_lane(&credit);
        assert_eq!(next, None);
        assert!(wait.is_some_and(|w| w > Duration::ZERO && w <= Duration::from_millis(3)), "{wait:?}");
        assert_eq!(stall(&task), stall::HEADROOM);
        // Once it has, the next frame says the sender held back ...
        task.clock -= Duration::from_millis(10);
        assert_eq!(task.next_lane(&credit), (Some(1), None));
        assert!(flagged(task.build_batch(&mut credit, 1)));
        // ... and only that one.
        task.clock -= Duration::from_millis(10);
        assert!(!flagged(task.build_batch(&mut credit, 1)));
    }

    #[test]
    fn a_stream_moving_lanes_waits_until_the_old_lane_passed_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = PolicyHistory::default();
        history.push(0, PolicySet::default());
        history.push(5, PolicySet { rules: vec![policy("alerts.>", "replicate", Some("bulk"))] });
        let mut task = task(dir.path(), history.clone());
        let events: Vec<_> = (0..10).map(|p| event("alerts.a", p, p, "{}")).collect();
        // Bulk reads first: the old lane (critical) has acknowledged nothing.
        task.take(1, events.clone(), &history, &[0, 0]);
        assert!(task.lanes[1].blocked, "bulk waits at the change");
        assert_eq!(task.lanes[1].read_pos, 5);
        assert!(positions(&task.lanes[1]).is_empty());
        task.take(0, events.clone(), &history, &[0, 0]);
        assert_eq!(positions(&task.lanes[0]), vec![0, 1, 2, 3, 4], "critical sends what came before the change");
        // Once critical has acknowledged past the change, bulk goes on.
        task.lanes[1].blocked = false;
        task.take(1, events[5..].to_vec(), &history, &[6, 0]);
        assert!(!task.lanes[1].blocked);
        assert_eq!(positions(&task.lanes[1]), vec![5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_lane_waits_at_a_policy_change_its_history_does_not_know_yet() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = PolicyHistory::default();
        history.push(0, PolicySet::default());
        let mut task = task(dir.path(), history.clone());
        let mut events: Vec<_> = (0..3).map(|p| event("telemetry.t", p, p, "{}")).collect();
        let command = NewEvent {
            id: EventId::from_u128(99),
            event_type: EventType::new(TYPE_POLICY_SET).unwrap(),
            data: br#"{"pattern":"telemetry.>","action":"drop"}"#.to_vec(),
            metadata: vec![],
            timestamp_ms: 1,
        };
        events.push(RecordedEvent::new(StreamName::system(GATEWAY_STREAM).unwrap(), 0, 3, command));
        events.extend((4..6).map(|p| event("telemetry.t", p - 1, p, "{}")));
        task.take(0, events.clone(), &history, &[0, 0]);
        assert!(task.lanes[0].blocked, "the lane waits for the change at position 3");
        assert_eq!(task.lanes[0].read_pos, 3);
        assert_eq!(positions(&task.lanes[0]), vec![0, 1, 2]);
        // Once the history has it, the events after it follow the new policy.
        history.push(3, PolicySet { rules: vec![policy("telemetry.>", "drop", None)] });
        task.lanes[0].blocked = false;
        task.take(0, events[3..].to_vec(), &history, &[0, 0]);
        assert!(!task.lanes[0].blocked);
        assert_eq!(positions(&task.lanes[0]), vec![0, 1, 2], "dropped after the change");
        assert_eq!(task.lanes[0].read_pos, 6);
    }

    #[test]
    fn sampling_compaction_and_drops_are_counted_once_per_position() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = PolicyHistory::default();
        history.push(
            0,
            PolicySet {
                rules: vec![
                    policy("telemetry.>", "sample 1/4", Some("bulk")),
                    policy("state.>", "compact", Some("bulk")),
                    policy("junk.>", "drop", None),
                ],
            },
        );
        let mut task = task(dir.path(), history.clone());
        let mut events = Vec::new();
        for v in 0..8 {
            events.push(event("telemetry.t", v, events.len() as u64, "{}"));
        }
        for v in 0..3 {
            events.push(event("state.s", v, events.len() as u64, "{}"));
        }
        events.push(event("junk.j", 0, events.len() as u64, "{}"));
        for _ in 0..2 {
            // The second pass is a re-read after a reconnect: counted once.
            task.lanes[1].rewind();
            task.lanes[1].read_pos = 0;
            task.lanes[0].read_pos = 0;
            task.take(1, events.clone(), &history, &[0, 0]);
            task.take(0, events.clone(), &history, &[0, 0]);
        }
        let kept: Vec<(String, u64, String)> = task.lanes[1]
            .buffer
            .iter()
            .map(|i| (i.event.stream.clone(), i.event.version, i.event.note.clone()))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("telemetry.t".into(), 0, "sampled 1/4".into()),
                ("telemetry.t".into(), 4, "sampled 1/4".into()),
                ("state.s".into(), 2, "compacted".into()),
            ]
        );
        let topics = task.metrics.topics.lock().clone();
        assert_eq!(topics["telemetry.>"].sampled_out, 6);
        assert_eq!(topics["state.>"].compacted, 2);
        assert_eq!(topics["junk.>"].dropped, 1);
        assert!(task.lanes[0].buffer.is_empty(), "nothing for the critical lane");
        // What waits is counted per topic, once, until it leaves (here: a
        // rewind, as when a session ends).
        task.publish_positions();
        let queued = task.metrics.topics_queued.lock().clone();
        assert_eq!(queued, BTreeMap::from([("telemetry.>".to_owned(), 2), ("state.>".to_owned(), 1)]));
        task.lanes[1].rewind();
        task.publish_positions();
        assert!(task.metrics.topics_queued.lock().is_empty());
    }
}
