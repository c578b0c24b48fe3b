//! The credit (demand) core of a WAN route: how much a sender may put on a
//! link session, decided by the receiver, shared between the route's lanes.
//! It is I/O-free (STYLE 3): inputs and the caller's monotonic time
//! (`now_ms`) in, values out; it reads no clock, does no I/O, spawns nothing.
//!
//! # Lifecycle
//!
//! One [`CreditSender`] and one [`CreditReceiver`] live exactly as long as
//! one link session. A reconnect starts fresh cores on both sides: sequences
//! start again at 0 and nothing of the old session carries over (the
//! route's cursors and the receiver's exists-or-write dedup absorb the
//! overlap).
//!
//! # Counting
//!
//! Everything is counted cumulatively over the session as an [`Amount`] of
//! events and bytes. The first event sent has seq 0, so `sent.events` is
//! also the seq of the next event. `durable` is a prefix: everything below
//! it is durably written at the receiver, and its `bytes` are exactly the
//! sum of the sizes of its `events` (the sender checks this).
//!
//! # Rules
//!
//! **Absolute grants.** The receiver grants `up_to`, an absolute limit, on
//! every heartbeat tick and whenever enough space was freed
//! ([`CreditReceiver::grant_due`]: at least 1/[`GRANT_DUE_FRACTION`] of the window in
//! events or bytes). `up_to` never decreases, in each dimension
//! separately. The sender keeps the component-wise maximum of every
//! `up_to` and the largest `durable` it has seen, so a lost, duplicated,
//! stale or reordered grant changes nothing: the next one repeats
//! everything.
//!
//! **Byte rule.** An event of `b` bytes may be sent when
//! `sent.events < up_to.events` and `sent.bytes + b <= up_to.bytes`.
//! Exception (*idle rule*): when nothing is in flight (`sent == durable`)
//! one event may be sent whatever its size, still only while
//! `sent.events < up_to.events`; this is how an event larger than the whole
//! window gets through instead of stalling the route forever. It is sent
//! alone: the next event needs the ordinary rule again, or the idle rule
//! once this one is durable. The exception does not look at the window:
//! with a stale limit it may also let through an event smaller than the
//! window, which is harmless because it is alone.
//!
//! **The receiver checks the same rule per data frame** against the highest
//! limit it ever granted: the frame's end must satisfy
//! `end.events <= limit.events` and `end.bytes <= limit.bytes`, except that
//! a frame of exactly one event may exceed the bytes when it starts at
//! `received == durable`. This accepts exactly what the sender's rule
//! allows over a FIFO data channel: an idle-rule event starts a frame (its
//! predecessors are durable, so they were received in earlier frames), and
//! an event following it in the same frame fits the ordinary rule, so the
//! whole frame does. A frame that does not start at `received` is a
//! [`Violation::Gap`]; one past the limit is [`Violation::BeyondCredit`];
//! the driver closes the link with that reason. A frame of no events
//! (an echo only) uses no credit; it must still start at `received`.
//!
//! **Lane arithmetic.** The sender's window is `W = up_to - durable` from
//! its own maxima (equal to the newest grant's `window` field, and immune to
//! reordering). Lane `i` has `reserved_i = W × reserved_permille_i / 1000`
//! (rounded down) and the pool is `W - Σ reserved` (so rounding leftovers go
//! to the pool). With `f_i` the lane's in-flight amount and `e` the event
//! (1 event, `b` bytes), the lane may send when, in events and in bytes
//! separately:
//! - the cap holds: `f_i + e <= cap_i`, and
//! - the event fits its own reservation, `f_i + e <= reserved_i`, or the
//!   pool has room for the lane's new excess:
//!   `Σ_j max(0, f_j - reserved_j) + (max(0, f_i + e - reserved_i) - max(0, f_i - reserved_i)) <= pool`.
//!
//! So the lanes' excesses over their reservations together never exceed the
//! pool, and no lane ever occupies another lane's reservation. Under the
//! idle rule the byte checks of the lanes are waived too (an event larger
//! than a lane's share or cap must get through); the event checks are not.
//! When the window shrinks, in-flight amounts may exceed the new shares for
//! a while; sends are then allowed only inside a lane's own reservation
//! until durable catches up.
//!
//! **Configuration.** Reservations sum to at most 1000 ‰. A lane with no
//! reservation needs a pool, so reservations summing to exactly 1000 ‰
//! require every lane to reserve something. Caps are at least one event and
//! one byte. With these, when nothing is in flight and the limit allows one
//! more event, every lane may send (reservation or pool has at least one
//! event): a route with data and credit never stalls.
//!
//! **Window adaptation (receiver).** RTT is the minimum echo round trip over
//! the last `rtt_window_ms` (eight buckets; if all samples aged out, the
//! last sample). Each grant carries a new ping id; the sender echoes the
//! highest id it has seen on its next frame; the receiver times the echo
//! against the ping's issue time. Bandwidth is the largest delivery rate of
//! durable bytes over the last [`BANDWIDTH_SAMPLES`] intervals, each lasting
//! at least one RTT and at least [`BANDWIDTH_INTERVAL_MS_MIN`] and ending
//! when something became durable. An interval in which the sender said it
//! had nothing more to send (`LinkBatch.app_limited`,
//! [`CreditReceiver::on_app_limited`]) is dropped when its rate is below the
//! estimate: it measured the sender, not the link (BBR's rule), and a
//! trickle after a burst would otherwise shrink the estimate, the window and
//! the pace to the trickle, and the next burst would start from there.
//! Credit travels a longer loop than the path's round trip: the receiver
//! acts on whole frames and acknowledges them once durable, so the *cycle*
//! is `RTT + frame time + service time`,
//! where frame time is the largest of the last [`SERVICE_SAMPLES`] frames
//! divided by the bandwidth and service time the largest of the last
//! [`SERVICE_SAMPLES`] arrival-to-durable times the driver reports
//! ([`CreditReceiver::on_service_time`]). The window in bytes is
//! `clamp(gain × bandwidth × cycle, min.bytes, max.bytes)`, in events
//! `clamp(ceil(bytes / mean event size over those intervals), min.events, max.events)`.
//! Before both are measured the window is `bounds.min`. When the window is
//! the bottleneck, the delivery rate is `W / cycle`, so with the default gain
//! of 200 % the window doubles per interval until the link is the
//! bottleneck or it reaches `bounds.max`.
//!
//! *RTT probe.* A window above the path's bandwidth × RTT builds a queue in
//! the data pipe, and echoes riding behind it would inflate the RTT, which
//! would grow the window, and so on. So when no sample has confirmed the
//! minimum (come in at or below it) for 3/4 of `rtt_window_ms`, the receiver
//! probes: the window drops to `bounds.min` for one current RTT plus one
//! minimum RTT (what was granted before drains), then
//! [`CreditReceiver::grant_due`] asks for a grant with a fresh ping, whose
//! echo is a clean sample and ends the probe (or it ends after
//! `rtt_window_ms / 8`). This is BBR's ProbeRTT done with credit; it costs
//! a few percent of throughput once per horizon. The sender's driver
//! should echo promptly (on its next frame, or an echo-only frame soon
//! after a grant brings a new ping): any delay is counted as RTT.
//!
//! *Pace.* A window of `gain × bandwidth × cycle` with a gain above 1 lets
//! the sender keep more bytes in flight than the link carries in one cycle,
//! and the excess waits in the link's queue, where every lane's next event
//! waits behind it (a critical event behind a bulk backlog: about one cycle
//! at the default gain). So each grant also carries `pace_bytes =
//! bandwidth × (pace cycle + q)`, with the queue allowance
//! `q = max(`[`PACE_QUEUE_MS_MIN`]`, cycle / `[`PACE_QUEUE_CYCLE_DIVISOR`]`)`.
//! The pace cycle is the cycle with the upper quartile of the recent
//! writes instead of the largest (one slow write must not flood the link's
//! queue for the next 32 frames). The pace assumes the driver grants at
//! every durable step (the gateway's receiver does), so a byte stops
//! counting as in flight one cycle after it was sent. It is 0 before the
//! cycle is measured, during an RTT probe, and in startup: until the
//! bandwidth has not grown by a quarter for three
//! delivery intervals in a row (BBR's full-pipe test), the window's gain
//! finds the link's rate fastest. Beyond it a lane may
//! send only inside its own reservation: an event that needs the pool waits
//! while `sent.bytes - durable.bytes + b > pace_bytes` (not under the idle
//! rule, and not when the lane itself has nothing in flight: a pace below
//! one event, measured on another lane's trickle, would hold a bulk lane
//! beside it for good). The link stays full (in flight exceeds bandwidth × cycle), its
//! queue stays near `q`, and a lane with a reservation is never paced
//! within it. While the pace limits the rate, the delivery rate measured
//! is about `pace / cycle`, at least 1.125 × the bandwidth, so the window
//! and the pace still grow. In the simulated link of `sim_tests` (1 MB/s,
//! 50 ms RTT) a critical lane's p99 beside a saturated bulk lane goes from
//! 58 ms unpaced to 39 ms paced (26 ms alone), with the same throughput. The sender keeps the pace of the grant with the newest
//! ping (a reordered older grant does not change it); pacing is advice
//! about the link, not a credit rule, and the receiver does not check it.
//!
//! *Headroom* ([`rate`]). The pace's queue allowance stands in the link,
//! and a critical event beside a saturated bulk lane waits behind it (at
//! 100 Mbit/s and 5 ms RTT, ~3 ms of the 5). A tighter limit on bytes in
//! flight starves the link, because the loop a byte of credit travels
//! jitters by about that much. So while another lane is active the sender
//! also limits the *rate* of pool bytes to [`HEADROOM_RATE_PERMILLE`] of
//! the measured bandwidth (a token bucket, [`Headroom`]): the queue
//! drains, and the critical event finds the link nearly empty. Frames sent
//! while the headroom held a lane are flagged app-limited, so their lower
//! delivery rate does not lower the estimate; if the link itself slows,
//! the pace holds the lane instead and the estimate follows. Rare probes
//! without the headroom let the estimate grow when the link is faster.
//!
//! The window may shrink, but `up_to`
//! never decreases: a shrink takes effect as durable advances
//! (`up_to = max(up_to, durable + window)`).
//!
//! **Memory.** The receiver holds at most [`PINGS_OUTSTANDING_MAX`] pings,
//! [`RTT_BUCKETS`] RTT buckets and [`BANDWIDTH_SAMPLES`] delivery samples.
//! The sender holds one `(lane, bytes)` entry per event in flight, at most
//! `up_to.events - durable.events`, which the receiver keeps within
//! `bounds.max.events`.

pub mod rate;
mod receiver;
mod sender;

#[cfg(test)]
mod sim_tests;

pub use rate::{HEADROOM_RATE_PERMILLE, Headroom};
pub use receiver::{CreditReceiver, ReceiverConfig, SERVICE_SAMPLES, WindowBounds};
pub use sender::{CreditSender, LaneShare};

/// Queueing the pace allows on top of the credit cycle, at least.
pub const PACE_QUEUE_MS_MIN: u64 = 5;
/// ... and at least this fraction (1/N) of the cycle, so that a pace that
/// limits the rate still lets it grow by a quarter per delivery interval,
/// and a link with a long cycle keeps a queue that outlasts a slow write at
/// the receiver (at 10 Mbit/s and 50 ms RTT: 14 ms instead of 7 with an
/// eighth, which left the link dry in 20-40 ms stalls; `edgebus bench wan`
/// goodput 0.880-0.933 over nine runs with an eighth, 0.926-0.928 over
/// three with a quarter). Short cycles keep the 5 ms minimum.
pub const PACE_QUEUE_CYCLE_DIVISOR: u64 = 4;
/// Pings a receiver remembers at once; a grant repeats the newest ping
/// instead of issuing a new one while this many are unanswered.
pub const PINGS_OUTSTANDING_MAX: usize = 32;
/// Buckets of the min-RTT filter over `rtt_window_ms`.
pub const RTT_BUCKETS: usize = 8;
/// Delivery-rate samples the bandwidth (max) filter keeps.
pub const BANDWIDTH_SAMPLES: usize = 8;
/// Shortest delivery-rate interval, whatever the RTT.
pub const BANDWIDTH_INTERVAL_MS_MIN: u64 = 100;
/// Default gain of the window over bandwidth × RTT, in percent.
pub const WINDOW_GAIN_PERCENT_DEFAULT: u32 = 200;
/// Default horizon of the min-RTT filter.
pub const RTT_WINDOW_MS_DEFAULT: u64 = 10_000;
/// Default smallest window.
pub const WINDOW_MIN_DEFAULT: Amount = Amount { events: 64, bytes: 64 * 1024 };
/// Default largest window.
pub const WINDOW_MAX_DEFAULT: Amount = Amount { events: 65_536, bytes: 64 * 1024 * 1024 };
/// Grant early once this fraction (1/N) of the window was freed since the last grant.
pub const GRANT_DUE_FRACTION: u64 = 16;

const _: () = assert!(WINDOW_MIN_DEFAULT.events >= 1 && WINDOW_MIN_DEFAULT.bytes >= 1);
const _: () = assert!(WINDOW_MIN_DEFAULT.events <= WINDOW_MAX_DEFAULT.events);
const _: () = assert!(WINDOW_MIN_DEFAULT.bytes <= WINDOW_MAX_DEFAULT.bytes);
const _: () = assert!(RTT_WINDOW_MS_DEFAULT >= RTT_BUCKETS as u64);

/// Cumulative counters of a session: events and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Amount {
    /// Events (also the seq of the next event, for `sent` and `received`).
    pub events: u64,
    /// Bytes of those events.
    pub bytes: u64,
}

impl Amount {
    /// Nothing.
    pub const ZERO: Amount = Amount { events: 0, bytes: 0 };

    /// An amount of `events` events and `bytes` bytes.
    pub const fn new(events: u64, bytes: u64) -> Amount {
        Amount { events, bytes }
    }

    /// Component-wise `self + other`, saturating.
    pub const fn saturating_add(self, other: Amount) -> Amount {
        Amount { events: self.events.saturating_add(other.events), bytes: self.bytes.saturating_add(other.bytes) }
    }

    /// Component-wise `self - other`, saturating at zero.
    pub const fn saturating_sub(self, other: Amount) -> Amount {
        Amount { events: self.events.saturating_sub(other.events), bytes: self.bytes.saturating_sub(other.bytes) }
    }

    /// Component-wise maximum.
    pub fn max_each(self, other: Amount) -> Amount {
        Amount { events: self.events.max(other.events), bytes: self.bytes.max(other.bytes) }
    }

    /// True when both components are at most `other`'s.
    pub const fn fits_within(self, other: Amount) -> bool {
        self.events <= other.events && self.bytes <= other.bytes
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} events / {} bytes", self.events, self.bytes)
    }
}

/// What the receiver sends, on every heartbeat tick and when freed space is
/// worth announcing. Every field is absolute or self-contained, so any
/// grant may be lost, duplicated or reordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The sender may send while `sent.events < up_to.events` and
    /// `sent.bytes + next_bytes <= up_to.bytes` (or by the idle rule, see the module doc).
    pub up_to: Amount,
    /// Everything below this is durably written at the receiver (the ack).
    pub durable: Amount,
    /// `up_to - durable` at the time of the grant.
    pub window: Amount,
    /// A ping id for the sender to echo (RTT measurement); 0 = none.
    pub ping: u64,
    /// The receiver's clock when the ping was issued (opaque to the sender).
    pub ping_sent_ms: u64,
    /// Bytes in flight that keep the link busy with a short queue
    /// (bandwidth × (cycle + queue allowance)); beyond them a lane sends
    /// only inside its own reservation. 0: not measured, no pacing.
    pub pace_bytes: u64,
}

/// The remote sender broke the credit protocol on a data frame; the driver
/// closes the link with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The frame does not start where the previous one ended (a gap or an overlap).
    #[error("data frame starts at seq {got}, expected seq {expected}")]
    Gap {
        /// The seq the next frame must start at (events received so far).
        expected: u64,
        /// The first seq of the frame.
        got: u64,
    },
    /// The frame goes past the highest limit ever granted.
    #[error(
        "sender exceeded its credit: reached {} events / {} bytes, limit {} events / {} bytes",
        reached.events, reached.bytes, limit.events, limit.bytes
    )]
    BeyondCredit {
        /// The highest limit ever granted in this session.
        limit: Amount,
        /// Where the frame would take the received counters.
        reached: Amount,
    },
}

/// The remote receiver sent a grant that cannot be true in this session;
/// the driver closes the link with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantViolation {
    /// The grant acknowledges events that were never sent.
    #[error("grant acknowledges {} events, but only {} were sent", durable.events, sent.events)]
    AckBeyondSent {
        /// What was sent in this session.
        sent: Amount,
        /// The acknowledged amount.
        durable: Amount,
    },
    /// The acknowledged bytes do not add up to the sizes of the acknowledged events.
    #[error("grant acknowledges {events} events as {bytes} bytes, but they were sent as {expected_bytes} bytes")]
    AckMisaligned {
        /// Acknowledged events.
        events: u64,
        /// Acknowledged bytes.
        bytes: u64,
        /// Bytes of the first `events` events sent.
        expected_bytes: u64,
    },
}

/// A credit configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreditConfigError {
    /// A route needs at least one lane.
    #[error("a route needs at least one lane")]
    NoLanes,
    /// The lanes reserve more than the whole window.
    #[error("lane reservations sum to {sum_permille} permille, more than 1000")]
    ReservationsOverWhole {
        /// The sum of `reserved_permille`.
        sum_permille: u64,
    },
    /// Reservations take the whole window, leaving no pool for a lane without one.
    #[error("lane {lane} reserves nothing but the other lanes reserve the whole window (1000 permille)")]
    LaneWithoutShare {
        /// The lane index.
        lane: usize,
    },
    /// A lane cap below one event or one byte would never let the lane send.
    #[error("lane {lane} cap of {} events / {} bytes is below one event and one byte", cap.events, cap.bytes)]
    LaneCapZero {
        /// The lane index.
        lane: usize,
        /// The cap.
        cap: Amount,
    },
    /// The smallest window must allow at least one event and one byte.
    #[error("smallest window of {} events / {} bytes is below one event and one byte", min.events, min.bytes)]
    WindowMinZero {
        /// The configured smallest window.
        min: Amount,
    },
    /// The bounds are upside down.
    #[error("window bounds inverted: min {} events / {} bytes, max {} events / {} bytes", min.events, min.bytes, max.events, max.bytes)]
    WindowBoundsInverted {
        /// The configured smallest window.
        min: Amount,
        /// The configured largest window.
        max: Amount,
    },
    /// A gain of zero would pin the window at its minimum.
    #[error("window gain is 0 percent")]
    GainZero,
    /// The RTT filter needs at least one millisecond per bucket.
    #[error("rtt window of {rtt_window_ms} ms is shorter than {buckets} ms")]
    RttWindowTooShort {
        /// The configured horizon.
        rtt_window_ms: u64,
        /// The smallest allowed horizon.
        buckets: u64,
    },
}

/// Why a lane cannot send an event now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stall {
    /// The absolute limit granted by the receiver blocks (no credit).
    NoCredit,
    /// Only the lane arithmetic blocks: the lane's reservation and the pool are used up.
    LaneShare,
    /// The lane's own cap blocks.
    LaneCap,
    /// The route has as many bytes in flight as keep the link busy (the
    /// grant's `pace_bytes`); more would only queue in the link ahead of
    /// other lanes' events. The lane's reservation is used up.
    Pace,
}
