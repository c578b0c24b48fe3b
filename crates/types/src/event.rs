//! Events as written by producers ([`NewEvent`]) and as stored in the log
//! ([`RecordedEvent`]), their ids and their content hash.

use std::fmt;
use std::str::FromStr;

use crate::limits::{EVENT_DATA_BYTES_MAX, EVENT_METADATA_BYTES_MAX};
use crate::name::{EventType, StreamName};
use crate::site::Origin;
use crate::xxh64::Xxh64;

/// A 16-byte event id, written in the canonical UUID form
/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lowercase hex when formatted,
/// either case when parsed). Any 16 bytes are a valid id: the UUID version and
/// variant bits are not checked.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId([u8; 16]);

impl EventId {
    /// Length of the canonical text form.
    pub const TEXT_BYTES: usize = 36;

    /// The id whose bytes are `value` in big-endian order, so that the text
    /// form reads as `value` in hex.
    pub const fn from_u128(value: u128) -> Self {
        Self(value.to_be_bytes())
    }

    /// The id with these bytes, in text-form order.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The id's bytes, in text-form order.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The id as a big-endian number; the inverse of [`EventId::from_u128`].
    pub const fn as_u128(&self) -> u128 {
        u128::from_be_bytes(self.0)
    }

    /// A UUID version 7 id (RFC 9562): `unix_ms` in the first 48 bits, then
    /// the version and variant bits, the other 74 bits taken from `random`.
    /// Ids made later sort after ids made earlier (to the millisecond), so
    /// a site's id index grows at its end instead of everywhere at once.
    pub const fn time_ordered(unix_ms: u64, random: u128) -> Self {
        let millis = (unix_ms as u128 & 0xffff_ffff_ffff) << 80;
        let rand_a = ((random >> 62) & 0xfff) << 64;
        let rand_b = random & 0x3fff_ffff_ffff_ffff;
        Self::from_u128(millis | (0x7 << 76) | rand_a | (0b10 << 62) | rand_b)
    }

    /// A fresh [`EventId::time_ordered`] id from the system clock and a
    /// thread-local random generator: the id every producer of edgebus gives
    /// an event it writes, unless the event's id is derived from its input.
    pub fn generate() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        Self::time_ordered(unix_ms, rand::random())
    }

    /// The milliseconds since the Unix epoch in a version 7 id, or `None`
    /// for an id of another version.
    pub const fn unix_ms(&self) -> Option<u64> {
        let value = self.as_u128();
        if (value >> 76) & 0xf == 0x7 && (value >> 62) & 0b11 == 0b10 { Some((value >> 80) as u64) } else { None }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.as_u128();
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            value >> 96,
            (value >> 80) & 0xffff,
            (value >> 64) & 0xffff,
            (value >> 48) & 0xffff,
            value & 0xffff_ffff_ffff
        )
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

/// Parses the canonical 8-4-4-4-12 form, hex digits in either case.
impl FromStr for EventId {
    type Err = EventIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != Self::TEXT_BYTES {
            return Err(EventIdError::Length { len_bytes: text.len() });
        }
        let mut value: u128 = 0;
        for (byte, character) in text.char_indices() {
            if matches!(byte, 8 | 13 | 18 | 23) {
                if character != '-' {
                    return Err(EventIdError::MissingHyphen { id: text.to_owned(), character, byte });
                }
            } else {
                let Some(digit) = character.to_digit(16) else {
                    return Err(EventIdError::NotHexDigit { id: text.to_owned(), character, byte });
                };
                value = (value << 4) | u128::from(digit);
            }
        }
        Ok(Self::from_u128(value))
    }
}

/// Why a string is not an event id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventIdError {
    /// The text is not 36 bytes long.
    #[error("event id is {len_bytes} bytes long, expected 36 (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")]
    Length {
        /// Length of the rejected text.
        len_bytes: usize,
    },
    /// A character other than a hex digit where one is expected.
    #[error("event id {id:?} has invalid character {character:?} at byte {byte} (expected a hex digit)")]
    NotHexDigit {
        /// The rejected text.
        id: String,
        /// The offending character.
        character: char,
        /// Byte offset of the character.
        byte: usize,
    },
    /// A character other than `-` at byte 8, 13, 18 or 23.
    #[error("event id {id:?} has invalid character {character:?} at byte {byte} (expected '-')")]
    MissingHyphen {
        /// The rejected text.
        id: String,
        /// The offending character.
        character: char,
        /// Byte offset of the character.
        byte: usize,
    },
}

/// An event as a producer submits it, before it has a stream position.
///
/// The node, not the client, stamps `timestamp_ms`; the type carries it so
/// that the store never reads a clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Producer-chosen id, used for idempotence.
    pub id: EventId,
    /// What happened, e.g. `OrderPlaced`.
    pub event_type: EventType,
    /// Opaque payload; at most [`EVENT_DATA_BYTES_MAX`] bytes.
    pub data: Vec<u8>,
    /// Opaque metadata; at most [`EVENT_METADATA_BYTES_MAX`] bytes.
    pub metadata: Vec<u8>,
    /// Milliseconds since the Unix epoch, stamped by the accepting node.
    pub timestamp_ms: u64,
}

impl NewEvent {
    /// Checks the size limits; the event type is valid by construction.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.data.len() > EVENT_DATA_BYTES_MAX {
            return Err(EventError::DataTooLarge {
                id: self.id,
                len_bytes: self.data.len(),
                max_bytes: EVENT_DATA_BYTES_MAX,
            });
        }
        if self.metadata.len() > EVENT_METADATA_BYTES_MAX {
            return Err(EventError::MetadataTooLarge {
                id: self.id,
                len_bytes: self.metadata.len(),
                max_bytes: EVENT_METADATA_BYTES_MAX,
            });
        }
        Ok(())
    }

    /// The event's [`content_hash`]: of its type, data and metadata, not of
    /// its id or timestamp.
    pub fn content_hash(&self) -> u64 {
        content_hash(&self.event_type, &self.data, &self.metadata)
    }
}

/// An event as stored in the log: a [`NewEvent`] plus where it landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The stream the event belongs to.
    pub stream: StreamName,
    /// Index of the event in its stream, dense from 0.
    pub version: u64,
    /// Index of the event in the site's total order (`$all`), dense from 0.
    pub position: u64,
    /// Producer-chosen id.
    pub id: EventId,
    /// What happened.
    pub event_type: EventType,
    /// Opaque payload.
    pub data: Vec<u8>,
    /// Opaque metadata.
    pub metadata: Vec<u8>,
    /// Milliseconds since the Unix epoch, stamped by the node that accepted it.
    pub timestamp_ms: u64,
    /// Where the event comes from if it was replicated from another site;
    /// `None` for events written at this site.
    pub origin: Option<Origin>,
}

impl RecordedEvent {
    /// Records `event` at `version` of `stream` and at `position` in the log.
    pub fn new(stream: StreamName, version: u64, position: u64, event: NewEvent) -> Self {
        let NewEvent { id, event_type, data, metadata, timestamp_ms } = event;
        Self { stream, version, position, id, event_type, data, metadata, timestamp_ms, origin: None }
    }

    /// The event's [`content_hash`], equal to that of the [`NewEvent`] it
    /// was recorded from.
    pub fn content_hash(&self) -> u64 {
        content_hash(&self.event_type, &self.data, &self.metadata)
    }
}

/// Why an event cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// `data` is larger than [`EVENT_DATA_BYTES_MAX`].
    #[error("event {id} data is {len_bytes} bytes, more than the maximum of {max_bytes}")]
    DataTooLarge {
        /// The event's id.
        id: EventId,
        /// Size of the rejected data.
        len_bytes: usize,
        /// The limit it exceeds.
        max_bytes: usize,
    },
    /// `metadata` is larger than [`EVENT_METADATA_BYTES_MAX`].
    #[error("event {id} metadata is {len_bytes} bytes, more than the maximum of {max_bytes}")]
    MetadataTooLarge {
        /// The event's id.
        id: EventId,
        /// Size of the rejected metadata.
        len_bytes: usize,
        /// The limit it exceeds.
        max_bytes: usize,
    },
}

/// A stable 64-bit hash of an event's content: its type, data and metadata,
/// not its id or timestamp. Exists-or-write compares it across processes and
/// sites to tell whether two events are the same, so the algorithm is fixed
/// forever:
///
/// XXH64 with seed 0 over `len(type) ‖ type ‖ len(data) ‖ data ‖
/// len(metadata) ‖ metadata`, where each `len` is the field's length in
/// bytes as a little-endian `u64`. The lengths keep the encoding unambiguous:
/// moving bytes from one field to the next changes the hash input.
pub fn content_hash(event_type: &EventType, data: &[u8], metadata: &[u8]) -> u64 {
    let mut hasher = Xxh64::new();
    for field in [event_type.as_str().as_bytes(), data, metadata] {
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(event_type: &str, data: &[u8], metadata: &[u8]) -> NewEvent {
        NewEvent {
            id: EventId::from_u128(1),
            event_type: EventType::new(event_type).expect("valid event type"),
            data: data.to_vec(),
            metadata: metadata.to_vec(),
            timestamp_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn event_id_text_form() {
        let id = EventId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.to_string(), "01234567-89ab-cdef-0011-223344556677");
        assert_eq!(format!("{id:?}"), "EventId(01234567-89ab-cdef-0011-223344556677)");
        assert_eq!("01234567-89AB-CDEF-0011-223344556677".parse(), Ok(id));
        assert_eq!(id.as_bytes()[0], 0x01);
        assert_eq!(id.as_bytes()[15], 0x77);
        assert_eq!(EventId::from_bytes(*id.as_bytes()), id);
        assert_eq!(EventId::from_u128(0).to_string(), "00000000-0000-0000-0000-000000000000");
        assert_eq!(EventId::from_u128(u128::MAX).to_string(), "ffffffff-ffff-ffff-ffff-ffffffffffff");
    }

    #[test]
    fn event_id_errors() {
        let message = |text: &str| text.parse::<EventId>().expect_err("invalid").to_string();
        assert_eq!(message("0123"), "event id is 4 bytes long, expected 36 (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)");
        assert_eq!(
            message("0123456g-89ab-cdef-0011-223344556677"),
            r#"event id "0123456g-89ab-cdef-0011-223344556677" has invalid character 'g' at byte 7 (expected a hex digit)"#
        );
        assert_eq!(
            message("01234567089ab-cdef-0011-223344556677"),
            r#"event id "01234567089ab-cdef-0011-223344556677" has invalid character '0' at byte 8 (expected '-')"#
        );
        assert!(matches!(
            "0123456é-89ab-cdef-0011-22334455667".parse::<EventId>(),
            Err(EventIdError::NotHexDigit { character: 'é', byte: 7, .. })
        ));
        assert!(matches!(
            "+1234567-89ab-cdef-0011-223344556677".parse::<EventId>(),
            Err(EventIdError::NotHexDigit { character: '+', byte: 0, .. })
        ));
    }

    #[test]
    fn content_hash_covers_content_only() {
        let base = event("OrderPlaced", b"data", b"meta");
        let mut other_identity = base.clone();
        other_identity.id = EventId::from_u128(2);
        other_identity.timestamp_ms += 1;
        assert_eq!(base.content_hash(), other_identity.content_hash());

        assert_ne!(base.content_hash(), event("OrderShipped", b"data", b"meta").content_hash());
        assert_ne!(base.content_hash(), event("OrderPlaced", b"datb", b"meta").content_hash());
        assert_ne!(base.content_hash(), event("OrderPlaced", b"data", b"metb").content_hash());
        // Field boundaries are part of the hashed input.
        assert_ne!(event("t", b"ab", b"").content_hash(), event("t", b"a", b"b").content_hash());

        let recorded = RecordedEvent::new(StreamName::new("orders.o-1").expect("valid name"), 0, 42, base.clone());
        assert_eq!(recorded.content_hash(), base.content_hash());
        assert_eq!(recorded.id, base.id);
        assert_eq!(recorded.position, 42);
    }

    #[test]
    fn content_hash_is_frozen() {
        // These values are compared across processes and versions: if this
        // test fails, the hash changed and stored events would no longer
        // compare equal to their replays. They were computed independently
        // of this crate, with a separate XXH64 implementation.
        assert_eq!(event("t", b"", b"").content_hash(), 0xB492_5232_74F5_4A5D);
        assert_eq!(
            event("OrderPlaced", b"{\"order\":\"o-1\"}", b"{\"user\":\"u-7\"}").content_hash(),
            0x4BDD_4BFF_B029_E8BA
        );
    }

    #[test]
    fn validate_names_what_is_too_big() {
        // Payloads this large live on the heap: a test thread's stack is small.
        let zeros = |len_bytes: usize| vec![0_u8; len_bytes];
        let largest = event("t", &zeros(EVENT_DATA_BYTES_MAX), &zeros(EVENT_METADATA_BYTES_MAX));
        assert_eq!(largest.validate(), Ok(()));
        let error = event("t", &zeros(EVENT_DATA_BYTES_MAX + 1), b"").validate().expect_err("too big");
        assert_eq!(
            error.to_string(),
            "event 00000000-0000-0000-0000-000000000001 data is 1048577 bytes, more than the maximum of 1048576"
        );
        let error = event("t", b"", &zeros(EVENT_METADATA_BYTES_MAX + 1)).validate().expect_err("too big");
        assert_eq!(
            error.to_string(),
            "event 00000000-0000-0000-0000-000000000001 metadata is 65537 bytes, more than the maximum of 65536"
        );
    }

    #[test]
    fn time_ordered_ids_are_version_7() {
        let id = EventId::time_ordered(0x0192_3456_789a, u128::MAX);
        assert_eq!(id.to_string(), "01923456-789a-7fff-bfff-ffffffffffff");
        assert_eq!(id.unix_ms(), Some(0x0192_3456_789a));
        assert_eq!(EventId::time_ordered(1, 0).to_string(), "00000000-0001-7000-8000-000000000000");
        assert_eq!(EventId::from_u128(1).unix_ms(), None, "version 0");
        let v4 = EventId::from_u128(0x0123_4567_89ab_4def_8011_2233_4455_6677);
        assert_eq!(v4.unix_ms(), None, "version 4");
    }

    #[test]
    fn generated_ids_are_distinct_and_carry_the_clock() {
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        let ids: Vec<EventId> = (0..1000).map(|_| EventId::generate()).collect();
        let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            let ms = u128::from(id.unix_ms().expect("a version 7 id"));
            assert!((before..=after).contains(&ms), "{ms} outside {before}..={after}");
        }
    }

    proptest! {
        #[test]
        fn time_ordered_ids_sort_by_their_millisecond(
            early in 0u64..(1 << 48), later in 0u64..(1 << 48), a in any::<u128>(), b in any::<u128>(),
        ) {
            let (x, y) = (EventId::time_ordered(early, a), EventId::time_ordered(later, b));
            prop_assert_eq!(x.unix_ms(), Some(early));
            prop_assert_eq!(y.unix_ms(), Some(later));
            if early < later {
                prop_assert!(x < y);
            }
        }

        #[test]
        fn event_ids_round_trip(value in any::<u128>()) {
            let id = EventId::from_u128(value);
            prop_assert_eq!(id.as_u128(), value);
            prop_assert_eq!(id.to_string().len(), EventId::TEXT_BYTES);
            prop_assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
            prop_assert_eq!(id.to_string().to_uppercase().parse::<EventId>(), Ok(id));
        }
    }
}
