//! What a consumer group is: its name, filter, settings and start, as
//! requested (over gRPC or HTTP, [`GroupRequest`]), validated
//! ([`GroupDef`]), and as recorded in the log (JSON in the data of the
//! `$groups` stream's events, and of its checkpoints).

use edgebus_proto::v1;
use edgebus_types::limits::{
    GROUP_CHECKPOINT_AFTER_DEFAULT, GROUP_CHECKPOINT_AFTER_MAX, GROUP_CHECKPOINT_INTERVAL_MS_DEFAULT,
    GROUP_CHECKPOINT_INTERVAL_MS_MAX, GROUP_MAX_IN_FLIGHT_DEFAULT, GROUP_MAX_IN_FLIGHT_MAX, GROUP_MAX_RETRIES_DEFAULT,
    GROUP_MAX_RETRIES_MAX, GROUP_MESSAGE_TIMEOUT_MS_DEFAULT, GROUP_MESSAGE_TIMEOUT_MS_MAX, GROUP_NAME_BYTES_MAX,
};
use edgebus_types::{EventType, StreamName, StreamPattern};
use serde::{Deserialize, Serialize};

use crate::filter::{EventFilter, Predicate, StreamSelector};

/// The stream that records every group's creation, updates and deletion.
pub const GROUPS_STREAM: &str = "$groups";
/// Event type: a group was created (data: a [`GroupRecord`]).
pub const TYPE_CREATED: &str = "$group-created";
/// Event type: a group's filter or settings changed (data: a [`GroupRecord`]).
pub const TYPE_UPDATED: &str = "$group-updated";
/// Event type: a group was deleted (data: `{"name": ...}`).
pub const TYPE_DELETED: &str = "$group-deleted";
/// Event type of a group's checkpoints (data: a [`CheckpointRecord`]).
pub const TYPE_CHECKPOINT: &str = "$group-checkpoint";

/// The stream of a group's checkpoints.
pub fn checkpoint_stream(name: &str) -> StreamName {
    StreamName::system(&format!("{GROUPS_STREAM}.{name}.checkpoint")).expect("group names make valid stream names")
}

/// The stream of a group's parked events.
pub fn parked_stream(name: &str) -> StreamName {
    StreamName::system(&format!("{GROUPS_STREAM}.{name}.parked")).expect("group names make valid stream names")
}

/// A refused group request: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct DefError {
    /// The offending field, such as `settings.max_in_flight`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
    /// Whether it is a name or pattern (`INVALID_NAME`), a filter
    /// (`INVALID_FILTER`) or another argument.
    pub kind: DefErrorKind,
}

/// The class of a [`DefError`], for its stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefErrorKind {
    /// `INVALID_ARGUMENT`.
    Argument,
    /// `INVALID_NAME`.
    Name,
    /// `INVALID_FILTER`.
    Filter,
}

impl DefError {
    fn new(field: &str, kind: DefErrorKind, problem: impl Into<String>) -> Self {
        Self { field: field.to_owned(), problem: problem.into(), kind }
    }

    /// The error detail of this refusal.
    pub fn detail(&self) -> v1::ErrorDetail {
        let code = match self.kind {
            DefErrorKind::Argument => v1::ErrorCode::InvalidArgument,
            DefErrorKind::Name => v1::ErrorCode::InvalidName,
            DefErrorKind::Filter => v1::ErrorCode::InvalidFilter,
        };
        v1::ErrorDetail {
            code: code as u32,
            message: self.to_string(),
            field: self.field.clone(),
            ..v1::ErrorDetail::default()
        }
    }
}

/// Checks a group name: one token of letters, digits, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), DefError> {
    let bad = |problem: String| DefError::new("name", DefErrorKind::Name, problem);
    if name.is_empty() {
        return Err(bad("a group needs a name".to_owned()));
    }
    if name.len() > GROUP_NAME_BYTES_MAX {
        return Err(bad(format!("group name is {} bytes; the most is {GROUP_NAME_BYTES_MAX}", name.len())));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(bad(format!("group name {name:?} has {c:?}; use letters, digits, '-' and '_'")));
    }
    Ok(())
}

/// How a group spreads events over its consumers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each event to the next consumer with room.
    #[default]
    RoundRobin,
    /// Each stream pinned to one consumer, one event in flight per stream.
    ByStream,
}

impl Strategy {
    /// The wire value.
    pub fn to_wire(self) -> v1::GroupStrategy {
        match self {
            Self::RoundRobin => v1::GroupStrategy::RoundRobin,
            Self::ByStream => v1::GroupStrategy::ByStream,
        }
    }

    /// The name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::ByStream => "by_stream",
        }
    }
}

/// Which events a group delivers, as recorded (names as text; the
/// predicate's source).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterDef {
    /// Exactly this stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Streams matching this pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_pattern: Option<String>,
    /// Only these event types; empty: every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// A CEL predicate over the JSON payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicate: Option<String>,
}

impl FilterDef {
    /// Compiles the filter (the predicate included): slow, run it on the
    /// blocking pool.
    pub fn compile(&self) -> Result<EventFilter, DefError> {
        let stream = match (&self.stream, &self.stream_pattern) {
            (Some(_), Some(_)) => {
                return Err(DefError::new(
                    "filter.stream",
                    DefErrorKind::Filter,
                    "give a stream or a stream pattern, not both",
                ));
            }
            (Some(name), None) => StreamSelector::Exact(
                StreamName::new(name).map_err(|e| DefError::new("filter.stream", DefErrorKind::Name, e.to_string()))?,
            ),
            (None, Some(pattern)) => StreamSelector::Pattern(
                StreamPattern::new(pattern)
                    .map_err(|e| DefError::new("filter.stream_pattern", DefErrorKind::Name, e.to_string()))?,
            ),
            (None, None) => StreamSelector::Any,
        };
        let mut event_types = Vec::with_capacity(self.event_types.len());
        for (i, text) in self.event_types.iter().enumerate() {
            event_types.push(
                EventType::new(text).map_err(|e| {
                    DefError::new(&format!("filter.event_types[{i}]"), DefErrorKind::Name, e.to_string())
                })?,
            );
        }
        let predicate = match self.predicate.as_deref() {
            None => None,
            Some(source) => Some(
                Predicate::compile(source)
                    .map_err(|e| DefError::new("filter.predicate", DefErrorKind::Filter, e.to_string()))?,
            ),
        };
        EventFilter::new(stream, event_types, predicate, false)
            .map_err(|e| DefError::new("filter.event_types", DefErrorKind::Filter, e.to_string()))
    }

    /// From the wire (`None`: no filter, every stream).
    pub fn from_wire(filter: Option<v1::GroupFilter>) -> Self {
        let Some(filter) = filter else { return Self::default() };
        let (stream, stream_pattern) = match filter.streams {
            Some(v1::group_filter::Streams::Stream(name)) => (Some(name), None),
            Some(v1::group_filter::Streams::StreamPattern(pattern)) => (None, Some(pattern)),
            None => (None, None),
        };
        let predicate = (!filter.predicate.trim().is_empty()).then_some(filter.predicate);
        Self { stream, stream_pattern, event_types: filter.event_types, predicate }
    }

    /// To the wire.
    pub fn to_wire(&self) -> v1::GroupFilter {
        let streams = match (&self.stream, &self.stream_pattern) {
            (Some(name), _) => Some(v1::group_filter::Streams::Stream(name.clone())),
            (None, Some(pattern)) => Some(v1::group_filter::Streams::StreamPattern(pattern.clone())),
            (None, None) => None,
        };
        v1::GroupFilter {
            streams,
            event_types: self.event_types.clone(),
            predicate: self.predicate.clone().unwrap_or_default(),
        }
    }
}

/// A group's settings, every one set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The group's demand window.
    pub max_in_flight: u32,
    /// How long a consumer may hold an event.
    pub message_timeout_ms: u64,
    /// Retries before parking.
    pub max_retries: u32,
    /// How events are spread.
    pub strategy: Strategy,
    /// Settled events between checkpoints.
    pub checkpoint_after: u32,
    /// Longest wait for a checkpoint.
    pub checkpoint_interval_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_in_flight: GROUP_MAX_IN_FLIGHT_DEFAULT,
            message_timeout_ms: GROUP_MESSAGE_TIMEOUT_MS_DEFAULT,
            max_retries: GROUP_MAX_RETRIES_DEFAULT,
            strategy: Strategy::RoundRobin,
            checkpoint_after: GROUP_CHECKPOINT_AFTER_DEFAULT,
            checkpoint_interval_ms: GROUP_CHECKPOINT_INTERVAL_MS_DEFAULT,
        }
    }
}

impl Settings {
    /// To the wire, every field set.
    pub fn to_wire(self) -> v1::GroupSettings {
        v1::GroupSettings {
            max_in_flight: Some(self.max_in_flight),
            message_timeout_ms: Some(self.message_timeout_ms),
            max_retries: Some(self.max_retries),
            strategy: self.strategy.to_wire() as i32,
            checkpoint_after: Some(self.checkpoint_after),
            checkpoint_interval_ms: Some(self.checkpoint_interval_ms),
        }
    }
}

/// Settings as requested: each may be absent (default on create, unchanged
/// on update). Signed, so that a negative number over HTTP is named as
/// such rather than as a parse failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsRequest {
    /// See [`Settings::max_in_flight`].
    pub max_in_flight: Option<i64>,
    /// See [`Settings::message_timeout_ms`].
    pub message_timeout_ms: Option<i64>,
    /// See [`Settings::max_retries`].
    pub max_retries: Option<i64>,
    /// See [`Settings::strategy`].
    pub strategy: Option<Strategy>,
    /// See [`Settings::checkpoint_after`].
    pub checkpoint_after: Option<i64>,
    /// See [`Settings::checkpoint_interval_ms`].
    pub checkpoint_interval_ms: Option<i64>,
}

fn in_range(field: &str, value: i64, min: i64, max: i64, unit: &str) -> Result<i64, DefError> {
    if value < min || value > max {
        let what = if value < 0 {
            "must not be negative"
        } else if value == 0 {
            "must not be zero"
        } else {
            "is too large"
        };
        return Err(DefError::new(
            &format!("settings.{field}"),
            DefErrorKind::Argument,
            format!("{value}{unit} {what}: give {min} to {max}{unit}"),
        ));
    }
    Ok(value)
}

impl SettingsRequest {
    /// From the wire.
    pub fn from_wire(settings: Option<v1::GroupSettings>) -> Result<Self, DefError> {
        let Some(s) = settings else { return Ok(Self::default()) };
        let strategy = match v1::GroupStrategy::try_from(s.strategy) {
            Ok(v1::GroupStrategy::Unspecified) => None,
            Ok(v1::GroupStrategy::RoundRobin) => Some(Strategy::RoundRobin),
            Ok(v1::GroupStrategy::ByStream) => Some(Strategy::ByStream),
            Err(_) => {
                return Err(DefError::new(
                    "settings.strategy",
                    DefErrorKind::Argument,
                    format!("unknown strategy {}", s.strategy),
                ));
            }
        };
        let wide = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(Self {
            max_in_flight: s.max_in_flight.map(i64::from),
            message_timeout_ms: s.message_timeout_ms.map(wide),
            max_retries: s.max_retries.map(i64::from),
            strategy,
            checkpoint_after: s.checkpoint_after.map(i64::from),
            checkpoint_interval_ms: s.checkpoint_interval_ms.map(wide),
        })
    }

    /// `base` with the fields set here applied, each checked.
    pub fn apply(&self, base: Settings) -> Result<Settings, DefError> {
        let mut out = base;
        if let Some(v) = self.max_in_flight {
            out.max_in_flight = in_range("max_in_flight", v, 1, i64::from(GROUP_MAX_IN_FLIGHT_MAX), "")? as u32;
        }
        if let Some(v) = self.message_timeout_ms {
            out.message_timeout_ms =
                in_range("message_timeout_ms", v, 1, GROUP_MESSAGE_TIMEOUT_MS_MAX as i64, " ms")? as u64;
        }
        if let Some(v) = self.max_retries {
            out.max_retries = in_range("max_retries", v, 0, i64::from(GROUP_MAX_RETRIES_MAX), "")? as u32;
        }
        if let Some(strategy) = self.strategy {
            out.strategy = strategy;
        }
        if let Some(v) = self.checkpoint_after {
            out.checkpoint_after =
                in_range("checkpoint_after", v, 1, i64::from(GROUP_CHECKPOINT_AFTER_MAX), "")? as u32;
        }
        if let Some(v) = self.checkpoint_interval_ms {
            out.checkpoint_interval_ms =
                in_range("checkpoint_interval_ms", v, 1, GROUP_CHECKPOINT_INTERVAL_MS_MAX as i64, " ms")? as u64;
        }
        Ok(out)
    }
}

/// Where a new group starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StartRequest {
    /// The log's first event.
    Beginning,
    /// The log's end when the group is created.
    End,
    /// This position.
    Position(u64),
}

impl StartRequest {
    /// From the wire; required.
    pub fn from_wire(start: Option<v1::create_group_request::StartAt>) -> Result<Self, DefError> {
        match start {
            Some(v1::create_group_request::StartAt::Beginning(_)) => Ok(Self::Beginning),
            Some(v1::create_group_request::StartAt::End(_)) => Ok(Self::End),
            Some(v1::create_group_request::StartAt::Position(p)) => Ok(Self::Position(p)),
            None => Err(DefError::new(
                "start",
                DefErrorKind::Argument,
                "a group needs a start: beginning, end or a position",
            )),
        }
    }
}

/// A create or update request, from either transport.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    /// The group's name (HTTP create: in the body; update: in the path).
    #[serde(default)]
    pub name: String,
    /// The filter (update: replaces the old one when set).
    #[serde(default)]
    pub filter: Option<FilterDef>,
    /// The settings asked for.
    #[serde(default)]
    pub settings: SettingsRequest,
    /// Where it starts (create only).
    #[serde(default)]
    pub start: Option<StartRequest>,
}

/// A validated group: what `$group-created` and `$group-updated` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The name.
    pub name: String,
    /// The filter.
    pub filter: FilterDef,
    /// The settings.
    pub settings: Settings,
    /// The first log position the group considers.
    pub start_position: u64,
    /// The parked stream's event count when this incarnation was created:
    /// its own parked events come after.
    pub parked_base: u64,
}

/// A group's durable progress: what `$group-checkpoint` records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The position of the `$group-created` event of the incarnation this
    /// checkpoint belongs to (a deleted and re-created group starts over).
    pub generation: u64,
    /// Every matching event below this position is settled.
    pub position: u64,
    /// Ranges `[start, end)` of positions at or above `position` that are
    /// settled too (acked out of order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled: Vec<(u64, u64)>,
    /// The parked stream's version from which a replay goes on.
    #[serde(default)]
    pub replay_next: u64,
    /// The end (exclusive) of the replay asked for; no replay when equal to
    /// `replay_next`.
    #[serde(default)]
    pub replay_end: u64,
    /// Parked versions at or above `replay_next` already settled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replay_settled: Vec<(u64, u64)>,
}

/// What a parked event's metadata says about it (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedRecord {
    /// The incarnation that parked it.
    pub generation: u64,
    /// Why.
    pub reason: String,
    /// Deliveries it had.
    pub attempts: u32,
    /// The consumer that held it last.
    #[serde(default)]
    pub consumer: String,
    /// When it was parked.
    pub parked_at_ms: u64,
    /// The original event: stream, version, position, id (hex), timestamp
    /// and metadata (hex); its type and data are the parked event's own.
    pub stream: String,
    /// Its version.
    pub version: u64,
    /// Its log position.
    pub position: u64,
    /// Its id, 32 hex digits.
    pub id: String,
    /// Its timestamp.
    pub timestamp_ms: u64,
    /// Its metadata, hex.
    #[serde(default)]
    pub metadata_hex: String,
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Bytes of lowercase or uppercase `hex`; `None` if it is not hex.
pub fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// Sorted, disjoint ranges `[start, end)` covering `values` (sorted).
pub fn to_ranges(values: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for v in values {
        match out.last_mut() {
            Some((_, end)) if *end == v => *end += 1,
            _ => out.push((v, v + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_token() {
        assert!(check_name("orders-proc_1").is_ok());
        for bad in ["", "a.b", "a b", "$x", "é"] {
            let e = check_name(bad).expect_err(bad);
            assert_eq!(e.field, "name");
            assert_eq!(e.kind, DefErrorKind::Name);
        }
        assert!(check_name(&"x".repeat(GROUP_NAME_BYTES_MAX + 1)).expect_err("long").problem.contains("65 bytes"));
    }

    #[test]
    fn settings_are_checked_and_named() {
        let zero = SettingsRequest { max_in_flight: Some(0), ..SettingsRequest::default() };
        let e = zero.apply(Settings::default()).expect_err("zero window");
        assert_eq!(e.to_string(), "settings.max_in_flight: 0 must not be zero: give 1 to 10000");
        let negative = SettingsRequest { message_timeout_ms: Some(-5), ..SettingsRequest::default() };
        let e = negative.apply(Settings::default()).expect_err("negative timeout");
        assert_eq!(e.to_string(), "settings.message_timeout_ms: -5 ms must not be negative: give 1 to 3600000 ms");
        let ok =
            SettingsRequest { max_retries: Some(0), strategy: Some(Strategy::ByStream), ..SettingsRequest::default() };
        let s = ok.apply(Settings::default()).expect("valid");
        assert_eq!((s.max_retries, s.strategy, s.max_in_flight), (0, Strategy::ByStream, GROUP_MAX_IN_FLIGHT_DEFAULT));
    }

    #[test]
    fn filters_compile_or_say_why() {
        let both = FilterDef { stream: Some("a".into()), stream_pattern: Some("b.>".into()), ..FilterDef::default() };
        assert_eq!(both.compile().expect_err("both").field, "filter.stream");
        let bad_cel = FilterDef { predicate: Some("data.x >".into()), ..FilterDef::default() };
        let e = bad_cel.compile().expect_err("bad predicate");
        assert_eq!((e.field.as_str(), e.kind), ("filter.predicate", DefErrorKind::Filter));
        let bad_pattern = FilterDef { stream_pattern: Some("a.>.b".into()), ..FilterDef::default() };
        assert_eq!(bad_pattern.compile().expect_err("pattern").kind, DefErrorKind::Name);
        let good = FilterDef {
            stream_pattern: Some("orders.*".into()),
            event_types: vec!["placed".into()],
            predicate: Some("data.total > 10".into()),
            ..FilterDef::default()
        };
        good.compile().expect("compiles");
        assert_eq!(FilterDef::from_wire(Some(good.to_wire())), good);
    }

    #[test]
    fn ranges_and_hex_round_trip() {
        assert_eq!(to_ranges([3, 4, 5, 9, 11, 12]), vec![(3, 6), (9, 10), (11, 13)]);
        assert!(to_ranges([]).is_empty());
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])), Some(vec![0, 1, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn records_are_json() {
        let record = CheckpointRecord { generation: 7, position: 10, settled: vec![(12, 14)], ..Default::default() };
        let text = serde_json::to_string(&record).expect("serializes");
        assert_eq!(text, r#"{"generation":7,"position":10,"settled":[[12,14]],"replay_next":0,"replay_end":0}"#);
        assert_eq!(serde_json::from_str::<CheckpointRecord>(&text).expect("parses"), record);
    }
}
