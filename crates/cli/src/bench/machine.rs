//! What a benchmark ran on: cores, CPU, memory, kernel, the filesystem under
//! a directory, and the date, so that every figure printed carries its context.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::Serialize;

/// The machine a benchmark runs on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may run on.
    pub cores: usize,
    /// `model name` from `/proc/cpuinfo`, or `unknown`.
    pub cpu_model: String,
    /// `MemTotal` from `/proc/meminfo`, if readable.
    pub memory_bytes: Option<u64>,
    /// `uname -srm`, or `/proc/sys/kernel/osrelease` where `uname` is missing.
    pub kernel: String,
}

impl Machine {
    /// Looks at this machine; parts that cannot be read are reported as unknown.
    pub fn detect() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = proc_field(&cpuinfo, "model name").unwrap_or("unknown").to_owned();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = proc_field(&meminfo, "MemTotal")
            .and_then(|v| v.strip_suffix(" kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024);
        let kernel = Command::new("uname")
            .arg("-srm")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|r| format!("Linux {}", r.trim()))
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Self { cores, cpu_model, memory_bytes, kernel }
    }

    /// One line for a report: `2 cores (model), 24 GiB, Linux 6.1 x86_64`.
    pub fn describe(&self) -> String {
        let memory = self.memory_bytes.map_or_else(
            || "unknown memory".to_owned(),
            |bytes| format!("{:.0} GiB", bytes as f64 / (1u64 << 30) as f64),
        );
        format!("{} cores ({}), {memory}, {}", self.cores, self.cpu_model, self.kernel)
    }
}

/// The value of the first `key : value` line of a `/proc` file.
fn proc_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// The mounted filesystem a path lives on.
#[derive(Debug, Clone, Serialize)]
pub struct Filesystem {
    /// Type as the kernel names it: `ext4`, `xfs`, `tmpfs`, ...
    pub fs_type: String,
    /// The mounted device or source.
    pub source: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

impl Filesystem {
    /// Finds the filesystem under `dir` from `/proc/self/mountinfo`.
    pub fn of(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
        find_mount(&mountinfo, &dir)
            .with_context(|| format!("no mount in /proc/self/mountinfo holds {}", dir.display()))
    }

    /// Whether `fdatasync` here reaches no disk, so durable figures mean nothing.
    pub fn is_memory_backed(&self) -> bool {
        matches!(self.fs_type.as_str(), "tmpfs" | "ramfs")
    }

    /// One line for a report: `ext4 on /dev/vda, mounted at /`.
    pub fn describe(&self) -> String {
        format!("{} on {}, mounted at {}", self.fs_type, self.source, self.mount_point.display())
    }
}

/// The mount whose mount point is the longest prefix of `dir`; among equal
/// ones the last, because a later mount hides an earlier one at the same place.
fn find_mount(mountinfo: &str, dir: &Path) -> Option<Filesystem> {
    let mut best: Option<(usize, Filesystem)> = None;
    for line in mountinfo.lines() {
        // `36 35 98:0 /root /mnt rw,noatime master:1 - ext4 /dev/vda rw`: the
        // fifth field is the mount point; type and source follow the `-`.
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(mount_point) = left.split(' ').nth(4) else { continue };
        let mut right = right.split(' ');
        let (Some(fs_type), Some(source)) = (right.next(), right.next()) else { continue };
        let mount_point = PathBuf::from(unescape_octal(mount_point));
        if !dir.starts_with(&mount_point) {
            continue;
        }
        let depth = mount_point.components().count();
        if best.as_ref().is_none_or(|(best_depth, _)| depth >= *best_depth) {
            let filesystem = Filesystem { fs_type: fs_type.to_owned(), source: unescape_octal(source), mount_point };
            best = Some((depth, filesystem));
        }
    }
    best.map(|(_, filesystem)| filesystem)
}

/// Undoes the `\040`-style escapes of `/proc/self/mountinfo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match escape.and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The window over which [`settle`] measures how busy the cores are, and
/// the share of all cores it calls quiet.
const QUIET_WINDOW: Duration = Duration::from_millis(200);
const QUIET_BUSY_MAX: f64 = 0.25;

/// What [`settle`] found before a measured cell.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    /// How long the sync and the wait took.
    pub waited: Duration,
    /// The share of all cores busy over the last window (`None` where
    /// `/proc/stat` cannot be read, which counts as quiet).
    pub busy: Option<f64>,
}

impl Settled {
    /// Whether the cores fell quiet before the wait ran out.
    pub fn quiet(&self) -> bool {
        self.busy.is_none_or(|busy| busy <= QUIET_BUSY_MAX)
    }

    /// What to tell the operator when the cores did not fall quiet.
    pub fn busy_note(&self) -> Option<String> {
        (!self.quiet()).then(|| {
            format!(
                "    (the cores were still {:.0} % busy after {:.1} s; measuring anyway)",
                self.busy.unwrap_or(1.0) * 100.0,
                self.waited.as_secs_f64()
            )
        })
    }
}

/// Lets the machine settle before a measured cell, so that no system is
/// billed for another's deferred work. It writes out the dirty pages of the
/// filesystem under `dir`: a system that acknowledges before it fsyncs
/// leaves its writes for the kernel to flush some 30 s later, which on ext4
/// lands inside the next system's `fdatasync`s. Then it waits, up to
/// `max_wait`, until the cores fall quiet (a compaction, a vacuum, an index
/// catching up).
pub fn settle(dir: &Path, max_wait: Duration) -> anyhow::Result<Settled> {
    let begun = Instant::now();
    sync_filesystem(dir)?;
    loop {
        let busy = busy_share(QUIET_WINDOW);
        let settled = Settled { waited: begun.elapsed(), busy };
        if settled.quiet() || settled.waited >= max_wait {
            return Ok(settled);
        }
    }
}

/// How long writing out a filesystem's dirty pages may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// `syncfs(2)` on the filesystem holding `dir`, through coreutils' `sync -f`
/// (no `unsafe` here).
fn sync_filesystem(dir: &Path) -> anyhow::Result<()> {
    super::node::peers::run_bounded(Command::new("sync").arg("-f").arg(dir), SYNC_TIMEOUT)
        .with_context(|| format!("cannot write out the dirty pages under {}", dir.display()))?;
    Ok(())
}

/// The share of all cores that were busy (neither idle nor waiting on I/O)
/// over the next `window`, from `/proc/stat`.
fn busy_share(window: Duration) -> Option<f64> {
    let before = cpu_times(&std::fs::read_to_string("/proc/stat").ok()?)?;
    std::thread::sleep(window);
    let after = cpu_times(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let total = after.0.checked_sub(before.0)?;
    let idle = after.1.checked_sub(before.1)?;
    (total > 0).then(|| (total - idle.min(total)) as f64 / total as f64)
}

/// Total and idle (idle + iowait) jiffies from the `cpu` line of `/proc/stat`.
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already counted in user and nice.
    let total = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// CPU time (user and system) a process has used so far, from
/// `/proc/PID/stat` (`/proc/self/stat` for `None`), in clock ticks of
/// 10 ms (Linux reports them in `USER_HZ`, 100 a second, whatever the
/// kernel's own tick). `None` where it cannot be read.
pub fn process_cpu(pid: Option<u32>) -> Option<Duration> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_owned(), |pid| format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(path).ok()?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let user: u64 = fields.nth(11)?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`: other work on
/// the machine makes `fdatasync` figures noisy, so reports print them.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    Some([fields.next()?.ok()?, fields.next()?.ok()?, fields.next()?.ok()?])
}

/// Now, in UTC, as `2026-05-04 13:07 UTC`.
pub fn utc_now() -> String {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(seconds / 86_400).expect("the date fits");
    let (year, month, day) = civil_from_days(days);
    let minute_of_day = seconds % 86_400 / 60;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", minute_of_day / 60, minute_of_day % 60)
}

/// Year, month and day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for the proleptic Gregorian calendar).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = u32::try_from(day_of_year - (153 * month_index + 2) / 5 + 1).expect("1..=31");
    let month = u32::try_from(if month_index < 10 { month_index + 3 } else { month_index - 9 }).expect("1..=12");
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_cpu_and_a_missing_one_has_none() {
        let before = process_cpu(None).expect("this process's stat is readable");
        let (spin, mut x) = (Instant::now(), 0u64);
        while process_cpu(None).is_some_and(|cpu| cpu < before + Duration::from_millis(20))
            && spin.elapsed() < Duration::from_secs(10)
        {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu(None).is_some_and(|cpu| cpu >= before + Duration::from_millis(20)), "spun {x} times");
        assert_eq!(process_cpu(Some(std::process::id())).map(|cpu| cpu >= before), Some(true));
        assert_eq!(process_cpu(Some(u32::MAX)), None);
    }

    #[test]
    fn cpu_times_count_iowait_as_idle_and_guest_time_once() {
        let stat = "cpu  100 5 50 800 40 3 2 0 70 0\ncpu0 50 2 25 400 20 1 1 0 35 0\nintr 1\n";
        assert_eq!(cpu_times(stat), Some((1000, 840)));
        assert_eq!(cpu_times("intr 1\n"), None);
        assert_eq!(cpu_times("cpu  1 2 x\n"), None);
    }

    #[test]
    fn only_busy_cores_get_a_note() {
        let settled = |busy| Settled { waited: Duration::from_millis(5000), busy };
        assert_eq!(settled(Some(0.1)).busy_note(), None);
        assert_eq!(settled(None).busy_note(), None, "unknown counts as quiet");
        let note = settled(Some(0.9)).busy_note().expect("a note");
        assert!(note.contains("90 % busy after 5.0 s"), "{note}");
    }

    #[test]
    fn settle_syncs_the_filesystem_and_reports_a_share() {
        let dir = tempfile::tempdir().expect("a scratch dir");
        let settled = settle(dir.path(), Duration::ZERO).expect("syncfs on a scratch dir");
        assert!(settled.busy.is_some_and(|busy| (0.0..=1.0).contains(&busy)), "{settled:?}");
        assert!(settle(&dir.path().join("missing"), Duration::ZERO).is_err());
    }

    #[test]
    fn the_deepest_and_latest_mount_holds_a_path() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:25 / /tmp rw - tmpfs tmpfs rw
31 22 0:26 / /data\\040disk rw - xfs /dev/vdb rw
32 22 0:27 / /tmp rw - ext4 /dev/vdc rw
";
        let fs = find_mount(mountinfo, Path::new("/work/main/target")).expect("root holds it");
        assert_eq!((fs.fs_type.as_str(), fs.mount_point.as_path()), ("ext4", Path::new("/")));
        let fs = find_mount(mountinfo, Path::new("/tmp/x")).expect("/tmp holds it");
        assert_eq!((fs.fs_type.as_str(), fs.source.as_str()), ("ext4", "/dev/vdc"));
        let fs = find_mount(mountinfo, Path::new("/data disk/log")).expect("the escaped mount holds it");
        assert_eq!(fs.fs_type, "xfs");
        let fs = find_mount(mountinfo, Path::new("/tmpfoo")).expect("root holds it");
        assert_eq!(fs.fs_type, "ext4", "/tmp is not a prefix of /tmpfoo");
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
