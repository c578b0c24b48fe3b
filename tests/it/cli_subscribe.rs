//! `edgebus subscribe` against a real node: catch-up as NDJSON and as
//! aligned lines, a `--where` filter, a live event reaching a subscriber
//! that waited for its caught-up line, the exits (after `--count`, on
//! SIGTERM or SIGINT, when the node stops, when stdout is closed with no
//! line left to write) and the refusals of a predicate that does not
//! compile and of a bad stream name or pattern.

use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::node::Node;

/// How long a subscriber may take to print an awaited line or to exit.
const DEADLINE: Duration = Duration::from_secs(60);

/// The `--server` URI of a node's gRPC API.
fn server(node: &Node) -> String {
    format!("http://{}", node.grpc)
}

/// `edgebus ARGS` with the environment's server ignored.
fn edgebus_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgebus-node"));
    command.args(args).env_remove("EDGEBUS_SERVER").stdin(Stdio::null());
    command
}

/// Publishes one event of type `placed` with `fields` as its data.
fn publish(node: &Node, stream: &str, fields: &[&str]) {
    let server = server(node);
    let mut args = vec!["publish", "--server", &server, "--type", "placed", stream];
    args.extend_from_slice(fields);
    let mut publisher = Process::spawn(&args);
    let (status, _, stderr) = publisher.finish();
    assert!(status.success(), "publish {stream}: {stderr}");
}

/// Sends `signal` (e.g. `TERM`) to `pid` through the `kill` command.
fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
}

/// Lines of a pipe, as a reader thread sees them.
fn lines_of(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// A running `edgebus` process whose stdout and stderr lines arrive on
/// channels. One that is still running when dropped (a failed test) is
/// killed, so that none outlives its test.
struct Process {
    pid: u32,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    exited: Receiver<ExitStatus>,
    /// The exit status, once received.
    status: Option<ExitStatus>,
    /// stderr lines taken so far, for failure messages.
    stderr_seen: Vec<String>,
}

impl Process {
    fn spawn(args: &[&str]) -> Self {
        let mut child: Child =
            edgebus_command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start edgebus");
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        Self::watch(child, stdout, stderr)
    }

    fn watch(mut child: Child, stdout: Receiver<String>, stderr: Receiver<String>) -> Self {
        let pid = child.id();
        let (sender, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(child.wait().expect("wait for edgebus"));
        });
        Self { pid, stdout, stderr, exited, status: None, stderr_seen: Vec::new() }
    }

    /// Waits for a stderr line that starts with `prefix`, keeping the ones before it.
    fn await_stderr(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no stderr line {prefix:?} in {DEADLINE:?}: {:?}", self.stderr_seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("edgebus ended without a stderr line {prefix:?}: {:?}", self.stderr_seen)
                }
            }
        }
    }

    /// Waits (bounded) for the exit; answers the status and every line of
    /// stdout and stderr.
    fn finish(&mut self) -> (ExitStatus, Vec<String>, String) {
        let status = match self.exited.recv_timeout(DEADLINE) {
            Ok(status) => status,
            Err(_) => panic!("edgebus still running after {DEADLINE:?}; stderr: {:?}", self.stderr_seen),
        };
        self.status = Some(status);
        // The process is gone, so both pipes are at their end: the reader
        // threads end and the channels disconnect.
        let stdout: Vec<String> = self.stdout.iter().collect();
        self.stderr_seen.extend(self.stderr.iter());
        (status, stdout, self.stderr_seen.join("\n"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() && self.exited.try_recv().is_err() {
            send_signal(self.pid, "KILL");
        }
    }
}

/// Runs `edgebus ARGS` to its end (bounded).
fn run(args: &[&str]) -> (ExitStatus, Vec<String>, String) {
    Process::spawn(args).finish()
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
}

#[test]
fn cli_subscribe_catches_up_as_ndjson_and_aligned_lines_and_filters_with_where() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let server = server(&node);
    for n in 1..=3 {
        publish(&node, "orders.1", &[&format!("n={n}")]);
    }
    publish(&node, "orders.2", &["n=0"]);

    // The stream's three events, each exactly as `read --json` prints it.
    let (status, lines, stderr) =
        run(&["subscribe", "--server", &server, "orders.1", "--from", "start", "--count", "3", "--json"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    let events: Vec<Value> = lines.iter().map(|line| json(line)).collect();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["stream"], "orders.1", "{event}");
        assert_eq!(event["version"], i, "{event}");
        assert_eq!(event["type"], "placed", "{event}");
        assert_eq!(event["data"], serde_json::json!({ "n": i + 1 }), "{event}");
    }
    let (status, read, stderr) = run(&["read", "--server", &server, "orders.1", "--json"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(read, lines, "subscribe --json prints the events as read --json does");

    // Over a pattern, the predicate keeps n > 1 only, in log order; the
    // markers come on lines of their own.
    let (status, lines, stderr) = run(&[
        "subscribe",
        "--server",
        &server,
        "--pattern",
        "orders.*",
        "--from",
        "start",
        "--where",
        "data.n > 1",
        "--count",
        "2",
        "--json",
    ]);
    assert!(status.success(), "{stderr}");
    let events: Vec<Value> = lines.iter().map(|line| json(line)).filter(|v| v.get("position").is_some()).collect();
    let ns: Vec<&Value> = events.iter().map(|event| &event["data"]["n"]).collect();
    assert_eq!(ns, [2, 3], "{lines:?}");
    for line in &lines {
        let value = json(line);
        assert!(value.get("position").is_some() || value.get("checkpoint").is_some(), "{line}");
    }

    // For people: position, stream@version, type, compact data, aligned.
    let (status, lines, stderr) =
        run(&["subscribe", "--server", &server, "orders.1", "--from", "start", "--count", "3"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(columns[1..], [&format!("orders.1@{i}"), "placed", &format!("{{\"n\":{}}}", i + 1)], "{line}");
        assert!(columns[0].parse::<u64>().is_ok(), "{line}");
        let stream_column = line.find("orders.1@").expect("the stream column");
        assert_eq!(stream_column, lines[0].find("orders.1@").unwrap(), "aligned: {lines:?}");
    }
    node.stop();
}

#[test]
fn cli_subscribe_from_the_end_prints_a_live_event_then_exits_after_count() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let server = server(&node);
    publish(&node, "orders.live", &["n=1"]);

    let mut subscriber = Process::spawn(&["subscribe", "--server", &server, "orders.live", "--count", "1"]);
    let caught_up = subscriber.await_stderr("-- caught up at position ");
    assert!(caught_up.ends_with(" (live from here)"), "{caught_up}");
    publish(&node, "orders.live", &["n=2"]);
    let (status, lines, stderr) = subscriber.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(lines.len(), 1, "only the live event, not the one before: {lines:?}");
    assert!(lines[0].contains("  orders.live@1  placed  {\"n\":2}"), "{lines:?}");
    node.stop();
}

#[test]
fn cli_subscribe_exits_0_on_sigterm_or_sigint_and_1_when_the_node_stops() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let server = server(&node);

    for signal in ["TERM", "INT"] {
        let mut signalled = Process::spawn(&["subscribe", "--server", &server]);
        signalled.await_stderr("-- caught up at position ");
        send_signal(signalled.pid, signal);
        let (status, lines, stderr) = signalled.finish();
        assert_eq!(status.code(), Some(0), "SIG{signal}: {stderr}");
        assert!(lines.is_empty(), "{lines:?}");
    }

    let mut orphaned = Process::spawn(&["subscribe", "--server", &server, "--json"]);
    let caught_up = orphaned.stdout.recv_timeout(DEADLINE).expect("the caught_up line");
    assert!(json(&caught_up).get("caught_up").is_some(), "{caught_up}");
    node.stop();
    let (status, _, stderr) = orphaned.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: the node ended the subscription"), "{stderr}");
}

#[test]
fn cli_subscribe_ends_quietly_with_0_when_stdout_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let server = server(&node);
    publish(&node, "s", &["n=1"]);

    // `edgebus subscribe … | head -1`: read one line, then close the pipe.
    let mut child = edgebus_command(&["subscribe", "--server", &server, "s", "--from", "start", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start edgebus");
    let stdout = child.stdout.take().expect("piped stdout");
    let (sender, first) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
        // The reader and the pipe are dropped here: stdout is closed.
    });
    let stderr = lines_of(child.stderr.take().expect("piped stderr"));
    let (_, no_stdout) = mpsc::channel();
    let mut subscriber = Process::watch(child, no_stdout, stderr);
    let line = first.recv_timeout(DEADLINE).expect("the first line");
    assert_eq!(json(&line)["data"], serde_json::json!({ "n": 1 }), "{line}");
    // Nothing more is published: the command notices the closed pipe
    // without waiting for a line to write.
    let (status, _, stderr) = subscriber.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "quietly: {stderr}");
    node.stop();
}

#[test]
fn cli_subscribe_refuses_a_predicate_that_does_not_compile_and_a_bad_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let server = server(&node);

    let (status, lines, stderr) = run(&["subscribe", "--server", &server, "--where", "data.n >", "--from", "start"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(lines.is_empty(), "{lines:?}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("does not compile"), "{stderr}");
    assert!(stderr.contains("INVALID_FILTER"), "{stderr}");

    // Caught before any call: the message names the argument.
    let (status, _, stderr) = run(&["subscribe", "--server", &server, "--pattern", "orders..x"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--pattern"), "{stderr}");
    assert!(stderr.contains("empty token"), "{stderr}");
    let (status, _, stderr) = run(&["subscribe", "--server", &server, "orders.*"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("[STREAM]"), "{stderr}");
    node.stop();
}
