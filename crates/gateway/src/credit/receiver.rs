//! The receiving side of a route's credit: checks data frames against what
//! was granted, measures RTT and delivery rate, sizes the window and issues
//! absolute grants.

use std::collections::VecDeque;

use super::{
    Amount, BANDWIDTH_INTERVAL_MS_MIN, BANDWIDTH_SAMPLES, CreditConfigError, GRANT_DUE_FRACTION, Grant,
    PACE_QUEUE_CYCLE_DIVISOR, PACE_QUEUE_MS_MIN, PINGS_OUTSTANDING_MAX, RTT_BUCKETS, RTT_WINDOW_MS_DEFAULT, Violation,
    WINDOW_GAIN_PERCENT_DEFAULT, WINDOW_MAX_DEFAULT, WINDOW_MIN_DEFAULT,
};

/// The smallest and largest window the receiver grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowBounds {
    /// The window before anything is measured, and the floor after.
    pub min: Amount,
    /// The ceiling: `received - durable` never exceeds it (but for one idle-rule event).
    pub max: Amount,
}

/// How a receiver sizes its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Bounds of the window.
    pub bounds: WindowBounds,
    /// Window = `gain_percent / 100 × bandwidth × min RTT` (default 200).
    pub gain_percent: u32,
    /// Horizon of the min-RTT filter (default 10 000 ms).
    pub rtt_window_ms: u64,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            bounds: WindowBounds { min: WINDOW_MIN_DEFAULT, max: WINDOW_MAX_DEFAULT },
            gain_percent: WINDOW_GAIN_PERCENT_DEFAULT,
            rtt_window_ms: RTT_WINDOW_MS_DEFAULT,
        }
    }
}

impl ReceiverConfig {
    /// Checks that the configuration can work: a smallest window of at
    /// least one event and one byte, bounds in order, a gain above zero and
    /// an RTT horizon of at least one millisecond per filter bucket.
    pub fn validate(&self) -> Result<(), CreditConfigError> {
        let WindowBounds { min, max } = self.bounds;
        if min.events == 0 || min.bytes == 0 {
            return Err(CreditConfigError::WindowMinZero { min });
        }
        if !min.fits_within(max) {
            return Err(CreditConfigError::WindowBoundsInverted { min, max });
        }
        if self.gain_percent == 0 {
            return Err(CreditConfigError::GainZero);
        }
        if self.rtt_window_ms < RTT_BUCKETS as u64 {
            return Err(CreditConfigError::RttWindowTooShort {
                rtt_window_ms: self.rtt_window_ms,
                buckets: RTT_BUCKETS as u64,
            });
        }
        Ok(())
    }
}

/// Minimum RTT over a sliding horizon, kept as the minimum of each of
/// [`RTT_BUCKETS`] time buckets: constant memory whatever the echo rate.
#[derive(Debug, Clone)]
struct RttFilter {
    bucket_ms: u64,
    /// `(bucket index, minimum RTT in it)`, slot = index % RTT_BUCKETS.
    buckets: [Option<(u64, u64)>; RTT_BUCKETS],
    /// The latest sample, used when every bucket has aged out.
    last_ms: Option<u64>,
}

impl RttFilter {
    fn new(rtt_window_ms: u64) -> Self {
        RttFilter {
            bucket_ms: (rtt_window_ms / RTT_BUCKETS as u64).max(1),
            buckets: [None; RTT_BUCKETS],
            last_ms: None,
        }
    }

    fn insert(&mut self, now_ms: u64, rtt_ms: u64) {
        let index = now_ms / self.bucket_ms;
        let slot = &mut self.buckets[(index % RTT_BUCKETS as u64) as usize];
        *slot = match *slot {
            Some((slot_index, min_ms)) if slot_index == index => Some((index, min_ms.min(rtt_ms))),
            _ => Some((index, rtt_ms)),
        };
        self.last_ms = Some(rtt_ms);
    }

    fn min(&self, now_ms: u64) -> Option<u64> {
        let index = now_ms / self.bucket_ms;
        let oldest = index.saturating_sub(RTT_BUCKETS as u64 - 1);
        let in_horizon = self
            .buckets
            .iter()
            .flatten()
            .filter(|&&(slot_index, _)| slot_index >= oldest && slot_index <= index)
            .map(|&(_, min_ms)| min_ms)
            .min();
        in_horizon.or(self.last_ms)
    }
}

/// One delivery-rate interval: durable progress over at least one RTT.
#[derive(Debug, Clone, Copy)]
struct DeliverySample {
    bytes_per_s: u64,
    delivered: Amount,
}

/// Delivery rate of durable bytes: the maximum over the last
/// [`BANDWIDTH_SAMPLES`] intervals, so idle or app-limited intervals do not
/// shrink the window until they are all that is left.
#[derive(Debug, Clone)]
struct DeliveryFilter {
    start_ms: u64,
    start: Amount,
    samples: VecDeque<DeliverySample>,
    /// Startup: the bandwidth to beat by [`PIPE_FULL_GROWTH_PERCENT`], and
    /// how many samples in a row did not ([`PIPE_FULL_SAMPLES`] of them and
    /// the pipe is full: the window, not the link, had limited the rate).
    full_bw: u64,
    samples_without_growth: u32,
    /// The sender said, during the open interval, that it had nothing
    /// more to send ([`CreditReceiver::on_app_limited`]).
    app_limited: bool,
}

/// Startup ends when the bandwidth has not grown by this much ...
const PIPE_FULL_GROWTH_PERCENT: u64 = 125;
/// ... over this many delivery samples in a row (BBR's full-pipe test).
const PIPE_FULL_SAMPLES: u32 = 3;

impl DeliveryFilter {
    fn on_durable(&mut self, durable: Amount, now_ms: u64, rtt_ms: Option<u64>) {
        let elapsed_ms = now_ms.saturating_sub(self.start_ms);
        let interval_ms = rtt_ms.unwrap_or(0).max(BANDWIDTH_INTERVAL_MS_MIN);
        // An interval without progress stays open: a later sample then
        // spans the idle time and is low, which the max filter discards.
        if elapsed_ms < interval_ms || durable.events == self.start.events {
            return;
        }
        let delivered = durable.saturating_sub(self.start);
        let bytes_per_s = u128::from(delivered.bytes) * 1000 / u128::from(elapsed_ms);
        let bytes_per_s = u64::try_from(bytes_per_s).unwrap_or(u64::MAX);
        let app_limited = std::mem::take(&mut self.app_limited);
        if app_limited && self.bandwidth_bytes_per_s().is_some_and(|bandwidth| bytes_per_s < bandwidth) {
            // The sender ran out of data, not the link out of capacity:
            // the sample says nothing about the link (BBR's rule). Kept, a
            // trickle after a busy period would bring the estimate, the
            // window and the pace down to the trickle, and the next burst
            // would have to grow them again from there.
            self.start_ms = now_ms;
            self.start = durable;
            return;
        }
        if self.samples.len() == BANDWIDTH_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(DeliverySample { bytes_per_s, delivered });
        self.start_ms = now_ms;
        self.start = durable;
        let bandwidth = self.bandwidth_bytes_per_s().unwrap_or(0);
        if u128::from(bandwidth) * 100 >= u128::from(self.full_bw) * u128::from(PIPE_FULL_GROWTH_PERCENT) {
            self.full_bw = bandwidth;
            self.samples_without_growth = 0;
        } else {
            self.samples_without_growth = self.samples_without_growth.saturating_add(1);
        }
    }

    /// True once the bandwidth stopped growing: the link, not the window,
    /// limits the rate (it stays true for the session).
    fn pipe_full(&self) -> bool {
        self.samples_without_growth >= PIPE_FULL_SAMPLES
    }

    fn bandwidth_bytes_per_s(&self) -> Option<u64> {
        self.samples.iter().map(|sample| sample.bytes_per_s).max()
    }

    /// Mean size of the events delivered in the sampled intervals, at least 1.
    fn mean_event_bytes(&self) -> Option<u64> {
        let delivered = self.samples.iter().fold(Amount::ZERO, |sum, sample| sum.saturating_add(sample.delivered));
        (delivered.events > 0).then(|| (delivered.bytes / delivered.events).max(1))
    }
}

/// The RTT probe: every so often the window drops to its minimum until the
/// data pipe has drained, so that an echo measures the path without the
/// queue that the window itself builds up (BBR's ProbeRTT, done by credit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Off,
    /// The window is held at the minimum until `until_ms`, one current RTT
    /// (queueing included) plus one minimum RTT: what was granted before has arrived.
    Draining {
        until_ms: u64,
    },
    /// The pipe is drained; a ping issued from `since_ms` on measures the
    /// path; the probe ends with its echo or at `until_ms`.
    Measuring {
        since_ms: u64,
        until_ms: u64,
    },
}

/// The receiver's credit state for one link session (see the module doc
/// for the rules). Created when the session starts, dropped when it ends.
#[derive(Debug, Clone)]
pub struct CreditReceiver {
    config: ReceiverConfig,
    received: Amount,
    durable: Amount,
    /// The highest `up_to` ever granted (component-wise); data beyond it is a violation.
    limit: Amount,
    /// The current target window.
    window: Amount,
    /// `(ping id, issued at)`, oldest first, at most [`PINGS_OUTSTANDING_MAX`].
    pings: VecDeque<(u64, u64)>,
    ping_next: u64,
    rtt: RttFilter,
    rtt_ms: Option<u64>,
    /// When an RTT sample last confirmed the filter's minimum (a sample at or below it).
    rtt_confirmed_ms: u64,
    /// When the newest ping was issued.
    ping_issued_ms: Option<u64>,
    probe: Probe,
    delivery: DeliveryFilter,
    /// Recent service times (frame arrival → durable), newest last.
    service_ms: VecDeque<u64>,
    /// Recent frame sizes in bytes, newest last.
    frame_bytes: VecDeque<u64>,
}

/// Service-time and frame-size samples kept for the window's cycle.
pub const SERVICE_SAMPLES: usize = 32;

impl CreditReceiver {
    /// A receiver for a new session; the window starts at `bounds.min`.
    ///
    /// # Panics
    ///
    /// When the configuration is invalid; see [`ReceiverConfig::validate`].
    pub fn new(config: ReceiverConfig, now_ms: u64) -> Self {
        match Self::try_new(config, now_ms) {
            Ok(receiver) => receiver,
            Err(error) => panic!("invalid credit receiver configuration: {error}"),
        }
    }

    /// A receiver for a new session, or why the configuration cannot work.
    pub fn try_new(config: ReceiverConfig, now_ms: u64) -> Result<Self, CreditConfigError> {
        config.validate()?;
        Ok(CreditReceiver {
            config,
            received: Amount::ZERO,
            durable: Amount::ZERO,
            limit: Amount::ZERO,
            window: config.bounds.min,
            pings: VecDeque::with_capacity(PINGS_OUTSTANDING_MAX),
            ping_next: 1,
            rtt: RttFilter::new(config.rtt_window_ms),
            rtt_ms: None,
            rtt_confirmed_ms: now_ms,
            ping_issued_ms: None,
            probe: Probe::Off,
            delivery: DeliveryFilter {
                start_ms: now_ms,
                start: Amount::ZERO,
                samples: VecDeque::new(),
                full_bw: 0,
                samples_without_growth: 0,
                app_limited: false,
            },
            service_ms: VecDeque::with_capacity(SERVICE_SAMPLES),
            frame_bytes: VecDeque::with_capacity(SERVICE_SAMPLES),
        })
    }

    /// A data frame arrived: its first seq and its events and bytes.
    ///
    /// Errs, changing nothing, when the frame does not start where the last
    /// one ended ([`Violation::Gap`]) or goes past the highest limit ever
    /// granted ([`Violation::BeyondCredit`]), with the idle rule: a frame of
    /// exactly one event may exceed the bytes when it starts with
    /// everything received durable. A frame of no events (carrying only an
    /// echo) must still start at the right seq.
    ///
    /// # Panics
    ///
    /// When `events` is 0 but `bytes` is not (the driver counts bytes of events).
    pub fn on_data(&mut self, first_seq: u64, events: u64, bytes: u64, _now_ms: u64) -> Result<(), Violation> {
        assert!(events > 0 || bytes == 0, "a data frame of no events carries {bytes} bytes");
        if first_seq != self.received.events {
            return Err(Violation::Gap { expected: self.received.events, got: first_seq });
        }
        if events == 0 {
            // An echo-only frame uses no credit (received may be past the byte
            // limit after an idle-rule event, and stays there until it is durable).
            return Ok(());
        }
        let reached = self.received.saturating_add(Amount::new(events, bytes));
        let idle_rule = events == 1 && self.received == self.durable;
        let within = reached.events <= self.limit.events && (reached.bytes <= self.limit.bytes || idle_rule);
        if !within {
            return Err(Violation::BeyondCredit { limit: self.limit, reached });
        }
        self.received = reached;
        if self.frame_bytes.len() == SERVICE_SAMPLES {
            self.frame_bytes.pop_front();
        }
        self.frame_bytes.push_back(bytes);
        Ok(())
    }

    /// Everything up to `through` (cumulative) is durably written. A
    /// `through` below the current durable amount is stale and ignored.
    ///
    /// # Panics
    ///
    /// When `through` is beyond what was received, or its bytes go back
    /// while its events go forward (driver bugs).
    pub fn on_durable(&mut self, through: Amount, now_ms: u64) {
        assert!(through.events <= self.received.events, "durable {through} beyond received {}", self.received);
        assert!(through.bytes <= self.received.bytes, "durable {through} beyond received {}", self.received);
        if through.events < self.durable.events {
            return;
        }
        assert!(through.bytes >= self.durable.bytes, "durable bytes go back: {through} after {}", self.durable);
        assert!(
            through.events > self.durable.events || through.bytes == self.durable.bytes,
            "durable bytes change without events: {through} after {}",
            self.durable
        );
        self.durable = through;
        self.delivery.on_durable(through, now_ms, self.rtt_ms);
        self.refresh(now_ms);
    }

    /// The sender had nothing more to send when it sent its latest frame:
    /// the delivery interval now open does not lower the bandwidth
    /// estimate (a higher rate still raises it).
    pub fn on_app_limited(&mut self) {
        self.delivery.app_limited = true;
    }

    /// A frame that arrived `ms` milliseconds ago is now durable: the
    /// receiver's part of the loop a byte of credit travels (written, then
    /// acknowledged), added to the round-trip time when the window is sized.
    pub fn on_service_time(&mut self, ms: u64, now_ms: u64) {
        if self.service_ms.len() == SERVICE_SAMPLES {
            self.service_ms.pop_front();
        }
        self.service_ms.push_back(ms.min(self.config.rtt_window_ms));
        self.refresh(now_ms);
    }

    /// The sender echoed `ping`. Unknown, stale and duplicate echoes are
    /// ignored; a known one is an RTT sample and retires it and older pings.
    pub fn on_echo(&mut self, ping: u64, now_ms: u64) {
        let Some(&(_, issued_ms)) = self.pings.iter().find(|&&(id, _)| id == ping) else {
            return;
        };
        self.pings.retain(|&(id, _)| id > ping);
        let sample_ms = now_ms.saturating_sub(issued_ms);
        let confirms = self.rtt_ms.is_none_or(|min_ms| sample_ms <= min_ms);
        let clean = matches!(self.probe, Probe::Measuring { since_ms, .. } if issued_ms >= since_ms);
        self.rtt.insert(now_ms, sample_ms);
        if confirms || clean {
            self.rtt_confirmed_ms = now_ms;
        }
        if clean {
            self.probe = Probe::Off;
        }
        self.refresh(now_ms);
    }

    /// The grant to send now; call it on every heartbeat tick and when
    /// [`CreditReceiver::grant_due`]. `up_to` is `durable + window` but
    /// never below a limit granted before. Each grant carries a new ping
    /// unless [`PINGS_OUTSTANDING_MAX`] are unanswered, then the newest again.
    pub fn grant(&mut self, now_ms: u64) -> Grant {
        self.refresh(now_ms);
        self.limit = self.limit.max_each(self.durable.saturating_add(self.window));
        let horizon_ms = now_ms.saturating_sub(self.config.rtt_window_ms);
        self.pings.retain(|&(_, issued_ms)| issued_ms >= horizon_ms);
        if self.pings.len() < PINGS_OUTSTANDING_MAX {
            self.pings.push_back((self.ping_next, now_ms));
            self.ping_next += 1;
            self.ping_issued_ms = Some(now_ms);
        }
        let &(ping, ping_sent_ms) = self.pings.back().expect("a ping was just issued or is outstanding");
        assert!(self.durable.fits_within(self.limit), "durable {} beyond limit {}", self.durable, self.limit);
        Grant {
            up_to: self.limit,
            durable: self.durable,
            window: self.limit.saturating_sub(self.durable),
            ping,
            ping_sent_ms,
            pace_bytes: self.pace_bytes(),
        }
    }

    /// True when a grant now would raise the limit by at least a sixteenth
    /// ([`GRANT_DUE_FRACTION`]) of the window (events or bytes), or no grant was sent yet, or an RTT
    /// probe needs a fresh ping.
    pub fn grant_due(&self) -> bool {
        if let Probe::Measuring { since_ms, .. } = self.probe
            && self.ping_issued_ms.is_none_or(|issued_ms| issued_ms < since_ms)
        {
            return true;
        }
        let candidate = self.limit.max_each(self.durable.saturating_add(self.window));
        let raise = candidate.saturating_sub(self.limit);
        raise.events >= (self.window.events / GRANT_DUE_FRACTION).max(1)
            || raise.bytes >= (self.window.bytes / GRANT_DUE_FRACTION).max(1)
    }

    /// Everything received in this session.
    pub fn received(&self) -> Amount {
        self.received
    }

    /// Everything durably written.
    pub fn durable(&self) -> Amount {
        self.durable
    }

    /// The highest limit ever granted.
    pub fn limit(&self) -> Amount {
        self.limit
    }

    /// The current target window (the limit follows it as durable advances).
    pub fn window(&self) -> Amount {
        self.window
    }

    /// The minimum echo RTT over the horizon, once measured.
    pub fn rtt_ms(&self) -> Option<u64> {
        self.rtt_ms
    }

    /// The delivery rate of durable bytes (max filter), once measured.
    pub fn bandwidth_bytes_per_s(&self) -> Option<u64> {
        self.delivery.bandwidth_bytes_per_s()
    }

    /// True while an RTT probe holds the window at its minimum.
    pub fn probing(&self) -> bool {
        self.probe != Probe::Off
    }

    fn refresh(&mut self, now_ms: u64) {
        self.rtt_ms = self.rtt.min(now_ms);
        let horizon_ms = self.config.rtt_window_ms;
        self.probe = match (self.probe, self.rtt_ms) {
            // The minimum was not confirmed for 3/4 of the horizon: the
            // samples are inflated by queueing (or the path changed).
            // Probe before the old minimum ages out of the filter.
            (Probe::Off, Some(min_ms)) if now_ms.saturating_sub(self.rtt_confirmed_ms) >= horizon_ms / 4 * 3 => {
                let current_ms = self.rtt.last_ms.unwrap_or(min_ms).min(horizon_ms);
                Probe::Draining { until_ms: now_ms + current_ms + min_ms }
            }
            (Probe::Draining { until_ms }, _) if now_ms >= until_ms => {
                Probe::Measuring { since_ms: now_ms, until_ms: now_ms + horizon_ms / 8 }
            }
            (Probe::Measuring { until_ms, .. }, _) if now_ms >= until_ms => {
                // No echo came back: give up until the next probe is due.
                self.rtt_confirmed_ms = now_ms;
                Probe::Off
            }
            (probe, _) => probe,
        };
        self.window = if self.probing() { self.config.bounds.min } else { self.target_window() };
    }

    /// The loop a byte of credit travels: the path's round trip, the time
    /// to put a whole frame on the wire (the receiver acts on whole frames),
    /// and the receiver's write until durable (the largest of the recent
    /// ones: the window must not run dry while one write is slow). `None`
    /// before the RTT and the bandwidth are measured.
    pub fn cycle_ms(&self) -> Option<u64> {
        self.cycle_with_service_ms(self.service_ms.iter().copied().max().unwrap_or(0))
    }

    /// The cycle with a typical write (the upper quartile of the recent
    /// ones): what the pace keeps in flight. With the largest, one slow
    /// write would raise the pace for [`SERVICE_SAMPLES`] frames, and the
    /// excess would wait in the link's queue ahead of every lane (`edgebus
    /// bench wan` saw a critical event wait 100 ms behind such a surge).
    pub fn pace_cycle_ms(&self) -> Option<u64> {
        let mut service: Vec<u64> = self.service_ms.iter().copied().collect();
        service.sort_unstable();
        self.cycle_with_service_ms(service.get(service.len() * 3 / 4).copied().unwrap_or(0))
    }

    fn cycle_with_service_ms(&self, service_ms: u64) -> Option<u64> {
        let (Some(rtt_ms), Some(bandwidth)) = (self.rtt_ms, self.bandwidth_bytes_per_s()) else {
            return None;
        };
        let frame_ms = self.frame_bytes.iter().copied().max().unwrap_or(0).saturating_mul(1000) / bandwidth.max(1);
        Some(rtt_ms + service_ms + frame_ms)
    }

    /// Bytes in flight that keep the link busy with a short queue, 0 (no
    /// pacing) before the cycle is measured, during startup (until the
    /// bandwidth stops growing by a quarter per delivery interval for three
    /// intervals: the window's gain finds the link's rate fastest) and
    /// during an RTT probe: `bandwidth × (pace cycle + q)`, with the queue
    /// allowance `q = max(PACE_QUEUE_MS_MIN, cycle / PACE_QUEUE_CYCLE_DIVISOR)`.
    /// The sender counts a byte in flight until a grant acknowledges it;
    /// this assumes the driver grants at every durable step, as the
    /// gateway's receiver does, not only when [`CreditReceiver::grant_due`].
    pub fn pace_bytes(&self) -> u64 {
        let (Some(cycle_ms), Some(bandwidth)) = (self.pace_cycle_ms(), self.bandwidth_bytes_per_s()) else {
            return 0;
        };
        if self.probing() || !self.delivery.pipe_full() {
            return 0;
        }
        let queue_ms = (cycle_ms / PACE_QUEUE_CYCLE_DIVISOR).max(PACE_QUEUE_MS_MIN);
        let bytes = u128::from(bandwidth) * u128::from(cycle_ms + queue_ms) / 1000;
        u64::try_from(bytes).unwrap_or(u64::MAX).max(1)
    }

    fn target_window(&self) -> Amount {
        let WindowBounds { min, max } = self.config.bounds;
        let (Some(cycle_ms), Some(bandwidth)) = (self.cycle_ms(), self.bandwidth_bytes_per_s()) else {
            return min;
        };
        let product =
            u128::from(self.config.gain_percent) * u128::from(bandwidth) * u128::from(cycle_ms) / (100 * 1000);
        let bytes = u64::try_from(product).unwrap_or(u64::MAX).clamp(min.bytes, max.bytes);
        let events = match self.delivery.mean_event_bytes() {
            Some(mean_bytes) => bytes.div_ceil(mean_bytes).clamp(min.events, max.events),
            None => min.events,
        };
        Amount::new(events, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(min: Amount, max: Amount) -> ReceiverConfig {
        ReceiverConfig { bounds: WindowBounds { min, max }, gain_percent: 200, rtt_window_ms: 10_000 }
    }

    fn receiver() -> CreditReceiver {
        CreditReceiver::new(config(Amount::new(10, 1000), Amount::new(1000, 1_000_000)), 0)
    }

    #[test]
    fn first_grant_is_the_minimum_window_and_is_due() {
        let mut receiver = receiver();
        assert!(receiver.grant_due());
        let grant = receiver.grant(0);
        assert_eq!(grant.up_to, Amount::new(10, 1000));
        assert_eq!(grant.durable, Amount::ZERO);
        assert_eq!(grant.window, Amount::new(10, 1000));
        assert_eq!(grant.ping, 1);
        assert!(!receiver.grant_due());
        assert_eq!(receiver.window(), Amount::new(10, 1000));
        assert_eq!(receiver.rtt_ms(), None);
        assert_eq!(receiver.bandwidth_bytes_per_s(), None);
    }

    #[test]
    fn data_before_any_grant_is_beyond_credit() {
        let mut receiver = receiver();
        let error = receiver.on_data(0, 1, 1, 0).unwrap_err();
        assert_eq!(error, Violation::BeyondCredit { limit: Amount::ZERO, reached: Amount::new(1, 1) });
    }

    #[test]
    fn gap_and_overlap_are_violations_with_their_numbers() {
        let mut receiver = receiver();
        receiver.grant(0);
        receiver.on_data(0, 3, 30, 0).unwrap();
        let gap = receiver.on_data(5, 1, 10, 0).unwrap_err();
        assert_eq!(gap, Violation::Gap { expected: 3, got: 5 });
        assert_eq!(gap.to_string(), "data frame starts at seq 5, expected seq 3");
        let overlap = receiver.on_data(2, 1, 10, 0).unwrap_err();
        assert_eq!(overlap, Violation::Gap { expected: 3, got: 2 });
        // Nothing changed; the right seq is still accepted.
        assert_eq!(receiver.received(), Amount::new(3, 30));
        receiver.on_data(3, 1, 10, 0).unwrap();
        // A frame of no events (an echo only) still checks its seq.
        receiver.on_data(4, 0, 0, 0).unwrap();
        assert_eq!(receiver.on_data(3, 0, 0, 0).unwrap_err(), Violation::Gap { expected: 4, got: 3 });
    }

    #[test]
    fn beyond_credit_in_events_and_in_bytes_with_their_numbers() {
        let mut receiver = receiver();
        receiver.grant(0);
        receiver.on_data(0, 9, 500, 0).unwrap();
        let events = receiver.on_data(9, 2, 10, 0).unwrap_err();
        assert_eq!(events, Violation::BeyondCredit { limit: Amount::new(10, 1000), reached: Amount::new(11, 510) });
        assert_eq!(
            events.to_string(),
            "sender exceeded its credit: reached 11 events / 510 bytes, limit 10 events / 1000 bytes"
        );
        let bytes = receiver.on_data(9, 1, 501, 0).unwrap_err();
        assert_eq!(bytes, Violation::BeyondCredit { limit: Amount::new(10, 1000), reached: Amount::new(10, 1001) });
        // Exactly at the limit is fine.
        receiver.on_data(9, 1, 500, 0).unwrap();
        assert_eq!(receiver.received(), Amount::new(10, 1000));
    }

    #[test]
    fn oversize_event_is_accepted_alone_when_everything_received_is_durable() {
        let mut receiver = receiver();
        receiver.grant(0);
        // Idle at the start of the session: one event of any size.
        receiver.on_data(0, 1, 50_000, 0).unwrap();
        // An echo-only frame after it uses no credit.
        receiver.on_data(1, 0, 0, 0).unwrap();
        // Not idle now: the next oversize event is a violation.
        assert!(matches!(receiver.on_data(1, 1, 1, 0), Err(Violation::BeyondCredit { .. })));
        receiver.on_durable(Amount::new(1, 50_000), 10);
        // Idle again, but two events in one frame over the bytes are not allowed.
        let two = receiver.on_data(1, 2, 50_000, 10).unwrap_err();
        assert!(matches!(two, Violation::BeyondCredit { .. }), "{two}");
        receiver.on_data(1, 1, 50_000, 10).unwrap();
    }

    #[test]
    fn oversize_event_still_needs_an_event_of_credit() {
        let mut receiver = CreditReceiver::new(config(Amount::new(1, 100), Amount::new(1, 100)), 0);
        receiver.grant(0);
        receiver.on_data(0, 1, 10, 0).unwrap();
        receiver.on_durable(Amount::new(1, 10), 0);
        let error = receiver.on_data(1, 1, 1000, 0).unwrap_err();
        assert_eq!(error, Violation::BeyondCredit { limit: Amount::new(1, 100), reached: Amount::new(2, 1010) });
    }

    #[test]
    fn limits_are_monotonic_and_follow_durable() {
        let mut receiver = CreditReceiver::new(config(Amount::new(64, 6400), Amount::new(1000, 1_000_000)), 0);
        let first = receiver.grant(0);
        receiver.on_data(0, 10, 1000, 0).unwrap();
        assert!(!receiver.grant_due());
        receiver.on_durable(Amount::new(3, 300), 1);
        // 3 of 64 events and 300 of 6400 bytes freed: less than a sixteenth of either.
        assert!(!receiver.grant_due());
        receiver.on_durable(Amount::new(4, 400), 2);
        assert!(receiver.grant_due());
        let second = receiver.grant(2);
        assert_eq!(second.up_to, Amount::new(68, 6800));
        assert_eq!(second.durable, Amount::new(4, 400));
        assert!(first.up_to.fits_within(second.up_to));
        // A stale durable report changes nothing.
        receiver.on_durable(Amount::new(1, 100), 3);
        assert_eq!(receiver.durable(), Amount::new(4, 400));
        assert_eq!(receiver.grant(3).up_to, Amount::new(68, 6800));
    }

    #[test]
    #[should_panic(expected = "beyond received")]
    fn durable_beyond_received_is_a_bug() {
        let mut receiver = receiver();
        receiver.grant(0);
        receiver.on_data(0, 1, 10, 0).unwrap();
        receiver.on_durable(Amount::new(2, 20), 0);
    }

    #[test]
    fn echoes_measure_rtt_and_unknown_or_duplicate_ones_are_ignored() {
        let mut receiver = receiver();
        let first = receiver.grant(100);
        let second = receiver.grant(150);
        assert_eq!((first.ping, second.ping), (1, 2));
        assert_eq!((first.ping_sent_ms, second.ping_sent_ms), (100, 150));
        receiver.on_echo(99, 200);
        receiver.on_echo(0, 200);
        assert_eq!(receiver.rtt_ms(), None);
        receiver.on_echo(2, 230);
        assert_eq!(receiver.rtt_ms(), Some(80));
        // Duplicate of 2 and the older 1 (retired by 2's echo) are ignored.
        receiver.on_echo(2, 400);
        receiver.on_echo(1, 400);
        assert_eq!(receiver.rtt_ms(), Some(80));
        let third = receiver.grant(500);
        receiver.on_echo(third.ping, 560);
        assert_eq!(receiver.rtt_ms(), Some(60));
        let fourth = receiver.grant(600);
        receiver.on_echo(fourth.ping, 700);
        assert_eq!(receiver.rtt_ms(), Some(60), "min over the horizon");
    }

    #[test]
    fn rtt_is_the_minimum_over_the_horizon_then_ages_out() {
        let mut receiver = receiver();
        let ping = receiver.grant(0).ping;
        receiver.on_echo(ping, 10);
        for step in 1..=30u64 {
            let now = step * 1000;
            let ping = receiver.grant(now).ping;
            receiver.on_echo(ping, now + 50);
            if now + 50 < 10_000 - 1250 {
                assert_eq!(receiver.rtt_ms(), Some(10), "at {now}");
            }
        }
        // The 10 ms sample is 30 s old: only 50 ms samples remain.
        assert_eq!(receiver.rtt_ms(), Some(50));
    }

    #[test]
    fn rtt_probe_holds_the_minimum_window_until_a_clean_echo() {
        let mut receiver = receiver();
        let mut received = Amount::ZERO;
        let mut now = 0;
        // Clean start: 100 ms round trips, the window grows.
        let mut rtt_ms = 100;
        for round in 0..100u64 {
            let grant = receiver.grant(now);
            if round == 10 {
                // From here on, queueing inflates every sample to 300 ms.
                rtt_ms = 300;
            }
            let room = grant.up_to.saturating_sub(received);
            let events = room.events.min(room.bytes / 100);
            receiver.on_data(received.events, events, events * 100, now).unwrap();
            received = received.saturating_add(Amount::new(events, events * 100));
            now += rtt_ms;
            receiver.on_echo(grant.ping, now);
            receiver.on_durable(received, now);
            if receiver.probing() {
                break;
            }
        }
        // No sample confirmed the 100 ms minimum for 3/4 of 10 s: probing at the minimum window.
        assert!(receiver.probing(), "probe started by {now} ms");
        // The last confirming sample came at 1 s.
        assert!((8_500..=8_800).contains(&now), "probe started at {now} ms");
        assert_eq!(receiver.window(), Amount::new(10, 1000));
        // Draining for one current RTT (300) plus the minimum (100).
        receiver.grant(now + 399);
        assert!(receiver.probing());
        assert_eq!(receiver.window(), Amount::new(10, 1000));
        // Then a fresh ping is due; its echo (the pipe is empty) is clean and ends the probe.
        let measuring = now + 400;
        receiver.on_durable(received, measuring);
        assert!(receiver.grant_due(), "a fresh ping is due");
        let grant = receiver.grant(measuring);
        assert!(!receiver.grant_due());
        receiver.on_echo(grant.ping, measuring + 100);
        assert!(!receiver.probing());
        assert_eq!(receiver.rtt_ms(), Some(100));
        assert!(receiver.window().bytes > 1000, "window back to its target: {}", receiver.window());
    }

    #[test]
    fn pings_outstanding_are_bounded() {
        let mut receiver = receiver();
        let mut pings = Vec::new();
        for now in 0..100u64 {
            pings.push(receiver.grant(now).ping);
        }
        assert_eq!(pings.iter().copied().max(), Some(PINGS_OUTSTANDING_MAX as u64));
        assert!(receiver.pings.len() <= PINGS_OUTSTANDING_MAX);
        // Once older than the RTT horizon they expire and new ones are issued.
        let later = receiver.grant(20_000).ping;
        assert_eq!(later, PINGS_OUTSTANDING_MAX as u64 + 1);
        assert_eq!(receiver.pings.len(), 1);
    }

    #[test]
    fn window_is_gain_times_bandwidth_times_rtt_within_bounds() {
        let mut receiver = receiver();
        let ping = receiver.grant(0).ping;
        receiver.on_echo(ping, 100);
        assert_eq!(receiver.rtt_ms(), Some(100));
        // Still no bandwidth: the minimum.
        assert_eq!(receiver.window(), Amount::new(10, 1000));
        receiver.on_data(0, 10, 1000, 100).unwrap();
        // 1000 bytes in the 200 ms since the session began: 5000 B/s.
        receiver.on_durable(Amount::new(10, 1000), 200);
        assert_eq!(receiver.bandwidth_bytes_per_s(), Some(5000));
        // The cycle: 100 ms of RTT plus 200 ms to put the 1000-byte frame
        // on the wire; 2 × 5000 B/s × 0.3 s = 3000 bytes, 30 events of 100 bytes.
        assert_eq!(receiver.window(), Amount::new(30, 3000));
        let grant = receiver.grant(200);
        receiver.on_echo(grant.ping, 300);
        receiver.on_data(10, 50, 5000, 300).unwrap_err();
        receiver.on_data(10, 10, 1000, 300).unwrap();
        // 1000 bytes in 100 ms: 10 000 B/s; cycle 100 + 100 ms: 4000 bytes, 40 events.
        receiver.on_durable(Amount::new(20, 2000), 300);
        assert_eq!(receiver.bandwidth_bytes_per_s(), Some(10_000));
        assert_eq!(receiver.window(), Amount::new(40, 4000));
        // The receiver's write time counts too: 100 ms more, 6000 bytes.
        receiver.on_service_time(100, 300);
        assert_eq!(receiver.window(), Amount::new(60, 6000));
    }

    #[test]
    fn window_clamps_to_its_bounds() {
        let mut receiver = CreditReceiver::new(config(Amount::new(2, 100), Amount::new(4, 300)), 0);
        let ping = receiver.grant(0).ping;
        receiver.on_echo(ping, 100);
        receiver.on_data(0, 2, 100, 100).unwrap();
        // 100 bytes in 100 ms: 1000 B/s × (0.1 s RTT + 0.1 s frame) × 2 =
        // 400 bytes, clamped to 300, and 8 events of 50 clamped to 4.
        receiver.on_durable(Amount::new(2, 100), 100);
        assert_eq!(receiver.window(), Amount::new(4, 300));
        receiver.grant(100);
        receiver.on_data(2, 4, 200, 200).unwrap();
        // 200 bytes in 100 ms: 400 bytes and 8 events, clamped to 300 bytes and 4 events.
        receiver.on_durable(Amount::new(6, 300), 200);
        assert_eq!(receiver.bandwidth_bytes_per_s(), Some(2000));
        assert_eq!(receiver.window(), Amount::new(4, 300));
        // Slow delivery of 1-byte events for long enough: the byte floor, and
        // 100 events of 1 byte clamped to the event ceiling.
        let mut received = Amount::new(6, 300);
        for step in 1..=(BANDWIDTH_SAMPLES.max(SERVICE_SAMPLES) as u64 + 1) {
            let now = 200 + step * 1000;
            let ping = receiver.grant(now - 100).ping;
            receiver.on_echo(ping, now);
            receiver.on_data(received.events, 1, 1, now).unwrap();
            received = received.saturating_add(Amount::new(1, 1));
            receiver.on_durable(received, now);
        }
        assert!(!receiver.probing());
        assert_eq!(receiver.window(), Amount::new(4, 100));
    }

    #[test]
    fn shrinking_window_never_lowers_up_to() {
        let mut receiver = CreditReceiver::new(config(Amount::new(1, 100), Amount::new(1000, 100_000)), 0);
        let mut received = Amount::ZERO;
        let mut now = 0;
        let mut peak = Amount::ZERO;
        let mut last = Amount::ZERO;
        // Grow: an RTT of 100 ms, everything sent is durable one RTT later.
        for _ in 0..6 {
            let grant = receiver.grant(now);
            assert!(last.fits_within(grant.up_to), "up_to went back: {last} then {}", grant.up_to);
            last = grant.up_to;
            let room = grant.up_to.saturating_sub(received);
            receiver.on_data(received.events, room.events, room.events * 10, now).unwrap();
            received = received.saturating_add(Amount::new(room.events, room.events * 10));
            now += 100;
            receiver.on_echo(grant.ping, now);
            receiver.on_durable(received, now);
            peak = peak.max_each(receiver.window());
        }
        assert!(peak.events >= 32, "the window grew: {peak}");
        // The sender now has little to send: delivery slows down and the window shrinks.
        // Long enough for the big frames of the growth to leave the frame-time samples.
        for _ in 0..(BANDWIDTH_SAMPLES.max(SERVICE_SAMPLES) * 2) {
            let grant = receiver.grant(now);
            assert!(last.fits_within(grant.up_to), "up_to went back: {last} then {}", grant.up_to);
            last = grant.up_to;
            receiver.on_echo(grant.ping, now + 100);
            receiver.on_data(received.events, 1, 10, now + 100).unwrap();
            received = received.saturating_add(Amount::new(1, 10));
            now += 1000;
            receiver.on_durable(received, now);
        }
        assert_eq!(receiver.window(), Amount::new(10, 100), "peak was {peak}");
        let grant = receiver.grant(now);
        assert!(last.fits_within(grant.up_to));
        // The shrink takes effect as durable advances: up_to stays until durable + window passes it.
        assert_eq!(grant.up_to, last);
    }

    #[test]
    fn config_errors_are_typed() {
        let ok = config(Amount::new(1, 1), Amount::new(1, 1));
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ReceiverConfig::default().validate(), Ok(()));
        let zero = config(Amount::new(0, 1), Amount::new(1, 1));
        assert_eq!(zero.validate(), Err(CreditConfigError::WindowMinZero { min: Amount::new(0, 1) }));
        let inverted = config(Amount::new(2, 1), Amount::new(1, 1));
        assert!(matches!(inverted.validate(), Err(CreditConfigError::WindowBoundsInverted { .. })));
        let gain = ReceiverConfig { gain_percent: 0, ..ok };
        assert_eq!(gain.validate(), Err(CreditConfigError::GainZero));
        let horizon = ReceiverConfig { rtt_window_ms: 3, ..ok };
        assert!(matches!(horizon.validate(), Err(CreditConfigError::RttWindowTooShort { .. })));
        assert!(CreditReceiver::try_new(horizon, 0).is_err());
    }

    #[test]
    fn pace_starts_once_the_bandwidth_stops_growing_and_pauses_in_a_probe() {
        let mut receiver = CreditReceiver::new(config(Amount::new(10, 1000), Amount::new(100_000, 10_000_000)), 0);
        let first = receiver.grant(0);
        receiver.on_echo(first.ping, 50);
        assert_eq!(receiver.rtt_ms(), Some(50));
        // 100 KB made durable every 100 ms: 1 MB/s, in frames of 100 KB.
        let mut paces = Vec::new();
        for step in 1..=6u64 {
            let now = 50 + step * 100;
            receiver.limit = Amount::new(u64::MAX / 2, u64::MAX / 2);
            receiver.on_data(step - 1, 1, 100_000, now).unwrap();
            receiver.on_durable(Amount::new(step, step * 100_000), now);
            paces.push(receiver.pace_bytes());
        }
        // The first sample sets the bandwidth; three without growth end startup.
        assert_eq!(paces[..4], [0, 0, 0, 0], "{paces:?}");
        // cycle = 50 ms RTT + 100 ms for a 100 KB frame; queue max(5, 150 / 4) = 37 ms.
        assert_eq!(receiver.cycle_ms(), Some(150));
        assert_eq!(paces[5], 1_000_000 * 187 / 1000, "{paces:?}");
        // One slow write among typical ones widens the window (the largest
        // write counts there) but not the pace (three quarters of the writes
        // were at most 2 ms).
        for ms in std::iter::repeat_n(2, SERVICE_SAMPLES - 1).chain([100]) {
            receiver.on_service_time(ms, 50 + 6 * 100);
        }
        assert_eq!(receiver.cycle_ms(), Some(250));
        assert_eq!(receiver.pace_cycle_ms(), Some(152));
        assert_eq!(receiver.pace_bytes(), 1_000_000 * (152 + 38) / 1000);
        assert_eq!(receiver.window().bytes, 2 * 1_000_000 * 250 / 1000);
        // An RTT probe pauses the pace (the window is at its minimum then).
        receiver.rtt_confirmed_ms = 0;
        receiver.refresh(50 + 6 * 100 + 10_000);
        assert!(receiver.probing());
        assert_eq!(receiver.pace_bytes(), 0);
    }
}
