//! The workloads of `edgebus bench node`, driven over loopback through each
//! system's own client: publish with acknowledgement from N concurrent
//! clients (the same loop for our node, NATS JetStream and PostgreSQL), and,
//! for our node, end-to-end latency to a subscriber and fan-out to many
//! subscribers.
//!
//! Every client waits for the acknowledgement of its publish before sending
//! the next. A cell runs a warm-up, then a measured window: the events whose
//! acknowledgement arrives inside the window are counted, and their
//! publish-to-ack latency recorded. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use edgebus_client::{
    Client, Credit, StreamSelector, SubscribeFrom, Subscription, SubscriptionFilter, SubscriptionItem,
};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName, StreamPattern};
use tokio::task::JoinSet;

use super::super::histogram::Histogram;
use super::super::machine::process_cpu;

/// Concurrent clients that share one connection (edgebus: one HTTP/2
/// channel; NATS: one TCP connection). PostgreSQL runs one transaction at a
/// time per connection, so there each client has its own.
pub const CLIENTS_PER_CONNECTION: usize = 16;
/// Longest wait for one acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait, after a window, for publishes in flight and deliveries.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for connecting and for subscriptions to catch up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// PostgreSQL connections opened at once.
const POSTGRES_CONNECTS_IN_FLIGHT: usize = 32;
/// The JetStream stream every NATS publish goes to, and its subjects.
pub const NATS_STREAM: &str = "BENCH";
const NATS_SUBJECTS: &str = "bench.>";
/// The first bytes of a timestamped payload: nanoseconds since the
/// workload's origin. This value marks the end of an end-to-end run.
const SENTINEL_NS: u64 = u64::MAX;

/// A system that takes publishes with acknowledgement.
#[derive(Debug, Clone)]
pub enum Target {
    /// Our node's gRPC address.
    Edgebus(SocketAddr),
    /// A NATS server with JetStream (the stream is made by [`prepare_nats`]).
    Nats(SocketAddr),
    /// A PostgreSQL connection string (the table is made by [`prepare_postgres`]).
    Postgres(String),
}

/// What one cell measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Acknowledgements received inside the window.
    pub events: u64,
    /// Length of the window.
    pub window: Duration,
    /// Publish-to-ack latency of the counted events.
    pub latency: Histogram,
    /// Connections the clients used.
    pub connections: usize,
    /// CPU time the server's process and this one (the clients) used in
    /// the window, where they could be read.
    pub server_cpu: Option<Duration>,
    pub client_cpu: Option<Duration>,
}

/// One client's way to publish.
enum Publisher {
    Edgebus { client: Client, stream: StreamName, event_type: EventType },
    Nats { context: async_nats::jetstream::Context, subject: async_nats::Subject },
    Postgres { client: tokio_postgres::Client, insert: tokio_postgres::Statement, stream: String, next_version: i64 },
}

impl Publisher {
    /// Publishes one event and waits for its acknowledgement.
    async fn publish(&mut self, payload: &Bytes) -> anyhow::Result<()> {
        match self {
            Self::Edgebus { client, stream, event_type } => {
                let event = NewEvent {
                    id: EventId::generate(),
                    event_type: event_type.clone(),
                    data: payload.to_vec(),
                    metadata: Vec::new(),
                    timestamp_ms: 0,
                };
                client.append(stream.clone(), ExpectedVersion::Any, vec![event]).await?;
            }
            Self::Nats { context, subject } => {
                context
                    .publish(subject.clone(), payload.clone())
                    .await
                    .context("jetstream publish")?
                    .await
                    .context("jetstream ack")?;
            }
            Self::Postgres { client, insert, stream, next_version } => {
                // One INSERT is one transaction (autocommit); the version is
                // the next of this client's own stream, and the primary key
                // (stream, version) would refuse a concurrent writer.
                client
                    .query_one(&*insert, &[&*stream, &*next_version, &"BenchEvent", &payload.as_ref()])
                    .await
                    .context("postgres insert")?;
                *next_version += 1;
            }
        }
        Ok(())
    }
}

async fn connect_nats(addr: SocketAddr) -> anyhow::Result<async_nats::Client> {
    async_nats::connect(format!("nats://{addr}").as_str()).await.context("connect to nats")
}

/// Creates the JetStream stream (file storage) all NATS publishes go to.
pub async fn prepare_nats(addr: SocketAddr) -> anyhow::Result<()> {
    let client = connect_nats(addr).await?;
    let context = async_nats::jetstream::new(client);
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: NATS_STREAM.to_owned(),
            subjects: vec![NATS_SUBJECTS.to_owned()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("create the jetstream stream")?;
    Ok(())
}

/// Empties the JetStream stream between cells, so that its size stays bounded.
pub async fn purge_nats(addr: SocketAddr) -> anyhow::Result<()> {
    let client = connect_nats(addr).await?;
    let context = async_nats::jetstream::new(client);
    let stream = context.get_stream(NATS_STREAM).await.context("get the jetstream stream")?;
    stream.purge().await.context("purge the jetstream stream")?;
    Ok(())
}

/// The event store table, and the server's durability settings as it reports them.
pub async fn prepare_postgres(connection_string: &str) -> anyhow::Result<Vec<(String, String)>> {
    let client = connect_postgres(connection_string).await?;
    client
        .batch_execute(
            "CREATE TABLE events (
                stream text NOT NULL,
                version bigint NOT NULL,
                position bigserial NOT NULL,
                type text NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (stream, version)
            )",
        )
        .await
        .context("create table events")?;
    let mut settings = Vec::new();
    for name in ["fsync", "synchronous_commit", "wal_sync_method", "full_page_writes", "commit_delay"] {
        let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
        settings.push((name.to_owned(), row.get::<_, String>(0)));
    }
    Ok(settings)
}

async fn connect_postgres(connection_string: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) =
        tokio_postgres::connect(connection_string, tokio_postgres::NoTls).await.context("connect to postgres")?;
    // The connection task ends when the client is dropped.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Opens the connections of `clients` publishers; publisher `i` writes to
/// its own stream (subject, PostgreSQL stream) named after `tag` and `i`.
async fn connect_publishers(target: &Target, clients: usize, tag: &str) -> anyhow::Result<(Vec<Publisher>, usize)> {
    let connections = clients.div_ceil(CLIENTS_PER_CONNECTION);
    let mut publishers = Vec::with_capacity(clients);
    match target {
        Target::Edgebus(addr) => {
            let event_type = EventType::new("BenchEvent").expect("a valid type");
            let mut shared = Vec::with_capacity(connections);
            for _ in 0..connections {
                shared.push(Client::connect(&addr.to_string()).await?);
            }
            for i in 0..clients {
                let stream = StreamName::new(&format!("bench.{tag}.c{i}")).expect("a valid stream name");
                let client = shared[i / CLIENTS_PER_CONNECTION].clone();
                publishers.push(Publisher::Edgebus { client, stream, event_type: event_type.clone() });
            }
            Ok((publishers, connections))
        }
        Target::Nats(addr) => {
            let mut shared = Vec::with_capacity(connections);
            for _ in 0..connections {
                let client = connect_nats(*addr).await?;
                shared.push(async_nats::jetstream::new(client));
            }
            for i in 0..clients {
                let subject = async_nats::Subject::from(format!("bench.{tag}.c{i}"));
                publishers.push(Publisher::Nats { context: shared[i / CLIENTS_PER_CONNECTION].clone(), subject });
            }
            Ok((publishers, connections))
        }
        Target::Postgres(connection_string) => {
            let mut connecting = JoinSet::new();
            let mut next = 0;
            let mut opened = Vec::with_capacity(clients);
            while opened.len() < clients {
                while next < clients && connecting.len() < POSTGRES_CONNECTS_IN_FLIGHT {
                    let connection_string = connection_string.clone();
                    connecting.spawn(async move {
                        let client = connect_postgres(&connection_string).await?;
                        let insert = client
                            .prepare(
                                "INSERT INTO events (stream, version, type, data) VALUES ($1, $2, $3, $4) \
                                 RETURNING position",
                            )
                            .await?;
                        anyhow::Ok((client, insert))
                    });
                    next += 1;
                }
                let joined = connecting.join_next().await.expect("a connect in flight");
                opened.push(joined.context("postgres connect task")??);
            }
            for (i, (client, insert)) in opened.into_iter().enumerate() {
                publishers.push(Publisher::Postgres { client, insert, stream: format!("{tag}-c{i}"), next_version: 0 });
            }
            Ok((publishers, clients))
        }
    }
}

/// `clients` concurrent clients publish `payload_bytes`-byte events with
/// acknowledgement for `warmup` and then the measured `window`.
pub async fn publish_cell(
    target: &Target,
    clients: usize,
    payload_bytes: usize,
    warmup: Duration,
    window: Duration,
    server_pid: Option<u32>,
    tag: &str,
) -> anyhow::Result<Measured> {
    let (publishers, connections) = tokio::time::timeout(SETUP_TIMEOUT, connect_publishers(target, clients, tag))
        .await
        .context("connecting the clients timed out")??;
    let payload = Bytes::from(vec![b'x'; payload_bytes]);
    let measure_from = Instant::now() + warmup;
    let end = measure_from + window;
    // CPU used by the server and the clients in the window.
    let cpu = tokio::spawn(async move {
        let read = || (process_cpu(server_pid), process_cpu(None));
        tokio::time::sleep_until(measure_from.into()).await;
        let from = read();
        tokio::time::sleep_until(end.into()).await;
        let to = read();
        let used = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
        (server_pid.and_then(|_| used(from.0, to.0)), used(from.1, to.1))
    });
    let mut tasks = JoinSet::new();
    for mut publisher in publishers {
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut latency = Histogram::default();
            let mut events = 0u64;
            loop {
                let begun = Instant::now();
                if begun >= end {
                    break;
                }
                tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish(&payload))
                    .await
                    .context("no acknowledgement in time")??;
                let done = Instant::now();
                if done >= measure_from && done < end {
                    events += 1;
                    latency.record(done - begun);
                }
            }
            anyhow::Ok((events, latency))
        });
    }
    let mut measured = Measured { window, connections, ..Measured::default() };
    let deadline = tokio::time::Instant::from_std(end + DRAIN_TIMEOUT);
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next()).await.context("the cell overran")? {
        let (events, latency) = joined.context("client task")??;
        measured.events += events;
        measured.latency.merge(&latency);
    }
    (measured.server_cpu, measured.client_cpu) = cpu.await.context("the CPU reader")?;
    Ok(measured)
}

/// A payload of `payload_bytes` (at least 8) that starts with `sent_ns`.
fn stamped(sent_ns: u64, payload_bytes: usize) -> Vec<u8> {
    let mut data = vec![b'x'; payload_bytes.max(8)];
    data[..8].copy_from_slice(&sent_ns.to_le_bytes());
    data
}

/// The stamp of a payload made by [`stamped`].
fn stamp_of(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(..8)?.try_into().ok()?))
}

fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
}

/// Opens a subscription with `filter` from the end and waits for `CaughtUp`.
async fn subscribe_caught_up(client: &Client, streams: StreamSelector) -> anyhow::Result<Subscription> {
    let filter = SubscriptionFilter { streams, event_types: vec![], predicate: None, include_system: false };
    let mut subscription = client.subscribe(filter, SubscribeFrom::End, Credit::default()).await?;
    loop {
        match subscription.next().await {
            Some(Ok(SubscriptionItem::CaughtUp { .. })) => return Ok(subscription),
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error.into()),
            None => bail!("the subscription ended before catching up"),
        }
    }
}

pub fn bench_event(data: Vec<u8>) -> NewEvent {
    NewEvent {
        id: EventId::generate(),
        event_type: EventType::new("BenchEvent").expect("a valid type"),
        data,
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

/// End-to-end latency: `clients` publishers each append to their own stream,
/// with the send time in the payload, and one subscriber on all those
/// streams (a pattern) records when each event arrives.
pub async fn end_to_end(
    addr: SocketAddr,
    clients: usize,
    payload_bytes: usize,
    warmup: Duration,
    window: Duration,
    tag: &str,
) -> anyhow::Result<Measured> {
    let subscriber_client = Client::connect(&addr.to_string()).await?;
    let pattern = StreamPattern::new(&format!("e2e.{tag}.>")).expect("a valid pattern");
    let mut subscription =
        tokio::time::timeout(SETUP_TIMEOUT, subscribe_caught_up(&subscriber_client, StreamSelector::Pattern(pattern)))
            .await
            .context("subscribing timed out")??;
    let connections = clients.div_ceil(CLIENTS_PER_CONNECTION);
    let mut shared = Vec::with_capacity(connections);
    for _ in 0..connections {
        shared.push(Client::connect(&addr.to_string()).await?);
    }
    let origin = Instant::now();
    let measure_from_ns = u64::try_from(warmup.as_nanos()).expect("a short warm-up");
    let end = origin + warmup + window;
    let subscriber = tokio::spawn(async move {
        let mut latency = Histogram::default();
        let mut events = 0u64;
        loop {
            let item = match subscription.next().await {
                Some(item) => item?,
                None => bail!("the subscription ended"),
            };
            let SubscriptionItem::Event(event) = item else { continue };
            let received_ns = nanos_since(origin);
            let sent_ns = stamp_of(&event.data).context("a payload without a stamp")?;
            if sent_ns == SENTINEL_NS {
                return Ok((events, latency));
            }
            if sent_ns >= measure_from_ns {
                events += 1;
                latency.record(Duration::from_nanos(received_ns.saturating_sub(sent_ns)));
            }
        }
    });
    let mut publishers = JoinSet::new();
    for i in 0..clients {
        let client = shared[i / CLIENTS_PER_CONNECTION].clone();
        let stream = StreamName::new(&format!("e2e.{tag}.c{i}")).expect("a valid stream name");
        publishers.spawn(async move {
            while Instant::now() < end {
                let event = bench_event(stamped(nanos_since(origin), payload_bytes));
                tokio::time::timeout(PUBLISH_TIMEOUT, client.append(stream.clone(), ExpectedVersion::Any, vec![event]))
                    .await
                    .context("no acknowledgement in time")??;
            }
            anyhow::Ok(())
        });
    }
    let deadline = tokio::time::Instant::from_std(end + DRAIN_TIMEOUT);
    while let Some(joined) =
        tokio::time::timeout_at(deadline, publishers.join_next()).await.context("publishing overran")?
    {
        joined.context("publisher task")??;
    }
    // Every event above was acknowledged, so it precedes this one in the log
    // and reaches the subscriber first.
    let sentinel = StreamName::new(&format!("e2e.{tag}.end")).expect("a valid stream name");
    shared[0].append(sentinel, ExpectedVersion::Any, vec![bench_event(stamped(SENTINEL_NS, payload_bytes))]).await?;
    let (events, latency) = tokio::time::timeout_at(deadline, subscriber)
        .await
        .context("the subscriber did not receive every event in time")?
        .context("subscriber task")??;
    Ok(Measured { events, window, latency, connections: connections + 1, ..Measured::default() })
}

/// What fan-out measured.
#[derive(Debug, Clone)]
pub struct FanOut {
    pub subscribers: usize,
    pub events: u64,
    /// From the first publish until every publish was acknowledged.
    pub publish_elapsed: Duration,
    /// From the first publish until the last subscriber had the last event.
    pub last_delivery_elapsed: Duration,
    /// Publish-to-delivery latency over every delivery.
    pub delivery_latency: Histogram,
}

/// Fan-out: `subscribers` subscriptions on one stream (one connection per
/// [`CLIENTS_PER_CONNECTION`] of them), then `publishers` concurrent clients
/// append `events` events of `payload_bytes` to it.
pub async fn fan_out(
    addr: SocketAddr,
    subscribers: usize,
    publishers: usize,
    events: u64,
    payload_bytes: usize,
    tag: &str,
) -> anyhow::Result<FanOut> {
    let stream = StreamName::new(&format!("fan.{tag}")).expect("a valid stream name");
    let mut subscriber_clients = Vec::new();
    for _ in 0..subscribers.div_ceil(CLIENTS_PER_CONNECTION) {
        subscriber_clients.push(Client::connect(&addr.to_string()).await?);
    }
    let origin = Instant::now();
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(subscribers.max(1));
    let mut receivers = JoinSet::new();
    for s in 0..subscribers {
        let client = subscriber_clients[s / CLIENTS_PER_CONNECTION].clone();
        let (stream, ready_tx) = (stream.clone(), ready_tx.clone());
        receivers.spawn(async move {
            let mut subscription = subscribe_caught_up(&client, StreamSelector::Stream(stream)).await?;
            ready_tx.send(()).await.context("fan-out ended early")?;
            let mut latency = Histogram::default();
            let mut received = 0u64;
            while received < events {
                let item = match subscription.next().await {
                    Some(item) => item?,
                    None => bail!("subscription {s} ended after {received} of {events} events"),
                };
                if let SubscriptionItem::Event(event) = item {
                    let sent_ns = stamp_of(&event.data).context("a payload without a stamp")?;
                    latency.record(Duration::from_nanos(nanos_since(origin).saturating_sub(sent_ns)));
                    received += 1;
                }
            }
            anyhow::Ok((origin.elapsed(), latency))
        });
    }
    drop(ready_tx);
    let setup_deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    for joined in 0..subscribers {
        match tokio::time::timeout_at(setup_deadline, ready.recv()).await {
            Ok(Some(())) => {}
            Ok(None) => {
                // A subscriber failed before catching up: report its error.
                while let Some(result) = receivers.join_next().await {
                    result.context("subscriber task")??;
                }
                bail!("only {joined} of {subscribers} subscribers caught up");
            }
            Err(_) => bail!("only {joined} of {subscribers} subscribers caught up within {SETUP_TIMEOUT:?}"),
        }
    }
    let publish_client = Client::connect(&addr.to_string()).await?;
    let claimed = Arc::new(AtomicU64::new(0));
    let started = origin.elapsed();
    let mut senders = JoinSet::new();
    for _ in 0..publishers {
        let (client, stream, claimed) = (publish_client.clone(), stream.clone(), Arc::clone(&claimed));
        senders.spawn(async move {
            while claimed.fetch_add(1, Ordering::Relaxed) < events {
                let event = bench_event(stamped(nanos_since(origin), payload_bytes));
                tokio::time::timeout(PUBLISH_TIMEOUT, client.append(stream.clone(), ExpectedVersion::Any, vec![event]))
                    .await
                    .context("no acknowledgement in time")??;
            }
            anyhow::Ok(())
        });
    }
    let budget = PUBLISH_TIMEOUT + DRAIN_TIMEOUT;
    let deadline = tokio::time::Instant::now() + budget;
    while let Some(joined) =
        tokio::time::timeout_at(deadline, senders.join_next()).await.context("publishing overran")?
    {
        joined.context("publisher task")??;
    }
    let publish_elapsed = origin.elapsed() - started;
    let mut last_delivery = Duration::ZERO;
    let mut delivery_latency = Histogram::default();
    let mut done = 0usize;
    while let Some(joined) = tokio::time::timeout_at(deadline + DRAIN_TIMEOUT, receivers.join_next())
        .await
        .with_context(|| format!("only {done} of {subscribers} subscribers received all {events} events in time"))?
    {
        let (finished, latency) = joined.context("subscriber task")??;
        last_delivery = last_delivery.max(finished - started);
        delivery_latency.merge(&latency);
        done += 1;
    }
    ensure!(done == subscribers, "{done} of {subscribers} subscribers finished");
    Ok(FanOut { subscribers, events, publish_elapsed, last_delivery_elapsed: last_delivery, delivery_latency })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_pad_to_the_payload_size() {
        let data = stamped(123_456_789, 100);
        assert_eq!(data.len(), 100);
        assert_eq!(stamp_of(&data), Some(123_456_789));
        assert_eq!(stamped(SENTINEL_NS, 1).len(), 8, "a stamp needs 8 bytes");
        assert_eq!(stamp_of(b"short"), None);
    }
}
