//! Failover between gateway processes of one site during burst traffic
//! (issue 8): site `us` runs its node and three gateway processes against
//! it, whose route goes to site `eu`. While a publisher bursts at `us`:
//! the operator's drill moves the lease; the new holder is frozen with
//! SIGSTOP, so the two standbys race for the lapsed lease and one takes it;
//! the frozen one is thawed and finds itself deposed (it turns standby and
//! sends nothing); then the holder is killed with SIGKILL and another takes
//! over. The history checker then finds every event of `us` at `eu` exactly
//! once, in per-stream order.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::gateway_process::{GatewayProcess, gateway_args, plain_node};
use crate::sites::{Flow, GATEWAY_TIMING, Publisher, Site, await_flows, runtime, snapshot, streams, wait_until};

const LEASE_MS: &str = "600";
const NAMES: [&str; 3] = ["gw-us", "gw-us-backup", "gw-us-spare"];

/// The lease holder and its term, as the `us` node's log says.
fn holder(node_http: std::net::SocketAddr) -> Result<(String, u64), String> {
    let response = crate::node::http_request(node_http, "GET", "/v1/gateways", &[], b"");
    let body: Value = serde_json::from_str(&response.body).map_err(|e| e.to_string())?;
    let holder = &body["lease"]["holder"];
    match (holder["gateway"].as_str(), holder["term"].as_u64()) {
        (Some(g), Some(t)) => Ok((g.to_owned(), t)),
        _ => Err(body.to_string()),
    }
}

fn role(gateway: &GatewayProcess) -> String {
    gateway.get_json("/v1/stats")["lease"]["role"].as_str().unwrap_or("?").to_owned()
}

#[test]
fn gateway_failover_during_a_burst_loses_and_duplicates_nothing_and_a_frozen_holder_never_sends_again() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let eu = Site::start("eu", &format!("[gateway]\n{GATEWAY_TIMING}"));
    let us = plain_node(&dir.path().join("us"), "127.0.0.1:0");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\n{GATEWAY_TIMING}\n[[gateway.routes]]\nname = \"to-eu\"\nremote_site = \"eu\"\naddresses = [\"{}\"]\n",
            eu.wan
        ),
    )
    .expect("write the config file");
    let (config, node) = (config.to_str().expect("a UTF-8 path").to_owned(), us.grpc.to_string());
    let mut gateways: Vec<Option<GatewayProcess>> = Vec::new();
    for name in NAMES {
        gateways.push(Some(GatewayProcess::start(&gateway_args(name, "us", &node, &config, LEASE_MS))));
        if name == "gw-us" {
            wait_until("gw-us holds the lease", || match holder(us.http) {
                Ok((g, t)) if g == "gw-us" => Ok(t),
                other => Err(format!("{other:?}")),
            });
        }
    }
    let index = |name: &str| NAMES.iter().position(|n| *n == name).expect("one of ours");
    let us_uri = format!("http://{}", us.grpc);
    let publisher = Publisher::start(&rt, &us_uri, streams("orders", "us", 6), 2_000, 10, Duration::from_millis(3));
    wait_until("the burst is under way", || {
        if publisher.acknowledged() > 500 { Ok(()) } else { Err(publisher.acknowledged().to_string()) }
    });

    // 1. The operator's drill.
    let starting = edgebus_tests::guarded::starting_child();
    let drill = Command::new(env!("CARGO_BIN_EXE_edgebus-node"))
        .args(["failover", "gw-us", "--http", &us.http.to_string()])
        .env_remove("EDGEBUS_HTTP")
        .stdin(Stdio::null())
        .output()
        .expect("run edgebus failover");
    drop(starting);
    let said = String::from_utf8_lossy(&drill.stdout).trim().to_owned();
    assert!(drill.status.success(), "the drill: {said} {}", String::from_utf8_lossy(&drill.stderr));
    let (second, term) = holder(us.http).expect("a holder after the drill");
    assert_eq!(said, format!("gateway gw-us down; traffic rerouted via {second}"));
    assert_ne!(second, "gw-us");
    assert!(term >= 2, "a new term: {term}");

    // 2. The new holder freezes with its lease: the two others race for it
    // once it lapses, and one wins.
    let frozen = gateways[index(&second)].take().expect("running");
    frozen.pause();
    let (third, third_term) = wait_until("a standby takes the frozen holder's lease", || match holder(us.http) {
        Ok((g, t)) if g != second => Ok((g, t)),
        other => Err(format!("{other:?}")),
    });
    assert!(third_term > term, "{third_term} after {term}");
    let live: Vec<String> =
        NAMES.iter().filter(|n| **n != second).filter_map(|n| gateways[index(n)].as_ref().map(role)).collect();
    assert_eq!(live.iter().filter(|r| *r == "active").count(), 1, "one winner of the race: {live:?}");

    // 3. Thawed, the old holder finds itself deposed: it stops its routes
    // and turns standby without sending another frame.
    frozen.resume();
    wait_until("the thawed gateway is standby", || {
        let stats = frozen.get_json("/v1/stats");
        let routes = stats["gateway"]["routes"].as_array().map_or(0, Vec::len);
        if stats["lease"]["role"] == "standby" && routes == 0 { Ok(()) } else { Err(stats["lease"].to_string()) }
    });
    let metrics = crate::node::http_request(frozen.http, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains(&format!("edgebus_gateway_failovers_total{{gateway=\"{second}\"}} 1")),
        "the deposed gateway counts its failover: {metrics}"
    );
    assert_eq!(holder(us.http).map(|(g, _)| g), Ok(third.clone()), "the lease stays with {third}");
    gateways[index(&second)] = Some(frozen);

    // 4. The holder is killed; another takes over.
    gateways[index(&third)].take().expect("running").kill();
    let (fourth, _) = wait_until("a standby takes over from the killed holder", || match holder(us.http) {
        Ok((g, t)) if g != third => Ok((g, t)),
        other => Err(format!("{other:?}")),
    });
    assert_ne!(fourth, third);

    // Everything published at us is at eu exactly once, in order.
    let published = publisher.finish(&rt).expect("the publisher");
    assert_eq!(published, 6 * 2_000);
    let home = snapshot(&rt, &us_uri);
    let flow = Flow { home: "us", via: "us", rule: &|_| crate::sites::Expect::Replicate };
    let (_, counts) = await_flows(&rt, &eu, &[(&home, flow)]);
    assert_eq!(counts, vec![6 * 2_000]);
    for gateway in gateways.into_iter().flatten() {
        gateway.stop();
    }
    us.stop();
}

/// A route knows every inbound gateway of its remote site: site `eu` runs
/// two gateway processes (the standby receives too), and when the one the
/// route is linked to is killed mid-burst, the route moves to the other
/// address and everything arrives exactly once.
#[test]
fn gateway_failover_a_route_moves_to_the_remote_sites_other_gateway() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let eu = plain_node(&dir.path().join("eu"), "127.0.0.1:0");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, format!("[gateway]\n{GATEWAY_TIMING}")).expect("write the config file");
    let (config, node) = (config.to_str().expect("a UTF-8 path").to_owned(), eu.grpc.to_string());
    let first = GatewayProcess::start(&gateway_args("gw-eu", "eu", &node, &config, LEASE_MS));
    let second = GatewayProcess::start(&gateway_args("gw-eu-backup", "eu", &node, &config, LEASE_MS));
    let us = Site::start(
        "us",
        &format!(
            "[gateway]\n{GATEWAY_TIMING}\n[[gateway.routes]]\nname = \"to-eu\"\nremote_site = \"eu\"\naddresses = [\"{}\", \"{}\"]\n",
            first.wan, second.wan
        ),
    );
    let publisher =
        Publisher::start(&rt, &us.grpc_uri(), streams("orders", "us", 4), 1_500, 10, Duration::from_millis(2));
    let linked = |gateway: &GatewayProcess| {
        let stats = gateway.get_json("/v1/stats");
        stats["gateway"]["inbound"]
            .as_array()
            .and_then(|sites| sites.iter().find(|s| s["site"] == "us"))
            .map_or(0, |s| s["events_written"].as_u64().unwrap_or(0))
    };
    wait_until("the route delivers through gw-eu", || {
        let written = linked(&first);
        if written > 300 { Ok(()) } else { Err(written.to_string()) }
    });
    first.kill();
    wait_until("the route delivers through gw-eu-backup", || {
        let written = linked(&second);
        if written > 0 { Ok(()) } else { Err(written.to_string()) }
    });
    let published = publisher.finish(&rt).expect("the publisher");
    assert_eq!(published, 4 * 1_500);
    let home = snapshot(&rt, &us.grpc_uri());
    let eu_uri = format!("http://{}", eu.grpc);
    let flow = Flow { home: "us", via: "us", rule: &|_| crate::sites::Expect::Replicate };
    let checked = wait_until("everything at eu", || crate::sites::check_flow(&home, &snapshot(&rt, &eu_uri), &flow));
    assert_eq!(checked, 4 * 1_500);
    second.stop();
    eu.stop();
}
