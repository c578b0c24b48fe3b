//! The store's main behaviours, one small scenario each.

use edgebus_store::{
    AllFilter, Direction, ErrorCode, ExistsOrWrite, Store, StoreConfig, StreamFrom, StreamMetadata, WriteError,
};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};

fn event(id: u128, data: &str) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("Happened").unwrap(),
        data: data.as_bytes().to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 1_000 + id as u64,
    }
}

fn name(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}

#[test]
fn append_with_expected_versions_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let s = name("orders.o-1");
    let r = store.append(&s, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "b")]).unwrap();
    assert_eq!((r.first_version, r.last_version(), r.first_position), (0, 1, 0));
    let err = store.append(&s, ExpectedVersion::NoStream, vec![event(3, "c")]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongExpectedVersion, "{err}");
    assert!(err.to_string().contains("stream is at 1"), "{err}");
    store.append(&s, ExpectedVersion::Exact(1), vec![event(3, "c")]).unwrap();
    store.append(&name("other"), ExpectedVersion::Any, vec![event(4, "x")]).unwrap();
    let events = store.read_stream(&s, StreamFrom::Start, Direction::Forward, 100, 0).unwrap();
    assert_eq!(
        events.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    let back = store.read_stream(&s, StreamFrom::End, Direction::Backward, 2, 0).unwrap();
    assert_eq!(back.iter().map(|e| e.version).collect::<Vec<_>>(), [2, 1]);
    let all = store.read_all(0, Direction::Forward, 100, &AllFilter::default()).unwrap();
    assert_eq!(all.events.len(), 4);
    assert!(all.end_of_log);
}

#[test]
fn idempotent_retry_returns_original_and_conflicts_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let s = name("a.b");
    let first = store.append(&s, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "b")]).unwrap();
    let again = store.append(&s, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "b")]).unwrap();
    assert!(again.already_written);
    assert_eq!((again.first_position, again.first_version, again.count), (first.first_position, 0, 2));
    assert_eq!(store.log().end_position(), 2, "nothing written by the retry");
    let changed = store.append(&s, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "DIFFERENT")]).unwrap_err();
    assert_eq!(changed.code(), ErrorCode::IdempotencyConflict, "{changed}");
    let elsewhere = store.append(&name("c"), ExpectedVersion::Any, vec![event(2, "b")]).unwrap_err();
    assert_eq!(elsewhere.code(), ErrorCode::DuplicateEventId, "{elsewhere}");
}

#[test]
fn exists_or_write_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let s = name("out");
    assert!(matches!(store.exists_or_write(&s, 0, event(1, "x")).unwrap(), ExistsOrWrite::Written { position: 0 }));
    assert_eq!(store.exists_or_write(&s, 0, event(1, "x")).unwrap(), ExistsOrWrite::Exists { position: 0, same: true });
    assert_eq!(
        store.exists_or_write(&s, 0, event(9, "y")).unwrap(),
        ExistsOrWrite::Exists { position: 0, same: false }
    );
    let gap = store.exists_or_write(&s, 5, event(2, "z")).unwrap_err();
    assert!(matches!(gap, WriteError::Gap { index: 5, count: 1, .. }), "{gap}");
}

#[test]
fn deletes_metadata_snapshots_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = name("acct.1");
    {
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        store.append(&s, ExpectedVersion::Any, (1..=5).map(|i| event(i, "e")).collect()).unwrap();
        store.set_stream_metadata(&s, StreamMetadata { max_count: Some(2), ..Default::default() }, 0).unwrap();
        let visible = store.read_stream(&s, StreamFrom::Start, Direction::Forward, 100, 0).unwrap();
        assert_eq!(visible.iter().map(|e| e.version).collect::<Vec<_>>(), [3, 4]);
        store.record_snapshot("acct", &s, 2, b"state@2".to_vec(), 0).unwrap();
        store.record_snapshot("acct", &s, 4, b"state@4".to_vec(), 0).unwrap();
        assert_eq!(store.read_snapshot("acct", &s, Some(3)).unwrap().state, b"state@2");
        assert_eq!(store.read_snapshot("acct", &s, None).unwrap().version, 4);
        store.delete_stream(&s, ExpectedVersion::Exact(4), false, 0).unwrap();
        assert_eq!(
            store.read_stream(&s, StreamFrom::Start, Direction::Forward, 10, 0).unwrap_err().code(),
            ErrorCode::StreamNotFound
        );
        let r = store.append(&s, ExpectedVersion::NoStream, vec![event(6, "again")]).unwrap();
        assert_eq!(r.first_version, 5, "versions continue after a soft delete");
        store.delete_stream(&name("gone"), ExpectedVersion::Any, true, 0).unwrap();
        let err = store.append(&name("gone"), ExpectedVersion::Any, vec![event(7, "x")]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::StreamDeleted);
        store.close().unwrap();
    }
    let digest_before;
    {
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(store.open_report().replayed, 0, "a clean close leaves nothing to replay");
        let events = store.read_stream(&s, StreamFrom::Start, Direction::Forward, 10, 0).unwrap();
        assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), [5]);
        assert_eq!(store.read_snapshot("acct", &s, Some(3)).unwrap().state, b"state@2");
        store.delete_snapshot("acct", &s, 2, 0).unwrap();
        assert!(store.read_snapshot("acct", &s, Some(3)).is_err());
        assert_eq!(store.list_snapshots(Some("acct"), None, 10).unwrap().len(), 1);
        digest_before = store.index_digest().unwrap();
        store.close().unwrap();
    }
    // A full rebuild from the log gives the same state.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert!(store.open_report().replayed > 0);
    assert_eq!(store.index_digest().unwrap(), digest_before);
}

#[test]
fn clients_cannot_write_system_streams() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let sys = StreamName::system("$sys.streams").unwrap();
    let err = store.append(&sys, ExpectedVersion::Any, vec![event(1, "x")]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::ReservedStream);
    assert_eq!(store.log().end_position(), 0);
}

#[test]
fn reclaim_removes_only_dead_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { log: edgebus_log::LogConfig::small_segments(16 * 1024), ..StoreConfig::default() };
    let store = Store::open(dir.path(), config).unwrap();
    let hot = name("hot");
    let keep = name("keep");
    // One event that stays live, then many that die by max_count.
    store.append(&keep, ExpectedVersion::Any, vec![event(1, "keep me")]).unwrap();
    store.set_stream_metadata(&hot, StreamMetadata { max_count: Some(3), ..Default::default() }, 0).unwrap();
    for i in 0..600u128 {
        store.append(&hot, ExpectedVersion::Any, vec![event(100 + i, &"x".repeat(200))]).unwrap();
    }
    // The first segment holds a live event and a command: nothing can go.
    let report = store.reclaim(0).unwrap();
    assert_eq!(report.segments_removed, 0, "{report:?}");
    assert_eq!(store.log().start_position(), 0);
    // A store whose first segments hold only events dead by max_count (the
    // command that kills them comes last) gives those segments back.
    let dir2 = tempfile::tempdir().unwrap();
    let config = StoreConfig { log: edgebus_log::LogConfig::small_segments(16 * 1024), ..StoreConfig::default() };
    let store2 = Store::open(dir2.path(), config).unwrap();
    for i in 0..600u128 {
        store2.append(&hot, ExpectedVersion::Any, vec![event(100 + i, &"x".repeat(200))]).unwrap();
    }
    store2.set_stream_metadata(&hot, StreamMetadata { max_count: Some(3), ..Default::default() }, 0).unwrap();
    let segments_before = store2.log().segments().len();
    let report = store2.reclaim(0).unwrap();
    assert!(report.segments_removed > 0, "{report:?}");
    assert_eq!(store2.log().segments().len(), segments_before - report.segments_removed);
    assert!(report.start_position > 0);
    let visible = store2.read_stream(&hot, StreamFrom::Start, Direction::Forward, 100, 0).unwrap();
    assert_eq!(visible.iter().map(|e| e.version).collect::<Vec<_>>(), [597, 598, 599]);
    assert_eq!(store.read_stream(&keep, StreamFrom::Start, Direction::Forward, 10, 0).unwrap().len(), 1);
}

/// Found by the model tests: after `reclaim` and an index rebuild the index
/// no longer knows reclaimed versions; `exists_or_write` there used to panic
/// the sequencer and hang every writer.
#[test]
fn exists_or_write_at_a_reclaimed_version_after_rebuild_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = || StoreConfig { log: edgebus_log::LogConfig::small_segments(8 * 1024), ..StoreConfig::default() };
    let s = name("a");
    {
        let store = Store::open(dir.path(), config()).unwrap();
        for i in 0..200u128 {
            store.append(&s, ExpectedVersion::Any, vec![event(i + 1, &"y".repeat(100))]).unwrap();
        }
        store.set_stream_metadata(&s, StreamMetadata { truncate_before: Some(150), ..Default::default() }, 0).unwrap();
        assert!(store.reclaim(0).unwrap().segments_removed > 0);
        store.close().unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let err = store.exists_or_write(&s, 10, event(999, "late")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::PositionRemoved, "{err}");
    assert!(err.to_string().contains("reclaimed"), "{err}");
    // The store still takes writes.
    let r = store.append(&s, ExpectedVersion::Exact(199), vec![event(1000, "next")]).unwrap();
    assert_eq!(r.first_version, 200);
}

/// Found by `edgebus bench store`: `flush_index` racing the indexer thread
/// dropped the same ops from the tail twice and panicked.
#[test]
fn flush_index_while_the_indexer_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        StoreConfig { index_flush_interval: Some(std::time::Duration::from_millis(1)), ..StoreConfig::default() };
    let store = std::sync::Arc::new(Store::open(dir.path(), config).unwrap());
    let writer = {
        let store = std::sync::Arc::clone(&store);
        std::thread::spawn(move || {
            // Large flushes keep the window between a flush's copy of the
            // tail and its drop wide.
            for batch in 0..40u128 {
                let events = (0..500).map(|i| event(batch * 500 + i + 1, "x")).collect();
                store.append(&name("busy"), ExpectedVersion::Any, events).unwrap();
            }
        })
    };
    let flushers: Vec<_> = (0..3)
        .map(|_| {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || {
                for _ in 0..500 {
                    store.flush_index().unwrap();
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for flusher in flushers {
        flusher.join().unwrap();
    }
    store.flush_index().unwrap();
    let events = store.read_stream(&name("busy"), StreamFrom::Start, Direction::Forward, 50_000, 0).unwrap();
    assert_eq!(events.len(), 10_000);
}

#[test]
fn the_write_queue_is_empty_when_idle_and_a_closed_store_takes_no_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert!(store.accepts_writes());
    store.append(&name("s.a"), ExpectedVersion::Any, vec![event(1, "a")]).unwrap();
    // An answered write has left the queue.
    assert_eq!(store.queue_depth(), 0);
    store.close().unwrap();
    assert!(!store.accepts_writes(), "closed");
}

#[test]
fn the_tail_never_holds_more_than_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    // The index flushes only when a writer waits for room in the tail.
    let config = StoreConfig { tail_events_max: 100, index_flush_events: usize::MAX, ..StoreConfig::default() };
    let store = Store::open(dir.path(), config).unwrap();
    let mut id = 0;
    let mut batch = |n: usize| {
        (0..n)
            .map(|_| {
                id += 1;
                event(id, "x")
            })
            .collect::<Vec<_>>()
    };
    let mut highest = 0;
    for _ in 0..20 {
        store.append(&name("s.bound"), ExpectedVersion::Any, batch(30)).unwrap();
        highest = highest.max(store.index_tail());
    }
    // 30 + 30 + 30 = 90: a fourth batch waits for a flush instead of making 120.
    assert_eq!(highest, 90, "the tail's most changes");
    // One write larger than the bound waits for an empty tail, then passes.
    store.append(&name("s.bound"), ExpectedVersion::Any, batch(150)).unwrap();
    assert_eq!(store.index_tail(), 150);
    store.append(&name("s.bound"), ExpectedVersion::Any, batch(1)).unwrap();
    assert_eq!(store.index_tail(), 1, "the large write was flushed before the next one");
    let events = store.read_stream(&name("s.bound"), StreamFrom::Start, Direction::Forward, 1000, 0).unwrap();
    assert_eq!(events.len(), 20 * 30 + 151);
}

/// Found by the checkpoint crash test: a child killed within milliseconds
/// of its first open left `index/version` empty, and every later open failed.
#[test]
fn an_empty_store_killed_while_making_its_index_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), StoreConfig::default()).unwrap().close().unwrap();
    let version = dir.path().join("index").join("version");
    std::fs::write(&version, b"").unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).expect("the half-made index is made again");
    store.append(&name("s.after"), ExpectedVersion::NoStream, vec![event(1, "x")]).unwrap();
    store.close().unwrap();
    drop(store);
    // With events in the log, a broken index is an error that names it, not a silent reset.
    std::fs::write(&version, b"").unwrap();
    let Err(error) = Store::open(dir.path(), StoreConfig::default()) else {
        panic!("a broken index with a log is an error");
    };
    assert!(error.to_string().contains("index"), "{error}");
}

#[test]
fn a_site_that_goes_quiet_after_a_burst_flushes_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    // An eighth of 1024 changes (128) is enough for the quiet flush.
    let config = StoreConfig {
        index_flush_events: 1024,
        index_idle_flush: Some(std::time::Duration::from_millis(50)),
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let tables_at_open = store.index_memory().tables;
    let events = (1..=200u128).map(|id| event(id, "burst")).collect();
    store.append(&name("s.burst"), ExpectedVersion::Any, events).unwrap();
    // Far fewer changes than a full flush: only the quiet flush empties the tail.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.index_tail() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(store.index_tail(), 0, "the tail was flushed once the site went quiet");
    assert!(store.index_memory().tables > tables_at_open, "the flush wrote the index's tables");
    let read = store.read_stream(&name("s.burst"), StreamFrom::Start, Direction::Forward, 1000, 0).unwrap();
    assert_eq!(read.len(), 200, "served from the index");
}

/// A site that writes a trickle (a gateway's lease renewals, about one
/// event a second) must not flush its index on a timer: every flush leaves
/// tables that fjall never merges, one more set a flush, without end.
#[test]
fn a_trickle_of_writes_waits_in_the_tail_and_leaves_no_index_tables() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let tables_at_open = store.index_memory().tables;
    for id in 1..=20u128 {
        store.append(&name("s.trickle"), ExpectedVersion::Any, vec![event(id, "t")]).unwrap();
        // The trickle: writes spread over time (the interval flush this
        // replaces fired every 200 ms).
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert_eq!(store.index_tail(), 20, "the trickle waits in the tail");
    assert_eq!(store.index_memory().tables, tables_at_open, "no table was written");
    let read = |store: &Store| store.read_stream(&name("s.trickle"), StreamFrom::Start, Direction::Forward, 100, 0);
    assert_eq!(read(&store).unwrap().len(), 20, "served from the tail");
    store.close().unwrap();
    drop(store);
    // Closing flushed it; reopened, nothing is replayed and all is there.
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.index_tail(), 0);
    assert_eq!(read(&store).unwrap().len(), 20);
}
