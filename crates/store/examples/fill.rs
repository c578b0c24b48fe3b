//! Fills a store with small events and prints its memory as it goes: a
//! diagnostic for the store's memory bound (it must not grow with the
//! number of events).
//!
//! `cargo run --release -p edgebus-store --example fill -- DIR [EVENTS] [random-ids]`
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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgebus_store::{Store, StoreConfig};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};

const EVENTS_PER_APPEND: u64 = 1000;
const WRITERS: usize = 4;
const REPORT_EVERY: u64 = 1_000_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: fill DIR [EVENTS]")?);
    let total: u64 = args.next().map_or(Ok(10_000_000), |n| n.parse())?;
    let random_ids = match args.next().as_deref() {
        None => false,
        Some("random-ids") => true,
        Some(other) => return Err(format!("unknown argument {other:?}; expected `random-ids`").into()),
    };
    if dir.exists() {
        return Err(format!("{} exists; give a new directory", dir.display()).into());
    }
    let store = Arc::new(Store::open(&dir, StoreConfig::default())?);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, next) = (Arc::clone(&store), Arc::clone(&next));
            std::thread::spawn(move || -> Result<(), String> {
                let stream = StreamName::new("telemetry.backlog").map_err(|e| e.to_string())?;
                let event_type = EventType::new("Reading").map_err(|e| e.to_string())?;
                loop {
                    let from = next.fetch_add(EVENTS_PER_APPEND, Ordering::Relaxed);
                    if from >= total {
                        return Ok(());
                    }
                    let events = (from..(from + EVENTS_PER_APPEND).min(total))
                        .map(|i| NewEvent {
                            id: if random_ids {
                                EventId::from_u128(
                                    u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
                                )
                            } else {
                                EventId::generate()
                            },
                            event_type: event_type.clone(),
                            data: vec![b'x'; 100],
                            metadata: Vec::new(),
                            timestamp_ms: 0,
                        })
                        .collect();
                    store.append(&stream, ExpectedVersion::Any, events).map_err(|e| e.to_string())?;
                }
            })
        })
        .collect();
    let mut mark = REPORT_EVERY.min(total);
    let mut last = (0, Instant::now());
    loop {
        while next.load(Ordering::Relaxed) < mark.saturating_add(WRITERS as u64 * EVENTS_PER_APPEND).min(total) {
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
    if std::env::var_os("FILL_EXIT_QUIET").is_some() {
        std::process::exit(0);
    }
    store.close()?;
    Ok(())
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

/// User and system CPU time of this process, in seconds (100 ticks a second).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = rest.split_whitespace().skip(11).take(2).filter_map(|t| t.parse::<f64>().ok()).sum();
    ticks / 100.0
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
