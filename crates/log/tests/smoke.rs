//! Basic behaviour of the log: append, read both ways, roll, reopen.

use std::sync::Arc;

use edgebus_log::{Log, LogConfig};

fn payload(i: u64) -> Vec<u8> {
    format!("record-{i}-{}", "x".repeat((i % 300) as usize)).into_bytes()
}

#[test]
fn append_read_roll_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::small_segments(8 * 1024);
    {
        let log = Log::open(dir.path(), config.clone()).unwrap();
        for i in 0..500u64 {
            let out = log.append(&[payload(i)]).unwrap();
            assert_eq!(out.first_position, i);
        }
        let group = log.append(&[payload(500), payload(501), payload(502)]).unwrap();
        assert_eq!(group.positions(), 500..503);
        assert!(log.stats().rolls >= 5, "small segments roll: {:?}", log.stats());
        let all = log.read(0, 10_000, u64::MAX).unwrap();
        assert_eq!(all.len(), 503);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.position, i as u64);
            assert_eq!(r.payload, payload(i as u64));
        }
        let back = log.read_backward(502, 10_000, u64::MAX).unwrap();
        assert_eq!(back.len(), 503);
        assert!(back.iter().rev().map(|r| r.position).eq(0..503));
        let mid = log.read(250, 7, u64::MAX).unwrap();
        assert!(mid.iter().map(|r| r.position).eq(250..257));
        let mid_back = log.read_backward(250, 7, u64::MAX).unwrap();
        assert!(mid_back.iter().map(|r| r.position).eq((244..=250).rev()));
        log.close().unwrap();
    }
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.end_position(), 503);
    assert_eq!(log.recovery_report().truncated, None);
    assert_eq!(log.verify().unwrap(), 503);
    let start = log.remove_segments_before(300).unwrap();
    assert!(start > 0 && start <= 300, "start {start}");
    assert!(log.read(0, 1, u64::MAX).is_err());
    assert_eq!(log.read(start, 1, u64::MAX).unwrap()[0].position, start);
    assert_eq!(log.append(&[b"after"]).unwrap().first_position, 503);
}

#[test]
fn concurrent_appenders_get_dense_positions() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogConfig::small_segments(64 * 1024)).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..200).map(|i| log.append(&[format!("{t}:{i}")]).unwrap().first_position).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut positions: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    positions.sort_unstable();
    assert!(positions.iter().copied().eq(0..1600));
    assert!(log.stats().batches < 1600, "group commit batches appends: {:?}", log.stats());
    assert_eq!(log.read(0, 5000, u64::MAX).unwrap().len(), 1600);
}

#[test]
fn a_clean_close_lets_the_next_open_skip_the_scan_and_a_crash_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::default();
    {
        let log = Log::open(dir.path(), config.clone()).unwrap();
        for i in 0..100u64 {
            log.append(&[payload(i)]).unwrap();
        }
        log.close().unwrap();
    }
    {
        let log = Log::open(dir.path(), config.clone()).unwrap();
        assert!(log.recovery_report().clean_close, "{:?}", log.recovery_report());
        assert_eq!(log.recovery_report().scanned_bytes, 0);
        assert_eq!(log.end_position(), 100);
        // Reads seek through the loaded index.
        assert_eq!(log.read(57, 1, u64::MAX).unwrap()[0].payload, payload(57));
        log.append(&[payload(100)]).unwrap();
        // Dropped without close would still close; simulate a crash by
        // leaking the log so no clean-close index is written.
        std::mem::forget(log);
    }
    // The lock of the leaked log is held by this process; a crash releases it.
    // Reopen through a fresh copy of the directory instead.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let log = Log::open(copy.path(), config).unwrap();
    assert!(!log.recovery_report().clean_close, "the index was removed when the log was opened");
    assert!(log.recovery_report().scanned_bytes > 0);
    assert_eq!(log.end_position(), 101);
}

#[test]
fn a_follower_waiting_for_the_end_wakes_on_each_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogConfig::default()).unwrap());
    // Nothing to wait for: the timeout ends the wait with the end unchanged.
    assert_eq!(log.wait_for_end(0, std::time::Duration::from_millis(1)), 0);
    let follower = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut seen = 0;
            while seen < 100 {
                // A lost wake-up would cost a whole 120 s wait.
                seen = log.wait_for_end(seen, std::time::Duration::from_secs(120));
            }
            (seen, started.elapsed())
        })
    };
    for i in 0..100u64 {
        log.append(&[payload(i)]).unwrap();
    }
    // The follower's waits are long: it returns because appends woke it.
    let (seen, waited) = follower.join().unwrap();
    assert_eq!(seen, 100);
    assert!(waited < std::time::Duration::from_secs(100), "a wake-up was lost: the follower waited {waited:?}");
    assert_eq!(log.wait_for_end(5, std::time::Duration::from_secs(60)), 100, "already beyond: returns at once");
}

#[test]
fn the_append_queue_shows_what_waits_for_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let idle = log.append_queue();
    assert_eq!((idle.appends, idle.bytes, idle.records_unacknowledged, idle.accepting), (0, 0, 0, true));
    // A completion callback runs on the writer's side: holding it holds the
    // writer, so the next append stays queued until it is released.
    let (entered, held) = std::sync::mpsc::channel();
    let (release, wait) = std::sync::mpsc::channel::<()>();
    log.submit(&[payload(0)], move |result| {
        result.unwrap();
        entered.send(()).unwrap();
        wait.recv().unwrap();
    })
    .unwrap();
    held.recv().unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    log.submit(&[b"ab".to_vec(), b"cde".to_vec()], move |result| done.send(result.map(|o| o.count)).unwrap()).unwrap();
    let queued = log.append_queue();
    assert_eq!((queued.appends, queued.bytes, queued.records_unacknowledged), (1, 5, 2), "{queued:?}");
    release.send(()).unwrap();
    assert_eq!(finished.recv().unwrap().unwrap(), 2);
    assert_eq!(log.append_queue().records_unacknowledged, 0);
    log.close().unwrap();
    assert!(!log.append_queue().accepting, "a closed log takes no appends");
}
