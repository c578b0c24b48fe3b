//! Crash safety of the index checkpoint. A child process opens a store whose
//! indexer checkpoints every few records and writes from several threads
//! (appends to shared streams, exists-or-write, snapshots, metadata); the
//! parent kills it with SIGKILL at a random moment, many times over on the
//! same directory. After each kill the parent reopens the store from the
//! checkpoint the crash left behind and checks that every acknowledged write
//! reads back at its stream, version and position with its id and content,
//! that retrying the last round's acknowledged appends is recognised as
//! already written, then takes the index digest, deletes the index, rebuilds
//! it from the log and requires the same digest.
//!
//! The child is `src/bin/store-crash-child.rs`. Kill delays and the child's
//! choices come from one seed, printed at the start (set
//! `EDGEBUS_STORE_CRASH_SEED` to replay them; the exact moment a kill lands
//! still varies from run to run).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edgebus_log::LogConfig;
use edgebus_store::{Direction, OpenReport, Store, StoreConfig, StreamFrom};
use edgebus_types::{EventId, ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROUNDS: u32 = 24;
/// One round in this many kills the child while it opens the store.
const EARLY_KILL_ONE_IN: u32 = 5;
const EARLY_KILL_DELAY_MS: std::ops::Range<u64> = 0..10;
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 5..=150;
/// How long the child may take to report that it opened the store.
const OPEN_WAIT: Duration = Duration::from_secs(20);
const EOW_STREAM: &str = "crash.eow";
const META_STREAM: &str = "crash.meta";
const SNAPSHOT_SOURCE: &str = "crash";

/// The child's configuration (`store-crash-child`'s `config()`).
fn config() -> StoreConfig {
    StoreConfig {
        tail_events_max: 1024,
        index_flush_events: 4,
        index_flush_interval: Some(Duration::from_millis(2)),
        log: LogConfig::small_segments(64 * 1024),
        ..StoreConfig::default()
    }
}

/// An acknowledged event: where it must be, and its id and content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Acked {
    position: u64,
    id: EventId,
    content_hash: u64,
}

#[derive(Debug)]
enum Line {
    Opened {
        end: u64,
        checkpoint: u64,
        replayed: u64,
    },
    /// An append (`eow == false`) or an exists-or-write of events at consecutive versions.
    Events {
        stream: String,
        first_version: u64,
        first_position: u64,
        events: Vec<(EventId, u64)>,
        eow: bool,
    },
    Snapshot {
        stream: String,
        version: u64,
        position: u64,
    },
    Metadata {
        stream: String,
        max_count: u64,
        position: u64,
    },
    Done,
    Error(String),
}

fn parse_line(line: &str) -> Line {
    let words: Vec<&str> = line.split(' ').collect();
    let number = |i: usize| -> u64 {
        words.get(i).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("child wrote a malformed line: {line:?}"))
    };
    let events = |i: usize| -> Vec<(EventId, u64)> {
        words
            .get(i)
            .unwrap_or_else(|| panic!("no events in {line:?}"))
            .split(',')
            .map(|pair| {
                let (id, hash) = pair.split_once(':').unwrap_or_else(|| panic!("bad event in {line:?}"));
                let id = u128::from_str_radix(id, 16).unwrap_or_else(|_| panic!("bad id in {line:?}"));
                let hash = u64::from_str_radix(hash, 16).unwrap_or_else(|_| panic!("bad hash in {line:?}"));
                (EventId::from_u128(id), hash)
            })
            .collect()
    };
    match words[0] {
        "opened" => Line::Opened { end: number(1), checkpoint: number(2), replayed: number(3) },
        "ack" | "eow" => Line::Events {
            stream: words[1].to_owned(),
            first_version: number(2),
            first_position: number(3),
            events: events(4),
            eow: words[0] == "eow",
        },
        "snap" => Line::Snapshot { stream: words[1].to_owned(), version: number(2), position: number(3) },
        "meta" => Line::Metadata { stream: words[1].to_owned(), max_count: number(2), position: number(3) },
        "done" => Line::Done,
        "error" => Line::Error(line.to_owned()),
        _ => panic!("child wrote an unknown line: {line:?}"),
    }
}

/// What the parent knows across rounds.
#[derive(Debug, Default)]
struct Knowledge {
    /// Every acknowledged event, by stream and version.
    events: BTreeMap<String, BTreeMap<u64, Acked>>,
    /// Every acknowledged snapshot of the `exists_or_write` stream: version → position.
    snapshots: BTreeMap<u64, u64>,
    /// The largest acknowledged `max_count` of the metadata stream.
    max_count: Option<u64>,
    /// The last round's acknowledged appends: (stream, first version, first position, count).
    last_round_appends: Vec<(String, u64, u64, usize)>,
    /// The log's end when the parent last closed the store.
    end: u64,
}

#[derive(Debug, Default)]
struct Totals {
    acked_events: u64,
    rounds_with_acks: u32,
    early_kills: u32,
    exited_before_kill: u32,
    /// Rounds whose crash left the checkpoint behind the log's end.
    rounds_replaying: u32,
    replayed: u64,
    retries: u64,
}

#[test]
fn the_index_checkpoint_survives_sigkill_and_equals_a_rebuild() {
    let seed = std::env::var("EDGEBUS_STORE_CRASH_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("EDGEBUS_STORE_CRASH_SEED is a number"))
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("store_checkpoint_crash: seed {seed} (set EDGEBUS_STORE_CRASH_SEED={seed} to replay the same choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let began = Instant::now();
    let mut knowledge = Knowledge::default();
    let mut totals = Totals::default();
    for round in 0..ROUNDS {
        let lines = run_child_until_killed(dir.path(), round, &mut rng, &mut totals);
        let context = format!("seed {seed}, round {round}");
        absorb_lines(&lines, &mut knowledge, &mut totals, &context);
        check_recovered_store(dir.path(), &mut knowledge, &mut totals, &context);
    }
    eprintln!(
        "store_checkpoint_crash: {ROUNDS} rounds in {:?}, log end {}, {totals:?}",
        began.elapsed(),
        knowledge.end
    );
    // A crash test whose child never wrote, or whose crashes never left work
    // for the checkpoint replay, checks nothing.
    assert!(totals.rounds_with_acks >= ROUNDS / 2, "too few rounds acknowledged anything: {totals:?}");
    assert!(totals.rounds_replaying >= 2, "too few crashes left the checkpoint behind the log: {totals:?}");
    assert!(!knowledge.snapshots.is_empty() && knowledge.max_count.is_some(), "no commands acknowledged: {totals:?}");
}

/// Starts the child, kills it after a random delay, and returns every complete line it wrote.
fn run_child_until_killed(dir: &Path, round: u32, rng: &mut StdRng, totals: &mut Totals) -> Vec<Line> {
    let child_seed: u64 = rng.random();
    let early = rng.random_range(0..EARLY_KILL_ONE_IN) == 0;
    let delay_ms = if early { rng.random_range(EARLY_KILL_DELAY_MS) } else { rng.random_range(KILL_DELAY_MS) };
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-child"))
        .arg(dir)
        .args([round.to_string(), child_seed.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start store-crash-child");
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
    let mut lines = Vec::new();
    if early {
        totals.early_kills += 1;
    } else {
        // Count the delay from the moment the store is open, so most kills
        // land among writes and checkpoints rather than during start-up.
        loop {
            let line = line_rx
                .recv_timeout(OPEN_WAIT)
                .unwrap_or_else(|e| panic!("round {round}: no `opened` line from the child within {OPEN_WAIT:?}: {e}"));
            let line = parse_line(&line);
            let opened = matches!(line, Line::Opened { .. });
            if let Line::Error(message) = &line {
                panic!("round {round}: the child failed: {message}");
            }
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
fn absorb_lines(lines: &[Line], knowledge: &mut Knowledge, totals: &mut Totals, context: &str) {
    knowledge.last_round_appends.clear();
    let mut acks = 0;
    for line in lines {
        match line {
            Line::Opened { end, checkpoint, replayed } => {
                // The parent closed the store cleanly after a rebuild: nothing to replay.
                assert_eq!(
                    (*end, *checkpoint, *replayed),
                    (knowledge.end, knowledge.end, 0),
                    "{context}: child opened another state"
                );
            }
            Line::Events { stream, first_version, first_position, events, eow } => {
                acks += 1;
                let known = knowledge.events.entry(stream.clone()).or_default();
                for (i, &(id, content_hash)) in events.iter().enumerate() {
                    let version = first_version + i as u64;
                    let acked = Acked { position: first_position + i as u64, id, content_hash };
                    if let Some(previous) = known.insert(version, acked) {
                        panic!("{context}: {stream}@{version} acknowledged twice: {previous:?} then {acked:?}");
                    }
                    totals.acked_events += 1;
                }
                if !eow {
                    knowledge.last_round_appends.push((stream.clone(), *first_version, *first_position, events.len()));
                }
            }
            Line::Snapshot { stream, version, position } => {
                assert_eq!(stream, EOW_STREAM, "{context}");
                assert!(
                    knowledge.snapshots.insert(*version, *position).is_none(),
                    "{context}: snapshot {version} twice"
                );
            }
            Line::Metadata { stream, max_count, position } => {
                assert_eq!(stream, META_STREAM, "{context}");
                assert!(*position >= knowledge.end, "{context}: metadata acknowledged at an old position {position}");
                assert!(knowledge.max_count.is_none_or(|m| m < *max_count), "{context}: max_count went backwards");
                knowledge.max_count = Some(*max_count);
            }
            Line::Done => {}
            Line::Error(message) => panic!("{context}: the child failed: {message}"),
        }
    }
    if acks > 0 {
        totals.rounds_with_acks += 1;
    }
}

/// Every event of `stream`, read forward in pages.
fn read_everything(store: &Store, stream: &StreamName) -> Vec<RecordedEvent> {
    let mut out: Vec<RecordedEvent> = Vec::new();
    loop {
        let from = out.last().map_or(StreamFrom::Start, |e| StreamFrom::Version(e.version + 1));
        let page = store.read_stream(stream, from, Direction::Forward, 10_000, 0).expect("read stream");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

fn check_recovered_store(dir: &Path, knowledge: &mut Knowledge, totals: &mut Totals, context: &str) {
    let store = Store::open(dir, config()).unwrap_or_else(|e| panic!("{context}: reopen after the kill: {e}"));
    let report: OpenReport = store.open_report().clone();
    let end = store.log().end_position();
    assert_eq!(report.rebuilt, None, "{context}: the checkpoint is usable: {report:?}");
    assert!(report.checkpoint <= end, "{context}: checkpoint past the log's end {end}: {report:?}");
    assert_eq!(report.checkpoint + report.replayed, end, "{context}: replay covers checkpoint..end: {report:?}");
    if report.replayed > 0 {
        totals.rounds_replaying += 1;
        totals.replayed += report.replayed;
    }

    // Every acknowledged event, where it was acknowledged, with its content.
    let mut stored: HashMap<String, Vec<RecordedEvent>> = HashMap::new();
    for (stream, acked) in &knowledge.events {
        let name = StreamName::new(stream).expect("valid name");
        let events = read_everything(&store, &name);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event.version, i as u64, "{context}: {stream} is dense");
        }
        for (&version, want) in acked {
            let event = events.get(version as usize).unwrap_or_else(|| {
                panic!(
                    "{context}: acknowledged {stream}@{version} is missing ({} events, report {report:?})",
                    events.len()
                )
            });
            let got = Acked { position: event.position, id: event.id, content_hash: event.content_hash() };
            assert_eq!(got, *want, "{context}: {stream}@{version}");
        }
        stored.insert(stream.clone(), events);
    }

    // Acknowledged commands.
    let eow = StreamName::new(EOW_STREAM).expect("valid name");
    for (&version, &position) in &knowledge.snapshots {
        let snapshot = store
            .read_snapshot(SNAPSHOT_SOURCE, &eow, Some(version))
            .unwrap_or_else(|e| panic!("{context}: snapshot at {version}: {e}"));
        assert_eq!((snapshot.version, snapshot.position), (version, position), "{context}: snapshot {version}");
        assert_eq!(snapshot.state, format!("snapshot@{version}").into_bytes(), "{context}: snapshot {version}");
    }
    if let Some(max_count) = knowledge.max_count {
        let meta = StreamName::new(META_STREAM).expect("valid name");
        let info = store.stream_info(&meta).expect("info").expect("metadata was set");
        let got = info.metadata.max_count.expect("max_count was set");
        assert!(got >= max_count, "{context}: metadata went back from {max_count} to {got}");
    }

    // A client that lost its acknowledgement in the crash retries: the id
    // index recovered from the checkpoint must recognise the append.
    for (stream, first_version, first_position, count) in &knowledge.last_round_appends {
        let events: Vec<NewEvent> = stored[stream][*first_version as usize..*first_version as usize + count]
            .iter()
            .map(|e| NewEvent {
                id: e.id,
                event_type: e.event_type.clone(),
                data: e.data.clone(),
                metadata: e.metadata.clone(),
                timestamp_ms: e.timestamp_ms,
            })
            .collect();
        let name = StreamName::new(stream).expect("valid name");
        let result = store
            .append(&name, ExpectedVersion::Any, events)
            .unwrap_or_else(|e| panic!("{context}: retry of {stream}@{first_version}: {e}"));
        assert!(result.already_written, "{context}: retry of {stream}@{first_version} wrote again: {result:?}");
        assert_eq!((result.first_version, result.first_position), (*first_version, *first_position), "{context}");
        totals.retries += 1;
    }
    assert_eq!(store.log().end_position(), end, "{context}: the checks wrote nothing");

    // The state the checkpoint and its replay built equals a rebuild from the log.
    let digest = store.index_digest().expect("digest");
    store.close().expect("close");
    drop(store);
    std::fs::remove_dir_all(dir.join("index")).expect("remove the index");
    let rebuilt = Store::open(dir, config()).unwrap_or_else(|e| panic!("{context}: rebuild: {e}"));
    assert_eq!(rebuilt.open_report().replayed, end, "{context}: a rebuild replays the whole log");
    assert_eq!(rebuilt.index_digest().expect("digest"), digest, "{context}: checkpointed state differs from a rebuild");
    rebuilt.close().expect("close");
    knowledge.end = end;
}
