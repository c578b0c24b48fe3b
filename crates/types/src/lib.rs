//! Shared vocabulary of edgebus: limits, stream names and patterns, events and
//! expected versions. Pure data and validation; no I/O, no async, no clocks.

pub mod event;
pub mod limits;
pub mod name;
pub mod pattern;
pub mod site;
pub mod version;
mod xxh64;

pub use event::{EventError, EventId, EventIdError, NewEvent, RecordedEvent, content_hash};
pub use name::{ALL_STREAMS, EventType, EventTypeError, NameError, StreamName};
pub use pattern::{PatternError, StreamPattern};
pub use site::{Origin, SiteName, SiteNameError};
pub use version::{ExpectedVersion, ExpectedVersionError, WrongExpectedVersion};
