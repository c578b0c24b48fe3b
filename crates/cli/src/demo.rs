//! `edgebus demo`: the golden path in one command (issue 8).
//!
//! Two sites on loopback, every process a child of this one: `eu` (`edgebus
//! serve --site eu --gateway`, the receiving side) and `us` (`edgebus serve
//! --site us`, where the producers write) with two gateway processes,
//! `gw-us` and `gw-us-backup` (`edgebus gateway`), sharing one config file:
//! a route to `eu` whose only address is the WAN link emulator (in this
//! process) in front of `eu`'s WAN listener, lanes `critical` (a reserved
//! share of the window) and `bulk` (a cap on its bytes in flight), and the
//! policies `alerts.>` replicate in `critical`, `telemetry.>` `sample 1/10`
//! in `bulk`.
//!
//! Producers at `us` write alerts at a steady low rate (each carrying its
//! send time) and telemetry at a rate whose sampled tenth is more than the
//! link carries, so the bulk lane's backlog grows in the log while the
//! route's queue stays within its window and its lanes wait on their
//! credit (`backpressure=throttled`). A subscriber at `eu` notes when each
//! alert arrives. Once a second a stats line; halfway, the operator's
//! failover drill; at the end, a verdict computed from the streams at both
//! sites, one line per check, and a non-zero exit if any fails.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use edgebus_client::{Client, RetryPolicy};
use edgebus_gateway::health;
use edgebus_gateway::sender::LANE_READ_AHEAD_EVENTS_MAX;
use edgebus_proto::convert::SubscribeFrom;
use edgebus_testkit::{Link, LinkConfig};
use edgebus_types::{EventId, ExpectedVersion, StreamName};
use serde_json::{Value, json};

use crate::bench::wan::quantile;
use crate::sites::{
    Gateway, Node, await_condition, event, holder, http, read_all, standing_by, start_gateway, start_node, subscribe,
};

/// Arguments of `edgebus demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// A short run (about 15 s) instead of about a minute.
    #[arg(long)]
    pub quick: bool,
    /// Directory to create the scratch directory in (default: ./target if it exists, else $TMPDIR).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Print the verdict as one JSON object on stdout (the running commentary goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The WAN link between the sites: bandwidth each way.
const LINK_BANDWIDTH_BPS: u64 = 1_000_000;
/// The WAN link's round-trip time (half of it each way).
const LINK_RTT_MS: u64 = 40;
/// The `us` gateways' lease.
const LEASE_MS: u64 = 1_000;
/// Link heartbeat of the gateways, and the silence after which a link is dead.
const HEARTBEAT_MS: u64 = 50;
const DEAD_AFTER_MS: u64 = 1_000;
/// The route's largest window in events; with the lanes' read-ahead it
/// bounds the route's queue (see [`route_queue_bound`]).
const ROUTE_WINDOW_EVENTS: u64 = 4_096;
/// Number of lanes of the route (`critical`, `bulk`).
const ROUTE_LANES: u64 = 2;
/// The critical lane's reserved share of the window.
const CRITICAL_RESERVED_PERMILLE: u32 = 200;
/// Most bytes the bulk lane has in flight: what an alert can find queued
/// ahead of it on the link.
const BULK_CAP_BYTES: u64 = 16 * 1024;
/// Alerts: one event per append, round robin over these streams.
const ALERT_STREAMS: [&str; 4] = ["alerts.us.fire", "alerts.us.intrusion", "alerts.us.power", "alerts.us.cooling"];
const ALERTS_PER_SEC: u32 = 20;
/// Telemetry: each of this many streams gets a batch every tick.
const TELEMETRY_STREAMS: usize = 8;
const TELEMETRY_TICK: Duration = Duration::from_millis(50);
const TELEMETRY_BATCH_EVENTS: u64 = 15;
/// Bytes of padding in each telemetry event's JSON payload (about 1 KiB in all).
const TELEMETRY_PAD_BYTES: usize = 960;
/// The sampling rule for `telemetry.>`: 1 in N, by stream version.
const TELEMETRY_SAMPLE_EVERY: u64 = 10;
/// Alert latency p99 outside the failover window must stay within this:
/// the RTT (40 ms) plus a full bulk cap queued ahead on the link (16 KiB at
/// 1 Mbit/s: 131 ms), with room for the writes at `eu` and a busy machine.
const ALERT_P99_BOUND_MS: f64 = 500.0;
/// How long the alerts still in flight at the end may take to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the gateways may take to take the lease, stand by, connect.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the producers run, and when the drill comes.
#[derive(Debug, Clone, Copy)]
struct Plan {
    run: Duration,
    drill_at: Duration,
}

const PLAN_QUICK: Plan = Plan { run: Duration::from_secs(10), drill_at: Duration::from_secs(5) };
const PLAN_FULL: Plan = Plan { run: Duration::from_secs(50), drill_at: Duration::from_secs(25) };

/// Most events the route holds in memory: each lane's read-ahead (at most
/// [`LANE_READ_AHEAD_EVENTS_MAX`], at most the window) plus what is in
/// flight (at most the window).
fn route_queue_bound() -> u64 {
    ROUTE_LANES * ROUTE_WINDOW_EVENTS.min(LANE_READ_AHEAD_EVENTS_MAX) + ROUTE_WINDOW_EVENTS
}

/// A failover gap meets the target if within a lease plus two round trips.
fn failover_bound_ms() -> f64 {
    (LEASE_MS + 2 * LINK_RTT_MS) as f64
}

/// Where the commentary goes: stdout, or stderr when stdout carries the JSON verdict.
#[derive(Debug, Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    fn line(self, text: std::fmt::Arguments<'_>) {
        use std::io::Write as _;
        // A closed terminal is no reason to stop the demo halfway.
        if self.json {
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        } else {
            let _ = writeln!(std::io::stdout().lock(), "{text}");
        }
    }
}

/// Runs `edgebus demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let scratch = crate::bench::scratch_dir(args.dir.as_deref(), "edgebus-demo-")?;
    let dir = scratch.path().canonicalize().context("cannot resolve the scratch directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-demo")
        .build()
        .context("cannot start the async runtime")?;
    let plan = if args.quick { PLAN_QUICK } else { PLAN_FULL };
    let out = Out { json: args.json };
    let started = Instant::now();
    let observed = runtime.block_on(demo(plan, &dir, out));
    runtime.shutdown_timeout(Duration::from_secs(10));
    scratch.close().with_context(|| format!("cannot remove the scratch directory {}", dir.display()))?;
    let observed = observed?;
    let checks = verdict(&observed);
    let elapsed_s = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", verdict_json(&observed, &checks, elapsed_s));
    } else {
        println!();
        println!("verdict ({elapsed_s:.0} s in all):");
        for check in &checks {
            println!("{} {}: {}", if check.pass { "PASS" } else { "FAIL" }, check.name, check.figures);
        }
    }
    let failed: Vec<&str> = checks.iter().filter(|c| !c.pass).map(|c| c.name).collect();
    if !failed.is_empty() {
        anyhow::bail!("the demo failed {} of {} checks: {}", failed.len(), checks.len(), failed.join("; "));
    }
    Ok(())
}

/// What the run produced, for the verdict.
#[derive(Debug, Clone, Default)]
struct Observed {
    /// Alerts the producer had acknowledged.
    alerts_produced: u64,
    /// Ids in the alert streams at `us` and at `eu`.
    alerts_at_us: Vec<EventId>,
    alerts_at_eu: Vec<EventId>,
    /// Telemetry the producers had acknowledged.
    telemetry_published: u64,
    /// `(id, version)` of every telemetry event at `us`.
    telemetry_at_us: Vec<(EventId, u64)>,
    /// `(id, origin note)` of every telemetry event at `eu`.
    telemetry_at_eu: Vec<(EventId, String)>,
    /// The route's queue (`wan_queue`): the most seen, and the samples.
    wan_queue_max: u64,
    local_queue_max: u64,
    samples: u64,
    throttled_samples: u64,
    /// Drill → arrival at `eu` of the first alert sent after the standby
    /// took the lease (see [`Drill`]).
    failover_gap_ms: Option<f64>,
    /// Drill → the standby seen holding the lease.
    failover_takeover_ms: Option<f64>,
    /// Who took over.
    failover_via: Option<String>,
    /// Latencies (send → `eu` subscriber) of the alerts sent outside the
    /// failover window, and how many were left out as inside it.
    alert_latencies_ms: Vec<f64>,
    alerts_in_failover_window: u64,
}

/// One line of the verdict.
#[derive(Debug, Clone)]
struct Check {
    name: &'static str,
    pass: bool,
    figures: String,
}

/// The checks, from what was observed.
fn verdict(o: &Observed) -> Vec<Check> {
    let mut checks = Vec::new();

    let at_us: HashSet<EventId> = o.alerts_at_us.iter().copied().collect();
    let at_eu: HashSet<EventId> = o.alerts_at_eu.iter().copied().collect();
    let missing = at_us.difference(&at_eu).count();
    let foreign = at_eu.difference(&at_us).count();
    checks.push(Check {
        name: "alerts sent = alerts received",
        pass: o.alerts_produced > 0 && o.alerts_produced == o.alerts_at_us.len() as u64 && missing == 0 && foreign == 0,
        figures: format!(
            "{} sent, {} stored at us, {} at eu ({missing} missing, {foreign} unknown)",
            o.alerts_produced,
            o.alerts_at_us.len(),
            at_eu.len()
        ),
    });

    let alert_dups = o.alerts_at_eu.len() - at_eu.len();
    let telemetry_ids: HashSet<EventId> = o.telemetry_at_eu.iter().map(|(id, _)| *id).collect();
    let telemetry_dups = o.telemetry_at_eu.len() - telemetry_ids.len();
    checks.push(Check {
        name: "no duplicates",
        pass: alert_dups == 0 && telemetry_dups == 0,
        figures: format!(
            "{} alert ids at eu, {alert_dups} twice; {} telemetry ids at eu, {telemetry_dups} twice",
            o.alerts_at_eu.len(),
            o.telemetry_at_eu.len()
        ),
    });

    let kept: HashSet<EventId> = o
        .telemetry_at_us
        .iter()
        .filter(|(_, version)| version.is_multiple_of(TELEMETRY_SAMPLE_EVERY))
        .map(|(id, _)| *id)
        .collect();
    let note = format!("sampled 1/{TELEMETRY_SAMPLE_EVERY}");
    let not_kept = o.telemetry_at_eu.iter().filter(|(id, _)| !kept.contains(id)).count();
    let not_noted = o.telemetry_at_eu.iter().filter(|(_, n)| !n.starts_with(&note)).count();
    let arrived = o.telemetry_at_eu.len();
    checks.push(Check {
        name: "telemetry sampled as configured",
        pass: arrived > 0 && not_kept == 0 && not_noted == 0 && o.telemetry_published == o.telemetry_at_us.len() as u64,
        figures: format!(
            "{arrived} arrived of {} kept by sample 1/{TELEMETRY_SAMPLE_EVERY} of {} published; \
             {not_kept} not kept by the rule, {not_noted} without the note \"{note}\"",
            kept.len(),
            o.telemetry_published
        ),
    });

    let bound = route_queue_bound();
    checks.push(Check {
        name: "route queue bounded",
        pass: o.samples > 0 && o.wan_queue_max <= bound && o.throttled_samples > 0,
        figures: format!(
            "max wan_queue {} <= {bound} events ({ROUTE_LANES} lanes x {} read ahead + window {ROUTE_WINDOW_EVENTS}); \
             throttled in {} of {} samples; max local_queue {}; backlog left in the log: {} kept telemetry events",
            o.wan_queue_max,
            ROUTE_WINDOW_EVENTS.min(LANE_READ_AHEAD_EVENTS_MAX),
            o.throttled_samples,
            o.samples,
            o.local_queue_max,
            kept.len().saturating_sub(arrived)
        ),
    });

    let target = failover_bound_ms();
    checks.push(Check {
        name: "failover gap",
        pass: o.failover_gap_ms.is_some_and(|gap| gap <= target),
        figures: match (o.failover_gap_ms, &o.failover_via) {
            (Some(gap), via) => format!(
                "{gap:.0} ms from the drill to the arrival at eu of the first alert sent after {} took the lease \
                 (at {}); target <= lease {LEASE_MS} ms + 2 x RTT {LINK_RTT_MS} ms = {target:.0} ms",
                via.as_deref().unwrap_or("?"),
                ms(o.failover_takeover_ms)
            ),
            (None, _) => "no alert sent after the takeover arrived at eu".to_owned(),
        },
    });

    let p99 = quantile(&o.alert_latencies_ms, 0.99);
    checks.push(Check {
        name: "alert latency",
        pass: p99.is_some_and(|p99| p99 <= ALERT_P99_BOUND_MS),
        figures: format!(
            "p99 {} (p50 {}, max {}) over {} alerts outside the failover window ({} inside left out); \
             bound {ALERT_P99_BOUND_MS:.0} ms",
            ms(p99),
            ms(quantile(&o.alert_latencies_ms, 0.5)),
            ms(o.alert_latencies_ms.iter().copied().reduce(f64::max)),
            o.alert_latencies_ms.len(),
            o.alerts_in_failover_window
        ),
    });
    checks
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"))
}

/// The verdict as one JSON object.
fn verdict_json(o: &Observed, checks: &[Check], elapsed_s: f64) -> Value {
    json!({
        "demo": "edgebus",
        "pass": checks.iter().all(|c| c.pass),
        "checks": checks.iter().map(|c| json!({"check": c.name, "pass": c.pass, "figures": c.figures})).collect::<Vec<_>>(),
        "alerts_sent": o.alerts_produced,
        "alerts_at_us": o.alerts_at_us.len(),
        "alerts_at_eu": o.alerts_at_eu.len(),
        "telemetry_published": o.telemetry_published,
        "telemetry_kept": o.telemetry_at_us.iter().filter(|(_, v)| v.is_multiple_of(TELEMETRY_SAMPLE_EVERY)).count(),
        "telemetry_arrived": o.telemetry_at_eu.len(),
        "wan_queue_max": o.wan_queue_max,
        "route_queue_bound": route_queue_bound(),
        "local_queue_max": o.local_queue_max,
        "throttled_samples": o.throttled_samples,
        "samples": o.samples,
        "failover_gap_ms": o.failover_gap_ms,
        "failover_takeover_ms": o.failover_takeover_ms,
        "failover_target_ms": failover_bound_ms(),
        "failover_via": o.failover_via,
        "alert_p50_ms": quantile(&o.alert_latencies_ms, 0.5),
        "alert_p99_ms": quantile(&o.alert_latencies_ms, 0.99),
        "alert_p99_bound_ms": ALERT_P99_BOUND_MS,
        "link": {"bandwidth_bps": LINK_BANDWIDTH_BPS, "rtt_ms": LINK_RTT_MS},
        "lease_ms": LEASE_MS,
        "elapsed_s": elapsed_s,
    })
}

// ---------------------------------------------------------------------------
// The run

/// An alert as it arrived at `eu`: its send and arrival times, in µs since
/// the demo's clock.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    sent_us: u64,
    at_us: u64,
}

impl Arrival {
    fn latency_ms(&self) -> f64 {
        self.at_us.saturating_sub(self.sent_us) as f64 / 1e3
    }
}

fn micros_since(clock: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(clock).as_micros()).unwrap_or(u64::MAX)
}

/// The `us` gateway config: the route to `eu` through `link`, its lanes,
/// and the policies.
fn gateway_config(link: SocketAddr) -> String {
    format!(
        "[gateway]\n\
         lease_ms = {LEASE_MS}\n\
         heartbeat_ms = {HEARTBEAT_MS}\n\
         dead_after_ms = {DEAD_AFTER_MS}\n\
         \n\
         [[gateway.routes]]\n\
         remote_site = \"eu\"\n\
         addresses = [\"{link}\"]\n\
         window_max_events = {ROUTE_WINDOW_EVENTS}\n\
         lanes = [{{ name = \"critical\", reserved_permille = {CRITICAL_RESERVED_PERMILLE} }}, \
                  {{ name = \"bulk\", cap_bytes = {BULK_CAP_BYTES} }}]\n\
         \n\
         [[gateway.policies]]\n\
         pattern = \"alerts.>\"\n\
         action = \"replicate\"\n\
         lane = \"critical\"\n\
         \n\
         [[gateway.policies]]\n\
         pattern = \"telemetry.>\"\n\
         action = \"sample 1/{TELEMETRY_SAMPLE_EVERY}\"\n\
         lane = \"bulk\"\n"
    )
}

/// The sites and gateways, once everything is up.
struct Sites {
    eu: Node,
    us: Node,
    link: Link,
    gateways: Vec<Gateway>,
}

async fn start_sites(dir: &Path) -> anyhow::Result<Sites> {
    let eu = start_node("eu", &dir.join("eu"), true).await?;
    let eu_wan = eu.wan.context("eu runs a gateway")?;
    let config = LinkConfig {
        bandwidth_bps: Some(LINK_BANDWIDTH_BPS),
        latency: Duration::from_millis(LINK_RTT_MS) / 2,
        ..LinkConfig::default()
    };
    let link = Link::start(eu_wan, config).await.context("cannot start the link emulator")?;
    let config_path = dir.join("us-gateways.toml");
    std::fs::write(&config_path, gateway_config(link.addr()))
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let us = start_node("us", &dir.join("us"), false).await?;
    let primary = start_gateway("gw-us", "us", us.grpc, &config_path).await?;
    await_condition("gw-us holds the lease", SETUP_TIMEOUT, || async {
        Ok(holder(us.http).await?.is_some_and(|(name, _)| name == "gw-us"))
    })
    .await?;
    let backup = start_gateway("gw-us-backup", "us", us.grpc, &config_path).await?;
    await_condition("gw-us-backup stands by", SETUP_TIMEOUT, || standing_by(us.http, "gw-us-backup")).await?;
    let sites = Sites { eu, us, link, gateways: vec![primary, backup] };
    // The producers start once the route is connected and both policies are
    // in force, so that every event is decided under them.
    await_condition("the route to eu connects with its policies", SETUP_TIMEOUT, || async {
        let Some(stats) = active_gateway_stats(&sites).await? else { return Ok(false) };
        let policies = stats["gateway"]["policies"].as_array().map_or(0, Vec::len);
        let connected = stats["gateway"]["routes"]
            .as_array()
            .is_some_and(|routes| routes.iter().any(|r| r["remote_site"] == "eu" && r["state"] == "connected"));
        Ok(connected && policies == 2)
    })
    .await?;
    Ok(sites)
}

/// The lease holder's `/v1/stats`, found through the `us` node's
/// `/v1/gateways`; `None` while no gateway holds the lease.
async fn active_gateway_stats(sites: &Sites) -> anyhow::Result<Option<Value>> {
    let Some((name, announced)) = holder(sites.us.http).await? else { return Ok(None) };
    let address = announced.or_else(|| sites.gateways.iter().find(|g| g.name == name).and_then(|g| g.http));
    let Some(address) = address else { return Ok(None) };
    let mut stats = http(address, "GET", "/v1/stats", None).await?;
    stats["active"] = Value::String(name);
    Ok(Some(stats))
}

/// One second's figures.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    local_queue: u64,
    wan_queue: u64,
    dropped: u64,
    backpressure: String,
    active: Option<String>,
}

impl Sample {
    /// From the `us` node's `/v1/stats` and the active gateway's, if any:
    /// the gateway's queue and drops (its `wan_queue` and `dropped`, as a
    /// node reports its embedded gateway's), and the backpressure of the
    /// site, the worse of the node's write queues and the gateway's route
    /// health.
    fn of(node: &Value, gateway: Option<&Value>) -> Self {
        let figure = |key: &str| gateway.and_then(|g| g["gateway"][key].as_u64()).unwrap_or(0);
        let (wan_queue, dropped) = (figure("wan_queue"), figure("dropped"));
        let node_state = node["backpressure"].as_str().unwrap_or("unknown");
        let routes_state = gateway.and_then(|g| g["gateway"]["health"].as_str()).unwrap_or("healthy");
        Self {
            local_queue: node["local_queue"].as_u64().unwrap_or(0),
            wan_queue,
            dropped,
            backpressure: worse(node_state, routes_state).to_owned(),
            active: gateway.and_then(|g| g["active"].as_str()).map(str::to_owned),
        }
    }

    /// `local_queue=N wan_queue=N dropped=N backpressure=STATE`.
    fn summary(&self) -> String {
        format!(
            "local_queue={} wan_queue={} dropped={} backpressure={}",
            self.local_queue, self.wan_queue, self.dropped, self.backpressure
        )
    }
}

/// The worse of two health states (`healthy` < `throttled` < `stalled`);
/// a state this build does not know counts as the worst, so it shows.
fn worse<'a>(a: &'a str, b: &'a str) -> &'a str {
    let rank = |s: &str| health::State::ALL.iter().position(|h| h.as_str() == s).unwrap_or(usize::MAX);
    if rank(b) > rank(a) { b } else { a }
}

async fn sample(sites: &Sites) -> anyhow::Result<Sample> {
    let node = http(sites.us.http, "GET", "/v1/stats", None).await?;
    let gateway = active_gateway_stats(sites).await?;
    Ok(Sample::of(&node, gateway.as_ref()))
}

/// What the producers and the `eu` subscribers share with the main loop.
#[derive(Debug, Default)]
struct Flow {
    stop: AtomicBool,
    alerts_sent: AtomicU64,
    telemetry_sent: AtomicU64,
    telemetry_arrived: AtomicU64,
    arrivals: Mutex<Vec<Arrival>>,
}

async fn produce_alerts(client: Client, flow: Arc<Flow>, clock: Instant) -> anyhow::Result<()> {
    let streams: Vec<StreamName> =
        ALERT_STREAMS.iter().map(|s| StreamName::new(s).expect("a valid stream name")).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / ALERTS_PER_SEC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    while !flow.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let stream = &streams[seq as usize % streams.len()];
        let sent_us = micros_since(clock, Instant::now());
        let data = json!({"alert": seq, "zone": stream.as_str().rsplit('.').next(), "sent_us": sent_us});
        let alert = event(data.to_string().into_bytes(), "Alert");
        client.append(stream.clone(), ExpectedVersion::Any, vec![alert]).await.context("an alert append failed")?;
        flow.alerts_sent.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
    Ok(())
}

async fn produce_telemetry(client: Client, flow: Arc<Flow>, sensor: usize) -> anyhow::Result<()> {
    let stream = StreamName::new(&format!("telemetry.us.sensor{sensor}")).expect("a valid stream name");
    let pad = "x".repeat(TELEMETRY_PAD_BYTES);
    let mut tick = tokio::time::interval(TELEMETRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    while !flow.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let batch = (0..TELEMETRY_BATCH_EVENTS)
            .map(|i| {
                let data = json!({"sensor": sensor, "seq": seq + i, "celsius": 20.0 + ((seq + i) % 50) as f64 / 10.0, "pad": pad});
                event(data.to_string().into_bytes(), "Reading")
            })
            .collect();
        client.append(stream.clone(), ExpectedVersion::Any, batch).await.context("a telemetry append failed")?;
        flow.telemetry_sent.fetch_add(TELEMETRY_BATCH_EVENTS, Ordering::Relaxed);
        seq += TELEMETRY_BATCH_EVENTS;
    }
    Ok(())
}

/// The failover drill: when it started, when the standby was seen holding
/// the lease, who that is, and the gap once known.
///
/// The gap ends with the arrival at `eu` of the first alert sent after the
/// takeover: the released gateway may still deliver what it read before it
/// noticed the release, so an alert sent between the drill and the
/// takeover can arrive without any gap and say nothing of the standby; one
/// sent after the takeover is carried by the new holder.
#[derive(Debug, Clone)]
struct Drill {
    at_us: u64,
    taken_us: u64,
    via: String,
    gap_ms: Option<f64>,
}

impl Drill {
    /// The arrival of the first alert sent after the takeover, if there is one yet.
    fn resumed_at_us(&self, arrivals: &[Arrival]) -> Option<u64> {
        arrivals.iter().filter(|a| a.sent_us >= self.taken_us).map(|a| a.at_us).min()
    }

    fn ms_after(&self, us: u64) -> f64 {
        us.saturating_sub(self.at_us) as f64 / 1e3
    }
}

async fn demo(plan: Plan, dir: &Path, out: Out) -> anyhow::Result<Observed> {
    let clock = Instant::now();
    out.line(format_args!(
        "edgebus demo: starting two sites on loopback, data in {} (removed at the end)",
        dir.display()
    ));
    let sites = start_sites(dir).await?;
    let (eu_client, us_client) = (
        Client::connect(&sites.eu.grpc.to_string()).await?.with_retry(RetryPolicy::none()),
        Client::connect(&sites.us.grpc.to_string()).await?,
    );
    banner(&sites, plan, out);

    let flow = Arc::new(Flow::default());
    let feed = Arc::clone(&flow);
    let alerts_at_eu = subscribe(&eu_client, "alerts.>", SubscribeFrom::Beginning, move |at, event| {
        let sent_us = serde_json::from_slice::<Value>(&event.data).ok().and_then(|d| d["sent_us"].as_u64());
        if let Some(sent_us) = sent_us {
            feed.arrivals.lock().expect("arrivals lock").push(Arrival { sent_us, at_us: micros_since(clock, at) });
        }
    })
    .await?;
    let feed = Arc::clone(&flow);
    let telemetry_at_eu = subscribe(&eu_client, "telemetry.>", SubscribeFrom::Beginning, move |_, _| {
        feed.telemetry_arrived.fetch_add(1, Ordering::Relaxed);
    })
    .await?;

    let mut producers = tokio::task::JoinSet::new();
    producers.spawn(produce_alerts(us_client.clone(), Arc::clone(&flow), clock));
    for sensor in 0..TELEMETRY_STREAMS {
        producers.spawn(produce_telemetry(us_client.clone(), Arc::clone(&flow), sensor));
    }

    let mut observed = Observed::default();
    let mut drill: Option<Drill> = None;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    while started.elapsed() < plan.run {
        tick.tick().await;
        if let Some(done) = producers.try_join_next() {
            done.context("a producer task")??;
            anyhow::bail!("a producer stopped early");
        }
        match sample(&sites).await {
            Ok(figures) => {
                observed.samples += 1;
                observed.wan_queue_max = observed.wan_queue_max.max(figures.wan_queue);
                observed.local_queue_max = observed.local_queue_max.max(figures.local_queue);
                observed.throttled_samples += u64::from(figures.backpressure == "throttled");
                out.line(format_args!(
                    "{:>3}s {} {}",
                    started.elapsed().as_secs(),
                    figures.summary(),
                    progress(&flow, &figures)
                ));
            }
            Err(e) => out.line(format_args!("{:>3}s stats not read: {e:#}", started.elapsed().as_secs())),
        }
        if let Some(d) = drill.as_mut().filter(|d| d.gap_ms.is_none()) {
            let arrivals = flow.arrivals.lock().expect("arrivals lock").clone();
            if let Some(at_us) = d.resumed_at_us(&arrivals) {
                let gap_ms = d.ms_after(at_us);
                d.gap_ms = Some(gap_ms);
                out.line(format_args!(
                    "     failover gap {gap_ms:.0} ms: {} held the lease {:.0} ms after the drill; the first alert sent after that reached eu at {gap_ms:.0} ms",
                    d.via,
                    d.ms_after(d.taken_us)
                ));
            }
        }
        if drill.is_none() && started.elapsed() >= plan.drill_at {
            drill = Some(run_drill(&sites, clock, out).await?);
        }
    }

    flow.stop.store(true, Ordering::Relaxed);
    while let Some(done) = producers.join_next().await {
        done.context("a producer task")??;
    }
    let alerts_sent = flow.alerts_sent.load(Ordering::Relaxed);
    out.line(format_args!(
        "producers stopped: {alerts_sent} alerts, {} telemetry events; waiting for the alerts in flight",
        flow.telemetry_sent.load(Ordering::Relaxed)
    ));
    let drained = await_condition("every alert arrives at eu", DRAIN_TIMEOUT, || async {
        Ok(flow.arrivals.lock().expect("arrivals lock").len() as u64 >= alerts_sent)
    })
    .await;
    if let Err(e) = drained {
        out.line(format_args!("{e:#}"));
    }
    if let Ok(figures) = sample(&sites).await {
        out.line(format_args!(" end {} {}", figures.summary(), progress(&flow, &figures)));
    }
    alerts_at_eu.abort();
    telemetry_at_eu.abort();

    observed.alerts_produced = alerts_sent;
    observed.telemetry_published = flow.telemetry_sent.load(Ordering::Relaxed);
    for stream in ALERT_STREAMS {
        let stream = StreamName::new(stream).expect("a valid stream name");
        observed.alerts_at_us.extend(read_all(&us_client, &stream, |e| e.id).await?);
        observed.alerts_at_eu.extend(read_all(&eu_client, &stream, |e| e.id).await?);
    }
    for sensor in 0..TELEMETRY_STREAMS {
        let stream = StreamName::new(&format!("telemetry.us.sensor{sensor}")).expect("a valid stream name");
        observed.telemetry_at_us.extend(read_all(&us_client, &stream, |e| (e.id, e.version)).await?);
        let noted = |e: edgebus_types::RecordedEvent| (e.id, e.origin.map(|o| o.note).unwrap_or_default());
        observed.telemetry_at_eu.extend(read_all(&eu_client, &stream, noted).await?);
    }
    let arrivals = flow.arrivals.lock().expect("arrivals lock").clone();
    if let Some(d) = &drill {
        observed.failover_via = Some(d.via.clone());
        let resumed = d.resumed_at_us(&arrivals);
        observed.failover_gap_ms = resumed.map(|at| d.ms_after(at));
        observed.failover_takeover_ms = Some(d.ms_after(d.taken_us));
        // Alerts sent from one latency bound before the drill (they may
        // have been in flight when the lease moved) until traffic resumed
        // carry the failover in their latency: the gap check covers them.
        let window_start = d.at_us.saturating_sub((ALERT_P99_BOUND_MS * 1e3) as u64);
        let window_end = resumed.unwrap_or(u64::MAX);
        for a in &arrivals {
            if (window_start..=window_end).contains(&a.sent_us) {
                observed.alerts_in_failover_window += 1;
            } else {
                observed.alert_latencies_ms.push(a.latency_ms());
            }
        }
    } else {
        observed.alert_latencies_ms = arrivals.iter().map(Arrival::latency_ms).collect();
    }

    let Sites { eu, us, link, gateways } = sites;
    drop(gateways);
    link.stop().await;
    drop((eu, us));
    Ok(observed)
}

/// `| alerts sent=N received=N p99=MS | telemetry published=N arrived=N | active=NAME`.
fn progress(flow: &Flow, figures: &Sample) -> String {
    let arrivals = flow.arrivals.lock().expect("arrivals lock").clone();
    let latencies: Vec<f64> = arrivals.iter().map(Arrival::latency_ms).collect();
    format!(
        "| alerts sent={} received={} p99={} | telemetry published={} arrived={} | active={}",
        flow.alerts_sent.load(Ordering::Relaxed),
        arrivals.len(),
        quantile(&latencies, 0.99).map_or_else(|| "-".to_owned(), |p99| format!("{p99:.0}ms")),
        flow.telemetry_sent.load(Ordering::Relaxed),
        flow.telemetry_arrived.load(Ordering::Relaxed),
        figures.active.as_deref().unwrap_or("none"),
    )
}

/// The drill, as an operator would run it: `edgebus failover` against the
/// `us` node with the current holder's name.
async fn run_drill(sites: &Sites, clock: Instant, out: Out) -> anyhow::Result<Drill> {
    let (active, _) = holder(sites.us.http).await?.context("no gateway holds the lease before the drill")?;
    out.line(format_args!("$ edgebus failover {active}"));
    let node_http = sites.us.http.to_string();
    let at_us = micros_since(clock, Instant::now());
    let takeover = tokio::task::spawn_blocking(move || crate::failover::drill(&node_http, &active, None))
        .await
        .context("the drill task")??;
    let taken_us = micros_since(clock, Instant::now());
    out.line(format_args!("{}", takeover.line()));
    Ok(Drill { at_us, taken_us, via: takeover.via, gap_ms: None })
}

fn banner(sites: &Sites, plan: Plan, out: Out) {
    let wan = sites.eu.wan.map(|a| a.to_string()).unwrap_or_default();
    out.line(format_args!(
        "  site eu  edgebus serve --site eu --gateway   grpc={} http={} wan={wan}  (receives)",
        sites.eu.grpc, sites.eu.http
    ));
    out.line(format_args!(
        "  site us  edgebus serve --site us             grpc={} http={}  (producers write here)",
        sites.us.grpc, sites.us.http
    ));
    for (gateway, role) in sites.gateways.iter().zip(["active", "standby"]) {
        out.line(format_args!(
            "  site us  edgebus gateway --name {:<13} http={}  ({role}, lease {LEASE_MS} ms)",
            gateway.name,
            gateway.http.map(|a| a.to_string()).unwrap_or_default()
        ));
    }
    out.line(format_args!(
        "  WAN us -> eu: link emulator {} -> {wan}, {} Mbit/s, RTT {LINK_RTT_MS} ms",
        sites.link.addr(),
        LINK_BANDWIDTH_BPS as f64 / 1e6
    ));
    out.line(format_args!(
        "  route us -> eu: lanes critical ({}% reserved) and bulk (at most {} KiB in flight); \
         alerts.> replicate in critical, telemetry.> sample 1/{TELEMETRY_SAMPLE_EVERY} in bulk",
        CRITICAL_RESERVED_PERMILLE / 10,
        BULK_CAP_BYTES / 1024
    ));
    let telemetry_per_sec =
        TELEMETRY_STREAMS as u64 * TELEMETRY_BATCH_EVENTS * 1000 / TELEMETRY_TICK.as_millis() as u64;
    out.line(format_args!(
        "  producers at us for {} s: alerts {ALERTS_PER_SEC}/s over {} streams, telemetry {telemetry_per_sec}/s of ~1 KiB over {TELEMETRY_STREAMS} streams \
         (a tenth of it is about twice the link); the failover drill at {} s",
        plan.run.as_secs(),
        ALERT_STREAMS.len(),
        plan.drill_at.as_secs()
    ));
    out.line(format_args!(""));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> EventId {
        EventId::from_u128(n)
    }

    /// A run where everything went as it should.
    fn good() -> Observed {
        let alerts: Vec<EventId> = (1..=40).map(id).collect();
        let telemetry_at_us: Vec<(EventId, u64)> = (0..100).map(|v| (id(1_000 + u128::from(v)), v)).collect();
        let telemetry_at_eu = vec![
            (id(1_000), "sampled 1/10".to_owned()),
            (id(1_010), "sampled 1/10; origin version 10 after a gap".to_owned()),
        ];
        Observed {
            alerts_produced: 40,
            alerts_at_us: alerts.clone(),
            alerts_at_eu: alerts,
            telemetry_published: 100,
            telemetry_at_us,
            telemetry_at_eu,
            wan_queue_max: 900,
            local_queue_max: 3,
            samples: 8,
            throttled_samples: 7,
            failover_gap_ms: Some(420.0),
            failover_takeover_ms: Some(150.0),
            failover_via: Some("gw-us-backup".to_owned()),
            alert_latencies_ms: vec![90.0; 30],
            alerts_in_failover_window: 10,
        }
    }

    fn failed(o: &Observed) -> Vec<&'static str> {
        verdict(o).iter().filter(|c| !c.pass).map(|c| c.name).collect()
    }

    #[test]
    fn a_good_run_passes_every_check() {
        let checks = verdict(&good());
        assert_eq!(checks.len(), 6);
        assert!(checks.iter().all(|c| c.pass), "{checks:?}");
        let gap = checks.iter().find(|c| c.name == "failover gap").expect("a gap check");
        assert!(gap.figures.contains("420 ms") && gap.figures.contains("1080 ms"), "{}", gap.figures);
    }

    #[test]
    fn a_lost_or_doubled_alert_fails() {
        let mut lost = good();
        lost.alerts_at_eu.pop();
        assert_eq!(failed(&lost), ["alerts sent = alerts received"]);
        let mut unacknowledged = good();
        unacknowledged.alerts_produced = 41;
        assert_eq!(failed(&unacknowledged), ["alerts sent = alerts received"]);
        let mut doubled = good();
        doubled.alerts_at_eu.push(id(1));
        assert_eq!(failed(&doubled), ["no duplicates"]);
        let mut telemetry_twice = good();
        telemetry_twice.telemetry_at_eu.push((id(1_000), "sampled 1/10".to_owned()));
        assert_eq!(failed(&telemetry_twice), ["no duplicates"]);
        assert_eq!(
            failed(&Observed { alerts_produced: 0, alerts_at_us: vec![], alerts_at_eu: vec![], ..good() }),
            ["alerts sent = alerts received"]
        );
    }

    #[test]
    fn telemetry_the_rule_does_not_keep_fails() {
        let mut unsampled = good();
        unsampled.telemetry_at_eu.push((id(1_003), "sampled 1/10".to_owned()));
        assert_eq!(failed(&unsampled), ["telemetry sampled as configured"]);
        let mut unnoted = good();
        unnoted.telemetry_at_eu[0].1 = String::new();
        assert_eq!(failed(&unnoted), ["telemetry sampled as configured"]);
        let mut none = good();
        none.telemetry_at_eu.clear();
        assert_eq!(failed(&none), ["telemetry sampled as configured"]);
    }

    #[test]
    fn an_unbounded_queue_a_slow_failover_or_slow_alerts_fail() {
        let over = Observed { wan_queue_max: route_queue_bound() + 1, ..good() };
        assert_eq!(failed(&over), ["route queue bounded"]);
        let never_throttled = Observed { throttled_samples: 0, ..good() };
        assert_eq!(failed(&never_throttled), ["route queue bounded"]);
        assert_eq!(failed(&Observed { failover_gap_ms: Some(1_081.0), ..good() }), ["failover gap"]);
        assert_eq!(failed(&Observed { failover_gap_ms: None, ..good() }), ["failover gap"]);
        let mut slow = good();
        slow.alert_latencies_ms.push(ALERT_P99_BOUND_MS + 1.0);
        assert_eq!(failed(&slow), ["alert latency"]);
    }

    #[test]
    fn the_json_verdict_carries_every_check_and_the_figures() {
        let o = good();
        let checks = verdict(&o);
        let json = verdict_json(&o, &checks, 12.5);
        assert_eq!(json["pass"], true);
        assert_eq!(json["checks"].as_array().map(Vec::len), Some(6));
        assert_eq!(json["failover_gap_ms"], 420.0);
        assert_eq!(json["telemetry_kept"], 10);
        assert_eq!(json["route_queue_bound"], route_queue_bound());
    }

    #[test]
    fn the_stats_line_takes_the_gateways_queue_and_the_worse_health() {
        let node = json!({"local_queue": 4, "backpressure": "healthy"});
        let gateway = json!({"active": "gw-us", "gateway": {"health": "throttled", "wan_queue": 715, "dropped": 2}});
        let sample = Sample::of(&node, Some(&gateway));
        assert_eq!(sample.summary(), "local_queue=4 wan_queue=715 dropped=2 backpressure=throttled");
        assert_eq!(sample.active.as_deref(), Some("gw-us"));
        let stalled_node = json!({"local_queue": 9000, "backpressure": "stalled"});
        assert_eq!(Sample::of(&stalled_node, Some(&gateway)).backpressure, "stalled", "the worse of the two");
        let none = Sample::of(&node, None);
        assert_eq!(none.summary(), "local_queue=4 wan_queue=0 dropped=0 backpressure=healthy");
        assert_eq!(none.active, None);
        assert_eq!(worse("healthy", "healthy"), "healthy");
        assert_eq!(worse("throttled", "healthy"), "throttled");
        assert_eq!(worse("healthy", "on fire"), "on fire", "an unknown state shows");
    }

    #[test]
    fn the_gateway_config_is_a_valid_gateway_table() {
        let text = format!("site = \"us\"\n{}", gateway_config("127.0.0.1:4000".parse().unwrap()));
        let settings = crate::config::parse(&text, Path::new("us-gateways.toml")).expect("the file parses");
        let node = settings.resolve().expect("valid settings");
        let gateway = node.gateway.expect("a gateway table").gateway;
        assert_eq!(gateway.lease_ms, LEASE_MS);
        assert_eq!(gateway.routes.len(), 1);
        let route = &gateway.routes[0];
        assert_eq!(route.addresses, ["127.0.0.1:4000"]);
        assert_eq!(route.lanes.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["critical", "bulk"]);
        let policies: Vec<(&str, &str)> =
            gateway.policies.iter().map(|p| (p.pattern.as_str(), p.action.as_str())).collect();
        assert_eq!(policies, [("alerts.>", "replicate"), ("telemetry.>", "sample 1/10")]);
    }

    #[test]
    fn the_failover_gap_ends_at_the_first_alert_sent_after_the_takeover() {
        let drill = Drill { at_us: 1_000, taken_us: 1_200, via: "gw-us-backup".to_owned(), gap_ms: None };
        let arrivals = [
            Arrival { sent_us: 900, at_us: 1_600 },
            Arrival { sent_us: 1_050, at_us: 1_100 },
            Arrival { sent_us: 1_250, at_us: 1_700 },
            Arrival { sent_us: 1_300, at_us: 1_650 },
        ];
        assert_eq!(drill.resumed_at_us(&arrivals), Some(1_650), "sent after the takeover, arrived first");
        assert_eq!(drill.resumed_at_us(&arrivals[..2]), None, "an alert sent before the takeover does not count");
        assert_eq!(drill.ms_after(1_650), 0.65);
    }
}
