//! Conversions between the `edgebus.v1` wire messages and the edgebus types
//! (`edgebus-types`, `edgebus-store`), both ways.
//!
//! Wire to Rust is fallible: every string and byte field is validated, and a
//! failure is a [`ConvertError`] that names the offending field by its path
//! in the request (`events[2].type`), so the caller learns exactly what to
//! fix. Rust to wire never fails.
//!
//! Each request has an `*Args` struct holding exactly the validated
//! arguments of the matching store call, so that a handler reads
//! `let args = ReadStreamArgs::try_from(request)?` and calls the store with
//! its fields. Subscriptions have no store call; their validated messages are
//! [`ClientMessage`] and [`ServerMessage`].
//!
//! The error side (store errors to `tonic::Status` with an
//! [`v1::ErrorDetail`] and back) lives in the `status` submodule and is
//! re-exported here.

mod site;
mod status;

pub use site::{ReadLogArgs, SiteAppendArgs, replica_writes};

pub use status::{
    BUSY_RETRY_AFTER_MS, RETRY_PUSHBACK_HEADER, error_detail_from_read_error, error_detail_from_status,
    error_detail_from_write_error, grpc_code, status_from_error_detail, status_from_read_error,
    status_from_write_error, wire_error_code,
};

use std::fmt;

use edgebus_store::{
    AllFilter, AllSlice, AppendResult, Direction, ExistsOrWrite, READ_COUNT_MAX, Snapshot, SnapshotInfo, StreamFrom,
    StreamInfo, StreamMetadata,
};
use edgebus_types::{
    EventId, EventType, EventTypeError, ExpectedVersion, NameError, NewEvent, Origin, PatternError, RecordedEvent,
    SiteName, SiteNameError, StreamName, StreamPattern,
};

use crate::v1;

// The filter limits live with every other limit in `edgebus-types`; they are
// re-exported here because the wire checks them first.
pub use edgebus_types::limits::{FILTER_EVENT_TYPES_MAX, FILTER_PREDICATE_BYTES_MAX};

/// A wire message that does not convert: which field, and what is wrong.
///
/// Displays as `field: problem`, e.g.
/// `events[2].type: event type "a b" has invalid character ' ' at byte 1 (…)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError {
    field: String,
    problem: Problem,
}

impl ConvertError {
    /// An error in `field` (a path such as `events[2].type`).
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        Self { field: field.into(), problem }
    }

    /// The path of the offending field in the message, e.g. `events[2].type`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// The stable code for this error: `INVALID_NAME` for names, patterns
    /// and event types, `INVALID_FILTER` for filter limits, and
    /// `INVALID_ARGUMENT` for everything else.
    pub fn code(&self) -> v1::ErrorCode {
        match self.problem {
            Problem::StreamName(_) | Problem::StreamPattern(_) | Problem::EventType(_) => v1::ErrorCode::InvalidName,
            Problem::PredicateTooLong { .. } | Problem::TooManyEventTypes { .. } => v1::ErrorCode::InvalidFilter,
            _ => v1::ErrorCode::InvalidArgument,
        }
    }

    /// The same error seen from the enclosing message: `type` inside
    /// `events[2]` becomes `events[2].type`.
    fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() { parent.to_owned() } else { format!("{parent}.{}", self.field) };
        self
    }
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConvertError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            Problem::StreamName(e) => Some(e),
            Problem::StreamPattern(e) => Some(e),
            Problem::EventType(e) => Some(e),
            _ => None,
        }
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// A required field (a message or a oneof) is absent.
    #[error("required field is missing")]
    Missing,
    /// An invalid stream name.
    #[error(transparent)]
    StreamName(#[from] NameError),
    /// An invalid stream pattern.
    #[error(transparent)]
    StreamPattern(#[from] PatternError),
    /// An invalid event type.
    #[error(transparent)]
    EventType(#[from] EventTypeError),
    /// An invalid site name.
    #[error(transparent)]
    SiteName(#[from] SiteNameError),
    /// An event id that is not 16 bytes.
    #[error("event id is {len_bytes} bytes, expected 16")]
    EventIdLength {
        /// Length of the rejected id.
        len_bytes: usize,
    },
    /// An enum number this version does not know.
    #[error("unknown {enum_name} value {value}")]
    UnknownEnumValue {
        /// The protobuf enum.
        enum_name: &'static str,
        /// The number received.
        value: i32,
    },
    /// A predicate longer than [`FILTER_PREDICATE_BYTES_MAX`].
    #[error("predicate is {len_bytes} bytes, more than the maximum of {max_bytes}")]
    PredicateTooLong {
        /// Length of the rejected predicate.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// A filter listing more than [`FILTER_EVENT_TYPES_MAX`] event types.
    #[error("{count} event types, more than the maximum of {max}")]
    TooManyEventTypes {
        /// Event types listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A subscription starting at a stream version without naming one stream.
    #[error("a stream version start needs a single `stream`, not a pattern or every stream")]
    StreamVersionNeedsStream,
}

// ---- leaf values -----------------------------------------------------------

/// A stream that clients may write: never a `$` system stream.
fn client_stream(field: &str, name: &str) -> Result<StreamName, ConvertError> {
    StreamName::new(name).map_err(|e| ConvertError::new(field, e.into()))
}

/// A stream that may be read or named in an answer: system streams included.
fn any_stream(field: &str, name: &str) -> Result<StreamName, ConvertError> {
    StreamName::system(name).map_err(|e| ConvertError::new(field, e.into()))
}

fn pattern(field: &str, pattern: &str) -> Result<StreamPattern, ConvertError> {
    StreamPattern::new(pattern).map_err(|e| ConvertError::new(field, e.into()))
}

fn event_type(field: &str, event_type: &str) -> Result<EventType, ConvertError> {
    EventType::new(event_type).map_err(|e| ConvertError::new(field, e.into()))
}

fn event_types(field: &str, event_types: &[String]) -> Result<Vec<EventType>, ConvertError> {
    if event_types.len() > FILTER_EVENT_TYPES_MAX {
        return Err(ConvertError::new(
            field,
            Problem::TooManyEventTypes { count: event_types.len(), max: FILTER_EVENT_TYPES_MAX },
        ));
    }
    event_types.iter().enumerate().map(|(i, t)| event_type(&format!("{field}[{i}]"), t)).collect()
}

/// An event id from its 16 wire bytes.
pub fn event_id(field: &str, bytes: &[u8]) -> Result<EventId, ConvertError> {
    let bytes: [u8; 16] =
        bytes.try_into().map_err(|_| ConvertError::new(field, Problem::EventIdLength { len_bytes: bytes.len() }))?;
    Ok(EventId::from_bytes(bytes))
}

fn required<T>(field: &str, value: Option<T>) -> Result<T, ConvertError> {
    value.ok_or_else(|| ConvertError::new(field, Problem::Missing))
}

fn direction(field: &str, value: i32) -> Result<Direction, ConvertError> {
    match v1::Direction::try_from(value) {
        Ok(v1::Direction::Forward) => Ok(Direction::Forward),
        Ok(v1::Direction::Backward) => Ok(Direction::Backward),
        Err(_) => Err(ConvertError::new(field, Problem::UnknownEnumValue { enum_name: "Direction", value })),
    }
}

fn wire_direction(direction: Direction) -> i32 {
    match direction {
        Direction::Forward => v1::Direction::Forward as i32,
        Direction::Backward => v1::Direction::Backward as i32,
    }
}

/// A wire count where 0 means "the node's maximum", capped at `max`.
fn count(value: u32, max: usize) -> usize {
    match usize::try_from(value) {
        Ok(0) => max,
        Ok(n) => n.min(max),
        Err(_) => max,
    }
}

fn wire_count(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

impl From<ExpectedVersion> for v1::ExpectedVersion {
    fn from(expected: ExpectedVersion) -> Self {
        use v1::expected_version::Kind;
        let kind = match expected {
            ExpectedVersion::Any => Kind::Any(v1::Empty {}),
            ExpectedVersion::NoStream => Kind::NoStream(v1::Empty {}),
            ExpectedVersion::StreamExists => Kind::StreamExists(v1::Empty {}),
            ExpectedVersion::Exact(version) => Kind::Exact(version),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<v1::ExpectedVersion> for ExpectedVersion {
    type Error = ConvertError;

    fn try_from(expected: v1::ExpectedVersion) -> Result<Self, ConvertError> {
        use v1::expected_version::Kind;
        Ok(match required("kind", expected.kind)? {
            Kind::Any(_) => Self::Any,
            Kind::NoStream(_) => Self::NoStream,
            Kind::StreamExists(_) => Self::StreamExists,
            Kind::Exact(version) => Self::Exact(version),
        })
    }
}

fn expected_version(field: &str, expected: Option<v1::ExpectedVersion>) -> Result<ExpectedVersion, ConvertError> {
    ExpectedVersion::try_from(required(field, expected)?).map_err(|e| e.within(field))
}

impl From<StreamFrom> for v1::StreamFrom {
    fn from(from: StreamFrom) -> Self {
        use v1::stream_from::Kind;
        let kind = match from {
            StreamFrom::Start => Kind::Start(v1::Empty {}),
            StreamFrom::End => Kind::End(v1::Empty {}),
            StreamFrom::Version(version) => Kind::Version(version),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<v1::StreamFrom> for StreamFrom {
    type Error = ConvertError;

    fn try_from(from: v1::StreamFrom) -> Result<Self, ConvertError> {
        use v1::stream_from::Kind;
        Ok(match required("kind", from.kind)? {
            Kind::Start(_) => Self::Start,
            Kind::End(_) => Self::End,
            Kind::Version(version) => Self::Version(version),
        })
    }
}

impl From<StreamMetadata> for v1::StreamMetadata {
    fn from(metadata: StreamMetadata) -> Self {
        let StreamMetadata { max_age_ms, max_count, truncate_before } = metadata;
        Self { max_age_ms, max_count, truncate_before }
    }
}

impl From<v1::StreamMetadata> for StreamMetadata {
    fn from(metadata: v1::StreamMetadata) -> Self {
        let v1::StreamMetadata { max_age_ms, max_count, truncate_before } = metadata;
        Self { max_age_ms, max_count, truncate_before }
    }
}

impl From<StreamInfo> for v1::StreamInfo {
    fn from(info: StreamInfo) -> Self {
        Self {
            stream: info.stream.as_str().to_owned(),
            current_version: info.current_version,
            first_visible_version: info.first_visible_version,
            deleted: info.deleted,
            tombstoned: info.tombstoned,
            metadata: Some(info.metadata.into()),
        }
    }
}

impl TryFrom<v1::StreamInfo> for StreamInfo {
    type Error = ConvertError;

    fn try_from(info: v1::StreamInfo) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: any_stream("stream", &info.stream)?,
            current_version: info.current_version,
            first_visible_version: info.first_visible_version,
            deleted: info.deleted,
            tombstoned: info.tombstoned,
            metadata: info.metadata.map(StreamMetadata::from).unwrap_or_default(),
        })
    }
}

// ---- events ----------------------------------------------------------------

/// The wire form of an event to write. The timestamp is not sent: the
/// accepting node stamps its own.
impl From<NewEvent> for v1::NewEvent {
    fn from(event: NewEvent) -> Self {
        Self {
            id: event.id.as_bytes().to_vec(),
            r#type: event.event_type.as_str().to_owned(),
            data: event.data,
            metadata: event.metadata,
        }
    }
}

/// Validates a wire event and stamps it with `timestamp_ms`, the accepting
/// node's clock. Sizes are not checked here: the store checks them against
/// its limits and answers `EVENT_TOO_LARGE`.
pub fn new_event(event: v1::NewEvent, timestamp_ms: u64) -> Result<NewEvent, ConvertError> {
    Ok(NewEvent {
        id: event_id("id", &event.id)?,
        event_type: event_type("type", &event.r#type)?,
        data: event.data,
        metadata: event.metadata,
        timestamp_ms,
    })
}

impl From<RecordedEvent> for v1::RecordedEvent {
    fn from(event: RecordedEvent) -> Self {
        Self {
            stream: event.stream.as_str().to_owned(),
            version: event.version,
            position: event.position,
            id: event.id.as_bytes().to_vec(),
            r#type: event.event_type.as_str().to_owned(),
            data: event.data,
            metadata: event.metadata,
            timestamp_ms: event.timestamp_ms,
            origin: event.origin.map(wire_origin),
        }
    }
}

fn wire_origin(origin: Origin) -> v1::Origin {
    v1::Origin {
        site: origin.site.to_string(),
        position: origin.position,
        via: origin.via.to_string(),
        note: origin.note,
    }
}

impl TryFrom<v1::RecordedEvent> for RecordedEvent {
    type Error = ConvertError;

    fn try_from(event: v1::RecordedEvent) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: any_stream("stream", &event.stream)?,
            version: event.version,
            position: event.position,
            id: event_id("id", &event.id)?,
            event_type: event_type("type", &event.r#type)?,
            data: event.data,
            metadata: event.metadata,
            timestamp_ms: event.timestamp_ms,
            origin: event.origin.map(origin).transpose()?,
        })
    }
}

fn origin(origin: v1::Origin) -> Result<Origin, ConvertError> {
    let site = |field: &str, name: &str| SiteName::new(name).map_err(|e| ConvertError::new(field, e.into()));
    Ok(Origin {
        site: site("origin.site", &origin.site)?,
        position: origin.position,
        via: site("origin.via", &origin.via)?,
        note: origin.note,
    })
}

fn recorded_events(field: &str, events: Vec<v1::RecordedEvent>) -> Result<Vec<RecordedEvent>, ConvertError> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| RecordedEvent::try_from(e).map_err(|err| err.within(&format!("{field}[{i}]"))))
        .collect()
}

fn wire_events(events: Vec<RecordedEvent>) -> Vec<v1::RecordedEvent> {
    events.into_iter().map(v1::RecordedEvent::from).collect()
}

// ---- write results ---------------------------------------------------------

impl From<AppendResult> for v1::AppendResponse {
    fn from(result: AppendResult) -> Self {
        let AppendResult { first_version, first_position, count, already_written } = result;
        Self { first_version, first_position, count, already_written }
    }
}

impl From<v1::AppendResponse> for AppendResult {
    fn from(response: v1::AppendResponse) -> Self {
        let v1::AppendResponse { first_version, first_position, count, already_written } = response;
        Self { first_version, first_position, count, already_written }
    }
}

impl From<ExistsOrWrite> for v1::ExistsOrWriteResponse {
    fn from(outcome: ExistsOrWrite) -> Self {
        use v1::exists_or_write_response::{Exists, Outcome, Written};
        let outcome = match outcome {
            ExistsOrWrite::Written { position } => Outcome::Written(Written { position }),
            ExistsOrWrite::Exists { position, same } => Outcome::Exists(Exists { position, same }),
        };
        Self { outcome: Some(outcome) }
    }
}

impl TryFrom<v1::ExistsOrWriteResponse> for ExistsOrWrite {
    type Error = ConvertError;

    fn try_from(response: v1::ExistsOrWriteResponse) -> Result<Self, ConvertError> {
        use v1::exists_or_write_response::Outcome;
        Ok(match required("outcome", response.outcome)? {
            Outcome::Written(written) => Self::Written { position: written.position },
            Outcome::Exists(exists) => Self::Exists { position: exists.position, same: exists.same },
        })
    }
}

// ---- read results ----------------------------------------------------------

impl From<Vec<RecordedEvent>> for v1::ReadStreamResponse {
    fn from(events: Vec<RecordedEvent>) -> Self {
        Self { events: wire_events(events) }
    }
}

/// The events of a stream read.
pub fn read_stream_events(response: v1::ReadStreamResponse) -> Result<Vec<RecordedEvent>, ConvertError> {
    recorded_events("events", response.events)
}

impl From<AllFilter> for v1::AllFilter {
    fn from(filter: AllFilter) -> Self {
        Self {
            stream_pattern: filter.stream.map(|p| p.as_str().to_owned()).unwrap_or_default(),
            event_types: filter.event_types.iter().map(|t| t.as_str().to_owned()).collect(),
            include_system: filter.include_system,
        }
    }
}

impl TryFrom<v1::AllFilter> for AllFilter {
    type Error = ConvertError;

    fn try_from(filter: v1::AllFilter) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: match filter.stream_pattern.as_str() {
                "" => None,
                text => Some(pattern("stream_pattern", text)?),
            },
            event_types: event_types("event_types", &filter.event_types)?,
            include_system: filter.include_system,
        })
    }
}

impl From<AllSlice> for v1::ReadAllResponse {
    fn from(slice: AllSlice) -> Self {
        Self { events: wire_events(slice.events), next_position: slice.next_position, end_of_log: slice.end_of_log }
    }
}

impl TryFrom<v1::ReadAllResponse> for AllSlice {
    type Error = ConvertError;

    fn try_from(response: v1::ReadAllResponse) -> Result<Self, ConvertError> {
        Ok(Self {
            events: recorded_events("events", response.events)?,
            next_position: response.next_position,
            end_of_log: response.end_of_log,
        })
    }
}

impl From<Snapshot> for v1::Snapshot {
    fn from(snapshot: Snapshot) -> Self {
        Self {
            source: snapshot.source,
            stream: snapshot.stream.as_str().to_owned(),
            version: snapshot.version,
            state: snapshot.state,
            position: snapshot.position,
            timestamp_ms: snapshot.timestamp_ms,
        }
    }
}

impl TryFrom<v1::Snapshot> for Snapshot {
    type Error = ConvertError;

    fn try_from(snapshot: v1::Snapshot) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: any_stream("stream", &snapshot.stream)?,
            source: snapshot.source,
            version: snapshot.version,
            state: snapshot.state,
            position: snapshot.position,
            timestamp_ms: snapshot.timestamp_ms,
        })
    }
}

impl From<SnapshotInfo> for v1::SnapshotInfo {
    fn from(info: SnapshotInfo) -> Self {
        let SnapshotInfo { source, stream, version, position } = info;
        Self { source, stream, version, position }
    }
}

impl From<v1::SnapshotInfo> for SnapshotInfo {
    fn from(info: v1::SnapshotInfo) -> Self {
        let v1::SnapshotInfo { source, stream, version, position } = info;
        Self { source, stream, version, position }
    }
}

// ---- requests --------------------------------------------------------------

/// The arguments of `Store::append`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendArgs {
    /// The stream (never a system stream).
    pub stream: StreamName,
    /// The expectation.
    pub expected: ExpectedVersion,
    /// The events, stamped by the accepting node.
    pub events: Vec<NewEvent>,
}

impl AppendArgs {
    /// Validates `request`, stamping every event with `timestamp_ms`.
    pub fn from_wire(request: v1::AppendRequest, timestamp_ms: u64) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: client_stream("stream", &request.stream)?,
            expected: expected_version("expected_version", request.expected_version)?,
            events: new_events(request.events, timestamp_ms)?,
        })
    }
}

/// Every event of a request, validated and stamped; an error names its index.
fn new_events(events: Vec<v1::NewEvent>, timestamp_ms: u64) -> Result<Vec<NewEvent>, ConvertError> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| new_event(e, timestamp_ms).map_err(|err| err.within(&format!("events[{i}]"))))
        .collect()
}

impl From<AppendArgs> for v1::AppendRequest {
    fn from(args: AppendArgs) -> Self {
        Self {
            stream: args.stream.as_str().to_owned(),
            expected_version: Some(args.expected.into()),
            events: args.events.into_iter().map(v1::NewEvent::from).collect(),
        }
    }
}

/// The arguments of `Store::exists_or_write`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistsOrWriteArgs {
    /// The stream (never a system stream).
    pub stream: StreamName,
    /// The version to write at.
    pub index: u64,
    /// The event, stamped with the origin's time if the request carried one,
    /// else with the accepting node's.
    pub event: NewEvent,
}

impl ExistsOrWriteArgs {
    /// Validates `request`; the event keeps `origin_timestamp_ms` when the
    /// request has one, and is stamped with `timestamp_ms` otherwise.
    pub fn from_wire(request: v1::ExistsOrWriteRequest, timestamp_ms: u64) -> Result<Self, ConvertError> {
        let stamp = request.origin_timestamp_ms.unwrap_or(timestamp_ms);
        Ok(Self {
            stream: client_stream("stream", &request.stream)?,
            index: request.index,
            event: new_event(required("event", request.event)?, stamp).map_err(|e| e.within("event"))?,
        })
    }
}

/// Carries the event's timestamp as the origin's: used by gateways, which
/// replicate events with the time their home site stamped.
impl From<ExistsOrWriteArgs> for v1::ExistsOrWriteRequest {
    fn from(args: ExistsOrWriteArgs) -> Self {
        Self {
            stream: args.stream.as_str().to_owned(),
            index: args.index,
            origin_timestamp_ms: Some(args.event.timestamp_ms),
            event: Some(args.event.into()),
        }
    }
}

/// The arguments of `Store::read_stream` (the reader's clock comes from the
/// node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadStreamArgs {
    /// The stream (system streams allowed; permissions are the node's call).
    pub stream: StreamName,
    /// Where to start.
    pub from: StreamFrom,
    /// Which way.
    pub direction: Direction,
    /// At most this many events, 1 to [`READ_COUNT_MAX`].
    pub max_count: usize,
}

impl TryFrom<v1::ReadStreamRequest> for ReadStreamArgs {
    type Error = ConvertError;

    fn try_from(request: v1::ReadStreamRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: any_stream("stream", &request.stream)?,
            from: StreamFrom::try_from(required("from", request.from)?).map_err(|e| e.within("from"))?,
            direction: direction("direction", request.direction)?,
            max_count: count(request.max_count, READ_COUNT_MAX),
        })
    }
}

impl From<ReadStreamArgs> for v1::ReadStreamRequest {
    fn from(args: ReadStreamArgs) -> Self {
        Self {
            stream: args.stream.as_str().to_owned(),
            from: Some(args.from.into()),
            direction: wire_direction(args.direction),
            max_count: wire_count(args.max_count),
        }
    }
}

/// The arguments of `Store::read_all`.
#[derive(Debug, Clone)]
pub struct ReadAllArgs {
    /// The first position to scan: `AllFrom.start` is 0 and `AllFrom.end`
    /// is `u64::MAX` (past any end, which reads backward from the newest).
    pub from: u64,
    /// Which way.
    pub direction: Direction,
    /// At most this many events, 1 to [`READ_COUNT_MAX`].
    pub max_count: usize,
    /// Which events pass.
    pub filter: AllFilter,
}

impl TryFrom<v1::ReadAllRequest> for ReadAllArgs {
    type Error = ConvertError;

    fn try_from(request: v1::ReadAllRequest) -> Result<Self, ConvertError> {
        use v1::all_from::Kind;
        let from = match required("from", request.from)?.kind {
            Some(Kind::Start(_)) => 0,
            Some(Kind::End(_)) => u64::MAX,
            Some(Kind::Position(position)) => position,
            None => return Err(ConvertError::new("from.kind", Problem::Missing)),
        };
        Ok(Self {
            from,
            direction: direction("direction", request.direction)?,
            max_count: count(request.max_count, READ_COUNT_MAX),
            filter: match request.filter {
                Some(filter) => AllFilter::try_from(filter).map_err(|e| e.within("filter"))?,
                None => AllFilter::default(),
            },
        })
    }
}

impl From<ReadAllArgs> for v1::ReadAllRequest {
    fn from(args: ReadAllArgs) -> Self {
        Self {
            from: Some(v1::AllFrom { kind: Some(v1::all_from::Kind::Position(args.from)) }),
            direction: wire_direction(args.direction),
            max_count: wire_count(args.max_count),
            filter: Some(args.filter.into()),
        }
    }
}

/// The argument of `Store::stream_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfoArgs {
    /// The stream (system streams allowed).
    pub stream: StreamName,
}

impl TryFrom<v1::StreamInfoRequest> for StreamInfoArgs {
    type Error = ConvertError;

    fn try_from(request: v1::StreamInfoRequest) -> Result<Self, ConvertError> {
        Ok(Self { stream: any_stream("stream", &request.stream)? })
    }
}

impl From<StreamInfoArgs> for v1::StreamInfoRequest {
    fn from(args: StreamInfoArgs) -> Self {
        Self { stream: args.stream.as_str().to_owned() }
    }
}

impl From<Option<StreamInfo>> for v1::StreamInfoResponse {
    fn from(info: Option<StreamInfo>) -> Self {
        Self { info: info.map(v1::StreamInfo::from) }
    }
}

/// The stream's state, `None` if it was never written.
pub fn stream_info(response: v1::StreamInfoResponse) -> Result<Option<StreamInfo>, ConvertError> {
    response.info.map(|info| StreamInfo::try_from(info).map_err(|e| e.within("info"))).transpose()
}

/// The arguments of `Store::delete_stream` (the node supplies the time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteStreamArgs {
    /// The stream (never a system stream).
    pub stream: StreamName,
    /// The expectation.
    pub expected: ExpectedVersion,
    /// Tombstone instead of soft delete.
    pub hard: bool,
}

impl TryFrom<v1::DeleteStreamRequest> for DeleteStreamArgs {
    type Error = ConvertError;

    fn try_from(request: v1::DeleteStreamRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: client_stream("stream", &request.stream)?,
            expected: expected_version("expected_version", request.expected_version)?,
            hard: request.hard,
        })
    }
}

impl From<DeleteStreamArgs> for v1::DeleteStreamRequest {
    fn from(args: DeleteStreamArgs) -> Self {
        Self { stream: args.stream.as_str().to_owned(), expected_version: Some(args.expected.into()), hard: args.hard }
    }
}

/// The arguments of `Store::set_stream_metadata` (the node supplies the time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStreamMetadataArgs {
    /// The stream (never a system stream).
    pub stream: StreamName,
    /// The new settings.
    pub metadata: StreamMetadata,
}

impl TryFrom<v1::SetStreamMetadataRequest> for SetStreamMetadataArgs {
    type Error = ConvertError;

    fn try_from(request: v1::SetStreamMetadataRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: client_stream("stream", &request.stream)?,
            metadata: request.metadata.map(StreamMetadata::from).unwrap_or_default(),
        })
    }
}

impl From<SetStreamMetadataArgs> for v1::SetStreamMetadataRequest {
    fn from(args: SetStreamMetadataArgs) -> Self {
        Self { stream: args.stream.as_str().to_owned(), metadata: Some(args.metadata.into()) }
    }
}

/// The arguments of `Store::record_snapshot` (the node supplies the time).
/// The source is checked by the store, which owns its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSnapshotArgs {
    /// Who records it.
    pub source: String,
    /// The stream it summarizes.
    pub stream: StreamName,
    /// The version it was taken at.
    pub version: u64,
    /// The state bytes.
    pub state: Vec<u8>,
}

impl TryFrom<v1::RecordSnapshotRequest> for RecordSnapshotArgs {
    type Error = ConvertError;

    fn try_from(request: v1::RecordSnapshotRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: client_stream("stream", &request.stream)?,
            source: request.source,
            version: request.version,
            state: request.state,
        })
    }
}

impl From<RecordSnapshotArgs> for v1::RecordSnapshotRequest {
    fn from(args: RecordSnapshotArgs) -> Self {
        Self { source: args.source, stream: args.stream.as_str().to_owned(), version: args.version, state: args.state }
    }
}

/// The arguments of `Store::read_snapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSnapshotArgs {
    /// Who recorded it.
    pub source: String,
    /// The stream.
    pub stream: StreamName,
    /// The latest at or below this version; `None`: the latest.
    pub at_or_below: Option<u64>,
}

impl TryFrom<v1::ReadSnapshotRequest> for ReadSnapshotArgs {
    type Error = ConvertError;

    fn try_from(request: v1::ReadSnapshotRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: any_stream("stream", &request.stream)?,
            source: request.source,
            at_or_below: request.at_or_below,
        })
    }
}

impl From<ReadSnapshotArgs> for v1::ReadSnapshotRequest {
    fn from(args: ReadSnapshotArgs) -> Self {
        Self { source: args.source, stream: args.stream.as_str().to_owned(), at_or_below: args.at_or_below }
    }
}

impl From<Snapshot> for v1::ReadSnapshotResponse {
    fn from(snapshot: Snapshot) -> Self {
        Self { snapshot: Some(snapshot.into()) }
    }
}

impl TryFrom<v1::ReadSnapshotResponse> for Snapshot {
    type Error = ConvertError;

    fn try_from(response: v1::ReadSnapshotResponse) -> Result<Self, ConvertError> {
        Snapshot::try_from(required("snapshot", response.snapshot)?).map_err(|e| e.within("snapshot"))
    }
}

/// The arguments of `Store::delete_snapshot` (the node supplies the time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteSnapshotArgs {
    /// Who recorded it.
    pub source: String,
    /// The stream.
    pub stream: StreamName,
    /// Its version.
    pub version: u64,
}

impl TryFrom<v1::DeleteSnapshotRequest> for DeleteSnapshotArgs {
    type Error = ConvertError;

    fn try_from(request: v1::DeleteSnapshotRequest) -> Result<Self, ConvertError> {
        Ok(Self { stream: client_stream("stream", &request.stream)?, source: request.source, version: request.version })
    }
}

impl From<DeleteSnapshotArgs> for v1::DeleteSnapshotRequest {
    fn from(args: DeleteSnapshotArgs) -> Self {
        Self { source: args.source, stream: args.stream.as_str().to_owned(), version: args.version }
    }
}

/// The arguments of `Store::list_snapshots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSnapshotsArgs {
    /// Only this source.
    pub source: Option<String>,
    /// Only streams matching this pattern.
    pub stream: Option<StreamPattern>,
    /// At most this many, 1 to [`READ_COUNT_MAX`].
    pub limit: usize,
}

impl TryFrom<v1::ListSnapshotsRequest> for ListSnapshotsArgs {
    type Error = ConvertError;

    fn try_from(request: v1::ListSnapshotsRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            source: request.source,
            stream: request.stream_pattern.map(|p| pattern("stream_pattern", &p)).transpose()?,
            limit: count(request.limit, READ_COUNT_MAX),
        })
    }
}

impl From<ListSnapshotsArgs> for v1::ListSnapshotsRequest {
    fn from(args: ListSnapshotsArgs) -> Self {
        Self {
            source: args.source,
            stream_pattern: args.stream.map(|p| p.as_str().to_owned()),
            limit: wire_count(args.limit),
        }
    }
}

impl From<Vec<SnapshotInfo>> for v1::ListSnapshotsResponse {
    fn from(snapshots: Vec<SnapshotInfo>) -> Self {
        Self { snapshots: snapshots.into_iter().map(v1::SnapshotInfo::from).collect() }
    }
}

/// The arguments of `Store::list_streams`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListStreamsArgs {
    /// Only names after this one. Not validated: any string is a cursor.
    pub after: Option<String>,
    /// At most this many, 1 to [`READ_COUNT_MAX`].
    pub limit: usize,
    /// Include system streams.
    pub include_system: bool,
}

impl From<v1::ListStreamsRequest> for ListStreamsArgs {
    fn from(request: v1::ListStreamsRequest) -> Self {
        Self {
            after: request.after,
            limit: count(request.limit, READ_COUNT_MAX),
            include_system: request.include_system,
        }
    }
}

impl From<ListStreamsArgs> for v1::ListStreamsRequest {
    fn from(args: ListStreamsArgs) -> Self {
        Self { after: args.after, limit: wire_count(args.limit), include_system: args.include_system }
    }
}

impl From<Vec<StreamInfo>> for v1::ListStreamsResponse {
    fn from(streams: Vec<StreamInfo>) -> Self {
        Self { streams: streams.into_iter().map(v1::StreamInfo::from).collect() }
    }
}

/// The streams of a listing.
pub fn list_streams(response: v1::ListStreamsResponse) -> Result<Vec<StreamInfo>, ConvertError> {
    response
        .streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| StreamInfo::try_from(s).map_err(|e| e.within(&format!("streams[{i}]"))))
        .collect()
}

// ---- subscriptions ---------------------------------------------------------

/// Which streams a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSelector {
    /// Every stream (system streams only if the filter includes them).
    All,
    /// Exactly one stream.
    Stream(StreamName),
    /// Streams matching a pattern.
    Pattern(StreamPattern),
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionFilter {
    /// Which streams.
    pub streams: StreamSelector,
    /// Only these event types (any of them); empty: all.
    pub event_types: Vec<EventType>,
    /// CEL source over the event, at most [`FILTER_PREDICATE_BYTES_MAX`] bytes; the
    /// node compiles it (and answers `INVALID_FILTER` if it does not).
    pub predicate: Option<String>,
    /// Include system streams.
    pub include_system: bool,
}

impl SubscriptionFilter {
    /// The part of the filter that the store applies (all but the
    /// predicate), for catch-up reads of `$all`.
    pub fn all_filter(&self) -> AllFilter {
        AllFilter {
            stream: match &self.streams {
                StreamSelector::All => None,
                StreamSelector::Stream(name) => Some(StreamPattern::literal(name)),
                StreamSelector::Pattern(pattern) => Some(pattern.clone()),
            },
            event_types: self.event_types.clone(),
            include_system: self.include_system,
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeFrom {
    /// The first event.
    Beginning,
    /// Only events written after the subscription starts.
    End,
    /// This log position, inclusive.
    Position(u64),
    /// This version of the (single) stream, inclusive.
    StreamVersion(u64),
}

/// A validated `SubscribeRequest.Start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeStart {
    /// What to deliver.
    pub filter: SubscriptionFilter,
    /// From where.
    pub from: SubscribeFrom,
    /// Credit granted with the start (additive, like any `Credit`).
    pub initial_grant_events: u64,
}

/// A validated client-to-server message of `Subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Opens the subscription (first message only).
    Start(SubscribeStart),
    /// Grants this many more events (additive).
    Credit {
        /// Events the server may send on top of the outstanding credit.
        grant_events: u64,
    },
}

impl TryFrom<v1::subscribe_request::Start> for SubscribeStart {
    type Error = ConvertError;

    fn try_from(start: v1::subscribe_request::Start) -> Result<Self, ConvertError> {
        use v1::subscribe_request::start::{StartAt, Streams};
        let streams = match start.streams {
            None => StreamSelector::All,
            Some(Streams::Stream(name)) => StreamSelector::Stream(any_stream("stream", &name)?),
            Some(Streams::StreamPattern(text)) => StreamSelector::Pattern(pattern("stream_pattern", &text)?),
        };
        let from = match required("start_at", start.start_at)? {
            StartAt::Beginning(_) => SubscribeFrom::Beginning,
            StartAt::End(_) => SubscribeFrom::End,
            StartAt::Position(position) => SubscribeFrom::Position(position),
            StartAt::StreamVersion(version) => {
                if !matches!(streams, StreamSelector::Stream(_)) {
                    return Err(ConvertError::new("stream_version", Problem::StreamVersionNeedsStream));
                }
                SubscribeFrom::StreamVersion(version)
            }
        };
        if start.predicate.len() > FILTER_PREDICATE_BYTES_MAX {
            return Err(ConvertError::new(
                "predicate",
                Problem::PredicateTooLong { len_bytes: start.predicate.len(), max_bytes: FILTER_PREDICATE_BYTES_MAX },
            ));
        }
        Ok(Self {
            filter: SubscriptionFilter {
                streams,
                event_types: event_types("event_types", &start.event_types)?,
                predicate: (!start.predicate.is_empty()).then_some(start.predicate),
                include_system: start.include_system,
            },
            from,
            initial_grant_events: start.initial_grant_events,
        })
    }
}

impl From<SubscribeStart> for v1::subscribe_request::Start {
    fn from(start: SubscribeStart) -> Self {
        use v1::subscribe_request::start::{StartAt, Streams};
        let SubscribeStart { filter, from, initial_grant_events } = start;
        Self {
            streams: match filter.streams {
                StreamSelector::All => None,
                StreamSelector::Stream(name) => Some(Streams::Stream(name.as_str().to_owned())),
                StreamSelector::Pattern(pattern) => Some(Streams::StreamPattern(pattern.as_str().to_owned())),
            },
            event_types: filter.event_types.iter().map(|t| t.as_str().to_owned()).collect(),
            predicate: filter.predicate.unwrap_or_default(),
            include_system: filter.include_system,
            start_at: Some(match from {
                SubscribeFrom::Beginning => StartAt::Beginning(v1::Empty {}),
                SubscribeFrom::End => StartAt::End(v1::Empty {}),
                SubscribeFrom::Position(position) => StartAt::Position(position),
                SubscribeFrom::StreamVersion(version) => StartAt::StreamVersion(version),
            }),
            initial_grant_events,
        }
    }
}

impl TryFrom<v1::SubscribeRequest> for ClientMessage {
    type Error = ConvertError;

    fn try_from(request: v1::SubscribeRequest) -> Result<Self, ConvertError> {
        use v1::subscribe_request::Kind;
        Ok(match required("kind", request.kind)? {
            Kind::Start(start) => Self::Start(SubscribeStart::try_from(start).map_err(|e| e.within("start"))?),
            Kind::Credit(credit) => Self::Credit { grant_events: credit.grant_events },
        })
    }
}

impl From<ClientMessage> for v1::SubscribeRequest {
    fn from(message: ClientMessage) -> Self {
        use v1::subscribe_request::{Credit, Kind};
        let kind = match message {
            ClientMessage::Start(start) => Kind::Start(start.into()),
            ClientMessage::Credit { grant_events } => Kind::Credit(Credit { grant_events }),
        };
        Self { kind: Some(kind) }
    }
}

/// A validated server-to-client message of `Subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// A matching event (consumes one unit of credit).
    Event(RecordedEvent),
    /// Catch-up is over; every matching event below `position` was sent.
    CaughtUp {
        /// The first position not yet delivered or skipped.
        position: u64,
    },
    /// Progress over skipped events.
    Checkpoint {
        /// The first position not yet delivered or skipped.
        position: u64,
    },
    /// The subscription failed; the last message.
    Error(v1::ErrorDetail),
}

impl From<ServerMessage> for v1::SubscribeResponse {
    fn from(message: ServerMessage) -> Self {
        use v1::subscribe_response::{CaughtUp, Checkpoint, Kind};
        let kind = match message {
            ServerMessage::Event(event) => Kind::Event(event.into()),
            ServerMessage::CaughtUp { position } => Kind::CaughtUp(CaughtUp { position }),
            ServerMessage::Checkpoint { position } => Kind::Checkpoint(Checkpoint { position }),
            ServerMessage::Error(detail) => Kind::Error(detail),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<v1::SubscribeResponse> for ServerMessage {
    type Error = ConvertError;

    fn try_from(response: v1::SubscribeResponse) -> Result<Self, ConvertError> {
        use v1::subscribe_response::Kind;
        Ok(match required("kind", response.kind)? {
            Kind::Event(event) => Self::Event(RecordedEvent::try_from(event).map_err(|e| e.within("event"))?),
            Kind::CaughtUp(caught_up) => Self::CaughtUp { position: caught_up.position },
            Kind::Checkpoint(checkpoint) => Self::Checkpoint { position: checkpoint.position },
            Kind::Error(detail) => Self::Error(detail),
        })
    }
}
