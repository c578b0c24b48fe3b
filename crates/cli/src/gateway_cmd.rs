//! `edgebus gateway`: run a site's gateway as its own process, against the
//! site's node (DESIGN §3.4: a primary and a standby gateway of one site
//! are two such processes, or one of them embedded in the node).
//!
//! Settings come from a flag, else its `EDGEBUS_*` variable, else the
//! config file's top-level `site` and `[gateway]` table (as `edgebus serve`
//! reads them), else the default. The process connects to the node's
//! `edgebus.v1.Site` service ([`RemoteSite`]; an unreachable node stops it
//! with an error naming the address), refuses to start while another
//! running gateway of the site has its name
//! ([`check_name_free`]), starts the [`Gateway`], serves its WAN service
//! and its HTTP side (`edgebus_server::http::gateway_process`), and prints
//! one line, `edgebus gateway ready name=NAME wan=ADDR http=ADDR`.
//! SIGTERM or Ctrl-C stops the gateway (its routes checkpoint their cursors
//! and it releases the lease) and exits 0; a second signal exits at once.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use edgebus_gateway::members::check_name_free;
use edgebus_gateway::{Gateway, GatewayConfig, RemoteSite, Site};
use edgebus_server::limits::{ConnectionLimiter, LimitedListener, NodeLimits, Protocol};
use edgebus_server::node::{self, GatewayNodeConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{self, Settings};
use crate::serve::ShutdownSignals;

/// Default HTTP address of a gateway process (the node's are 7290 and
/// 7291, an embedded gateway's WAN 7292).
pub const GATEWAY_HTTP_LISTEN_DEFAULT: &str = "127.0.0.1:7293";
/// How long connecting to the node, and each call to it, may take.
pub const SITE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The end of `edgebus gateway --help`.
const GATEWAY_AFTER_LONG_HELP: &str = "\
Where settings come from, first match wins:
  1. a command-line flag (--name, ...)
  2. its environment variable (EDGEBUS_GATEWAY_NAME, ...)
  3. the TOML config file named by --config or EDGEBUS_CONFIG: its top-level
     `site` and its [gateway] table, as `edgebus serve` reads them (name,
     lease_ms, wan_listen, peers, heartbeat_ms, dead_after_ms, routes,
     policies); the node's own keys (data_dir, grpc_listen, ...) are read
     and ignored
  4. the built-in default

A gateway refuses to start while another running gateway of its site has
the same name (it heartbeats in the site's $gateway.members stream).
Once serving, it prints `edgebus gateway ready name=NAME wan=ADDR http=ADDR`.
SIGTERM or Ctrl-C stops it (its lease is released) and exits 0.";

/// Arguments of `edgebus gateway`.
#[derive(Debug, Clone, Args)]
#[command(after_long_help = GATEWAY_AFTER_LONG_HELP)]
pub struct GatewayArgs {
    /// TOML config file (its `site` and `[gateway]` table); flags and
    /// EDGEBUS_* variables override it.
    #[arg(long, env = "EDGEBUS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This gateway's name, unique among its site's gateways [default: gw-SITE].
    #[arg(long, env = "EDGEBUS_GATEWAY_NAME")]
    pub name: Option<String>,
    /// The site's name: lowercase letters, digits, '-' and '_' [default: local].
    #[arg(long, env = "EDGEBUS_SITE")]
    pub site: Option<String>,
    /// The site node's gRPC address [default: 127.0.0.1:7290].
    #[arg(long, env = "EDGEBUS_NODE", value_name = "ADDR")]
    pub node: Option<String>,
    /// WAN listen address for inbound links; port 0 picks a free port
    /// [default: 127.0.0.1:7292].
    #[arg(long, env = "EDGEBUS_WAN_LISTEN")]
    pub wan_listen: Option<SocketAddr>,
    /// HTTP listen address (health, metrics, stats, routes, policies); port
    /// 0 picks a free port [default: 127.0.0.1:7293].
    #[arg(long, env = "EDGEBUS_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// The lease in milliseconds: a standby takes over after this much
    /// silence of the active gateway [default: 3000].
    #[arg(long, env = "EDGEBUS_LEASE_MS")]
    pub lease_ms: Option<u64>,
}

/// What a gateway process runs with.
#[derive(Debug, Clone)]
pub struct GatewayProcessConfig {
    /// The gateway (its addresses are filled in once bound).
    pub gateway: GatewayConfig,
    /// The site node's gRPC address.
    pub node: String,
    /// WAN listen address.
    pub wan_listen: SocketAddr,
    /// HTTP listen address.
    pub http_listen: SocketAddr,
}

impl GatewayArgs {
    /// These flags (and variables) over the config file `file`, over the
    /// defaults.
    pub fn resolve(&self, file: Settings) -> anyhow::Result<GatewayProcessConfig> {
        let flags = Settings { site: self.site.clone(), wan_listen: self.wan_listen, ..Settings::default() };
        let settings = Settings { gateway: Some(true), ..flags.or(file) };
        let GatewayNodeConfig { mut gateway, wan_listen } = settings.gateway_config()?.expect("a gateway is asked for");
        if let Some(name) = &self.name {
            edgebus_gateway::def::route_name("--name", name).map_err(|e| anyhow::anyhow!("{e}"))?;
            gateway.name.clone_from(name);
        }
        if let Some(ms) = self.lease_ms {
            let range = edgebus_gateway::lease::LEASE_MS_MIN..=edgebus_gateway::lease::LEASE_MS_MAX;
            anyhow::ensure!(
                range.contains(&ms),
                "--lease-ms {ms} is outside {}..={} (milliseconds)",
                range.start(),
                range.end()
            );
            gateway.lease_ms = ms;
        }
        let node = self.node.clone().unwrap_or_else(|| node::GRPC_LISTEN_DEFAULT.to_owned());
        let http_listen = self
            .http_listen
            .unwrap_or_else(|| GATEWAY_HTTP_LISTEN_DEFAULT.parse().expect("the default address parses"));
        Ok(GatewayProcessConfig { gateway, node, wan_listen, http_listen })
    }
}

/// Runs a gateway process until SIGTERM or Ctrl-C.
pub fn run(args: &GatewayArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => Settings::default(),
    };
    let config = args.resolve(file)?;
    crate::allocator::spawn_idle_trimmer();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebus-gateway")
        .build()
        .context("cannot start the async runtime")?;
    // Installed before anything starts, so a signal right after the ready
    // line stops the gateway cleanly.
    let signals = {
        let _runtime = runtime.enter();
        ShutdownSignals::install()?
    };
    runtime.block_on(serve(config, signals.wait("stopping the gateway and releasing its lease"), |ready| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "edgebus gateway ready name={} wan={} http={}", ready.name, ready.wan, ready.http);
        let _ = out.flush();
    }))
}

/// What a gateway process announces once it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayReady {
    /// The gateway's name.
    pub name: String,
    /// Bound WAN address.
    pub wan: SocketAddr,
    /// Bound HTTP address.
    pub http: SocketAddr,
}

/// Runs the gateway of `config` until `shutdown` resolves; see the module
/// docs.
pub async fn serve(
    mut config: GatewayProcessConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(GatewayReady),
) -> anyhow::Result<()> {
    let wan_listener = TcpListener::bind(config.wan_listen)
        .await
        .with_context(|| format!("cannot listen for WAN links on {}", config.wan_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let ready = GatewayReady {
        name: config.gateway.name.clone(),
        wan: wan_listener.local_addr()?,
        http: http_listener.local_addr()?,
    };
    let site = Arc::new(RemoteSite::connect(&config.node, SITE_CALL_TIMEOUT).await.map_err(anyhow::Error::new)?);
    let gateway_config = &mut config.gateway;
    check_name_free(site.as_ref(), &gateway_config.site, &gateway_config.name, gateway_config.lease_ms).await?;
    if gateway_config.wan_address.is_empty() {
        gateway_config.wan_address = ready.wan.to_string();
    }
    if gateway_config.http_address.is_empty() {
        gateway_config.http_address = ready.http.to_string();
    }
    let gateway =
        Gateway::start(Arc::clone(&site) as Arc<dyn Site>, config.gateway).await.context("cannot start the gateway")?;

    let (stop, stopping) = watch::channel(false);
    let stopped = |mut stopping: watch::Receiver<bool>| async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
    };
    let mut wan = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(edgebus_gateway::receiver::WAN_H2_WINDOW_BYTES)
            .initial_connection_window_size(edgebus_gateway::receiver::WAN_H2_WINDOW_BYTES)
            .add_service(gateway.wan_service().into_server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(wan_listener),
                stopped(stopping.clone()),
            ),
    );
    let limits = NodeLimits::default();
    let mut http = tokio::spawn(edgebus_server::http::serve::serve(
        LimitedListener::new(http_listener, ConnectionLimiter::new(Protocol::Http, limits.max_connections)),
        edgebus_server::http::gateway_process::router(Arc::clone(&gateway), stopping.clone()),
        limits.http_idle_timeout,
        stopped(stopping.clone()),
    ));
    on_ready(ready);

    let ended = tokio::select! {
        () = shutdown => None,
        result = &mut wan => Some(format!("the WAN server stopped: {result:?}")),
        result = &mut http => Some(format!("the HTTP server stopped: {result:?}")),
    };
    // Routes checkpoint their cursors, inbound sessions end, the lease is
    // released; then the servers drain (bounded).
    let _ = stop.send(true);
    gateway.stop().await;
    let drained = tokio::time::timeout(node::DRAIN_TIMEOUT, async {
        if !wan.is_finished() {
            let _ = (&mut wan).await;
        }
        if !http.is_finished() {
            let _ = (&mut http).await;
        }
    })
    .await;
    if drained.is_err() {
        eprintln!("edgebus gateway: connections still open after {} s; closing them", node::DRAIN_TIMEOUT.as_secs());
        wan.abort();
        http.abort();
    }
    site.stop();
    match ended {
        None => Ok(()),
        Some(why) => Err(anyhow::anyhow!("{why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> GatewayArgs {
        use clap::Parser as _;
        let cli = crate::Cli::try_parse_from([&["edgebus", "gateway"], extra].concat()).expect("parses");
        let crate::Command::Gateway(args) = cli.command else { panic!("expected gateway") };
        args
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_the_defaults() {
        let file = config::parse(
            "site = \"us\"\ngrpc_listen = \"127.0.0.1:1\"\n[gateway]\nname = \"gw-file\"\nlease_ms = 500\nwan_listen = \"127.0.0.1:9\"\npeers = [\"eu\"]\n",
            std::path::Path::new("/etc/edgebus.toml"),
        )
        .expect("a valid file");
        let config = args(&[]).resolve(file.clone()).expect("resolves");
        assert_eq!((config.gateway.site.as_str(), config.gateway.name.as_str()), ("us", "gw-file"));
        assert_eq!((config.gateway.lease_ms, config.wan_listen.to_string()), (500, "127.0.0.1:9".to_owned()));
        assert_eq!(config.gateway.peers.len(), 1);
        // The node's own keys are not the gateway's.
        assert_eq!(config.node, "127.0.0.1:7290");
        assert_eq!(config.http_listen.to_string(), GATEWAY_HTTP_LISTEN_DEFAULT);
        let config = args(&[
            "--name",
            "gw-us-backup",
            "--site",
            "us2",
            "--node",
            "10.0.0.1:7290",
            "--wan-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--lease-ms",
            "3000",
        ])
        .resolve(file)
        .expect("resolves");
        assert_eq!((config.gateway.site.as_str(), config.gateway.name.as_str()), ("us2", "gw-us-backup"));
        assert_eq!((config.gateway.lease_ms, config.node.as_str()), (3000, "10.0.0.1:7290"));
        assert_eq!((config.wan_listen.port(), config.http_listen.port()), (0, 0));
    }

    #[test]
    fn the_defaults_name_the_gateway_after_its_site_and_bad_values_are_named() {
        let config = args(&["--site", "eu"]).resolve(Settings::default()).expect("resolves");
        assert_eq!((config.gateway.name.as_str(), config.gateway.lease_ms), ("gw-eu", 3000));
        let e = args(&["--lease-ms", "5"]).resolve(Settings::default()).unwrap_err().to_string();
        assert!(e.contains("--lease-ms 5 is outside"), "{e}");
        let e = args(&["--name", "a b"]).resolve(Settings::default()).unwrap_err().to_string();
        assert!(e.contains("--name"), "{e}");
        let e = args(&["--site", "EU"]).resolve(Settings::default()).unwrap_err().to_string();
        assert!(e.contains("site"), "{e}");
    }
}
