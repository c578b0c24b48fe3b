//! The gateway lease of a site with one embedded gateway: who holds it
//! (`edgebus gateways`), the failover drill's refusals (`edgebus failover`
//! naming an unknown gateway, or with no standby to take over), and the
//! holder taking its lease back under a new term when nobody else does.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::sites::{Site, wait_until};

fn edgebus(args: &[&str]) -> Output {
    // No log opens in this process while the child forks (see `guarded`).
    let _starting = edgebus_tests::guarded::starting_child();
    Command::new(env!("CARGO_BIN_EXE_edgebus-node"))
        .args(args)
        .env_remove("EDGEBUS_HTTP")
        .stdin(Stdio::null())
        .output()
        .expect("run edgebus")
}

fn gateways(site: &Site) -> Value {
    let output = edgebus(&["gateways", "--json", "--http", &site.http.to_string()]);
    assert!(output.status.success(), "gateways failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("gateways --json prints JSON")
}

fn holder(site: &Site) -> Result<(String, u64), String> {
    let body = gateways(site);
    let holder = &body["lease"]["holder"];
    match (holder["gateway"].as_str(), holder["term"].as_u64()) {
        (Some(g), Some(t)) => Ok((g.to_owned(), t)),
        _ => Err(format!("no holder: {body}")),
    }
}

#[test]
fn an_embedded_gateway_holds_the_lease_and_the_drill_says_what_went_wrong() {
    let site = Site::start("us", "[gateway]\nlease_ms = 300\n");
    let http = site.http.to_string();
    assert_eq!(holder(&site), Ok(("gw-us".to_owned(), 1)), "the first gateway takes the free lease");
    let listed = edgebus(&["gateways", "--http", &http]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.starts_with("lease: held by gw-us under term 1"), "{text}");
    wait_until("gw-us says it is alive", || {
        let body = gateways(&site);
        let listed = body["gateways"].as_array().cloned().unwrap_or_default();
        listed
            .iter()
            .find(|g| g["gateway"] == "gw-us" && g["role"] == "active" && g["alive"] == true)
            .cloned()
            .ok_or_else(|| body.to_string())
    });

    let unknown = edgebus(&["failover", "gw-nope", "--http", &http]);
    assert!(!unknown.status.success());
    let message = String::from_utf8_lossy(&unknown.stderr);
    assert!(message.contains("no gateway named gw-nope is known at this site (known gateways: gw-us)"), "{message}");
    assert_eq!(holder(&site), Ok(("gw-us".to_owned(), 1)), "a refused drill changes nothing");

    let alone = edgebus(&["failover", "gw-us", "--wait-ms", "200", "--http", &http]);
    assert!(!alone.status.success(), "no standby can take over");
    let message = String::from_utf8_lossy(&alone.stderr);
    assert!(message.contains("no other gateway took it within 200 ms"), "{message}");
    assert!(message.contains("no standby gateway is alive"), "{message}");

    // Nobody else wants it: the released holder takes it back, under a new term.
    let (gateway, term) = wait_until("gw-us holds the lease again", || match holder(&site) {
        Ok((g, t)) if t > 1 => Ok((g, t)),
        other => Err(format!("{other:?}")),
    });
    assert_eq!((gateway.as_str(), term), ("gw-us", 2));
    let again = edgebus(&["failover", "gw-us-backup", "--http", &http]);
    assert!(!again.status.success());
}
