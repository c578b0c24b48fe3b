//! Log settings: the fsync policy and the limits, with their defaults from
//! `edgebus_types::limits` and validation that names the offending field.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use edgebus_types::limits::*;

use crate::format::frame_bytes;

/// When the log calls `fdatasync`, and so what an acknowledgement promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Every append is acknowledged only after its batch was written and
    /// `fdatasync` returned: an acknowledged record survives power loss.
    #[default]
    Always,
    /// Appends are acknowledged once written to the OS; `fdatasync` runs at
    /// least this often while there is unsynced data. An acknowledged record
    /// survives a process crash; a power loss may lose up to this much.
    Interval(Duration),
    /// Appends are acknowledged once written to the OS; `fdatasync` only when
    /// a segment is sealed and on close. Survives a process crash only.
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Interval(d) => write!(f, "interval({}ms)", d.as_millis()),
            Self::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Accepts `always`, `never`, `interval(100ms)`, `interval:100ms` and `interval:100`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "always" => return Ok(Self::Always),
            "never" => return Ok(Self::Never),
            _ => {}
        }
        let inner = s
            .strip_prefix("interval(")
            .and_then(|r| r.strip_suffix(')'))
            .or_else(|| s.strip_prefix("interval:"))
            .ok_or_else(|| format!("unknown fsync policy {s:?}: expected always, never or interval(MSms)"))?;
        let digits = inner.strip_suffix("ms").unwrap_or(inner);
        let ms: u64 =
            digits.parse().map_err(|_| format!("fsync interval {inner:?} is not a number of milliseconds"))?;
        if ms == 0 {
            return Err("fsync interval must be at least 1ms (use always for every batch)".to_owned());
        }
        Ok(Self::Interval(Duration::from_millis(ms)))
    }
}

/// Settings of one log. `LogConfig::default()` is what a node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// When to `fdatasync`.
    pub fsync: FsyncPolicy,
    /// Segment size at which the log rolls to a new file.
    pub segment_bytes: u64,
    /// Largest payload of one record.
    pub record_bytes_max: u64,
    /// Largest atomic append, frames and padding included.
    pub append_bytes_max: u64,
    /// Largest number of records in one atomic append.
    pub append_records_max: u32,
    /// Bytes of payload that may wait to be written.
    pub queue_bytes_max: u64,
    /// Appends that may wait to be written.
    pub queue_appends_max: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            segment_bytes: LOG_SEGMENT_BYTES_DEFAULT,
            record_bytes_max: LOG_RECORD_BYTES_DEFAULT,
            append_bytes_max: LOG_APPEND_BYTES_DEFAULT,
            append_records_max: LOG_APPEND_RECORDS_DEFAULT,
            queue_bytes_max: LOG_QUEUE_BYTES_DEFAULT,
            queue_appends_max: LOG_QUEUE_APPENDS_DEFAULT,
        }
    }
}

impl LogConfig {
    /// A configuration with small segments, for tests that want many rolls.
    pub fn small_segments(segment_bytes: u64) -> Self {
        let append_bytes_max = segment_bytes - LOG_SEGMENT_HEADER_BYTES;
        let record_bytes_max = append_bytes_max - LOG_FRAME_OVERHEAD_BYTES - LOG_FRAME_ALIGN_BYTES;
        Self { segment_bytes, append_bytes_max, record_bytes_max, ..Self::default() }
    }

    /// Checks every field and how they relate; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(LOG_SEGMENT_BYTES_MIN..=LOG_SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(format!(
                "segment_bytes {} is outside {LOG_SEGMENT_BYTES_MIN}..={LOG_SEGMENT_BYTES_MAX}",
                self.segment_bytes
            ));
        }
        if self.record_bytes_max == 0 || self.record_bytes_max > LOG_RECORD_BYTES_MAX {
            return Err(format!("record_bytes_max {} is outside 1..={LOG_RECORD_BYTES_MAX}", self.record_bytes_max));
        }
        if frame_bytes(self.record_bytes_max) > self.append_bytes_max {
            return Err(format!(
                "append_bytes_max {} cannot hold one record of record_bytes_max {} ({} bytes framed)",
                self.append_bytes_max,
                self.record_bytes_max,
                frame_bytes(self.record_bytes_max)
            ));
        }
        if self.append_bytes_max + LOG_SEGMENT_HEADER_BYTES > self.segment_bytes {
            return Err(format!(
                "append_bytes_max {} plus the {LOG_SEGMENT_HEADER_BYTES}-byte segment header exceeds segment_bytes {}: an atomic append must fit in one segment",
                self.append_bytes_max, self.segment_bytes
            ));
        }
        if self.append_records_max == 0 {
            return Err("append_records_max must be at least 1".to_owned());
        }
        if self.queue_bytes_max < self.append_bytes_max {
            return Err(format!(
                "queue_bytes_max {} is smaller than append_bytes_max {}: the largest append could never be queued",
                self.queue_bytes_max, self.append_bytes_max
            ));
        }
        if self.queue_appends_max == 0 {
            return Err("queue_appends_max must be at least 1".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!("interval(20ms)".parse(), Ok(FsyncPolicy::Interval(Duration::from_millis(20))));
        assert_eq!("interval:5".parse(), Ok(FsyncPolicy::Interval(Duration::from_millis(5))));
        assert_eq!(FsyncPolicy::Interval(Duration::from_millis(20)).to_string(), "interval(20ms)");
        let err = "sometimes".parse::<FsyncPolicy>().unwrap_err();
        assert!(err.contains("sometimes"), "{err}");
        assert!("interval(0ms)".parse::<FsyncPolicy>().is_err());
    }

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        LogConfig::default().validate().expect("defaults are valid");
        LogConfig::small_segments(4096).validate().expect("small segments are valid");
        let err = LogConfig { segment_bytes: 10, ..LogConfig::default() }.validate().unwrap_err();
        assert!(err.contains("segment_bytes"), "{err}");
        let err = LogConfig { queue_bytes_max: 1, ..LogConfig::default() }.validate().unwrap_err();
        assert!(err.contains("queue_bytes_max"), "{err}");
    }
}
