//! Ingest quotas per stream pattern: token buckets that throttle a runaway
//! producer with a clear, retryable refusal while other streams keep flowing
//! (DESIGN §3.3).
//!
//! # The rule
//!
//! A quota is a stream pattern (`telemetry.>`) with a rate in events per
//! second, in payload bytes per second, or both, and a burst for each (by
//! default one second's worth, at least one event). Payload bytes are an
//! event's data plus its metadata, as in `/metrics`.
//!
//! A write (an append's events, or one exists-or-write event) is admitted
//! only if **every** quota whose pattern matches its stream admits it; the
//! tokens are then taken from all of them, and from none if any refuses.
//! So overlapping quotas nest: `telemetry.>` at 1000 events/s and
//! `telemetry.noisy.*` at 10 events/s hold together, each counting what it
//! matches. A stream no quota matches is not limited.
//!
//! A bucket admits a write when it holds the write's tokens, or, for a write
//! larger than the burst, when it is full; it may then go below zero, and
//! the next writes wait until it has refilled. So a write larger than the
//! burst is never refused for ever, and over any period the tokens taken
//! stay within `burst + rate × period` plus the excess of one oversized
//! write.
//!
//! A refusal ([`QuotaRefusal`]) names the pattern and the rate that refused
//! (the one whose refill takes longest when several do). The node holds it
//! for a while before answering (`hold`: the time until that bucket holds
//! the write's tokens, at least 20 ms and at most 100 ms, see
//! [`NODE_QUOTA_REFUSAL_HOLD_MS_MIN`]), so that a producer that sends again
//! at once, ignoring the advice, is slowed rather than served refusals as
//! fast as it can ask; the answer then says how much longer to wait (at
//! least 1 ms): the stable code
//! `RESOURCE_EXHAUSTED` (103) with `retry_after_ms`, over gRPC as status
//! `RESOURCE_EXHAUSTED` with the `grpc-retry-pushback-ms` trailer, over
//! HTTP as `429` with `Retry-After`. Nothing of a refused write reached
//! the store, so retrying it is safe.
//!
//! # Cost
//!
//! A check walks the quotas in declared order (at most
//! [`NODE_QUOTAS_MAX`](edgebus_types::limits::NODE_QUOTAS_MAX)), matching
//! the stream against each pattern, then locks the matching buckets, each
//! behind its own mutex, in that same order (so two checks never deadlock),
//! for a few arithmetic operations. No lock is held across store I/O, and
//! writes to streams that match different quotas never share a lock.
//!
//! Lifecycle: the node builds one [`Quotas`] from its configuration at start
//! and keeps it in its `NodeState` until it stops; the buckets start full.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edgebus_proto::v1;
use edgebus_types::limits::{NODE_QUOTA_REFUSAL_HOLD_MS_MAX, NODE_QUOTA_REFUSAL_HOLD_MS_MIN, NODE_QUOTAS_MAX};
use edgebus_types::{StreamName, StreamPattern};

/// The stable wire code of a quota refusal.
const RESOURCE_EXHAUSTED: u32 = v1::ErrorCode::ResourceExhausted as u32;

/// The keys a quota takes, in the config file and in `--quota` flags.
pub const QUOTA_KEYS: [&str; 4] = ["events_per_sec", "bytes_per_sec", "burst_events", "burst_bytes"];

/// One quota as configured, before it is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaSpec {
    /// The streams it limits.
    pub pattern: StreamPattern,
    /// Events per second, if limited.
    pub events_per_sec: Option<f64>,
    /// Payload bytes (data plus metadata) per second, if limited.
    pub bytes_per_sec: Option<u64>,
    /// Most events admitted at once after a pause (default: one second's
    /// worth of `events_per_sec`, at least 1).
    pub burst_events: Option<u64>,
    /// Most payload bytes admitted at once after a pause (default: one
    /// second's worth of `bytes_per_sec`).
    pub burst_bytes: Option<u64>,
}

/// A quota setting that is wrong: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct QuotaSpecError {
    /// The key concerned (`pattern`, `events_per_sec`, …), or `quota` for
    /// the quota as a whole.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

impl QuotaSpecError {
    fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self { key, message: message.into() }
    }
}

impl QuotaSpec {
    /// A quota on `pattern` with nothing set yet.
    pub fn new(pattern: &str) -> Result<Self, QuotaSpecError> {
        let pattern = StreamPattern::new(pattern).map_err(|e| QuotaSpecError::new("pattern", e.to_string()))?;
        Ok(Self { pattern, events_per_sec: None, bytes_per_sec: None, burst_events: None, burst_bytes: None })
    }

    /// Sets `key` (one of [`QUOTA_KEYS`]) from its text: a number, and for
    /// the byte keys optionally a unit (`B`, `KiB`, `MiB`, `GiB`, `kB`,
    /// `MB`, `GB`), e.g. `1MiB`. A key set twice is an error.
    pub fn set(&mut self, key: &str, text: &str) -> Result<(), QuotaSpecError> {
        let (key, already) = match key {
            "events_per_sec" => ("events_per_sec", self.events_per_sec.is_some()),
            "bytes_per_sec" => ("bytes_per_sec", self.bytes_per_sec.is_some()),
            "burst_events" => ("burst_events", self.burst_events.is_some()),
            "burst_bytes" => ("burst_bytes", self.burst_bytes.is_some()),
            other => {
                return Err(QuotaSpecError::new(
                    "quota",
                    format!("unknown key {other:?}, expected one of pattern, {}", QUOTA_KEYS.join(", ")),
                ));
            }
        };
        if already {
            return Err(QuotaSpecError::new(key, "given twice"));
        }
        let text = text.trim();
        match key {
            "events_per_sec" => self.events_per_sec = Some(parse_rate(key, text)?),
            "bytes_per_sec" => self.bytes_per_sec = Some(parse_bytes(key, text)?),
            "burst_events" => self.burst_events = Some(parse_count(key, text)?),
            _ => self.burst_bytes = Some(parse_bytes(key, text)?),
        }
        Ok(())
    }

    /// Parses the `--quota` flag's form: the pattern, then comma-separated
    /// `key=value` settings, e.g. `telemetry.>,events_per_sec=1000,bytes_per_sec=1MiB`.
    /// (Commas and `=` never occur in patterns.)
    pub fn parse_flag(text: &str) -> Result<Self, QuotaSpecError> {
        let mut parts = text.split(',');
        let pattern = parts.next().unwrap_or("").trim();
        let mut spec = Self::new(pattern)?;
        for part in parts {
            let Some((key, value)) = part.split_once('=') else {
                return Err(QuotaSpecError::new(
                    "quota",
                    format!("{part:?} is not key=value (the form is PATTERN,key=value,...)"),
                ));
            };
            spec.set(key.trim(), value)?;
        }
        spec.check()?;
        Ok(spec)
    }

    /// Checks the quota as a whole: a rate at least, each burst with its
    /// rate, bursts of at least one event or byte.
    pub fn check(&self) -> Result<(), QuotaSpecError> {
        if self.events_per_sec.is_none() && self.bytes_per_sec.is_none() {
            return Err(QuotaSpecError::new("quota", "sets no rate: give events_per_sec, bytes_per_sec or both"));
        }
        if self.burst_events.is_some() && self.events_per_sec.is_none() {
            return Err(QuotaSpecError::new("burst_events", "is set without events_per_sec"));
        }
        if self.burst_bytes.is_some() && self.bytes_per_sec.is_none() {
            return Err(QuotaSpecError::new("burst_bytes", "is set without bytes_per_sec"));
        }
        if self.burst_events == Some(0) {
            return Err(QuotaSpecError::new("burst_events", "must be at least 1 event"));
        }
        if self.burst_bytes == Some(0) {
            return Err(QuotaSpecError::new("burst_bytes", "must be at least 1 byte"));
        }
        Ok(())
    }

    /// The burst in events: as set, else one second's worth (at least 1).
    pub fn resolved_burst_events(&self) -> Option<u64> {
        let rate = self.events_per_sec?;
        Some(self.burst_events.unwrap_or_else(|| (rate.ceil() as u64).max(1)))
    }

    /// The burst in bytes: as set, else one second's worth.
    pub fn resolved_burst_bytes(&self) -> Option<u64> {
        let rate = self.bytes_per_sec?;
        Some(self.burst_bytes.unwrap_or(rate))
    }
}

impl fmt::Display for QuotaSpec {
    /// The `--quota` form, which [`QuotaSpec::parse_flag`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.pattern)?;
        if let Some(rate) = self.events_per_sec {
            write!(f, ",events_per_sec={rate}")?;
        }
        if let Some(rate) = self.bytes_per_sec {
            write!(f, ",bytes_per_sec={rate}")?;
        }
        if let Some(burst) = self.burst_events {
            write!(f, ",burst_events={burst}")?;
        }
        if let Some(burst) = self.burst_bytes {
            write!(f, ",burst_bytes={burst}")?;
        }
        Ok(())
    }
}

fn not_positive(key: &'static str, text: &str) -> QuotaSpecError {
    QuotaSpecError::new(key, format!("must be > 0, got {text:?}"))
}

/// Events per second: a finite number above zero.
fn parse_rate(key: &'static str, text: &str) -> Result<f64, QuotaSpecError> {
    let rate: f64 = text.parse().map_err(|_| QuotaSpecError::new(key, format!("{text:?} is not a number")))?;
    if !rate.is_finite() {
        return Err(QuotaSpecError::new(key, format!("{text:?} is not a finite number")));
    }
    if rate <= 0.0 {
        return Err(not_positive(key, text));
    }
    Ok(rate)
}

/// A whole number of events above zero.
fn parse_count(key: &'static str, text: &str) -> Result<u64, QuotaSpecError> {
    if text.starts_with('-') {
        return Err(QuotaSpecError::new(key, format!("must be at least 1 event, got {text:?}")));
    }
    let count: u64 = text.parse().map_err(|_| QuotaSpecError::new(key, format!("{text:?} is not a whole number")))?;
    if count == 0 {
        return Err(QuotaSpecError::new(key, "must be at least 1 event, got 0"));
    }
    Ok(count)
}

/// A byte count above zero: a whole number with an optional unit.
pub fn parse_bytes(key: &'static str, text: &str) -> Result<u64, QuotaSpecError> {
    const UNITS: [(&str, u64); 7] = [
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("kB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("B", 1),
    ];
    if text.starts_with('-') {
        return Err(not_positive(key, text));
    }
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let unit = unit.trim();
    let multiplier = if unit.is_empty() {
        1
    } else {
        UNITS.iter().find(|(name, _)| *name == unit).map(|(_, multiplier)| *multiplier).ok_or_else(|| {
            QuotaSpecError::new(key, format!("unknown unit {unit:?} in {text:?}: use B, KiB, MiB, GiB, kB, MB or GB"))
        })?
    };
    let number: u64 = number
        .parse()
        .map_err(|_| QuotaSpecError::new(key, format!("{text:?} is not a whole number of bytes such as 1MiB")))?;
    if number == 0 {
        return Err(not_positive(key, text));
    }
    number.checked_mul(multiplier).ok_or_else(|| QuotaSpecError::new(key, format!("{text:?} is too large")))
}

/// One dimension of a quota's bucket (events or bytes): a pure state
/// machine over the instants it is given.
#[derive(Debug, Clone, PartialEq)]
struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    /// Below zero after a write larger than the burst.
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    fn new(rate_per_sec: f64, burst: u64, now: Instant) -> Self {
        assert!(rate_per_sec > 0.0 && rate_per_sec.is_finite(), "a checked rate");
        assert!(burst >= 1, "a checked burst");
        Self { rate_per_sec, burst: burst as f64, tokens: burst as f64, refilled_at: now }
    }

    fn refill(&mut self, now: Instant) {
        // An instant before the last refill (a caller's clock read earlier)
        // adds nothing rather than going back.
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate_per_sec).min(self.burst);
        self.refilled_at = self.refilled_at.max(now);
    }

    /// How long until `amount` may be taken; zero if it may now. A write
    /// larger than the burst needs a full bucket.
    fn wait_for(&self, amount: u64) -> Duration {
        // Nothing to take (an empty append, refused later by the store, or
        // a bytes bucket and events without payload) never waits.
        if amount == 0 {
            return Duration::ZERO;
        }
        let needed = (amount as f64).min(self.burst);
        if self.tokens >= needed {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((needed - self.tokens) / self.rate_per_sec)
    }

    fn take(&mut self, amount: u64) {
        self.tokens -= amount as f64;
    }
}

/// The two buckets of one quota.
#[derive(Debug)]
struct Buckets {
    events: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

/// Counters of one quota since the node started.
#[derive(Debug, Default)]
struct QuotaCounters {
    admitted_events: AtomicU64,
    admitted_bytes: AtomicU64,
    rejected_requests: AtomicU64,
    rejected_events: AtomicU64,
    rejected_bytes: AtomicU64,
}

#[derive(Debug)]
struct Quota {
    spec: QuotaSpec,
    buckets: Mutex<Buckets>,
    counters: QuotaCounters,
}

fn lock(mutex: &Mutex<Buckets>) -> MutexGuard<'_, Buckets> {
    // A bucket is consistent after every single operation; a panic while
    // one was held cannot leave it half-updated.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A write refused by a quota; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRefusal {
    /// The stream written to.
    pub stream: String,
    /// The pattern of the quota that refused.
    pub pattern: String,
    /// The rate that refused, as `1000 events/s` or `1048576 bytes/s`.
    pub rate: String,
    /// How long until the bucket holds the write's tokens, in milliseconds
    /// from the check (rounded up, at least 1).
    pub wait_ms: u64,
    /// How long the node holds the refusal before answering it.
    pub hold: Duration,
    /// What remains of the wait once the refusal is answered, in
    /// milliseconds (at least 1): the advice sent to the client.
    pub retry_after_ms: u64,
}

impl fmt::Display for QuotaRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ingest quota for {} exceeded ({}); retry after {} ms", self.pattern, self.rate, self.retry_after_ms)
    }
}

impl QuotaRefusal {
    /// The wire detail: `RESOURCE_EXHAUSTED` (103), the message, the
    /// stream and `retry_after_ms`.
    pub fn to_error_detail(&self) -> v1::ErrorDetail {
        v1::ErrorDetail {
            code: RESOURCE_EXHAUSTED,
            message: self.to_string(),
            stream: Some(self.stream.clone()),
            retry_after_ms: Some(self.retry_after_ms),
            ..v1::ErrorDetail::default()
        }
    }
}

/// One quota's settings and counters at one moment, for `/metrics` and
/// `/v1/stats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaFigures {
    /// The pattern.
    pub pattern: String,
    /// Events per second, if limited.
    pub events_per_sec: Option<f64>,
    /// Payload bytes per second, if limited.
    pub bytes_per_sec: Option<u64>,
    /// Events admitted through this quota.
    pub admitted_events: u64,
    /// Payload bytes admitted through this quota.
    pub admitted_bytes: u64,
    /// Writes this quota refused.
    pub rejected_requests: u64,
    /// Events of the writes this quota refused.
    pub rejected_events: u64,
    /// Payload bytes of the writes this quota refused.
    pub rejected_bytes: u64,
}

/// Why a set of quotas cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotasError {
    /// More quotas than [`NODE_QUOTAS_MAX`].
    #[error("{count} quotas configured, more than the maximum of {max}")]
    TooMany {
        /// Quotas given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// One quota is wrong.
    #[error("quota[{index}].{source}")]
    Invalid {
        /// Its index in declared order, from 0.
        index: usize,
        /// What is wrong.
        source: QuotaSpecError,
    },
    /// Two quotas have the same pattern.
    #[error("quota[{index}].pattern: {pattern} is already the pattern of quota[{first}]")]
    Duplicate {
        /// The second one's index.
        index: usize,
        /// The first one's index.
        first: usize,
        /// The pattern.
        pattern: String,
    },
}

/// The node's quotas, in declared order; see the module docs.
#[derive(Debug, Default)]
pub struct Quotas {
    quotas: Vec<Quota>,
}

impl Quotas {
    /// Checks `specs` and builds their buckets, full at `now`.
    pub fn new(specs: Vec<QuotaSpec>, now: Instant) -> Result<Self, QuotasError> {
        if specs.len() > NODE_QUOTAS_MAX {
            return Err(QuotasError::TooMany { count: specs.len(), max: NODE_QUOTAS_MAX });
        }
        let mut quotas: Vec<Quota> = Vec::with_capacity(specs.len());
        for (index, spec) in specs.into_iter().enumerate() {
            spec.check().map_err(|source| QuotasError::Invalid { index, source })?;
            if let Some(first) = quotas.iter().position(|quota| quota.spec.pattern == spec.pattern) {
                return Err(QuotasError::Duplicate { index, first, pattern: spec.pattern.to_string() });
            }
            let events = spec.events_per_sec.zip(spec.resolved_burst_events());
            let bytes = spec.bytes_per_sec.zip(spec.resolved_burst_bytes());
            let buckets = Buckets {
                events: events.map(|(rate, burst)| TokenBucket::new(rate, burst, now)),
                bytes: bytes.map(|(rate, burst)| TokenBucket::new(rate as f64, burst, now)),
            };
            quotas.push(Quota { spec, buckets: Mutex::new(buckets), counters: QuotaCounters::default() });
        }
        Ok(Self { quotas })
    }

    /// No quota at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// How many quotas there are.
    pub fn len(&self) -> usize {
        self.quotas.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.quotas.is_empty()
    }

    /// Admits or refuses a write of `events` events and `payload_bytes`
    /// bytes (data plus metadata) to `stream`, now; see the module docs.
    pub fn admit(&self, stream: &StreamName, events: u64, payload_bytes: u64) -> Result<(), QuotaRefusal> {
        if self.quotas.is_empty() {
            return Ok(());
        }
        self.admit_at(stream, events, payload_bytes, Instant::now())
    }

    /// [`Quotas::admit`] at the instant `now`.
    pub fn admit_at(
        &self,
        stream: &StreamName,
        events: u64,
        payload_bytes: u64,
        now: Instant,
    ) -> Result<(), QuotaRefusal> {
        let matching: Vec<&Quota> = self.quotas.iter().filter(|quota| quota.spec.pattern.matches(stream)).collect();
        if matching.is_empty() {
            return Ok(());
        }
        // Every matching bucket is locked, in declared order, until all have
        // been checked and either all or none have given their tokens.
        let mut guards: Vec<MutexGuard<'_, Buckets>> = matching.iter().map(|quota| lock(&quota.buckets)).collect();
        // The longest wait among the refusing buckets, and who refused.
        // `bytes` says which of its buckets refused.
        let mut refusal: Option<(Duration, usize, bool)> = None;
        let mut refused = vec![false; matching.len()];
        for (index, guard) in guards.iter_mut().enumerate() {
            let buckets: &mut Buckets = guard;
            let checks = [(buckets.events.as_mut(), events, false), (buckets.bytes.as_mut(), payload_bytes, true)];
            for (bucket, amount, bytes) in checks {
                let Some(bucket) = bucket else { continue };
                bucket.refill(now);
                let wait = bucket.wait_for(amount);
                if wait > Duration::ZERO {
                    refused[index] = true;
                    if refusal.is_none_or(|(longest, _, _)| wait > longest) {
                        refusal = Some((wait, index, bytes));
                    }
                }
            }
        }
        if let Some((wait, index, bytes)) = refusal {
            drop(guards);
            for (quota, _) in matching.iter().zip(&refused).filter(|(_, refused)| **refused) {
                quota.counters.rejected_requests.fetch_add(1, Ordering::Relaxed);
                quota.counters.rejected_events.fetch_add(events, Ordering::Relaxed);
                quota.counters.rejected_bytes.fetch_add(payload_bytes, Ordering::Relaxed);
            }
            let wait_ms = u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX).max(1);
            let hold_ms = wait_ms.clamp(NODE_QUOTA_REFUSAL_HOLD_MS_MIN, NODE_QUOTA_REFUSAL_HOLD_MS_MAX);
            let retry_after_ms = wait_ms.saturating_sub(hold_ms).max(1);
            let spec = &matching[index].spec;
            let rate = match (bytes, spec.events_per_sec, spec.bytes_per_sec) {
                (false, Some(rate), _) => format!("{rate} events/s"),
                (true, _, Some(rate)) => format!("{rate} bytes/s"),
                _ => unreachable!("a bucket exists only with its rate"),
            };
            return Err(QuotaRefusal {
                stream: stream.as_str().to_owned(),
                pattern: spec.pattern.to_string(),
                rate,
                wait_ms,
                hold: Duration::from_millis(hold_ms),
                retry_after_ms,
            });
        }
        for buckets in &mut guards {
            if let Some(bucket) = buckets.events.as_mut() {
                bucket.take(events);
            }
            if let Some(bucket) = buckets.bytes.as_mut() {
                bucket.take(payload_bytes);
            }
        }
        drop(guards);
        for quota in matching {
            quota.counters.admitted_events.fetch_add(events, Ordering::Relaxed);
            quota.counters.admitted_bytes.fetch_add(payload_bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Every quota's settings and counters, in declared order.
    pub fn figures(&self) -> Vec<QuotaFigures> {
        self.quotas
            .iter()
            .map(|quota| {
                let counters = &quota.counters;
                QuotaFigures {
                    pattern: quota.spec.pattern.to_string(),
                    events_per_sec: quota.spec.events_per_sec,
                    bytes_per_sec: quota.spec.bytes_per_sec,
                    admitted_events: counters.admitted_events.load(Ordering::Relaxed),
                    admitted_bytes: counters.admitted_bytes.load(Ordering::Relaxed),
                    rejected_requests: counters.rejected_requests.load(Ordering::Relaxed),
                    rejected_events: counters.rejected_events.load(Ordering::Relaxed),
                    rejected_bytes: counters.rejected_bytes.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> QuotaSpec {
        QuotaSpec::parse_flag(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn stream(name: &str) -> StreamName {
        StreamName::new(name).unwrap()
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn flags_parse_with_units_and_defaults() {
        let quota = spec("telemetry.>,events_per_sec=1000,bytes_per_sec=1MiB,burst_bytes=2 MiB");
        assert_eq!(quota.pattern.as_str(), "telemetry.>");
        assert_eq!(quota.events_per_sec, Some(1000.0));
        assert_eq!(quota.bytes_per_sec, Some(1 << 20));
        assert_eq!(quota.resolved_burst_events(), Some(1000));
        assert_eq!(quota.resolved_burst_bytes(), Some(2 << 20));
        assert_eq!(spec("a.*,events_per_sec=0.5").resolved_burst_events(), Some(1), "at least one event");
        assert_eq!(spec("a,bytes_per_sec=10kB").bytes_per_sec, Some(10_000));
        assert_eq!(spec("a,bytes_per_sec=7").bytes_per_sec, Some(7));
        let round_trip = spec("a.>,events_per_sec=2.5,bytes_per_sec=100,burst_events=3,burst_bytes=400");
        assert_eq!(spec(&round_trip.to_string()), round_trip);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let error = |text: &str| QuotaSpec::parse_flag(text).unwrap_err().to_string();
        assert!(error("tele metry.>,events_per_sec=1").starts_with("pattern: "), "{}", error("tele metry.>"));
        assert!(error("a.>.b,events_per_sec=1").starts_with("pattern: "));
        assert_eq!(error("a,events_per_sec=0"), "events_per_sec: must be > 0, got \"0\"");
        assert_eq!(error("a,events_per_sec=-5"), "events_per_sec: must be > 0, got \"-5\"");
        assert_eq!(error("a,events_per_sec=fast"), "events_per_sec: \"fast\" is not a number");
        assert_eq!(error("a,events_per_sec=inf"), "events_per_sec: \"inf\" is not a finite number");
        assert_eq!(error("a,bytes_per_sec=0MiB"), "bytes_per_sec: must be > 0, got \"0MiB\"");
        assert_eq!(error("a,bytes_per_sec=-1"), "bytes_per_sec: must be > 0, got \"-1\"");
        assert!(error("a,bytes_per_sec=1 parsec").starts_with("bytes_per_sec: unknown unit \"parsec\""));
        assert!(error("a,bytes_per_sec=1.5MiB").starts_with("bytes_per_sec: unknown unit \".5MiB\""));
        assert_eq!(error("a,events_per_sec=5,burst_events=0"), "burst_events: must be at least 1 event, got 0");
        assert_eq!(error("a,events_per_sec=5,burst_events=0.5"), "burst_events: \"0.5\" is not a whole number");
        assert_eq!(error("a,burst_events=5,bytes_per_sec=1"), "burst_events: is set without events_per_sec");
        assert_eq!(error("a"), "quota: sets no rate: give events_per_sec, bytes_per_sec or both");
        assert_eq!(error("a,events_per_sec=1,events_per_sec=2"), "events_per_sec: given twice");
        assert!(error("a,events=1").starts_with("quota: unknown key \"events\""));
        assert!(error("a,events_per_sec").starts_with("quota: \"events_per_sec\" is not key=value"));
    }

    #[test]
    fn sets_of_quotas_are_bounded_and_distinct() {
        let now = Instant::now();
        let many = vec![spec("a,events_per_sec=1"); NODE_QUOTAS_MAX + 1];
        assert_eq!(
            Quotas::new(many, now).unwrap_err(),
            QuotasError::TooMany { count: NODE_QUOTAS_MAX + 1, max: NODE_QUOTAS_MAX }
        );
        let twice = vec![spec("a,events_per_sec=1"), spec("b,events_per_sec=1"), spec("a,events_per_sec=2")];
        assert_eq!(
            Quotas::new(twice, now).unwrap_err().to_string(),
            "quota[2].pattern: a is already the pattern of quota[0]"
        );
        let mut unchecked = spec("a,events_per_sec=1");
        unchecked.burst_events = Some(0);
        assert_eq!(
            Quotas::new(vec![spec("b,events_per_sec=1"), unchecked], now).unwrap_err().to_string(),
            "quota[1].burst_events: must be at least 1 event"
        );
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate_and_says_when_to_retry() {
        let start = Instant::now();
        let quotas = Quotas::new(vec![spec("telemetry.>,events_per_sec=1000,burst_events=10")], start).unwrap();
        let telemetry = stream("telemetry.t1");
        for _ in 0..10 {
            quotas.admit_at(&telemetry, 1, 10, start).expect("within the burst");
        }
        let refusal = quotas.admit_at(&telemetry, 1, 10, start).unwrap_err();
        assert_eq!(refusal.pattern, "telemetry.>");
        assert_eq!(refusal.wait_ms, 1, "one event refills in 1 ms");
        assert_eq!((refusal.hold, refusal.retry_after_ms), (ms(20), 1), "held 20 ms at least, then retry at once");
        assert_eq!(refusal.to_string(), "ingest quota for telemetry.> exceeded (1000 events/s); retry after 1 ms");
        let refusal = quotas.admit_at(&telemetry, 5, 50, start).unwrap_err();
        assert_eq!(refusal.wait_ms, 5);
        // Refilled after the advised wait.
        quotas.admit_at(&telemetry, 5, 50, start + ms(5)).expect("refilled");
        // Other streams are not limited.
        for _ in 0..100 {
            quotas.admit_at(&stream("alerts.a1"), 1, 10, start).expect("no quota");
        }
        let figures = quotas.figures();
        assert_eq!(figures.len(), 1);
        let figures = &figures[0];
        assert_eq!((figures.admitted_events, figures.admitted_bytes), (15, 150));
        assert_eq!((figures.rejected_requests, figures.rejected_events, figures.rejected_bytes), (2, 6, 60));
        let detail = refusal.to_error_detail();
        assert_eq!((detail.code, detail.retry_after_ms), (103, Some(1)));
        assert_eq!(detail.stream.as_deref(), Some("telemetry.t1"));
    }

    #[test]
    fn a_write_larger_than_the_burst_needs_a_full_bucket_and_leaves_a_debt() {
        let start = Instant::now();
        let quotas = Quotas::new(vec![spec("t.>,events_per_sec=10,burst_events=5")], start).unwrap();
        let t = stream("t.x");
        quotas.admit_at(&t, 8, 0, start).expect("a full bucket admits a larger write");
        // 3 events of debt: one event needs 400 ms.
        let refusal = quotas.admit_at(&t, 1, 0, start).unwrap_err();
        assert_eq!((refusal.wait_ms, refusal.hold, refusal.retry_after_ms), (400, ms(100), 300), "held 100 ms at most");
        let refusal = quotas.admit_at(&t, 8, 0, start + ms(500)).unwrap_err();
        assert_eq!((refusal.wait_ms, refusal.hold, refusal.retry_after_ms), (300, ms(100), 200));
        let refusal = quotas.admit_at(&t, 8, 0, start + ms(750)).unwrap_err();
        assert_eq!((refusal.wait_ms, refusal.hold, refusal.retry_after_ms), (50, ms(50), 1), "held for the wait");
        quotas.admit_at(&t, 8, 0, start + ms(800)).expect("full again");
        // In debt, a write with nothing to take is not the quota's to refuse.
        quotas.admit_at(&t, 0, 0, start + ms(800)).expect("nothing to take");
    }

    #[test]
    fn every_matching_quota_must_admit_and_tokens_are_taken_from_all_or_none() {
        let start = Instant::now();
        let quotas = Quotas::new(
            vec![spec("t.>,events_per_sec=100,burst_events=100"), spec("t.noisy.*,bytes_per_sec=100,burst_bytes=100")],
            start,
        )
        .unwrap();
        let noisy = stream("t.noisy.n1");
        quotas.admit_at(&noisy, 1, 60, start).expect("both admit");
        let refusal = quotas.admit_at(&noisy, 1, 60, start).unwrap_err();
        assert_eq!((refusal.pattern.as_str(), refusal.rate.as_str()), ("t.noisy.*", "100 bytes/s"));
        assert_eq!(refusal.wait_ms, 200, "20 bytes short at 100 bytes/s");
        let figures = quotas.figures();
        assert_eq!(figures[0].admitted_events, 1, "the refused write took no token from t.>");
        assert_eq!(figures[0].rejected_requests, 0, "t.> did not refuse");
        assert_eq!((figures[1].rejected_requests, figures[1].rejected_bytes), (1, 60));
        // t.> still has 99 events for streams outside t.noisy.*.
        for _ in 0..99 {
            quotas.admit_at(&stream("t.quiet"), 1, 1000, start).expect("t.> admits");
        }
        let refusal = quotas.admit_at(&stream("t.quiet"), 1, 0, start).unwrap_err();
        assert_eq!((refusal.pattern.as_str(), refusal.rate.as_str()), ("t.>", "100 events/s"));
        // When both refuse, the longer wait is named.
        let refusal = quotas.admit_at(&noisy, 1, 100, start).unwrap_err();
        assert_eq!((refusal.pattern.as_str(), refusal.wait_ms), ("t.noisy.*", 600));
    }

    #[test]
    fn admitted_tokens_never_exceed_burst_plus_rate_times_time() {
        let start = Instant::now();
        let quotas = Quotas::new(vec![spec("t.>,events_per_sec=250,burst_events=40")], start).unwrap();
        let t = stream("t.x");
        let mut admitted = 0u64;
        // 10 s in steps of 0.1 ms, hammering three writes per step.
        for step in 0..100_000u64 {
            let now = start + Duration::from_micros(step * 100);
            for _ in 0..3 {
                if quotas.admit_at(&t, 1, 0, now).is_ok() {
                    admitted += 1;
                }
            }
            let bound = 40.0 + 250.0 * (step as f64 * 1e-4);
            assert!(admitted as f64 <= bound + 1e-6, "step {step}: {admitted} admitted, bound {bound}");
        }
        assert!(admitted >= 40 + 2490, "the bucket kept its rate: {admitted}");
    }

    #[test]
    fn an_earlier_instant_adds_no_tokens() {
        let start = Instant::now();
        let later = start + ms(1000);
        let mut bucket = TokenBucket::new(10.0, 10, start);
        bucket.take(10);
        bucket.refill(later);
        assert_eq!(bucket.tokens, 10.0);
        bucket.take(10);
        bucket.refill(start);
        assert_eq!(bucket.tokens, 0.0);
        assert_eq!(bucket.refilled_at, later);
    }
}
