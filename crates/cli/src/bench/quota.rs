//! `edgebus bench quota`: does a runaway producer on a throttled pattern
//! slow the other streams? (issue 6: "one runaway producer on `telemetry.>`
//! at full speed does not lower the throughput of `alerts.>` by more than
//! 10%").
//!
//! One process: a real node (`node::run`, fsync=always) on 127.0.0.1:0 in
//! this process's runtime, with the quota `telemetry.>` at
//! [`TELEMETRY_EVENTS_PER_SEC`] events/s, and its clients over loopback
//! gRPC. The alerts workload is [`ALERT_CLIENTS`] concurrent producers,
//! each appending one 100-byte event at a time to its own `alerts.site-N`
//! stream and waiting for the acknowledgement. The runaway producer keeps
//! [`RUNAWAY_CALLS`] appends to `telemetry.sensor-N` in flight at all times,
//! never waits after a refusal and never retries (`RetryPolicy::none`).
//!
//! Rounds alternate the alerts workload alone and beside the runaway, each
//! over the same window after a warm-up, so that drift of the machine
//! (other processes, the page cache) falls on both; the figure of each mode
//! is its median over the rounds, and the ratio is with ÷ alone. The target
//! is a ratio of at least [`TARGET_RATIO`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use edgebus_client::{Client, RetryPolicy};
use edgebus_server::limits::NodeLimits;
use edgebus_server::node::{self, NodeConfig};
use edgebus_server::quota::QuotaSpec;
use edgebus_store::StoreConfig;
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use serde::Serialize;

use super::machine::{Filesystem, Machine, load_average, utc_now};

/// Arguments of `edgebus bench quota`.
#[derive(Debug, Clone, Args)]
pub struct QuotaBenchArgs {
    /// One round of 2 s windows instead of five of 5 s.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Directory to create the scratch directory in (default: ./target if it exists, else $TMPDIR).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The quota on telemetry.>, in events per second.
    #[arg(long, default_value_t = TELEMETRY_EVENTS_PER_SEC, value_parser = clap::value_parser!(u64).range(1..))]
    pub telemetry_events_per_sec: u64,
    /// Appends the runaway producer keeps in flight.
    #[arg(long, default_value_t = RUNAWAY_CALLS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub runaway_calls: usize,
}

/// The quota on the runaway's pattern: about 1% of what this node takes
/// on a small machine (a quota well below the node's capacity, as quotas
/// should be: what a quota admits costs what any write costs).
pub const TELEMETRY_EVENTS_PER_SEC: u64 = 100;
/// Concurrent alerts producers, each waiting for every acknowledgement.
pub const ALERT_CLIENTS: usize = 16;
/// Appends the runaway producer keeps in flight.
pub const RUNAWAY_CALLS: usize = 4;
/// Payload of every event.
const PAYLOAD_BYTES: usize = 100;
/// Required alerts throughput with the runaway, as a share of alone.
pub const TARGET_RATIO: f64 = 0.90;
const ROUNDS_FULL: usize = 5;
const ROUNDS_QUICK: usize = 1;
const WINDOW_FULL: Duration = Duration::from_secs(5);
const WINDOW_QUICK: Duration = Duration::from_secs(2);
const WARMUP: Duration = Duration::from_millis(500);
/// How long the node may take to open and to close.
const NODE_DEADLINE: Duration = Duration::from_secs(60);

/// One measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Round, from 1.
    pub round: usize,
    /// Whether the runaway producer ran.
    pub runaway: bool,
    /// Alerts acknowledged per second.
    pub alerts_events_per_s: f64,
    /// Alerts refused (none expected: `alerts.>` has no quota).
    pub alerts_refused: u64,
    /// Telemetry events admitted per second (bounded by the quota).
    pub telemetry_admitted_per_s: f64,
    /// Telemetry appends refused per second.
    pub telemetry_refused_per_s: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran (UTC).
    pub date: String,
    /// The machine.
    pub machine: String,
    /// The scratch directory's filesystem.
    pub filesystem: String,
    /// 1-minute load average at start and end.
    pub load: [Option<f64>; 2],
    /// The quota, in `--quota` form.
    pub quota: String,
    /// Alerts producers.
    pub alert_clients: usize,
    /// Runaway appends in flight.
    pub runaway_calls: usize,
    /// Every window.
    pub windows: Vec<Window>,
    /// Median alerts events/s alone.
    pub alerts_alone_events_per_s: f64,
    /// Median alerts events/s beside the runaway.
    pub alerts_with_runaway_events_per_s: f64,
    /// With ÷ alone.
    pub ratio: f64,
    /// The target ratio.
    pub target_ratio: f64,
    /// Whether the ratio meets the target.
    pub pass: bool,
}

/// Runs the benchmark and prints the report.
pub fn run(args: &QuotaBenchArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir(args.dir.as_deref(), "edgebus-bench-quota-")?;
    let dir = scratch.path().canonicalize().context("cannot resolve the scratch directory")?;
    let filesystem = Filesystem::of(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-bench")
        .build()
        .context("cannot start the async runtime")?;
    let load_start = load_average();
    let (rounds, window) = if args.quick { (ROUNDS_QUICK, WINDOW_QUICK) } else { (ROUNDS_FULL, WINDOW_FULL) };
    let quota = QuotaSpec::parse_flag(&format!("telemetry.>,events_per_sec={}", args.telemetry_events_per_sec))
        .expect("the bench's quota is valid");
    let quota_text = quota.to_string();
    let windows = runtime.block_on(measure(dir.join("data"), quota, args.runaway_calls, rounds, window))?;
    let load_end = load_average();
    runtime.shutdown_timeout(Duration::from_secs(10));
    scratch.close().with_context(|| format!("cannot remove the scratch directory {}", dir.display()))?;

    let median = |runaway: bool| {
        let mut rates: Vec<f64> =
            windows.iter().filter(|w| w.runaway == runaway).map(|w| w.alerts_events_per_s).collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (alone, with) = (median(false), median(true));
    let ratio = if alone > 0.0 { with / alone } else { 0.0 };
    let report = Report {
        date: utc_now(),
        machine: Machine::detect().describe(),
        filesystem: filesystem.describe(),
        load: [load_start.map(|l| l[0]), load_end.map(|l| l[0])],
        quota: quota_text,
        alert_clients: ALERT_CLIENTS,
        runaway_calls: args.runaway_calls,
        windows,
        alerts_alone_events_per_s: alone,
        alerts_with_runaway_events_per_s: with,
        ratio,
        target_ratio: TARGET_RATIO,
        pass: ratio >= TARGET_RATIO,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Starts the node, runs the rounds, stops the node.
async fn measure(
    data_dir: PathBuf,
    quota: QuotaSpec,
    runaway_calls: usize,
    rounds: usize,
    window: Duration,
) -> anyhow::Result<Vec<Window>> {
    let config = NodeConfig {
        data_dir,
        grpc_listen: "127.0.0.1:0".parse().expect("an address"),
        http_listen: "127.0.0.1:0".parse().expect("an address"),
        store: StoreConfig::default(),
        limits: NodeLimits::default(),
        quotas: vec![quota],
        gateway: None,
    };
    let (stop_sender, stop) = tokio::sync::oneshot::channel::<()>();
    let (ready_sender, ready) = tokio::sync::oneshot::channel();
    let node = tokio::spawn(node::run(
        config,
        async move {
            let _ = stop.await;
        },
        move |ready| {
            let _ = ready_sender.send(ready);
        },
    ));
    let ready = match tokio::time::timeout(NODE_DEADLINE, ready).await {
        Ok(Ok(ready)) => ready,
        _ => {
            let ended = node.await;
            anyhow::bail!("the node did not start: {ended:?}");
        }
    };
    let address = ready.grpc.to_string();
    let alerts = Client::connect(&address).await?.with_retry(RetryPolicy::none());
    let telemetry = Client::connect(&address).await?.with_retry(RetryPolicy::none());

    let mut windows = Vec::new();
    for round in 1..=rounds {
        for runaway in [false, true] {
            progress(format_args!(
                "  round {round}/{rounds}: alerts {}",
                if runaway { "with the runaway" } else { "alone" }
            ));
            let runaway_calls = if runaway { runaway_calls } else { 0 };
            windows.push(measure_window(&alerts, &telemetry, round, runaway_calls, window).await?);
        }
    }
    drop((alerts, telemetry));
    let _ = stop_sender.send(());
    tokio::time::timeout(NODE_DEADLINE, node)
        .await
        .context("the node did not stop")?
        .context("the node's task failed")??;
    Ok(windows)
}

/// Counters of one window, shared by its tasks.
#[derive(Debug, Default)]
struct Counts {
    alerts: AtomicU64,
    alerts_refused: AtomicU64,
    telemetry_admitted: AtomicU64,
    telemetry_refused: AtomicU64,
}

/// A unique event id: this run's random prefix and a counter.
fn event(counter: &AtomicU64, prefix: u64) -> NewEvent {
    let id = (u128::from(prefix) << 64) | u128::from(counter.fetch_add(1, Ordering::Relaxed));
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("Reading").expect("a valid type"),
        data: vec![b'x'; PAYLOAD_BYTES],
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

/// One window: warm-up, then `window` of counting; the runaway (if any)
/// starts with the warm-up and stops with the window.
async fn measure_window(
    alerts: &Client,
    telemetry: &Client,
    round: usize,
    runaway_calls: usize,
    window: Duration,
) -> anyhow::Result<Window> {
    static IDS: AtomicU64 = AtomicU64::new(0);
    let prefix: u64 = rand::random();
    let counts = Arc::new(Counts::default());
    let counting = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for call in 0..runaway_calls {
        let (client, counts, counting, done) =
            (telemetry.clone(), Arc::clone(&counts), Arc::clone(&counting), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let stream = StreamName::new(&format!("telemetry.sensor-{call}")).expect("a valid name");
            while !done.load(Ordering::Relaxed) {
                let result = client.append(stream.clone(), ExpectedVersion::Any, vec![event(&IDS, prefix)]).await;
                if counting.load(Ordering::Relaxed) {
                    let counter = if result.is_ok() { &counts.telemetry_admitted } else { &counts.telemetry_refused };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for producer in 0..ALERT_CLIENTS {
        let (client, counts, counting, done) =
            (alerts.clone(), Arc::clone(&counts), Arc::clone(&counting), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let stream = StreamName::new(&format!("alerts.site-{producer}")).expect("a valid name");
            while !done.load(Ordering::Relaxed) {
                let result = client.append(stream.clone(), ExpectedVersion::Any, vec![event(&IDS, prefix)]).await;
                if counting.load(Ordering::Relaxed) {
                    let counter = if result.is_ok() { &counts.alerts } else { &counts.alerts_refused };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(WARMUP).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.context("a producer task failed")?;
    }
    let per_s = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64 / elapsed;
    Ok(Window {
        round,
        runaway: runaway_calls > 0,
        alerts_events_per_s: per_s(&counts.alerts),
        alerts_refused: counts.alerts_refused.load(Ordering::Relaxed),
        telemetry_admitted_per_s: per_s(&counts.telemetry_admitted),
        telemetry_refused_per_s: per_s(&counts.telemetry_refused),
    })
}

/// A progress line on stderr; a closed stderr is no reason to stop.
fn progress(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn print_report(report: &Report) {
    println!("edgebus bench quota — {}", report.date);
    println!("machine:    {}", report.machine);
    println!("filesystem: {}", report.filesystem);
    println!("durability: fsync=always; one process: the node and its gRPC clients over 127.0.0.1");
    if let [Some(start), Some(end)] = report.load {
        println!("load:       {start:.2} at start, {end:.2} at end (1-minute average)");
    }
    println!(
        "workload:   alerts.> {} producers, one {PAYLOAD_BYTES} B event per append, each waiting for its ack; \
         runaway telemetry.> {} appends in flight, no pause, no retry; quota {}",
        report.alert_clients, report.runaway_calls, report.quota
    );
    println!();
    println!(
        "{:>5} {:<8} {:>16} {:>14} {:>20} {:>20}",
        "round", "runaway", "alerts events/s", "alerts refused", "telemetry admitted/s", "telemetry refused/s"
    );
    for w in &report.windows {
        println!(
            "{:>5} {:<8} {:>16.0} {:>14} {:>20.0} {:>20.0}",
            w.round,
            if w.runaway { "yes" } else { "no" },
            w.alerts_events_per_s,
            w.alerts_refused,
            w.telemetry_admitted_per_s,
            w.telemetry_refused_per_s
        );
    }
    println!();
    println!(
        "alerts.> alone {:.0} events/s, beside the runaway {:.0} events/s (medians): ratio {:.3}",
        report.alerts_alone_events_per_s, report.alerts_with_runaway_events_per_s, report.ratio
    );
    println!(
        "{} alerts.> keeps at least {:.0}% of its throughput beside a runaway telemetry.> producer (measured {:.1}%)",
        if report.pass { "PASS" } else { "FAIL" },
        report.target_ratio * 100.0,
        report.ratio * 100.0
    );
}
