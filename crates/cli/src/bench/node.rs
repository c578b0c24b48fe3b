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
//! NATS JetStream acknowledges before it fsyncs; Debian's 2.9 cannot fsync
//! each write (it refuses `sync_interval: always`, which 2.15 accepts). For
//! a comparison at equal durability a second node of ours runs with fsync
//! on the same 2-minute interval ("edgebus-relaxed"); a `nats-server` that accepts
//! `sync_interval: always` (`--nats-server PATH`) is also measured that way
//! ("nats-sync"). The targets are checked at 256 clients between equal
//! durabilities; the report says which pairs those were.

mod drive;
mod groups;
pub(crate) mod peers;
mod report;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use edgebus_log::FsyncPolicy;

use super::machine::{Filesystem, Machine, load_average, settle, utc_now};
use drive::{CLIENTS_PER_CONNECTION, Target};
use report::{
    EndToEndRow, FanOutRow, PeerStatus, PublishRow, Report, SettleTally, System, add_ratios, check_targets,
    payload_label, print_report, quantile_us,
};

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
    /// that accepts `sync_interval: always` (2.15 does; Debian's 2.9 does not) is also measured with fsync
    /// per write.
    #[arg(long, value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
    /// Do not run NATS JetStream.
    #[arg(long)]
    pub no_nats: bool,
    /// Do not run PostgreSQL.
    #[arg(long)]
    pub no_postgres: bool,
    /// Run only the group-consumption cells (and their peer), skipping
    /// publish, end-to-end and fan-out.
    #[arg(long, conflicts_with = "publish_only")]
    pub groups_only: bool,
    /// Run only the publish cells, skipping end-to-end, fan-out and group
    /// consumption (with `--clients` and `--payload-bytes`, one workload to
    /// profile or compare builds on).
    #[arg(long)]
    pub publish_only: bool,
    /// Publishers of the publish cells, comma-separated [default: 1,16,256].
    #[arg(long, value_name = "N,...", value_delimiter = ',', conflicts_with = "groups_only", value_parser = clap::value_parser!(u16).range(1..=PUBLISHERS_MAX))]
    pub clients: Vec<u16>,
    /// Payload sizes of the publish cells in bytes, comma-separated [default: 100,1024].
    #[arg(long, value_name = "BYTES,...", value_delimiter = ',', conflicts_with = "groups_only", value_parser = clap::value_parser!(u32).range(1..=PAYLOAD_BYTES_MAX))]
    pub payload_bytes: Vec<u32>,
}

/// The most publishers `--clients` takes.
const PUBLISHERS_MAX: i64 = 4096;
/// The largest payload `--payload-bytes` takes: well below a node's event limit.
const PAYLOAD_BYTES_MAX: i64 = 256 * 1024;

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
/// How long the machine may take to fall quiet before a cell.
const SETTLE_MAX_FULL: Duration = Duration::from_secs(5);
const SETTLE_MAX_QUICK: Duration = Duration::from_secs(2);
/// The fsync interval of "edgebus-relaxed": NATS's default sync interval.
const RELAXED_FSYNC_INTERVAL: Duration = Duration::from_secs(120);

/// Runs the node benchmark and prints the report.
pub fn run(args: &NodeBenchArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.dir.as_deref(), "edgebus-bench-node-")?;
    let dir = scratch.path().canonicalize().context("cannot resolve the scratch directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-bench")
        .build()
        .context("cannot start the async runtime")?;
    // Ctrl-C or SIGTERM drops the benchmark's future, and with it the guards
    // of every process it started; then the scratch directory goes.
    let result = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        tokio::select! {
            result = measure(args, &dir) => result,
            _ = terminate.recv() => Err(interrupted(&dir, "SIGTERM")),
            _ = interrupt.recv() => Err(interrupted(&dir, "SIGINT")),
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

fn interrupted(dir: &Path, signal: &str) -> anyhow::Error {
    progress(format_args!("edgebus bench node: {signal}: processes stopped; removing {}", dir.display()));
    anyhow::anyhow!("interrupted by {signal}")
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
    /// The server process of each system, whose CPU time a cell reads
    /// (PostgreSQL's is a process per connection: none).
    pids: BTreeMap<System, u32>,
}

impl Fleet {
    fn add(&mut self, system: System, target: Target, durability: String, pid: Option<u32>) {
        self.targets.push((system, target));
        self.durability.insert(system, durability);
        if let Some(pid) = pid {
            self.pids.insert(system, pid);
        }
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
        progress(format_args!("  nats-server {} (pid {}) on {}", binary.version, default.guard.pid(), default.addr));
        let cannot_sync =
            "; this version cannot fsync each write (it refuses `sync_interval: always`, which newer servers accept)";
        self.add(
            System::Nats,
            Target::Nats(default.addr),
            format!(
                "nats-server {} -js, file storage, default settings: ack once written to the OS, fsync on the sync \
                 interval (2 min by default){}",
                binary.version,
                if binary.sync_always_supported { "" } else { cannot_sync }
            ),
            Some(default.guard.pid()),
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
                progress(format_args!(
                    "  nats-server {} sync_interval=always (pid {}) on {}",
                    binary.version,
                    server.guard.pid(),
                    server.addr
                ));
                self.add(
                    System::NatsSync,
                    Target::Nats(server.addr),
                    format!(
                        "nats-server {} -js, file storage, sync_interval: always (fsync each write)",
                        binary.version
                    ),
                    Some(server.guard.pid()),
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
        progress(format_args!("  edgebus serve (fsync={fsync}, pid {}) on {}", relaxed.guard.pid(), relaxed.grpc));
        self.add(
            System::EdgebusRelaxed,
            Target::Edgebus(relaxed.grpc),
            format!(
                "fsync={fsync}: ack once written to the OS, fdatasync at least every {} s (as nats)",
                RELAXED_FSYNC_INTERVAL.as_secs()
            ),
            Some(relaxed.guard.pid()),
        );
        self.nodes.push(relaxed);
        Ok(())
    }

    /// A private PostgreSQL cluster with the events table.
    async fn start_postgres(&mut self, dir: &Path) -> anyhow::Result<()> {
        let pg_dir = dir.join("postgres");
        let pg = blocking(move || peers::start_postgres(&pg_dir)).await?;
        let settings = drive::prepare_postgres(&pg.connection_string()).await?;
        progress(format_args!("  {} on 127.0.0.1:{}", pg.version, pg.port));
        let settings: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.add(
            System::Postgres,
            Target::Postgres(pg.connection_string()),
            format!("{}, {}: each commit waits for its WAL flush", pg.version, settings.join(" ")),
            None,
        );
        self.peers.push(PeerStatus::ran(System::Postgres, &pg.version));
        self.postgres = Some(pg);
        Ok(())
    }
}

/// Prints a progress line on stderr. Unlike `eprintln!` it never panics:
/// a closed stderr (`edgebus bench node | head`) must not abort the
/// process while guards are stopping the peers.
fn progress(message: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}

/// Settles the machine before a cell (`machine::settle`), counts it, and
/// says so when the cores did not fall quiet in time.
async fn settle_before(dir: &Path, tally: &mut SettleTally) -> anyhow::Result<()> {
    let dir = dir.to_owned();
    let max_wait = Duration::from_secs_f64(tally.max_wait_s);
    let settled = blocking(move || settle(&dir, max_wait)).await?;
    tally.cells += 1;
    tally.waited_s += settled.waited.as_secs_f64();
    if let Some(note) = settled.busy_note() {
        tally.cells_busy += 1;
        progress(format_args!("{note}"));
    }
    Ok(())
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
    progress(format_args!("edgebus bench node: scratch dir {} ({})", dir.display(), filesystem.describe()));
    if filesystem.is_memory_backed() {
        progress(format_args!(
            "warning: {} keeps data in memory: fsync reaches no disk; use --dir",
            filesystem.fs_type
        ));
    }
    let load_average_start = load_average();
    let settle_max = if args.quick { SETTLE_MAX_QUICK } else { SETTLE_MAX_FULL };
    let mut settle = SettleTally { max_wait_s: settle_max.as_secs_f64(), ..SettleTally::default() };
    let mut fleet = Fleet::default();
    let node_dir = dir.join("edgebus");
    let node = blocking(move || peers::start_edgebus(&node_dir, FsyncPolicy::Always)).await.context("edgebus serve")?;
    progress(format_args!("  edgebus serve (fsync=always, pid {}) on {}", node.guard.pid(), node.grpc));
    fleet.add(
        System::Edgebus,
        Target::Edgebus(node.grpc),
        "fsync=always: each ack follows the fdatasync of the group commit holding the event".to_owned(),
        Some(node.guard.pid()),
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
        progress(format_args!(
            "  peer {}: not run ({})",
            status.system.name(),
            status.reason.as_deref().unwrap_or("?")
        ));
    }

    // The cells, each system in turn, so that drift on the machine hits them alike.
    let mut rows = Vec::new();
    let mut failed: BTreeMap<System, String> = BTreeMap::new();
    let publish_clients: Vec<usize> = match (args.groups_only, args.clients.is_empty()) {
        (true, _) => Vec::new(),
        (false, true) => CLIENTS.to_vec(),
        (false, false) => args.clients.iter().map(|&n| usize::from(n)).collect(),
    };
    let payloads: Vec<usize> = if args.payload_bytes.is_empty() {
        PAYLOAD_BYTES.to_vec()
    } else {
        args.payload_bytes.iter().map(|&b| b as usize).collect()
    };
    for &clients in &publish_clients {
        for &payload_bytes in &payloads {
            for (system, target) in &fleet.targets {
                if failed.contains_key(system) {
                    continue;
                }
                progress(format_args!("  {clients} clients, {}: {} ...", payload_label(payload_bytes), system.name()));
                settle_before(dir, &mut settle).await?;
                let tag = format!("n{clients}p{payload_bytes}");
                let pid = fleet.pids.get(system).copied();
                let result = drive::publish_cell(target, clients, payload_bytes, warmup, window, pid, &tag).await;
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
                        progress(format_args!("  peer {}: {reason}", system.name()));
                        failed.insert(*system, reason);
                    }
                }
            }
        }
    }
    let failed_systems: Vec<System> = failed.keys().copied().collect();
    for status in &mut fleet.peers {
        if let Some(reason) = failed.remove(&status.system) {
            status.reason = Some(reason);
        }
    }
    add_ratios(&mut rows);

    let mut end_to_end = Vec::new();
    let only_one_kind = args.groups_only || args.publish_only;
    let end_to_end_clients: &[usize] = if only_one_kind { &[] } else { &END_TO_END_CLIENTS };
    for &clients in end_to_end_clients {
        progress(format_args!("  end-to-end latency, {clients} publishers, 1 subscriber ..."));
        settle_before(dir, &mut settle).await?;
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
    let fan_out = if only_one_kind {
        None
    } else {
        progress(format_args!("  fan-out, {FAN_OUT_SUBSCRIBERS} subscribers, {fan_out_events} events ..."));
        settle_before(dir, &mut settle).await?;
        let fan =
            drive::fan_out(grpc, FAN_OUT_SUBSCRIBERS, FAN_OUT_PUBLISHERS, fan_out_events, FAN_OUT_PAYLOAD_BYTES, "a")
                .await
                .context("fan-out")?;
        Some(fan_out_row(&fan))
    };
    let group_events = if args.quick { groups::EVENTS_QUICK } else { groups::EVENTS_FULL };
    let nats_target = [System::NatsSync, System::Nats].into_iter().find_map(|wanted| {
        fleet.targets.iter().find_map(|(system, target)| match target {
            Target::Nats(addr) if *system == wanted && !failed_systems.contains(system) => Some((*system, *addr)),
            _ => None,
        })
    });
    // Both of our nodes consume: the fsync=always one, and the relaxed one,
    // whose durability matches a JetStream that cannot fsync each write.
    // The target is checked between equal durabilities, as for publishing.
    let ours: Vec<(System, SocketAddr)> = [System::Edgebus, System::EdgebusRelaxed]
        .into_iter()
        .filter_map(|wanted| {
            fleet.targets.iter().find_map(|(system, target)| match target {
                Target::Edgebus(addr) if *system == wanted => Some((*system, *addr)),
                _ => None,
            })
        })
        .collect();
    let group_pair = nats_target.map(|(peer, _)| {
        let ours = if peer.fsync_per_ack() { System::Edgebus } else { System::EdgebusRelaxed };
        (ours, peer)
    });
    let mut group_rows = Vec::new();
    let group_consumers: &[usize] = if args.publish_only { &[] } else { &groups::CONSUMERS };
    for &consumers in group_consumers {
        let tag = format!("c{consumers}");
        for &(system, addr) in &ours {
            progress(format_args!(
                "  group consumption, {consumers} consumers, {group_events} events: {} ...",
                system.name()
            ));
            settle_before(dir, &mut settle).await?;
            let row = groups::edgebus(system, addr, consumers, group_events, &tag).await;
            group_rows.push(row.with_context(|| format!("group consumption on {}", system.name()))?);
        }
        if let Some((system, addr)) = nats_target {
            progress(format_args!("  group consumption, {consumers} consumers: {} ...", system.name()));
            settle_before(dir, &mut settle).await?;
            match groups::nats(system, addr, consumers, group_events, &tag).await {
                Ok(row) => group_rows.push(row),
                Err(error) => progress(format_args!("  peer {}: group consumption failed: {error:#}", system.name())),
            }
        }
    }
    groups::add_ratios(&mut group_rows);
    let load_average_end = load_average();
    let mut checks = check_targets(&rows);
    checks.extend(group_checks(&group_rows, group_pair));
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
        settle,
        durability,
        peers,
        publish: rows,
        end_to_end,
        fan_out,
        groups: group_rows,
        checks,
    })
}

fn fan_out_row(fan: &drive::FanOut) -> FanOutRow {
    FanOutRow {
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
    }
}

/// The group-consumption target per number of consumers, between `pair`
/// (ours, the JetStream peer) of equal durability; our other node's ratio
/// is information.
fn group_checks(rows: &[groups::GroupRow], pair: Option<(System, System)>) -> Vec<report::Check> {
    let mut checks = Vec::new();
    for &consumers in &groups::CONSUMERS {
        for ours in [System::Edgebus, System::EdgebusRelaxed] {
            let Some(row) = rows.iter().find(|r| r.system == ours && r.consumers == consumers) else { continue };
            let paired = pair.filter(|(o, _)| *o == ours);
            let peer_name = pair.map_or("nats", |(_, peer)| peer.name());
            let verdict = match (pair, paired, row.ratio) {
                (None, _, _) | (_, _, None) => report::Verdict::Skip,
                (_, None, _) => report::Verdict::Info,
                (_, Some(_), Some(r)) if r >= groups::TARGET_RATIO_MIN => report::Verdict::Pass,
                _ => report::Verdict::Fail,
            };
            let durability = match paired {
                Some(_) => "equal durability",
                None => "unequal durability, information",
            };
            checks.push(report::Check {
                verdict,
                target: format!(
                    "group consumption events/s, {consumers} consumers acking every event: {} >= {}x {peer_name} durable pull",
                    ours.name(),
                    groups::TARGET_RATIO_MIN
                ),
                measured: row.ratio,
                required: Some(groups::TARGET_RATIO_MIN),
                detail: format!("same backlog size, same window per consumer; {durability}"),
            });
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn group_targets_compare_equal_durabilities() {
        use super::{System, groups, report::Verdict};
        let mut rows = Vec::new();
        for consumers in groups::CONSUMERS {
            for (system, events_per_s) in
                [(System::Edgebus, 50.0), (System::EdgebusRelaxed, 160.0), (System::Nats, 100.0)]
            {
                rows.push(groups::GroupRow {
                    system,
                    consumers,
                    events: 100,
                    elapsed_s: 1.0,
                    events_per_s,
                    ratio: None,
                });
            }
        }
        groups::add_ratios(&mut rows);
        let checks = super::group_checks(&rows, Some((System::EdgebusRelaxed, System::Nats)));
        assert_eq!(checks.len(), 2 * groups::CONSUMERS.len());
        for check in &checks {
            if check.target.contains("edgebus-relaxed >=") {
                assert_eq!(check.verdict, Verdict::Pass, "{}", check.target);
            } else {
                assert_eq!(check.verdict, Verdict::Info, "{}", check.target);
            }
        }
        let skipped = super::group_checks(&rows, None);
        assert!(skipped.iter().all(|c| c.verdict == Verdict::Skip));
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
        assert!(!args.publish_only);
        assert!(args.clients.is_empty() && args.payload_bytes.is_empty());
    }

    #[test]
    fn bench_node_runs_chosen_publish_cells_and_refuses_bad_ones() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["edgebus", "bench", "node"];
            argv.extend_from_slice(extra);
            crate::Cli::try_parse_from(argv)
        };
        let cli = parse(&["--publish-only", "--clients", "256,16", "--payload-bytes", "100"]).expect("parses");
        let crate::Command::Bench(super::super::BenchArgs { target: super::super::BenchTarget::Node(args) }) =
            cli.command
        else {
            panic!("expected bench node");
        };
        assert!(args.publish_only);
        assert_eq!(args.clients, [256, 16]);
        assert_eq!(args.payload_bytes, [100]);
        for bad in
            [&["--clients", "0"][..], &["--clients", "5000"], &["--payload-bytes", "x"], &["--payload-bytes", "0"]]
        {
            let error = parse(bad).expect_err("refused").to_string();
            assert!(error.contains(bad[0]), "{bad:?}: {error}");
        }
        // The group cells publish nothing: choosing publish cells with them is a mistake.
        for both in [&["--publish-only", "--groups-only"][..], &["--groups-only", "--clients", "16"]] {
            let error = parse(both).expect_err("refused").to_string();
            assert!(error.contains("cannot be used with"), "{both:?}: {error}");
        }
    }
}
