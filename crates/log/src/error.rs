//! Typed errors, one enum per operation, each message naming what and where.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Bytes on disk that fail their checks somewhere a torn write cannot explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The damaged file.
    pub file: PathBuf,
    /// Byte offset of the damage within the file.
    pub offset: u64,
    /// What check failed.
    pub reason: String,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "log corrupt in {} at byte {}: {}", self.file.display(), self.offset, self.reason)
    }
}

/// A failed storage call: which operation, on which file, at which offset.
#[derive(Debug)]
pub struct IoFailure {
    /// `write`, `fdatasync`, `open`, `read`, ...
    pub op: &'static str,
    /// The file (or directory) involved.
    pub file: PathBuf,
    /// Byte offset, where it applies (0 otherwise).
    pub offset: u64,
    /// What the OS (or the fault injector) said.
    pub source: io::Error,
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed on {} at byte {}: {}", self.op, self.file.display(), self.offset, self.source)
    }
}

impl std::error::Error for IoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Errors of [`crate::Log::open`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The settings do not validate.
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
    /// The directory is not empty and holds no edgebus log.
    #[error(
        "{path} is not an edgebus log directory (it is not empty and has no EDGEBUS-LOG marker; found {entry:?}); choose an empty or new directory"
    )]
    NotALogDirectory {
        /// The directory.
        path: PathBuf,
        /// One entry found in it.
        entry: String,
    },
    /// The path exists and is not a directory.
    #[error("{path} exists and is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The marker names a format this build cannot read.
    #[error("{path} holds a log in an unsupported format: {found:?}")]
    UnsupportedFormat {
        /// The marker file.
        path: PathBuf,
        /// Its contents.
        found: String,
    },
    /// Another process has the log open.
    #[error("{path} is locked: another process has this log open")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// Damage that a torn write cannot explain.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
    /// The storage failed.
    #[error("opening the log: {0}")]
    Io(#[from] IoFailure),
}

impl std::error::Error for Corruption {}

/// Errors of appends.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// An append must carry at least one record.
    #[error("an append must carry at least one record")]
    Empty,
    /// One record is larger than `record_bytes_max`.
    #[error("record {index} is {bytes} bytes, over the limit of {max} bytes")]
    RecordTooLarge {
        /// Index of the record in the append.
        index: usize,
        /// Its payload size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The whole append is larger than `append_bytes_max`.
    #[error("append is {bytes} bytes framed, over the limit of {max} bytes")]
    AppendTooLarge {
        /// Framed size of the append.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The append carries more than `append_records_max` records.
    #[error("append carries {count} records, over the limit of {max}")]
    TooManyRecords {
        /// Records in the append.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// The queue of appends waiting to be written is full (retry later).
    #[error("append queue full ({queued_bytes} bytes in {queued_appends} appends waiting); retry later")]
    QueueFull {
        /// Bytes waiting.
        queued_bytes: u64,
        /// Appends waiting.
        queued_appends: u32,
    },
    /// This append's write or `fdatasync` failed; it is not durable.
    #[error("append not durable: {0}")]
    Io(Arc<IoFailure>),
    /// An earlier write or `fdatasync` failed, so the log refuses every append
    /// until it is reopened (which runs recovery). Never retried in place.
    #[error("log is poisoned and accepts no appends until reopened: {0}")]
    Poisoned(Arc<IoFailure>),
    /// The log is closing or closed.
    #[error("log is closed")]
    Closed,
}

/// Errors of reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The position was removed by retention.
    #[error("position {position} was removed; the log now starts at {start}")]
    Removed {
        /// Position asked for.
        position: u64,
        /// First position still present.
        start: u64,
    },
    /// Bytes failed their checksum.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
    /// The storage failed.
    #[error("reading the log: {0}")]
    Io(#[from] IoFailure),
}

/// Errors of [`crate::Log::remove_segments_before`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoveError {
    /// The storage failed; segments before the one named may already be gone.
    #[error("removing segments: {0}")]
    Io(#[from] IoFailure),
}
