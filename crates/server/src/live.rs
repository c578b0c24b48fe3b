//! The live feed: one thread follows the end of the log and broadcasts each
//! new run of committed events to every subscription in live mode.
//!
//! # Lifecycle
//!
//! [`LiveFeed::start`] is called once by the node after the store opens; it
//! starts the feed at the log's end (older events are read from the log by
//! the subscriptions that want them). The thread sleeps in
//! [`edgebus_log::Log::wait_for_end`] until new records are visible, reads
//! them once, decodes them once, and sends them as one [`LiveBatch`] into a
//! `tokio::sync::broadcast` ring of [`LIVE_FEED_BATCHES`] batches. The node
//! calls [`LiveFeed::stop`] before it closes the store.
//!
//! While no subscription is live (no receiver of the ring), the feed reads
//! and decodes nothing: it only moves its end past the new records, and
//! then pauses for [`IDLE_FOLLOW_PAUSE`] rather than wake for each group
//! commit (a thread wake-up each, some 14,000 a second in `bench node`'s
//! publish cells, for nobody). A
//! subscription that joins afterwards reads the log up to at least that end
//! before it takes batches, and checks that they are contiguous with it.
//! The end is also published as a `watch` ([`LiveFeed::watch_end`]) for
//! those that only need to know that the log grew (the gateway's routes).
//!
//! # Invariants
//!
//! - Batches are contiguous: each starts at the position where the previous
//!   one ended, and holds every record of that range, in order, unfiltered.
//!   A subscriber checks this to detect that it missed a batch.
//! - Memory is bounded by the ring, not by the subscribers: a batch holds at
//!   most [`LIVE_BATCH_RECORDS_MAX`] records and about
//!   [`LIVE_BATCH_BYTES_MAX`] bytes, and an event larger than
//!   [`LIVE_EVENT_INLINE_BYTES_MAX`] travels without its payload (its
//!   subscribers read it from the log). A subscriber that falls further
//!   behind than the ring is told so (`Lagged`) and reads the log instead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use edgebus_store::Store;
use edgebus_types::RecordedEvent;
use edgebus_types::limits::{
    LIVE_BATCH_BYTES_MAX, LIVE_BATCH_RECORDS_MAX, LIVE_EVENT_INLINE_BYTES_MAX, LIVE_FEED_BATCHES,
};
use tokio::sync::{broadcast, watch};

/// How long the feed thread sleeps at most before it looks at its stop flag.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// How long the feed pauses after moving its end while nobody is live: the
/// delay it may add to the end's watchers (gateway routes, consumer groups)
/// under load; a quiet log's next record is still seen at once.
const IDLE_FOLLOW_PAUSE: Duration = Duration::from_millis(1);
/// How long the feed waits before it retries a failed read of the log.
const READ_RETRY: Duration = Duration::from_secs(1);

/// One event of a [`LiveBatch`].
#[derive(Debug)]
pub struct LiveEvent {
    /// The event; without `data` and `metadata` when `inline` is false.
    pub event: RecordedEvent,
    /// Whether the payload is here. When it is not (a large event), the
    /// stream, type, version and position still are, so cheap filters run
    /// without reading the log.
    pub inline: bool,
}

/// A contiguous run of committed events, as the log holds them.
#[derive(Debug)]
pub struct LiveBatch {
    /// Position of the first event.
    pub first_position: u64,
    /// The events at `first_position..first_position + events.len()`.
    pub events: Vec<LiveEvent>,
}

impl LiveBatch {
    /// One past the last position of the batch.
    pub fn end_position(&self) -> u64 {
        self.first_position + self.events.len() as u64
    }
}

/// The node's live feed; see the module docs.
#[derive(Debug)]
pub struct LiveFeed {
    sender: broadcast::Sender<Arc<LiveBatch>>,
    /// One past the last position broadcast.
    published_end: Arc<AtomicU64>,
    /// The same, as a watch.
    end: watch::Sender<u64>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LiveFeed {
    /// Starts following `store`'s log from its current end.
    pub fn start(store: Arc<Store>) -> std::io::Result<Self> {
        let (sender, _) = broadcast::channel(LIVE_FEED_BATCHES);
        let start = store.log().end_position();
        let published_end = Arc::new(AtomicU64::new(start));
        let (end, _) = watch::channel(start);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let feed = Follow {
                sender: sender.clone(),
                published_end: Arc::clone(&published_end),
                end: end.clone(),
                stop: Arc::clone(&stop),
            };
            std::thread::Builder::new().name("edgebus-live-feed".to_owned()).spawn(move || feed.run(&store, start))?
        };
        Ok(Self { sender, published_end, end, stop, thread: Mutex::new(Some(thread)) })
    }

    /// A watch of the feed's end: one past the last position it passed.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// A receiver of every batch broadcast from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveBatch>> {
        self.sender.subscribe()
    }

    /// One past the last position broadcast.
    pub fn end_position(&self) -> u64 {
        self.published_end.load(Ordering::Acquire)
    }

    /// Stops the thread and waits for it. Idempotent.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().expect("live feed lock").take();
        if let Some(thread) = thread {
            thread.join().expect("the live feed thread panicked");
        }
    }
}

impl Drop for LiveFeed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the feed thread holds.
struct Follow {
    sender: broadcast::Sender<Arc<LiveBatch>>,
    published_end: Arc<AtomicU64>,
    end: watch::Sender<u64>,
    stop: Arc<AtomicBool>,
}

impl Follow {
    /// The feed thread: waits for new records, reads, decodes and broadcasts
    /// them, or only moves its end while nobody is live.
    fn run(&self, store: &Store, mut next: u64) {
        let mut failing = false;
        while !self.stop.load(Ordering::Acquire) {
            let end = store.log().wait_for_end(next, WAIT_SLICE);
            if end <= next {
                continue;
            }
            if self.sender.receiver_count() == 0 {
                next = end;
                self.publish(next);
                std::thread::sleep(IDLE_FOLLOW_PAUSE);
                continue;
            }
            let events = match store.read_log(next, LIVE_BATCH_RECORDS_MAX, LIVE_BATCH_BYTES_MAX as u64) {
                Ok(events) => events,
                Err(e) => {
                    // The subscriptions wait; the same read would fail for them.
                    if !failing {
                        eprintln!("edgebus: live feed cannot read the log at position {next}: {e}; retrying");
                        failing = true;
                    }
                    std::thread::sleep(READ_RETRY);
                    continue;
                }
            };
            failing = false;
            let Some(last) = events.last() else { continue };
            assert_eq!(events[0].position, next, "the live feed reads from where it stopped");
            assert_eq!(last.position, next + events.len() as u64 - 1, "log positions are contiguous");
            let batch = LiveBatch {
                first_position: next,
                events: events
                    .into_iter()
                    .map(|mut event| {
                        let inline = event.data.len() + event.metadata.len() <= LIVE_EVENT_INLINE_BYTES_MAX;
                        if !inline {
                            event.data = Vec::new();
                            event.metadata = Vec::new();
                        }
                        LiveEvent { event, inline }
                    })
                    .collect(),
            };
            next = batch.end_position();
            self.publish(next);
            // No receivers is not an error: the last one left since the count.
            let _ = self.sender.send(Arc::new(batch));
        }
    }

    fn publish(&self, end: u64) {
        self.published_end.store(end, Ordering::Release);
        self.end.send_if_modified(|current| {
            let moved = end > *current;
            *current = (*current).max(end);
            moved
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};

    fn append(store: &Store, count: usize) {
        let events = (0..count)
            .map(|_| NewEvent {
                id: EventId::generate(),
                event_type: EventType::new("t").unwrap(),
                data: b"{}".to_vec(),
                metadata: Vec::new(),
                timestamp_ms: 0,
            })
            .collect();
        store.append(&StreamName::new("s").unwrap(), ExpectedVersion::Any, events).unwrap();
    }

    /// While nobody is live the feed only moves its end (and its watch);
    /// a receiver that joins then gets batches that start at that end.
    #[tokio::test]
    async fn with_nobody_live_the_end_moves_and_a_later_receiver_gets_contiguous_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), edgebus_store::StoreConfig::default()).unwrap());
        append(&store, 2);
        let feed = LiveFeed::start(Arc::clone(&store)).unwrap();
        let mut end = feed.watch_end();
        assert_eq!(*end.borrow_and_update(), 2, "the feed starts at the log's end");

        append(&store, 3);
        let moved = tokio::time::timeout(Duration::from_secs(10), end.wait_for(|end| *end == 5)).await;
        assert!(moved.is_ok_and(|r| r.is_ok()), "the watch follows the log with nobody live");
        assert_eq!(feed.end_position(), 5);

        let mut receiver = feed.subscribe();
        append(&store, 4);
        let batch = tokio::time::timeout(Duration::from_secs(10), receiver.recv()).await.unwrap().unwrap();
        assert_eq!(batch.first_position, 5, "the first batch starts where the unread run ended");
        let mut positions: Vec<u64> = batch.events.iter().map(|e| e.event.position).collect();
        while positions.len() < 4 {
            let batch = tokio::time::timeout(Duration::from_secs(10), receiver.recv()).await.unwrap().unwrap();
            assert_eq!(batch.first_position, 5 + positions.len() as u64, "batches are contiguous");
            positions.extend(batch.events.iter().map(|e| e.event.position));
        }
        assert_eq!(positions, vec![5, 6, 7, 8]);
        assert!(batch.events.iter().all(|e| e.inline && e.event.data == b"{}"));
        assert_eq!(*end.borrow_and_update(), 9);
        feed.stop();
    }
}
