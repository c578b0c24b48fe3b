//! `edgebus bench node`: a real node over loopback against NATS JetStream
//! and PostgreSQL, measured in the same run.
//!
//! It starts `edgebus serve` (this executable) with `fsync=always`, and the
//! peers, installing them with apt-get when they are missing: Debian's
//! `nats-server -js` with file storage, and a private PostgreSQL cluster
//! (`fsync=on`, `synchronous_commit=on`) holding the usual event store table
//! `events(stream, version, position, type, data)` with the primary key
//! `(stream, version)`. A peer that cannot be installed or started is
//! reported as not run, and the rest goes on.
//!
//! Then, over loopback and through each system's own client:
//!
//! 1. publish with acknowledgement from 1, 16 and 256 concurrent clients,
//!    100 B and 1 KiB payloads, each client on its own stream (subject,
//!    PostgreSQL stream) and waiting for each ack: events/s and ack latency,
//!    with each of our figures as a ratio to each peer's;
//! 2. end-to-end latency, publish → subscriber, on our node;
//! 3. fan-out to 100 subscribers of one stream on our node.
//!
//! NATS JetStream acknowledges before it fsyncs; 2.9 cannot fsync each
//! write (`sync_interval: always` came in 2.10). For a comparison at equal
//! durability a second node of ours runs with fsync on the same 2-minute
//! interval ("edgebus-relaxed"); a `nats-server` that accepts
//! `sync_interval: always` (`--nats-server PATH`) is also measured that way
//! ("nats-sync"). The targets are checked at 256 clients between equal
//! durabilities; the report says which pairs those were.

mod drive;
mod peers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use edgebus_log::FsyncPolicy;
use serde::Serialize;

use super::histogram::Histogram;
use super::machine::{Filesystem, Machine, load_average, utc_now};
use drive::{CLIENTS_PER_CONNECTION, Measured, Target};

/// Arguments of `edgebus bench node`.
#[derive(Debug, Clone, Args)]
pub struct NodeBenchArgs {
    /// About 2 s per workload (a few minutes in all) instead of 10 s.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object with every figure instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Directory to create the scratch directory in (default: ./target if it exists, else $TMPDIR).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The nats-server binary [default: nats-server on PATH, installed with apt-get if missing]. One
    /// that accepts `sync_interval: always` (2.10 and later) is also measured with fsync per write.
    #[arg(long, value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
    /// Do not run NATS JetStream.
    #[arg(long)]
    pub no_nats: bool,
    /// Do not run PostgreSQL.
    #[arg(long)]
    pub no_postgres: bool,
}

/// Payload sizes, bytes.
const PAYLOAD_BYTES: [usize; 2] = [100, 1024];
/// Concurrent publishing clients.
const CLIENTS: [usize; 3] = [1, 16, 256];
/// The measured window of each workload and the warm-up before it.
const WINDOW_FULL: Duration = Duration::from_secs(10);
const WINDOW_QUICK: Duration = Duration::from_secs(2);
const WARMUP_FULL: Duration = Duration::from_secs(1);
const WARMUP_QUICK: Duration = Duration::from_millis(250);
/// Publishers of the end-to-end runs.
const END_TO_END_CLIENTS: [usize; 2] = [1, 16];
const END_TO_END_PAYLOAD_BYTES: usize = 100;
/// Fan-out: subscribers of one stream, publishers, events.
const FAN_OUT_SUBSCRIBERS: usize = 100;
const FAN_OUT_PUBLISHERS: usize = 16;
const FAN_OUT_EVENTS_FULL: u64 = 10_000;
const FAN_OUT_EVENTS_QUICK: u64 = 2_000;
const FAN_OUT_PAYLOAD_BYTES: usize = 100;
/// Where the targets are checked.
const TARGET_CLIENTS: usize = 256;
const TARGET_NATS_THROUGHPUT_RATIO_MIN: f64 = 2.0;
const TARGET_NATS_P99_RATIO_MAX: f64 = 1.0;
const TARGET_POSTGRES_THROUGHPUT_RATIO_MIN: f64 = 5.0;
/// The fsync interval of "edgebus-relaxed": NATS's default sync interval.
const RELAXED_FSYNC_INTERVAL: Duration = Duration::from_secs(120);

/// A system measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum System {
    /// Our node, `fsync=always`.
    Edgebus,
    /// Our node, fsync every [`RELAXED_FSYNC_INTERVAL`] (NATS's durability).
    EdgebusRelaxed,
    /// NATS JetStream, file storage, its default sync interval.
    Nats,
    /// NATS JetStream, file storage, `sync_interval: always`.
    NatsSync,
    /// PostgreSQL, `fsync=on`, `synchronous_commit=on`.
    Postgres,
}

impl System {
    const ALL: [Self; 5] = [Self::Edgebus, Self::EdgebusRelaxed, Self::Nats, Self::NatsSync, Self::Postgres];

    fn name(self) -> &'static str {
        match self {
            Self::Edgebus => "edgebus",
            Self::EdgebusRelaxed => "edgebus-relaxed",
            Self::Nats => "nats",
            Self::NatsSync => "nats-sync",
            Self::Postgres => "postgres",
        }
    }

    /// The name in a ratio: `2.31× nats`.
    fn short(self) -> &'static str {
        match self {
            Self::Postgres => "pg",
            other => other.name(),
        }
    }

    fn is_ours(self) -> bool {
        matches!(self, Self::Edgebus | Self::EdgebusRelaxed)
    }

    /// Whether an acknowledgement means the event was fsynced.
    fn fsync_per_ack(self) -> bool {
        matches!(self, Self::Edgebus | Self::NatsSync | Self::Postgres)
    }
}

/// One ratio of ours to a peer's, same cell.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Ratio {
    /// Our events/s over the peer's.
    events_per_s: f64,
    /// Our p50 and p99 ack latency over the peer's (below 1: ours is lower).
    p50: Option<f64>,
    p99: Option<f64>,
    /// Whether both acknowledge at the same durability.
    equal_durability: bool,
}

/// One publish-with-ack cell of one system.
#[derive(Debug, Clone, Serialize)]
struct PublishRow {
    system: System,
    clients: usize,
    payload_bytes: usize,
    connections: usize,
    events: u64,
    window_s: f64,
    events_per_s: f64,
    mb_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// For our systems: ratios to each peer measured in the same cell, by peer name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    ratios: BTreeMap<&'static str, Ratio>,
}

fn quantile_us(latency: &Histogram, quantile: f64) -> Option<f64> {
    latency.quantile(quantile).map(|d| d.as_secs_f64() * 1e6)
}

impl PublishRow {
    fn new(system: System, clients: usize, payload_bytes: usize, measured: &Measured) -> Self {
        let events_per_s = measured.events as f64 / measured.window.as_secs_f64();
        Self {
            system,
            clients,
            payload_bytes,
            connections: measured.connections,
            events: measured.events,
            window_s: measured.window.as_secs_f64(),
            events_per_s,
            mb_per_s: events_per_s * payload_bytes as f64 / 1e6,
            p50_us: quantile_us(&measured.latency, 0.5),
            p99_us: quantile_us(&measured.latency, 0.99),
            ratios: BTreeMap::new(),
        }
    }
}

/// Fills in the ratios of each of our rows to each peer row of the same cell.
fn add_ratios(rows: &mut [PublishRow]) {
    let peers: Vec<PublishRow> = rows.iter().filter(|r| !r.system.is_ours()).cloned().collect();
    for row in rows.iter_mut().filter(|r| r.system.is_ours()) {
        for peer in peers.iter().filter(|p| p.clients == row.clients && p.payload_bytes == row.payload_bytes) {
            let over = |ours: Option<f64>, theirs: Option<f64>| Some(ours? / theirs.filter(|t| *t > 0.0)?);
            let ratio = Ratio {
                events_per_s: row.events_per_s / peer.events_per_s.max(f64::MIN_POSITIVE),
                p50: over(row.p50_us, peer.p50_us),
                p99: over(row.p99_us, peer.p99_us),
                equal_durability: row.system.fsync_per_ack() == peer.system.fsync_per_ack(),
            };
            row.ratios.insert(peer.system.short(), ratio);
        }
    }
}

/// `2.31×`: three significant digits, at most two decimals.
fn format_ratio(ratio: f64) -> String {
    let digits = if ratio >= 100.0 {
        0
    } else if ratio >= 10.0 {
        1
    } else {
        2
    };
    format!("{ratio:.digits$}×")
}

/// `2.31× nats, 7.90× pg*` (`*`: equal durability) from ratios picked by `pick`.
fn format_ratios(ratios: &BTreeMap<&'static str, Ratio>, pick: impl Fn(&Ratio) -> Option<f64>) -> String {
    let parts: Vec<String> = System::ALL
        .iter()
        .filter_map(|peer| {
            let ratio = ratios.get(peer.short())?;
            let value = pick(ratio)?;
            Some(format!("{} {}{}", format_ratio(value), peer.short(), if ratio.equal_durability { "*" } else { "" }))
        })
        .collect();
    if parts.is_empty() { "-".to_owned() } else { parts.join(", ") }
}

/// Whether a target was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
enum Verdict {
    Pass,
    Fail,
    /// A comparison printed for information, not a target (unequal durability).
    Info,
    /// A peer needed for the target did not run.
    Skip,
}

/// One target and how this run did.
#[derive(Debug, Clone, Serialize)]
struct Check {
    verdict: Verdict,
    target: String,
    measured: Option<f64>,
    required: Option<f64>,
    detail: String,
}

/// The pair of systems the NATS targets compare: equal durability, with
/// fsync per ack if the NATS server can do it.
fn nats_pair(present: &[System]) -> Option<(System, System, &'static str)> {
    if present.contains(&System::Edgebus) && present.contains(&System::NatsSync) {
        Some((System::Edgebus, System::NatsSync, "equal durability: both fsync before each ack"))
    } else if present.contains(&System::EdgebusRelaxed) && present.contains(&System::Nats) {
        Some((
            System::EdgebusRelaxed,
            System::Nats,
            "equal durability: both ack before fsync, fsync every 2 min; this nats-server cannot fsync per write",
        ))
    } else {
        None
    }
}

/// Checks the targets at [`TARGET_CLIENTS`] clients for each payload size.
fn check_targets(rows: &[PublishRow]) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut present: Vec<System> = rows.iter().map(|r| r.system).collect();
    present.sort();
    present.dedup();
    for payload_bytes in PAYLOAD_BYTES {
        let cell = format!("{TARGET_CLIENTS} clients, {}", payload_label(payload_bytes));
        let row = |system| {
            rows.iter().find(|r| r.system == system && r.clients == TARGET_CLIENTS && r.payload_bytes == payload_bytes)
        };
        let ratio = |ours: System, peer: System| row(ours).and_then(|r| r.ratios.get(peer.short()).copied());
        match nats_pair(&present) {
            Some((ours, peer, why)) => {
                let ratio = ratio(ours, peer);
                let throughput = ratio.map(|r| r.events_per_s);
                checks.push(Check {
                    verdict: verdict(throughput.map(|t| t >= TARGET_NATS_THROUGHPUT_RATIO_MIN)),
                    target: format!(
                        "publish-with-ack events/s, {cell}: {} >= {TARGET_NATS_THROUGHPUT_RATIO_MIN}x {}",
                        ours.name(),
                        peer.name()
                    ),
                    measured: throughput,
                    required: Some(TARGET_NATS_THROUGHPUT_RATIO_MIN),
                    detail: why.to_owned(),
                });
                let p99 = ratio.and_then(|r| r.p99);
                checks.push(Check {
                    verdict: verdict(p99.map(|p| p <= TARGET_NATS_P99_RATIO_MAX)),
                    target: format!("p99 ack latency, {cell}: {} <= {}", ours.name(), peer.name()),
                    measured: p99,
                    required: Some(TARGET_NATS_P99_RATIO_MAX),
                    detail: why.to_owned(),
                });
            }
            None => checks.push(Check {
                verdict: Verdict::Skip,
                target: format!("publish-with-ack events/s and p99, {cell}: edgebus vs nats at equal durability"),
                measured: None,
                required: None,
                detail: "nats did not run".to_owned(),
            }),
        }
        if nats_pair(&present).is_some_and(|(ours, _, _)| ours != System::Edgebus)
            && let Some(r) = ratio(System::Edgebus, System::Nats)
        {
            checks.push(Check {
                verdict: Verdict::Info,
                target: format!("{cell}: edgebus (fsync per ack) vs nats (no fsync per ack)"),
                measured: Some(r.events_per_s),
                required: None,
                detail: format!(
                    "not equal durability: events/s {}, p99 {}",
                    format_ratio(r.events_per_s),
                    r.p99.map_or_else(|| "-".to_owned(), format_ratio)
                ),
            });
        }
        let throughput = ratio(System::Edgebus, System::Postgres).map(|r| r.events_per_s);
        checks.push(Check {
            verdict: if present.contains(&System::Postgres) {
                verdict(throughput.map(|t| t >= TARGET_POSTGRES_THROUGHPUT_RATIO_MIN))
            } else {
                Verdict::Skip
            },
            target: format!(
                "publish-with-ack events/s, {cell}: edgebus >= {TARGET_POSTGRES_THROUGHPUT_RATIO_MIN}x postgres"
            ),
            measured: throughput,
            required: Some(TARGET_POSTGRES_THROUGHPUT_RATIO_MIN),
            detail: if present.contains(&System::Postgres) {
                "equal durability: both fsync before each ack".to_owned()
            } else {
                "postgres did not run".to_owned()
            },
        });
    }
    checks
}

fn verdict(met: Option<bool>) -> Verdict {
    match met {
        Some(true) => Verdict::Pass,
        Some(false) => Verdict::Fail,
        None => Verdict::Skip,
    }
}

fn payload_label(bytes: usize) -> String {
    if bytes.is_multiple_of(1024) { format!("{} KiB", bytes / 1024) } else { format!("{bytes} B") }
}

/// Whether a peer ran, and what it is.
#[derive(Debug, Clone, Serialize)]
struct PeerStatus {
    system: System,
    ran: bool,
    /// Why it did not run (or stopped running).
    reason: Option<String>,
    version: Option<String>,
}

impl PeerStatus {
    fn ran(system: System, version: &str) -> Self {
        Self { system, ran: true, reason: None, version: Some(version.to_owned()) }
    }

    fn not_run(system: System, reason: String, version: Option<&str>) -> Self {
        Self { system, ran: false, reason: Some(reason), version: version.map(str::to_owned) }
    }
}

/// One end-to-end row.
#[derive(Debug, Clone, Serialize)]
struct EndToEndRow {
    system: System,
    clients: usize,
    payload_bytes: usize,
    events: u64,
    window_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

/// The fan-out figures.
#[derive(Debug, Clone, Serialize)]
struct FanOutRow {
    system: System,
    subscribers: usize,
    publishers: usize,
    events: u64,
    payload_bytes: usize,
    publish_s: f64,
    last_delivery_s: f64,
    deliveries_per_s: f64,
    delivery_p50_us: Option<f64>,
    delivery_p99_us: Option<f64>,
}

/// Everything one run measured; `--json` prints it as one object.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    date: String,
    quick: bool,
    machine: Machine,
    filesystem: Filesystem,
    load_average_start: Option<[f64; 3]>,
    load_average_end: Option<[f64; 3]>,
    warmup_s: f64,
    window_s: f64,
    clients_per_connection: usize,
    /// What an acknowledgement means for each system that ran.
    durability: BTreeMap<System, String>,
    peers: Vec<PeerStatus>,
    publish: Vec<PublishRow>,
    end_to_end: Vec<EndToEndRow>,
    fan_out: Option<FanOutRow>,
    checks: Vec<Check>,
}

/// Runs the node benchmark and prints the report.
pub fn run(args: &NodeBenchArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.dir.as_deref(), "edgebus-bench-node-")?;
    let dir = scratch.path().canonicalize().context("cannot resolve the scratch directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-bench")
        .build()
        .context("cannot start the async runtime")?;
    // Ctrl-C drops the benchmark's future, and with it the guards of every
    // process it started; then the scratch directory goes.
    let result = runtime.block_on(async {
        tokio::select! {
            result = measure(args, &dir) => result,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("edgebus bench node: interrupted: stopping the processes and removing {}", dir.display());
                Err(anyhow::anyhow!("interrupted"))
            }
        }
    });
    // A startup still running on the blocking pool returns a guard that stops
    // its process as it is dropped; it is bounded by the startup timeout.
    runtime.shutdown_timeout(peers::STARTUP_TIMEOUT + Duration::from_secs(10));
    scratch.close().with_context(|| format!("cannot remove the scratch directory {}", dir.display()))?;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// The systems of one run: the processes (their guards stop them when the
/// fleet is dropped), how to reach each, and what each acknowledgement means.
#[derive(Debug, Default)]
struct Fleet {
    nodes: Vec<peers::EdgebusNode>,
    nats: Vec<peers::NatsServer>,
    postgres: Option<peers::Postgres>,
    targets: Vec<(System, Target)>,
    durability: BTreeMap<System, String>,
    peers: Vec<PeerStatus>,
}

impl Fleet {
    fn add(&mut self, system: System, target: Target, durability: String) {
        self.targets.push((system, target));
        self.durability.insert(system, durability);
    }

    /// NATS with its default durability; with fsync per write too if the
    /// server can; and our node at NATS's default durability.
    async fn start_nats(&mut self, given: Option<PathBuf>, dir: &Path) -> anyhow::Result<()> {
        let nats_dir = dir.join("nats");
        let (binary, default, sync) = blocking(move || {
            let path = peers::find_nats_server(given.as_deref())?;
            let binary = peers::probe_nats(&path, &nats_dir)?;
            let default = peers::start_nats(&binary, &nats_dir.join("default"), false)?;
            let sync = binary.sync_always_supported.then(|| peers::start_nats(&binary, &nats_dir.join("sync"), true));
            Ok((binary, default, sync))
        })
        .await?;
        drive::prepare_nats(default.addr).await?;
        eprintln!("  nats-server {} (pid {}) on {}", binary.version, default.guard.pid(), default.addr);
        let cannot_sync =
            "; this version cannot fsync each write (it refuses `sync_interval: always`, which came in 2.10)";
        self.add(
            System::Nats,
            Target::Nats(default.addr),
            format!(
                "nats-server {} -js, file storage, default settings: ack once written to the OS, fsync on the sync \
                 interval (2 min by default){}",
                binary.version,
                if binary.sync_always_supported { "" } else { cannot_sync }
            ),
        );
        self.nats.push(default);
        self.peers.push(PeerStatus::ran(System::Nats, &binary.version));
        let sync = match sync {
            Some(Ok(server)) => drive::prepare_nats(server.addr).await.map(|()| server),
            Some(Err(error)) => Err(error),
            None => Err(anyhow::anyhow!("nats-server {} refuses `sync_interval: always`", binary.version)),
        };
        match sync {
            Ok(server) => {
                eprintln!(
                    "  nats-server {} sync_interval=always (pid {}) on {}",
                    binary.version,
                    server.guard.pid(),
                    server.addr
                );
                self.add(
                    System::NatsSync,
                    Target::Nats(server.addr),
                    format!(
                        "nats-server {} -js, file storage, sync_interval: always (fsync each write)",
                        binary.version
                    ),
                );
                self.nats.push(server);
                self.peers.push(PeerStatus::ran(System::NatsSync, &binary.version));
            }
            Err(error) => {
                self.peers.push(PeerStatus::not_run(System::NatsSync, format!("{error:#}"), Some(&binary.version)));
            }
        }
        let relaxed_dir = dir.join("edgebus-relaxed");
        let fsync = FsyncPolicy::Interval(RELAXED_FSYNC_INTERVAL);
        let relaxed =
            blocking(move || peers::start_edgebus(&relaxed_dir, fsync)).await.context("edgebus serve (relaxed)")?;
        eprintln!("  edgebus serve (fsync={fsync}, pid {}) on {}", relaxed.guard.pid(), relaxed.grpc);
        self.add(
            System::EdgebusRelaxed,
            Target::Edgebus(relaxed.grpc),
            format!(
                "fsync={fsync}: ack once written to the OS, fdatasync at least every {} s (as nats)",
                RELAXED_FSYNC_INTERVAL.as_secs()
            ),
        );
        self.nodes.push(relaxed);
        Ok(())
    }

    /// A private PostgreSQL cluster with the events table.
    async fn start_postgres(&mut self, dir: &Path) -> anyhow::Result<()> {
        let pg_dir = dir.join("postgres");
        let pg = blocking(move || peers::start_postgres(&pg_dir)).await?;
        let settings = drive::prepare_postgres(&pg.connection_string()).await?;
        eprintln!("  {} on 127.0.0.1:{}", pg.version, pg.port);
        let settings: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.add(
            System::Postgres,
            Target::Postgres(pg.connection_string()),
            format!("{}, {}: each commit waits for its WAL flush", pg.version, settings.join(" ")),
        );
        self.peers.push(PeerStatus::ran(System::Postgres, &pg.version));
        self.postgres = Some(pg);
        Ok(())
    }
}

/// Runs `work` on the blocking pool (process starts and installs).
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await.context("a blocking task panicked")?
}

/// Starts everything, measures, and stops everything (guards, in reverse order).
async fn measure(args: &NodeBenchArgs, dir: &Path) -> anyhow::Result<Report> {
    let machine = Machine::detect();
    let filesystem = Filesystem::of(dir)?;
    let (warmup, window) = if args.quick { (WARMUP_QUICK, WINDOW_QUICK) } else { (WARMUP_FULL, WINDOW_FULL) };
    eprintln!("edgebus bench node: scratch dir {} ({})", dir.display(), filesystem.describe());
    if filesystem.is_memory_backed() {
        eprintln!("warning: {} keeps data in memory: fsync reaches no disk; use --dir", filesystem.fs_type);
    }
    let load_average_start = load_average();
    let mut fleet = Fleet::default();
    let node_dir = dir.join("edgebus");
    let node = blocking(move || peers::start_edgebus(&node_dir, FsyncPolicy::Always)).await.context("edgebus serve")?;
    eprintln!("  edgebus serve (fsync=always, pid {}) on {}", node.guard.pid(), node.grpc);
    fleet.add(
        System::Edgebus,
        Target::Edgebus(node.grpc),
        "fsync=always: each ack follows the fdatasync of the group commit holding the event".to_owned(),
    );
    let grpc = node.grpc;
    fleet.nodes.push(node);
    if args.no_nats {
        fleet.peers.push(PeerStatus::not_run(System::Nats, "--no-nats".to_owned(), None));
    } else if let Err(error) = fleet.start_nats(args.nats_server.clone(), dir).await {
        fleet.peers.push(PeerStatus::not_run(System::Nats, format!("{error:#}"), None));
    }
    if args.no_postgres {
        fleet.peers.push(PeerStatus::not_run(System::Postgres, "--no-postgres".to_owned(), None));
    } else if let Err(error) = fleet.start_postgres(dir).await {
        fleet.peers.push(PeerStatus::not_run(System::Postgres, format!("{error:#}"), None));
    }
    for status in fleet.peers.iter().filter(|s| !s.ran) {
        eprintln!("  peer {}: not run ({})", status.system.name(), status.reason.as_deref().unwrap_or("?"));
    }

    // The cells, each system in turn, so that drift on the machine hits them alike.
    let mut rows = Vec::new();
    let mut failed: BTreeMap<System, String> = BTreeMap::new();
    for clients in CLIENTS {
        for payload_bytes in PAYLOAD_BYTES {
            for (system, target) in &fleet.targets {
                if failed.contains_key(system) {
                    continue;
                }
                eprintln!("  {clients} clients, {}: {} ...", payload_label(payload_bytes), system.name());
                let tag = format!("n{clients}p{payload_bytes}");
                let result = drive::publish_cell(target, clients, payload_bytes, warmup, window, &tag).await;
                let result = match (result, target) {
                    (Ok(measured), Target::Nats(addr)) => drive::purge_nats(*addr).await.map(|()| measured),
                    (result, _) => result,
                };
                match result {
                    Ok(measured) => rows.push(PublishRow::new(*system, clients, payload_bytes, &measured)),
                    Err(error) if system.is_ours() => {
                        return Err(error.context(format!("{} at {clients} clients", system.name())));
                    }
                    Err(error) => {
                        let reason =
                            format!("failed at {clients} clients, {}: {error:#}", payload_label(payload_bytes));
                        eprintln!("  peer {}: {reason}", system.name());
                        failed.insert(*system, reason);
                    }
                }
            }
        }
    }
    for status in &mut fleet.peers {
        if let Some(reason) = failed.remove(&status.system) {
            status.reason = Some(reason);
        }
    }
    add_ratios(&mut rows);

    let mut end_to_end = Vec::new();
    for clients in END_TO_END_CLIENTS {
        eprintln!("  end-to-end latency, {clients} publishers, 1 subscriber ...");
        let tag = format!("n{clients}");
        let measured = drive::end_to_end(grpc, clients, END_TO_END_PAYLOAD_BYTES, warmup, window, &tag)
            .await
            .context("end-to-end")?;
        end_to_end.push(EndToEndRow {
            system: System::Edgebus,
            clients,
            payload_bytes: END_TO_END_PAYLOAD_BYTES,
            events: measured.events,
            window_s: measured.window.as_secs_f64(),
            p50_us: quantile_us(&measured.latency, 0.5),
            p99_us: quantile_us(&measured.latency, 0.99),
        });
    }
    let fan_out_events = if args.quick { FAN_OUT_EVENTS_QUICK } else { FAN_OUT_EVENTS_FULL };
    eprintln!("  fan-out, {FAN_OUT_SUBSCRIBERS} subscribers, {fan_out_events} events ...");
    let fan = drive::fan_out(grpc, FAN_OUT_SUBSCRIBERS, FAN_OUT_PUBLISHERS, fan_out_events, FAN_OUT_PAYLOAD_BYTES, "a")
        .await
        .context("fan-out")?;
    let fan_out = Some(FanOutRow {
        system: System::Edgebus,
        subscribers: fan.subscribers,
        publishers: FAN_OUT_PUBLISHERS,
        events: fan.events,
        payload_bytes: FAN_OUT_PAYLOAD_BYTES,
        publish_s: fan.publish_elapsed.as_secs_f64(),
        last_delivery_s: fan.last_delivery_elapsed.as_secs_f64(),
        deliveries_per_s: (fan.subscribers as u64 * fan.events) as f64 / fan.last_delivery_elapsed.as_secs_f64(),
        delivery_p50_us: quantile_us(&fan.delivery_latency, 0.5),
        delivery_p99_us: quantile_us(&fan.delivery_latency, 0.99),
    });
    let load_average_end = load_average();
    let checks = check_targets(&rows);
    // Stop everything before the report: the guards print as they go.
    let Fleet { durability, peers, .. } = fleet;
    Ok(Report {
        bench: "node",
        date: utc_now(),
        quick: args.quick,
        machine,
        filesystem,
        load_average_start,
        load_average_end,
        warmup_s: warmup.as_secs_f64(),
        window_s: window.as_secs_f64(),
        clients_per_connection: CLIENTS_PER_CONNECTION,
        durability,
        peers,
        publish: rows,
        end_to_end,
        fan_out,
        checks,
    })
}

fn print_report(report: &Report) {
    println!("edgebus bench node — {}", report.date);
    println!("machine:    {}", report.machine.describe());
    println!("filesystem: {}", report.filesystem.describe());
    if let (Some(start), Some(end)) = (report.load_average_start, report.load_average_end) {
        println!("load:       {:.2} at start, {:.2} at end (1-minute average)", start[0], end[0]);
    }
    println!(
        "workload:   each client publishes one event and waits for its ack; {:.0} s measured after {:.2} s of \
         warm-up per cell; edgebus and nats: one connection per {} clients, postgres: one per client (one INSERT \
         per transaction, each client on its own stream); clients and servers share the machine's cores",
        report.window_s, report.warmup_s, report.clients_per_connection
    );
    println!("durability:");
    for (system, text) in &report.durability {
        println!("  {:<16} {text}", system.name());
    }
    for peer in &report.peers {
        match (&peer.reason, peer.ran) {
            (None, _) => println!("peer {}: ran", peer.system.name()),
            (Some(reason), true) => println!("peer {}: stopped ({reason})", peer.system.name()),
            (Some(reason), false) => println!("peer {}: not run ({reason})", peer.system.name()),
        }
    }
    println!();
    println!("publish with ack (ratios: ours over the peer's; * = equal durability)");
    println!(
        "{:>7} {:>7}  {:<16} {:>7} {:>10} {:>8} {:>8} {:>8}  {:<38} p99 vs peers",
        "clients", "payload", "system", "fsync", "events/s", "MB/s", "p50 µs", "p99 µs", "events/s vs peers",
    );
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    for r in &report.publish {
        let ours = r.system.is_ours();
        println!(
            "{:>7} {:>7}  {:<16} {:>7} {:>10.0} {:>8.2} {:>8} {:>8}  {:<38} {}",
            r.clients,
            payload_label(r.payload_bytes),
            r.system.name(),
            if r.system.fsync_per_ack() { "per ack" } else { "2 min" },
            r.events_per_s,
            r.mb_per_s,
            us(r.p50_us),
            us(r.p99_us),
            if ours { format_ratios(&r.ratios, |x| Some(x.events_per_s)) } else { String::new() },
            if ours { format_ratios(&r.ratios, |x| x.p99) } else { String::new() },
        );
    }
    println!();
    println!(
        "end-to-end latency, publish -> subscriber (edgebus, fsync=always; one subscriber on a pattern over the publishers' streams)"
    );
    println!("{:>7} {:>7} {:>10} {:>8} {:>8}", "clients", "payload", "events", "p50 µs", "p99 µs");
    for r in &report.end_to_end {
        println!(
            "{:>7} {:>7} {:>10} {:>8} {:>8}",
            r.clients,
            payload_label(r.payload_bytes),
            r.events,
            us(r.p50_us),
            us(r.p99_us)
        );
    }
    if let Some(f) = &report.fan_out {
        println!();
        println!(
            "fan-out (edgebus, fsync=always): {} subscribers on one stream, {} events of {} from {} clients",
            f.subscribers,
            f.events,
            payload_label(f.payload_bytes),
            f.publishers
        );
        println!(
            "  all acked after {:.2} s ({:.0} events/s); the last subscriber had the last event after {:.2} s",
            f.publish_s,
            f.events as f64 / f.publish_s,
            f.last_delivery_s
        );
        println!(
            "  {:.0} deliveries/s in total; publish -> delivery p50 {} µs, p99 {} µs",
            f.deliveries_per_s,
            us(f.delivery_p50_us),
            us(f.delivery_p99_us)
        );
    }
    println!();
    for c in &report.checks {
        let numbers = match (c.measured, c.required) {
            (Some(measured), Some(required)) => format!(" (measured {measured:.2}, required {required:.2})"),
            _ => String::new(),
        };
        let verdict = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Info => "INFO",
            Verdict::Skip => "SKIP",
        };
        println!("{verdict} {}{numbers}; {}", c.target, c.detail);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn row(system: System, events_per_s: f64, p99_us: f64) -> PublishRow {
        let mut latency = Histogram::default();
        latency.record(Duration::from_secs_f64(p99_us / 1e6));
        let measured = Measured {
            events: (events_per_s * 10.0) as u64,
            window: Duration::from_secs(10),
            latency,
            connections: 16,
        };
        PublishRow::new(system, TARGET_CLIENTS, 100, &measured)
    }

    #[test]
    fn bench_node_parses_its_flags() {
        let cli = crate::Cli::try_parse_from(["edgebus", "bench", "node", "--quick", "--json", "--no-postgres"])
            .expect("parses");
        let crate::Command::Bench(super::super::BenchArgs { target: super::super::BenchTarget::Node(args) }) =
            cli.command
        else {
            panic!("expected bench node");
        };
        assert!(args.quick);
        assert!(args.json);
        assert!(args.no_postgres);
        assert!(!args.no_nats);
        assert_eq!(args.nats_server, None);
    }

    #[test]
    fn ratios_have_three_significant_digits_and_mark_equal_durability() {
        assert_eq!(format_ratio(2.3149), "2.31×");
        assert_eq!(format_ratio(7.9), "7.90×");
        assert_eq!(format_ratio(12.345), "12.3×");
        assert_eq!(format_ratio(123.4), "123×");
        let mut rows = vec![
            row(System::Edgebus, 2000.0, 1000.0),
            row(System::Nats, 1000.0, 2000.0),
            row(System::Postgres, 250.0, 4000.0),
        ];
        add_ratios(&mut rows);
        assert!(rows[1].ratios.is_empty(), "peers get no ratios");
        let ratios = &rows[0].ratios;
        assert_eq!(format_ratios(ratios, |r| Some(r.events_per_s)), "2.00× nats, 8.00× pg*");
        let p99 = format_ratios(ratios, |r| r.p99);
        assert!(p99.starts_with("0.50× nats, 0.25× pg*"), "{p99}");
    }

    #[test]
    fn targets_compare_equal_durabilities_at_256_clients() {
        // nats 2.9: the NATS targets use the relaxed node; the fsync-per-ack
        // node against nats is information only.
        let mut rows = vec![
            row(System::Edgebus, 1500.0, 900.0),
            row(System::EdgebusRelaxed, 5000.0, 500.0),
            row(System::Nats, 2000.0, 600.0),
            row(System::Postgres, 200.0, 9000.0),
        ];
        add_ratios(&mut rows);
        let checks = check_targets(&rows);
        let verdicts: Vec<(Verdict, &str)> =
            checks.iter().filter(|c| c.target.contains("100 B")).map(|c| (c.verdict, c.target.as_str())).collect();
        assert_eq!(verdicts.len(), 4, "{verdicts:?}");
        assert_eq!(verdicts[0].0, Verdict::Pass, "2.5x nats >= 2x: {verdicts:?}");
        assert!(verdicts[0].1.contains("edgebus-relaxed >= 2x nats"), "{verdicts:?}");
        assert_eq!(verdicts[1].0, Verdict::Pass, "p99 500 <= 600: {verdicts:?}");
        assert_eq!(verdicts[2].0, Verdict::Info, "{verdicts:?}");
        assert_eq!(verdicts[3].0, Verdict::Pass, "7.5x postgres: {verdicts:?}");
        // The 1 KiB cells were not measured: nothing to compare.
        assert!(checks.iter().filter(|c| c.target.contains("1 KiB")).all(|c| c.verdict == Verdict::Skip));

        // A nats-server that fsyncs each write is the pair; postgres missing is a skip.
        let mut rows = vec![
            row(System::Edgebus, 1500.0, 900.0),
            row(System::NatsSync, 1000.0, 800.0),
            row(System::Nats, 9000.0, 100.0),
        ];
        add_ratios(&mut rows);
        let checks: Vec<Check> = check_targets(&rows).into_iter().filter(|c| c.target.contains("100 B")).collect();
        assert_eq!(checks[0].verdict, Verdict::Fail, "1.5x < 2x: {checks:?}");
        assert!(checks[0].target.contains("edgebus >= 2x nats-sync"), "{checks:?}");
        assert_eq!(checks[1].verdict, Verdict::Fail, "p99 900 > 800: {checks:?}");
        assert_eq!(checks[2].verdict, Verdict::Skip, "{checks:?}");
        assert_eq!(checks.len(), 3, "no information line when the pair is edgebus itself: {checks:?}");
    }
}
