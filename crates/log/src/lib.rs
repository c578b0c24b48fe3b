//! edgebus-log: a durable, crash-safe, totally ordered append-only log of
//! opaque records, as fast as the disk allows. Synchronous: one writer thread
//! inside, no async runtime.
//!
//! - [`Log`] — open with recovery, group-committed [`Log::append`] /
//!   [`Log::submit`], reads forward and backward, segment removal.
//! - [`Storage`] — every byte of I/O goes through it; [`FileStorage`] is the
//!   real backend and [`fault::FaultStorage`] injects failures for tests.
//! - The on-disk format is described byte by byte in `docs/log-format.md`.

mod config;
mod error;
pub mod fault;
pub mod format;
mod log;
mod segment;
mod storage;

pub use config::{FsyncPolicy, LogConfig};
pub use error::{AppendError, Corruption, IoFailure, OpenError, ReadError, RemoveError};
pub use log::{AppendOutcome, AppendQueue, Log, LogStats, Queued, Record, RecoveryReport, SegmentSummary, TornTail};
pub use storage::{FileStorage, OpenMode, Storage, StorageFile, read_exact_at};
