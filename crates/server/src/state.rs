//! What every service of a node shares: the store, the metrics, the live
//! feed of committed events, the ingest quotas and the connection limiters.
//! One [`NodeState`] per node, behind an `Arc`.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use edgebus_store::Store;

use crate::group::Groups;
use crate::limits::{ConnectionLimiter, NodeLimits, Protocol};
use crate::live::LiveFeed;
use crate::metrics::Metrics;
use crate::quota::Quotas;

/// The node's shared state.
#[derive(Debug)]
pub struct NodeState {
    /// The event store.
    pub store: Arc<Store>,
    /// Counters, gauges and histograms for `/metrics` and `/v1/stats`.
    pub metrics: Metrics,
    /// The feed of committed events for live subscriptions.
    pub live: LiveFeed,
    /// Becomes true when the node starts to stop; subscriptions end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Subscriptions open now (all transports).
    pub subscriptions_open: Arc<AtomicUsize>,
    /// Most subscriptions open at once.
    pub subscriptions_max: usize,
    /// The consumer groups (started by `Groups::load`).
    pub groups: Groups,
    /// Ingest quotas, checked before a client's write reaches the store.
    pub quotas: Quotas,
    /// The gRPC listener's connection cap (its figures are in `/metrics`).
    pub grpc_connections: Arc<ConnectionLimiter>,
    /// The HTTP listener's connection cap.
    pub http_connections: Arc<ConnectionLimiter>,
    /// The site's gateway, when the node runs one (set once at start).
    pub gateway: std::sync::OnceLock<Arc<edgebus_gateway::Gateway>>,
    /// The site as gateways see it (set once at start).
    pub site: std::sync::OnceLock<Arc<edgebus_gateway::LocalSite>>,
}

impl NodeState {
    /// The state of a node over `store`, fed by `live`, within `limits`
    /// (its connection limiters are made here) and `quotas`.
    pub fn new(
        store: Arc<Store>,
        live: LiveFeed,
        stopping: tokio::sync::watch::Receiver<bool>,
        limits: &NodeLimits,
        quotas: Quotas,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics: Metrics::default(),
            live,
            stopping,
            subscriptions_open: Arc::new(AtomicUsize::new(0)),
            groups: Groups::default(),
            subscriptions_max: limits.max_subscriptions,
            quotas,
            grpc_connections: ConnectionLimiter::new(Protocol::Grpc, limits.max_connections),
            http_connections: ConnectionLimiter::new(Protocol::Http, limits.max_connections),
            gateway: std::sync::OnceLock::new(),
            site: std::sync::OnceLock::new(),
        })
    }
}
