//! The `edgebus` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    tune_malloc();
    edgebus::main_from_env()
}

/// Allocations of at least this size are mapped on their own and returned
/// to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: i32 = 1024 * 1024;

/// Two glibc malloc tunables, each unless its environment variable
/// (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`) says otherwise.
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
fn tune_malloc() {
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
fn tune_malloc() {}
