//! The log: open and recover, group-committed appends, reads, segment removal.
//!
//! Lifecycle: [`Log::open`] recovers the directory and starts one writer
//! thread. Appenders put their records on a bounded queue and get their
//! positions at once; the writer takes everything queued as one batch,
//! frames it, writes it with one `write` and (under `fsync = always`) one
//! `fdatasync`, then makes the batch visible to readers and completes its
//! appends. "The writer" is a role (`Queue::writing`) that one thread holds
//! at a time, and with it the active segment: the writer thread, or, under
//! `fsync = interval | never`, a caller of [`Log::write_deferred`] writing
//! what it queued with [`Log::submit_deferred`] (a write to the OS costs
//! less than waking another thread for it). Syncs on the interval and the
//! close are the writer thread's.
//! [`Log::close`] (or drop) drains the queue, syncs and joins the writer.
//! A failed write or `fdatasync` poisons the log: the writer stops and every
//! later append fails until the log is reopened, which runs recovery.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use edgebus_types::limits::{LOG_FRAME_ALIGN_BYTES, LOG_INDEX_STRIDE_BYTES, LOG_SEGMENT_HEADER_BYTES};

use crate::config::{FsyncPolicy, LogConfig};
use crate::error::{AppendError, Corruption, IoFailure, OpenError, ReadError, RemoveError};
use crate::format::{self, FLAG_BATCH_END, FLAG_GROUP_END};
use crate::segment::{self, ScanStop, SegmentMeta};
use crate::storage::{FileStorage, OpenMode, Storage, StorageFile, read_exact_at};

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's position in the log, dense from the log's first position.
    pub position: u64,
    /// The bytes appended.
    pub payload: Bytes,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Position of the first record of the append.
    pub first_position: u64,
    /// Number of records; they hold consecutive positions.
    pub count: u32,
}

impl AppendOutcome {
    /// The positions the append's records hold.
    pub fn positions(&self) -> Range<u64> {
        self.first_position..self.first_position + u64::from(self.count)
    }
}

/// An append queued by [`Log::queue`]: the positions it will hold, and
/// the batch whose acknowledgement [`Log::wait`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an append is only acknowledged once `Log::wait` returns"]
pub struct Queued {
    outcome: AppendOutcome,
    generation: u64,
}

impl Queued {
    /// Where the append will land.
    pub fn outcome(&self) -> AppendOutcome {
        self.outcome
    }
}

/// What recovery found and did when the log was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files found.
    pub segments: usize,
    /// Bytes of the active segment that were scanned.
    pub scanned_bytes: u64,
    /// Sealed segments whose index file was missing or damaged and was rebuilt.
    pub rebuilt_indexes: usize,
    /// A torn tail that was cut off, if any.
    pub truncated: Option<TornTail>,
    /// The log was closed cleanly: the active segment's index was loaded
    /// instead of scanning the segment.
    pub clean_close: bool,
}

/// A torn tail removed by recovery: bytes of a write that never completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub file: PathBuf,
    /// The offset the file was cut at.
    pub offset: u64,
    /// How many bytes were removed.
    pub bytes: u64,
    /// Why the first removed frame was refused.
    pub reason: String,
}

/// One segment as [`Log::segments`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Position of its first record.
    pub base_position: u64,
    /// One past the position of its last visible record.
    pub end_position: u64,
    /// Bytes of the segment file, header included.
    pub bytes: u64,
    /// Sealed segments are never written again and may be removed.
    pub sealed: bool,
}

/// Counters since open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Appends completed successfully.
    pub appends: u64,
    /// Records written.
    pub records: u64,
    /// Bytes written to segment files, framing included.
    pub bytes_written: u64,
    /// `write` batches.
    pub batches: u64,
    /// `fdatasync` calls on segment files.
    pub fsyncs: u64,
    /// Segment rolls.
    pub rolls: u64,
}

/// The append queue at one moment ([`Log::append_queue`]): what was
/// accepted but is not yet acknowledged, for metrics and backpressure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendQueue {
    /// Appends waiting for the writer thread; at most `queue_appends_max`.
    pub appends: usize,
    /// Payload bytes of those appends; at most `queue_bytes_max`.
    pub bytes: u64,
    /// Records that have positions but are not yet visible to readers: the
    /// queued ones and the batch the writer is writing (and syncing); 0 once
    /// the log is poisoned (those appends failed).
    pub records_unacknowledged: u64,
    /// Whether appends are taken: false once the log is closing or poisoned.
    pub accepting: bool,
}

#[derive(Debug, Default)]
struct Counters {
    appends: AtomicU64,
    records: AtomicU64,
    bytes_written: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    rolls: AtomicU64,
}

/// Acknowledged batches that may wait for the completer before the writer
/// waits for it in turn.
const COMPLETION_BATCHES_MAX: usize = 64;
/// Batches one call of [`Log::write_deferred`] writes at most, what others
/// queued meanwhile included, before it leaves the rest to the writer thread.
const INLINE_BATCHES_MAX: usize = 4;
/// Batches of at most this many appends are completed by the writer itself.
const COMPLETE_INLINE_GROUPS_MAX: usize = 32;

type Callback = Box<dyn FnOnce(Result<AppendOutcome, AppendError>) + Send>;

enum Completion {
    /// A thread blocked in [`Log::append`]: it waits on its batch's word in
    /// [`Acks`] and learns the result there.
    Wait,
    Call(Callback),
}

impl Completion {
    fn complete(self, result: Result<AppendOutcome, AppendError>) {
        match self {
            Self::Wait => {}
            Self::Call(callback) => callback(result),
        }
    }
}

/// Futex words blocking appenders wait on, one per batch generation modulo
/// this: a batch's appenders are woken by one system call, and the appenders
/// of the next batches sleep on through it (unless the completer lags this
/// many batches behind, when some wake, look, and sleep again).
const ACK_WORDS: usize = 16;

/// How blocking appenders learn that their batch is acknowledged or failed.
///
/// Waking 256 parked threads one `unpark` at a time costs the waker ~3.4 µs
/// each on the development VM; one `FUTEX_WAKE` of all of them ~2.3 µs each
/// (`docs/benchmarks.md`, `bench log`).
struct Acks {
    /// Batches acknowledged: every generation below this is (under `fsync =
    /// always`) durable. Raised with `fetch_max`, because the writer
    /// acknowledges small batches itself while the completer may still be
    /// on an earlier, larger one.
    through: AtomicU64,
    /// Bumped, then woken, when a generation `g` with `g % ACK_WORDS == i`
    /// is acknowledged, and all of them when the log fails.
    words: [AtomicU32; ACK_WORDS],
    failed: OnceLock<Failed>,
}

/// Which blocking appends a failure fails, and how.
struct Failed {
    /// The batch whose write or `fdatasync` failed: its appends get
    /// [`AppendError::Io`]. None if the failure was not a batch's.
    io_generation: Option<u64>,
    /// This generation and later ones get [`AppendError::Poisoned`].
    first_poisoned: u64,
    failure: Arc<IoFailure>,
}

impl Acks {
    fn new() -> Self {
        Self { through: AtomicU64::new(0), words: std::array::from_fn(|_| AtomicU32::new(0)), failed: OnceLock::new() }
    }

    fn word(&self, generation: u64) -> &AtomicU32 {
        &self.words[(generation % ACK_WORDS as u64) as usize]
    }

    /// Acknowledges the batch of `generation` and wakes its blocked
    /// appenders, if it has any.
    fn acknowledge(&self, generation: u64, waiters: bool) {
        self.through.fetch_max(generation + 1, Ordering::Release);
        if waiters {
            let word = self.word(generation);
            word.fetch_add(1, Ordering::Release);
            atomic_wait::wake_all(word);
        }
    }

    /// Fails the blocked appenders `failed` names and wakes all of them.
    fn fail(&self, failed: Failed) {
        let _ = self.failed.set(failed);
        for word in &self.words {
            word.fetch_add(1, Ordering::Release);
            atomic_wait::wake_all(word);
        }
    }

    /// Blocks until the batch of `generation` is acknowledged or failed.
    fn wait(&self, generation: u64, outcome: AppendOutcome) -> Result<AppendOutcome, AppendError> {
        let word = self.word(generation);
        loop {
            // The word first: if it moves after this load, the wait below
            // returns at once; if it moved before, the loads below see why.
            let seen = word.load(Ordering::Acquire);
            if self.through.load(Ordering::Acquire) > generation {
                return Ok(outcome);
            }
            if let Some(failed) = self.failed.get() {
                if failed.io_generation == Some(generation) {
                    return Err(AppendError::Io(Arc::clone(&failed.failure)));
                }
                if generation >= failed.first_poisoned {
                    return Err(AppendError::Poisoned(Arc::clone(&failed.failure)));
                }
            }
            atomic_wait::wait(word, seen);
        }
    }
}

struct QueuedGroup {
    outcome: AppendOutcome,
    framed_bytes: u64,
    done: Completion,
}

#[derive(Default)]
struct Batch {
    payload: Vec<u8>,
    lens: Vec<u32>,
    groups: Vec<QueuedGroup>,
    /// Whether a group is [`Completion::Wait`].
    waiters: bool,
}

/// A written batch, for the completer.
struct Acknowledged {
    generation: u64,
    groups: Vec<QueuedGroup>,
    waiters: bool,
}

#[derive(Debug, Clone)]
enum QueueState {
    Open,
    Closing,
    Poisoned(Arc<IoFailure>),
}

struct Queue {
    batch: Batch,
    queued_bytes: u64,
    next_position: u64,
    state: QueueState,
    /// The writer thread sleeps, waiting for `work_ready`.
    writer_idle: bool,
    /// Until when it sleeps, if it set a timeout.
    writer_wakes_at: Option<Instant>,
    /// A thread holds the writer's role: it is writing a batch it took, and
    /// before it lets go it writes or hands over what was queued meanwhile.
    /// The writer thread, or under `fsync = interval | never` a caller of
    /// [`Log::write_deferred`].
    writing: bool,
    /// Under `fsync = interval`: when what was written but not synced must
    /// be synced (the writer thread's next timeout).
    sync_due: Option<Instant>,
    /// Batches the writer has taken: the generation of the batch queuing now.
    generation: u64,
    /// Appenders waiting for `space_ready` (notified only when there are some).
    space_waiters: usize,
}

struct Shared {
    dir: PathBuf,
    config: LogConfig,
    storage: Arc<dyn Storage>,
    queue: Mutex<Queue>,
    work_ready: Condvar,
    space_ready: Condvar,
    segments: RwLock<Vec<SegmentMeta>>,
    /// One past the last position readers may see (durable under `always`).
    visible_end: AtomicU64,
    /// Threads in [`Log::wait_for_end`]; the writer signals `end_moved`
    /// only when there is one, so that a log nobody follows pays nothing.
    end_waiters: AtomicUsize,
    end_lock: Mutex<()>,
    end_moved: Condvar,
    counters: Counters,
    acks: Acks,
    /// The sparse indexes of the sealed segments read last, most recent
    /// first, at most [`SEALED_INDEXES_CACHED`].
    sealed_indexes: Mutex<VecDeque<(u64, SparseIndex)>>,
}

/// A segment's sparse `(position, offset)` entries, shared with readers.
type SparseIndex = Arc<[(u64, u32)]>;

/// Sealed segments whose sparse index stays in memory after a read: at the
/// default 128 MiB segment, 32,768 entries (512 KiB) each, so 8 MiB at most.
const SEALED_INDEXES_CACHED: usize = 16;

impl Shared {
    /// The sparse index of the sealed segment at `base` (`valid_bytes`
    /// long), from the cache or its index file. Empty if the file is
    /// missing, damaged or unreadable: readers then scan from the
    /// segment's first record, which is slower but finds the same records.
    fn sealed_index(&self, base: u64, valid_bytes: u64) -> SparseIndex {
        let mut cache = lock(&self.sealed_indexes);
        if let Some(at) = cache.iter().position(|(b, _)| *b == base) {
            let entry = cache.remove(at).expect("a found entry");
            let index = Arc::clone(&entry.1);
            cache.push_front(entry);
            return index;
        }
        drop(cache);
        let path = self.dir.join(format::index_file_name(base));
        let index: SparseIndex = match read_index_file(self.storage.as_ref(), &path) {
            Ok(Some(sealed)) if sealed.base_position == base && sealed.segment_bytes == valid_bytes => {
                sealed.entries.into()
            }
            _ => Arc::from([]),
        };
        self.cache_sealed_index(base, Arc::clone(&index));
        index
    }

    fn cache_sealed_index(&self, base: u64, index: SparseIndex) {
        let mut cache = lock(&self.sealed_indexes);
        cache.retain(|(b, _)| *b != base);
        cache.push_front((base, index));
        cache.truncate(SEALED_INDEXES_CACHED);
    }

    /// Wakes the sleeping writer thread if there is work for it: appends
    /// nobody writes, a close, a poisoned log, or a sync due before the
    /// time it sleeps until. Called by a thread letting go of the writer's
    /// role in [`Log::write_deferred`] (or instead of taking it).
    fn wake_writer_for(&self, queue: &mut Queue) {
        if !queue.writer_idle || queue.writing {
            return;
        }
        let sync = queue.sync_due.is_some_and(|due| queue.writer_wakes_at.is_none_or(|at| due < at));
        if sync || !queue.batch.groups.is_empty() || !matches!(queue.state, QueueState::Open) {
            queue.writer_idle = false;
            self.work_ready.notify_one();
        }
    }

    /// Moves the visible end to `end` and wakes the threads in
    /// [`Log::wait_for_end`], if any.
    fn publish_end(&self, end: u64) {
        self.visible_end.store(end, Ordering::SeqCst);
        if self.end_waiters.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.end_lock);
            self.end_moved.notify_all();
        }
    }
}

/// The writer thread; it returns the failure that poisoned the log, if any.
type WriterHandle = JoinHandle<Result<(), Arc<IoFailure>>>;

/// A durable, totally ordered, append-only log of opaque records.
///
/// `Log` is `Send + Sync`: share it behind an `Arc` and append and read from
/// any thread.
pub struct Log {
    shared: Arc<Shared>,
    /// The active segment's writer: used by whoever holds the writer's role
    /// (`Queue::writing`), so never waited for.
    writer_state: Arc<Mutex<Writer>>,
    writer: Mutex<Option<WriterHandle>>,
    /// The completer thread: wakes appenders and runs callbacks off the writer's path.
    completer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    /// The directory lock, released by [`Log::close`] once the writer has stopped.
    dir_lock: Mutex<Option<Box<dyn Send + Sync + fmt::Debug>>>,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.shared.dir)
            .field("start", &self.start_position())
            .field("end", &self.end_position())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug that already crashed a thread;
    // the data it guards is still consistent for the fields we touch.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn io_failure(op: &'static str, file: &Path, offset: u64, source: std::io::Error) -> IoFailure {
    IoFailure { op, file: file.to_path_buf(), offset, source }
}

impl Log {
    /// Opens (creating if needed) the log in `dir` on real files.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self, OpenError> {
        Self::open_with_storage(Arc::new(FileStorage), dir, config)
    }

    /// Opens the log in `dir` through `storage`, running recovery.
    pub fn open_with_storage(
        storage: Arc<dyn Storage>,
        dir: impl AsRef<Path>,
        config: LogConfig,
    ) -> Result<Self, OpenError> {
        config.validate().map_err(OpenError::InvalidConfig)?;
        let dir = dir.as_ref().to_path_buf();
        let lock_guard = prepare_dir(storage.as_ref(), &dir)?;
        let (segments, recovery) = recover(storage.as_ref(), &dir, &config)?;
        let next_position = segments.last().expect("recovery leaves one segment").end_position;
        let active = segments.last().expect("recovery leaves one segment").clone();
        let shared = Arc::new(Shared {
            dir,
            config,
            storage,
            queue: Mutex::new(Queue {
                batch: Batch::default(),
                queued_bytes: 0,
                next_position,
                state: QueueState::Open,
                writer_idle: false,
                writer_wakes_at: None,
                writing: false,
                sync_due: None,
                generation: 0,
                space_waiters: 0,
            }),
            work_ready: Condvar::new(),
            space_ready: Condvar::new(),
            segments: RwLock::new(segments),
            visible_end: AtomicU64::new(next_position),
            end_waiters: AtomicUsize::new(0),
            end_lock: Mutex::new(()),
            end_moved: Condvar::new(),
            sealed_indexes: Mutex::new(VecDeque::new()),
            counters: Counters::default(),
            acks: Acks::new(),
        });
        // The completer wakes appenders and runs callbacks, in log order,
        // while the writer goes on with the next batch. It ends when the
        // writer drops its sender.
        let (completions, acknowledged) = sync_channel::<Acknowledged>(COMPLETION_BATCHES_MAX);
        let spawn_error = |e| OpenError::Io(io_failure("spawn thread", &shared_dir(&active), 0, e));
        let completer_shared = Arc::clone(&shared);
        let completer = std::thread::Builder::new()
            .name("edgebus-log-completer".to_owned())
            .spawn(move || {
                for batch in acknowledged {
                    complete_batch(&completer_shared.acks, batch);
                }
            })
            .map_err(spawn_error)?;
        let writer_state = Arc::new(Mutex::new(Writer::new(Arc::clone(&shared), &active, completions)));
        let thread_state = Arc::clone(&writer_state);
        let handle = std::thread::Builder::new()
            .name("edgebus-log-writer".to_owned())
            .spawn(move || run_writer(&thread_state))
            .map_err(spawn_error)?;
        Ok(Self {
            shared,
            writer_state,
            writer: Mutex::new(Some(handle)),
            completer: Mutex::new(Some(completer)),
            recovery,
            dir_lock: Mutex::new(Some(lock_guard)),
        })
    }

    /// What recovery found when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The settings this log runs with.
    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// First position still present (positions below were removed).
    pub fn start_position(&self) -> u64 {
        self.shared.segments.read().expect("segments lock").first().map_or(0, |s| s.base_position)
    }

    /// One past the last position readers can see. Under `fsync = always`
    /// every position below it is durable.
    pub fn end_position(&self) -> u64 {
        self.shared.visible_end.load(Ordering::Acquire)
    }

    /// Waits until the visible end is beyond `position` (some record at or
    /// after `position` can be read) or `timeout` passes, and returns the
    /// visible end. Returns at once if it already is. This is how a follower
    /// of the log (the node's live feed) learns of new records without
    /// polling.
    pub fn wait_for_end(&self, position: u64, timeout: std::time::Duration) -> u64 {
        let shared = &self.shared;
        let end = shared.visible_end.load(Ordering::SeqCst);
        if end > position {
            return end;
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = lock(&shared.end_lock);
        // Registered before the end is read again: either the writer sees
        // the waiter and signals under the lock, or this read sees the end.
        shared.end_waiters.fetch_add(1, Ordering::SeqCst);
        let end = loop {
            let end = shared.visible_end.load(Ordering::SeqCst);
            let now = std::time::Instant::now();
            if end > position || now >= deadline {
                break end;
            }
            guard = shared.end_moved.wait_timeout(guard, deadline - now).expect("end lock").0;
        };
        shared.end_waiters.fetch_sub(1, Ordering::SeqCst);
        end
    }

    /// Counters since open.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            appends: c.appends.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            rolls: c.rolls.load(Ordering::Relaxed),
        }
    }

    /// The append queue right now. Takes the queue's lock for a moment, so
    /// it suits a metrics scrape, not a per-append call.
    pub fn append_queue(&self) -> AppendQueue {
        let queue = lock(&self.shared.queue);
        let visible_end = self.shared.visible_end.load(Ordering::Acquire);
        AppendQueue {
            appends: queue.batch.groups.len(),
            bytes: queue.queued_bytes,
            // The writer publishes the visible end at most up to the
            // positions assigned so far; a poisoned log failed the rest.
            records_unacknowledged: match queue.state {
                QueueState::Poisoned(_) => 0,
                QueueState::Open | QueueState::Closing => queue.next_position.saturating_sub(visible_end),
            },
            accepting: matches!(queue.state, QueueState::Open),
        }
    }

    /// Appends `records` atomically and returns once they are acknowledged
    /// (durable under `fsync = always`). Waits while the append queue is full.
    pub fn append<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<AppendOutcome, AppendError> {
        self.queue(records).and_then(|queued| self.wait(queued))
    }

    /// The first half of [`Log::append`]: queues `records` as one atomic
    /// append and returns where they will land, without waiting for them to
    /// be written (it waits while the append queue is full). Positions
    /// follow the order of the calls, so a caller can queue under a lock of
    /// its own and wait after releasing it. The append is written whether
    /// or not anyone waits for it.
    pub fn queue<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<Queued, AppendError> {
        self.queue_waking(records, true)
    }

    /// Like [`Log::queue`], without waking the writer thread: the caller
    /// then calls [`Log::write_deferred`] (for example once it has released
    /// a lock of its own) before it waits, and under `fsync = interval |
    /// never` usually finds its batch written when it does.
    pub fn queue_deferred<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<Queued, AppendError> {
        self.queue_waking(records, false)
    }

    fn queue_waking<R: AsRef<[u8]>>(&self, records: &[R], wake: bool) -> Result<Queued, AppendError> {
        let (outcome, generation) = self.enqueue(records, Completion::Wait, true, wake)?;
        Ok(Queued { outcome, generation })
    }

    /// The second half of [`Log::append`]: blocks until the queued append
    /// is acknowledged (durable under `fsync = always`) or has failed. The
    /// thread sleeps with the rest of its batch's waiters, and one system
    /// call wakes them all.
    pub fn wait(&self, queued: Queued) -> Result<AppendOutcome, AppendError> {
        self.shared.acks.wait(queued.generation, queued.outcome)
    }

    /// Queues `records` as one atomic append and returns the positions they
    /// will hold; `done` is called from the writer thread once the append is
    /// acknowledged or has failed. Waits while the append queue is full. If
    /// this returns an error, `done` is never called.
    pub fn submit<R: AsRef<[u8]>>(
        &self,
        records: &[R],
        done: impl FnOnce(Result<AppendOutcome, AppendError>) + Send + 'static,
    ) -> Result<AppendOutcome, AppendError> {
        self.submit_waking(records, done, true)
    }

    /// Like [`Log::submit`], but leaves the writing to a later
    /// [`Log::write_deferred`], which the caller must make (after letting go
    /// of its own locks): the writer thread is not woken for it. A caller
    /// that queues several appends in a row this way and then writes them
    /// saves the writer thread's wake-up and the hand-off.
    pub fn submit_deferred<R: AsRef<[u8]>>(
        &self,
        records: &[R],
        done: impl FnOnce(Result<AppendOutcome, AppendError>) + Send + 'static,
    ) -> Result<AppendOutcome, AppendError> {
        self.submit_waking(records, done, false)
    }

    fn submit_waking<R: AsRef<[u8]>>(
        &self,
        records: &[R],
        done: impl FnOnce(Result<AppendOutcome, AppendError>) + Send + 'static,
        wake: bool,
    ) -> Result<AppendOutcome, AppendError> {
        self.enqueue(records, Completion::Call(Box::new(done)), true, wake).map(|(outcome, _)| outcome)
    }

    /// Writes what is queued. Under `fsync = interval | never`, on the
    /// calling thread, unless another thread is writing (which then writes
    /// it next): a write to the OS takes microseconds, less than handing
    /// it to the writer thread and waking it. Callbacks of the appends
    /// written run here too (a batch of more than 32 goes to the completer
    /// thread); `fdatasync` is left to the writer thread. Under `fsync =
    /// always`, it wakes the writer thread, whose `fdatasync` a caller
    /// should not wait for.
    pub fn write_deferred(&self) {
        let shared = &self.shared;
        let mut queue = lock(&shared.queue);
        if shared.config.fsync != FsyncPolicy::Always {
            for _ in 0..INLINE_BATCHES_MAX {
                if queue.writing || queue.batch.groups.is_empty() || matches!(queue.state, QueueState::Poisoned(_)) {
                    break;
                }
                queue.writing = true;
                let mut writer = lock(&self.writer_state);
                let result = writer.write_next(queue, false);
                if let Err(failure) = result {
                    // The role is kept: nothing is written after a failure.
                    writer.poison(&failure);
                    shared.work_ready.notify_all();
                    return;
                }
                queue = lock(&shared.queue);
                queue.writing = false;
                queue.sync_due = writer.sync_due();
            }
        }
        shared.wake_writer_for(&mut queue);
    }

    /// Like [`Log::submit`], but fails with [`AppendError::QueueFull`] instead
    /// of waiting when the append queue is full.
    pub fn try_submit<R: AsRef<[u8]>>(
        &self,
        records: &[R],
        done: impl FnOnce(Result<AppendOutcome, AppendError>) + Send + 'static,
    ) -> Result<AppendOutcome, AppendError> {
        self.enqueue(records, Completion::Call(Box::new(done)), false, true).map(|(outcome, _)| outcome)
    }

    /// Queues one append; returns its positions and the generation of the
    /// batch it joined. Waits for room if `wait`; wakes the writer thread
    /// if `wake` (else the caller writes it: [`Log::write_deferred`]).
    fn enqueue<R: AsRef<[u8]>>(
        &self,
        records: &[R],
        done: Completion,
        wait: bool,
        wake: bool,
    ) -> Result<(AppendOutcome, u64), AppendError> {
        let config = &self.shared.config;
        if records.is_empty() {
            return Err(AppendError::Empty);
        }
        if records.len() > config.append_records_max as usize {
            return Err(AppendError::TooManyRecords { count: records.len(), max: config.append_records_max });
        }
        let mut payload_bytes = 0u64;
        let mut framed_bytes = 0u64;
        for (index, record) in records.iter().enumerate() {
            let bytes = record.as_ref().len() as u64;
            if bytes > config.record_bytes_max {
                return Err(AppendError::RecordTooLarge { index, bytes, max: config.record_bytes_max });
            }
            payload_bytes += bytes;
            framed_bytes += format::frame_bytes(bytes);
        }
        if framed_bytes > config.append_bytes_max {
            return Err(AppendError::AppendTooLarge { bytes: framed_bytes, max: config.append_bytes_max });
        }
        let count = u32::try_from(records.len()).expect("bounded by append_records_max");
        let mut queue = lock(&self.shared.queue);
        loop {
            match &queue.state {
                QueueState::Open => {}
                QueueState::Closing => return Err(AppendError::Closed),
                QueueState::Poisoned(cause) => return Err(AppendError::Poisoned(Arc::clone(cause))),
            }
            let groups = queue.batch.groups.len();
            let fits = queue.queued_bytes + payload_bytes <= config.queue_bytes_max
                && groups < config.queue_appends_max as usize;
            if fits || groups == 0 {
                break;
            }
            if !wait {
                return Err(AppendError::QueueFull {
                    queued_bytes: queue.queued_bytes,
                    queued_appends: u32::try_from(groups).unwrap_or(u32::MAX),
                });
            }
            queue.space_waiters += 1;
            queue = self.shared.space_ready.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.space_waiters -= 1;
        }
        let outcome = AppendOutcome { first_position: queue.next_position, count };
        queue.next_position += u64::from(count);
        queue.queued_bytes += payload_bytes;
        for record in records {
            let record = record.as_ref();
            queue.batch.payload.extend_from_slice(record);
            queue.batch.lens.push(u32::try_from(record.len()).expect("bounded by record_bytes_max"));
        }
        if matches!(done, Completion::Wait) {
            queue.batch.waiters = true;
        }
        queue.batch.groups.push(QueuedGroup { outcome, framed_bytes, done });
        // A thread that is writing takes it next, or hands it over.
        if wake && queue.writer_idle && !queue.writing {
            queue.writer_idle = false;
            self.shared.work_ready.notify_one();
        }
        Ok((outcome, queue.generation))
    }

    /// Reads forward from `from`: at most `max_records` records and, past the
    /// first record, at most `max_bytes` of payload. Returns fewer (or none)
    /// at the visible end. Fails with [`ReadError::Removed`] below the start.
    pub fn read(&self, from: u64, max_records: usize, max_bytes: u64) -> Result<Vec<Record>, ReadError> {
        let end = self.end_position();
        let mut out = Vec::new();
        let mut position = from;
        let mut bytes = 0u64;
        while position < end && out.len() < max_records {
            let segment = self.segment_for(position)?;
            let limit = end.min(segment.end_position);
            let (seek_position, seek_offset) = (segment.seek_position, segment.seek_offset);
            let record_bytes_max = self.shared.config.record_bytes_max;
            let mut expected = seek_position;
            let mut corrupt = None;
            let stop = segment::scan(
                segment.file.as_ref(),
                &segment.path,
                seek_offset,
                segment.valid_bytes,
                record_bytes_max,
                |frame| {
                    if frame.info.position != expected {
                        corrupt = Some((frame.offset, "frame position out of sequence"));
                        return false;
                    }
                    expected += 1;
                    if frame.info.position < position {
                        return true;
                    }
                    if frame.info.position >= limit || out.len() >= max_records {
                        return false;
                    }
                    let len = frame.info.payload_len as u64;
                    if !out.is_empty() && bytes + len > max_bytes {
                        return false;
                    }
                    bytes += len;
                    out.push(Record { position: frame.info.position, payload: frame.payload() });
                    // Stop here rather than at the next frame: a read must not
                    // fail on damage past the records it was asked for.
                    out.len() < max_records
                },
            )?;
            if let Some((offset, reason)) = corrupt {
                return Err(corruption(&segment.path, offset, reason).into());
            }
            let next = out.last().map_or(position, |r| r.position + 1);
            match stop {
                ScanStop::Bad { offset, reason, .. } => return Err(corruption(&segment.path, offset, reason).into()),
                ScanStop::Stopped { .. } if next < limit => break, // a count or byte limit was hit
                ScanStop::End { .. } if next < limit => {
                    return Err(
                        corruption(&segment.path, segment.valid_bytes, "segment ends before its last record").into()
                    );
                }
                _ => {}
            }
            if next == position {
                break;
            }
            position = next;
        }
        Ok(out)
    }

    /// Reads backward from `from` (inclusive; clamped to the last visible
    /// record) toward the start, newest first, with the same limits as
    /// [`Log::read`]. Fails with [`ReadError::Removed`] if `from` is below the start.
    pub fn read_backward(&self, from: u64, max_records: usize, max_bytes: u64) -> Result<Vec<Record>, ReadError> {
        let end = self.end_position();
        let mut out: Vec<Record> = Vec::new();
        if end == 0 || max_records == 0 {
            return Ok(out);
        }
        let mut upper = from.min(end - 1) + 1; // exclusive
        let start = self.start_position();
        if upper <= start {
            // Like a forward read: say the records were removed rather than
            // answer as if the log were empty.
            return Err(ReadError::Removed { position: upper - 1, start });
        }
        let mut bytes = 0u64;
        while out.len() < max_records {
            let start = self.start_position();
            if upper <= start {
                break;
            }
            let seek_position = self.segment_for(upper - 1)?.seek_position;
            let step = self.read(seek_position, (upper - seek_position) as usize, u64::MAX)?;
            for record in step.into_iter().rev() {
                let len = record.payload.len() as u64;
                if out.len() >= max_records || (!out.is_empty() && bytes + len > max_bytes) {
                    return Ok(out);
                }
                bytes += len;
                out.push(record);
            }
            upper = seek_position;
        }
        Ok(out)
    }

    /// The segment holding `position`, and the indexed record to scan from.
    /// Cheap: copies no index, only handles and offsets.
    fn segment_for(&self, position: u64) -> Result<SegmentView, ReadError> {
        let segments = self.shared.segments.read().expect("segments lock");
        let start = segments.first().map_or(0, |s| s.base_position);
        if position < start {
            return Err(ReadError::Removed { position, start });
        }
        let at = segments.partition_point(|s| s.base_position <= position);
        assert!(at > 0, "position {position} at or above start {start} must have a segment");
        let segment = &segments[at - 1];
        let mut view = SegmentView {
            file: Arc::clone(&segment.file),
            path: Arc::clone(&segment.path),
            end_position: segment.end_position,
            valid_bytes: segment.valid_bytes,
            seek_position: segment.base_position,
            seek_offset: LOG_SEGMENT_HEADER_BYTES,
        };
        let (base, sealed) = (segment.base_position, segment.sealed);
        if !sealed {
            (view.seek_position, view.seek_offset) = segment::seek(&segment.index, base, position);
            return Ok(view);
        }
        drop(segments);
        let index = self.shared.sealed_index(base, view.valid_bytes);
        (view.seek_position, view.seek_offset) = segment::seek(&index, base, position);
        Ok(view)
    }

    /// The segments, oldest first: their position ranges, sizes and whether sealed.
    pub fn segments(&self) -> Vec<SegmentSummary> {
        let end = self.end_position();
        let segments = self.shared.segments.read().expect("segments lock");
        segments
            .iter()
            .map(|s| SegmentSummary {
                base_position: s.base_position,
                end_position: s.end_position.min(end),
                bytes: s.valid_bytes,
                sealed: s.sealed,
            })
            .collect()
    }

    /// Reads and checks every record of every segment; returns how many there are.
    pub fn verify(&self) -> Result<u64, ReadError> {
        let mut position = self.start_position();
        let end = self.end_position();
        let mut count = 0u64;
        while position < end {
            let batch = self.read(position, 65_536, 64 * 1024 * 1024)?;
            let Some(last) = batch.last() else { break };
            count += batch.len() as u64;
            position = last.position + 1;
        }
        Ok(count)
    }

    /// Removes whole sealed segments whose records all lie below `position`,
    /// oldest first, and returns the new start position. The active segment
    /// is never removed, so the start can stay below `position`.
    pub fn remove_segments_before(&self, position: u64) -> Result<u64, RemoveError> {
        let victims: Vec<SegmentMeta> = {
            let mut segments = self.shared.segments.write().expect("segments lock");
            let removable =
                segments.iter().take_while(|s| s.sealed && s.end_position <= position).count().min(segments.len() - 1);
            segments.drain(..removable).collect()
        };
        let storage = self.shared.storage.as_ref();
        for segment in &victims {
            storage.remove_file(&segment.path).map_err(|e| io_failure("remove segment", &segment.path, 0, e))?;
            let index_path = self.shared.dir.join(format::index_file_name(segment.base_position));
            remove_if_exists(storage, &index_path, "remove index")?;
            // Removals become durable oldest first, so a crash never leaves a gap.
            storage.sync_dir(&self.shared.dir).map_err(|e| io_failure("sync directory", &self.shared.dir, 0, e))?;
        }
        Ok(self.start_position())
    }

    /// Stops accepting appends, writes everything queued, syncs, and stops
    /// the writer. Later appends fail with [`AppendError::Closed`]. Idempotent.
    pub fn close(&self) -> Result<(), Arc<IoFailure>> {
        {
            let mut queue = lock(&self.shared.queue);
            if matches!(queue.state, QueueState::Open) {
                queue.state = QueueState::Closing;
            }
            self.shared.work_ready.notify_all();
            self.shared.space_ready.notify_all();
        }
        let handle = lock(&self.writer).take();
        let result = match handle {
            Some(handle) => handle.join().expect("log writer thread panicked"),
            None => Ok(()),
        };
        // The writer has dropped its sender: the completer finishes what is
        // acknowledged and ends.
        if let Some(completer) = lock(&self.completer).take() {
            completer.join().expect("log completer thread panicked");
        }
        // Nothing writes any more: another opener may have the directory.
        drop(lock(&self.dir_lock).take());
        result
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// What a reader needs of one segment, taken under the segments lock
/// without copying its index.
struct SegmentView {
    file: Arc<dyn StorageFile>,
    path: Arc<Path>,
    end_position: u64,
    valid_bytes: u64,
    /// The last indexed record at or before the position asked for.
    seek_position: u64,
    seek_offset: u64,
}

fn shared_dir(active: &SegmentMeta) -> PathBuf {
    active.path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn corruption(file: &Path, offset: u64, reason: impl Into<String>) -> Corruption {
    Corruption { file: file.to_path_buf(), offset, reason: reason.into() }
}

/// Runs a written batch's callbacks, then wakes its blocked appenders.
fn complete_batch(acks: &Acks, batch: Acknowledged) {
    for group in batch.groups {
        group.done.complete(Ok(group.outcome));
    }
    acks.acknowledge(batch.generation, batch.waiters);
}

/// The writer thread: writes what others leave to it, syncs on the
/// interval, and on close writes what is left, syncs and leaves the active
/// segment's index. A failure poisons the log and stops it.
fn run_writer(state: &Mutex<Writer>) -> Result<(), Arc<IoFailure>> {
    let shared = Arc::clone(&lock(state).shared);
    let result = writer_loop(&shared, state);
    if let Err(failure) = &result {
        lock(state).poison(failure);
    }
    // Nothing is written after this: the completer ends once it has run
    // what it was given.
    lock(state).completer = None;
    result
}

fn writer_loop(shared: &Shared, state: &Mutex<Writer>) -> Result<(), Arc<IoFailure>> {
    let mut queue = lock(&shared.queue);
    loop {
        if let QueueState::Poisoned(failure) = &queue.state {
            // A thread writing in `Log::write_deferred` failed and poisoned the log.
            return Err(Arc::clone(failure));
        }
        if !queue.writing {
            let sync_now = queue.sync_due.is_some_and(|due| due <= Instant::now());
            if !queue.batch.groups.is_empty() || sync_now {
                queue.writing = true;
                let mut writer = lock(state);
                let result = if queue.batch.groups.is_empty() {
                    drop(queue);
                    writer.sync()
                } else {
                    writer.write_next(queue, true)
                };
                // After a failure the role is kept: nothing is written after it.
                result?;
                queue = lock(&shared.queue);
                queue.writing = false;
                queue.sync_due = writer.sync_due();
                continue;
            }
            if matches!(queue.state, QueueState::Closing) {
                queue.writing = true;
                drop(queue);
                let mut writer = lock(state);
                if writer.unsynced {
                    writer.sync()?;
                }
                // A clean close leaves the active segment's index behind,
                // so the next open need not scan the segment.
                return write_index_file(shared.storage.as_ref(), &shared.dir, &writer.active_index())
                    .map_err(Arc::new);
            }
        }
        // While another thread writes, it wakes this one when it lets go.
        queue.writer_idle = true;
        queue.writer_wakes_at = queue.sync_due.filter(|_| !queue.writing);
        queue = match queue.writer_wakes_at.map(|at| at.saturating_duration_since(Instant::now())) {
            Some(timeout) => {
                shared.work_ready.wait_timeout(queue, timeout).unwrap_or_else(std::sync::PoisonError::into_inner).0
            }
            None => shared.work_ready.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner),
        };
        queue.writer_idle = false;
    }
}

/// The active segment and reusable buffers, used by whoever holds the
/// writer's role (`Queue::writing`).
struct Writer {
    shared: Arc<Shared>,
    file: Arc<dyn StorageFile>,
    path: Arc<Path>,
    base_position: u64,
    bytes: u64,
    next_position: u64,
    last_indexed_offset: Option<u64>,
    unsynced: bool,
    last_sync: Instant,
    buf: Vec<u8>,
    frame_offsets: Vec<usize>,
    new_index: Vec<(u64, u32)>,
    spare: Batch,
    /// Acknowledged batches, in log order, for the completer thread; taken
    /// once the writer thread has stopped, which ends the completer.
    completer: Option<SyncSender<Acknowledged>>,
    /// The generation of the batch whose write or sync failed, if one did.
    failed_generation: Option<u64>,
}

impl Writer {
    fn new(shared: Arc<Shared>, active: &SegmentMeta, completer: SyncSender<Acknowledged>) -> Self {
        Self {
            completer: Some(completer),
            failed_generation: None,
            shared,
            file: Arc::clone(&active.file),
            path: Arc::clone(&active.path),
            base_position: active.base_position,
            bytes: active.valid_bytes,
            next_position: active.end_position,
            last_indexed_offset: active.index.last().map(|(_, o)| u64::from(*o)),
            unsynced: false,
            last_sync: Instant::now(),
            buf: Vec::new(),
            frame_offsets: Vec::new(),
            new_index: Vec::new(),
            spare: Batch::default(),
        }
    }

    /// Takes the queued batch (the caller holds the writer's role), writes
    /// it and completes its appends. Syncs it under `fsync = always`, and
    /// under `interval` if `may_sync` and the interval has passed.
    fn write_next(&mut self, mut queue: MutexGuard<'_, Queue>, may_sync: bool) -> Result<(), Arc<IoFailure>> {
        let shared = Arc::clone(&self.shared);
        std::mem::swap(&mut queue.batch, &mut self.spare);
        let generation = queue.generation;
        queue.generation += 1;
        queue.queued_bytes = 0;
        let space_waiters = queue.space_waiters > 0;
        drop(queue);
        if space_waiters {
            shared.space_ready.notify_all();
        }
        let mut batch = std::mem::take(&mut self.spare);
        let result = self.write_batch(&batch, may_sync);
        let groups = std::mem::take(&mut batch.groups);
        let waiters = std::mem::take(&mut batch.waiters);
        batch.payload.clear();
        batch.lens.clear();
        self.spare = batch;
        match result {
            Ok(()) => {
                shared.counters.appends.fetch_add(groups.len() as u64, Ordering::Relaxed);
                // Waking hundreds of appenders costs more than the write
                // and the sync (~2 µs each here, even in one system
                // call): the completer does it while this thread writes
                // the next batch. A few are cheaper to wake here than to
                // hand over.
                let batch = Acknowledged { generation, groups, waiters };
                if batch.groups.len() <= COMPLETE_INLINE_GROUPS_MAX {
                    complete_batch(&shared.acks, batch);
                } else {
                    let completer = self.completer.as_ref().expect("the completer outlives the writer");
                    completer.send(batch).expect("the completer outlives the writer");
                }
                Ok(())
            }
            Err(failure) => {
                self.failed_generation = Some(generation);
                for group in groups {
                    group.done.complete(Err(AppendError::Io(Arc::clone(&failure))));
                }
                Err(failure)
            }
        }
    }

    /// When what was written must be synced, under `fsync = interval`.
    fn sync_due(&self) -> Option<Instant> {
        match self.shared.config.fsync {
            FsyncPolicy::Interval(interval) if self.unsynced => Some(self.last_sync + interval),
            _ => None,
        }
    }

    /// Marks the log poisoned and fails everything still queued (once: a
    /// log already poisoned stays as it is).
    fn poison(&self, failure: &Arc<IoFailure>) {
        let (groups, first_poisoned) = {
            let mut queue = lock(&self.shared.queue);
            if matches!(queue.state, QueueState::Poisoned(_)) {
                return;
            }
            queue.state = QueueState::Poisoned(Arc::clone(failure));
            queue.queued_bytes = 0;
            queue.batch.waiters = false;
            (std::mem::take(&mut queue.batch.groups), queue.generation)
        };
        self.shared.space_ready.notify_all();
        for group in groups {
            group.done.complete(Err(AppendError::Poisoned(Arc::clone(failure))));
        }
        self.shared.acks.fail(Failed {
            io_generation: self.failed_generation,
            first_poisoned,
            failure: Arc::clone(failure),
        });
    }

    fn write_batch(&mut self, batch: &Batch, may_sync: bool) -> Result<(), Arc<IoFailure>> {
        let segment_bytes = self.shared.config.segment_bytes;
        self.buf.clear();
        self.frame_offsets.clear();
        self.new_index.clear();
        let mut payload_at = 0usize;
        let mut record_at = 0usize;
        let mut chunk_first_position = None;
        for group in &batch.groups {
            let group_offset = self.bytes + self.buf.len() as u64;
            if group_offset + group.framed_bytes > segment_bytes && group_offset > LOG_SEGMENT_HEADER_BYTES {
                self.flush_chunk()?;
                self.roll()?;
                chunk_first_position = None;
            }
            assert_eq!(group.outcome.first_position, self.next_position, "positions are assigned densely");
            let chunk_first = *chunk_first_position.get_or_insert(self.next_position);
            for i in 0..group.count() {
                let position = self.next_position;
                let len = batch.lens[record_at] as usize;
                let payload = &batch.payload[payload_at..payload_at + len];
                let flags = if i + 1 == group.count() { FLAG_GROUP_END } else { 0 };
                let delta = u32::try_from(position - chunk_first).expect("a batch holds fewer than 2^32 records");
                let offset = self.bytes + self.buf.len() as u64;
                if self.last_indexed_offset.is_none_or(|last| offset - last >= LOG_INDEX_STRIDE_BYTES) {
                    self.last_indexed_offset = Some(offset);
                    self.new_index.push((position, u32::try_from(offset).expect("segment size fits in u32")));
                }
                let at = format::push_frame(&mut self.buf, position, flags, delta, payload);
                self.frame_offsets.push(at);
                self.next_position += 1;
                record_at += 1;
                payload_at += len;
            }
        }
        debug_assert_eq!(record_at, batch.lens.len());
        self.flush_chunk()?;
        match self.shared.config.fsync {
            FsyncPolicy::Always => self.sync()?,
            FsyncPolicy::Interval(interval) if may_sync && self.last_sync.elapsed() >= interval => self.sync()?,
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => {}
        }
        self.shared.publish_end(self.next_position);
        Ok(())
    }

    /// Writes the framed records in `buf` as one `write` and publishes the
    /// segment's new length and index entries (not yet visible: the log's
    /// visible end moves only after the batch is acknowledged).
    fn flush_chunk(&mut self) -> Result<(), Arc<IoFailure>> {
        let Some(&last) = self.frame_offsets.last() else { return Ok(()) };
        format::add_frame_flags(&mut self.buf, last, FLAG_BATCH_END);
        for &at in &self.frame_offsets {
            format::seal_frame(&mut self.buf, at);
        }
        self.file
            .write_all_at(&self.buf, self.bytes)
            .map_err(|e| Arc::new(io_failure("write", &self.path, self.bytes, e)))?;
        let counters = &self.shared.counters;
        counters.bytes_written.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        counters.records.fetch_add(self.frame_offsets.len() as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        self.bytes += self.buf.len() as u64;
        self.unsynced = true;
        {
            let mut segments = self.shared.segments.write().expect("segments lock");
            let active = segments.last_mut().expect("one active segment");
            assert_eq!(active.base_position, self.base_position, "the writer owns the last segment");
            active.end_position = self.next_position;
            active.valid_bytes = self.bytes;
            active.index.append(&mut self.new_index);
        }
        self.buf.clear();
        self.frame_offsets.clear();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), Arc<IoFailure>> {
        // Never retried: after a failed fdatasync the page cache may have
        // dropped the dirty pages, so a second call could falsely succeed.
        self.file.sync_data().map_err(|e| Arc::new(io_failure("fdatasync", &self.path, self.bytes, e)))?;
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// The index of the active segment as it stands.
    fn active_index(&self) -> format::SealedIndex {
        let segments = self.shared.segments.read().expect("segments lock");
        let active = segments.last().expect("one active segment");
        format::SealedIndex {
            base_position: active.base_position,
            end_position: active.end_position,
            segment_bytes: active.valid_bytes,
            entries: active.index.clone(),
        }
    }

    /// Seals the active segment (sync, index file) and starts a new one.
    fn roll(&mut self) -> Result<(), Arc<IoFailure>> {
        self.sync()?;
        let storage = Arc::clone(&self.shared.storage);
        let dir = self.shared.dir.clone();
        write_index_file(storage.as_ref(), &dir, &self.active_index()).map_err(Arc::new)?;
        let (file, path) = create_segment(storage.as_ref(), &dir, self.next_position).map_err(Arc::new)?;
        {
            let mut segments = self.shared.segments.write().expect("segments lock");
            let sealed = segments.last_mut().expect("one active segment");
            sealed.sealed = true;
            // Its index is in its file now. It is not cached here: a log
            // that takes appends and no reads of old segments (a dead
            // route's backlog) would otherwise hold the last
            // `SEALED_INDEXES_CACHED` indexes (~8 MiB) for nobody. A reader
            // that follows closely reads the file once, at its next seek.
            sealed.index = Vec::new();
            segments.push(SegmentMeta {
                base_position: self.next_position,
                end_position: self.next_position,
                valid_bytes: LOG_SEGMENT_HEADER_BYTES,
                file: Arc::clone(&file),
                path: Arc::clone(&path),
                index: Vec::new(),
                sealed: false,
            });
        }
        self.shared.counters.rolls.fetch_add(1, Ordering::Relaxed);
        self.file = file;
        self.path = path;
        self.base_position = self.next_position;
        self.bytes = LOG_SEGMENT_HEADER_BYTES;
        self.last_indexed_offset = None;
        self.unsynced = false;
        Ok(())
    }
}

impl QueuedGroup {
    fn count(&self) -> u32 {
        self.outcome.count
    }
}

/// Reads an index file; `None` if it is missing or does not decode (the
/// caller then scans the segment instead).
fn read_index_file(storage: &dyn Storage, index_path: &Path) -> Result<Option<format::SealedIndex>, IoFailure> {
    let index_file = match storage.open_file(index_path, OpenMode::ReadOnly) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_failure("open", index_path, 0, e)),
    };
    let len = index_file.len().map_err(|e| io_failure("stat", index_path, 0, e))?;
    let mut bytes = vec![0u8; len.min(64 * 1024 * 1024) as usize];
    read_exact_at(index_file.as_ref(), &mut bytes, 0).map_err(|e| io_failure("read", index_path, 0, e))?;
    Ok(format::decode_index(&bytes))
}

/// Removes `path`; a file that is already gone is fine.
fn remove_if_exists(storage: &dyn Storage, path: &Path, op: &'static str) -> Result<(), IoFailure> {
    match storage.remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_failure(op, path, 0, e)),
        _ => Ok(()),
    }
}

fn write_index_file(storage: &dyn Storage, dir: &Path, sealed: &format::SealedIndex) -> Result<(), IoFailure> {
    let path = dir.join(format::index_file_name(sealed.base_position));
    remove_if_exists(storage, &path, "remove stale index")?;
    let file = storage.open_file(&path, OpenMode::CreateNew).map_err(|e| io_failure("create index", &path, 0, e))?;
    file.write_all_at(&format::encode_index(sealed), 0).map_err(|e| io_failure("write", &path, 0, e))?;
    file.sync_data().map_err(|e| io_failure("fdatasync", &path, 0, e))
}

fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    base_position: u64,
) -> Result<(Arc<dyn StorageFile>, Arc<Path>), IoFailure> {
    let path: Arc<Path> = Arc::from(dir.join(format::segment_file_name(base_position)).as_path());
    let file = storage.open_file(&path, OpenMode::CreateNew).map_err(|e| io_failure("create segment", &path, 0, e))?;
    file.write_all_at(&format::encode_segment_header(base_position), 0)
        .map_err(|e| io_failure("write", &path, 0, e))?;
    file.sync_data().map_err(|e| io_failure("fdatasync", &path, 0, e))?;
    storage.sync_dir(dir).map_err(|e| io_failure("sync directory", dir, 0, e))?;
    Ok((file, path))
}

/// Creates the directory or checks that it is ours, and takes its lock.
fn prepare_dir(storage: &dyn Storage, dir: &Path) -> Result<Box<dyn Send + Sync + fmt::Debug>, OpenError> {
    if !storage.is_dir(dir).map_err(|e| io_failure("stat", dir, 0, e))? {
        storage.create_dir_all(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory => {
                OpenError::NotADirectory { path: dir.to_path_buf() }
            }
            _ => OpenError::Io(io_failure("create directory", dir, 0, e)),
        })?;
    }
    let marker = dir.join(format::MARKER_FILE);
    let mut entries: Vec<String> = storage
        .list_dir(dir)
        .map_err(|e| io_failure("list directory", dir, 0, e))?
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let mut marker_torn = false;
    if entries.iter().any(|e| e == format::MARKER_FILE) {
        let file = storage.open_file(&marker, OpenMode::ReadOnly).map_err(|e| io_failure("open", &marker, 0, e))?;
        let len = file.len().map_err(|e| io_failure("stat", &marker, 0, e))?.min(4096);
        let mut contents = vec![0u8; len as usize];
        read_exact_at(file.as_ref(), &mut contents, 0).map_err(|e| io_failure("read", &marker, 0, e))?;
        if contents != format::MARKER_CONTENTS {
            // The marker is created, written and synced before anything else
            // goes into the directory. A marker that holds only a prefix of
            // its contents (often nothing) next to no segment is a creation
            // that a crash or a failed write cut short, not another format.
            let has_segments = entries.iter().any(|e| format::parse_segment_file_name(e).is_some());
            if has_segments || !format::MARKER_CONTENTS.starts_with(&contents) {
                return Err(OpenError::UnsupportedFormat {
                    path: marker,
                    found: String::from_utf8_lossy(&contents).into_owned(),
                });
            }
            marker_torn = true;
        }
    } else if let Some(entry) = entries.into_iter().next() {
        return Err(OpenError::NotALogDirectory { path: dir.to_path_buf(), entry });
    } else {
        let file = storage.open_file(&marker, OpenMode::CreateNew).map_err(|e| io_failure("create", &marker, 0, e))?;
        write_marker(storage, dir, &marker, file.as_ref())?;
    }
    let lock_path = dir.join(format::LOCK_FILE);
    let lock_guard = storage.lock_file(&lock_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => OpenError::Locked { path: lock_path.clone() },
        _ => OpenError::Io(io_failure("lock", &lock_path, 0, e)),
    })?;
    if marker_torn {
        // Finished under the lock, so that two openers cannot both repair it.
        let file = storage.open_file(&marker, OpenMode::ReadWrite).map_err(|e| io_failure("open", &marker, 0, e))?;
        write_marker(storage, dir, &marker, file.as_ref())?;
    }
    Ok(lock_guard)
}

fn write_marker(storage: &dyn Storage, dir: &Path, marker: &Path, file: &dyn StorageFile) -> Result<(), IoFailure> {
    file.write_all_at(format::MARKER_CONTENTS, 0).map_err(|e| io_failure("write", marker, 0, e))?;
    file.sync_data().map_err(|e| io_failure("fdatasync", marker, 0, e))?;
    storage.sync_dir(dir).map_err(|e| io_failure("sync directory", dir, 0, e))
}

/// Loads every segment, checks continuity, and recovers the tail.
fn recover(
    storage: &dyn Storage,
    dir: &Path,
    config: &LogConfig,
) -> Result<(Vec<SegmentMeta>, RecoveryReport), OpenError> {
    let mut bases: Vec<u64> = storage
        .list_dir(dir)
        .map_err(|e| io_failure("list directory", dir, 0, e))?
        .iter()
        .filter_map(|n| format::parse_segment_file_name(&n.to_string_lossy()))
        .collect();
    bases.sort_unstable();
    let mut report = RecoveryReport { segments: bases.len(), ..RecoveryReport::default() };
    let mut segments: Vec<SegmentMeta> = Vec::with_capacity(bases.len().max(1));
    if bases.is_empty() {
        let (file, path) = create_segment(storage, dir, 0)?;
        segments.push(SegmentMeta {
            base_position: 0,
            end_position: 0,
            valid_bytes: LOG_SEGMENT_HEADER_BYTES,
            file,
            path,
            index: Vec::new(),
            sealed: false,
        });
        return Ok((segments, report));
    }
    let last = bases.len() - 1;
    for (i, &base) in bases.iter().enumerate() {
        let path: Arc<Path> = Arc::from(dir.join(format::segment_file_name(base)).as_path());
        let mode = if i == last { OpenMode::ReadWrite } else { OpenMode::ReadOnly };
        let file = storage.open_file(&path, mode).map_err(|e| io_failure("open", &path, 0, e))?;
        let file_len = file.len().map_err(|e| io_failure("stat", &path, 0, e))?;
        if let Some(previous) = segments.last()
            && previous.end_position != base
        {
            return Err(corruption(
                &path,
                0,
                format!(
                    "segment starts at position {base} but the previous segment ends at {} (a segment file is missing or damaged)",
                    previous.end_position
                ),
            )
            .into());
        }
        let header_ok = check_segment_header(file.as_ref(), &path, base, file_len)?;
        let meta = if i < last {
            if let Err(reason) = header_ok {
                return Err(corruption(&path, 0, reason).into());
            }
            load_sealed(storage, dir, config, file, path, base, file_len, &mut report)?
        } else {
            if let Err(reason) = header_ok {
                // A segment is created with its header in one write and synced
                // before any record goes in, so a bad header on a file no
                // longer than a header is a torn creation; anything else is damage.
                if file_len > LOG_SEGMENT_HEADER_BYTES {
                    return Err(corruption(&path, 0, reason).into());
                }
                file.write_all_at(&format::encode_segment_header(base), 0)
                    .map_err(|e| io_failure("write", &path, 0, e))?;
                file.sync_data().map_err(|e| io_failure("fdatasync", &path, 0, e))?;
            }
            // A clean close left an index for the active segment; it is
            // good only while the segment is exactly as long as it says.
            // Either way it goes: the segment will grow past it.
            let index_path = dir.join(format::index_file_name(base));
            let clean = read_index_file(storage, &index_path)?
                .filter(|i| i.base_position == base && i.segment_bytes == file_len);
            remove_if_exists(storage, &index_path, "remove stale index")?;
            match clean {
                Some(index) => {
                    report.clean_close = true;
                    SegmentMeta {
                        base_position: base,
                        end_position: index.end_position,
                        valid_bytes: index.segment_bytes,
                        file,
                        path,
                        index: index.entries,
                        sealed: false,
                    }
                }
                None => recover_tail(config, file, path, base, file_len.max(LOG_SEGMENT_HEADER_BYTES), &mut report)?,
            }
        };
        segments.push(meta);
    }
    Ok((segments, report))
}

fn check_segment_header(
    file: &dyn StorageFile,
    path: &Path,
    base: u64,
    file_len: u64,
) -> Result<Result<(), String>, IoFailure> {
    let mut header = [0u8; LOG_SEGMENT_HEADER_BYTES as usize];
    let available = file_len.min(LOG_SEGMENT_HEADER_BYTES) as usize;
    read_exact_at(file, &mut header[..available], 0).map_err(|e| io_failure("read", path, 0, e))?;
    Ok(match format::decode_segment_header(&header[..available]) {
        Ok(found) if found == base => Ok(()),
        Ok(found) => Err(format!("segment header says base position {found}, file name says {base}")),
        Err(e) => Err(format!("bad segment header: {e:?}")),
    })
}

/// Tracks group starts while scanning, for the sparse index.
#[derive(Default)]
struct IndexBuilder {
    entries: Vec<(u64, u32)>,
    last_offset: Option<u64>,
}

impl IndexBuilder {
    /// Indexes the record at `offset` if the last entry is a stride behind,
    /// by the same rule as the writer.
    fn frame(&mut self, position: u64, offset: u64) {
        if self.last_offset.is_none_or(|last| offset - last >= LOG_INDEX_STRIDE_BYTES) {
            self.entries.push((position, u32::try_from(offset).expect("segment size fits in u32")));
            self.last_offset = Some(offset);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn load_sealed(
    storage: &dyn Storage,
    dir: &Path,
    config: &LogConfig,
    file: Arc<dyn StorageFile>,
    path: Arc<Path>,
    base: u64,
    file_len: u64,
    report: &mut RecoveryReport,
) -> Result<SegmentMeta, OpenError> {
    let index_path = dir.join(format::index_file_name(base));
    let stored =
        read_index_file(storage, &index_path)?.filter(|i| i.base_position == base && i.segment_bytes == file_len);
    if let Some(index) = stored {
        return Ok(SegmentMeta {
            base_position: base,
            end_position: index.end_position,
            valid_bytes: index.segment_bytes,
            file,
            path,
            index: Vec::new(), // read again from the file when needed
            sealed: true,
        });
    }
    // No usable index: a sealed segment must scan clean from end to end.
    let mut expected = base;
    let mut builder = IndexBuilder::default();
    let mut out_of_sequence = None;
    let mut last_flags = FLAG_GROUP_END | FLAG_BATCH_END;
    let stop =
        segment::scan(file.as_ref(), &path, LOG_SEGMENT_HEADER_BYTES, file_len, config.record_bytes_max, |frame| {
            if frame.info.position != expected {
                out_of_sequence = Some(frame.offset);
                return false;
            }
            builder.frame(expected, frame.offset);
            last_flags = frame.info.flags;
            expected += 1;
            true
        })?;
    if let Some(offset) = out_of_sequence {
        return Err(corruption(&path, offset, format!("expected a record at position {expected}")).into());
    }
    match stop {
        ScanStop::Bad { offset, reason, .. } => return Err(corruption(&path, offset, reason).into()),
        ScanStop::End { .. } | ScanStop::Stopped { .. } => {}
    }
    if last_flags & FLAG_GROUP_END == 0 {
        return Err(corruption(&path, file_len, "sealed segment ends inside an atomic append").into());
    }
    let sealed = format::SealedIndex {
        base_position: base,
        end_position: expected,
        segment_bytes: file_len,
        entries: builder.entries,
    };
    write_index_file(storage, dir, &sealed)?;
    report.rebuilt_indexes += 1;
    Ok(SegmentMeta {
        base_position: base,
        end_position: expected,
        valid_bytes: file_len,
        file,
        path,
        index: Vec::new(), // in the file just written
        sealed: true,
    })
}

/// Scans the active segment, cuts a torn tail, and refuses real corruption.
fn recover_tail(
    config: &LogConfig,
    file: Arc<dyn StorageFile>,
    path: Arc<Path>,
    base: u64,
    file_len: u64,
    report: &mut RecoveryReport,
) -> Result<SegmentMeta, OpenError> {
    let mut expected = base;
    let mut builder = IndexBuilder::default();
    // Where the last complete atomic append ends: what recovery keeps.
    let mut kept_bytes = LOG_SEGMENT_HEADER_BYTES;
    let mut kept_position = base;
    let mut kept_index_len = 0;
    let mut batch_first = base;
    let mut sequence_error = None;
    let stop =
        segment::scan(file.as_ref(), &path, LOG_SEGMENT_HEADER_BYTES, file_len, config.record_bytes_max, |frame| {
            let info = frame.info;
            if info.position != expected {
                sequence_error =
                    Some((frame.offset, format!("expected a record at position {expected}, found {}", info.position)));
                return false;
            }
            let first = info.batch_first_position();
            if first != batch_first && info.batch_delta != 0 {
                sequence_error =
                    Some((frame.offset, format!("record {expected} claims a write batch starting at {first}")));
                return false;
            }
            batch_first = first;
            builder.frame(expected, frame.offset);
            expected += 1;
            if info.flags & FLAG_GROUP_END != 0 {
                kept_bytes = frame.offset + info.frame_len as u64;
                kept_position = expected;
                kept_index_len = builder.entries.len();
            }
            true
        })?;
    report.scanned_bytes = file_len - LOG_SEGMENT_HEADER_BYTES;
    if let Some((offset, reason)) = sequence_error {
        return Err(corruption(&path, offset, reason).into());
    }
    let torn_reason = match stop {
        ScanStop::Bad { offset, reason, .. } => {
            // A torn write only damages the batch being written. A valid frame
            // of any other batch further on means a later write survived this
            // damage: corruption, which we report rather than cut away.
            let allowed = [batch_first, expected];
            if let Some(later) =
                segment::find_later_batch(file.as_ref(), &path, offset, file_len, config.record_bytes_max, allowed)?
            {
                return Err(corruption(
                    &path,
                    offset,
                    format!(
                        "{reason}, and a later write batch survives at byte {later}: damage in the middle of the log"
                    ),
                )
                .into());
            }
            Some(reason.to_owned())
        }
        ScanStop::End { .. } | ScanStop::Stopped { .. } => {
            (kept_position != expected).then(|| "the last atomic append is incomplete".to_owned())
        }
    };
    if torn_reason.is_some() || kept_bytes < file_len {
        let removed = file_len.saturating_sub(kept_bytes);
        if removed > 0 || torn_reason.is_some() {
            file.set_len(kept_bytes).map_err(|e| io_failure("truncate", &path, kept_bytes, e))?;
            file.sync_data().map_err(|e| io_failure("fdatasync", &path, kept_bytes, e))?;
            report.truncated = Some(TornTail {
                file: path.to_path_buf(),
                offset: kept_bytes,
                bytes: removed,
                reason: torn_reason.unwrap_or_else(|| "trailing bytes after the last record".to_owned()),
            });
        }
    }
    if kept_bytes > file_len {
        // The write was torn inside the padding of its last frame, which no
        // checksum covers: every frame is whole. Put the padding back, or
        // reads (which read whole frames) would run past the end of the file.
        assert_eq!(report.truncated, None, "a tail is either cut or padded, never both");
        assert!(kept_bytes - file_len < LOG_FRAME_ALIGN_BYTES, "only padding can be missing");
        file.set_len(kept_bytes).map_err(|e| io_failure("extend", &path, file_len, e))?;
        file.sync_data().map_err(|e| io_failure("fdatasync", &path, kept_bytes, e))?;
    }
    builder.entries.truncate(kept_index_len);
    Ok(SegmentMeta {
        base_position: base,
        end_position: kept_position,
        valid_bytes: kept_bytes,
        file,
        path,
        index: builder.entries,
        sealed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("record-{i}-{}", "y".repeat((i % 700) as usize)).into_bytes()
    }

    #[test]
    fn sealed_segments_keep_their_index_in_its_file_not_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig::small_segments(16 * 1024);
        let count = 5_000u64;
        let log = Log::open(dir.path(), config.clone()).unwrap();
        for i in 0..count {
            log.append(&[payload(i)]).unwrap();
        }
        // Appends alone (no reads of sealed segments) cache no index.
        assert!(lock(&log.shared.sealed_indexes).is_empty(), "appends cached sealed indexes");
        let check = |log: &Log| {
            let segments = log.shared.segments.read().unwrap();
            assert!(segments.len() > 3 * SEALED_INDEXES_CACHED, "{} segments", segments.len());
            for segment in segments.iter().filter(|s| s.sealed) {
                assert!(segment.index.is_empty(), "sealed segment {} holds its index", segment.base_position);
            }
            drop(segments);
            // Point reads all over the log, more segments than the cache holds.
            for i in (0..count).step_by(7).chain((0..count).rev().step_by(11)) {
                let record = log.read(i, 1, u64::MAX).unwrap().remove(0);
                assert_eq!((record.position, record.payload.as_ref()), (i, payload(i).as_slice()));
            }
            assert!(lock(&log.shared.sealed_indexes).len() <= SEALED_INDEXES_CACHED);
        };
        check(&log);
        log.close().unwrap();
        drop(log);
        // Reopened, and with one sealed index file gone: the same records.
        let log = Log::open(dir.path(), config).unwrap();
        check(&log);
        std::fs::remove_file(dir.path().join(format::index_file_name(0))).unwrap();
        lock(&log.shared.sealed_indexes).clear();
        check(&log);
    }
}
