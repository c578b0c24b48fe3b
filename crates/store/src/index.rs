//! The on-disk index: an embedded LSM key-value store (fjall) holding, for
//! every event up to the index checkpoint, `stream → state`,
//! `(stream, version) → (position, content hash)`, `id → position`,
//! `(type, position)` and `(source, stream, version) → snapshot position`.
//!
//! The index is derived state: it only ever receives entries for positions
//! that are already durable in the log, together with the checkpoint (the
//! next position to index) in the same atomic batch. Whatever fjall recovers
//! after a crash is therefore a consistent prefix, and the store replays the
//! log from the checkpoint on open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgebus_types::EventId;
use fjall::compaction::Leveled;
use fjall::config::{BlockSizePolicy, FilterPolicy, PartitioningPolicy};
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::record::StreamMetadata;

/// What the index knows about one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StreamState {
    /// Number of versions ever written: the next event gets this version.
    pub next_version: u64,
    /// Versions below this were removed by a soft delete.
    pub deleted_before: u64,
    /// Soft-deleted and not written to since.
    pub deleted: bool,
    /// Hard-deleted forever.
    pub tombstoned: bool,
    /// Retention settings.
    pub metadata: StreamMetadata,
    /// Position of the last event or command that changed this state.
    pub last_position: u64,
    /// The [`SiteName::id`](edgebus_types::SiteName::id) of the stream's
    /// home site if it is a replica of another site's stream; 0 if it is
    /// this site's own.
    pub origin: u64,
}

impl StreamState {
    /// The stream's current version for expected-version checks: the version
    /// of its last event, `None` if it has none (or was soft-deleted since).
    pub fn current_version(&self) -> Option<u64> {
        if self.deleted || self.next_version == 0 { None } else { Some(self.next_version - 1) }
    }

    /// The lowest version reads may return (before `max_age`, which needs a clock).
    pub fn first_visible_version(&self) -> u64 {
        let by_count = self.metadata.max_count.map_or(0, |count| self.next_version.saturating_sub(count));
        self.deleted_before.max(self.metadata.truncate_before.unwrap_or(0)).max(by_count)
    }

    fn encode(&self) -> [u8; 57] {
        let mut out = [0u8; 57];
        out[0..8].copy_from_slice(&self.next_version.to_le_bytes());
        out[8..16].copy_from_slice(&self.deleted_before.to_le_bytes());
        let m = &self.metadata;
        let flags = u8::from(self.deleted)
            | u8::from(self.tombstoned) << 1
            | u8::from(m.max_age_ms.is_some()) << 2
            | u8::from(m.max_count.is_some()) << 3
            | u8::from(m.truncate_before.is_some()) << 4;
        out[16] = flags;
        out[17..25].copy_from_slice(&m.max_age_ms.unwrap_or(0).to_le_bytes());
        out[25..33].copy_from_slice(&m.max_count.unwrap_or(0).to_le_bytes());
        out[33..41].copy_from_slice(&m.truncate_before.unwrap_or(0).to_le_bytes());
        out[41..49].copy_from_slice(&self.last_position.to_le_bytes());
        out[49..57].copy_from_slice(&self.origin.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 57 {
            return None;
        }
        let u = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let flags = bytes[16];
        let opt = |bit: u8, value: u64| (flags & (1 << bit) != 0).then_some(value);
        Some(Self {
            next_version: u(0),
            deleted_before: u(8),
            deleted: flags & 1 != 0,
            tombstoned: flags & 2 != 0,
            metadata: StreamMetadata {
                max_age_ms: opt(2, u(17)),
                max_count: opt(3, u(25)),
                truncate_before: opt(4, u(33)),
            },
            last_position: u(41),
            origin: u(49),
        })
    }
}

/// Where an event id lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdEntry {
    /// Position of the event.
    pub position: u64,
    /// Its version in its stream.
    pub version: u64,
}

/// One version of a stream in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionEntry {
    /// Position of the event.
    pub position: u64,
    /// Its content hash.
    pub content_hash: u64,
}

/// The index: fjall keyspaces and their key encodings.
pub struct Index {
    path: PathBuf,
    db: Database,
    streams: Keyspace,
    versions: Keyspace,
    ids: Keyspace,
    types: Keyspace,
    snapshots: Keyspace,
    meta: Keyspace,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("path", &self.path).finish_non_exhaustive()
    }
}

const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// Largest in-memory table of one keyspace before it is flushed to disk.
/// Six keyspaces, of which three take writes at the event rate, keep the
/// index's write buffers under ~64 MiB together.
const MEMTABLE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Largest journal of the index before fjall flushes memtables to reclaim it.
const JOURNAL_BYTES_MAX: u64 = 128 * 1024 * 1024;

/// An index error, as text: fjall's errors are not part of our API.
pub type IndexError = String;

fn err(e: impl std::fmt::Display) -> IndexError {
    e.to_string()
}

/// Key of `(stream, version)`: the name, a zero byte, the big-endian version.
pub fn version_key(stream: &str, version: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 9);
    put_key(&mut key, &[stream], version);
    key
}

/// Appends a key made of `names`, each followed by a zero byte, and the
/// big-endian `number`: the shape of every index key but ids and streams.
fn put_key(out: &mut Vec<u8>, names: &[&str], number: u64) {
    for name in names {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    out.extend_from_slice(&number.to_be_bytes());
}

/// Key of a snapshot: source, zero, stream, zero, big-endian version.
pub fn snapshot_key(source: &str, stream: &str, version: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(source.len() + stream.len() + 10);
    put_key(&mut key, &[source, stream], version);
    key
}

/// Splits a snapshot key back into its parts.
pub fn parse_snapshot_key(key: &[u8]) -> Option<(String, String, u64)> {
    let (rest, version) = key.split_at(key.len().checked_sub(8)?);
    let rest = rest.strip_suffix(&[0])?;
    let zero = rest.iter().position(|b| *b == 0)?;
    let source = std::str::from_utf8(&rest[..zero]).ok()?.to_owned();
    let stream = std::str::from_utf8(&rest[zero + 1..]).ok()?.to_owned();
    Some((source, stream, u64::from_be_bytes(version.try_into().ok()?)))
}

/// Key of `(type, position)`.
pub fn type_key(event_type: &str, position: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(event_type.len() + 9);
    put_key(&mut key, &[event_type], position);
    key
}

/// One change to write to the index.
#[derive(Debug, Clone)]
pub enum IndexWrite<'a> {
    /// A stream's state.
    State(&'a str, &'a StreamState),
    /// A stream version.
    Version(&'a str, u64, VersionEntry),
    /// An event id.
    Id(&'a EventId, IdEntry),
    /// An event type occurrence.
    Type(&'a str, u64),
    /// A snapshot (or its deletion, with `None`).
    Snapshot(&'a str, &'a str, u64, Option<u64>),
}

/// The index's memory beside its in-memory tables ([`Index::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexMemory {
    /// Table files of all keyspaces.
    pub tables: usize,
    /// Filters and block indexes the tables keep in memory (outside the cache).
    pub pinned_bytes: u64,
    /// Blocks in the block cache now.
    pub cache_bytes: u64,
    /// The block cache's bound ([`StoreConfig::index_cache_bytes`](crate::StoreConfig::index_cache_bytes)).
    pub cache_capacity_bytes: u64,
}

/// Data block size of the keyspaces read by range (`versions`, `types`,
/// `snapshots`); fjall's default, 4 KiB, stays for point lookups. Each
/// table keeps one entry per index block in memory, and an index block
/// covers a fixed number of data blocks: a block four times as large is a
/// quarter of that memory for the same events, and a quarter of the block
/// reads for a scan.
const RANGE_BLOCK_BYTES: u32 = 16 * 1024;

/// Target size of a table below L0 in the keyspaces read by range
/// (`versions`, `types`, `snapshots`); fjall's default is 64 MiB. fjall
/// sizes L1 as four tables, and every indexer flush adds to L0 a table
/// that, in `versions`, spans the whole key range (a few versions of
/// every stream written since the last flush): merging four of them into
/// L1 rewrites all of L1. An L1 of 64 MiB instead of 256 MiB makes those
/// merges a quarter as large, and the data moves on to L2 sooner, where
/// a merge rewrites only the tables under one L1 table's key range. The
/// number of L0 tables a read seeks in stays fjall's default (4).
/// Measured with `examples/fill.rs` (`streams=N`): fjall's compaction
/// work per event fell by 29–31 % at 8M events (`docs/benchmarks.md`,
/// "index compaction").
const RANGE_TABLE_BYTES: u64 = 16 * 1024 * 1024;

/// fjall's background threads (flushes and compactions); see [`Index::open`].
const INDEX_WORKERS: usize = 1;

impl Index {
    /// Opens (creating if needed) the index in `path` with a block cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, IndexError> {
        // One background worker: with two or more, fjall's first worker
        // hands every compaction request back to the queue for the others
        // (leaving itself free for flushes), and while another worker
        // compacts it spins on those requests, a whole core on a two-core
        // machine (seen in `perf` under `bench node`: fjall's workers in
        // flume send/receive). One worker flushes and compacts in turn.
        let db = Database::builder(path)
            .worker_threads(INDEX_WORKERS)
            .cache_size(cache_bytes)
            .manual_journal_persist(true)
            .max_journaling_size(JOURNAL_BYTES_MAX)
            .open()
            .map_err(err)?;
        // Filters and block indexes of tables below L0 are partitioned: a
        // lookup (one per event id of every append) then loads a small
        // partition through the block cache. Whole filters of L1 and L2
        // tables (MiBs each) did not stay in the cache once the index held
        // millions of ids, and loading and checksumming them took most of
        // the sequencer's time: a node filling a 10M backlog slowed from
        // 357k to 34k events/s (`perf`: xxh3 and pread under the sequencer).
        //
        // Bloom filters only where a lookup may miss: `ids` (every append
        // looks up its event ids, nearly all new) and `streams` (a new
        // stream's state). `versions` is read by point only below a stream's
        // count (the entry is there) and `types` and `snapshots` by range
        // only, so their filters would never save a read. Each table keeps
        // its filter's top-level index in memory (about 10 KiB per million
        // keys), so filtering one key per event instead of three makes that
        // part of the memory that grows with the events a third, and
        // compactions hash a third as many keys. The keyspaces read by range
        // also have smaller tables below L0 ([`RANGE_TABLE_BYTES`]).
        let options = |filters: bool| {
            let options = KeyspaceCreateOptions::default()
                .max_memtable_size(MEMTABLE_BYTES_MAX)
                .filter_block_partitioning_policy(PartitioningPolicy::new([false, true]))
                .index_block_partitioning_policy(PartitioningPolicy::new([false, true]));
            if filters {
                options
            } else {
                options
                    .filter_policy(FilterPolicy::disabled())
                    .data_block_size_policy(BlockSizePolicy::all(RANGE_BLOCK_BYTES))
                    .compaction_strategy(Arc::new(Leveled::default().with_table_target_size(RANGE_TABLE_BYTES)))
            }
        };
        // A keyspace keeps the options it was created with: an index
        // written before this keeps its filters and its table size.
        let open = |name: &str, filters: bool| db.keyspace(name, || options(filters)).map_err(err);
        Ok(Self {
            path: path.to_path_buf(),
            streams: open("streams", true)?,
            versions: open("versions", false)?,
            ids: open("ids", true)?,
            types: open("types", false)?,
            snapshots: open("snapshots", false)?,
            meta: open("meta", true)?,
            db,
        })
    }

    /// The next log position the index has not seen (0 for a new index).
    pub fn checkpoint(&self) -> Result<u64, IndexError> {
        Ok(self
            .meta
            .get(CHECKPOINT_KEY)
            .map_err(err)?
            .map_or(0, |v| u64::from_le_bytes(v.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// Writes `writes` and the new checkpoint as one atomic batch.
    pub fn commit<'a>(&self, writes: impl Iterator<Item = IndexWrite<'a>>, checkpoint: u64) -> Result<(), IndexError> {
        // Each keyspace's share is sorted and written as one new table
        // (fjall ingestion): no journal and no memtable, so the index costs
        // one sequential write per flush and opening it replays nothing.
        // Keyspaces are ingested one after the other and the checkpoint last:
        // a crash in between leaves data ahead of the checkpoint, which the
        // replay from the checkpoint rewrites with the same values.
        let mut streams = Ingest::default();
        let mut versions = Ingest::default();
        let mut ids = Ingest::default();
        let mut types = Ingest::default();
        let mut snapshots = Ingest::default();
        for write in writes {
            match write {
                IndexWrite::State(stream, state) => {
                    streams.push(|key| key.extend_from_slice(stream.as_bytes()), Some(&state.encode()));
                }
                IndexWrite::Version(stream, version, entry) => {
                    let mut value = [0u8; 16];
                    value[0..8].copy_from_slice(&entry.position.to_le_bytes());
                    value[8..16].copy_from_slice(&entry.content_hash.to_le_bytes());
                    versions.push(|key| put_key(key, &[stream], version), Some(&value));
                }
                IndexWrite::Id(id, entry) => {
                    let mut value = [0u8; 16];
                    value[0..8].copy_from_slice(&entry.position.to_le_bytes());
                    value[8..16].copy_from_slice(&entry.version.to_le_bytes());
                    ids.push(|key| key.extend_from_slice(id.as_bytes()), Some(&value));
                }
                IndexWrite::Type(event_type, position) => {
                    types.push(|key| put_key(key, &[event_type], position), Some(&[]));
                }
                IndexWrite::Snapshot(source, stream, version, position) => {
                    let value = position.map(u64::to_le_bytes);
                    snapshots
                        .push(|key| put_key(key, &[source, stream], version), value.as_ref().map(|v| v.as_slice()));
                }
            }
        }
        let mut meta = Ingest::default();
        meta.push(|key| key.extend_from_slice(CHECKPOINT_KEY), Some(&checkpoint.to_le_bytes()));
        for (keyspace, entries) in [
            (&self.streams, streams),
            (&self.versions, versions),
            (&self.ids, ids),
            (&self.types, types),
            (&self.snapshots, snapshots),
            (&self.meta, meta),
        ] {
            entries.ingest(keyspace)?;
        }
        Ok(())
    }

    /// Makes everything committed so far durable and flushes the in-memory
    /// tables, so the next open neither replays a journal nor holds them (on close).
    pub fn persist(&self) -> Result<(), IndexError> {
        self.db.persist(PersistMode::SyncAll).map_err(err)?;
        for keyspace in [&self.streams, &self.versions, &self.ids, &self.types, &self.snapshots, &self.meta] {
            keyspace.rotate_memtable_and_wait().map_err(err)?;
        }
        Ok(())
    }

    /// What the index holds in memory beside its in-memory tables.
    pub fn memory(&self) -> IndexMemory {
        let mut memory = IndexMemory {
            cache_bytes: self.db.cache_size(),
            cache_capacity_bytes: self.db.cache_capacity(),
            ..IndexMemory::default()
        };
        for keyspace in [&self.streams, &self.versions, &self.ids, &self.types, &self.snapshots, &self.meta] {
            memory.tables += keyspace.table_count();
            memory.pinned_bytes +=
                (keyspace.tree.pinned_filter_size() + keyspace.tree.pinned_block_index_size()) as u64;
        }
        memory
    }

    /// The state of `stream`, if the index has it.
    pub fn stream_state(&self, stream: &str) -> Result<Option<StreamState>, IndexError> {
        match self.streams.get(stream.as_bytes()).map_err(err)? {
            Some(bytes) => {
                StreamState::decode(&bytes).map(Some).ok_or_else(|| format!("bad state record for {stream}"))
            }
            None => Ok(None),
        }
    }

    /// Every stream state, in name order (for digests and listings; bounded by `limit`).
    pub fn stream_states(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, StreamState)>, IndexError> {
        let mut out = Vec::new();
        let iter = match after {
            Some(after) => self
                .streams
                .range::<&[u8], _>((std::ops::Bound::Excluded(after.as_bytes()), std::ops::Bound::Unbounded)),
            None => self.streams.iter(),
        };
        for guard in iter.take(limit) {
            let (key, value) = guard.into_inner().map_err(err)?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let state = StreamState::decode(&value).ok_or_else(|| format!("bad state record for {name}"))?;
            out.push((name, state));
        }
        Ok(out)
    }

    /// The entry of one version.
    pub fn version(&self, stream: &str, version: u64) -> Result<Option<VersionEntry>, IndexError> {
        Ok(self.versions.get(version_key(stream, version)).map_err(err)?.map(|v| decode_version(&v)))
    }

    /// Versions `from..to` of `stream` present in the index, ascending.
    pub fn versions(&self, stream: &str, from: u64, to: u64) -> Result<Vec<(u64, VersionEntry)>, IndexError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for guard in self.versions.range(version_key(stream, from)..version_key(stream, to)) {
            let (key, value) = guard.into_inner().map_err(err)?;
            let version = u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes"));
            out.push((version, decode_version(&value)));
        }
        Ok(out)
    }

    /// Where `id` lives, if indexed.
    pub fn id(&self, id: &EventId) -> Result<Option<IdEntry>, IndexError> {
        Ok(self.ids.get(id.as_bytes()).map_err(err)?.map(|v| IdEntry {
            position: u64::from_le_bytes(v[0..8].try_into().expect("8 bytes")),
            version: u64::from_le_bytes(v[8..16].try_into().expect("8 bytes")),
        }))
    }

    /// Positions of events of `event_type` in `from..to`, ascending, at most `limit`.
    pub fn type_positions(&self, event_type: &str, from: u64, to: u64, limit: usize) -> Result<Vec<u64>, IndexError> {
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for guard in self.types.range(type_key(event_type, from)..type_key(event_type, to)).take(limit) {
            let key = guard.key().map_err(err)?;
            out.push(u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes")));
        }
        Ok(out)
    }

    /// Snapshots in `[start, end)` of the snapshot key space, as `(source, stream, version, position)`.
    pub fn snapshots(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(String, String, u64, u64)>, IndexError> {
        let iter = match end {
            Some(end) => self.snapshots.range::<&[u8], _>(start..end),
            None => self.snapshots.range::<&[u8], _>(start..),
        };
        let mut out = Vec::new();
        let mut push = |guard: fjall::Guard| -> Result<(), IndexError> {
            let (key, value) = guard.into_inner().map_err(err)?;
            let (source, stream, version) = parse_snapshot_key(&key).ok_or("bad snapshot key")?;
            out.push((source, stream, version, u64::from_le_bytes(value.as_ref().try_into().map_err(err)?)));
            Ok(())
        };
        if reverse {
            for guard in iter.rev().take(limit) {
                push(guard)?;
            }
        } else {
            for guard in iter.take(limit) {
                push(guard)?;
            }
        }
        Ok(out)
    }

    /// Drops every entry (before a full rebuild).
    pub fn clear(&self) -> Result<(), IndexError> {
        for keyspace in [&self.streams, &self.versions, &self.ids, &self.types, &self.snapshots, &self.meta] {
            keyspace.clear().map_err(err)?;
        }
        Ok(())
    }
}

/// One keyspace's share of a commit: keys and values packed into one
/// buffer (a flush of 131,072 events holds three entries per event; one
/// allocation per key and value made the flush's peak several times larger).
#[derive(Debug, Default)]
struct Ingest {
    bytes: Vec<u8>,
    entries: Vec<IngestEntry>,
}

/// Where an entry's key and value sit in [`Ingest::bytes`]: the key at
/// `start`, the value right after it; no value is a tombstone.
#[derive(Debug, Clone, Copy)]
struct IngestEntry {
    start: usize,
    key_len: u32,
    value_len: Option<u32>,
}

impl Ingest {
    /// Adds the key that `key` writes with `value` (`None`: a tombstone).
    fn push(&mut self, key: impl FnOnce(&mut Vec<u8>), value: Option<&[u8]>) {
        let start = self.bytes.len();
        key(&mut self.bytes);
        let key_len = self.bytes.len() - start;
        if let Some(value) = value {
            self.bytes.extend_from_slice(value);
        }
        let len = |n: usize| u32::try_from(n).expect("index keys and values are far below 4 GiB");
        self.entries.push(IngestEntry { start, key_len: len(key_len), value_len: value.map(|v| len(v.len())) });
    }

    fn key(&self, entry: &IngestEntry) -> &[u8] {
        &self.bytes[entry.start..entry.start + entry.key_len as usize]
    }

    fn value(&self, entry: &IngestEntry) -> Option<&[u8]> {
        let at = entry.start + entry.key_len as usize;
        entry.value_len.map(|len| &self.bytes[at..at + len as usize])
    }

    /// Writes the entries into `keyspace`, sorted, as one table; of equal
    /// keys the last written wins.
    fn ingest(mut self, keyspace: &Keyspace) -> Result<(), IndexError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        // A stable sort keeps equal keys in write order.
        let mut entries = std::mem::take(&mut self.entries);
        entries.sort_by(|a, b| self.key(a).cmp(self.key(b)));
        let mut ingestion = keyspace.start_ingestion().map_err(err)?;
        for (at, entry) in entries.iter().enumerate() {
            let key = self.key(entry);
            if entries.get(at + 1).is_some_and(|next| self.key(next) == key) {
                continue;
            }
            match self.value(entry) {
                Some(value) => ingestion.write(key, value).map_err(err)?,
                None => ingestion.write_tombstone(key).map_err(err)?,
            }
        }
        ingestion.finish().map_err(err)
    }
}

fn decode_version(v: &[u8]) -> VersionEntry {
    VersionEntry {
        position: u64::from_le_bytes(v[0..8].try_into().expect("8 bytes")),
        content_hash: u64::from_le_bytes(v[8..16].try_into().expect("8 bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_keys_round_trip() {
        let state = StreamState {
            next_version: 9,
            deleted_before: 3,
            deleted: true,
            tombstoned: false,
            metadata: StreamMetadata { max_age_ms: Some(5), max_count: None, truncate_before: Some(2) },
            last_position: 77,
            origin: 0xabcd,
        };
        assert_eq!(StreamState::decode(&state.encode()), Some(state));
        let key = snapshot_key("src", "a.b", 42);
        assert_eq!(parse_snapshot_key(&key), Some(("src".to_owned(), "a.b".to_owned(), 42)));
        assert!(version_key("a", 1) < version_key("a", 2));
        assert!(version_key("a", u64::MAX) < version_key("a.b", 0), "a stream's versions sort before longer names");
    }

    /// Filters only in the keyspaces whose point lookups may miss; the
    /// lookups of every keyspace still find what was written.
    #[test]
    fn only_the_keyspaces_looked_up_by_id_or_name_build_filters() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1024 * 1024).unwrap();
        let ids: Vec<EventId> = (1..=2000u128).map(EventId::from_u128).collect();
        let state = StreamState { next_version: 2000, ..StreamState::default() };
        let writes = ids.iter().enumerate().flat_map(|(i, id)| {
            let at = i as u64;
            [
                IndexWrite::Version("a.b", at, VersionEntry { position: at, content_hash: at }),
                IndexWrite::Id(id, IdEntry { position: at, version: at }),
                IndexWrite::Type("Reading", at),
            ]
        });
        index.commit(writes.chain([IndexWrite::State("a.b", &state)]), 2000).unwrap();
        assert!(index.ids.tree.filter_size() > 0, "event ids are looked up on every append, nearly all new");
        assert!(index.streams.tree.filter_size() > 0, "a new stream's state is looked up");
        assert_eq!(index.versions.tree.filter_size(), 0, "versions are looked up below the stream's count only");
        assert_eq!(index.types.tree.filter_size(), 0, "types are read by range only");
        assert_eq!(index.version("a.b", 1999).unwrap().map(|e| e.position), Some(1999));
        assert_eq!(index.id(&ids[7]).unwrap().map(|e| e.position), Some(7));
        assert_eq!(index.type_positions("Reading", 1990, 2000, 100).unwrap(), (1990..2000).collect::<Vec<_>>());
    }

    /// The table size fjall compacts a keyspace to, from the settings it
    /// stores with the keyspace.
    fn table_target_bytes(keyspace: &Keyspace) -> u64 {
        let config = keyspace.config.compaction_strategy.get_config();
        let (_, value) = config.iter().find(|(key, _)| &**key == b"leveled_target_size").expect("leveled compaction");
        u64::from_le_bytes((&**value).try_into().unwrap())
    }

    /// Smaller tables (so a smaller L1) only in the keyspaces read by
    /// range, and a reopened index keeps them.
    #[test]
    fn the_keyspaces_read_by_range_compact_to_smaller_tables() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let index = Index::open(dir.path(), 1024 * 1024).unwrap();
            for keyspace in [&index.versions, &index.types, &index.snapshots] {
                assert_eq!(table_target_bytes(keyspace), RANGE_TABLE_BYTES);
            }
            for keyspace in [&index.ids, &index.streams, &index.meta] {
                assert_eq!(table_target_bytes(keyspace), 64 * 1024 * 1024, "fjall's default");
            }
        }
    }
}
