//! `edgebus serve`: run a site node in the foreground.
//!
//! Each setting comes from a flag, else its `EDGEBUS_*` environment
//! variable, else the config file (`--config`), else the default (data in
//! `./edgebus-data`, gRPC on 127.0.0.1:7290, HTTP on 127.0.0.1:7291); see
//! [`crate::config`]. Once both listeners are bound and the store is open it
//! prints one line, `edgebus ready grpc=ADDR http=ADDR data=DIR`, so scripts
//! and tests can wait for it. SIGTERM or Ctrl-C drains and exits 0; a second
//! signal exits at once with status 130. The signal handlers are installed
//! before the node starts, so a signal sent as soon as the ready line is
//! out drains too (without them the default action would kill the process).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use edgebus_log::FsyncPolicy;
use edgebus_server::node;
use edgebus_server::quota::QuotaSpec;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::{self, Settings};

/// The end of `edgebus serve --help`: precedence and every config key.
const SERVE_AFTER_LONG_HELP: &str = "\
Where settings come from, first match wins:
  1. a command-line flag (--data-dir, ...)
  2. its environment variable (EDGEBUS_DATA_DIR, ...)
  3. the TOML config file named by --config or EDGEBUS_CONFIG
  4. the built-in default
A config file is strict: an unknown key or a bad value stops the node with an
error naming the file, the key and the line.

Config file keys (every key is optional):
  data_dir = \"edgebus-data\"        directory of the log and the index
  grpc_listen = \"127.0.0.1:7290\"   gRPC listen address (port 0: any free port)
  http_listen = \"127.0.0.1:7291\"   HTTP listen address (port 0: any free port)
  fsync = \"always\"                 always | never | interval(MSms)
  [limits]
  max_connections = 1024           most connections each listener serves at once
  max_subscriptions = 10000        most subscriptions the node serves at once
  http_idle_timeout_ms = 30000     an HTTP connection that sends no request this long is closed
  [[quota]]                        an ingest quota (repeat the table for more; at most 1024)
  pattern = \"telemetry.>\"          the streams it limits
  events_per_sec = 1000            events per second, and/or
  bytes_per_sec = \"1MiB\"           payload bytes per second (B, KiB, MiB, GiB, kB, MB, GB)
  burst_events = 2000              optional, default one second's worth
  burst_bytes = \"2MiB\"             optional, default one second's worth
A write must be admitted by every quota whose pattern matches its stream;
over quota it is refused with code 103 (RESOURCE_EXHAUSTED) and a retry delay.
--quota flags (or EDGEBUS_QUOTA, entries separated by ';') replace the file's.

Once listening, the node prints `edgebus ready grpc=ADDR http=ADDR data=DIR`.
SIGTERM or Ctrl-C drains and exits 0; a second signal exits at once (130).";

/// Arguments of `edgebus serve`. Every setting is optional here: one that
/// is neither given nor in the environment comes from the config file or
/// the defaults ([`crate::config`]).
#[derive(Debug, Clone, Args)]
#[command(after_long_help = SERVE_AFTER_LONG_HELP)]
pub struct ServeArgs {
    /// TOML config file (keys in --help); flags and EDGEBUS_* variables
    /// override it.
    #[arg(long, env = "EDGEBUS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of the log and the index (created if missing) [default: edgebus-data].
    #[arg(long, env = "EDGEBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port [default: 127.0.0.1:7290].
    #[arg(long, env = "EDGEBUS_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP listen address (health, metrics, JSON API); port 0 picks a free
    /// port [default: 127.0.0.1:7291].
    #[arg(long, env = "EDGEBUS_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// When the log calls fdatasync: `always` (every acknowledged write is
    /// durable), `interval(MSms)` or `never` (see docs/log-format.md) [default: always].
    #[arg(long, env = "EDGEBUS_FSYNC")]
    pub fsync: Option<FsyncPolicy>,
    /// Most connections each listener (gRPC, HTTP) serves at once; more are
    /// refused (HTTP 503, code 103) [default: 1024].
    #[arg(long, env = "EDGEBUS_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// Most subscriptions the node serves at once [default: 10000].
    #[arg(long, env = "EDGEBUS_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Milliseconds an HTTP connection may take to send a request's
    /// headers, from its opening or its previous response, before the node
    /// closes it [default: 30000].
    #[arg(long, env = "EDGEBUS_HTTP_IDLE_TIMEOUT_MS", value_parser = clap::value_parser!(u64).range(10..))]
    pub http_idle_timeout_ms: Option<u64>,
    /// An ingest quota, `PATTERN,key=value,...` with the keys of a
    /// `[[quota]]` table, e.g. `telemetry.>,events_per_sec=1000,bytes_per_sec=1MiB`;
    /// repeat the flag for more (in EDGEBUS_QUOTA, separate them with `;`).
    /// Given here, they replace the config file's quotas.
    #[arg(long = "quota", env = "EDGEBUS_QUOTA", value_name = "QUOTA", value_delimiter = ';', value_parser = parse_quota)]
    pub quotas: Vec<QuotaSpec>,
    /// This site's name: lowercase letters, digits, '-' and '_' [default: local].
    #[arg(long, env = "EDGEBUS_SITE")]
    pub site: Option<String>,
    /// Also run the site's gateway: its routes (config `[[gateway.routes]]`,
    /// or `edgebus routes add`) and the WAN listener for inbound links. A
    /// `[gateway]` table in the config file turns it on too.
    #[arg(long, env = "EDGEBUS_GATEWAY")]
    pub gateway: bool,
    /// The gateway's WAN listen address; port 0 picks a free port
    /// [default: 127.0.0.1:7292].
    #[arg(long, env = "EDGEBUS_WAN_LISTEN")]
    pub wan_listen: Option<SocketAddr>,
}

/// A `--quota` value; its errors name the key (`events_per_sec: must be > 0, got "0"`).
fn parse_quota(text: &str) -> Result<QuotaSpec, String> {
    QuotaSpec::parse_flag(text).map_err(|e| e.to_string())
}

impl ServeArgs {
    /// The settings given by flags and environment variables (clap has
    /// already let each flag win over its variable).
    pub fn settings(&self) -> Settings {
        Settings {
            data_dir: self.data_dir.clone(),
            grpc_listen: self.grpc_listen,
            http_listen: self.http_listen,
            fsync: self.fsync,
            max_connections: self.max_connections.map(|max| usize::try_from(max).unwrap_or(usize::MAX)),
            max_subscriptions: self.max_subscriptions,
            http_idle_timeout_ms: self.http_idle_timeout_ms,
            quotas: (!self.quotas.is_empty()).then(|| self.quotas.clone()),
            site: self.site.clone(),
            gateway: self.gateway.then_some(true),
            wan_listen: self.wan_listen,
            gateway_file: None,
        }
    }
}

/// Runs a node until SIGTERM or Ctrl-C.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => Settings::default(),
    };
    let config = args.settings().or(file).resolve()?;
    crate::allocator::spawn_idle_trimmer();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-node")
        .build()
        .context("cannot start the async runtime")?;
    let data_dir = config.data_dir.display().to_string();
    // Installed now, before the node can report ready (see the module docs).
    let signals = {
        let _runtime = runtime.enter();
        ShutdownSignals::install()?
    };
    let draining = "draining: finishing acknowledged work and closing the log";
    runtime.block_on(node::run(config, signals.wait(draining), move |ready| {
        let mut out = std::io::stdout().lock();
        let wan = ready.wan.map(|wan| format!(" wan={wan}")).unwrap_or_default();
        let _ = writeln!(out, "edgebus ready grpc={} http={}{wan} data={data_dir}", ready.grpc, ready.http);
        let _ = out.flush();
    }))
}

/// The SIGTERM and SIGINT (Ctrl-C) handlers of a node or a gateway
/// process. From the moment they are installed, those signals no longer
/// end the process by their default action: they are queued until
/// [`ShutdownSignals::wait`] takes them.
pub(crate) struct ShutdownSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl ShutdownSignals {
    /// Installs both handlers; needs a Tokio runtime's context.
    pub(crate) fn install() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot install a SIGINT handler")?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT, saying that the process is
    /// `doing` what it does then; a second one exits at once.
    pub(crate) async fn wait(mut self, doing: &'static str) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        eprintln!("edgebus: {doing} (signal again to exit at once)");
        tokio::spawn(async move {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
            eprintln!("edgebus: second signal: exiting at once");
            std::process::exit(130);
        });
    }
}
