//! Reading frames out of one segment file: the chunked scanner shared by
//! reads, verification and recovery, and the per-segment metadata readers use.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use edgebus_types::limits::{LOG_FRAME_ALIGN_BYTES, LOG_READ_CHUNK_BYTES};

use crate::error::IoFailure;
use crate::format::{self, FrameCheck, FrameInfo};
use crate::storage::{StorageFile, read_exact_at};

/// One segment as readers see it. The writer updates `end_position`,
/// `valid_bytes` and `index` of the active segment as batches land; readers
/// never read past the log's visible end, so they cannot see a record early.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    pub(crate) base_position: u64,
    pub(crate) end_position: u64,
    pub(crate) valid_bytes: u64,
    pub(crate) file: Arc<dyn StorageFile>,
    pub(crate) path: Arc<Path>,
    /// Sparse `(position, offset)` entries at group starts, ascending.
    pub(crate) index: Vec<(u64, u32)>,
    pub(crate) sealed: bool,
}

impl SegmentMeta {
    /// Offset of the last indexed group start at or before `position`, and its position.
    pub(crate) fn seek(&self, position: u64) -> (u64, u64) {
        let at = self.index.partition_point(|(p, _)| *p <= position);
        if at == 0 {
            (self.base_position, edgebus_types::limits::LOG_SEGMENT_HEADER_BYTES)
        } else {
            let (p, o) = self.index[at - 1];
            (p, u64::from(o))
        }
    }
}

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanStop {
    /// The callback asked to stop before the frame at this offset.
    Stopped { offset: u64 },
    /// Reached `end_offset` cleanly.
    End { offset: u64 },
    /// The frame at `offset` is bad; `incomplete` if it runs past `end_offset`.
    Bad { offset: u64, reason: &'static str, incomplete: bool },
}

/// A frame handed to a scan callback.
#[derive(Debug)]
pub(crate) struct ScannedFrame<'a> {
    pub(crate) info: FrameInfo,
    pub(crate) offset: u64,
    chunk: &'a Bytes,
    at: usize,
}

impl ScannedFrame<'_> {
    /// The payload, sharing the chunk's memory.
    pub(crate) fn payload(&self) -> Bytes {
        let start = self.at + self.info.payload_offset;
        self.chunk.slice(start..start + self.info.payload_len)
    }
}

fn read_failure(path: &Path, offset: u64, source: std::io::Error) -> IoFailure {
    IoFailure { op: "read", file: path.to_path_buf(), offset, source }
}

/// Reads `len` bytes at `offset`.
pub(crate) fn read_chunk(file: &dyn StorageFile, path: &Path, offset: u64, len: usize) -> Result<Bytes, IoFailure> {
    let mut buf = BytesMut::zeroed(len);
    read_exact_at(file, &mut buf, offset).map_err(|e| read_failure(path, offset, e))?;
    Ok(buf.freeze())
}

/// Walks frames from `start_offset` (a frame boundary) up to `end_offset`,
/// calling `on_frame` for each valid one until it returns `false`.
pub(crate) fn scan(
    file: &dyn StorageFile,
    path: &Path,
    start_offset: u64,
    end_offset: u64,
    record_bytes_max: u64,
    mut on_frame: impl FnMut(&ScannedFrame<'_>) -> bool,
) -> Result<ScanStop, IoFailure> {
    let mut offset = start_offset;
    let mut chunk = Bytes::new();
    let mut chunk_offset = start_offset;
    loop {
        if offset >= end_offset {
            return Ok(ScanStop::End { offset });
        }
        let at = (offset - chunk_offset) as usize;
        if at + 8 > chunk.len() {
            if offset + 8 > end_offset {
                return Ok(ScanStop::Bad { offset, reason: "frame runs past the end", incomplete: true });
            }
            let want = LOG_READ_CHUNK_BYTES.min(end_offset - offset);
            chunk = read_chunk(file, path, offset, want as usize)?;
            chunk_offset = offset;
            continue;
        }
        let len = u64::from(u32::from_le_bytes(chunk[at..at + 4].try_into().expect("4 bytes")));
        let plausible = len >= format::RECORD_HEADER_BYTES && len - format::RECORD_HEADER_BYTES <= record_bytes_max;
        if plausible && at + 8 + len as usize > chunk.len() {
            if offset + 8 + len > end_offset {
                return Ok(ScanStop::Bad { offset, reason: "frame runs past the end", incomplete: true });
            }
            let want = (8 + len).max(LOG_READ_CHUNK_BYTES).min(end_offset - offset);
            chunk = read_chunk(file, path, offset, want as usize)?;
            chunk_offset = offset;
            continue;
        }
        match format::check_frame(&chunk[at..], record_bytes_max) {
            FrameCheck::Valid(info) => {
                let frame = ScannedFrame { info, offset, chunk: &chunk, at };
                if !on_frame(&frame) {
                    return Ok(ScanStop::Stopped { offset });
                }
                // A torn write may cut the padding of a whole frame; the next
                // frame still starts at the aligned offset.
                offset += info.frame_len as u64;
            }
            FrameCheck::Incomplete => {
                return Ok(ScanStop::Bad { offset, reason: "frame runs past the end", incomplete: true });
            }
            FrameCheck::Invalid(reason) => return Ok(ScanStop::Bad { offset, reason, incomplete: false }),
        }
    }
}

/// After a bad frame at `bad_offset`, looks for a valid frame further on that
/// belongs to a write batch other than `allowed_batches`. Finding one means a
/// later write survived while this one did not: corruption, not a torn tail.
/// Returns the offset of the first such frame.
pub(crate) fn find_later_batch(
    file: &dyn StorageFile,
    path: &Path,
    bad_offset: u64,
    end_offset: u64,
    record_bytes_max: u64,
    allowed_batches: [u64; 2],
) -> Result<Option<u64>, IoFailure> {
    let mut offset = bad_offset + LOG_FRAME_ALIGN_BYTES;
    let mut window = Bytes::new();
    let mut window_offset = offset;
    while offset + 8 <= end_offset {
        let at = (offset - window_offset) as usize;
        if at + 8 > window.len() {
            let want = LOG_READ_CHUNK_BYTES.min(end_offset - offset);
            window = read_chunk(file, path, offset, want as usize)?;
            window_offset = offset;
            continue;
        }
        let len = u64::from(u32::from_le_bytes(window[at..at + 4].try_into().expect("4 bytes")));
        let plausible = len >= format::RECORD_HEADER_BYTES && len - format::RECORD_HEADER_BYTES <= record_bytes_max;
        if plausible && offset + 8 + len <= end_offset {
            let check = if at + 8 + len as usize <= window.len() {
                format::check_frame(&window[at..], record_bytes_max)
            } else {
                let frame = read_chunk(file, path, offset, (8 + len) as usize)?;
                format::check_frame(&frame, record_bytes_max)
            };
            if let FrameCheck::Valid(info) = check {
                if !allowed_batches.contains(&info.batch_first_position()) {
                    return Ok(Some(offset));
                }
            }
        }
        offset += LOG_FRAME_ALIGN_BYTES;
    }
    Ok(None)
}
