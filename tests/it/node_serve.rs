//! `edgebus serve` end to end: it starts on 127.0.0.1:0, says where it
//! listens, serves gRPC and HTTP, drains on SIGTERM, and loses nothing
//! acknowledged across a restart.

use std::net::SocketAddr;

use edgebus_proto::convert::{self, AppendArgs, ReadStreamArgs};
use edgebus_proto::v1::event_store_client::EventStoreClient;
use edgebus_store::{Direction, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};

use crate::node::{Node, http_get};

/// A raw gRPC client of the node at `addr` (shared with `node_append_stream`).
pub(crate) async fn connect(addr: SocketAddr) -> EventStoreClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("connect to the node");
    EventStoreClient::new(channel)
}

/// A `Noted` event (shared with `node_append_stream`).
pub(crate) fn event(id: u128, data: &str) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("Noted").unwrap(),
        data: data.as_bytes().to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

#[test]
fn serve_answers_grpc_and_http_drains_on_sigterm_and_keeps_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let stream = StreamName::new("notes.n-1").unwrap();
    // Each phase has its own runtime, dropped before the node is stopped, so
    // the client's connection closes as a real client's would.
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let node = Node::start(&data_dir);
    assert!(http_get(node.http, "/healthz").starts_with("HTTP/1.1 200"), "healthz");
    runtime().block_on(async {
        let mut client = connect(node.grpc).await;
        let append = AppendArgs {
            stream: stream.clone(),
            expected: ExpectedVersion::NoStream,
            events: vec![event(1, "a"), event(2, "b"), event(3, "c")],
        };
        let result = client.append(edgebus_proto::v1::AppendRequest::from(append)).await.expect("append").into_inner();
        assert_eq!((result.first_version, result.count), (0, 3));

        // A conflict carries the stable code and the versions.
        let conflict =
            AppendArgs { stream: stream.clone(), expected: ExpectedVersion::NoStream, events: vec![event(4, "d")] };
        let status = client.append(edgebus_proto::v1::AppendRequest::from(conflict)).await.unwrap_err();
        let detail = convert::error_detail_from_status(&status).expect("error detail in the status");
        assert_eq!(detail.code, 1, "WrongExpectedVersion: {status:?}");
        assert_eq!(detail.current, Some(2), "{detail:?}");

        // A bad name is refused naming the field.
        let mut bad = edgebus_proto::v1::AppendRequest::from(AppendArgs {
            stream: stream.clone(),
            expected: ExpectedVersion::Any,
            events: vec![event(5, "e")],
        });
        bad.stream = "bad name".to_owned();
        let status = client.append(bad).await.unwrap_err();
        assert!(status.message().contains("stream"), "{status:?}");
    });
    node.stop();

    // Restart on the same data: everything acknowledged is there.
    let node = Node::start(&data_dir);
    runtime().block_on(async {
        let mut client = connect(node.grpc).await;
        let read = ReadStreamArgs {
            stream: stream.clone(),
            from: StreamFrom::Start,
            direction: Direction::Forward,
            max_count: 100,
        };
        let response =
            client.read_stream(edgebus_proto::v1::ReadStreamRequest::from(read)).await.expect("read").into_inner();
        let events = convert::read_stream_events(response).expect("valid events");
        let data: Vec<&[u8]> = events.iter().map(|e| e.data.as_slice()).collect();
        assert_eq!(data, [b"a".as_slice(), b"b", b"c"]);
        assert!(events.iter().all(|e| e.timestamp_ms > 0), "the node stamps time");
    });
    node.stop();
}

/// The signal handlers are in place before the ready line: SIGTERM sent the
/// moment it is read drains and exits 0, rather than killing the node by
/// the signal's default action. Repeated, since the race is narrow.
#[test]
fn sigterm_right_after_the_ready_line_drains_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let args = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir", data_dir];
    for _ in 0..10 {
        let (node, _ready) = Node::start_with(&args, &[]);
        // The kernel already knows the node catches both signals.
        let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).expect("the node's status");
        let caught = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .expect("a SigCgt line");
        let bit = |signal: u32| 1u64 << (signal - 1);
        assert_eq!(caught & bit(15), bit(15), "SIGTERM is caught once ready: {caught:#x}");
        assert_eq!(caught & bit(2), bit(2), "SIGINT is caught once ready: {caught:#x}");
        // SIGTERM at once, then a bounded wait for exit status 0.
        node.stop();
    }
}
