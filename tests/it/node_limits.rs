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
    // connection instead (UNAVAILABLE, or CANCELLED when hyper saw the
    // connection close under its request).
    match refused.code() {
        tonic::Code::ResourceExhausted => {
            assert!(format!("{refused:?}").contains("the node serves at most 4"), "{refused:?}");
        }
        tonic::Code::Unavailable => {}
        tonic::Code::Cancelled if format!("{refused:?}").contains("connection closed") => {}
        _ => panic!("expected RESOURCE_EXHAUSTED or UNAVAILABLE, got {refused:?}"),
    }

    drop(idle.remove(0));
    until_admitted(|| call(node.grpc).ok());
    // Dropping the runtime closes the client's connections.
    drop(runtime);
    drop(idle);
    node.stop();
}

/// Reads lines from `reader` until one contains `needle`; fails the test on
/// end of stream, an error or [`crate::node::NODE_DEADLINE`] (the socket's
/// read timeout).
fn read_until_line_with(reader: &mut impl std::io::BufRead, needle: &str) {
    let mut seen = String::new();
    for _ in 0..10_000 {
        let mut line = String::new();
        let read = reader.read_line(&mut line).unwrap_or_else(|e| panic!("no {needle:?} before {e}: {seen}"));
        assert!(read > 0, "the stream ended before {needle:?}: {seen}");
        if line.contains(needle) {
            return;
        }
        seen.push_str(&line);
    }
    panic!("no {needle:?} in 10000 lines: {seen}");
}

#[test]
fn an_idle_http_connection_is_closed_after_the_idle_timeout_but_a_subscription_is_not() {
    const IDLE_TIMEOUT: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let timeout_ms = IDLE_TIMEOUT.as_millis().to_string();
    let args = [
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--http-idle-timeout-ms",
        &timeout_ms,
    ];
    let node = Node::start_with(&args, &[]).0;

    // A subscription, open before the idle connection and served after it
    // was closed: a request being served is never idle.
    let mut sse = TcpStream::connect(node.http).expect("connect");
    sse.set_read_timeout(Some(crate::node::NODE_DEADLINE)).unwrap();
    write!(sse, "GET /v1/subscribe?stream=idle.s&from=start HTTP/1.1\r\nHost: edgebus\r\n\r\n").unwrap();
    let mut sse = std::io::BufReader::new(sse);
    read_until_line_with(&mut sse, "caught_up");

    // A connection that sends nothing: the node closes it (end of stream, or
    // a reset), and not before the timeout.
    let opened = Instant::now();
    let mut idle = TcpStream::connect(node.http).expect("connect");
    idle.set_read_timeout(Some(crate::node::NODE_DEADLINE)).unwrap();
    let mut received = Vec::new();
    match idle.read_to_end(&mut received) {
        Ok(_) => {}
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "closed, not timed out: {error}"),
    }
    assert!(opened.elapsed() >= IDLE_TIMEOUT, "closed after {:?}, before the timeout", opened.elapsed());
    let received = String::from_utf8_lossy(&received);
    assert!(received.is_empty() || received.starts_with("HTTP/1.1 408"), "{received}");

    // So is a kept-alive connection that sends nothing after its first request.
    let mut kept = TcpStream::connect(node.http).expect("connect");
    kept.set_read_timeout(Some(crate::node::NODE_DEADLINE)).unwrap();
    write!(kept, "GET /healthz HTTP/1.1\r\nHost: edgebus\r\n\r\n").unwrap();
    let mut kept = std::io::BufReader::new(kept);
    read_until_line_with(&mut kept, "ok");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut kept, &mut rest);

    let published = http_request(node.http, "POST", "/v1/streams/idle.s", &[], br#"{"type": "T", "data": "after"}"#);
    assert_eq!(published.status, 201, "{published:?}");
    read_until_line_with(&mut sse, "after");
    drop(sse);
    node.stop();
}

#[test]
fn refused_connections_are_counted_per_transport_in_metrics_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir.path().join("data"));
    let mut idle_http = idle_connections(node.http);
    let idle_grpc = idle_connections(node.grpc);

    // Two HTTP refusals, one gRPC refusal (its GOAWAY, read to the close).
    assert_refusal(&http_request(node.http, "GET", "/healthz", &[], b""));
    assert_refusal(&http_request(node.http, "GET", "/metrics", &[], b""));
    let mut refused = TcpStream::connect(node.grpc).expect("connect");
    refused.set_read_timeout(Some(crate::node::NODE_DEADLINE)).unwrap();
    let mut goaway = Vec::new();
    let _ = refused.read_to_end(&mut goaway);
    assert!(goaway.len() > 18, "a SETTINGS and a GOAWAY frame: {goaway:?}");

    // One HTTP slot freed; refusals seen while the node notices count too.
    drop(idle_http.remove(0));
    let mut http_refused = 2;
    let mut scrape = |path: &str| {
        until_admitted(|| {
            let response = http_request(node.http, "GET", path, &[], b"");
            if response.status == 503 {
                http_refused += 1;
                return None;
            }
            Some(response)
        })
    };
    let metrics = scrape("/metrics");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let value = |series: &str| {
        metrics.body.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse::<f64>().ok())
    };
    assert_eq!(value(r#"edgebus_connections_rejected_total{transport="grpc"}"#), Some(1.0), "{}", metrics.body);
    // Open now: the idle ones, and for HTTP the scrape itself.
    assert_eq!(value(r#"edgebus_connections_open{transport="grpc"}"#), Some(4.0), "{}", metrics.body);
    assert_eq!(value(r#"edgebus_connections_open{transport="http"}"#), Some(4.0), "{}", metrics.body);
    assert_eq!(value(r#"edgebus_connections_max{transport="http"}"#), Some(4.0), "{}", metrics.body);
    let stats = scrape("/v1/stats");
    let http_rejected = value(r#"edgebus_connections_rejected_total{transport="http"}"#);
    let stats: Value = serde_json::from_str(&stats.body).expect("JSON stats");
    let connections = &stats["connections"];
    assert_eq!(connections["grpc"]["rejected"], 1, "{stats}");
    assert_eq!(connections["grpc"]["max"], 4, "{stats}");
    assert_eq!(connections["http"]["rejected"], http_refused, "{stats}");
    assert!(http_rejected.is_some_and(|rejected| rejected >= 2.0 && rejected <= f64::from(http_refused)));
    drop((idle_http, idle_grpc));
    node.stop();
}
