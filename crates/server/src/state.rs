//! What every service of a node shares: the store, the metrics and the live
//! feed of committed events. One [`NodeState`] per node, behind an `Arc`.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use edgebus_store::Store;

use crate::group::Groups;
use crate::live::LiveFeed;
use crate::metrics::Metrics;

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
}

impl NodeState {
    /// The state of a node over `store`, fed by `live`.
    pub fn new(
        store: Arc<Store>,
        live: LiveFeed,
        stopping: tokio::sync::watch::Receiver<bool>,
        subscriptions_max: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics: Metrics::default(),
            live,
            stopping,
            subscriptions_open: Arc::new(AtomicUsize::new(0)),
            subscriptions_max,
            groups: Groups::default(),
        })
    }
}
