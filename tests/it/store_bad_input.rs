//! Bad input to the store: invalid names, oversized events and batches,
//! empty appends, writes to system streams, gaps, invalid expected versions
//! and snapshot sources. Each must fail with its typed error, whose message
//! names the problem and whose stable code is what clients see on the wire,
//! and must write nothing: the log's end and the target stream stay as they
//! were, and the store keeps working afterwards.

use edgebus_store::{ErrorCode, ReadError, Store, StoreConfig, StreamMetadata, WriteError};
use edgebus_types::limits::{EVENT_DATA_BYTES_MAX, EVENT_METADATA_BYTES_MAX, LOG_APPEND_RECORDS_DEFAULT};
use edgebus_types::{
    EventError, EventId, EventType, EventTypeError, ExpectedVersion, ExpectedVersionError, NameError, NewEvent,
    StreamName,
};

fn event(id: u128, data: Vec<u8>, metadata: Vec<u8>) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("Happened").expect("valid event type"),
        data,
        metadata,
        timestamp_ms: 1_000,
    }
}

fn small(id: u128) -> NewEvent {
    event(id, b"{}".to_vec(), Vec::new())
}

fn name(s: &str) -> StreamName {
    StreamName::new(s).expect("valid test stream name")
}

/// A store holding one event in `orders.o-1`, so that "unchanged" means something.
fn store_with_one_event(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, StoreConfig::default()).expect("open the store");
    store.append(&name("orders.o-1"), ExpectedVersion::NoStream, vec![small(1)]).expect("first append");
    store
}

/// Asserts that a refused write left the log and `stream` as they were.
fn assert_nothing_written(store: &Store, stream: &StreamName, end_before: u64, what: &str) {
    assert_eq!(store.log().end_position(), end_before, "{what}: the log's end moved");
    let info = store.stream_info(stream).expect("stream info");
    if stream.as_str() == "orders.o-1" {
        let info = info.expect("the seeded stream exists");
        assert_eq!(info.current_version, Some(0), "{what}: the stream moved");
    } else {
        assert_eq!(info, None, "{what}: the stream was created");
    }
}

#[test]
fn error_codes_are_stable() {
    // These numbers go on the wire: a change here breaks clients.
    let codes = [
        (ErrorCode::WrongExpectedVersion, 1),
        (ErrorCode::StreamDeleted, 2),
        (ErrorCode::StreamNotFound, 3),
        (ErrorCode::ReservedStream, 4),
        (ErrorCode::EventTooLarge, 5),
        (ErrorCode::BatchTooLarge, 6),
        (ErrorCode::EmptyAppend, 7),
        (ErrorCode::DuplicateEventId, 8),
        (ErrorCode::IdempotencyConflict, 9),
        (ErrorCode::Gap, 10),
        (ErrorCode::SnapshotNotFound, 11),
        (ErrorCode::Unavailable, 12),
        (ErrorCode::Busy, 13),
        (ErrorCode::InvalidArgument, 14),
        (ErrorCode::Corrupt, 15),
        (ErrorCode::PositionRemoved, 16),
        (ErrorCode::IndexFailure, 17),
        (ErrorCode::ReplicaStream, 18),
        (ErrorCode::NotReplica, 19),
    ];
    for (code, number) in codes {
        assert_eq!(code as u16, number, "{code:?}");
    }
}

#[test]
fn invalid_stream_names_and_event_types_name_the_problem() {
    let long = "a".repeat(256);
    let cases: [(&str, NameError, &str); 9] = [
        ("", NameError::Empty, "stream name is empty"),
        (&long, NameError::TooLong { len_bytes: 256, max_bytes: 255 }, "256 bytes long, more than the maximum of 255"),
        ("orders..eu", NameError::EmptyToken { name: "orders..eu".into(), byte: 7 }, "empty token at byte 7"),
        (".orders", NameError::EmptyToken { name: ".orders".into(), byte: 0 }, "empty token at byte 0"),
        (
            "orders eu",
            NameError::InvalidChar { name: "orders eu".into(), character: ' ', byte: 6 },
            "invalid character ' ' at byte 6",
        ),
        ("orders.*", NameError::InvalidChar { name: "orders.*".into(), character: '*', byte: 7 }, "'*' at byte 7"),
        ("orders.$x", NameError::MisplacedDollar { name: "orders.$x".into(), byte: 7 }, "'$' at byte 7"),
        ("$sys.streams", NameError::Reserved { name: "$sys.streams".into() }, "reserved"),
        ("$all", NameError::AllStreams, "\"$all\" is reserved"),
    ];
    for (input, error, message) in cases {
        let got = StreamName::new(input).expect_err(input);
        assert_eq!(got, error, "{input:?}");
        assert!(got.to_string().contains(message), "{input:?}: {got} should say {message:?}");
    }
    let long_type = "T".repeat(129);
    assert_eq!(EventType::new(""), Err(EventTypeError::Empty));
    let too_long = EventType::new(&long_type).expect_err("too long");
    assert_eq!(too_long, EventTypeError::TooLong { len_bytes: 129, max_bytes: 128 });
    assert!(too_long.to_string().contains("129 bytes long"), "{too_long}");
    let spaced = EventType::new("Order Placed").expect_err("space");
    assert!(matches!(spaced, EventTypeError::InvalidChar { character: ' ', byte: 5, .. }), "{spaced:?}");
    assert!(spaced.to_string().contains("invalid character ' ' at byte 5"), "{spaced}");
}

#[test]
fn unknown_expected_versions_are_refused_with_the_input() {
    for input in ["nope", "Any", "-1", "+1", "1.0", "no-stream", ""] {
        let error = input.parse::<ExpectedVersion>().expect_err(input);
        assert_eq!(error, ExpectedVersionError::Invalid { input: input.to_owned() });
        assert!(error.to_string().contains(&format!("{input:?}")), "{error} should quote {input:?}");
    }
    let error = "18446744073709551616".parse::<ExpectedVersion>().expect_err("too large");
    assert!(matches!(error, ExpectedVersionError::VersionTooLarge { .. }), "{error:?}");
    assert!(error.to_string().contains("larger than 18446744073709551615"), "{error}");
}

#[test]
fn oversized_events_are_refused_with_their_sizes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    let end = store.log().end_position();
    let fresh = name("orders.o-2");
    let seeded = name("orders.o-1");

    let big_data = event(10, vec![b'x'; EVENT_DATA_BYTES_MAX + 1], Vec::new());
    for (stream, expected) in [(&fresh, ExpectedVersion::Any), (&seeded, ExpectedVersion::Exact(0))] {
        let error = store.append(stream, expected, vec![big_data.clone()]).expect_err("data too large");
        assert_eq!(error.code(), ErrorCode::EventTooLarge, "{error}");
        assert!(
            matches!(
                &error,
                WriteError::EventTooLarge(EventError::DataTooLarge { len_bytes, max_bytes, .. })
                    if *len_bytes == EVENT_DATA_BYTES_MAX + 1 && *max_bytes == EVENT_DATA_BYTES_MAX
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("data is 1048577 bytes, more than the maximum of 1048576"), "{error}");
        assert_nothing_written(&store, stream, end, "oversized data");
    }

    let big_metadata = event(11, b"{}".to_vec(), vec![b'm'; EVENT_METADATA_BYTES_MAX + 1]);
    let error = store.append(&fresh, ExpectedVersion::Any, vec![big_metadata.clone()]).expect_err("metadata");
    assert_eq!(error.code(), ErrorCode::EventTooLarge, "{error}");
    assert!(
        matches!(
            &error,
            WriteError::EventTooLarge(EventError::MetadataTooLarge { len_bytes: 65_537, max_bytes: 65_536, .. })
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("metadata is 65537 bytes, more than the maximum of 65536"), "{error}");
    assert_nothing_written(&store, &fresh, end, "oversized metadata");

    // One bad event spoils the whole append, and the error names it.
    let error = store
        .append(&fresh, ExpectedVersion::Any, vec![small(12), small(13), big_metadata.clone()])
        .expect_err("third event too large");
    assert!(error.to_string().contains(&EventId::from_u128(11).to_string()), "{error} should name the event");
    assert_nothing_written(&store, &fresh, end, "append with one oversized event");

    for bad in [big_data, big_metadata] {
        let error = store.exists_or_write(&fresh, 0, bad).expect_err("exists_or_write of an oversized event");
        assert_eq!(error.code(), ErrorCode::EventTooLarge, "{error}");
        assert_nothing_written(&store, &fresh, end, "exists_or_write of an oversized event");
    }

    // The limits are inclusive: the largest valid event is accepted.
    let largest = event(14, vec![b'x'; EVENT_DATA_BYTES_MAX], vec![b'm'; EVENT_METADATA_BYTES_MAX]);
    let result = store.append(&fresh, ExpectedVersion::NoStream, vec![largest]).expect("largest event");
    assert_eq!((result.first_version, result.first_position), (0, end));
}

#[test]
fn oversized_and_empty_batches_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    let end = store.log().end_position();
    let stream = name("orders.o-2");

    let error = store.append(&stream, ExpectedVersion::Any, Vec::new()).expect_err("empty");
    assert!(matches!(error, WriteError::EmptyAppend), "{error:?}");
    assert_eq!(error.code(), ErrorCode::EmptyAppend);
    assert!(error.to_string().contains("at least one event"), "{error}");
    assert_nothing_written(&store, &stream, end, "empty append");

    let too_many = LOG_APPEND_RECORDS_DEFAULT as usize + 1;
    let events: Vec<NewEvent> = (0..too_many as u128).map(|i| small(100 + i)).collect();
    let error = store.append(&stream, ExpectedVersion::Any, events).expect_err("too many events");
    assert_eq!(error.code(), ErrorCode::BatchTooLarge, "{error}");
    assert!(matches!(error, WriteError::BatchTooLarge { events: 10_001, events_max: 10_000, .. }), "{error:?}");
    assert!(error.to_string().contains("append of 10001 events"), "{error}");
    assert_nothing_written(&store, &stream, end, "too many events");

    // Every event is valid, but together they exceed the atomic append's bytes.
    let config = StoreConfig::default().log;
    let events: Vec<NewEvent> =
        (0..5u128).map(|i| event(20_000 + i, vec![b'x'; EVENT_DATA_BYTES_MAX], Vec::new())).collect();
    let error = store.append(&stream, ExpectedVersion::Any, events).expect_err("too many bytes");
    assert_eq!(error.code(), ErrorCode::BatchTooLarge, "{error}");
    match &error {
        WriteError::BatchTooLarge { events, bytes, bytes_max, .. } => {
            assert_eq!(*events, 5, "{error}");
            assert_eq!(*bytes_max, config.append_bytes_max, "{error}");
            assert!(*bytes > *bytes_max, "{error}");
        }
        other => panic!("expected BatchTooLarge, got {other:?}"),
    }
    assert_nothing_written(&store, &stream, end, "too many bytes");

    // The same id twice in one append is a client bug.
    let error = store.append(&stream, ExpectedVersion::Any, vec![small(30), small(30)]).expect_err("same id twice");
    assert_eq!(error.code(), ErrorCode::InvalidArgument, "{error}");
    assert!(error.to_string().contains("appears twice"), "{error}");
    assert_nothing_written(&store, &stream, end, "same id twice");

    // After all that, the store still writes where it should.
    let result = store.append(&stream, ExpectedVersion::NoStream, vec![small(31), small(32)]).expect("valid append");
    assert_eq!((result.first_version, result.first_position, result.count), (0, end, 2));
}

#[test]
fn clients_cannot_write_system_streams() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    let end = store.log().end_position();
    for system in ["$sys.streams", "$snapshots.orders", "$custom.stream"] {
        let stream = StreamName::system(system).expect("valid system name");
        let check = |error: WriteError, what: &str| {
            assert_eq!(error.code(), ErrorCode::ReservedStream, "{what} to {system}: {error}");
            assert!(matches!(&error, WriteError::ReservedStream { stream: s } if s.as_str() == system), "{error:?}");
            assert!(error.to_string().contains("reserved for the system"), "{error}");
            assert_eq!(store.log().end_position(), end, "{what} to {system} wrote something");
        };
        check(store.append(&stream, ExpectedVersion::Any, vec![small(40)]).expect_err("append"), "append");
        check(store.exists_or_write(&stream, 0, small(41)).expect_err("exists_or_write"), "exists_or_write");
        let metadata = StreamMetadata { max_count: Some(1), ..StreamMetadata::default() };
        check(store.set_stream_metadata(&stream, metadata, 0).expect_err("metadata"), "set_stream_metadata");
        for hard in [false, true] {
            check(store.delete_stream(&stream, ExpectedVersion::Any, hard, 0).expect_err("delete"), "delete_stream");
        }
    }
    // The system streams are intact: the seeded stream has no metadata.
    let info = store.stream_info(&name("orders.o-1")).expect("info").expect("exists");
    assert_eq!(info.metadata, StreamMetadata::default());
}

#[test]
fn exists_or_write_beyond_the_end_is_a_gap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    let end = store.log().end_position();
    for (stream, index, count) in [("orders.o-1", 5, 1), ("orders.o-1", 2, 1), ("orders.o-2", 1, 0)] {
        let stream = name(stream);
        let error = store.exists_or_write(&stream, index, small(50 + u128::from(index))).expect_err("gap");
        assert_eq!(error.code(), ErrorCode::Gap, "{error}");
        assert!(
            matches!(&error, WriteError::Gap { stream: s, index: i, count: c } if *s == stream && *i == index && *c == count),
            "{error:?}"
        );
        assert!(
            error.to_string().contains(&format!("at index {index} of {stream}, which holds {count} events")),
            "{error}"
        );
        assert_nothing_written(&store, &stream, end, "exists_or_write with a gap");
    }
}

#[test]
fn invalid_snapshot_sources_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_one_event(dir.path());
    let end = store.log().end_position();
    let stream = name("orders.o-1");
    for source in ["", "a$b", "has space", "a..b"] {
        let error = store.record_snapshot(source, &stream, 0, b"state".to_vec(), 0).expect_err(source);
        assert_eq!(error.code(), ErrorCode::InvalidArgument, "{source:?}: {error}");
        assert!(error.to_string().contains(&format!("snapshot source {source:?}")), "{error}");
        assert_eq!(store.log().end_position(), end, "{source:?}: a refused snapshot wrote something");
        let error = store.read_snapshot(source, &stream, None).expect_err(source);
        assert!(matches!(error, ReadError::InvalidArgument(_)), "{source:?}: {error:?}");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
        let error = store.delete_snapshot(source, &stream, 0, 0).expect_err(source);
        assert_eq!(error.code(), ErrorCode::InvalidArgument, "{source:?}: {error}");
    }
    let error = store.delete_snapshot("orders", &stream, 3, 0).expect_err("no such snapshot");
    assert_eq!(error.code(), ErrorCode::SnapshotNotFound, "{error}");
    assert!(error.to_string().contains("no snapshot of orders.o-1 at version 3 from source orders"), "{error}");
    assert_eq!(store.log().end_position(), end);
}
