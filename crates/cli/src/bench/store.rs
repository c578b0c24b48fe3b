//! `edgebus bench store`: what the event store costs on top of the log.
//!
//! In one run and one directory it measures:
//!
//! 1. appends of one 100-byte event with an `Exact` expected version to 1,
//!    1,000 and 1,000,000 streams (100,000 with `--quick`), each writer
//!    owning its streams, beside `Log::append` of the same payload at the
//!    same concurrency, measured in the same run (its row, `log_append`,
//!    printed above the store's): the ratio is what the store's validation
//!    and indexing cost;
//! 2. `exists_or_write` with 4 writers racing to write identical events at
//!    the same indexes of one stream;
//! 3. reading one stream of 100,000 events front to back;
//! 4. opening a store of 10,000,000 events over 1,000,000 streams
//!    (1,000,000 over 100,000 with `--quick`) in a fresh process, with the
//!    index checkpoint and after deleting the index (a full rebuild), with
//!    the resident memory after each open.

use std::path::{Path, PathBuf};
use std::process::Command as ProcessCommand;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use edgebus_log::{FsyncPolicy, LogConfig};
use edgebus_store::{Direction, ExistsOrWrite, Store, StoreConfig, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use serde::Serialize;

use super::histogram::Histogram;
use super::machine::{Filesystem, Machine, load_average, utc_now};

/// Arguments of `edgebus bench store`.
#[derive(Debug, Clone, Args)]
pub struct StoreBenchArgs {
    /// Smaller data sets and about a second per workload (well under two minutes in all).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object per line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Directory to create the scratch directory in (default: ./target if it exists, else $TMPDIR).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Run only the append workload (beside the log's) at this many streams, for profiling.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub streams: Option<u64>,
    /// Internal: open the store in DIR, print one JSON line (open time, resident memory) and exit.
    #[arg(long, value_name = "DIR", hide = true)]
    pub open_probe: Option<PathBuf>,
}

const PAYLOAD_BYTES: usize = 100;
const WRITERS_MAX: usize = 256;
const RACERS: usize = 4;
const READ_STREAM_EVENTS: u64 = 100_000;
const READ_PAGE: usize = 1_000;
const WORKLOAD_DURATION_FULL: Duration = Duration::from_secs(5);
const WORKLOAD_DURATION_QUICK: Duration = Duration::from_secs(1);
/// An append workload runs until every stream was written once, but no longer than this.
const WORKLOAD_DURATION_MAX: Duration = Duration::from_secs(90);
const WRITER_STACK_BYTES: usize = 256 * 1024;

const TARGET_APPEND_RATIO_MIN: f64 = 0.7;
const TARGET_OPEN_SPEEDUP_MIN: f64 = 20.0;
const TARGET_RSS_MB_MAX: f64 = 256.0;

/// One JSON line.
#[derive(Debug, Clone, Serialize)]
struct Row {
    bench: &'static str,
    streams: u64,
    writers: usize,
    payload_bytes: usize,
    events: u64,
    duration_s: f64,
    events_per_s: f64,
    mb_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// Always null: the log bench's field, kept so both benches print one shape.
    ratio_to_raw: Option<f64>,
    /// Store events/s over log events/s at the same concurrency (appends only).
    ratio_to_log: Option<f64>,
    /// Milliseconds to open (opens only).
    open_ms: Option<f64>,
    /// Resident memory after the run or the open, in MiB.
    rss_mb: Option<f64>,
    fsync: &'static str,
}

impl Row {
    fn new(bench: &'static str, streams: u64, writers: usize, events: u64, elapsed: Duration) -> Self {
        let events_per_s = events as f64 / elapsed.as_secs_f64();
        Self {
            bench,
            streams,
            writers,
            payload_bytes: PAYLOAD_BYTES,
            events,
            duration_s: elapsed.as_secs_f64(),
            events_per_s,
            mb_per_s: events_per_s * PAYLOAD_BYTES as f64 / 1e6,
            p50_us: None,
            p99_us: None,
            ratio_to_raw: None,
            ratio_to_log: None,
            open_ms: None,
            rss_mb: None,
            fsync: "always",
        }
    }

    fn with_latency(mut self, latency: &Histogram) -> Self {
        let us = |q| latency.quantile(q).map(|d| d.as_secs_f64() * 1e6);
        self.p50_us = us(0.5);
        self.p99_us = us(0.99);
        self
    }
}

fn event(id: u128) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(id),
        event_type: EventType::new("BenchEvent").expect("valid type"),
        data: vec![b'x'; PAYLOAD_BYTES],
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

fn stream_name(i: u64) -> StreamName {
    StreamName::new(&format!("bench.s{i}")).expect("valid name")
}

/// Resident set size of this process in MiB, from /proc.
fn rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs the store benchmark (or, with `--open-probe`, one open) and prints the report.
pub fn run(args: &StoreBenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.open_probe {
        return open_probe(dir);
    }
    let scratch = super::scratch_dir(args.dir.as_deref(), "edgebus-bench-store-")?;
    let dir = scratch.path().canonicalize().context("cannot resolve the scratch directory")?;
    let machine = Machine::detect();
    let filesystem = Filesystem::of(&dir)?;
    let duration = if args.quick { WORKLOAD_DURATION_QUICK } else { WORKLOAD_DURATION_FULL };
    eprintln!("edgebus bench store: scratch dir {} ({})", dir.display(), filesystem.describe());
    let load_start = load_average();
    let mut rows = Vec::new();
    let many_streams: u64 = if args.quick { 100_000 } else { 1_000_000 };
    let stream_counts = match args.streams {
        Some(streams) => vec![streams],
        None => vec![1, 1_000, many_streams],
    };
    for streams in stream_counts {
        let writers = (streams as usize).min(WRITERS_MAX);
        eprintln!("  log append, {writers} writers ...");
        let log = measure_log_append(&dir.join(format!("log-{streams}")), streams, writers, duration)?;
        eprintln!("  store append, {streams} streams, {writers} writers ...");
        let mut row = measure_append(&dir.join(format!("append-{streams}")), streams, writers, duration)?;
        row.ratio_to_log = Some(row.events_per_s / log.events_per_s);
        // The reference goes beside its ratio: on a shared machine the
        // log's own rate moves from run to run as much as the store's.
        rows.push(log);
        rows.push(row);
    }
    if args.streams.is_none() {
        eprintln!("  exists_or_write, {RACERS} racing writers ...");
        rows.push(measure_race(&dir.join("race"), duration)?);
        eprintln!("  read one stream of {READ_STREAM_EVENTS} events ...");
        rows.push(measure_read(&dir.join("read"), duration)?);
        let (open_events, open_streams) = if args.quick { (1_000_000, 100_000) } else { (10_000_000, 1_000_000) };
        eprintln!("  building a store of {open_events} events over {open_streams} streams ...");
        rows.extend(measure_open(&dir.join("open"), open_events, open_streams)?);
    }
    let load_end = load_average();
    let checks = check_targets(&rows);
    if args.json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        for check in &checks {
            println!("{}", serde_json::to_string(check)?);
        }
    } else {
        print_report(&rows, &checks, &machine, &filesystem, [load_start, load_end]);
    }
    drop(scratch);
    Ok(())
}

/// `Log::append` of a record the size of one stored event, `writers`
/// threads: the reference of the store's append cell at `streams` (a row
/// `log_append` with that cell's stream count, which the log ignores).
fn measure_log_append(dir: &Path, streams: u64, writers: usize, duration: Duration) -> anyhow::Result<Row> {
    let log = Arc::new(edgebus_log::Log::open(dir, LogConfig::default())?);
    let record = edgebus_store::record::encode_event(&stream_name(0), 0, &event(1), None);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (log, record, stop, count) = (Arc::clone(&log), record.clone(), Arc::clone(&stop), Arc::clone(&count));
            std::thread::Builder::new().stack_size(WRITER_STACK_BYTES).spawn(move || {
                let mut latency = Histogram::default();
                while !stop.load(Ordering::Relaxed) {
                    let begun = Instant::now();
                    log.append(&[&record]).expect("log append");
                    latency.record(begun.elapsed());
                    count.fetch_add(1, Ordering::Relaxed);
                }
                latency
            })
        })
        .collect::<Result<_, _>>()?;
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::default();
    for thread in threads {
        latency.merge(&thread.join().map_err(|_| anyhow::anyhow!("log appender panicked"))?);
    }
    let elapsed = started.elapsed();
    log.close().map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::remove_dir_all(dir)?;
    Ok(Row::new("log_append", streams, writers, count.load(Ordering::Relaxed), elapsed).with_latency(&latency))
}

/// Appends with `Exact` expected versions; writer `w` owns streams `w, w + W, ...`.
fn measure_append(dir: &Path, streams: u64, writers: usize, duration: Duration) -> anyhow::Result<Row> {
    let store = Arc::new(Store::open(dir, StoreConfig::default())?);
    let stop = Arc::new(AtomicBool::new(false));
    let touched = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (store, stop, touched) = (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&touched));
            std::thread::Builder::new().stack_size(WRITER_STACK_BYTES).spawn(
                move || -> anyhow::Result<(u64, Histogram)> {
                    let owned: Vec<u64> = (w as u64..streams).step_by(writers).collect();
                    let mut versions = vec![None::<u64>; owned.len()];
                    let mut latency = Histogram::default();
                    let mut written = 0u64;
                    let mut at = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let stream = stream_name(owned[at]);
                        let expected = versions[at].map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                        let id = (u128::from(owned[at]) << 32) | u128::from(versions[at].map_or(0, |v| v + 1));
                        let begun = Instant::now();
                        let result = store.append(&stream, expected, vec![event(id)])?;
                        latency.record(begun.elapsed());
                        versions[at] = Some(result.last_version());
                        written += 1;
                        at += 1;
                        if at == owned.len() {
                            at = 0;
                        }
                        if written == owned.len() as u64 {
                            touched.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok((written, latency))
                },
            )
        })
        .collect::<Result<_, _>>()?;
    // Run for the workload's time, and until every stream was written once.
    while started.elapsed() < duration
        || (touched.load(Ordering::Relaxed) < writers as u64 && started.elapsed() < WORKLOAD_DURATION_MAX)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let mut events = 0;
    let mut latency = Histogram::default();
    for thread in threads {
        let (written, histogram) = thread.join().map_err(|_| anyhow::anyhow!("store appender panicked"))??;
        events += written;
        latency.merge(&histogram);
    }
    let elapsed = started.elapsed();
    let mut row = Row::new("store_append", streams, writers, events, elapsed).with_latency(&latency);
    row.rss_mb = rss_mb();
    store.close()?;
    drop(store);
    std::fs::remove_dir_all(dir)?;
    Ok(row)
}

/// `RACERS` threads write the same events at the same indexes of one stream.
fn measure_race(dir: &Path, duration: Duration) -> anyhow::Result<Row> {
    let store = Arc::new(Store::open(dir, StoreConfig::default())?);
    let stop = Arc::new(AtomicBool::new(false));
    let stream = stream_name(0);
    let started = Instant::now();
    let threads: Vec<_> = (0..RACERS)
        .map(|_| {
            let (store, stop, stream) = (Arc::clone(&store), Arc::clone(&stop), stream.clone());
            std::thread::spawn(move || -> anyhow::Result<(u64, u64, Histogram)> {
                let (mut written, mut exists) = (0, 0);
                let mut latency = Histogram::default();
                let mut index = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let begun = Instant::now();
                    match store.exists_or_write(&stream, index, event(u128::from(index) + 1))? {
                        ExistsOrWrite::Written { .. } => written += 1,
                        ExistsOrWrite::Exists { same: true, .. } => exists += 1,
                        ExistsOrWrite::Exists { same: false, .. } => bail!("identical events compared different"),
                    }
                    latency.record(begun.elapsed());
                    index += 1;
                }
                Ok((written, exists, latency))
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let (mut written, mut exists) = (0, 0);
    let mut latency = Histogram::default();
    for thread in threads {
        let (w, e, h) = thread.join().map_err(|_| anyhow::anyhow!("racer panicked"))??;
        written += w;
        exists += e;
        latency.merge(&h);
    }
    let elapsed = started.elapsed();
    let count = store.stream_info(&stream)?.and_then(|i| i.current_version).map_or(0, |v| v + 1);
    ensure!(count == written, "{written} writes won but the stream holds {count} events");
    eprintln!("    {written} indexes written, {exists} answered Exists{{same: true}}");
    store.close()?;
    drop(store);
    std::fs::remove_dir_all(dir)?;
    // Outputs per second: distinct indexes written.
    Ok(Row::new("store_exists_or_write", 1, RACERS, written, elapsed).with_latency(&latency))
}

/// Reads one stream of `READ_STREAM_EVENTS` events front to back, repeatedly.
fn measure_read(dir: &Path, duration: Duration) -> anyhow::Result<Row> {
    let store = Store::open(dir, StoreConfig::default())?;
    let stream = stream_name(0);
    for batch in 0..READ_STREAM_EVENTS / 1000 {
        let events = (0..1000).map(|i| event(u128::from(batch * 1000 + i) + 1)).collect();
        store.append(&stream, ExpectedVersion::Any, events)?;
    }
    store.flush_index()?;
    let started = Instant::now();
    let mut events = 0u64;
    while started.elapsed() < duration || events == 0 {
        let mut from = 0;
        loop {
            let page = store.read_stream(&stream, StreamFrom::Version(from), Direction::Forward, READ_PAGE, 0)?;
            let Some(last) = page.last() else { break };
            from = last.version + 1;
            events += page.len() as u64;
        }
        ensure!(from == READ_STREAM_EVENTS, "read {from} events of {READ_STREAM_EVENTS}");
    }
    let elapsed = started.elapsed();
    store.close()?;
    drop(store);
    std::fs::remove_dir_all(dir)?;
    Ok(Row::new("store_read_stream", 1, 1, events, elapsed))
}

/// Builds a store of `events` events over `streams` streams, then opens it in
/// fresh processes: with the checkpoint, and after deleting the index.
fn measure_open(dir: &Path, events: u64, streams: u64) -> anyhow::Result<Vec<Row>> {
    // Building is setup, not measurement: skip fsync and append in batches.
    let config =
        StoreConfig { log: LogConfig { fsync: FsyncPolicy::Never, ..LogConfig::default() }, ..StoreConfig::default() };
    {
        let store = Arc::new(Store::open(dir, config)?);
        let per_append = 10u64;
        let writers = 16u64;
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let rounds = events / per_append / streams;
                    for round in 0..rounds {
                        for s in (w..streams).step_by(writers as usize) {
                            let base = u128::from((round * streams + s) * per_append);
                            let batch = (0..per_append).map(|i| event(base + u128::from(i) + 1)).collect();
                            store.append(&stream_name(s), ExpectedVersion::Any, batch)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for thread in threads {
            thread.join().map_err(|_| anyhow::anyhow!("builder panicked"))??;
        }
        store.close()?;
    }
    let probe = |label: &'static str| -> anyhow::Result<Row> {
        let output = ProcessCommand::new(std::env::current_exe()?)
            .args(["bench", "store", "--open-probe"])
            .arg(dir)
            .output()
            .context("cannot run the open probe")?;
        ensure!(output.status.success(), "open probe failed: {}", String::from_utf8_lossy(&output.stderr));
        let probe: OpenProbe = serde_json::from_slice(&output.stdout).context("open probe output")?;
        let mut row = Row::new(label, streams, 1, events, Duration::from_secs_f64(probe.open_ms / 1e3));
        row.open_ms = Some(probe.open_ms);
        row.rss_mb = Some(probe.rss_mb);
        Ok(row)
    };
    let checkpoint = probe("store_open_checkpoint")?;
    std::fs::remove_dir_all(dir.join("index")).context("cannot delete the index")?;
    let rebuild = probe("store_open_rebuild")?;
    let after = probe("store_open_checkpoint")?;
    std::fs::remove_dir_all(dir)?;
    Ok(vec![checkpoint, rebuild, after])
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct OpenProbe {
    open_ms: f64,
    rss_mb: f64,
    replayed: u64,
}

fn open_probe(dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let store = Store::open(dir, StoreConfig::default())?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_mb = rss_mb().context("cannot read /proc/self/status")?;
    let probe = OpenProbe { open_ms, rss_mb, replayed: store.open_report().replayed };
    println!("{}", serde_json::to_string(&probe)?);
    store.close()?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct Check {
    target: String,
    pass: bool,
    measured: f64,
    required: f64,
}

fn check_targets(rows: &[Row]) -> Vec<Check> {
    let mut checks = Vec::new();
    if let Some(row) = rows.iter().filter(|r| r.bench == "store_append").max_by_key(|r| r.streams) {
        let ratio = row.ratio_to_log.unwrap_or(0.0);
        checks.push(Check {
            target: format!(
                "appends to {} streams >= {TARGET_APPEND_RATIO_MIN}x the log at {} writers",
                row.streams, row.writers
            ),
            pass: ratio >= TARGET_APPEND_RATIO_MIN,
            measured: ratio,
            required: TARGET_APPEND_RATIO_MIN,
        });
    }
    let open = |label: &str| rows.iter().find(|r| r.bench == label).and_then(|r| r.open_ms);
    if let (Some(checkpoint), Some(rebuild)) = (open("store_open_checkpoint"), open("store_open_rebuild")) {
        let speedup = rebuild / checkpoint.max(0.001);
        checks.push(Check {
            target: format!("open with checkpoint >= {TARGET_OPEN_SPEEDUP_MIN}x faster than a full rebuild"),
            pass: speedup >= TARGET_OPEN_SPEEDUP_MIN,
            measured: speedup,
            required: TARGET_OPEN_SPEEDUP_MIN,
        });
    }
    let opened = rows.iter().filter(|r| r.bench.starts_with("store_open")).filter_map(|r| r.rss_mb);
    if let Some(rss) = opened.reduce(f64::max) {
        checks.push(Check {
            target: format!("RSS after open <= {TARGET_RSS_MB_MAX} MB"),
            pass: rss <= TARGET_RSS_MB_MAX,
            measured: rss,
            required: TARGET_RSS_MB_MAX,
        });
    }
    checks
}

fn print_report(
    rows: &[Row],
    checks: &[Check],
    machine: &Machine,
    filesystem: &Filesystem,
    load: [Option<[f64; 3]>; 2],
) {
    println!("edgebus bench store — {}", utc_now());
    println!("machine:    {}", machine.describe());
    println!("filesystem: {}", filesystem.describe());
    println!("durability: fsync=always for measured writes (the open workloads are built with fsync=never)");
    if let [Some(start), Some(end)] = load {
        println!("load:       {:.2} at start, {:.2} at end (1-minute average)", start[0], end[0]);
    }
    println!();
    println!(
        "{:<24} {:>9} {:>7} {:>11} {:>8} {:>9} {:>9} {:>8} {:>9} {:>8}",
        "workload", "streams", "writers", "events/s", "MB/s", "p50 µs", "p99 µs", "vs log", "open ms", "RSS MB"
    );
    let opt = |v: Option<f64>, digits: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"));
    for r in rows {
        let rate = if r.open_ms.is_some() { "-".to_owned() } else { format!("{:.0}", r.events_per_s) };
        let mb = if r.open_ms.is_some() { "-".to_owned() } else { format!("{:.1}", r.mb_per_s) };
        println!(
            "{:<24} {:>9} {:>7} {:>11} {:>8} {:>9} {:>9} {:>8} {:>9} {:>8}",
            r.bench,
            r.streams,
            r.writers,
            rate,
            mb,
            opt(r.p50_us, 0),
            opt(r.p99_us, 0),
            opt(r.ratio_to_log, 2),
            opt(r.open_ms, 0),
            opt(r.rss_mb, 0),
        );
    }
    println!();
    for c in checks {
        println!(
            "{} {} (measured {:.2}, required {:.2})",
            if c.pass { "PASS" } else { "FAIL" },
            c.target,
            c.measured,
            c.required
        );
    }
}
