//! A [`Storage`] wrapper that lets a test hold the log's writer inside a
//! `write` and wait for `fdatasync` calls, so that states which depend on
//! timing (a full append queue, an interval sync) can be reached
//! deterministically instead of by sleeping.

use std::ffi::OsString;
use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edgebus_log::{FileStorage, OpenMode, Storage, StorageFile};

/// How long a test waits for a condition before it fails instead of hanging.
pub const WAIT_LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    writers_held: usize,
    syncs: u64,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_until(&self, what: &str, done: impl Fn(&GateState) -> bool) {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut state = self.lock();
        while !done(&state) {
            let left = deadline.checked_duration_since(Instant::now());
            let Some(left) = left.filter(|d| !d.is_zero()) else {
                panic!("gave up after {WAIT_LIMIT:?} waiting for {what}: {state:?}");
            };
            state = self.changed.wait_timeout(state, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }
}

/// Real files, plus a gate on writes to segment files and a count of syncs.
#[derive(Debug, Clone, Default)]
pub struct GatedStorage {
    inner: FileStorage,
    gate: Arc<Gate>,
}

impl GatedStorage {
    /// From now on, writes to segment files wait until [`GatedStorage::open_gate`].
    pub fn close_gate(&self) {
        self.gate.lock().closed = true;
    }

    /// Lets held and future writes through.
    pub fn open_gate(&self) {
        self.gate.lock().closed = false;
        self.gate.changed.notify_all();
    }

    /// Waits until `n` writers are held at the closed gate.
    pub fn wait_for_held_writers(&self, n: usize) {
        self.gate.wait_until("writers held at the gate", |s| s.writers_held >= n);
    }

    /// `fdatasync` calls on files, so far.
    pub fn syncs(&self) -> u64 {
        self.gate.lock().syncs
    }

    /// Waits until at least `n` `fdatasync` calls on files have returned.
    pub fn wait_for_syncs(&self, n: u64) {
        self.gate.wait_until("fdatasync calls", |s| s.syncs >= n);
    }
}

impl Storage for GatedStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        self.inner.list_dir(dir)
    }
    fn open_file(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let inner = self.inner.open_file(path, mode)?;
        let segment = path.extension().is_some_and(|e| e == "seg");
        Ok(Arc::new(GatedFile { inner, segment, gate: Arc::clone(&self.gate) }))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn lock_file(&self, path: &Path) -> io::Result<Box<dyn Send + Sync + Debug>> {
        self.inner.lock_file(path)
    }
    fn is_dir(&self, path: &Path) -> io::Result<bool> {
        self.inner.is_dir(path)
    }
}

#[derive(Debug)]
struct GatedFile {
    inner: Arc<dyn StorageFile>,
    segment: bool,
    gate: Arc<Gate>,
}

impl StorageFile for GatedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.segment {
            let mut state = self.gate.lock();
            if state.closed {
                state.writers_held += 1;
                self.gate.changed.notify_all();
                while state.closed {
                    state = self.gate.changed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                state.writers_held -= 1;
            }
        }
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        let result = self.inner.sync_data();
        self.gate.lock().syncs += 1;
        self.gate.changed.notify_all();
        result
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}
