//! The lease core against a simulated log: takeovers, drills, conflicts,
//! and a property test of arbitrary schedules with frozen processes and
//! clocks that jump.

use proptest::prelude::*;

use super::*;

const LEASE: u64 = 1_000;

fn me(name: &str, instance: &str) -> Me {
    Me {
        gateway: name.into(),
        instance: instance.into(),
        wan: format!("{name}:1"),
        http: String::new(),
        lease_ms: LEASE,
    }
}

/// The site's log of lease records, with conditional appends.
#[derive(Default)]
struct Log {
    records: Vec<LeaseRecord>,
}

impl Log {
    fn append(&mut self, append: &Append) -> Appended {
        let current = self.records.len().checked_sub(1).map(|v| v as u64);
        if append.expected != current {
            return Appended::Conflict;
        }
        self.records.push(append.record.clone());
        Appended::Written(self.records.len() as u64 - 1)
    }

    fn sync(&self, core: &mut LeaseCore, now: u64) {
        for (v, r) in self.records.iter().enumerate() {
            core.observe(v as u64, r, 0, now);
        }
        core.synced();
    }
}

/// One step of a gateway: read, then make the append it asks for.
fn step(log: &mut Log, core: &mut LeaseCore, now: u64) {
    log.sync(core, now);
    if let Some(append) = core.poll(now) {
        let outcome = log.append(&append);
        core.on_appended(outcome, 0, now);
    }
}

fn active(core: &LeaseCore, now: u64) -> Option<u64> {
    match core.role(now) {
        Role::Active { term, .. } => Some(term),
        Role::Standby => None,
    }
}

#[test]
fn the_first_gateway_takes_a_free_lease_and_keeps_it_by_renewing() {
    let mut log = Log::default();
    let mut a = LeaseCore::new(me("gw-us", "a"), 0);
    let mut b = LeaseCore::new(me("gw-us-backup", "b"), 0);
    step(&mut log, &mut a, 0);
    assert_eq!(active(&a, 0), Some(1));
    for now in (10..5_000).step_by(10) {
        step(&mut log, &mut a, now);
        step(&mut log, &mut b, now);
        assert_eq!(active(&a, now), Some(1), "the holder keeps its lease at {now}");
        assert_eq!(active(&b, now), None, "the standby waits at {now}");
    }
    let renewals = log.records.iter().filter(|r| matches!(r, LeaseRecord::Renewed { .. })).count();
    assert!((12..=16).contains(&renewals), "a renewal every third of the lease: {renewals}");
}

#[test]
fn a_standby_takes_over_a_lease_after_a_lease_of_silence() {
    let mut log = Log::default();
    let mut a = LeaseCore::new(me("gw-us", "a"), 0);
    let mut b = LeaseCore::new(me("gw-us-backup", "b"), 0);
    step(&mut log, &mut a, 0);
    step(&mut log, &mut b, 0);
    // `a` acquired at 0 and dies without renewing.
    let mut took_over = None;
    for now in (500..4_000).step_by(10) {
        step(&mut log, &mut b, now);
        assert!(active(&a, now).is_none() || active(&b, now).is_none(), "never two active at {now}");
        if took_over.is_none() && active(&b, now).is_some() {
            took_over = Some(now);
        }
    }
    let at = took_over.expect("the standby took over");
    // `a` last wrote at 0, and `b` saw it then.
    assert_eq!(at, LEASE * 85 / 100, "85% of a lease after the standby saw the last change");
    assert_eq!(active(&b, 4_000), Some(2), "under the next term");
}

#[test]
fn an_operator_drill_moves_the_lease_at_once_and_the_old_holder_lets_it_go() {
    let mut log = Log::default();
    let mut a = LeaseCore::new(me("gw-us", "a"), 0);
    let mut b = LeaseCore::new(me("gw-us-backup", "b"), 0);
    step(&mut log, &mut a, 0);
    step(&mut log, &mut b, 0);
    log.records.push(LeaseRecord::Released {
        gateway: "gw-us".into(),
        term: 1,
        reason: "drill".into(),
        by: "operator".into(),
    });
    // Both see it; `a` first, so it would win a race it must not enter.
    step(&mut log, &mut a, 100);
    assert_eq!(active(&a, 100), None, "the released holder stops");
    step(&mut log, &mut b, 100);
    assert_eq!(active(&b, 100), Some(2), "the standby takes the free lease at once");
    for now in (110..3_000).step_by(10) {
        step(&mut log, &mut a, now);
        step(&mut log, &mut b, now);
        assert_eq!(active(&a, now), None);
        assert_eq!(active(&b, now), Some(2));
    }
}

#[test]
fn a_released_holder_takes_its_lease_back_when_no_one_else_does() {
    let mut log = Log::default();
    let mut a = LeaseCore::new(me("gw-us", "a"), 0);
    step(&mut log, &mut a, 0);
    log.records.push(LeaseRecord::Released {
        gateway: "gw-us".into(),
        term: 1,
        reason: "drill".into(),
        by: "operator".into(),
    });
    step(&mut log, &mut a, 10);
    assert_eq!(active(&a, 10), None);
    step(&mut log, &mut a, 10 + LEASE);
    assert_eq!(active(&a, 10 + LEASE), Some(2));
}

#[test]
fn a_restarted_gateway_takes_back_its_own_lease_at_once() {
    let mut log = Log::default();
    let mut a = LeaseCore::new(me("gw-us", "a"), 0);
    step(&mut log, &mut a, 0);
    let mut again = LeaseCore::new(me("gw-us", "a2"), 50);
    step(&mut log, &mut again, 60);
    assert_eq!(active(&again, 60), Some(2));
    step(&mut log, &mut a, 400);
    assert_eq!(active(&a, 400), None, "the earlier process, renewing, finds itself deposed");
}

#[test]
fn two_standbys_racing_for_a_lapsed_lease_make_one_holder() {
    let mut log = Log::default();
    let mut a = LeaseCore::new(me("gw-us", "a"), 0);
    let mut b = LeaseCore::new(me("gw-b", "b"), 0);
    let mut c = LeaseCore::new(me("gw-c", "c"), 0);
    step(&mut log, &mut a, 0);
    for core in [&mut b, &mut c] {
        step(&mut log, core, 0);
    }
    // Both read the same lapsed lease, then both append.
    let now = 2 * LEASE;
    log.sync(&mut b, now);
    log.sync(&mut c, now);
    let from_b = b.poll(now).expect("b acquires");
    let from_c = c.poll(now).expect("c acquires");
    let outcome_b = log.append(&from_b);
    let outcome_c = log.append(&from_c);
    b.on_appended(outcome_b, 0, now);
    c.on_appended(outcome_c, 0, now);
    assert_eq!(outcome_c, Appended::Conflict);
    assert_eq!(active(&b, now), Some(2));
    assert_eq!(active(&c, now), None);
}

#[test]
fn a_holder_that_cannot_reach_the_site_stops_before_anyone_can_take_over() {
    let mut log = Log::default();
    let mut a = LeaseCore::new(me("gw-us", "a"), 0);
    step(&mut log, &mut a, 0);
    // The site is unreachable for `a` from 1: its renewals fail.
    for now in (1..LEASE).step_by(10) {
        if let Some(_append) = a.poll(now) {
            a.on_appended(Appended::Failed, 0, now);
        }
    }
    assert_eq!(active(&a, LEASE * 8 / 10), None, "validity is 80% of the lease from the last renewal sent");
}

/// A gateway in the simulation.
#[derive(Debug, Clone)]
struct Sim {
    core: LeaseCore,
    /// Offset of its clock from real time (jumps change it).
    offset: i64,
    frozen: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u16),
    Step(usize),
    Freeze(usize),
    Thaw(usize),
    Jump(usize, i16),
    Drill,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u16..200).prop_map(Op::Advance),
        8 => (0usize..3).prop_map(Op::Step),
        1 => (0usize..3).prop_map(Op::Freeze),
        2 => (0usize..3).prop_map(Op::Thaw),
        1 => ((0usize..3), any::<i16>()).prop_map(|(g, j)| Op::Jump(g, j)),
        1 => Just(Op::Drill),
    ]
}

fn clock(sim: &Sim, real: u64) -> u64 {
    (i64::try_from(real).expect("small") + 100_000 + sim.offset).max(0) as u64
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the schedule: every term has one holder; with clocks that
    /// keep time, never two gateways believe they are active at once; with
    /// clocks that jump, the receivers' fence (highest term seen) refuses
    /// every frame of the older term once the newer one has been seen.
    #[test]
    fn one_active_gateway_per_term_and_fenced_when_clocks_lie(ops in proptest::collection::vec(op(), 1..400)) {
        let mut log = Log::default();
        let mut real = 0u64;
        let mut sims: Vec<Sim> = ["a", "b", "c"]
            .iter()
            .map(|n| Sim { core: LeaseCore::new(me(&format!("gw-{n}"), n), 100_000), offset: 0, frozen: false })
            .collect();
        // A clock jumped or an operator moved the lease: only the fence
        // keeps the older term out.
        let mut jumped = false;
        let mut fence = 0u64;
        for op in ops {
            match op {
                Op::Advance(ms) => real += u64::from(ms),
                Op::Step(g) if !sims[g].frozen => {
                    let now = clock(&sims[g], real);
                    step(&mut log, &mut sims[g].core, now);
                }
                Op::Step(_) => {}
                Op::Freeze(g) => sims[g].frozen = true,
                Op::Thaw(g) => sims[g].frozen = false,
                Op::Jump(g, by) => {
                    sims[g].offset += i64::from(by) * 10;
                    jumped = true;
                }
                Op::Drill => {
                    // The old holder sends until it reads the release; the
                    // fence, not the clock, keeps it out from then on.
                    jumped = true;
                    let mut view = LeaseView::default();
                    for (v, r) in log.records.iter().enumerate() {
                        view.apply(v as u64, r, 0);
                    }
                    if let Some(holder) = view.holder {
                        log.records.push(LeaseRecord::Released {
                            gateway: holder.gateway,
                            term: holder.term,
                            reason: "drill".into(),
                            by: "operator".into(),
                        });
                    }
                }
            }
            // The last record alone tells what the whole stream tells.
            if let Some(last) = log.records.last() {
                let mut full = LeaseView::default();
                for (v, r) in log.records.iter().enumerate() {
                    full.apply(v as u64, r, 0);
                }
                let mut alone = LeaseView::default();
                alone.apply(log.records.len() as u64 - 1, last, 0);
                prop_assert_eq!(alone, full);
            }
            // Terms in the log only grow, one holder each.
            let mut last = 0;
            for record in &log.records {
                if let LeaseRecord::Acquired { term, .. } = record {
                    prop_assert!(*term > last, "terms grow: {term} after {last}");
                    last = *term;
                }
            }
            let actives: Vec<u64> = sims.iter().filter_map(|s| active(&s.core, clock(s, real))).collect();
            if !jumped {
                prop_assert!(actives.len() <= 1, "two active gateways at {real}: {actives:?}");
            }
            // A frame sent now by every gateway that believes itself
            // active reaches a receiver; the fence admits only the
            // highest term so far.
            let mut sorted = actives.clone();
            sorted.sort_unstable();
            for term in sorted.iter().rev() {
                if *term >= fence {
                    fence = *term;
                } else {
                    prop_assert!(jumped, "a lower term is refused only when a clock lied");
                }
            }
            prop_assert!(sorted.iter().filter(|t| **t >= fence).count() <= 1, "one term admitted at a time");
        }
    }
}
