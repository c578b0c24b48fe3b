//! `edgebus publish`, `read` and `streams` against a real node: the data of
//! `key=value` pairs round-trips typed, a failed expectation exits 1 naming
//! the stable code, and the listing shows the stream.

use std::process::{Command, Output, Stdio};

use crate::node::Node;

/// The `--server` URI of a node's gRPC API.
fn server(node: &Node) -> String {
    format!("http://{}", node.grpc)
}

/// Runs the `edgebus` binary with `args`; the environment's server is ignored.
fn edgebus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgebus-node"))
        .args(args)
        .env_remove("EDGEBUS_SERVER")
        .stdin(Stdio::null())
        .output()
        .expect("run edgebus")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn publish_read_and_streams_round_trip_through_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let server = server(&node);

    let published = edgebus(&["publish", "--server", &server, "s.one", "temp=71", "site=eu"]);
    assert!(published.status.success(), "publish: {}", stderr(&published));
    let line = stdout(&published);
    assert!(line.starts_with("published s.one@0 position="), "{line:?}");

    // JSON lines: the data comes back as the object, typed, at version 0.
    let read = edgebus(&["read", "--server", &server, "s.one", "--json"]);
    assert!(read.status.success(), "read: {}", stderr(&read));
    let text = stdout(&read);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text:?}");
    let event = lines[0];
    assert!(event.contains(r#""stream":"s.one""#), "{event}");
    assert!(event.contains(r#""version":0,"#) || event.contains(r#""version":0}"#), "{event}");
    assert!(event.contains(r#""type":"Event""#), "{event}");
    let data = event.split_once(r#""data":"#).expect("a data field").1;
    let data = &data[..=data.find('}').expect("an object")];
    let mut fields: Vec<&str> = data.trim_matches(['{', '}']).split(',').collect();
    fields.sort_unstable();
    assert_eq!(fields, [r#""site":"eu""#, r#""temp":71"#], "{event}");

    // Aligned text: version, position, type, compact data.
    let read = edgebus(&["read", "--server", &server, "s.one"]);
    assert!(read.status.success(), "read: {}", stderr(&read));
    let text = stdout(&read);
    let columns: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(columns.len(), 4, "{text:?}");
    assert_eq!((columns[0], columns[2]), ("0", "Event"), "{text:?}");

    // A failed expectation is exit 1 with the message and the stable code.
    let conflict = edgebus(&["publish", "--server", &server, "--expected-version", "no_stream", "s.one", "temp=72"]);
    assert_eq!(conflict.status.code(), Some(1), "{conflict:?}");
    let message = stderr(&conflict);
    assert!(message.starts_with("error: "), "{message}");
    assert!(message.contains("wrong expected version"), "{message}");
    assert!(message.contains("code 1"), "{message}");
    assert!(message.contains("WRONG_EXPECTED_VERSION"), "{message}");

    let streams = edgebus(&["streams", "--server", &server]);
    assert!(streams.status.success(), "streams: {}", stderr(&streams));
    let text = stdout(&streams);
    let listed: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(listed, [vec!["s.one", "0"]], "{text:?}");

    node.stop();
}

#[test]
fn a_node_that_is_not_there_is_exit_1_naming_the_address() {
    // Bind then drop a listener: the port is very likely closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("http://127.0.0.1:{port}");
    let output = edgebus(&["streams", "--server", &server]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let message = stderr(&output);
    assert!(message.contains(&server), "{message}");
    assert!(message.contains("edgebus serve"), "{message}");
}
