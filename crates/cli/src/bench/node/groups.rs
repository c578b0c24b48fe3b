//! Group consumption for `edgebus bench node`: a backlog of events is
//! consumed through a consumer group by 1, 4 and 16 consumers that ack
//! every event, on each of our nodes (fsync=always and relaxed), beside a
//! NATS JetStream durable pull consumer (explicit acks) doing the same over
//! the same backlog size in the same run. The target compares the pair of
//! equal durability (the relaxed node with a JetStream that cannot fsync
//! each write, as for publishing); the other ratio is information.
//!
//! Both sides: the backlog is written first; the clock runs from the
//! consumers' start to the last ack counted. Each consumer holds at most
//! [`WINDOW_PER_CONSUMER`] unacked events (edgebus: the consumer's window,
//! and the group's is consumers × that; JetStream: pull batches of that
//! size, `max_ack_pending` consumers × that). Every event is acked by its
//! own call and no consumer waits for an ack's answer (JetStream's `ack`
//! does not wait for one either). Each client library sends acks as it
//! does for any application: async-nats writes one `+ACK` message per
//! event (buffered writes on its connection), our client merges the acks
//! queued behind its connection into one message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use edgebus_client::{Client, ConsumerItem};
use edgebus_proto::v1;
use edgebus_types::{ExpectedVersion, StreamName};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;

use super::drive::NATS_STREAM;
use super::report::System;

/// Consumers per measured cell.
pub const CONSUMERS: [usize; 3] = [1, 4, 16];
/// Unacked events one consumer may hold.
pub const WINDOW_PER_CONSUMER: u32 = 256;
/// Backlog events per cell.
pub const EVENTS_FULL: u64 = 100_000;
pub const EVENTS_QUICK: u64 = 20_000;
/// Payload of each event.
pub const PAYLOAD_BYTES: usize = 100;
/// Streams (subjects) the backlog is spread over.
const STREAMS: usize = 16;
/// Events per prefill append.
const PREFILL_BATCH: usize = 100;
/// Longest wait for one cell's consumption.
const CELL_TIMEOUT: Duration = Duration::from_secs(300);
/// The target: edgebus group consumption over JetStream's.
pub const TARGET_RATIO_MIN: f64 = 1.5;

/// One cell: one system, one number of consumers.
#[derive(Debug, Clone, Serialize)]
pub struct GroupRow {
    pub system: System,
    pub consumers: usize,
    pub events: u64,
    pub elapsed_s: f64,
    pub events_per_s: f64,
    /// For edgebus: over JetStream's events/s at the same consumers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

fn row(system: System, consumers: usize, events: u64, elapsed: Duration) -> GroupRow {
    GroupRow {
        system,
        consumers,
        events,
        elapsed_s: elapsed.as_secs_f64(),
        events_per_s: events as f64 / elapsed.as_secs_f64(),
        ratio: None,
    }
}

/// Counts acks until `events`, then tells every consumer to stop.
struct Tally {
    acked: AtomicU64,
    target: u64,
    done: watch::Sender<bool>,
}

impl Tally {
    fn new(target: u64) -> Arc<Self> {
        Arc::new(Self { acked: AtomicU64::new(0), target, done: watch::channel(false).0 })
    }

    fn ack(&self) {
        if self.acked.fetch_add(1, Ordering::Relaxed) + 1 >= self.target {
            let _ = self.done.send(true);
        }
    }

    async fn wait(&self) -> anyhow::Result<()> {
        let mut done = self.done.subscribe();
        tokio::time::timeout(CELL_TIMEOUT, done.wait_for(|d| *d))
            .await
            .context("consumption did not finish in time")?
            .context("tally closed")?;
        Ok(())
    }
}

/// Consumes `events` through a new group of `consumers` on our node
/// `system` at `addr`.
pub async fn edgebus(
    system: System,
    addr: SocketAddr,
    consumers: usize,
    events: u64,
    tag: &str,
) -> anyhow::Result<GroupRow> {
    let client = Client::connect(&addr.to_string()).await?;
    let name = format!("bench-{tag}");
    let window = WINDOW_PER_CONSUMER * u32::try_from(consumers).context("consumers")?;
    let settings = v1::GroupSettings { max_in_flight: Some(window.min(10_000)), ..v1::GroupSettings::default() };
    client
        .create_group(v1::CreateGroupRequest {
            name: name.clone(),
            filter: Some(v1::GroupFilter {
                streams: Some(v1::group_filter::Streams::StreamPattern(format!("grp{tag}.>"))),
                ..v1::GroupFilter::default()
            }),
            settings: Some(settings),
            start_at: Some(v1::create_group_request::StartAt::End(v1::Empty {})),
        })
        .await
        .context("create the group")?;
    // The backlog, after the group's start.
    let payload = vec![b'x'; PAYLOAD_BYTES];
    let mut written = 0u64;
    let mut batch = 0usize;
    while written < events {
        let n = PREFILL_BATCH.min(usize::try_from(events - written).unwrap_or(PREFILL_BATCH));
        let stream = StreamName::new(&format!("grp{tag}.s{}", batch % STREAMS))?;
        let batch_events = (0..n).map(|_| super::drive::bench_event(payload.clone())).collect();
        client.append(stream, ExpectedVersion::Any, batch_events).await.context("prefill")?;
        written += n as u64;
        batch += 1;
    }
    let tally = Tally::new(events);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..consumers {
        let (client, name, tally) = (client.clone(), name.clone(), Arc::clone(&tally));
        let mut done = tally.done.subscribe();
        tasks.spawn(async move {
            let mut consumer = client.consume(&name, Some(&format!("c{i}")), WINDOW_PER_CONSUMER).await?;
            loop {
                let item = tokio::select! {
                    item = consumer.next() => item,
                    _ = done.wait_for(|d| *d) => return anyhow::Ok(()),
                };
                match item.context("the consumer's call ended")?? {
                    ConsumerItem::Delivery { event, .. } => {
                        consumer.ack(vec![event.position]).await?;
                        tally.ack();
                    }
                    ConsumerItem::Refused { detail, .. } => anyhow::bail!("ack refused: {}", detail.message),
                }
            }
        });
    }
    let waited = tally.wait().await;
    let elapsed = started.elapsed();
    tasks.abort_all();
    waited?;
    client.delete_group(&name).await.context("delete the group")?;
    Ok(row(system, consumers, events, elapsed))
}

/// Consumes `events` through a JetStream durable pull consumer.
pub async fn nats(
    system: System,
    addr: SocketAddr,
    consumers: usize,
    events: u64,
    tag: &str,
) -> anyhow::Result<GroupRow> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let client = async_nats::connect(format!("nats://{addr}").as_str()).await.context("connect to nats")?;
    let context = async_nats::jetstream::new(client);
    let stream = context.get_stream(NATS_STREAM).await.context("get the stream")?;
    stream.purge().await.context("purge")?;
    let subject = format!("bench.grp{tag}");
    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    // Prefill, pipelined in bounded chunks.
    let mut written = 0u64;
    while written < events {
        let n = (events - written).min(256);
        let mut acks = Vec::with_capacity(n as usize);
        for _ in 0..n {
            acks.push(context.publish(subject.clone(), payload.clone()).await.context("prefill publish")?);
        }
        for ack in acks {
            ack.await.context("prefill ack")?;
        }
        written += n;
    }
    let durable = format!("bench{tag}");
    let window = i64::from(WINDOW_PER_CONSUMER) * i64::try_from(consumers).context("consumers")?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: window,
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .context("create the durable consumer")?;
    let tally = Tally::new(events);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..consumers {
        let (stream, durable, tally) = (stream.clone(), durable.clone(), Arc::clone(&tally));
        let mut done = tally.done.subscribe();
        tasks.spawn(async move {
            let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> =
                stream.get_consumer(&durable).await.map_err(|e| anyhow::anyhow!("get the consumer: {e}"))?;
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(WINDOW_PER_CONSUMER as usize)
                .messages()
                .await
                .context("pull")?;
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = done.wait_for(|d| *d) => return anyhow::Ok(()),
                };
                let message = message.context("the pull ended")?.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                message.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                tally.ack();
            }
        });
    }
    let waited = tally.wait().await;
    let elapsed = started.elapsed();
    tasks.abort_all();
    waited?;
    ensure!(tally.acked.load(Ordering::Relaxed) >= events, "short count");
    stream.delete_consumer(&durable).await.context("delete the consumer")?;
    stream.purge().await.context("purge")?;
    Ok(row(system, consumers, events, elapsed))
}

/// Fills in edgebus's ratios to the JetStream row of the same consumers.
pub fn add_ratios(rows: &mut [GroupRow]) {
    let peers: Vec<GroupRow> = rows.iter().filter(|r| !r.system.is_ours()).cloned().collect();
    for row in rows.iter_mut().filter(|r| r.system.is_ours()) {
        row.ratio = peers
            .iter()
            .find(|p| p.consumers == row.consumers)
            .map(|p| row.events_per_s / p.events_per_s.max(f64::MIN_POSITIVE));
    }
}

/// Prints the section.
pub fn print(rows: &[GroupRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "group consumption: a backlog of {}-byte events, every event acked (window {WINDOW_PER_CONSUMER} per consumer)",
        PAYLOAD_BYTES
    );
    println!("{:<15} {:>9} {:>8} {:>9} {:>11} {:>8}", "system", "consumers", "events", "seconds", "events/s", "ratio");
    for r in rows {
        println!(
            "{:<15} {:>9} {:>8} {:>9.2} {:>11.0} {:>8}",
            r.system.name(),
            r.consumers,
            r.events,
            r.elapsed_s,
            r.events_per_s,
            r.ratio.map_or("-".to_owned(), super::report::format_ratio)
        );
    }
}
