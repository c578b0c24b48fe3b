//! Expected versions for optimistic concurrency on appends, with the
//! semantics of EventStoreDB.
//!
//! A stream's *current version* is the version of its last event: versions
//! are dense from 0, so a stream holding one event is at version 0 and a
//! stream with no events has no current version (`None`).

use std::fmt;
use std::str::FromStr;

/// What a writer believes about a stream before appending to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No expectation: the append always passes the check.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Checks the expectation against `current`, the version of the stream's
    /// last event (`None` if the stream has no events):
    ///
    /// | expected | passes iff |
    /// |---|---|
    /// | `Any` | always |
    /// | `NoStream` | `current == None` |
    /// | `StreamExists` | `current.is_some()` |
    /// | `Exact(v)` | `current == Some(v)` |
    pub fn check(&self, current: Option<u64>) -> Result<(), WrongExpectedVersion> {
        let passes = match *self {
            Self::Any => true,
            Self::NoStream => current.is_none(),
            Self::StreamExists => current.is_some(),
            Self::Exact(version) => current == Some(version),
        };
        if passes { Ok(()) } else { Err(WrongExpectedVersion { expected: *self, current }) }
    }
}

/// Formats as `any`, `no_stream`, `stream_exists` or the version number; the
/// [`FromStr`] implementation reads the same forms back.
impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no_stream"),
            Self::StreamExists => f.write_str("stream_exists"),
            Self::Exact(version) => write!(f, "{version}"),
        }
    }
}

/// Parses `any`, `no_stream`, `stream_exists` or a decimal version number
/// (ASCII digits only, no sign, at most `u64::MAX`).
impl FromStr for ExpectedVersion {
    type Err = ExpectedVersionError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        match input {
            "any" => Ok(Self::Any),
            "no_stream" => Ok(Self::NoStream),
            "stream_exists" => Ok(Self::StreamExists),
            _ if !input.is_empty() && input.bytes().all(|byte| byte.is_ascii_digit()) => input
                .parse()
                .map(Self::Exact)
                .map_err(|_| ExpectedVersionError::VersionTooLarge { input: input.to_owned() }),
            _ => Err(ExpectedVersionError::Invalid { input: input.to_owned() }),
        }
    }
}

/// Why a string is not an expected version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExpectedVersionError {
    /// Neither a keyword nor a number.
    #[error(
        "invalid expected version {input:?}: expected \"any\", \"no_stream\", \"stream_exists\" \
         or a version number"
    )]
    Invalid {
        /// The rejected input.
        input: String,
    },
    /// A number larger than `u64::MAX`.
    #[error("invalid expected version {input:?}: the version is larger than {max}", max = u64::MAX)]
    VersionTooLarge {
        /// The rejected input.
        input: String,
    },
}

/// An append's expected version did not hold; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("wrong expected version: expected {expected}, {}", describe_current(*.current))]
pub struct WrongExpectedVersion {
    /// What the writer expected.
    pub expected: ExpectedVersion,
    /// The version of the stream's last event, `None` if it has no events.
    pub current: Option<u64>,
}

fn describe_current(current: Option<u64>) -> String {
    match current {
        Some(version) => format!("stream is at {version}"),
        None => "stream does not exist".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn check_semantics() {
        use ExpectedVersion::{Any, Exact, NoStream, StreamExists};
        let cases: &[(ExpectedVersion, Option<u64>, bool)] = &[
            (Any, None, true),
            (Any, Some(0), true),
            (NoStream, None, true),
            (NoStream, Some(0), false),
            (StreamExists, None, false),
            (StreamExists, Some(0), true),
            (StreamExists, Some(7), true),
            (Exact(0), None, false),
            (Exact(0), Some(0), true),
            (Exact(3), Some(3), true),
            (Exact(3), Some(5), false),
            (Exact(5), Some(3), false),
        ];
        for &(expected, current, passes) in cases {
            let result = expected.check(current);
            if passes {
                assert_eq!(result, Ok(()), "{expected} vs {current:?}");
            } else {
                assert_eq!(result, Err(WrongExpectedVersion { expected, current }));
            }
        }
    }

    #[test]
    fn error_messages() {
        let message = |expected: ExpectedVersion, current| expected.check(current).expect_err("mismatch").to_string();
        assert_eq!(message(ExpectedVersion::Exact(3), Some(5)), "wrong expected version: expected 3, stream is at 5");
        assert_eq!(
            message(ExpectedVersion::Exact(3), None),
            "wrong expected version: expected 3, stream does not exist"
        );
        assert_eq!(
            message(ExpectedVersion::NoStream, Some(0)),
            "wrong expected version: expected no_stream, stream is at 0"
        );
        assert_eq!(
            message(ExpectedVersion::StreamExists, None),
            "wrong expected version: expected stream_exists, stream does not exist"
        );
    }

    #[test]
    fn parse_and_display() {
        for (text, expected) in [
            ("any", ExpectedVersion::Any),
            ("no_stream", ExpectedVersion::NoStream),
            ("stream_exists", ExpectedVersion::StreamExists),
            ("0", ExpectedVersion::Exact(0)),
            ("18446744073709551615", ExpectedVersion::Exact(u64::MAX)),
        ] {
            assert_eq!(text.parse(), Ok(expected));
            assert_eq!(expected.to_string(), text);
        }
        for bad in ["", "Any", "-1", "+1", " 1", "1.0", "no-stream"] {
            assert_eq!(bad.parse::<ExpectedVersion>(), Err(ExpectedVersionError::Invalid { input: bad.to_owned() }));
        }
        assert_eq!(
            "x".parse::<ExpectedVersion>().expect_err("invalid").to_string(),
            r#"invalid expected version "x": expected "any", "no_stream", "stream_exists" or a version number"#
        );
        assert_eq!(
            "18446744073709551616".parse::<ExpectedVersion>().expect_err("too large").to_string(),
            r#"invalid expected version "18446744073709551616": the version is larger than 18446744073709551615"#
        );
    }

    proptest! {
        #[test]
        fn exact_round_trips(version in any::<u64>()) {
            let expected = ExpectedVersion::Exact(version);
            prop_assert_eq!(expected.to_string().parse::<ExpectedVersion>(), Ok(expected));
        }
    }
}
