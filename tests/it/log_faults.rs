//! The log under injected faults and bad inputs, one test per fault: failed
//! and torn writes, failed `fdatasync`, flipped bits on disk and on read,
//! files and directories it cannot use, limits, a full queue, and the fsync
//! policies that acknowledge before syncing.
//!
//! Faults come from `edgebus_log::fault::FaultStorage`, which wraps real
//! files: what it lets through lands on disk, so reopening the directory with
//! plain storage shows what a crash at that moment would have left behind.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgebus_log::fault::{Fault, FaultStorage};
use edgebus_log::format::{self, frame_bytes, index_file_name, segment_file_name};
use edgebus_log::{AppendError, FsyncPolicy, IoFailure, Log, LogConfig, OpenError, ReadError, Record};
use edgebus_tests::gated_storage::{GatedStorage, WAIT_LIMIT};
use edgebus_tests::guarded;
use edgebus_types::limits::{LOG_FRAME_OVERHEAD_BYTES, LOG_SEGMENT_HEADER_BYTES};

const HEADER: u64 = LOG_SEGMENT_HEADER_BYTES;

/// A payload of `len` bytes that says which record it is.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut bytes = format!("record {i:06} ").into_bytes();
    bytes.resize(len.max(bytes.len()), b'a' + (i % 26) as u8);
    bytes.truncate(len);
    bytes
}

fn segment(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment_file_name(base))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).len()
}

fn flip_bit_on_disk(path: &Path, offset: u64, bit: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 1 << bit;
    fs::write(path, bytes).unwrap();
}

fn open_faulty(dir: &Path, config: LogConfig) -> (Log, FaultStorage) {
    let faults = FaultStorage::default();
    let log = guarded::open_with_storage(Arc::new(faults.clone()), dir, config).expect("open through FaultStorage");
    (log, faults)
}

fn read_all(log: &Log) -> Vec<Record> {
    let records = log.read(log.start_position(), usize::MAX, u64::MAX).expect("read the whole log");
    assert!(records.iter().map(|r| r.position).eq(log.start_position()..log.end_position()), "dense positions");
    records
}

/// Checks that the log holds exactly `expected`, from position 0.
fn assert_holds(log: &Log, expected: &[Vec<u8>]) {
    assert_eq!(log.start_position(), 0);
    assert_eq!(log.end_position(), expected.len() as u64);
    let records = read_all(log);
    for (record, want) in records.iter().zip(expected) {
        assert_eq!(&record.payload[..], &want[..], "record {} differs", record.position);
    }
    assert_eq!(log.verify().expect("verify"), expected.len() as u64);
}

fn expect_io(result: Result<edgebus_log::AppendOutcome, AppendError>) -> Arc<IoFailure> {
    match result {
        Err(AppendError::Io(failure)) => failure,
        other => panic!("expected AppendError::Io, got {other:?}"),
    }
}

fn expect_poisoned(result: Result<edgebus_log::AppendOutcome, AppendError>) -> Arc<IoFailure> {
    match result {
        Err(AppendError::Poisoned(failure)) => failure,
        other => panic!("expected AppendError::Poisoned, got {other:?}"),
    }
}

#[test]
fn full_disk_on_the_nth_write_names_file_and_offset_and_poisons_the_log() {
    for nth in [1u64, 3] {
        let dir = tempfile::tempdir().unwrap();
        let seg = segment(dir.path(), 0);
        let (log, faults) = open_faulty(dir.path(), LogConfig::default());
        let mut acked: Vec<Vec<u8>> = (0..10).map(|i| payload(i, 100)).collect();
        for record in &acked {
            log.append(&[record]).unwrap();
        }
        faults.arm(Fault::FailWrite { nth, kind: ErrorKind::StorageFull });
        // Each append is one write: the ones before the nth go through.
        for i in 10..10 + nth - 1 {
            acked.push(payload(i, 100));
            log.append(&[acked.last().unwrap()]).unwrap();
        }
        let offset = file_len(&seg);
        let failure = expect_io(log.append(&[payload(99, 100)]));
        assert_eq!(failure.op, "write");
        assert_eq!(failure.file, seg);
        assert_eq!(failure.offset, offset);
        assert_eq!(failure.source.kind(), ErrorKind::StorageFull);
        let message = failure.to_string();
        assert!(message.contains(&segment_file_name(0)) && message.contains(&offset.to_string()), "{message}");
        assert_eq!(file_len(&seg), offset, "a failed write wrote nothing");

        let poisoned = expect_poisoned(log.append(&[b"later"]));
        assert_eq!(poisoned.file, seg, "poisoned names the original failure");
        let (called_tx, called_rx) = mpsc::channel();
        assert!(matches!(
            log.try_submit(&[b"later"], move |r| called_tx.send(r).unwrap()),
            Err(AppendError::Poisoned(_))
        ));
        assert_holds(&log, &acked);
        assert!(log.close().is_err(), "close reports the failure that poisoned the log");
        assert!(called_rx.try_recv().is_err(), "a refused submit never calls back");
        drop(log);

        let log = guarded::open(dir.path(), LogConfig::default()).unwrap();
        assert_eq!(log.recovery_report().truncated, None);
        assert_holds(&log, &acked);
        assert_eq!(log.append(&[b"after"]).unwrap().first_position, acked.len() as u64);
    }
}

#[test]
fn failed_fsync_poisons_and_is_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    let seg = segment(dir.path(), 0);
    let (log, faults) = open_faulty(dir.path(), LogConfig::default());
    let acked: Vec<Vec<u8>> = (0..10).map(|i| payload(i, 100)).collect();
    for record in &acked {
        log.append(&[record]).unwrap();
    }
    let fsyncs_before = log.stats().fsyncs;
    faults.arm(Fault::FailSync { nth: 1 });
    let unsynced = payload(10, 100);
    let failure = expect_io(log.append(&[&unsynced]));
    assert_eq!(failure.op, "fdatasync");
    assert_eq!(failure.file, seg);
    assert_eq!(faults.syncs(), 1);
    // The record was written but not synced: it must not become visible.
    assert_eq!(log.end_position(), 10);
    assert!(log.read(10, 10, u64::MAX).unwrap().is_empty());

    assert_eq!(expect_poisoned(log.append(&[b"later"])).op, "fdatasync");
    assert_holds(&log, &acked);
    assert!(log.close().is_err());
    assert_eq!(faults.syncs(), 1, "a failed fdatasync is never retried, not even by close");
    assert_eq!(log.stats().fsyncs, fsyncs_before, "no fdatasync succeeded after the failure");
    drop(log);

    // Reopening runs recovery. The unsynced record is in the page cache and
    // so on "disk" here; it is whole, so recovery may keep it.
    let log = guarded::open(dir.path(), LogConfig::default()).unwrap();
    let records = read_all(&log);
    assert!(records.len() == 10 || records.len() == 11, "{} records", records.len());
    let mut expected = acked;
    if records.len() == 11 {
        expected.push(unsynced);
    }
    assert_holds(&log, &expected);
    assert!(log.append(&[b"after"]).is_ok());
}

/// Tears the write of a three-record atomic append after `keep_bytes` bytes.
/// Payloads of 37 bytes make 61-byte frames padded to 64, so the cut points
/// cover frame headers, payloads and padding.
#[test]
fn torn_write_is_cut_back_to_the_last_whole_append_and_reported() {
    const PAYLOAD_BYTES: usize = 37;
    let frame = frame_bytes(PAYLOAD_BYTES as u64);
    assert_eq!(frame, 64);
    let body_end_of_last = 2 * frame + LOG_FRAME_OVERHEAD_BYTES + PAYLOAD_BYTES as u64;
    for keep in [0, 1, 4, 8, 24, 60, 61, 63, 64, 65, 128, 150, 188, 189, 190, 191] {
        let dir = tempfile::tempdir().unwrap();
        let seg = segment(dir.path(), 0);
        let (log, faults) = open_faulty(dir.path(), LogConfig::default());
        let mut acked: Vec<Vec<u8>> = (0..5).map(|i| payload(i, PAYLOAD_BYTES)).collect();
        for record in &acked {
            log.append(&[record]).unwrap();
        }
        let torn_at = file_len(&seg);
        assert_eq!(torn_at, HEADER + 5 * frame);
        faults.arm(Fault::TearWrite { nth: 1, keep_bytes: keep });
        let group: Vec<Vec<u8>> = (5..8).map(|i| payload(i, PAYLOAD_BYTES)).collect();
        assert_eq!(expect_io(log.append(&group)).op, "write");
        assert!(matches!(log.append(&[b"later"]), Err(AppendError::Poisoned(_))));
        drop(log);
        assert_eq!(file_len(&seg), torn_at + keep as u64, "keep {keep}: the torn write left its prefix");

        let log = guarded::open(dir.path(), LogConfig::default()).unwrap();
        let report = log.recovery_report().clone();
        if (keep as u64) < body_end_of_last {
            if keep == 0 {
                assert_eq!(report.truncated, None, "keep {keep}");
            } else {
                let torn = report.truncated.unwrap_or_else(|| panic!("keep {keep}: torn tail not reported"));
                assert_eq!(torn.file, seg, "keep {keep}");
                assert_eq!(torn.offset, torn_at, "keep {keep}");
                assert_eq!(torn.bytes, keep as u64, "keep {keep}");
                assert!(!torn.reason.is_empty());
            }
        } else {
            // Every frame of the append is whole; only padding is missing,
            // which no checksum covers: recovery keeps the (unacknowledged)
            // append, whole.
            assert_eq!(report.truncated, None, "keep {keep}");
            acked.extend(group);
        }
        assert_holds(&log, &acked);
        let next = log.append(&[b"after"]).unwrap();
        assert_eq!(next.first_position, acked.len() as u64, "keep {keep}");
        acked.push(b"after".to_vec());
        log.close().unwrap();
        drop(log);
        let log = guarded::open(dir.path(), LogConfig::default()).unwrap();
        assert_eq!(log.recovery_report().truncated, None, "keep {keep}: a clean close leaves no torn tail");
        assert_holds(&log, &acked);
    }
}

/// 100-byte payloads in 4 KiB segments: 128-byte frames, 31 per segment.
fn sealed_segments_log(dir: &Path, storage: Option<&FaultStorage>) -> (Log, Vec<Vec<u8>>) {
    let config = LogConfig::small_segments(4096);
    let log = match storage {
        Some(faults) => guarded::open_with_storage(Arc::new(faults.clone()), dir, config).unwrap(),
        None => guarded::open(dir, config).unwrap(),
    };
    let records: Vec<Vec<u8>> = (0..100).map(|i| payload(i, 100)).collect();
    for record in &records {
        log.append(&[record]).unwrap();
    }
    assert!(log.stats().rolls >= 3, "{:?}", log.stats());
    (log, records)
}

const SEALED_FRAME: u64 = 128;
const SEALED_PER_SEGMENT: u64 = (4096 - HEADER) / SEALED_FRAME;

#[test]
fn bit_flipped_on_read_in_a_sealed_segment_is_reported_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultStorage::default();
    let (log, records) = sealed_segments_log(dir.path(), Some(&faults));
    let seg = segment(dir.path(), 0);
    let damaged_frame = HEADER + 7 * SEALED_FRAME;
    faults.arm(Fault::FlipBitOnRead {
        file_suffix: segment_file_name(0),
        offset: damaged_frame + LOG_FRAME_OVERHEAD_BYTES + 10,
        bit: 5,
    });
    let expect_corrupt = |result: Result<Vec<Record>, ReadError>, what: &str| match result {
        Err(ReadError::Corrupt(c)) => {
            assert_eq!(c.file, seg, "{what}");
            assert_eq!(c.offset, damaged_frame, "{what}: names the damaged frame");
        }
        other => panic!("{what}: expected ReadError::Corrupt, got {other:?}"),
    };
    expect_corrupt(log.read(0, 100, u64::MAX), "read over the damage");
    expect_corrupt(log.read(7, 1, u64::MAX), "read of the damaged record");
    expect_corrupt(log.read_backward(10, 100, u64::MAX), "backward read over the damage");
    assert!(matches!(log.verify(), Err(ReadError::Corrupt(_))));
    // Records before the damage, and other segments, still read.
    assert_eq!(log.read(6, 1, u64::MAX).unwrap()[0].payload, records[6]);
    let later = log.read(SEALED_PER_SEGMENT, 10, u64::MAX).unwrap();
    assert!(later.iter().all(|r| r.payload == records[r.position as usize]) && later.len() == 10);
    faults.clear();
    assert_eq!(log.read(7, 1, u64::MAX).unwrap()[0].payload, records[7], "the disk itself is fine");
}

#[test]
fn bit_flipped_on_disk_in_a_sealed_segment_is_caught_on_read_or_on_open_without_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let (log, records) = sealed_segments_log(dir.path(), None);
    log.close().unwrap();
    drop(log);
    let seg = segment(dir.path(), 0);
    let damaged_frame = HEADER + 7 * SEALED_FRAME;
    flip_bit_on_disk(&seg, damaged_frame + LOG_FRAME_OVERHEAD_BYTES + 10, 2);

    // With its index, a sealed segment is not read on open; the read finds the damage.
    let log = guarded::open(dir.path(), LogConfig::small_segments(4096)).unwrap();
    match log.read(0, 100, u64::MAX) {
        Err(ReadError::Corrupt(c)) => assert_eq!((c.file.as_path(), c.offset), (seg.as_path(), damaged_frame)),
        other => panic!("expected ReadError::Corrupt, got {other:?}"),
    }
    assert_eq!(log.read(50, 1, u64::MAX).unwrap()[0].payload, records[50]);
    drop(log);

    // Without it, open rebuilds the index by scanning, and refuses the damage.
    fs::remove_file(dir.path().join(index_file_name(0))).unwrap();
    match guarded::open(dir.path(), LogConfig::small_segments(4096)) {
        Err(OpenError::Corrupt(c)) => assert_eq!((c.file.as_path(), c.offset), (seg.as_path(), damaged_frame)),
        other => panic!("expected OpenError::Corrupt, got {other:?}"),
    }
}

/// 20 single-record appends of 100 bytes (128-byte frames), closed cleanly.
fn closed_log_of_twenty(dir: &Path) -> Vec<Vec<u8>> {
    let log = guarded::open(dir, LogConfig::default()).unwrap();
    let records: Vec<Vec<u8>> = (0..20).map(|i| payload(i, 100)).collect();
    for record in &records {
        log.append(&[record]).unwrap();
    }
    log.close().unwrap();
    records
}

#[test]
fn bit_flipped_on_disk_mid_active_segment_fails_open_naming_file_and_offset() {
    // Byte offsets within the frame: length, checksum, position, flags, batch delta, payload.
    for (field, at_in_frame, bit) in [
        ("len", 0, 0),
        ("len", 3, 7),
        ("crc", 5, 1),
        ("position", 8, 0),
        ("flags", 16, 1),
        ("delta", 20, 0),
        ("payload", 60, 4),
    ] {
        let dir = tempfile::tempdir().unwrap();
        closed_log_of_twenty(dir.path());
        as_after_a_crash(dir.path());
        let seg = segment(dir.path(), 0);
        let damaged_frame = HEADER + 10 * SEALED_FRAME;
        flip_bit_on_disk(&seg, damaged_frame + at_in_frame, bit);
        let len_before = file_len(&seg);
        match guarded::open(dir.path(), LogConfig::default()) {
            Err(OpenError::Corrupt(c)) => {
                assert_eq!(c.file, seg, "{field}");
                assert_eq!(c.offset, damaged_frame, "{field}");
                let message = OpenError::Corrupt(c).to_string();
                assert!(message.contains(&segment_file_name(0)) && message.contains("1312"), "{message}");
            }
            other => panic!("{field}: expected OpenError::Corrupt, got {other:?}"),
        }
        assert_eq!(file_len(&seg), len_before, "{field}: a corrupt log is left as it is, not truncated");
    }
}

/// A flipped bit in the last record looks exactly like a write that was torn
/// there: nothing after it proves that it had ever been written whole, so
/// recovery cuts it and reports a torn tail. Under `fsync = always` the
/// record was acknowledged, so this is the one case where damage loses an
/// acknowledged record without an error; the report says so.
#[test]
fn bit_flipped_in_the_last_record_is_indistinguishable_from_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let records = closed_log_of_twenty(dir.path());
    as_after_a_crash(dir.path());
    let seg = segment(dir.path(), 0);
    let last_frame = HEADER + 19 * SEALED_FRAME;
    flip_bit_on_disk(&seg, last_frame + 50, 3);
    let log = guarded::open(dir.path(), LogConfig::default()).unwrap();
    let torn = log.recovery_report().truncated.clone().expect("reported as a torn tail");
    assert_eq!(torn.file, seg);
    assert_eq!(torn.offset, last_frame);
    assert_eq!(torn.bytes, SEALED_FRAME);
    assert!(torn.reason.contains("checksum"), "{}", torn.reason);
    assert_holds(&log, &records[..19]);
    assert_eq!(file_len(&seg), last_frame);
}

/// After a clean close there is no torn tail to explain damage: the next
/// open trusts the index the close left and does not cut anything; the
/// damaged record is refused on read, naming the file and offset.
#[test]
fn after_a_clean_close_a_flipped_bit_in_the_last_record_is_refused_on_read_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let records = closed_log_of_twenty(dir.path());
    let seg = segment(dir.path(), 0);
    let last_frame = HEADER + 19 * SEALED_FRAME;
    flip_bit_on_disk(&seg, last_frame + 50, 3);
    let log = guarded::open(dir.path(), LogConfig::default()).unwrap();
    assert!(log.recovery_report().clean_close);
    assert_eq!(log.recovery_report().truncated, None);
    assert_eq!(log.end_position(), 20);
    let first: Vec<_> = log.read(0, 19, u64::MAX).unwrap().into_iter().map(|r| r.payload.to_vec()).collect();
    assert_eq!(first, records[..19]);
    match log.read(19, 1, u64::MAX) {
        Err(ReadError::Corrupt(c)) => {
            assert_eq!(c.file, seg);
            assert_eq!(c.offset, last_frame);
        }
        other => panic!("expected ReadError::Corrupt, got {other:?}"),
    }
}

/// Removes the index a clean close leaves for the active segment, so the
/// next open recovers the directory as it would after a crash.
fn as_after_a_crash(dir: &Path) {
    std::fs::remove_file(dir.join(format::index_file_name(0)))
        .expect("a clean close leaves the active segment's index");
}

#[test]
fn a_file_that_cannot_be_opened_is_a_typed_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    closed_log_of_twenty(dir.path());
    for (suffix, path, op) in
        [(".seg", segment(dir.path(), 0), "open"), (format::MARKER_FILE, dir.path().join(format::MARKER_FILE), "open")]
    {
        let faults = FaultStorage::default();
        faults.arm(Fault::FailOpen { file_suffix: suffix.to_owned(), kind: ErrorKind::PermissionDenied });
        match guarded::open_with_storage(Arc::new(faults), dir.path(), LogConfig::default()) {
            Err(OpenError::Io(failure)) => {
                assert_eq!(failure.file, path);
                assert_eq!(failure.op, op);
                assert_eq!(failure.source.kind(), ErrorKind::PermissionDenied);
                let message = OpenError::Io(failure).to_string();
                assert!(message.contains(&path.display().to_string()), "{message}");
            }
            other => panic!("{suffix}: expected OpenError::Io, got {other:?}"),
        }
    }
    // A new log whose first segment cannot be created.
    let fresh = tempfile::tempdir().unwrap();
    let faults = FaultStorage::default();
    faults.arm(Fault::FailOpen { file_suffix: ".seg".to_owned(), kind: ErrorKind::PermissionDenied });
    match guarded::open_with_storage(Arc::new(faults), fresh.path(), LogConfig::default()) {
        Err(OpenError::Io(failure)) => {
            assert_eq!(failure.file, segment(fresh.path(), 0));
            assert_eq!(failure.source.kind(), ErrorKind::PermissionDenied);
        }
        other => panic!("expected OpenError::Io, got {other:?}"),
    }
    assert!(guarded::open(fresh.path(), LogConfig::default()).is_ok(), "a refused creation leaves a usable directory");
}

/// Regression: a first open that failed or crashed right after creating the
/// `EDGEBUS-LOG` marker left it empty, and every later open refused the
/// directory as "a log in an unsupported format".
#[test]
fn a_first_open_cut_short_while_writing_the_marker_leaves_a_usable_directory() {
    let marker_contents: &[u8] = b"edgebus log\nformat 1\n";
    for keep_bytes in [0, 5] {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(format::MARKER_FILE);
        let faults = FaultStorage::default();
        faults.arm(Fault::TearWrite { nth: 1, keep_bytes });
        match guarded::open_with_storage(Arc::new(faults), dir.path(), LogConfig::default()) {
            Err(OpenError::Io(failure)) => assert_eq!((failure.op, &failure.file), ("write", &marker)),
            other => panic!("expected the marker write to fail, got {other:?}"),
        }
        assert_eq!(fs::read(&marker).unwrap(), marker_contents[..keep_bytes]);
        let log = guarded::open(dir.path(), LogConfig::default()).expect("the interrupted creation is finished");
        assert_eq!(log.append(&[b"first"]).unwrap().first_position, 0);
        assert_eq!(fs::read(&marker).unwrap(), marker_contents);
    }
    // A marker cut short next to segments is not a creation cut short: refused.
    let dir = tempfile::tempdir().unwrap();
    closed_log_of_twenty(dir.path());
    fs::write(dir.path().join(format::MARKER_FILE), &marker_contents[..5]).unwrap();
    assert!(matches!(guarded::open(dir.path(), LogConfig::default()), Err(OpenError::UnsupportedFormat { .. })));
}

#[test]
fn a_directory_that_is_not_ours_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    match guarded::open(dir.path(), LogConfig::default()) {
        Err(OpenError::NotALogDirectory { path, entry }) => {
            assert_eq!(path, dir.path());
            assert_eq!(entry, "notes.txt");
        }
        other => panic!("expected NotALogDirectory, got {other:?}"),
    }
    let entries: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, ["notes.txt"], "nothing was created in a foreign directory");
}

#[test]
fn a_path_that_is_a_file_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    match guarded::open(&file, LogConfig::default()) {
        Err(OpenError::NotADirectory { path }) => assert_eq!(path, file),
        other => panic!("expected NotADirectory, got {other:?}"),
    }
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn a_second_open_of_the_same_directory_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let log = guarded::open(dir.path(), LogConfig::default()).unwrap();
    log.append(&[b"one"]).unwrap();
    match guarded::open(dir.path(), LogConfig::default()) {
        Err(OpenError::Locked { path }) => assert_eq!(path, dir.path().join(format::LOCK_FILE)),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(log.append(&[b"two"]).unwrap().first_position, 1, "the first opener is unaffected");
    drop(log);
    assert_eq!(guarded::open(dir.path(), LogConfig::default()).unwrap().end_position(), 2);
}

#[test]
fn a_marker_of_another_format_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(format::MARKER_FILE), b"edgebus log\nformat 9\n").unwrap();
    match guarded::open(dir.path(), LogConfig::default()) {
        Err(OpenError::UnsupportedFormat { path, found }) => {
            assert_eq!(path, dir.path().join(format::MARKER_FILE));
            assert!(found.contains("format 9"), "{found}");
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}

#[test]
fn appends_over_the_limits_are_refused_with_typed_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { append_records_max: 4, ..LogConfig::small_segments(4096) };
    let (record_max, append_max) = (config.record_bytes_max, config.append_bytes_max);
    assert_eq!((record_max, append_max), (4032, 4064));
    let log = guarded::open(dir.path(), config).unwrap();
    let seg = segment(dir.path(), 0);
    let called = Arc::new(Mutex::new(Vec::new()));
    let refused = |records: &[Vec<u8>]| -> AppendError {
        let via_append = log.append(records).unwrap_err();
        let calls = Arc::clone(&called);
        let via_submit = log.try_submit(records, move |r| calls.lock().unwrap().push(r)).unwrap_err();
        let calls = Arc::clone(&called);
        let via_blocking_submit = log.submit(records, move |r| calls.lock().unwrap().push(r)).unwrap_err();
        assert_eq!(via_append.to_string(), via_submit.to_string());
        assert_eq!(via_append.to_string(), via_blocking_submit.to_string());
        via_append
    };
    assert!(matches!(refused(&[]), AppendError::Empty));
    let too_large = vec![vec![1u8; 10], vec![2u8; record_max as usize + 1]];
    assert!(matches!(
        refused(&too_large),
        AppendError::RecordTooLarge { index: 1, bytes, max } if bytes == record_max + 1 && max == record_max
    ));
    let two_halves = vec![vec![3u8; 2100]; 2];
    assert!(matches!(
        refused(&two_halves),
        AppendError::AppendTooLarge { bytes: 4256, max } if max == append_max
    ));
    assert!(matches!(refused(&vec![vec![4u8]; 5]), AppendError::TooManyRecords { count: 5, max: 4 }));
    assert_eq!(log.end_position(), 0);
    assert_eq!(log.stats().batches, 0);
    assert_eq!(file_len(&seg), HEADER, "nothing was written");

    // The limits are inclusive.
    assert_eq!(log.append(&[vec![5u8; record_max as usize]]).unwrap().first_position, 0);
    assert_eq!(log.append(&vec![vec![6u8]; 4]).unwrap().positions(), 1..5);
    assert!(called.lock().unwrap().is_empty(), "refused submits never call back");
    log.close().unwrap();
    assert!(matches!(log.append(&[b"late"]), Err(AppendError::Closed)));
}

/// The writer is held inside its `write` by a closed gate, so the queue
/// fills deterministically.
#[test]
fn try_submit_on_a_full_queue_fails_with_queue_full() {
    for (queue_bytes_max, queue_appends_max, payload_bytes) in [(16 * 1024, 100, 8000), (1024 * 1024, 2, 10)] {
        let dir = tempfile::tempdir().unwrap();
        let storage = GatedStorage::default();
        let config = LogConfig { queue_bytes_max, queue_appends_max, ..LogConfig::small_segments(8192) };
        let log = guarded::open_with_storage(Arc::new(storage.clone()), dir.path(), config).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        storage.close_gate();
        let tx = done_tx.clone();
        log.submit(&[b"held"], move |r| tx.send(r).unwrap()).unwrap();
        storage.wait_for_held_writers(1);
        // The writer took the first append; the queue is empty again.
        for expected_position in [1, 2] {
            let tx = done_tx.clone();
            let queued = log.try_submit(&[vec![7u8; payload_bytes]], move |r| tx.send(r).unwrap()).unwrap();
            assert_eq!(queued.first_position, expected_position);
        }
        let tx = done_tx.clone();
        match log.try_submit(&[vec![8u8; payload_bytes]], move |r| tx.send(r).unwrap()) {
            Err(AppendError::QueueFull { queued_bytes, queued_appends }) => {
                assert_eq!(queued_bytes, 2 * payload_bytes as u64);
                assert_eq!(queued_appends, 2);
            }
            other => panic!("expected QueueFull, got {other:?}"),
        }
        assert_eq!(log.end_position(), 0, "nothing is acknowledged while the writer is held");
        storage.open_gate();
        let mut positions: Vec<u64> = (0..3)
            .map(|_| done_rx.recv_timeout(WAIT_LIMIT).expect("callback").expect("append succeeded").first_position)
            .collect();
        positions.sort_unstable();
        assert_eq!(positions, [0, 1, 2]);
        log.close().unwrap();
        drop(done_tx);
        assert!(done_rx.recv().is_err(), "the refused append never called back");
        assert_eq!(log.end_position(), 3);
    }
}

/// Under `never` and `interval`, appends are acknowledged once written, and
/// readable at once; close syncs, so a clean reopen finds everything.
#[test]
fn fsync_never_and_interval_acknowledge_before_syncing_and_survive_reopen() {
    for fsync in [FsyncPolicy::Never, FsyncPolicy::Interval(Duration::from_secs(3600))] {
        let dir = tempfile::tempdir().unwrap();
        let storage = GatedStorage::default();
        let config = LogConfig { fsync, ..LogConfig::default() };
        let log = Arc::new(guarded::open_with_storage(Arc::new(storage.clone()), dir.path(), config.clone()).unwrap());
        let syncs_at_open = storage.syncs();
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..100 {
                        log.append(&[payload(t * 1000 + i, 50)]).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(read_all(&log).len(), 200, "{fsync}: acknowledged means readable");
        assert_eq!(log.stats().fsyncs, 0, "{fsync}: no fdatasync on the append path");
        assert_eq!(storage.syncs(), syncs_at_open, "{fsync}");
        log.close().unwrap();
        // Close syncs the segment once, and the index it leaves for the next open.
        assert_eq!(storage.syncs(), syncs_at_open + 2, "{fsync}: close syncs the segment and its index");
        let expected: Vec<Vec<u8>> = read_all(&log).into_iter().map(|r| r.payload.to_vec()).collect();
        drop(log);
        let log = guarded::open(dir.path(), config).unwrap();
        assert_eq!(log.recovery_report().truncated, None);
        assert_holds(&log, &expected);
    }
}

#[test]
fn fsync_interval_syncs_an_idle_log_without_being_asked() {
    let dir = tempfile::tempdir().unwrap();
    let storage = GatedStorage::default();
    let config = LogConfig { fsync: FsyncPolicy::Interval(Duration::from_millis(20)), ..LogConfig::default() };
    let log = guarded::open_with_storage(Arc::new(storage.clone()), dir.path(), config).unwrap();
    let syncs_at_open = storage.syncs();
    log.append(&[b"one"]).unwrap();
    assert_eq!(read_all(&log).len(), 1);
    // No append and no close: only the interval timer can sync now.
    storage.wait_for_syncs(syncs_at_open + 1);
}

/// Which faults the sweep below injects, at every I/O call of a short run.
#[derive(Debug, Clone, Copy)]
enum SweepFault {
    FailWrite,
    FailSync,
    TearWrite(usize),
}

/// Fails (or tears) the nth write or sync of a run that opens a new log and
/// appends through several segment rolls, for every n: the fault lands on
/// the marker, segment headers, index files, record batches and their syncs.
/// Whatever happened, a reopen with plain storage holds every acknowledged
/// record and nothing else but the one unacknowledged append, whole.
#[test]
fn a_fault_at_any_io_of_a_run_with_rolls_recovers_every_acknowledged_append() {
    const NTH_MAX: u64 = 45;
    let config = LogConfig::small_segments(4096);
    let mut opens_failed = 0;
    for fault in [SweepFault::FailWrite, SweepFault::FailSync, SweepFault::TearWrite(0), SweepFault::TearWrite(45)] {
        for nth in 1..=NTH_MAX {
            let context = format!("{fault:?} at I/O {nth}");
            let dir = tempfile::tempdir().unwrap();
            let faults = FaultStorage::default();
            faults.arm(match fault {
                SweepFault::FailWrite => Fault::FailWrite { nth, kind: ErrorKind::StorageFull },
                SweepFault::FailSync => Fault::FailSync { nth },
                SweepFault::TearWrite(keep_bytes) => Fault::TearWrite { nth, keep_bytes },
            });
            let mut acked: Vec<Vec<u8>> = Vec::new();
            let mut failed_append: Option<Vec<Vec<u8>>> = None;
            match guarded::open_with_storage(Arc::new(faults.clone()), dir.path(), config.clone()) {
                Err(OpenError::Io(_)) => opens_failed += 1,
                Err(e) => panic!("{context}: open failed with {e:?}"),
                Ok(log) => {
                    for i in 0..40u64 {
                        let group: Vec<Vec<u8>> =
                            (0..1 + i % 3).map(|j| payload(i * 10 + j, 100 + (i as usize * 37) % 400)).collect();
                        match log.append(&group) {
                            Ok(outcome) => {
                                assert_eq!(outcome.first_position, acked.len() as u64, "{context}");
                                acked.extend(group);
                            }
                            Err(AppendError::Io(_)) => {
                                failed_append = Some(group);
                                break;
                            }
                            Err(e) => panic!("{context}: append failed with {e:?}"),
                        }
                    }
                    if failed_append.is_some() {
                        assert!(matches!(log.append(&[b"later"]), Err(AppendError::Poisoned(_))), "{context}");
                    }
                }
            }
            let log = guarded::open(dir.path(), config.clone()).unwrap_or_else(|e| panic!("{context}: reopen: {e}"));
            let records = read_all(&log);
            assert!(records.len() >= acked.len(), "{context}: lost acknowledged records");
            let mut expected = acked.clone();
            if records.len() > acked.len() {
                let group = failed_append.clone().unwrap_or_else(|| panic!("{context}: records from nowhere"));
                assert_eq!(records.len(), acked.len() + group.len(), "{context}: a partial append survived");
                expected.extend(group);
            }
            assert_holds(&log, &expected);
            assert_eq!(log.append(&[b"after"]).unwrap().first_position, expected.len() as u64, "{context}");
            expected.push(b"after".to_vec());
            log.close().unwrap();
            drop(log);
            let log = guarded::open(dir.path(), config.clone()).unwrap();
            assert_eq!(log.recovery_report().truncated, None, "{context}");
            assert_holds(&log, &expected);
        }
    }
    assert!(opens_failed > 0, "the sweep should also hit the first open");
}

type AppendResult = Result<edgebus_log::AppendOutcome, AppendError>;

/// `count` threads, each blocked in one append of one record; their results
/// arrive on the channel.
fn spawn_appenders(log: &Arc<Log>, count: u64) -> mpsc::Receiver<AppendResult> {
    let (tx, rx) = mpsc::channel();
    for i in 0..count {
        let (log, tx) = (Arc::clone(log), tx.clone());
        std::thread::spawn(move || tx.send(log.append(&[payload(100 + i, 64)])).unwrap());
    }
    rx
}

/// The results of `count` appenders, each within [`WAIT_LIMIT`].
fn results(appenders: &mpsc::Receiver<AppendResult>, count: usize) -> Vec<AppendResult> {
    (0..count).map(|_| appenders.recv_timeout(WAIT_LIMIT).expect("a blocked appender returns")).collect()
}

/// Waits until `count` appends wait in the queue (the writer is held).
fn wait_for_queued(log: &Log, count: usize) {
    let deadline = std::time::Instant::now() + WAIT_LIMIT;
    while log.append_queue().appends < count {
        assert!(std::time::Instant::now() < deadline, "appenders not queued after {WAIT_LIMIT:?}");
        std::thread::yield_now();
    }
}

/// A batch of more blocked appenders than the writer completes itself is
/// completed by the completer thread, which wakes all of them at once: each
/// returns its own position, and nothing is acknowledged twice.
#[test]
fn a_large_batch_of_blocked_appenders_is_woken_with_their_own_positions() {
    let dir = tempfile::tempdir().unwrap();
    let storage = GatedStorage::default();
    let log =
        Arc::new(guarded::open_with_storage(Arc::new(storage.clone()), dir.path(), LogConfig::default()).unwrap());
    storage.close_gate();
    let first = spawn_appenders(&log, 1);
    storage.wait_for_held_writers(1);
    // 40 appenders form the next batch, more than the writer wakes itself.
    let batch = spawn_appenders(&log, 40);
    wait_for_queued(&log, 40);
    storage.open_gate();
    let mut positions: Vec<u64> = results(&first, 1)
        .into_iter()
        .chain(results(&batch, 40))
        .map(|result| result.expect("append succeeds").first_position)
        .collect();
    positions.sort_unstable();
    assert!(positions.iter().copied().eq(0..41), "{positions:?}");
    assert_eq!(log.stats().batches, 2, "one batch held at the gate, one of the 40");
    assert_eq!(read_all(&log).len(), 41);
}

/// A failed `fdatasync` fails the blocked appenders of its batch with the
/// I/O error, and those of the batch queued behind it as poisoned: every one
/// of them returns.
#[test]
fn a_failed_sync_answers_every_blocked_appender_of_its_batch_and_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let gated = GatedStorage::default();
    let faults = FaultStorage::new(Arc::new(gated.clone()));
    let log = Arc::new(guarded::open_with_storage(Arc::new(faults.clone()), dir.path(), LogConfig::default()).unwrap());
    gated.close_gate();
    let failing = spawn_appenders(&log, 1);
    gated.wait_for_held_writers(1);
    let behind = spawn_appenders(&log, 40);
    wait_for_queued(&log, 40);
    faults.arm(Fault::FailSync { nth: 1 });
    gated.open_gate();
    for result in results(&failing, 1) {
        assert_eq!(expect_io(result).op, "fdatasync");
    }
    for result in results(&behind, 40) {
        assert_eq!(expect_poisoned(result).op, "fdatasync");
    }
    assert_eq!(expect_poisoned(log.append(&[b"later"])).op, "fdatasync");
    assert_eq!(log.end_position(), 0);
}
