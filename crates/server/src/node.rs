//! Running a site node: open the store, serve gRPC and HTTP, announce
//! readiness, drain on shutdown.
//!
//! Lifecycle: [`run`] opens the store (which recovers the log and replays
//! the index), binds both listeners, calls `on_ready` with the bound
//! addresses, and serves until `shutdown` resolves. Then it stops accepting,
//! lets in-flight requests finish (each write is acknowledged only once
//! durable), and closes the store, which flushes the index and syncs the log.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use edgebus_proto::v1::consumer_groups_server::ConsumerGroupsServer;
use edgebus_proto::v1::event_store_server::EventStoreServer;
use edgebus_proto::v1::site_server::SiteServer;
use edgebus_store::{Store, StoreConfig};
use tokio::net::TcpListener;

use crate::group::service::ConsumerGroupsService;
use crate::grpc::EventStoreService;
use crate::grpc_site::SiteService;
use crate::limits::{LimitedIncoming, LimitedListener, NodeLimits};
use crate::live::LiveFeed;
use crate::quota::{QuotaSpec, Quotas};
use crate::state::NodeState;

/// Default gRPC address: loopback only, so a node started with no arguments
/// is not reachable from other hosts.
pub const GRPC_LISTEN_DEFAULT: &str = "127.0.0.1:7290";
/// Default HTTP address (health, metrics, JSON API).
pub const HTTP_LISTEN_DEFAULT: &str = "127.0.0.1:7291";
/// Default data directory, relative to the working directory.
pub const DATA_DIR_DEFAULT: &str = "edgebus-data";
/// Largest gRPC message the node accepts: one maximal append (the log's
/// default append limit) plus framing.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 8 * 1024 * 1024;
const _: () = assert!(edgebus_types::limits::LOG_APPEND_BYTES_DEFAULT as usize <= GRPC_MESSAGE_BYTES_MAX);

/// How long a stopping node waits for open connections to finish their
/// requests before it closes them. Writes already handed to the store
/// complete either way: closing the store drains its queue.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A server that stopped before it was asked to.
fn server_ended<E: std::fmt::Display>(
    name: &str,
    result: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Error {
    match result {
        Ok(Ok(())) => anyhow::anyhow!("the {name} server stopped on its own"),
        Ok(Err(e)) => anyhow::anyhow!("the {name} server failed: {e}"),
        Err(e) => anyhow::anyhow!("the {name} server task failed: {e}"),
    }
}

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the log and the index live.
    pub data_dir: PathBuf,
    /// gRPC listen address (port 0: any free port).
    pub grpc_listen: SocketAddr,
    /// HTTP listen address (port 0: any free port).
    pub http_listen: SocketAddr,
    /// Store settings (fsync policy, limits).
    pub store: StoreConfig,
    /// The node's own limits: connections per listener, subscriptions,
    /// the HTTP idle timeout.
    pub limits: NodeLimits,
    /// Ingest quotas, in declared order (see [`crate::quota`]); at most
    /// [`NODE_QUOTAS_MAX`](edgebus_types::limits::NODE_QUOTAS_MAX).
    pub quotas: Vec<QuotaSpec>,
    /// The site's gateway, if this node runs it.
    pub gateway: Option<GatewayNodeConfig>,
}

/// A node's gateway: routes, policies, and where inbound WAN links connect.
#[derive(Debug, Clone)]
pub struct GatewayNodeConfig {
    /// Routes, policies, peers and timing.
    pub gateway: edgebus_gateway::GatewayConfig,
    /// WAN listen address (port 0: any free port).
    pub wan_listen: SocketAddr,
}

/// Default WAN address of a gateway.
pub const WAN_LISTEN_DEFAULT: &str = "127.0.0.1:7292";

/// The addresses a started node listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Bound gRPC address.
    pub grpc: SocketAddr,
    /// Bound HTTP address.
    pub http: SocketAddr,
    /// Bound WAN address, when the node runs a gateway.
    pub wan: Option<SocketAddr>,
}

/// Runs a node until `shutdown` resolves; see the module docs.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Ready),
) -> anyhow::Result<()> {
    // Checked before anything is opened: a bad quota stops the node at once.
    let quotas = Quotas::new(config.quotas.clone(), std::time::Instant::now()).context("invalid ingest quotas")?;
    let data_dir = config.data_dir.clone();
    let store_config = config.store.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, store_config))
        .await
        .context("the store's open task failed")?
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let store = Arc::new(store);
    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let wan_listener = match &config.gateway {
        Some(gateway) => Some(
            TcpListener::bind(gateway.wan_listen)
                .await
                .with_context(|| format!("cannot listen for WAN links on {}", gateway.wan_listen))?,
        ),
        None => None,
    };
    let ready = Ready {
        grpc: grpc_listener.local_addr()?,
        http: http_listener.local_addr()?,
        wan: wan_listener.as_ref().map(TcpListener::local_addr).transpose()?,
    };

    // One shutdown signal, fanned out to both servers and every subscription.
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_sender.send(true);
    });
    let live = LiveFeed::start(Arc::clone(&store)).context("cannot start the live feed thread")?;
    let state = NodeState::new(Arc::clone(&store), live, stop.clone(), &config.limits, quotas);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };

    crate::group::Groups::load(&state).await.context("cannot start the consumer groups")?;
    // The site as its gateways see it (embedded here, or remote through the
    // `Site` gRPC service), with the terms it has seen from other sites.
    let site = Arc::new(edgebus_gateway::LocalSite::new(Arc::clone(&store), state.live.watch_end()));
    let _ = state.site.set(Arc::clone(&site));

    // The gateway: route tasks follow the log's end through the live feed.
    let mut wan = None;
    if let (Some(gateway_config), Some(listener)) = (&config.gateway, wan_listener) {
        let mut gateway_config = gateway_config.gateway.clone();
        if gateway_config.wan_address.is_empty() {
            gateway_config.wan_address = listener.local_addr()?.to_string();
        }
        if gateway_config.http_address.is_empty() {
            gateway_config.http_address = http_listener.local_addr()?.to_string();
        }
        let gateway =
            edgebus_gateway::Gateway::start(site.clone(), gateway_config).await.context("cannot start the gateway")?;
        let _ = state.gateway.set(Arc::clone(&gateway));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        wan = Some(tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .initial_stream_window_size(edgebus_gateway::receiver::WAN_H2_WINDOW_BYTES)
                .initial_connection_window_size(edgebus_gateway::receiver::WAN_H2_WINDOW_BYTES)
                .add_service(gateway.wan_service().into_server())
                .serve_with_incoming_shutdown(incoming, stopped(stop.clone())),
        ));
    }

    let service = EventStoreServer::new(EventStoreService::new(Arc::clone(&state)))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let groups_service = ConsumerGroupsServer::new(ConsumerGroupsService::new(Arc::clone(&state)))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    // Gateways in their own process (`edgebus gateway`) reach the site here.
    let site_service = SiteServer::new(SiteService::new(Arc::clone(&state)))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    // Each listener admits at most `max_connections` at once and refuses
    // the rest in its own protocol (see `limits`); the limiters live in the
    // state so that `/metrics` can report them.
    let grpc_limiter = Arc::clone(&state.grpc_connections);
    let http_limiter = Arc::clone(&state.http_connections);
    let mut grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .add_service(groups_service)
            .add_service(site_service)
            .serve_with_incoming_shutdown(LimitedIncoming::new(grpc_listener, grpc_limiter), stopped(stop.clone())),
    );
    let mut http = tokio::spawn(crate::http::serve::serve(
        LimitedListener::new(http_listener, http_limiter),
        crate::http::router(Arc::clone(&state)),
        config.limits.http_idle_timeout,
        stopped(stop.clone()),
    ));

    on_ready(ready);
    // Serve until shutdown (or until a server fails), then give open
    // connections a bounded time to finish their requests: a client that
    // keeps an idle connection open must not hold the node up for ever.
    let (mut grpc_ended, mut http_ended) = (None, None);
    tokio::select! {
        biased;
        () = stopped(stop.clone()) => {}
        result = &mut grpc => grpc_ended = Some(result),
        result = &mut http => http_ended = Some(result),
    }
    // A server that finished its graceful stop can be seen before the stop
    // itself (both are woken by the same signal); it only stopped "on its
    // own" if no stop was asked for.
    if !*stop.borrow() {
        if let Some(result) = grpc_ended {
            return Err(server_ended("gRPC", result));
        }
        if let Some(result) = http_ended {
            return Err(server_ended("HTTP", result));
        }
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let grpc_result = match grpc_ended.take() {
            Some(result) => result,
            None => (&mut grpc).await,
        };
        let http_result = match http_ended.take() {
            Some(result) => result,
            None => (&mut http).await,
        };
        (grpc_result, http_result)
    })
    .await;
    match drained {
        Ok((grpc_result, http_result)) => {
            grpc_result.context("the gRPC server task failed")?.context("the gRPC server failed")?;
            http_result.context("the HTTP server task failed")?.context("the HTTP server failed")?;
        }
        Err(_) => {
            eprintln!("edgebus: connections still open after {} s of draining; closing them", DRAIN_TIMEOUT.as_secs());
            grpc.abort();
            http.abort();
        }
    }

    // Routes checkpoint their cursors; inbound sessions end.
    if let Some(gateway) = state.gateway.get() {
        gateway.stop().await;
    }
    if let Some(wan) = wan
        && tokio::time::timeout(DRAIN_TIMEOUT, wan).await.is_err()
    {
        eprintln!("edgebus: WAN links still open after {} s of draining", DRAIN_TIMEOUT.as_secs());
    }
    // Every request has finished; the groups write their last checkpoints.
    // Then stop following the log, and close the store (index flush, log
    // sync).
    state.groups.stopped().await;
    let feed_state = Arc::clone(&state);
    tokio::task::spawn_blocking(move || feed_state.live.stop()).await.context("the live feed's stop task failed")?;
    let closing = Arc::clone(&store);
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("the store's close task failed")?
        .context("closing the store")?;
    Ok(())
}
