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
//! 3. for more than one writer, `Log::submit` from one thread keeping that
//!    many single-record appends in flight: the same group commit without a
//!    thread to wake per append, which tells the log's own cost apart from
//!    the cost of the threads;
//!
//! and then 4. a sequential `Log::read` of the largest log written, from
//! position 0 in large batches, after the data is in the page cache.
//!
//! Every workload runs for a fixed time, in turns of [`SLICE_DURATION`] with
//! the other workloads of its shape. The report states the machine, the
//! filesystem and the durability setting, gives each append figure as a
//! ratio to the raw limit of the same shape, and checks the targets. It
//! reports; it does not fail when a target is missed.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
/// Length of one turn of a workload; see [`measure_shape`].
const SLICE_DURATION: Duration = Duration::from_millis(250);
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
    /// `Log::append`, one thread per append in flight.
    LogAppend,
    /// `Log::submit` from one thread with many appends in flight.
    LogSubmit,
    /// `Log::read`, sequential, from the page cache.
    LogRead,
}

impl BenchKind {
    fn label(self) -> &'static str {
        match self {
            Self::RawFsync => "raw write+fdatasync",
            Self::LogAppend => "log append",
            Self::LogSubmit => "log submit",
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
    let scratch = super::scratch_dir(args.dir.as_deref(), "edgebus-bench-log-")?;
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

/// Runs every workload: for each shape the raw limit, the appender threads
/// and the submitter take turns in slices; then the read of the largest log.
fn measure_all(dir: &Path, duration: Duration) -> anyhow::Result<Vec<Row>> {
    let slices = u32::try_from(duration.as_millis() / SLICE_DURATION.as_millis()).unwrap_or(u32::MAX).max(1);
    let mut rows = Vec::new();
    // The append log with the most payload bytes is kept for the read benchmark.
    let mut largest: Option<(u64, PathBuf, u64)> = None;
    for payload_bytes in PAYLOAD_BYTES {
        for writers in WRITERS {
            eprintln!(
                "  writers={writers}, payload={payload_bytes} B: raw write+fdatasync, log append{} in turns ...",
                if writers > 1 { ", log submit" } else { "" }
            );
            let shape = measure_shape(dir, payload_bytes, writers, slices)?;
            let bytes = shape.append.events * payload_bytes;
            if largest.as_ref().is_none_or(|(largest_bytes, _, _)| bytes > *largest_bytes) {
                if let Some((_, previous, _)) = largest.take() {
                    remove_dir(&previous)?;
                }
                largest = Some((bytes, shape.append_log_dir, payload_bytes));
            } else {
                remove_dir(&shape.append_log_dir)?;
            }
            rows.push(shape.raw);
            rows.push(shape.append);
            rows.extend(shape.submit);
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

fn open_log(dir: &Path) -> anyhow::Result<Log> {
    let config = LogConfig::default();
    assert_eq!(config.fsync, FsyncPolicy::Always, "the benchmark measures the default durability");
    Log::open(dir, config).with_context(|| format!("cannot open a log in {}", dir.display()))
}

fn close_log(log: &Log) -> anyhow::Result<()> {
    log.close().map_err(|failure| anyhow::anyhow!("closing the log in {} failed: {failure}", log.dir().display()))
}

fn records_per_fsync(stats: &LogStats) -> f64 {
    stats.records as f64 / stats.fsyncs.max(1) as f64
}

/// The rows of one shape, and the append log it left for the read benchmark.
#[derive(Debug)]
struct ShapeRows {
    raw: Row,
    append: Row,
    submit: Option<Row>,
    append_log_dir: PathBuf,
}

/// Measures one shape. The workloads take `slices` turns of
/// [`SLICE_DURATION`] each, so that other work on the machine, or a disk
/// that speeds up or slows down over time, hits them alike and the ratios
/// stay fair.
fn measure_shape(dir: &Path, payload_bytes: u64, writers: usize, slices: u32) -> anyhow::Result<ShapeRows> {
    let payload = vec![0x5au8; usize::try_from(payload_bytes).expect("small")];
    let mut raw = RawFsync::create(dir, payload_bytes, writers)?;
    let append_log_dir = dir.join(format!("append-{writers}w-{payload_bytes}b"));
    let append_log = open_log(&append_log_dir)?;
    // One thread with as many appends in flight as there are appender threads:
    // the same group commit without a thread to wake per append.
    let mut submitter = if writers > 1 {
        Some(Submitter::open(&dir.join(format!("submit-{writers}w-{payload_bytes}b")), &payload, writers)?)
    } else {
        None
    };
    let gate = Gate::default();
    let mut append_elapsed = Duration::ZERO;
    let (turns, appenders): (anyhow::Result<()>, Vec<anyhow::Result<(Histogram, u64)>>) = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(writers);
        let mut turns = Ok(());
        for index in 0..writers {
            let spawned = std::thread::Builder::new()
                .name(format!("bench-appender-{index}"))
                .stack_size(APPENDER_STACK_BYTES)
                .spawn_scoped(scope, || append_while_open(&gate, &append_log, &payload));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    turns = Err(anyhow::Error::new(error).context(format!("cannot start appender thread {index}")));
                    break;
                }
            }
        }
        if turns.is_ok() {
            turns = (|| {
                for _ in 0..slices {
                    raw.run_for(SLICE_DURATION)?;
                    append_elapsed += gate.open_for(handles.len(), SLICE_DURATION);
                    if let Some(submitter) = &mut submitter {
                        submitter.run_for(SLICE_DURATION)?;
                    }
                    ensure!(gate.all_running(handles.len()), "an appender thread stopped");
                }
                Ok(())
            })();
        }
        gate.close_for_good();
        let appenders = handles.into_iter().map(|h| h.join().expect("appender threads do not panic")).collect();
        (turns, appenders)
    });
    let append_stats = append_log.stats();
    close_log(&append_log)?;
    let mut append_latency = Histogram::default();
    let mut appends = 0u64;
    for appender in appenders {
        let (latency, count) = appender?;
        append_latency.merge(&latency);
        appends += count;
    }
    turns?;
    assert_eq!(append_latency.samples(), appends, "one latency sample per append");
    ensure!(appends == append_stats.appends, "the log counted {} appends, the threads {appends}", append_stats.appends);
    let raw = raw.finish()?;
    let mut append = Row {
        kind: BenchKind::LogAppend,
        payload_bytes,
        writers,
        events: appends,
        elapsed: append_elapsed,
        latency: Some(append_latency),
        records_per_fsync: Some(records_per_fsync(&append_stats)),
        disk_bytes_per_event: edgebus_log::format::frame_bytes(payload_bytes),
        ratio_to_raw: None,
    };
    append.ratio_to_raw = Some(append.events_per_s() / raw.events_per_s());
    let submit = match submitter {
        Some(submitter) => {
            let mut submit = submitter.finish()?;
            submit.ratio_to_raw = Some(submit.events_per_s() / raw.events_per_s());
            Some(submit)
        }
        None => None,
    };
    Ok(ShapeRows { raw, append, submit, append_log_dir })
}

/// The raw device limit: `write` of `writers` framed records, then
/// `fdatasync`, in a loop, on a plain file.
#[derive(Debug)]
struct RawFsync {
    file: File,
    path: PathBuf,
    payload_bytes: u64,
    writers: usize,
    batch: Vec<u8>,
    latency: Histogram,
    writes: u64,
    elapsed: Duration,
}

impl RawFsync {
    fn create(dir: &Path, payload_bytes: u64, writers: usize) -> anyhow::Result<Self> {
        let write_bytes = usize::try_from(edgebus_log::format::frame_bytes(payload_bytes)).expect("small") * writers;
        let path = dir.join(format!("raw-{writers}w-{payload_bytes}b"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            file,
            path,
            payload_bytes,
            writers,
            batch: vec![0xa5u8; write_bytes],
            latency: Histogram::default(),
            writes: 0,
            elapsed: Duration::ZERO,
        })
    }

    fn run_for(&mut self, duration: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < duration {
            let write_start = Instant::now();
            self.file.write_all(&self.batch).with_context(|| format!("write to {}", self.path.display()))?;
            self.file.sync_data().with_context(|| format!("fdatasync of {}", self.path.display()))?;
            self.latency.record(write_start.elapsed());
            self.writes += 1;
        }
        self.elapsed += start.elapsed();
        Ok(())
    }

    fn finish(self) -> anyhow::Result<Row> {
        drop(self.file);
        std::fs::remove_file(&self.path).with_context(|| format!("cannot remove {}", self.path.display()))?;
        Ok(Row {
            kind: BenchKind::RawFsync,
            payload_bytes: self.payload_bytes,
            writers: self.writers,
            events: self.writes * self.writers as u64,
            elapsed: self.elapsed,
            latency: Some(self.latency),
            records_per_fsync: Some(self.writers as f64),
            disk_bytes_per_event: edgebus_log::format::frame_bytes(self.payload_bytes),
            ratio_to_raw: None,
        })
    }
}

/// Lets the appender threads run in turns: they append while it is open and
/// wait while it is closed. The benchmark's thread opens it for a slice and
/// then waits until every appender is back, its last append acknowledged.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    /// Checked by the appenders before each append.
    open: AtomicBool,
    /// Appenders wait on this while the gate is closed.
    opened: Condvar,
    /// The benchmark's thread waits on this for the appenders to come back.
    returned: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    open: bool,
    for_good: bool,
    /// Appenders waiting for the gate to open.
    waiting: usize,
    /// Appenders that ended (an append failed, or the gate closed for good).
    ended: usize,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For an appender: waits for the gate to open; false once it closed for good.
    fn wait_open(&self) -> bool {
        let mut state = self.lock();
        state.waiting += 1;
        self.returned.notify_one();
        while !state.open && !state.for_good {
            state = self.opened.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.waiting -= 1;
        !state.for_good
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// For an appender, once it stops for whatever reason.
    fn ended(&self) {
        self.lock().ended += 1;
        self.returned.notify_one();
    }

    /// Opens the gate for `duration`, then waits until all `threads` appenders
    /// are back; returns the time from opening until the last was back.
    fn open_for(&self, threads: usize, duration: Duration) -> Duration {
        let mut state = self.lock();
        while state.waiting + state.ended < threads {
            state = self.returned.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.open = true;
        self.open.store(true, Ordering::Release);
        self.opened.notify_all();
        drop(state);
        let start = Instant::now();
        std::thread::sleep(duration);
        let mut state = self.lock();
        state.open = false;
        self.open.store(false, Ordering::Release);
        while state.waiting + state.ended < threads {
            state = self.returned.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        start.elapsed()
    }

    /// Whether none of the `threads` appenders has ended.
    fn all_running(&self, threads: usize) -> bool {
        let state = self.lock();
        state.ended == 0 && state.waiting == threads
    }

    fn close_for_good(&self) {
        self.lock().for_good = true;
        self.opened.notify_all();
    }
}

/// Counts an appender as ended however it stops, so the gate never waits for it.
struct EndedOnDrop<'a>(&'a Gate);

impl Drop for EndedOnDrop<'_> {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// One appender thread: one record per `Log::append`, back to back while the
/// gate is open. Returns its latencies and count of appends.
fn append_while_open(gate: &Gate, log: &Log, payload: &[u8]) -> anyhow::Result<(Histogram, u64)> {
    let _ended = EndedOnDrop(gate);
    let mut latency = Histogram::default();
    let mut appends = 0u64;
    while gate.wait_open() {
        while gate.is_open() {
            let append_start = Instant::now();
            log.append(&[payload]).context("append failed")?;
            latency.record(append_start.elapsed());
            appends += 1;
        }
    }
    Ok((latency, appends))
}

/// One thread keeping `in_flight_max` single-record appends in flight with
/// `Log::submit`; completions arrive as callbacks on the log's writer thread.
#[derive(Debug)]
struct Submitter {
    log: Log,
    payload: Vec<u8>,
    in_flight_max: usize,
    shared: Arc<SubmitShared>,
    elapsed: Duration,
}

#[derive(Debug, Default)]
struct SubmitShared {
    state: Mutex<SubmitState>,
    /// Signalled when an append completes while the submitter waits.
    completed: Condvar,
}

#[derive(Debug, Default)]
struct SubmitState {
    in_flight: usize,
    /// Whether the submitter waits on `completed`; callbacks signal only then,
    /// so the writer thread does not make a system call per completion.
    waiting: bool,
    appends: u64,
    latency: Histogram,
    failure: Option<String>,
}

impl Submitter {
    fn open(dir: &Path, payload: &[u8], in_flight_max: usize) -> anyhow::Result<Self> {
        Ok(Self {
            log: open_log(dir)?,
            payload: payload.to_vec(),
            in_flight_max,
            shared: Arc::default(),
            elapsed: Duration::ZERO,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SubmitState> {
        lock_submit_state(&self.shared)
    }

    /// Submits for `duration`, then waits until everything submitted completed.
    fn run_for(&mut self, duration: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < duration {
            self.wait_in_flight_below(self.in_flight_max);
            self.lock().in_flight += 1;
            let shared = Arc::clone(&self.shared);
            let submitted = Instant::now();
            let result = self.log.submit(&[&self.payload[..]], move |result| {
                let latency = submitted.elapsed();
                let mut state = lock_submit_state(&shared);
                match result {
                    Ok(_) => {
                        state.latency.record(latency);
                        state.appends += 1;
                    }
                    Err(error) => {
                        state.failure.get_or_insert_with(|| error.to_string());
                    }
                }
                state.in_flight -= 1;
                if state.waiting {
                    state.waiting = false;
                    shared.completed.notify_one();
                }
            });
            if let Err(error) = result {
                self.lock().in_flight -= 1;
                return Err(anyhow::Error::new(error).context("submit failed"));
            }
        }
        self.wait_in_flight_below(1);
        self.elapsed += start.elapsed();
        match self.lock().failure.take() {
            Some(failure) => bail!("a submitted append failed: {failure}"),
            None => Ok(()),
        }
    }

    fn wait_in_flight_below(&self, limit: usize) {
        let mut state = self.lock();
        while state.in_flight >= limit {
            state.waiting = true;
            state = self.shared.completed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn finish(self) -> anyhow::Result<Row> {
        let stats = self.log.stats();
        close_log(&self.log)?;
        remove_dir(self.log.dir())?;
        let state = std::mem::take(&mut *self.lock());
        ensure!(
            state.appends == stats.appends,
            "the log counted {} appends, the callbacks {}",
            stats.appends,
            state.appends
        );
        Ok(Row {
            kind: BenchKind::LogSubmit,
            payload_bytes: self.payload.len() as u64,
            writers: self.in_flight_max,
            events: state.appends,
            elapsed: self.elapsed,
            latency: Some(state.latency),
            records_per_fsync: Some(records_per_fsync(&stats)),
            disk_bytes_per_event: edgebus_log::format::frame_bytes(self.payload.len() as u64),
            ratio_to_raw: None,
        })
    }
}

fn lock_submit_state(shared: &SubmitShared) -> MutexGuard<'_, SubmitState> {
    shared.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    let notes = [
        "MB/s counts payload bytes (1 MB = 10^6 B); x raw is events/s (= MB/s) over the raw row of the same shape.".to_owned(),
        format!(
            "raw: no log code; per write the bytes the log writes for the shape, `writers` framed records ({} B per \
             100 B record, {} B per 1 KiB record), then fdatasync: an ideal group commit; latency per write+fdatasync.",
            edgebus_log::format::frame_bytes(100),
            edgebus_log::format::frame_bytes(1024)
        ),
        "log append: `writers` threads, each Log::append of one record, back to back; latency per append.".to_owned(),
        "log submit: one thread keeps `writers` single-record Log::submit appends in flight; latency submit to callback."
            .to_owned(),
        "rec/sync: records per fdatasync. Workloads of a shape run in turns of 250 ms.".to_owned(),
    ];
    for note in notes {
        println!("{note}");
    }
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
