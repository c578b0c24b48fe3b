//! Writes awaited by async tasks instead of parked threads.
//!
//! Why: a node serving hundreds of concurrent appends would otherwise park
//! one blocking-pool thread per append in flight, and every append would pay
//! two extra thread hand-offs (to the pool and back). A [`PendingWrite`]
//! starts its write from the task itself, running it on the task's thread
//! under `fsync=always` or else queueing it for the sequencer (see
//! `Shared::run_here`), and is woken by whoever completes it (the sequencer,
//! or whichever thread writes it to the log). Backpressure is
//! kept: when the request queue is full the task waits, woken when the
//! sequencer takes the queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::WriteError;
use crate::store::Shared;
use crate::writer::{Outcome, QueueAttempt, Reply, Request, Slot};

/// A write on its way through the store; await it for the answer. It
/// answers exactly as the blocking call of the same name would. Dropping it
/// after its request was queued (normally at the first poll; later only if
/// the queue was full) does not withdraw the write, as with a blocking call
/// whose caller went away; it only stops waiting for the answer.
#[must_use = "a pending write does nothing until awaited"]
pub struct PendingWrite<T> {
    shared: Arc<Shared>,
    stage: Stage,
    answer: fn(Outcome) -> T,
}

impl<T> std::fmt::Debug for PendingWrite<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match &self.stage {
            Stage::Refused(_) => "refused",
            Stage::Queueing(_) => "queueing",
            Stage::Queued(_) => "queued",
            Stage::Durable { .. } => "waiting for durability",
            Stage::Done => "answered",
        };
        f.debug_struct("PendingWrite").field("stage", &stage).finish_non_exhaustive()
    }
}

enum Stage {
    /// Refused before it was queued.
    Refused(WriteError),
    /// Waiting for room in the request queue.
    Queueing(Request),
    /// Queued: waiting for the sequencer or the log's writer thread.
    Queued(Arc<Slot>),
    /// Answered, but the answer refers to positions not yet durable.
    Durable {
        end: u64,
        outcome: Outcome,
    },
    Done,
}

impl<T> PendingWrite<T> {
    pub(crate) fn new(shared: Arc<Shared>, request: Result<Request, WriteError>, answer: fn(Outcome) -> T) -> Self {
        let stage = match request {
            Ok(request) => Stage::Queueing(request),
            Err(error) => Stage::Refused(error),
        };
        Self { shared, stage, answer }
    }
}

impl<T> Future for PendingWrite<T> {
    type Output = Result<T, WriteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.stage, Stage::Done) {
                Stage::Refused(error) => return Poll::Ready(Err(error)),
                Stage::Queueing(request) => {
                    let slot = Slot::for_task();
                    match this.shared.try_queue(request, &slot, cx.waker()) {
                        QueueAttempt::Queued => this.stage = Stage::Queued(slot),
                        QueueAttempt::Full(request) => {
                            this.stage = Stage::Queueing(request);
                            return Poll::Pending;
                        }
                        QueueAttempt::Closed(error) => return Poll::Ready(Err(error)),
                    }
                }
                Stage::Queued(slot) => match slot.poll_reply(cx.waker()) {
                    Some(Reply::Done(result)) => return Poll::Ready(result.map(this.answer)),
                    Some(Reply::AfterDurable { end, outcome }) => this.stage = Stage::Durable { end, outcome },
                    None => {
                        this.stage = Stage::Queued(slot);
                        return Poll::Pending;
                    }
                },
                Stage::Durable { end, outcome } => match this.shared.poll_durable(end, cx.waker()) {
                    Some(result) => return Poll::Ready(result.map(|()| (this.answer)(outcome))),
                    None => {
                        this.stage = Stage::Durable { end, outcome };
                        return Poll::Pending;
                    }
                },
                Stage::Done => panic!("a PendingWrite polled after it answered"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use edgebus_log::FsyncPolicy;
    use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, Origin, SiteName, StreamName};

    use super::*;
    use crate::store::{ReplicaWrite, Store, StoreConfig};
    use crate::writer::REQUESTS_QUEUED_MAX;

    /// Counts its wakes; wakes the thread that made it.
    struct ThreadWaker {
        thread: std::thread::Thread,
        wakes: AtomicUsize,
    }

    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            self.thread.unpark();
        }
    }

    fn block_on<F: Future + Unpin>(mut future: F) -> F::Output {
        let waker = Waker::from(Arc::new(ThreadWaker { thread: std::thread::current(), wakes: AtomicUsize::new(0) }));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(output) = Pin::new(&mut future).poll(&mut cx) {
                return output;
            }
            std::thread::park_timeout(std::time::Duration::from_secs(1));
        }
    }

    fn event(n: u64) -> NewEvent {
        NewEvent {
            id: EventId::from_u128(u128::from(n) + 1),
            event_type: EventType::new("t").unwrap(),
            data: n.to_le_bytes().to_vec(),
            metadata: Vec::new(),
            timestamp_ms: 1,
        }
    }

    /// With the sequencer held up, writes beyond the request queue's bound
    /// are not queued: they wait (registered to be woken) and are all
    /// written, in order, once the sequencer moves again. (Under
    /// `fsync=never` tasks' writes all go through the sequencer.)
    #[test]
    fn writes_beyond_the_queue_wait_for_room_and_are_all_written() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            log: edgebus_log::LogConfig { fsync: FsyncPolicy::Never, ..edgebus_log::LogConfig::default() },
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), config).unwrap();
        let stream = StreamName::new("s").unwrap();
        let total = 2 * REQUESTS_QUEUED_MAX as u64 + 10;
        let waker = Arc::new(ThreadWaker { thread: std::thread::current(), wakes: AtomicUsize::new(0) });
        let task_waker = Waker::from(Arc::clone(&waker));
        let mut cx = Context::from_waker(&task_waker);
        let held = store.shared.inner.lock();
        let mut writes: Vec<_> =
            (0..total).map(|n| store.append_async(&stream, ExpectedVersion::Any, vec![event(n)])).collect();
        for write in &mut writes {
            assert!(Pin::new(write).poll(&mut cx).is_pending(), "nothing is answered while the sequencer is held");
        }
        {
            let requests = store.shared.requests.lock();
            assert_eq!(requests.items.len(), REQUESTS_QUEUED_MAX, "the queue holds its bound and no more");
            assert_eq!(requests.space_waiters.len(), 1, "one waker registered once, however many writes wait");
        }
        let waiting = writes.iter().filter(|w| matches!(w.stage, Stage::Queueing(_))).count();
        assert!(waiting >= 10, "at least the writes beyond two queues' worth wait outside it ({waiting})");
        drop(held);
        let results: Vec<_> = writes.into_iter().map(|w| block_on(w).expect("written")).collect();
        assert!(waker.wakes.load(Ordering::SeqCst) > 0, "waiting writes were woken");
        let mut versions: Vec<u64> = results.iter().map(|r| r.first_version).collect();
        versions.sort_unstable();
        assert_eq!(versions, (0..total).collect::<Vec<_>>(), "every write got its own version");
        store.close().unwrap();
    }

    /// Under `fsync=always` a task runs its write on its own thread (its
    /// first poll writes it), but not past requests the sequencer holds: it
    /// queues behind them instead of waiting for the state lock, and is
    /// written after them.
    #[test]
    fn a_task_writes_itself_but_queues_behind_requests_the_sequencer_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreConfig::default()).unwrap());
        assert_eq!(store.shared.config.log.fsync, FsyncPolicy::Always, "the default");
        let home = SiteName::new("home").unwrap();
        let replica = ReplicaWrite {
            stream: StreamName::new("replicated").unwrap(),
            version: Some(0),
            event: event(1),
            origin: Origin { site: home.clone(), position: 0, via: home, note: String::new() },
        };
        let waker = Waker::from(Arc::new(ThreadWaker { thread: std::thread::current(), wakes: AtomicUsize::new(0) }));
        let mut first = store.append_async(&StreamName::new("first").unwrap(), ExpectedVersion::Any, vec![event(0)]);
        let first_poll = Pin::new(&mut first).poll(&mut Context::from_waker(&waker));
        assert_eq!(store.shared.inner.lock().next_position, 1, "with nothing queued, written by the task's own poll");
        // The log's writer thread may have made it durable before the poll
        // looked: ready and pending are both right.
        match first_poll {
            std::task::Poll::Ready(written) => written.expect("written"),
            std::task::Poll::Pending => block_on(first).expect("written"),
        };

        let held = store.shared.inner.lock();
        let replicating = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.replicate(vec![replica]))
        };
        // The sequencer takes the replicated write and waits for the lock.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !store.shared.requests.lock().in_pass {
            assert!(std::time::Instant::now() < deadline, "the sequencer took the replicated write");
            std::thread::yield_now();
        }
        let (polled, first_poll) = std::sync::mpsc::channel();
        let task = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let stream = StreamName::new("local").unwrap();
                let mut write = store.append_async(&stream, ExpectedVersion::Any, vec![event(2)]);
                let waker =
                    Waker::from(Arc::new(ThreadWaker { thread: std::thread::current(), wakes: AtomicUsize::new(0) }));
                let pending = Pin::new(&mut write).poll(&mut Context::from_waker(&waker)).is_pending();
                polled.send(pending).unwrap();
                block_on(write)
            })
        };
        let pending = first_poll.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(pending, Ok(true), "the task's first poll queued its write rather than wait for the lock");
        assert_eq!(store.shared.requests.lock().items.len(), 1, "queued for the sequencer");
        drop(held);
        let replicated = replicating.join().unwrap().pop().unwrap().expect("replicated");
        let crate::ExistsOrWrite::Written { position } = replicated else { panic!("written: {replicated:?}") };
        let local = task.join().unwrap().expect("written");
        assert!(local.first_position > position, "the task's write came after the one ahead of it");
        store.close().unwrap();
    }

    /// A write refused before queueing answers at once; a closed store refuses.
    #[test]
    fn refusals_answer_without_queueing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let stream = StreamName::new("s").unwrap();
        let empty = block_on(store.append_async(&stream, ExpectedVersion::Any, Vec::new()));
        assert!(matches!(empty, Err(WriteError::EmptyAppend)), "{empty:?}");
        let system = StreamName::system("$sys.x").unwrap();
        let reserved = block_on(store.append_async(&system, ExpectedVersion::Any, vec![event(0)]));
        assert!(matches!(reserved, Err(WriteError::ReservedStream { .. })), "{reserved:?}");
        store.close().unwrap();
        let closed = block_on(store.exists_or_write_async(&stream, 0, event(1)));
        assert!(matches!(closed, Err(WriteError::Unavailable(_))), "{closed:?}");
    }
}
