//! What every service of a node shares: the store, the metrics and the live
//! feed of committed events. One [`NodeState`] per node, behind an `Arc`.

use std::sync::Arc;

use edgebus_store::Store;

use crate::metrics::Metrics;

/// The node's shared state.
#[derive(Debug)]
pub struct NodeState {
    /// The event store.
    pub store: Arc<Store>,
    /// Counters, gauges and histograms for `/metrics` and `/v1/stats`.
    pub metrics: Metrics,
}

impl NodeState {
    /// The state of a node over `store`.
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self { store, metrics: Metrics::default() })
    }
}
