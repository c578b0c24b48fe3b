//! The on-disk format, byte by byte (`docs/log-format.md` is the prose
//! version): segment headers, record frames and sealed-segment index files.
//!
//! Every integer is little-endian. Frames start at 8-byte aligned offsets.

use edgebus_types::limits::{LOG_FRAME_ALIGN_BYTES, LOG_FRAME_OVERHEAD_BYTES, LOG_SEGMENT_HEADER_BYTES};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"EBLOGSG1";
/// First bytes of every sealed-segment index file.
pub const INDEX_MAGIC: [u8; 8] = *b"EBLOGIX1";
/// Version of the segment and frame format written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the marker file that says a directory holds an edgebus log.
pub const MARKER_FILE: &str = "EDGEBUS-LOG";
/// Contents of the marker file.
pub const MARKER_CONTENTS: &[u8] = b"edgebus log\nformat 1\n";
/// Name of the lock file that keeps two processes from opening one log.
pub const LOCK_FILE: &str = "LOCK";
/// File name suffix of segments.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// File name suffix of sealed-segment index files.
pub const INDEX_SUFFIX: &str = ".idx";

/// Frame flag: the last record of an atomic append (group).
pub const FLAG_GROUP_END: u16 = 1;
/// Frame flag: the last record of one `write` call (a write batch).
pub const FLAG_BATCH_END: u16 = 2;
const FLAGS_KNOWN: u16 = FLAG_GROUP_END | FLAG_BATCH_END;

/// Bytes of the frame header that follows `[len][crc]`.
pub const RECORD_HEADER_BYTES: u64 = 16;
const PREFIX_BYTES: usize = 8;
const _: () = assert!(PREFIX_BYTES as u64 + RECORD_HEADER_BYTES == LOG_FRAME_OVERHEAD_BYTES);

/// File name of the segment whose first record is at `base_position`.
pub fn segment_file_name(base_position: u64) -> String {
    format!("{base_position:020}{SEGMENT_SUFFIX}")
}

/// File name of the index of the segment whose first record is at `base_position`.
pub fn index_file_name(base_position: u64) -> String {
    format!("{base_position:020}{INDEX_SUFFIX}")
}

/// Parses `00000000000000000042.seg` into 42.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Rounds `n` up to the frame alignment.
pub const fn align_up(n: u64) -> u64 {
    n.div_ceil(LOG_FRAME_ALIGN_BYTES) * LOG_FRAME_ALIGN_BYTES
}

/// Bytes one record of `payload_bytes` takes on disk, padding included.
pub const fn frame_bytes(payload_bytes: u64) -> u64 {
    align_up(LOG_FRAME_OVERHEAD_BYTES + payload_bytes)
}

/// Encodes a segment header for a segment starting at `base_position`.
pub fn encode_segment_header(base_position: u64) -> [u8; LOG_SEGMENT_HEADER_BYTES as usize] {
    let mut header = [0u8; LOG_SEGMENT_HEADER_BYTES as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 12..16 reserved (zero)
    header[16..24].copy_from_slice(&base_position.to_le_bytes());
    // 24..28 reserved (zero)
    let crc = crc32c::crc32c(&header[0..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Why a segment header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentHeaderError {
    /// Fewer than 32 bytes.
    Short,
    /// Wrong magic: not an edgebus segment.
    Magic,
    /// The header checksum does not match.
    Checksum,
    /// A format version this code cannot read.
    Version(u32),
}

/// Decodes a segment header, returning its base position.
pub fn decode_segment_header(bytes: &[u8]) -> Result<u64, SegmentHeaderError> {
    if bytes.len() < LOG_SEGMENT_HEADER_BYTES as usize {
        return Err(SegmentHeaderError::Short);
    }
    if bytes[0..8] != SEGMENT_MAGIC {
        return Err(SegmentHeaderError::Magic);
    }
    let crc = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
    if crc32c::crc32c(&bytes[0..28]) != crc {
        return Err(SegmentHeaderError::Checksum);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SegmentHeaderError::Version(version));
    }
    Ok(u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")))
}

/// Appends one frame to `buf` with a zero checksum; [`seal_frame`] fills it in
/// once the flags are final. Returns the frame's offset in `buf`.
pub fn push_frame(buf: &mut Vec<u8>, position: u64, flags: u16, batch_delta: u32, payload: &[u8]) -> usize {
    debug_assert_eq!(flags & !FLAGS_KNOWN, 0);
    let start = buf.len();
    let len = RECORD_HEADER_BYTES + payload.len() as u64;
    let len = u32::try_from(len).expect("record size is bounded by the limits");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&position.to_le_bytes());
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&[0u8; 2]);
    buf.extend_from_slice(&batch_delta.to_le_bytes());
    buf.extend_from_slice(payload);
    let padded = start + frame_bytes(payload.len() as u64) as usize;
    buf.resize(padded, 0);
    start
}

/// Adds `flags` to the frame at `offset` in `buf`.
pub fn add_frame_flags(buf: &mut [u8], offset: usize, flags: u16) {
    let at = offset + PREFIX_BYTES + 8;
    let old = u16::from_le_bytes(buf[at..at + 2].try_into().expect("2 bytes"));
    buf[at..at + 2].copy_from_slice(&(old | flags).to_le_bytes());
}

/// Computes and stores the checksum of the frame at `offset` in `buf`. The
/// checksum covers the length field, the header and the payload.
pub fn seal_frame(buf: &mut [u8], offset: usize) {
    let len = u32::from_le_bytes(buf[offset..offset + 4].try_into().expect("4 bytes")) as usize;
    let crc = frame_crc(&buf[offset..offset + 4], &buf[offset + PREFIX_BYTES..offset + PREFIX_BYTES + len]);
    buf[offset + 4..offset + 8].copy_from_slice(&crc.to_le_bytes());
}

fn frame_crc(len_bytes: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_bytes), body)
}

/// A frame that passed its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Position of the record in the log.
    pub position: u64,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// `position - first position of the write batch`.
    pub batch_delta: u32,
    /// Offset of the payload relative to the frame start.
    pub payload_offset: usize,
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Whole frame length on disk, padding included.
    pub frame_len: usize,
}

impl FrameInfo {
    /// Position of the first record of the write batch this frame belongs to.
    pub fn batch_first_position(&self) -> u64 {
        self.position - u64::from(self.batch_delta)
    }
}

/// The outcome of looking at the bytes where a frame should start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameCheck {
    /// A valid frame.
    Valid(FrameInfo),
    /// The bytes end before the frame does (at end of file: a torn tail candidate).
    Incomplete,
    /// The frame is invalid; the reason is for error messages.
    Invalid(&'static str),
}

/// Checks the frame at the start of `bytes`. `record_bytes_max` bounds the
/// payload a frame may claim, so a damaged length is caught before it is trusted.
pub fn check_frame(bytes: &[u8], record_bytes_max: u64) -> FrameCheck {
    if bytes.len() < PREFIX_BYTES {
        return FrameCheck::Incomplete;
    }
    let len = u64::from(u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")));
    if len == 0 {
        return FrameCheck::Invalid("zero frame length (unwritten or zeroed bytes)");
    }
    if len < RECORD_HEADER_BYTES || len - RECORD_HEADER_BYTES > record_bytes_max {
        return FrameCheck::Invalid("frame length out of range");
    }
    let frame_len = align_up(PREFIX_BYTES as u64 + len) as usize;
    let body_end = PREFIX_BYTES + len as usize;
    if bytes.len() < body_end {
        return FrameCheck::Incomplete;
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if frame_crc(&bytes[0..4], &bytes[PREFIX_BYTES..body_end]) != crc {
        return FrameCheck::Invalid("frame checksum mismatch");
    }
    let header = &bytes[PREFIX_BYTES..PREFIX_BYTES + RECORD_HEADER_BYTES as usize];
    let position = u64::from_le_bytes(header[0..8].try_into().expect("8 bytes"));
    let flags = u16::from_le_bytes(header[8..10].try_into().expect("2 bytes"));
    let batch_delta = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    if flags & !FLAGS_KNOWN != 0 {
        return FrameCheck::Invalid("unknown frame flags");
    }
    if u64::from(batch_delta) > position {
        return FrameCheck::Invalid("batch delta larger than position");
    }
    FrameCheck::Valid(FrameInfo {
        position,
        flags,
        batch_delta,
        payload_offset: PREFIX_BYTES + RECORD_HEADER_BYTES as usize,
        payload_len: len as usize - RECORD_HEADER_BYTES as usize,
        frame_len,
    })
}

/// What a sealed segment's index file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedIndex {
    /// Position of the first record.
    pub base_position: u64,
    /// One past the position of the last record.
    pub end_position: u64,
    /// Length of the segment file in bytes.
    pub segment_bytes: u64,
    /// Sparse index: `(position, offset)` of the first record of some groups.
    pub entries: Vec<(u64, u32)>,
}

/// Encodes an index file: magic, version, base, end, bytes, count, entries, crc32c.
pub fn encode_index(index: &SealedIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + index.entries.len() * 12);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&u32::try_from(index.entries.len()).expect("bounded by segment size").to_le_bytes());
    out.extend_from_slice(&index.base_position.to_le_bytes());
    out.extend_from_slice(&index.end_position.to_le_bytes());
    out.extend_from_slice(&index.segment_bytes.to_le_bytes());
    for (position, offset) in &index.entries {
        out.extend_from_slice(&position.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes an index file; `None` if it is damaged or of another version (the
/// caller then rebuilds it by scanning the segment).
pub fn decode_index(bytes: &[u8]) -> Option<SealedIndex> {
    if bytes.len() < 44 || bytes[0..8] != INDEX_MAGIC {
        return None;
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    if u32::from_le_bytes(body[8..12].try_into().ok()?) != FORMAT_VERSION {
        return None;
    }
    let count = u32::from_le_bytes(body[12..16].try_into().ok()?) as usize;
    if body.len() != 40 + count * 12 {
        return None;
    }
    let base_position = u64::from_le_bytes(body[16..24].try_into().ok()?);
    let end_position = u64::from_le_bytes(body[24..32].try_into().ok()?);
    let segment_bytes = u64::from_le_bytes(body[32..40].try_into().ok()?);
    let entries = body[40..]
        .chunks_exact(12)
        .map(|c| {
            let position = u64::from_le_bytes(c[0..8].try_into().expect("8 bytes"));
            let offset = u32::from_le_bytes(c[8..12].try_into().expect("4 bytes"));
            (position, offset)
        })
        .collect();
    Some(SealedIndex { base_position, end_position, segment_bytes, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_and_detects_every_flipped_bit() {
        let mut buf = Vec::new();
        let at = push_frame(&mut buf, 42, FLAG_GROUP_END, 2, b"hello");
        add_frame_flags(&mut buf, at, FLAG_BATCH_END);
        seal_frame(&mut buf, at);
        assert_eq!(buf.len() % 8, 0);
        let FrameCheck::Valid(info) = check_frame(&buf, 1024) else { panic!("frame must be valid") };
        assert_eq!(info.position, 42);
        assert_eq!(info.flags, FLAG_GROUP_END | FLAG_BATCH_END);
        assert_eq!(info.batch_first_position(), 40);
        assert_eq!(&buf[info.payload_offset..info.payload_offset + info.payload_len], b"hello");
        let body_bits = (8 + 16 + 5) * 8;
        for bit in 0..body_bits {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(!matches!(check_frame(&damaged, 1024), FrameCheck::Valid(_)), "bit {bit} flip undetected");
        }
    }

    #[test]
    fn short_frame_is_incomplete_not_invalid() {
        let mut buf = Vec::new();
        let at = push_frame(&mut buf, 0, FLAG_GROUP_END, 0, &[7u8; 100]);
        seal_frame(&mut buf, at);
        for cut in [0, 3, 8, 50, 123] {
            assert_eq!(check_frame(&buf[..cut], 1024), FrameCheck::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn segment_header_and_index_round_trip() {
        let header = encode_segment_header(77);
        assert_eq!(decode_segment_header(&header), Ok(77));
        let mut bad = header;
        bad[17] ^= 1;
        assert_eq!(decode_segment_header(&bad), Err(SegmentHeaderError::Checksum));
        let index =
            SealedIndex { base_position: 5, end_position: 90, segment_bytes: 4096, entries: vec![(5, 32), (40, 2000)] };
        let bytes = encode_index(&index);
        assert_eq!(decode_index(&bytes), Some(index));
        assert_eq!(decode_index(&bytes[..bytes.len() - 1]), None);
        assert_eq!(parse_segment_file_name(&segment_file_name(123)), Some(123));
        assert_eq!(parse_segment_file_name("123.seg"), None);
    }
}
