//! The write path. Validation (expected versions, ids, exists-or-write) and
//! position assignment are one atomic step per write, under the state lock;
//! the log assigns positions in the order writes are queued in it, which is
//! the order they take that lock.
//!
//! Two ways in:
//! - **A thread** (`Store::append`, `exists_or_write`, system writes) runs
//!   its own write ([`Shared::execute`]): it takes the lock, validates,
//!   queues the records in the log and applies them to the tail, releases
//!   the lock, and then waits for the log's acknowledgement beside the other
//!   appenders of its log batch (one system call wakes the batch). Under
//!   `fsync=interval | never` it queues without waking the log's writer
//!   thread and writes the batch itself once the lock is released
//!   (`Log::queue_deferred`, `Log::write_deferred`): before, the writer's
//!   wake-up was a system call under the lock, 9 % of the samples at 16
//!   threads (`examples/fill.rs streams=1000000`: 127,000 events/s before
//!   and 159,000 after, `docs/benchmarks.md`). What the
//!   tail cannot answer (the stream's state, the events' ids, once flushed
//!   to the index) it reads from the index with the lock released, and uses
//!   only if no flush finished meanwhile ([`crate::tail::Tail::remember`]),
//!   so the lock is held for map lookups and the log's queue (about 1 µs
//!   a write in a profile of `bench store` at 1M streams: validation and
//!   queueing were 7.5 % of both cores at ~134,000 writes/s).
//! - **A task** (`append_async`, `exists_or_write_async`: `pending.rs`)
//!   under `fsync=always` runs its write on its own thread the same way
//!   ([`Shared::run_here`]), except that the log's writer thread answers it
//!   (a callback wakes the task) and that it never waits there: when the
//!   tail has no room, or the sequencer holds requests that came before it,
//!   it goes to the sequencer instead. Under the other policies, tasks and
//!   `replicate` (several requests the log commits together) queue
//!   requests for the sequencer thread, which validates everything queued
//!   in one pass under the lock and submits to the log. Under
//!   `fsync=always` the log's writer thread answers each request once it is
//!   durable; under the others the sequencer, after its pass and with the
//!   lock released, writes the pass's batch itself and answers it
//!   (`Log::write_deferred`): a write to the OS takes about a microsecond,
//!   less than waking the writer thread for it (`bench node`, relaxed node:
//!   −14 % server CPU per event at 256 × 100 B, `docs/benchmarks.md`).
//!
//! Before, threads went through the sequencer too and were each woken by
//! their own `unpark`: at 256 writing threads that hand-off and wake-up cost
//! more than the lock does now (`docs/benchmarks.md`, `bench store`). A
//! panic while processing poisons the store and answers every waiting
//! writer. Lifecycle: the sequencer is started by `Store::open` and stopped
//! by `Store::close` after it has drained its queue; threads are refused
//! once the store is closing.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Waker;
use std::thread::Thread;

use edgebus_log::{AppendError, AppendOutcome, FsyncPolicy, Queued};
use edgebus_types::{
    EventId, EventType, ExpectedVersion, NewEvent, Origin, RecordedEvent, StreamName, WrongExpectedVersion,
};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::WriteError;
use crate::index::StreamState;
use crate::record::{self, Command};
use crate::store::{AppendResult, DurableState, ExistsOrWrite, Inner, Shared, index_write};
use crate::tail::{Applied, IndexReads};

/// Requests that may wait in the queue; writers beyond it wait for space.
pub(crate) const REQUESTS_QUEUED_MAX: usize = 4096;

/// Builds a system command from the current state of its target stream, or refuses.
pub(crate) type CommandBuilder = Box<dyn FnOnce(&StreamState) -> Result<Command, WriteError> + Send>;

/// One write, as queued for the sequencer.
pub(crate) enum Request {
    Append {
        stream: StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    },
    ExistsOrWrite {
        stream: StreamName,
        index: u64,
        event: NewEvent,
    },
    /// Exists-or-write of an event replicated from its home site; with no
    /// index, at the stream's end unless its id is already in the stream.
    Replica {
        stream: StreamName,
        index: Option<u64>,
        event: NewEvent,
        origin: Origin,
    },
    /// A command event in the system stream `stream` about `target`.
    Command {
        stream: StreamName,
        target: StreamName,
        timestamp_ms: u64,
        build: CommandBuilder,
    },
}

impl Request {
    /// The stream whose state processing the request reads, and the ids it
    /// looks up (a command's are few and read under the lock).
    fn index_keys(&self) -> Option<(&StreamName, impl Iterator<Item = EventId>)> {
        let (stream, events) = match self {
            Self::Append { stream, events, .. } => (stream, events.as_slice()),
            Self::ExistsOrWrite { stream, event, .. } | Self::Replica { stream, event, .. } => {
                (stream, std::slice::from_ref(event))
            }
            Self::Command { .. } => return None,
        };
        Some((stream, events.iter().map(|e| e.id)))
    }

    /// The most changes the request adds to the tail: an op per event, and
    /// a command's event and the state it sets.
    fn changes(&self) -> usize {
        match self {
            Self::Append { events, .. } => events.len(),
            Self::ExistsOrWrite { .. } | Self::Replica { .. } => 1,
            Self::Command { .. } => 2,
        }
    }
}

/// What a write returns.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Append(AppendResult),
    ExistsOrWrite(ExistsOrWrite),
    Position(u64),
}

pub(crate) enum Reply {
    Done(Result<Outcome, WriteError>),
    /// The answer is known, but refers to positions that may not be durable
    /// yet: the writer waits for them before returning it.
    AfterDurable {
        end: u64,
        outcome: Outcome,
    },
}

/// What processing a request came to.
pub(crate) enum Processed {
    /// Answered without writing (an error is the `Err` beside this).
    Answered(Reply),
    /// Queued in the log; the log's writer thread answers its slot.
    Submitted,
    /// Queued in the log; the calling thread waits for it.
    Queued(QueuedWrite),
}

/// A write the calling thread queued in the log itself.
#[derive(Clone, Copy)]
pub(crate) struct QueuedWrite {
    log: Queued,
    first_version: u64,
    outcome: fn(AppendResult) -> Outcome,
}

/// The error every write gets once a panic stopped the store.
fn stopped_after(panic: &(dyn std::any::Any + Send)) -> WriteError {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    WriteError::Index(format!("the store stopped after an internal error: {message}"))
}

/// Records an append's end (or the log's failure) for threads and tasks
/// waiting for positions to be durable, and wakes those now answered.
fn note_durable(signal: &(Mutex<DurableState>, Condvar), result: &Result<AppendOutcome, AppendError>) {
    let durable_waiters = {
        let (state, condvar) = signal;
        let mut state = state.lock();
        match result {
            Ok(o) => state.end = state.end.max(o.positions().end),
            Err(_) => state.failed = true,
        }
        condvar.notify_all();
        state.take_ready_waiters()
    };
    for waker in durable_waiters {
        waker.wake();
    }
}

/// Who waits for a slot's reply: a parked thread or an async task.
enum Waiter {
    Thread(Thread),
    Task(Option<Waker>),
}

struct SlotState {
    reply: Option<Reply>,
    waiter: Waiter,
}

/// Where the sequencer or the log's writer thread leaves a request's reply.
pub(crate) struct Slot {
    state: Mutex<SlotState>,
}

impl Slot {
    /// A slot the calling thread waits on (parks).
    fn for_thread() -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(SlotState { reply: None, waiter: Waiter::Thread(std::thread::current()) }) })
    }

    /// A slot a task polls (see [`crate::pending`]).
    pub(crate) fn for_task() -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(SlotState { reply: None, waiter: Waiter::Task(None) }) })
    }

    fn complete(&self, reply: Reply) {
        enum Wake {
            Thread(Thread),
            Task(Waker),
        }
        let wake = {
            let mut state = self.state.lock();
            state.reply = Some(reply);
            match &mut state.waiter {
                Waiter::Thread(thread) => Some(Wake::Thread(thread.clone())),
                Waiter::Task(waker) => waker.take().map(Wake::Task),
            }
        };
        match wake {
            Some(Wake::Thread(thread)) => thread.unpark(),
            Some(Wake::Task(waker)) => waker.wake(),
            None => {}
        }
    }

    fn wait(&self) -> Reply {
        loop {
            if let Some(reply) = self.state.lock().reply.take() {
                return reply;
            }
            std::thread::park();
        }
    }

    /// The reply if it has come; else `waker` is woken when it does.
    pub(crate) fn poll_reply(&self, waker: &Waker) -> Option<Reply> {
        let mut state = self.state.lock();
        if let Some(reply) = state.reply.take() {
            return Some(reply);
        }
        if let Waiter::Task(registered) = &mut state.waiter
            && !registered.as_ref().is_some_and(|w| w.will_wake(waker))
        {
            *registered = Some(waker.clone());
        }
        None
    }
}

/// The queue between writers and the sequencer.
#[derive(Default)]
pub(crate) struct Requests {
    pub(crate) items: Vec<(Request, Arc<Slot>)>,
    /// The sequencer took requests and has not finished processing them.
    pub(crate) in_pass: bool,
    pub(crate) closing: bool,
    /// Tasks waiting for room in `items`, woken when the sequencer takes it
    /// (or the store closes). At most one entry per waiting write per wake.
    pub(crate) space_waiters: Vec<Waker>,
}

/// What came of queueing a write without waiting.
pub(crate) enum QueueAttempt {
    Queued,
    /// The queue is full; the waker is woken when it has room.
    Full(Request),
    Closed(WriteError),
}

/// Ids of system events: a fixed prefix and the position, so they are
/// unique and deterministic.
fn system_event_id(position: u64) -> EventId {
    EventId::from_u128((0xedb5_0000_0000_0000u128 << 64) | u128::from(position))
}

impl Shared {
    /// Runs `request` on the calling thread: validates it and queues its
    /// records in the log under the state lock, then waits for the log's
    /// acknowledgement with the rest of its log batch (see the module docs).
    pub(crate) fn execute(&self, request: Request) -> Result<Outcome, WriteError> {
        let processed = {
            let Some(mut inner) = self.lock_for(&request, true)? else {
                unreachable!("a writer that waits for tail space gets the lock")
            };
            self.process_locked(&mut inner, request, None)
        };
        if self.config.log.fsync != FsyncPolicy::Always {
            // Writes what this thread queued (or leaves it to the thread
            // writing now, which writes it next), before waiting for it.
            self.log.write_deferred();
        }
        match processed {
            Ok(Ok(Processed::Answered(reply))) => self.answer(reply),
            Ok(Ok(Processed::Queued(queued))) => self.wait_queued(queued),
            Ok(Ok(Processed::Submitted)) => unreachable!("a request with no slot is never submitted with a callback"),
            Ok(Err(error)) => Err(error),
            Err(panic) => Err(self.poison(panic.as_ref())),
        }
    }

    /// Runs a task's write on the task's thread, as [`Shared::execute`]
    /// does, when that needs no waiting; the log's writer thread then
    /// answers `slot`. Gives the request back (for the sequencer) when the
    /// sequencer holds requests that came before it (so that it keeps its
    /// place after them), when the tail has no room (the sequencer waits for
    /// it; a runtime's worker must not), and for commands. What the tail
    /// cannot answer is read from the index on the task's thread, as a
    /// thread's write does: for a new id or stream, point lookups answered
    /// by the tables' filters (pinned, or partitions in the block cache);
    /// a data block only for one that is there.
    ///
    /// Only under `fsync=always`: there the log's writer spends its time in
    /// `fdatasync` and the writes queued meanwhile form its next batch
    /// whoever queues them, so the hand-off to the sequencer is pure cost.
    /// Under the other policies a write to the OS takes microseconds and the
    /// writer is mostly idle: each write queued on its own wakes it for a
    /// batch of its own, while the sequencer's pass queues many at once. In
    /// `bench node` at 256 clients this path gave +10 % events/s with
    /// `fsync=always` and −10 % with `fsync=interval` (`docs/benchmarks.md`).
    fn run_here(&self, request: Request, slot: &Arc<Slot>) -> Result<Result<(), Request>, WriteError> {
        if self.config.log.fsync != FsyncPolicy::Always || matches!(request, Request::Command { .. }) {
            return Ok(Err(request));
        }
        {
            let requests = self.requests.lock();
            // Closing: the queue's check refuses it.
            if !requests.items.is_empty() || requests.in_pass || requests.closing {
                return Ok(Err(request));
            }
        }
        let processed = {
            let Some(mut inner) = self.lock_for(&request, false)? else { return Ok(Err(request)) };
            self.process_locked(&mut inner, request, Some(slot))
        };
        match processed {
            Ok(Ok(Processed::Answered(reply))) => slot.complete(reply),
            Ok(Ok(Processed::Submitted)) => {} // the log's writer thread completes it
            Ok(Ok(Processed::Queued(_))) => unreachable!("a request with a slot is submitted with a callback"),
            Ok(Err(error)) => slot.complete(Reply::Done(Err(error))),
            Err(panic) => slot.complete(Reply::Done(Err(self.poison(panic.as_ref())))),
        }
        Ok(Ok(()))
    }

    /// Takes the state lock for `request`, with what the tail cannot answer
    /// read from the index with the lock released, so that other writers go
    /// on meanwhile; read again if a flush finished in between (it may have
    /// changed the index). Waits for room in the tail if `wait`, else
    /// returns `None` when there is none.
    fn lock_for(&self, request: &Request, wait: bool) -> Result<Option<MutexGuard<'_, Inner>>, WriteError> {
        let mut inner = self.inner.lock();
        let mut reads: Option<(u64, IndexReads)> = None;
        loop {
            if wait {
                self.wait_for_tail_space(&mut inner, request.changes());
            } else if !self.tail_has_room(&inner, request.changes()) {
                return Ok(None);
            }
            if inner.closing || self.poisoned.load(Ordering::Acquire) {
                return Err(WriteError::Unavailable(AppendError::Closed));
            }
            inner.tail.forget_index_read();
            let Some((stream, ids)) = request.index_keys() else { break };
            let (state, ids) = inner.tail.index_lookups(stream.as_str(), ids);
            if !state && ids.is_empty() {
                break;
            }
            let dropped = inner.tail.generations_dropped();
            match reads.take() {
                Some((read_at, reads)) if read_at == dropped => {
                    inner.tail.remember(reads);
                    break;
                }
                _ => {
                    let stream = state.then_some(stream.as_str());
                    let read = MutexGuard::unlocked(&mut inner, || {
                        let read = IndexReads::read(&self.index, stream, &ids);
                        #[cfg(test)]
                        {
                            let hook = self.after_unlocked_index_read.lock().take();
                            if let Some(hook) = hook {
                                hook(self);
                            }
                        }
                        read
                    });
                    reads = Some((dropped, read.map_err(index_write)?));
                }
            }
        }
        Ok(Some(inner))
    }

    /// Processes `request` under the lock `lock_for` took (a panic is
    /// caught and returned), and asks the indexer to flush if it is time.
    fn process_locked(
        &self,
        inner: &mut MutexGuard<'_, Inner>,
        request: Request,
        slot: Option<&Arc<Slot>>,
    ) -> std::thread::Result<Result<Processed, WriteError>> {
        let processed = std::panic::catch_unwind(AssertUnwindSafe(|| self.process(inner, request, slot)));
        inner.tail.forget_index_read();
        if inner.tail.unflushed() >= self.config.index_flush_events {
            self.flush_wanted.notify_one();
        }
        processed
    }

    /// After a panic while processing (a bug): stop taking writes; the
    /// sequencer answers whatever is queued for it, and threads waiting for
    /// tail space look again. Returns the error the write gets.
    fn poison(&self, panic: &(dyn std::any::Any + Send)) -> WriteError {
        self.poisoned.store(true, Ordering::Release);
        self.requests_ready.notify_all();
        self.tail_space.notify_all();
        stopped_after(panic)
    }

    /// Whether the tail has room for `changes` more; a request larger than
    /// the tail's bound has room only in an empty tail.
    fn tail_has_room(&self, inner: &Inner, changes: usize) -> bool {
        inner.tail.len() == 0 || inner.tail.len() + changes <= self.config.tail_events_max
    }

    /// Waits (with the state lock released) until the tail has room for
    /// `changes` more; a request larger than the tail's bound waits for an
    /// empty tail. Returns at once when the store is poisoned.
    fn wait_for_tail_space(&self, inner: &mut MutexGuard<'_, Inner>, changes: usize) {
        let mut waited = false;
        while !self.tail_has_room(inner, changes) && !self.poisoned.load(Ordering::Acquire) && !inner.closing {
            // The index is behind: wait for the indexer to catch up.
            inner.waiting_for_tail = true;
            waited = true;
            self.flush_wanted.notify_one();
            self.tail_space.wait(inner);
        }
        // Only a writer that waited clears the flag: one whose write fits
        // must not hide another's wait from the indexer. Every waiter is
        // woken after a flush and sets it again if it still has no room.
        if waited {
            inner.waiting_for_tail = false;
        }
    }

    /// Waits for the log to acknowledge a write this thread queued.
    fn wait_queued(&self, queued: QueuedWrite) -> Result<Outcome, WriteError> {
        let result = self.log.wait(queued.log);
        note_durable(&self.durable, &result);
        result
            .map(|o| {
                (queued.outcome)(AppendResult {
                    first_version: queued.first_version,
                    first_position: o.first_position,
                    count: o.count,
                    already_written: false,
                })
            })
            .map_err(WriteError::from)
    }

    /// Queues every request at once (so the sequencer takes them in one pass
    /// and the log commits them together), then waits for each reply.
    pub(crate) fn execute_many(&self, requests: Vec<Request>) -> Vec<Result<Outcome, WriteError>> {
        let mut slots = Vec::with_capacity(requests.len());
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let mut queue = self.requests.lock();
            loop {
                if queue.closing || self.poisoned.load(Ordering::Acquire) {
                    drop(queue);
                    let mut out: Vec<_> = slots.iter().map(|slot: &Arc<Slot>| self.reply_of(slot)).collect();
                    out.extend(requests.map(|_| Err(WriteError::Unavailable(AppendError::Closed))));
                    return out;
                }
                if queue.items.len() < REQUESTS_QUEUED_MAX {
                    break;
                }
                self.requests_space.wait(&mut queue);
            }
            let wake = queue.items.is_empty();
            while queue.items.len() < REQUESTS_QUEUED_MAX {
                let Some(request) = requests.next() else { break };
                let slot = Slot::for_thread();
                queue.items.push((request, Arc::clone(&slot)));
                slots.push(slot);
            }
            if wake {
                self.requests_ready.notify_one();
            }
        }
        slots.iter().map(|slot| self.reply_of(slot)).collect()
    }

    /// Starts a task's write without waiting: runs it on the calling thread
    /// if it can ([`Shared::run_here`]), else queues it for the sequencer if
    /// the queue has room; when it is full, `waker` is woken once the
    /// sequencer has taken the queue.
    pub(crate) fn try_queue(&self, request: Request, slot: &Arc<Slot>, waker: &Waker) -> QueueAttempt {
        let request = match self.run_here(request, slot) {
            Ok(Ok(())) => return QueueAttempt::Queued,
            Ok(Err(request)) => request,
            Err(error) => return QueueAttempt::Closed(error),
        };
        let mut requests = self.requests.lock();
        if requests.closing || self.poisoned.load(Ordering::Acquire) {
            return QueueAttempt::Closed(WriteError::Unavailable(AppendError::Closed));
        }
        if requests.items.len() >= REQUESTS_QUEUED_MAX {
            if !requests.space_waiters.iter().any(|w| w.will_wake(waker)) {
                requests.space_waiters.push(waker.clone());
            }
            return QueueAttempt::Full(request);
        }
        let wake = requests.items.is_empty();
        requests.items.push((request, Arc::clone(slot)));
        if wake {
            self.requests_ready.notify_one();
        }
        QueueAttempt::Queued
    }

    /// Wakes every thread and task waiting for room in the queue.
    pub(crate) fn notify_space(&self, waiters: Vec<Waker>) {
        self.requests_space.notify_all();
        for waker in waiters {
            waker.wake();
        }
    }

    fn reply_of(&self, slot: &Slot) -> Result<Outcome, WriteError> {
        self.answer(slot.wait())
    }

    /// The outcome of `reply`, once what it refers to is durable.
    fn answer(&self, reply: Reply) -> Result<Outcome, WriteError> {
        match reply {
            Reply::Done(result) => result,
            Reply::AfterDurable { end, outcome } => {
                self.wait_durable(end)?;
                Ok(outcome)
            }
        }
    }

    /// The sequencer thread: takes everything queued and processes it in one
    /// pass under the state lock. Returns once closing and drained.
    pub(crate) fn run_sequencer(&self) {
        let mut batch = Vec::new();
        loop {
            let space_waiters = {
                let mut requests = self.requests.lock();
                requests.in_pass = false;
                while requests.items.is_empty() && !requests.closing {
                    self.requests_ready.wait(&mut requests);
                }
                if requests.items.is_empty() {
                    return;
                }
                std::mem::swap(&mut requests.items, &mut batch);
                requests.in_pass = true;
                std::mem::take(&mut requests.space_waiters)
            };
            self.notify_space(space_waiters);
            let mut inner = self.inner.lock();
            let mut pending = batch.drain(..);
            while let Some((request, slot)) = pending.next() {
                // The tail never holds more than `tail_events_max` changes.
                self.wait_for_tail_space(&mut inner, request.changes());
                if self.poisoned.load(Ordering::Acquire) {
                    slot.complete(Reply::Done(Err(WriteError::Unavailable(AppendError::Closed))));
                    continue;
                }
                inner.tail.forget_index_read();
                let processed =
                    std::panic::catch_unwind(AssertUnwindSafe(|| self.process(&mut inner, request, Some(&slot))));
                inner.tail.forget_index_read();
                match processed {
                    Ok(Ok(Processed::Answered(reply))) => slot.complete(reply),
                    Ok(Ok(Processed::Submitted)) => {} // the log's writer thread completes it
                    Ok(Ok(Processed::Queued(_))) => unreachable!("a request with a slot is submitted with a callback"),
                    Ok(Err(error)) => slot.complete(Reply::Done(Err(error))),
                    Err(panic) => {
                        // A bug: stop taking writes and answer everyone
                        // waiting rather than leave them hanging.
                        drop(inner);
                        self.stop_after_panic(&slot, panic.as_ref(), &mut pending);
                        // What the pass submitted before is written and answered.
                        self.log.write_deferred();
                        return;
                    }
                }
            }
            if inner.tail.unflushed() >= self.config.index_flush_events {
                self.flush_wanted.notify_one();
            }
            drop(inner);
            self.log.write_deferred();
        }
    }

    /// After a panic while processing: poison the store and fail the
    /// request that panicked, the rest of its batch and everything queued.
    fn stop_after_panic(
        &self,
        slot: &Slot,
        panic: &(dyn std::any::Any + Send),
        pending: &mut std::vec::Drain<'_, (Request, Arc<Slot>)>,
    ) {
        self.poisoned.store(true, Ordering::Release);
        let failure = || stopped_after(panic);
        slot.complete(Reply::Done(Err(failure())));
        for (_, waiting) in pending.by_ref() {
            waiting.complete(Reply::Done(Err(failure())));
        }
        let (queued, space_waiters) = {
            let mut requests = self.requests.lock();
            (std::mem::take(&mut requests.items), std::mem::take(&mut requests.space_waiters))
        };
        for (_, waiting) in queued {
            waiting.complete(Reply::Done(Err(failure())));
        }
        self.notify_space(space_waiters);
        self.tail_space.notify_all();
    }

    /// Validates `request` and queues its records in the log. With a slot
    /// (the sequencer) the log's writer thread answers it; without, the
    /// caller waits for the returned [`QueuedWrite`].
    fn process(&self, inner: &mut Inner, request: Request, slot: Option<&Arc<Slot>>) -> Result<Processed, WriteError> {
        match request {
            Request::Append { stream, expected, events } => self.process_append(inner, &stream, expected, events, slot),
            Request::ExistsOrWrite { stream, index, event } => {
                self.process_exists_or_write(inner, &stream, Some(index), event, None, slot)
            }
            Request::Replica { stream, index, event, origin } => {
                self.process_exists_or_write(inner, &stream, index, event, Some(&origin), slot)
            }
            Request::Command { stream, target, timestamp_ms, build } => {
                let target_state =
                    inner.tail.state(&self.index, target.as_str()).map_err(index_write)?.unwrap_or_default();
                let command = build(&target_state)?;
                let state = inner.tail.state(&self.index, stream.as_str()).map_err(index_write)?.unwrap_or_default();
                let event = NewEvent {
                    id: system_event_id(inner.next_position),
                    event_type: EventType::new(command.event_type()).expect("valid system type"),
                    data: command.encode(),
                    metadata: Vec::new(),
                    timestamp_ms,
                };
                event.validate()?;
                self.submit(inner, &stream, vec![event], state.next_version, None, slot, |result| {
                    Outcome::Position(result.first_position)
                })
            }
        }
    }

    fn process_append(
        &self,
        inner: &mut Inner,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        slot: Option<&Arc<Slot>>,
    ) -> Result<Processed, WriteError> {
        let state = inner.tail.state_for_write(&self.index, stream.as_str()).map_err(index_write)?.unwrap_or_default();
        if state.tombstoned {
            return Err(WriteError::StreamDeleted { stream: stream.clone() });
        }
        if state.origin != 0 && !stream.is_system() {
            return Err(WriteError::ReplicaStream { stream: stream.clone() });
        }
        if let Some(existing) = inner.tail.id_for_write(&self.index, &events[0].id).map_err(index_write)? {
            return self
                .idempotent_retry(inner, stream, expected, &events, existing.position, existing.version)
                .map(Processed::Answered);
        }
        self.check_ids_unused(inner, &events[1..])?;
        expected
            .check(state.current_version())
            .map_err(|source| WriteError::WrongExpectedVersion { stream: stream.clone(), source })?;
        self.submit(inner, stream, events, state.next_version, None, slot, Outcome::Append)
    }

    fn process_exists_or_write(
        &self,
        inner: &mut Inner,
        stream: &StreamName,
        index: Option<u64>,
        event: NewEvent,
        origin: Option<&Origin>,
        slot: Option<&Arc<Slot>>,
    ) -> Result<Processed, WriteError> {
        let state = inner.tail.state_for_write(&self.index, stream.as_str()).map_err(index_write)?.unwrap_or_default();
        if state.tombstoned {
            return Err(WriteError::StreamDeleted { stream: stream.clone() });
        }
        match origin {
            None if state.origin != 0 => return Err(WriteError::ReplicaStream { stream: stream.clone() }),
            Some(origin) if state.origin != origin.site.id() && (state.origin != 0 || state.next_version > 0) => {
                let reason =
                    if state.origin == 0 { "it is this site's own stream" } else { "it is another site's stream" };
                return Err(WriteError::NotReplica { stream: stream.clone(), site: origin.site.to_string(), reason });
            }
            _ => {}
        }
        let count = state.next_version;
        // A replicated event beyond the replica's end: the stream was sent
        // sparse before (sampled, compacted), so the replica's versions are
        // its own. It goes after the last event unless its id is already
        // there, with the gap said in its origin note.
        let mut bridged = None;
        let index = match (index, origin) {
            (Some(index), Some(from)) if index > count => match self.version_of_id(inner, stream, &event.id)? {
                Some(version) => version,
                None => {
                    let gap = format!("origin version {index} after a gap");
                    let note = if from.note.is_empty() { gap } else { format!("{}; {gap}", from.note) };
                    bridged = Some(Origin { note, ..from.clone() });
                    count
                }
            },
            (Some(index), _) => index,
            // Where the id already is in this stream, else the end (where
            // an id used by another stream is refused below).
            (None, _) => self.version_of_id(inner, stream, &event.id)?.unwrap_or(count),
        };
        let origin = bridged.as_ref().or(origin);
        if index < count {
            let entry = inner.tail.version(&self.index, stream.as_str(), index).map_err(index_write)?;
            // An index rebuilt after its record was reclaimed no longer knows it.
            let Some(entry) = entry else {
                return Err(WriteError::VersionRemoved { stream: stream.clone(), index, count });
            };
            let outcome =
                ExistsOrWrite::Exists { position: entry.position, same: entry.content_hash == event.content_hash() };
            // The winner's write may still be in flight: answer once it is durable.
            return Ok(Processed::Answered(Reply::AfterDurable {
                end: entry.position + 1,
                outcome: Outcome::ExistsOrWrite(outcome),
            }));
        }
        if index > count {
            return Err(WriteError::Gap { stream: stream.clone(), index, count });
        }
        self.check_ids_unused(inner, std::slice::from_ref(&event))?;
        self.submit(inner, stream, vec![event], index, origin, slot, |result| {
            Outcome::ExistsOrWrite(ExistsOrWrite::Written { position: result.first_position })
        })
    }

    /// The version at which `id` sits in `stream`, if it does.
    fn version_of_id(&self, inner: &Inner, stream: &StreamName, id: &EventId) -> Result<Option<u64>, WriteError> {
        let Some(existing) = inner.tail.id_for_write(&self.index, id).map_err(index_write)? else { return Ok(None) };
        let entry = inner.tail.version(&self.index, stream.as_str(), existing.version).map_err(index_write)?;
        Ok(entry.is_some_and(|entry| entry.position == existing.position).then_some(existing.version))
    }

    fn check_ids_unused(&self, inner: &Inner, events: &[NewEvent]) -> Result<(), WriteError> {
        for event in events {
            if let Some(entry) = inner.tail.id_for_write(&self.index, &event.id).map_err(index_write)? {
                let stored = self.read_position(entry.position).map_err(|e| index_write(e.to_string()))?;
                return Err(WriteError::DuplicateEventId {
                    id: event.id,
                    position: entry.position,
                    stream: stored.stream,
                    version: entry.version,
                });
            }
        }
        Ok(())
    }

    /// The first id of an append is already in the log: succeed without
    /// writing if the whole append is already there, identically and under
    /// the same expectation.
    fn idempotent_retry(
        &self,
        inner: &Inner,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: &[NewEvent],
        first_position: u64,
        first_version: u64,
    ) -> Result<Reply, WriteError> {
        let duplicate = || -> WriteError {
            match self.read_position(first_position) {
                Ok(stored) => WriteError::DuplicateEventId {
                    id: events[0].id,
                    position: first_position,
                    stream: stored.stream,
                    version: first_version,
                },
                Err(e) => index_write(e.to_string()),
            }
        };
        for (i, event) in events.iter().enumerate() {
            let version = first_version + i as u64;
            let entry = inner.tail.version(&self.index, stream.as_str(), version).map_err(index_write)?;
            let id_entry = inner.tail.id(&self.index, &event.id).map_err(index_write)?;
            let same_place = matches!((entry, id_entry), (Some(e), Some(id)) if e.position == id.position);
            if !same_place {
                // The first id lives in another stream or at another version: a duplicate.
                return Err(if i == 0 {
                    duplicate()
                } else {
                    WriteError::IdempotencyConflict { id: event.id, stream: stream.clone() }
                });
            }
            if entry.is_some_and(|e| e.content_hash != event.content_hash()) {
                return Err(WriteError::IdempotencyConflict { id: event.id, stream: stream.clone() });
            }
        }
        let state = inner.tail.state(&self.index, stream.as_str()).map_err(index_write)?.unwrap_or_default();
        let before = first_version.checked_sub(1);
        let consistent = match expected {
            ExpectedVersion::Any => true,
            // The original found no stream: none was written yet, or a soft
            // delete had just hidden it, which leaves `deleted_before` at or
            // past `first_version` (the state keeps no finer history).
            ExpectedVersion::NoStream => first_version == 0 || state.deleted_before >= first_version,
            ExpectedVersion::StreamExists => before.is_some(),
            ExpectedVersion::Exact(v) => before == Some(v),
        };
        if !consistent {
            return Err(WriteError::WrongExpectedVersion {
                stream: stream.clone(),
                source: WrongExpectedVersion { expected, current: state.current_version() },
            });
        }
        let count = u32::try_from(events.len()).expect("bounded by append_records_max");
        let outcome = AppendResult { first_version, first_position, count, already_written: true };
        Ok(Reply::AfterDurable { end: first_position + u64::from(count), outcome: Outcome::Append(outcome) })
    }

    /// Encodes `events` at `first_version` of `stream`, queues them in the
    /// log and applies them to the state machine. With a slot, the log's
    /// writer thread completes it once they are durable; without, the
    /// caller waits for the returned write.
    #[allow(clippy::too_many_arguments, reason = "one call per write kind; a struct would only rename them")]
    fn submit(
        &self,
        inner: &mut Inner,
        stream: &StreamName,
        events: Vec<NewEvent>,
        first_version: u64,
        origin: Option<&Origin>,
        slot: Option<&Arc<Slot>>,
        outcome: fn(AppendResult) -> Outcome,
    ) -> Result<Processed, WriteError> {
        let records: Vec<Vec<u8>> = events
            .iter()
            .enumerate()
            .map(|(i, e)| record::encode_event(stream, first_version + i as u64, e, origin))
            .collect();
        let origin_id = origin.map_or(0, |o| o.site.id());
        let too_large = |e: AppendError| match e {
            AppendError::AppendTooLarge { bytes, max } => WriteError::BatchTooLarge {
                events: records.len(),
                bytes,
                events_max: self.config.log.append_records_max,
                bytes_max: max,
            },
            other => WriteError::from(other),
        };
        let (submitted, processed) = match slot {
            Some(slot) => {
                let signal = Arc::clone(&self.durable);
                let slot = Arc::clone(slot);
                let done = move |result: Result<AppendOutcome, AppendError>| {
                    note_durable(&signal, &result);
                    let reply = result
                        .map(|o| {
                            outcome(AppendResult {
                                first_version,
                                first_position: o.first_position,
                                count: o.count,
                                already_written: false,
                            })
                        })
                        .map_err(WriteError::from);
                    slot.complete(Reply::Done(reply));
                };
                // Under `fsync=always` the log's writer thread writes it at
                // once; else the sequencer writes it itself after its pass
                // (`Log::write_deferred`), with the rest of the pass.
                let submitted = if self.config.log.fsync == FsyncPolicy::Always {
                    self.log.submit(&records, done)
                } else {
                    self.log.submit_deferred(&records, done)
                };
                (submitted.map_err(too_large)?, Processed::Submitted)
            }
            None => {
                // As the sequencer does: under `fsync=always` the log's
                // writer thread writes it at once; else this thread writes
                // it itself once it has released the lock (`execute`).
                let log = if self.config.log.fsync == FsyncPolicy::Always {
                    self.log.queue(&records)
                } else {
                    self.log.queue_deferred(&records)
                }
                .map_err(too_large)?;
                (log.outcome(), Processed::Queued(QueuedWrite { log, first_version, outcome }))
            }
        };
        assert_eq!(submitted.first_position, inner.next_position, "only the store appends to its log");
        inner.next_position = submitted.positions().end;
        for (i, event) in events.into_iter().enumerate() {
            let version = first_version + i as u64;
            let position = submitted.first_position + i as u64;
            let content_hash = event.content_hash();
            let (id, event_type) = (event.id, event.event_type.clone());
            let command = if stream.is_system() {
                let recorded = RecordedEvent::new(stream.clone(), version, position, event);
                Command::decode(&recorded).map_err(|e| WriteError::InvalidArgument(e.to_string()))?
            } else {
                None
            };
            let applied = Applied {
                stream,
                version,
                position,
                id,
                event_type: event_type.as_str(),
                content_hash,
                command: command.as_ref(),
                origin: origin_id,
            };
            if let Err(e) = inner.tail.apply(&self.index, &applied) {
                // The record is in the log but not in the state: stop writing.
                self.poisoned.store(true, Ordering::Release);
                return Err(index_write(e));
            }
        }
        Ok(processed)
    }

    /// Whether every position below `end` is durable; if not yet, `waker`
    /// is woken when it is (or when the log fails).
    pub(crate) fn poll_durable(&self, end: u64, waker: &Waker) -> Option<Result<(), WriteError>> {
        let (state, _) = &*self.durable;
        let mut guard = state.lock();
        if guard.end >= end || self.log.end_position() >= end {
            return Some(Ok(()));
        }
        if guard.failed {
            return Some(Err(WriteError::Unavailable(AppendError::Closed)));
        }
        if !guard.waiters.iter().any(|(e, w)| *e == end && w.will_wake(waker)) {
            guard.waiters.push((end, waker.clone()));
        }
        None
    }

    /// Waits until every position below `end` is durable.
    pub(crate) fn wait_durable(&self, end: u64) -> Result<(), WriteError> {
        let (state, condvar) = &*self.durable;
        let mut guard = state.lock();
        loop {
            if guard.end >= end || self.log.end_position() >= end {
                return Ok(());
            }
            if guard.failed {
                return Err(WriteError::Unavailable(AppendError::Closed));
            }
            condvar.wait(&mut guard);
        }
    }

    /// Validates an append before it is queued.
    pub(crate) fn check_append(&self, events: &[NewEvent]) -> Result<(), WriteError> {
        if events.is_empty() {
            return Err(WriteError::EmptyAppend);
        }
        let events_max = self.config.log.append_records_max;
        if events.len() > events_max as usize {
            return Err(WriteError::BatchTooLarge {
                events: events.len(),
                bytes: 0,
                events_max,
                bytes_max: self.config.log.append_bytes_max,
            });
        }
        let mut seen = HashSet::with_capacity(events.len());
        for event in events {
            event.validate()?;
            if !seen.insert(event.id) {
                return Err(WriteError::InvalidArgument(format!("event id {} appears twice in one append", event.id)));
            }
        }
        Ok(())
    }
}
