//! Consumer groups against a real node: management and its refusals,
//! demand windows, acks, nacks, timeouts, parking and replay, restarts,
//! the HTTP routes and the CLI.

use std::time::Duration;

use edgebus_client::{Client, ClientError, Consumer, ConsumerItem};
use edgebus_proto::v1;
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use serde_json::Value;

use crate::node::{Node, http_request};

/// How long one awaited message may take before the test fails.
const ITEM_DEADLINE: Duration = Duration::from_secs(60);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub fn event(data: &str) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(rand::random()),
        event_type: EventType::new("job").unwrap(),
        data: data.as_bytes().to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

pub async fn publish(client: &Client, stream: &str, count: usize) -> Vec<u64> {
    let events = (0..count).map(|i| event(&format!("{{\"i\":{i}}}"))).collect();
    let result = client.append(StreamName::new(stream).unwrap(), ExpectedVersion::Any, events).await.unwrap();
    (result.first_position..result.first_position + count as u64).collect()
}

/// A create request: pattern filter, from the beginning, `settings`.
pub fn create(name: &str, pattern: &str, settings: v1::GroupSettings) -> v1::CreateGroupRequest {
    v1::CreateGroupRequest {
        name: name.to_owned(),
        filter: Some(v1::GroupFilter {
            streams: Some(v1::group_filter::Streams::StreamPattern(pattern.to_owned())),
            ..v1::GroupFilter::default()
        }),
        settings: Some(settings),
        start_at: Some(v1::create_group_request::StartAt::Beginning(v1::Empty {})),
    }
}

/// The next delivery: event and attempt.
pub async fn delivery(consumer: &mut Consumer) -> (RecordedEvent, u32, bool) {
    match next(consumer).await {
        ConsumerItem::Delivery { event, attempt, replayed } => (event, attempt, replayed),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

pub async fn next(consumer: &mut Consumer) -> ConsumerItem {
    tokio::time::timeout(ITEM_DEADLINE, consumer.next())
        .await
        .expect("an item within the deadline")
        .expect("the call goes on")
        .expect("no error")
}

fn code(error: &ClientError) -> &'static str {
    error.code_name().unwrap_or("none")
}

/// Polls `describe` until `done` holds (bounded).
async fn until(client: &Client, group: &str, what: &str, done: impl Fn(&v1::GroupInfo) -> bool) -> v1::GroupInfo {
    let deadline = tokio::time::Instant::now() + ITEM_DEADLINE;
    loop {
        let info = client.describe_group(group).await.unwrap();
        if done(&info) {
            return info;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn management_refuses_bad_input_and_leaves_state_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let info = client.create_group(create("orders", "orders.>", v1::GroupSettings::default())).await.unwrap();
        assert_eq!(info.name, "orders");
        let settings = info.settings.unwrap();
        assert_eq!((settings.max_in_flight, settings.max_retries), (Some(1000), Some(10)));
        assert_eq!(settings.strategy, v1::GroupStrategy::RoundRobin as i32);

        let again = client.create_group(create("orders", "x.>", v1::GroupSettings::default())).await.unwrap_err();
        assert_eq!(code(&again), "GROUP_EXISTS", "{again}");
        let zero = v1::GroupSettings { max_in_flight: Some(0), ..v1::GroupSettings::default() };
        let error = client.create_group(create("zero", "x.>", zero)).await.unwrap_err();
        assert_eq!(code(&error), "INVALID_ARGUMENT");
        assert_eq!(error.detail().unwrap().field, "settings.max_in_flight");
        assert!(error.to_string().contains("must not be zero"), "{error}");
        let mut bad_cel = create("cel", "x.>", v1::GroupSettings::default());
        bad_cel.filter.as_mut().unwrap().predicate = "data.x >".to_owned();
        let error = client.create_group(bad_cel).await.unwrap_err();
        assert_eq!((code(&error), error.detail().unwrap().field.as_str()), ("INVALID_FILTER", "filter.predicate"));
        let error = client.create_group(create("a.b", "x.>", v1::GroupSettings::default())).await.unwrap_err();
        assert_eq!(code(&error), "INVALID_NAME", "{error}");
        let mut no_start = create("nostart", "x.>", v1::GroupSettings::default());
        no_start.start_at = None;
        assert_eq!(code(&client.create_group(no_start).await.unwrap_err()), "INVALID_ARGUMENT");

        for error in [
            client.describe_group("nope").await.unwrap_err(),
            client.delete_group("nope").await.unwrap_err(),
            client.replay_parked("nope").await.unwrap_err(),
            client.consume("nope", None, 0).await.unwrap_err(),
        ] {
            assert_eq!(code(&error), "GROUP_NOT_FOUND", "{error}");
            assert!(error.to_string().contains("no consumer group named nope"), "{error}");
        }
        // Only the valid group exists, unchanged.
        let groups = client.list_groups().await.unwrap();
        assert_eq!(groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), vec!["orders"]);

        let update = v1::UpdateGroupRequest {
            name: "orders".to_owned(),
            filter: None,
            settings: Some(v1::GroupSettings { max_retries: Some(2), ..v1::GroupSettings::default() }),
        };
        let updated = client.update_group(update).await.unwrap();
        assert_eq!(updated.settings.unwrap().max_retries, Some(2));
        assert_eq!(updated.filter, info.filter, "the filter is kept when not given");
        let bad_update = v1::UpdateGroupRequest {
            name: "orders".to_owned(),
            filter: None,
            settings: Some(v1::GroupSettings { message_timeout_ms: Some(0), ..v1::GroupSettings::default() }),
        };
        assert_eq!(code(&client.update_group(bad_update).await.unwrap_err()), "INVALID_ARGUMENT");
        assert_eq!(client.describe_group("orders").await.unwrap().settings.unwrap().max_retries, Some(2));

        // A second consumer with a taken name is refused.
        let _first = client.consume("orders", Some("c1"), 0).await.unwrap();
        let error = client.consume("orders", Some("c1"), 0).await.unwrap_err();
        assert_eq!(code(&error), "CONSUMER_EXISTS", "{error}");

        client.delete_group("orders").await.unwrap();
        assert!(client.list_groups().await.unwrap().is_empty());
    });
    node.stop();
}

#[test]
fn windows_bound_what_is_in_flight_and_acks_free_room() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        publish(&client, "jobs.a", 40).await;
        let settings = v1::GroupSettings { max_in_flight: Some(8), ..v1::GroupSettings::default() };
        client.create_group(create("g", "jobs.>", settings)).await.unwrap();
        let mut first = client.consume("g", Some("one"), 5).await.unwrap();
        let mut second = client.consume("g", Some("two"), 5).await.unwrap();
        assert_eq!((first.window(), second.window()), (5, 5));
        let info = until(&client, "g", "8 in flight", |i| i.in_flight == 8).await;
        let held: Vec<u32> = info.consumers.iter().map(|c| c.in_flight).collect();
        assert!(held.iter().all(|&n| n <= 5) && held.iter().sum::<u32>() == 8, "{held:?}");
        assert_eq!(info.pending, 40);
        // Take what each holds; ack it; the rest follows, each once.
        let mut seen = Vec::new();
        for (consumer, n) in [(&mut first, held[0]), (&mut second, held[1])] {
            for _ in 0..n {
                let (event, attempt, _) = delivery(consumer).await;
                assert_eq!(attempt, 1);
                seen.push(event.position);
            }
        }
        first.ack(seen.clone()).await.unwrap();
        // `second`'s deliveries were acked by `first`: refused, not applied.
        match next(&mut first).await {
            ConsumerItem::Refused { positions, detail } => {
                assert_eq!(detail.code, v1::ErrorCode::NotInFlight as u32);
                assert_eq!(positions.len(), held[1] as usize);
                assert!(detail.message.contains("not in flight for consumer one"), "{}", detail.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let info = client.describe_group("g").await.unwrap();
        assert_eq!(info.acked, u64::from(held[0]));
        // The group's window refills: `second` takes up to its own window.
        let info = until(&client, "g", "8 in flight again", |i| i.in_flight == 8).await;
        let second_holds = info.consumers.iter().find(|c| c.name == "two").unwrap().in_flight;
        assert!(second_holds <= 5, "{info:?}");
        drop(second);
        until(&client, "g", "two left", |i| i.consumers.len() == 1).await;
        // `second` left: its events go to `first`, as a second attempt.
        let mut attempts = Vec::new();
        for _ in 0..40 - held[0] {
            let (event, attempt, _) = delivery(&mut first).await;
            attempts.push(attempt);
            first.ack(vec![event.position]).await.unwrap();
        }
        assert_eq!(attempts.iter().filter(|&&a| a == 2).count(), second_holds as usize, "{attempts:?}");
        let info = until(&client, "g", "all acked", |i| i.acked == 40).await;
        assert_eq!((info.pending, info.in_flight), (0, 0));
    });
    node.stop();
}

#[test]
fn nacks_retry_park_and_replay_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let positions = publish(&client, "jobs.a", 3).await;
        let settings = v1::GroupSettings { max_retries: Some(1), ..v1::GroupSettings::default() };
        client.create_group(create("g", "jobs.>", settings)).await.unwrap();
        let mut consumer = client.consume("g", Some("c"), 1).await.unwrap();
        // Event 0: nacked twice with retry → parked after max_retries (1).
        let (e, attempt, _) = delivery(&mut consumer).await;
        assert_eq!((e.position, attempt), (positions[0], 1));
        consumer.nack(vec![e.position], v1::NackAction::Retry, "db down").await.unwrap();
        let (e, attempt, _) = delivery(&mut consumer).await;
        assert_eq!((e.position, attempt), (positions[0], 2));
        consumer.nack(vec![e.position], v1::NackAction::Retry, "db still down").await.unwrap();
        // Event 1: parked at once; event 2: skipped.
        let (e, _, _) = delivery(&mut consumer).await;
        assert_eq!(e.position, positions[1]);
        consumer.nack(vec![e.position], v1::NackAction::Park, "poison").await.unwrap();
        let (e, _, _) = delivery(&mut consumer).await;
        assert_eq!(e.position, positions[2]);
        consumer.nack(vec![e.position], v1::NackAction::Skip, "irrelevant").await.unwrap();
        let info = until(&client, "g", "settled", |i| i.pending == 0).await;
        assert_eq!((info.parked, info.skipped, info.retried), (2, 1, 1));

        let parked = client.list_parked("g", 0, 0).await.unwrap();
        assert_eq!(parked.total, 2);
        let reasons: Vec<(u64, &str)> =
            parked.events.iter().map(|p| (p.event.as_ref().unwrap().position, p.reason.as_str())).collect();
        assert_eq!(reasons[0].0, positions[0]);
        assert!(reasons[0].1.contains("db still down") && reasons[0].1.contains("max_retries (1)"), "{reasons:?}");
        assert_eq!(reasons[1], (positions[1], "consumer c parked it: poison"));
        assert_eq!(parked.events[1].event.as_ref().unwrap().data, br#"{"i":1}"#);

        // Replay: both come back as they were, marked replayed.
        assert_eq!(client.replay_parked("g").await.unwrap(), 2);
        let mut replayed = Vec::new();
        for _ in 0..2 {
            let (e, attempt, was_replayed) = delivery(&mut consumer).await;
            assert!(was_replayed);
            assert_eq!(attempt, 1);
            replayed.push(e.position);
            consumer.ack(vec![e.position]).await.unwrap();
        }
        replayed.sort_unstable();
        assert_eq!(replayed, positions[..2]);
        let info = until(&client, "g", "replay settled", |i| i.pending == 0).await;
        assert_eq!(info.acked, 2);
        // A nack without an action is refused; the call goes on.
        publish(&client, "jobs.a", 1).await;
        let (e, _, _) = delivery(&mut consumer).await;
        consumer.nack(vec![e.position], v1::NackAction::Unspecified, "?").await.unwrap();
        match next(&mut consumer).await {
            ConsumerItem::Refused { detail, .. } => assert!(detail.message.contains("needs an action"), "{detail:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        consumer.ack(vec![e.position]).await.unwrap();
        until(&client, "g", "acked", |i| i.acked == 3).await;
        // Stop: the event goes back uncounted, and the call ends cleanly.
        let stopped = publish(&client, "jobs.a", 1).await;
        let (e, _, _) = delivery(&mut consumer).await;
        consumer.nack(vec![e.position], v1::NackAction::Stop, "shutting down").await.unwrap();
        let end = tokio::time::timeout(ITEM_DEADLINE, consumer.next()).await.expect("the call ends");
        assert!(end.is_none(), "a clean end, got {end:?}");
        let mut next_one = client.consume("g", Some("c2"), 1).await.unwrap();
        let (e, attempt, _) = delivery(&mut next_one).await;
        assert_eq!((e.position, attempt), (stopped[0], 1));
    });
    node.stop();
}

#[test]
fn an_event_held_past_its_timeout_goes_again_and_the_late_ack_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let positions = publish(&client, "jobs.a", 1).await;
        let settings = v1::GroupSettings { message_timeout_ms: Some(300), ..v1::GroupSettings::default() };
        client.create_group(create("g", "jobs.>", settings)).await.unwrap();
        let mut slow = client.consume("g", Some("slow"), 1).await.unwrap();
        let (e, attempt, _) = delivery(&mut slow).await;
        assert_eq!((e.position, attempt), (positions[0], 1));
        // Not acked: after the timeout it comes again (to the only consumer).
        let (e, attempt, _) = delivery(&mut slow).await;
        assert_eq!((e.position, attempt), (positions[0], 2));
        let info = client.describe_group("g").await.unwrap();
        assert_eq!(info.retried, 1);
        slow.ack(vec![e.position]).await.unwrap();
        let info = until(&client, "g", "acked", |i| i.acked == 1).await;
        assert_eq!(info.pending, 0);
        // Acking again: not in flight any more.
        slow.ack(vec![e.position]).await.unwrap();
        match next(&mut slow).await {
            ConsumerItem::Refused { positions: refused, detail } => {
                assert_eq!((refused, detail.code), (positions, v1::ErrorCode::NotInFlight as u32));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(client.describe_group("g").await.unwrap().acked, 1);
    });
    node.stop();
}

#[test]
fn a_restarted_node_resumes_each_group_at_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let positions = runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let positions = publish(&client, "jobs.a", 10).await;
        let settings = v1::GroupSettings {
            checkpoint_after: Some(1000),
            checkpoint_interval_ms: Some(600_000),
            strategy: v1::GroupStrategy::ByStream as i32,
            ..v1::GroupSettings::default()
        };
        client.create_group(create("g", "jobs.>", settings)).await.unwrap();
        let mut consumer = client.consume("g", Some("c"), 1).await.unwrap();
        for expected in &positions[..4] {
            let (e, _, _) = delivery(&mut consumer).await;
            assert_eq!(e.position, *expected, "by_stream keeps the stream's order");
            consumer.ack(vec![e.position]).await.unwrap();
        }
        until(&client, "g", "4 acked", |i| i.acked == 4).await;
        positions
    });
    // A clean stop writes the last checkpoint (no checkpoint was due).
    node.stop();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let info = client.describe_group("g").await.unwrap();
        assert_eq!(info.checkpoint, positions[4], "{info:?}");
        assert_eq!(info.settings.unwrap().strategy, v1::GroupStrategy::ByStream as i32);
        let mut consumer = client.consume("g", Some("c"), 1).await.unwrap();
        for expected in &positions[4..] {
            let (e, attempt, _) = delivery(&mut consumer).await;
            assert_eq!((e.position, attempt), (*expected, 1));
            consumer.ack(vec![e.position]).await.unwrap();
        }
        until(&client, "g", "all acked", |i| i.acked == 6 && i.pending == 0).await;
        // Deleted groups stay deleted across a restart; a new incarnation
        // of the name starts over.
        client.delete_group("g").await.unwrap();
    });
    node.stop();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        assert!(client.list_groups().await.unwrap().is_empty());
        client.create_group(create("g", "jobs.>", v1::GroupSettings::default())).await.unwrap();
        let info = until(&client, "g", "all read again", |i| i.pending == 10).await;
        assert_eq!((info.checkpoint, info.parked), (positions[0], 0));
    });
    node.stop();
}

fn json_body(response: &crate::node::HttpResponse) -> Value {
    serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("{e}: {:?}", response.body))
}

#[test]
fn groups_are_managed_over_http_and_counted_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let create = br#"{"name": "web", "filter": {"stream_pattern": "jobs.>"}, "start": "beginning",
        "settings": {"max_in_flight": 4, "strategy": "by_stream"}}"#;
    let response = http_request(node.http, "POST", "/v1/groups", &["Content-Type: application/json"], create);
    assert_eq!(response.status, 201, "{}", response.body);
    let group = json_body(&response);
    assert_eq!(group["settings"]["strategy"], "by_stream");
    assert_eq!(group["settings"]["max_in_flight"], 4);
    assert_eq!(group["filter"]["stream_pattern"], "jobs.>");

    let duplicate = http_request(node.http, "POST", "/v1/groups", &[], create);
    assert_eq!((duplicate.status, json_body(&duplicate)["code"].as_u64()), (409, Some(106)));
    let negative = br#"{"name": "neg", "start": "end", "settings": {"message_timeout_ms": -5}}"#;
    let response = http_request(node.http, "POST", "/v1/groups", &[], negative);
    assert_eq!(response.status, 400, "{}", response.body);
    let body = json_body(&response);
    assert_eq!(body["field"], "settings.message_timeout_ms");
    assert!(body["message"].as_str().unwrap().contains("must not be negative"), "{body}");
    let unknown_field = http_request(node.http, "POST", "/v1/groups", &[], br#"{"name": "x", "windw": 3}"#);
    assert_eq!(unknown_field.status, 400);
    assert!(json_body(&unknown_field)["message"].as_str().unwrap().contains("windw"));

    let patch = http_request(node.http, "PATCH", "/v1/groups/web", &[], br#"{"settings": {"max_retries": 0}}"#);
    assert_eq!(patch.status, 200, "{}", patch.body);
    assert_eq!(json_body(&patch)["settings"]["max_retries"], 0);
    let list = json_body(&http_request(node.http, "GET", "/v1/groups", &[], b""));
    assert_eq!(list["groups"].as_array().unwrap().len(), 1);
    let missing = http_request(node.http, "GET", "/v1/groups/none", &[], b"");
    assert_eq!((missing.status, json_body(&missing)["code"].as_u64()), (404, Some(105)));

    // Park one event through a consumer, then read it back over HTTP.
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        publish(&client, "jobs.x", 1).await;
        let mut consumer = client.consume("web", None, 0).await.unwrap();
        let (e, _, _) = delivery(&mut consumer).await;
        consumer.nack(vec![e.position], v1::NackAction::Retry, "flaky").await.unwrap();
        until(&client, "web", "parked", |i| i.parked == 1).await;
    });
    let parked = json_body(&http_request(node.http, "GET", "/v1/groups/web/parked?limit=10", &[], b""));
    assert_eq!(parked["total"], 1);
    let reason = parked["events"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("flaky") && reason.contains("max_retries (0)"), "{reason}");
    assert_eq!(parked["events"][0]["event"]["stream"], "jobs.x");
    let metrics = http_request(node.http, "GET", "/metrics", &[], b"").body;
    assert!(metrics.contains("edgebus_group_parked{group=\"web\"} 1"), "{metrics}");
    assert!(metrics.contains("edgebus_group_delivered_total{group=\"web\"} 1"), "{metrics}");
    let replay = http_request(node.http, "POST", "/v1/groups/web/replay-parked", &[], b"");
    assert_eq!(json_body(&replay)["replaying"], 1);
    let delete = http_request(node.http, "DELETE", "/v1/groups/web", &[], b"");
    assert_eq!(delete.status, 204);
    let gone = http_request(node.http, "DELETE", "/v1/groups/web", &[], b"");
    assert_eq!(gone.status, 404);
    node.stop();
}

#[test]
fn the_cli_creates_shows_consumes_and_removes_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let server = node.grpc.to_string();
    let edgebus = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_edgebus-node"))
            .args(args)
            .args(["--server", &server])
            .env_remove("EDGEBUS_SERVER")
            .output()
            .expect("run edgebus");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (status, out, err) =
        edgebus(&["group", "create", "cli", "--pattern", "jobs.>", "--from", "beginning", "--max-in-flight", "7"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.starts_with("created group cli"), "{out}");
    let (status, _, err) = edgebus(&["group", "create", "cli", "--from", "end"]);
    assert_eq!(status, Some(1));
    assert!(err.contains("exists already") && err.contains("GROUP_EXISTS"), "{err}");
    let (status, _, err) = edgebus(&["group", "create", "bad", "--max-in-flight", "0"]);
    assert_eq!(status, Some(1));
    assert!(err.contains("settings.max_in_flight"), "{err}");
    for i in 0..3 {
        let (status, _, err) = edgebus(&["publish", "jobs.a", &format!("i={i}")]);
        assert_eq!(status, Some(0), "{err}");
    }
    let (status, out, err) = edgebus(&["group", "consume", "cli", "--count", "3", "--json"]);
    assert_eq!(status, Some(0), "{err}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["data"]["i"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    let (status, out, _) = edgebus(&["group", "show", "cli", "--json"]);
    assert_eq!(status, Some(0));
    let shown: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((shown["acked"].as_u64(), shown["pending"].as_u64()), (Some(3), Some(0)), "{shown}");
    let (_, out, _) = edgebus(&["group", "ls"]);
    assert!(out.lines().nth(1).is_some_and(|l| l.starts_with("cli ")), "{out}");
    let (status, out, _) = edgebus(&["group", "replay-parked", "cli"]);
    assert_eq!((status, out.trim()), (Some(0), "replaying 0 parked events of group cli"));
    let (status, out, _) = edgebus(&["group", "rm", "cli"]);
    assert_eq!((status, out.trim()), (Some(0), "deleted group cli"));
    let (status, _, err) = edgebus(&["group", "show", "cli"]);
    assert_eq!(status, Some(1));
    assert!(err.contains("GROUP_NOT_FOUND"), "{err}");
    node.stop();
}
