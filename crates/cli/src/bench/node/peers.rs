//! The processes of `edgebus bench node`: our node (`edgebus serve`, this
//! executable), `nats-server -js` and a private PostgreSQL cluster, each
//! started in the scratch directory, installed with apt-get first when it is
//! missing, waited for within [`STARTUP_TIMEOUT`] and stopped by a guard when
//! dropped, so that an error or Ctrl-C leaves no process behind.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use edgebus_log::FsyncPolicy;

use super::progress;

/// How long a peer or our node may take to start before it is reported as not run.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `apt-get install` of a missing peer may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long stopping PostgreSQL (`pg_ctl stop -m immediate`) may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Output lines of a child kept to explain a failed start.
const OUTPUT_TAIL_LINES: usize = 20;
/// PostgreSQL's `max_connections`: one per client at 256 clients, plus setup.
pub const POSTGRES_CONNECTIONS_MAX: usize = 300;
/// The Unix user a private PostgreSQL cluster runs as when we are root
/// (PostgreSQL refuses to run as root).
const POSTGRES_USER_WHEN_ROOT: &str = "postgres";

/// A child process, killed and reaped when dropped. Its stdout and stderr
/// are read by threads until it exits, so that it never blocks on a full
/// pipe; the last lines are kept for error messages.
#[derive(Debug)]
pub struct ChildGuard {
    name: &'static str,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ChildGuard {
    /// Starts `command` with piped output and waits until `ready` accepts a
    /// line of its stdout or stderr, returning what `ready` made of it.
    pub(crate) fn spawn_until<T>(
        name: &'static str,
        mut command: Command,
        mut ready: impl FnMut(&str) -> Option<T>,
    ) -> anyhow::Result<(Self, T)> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (lines_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().map(|out| Box::new(out) as Box<dyn Read + Send>);
        let stderr = child.stderr.take().map(|err| Box::new(err) as Box<dyn Read + Send>);
        for output in [stdout, stderr].into_iter().flatten() {
            let (lines_tx, tail) = (lines_tx.clone(), Arc::clone(&tail));
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    let mut kept = tail.lock().expect("tail lock");
                    if kept.len() == OUTPUT_TAIL_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line.clone());
                    drop(kept);
                    // Once started, nobody listens: the line is only drained.
                    let _ = lines_tx.send(line);
                }
            });
        }
        drop(lines_tx);
        let guard = Self { name, child, tail };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(value) = ready(&line) {
                        return Ok((guard, value));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{name} did not start within {STARTUP_TIMEOUT:?}{}", guard.output_tail());
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{name} exited before it was ready{}", guard.output_tail());
                }
            }
        }
    }

    /// `: last output lines` for an error message, or nothing.
    fn output_tail(&self) -> String {
        let tail = self.tail.lock().expect("tail lock");
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {}", tail.iter().cloned().collect::<Vec<_>>().join(" | "))
        }
    }

    /// The process id, for `perf record -p`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A benchmark's scratch data is thrown away, so there is nothing to
        // drain: SIGKILL and reap.
        let _ = self.child.kill();
        let _ = self.child.wait();
        progress(format_args!("  stopped {}", self.name));
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for servers that cannot
/// be told to pick one and report it).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Runs `command` to completion within `timeout`; its output is returned, or
/// an error with its stderr.
pub(crate) fn run_bounded(command: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let program = format!("{:?}", command.get_program());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let (mut stdout, mut stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    ensure!(
        status.success(),
        "{program} failed ({status}): {}",
        last_line(&err).unwrap_or(last_line(&out).unwrap_or(""))
    );
    Ok(out + &err)
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().rev().find(|line| !line.trim().is_empty())
}

fn is_root() -> bool {
    run_bounded(Command::new("id").arg("-u"), Duration::from_secs(5)).is_ok_and(|out| out.trim() == "0")
}

/// The first of `names` found as an executable file on `$PATH` or in the
/// sbin directories (where Debian puts daemons, often not on a user's PATH).
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> =
        std::env::split_paths(&path).chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from)).collect();
    names.iter().find_map(|name| dirs.iter().map(|dir| dir.join(name)).find(|candidate| candidate.is_file()))
}

/// `apt-get install -y PACKAGE` (after `apt-get update` if the first try
/// fails), as root only.
fn apt_install(package: &str) -> anyhow::Result<()> {
    ensure!(is_root(), "{package} is missing and only root may install it with apt-get");
    progress(format_args!("  installing {package} with apt-get ..."));
    let install = || {
        let mut command = Command::new("apt-get");
        command.args(["install", "-y", "--no-install-recommends", package]).env("DEBIAN_FRONTEND", "noninteractive");
        run_bounded(&mut command, INSTALL_TIMEOUT)
    };
    if install().is_ok() {
        return Ok(());
    }
    run_bounded(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"), INSTALL_TIMEOUT)
        .context("apt-get update")?;
    install().with_context(|| format!("apt-get install {package}"))?;
    Ok(())
}

/// Our node: `edgebus serve` (this executable) on 127.0.0.1 port 0.
#[derive(Debug)]
pub struct EdgebusNode {
    pub guard: ChildGuard,
    /// The gRPC address from the ready line.
    pub grpc: SocketAddr,
}

/// Starts `edgebus serve` on `data_dir` with `fsync` and reads its ready
/// line, `edgebus ready grpc=ADDR http=ADDR data=DIR`. `EDGEBUS_*`
/// variables of this process are not passed on, so that only the
/// benchmark's settings apply.
pub fn start_edgebus(data_dir: &Path, fsync: FsyncPolicy) -> anyhow::Result<EdgebusNode> {
    let mut command = Command::new(std::env::current_exe().context("cannot find this executable")?);
    command
        .args(["serve", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--fsync"])
        .arg(fsync.to_string())
        .arg("--data-dir")
        .arg(data_dir);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBUS_") {
            command.env_remove(name);
        }
    }
    let (guard, grpc) = ChildGuard::spawn_until("edgebus serve", command, |line| {
        let rest = line.strip_prefix("edgebus ready ")?;
        rest.split_whitespace().find_map(|word| word.strip_prefix("grpc="))?.parse::<SocketAddr>().ok()
    })?;
    Ok(EdgebusNode { guard, grpc })
}

/// The NATS server binary to use, installing Debian's `nats-server` if
/// none is given and none is found.
pub fn find_nats_server(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        ensure!(path.is_file(), "--nats-server {} is not a file", path.display());
        return Ok(path.to_path_buf());
    }
    if let Some(path) = find_program(&["nats-server"]) {
        return Ok(path);
    }
    apt_install("nats-server")?;
    find_program(&["nats-server"]).context("nats-server is still missing after apt-get install")
}

/// What a NATS server binary is and can do.
#[derive(Debug, Clone)]
pub struct NatsBinary {
    pub path: PathBuf,
    /// `v2.9.10`.
    pub version: String,
    /// Whether it accepts `jetstream { sync_interval: always }` (fsync on
    /// every write): 2.9.10 refuses the key, 2.15.1 accepts it.
    pub sync_always_supported: bool,
}

/// Asks `path` for its version and tests a config with `sync_interval: always` (`-t`).
pub fn probe_nats(path: &Path, dir: &Path) -> anyhow::Result<NatsBinary> {
    let out = run_bounded(Command::new(path).arg("--version"), Duration::from_secs(10))?;
    let version = out.split_whitespace().find(|word| word.starts_with('v')).unwrap_or("unknown").to_owned();
    std::fs::create_dir_all(dir)?;
    let config = dir.join("probe.conf");
    std::fs::write(&config, nats_config(&dir.join("probe-store"), true))?;
    let sync_always_supported =
        run_bounded(Command::new(path).arg("-t").arg("-c").arg(&config), Duration::from_secs(10)).is_ok();
    Ok(NatsBinary { path: path.to_path_buf(), version, sync_always_supported })
}

/// A server configuration: loopback, a port the server picks (reported in
/// its log), JetStream storing in `store_dir`, optionally fsync per write.
fn nats_config(store_dir: &Path, sync_always: bool) -> String {
    let sync = if sync_always { "  sync_interval: always\n" } else { "" };
    format!(
        "host: \"127.0.0.1\"\nport: -1\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
        store_dir.display().to_string().replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// A running `nats-server -js`.
#[derive(Debug)]
pub struct NatsServer {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
}

/// Starts `binary` with JetStream storing under `dir` and waits for
/// `Server is ready`; the client port comes from its log.
pub fn start_nats(binary: &NatsBinary, dir: &Path, sync_always: bool) -> anyhow::Result<NatsServer> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("nats.conf");
    std::fs::write(&config, nats_config(&dir.join("jetstream"), sync_always))?;
    let mut command = Command::new(&binary.path);
    command.arg("-c").arg(&config);
    let mut listening = None;
    let (guard, addr) = ChildGuard::spawn_until("nats-server", command, |line| {
        if let Some((_, rest)) = line.split_once("Listening for client connections on ") {
            listening = rest.trim().parse::<SocketAddr>().ok();
        }
        if line.contains("Server is ready") { listening } else { None }
    })?;
    Ok(NatsServer { guard, addr })
}

/// A private PostgreSQL cluster in the scratch directory, stopped
/// (`pg_ctl stop -m immediate`) when dropped.
#[derive(Debug)]
pub struct Postgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    run_as: Option<&'static str>,
    pub port: u16,
    /// `PostgreSQL 15.18`.
    pub version: String,
}

impl Postgres {
    /// The connection string for `tokio_postgres::connect`.
    pub fn connection_string(&self) -> String {
        format!("host=127.0.0.1 port={} user=bench dbname=postgres", self.port)
    }

    fn command(&self, program: &str) -> Command {
        command_as(self.run_as, &self.bin_dir.join(program))
    }

    /// The postmaster's process id, from `postmaster.pid`.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.args(["stop", "-m", "immediate", "-w", "-D"]).arg(&self.data_dir);
        if run_bounded(&mut stop, STOP_TIMEOUT).is_err()
            && let Some(pid) = self.pid()
        {
            let _ = run_bounded(Command::new("kill").args(["-KILL", &pid.to_string()]), Duration::from_secs(5));
        }
        progress(format_args!("  stopped postgres"));
    }
}

/// `program` run as `user` (through `runuser`) or as ourselves.
fn command_as(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The newest `/usr/lib/postgresql/VERSION/bin` holding `initdb`, `pg_ctl`
/// and `postgres`.
fn find_postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse::<u32>().ok()?, entry.path().join("bin"))))
        .filter(|(_, bin)| ["initdb", "pg_ctl", "postgres"].iter().all(|p| bin.join(p).is_file()))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).or_else(|| find_program(&["initdb"]).and_then(|p| Some(p.parent()?.into())))
}

/// Installs PostgreSQL if needed, creates a cluster in `dir` (as the
/// `postgres` user when we are root), starts it on a free loopback port
/// with `fsync=on` and `synchronous_commit=on`, and waits until it accepts
/// connections.
pub fn start_postgres(dir: &Path) -> anyhow::Result<Postgres> {
    let bin_dir = match find_postgres_bin() {
        Some(bin) => bin,
        None => {
            apt_install("postgresql")?;
            find_postgres_bin().context("initdb is still missing after apt-get install postgresql")?
        }
    };
    let run_as = is_root().then_some(POSTGRES_USER_WHEN_ROOT);
    std::fs::create_dir_all(dir)?;
    if let Some(user) = run_as {
        let uid = run_bounded(Command::new("id").args(["-u", user]), Duration::from_secs(5))
            .with_context(|| format!("we are root and PostgreSQL refuses root, but there is no user {user:?}"))?;
        let gid = run_bounded(Command::new("id").args(["-g", user]), Duration::from_secs(5))?;
        let (uid, gid): (u32, u32) = (uid.trim().parse()?, gid.trim().parse()?);
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .with_context(|| format!("cannot give {} to {user}", dir.display()))?;
        // The scratch directory above is private to us (0700); its owner
        // must be able to reach the cluster's directory inside it.
        if let Some(parent) = dir.parent() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let version = run_bounded(Command::new(bin_dir.join("postgres")).arg("--version"), Duration::from_secs(10))?
        .trim()
        .replace("postgres (PostgreSQL) ", "PostgreSQL ");
    let data_dir = dir.join("data");
    let socket_dir = dir.to_path_buf();
    let mut initdb = command_as(run_as, &bin_dir.join("initdb"));
    // --no-sync: the cluster's creation is setup, not measured.
    initdb
        .args(["--auth=trust", "--username=bench", "--encoding=UTF8", "--locale=C", "--no-sync", "-D"])
        .arg(&data_dir);
    run_bounded(&mut initdb, STARTUP_TIMEOUT).context("initdb")?;
    let port = free_port()?;
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on \
         -c max_connections={POSTGRES_CONNECTIONS_MAX}",
        socket_dir.display()
    );
    let postgres = Postgres { bin_dir, data_dir, run_as, port, version };
    let mut start = postgres.command("pg_ctl");
    start
        .args(["start", "-w", "-t", &STARTUP_TIMEOUT.as_secs().to_string(), "-o", &options, "-l"])
        .arg(dir.join("postgres.log"))
        .arg("-D")
        .arg(&postgres.data_dir);
    if let Err(error) = run_bounded(&mut start, STARTUP_TIMEOUT + Duration::from_secs(5)) {
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        return Err(error.context(format!("pg_ctl start: {}", last_line(&log).unwrap_or("no log"))));
    }
    Ok(postgres)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nats_config_asks_for_a_free_loopback_port_and_sync_only_when_told() {
        let config = nats_config(Path::new("/tmp/a \"b\""), false);
        assert!(config.contains("host: \"127.0.0.1\"\nport: -1\n"), "{config}");
        assert!(config.contains("store_dir: \"/tmp/a \\\"b\\\"\""), "{config}");
        assert!(!config.contains("sync_interval"), "{config}");
        assert!(nats_config(Path::new("/x"), true).contains("sync_interval: always"));
    }
}
