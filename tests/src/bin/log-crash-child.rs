//! Crash-test child: opens a log and appends self-checking records from
//! several threads, reporting every acknowledged append on stdout, until the
//! parent (`it/log_crash.rs`) kills it with SIGKILL.
//!
//! Usage: `log-crash-child DIR ROUND SEED FSYNC`. Output lines, each flushed
//! at once so that a kill never loses an acknowledgement the parent could see:
//!
//! - `started` first of all, which tells the parent that the exec is done
//!   (and so this process no longer holds copies of the parent's files);
//! - `opened START END` once the log is open;
//! - `ack FIRST THREAD SEQ CHECKSUM,...` after an append was acknowledged,
//!   one checksum per record (see `edgebus_tests::crash_record`);
//! - `done` when every thread used up its budget (normally it is killed first);
//! - `error MESSAGE` before exiting with status 1 on any unexpected failure.

use std::path::PathBuf;
use std::sync::Arc;

use edgebus_log::{FsyncPolicy, Log, LogConfig};
use edgebus_tests::crash_record::{self, KEEP_RECORDS, RecordId, SEGMENT_BYTES};
use edgebus_tests::report;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: u32 = 4;
/// Appends per thread before the child stops on its own: a bound in case nobody kills it.
const APPENDS_PER_THREAD_MAX: u64 = 50_000;
const REMOVE_EVERY_APPENDS: u64 = 64;

fn main() {
    report("started");
    if let Err(message) = run() {
        report(&format!("error {message}"));
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, round, seed, fsync] = args.as_slice() else {
        return Err(format!("usage: log-crash-child DIR ROUND SEED FSYNC (got {args:?})"));
    };
    let dir = PathBuf::from(dir);
    let round: u32 = round.parse().map_err(|e| format!("round {round:?}: {e}"))?;
    let seed: u64 = seed.parse().map_err(|e| format!("seed {seed:?}: {e}"))?;
    let fsync: FsyncPolicy = fsync.parse()?;
    let config = LogConfig { fsync, ..LogConfig::small_segments(SEGMENT_BYTES) };
    // The test process runs other tests beside this one, and a process any
    // of them forks holds a copy of the test's descriptors until its exec:
    // the lock of a log the test had open a moment ago may still be held
    // for that instant. Such a lock passes; anything else is an error.
    let started = std::time::Instant::now();
    let log = loop {
        match Log::open(&dir, config.clone()) {
            Ok(log) => break Arc::new(log),
            Err(edgebus_log::OpenError::Locked { .. }) if started.elapsed() < std::time::Duration::from_secs(5) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(format!("open: {e}")),
        }
    };
    report(&format!("opened {} {}", log.start_position(), log.end_position()));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || append_loop(&log, round, thread, seed))
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "an append thread panicked".to_owned())??;
    }
    report("done");
    Ok(())
}

fn body_len(rng: &mut StdRng) -> u32 {
    match rng.random_range(0..10) {
        0..6 => rng.random_range(0..64),
        6..9 => rng.random_range(64..1024),
        _ => rng.random_range(1024..8000),
    }
}

fn append_loop(log: &Log, round: u32, thread: u32, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(thread).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for seq in 0..APPENDS_PER_THREAD_MAX {
        let count: u16 = if rng.random_range(0..4) == 0 { rng.random_range(2..=6) } else { 1 };
        let id = RecordId { round, thread, seq, index: 0, count };
        let records: Vec<Vec<u8>> =
            (0..count).map(|index| crash_record::encode(id.with_index(index), body_len(&mut rng))).collect();
        let outcome = log.append(&records).map_err(|e| format!("append {id:?}: {e}"))?;
        if outcome.count != u32::from(count) {
            return Err(format!("append {id:?} acknowledged {} records, not {count}", outcome.count));
        }
        let checksums: Vec<String> = records
            .iter()
            .map(|r| crash_record::decode(r).map(|d| format!("{:016x}", d.checksum)))
            .collect::<Result<_, _>>()?;
        report(&format!("ack {} {thread} {seq} {}", outcome.first_position, checksums.join(",")));
        if thread == 0 && seq % REMOVE_EVERY_APPENDS == REMOVE_EVERY_APPENDS - 1 {
            let before = log.end_position().saturating_sub(KEEP_RECORDS);
            log.remove_segments_before(before).map_err(|e| format!("remove segments before {before}: {e}"))?;
        }
    }
    Ok(())
}
