//! Tests of the wire contract: stable error numbers, error statuses that
//! survive the trip through gRPC headers, conversions that round-trip, and
//! bad input that names its field.

use edgebus_log::{AppendError, IoFailure, ReadError as LogReadError};
use edgebus_store::{
    AllFilter, AllSlice, AppendResult, Direction, ErrorCode, ExistsOrWrite, READ_COUNT_MAX, ReadError, Snapshot,
    SnapshotInfo, StreamFrom, StreamInfo, StreamMetadata, WriteError,
};
use edgebus_types::{
    EventError, EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName, StreamPattern,
    WrongExpectedVersion,
};
use proptest::prelude::*;
use prost::Message;
use tonic::codegen::http::HeaderMap;
use tonic::{Code, Status};

use crate::convert::*;
use crate::v1;

fn name(text: &str) -> StreamName {
    StreamName::new(text).expect("valid stream name")
}

fn event_type(text: &str) -> EventType {
    EventType::new(text).expect("valid event type")
}

/// Sends `status` through the gRPC trailers a server writes and a client
/// reads, as the real transport does.
fn over_the_wire(status: &Status) -> Status {
    let mut headers = HeaderMap::new();
    status.add_header(&mut headers).expect("status encodes as headers");
    Status::from_header_map(&headers).expect("headers decode as a status")
}

fn detail_over_the_wire(status: &Status) -> v1::ErrorDetail {
    error_detail_from_status(&over_the_wire(status)).expect("the status carries an ErrorDetail")
}

// ---- error codes -----------------------------------------------------------

/// Every store code, its wire enum value and its number. A renumbering on
/// either side, or a store code missing here, fails this test: never edit a
/// number to make it pass.
const STORE_CODES: [(ErrorCode, v1::ErrorCode, u32); 19] = [
    (ErrorCode::WrongExpectedVersion, v1::ErrorCode::WrongExpectedVersion, 1),
    (ErrorCode::StreamDeleted, v1::ErrorCode::StreamDeleted, 2),
    (ErrorCode::StreamNotFound, v1::ErrorCode::StreamNotFound, 3),
    (ErrorCode::ReservedStream, v1::ErrorCode::ReservedStream, 4),
    (ErrorCode::EventTooLarge, v1::ErrorCode::EventTooLarge, 5),
    (ErrorCode::BatchTooLarge, v1::ErrorCode::BatchTooLarge, 6),
    (ErrorCode::EmptyAppend, v1::ErrorCode::EmptyAppend, 7),
    (ErrorCode::DuplicateEventId, v1::ErrorCode::DuplicateEventId, 8),
    (ErrorCode::IdempotencyConflict, v1::ErrorCode::IdempotencyConflict, 9),
    (ErrorCode::Gap, v1::ErrorCode::Gap, 10),
    (ErrorCode::SnapshotNotFound, v1::ErrorCode::SnapshotNotFound, 11),
    (ErrorCode::Unavailable, v1::ErrorCode::Unavailable, 12),
    (ErrorCode::Busy, v1::ErrorCode::Busy, 13),
    (ErrorCode::InvalidArgument, v1::ErrorCode::InvalidArgument, 14),
    (ErrorCode::Corrupt, v1::ErrorCode::Corrupt, 15),
    (ErrorCode::PositionRemoved, v1::ErrorCode::PositionRemoved, 16),
    (ErrorCode::IndexFailure, v1::ErrorCode::IndexFailure, 17),
    (ErrorCode::ReplicaStream, v1::ErrorCode::ReplicaStream, 18),
    (ErrorCode::NotReplica, v1::ErrorCode::NotReplica, 19),
];

/// Codes of the node and the wire, from 100 up.
const WIRE_CODES: [(v1::ErrorCode, u32); 10] = [
    (v1::ErrorCode::InvalidName, 100),
    (v1::ErrorCode::InvalidFilter, 101),
    (v1::ErrorCode::Unauthenticated, 102),
    (v1::ErrorCode::ResourceExhausted, 103),
    (v1::ErrorCode::PermissionDenied, 104),
    (v1::ErrorCode::GroupNotFound, 105),
    (v1::ErrorCode::GroupExists, 106),
    (v1::ErrorCode::NotInFlight, 107),
    (v1::ErrorCode::ConsumerExists, 108),
    (v1::ErrorCode::Fenced, 109),
];

#[test]
fn error_codes_equal_the_store_discriminants() {
    for (store, wire, number) in STORE_CODES {
        assert_eq!(wire_error_code(store), number, "{store:?}");
        assert_eq!(wire as i32, i32::try_from(number).expect("small"), "{wire:?}");
        // The names match too, so the table cannot pair two different codes.
        let wire_name = wire.as_str_name().strip_prefix("ERROR_CODE_").expect("prefixed").replace('_', "");
        assert_eq!(wire_name, format!("{store:?}").to_uppercase(), "{store:?} vs {wire:?}");
    }
    for (wire, number) in WIRE_CODES {
        assert_eq!(wire as i32, i32::try_from(number).expect("small"), "{wire:?}");
    }
    assert_eq!(v1::ErrorCode::Unspecified as i32, 0);
    // The .proto has no code that the tables above do not list.
    let listed: Vec<i32> = std::iter::once(0)
        .chain(STORE_CODES.iter().map(|(_, wire, _)| *wire as i32))
        .chain(WIRE_CODES.iter().map(|(wire, _)| *wire as i32))
        .collect();
    for number in 0..1000 {
        assert_eq!(v1::ErrorCode::try_from(number).is_ok(), listed.contains(&number), "code {number}");
    }
}

#[test]
fn every_code_maps_to_its_grpc_code() {
    let expected = [
        (0, Code::Unknown),
        (1, Code::FailedPrecondition),
        (2, Code::FailedPrecondition),
        (3, Code::NotFound),
        (4, Code::InvalidArgument),
        (5, Code::InvalidArgument),
        (6, Code::InvalidArgument),
        (7, Code::InvalidArgument),
        (8, Code::AlreadyExists),
        (9, Code::AlreadyExists),
        (10, Code::OutOfRange),
        (11, Code::NotFound),
        (12, Code::Unavailable),
        (13, Code::Unavailable),
        (14, Code::InvalidArgument),
        (15, Code::DataLoss),
        (16, Code::OutOfRange),
        (17, Code::Internal),
        (18, Code::FailedPrecondition),
        (19, Code::FailedPrecondition),
        (100, Code::InvalidArgument),
        (101, Code::InvalidArgument),
        (102, Code::Unauthenticated),
        (103, Code::ResourceExhausted),
        (104, Code::PermissionDenied),
        (105, Code::NotFound),
        (106, Code::AlreadyExists),
        (107, Code::FailedPrecondition),
        (108, Code::AlreadyExists),
        (109, Code::FailedPrecondition),
        // A code from a newer node: the client does not know it.
        (20, Code::Unknown),
        (u32::MAX, Code::Unknown),
    ];
    for (code, grpc) in expected {
        assert_eq!(grpc_code(code), grpc, "code {code}");
    }
}

// ---- write and read errors as statuses ------------------------------------

#[test]
fn wrong_expected_version_keeps_code_expected_and_current() {
    let cases = [
        (ExpectedVersion::Exact(3), Some(5)),
        (ExpectedVersion::Exact(3), None),
        (ExpectedVersion::NoStream, Some(0)),
        (ExpectedVersion::StreamExists, None),
        (ExpectedVersion::Exact(u64::MAX), Some(u64::MAX - 1)),
    ];
    for (expected, current) in cases {
        let error = WriteError::WrongExpectedVersion {
            stream: name("orders.o-1"),
            source: WrongExpectedVersion { expected, current },
        };
        let status = over_the_wire(&status_from_write_error(&error));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), error.to_string());
        let detail = error_detail_from_status(&status).expect("detail");
        assert_eq!(detail.code, 1);
        assert_eq!(detail.error_code(), v1::ErrorCode::WrongExpectedVersion);
        assert_eq!(detail.stream.as_deref(), Some("orders.o-1"));
        assert_eq!(detail.current, current);
        assert_eq!(detail.wrong_expected_version(), Some(WrongExpectedVersion { expected, current }));
        assert_eq!(detail.message, error.to_string());
    }
}

#[test]
fn every_write_error_keeps_its_code_and_facts() {
    let id = EventId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let errors = [
        WriteError::StreamDeleted { stream: name("a") },
        WriteError::StreamNotFound { stream: name("a") },
        WriteError::ReservedStream { stream: name("a") },
        WriteError::EventTooLarge(EventError::DataTooLarge { id, len_bytes: 2, max_bytes: 1 }),
        WriteError::BatchTooLarge { events: 2, bytes: 3, events_max: 1, bytes_max: 1 },
        WriteError::EmptyAppend,
        WriteError::DuplicateEventId { id, position: 42, stream: name("b"), version: 7 },
        WriteError::IdempotencyConflict { id, stream: name("b") },
        WriteError::Gap { stream: name("c"), index: 9, count: 4 },
        WriteError::Gap { stream: name("c"), index: 1, count: 0 },
        WriteError::SnapshotNotFound { source_name: "orders".into(), stream: name("o"), version: 3 },
        WriteError::InvalidArgument("bad".into()),
        WriteError::Busy,
        WriteError::Unavailable(AppendError::Closed),
        WriteError::Index("disk said no".into()),
    ];
    for error in &errors {
        let status = status_from_write_error(error);
        let detail = detail_over_the_wire(&status);
        assert_eq!(detail.code, wire_error_code(error.code()), "{error}");
        assert_eq!(over_the_wire(&status).code(), grpc_code(detail.code), "{error}");
        assert_eq!(detail.message, error.to_string());
    }

    let detail = error_detail_from_write_error(&errors[6]);
    assert_eq!(detail.event_id(), Some(id));
    assert_eq!((detail.position, detail.version, detail.stream.as_deref()), (Some(42), Some(7), Some("b")));
    assert_eq!(error_detail_from_write_error(&errors[3]).event_id(), Some(id));
    assert_eq!(error_detail_from_write_error(&errors[7]).event_id(), Some(id));

    // Gap: `version` is the index asked for, `current` the stream's last version.
    let gap = error_detail_from_write_error(&errors[8]);
    assert_eq!((gap.version, gap.current), (Some(9), Some(3)));
    let gap_empty = error_detail_from_write_error(&errors[9]);
    assert_eq!((gap_empty.version, gap_empty.current), (Some(1), None));

    let snapshot = error_detail_from_write_error(&errors[10]);
    assert_eq!(snapshot.snapshot_source.as_deref(), Some("orders"));
    assert_eq!(snapshot.version, Some(3));
    // Only a WRONG_EXPECTED_VERSION detail yields an expectation.
    assert_eq!(snapshot.wrong_expected_version(), None);
}

#[test]
fn busy_tells_when_to_retry() {
    let status = status_from_write_error(&WriteError::Busy);
    assert_eq!(status.code(), Code::Unavailable);
    let received = over_the_wire(&status);
    let pushback = received.metadata().get(RETRY_PUSHBACK_HEADER).expect("pushback trailer");
    assert_eq!(pushback.to_str().expect("ascii"), BUSY_RETRY_AFTER_MS.to_string());
    let detail = error_detail_from_status(&received).expect("detail");
    assert_eq!(detail.error_code(), v1::ErrorCode::Busy);
    assert_eq!(detail.retry_after_ms, Some(BUSY_RETRY_AFTER_MS));
    // Errors without a delay carry no pushback: gRPC would read it as "retry".
    let not_found = over_the_wire(&status_from_write_error(&WriteError::StreamNotFound { stream: name("a") }));
    assert!(not_found.metadata().get(RETRY_PUSHBACK_HEADER).is_none());
}

#[test]
fn read_errors_keep_their_code_and_facts() {
    let removed = ReadError::Log(LogReadError::Removed { position: 5, start: 100 });
    let status = status_from_read_error(&removed);
    assert_eq!(over_the_wire(&status).code(), Code::OutOfRange);
    let detail = detail_over_the_wire(&status);
    assert_eq!(detail.error_code(), v1::ErrorCode::PositionRemoved);
    assert_eq!((detail.position, detail.first_position), (Some(5), Some(100)));

    // A deleted stream is NotFound to a reader, FailedPrecondition to a writer.
    let deleted = status_from_read_error(&ReadError::StreamDeleted { stream: name("a") });
    assert_eq!(deleted.code(), Code::NotFound);
    assert_eq!(detail_over_the_wire(&deleted).error_code(), v1::ErrorCode::StreamDeleted);
    assert_eq!(
        status_from_write_error(&WriteError::StreamDeleted { stream: name("a") }).code(),
        Code::FailedPrecondition
    );

    let not_found = status_from_read_error(&ReadError::StreamNotFound { stream: name("a") });
    assert_eq!(not_found.code(), Code::NotFound);
    assert_eq!(detail_over_the_wire(&not_found).stream.as_deref(), Some("a"));

    let snapshot = ReadError::SnapshotNotFound { source_name: "s".into(), stream: name("a") };
    let detail = detail_over_the_wire(&status_from_read_error(&snapshot));
    assert_eq!(detail.error_code(), v1::ErrorCode::SnapshotNotFound);
    assert_eq!((detail.snapshot_source.as_deref(), detail.version), (Some("s"), None));

    // The store reports I/O and index failures as CORRUPT; the gRPC code
    // tells the generic client what it can do about them.
    let io = ReadError::Log(LogReadError::Io(IoFailure {
        op: "read",
        file: "00000000.seg".into(),
        offset: 7,
        source: std::io::Error::other("eio"),
    }));
    let status = status_from_read_error(&io);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(detail_over_the_wire(&status).error_code(), v1::ErrorCode::Corrupt);
    let index = status_from_read_error(&ReadError::Index("broken".into()));
    assert_eq!(index.code(), Code::Internal);
    assert_eq!(detail_over_the_wire(&index).error_code(), v1::ErrorCode::Corrupt);
    let invalid = status_from_read_error(&ReadError::InvalidArgument("x".into()));
    assert_eq!(invalid.code(), Code::InvalidArgument);
}

#[test]
fn node_codes_and_foreign_statuses() {
    let detail = v1::ErrorDetail {
        code: v1::ErrorCode::ResourceExhausted as u32,
        message: "too many subscriptions".into(),
        retry_after_ms: Some(250),
        ..Default::default()
    };
    let status = over_the_wire(&status_from_error_detail(detail.clone()));
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(error_detail_from_status(&status), Some(detail));
    // A status from a proxy or the gRPC runtime has no detail.
    assert_eq!(error_detail_from_status(&Status::unavailable("connection reset")), None);
    // A code from a newer node survives decoding as a number.
    let newer = v1::ErrorDetail { code: 150, ..Default::default() };
    let received = detail_over_the_wire(&status_from_error_detail(newer));
    assert_eq!(received.code, 150);
    assert_eq!(received.error_code(), v1::ErrorCode::Unspecified);
}

// ---- bad input names the field --------------------------------------------

fn wire_event(id_len: usize, event_type: &str) -> v1::NewEvent {
    v1::NewEvent { id: vec![7; id_len], r#type: event_type.into(), data: b"{}".to_vec(), metadata: vec![] }
}

fn append_request(events: Vec<v1::NewEvent>) -> v1::AppendRequest {
    v1::AppendRequest { stream: "orders.o-1".into(), expected_version: Some(ExpectedVersion::Any.into()), events }
}

#[test]
fn bad_event_type_names_the_event_and_field() {
    let request = append_request(vec![wire_event(16, "a"), wire_event(16, "b"), wire_event(16, "a b")]);
    let error = AppendArgs::from_wire(request, 1).expect_err("invalid type");
    assert_eq!(error.field(), "events[2].type");
    assert_eq!(
        error.to_string(),
        r#"events[2].type: event type "a b" has invalid character ' ' at byte 1 (allowed: printable ASCII without spaces)"#
    );
    assert_eq!(error.code(), v1::ErrorCode::InvalidName);
    let status = over_the_wire(&Status::from(error.clone()));
    assert_eq!(status.code(), Code::InvalidArgument);
    let detail = error_detail_from_status(&status).expect("detail");
    assert_eq!(detail.error_code(), v1::ErrorCode::InvalidName);
    assert_eq!(detail.field, "events[2].type");
    assert_eq!(detail.message, error.to_string());
}

#[test]
fn bad_requests_name_their_field() {
    let field = |result: Result<AppendArgs, ConvertError>| result.expect_err("invalid").to_string();
    assert_eq!(
        field(AppendArgs::from_wire(append_request(vec![wire_event(16, "t"), wire_event(15, "t")]), 0)),
        "events[1].id: event id is 15 bytes, expected 16"
    );
    let mut request = append_request(vec![wire_event(16, "t")]);
    request.expected_version = None;
    assert_eq!(field(AppendArgs::from_wire(request.clone(), 0)), "expected_version: required field is missing");
    request.expected_version = Some(v1::ExpectedVersion { kind: None });
    assert_eq!(field(AppendArgs::from_wire(request, 0)), "expected_version.kind: required field is missing");

    let mut request = append_request(vec![wire_event(16, "t")]);
    request.stream = "$sys.x".into();
    let error = AppendArgs::from_wire(request, 0).expect_err("reserved");
    assert_eq!(error.field(), "stream");
    assert_eq!(error.code(), v1::ErrorCode::InvalidName);
    assert!(error.to_string().starts_with("stream: stream name \"$sys.x\" is reserved"), "{error}");

    let exists = v1::ExistsOrWriteRequest { stream: "a".into(), index: 0, event: None, origin_timestamp_ms: None };
    let error = ExistsOrWriteArgs::from_wire(exists, 0).expect_err("missing event");
    assert_eq!(error.to_string(), "event: required field is missing");

    let read =
        v1::ReadStreamRequest { stream: "a".into(), from: Some(StreamFrom::Start.into()), direction: 7, max_count: 0 };
    assert_eq!(
        ReadStreamArgs::try_from(read).expect_err("bad enum").to_string(),
        "direction: unknown Direction value 7"
    );

    let read_all = v1::ReadAllRequest {
        from: Some(v1::AllFrom { kind: Some(v1::all_from::Kind::Start(v1::Empty {})) }),
        direction: 0,
        max_count: 0,
        filter: Some(v1::AllFilter {
            stream_pattern: "orders.>".into(),
            event_types: vec!["ok".into(), "".into()],
            include_system: false,
        }),
    };
    let error = ReadAllArgs::try_from(read_all.clone()).expect_err("empty type");
    assert_eq!(error.to_string(), "filter.event_types[1]: event type is empty");
    let mut bad_pattern = read_all.clone();
    bad_pattern.filter = Some(v1::AllFilter { stream_pattern: "a.>.b".into(), ..Default::default() });
    let error = ReadAllArgs::try_from(bad_pattern).expect_err("bad pattern");
    assert_eq!(error.field(), "filter.stream_pattern");
    let mut too_many = read_all;
    too_many.filter =
        Some(v1::AllFilter { event_types: vec!["t".into(); FILTER_EVENT_TYPES_MAX + 1], ..Default::default() });
    let error = ReadAllArgs::try_from(too_many).expect_err("too many types");
    assert_eq!(error.field(), "filter.event_types");
    assert_eq!(error.code(), v1::ErrorCode::InvalidFilter);
}

fn subscribe_start() -> v1::subscribe_request::Start {
    use v1::subscribe_request::start::{StartAt, Streams};
    v1::subscribe_request::Start {
        streams: Some(Streams::StreamPattern("orders.>".into())),
        event_types: vec![],
        predicate: String::new(),
        include_system: false,
        start_at: Some(StartAt::StreamVersion(3)),
        initial_grant_events: 0,
    }
}

fn start_error(start: v1::subscribe_request::Start) -> ConvertError {
    let request = v1::SubscribeRequest { kind: Some(v1::subscribe_request::Kind::Start(start)) };
    ClientMessage::try_from(request).expect_err("invalid start")
}

#[test]
fn bad_subscriptions_name_their_field() {
    let error = start_error(subscribe_start());
    assert_eq!(error.field(), "start.stream_version");
    assert_eq!(error.problem(), &Problem::StreamVersionNeedsStream);

    let mut start = subscribe_start();
    start.start_at = None;
    assert_eq!(start_error(start).to_string(), "start.start_at: required field is missing");

    let mut start = subscribe_start();
    start.start_at = Some(v1::subscribe_request::start::StartAt::End(v1::Empty {}));
    start.predicate = "x".repeat(FILTER_PREDICATE_BYTES_MAX + 1);
    let error = start_error(start);
    assert_eq!(error.field(), "start.predicate");
    assert_eq!(error.code(), v1::ErrorCode::InvalidFilter);

    let mut start = subscribe_start();
    start.streams = Some(v1::subscribe_request::start::Streams::Stream("a..b".into()));
    let error = start_error(start);
    assert_eq!(error.field(), "start.stream");
    assert_eq!(error.code(), v1::ErrorCode::InvalidName);

    let empty = v1::SubscribeRequest { kind: None };
    assert_eq!(ClientMessage::try_from(empty).expect_err("empty").to_string(), "kind: required field is missing");

    let bad_event = v1::SubscribeResponse {
        kind: Some(v1::subscribe_response::Kind::Event(v1::RecordedEvent {
            stream: "a".into(),
            id: vec![1; 16],
            r#type: "t\n".into(),
            ..Default::default()
        })),
    };
    assert_eq!(ServerMessage::try_from(bad_event).expect_err("bad type").field(), "event.type");
}

// ---- counts ----------------------------------------------------------------

#[test]
fn zero_means_the_maximum_and_larger_counts_are_capped() {
    let request = |max_count| v1::ReadStreamRequest {
        stream: "a".into(),
        from: Some(StreamFrom::End.into()),
        direction: v1::Direction::Backward as i32,
        max_count,
    };
    let args = |max_count| ReadStreamArgs::try_from(request(max_count)).expect("valid").max_count;
    assert_eq!(args(0), READ_COUNT_MAX);
    assert_eq!(args(1), 1);
    assert_eq!(args(u32::MAX), READ_COUNT_MAX);
    let listing = ListStreamsArgs::from(v1::ListStreamsRequest { after: None, limit: 0, include_system: true });
    assert_eq!(listing.limit, READ_COUNT_MAX);

    use v1::all_from::Kind;
    let from = |kind| {
        let request = v1::ReadAllRequest { from: Some(v1::AllFrom { kind: Some(kind) }), ..Default::default() };
        ReadAllArgs::try_from(request).expect("valid").from
    };
    assert_eq!(from(Kind::Start(v1::Empty {})), 0);
    assert_eq!(from(Kind::End(v1::Empty {})), u64::MAX);
    assert_eq!(from(Kind::Position(17)), 17);
}

#[test]
fn exists_or_write_keeps_the_origin_timestamp() {
    let request = |origin_timestamp_ms| v1::ExistsOrWriteRequest {
        stream: "orders.o-1".into(),
        index: 4,
        event: Some(wire_event(16, "t")),
        origin_timestamp_ms,
    };
    assert_eq!(ExistsOrWriteArgs::from_wire(request(None), 99).expect("valid").event.timestamp_ms, 99);
    assert_eq!(ExistsOrWriteArgs::from_wire(request(Some(5)), 99).expect("valid").event.timestamp_ms, 5);
}

/// Just enough of `google.protobuf.FileDescriptorSet` to read names back,
/// without a descriptor library among the dependencies.
#[derive(Clone, PartialEq, Message)]
struct DescriptorSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<FileDescriptor>,
}

#[derive(Clone, PartialEq, Message)]
struct FileDescriptor {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptor>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceDescriptor {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

#[test]
fn the_descriptor_set_describes_the_service() {
    let set = DescriptorSet::decode(v1::FILE_DESCRIPTOR_SET).expect("a FileDescriptorSet");
    let files: Vec<_> = set.file.iter().map(|f| f.name.as_deref().unwrap_or("")).collect();
    assert_eq!(
        files,
        ["edgebus/v1/edgebus.proto", "edgebus/v1/groups.proto", "edgebus/v1/wan.proto", "edgebus/v1/site.proto"],
        "no other imports"
    );
    assert!(set.file.iter().all(|f| f.package.as_deref() == Some("edgebus.v1")));
    let services: Vec<_> = set.file.iter().flat_map(|f| f.service.iter().filter_map(|s| s.name.as_deref())).collect();
    assert_eq!(services, ["EventStore", "ConsumerGroups", "Wan", "Site"]);
}

// ---- round trips -----------------------------------------------------------

/// Encodes `message` to protobuf bytes and decodes it back, as the wire does.
fn wire<M: Message + Default>(message: &M) -> M {
    M::decode(message.encode_to_vec().as_slice()).expect("decodes")
}

fn stream_name() -> impl Strategy<Value = StreamName> {
    "[a-z][a-z0-9_:@-]{0,8}(\\.[A-Za-z0-9_:@-]{1,8}){0,3}".prop_map(|text| name(&text))
}

fn system_or_client_stream() -> impl Strategy<Value = StreamName> {
    (any::<bool>(), stream_name()).prop_map(|(system, stream)| {
        if system { StreamName::system(&format!("$sys.{stream}")).expect("valid system name") } else { stream }
    })
}

fn stream_pattern() -> impl Strategy<Value = StreamPattern> {
    (prop::collection::vec(prop_oneof!["[a-z0-9]{1,6}", Just("*".to_owned())], 1..4), any::<bool>()).prop_map(
        |(mut tokens, tail)| {
            if tail {
                tokens.push(">".to_owned());
            }
            StreamPattern::new(&tokens.join(".")).expect("valid pattern")
        },
    )
}

fn event_type_strategy() -> impl Strategy<Value = EventType> {
    "[!-~]{1,24}".prop_map(|text| event_type(&text))
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn new_event_strategy() -> impl Strategy<Value = NewEvent> {
    (any::<u128>(), event_type_strategy(), bytes(64), bytes(16), any::<u64>()).prop_map(
        |(id, event_type, data, metadata, timestamp_ms)| NewEvent {
            id: EventId::from_u128(id),
            event_type,
            data,
            metadata,
            timestamp_ms,
        },
    )
}

fn recorded_event_strategy() -> impl Strategy<Value = RecordedEvent> {
    (system_or_client_stream(), any::<u64>(), any::<u64>(), new_event_strategy())
        .prop_map(|(stream, version, position, event)| RecordedEvent::new(stream, version, position, event))
}

fn expected_version_strategy() -> impl Strategy<Value = ExpectedVersion> {
    prop_oneof![
        Just(ExpectedVersion::Any),
        Just(ExpectedVersion::NoStream),
        Just(ExpectedVersion::StreamExists),
        any::<u64>().prop_map(ExpectedVersion::Exact),
    ]
}

fn stream_from_strategy() -> impl Strategy<Value = StreamFrom> {
    prop_oneof![Just(StreamFrom::Start), Just(StreamFrom::End), any::<u64>().prop_map(StreamFrom::Version)]
}

fn direction_strategy() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Forward), Just(Direction::Backward)]
}

fn metadata_strategy() -> impl Strategy<Value = StreamMetadata> {
    (any::<Option<u64>>(), any::<Option<u64>>(), any::<Option<u64>>())
        .prop_map(|(max_age_ms, max_count, truncate_before)| StreamMetadata { max_age_ms, max_count, truncate_before })
}

fn stream_info_strategy() -> impl Strategy<Value = StreamInfo> {
    (system_or_client_stream(), any::<Option<u64>>(), any::<u64>(), any::<bool>(), any::<bool>(), metadata_strategy())
        .prop_map(|(stream, current_version, first_visible_version, deleted, tombstoned, metadata)| StreamInfo {
            stream,
            current_version,
            first_visible_version,
            deleted,
            tombstoned,
            metadata,
        })
}

fn all_filter_strategy() -> impl Strategy<Value = AllFilter> {
    (proptest::option::of(stream_pattern()), prop::collection::vec(event_type_strategy(), 0..4), any::<bool>())
        .prop_map(|(stream, event_types, include_system)| AllFilter { stream, event_types, include_system })
}

fn assert_same_filter(left: &AllFilter, right: &AllFilter) {
    assert_eq!(left.stream, right.stream);
    assert_eq!(left.event_types, right.event_types);
    assert_eq!(left.include_system, right.include_system);
}

fn subscribe_start_strategy() -> impl Strategy<Value = SubscribeStart> {
    let streams = prop_oneof![
        Just(StreamSelector::All),
        system_or_client_stream().prop_map(StreamSelector::Stream),
        stream_pattern().prop_map(StreamSelector::Pattern),
    ];
    (
        streams,
        prop::collection::vec(event_type_strategy(), 0..4),
        proptest::option::of("[ -~]{1,40}"),
        any::<bool>(),
        0..4_u8,
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(streams, event_types, predicate, include_system, from_kind, at, initial_grant_events)| {
            let from = match from_kind {
                0 => SubscribeFrom::Beginning,
                1 => SubscribeFrom::End,
                2 => SubscribeFrom::Position(at),
                _ if matches!(streams, StreamSelector::Stream(_)) => SubscribeFrom::StreamVersion(at),
                _ => SubscribeFrom::Position(at),
            };
            SubscribeStart {
                filter: SubscriptionFilter { streams, event_types, predicate, include_system },
                from,
                initial_grant_events,
            }
        })
}

proptest! {
    #[test]
    fn recorded_events_round_trip(event in recorded_event_strategy()) {
        let back = RecordedEvent::try_from(wire(&v1::RecordedEvent::from(event.clone())));
        prop_assert_eq!(back, Ok(event));
    }

    #[test]
    fn appends_round_trip(
        stream in stream_name(),
        expected in expected_version_strategy(),
        events in prop::collection::vec(new_event_strategy(), 1..5),
        timestamp_ms in any::<u64>(),
    ) {
        // The node stamps events on arrival: the wire carries no timestamp.
        let events: Vec<NewEvent> = events.into_iter().map(|e| NewEvent { timestamp_ms, ..e }).collect();
        let args = AppendArgs { stream, expected, events };
        let back = AppendArgs::from_wire(wire(&v1::AppendRequest::from(args.clone())), timestamp_ms);
        prop_assert_eq!(back, Ok(args));
    }

    #[test]
    fn exists_or_write_round_trips(stream in stream_name(), index in any::<u64>(), event in new_event_strategy()) {
        let args = ExistsOrWriteArgs { stream, index, event };
        let back = ExistsOrWriteArgs::from_wire(wire(&v1::ExistsOrWriteRequest::from(args.clone())), 0);
        prop_assert_eq!(back, Ok(args));
    }

    #[test]
    fn write_results_round_trip(
        first_version in any::<u64>(),
        first_position in any::<u64>(),
        count in any::<u32>(),
        already_written in any::<bool>(),
        same in any::<bool>(),
    ) {
        let result = AppendResult { first_version, first_position, count, already_written };
        prop_assert_eq!(AppendResult::from(wire(&v1::AppendResponse::from(result))), result);
        for outcome in [ExistsOrWrite::Written { position: first_position }, ExistsOrWrite::Exists { position: first_position, same }] {
            prop_assert_eq!(ExistsOrWrite::try_from(wire(&v1::ExistsOrWriteResponse::from(outcome))), Ok(outcome));
        }
    }

    #[test]
    fn stream_reads_round_trip(
        stream in system_or_client_stream(),
        from in stream_from_strategy(),
        direction in direction_strategy(),
        max_count in 1..=READ_COUNT_MAX,
        events in prop::collection::vec(recorded_event_strategy(), 0..4),
    ) {
        let args = ReadStreamArgs { stream, from, direction, max_count };
        prop_assert_eq!(ReadStreamArgs::try_from(wire(&v1::ReadStreamRequest::from(args.clone()))), Ok(args));
        prop_assert_eq!(read_stream_events(wire(&v1::ReadStreamResponse::from(events.clone()))), Ok(events));
    }

    #[test]
    fn all_reads_round_trip(
        from in any::<u64>(),
        direction in direction_strategy(),
        max_count in 1..=READ_COUNT_MAX,
        filter in all_filter_strategy(),
        events in prop::collection::vec(recorded_event_strategy(), 0..4),
        next_position in any::<Option<u64>>(),
        end_of_log in any::<bool>(),
    ) {
        let args = ReadAllArgs { from, direction, max_count, filter };
        let back = ReadAllArgs::try_from(wire(&v1::ReadAllRequest::from(args.clone()))).expect("valid");
        prop_assert_eq!((back.from, back.direction, back.max_count), (args.from, args.direction, args.max_count));
        assert_same_filter(&back.filter, &args.filter);

        let slice = AllSlice { events: events.clone(), next_position, end_of_log };
        let back = AllSlice::try_from(wire(&v1::ReadAllResponse::from(slice))).expect("valid");
        prop_assert_eq!((back.events, back.next_position, back.end_of_log), (events, next_position, end_of_log));
    }

    #[test]
    fn stream_states_round_trip(
        infos in prop::collection::vec(stream_info_strategy(), 0..4),
        expected in expected_version_strategy(),
        hard in any::<bool>(),
        metadata in metadata_strategy(),
        after in proptest::option::of("[ -~]{0,12}"),
        limit in 1..=READ_COUNT_MAX,
        include_system in any::<bool>(),
    ) {
        let first = infos.first().cloned();
        prop_assert_eq!(stream_info(wire(&v1::StreamInfoResponse::from(first.clone()))), Ok(first));
        prop_assert_eq!(list_streams(wire(&v1::ListStreamsResponse::from(infos.clone()))), Ok(infos.clone()));
        let stream = infos.first().map_or_else(|| name("a"), |i| i.stream.clone());
        let info_args = StreamInfoArgs { stream: stream.clone() };
        prop_assert_eq!(StreamInfoArgs::try_from(wire(&v1::StreamInfoRequest::from(info_args.clone()))), Ok(info_args));

        let client = name("orders.o-1");
        let delete = DeleteStreamArgs { stream: client.clone(), expected, hard };
        prop_assert_eq!(DeleteStreamArgs::try_from(wire(&v1::DeleteStreamRequest::from(delete.clone()))), Ok(delete));
        let set = SetStreamMetadataArgs { stream: client, metadata };
        prop_assert_eq!(SetStreamMetadataArgs::try_from(wire(&v1::SetStreamMetadataRequest::from(set.clone()))), Ok(set));
        let list = ListStreamsArgs { after, limit, include_system };
        prop_assert_eq!(ListStreamsArgs::from(wire(&v1::ListStreamsRequest::from(list.clone()))), list);
    }

    #[test]
    fn snapshots_round_trip(
        source in "[a-z]{1,8}",
        stream in stream_name(),
        version in any::<u64>(),
        at_or_below in any::<Option<u64>>(),
        state in bytes(64),
        position in any::<u64>(),
        timestamp_ms in any::<u64>(),
        pattern in proptest::option::of(stream_pattern()),
        limit in 1..=READ_COUNT_MAX,
    ) {
        let record = RecordSnapshotArgs { source: source.clone(), stream: stream.clone(), version, state: state.clone() };
        prop_assert_eq!(RecordSnapshotArgs::try_from(wire(&v1::RecordSnapshotRequest::from(record.clone()))), Ok(record));
        let read = ReadSnapshotArgs { source: source.clone(), stream: stream.clone(), at_or_below };
        prop_assert_eq!(ReadSnapshotArgs::try_from(wire(&v1::ReadSnapshotRequest::from(read.clone()))), Ok(read));
        let delete = DeleteSnapshotArgs { source: source.clone(), stream: stream.clone(), version };
        prop_assert_eq!(DeleteSnapshotArgs::try_from(wire(&v1::DeleteSnapshotRequest::from(delete.clone()))), Ok(delete));
        let list = ListSnapshotsArgs { source: Some(source.clone()), stream: pattern, limit };
        prop_assert_eq!(ListSnapshotsArgs::try_from(wire(&v1::ListSnapshotsRequest::from(list.clone()))), Ok(list));

        let snapshot = Snapshot { source: source.clone(), stream: stream.clone(), version, state, position, timestamp_ms };
        prop_assert_eq!(Snapshot::try_from(wire(&v1::ReadSnapshotResponse::from(snapshot.clone()))), Ok(snapshot));
        let info = SnapshotInfo { source, stream: stream.as_str().to_owned(), version, position };
        let listed = wire(&v1::ListSnapshotsResponse::from(vec![info.clone()]));
        prop_assert_eq!(listed.snapshots.into_iter().map(SnapshotInfo::from).collect::<Vec<_>>(), vec![info]);
    }

    #[test]
    fn subscription_messages_round_trip(
        start in subscribe_start_strategy(),
        grant_events in any::<u64>(),
        event in recorded_event_strategy(),
        position in any::<u64>(),
    ) {
        for message in [ClientMessage::Start(start), ClientMessage::Credit { grant_events }] {
            prop_assert_eq!(ClientMessage::try_from(wire(&v1::SubscribeRequest::from(message.clone()))), Ok(message));
        }
        let error = error_detail_from_write_error(&WriteError::Busy);
        for message in [
            ServerMessage::Event(event),
            ServerMessage::CaughtUp { position },
            ServerMessage::Checkpoint { position },
            ServerMessage::Error(error),
        ] {
            prop_assert_eq!(ServerMessage::try_from(wire(&v1::SubscribeResponse::from(message.clone()))), Ok(message));
        }
    }

    #[test]
    fn wrong_expected_version_round_trips_through_a_status(
        stream in stream_name(),
        expected in expected_version_strategy(),
        current in any::<Option<u64>>(),
    ) {
        let source = WrongExpectedVersion { expected, current };
        let error = WriteError::WrongExpectedVersion { stream, source };
        let detail = detail_over_the_wire(&status_from_write_error(&error));
        prop_assert_eq!(detail.code, wire_error_code(ErrorCode::WrongExpectedVersion));
        prop_assert_eq!(detail.wrong_expected_version(), Some(source));
    }
}

#[test]
fn subscription_filter_gives_the_store_filter() {
    let filter = SubscriptionFilter {
        streams: StreamSelector::Stream(name("orders.o-1")),
        event_types: vec![event_type("OrderPlaced")],
        predicate: Some("data.total > 10".into()),
        include_system: false,
    };
    let all = filter.all_filter();
    assert_eq!(all.stream.as_ref().map(StreamPattern::as_str), Some("orders.o-1"));
    assert!(all.stream.as_ref().is_some_and(StreamPattern::is_literal));
    assert_eq!(all.event_types, vec![event_type("OrderPlaced")]);
    let every = SubscriptionFilter { streams: StreamSelector::All, ..filter };
    assert!(every.all_filter().stream.is_none());
}

// ---- the Site service ------------------------------------------------------

#[test]
fn replica_writes_round_trip_with_the_origin_and_its_timestamp() {
    use edgebus_store::ReplicaWrite;
    use edgebus_types::{Origin, SiteName};
    let site = |name: &str| SiteName::new(name).expect("a site name");
    let write = |version: Option<u64>, note: &str| ReplicaWrite {
        stream: name("orders.eu.1"),
        version,
        event: NewEvent {
            id: EventId::from_u128(7),
            event_type: event_type("OrderPlaced"),
            data: b"{}".to_vec(),
            metadata: b"m".to_vec(),
            timestamp_ms: 1_700_000_000_123,
        },
        origin: Origin { site: site("eu"), position: 42, via: site("asia"), note: note.to_owned() },
    };
    for original in [write(Some(3), ""), write(None, "sampled 1/10")] {
        let back = replica_writes(vec![wire(&v1::ReplicaWrite::from(original.clone()))]).expect("converts");
        let [back] = <[ReplicaWrite; 1]>::try_from(back).expect("one write");
        assert_eq!((&back.stream, back.version, &back.event), (&original.stream, original.version, &original.event));
        assert_eq!(back.origin, original.origin);
    }
    let mut bad = v1::ReplicaWrite::from(write(Some(0), ""));
    bad.origin.as_mut().expect("an origin").via = "EU".to_owned();
    let good = v1::ReplicaWrite::from(write(Some(0), ""));
    let error = replica_writes(vec![good.clone(), bad]).expect_err("a bad site name");
    assert_eq!(error.field(), "writes[1].origin.via");
    let error = replica_writes(vec![v1::ReplicaWrite { event: None, ..good }]).expect_err("no event");
    assert_eq!(error.field(), "writes[0].event");
}

#[test]
fn site_appends_take_system_streams_and_read_log_clamps_to_the_node_maximums() {
    use edgebus_types::limits::{SITE_READ_LOG_BYTES_MAX, SITE_READ_LOG_RECORDS_MAX};
    let args = SiteAppendArgs {
        stream: StreamName::system("$gateway.lease").expect("a system stream"),
        expected: ExpectedVersion::Exact(4),
        events: vec![NewEvent {
            id: EventId::from_u128(1),
            event_type: event_type("$lease"),
            data: b"{}".to_vec(),
            metadata: Vec::new(),
            timestamp_ms: 9,
        }],
    };
    let back = SiteAppendArgs::from_wire(wire(&v1::SiteAppendRequest::from(args.clone())), 9).expect("converts");
    assert_eq!(back, args);
    let missing = v1::SiteAppendRequest { expected_version: None, ..v1::SiteAppendRequest::from(args) };
    assert_eq!(SiteAppendArgs::from_wire(missing, 0).expect_err("no expectation").field(), "expected_version");
    let read = |max_records, max_bytes| ReadLogArgs::from(v1::ReadLogRequest { from: 5, max_records, max_bytes });
    assert_eq!(
        read(0, 0),
        ReadLogArgs { from: 5, max_records: SITE_READ_LOG_RECORDS_MAX, max_bytes: SITE_READ_LOG_BYTES_MAX }
    );
    assert_eq!(read(10, 100), ReadLogArgs { from: 5, max_records: 10, max_bytes: 100 });
    assert_eq!(read(u32::MAX, u64::MAX), read(0, 0));
}
