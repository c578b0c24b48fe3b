//! Opening logs and starting child processes without tripping over each
//! other, for tests that run in parallel in one process.
//!
//! A child process holds a copy of every file descriptor of its parent from
//! the moment it is forked until its exec has closed the close-on-exec ones,
//! and the log's directory lock (`flock` on `LOCK`) is released only when
//! the last copy of its descriptor closes. So while one test starts a child,
//! another test that has just dropped a log and opens it again can be
//! refused with `OpenError::Locked` although no log is open any more.
//! (`Command::spawn` returns before the exec has closed those copies.)
//!
//! Starting a child therefore holds [`SPAWN_OR_OPEN`] exclusively until the
//! child proves it runs its own code (it writes a first line), and opening a
//! log holds it shared, so the two never overlap. Every test in this crate
//! opens logs through [`open`] or [`open_with_storage`], or holds [`opening`]
//! while it opens something that opens a log.

use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use edgebus_log::{Log, LogConfig, OpenError, Storage};

/// Held exclusively while a child is being started, shared while a log opens.
pub static SPAWN_OR_OPEN: RwLock<()> = RwLock::new(());

/// Held while opening something that opens a log inside (a store, say):
/// no child process starts until it is dropped.
pub fn opening() -> RwLockReadGuard<'static, ()> {
    SPAWN_OR_OPEN.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`Log::open`], never while a child process is being started.
pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log, OpenError> {
    let _guard = opening();
    Log::open(dir, config)
}

/// [`Log::open_with_storage`], never while a child process is being started.
pub fn open_with_storage(
    storage: Arc<dyn Storage>,
    dir: impl AsRef<Path>,
    config: LogConfig,
) -> Result<Log, OpenError> {
    let _guard = opening();
    Log::open_with_storage(storage, dir, config)
}

/// Held while starting a child process: no log opens until it is dropped.
/// Drop it once the child has shown that its exec is complete.
pub fn starting_child() -> RwLockWriteGuard<'static, ()> {
    SPAWN_OR_OPEN.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}
