//! A node started with `--max-connections 4`: a fifth concurrent
//! connection is refused at once and clearly (HTTP: 503 with JSON code 103;
//! gRPC: a GOAWAY, so the call fails), the four already open keep being
//! served, and closing one lets a new client in.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edgebus_proto::v1::event_store_client::EventStoreClient;
use serde_json::Value;

use crate::node::{HttpResponse, Node, http_request};

const MAX_CONNECTIONS: usize = 4;
/// How long a freed slot may take to be seen by the node.
const SLOT_DEADLINE: Duration = Duration::from_secs(10);

fn start_node(data_dir: &std::path::Path) -> Node {
    let data_dir = data_dir.to_str().expect("a UTF-8 temporary path");
    let max = MAX_CONNECTIONS.to_string();
    let args = [
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
        "--max-connections",
        &max,
    ];
    Node::start_with(&args, &[]).0
}

fn idle_connections(addr: SocketAddr) -> Vec<TcpStream> {
    (0..MAX_CONNECTIONS).map(|_| TcpStream::connect(addr).expect("connect")).collect()
}

/// Retries `attempt` until it answers `Some`, within [`SLOT_DEADLINE`] and
/// a bounded number of tries: the node sees a closed connection a moment
/// after the client closed it.
fn until_admitted<T>(mut attempt: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    for _ in 0..1000 {
        if let Some(done) = attempt() {
            return done;
        }
        assert!(started.elapsed() < SLOT_DEADLINE, "a freed slot was not seen within {SLOT_DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("a freed slot was not seen after 1000 tries");
}

fn assert_refusal(response: &HttpResponse) {
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"), "{response:?}");
    let body: Value = serde_json::from_str(&response.body).expect("a JSON body");
    assert_eq!(body["code"], 103, "RESOURCE_EXHAUSTED: {body}");
    assert_eq!(body["message"], format!("too many connections: the node serves at most {MAX_CONNECTIONS}"));
}

#[test]
fn http_connections_over_the_cap_get_a_503_and_the_others_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir.path().join("data"));
    let mut idle = idle_connections(node.http);

    // The fifth connection: refused at once, in JSON, and more after it.
    assert_refusal(&http_request(node.http, "GET", "/healthz", &[], b""));
    assert_refusal(&http_request(node.http, "POST", "/v1/streams/orders.o-1", &[], br#"{"type": "T", "data": 1}"#));

    // An open connection is still served (and closes, freeing its slot).
    let mut first = idle.remove(0);
    first.set_read_timeout(Some(crate::node::NODE_DEADLINE)).unwrap();
    write!(first, "GET /healthz HTTP/1.1\r\nHost: edgebus\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    first.read_to_string(&mut response).expect("read the response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // A new client is admitted once the node has seen the close.
    let published = until_admitted(|| {
        let response = http_request(node.http, "POST", "/v1/streams/orders.o-1", &[], br#"{"type": "T", "data": 1}"#);
        (response.status != 503).then_some(response)
    });
    assert_eq!(published.status, 201, "{published:?}");
    drop(first);
    drop(idle);
    node.stop();
}

#[test]
fn grpc_connections_over_the_cap_fail_their_calls_and_a_closed_one_lets_a_new_client_in() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir.path().join("data"));
    let mut idle = idle_connections(node.grpc);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let call = |addr: SocketAddr| {
        runtime.block_on(async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .expect("a valid URI")
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
            let request = edgebus_proto::v1::ListStreamsRequest { limit: 10, ..Default::default() };
            EventStoreClient::new(channel).list_streams(request).await.map(|_| ())
        })
    };

    let refused = call(node.grpc).expect_err("the fifth connection is refused");
    // The GOAWAY's code maps to RESOURCE_EXHAUSTED and carries the message
    // as debug data; a client that lost the race to it may see a failed
    // connection instead.
    match refused.code() {
        tonic::Code::ResourceExhausted => {
            assert!(format!("{refused:?}").contains("the node serves at most 4"), "{refused:?}");
        }
        tonic::Code::Unavailable => {}
        _ => panic!("expected RESOURCE_EXHAUSTED or UNAVAILABLE, got {refused:?}"),
    }

    drop(idle.remove(0));
    until_admitted(|| call(node.grpc).ok());
    // Dropping the runtime closes the client's connections.
    drop(runtime);
    drop(idle);
    node.stop();
}
