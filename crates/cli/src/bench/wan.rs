//! `edgebus bench wan`: federation through the WAN link emulator.
//!
//! Two sites, `eu` → `us`, each a child process `edgebus serve --gateway`
//! (this executable) with its own data directory (`fsync=always`), and
//! between them an emulated link ([`edgebus_testkit::Link`], in this
//! process): the `eu` route's only address is the link, which forwards to
//! the `us` gateway's WAN listener. For each link profile (10 Mbit/s with
//! 50 ms RTT, 100 Mbit/s with 5 ms RTT) it measures, on fresh sites:
//!
//! - **raw**: a plain TCP stream through a fresh link with the same
//!   settings ([`edgebus_testkit::measure_raw_goodput`]): the capacity the
//!   replication is compared with.
//! - **goodput**: a backlog of 1 KiB events is written at `eu` before the
//!   route exists; then the route is added and a subscriber at `us` counts
//!   the payload bytes of the replicated events as they arrive. Goodput is
//!   payload bytes from the first arrival to the last over that time (event
//!   names, ids, framing and acknowledgements are all overhead).
//! - **end-to-end latency**: one producer at `eu` appends one 256-byte
//!   event at a time, [`CRITICAL_EVENTS_PER_SEC`] per second, to a
//!   `critical.` stream; the subscriber at `us` takes the time of arrival
//!   minus the send time that the producer wrote into the payload (one
//!   process, one monotonic clock). That is producer send → remote append
//!   → remote subscriber: an upper bound of origin append → remote append
//!   with microsecond resolution (the events' `timestamp_ms` is only
//!   milliseconds, and the receiver's latency histogram only buckets).
//! - **critical lane under a saturated bulk lane**: the route has two
//!   lanes, `critical` (reserved share [`CRITICAL_RESERVED_PERMILLE`]) and
//!   `bulk`, and policies send `critical.>` and `bulk.>` into them. A bulk
//!   backlog larger than what the link carries during the measurement is
//!   written at `eu`, then the same critical producer runs again; the ratio
//!   is its p99 then over its p99 alone (the previous bullet).
//!
//! Then, once: a site `eu` whose route goes to a dead address (a port on
//! 127.0.0.1 nobody listens on) beside a site with a gateway and no routes,
//! both with [`APPEND_PRODUCERS`] producers appending one 100-byte event at
//! a time, windows alternating; and the dead-route site's RSS
//! (`/proc/PID/status` `VmRSS`) after its backlog reaches each of two sizes.
//!
//! NATS side by side (unless `--no-nats`): Debian's `nats-server` as two
//! JetStream servers, `us` a hub and `eu` a leaf node (its own JetStream
//! domain) whose leaf-node connection goes through a link with the same
//! settings; a stream `EU` at `eu`, and a stream `US` at `us` sourcing it
//! across the leaf-node link. The same goodput and latency workloads run
//! there (see `nats` below).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use edgebus_client::{Client, RetryPolicy};
use edgebus_proto::convert::SubscribeFrom;
use edgebus_testkit::{Link, LinkConfig, measure_raw_goodput};
use edgebus_types::{ExpectedVersion, StreamName};
use serde_json::{Value, json};

use super::machine::{Filesystem, Machine, load_average, utc_now};
use crate::sites::{ChildGuard, event, http, start_node, subscribe};

mod failover;
mod nats;

/// Arguments of `edgebus bench wan`.
#[derive(Debug, Clone, Args)]
pub struct WanBenchArgs {
    /// Short phases and a backlog of 100k/1M events instead of 1M/10M (about 2 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object per line instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Directory to create the scratch directory in (default: ./target if it exists, else $TMPDIR).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Leave out the NATS leaf-node comparison.
    #[arg(long)]
    pub no_nats: bool,
    /// Run only the gateway failover drills.
    #[arg(long)]
    pub failover_only: bool,
    /// Run only the dead route: local appends beside it and the RSS of its backlog.
    #[arg(long, conflicts_with = "failover_only")]
    pub backlog_only: bool,
    /// Run only the links (goodput, latency, critical beside bulk; NATS unless `--no-nats`).
    #[arg(long, conflicts_with_all = ["failover_only", "backlog_only"])]
    pub links_only: bool,
    /// The nats-server binary [default: nats-server on PATH, installed with apt-get if missing].
    #[arg(long, value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
}

/// One emulated link.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// Its name in reports, `10mbit_50ms`.
    pub name: &'static str,
    /// Bits per second, each direction.
    pub bandwidth_bps: u64,
    /// Round-trip time (half of it each way).
    pub rtt: Duration,
}

impl Profile {
    /// The link emulator's settings: the bandwidth, half the RTT each way,
    /// the default pipe buffer.
    pub fn link_config(&self) -> LinkConfig {
        LinkConfig { bandwidth_bps: Some(self.bandwidth_bps), latency: self.rtt / 2, ..LinkConfig::default() }
    }

    /// Bytes the link carries in `secs` seconds.
    fn bytes_in(&self, secs: f64) -> u64 {
        (self.bandwidth_bps as f64 / 8.0 * secs) as u64
    }
}

/// The links of the issue.
pub const PROFILES: [Profile; 2] = [
    Profile { name: "10mbit_50ms", bandwidth_bps: 10_000_000, rtt: Duration::from_millis(50) },
    Profile { name: "100mbit_5ms", bandwidth_bps: 100_000_000, rtt: Duration::from_millis(5) },
];

/// Payload of a bulk event.
pub const BULK_PAYLOAD_BYTES: usize = 1024;
/// Payload of a critical event (the first 8 bytes are its send time).
pub const CRITICAL_PAYLOAD_BYTES: usize = 256;
/// Payload of the events of the backlog and of the dead-route appends.
pub const SMALL_PAYLOAD_BYTES: usize = 100;
/// Rate of the critical producer.
pub const CRITICAL_EVENTS_PER_SEC: u64 = 50;
/// The critical lane's reserved share of the window.
pub const CRITICAL_RESERVED_PERMILLE: u32 = 200;
/// Concurrent producers of the dead-route comparison, each waiting for its ack.
pub const APPEND_PRODUCERS: usize = 8;
/// Events per append when writing a backlog.
const BULK_APPEND_EVENTS: usize = 256;
const BACKLOG_APPEND_EVENTS: usize = 1000;
/// Concurrent appenders when writing a backlog.
const BACKLOG_WRITERS: usize = 4;
/// Targets.
pub const TARGET_GOODPUT_RATIO: f64 = 0.9;
pub const TARGET_CRITICAL_P99_RATIO: f64 = 2.0;
pub const TARGET_RSS_DRIFT: f64 = 0.10;
pub const TARGET_DEAD_ROUTE_P99_RATIO: f64 = 1.5;

/// Durations and sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Link time the raw TCP stream is given (bytes = bandwidth × this).
    raw_secs: f64,
    /// Link time of the goodput backlog.
    goodput_secs: f64,
    /// Duration of each critical producer run.
    critical_secs: f64,
    /// Rounds and window of the dead-route append comparison.
    append_rounds: usize,
    append_window: Duration,
    /// Backlog sizes at which the RSS is read.
    backlog_steps: [u64; 2],
}

const PLAN_QUICK: Plan = Plan {
    raw_secs: 3.0,
    goodput_secs: 4.0,
    critical_secs: 3.0,
    append_rounds: 2,
    append_window: Duration::from_secs(2),
    backlog_steps: [1_000_000, 2_000_000],
};
const PLAN_FULL: Plan = Plan {
    raw_secs: 10.0,
    goodput_secs: 15.0,
    critical_secs: 10.0,
    append_rounds: 3,
    append_window: Duration::from_secs(5),
    backlog_steps: [1_000_000, 10_000_000],
};

/// Figures of one system over one link.
#[derive(Debug, Clone, Default)]
pub struct LinkFigures {
    pub system: &'static str,
    pub link: &'static str,
    pub raw_bps: f64,
    pub goodput_bps: Option<f64>,
    pub goodput_events: u64,
    pub goodput_complete: bool,
    pub latency_samples: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub critical_loaded_p50_ms: Option<f64>,
    pub critical_loaded_p99_ms: Option<f64>,
    /// Bulk payload rate while the critical producer ran beside it.
    pub bulk_loaded_bps: Option<f64>,
    /// Bulk events not yet arrived when the loaded run ended (> 0: the bulk
    /// lane was saturated throughout).
    pub bulk_left_events: Option<u64>,
    pub note: String,
    /// The sending route's window, in-flight bytes and stall reasons,
    /// sampled while the goodput backlog crossed (edgebus only).
    pub route_while_sending: String,
}

impl LinkFigures {
    fn goodput_ratio(&self) -> Option<f64> {
        self.goodput_bps.map(|g| g / self.raw_bps)
    }

    fn critical_ratio(&self) -> Option<f64> {
        Some(self.critical_loaded_p99_ms? / self.p99_ms?)
    }
}

/// The dead-route comparison and the backlog's memory.
#[derive(Debug, Clone, Default)]
struct DeadRoute {
    dead_p50_ms: f64,
    dead_p99_ms: f64,
    none_p50_ms: f64,
    none_p99_ms: f64,
    dead_appends: usize,
    none_appends: usize,
    route_state: String,
    rss_empty_mb: f64,
    /// `(backlog events, RSS MiB, seconds the fill took)`.
    backlog: Vec<(u64, f64, f64)>,
    /// `(RssAnon, RssFile)` MiB at each backlog step (heap against mapped
    /// files), and the changes the store's index tail held then: a quiet
    /// site keeps a tail under the quiet flush's minimum in memory.
    backlog_split: Vec<(f64, f64, u64)>,
}

/// Runs the benchmark and prints the report.
pub fn run(args: &WanBenchArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.dir.as_deref(), "edgebus-bench-wan-")?;
    let dir = scratch.path().canonicalize().context("cannot resolve the scratch directory")?;
    let filesystem = Filesystem::of(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-bench")
        .build()
        .context("cannot start the async runtime")?;
    let plan = if args.quick { PLAN_QUICK } else { PLAN_FULL };
    let failover_plan = if args.quick { FAILOVER_QUICK } else { FAILOVER_FULL };
    let load_start = load_average();
    let started = Instant::now();
    let measured = if args.failover_only { None } else { Some(runtime.block_on(measure(args, &plan, &dir))?) };
    let drills = if args.backlog_only || args.links_only {
        None
    } else {
        progress(format_args!("gateway failover drills"));
        Some(runtime.block_on(failover::measure(failover_plan, &dir.join("failover"), Instant::now()))?)
    };
    let load_end = load_average();
    runtime.shutdown_timeout(Duration::from_secs(10));
    scratch.close().with_context(|| format!("cannot remove the scratch directory {}", dir.display()))?;
    let header = Header {
        date: utc_now(),
        machine: Machine::detect().describe(),
        filesystem: filesystem.describe(),
        load: [load_start.map(|l| l[0]), load_end.map(|l| l[0])],
        quick: args.quick,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    if let Some((links, dead, nats_note)) = measured {
        if args.json {
            print_json(&header, &links, dead.as_ref(), &nats_note)?;
        } else {
            print_report(&header, &links, dead.as_ref(), &nats_note);
        }
    }
    match drills {
        Some(drills) if args.json => println!("{}", drills.to_json()),
        Some(drills) => print_failover(&drills),
        None => {}
    }
    Ok(())
}

/// Failover drills of a full run: 20 SIGKILLs of the active gateway.
const FAILOVER_FULL: failover::Plan = failover::Plan { drills: 20, lease_ms: 1_000, rtt_ms: 20 };
/// Failover drills of a quick run.
const FAILOVER_QUICK: failover::Plan = failover::Plan { drills: 3, lease_ms: 1_000, rtt_ms: 20 };

fn print_failover(figures: &failover::Figures) {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"));
    println!();
    println!(
        "gateway failover: {} drills (SIGKILL of the active gateway), lease {} ms, link RTT {} ms",
        figures.gaps_ms.len(),
        figures.plan.lease_ms,
        figures.plan.rtt_ms
    );
    println!(
        "  kill -> first event from the standby: p50 {}  p99 {}  (target <= lease + 2 x RTT = {:.0} ms)",
        ms(figures.gap_ms(0.5)),
        ms(figures.gap_ms(0.99)),
        figures.target_ms()
    );
    println!(
        "  {} events published during the drills: {} lost, {} duplicated  [{}]",
        figures.published,
        figures.lost,
        figures.duplicates,
        verdict(Some(figures.pass()))
    );
}

struct Header {
    date: String,
    machine: String,
    filesystem: String,
    load: [Option<f64>; 2],
    quick: bool,
    elapsed_s: f64,
}

async fn measure(
    args: &WanBenchArgs,
    plan: &Plan,
    dir: &Path,
) -> anyhow::Result<(Vec<LinkFigures>, Option<DeadRoute>, Option<String>)> {
    let clock = Instant::now();
    let mut links = Vec::new();
    for profile in PROFILES.iter().filter(|_| !args.backlog_only) {
        progress(format_args!("edgebus over {}", profile.name));
        links.push(measure_edgebus(profile, plan, &dir.join(profile.name), clock).await?);
    }
    let mut nats_note = None;
    if !args.no_nats && !args.backlog_only {
        match nats::prepare(args.nats_server.as_deref(), &dir.join("nats-probe")).await {
            Ok(binary) => {
                for profile in PROFILES {
                    progress(format_args!("nats over {}", profile.name));
                    let figures = nats::measure(
                        &binary,
                        &profile,
                        plan_nats(plan),
                        &dir.join(format!("nats-{}", profile.name)),
                        clock,
                    )
                    .await;
                    match figures {
                        Ok(figures) => links.push(figures),
                        Err(e) => {
                            progress(format_args!("  nats over {} failed: {e:#}", profile.name));
                            nats_note = Some(format!("NATS over {} not measured: {e:#}", profile.name));
                        }
                    }
                }
            }
            Err(e) => nats_note = Some(format!("NATS not measured: {e:#}")),
        }
    }
    if args.links_only {
        return Ok((links, None, nats_note));
    }
    progress(format_args!("dead route and backlog"));
    let dead = measure_dead_route(plan, &dir.join("dead-route")).await?;
    Ok((links, Some(dead), nats_note))
}

/// What the NATS side needs of the plan.
fn plan_nats(plan: &Plan) -> nats::Plan {
    nats::Plan { raw_secs: plan.raw_secs, goodput_secs: plan.goodput_secs, critical_secs: plan.critical_secs }
}

// ---------------------------------------------------------------------------
// edgebus sites

/// An `edgebus serve --gateway` child process.
struct Site {
    guard: ChildGuard,
    grpc: SocketAddr,
    http: SocketAddr,
    wan: SocketAddr,
}

/// Starts `edgebus serve --site SITE --gateway` on `data_dir` (everything
/// on 127.0.0.1:0, default settings: `fsync=always`) and reads its ready
/// line. `EDGEBUS_*` variables of this process are not passed on.
async fn start_site(site: &'static str, data_dir: &Path) -> anyhow::Result<Site> {
    let node = start_node(site, data_dir, true).await?;
    Ok(Site {
        guard: node.guard,
        grpc: node.grpc,
        http: node.http,
        wan: node.wan.context("a gateway node has a WAN address")?,
    })
}

impl Site {
    async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.grpc.to_string()).await?.with_retry(RetryPolicy::none()))
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        rss_mib(self.guard.pid())
    }
}

/// `VmRSS` of a process, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    status_mib(pid, "VmRSS:")
}

/// A memory line of `/proc/PID/status` (`VmRSS:`, `RssAnon:`, `RssFile:`), in MiB.
fn status_mib(pid: u32, key: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// A process is quiet when it used less than this share of one core over
/// [`QUIET_WINDOW`]. The window is longer than the store takes to see that
/// the writes stopped and flush its tail (its quiet flush: up to about 2 s
/// after the last write), so the memory is read after that flush rather
/// than at a moment that depends on how full the tail happened to be.
const QUIET_CPU_SHARE: f64 = 0.05;
const QUIET_WINDOW: Duration = Duration::from_secs(3);
/// Longest wait for a quiet process; past it the memory is read anyway.
const QUIET_WAIT_MAX: Duration = Duration::from_secs(120);

/// Waits until process `pid` used less than [`QUIET_CPU_SHARE`] of a core
/// over a [`QUIET_WINDOW`], at most [`QUIET_WAIT_MAX`]: how long that took,
/// as text ("quiet 3.0 s later" or "not quiet after 120 s").
async fn wait_until_quiet(pid: u32) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut before = cpu_secs(pid)?;
    while started.elapsed() < QUIET_WAIT_MAX {
        tokio::time::sleep(QUIET_WINDOW).await;
        let now = cpu_secs(pid)?;
        if now - before < QUIET_CPU_SHARE * QUIET_WINDOW.as_secs_f64() {
            return Ok(format!("quiet {:.1} s later", started.elapsed().as_secs_f64()));
        }
        before = now;
    }
    Ok(format!("not quiet after {} s", QUIET_WAIT_MAX.as_secs()))
}

/// User and system CPU time of process `pid` so far, in seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at state (3rd);
    // utime and stime are the 14th and 15th, in clock ticks.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).context("no command in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).context("a short /proc/PID/stat");
    Ok((ticks(11)? + ticks(12)?) / CLOCK_TICKS_PER_SEC)
}

/// `sysconf(_SC_CLK_TCK)`: the kernel's user-visible tick rate, 100 on Linux.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Appends `events` events of `payload_bytes` in appends of `per_append`,
/// from [`BACKLOG_WRITERS`] concurrent writers, each to its own stream
/// `PREFIX.wN`.
async fn write_backlog(
    client: &Client,
    prefix: &str,
    events: u64,
    payload_bytes: usize,
    per_append: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..BACKLOG_WRITERS {
        let (client, next) = (client.clone(), Arc::clone(&next));
        let stream = StreamName::new(&format!("{prefix}.w{writer}")).expect("a valid name");
        writers.spawn(async move {
            loop {
                let taken = next.fetch_add(per_append as u64, Ordering::Relaxed);
                if taken >= events {
                    return anyhow::Ok(());
                }
                let count = (events - taken).min(per_append as u64);
                let batch = (0..count).map(|_| event(vec![b'x'; payload_bytes], "Backlog")).collect();
                client.append(stream.clone(), ExpectedVersion::Any, batch).await.context("a backlog append failed")?;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.context("a backlog writer failed")??;
    }
    Ok(())
}

/// Arrivals of bulk events at the remote subscriber: `(arrival, payload bytes)`.
#[derive(Debug, Default)]
struct Arrivals {
    count: AtomicU64,
    samples: std::sync::Mutex<Vec<(Instant, u32)>>,
}

fn stamped(clock: Instant, payload_bytes: usize) -> Vec<u8> {
    let mut data = vec![b'c'; payload_bytes];
    let sent_ns = u64::try_from(clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
    data[..8].copy_from_slice(&sent_ns.to_le_bytes());
    data
}

fn latency_ms(clock: Instant, arrival: Instant, data: &[u8]) -> Option<f64> {
    let sent_ns = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let arrival_ns = u64::try_from(arrival.duration_since(clock).as_nanos()).unwrap_or(u64::MAX);
    Some(arrival_ns.saturating_sub(sent_ns) as f64 / 1e6)
}

/// Runs the critical producer (one event at a time, [`CRITICAL_EVENTS_PER_SEC`])
/// for `secs`, then waits up to 10 s for its events; returns the latencies
/// of those that arrived and how many were sent.
async fn critical_run(
    client: &Client,
    latencies: &Arc<std::sync::Mutex<Vec<f64>>>,
    clock: Instant,
    secs: f64,
) -> anyhow::Result<(Vec<f64>, usize)> {
    latencies.lock().expect("latency lock").clear();
    let stream = StreamName::new("critical.alarms").expect("a valid name");
    let mut tick = tokio::time::interval(Duration::from_secs(1) / CRITICAL_EVENTS_PER_SEC as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        let event = event(stamped(clock, CRITICAL_PAYLOAD_BYTES), "Alarm");
        client.append(stream.clone(), ExpectedVersion::Any, vec![event]).await.context("a critical append failed")?;
        sent += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while latencies.lock().expect("latency lock").len() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let samples = latencies.lock().expect("latency lock").clone();
    Ok((samples, sent))
}

/// The value at `q` of `samples` (nearest rank), or `None` if empty.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Payload rate from the first arrival to the last: the bytes that arrived
/// after the first over that time.
fn arrival_rate_bps(samples: &[(Instant, u32)]) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    let secs = last.0.duration_since(first.0).as_secs_f64();
    if samples.len() < 2 || secs <= 0.0 {
        return None;
    }
    let bytes: u64 = samples[1..].iter().map(|s| u64::from(s.1)).sum();
    Some(bytes as f64 * 8.0 / secs)
}

/// A gap between two arrivals longer than this is a stall of the route
/// (at 10 Mbit/s a 5 ms frame brings about six events at once).
const ARRIVAL_GAP_STALL: Duration = Duration::from_millis(20);

/// The stalls in a run of arrivals: how many gaps exceeded
/// [`ARRIVAL_GAP_STALL`], their total and the largest, as text.
fn arrival_stalls(samples: &[(Instant, u32)]) -> String {
    let gaps: Vec<Duration> = samples
        .windows(2)
        .map(|pair| pair[1].0.duration_since(pair[0].0))
        .filter(|gap| *gap > ARRIVAL_GAP_STALL)
        .collect();
    format!(
        "{} arrival gaps over {} ms, {:.0} ms in all, the largest {:.0} ms",
        gaps.len(),
        ARRIVAL_GAP_STALL.as_millis(),
        gaps.iter().sum::<Duration>().as_secs_f64() * 1e3,
        gaps.iter().max().unwrap_or(&Duration::ZERO).as_secs_f64() * 1e3
    )
}

async fn measure_edgebus(profile: &Profile, plan: &Plan, dir: &Path, clock: Instant) -> anyhow::Result<LinkFigures> {
    let config = profile.link_config();
    let mut figures = LinkFigures { system: "edgebus", link: profile.name, ..LinkFigures::default() };
    progress(format_args!("  raw TCP through the link ({} s of link time)", plan.raw_secs));
    figures.raw_bps = tokio::time::timeout(
        Duration::from_secs_f64(plan.raw_secs * 4.0 + 30.0),
        measure_raw_goodput(&config, profile.bytes_in(plan.raw_secs)),
    )
    .await
    .context("the raw TCP stream did not finish in time")?
    .context("the raw TCP stream failed")?;

    let us = start_site("us", &dir.join("us")).await?;
    let link = Link::start(us.wan, config.clone()).await.context("cannot start the link")?;
    let eu = start_site("eu", &dir.join("eu")).await?;
    for (pattern, lane) in [("critical.>", "critical"), ("bulk.>", "bulk")] {
        http(eu.http, "POST", "/v1/policies", Some(&json!({"pattern": pattern, "action": "replicate", "lane": lane})))
            .await?;
    }
    let (eu_client, us_client) = (eu.client().await?, us.client().await?);

    // Goodput: the backlog first, then the route.
    let goodput_events = profile.bytes_in(plan.goodput_secs) / BULK_PAYLOAD_BYTES as u64;
    progress(format_args!(
        "  goodput: {goodput_events} events of {BULK_PAYLOAD_BYTES} B written at eu, then the route"
    ));
    write_backlog(&eu_client, "bulk.goodput", goodput_events, BULK_PAYLOAD_BYTES, BULK_APPEND_EVENTS).await?;
    settle_phase(dir).await?;
    let arrivals = Arc::new(Arrivals::default());
    let sink = Arc::clone(&arrivals);
    let bulk_task = subscribe(&us_client, "bulk.>", SubscribeFrom::Beginning, move |at, event| {
        sink.count.fetch_add(1, Ordering::Relaxed);
        let len = u32::try_from(event.data.len()).unwrap_or(u32::MAX);
        sink.samples.lock().expect("arrivals lock").push((at, len));
    })
    .await?;
    let route = json!({
        "name": "us",
        "remote_site": "us",
        "addresses": [link.addr().to_string()],
        "lanes": [
            {"name": "critical", "reserved_permille": CRITICAL_RESERVED_PERMILLE},
            {"name": "bulk"},
        ],
    });
    http(eu.http, "POST", "/v1/routes", Some(&route)).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.goodput_secs * 4.0 + 30.0);
    let mut route_samples = Vec::new();
    while arrivals.count.load(Ordering::Relaxed) < goodput_events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(routes) = http(eu.http, "GET", "/v1/routes", None).await {
            route_samples.push(routes);
        }
    }
    figures.route_while_sending = summarize_route(&route_samples);
    {
        let samples = arrivals.samples.lock().expect("arrivals lock");
        figures.route_while_sending.push_str(&format!("; {}", arrival_stalls(&samples)));
        figures.goodput_events = samples.len() as u64;
        figures.goodput_complete = samples.len() as u64 >= goodput_events;
        figures.goodput_bps = arrival_rate_bps(&samples);
    }
    progress(format_args!("  route while sending: {}", figures.route_while_sending));
    if !figures.goodput_complete {
        figures
            .note
            .push_str(&format!("only {} of {goodput_events} goodput events arrived in time; ", figures.goodput_events));
    }
    progress(format_args!(
        "  goodput {:.2} Mbit/s of payload, raw {:.2} Mbit/s",
        figures.goodput_bps.unwrap_or(0.0) / 1e6,
        figures.raw_bps / 1e6
    ));

    // Latency, unloaded: the critical producer alone.
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&latencies);
    let critical_task = subscribe(&us_client, "critical.>", SubscribeFrom::End, move |at, event| {
        if let Some(ms) = latency_ms(clock, at, &event.data) {
            sink.lock().expect("latency lock").push(ms);
        }
    })
    .await?;
    settle_phase(dir).await?;
    progress(format_args!("  latency: critical producer alone for {} s", plan.critical_secs));
    let (alone, sent) = critical_run(&eu_client, &latencies, clock, plan.critical_secs).await?;
    figures.latency_samples = alone.len();
    figures.p50_ms = quantile(&alone, 0.5);
    figures.p99_ms = quantile(&alone, 0.99);
    if alone.len() < sent {
        figures.note.push_str(&format!("{} of {sent} critical events (alone) did not arrive; ", sent - alone.len()));
    }

    // The critical lane beside a saturated bulk lane.
    let loaded_events = profile.bytes_in(plan.critical_secs + 3.0) / BULK_PAYLOAD_BYTES as u64;
    progress(format_args!("  critical beside bulk: {loaded_events} bulk events written, then the critical producer"));
    let before = arrivals.count.load(Ordering::Relaxed);
    write_backlog(&eu_client, "bulk.loaded", loaded_events, BULK_PAYLOAD_BYTES, BULK_APPEND_EVENTS).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bulk_start = arrivals.count.load(Ordering::Relaxed);
    let started = Instant::now();
    let (loaded, sent) = critical_run(&eu_client, &latencies, clock, plan.critical_secs).await?;
    let bulk_end = arrivals.count.load(Ordering::Relaxed);
    figures.bulk_loaded_bps =
        Some((bulk_end - bulk_start) as f64 * BULK_PAYLOAD_BYTES as f64 * 8.0 / started.elapsed().as_secs_f64());
    figures.bulk_left_events = Some((before + loaded_events).saturating_sub(bulk_end));
    figures.critical_loaded_p50_ms = quantile(&loaded, 0.5);
    figures.critical_loaded_p99_ms = quantile(&loaded, 0.99);
    if loaded.len() < sent {
        figures.note.push_str(&format!("{} of {sent} critical events (loaded) did not arrive; ", sent - loaded.len()));
    }
    if figures.bulk_left_events == Some(0) {
        figures.note.push_str("the bulk backlog ran out before the loaded run ended; ");
    }
    bulk_task.abort();
    critical_task.abort();
    link.stop().await;
    drop((eu, us));
    Ok(figures)
}

/// Longest wait in [`settle_phase`] for the cores to fall quiet.
const SETTLE_MAX: Duration = Duration::from_secs(5);

/// Lets the machine settle before a measured phase (`machine::settle`):
/// writes out the filesystem's dirty pages, so a build or an earlier phase
/// does not leave the kernel's writeback inside this phase's `fdatasync`s,
/// and waits up to [`SETTLE_MAX`] for the cores to fall quiet.
pub(crate) async fn settle_phase(dir: &Path) -> anyhow::Result<()> {
    let dir = dir.to_owned();
    let settled = tokio::task::spawn_blocking(move || super::machine::settle(&dir, SETTLE_MAX))
        .await
        .context("settling panicked")??;
    if let Some(note) = settled.busy_note() {
        progress(format_args!("{note}"));
    }
    Ok(())
}

/// Median window and in-flight bytes of the bulk lane, and how often each
/// stall reason was seen, over samples of `GET /v1/routes`.
fn summarize_route(samples: &[Value]) -> String {
    let mut windows = Vec::new();
    let mut in_flight = Vec::new();
    let mut stalls: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for sample in samples {
        let Some(route) = sample.pointer("/routes/0") else { continue };
        if let Some(w) = route.get("window_bytes").and_then(Value::as_f64) {
            windows.push(w / 1024.0);
        }
        let Some(lanes) = route.get("lanes").and_then(Value::as_array) else { continue };
        for lane in lanes.iter().filter(|l| l.get("lane").and_then(Value::as_str) == Some("bulk")) {
            if let Some(b) = lane.get("in_flight_bytes").and_then(Value::as_f64) {
                in_flight.push(b / 1024.0);
            }
            let stall = lane.get("stall").and_then(Value::as_str).unwrap_or("?").to_owned();
            *stalls.entry(stall).or_default() += 1;
        }
    }
    format!(
        "window median {:.0} KiB, bulk in flight median {:.0} KiB, bulk lane stall {:?} over {} samples",
        quantile(&windows, 0.5).unwrap_or(0.0),
        quantile(&in_flight, 0.5).unwrap_or(0.0),
        stalls,
        samples.len()
    )
}

// ---------------------------------------------------------------------------
// Dead route and backlog

async fn measure_dead_route(plan: &Plan, dir: &Path) -> anyhow::Result<DeadRoute> {
    let dead_address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
        listener.local_addr()?
    };
    let dead = start_site("eu", &dir.join("dead")).await?;
    let none = start_site("solo", &dir.join("none")).await?;
    let route = json!({"remote_site": "us", "addresses": [dead_address.to_string()]});
    http(dead.http, "POST", "/v1/routes", Some(&route)).await?;
    let (dead_client, none_client) = (dead.client().await?, none.client().await?);
    let mut report = DeadRoute { rss_empty_mb: dead.rss_mib()?, ..DeadRoute::default() };
    let (mut with_dead, mut with_none) = (Vec::new(), Vec::new());
    for round in 1..=plan.append_rounds {
        for (name, client, samples) in
            [("no routes", &none_client, &mut with_none), ("dead route", &dead_client, &mut with_dead)]
        {
            progress(format_args!("  round {round}/{}: appends at the site with {name}", plan.append_rounds));
            samples.extend(append_window(client, plan.append_window).await?);
        }
    }
    report.dead_appends = with_dead.len();
    report.none_appends = with_none.len();
    report.dead_p50_ms = quantile(&with_dead, 0.5).unwrap_or(0.0);
    report.dead_p99_ms = quantile(&with_dead, 0.99).unwrap_or(0.0);
    report.none_p50_ms = quantile(&with_none, 0.5).unwrap_or(0.0);
    report.none_p99_ms = quantile(&with_none, 0.99).unwrap_or(0.0);
    drop(none);
    let routes = http(dead.http, "GET", "/v1/routes", None).await?;
    report.route_state = routes.pointer("/routes/0/state").and_then(Value::as_str).unwrap_or("unknown").to_owned();

    let mut written = 0u64;
    for step in plan.backlog_steps {
        progress(format_args!("  backlog: filling to {step} events of {SMALL_PAYLOAD_BYTES} B"));
        let started = Instant::now();
        write_backlog(&dead_client, "telemetry.backlog", step - written, SMALL_PAYLOAD_BYTES, BACKLOG_APPEND_EVENTS)
            .await?;
        let fill_secs = started.elapsed().as_secs_f64();
        written = step;
        // Read the memory the site holds with the backlog, not what its
        // index flushes and compactions use while they catch up: once the
        // site is quiet.
        let pid = dead.guard.pid();
        let quiet = wait_until_quiet(pid).await?;
        let rss = dead.rss_mib()?;
        let stats = http(dead.http, "GET", "/v1/stats", None).await?;
        let figure = |key: &str| stats.get(key).and_then(Value::as_u64).unwrap_or(0);
        progress(format_args!(
            "  backlog {step}: RSS {rss:.1} MiB (filled in {fill_secs:.1} s, {quiet}); index: {} tables, \
             {:.1} MiB pinned, {:.1} MiB cached, tail {}",
            figure("index_tables"),
            figure("index_pinned_bytes") as f64 / 1_048_576.0,
            figure("index_cache_bytes") as f64 / 1_048_576.0,
            figure("index_tail"),
        ));
        report.backlog.push((step, rss, fill_secs));
        report.backlog_split.push((status_mib(pid, "RssAnon:")?, status_mib(pid, "RssFile:")?, figure("index_tail")));
    }
    Ok(report)
}

/// [`APPEND_PRODUCERS`] producers, each appending one event at a time for
/// `window` after a short warm-up; the latencies in ms.
async fn append_window(client: &Client, window: Duration) -> anyhow::Result<Vec<f64>> {
    let warmup = Duration::from_millis(300);
    let start = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for producer in 0..APPEND_PRODUCERS {
        let client = client.clone();
        let stream = StreamName::new(&format!("local.p{producer}")).expect("a valid name");
        producers.spawn(async move {
            let mut samples = Vec::new();
            while start.elapsed() < warmup + window {
                let sent = Instant::now();
                let event = event(vec![b'l'; SMALL_PAYLOAD_BYTES], "Local");
                client
                    .append(stream.clone(), ExpectedVersion::Any, vec![event])
                    .await
                    .context("a local append failed")?;
                if sent.duration_since(start) >= warmup {
                    samples.push(sent.elapsed().as_secs_f64() * 1e3);
                }
            }
            anyhow::Ok(samples)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = producers.join_next().await {
        all.extend(done.context("a producer failed")??);
    }
    Ok(all)
}

// ---------------------------------------------------------------------------
// Report

struct Check {
    target: String,
    measured: String,
    pass: Option<bool>,
}

fn checks(links: &[LinkFigures], dead: Option<&DeadRoute>) -> Vec<Check> {
    let mut checks = Vec::new();
    for f in links.iter().filter(|f| f.system == "edgebus") {
        let ratio = f.goodput_ratio();
        checks.push(Check {
            target: format!("{}: goodput >= {TARGET_GOODPUT_RATIO}x raw TCP", f.link),
            measured: ratio.map_or("not measured".into(), |r| format!("{r:.3}x")),
            pass: ratio.map(|r| r >= TARGET_GOODPUT_RATIO),
        });
        let ratio = f.critical_ratio();
        checks.push(Check {
            target: format!("{}: critical p99 beside saturated bulk <= {TARGET_CRITICAL_P99_RATIO}x alone", f.link),
            measured: ratio.map_or("not measured".into(), |r| {
                format!(
                    "{r:.2}x ({:.1} ms vs {:.1} ms)",
                    f.critical_loaded_p99_ms.unwrap_or(0.0),
                    f.p99_ms.unwrap_or(0.0)
                )
            }),
            pass: ratio.map(|r| r <= TARGET_CRITICAL_P99_RATIO),
        });
    }
    let Some(dead) = dead else { return checks };
    if let [(small, small_rss, _), (large, large_rss, _)] = dead.backlog[..] {
        let drift = large_rss / small_rss - 1.0;
        let tails = dead.backlog_split.iter().map(|&(_, _, tail)| tail.to_string()).collect::<Vec<_>>().join(" and ");
        checks.push(Check {
            target: format!("RSS flat (within {:.0}%) between {small} and {large} backlog", TARGET_RSS_DRIFT * 100.0),
            measured: format!(
                "{small_rss:.1} MiB -> {large_rss:.1} MiB ({:+.1}%; the index tail held {tails} changes)",
                drift * 100.0
            ),
            pass: Some(drift.abs() <= TARGET_RSS_DRIFT),
        });
    }
    let ratio = dead.dead_p99_ms / dead.none_p99_ms;
    checks.push(Check {
        target: format!("append p99 with a dead route <= {TARGET_DEAD_ROUTE_P99_RATIO}x with no routes"),
        measured: format!("{ratio:.2}x ({:.2} ms vs {:.2} ms)", dead.dead_p99_ms, dead.none_p99_ms),
        pass: Some(ratio <= TARGET_DEAD_ROUTE_P99_RATIO),
    });
    checks
}

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "N/A ",
    }
}

fn print_report(header: &Header, links: &[LinkFigures], dead: Option<&DeadRoute>, nats_note: &Option<String>) {
    println!("edgebus bench wan{} — {}", if header.quick { " --quick" } else { "" }, header.date);
    println!("machine:    {}", header.machine);
    println!("filesystem: {}", header.filesystem);
    println!(
        "durability: fsync=always at both sites; sites are child processes `edgebus serve --gateway`; the link emulator runs in the bench process"
    );
    if let [Some(start), Some(end)] = header.load {
        println!("load:       {start:.2} at start, {end:.2} at end (1-minute average); ran {:.0} s", header.elapsed_s);
    }
    println!(
        "workload:   goodput = {BULK_PAYLOAD_BYTES} B events backlogged at eu then replicated (payload bytes/s at a us subscriber, first to last arrival); \
         latency = one {CRITICAL_PAYLOAD_BYTES} B event at a time, {CRITICAL_EVENTS_PER_SEC}/s, producer send -> us subscriber"
    );
    println!();
    println!(
        "{:<8} {:<12} {:>9} {:>10} {:>7} {:>8} {:>8} {:>12} {:>12} {:>7} {:>10}",
        "system",
        "link",
        "raw Mb/s",
        "good Mb/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "crit p50 ld",
        "crit p99 ld",
        "x p99",
        "bulk Mb/s"
    );
    let opt =
        |v: Option<f64>, scale: f64, digits: usize| v.map_or("-".to_owned(), |v| format!("{:.digits$}", v / scale));
    for f in links {
        println!(
            "{:<8} {:<12} {:>9.2} {:>10} {:>7} {:>8} {:>8} {:>12} {:>12} {:>7} {:>10}",
            f.system,
            f.link,
            f.raw_bps / 1e6,
            opt(f.goodput_bps, 1e6, 2),
            opt(f.goodput_ratio(), 1.0, 3),
            opt(f.p50_ms, 1.0, 1),
            opt(f.p99_ms, 1.0, 1),
            opt(f.critical_loaded_p50_ms, 1.0, 1),
            opt(f.critical_loaded_p99_ms, 1.0, 1),
            opt(f.critical_ratio(), 1.0, 2),
            opt(f.bulk_loaded_bps, 1e6, 2),
        );
        if !f.note.is_empty() {
            println!("         note: {}", f.note.trim_end_matches("; "));
        }
        if !f.route_while_sending.is_empty() {
            println!("         route while sending: {}", f.route_while_sending);
        }
    }
    if let Some(note) = nats_note {
        println!("{note}");
    }
    if let Some(dead) = dead {
        print_dead_route(dead);
    }
    println!();
    for check in checks(links, dead) {
        println!("{} {} (measured {})", verdict(check.pass), check.target, check.measured);
    }
}

fn print_dead_route(dead: &DeadRoute) {
    println!();
    println!(
        "local appends ({APPEND_PRODUCERS} producers, one {SMALL_PAYLOAD_BYTES} B event per append): dead route ({}) p50 {:.2} ms p99 {:.2} ms over {} appends; \
         no routes p50 {:.2} ms p99 {:.2} ms over {} appends",
        dead.route_state,
        dead.dead_p50_ms,
        dead.dead_p99_ms,
        dead.dead_appends,
        dead.none_p50_ms,
        dead.none_p99_ms,
        dead.none_appends
    );
    println!("backlog of the dead route (sending site's RSS): empty {:.1} MiB", dead.rss_empty_mb);
    for ((events, rss, secs), (anon, file, tail)) in dead.backlog.iter().zip(&dead.backlog_split) {
        println!(
            "  {events:>10} events: {rss:.1} MiB = {anon:.1} MiB anonymous + {file:.1} MiB mapped files, index tail {tail} changes (filled at {:.0} events/s)",
            *events as f64 / secs.max(1e-9)
        );
    }
}

fn print_json(
    header: &Header,
    links: &[LinkFigures],
    dead: Option<&DeadRoute>,
    nats_note: &Option<String>,
) -> anyhow::Result<()> {
    let base = |kind: &str| {
        json!({
            "bench": "wan",
            "kind": kind,
            "date": header.date,
            "machine": header.machine,
            "filesystem": header.filesystem,
            "quick": header.quick,
            "system": "edgebus",
            "link": null,
            "goodput_ratio": null,
            "p50_ms": null,
            "p99_ms": null,
            "critical_p99_ratio": null,
            "backlog_events": null,
            "rss_mb": null,
        })
    };
    let mut lines = Vec::new();
    for f in links {
        let mut row = base("link");
        let fields = json!({
            "system": f.system,
            "link": f.link,
            "raw_mbit_s": f.raw_bps / 1e6,
            "goodput_mbit_s": f.goodput_bps.map(|g| g / 1e6),
            "goodput_ratio": f.goodput_ratio(),
            "goodput_events": f.goodput_events,
            "goodput_complete": f.goodput_complete,
            "latency_samples": f.latency_samples,
            "p50_ms": f.p50_ms,
            "p99_ms": f.p99_ms,
            "critical_loaded_p50_ms": f.critical_loaded_p50_ms,
            "critical_loaded_p99_ms": f.critical_loaded_p99_ms,
            "critical_p99_ratio": f.critical_ratio(),
            "bulk_loaded_mbit_s": f.bulk_loaded_bps.map(|b| b / 1e6),
            "bulk_left_events": f.bulk_left_events,
            "note": f.note.trim_end_matches("; "),
            "route_while_sending": f.route_while_sending,
        });
        merge(&mut row, fields);
        lines.push(row);
    }
    if let Some(note) = nats_note {
        let mut row = base("note");
        merge(&mut row, json!({"system": "nats", "note": note}));
        lines.push(row);
    }
    if let Some(dead) = dead {
        lines.extend(dead_route_json(dead, base));
    }
    for check in checks(links, dead) {
        let mut row = base("target_check");
        merge(&mut row, json!({"target": check.target, "measured": check.measured, "pass": check.pass}));
        lines.push(row);
    }
    for line in lines {
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

/// The JSON rows of the dead route and its backlog.
fn dead_route_json(dead: &DeadRoute, base: impl Fn(&str) -> Value) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut row = base("dead_route_append");
    merge(
        &mut row,
        json!({
            "link": "dead",
            "route_state": dead.route_state,
            "producers": APPEND_PRODUCERS,
            "dead_route_p50_ms": dead.dead_p50_ms,
            "dead_route_p99_ms": dead.dead_p99_ms,
            "no_routes_p50_ms": dead.none_p50_ms,
            "no_routes_p99_ms": dead.none_p99_ms,
            "append_p99_ratio": dead.dead_p99_ms / dead.none_p99_ms,
        }),
    );
    lines.push(row);
    let mut row = base("backlog");
    merge(&mut row, json!({"link": "dead", "backlog_events": 0, "rss_mb": dead.rss_empty_mb}));
    lines.push(row);
    for ((events, rss, secs), (anon, file, tail)) in dead.backlog.iter().zip(&dead.backlog_split) {
        let mut row = base("backlog");
        merge(
            &mut row,
            json!({
                "link": "dead",
                "backlog_events": events,
                "rss_mb": rss,
                "rss_anon_mb": anon,
                "rss_file_mb": file,
                "index_tail": tail,
                "fill_events_per_s": *events as f64 / secs.max(1e-9),
            }),
        );
        lines.push(row);
    }
    lines
}

fn merge(row: &mut Value, fields: Value) {
    if let (Value::Object(row), Value::Object(fields)) = (row, fields) {
        row.extend(fields);
    }
}

/// A progress line on stderr; a closed stderr is no reason to stop.
fn progress(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Fails when `got` did not arrive; used by the NATS side.
fn ensure_arrived(got: usize, sent: usize, what: &str) -> anyhow::Result<()> {
    if got == 0 && sent > 0 {
        bail!("none of the {sent} {what} arrived");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.5), Some(2.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&hundred, 0.99), Some(99.0));
    }

    #[test]
    fn arrival_stalls_count_only_the_long_gaps() {
        let start = Instant::now();
        let at = |ms: u64| (start + Duration::from_millis(ms), 1024);
        let samples = [at(0), at(5), at(10), at(40), at(45), at(145), at(150)];
        assert_eq!(arrival_stalls(&samples), "2 arrival gaps over 20 ms, 130 ms in all, the largest 100 ms");
        assert_eq!(arrival_stalls(&[]), "0 arrival gaps over 20 ms, 0 ms in all, the largest 0 ms");
    }

    #[test]
    fn stamps_round_trip() {
        let clock = Instant::now();
        let data = stamped(clock, CRITICAL_PAYLOAD_BYTES);
        assert_eq!(data.len(), CRITICAL_PAYLOAD_BYTES);
        let ms = latency_ms(clock, Instant::now(), &data).expect("a stamp");
        assert!((0.0..1000.0).contains(&ms), "{ms}");
    }
}
