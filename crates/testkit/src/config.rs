//! What a link emulates: [`LinkConfig`] (bandwidth, latency, jitter, stalls,
//! pipe buffer) and its validation.

use std::time::Duration;

use crate::limits::{BANDWIDTH_BPS_MIN, BUFFER_BYTES_DEFAULT, BUFFER_BYTES_MAX, STALL_EVERY_MIN};

/// The behaviour of an emulated WAN link. The same settings apply to each
/// direction, and each direction is a pipe of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Bits per second per direction; `None` is unlimited. The rate is
    /// shared by every connection through the link in that direction (the
    /// link models one pipe), not given to each connection.
    pub bandwidth_bps: Option<u64>,
    /// One-way delay added to every byte in each direction (a round trip
    /// takes at least twice this).
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..jitter` for each piece read;
    /// bytes of one connection are never reordered by it (a piece is never
    /// released before the previous piece of its connection).
    pub jitter: Duration,
    /// Loss as stalls: TCP retransmissions turn loss into pauses, during
    /// which the direction's pipe delivers nothing.
    pub stall: Option<Stall>,
    /// Bytes held in one direction's pipe (read from senders and not yet
    /// due for delivery, all connections together) before the proxy stops
    /// reading from senders, so that TCP backpressure reaches them. To reach
    /// the full bandwidth it must hold the bandwidth-delay product.
    pub buffer_bytes: usize,
}

impl Default for LinkConfig {
    /// A transparent link: unlimited, no delay, no stalls, the default buffer.
    fn default() -> Self {
        LinkConfig {
            bandwidth_bps: None,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            stall: None,
            buffer_bytes: BUFFER_BYTES_DEFAULT,
        }
    }
}

/// Recurring stalls of one direction's pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// Mean time from the end of one stall to the start of the next; the
    /// intervals are drawn from an exponential distribution with this mean.
    pub every: Duration,
    /// How long each stall lasts.
    pub duration: Duration,
}

/// Why a [`LinkConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkConfigError {
    /// `bandwidth_bps` is below [`BANDWIDTH_BPS_MIN`].
    #[error("bandwidth_bps {bandwidth_bps} is below the minimum {min}", min = BANDWIDTH_BPS_MIN)]
    BandwidthTooLow {
        /// The refused rate.
        bandwidth_bps: u64,
    },
    /// `buffer_bytes` is zero or above [`BUFFER_BYTES_MAX`].
    #[error("buffer_bytes {buffer_bytes} is outside 1..={max}", max = BUFFER_BYTES_MAX)]
    BufferOutOfRange {
        /// The refused size.
        buffer_bytes: usize,
    },
    /// `stall.every` is below [`STALL_EVERY_MIN`].
    #[error("stall.every {every:?} is below the minimum {min:?}", min = STALL_EVERY_MIN)]
    StallTooFrequent {
        /// The refused interval.
        every: Duration,
    },
}

impl LinkConfig {
    /// Checks every field against the limits in [`crate::limits`].
    pub fn validate(&self) -> Result<(), LinkConfigError> {
        if let Some(bandwidth_bps) = self.bandwidth_bps
            && bandwidth_bps < BANDWIDTH_BPS_MIN
        {
            return Err(LinkConfigError::BandwidthTooLow { bandwidth_bps });
        }
        if self.buffer_bytes == 0 || self.buffer_bytes > BUFFER_BYTES_MAX {
            return Err(LinkConfigError::BufferOutOfRange { buffer_bytes: self.buffer_bytes });
        }
        if let Some(stall) = self.stall
            && stall.every < STALL_EVERY_MIN
        {
            return Err(LinkConfigError::StallTooFrequent { every: stall.every });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_transparent() {
        let config = LinkConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.bandwidth_bps, None);
        assert_eq!(config.latency, Duration::ZERO);
        assert_eq!(config.stall, None);
    }

    #[test]
    fn validate_refuses_out_of_range_fields() {
        let slow = LinkConfig { bandwidth_bps: Some(BANDWIDTH_BPS_MIN - 1), ..LinkConfig::default() };
        assert!(matches!(slow.validate(), Err(LinkConfigError::BandwidthTooLow { .. })));
        let empty = LinkConfig { buffer_bytes: 0, ..LinkConfig::default() };
        assert!(matches!(empty.validate(), Err(LinkConfigError::BufferOutOfRange { .. })));
        let huge = LinkConfig { buffer_bytes: BUFFER_BYTES_MAX + 1, ..LinkConfig::default() };
        assert!(matches!(huge.validate(), Err(LinkConfigError::BufferOutOfRange { .. })));
        let frantic = LinkConfig {
            stall: Some(Stall { every: Duration::from_micros(10), duration: Duration::from_millis(1) }),
            ..LinkConfig::default()
        };
        assert!(matches!(frantic.validate(), Err(LinkConfigError::StallTooFrequent { .. })));
    }
}
