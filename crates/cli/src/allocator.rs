//! The process's allocator (glibc malloc on Linux): its tunables, set first
//! thing in `main`, and giving freed memory back to the system when a
//! long-running process goes idle.

/// Allocations of at least this size are mapped on their own and returned
/// to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: i32 = 1024 * 1024;

/// Two glibc malloc tunables, each unless its environment variable
/// (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`) says otherwise. Call it
/// first thing in `main`, before any other thread exists.
///
/// Arenas: glibc gives threads that contend for malloc arenas of their own,
/// up to eight per core, and memory freed in one arena is not reused by
/// another. Under a node's mix of async workers and blocking-pool threads
/// that is fragmentation: a site holding a dead route's backlog of 1M
/// events had 316-319 MiB resident with the default and 213-242 MiB with
/// one arena per core (`edgebus bench wan --backlog-only`). One arena per
/// core, at least two.
///
/// Map threshold: glibc raises its threshold for mapping a large block on
/// its own each time such a block is freed, up to 32 MiB, after which the
/// store's flush buffers (tens of MiB, one set per index flush) come from
/// the heap and leave it fragmented. A store filled with 10M events swung
/// between 232 and 312 MiB with the moving threshold and between 190 and
/// 248 MiB with a fixed 1 MiB one (`cargo run --release -p edgebus-store
/// --example fill`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator and is
        // called first thing in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}

/// How often the idle trimmer looks at the process's CPU time.
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// The process is idle over an interval in which it used less than this
/// share of one core.
const TRIM_IDLE_SHARE: f64 = 0.02;

/// Starts a thread that gives malloc's free pages back to the system once
/// the process goes idle after being busy: once per busy spell, the first
/// second with less than 2 % of a core used. glibc keeps what a burst freed
/// (the store's index tail, fjall's compaction buffers, request buffers) in
/// its arenas, and returns only the top of a heap on `free`. A site with a
/// dead route's backlog of 10M events, quiet, held 19.2 MiB of anonymous
/// memory before a trim and 7.7 MiB after it (`edgebus bench wan
/// --backlog-only`, trimmed by hand). For long-running processes: `serve`
/// and `gateway`.
pub fn spawn_idle_trimmer() {
    let spawned = std::thread::Builder::new().name("edgebus-trim".to_owned()).spawn(|| {
        let mut before = process_cpu_secs();
        let mut spells = Spells::default();
        loop {
            std::thread::sleep(TRIM_INTERVAL);
            if spells.trim_after(process_cpu_secs() - before) {
                release_free_memory();
            }
            before = process_cpu_secs();
        }
    });
    // Without it the process only keeps more memory than it needs.
    drop(spawned);
}

/// Busy and idle spells of the process, one interval at a time.
#[derive(Debug, Default)]
struct Spells {
    /// An interval was busy since the last trim.
    busy: bool,
}

impl Spells {
    /// Whether to trim after an interval in which the process used
    /// `cpu_secs`: the first idle interval after a busy one.
    fn trim_after(&mut self, cpu_secs: f64) -> bool {
        let idle = cpu_secs < TRIM_IDLE_SHARE * TRIM_INTERVAL.as_secs_f64();
        let trim = idle && self.busy;
        self.busy = !idle;
        trim
    }
}

/// CPU time the whole process has used, in seconds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn process_cpu_secs() -> f64 {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `time` is.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &raw mut time) };
    if status != 0 {
        return 0.0;
    }
    time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn process_cpu_secs() -> f64 {
    0.0
}

/// Gives the pages that malloc holds free back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim only returns free pages of malloc's own heaps to
    // the system; it may run on any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_at_the_first_idle_interval_after_a_busy_one() {
        let mut spells = Spells::default();
        let (busy, idle) = (0.5, 0.001);
        assert!(!spells.trim_after(idle), "never busy: nothing to give back");
        assert!(!spells.trim_after(busy));
        assert!(!spells.trim_after(busy));
        assert!(spells.trim_after(idle), "the first idle second after busy ones");
        assert!(!spells.trim_after(idle), "once per busy spell");
        assert!(!spells.trim_after(busy));
        assert!(spells.trim_after(idle));
    }
}
