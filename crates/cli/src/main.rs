//! The `edgebus` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    edgebus::main_from_env()
}

/// glibc's malloc gives threads that contend for it arenas of their own, up
/// to eight per core, and memory freed in one arena is not reused by
/// another. Under a node's mix of async workers and blocking-pool threads
/// that is fragmentation: a site holding a dead route's backlog of 1M
/// events had 316-319 MiB resident with the default and 213-242 MiB with
/// one arena per core (`edgebus bench wan --backlog-only`). One arena per
/// core, at least two, unless `MALLOC_ARENA_MAX` says otherwise.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a tunable of the allocator and is called
    // first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
