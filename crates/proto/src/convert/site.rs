//! The `edgebus.v1.Site` messages (site.proto) to and from the arguments of
//! the site's calls: a gateway in its own process sends them, the node
//! validates them here. The per-write answers and the fenced error belong
//! to the gateway's types and are converted by `edgebus-gateway`.

use edgebus_store::ReplicaWrite;
use edgebus_types::limits::{SITE_READ_LOG_BYTES_MAX, SITE_READ_LOG_RECORDS_MAX};
use edgebus_types::{ExpectedVersion, NewEvent, StreamName};

use super::{ConvertError, any_stream, count, expected_version, new_event, new_events, origin, required, wire_origin};
use crate::v1;

/// The arguments of a `Site.ReadLog` call, clamped to the node's maximums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLogArgs {
    /// The first position.
    pub from: u64,
    /// At most this many events, 1 to [`SITE_READ_LOG_RECORDS_MAX`].
    pub max_records: usize,
    /// About this many payload bytes past the first event, 1 to
    /// [`SITE_READ_LOG_BYTES_MAX`].
    pub max_bytes: u64,
}

impl From<v1::ReadLogRequest> for ReadLogArgs {
    fn from(request: v1::ReadLogRequest) -> Self {
        let max_bytes = match request.max_bytes {
            0 => SITE_READ_LOG_BYTES_MAX,
            bytes => bytes.min(SITE_READ_LOG_BYTES_MAX),
        };
        Self { from: request.from, max_records: count(request.max_records, SITE_READ_LOG_RECORDS_MAX), max_bytes }
    }
}

/// The arguments of a `Site.Append` call. The stream may be a system
/// stream here: which ones a gateway may write is the node's call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteAppendArgs {
    /// The stream.
    pub stream: StreamName,
    /// The expectation.
    pub expected: ExpectedVersion,
    /// The events, stamped by the accepting node.
    pub events: Vec<NewEvent>,
}

impl SiteAppendArgs {
    /// Validates `request`, stamping every event with `timestamp_ms`.
    pub fn from_wire(request: v1::SiteAppendRequest, timestamp_ms: u64) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: any_stream("stream", &request.stream)?,
            expected: expected_version("expected_version", request.expected_version)?,
            events: new_events(request.events, timestamp_ms)?,
        })
    }
}

impl From<SiteAppendArgs> for v1::SiteAppendRequest {
    fn from(args: SiteAppendArgs) -> Self {
        Self {
            stream: args.stream.as_str().to_owned(),
            expected_version: Some(args.expected.into()),
            events: args.events.into_iter().map(v1::NewEvent::from).collect(),
        }
    }
}

impl From<ReplicaWrite> for v1::ReplicaWrite {
    fn from(write: ReplicaWrite) -> Self {
        let ReplicaWrite { stream, version, event, origin } = write;
        let timestamp_ms = event.timestamp_ms;
        Self {
            stream: stream.as_str().to_owned(),
            version,
            event: Some(event.into()),
            timestamp_ms,
            origin: Some(wire_origin(origin)),
        }
    }
}

/// A replicated write keeps its home site's timestamp. A `$` stream passes
/// here and is refused by the store for that write alone, as in process.
impl TryFrom<v1::ReplicaWrite> for ReplicaWrite {
    type Error = ConvertError;

    fn try_from(write: v1::ReplicaWrite) -> Result<Self, ConvertError> {
        Ok(Self {
            stream: any_stream("stream", &write.stream)?,
            version: write.version,
            event: new_event(required("event", write.event)?, write.timestamp_ms).map_err(|e| e.within("event"))?,
            origin: origin(required("origin", write.origin)?)?,
        })
    }
}

/// The writes of a `Site.Replicate` call, each validated (errors name
/// `writes[i].field`).
pub fn replica_writes(writes: Vec<v1::ReplicaWrite>) -> Result<Vec<ReplicaWrite>, ConvertError> {
    writes
        .into_iter()
        .enumerate()
        .map(|(i, w)| ReplicaWrite::try_from(w).map_err(|e| e.within(&format!("writes[{i}]"))))
        .collect()
}
