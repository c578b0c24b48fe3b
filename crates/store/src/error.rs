//! Typed store errors with stable numeric codes (they go on the wire as-is;
//! a retired code is never reused).

use edgebus_log::{AppendError, OpenError, ReadError as LogReadError};
use edgebus_types::{EventError, EventId, StreamName, WrongExpectedVersion};

use crate::record::DecodeError;

/// Stable error codes shared by every operation. Never renumber; never reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The stream's version is not what the writer expected.
    WrongExpectedVersion = 1,
    /// The stream was hard-deleted (tombstoned).
    StreamDeleted = 2,
    /// The stream has no events (or was soft-deleted).
    StreamNotFound = 3,
    /// Clients may not write to `$`-streams.
    ReservedStream = 4,
    /// An event is larger than the limits allow.
    EventTooLarge = 5,
    /// An append carries too many events or bytes.
    BatchTooLarge = 6,
    /// An append carries no events.
    EmptyAppend = 7,
    /// An event id already exists elsewhere in the log.
    DuplicateEventId = 8,
    /// A retried append reused event ids with different content.
    IdempotencyConflict = 9,
    /// `exists_or_write` at an index beyond the stream's end.
    Gap = 10,
    /// No such snapshot.
    SnapshotNotFound = 11,
    /// The log cannot accept writes (poisoned, closed, or I/O failed).
    Unavailable = 12,
    /// The write queue is full; retry later.
    Busy = 13,
    /// An argument is invalid (the message says which).
    InvalidArgument = 14,
    /// Stored data failed its checks.
    Corrupt = 15,
    /// A position below the log's start was asked for.
    PositionRemoved = 16,
    /// The index failed; the store stops taking writes.
    IndexFailure = 17,
    /// A local write to a stream that is a read-only replica of another site.
    ReplicaStream = 18,
    /// A replicated write to a stream whose home is not the sending site.
    NotReplica = 19,
}

/// Errors of writes: append, exists-or-write, metadata, delete, snapshots.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Optimistic concurrency check failed.
    #[error("{stream}: {source}")]
    WrongExpectedVersion {
        /// The stream.
        stream: StreamName,
        /// Expected and current versions.
        source: WrongExpectedVersion,
    },
    /// The stream is tombstoned.
    #[error("stream {stream} is deleted (tombstoned) and cannot be written again")]
    StreamDeleted {
        /// The stream.
        stream: StreamName,
    },
    /// The stream has no events.
    #[error("stream {stream} not found")]
    StreamNotFound {
        /// The stream.
        stream: StreamName,
    },
    /// A client tried to write to a system stream.
    #[error("stream {stream} is reserved for the system ($-prefixed); clients cannot write to it")]
    ReservedStream {
        /// The stream.
        stream: StreamName,
    },
    /// An event exceeds the size limits.
    #[error(transparent)]
    EventTooLarge(#[from] EventError),
    /// The append is too large.
    #[error("append of {events} events is {bytes} bytes; limits are {events_max} events and {bytes_max} bytes")]
    BatchTooLarge {
        /// Events in the append.
        events: usize,
        /// Encoded bytes.
        bytes: u64,
        /// Event limit.
        events_max: u32,
        /// Byte limit.
        bytes_max: u64,
    },
    /// No events.
    #[error("an append must carry at least one event")]
    EmptyAppend,
    /// The id is already used by another event.
    #[error("event id {id} already exists at position {position} (stream {stream}, version {version})")]
    DuplicateEventId {
        /// The id.
        id: EventId,
        /// Where it is.
        position: u64,
        /// Its stream.
        stream: StreamName,
        /// Its version.
        version: u64,
    },
    /// Retried ids with different content, or a partial overlap.
    #[error(
        "event id {id} was already written to {stream} with different content or in a different batch; an idempotent retry must resend the same events"
    )]
    IdempotencyConflict {
        /// The first conflicting id.
        id: EventId,
        /// The stream.
        stream: StreamName,
    },
    /// `exists_or_write` beyond the end.
    #[error(
        "exists_or_write at index {index} of {stream}, which holds {count} events: writing there would leave a gap"
    )]
    Gap {
        /// The stream.
        stream: StreamName,
        /// The requested index.
        index: u64,
        /// Events in the stream.
        count: u64,
    },
    /// No such snapshot.
    #[error("no snapshot of {stream} at version {version} from source {source_name}")]
    SnapshotNotFound {
        /// The snapshot's source.
        source_name: String,
        /// The stream.
        stream: StreamName,
        /// The version.
        version: u64,
    },
    /// Invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The queue is full.
    #[error("write queue full; retry later")]
    Busy,
    /// The log cannot write.
    #[error("store unavailable: {0}")]
    Unavailable(AppendError),
    /// The index failed to read or write.
    #[error("index failure: {0}")]
    Index(String),
    /// A local write to a replicated stream.
    #[error("stream {stream} is a read-only replica of another site's stream; write it at its home site")]
    ReplicaStream {
        /// The stream.
        stream: StreamName,
    },
    /// A replicated write from a site that is not the stream's home.
    #[error("site {site} may not write stream {stream}: {reason}")]
    NotReplica {
        /// The stream.
        stream: StreamName,
        /// The site that claimed to be its home.
        site: String,
        /// Whose stream it is instead.
        reason: &'static str,
    },
    /// `exists_or_write` below the end at a version whose record was
    /// reclaimed and is no longer indexed (after an index rebuild).
    #[error(
        "version {index} of {stream} (which holds {count} events) was reclaimed; whether it matched cannot be told any more"
    )]
    VersionRemoved {
        /// The stream.
        stream: StreamName,
        /// The requested index.
        index: u64,
        /// Events in the stream.
        count: u64,
    },
}

impl WriteError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::WrongExpectedVersion { .. } => ErrorCode::WrongExpectedVersion,
            Self::StreamDeleted { .. } => ErrorCode::StreamDeleted,
            Self::StreamNotFound { .. } => ErrorCode::StreamNotFound,
            Self::ReservedStream { .. } => ErrorCode::ReservedStream,
            Self::EventTooLarge(_) => ErrorCode::EventTooLarge,
            Self::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            Self::EmptyAppend => ErrorCode::EmptyAppend,
            Self::DuplicateEventId { .. } => ErrorCode::DuplicateEventId,
            Self::IdempotencyConflict { .. } => ErrorCode::IdempotencyConflict,
            Self::Gap { .. } => ErrorCode::Gap,
            Self::SnapshotNotFound { .. } => ErrorCode::SnapshotNotFound,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Busy => ErrorCode::Busy,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Index(_) => ErrorCode::IndexFailure,
            Self::VersionRemoved { .. } => ErrorCode::PositionRemoved,
            Self::ReplicaStream { .. } => ErrorCode::ReplicaStream,
            Self::NotReplica { .. } => ErrorCode::NotReplica,
        }
    }
}

impl From<AppendError> for WriteError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::QueueFull { .. } => Self::Busy,
            AppendError::AppendTooLarge { bytes, max } => {
                Self::BatchTooLarge { events: 0, bytes, events_max: 0, bytes_max: max }
            }
            other => Self::Unavailable(other),
        }
    }
}

/// Errors of reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream has no (visible) events.
    #[error("stream {stream} not found")]
    StreamNotFound {
        /// The stream.
        stream: StreamName,
    },
    /// The stream is tombstoned.
    #[error("stream {stream} is deleted (tombstoned)")]
    StreamDeleted {
        /// The stream.
        stream: StreamName,
    },
    /// No such snapshot.
    #[error("no snapshot of {stream} from source {source_name}")]
    SnapshotNotFound {
        /// The snapshot's source.
        source_name: String,
        /// The stream.
        stream: StreamName,
    },
    /// Invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The log failed to read.
    #[error(transparent)]
    Log(#[from] LogReadError),
    /// A record failed to decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The index failed.
    #[error("index: {0}")]
    Index(String),
}

impl ReadError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::StreamNotFound { .. } => ErrorCode::StreamNotFound,
            Self::StreamDeleted { .. } => ErrorCode::StreamDeleted,
            Self::SnapshotNotFound { .. } => ErrorCode::SnapshotNotFound,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Log(LogReadError::Removed { .. }) => ErrorCode::PositionRemoved,
            Self::Log(_) | Self::Decode(_) | Self::Index(_) => ErrorCode::Corrupt,
        }
    }
}

/// Errors of [`crate::Store::open`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreOpenError {
    /// The log failed to open.
    #[error(transparent)]
    Log(#[from] OpenError),
    /// The index failed to open or rebuild.
    #[error("index at {path}: {message}")]
    Index {
        /// The index directory.
        path: std::path::PathBuf,
        /// What failed.
        message: String,
    },
    /// Replaying the log into the index failed.
    #[error("replaying the log: {0}")]
    Replay(#[from] ReadError),
    /// Invalid configuration.
    #[error("invalid store configuration: {0}")]
    InvalidConfig(String),
}
