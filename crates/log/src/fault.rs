//! A fault-injecting [`Storage`] for tests: fail the Nth write or `fdatasync`,
//! tear a write after K bytes, refuse to open a file, or flip a bit on read.
//!
//! It wraps a real backend, so what it lets through lands on disk and a test
//! can reopen the directory with the plain [`FileStorage`] to see what a crash
//! at that moment would have left behind. Write and sync counters count calls
//! on files opened through this backend, from the moment the fault is armed.

use std::ffi::OsString;
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{FileStorage, OpenMode, Storage, StorageFile};

/// One armed fault. Counters start at 1: `FailWrite { nth: 1 }` fails the next write.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The `nth` write from now fails with `kind` and writes nothing.
    FailWrite { nth: u64, kind: io::ErrorKind },
    /// The `nth` `fdatasync` from now fails (the data may or may not be on disk).
    FailSync { nth: u64 },
    /// The `nth` write from now writes only its first `keep_bytes` bytes and
    /// then fails; every later write and sync fails too, as if the process had
    /// died at that moment.
    TearWrite { nth: u64, keep_bytes: usize },
    /// Every read of a file whose name ends with `file_suffix` that covers
    /// byte `offset` returns that byte with `bit` flipped (the disk is not changed).
    FlipBitOnRead { file_suffix: String, offset: u64, bit: u8 },
    /// Opening a file whose name ends with `file_suffix` fails with `kind`.
    FailOpen { file_suffix: String, kind: io::ErrorKind },
}

#[derive(Debug, Default)]
struct Plan {
    faults: Vec<Fault>,
    writes: u64,
    syncs: u64,
    crashed: bool,
}

/// A [`Storage`] wrapper that injects the armed [`Fault`]s.
#[derive(Debug, Clone)]
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    plan: Arc<Mutex<Plan>>,
}

impl Default for FaultStorage {
    fn default() -> Self {
        Self::new(Arc::new(FileStorage))
    }
}

impl FaultStorage {
    /// Wrap `inner`; no fault is armed.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self { inner, plan: Arc::new(Mutex::new(Plan::default())) }
    }

    fn plan(&self) -> MutexGuard<'_, Plan> {
        lock(&self.plan)
    }

    /// Arm `fault`; write and sync counts restart from zero.
    pub fn arm(&self, fault: Fault) {
        let mut plan = self.plan();
        plan.writes = 0;
        plan.syncs = 0;
        plan.faults.push(fault);
    }

    /// Forget every armed fault and the simulated crash.
    pub fn clear(&self) {
        let mut plan = self.plan();
        plan.faults.clear();
        plan.crashed = false;
    }

    /// Writes seen since the last [`FaultStorage::arm`].
    pub fn writes(&self) -> u64 {
        self.plan().writes
    }

    /// Syncs seen since the last [`FaultStorage::arm`].
    pub fn syncs(&self) -> u64 {
        self.plan().syncs
    }
}

fn lock(plan: &Mutex<Plan>) -> MutexGuard<'_, Plan> {
    plan.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn crashed_error() -> io::Error {
    io::Error::other("injected fault: storage is dead after a torn write")
}

fn file_name_ends_with(path: &Path, suffix: &str) -> bool {
    path.file_name().is_some_and(|name| name.to_string_lossy().ends_with(suffix))
}

impl Storage for FaultStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        self.inner.list_dir(dir)
    }
    fn open_file(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        {
            let plan = self.plan();
            for fault in &plan.faults {
                if let Fault::FailOpen { file_suffix, kind } = fault
                    && file_name_ends_with(path, file_suffix)
                {
                    return Err(io::Error::new(*kind, "injected fault: open refused"));
                }
            }
        }
        let inner = self.inner.open_file(path, mode)?;
        Ok(Arc::new(FaultFile { inner, path: path.to_path_buf(), plan: Arc::clone(&self.plan) }))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.plan().crashed {
            return Err(crashed_error());
        }
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
struct FaultFile {
    inner: Arc<dyn StorageFile>,
    path: PathBuf,
    plan: Arc<Mutex<Plan>>,
}

impl StorageFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        let plan = lock(&self.plan);
        for fault in &plan.faults {
            if let Fault::FlipBitOnRead { file_suffix, offset: at, bit } = fault
                && file_name_ends_with(&self.path, file_suffix)
                && *at >= offset
                && *at < offset + n as u64
            {
                buf[(*at - offset) as usize] ^= 1 << (bit % 8);
            }
        }
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut plan = lock(&self.plan);
        if plan.crashed {
            return Err(crashed_error());
        }
        plan.writes += 1;
        let writes = plan.writes;
        for fault in &plan.faults {
            match fault {
                Fault::FailWrite { nth, kind } if *nth == writes => {
                    return Err(io::Error::new(*kind, "injected fault: write failed"));
                }
                Fault::TearWrite { nth, keep_bytes } if *nth == writes => {
                    let keep = (*keep_bytes).min(buf.len());
                    plan.crashed = true;
                    self.inner.write_all_at(&buf[..keep], offset)?;
                    return Err(io::Error::other("injected fault: torn write"));
                }
                _ => {}
            }
        }
        drop(plan);
        self.inner.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut plan = lock(&self.plan);
        if plan.crashed {
            return Err(crashed_error());
        }
        plan.syncs += 1;
        let syncs = plan.syncs;
        if plan.faults.iter().any(|f| matches!(f, Fault::FailSync { nth } if *nth == syncs)) {
            return Err(io::Error::other("injected fault: fdatasync failed"));
        }
        drop(plan);
        self.inner.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if lock(&self.plan).crashed {
            return Err(crashed_error());
        }
        self.inner.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_in(dir: &Path, name: &str, storage: &FaultStorage) -> Arc<dyn StorageFile> {
        storage.open_file(&dir.join(name), OpenMode::CreateNew).unwrap()
    }

    #[test]
    fn counters_restart_when_a_fault_is_armed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FaultStorage::default();
        let file = file_in(dir.path(), "a.seg", &storage);
        file.write_all_at(b"one", 0).unwrap();
        file.sync_data().unwrap();
        assert_eq!((storage.writes(), storage.syncs()), (1, 1));
        storage.arm(Fault::FailWrite { nth: 2, kind: io::ErrorKind::StorageFull });
        assert_eq!((storage.writes(), storage.syncs()), (0, 0));
        file.write_all_at(b"two", 3).unwrap();
        let err = file.write_all_at(b"three", 6).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(file.len().unwrap(), 6, "a failed write writes nothing");
        file.write_all_at(b"four", 6).unwrap();
    }

    #[test]
    fn a_torn_write_keeps_its_prefix_and_kills_the_storage_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FaultStorage::default();
        let file = file_in(dir.path(), "a.seg", &storage);
        storage.arm(Fault::TearWrite { nth: 1, keep_bytes: 3 });
        assert!(file.write_all_at(b"abcdef", 0).is_err());
        assert_eq!(std::fs::read(dir.path().join("a.seg")).unwrap(), b"abc");
        assert!(file.write_all_at(b"x", 0).is_err());
        assert!(file.sync_data().is_err());
        assert!(file.set_len(0).is_err());
        assert!(storage.sync_dir(dir.path()).is_err());
        storage.clear();
        file.write_all_at(b"x", 0).unwrap();
        file.sync_data().unwrap();
    }

    #[test]
    fn fsync_failures_count_from_arming() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FaultStorage::default();
        let file = file_in(dir.path(), "a.seg", &storage);
        storage.arm(Fault::FailSync { nth: 2 });
        file.sync_data().unwrap();
        assert!(file.sync_data().is_err());
        file.sync_data().unwrap();
        assert_eq!(storage.syncs(), 3);
    }

    #[test]
    fn bit_flips_on_read_leave_the_disk_alone_and_opens_fail_by_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FaultStorage::default();
        let file = file_in(dir.path(), "a.seg", &storage);
        file.write_all_at(&[0u8; 16], 0).unwrap();
        storage.arm(Fault::FlipBitOnRead { file_suffix: "a.seg".to_owned(), offset: 9, bit: 2 });
        let mut buf = [0u8; 8];
        assert_eq!(file.read_at(&mut buf, 8).unwrap(), 8);
        assert_eq!(buf, [0, 4, 0, 0, 0, 0, 0, 0]);
        assert_eq!(file.read_at(&mut buf, 0).unwrap(), 8);
        assert_eq!(buf, [0; 8], "reads that do not cover the byte are untouched");
        assert_eq!(std::fs::read(dir.path().join("a.seg")).unwrap(), [0u8; 16]);

        storage.arm(Fault::FailOpen { file_suffix: ".idx".to_owned(), kind: io::ErrorKind::PermissionDenied });
        let err = storage.open_file(&dir.path().join("a.idx"), OpenMode::CreateNew).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(storage.open_file(&dir.path().join("b.seg"), OpenMode::CreateNew).is_ok());
    }
}
