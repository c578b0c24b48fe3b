//! Replicated streams in the store: `Store::replicate` writes with
//! exists-or-write at the origin's versions, keeps the origin with each
//! event across a restart, makes the stream a read-only replica of its home
//! site, and refuses writes from any other site.

use edgebus_store::{ErrorCode, ExistsOrWrite, ReplicaWrite, Store, StoreConfig};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, Origin, SiteName, StreamName};

fn event(id: u128, data: &str) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("Reading").expect("valid event type"),
        data: data.as_bytes().to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 1_000,
    }
}

fn site(name: &str) -> SiteName {
    SiteName::new(name).expect("valid site name")
}

fn origin(home: &str, position: u64) -> Origin {
    Origin { site: site(home), position, via: site(home), note: String::new() }
}

fn write(stream: &str, version: u64, id: u128, data: &str, home: &str) -> ReplicaWrite {
    ReplicaWrite {
        stream: StreamName::new(stream).expect("valid stream"),
        version: Some(version),
        event: event(id, data),
        origin: origin(home, 100 + version),
    }
}

#[test]
fn replicas_keep_origin_versions_absorb_replays_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    let answers = store.replicate(vec![
        write("sensor.eu", 0, 1, "a", "eu"),
        write("sensor.eu", 1, 2, "b", "eu"),
        write("sensor.us", 0, 3, "c", "us"),
    ]);
    assert!(answers.iter().all(|a| matches!(a, Ok(ExistsOrWrite::Written { .. }))), "{answers:?}");
    // A replay after a reconnect is absorbed.
    let replay = store.replicate(vec![write("sensor.eu", 1, 2, "b", "eu")]);
    assert!(matches!(replay[0], Ok(ExistsOrWrite::Exists { same: true, .. })), "{replay:?}");
    let end = store.log().end_position();
    drop(store);

    let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen");
    assert_eq!(store.log().end_position(), end);
    let events = store.read_log(0, 10, 1 << 20).expect("read");
    assert_eq!(events.len(), 3);
    let first = events[0].origin.as_ref().expect("replicated events carry their origin");
    assert_eq!((first.site.as_str(), first.position, first.via.as_str()), ("eu", 100, "eu"));
    // Still a replica after the restart: local writes are refused.
    let stream = StreamName::new("sensor.eu").expect("valid");
    let refused = store.append(&stream, ExpectedVersion::Any, vec![event(7, "local")]).unwrap_err();
    assert_eq!(refused.code(), ErrorCode::ReplicaStream);
    assert!(refused.to_string().contains("read-only replica"), "{refused}");
    let refused = store.exists_or_write(&stream, 2, event(7, "local")).unwrap_err();
    assert_eq!(refused.code(), ErrorCode::ReplicaStream);
    // The home site keeps writing after the restart.
    let more = store.replicate(vec![write("sensor.eu", 2, 4, "d", "eu")]);
    assert!(matches!(more[0], Ok(ExistsOrWrite::Written { .. })), "{more:?}");
    assert_eq!(store.log().end_position(), end + 1);
}

#[test]
fn a_site_may_not_write_another_sites_stream_or_ours() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    let local = StreamName::new("orders.o-1").expect("valid");
    store.append(&local, ExpectedVersion::NoStream, vec![event(1, "mine")]).expect("local append");
    store.replicate(vec![write("sensor.eu", 0, 2, "a", "eu")]).remove(0).expect("replica write");
    let end = store.log().end_position();

    let answers = store.replicate(vec![write("orders.o-1", 1, 3, "x", "us"), write("sensor.eu", 1, 4, "y", "us")]);
    let own = answers[0].as_ref().unwrap_err();
    assert_eq!(own.code(), ErrorCode::NotReplica);
    assert!(own.to_string().contains("this site's own stream"), "{own}");
    let other = answers[1].as_ref().unwrap_err();
    assert_eq!(other.code(), ErrorCode::NotReplica);
    assert!(other.to_string().contains("site us may not write stream sensor.eu"), "{other}");
    // A system stream is never replicated.
    let system = store.replicate(vec![ReplicaWrite {
        stream: StreamName::system("$groups").expect("valid"),
        version: Some(0),
        event: event(5, "z"),
        origin: origin("eu", 1),
    }]);
    assert_eq!(system[0].as_ref().unwrap_err().code(), ErrorCode::ReservedStream);
    assert_eq!(store.log().end_position(), end, "refused writes wrote nothing");
}

#[test]
fn a_large_replicated_batch_is_answered_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    // More than the sequencer's queue holds at once, over a few streams.
    let writes: Vec<_> =
        (0..5_000u64).map(|i| write(&format!("sensor.s{}", i % 7), i / 7, u128::from(i) + 1, "v", "eu")).collect();
    let answers = store.replicate(writes.clone());
    assert_eq!(answers.len(), 5_000);
    assert!(answers.iter().all(|a| matches!(a, Ok(ExistsOrWrite::Written { .. }))));
    let again = store.replicate(writes);
    assert!(again.iter().all(|a| matches!(a, Ok(ExistsOrWrite::Exists { same: true, .. }))));
    assert_eq!(store.log().end_position(), 5_000);
}

#[test]
fn sparse_replicas_append_once_per_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    let sampled = |id: u128, data: &str| ReplicaWrite {
        stream: StreamName::new("telemetry.t1").expect("valid"),
        version: None,
        event: event(id, data),
        origin: Origin { note: "sampled 1/10".into(), ..origin("eu", u64::try_from(id).unwrap()) },
    };
    let first = store.replicate(vec![sampled(10, "a"), sampled(20, "b")]);
    assert!(first.iter().all(|a| matches!(a, Ok(ExistsOrWrite::Written { .. }))), "{first:?}");
    // A replay is absorbed by id, in place; a new id goes at the end.
    let again = store.replicate(vec![sampled(10, "a"), sampled(20, "b"), sampled(30, "c")]);
    assert!(matches!(again[0], Ok(ExistsOrWrite::Exists { position: 0, same: true })), "{again:?}");
    assert!(matches!(again[1], Ok(ExistsOrWrite::Exists { position: 1, same: true })), "{again:?}");
    assert!(matches!(again[2], Ok(ExistsOrWrite::Written { position: 2 })), "{again:?}");
    let changed = store.replicate(vec![sampled(20, "B")]);
    assert!(matches!(changed[0], Ok(ExistsOrWrite::Exists { same: false, .. })), "{changed:?}");
    let stream = StreamName::new("telemetry.t1").expect("valid");
    assert_eq!(store.stream_info(&stream).expect("info").expect("exists").current_version, Some(2));
    let events = store.read_log(0, 10, 1 << 20).expect("read");
    assert_eq!(events[2].origin.as_ref().expect("origin").note, "sampled 1/10");
    // Then replicated as is: origin version 40 is beyond the replica's 3
    // events, so it goes at the end with the gap in its note, once.
    let as_is = |id: u128| ReplicaWrite {
        stream: StreamName::new("telemetry.t1").expect("valid"),
        version: Some(40),
        event: event(id, "d"),
        origin: origin("eu", 140),
    };
    let bridged = store.replicate(vec![as_is(40)]);
    assert!(matches!(bridged[0], Ok(ExistsOrWrite::Written { position: 3 })), "{bridged:?}");
    let again = store.replicate(vec![as_is(40)]);
    assert!(matches!(again[0], Ok(ExistsOrWrite::Exists { position: 3, same: true })), "{again:?}");
    let events = store.read_log(3, 1, 1 << 20).expect("read");
    assert_eq!(events[0].origin.as_ref().expect("origin").note, "origin version 40 after a gap");
    assert_eq!(events[0].version, 3);
}
