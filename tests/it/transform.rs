//! Racing deterministic transformers (issue 9) against real nodes: three
//! `edgebus transform run matcher` processes racing while orders flow, one
//! SIGKILLed at random moments and restarted (once from a snapshot), end
//! with the output a single instance writes alone over the same input, byte
//! for byte; a non-deterministic instance is stopped by the divergence
//! check and leaves only honest events; a state that differs is reported as
//! a state hash mismatch; bad input is refused before anything is written;
//! and the client's exists-or-write and snapshot calls.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgebus::transform::matcher::{Books, OrderFlow, OrderMatcher};
use edgebus_client::transform::logic::{ControlNames, Core, Progress, encode_snapshot};
use edgebus_client::transform::{Notice, Output, Transform, TransformConfig, TransformError, TransformRunner};
use edgebus_client::{Client, ClientError};
use edgebus_store::{Direction, ExistsOrWrite, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName, StreamPattern};

use crate::node::Node;

/// How long an awaited line, exit or condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// The instruments of the test order flows.
const INSTRUMENTS: [&str; 2] = ["BTC-EUR", "ETH-EUR"];

/// Events of streams by name, without positions (which differ between
/// nodes): version, id, type, data, metadata, time.
type StreamsContent = BTreeMap<String, Vec<(u64, EventId, String, Vec<u8>, Vec<u8>, u64)>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn server(node: &Node) -> String {
    format!("http://{}", node.grpc)
}

/// Publishes the next `count` orders of `flow` to `orders.INSTRUMENT`.
async fn publish_orders(client: &Client, flow: &mut OrderFlow, count: u64) {
    for _ in 0..count {
        let order = flow.next_order();
        let event = NewEvent {
            id: EventId::from_u128(rand::random()),
            event_type: EventType::new(order.event_type).unwrap(),
            data: order.data,
            metadata: Vec::new(),
            timestamp_ms: 0,
        };
        client
            .append(stream(&format!("orders.{}", order.instrument)), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
}

/// Every event of `name`, in version order.
async fn read_all(client: &Client, name: &StreamName) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    loop {
        let from = events.last().map_or(StreamFrom::Start, |e: &RecordedEvent| StreamFrom::Version(e.version + 1));
        let page = client.read_stream(name.clone(), from, Direction::Forward, 0).await.unwrap();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// Every event of the streams whose names start with `prefix`, by stream,
/// without positions (which differ between nodes): what "byte for byte"
/// compares.
async fn streams_content(client: &Client, prefix: &str) -> StreamsContent {
    let mut out = BTreeMap::new();
    for info in client.list_streams(None, 10_000, false).await.unwrap() {
        if !info.stream.as_str().starts_with(prefix) {
            continue;
        }
        let events = read_all(client, &info.stream).await;
        let content = events
            .into_iter()
            .map(|e| (e.version, e.id, e.event_type.as_str().to_owned(), e.data, e.metadata, e.timestamp_ms))
            .collect();
        out.insert(info.stream.as_str().to_owned(), content);
    }
    out
}

/// The inputs on `client`'s node, in log order.
async fn inputs_in_log_order(client: &Client) -> Vec<RecordedEvent> {
    let mut inputs = Vec::new();
    for instrument in INSTRUMENTS {
        inputs.extend(read_all(client, &stream(&format!("orders.{instrument}"))).await);
    }
    inputs.sort_by_key(|e| e.position);
    inputs
}

/// Waits until `condition` holds, polling; fails the test after [`DEADLINE`].
async fn await_condition<F: std::future::Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = Instant::now() + DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Events in a stream (0 if it has none).
async fn stream_len(client: &Client, name: &str) -> u64 {
    client.stream_info(stream(name)).await.unwrap().and_then(|i| i.current_version).map_or(0, |v| v + 1)
}

/// `edgebus ARGS` with the environment's server ignored.
fn edgebus_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgebus-node"));
    command.args(args).env_remove("EDGEBUS_SERVER").stdin(Stdio::null());
    command
}

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

/// Starts `command`. A fork holds copies of this process's descriptors until
/// its exec, log locks included, so no log opens meanwhile (see `guarded`);
/// `spawn` returns once the exec is done.
fn spawn(command: &mut Command) -> std::io::Result<Child> {
    let _starting = edgebus_tests::guarded::starting_child();
    command.spawn()
}

/// Sends `signal` through the `kill` command, keeping `unsafe` out of the
/// tests; whether it was delivered.
fn try_signal(pid: u32, signal: &str) -> bool {
    let child = spawn(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]));
    child.and_then(|mut child| child.wait()).is_ok_and(|status| status.success())
}

fn send_signal(pid: u32, signal: &str) {
    assert!(try_signal(pid, signal), "kill -{signal} {pid}");
}

/// A running `edgebus` process with its stderr lines on a channel; killed
/// if still running when dropped, so none outlives its test.
struct Process {
    pid: u32,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    exited: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    stderr_seen: Vec<String>,
}

impl Process {
    fn spawn(args: &[&str]) -> Self {
        let mut child =
            spawn(edgebus_command(args).stdout(Stdio::piped()).stderr(Stdio::piped())).expect("start edgebus");
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        let pid = child.id();
        let (sender, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(child.wait().expect("wait for edgebus"));
        });
        Self { pid, stdout, stderr, exited, status: None, stderr_seen: Vec::new() }
    }

    /// Waits for a stderr line containing `needle`.
    fn await_stderr(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no stderr line with {needle:?}: {:?}", self.stderr_seen),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("edgebus ended without a line with {needle:?}: {:?}", self.stderr_seen)
                }
            }
        }
    }

    /// Waits (bounded) for the exit; answers the status, stdout and stderr.
    fn finish(&mut self) -> (ExitStatus, String, String) {
        let Ok(status) = self.exited.recv_timeout(DEADLINE) else {
            panic!("edgebus still running after {DEADLINE:?}; stderr: {:?}", self.stderr_seen)
        };
        self.status = Some(status);
        let stdout: Vec<String> = self.stdout.iter().collect();
        self.stderr_seen.extend(self.stderr.iter());
        (status, stdout.join("\n"), self.stderr_seen.join("\n"))
    }

    /// SIGKILL; fails the test if the process had already stopped on its
    /// own (an instance only stops when told to).
    fn kill(mut self) {
        if let Ok(status) = self.exited.try_recv() {
            self.status = Some(status);
            self.stderr_seen.extend(self.stderr.try_iter());
            panic!("the process stopped on its own ({status}): {:?}", self.stderr_seen);
        }
        send_signal(self.pid, "KILL");
        let _ = self.finish();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() && self.exited.try_recv().is_err() {
            // No assertion here: it may run while a failed test unwinds,
            // and the process may have exited in the meantime.
            let _ = try_signal(self.pid, "KILL");
        }
    }
}

/// Runs `edgebus ARGS` to its end (bounded).
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    Process::spawn(args).finish()
}

/// `edgebus transform run matcher --server S` with small periods, so that
/// state hashes and snapshots happen within the test's inputs, and `extra`.
fn matcher_args<'a>(server: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["transform", "run", "matcher", "--server", server, "--state-hash-every", "10"];
    args.extend_from_slice(&["--snapshot-every", "50"]);
    args.extend_from_slice(extra);
    args
}

fn start_instance(server: &str) -> Process {
    Process::spawn(&matcher_args(server, &[]))
}

#[test]
fn racing_instances_killed_at_random_write_what_one_instance_writes_alone() {
    const ORDERS_FIRST: u64 = 60;
    const ORDERS: u64 = 600;
    const KILLS: usize = 5;
    let rt = runtime();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (node_a, node_b) = (Node::start(dir_a.path()), Node::start(dir_b.path()));
    let (server_a, server_b) = (server(&node_a), server(&node_b));
    let client_a = rt.block_on(Client::connect(&server_a)).unwrap();
    let mut flow = OrderFlow::new(42, &INSTRUMENTS);
    rt.block_on(publish_orders(&client_a, &mut flow, ORDERS_FIRST));

    let mut instances: Vec<Process> = (0..3).map(|_| start_instance(&server_a)).collect();
    for instance in &mut instances {
        instance.await_stderr(": caught up position=");
    }
    // The rest of the orders flow while instances are killed and restarted.
    let feeder = {
        let client = client_a.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                for _ in 0..(ORDERS - ORDERS_FIRST) / 6 {
                    publish_orders(&client, &mut flow, 6).await;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            });
        })
    };
    for round in 0..KILLS {
        let last = round == KILLS - 1;
        if last {
            // The last restart must resume from a snapshot.
            rt.block_on(await_condition("a snapshot of the matcher", || async {
                !client_a.list_snapshots(Some("transform.matcher"), None, 10).await.unwrap().is_empty()
            }));
        } else {
            // A random moment: the point of the test, not a wait for a condition.
            std::thread::sleep(Duration::from_millis(rand::random_range(50..400)));
        }
        let victim = rand::random_range(0..instances.len());
        instances.remove(victim).kill();
        let mut restarted = start_instance(&server_a);
        let started = restarted.await_stderr(": started ");
        if last {
            assert!(started.contains("from_snapshot=true"), "{started}");
        }
        instances.push(restarted);
    }
    feeder.join().expect("the feeder publishes every order");
    // Every input applied by some instance: the last state hash is written
    // after the outputs of the last input.
    rt.block_on(await_condition("the state hash after the last input", || async {
        stream_len(&client_a, "transform.matcher.statehash").await == ORDERS / 10
    }));
    for mut instance in instances {
        send_signal(instance.pid, "TERM");
        let (status, _, stderr) = instance.finish();
        assert!(status.success(), "a stopped instance exits 0: {stderr}");
        assert!(!stderr.contains("state hash mismatch"), "{stderr}");
    }

    // The same inputs on a second node (same streams, versions, ids and
    // times), and one instance alone over them.
    let client_b = rt.block_on(Client::connect(&server_b)).unwrap();
    let inputs = rt.block_on(inputs_in_log_order(&client_a));
    assert_eq!(inputs.len() as u64, ORDERS);
    rt.block_on(async {
        for input in &inputs {
            let event = NewEvent {
                id: input.id,
                event_type: input.event_type.clone(),
                data: input.data.clone(),
                metadata: input.metadata.clone(),
                timestamp_ms: input.timestamp_ms,
            };
            let written = client_b.exists_or_write(input.stream.clone(), input.version, event).await.unwrap();
            assert!(matches!(written, ExistsOrWrite::Written { .. }), "{written:?}");
        }
    });
    let (status, _, stderr) = run(&matcher_args(&server_b, &["--until-caught-up"]));
    assert!(status.success(), "{stderr}");

    let raced = rt.block_on(streams_content(&client_a, "trades."));
    let alone = rt.block_on(streams_content(&client_b, "trades."));
    assert_eq!(raced.keys().collect::<Vec<_>>(), ["trades.BTC-EUR", "trades.ETH-EUR"]);
    let outputs: usize = raced.values().map(Vec::len).sum();
    assert!(outputs as u64 >= ORDERS, "every order has an output: {outputs}");
    for (name, events) in &alone {
        assert_eq!(raced.get(name).map(Vec::len), Some(events.len()), "{name}: as many events");
    }
    assert!(raced == alone, "the raced output equals the single instance's, byte for byte");
    let hashes_raced = rt.block_on(streams_content(&client_a, "transform.matcher.statehash"));
    let hashes_alone = rt.block_on(streams_content(&client_b, "transform.matcher.statehash"));
    assert_eq!(hashes_raced, hashes_alone, "and so are the state hashes");
    node_a.stop();
    node_b.stop();
}

/// The honest matcher, except that every trade carries a random number.
#[derive(Debug)]
struct Cheater(OrderMatcher);

impl Transform for Cheater {
    type State = Books;
    const STATE_VERSION: u32 = OrderMatcher::STATE_VERSION;

    fn initial_state(&self) -> Books {
        self.0.initial_state()
    }

    fn apply(&self, state: &mut Books, input: &RecordedEvent) -> Vec<Output> {
        let mut outputs = self.0.apply(state, input);
        for output in outputs.iter_mut().filter(|o| o.event_type.as_str() == "Trade") {
            let mut value: serde_json::Value = serde_json::from_slice(&output.data).unwrap();
            value["nonce"] = rand::random::<u32>().into();
            output.data = serde_json::to_vec(&value).unwrap();
        }
        outputs
    }

    fn encode_state(&self, state: &Books) -> Vec<u8> {
        self.0.encode_state(state)
    }

    fn decode_state(&self, bytes: &[u8]) -> Result<Books, String> {
        self.0.decode_state(bytes)
    }
}

/// The honest matcher, except that its encoded state carries a random
/// number: its outputs agree, its state hashes do not.
#[derive(Debug)]
struct StateCheater(OrderMatcher);

impl Transform for StateCheater {
    type State = Books;
    const STATE_VERSION: u32 = OrderMatcher::STATE_VERSION;

    fn initial_state(&self) -> Books {
        self.0.initial_state()
    }

    fn apply(&self, state: &mut Books, input: &RecordedEvent) -> Vec<Output> {
        self.0.apply(state, input)
    }

    fn encode_state(&self, state: &Books) -> Vec<u8> {
        let mut bytes = self.0.encode_state(state);
        bytes.extend_from_slice(rand::random::<u64>().to_string().as_bytes());
        bytes
    }

    fn decode_state(&self, bytes: &[u8]) -> Result<Books, String> {
        self.0.decode_state(bytes)
    }
}

fn matcher_config() -> TransformConfig {
    let engine = OrderMatcher::new("trades").unwrap();
    let mut config = TransformConfig::new("matcher", StreamPattern::new("orders.>").unwrap(), engine.outputs());
    config.state_hash_every = 10;
    config.snapshot_every = 0;
    config
}

/// What the honest matcher writes over `inputs`: the runner's own logic,
/// alone, with no node.
fn honest_outputs(inputs: &[RecordedEvent]) -> StreamsContent {
    let engine = OrderMatcher::new("trades").unwrap();
    let outputs = engine.outputs();
    let state = engine.initial_state();
    let mut core = Core::new(engine, ControlNames::new("matcher").unwrap(), outputs, 10, 0, state, Progress::default());
    let mut expected: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for input in inputs {
        for planned in core.apply(input).unwrap().expect("a new input").outputs {
            let e = planned.event;
            expected.entry(planned.stream.as_str().to_owned()).or_default().push((
                planned.index,
                e.id,
                e.event_type.as_str().to_owned(),
                e.data,
                e.metadata,
                e.timestamp_ms,
            ));
        }
    }
    expected
}

#[test]
fn a_non_deterministic_instance_is_stopped_by_the_divergence_check() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let server = server(&node);
    let client = rt.block_on(Client::connect(&server)).unwrap();
    let mut flow = OrderFlow::new(7, &INSTRUMENTS);
    rt.block_on(publish_orders(&client, &mut flow, 100));
    let (status, _, stderr) = run(&["transform", "run", "matcher", "--server", &server, "--until-caught-up"]);
    assert!(status.success(), "{stderr}");

    let cheater = TransformRunner::new(client.clone(), matcher_config(), Cheater(OrderMatcher::new("trades").unwrap()));
    let result = rt.block_on(async { tokio::time::timeout(DEADLINE, cheater.run(std::future::pending())).await });
    let result = result.expect("it stops");
    let Err(TransformError::Diverged(divergence)) = result else { panic!("expected a divergence, got {result:?}") };
    let inputs = rt.block_on(inputs_in_log_order(&client));
    let input = inputs.iter().find(|i| i.position == divergence.input.position).expect("the input named");
    assert_eq!((&input.stream, input.version), (&divergence.input.stream, divergence.input.version));
    let stored = rt.block_on(read_all(&client, &divergence.stream));
    let existing = &stored[divergence.index as usize];
    assert_eq!(existing.event_type.as_str(), "Trade", "the first trade is where the cheat shows");
    assert!(
        stored[..divergence.index as usize].iter().all(|e| e.event_type.as_str() != "Trade"),
        "and it is the first trade of its stream"
    );
    assert_eq!(divergence.theirs, existing.content_hash());
    assert_ne!(divergence.ours, divergence.theirs);
    assert_eq!(divergence.existing_position, existing.position);
    let message = TransformError::Diverged(divergence.clone()).to_string();
    for part in [
        format!("position {}", divergence.input.position),
        format!("output {} index {}", divergence.stream, divergence.index),
        format!("{:016x}", divergence.ours),
        format!("{:016x}", divergence.theirs),
    ] {
        assert!(message.contains(&part), "{part:?} in {message}");
    }

    // The output holds exactly the honest events; more input, and the honest
    // instance carries on after the cheater is gone.
    assert_eq!(rt.block_on(streams_content(&client, "trades.")), honest_outputs(&inputs));
    rt.block_on(publish_orders(&client, &mut flow, 50));
    let (status, _, stderr) = run(&["transform", "run", "matcher", "--server", &server, "--until-caught-up"]);
    assert!(status.success(), "{stderr}");
    let inputs = rt.block_on(inputs_in_log_order(&client));
    assert_eq!(inputs.len(), 150);
    assert_eq!(rt.block_on(streams_content(&client, "trades.")), honest_outputs(&inputs));
    node.stop();
}

#[test]
fn a_state_that_differs_between_instances_is_a_state_hash_mismatch_and_no_snapshot() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let server = server(&node);
    let client = rt.block_on(Client::connect(&server)).unwrap();
    rt.block_on(publish_orders(&client, &mut OrderFlow::new(3, &INSTRUMENTS), 40));
    let args = ["transform", "run", "matcher", "--server", &server, "--until-caught-up", "--snapshot-every", "0"];
    let (status, _, stderr) = run(&[&args[..], &["--state-hash-every", "10"]].concat());
    assert!(status.success(), "{stderr}");

    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut config = matcher_config();
    config.snapshot_every = 10;
    let sink = Arc::clone(&notices);
    let runner = TransformRunner::new(client.clone(), config, StateCheater(OrderMatcher::new("trades").unwrap()))
        .on_notice(move |notice: &Notice| sink.lock().unwrap().push(notice.clone()))
        .stop_when_caught_up();
    let metrics = runner.metrics();
    let end = rt.block_on(async { tokio::time::timeout(DEADLINE, runner.run(std::future::pending())).await });
    let end = end.expect("it stops");
    let end = end.expect("outputs agree, so the instance runs on");
    assert_eq!(end.inputs_applied, 40);
    assert_eq!(end.outputs_written, 0, "every output was there already, identical");
    assert_eq!(end.state_hash_mismatches, 4);
    assert_eq!(metrics.snapshot().state_hash_mismatches, 4, "the live metric");
    let rendered = end.render_prometheus("matcher", "1");
    assert!(rendered.contains("edgebus_transform_state_hash_mismatches_total{transform=\"matcher\",instance=\"1\"} 4"));
    let hashes = rt.block_on(read_all(&client, &stream("transform.matcher.statehash")));
    let mismatches: Vec<Notice> =
        notices.lock().unwrap().iter().filter(|n| matches!(n, Notice::StateHashMismatch { .. })).cloned().collect();
    assert_eq!(mismatches.len(), 4);
    let Notice::StateHashMismatch { inputs_applied, ours, theirs, position, .. } = &mismatches[0] else {
        unreachable!()
    };
    assert_eq!(*inputs_applied, 10);
    assert_eq!(*position, hashes[0].position);
    let honest: serde_json::Value = serde_json::from_slice(&hashes[0].data).unwrap();
    assert_eq!(theirs.map(|h| format!("{h:016x}")).as_deref(), honest["state_hash"].as_str());
    assert_ne!(Some(*ours), *theirs);
    let line = mismatches[0].to_string();
    assert!(line.starts_with("state hash mismatch: "), "{line}");
    assert_eq!(end.snapshots_recorded, 0, "a state that disagrees is never snapshotted");
    let snapshots = rt.block_on(client.list_snapshots(Some("transform.matcher"), None, 10)).unwrap();
    assert!(snapshots.is_empty(), "{snapshots:?}");
    node.stop();
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let server = server(&node);
    let client = rt.block_on(Client::connect(&server)).unwrap();
    rt.block_on(publish_orders(&client, &mut OrderFlow::new(5, &INSTRUMENTS), 20));
    // Set-up: a transform "other" that owns trades.*, a foreign stream
    // fills.x, and snapshots that no instance of "old" or "ahead" can use.
    let (status, _, stderr) =
        run(&["transform", "run", "matcher", "--server", &server, "--name", "other", "--until-caught-up"]);
    assert!(status.success(), "{stderr}");
    let foreign = NewEvent {
        id: EventId::from_u128(rand::random()),
        event_type: EventType::new("Fill").unwrap(),
        data: b"{}".to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 0,
    };
    rt.block_on(client.append(stream("fills.x"), ExpectedVersion::Any, vec![foreign])).unwrap();
    let old = encode_snapshot(99, &Progress { inputs_applied: 5, ..Progress::default() }, b"{}");
    rt.block_on(client.record_snapshot("transform.old", stream("transform.old.spec"), 5, old)).unwrap();
    let ahead_progress =
        Progress { inputs_applied: 5, next_position: 6, output_counts: [(stream("ahead.BTC-EUR"), 3)].into() };
    let ahead = encode_snapshot(OrderMatcher::STATE_VERSION, &ahead_progress, br#"{"books":{}}"#);
    rt.block_on(client.record_snapshot("transform.ahead", stream("transform.ahead.spec"), 5, ahead)).unwrap();
    let end_position = || rt.block_on(client.stats()).unwrap().end_position;
    let before = end_position();

    let refusals: [(&[&str], &str); 9] = [
        (&["nosuch"], "no built-in transform named \"nosuch\"; the built-in transforms are: matcher"),
        (
            &["matcher", "--name", "m1", "--inputs", "nothing.>", "--output-prefix", "m1"],
            "input pattern nothing.> matches no stream",
        ),
        (&["matcher", "--name", "m1"], "output pattern trades.* overlaps the outputs trades.* of transform other"),
        (
            &["matcher", "--name", "m2", "--output-prefix", "fills"],
            "output stream fills.x is owned by a producer that is no transform, not by transform m2",
        ),
        (
            &["matcher", "--name", "other", "--inputs", "orders.BTC-EUR"],
            "transform other is declared on the node with inputs orders.> and outputs trades.*",
        ),
        (
            &["matcher", "--name", "old", "--output-prefix", "old"],
            "holds state version 99, but this transform reads state version 1",
        ),
        (
            &["matcher", "--name", "ahead", "--output-prefix", "ahead"],
            "counts 3 events in ahead.BTC-EUR, which holds 0",
        ),
        (&["matcher", "--name", "m3", "--inputs", ">"], "input pattern > overlaps transform.>"),
        (
            &["matcher", "--name", "m4", "--output-prefix", "orders"],
            "input pattern orders.> overlaps output pattern orders.*",
        ),
    ];
    for (args, expected) in refusals {
        let mut all = vec!["transform", "run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--server", &server, "--until-caught-up"]);
        let (status, _, stderr) = run(&all);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr}");
        assert_eq!(end_position(), before, "{args:?} wrote nothing");
    }
    node.stop();
}

#[test]
fn the_client_writes_conditionally_and_keeps_snapshots() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let client = rt.block_on(Client::connect(&server(&node))).unwrap();
    rt.block_on(async {
        let event = |data: &str, timestamp_ms: u64| NewEvent {
            id: EventId::from_u128(rand::random()),
            event_type: EventType::new("E").unwrap(),
            data: data.as_bytes().to_vec(),
            metadata: Vec::new(),
            timestamp_ms,
        };
        let name = stream("eow.a");
        let written = client.exists_or_write(name.clone(), 0, event("a", 1234)).await.unwrap();
        let ExistsOrWrite::Written { position } = written else { panic!("{written:?}") };
        let again = client.exists_or_write(name.clone(), 0, event("a", 0)).await.unwrap();
        assert_eq!(again, ExistsOrWrite::Exists { position, same: true });
        let other = client.exists_or_write(name.clone(), 0, event("b", 0)).await.unwrap();
        assert_eq!(other, ExistsOrWrite::Exists { position, same: false });
        let gap = client.exists_or_write(name.clone(), 5, event("c", 0)).await.unwrap_err();
        assert_eq!(gap.code_name(), Some("GAP"), "{gap}");
        let node_stamped = client.exists_or_write(name.clone(), 1, event("d", 0)).await.unwrap();
        assert!(matches!(node_stamped, ExistsOrWrite::Written { .. }));
        let stored = read_all(&client, &name).await;
        assert_eq!(stored[0].timestamp_ms, 1234, "a given time is kept");
        assert!(stored[1].timestamp_ms > 1_600_000_000_000, "no time: the node's clock");

        assert_eq!(client.read_snapshot("agg", name.clone(), None).await.unwrap(), None);
        for version in [3, 7] {
            client.record_snapshot("agg", name.clone(), version, vec![version as u8; 4]).await.unwrap();
        }
        let latest = client.read_snapshot("agg", name.clone(), None).await.unwrap().unwrap();
        assert_eq!((latest.version, latest.state), (7, vec![7; 4]));
        let below = client.read_snapshot("agg", name.clone(), Some(5)).await.unwrap().unwrap();
        assert_eq!(below.version, 3);
        let listed = client.list_snapshots(Some("agg"), None, 10).await.unwrap();
        assert_eq!(listed.iter().map(|s| s.version).collect::<Vec<_>>(), [3, 7]);
        client.delete_snapshot("agg", name.clone(), 7).await.unwrap();
        let latest = client.read_snapshot("agg", name.clone(), None).await.unwrap().unwrap();
        assert_eq!(latest.version, 3);
        let bad: ClientError = client.record_snapshot("a$b", name.clone(), 1, Vec::new()).await.unwrap_err();
        assert!(bad.to_string().contains("snapshot source"), "{bad}");
    });
    node.stop();
}

/// Found while racing transformers: a snapshot read while another snapshot
/// of the same stream was being written answered `CORRUPT` ("position N is
/// not in the log"), because the store's in-memory tail holds snapshots
/// before their record is acknowledged. A reader racing a writer must only
/// ever see recorded snapshots.
#[test]
fn regression_issue_9_a_snapshot_being_written_is_not_read_before_it_is_durable() {
    use edgebus_store::{ReadError, Store, StoreConfig};
    const SNAPSHOTS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let store = {
        let _opening = edgebus_tests::guarded::opening();
        Arc::new(Store::open(dir.path(), StoreConfig::default()).unwrap())
    };
    let name = stream("agg.a");
    let writer = {
        let (store, name) = (Arc::clone(&store), name.clone());
        std::thread::spawn(move || {
            for version in 1..=SNAPSHOTS {
                store.record_snapshot("agg", &name, version, vec![1; 64], 1).unwrap();
            }
        })
    };
    let (mut reads, mut found) = (0u64, 0u64);
    while !writer.is_finished() {
        reads += 1;
        match store.read_snapshot("agg", &name, None) {
            Ok(snapshot) => {
                assert!(snapshot.version >= 1 && snapshot.version <= SNAPSHOTS, "{snapshot:?}");
                found += 1;
            }
            Err(ReadError::SnapshotNotFound { .. }) => {}
            Err(error) => panic!("read {reads}: {error} (code {:?})", error.code()),
        }
        let listed = store.list_snapshots(Some("agg"), None, 1000).unwrap();
        for info in listed {
            store.read_snapshot("agg", &name, Some(info.version)).unwrap();
        }
    }
    writer.join().expect("the writer records every snapshot");
    assert!(found > 0, "{reads} reads found no snapshot");
    assert_eq!(store.read_snapshot("agg", &name, None).unwrap().version, SNAPSHOTS);
}
