//! The node's metrics: counters, gauges and a latency histogram that the
//! request handlers update with atomic adds, per-pattern subscription
//! figures, and their two readings: the Prometheus text of `GET /metrics`
//! ([`Metrics::render`]) and [`NodeStats`], the figures of `GET /v1/stats`,
//! the `Stats` rpc and `edgebus stats`, gathered by one function
//! ([`NodeStats::gather`]) so the three always agree.
//!
//! Lifecycle: one [`Metrics`] per node, created with its `NodeState` and
//! dropped with it; everything counts since the node started. A subscription
//! holds a [`SubscriptionMetrics`] from open to close. A scrape reads the
//! atomics and asks the log and the store for their counters and queues
//! (each a short lock), so it never waits for a write.
//!
//! Label cardinality is bounded: an `outcome` is one of a fixed set (`ok`,
//! the exists-or-write answers, the stable error codes), and at most
//! [`PATTERNS_MAX`] subscription patterns are labelled, the rest adding up
//! under `pattern="_other"`. A pattern with no open subscription is
//! forgotten when room is needed for a new one. The ingest quotas' series
//! (`edgebus_quota_*{pattern}`) are one per configured quota, at most
//! `NODE_QUOTAS_MAX`; the connection figures (`edgebus_connections_*`) one
//! per transport.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edgebus_gateway::health::State as RouteHealth;
use edgebus_proto::v1;
use edgebus_store::Store;
use serde_json::{Value, json};

use crate::limits::ConnectionLimiter;
use crate::quota::QuotaFigures;
use crate::state::NodeState;

/// Most subscription patterns labelled one by one; the rest are counted
/// under [`PATTERN_OTHER`].
pub const PATTERNS_MAX: usize = 256;

/// The `pattern` label of the subscriptions beyond [`PATTERNS_MAX`]. A
/// subscription to a stream literally named `_other` is counted there too.
pub const PATTERN_OTHER: &str = "_other";

/// Upper bounds of the append latency histogram's buckets, in nanoseconds:
/// 100 µs to 10 s, roughly ×2.5 apart (Prometheus' usual steps).
pub const APPEND_LATENCY_BUCKETS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Backpressure turns to `throttled` when a queue holds more than this
/// share of its capacity, in percent.
pub const THROTTLED_PERCENT: u64 = 80;

/// The content type of `GET /metrics`: Prometheus text exposition 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can be left half-updated by a panic: a counter or a list
    // of lag cells is consistent after every single operation.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a write request ended: the `outcome` label of the write counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An append was written, or found already written (an idempotent retry).
    Ok,
    /// Exists-or-write wrote the event.
    Written,
    /// Exists-or-write found the same event at that version.
    ExistsSame,
    /// Exists-or-write found a different event at that version.
    ExistsDifferent,
    /// Refused with this stable wire code (`edgebus.v1.ErrorCode`).
    Refused(u32),
}

/// Slots of the outcome counters: the four successes, wire codes 1..=23
/// (the store's codes and room to grow), 100..=107 (the wire-only codes),
/// and one for any other number.
const OUTCOME_SLOTS: usize = 4 + 23 + 8 + 1;
const STORE_CODES_MAX: u32 = 23;
const WIRE_CODES_FIRST: u32 = 100;
const WIRE_CODES_LAST: u32 = 107;

impl Outcome {
    fn slot(self) -> usize {
        match self {
            Self::Ok => 0,
            Self::Written => 1,
            Self::ExistsSame => 2,
            Self::ExistsDifferent => 3,
            Self::Refused(code @ 1..=STORE_CODES_MAX) => 3 + code as usize,
            Self::Refused(code @ WIRE_CODES_FIRST..=WIRE_CODES_LAST) => {
                4 + STORE_CODES_MAX as usize + (code - WIRE_CODES_FIRST) as usize
            }
            Self::Refused(_) => OUTCOME_SLOTS - 1,
        }
    }

    /// The label value of a slot: `ok`, `written`, `exists_same`,
    /// `exists_different`, the code's name in lower case
    /// (`wrong_expected_version`), `code_N` for a number without a name, or
    /// `unknown`.
    fn slot_label(slot: usize) -> String {
        let code = match slot {
            0 => return "ok".to_owned(),
            1 => return "written".to_owned(),
            2 => return "exists_same".to_owned(),
            3 => return "exists_different".to_owned(),
            slot if slot == OUTCOME_SLOTS - 1 => return "unknown".to_owned(),
            slot if slot <= 3 + STORE_CODES_MAX as usize => slot as u32 - 3,
            slot => slot as u32 - 4 - STORE_CODES_MAX + WIRE_CODES_FIRST,
        };
        match i32::try_from(code).ok().and_then(|c| v1::ErrorCode::try_from(c).ok()) {
            Some(v1::ErrorCode::Unspecified) | None => format!("code_{code}"),
            Some(known) => known.as_str_name().trim_start_matches("ERROR_CODE_").to_ascii_lowercase(),
        }
    }
}

/// Requests, events and payload bytes of one outcome.
#[derive(Debug, Default)]
struct OutcomeCounters {
    requests: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
}

/// Write counters by outcome.
#[derive(Debug)]
struct WriteCounters {
    slots: [OutcomeCounters; OUTCOME_SLOTS],
}

impl Default for WriteCounters {
    fn default() -> Self {
        Self { slots: std::array::from_fn(|_| OutcomeCounters::default()) }
    }
}

impl WriteCounters {
    fn record(&self, outcome: Outcome, events: u64, bytes: u64) {
        let slot = &self.slots[outcome.slot()];
        slot.requests.fetch_add(1, Ordering::Relaxed);
        slot.events.fetch_add(events, Ordering::Relaxed);
        slot.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `(label, requests, events, bytes)` of the slots in `always` and of
    /// every other slot that counted something.
    fn rows(&self, always: &[Outcome]) -> Vec<(String, u64, u64, u64)> {
        let always: Vec<usize> = always.iter().map(|o| o.slot()).collect();
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, counters)| {
                let requests = counters.requests.load(Ordering::Relaxed);
                (requests > 0 || always.contains(&slot)).then(|| {
                    let events = counters.events.load(Ordering::Relaxed);
                    let bytes = counters.bytes.load(Ordering::Relaxed);
                    (Outcome::slot_label(slot), requests, events, bytes)
                })
            })
            .collect()
    }
}

/// A latency histogram with fixed buckets ([`APPEND_LATENCY_BUCKETS_NS`]).
#[derive(Debug)]
struct Histogram {
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; APPEND_LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0) }
    }
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound is at or above the value (`le`).
        let index = APPEND_LATENCY_BUCKETS_NS.partition_point(|bound| *bound < ns);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HistogramSnapshot {
    buckets: [u64; APPEND_LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: u64,
}

impl HistogramSnapshot {
    /// The count is the buckets' sum, so `+Inf` always equals it even while
    /// observations land during the read.
    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q` quantile in nanoseconds, estimated as Prometheus'
    /// `histogram_quantile` does: linear within the bucket that holds the
    /// rank, the highest finite bound if that is `+Inf`; 0 when empty.
    fn quantile_ns(&self, q: f64) -> f64 {
        let count = self.count();
        if count == 0 {
            return 0.0;
        }
        let rank = q.clamp(0.0, 1.0) * count as f64;
        let mut below = 0u64;
        for (index, observed) in self.buckets.iter().enumerate() {
            let through = below + observed;
            if *observed > 0 && through as f64 >= rank {
                let Some(upper) = APPEND_LATENCY_BUCKETS_NS.get(index) else {
                    return *APPEND_LATENCY_BUCKETS_NS.last().expect("buckets") as f64;
                };
                let lower = if index == 0 { 0 } else { APPEND_LATENCY_BUCKETS_NS[index - 1] };
                let within = ((rank - below as f64) / *observed as f64).clamp(0.0, 1.0);
                return lower as f64 + (upper - lower) as f64 * within;
            }
            below = through;
        }
        *APPEND_LATENCY_BUCKETS_NS.last().expect("buckets") as f64
    }
}

/// The figures of one subscription pattern. Shared by the registry and the
/// handles of that pattern's subscriptions.
#[derive(Debug, Default)]
struct PatternEntry {
    /// Open subscriptions; changed only with the registry's lock held when
    /// going up, so that forgetting an idle entry cannot race an open.
    open: AtomicU64,
    delivered: AtomicU64,
    fell_behind: AtomicU64,
    predicate_errors: AtomicU64,
    /// The lag cell of each open subscription (one per handle).
    lags: Mutex<Vec<Arc<AtomicU64>>>,
}

impl PatternEntry {
    fn max_lag(&self) -> u64 {
        lock(&self.lags).iter().map(|lag| lag.load(Ordering::Relaxed)).max().unwrap_or(0)
    }

    fn ever_used(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
            || self.delivered.load(Ordering::Relaxed) > 0
            || self.fell_behind.load(Ordering::Relaxed) > 0
            || self.predicate_errors.load(Ordering::Relaxed) > 0
    }
}

/// The subscription patterns seen, at most [`PATTERNS_MAX`] plus `_other`.
#[derive(Debug, Default)]
struct Subscriptions {
    patterns: Mutex<BTreeMap<String, Arc<PatternEntry>>>,
    other: Arc<PatternEntry>,
}

impl Subscriptions {
    fn open(&self, pattern: &str) -> SubscriptionMetrics {
        let mut patterns = lock(&self.patterns);
        let entry = if pattern == PATTERN_OTHER {
            Arc::clone(&self.other)
        } else if let Some(entry) = patterns.get(pattern) {
            Arc::clone(entry)
        } else {
            if patterns.len() >= PATTERNS_MAX {
                // Forget the patterns nobody subscribes to any more; their
                // counters restart if they come back.
                patterns.retain(|_, entry| entry.open.load(Ordering::Relaxed) > 0);
            }
            if patterns.len() < PATTERNS_MAX {
                let entry = Arc::new(PatternEntry::default());
                patterns.insert(pattern.to_owned(), Arc::clone(&entry));
                entry
            } else {
                Arc::clone(&self.other)
            }
        };
        entry.open.fetch_add(1, Ordering::Relaxed);
        drop(patterns);
        let lag = Arc::new(AtomicU64::new(0));
        lock(&entry.lags).push(Arc::clone(&lag));
        SubscriptionMetrics { entry, lag }
    }

    /// `(pattern, entry)` for every labelled pattern, then `_other` if it was
    /// ever used.
    fn entries(&self) -> Vec<(String, Arc<PatternEntry>)> {
        let mut entries: Vec<_> =
            lock(&self.patterns).iter().map(|(pattern, entry)| (pattern.clone(), Arc::clone(entry))).collect();
        if self.other.ever_used() {
            entries.push((PATTERN_OTHER.to_owned(), Arc::clone(&self.other)));
        }
        entries
    }

    fn open_count(&self) -> u64 {
        let labelled: u64 = lock(&self.patterns).values().map(|entry| entry.open.load(Ordering::Relaxed)).sum();
        labelled + self.other.open.load(Ordering::Relaxed)
    }
}

/// Handle held by one subscription; dropping it marks the subscription
/// closed (gauge decremented).
#[derive(Debug)]
pub struct SubscriptionMetrics {
    entry: Arc<PatternEntry>,
    lag: Arc<AtomicU64>,
}

impl SubscriptionMetrics {
    /// Counts `events` sent to the subscriber.
    pub fn delivered(&self, events: u64) {
        self.entry.delivered.fetch_add(events, Ordering::Relaxed);
    }

    /// Sets this subscription's lag: the log's end minus the subscription's
    /// next position.
    pub fn set_lag(&self, positions: u64) {
        self.lag.store(positions, Ordering::Relaxed);
    }

    /// Counts one fall back from live mode to catching up from the log.
    pub fn fell_behind(&self) {
        self.entry.fell_behind.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one CEL predicate that failed on an event.
    pub fn predicate_error(&self) {
        self.entry.predicate_errors.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for SubscriptionMetrics {
    fn drop(&mut self) {
        // The lag goes first, so a scrape never sees a closed subscription's lag.
        lock(&self.entry.lags).retain(|lag| !Arc::ptr_eq(lag, &self.lag));
        let before = self.entry.open.fetch_sub(1, Ordering::Relaxed);
        assert!(before > 0, "a subscription is closed once");
    }
}

/// Counters, gauges and histograms of one node (see the module docs).
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    appends: WriteCounters,
    exists_or_write: WriteCounters,
    append_latency: Histogram,
    reads: AtomicU64,
    read_events: AtomicU64,
    subscriptions: Subscriptions,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            appends: WriteCounters::default(),
            exists_or_write: WriteCounters::default(),
            append_latency: Histogram::default(),
            reads: AtomicU64::new(0),
            read_events: AtomicU64::new(0),
            subscriptions: Subscriptions::default(),
        }
    }
}

impl Metrics {
    /// Counts one append request: `Ok` or `Refused`, with the events it
    /// carried and their payload bytes (data plus metadata) as far as the
    /// request was read (0 for a body that did not parse).
    pub fn record_append(&self, outcome: Outcome, events: u64, payload_bytes: u64) {
        self.appends.record(outcome, events, payload_bytes);
    }

    /// Counts one exists-or-write request: `Written`, `ExistsSame`,
    /// `ExistsDifferent` or `Refused`, with its event's payload bytes.
    pub fn record_exists_or_write(&self, outcome: Outcome, payload_bytes: u64) {
        self.exists_or_write.record(outcome, 1, payload_bytes);
    }

    /// Observes the latency of one append or exists-or-write store call
    /// (queueing, validation and the durable write; not the request's parsing).
    pub fn record_append_latency(&self, elapsed: Duration) {
        self.append_latency.observe(elapsed);
    }

    /// Counts one read of a stream's events or of `$all` that reached the
    /// store and, if it succeeded, the events it returned.
    pub fn record_read(&self, events: Option<u64>) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(events) = events {
            self.read_events.fetch_add(events, Ordering::Relaxed);
        }
    }

    /// Registers an open subscription whose filter is described by `pattern` (a stream name, a pattern such as `orders.*`, or `*` for all).
    pub fn subscription_opened(&self, pattern: &str) -> SubscriptionMetrics {
        self.subscriptions.open(pattern)
    }

    /// Open subscriptions, all patterns together.
    pub fn subscriptions_open(&self) -> u64 {
        self.subscriptions.open_count()
    }

    /// Time since the node started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Append latency quantiles since start, in milliseconds: `(p50, p99)`.
    pub fn append_latency_ms_p50_p99(&self) -> (f64, f64) {
        let snapshot = self.append_latency.snapshot();
        (snapshot.quantile_ns(0.5) / 1e6, snapshot.quantile_ns(0.99) / 1e6)
    }

    /// Everything in Prometheus text exposition format 0.0.4, with the
    /// node's figures gathered now. Takes the log's and the store's queue
    /// locks for a moment: call it off the async workers.
    pub fn render(&self, state: &NodeState) -> String {
        self.render_with(&NodeStats::gather(state))
    }

    /// Everything in Prometheus text exposition format 0.0.4, with the
    /// node's figures `stats` (gathered by [`NodeStats::gather`]).
    pub fn render_with(&self, stats: &NodeStats) -> String {
        let mut out = Exposition::default();
        out.gauge("edgebus_uptime_seconds", "Seconds since the node started.", stats.uptime_s);

        out.family("edgebus_appends_total", "counter", "Append requests, by outcome (ok or the refusal's error code).");
        let appends = self.appends.rows(&[Outcome::Ok]);
        for (outcome, requests, _, _) in &appends {
            out.sample("edgebus_appends_total", &[("outcome", outcome)], requests);
        }
        out.family("edgebus_append_events_total", "counter", "Events carried by append requests, by outcome.");
        for (outcome, _, events, _) in &appends {
            out.sample("edgebus_append_events_total", &[("outcome", outcome)], events);
        }
        out.family(
            "edgebus_append_bytes_total",
            "counter",
            "Payload bytes (data and metadata) carried by append requests, by outcome.",
        );
        for (outcome, _, _, bytes) in &appends {
            out.sample("edgebus_append_bytes_total", &[("outcome", outcome)], bytes);
        }
        out.family(
            "edgebus_exists_or_write_total",
            "counter",
            "Exists-or-write requests, by outcome (written, exists_same, exists_different or an error code).",
        );
        let answers = [Outcome::Written, Outcome::ExistsSame, Outcome::ExistsDifferent];
        for (outcome, requests, _, _) in self.exists_or_write.rows(&answers) {
            out.sample("edgebus_exists_or_write_total", &[("outcome", &outcome)], requests);
        }
        self.render_latency(&mut out);
        let reads = self.reads.load(Ordering::Relaxed);
        out.counter("edgebus_reads_total", "Reads of a stream's events or of $all that reached the store.", reads);
        out.counter("edgebus_read_events_total", "Events returned by reads.", self.read_events.load(Ordering::Relaxed));

        out.counter("edgebus_log_appends_total", "Appends the log completed.", stats.appends);
        out.counter("edgebus_log_records_total", "Records the log wrote.", stats.records);
        out.counter(
            "edgebus_log_bytes_written_total",
            "Bytes the log wrote to segment files, framing included.",
            stats.bytes_written,
        );
        out.counter("edgebus_log_batches_total", "Write batches (group commits) of the log.", stats.batches);
        out.counter("edgebus_log_fsyncs_total", "fdatasync calls on segment files.", stats.fsyncs);
        out.counter("edgebus_log_rolls_total", "Segment rolls.", stats.rolls);
        out.gauge("edgebus_log_start_position", "The log's first position still present.", stats.start_position);
        out.gauge("edgebus_log_end_position", "One past the log's last acknowledged position.", stats.end_position);
        out.gauge("edgebus_log_queue_appends", "Appends waiting for the log's writer thread.", stats.log_queue_appends);
        out.gauge(
            "edgebus_log_queue_bytes",
            "Payload bytes waiting for the log's writer thread.",
            stats.log_queue_bytes,
        );
        out.gauge(
            "edgebus_log_unacknowledged_records",
            "Records the log gave positions to but has not acknowledged yet.",
            stats.log_records_unacknowledged,
        );
        out.gauge(
            "edgebus_store_queue_requests",
            "Write requests waiting for the store's sequencer.",
            stats.store_queue_requests,
        );
        out.gauge(
            "edgebus_index_tail_changes",
            "Index changes written to the log but not yet to the index (the store's in-memory tail).",
            stats.index_tail,
        );
        out.gauge("edgebus_index_tables", "Table files of the index.", stats.index_tables);
        out.gauge(
            "edgebus_index_pinned_bytes",
            "Filters and block indexes the index's tables keep in memory.",
            stats.index_pinned_bytes,
        );
        out.gauge("edgebus_index_cache_bytes", "Blocks in the index's block cache.", stats.index_cache_bytes);
        out.gauge(
            "edgebus_local_queue",
            "Events accepted but not yet durable (unacknowledged log records plus queued store requests).",
            stats.local_queue,
        );
        out.gauge(
            "edgebus_wan_queue",
            "Events read ahead or in flight on the gateway's routes (bounded by their windows).",
            stats.wan_queue,
        );
        out.counter("edgebus_dropped_total", "Events dropped by the gateway's topic policies.", stats.dropped);
        out.family(
            "edgebus_backpressure",
            "gauge",
            "1 for the site's backpressure state, the worst of the node's write queues and the gateway's routes: healthy, throttled (a queue above 80% full, or a route moving at the pace its credit allows) or stalled (no writes taken, or a route stalled).",
        );
        for state in [Backpressure::Healthy, Backpressure::Throttled, Backpressure::Stalled] {
            out.sample("edgebus_backpressure", &[("state", state.as_str())], u8::from(stats.backpressure == state));
        }
        self.render_subscriptions(&mut out);
        render_quotas(&mut out, &stats.quotas);
        render_connections(&mut out, &stats.connections);
        out.text
    }

    fn render_latency(&self, out: &mut Exposition) {
        const NAME: &str = "edgebus_append_duration_seconds";
        out.family(
            NAME,
            "histogram",
            "Latency of append and exists-or-write store calls, from request to durable answer.",
        );
        let snapshot = self.append_latency.snapshot();
        let mut cumulative = 0;
        for (bound_ns, observed) in APPEND_LATENCY_BUCKETS_NS.iter().zip(&snapshot.buckets) {
            cumulative += observed;
            let le = seconds(*bound_ns).to_string();
            out.sample(&format!("{NAME}_bucket"), &[("le", &le)], cumulative);
        }
        let count = snapshot.count();
        out.sample(&format!("{NAME}_bucket"), &[("le", "+Inf")], count);
        out.sample(&format!("{NAME}_sum"), &[], seconds(snapshot.sum_ns));
        out.sample(&format!("{NAME}_count"), &[], count);
    }

    fn render_subscriptions(&self, out: &mut Exposition) {
        let entries = self.subscriptions.entries();
        let families: [PatternFamily; 5] = [
            ("edgebus_subscriptions", "gauge", "Open subscriptions, by stream pattern.", |e| {
                e.open.load(Ordering::Relaxed)
            }),
            (
                "edgebus_subscription_events_delivered_total",
                "counter",
                "Events sent to subscribers, by stream pattern.",
                |e| e.delivered.load(Ordering::Relaxed),
            ),
            (
                "edgebus_subscription_lag_positions",
                "gauge",
                "Largest lag (log end minus next position) among a pattern's open subscriptions.",
                PatternEntry::max_lag,
            ),
            (
                "edgebus_subscription_fell_behind_total",
                "counter",
                "Subscriptions that left live mode to catch up from the log, by stream pattern.",
                |e| e.fell_behind.load(Ordering::Relaxed),
            ),
            (
                "edgebus_subscription_predicate_errors_total",
                "counter",
                "CEL predicates that failed on an event, by stream pattern.",
                |e| e.predicate_errors.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in families {
            out.family(name, kind, help);
            for (pattern, entry) in &entries {
                out.sample(name, &[("pattern", pattern)], value(entry));
            }
        }
    }
}

/// The ingest quotas' figures, one series per pattern (their number is
/// bounded by `NODE_QUOTAS_MAX`).
fn render_quotas(out: &mut Exposition, quotas: &[QuotaFigures]) {
    let families: [QuotaFamily; 5] = [
        ("edgebus_quota_admitted_events_total", "Events admitted by an ingest quota, by its pattern.", |q| {
            q.admitted_events
        }),
        (
            "edgebus_quota_admitted_bytes_total",
            "Payload bytes (data and metadata) admitted by an ingest quota, by its pattern.",
            |q| q.admitted_bytes,
        ),
        (
            "edgebus_quota_rejected_requests_total",
            "Writes an ingest quota refused (RESOURCE_EXHAUSTED), by its pattern.",
            |q| q.rejected_requests,
        ),
        ("edgebus_quota_rejected_events_total", "Events of the writes an ingest quota refused, by its pattern.", |q| {
            q.rejected_events
        }),
        (
            "edgebus_quota_rejected_bytes_total",
            "Payload bytes of the writes an ingest quota refused, by its pattern.",
            |q| q.rejected_bytes,
        ),
    ];
    for (name, help, value) in families {
        out.family(name, "counter", help);
        for quota in quotas {
            out.sample(name, &[("pattern", &quota.pattern)], value(quota));
        }
    }
}

/// Each listener's open connections, cap and refusals.
fn render_connections(out: &mut Exposition, connections: &[ConnectionFigures]) {
    let families: [ConnectionFamily; 3] = [
        ("edgebus_connections_open", "gauge", "Connections a listener serves now, by transport.", |c| c.open),
        ("edgebus_connections_max", "gauge", "Most connections a listener serves at once, by transport.", |c| c.max),
        (
            "edgebus_connections_rejected_total",
            "counter",
            "Connections refused because the listener's cap was reached, by transport.",
            |c| c.rejected,
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        for listener in connections {
            out.sample(name, &[("transport", &listener.transport)], value(listener));
        }
    }
}

/// A connection family: name, type, help and how to read a listener's figures.
type ConnectionFamily = (&'static str, &'static str, &'static str, fn(&ConnectionFigures) -> u64);

/// A quota family: name, help and how to read a quota's figures.
type QuotaFamily = (&'static str, &'static str, fn(&QuotaFigures) -> u64);

/// A per-pattern family: name, type, help and how to read an entry.
type PatternFamily = (&'static str, &'static str, &'static str, fn(&PatternEntry) -> u64);

/// Nanoseconds as seconds.
fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Prometheus text exposition format 0.0.4 being written.
#[derive(Debug, Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    /// The `# HELP` and `# TYPE` lines that open a family.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, label_value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label_value(label_value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }
}

/// A label value with `\`, `"` and line feeds escaped, as the text format requires.
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str(r"\n"),
            c => out.push(c),
        }
    }
    out
}

/// Whether a site moves at full speed: the worst of the node's local write
/// queues ([`Backpressure::assess`]) and of its gateway's routes
/// ([`Backpressure::with_routes`], see `edgebus_gateway::health`).
///
/// The local rule: `stalled` if the store takes no writes (closing, or
/// poisoned by a failed write, `fdatasync` or index update); else
/// `throttled` if a queue holds more than [`THROTTLED_PERCENT`] of its
/// capacity (the store's write requests, the log's queued appends, the
/// log's queued bytes); else `healthy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backpressure {
    /// Every queue is at or below 80% of its capacity, writes are taken and
    /// every route is healthy.
    #[default]
    Healthy,
    /// A queue is above 80% of its capacity (writers are about to wait), or
    /// a route moves only at the pace its credit allows.
    Throttled,
    /// The store takes no writes, or a route is stalled.
    Stalled,
    /// A state this version does not know (from a newer node).
    Unknown,
}

impl Backpressure {
    /// Applies the local rule (see the type's docs) to `(depth, capacity)` pairs.
    pub fn assess(accepts_writes: bool, queues: &[(u64, u64)]) -> Self {
        if !accepts_writes {
            Self::Stalled
        } else if queues
            .iter()
            .any(|(depth, capacity)| u128::from(*depth) * 100 > u128::from(*capacity) * u128::from(THROTTLED_PERCENT))
        {
            Self::Throttled
        } else {
            Self::Healthy
        }
    }

    /// The worse of `self` and the health of the gateway's worst route.
    pub fn with_routes(self, routes: RouteHealth) -> Self {
        let from_routes = match routes {
            RouteHealth::Healthy => Self::Healthy,
            RouteHealth::Throttled => Self::Throttled,
            RouteHealth::Stalled => Self::Stalled,
        };
        let rank = |state: Self| match state {
            Self::Healthy => 0,
            Self::Throttled => 1,
            Self::Stalled => 2,
            Self::Unknown => 3,
        };
        if rank(from_routes) > rank(self) { from_routes } else { self }
    }

    /// `healthy`, `throttled`, `stalled` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Throttled => "throttled",
            Self::Stalled => "stalled",
            Self::Unknown => "unknown",
        }
    }
}

impl From<Backpressure> for v1::Backpressure {
    fn from(state: Backpressure) -> Self {
        match state {
            Backpressure::Healthy => Self::Healthy,
            Backpressure::Throttled => Self::Throttled,
            Backpressure::Stalled => Self::Stalled,
            Backpressure::Unknown => Self::Unspecified,
        }
    }
}

impl From<i32> for Backpressure {
    /// A wire `edgebus.v1.Backpressure` number.
    fn from(number: i32) -> Self {
        match v1::Backpressure::try_from(number) {
            Ok(v1::Backpressure::Healthy) => Self::Healthy,
            Ok(v1::Backpressure::Throttled) => Self::Throttled,
            Ok(v1::Backpressure::Stalled) => Self::Stalled,
            Ok(v1::Backpressure::Unspecified) | Err(_) => Self::Unknown,
        }
    }
}

/// The figures of a node at one moment: what `GET /v1/stats`, the `Stats`
/// rpc and `edgebus stats` report (the fields are documented on the wire
/// message `edgebus.v1.StatsResponse`). Counters are since the node started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStats {
    /// Events accepted but not yet durable: `log_records_unacknowledged`
    /// plus `store_queue_requests` (each one or more events, counted as one).
    pub local_queue: u64,
    /// Events read ahead or in flight on the gateway's routes.
    pub wan_queue: u64,
    /// Events dropped by the gateway's topic policies.
    pub dropped: u64,
    /// Whether the site moves at full speed: its write queues and its routes.
    pub backpressure: Backpressure,
    /// Open subscriptions.
    pub subscriptions: u64,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// The log's first position still present.
    pub start_position: u64,
    /// One past the log's last acknowledged position.
    pub end_position: u64,
    /// Appends the log completed.
    pub appends: u64,
    /// Records the log wrote.
    pub records: u64,
    /// Bytes the log wrote, framing included.
    pub bytes_written: u64,
    /// The log's write batches.
    pub batches: u64,
    /// `fdatasync` calls.
    pub fsyncs: u64,
    /// Segment rolls.
    pub rolls: u64,
    /// Appends waiting for the log's writer thread.
    pub log_queue_appends: u64,
    /// Their payload bytes.
    pub log_queue_bytes: u64,
    /// Records given positions but not yet acknowledged by the log.
    pub log_records_unacknowledged: u64,
    /// Write requests waiting for the store's sequencer.
    pub store_queue_requests: u64,
    /// Median append latency since start, in milliseconds (0 before any).
    pub append_latency_ms_p50: f64,
    /// 99th percentile append latency since start, in milliseconds.
    pub append_latency_ms_p99: f64,
    /// Index changes in the store's in-memory tail.
    pub index_tail: u64,
    /// Table files of the index.
    pub index_tables: u64,
    /// Filters and block indexes the index keeps in memory, in bytes.
    pub index_pinned_bytes: u64,
    /// The index's block cache now, in bytes.
    pub index_cache_bytes: u64,
    /// The ingest quotas, in declared order.
    pub quotas: Vec<QuotaFigures>,
    /// The connection cap of each listener: gRPC, then HTTP.
    pub connections: Vec<ConnectionFigures>,
}

/// One listener's connection cap at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionFigures {
    /// `grpc` or `http`.
    pub transport: String,
    /// Connections open now.
    pub open: u64,
    /// The cap.
    pub max: u64,
    /// Connections refused because the cap was reached, since the node started.
    pub rejected: u64,
}

impl ConnectionFigures {
    fn of(transport: &str, limiter: &ConnectionLimiter) -> Self {
        Self {
            transport: transport.to_owned(),
            open: limiter.open_connections() as u64,
            max: limiter.max_connections() as u64,
            rejected: limiter.rejected_connections(),
        }
    }
}

impl NodeStats {
    /// The node's figures now: the one function behind `/v1/stats`, the
    /// `Stats` rpc and the node-wide part of `/metrics`. Takes the log's and
    /// the store's queue locks for a moment: call it off the async workers.
    pub fn gather(state: &NodeState) -> Self {
        let store = &state.store;
        let log = store.log();
        let counters = log.stats();
        let log_queue = log.append_queue();
        let store_queue_requests = store.queue_depth() as u64;
        let config = log.config();
        let backpressure = Backpressure::assess(
            store.accepts_writes(),
            &[
                (store_queue_requests, Store::QUEUE_REQUESTS_MAX as u64),
                (log_queue.appends as u64, u64::from(config.queue_appends_max)),
                (log_queue.bytes, config.queue_bytes_max),
            ],
        );
        let (append_latency_ms_p50, append_latency_ms_p99) = state.metrics.append_latency_ms_p50_p99();
        let gateway = state.gateway.get().map(|g| g.summary()).unwrap_or_default();
        let backpressure = backpressure.with_routes(gateway.health);
        let index = store.index_memory();
        let (wan_queue, dropped) = (gateway.wan_queue, gateway.dropped);
        Self {
            local_queue: log_queue.records_unacknowledged + store_queue_requests,
            wan_queue,
            dropped,
            backpressure,
            subscriptions: state.metrics.subscriptions_open(),
            uptime_s: state.metrics.uptime().as_secs(),
            start_position: log.start_position(),
            end_position: log.end_position(),
            appends: counters.appends,
            records: counters.records,
            bytes_written: counters.bytes_written,
            batches: counters.batches,
            fsyncs: counters.fsyncs,
            rolls: counters.rolls,
            log_queue_appends: log_queue.appends as u64,
            log_queue_bytes: log_queue.bytes,
            log_records_unacknowledged: log_queue.records_unacknowledged,
            store_queue_requests,
            append_latency_ms_p50,
            append_latency_ms_p99,
            index_tail: store.index_tail() as u64,
            index_tables: index.tables as u64,
            index_pinned_bytes: index.pinned_bytes,
            index_cache_bytes: index.cache_bytes,
            quotas: state.quotas.figures(),
            connections: vec![
                ConnectionFigures::of("grpc", &state.grpc_connections),
                ConnectionFigures::of("http", &state.http_connections),
            ],
        }
    }

    /// The JSON object of `GET /v1/stats` and `edgebus stats --json`.
    pub fn to_json(&self) -> Value {
        json!({
            "local_queue": self.local_queue,
            "wan_queue": self.wan_queue,
            "dropped": self.dropped,
            "backpressure": self.backpressure.as_str(),
            "subscriptions": self.subscriptions,
            "uptime_s": self.uptime_s,
            "start_position": self.start_position,
            "end_position": self.end_position,
            "appends": self.appends,
            "records": self.records,
            "bytes_written": self.bytes_written,
            "batches": self.batches,
            "fsyncs": self.fsyncs,
            "rolls": self.rolls,
            "log_queue_appends": self.log_queue_appends,
            "log_queue_bytes": self.log_queue_bytes,
            "log_records_unacknowledged": self.log_records_unacknowledged,
            "store_queue_requests": self.store_queue_requests,
            "append_latency_ms_p50": self.append_latency_ms_p50,
            "append_latency_ms_p99": self.append_latency_ms_p99,
            "index_tail": self.index_tail,
            "index_tables": self.index_tables,
            "index_pinned_bytes": self.index_pinned_bytes,
            "index_cache_bytes": self.index_cache_bytes,
            "quotas": self.quotas.iter().map(|quota| json!({
                "pattern": quota.pattern,
                "events_per_sec": quota.events_per_sec,
                "bytes_per_sec": quota.bytes_per_sec,
                "admitted_events": quota.admitted_events,
                "admitted_bytes": quota.admitted_bytes,
                "rejected_requests": quota.rejected_requests,
                "rejected_events": quota.rejected_events,
                "rejected_bytes": quota.rejected_bytes,
            })).collect::<Vec<_>>(),
            "connections": self.connections.iter().map(|listener| (listener.transport.clone(), json!({
                "open": listener.open,
                "max": listener.max,
                "rejected": listener.rejected,
            }))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

impl From<NodeStats> for v1::StatsResponse {
    fn from(stats: NodeStats) -> Self {
        Self {
            local_queue: stats.local_queue,
            wan_queue: stats.wan_queue,
            dropped: stats.dropped,
            backpressure: v1::Backpressure::from(stats.backpressure).into(),
            subscriptions: stats.subscriptions,
            uptime_s: stats.uptime_s,
            start_position: stats.start_position,
            end_position: stats.end_position,
            appends: stats.appends,
            records: stats.records,
            bytes_written: stats.bytes_written,
            batches: stats.batches,
            fsyncs: stats.fsyncs,
            rolls: stats.rolls,
            log_queue_appends: stats.log_queue_appends,
            log_queue_bytes: stats.log_queue_bytes,
            log_records_unacknowledged: stats.log_records_unacknowledged,
            store_queue_requests: stats.store_queue_requests,
            append_latency_ms_p50: stats.append_latency_ms_p50,
            append_latency_ms_p99: stats.append_latency_ms_p99,
            index_tail: stats.index_tail,
            index_tables: stats.index_tables,
            index_pinned_bytes: stats.index_pinned_bytes,
            index_cache_bytes: stats.index_cache_bytes,
            quotas: stats
                .quotas
                .into_iter()
                .map(|quota| v1::QuotaStats {
                    pattern: quota.pattern,
                    events_per_sec: quota.events_per_sec,
                    bytes_per_sec: quota.bytes_per_sec,
                    admitted_events: quota.admitted_events,
                    admitted_bytes: quota.admitted_bytes,
                    rejected_requests: quota.rejected_requests,
                    rejected_events: quota.rejected_events,
                    rejected_bytes: quota.rejected_bytes,
                })
                .collect(),
            connections: stats
                .connections
                .into_iter()
                .map(|listener| v1::ConnectionStats {
                    transport: listener.transport,
                    open: listener.open,
                    max: listener.max,
                    rejected: listener.rejected,
                })
                .collect(),
        }
    }
}

impl From<v1::StatsResponse> for NodeStats {
    fn from(wire: v1::StatsResponse) -> Self {
        Self {
            local_queue: wire.local_queue,
            wan_queue: wire.wan_queue,
            dropped: wire.dropped,
            backpressure: Backpressure::from(wire.backpressure),
            subscriptions: wire.subscriptions,
            uptime_s: wire.uptime_s,
            start_position: wire.start_position,
            end_position: wire.end_position,
            appends: wire.appends,
            records: wire.records,
            bytes_written: wire.bytes_written,
            batches: wire.batches,
            fsyncs: wire.fsyncs,
            rolls: wire.rolls,
            log_queue_appends: wire.log_queue_appends,
            log_queue_bytes: wire.log_queue_bytes,
            log_records_unacknowledged: wire.log_records_unacknowledged,
            store_queue_requests: wire.store_queue_requests,
            append_latency_ms_p50: wire.append_latency_ms_p50,
            append_latency_ms_p99: wire.append_latency_ms_p99,
            index_tail: wire.index_tail,
            index_tables: wire.index_tables,
            index_pinned_bytes: wire.index_pinned_bytes,
            index_cache_bytes: wire.index_cache_bytes,
            quotas: wire
                .quotas
                .into_iter()
                .map(|quota| QuotaFigures {
                    pattern: quota.pattern,
                    events_per_sec: quota.events_per_sec,
                    bytes_per_sec: quota.bytes_per_sec,
                    admitted_events: quota.admitted_events,
                    admitted_bytes: quota.admitted_bytes,
                    rejected_requests: quota.rejected_requests,
                    rejected_events: quota.rejected_events,
                    rejected_bytes: quota.rejected_bytes,
                })
                .collect(),
            connections: wire
                .connections
                .into_iter()
                .map(|listener| ConnectionFigures {
                    transport: listener.transport,
                    open: listener.open,
                    max: listener.max,
                    rejected: listener.rejected,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed sample: name, labels, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Parses exposition text: every family opens with `# HELP` then
    /// `# TYPE`, every other line is `name{labels} value` (or `name value`)
    /// of the current family, with valid names and escaped label values.
    /// Returns `(name, labels, value)` per sample.
    fn parse(text: &str) -> Vec<Sample> {
        let valid_name = |name: &str| {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        };
        let mut samples = Vec::new();
        let mut family: Option<(String, String)> = None;
        let mut helped: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _help) = rest.split_once(' ').expect("HELP has a text");
                assert!(valid_name(name) && name.starts_with("edgebus_"), "{line}");
                helped = Some(name.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
                assert_eq!(helped.as_deref(), Some(name), "TYPE follows its HELP: {line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "a counter's name ends in _total: {line}");
                }
                family = Some((name.to_owned(), kind.to_owned()));
                continue;
            }
            assert!(!line.starts_with('#'), "only HELP and TYPE comments: {line}");
            let (family_name, kind) = family.as_ref().unwrap_or_else(|| panic!("a sample before any TYPE: {line}"));
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("labels end with }"), line)),
            };
            assert!(valid_name(name), "{line}");
            let belongs = if kind == "histogram" {
                [format!("{family_name}_bucket"), format!("{family_name}_sum"), format!("{family_name}_count")]
                    .contains(&name.to_owned())
            } else {
                name == family_name
            };
            assert!(belongs, "{name} outside its family {family_name}: {line}");
            samples.push((name.to_owned(), labels, value));
        }
        samples
    }

    fn parse_labels(mut text: &str, line: &str) -> Vec<(String, String)> {
        let mut labels = Vec::new();
        while !text.is_empty() {
            let (name, rest) = text.split_once("=\"").unwrap_or_else(|| panic!("label without =\": {line}"));
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => panic!("bad escape {other:?}: {line}"),
                    },
                    Some((index, '"')) => break index,
                    Some((_, '\n')) => panic!("raw line feed: {line}"),
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value: {line}"),
                }
            };
            labels.push((name.to_owned(), value));
            text = &rest[end + 1..];
            text = text.strip_prefix(',').unwrap_or(text);
        }
        labels
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples.iter().find_map(|(sample, sample_labels, value)| {
            let same = sample == name
                && sample_labels.len() == labels.len()
                && labels.iter().all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v));
            same.then_some(*value)
        })
    }

    #[test]
    fn the_text_format_parses_and_carries_every_figure() {
        let metrics = Metrics::default();
        metrics.record_append(Outcome::Ok, 3, 120);
        metrics.record_append(Outcome::Ok, 1, 10);
        metrics.record_append(Outcome::Refused(1), 2, 7);
        metrics.record_append(Outcome::Refused(100), 0, 0);
        metrics.record_exists_or_write(Outcome::ExistsSame, 5);
        metrics.record_read(Some(4));
        metrics.record_read(None);
        metrics.record_append_latency(Duration::from_micros(300));
        let subscription = metrics.subscription_opened("orders.\"eu\"\\\n>");
        subscription.delivered(9);
        let stats = NodeStats { end_position: 4, local_queue: 2, fsyncs: 7, ..NodeStats::default() };
        let text = metrics.render_with(&stats);
        let samples = parse(&text);
        assert_eq!(value(&samples, "edgebus_appends_total", &[("outcome", "ok")]), Some(2.0), "{text}");
        assert_eq!(value(&samples, "edgebus_append_events_total", &[("outcome", "ok")]), Some(4.0));
        assert_eq!(value(&samples, "edgebus_append_bytes_total", &[("outcome", "ok")]), Some(130.0));
        let conflict = [("outcome", "wrong_expected_version")];
        assert_eq!(value(&samples, "edgebus_appends_total", &conflict), Some(1.0), "{text}");
        assert_eq!(value(&samples, "edgebus_appends_total", &[("outcome", "invalid_name")]), Some(1.0), "{text}");
        let eow = |outcome| value(&samples, "edgebus_exists_or_write_total", &[("outcome", outcome)]);
        assert_eq!((eow("written"), eow("exists_same"), eow("exists_different")), (Some(0.0), Some(1.0), Some(0.0)));
        assert_eq!(value(&samples, "edgebus_reads_total", &[]), Some(2.0));
        assert_eq!(value(&samples, "edgebus_read_events_total", &[]), Some(4.0));
        assert_eq!(value(&samples, "edgebus_log_end_position", &[]), Some(4.0));
        assert_eq!(value(&samples, "edgebus_log_fsyncs_total", &[]), Some(7.0));
        assert_eq!(value(&samples, "edgebus_local_queue", &[]), Some(2.0));
        assert_eq!(value(&samples, "edgebus_backpressure", &[("state", "healthy")]), Some(1.0));
        assert_eq!(value(&samples, "edgebus_backpressure", &[("state", "stalled")]), Some(0.0));
        // The escaped pattern comes back intact.
        let pattern = [("pattern", "orders.\"eu\"\\\n>")];
        assert_eq!(value(&samples, "edgebus_subscriptions", &pattern), Some(1.0), "{text}");
        assert_eq!(value(&samples, "edgebus_subscription_events_delivered_total", &pattern), Some(9.0));
        assert!(text.contains(r#"pattern="orders.\"eu\"\\\n>""#), "{text}");
        assert!(!text.contains("_other"), "no overflow series before the cap is reached: {text}");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_is_the_count() {
        let metrics = Metrics::default();
        for micros in [50, 100, 101, 2_000, 2_000, 40_000] {
            metrics.record_append_latency(Duration::from_micros(micros));
        }
        metrics.record_append_latency(Duration::from_secs(20));
        let samples = parse(&metrics.render_with(&NodeStats::default()));
        let buckets: Vec<(String, f64)> = samples
            .iter()
            .filter(|(name, _, _)| name == "edgebus_append_duration_seconds_bucket")
            .map(|(_, labels, value)| (labels[0].1.clone(), *value))
            .collect();
        assert_eq!(buckets.len(), APPEND_LATENCY_BUCKETS_NS.len() + 1);
        assert!(buckets.windows(2).all(|pair| pair[0].1 <= pair[1].1), "cumulative: {buckets:?}");
        let bucket = |le: &str| buckets.iter().find(|(bound, _)| bound == le).map(|(_, count)| *count);
        // `le` is inclusive: 100 µs falls in the first bucket.
        assert_eq!(bucket("0.0001"), Some(2.0), "{buckets:?}");
        assert_eq!(bucket("0.00025"), Some(3.0));
        assert_eq!(bucket("0.0025"), Some(5.0));
        assert_eq!(bucket("10"), Some(6.0));
        assert_eq!(bucket("+Inf"), Some(7.0));
        assert_eq!(buckets.last().map(|(le, _)| le.as_str()), Some("+Inf"));
        assert_eq!(value(&samples, "edgebus_append_duration_seconds_count", &[]), Some(7.0));
        let sum = value(&samples, "edgebus_append_duration_seconds_sum", &[]).unwrap();
        assert!((sum - 20.044_251).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let metrics = Metrics::default();
        assert_eq!(metrics.append_latency_ms_p50_p99(), (0.0, 0.0), "no writes yet");
        // 100 observations in (1 ms, 2.5 ms]: the median is halfway through it.
        for _ in 0..100 {
            metrics.record_append_latency(Duration::from_micros(2_000));
        }
        let (p50, p99) = metrics.append_latency_ms_p50_p99();
        assert!((p50 - 1.75).abs() < 1e-9, "{p50}");
        assert!((p99 - 2.485).abs() < 1e-9, "{p99}");
        // Beyond the last bound: the highest finite bound.
        for _ in 0..1_000 {
            metrics.record_append_latency(Duration::from_secs(60));
        }
        assert_eq!(metrics.append_latency_ms_p50_p99().1, 10_000.0);
    }

    #[test]
    fn per_pattern_gauges_follow_the_handles() {
        let metrics = Metrics::default();
        let a = metrics.subscription_opened("orders.*");
        let b = metrics.subscription_opened("orders.*");
        let c = metrics.subscription_opened("*");
        a.set_lag(5);
        b.set_lag(40);
        a.delivered(3);
        b.delivered(4);
        b.fell_behind();
        c.predicate_error();
        let read = |metrics: &Metrics| parse(&metrics.render_with(&NodeStats::default()));
        let orders = [("pattern", "orders.*")];
        let samples = read(&metrics);
        assert_eq!(value(&samples, "edgebus_subscriptions", &orders), Some(2.0));
        assert_eq!(value(&samples, "edgebus_subscriptions", &[("pattern", "*")]), Some(1.0));
        assert_eq!(value(&samples, "edgebus_subscription_lag_positions", &orders), Some(40.0), "the largest lag");
        assert_eq!(value(&samples, "edgebus_subscription_events_delivered_total", &orders), Some(7.0));
        assert_eq!(value(&samples, "edgebus_subscription_fell_behind_total", &orders), Some(1.0));
        assert_eq!(value(&samples, "edgebus_subscription_predicate_errors_total", &[("pattern", "*")]), Some(1.0));
        assert_eq!(metrics.subscriptions_open(), 3);

        drop(b);
        let samples = read(&metrics);
        assert_eq!(value(&samples, "edgebus_subscriptions", &orders), Some(1.0));
        assert_eq!(value(&samples, "edgebus_subscription_lag_positions", &orders), Some(5.0), "b's lag left with b");
        assert_eq!(value(&samples, "edgebus_subscription_events_delivered_total", &orders), Some(7.0), "counters stay");
        drop(a);
        drop(c);
        let samples = read(&metrics);
        assert_eq!(value(&samples, "edgebus_subscriptions", &orders), Some(0.0));
        assert_eq!(value(&samples, "edgebus_subscription_lag_positions", &orders), Some(0.0));
        assert_eq!(metrics.subscriptions_open(), 0);
    }

    #[test]
    fn at_most_256_patterns_are_labelled_and_the_rest_go_to_other() {
        let metrics = Metrics::default();
        let handles: Vec<SubscriptionMetrics> =
            (0..PATTERNS_MAX + 10).map(|i| metrics.subscription_opened(&format!("s.{i}"))).collect();
        for handle in &handles {
            handle.delivered(1);
        }
        let samples = parse(&metrics.render_with(&NodeStats::default()));
        let gauges: Vec<_> = samples.iter().filter(|(name, _, _)| name == "edgebus_subscriptions").collect();
        assert_eq!(gauges.len(), PATTERNS_MAX + 1, "256 patterns and _other");
        let other = [("pattern", PATTERN_OTHER)];
        assert_eq!(value(&samples, "edgebus_subscriptions", &other), Some(10.0));
        assert_eq!(value(&samples, "edgebus_subscription_events_delivered_total", &other), Some(10.0));
        assert_eq!(metrics.subscriptions_open(), (PATTERNS_MAX + 10) as u64);

        // A known pattern keeps its label while the map is full.
        let again = metrics.subscription_opened("s.0");
        let samples = parse(&metrics.render_with(&NodeStats::default()));
        assert_eq!(value(&samples, "edgebus_subscriptions", &[("pattern", "s.0")]), Some(2.0));
        drop(again);

        // Once patterns are idle they make room for new ones.
        drop(handles);
        let fresh = metrics.subscription_opened("fresh.>");
        let samples = parse(&metrics.render_with(&NodeStats::default()));
        assert_eq!(value(&samples, "edgebus_subscriptions", &[("pattern", "fresh.>")]), Some(1.0));
        assert_eq!(value(&samples, "edgebus_subscriptions", &[("pattern", "s.0")]), None, "idle patterns forgotten");
        assert_eq!(value(&samples, "edgebus_subscriptions", &other), Some(0.0), "_other stays once used");
        assert_eq!(metrics.subscriptions_open(), 1);
        drop(fresh);
    }

    #[test]
    fn outcome_labels_name_the_stable_codes() {
        assert_eq!(Outcome::slot_label(Outcome::Ok.slot()), "ok");
        assert_eq!(Outcome::slot_label(Outcome::ExistsDifferent.slot()), "exists_different");
        assert_eq!(Outcome::slot_label(Outcome::Refused(13).slot()), "busy");
        assert_eq!(Outcome::slot_label(Outcome::Refused(17).slot()), "index_failure");
        assert_eq!(Outcome::slot_label(Outcome::Refused(104).slot()), "permission_denied");
        assert_eq!(Outcome::slot_label(Outcome::Refused(23).slot()), "code_23");
        assert_eq!(Outcome::slot_label(Outcome::Refused(107).slot()), "not_in_flight");
        assert_eq!(Outcome::slot_label(Outcome::Refused(0).slot()), "unknown");
        assert_eq!(Outcome::slot_label(Outcome::Refused(5000).slot()), "unknown");
        let mut slots: Vec<usize> = (0..200).map(|code| Outcome::Refused(code).slot()).collect();
        slots.extend([Outcome::Ok, Outcome::Written, Outcome::ExistsSame, Outcome::ExistsDifferent].map(Outcome::slot));
        assert!(slots.iter().all(|slot| *slot < OUTCOME_SLOTS));
    }

    #[test]
    fn backpressure_stalls_without_writes_and_throttles_above_80_percent() {
        assert_eq!(Backpressure::assess(true, &[(0, 4096), (0, 10)]), Backpressure::Healthy);
        assert_eq!(Backpressure::assess(true, &[(80, 100)]), Backpressure::Healthy, "80% is not above 80%");
        assert_eq!(Backpressure::assess(true, &[(0, 100), (81, 100)]), Backpressure::Throttled);
        assert_eq!(Backpressure::assess(true, &[(u64::MAX, u64::MAX)]), Backpressure::Throttled, "no overflow");
        assert_eq!(Backpressure::assess(false, &[(0, 100)]), Backpressure::Stalled);
        for state in [Backpressure::Healthy, Backpressure::Throttled, Backpressure::Stalled] {
            assert_eq!(Backpressure::from(v1::Backpressure::from(state) as i32), state);
        }
        assert_eq!(Backpressure::from(99), Backpressure::Unknown);
        assert_eq!(Backpressure::from(0), Backpressure::Unknown);
    }

    #[test]
    fn backpressure_is_the_worst_of_the_queues_and_the_routes() {
        let cases = [
            (Backpressure::Healthy, RouteHealth::Healthy, Backpressure::Healthy),
            (Backpressure::Healthy, RouteHealth::Throttled, Backpressure::Throttled),
            (Backpressure::Healthy, RouteHealth::Stalled, Backpressure::Stalled),
            (Backpressure::Throttled, RouteHealth::Healthy, Backpressure::Throttled),
            (Backpressure::Throttled, RouteHealth::Stalled, Backpressure::Stalled),
            (Backpressure::Stalled, RouteHealth::Throttled, Backpressure::Stalled),
            (Backpressure::Unknown, RouteHealth::Stalled, Backpressure::Unknown),
        ];
        for (local, routes, site) in cases {
            assert_eq!(local.with_routes(routes), site, "{local:?} and routes {routes:?}");
        }
    }

    #[test]
    fn stats_round_trip_through_the_wire_and_keep_their_json_names() {
        let stats = NodeStats {
            local_queue: 1,
            wan_queue: 0,
            dropped: 0,
            backpressure: Backpressure::Throttled,
            subscriptions: 3,
            uptime_s: 4,
            start_position: 5,
            end_position: 6,
            appends: 7,
            records: 8,
            bytes_written: 9,
            batches: 10,
            fsyncs: 11,
            rolls: 12,
            log_queue_appends: 13,
            log_queue_bytes: 14,
            log_records_unacknowledged: 15,
            store_queue_requests: 16,
            append_latency_ms_p50: 0.5,
            append_latency_ms_p99: 9.75,
            index_tail: 28,
            index_tables: 29,
            index_pinned_bytes: 30,
            index_cache_bytes: 31,
            quotas: vec![
                QuotaFigures {
                    pattern: "telemetry.>".to_owned(),
                    events_per_sec: Some(1000.0),
                    bytes_per_sec: None,
                    admitted_events: 17,
                    admitted_bytes: 18,
                    rejected_requests: 19,
                    rejected_events: 20,
                    rejected_bytes: 21,
                },
                QuotaFigures { pattern: "b.*".to_owned(), bytes_per_sec: Some(64), ..QuotaFigures::default() },
            ],
            connections: vec![
                ConnectionFigures { transport: "grpc".to_owned(), open: 22, max: 23, rejected: 24 },
                ConnectionFigures { transport: "http".to_owned(), open: 25, max: 26, rejected: 27 },
            ],
        };
        assert_eq!(NodeStats::from(v1::StatsResponse::from(stats.clone())), stats);
        let json = stats.to_json();
        assert_eq!(json["backpressure"], "throttled");
        assert_eq!(json["log_records_unacknowledged"], 15);
        assert_eq!(json["append_latency_ms_p99"], 9.75);
        assert_eq!(json["index_pinned_bytes"], 30);
        assert_eq!(json.as_object().map(serde_json::Map::len), Some(26), "every field: {json}");
        assert_eq!(json["quotas"][0]["pattern"], "telemetry.>");
        assert_eq!(json["quotas"][0]["events_per_sec"], 1000.0);
        assert_eq!(json["quotas"][0]["bytes_per_sec"], Value::Null);
        assert_eq!(json["quotas"][0]["rejected_events"], 20);
        assert_eq!(json["quotas"][1]["bytes_per_sec"], 64);
        assert_eq!(json["connections"]["grpc"]["rejected"], 24);
        assert_eq!(json["connections"]["http"]["open"], 25);
    }

    #[test]
    fn quotas_and_connections_are_rendered_per_pattern_and_transport() {
        let stats = NodeStats {
            quotas: vec![QuotaFigures {
                pattern: "telemetry.>".to_owned(),
                events_per_sec: Some(10.0),
                admitted_events: 4,
                admitted_bytes: 40,
                rejected_requests: 2,
                rejected_events: 3,
                rejected_bytes: 30,
                ..QuotaFigures::default()
            }],
            connections: vec![
                ConnectionFigures { transport: "grpc".to_owned(), open: 1, max: 8, rejected: 5 },
                ConnectionFigures { transport: "http".to_owned(), open: 2, max: 8, rejected: 6 },
            ],
            ..NodeStats::default()
        };
        let samples = parse(&Metrics::default().render_with(&stats));
        let pattern = [("pattern", "telemetry.>")];
        assert_eq!(value(&samples, "edgebus_quota_admitted_events_total", &pattern), Some(4.0));
        assert_eq!(value(&samples, "edgebus_quota_admitted_bytes_total", &pattern), Some(40.0));
        assert_eq!(value(&samples, "edgebus_quota_rejected_requests_total", &pattern), Some(2.0));
        assert_eq!(value(&samples, "edgebus_quota_rejected_events_total", &pattern), Some(3.0));
        assert_eq!(value(&samples, "edgebus_quota_rejected_bytes_total", &pattern), Some(30.0));
        assert_eq!(value(&samples, "edgebus_connections_rejected_total", &[("transport", "grpc")]), Some(5.0));
        assert_eq!(value(&samples, "edgebus_connections_rejected_total", &[("transport", "http")]), Some(6.0));
        assert_eq!(value(&samples, "edgebus_connections_open", &[("transport", "http")]), Some(2.0));
        assert_eq!(value(&samples, "edgebus_connections_max", &[("transport", "grpc")]), Some(8.0));
    }
}
