//! Store errors on the wire: a `tonic::Status` whose code is a coarse hint
//! and whose details carry one prost-encoded [`v1::ErrorDetail`] with the
//! stable code and the facts a client acts on (expected and current
//! versions, positions, a retry delay). And back: a client recovers the
//! detail from any status.

use bytes::Bytes;
use edgebus_log::ReadError as LogReadError;
use edgebus_store::{ErrorCode, ReadError, WriteError};
use edgebus_types::{EventError, EventId, ExpectedVersion, StreamName, WrongExpectedVersion};
use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use super::ConvertError;
use crate::v1;

/// Milliseconds a client should wait before retrying after `BUSY` (the write
/// queue was full): long enough for a group commit or two to drain it.
pub const BUSY_RETRY_AFTER_MS: u64 = 100;

/// The gRPC trailer that tells a client when to retry
/// (`grpc-retry-pushback-ms`, from gRPC's retry design); set together with
/// `ErrorDetail.retry_after_ms`.
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// The wire number of a store error code: its discriminant, unchanged.
pub fn wire_error_code(code: ErrorCode) -> u32 {
    u32::from(code as u16)
}

/// The gRPC status code for a stable error code (a wire `ErrorCode` number).
/// A number this version does not know maps to `Unknown`.
pub fn grpc_code(code: u32) -> Code {
    use v1::ErrorCode as E;
    let Some(code) = known_code(code) else { return Code::Unknown };
    match code {
        E::Unspecified => Code::Unknown,
        E::WrongExpectedVersion => Code::FailedPrecondition,
        // A write to a tombstoned stream; reads of one answer `NotFound`.
        E::StreamDeleted => Code::FailedPrecondition,
        E::StreamNotFound | E::SnapshotNotFound => Code::NotFound,
        E::ReservedStream
        | E::EventTooLarge
        | E::BatchTooLarge
        | E::EmptyAppend
        | E::InvalidArgument
        | E::InvalidName
        | E::InvalidFilter => Code::InvalidArgument,
        E::DuplicateEventId | E::IdempotencyConflict => Code::AlreadyExists,
        // Writing past the end: may succeed once the stream has grown.
        E::Gap => Code::OutOfRange,
        E::PositionRemoved => Code::OutOfRange,
        E::Unavailable | E::Busy => Code::Unavailable,
        E::Corrupt => Code::DataLoss,
        E::IndexFailure => Code::Internal,
        E::Unauthenticated => Code::Unauthenticated,
        E::ResourceExhausted => Code::ResourceExhausted,
        E::PermissionDenied => Code::PermissionDenied,
        E::GroupNotFound => Code::NotFound,
        E::GroupExists | E::ConsumerExists => Code::AlreadyExists,
        E::NotInFlight => Code::FailedPrecondition,
        E::ReplicaStream | E::NotReplica => Code::FailedPrecondition,
        E::Fenced => Code::FailedPrecondition,
    }
}

fn known_code(code: u32) -> Option<v1::ErrorCode> {
    i32::try_from(code).ok().and_then(|code| v1::ErrorCode::try_from(code).ok())
}

fn detail(code: ErrorCode, message: String) -> v1::ErrorDetail {
    v1::ErrorDetail { code: wire_error_code(code), message, ..v1::ErrorDetail::default() }
}

fn stream(name: &StreamName) -> Option<String> {
    Some(name.as_str().to_owned())
}

fn id(id: &EventId) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// The detail of a write error: its stable code, its message and the facts
/// its code documents in `ErrorDetail`.
pub fn error_detail_from_write_error(error: &WriteError) -> v1::ErrorDetail {
    let mut out = detail(error.code(), error.to_string());
    match error {
        WriteError::WrongExpectedVersion { stream: name, source } => {
            out.stream = stream(name);
            out.expected = Some(source.expected.into());
            out.current = source.current;
        }
        WriteError::StreamDeleted { stream: name }
        | WriteError::StreamNotFound { stream: name }
        | WriteError::ReservedStream { stream: name } => out.stream = stream(name),
        WriteError::EventTooLarge(
            EventError::DataTooLarge { id: event, .. } | EventError::MetadataTooLarge { id: event, .. },
        ) => out.event_id = id(event),
        WriteError::DuplicateEventId { id: event, position, stream: name, version } => {
            out.event_id = id(event);
            out.position = Some(*position);
            out.stream = stream(name);
            out.version = Some(*version);
        }
        WriteError::IdempotencyConflict { id: event, stream: name } => {
            out.event_id = id(event);
            out.stream = stream(name);
        }
        WriteError::Gap { stream: name, index, count } => {
            out.stream = stream(name);
            out.version = Some(*index);
            out.current = count.checked_sub(1);
        }
        WriteError::SnapshotNotFound { source_name, stream: name, version } => {
            out.snapshot_source = Some(source_name.clone());
            out.stream = stream(name);
            out.version = Some(*version);
        }
        WriteError::Busy => out.retry_after_ms = Some(BUSY_RETRY_AFTER_MS),
        _ => {}
    }
    out
}

/// The detail of a read error: its stable code, its message and the facts
/// its code documents in `ErrorDetail`.
pub fn error_detail_from_read_error(error: &ReadError) -> v1::ErrorDetail {
    let mut out = detail(error.code(), error.to_string());
    match error {
        ReadError::StreamNotFound { stream: name } | ReadError::StreamDeleted { stream: name } => {
            out.stream = stream(name);
        }
        ReadError::SnapshotNotFound { source_name, stream: name } => {
            out.snapshot_source = Some(source_name.clone());
            out.stream = stream(name);
        }
        ReadError::Log(LogReadError::Removed { position, start }) => {
            out.position = Some(*position);
            out.first_position = Some(*start);
        }
        _ => {}
    }
    out
}

/// The status for a write error: see [`grpc_code`] for the gRPC code; the
/// details carry the [`v1::ErrorDetail`].
pub fn status_from_write_error(error: &WriteError) -> Status {
    status_from_error_detail(error_detail_from_write_error(error))
}

/// The status for a read error. As [`status_from_write_error`], except that
/// a deleted stream is `NotFound` to a reader, and a log read that failed
/// on I/O is `Unavailable` and an index failure `Internal` (the store
/// reports both as `CORRUPT`, which stays the detail's code).
pub fn status_from_read_error(error: &ReadError) -> Status {
    let detail = error_detail_from_read_error(error);
    let code = match error {
        ReadError::StreamDeleted { .. } => Code::NotFound,
        ReadError::Log(LogReadError::Io(_)) => Code::Unavailable,
        ReadError::Index(_) => Code::Internal,
        _ => grpc_code(detail.code),
    };
    status_with_code(code, detail)
}

/// The status for a detail, with the gRPC code that [`grpc_code`] gives its
/// stable code. Used for the node's own errors (`UNAUTHENTICATED`,
/// `RESOURCE_EXHAUSTED`, …) as well as the store's.
pub fn status_from_error_detail(detail: v1::ErrorDetail) -> Status {
    status_with_code(grpc_code(detail.code), detail)
}

fn status_with_code(code: Code, detail: v1::ErrorDetail) -> Status {
    let mut metadata = MetadataMap::new();
    if let Some(retry_after_ms) = detail.retry_after_ms {
        metadata.insert(RETRY_PUSHBACK_HEADER, MetadataValue::from(retry_after_ms));
    }
    let details = Bytes::from(detail.encode_to_vec());
    Status::with_details_and_metadata(code, detail.message, details, metadata)
}

/// The detail a status carries, if it carries one (statuses from proxies or
/// from the gRPC runtime itself do not).
pub fn error_detail_from_status(status: &Status) -> Option<v1::ErrorDetail> {
    let details = status.details();
    if details.is_empty() {
        return None;
    }
    v1::ErrorDetail::decode(details).ok()
}

impl From<&ConvertError> for v1::ErrorDetail {
    fn from(error: &ConvertError) -> Self {
        v1::ErrorDetail {
            code: error.code() as u32,
            message: error.to_string(),
            field: error.field().to_owned(),
            ..v1::ErrorDetail::default()
        }
    }
}

/// A request that does not convert is `InvalidArgument`, with the field's
/// path in the detail.
impl From<ConvertError> for Status {
    fn from(error: ConvertError) -> Self {
        status_from_error_detail(v1::ErrorDetail::from(&error))
    }
}

impl v1::ErrorDetail {
    /// The stable code, `Unspecified` if this version does not know it.
    pub fn error_code(&self) -> v1::ErrorCode {
        known_code(self.code).unwrap_or(v1::ErrorCode::Unspecified)
    }

    /// The failed expectation of a `WRONG_EXPECTED_VERSION` error: what the
    /// writer expected and the stream's current version.
    pub fn wrong_expected_version(&self) -> Option<WrongExpectedVersion> {
        if self.error_code() != v1::ErrorCode::WrongExpectedVersion {
            return None;
        }
        let expected = ExpectedVersion::try_from(self.expected?).ok()?;
        Some(WrongExpectedVersion { expected, current: self.current })
    }

    /// The event id the detail names, if any.
    pub fn event_id(&self) -> Option<EventId> {
        <[u8; 16]>::try_from(self.event_id.as_slice()).ok().map(EventId::from_bytes)
    }
}
