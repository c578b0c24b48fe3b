//! The node's metrics (filled in by the metrics work).

/// Counters, gauges and histograms of one node.
#[derive(Debug, Default)]
pub struct Metrics {}
