//! The store's async writes (`append_async`, `exists_or_write_async`, what
//! the node's request handlers await) answer exactly as the blocking calls
//! do: the same versions, idempotent retries, expected-version refusals and
//! exists-or-write answers, also when many tasks race on one stream.

use std::sync::Arc;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_writes_answer_as_blocking_writes_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
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
    const TASKS: u128 = 8;
    const INDEXES: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), StoreConfig::default()).unwrap());
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
