//! The consumer group scenario: consumers killed mid-batch, the node killed
//! (SIGKILL) and restarted mid-batch, random nacks; then every event was
//! processed, every parked event has its reason, per-stream order held
//! under `by_stream`, and redeliveries stayed within the unacked window.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgebus_client::{Client, ConsumerItem};
use edgebus_proto::v1;
use tokio::time::Instant;

use crate::node::Node;
use crate::node_groups::{create, publish, runtime};

const STREAMS: usize = 12;
const ROUNDS: usize = 6;
const EVENTS_PER_ROUND: usize = 120;
const CONSUMERS: usize = 3;
const CONSUMER_WINDOW: u32 = 4;
const GROUP_WINDOW: u32 = 16;
const CHECKPOINT_AFTER: u32 = 10;
/// Rounds in which the node is killed mid-batch.
const NODE_KILLS: [usize; 2] = [1, 4];
const DEADLINE: Duration = Duration::from_secs(120);

/// What the consumers did, in the order they did it.
#[derive(Debug, Default)]
struct History {
    /// `(position, stream, version)` of every processing, in order.
    processed: Vec<(u64, String, u64)>,
    /// Positions processed from a replay of the parked stream.
    replayed: BTreeSet<u64>,
    /// Consumers killed with one event processed but not acked.
    kills: usize,
    /// Positions the consumers parked themselves.
    parked_by_consumers: BTreeSet<u64>,
}

/// One consumer: processes deliveries (recording each), nacks some at
/// random, and after `kill_after` deliveries dies with the last one
/// processed but not acked. Ends on any error (the node died).
async fn worker(addr: String, name: String, kill_after: Option<usize>, nacks: bool, history: Arc<Mutex<History>>) {
    let Ok(client) = Client::connect(&addr).await else { return };
    let Ok(mut consumer) = client.consume("work", Some(&name), CONSUMER_WINDOW).await else { return };
    let mut deliveries = 0;
    while let Some(Ok(item)) = consumer.next().await {
        let ConsumerItem::Delivery { event, replayed, .. } = item else { continue };
        deliveries += 1;
        let roll = if nacks { rand::random::<u32>() % 100 } else { 99 };
        if roll < 8 {
            if consumer.nack(vec![event.position], v1::NackAction::Retry, "transient").await.is_err() {
                return;
            }
            continue;
        }
        if roll < 11 {
            history.lock().unwrap().parked_by_consumers.insert(event.position);
            let reason = format!("poison {}", event.position);
            if consumer.nack(vec![event.position], v1::NackAction::Park, &reason).await.is_err() {
                return;
            }
            continue;
        }
        {
            let mut history = history.lock().unwrap();
            history.processed.push((event.position, event.stream.as_str().to_owned(), event.version));
            if replayed {
                history.replayed.insert(event.position);
            }
            if kill_after.is_some_and(|k| deliveries >= k) {
                // Killed mid-batch: processed, never acked.
                history.kills += 1;
                return;
            }
        }
        if consumer.ack(vec![event.position]).await.is_err() {
            return;
        }
    }
}

async fn until(client: &Client, what: &str, done: impl Fn(&v1::GroupInfo) -> bool) -> v1::GroupInfo {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = client.describe_group("work").await.unwrap();
        if done(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "{what}: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publish_round(client: &Client, round: usize) -> Vec<u64> {
    let mut positions = Vec::new();
    for k in 0..STREAMS {
        let count = EVENTS_PER_ROUND / STREAMS;
        positions.extend(publish(client, &format!("jobs.s{k}.r{}", round % 2), count).await);
    }
    positions
}

#[test]
fn kills_restarts_and_nacks_lose_nothing_and_keep_stream_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path());
    let history = Arc::new(Mutex::new(History::default()));
    let mut published = Vec::new();
    let mut node_kills = 0usize;
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let settings = v1::GroupSettings {
            max_in_flight: Some(GROUP_WINDOW),
            message_timeout_ms: Some(10_000),
            max_retries: Some(3),
            strategy: v1::GroupStrategy::ByStream as i32,
            checkpoint_after: Some(CHECKPOINT_AFTER),
            checkpoint_interval_ms: Some(100),
        };
        client.create_group(create("work", "jobs.>", settings)).await.unwrap();
    });
    for round in 0..ROUNDS {
        let addr = node.grpc.to_string();
        let kill_node = NODE_KILLS.contains(&round);
        rt.block_on(async {
            let client = Client::connect(&addr).await.unwrap();
            published.extend(publish_round(&client, round).await);
            let before = history.lock().unwrap().processed.len();
            let workers: Vec<_> = (0..CONSUMERS)
                .map(|i| {
                    let kill_after = Some(5 + rand::random::<u32>() as usize % 40);
                    tokio::spawn(worker(addr.clone(), format!("c{i}"), kill_after, true, Arc::clone(&history)))
                })
                .collect();
            let aborts: Vec<_> = workers.iter().map(tokio::task::JoinHandle::abort_handle).collect();
            if kill_node {
                // Mid-batch: once the consumers are busy.
                let deadline = Instant::now() + DEADLINE;
                while history.lock().unwrap().processed.len() < before + 20 {
                    assert!(Instant::now() < deadline, "the consumers process events");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                return;
            }
            // The round ends when every consumer was killed, or when the
            // group has nothing left (then the live ones are stopped).
            let end = published.last().copied().unwrap() + 1;
            tokio::select! {
                () = async {
                    for worker in workers {
                        let _ = worker.await;
                    }
                } => {}
                _ = until(&client, "round drained", |i| i.read_position >= end && i.pending == 0) => {}
            }
            for abort in aborts {
                abort.abort();
            }
        });
        if kill_node {
            // SIGKILL: no last checkpoint.
            drop(node);
            node_kills += 1;
            node = Node::start(dir.path());
        }
    }
    // Drain: park-replay what was parked, one well-behaved consumer acks all.
    let addr = node.grpc.to_string();
    let parked = rt.block_on(async {
        let client = Client::connect(&addr).await.unwrap();
        let finisher = tokio::spawn(worker(addr.clone(), "finisher".to_owned(), None, false, Arc::clone(&history)));
        let end = published.last().copied().unwrap() + 1;
        until(&client, "all read and settled", |i| i.read_position >= end && i.pending == 0).await;
        let parked = client.list_parked("work", 0, 0).await.unwrap();
        assert!(parked.total as usize == parked.events.len(), "one page holds them: {}", parked.total);
        client.replay_parked("work").await.unwrap();
        let positions: BTreeSet<u64> = parked.events.iter().map(|p| p.event.as_ref().unwrap().position).collect();
        let deadline = Instant::now() + DEADLINE;
        while !positions.is_subset(&history.lock().unwrap().replayed) {
            assert!(Instant::now() < deadline, "every parked event is replayed and processed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        until(&client, "replay settled", |i| i.pending == 0).await;
        finisher.abort();
        parked
    });
    node.stop();

    let history = history.lock().unwrap();
    let processed: BTreeSet<u64> = history.processed.iter().map(|(p, _, _)| *p).collect();
    // 1. Every event was processed.
    let missing: Vec<u64> = published.iter().copied().filter(|p| !processed.contains(p)).collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
    // 2. Every parked event has its reason, and the events consumers parked
    //    are there.
    let mut parked_positions = BTreeSet::new();
    for p in &parked.events {
        let position = p.event.as_ref().unwrap().position;
        parked_positions.insert(position);
        let by_consumer = p.reason == format!("consumer {} parked it: poison {position}", p.consumer);
        let by_retries = p.reason.contains("more than max_retries (3) allows");
        assert!(by_consumer || by_retries, "parked without its reason: {p:?}");
    }
    // A park nack can die with the node before the node applies it; that
    // event comes again (and was processed: see 1).
    let unparked: Vec<_> = history.parked_by_consumers.difference(&parked_positions).collect();
    assert!(
        unparked.len() <= node_kills * GROUP_WINDOW as usize,
        "parked by a consumer, not in the parked stream: {unparked:?}"
    );
    // 3. Per-stream order: an event is processed only after every earlier
    //    event of its stream was processed or parked.
    let mut done: HashMap<&str, BTreeSet<u64>> = HashMap::new();
    let version_positions: HashMap<(&str, u64), u64> =
        history.processed.iter().map(|(p, s, v)| ((s.as_str(), *v), *p)).collect();
    for (position, stream, version) in &history.processed {
        let seen = done.entry(stream.as_str()).or_default();
        for earlier in 0..*version {
            let parked =
                version_positions.get(&(stream.as_str(), earlier)).is_some_and(|p| parked_positions.contains(p));
            assert!(
                seen.contains(&earlier) || parked,
                "{stream}@{version} (position {position}) processed before {stream}@{earlier}"
            );
        }
        seen.insert(*version);
    }
    // 4. Redeliveries of processed events stay within the unacked window:
    //    one per killed consumer, and per node kill what was in flight plus
    //    what settled since the start of the last checkpoint written (the
    //    engine writes one while it works, and waits when the next is due:
    //    two checkpoints' worth, each at most one ack message past
    //    `checkpoint_after`), plus one per event parked twice.
    let duplicates = history.processed.len() - processed.len();
    let parked_twice = parked.events.len() - parked_positions.len();
    let bound =
        history.kills + node_kills * (GROUP_WINDOW + 2 * (CHECKPOINT_AFTER + CONSUMER_WINDOW)) as usize + parked_twice;
    assert!(
        duplicates <= bound,
        "{duplicates} redelivered processings > bound {bound} ({} kills, {node_kills} node kills)",
        history.kills
    );
    eprintln!(
        "groups scenario: {} events, {} processings, {duplicates} duplicates (bound {bound}), {} parked, {} consumer kills, {node_kills} node kills",
        published.len(),
        history.processed.len(),
        parked.events.len(),
        history.kills
    );
}
