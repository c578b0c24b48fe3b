//! edgebus-store: the event store, a deterministic state machine over the
//! log. Streams with per-stream versions and expected-version checks,
//! idempotent appends, `exists_or_write`, reads by stream and over `$all`,
//! soft and hard deletes, retention metadata and snapshots, with an index
//! (fjall) that is rebuilt from the log and checkpointed so a restart replays
//! only the tail. No clock, randomness or network is read: callers stamp
//! event timestamps and pass their clock to reads that apply `max_age`.

mod error;
mod index;
mod pending;
pub mod record;
mod store;
mod tail;
mod writer;

pub use error::{ErrorCode, ReadError, StoreOpenError, WriteError};
pub use index::{IndexMemory, StreamState};
pub use pending::PendingWrite;
pub use record::StreamMetadata;
pub use store::{
    AllFilter, AllSlice, AppendResult, Direction, ExistsOrWrite, OpenReport, READ_ALL_SCAN_MAX, READ_COUNT_MAX,
    ReclaimReport, ReplicaWrite, Snapshot, SnapshotInfo, Store, StoreConfig, StreamFrom, StreamInfo,
};
