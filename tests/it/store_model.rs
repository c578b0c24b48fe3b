//! Model-based test of the store: random sequences of appends (every kind of
//! expected version), idempotent retries, exists-or-write, soft and hard
//! deletes, retention metadata, snapshots and reopens (some after deleting
//! the index, forcing a full rebuild) run against the store and against a
//! small in-memory model with ESDB semantics. Every result, and after every
//! operation every read (streams both ways, stream info, snapshots, `$all`,
//! the log's end), must equal what the model says.
//!
//! The model's rules, where the store's own documentation leaves room:
//! - a stream's current version is its last version, or `None` if it has no
//!   events or was soft-deleted since its last write; versions continue
//!   after a soft delete; a hard delete (tombstone) leaves it as it was;
//! - reads of a soft-deleted stream fail with `StreamNotFound`, of a
//!   tombstoned one with `StreamDeleted`; every write to a tombstoned stream
//!   fails with `StreamDeleted`;
//! - `exists_or_write` counts soft-deleted versions: it writes iff the index
//!   equals the next version, reports `Exists { same }` below it (comparing
//!   type, data and metadata, not id or timestamp) and `Gap` above it;
//! - an append whose first id is already in the log is a retry: it succeeds
//!   without writing iff the same events (ids and content) sit at consecutive
//!   versions of the same stream and the expected version would have held
//!   for the original append; other content is an `IdempotencyConflict`, an
//!   id of another stream a `DuplicateEventId`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use edgebus_log::LogConfig;
use edgebus_store::{
    AllFilter, AppendResult, Direction, ErrorCode, ExistsOrWrite, Snapshot, Store, StoreConfig, StreamFrom, StreamInfo,
    StreamMetadata,
};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

const STREAMS: [&str; 4] = ["orders.o-1", "orders.o-2", "users.u-1", "audit"];
const SOURCES: [&str; 2] = ["orders", "audit-projection"];
const TYPES: [&str; 3] = ["Created", "Updated", "Closed"];
const CASES: u32 = 32;
const OPS_MAX: usize = 30;
/// The smallest segment the log allows, so that a case of thirty operations
/// rolls the log several times.
const SEGMENT_BYTES: u64 = 4 * 1024;
const READ_MAX: usize = 100;

fn config() -> StoreConfig {
    StoreConfig {
        tail_events_max: 64,
        index_flush_events: 8,
        log: LogConfig::small_segments(SEGMENT_BYTES),
        ..StoreConfig::default()
    }
}

fn stream_name(stream: usize) -> StreamName {
    StreamName::new(STREAMS[stream]).expect("valid test stream name")
}

/// What an event says, apart from its id and timestamp: the part that
/// `exists_or_write` and idempotent retries compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Content {
    kind: u8,
    data: u8,
    tagged: bool,
}

impl Content {
    fn event_type(self) -> EventType {
        EventType::new(TYPES[usize::from(self.kind) % TYPES.len()]).expect("valid test event type")
    }

    /// Payloads of 8 to ~1000 bytes, so that segments fill up.
    fn data(self) -> Vec<u8> {
        let mut data = format!("{{\"n\":{}}}", self.data).into_bytes();
        data.resize(data.len() + usize::from(self.data % 17) * 60, b'.');
        data
    }

    fn metadata(self) -> Vec<u8> {
        if self.tagged { b"{\"tag\":true}".to_vec() } else { Vec::new() }
    }

    fn event(self, id: EventId, timestamp_ms: u64) -> NewEvent {
        NewEvent { id, event_type: self.event_type(), data: self.data(), metadata: self.metadata(), timestamp_ms }
    }

    /// Different content of the same size class.
    fn changed(self) -> Self {
        Self { data: self.data.wrapping_add(101), ..self }
    }
}

#[derive(Debug, Clone, Copy)]
enum ExpectedSel {
    Any,
    NoStream,
    StreamExists,
    /// The current version (0 if none) plus this.
    Exact(i8),
}

impl ExpectedSel {
    fn resolve(self, current: Option<u64>) -> ExpectedVersion {
        match self {
            Self::Any => ExpectedVersion::Any,
            Self::NoStream => ExpectedVersion::NoStream,
            Self::StreamExists => ExpectedVersion::StreamExists,
            Self::Exact(delta) => {
                let base = current.map_or(0, |c| i64::try_from(c).expect("small"));
                ExpectedVersion::Exact(u64::try_from((base + i64::from(delta)).max(0)).expect("non-negative"))
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A new append; `reuse` puts the id of an existing event (chosen by the
    /// second number) at the index given by the first, with other content.
    Append {
        stream: usize,
        expected: ExpectedSel,
        contents: Vec<Content>,
        reuse: Option<(usize, usize)>,
    },
    /// Resend an earlier successful append, with its expected version.
    Retry {
        pick: usize,
        change: Option<usize>,
        to_stream: Option<usize>,
        new_timestamps: bool,
    },
    /// `exists_or_write` at the stream's count plus `offset`.
    ExistsOrWrite {
        stream: usize,
        offset: i8,
        same_content: bool,
        same_id: bool,
        content: Content,
    },
    Delete {
        stream: usize,
        expected: ExpectedSel,
        hard: bool,
    },
    SetMetadata {
        stream: usize,
        max_count: Option<u64>,
        truncate_before: Option<u64>,
    },
    RecordSnapshot {
        source: usize,
        stream: usize,
        version: u64,
        state: u8,
    },
    DeleteSnapshot {
        source: usize,
        stream: usize,
        version: u64,
    },
    Reopen {
        wipe_index: bool,
    },
}

fn content() -> impl Strategy<Value = Content> {
    (0u8..3, 0u8..16, any::<bool>()).prop_map(|(kind, data, tagged)| Content { kind, data, tagged })
}

fn expected_sel() -> impl Strategy<Value = ExpectedSel> {
    prop_oneof![
        Just(ExpectedSel::Any),
        Just(ExpectedSel::NoStream),
        Just(ExpectedSel::StreamExists),
        (-2i8..=2).prop_map(ExpectedSel::Exact),
        // Most often the version a careful writer would send.
        Just(ExpectedSel::Exact(0)),
    ]
}

fn stream() -> impl Strategy<Value = usize> {
    0..STREAMS.len()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (stream(), expected_sel(), prop::collection::vec(content(), 1..=3), prop::option::weighted(0.1, (0usize..3, any::<usize>())))
            .prop_map(|(stream, expected, contents, reuse)| Op::Append { stream, expected, contents, reuse }),
        3 => (any::<usize>(), prop::option::weighted(0.3, 0usize..3), prop::option::weighted(0.1, stream()), any::<bool>())
            .prop_map(|(pick, change, to_stream, new_timestamps)| Op::Retry { pick, change, to_stream, new_timestamps }),
        4 => (stream(), -3i8..=1, any::<bool>(), any::<bool>(), content())
            .prop_map(|(stream, offset, same_content, same_id, content)| Op::ExistsOrWrite { stream, offset, same_content, same_id, content }),
        2 => (stream(), expected_sel()).prop_map(|(stream, expected)| Op::Delete { stream, expected, hard: false }),
        1 => (stream(), prop_oneof![Just(ExpectedSel::Any), expected_sel()]).prop_map(|(stream, expected)| Op::Delete { stream, expected, hard: true }),
        2 => (stream(), prop::option::of(0u64..4), prop::option::of(0u64..8))
            .prop_map(|(stream, max_count, truncate_before)| Op::SetMetadata { stream, max_count, truncate_before }),
        2 => (0..SOURCES.len(), stream(), 0u64..6, any::<u8>())
            .prop_map(|(source, stream, version, state)| Op::RecordSnapshot { source, stream, version, state }),
        1 => (0..SOURCES.len(), stream(), 0u64..6)
            .prop_map(|(source, stream, version)| Op::DeleteSnapshot { source, stream, version }),
        1 => any::<bool>().prop_map(|wipe_index| Op::Reopen { wipe_index }),
    ]
}

/// One stored event as the model knows it.
#[derive(Debug, Clone)]
struct ModelEvent {
    id: EventId,
    content: Content,
    position: u64,
    timestamp_ms: u64,
    /// The stream's current version just before the write that stored this event.
    current_before: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct ModelStream {
    events: Vec<ModelEvent>,
    /// Written, given metadata or deleted at least once: the store knows it.
    known: bool,
    deleted: bool,
    deleted_before: u64,
    tombstoned: bool,
    metadata: StreamMetadata,
}

impl ModelStream {
    fn count(&self) -> u64 {
        self.events.len() as u64
    }

    fn current(&self) -> Option<u64> {
        if self.deleted || self.events.is_empty() { None } else { Some(self.count() - 1) }
    }

    fn first_visible(&self) -> u64 {
        let by_count = self.metadata.max_count.map_or(0, |max| self.count().saturating_sub(max));
        self.deleted_before.max(self.metadata.truncate_before.unwrap_or(0)).max(by_count)
    }
}

/// A successful append, for retries.
#[derive(Debug, Clone)]
struct Batch {
    stream: usize,
    expected: ExpectedVersion,
    events: Vec<(EventId, Content)>,
    result: AppendResult,
}

#[derive(Debug, Default)]
struct Model {
    streams: [ModelStream; STREAMS.len()],
    /// Where every id lives: (stream, version).
    ids: HashMap<EventId, (usize, u64)>,
    batches: Vec<Batch>,
    /// Live snapshots by (source, stream, version).
    snapshots: BTreeMap<(usize, usize, u64), Snapshot>,
    next_position: u64,
    next_id: u128,
}

impl Model {
    fn fresh_id(&mut self) -> EventId {
        self.next_id += 1;
        EventId::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 | self.next_id)
    }

    /// An id already in the log, chosen by `pick`, if there is one.
    fn existing_id(&self, pick: usize) -> Option<EventId> {
        let mut ids: Vec<EventId> = self.ids.keys().copied().collect();
        ids.sort_unstable();
        (!ids.is_empty()).then(|| ids[pick % ids.len()])
    }

    fn content_of(&self, id: EventId) -> Option<Content> {
        self.ids.get(&id).map(|&(stream, version)| self.streams[stream].events[version as usize].content)
    }

    fn write(&mut self, stream: usize, events: &[(EventId, Content)], timestamp_ms: u64) -> (u64, u64) {
        let first_position = self.next_position;
        let s = &mut self.streams[stream];
        let first_version = s.count();
        let current_before = s.current();
        for (i, &(id, content)) in events.iter().enumerate() {
            let version = first_version + i as u64;
            s.events.push(ModelEvent {
                id,
                content,
                position: first_position + i as u64,
                timestamp_ms,
                current_before,
            });
            self.ids.insert(id, (stream, version));
        }
        s.known = true;
        s.deleted = false;
        self.next_position += events.len() as u64;
        (first_version, first_position)
    }

    fn append(
        &mut self,
        stream: usize,
        expected: ExpectedVersion,
        events: &[(EventId, Content)],
        timestamp_ms: u64,
    ) -> Result<AppendResult, ErrorCode> {
        // Input checks come first: an id twice in one append is invalid.
        for (i, (id, _)) in events.iter().enumerate() {
            if events[..i].iter().any(|(other, _)| other == id) {
                return Err(ErrorCode::InvalidArgument);
            }
        }
        let s = &self.streams[stream];
        if s.tombstoned {
            return Err(ErrorCode::StreamDeleted);
        }
        let count = u32::try_from(events.len()).expect("small");
        if let Some(&(id_stream, first_version)) = self.ids.get(&events[0].0) {
            if id_stream != stream {
                return Err(ErrorCode::DuplicateEventId);
            }
            for (i, &(id, content)) in events.iter().enumerate() {
                match s.events.get((first_version + i as u64) as usize) {
                    Some(stored) if stored.id == id && stored.content == content => {}
                    _ => return Err(ErrorCode::IdempotencyConflict),
                }
            }
            let original = &s.events[first_version as usize];
            if expected.check(original.current_before).is_err() {
                return Err(ErrorCode::WrongExpectedVersion);
            }
            return Ok(AppendResult { first_version, first_position: original.position, count, already_written: true });
        }
        for (id, _) in events {
            if self.ids.contains_key(id) {
                return Err(ErrorCode::DuplicateEventId);
            }
        }
        if expected.check(s.current()).is_err() {
            return Err(ErrorCode::WrongExpectedVersion);
        }
        let (first_version, first_position) = self.write(stream, events, timestamp_ms);
        let result = AppendResult { first_version, first_position, count, already_written: false };
        self.batches.push(Batch { stream, expected, events: events.to_vec(), result });
        Ok(result)
    }

    fn exists_or_write(
        &mut self,
        stream: usize,
        index: u64,
        event: (EventId, Content),
        timestamp_ms: u64,
    ) -> Result<ExistsOrWrite, ErrorCode> {
        let s = &self.streams[stream];
        if s.tombstoned {
            return Err(ErrorCode::StreamDeleted);
        }
        let count = s.count();
        if index < count {
            let stored = &s.events[index as usize];
            return Ok(ExistsOrWrite::Exists { position: stored.position, same: stored.content == event.1 });
        }
        if index > count {
            return Err(ErrorCode::Gap);
        }
        if self.ids.contains_key(&event.0) {
            return Err(ErrorCode::DuplicateEventId);
        }
        let (_, position) = self.write(stream, &[event], timestamp_ms);
        Ok(ExistsOrWrite::Written { position })
    }

    /// A system command: takes one position.
    fn command(&mut self) -> u64 {
        self.next_position += 1;
        self.next_position - 1
    }

    fn delete(&mut self, stream: usize, expected: ExpectedVersion, hard: bool) -> Result<u64, ErrorCode> {
        let s = &self.streams[stream];
        if s.tombstoned {
            return Err(ErrorCode::StreamDeleted);
        }
        if expected.check(s.current()).is_err() {
            return Err(ErrorCode::WrongExpectedVersion);
        }
        if !hard && s.current().is_none() {
            return Err(ErrorCode::StreamNotFound);
        }
        let position = self.command();
        let s = &mut self.streams[stream];
        s.known = true;
        if hard {
            s.tombstoned = true;
        } else {
            s.deleted = true;
            s.deleted_before = s.deleted_before.max(s.count());
        }
        Ok(position)
    }

    fn set_metadata(&mut self, stream: usize, metadata: StreamMetadata) -> Result<u64, ErrorCode> {
        if self.streams[stream].tombstoned {
            return Err(ErrorCode::StreamDeleted);
        }
        let position = self.command();
        let s = &mut self.streams[stream];
        s.known = true;
        s.metadata = metadata;
        Ok(position)
    }

    fn stream_info(&self, stream: usize) -> Option<StreamInfo> {
        let s = &self.streams[stream];
        s.known.then(|| StreamInfo {
            stream: stream_name(stream),
            current_version: s.current(),
            first_visible_version: s.first_visible(),
            deleted: s.deleted,
            tombstoned: s.tombstoned,
            metadata: s.metadata,
        })
    }

    fn recorded(&self, stream: usize, version: u64) -> RecordedEvent {
        let stored = &self.streams[stream].events[version as usize];
        RecordedEvent::new(
            stream_name(stream),
            version,
            stored.position,
            stored.content.event(stored.id, stored.timestamp_ms),
        )
    }

    fn read(
        &self,
        stream: usize,
        from: StreamFrom,
        direction: Direction,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ErrorCode> {
        let s = &self.streams[stream];
        if !s.known {
            return Err(ErrorCode::StreamNotFound);
        }
        if s.tombstoned {
            return Err(ErrorCode::StreamDeleted);
        }
        if s.current().is_none() {
            return Err(ErrorCode::StreamNotFound);
        }
        let (first, next) = (s.first_visible(), s.count());
        let versions: Vec<u64> = match direction {
            Direction::Forward => {
                let start = match from {
                    StreamFrom::Start => first,
                    StreamFrom::End => next,
                    StreamFrom::Version(v) => v.max(first),
                };
                (start..next).take(max).collect()
            }
            Direction::Backward => {
                let upper = match from {
                    StreamFrom::Start | StreamFrom::End => next,
                    StreamFrom::Version(v) => v.saturating_add(1).min(next),
                };
                (first..upper.max(first)).rev().take(max).collect()
            }
        };
        Ok(versions.into_iter().map(|v| self.recorded(stream, v)).collect())
    }

    /// Every visible client event, in log order.
    fn all_visible(&self) -> Vec<RecordedEvent> {
        let mut out = Vec::new();
        for (stream, s) in self.streams.iter().enumerate() {
            if s.tombstoned {
                continue;
            }
            for version in s.first_visible()..s.count() {
                out.push(self.recorded(stream, version));
            }
        }
        out.sort_by_key(|e| e.position);
        out
    }

    fn read_snapshot(&self, source: usize, stream: usize, at_or_below: Option<u64>) -> Result<Snapshot, ErrorCode> {
        let upper = at_or_below.unwrap_or(u64::MAX);
        self.snapshots
            .range((source, stream, 0)..=(source, stream, upper))
            .next_back()
            .map(|(_, snapshot)| snapshot.clone())
            .ok_or(ErrorCode::SnapshotNotFound)
    }
}

/// How often the interesting outcomes happened, over every case run: a
/// model test whose generator never reaches them checks nothing.
#[derive(Debug, Default)]
struct Coverage {
    appended: u64,
    already_written: u64,
    idempotency_conflicts: u64,
    duplicate_ids: u64,
    wrong_expected_version: u64,
    written_by_exists_or_write: u64,
    exists_same: u64,
    exists_different: u64,
    gaps: u64,
    soft_deletes: u64,
    tombstones: u64,
    writes_to_tombstoned: u64,
    reads_of_deleted: u64,
    snapshots_found: u64,
    rebuilds: u64,
    reopens: u64,
    cases_with_rolls: u64,
}

static COVERAGE: Mutex<Coverage> = Mutex::new(Coverage {
    appended: 0,
    already_written: 0,
    idempotency_conflicts: 0,
    duplicate_ids: 0,
    wrong_expected_version: 0,
    written_by_exists_or_write: 0,
    exists_same: 0,
    exists_different: 0,
    gaps: 0,
    soft_deletes: 0,
    tombstones: 0,
    writes_to_tombstoned: 0,
    reads_of_deleted: 0,
    snapshots_found: 0,
    rebuilds: 0,
    reopens: 0,
    cases_with_rolls: 0,
});

fn coverage() -> std::sync::MutexGuard<'static, Coverage> {
    COVERAGE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn count_error(code: ErrorCode) {
    let mut c = coverage();
    match code {
        ErrorCode::IdempotencyConflict => c.idempotency_conflicts += 1,
        ErrorCode::DuplicateEventId => c.duplicate_ids += 1,
        ErrorCode::WrongExpectedVersion => c.wrong_expected_version += 1,
        ErrorCode::Gap => c.gaps += 1,
        ErrorCode::StreamDeleted => c.writes_to_tombstoned += 1,
        _ => {}
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, config()).expect("open the store")
}

/// Runs `ops` against a fresh store and the model.
fn run_case(ops: &[Op]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open(dir.path());
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        let timestamp_ms = 1_000 + step as u64;
        let context = format!("step {step}: {op:?}");
        if let Op::Reopen { wipe_index } = op {
            store = reopen(store, &model, dir.path(), *wipe_index, &context);
        } else {
            apply(&store, &mut model, op, timestamp_ms, &context);
        }
        check_reads(&store, &model, step, &context);
    }
    let segments = std::fs::read_dir(dir.path().join("log"))
        .expect("log dir")
        .filter(|entry| entry.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg")))
        .count();
    if segments >= 2 {
        coverage().cases_with_rolls += 1;
    }
    store.close().expect("close");
}

fn apply(store: &Store, model: &mut Model, op: &Op, timestamp_ms: u64, context: &str) {
    match op {
        Op::Append { stream, expected, contents, reuse } => {
            let expected = expected.resolve(model.streams[*stream].current());
            let mut events: Vec<(EventId, Content)> = contents.iter().map(|c| (model.fresh_id(), *c)).collect();
            if let Some((at, pick)) = reuse
                && let Some(id) = model.existing_id(*pick)
            {
                let at = at % events.len();
                let stored = model.content_of(id).expect("existing id");
                events[at] = (id, stored.changed());
            }
            let new_events = events.iter().map(|&(id, c)| c.event(id, timestamp_ms)).collect();
            let got = store.append(&stream_name(*stream), expected, new_events).map_err(|e| e.code());
            let want = model.append(*stream, expected, &events, timestamp_ms);
            assert_eq!(got, want, "{context}: append with {expected}");
            match got {
                Ok(r) if !r.already_written => coverage().appended += 1,
                Ok(_) => coverage().already_written += 1,
                Err(code) => count_error(code),
            }
        }
        Op::Retry { pick, change, to_stream, new_timestamps } => {
            if model.batches.is_empty() {
                return;
            }
            let batch = model.batches[pick % model.batches.len()].clone();
            let mut events = batch.events.clone();
            if let Some(at) = change {
                let at = at % events.len();
                events[at].1 = events[at].1.changed();
            }
            let stream = to_stream.unwrap_or(batch.stream);
            let timestamp = if *new_timestamps { timestamp_ms } else { batch_timestamp(model, &batch) };
            let new_events = events.iter().map(|&(id, c)| c.event(id, timestamp)).collect();
            let log_end = store.log().end_position();
            let got = store.append(&stream_name(stream), batch.expected, new_events).map_err(|e| e.code());
            let want = model.append(stream, batch.expected, &events, timestamp);
            assert_eq!(got, want, "{context}: retry of {batch:?}");
            if let Ok(r) = got {
                assert!(r.already_written, "{context}: a retry never writes");
                assert_eq!(r, AppendResult { already_written: true, ..batch.result }, "{context}: the original result");
            }
            assert_eq!(store.log().end_position(), log_end, "{context}: a retry writes nothing");
            match got {
                Ok(_) => coverage().already_written += 1,
                Err(code) => count_error(code),
            }
        }
        Op::ExistsOrWrite { stream, offset, same_content, same_id, content } => {
            let s = &model.streams[*stream];
            let count = s.count();
            let index =
                u64::try_from((i64::try_from(count).expect("small") + i64::from(*offset)).max(0)).expect("small");
            let at_index = s.events.get(index as usize).map(|e| (e.id, e.content));
            let content = match at_index {
                Some((_, stored)) if *same_content => stored,
                _ => *content,
            };
            let id = match at_index {
                Some((stored_id, _)) if *same_id => stored_id,
                // At the end, `same_id` reuses an id from elsewhere in the log.
                None if *same_id => model.existing_id(usize::from(content.data)).unwrap_or_else(|| model.fresh_id()),
                _ => model.fresh_id(),
            };
            let got = store
                .exists_or_write(&stream_name(*stream), index, content.event(id, timestamp_ms))
                .map_err(|e| e.code());
            let want = model.exists_or_write(*stream, index, (id, content), timestamp_ms);
            assert_eq!(got, want, "{context}: exists_or_write at {index} of {count}");
            match got {
                Ok(ExistsOrWrite::Written { .. }) => coverage().written_by_exists_or_write += 1,
                Ok(ExistsOrWrite::Exists { same: true, .. }) => coverage().exists_same += 1,
                Ok(ExistsOrWrite::Exists { same: false, .. }) => coverage().exists_different += 1,
                Err(code) => count_error(code),
            }
        }
        Op::Delete { stream, expected, hard } => {
            let expected = expected.resolve(model.streams[*stream].current());
            let got = store.delete_stream(&stream_name(*stream), expected, *hard, timestamp_ms).map_err(|e| e.code());
            let want = model.delete(*stream, expected, *hard);
            assert_eq!(got, want, "{context}: delete with {expected}");
            match (got, hard) {
                (Ok(_), true) => coverage().tombstones += 1,
                (Ok(_), false) => coverage().soft_deletes += 1,
                (Err(code), _) => count_error(code),
            }
        }
        Op::SetMetadata { stream, max_count, truncate_before } => {
            let metadata =
                StreamMetadata { max_age_ms: None, max_count: *max_count, truncate_before: *truncate_before };
            let got = store.set_stream_metadata(&stream_name(*stream), metadata, timestamp_ms).map_err(|e| e.code());
            let want = model.set_metadata(*stream, metadata);
            assert_eq!(got, want, "{context}: set metadata");
            if let Err(code) = got {
                count_error(code);
            }
        }
        Op::RecordSnapshot { source, stream, version, state } => {
            let state = vec![*state; 3];
            let got = store
                .record_snapshot(SOURCES[*source], &stream_name(*stream), *version, state.clone(), timestamp_ms)
                .map_err(|e| e.code());
            let position = model.command();
            let snapshot = Snapshot {
                source: SOURCES[*source].to_owned(),
                stream: stream_name(*stream),
                version: *version,
                state,
                position,
                timestamp_ms,
            };
            model.snapshots.insert((*source, *stream, *version), snapshot);
            assert_eq!(got, Ok(position), "{context}: record snapshot");
        }
        Op::DeleteSnapshot { source, stream, version } => {
            let got = store
                .delete_snapshot(SOURCES[*source], &stream_name(*stream), *version, timestamp_ms)
                .map_err(|e| e.code());
            let want = if model.snapshots.remove(&(*source, *stream, *version)).is_some() {
                Ok(model.command())
            } else {
                Err(ErrorCode::SnapshotNotFound)
            };
            assert_eq!(got, want, "{context}: delete snapshot");
        }
        Op::Reopen { .. } => unreachable!("handled by run_case"),
    }
}

/// Closes `store` and opens it again, without its index if `wipe_index`.
fn reopen(store: Store, model: &Model, dir: &Path, wipe_index: bool, context: &str) -> Store {
    let digest = store.index_digest().expect("digest before reopen");
    store.close().expect("close");
    drop(store);
    if wipe_index {
        std::fs::remove_dir_all(dir.join("index")).expect("remove the index");
    }
    let store = open(dir);
    let report = store.open_report().clone();
    if wipe_index {
        assert_eq!(report.checkpoint, 0, "{context}: no index, no checkpoint: {report:?}");
        assert_eq!(report.replayed, model.next_position, "{context}: a rebuild replays the whole log: {report:?}");
        coverage().rebuilds += 1;
    } else {
        assert_eq!(report.checkpoint, model.next_position, "{context}: a clean close checkpoints the end: {report:?}");
        assert_eq!(report.replayed, 0, "{context}: a clean close leaves nothing to replay: {report:?}");
    }
    assert_eq!(report.rebuilt, None, "{context}: {report:?}");
    assert_eq!(store.index_digest().expect("digest after reopen"), digest, "{context}: same state after reopen");
    coverage().reopens += 1;
    store
}

fn batch_timestamp(model: &Model, batch: &Batch) -> u64 {
    let s = &model.streams[batch.stream];
    s.events[batch.result.first_version as usize].timestamp_ms
}

fn check_reads(store: &Store, model: &Model, step: usize, context: &str) {
    assert_eq!(store.log().end_position(), model.next_position, "{context}: log end");
    for stream in 0..STREAMS.len() {
        let name = stream_name(stream);
        let info = store.stream_info(&name).expect("stream info");
        assert_eq!(info, model.stream_info(stream), "{context}: info of {name}");
        let count = model.streams[stream].count();
        let reads = [
            (StreamFrom::Start, Direction::Forward, READ_MAX),
            (StreamFrom::End, Direction::Backward, READ_MAX),
            (StreamFrom::Start, Direction::Backward, 2),
            (StreamFrom::End, Direction::Forward, READ_MAX),
            (StreamFrom::Version(count / 2), Direction::Forward, 2),
            (StreamFrom::Version(count / 2), Direction::Backward, 2),
            (StreamFrom::Version(step as u64 % (count + 2)), Direction::Forward, 3),
            (StreamFrom::Version(count + 1), Direction::Backward, 1),
        ];
        for (from, direction, max) in reads {
            let got = store.read_stream(&name, from, direction, max, 0).map_err(|e| e.code());
            let want = model.read(stream, from, direction, max);
            if got.is_err() && from == StreamFrom::Start && direction == Direction::Forward {
                coverage().reads_of_deleted += u64::from(model.streams[stream].known);
            }
            assert_eq!(got, want, "{context}: read {name} from {from:?} {direction:?} max {max}");
        }
        for (source, source_name) in SOURCES.iter().enumerate() {
            for at_or_below in [None, Some(2)] {
                let got = store.read_snapshot(source_name, &name, at_or_below).map_err(|e| e.code());
                let want = model.read_snapshot(source, stream, at_or_below);
                if got.is_ok() {
                    coverage().snapshots_found += 1;
                }
                assert_eq!(got, want, "{context}: snapshot of {name} from {source_name} at or below {at_or_below:?}");
            }
        }
    }
    let visible = model.all_visible();
    let forward = store.read_all(0, Direction::Forward, 10_000, &AllFilter::default()).expect("read $all");
    assert!(forward.end_of_log, "{context}: one page reaches the end");
    assert_eq!(forward.events, visible, "{context}: $all forward");
    let backward = store.read_all(u64::MAX, Direction::Backward, 10_000, &AllFilter::default()).expect("read $all");
    let mut reversed = visible;
    reversed.reverse();
    assert_eq!(backward.events, reversed, "{context}: $all backward");
}

#[test]
fn store_matches_the_model() {
    let mut runner =
        TestRunner::new(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() });
    let result = runner.run(&prop::collection::vec(op(), 4..=OPS_MAX), |ops| {
        run_case(&ops);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let c = coverage();
    eprintln!("store_model: {c:?}");
    let reached = [
        ("appended", c.appended),
        ("already_written", c.already_written),
        ("idempotency_conflicts", c.idempotency_conflicts),
        ("duplicate_ids", c.duplicate_ids),
        ("wrong_expected_version", c.wrong_expected_version),
        ("written_by_exists_or_write", c.written_by_exists_or_write),
        ("exists_same", c.exists_same),
        ("exists_different", c.exists_different),
        ("gaps", c.gaps),
        ("soft_deletes", c.soft_deletes),
        ("tombstones", c.tombstones),
        ("writes_to_tombstoned", c.writes_to_tombstoned),
        ("reads_of_deleted", c.reads_of_deleted),
        ("snapshots_found", c.snapshots_found),
        ("rebuilds", c.rebuilds),
        ("reopens", c.reopens),
        ("cases_with_rolls", c.cases_with_rolls),
    ];
    for (what, count) in reached {
        assert!(count > 0, "the generator never produced {what}: {c:?}");
    }
}
