//! Crash-test child for the store: opens a store whose indexer checkpoints
//! constantly and writes to it from several threads, reporting every
//! acknowledged write on stdout, until the parent (`it/store_checkpoint_crash.rs`)
//! kills it with SIGKILL.
//!
//! Usage: `store-crash-child DIR ROUND SEED`. Output lines, each flushed at
//! once so that a kill never loses an acknowledgement the parent could see:
//!
//! - `opened END CHECKPOINT REPLAYED` once the store is open;
//! - `ack STREAM FIRST_VERSION FIRST_POSITION ID:HASH,...` after an append
//!   was acknowledged, one id (hex) and content hash (hex) per event;
//! - `eow STREAM INDEX POSITION ID:HASH` after `exists_or_write` wrote;
//! - `snap STREAM VERSION POSITION` after a snapshot was recorded (its state
//!   is `snapshot@VERSION`);
//! - `meta STREAM MAX_COUNT POSITION` after stream metadata was set;
//! - `done` when every thread used up its budget (normally it is killed first);
//! - `error MESSAGE` before exiting with status 1 on any unexpected failure.
//!
//! The store configuration must match the parent's `config()`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgebus_log::LogConfig;
use edgebus_store::{ExistsOrWrite, Store, StoreConfig, StreamMetadata};
use edgebus_tests::report;
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const APPEND_THREADS: u32 = 3;
/// Streams the appenders share.
const STREAMS: u32 = 6;
/// Writes per thread before the child stops on its own: a bound in case nobody kills it.
const WRITES_PER_THREAD_MAX: u64 = 20_000;
/// Every this many `exists_or_write`s, a snapshot; half-way between, metadata.
const COMMAND_EVERY: u64 = 8;
/// The stream only the `exists_or_write` thread writes, and the one whose metadata it sets.
const EOW_STREAM: &str = "crash.eow";
const META_STREAM: &str = "crash.meta";
const SNAPSHOT_SOURCE: &str = "crash";

fn config() -> StoreConfig {
    StoreConfig {
        tail_events_max: 1024,
        index_flush_events: 4,
        index_flush_interval: Some(Duration::from_millis(2)),
        log: LogConfig::small_segments(64 * 1024),
        ..StoreConfig::default()
    }
}

fn main() {
    if let Err(message) = run() {
        report(&format!("error {message}"));
        std::process::exit(1);
    }
}

/// Ids say who wrote an event: round, thread (`u16::MAX` for the
/// `exists_or_write` thread), sequence number and index in the append.
fn event_id(round: u32, thread: u32, seq: u64, index: u32) -> EventId {
    EventId::from_u128(
        (u128::from(round + 1) << 96) | (u128::from(thread) << 80) | (u128::from(seq) << 16) | u128::from(index),
    )
}

fn event(id: EventId, rng: &mut StdRng) -> NewEvent {
    let mut data = format!("{{\"id\":\"{id}\"}}").into_bytes();
    data.resize(data.len() + rng.random_range(0..400), b'.');
    NewEvent {
        id,
        event_type: EventType::new(["Opened", "Moved", "Closed"][rng.random_range(0..3)]).expect("valid type"),
        data,
        metadata: Vec::new(),
        timestamp_ms: id.as_u128() as u64,
    }
}

fn describe(events: &[NewEvent]) -> String {
    events.iter().map(|e| format!("{:x}:{:x}", e.id.as_u128(), e.content_hash())).collect::<Vec<_>>().join(",")
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, round, seed] = args.as_slice() else {
        return Err(format!("usage: store-crash-child DIR ROUND SEED (got {args:?})"));
    };
    let dir = PathBuf::from(dir);
    let round: u32 = round.parse().map_err(|e| format!("round {round:?}: {e}"))?;
    let seed: u64 = seed.parse().map_err(|e| format!("seed {seed:?}: {e}"))?;
    let store = Arc::new(Store::open(&dir, config()).map_err(|e| format!("open: {e}"))?);
    let opened = store.open_report();
    report(&format!("opened {} {} {}", store.log().end_position(), opened.checkpoint, opened.replayed));
    let mut threads: Vec<_> = (0..APPEND_THREADS)
        .map(|thread| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || append_loop(&store, round, thread, seed))
        })
        .collect();
    let eow_store = Arc::clone(&store);
    threads.push(std::thread::spawn(move || exists_or_write_loop(&eow_store, round, seed)));
    for thread in threads {
        thread.join().map_err(|_| "a writer thread panicked".to_owned())??;
    }
    report("done");
    Ok(())
}

fn append_loop(store: &Store, round: u32, thread: u32, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(thread));
    for seq in 0..WRITES_PER_THREAD_MAX {
        let stream = StreamName::new(&format!("crash.s{}", rng.random_range(0..STREAMS))).expect("valid name");
        let events: Vec<NewEvent> =
            (0..rng.random_range(1..=3)).map(|i| event(event_id(round, thread, seq, i), &mut rng)).collect();
        let line = describe(&events);
        let result = store.append(&stream, ExpectedVersion::Any, events).map_err(|e| format!("append: {e}"))?;
        if result.already_written {
            return Err(format!("fresh ids reported as already written: {result:?}"));
        }
        report(&format!("ack {stream} {} {} {line}", result.first_version, result.first_position));
    }
    Ok(())
}

fn exists_or_write_loop(store: &Store, round: u32, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xe0e0);
    let stream = StreamName::new(EOW_STREAM).expect("valid name");
    let meta = StreamName::new(META_STREAM).expect("valid name");
    let info = store.stream_info(&stream).map_err(|e| format!("stream info: {e}"))?;
    let first_index = info.and_then(|i| i.current_version).map_or(0, |v| v + 1);
    for (seq, index) in (0..WRITES_PER_THREAD_MAX).zip(first_index..) {
        let event = event(event_id(round, u32::from(u16::MAX), seq, 0), &mut rng);
        let line = describe(std::slice::from_ref(&event));
        match store.exists_or_write(&stream, index, event).map_err(|e| format!("exists_or_write: {e}"))? {
            ExistsOrWrite::Written { position } => report(&format!("eow {stream} {index} {position} {line}")),
            other => return Err(format!("the only writer of {stream} found {other:?} at {index}")),
        }
        if seq % COMMAND_EVERY == 0 {
            let state = format!("snapshot@{index}").into_bytes();
            let position = store
                .record_snapshot(SNAPSHOT_SOURCE, &stream, index, state, 0)
                .map_err(|e| format!("record snapshot: {e}"))?;
            report(&format!("snap {stream} {index} {position}"));
        }
        if seq % COMMAND_EVERY == COMMAND_EVERY / 2 {
            // Grows across rounds, so the parent knows the latest acknowledged value.
            let max_count = u64::from(round) * 1_000_000 + seq;
            let metadata = StreamMetadata { max_count: Some(max_count), ..StreamMetadata::default() };
            let position = store.set_stream_metadata(&meta, metadata, 0).map_err(|e| format!("set metadata: {e}"))?;
            report(&format!("meta {meta} {max_count} {position}"));
        }
    }
    Ok(())
}
