//! Competing writers on one stream. Several threads, released together by a
//! barrier at every step, race `exists_or_write` at the same index, as
//! redundant transformers (or a gateway and its standby) do: exactly one
//! write wins each index and every other sees `Exists`, with `same` telling
//! whether its content matches the winner's. Then threads race appends with
//! the same exact expected version: exactly one succeeds per version and
//! the others get `WrongExpectedVersion` naming the winner's version.
//!
//! A little random jitter after each barrier spreads the wins over the
//! threads; its seed is printed (set `EDGEBUS_RACE_SEED` to reuse it).

use std::sync::{Arc, Barrier, mpsc};
use std::time::Duration;

use edgebus_store::{Direction, ErrorCode, ExistsOrWrite, Store, StoreConfig, StreamFrom, WriteError};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: usize = 4;
const INDEXES: u64 = 500;
const VERSIONS: u64 = 200;
/// A race that has not finished by then is stuck (for example, the store's
/// sequencer died and its writers wait forever): fail instead of hanging.
const RACE_DEADLINE: Duration = Duration::from_secs(60);

fn seed() -> u64 {
    let seed = std::env::var("EDGEBUS_RACE_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("EDGEBUS_RACE_SEED is a number"))
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("store_race: seed {seed} (set EDGEBUS_RACE_SEED={seed} to reuse it)");
    seed
}

/// Runs `work` on `THREADS` threads and returns their results in thread
/// order, failing if they do not all finish within [`RACE_DEADLINE`].
fn run_threads<T: Send + 'static>(work: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let work = Arc::new(work);
    let (done_tx, done_rx) = mpsc::channel();
    for thread in 0..THREADS {
        let (work, done_tx) = (Arc::clone(&work), done_tx.clone());
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(thread)));
            let _ = done_tx.send((thread, result));
        });
    }
    let mut results: Vec<Option<T>> = (0..THREADS).map(|_| None).collect();
    for _ in 0..THREADS {
        let (thread, result) = done_rx
            .recv_timeout(RACE_DEADLINE)
            .unwrap_or_else(|_| panic!("writers still running after {RACE_DEADLINE:?}: the store is stuck"));
        match result {
            Ok(value) => results[thread] = Some(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    results.into_iter().map(|r| r.expect("every thread reported")).collect()
}

/// Spins for a random moment so that no thread always wins.
fn jitter(rng: &mut StdRng) {
    for _ in 0..rng.random_range(0..4) {
        std::thread::yield_now();
    }
}

fn config() -> StoreConfig {
    StoreConfig { index_flush_events: 64, ..StoreConfig::default() }
}

/// The event a deterministic transformer produces at `index`: the same id,
/// content and timestamp every time; `odd` gives a transformer with other output.
fn output(index: u64, odd: bool) -> NewEvent {
    let data = if odd { format!("{{\"odd\":{index}}}") } else { format!("{{\"n\":{index}}}") };
    NewEvent {
        id: EventId::from_u128(0x0_7a45_0000_0000_0000_0000_0000_0000 | u128::from(index)),
        event_type: EventType::new("Derived").expect("valid event type"),
        data: data.into_bytes(),
        metadata: Vec::new(),
        timestamp_ms: 1_000 + index,
    }
}

/// Runs `THREADS` transformers over indexes `0..INDEXES` of one stream;
/// thread 0 has other output if `odd_thread`. Returns each thread's results.
fn race_exists_or_write(
    store: &Arc<Store>,
    stream: &StreamName,
    odd_thread: bool,
    seed: u64,
) -> Vec<Vec<ExistsOrWrite>> {
    let barrier = Arc::new(Barrier::new(THREADS));
    let (store, stream) = (Arc::clone(store), stream.clone());
    run_threads(move |thread| {
        let mut rng = StdRng::seed_from_u64(seed ^ thread as u64);
        let odd = odd_thread && thread == 0;
        (0..INDEXES)
            .map(|index| {
                barrier.wait();
                jitter(&mut rng);
                store
                    .exists_or_write(&stream, index, output(index, odd))
                    .unwrap_or_else(|e| panic!("thread {thread} at index {index}: {e}"))
            })
            .collect::<Vec<_>>()
    })
}

/// Checks one race: exactly one winner per index, everyone else told where
/// the winner's event is and whether it equals theirs, and the stream holds
/// exactly the winners' events, densely, in order. Returns the winners.
fn check_race(store: &Store, stream: &StreamName, results: &[Vec<ExistsOrWrite>], odd_thread: bool) -> Vec<usize> {
    let content_of = |thread: usize, index: u64| output(index, odd_thread && thread == 0).data;
    let events = store.read_stream(stream, StreamFrom::Start, Direction::Forward, 10_000, 0).expect("read the stream");
    assert_eq!(events.len() as u64, INDEXES, "the stream holds one event per index");
    let mut winners = Vec::new();
    for index in 0..INDEXES {
        let at = |thread: usize| results[thread][index as usize];
        let written: Vec<usize> = (0..THREADS).filter(|&t| matches!(at(t), ExistsOrWrite::Written { .. })).collect();
        assert_eq!(written.len(), 1, "index {index}: exactly one writer wins, got {written:?}");
        let winner = written[0];
        let ExistsOrWrite::Written { position } = at(winner) else { unreachable!() };
        let stored = &events[index as usize];
        assert_eq!((stored.version, stored.position), (index, position), "index {index}: the winner's event");
        assert_eq!(stored.data, content_of(winner, index), "index {index}: the winner's content");
        for thread in (0..THREADS).filter(|&t| t != winner) {
            let same = content_of(thread, index) == content_of(winner, index);
            assert_eq!(
                at(thread),
                ExistsOrWrite::Exists { position, same },
                "index {index}: thread {thread} lost to thread {winner}"
            );
        }
        winners.push(winner);
    }
    winners
}

fn wins_per_thread(winners: &[usize]) -> [usize; THREADS] {
    let mut wins = [0; THREADS];
    for &w in winners {
        wins[w] += 1;
    }
    wins
}

#[test]
fn identical_writers_race_exists_or_write_and_exactly_one_wins_each_index() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path(), config()).expect("open"));
    let stream = StreamName::new("derived.totals").expect("valid name");
    let end_before = store.log().end_position();
    let results = race_exists_or_write(&store, &stream, false, seed);
    let winners = check_race(&store, &stream, &results, false);
    eprintln!("store_race: identical writers, wins per thread {:?}", wins_per_thread(&winners));
    assert_eq!(store.log().end_position(), end_before + INDEXES, "nothing but the winners was written");
    let info = store.stream_info(&stream).expect("info").expect("exists");
    assert_eq!(info.current_version, Some(INDEXES - 1));
}

#[test]
fn a_writer_with_other_output_is_told_so_wherever_it_lost_or_won() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path(), config()).expect("open"));
    let stream = StreamName::new("derived.totals").expect("valid name");
    let results = race_exists_or_write(&store, &stream, true, seed);
    let winners = check_race(&store, &stream, &results, true);
    let wins = wins_per_thread(&winners);
    eprintln!("store_race: one odd writer (thread 0), wins per thread {wins:?}");
    // The odd thread must both win and lose somewhere, or half the check was idle.
    assert!(wins[0] > 0, "the odd writer never won an index: {wins:?}");
    assert!(wins[0] < INDEXES as usize, "the odd writer never lost an index: {wins:?}");
    let odd_saw_different =
        results[0].iter().filter(|r| matches!(r, ExistsOrWrite::Exists { same: false, .. })).count();
    assert_eq!(odd_saw_different, INDEXES as usize - wins[0], "the odd writer sees same: false wherever it lost");
}

#[test]
fn appends_racing_on_one_expected_version_have_exactly_one_winner() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(dir.path(), config()).expect("open"));
    let stream = StreamName::new("accounts.a-1").expect("valid name");
    let barrier = Arc::new(Barrier::new(THREADS));
    let (racing_store, racing_stream) = (Arc::clone(&store), stream.clone());
    let results: Vec<Vec<Result<_, WriteError>>> = run_threads(move |thread| {
        let mut rng = StdRng::seed_from_u64(seed ^ thread as u64);
        (0..VERSIONS)
            .map(|round| {
                // Everyone saw the previous round end: the stream is at `round - 1`.
                barrier.wait();
                jitter(&mut rng);
                let expected = round.checked_sub(1).map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                let event = NewEvent {
                    id: EventId::from_u128((u128::from(round) << 8) | thread as u128),
                    event_type: EventType::new("Debited").expect("valid event type"),
                    data: format!("{{\"thread\":{thread},\"round\":{round}}}").into_bytes(),
                    metadata: Vec::new(),
                    timestamp_ms: round,
                };
                racing_store.append(&racing_stream, expected, vec![event])
            })
            .collect::<Vec<_>>()
    });
    let events = store.read_stream(&stream, StreamFrom::Start, Direction::Forward, 10_000, 0).expect("read");
    assert_eq!(events.len() as u64, VERSIONS, "one event per round");
    let mut wins = [0usize; THREADS];
    for round in 0..VERSIONS {
        let winners: Vec<usize> = (0..THREADS).filter(|&t| results[t][round as usize].is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one append succeeds, got {winners:?}");
        let winner = winners[0];
        wins[winner] += 1;
        let result = results[winner][round as usize].as_ref().expect("winner");
        assert_eq!((result.first_version, result.count, result.already_written), (round, 1, false), "round {round}");
        let stored = &events[round as usize];
        assert_eq!(stored.version, round, "versions are dense");
        assert_eq!(stored.position, result.first_position, "round {round}: the winner's position");
        assert_eq!(stored.id, EventId::from_u128((u128::from(round) << 8) | winner as u128), "round {round}");
        for thread in (0..THREADS).filter(|&t| t != winner) {
            let error = results[thread][round as usize].as_ref().expect_err("loser");
            assert_eq!(error.code(), ErrorCode::WrongExpectedVersion, "round {round}, thread {thread}: {error}");
            assert!(
                matches!(error, WriteError::WrongExpectedVersion { source, .. } if source.current == Some(round)),
                "round {round}, thread {thread}: the error names the winner's version: {error:?}"
            );
        }
    }
    eprintln!("store_race: exact expected versions, wins per thread {wins:?}");
    assert_eq!(store.log().end_position(), VERSIONS, "losers wrote nothing");
}

/// Writers look up what the tail does not hold (their stream's state, their
/// events' ids) in the index with the store lock released, and use what they
/// read only if no flush finished meanwhile. Here every writer has streams
/// of its own and the tail flushes every few events, so most lookups go to
/// the index while flushes run beside them. Every append at its exact
/// expected version must succeed at that version, and every retry of an
/// earlier append (its id by now mostly flushed to the index) must be
/// answered as already written at its original position, never written
/// again nor refused. (A flush finishing between one writer's read and its
/// write, after another writer changed what it read, is set up step by step
/// in the store crate's own test
/// `a_writer_reads_the_index_again_if_a_flush_finished_while_it_read`.)
#[test]
fn writers_reading_the_index_beside_flushes_see_every_stream_and_id_that_left_the_tail() {
    const STREAMS_PER_THREAD: u64 = 16;
    const APPENDS_PER_THREAD: u64 = 640;
    let seed = seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = StoreConfig {
        tail_events_max: 32,
        index_flush_events: 4,
        log: edgebus_log::LogConfig { fsync: edgebus_log::FsyncPolicy::Never, ..edgebus_log::LogConfig::default() },
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::open(dir.path(), config).expect("open"));
    let writing_store = Arc::clone(&store);
    let retried: Vec<u64> = run_threads(move |thread| {
        let mut rng = StdRng::seed_from_u64(seed ^ thread as u64);
        let stream = |s: u64| StreamName::new(&format!("flush-race.t{thread}-s{s}")).expect("valid name");
        let event = |s: u64, version: u64| NewEvent {
            id: EventId::from_u128((thread as u128) << 96 | u128::from(s) << 64 | u128::from(version)),
            event_type: EventType::new("Counted").expect("valid event type"),
            data: format!("{{\"v\":{version}}}").into_bytes(),
            metadata: Vec::new(),
            timestamp_ms: 0,
        };
        let expected = |version: u64| version.checked_sub(1).map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        // Per stream, the position of each version written.
        let mut written: Vec<Vec<u64>> = vec![Vec::new(); STREAMS_PER_THREAD as usize];
        let mut retries = 0;
        for n in 0..APPENDS_PER_THREAD {
            let s = n % STREAMS_PER_THREAD;
            let version = written[s as usize].len() as u64;
            let result = writing_store
                .append(&stream(s), expected(version), vec![event(s, version)])
                .unwrap_or_else(|e| panic!("thread {thread}, stream {s}, version {version}: {e}"));
            assert_eq!((result.first_version, result.already_written), (version, false), "thread {thread}, stream {s}");
            written[s as usize].push(result.first_position);
            if rng.random_range(0..3) == 0 {
                let s = rng.random_range(0..=s);
                let version = rng.random_range(0..written[s as usize].len() as u64);
                let retry = writing_store
                    .append(&stream(s), expected(version), vec![event(s, version)])
                    .unwrap_or_else(|e| panic!("thread {thread}, retry of stream {s} version {version}: {e}"));
                assert!(
                    retry.already_written,
                    "thread {thread}: the retry of stream {s} version {version} was written again"
                );
                assert_eq!(retry.first_position, written[s as usize][version as usize], "thread {thread}, stream {s}");
                retries += 1;
            }
        }
        retries
    });
    let retries: u64 = retried.iter().sum();
    assert!(retries > 0, "no retries were made");
    assert_eq!(store.log().end_position(), THREADS as u64 * APPENDS_PER_THREAD, "retries wrote nothing");
    for thread in 0..THREADS {
        for s in 0..STREAMS_PER_THREAD {
            let stream = StreamName::new(&format!("flush-race.t{thread}-s{s}")).expect("valid name");
            let info = store.stream_info(&stream).expect("info").expect("exists");
            assert_eq!(info.current_version, Some(APPENDS_PER_THREAD / STREAMS_PER_THREAD - 1), "{stream}");
        }
    }
    eprintln!("store_race: {retries} retries beside flushes every 4 events");
}

/// Threads writing while the store closes: each write either succeeds, and
/// is there after reopening, or is refused as unavailable; none hangs and
/// nothing refused was written. The tail is small and flushed every few
/// events, so flushes run right up to the close.
#[test]
fn writes_racing_a_close_are_either_kept_or_refused() {
    const ACKED_BEFORE_CLOSE: u64 = 400;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || StoreConfig {
        tail_events_max: 16,
        index_flush_events: 4,
        log: edgebus_log::LogConfig { fsync: edgebus_log::FsyncPolicy::Never, ..edgebus_log::LogConfig::default() },
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::open(dir.path(), config()).expect("open"));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stream = |thread: usize| StreamName::new(&format!("closing.t{thread}")).expect("valid name");
    let (writing_store, writing_acked) = (Arc::clone(&store), Arc::clone(&acked));
    let closer = {
        let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + RACE_DEADLINE;
            while acked.load(std::sync::atomic::Ordering::Relaxed) < ACKED_BEFORE_CLOSE {
                assert!(std::time::Instant::now() < deadline, "the writers stalled before the close");
                std::thread::yield_now();
            }
            store.close().expect("close");
        })
    };
    let written: Vec<Vec<EventId>> = run_threads(move |thread| {
        let mut written = Vec::new();
        for n in 0u64.. {
            let event = NewEvent {
                id: EventId::from_u128(0xc105_0000_0000_0000 << 64 | (thread as u128) << 32 | u128::from(n)),
                event_type: EventType::new("Written").expect("valid event type"),
                data: b"{}".to_vec(),
                metadata: Vec::new(),
                timestamp_ms: 0,
            };
            match writing_store.append(&stream(thread), ExpectedVersion::Any, vec![event.clone()]) {
                Ok(_) => {
                    written.push(event.id);
                    writing_acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    assert_eq!(e.code(), ErrorCode::Unavailable, "thread {thread}: refused as unavailable: {e}");
                    break;
                }
            }
        }
        written
    });
    closer.join().expect("the closer finished");
    drop(store);
    let reopened = Store::open(dir.path(), config()).expect("reopen");
    for (thread, ids) in written.iter().enumerate() {
        let events = reopened
            .read_stream(&stream(thread), StreamFrom::Start, Direction::Forward, 100_000, 0)
            .unwrap_or_else(|e| panic!("thread {thread}: read: {e}"));
        let stored: Vec<EventId> = events.iter().map(|e| e.id).collect();
        assert_eq!(&stored, ids, "thread {thread}: exactly the acknowledged writes, in order");
    }
    let total: usize = written.iter().map(Vec::len).sum();
    assert!(total as u64 >= ACKED_BEFORE_CLOSE, "the close came after {total} writes");
}
