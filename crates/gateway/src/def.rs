//! Route and policy definitions as operators write them (TOML `[gateway]`
//! sections, JSON over HTTP, events in the `$gateway` stream), and their
//! validation into typed values. Every refusal names the field and the
//! problem.

use edgebus_types::{SiteName, StreamName, StreamPattern};
use serde::{Deserialize, Serialize};

use crate::credit::Amount;

/// Most routes one gateway owns.
pub const ROUTES_MAX: usize = 64;
/// Most lanes one route has.
pub const LANES_MAX: usize = 8;
/// Most policy rules of a site.
pub const POLICIES_MAX: usize = 256;
/// Most gateway addresses of one remote site.
pub const ADDRESSES_MAX: usize = 8;
/// Most topic patterns of one route.
pub const ROUTE_TOPICS_MAX: usize = 64;
/// Default window bounds a route asks for; the receiving gateway sizes its
/// window within both these and its own bounds.
pub const ROUTE_WINDOW_MIN_DEFAULT: Amount = Amount { events: 64, bytes: 64 * 1024 };
/// Default upper window bound a route asks for: also bounds the memory the
/// route holds (its lanes' read-ahead and what is in flight).
pub const ROUTE_WINDOW_MAX_DEFAULT: Amount = Amount { events: 65_536, bytes: 16 * 1024 * 1024 };
/// Largest window a route may be configured with.
pub const ROUTE_WINDOW_MAX_LIMIT: Amount = Amount { events: 1_048_576, bytes: 256 * 1024 * 1024 };

/// A route as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDef {
    /// The route's name; defaults to the remote site's.
    #[serde(default)]
    pub name: String,
    /// The site it replicates to.
    pub remote_site: String,
    /// The remote site's gateway WAN addresses (`host:port`), tried in turn.
    pub addresses: Vec<String>,
    /// Topic patterns the route carries (default: every stream, `>`).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Lanes, highest priority first; the first is the default lane.
    /// Default: one lane `default`.
    #[serde(default)]
    pub lanes: Vec<LaneDef>,
    /// Smallest window (events), default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_min_events: Option<u64>,
    /// Largest window (events), default 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_max_events: Option<u64>,
    /// Smallest window (bytes), default 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_min_bytes: Option<u64>,
    /// Largest window (bytes), default 16 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_max_bytes: Option<u64>,
}

/// A lane as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneDef {
    /// Its name (`critical`, `bulk`).
    pub name: String,
    /// Share of the window reserved for it, in per mille; no other lane can
    /// take it. The unreserved rest is a pool any lane borrows from.
    #[serde(default)]
    pub reserved_permille: u32,
    /// Most events it has in flight (default: the window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_events: Option<u64>,
    /// Most bytes it has in flight (default: the window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_bytes: Option<u64>,
}

/// A topic policy as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDef {
    /// Stream pattern (`telemetry.>`).
    pub pattern: String,
    /// `replicate`, `sample 1/N`, `sample per DURATION` (`500ms`, `2s`),
    /// `compact` (latest per stream), `compact data.FIELD`, `drop`,
    /// `local-only`.
    pub action: String,
    /// Lane it travels in (default: each route's first lane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// Sites it goes to (default: every route).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
}

/// Why a definition is refused: the field and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct DefError {
    /// Which field (`lanes[1].reserved_permille`).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

fn bad<T>(field: impl Into<String>, problem: impl Into<String>) -> Result<T, DefError> {
    Err(DefError { field: field.into(), problem: problem.into() })
}

/// What a policy does with the events it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send every event.
    Replicate,
    /// Send the events whose stream version is a multiple of N.
    SampleEvery(u32),
    /// Send the first event of each stream in each time bucket of this many ms.
    SamplePer(u64),
    /// Send only the latest event per key in the backlog read ahead; the key
    /// is the stream, or a top-level field of the JSON payload.
    Compact(Option<String>),
    /// Never send; counted as dropped.
    Drop,
    /// Never leaves the site; not counted.
    LocalOnly,
}

impl Action {
    /// Parses an action as written in a [`PolicyDef`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let usage =
            "expected replicate, sample 1/N, sample per DURATION, compact, compact data.FIELD, drop or local-only";
        match words.as_slice() {
            ["replicate"] => Ok(Self::Replicate),
            ["drop"] => Ok(Self::Drop),
            ["local-only"] => Ok(Self::LocalOnly),
            ["compact"] => Ok(Self::Compact(None)),
            ["compact", key] => match key.strip_prefix("data.") {
                Some(field) if !field.is_empty() && !field.contains('.') => Ok(Self::Compact(Some(field.to_owned()))),
                _ => Err(format!("compact key {key:?} must be data.FIELD (a top-level field of the JSON payload)")),
            },
            ["sample", "per", duration] => {
                let ms = parse_duration_ms(duration)
                    .ok_or_else(|| format!("sample period {duration:?} is not a duration such as 500ms, 2s or 1m"))?;
                if ms == 0 {
                    return Err("sample period must be longer than 0 ms".into());
                }
                Ok(Self::SamplePer(ms))
            }
            ["sample", rate] => {
                let n = rate
                    .strip_prefix("1/")
                    .and_then(|n| n.parse::<u32>().ok())
                    .ok_or_else(|| format!("sample rate {rate:?} must be 1/N with N a positive integer"))?;
                if n == 0 {
                    return Err("sample rate 1/0 is invalid: N must be at least 1".into());
                }
                Ok(Self::SampleEvery(n))
            }
            _ => Err(format!("unknown action {text:?}: {usage}")),
        }
    }

    /// The note replicated events carry, empty when sent as is.
    pub fn note(&self) -> String {
        match self {
            Self::SampleEvery(n) => format!("sampled 1/{n}"),
            Self::SamplePer(ms) => format!("sampled per {ms}ms"),
            Self::Compact(_) => "compacted".into(),
            Self::Replicate | Self::Drop | Self::LocalOnly => String::new(),
        }
    }
}

fn parse_duration_ms(text: &str) -> Option<u64> {
    let (digits, factor) = if let Some(d) = text.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = text.strip_suffix('s') {
        (d, 1_000)
    } else if let Some(d) = text.strip_suffix('m') {
        (d, 60_000)
    } else {
        return None;
    };
    digits.parse::<u64>().ok()?.checked_mul(factor)
}

/// A validated lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// Its name.
    pub name: String,
    /// Reserved share in per mille.
    pub reserved_permille: u32,
    /// Cap of its in-flight amount.
    pub cap: Amount,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Its name.
    pub name: String,
    /// The remote site.
    pub remote_site: SiteName,
    /// Remote gateway addresses.
    pub addresses: Vec<String>,
    /// Topic patterns it carries.
    pub topics: Vec<StreamPattern>,
    /// Lanes, the first the default.
    pub lanes: Vec<Lane>,
    /// Window bounds.
    pub window_min: Amount,
    /// Window bounds; also bounds the route's memory.
    pub window_max: Amount,
    /// As declared.
    pub def: RouteDef,
}

impl Route {
    /// Whether the route carries `stream` at all.
    pub fn carries(&self, stream: &StreamName) -> bool {
        self.topics.iter().any(|p| p.matches(stream))
    }
}

/// Validates a route name (the rules of site names).
pub fn route_name(field: &str, name: &str) -> Result<String, DefError> {
    SiteName::new(name).map(|n| n.as_str().to_owned()).or_else(|e| bad(field, e.reason))
}

impl RouteDef {
    /// Validates the definition; `local_site` may not be its remote site.
    pub fn validate(&self, local_site: &SiteName) -> Result<Route, DefError> {
        let remote_site = SiteName::new(&self.remote_site).or_else(|e| bad("remote_site", e.to_string()))?;
        if &remote_site == local_site {
            return bad("remote_site", format!("{remote_site} is this site; a route goes to another site"));
        }
        let name = if self.name.is_empty() { remote_site.to_string() } else { route_name("name", &self.name)? };
        if self.addresses.is_empty() {
            return bad("addresses", "at least one remote gateway address (host:port) is needed");
        }
        if self.addresses.len() > ADDRESSES_MAX {
            return bad(
                "addresses",
                format!("{} addresses, more than the maximum of {ADDRESSES_MAX}", self.addresses.len()),
            );
        }
        for (i, address) in self.addresses.iter().enumerate() {
            let ok = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return bad(format!("addresses[{i}]"), format!("{address:?} is not host:port"));
            }
        }
        let topics = if self.topics.is_empty() { vec![">".to_owned()] } else { self.topics.clone() };
        if topics.len() > ROUTE_TOPICS_MAX {
            return bad("topics", format!("{} patterns, more than the maximum of {ROUTE_TOPICS_MAX}", topics.len()));
        }
        let topics = topics
            .iter()
            .enumerate()
            .map(|(i, t)| StreamPattern::new(t).or_else(|e| bad(format!("topics[{i}]"), e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let window_min = Amount {
            events: self.window_min_events.unwrap_or(ROUTE_WINDOW_MIN_DEFAULT.events),
            bytes: self.window_min_bytes.unwrap_or(ROUTE_WINDOW_MIN_DEFAULT.bytes),
        };
        let window_max = Amount {
            events: self.window_max_events.unwrap_or(ROUTE_WINDOW_MAX_DEFAULT.events.max(window_min.events)),
            bytes: self.window_max_bytes.unwrap_or(ROUTE_WINDOW_MAX_DEFAULT.bytes.max(window_min.bytes)),
        };
        for (field, min, max, limit) in [
            ("window_events", window_min.events, window_max.events, ROUTE_WINDOW_MAX_LIMIT.events),
            ("window_bytes", window_min.bytes, window_max.bytes, ROUTE_WINDOW_MAX_LIMIT.bytes),
        ] {
            if min == 0 {
                return bad(format!("{field} (min)"), "the window must be at least 1");
            }
            if min > max {
                return bad(field, format!("minimum {min} is above maximum {max}"));
            }
            if max > limit {
                return bad(format!("{field} (max)"), format!("{max} is more than the limit of {limit}"));
            }
        }
        let lane_defs = if self.lanes.is_empty() {
            vec![LaneDef { name: "default".into(), reserved_permille: 0, cap_events: None, cap_bytes: None }]
        } else {
            self.lanes.clone()
        };
        if lane_defs.len() > LANES_MAX {
            return bad("lanes", format!("{} lanes, more than the maximum of {LANES_MAX}", lane_defs.len()));
        }
        let mut lanes: Vec<Lane> = Vec::new();
        let mut reserved = 0u32;
        for (i, lane) in lane_defs.iter().enumerate() {
            let name = route_name(&format!("lanes[{i}].name"), &lane.name)?;
            if lanes.iter().any(|l| l.name == name) {
                return bad(format!("lanes[{i}].name"), format!("lane {name} is declared twice"));
            }
            if lane.reserved_permille > 1000 {
                return bad(
                    format!("lanes[{i}].reserved_permille"),
                    format!("{} is more than 1000", lane.reserved_permille),
                );
            }
            reserved += lane.reserved_permille;
            let cap = Amount {
                events: lane.cap_events.unwrap_or(window_max.events),
                bytes: lane.cap_bytes.unwrap_or(window_max.bytes),
            };
            if cap.events == 0 || cap.bytes == 0 {
                return bad(format!("lanes[{i}].cap"), "a lane cap must be at least 1");
            }
            lanes.push(Lane { name, reserved_permille: lane.reserved_permille, cap });
        }
        if reserved > 1000 {
            return bad("lanes", format!("reservations add up to {reserved} per mille, more than 1000"));
        }
        Ok(Route {
            name,
            remote_site,
            addresses: self.addresses.clone(),
            topics,
            lanes,
            window_min,
            window_max,
            def: self.clone(),
        })
    }
}

/// A validated policy rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Streams it applies to.
    pub pattern: StreamPattern,
    /// What it does.
    pub action: Action,
    /// Its lane, if not the default.
    pub lane: Option<String>,
    /// Where it goes; empty: every route.
    pub destinations: Vec<SiteName>,
    /// Its pattern as the label its counts carry (shared, not copied per event).
    pub topic: std::sync::Arc<str>,
    /// As declared.
    pub def: PolicyDef,
}

impl PolicyDef {
    /// Validates the definition.
    pub fn validate(&self) -> Result<Policy, DefError> {
        let pattern = StreamPattern::new(&self.pattern).or_else(|e| bad("pattern", e.to_string()))?;
        let action = Action::parse(&self.action).or_else(|e| bad("action", e))?;
        let lane = match &self.lane {
            Some(lane) => Some(route_name("lane", lane)?),
            None => None,
        };
        let destinations = self
            .destinations
            .iter()
            .enumerate()
            .map(|(i, d)| SiteName::new(d).or_else(|e| bad(format!("destinations[{i}]"), e.reason)))
            .collect::<Result<Vec<_>, _>>()?;
        let topic = std::sync::Arc::from(pattern.as_str());
        Ok(Policy { pattern, action, lane, destinations, topic, def: self.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eu() -> SiteName {
        SiteName::new("eu").unwrap()
    }

    fn route(json: &str) -> Result<Route, DefError> {
        serde_json::from_str::<RouteDef>(json).unwrap().validate(&eu())
    }

    #[test]
    fn actions_parse_and_refuse_with_the_reason() {
        assert_eq!(Action::parse("replicate"), Ok(Action::Replicate));
        assert_eq!(Action::parse("sample 1/10"), Ok(Action::SampleEvery(10)));
        assert_eq!(Action::parse("sample per 500ms"), Ok(Action::SamplePer(500)));
        assert_eq!(Action::parse("sample per 2s"), Ok(Action::SamplePer(2000)));
        assert_eq!(Action::parse("compact"), Ok(Action::Compact(None)));
        assert_eq!(Action::parse("compact data.device"), Ok(Action::Compact(Some("device".into()))));
        assert_eq!(Action::parse("local-only"), Ok(Action::LocalOnly));
        assert!(Action::parse("sample 1/0").unwrap_err().contains("at least 1"));
        assert!(Action::parse("sample 10").unwrap_err().contains("1/N"));
        assert!(Action::parse("sample per soon").unwrap_err().contains("duration"));
        assert!(Action::parse("compact device").unwrap_err().contains("data.FIELD"));
        assert!(Action::parse("mirror").unwrap_err().contains("unknown action"));
    }

    #[test]
    fn routes_default_and_refuse_with_the_field() {
        let r = route(r#"{"remote_site":"us","addresses":["127.0.0.1:7300"]}"#).unwrap();
        assert_eq!(r.name, "us");
        assert_eq!(r.lanes.len(), 1);
        assert_eq!(r.lanes[0].name, "default");
        assert!(r.carries(&StreamName::new("a.b").unwrap()));
        let e = route(r#"{"remote_site":"eu","addresses":["127.0.0.1:7300"]}"#).unwrap_err();
        assert_eq!(e.field, "remote_site");
        let e = route(r#"{"remote_site":"us","addresses":[]}"#).unwrap_err();
        assert_eq!(e.field, "addresses");
        let e = route(r#"{"remote_site":"us","addresses":["nowhere"]}"#).unwrap_err();
        assert_eq!(e.field, "addresses[0]");
        let e = route(
            r#"{"remote_site":"us","addresses":["h:1"],"lanes":[{"name":"a","reserved_permille":700},{"name":"b","reserved_permille":400}]}"#,
        )
        .unwrap_err();
        assert!(e.problem.contains("1100"), "{e}");
        let e = route(r#"{"remote_site":"us","addresses":["h:1"],"lanes":[{"name":"a"},{"name":"a"}]}"#).unwrap_err();
        assert_eq!(e.field, "lanes[1].name");
        let e = route(r#"{"remote_site":"us","addresses":["h:1"],"window_min_events":10,"window_max_events":5}"#)
            .unwrap_err();
        assert!(e.problem.contains("above maximum"), "{e}");
        let e = route(r#"{"remote_site":"us","addresses":["h:1"],"topics":["a..b"]}"#).unwrap_err();
        assert_eq!(e.field, "topics[0]");
    }

    #[test]
    fn policies_validate() {
        let p = PolicyDef {
            pattern: "telemetry.>".into(),
            action: "sample 1/10".into(),
            lane: Some("bulk".into()),
            destinations: vec!["us".into()],
        };
        let v = p.validate().unwrap();
        assert_eq!(v.action, Action::SampleEvery(10));
        let mut bad_dest = p.clone();
        bad_dest.destinations = vec!["US".into()];
        assert_eq!(bad_dest.validate().unwrap_err().field, "destinations[0]");
        let mut bad_pattern = p;
        bad_pattern.pattern = "a.>.b".into();
        assert_eq!(bad_pattern.validate().unwrap_err().field, "pattern");
    }
}
