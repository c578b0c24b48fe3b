//! Self-describing, self-checking record payloads for the log crash test.
//!
//! The crash child cannot know a record's position before the log assigns
//! it, so each payload says who wrote it instead: the round (child process),
//! the appending thread, that thread's append sequence number, the record's
//! index in its atomic group and the group's size. The body is a pseudo-random
//! stream derived from exactly those fields, and a checksum of everything
//! before it ends the payload. The parent can therefore tell a whole record
//! the child wrote from torn, stale or foreign bytes, and compare an
//! acknowledged record byte for byte through its checksum.
//!
//! Layout, little-endian: `magic u32, round u32, thread u32, seq u64,
//! index u16, count u16, body_len u32, body, checksum u64`.

/// Segment size of the crash test's log: small, so that rolls and removals
/// happen while the parent kills.
pub const SEGMENT_BYTES: u64 = 64 * 1024;
/// The crash child removes whole segments that lie entirely more than this
/// many records below the end, so crashes also hit removal and the log stays small.
pub const KEEP_RECORDS: u64 = 3_000;

/// First bytes of every crash-test payload.
pub const MAGIC: u32 = 0x5243_4245; // "EBCR"
/// Bytes of a payload around its body.
pub const OVERHEAD_BYTES: usize = 4 + 4 + 4 + 8 + 2 + 2 + 4 + 8;

/// Who wrote a record, and where it sits in its atomic group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId {
    /// The child process (one per round) that appended it.
    pub round: u32,
    /// The appending thread within that child.
    pub thread: u32,
    /// The thread's append sequence number within the round.
    pub seq: u64,
    /// Index of the record within its atomic group.
    pub index: u16,
    /// Number of records in the atomic group.
    pub count: u16,
}

impl RecordId {
    /// The same append, another record of it.
    pub fn with_index(self, index: u16) -> Self {
        Self { index, ..self }
    }

    /// Whether `other` belongs to the same atomic append.
    pub fn same_group(&self, other: &Self) -> bool {
        (self.round, self.thread, self.seq, self.count) == (other.round, other.thread, other.seq, other.count)
    }
}

/// A decoded payload: who wrote it and its checksum (which stands for its bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Who wrote it.
    pub id: RecordId,
    /// The payload's trailing checksum.
    pub checksum: u64,
}

/// FNV-1a, 64 bit: small, dependency-free and good enough to tell bytes apart.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn body_seed(id: &RecordId, body_len: u32) -> u64 {
    let mut seed = u64::from(id.round) << 32 | u64::from(id.thread);
    seed ^= id.seq.rotate_left(17);
    seed ^= u64::from(id.index) << 48 | u64::from(id.count) << 32 | u64::from(body_len);
    splitmix64(&mut seed)
}

fn push_body(out: &mut Vec<u8>, id: &RecordId, body_len: u32) {
    let mut state = body_seed(id, body_len);
    let mut left = body_len as usize;
    while left > 0 {
        let word = splitmix64(&mut state).to_le_bytes();
        let take = left.min(word.len());
        out.extend_from_slice(&word[..take]);
        left -= take;
    }
}

/// The payload of record `id` with a body of `body_len` bytes.
pub fn encode(id: RecordId, body_len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD_BYTES + body_len as usize);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&id.round.to_le_bytes());
    out.extend_from_slice(&id.thread.to_le_bytes());
    out.extend_from_slice(&id.seq.to_le_bytes());
    out.extend_from_slice(&id.index.to_le_bytes());
    out.extend_from_slice(&id.count.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    push_body(&mut out, &id, body_len);
    let checksum = fnv1a64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// Checks that `payload` is exactly what [`encode`] produces for the id and
/// body length it claims, and returns them; the error says what is wrong.
pub fn decode(payload: &[u8]) -> Result<Decoded, String> {
    if payload.len() < OVERHEAD_BYTES {
        return Err(format!("payload of {} bytes is shorter than the {OVERHEAD_BYTES}-byte frame", payload.len()));
    }
    let u16_at = |at: usize| u16::from_le_bytes(payload[at..at + 2].try_into().expect("2 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(0) != MAGIC {
        return Err(format!("bad magic {:#010x}", u32_at(0)));
    }
    let id = RecordId { round: u32_at(4), thread: u32_at(8), seq: u64_at(12), index: u16_at(20), count: u16_at(22) };
    let body_len = u32_at(24);
    if payload.len() != OVERHEAD_BYTES + body_len as usize {
        return Err(format!("{id:?}: payload is {} bytes but claims a body of {body_len}", payload.len()));
    }
    if id.count == 0 || id.index >= id.count {
        return Err(format!("{id:?}: index outside its group"));
    }
    let expected = encode(id, body_len);
    if expected != payload {
        let at = expected.iter().zip(payload).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!("{id:?}: payload differs from what the child wrote at byte {at}"));
    }
    Ok(Decoded { id, checksum: u64_at(payload.len() - 8) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_any_flipped_bit() {
        let id = RecordId { round: 3, thread: 2, seq: 77, index: 1, count: 3 };
        let bytes = encode(id, 45);
        assert_eq!(bytes.len(), OVERHEAD_BYTES + 45);
        assert_eq!(decode(&bytes).map(|d| d.id), Ok(id));
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&damaged).is_err(), "bit {bit} flip undetected");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert_ne!(encode(id.with_index(2), 45)[28..], bytes[28..], "bodies differ between records");
    }
}
