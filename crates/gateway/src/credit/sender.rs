//! The sending side of a route's credit: the absolute limit from the
//! receiver's grants and the lanes' shares of the window.

use std::collections::VecDeque;

use super::{Amount, CreditConfigError, Grant, GrantViolation, Stall};

/// One lane's share of the route window.
///
/// `reserved_permille` of the window is reserved for the lane: other lanes
/// can never use it. The unreserved remainder (1000 ‰ minus the sum of
/// reservations, plus rounding leftovers) is a pool any lane may borrow
/// while it is unused. `cap` bounds the lane's own in-flight amount
/// regardless of shares (`Amount::new(u64::MAX, u64::MAX)` for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneShare {
    /// Thousandths of the window reserved for this lane.
    pub reserved_permille: u32,
    /// The most this lane may have in flight.
    pub cap: Amount,
}

#[derive(Debug, Clone)]
struct Lane {
    share: LaneShare,
    in_flight: Amount,
    /// `W × reserved_permille / 1000` for the current window `W`.
    reserved: Amount,
}

/// The sender's credit state for one link session (see the module doc for
/// the rules). Created when the session starts, dropped when it ends.
#[derive(Debug, Clone)]
pub struct CreditSender {
    lanes: Vec<Lane>,
    /// `W - Σ reserved` for the current window `W`.
    pool: Amount,
    /// `(lane, bytes)` of every event in flight, seq `durable.events` first.
    /// At most `limit.events - durable.events` entries.
    in_flight: VecDeque<(usize, u64)>,
    sent: Amount,
    durable: Amount,
    limit: Amount,
    echo: u64,
    /// `pace_bytes` of the grant with the newest ping (0: no pacing).
    pace_bytes: u64,
}

impl CreditSender {
    /// A sender with one lane per entry (lane index = position).
    ///
    /// # Panics
    ///
    /// When the configuration is invalid; see [`CreditSender::try_new`].
    pub fn new(lanes: Vec<LaneShare>) -> Self {
        match Self::try_new(lanes) {
            Ok(sender) => sender,
            Err(error) => panic!("invalid lane configuration: {error}"),
        }
    }

    /// A sender with one lane per entry, or why the lanes cannot work:
    /// no lane, reservations over 1000 ‰, a lane without reservation when
    /// the others take 1000 ‰, or a cap below one event or one byte.
    pub fn try_new(lanes: Vec<LaneShare>) -> Result<Self, CreditConfigError> {
        if lanes.is_empty() {
            return Err(CreditConfigError::NoLanes);
        }
        let sum_permille: u64 = lanes.iter().map(|lane| u64::from(lane.reserved_permille)).sum();
        if sum_permille > 1000 {
            return Err(CreditConfigError::ReservationsOverWhole { sum_permille });
        }
        for (lane, share) in lanes.iter().enumerate() {
            if sum_permille == 1000 && share.reserved_permille == 0 {
                return Err(CreditConfigError::LaneWithoutShare { lane });
            }
            if share.cap.events == 0 || share.cap.bytes == 0 {
                return Err(CreditConfigError::LaneCapZero { lane, cap: share.cap });
            }
        }
        let lanes =
            lanes.into_iter().map(|share| Lane { share, in_flight: Amount::ZERO, reserved: Amount::ZERO }).collect();
        Ok(CreditSender {
            lanes,
            pool: Amount::ZERO,
            in_flight: VecDeque::new(),
            sent: Amount::ZERO,
            durable: Amount::ZERO,
            limit: Amount::ZERO,
            echo: 0,
            pace_bytes: 0,
        })
    }

    /// A grant arrived, possibly stale, duplicated or out of order: keep the
    /// component-wise maximum of `up_to`, the largest `durable` and the
    /// highest ping, and release the lanes' in-flight accounting for what is
    /// now durable. Returns the durable amount (unchanged by a stale grant).
    ///
    /// Errs, changing nothing, when the grant acknowledges events never sent
    /// or bytes that are not the sizes of the acknowledged events: the
    /// receiver is broken and the driver closes the link.
    pub fn on_grant(&mut self, grant: &Grant) -> Result<Amount, GrantViolation> {
        let acked = grant.durable;
        if acked.events > self.sent.events {
            return Err(GrantViolation::AckBeyondSent { sent: self.sent, durable: acked });
        }
        let newly_acked_events = acked.events.saturating_sub(self.durable.events);
        if acked.events >= self.durable.events {
            // `newly_acked_events <= sent - durable = in_flight.len()`, so the
            // conversion and the `take` below cannot come up short.
            let count = usize::try_from(newly_acked_events).expect("in-flight entries fit in memory");
            let newly_acked_bytes: u64 = self.in_flight.iter().take(count).map(|&(_, bytes)| bytes).sum();
            let expected_bytes = self.durable.bytes + newly_acked_bytes;
            if acked.bytes != expected_bytes {
                return Err(GrantViolation::AckMisaligned { events: acked.events, bytes: acked.bytes, expected_bytes });
            }
            for _ in 0..count {
                let (lane, bytes) = self.in_flight.pop_front().expect("acked events are in flight");
                let in_flight = &mut self.lanes[lane].in_flight;
                assert!(in_flight.events >= 1, "lane {lane} releases an event it does not hold");
                assert!(in_flight.bytes >= bytes, "lane {lane} releases bytes it does not hold");
                *in_flight = in_flight.saturating_sub(Amount::new(1, bytes));
            }
            self.durable = acked;
        }
        // A stale grant's durable (below ours) cannot be checked against
        // released entries; it carries nothing new, so it is ignored.
        self.limit = self.limit.max_each(grant.up_to);
        if grant.ping >= self.echo {
            self.pace_bytes = grant.pace_bytes;
        }
        self.echo = self.echo.max(grant.ping);
        self.recompute_shares();
        debug_assert_eq!(self.in_flight.len() as u64, self.sent.events - self.durable.events);
        Ok(self.durable)
    }

    /// May `lane` send one event of `bytes` bytes now? Checks the absolute
    /// limit and the lane arithmetic.
    ///
    /// # Panics
    ///
    /// When `lane` is not a lane of this sender.
    pub fn may_send(&self, lane: usize, bytes: u64) -> bool {
        self.stall(lane, bytes).is_none()
    }

    /// Records that `lane` sent one event of `bytes` bytes; returns its seq.
    /// Precondition: [`CreditSender::may_send`] was true.
    pub fn on_sent(&mut self, lane: usize, bytes: u64) -> u64 {
        debug_assert_eq!(self.stall(lane, bytes), None, "lane {lane} sent {bytes} bytes without credit");
        let seq = self.sent.events;
        let event = Amount::new(1, bytes);
        self.sent = self.sent.saturating_add(event);
        self.lanes[lane].in_flight = self.lanes[lane].in_flight.saturating_add(event);
        self.in_flight.push_back((lane, bytes));
        seq
    }

    /// The ping to echo on the next frame: the highest ping seen in any grant (0 = none).
    pub fn echo(&self) -> u64 {
        self.echo
    }

    /// Everything sent in this session.
    pub fn sent(&self) -> Amount {
        self.sent
    }

    /// Everything the receiver acknowledged as durable.
    pub fn durable(&self) -> Amount {
        self.durable
    }

    /// The highest `up_to` granted (component-wise).
    pub fn limit(&self) -> Amount {
        self.limit
    }

    /// The window the lanes share: `limit - durable`.
    pub fn window(&self) -> Amount {
        self.limit.saturating_sub(self.durable)
    }

    /// Number of lanes.
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// What `lane` has in flight (sent, not yet durable).
    ///
    /// # Panics
    ///
    /// When `lane` is not a lane of this sender.
    pub fn in_flight(&self, lane: usize) -> Amount {
        self.lanes[lane].in_flight
    }

    /// The part of the current window reserved for `lane`.
    ///
    /// # Panics
    ///
    /// When `lane` is not a lane of this sender.
    pub fn reserved(&self, lane: usize) -> Amount {
        self.lanes[lane].reserved
    }

    /// The unreserved part of the current window, shared by all lanes.
    pub fn pool(&self) -> Amount {
        self.pool
    }

    /// Bytes in flight beyond which lanes send only inside their
    /// reservations (0: no pacing); see the module doc.
    pub fn pace_bytes(&self) -> u64 {
        self.pace_bytes
    }

    /// Would an event of `bytes` bytes from `lane` go beyond the lane's
    /// reservation, into the pool?
    ///
    /// # Panics
    ///
    /// When `lane` is not a lane of this sender.
    pub fn needs_pool(&self, lane: usize, bytes: u64) -> bool {
        let this = &self.lanes[lane];
        this.in_flight.bytes.saturating_add(bytes) > this.reserved.bytes
    }

    /// Why `lane` cannot send an event of `bytes` bytes now: `None` if it
    /// can; [`Stall::NoCredit`] when the absolute limit blocks,
    /// [`Stall::LaneCap`] when (only) the lane cap blocks, [`Stall::LaneShare`]
    /// when only the lane's reservation and the pool block, [`Stall::Pace`]
    /// when the event needs the pool and the route has its pace in flight.
    ///
    /// # Panics
    ///
    /// When `lane` is not a lane of this sender.
    pub fn stall(&self, lane: usize, bytes: u64) -> Option<Stall> {
        assert!(lane < self.lanes.len(), "lane {lane} of {}", self.lanes.len());
        // The idle rule: nothing in flight, so one event of any size may go.
        let idle = self.sent == self.durable;
        if self.sent.events >= self.limit.events {
            return Some(Stall::NoCredit);
        }
        if !idle && self.sent.bytes.saturating_add(bytes) > self.limit.bytes {
            return Some(Stall::NoCredit);
        }
        let this = &self.lanes[lane];
        let after = this.in_flight.saturating_add(Amount::new(1, bytes));
        if after.events > this.share.cap.events || (!idle && after.bytes > this.share.cap.bytes) {
            return Some(Stall::LaneCap);
        }
        let events_fit = after.events <= this.reserved.events || {
            let excess =
                self.lanes.iter().map(|lane| lane.in_flight.events.saturating_sub(lane.reserved.events)).sum::<u64>();
            let added = after.events.saturating_sub(this.reserved.events)
                - this.in_flight.events.saturating_sub(this.reserved.events);
            excess.saturating_add(added) <= self.pool.events
        };
        let bytes_fit = idle || after.bytes <= this.reserved.bytes || {
            let excess =
                self.lanes.iter().map(|lane| lane.in_flight.bytes.saturating_sub(lane.reserved.bytes)).sum::<u64>();
            let added = after.bytes.saturating_sub(this.reserved.bytes)
                - this.in_flight.bytes.saturating_sub(this.reserved.bytes);
            excess.saturating_add(added) <= self.pool.bytes
        };
        if !(events_fit && bytes_fit) {
            return Some(Stall::LaneShare);
        }
        let in_flight_bytes = self.sent.bytes - self.durable.bytes;
        // A lane with nothing in flight is not paced: with a pace smaller
        // than its events (an estimate measured on another lane's trickle)
        // it would otherwise never send beside that lane, and never let
        // the estimate grow.
        let paced = !idle
            && self.pace_bytes > 0
            && this.in_flight.events > 0
            && self.needs_pool(lane, bytes)
            && in_flight_bytes.saturating_add(bytes) > self.pace_bytes;
        if paced { Some(Stall::Pace) } else { None }
    }

    fn recompute_shares(&mut self) {
        let window = self.window();
        let mut reserved_sum = Amount::ZERO;
        for lane in &mut self.lanes {
            lane.reserved = Amount::new(
                permille_of(window.events, lane.share.reserved_permille),
                permille_of(window.bytes, lane.share.reserved_permille),
            );
            reserved_sum = reserved_sum.saturating_add(lane.reserved);
        }
        assert!(reserved_sum.fits_within(window), "reservations {reserved_sum} exceed the window {window}");
        self.pool = window.saturating_sub(reserved_sum);
    }
}

/// `amount × permille / 1000`, rounded down, without overflow.
fn permille_of(amount: u64, permille: u32) -> u64 {
    let part = u128::from(amount) * u128::from(permille) / 1000;
    u64::try_from(part).expect("a part of at most 1000 permille fits in u64")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_CAP: Amount = Amount { events: u64::MAX, bytes: u64::MAX };

    fn lane(reserved_permille: u32) -> LaneShare {
        LaneShare { reserved_permille, cap: NO_CAP }
    }

    fn grant(up_to: Amount, durable: Amount) -> Grant {
        Grant { up_to, durable, window: up_to.saturating_sub(durable), ping: 0, ping_sent_ms: 0, pace_bytes: 0 }
    }

    fn send(sender: &mut CreditSender, lane: usize, bytes: u64) -> u64 {
        assert_eq!(sender.stall(lane, bytes), None, "lane {lane} should be able to send {bytes} bytes");
        sender.on_sent(lane, bytes)
    }

    #[test]
    fn nothing_may_be_sent_before_the_first_grant() {
        let sender = CreditSender::new(vec![lane(0)]);
        assert_eq!(sender.stall(0, 1), Some(Stall::NoCredit));
        assert_eq!(sender.stall(0, 0), Some(Stall::NoCredit));
        assert_eq!(sender.limit(), Amount::ZERO);
    }

    #[test]
    fn seqs_start_at_zero_and_count_events() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        sender.on_grant(&grant(Amount::new(10, 1000), Amount::ZERO)).unwrap();
        assert_eq!(send(&mut sender, 0, 10), 0);
        assert_eq!(send(&mut sender, 0, 20), 1);
        assert_eq!(send(&mut sender, 0, 30), 2);
        assert_eq!(sender.sent(), Amount::new(3, 60));
        assert_eq!(sender.in_flight(0), Amount::new(3, 60));
    }

    #[test]
    fn event_limit_is_strict_and_byte_limit_inclusive() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        sender.on_grant(&grant(Amount::new(2, 100), Amount::ZERO)).unwrap();
        send(&mut sender, 0, 50);
        // 50 + 51 > 100 and something is in flight.
        assert_eq!(sender.stall(0, 51), Some(Stall::NoCredit));
        // 50 + 50 == 100 is allowed.
        send(&mut sender, 0, 50);
        // Two events sent, up_to.events == 2: no more, even of 0 bytes.
        assert_eq!(sender.stall(0, 0), Some(Stall::NoCredit));
    }

    #[test]
    fn limits_are_monotonic_and_stale_or_duplicate_grants_are_ignored() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        sender.on_grant(&grant(Amount::new(10, 1000), Amount::ZERO)).unwrap();
        for _ in 0..4 {
            send(&mut sender, 0, 100);
        }
        let newer = grant(Amount::new(14, 1400), Amount::new(4, 400));
        assert_eq!(sender.on_grant(&newer).unwrap(), Amount::new(4, 400));
        assert_eq!(sender.limit(), Amount::new(14, 1400));
        // The stale grant (lower up_to, lower durable) arrives late: nothing moves back.
        assert_eq!(sender.on_grant(&grant(Amount::new(10, 1000), Amount::ZERO)).unwrap(), Amount::new(4, 400));
        assert_eq!(sender.limit(), Amount::new(14, 1400));
        assert_eq!(sender.durable(), Amount::new(4, 400));
        // A duplicate of the newer one changes nothing either.
        assert_eq!(sender.on_grant(&newer).unwrap(), Amount::new(4, 400));
        assert_eq!(sender.in_flight(0), Amount::ZERO);
        assert_eq!(sender.window(), Amount::new(10, 1000));
        // Each dimension keeps its own maximum.
        sender.on_grant(&grant(Amount::new(20, 1200), Amount::new(4, 400))).unwrap();
        assert_eq!(sender.limit(), Amount::new(20, 1400));
    }

    #[test]
    fn durable_releases_lane_accounting_in_seq_order() {
        let mut sender = CreditSender::new(vec![lane(500), lane(0)]);
        sender.on_grant(&grant(Amount::new(10, 1000), Amount::ZERO)).unwrap();
        send(&mut sender, 0, 10);
        send(&mut sender, 1, 20);
        send(&mut sender, 0, 30);
        assert_eq!(sender.in_flight(0), Amount::new(2, 40));
        assert_eq!(sender.in_flight(1), Amount::new(1, 20));
        sender.on_grant(&grant(Amount::new(10, 1000), Amount::new(2, 30))).unwrap();
        assert_eq!(sender.in_flight(0), Amount::new(1, 30));
        assert_eq!(sender.in_flight(1), Amount::ZERO);
        sender.on_grant(&grant(Amount::new(10, 1000), Amount::new(3, 60))).unwrap();
        assert_eq!(sender.in_flight(0), Amount::ZERO);
    }

    #[test]
    fn ack_of_unsent_or_misaligned_bytes_is_a_violation_and_changes_nothing() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        sender.on_grant(&grant(Amount::new(10, 1000), Amount::ZERO)).unwrap();
        send(&mut sender, 0, 10);
        send(&mut sender, 0, 20);
        let beyond = sender.on_grant(&grant(Amount::new(20, 2000), Amount::new(3, 60))).unwrap_err();
        assert_eq!(beyond, GrantViolation::AckBeyondSent { sent: Amount::new(2, 30), durable: Amount::new(3, 60) });
        assert_eq!(beyond.to_string(), "grant acknowledges 3 events, but only 2 were sent");
        let misaligned = sender.on_grant(&grant(Amount::new(20, 2000), Amount::new(1, 15))).unwrap_err();
        assert_eq!(misaligned, GrantViolation::AckMisaligned { events: 1, bytes: 15, expected_bytes: 10 });
        assert!(misaligned.to_string().contains("1 events as 15 bytes"), "{misaligned}");
        assert_eq!(sender.limit(), Amount::new(10, 1000));
        assert_eq!(sender.durable(), Amount::ZERO);
        assert_eq!(sender.in_flight(0), Amount::new(2, 30));
    }

    #[test]
    fn echo_is_the_highest_ping_seen() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        assert_eq!(sender.echo(), 0);
        let mut g = grant(Amount::new(1, 1), Amount::ZERO);
        g.ping = 7;
        sender.on_grant(&g).unwrap();
        g.ping = 5;
        sender.on_grant(&g).unwrap();
        assert_eq!(sender.echo(), 7);
        g.ping = 0;
        sender.on_grant(&g).unwrap();
        assert_eq!(sender.echo(), 7);
    }

    #[test]
    fn oversize_event_goes_alone_when_nothing_is_in_flight() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        sender.on_grant(&grant(Amount::new(10, 100), Amount::ZERO)).unwrap();
        // Idle: an event of 10 times the window may go.
        assert_eq!(send(&mut sender, 0, 1000), 0);
        // Now something is in flight and the bytes are overdrawn: nothing else.
        assert_eq!(sender.stall(0, 0), Some(Stall::NoCredit));
        assert_eq!(sender.stall(0, 1000), Some(Stall::NoCredit));
        // Durable but the limit did not grow: idle again, one more may go.
        sender.on_grant(&grant(Amount::new(10, 100), Amount::new(1, 1000))).unwrap();
        assert_eq!(send(&mut sender, 0, 5000), 1);
        assert_eq!(sender.stall(0, 1), Some(Stall::NoCredit));
    }

    #[test]
    fn oversize_event_still_needs_an_event_of_credit() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        sender.on_grant(&grant(Amount::new(1, 100), Amount::ZERO)).unwrap();
        send(&mut sender, 0, 10);
        sender.on_grant(&grant(Amount::new(1, 100), Amount::new(1, 10))).unwrap();
        // Idle, but no event of credit left.
        assert_eq!(sender.stall(0, 1000), Some(Stall::NoCredit));
        assert_eq!(sender.stall(0, 1), Some(Stall::NoCredit));
    }

    #[test]
    fn oversize_event_passes_lane_shares_and_byte_caps_when_idle() {
        let capped = LaneShare { reserved_permille: 0, cap: Amount::new(5, 10) };
        let mut sender = CreditSender::new(vec![lane(900), capped]);
        sender.on_grant(&grant(Amount::new(10, 1000), Amount::ZERO)).unwrap();
        // Lane 1: reservation 0, pool 100 bytes, cap 10 bytes; a 500-byte event fits neither,
        // but the route is idle.
        assert_eq!(send(&mut sender, 1, 500), 0);
        assert_eq!(sender.stall(1, 1), Some(Stall::LaneCap));
        assert_eq!(sender.stall(0, 1), None);
    }

    #[test]
    fn reserved_share_is_never_taken_by_another_lane() {
        // Lane 0 reserves 60 %, lane 1 20 %, pool 20 %.
        let mut sender = CreditSender::new(vec![lane(600), lane(200)]);
        sender.on_grant(&grant(Amount::new(10, 10_000), Amount::ZERO)).unwrap();
        assert_eq!(sender.reserved(0), Amount::new(6, 6000));
        assert_eq!(sender.reserved(1), Amount::new(2, 2000));
        assert_eq!(sender.pool(), Amount::new(2, 2000));
        // Lane 1: its 2 reserved plus the 2 of the pool, then it stalls on shares.
        for _ in 0..4 {
            send(&mut sender, 1, 1);
        }
        assert_eq!(sender.stall(1, 1), Some(Stall::LaneShare));
        // Lane 0 keeps all its 6.
        for _ in 0..6 {
            send(&mut sender, 0, 1);
        }
        assert_eq!(sender.stall(0, 1), Some(Stall::NoCredit));
        assert_eq!(sender.in_flight(0), Amount::new(6, 6));
    }

    #[test]
    fn reserved_share_in_bytes_is_never_taken_by_another_lane() {
        let mut sender = CreditSender::new(vec![lane(500), lane(0)]);
        sender.on_grant(&grant(Amount::new(100, 1000), Amount::ZERO)).unwrap();
        send(&mut sender, 1, 400);
        // 400 + 200 > the pool of 500 bytes, though the route has 600 bytes left.
        assert_eq!(sender.stall(1, 200), Some(Stall::LaneShare));
        assert_eq!(sender.stall(1, 100), None);
        send(&mut sender, 0, 500);
    }

    #[test]
    fn unused_pool_may_be_borrowed_by_any_lane() {
        let mut sender = CreditSender::new(vec![lane(500), lane(250)]);
        sender.on_grant(&grant(Amount::new(8, 8000), Amount::ZERO)).unwrap();
        assert_eq!(sender.pool(), Amount::new(2, 2000));
        // Lane 0: 4 reserved, then borrows both pool events.
        for _ in 0..6 {
            send(&mut sender, 0, 100);
        }
        assert_eq!(sender.stall(0, 100), Some(Stall::LaneShare));
        // Lane 1 still has its own 2, but not the pool.
        send(&mut sender, 1, 100);
        send(&mut sender, 1, 100);
        assert_eq!(sender.stall(1, 100), Some(Stall::NoCredit));
        // Lane 0's first events become durable: pool returns and lane 1 cannot take lane 0's part.
        sender.on_grant(&grant(Amount::new(8, 8000), Amount::new(2, 200))).unwrap();
        // Window is now 6 events: lane 0 reserves 3, lane 1 1, pool 2.
        assert_eq!(sender.reserved(0), Amount::new(3, 3900));
        assert_eq!(sender.reserved(1), Amount::new(1, 1950));
        assert_eq!(sender.pool(), Amount::new(2, 1950));
        // Excess: lane 0 4 - 3 = 1, lane 1 2 - 1 = 1: pool full.
        assert_eq!(sender.stall(1, 100), Some(Stall::NoCredit));
    }

    #[test]
    fn borrowing_counts_only_the_part_above_the_reservation() {
        let mut sender = CreditSender::new(vec![lane(500), lane(300)]);
        sender.on_grant(&grant(Amount::new(10, 10_000), Amount::ZERO)).unwrap();
        // Lane 0 reserves 5, lane 1 3, pool 2. Lane 0 sends 7 (2 borrowed).
        for _ in 0..7 {
            send(&mut sender, 0, 1);
        }
        // Lane 1 can still use its 3 reserved even though the pool is exhausted.
        for _ in 0..3 {
            send(&mut sender, 1, 1);
        }
        assert_eq!(sender.stall(1, 1), Some(Stall::NoCredit));
        assert_eq!(sender.stall(0, 1), Some(Stall::NoCredit));
    }

    #[test]
    fn pool_exhaustion_is_a_lane_share_stall_not_a_credit_stall() {
        let mut sender = CreditSender::new(vec![lane(500), lane(300)]);
        sender.on_grant(&grant(Amount::new(10, 10_000), Amount::ZERO)).unwrap();
        for _ in 0..5 {
            send(&mut sender, 1, 1);
        }
        // Lane 1: 3 reserved + 2 pool; the route still has 5 events of credit.
        assert_eq!(sender.stall(1, 1), Some(Stall::LaneShare));
        assert!(!sender.may_send(1, 1));
        assert!(sender.may_send(0, 1));
    }

    #[test]
    fn lane_cap_bounds_in_flight_regardless_of_shares() {
        let capped = LaneShare { reserved_permille: 500, cap: Amount::new(2, 150) };
        let mut sender = CreditSender::new(vec![capped, lane(0)]);
        sender.on_grant(&grant(Amount::new(100, 100_000), Amount::ZERO)).unwrap();
        send(&mut sender, 0, 100);
        // Bytes: 100 + 60 > 150.
        assert_eq!(sender.stall(0, 60), Some(Stall::LaneCap));
        send(&mut sender, 0, 50);
        // Events: 2 + 1 > 2.
        assert_eq!(sender.stall(0, 0), Some(Stall::LaneCap));
        // The other lane is not affected.
        assert_eq!(sender.stall(1, 100), None);
        // Releasing one event reopens the lane.
        sender.on_grant(&grant(Amount::new(100, 100_000), Amount::new(1, 100))).unwrap();
        assert_eq!(sender.stall(0, 100), None);
    }

    #[test]
    fn no_credit_takes_precedence_over_lane_stalls() {
        let capped = LaneShare { reserved_permille: 0, cap: Amount::new(1, u64::MAX) };
        let mut sender = CreditSender::new(vec![capped]);
        sender.on_grant(&grant(Amount::new(1, 100), Amount::ZERO)).unwrap();
        send(&mut sender, 0, 10);
        assert_eq!(sender.stall(0, 10), Some(Stall::NoCredit));
    }

    #[test]
    fn after_a_shrink_an_overdrawn_lane_waits_and_the_others_keep_their_reservation() {
        let mut sender = CreditSender::new(vec![lane(500), lane(0)]);
        sender.on_grant(&grant(Amount::new(20, 20_000), Amount::ZERO)).unwrap();
        for _ in 0..8 {
            send(&mut sender, 0, 1);
        }
        for _ in 0..10 {
            send(&mut sender, 1, 1);
        }
        // Lane 0's 8 events are durable and the window shrank from 20 to 16 events.
        sender.on_grant(&grant(Amount::new(24, 20_000), Amount::new(8, 8))).unwrap();
        assert_eq!(sender.window(), Amount::new(16, 19_992));
        assert_eq!(sender.reserved(0), Amount::new(8, 9996));
        assert_eq!(sender.pool(), Amount::new(8, 9996));
        // Lane 1 holds 10 of the pool's 8: it waits, though the route has 6 events of credit.
        assert_eq!(sender.in_flight(1), Amount::new(10, 10));
        assert_eq!(sender.stall(1, 1), Some(Stall::LaneShare));
        // Lane 0 sends inside its own reservation until the route's credit ends.
        for _ in 0..6 {
            send(&mut sender, 0, 1);
        }
        assert_eq!(sender.stall(0, 1), Some(Stall::NoCredit));
        // Lane 1's events become durable: it may use the pool again.
        sender.on_grant(&grant(Amount::new(34, 20_000), Amount::new(18, 18))).unwrap();
        assert_eq!(sender.stall(1, 1), None);
    }

    #[test]
    fn config_errors_are_typed() {
        let cap = NO_CAP;
        assert_eq!(CreditSender::try_new(vec![]).unwrap_err(), CreditConfigError::NoLanes);
        assert_eq!(
            CreditSender::try_new(vec![lane(600), lane(401)]).unwrap_err(),
            CreditConfigError::ReservationsOverWhole { sum_permille: 1001 }
        );
        assert_eq!(
            CreditSender::try_new(vec![lane(600), lane(400), lane(0)]).unwrap_err(),
            CreditConfigError::LaneWithoutShare { lane: 2 }
        );
        assert_eq!(
            CreditSender::try_new(vec![lane(0), LaneShare { reserved_permille: 0, cap: Amount::new(0, 5) }])
                .unwrap_err(),
            CreditConfigError::LaneCapZero { lane: 1, cap: Amount::new(0, 5) }
        );
        assert!(CreditSender::try_new(vec![lane(600), lane(400)]).is_ok());
        assert!(CreditSender::try_new(vec![LaneShare { reserved_permille: 1000, cap }]).is_ok());
        assert!(CreditSender::try_new(vec![lane(u32::MAX)]).is_err());
    }

    #[test]
    #[should_panic(expected = "invalid lane configuration")]
    fn new_panics_on_invalid_configuration() {
        let _ = CreditSender::new(vec![lane(1001)]);
    }

    #[test]
    fn every_lane_can_send_when_idle_whatever_the_window() {
        let configs: Vec<Vec<u32>> =
            vec![vec![0], vec![1000], vec![500, 500], vec![333, 667], vec![999, 1], vec![100, 0, 0], vec![1, 1, 998]];
        for permilles in configs {
            for window_events in 1..40 {
                for window_bytes in [1, 2, 7, 1000] {
                    let lanes = permilles.iter().map(|&p| lane(p)).collect();
                    let mut sender = CreditSender::new(lanes);
                    sender.on_grant(&grant(Amount::new(window_events, window_bytes), Amount::ZERO)).unwrap();
                    for index in 0..permilles.len() {
                        assert_eq!(
                            sender.stall(index, window_bytes * 3),
                            None,
                            "lanes {permilles:?}, window {window_events}/{window_bytes}, lane {index}"
                        );
                        assert_eq!(sender.stall(index, 1), None);
                    }
                }
            }
        }
    }

    fn paced(up_to: Amount, durable: Amount, ping: u64, pace_bytes: u64) -> Grant {
        Grant { ping, pace_bytes, ..grant(up_to, durable) }
    }

    #[test]
    fn pace_holds_sends_from_the_pool_but_not_from_a_reservation() {
        // Lane 0 reserves 200 of 10 000 bytes, lane 1 uses the pool; pace 3000 bytes.
        let mut sender = CreditSender::new(vec![lane(200), lane(0)]);
        sender.on_grant(&paced(Amount::new(100, 10_000), Amount::ZERO, 1, 3000)).unwrap();
        assert_eq!(sender.pace_bytes(), 3000);
        for _ in 0..3 {
            send(&mut sender, 1, 1000);
        }
        // 3000 in flight: the pool has room, the pace does not.
        assert_eq!(sender.stall(1, 1), Some(Stall::Pace));
        // Lane 0 sends inside its reservation of 2000 bytes whatever the pace ...
        send(&mut sender, 0, 1500);
        send(&mut sender, 0, 500);
        // ... and is paced beyond it, like any lane using the pool.
        assert_eq!(sender.stall(0, 1), Some(Stall::Pace));
        // Acknowledgements release the pace.
        sender.on_grant(&paced(Amount::new(100, 10_000), Amount::new(1, 1000), 2, 3000)).unwrap();
        assert_eq!(sender.stall(1, 1000), Some(Stall::Pace), "4000 in flight");
        sender.on_grant(&paced(Amount::new(100, 10_000), Amount::new(3, 3000), 3, 3000)).unwrap();
        assert_eq!(sender.stall(0, 1000), None, "2000 in flight, 1000 more fits the pace");
        assert_eq!(sender.stall(0, 1001), Some(Stall::Pace));
        // Lane 1 has nothing in flight now: one event goes beyond the pace.
        assert_eq!(sender.stall(1, 1001), None);
    }

    #[test]
    fn pace_follows_the_newest_ping_and_zero_means_none() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        let up_to = Amount::new(100, 100_000);
        sender.on_grant(&paced(up_to, Amount::ZERO, 5, 2000)).unwrap();
        // A reordered older grant does not change the pace; a newer one does.
        sender.on_grant(&paced(up_to, Amount::ZERO, 4, 50_000)).unwrap();
        assert_eq!(sender.pace_bytes(), 2000);
        send(&mut sender, 0, 1500);
        assert_eq!(sender.stall(0, 1000), Some(Stall::Pace));
        sender.on_grant(&paced(up_to, Amount::ZERO, 6, 0)).unwrap();
        assert_eq!(sender.pace_bytes(), 0);
        assert_eq!(sender.stall(0, 1000), None, "no pacing without a measured pace");
    }

    #[test]
    fn pace_lets_a_lane_with_nothing_in_flight_send_one_event() {
        // A pace of 800 bytes, below one bulk event; lane 0's trickle in flight.
        let mut sender = CreditSender::new(vec![lane(200), lane(0)]);
        sender.on_grant(&paced(Amount::new(100, 100_000), Amount::ZERO, 1, 800)).unwrap();
        send(&mut sender, 0, 200);
        assert_eq!(sender.stall(1, 1000), None, "lane 1 has nothing in flight");
        send(&mut sender, 1, 1000);
        assert_eq!(sender.stall(1, 1000), Some(Stall::Pace));
    }

    #[test]
    fn pace_never_holds_the_idle_rule() {
        let mut sender = CreditSender::new(vec![lane(0)]);
        sender.on_grant(&paced(Amount::new(10, 1000), Amount::ZERO, 1, 100)).unwrap();
        // Nothing in flight: one event of any size goes, whatever the pace.
        assert_eq!(sender.stall(0, 5000), None);
        send(&mut sender, 0, 5000);
        assert_eq!(sender.stall(0, 1), Some(Stall::NoCredit));
    }
}
