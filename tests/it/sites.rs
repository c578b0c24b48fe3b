//! Sites for the federation scenarios (`wan_sites`): a real `edgebus serve`
//! with its site's gateway, restartable on the same data dir, killable with
//! SIGKILL and freezable with SIGSTOP; publishers; and the history checker
//! that compares what a site wrote with what another site holds.
//!
//! A [`Site`] owns a temporary directory holding its data dir and its
//! config file; the process is started by [`Site::start`] and again by
//! [`Site::restart`] after [`Site::kill`], each time on
//! fresh ports (`127.0.0.1:0`). Dropping a site kills its process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgebus_client::Client;
use edgebus_store::{Direction, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use serde_json::{Value, json};

use crate::node::{Node, http_request};

/// The bound on every awaited condition of the federation scenarios.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(50);

/// A multi-threaded runtime for the clients, links and publishers of one
/// scenario; its workers keep spawned tasks running while the test thread
/// does blocking HTTP calls or process control.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

/// Polls `condition` every [`POLL`] until it answers `Ok`, for at most
/// [`DEADLINE`]; the test fails with the last `Err` after that.
pub fn wait_until<T>(what: &str, mut condition: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match condition() {
            Ok(value) => return value,
            Err(why) if started.elapsed() > DEADLINE => panic!("{what}: not within {DEADLINE:?}: {why}"),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// A site: one node running the site's gateway.
pub struct Site {
    /// The site's name.
    pub name: String,
    /// Data dir and config file.
    dir: tempfile::TempDir,
    node: Option<Node>,
    /// Addresses of the running process (those of the last one once it is gone).
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub wan: SocketAddr,
}

impl Site {
    /// Starts site `name` with `config`, the TOML text of its config file
    /// (a `[gateway]` table; the site name, the listen addresses and the
    /// data dir come from flags).
    pub fn start(name: &str, config: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("edgebus.toml"), config).expect("write the config file");
        let unbound: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let mut site = Self { name: name.to_owned(), dir, node: None, grpc: unbound, http: unbound, wan: unbound };
        site.restart();
        site
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The running process's id (for `/proc` figures such as its RSS).
    pub fn pid(&self) -> u32 {
        self.node.as_ref().unwrap_or_else(|| panic!("site {} is not running", self.name)).pid()
    }

    /// Starts the site's process again on its data dir (after [`Site::kill`]), on new ports.
    pub fn restart(&mut self) {
        assert!(self.node.is_none(), "site {} is still running", self.name);
        let config = self.dir.path().join("edgebus.toml");
        let data_dir = self.data_dir();
        let args = [
            "--site",
            &self.name,
            "--gateway",
            "--config",
            config.to_str().expect("a UTF-8 path"),
            "--data-dir",
            data_dir.to_str().expect("a UTF-8 path"),
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--wan-listen",
            "127.0.0.1:0",
            // A SIGKILL keeps the page cache: syncing buys these tests nothing.
            "--fsync",
            "never",
        ];
        let (node, ready) = Node::start_with(&args, &[]);
        self.grpc = node.grpc;
        self.http = node.http;
        self.wan = node.wan.unwrap_or_else(|| panic!("a gateway node names its WAN address: {ready:?}"));
        self.node = Some(node);
    }

    /// `kill -9`: no shutdown runs, cursors are as last checkpointed.
    pub fn kill(&mut self) {
        self.node.take().expect("a running site").kill();
    }

    /// SIGSTOP: the process is frozen with its sockets open.
    pub fn pause(&self) {
        self.node.as_ref().expect("a running site").pause();
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.node.as_ref().expect("a running site").resume();
    }

    /// The gRPC address as a URI for [`Client::connect`].
    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn get_json(&self, path: &str) -> Value {
        let response = http_request(self.http, "GET", path, &[], b"");
        assert_eq!(response.status, 200, "GET {path} at {}: {}", self.name, response.body);
        serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {}", response.body))
    }

    /// `GET /v1/routes`.
    pub fn routes(&self) -> Value {
        self.get_json("/v1/routes")
    }

    /// One route of `GET /v1/routes`.
    pub fn route(&self, name: &str) -> Value {
        let routes = self.routes();
        routes["routes"]
            .as_array()
            .expect("a route list")
            .iter()
            .find(|r| r["route"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("site {} has no route {name}: {routes}", self.name))
    }

    /// `GET /v1/stats`.
    pub fn stats(&self) -> Value {
        self.get_json("/v1/stats")
    }

    /// The `gateway.inbound` entry of `/v1/stats` for links from `from`
    /// (zeros if none came yet).
    pub fn inbound(&self, from: &str) -> Value {
        let stats = self.get_json("/v1/stats");
        stats["gateway"]["inbound"]
            .as_array()
            .unwrap_or_else(|| panic!("no gateway.inbound in the stats of {}: {stats}", self.name))
            .iter()
            .find(|s| s["site"] == from)
            .cloned()
            .unwrap_or_else(|| json!({ "site": from, "events_written": 0, "duplicates": 0, "refused": 0 }))
    }

    /// `POST /v1/routes` with `def`; the answer must be 201.
    pub fn set_route(&self, def: &Value) {
        let response = http_request(self.http, "POST", "/v1/routes", &[], def.to_string().as_bytes());
        assert_eq!(response.status, 201, "POST /v1/routes {def} at {}: {}", self.name, response.body);
    }

    /// `POST /v1/policies` with `def`; the answer must be 201.
    pub fn set_policy(&self, def: &Value) {
        let response = http_request(self.http, "POST", "/v1/policies", &[], def.to_string().as_bytes());
        assert_eq!(response.status, 201, "POST /v1/policies {def} at {}: {}", self.name, response.body);
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> String {
        let response = http_request(self.http, "GET", "/metrics", &[], b"");
        assert_eq!(response.status, 200, "GET /metrics at {}", self.name);
        response.body
    }
}

/// The sum of a numeric field over a route's lanes.
pub fn lanes_sum(route: &Value, field: &str) -> u64 {
    route["lanes"].as_array().expect("lanes").iter().map(|l| l[field].as_u64().unwrap_or(0)).sum()
}

/// A route definition for `POST /v1/routes` or a config file.
pub fn route_def(name: &str, remote_site: &str, address: SocketAddr) -> Value {
    json!({ "name": name, "remote_site": remote_site, "addresses": [address.to_string()] })
}

/// The `[gateway]` timing used by every scenario: links notice a dead peer
/// within 2 s, so a cut or a frozen process is handled quickly.
pub const GATEWAY_TIMING: &str = "heartbeat_ms = 100\ndead_after_ms = 2000\n";

/// A fresh random event id.
fn event_id() -> EventId {
    EventId::from_u128(rand::random())
}

/// An event whose payload names its stream and sequence number.
pub fn event(stream: &str, n: u64) -> NewEvent {
    NewEvent {
        id: event_id(),
        event_type: EventType::new("reading").expect("a valid type"),
        data: serde_json::to_vec(&json!({ "stream": stream, "n": n, "pad": "x".repeat(64) })).expect("JSON"),
        metadata: b"{\"test\":\"wan\"}".to_vec(),
        timestamp_ms: 0,
    }
}

/// A publisher task: appends `per_stream` events to each of `streams`,
/// `batch` events per append, round robin over the streams, until done,
/// told to stop, or an append fails (the node was killed). Answers the
/// events acknowledged and the first error.
pub struct Publisher {
    pub acknowledged: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

impl Publisher {
    /// Starts publishing on `runtime` to the node at `grpc_uri`; `pace` is a
    /// pause between appends that spreads the burst over time.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        grpc_uri: &str,
        streams: Vec<String>,
        per_stream: u64,
        batch: u64,
        pace: Duration,
    ) -> Self {
        let acknowledged = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let uri = grpc_uri.to_owned();
        let (ack, halt) = (Arc::clone(&acknowledged), Arc::clone(&stop));
        let task = runtime.spawn(async move {
            let client = Client::connect(&uri).await.map_err(|e| e.to_string())?;
            let mut next = vec![0u64; streams.len()];
            while next.iter().any(|n| *n < per_stream) {
                for (i, stream) in streams.iter().enumerate() {
                    if halt.load(Ordering::Relaxed) {
                        return Ok(ack.load(Ordering::Relaxed));
                    }
                    let count = batch.min(per_stream - next[i]);
                    if count == 0 {
                        continue;
                    }
                    let events = (next[i]..next[i] + count).map(|n| event(stream, n)).collect();
                    let name = StreamName::new(stream).expect("a valid stream name");
                    client.append(name, ExpectedVersion::Any, events).await.map_err(|e| e.to_string())?;
                    next[i] += count;
                    ack.fetch_add(count, Ordering::Relaxed);
                    if !pace.is_zero() {
                        tokio::time::sleep(pace).await;
                    }
                }
            }
            Ok(ack.load(Ordering::Relaxed))
        });
        Self { acknowledged, stop, task }
    }

    /// Events acknowledged so far.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Waits (bounded) for the publisher to end by itself.
    pub fn finish(self, runtime: &tokio::runtime::Runtime) -> Result<u64, String> {
        runtime
            .block_on(async { tokio::time::timeout(DEADLINE, self.task).await })
            .unwrap_or_else(|_| panic!("the publisher did not finish within {DEADLINE:?}"))
            .expect("the publisher task")
    }

    /// Tells the publisher to stop and waits for it.
    pub fn halt(self, runtime: &tokio::runtime::Runtime) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.finish(runtime)
    }
}

/// Publishes `per_stream` events to each of `streams` and waits.
pub fn publish(runtime: &tokio::runtime::Runtime, site: &Site, streams: &[String], per_stream: u64, batch: u64) {
    let publisher = Publisher::start(runtime, &site.grpc_uri(), streams.to_vec(), per_stream, batch, Duration::ZERO);
    let published = publisher.finish(runtime).unwrap_or_else(|e| panic!("publishing at {}: {e}", site.name));
    assert_eq!(published, per_stream * streams.len() as u64);
}

/// `count` stream names `PREFIX.SITE.i`.
pub fn streams(prefix: &str, site: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}.{site}.{i}")).collect()
}

/// Every non-system stream of a site with all its events, by name.
pub type Snapshot = BTreeMap<String, Vec<RecordedEvent>>;

/// Reads every stream of the node at `grpc_uri`, whole.
pub fn snapshot(runtime: &tokio::runtime::Runtime, grpc_uri: &str) -> Snapshot {
    runtime.block_on(async {
        let client = Client::connect(grpc_uri).await.expect("connect for a snapshot");
        let mut snapshot = Snapshot::new();
        let mut after = None;
        loop {
            let page = client.list_streams(after.clone(), 1000, false).await.expect("list streams");
            let Some(last) = page.last() else { break };
            after = Some(last.stream.as_str().to_owned());
            for info in page {
                let mut events = Vec::new();
                loop {
                    let from =
                        events.last().map_or(StreamFrom::Start, |e: &RecordedEvent| StreamFrom::Version(e.version + 1));
                    let read = client
                        .read_stream(info.stream.clone(), from, Direction::Forward, 1000)
                        .await
                        .expect("read a stream");
                    if read.is_empty() {
                        break;
                    }
                    events.extend(read);
                }
                snapshot.insert(info.stream.as_str().to_owned(), events);
            }
        }
        snapshot
    })
}

/// Marks a [`check_flow`] error that more time may cure (events still on
/// their way); every other error is final: replicas only grow, and a
/// reader sees a prefix of each stream.
const PENDING: &str = "pending: ";

/// What a route must do with one event written at its home site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Arrives as is: same id, content and version.
    Replicate,
    /// Arrives with this `origin.note`, appended at the replica's end.
    Noted(String),
    /// Never arrives.
    Absent,
}

/// One flow of events to check: the events written at `home` (whose own
/// streams are read from its snapshot) that reach a site through `via`,
/// with `rule` saying what must have happened to each.
pub struct Flow<'a> {
    pub home: &'a str,
    pub via: &'a str,
    pub rule: &'a dyn Fn(&RecordedEvent) -> Expect,
}

/// The history checker: every event of `home`'s own streams that `rule`
/// says goes is at `dest` exactly once, in per-stream order, with the
/// origin's id, type, data, metadata and timestamp, `origin` naming its
/// home site, home position, relay and note, and the origin's version (as
/// is) or the replica's next version (noted); nothing else from `home` is
/// at `dest`. Answers how many events it found in place.
pub fn check_flow(home: &Snapshot, dest: &Snapshot, flow: &Flow<'_>) -> Result<u64, String> {
    let mut checked = 0u64;
    let mut expected_streams = 0usize;
    for (stream, events) in home {
        let own: Vec<&RecordedEvent> = events.iter().filter(|e| e.origin.is_none()).collect();
        if own.is_empty() {
            continue; // a replica at the home site: not its own stream
        }
        assert_eq!(own.len(), events.len(), "stream {stream} at {} mixes own and replicated events", flow.home);
        let expected: Vec<(&RecordedEvent, Expect)> =
            own.into_iter().map(|e| (e, (flow.rule)(e))).filter(|(_, expect)| *expect != Expect::Absent).collect();
        let arrived: Vec<&RecordedEvent> = dest
            .get(stream)
            .map(|events| {
                events.iter().filter(|e| e.origin.as_ref().is_some_and(|o| o.site.as_str() == flow.home)).collect()
            })
            .unwrap_or_default();
        if let Some(local) = dest.get(stream).and_then(|events| events.iter().find(|e| e.origin.is_none())) {
            return Err(format!("{stream} holds an event written at the destination: {local:?}"));
        }
        if expected.is_empty() {
            if let Some(first) = arrived.first() {
                return Err(format!(
                    "{stream}: {} events arrived although none may (first: version {}, origin {:?})",
                    arrived.len(),
                    first.version,
                    first.origin
                ));
            }
            continue;
        }
        expected_streams += 1;
        if arrived.len() > expected.len() {
            return Err(format!("{stream}: {} events arrived, {} expected", arrived.len(), expected.len()));
        }
        for (i, (got, (want, expect))) in arrived.iter().zip(&expected).enumerate() {
            let where_ = format!("{stream}[{i}] (home version {}, position {})", want.version, want.position);
            let origin = got.origin.as_ref().expect("filtered on origin");
            if got.id != want.id {
                return Err(format!("{where_}: id {:?}, expected {:?}: out of order or duplicated", got.id, want.id));
            }
            let note = match expect {
                Expect::Replicate => "",
                Expect::Noted(note) => note.as_str(),
                Expect::Absent => unreachable!("filtered"),
            };
            let version = if note.is_empty() { want.version } else { i as u64 };
            if got.version != version {
                return Err(format!("{where_}: version {}, expected {version}", got.version));
            }
            if got.event_type != want.event_type
                || got.data != want.data
                || got.metadata != want.metadata
                || got.timestamp_ms != want.timestamp_ms
            {
                return Err(format!("{where_}: content differs: {got:?} vs {want:?}"));
            }
            if origin.position != want.position || origin.via.as_str() != flow.via || origin.note != note {
                return Err(format!(
                    "{where_}: origin {origin:?}, expected position {}, via {}, note {note:?}",
                    want.position, flow.via
                ));
            }
            checked += 1;
        }
        if arrived.len() < expected.len() {
            return Err(format!("{PENDING}{stream}: {} of {} events arrived so far", arrived.len(), expected.len()));
        }
    }
    for (stream, events) in dest {
        let from_home = events.iter().any(|e| e.origin.as_ref().is_some_and(|o| o.site.as_str() == flow.home));
        let known = home.get(stream).is_some_and(|events| events.iter().any(|e| e.origin.is_none()));
        if from_home && !known {
            return Err(format!("{stream} holds events from {} that {} never wrote", flow.home, flow.home));
        }
    }
    if expected_streams == 0 {
        return Err(format!("no stream of {} is expected at the destination: the scenario checks nothing", flow.home));
    }
    Ok(checked)
}

/// Waits until `dest` holds exactly what `flows` say (polling its
/// snapshot), and answers that snapshot and the events checked per flow.
/// The home snapshots must be final (publishing done).
pub fn await_flows(
    runtime: &tokio::runtime::Runtime,
    dest: &Site,
    flows: &[(&Snapshot, Flow<'_>)],
) -> (Snapshot, Vec<u64>) {
    wait_until(&format!("replication to {}", dest.name), || {
        let snapshot = snapshot(runtime, &dest.grpc_uri());
        let counts = flows
            .iter()
            .map(|(home, flow)| check_flow(home, &snapshot, flow).map_err(|e| format!("from {}: {e}", flow.home)))
            .collect::<Result<Vec<u64>, String>>();
        match counts {
            Ok(counts) => Ok((snapshot, counts)),
            Err(why) if why.contains(PENDING) => Err(why),
            Err(wrong) => panic!("replication to {} is wrong: {wrong}", dest.name),
        }
    })
}

/// Waits until every lane of `route` at `site` has nothing buffered or in
/// flight and no backlog left but its own checkpoints: everything it will
/// send is acknowledged.
pub fn await_route_idle(site: &Site, route: &str) -> Value {
    wait_until(&format!("route {route} of {} idle", site.name), || {
        let r = site.route(route);
        let busy = lanes_sum(&r, "in_flight_events") + lanes_sum(&r, "buffered_events");
        if r["state"] == "connected" && busy == 0 { Ok(r) } else { Err(format!("{r}")) }
    })
}

/// A route's `topics_counts[pattern][field]` (0 when absent).
pub fn topic_count(route: &Value, pattern: &str, field: &str) -> u64 {
    route["topics_counts"][pattern][field].as_u64().unwrap_or(0)
}
