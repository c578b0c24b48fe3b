//! Which events a route sends, in which lane, and how: the site's topic
//! policies (first matching rule wins), versioned by the log position at
//! which each change took effect.

use std::sync::Arc;

use edgebus_types::RecordedEvent;

use crate::def::{Action, Policy, Route};

/// The policies in effect from one log position on.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Rules in declared order; the first whose pattern matches decides.
    pub rules: Vec<Policy>,
}

/// The topic label of events no rule matches (sent as is in the default lane).
static DEFAULT_TOPIC: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(">"));

/// What a route does with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not for this route: outside its topics, a system stream, local-only,
    /// not among the rule's destinations, or the event came from the
    /// remote site (never sent back where it came from).
    Skip,
    /// Dropped by policy (counted).
    Drop {
        /// The deciding rule's pattern.
        topic: Arc<str>,
    },
    /// Sent in `lane` with `action` (replicate, sample or compact).
    Send {
        /// Lane index in the route.
        lane: usize,
        /// What to do.
        action: Action,
        /// The deciding rule's pattern, or `>` for the route's default.
        topic: Arc<str>,
    },
}

impl PolicySet {
    /// The rule for `stream`, if any.
    pub fn rule_for(&self, event: &RecordedEvent) -> Option<&Policy> {
        self.rules.iter().find(|r| r.pattern.matches(&event.stream))
    }

    /// What `route` does with `event`.
    pub fn decide(&self, route: &Route, event: &RecordedEvent) -> Decision {
        if event.stream.is_system() || !route.carries(&event.stream) {
            return Decision::Skip;
        }
        if let Some(origin) = &event.origin
            && (origin.site == route.remote_site || origin.via == route.remote_site)
        {
            return Decision::Skip;
        }
        let Some(rule) = self.rule_for(event) else {
            return Decision::Send { lane: 0, action: Action::Replicate, topic: Arc::clone(&DEFAULT_TOPIC) };
        };
        if !rule.destinations.is_empty() && !rule.destinations.contains(&route.remote_site) {
            return Decision::Skip;
        }
        let topic = Arc::clone(&rule.topic);
        match &rule.action {
            Action::LocalOnly => Decision::Skip,
            Action::Drop => Decision::Drop { topic },
            action => {
                let lane = rule.lane.as_ref().and_then(|l| route.lanes.iter().position(|x| &x.name == l)).unwrap_or(0);
                Decision::Send { lane, action: action.clone(), topic }
            }
        }
    }
}

/// Policy versions: each with the log position from which it applies.
/// Versions are appended in position order.
#[derive(Debug, Clone, Default)]
pub struct PolicyHistory {
    /// `(from_position, set)`, ascending.
    pub versions: Vec<(u64, Arc<PolicySet>)>,
}

/// How many policy versions are kept for the lane-move barrier; older
/// changes are assumed passed by every lane (a lane that is that far
/// behind applies the oldest kept version).
pub const POLICY_VERSIONS_KEPT: usize = 64;

impl PolicyHistory {
    /// The set in effect at `position`.
    pub fn at(&self, position: u64) -> Arc<PolicySet> {
        self.versions
            .iter()
            .rev()
            .find(|(from, _)| *from <= position)
            .or_else(|| self.versions.first())
            .map(|(_, set)| Arc::clone(set))
            .unwrap_or_default()
    }

    /// Adds the version in effect from `position` on.
    pub fn push(&mut self, position: u64, set: PolicySet) {
        self.versions.push((position, Arc::new(set)));
        if self.versions.len() > POLICY_VERSIONS_KEPT {
            self.versions.remove(0);
        }
    }

    /// The policy changes at or below `position` whose position is above
    /// `since`: `(change position, set before, set after)`.
    pub fn changes_between(&self, since: u64, position: u64) -> impl Iterator<Item = (u64, &PolicySet, &PolicySet)> {
        self.versions.windows(2).filter_map(move |pair| {
            let (from, after) = &pair[1];
            (*from > since && *from <= position).then(|| (*from, pair[0].1.as_ref(), after.as_ref()))
        })
    }
}

/// Whether `action` keeps `event` (sampling; compaction is decided over a
/// batch by the lane). `last_bucket` is the time bucket of the last event
/// of the same stream the lane kept, if known.
pub fn sample_keeps(action: &Action, event: &RecordedEvent, last_bucket: Option<u64>) -> bool {
    match action {
        Action::SampleEvery(n) => event.version.is_multiple_of(u64::from(*n)),
        Action::SamplePer(ms) => last_bucket != Some(event.timestamp_ms / ms),
        _ => true,
    }
}

/// The compaction key of `event`: its stream, or its stream and a
/// top-level field of its JSON payload (events without the field are not
/// compacted).
pub fn compact_key(action: &Action, event: &RecordedEvent) -> Option<String> {
    let Action::Compact(field) = action else { return None };
    match field {
        None => Some(event.stream.as_str().to_owned()),
        Some(field) => {
            let value: serde_json::Value = serde_json::from_slice(&event.data).ok()?;
            let key = value.get(field)?;
            Some(format!("{}\u{0}{key}", event.stream.as_str()))
        }
    }
}

#[cfg(test)]
mod tests {
    use edgebus_types::{EventId, EventType, NewEvent, Origin, SiteName, StreamName};

    use super::*;
    use crate::def::{PolicyDef, RouteDef};

    fn route() -> Route {
        let def: RouteDef = serde_json::from_str(
            r#"{"remote_site":"us","addresses":["h:1"],"topics":["telemetry.>","alerts.>","orders.>"],
                "lanes":[{"name":"critical","reserved_permille":250},{"name":"bulk"}]}"#,
        )
        .unwrap();
        def.validate(&SiteName::new("eu").unwrap()).unwrap()
    }

    fn event(stream: &str, version: u64) -> RecordedEvent {
        let new = NewEvent {
            id: EventId::from_u128(1),
            event_type: EventType::new("t").unwrap(),
            data: br#"{"device":"d1"}"#.to_vec(),
            metadata: vec![],
            timestamp_ms: 1_500,
        };
        RecordedEvent::new(StreamName::new(stream).unwrap(), version, 0, new)
    }

    fn rule(pattern: &str, action: &str, lane: Option<&str>, destinations: &[&str]) -> Policy {
        PolicyDef {
            pattern: pattern.into(),
            action: action.into(),
            lane: lane.map(Into::into),
            destinations: destinations.iter().map(|d| (*d).to_owned()).collect(),
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let set = PolicySet {
            rules: vec![
                rule("alerts.>", "replicate", Some("critical"), &[]),
                rule("telemetry.>", "sample 1/10", Some("bulk"), &[]),
                rule("orders.secret.>", "local-only", None, &[]),
                rule("orders.junk.>", "drop", None, &[]),
                rule("orders.ap.>", "replicate", None, &["ap"]),
            ],
        };
        let r = route();
        assert!(matches!(
            set.decide(&r, &event("alerts.fire", 0)),
            Decision::Send { lane: 0, action: Action::Replicate, .. }
        ));
        assert!(matches!(
            set.decide(&r, &event("telemetry.t1", 3)),
            Decision::Send { lane: 1, action: Action::SampleEvery(10), .. }
        ));
        assert_eq!(set.decide(&r, &event("orders.secret.x", 0)), Decision::Skip);
        assert_eq!(set.decide(&r, &event("orders.junk.x", 0)), Decision::Drop { topic: "orders.junk.>".into() });
        assert_eq!(set.decide(&r, &event("orders.ap.x", 0)), Decision::Skip, "not a destination");
        assert_eq!(set.decide(&r, &event("other.x", 0)), Decision::Skip, "outside the route's topics");
        assert!(
            matches!(set.decide(&r, &event("orders.o1", 0)), Decision::Send { lane: 0, topic, .. } if &*topic == ">")
        );
    }

    #[test]
    fn events_from_the_remote_site_are_never_sent_back() {
        let set = PolicySet::default();
        let r = route();
        let mut e = event("orders.o1", 0);
        e.origin = Some(Origin {
            site: SiteName::new("us").unwrap(),
            position: 1,
            via: SiteName::new("us").unwrap(),
            note: String::new(),
        });
        assert_eq!(set.decide(&r, &e), Decision::Skip);
        e.origin = Some(Origin {
            site: SiteName::new("ap").unwrap(),
            position: 1,
            via: SiteName::new("us").unwrap(),
            note: String::new(),
        });
        assert_eq!(set.decide(&r, &e), Decision::Skip, "relayed by the remote site");
        e.origin = Some(Origin {
            site: SiteName::new("ap").unwrap(),
            position: 1,
            via: SiteName::new("ap").unwrap(),
            note: String::new(),
        });
        assert!(matches!(set.decide(&r, &e), Decision::Send { .. }), "relayed onward");
    }

    #[test]
    fn sampling_and_compaction_keys() {
        let e = event("telemetry.t1", 20);
        assert!(sample_keeps(&Action::SampleEvery(10), &e, None));
        assert!(!sample_keeps(&Action::SampleEvery(10), &event("telemetry.t1", 21), None));
        assert!(sample_keeps(&Action::SamplePer(1000), &e, None));
        assert!(!sample_keeps(&Action::SamplePer(1000), &e, Some(1)));
        assert_eq!(compact_key(&Action::Compact(None), &e).as_deref(), Some("telemetry.t1"));
        assert!(compact_key(&Action::Compact(Some("device".into())), &e).unwrap().contains("d1"));
        assert_eq!(compact_key(&Action::Replicate, &e), None);
    }

    #[test]
    fn history_applies_versions_by_position() {
        let mut h = PolicyHistory::default();
        h.push(0, PolicySet::default());
        h.push(100, PolicySet { rules: vec![rule("a.>", "drop", None, &[])] });
        assert!(h.at(99).rules.is_empty());
        assert_eq!(h.at(100).rules.len(), 1);
        assert_eq!(h.changes_between(50, 200).count(), 1);
        assert_eq!(h.changes_between(100, 200).count(), 0);
    }
}
