//! NATS-style stream patterns (`orders.*.created`, `sensor.>`) used by
//! subscriptions, policies and routes to select streams.
//!
//! A pattern is a sequence of dot-separated tokens. `*` matches exactly one
//! token, `>` matches one or more trailing tokens and must be the last token;
//! every other token is literal and follows the stream name rules. Wildcards
//! never reach into system streams: `>` and `*.x` do not match `$sys.x`; only
//! a pattern whose first token is itself a `$` literal (`$snapshots.>`) does.

use std::fmt;
use std::str::FromStr;

use crate::limits::STREAM_PATTERN_BYTES_MAX;
use crate::name::{ALL_STREAMS, StreamName, TokenProblem, scan_tokens};

/// A validated stream pattern.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPattern {
    pattern: Box<str>,
    /// Byte length of the tokens before the first wildcard, without the dot
    /// that follows them; equal to `pattern.len()` for a literal pattern.
    literal_prefix_len: usize,
}

impl StreamPattern {
    /// Validates a pattern.
    pub fn new(pattern: &str) -> Result<Self, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        if pattern.len() > STREAM_PATTERN_BYTES_MAX {
            return Err(PatternError::TooLong { len_bytes: pattern.len(), max_bytes: STREAM_PATTERN_BYTES_MAX });
        }
        if pattern == ALL_STREAMS {
            return Err(PatternError::AllStreams);
        }
        let literal_prefix_len = scan_tokens(pattern, true).map_err(|problem| {
            let pattern = pattern.to_owned();
            match problem {
                TokenProblem::EmptyToken { byte } => PatternError::EmptyToken { pattern, byte },
                TokenProblem::InvalidChar { character, byte } => PatternError::InvalidChar { pattern, character, byte },
                TokenProblem::MisplacedDollar { byte } => PatternError::MisplacedDollar { pattern, byte },
                TokenProblem::BareDollar => PatternError::BareDollar { pattern },
                TokenProblem::PartialWildcard { wildcard, byte } => {
                    PatternError::PartialWildcard { pattern, wildcard, byte }
                }
                TokenProblem::FullWildcardNotLast { byte } => PatternError::FullWildcardNotLast { pattern, byte },
            }
        })?;
        Ok(Self { pattern: pattern.into(), literal_prefix_len })
    }

    /// The pattern that matches exactly `name` and nothing else.
    pub fn literal(name: &StreamName) -> Self {
        let pattern: Box<str> = name.as_str().into();
        Self { literal_prefix_len: pattern.len(), pattern }
    }

    /// The pattern as a string slice.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern has no wildcard, so that it matches exactly one
    /// stream name: itself.
    pub fn is_literal(&self) -> bool {
        self.literal_prefix_len == self.pattern.len()
    }

    /// The tokens before the first wildcard, joined by dots: `orders.eu` for
    /// `orders.eu.*.x`, the whole pattern if it is literal, and `""` if it
    /// starts with a wildcard. Every matching name starts with this prefix
    /// (followed by a dot unless the pattern is literal), which makes it a
    /// key for a sorted index of stream names.
    pub fn literal_prefix(&self) -> &str {
        &self.pattern[..self.literal_prefix_len]
    }

    /// Whether `name` matches the pattern.
    pub fn matches(&self, name: &StreamName) -> bool {
        self.matches_str(name.as_str())
    }

    /// Whether the string `name` matches the pattern. The string is not
    /// validated: it is split on `.` and compared token by token, so an
    /// invalid name gets a well-defined answer but never an error.
    pub fn matches_str(&self, name: &str) -> bool {
        if self.is_literal() {
            return *self.pattern == *name;
        }
        // A wildcard in first position never matches a system token; a `$`
        // literal in first position is compared like any other literal.
        if name.starts_with('$') && !self.pattern.starts_with('$') {
            return false;
        }
        let mut pattern_tokens = self.pattern.split('.');
        let mut name_tokens = name.split('.');
        loop {
            match (pattern_tokens.next(), name_tokens.next()) {
                (None, None) => return true,
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(literal), Some(token)) if literal == token => {}
                _ => return false,
            }
        }
    }
}

impl From<StreamName> for StreamPattern {
    fn from(name: StreamName) -> Self {
        Self::literal(&name)
    }
}

impl fmt::Display for StreamPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl fmt::Debug for StreamPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamPattern({:?})", &*self.pattern)
    }
}

impl AsRef<str> for StreamPattern {
    fn as_ref(&self) -> &str {
        &self.pattern
    }
}

/// Parses exactly as [`StreamPattern::new`].
impl FromStr for StreamPattern {
    type Err = PatternError;

    fn from_str(pattern: &str) -> Result<Self, Self::Err> {
        Self::new(pattern)
    }
}

/// Why a string is not a valid stream pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern is the empty string.
    #[error("stream pattern is empty")]
    Empty,
    /// The pattern is longer than [`STREAM_PATTERN_BYTES_MAX`].
    #[error("stream pattern is {len_bytes} bytes long, more than the maximum of {max_bytes}")]
    TooLong {
        /// Length of the rejected pattern.
        len_bytes: usize,
        /// The limit it exceeds.
        max_bytes: usize,
    },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("stream pattern {pattern:?} has an empty token at byte {byte}")]
    EmptyToken {
        /// The rejected pattern.
        pattern: String,
        /// Byte offset where the empty token starts.
        byte: usize,
    },
    /// A character outside the allowed set.
    #[error(
        "stream pattern {pattern:?} has invalid character {character:?} at byte {byte} \
         (allowed: letters, digits, '_', '-', ':', '@', and '*' or '>' as whole tokens)"
    )]
    InvalidChar {
        /// The rejected pattern.
        pattern: String,
        /// The offending character.
        character: char,
        /// Byte offset of the character.
        byte: usize,
    },
    /// A `$` anywhere but at the very start of the pattern.
    #[error(
        "stream pattern {pattern:?} has '$' at byte {byte}; '$' may only open the first token, \
         marking system streams"
    )]
    MisplacedDollar {
        /// The rejected pattern.
        pattern: String,
        /// Byte offset of the `$`.
        byte: usize,
    },
    /// The first token is a lone `$`, as in `$.>`.
    #[error("stream pattern {pattern:?} starts with a bare '$' token; a system token needs a name after '$'")]
    BareDollar {
        /// The rejected pattern.
        pattern: String,
    },
    /// A `*` or `>` inside a token, as in `a*` or `$>`.
    #[error("stream pattern {pattern:?} has {wildcard:?} at byte {byte}: {wildcard:?} must be a whole token")]
    PartialWildcard {
        /// The rejected pattern.
        pattern: String,
        /// The wildcard character, `*` or `>`.
        wildcard: char,
        /// Byte offset of the wildcard.
        byte: usize,
    },
    /// A `>` token followed by more tokens, as in `a.>.b`.
    #[error("stream pattern {pattern:?} has '>' at byte {byte}: '>' must be the last token")]
    FullWildcardNotLast {
        /// The rejected pattern.
        pattern: String,
        /// Byte offset of the `>`.
        byte: usize,
    },
    /// The pattern is exactly [`ALL_STREAMS`], which is not a stream.
    #[error("stream pattern \"$all\" names no stream; '>' matches every client stream")]
    AllStreams,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pattern(pattern: &str) -> StreamPattern {
        StreamPattern::new(pattern).expect("valid pattern")
    }

    #[test]
    fn wildcard_semantics() {
        let cases: &[(&str, &str, bool)] = &[
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c", true),
            ("a.>", "a", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.b.*", "a.b.c", true),
            ("*.b.*", "a.c.c", false),
            ("a.*.>", "a.b", false),
            ("a.*.>", "a.b.c", true),
            ("a.b", "a.b", true),
            ("a.b", "a.bc", false),
            ("a.b", "a", false),
        ];
        for &(pattern_str, name, expected) in cases {
            let stream = StreamName::new(name).expect("valid name");
            assert_eq!(pattern(pattern_str).matches(&stream), expected, "{pattern_str} vs {name}");
        }
    }

    #[test]
    fn wildcards_do_not_reach_into_system_streams() {
        let system = |name: &str| StreamName::system(name).expect("valid system name");
        assert!(!pattern(">").matches(&system("$sys.policies")));
        assert!(!pattern("*").matches(&system("$groups")));
        assert!(!pattern("*.policies").matches(&system("$sys.policies")));
        assert!(pattern("$snapshots.>").matches(&system("$snapshots.orders.o-1")));
        assert!(pattern("$sys.*").matches(&system("$sys.policies")));
        assert!(!pattern("$sys.*").matches(&system("$snapshots.policies")));
        assert!(pattern("$sys.policies").matches(&system("$sys.policies")));
    }

    #[test]
    fn literal_prefix_and_is_literal() {
        let cases: &[(&str, &str, bool)] = &[
            ("orders.eu.*.x", "orders.eu", false),
            ("orders.>", "orders", false),
            (">", "", false),
            ("*.a", "", false),
            ("a.b.c", "a.b.c", true),
            ("$sys.*", "$sys", false),
        ];
        for &(pattern_str, prefix, literal) in cases {
            let parsed = pattern(pattern_str);
            assert_eq!(parsed.literal_prefix(), prefix, "{pattern_str}");
            assert_eq!(parsed.is_literal(), literal, "{pattern_str}");
        }
        let name = StreamName::new("orders.eu").expect("valid name");
        assert_eq!(StreamPattern::from(name.clone()), pattern("orders.eu"));
        assert!(StreamPattern::literal(&name).is_literal());
    }

    #[test]
    fn error_messages_name_the_problem() {
        let message = |pattern: &str| StreamPattern::new(pattern).expect_err("invalid").to_string();
        assert_eq!(message("a.>.b"), r#"stream pattern "a.>.b" has '>' at byte 2: '>' must be the last token"#);
        assert_eq!(message("a.b*"), r#"stream pattern "a.b*" has '*' at byte 3: '*' must be a whole token"#);
        assert_eq!(message("a.>b"), r#"stream pattern "a.>b" has '>' at byte 2: '>' must be a whole token"#);
        assert_eq!(message("$*"), r#"stream pattern "$*" has '*' at byte 1: '*' must be a whole token"#);
        assert_eq!(message("a..*"), r#"stream pattern "a..*" has an empty token at byte 2"#);
        assert_eq!(message("*."), r#"stream pattern "*." has an empty token at byte 2"#);
        assert_eq!(
            message("a.b c"),
            r#"stream pattern "a.b c" has invalid character ' ' at byte 3 (allowed: letters, digits, '_', '-', ':', '@', and '*' or '>' as whole tokens)"#
        );
        assert!(matches!(StreamPattern::new("*.$x"), Err(PatternError::MisplacedDollar { byte: 2, .. })));
        assert!(matches!(StreamPattern::new("$.>"), Err(PatternError::BareDollar { .. })));
        assert_eq!(StreamPattern::new(""), Err(PatternError::Empty));
        assert_eq!(StreamPattern::new("$all"), Err(PatternError::AllStreams));
        assert_eq!(
            StreamPattern::new(&"a".repeat(STREAM_PATTERN_BYTES_MAX + 1)),
            Err(PatternError::TooLong { len_bytes: STREAM_PATTERN_BYTES_MAX + 1, max_bytes: STREAM_PATTERN_BYTES_MAX })
        );
    }

    /// The matching rules written as directly as possible, to check the real
    /// implementation against.
    fn reference_matches(pattern: &[&str], name: &[&str]) -> bool {
        fn tokens_match(pattern: &[&str], name: &[&str]) -> bool {
            match (pattern.split_first(), name.split_first()) {
                (None, None) => true,
                (Some((&">", _)), Some(_)) => true,
                (Some((&"*", pattern_rest)), Some((_, name_rest))) => tokens_match(pattern_rest, name_rest),
                (Some((literal, pattern_rest)), Some((token, name_rest))) => {
                    literal == token && tokens_match(pattern_rest, name_rest)
                }
                _ => false,
            }
        }
        let system_name = name[0].starts_with('$');
        let wildcard_first = pattern[0] == "*" || pattern[0] == ">";
        !(system_name && wildcard_first) && tokens_match(pattern, name)
    }

    fn name_tokens() -> impl Strategy<Value = Vec<String>> {
        (any::<bool>(), proptest::collection::vec("[ab]", 1..5)).prop_map(|(system, mut tokens)| {
            if system {
                tokens[0].insert(0, '$');
            }
            tokens
        })
    }

    fn pattern_tokens() -> impl Strategy<Value = Vec<String>> {
        (any::<bool>(), proptest::collection::vec("[ab*]", 1..5), any::<bool>()).prop_map(
            |(system, mut tokens, full_wildcard)| {
                if system && tokens[0] != "*" {
                    tokens[0].insert(0, '$');
                }
                if full_wildcard {
                    tokens.push(">".to_owned());
                }
                tokens
            },
        )
    }

    proptest! {
        #[test]
        fn matches_like_the_reference(pattern_tokens in pattern_tokens(), name_tokens in name_tokens()) {
            let pattern = StreamPattern::new(&pattern_tokens.join(".")).expect("valid pattern");
            let name = StreamName::system(&name_tokens.join(".")).expect("valid name");
            let pattern_refs: Vec<&str> = pattern_tokens.iter().map(String::as_str).collect();
            let name_refs: Vec<&str> = name_tokens.iter().map(String::as_str).collect();
            prop_assert_eq!(pattern.matches(&name), reference_matches(&pattern_refs, &name_refs));
            if pattern.matches(&name) && !pattern.is_literal() {
                let prefix = pattern.literal_prefix();
                let prefix_with_dot = format!("{prefix}.");
                prop_assert!(prefix.is_empty() || name.as_str().starts_with(&prefix_with_dot));
            }
        }

        #[test]
        fn a_literal_pattern_matches_exactly_its_name(
            pattern_tokens in name_tokens(),
            name_tokens in name_tokens(),
        ) {
            let pattern_name = StreamName::system(&pattern_tokens.join(".")).expect("valid name");
            let name = StreamName::system(&name_tokens.join(".")).expect("valid name");
            let pattern = StreamPattern::new(pattern_name.as_str()).expect("valid pattern");
            prop_assert!(pattern.is_literal());
            prop_assert_eq!(pattern.literal_prefix(), pattern_name.as_str());
            prop_assert!(pattern.matches(&pattern_name));
            prop_assert_eq!(pattern.matches(&name), name == pattern_name);
        }

        #[test]
        fn valid_patterns_round_trip(tokens in pattern_tokens()) {
            let text = tokens.join(".");
            let pattern: StreamPattern = text.parse().expect("valid pattern");
            prop_assert_eq!(pattern.to_string(), text);
        }
    }
}
