//! How an event is encoded as one log record, and the payloads of the system
//! commands (stream metadata, deletes, snapshots) that travel as events in
//! system streams. Format version 1; every integer little-endian.
//!
//! ```text
//! event record:  u8 format (1) | u8 kind (1 = event)
//!                | u8 stream_len | stream | u64 version | [u8; 16] id
//!                | u8 type_len | type | u64 timestamp_ms
//!                | u32 data_len | data | u32 metadata_len | metadata
//! replica record: the same with kind 2, followed by the origin:
//!                | u8 site_len | site | u64 origin_position
//!                | u8 via_len | via | u16 note_len | note
//! ```

use edgebus_types::{EventId, EventType, NewEvent, Origin, RecordedEvent, SiteName, StreamName};

const RECORD_FORMAT: u8 = 1;
const KIND_EVENT: u8 = 1;
const KIND_REPLICA: u8 = 2;

/// Longest origin note in bytes (it is stored with a u16 length).
pub const ORIGIN_NOTE_BYTES_MAX: usize = 256;

/// The system stream that carries stream metadata, deletes and tombstones.
pub const STREAMS_STREAM: &str = "$sys.streams";
/// Prefix of the system streams that carry snapshots, one per source.
pub const SNAPSHOTS_PREFIX: &str = "$snapshots.";

/// Event type of a stream metadata command.
pub const TYPE_METADATA: &str = "$metadata";
/// Event type of a soft delete.
pub const TYPE_DELETED: &str = "$deleted";
/// Event type of a hard delete (tombstone).
pub const TYPE_TOMBSTONED: &str = "$tombstoned";
/// Event type of a recorded snapshot.
pub const TYPE_SNAPSHOT: &str = "$snapshot";
/// Event type of a deleted snapshot.
pub const TYPE_SNAPSHOT_DELETED: &str = "$snapshot-deleted";

/// Encodes one event at `version` of `stream`, replicated from `origin` if given.
pub fn encode_event(stream: &StreamName, version: u64, event: &NewEvent, origin: Option<&Origin>) -> Vec<u8> {
    let stream = stream.as_str().as_bytes();
    let event_type = event.event_type.as_str().as_bytes();
    let mut out = Vec::with_capacity(
        2 + 1 + stream.len() + 8 + 16 + 1 + event_type.len() + 8 + 8 + event.data.len() + event.metadata.len(),
    );
    out.push(RECORD_FORMAT);
    out.push(if origin.is_some() { KIND_REPLICA } else { KIND_EVENT });
    out.push(u8::try_from(stream.len()).expect("stream names are at most 255 bytes"));
    out.extend_from_slice(stream);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(event.id.as_bytes());
    out.push(u8::try_from(event_type.len()).expect("event types are at most 128 bytes"));
    out.extend_from_slice(event_type);
    out.extend_from_slice(&event.timestamp_ms.to_le_bytes());
    out.extend_from_slice(&u32::try_from(event.data.len()).expect("bounded by EVENT_DATA_BYTES_MAX").to_le_bytes());
    out.extend_from_slice(&event.data);
    out.extend_from_slice(&u32::try_from(event.metadata.len()).expect("bounded by the limits").to_le_bytes());
    out.extend_from_slice(&event.metadata);
    if let Some(origin) = origin {
        for (i, name) in [&origin.site, &origin.via].into_iter().enumerate() {
            out.push(u8::try_from(name.as_str().len()).expect("site names are at most 32 bytes"));
            out.extend_from_slice(name.as_str().as_bytes());
            if i == 0 {
                out.extend_from_slice(&origin.position.to_le_bytes());
            }
        }
        let note = &origin.note.as_bytes()[..origin.note.len().min(ORIGIN_NOTE_BYTES_MAX)];
        out.extend_from_slice(&u16::try_from(note.len()).expect("bounded").to_le_bytes());
        out.extend_from_slice(note);
    }
    out
}

/// Why a record could not be decoded. The log checksums every record, so
/// this means a bug or a record written by a newer format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record at position {position} cannot be decoded: {reason}")]
pub struct DecodeError {
    /// Position of the record.
    pub position: u64,
    /// What is wrong.
    pub reason: String,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    position: u64,
}

impl<'a> Reader<'a> {
    fn fail(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError { position: self.position, reason: reason.into() }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.bytes.len());
        let Some(end) = end else { return Err(self.fail(format!("truncated at byte {}", self.at))) };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn str(&mut self, len: usize) -> Result<&'a str, DecodeError> {
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| self.fail("name is not UTF-8"))
    }
}

/// Decodes the record at `position`.
pub fn decode_event(bytes: &[u8], position: u64) -> Result<RecordedEvent, DecodeError> {
    let mut r = Reader { bytes, at: 0, position };
    let format = r.u8()?;
    if format != RECORD_FORMAT {
        return Err(r.fail(format!("unknown record format {format}")));
    }
    let kind = r.u8()?;
    if kind != KIND_EVENT && kind != KIND_REPLICA {
        return Err(r.fail(format!("unknown record kind {kind}")));
    }
    let stream_len = r.u8()? as usize;
    let stream = StreamName::system(r.str(stream_len)?).map_err(|e| r.fail(e.to_string()))?;
    let version = r.u64()?;
    let id = EventId::from_bytes(r.take(16)?.try_into().expect("16 bytes"));
    let type_len = r.u8()? as usize;
    let event_type = EventType::new(r.str(type_len)?).map_err(|e| r.fail(e.to_string()))?;
    let timestamp_ms = r.u64()?;
    let data_len = r.u32()? as usize;
    let data = r.take(data_len)?.to_vec();
    let metadata_len = r.u32()? as usize;
    let metadata = r.take(metadata_len)?.to_vec();
    let origin = if kind == KIND_REPLICA {
        let site_len = r.u8()? as usize;
        let site = SiteName::new(r.str(site_len)?).map_err(|e| r.fail(e.to_string()))?;
        let position = r.u64()?;
        let via_len = r.u8()? as usize;
        let via = SiteName::new(r.str(via_len)?).map_err(|e| r.fail(e.to_string()))?;
        let note_len = usize::from(r.u16()?);
        let note = r.str(note_len)?.to_owned();
        Some(Origin { site, position, via, note })
    } else {
        None
    };
    if r.at != bytes.len() {
        return Err(r.fail("trailing bytes"));
    }
    Ok(RecordedEvent { stream, version, position, id, event_type, data, metadata, timestamp_ms, origin })
}

/// Retention settings of one stream. Reads honour them at once; space is
/// reclaimed later, a whole segment at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StreamMetadata {
    /// Events older than this many milliseconds are not returned.
    pub max_age_ms: Option<u64>,
    /// Only the newest `max_count` events are returned.
    pub max_count: Option<u64>,
    /// Events with a lower version are not returned.
    pub truncate_before: Option<u64>,
}

/// A system command, carried as the data of an event in a system stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Set the metadata of `stream`.
    Metadata { stream: StreamName, metadata: StreamMetadata },
    /// Soft-delete `stream`: versions below `truncate_before` are gone.
    Deleted { stream: StreamName, truncate_before: u64 },
    /// Hard-delete `stream` forever.
    Tombstoned { stream: StreamName },
    /// A snapshot of `stream` at `version` (the state bytes follow).
    Snapshot { stream: StreamName, version: u64, state: Vec<u8> },
    /// The snapshot of `stream` at `version` is deleted.
    SnapshotDeleted { stream: StreamName, version: u64 },
}

fn push_name(out: &mut Vec<u8>, name: &StreamName) {
    out.push(u8::try_from(name.as_str().len()).expect("stream names are at most 255 bytes"));
    out.extend_from_slice(name.as_str().as_bytes());
}

fn push_option(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        None => out.push(0),
    }
}

impl Command {
    /// The event type that carries this command.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Metadata { .. } => TYPE_METADATA,
            Self::Deleted { .. } => TYPE_DELETED,
            Self::Tombstoned { .. } => TYPE_TOMBSTONED,
            Self::Snapshot { .. } => TYPE_SNAPSHOT,
            Self::SnapshotDeleted { .. } => TYPE_SNAPSHOT_DELETED,
        }
    }

    /// The event data that carries this command.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Metadata { stream, metadata } => {
                push_name(&mut out, stream);
                push_option(&mut out, metadata.max_age_ms);
                push_option(&mut out, metadata.max_count);
                push_option(&mut out, metadata.truncate_before);
            }
            Self::Deleted { stream, truncate_before } => {
                push_name(&mut out, stream);
                out.extend_from_slice(&truncate_before.to_le_bytes());
            }
            Self::Tombstoned { stream } => push_name(&mut out, stream),
            Self::Snapshot { stream, version, state } => {
                push_name(&mut out, stream);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(state);
            }
            Self::SnapshotDeleted { stream, version } => {
                push_name(&mut out, stream);
                out.extend_from_slice(&version.to_le_bytes());
            }
        }
        out
    }

    /// Decodes the command carried by `event`, if `event` is in a system
    /// stream and of a command type; `Ok(None)` for ordinary events.
    pub fn decode(event: &RecordedEvent) -> Result<Option<Self>, DecodeError> {
        let stream = event.stream.as_str();
        if !(stream == STREAMS_STREAM || stream.starts_with(SNAPSHOTS_PREFIX)) {
            return Ok(None);
        }
        let mut r = Reader { bytes: &event.data, at: 0, position: event.position };
        let name = |r: &mut Reader<'_>| -> Result<StreamName, DecodeError> {
            let len = r.u8()? as usize;
            let text = r.str(len)?;
            StreamName::new(text).map_err(|e| r.fail(e.to_string()))
        };
        let option = |r: &mut Reader<'_>| -> Result<Option<u64>, DecodeError> {
            match r.u8()? {
                0 => Ok(None),
                1 => Ok(Some(r.u64()?)),
                other => Err(r.fail(format!("bad option tag {other}"))),
            }
        };
        let command = match event.event_type.as_str() {
            TYPE_METADATA => Self::Metadata {
                stream: name(&mut r)?,
                metadata: StreamMetadata {
                    max_age_ms: option(&mut r)?,
                    max_count: option(&mut r)?,
                    truncate_before: option(&mut r)?,
                },
            },
            TYPE_DELETED => Self::Deleted { stream: name(&mut r)?, truncate_before: r.u64()? },
            TYPE_TOMBSTONED => Self::Tombstoned { stream: name(&mut r)? },
            TYPE_SNAPSHOT => {
                let stream = name(&mut r)?;
                let version = r.u64()?;
                let state = r.bytes[r.at..].to_vec();
                r.at = r.bytes.len();
                Self::Snapshot { stream, version, state }
            }
            TYPE_SNAPSHOT_DELETED => Self::SnapshotDeleted { stream: name(&mut r)?, version: r.u64()? },
            _ => return Ok(None),
        };
        if r.at != event.data.len() {
            return Err(r.fail("trailing bytes in command"));
        }
        Ok(Some(command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trips() {
        let event = NewEvent {
            id: EventId::from_u128(7),
            event_type: EventType::new("OrderPlaced").unwrap(),
            data: b"{\"a\":1}".to_vec(),
            metadata: b"m".to_vec(),
            timestamp_ms: 1234,
        };
        let stream = StreamName::new("orders.eu.o-1").unwrap();
        let bytes = encode_event(&stream, 3, &event, None);
        let back = decode_event(&bytes, 99).unwrap();
        assert_eq!(back, RecordedEvent::new(stream, 3, 99, event));
        for cut in 0..bytes.len() {
            assert!(decode_event(&bytes[..cut], 0).is_err(), "cut at {cut} must fail");
        }
    }
}
