//! Route health: whether each lane and route makes progress (DESIGN §3.4,
//! "health is progress, not connectivity"), assessed from the sender's
//! figures and the caller's clock, without I/O.
//!
//! A lane is
//! - `healthy` when it has no backlog, or its acknowledged cursor moved
//!   within [`STALLED_AFTER_MS`] and nothing holds it;
//! - `throttled` when data waits on credit, its lane share, its lane cap,
//!   the link's pace or the headroom for another lane, but the cursor moved within [`STALLED_AFTER_MS`]: it is moving, at the
//!   pace the remote site grants;
//! - `stalled` when it has backlog and its acknowledged cursor has not
//!   moved for longer than [`STALLED_AFTER_MS`], with the instant it last
//!   moved (`since`) and the [`Reason`].
//!
//! A route is as healthy as its worst lane; a site (the `backpressure` of
//! the summary line) as its worst route and its local write queues.
//!
//! The sender publishes `stalled_since_ms` (since when the cursor has not
//! moved while the lane had backlog) whenever it looks at its lanes: each
//! turn of a session, and once after each failed session. Between two
//! failed sessions (at most the longest backoff) new backlog behind a dead
//! link is not yet seen as still, so `since` may be late by that much.

use std::sync::atomic::Ordering;

use crate::sender::{LaneMetrics, RouteMetrics, stall, state};

/// A lane with backlog whose acknowledged cursor has not moved for longer
/// than this is `stalled`. Longer than a heartbeat interval and a link's
/// `dead_after` (5 s by default), so one lost session is not a stall; short
/// enough that an operator sees a dead route within seconds.
pub const STALLED_AFTER_MS: u64 = 10_000;

/// The health of a lane, a route or a site, best first (so `max` is the worst).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// No backlog, or the cursor moves.
    #[default]
    Healthy,
    /// Data waits on credit, a lane share or a lane cap, and the cursor moves.
    Throttled,
    /// Backlog and the cursor has not moved for longer than [`STALLED_AFTER_MS`].
    Stalled,
}

impl State {
    /// Every state, best first.
    pub const ALL: [Self; 3] = [Self::Healthy, Self::Throttled, Self::Stalled];

    /// `healthy`, `throttled` or `stalled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Throttled => "throttled",
            Self::Stalled => "stalled",
        }
    }
}

/// Why a lane is throttled or stalled.
///
/// There is no "no lease" reason: routes run only on the gateway holding
/// its site's lease, so a gateway without it has no routes to assess; a
/// site whose holder went silent shows in `edgebus gateways` (the holder's
/// last renewal, `silent`) until a standby takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The route is stopped (removed, or the node is stopping).
    Stopped,
    /// The link keeps failing: the route is held open-circuit and retried
    /// at the longest backoff.
    OpenCircuit {
        /// Consecutive failed sessions.
        failures: u64,
    },
    /// No link session: the route is connecting or backing off.
    NoLink,
    /// The remote site's credit is used up: it grants no more.
    NoCredit,
    /// The lane's reserved share of the window, and the shared pool, are used up.
    LaneShare,
    /// The lane's cap is reached.
    LaneCap,
    /// The route has as many bytes in flight as the link carries in one
    /// credit cycle (plus a short queue): the link is full.
    Pace,
    /// Another lane is active: this lane's pool bytes go below the link's
    /// rate, so the link's queue stays short for the other lane's events.
    Headroom,
    /// The lane waits for a policy change: a stream moved to it and the old
    /// lane has not passed the change, or a change in the log is not yet in
    /// effect.
    PolicyChange,
    /// Events are in flight and the remote site does not acknowledge them
    /// (its writes are slow or it is frozen).
    NoAcknowledgement,
    /// A session is up, nothing is in flight and nothing waits on credit:
    /// no known cause (the lane is not reading).
    NoProgress,
}

impl Reason {
    /// Every reason's code, for label values (`open circuit` stands for
    /// every count of failures).
    pub const CODES: [&'static str; 11] = [
        "stopped",
        "open circuit",
        "no link",
        "no credit",
        "lane share",
        "lane cap",
        "policy change",
        "no acknowledgement",
        "no progress",
        "pace",
        "headroom",
    ];

    /// The reason's stable code, one of [`Reason::CODES`].
    pub fn code(self) -> &'static str {
        match self {
            Self::Stopped => Self::CODES[0],
            Self::OpenCircuit { .. } => Self::CODES[1],
            Self::NoLink => Self::CODES[2],
            Self::NoCredit => Self::CODES[3],
            Self::LaneShare => Self::CODES[4],
            Self::LaneCap => Self::CODES[5],
            Self::PolicyChange => Self::CODES[6],
            Self::NoAcknowledgement => Self::CODES[7],
            Self::NoProgress => Self::CODES[8],
            Self::Pace => Self::CODES[9],
            Self::Headroom => Self::CODES[10],
        }
    }

    /// The reason as a phrase for people.
    pub fn text(self) -> String {
        match self {
            Self::Stopped => "the route is stopped".to_owned(),
            Self::OpenCircuit { failures } => format!("no link: open circuit after {failures} failed sessions"),
            Self::NoLink => "no link: connecting or backing off".to_owned(),
            Self::NoCredit => "no credit: the remote site grants none".to_owned(),
            Self::LaneShare => "the lane's share of the window is used".to_owned(),
            Self::LaneCap => "the lane's cap is reached".to_owned(),
            Self::Pace => "paced: the link is full (one credit cycle and a short queue in flight)".to_owned(),
            Self::Headroom => "headroom: another lane is active, this one sends below the link's rate".to_owned(),
            Self::PolicyChange => "waiting for a policy change to pass".to_owned(),
            Self::NoAcknowledgement => "events in flight are not acknowledged".to_owned(),
            Self::NoProgress => "no progress with a link and nothing in flight".to_owned(),
        }
    }
}

/// The health of a lane or a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// The state.
    pub state: State,
    /// When the cursor last moved (ms since the epoch): `Some` only when stalled.
    pub since_ms: Option<u64>,
    /// Why it is throttled or stalled: `None` when healthy.
    pub reason: Option<Reason>,
}

/// What the assessment reads of a route's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFigures {
    /// The route's [`state`] (`sender::state`).
    pub state: u8,
    /// Consecutive failed sessions.
    pub failures: u64,
}

/// What the assessment reads of one lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneFigures {
    /// Log positions between the acknowledged cursor and the log's end.
    pub backlog_positions: u64,
    /// Events sent and not acknowledged.
    pub in_flight_events: u64,
    /// The sender's [`stall`] reason (`sender::stall`).
    pub stall: u8,
    /// Since when (ms since the epoch) the acknowledged cursor has not moved
    /// while the lane had backlog; 0: it moved at the sender's last look.
    pub still_since_ms: u64,
}

impl LinkFigures {
    /// The figures of `route` now.
    pub fn of(route: &RouteMetrics) -> Self {
        Self { state: route.state.load(Ordering::Relaxed), failures: route.failures.load(Ordering::Relaxed) }
    }
}

impl LaneFigures {
    /// The figures of `lane` now, against the log's `end`.
    pub fn of(lane: &LaneMetrics, end: u64) -> Self {
        Self {
            backlog_positions: end.saturating_sub(lane.acked_position.load(Ordering::Relaxed)),
            in_flight_events: lane.in_flight_events.load(Ordering::Relaxed),
            stall: lane.stall.load(Ordering::Relaxed),
            still_since_ms: lane.stalled_since_ms.load(Ordering::Relaxed),
        }
    }
}

/// The health of one lane of a route whose link is `link`, at `now_ms`.
pub fn assess_lane(link: LinkFigures, lane: LaneFigures, now_ms: u64) -> Health {
    if lane.backlog_positions == 0 {
        return Health::default();
    }
    let still = lane.still_since_ms > 0 && now_ms.saturating_sub(lane.still_since_ms) > STALLED_AFTER_MS;
    if still {
        return Health {
            state: State::Stalled,
            since_ms: Some(lane.still_since_ms),
            reason: Some(lane_reason(link, lane)),
        };
    }
    let throttle = match lane.stall {
        stall::NO_CREDIT => Some(Reason::NoCredit),
        stall::LANE_SHARE => Some(Reason::LaneShare),
        stall::LANE_CAP => Some(Reason::LaneCap),
        stall::PACE => Some(Reason::Pace),
        stall::HEADROOM => Some(Reason::Headroom),
        _ => None,
    };
    match throttle {
        Some(reason) if link.state == state::CONNECTED => {
            Health { state: State::Throttled, since_ms: None, reason: Some(reason) }
        }
        _ => Health::default(),
    }
}

/// Why a lane with backlog does not move: the route's link first (nothing
/// moves without it), then what the sender says the lane waits on, then
/// what is in flight.
fn lane_reason(link: LinkFigures, lane: LaneFigures) -> Reason {
    match link.state {
        state::STOPPED => return Reason::Stopped,
        state::OPEN => return Reason::OpenCircuit { failures: link.failures },
        state::CONNECTED => {}
        _ => return Reason::NoLink,
    }
    match lane.stall {
        stall::NO_LINK => Reason::NoLink,
        stall::NO_CREDIT => Reason::NoCredit,
        stall::LANE_SHARE => Reason::LaneShare,
        stall::LANE_CAP => Reason::LaneCap,
        stall::PACE => Reason::Pace,
        stall::HEADROOM => Reason::Headroom,
        stall::LANE_MOVE => Reason::PolicyChange,
        _ if lane.in_flight_events > 0 => Reason::NoAcknowledgement,
        _ => Reason::NoProgress,
    }
}

/// The health of a route from its lanes' (in route order): the worst
/// state; when stalled, the earliest `since` among its stalled lanes and
/// that lane's reason; when throttled, the first throttled lane's reason.
pub fn assess_route(lanes: &[Health]) -> Health {
    let worst = lanes.iter().map(|h| h.state).max().unwrap_or_default();
    let cause = lanes.iter().filter(|h| h.state == worst).min_by_key(|h| h.since_ms.unwrap_or(u64::MAX));
    match cause {
        Some(cause) if worst != State::Healthy => *cause,
        _ => Health::default(),
    }
}

/// Every lane's health and the route's, of `route` at `now_ms` with the
/// log's end at `end`.
pub fn assess(route: &RouteMetrics, end: u64, now_ms: u64) -> (Health, Vec<Health>) {
    let link = LinkFigures::of(route);
    let lanes: Vec<Health> = route.lanes.iter().map(|l| assess_lane(link, LaneFigures::of(l, end), now_ms)).collect();
    (assess_route(&lanes), lanes)
}

/// What the summary line takes from the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events read ahead or in flight on every route.
    pub wan_queue: u64,
    /// Events dropped by policy since the node started.
    pub dropped: u64,
    /// The worst route's health (`healthy` without routes).
    pub health: State,
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;
    const CONNECTED: LinkFigures = LinkFigures { state: state::CONNECTED, failures: 0 };

    fn lane(backlog: u64, stall: u8, still_for_ms: Option<u64>) -> LaneFigures {
        LaneFigures {
            backlog_positions: backlog,
            in_flight_events: 0,
            stall,
            still_since_ms: still_for_ms.map_or(0, |ms| NOW - ms),
        }
    }

    fn stalled(since_ms: u64, reason: Reason) -> Health {
        Health { state: State::Stalled, since_ms: Some(since_ms), reason: Some(reason) }
    }

    fn throttled(reason: Reason) -> Health {
        Health { state: State::Throttled, since_ms: None, reason: Some(reason) }
    }

    #[test]
    fn a_lane_without_backlog_is_healthy_whatever_its_link() {
        for link_state in [state::CONNECTING, state::CONNECTED, state::BACKOFF, state::OPEN, state::STOPPED] {
            let link = LinkFigures { state: link_state, failures: 9 };
            for stall in [stall::NONE, stall::NO_LINK, stall::NO_CREDIT, stall::LANE_MOVE] {
                // A stale `since` with no backlog left is not a stall either.
                assert_eq!(assess_lane(link, lane(0, stall, Some(60_000)), NOW), Health::default());
            }
        }
    }

    #[test]
    fn a_moving_lane_is_healthy_or_throttled_by_what_holds_it() {
        assert_eq!(assess_lane(CONNECTED, lane(500, stall::NONE, None), NOW), Health::default());
        assert_eq!(assess_lane(CONNECTED, lane(500, stall::NONE, Some(2_000)), NOW), Health::default());
        assert_eq!(assess_lane(CONNECTED, lane(500, stall::NO_CREDIT, None), NOW), throttled(Reason::NoCredit));
        assert_eq!(
            assess_lane(CONNECTED, lane(500, stall::LANE_SHARE, Some(9_000)), NOW),
            throttled(Reason::LaneShare)
        );
        assert_eq!(assess_lane(CONNECTED, lane(500, stall::LANE_CAP, None), NOW), throttled(Reason::LaneCap));
        assert_eq!(assess_lane(CONNECTED, lane(500, stall::PACE, None), NOW), throttled(Reason::Pace));
        assert_eq!(assess_lane(CONNECTED, lane(500, stall::HEADROOM, None), NOW), throttled(Reason::Headroom));
        // Waiting for a policy change for a moment is no throttle.
        assert_eq!(assess_lane(CONNECTED, lane(500, stall::LANE_MOVE, Some(1_000)), NOW), Health::default());
        // A stale credit stall once the link is gone is no throttle: the link decides.
        let backoff = LinkFigures { state: state::BACKOFF, failures: 1 };
        assert_eq!(assess_lane(backoff, lane(500, stall::NO_CREDIT, Some(1_000)), NOW), Health::default());
    }

    #[test]
    fn a_lane_is_stalled_only_beyond_the_threshold() {
        let at = assess_lane(CONNECTED, lane(5, stall::NO_CREDIT, Some(STALLED_AFTER_MS)), NOW);
        assert_eq!(at, throttled(Reason::NoCredit), "exactly the threshold is not beyond it");
        let beyond = assess_lane(CONNECTED, lane(5, stall::NO_CREDIT, Some(STALLED_AFTER_MS + 1)), NOW);
        assert_eq!(beyond, stalled(NOW - STALLED_AFTER_MS - 1, Reason::NoCredit));
        // A `since` after `now` (the caller's clock behind the sender's) is no stall.
        let ahead = LaneFigures { still_since_ms: NOW + 5_000, ..lane(5, stall::NONE, None) };
        assert_eq!(assess_lane(CONNECTED, ahead, NOW), Health::default());
    }

    #[test]
    fn a_stalled_lane_names_its_link_first() {
        let still = Some(STALLED_AFTER_MS * 3);
        let since = NOW - STALLED_AFTER_MS * 3;
        let cases = [
            (state::STOPPED, Reason::Stopped),
            (state::OPEN, Reason::OpenCircuit { failures: 7 }),
            (state::BACKOFF, Reason::NoLink),
            (state::CONNECTING, Reason::NoLink),
        ];
        for (link_state, reason) in cases {
            let link = LinkFigures { state: link_state, failures: 7 };
            // Whatever the sender last noted for the lane.
            for stall in [stall::NONE, stall::NO_LINK, stall::NO_CREDIT, stall::LANE_MOVE] {
                assert_eq!(
                    assess_lane(link, lane(40, stall, still), NOW),
                    stalled(since, reason),
                    "{link_state} {stall}"
                );
            }
        }
    }

    #[test]
    fn a_stalled_lane_with_a_link_names_what_it_waits_on() {
        let still = Some(60_000);
        let since = NOW - 60_000;
        let cases = [
            (stall::NO_CREDIT, 0, Reason::NoCredit),
            (stall::LANE_SHARE, 0, Reason::LaneShare),
            (stall::LANE_CAP, 3, Reason::LaneCap),
            (stall::LANE_MOVE, 0, Reason::PolicyChange),
            (stall::NO_LINK, 0, Reason::NoLink),
            (stall::NONE, 12, Reason::NoAcknowledgement),
            (stall::NONE, 0, Reason::NoProgress),
        ];
        for (stall, in_flight, reason) in cases {
            let figures = LaneFigures { in_flight_events: in_flight, ..lane(40, stall, still) };
            assert_eq!(assess_lane(CONNECTED, figures, NOW), stalled(since, reason), "stall {stall}");
        }
    }

    #[test]
    fn a_route_is_its_worst_lane_and_its_earliest_stall() {
        assert_eq!(assess_route(&[]), Health::default());
        assert_eq!(assess_route(&[Health::default(), Health::default()]), Health::default());
        let route = assess_route(&[Health::default(), throttled(Reason::LaneShare), throttled(Reason::NoCredit)]);
        assert_eq!(route, throttled(Reason::LaneShare), "the first throttled lane");
        let lanes = [throttled(Reason::NoCredit), stalled(900, Reason::PolicyChange), stalled(700, Reason::NoLink)];
        assert_eq!(assess_route(&lanes), stalled(700, Reason::NoLink), "the lane stalled the longest");
    }

    #[test]
    fn states_order_from_best_to_worst_and_codes_are_distinct() {
        assert_eq!(State::ALL.iter().copied().max(), Some(State::Stalled));
        assert!(State::Healthy < State::Throttled && State::Throttled < State::Stalled);
        assert_eq!(State::ALL.map(State::as_str), ["healthy", "throttled", "stalled"]);
        let reasons = [
            Reason::Stopped,
            Reason::OpenCircuit { failures: 1 },
            Reason::NoLink,
            Reason::NoCredit,
            Reason::LaneShare,
            Reason::LaneCap,
            Reason::PolicyChange,
            Reason::NoAcknowledgement,
            Reason::NoProgress,
            Reason::Pace,
            Reason::Headroom,
        ];
        assert_eq!(reasons.map(Reason::code), Reason::CODES);
        assert!(Reason::OpenCircuit { failures: 7 }.text().contains("after 7 failed sessions"));
    }

    #[test]
    fn figures_are_read_from_the_senders_counters() {
        let route = RouteMetrics { lanes: vec![LaneMetrics::default(), LaneMetrics::default()], ..Default::default() };
        route.state.store(state::OPEN, Ordering::Relaxed);
        route.failures.store(6, Ordering::Relaxed);
        route.lanes[0].acked_position.store(100, Ordering::Relaxed);
        route.lanes[0].stall.store(stall::NO_LINK, Ordering::Relaxed);
        route.lanes[0].stalled_since_ms.store(NOW - 30_000, Ordering::Relaxed);
        route.lanes[1].acked_position.store(250, Ordering::Relaxed);
        let (health, lanes) = assess(&route, 250, NOW);
        assert_eq!(lanes[0], stalled(NOW - 30_000, Reason::OpenCircuit { failures: 6 }));
        assert_eq!(lanes[1], Health::default(), "no backlog");
        assert_eq!(health, lanes[0]);
        assert_eq!(
            LaneFigures::of(&route.lanes[0], 250),
            LaneFigures {
                backlog_positions: 150,
                in_flight_events: 0,
                stall: stall::NO_LINK,
                still_since_ms: NOW - 30_000
            }
        );
    }
}
