//! `edgebus bench log`: how close the durable log gets to what the disk can do.
//!
//! In one run and one directory it measures, for each workload shape (1, 16
//! and 256 writers; 100 B and 1 KiB payloads):
//!
//! 1. the raw device limit: a loop of one `write` plus one `fdatasync` on a
//!    plain file, writing per call exactly the bytes the log would write for
//!    the shape (one framed record for one writer, N framed records for N
//!    writers: an ideal group commit), with no log code at all;
//! 2. `Log::append` under the default configuration (`fsync = always`) from
//!    that many threads, each appending one record at a time;
//!
//! and then 3. a sequential `Log::read` of the largest log written, from
//! position 0 in large batches, after the data is in the page cache.
//!
//! Every workload runs for a fixed time. The report states the machine, the
//! filesystem and the durability setting, gives each append figure as a
//! ratio to the raw limit of the same shape, and checks the targets. It
//! reports; it does not fail when a target is missed.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use edgebus_log::{FsyncPolicy, Log, LogConfig, LogStats};
use serde::Serialize;

use super::histogram::Histogram;
use super::machine::{Filesystem, Machine, load_average, utc_now};

/// Arguments of `edgebus bench log`.
#[derive(Debug, Clone, Args)]
pub struct LogBenchArgs {
    /// Run each workload for about a second (the whole run takes well under a minute) instead of five.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object per line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Directory to create the benchmark's scratch directory in; put it on the filesystem of the real
    /// data directory. Default: ./target if it exists, else $TMPDIR. The scratch directory is removed
    /// afterwards.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Payload sizes measured, in bytes.
const PAYLOAD_BYTES: [u64; 2] = [100, 1024];
/// Concurrent appenders measured; for the raw limit, records per `write`.
const WRITERS: [usize; 3] = [1, 16, 256];
/// How long each workload runs in a full run and in a `--quick` one.
const WORKLOAD_DURATION_FULL: Duration = Duration::from_secs(5);
const WORKLOAD_DURATION_QUICK: Duration = Duration::from_secs(1);
/// Limits of one `Log::read` call of the read benchmark.
const READ_BATCH_RECORDS_MAX: usize = 65_536;
const READ_BATCH_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Passes over the log the read benchmark makes at most, whatever the time.
const READ_PASSES_MAX: u32 = 1000;
/// Stack of each appender thread: they only call `Log::append`.
const APPENDER_STACK_BYTES: usize = 256 * 1024;

/// The targets: the log against the raw limit measured in the same run.
const TARGET_ONE_APPENDER_RATIO_MIN: f64 = 0.9;
const TARGET_MANY_APPENDERS_RATIO_MIN: f64 = 0.7;
const TARGET_MANY_OVER_ONE_MIN: f64 = 50.0;
const TARGET_READ_BYTES_PER_S_MIN: f64 = 1e9;

const DURABILITY: &str = "fsync=always: every acknowledged append is fdatasync'ed";

/// What a row measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum BenchKind {
    /// `write` + `fdatasync` on a plain file.
    RawFsync,
    /// `Log::append`.
    LogAppend,
    /// `Log::read`, sequential, from the page cache.
    LogRead,
}

impl BenchKind {
    fn label(self) -> &'static str {
        match self {
            Self::RawFsync => "raw write+fdatasync",
            Self::LogAppend => "log append",
            Self::LogRead => "log read (page cache)",
        }
    }
}

/// One measured workload.
#[derive(Debug, Clone)]
struct Row {
    kind: BenchKind,
    payload_bytes: u64,
    /// Appender threads; records per `write` for the raw limit; 1 for reads.
    writers: usize,
    events: u64,
    elapsed: Duration,
    /// Per append (per `write` + `fdatasync` for the raw limit); none for reads.
    latency: Option<Histogram>,
    /// Records per `fdatasync`: the group-commit batch actually achieved.
    records_per_fsync: Option<f64>,
    /// Bytes on disk per event, framing included.
    disk_bytes_per_event: u64,
    /// Events/s (and so payload MB/s) over the raw limit of the same shape.
    ratio_to_raw: Option<f64>,
}

impl Row {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// Payload megabytes (10^6 bytes) per second.
    fn mb_per_s(&self) -> f64 {
        self.events_per_s() * self.payload_bytes as f64 / 1e6
    }

    /// The two halves of one measurement as one.
    fn combine(mut self, other: &Self) -> Self {
        assert_eq!((self.kind, self.writers, self.payload_bytes), (other.kind, other.writers, other.payload_bytes));
        self.events += other.events;
        self.elapsed += other.elapsed;
        if let (Some(mine), Some(theirs)) = (&mut self.latency, &other.latency) {
            mine.merge(theirs);
        }
        self
    }

    fn latency_us(&self, quantile: f64) -> Option<f64> {
        Some(self.latency.as_ref()?.quantile(quantile)?.as_secs_f64() * 1e6)
    }
}

/// One JSON line of `--json`.
#[derive(Debug, Serialize)]
struct JsonRow<'a> {
    bench: BenchKind,
    payload_bytes: u64,
    writers: usize,
    duration_s: f64,
    events: u64,
    events_per_s: f64,
    mb_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    ratio_to_raw: Option<f64>,
    records_per_fsync: Option<f64>,
    disk_bytes_per_event: u64,
    fsync: &'static str,
    quick: bool,
    date: &'a str,
    load_average_start: Option<[f64; 3]>,
    load_average_end: Option<[f64; 3]>,
    machine: &'a Machine,
    filesystem: &'a Filesystem,
}

/// One target and whether this run met it.
#[derive(Debug, Serialize)]
struct Check {
    bench: &'static str,
    target: &'static str,
    pass: bool,
    measured: f64,
    required: f64,
    detail: String,
}

/// Runs the log benchmark and prints the report.
pub fn run(args: &LogBenchArgs) -> anyhow::Result<()> {
    let parent = match &args.dir {
        Some(dir) => {
            ensure!(dir.is_dir(), "--dir {} is not a directory", dir.display());
            dir.clone()
        }
        None if Path::new("target").is_dir() => PathBuf::from("target"),
        None => std::env::temp_dir(),
    };
    let scratch = tempfile::Builder::new()
        .prefix("edgebus-bench-log-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a scratch directory in {}", parent.display()))?;
    let dir = scratch.path().canonicalize().context("cannot resolve the scratch directory")?;
    let machine = Machine::detect();
    let filesystem = Filesystem::of(&dir)?;
    let date = utc_now();
    let duration = if args.quick { WORKLOAD_DURATION_QUICK } else { WORKLOAD_DURATION_FULL };

    // Progress goes to stderr so that stdout holds only the report.
    eprintln!("edgebus bench log: scratch dir {} ({})", dir.display(), filesystem.describe());
    if filesystem.is_memory_backed() {
        eprintln!(
            "warning: {} keeps data in memory: fdatasync reaches no disk, so these figures say nothing \
             about durability cost; use --dir on the data filesystem",
            filesystem.fs_type
        );
    }
    let load_average_start = load_average();
    let rows = measure_all(&dir, duration)?;
    let load_average_end = load_average();
    let load = [load_average_start, load_average_end];
    let checks = check_targets(&rows);
    // Remove the scratch directory before printing so that an error here is not hidden behind the report.
    scratch.close().with_context(|| format!("cannot remove the scratch directory {}", dir.display()))?;

    if args.json {
        for row in &rows {
            let json = JsonRow {
                bench: row.kind,
                payload_bytes: row.payload_bytes,
                writers: row.writers,
                duration_s: row.elapsed.as_secs_f64(),
                events: row.events,
                events_per_s: row.events_per_s(),
                mb_per_s: row.mb_per_s(),
                p50_us: row.latency_us(0.5),
                p99_us: row.latency_us(0.99),
                ratio_to_raw: row.ratio_to_raw,
                records_per_fsync: row.records_per_fsync,
                disk_bytes_per_event: row.disk_bytes_per_event,
                fsync: "always",
                quick: args.quick,
                date: &date,
                load_average_start,
                load_average_end,
                machine: &machine,
                filesystem: &filesystem,
            };
            println!("{}", serde_json::to_string(&json)?);
        }
        for check in &checks {
            println!("{}", serde_json::to_string(check)?);
        }
    } else {
        print_report(args, duration, &date, &machine, &filesystem, &dir, load, &rows, &checks);
    }
    Ok(())
}

/// Runs every workload in order: for each shape the raw limit, then the log;
/// then the read of the largest log.
fn measure_all(dir: &Path, duration: Duration) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    // The log with the most payload bytes is kept for the read benchmark.
    let mut largest: Option<(u64, PathBuf, u64)> = None;
    for payload_bytes in PAYLOAD_BYTES {
        for writers in WRITERS {
            // The raw limit is measured half before and half after the log, so
            // that a disk that speeds up or slows down over time (other work,
            // the device's own caching) biases the ratio less.
            eprintln!("  {writers} writers, {payload_bytes} B: raw write+fdatasync, log append, raw again ...");
            let raw_before = measure_raw(dir, payload_bytes, writers, duration / 2)?;
            let log_dir = dir.join(format!("log-{writers}w-{payload_bytes}b"));
            let mut append = measure_append(&log_dir, payload_bytes, writers, duration)?;
            let raw = raw_before.combine(&measure_raw(dir, payload_bytes, writers, duration / 2)?);
            append.ratio_to_raw = Some(append.events_per_s() / raw.events_per_s());
            let bytes = append.events * payload_bytes;
            if largest.as_ref().is_none_or(|(largest_bytes, _, _)| bytes > *largest_bytes) {
                if let Some((_, previous, _)) = largest.take() {
                    remove_dir(&previous)?;
                }
                largest = Some((bytes, log_dir, payload_bytes));
            } else {
                remove_dir(&log_dir)?;
            }
            rows.push(raw);
            rows.push(append);
        }
    }
    let (_, log_dir, payload_bytes) = largest.expect("at least one workload ran");
    eprintln!("  log read, {} ...", log_dir.display());
    rows.push(measure_read(&log_dir, payload_bytes, duration)?);
    remove_dir(&log_dir)?;
    Ok(rows)
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// The raw device limit: `write` of `writers` framed records, then
/// `fdatasync`, in a loop, on a new file.
fn measure_raw(dir: &Path, payload_bytes: u64, writers: usize, duration: Duration) -> anyhow::Result<Row> {
    let disk_bytes_per_event = edgebus_log::format::frame_bytes(payload_bytes);
    let write_bytes = usize::try_from(disk_bytes_per_event).expect("small") * writers;
    let batch = vec![0xa5u8; write_bytes];
    let path = dir.join(format!("raw-{writers}w-{payload_bytes}b"));
    let mut file: File = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut latency = Histogram::default();
    let mut writes = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let write_start = Instant::now();
        file.write_all(&batch).with_context(|| format!("write to {}", path.display()))?;
        file.sync_data().with_context(|| format!("fdatasync of {}", path.display()))?;
        latency.record(write_start.elapsed());
        writes += 1;
    }
    let elapsed = start.elapsed();
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(Row {
        kind: BenchKind::RawFsync,
        payload_bytes,
        writers,
        events: writes * writers as u64,
        elapsed,
        latency: Some(latency),
        records_per_fsync: Some(writers as f64),
        disk_bytes_per_event,
        ratio_to_raw: None,
    })
}

/// `writers` threads each calling `Log::append` with one record, as fast as
/// acknowledgements come back, on a new log with the default configuration.
fn measure_append(log_dir: &Path, payload_bytes: u64, writers: usize, duration: Duration) -> anyhow::Result<Row> {
    let config = LogConfig::default();
    assert_eq!(config.fsync, FsyncPolicy::Always, "the benchmark measures the default durability");
    let log = Log::open(log_dir, config).with_context(|| format!("cannot open a log in {}", log_dir.display()))?;
    let payload = vec![0x5au8; usize::try_from(payload_bytes).expect("small")];
    let stop = AtomicBool::new(false);
    // Appenders wait at the gate until all are started, so they start together.
    let gate = RwLock::new(());
    let merged = Mutex::new((Histogram::default(), 0u64));
    let mut first_error: Option<anyhow::Error> = None;
    let (elapsed, stats_before_close): (Duration, LogStats) = std::thread::scope(|scope| {
        let gate_closed = gate.write().expect("nobody else took the gate yet");
        let mut handles = Vec::with_capacity(writers);
        for index in 0..writers {
            let spawned = std::thread::Builder::new()
                .name(format!("bench-appender-{index}"))
                .stack_size(APPENDER_STACK_BYTES)
                .spawn_scoped(scope, || -> anyhow::Result<()> {
                    let mut latency = Histogram::default();
                    let mut appends = 0u64;
                    drop(gate.read().expect("the gate is opened, never poisoned"));
                    let result = loop {
                        if stop.load(Ordering::Relaxed) {
                            break Ok(());
                        }
                        let append_start = Instant::now();
                        if let Err(error) = log.append(&[&payload[..]]) {
                            stop.store(true, Ordering::Relaxed);
                            break Err(anyhow::Error::new(error).context("append failed"));
                        }
                        latency.record(append_start.elapsed());
                        appends += 1;
                    };
                    let mut merged = merged.lock().expect("no appender panics while holding the lock");
                    merged.0.merge(&latency);
                    merged.1 += appends;
                    result
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    // The ones started see `stop` as soon as the gate opens.
                    stop.store(true, Ordering::Relaxed);
                    first_error =
                        Some(anyhow::Error::new(error).context(format!("cannot start appender thread {index}")));
                    break;
                }
            }
        }
        drop(gate_closed);
        let start = Instant::now();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        for handle in handles {
            if let Err(error) = handle.join().expect("appender threads do not panic") {
                first_error.get_or_insert(error);
            }
        }
        (start.elapsed(), log.stats())
    });
    if let Some(error) = first_error {
        return Err(error);
    }
    log.close().map_err(|failure| anyhow::anyhow!("closing the log failed: {failure}"))?;
    let (latency, appends) = merged.into_inner().expect("the appenders are done");
    assert_eq!(latency.samples(), appends, "one latency sample per append");
    ensure!(
        appends == stats_before_close.appends,
        "the log counted {} appends, the appenders {appends}",
        stats_before_close.appends
    );
    Ok(Row {
        kind: BenchKind::LogAppend,
        payload_bytes,
        writers,
        events: appends,
        elapsed,
        latency: Some(latency),
        records_per_fsync: Some(stats_before_close.records as f64 / stats_before_close.fsyncs.max(1) as f64),
        disk_bytes_per_event: edgebus_log::format::frame_bytes(payload_bytes),
        ratio_to_raw: None,
    })
}

/// Sequential reads of the whole log from its start, repeated for `duration`,
/// after one untimed pass that brings it into the page cache.
fn measure_read(log_dir: &Path, payload_bytes: u64, duration: Duration) -> anyhow::Result<Row> {
    let log = Log::open(log_dir, LogConfig::default())
        .with_context(|| format!("cannot reopen the log in {}", log_dir.display()))?;
    let warm = read_all(&log)?;
    let mut events = 0u64;
    let mut passes = 0u32;
    let start = Instant::now();
    while passes == 0 || (start.elapsed() < duration && passes < READ_PASSES_MAX) {
        let read = read_all(&log)?;
        ensure!(read == warm, "a pass read {read:?} records and bytes, the first {warm:?}");
        events += read.0;
        passes += 1;
    }
    let elapsed = start.elapsed();
    log.close().map_err(|failure| anyhow::anyhow!("closing the log failed: {failure}"))?;
    Ok(Row {
        kind: BenchKind::LogRead,
        payload_bytes,
        writers: 1,
        events,
        elapsed,
        latency: None,
        records_per_fsync: None,
        disk_bytes_per_event: edgebus_log::format::frame_bytes(payload_bytes),
        ratio_to_raw: None,
    })
}

/// Reads every record once; returns (records, payload bytes).
fn read_all(log: &Log) -> anyhow::Result<(u64, u64)> {
    let end = log.end_position();
    let mut position = log.start_position();
    let (mut records, mut bytes) = (0u64, 0u64);
    while position < end {
        let batch = log.read(position, READ_BATCH_RECORDS_MAX, READ_BATCH_BYTES_MAX)?;
        let Some(last) = batch.last() else { bail!("read at {position} returned nothing before the end {end}") };
        ensure!(batch[0].position == position, "read at {position} started at {}", batch[0].position);
        position = last.position + 1;
        records += batch.len() as u64;
        bytes += batch.iter().map(|r| r.payload.len() as u64).sum::<u64>();
    }
    Ok((records, bytes))
}

fn find(rows: &[Row], kind: BenchKind, writers: usize, payload_bytes: u64) -> Option<&Row> {
    rows.iter().find(|r| r.kind == kind && r.writers == writers && r.payload_bytes == payload_bytes)
}

/// The targets of the log, each with the figures it was judged on.
fn check_targets(rows: &[Row]) -> Vec<Check> {
    let mut checks = Vec::new();
    if let (Some(log), Some(raw)) = (find(rows, BenchKind::LogAppend, 1, 100), find(rows, BenchKind::RawFsync, 1, 100))
    {
        let ratio = log.events_per_s() / raw.events_per_s();
        checks.push(Check {
            bench: "target_check",
            target: "one appender >= 0.9x raw fdatasync rate (1 writer, 100 B)",
            pass: ratio >= TARGET_ONE_APPENDER_RATIO_MIN,
            measured: ratio,
            required: TARGET_ONE_APPENDER_RATIO_MIN,
            detail: format!(
                "{} events/s vs raw {} writes/s = {ratio:.2}x",
                thousands(log.events_per_s()),
                thousands(raw.events_per_s())
            ),
        });
    }
    let many = find(rows, BenchKind::LogAppend, 256, 1024);
    if let (Some(log), Some(raw)) = (many, find(rows, BenchKind::RawFsync, 256, 1024)) {
        let ratio = log.mb_per_s() / raw.mb_per_s();
        checks.push(Check {
            bench: "target_check",
            target: "256 appenders at 1 KiB >= 0.7x raw MB/s (256-record batches)",
            pass: ratio >= TARGET_MANY_APPENDERS_RATIO_MIN,
            measured: ratio,
            required: TARGET_MANY_APPENDERS_RATIO_MIN,
            detail: format!("{:.1} MB/s vs raw {:.1} MB/s = {ratio:.2}x", log.mb_per_s(), raw.mb_per_s()),
        });
    }
    if let (Some(log), Some(one)) = (many, find(rows, BenchKind::LogAppend, 1, 1024)) {
        let ratio = log.events_per_s() / one.events_per_s();
        checks.push(Check {
            bench: "target_check",
            target: "256 appenders at 1 KiB >= 50x one appender events/s (1 KiB)",
            pass: ratio >= TARGET_MANY_OVER_ONE_MIN,
            measured: ratio,
            required: TARGET_MANY_OVER_ONE_MIN,
            detail: format!(
                "{} events/s vs one appender {} events/s = {ratio:.1}x",
                thousands(log.events_per_s()),
                thousands(one.events_per_s())
            ),
        });
    }
    if let Some(read) = rows.iter().find(|r| r.kind == BenchKind::LogRead) {
        let bytes_per_s = read.mb_per_s() * 1e6;
        checks.push(Check {
            bench: "target_check",
            target: "sequential read >= 1 GB/s",
            pass: bytes_per_s >= TARGET_READ_BYTES_PER_S_MIN,
            measured: bytes_per_s / 1e9,
            required: TARGET_READ_BYTES_PER_S_MIN / 1e9,
            detail: format!(
                "{:.2} GB/s of payload ({} events/s of {} B)",
                bytes_per_s / 1e9,
                thousands(read.events_per_s()),
                read.payload_bytes
            ),
        });
    }
    checks
}

#[allow(clippy::too_many_arguments)]
fn print_report(
    args: &LogBenchArgs,
    duration: Duration,
    date: &str,
    machine: &Machine,
    filesystem: &Filesystem,
    dir: &Path,
    load: [Option<[f64; 3]>; 2],
    rows: &[Row],
    checks: &[Check],
) {
    let mode = if args.quick { "quick" } else { "full" };
    println!("edgebus bench log ({mode}: {:.1} s per workload), {date}", duration.as_secs_f64());
    println!("machine:    {}", machine.describe());
    println!("bench dir:  {} ({})", dir.display(), filesystem.describe());
    println!("durability: {DURABILITY}");
    let describe_load = |load: Option<[f64; 3]>| {
        load.map_or_else(|| "unknown".to_owned(), |[one, five, fifteen]| format!("{one:.2} {five:.2} {fifteen:.2}"))
    };
    println!("load avg:   {} at start, {} at end (1/5/15 min)", describe_load(load[0]), describe_load(load[1]));
    let busiest = load.iter().flatten().map(|[one, _, _]| *one).fold(0.0, f64::max);
    if busiest > 0.5 * machine.cores as f64 {
        println!(
            "note:       other work was running ({busiest:.1} runnable on {} cores): fdatasync figures \
             are noisy, compare with a quiet run",
            machine.cores
        );
    }
    println!();
    println!(
        "{:<22} {:>7} {:>7} {:>11} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "workload", "writers", "payload", "events/s", "MB/s", "p50 µs", "p99 µs", "rec/sync", "x raw"
    );
    for row in rows {
        let payload = if row.payload_bytes == 1024 { "1 KiB".to_owned() } else { format!("{} B", row.payload_bytes) };
        let optional =
            |value: Option<f64>, precision: usize| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"));
        println!(
            "{:<22} {:>7} {:>7} {:>11} {:>9.2} {:>9} {:>9} {:>9} {:>7}",
            row.kind.label(),
            row.writers,
            payload,
            thousands(row.events_per_s()),
            row.mb_per_s(),
            optional(row.latency_us(0.5), 0),
            optional(row.latency_us(0.99), 0),
            optional(row.records_per_fsync, 1),
            optional(row.ratio_to_raw, 2),
        );
    }
    println!();
    println!("MB/s counts payload bytes (1 MB = 10^6 B). Raw rows write, with no log code, the bytes the log writes");
    println!(
        "for the shape: `writers` framed records ({} B per 100 B record, {} B per 1 KiB record) per write +",
        edgebus_log::format::frame_bytes(100),
        edgebus_log::format::frame_bytes(1024)
    );
    println!("fdatasync, i.e. an ideal group commit; their latency is per write+fdatasync. rec/sync is records per");
    println!("fdatasync; x raw is the log's events/s (= MB/s) over the raw row of the same shape.");
    println!();
    println!("targets:");
    for check in checks {
        println!("  {}  {}: {}", if check.pass { "PASS" } else { "FAIL" }, check.target, check.detail);
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }

    #[test]
    fn targets_are_judged_on_the_rows_of_the_same_run() {
        let row = |kind, writers, payload_bytes, events| Row {
            kind,
            payload_bytes,
            writers,
            events,
            elapsed: Duration::from_secs(1),
            latency: None,
            records_per_fsync: None,
            disk_bytes_per_event: edgebus_log::format::frame_bytes(payload_bytes),
            ratio_to_raw: None,
        };
        let rows = vec![
            row(BenchKind::RawFsync, 1, 100, 6000),
            row(BenchKind::LogAppend, 1, 100, 5500),
            row(BenchKind::RawFsync, 256, 1024, 200_000),
            row(BenchKind::LogAppend, 256, 1024, 100_000),
            row(BenchKind::LogAppend, 1, 1024, 5000),
            row(BenchKind::LogRead, 1, 1024, 2_000_000),
        ];
        let checks = check_targets(&rows);
        let passes: Vec<bool> = checks.iter().map(|c| c.pass).collect();
        assert_eq!(passes, [true, false, false, true]);
        assert!(checks[1].detail.contains("= 0.50x"), "{}", checks[1].detail);
    }
}
