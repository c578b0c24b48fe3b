//! Gateways as their own processes (issue 8): the node's `edgebus.v1.Site`
//! service through [`RemoteSite`], and `edgebus gateway` against a node
//! without an embedded gateway: federation through it in both directions,
//! a second process refused under a running gateway's name, a standby
//! process that takes over, and a node that cannot be reached.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use edgebus_client::Client;
use edgebus_gateway::{Fence, RemoteSite, Site as _, SiteError};
use edgebus_store::{Direction, ExistsOrWrite, ReplicaWrite, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, Origin, SiteName, StreamName};
use serde_json::Value;

use crate::node::{NODE_DEADLINE, Node, http_request};
use crate::sites::{
    self, DEADLINE, Flow, GATEWAY_TIMING, Site, check_flow, route_def, runtime, snapshot, streams, wait_until,
};

/// A `$gateway` event.
fn gateway_event(n: u64) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(rand::random()),
        event_type: EventType::new("$test").expect("a valid type"),
        data: format!("{{\"n\":{n}}}").into_bytes(),
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

fn system(name: &str) -> StreamName {
    StreamName::system(name).expect("a system stream name")
}

/// Waits (bounded) until `site`'s end is past `position`.
async fn end_passes(site: &RemoteSite, position: u64) -> u64 {
    let mut end = site.end();
    let waited = tokio::time::timeout(DEADLINE, end.wait_for(|end| *end > position)).await;
    let end = waited.unwrap_or_else(|_| panic!("the end watch passes {position} within {DEADLINE:?}"));
    *end.expect("the end watch is followed")
}

/// A node without a gateway, on `data_dir`, listening for gRPC on `grpc`.
pub fn plain_node(data_dir: &std::path::Path, grpc: &str) -> Node {
    let data_dir = data_dir.to_str().expect("a UTF-8 path");
    let args = ["--grpc-listen", grpc, "--http-listen", "127.0.0.1:0", "--data-dir", data_dir, "--fsync", "never"];
    Node::start_with(&args, &[]).0
}

#[test]
fn gateway_process_remote_site_serves_every_call_of_the_site() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let node = plain_node(dir.path(), "127.0.0.1:0");
    let address = node.grpc.to_string();
    rt.block_on(async {
        let site = RemoteSite::connect(&address, Duration::from_secs(10)).await.expect("connects");

        // Conditional appends to $gateway streams, and the conflict.
        let stream = system("$gateway.test");
        let first = site.append(stream.clone(), ExpectedVersion::NoStream, vec![gateway_event(0)]).await.unwrap();
        assert_eq!(first.first_version, 0);
        let conflict = site.append(stream.clone(), ExpectedVersion::NoStream, vec![gateway_event(1)]).await;
        assert_eq!(conflict.unwrap_err(), SiteError::WrongVersion { current: Some(0) });
        let second = site.append(stream.clone(), ExpectedVersion::Exact(0), vec![gateway_event(1)]).await.unwrap();
        assert_eq!(second.first_version, 1);
        site.append(system("$gateway"), ExpectedVersion::Any, vec![gateway_event(2)]).await.expect("$gateway itself");

        // Nothing but $gateway streams.
        for other in [system("$groups.g"), StreamName::new("orders.us.1").unwrap(), system("$gatewayx")] {
            let refused = site.append(other.clone(), ExpectedVersion::Any, vec![gateway_event(9)]).await.unwrap_err();
            let SiteError::Refused(message) = &refused else { panic!("{other}: {refused:?}") };
            assert!(
                message.contains("only to $gateway and $gateway.*") && message.contains(other.as_str()),
                "{message}"
            );
        }

        // Reads: a stream both ways, a missing stream as empty, the log with $ streams.
        let events = site.read_stream(stream.clone(), StreamFrom::Version(0), Direction::Forward, 10).await.unwrap();
        assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1]);
        let last = site.read_stream(stream.clone(), StreamFrom::End, Direction::Backward, 1).await.unwrap();
        assert_eq!((last.len(), last[0].version, &last[0].data), (1, 1, &b"{\"n\":1}".to_vec()));
        assert!(last[0].timestamp_ms > 0, "the node stamps the time");
        let missing = site.read_stream(system("$gateway.none"), StreamFrom::Start, Direction::Forward, 10).await;
        assert_eq!(missing.unwrap().len(), 0);
        let log = site.read_log(second.first_position, 100, 1 << 20).await.unwrap();
        assert_eq!(log[0].stream, stream);
        assert_eq!(log[0].position, second.first_position);
        assert_eq!(log.len(), 2, "the event and the $gateway one after it: {log:?}");

        // The end follows appends.
        let after = site.append(stream.clone(), ExpectedVersion::Any, vec![gateway_event(3)]).await.unwrap();
        end_passes(&site, after.first_position).await;

        // Replication: written, replayed, refused per write, and fenced.
        let eu = SiteName::new("eu").unwrap();
        let write = |version: u64, stream: StreamName| ReplicaWrite {
            stream,
            version: Some(version),
            event: NewEvent { timestamp_ms: 1_700_000_000_000 + version, ..gateway_event(version) },
            origin: Origin { site: eu.clone(), position: 40 + version, via: eu.clone(), note: String::new() },
        };
        let replica = StreamName::new("orders.eu.1").unwrap();
        let fence = |term| Fence { origin: "eu".into(), term };
        let answers = site.replicate(fence(5), vec![write(0, replica.clone())]).await.unwrap();
        assert!(matches!(answers[..], [Ok(ExistsOrWrite::Written { .. })]), "{answers:?}");
        let answers =
            site.replicate(fence(5), vec![write(0, replica.clone()), write(0, system("$gateway.x"))]).await.unwrap();
        assert!(matches!(answers[0], Ok(ExistsOrWrite::Exists { same: true, .. })), "{answers:?}");
        let refusal = answers[1].as_ref().unwrap_err();
        assert!(!refusal.retryable, "{refusal:?}");
        let fenced = site.replicate(fence(3), vec![write(1, replica.clone())]).await.unwrap_err();
        assert_eq!(fenced, SiteError::Fenced { origin: "eu".into(), term: 3, current: 5 });
        // A hello alone (no writes) is fenced too; nothing of term 3 was written.
        assert!(matches!(site.replicate(fence(3), Vec::new()).await, Err(SiteError::Fenced { .. })));
        let stored = site.read_stream(replica.clone(), StreamFrom::Start, Direction::Forward, 10).await.unwrap();
        assert_eq!(stored.len(), 1);
        let origin = stored[0].origin.as_ref().expect("a replica");
        assert_eq!((origin.site.as_str(), origin.position, stored[0].timestamp_ms), ("eu", 40, 1_700_000_000_000));
        site.stop();
    });

    // The end watch comes back when the node does (same port, same data).
    let site = rt.block_on(RemoteSite::connect(&address, Duration::from_secs(10))).expect("connects");
    let before = *site.end().borrow();
    node.stop();
    let node = plain_node(dir.path(), &address);
    rt.block_on(async {
        // The channel reconnects by itself; a call that met the old
        // connection's end is unavailable, and a retry goes through.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let written = loop {
            match site.append(system("$gateway.test"), ExpectedVersion::Any, vec![gateway_event(4)]).await {
                Ok(written) => break written,
                Err(SiteError::Unavailable(why)) if tokio::time::Instant::now() < deadline => {
                    assert!(why.contains(&address), "{why}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("append after the node's restart: {e:?}"),
            }
        };
        assert!(written.first_position >= before);
        end_passes(&site, written.first_position).await;
    });
    drop(site);
    node.stop();
}

/// A running `edgebus gateway` process.
pub struct GatewayProcess {
    child: Option<Child>,
    pub wan: SocketAddr,
    pub http: SocketAddr,
}

/// `edgebus gateway ARGS`, without the test's own `EDGEBUS_*` variables.
fn gateway_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgebus-node"));
    command.arg("gateway").args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBUS_") {
            command.env_remove(name);
        }
    }
    command
}

impl GatewayProcess {
    /// Starts `edgebus gateway ARGS` and waits for its ready line.
    pub fn start(args: &[&str]) -> Self {
        let starting = edgebus_tests::guarded::starting_child();
        let mut child = gateway_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start edgebus gateway");
        drop(starting);
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let Ok(ready) = lines.recv_timeout(NODE_DEADLINE) else {
            let _ = child.kill();
            panic!("edgebus gateway {args:?} prints its ready line: {:?}", child.wait());
        };
        assert!(ready.starts_with("edgebus gateway ready name="), "{ready:?}");
        let field = |name: &str| -> SocketAddr {
            let prefix = format!("{name}=");
            let value = ready.split_whitespace().find_map(|w| w.strip_prefix(&prefix));
            value.unwrap_or_else(|| panic!("no {name}= in {ready:?}")).parse().expect("an address")
        };
        Self { wan: field("wan"), http: field("http"), child: Some(child) }
    }

    pub fn get_json(&self, path: &str) -> Value {
        let response = http_request(self.http, "GET", path, &[], b"");
        assert_eq!(response.status, 200, "GET {path}: {}", response.body);
        serde_json::from_str(&response.body).expect("JSON")
    }

    /// SIGTERM, then a bounded wait for exit status 0.
    /// SIGKILL: no release, no checkpoint.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes with its lease.
    pub fn pause(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args(["-STOP", &pid]).status().is_ok_and(|s| s.success()), "SIGSTOP delivered");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args(["-CONT", &pid]).status().is_ok_and(|s| s.success()), "SIGCONT delivered");
    }

    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let signalled = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(signalled.is_ok_and(|s| s.success()), "SIGTERM delivered");
        let (sender, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(child.wait());
        });
        let status = exited.recv_timeout(NODE_DEADLINE).expect("the gateway exits after SIGTERM").expect("wait");
        assert!(status.success(), "a stopped gateway exits 0, got {status}");
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `edgebus gateway ARGS`, which must fail; answers its stderr.
fn gateway_fails(args: &[&str]) -> String {
    let (status, stderr) = crate::node::run_expecting_exit(gateway_command(args), &format!("edgebus gateway {args:?}"));
    assert!(!status.success(), "edgebus gateway {args:?} must fail: {status}; stderr: {stderr}");
    stderr
}

/// `edgebus gateway` arguments for gateway `name` of site `site` against `node`.
pub fn gateway_args<'a>(
    name: &'a str,
    site: &'a str,
    node: &'a str,
    config: &'a str,
    lease_ms: &'a str,
) -> Vec<&'a str> {
    vec![
        "--name",
        name,
        "--site",
        site,
        "--node",
        node,
        "--wan-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--lease-ms",
        lease_ms,
        "--config",
        config,
    ]
}

/// A config file with the scenarios' `[gateway]` timing, in `dir`.
fn timing_config(dir: &std::path::Path) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, format!("[gateway]\n{GATEWAY_TIMING}")).expect("write the config file");
    path.to_str().expect("a UTF-8 path").to_owned()
}

#[test]
fn gateway_process_carries_a_site_both_ways() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let us_node = plain_node(&dir.path().join("us"), "127.0.0.1:0");
    let config = timing_config(dir.path());
    let node = us_node.grpc.to_string();
    let us_gateway = GatewayProcess::start(&gateway_args("gw-us", "us", &node, &config, "1000"));
    let eu = Site::start(
        "eu",
        &format!(
            "[gateway]\n{GATEWAY_TIMING}[[gateway.routes]]\nname = \"to-us\"\nremote_site = \"us\"\naddresses = [\"{}\"]\n",
            us_gateway.wan
        ),
    );
    // The route back is carried by the external gateway, set at runtime
    // through its own HTTP API.
    let response = http_request(
        us_gateway.http,
        "POST",
        "/v1/routes",
        &[],
        route_def("to-eu", "eu", eu.wan).to_string().as_bytes(),
    );
    assert_eq!(response.status, 201, "{}", response.body);

    sites::publish(&rt, &eu, &streams("orders", "eu", 3), 40, 10);
    let us_uri = format!("http://{}", us_node.grpc);
    rt.block_on(async {
        let client = Client::connect(&us_uri).await.expect("connect to us");
        for (i, stream) in streams("orders", "us", 3).iter().enumerate() {
            let events = (0..40).map(|n| sites::event(stream, n + i as u64)).collect();
            client.append(StreamName::new(stream).unwrap(), ExpectedVersion::Any, events).await.expect("append at us");
        }
    });

    // eu → us: written through the external gateway's receiver into the node.
    let eu_home = snapshot(&rt, &eu.grpc_uri());
    let from_eu = Flow { home: "eu", via: "eu", rule: &|_| sites::Expect::Replicate };
    let checked = wait_until("eu's events at us", || check_flow(&eu_home, &snapshot(&rt, &us_uri), &from_eu));
    assert_eq!(checked, 3 * 40);
    // us → eu: read from the node's log by the external gateway's route.
    let us_home = snapshot(&rt, &us_uri);
    let from_us = Flow { home: "us", via: "us", rule: &|_| sites::Expect::Replicate };
    let checked = wait_until("us's events at eu", || check_flow(&us_home, &snapshot(&rt, &eu.grpc_uri()), &from_us));
    assert_eq!(checked, 3 * 40);

    // The external gateway is the one that did it, holding the lease.
    let stats = us_gateway.get_json("/v1/stats");
    assert_eq!(stats["lease"]["role"], "active", "{stats}");
    assert_eq!(stats["lease"]["gateway"], "gw-us", "{stats}");
    let inbound = stats["gateway"]["inbound"].as_array().expect("inbound").iter().find(|s| s["site"] == "eu").cloned();
    assert_eq!(inbound.expect("links from eu")["events_written"], 3 * 40, "{stats}");
    let routes = us_gateway.get_json("/v1/routes");
    assert_eq!(routes["routes"][0]["route"], "to-eu", "{routes}");
    assert_eq!(us_gateway.get_json("/v1/policies")["policies"], serde_json::json!([]));
    let metrics = http_request(us_gateway.http, "GET", "/metrics", &[], b"").body;
    for family in [
        "edgebus_route_up{",
        "edgebus_gateway_lease_active{gateway=\"gw-us\",site=\"us\"} 1",
        "edgebus_process_resident_memory_bytes{",
    ] {
        assert!(metrics.contains(family), "{family} in {metrics}");
    }
    let ready = http_request(us_gateway.http, "GET", "/readyz", &[], b"");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    us_gateway.stop();
    drop(eu);
    us_node.stop();
}

#[test]
fn gateway_process_refuses_a_second_gateway_of_the_same_name_and_a_standby_takes_over() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let node = plain_node(&dir.path().join("us"), "127.0.0.1:0");
    let config = timing_config(dir.path());
    let address = node.grpc.to_string();
    let primary = GatewayProcess::start(&gateway_args("gw-us", "us", &address, &config, "500"));

    let stderr = gateway_fails(&gateway_args("gw-us", "us", &address, &config, "500"));
    assert!(stderr.contains("a gateway named gw-us is already running for site us (instance "), "{stderr}");
    assert!(stderr.contains(" ms ago); choose another --name or stop it first"), "{stderr}");

    // Under another name it starts, as the standby; stopping the primary
    // releases the lease, which the standby takes.
    let standby = GatewayProcess::start(&gateway_args("gw-us-backup", "us", &address, &config, "500"));
    assert_eq!(primary.get_json("/v1/stats")["lease"]["role"], "active");
    assert_eq!(standby.get_json("/v1/stats")["lease"]["role"], "standby");
    primary.stop();
    let lease = wait_until("the standby takes over", || {
        let lease = standby.get_json("/v1/stats")["lease"].clone();
        if lease["role"] == "active" { Ok(lease) } else { Err(lease.to_string()) }
    });
    assert!(lease["term"].as_u64().expect("a term") >= 2, "{lease}");
    standby.stop();
    node.stop();
}

#[test]
fn gateway_process_without_its_node_fails_naming_the_address() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = timing_config(dir.path());
    // A port nothing listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("an address");
    let address = closed.to_string();
    let stderr = gateway_fails(&gateway_args("gw-us", "us", &address, &config, "500"));
    assert!(stderr.contains(&format!("cannot reach the site node at {address}")), "{stderr}");
}
