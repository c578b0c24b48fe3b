//! 1,000 concurrent subscribers on one node, a third of them never granting
//! credit, while publishing goes on: the others receive every event in
//! order, the stalled ones receive nothing, and the node's memory stays
//! flat (the stalled subscriptions hold no buffers).

use std::time::Duration;

use edgebus_client::{
    Client, Credit, StreamSelector, SubscribeFrom, Subscription, SubscriptionFilter, SubscriptionItem,
};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName, StreamPattern};

use crate::node::{Node, http_get, rss_bytes};

const SUBSCRIBERS: usize = 1000;
const STALLED: usize = SUBSCRIBERS / 3;
/// Subscriptions per HTTP/2 connection.
const PER_CONNECTION: usize = 100;
const EVENTS: u64 = 2000;
const EVENTS_PER_APPEND: u64 = 20;
const PAYLOAD_BYTES: usize = 512;
/// The whole scenario must finish within this.
const DEADLINE: Duration = Duration::from_secs(300);
/// Growth of the node's resident memory allowed over the run. Buffering the
/// events for the stalled subscribers would take STALLED × EVENTS ×
/// PAYLOAD_BYTES ≈ 330 MiB on top of what the active ones cost: typically
/// 50–60 MiB (HTTP/2 send buffers of 667 streams, the live ring, allocator
/// arenas), once seen above 96 MiB on this 2-core machine.
const RSS_GROWTH_MAX_BYTES: u64 = 160 * 1024 * 1024;

fn filter(pattern: &str) -> SubscriptionFilter {
    SubscriptionFilter {
        streams: StreamSelector::Pattern(StreamPattern::new(pattern).unwrap()),
        event_types: Vec::new(),
        predicate: None,
        include_system: false,
    }
}

async fn until_caught_up(subscription: &mut Subscription) {
    loop {
        match subscription.next().await.expect("open").expect("no error") {
            SubscriptionItem::CaughtUp { .. } => return,
            SubscriptionItem::Checkpoint { .. } => {}
            SubscriptionItem::Event(event) => panic!("no events before the publisher starts: {event:?}"),
        }
    }
}

/// The sum of one metric's samples whose labels contain `labels`.
fn metric(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with('{') && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_thousand_subscribers_a_third_stalled_the_rest_keep_up_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        tokio::time::timeout(DEADLINE, async {
            let mut clients = Vec::new();
            for _ in 0..SUBSCRIBERS.div_ceil(PER_CONNECTION) {
                clients.push(Client::connect(&node.grpc.to_string()).await.unwrap());
            }
            // The stalled third subscribes under its own pattern, so that
            // the node's per-pattern metrics tell the two groups apart.
            let mut stalled = Vec::new();
            let mut active = Vec::new();
            for i in 0..SUBSCRIBERS {
                let client = &clients[i / PER_CONNECTION];
                if i % 3 == 0 && stalled.len() < STALLED {
                    let credit = Credit::Manual { initial: 0 };
                    stalled.push(client.subscribe(filter("load.>"), SubscribeFrom::End, credit).await.unwrap());
                } else {
                    let credit = Credit::Window(256);
                    active.push(client.subscribe(filter("load.*"), SubscribeFrom::End, credit).await.unwrap());
                }
            }
            for subscription in stalled.iter_mut().chain(active.iter_mut()) {
                until_caught_up(subscription).await;
            }
            let rss_before = rss_bytes(node.pid());

            let readers: Vec<_> = active
                .into_iter()
                .map(|mut subscription| {
                    tokio::spawn(async move {
                        let mut next_seq = 0u64;
                        let mut last_position = None;
                        while next_seq < EVENTS {
                            match subscription.next().await.expect("open").expect("no error") {
                                SubscriptionItem::Event(event) => {
                                    let seq = u64::from_le_bytes(event.data[..8].try_into().unwrap());
                                    assert_eq!(seq, next_seq, "in order, nothing lost, nothing twice");
                                    assert!(last_position < Some(event.position));
                                    last_position = Some(event.position);
                                    next_seq += 1;
                                }
                                SubscriptionItem::Checkpoint { .. } | SubscriptionItem::CaughtUp { .. } => {}
                            }
                        }
                        subscription
                    })
                })
                .collect();

            let publisher = clients[0].clone();
            let stream = StreamName::new("load.a").unwrap();
            let mut rss_peak = rss_before;
            for batch in 0..EVENTS / EVENTS_PER_APPEND {
                let events = (0..EVENTS_PER_APPEND)
                    .map(|i| {
                        let mut data = vec![0x5a; PAYLOAD_BYTES];
                        data[..8].copy_from_slice(&(batch * EVENTS_PER_APPEND + i).to_le_bytes());
                        NewEvent {
                            id: EventId::from_u128(rand::random()),
                            event_type: EventType::new("tick").unwrap(),
                            data,
                            metadata: Vec::new(),
                            timestamp_ms: 0,
                        }
                    })
                    .collect();
                publisher.append(stream.clone(), ExpectedVersion::Any, events).await.unwrap();
                rss_peak = rss_peak.max(rss_bytes(node.pid()));
            }
            let mut finished = Vec::new();
            for reader in readers {
                finished.push(reader.await.expect("every active subscriber gets every event"));
                rss_peak = rss_peak.max(rss_bytes(node.pid()));
            }
            assert_eq!(finished.len(), SUBSCRIBERS - STALLED);

            let growth = rss_peak.saturating_sub(rss_before);
            eprintln!("node RSS {} MiB before publishing, peak {} MiB", rss_before >> 20, rss_peak >> 20);
            assert!(
                growth <= RSS_GROWTH_MAX_BYTES,
                "the node grew by {} MiB (from {} MiB) while {STALLED} subscribers granted no credit",
                growth >> 20,
                rss_before >> 20
            );
            // Every active subscriber has every event; had the node ignored
            // the stalled ones' zero credit, it would have sent to them too.
            let metrics = http_get(node.http, "/metrics");
            let delivered = "edgebus_subscription_events_delivered_total";
            assert_eq!(metric(&metrics, delivered, "pattern=\"load.>\""), 0.0, "nothing without credit");
            let expected = ((SUBSCRIBERS - STALLED) as u64 * EVENTS) as f64;
            assert_eq!(metric(&metrics, delivered, "pattern=\"load.*\""), expected);
            assert_eq!(metric(&metrics, "edgebus_subscriptions", "pattern=\"load.>\""), STALLED as f64);
            drop((finished, stalled));
        })
        .await
        .expect("the scenario finishes within its deadline");
    });
    node.stop();
}
