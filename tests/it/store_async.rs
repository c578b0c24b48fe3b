//! The store's async writes (`append_async`, `exists_or_write_async`, what
//! the node's request handlers await) answer exactly as the blocking calls
//! do: the same versions, idempotent retries, expected-version refusals and
//! exists-or-write answers, also when many tasks race on one stream; under
//! `fsync=always`, where a task runs its write on its own thread, and under
//! `fsync=never`, where it goes through the sequencer.

use std::sync::Arc;

use edgebus_log::{FsyncPolicy, LogConfig};
use edgebus_store::{Direction, ExistsOrWrite, Store, StoreConfig, StreamFrom, WriteError};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};

fn event(id: u128, data: &str) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("order.placed").unwrap(),
        data: data.as_bytes().to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 1_700_000_000_000,
    }
}

/// A store under each policy that changes how a task's write is run.
fn configs() -> [StoreConfig; 2] {
    [FsyncPolicy::Always, FsyncPolicy::Never]
        .map(|fsync| StoreConfig { log: LogConfig { fsync, ..LogConfig::default() }, ..StoreConfig::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_writes_answer_as_blocking_writes_do() {
    for config in configs() {
        answers_as_blocking_writes_do(config).await;
    }
}

async fn answers_as_blocking_writes_do(config: StoreConfig) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config).unwrap();
    let orders = StreamName::new("orders-1").unwrap();

    let first = store.append_async(&orders, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "b")]).await;
    let first = first.expect("a new stream takes its first events");
    assert_eq!((first.first_version, first.count, first.already_written), (0, 2, false));

    let retry = store.append_async(&orders, ExpectedVersion::NoStream, vec![event(1, "a"), event(2, "b")]).await;
    let retry = retry.expect("a retry of the same append succeeds without writing");
    assert_eq!((retry.first_position, retry.already_written), (first.first_position, true));

    let stale = store.append_async(&orders, ExpectedVersion::Exact(0), vec![event(3, "c")]).await;
    match stale {
        Err(WriteError::WrongExpectedVersion { source, .. }) => assert_eq!(source.current, Some(1)),
        other => panic!("a stale expected version is refused with the current one, got {other:?}"),
    }
    let duplicate = store.append_async(&orders, ExpectedVersion::Any, vec![event(3, "c"), event(3, "c")]).await;
    assert!(matches!(duplicate, Err(WriteError::InvalidArgument(_))), "{duplicate:?}");

    let written = store.exists_or_write_async(&orders, 2, event(4, "d")).await.expect("written at the end");
    assert!(matches!(written, ExistsOrWrite::Written { .. }), "{written:?}");
    let same = store.exists_or_write_async(&orders, 2, event(4, "d")).await.expect("answered");
    let different = store.exists_or_write_async(&orders, 2, event(5, "e")).await.expect("answered");
    let ExistsOrWrite::Written { position } = written else { unreachable!() };
    assert_eq!(same, ExistsOrWrite::Exists { position, same: true });
    assert_eq!(different, ExistsOrWrite::Exists { position, same: false });
    let gap = store.exists_or_write_async(&orders, 9, event(6, "f")).await;
    assert!(matches!(gap, Err(WriteError::Gap { index: 9, count: 3, .. })), "{gap:?}");

    let read = store.read_stream(&orders, StreamFrom::Start, Direction::Forward, 10, 0).unwrap();
    let data: Vec<&[u8]> = read.iter().map(|e| e.data.as_slice()).collect();
    assert_eq!(data, [b"a".as_slice(), b"b", b"d"], "exactly the accepted events, once each");
    store.close().unwrap();
}

/// Tasks race exists-or-write at every index, as redundant transformers do:
/// one wins each index and the others see it, with `same` telling whether
/// their content matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_tasks_write_each_index_once() {
    for config in configs() {
        race_each_index(config).await;
    }
}

async fn race_each_index(config: StoreConfig) {
    const TASKS: u128 = 8;
    const INDEXES: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), config).unwrap());
    let stream = StreamName::new("matches").unwrap();
    let mut racers = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (store, stream) = (Arc::clone(&store), stream.clone());
        racers.spawn(async move {
            let mut wins = 0u64;
            for index in 0..INDEXES {
                // Even tasks agree on the content; odd ones differ from everyone.
                let data = if task % 2 == 0 { format!("out-{index}") } else { format!("out-{index}-by-{task}") };
                let id = u128::from(index) * 100 + task;
                match store.exists_or_write_async(&stream, index, event(id, &data)).await {
                    Ok(ExistsOrWrite::Written { .. }) => wins += 1,
                    Ok(ExistsOrWrite::Exists { .. }) => {}
                    Err(e) => panic!("task {task} at index {index}: {e}"),
                }
            }
            wins
        });
    }
    let wins: u64 = racers.join_all().await.into_iter().sum();
    assert_eq!(wins, INDEXES, "exactly one write wins each index");
    let read = store.read_stream(&stream, StreamFrom::Start, Direction::Forward, INDEXES as usize + 1, 0).unwrap();
    assert_eq!(read.len() as u64, INDEXES, "the stream holds one event per index");
    assert!(read.iter().enumerate().all(|(i, e)| e.version == i as u64), "versions are dense");
    store.close().unwrap();
}

/// Tasks writing while the store closes: every write is either kept (and
/// answered) or refused as unavailable, under each policy; none is lost,
/// none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_writes_racing_a_close_are_either_kept_or_refused() {
    for config in configs() {
        race_a_close(config).await;
    }
}

async fn race_a_close(config: StoreConfig) {
    const TASKS: u128 = 8;
    const ACKED_BEFORE_CLOSE: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), config.clone()).unwrap());
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stream = |task: u128| StreamName::new(&format!("closing.t{task}")).unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
        writers.spawn(async move {
            let mut written = Vec::new();
            for n in 0u128.. {
                let id = (task << 32) | (n + 1);
                match store.append_async(&stream(task), ExpectedVersion::Any, vec![event(id, "x")]).await {
                    Ok(_) => {
                        written.push(id);
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert!(matches!(e, WriteError::Unavailable(_)), "task {task}: refused as unavailable: {e}");
                        break;
                    }
                }
            }
            (task, written)
        });
    }
    let closer = {
        let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while acked.load(std::sync::atomic::Ordering::Relaxed) < ACKED_BEFORE_CLOSE {
                assert!(std::time::Instant::now() < deadline, "the writers stalled before the close");
                std::thread::yield_now();
            }
            store.close().expect("close");
        })
    };
    let joined = tokio::time::timeout(std::time::Duration::from_secs(60), writers.join_all()).await;
    let written = joined.expect("every task's writes answered after the close");
    closer.await.expect("the closer finished");
    drop(store);
    let reopened = Store::open(dir.path(), config).unwrap();
    for (task, ids) in written {
        let events = reopened.read_stream(&stream(task), StreamFrom::Start, Direction::Forward, 100_000, 0).unwrap();
        let stored: Vec<u128> = events.iter().map(|e| e.id.as_u128()).collect();
        assert_eq!(stored, ids, "task {task}: exactly the acknowledged writes, in order");
    }
}
