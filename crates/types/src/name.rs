//! Validated stream names (`orders.eu.o-1`, `$sys.policies`) and event types.
//!
//! A stream name is a sequence of dot-separated tokens. Token characters are
//! ASCII letters, digits, `_`, `-`, `:` and `@`. A `$` may open the first
//! token only, and marks a *system* stream (`$sys.*`, `$snapshots.*`,
//! `$groups.*`): clients cannot create those, the node can. The exact name
//! `$all` is never a stream: it is the pseudo-name of the site-wide order.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use crate::limits::{EVENT_TYPE_BYTES_MAX, STREAM_NAME_BYTES_MAX};

/// The pseudo-name of the site-wide total order of events. It is not a stream
/// name: both [`StreamName::new`] and [`StreamName::system`] reject it.
pub const ALL_STREAMS: &str = "$all";

/// A validated stream name.
///
/// Ordering, equality and hashing are those of the underlying string, so
/// `Borrow<str>` lets maps keyed by `StreamName` be queried with a `&str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamName(Box<str>);

impl StreamName {
    /// Validates a client-supplied stream name. Names that start with `$`
    /// are rejected with [`NameError::Reserved`]; use [`StreamName::system`]
    /// for those.
    pub fn new(name: &str) -> Result<Self, NameError> {
        validate_name(name, false)?;
        Ok(Self(name.into()))
    }

    /// Validates a stream name that may be a system name (`$sys.policies`).
    /// For the node itself and for names read back from the log; client input
    /// goes through [`StreamName::new`].
    pub fn system(name: &str) -> Result<Self, NameError> {
        validate_name(name, true)?;
        Ok(Self(name.into()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The dot-separated tokens of the name, in order; never empty. The first
    /// token of a system name keeps its `$`.
    pub fn tokens(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.0.split('.')
    }

    /// Whether this is a system stream (the name starts with `$`).
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamName({:?})", &*self.0)
    }
}

impl AsRef<str> for StreamName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for StreamName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Parses a client name, exactly as [`StreamName::new`]: system names are
/// rejected, so `"$sys.x".parse::<StreamName>()` fails.
impl FromStr for StreamName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::new(name)
    }
}

/// Why a string is not a valid stream name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is the empty string.
    #[error("stream name is empty")]
    Empty,
    /// The name is longer than [`STREAM_NAME_BYTES_MAX`].
    #[error("stream name is {len_bytes} bytes long, more than the maximum of {max_bytes}")]
    TooLong {
        /// Length of the rejected name.
        len_bytes: usize,
        /// The limit it exceeds.
        max_bytes: usize,
    },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("stream name {name:?} has an empty token at byte {byte}")]
    EmptyToken {
        /// The rejected name.
        name: String,
        /// Byte offset where the empty token starts.
        byte: usize,
    },
    /// A character outside the allowed set.
    #[error(
        "stream name {name:?} has invalid character {character:?} at byte {byte} \
         (allowed: letters, digits, '_', '-', ':', '@')"
    )]
    InvalidChar {
        /// The rejected name.
        name: String,
        /// The offending character.
        character: char,
        /// Byte offset of the character.
        byte: usize,
    },
    /// A `$` anywhere but at the very start of the name.
    #[error(
        "stream name {name:?} has '$' at byte {byte}; '$' may only open the first token, \
         marking a system stream"
    )]
    MisplacedDollar {
        /// The rejected name.
        name: String,
        /// Byte offset of the `$`.
        byte: usize,
    },
    /// The first token is a lone `$`, as in `$.x`.
    #[error("stream name {name:?} starts with a bare '$' token; a system token needs a name after '$'")]
    BareDollar {
        /// The rejected name.
        name: String,
    },
    /// A client name starts with `$`, which is reserved for system streams.
    #[error("stream name {name:?} is reserved: names starting with '$' are system streams")]
    Reserved {
        /// The rejected name.
        name: String,
    },
    /// The name is exactly [`ALL_STREAMS`].
    #[error("stream name \"$all\" is reserved: it names the site-wide order, not a stream")]
    AllStreams,
}

fn validate_name(name: &str, allow_system: bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > STREAM_NAME_BYTES_MAX {
        return Err(NameError::TooLong { len_bytes: name.len(), max_bytes: STREAM_NAME_BYTES_MAX });
    }
    if name == ALL_STREAMS {
        return Err(NameError::AllStreams);
    }
    if !allow_system && name.starts_with('$') {
        return Err(NameError::Reserved { name: name.to_owned() });
    }
    scan_tokens(name, false).map_err(|problem| {
        let name = name.to_owned();
        match problem {
            TokenProblem::EmptyToken { byte } => NameError::EmptyToken { name, byte },
            TokenProblem::InvalidChar { character, byte } => NameError::InvalidChar { name, character, byte },
            TokenProblem::MisplacedDollar { byte } => NameError::MisplacedDollar { name, byte },
            TokenProblem::BareDollar => NameError::BareDollar { name },
            TokenProblem::PartialWildcard { .. } | TokenProblem::FullWildcardNotLast { .. } => {
                unreachable!("wildcards are plain invalid characters in a name")
            }
        }
    })?;
    Ok(())
}

/// A syntax problem found by [`scan_tokens`]; the callers turn it into their
/// own error, which carries the offending string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    EmptyToken { byte: usize },
    InvalidChar { character: char, byte: usize },
    MisplacedDollar { byte: usize },
    BareDollar,
    PartialWildcard { wildcard: char, byte: usize },
    FullWildcardNotLast { byte: usize },
}

/// Checks the token syntax shared by names and patterns and returns the byte
/// length of the literal prefix: the tokens before the first wildcard, without
/// the dot that follows them (the whole string if there is no wildcard).
/// With `wildcards == false`, `*` and `>` are plain invalid characters.
pub(crate) fn scan_tokens(s: &str, wildcards: bool) -> Result<usize, TokenProblem> {
    let mut literal_prefix_len = s.len();
    let mut token_start = 0;
    for (token_idx, token) in s.split('.').enumerate() {
        let token_end = token_start + token.len();
        if token.is_empty() {
            return Err(TokenProblem::EmptyToken { byte: token_start });
        }
        if wildcards && (token == "*" || token == ">") {
            if token == ">" && token_end != s.len() {
                return Err(TokenProblem::FullWildcardNotLast { byte: token_start });
            }
            if literal_prefix_len == s.len() {
                literal_prefix_len = token_start.saturating_sub(1);
            }
        } else {
            if token_idx == 0 && token == "$" {
                return Err(TokenProblem::BareDollar);
            }
            for (char_idx, character) in token.char_indices() {
                let byte = token_start + char_idx;
                match character {
                    'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' | ':' | '@' => {}
                    '$' if byte == 0 => {}
                    '$' => return Err(TokenProblem::MisplacedDollar { byte }),
                    '*' | '>' if wildcards => {
                        return Err(TokenProblem::PartialWildcard { wildcard: character, byte });
                    }
                    _ => return Err(TokenProblem::InvalidChar { character, byte }),
                }
            }
        }
        token_start = token_end + 1;
    }
    Ok(literal_prefix_len)
}

/// A validated event type (`OrderPlaced`, `sensor/v2.reading`): 1 to
/// [`EVENT_TYPE_BYTES_MAX`] bytes of printable ASCII, without spaces.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventType(Box<str>);

impl EventType {
    /// Validates an event type.
    pub fn new(event_type: &str) -> Result<Self, EventTypeError> {
        if event_type.is_empty() {
            return Err(EventTypeError::Empty);
        }
        if event_type.len() > EVENT_TYPE_BYTES_MAX {
            return Err(EventTypeError::TooLong { len_bytes: event_type.len(), max_bytes: EVENT_TYPE_BYTES_MAX });
        }
        if let Some((byte, character)) = event_type.char_indices().find(|(_, character)| !character.is_ascii_graphic())
        {
            return Err(EventTypeError::InvalidChar { event_type: event_type.to_owned(), character, byte });
        }
        Ok(Self(event_type.into()))
    }

    /// The event type as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventType({:?})", &*self.0)
    }
}

impl AsRef<str> for EventType {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for EventType {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Parses exactly as [`EventType::new`].
impl FromStr for EventType {
    type Err = EventTypeError;

    fn from_str(event_type: &str) -> Result<Self, Self::Err> {
        Self::new(event_type)
    }
}

/// Why a string is not a valid event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventTypeError {
    /// The event type is the empty string.
    #[error("event type is empty")]
    Empty,
    /// The event type is longer than [`EVENT_TYPE_BYTES_MAX`].
    #[error("event type is {len_bytes} bytes long, more than the maximum of {max_bytes}")]
    TooLong {
        /// Length of the rejected event type.
        len_bytes: usize,
        /// The limit it exceeds.
        max_bytes: usize,
    },
    /// A space, control character or non-ASCII character.
    #[error(
        "event type {event_type:?} has invalid character {character:?} at byte {byte} \
         (allowed: printable ASCII without spaces)"
    )]
    InvalidChar {
        /// The rejected event type.
        event_type: String,
        /// The offending character.
        character: char,
        /// Byte offset of the character.
        byte: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client(name: &str) -> StreamName {
        StreamName::new(name).expect("valid client name")
    }

    #[test]
    fn accepts_client_names() {
        for name in ["a", "sensor.us-east", "orders.eu.order-123", "A_b:c@d.0", "0-0.1"] {
            let stream = client(name);
            assert_eq!(stream.as_str(), name);
            assert_eq!(stream.to_string(), name);
            assert!(!stream.is_system());
        }
        let longest = "a".repeat(STREAM_NAME_BYTES_MAX);
        assert_eq!(client(&longest).as_str().len(), STREAM_NAME_BYTES_MAX);
    }

    #[test]
    fn tokens_split_on_dots() {
        let stream = client("orders.eu.o-1");
        assert_eq!(stream.tokens().collect::<Vec<_>>(), ["orders", "eu", "o-1"]);
        assert_eq!(stream.tokens().next_back(), Some("o-1"));
        let system = StreamName::system("$snapshots.orders.o-1").expect("valid system name");
        assert_eq!(system.tokens().collect::<Vec<_>>(), ["$snapshots", "orders", "o-1"]);
    }

    #[test]
    fn system_names_need_the_system_constructor() {
        for name in ["$sys.policies", "$snapshots.orders.o-1", "$groups.g1", "$x"] {
            assert_eq!(StreamName::new(name), Err(NameError::Reserved { name: name.into() }));
            assert!(name.parse::<StreamName>().is_err());
            let stream = StreamName::system(name).expect("valid system name");
            assert!(stream.is_system());
            assert_eq!(stream.as_str(), name);
        }
        // The system constructor accepts client names too.
        assert!(!StreamName::system("orders").expect("valid name").is_system());
    }

    #[test]
    fn all_streams_is_never_a_stream() {
        assert_eq!(StreamName::new(ALL_STREAMS), Err(NameError::AllStreams));
        assert_eq!(StreamName::system(ALL_STREAMS), Err(NameError::AllStreams));
        assert!(StreamName::system("$all.x").is_ok());
    }

    #[test]
    fn error_messages_name_the_problem() {
        let message = |name: &str| StreamName::system(name).expect_err("invalid").to_string();
        assert_eq!(message("a..b"), r#"stream name "a..b" has an empty token at byte 2"#);
        assert_eq!(message(".a"), r#"stream name ".a" has an empty token at byte 0"#);
        assert_eq!(message("a."), r#"stream name "a." has an empty token at byte 2"#);
        assert_eq!(
            message("a b"),
            r#"stream name "a b" has invalid character ' ' at byte 1 (allowed: letters, digits, '_', '-', ':', '@')"#
        );
        assert_eq!(
            message("a.é"),
            r#"stream name "a.é" has invalid character 'é' at byte 2 (allowed: letters, digits, '_', '-', ':', '@')"#
        );
        assert_eq!(
            message("a.$b"),
            r#"stream name "a.$b" has '$' at byte 2; '$' may only open the first token, marking a system stream"#
        );
        assert_eq!(
            message("$.a"),
            r#"stream name "$.a" starts with a bare '$' token; a system token needs a name after '$'"#
        );
        assert_eq!(message(""), "stream name is empty");
        assert_eq!(message(&"a".repeat(256)), "stream name is 256 bytes long, more than the maximum of 255");
        assert_eq!(
            StreamName::new("$sys.x").expect_err("reserved").to_string(),
            r#"stream name "$sys.x" is reserved: names starting with '$' are system streams"#
        );
    }

    #[test]
    fn wildcards_are_not_name_characters() {
        assert_eq!(StreamName::new("a.*"), Err(NameError::InvalidChar { name: "a.*".into(), character: '*', byte: 2 }));
        assert_eq!(StreamName::new(">"), Err(NameError::InvalidChar { name: ">".into(), character: '>', byte: 0 }));
    }

    #[test]
    fn event_types() {
        for event_type in ["OrderPlaced", "sensor/v2.reading", "a", "!~"] {
            assert_eq!(EventType::new(event_type).expect("valid").as_str(), event_type);
        }
        assert!(EventType::new(&"t".repeat(EVENT_TYPE_BYTES_MAX)).is_ok());
        assert_eq!(EventType::new("").expect_err("empty").to_string(), "event type is empty");
        assert_eq!(
            EventType::new(&"t".repeat(129)).expect_err("long").to_string(),
            "event type is 129 bytes long, more than the maximum of 128"
        );
        assert_eq!(
            EventType::new("Order Placed").expect_err("space").to_string(),
            r#"event type "Order Placed" has invalid character ' ' at byte 5 (allowed: printable ASCII without spaces)"#
        );
        assert!(matches!(EventType::new("a\n"), Err(EventTypeError::InvalidChar { character: '\n', byte: 1, .. })));
        assert!(matches!(EventType::new("ü"), Err(EventTypeError::InvalidChar { character: 'ü', byte: 0, .. })));
    }

    const TOKEN: &str = "[A-Za-z0-9_:@-]{1,12}";

    fn client_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(TOKEN, 1..8).prop_map(|tokens| tokens.join("."))
    }

    proptest! {
        #[test]
        fn valid_names_round_trip(name in client_name()) {
            prop_assume!(name.len() <= STREAM_NAME_BYTES_MAX);
            let stream: StreamName = name.parse().expect("valid name");
            prop_assert_eq!(stream.to_string(), name.clone());
            prop_assert_eq!(stream.to_string().parse::<StreamName>(), Ok(stream.clone()));
            prop_assert_eq!(stream.tokens().collect::<Vec<_>>().join("."), name.clone());
            let system = format!("${name}");
            let system_stream = StreamName::system(&system).expect("valid system name");
            prop_assert_eq!(system_stream.to_string(), system);
        }

        #[test]
        fn any_string_is_accepted_only_as_itself(name in "[a-z.$*> é]{0,20}") {
            if let Ok(stream) = StreamName::system(&name) {
                prop_assert_eq!(stream.as_str(), name.as_str());
                prop_assert!(!stream.tokens().any(str::is_empty));
            }
        }

        #[test]
        fn valid_event_types_round_trip(event_type in "[!-~]{1,128}") {
            let parsed: EventType = event_type.parse().expect("valid event type");
            prop_assert_eq!(parsed.to_string(), event_type);
        }
    }
}
