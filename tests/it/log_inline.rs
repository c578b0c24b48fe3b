//! Appends the caller writes itself (`Log::submit_deferred` or
//! `Log::queue_deferred`, then `Log::write_deferred`): under `fsync =
//! interval | never` the caller's thread writes the batch and runs its
//! callbacks; under `always` the writer thread does. Whoever writes, positions stay dense, nothing queued
//! is left unwritten (another writer's batch, a close), the interval's
//! `fdatasync` still happens, and a failed write poisons the log.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use edgebus_log::fault::{Fault, FaultStorage};
use edgebus_log::{AppendError, AppendOutcome, FsyncPolicy, Log, LogConfig};
use edgebus_tests::guarded;

type Answers = Arc<Mutex<Vec<(ThreadId, Option<String>, Result<AppendOutcome, AppendError>)>>>;

/// A callback that records the thread it ran on, that thread's name and the result.
fn recorder(answers: &Answers) -> impl FnOnce(Result<AppendOutcome, AppendError>) + Send + 'static {
    let answers = Arc::clone(answers);
    move |result| {
        let thread = std::thread::current();
        answers.lock().unwrap().push((thread.id(), thread.name().map(str::to_owned), result));
    }
}

fn config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig { fsync, ..LogConfig::default() }
}

#[test]
fn without_fsync_per_append_the_caller_writes_and_answers_on_its_own_thread() {
    for fsync in [FsyncPolicy::Never, FsyncPolicy::Interval(Duration::from_secs(3600))] {
        let dir = tempfile::tempdir().unwrap();
        let log = guarded::open(dir.path(), config(fsync)).unwrap();
        let answers = Answers::default();
        for i in 0..3u32 {
            let out = log.submit_deferred(&[format!("deferred {i}")], recorder(&answers)).unwrap();
            assert_eq!(out.first_position, u64::from(i));
        }
        log.write_deferred();
        let answers = answers.lock().unwrap();
        assert_eq!(answers.len(), 3, "{fsync}: answered before write_deferred returns");
        for (i, (thread, _, result)) in answers.iter().enumerate() {
            assert_eq!(*thread, std::thread::current().id(), "{fsync}: answered on the caller's thread");
            assert_eq!(result.as_ref().unwrap().first_position, i as u64);
        }
        assert_eq!(log.end_position(), 3, "{fsync}: visible to readers");
        assert_eq!(log.read(0, 10, u64::MAX).unwrap()[2].payload.as_ref(), b"deferred 2");
        assert_eq!(log.stats().batches, 1, "{fsync}: the three appends are one write");
    }
}

#[test]
fn a_blocking_append_queued_without_a_wake_is_written_by_its_caller() {
    for fsync in [FsyncPolicy::Never, FsyncPolicy::Interval(Duration::from_secs(3600)), FsyncPolicy::Always] {
        let dir = tempfile::tempdir().unwrap();
        let log = guarded::open(dir.path(), config(fsync)).unwrap();
        let queued: Vec<_> = (0..3).map(|i| log.queue_deferred(&[format!("queued {i}")]).unwrap()).collect();
        log.write_deferred();
        if fsync != FsyncPolicy::Always {
            assert_eq!(log.end_position(), 3, "{fsync}: written before write_deferred returns");
            assert_eq!(log.stats().batches, 1, "{fsync}: the three appends are one write");
        }
        for (i, queued) in queued.into_iter().enumerate() {
            assert_eq!(log.wait(queued).unwrap().first_position, i as u64, "{fsync}");
        }
        assert_eq!(log.read(0, 10, u64::MAX).unwrap()[2].payload.as_ref(), b"queued 2");
    }
}

#[test]
fn with_fsync_per_append_the_writer_thread_writes_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let log = guarded::open(dir.path(), config(FsyncPolicy::Always)).unwrap();
    let answers = Answers::default();
    let (done, answered) = mpsc::channel();
    let record = recorder(&answers);
    log.submit_deferred(&[b"synced"], move |result| {
        record(result);
        done.send(()).unwrap();
    })
    .unwrap();
    log.write_deferred();
    answered.recv_timeout(Duration::from_secs(30)).expect("answered");
    let answers = answers.lock().unwrap();
    assert_ne!(answers[0].0, std::thread::current().id());
    assert_eq!(answers[0].1.as_deref(), Some("edgebus-log-writer"));
    assert_eq!(log.stats().fsyncs, 1);
}

#[test]
fn a_close_writes_deferred_appends_nobody_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let answers = Answers::default();
    {
        let log = guarded::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
        log.submit_deferred(&[b"left behind"], recorder(&answers)).unwrap();
        log.close().unwrap();
    }
    assert!(answers.lock().unwrap()[0].2.is_ok());
    let log = guarded::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert_eq!(log.read(0, 10, u64::MAX).unwrap()[0].payload.as_ref(), b"left behind");
}

/// Threads writing their own batches, beside blocking appenders whose
/// appends the writing threads or the writer thread take: every append is
/// answered once, positions are dense, and the interval's sync happens.
#[test]
fn callers_writing_their_own_batches_beside_blocking_appenders_lose_nothing() {
    const WRITERS: u64 = 4;
    const BLOCKING: u64 = 2;
    const EACH: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(guarded::open(dir.path(), config(FsyncPolicy::Interval(Duration::from_millis(5)))).unwrap());
    let answers = Answers::default();
    let mut threads = Vec::new();
    for t in 0..WRITERS + BLOCKING {
        let (log, answers) = (Arc::clone(&log), Arc::clone(&answers));
        threads.push(std::thread::spawn(move || {
            for i in 0..EACH {
                let record = format!("{t}:{i}");
                if t < WRITERS {
                    log.submit_deferred(&[record], recorder(&answers)).unwrap();
                    log.write_deferred();
                } else {
                    log.append(&[record]).unwrap();
                }
            }
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
    let total = (WRITERS + BLOCKING) * EACH;
    assert_eq!(log.end_position(), total);
    let answers = answers.lock().unwrap();
    assert_eq!(answers.len() as u64, WRITERS * EACH, "each deferred append answered once");
    let mut positions: Vec<u64> = answers.iter().map(|(_, _, r)| r.as_ref().unwrap().first_position).collect();
    positions.sort_unstable();
    positions.dedup();
    assert_eq!(positions.len() as u64, WRITERS * EACH);
    let records = log.read(0, usize::MAX, u64::MAX).unwrap();
    assert!(records.iter().map(|r| r.position).eq(0..total));
    assert_synced_on_the_interval(&log, 1);
}

/// Waits (at most 30 s) for the writer thread's interval `fdatasync`s to
/// reach `fsyncs`.
fn assert_synced_on_the_interval(log: &Log, fsyncs: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.stats().fsyncs < fsyncs && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(log.stats().fsyncs >= fsyncs, "synced on the interval: {:?}", log.stats());
}

/// The writer thread sleeps without a timeout (nothing is unsynced) when
/// the caller writes: it is woken to sync on the interval all the same.
#[test]
fn what_callers_wrote_is_synced_on_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let log = guarded::open(dir.path(), config(FsyncPolicy::Interval(Duration::from_millis(5)))).unwrap();
    // The writer thread writes this one, syncs it, and goes to sleep.
    log.append(&[b"synced"]).unwrap();
    assert_synced_on_the_interval(&log, 1);
    let answers = Answers::default();
    log.submit_deferred(&[b"unsynced"], recorder(&answers)).unwrap();
    log.write_deferred();
    assert_eq!(answers.lock().unwrap()[0].0, std::thread::current().id());
    assert_synced_on_the_interval(&log, 2);
}

#[test]
fn a_failed_write_on_the_callers_thread_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultStorage::default();
    let log = guarded::open_with_storage(Arc::new(faults.clone()), dir.path(), config(FsyncPolicy::Never)).unwrap();
    let answers = Answers::default();
    log.submit_deferred(&[b"kept"], recorder(&answers)).unwrap();
    log.write_deferred();
    faults.arm(Fault::FailWrite { nth: 1, kind: std::io::ErrorKind::Other });
    log.submit_deferred(&[b"fails"], recorder(&answers)).unwrap();
    log.write_deferred();
    {
        let answers = answers.lock().unwrap();
        assert!(answers[0].2.is_ok());
        assert!(matches!(&answers[1].2, Err(AppendError::Io(failure)) if failure.op == "write"), "{:?}", answers[1].2);
    }
    assert!(matches!(log.submit_deferred(&[b"later"], recorder(&answers)), Err(AppendError::Poisoned(_))));
    assert!(matches!(log.append(&[b"later"]), Err(AppendError::Poisoned(_))));
    let failure = log.close().expect_err("close reports the failure");
    assert_eq!(failure.op, "write");
    assert_eq!(log.read(0, 10, u64::MAX).unwrap().len(), 1, "only the first append is visible");
}
