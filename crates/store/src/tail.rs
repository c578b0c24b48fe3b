//! The in-memory tail of the index: every index change since the on-disk
//! checkpoint, in log order, plus lookup maps over them.
//!
//! Lifecycle: the store's write path (and replay on open) applies each record
//! here under the store lock; the indexer thread later takes the durable
//! prefix of the ops ([`Tail::take_durable`]), writes it to the on-disk
//! [`Index`] in one atomic batch and then drops what only it held from the
//! lookup maps ([`Tail::drop_flushed`]). Lookups consult the tail first and
//! the index second, so an entry is always in at least one of them. The tail
//! is bounded: writers wait while it holds `tail_events_max` changes,
//! counting those being flushed.
//!
//! Memory: an op is 88 bytes (an event's stream state is not stored with it
//! but derived at flush time from the stream's state at the checkpoint), so
//! a full tail of 229,376 changes (the default bound) holds about 20 MiB of
//! ops, plus the id map (at most 2^19 slots of 33 bytes, 17 MiB: the bound
//! is half its capacity, so hashbrown clears its tombstones in place instead
//! of doubling it) and the streams' version queues.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use edgebus_types::{EventId, StreamName};

use crate::index::{IdEntry, Index, IndexError, IndexWrite, StreamState, VersionEntry};
use crate::record::{Command, SNAPSHOTS_PREFIX};

/// One change, at one log position.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) position: u64,
    /// The stream whose state this op changes.
    pub(crate) stream: Arc<str>,
    pub(crate) kind: OpKind,
}

#[derive(Debug)]
pub(crate) enum OpKind {
    /// An event of `stream`. The stream's state after it is its state
    /// before with `next_version = version + 1`, `deleted = false`,
    /// `last_position` = the op's position and `origin` = this origin:
    /// the only fields an event changes.
    Event { version: u64, content_hash: u64, id: EventId, event_type: Arc<str>, origin: u64 },
    /// A state change of `stream` caused by a command elsewhere: its whole
    /// state after the change.
    State(Box<StreamState>),
    /// A snapshot recorded or deleted by the event just before it (which
    /// carries the state change of the snapshot stream).
    Snapshot(Box<SnapshotOp>),
}

#[derive(Debug)]
pub(crate) struct SnapshotOp {
    source: Arc<str>,
    target: Arc<str>,
    version: u64,
    position: Option<u64>,
}

impl Op {
    /// Applies this op to `state`, the stream's state before it.
    fn advance(&self, state: &mut StreamState) {
        match &self.kind {
            OpKind::Event { version, origin, .. } => {
                state.next_version = version + 1;
                state.deleted = false;
                state.last_position = self.position;
                state.origin = *origin;
            }
            OpKind::State(after) => *state = **after,
            OpKind::Snapshot(_) => {}
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct TailStream {
    pub(crate) state: StreamState,
    /// The state the index holds for the stream (as of the checkpoint):
    /// where flushes start deriving states from the ops.
    base: StreamState,
    /// Versions written since the checkpoint, ascending and dense.
    pub(crate) versions: VecDeque<(u64, VersionEntry)>,
}

/// The durable prefix of the tail's ops, taken out for a flush.
#[derive(Debug)]
pub(crate) struct FlushBatch {
    ops: Vec<Op>,
    /// Every stream's state after the batch.
    states: HashMap<Arc<str>, StreamState>,
    /// The next position to index after the batch.
    pub(crate) checkpoint: u64,
}

impl FlushBatch {
    /// Whether the batch has no ops.
    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The index writes of the batch: versions, ids, types and snapshots in
    /// op order, and each stream's state after the batch once.
    pub(crate) fn writes(&self) -> impl Iterator<Item = IndexWrite<'_>> {
        let ops = self.ops.iter().flat_map(|op| {
            let writes = match &op.kind {
                OpKind::Event { version, content_hash, id, event_type, .. } => [
                    Some(IndexWrite::Version(
                        &op.stream,
                        *version,
                        VersionEntry { position: op.position, content_hash: *content_hash },
                    )),
                    Some(IndexWrite::Id(id, IdEntry { position: op.position, version: *version })),
                    Some(IndexWrite::Type(event_type, op.position)),
                ],
                OpKind::State(_) => [None, None, None],
                OpKind::Snapshot(s) => {
                    [Some(IndexWrite::Snapshot(&s.source, &s.target, s.version, s.position)), None, None]
                }
            };
            writes.into_iter().flatten()
        });
        ops.chain(self.states.iter().map(|(stream, state)| IndexWrite::State(stream, state)))
    }
}

/// Event types remembered for sharing one allocation among the events of a type.
const EVENT_TYPES_SHARED_MAX: usize = 256;

/// Snapshot key in the tail: (source, stream, version).
pub(crate) type SnapshotKey = (Arc<str>, Arc<str>, u64);

#[derive(Debug, Default)]
pub(crate) struct Tail {
    pub(crate) streams: HashMap<Arc<str>, TailStream>,
    pub(crate) ids: HashMap<EventId, IdEntry>,
    /// Value: (op position, snapshot position or `None` if deleted).
    pub(crate) snapshots: BTreeMap<SnapshotKey, (u64, Option<u64>)>,
    ops: VecDeque<Op>,
    /// Ops taken by a flush that is not done yet.
    flushing: usize,
    /// Recent event types, so that events of one type share one `Arc`.
    event_types: HashSet<Arc<str>>,
    /// The last state read from the index by [`Tail::state`], so that the
    /// write that follows does not read it again.
    last_index_read: Option<(Box<str>, Option<StreamState>)>,
}

/// What one record contributes, as the state machine sees it.
#[derive(Debug)]
pub(crate) struct Applied<'a> {
    pub(crate) stream: &'a StreamName,
    pub(crate) version: u64,
    pub(crate) position: u64,
    pub(crate) id: EventId,
    pub(crate) event_type: &'a str,
    pub(crate) content_hash: u64,
    pub(crate) command: Option<&'a Command>,
    /// The home site's id for a replicated event, 0 for a local one.
    pub(crate) origin: u64,
}

impl Tail {
    /// Changes held, counting those being flushed.
    pub(crate) fn len(&self) -> usize {
        self.ops.len() + self.flushing
    }

    /// Changes not yet taken by a flush.
    pub(crate) fn unflushed(&self) -> usize {
        self.ops.len()
    }

    /// The state of `stream`: the tail's, else the index's, else none.
    pub(crate) fn state(&self, index: &Index, stream: &str) -> Result<Option<StreamState>, IndexError> {
        match self.streams.get(stream) {
            Some(tail) => Ok(Some(tail.state)),
            None => index.stream_state(stream),
        }
    }

    /// Forgets what [`Tail::state_for_write`] remembered; called before each
    /// write so a remembered state never outlives the write that read it.
    pub(crate) fn forget_index_read(&mut self) {
        self.last_index_read = None;
    }

    /// Like [`Tail::state`], for the write path: remembers what it read
    /// from the index so that applying the write does not read it again.
    /// Only the state lock's holder calls it, and nothing changes the index's
    /// copy of a stream that is not in the tail while the lock is held.
    pub(crate) fn state_for_write(&mut self, index: &Index, stream: &str) -> Result<Option<StreamState>, IndexError> {
        if let Some(tail) = self.streams.get(stream) {
            return Ok(Some(tail.state));
        }
        let state = index.stream_state(stream)?;
        self.last_index_read = Some((Box::from(stream), state));
        Ok(state)
    }

    /// The entry of `version` of `stream`.
    pub(crate) fn version(
        &self,
        index: &Index,
        stream: &str,
        version: u64,
    ) -> Result<Option<VersionEntry>, IndexError> {
        if let Some(tail) = self.streams.get(stream)
            && let Some((first, _)) = tail.versions.front()
            && version >= *first
        {
            return Ok(tail.versions.get((version - first) as usize).map(|(_, e)| *e));
        }
        index.version(stream, version)
    }

    /// Where `id` lives.
    pub(crate) fn id(&self, index: &Index, id: &EventId) -> Result<Option<IdEntry>, IndexError> {
        match self.ids.get(id) {
            Some(entry) => Ok(Some(*entry)),
            None => index.id(id),
        }
    }

    /// The tail's versions of `stream` in `from..to`, and the first version
    /// the tail holds (versions below it are in the index).
    pub(crate) fn versions(&self, stream: &str, from: u64, to: u64) -> (Vec<(u64, VersionEntry)>, u64) {
        let Some(tail) = self.streams.get(stream) else { return (Vec::new(), to) };
        let Some((first, _)) = tail.versions.front() else { return (Vec::new(), to) };
        let first = *first;
        let entries = tail.versions.iter().filter(|(v, _)| *v >= from && *v < to).copied().collect();
        (entries, first.max(from).min(to))
    }

    fn entry(&mut self, index: &Index, stream: &str) -> Result<(Arc<str>, &mut TailStream), IndexError> {
        if !self.streams.contains_key(stream) {
            let state = match self.last_index_read.take() {
                Some((name, state)) if *name == *stream => state,
                _ => index.stream_state(stream)?,
            };
            let state = state.unwrap_or_default();
            self.streams.insert(Arc::from(stream), TailStream { state, base: state, versions: VecDeque::new() });
        }
        let (key, _) = self.streams.get_key_value(stream).expect("inserted above");
        let key = Arc::clone(key);
        Ok((key, self.streams.get_mut(stream).expect("inserted above")))
    }

    /// The state machine: applies one record. The same code runs for live
    /// writes and for replay, and reads nothing but the tail and the index.
    pub(crate) fn apply(&mut self, index: &Index, record: &Applied<'_>) -> Result<(), IndexError> {
        let (stream, tail) = self.entry(index, record.stream.as_str())?;
        // Set, not incremented: a replay may start from an index that is
        // already ahead of its checkpoint (a flush interrupted between
        // keyspaces), and must end in the same state as a first application.
        tail.state.next_version = record.version + 1;
        tail.state.deleted = false;
        tail.state.last_position = record.position;
        tail.state.origin = record.origin;
        let entry = VersionEntry { position: record.position, content_hash: record.content_hash };
        if let Some((last, _)) = tail.versions.back() {
            assert_eq!(*last + 1, record.version, "tail versions are dense");
        }
        tail.versions.push_back((record.version, entry));
        self.ids.insert(record.id, IdEntry { position: record.position, version: record.version });
        let event_type = self.event_type(record.event_type);
        self.ops.push_back(Op {
            position: record.position,
            stream: Arc::clone(&stream),
            kind: OpKind::Event {
                version: record.version,
                content_hash: record.content_hash,
                id: record.id,
                event_type,
                origin: record.origin,
            },
        });
        let Some(command) = record.command else { return Ok(()) };
        let position = record.position;
        match command {
            Command::Metadata { stream: target, metadata } => {
                self.change_state(index, target, position, |s| s.metadata = *metadata)?;
            }
            Command::Deleted { stream: target, truncate_before } => {
                self.change_state(index, target, position, |s| {
                    s.deleted = true;
                    s.deleted_before = s.deleted_before.max(*truncate_before);
                })?;
            }
            Command::Tombstoned { stream: target } => {
                self.change_state(index, target, position, |s| s.tombstoned = true)?;
            }
            Command::Snapshot { stream: target, version, .. } => {
                self.snapshot(&stream, target, *version, position, Some(position));
            }
            Command::SnapshotDeleted { stream: target, version } => {
                self.snapshot(&stream, target, *version, position, None);
            }
        }
        Ok(())
    }

    fn change_state(
        &mut self,
        index: &Index,
        target: &StreamName,
        position: u64,
        change: impl FnOnce(&mut StreamState),
    ) -> Result<(), IndexError> {
        let (stream, tail) = self.entry(index, target.as_str())?;
        change(&mut tail.state);
        tail.state.last_position = position;
        let state = Box::new(tail.state);
        self.ops.push_back(Op { position, stream, kind: OpKind::State(state) });
        Ok(())
    }

    /// `event_type` as an `Arc` shared with earlier events of the type.
    fn event_type(&mut self, event_type: &str) -> Arc<str> {
        if let Some(shared) = self.event_types.get(event_type) {
            return Arc::clone(shared);
        }
        if self.event_types.len() >= EVENT_TYPES_SHARED_MAX {
            self.event_types.clear();
        }
        let shared: Arc<str> = Arc::from(event_type);
        self.event_types.insert(Arc::clone(&shared));
        shared
    }

    fn snapshot(
        &mut self,
        snapshot_stream: &Arc<str>,
        target: &StreamName,
        version: u64,
        op_position: u64,
        position: Option<u64>,
    ) {
        let source: Arc<str> = Arc::from(snapshot_stream.strip_prefix(SNAPSHOTS_PREFIX).expect("snapshot stream"));
        let target: Arc<str> = Arc::from(target.as_str());
        self.snapshots.insert((Arc::clone(&source), Arc::clone(&target), version), (op_position, position));
        self.ops.push_back(Op {
            position: op_position,
            stream: Arc::clone(snapshot_stream),
            kind: OpKind::Snapshot(Box::new(SnapshotOp { source, target, version, position })),
        });
    }

    /// Takes the ops below `durable_end` for a flush, with every stream's
    /// state after them. Until [`Tail::drop_flushed`] they still count
    /// towards [`Tail::len`] and the lookup maps keep their entries.
    pub(crate) fn take_durable(&mut self, durable_end: u64) -> FlushBatch {
        let count = self.ops.iter().take_while(|op| op.position < durable_end).count();
        let checkpoint = self.ops.get(count).map_or(durable_end, |op| op.position);
        let ops = if count == 0 {
            Vec::new()
        } else {
            let rest = self.ops.split_off(count);
            Vec::from(std::mem::replace(&mut self.ops, rest))
        };
        self.flushing += ops.len();
        let mut states: HashMap<Arc<str>, StreamState> = HashMap::new();
        // Runs of ops of one stream (a multi-event append) look it up once.
        let mut run: Option<(&Arc<str>, StreamState)> = None;
        for op in &ops {
            let state = match &mut run {
                Some((stream, state)) if Arc::ptr_eq(stream, &op.stream) => state,
                _ => {
                    if let Some((stream, state)) = run.take() {
                        states.insert(Arc::clone(stream), state);
                    }
                    let state = match states.get(op.stream.as_ref()) {
                        Some(state) => *state,
                        None => self.streams.get(op.stream.as_ref()).map(|t| t.base).unwrap_or_default(),
                    };
                    &mut run.insert((&op.stream, state)).1
                }
            };
            op.advance(state);
        }
        if let Some((stream, state)) = run {
            states.insert(Arc::clone(stream), state);
        }
        FlushBatch { ops, states, checkpoint }
    }

    /// Drops what only the flushed `batch` held (it is in the index now):
    /// its ids, versions and snapshots, and streams with nothing after it.
    pub(crate) fn drop_flushed(&mut self, batch: FlushBatch) {
        self.flushing -= batch.ops.len();
        for op in batch.ops {
            match &op.kind {
                OpKind::Event { version, id, .. } => {
                    if let Some(tail) = self.streams.get_mut(op.stream.as_ref()) {
                        let front = tail.versions.pop_front();
                        assert_eq!(front.map(|(v, _)| v), Some(*version), "flushed versions leave the tail in order");
                    }
                    if self.ids.get(id).is_some_and(|e| e.position == op.position) {
                        self.ids.remove(id);
                    }
                }
                OpKind::State(_) => {}
                OpKind::Snapshot(s) => {
                    let key = (Arc::clone(&s.source), Arc::clone(&s.target), s.version);
                    if self.snapshots.get(&key).is_some_and(|(at, _)| *at == op.position) {
                        self.snapshots.remove(&key);
                    }
                }
            }
        }
        for (stream, state) in batch.states {
            let Some(tail) = self.streams.get_mut(stream.as_ref()) else { continue };
            if tail.versions.is_empty() && tail.state.last_position < batch.checkpoint {
                self.streams.remove(stream.as_ref());
            } else {
                tail.base = state;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(stream: &'a StreamName, version: u64, position: u64, command: Option<&'a Command>) -> Applied<'a> {
        Applied {
            stream,
            version,
            position,
            id: EventId::from_u128(u128::from(position) + 1),
            event_type: "T",
            content_hash: position,
            command,
            origin: 0,
        }
    }

    /// Flushes split anywhere in a stream's history, also between a command
    /// and the events around it, write each stream's state as of the split.
    #[test]
    fn a_flush_writes_each_streams_state_as_of_its_last_op() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let index = Index::open(dir.path(), 1 << 20).expect("the index opens");
        let a = StreamName::new("a").expect("a valid name");
        let b = StreamName::new("b").expect("a valid name");
        let sys = StreamName::system(crate::record::STREAMS_STREAM).expect("a valid name");
        let metadata = Command::Metadata {
            stream: a.clone(),
            metadata: crate::record::StreamMetadata { max_count: Some(5), ..Default::default() },
        };
        let delete = Command::Deleted { stream: b.clone(), truncate_before: 2 };
        let mut tail = Tail::default();
        // positions: 0 a@0, 1 b@0, 2 a@1, 3 metadata(a), 4 b@1, 5 a@2, 6 delete(b), 7 a@3
        let records = [
            event(&a, 0, 0, None),
            event(&b, 0, 1, None),
            event(&a, 1, 2, None),
            event(&sys, 0, 3, Some(&metadata)),
            event(&b, 1, 4, None),
            event(&a, 2, 5, None),
            event(&sys, 1, 6, Some(&delete)),
            event(&a, 3, 7, None),
        ];
        for split in 0..=records.len() as u64 {
            let mut tail_at_split = Tail::default();
            for record in &records {
                tail.apply(&index, record).expect("applies");
                if record.position < split {
                    tail_at_split.apply(&index, record).expect("applies");
                }
            }
            let first = tail.take_durable(split);
            assert_eq!(first.checkpoint, split);
            for name in ["a", "b", "$sys.streams"] {
                let expected = tail_at_split.streams.get(name).map(|t| t.state);
                assert_eq!(first.states.get(name).copied(), expected, "{name} after a flush of {split}");
            }
            assert_eq!(tail.len(), records.len() + 2, "eight events and two state changes, also while flushing");
            tail.drop_flushed(first);
            let second = tail.take_durable(records.len() as u64);
            for name in ["a", "b", "$sys.streams"] {
                let wrote_later = records.iter().any(|r| r.position >= split && r.stream.as_str() == name)
                    || (name == "a" && split <= 3)
                    || (name == "b" && split <= 6);
                let expected = wrote_later.then(|| tail.streams.get(name).map(|t| t.state)).flatten();
                assert_eq!(
                    second.states.get(name).copied(),
                    expected,
                    "{name} after the rest of a flush split at {split}"
                );
            }
            tail.drop_flushed(second);
            assert_eq!(tail.len(), 0);
            assert!(tail.streams.is_empty() && tail.ids.is_empty(), "a fully flushed tail holds nothing");
            tail = Tail::default();
        }
    }

    #[test]
    fn an_op_stays_small() {
        // The tail's memory bound (module docs) rests on this size.
        assert!(size_of::<Op>() <= 88, "Op is {} bytes", size_of::<Op>());
    }
}
