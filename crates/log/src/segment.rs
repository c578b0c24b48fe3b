//! Reading frames out of one segment file: the chunked scanner shared by
//! reads, verification and recovery, and the per-segment metadata readers use.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use edgebus_types::limits::{LOG_FRAME_ALIGN_BYTES, LOG_READ_CHUNK_BYTES, LOG_READ_CHUNK_MIN_BYTES};

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
    /// Sparse `(position, offset)` entries at group starts, ascending: the
    /// active segment's only. A sealed segment's are in its index file,
    /// read when a reader needs them and kept in a small cache (`Log`), so
    /// that memory does not grow with the log.
    pub(crate) index: Vec<(u64, u32)>,
    pub(crate) sealed: bool,
}

/// Where to start scanning for `position` in the segment starting at
/// `base` with sparse `index`: the last indexed group start at or before
/// it, as `(position, offset)`; the segment's first record if none.
pub(crate) fn seek(index: &[(u64, u32)], base: u64, position: u64) -> (u64, u64) {
    let at = index.partition_point(|(p, _)| *p <= position);
    if at == 0 {
        (base, edgebus_types::limits::LOG_SEGMENT_HEADER_BYTES)
    } else {
        let (p, o) = index[at - 1];
        (p, u64::from(o))
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
    // Short reads (one record after an index seek) read little; long scans
    // double their chunk up to the maximum.
    let mut chunk_bytes = LOG_READ_CHUNK_MIN_BYTES / 2;
    loop {
        if offset >= end_offset {
            return Ok(ScanStop::End { offset });
        }
        let at = (offset - chunk_offset) as usize;
        if at + 8 > chunk.len() {
            if offset + 8 > end_offset {
                return Ok(ScanStop::Bad { offset, reason: "frame runs past the end", incomplete: true });
            }
            chunk_bytes = (chunk_bytes * 2).min(LOG_READ_CHUNK_BYTES);
            let want = chunk_bytes.min(end_offset - offset);
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
            chunk_bytes = (chunk_bytes * 2).min(LOG_READ_CHUNK_BYTES);
            let want = (8 + len).max(chunk_bytes).min(end_offset - offset);
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
            if let FrameCheck::Valid(info) = check
                && !allowed_batches.contains(&info.batch_first_position())
            {
                return Ok(Some(offset));
            }
        }
        offset += LOG_FRAME_ALIGN_BYTES;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use edgebus_types::limits::LOG_SEGMENT_HEADER_BYTES;

    use super::*;
    use crate::format::{FLAG_BATCH_END, FLAG_GROUP_END};

    /// A file in memory, so that scans can be tested on exact bytes.
    #[derive(Debug, Default)]
    struct MemFile(Mutex<Vec<u8>>);

    impl StorageFile for MemFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let bytes = self.0.lock().unwrap();
            let start = (offset as usize).min(bytes.len());
            let n = buf.len().min(bytes.len() - start);
            buf[..n].copy_from_slice(&bytes[start..start + n]);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let mut bytes = self.0.lock().unwrap();
            let end = offset as usize + buf.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[offset as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
    }

    const RECORD_BYTES_MAX: u64 = 1024;

    /// A segment body holding one write batch per `(first position, records)`,
    /// each a single atomic append of 20-byte payloads (48-byte frames).
    fn segment_with_batches(batches: &[(u64, u32)]) -> MemFile {
        let mut buf = vec![0u8; LOG_SEGMENT_HEADER_BYTES as usize];
        for &(first, count) in batches {
            for i in 0..count {
                let last = i + 1 == count;
                let flags = if last { FLAG_GROUP_END | FLAG_BATCH_END } else { 0 };
                let at = format::push_frame(&mut buf, first + u64::from(i), flags, i, &[i as u8; 20]);
                format::seal_frame(&mut buf, at);
            }
        }
        MemFile(Mutex::new(buf))
    }

    fn frame_offset(index: u64) -> u64 {
        LOG_SEGMENT_HEADER_BYTES + index * format::frame_bytes(20)
    }

    fn scan_all(file: &MemFile) -> (Vec<u64>, ScanStop) {
        let mut positions = Vec::new();
        let end = file.len().unwrap();
        let stop = scan(file, Path::new("mem"), LOG_SEGMENT_HEADER_BYTES, end, RECORD_BYTES_MAX, |frame| {
            positions.push(frame.info.position);
            true
        })
        .unwrap();
        (positions, stop)
    }

    #[test]
    fn scan_walks_every_frame_and_stops_cleanly_at_the_end() {
        let file = segment_with_batches(&[(10, 3), (13, 2)]);
        let (positions, stop) = scan_all(&file);
        assert_eq!(positions, [10, 11, 12, 13, 14]);
        assert_eq!(stop, ScanStop::End { offset: frame_offset(5) });
    }

    #[test]
    fn scan_tells_a_cut_frame_from_a_damaged_one() {
        let file = segment_with_batches(&[(0, 4)]);
        file.set_len(frame_offset(3) + 30).unwrap();
        let (positions, stop) = scan_all(&file);
        assert_eq!(positions, [0, 1, 2]);
        assert!(matches!(stop, ScanStop::Bad { offset, incomplete: true, .. } if offset == frame_offset(3)));

        let file = segment_with_batches(&[(0, 4)]);
        let mut byte = [0u8];
        file.read_at(&mut byte, frame_offset(1) + 30).unwrap();
        file.write_all_at(&[byte[0] ^ 0x10], frame_offset(1) + 30).unwrap();
        let (positions, stop) = scan_all(&file);
        assert_eq!(positions, [0]);
        assert_eq!(
            stop,
            ScanStop::Bad { offset: frame_offset(1), reason: "frame checksum mismatch", incomplete: false }
        );
    }

    #[test]
    fn scan_stops_when_the_callback_says_so() {
        let file = segment_with_batches(&[(0, 4)]);
        let end = file.len().unwrap();
        let stop =
            scan(&file, Path::new("mem"), LOG_SEGMENT_HEADER_BYTES, end, RECORD_BYTES_MAX, |f| f.info.position < 2)
                .unwrap();
        assert_eq!(stop, ScanStop::Stopped { offset: frame_offset(2) });
    }

    #[test]
    fn find_later_batch_ignores_the_torn_batch_and_finds_any_other() {
        // Batch 0..3 then batch 3..5; the frame at position 1 is damaged.
        let file = segment_with_batches(&[(0, 3), (3, 2)]);
        file.write_all_at(&[0xff], frame_offset(1) + 40).unwrap();
        let end = file.len().unwrap();
        let later =
            |allowed| find_later_batch(&file, Path::new("mem"), frame_offset(1), end, RECORD_BYTES_MAX, allowed);
        // Frames of the damaged batch itself (or of the batch it might have
        // started) prove nothing; a frame of batch 3 proves a later write survived.
        assert_eq!(later([0, 1]).unwrap(), Some(frame_offset(3)));
        assert_eq!(later([0, 3]).unwrap(), None);
    }
}
