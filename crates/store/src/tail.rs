//! The in-memory tail of the index: every index change since the on-disk
//! checkpoint, in log order, plus lookup maps over them.
//!
//! Lifecycle: the store's write path (and replay on open) applies each record
//! here under the store lock; the indexer thread later moves the durable
//! prefix into the on-disk [`Index`] in one atomic batch and drops it from
//! the tail. Lookups consult the tail first and the index second, so an entry
//! is always in at least one of them. The tail is bounded: writers wait while
//! it holds `tail_events_max` changes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use edgebus_types::{EventId, StreamName};

use crate::index::{IdEntry, Index, IndexError, IndexWrite, StreamState, VersionEntry};
use crate::record::{Command, SNAPSHOTS_PREFIX};

/// One change, at one log position.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) position: u64,
    /// The stream whose state this op leaves behind.
    pub(crate) stream: Arc<str>,
    pub(crate) state: StreamState,
    pub(crate) kind: OpKind,
}

#[derive(Debug, Clone)]
pub(crate) enum OpKind {
    Event {
        version: u64,
        content_hash: u64,
        id: EventId,
        event_type: Arc<str>,
    },
    /// A state change of `stream` caused by a command elsewhere.
    State,
    Snapshot {
        source: Arc<str>,
        target: Arc<str>,
        version: u64,
        position: Option<u64>,
    },
}

#[derive(Debug, Default)]
pub(crate) struct TailStream {
    pub(crate) state: StreamState,
    /// Versions written since the checkpoint, ascending and dense.
    pub(crate) versions: VecDeque<(u64, VersionEntry)>,
}

/// Snapshot key in the tail: (source, stream, version).
pub(crate) type SnapshotKey = (Arc<str>, Arc<str>, u64);

#[derive(Debug, Default)]
pub(crate) struct Tail {
    pub(crate) streams: HashMap<Arc<str>, TailStream>,
    pub(crate) ids: HashMap<EventId, IdEntry>,
    /// Value: (op position, snapshot position or `None` if deleted).
    pub(crate) snapshots: BTreeMap<SnapshotKey, (u64, Option<u64>)>,
    pub(crate) ops: VecDeque<Op>,
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
            self.streams.insert(Arc::from(stream), TailStream { state, versions: VecDeque::new() });
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
        let state = tail.state;
        self.ids.insert(record.id, IdEntry { position: record.position, version: record.version });
        self.ops.push_back(Op {
            position: record.position,
            stream: Arc::clone(&stream),
            state,
            kind: OpKind::Event {
                version: record.version,
                content_hash: record.content_hash,
                id: record.id,
                event_type: Arc::from(record.event_type),
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
        let state = tail.state;
        self.ops.push_back(Op { position, stream, state, kind: OpKind::State });
        Ok(())
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
        let state = self.streams.get(snapshot_stream.as_ref()).map(|t| t.state).unwrap_or_default();
        self.ops.push_back(Op {
            position: op_position,
            stream: Arc::clone(snapshot_stream),
            state,
            kind: OpKind::Snapshot { source, target, version, position },
        });
    }

    /// The index writes for the first `count` ops, with each stream's state
    /// written once (its last state among them).
    pub(crate) fn writes(ops: &[Op]) -> Vec<IndexWrite<'_>> {
        let mut last_state: HashMap<&str, &StreamState> = HashMap::new();
        let mut writes = Vec::with_capacity(ops.len() * 3);
        for op in ops {
            last_state.insert(&op.stream, &op.state);
            match &op.kind {
                OpKind::Event { version, content_hash, id, event_type } => {
                    writes.push(IndexWrite::Version(
                        &op.stream,
                        *version,
                        VersionEntry { position: op.position, content_hash: *content_hash },
                    ));
                    writes.push(IndexWrite::Id(id, IdEntry { position: op.position, version: *version }));
                    writes.push(IndexWrite::Type(event_type, op.position));
                }
                OpKind::State => {}
                OpKind::Snapshot { source, target, version, position } => {
                    writes.push(IndexWrite::Snapshot(source, target, *version, *position));
                }
            }
        }
        writes.extend(last_state.into_iter().map(|(stream, state)| IndexWrite::State(stream, state)));
        writes
    }

    /// Drops the first `count` ops (now in the index) and what only they held.
    pub(crate) fn drop_flushed(&mut self, count: usize, checkpoint: u64) {
        for op in self.ops.drain(..count) {
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
                OpKind::State => {}
                OpKind::Snapshot { source, target, version, .. } => {
                    let key = (Arc::clone(source), Arc::clone(target), *version);
                    if self.snapshots.get(&key).is_some_and(|(at, _)| *at == op.position) {
                        self.snapshots.remove(&key);
                    }
                }
            }
            let done = self
                .streams
                .get(op.stream.as_ref())
                .is_some_and(|t| t.versions.is_empty() && t.state.last_position < checkpoint);
            if done {
                self.streams.remove(op.stream.as_ref());
            }
        }
    }
}
