//! The store: streams with versions and expected-version checks, idempotent
//! appends, exists-or-write, reads, deletes, metadata and snapshots over the
//! log, with the index kept in step.
//!
//! Lifecycle: [`Store::open`] opens the log and the index, replays the log
//! from the index checkpoint into the tail, and starts the indexer thread.
//! Writes validate and submit under one lock (so validation and position
//! assignment are one atomic step), apply the state machine to the tail, and
//! wait for durability outside the lock. [`Store::close`] flushes the index
//! and closes the log; drop does the same.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgebus_log::{AppendError, Log, LogConfig};
use edgebus_types::{EventType, ExpectedVersion, NewEvent, Origin, RecordedEvent, StreamName, StreamPattern};

use crate::error::{ReadError, StoreOpenError, WriteError};
use crate::index::{Index, IndexMemory, StreamState, VersionEntry, snapshot_key};
use crate::pending::PendingWrite;
use crate::record::{self, Command, SNAPSHOTS_PREFIX, STREAMS_STREAM, StreamMetadata};
use crate::tail::{Applied, Generation, Tail};
use crate::writer::{CommandBuilder, Outcome, Request, Requests};

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The log's settings.
    pub log: LogConfig,
    /// Block cache of the on-disk index.
    pub index_cache_bytes: u64,
    /// Index changes the in-memory tail may hold, in both its generations;
    /// writers wait beyond it. The default, 229,376, is 7/8 of 2^18: a
    /// generation's id map holding all of it still fits in 2^18 slots
    /// (8 MiB); see `tail.rs` for the rest of the tail's memory.
    pub tail_events_max: usize,
    /// The indexer flushes once the tail holds this many changes...
    /// Each flush writes one table per index keyspace, which fjall then
    /// compacts: larger flushes mean fewer tables to merge and to look
    /// through (`bench store --quick`, 100,000 streams, 256 writers:
    /// 48,600 events/s at 32,768, 77,500 at 131,072).
    pub index_flush_events: usize,
    /// ...or, if set, this long after the last flush, however few changes
    /// the tail holds. Off by default: each flush writes one table per
    /// keyspace, and the tables of small flushes are never merged (their
    /// keys, time-ordered ids and growing versions, follow those already
    /// stored, so fjall's leveled compaction moves them down whole and
    /// merges nothing until a level outgrows its size). A 200 ms
    /// interval left a gateway site that wrote only its lease renewals
    /// (about one event a second) with 1.4 more index tables every second,
    /// without end. Without it an idle site's tail waits in memory (within
    /// `tail_events_max`, which also bounds the log replay on the next
    /// open) and is flushed on close.
    pub index_flush_interval: Option<Duration>,
    /// ...or once the site has been quiet this long: the tail holds at
    /// least an eighth of `index_flush_events` changes (16,384 by default)
    /// and fewer than a 64th of that (256) came on top in that time. A site
    /// that went quiet after a burst then persists its index (a shorter
    /// replay on the next open) and gives the tail's memory back; with
    /// fewer changes than that in the tail, a quiet site keeps them but
    /// gives back the room its tables grew to in earlier bursts. A steady
    /// writer below 256 changes a spell flushes at most once per 64
    /// spells (16,384 changes a flush), one above it never this way: few
    /// small tables either way.
    pub index_idle_flush: Option<Duration>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            log: LogConfig::default(),
            index_cache_bytes: 32 * 1024 * 1024,
            tail_events_max: 229_376,
            index_flush_events: 131_072,
            index_flush_interval: None,
            index_idle_flush: Some(Duration::from_secs(1)),
        }
    }
}

/// Where a write landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Version of the first event written.
    pub first_version: u64,
    /// Position of the first event written; the others follow densely.
    pub first_position: u64,
    /// Number of events.
    pub count: u32,
    /// True if this was an idempotent retry and nothing new was written.
    pub already_written: bool,
}

impl AppendResult {
    /// Version of the last event written: the stream's new current version.
    pub fn last_version(&self) -> u64 {
        self.first_version + u64::from(self.count) - 1
    }
}

/// Outcome of [`Store::exists_or_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistsOrWrite {
    /// The event was written at `index`.
    Written {
        /// Its position.
        position: u64,
    },
    /// An event already sits at `index`.
    Exists {
        /// Its position.
        position: u64,
        /// Whether its content hash equals the offered event's.
        same: bool,
    },
}

/// One replicated event for [`Store::replicate`].
#[derive(Debug, Clone)]
pub struct ReplicaWrite {
    /// The stream, named as at its home site.
    pub stream: StreamName,
    /// The event's version at its home site, written there with
    /// exists-or-write; `None` for an event a policy kept out of a sparse
    /// series (sampled, compacted): written after the stream's last event
    /// unless its id is already in the stream, so the replica's versions
    /// are its own.
    pub version: Option<u64>,
    /// The event as written at its home site.
    pub event: NewEvent,
    /// Where it comes from.
    pub origin: Origin,
}

/// Where a stream read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFrom {
    /// The first visible version (forward) / the last (backward).
    Start,
    /// The last version (backward) / past the end (forward).
    End,
    /// This version, inclusive.
    Version(u64),
}

/// Read direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ascending versions or positions.
    Forward,
    /// Descending.
    Backward,
}

/// A stream's visible state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream.
    pub stream: StreamName,
    /// Version of the last event (`None`: no events, or soft-deleted since).
    pub current_version: Option<u64>,
    /// First version reads return (before `max_age`).
    pub first_visible_version: u64,
    /// Soft-deleted and not written to since.
    pub deleted: bool,
    /// Hard-deleted.
    pub tombstoned: bool,
    /// Retention settings.
    pub metadata: StreamMetadata,
}

/// Filter for [`Store::read_all`].
#[derive(Debug, Clone, Default)]
pub struct AllFilter {
    /// Only streams matching this pattern.
    pub stream: Option<StreamPattern>,
    /// Only these event types (any of them); empty means all.
    pub event_types: Vec<EventType>,
    /// Include system (`$`) streams.
    pub include_system: bool,
}

impl AllFilter {
    /// Whether `event` passes.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        if event.stream.is_system() && !self.include_system {
            return false;
        }
        if let Some(pattern) = &self.stream
            && !pattern.matches(&event.stream)
        {
            return false;
        }
        self.event_types.is_empty() || self.event_types.contains(&event.event_type)
    }
}

/// A page of `$all`.
#[derive(Debug, Clone)]
pub struct AllSlice {
    /// Matching events.
    pub events: Vec<RecordedEvent>,
    /// Where to continue reading (forward: next position to scan; backward:
    /// the position below the last scanned, `None` at the start). The
    /// position advances over skipped events, so a filtered reader's
    /// checkpoint moves even when nothing matches.
    pub next_position: Option<u64>,
    /// True when the scan reached the end (forward) or the start (backward).
    pub end_of_log: bool,
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Who recorded it (an aggregate type, a transformer name).
    pub source: String,
    /// The stream it summarizes.
    pub stream: StreamName,
    /// The stream version it was taken at.
    pub version: u64,
    /// The state bytes.
    pub state: Vec<u8>,
    /// Its position in the log.
    pub position: u64,
    /// When the node accepted it.
    pub timestamp_ms: u64,
}

/// A snapshot's key and position, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Who recorded it.
    pub source: String,
    /// The stream.
    pub stream: String,
    /// The version.
    pub version: u64,
    /// Its position in the log.
    pub position: u64,
}

/// What [`Store::reclaim`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Records inspected.
    pub scanned: u64,
    /// Segments removed.
    pub segments_removed: usize,
    /// Their bytes.
    pub bytes_removed: u64,
    /// The log's first position afterwards.
    pub start_position: u64,
}

/// What opening found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The index checkpoint found.
    pub checkpoint: u64,
    /// Records replayed from the log into the index.
    pub replayed: u64,
    /// Why the index was rebuilt from the start, if it was.
    pub rebuilt: Option<String>,
}

/// The quiet flush needs `index_flush_events / IDLE_FLUSH_TAIL_DIVISOR`
/// changes in the tail, and a spell in which fewer than that
/// `/ IDLE_FLUSH_GROWTH_DIVISOR` came on top.
const IDLE_FLUSH_TAIL_DIVISOR: usize = 8;
const IDLE_FLUSH_GROWTH_DIVISOR: usize = 64;

/// Events read per step when replaying the log.
const REPLAY_BATCH: usize = 4096;

/// How long the indexer sleeps with nothing due before it looks again
/// (what is due wakes it sooner: a full tail, a waiting writer, closing).
const INDEXER_RECHECK: Duration = Duration::from_secs(1);
/// How soon it looks again when a writer waits for room and the last
/// flush found nothing to write.
const INDEXER_DURABLE_RECHECK: Duration = Duration::from_millis(1);
/// How often a flush waiting for its records to be written checks whether
/// the log failed instead.
const INDEXER_VISIBLE_RECHECK: Duration = Duration::from_millis(100);
/// Upper bound of records scanned by one `read_all` call.
pub const READ_ALL_SCAN_MAX: usize = 65_536;
/// Upper bound of events returned by one read.
pub const READ_COUNT_MAX: usize = 10_000;

/// State guarded by the store lock: the index tail and the next position.
pub(crate) struct Inner {
    pub(crate) tail: Tail,
    /// Next log position (writers append to the log only under this lock).
    pub(crate) next_position: u64,
    pub(crate) closing: bool,
    /// A writer waits for room in the tail: the indexer flushes
    /// whatever is durable, however little.
    pub(crate) waiting_for_tail: bool,
}

pub(crate) struct Shared {
    pub(crate) log: Log,
    pub(crate) index: Index,
    pub(crate) config: StoreConfig,
    pub(crate) inner: Mutex<Inner>,
    /// Signalled when the tail shrinks or the store closes.
    pub(crate) tail_space: Condvar,
    /// Signalled when the tail grows past the flush threshold or the store closes.
    pub(crate) flush_wanted: Condvar,
    /// Set when the index could not be written: the store refuses writes.
    pub(crate) poisoned: AtomicBool,
    /// The durable end as reported by append completions, for waiters.
    pub(crate) durable: Arc<(Mutex<DurableState>, Condvar)>,
    /// Serializes flushes of the tail into the index, and keeps the last
    /// flushed generation (emptied) for the next.
    pub(crate) flush_lock: Mutex<Option<Generation>>,
    /// Writes waiting for the sequencer.
    pub(crate) requests: Mutex<Requests>,
    /// Signalled when a request is queued or the store closes.
    pub(crate) requests_ready: Condvar,
    /// Signalled when the sequencer takes the queue.
    pub(crate) requests_space: Condvar,
    /// Run once by a writer that read the index with the store lock
    /// released, before it takes the lock again (tests put a competing
    /// write and a flush there).
    #[cfg(test)]
    pub(crate) after_unlocked_index_read: Mutex<Option<TestHook>>,
}

/// See `Shared::after_unlocked_index_read`.
#[cfg(test)]
pub(crate) type TestHook = Box<dyn FnOnce(&Shared) + Send>;

/// The event store. `Send + Sync`; share it behind an `Arc`.
pub struct Store {
    pub(crate) shared: Arc<Shared>,
    sequencer: Mutex<Option<JoinHandle<()>>>,
    indexer: Mutex<Option<JoinHandle<()>>>,
    report: OpenReport,
    dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

fn index_read(e: impl std::fmt::Display) -> ReadError {
    ReadError::Index(e.to_string())
}

/// The answer to an append request (the sequencer answers each request
/// with its own kind of outcome).
fn appended(outcome: Outcome) -> AppendResult {
    match outcome {
        Outcome::Append(result) => result,
        other => unreachable!("append answered {other:?}"),
    }
}

pub(crate) fn index_write(e: impl std::fmt::Display) -> WriteError {
    WriteError::Index(e.to_string())
}

impl Store {
    /// Opens the store in `dir` (`dir/log` and `dir/index`).
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Self, StoreOpenError> {
        if config.tail_events_max == 0 || config.index_flush_events == 0 {
            return Err(StoreOpenError::InvalidConfig(
                "tail_events_max and index_flush_events must be positive".into(),
            ));
        }
        let dir = dir.as_ref().to_path_buf();
        let log = Log::open(dir.join("log"), config.log.clone())?;
        let index_path = dir.join("index");
        let index = match Index::open(&index_path, config.index_cache_bytes) {
            Ok(index) => index,
            // A store killed while it first made its index (its log still
            // empty) can leave it half made: fjall's version file present
            // but empty. The index holds nothing the log does not, and the
            // log holds nothing: it is made again.
            Err(_) if log.start_position() == 0 && log.end_position() == 0 => {
                std::fs::remove_dir_all(&index_path).map_err(|e| StoreOpenError::Index {
                    path: index_path.clone(),
                    message: format!("cannot remove the half-made index of an empty store: {e}"),
                })?;
                Index::open(&index_path, config.index_cache_bytes)
                    .map_err(|message| StoreOpenError::Index { path: index_path.clone(), message })?
            }
            Err(message) => return Err(StoreOpenError::Index { path: index_path.clone(), message }),
        };
        let index_error = |message: String| StoreOpenError::Index { path: index_path.clone(), message };
        let mut report = OpenReport { checkpoint: index.checkpoint().map_err(index_error)?, ..OpenReport::default() };
        let (start, end) = (log.start_position(), log.end_position());
        let mut from = report.checkpoint;
        if from > end {
            report.rebuilt = Some(format!("index checkpoint {from} is past the log's end {end}"));
        } else if from < start {
            report.rebuilt = Some(format!("index checkpoint {from} is before the log's start {start}"));
        }
        if report.rebuilt.is_some() {
            index.clear().map_err(index_error)?;
            from = start;
        }
        let shared = Arc::new(Shared {
            log,
            index,
            config,
            inner: Mutex::new(Inner {
                tail: Tail::default(),
                next_position: end,
                closing: false,
                waiting_for_tail: false,
            }),
            tail_space: Condvar::new(),
            flush_wanted: Condvar::new(),
            poisoned: AtomicBool::new(false),
            durable: Arc::new((Mutex::new(DurableState { end, failed: false, waiters: Vec::new() }), Condvar::new())),
            flush_lock: Mutex::new(None),
            requests: Mutex::new(Requests::default()),
            requests_ready: Condvar::new(),
            requests_space: Condvar::new(),
            #[cfg(test)]
            after_unlocked_index_read: Mutex::new(None),
        });
        report.replayed = shared.replay(from, end)?;
        let indexer_shared = Arc::clone(&shared);
        let indexer = std::thread::Builder::new()
            .name("edgebus-indexer".into())
            .spawn(move || indexer_shared.run_indexer())
            .map_err(|e| StoreOpenError::InvalidConfig(format!("cannot start the indexer thread: {e}")))?;
        let sequencer_shared = Arc::clone(&shared);
        let sequencer = std::thread::Builder::new()
            .name("edgebus-sequencer".into())
            .spawn(move || sequencer_shared.run_sequencer())
            .map_err(|e| StoreOpenError::InvalidConfig(format!("cannot start the sequencer thread: {e}")))?;
        Ok(Self { shared, sequencer: Mutex::new(Some(sequencer)), indexer: Mutex::new(Some(indexer)), report, dir })
    }

    /// What opening found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The underlying log (for reads by position and statistics).
    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    /// Reads the events at log positions from `from` on, as they were
    /// written: at most `max_records` of them and, past the first, at most
    /// `max_bytes` of record payload. Unlike [`Store::read_all`] this applies
    /// no filter and no retention, and its positions are contiguous: this is
    /// how the node's live feed follows the log.
    pub fn read_log(&self, from: u64, max_records: usize, max_bytes: u64) -> Result<Vec<RecordedEvent>, ReadError> {
        let records = self.shared.log.read(from, max_records, max_bytes)?;
        let mut events = Vec::with_capacity(records.len());
        for record in records {
            events.push(record::decode_event(&record.payload, record.position)?);
        }
        Ok(events)
    }

    /// Appends `events` to `stream` atomically if `expected` holds. Retrying
    /// the same events (same ids, same content) after a lost acknowledgement
    /// returns the original result and writes nothing.
    pub fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, WriteError> {
        if stream.is_system() {
            return Err(WriteError::ReservedStream { stream: stream.clone() });
        }
        self.shared.check_append(&events)?;
        Ok(appended(self.shared.execute(Request::Append { stream: stream.clone(), expected, events })?))
    }

    /// [`Store::append`] for async callers: the returned future queues the
    /// write and is woken when it is answered, so no thread is blocked
    /// while the write waits for the disk.
    pub fn append_async(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> PendingWrite<AppendResult> {
        let request = if stream.is_system() {
            Err(WriteError::ReservedStream { stream: stream.clone() })
        } else {
            self.shared.check_append(&events).map(|()| Request::Append { stream: stream.clone(), expected, events })
        };
        PendingWrite::new(Arc::clone(&self.shared), request, appended)
    }

    /// Appends `events` to a system stream that the node owns (such as
    /// `$groups.orders.checkpoint`), with the same atomicity, expected
    /// version and idempotency as [`Store::append`]. The store's own system
    /// streams (`$sys.*`, `$snapshots.*`) carry its commands and take no
    /// writes here; a client name is refused too: the node writes client
    /// streams with [`Store::append`].
    pub fn append_system(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, WriteError> {
        Ok(appended(self.shared.execute(self.system_append(stream, expected, events)?)?))
    }

    /// [`Store::append_system`] for async callers, as
    /// [`Store::append_async`] is for [`Store::append`].
    pub fn append_system_async(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> PendingWrite<AppendResult> {
        let request = self.system_append(stream, expected, events);
        PendingWrite::new(Arc::clone(&self.shared), request, appended)
    }

    /// The request of an append to a node-owned system stream, or why it
    /// is refused.
    fn system_append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Request, WriteError> {
        let name = stream.as_str();
        if !stream.is_system() || name.starts_with("$sys.") || name.starts_with(SNAPSHOTS_PREFIX) {
            return Err(WriteError::InvalidArgument(format!(
                "append_system writes node-owned system streams; {name} is not one"
            )));
        }
        self.shared.check_append(&events)?;
        Ok(Request::Append { stream: stream.clone(), expected, events })
    }

    /// Writes `event` at version `index` of `stream` iff `index` equals the
    /// number of events in the stream; if an event already sits there, says
    /// so and whether it has the same content; `index` beyond the end is a
    /// [`WriteError::Gap`].
    pub fn exists_or_write(
        &self,
        stream: &StreamName,
        index: u64,
        event: NewEvent,
    ) -> Result<ExistsOrWrite, WriteError> {
        if stream.is_system() {
            return Err(WriteError::ReservedStream { stream: stream.clone() });
        }
        event.validate()?;
        match self.shared.execute(Request::ExistsOrWrite { stream: stream.clone(), index, event })? {
            Outcome::ExistsOrWrite(result) => Ok(result),
            other => unreachable!("exists_or_write answered {other:?}"),
        }
    }

    /// [`Store::exists_or_write`] for async callers (see [`Store::append_async`]).
    pub fn exists_or_write_async(
        &self,
        stream: &StreamName,
        index: u64,
        event: NewEvent,
    ) -> PendingWrite<ExistsOrWrite> {
        let request = if stream.is_system() {
            Err(WriteError::ReservedStream { stream: stream.clone() })
        } else {
            event.validate().map_err(WriteError::from).map(|()| Request::ExistsOrWrite {
                stream: stream.clone(),
                index,
                event,
            })
        };
        PendingWrite::new(Arc::clone(&self.shared), request, |outcome| match outcome {
            Outcome::ExistsOrWrite(result) => result,
            other => unreachable!("exists_or_write answered {other:?}"),
        })
    }

    /// Writes events replicated from their home sites, each with
    /// exists-or-write at its origin version: the stream becomes (or must
    /// already be) a read-only replica of `origin.site`, which local writes
    /// are refused. An origin version beyond the replica's end is not a
    /// gap but a stream that was sent sparse before (sampled, compacted):
    /// the event goes after the last one unless its id is already in the
    /// stream, and its origin note says `origin version N after a gap`. All requests are queued together, so the sequencer
    /// takes them in one pass and the log commits them in one batch; each
    /// gets its own answer, in order.
    pub fn replicate(&self, writes: Vec<ReplicaWrite>) -> Vec<Result<ExistsOrWrite, WriteError>> {
        let mut answers: Vec<Option<Result<ExistsOrWrite, WriteError>>> = Vec::with_capacity(writes.len());
        let mut requests = Vec::with_capacity(writes.len());
        for ReplicaWrite { stream, version, event, origin } in writes {
            let refused = if stream.is_system() {
                Some(WriteError::ReservedStream { stream })
            } else if let Err(e) = event.validate() {
                Some(e.into())
            } else {
                requests.push(Request::Replica { stream, index: version, event, origin });
                None
            };
            answers.push(refused.map(Err));
        }
        let mut outcomes = self.shared.execute_many(requests).into_iter();
        answers
            .into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| match outcomes.next().expect("one outcome per request") {
                    Ok(Outcome::ExistsOrWrite(result)) => Ok(result),
                    Ok(other) => unreachable!("replicate answered {other:?}"),
                    Err(e) => Err(e),
                })
            })
            .collect()
    }

    /// Sets the retention metadata of `stream` (which need not exist yet).
    pub fn set_stream_metadata(
        &self,
        stream: &StreamName,
        metadata: StreamMetadata,
        timestamp_ms: u64,
    ) -> Result<u64, WriteError> {
        if stream.is_system() {
            return Err(WriteError::ReservedStream { stream: stream.clone() });
        }
        let target = stream.clone();
        self.command(
            STREAMS_STREAM,
            stream,
            timestamp_ms,
            // A tombstoned stream takes no writes at all, metadata included.
            Box::new(move |state: &StreamState| {
                if state.tombstoned {
                    return Err(WriteError::StreamDeleted { stream: target });
                }
                Ok(Command::Metadata { stream: target, metadata })
            }),
        )
    }

    /// Deletes `stream`: soft (`hard == false`: reads see nothing until it is
    /// written again, and versions continue) or hard (tombstone: every later
    /// write fails with [`WriteError::StreamDeleted`]).
    pub fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        hard: bool,
        timestamp_ms: u64,
    ) -> Result<u64, WriteError> {
        if stream.is_system() {
            return Err(WriteError::ReservedStream { stream: stream.clone() });
        }
        let target = stream.clone();
        let build = move |state: &StreamState| {
            if state.tombstoned {
                return Err(WriteError::StreamDeleted { stream: target });
            }
            expected
                .check(state.current_version())
                .map_err(|source| WriteError::WrongExpectedVersion { stream: target.clone(), source })?;
            if hard {
                Ok(Command::Tombstoned { stream: target })
            } else if state.current_version().is_none() {
                Err(WriteError::StreamNotFound { stream: target })
            } else {
                Ok(Command::Deleted { stream: target, truncate_before: state.next_version })
            }
        };
        self.command(STREAMS_STREAM, stream, timestamp_ms, Box::new(build))
    }

    fn command(
        &self,
        system_stream: &str,
        target: &StreamName,
        timestamp_ms: u64,
        build: CommandBuilder,
    ) -> Result<u64, WriteError> {
        let stream = StreamName::system(system_stream).map_err(|e| WriteError::InvalidArgument(e.to_string()))?;
        let request = Request::Command { stream, target: target.clone(), timestamp_ms, build };
        match self.shared.execute(request)? {
            Outcome::Position(position) => Ok(position),
            other => unreachable!("command answered {other:?}"),
        }
    }

    /// The visible state of `stream`, or `None` if it was never written.
    pub fn stream_info(&self, stream: &StreamName) -> Result<Option<StreamInfo>, ReadError> {
        let state = self.shared.state(stream.as_str()).map_err(index_read)?;
        Ok(state.map(|s| StreamInfo {
            stream: stream.clone(),
            current_version: s.current_version(),
            first_visible_version: s.first_visible_version(),
            deleted: s.deleted,
            tombstoned: s.tombstoned,
            metadata: s.metadata,
        }))
    }

    /// Reads up to `max_count` events of `stream`. `now_ms` is the reader's
    /// clock, used only to apply `max_age`.
    pub fn read_stream(
        &self,
        stream: &StreamName,
        from: StreamFrom,
        direction: Direction,
        max_count: usize,
        now_ms: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let max_count = max_count.min(READ_COUNT_MAX);
        let shared = &self.shared;
        let state = shared.state(stream.as_str()).map_err(index_read)?;
        let Some(state) = state else { return Err(ReadError::StreamNotFound { stream: stream.clone() }) };
        if state.tombstoned {
            return Err(ReadError::StreamDeleted { stream: stream.clone() });
        }
        if state.current_version().is_none() {
            return Err(ReadError::StreamNotFound { stream: stream.clone() });
        }
        let first = state.first_visible_version();
        let next = state.next_version;
        let min_timestamp = state.metadata.max_age_ms.map_or(0, |age| now_ms.saturating_sub(age));
        let mut out = Vec::new();
        if max_count == 0 || first >= next {
            return Ok(out);
        }
        match direction {
            Direction::Forward => {
                let mut at = match from {
                    StreamFrom::Start => first,
                    StreamFrom::End => next,
                    StreamFrom::Version(v) => v.max(first),
                };
                // Events too old for max_age are skipped; the scan is bounded
                // so one read never walks an unbounded expired prefix.
                let scan_end = next.min(at.saturating_add(READ_ALL_SCAN_MAX as u64));
                while at < scan_end && out.len() < max_count {
                    let to = scan_end.min(at + (max_count - out.len()) as u64);
                    let page = shared.read_versions(stream, at, to)?;
                    out.extend(page.into_iter().filter(|e| e.timestamp_ms >= min_timestamp));
                    at = to;
                }
            }
            Direction::Backward => {
                let mut upper = match from {
                    StreamFrom::Start | StreamFrom::End => next,
                    StreamFrom::Version(v) => v.saturating_add(1).min(next),
                };
                while upper > first && out.len() < max_count {
                    let lower = upper.saturating_sub((max_count - out.len()) as u64).max(first);
                    let page = shared.read_versions(stream, lower, upper)?;
                    let before = out.len();
                    out.extend(page.into_iter().rev().filter(|e| e.timestamp_ms >= min_timestamp));
                    if out.len() == before && min_timestamp > 0 {
                        // A whole page too old: the events below it are older
                        // still (the node stamps time in log order).
                        break;
                    }
                    upper = lower;
                }
            }
        }
        Ok(out)
    }

    /// Reads `$all` from `from` (inclusive), returning matching events and
    /// where to continue. Scans at most [`READ_ALL_SCAN_MAX`] records.
    pub fn read_all(
        &self,
        from: u64,
        direction: Direction,
        max_count: usize,
        filter: &AllFilter,
    ) -> Result<AllSlice, ReadError> {
        let max_count = max_count.min(READ_COUNT_MAX);
        let log = &self.shared.log;
        let end = log.end_position();
        let mut events = Vec::new();
        let mut scanned = 0usize;
        match direction {
            Direction::Forward => {
                let mut at = from.max(log.start_position());
                if !filter.event_types.is_empty() {
                    // The type index covers positions below its checkpoint.
                    let indexed_end = self.shared.index.checkpoint().map_err(index_read)?.min(end);
                    while at < indexed_end && events.len() < max_count && scanned < READ_ALL_SCAN_MAX {
                        let mut candidates = Vec::new();
                        for event_type in &filter.event_types {
                            candidates.extend(
                                self.shared
                                    .index
                                    .type_positions(event_type.as_str(), at, indexed_end, READ_COUNT_MAX)
                                    .map_err(index_read)?,
                            );
                        }
                        candidates.sort_unstable();
                        candidates.truncate(READ_COUNT_MAX);
                        let Some(&last_candidate) = candidates.last() else {
                            at = indexed_end;
                            break;
                        };
                        let full_page = candidates.len() == READ_COUNT_MAX;
                        for position in candidates {
                            scanned += 1;
                            at = position + 1;
                            let event = self.shared.read_position(position)?;
                            if filter.matches(&event) && self.is_visible(&event)? {
                                events.push(event);
                                if events.len() >= max_count {
                                    break;
                                }
                            }
                        }
                        if !full_page && at > last_candidate && events.len() < max_count {
                            at = indexed_end;
                        }
                    }
                }
                while at < end && events.len() < max_count && scanned < READ_ALL_SCAN_MAX {
                    let records = log.read(at, (READ_ALL_SCAN_MAX - scanned).min(1024), 4 * 1024 * 1024)?;
                    let Some(last) = records.last() else { break };
                    let last_position = last.position;
                    for record in records {
                        scanned += 1;
                        at = record.position + 1;
                        let event = record::decode_event(&record.payload, record.position)?;
                        if filter.matches(&event) && self.is_visible(&event)? {
                            events.push(event);
                            if events.len() >= max_count {
                                break;
                            }
                        }
                    }
                    debug_assert!(at <= last_position + 1);
                }
                Ok(AllSlice { events, end_of_log: at >= end, next_position: Some(at) })
            }
            Direction::Backward => {
                let start = log.start_position();
                let mut upper = from.saturating_add(1).min(end); // exclusive
                while upper > start && events.len() < max_count && scanned < READ_ALL_SCAN_MAX {
                    let records =
                        log.read_backward(upper - 1, (READ_ALL_SCAN_MAX - scanned).min(1024), 4 * 1024 * 1024)?;
                    if records.is_empty() {
                        break;
                    }
                    for record in records {
                        scanned += 1;
                        upper = record.position;
                        let event = record::decode_event(&record.payload, record.position)?;
                        if filter.matches(&event) && self.is_visible(&event)? {
                            events.push(event);
                            if events.len() >= max_count {
                                break;
                            }
                        }
                    }
                }
                let end_of_log = upper <= start;
                Ok(AllSlice { events, end_of_log, next_position: (!end_of_log).then(|| upper - 1) })
            }
        }
    }

    /// Whether a stream's retention still shows `event` (clock-free rules only).
    fn is_visible(&self, event: &RecordedEvent) -> Result<bool, ReadError> {
        if event.stream.is_system() {
            return Ok(true);
        }
        let state = self.shared.state(event.stream.as_str()).map_err(index_read)?.unwrap_or_default();
        Ok(!state.tombstoned && event.version >= state.first_visible_version())
    }

    /// Records a snapshot of `stream` at `version` from `source`.
    pub fn record_snapshot(
        &self,
        source: &str,
        stream: &StreamName,
        version: u64,
        state: Vec<u8>,
        timestamp_ms: u64,
    ) -> Result<u64, WriteError> {
        let snapshots = snapshot_stream(source)?;
        let target = stream.clone();
        let build = move |_: &StreamState| Ok(Command::Snapshot { stream: target, version, state });
        self.command(snapshots.as_str(), stream, timestamp_ms, Box::new(build))
    }

    /// The latest snapshot of `stream` from `source` at or below `at_or_below`
    /// (any version if `None`).
    pub fn read_snapshot(
        &self,
        source: &str,
        stream: &StreamName,
        at_or_below: Option<u64>,
    ) -> Result<Snapshot, ReadError> {
        let not_found = || ReadError::SnapshotNotFound { source_name: source.to_owned(), stream: stream.clone() };
        snapshot_stream(source).map_err(|e| ReadError::InvalidArgument(e.to_string()))?;
        let upper = at_or_below.unwrap_or(u64::MAX);
        let shared = &self.shared;
        // Tail candidates (they override the index for equal keys). The tail
        // also holds snapshots still being written, whose records cannot be
        // read yet: only those below the log's acknowledged end count.
        let (tail_best, tail_keys) = {
            let inner = lock(&shared.inner);
            let durable_end = shared.log.end_position();
            let low = (source.into(), stream.as_str().into(), 0u64);
            let high = (source.into(), stream.as_str().into(), upper);
            let entries: Vec<(u64, Option<u64>)> = inner
                .tail
                .snapshots
                .range(low..=high)
                .filter(|(_, (op_position, _))| *op_position < durable_end)
                .map(|((_, _, v), (_, p))| (*v, *p))
                .collect();
            let best = entries.iter().rev().find_map(|(v, p)| p.map(|p| (*v, p)));
            let keys: HashSet<u64> = entries.iter().map(|(v, _)| *v).collect();
            (best, keys)
        };
        let start = snapshot_key(source, stream.as_str(), 0);
        // Keys are the prefix and the big-endian version; appending a zero
        // byte makes the exclusive end include `upper` itself.
        let mut end = snapshot_key(source, stream.as_str(), upper);
        end.push(0);
        let mut index_best = None;
        loop {
            let page = shared.index.snapshots(&start, Some(&end), true, 64).map_err(index_read)?;
            let Some(last) = page.last() else { break };
            if let Some(found) = page.iter().find(|(_, _, v, _)| !tail_keys.contains(v)) {
                index_best = Some((found.2, found.3));
                break;
            }
            end = snapshot_key(source, stream.as_str(), last.2);
        }
        let best = match (tail_best, index_best) {
            (Some(t), Some(i)) => Some(if t.0 >= i.0 { t } else { i }),
            (t, i) => t.or(i),
        };
        let Some((version, position)) = best else { return Err(not_found()) };
        let event = shared.read_position(position)?;
        match Command::decode(&event)? {
            Some(Command::Snapshot { stream: s, version: v, state }) if s == *stream && v == version => Ok(Snapshot {
                source: source.to_owned(),
                stream: stream.clone(),
                version,
                state,
                position,
                timestamp_ms: event.timestamp_ms,
            }),
            _ => Err(ReadError::Index(format!(
                "snapshot index points at position {position}, which is not that snapshot"
            ))),
        }
    }

    /// Deletes the snapshot of `stream` at `version` from `source`.
    pub fn delete_snapshot(
        &self,
        source: &str,
        stream: &StreamName,
        version: u64,
        timestamp_ms: u64,
    ) -> Result<u64, WriteError> {
        let snapshots_stream = snapshot_stream(source)?;
        match self.read_snapshot(source, stream, Some(version)) {
            Ok(s) if s.version == version => {}
            _ => {
                return Err(WriteError::SnapshotNotFound {
                    source_name: source.to_owned(),
                    stream: stream.clone(),
                    version,
                });
            }
        }
        let target = stream.clone();
        let build = move |_: &StreamState| Ok(Command::SnapshotDeleted { stream: target, version });
        self.command(snapshots_stream.as_str(), stream, timestamp_ms, Box::new(build))
    }

    /// Lists snapshots, optionally of one source and of streams matching a
    /// pattern, in (source, stream, version) order, at most `limit`.
    pub fn list_snapshots(
        &self,
        source: Option<&str>,
        stream: Option<&StreamPattern>,
        limit: usize,
    ) -> Result<Vec<SnapshotInfo>, ReadError> {
        let shared = &self.shared;
        // As in `read_snapshot`: snapshots still being written are not listed yet.
        let tail: Vec<((String, String, u64), Option<u64>)> = {
            let inner = lock(&shared.inner);
            let durable_end = shared.log.end_position();
            inner
                .tail
                .snapshots
                .iter()
                .filter(|(_, (op_position, _))| *op_position < durable_end)
                .map(|((s, t, v), (_, p))| ((s.to_string(), t.to_string(), *v), *p))
                .collect()
        };
        let tail_keys: HashSet<(String, String, u64)> = tail.iter().map(|(k, _)| k.clone()).collect();
        let prefix = source.map(|s| {
            let mut p = s.as_bytes().to_vec();
            p.push(0);
            p
        });
        let mut merged = std::collections::BTreeMap::new();
        let start = prefix.clone().unwrap_or_default();
        let end = prefix.map(|mut p| {
            *p.last_mut().expect("non-empty") = 1;
            p
        });
        let mut cursor = start;
        loop {
            let page = shared.index.snapshots(&cursor, end.as_deref(), false, 1024).map_err(index_read)?;
            let Some(last) = page.last().cloned() else { break };
            for (s, t, v, p) in page {
                if !tail_keys.contains(&(s.clone(), t.clone(), v)) {
                    merged.insert((s, t, v), p);
                }
            }
            cursor = snapshot_key(&last.0, &last.1, last.2);
            cursor.push(0);
            if merged.len() > limit.saturating_mul(4).max(4096) {
                break;
            }
        }
        for (key, position) in tail {
            if let Some(position) = position {
                merged.insert(key, position);
            }
        }
        Ok(merged
            .into_iter()
            .filter(|((s, t, _), _)| source.is_none_or(|want| want == s) && stream.is_none_or(|p| p.matches_str(t)))
            .take(limit)
            .map(|((source, stream, version), position)| SnapshotInfo { source, stream, version, position })
            .collect())
    }

    /// Streams and their states, in name order, after `after`, at most `limit`
    /// (system streams only if `include_system`).
    pub fn list_streams(
        &self,
        after: Option<&str>,
        limit: usize,
        include_system: bool,
    ) -> Result<Vec<StreamInfo>, ReadError> {
        let shared = &self.shared;
        let mut merged = std::collections::BTreeMap::new();
        {
            let inner = lock(&shared.inner);
            for (name, state) in inner.tail.stream_states() {
                if after.is_none_or(|a| name.as_ref() > a) {
                    merged.insert(name.to_string(), *state);
                }
            }
        }
        let mut cursor = after.map(str::to_owned);
        let mut from_index = 0;
        while from_index < limit.saturating_mul(2) {
            let page = shared.index.stream_states(cursor.as_deref(), 1024).map_err(index_read)?;
            let Some((last, _)) = page.last().cloned() else { break };
            for (name, state) in page {
                from_index += 1;
                merged.entry(name).or_insert(state);
            }
            cursor = Some(last);
        }
        Ok(merged
            .into_iter()
            .filter_map(|(name, s)| {
                let stream = StreamName::system(&name).ok()?;
                (include_system || !stream.is_system()).then_some(StreamInfo {
                    stream,
                    current_version: s.current_version(),
                    first_visible_version: s.first_visible_version(),
                    deleted: s.deleted,
                    tombstoned: s.tombstoned,
                    metadata: s.metadata,
                })
            })
            .take(limit)
            .collect())
    }

    /// Reclaims space: removes the oldest sealed log segments in which every
    /// record is dead, and returns what it did. An event is dead when its
    /// stream is tombstoned, or its version is below the stream's first
    /// visible version, or it is older than the stream's `max_age` at
    /// `now_ms`; a snapshot record is dead once the snapshot was deleted.
    /// Stream commands (`$sys.streams`) are kept: they carry each stream's
    /// retention and delete state for an index rebuild. Only a prefix of the
    /// log can be removed, so the first live segment stops the sweep.
    pub fn reclaim(&self, now_ms: u64) -> Result<ReclaimReport, ReadError> {
        let mut report = ReclaimReport::default();
        let mut remove_before = None;
        for segment in self.shared.log.segments() {
            if !segment.sealed {
                break;
            }
            let mut at = segment.base_position;
            let mut live = false;
            while at < segment.end_position && !live {
                let records = self.shared.log.read(at, 4096, 16 * 1024 * 1024)?;
                let Some(last) = records.last() else { break };
                at = last.position + 1;
                for record in records.iter().take_while(|r| r.position < segment.end_position) {
                    report.scanned += 1;
                    let event = record::decode_event(&record.payload, record.position)?;
                    if self.is_live(&event, now_ms)? {
                        live = true;
                        break;
                    }
                }
            }
            if live {
                break;
            }
            remove_before = Some(segment.end_position);
            report.segments_removed += 1;
            report.bytes_removed += segment.bytes;
        }
        report.start_position = match remove_before {
            Some(position) => self
                .shared
                .log
                .remove_segments_before(position)
                .map_err(|e| ReadError::Index(format!("removing reclaimed segments: {e}")))?,
            None => self.shared.log.start_position(),
        };
        Ok(report)
    }

    fn is_live(&self, event: &RecordedEvent, now_ms: u64) -> Result<bool, ReadError> {
        if event.stream.as_str() == STREAMS_STREAM {
            return Ok(true);
        }
        if event.stream.as_str().starts_with(SNAPSHOTS_PREFIX) {
            return Ok(match Command::decode(event)? {
                Some(Command::Snapshot { stream, version, .. }) => {
                    let source = &event.stream.as_str()[SNAPSHOTS_PREFIX.len()..];
                    self.read_snapshot(source, &stream, Some(version)).is_ok_and(|s| s.position == event.position)
                }
                _ => false,
            });
        }
        let state = self.shared.state(event.stream.as_str()).map_err(index_read)?.unwrap_or_default();
        let too_old = state.metadata.max_age_ms.is_some_and(|age| event.timestamp_ms < now_ms.saturating_sub(age));
        Ok(!state.tombstoned && event.version >= state.first_visible_version() && !too_old)
    }

    /// Moves everything durable into the on-disk index now.
    pub fn flush_index(&self) -> Result<(), ReadError> {
        self.shared.flush().map(drop).map_err(ReadError::Index)
    }

    /// A digest of the whole index state (after a flush): equal digests mean
    /// equal states. For tests of determinism and recovery.
    pub fn index_digest(&self) -> Result<u64, ReadError> {
        self.flush_index()?;
        let streams = self.list_streams(None, usize::MAX, true)?;
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut mix = |bytes: &[u8]| {
            for b in bytes {
                hash = (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        };
        for info in &streams {
            mix(info.stream.as_str().as_bytes());
            mix(format!("{info:?}").as_bytes());
            let state = self.shared.state(info.stream.as_str()).map_err(index_read)?.unwrap_or_default();
            mix(&state.next_version.to_le_bytes());
            for (version, entry) in
                self.shared.index.versions(info.stream.as_str(), 0, state.next_version).map_err(index_read)?
            {
                mix(&version.to_le_bytes());
                mix(&entry.position.to_le_bytes());
                mix(&entry.content_hash.to_le_bytes());
            }
        }
        for snapshot in self.list_snapshots(None, None, usize::MAX)? {
            mix(format!("{snapshot:?}").as_bytes());
        }
        Ok(hash)
    }

    /// Most write requests that wait for the sequencer at once; writers
    /// beyond it wait for room.
    pub const QUEUE_REQUESTS_MAX: usize = crate::writer::REQUESTS_QUEUED_MAX;

    /// Write requests (async appends and exists-or-writes, replicated
    /// events) waiting for the sequencer right now, at most
    /// [`Store::QUEUE_REQUESTS_MAX`]. What the sequencer has passed on, and
    /// what threads wrote themselves, waits in the log's
    /// [`append_queue`](edgebus_log::Log::append_queue).
    pub fn queue_depth(&self) -> usize {
        self.shared.requests.lock().items.len()
    }

    /// Index changes in the in-memory tail (written to the log, not yet
    /// flushed to the index), at most [`StoreConfig::tail_events_max`]
    /// unless one write holds more.
    pub fn index_tail(&self) -> usize {
        self.shared.inner.lock().tail.len()
    }

    /// What the index holds in memory: pinned filters and block indexes,
    /// the block cache, and its table count.
    pub fn index_memory(&self) -> IndexMemory {
        self.shared.index.memory()
    }

    /// Whether the store takes writes: false once it is closing, after an
    /// index failure or a panic while processing a write, and once its log takes no
    /// appends (closed, or poisoned by a failed write or `fdatasync`).
    pub fn accepts_writes(&self) -> bool {
        !self.shared.poisoned.load(Ordering::Acquire)
            && !self.shared.requests.lock().closing
            && self.shared.log.append_queue().accepting
    }

    /// Stops taking writes, flushes the index and closes the log. Idempotent.
    /// The directory stays locked until the `Store` is dropped.
    pub fn close(&self) -> Result<(), WriteError> {
        let space_waiters = {
            let mut requests = self.shared.requests.lock();
            requests.closing = true;
            std::mem::take(&mut requests.space_waiters)
        };
        self.shared.requests_ready.notify_all();
        self.shared.notify_space(space_waiters);
        if let Some(handle) = lock(&self.sequencer).take() {
            handle.join().expect("sequencer thread panicked");
        }
        {
            let mut inner = lock(&self.shared.inner);
            inner.closing = true;
        }
        self.shared.flush_wanted.notify_all();
        self.shared.tail_space.notify_all();
        if let Some(handle) = lock(&self.indexer).take() {
            handle.join().expect("indexer thread panicked");
        }
        self.shared.log.close().map_err(|e| WriteError::Unavailable(AppendError::Io(e)))?;
        self.shared.flush().map_err(index_write)?;
        self.shared.index.persist().map_err(index_write)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn snapshot_stream(source: &str) -> Result<StreamName, WriteError> {
    if source.is_empty() || source.contains('$') {
        return Err(WriteError::InvalidArgument(format!(
            "snapshot source {source:?} must be a non-empty name without '$'"
        )));
    }
    StreamName::system(&format!("{SNAPSHOTS_PREFIX}{source}"))
        .map_err(|e| WriteError::InvalidArgument(format!("snapshot source {source:?} is not a valid name: {e}")))
}

impl Shared {
    pub(crate) fn state(&self, stream: &str) -> Result<Option<StreamState>, String> {
        let inner = lock(&self.inner);
        inner.tail.state(&self.index, stream)
    }

    /// Reads and decodes the event at `position`.
    pub(crate) fn read_position(&self, position: u64) -> Result<RecordedEvent, ReadError> {
        let records = self.log.read(position, 1, u64::MAX)?;
        let record = records
            .into_iter()
            .next()
            .filter(|r| r.position == position)
            .ok_or_else(|| ReadError::Index(format!("position {position} is not in the log")))?;
        Ok(record::decode_event(&record.payload, position)?)
    }

    /// Reads versions `from..to` of `stream` (durable ones only).
    fn read_versions(&self, stream: &StreamName, from: u64, to: u64) -> Result<Vec<RecordedEvent>, ReadError> {
        let (tail_entries, tail_first) = {
            let inner = lock(&self.inner);
            inner.tail.versions(stream.as_str(), from, to)
        };
        let mut entries: Vec<(u64, VersionEntry)> =
            self.index.versions(stream.as_str(), from, tail_first).map_err(index_read)?;
        entries.extend(tail_entries);
        let end = self.log.end_position();
        // Versions whose records were reclaimed were dead: skip them.
        let start = self.log.start_position();
        entries.retain(|(_, entry)| entry.position >= start);
        let mut out = Vec::with_capacity(entries.len());
        let mut i = 0;
        while i < entries.len() {
            let (_, first) = entries[i];
            if first.position >= end {
                break;
            }
            // Read runs of consecutive positions with one log read.
            let mut run = 1;
            while i + run < entries.len()
                && entries[i + run].1.position == first.position + run as u64
                && entries[i + run].1.position < end
            {
                run += 1;
            }
            let records = self.log.read(first.position, run, u64::MAX)?;
            for (record, (version, entry)) in records.iter().zip(&entries[i..i + run]) {
                assert_eq!(record.position, entry.position, "log read returns the positions asked for");
                let event = record::decode_event(&record.payload, record.position)?;
                if event.stream != *stream || event.version != *version {
                    return Err(ReadError::Index(format!(
                        "index says {stream}@{version} is at position {}, but the log holds {}@{} there",
                        entry.position, event.stream, event.version
                    )));
                }
                out.push(event);
            }
            i += run;
        }
        Ok(out)
    }

    /// Replays log records `from..end` into the tail, flushing as it goes.
    fn replay(&self, from: u64, end: u64) -> Result<u64, StoreOpenError> {
        let mut at = from;
        let mut replayed = 0;
        while at < end {
            let records = self.log.read(at, REPLAY_BATCH, 16 * 1024 * 1024).map_err(ReadError::from)?;
            let Some(last) = records.last() else { break };
            at = last.position + 1;
            let mut inner = lock(&self.inner);
            for record in &records {
                let event = record::decode_event(&record.payload, record.position).map_err(ReadError::from)?;
                let command = Command::decode(&event).map_err(ReadError::from)?;
                let applied = Applied {
                    stream: &event.stream,
                    version: event.version,
                    position: event.position,
                    id: event.id,
                    event_type: event.event_type.as_str(),
                    content_hash: event.content_hash(),
                    command: command.as_ref(),
                    origin: event.origin.as_ref().map_or(0, |o| o.site.id()),
                };
                inner.tail.apply(&self.index, &applied).map_err(ReadError::Index)?;
                replayed += 1;
            }
            let full = inner.tail.unflushed() >= self.config.index_flush_events;
            drop(inner);
            if full {
                self.flush().map_err(ReadError::Index)?;
            }
        }
        self.flush().map_err(ReadError::Index)?;
        Ok(replayed)
    }

    /// Moves the tail's current generation into the index: whether there
    /// was anything to write. The store lock is held only to freeze the
    /// generation and to drop it once committed, never while it is written.
    fn flush(&self) -> Result<bool, String> {
        self.flush_keeping(Spare::Keep)
    }

    /// [`Self::flush`], keeping the emptied generation's capacity for the
    /// next one or giving it back.
    fn flush_keeping(&self, spare_use: Spare) -> Result<bool, String> {
        // One flush at a time: the indexer and `flush_index` both flush. The
        // lock keeps the last flushed generation, emptied, for the next one.
        let mut spare = self.flush_lock.lock();
        let next = match spare_use {
            Spare::Keep => spare.take().unwrap_or_default(),
            Spare::Release => {
                *spare = None;
                Generation::default()
            }
        };
        let batch = {
            let mut inner = lock(&self.inner);
            let visible_end = self.log.end_position();
            inner.tail.freeze(visible_end, next)
        };
        let Some(batch) = batch else {
            return Err("an earlier flush of the index failed; the store takes no more writes".to_owned());
        };
        if batch.is_empty() && batch.checkpoint == self.index.checkpoint()? {
            return Ok(false);
        }
        // The index only takes records readers can see; those of the frozen
        // generation that the log is still writing become visible within
        // one log batch.
        let committed =
            self.wait_visible(batch.checkpoint).and_then(|()| self.index.commit(batch.writes(), batch.checkpoint));
        if let Err(e) = committed {
            self.poisoned.store(true, Ordering::Release);
            return Err(e);
        }
        lock(&self.inner).tail.drop_frozen();
        self.tail_space.notify_all();
        if spare_use == Spare::Keep {
            *spare = batch.into_generation();
        }
        Ok(true)
    }

    /// Waits until every position below `end` is visible in the log (under
    /// `fsync = always`: durable); fails if the log failed an append first.
    fn wait_visible(&self, end: u64) -> Result<(), String> {
        let Some(last) = end.checked_sub(1) else { return Ok(()) };
        loop {
            if self.log.wait_for_end(last, INDEXER_VISIBLE_RECHECK) > last {
                return Ok(());
            }
            if self.durable.0.lock().failed {
                return Err(format!("the log failed before position {last} was written, so it cannot be indexed"));
            }
        }
    }

    /// Flushes the tail when it holds `index_flush_events` changes, when
    /// a writer waits for room in it, every `index_flush_interval` if
    /// one is set, and when the site went quiet (`index_idle_flush`).
    fn run_indexer(&self) {
        let mut last_flush = Instant::now();
        // The last flush found nothing durable to write.
        let mut found_nothing = false;
        // The unflushed count at the start of the current quiet spell, and
        // when that started: a spell lasts while fewer than `quiet_growth`
        // changes come on top. Whether the spell gave the tail's memory back.
        let (mut seen, mut seen_since, mut released) = (0usize, Instant::now(), false);
        let idle_min = (self.config.index_flush_events / IDLE_FLUSH_TAIL_DIVISOR).max(1);
        let quiet_growth = (idle_min / IDLE_FLUSH_GROWTH_DIVISOR).max(1);
        loop {
            let work = {
                let mut inner = lock(&self.inner);
                loop {
                    if inner.closing {
                        return;
                    }
                    let unflushed = inner.tail.unflushed();
                    // A flush lowers the count without ending the spell.
                    if unflushed < seen {
                        seen = unflushed;
                    } else if unflushed - seen >= quiet_growth {
                        (seen, seen_since, released) = (unflushed, Instant::now(), false);
                    }
                    let interval = self.config.index_flush_interval;
                    // How long until the spell counts as quiet, if there is
                    // memory to give back then (a flush if the tail is large
                    // enough, else only the generations' spare room).
                    let quiet_in = self
                        .config
                        .index_idle_flush
                        .filter(|_| !released)
                        .map(|after| after.saturating_sub(seen_since.elapsed()));
                    let busy = unflushed >= self.config.index_flush_events
                        || inner.waiting_for_tail
                        || interval.is_some_and(|interval| last_flush.elapsed() >= interval);
                    let quiet = quiet_in == Some(Duration::ZERO);
                    if busy && !found_nothing {
                        break IndexerWork::Flush(Spare::Keep);
                    }
                    if quiet && unflushed >= idle_min && !found_nothing {
                        released = true;
                        break IndexerWork::Flush(Spare::Release);
                    }
                    if quiet && unflushed < idle_min {
                        released = true;
                        break IndexerWork::Release;
                    }
                    // What is due may not be durable yet, and nothing
                    // signals when it is: look again shortly.
                    let wait = if found_nothing {
                        INDEXER_DURABLE_RECHECK
                    } else {
                        let timed = interval.map(|i| i.saturating_sub(last_flush.elapsed()));
                        [timed, quiet_in].into_iter().flatten().fold(INDEXER_RECHECK, Duration::min)
                    };
                    let _ = self.flush_wanted.wait_for(&mut inner, wait);
                    found_nothing = false;
                }
            };
            let spare_use = match work {
                IndexerWork::Flush(spare_use) => spare_use,
                IndexerWork::Release => {
                    // Too few changes for a flush of their own (their
                    // tables would never be merged): keep them, but not the
                    // room of the bursts before.
                    *self.flush_lock.lock() = None;
                    lock(&self.inner).tail.shrink_to_fit();
                    continue;
                }
            };
            last_flush = Instant::now();
            let flushed = self.flush_keeping(spare_use);
            found_nothing = matches!(flushed, Ok(false));
            if flushed.is_err() {
                // The store is poisoned; writers see it. Nothing more to do.
                self.tail_space.notify_all();
                return;
            }
        }
    }
}

/// What the indexer does once it wakes with something due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexerWork {
    /// Flush the tail's current generation.
    Flush(Spare),
    /// The site went quiet with too little in the tail to flush: drop the
    /// spare generation and shrink the current one to what it holds.
    Release,
}

/// What a flush does with the generation it emptied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spare {
    /// Keeps it, capacity and all, to start the next generation with.
    Keep,
    /// Drops it and starts the next generation empty: the memory goes back.
    Release,
}

#[derive(Debug, Default)]
pub(crate) struct DurableState {
    pub(crate) end: u64,
    pub(crate) failed: bool,
    /// Tasks waiting for positions below `.0` to become durable.
    pub(crate) waiters: Vec<(u64, std::task::Waker)>,
}

impl DurableState {
    /// Takes the waiters whose positions are durable (all of them once the log has failed).
    pub(crate) fn take_ready_waiters(&mut self) -> Vec<std::task::Waker> {
        if self.waiters.is_empty() {
            return Vec::new();
        }
        let (end, failed) = (self.end, self.failed);
        let (ready, waiting) = std::mem::take(&mut self.waiters).into_iter().partition(|(e, _)| failed || *e <= end);
        self.waiters = waiting;
        ready.into_iter().map(|(_, waker)| waker).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgebus_types::EventId;

    fn events(first: u128, last: u128) -> Vec<NewEvent> {
        (first..=last)
            .map(|id| NewEvent {
                id: EventId::from_u128(id),
                event_type: EventType::new("Burst").unwrap(),
                data: b"{}".to_vec(),
                metadata: Vec::new(),
                timestamp_ms: 1_000,
            })
            .collect()
    }

    /// Full flushes at 1024 changes; the quiet flush, after `idle`, at an
    /// eighth of that (128).
    fn quiet_after(idle: Duration) -> StoreConfig {
        StoreConfig { index_flush_events: 1024, index_idle_flush: Some(idle), ..StoreConfig::default() }
    }

    fn kept(store: &Store) -> usize {
        store.shared.flush_lock.lock().as_ref().map_or(0, Generation::capacity)
    }

    fn current(store: &Store) -> usize {
        lock(&store.shared.inner).tail.current().capacity()
    }

    /// A store whose tail is only flushed when a test says so.
    fn flushed_by_hand(dir: &Path) -> Store {
        let config = StoreConfig { index_flush_events: usize::MAX, index_idle_flush: None, ..StoreConfig::default() };
        Store::open(dir, config).unwrap()
    }

    #[test]
    fn a_flush_keeps_the_emptied_generation_unless_told_to_release_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = flushed_by_hand(dir.path());
        let stream = StreamName::new("s.burst").unwrap();
        store.append(&stream, ExpectedVersion::Any, events(1, 1000)).unwrap();
        assert!(store.shared.flush().unwrap());
        assert!(kept(&store) >= 1000, "the emptied generation is kept for the next");
        store.append(&stream, ExpectedVersion::Any, events(1001, 1100)).unwrap();
        assert!(store.shared.flush().unwrap());
        assert!(kept(&store) >= 100 && current(&store) >= 1000, "the kept one was written into");
        store.append(&stream, ExpectedVersion::Any, events(1101, 1200)).unwrap();
        assert!(store.shared.flush_keeping(Spare::Release).unwrap());
        assert_eq!((kept(&store), current(&store)), (0, 0), "released: nothing kept, the next starts empty");
        assert_eq!(store.index_tail(), 0);
        let read = store.read_stream(&stream, StreamFrom::Start, Direction::Forward, 2000, 0).unwrap();
        assert_eq!(read.len(), 1200, "all of it in the index");
    }

    /// A site that went quiet after a burst gives the tail's memory back.
    #[test]
    fn the_quiet_flush_releases_the_tails_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), quiet_after(Duration::from_millis(50))).unwrap();
        store.append(&StreamName::new("s.burst").unwrap(), ExpectedVersion::Any, events(1, 500)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while (store.index_tail() > 0 || kept(&store) > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(store.index_tail(), 0, "the quiet flush emptied the tail");
        assert_eq!((kept(&store), current(&store)), (0, 0), "and kept no generation's tables");
    }

    /// A writer reads what the tail does not hold from the index with the
    /// store lock released. If a flush drops a generation meanwhile, what it
    /// read may be stale: it must read again, not write on it.
    #[test]
    fn a_writer_reads_the_index_again_if_a_flush_finished_while_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = flushed_by_hand(dir.path());
        let stream = StreamName::new("s.contended").unwrap();
        store.append(&stream, ExpectedVersion::Any, events(1, 1)).unwrap();
        assert!(store.shared.flush().unwrap());
        let competing = |write: Request| -> TestHook {
            Box::new(move |shared: &Shared| {
                shared.execute(write).unwrap();
                assert!(shared.flush().unwrap());
            })
        };
        // The state: another writer moves the stream to version 1 and a
        // flush takes it out of the tail while this one reads version 0.
        let write = Request::Append { stream: stream.clone(), expected: ExpectedVersion::Any, events: events(2, 2) };
        *store.shared.after_unlocked_index_read.lock() = Some(competing(write));
        let stale = store.append(&stream, ExpectedVersion::Exact(0), events(3, 3));
        assert!(store.shared.after_unlocked_index_read.lock().is_none(), "the writer read the index unlocked");
        assert!(
            matches!(&stale, Err(WriteError::WrongExpectedVersion { source, .. }) if source.current == Some(1)),
            "the append expecting version 0 is refused with the current version 1, got {stale:?}"
        );
        // An id: another writer writes it and a flush takes it out of the
        // tail while this one finds it unused.
        let other = StreamName::new("s.other").unwrap();
        let write = Request::Append { stream: other.clone(), expected: ExpectedVersion::Any, events: events(4, 4) };
        *store.shared.after_unlocked_index_read.lock() = Some(competing(write));
        let duplicate = store.append(&stream, ExpectedVersion::Any, events(4, 4));
        assert!(
            matches!(&duplicate, Err(WriteError::DuplicateEventId { stream: s, .. }) if *s == other),
            "the id written meanwhile is a duplicate, got {duplicate:?}"
        );
        let read = store.read_stream(&stream, StreamFrom::Start, Direction::Forward, 10, 0).unwrap();
        assert_eq!(read.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1], "nothing was written on stale reads");
    }

    /// An append of many events whose last id was written before and has
    /// left the tail for the index: the write reads the ids without the
    /// lock, and still finds that one.
    #[test]
    fn a_large_append_finds_a_duplicate_id_among_those_read_from_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = flushed_by_hand(dir.path());
        store.append(&StreamName::new("s.first").unwrap(), ExpectedVersion::Any, events(1, 2000)).unwrap();
        assert!(store.shared.flush().unwrap());
        let mut batch = events(5001, 7000);
        batch.push(events(1234, 1234).remove(0));
        let refused = store.append(&StreamName::new("s.second").unwrap(), ExpectedVersion::Any, batch);
        let expected = EventId::from_u128(1234);
        assert!(
            matches!(&refused, Err(WriteError::DuplicateEventId { id, .. }) if *id == expected),
            "the flushed id is a duplicate, got {refused:?}"
        );
        assert_eq!(store.log().end_position(), 2000, "nothing of the refused append was written");
    }

    /// A quiet site with too little in its tail for a flush keeps the
    /// changes in memory but gives back the room of the bursts before.
    #[test]
    fn a_quiet_site_with_a_small_tail_gives_back_the_room_of_earlier_bursts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), quiet_after(Duration::from_millis(200))).unwrap();
        let stream = StreamName::new("s.burst").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // Two full flushes: the second starts the first's emptied generation,
        // with room for 1100, as the current one.
        for burst in 0..2 {
            store.append(&stream, ExpectedVersion::Any, events(burst * 1100 + 1, burst * 1100 + 1100)).unwrap();
            while store.index_tail() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(store.index_tail(), 0, "the full flush emptied the tail");
        }
        // Fewer than the quiet flush's eighth of 1024: they stay in the tail.
        store.append(&stream, ExpectedVersion::Any, events(2201, 2250)).unwrap();
        while kept(&store) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(kept(&store), 0, "the spare generation was let go");
        assert!(current(&store) < 1024, "the current generation holds only what it has");
        assert_eq!(store.index_tail(), 50, "the small tail stays unflushed");
    }
}
