//! Crash test: a child process appends to a log from several threads and is
//! killed with SIGKILL at a random moment, a hundred times over on the same
//! directory. After each kill the parent reopens the log and checks that
//! every acknowledged record survived byte for byte, that positions are dense,
//! that every record present is a whole record the child wrote, and that
//! atomic appends are all or nothing.
//!
//! The child is `src/bin/log-crash-child.rs`; its payloads are described in
//! `edgebus_tests::crash_record`. Every kill delay and the child's own choices
//! come from one seed, printed at the start (set `EDGEBUS_CRASH_SEED` to
//! replay it; the exact moment a kill lands still varies from run to run).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edgebus_log::LogConfig;
use edgebus_tests::crash_record::{self, KEEP_RECORDS, RecordId, SEGMENT_BYTES};
use edgebus_tests::gated_storage::WAIT_LIMIT;
use edgebus_tests::guarded;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROUNDS: u32 = 100;
/// The fsync policy of each round, in turn: an acknowledged append must
/// survive a process crash under every policy.
const FSYNC_POLICIES: [&str; 4] = ["always", "always", "interval(5ms)", "never"];
/// One round in this many kills the child during start-up and recovery
/// instead of after it reported the log open.
const EARLY_KILL_ONE_IN: u32 = 5;
const EARLY_KILL_DELAY_MS: std::ops::Range<u64> = 0..8;
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 2..=100;

/// A record the parent knows must be in the log: who wrote it, and its checksum.
type Expected = (RecordId, u64);

/// What the parent knows across rounds.
#[derive(Debug, Default)]
struct Knowledge {
    /// Every acknowledged record still above the log's start, by position.
    acked: BTreeMap<u64, Expected>,
    /// Every record seen in the last verified state, by position: recovery
    /// may cut only an incomplete tail, so these must stay as they are.
    known: BTreeMap<u64, Expected>,
    start: u64,
    end: u64,
}

#[derive(Debug, Default)]
struct Totals {
    acked_appends: u64,
    rounds_with_acks: u32,
    early_kills: u32,
    exited_before_kill: u32,
    torn_tails: u32,
    truncated_bytes: u64,
    removed_to: u64,
}

#[derive(Debug)]
enum Line {
    Opened { start: u64, end: u64 },
    Ack { first: u64, thread: u32, seq: u64, checksums: Vec<u64> },
    Done,
    Error(String),
}

fn parse_line(line: &str) -> Line {
    let mut words = line.split(' ');
    let number = |w: Option<&str>| -> u64 {
        w.and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("child wrote a malformed line: {line:?}"))
    };
    match words.next() {
        Some("opened") => Line::Opened { start: number(words.next()), end: number(words.next()) },
        Some("ack") => {
            let first = number(words.next());
            let thread = u32::try_from(number(words.next())).expect("thread fits in u32");
            let seq = number(words.next());
            let checksums = words
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|c| u64::from_str_radix(c, 16).unwrap_or_else(|_| panic!("bad checksum in {line:?}")))
                .collect();
            Line::Ack { first, thread, seq, checksums }
        }
        Some("done") => Line::Done,
        Some("started") => panic!("child wrote `started` twice"),
        Some("error") => Line::Error(line.to_owned()),
        _ => panic!("child wrote an unknown line: {line:?}"),
    }
}

fn config() -> LogConfig {
    LogConfig::small_segments(SEGMENT_BYTES)
}

#[test]
fn acknowledged_appends_survive_sigkill_at_random_moments() {
    let seed = std::env::var("EDGEBUS_CRASH_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("EDGEBUS_CRASH_SEED is a number"))
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("log_crash: seed {seed} (set EDGEBUS_CRASH_SEED={seed} to replay the same choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let began = Instant::now();
    let mut knowledge = Knowledge::default();
    let mut totals = Totals::default();
    for round in 0..ROUNDS {
        let lines = run_child_until_killed(dir.path(), round, &mut rng, &mut totals);
        let context = format!("seed {seed}, round {round}");
        absorb_lines(&lines, round, &mut knowledge, &mut totals, &context);
        check_recovered_log(dir.path(), &mut knowledge, &mut totals, &context);
    }
    eprintln!(
        "log_crash: {ROUNDS} rounds in {:?}, final log {}..{}, {totals:?}",
        began.elapsed(),
        knowledge.start,
        knowledge.end
    );
    // A crash test that never saw the child append checks nothing.
    assert!(totals.rounds_with_acks >= ROUNDS / 2, "too few rounds acknowledged anything: {totals:?}");
    assert!(knowledge.end > 4 * KEEP_RECORDS, "the log should have grown past several removals: {totals:?}");
    assert!(totals.removed_to > 0, "the child should have removed segments: {totals:?}");
}

/// Starts the child, kills it after a random delay, and returns every complete line it wrote.
fn run_child_until_killed(dir: &Path, round: u32, rng: &mut StdRng, totals: &mut Totals) -> Vec<Line> {
    let fsync = FSYNC_POLICIES[round as usize % FSYNC_POLICIES.len()];
    let child_seed: u64 = rng.random();
    let early = rng.random_range(0..EARLY_KILL_ONE_IN) == 0;
    let delay_ms = if early { rng.random_range(EARLY_KILL_DELAY_MS) } else { rng.random_range(KILL_DELAY_MS) };
    let starting = guarded::starting_child();
    let mut child = Command::new(env!("CARGO_BIN_EXE_log-crash-child"))
        .arg(dir)
        .args([round.to_string(), child_seed.to_string(), fsync.to_owned()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start log-crash-child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (line_tx, line_rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        // A line without its newline was cut by the kill and is not an acknowledgement.
        while stdout.read_line(&mut line).is_ok_and(|n| n > 0) && line.ends_with('\n') {
            if line_tx.send(line.trim_end().to_owned()).is_err() {
                break;
            }
            line.clear();
        }
    });
    let first = line_rx.recv_timeout(WAIT_LIMIT).unwrap_or_else(|e| panic!("round {round}: child did not start: {e}"));
    assert_eq!(first, "started", "round {round}: the child's first line");
    drop(starting);
    let mut lines = Vec::new();
    if early {
        totals.early_kills += 1;
    } else {
        // Give the child its delay from the moment it has opened the log, so
        // most kills land among appends rather than during start-up.
        loop {
            let line = line_rx.recv_timeout(WAIT_LIMIT).unwrap_or_else(|e| {
                panic!("round {round}: no `opened` line from the child within {WAIT_LIMIT:?}: {e}")
            });
            let line = parse_line(&line);
            if let Line::Error(message) = &line {
                panic!("round {round}: the child failed before it opened the log: {message}");
            }
            let opened = matches!(line, Line::Opened { .. });
            lines.push(line);
            if opened {
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    if let Ok(Some(status)) = child.try_wait() {
        totals.exited_before_kill += 1;
        assert!(status.success(), "round {round}: child exited by itself with {status}");
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert!(status.success() || status.signal() == Some(libc::SIGKILL), "round {round}: child ended with {status}");
    reader.join().expect("stdout reader thread");
    lines.extend(line_rx.try_iter().map(|l| parse_line(&l)));
    lines
}

/// Records the child's acknowledgements, refusing any that contradict earlier ones.
fn absorb_lines(lines: &[Line], round: u32, knowledge: &mut Knowledge, totals: &mut Totals, context: &str) {
    let mut acks = 0u64;
    for line in lines {
        match line {
            Line::Opened { start, end } => {
                // Nothing happened between the parent's check and the child's open.
                assert_eq!((*start, *end), (knowledge.start, knowledge.end), "{context}: child opened another log");
            }
            Line::Ack { first, thread, seq, checksums } => {
                acks += 1;
                let count = u16::try_from(checksums.len()).expect("group size fits in u16");
                let id = RecordId { round, thread: *thread, seq: *seq, index: 0, count };
                for (index, checksum) in (0..count).zip(checksums) {
                    let position = first + u64::from(index);
                    let expected = (id.with_index(index), *checksum);
                    if let Some(previous) = knowledge.acked.insert(position, expected) {
                        panic!("{context}: position {position} acknowledged twice: {previous:?} then {expected:?}");
                    }
                }
            }
            Line::Done => {}
            Line::Error(message) => panic!("{context}: child failed: {message}"),
        }
    }
    totals.acked_appends += acks;
    totals.rounds_with_acks += u32::from(acks > 0);
}

fn check_expected(what: &str, expected: &BTreeMap<u64, Expected>, found: &[Expected], start: u64, context: &str) {
    for (&position, &(id, checksum)) in expected.range(start..) {
        let at = usize::try_from(position - start).expect("fits in usize");
        let Some(&(found_id, found_checksum)) = found.get(at) else {
            panic!(
                "{context}: {what} record {id:?} at position {position} is missing (log ends at {})",
                start + found.len() as u64
            );
        };
        assert_eq!(found_id, id, "{context}: {what} position {position} holds another record");
        assert_eq!(found_checksum, checksum, "{context}: {what} record at {position} changed");
    }
}

/// Reopens the log as recovery leaves it and checks everything the parent knows.
fn check_recovered_log(dir: &Path, knowledge: &mut Knowledge, totals: &mut Totals, context: &str) {
    let log = guarded::open(dir, config()).unwrap_or_else(|e| panic!("{context}: reopen failed: {e}"));
    if let Some(torn) = &log.recovery_report().truncated {
        totals.torn_tails += 1;
        totals.truncated_bytes += torn.bytes;
    }
    let (start, end) = (log.start_position(), log.end_position());
    assert!(start >= knowledge.start, "{context}: start moved back from {} to {start}", knowledge.start);
    assert!(start <= end, "{context}: start {start} past end {end}");
    if start > knowledge.start {
        // Only the child's removals move the start, and they keep the newest records.
        assert!(start + KEEP_RECORDS <= end, "{context}: start {start} moved too close to end {end}");
        totals.removed_to = start;
    }
    let mut found: Vec<Expected> = Vec::with_capacity((end - start) as usize);
    let mut position = start;
    while position < end {
        let records =
            log.read(position, 10_000, u64::MAX).unwrap_or_else(|e| panic!("{context}: read {position}: {e}"));
        assert!(!records.is_empty(), "{context}: read at {position} below end {end} returned nothing");
        for record in records {
            assert_eq!(record.position, position, "{context}: positions are not dense");
            let decoded = crash_record::decode(&record.payload)
                .unwrap_or_else(|e| panic!("{context}: position {position} holds a record the child never wrote: {e}"));
            found.push((decoded.id, decoded.checksum));
            position += 1;
        }
    }
    assert_eq!(log.read(end, 10, u64::MAX).map(|r| r.len()).ok(), Some(0), "{context}: records past the end");
    // Atomic appends are all or nothing: groups start at index 0 and run whole.
    let mut at = 0;
    while at < found.len() {
        let (head, _) = found[at];
        let group_start = start + at as u64;
        assert_eq!(head.index, 0, "{context}: position {group_start} starts in the middle of {head:?}");
        for index in 1..head.count {
            let position = group_start + u64::from(index);
            let Some(&(member, _)) = found.get(at + usize::from(index)) else {
                panic!("{context}: atomic append {head:?} at {group_start} is cut at position {position}");
            };
            assert_eq!(member, head.with_index(index), "{context}: position {position} breaks up {head:?}");
        }
        at += usize::from(head.count);
    }
    check_expected("acknowledged", &knowledge.acked, &found, start, context);
    check_expected("previously recovered", &knowledge.known, &found, start, context);
    assert_eq!(log.verify().unwrap_or_else(|e| panic!("{context}: verify: {e}")), end - start);
    log.close().unwrap_or_else(|e| panic!("{context}: close: {e}"));
    knowledge.acked = knowledge.acked.split_off(&start);
    knowledge.known = (start..).zip(found).collect();
    knowledge.start = start;
    knowledge.end = end;
}
