//! Fills a store with small events and prints its memory as it goes: a
//! diagnostic for the store's memory bound (it must not grow with the
//! number of events).
//!
//! `cargo run --release -p edgebus-store --example fill -- DIR [EVENTS] [random-ids | streams=N]`
//! writes EVENTS events of 100 bytes (default 10,000,000) to one stream in
//! DIR (which must not exist), 1,000 per append from 4 threads, and prints
//! after every million the fill rate, the resident set (`VmRSS`, of it
//! `RssAnon`) and the index's table files; at the end, also once the
//! index's flushes and compactions are done. The `edgebus` binary tunes glibc
//! malloc at startup (see `crates/cli/src/main.rs`); to see the store as the
//! node runs it, set the same tunables here: `MALLOC_ARENA_MAX=2
//! MALLOC_MMAP_THRESHOLD_=1048576`.
//!
//! With `FILL_EXIT_QUIET` set it exits after the quiet line without closing
//! the store, so that `heaptrack` reports what was live then as "leaked".
//!
//! The events' ids are time-ordered ([`EventId::generate`], as edgebus's own
//! producers make them); with `random-ids` they are random, as from a
//! producer that sends UUID version 4 ids, which the id index must insert
//! all over its key range.
//!
//! With `streams=N` it measures instead what the index costs per event:
//! 16 threads append one event at a time, event `i` to stream
//! `telemetry.s{i mod N}` (so every index flush holds a few versions of
//! every stream), with `fsync = never` so that the disk does not set the
//! pace. Once quiet it prints the CPU time per event of the whole process
//! (compactions included, which fjall may run long after the writes) and
//! of each thread still alive (the writers are gone by then), and the time
//! of 20,000 reads of 10 events from a version within a stream.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgebus_log::FsyncPolicy;
use edgebus_store::{Direction, Store, StoreConfig, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};

const EVENTS_PER_APPEND: u64 = 1000;
const WRITERS: usize = 4;
const REPORT_EVERY: u64 = 1_000_000;
/// Writers with `streams=N`, each appending one event at a time.
const STREAM_WRITERS: usize = 16;
/// Reads made at the end with `streams=N`, and the events each asks for.
const READS: u64 = 20_000;
const READ_EVENTS: usize = 10;

/// What the writers append.
#[derive(Clone, Copy)]
enum Shape {
    /// 1,000 events per append to one stream; ids random or time-ordered.
    OneStream { random_ids: bool },
    /// One event per append, event `i` to stream `i mod streams`.
    Streams(u64),
}

impl Shape {
    fn writers(self) -> usize {
        if let Self::Streams(_) = self { STREAM_WRITERS } else { WRITERS }
    }

    fn events_per_append(self) -> u64 {
        if let Self::Streams(_) = self { 1 } else { EVENTS_PER_APPEND }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: fill DIR [EVENTS] [random-ids | streams=N]")?);
    let total: u64 = args.next().map_or(Ok(10_000_000), |n| n.parse())?;
    let shape = match args.next().as_deref() {
        None => Shape::OneStream { random_ids: false },
        Some("random-ids") => Shape::OneStream { random_ids: true },
        Some(other) => match other.strip_prefix("streams=").map(str::parse::<u64>) {
            Some(Ok(streams)) if streams > 0 => Shape::Streams(streams),
            _ => return Err(format!("unknown argument {other:?}; expected `random-ids` or `streams=N` (N > 0)").into()),
        },
    };
    if dir.exists() {
        return Err(format!("{} exists; give a new directory", dir.display()).into());
    }
    let mut config = StoreConfig::default();
    if let Shape::Streams(_) = shape {
        config.log.fsync = FsyncPolicy::Never;
    }
    let store = Arc::new(Store::open(&dir, config)?);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..shape.writers())
        .map(|_| {
            let (store, next) = (Arc::clone(&store), Arc::clone(&next));
            std::thread::spawn(move || write(&store, &next, total, shape))
        })
        .collect();
    let mut mark = REPORT_EVERY.min(total);
    let mut last = (0, Instant::now());
    loop {
        while next.load(Ordering::Relaxed)
            < mark.saturating_add(writers.len() as u64 * shape.events_per_append()).min(total)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        report(&store, &format!("{mark:>10} events"), &dir, started, Some((mark - last.0, last.1)));
        last = (mark, Instant::now());
        if mark >= total {
            break;
        }
        mark = (mark + REPORT_EVERY).min(total);
    }
    for writer in writers {
        writer.join().map_err(|_| "a writer panicked")??;
    }
    std::thread::sleep(Duration::from_secs(2));
    report(&store, "   2 s on", &dir, started, None);
    // Then once the index's background work is done: under 5% of a core
    // over a second (at most 10 minutes).
    let quiet_from = Instant::now();
    let mut before = cpu_secs();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_secs();
        if now - before < 0.05 || quiet_from.elapsed() > Duration::from_secs(600) {
            break;
        }
        before = now;
    }
    report(&store, "    quiet", &dir, started, None);
    if let Shape::Streams(streams) = shape {
        report_costs(&store, total, streams)?;
    }
    if std::env::var_os("FILL_EXIT_QUIET").is_some() {
        std::process::exit(0);
    }
    store.close()?;
    Ok(())
}

/// One writer: takes the next events to write from `next` until `total`.
fn write(store: &Store, next: &AtomicU64, total: u64, shape: Shape) -> Result<(), String> {
    let event_type = EventType::new("Reading").map_err(|e| e.to_string())?;
    let event = |id| NewEvent {
        id,
        event_type: event_type.clone(),
        data: vec![b'x'; 100],
        metadata: Vec::new(),
        timestamp_ms: 0,
    };
    let one_stream = StreamName::new("telemetry.backlog").map_err(|e| e.to_string())?;
    let take = shape.events_per_append();
    loop {
        let from = next.fetch_add(take, Ordering::Relaxed);
        if from >= total {
            return Ok(());
        }
        let (stream, events) = match shape {
            Shape::OneStream { random_ids } => {
                let id = |i: u64| {
                    if random_ids {
                        EventId::from_u128(u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835))
                    } else {
                        EventId::generate()
                    }
                };
                (one_stream.clone(), (from..(from + take).min(total)).map(|i| event(id(i))).collect())
            }
            Shape::Streams(streams) => (stream_name(from % streams)?, vec![event(EventId::generate())]),
        };
        store.append(&stream, ExpectedVersion::Any, events).map_err(|e| e.to_string())?;
    }
}

fn stream_name(index: u64) -> Result<StreamName, String> {
    StreamName::new(&format!("telemetry.s{index}")).map_err(|e| e.to_string())
}

/// Prints the CPU time per event, of the process and of each live thread,
/// and the time of small reads from versions within streams.
fn report_costs(store: &Store, total: u64, streams: u64) -> Result<(), Box<dyn std::error::Error>> {
    let per_event = |secs: f64| secs * 1e6 / total as f64;
    println!("CPU per event, compactions included: {:.2} µs; of it, threads alive now:", per_event(cpu_secs()));
    for (thread, secs) in thread_cpu_secs() {
        println!("  {thread:<20} {:.2} µs", per_event(secs));
    }
    let versions = (total / streams).max(1);
    let started = Instant::now();
    let mut events = 0;
    for i in 0..READS {
        let stream = stream_name(i.wrapping_mul(7919) % streams)?;
        let from = StreamFrom::Version(i.wrapping_mul(31) % versions);
        events += store.read_stream(&stream, from, Direction::Forward, READ_EVENTS, 0)?.len();
    }
    println!(
        "reads: {READS} of up to {READ_EVENTS} events from a version within a stream, {:.1} µs each ({events} events)",
        started.elapsed().as_secs_f64() * 1e6 / READS as f64
    );
    Ok(())
}

/// CPU seconds of each thread of this process, by name (digits at the end
/// of a name dropped, so a pool's threads add up).
fn thread_cpu_secs() -> Vec<(String, f64)> {
    let mut threads = std::collections::BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit()).to_owned();
        *threads.entry(name).or_insert(0.0) += ticks_secs(&stat[close + 1..]);
    }
    threads.into_iter().filter(|(_, secs)| *secs > 0.0).collect()
}

/// Prints one line; `written` is the events written since an instant, for the rate.
fn report(store: &Store, label: &str, dir: &Path, started: Instant, written: Option<(u64, Instant)>) {
    let rate = written
        .map_or(String::new(), |(n, since)| format!("  {:>7.0} events/s", n as f64 / since.elapsed().as_secs_f64()));
    let index = store.index_memory();
    println!(
        "{label}  {:6.1} s{rate}  RSS {:6.1} MiB (anonymous {:6.1})  index tables {} ({} files), pinned {:.1} MiB, cache {:.1} MiB",
        started.elapsed().as_secs_f64(),
        status_mib("VmRSS:"),
        status_mib("RssAnon:"),
        index.tables,
        table_files(&dir.join("index")),
        index.pinned_bytes as f64 / 1048576.0,
        index.cache_bytes as f64 / 1048576.0,
    );
}

/// User and system CPU time of this process, in seconds.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    ticks_secs(stat.rsplit_once(')').map_or("", |(_, rest)| rest))
}

/// User plus system time, in seconds (100 ticks a second), from the fields
/// of a `stat` file after the command name.
fn ticks_secs(fields: &str) -> f64 {
    fields.split_whitespace().skip(11).take(2).filter_map(|t| t.parse::<f64>().ok()).sum::<f64>() / 100.0
}

/// A `/proc/self/status` field in MiB (0 if unreadable).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse::<f64>().ok());
    kib.unwrap_or(0.0) / 1024.0
}

/// Files in directories named `tables` under `dir`.
fn table_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                table_files(&path)
            } else {
                usize::from(path.parent().is_some_and(|p| p.ends_with("tables")))
            }
        })
        .sum()
}
