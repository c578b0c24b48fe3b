//! XXH64 (seed 0), written out by hand so that content hashes are stable
//! across platforms, Rust versions and dependency upgrades.
//!
//! This is the published xxHash 64-bit algorithm, little-endian input reads,
//! checked against the reference test vectors below; it is not a
//! cryptographic hash.

const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

const STRIPE_BYTES: usize = 32;

/// A streaming XXH64 state: feeding the input in pieces gives the same hash
/// as feeding it at once.
#[derive(Debug, Clone)]
pub(crate) struct Xxh64 {
    accumulators: [u64; 4],
    /// Input not yet consumed as a whole stripe; `buffered < STRIPE_BYTES`.
    buffer: [u8; STRIPE_BYTES],
    buffered: usize,
    total_len: u64,
}

impl Xxh64 {
    pub(crate) fn new() -> Self {
        let seed: u64 = 0;
        Self {
            accumulators: [
                seed.wrapping_add(PRIME64_1).wrapping_add(PRIME64_2),
                seed.wrapping_add(PRIME64_2),
                seed,
                seed.wrapping_sub(PRIME64_1),
            ],
            buffer: [0; STRIPE_BYTES],
            buffered: 0,
            total_len: 0,
        }
    }

    pub(crate) fn update(&mut self, mut input: &[u8]) {
        self.total_len += input.len() as u64;
        if self.buffered > 0 {
            let take = input.len().min(STRIPE_BYTES - self.buffered);
            self.buffer[self.buffered..self.buffered + take].copy_from_slice(&input[..take]);
            self.buffered += take;
            input = &input[take..];
            if self.buffered < STRIPE_BYTES {
                return;
            }
            let stripe = self.buffer;
            self.consume_stripe(&stripe);
            self.buffered = 0;
        }
        let mut stripes = input.chunks_exact(STRIPE_BYTES);
        for stripe in &mut stripes {
            self.consume_stripe(stripe);
        }
        let rest = stripes.remainder();
        self.buffer[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    pub(crate) fn finish(&self) -> u64 {
        let [v1, v2, v3, v4] = self.accumulators;
        let mut hash = if self.total_len >= STRIPE_BYTES as u64 {
            let mut hash = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            for accumulator in self.accumulators {
                hash = merge_round(hash, accumulator);
            }
            hash
        } else {
            // The seed is 0, so the accumulators were never used.
            PRIME64_5
        };
        hash = hash.wrapping_add(self.total_len);

        let mut rest = &self.buffer[..self.buffered];
        while rest.len() >= 8 {
            hash ^= round(0, read_u64(rest));
            hash = hash.rotate_left(27).wrapping_mul(PRIME64_1).wrapping_add(PRIME64_4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            hash ^= u64::from(read_u32(rest)).wrapping_mul(PRIME64_1);
            hash = hash.rotate_left(23).wrapping_mul(PRIME64_2).wrapping_add(PRIME64_3);
            rest = &rest[4..];
        }
        for &byte in rest {
            hash ^= u64::from(byte).wrapping_mul(PRIME64_5);
            hash = hash.rotate_left(11).wrapping_mul(PRIME64_1);
        }

        hash ^= hash >> 33;
        hash = hash.wrapping_mul(PRIME64_2);
        hash ^= hash >> 29;
        hash = hash.wrapping_mul(PRIME64_3);
        hash ^ (hash >> 32)
    }

    fn consume_stripe(&mut self, stripe: &[u8]) {
        assert_eq!(stripe.len(), STRIPE_BYTES);
        for (accumulator, lane) in self.accumulators.iter_mut().zip(stripe.chunks_exact(8)) {
            *accumulator = round(*accumulator, read_u64(lane));
        }
    }
}

fn round(accumulator: u64, lane: u64) -> u64 {
    accumulator.wrapping_add(lane.wrapping_mul(PRIME64_2)).rotate_left(31).wrapping_mul(PRIME64_1)
}

fn merge_round(hash: u64, accumulator: u64) -> u64 {
    (hash ^ round(0, accumulator)).wrapping_mul(PRIME64_1).wrapping_add(PRIME64_4)
}

fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("slice of 8 bytes"))
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("slice of 4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xxh64(input: &[u8]) -> u64 {
        let mut hasher = Xxh64::new();
        hasher.update(input);
        hasher.finish()
    }

    #[test]
    fn matches_the_reference_vectors() {
        // Published XXH64 values for seed 0; the lengths cover the tail paths
        // (bytes, 4-byte and 8-byte lanes) and whole 32-byte stripes.
        let vectors: &[(&str, u64)] = &[
            ("", 0xEF46_DB37_51D8_E999),
            ("a", 0xD24E_C4F1_A98C_6E5B),
            ("abc", 0x44BC_2CF5_AD77_0999),
            ("1234", 0xD831_6E61_D84F_6BA4),
            ("12345678", 0xD2D0_2F08_CF7C_FD4A),
            ("123456789012345", 0xC377_D78A_DE00_1A3C),
            ("1234567890123456", 0xB61C_33DC_6C59_F270),
            ("1234567890123456789012345678901", 0x8F36_7CB8_73A5_376E),
            ("12345678901234567890123456789012", 0x40FD_1AA5_2D98_274C),
            ("Nobody inspects the spammish repetition", 0xFBCE_A83C_8A37_8BF1),
            ("The quick brown fox jumps over the lazy dog", 0x0B24_2D36_1FDA_71BC),
        ];
        for &(input, expected) in vectors {
            assert_eq!(xxh64(input.as_bytes()), expected, "input {input:?}");
        }
    }

    proptest! {
        #[test]
        fn pieces_hash_like_the_whole(
            input in proptest::collection::vec(any::<u8>(), 0..200),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            let mut hasher = Xxh64::new();
            let mut start = 0;
            for cut in cuts {
                hasher.update(&input[start..cut]);
                start = cut;
            }
            hasher.update(&input[start..]);
            prop_assert_eq!(hasher.finish(), xxh64(&input));
        }
    }
}
