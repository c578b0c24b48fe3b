//! `edgebus bench wan`, the failover figures: site `us` runs its node and
//! two gateway processes (`gw-us`, `gw-us-backup`, `edgebus gateway`) whose
//! route to `eu` goes through an emulated link; a producer appends
//! timestamped events at `us` all along, and a subscriber at `eu` notes
//! when each arrives. Each drill SIGKILLs whichever gateway holds the lease
//! and measures the time from the kill to the arrival at `eu` of the first
//! event appended after it (only the standby can have sent that one), then
//! starts the killed gateway again as the new standby. At the end, every
//! stream at `us` is compared with its replica at `eu`, event by event:
//! what is missing is lost, what is there twice is a duplicate.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use edgebus_client::Client;
use edgebus_proto::convert::SubscribeFrom;
use edgebus_testkit::{Link, LinkConfig};
use edgebus_types::{ExpectedVersion, StreamName};
use serde_json::Value;

use super::{progress, quantile, stamped};
use crate::sites::{await_condition, event, holder, read_all, standing_by, start_gateway, start_node, subscribe};

/// Streams the producer writes, round robin.
const STREAMS: usize = 8;
/// Bytes of each event's payload.
const PAYLOAD_BYTES: usize = 128;
/// Pause between the producer's appends.
const PRODUCER_PAUSE: Duration = Duration::from_millis(2);
/// Link bandwidth of the drills.
const BANDWIDTH_BPS: u64 = 100_000_000;

/// What the failover drills are run with.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Drills.
    pub drills: usize,
    /// The gateways' lease.
    pub lease_ms: u64,
    /// The link's round-trip time.
    pub rtt_ms: u64,
}

/// What the drills measured.
#[derive(Debug, Clone)]
pub struct Figures {
    /// The plan.
    pub plan: Plan,
    /// Kill → first event from the standby, per drill, in ms.
    pub gaps_ms: Vec<f64>,
    /// Events the producer appended.
    pub published: u64,
    /// Events at `us` missing at `eu`.
    pub lost: u64,
    /// Events stored more than once at `eu`.
    pub duplicates: u64,
}

impl Figures {
    /// The target: a lease plus two round trips.
    pub fn target_ms(&self) -> f64 {
        (self.plan.lease_ms + 2 * self.plan.rtt_ms) as f64
    }

    /// p50 and p99 of the gaps.
    pub fn gap_ms(&self, q: f64) -> Option<f64> {
        quantile(&self.gaps_ms, q)
    }

    /// Whether every drill met the target and nothing was lost or doubled.
    pub fn pass(&self) -> bool {
        self.gap_ms(0.99).is_some_and(|p99| p99 <= self.target_ms()) && self.lost == 0 && self.duplicates == 0
    }

    /// The JSON line.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "bench": "failover",
            "drills": self.gaps_ms.len(),
            "gap_ms_p50": self.gap_ms(0.5),
            "gap_ms_p99": self.gap_ms(0.99),
            "gap_ms_max": self.gaps_ms.iter().copied().fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g)))),
            "lease_ms": self.plan.lease_ms,
            "rtt_ms": self.plan.rtt_ms,
            "target_ms": self.target_ms(),
            "published": self.published,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "pass": self.pass(),
        })
    }
}

/// Runs the drills in `dir`.
pub async fn measure(plan: Plan, dir: &Path, clock: Instant) -> anyhow::Result<Figures> {
    let eu = start_node("eu", &dir.join("eu"), true).await?;
    let eu_wan = eu.wan.context("eu runs a gateway")?;
    let config = LinkConfig {
        bandwidth_bps: Some(BANDWIDTH_BPS),
        latency: Duration::from_millis(plan.rtt_ms) / 2,
        ..LinkConfig::default()
    };
    let link = Link::start(eu_wan, config).await.context("cannot start the link")?;
    let us = start_node("us", &dir.join("us"), false).await?;
    let gateway_config = dir.join("us-gateway.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "[gateway]\nlease_ms = {}\nheartbeat_ms = 50\ndead_after_ms = 1000\n\n[[gateway.routes]]\nremote_site = \"eu\"\naddresses = [\"{}\"]\n",
            plan.lease_ms,
            link.addr()
        ),
    )?;
    let primary = start_gateway("gw-us", "us", us.grpc, &gateway_config).await?;
    let lease = Duration::from_millis(plan.lease_ms);
    await_condition("gw-us holds the lease", 10 * lease, || async {
        Ok(holder(us.http).await?.is_some_and(|(name, _)| name == "gw-us"))
    })
    .await?;
    let backup = start_gateway("gw-us-backup", "us", us.grpc, &gateway_config).await?;
    let mut gateways = [primary, backup];
    await_condition("gw-us-backup stands by", 10 * lease, || standing_by(us.http, "gw-us-backup")).await?;

    // The subscriber at eu: the send stamps of what arrived, with the time.
    let arrivals: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let eu_client = Client::connect(&eu.grpc.to_string()).await?;
    let feed = Arc::clone(&arrivals);
    let subscriber = subscribe(&eu_client, "orders.>", SubscribeFrom::Beginning, move |at, event| {
        let sent_ns = event.data.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
        feed.lock().expect("arrivals lock").push((at, sent_ns));
    })
    .await?;

    // The producer at us.
    let us_client = Client::connect(&us.grpc.to_string()).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (client, stop) = (us_client.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut published = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let stream =
                    StreamName::new(&format!("orders.us.{}", published as usize % STREAMS)).expect("a valid name");
                let event = event(stamped(clock, PAYLOAD_BYTES), "Order");
                client.append(stream, ExpectedVersion::Any, vec![event]).await.context("a producer append failed")?;
                published += 1;
                tokio::time::sleep(PRODUCER_PAUSE).await;
            }
            anyhow::Ok(published)
        })
    };

    let mut gaps_ms = Vec::with_capacity(plan.drills);
    for drill in 0..plan.drills {
        // A random moment of the holder's renewal cycle: each drill starts a
        // fixed time after the previous takeover, which would otherwise
        // kill at the same phase every time.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..plan.lease_ms))).await;
        let (active, _) = holder(us.http).await?.context("no gateway holds the lease before the drill")?;
        let index = gateways.iter().position(|g| g.name == active).context("the holder is one of ours")?;
        let killed_at = Instant::now();
        let killed_ns = u64::try_from(killed_at.duration_since(clock).as_nanos()).unwrap_or(u64::MAX);
        drop(gateways[index].guard.take()); // SIGKILL
        let limit = 10 * lease + Duration::from_secs(5);
        let mut taken = None;
        let first = loop {
            let found =
                arrivals.lock().expect("arrivals lock").iter().find(|(_, sent)| *sent >= killed_ns).map(|(at, _)| *at);
            if let Some(at) = found {
                break at;
            }
            if taken.is_none() && holder(us.http).await?.is_some_and(|(h, _)| h != active) {
                taken = Some(killed_at.elapsed().as_secs_f64() * 1e3);
            }
            if killed_at.elapsed() > limit {
                bail!("drill {drill}: no event sent after the kill of {active} arrived within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let gap = first.duration_since(killed_at).as_secs_f64() * 1e3;
        let taken = taken.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"));
        progress(format_args!(
            "  drill {}/{}: {active} killed, lease taken after {taken}, first event from the standby after {gap:.0} ms",
            drill + 1,
            plan.drills
        ));
        gaps_ms.push(gap);
        let name = gateways[index].name;
        gateways[index] = start_gateway(name, "us", us.grpc, &gateway_config).await?;
        await_condition(&format!("{name} stands by again"), limit, || standing_by(us.http, name)).await?;
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = producer.await.context("the producer task")??;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (arrivals.lock().expect("arrivals lock").len() as u64) < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscriber.abort();
    let (lost, duplicates) = compare(&us_client, &eu_client).await?;
    drop(gateways);
    link.stop().await;
    drop((eu, us));
    Ok(Figures { plan, gaps_ms, published, lost, duplicates })
}

/// Events of every producer stream at `home` missing at `replica`, and
/// events stored at `replica` more than once (by id).
async fn compare(home: &Client, replica: &Client) -> anyhow::Result<(u64, u64)> {
    let (mut lost, mut duplicates) = (0u64, 0u64);
    for i in 0..STREAMS {
        let stream = StreamName::new(&format!("orders.us.{i}")).expect("a valid name");
        let sent = read_all(home, &stream, |e| e.id).await?;
        let got = read_all(replica, &stream, |e| e.id).await?;
        let mut seen = std::collections::HashSet::new();
        for id in &got {
            if !seen.insert(*id) {
                duplicates += 1;
            }
        }
        lost += sent.iter().filter(|id| !seen.contains(*id)).count() as u64;
    }
    Ok((lost, duplicates))
}
