//! Headroom for a shared link: while two lanes send, the bytes a lane
//! borrows from the pool go out at most at a fraction of the link's
//! measured bandwidth ([`HEADROOM_RATE_PERMILLE`]), so the queue in the link
//! drains and another lane's next event (a critical one beside bulk) finds
//! it nearly empty instead of behind the pace's queue allowance.
//!
//! The pace (module doc of `credit`) limits bytes *in flight* and must allow
//! a few milliseconds of queue over its cycle estimate: the loop a byte of
//! credit travels jitters by that much, and a tighter limit starves the link
//! and its own bandwidth estimate. A limit on the *rate* does not depend on
//! that loop. Sending below the link's rate would still pull the receiver's
//! delivery samples, and with them the estimate, down; so a frame sent while
//! the headroom held a lane says so (`LinkBatch.app_limited`), and the
//! receiver drops such samples when they are below its estimate, as it does
//! for a sender with nothing to send. If the link itself slows down, the
//! pace (bytes in flight) is what holds the lane, frames are not flagged,
//! and the estimate follows the link as before.
//!
//! *Probes.* Below the estimate, the sender alone can never show that the
//! link got faster, or that an estimate measured on a trickle was low. So
//! the headroom is lifted for a probe ([`Headroom`]): every
//! [`PROBE_EVERY_US`] of sharing, for [`PROBE_US_MIN`] or four credit
//! cycles if longer (several delivery intervals of the receiver, whose
//! samples are then the link's and not flagged). A probe that raised the
//! estimate by a quarter is followed by another at once, so an estimate
//! far below the link climbs at the pace's own growth, probe after probe.
//! A probe costs the other lane the pace's queue for its length: 0.3 s in
//! 30 s, 1 % of the time.
//!
//! The headroom's bucket is a token bucket over the caller's monotonic
//! clock in microseconds; like the rest of the credit core it reads no clock.

/// Share of the link's bandwidth, in thousandths, that pool bytes may use
/// while another lane is active.
pub const HEADROOM_RATE_PERMILLE: u64 = 900;

/// Most bytes the bucket saves up, as microseconds at its rate: one short
/// frame's worth (the sender's shared frames carry 2 ms of the link), so
/// an idle moment does not turn into a burst that fills the link's queue.
pub const BUCKET_DEPTH_US: u64 = 2_000;

/// Sharing time between two probes.
pub const PROBE_EVERY_US: u64 = 30_000_000;
/// Shortest probe.
pub const PROBE_US_MIN: u64 = 300_000;
/// A probe lasts at least this many credit cycles.
pub const PROBE_CYCLES: u64 = 4;
/// A pause in sharing longer than this starts the wait for the next probe
/// again: between two sharing spells the lane sent alone, without headroom.
pub const SHARING_GAP_US: u64 = 1_000_000;
/// A probe that raised the bandwidth to at least this percentage of what it
/// was when the probe began is followed by another one at once.
pub const PROBE_GROWTH_PERCENT: u64 = 125;

/// The headroom of one link session: its bucket and its probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    bucket: RateBucket,
    /// While a probe runs: when it ends, and the bandwidth when it began.
    probe: Option<(u64, u64)>,
    /// When the next probe begins.
    next_probe_us: u64,
    /// The last call of [`Headroom::rate`] (0: none yet).
    last_us: u64,
}

impl Headroom {
    /// The rate that holds pool bytes now, while the link is shared, for
    /// a link of `bandwidth` bytes/s and a credit cycle of `cycle_us`:
    /// `None` during a probe. Call it only while the link is shared, and
    /// at least once per [`SHARING_GAP_US`] while it is: a longer pause
    /// starts a new sharing spell, whose first probe is [`PROBE_EVERY_US`] away.
    pub fn rate(&mut self, now_us: u64, bandwidth: u64, cycle_us: u64) -> Option<u64> {
        let new_spell = self.last_us == 0 || now_us.saturating_sub(self.last_us) > SHARING_GAP_US;
        self.last_us = now_us;
        if let Some((until_us, began_with)) = self.probe {
            if now_us < until_us {
                return None;
            }
            let grew = u128::from(bandwidth) * 100 >= u128::from(began_with) * u128::from(PROBE_GROWTH_PERCENT);
            self.probe = None;
            self.next_probe_us = if grew { now_us } else { now_us.saturating_add(PROBE_EVERY_US) };
            // A full bucket after a probe would only add to its queue.
            self.bucket = RateBucket { level: 0, at_us: now_us };
        }
        if new_spell && self.probe.is_none() {
            self.next_probe_us = now_us.saturating_add(PROBE_EVERY_US);
        }
        if now_us >= self.next_probe_us {
            let length = cycle_us.saturating_mul(PROBE_CYCLES).max(PROBE_US_MIN);
            self.probe = Some((now_us.saturating_add(length), bandwidth));
            return None;
        }
        Some(headroom_rate(bandwidth))
    }

    /// May a pool send start now, at `rate` (from [`Headroom::rate`])?
    pub fn allows(&self, now_us: u64, rate: u64) -> bool {
        self.bucket.allows(now_us, rate)
    }

    /// Microseconds until a pool send may start at `rate` (0: now).
    pub fn wait_us(&self, now_us: u64, rate: u64) -> u64 {
        self.bucket.wait_us(now_us, rate)
    }

    /// `bytes` were sent at `now_us` while the headroom's `rate` applied.
    pub fn spend(&mut self, now_us: u64, rate: u64, bytes: u64) {
        self.bucket.spend(now_us, rate, bytes);
    }
}

/// A token bucket of bytes. The level may go below zero by one send: a
/// send is allowed while the level is positive, whatever its size, so the
/// sender never waits for a frame's worth to gather.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RateBucket {
    /// Level at `at_us`, in bytes.
    level: i64,
    at_us: u64,
}

impl RateBucket {
    /// A full bucket at `now_us`.
    #[cfg(test)]
    fn full(now_us: u64, rate_bytes_per_s: u64) -> Self {
        RateBucket { level: depth(rate_bytes_per_s), at_us: now_us }
    }

    /// The level at `now_us`, refilled at `rate_bytes_per_s` up to the depth.
    fn level(&self, now_us: u64, rate_bytes_per_s: u64) -> i64 {
        let elapsed = u128::from(now_us.saturating_sub(self.at_us));
        let refill = i64::try_from(elapsed * u128::from(rate_bytes_per_s) / 1_000_000).unwrap_or(i64::MAX);
        self.level.saturating_add(refill).min(depth(rate_bytes_per_s).max(self.level))
    }

    /// May a send start now?
    fn allows(&self, now_us: u64, rate_bytes_per_s: u64) -> bool {
        self.level(now_us, rate_bytes_per_s) > 0
    }

    /// Microseconds from `now_us` until a send may start (0: now).
    fn wait_us(&self, now_us: u64, rate_bytes_per_s: u64) -> u64 {
        let level = self.level(now_us, rate_bytes_per_s);
        if level > 0 {
            return 0;
        }
        let missing = u128::from(level.unsigned_abs()) + 1;
        let us = (missing * 1_000_000).div_ceil(u128::from(rate_bytes_per_s.max(1)));
        u64::try_from(us).unwrap_or(u64::MAX)
    }

    /// `bytes` were sent at `now_us`.
    fn spend(&mut self, now_us: u64, rate_bytes_per_s: u64, bytes: u64) {
        let level = self.level(now_us, rate_bytes_per_s);
        self.level = level.saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.at_us = now_us.max(self.at_us);
    }
}

/// Rate of pool bytes while the link is shared, from the link's bandwidth.
fn headroom_rate(bandwidth_bytes_per_s: u64) -> u64 {
    let rate = u128::from(bandwidth_bytes_per_s) * u128::from(HEADROOM_RATE_PERMILLE) / 1000;
    u64::try_from(rate).unwrap_or(u64::MAX).max(1)
}

fn depth(rate_bytes_per_s: u64) -> i64 {
    let bytes = u128::from(rate_bytes_per_s) * u128::from(BUCKET_DEPTH_US) / 1_000_000;
    i64::try_from(bytes).unwrap_or(i64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MB/s: one byte per microsecond, a depth of 2,000 bytes.
    const RATE: u64 = 1_000_000;

    #[test]
    fn a_full_bucket_holds_its_depth_and_refills_no_higher() {
        let bucket = RateBucket::full(0, RATE);
        assert_eq!(bucket.level(0, RATE), 2_000);
        assert_eq!(bucket.level(1_000_000, RATE), 2_000, "an idle second saves no more than the depth");
    }

    #[test]
    fn a_send_may_overdraw_once_then_waits_for_the_refill() {
        let mut bucket = RateBucket::full(0, RATE);
        assert!(bucket.allows(0, RATE));
        bucket.spend(0, RATE, 5_000);
        assert_eq!(bucket.level(0, RATE), -3_000);
        assert!(!bucket.allows(0, RATE));
        assert_eq!(bucket.wait_us(0, RATE), 3_001);
        assert!(!bucket.allows(3_000, RATE), "level 0 is not positive");
        assert!(bucket.allows(3_001, RATE));
        assert_eq!(bucket.wait_us(3_001, RATE), 0);
    }

    #[test]
    fn sending_as_allowed_keeps_to_the_rate() {
        // A sender that sends 1,500-byte frames whenever it may, over one
        // simulated second, sends the rate's bytes plus at most the depth
        // and one frame.
        let mut bucket = RateBucket::full(0, RATE);
        let (mut now, mut sent) = (0u64, 0u64);
        while now <= 1_000_000 {
            if bucket.allows(now, RATE) {
                bucket.spend(now, RATE, 1_500);
                sent += 1_500;
            }
            now += bucket.wait_us(now, RATE).max(1);
        }
        assert!((RATE..=RATE + 2_000 + 1_500).contains(&sent), "sent {sent}");
    }

    #[test]
    fn headroom_probes_every_so_often_and_again_while_a_probe_finds_more() {
        const S: u64 = 1_000_000;
        // Calls every 100 ms from `from` to before `to`; the first call
        // without headroom and the first with it again after that.
        fn probe(headroom: &mut Headroom, from: u64, to: u64, bandwidth: u64, cycle: u64) -> Option<(u64, u64)> {
            let mut started = None;
            for now in (from..to).step_by(100_000) {
                match (headroom.rate(now, bandwidth, cycle), started) {
                    (None, None) => started = Some(now),
                    (Some(_), Some(start)) => return Some((start, now)),
                    _ => {}
                }
            }
            started.map(|start| (start, to))
        }
        let mut headroom = Headroom::default();
        assert_eq!(headroom.rate(S, 1_000_000, 10_000), Some(900_000));
        // 30 s of sharing, then a probe of 0.3 s (four 10 ms cycles are less).
        assert_eq!(probe(&mut headroom, S, 40 * S, 1_000_000, 10_000), Some((31 * S, 31 * S + 300_000)));
        // It found no more: the headroom again, from an empty bucket, for 30 s.
        assert!(!headroom.allows(31 * S + 300_000, 900_000));
        assert_eq!(probe(&mut headroom, 31 * S + 400_000, 61 * S, 1_000_000, 10_000), None);
        // A pause in sharing starts the 30 s again.
        assert_eq!(headroom.rate(70 * S, 1_000_000, 10_000), Some(900_000));
        assert_eq!(probe(&mut headroom, 70 * S, 100 * S, 1_000_000, 10_000), None);
        // A probe of four 200 ms cycles that found a quarter more ...
        assert_eq!(headroom.rate(100 * S, 1_000_000, 200_000), None);
        assert_eq!(headroom.rate(100 * S + 799_999, 1_250_000, 200_000), None);
        // ... is followed by another at once, and one that did not is not.
        assert_eq!(headroom.rate(100 * S + 800_000, 1_250_000, 200_000), None);
        assert_eq!(headroom.rate(101 * S + 600_000, 1_300_000, 200_000), Some(1_170_000));
    }

    #[test]
    fn the_headroom_rate_is_a_share_of_the_bandwidth() {
        assert_eq!(headroom_rate(12_500_000), 11_250_000);
        assert_eq!(headroom_rate(0), 1, "never zero: a wait stays finite");
    }
}
