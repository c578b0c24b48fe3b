//! The NATS side of `edgebus bench wan`: two `nats-server -js` processes,
//! `us` a hub listening for leaf nodes and `eu` a leaf node whose remote is
//! the emulated link in front of the hub's leaf-node port. Each is its own
//! JetStream domain (`us`, `eu`). At `eu`, streams `EUBULK` (`eu.bulk.>`)
//! and `EUCRIT` (`eu.critical.>`), file storage; at `us`, the stream `US`
//! sourcing both from domain `eu`, so that every message crosses the leaf
//! node link (NATS has no lanes; two sources is the closest to them).
//!
//! The workloads are those of the edgebus side: a backlog of 1 KiB
//! messages published at `eu` before `US` exists (goodput: `US`'s message
//! count, polled every 10 ms, from the first sourced message to the last),
//! and one 256-byte stamped message at a time at 50/s, alone and beside a
//! bulk backlog, read at `us` by an ordered pull consumer on `US`
//! (publish → `US` → consumer). JetStream acknowledges a publish once
//! written to the OS (its default), where edgebus runs `fsync=always`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use edgebus_testkit::{Link, measure_raw_goodput};
use tokio_stream::StreamExt as _;

use super::{
    BULK_PAYLOAD_BYTES, CRITICAL_EVENTS_PER_SEC, CRITICAL_PAYLOAD_BYTES, LinkFigures, Profile, latency_ms, progress,
    quantile, stamped,
};
use crate::bench::node::peers::{ChildGuard, find_nats_server};

/// What the NATS side needs of the plan.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub raw_secs: f64,
    pub goodput_secs: f64,
    pub critical_secs: f64,
}

/// Publishes in flight at once when writing a backlog.
const PUBLISHES_IN_FLIGHT: usize = 256;

/// The `nats-server` binary (installed with apt-get if missing).
pub async fn prepare(given: Option<&Path>, _dir: &Path) -> anyhow::Result<PathBuf> {
    let given = given.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || find_nats_server(given.as_deref())).await.context("the install task failed")?
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display().to_string().replace('\\', "\\\\").replace('"', "\\\""))
}

/// Starts `nats-server -c CONFIG` and waits for `Server is ready`; the
/// client address comes from its log.
async fn start_server(
    binary: &Path,
    name: &'static str,
    config: String,
    dir: &Path,
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("nats.conf");
    std::fs::write(&file, config)?;
    let mut command = Command::new(binary);
    command.arg("-c").arg(&file);
    tokio::task::spawn_blocking(move || {
        let mut listening = None;
        ChildGuard::spawn_until(name, command, |line| {
            if let Some((_, rest)) = line.split_once("Listening for client connections on ") {
                listening = rest.trim().parse::<SocketAddr>().ok();
            }
            if line.contains("Server is ready") { listening } else { None }
        })
    })
    .await
    .context("the start task failed")?
}

/// Publishes `count` messages of `payload_bytes` to `subject` with
/// JetStream acknowledgements, [`PUBLISHES_IN_FLIGHT`] at a time.
async fn publish_backlog(
    js: &jetstream::Context,
    subject: &str,
    count: u64,
    payload_bytes: usize,
) -> anyhow::Result<()> {
    let payload = Bytes::from(vec![b'x'; payload_bytes]);
    let mut sent = 0u64;
    while sent < count {
        let mut acks = Vec::with_capacity(PUBLISHES_IN_FLIGHT);
        for _ in 0..(count - sent).min(PUBLISHES_IN_FLIGHT as u64) {
            acks.push(js.publish(subject.to_owned(), payload.clone()).await.context("jetstream publish")?);
            sent += 1;
        }
        for ack in acks {
            ack.await.context("jetstream publish ack")?;
        }
    }
    Ok(())
}

/// Messages in `US` now.
async fn us_messages(js: &jetstream::Context) -> anyhow::Result<u64> {
    let mut us = js.get_stream("US").await.context("get stream US")?;
    Ok(us.info().await.context("stream US info")?.state.messages)
}

/// The stamped critical producer at `eu` for `secs`, then up to 10 s for
/// its messages at `us`; the latencies that arrived and how many were sent.
async fn critical_run(
    eu: &jetstream::Context,
    latencies: &Arc<Mutex<Vec<f64>>>,
    clock: Instant,
    secs: f64,
) -> anyhow::Result<(Vec<f64>, usize)> {
    latencies.lock().expect("latency lock").clear();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / CRITICAL_EVENTS_PER_SEC as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        let payload = Bytes::from(stamped(clock, CRITICAL_PAYLOAD_BYTES));
        eu.publish("eu.critical.alarms", payload).await.context("jetstream publish")?.await.context("publish ack")?;
        sent += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while latencies.lock().expect("latency lock").len() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let samples = latencies.lock().expect("latency lock").clone();
    Ok((samples, sent))
}

/// Measures NATS over `profile`, as the module documentation says.
pub async fn measure(
    binary: &Path,
    profile: &Profile,
    plan: Plan,
    dir: &Path,
    clock: Instant,
) -> anyhow::Result<LinkFigures> {
    let config = profile.link_config();
    let mut figures = LinkFigures { system: "nats", link: profile.name, ..LinkFigures::default() };
    figures.raw_bps = tokio::time::timeout(
        Duration::from_secs_f64(plan.raw_secs * 4.0 + 30.0),
        measure_raw_goodput(&config, profile.bytes_in(plan.raw_secs)),
    )
    .await
    .context("the raw TCP stream did not finish in time")?
    .context("the raw TCP stream failed")?;

    let leaf_port = free_port()?;
    let hub_config = format!(
        "server_name: us\nhost: \"127.0.0.1\"\nport: -1\njetstream {{\n  store_dir: {}\n  domain: us\n}}\nleafnodes {{\n  host: \"127.0.0.1\"\n  port: {leaf_port}\n}}\n",
        quoted(&dir.join("us").join("jetstream"))
    );
    let (hub, hub_addr) = start_server(binary, "nats-server us", hub_config, &dir.join("us")).await?;
    let link =
        Link::start(SocketAddr::from(([127, 0, 0, 1], leaf_port)), config).await.context("cannot start the link")?;
    let leaf_config = format!(
        "server_name: eu\nhost: \"127.0.0.1\"\nport: -1\njetstream {{\n  store_dir: {}\n  domain: eu\n}}\nleafnodes {{\n  remotes: [ {{ url: \"nats://{}\" }} ]\n}}\n",
        quoted(&dir.join("eu").join("jetstream")),
        link.addr()
    );
    let (leaf, leaf_addr) = start_server(binary, "nats-server eu", leaf_config, &dir.join("eu")).await?;
    let eu = jetstream::new(async_nats::connect(format!("nats://{leaf_addr}")).await.context("connect to eu")?);
    let us = jetstream::new(async_nats::connect(format!("nats://{hub_addr}")).await.context("connect to us")?);
    for (name, subject) in [("EUBULK", "eu.bulk.>"), ("EUCRIT", "eu.critical.>")] {
        eu.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("create stream {name} at eu"))?;
    }

    // Goodput: the backlog first, then the sourcing stream.
    let goodput_events = profile.bytes_in(plan.goodput_secs) / BULK_PAYLOAD_BYTES as u64;
    progress(format_args!(
        "  goodput: {goodput_events} messages of {BULK_PAYLOAD_BYTES} B at eu, then US sources them"
    ));
    publish_backlog(&eu, "eu.bulk.goodput", goodput_events, BULK_PAYLOAD_BYTES).await?;
    super::settle_phase(dir).await?;
    let source = |name: &str| stream::Source { name: name.into(), domain: Some("eu".into()), ..Default::default() };
    us.create_stream(stream::Config {
        name: "US".into(),
        sources: Some(vec![source("EUCRIT"), source("EUBULK")]),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("create stream US at us")?;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.goodput_secs * 4.0 + 30.0);
    let mut first: Option<(Instant, u64)> = None;
    let mut last = (Instant::now(), 0u64);
    while Instant::now() < deadline {
        let count = us_messages(&us).await?;
        let now = Instant::now();
        if count > 0 && first.is_none() {
            first = Some((now, count));
        }
        if count > last.1 {
            last = (now, count);
        }
        if count >= goodput_events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    figures.goodput_events = last.1;
    figures.goodput_complete = last.1 >= goodput_events;
    if let Some((at, count)) = first {
        let secs = last.0.duration_since(at).as_secs_f64();
        if secs > 0.0 {
            figures.goodput_bps = Some((last.1 - count) as f64 * BULK_PAYLOAD_BYTES as f64 * 8.0 / secs);
        }
    }
    if !figures.goodput_complete {
        figures.note.push_str(&format!("only {} of {goodput_events} goodput messages arrived in time; ", last.1));
    }
    progress(format_args!(
        "  goodput {:.2} Mbit/s of payload, raw {:.2} Mbit/s",
        figures.goodput_bps.unwrap_or(0.0) / 1e6,
        figures.raw_bps / 1e6
    ));

    // Latency, alone and beside a bulk backlog: an ordered consumer at us.
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let consumer = us
        .get_stream("US")
        .await
        .context("get stream US")?
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "eu.critical.>".into(),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("create the consumer at us")?;
    let mut messages = consumer.messages().await.context("consume at us")?;
    let sink = Arc::clone(&latencies);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            if let Some(ms) = latency_ms(clock, Instant::now(), &message.payload) {
                sink.lock().expect("latency lock").push(ms);
            }
        }
    });
    super::settle_phase(dir).await?;
    progress(format_args!("  latency: critical producer alone for {} s", plan.critical_secs));
    let (alone, sent) = critical_run(&eu, &latencies, clock, plan.critical_secs).await?;
    super::ensure_arrived(alone.len(), sent, "critical messages")?;
    figures.latency_samples = alone.len();
    figures.p50_ms = quantile(&alone, 0.5);
    figures.p99_ms = quantile(&alone, 0.99);

    let loaded_events = profile.bytes_in(plan.critical_secs + 3.0) / BULK_PAYLOAD_BYTES as u64;
    progress(format_args!("  critical beside bulk: {loaded_events} bulk messages, then the critical producer"));
    let before = us_messages(&us).await?;
    publish_backlog(&eu, "eu.bulk.loaded", loaded_events, BULK_PAYLOAD_BYTES).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bulk_start = us_messages(&us).await?;
    let started = Instant::now();
    let (loaded, sent) = critical_run(&eu, &latencies, clock, plan.critical_secs).await?;
    let bulk_end = us_messages(&us).await?;
    // The critical messages are in US too.
    let critical_in_us = loaded.len() as u64;
    figures.bulk_loaded_bps = Some(
        bulk_end.saturating_sub(bulk_start).saturating_sub(critical_in_us) as f64 * BULK_PAYLOAD_BYTES as f64 * 8.0
            / started.elapsed().as_secs_f64(),
    );
    figures.bulk_left_events = Some((before + loaded_events + critical_in_us).saturating_sub(bulk_end));
    figures.critical_loaded_p50_ms = quantile(&loaded, 0.5);
    figures.critical_loaded_p99_ms = quantile(&loaded, 0.99);
    if loaded.len() < sent {
        figures
            .note
            .push_str(&format!("{} of {sent} critical messages (loaded) did not arrive; ", sent - loaded.len()));
    }
    if figures.bulk_left_events == Some(0) {
        figures.note.push_str("the bulk backlog ran out before the loaded run ended; ");
    }
    reader.abort();
    link.stop().await;
    drop((leaf, hub));
    Ok(figures)
}
