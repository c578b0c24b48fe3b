//! Helpers shared by the integration scenarios in `it/` and by the child
//! processes they start: self-checking record payloads for the crash test and
//! a storage backend whose writes a test can hold and whose syncs it can await,
//! and log opens that do not race child process starts.

pub mod crash_record;
pub mod gated_storage;
pub mod guarded;
