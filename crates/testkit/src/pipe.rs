//! One direction's emulated pipe without I/O: when each piece read from a
//! sender is released to its receiver, and the byte budget that bounds what
//! the pipe holds. The runtime (`link.rs`) feeds it instants and sizes and
//! does the waiting; here nothing reads a clock or touches a socket, so the
//! arithmetic is tested with made-up instants.
//!
//! A piece of `n` bytes that enters the pipe at `now` is transmitted after
//! everything the pipe accepted before it (a virtual clock shared by every
//! connection of the direction, so that they share the rate), takes
//! `n · 8 / bandwidth` to transmit, then travels `latency + jitter`. No
//! transmission starts and no piece is released inside a stall; a piece is
//! pushed to the stall's end. Finally a piece is never released before the
//! previous piece of its own connection, so jitter never reorders bytes.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;

use crate::config::{LinkConfig, Stall};
use crate::limits::{PIECE_BYTES_MAX, PIECE_BYTES_MIN, PIECE_DURATION, STALL_WINDOWS_MAX};

/// The release schedule of one direction: the transmission clock, the
/// planned stalls and the jitter's random source. Created with its link,
/// dropped with it.
#[derive(Debug)]
pub(crate) struct PipeClock {
    rng: StdRng,
    /// When the pipe finishes transmitting everything it has accepted;
    /// `None` when no bandwidth limit applies.
    transmit_free_at: Option<Instant>,
    stalls: StallPlan,
}

/// What the pipe remembers of one connection: the release instant of its
/// latest piece, below which no later piece of it is released.
#[derive(Debug, Default)]
pub(crate) struct ConnectionClock {
    last_release_at: Option<Instant>,
}

impl PipeClock {
    pub(crate) fn new(seed: u64) -> PipeClock {
        PipeClock { rng: StdRng::seed_from_u64(seed), transmit_free_at: None, stalls: StallPlan::default() }
    }

    /// The instant at which a piece of `bytes` bytes of `connection`,
    /// entering the pipe at `now`, is delivered. A zero-byte piece (the
    /// sender's end of stream) takes no transmission time but the same
    /// delays, so it is delivered after the bytes before it.
    pub(crate) fn schedule(
        &mut self,
        config: &LinkConfig,
        now: Instant,
        bytes: usize,
        connection: &mut ConnectionClock,
    ) -> Instant {
        let transmitted_at = match config.bandwidth_bps {
            None => {
                self.transmit_free_at = None;
                self.stalls.push_past(config.stall, now, now, &mut self.rng)
            }
            Some(bandwidth_bps) => {
                let queued_until = self.transmit_free_at.map_or(now, |free_at| free_at.max(now));
                let start = self.stalls.push_past(config.stall, now, queued_until, &mut self.rng);
                let end = start + transmit_duration(bandwidth_bps, bytes);
                self.transmit_free_at = Some(end);
                end
            }
        };
        let jitter =
            if config.jitter.is_zero() { Duration::ZERO } else { self.rng.random_range(Duration::ZERO..config.jitter) };
        let arrives_at =
            self.stalls.push_past(config.stall, now, transmitted_at + config.latency + jitter, &mut self.rng);
        let release_at = connection.last_release_at.map_or(arrives_at, |last| last.max(arrives_at));
        connection.last_release_at = Some(release_at);
        assert!(release_at >= now, "a piece is released before it entered the pipe");
        release_at
    }

    /// How many bytes to read from a sender at once: about
    /// [`PIECE_DURATION`] of transmission under a bandwidth limit, so that a
    /// slow pipe delivers smoothly, else [`PIECE_BYTES_MAX`].
    pub(crate) fn piece_bytes(config: &LinkConfig) -> usize {
        match config.bandwidth_bps {
            None => PIECE_BYTES_MAX,
            Some(bandwidth_bps) => {
                let bytes_per_piece = u128::from(bandwidth_bps) * PIECE_DURATION.as_nanos() / 8 / 1_000_000_000;
                usize::try_from(bytes_per_piece).unwrap_or(usize::MAX).clamp(PIECE_BYTES_MIN, PIECE_BYTES_MAX)
            }
        }
    }
}

/// The time `bytes` take to cross a pipe of `bandwidth_bps`.
pub(crate) fn transmit_duration(bandwidth_bps: u64, bytes: usize) -> Duration {
    assert!(bandwidth_bps > 0, "a bandwidth limit of zero is refused by validation");
    let bits = u128::try_from(bytes).expect("usize fits u128") * 8;
    let nanos = bits * 1_000_000_000 / u128::from(bandwidth_bps);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The stalls of one direction, planned ahead as disjoint windows in time
/// order. Windows are planned lazily up to the latest instant asked about
/// (at most [`STALL_WINDOWS_MAX`] ahead) and forgotten once they are over.
#[derive(Debug, Default)]
struct StallPlan {
    /// The stall settings the windows were planned with; a change replans.
    planned_for: Option<Stall>,
    windows: VecDeque<StallWindow>,
    /// The end of the latest planned window, from which the next interval
    /// is drawn (kept when that window itself is forgotten).
    planned_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StallWindow {
    start: Instant,
    end: Instant,
}

impl StallPlan {
    /// `at`, or the end of the stall that covers it (repeatedly, if that end
    /// falls in the next stall).
    fn push_past(&mut self, stall: Option<Stall>, now: Instant, at: Instant, rng: &mut StdRng) -> Instant {
        if self.planned_for != stall {
            // New settings apply to stalls that have not started; one under
            // way runs to its end.
            self.windows.retain(|window| window.start <= now && now < window.end);
            self.planned_until = self.windows.back().map(|window| window.end);
            self.planned_for = stall;
        }
        let Some(stall) = stall else {
            return self.windows.iter().find(|window| window.start <= at && at < window.end).map_or(at, |w| w.end);
        };
        while self.windows.front().is_some_and(|window| window.end <= now) {
            self.windows.pop_front();
        }
        while self.windows.back().is_none_or(|window| window.start <= at) && self.windows.len() < STALL_WINDOWS_MAX {
            // After an idle spell the plan restarts from now rather than
            // filling the past with windows (the intervals are memoryless).
            let from = self.planned_until.map_or(now, |until| until.max(now));
            let start = from + exponential(rng, stall.every);
            let window = StallWindow { start, end: start + stall.duration };
            self.windows.push_back(window);
            self.planned_until = Some(window.end);
        }
        let mut at = at;
        for window in &self.windows {
            if window.start <= at && at < window.end {
                at = window.end;
            }
        }
        at
    }
}

/// A draw from the exponential distribution with the given mean.
fn exponential(rng: &mut StdRng, mean: Duration) -> Duration {
    let uniform: f64 = rng.random(); // in [0, 1), so the logarithm is finite
    mean.mul_f64(-(1.0 - uniform).ln())
}

/// The bytes one direction's pipe holds: read from senders and not yet due
/// for delivery. A piece larger than the whole limit is let in alone, so a
/// small buffer slows the link but never wedges it.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    held_bytes: usize,
}

impl Budget {
    /// Takes `bytes` if they fit under `limit_bytes`.
    pub(crate) fn try_take(&mut self, bytes: usize, limit_bytes: usize) -> bool {
        if self.held_bytes == 0 || self.held_bytes + bytes <= limit_bytes {
            self.held_bytes += bytes;
            true
        } else {
            false
        }
    }

    /// Gives back `bytes` taken before.
    pub(crate) fn give_back(&mut self, bytes: usize) {
        assert!(self.held_bytes >= bytes, "the budget got back more than it gave");
        self.held_bytes -= bytes;
    }

    pub(crate) fn held_bytes(&self) -> usize {
        self.held_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn unlimited_pipe_adds_latency_only() {
        let base = Instant::now();
        let mut pipe = PipeClock::new(1);
        let config = LinkConfig { latency: ms(40), ..LinkConfig::default() };
        let mut connection = ConnectionClock::default();
        assert_eq!(pipe.schedule(&config, base, 1000, &mut connection), base + ms(40));
        assert_eq!(pipe.schedule(&config, base + ms(5), 1_000_000, &mut connection), base + ms(45));
    }

    #[test]
    fn bandwidth_is_shared_by_connections() {
        let base = Instant::now();
        let mut pipe = PipeClock::new(1);
        // 8 Mbit/s is 1 byte per microsecond.
        let config = LinkConfig { bandwidth_bps: Some(8_000_000), latency: ms(10), ..LinkConfig::default() };
        let mut first = ConnectionClock::default();
        let mut second = ConnectionClock::default();
        assert_eq!(pipe.schedule(&config, base, 1000, &mut first), base + ms(1) + ms(10));
        // Entering at the same instant, the second connection's piece waits
        // for the first one's transmission.
        assert_eq!(pipe.schedule(&config, base, 1000, &mut second), base + ms(2) + ms(10));
        // An idle pipe banks no credit: a piece after a pause starts at once.
        assert_eq!(pipe.schedule(&config, base + ms(100), 1000, &mut first), base + ms(101) + ms(10));
    }

    #[test]
    fn jitter_never_reorders_a_connection() {
        let base = Instant::now();
        let mut pipe = PipeClock::new(7);
        let config = LinkConfig { latency: ms(20), jitter: ms(50), ..LinkConfig::default() };
        let mut connection = ConnectionClock::default();
        let mut previous = base;
        let mut delays = Vec::new();
        for step in 0..1000u64 {
            let now = base + Duration::from_micros(step * 100);
            let release_at = pipe.schedule(&config, now, 100, &mut connection);
            assert!(release_at >= previous, "piece {step} released before the one before it");
            assert!(release_at >= now + ms(20), "piece {step} released before the latency elapsed");
            delays.push(release_at - now);
            previous = release_at;
        }
        // The jitter does vary the delay.
        assert!(delays.iter().any(|delay| *delay > ms(40)));
    }

    #[test]
    fn nothing_is_released_inside_a_stall() {
        let base = Instant::now();
        let mut pipe = PipeClock::new(3);
        let stall = Stall { every: ms(100), duration: ms(30) };
        let config = LinkConfig { latency: ms(5), stall: Some(stall), ..LinkConfig::default() };
        let mut connection = ConnectionClock::default();
        let mut releases = Vec::new();
        let mut stalls_seen = 0;
        for step in 0..2000u64 {
            let now = base + ms(step);
            let release_at = pipe.schedule(&config, now, 10, &mut connection);
            // Windows are forgotten once over, so each release is checked
            // against the plan as it stands when it is scheduled.
            for window in &pipe.stalls.windows {
                assert!(!(window.start <= release_at && release_at < window.end), "a piece is released in a stall");
            }
            stalls_seen = stalls_seen.max(pipe.stalls.windows.len());
            releases.push(release_at);
        }
        assert!(stalls_seen > 0);
        // Over two seconds with a stall every ~130 ms some pieces waited for a
        // stall to end.
        let stalled =
            releases.iter().enumerate().filter(|(step, release_at)| **release_at > base + ms(*step as u64) + ms(5));
        assert!(stalled.count() > 0);
    }

    #[test]
    fn stall_plan_is_bounded_and_replanned_on_change() {
        let base = Instant::now();
        let mut rng = StdRng::seed_from_u64(9);
        let mut plan = StallPlan::default();
        let frequent = Stall { every: ms(1), duration: ms(1) };
        // Asking about an instant far ahead plans at most the cap.
        let _ = plan.push_past(Some(frequent), base, base + Duration::from_secs(3600), &mut rng);
        assert_eq!(plan.windows.len(), STALL_WINDOWS_MAX);
        // Removing stalls forgets every window that has not started.
        assert_eq!(plan.push_past(None, base, base + ms(500), &mut rng), base + ms(500));
        assert!(plan.windows.iter().all(|window| window.start <= base));
    }

    #[test]
    fn stall_plan_restarts_after_an_idle_spell() {
        let base = Instant::now();
        let mut rng = StdRng::seed_from_u64(11);
        let mut plan = StallPlan::default();
        let stall = Some(Stall { every: ms(1), duration: ms(1) });
        let _ = plan.push_past(stall, base, base + ms(10), &mut rng);
        // An hour later the plan covers the present, not the hour gone by.
        let later = base + Duration::from_secs(3600);
        let _ = plan.push_past(stall, later, later + ms(10), &mut rng);
        assert!(plan.windows.iter().all(|window| window.end > later));
        assert!(plan.windows.len() < 100, "{} windows planned", plan.windows.len());
        assert!(plan.windows.back().is_some_and(|window| window.start > later + ms(10)));
    }

    #[test]
    fn transmit_duration_is_bits_over_rate() {
        assert_eq!(transmit_duration(8_000, 1000), Duration::from_secs(1));
        assert_eq!(transmit_duration(1_000_000_000, 125), Duration::from_micros(1));
    }

    #[test]
    fn piece_bytes_follow_the_rate() {
        assert_eq!(PipeClock::piece_bytes(&LinkConfig::default()), PIECE_BYTES_MAX);
        let slow = LinkConfig { bandwidth_bps: Some(1_000_000), ..LinkConfig::default() };
        assert_eq!(PipeClock::piece_bytes(&slow), PIECE_BYTES_MIN);
        let medium = LinkConfig { bandwidth_bps: Some(16_000_000), ..LinkConfig::default() };
        assert_eq!(PipeClock::piece_bytes(&medium), 10_000);
        let fast = LinkConfig { bandwidth_bps: Some(10_000_000_000), ..LinkConfig::default() };
        assert_eq!(PipeClock::piece_bytes(&fast), PIECE_BYTES_MAX);
    }

    #[test]
    fn budget_bounds_held_bytes_but_lets_one_big_piece_through() {
        let mut budget = Budget::default();
        assert!(budget.try_take(600, 1000));
        assert!(!budget.try_take(600, 1000));
        assert!(budget.try_take(400, 1000));
        budget.give_back(600);
        budget.give_back(400);
        assert_eq!(budget.held_bytes(), 0);
        assert!(budget.try_take(5000, 1000), "an empty pipe takes a piece larger than its buffer");
        assert!(!budget.try_take(1, 1000));
    }
}
