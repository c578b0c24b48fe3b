//! A fixed-size latency histogram: log-linear buckets with 64 steps per
//! power of two, so any recorded value is reported within 1.6 % and memory
//! stays the same however many samples a benchmark takes.

use std::time::Duration;

/// Steps per power of two; a value is kept to within `1 / SUB_BUCKETS`.
const SUB_BUCKETS: u64 = 64;
const SUB_BUCKET_BITS: u32 = SUB_BUCKETS.trailing_zeros();
/// Values at or above this many nanoseconds (about 73 minutes) are counted in the last bucket.
const VALUE_NS_MAX: u64 = (1 << 42) - 1;
const BUCKETS: usize = bucket_of(VALUE_NS_MAX) + 1;

const _: () = assert!(SUB_BUCKETS.is_power_of_two());
const _: () = assert!(BUCKETS < 4096, "the histogram stays small enough to keep one per thread");

const fn bucket_of(value_ns: u64) -> usize {
    let value_ns = if value_ns > VALUE_NS_MAX { VALUE_NS_MAX } else { value_ns };
    let significant_bits = u64::BITS - value_ns.leading_zeros();
    let shift = significant_bits.saturating_sub(SUB_BUCKET_BITS + 1);
    (shift as u64 * SUB_BUCKETS + (value_ns >> shift)) as usize
}

/// The smallest and largest value that land in `bucket`.
fn bucket_bounds(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < 2 * SUB_BUCKETS {
        return (bucket, bucket);
    }
    let shift = bucket / SUB_BUCKETS - 1;
    let mantissa = bucket - shift * SUB_BUCKETS;
    (mantissa << shift, ((mantissa + 1) << shift) - 1)
}

/// Counts of durations, in nanoseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    samples: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: Box::new([0; BUCKETS]), samples: 0 }
    }
}

impl Histogram {
    /// Counts one sample.
    pub fn record(&mut self, value: Duration) {
        let value_ns = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(value_ns)] += 1;
        self.samples += 1;
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.samples += other.samples;
    }

    /// Samples counted.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The value at `quantile` (0.0..=1.0) as the middle of its bucket, or
    /// `None` when nothing was recorded.
    pub fn quantile(&self, quantile: f64) -> Option<Duration> {
        assert!((0.0..=1.0).contains(&quantile), "quantile {quantile} is outside 0..=1");
        if self.samples == 0 {
            return None;
        }
        // The rank of the sample asked for, 1-based: the p50 of 4 samples is the 2nd.
        let rank = ((quantile * self.samples as f64).ceil() as u64).clamp(1, self.samples);
        let mut seen = 0u64;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, high) = bucket_bounds(bucket);
                return Some(Duration::from_nanos(low + (high - low) / 2));
            }
        }
        unreachable!("the counts add up to the number of samples")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_and_within_the_precision() {
        let mut previous = 0usize;
        for value in (0..100_000u64).chain([1 << 20, (1 << 30) + 12_345, VALUE_NS_MAX]) {
            let bucket = bucket_of(value);
            assert!(bucket >= previous, "buckets grow with the value");
            previous = bucket;
            let (low, high) = bucket_bounds(bucket);
            assert!(low <= value, "value {value} is below its bucket {low}..={high}");
            assert!(value <= high, "value {value} is above its bucket {low}..={high}");
            assert!((high - low) as f64 <= value as f64 / SUB_BUCKETS as f64, "bucket {low}..={high} is too wide");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_pick_the_ranked_sample() {
        let mut histogram = Histogram::default();
        assert_eq!(histogram.quantile(0.5), None);
        for micros in 1..=100u64 {
            histogram.record(Duration::from_micros(micros));
        }
        let mut other = Histogram::default();
        other.record(Duration::from_secs(10));
        histogram.merge(&other);
        assert_eq!(histogram.samples(), 101);
        let p50 = histogram.quantile(0.5).expect("samples").as_nanos() as f64;
        assert!((p50 - 51_000.0).abs() <= 51_000.0 / 64.0, "p50 {p50}");
        let p99 = histogram.quantile(0.99).expect("samples").as_nanos() as f64;
        assert!((p99 - 100_000.0).abs() <= 100_000.0 / 64.0, "p99 {p99}");
        let max = histogram.quantile(1.0).expect("samples").as_secs_f64();
        assert!((max - 10.0).abs() <= 10.0 / 64.0, "max {max}");
    }
}
