//! The in-memory tail of the index: every index change since the on-disk
//! checkpoint, plus lookup maps over them, in two generations.
//!
//! Lifecycle: the store's write path (and replay on open) applies each record
//! to the *current* generation under the store lock. A flush freezes it
//! ([`Tail::freeze`]: a swap, so the lock is held for no time) and starts an
//! empty one; the indexer thread then writes the frozen generation to the
//! on-disk [`Index`] without the lock, and drops it once committed
//! ([`Tail::drop_frozen`], again a swap). Lookups consult the current
//! generation, then the frozen one, then the index, so an entry is always in
//! at least one of them. Nothing is written to a frozen generation: each
//! stream's state in it is the state the index must hold after it.
//!
//! The tail is bounded: writers wait while the two generations hold
//! `tail_events_max` changes (an event is one change, the state a command
//! sets or a snapshot it records one more).
//!
//! Memory per event: its version entry (16 bytes in its stream's vector,
//! which may have as much again spare), its id entry (32 bytes in a map at
//! most 7/8 full) and its place in the generation's event list (48 bytes,
//! `GenEvent`), about 150 bytes at worst, so a full tail of 229,376 changes
//! (the default bound) holds about 33 MiB of events; plus per stream in a
//! generation its name and a [`TailStream`] (136 bytes in a map at most
//! 7/8 full, up to 311 bytes with the map's slack, plus about 80 bytes for
//! the name's and the versions' allocations), so up to about 100 MiB in the
//! case where every event is to a new stream (each generation's map keeps
//! the capacity it reached). A flushed generation's maps are kept (emptied)
//! for the next one, so flushes do not reallocate them; once the site goes
//! quiet (it stopped writing) the indexer lets them go and shrinks the
//! current generation to what it holds, so an idle site keeps none of that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use edgebus_types::{EventId, StreamName};

use crate::index::{IdEntry, Index, IndexError, IndexWrite, StreamState, VersionEntry};
use crate::record::{Command, SNAPSHOTS_PREFIX};

/// A hash map with a per-process seeded hash (foldhash), several times
/// cheaper than the standard SipHash on the tail's keys.
type FastMap<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

#[derive(Debug, Default)]
pub(crate) struct TailStream {
    pub(crate) state: StreamState,
    /// The first version in `versions`.
    first: u64,
    /// Versions written in this generation, from `first`, ascending and dense.
    versions: Vec<VersionEntry>,
}

impl TailStream {
    /// The entry of `version` if this generation wrote versions up to it
    /// (`Some(None)`: beyond them), `None` if it wrote none from `version`'s
    /// side (lower generations or the index hold it).
    fn version(&self, version: u64) -> Option<Option<VersionEntry>> {
        if self.versions.is_empty() || version < self.first {
            return None;
        }
        Some(self.versions.get((version - self.first) as usize).copied())
    }
}

/// An event as a generation lists it, in log order, for the index's id and
/// type keyspaces.
#[derive(Debug)]
struct GenEvent {
    id: EventId,
    event_type: Arc<str>,
    position: u64,
    version: u64,
}

/// A snapshot recorded (or, with no position, deleted) by the event at `at`.
#[derive(Debug)]
struct SnapshotOp {
    source: Arc<str>,
    target: Arc<str>,
    version: u64,
    at: u64,
    position: Option<u64>,
}

/// One generation of the tail: what was applied between two flushes.
#[derive(Debug, Default)]
pub(crate) struct Generation {
    streams: FastMap<Arc<str>, TailStream>,
    ids: FastMap<EventId, IdEntry>,
    events: Vec<GenEvent>,
    snapshots: Vec<SnapshotOp>,
    /// Changes applied (events, states set by commands, snapshots).
    changes: usize,
    /// One past the last position applied; 0 while empty.
    end: u64,
}

impl Generation {
    fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// Entries its tables have room for, without growing: streams, ids,
    /// events (what a kept generation holds on to).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.streams.capacity() + self.ids.capacity() + self.events.capacity()
    }

    /// Empties the generation, keeping its allocations.
    fn clear(&mut self) {
        self.streams.clear();
        self.ids.clear();
        self.events.clear();
        self.snapshots.clear();
        self.changes = 0;
        self.end = 0;
    }
}

/// A generation taken out for a flush (or none if the tail was empty).
#[derive(Debug)]
pub(crate) struct FlushBatch {
    generation: Option<Arc<Generation>>,
    /// The next position to index after the batch.
    pub(crate) checkpoint: u64,
}

impl FlushBatch {
    /// Whether the batch has nothing to write but its checkpoint.
    pub(crate) fn is_empty(&self) -> bool {
        self.generation.is_none()
    }

    /// The generation emptied for reuse (its maps keep their capacity),
    /// once the tail no longer holds it.
    pub(crate) fn into_generation(self) -> Option<Generation> {
        let mut generation = Arc::try_unwrap(self.generation?).ok()?;
        generation.clear();
        Some(generation)
    }

    /// The index writes of the batch: versions, ids, types, snapshots (in
    /// log order: of a snapshot recorded and deleted, the last wins) and
    /// each stream's state after the batch.
    pub(crate) fn writes(&self) -> impl Iterator<Item = IndexWrite<'_>> {
        let generation = self.generation.as_deref();
        let streams = generation.into_iter().flat_map(|g| g.streams.iter());
        let events = generation.into_iter().flat_map(|g| g.events.iter());
        let snapshots = generation.into_iter().flat_map(|g| g.snapshots.iter());
        let versions = streams.clone().flat_map(|(stream, tail)| {
            tail.versions.iter().zip(tail.first..).map(|(entry, version)| IndexWrite::Version(stream, version, *entry))
        });
        let ids_and_types = events.flat_map(|e| {
            [
                IndexWrite::Id(&e.id, IdEntry { position: e.position, version: e.version }),
                IndexWrite::Type(&e.event_type, e.position),
            ]
        });
        let snapshots = snapshots.map(|s| IndexWrite::Snapshot(&s.source, &s.target, s.version, s.position));
        let states = streams.map(|(stream, tail)| IndexWrite::State(stream, &tail.state));
        versions.chain(ids_and_types).chain(snapshots).chain(states)
    }
}

/// Event types remembered for sharing one allocation among the events of a type.
const EVENT_TYPES_SHARED_MAX: usize = 256;

/// Snapshot key in the tail: (source, stream, version).
pub(crate) type SnapshotKey = (Arc<str>, Arc<str>, u64);

#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Where writes are applied.
    current: Generation,
    /// The generation being written to the index, if a flush is under way.
    frozen: Option<Arc<Generation>>,
    /// Value: (op position, snapshot position or `None` if deleted). Both
    /// generations' snapshots (there are few).
    pub(crate) snapshots: BTreeMap<SnapshotKey, (u64, Option<u64>)>,
    /// Recent event types, so that events of one type share one `Arc`.
    event_types: HashSet<Arc<str>>,
    /// What the write being processed read from the index: by
    /// [`Tail::state_for_write`], so that applying it does not read again,
    /// or before it took the store lock ([`Tail::remember`]).
    index_reads: IndexReads,
    /// Frozen generations dropped so far: while this stays the same, the
    /// index's entry of a key the tail does not hold stays the same.
    dropped: u64,
}

/// Index entries a write needs, read for it: its stream's state and its
/// events' ids.
#[derive(Debug, Default)]
pub(crate) struct IndexReads {
    state: Option<(Box<str>, Option<StreamState>)>,
    /// Sorted by id: an append holds up to 10,000 events.
    ids: Vec<(EventId, Option<IdEntry>)>,
}

impl IndexReads {
    /// Reads the state of `stream` (if given) and the entries of `ids`.
    pub(crate) fn read(index: &Index, stream: Option<&str>, ids: &[EventId]) -> Result<Self, IndexError> {
        let state = match stream {
            Some(stream) => Some((Box::from(stream), index.stream_state(stream)?)),
            None => None,
        };
        let mut ids: Vec<_> = ids.iter().map(|id| index.id(id).map(|entry| (*id, entry))).collect::<Result<_, _>>()?;
        ids.sort_unstable_by_key(|(id, _)| *id);
        Ok(Self { state, ids })
    }
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
        self.current.changes + self.frozen.as_ref().map_or(0, |g| g.changes)
    }

    /// Shrinks the current generation's tables to what they hold.
    pub(crate) fn shrink_to_fit(&mut self) {
        let current = &mut self.current;
        current.streams.shrink_to_fit();
        current.ids.shrink_to_fit();
        current.events.shrink_to_fit();
        current.snapshots.shrink_to_fit();
    }

    /// The current generation: where writes go.
    #[cfg(test)]
    pub(crate) fn current(&self) -> &Generation {
        &self.current
    }

    /// Changes not yet taken by a flush.
    pub(crate) fn unflushed(&self) -> usize {
        self.current.changes
    }

    /// The generations, newest first.
    fn generations(&self) -> impl Iterator<Item = &Generation> {
        std::iter::once(&self.current).chain(self.frozen.as_deref())
    }

    /// The tail's state of `stream`, if a generation holds it.
    fn tail_state(&self, stream: &str) -> Option<StreamState> {
        self.generations().find_map(|g| g.streams.get(stream)).map(|t| t.state)
    }

    /// The state of `stream`: the tail's, else the index's, else none.
    pub(crate) fn state(&self, index: &Index, stream: &str) -> Result<Option<StreamState>, IndexError> {
        match self.tail_state(stream) {
            Some(state) => Ok(Some(state)),
            None => index.stream_state(stream),
        }
    }

    /// Every stream state the tail holds (the newest of each).
    pub(crate) fn stream_states(&self) -> impl Iterator<Item = (&Arc<str>, &StreamState)> {
        let current = self.current.streams.iter();
        let frozen = self.frozen.iter().flat_map(|g| g.streams.iter());
        current
            .chain(frozen.filter(|(name, _)| !self.current.streams.contains_key(name.as_ref())))
            .map(|(name, tail)| (name, &tail.state))
    }

    /// Forgets the index reads of the last write; called before and after
    /// each write so they never outlive the write that read them.
    pub(crate) fn forget_index_read(&mut self) {
        self.index_reads.state = None;
        self.index_reads.ids.clear();
    }

    /// Frozen generations dropped so far (see [`Tail::remember`]).
    pub(crate) fn generations_dropped(&self) -> u64 {
        self.dropped
    }

    /// Which of a write's lookups the tail cannot answer: whether the state
    /// of `stream`, and which of `ids`.
    pub(crate) fn index_lookups(&self, stream: &str, ids: impl Iterator<Item = EventId>) -> (bool, Vec<EventId>) {
        let state = self.tail_state(stream).is_none();
        (state, ids.filter(|id| self.generations().all(|g| !g.ids.contains_key(id))).collect())
    }

    /// Keeps `reads`, made without the store lock, for the write about to
    /// be processed. They hold as long as no frozen generation was dropped
    /// since before they were read (the caller checks
    /// [`Tail::generations_dropped`]): the index only changes by committing
    /// a frozen generation, whose keys the tail answers until it is dropped.
    pub(crate) fn remember(&mut self, reads: IndexReads) {
        self.index_reads = reads;
    }

    /// Like [`Tail::state`], for the write path: remembers what it read
    /// from the index so that applying the write does not read it again.
    /// Only the state lock's holder calls it, and nothing changes the index's
    /// copy of a stream that is not in the tail while the lock is held.
    pub(crate) fn state_for_write(&mut self, index: &Index, stream: &str) -> Result<Option<StreamState>, IndexError> {
        if let Some(state) = self.tail_state(stream) {
            return Ok(Some(state));
        }
        if let Some((name, state)) = &self.index_reads.state
            && **name == *stream
        {
            return Ok(*state);
        }
        let state = index.stream_state(stream)?;
        self.index_reads.state = Some((Box::from(stream), state));
        Ok(state)
    }

    /// Like [`Tail::id`], for the write path: answers from what was read
    /// for the write (see [`Tail::remember`]) before asking the index.
    pub(crate) fn id_for_write(&self, index: &Index, id: &EventId) -> Result<Option<IdEntry>, IndexError> {
        if let Some(entry) = self.generations().find_map(|g| g.ids.get(id)) {
            return Ok(Some(*entry));
        }
        let reads = &self.index_reads.ids;
        match reads.binary_search_by_key(id, |(read, _)| *read) {
            Ok(at) => Ok(reads[at].1),
            Err(_) => index.id(id),
        }
    }

    /// The entry of `version` of `stream`.
    pub(crate) fn version(
        &self,
        index: &Index,
        stream: &str,
        version: u64,
    ) -> Result<Option<VersionEntry>, IndexError> {
        for generation in self.generations() {
            if let Some(found) = generation.streams.get(stream).and_then(|t| t.version(version)) {
                return Ok(found);
            }
        }
        index.version(stream, version)
    }

    /// Where `id` lives.
    pub(crate) fn id(&self, index: &Index, id: &EventId) -> Result<Option<IdEntry>, IndexError> {
        match self.generations().find_map(|g| g.ids.get(id)) {
            Some(entry) => Ok(Some(*entry)),
            None => index.id(id),
        }
    }

    /// The tail's versions of `stream` in `from..to`, and the first version
    /// the tail holds (versions below it are in the index).
    pub(crate) fn versions(&self, stream: &str, from: u64, to: u64) -> (Vec<(u64, VersionEntry)>, u64) {
        let mut entries = Vec::new();
        let mut first = to;
        // Oldest first: the frozen generation's versions precede the current one's.
        for generation in self.frozen.as_deref().into_iter().chain(std::iter::once(&self.current)) {
            let Some(tail) = generation.streams.get(stream) else { continue };
            if tail.versions.is_empty() {
                continue;
            }
            first = first.min(tail.first);
            let versions = tail.versions.iter().zip(tail.first..).map(|(entry, version)| (version, *entry));
            entries.extend(versions.filter(|(v, _)| *v >= from && *v < to));
        }
        (entries, first.max(from).min(to))
    }

    fn entry(&mut self, index: &Index, stream: &str) -> Result<(Arc<str>, &mut TailStream), IndexError> {
        let key = match self.current.streams.get_key_value(stream) {
            Some((key, _)) => Arc::clone(key),
            None => {
                let state = match self.frozen.as_ref().and_then(|g| g.streams.get(stream)) {
                    Some(frozen) => Some(frozen.state),
                    None => match self.index_reads.state.take() {
                        Some((name, state)) if *name == *stream => state,
                        _ => index.stream_state(stream)?,
                    },
                };
                let key: Arc<str> = Arc::from(stream);
                let tail = TailStream { state: state.unwrap_or_default(), ..TailStream::default() };
                self.current.streams.insert(Arc::clone(&key), tail);
                key
            }
        };
        Ok((key, self.current.streams.get_mut(stream).expect("inserted above")))
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
        if tail.versions.is_empty() {
            tail.first = record.version;
            // Most streams get one event per generation: room for one, not
            // the four a first push reserves.
            tail.versions.reserve_exact(1);
        }
        assert_eq!(tail.first + tail.versions.len() as u64, record.version, "tail versions are dense");
        tail.versions.push(VersionEntry { position: record.position, content_hash: record.content_hash });
        let generation = &mut self.current;
        generation.ids.insert(record.id, IdEntry { position: record.position, version: record.version });
        let event_type = self.event_type(record.event_type);
        let generation = &mut self.current;
        generation.events.push(GenEvent {
            id: record.id,
            event_type,
            position: record.position,
            version: record.version,
        });
        generation.changes += 1;
        generation.end = record.position + 1;
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
        let (_, tail) = self.entry(index, target.as_str())?;
        change(&mut tail.state);
        tail.state.last_position = position;
        self.current.changes += 1;
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
        at: u64,
        position: Option<u64>,
    ) {
        let source: Arc<str> = Arc::from(snapshot_stream.strip_prefix(SNAPSHOTS_PREFIX).expect("snapshot stream"));
        let target: Arc<str> = Arc::from(target.as_str());
        self.snapshots.insert((Arc::clone(&source), Arc::clone(&target), version), (at, position));
        self.current.snapshots.push(SnapshotOp { source, target, version, at, position });
        self.current.changes += 1;
    }

    /// Freezes the current generation for a flush and starts `spare` (an
    /// empty generation) in its place; with nothing applied since the last
    /// flush, freezes nothing and the batch's checkpoint is `visible_end`
    /// (the caller holds the store lock, so every record below it was
    /// applied). At most one generation is frozen at a time.
    /// Returns `None` while a generation is still frozen: an earlier flush
    /// failed to write it (flushes are serialized, so that is the only way).
    pub(crate) fn freeze(&mut self, visible_end: u64, spare: Generation) -> Option<FlushBatch> {
        if self.frozen.is_some() {
            return None;
        }
        if self.current.is_empty() {
            return Some(FlushBatch { generation: None, checkpoint: visible_end });
        }
        let generation = Arc::new(std::mem::replace(&mut self.current, spare));
        self.frozen = Some(Arc::clone(&generation));
        Some(FlushBatch { checkpoint: generation.end, generation: Some(generation) })
    }

    /// Drops the frozen generation once it is in the index, and the tail's
    /// snapshots that only it held.
    pub(crate) fn drop_frozen(&mut self) {
        let Some(generation) = self.frozen.take() else { return };
        self.dropped += 1;
        for s in &generation.snapshots {
            let key = (Arc::clone(&s.source), Arc::clone(&s.target), s.version);
            if self.snapshots.get(&key).is_some_and(|(at, _)| *at == s.at) {
                self.snapshots.remove(&key);
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

    fn states(batch: &FlushBatch) -> HashMap<String, StreamState> {
        batch
            .writes()
            .filter_map(|w| match w {
                IndexWrite::State(name, state) => Some((name.to_owned(), *state)),
                _ => None,
            })
            .collect()
    }

    /// A flush writes each stream's state as of the end of its generation;
    /// while it is under way the frozen generation answers lookups beside
    /// the current one, and writes after the freeze continue from it.
    #[test]
    fn a_frozen_generation_answers_until_dropped_and_writes_continue_from_it() {
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
        // positions: 0 a@0, 1 b@0, 2 a@1, 3 metadata(a), 4 b@1 | freeze | 5 a@2, 6 delete(b), 7 a@3
        for record in [
            event(&a, 0, 0, None),
            event(&b, 0, 1, None),
            event(&a, 1, 2, None),
            event(&sys, 0, 3, Some(&metadata)),
            event(&b, 1, 4, None),
        ] {
            tail.apply(&index, &record).expect("applies");
        }
        assert_eq!(tail.len(), 6, "five events and a state change");
        let first = tail.freeze(99, Generation::default()).expect("nothing frozen yet");
        assert_eq!(first.checkpoint, 5, "the generation's end, not the visible end");
        assert_eq!((tail.len(), tail.unflushed()), (6, 0));
        let written = states(&first);
        assert_eq!(written["a"].next_version, 2);
        assert_eq!(written["a"].metadata.max_count, Some(5));
        assert_eq!(written["b"].next_version, 2);
        assert_eq!(written.len(), 3, "a, b and $sys.streams");
        for record in [event(&a, 2, 5, None), event(&sys, 1, 6, Some(&delete)), event(&a, 3, 7, None)] {
            tail.apply(&index, &record).expect("applies on top of the frozen generation");
        }
        assert_eq!(tail.len(), 10);
        assert!(tail.freeze(99, Generation::default()).is_none(), "one frozen generation at a time");
        let a_now = tail.state(&index, "a").expect("reads").expect("a is known");
        assert_eq!((a_now.next_version, a_now.metadata.max_count), (4, Some(5)), "carried over from the frozen state");
        let b_now = tail.state(&index, "b").expect("reads").expect("b is known");
        assert!(b_now.deleted && b_now.deleted_before == 2 && b_now.next_version == 2);
        let (versions, first_held) = tail.versions("a", 0, 10);
        assert_eq!(first_held, 0);
        assert_eq!(
            versions.iter().map(|(v, e)| (*v, e.position)).collect::<Vec<_>>(),
            [(0, 0), (1, 2), (2, 5), (3, 7)]
        );
        assert_eq!(tail.version(&index, "a", 1).expect("reads").map(|e| e.position), Some(2), "from the frozen one");
        assert_eq!(tail.version(&index, "a", 3).expect("reads").map(|e| e.position), Some(7));
        assert_eq!(tail.version(&index, "a", 4).expect("reads"), None);
        assert_eq!(tail.version(&index, "b", 1).expect("reads").map(|e| e.position), Some(4));
        assert_eq!(tail.id(&index, &EventId::from_u128(2)).expect("reads").map(|e| e.position), Some(1));
        let listed: HashMap<String, StreamState> = tail.stream_states().map(|(n, s)| (n.to_string(), *s)).collect();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed["a"], a_now, "the newest state of each stream");

        index.commit(first.writes(), first.checkpoint).expect("commits");
        tail.drop_frozen();
        let spare = first.into_generation().expect("nobody else holds the generation");
        assert_eq!(tail.len(), 4);
        assert_eq!(tail.id(&index, &EventId::from_u128(2)).expect("reads").map(|e| e.position), Some(1), "indexed");
        assert_eq!(tail.version(&index, "a", 1).expect("reads").map(|e| e.position), Some(2), "indexed");
        let (versions, first_held) = tail.versions("a", 0, 10);
        assert_eq!((versions.len(), first_held), (2, 2), "versions below 2 are the index's now");

        let second = tail.freeze(99, spare).expect("the first was dropped");
        assert_eq!(second.checkpoint, 8);
        let written = states(&second);
        assert_eq!(written["a"].next_version, 4);
        assert!(written["b"].deleted, "b's state changed by the command");
        index.commit(second.writes(), second.checkpoint).expect("commits");
        tail.drop_frozen();
        assert_eq!(tail.len(), 0);
        assert_eq!(tail.stream_states().count(), 0, "a fully flushed tail holds nothing");
        let empty = tail.freeze(8, Generation::default()).expect("nothing frozen");
        assert!(empty.is_empty() && empty.checkpoint == 8, "nothing to freeze: the visible end");
        assert_eq!(index.stream_state("a").expect("reads").map(|s| s.next_version), Some(4));
    }

    #[test]
    fn an_events_entries_stay_small() {
        // The tail's memory bound (module docs) rests on these sizes.
        assert!(size_of::<GenEvent>() <= 48, "GenEvent is {} bytes", size_of::<GenEvent>());
        assert!(size_of::<VersionEntry>() <= 16, "VersionEntry is {} bytes", size_of::<VersionEntry>());
        let id_slot = size_of::<(EventId, IdEntry)>();
        assert!(id_slot <= 32, "an id entry is {id_slot} bytes");
        let stream_slot = size_of::<(Arc<str>, TailStream)>();
        assert!(stream_slot <= 136, "a stream entry is {stream_slot} bytes");
    }
}
