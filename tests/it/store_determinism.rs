//! The store is a deterministic state machine over the log: replaying the
//! same log gives the same state. A varied history (appends to many streams,
//! retries, exists-or-write, soft and hard deletes, metadata, snapshots and
//! a reopen halfway) is written with a small flush threshold, so the index
//! is checkpointed many times along the way. Then the state is observed
//! (the index digest and what reads, `$all` by type, snapshot listings and
//! the id index answer), and must be identical after a reopen from the
//! checkpoint (which replays nothing), after a full rebuild from the log
//! with the index deleted, and in a second store fed the same commands.
//!
//! The history comes from a seed, printed (set `EDGEBUS_DETERMINISM_SEED`).

use std::collections::HashMap;
use std::path::Path;

use edgebus_log::LogConfig;
use edgebus_store::{
    AllFilter, Direction, ErrorCode, ExistsOrWrite, Store, StoreConfig, StreamFrom, StreamMetadata, WriteError,
};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const STREAMS: u32 = 40;
const STEPS: u32 = 1_500;
const TYPES: [&str; 4] = ["Created", "Updated", "Shipped", "Closed"];
const SOURCES: [&str; 2] = ["orders", "billing"];

fn config() -> StoreConfig {
    StoreConfig {
        tail_events_max: 256,
        index_flush_events: 16,
        log: LogConfig::small_segments(64 * 1024),
        ..StoreConfig::default()
    }
}

fn stream(k: u32) -> StreamName {
    StreamName::new(&format!("orders.eu.o-{k}")).expect("valid name")
}

/// Errors a random history may run into; anything else is a failure.
fn expected_refusal(error: &WriteError) -> bool {
    matches!(
        error.code(),
        ErrorCode::WrongExpectedVersion
            | ErrorCode::StreamDeleted
            | ErrorCode::StreamNotFound
            | ErrorCode::Gap
            | ErrorCode::SnapshotNotFound
    )
}

/// What the history wrote, for the observations.
#[derive(Debug, Default)]
struct Written {
    ids: Vec<EventId>,
    refusals: u64,
    soft_deletes: u64,
    tombstones: u64,
    snapshots: u64,
    retries: u64,
}

/// Writes a random history into the store in `dir`, reopening it halfway.
fn write_history(dir: &Path, seed: u64) -> Written {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut store = Store::open(dir, config()).expect("open");
    let mut counts: HashMap<u32, u64> = HashMap::new();
    let mut appends: Vec<(StreamName, Vec<NewEvent>)> = Vec::new();
    let mut written = Written::default();
    let mut next_id = 0u128;
    for step in 0..STEPS {
        if step == STEPS / 2 {
            store.close().expect("close");
            drop(store);
            store = Store::open(dir, config()).expect("reopen");
        }
        let k = rng.random_range(0..STREAMS);
        let name = stream(k);
        let ts = u64::from(step);
        let mut new_event = |rng: &mut StdRng| {
            next_id += 1;
            NewEvent {
                id: EventId::from_u128(next_id),
                event_type: EventType::new(TYPES[rng.random_range(0..TYPES.len())]).expect("valid type"),
                data: vec![b'd'; rng.random_range(0..600)],
                metadata: if rng.random_bool(0.2) { b"{\"m\":1}".to_vec() } else { Vec::new() },
                timestamp_ms: ts,
            }
        };
        let roll = rng.random_range(0..100);
        let result: Result<(), WriteError> = if roll < 50 {
            let events: Vec<NewEvent> = (0..rng.random_range(1..=4)).map(|_| new_event(&mut rng)).collect();
            store.append(&name, ExpectedVersion::Any, events.clone()).map(|r| {
                counts.insert(k, r.last_version() + 1);
                written.ids.extend(events.iter().map(|e| e.id));
                appends.push((name.clone(), events));
            })
        } else if roll < 58 && !appends.is_empty() {
            let (stream, events) = appends[rng.random_range(0..appends.len())].clone();
            store.append(&stream, ExpectedVersion::Any, events).map(|r| {
                assert!(r.already_written, "step {step}: a retry writes nothing");
                written.retries += 1;
            })
        } else if roll < 72 {
            let count = counts.get(&k).copied().unwrap_or(0);
            let index = count.saturating_sub(rng.random_range(0..2));
            let event = new_event(&mut rng);
            let id = event.id;
            store.exists_or_write(&name, index, event).map(|r| {
                if let ExistsOrWrite::Written { .. } = r {
                    counts.insert(k, count + 1);
                    written.ids.push(id);
                }
            })
        } else if roll < 77 {
            store.delete_stream(&name, ExpectedVersion::Any, false, ts).map(|_| written.soft_deletes += 1)
        } else if roll < 78 {
            store.delete_stream(&name, ExpectedVersion::Any, true, ts).map(|_| written.tombstones += 1)
        } else if roll < 86 {
            let metadata = StreamMetadata {
                max_age_ms: rng.random_bool(0.2).then(|| rng.random_range(1..1_000)),
                max_count: rng.random_bool(0.5).then(|| rng.random_range(0..10)),
                truncate_before: rng.random_bool(0.3).then(|| rng.random_range(0..5)),
            };
            store.set_stream_metadata(&name, metadata, ts).map(|_| ())
        } else if roll < 95 {
            let source = SOURCES[rng.random_range(0..SOURCES.len())];
            let version = rng.random_range(0..20);
            let state = format!("{source}:{k}@{version}").into_bytes();
            store.record_snapshot(source, &name, version, state, ts).map(|_| written.snapshots += 1)
        } else {
            let source = SOURCES[rng.random_range(0..SOURCES.len())];
            store.delete_snapshot(source, &name, rng.random_range(0..20), ts).map(|_| ())
        };
        if let Err(error) = result {
            assert!(expected_refusal(&error), "step {step}: unexpected error {error}");
            written.refusals += 1;
        }
    }
    store.close().expect("close");
    written
}

/// Everything the store answers about its state, through its public API.
#[derive(Debug, PartialEq, Eq)]
struct Observation {
    digest: u64,
    end: u64,
    streams: Vec<String>,
    reads: Vec<String>,
    by_type: Vec<(String, Vec<u64>)>,
    all_positions: Vec<u64>,
    snapshots: Vec<String>,
    latest_snapshots: Vec<String>,
    /// Where the id index says each id lives, as a duplicate append reports it.
    ids: Vec<String>,
}

fn observe(store: &Store, ids: &[EventId]) -> Observation {
    let digest = store.index_digest().expect("digest");
    let infos = store.list_streams(None, usize::MAX, true).expect("list streams");
    let streams = infos.iter().map(|i| format!("{i:?}")).collect();
    let mut reads = Vec::new();
    let mut latest_snapshots = Vec::new();
    for k in 0..STREAMS {
        let name = stream(k);
        for direction in [Direction::Forward, Direction::Backward] {
            let read = store.read_stream(&name, StreamFrom::Start, direction, 10_000, 1_000_000);
            reads.push(match read {
                Ok(events) => {
                    format!(
                        "{name} {direction:?}: {:?}",
                        events.iter().map(|e| (e.version, e.position, e.id)).collect::<Vec<_>>()
                    )
                }
                Err(e) => format!("{name} {direction:?}: {:?}", e.code()),
            });
        }
        for source in SOURCES {
            latest_snapshots.push(match store.read_snapshot(source, &name, None) {
                Ok(s) => format!("{source} {name}: {} at {}", s.version, s.position),
                Err(e) => format!("{source} {name}: {:?}", e.code()),
            });
        }
    }
    let by_type = TYPES
        .iter()
        .map(|t| {
            let filter = AllFilter { event_types: vec![EventType::new(t).expect("type")], ..AllFilter::default() };
            let slice = store.read_all(0, Direction::Forward, 10_000, &filter).expect("read $all by type");
            assert!(slice.end_of_log, "one page holds every event of {t}");
            ((*t).to_owned(), slice.events.iter().map(|e| e.position).collect())
        })
        .collect();
    let filter = AllFilter { include_system: true, ..AllFilter::default() };
    let all = store.read_all(0, Direction::Forward, 10_000, &filter).expect("read $all");
    let all_positions = all.events.iter().map(|e| e.position).collect();
    let snapshots = store
        .list_snapshots(None, None, usize::MAX)
        .expect("list snapshots")
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    let probe = StreamName::new("probe.ids").expect("valid name");
    let end = store.log().end_position();
    let ids = ids
        .iter()
        .map(|id| {
            let event = NewEvent {
                id: *id,
                event_type: EventType::new("Probe").expect("type"),
                data: Vec::new(),
                metadata: Vec::new(),
                timestamp_ms: 0,
            };
            match store.append(&probe, ExpectedVersion::Any, vec![event]) {
                Err(WriteError::DuplicateEventId { position, stream, version, .. }) => {
                    format!("{id}: {stream}@{version} at {position}")
                }
                other => panic!("probing id {id} must find it elsewhere, got {other:?}"),
            }
        })
        .collect();
    assert_eq!(store.log().end_position(), end, "probes write nothing");
    Observation { digest, end, streams, reads, by_type, all_positions, snapshots, latest_snapshots, ids }
}

fn seed() -> u64 {
    let seed = std::env::var("EDGEBUS_DETERMINISM_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("EDGEBUS_DETERMINISM_SEED is a number"))
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("store_determinism: seed {seed} (set EDGEBUS_DETERMINISM_SEED={seed} to replay it)");
    seed
}

#[test]
fn replaying_the_same_log_gives_the_same_state() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let written = write_history(dir.path(), seed);
    eprintln!(
        "store_determinism: {} events, {} retries, {} soft deletes, {} tombstones, {} snapshots, {} refusals",
        written.ids.len(),
        written.retries,
        written.soft_deletes,
        written.tombstones,
        written.snapshots,
        written.refusals
    );
    assert!(written.soft_deletes > 0 && written.tombstones > 0 && written.snapshots > 0 && written.retries > 0);

    let store = Store::open(dir.path(), config()).expect("open");
    let end = store.log().end_position();
    let report = store.open_report().clone();
    assert_eq!((report.checkpoint, report.replayed, report.rebuilt.as_deref()), (end, 0, None), "{report:?}");
    let segments = store.log().recovery_report();
    eprintln!("store_determinism: log end {end}, {segments:?}");
    let original = observe(&store, &written.ids);
    store.close().expect("close");
    drop(store);

    // Reopen from the checkpoint: nothing to replay, same state.
    let store = Store::open(dir.path(), config()).expect("reopen from the checkpoint");
    assert_eq!(store.open_report().replayed, 0, "{:?}", store.open_report());
    assert_eq!(observe(&store, &written.ids), original, "reopen from the checkpoint");
    store.close().expect("close");
    drop(store);

    // Rebuild from the log alone.
    std::fs::remove_dir_all(dir.path().join("index")).expect("remove the index");
    let store = Store::open(dir.path(), config()).expect("reopen without an index");
    let report = store.open_report().clone();
    assert_eq!((report.checkpoint, report.replayed), (0, end), "a rebuild replays the whole log: {report:?}");
    assert_eq!(observe(&store, &written.ids), original, "full rebuild from the log");
    store.close().expect("close");
    drop(store);

    // The same commands into another store give the same state.
    let other = tempfile::tempdir().expect("temp dir");
    write_history(other.path(), seed);
    let store = Store::open(other.path(), config()).expect("open the second store");
    assert_eq!(observe(&store, &written.ids), original, "a second store fed the same commands");
}
