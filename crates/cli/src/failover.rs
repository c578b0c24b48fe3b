//! `edgebus gateways` and `edgebus failover`: who holds a site's gateway
//! lease, and the operator's drill that moves it, over the node's HTTP API
//! (`/v1/gateways`, `/v1/gateways/{name}/failover`).

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::Value;

use crate::client_cmds::aligned;
use crate::routes::{HttpArgs, expect, request};

/// `edgebus gateways`.
#[derive(Debug, Clone, Args)]
pub struct GatewaysArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub http: HttpArgs,
}

/// `edgebus failover`.
#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// The active gateway to take the lease from (e.g. gw-us).
    pub gateway: String,
    /// How long to wait for a standby to take over, in milliseconds
    /// [default: three leases].
    #[arg(long, value_name = "MS")]
    pub wait_ms: Option<u64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub http: HttpArgs,
}

/// Runs `edgebus gateways`.
pub fn gateways(args: &GatewaysArgs) -> anyhow::Result<()> {
    let body = expect(request(&args.http.http, "GET", "/v1/gateways", None)?, "listing the gateways")?;
    if args.http.json {
        println!("{body}");
    } else {
        print!("{}", gateways_text(&body, now_ms()));
    }
    Ok(())
}

fn now_ms() -> u64 {
    edgebus_gateway::metrics::now_ms()
}

fn ago(now: u64, then: u64) -> String {
    let ms = now.saturating_sub(then);
    if ms < 10_000 { format!("{ms} ms ago") } else { format!("{} s ago", ms / 1000) }
}

/// The lease line and one row per gateway.
fn gateways_text(body: &Value, now: u64) -> String {
    let lease = &body["lease"];
    let mut out = match lease.get("holder").filter(|h| !h.is_null()) {
        Some(h) => format!(
            "lease: held by {} under term {} since {} (renewed {}), lease {} ms\n",
            h["gateway"].as_str().unwrap_or("?"),
            h["term"],
            ago(now, h["since_ms"].as_u64().unwrap_or(0)),
            ago(now, h["renewed_ms"].as_u64().unwrap_or(0)),
            h["lease_ms"],
        ),
        None => match lease.get("released").filter(|r| !r.is_null()) {
            Some(r) => format!(
                "lease: free (term {} of {} released by {}: {})\n",
                r["term"],
                r["gateway"].as_str().unwrap_or("?"),
                r["by"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or("?")
            ),
            None => "lease: no gateway has taken it yet\n".to_owned(),
        },
    };
    let gateways = body["gateways"].as_array().cloned().unwrap_or_default();
    if gateways.is_empty() {
        out.push_str("no gateway has said it is alive at this site\n");
        return out;
    }
    let mut rows = vec![["GATEWAY", "ROLE", "TERM", "LAST SEEN", "WAN", "HTTP"].map(String::from)];
    for g in &gateways {
        let alive = g["alive"].as_bool().unwrap_or(false);
        let role = g["role"].as_str().unwrap_or("?");
        rows.push([
            g["gateway"].as_str().unwrap_or("?").to_owned(),
            if alive { role.to_owned() } else { format!("{role} (silent)") },
            match g["term"].as_u64() {
                Some(0) | None => "-".to_owned(),
                Some(t) => t.to_string(),
            },
            ago(now, g["last_seen_ms"].as_u64().unwrap_or(0)),
            g["wan"].as_str().unwrap_or("").to_owned(),
            g["http"].as_str().unwrap_or("").to_owned(),
        ]);
    }
    out.push_str(&aligned(&rows));
    out
}

/// Runs `edgebus failover`: the drill, then one line (or object) saying
/// which gateway took over.
pub fn failover(args: &FailoverArgs) -> anyhow::Result<()> {
    let takeover = drill(&args.http.http, &args.gateway, args.wait_ms)?;
    if args.http.json {
        println!(
            "{}",
            serde_json::json!({ "down": takeover.down, "via": takeover.via, "term": takeover.term, "took_ms": takeover.took_ms })
        );
    } else {
        println!("{}", takeover.line());
    }
    Ok(())
}

/// What a drill did: the gateway that gave the lease up, the one that holds
/// it now, under which term, and how long the handover took.
#[derive(Debug, Clone)]
pub(crate) struct Takeover {
    pub(crate) down: String,
    pub(crate) via: String,
    pub(crate) term: Value,
    pub(crate) took_ms: u128,
}

impl Takeover {
    /// `gateway gw-us down; traffic rerouted via gw-us-backup`.
    pub(crate) fn line(&self) -> String {
        format!("gateway {} down; traffic rerouted via {}", self.down, self.via)
    }
}

/// The failover drill against the node whose HTTP API is at `http`:
/// releases the lease `name` holds, then waits (`wait_ms`, by default three
/// of its leases) until another gateway holds it.
pub(crate) fn drill(http: &str, name: &str, wait_ms: Option<u64>) -> anyhow::Result<Takeover> {
    let path = format!("/v1/gateways/{name}/failover");
    expect(request(http, "POST", &path, None)?, &format!("the failover of {name}"))?;
    let lease_ms = lease_of(http, name).unwrap_or(edgebus_gateway::lease::LEASE_MS_DEFAULT);
    let wait = Duration::from_millis(wait_ms.unwrap_or(3 * lease_ms));
    let started = Instant::now();
    loop {
        let body = expect(request(http, "GET", "/v1/gateways", None)?, "reading the lease")?;
        if let Some(holder) = body["lease"]["holder"].as_object() {
            let gateway = holder.get("gateway").and_then(Value::as_str).unwrap_or("?");
            if gateway != name {
                return Ok(Takeover {
                    down: name.to_owned(),
                    via: gateway.to_owned(),
                    term: holder.get("term").cloned().unwrap_or(Value::Null),
                    took_ms: started.elapsed().as_millis(),
                });
            }
        }
        if started.elapsed() >= wait {
            let standbys: Vec<String> = body["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["gateway"].as_str() != Some(name) && g["alive"].as_bool() == Some(true))
                .filter_map(|g| g["gateway"].as_str().map(str::to_owned))
                .collect();
            let hint = if standbys.is_empty() {
                "no standby gateway is alive at this site: start one with `edgebus gateway --name NAME --node ADDR`"
                    .to_owned()
            } else {
                format!("live standbys: {}; see their logs", standbys.join(", "))
            };
            bail!(
                "gateway {name} released the lease, but no other gateway took it within {} ms ({hint})",
                wait.as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lease length `gateway` announced.
fn lease_of(http: &str, gateway: &str) -> Option<u64> {
    let body = expect(request(http, "GET", "/v1/gateways", None).ok()?, "reading the gateways").ok()?;
    body["gateways"].as_array()?.iter().find(|g| g["gateway"].as_str() == Some(gateway))?["lease_ms"].as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_table_names_the_holder_and_every_gateway() {
        let body = serde_json::json!({
            "lease": {"holder": {"gateway": "gw-us", "term": 3, "since_ms": 1_000, "renewed_ms": 9_500, "lease_ms": 3000},
                      "term": 3, "version": 40, "released": null},
            "gateways": [
                {"gateway": "gw-us", "role": "active", "term": 3, "last_seen_ms": 9_000, "alive": true,
                 "wan": "127.0.0.1:7292", "http": "127.0.0.1:7391"},
                {"gateway": "gw-us-backup", "role": "standby", "term": 0, "last_seen_ms": 1_000, "alive": false,
                 "wan": "127.0.0.1:7293", "http": ""},
            ]
        });
        let text = gateways_text(&body, 10_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "lease: held by gw-us under term 3 since 9000 ms ago (renewed 500 ms ago), lease 3000 ms");
        assert!(lines[1].starts_with("GATEWAY"), "{text}");
        assert!(lines[2].starts_with("gw-us ") && lines[2].contains("active") && lines[2].contains(" 3 "), "{text}");
        assert!(lines[3].contains("standby (silent)") && lines[3].contains("9000 ms ago"), "{text}");
    }

    #[test]
    fn a_free_lease_says_who_released_it() {
        let body = serde_json::json!({
            "lease": {"holder": null, "term": 2, "version": 5,
                      "released": {"gateway": "gw-us", "term": 2, "by": "operator", "reason": "operator failover drill"}},
            "gateways": []
        });
        let text = gateways_text(&body, 0);
        assert!(text.starts_with("lease: free (term 2 of gw-us released by operator: operator failover drill)"));
        assert!(text.contains("no gateway has said it is alive"));
    }
}
