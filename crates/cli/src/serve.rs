//! `edgebus serve`: run a site node in the foreground.
//!
//! Settings come from flags, else `EDGEBUS_*` environment variables, else the
//! defaults (data in `./edgebus-data`, gRPC on 127.0.0.1:7290, HTTP on
//! 127.0.0.1:7291). Once both listeners are bound and the store is open it
//! prints one line, `edgebus ready grpc=ADDR http=ADDR data=DIR`, so scripts
//! and tests can wait for it. SIGTERM or Ctrl-C drains and exits 0; a second
//! signal exits at once with status 130.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use edgebus_log::FsyncPolicy;
use edgebus_server::limits::NodeLimits;
use edgebus_server::node::{self, NodeConfig};
use edgebus_store::StoreConfig;
use edgebus_types::limits::{NODE_CONNECTIONS_MAX_DEFAULT, NODE_SUBSCRIPTIONS_MAX_DEFAULT};

/// Arguments of `edgebus serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory of the log and the index (created if missing).
    #[arg(long, env = "EDGEBUS_DATA_DIR", default_value = node::DATA_DIR_DEFAULT)]
    pub data_dir: PathBuf,
    /// gRPC listen address; port 0 picks a free port.
    #[arg(long, env = "EDGEBUS_GRPC_LISTEN", default_value = node::GRPC_LISTEN_DEFAULT)]
    pub grpc_listen: SocketAddr,
    /// HTTP listen address (health, metrics, JSON API); port 0 picks a free port.
    #[arg(long, env = "EDGEBUS_HTTP_LISTEN", default_value = node::HTTP_LISTEN_DEFAULT)]
    pub http_listen: SocketAddr,
    /// When the log calls fdatasync: `always` (every acknowledged write is
    /// durable), `interval(MSms)` or `never` (see docs/log-format.md).
    #[arg(long, env = "EDGEBUS_FSYNC", default_value = "always")]
    pub fsync: FsyncPolicy,
    /// Most connections each listener (gRPC, HTTP) serves at once; more are
    /// refused (HTTP 503, code 103).
    #[arg(long, env = "EDGEBUS_MAX_CONNECTIONS", default_value_t = NODE_CONNECTIONS_MAX_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Most subscriptions the node serves at once.
    #[arg(long, env = "EDGEBUS_MAX_SUBSCRIPTIONS", default_value_t = NODE_SUBSCRIPTIONS_MAX_DEFAULT)]
    pub max_subscriptions: usize,
}

/// Runs a node until SIGTERM or Ctrl-C.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-node")
        .build()
        .context("cannot start the async runtime")?;
    let mut store = StoreConfig::default();
    store.log.fsync = args.fsync;
    let config = NodeConfig {
        data_dir: args.data_dir.clone(),
        grpc_listen: args.grpc_listen,
        http_listen: args.http_listen,
        store,
        limits: NodeLimits {
            max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
            max_subscriptions: args.max_subscriptions,
        },
    };
    let data_dir = args.data_dir.display().to_string();
    runtime.block_on(node::run(config, shutdown_signal(), move |ready| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "edgebus ready grpc={} http={} data={data_dir}", ready.grpc, ready.http);
        let _ = out.flush();
    }))
}

/// Resolves at the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("edgebus: draining: finishing acknowledged work and closing the log (signal again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("edgebus: second signal: exiting at once");
        std::process::exit(130);
    });
}
