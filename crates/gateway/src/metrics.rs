//! The gateway's counters: per inbound site (sessions, events written,
//! duplicates absorbed, refusals, end-to-end latency) and per route and
//! lane (see [`crate::sender::RouteMetrics`]), rendered as Prometheus text
//! and JSON. Label sets are bounded: sites, routes, lanes and topic
//! patterns are all bounded by the definitions' limits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Most inbound sites tracked; others share the label `other`.
pub const INBOUND_SITES_MAX: usize = 64;

/// Wall-clock milliseconds since the Unix epoch (event timestamps use it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Upper bounds (ms) of the latency buckets.
pub const LATENCY_BUCKETS_MS: [u64; 16] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000];

/// A latency histogram in milliseconds.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, ms: u64) {
        let i = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// The bucket bound at or above quantile `q` (0..1); `None` if empty.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }

    /// Renders the histogram as Prometheus text.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let counts = self.counts();
        let mut cumulative = 0;
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            let le = LATENCY_BUCKETS_MS.get(i).map_or("+Inf".to_owned(), |b| format!("{}", *b as f64 / 1000.0));
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Counters of one inbound peer site.
#[derive(Debug, Default)]
pub struct InboundMetrics {
    /// Open sessions.
    pub sessions: AtomicU64,
    /// Events written.
    pub written: AtomicU64,
    /// Replays absorbed (`Exists{same: true}`).
    pub duplicates: AtomicU64,
    /// Events refused (the link was closed).
    pub refused: AtomicU64,
    /// Sessions this side closed with a reason.
    pub closed_by_us: AtomicU64,
}

/// Every gateway counter.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    inbound: Mutex<BTreeMap<String, Arc<InboundMetrics>>>,
    latency: Mutex<BTreeMap<String, Arc<LatencyHistogram>>>,
}

impl GatewayMetrics {
    fn bounded_key<T: Default>(map: &mut BTreeMap<String, Arc<T>>, key: &str) -> Arc<T> {
        if let Some(v) = map.get(key) {
            return Arc::clone(v);
        }
        let key = if map.len() >= INBOUND_SITES_MAX { "other" } else { key };
        Arc::clone(map.entry(key.to_owned()).or_default())
    }

    /// The counters of inbound site `site`.
    pub fn inbound(&self, site: &str) -> Arc<InboundMetrics> {
        Self::bounded_key(&mut self.inbound.lock(), site)
    }

    /// The end-to-end latency histogram of events from `origin` (shared by
    /// every session from it; beyond [`INBOUND_SITES_MAX`] sites, `other`).
    pub fn latency_histogram(&self, origin: &str) -> Arc<LatencyHistogram> {
        Self::bounded_key(&mut self.latency.lock(), origin)
    }

    /// Prometheus text of the inbound side.
    pub fn render(&self, out: &mut String) {
        let inbound = self.inbound.lock().clone();
        type Field = fn(&InboundMetrics) -> &AtomicU64;
        let families: [(&str, &str, &str, Field); 5] = [
            ("edgebus_wan_inbound_sessions", "gauge", "Open inbound WAN sessions per peer site.", |m| &m.sessions),
            ("edgebus_wan_inbound_events_written_total", "counter", "Replicated events written per peer site.", |m| {
                &m.written
            }),
            (
                "edgebus_wan_inbound_duplicates_total",
                "counter",
                "Replayed events absorbed as already present (exists-or-write same=true) per peer site.",
                |m| &m.duplicates,
            ),
            (
                "edgebus_wan_inbound_refused_total",
                "counter",
                "Replicated events refused (the link was closed with the reason) per peer site.",
                |m| &m.refused,
            ),
            (
                "edgebus_wan_inbound_closed_total",
                "counter",
                "Inbound sessions closed by this site with a reason, per peer site.",
                |m| &m.closed_by_us,
            ),
        ];
        for (name, kind, help, field) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (site, m) in &inbound {
                let _ = writeln!(out, "{name}{{site=\"{site}\"}} {}", field(m).load(Ordering::Relaxed));
            }
        }
        let name = "edgebus_wan_replication_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} End-to-end latency of replicated events: origin append to append here, per origin site.\n# TYPE {name} histogram"
        );
        for (site, h) in self.latency.lock().iter() {
            h.render(out, name, &format!("origin=\"{site}\""));
        }
    }

    /// JSON of the inbound side.
    pub fn to_json(&self) -> serde_json::Value {
        let latency = self.latency.lock().clone();
        let sites: Vec<serde_json::Value> = self
            .inbound
            .lock()
            .iter()
            .map(|(site, m)| {
                let h = latency.get(site);
                serde_json::json!({
                    "site": site,
                    "sessions": m.sessions.load(Ordering::Relaxed),
                    "events_written": m.written.load(Ordering::Relaxed),
                    "duplicates": m.duplicates.load(Ordering::Relaxed),
                    "refused": m.refused.load(Ordering::Relaxed),
                    "closed": m.closed_by_us.load(Ordering::Relaxed),
                    "latency_p50_ms": h.and_then(|h| h.quantile_ms(0.5)),
                    "latency_p99_ms": h.and_then(|h| h.quantile_ms(0.99)),
                })
            })
            .collect();
        serde_json::Value::Array(sites)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_bucket_bounds() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        for ms in [1, 3, 3, 40, 900] {
            h.observe(ms);
        }
        assert_eq!(h.quantile_ms(0.5), Some(5));
        assert_eq!(h.quantile_ms(0.99), Some(1_000));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 5"), "{out}");
    }

    #[test]
    fn inbound_sites_are_bounded() {
        let m = GatewayMetrics::default();
        for i in 0..INBOUND_SITES_MAX + 10 {
            m.inbound(&format!("s{i}"));
        }
        assert_eq!(m.inbound.lock().len(), INBOUND_SITES_MAX + 1);
    }
}
