//! Helpers shared by the integration scenarios in `it/` and by the child
//! processes they start: self-checking record payloads for the crash test and
//! a storage backend whose writes a test can hold and whose syncs it can await,
//! and log opens that do not race child process starts.

pub mod crash_record;
pub mod gated_storage;
pub mod guarded;

/// For crash-test children: writes one line to stdout and flushes it, so the
/// parent sees every acknowledgement before a kill; exits quietly (status 2)
/// if the parent is gone.
pub fn report(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(2);
    }
}
