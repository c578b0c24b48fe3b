//! Subscriptions against a real node: catch-up then live with the
//! `caught_up` marker between them, every start, every filter, credit, and
//! the refusals of a bad start.

use std::time::Duration;

use edgebus_client::{
    Client, ClientError, Credit, StreamSelector, SubscribeFrom, Subscription, SubscriptionFilter, SubscriptionItem,
};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName, StreamPattern};

use crate::node::Node;

/// How long one awaited message may take before the test fails.
const ITEM_DEADLINE: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn event(event_type: &str, data: &str) -> NewEvent {
    NewEvent {
        id: EventId::from_u128(rand::random()),
        event_type: EventType::new(event_type).unwrap(),
        data: data.as_bytes().to_vec(),
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

fn filter(streams: StreamSelector) -> SubscriptionFilter {
    SubscriptionFilter { streams, event_types: Vec::new(), predicate: None, include_system: false }
}

async fn publish(client: &Client, name: &str, events: impl IntoIterator<Item = NewEvent>) {
    client.append(stream(name), ExpectedVersion::Any, events.into_iter().collect()).await.unwrap();
}

async fn next_item(subscription: &mut Subscription) -> SubscriptionItem {
    tokio::time::timeout(ITEM_DEADLINE, subscription.next())
        .await
        .expect("an item within the deadline")
        .expect("the subscription goes on")
        .expect("no error")
}

/// Takes `count` events, skipping checkpoints; fails on `caught_up`.
async fn events(subscription: &mut Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    while out.len() < count {
        match next_item(subscription).await {
            SubscriptionItem::Event(event) => out.push(event),
            SubscriptionItem::Checkpoint { .. } => {}
            SubscriptionItem::CaughtUp { position } => panic!("caught up at {position} after {} events", out.len()),
        }
    }
    out
}

async fn caught_up(subscription: &mut Subscription) -> u64 {
    loop {
        match next_item(subscription).await {
            SubscriptionItem::CaughtUp { position } => return position,
            SubscriptionItem::Checkpoint { .. } => {}
            SubscriptionItem::Event(event) => panic!("an event where caught_up was due: {event:?}"),
        }
    }
}

fn datas(events: &[RecordedEvent]) -> Vec<String> {
    events.iter().map(|e| String::from_utf8(e.data.clone()).unwrap()).collect()
}

#[test]
fn catch_up_then_live_with_filters_and_starts() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        for i in 0..300 {
            publish(&client, &format!("orders.{}", i % 3), [event("placed", &format!("{{\"n\":{i}}}"))]).await;
            if i % 2 == 0 {
                publish(&client, "audit", [event("noted", &format!("{{\"n\":{i}}}"))]).await;
            }
        }

        // A pattern from the beginning: the 300 orders in log order, then
        // caught_up, then live events.
        let pattern = StreamSelector::Pattern(StreamPattern::new("orders.*").unwrap());
        let mut orders = client.subscribe(filter(pattern), SubscribeFrom::Beginning, Credit::Window(64)).await.unwrap();
        let got = events(&mut orders, 300).await;
        assert_eq!(datas(&got), (0..300).map(|i| format!("{{\"n\":{i}}}")).collect::<Vec<_>>());
        assert!(got.windows(2).all(|w| w[0].position < w[1].position), "log order");
        let caught_up_at = caught_up(&mut orders).await;
        assert!(caught_up_at > got.last().unwrap().position);

        // One stream from a version, and from the end.
        let exact = StreamSelector::Stream(stream("orders.1"));
        let mut from_version =
            client.subscribe(filter(exact.clone()), SubscribeFrom::StreamVersion(95), Credit::default()).await.unwrap();
        let got = events(&mut from_version, 5).await;
        assert_eq!(got.iter().map(|e| e.version).collect::<Vec<_>>(), vec![95, 96, 97, 98, 99]);
        caught_up(&mut from_version).await;
        let mut from_end = client.subscribe(filter(exact), SubscribeFrom::End, Credit::default()).await.unwrap();
        caught_up(&mut from_end).await;

        // Type and predicate filters over the JSON payload.
        let mut hot = client
            .subscribe(
                SubscriptionFilter {
                    streams: StreamSelector::All,
                    event_types: vec![EventType::new("reading").unwrap()],
                    predicate: Some("data.temp > 70 && data.site == \"eu\"".to_owned()),
                    include_system: false,
                },
                SubscribeFrom::Position(0),
                Credit::default(),
            )
            .await
            .unwrap();
        caught_up(&mut hot).await;

        // Live: new events reach every subscription that wants them.
        publish(&client, "orders.1", [event("placed", "{\"n\":300}")]).await;
        publish(&client, "sensors.a", [event("reading", "{\"temp\":71,\"site\":\"eu\"}")]).await;
        publish(&client, "sensors.a", [event("reading", "{\"temp\":69,\"site\":\"eu\"}")]).await;
        publish(&client, "sensors.b", [event("reading", "{\"temp\":90,\"site\":\"us\"}")]).await;
        publish(&client, "sensors.b", [event("calibrated", "{\"temp\":99,\"site\":\"eu\"}")]).await;
        publish(&client, "sensors.c", [event("reading", "{\"temp\":75.5,\"site\":\"eu\"}")]).await;
        assert_eq!(datas(&events(&mut orders, 1).await), ["{\"n\":300}"]);
        assert_eq!(datas(&events(&mut from_version, 1).await), ["{\"n\":300}"]);
        assert_eq!(datas(&events(&mut from_end, 1).await), ["{\"n\":300}"]);
        let got = events(&mut hot, 2).await;
        assert_eq!(datas(&got), ["{\"temp\":71,\"site\":\"eu\"}", "{\"temp\":75.5,\"site\":\"eu\"}"]);
    });
    node.stop();
}

#[test]
fn a_bad_start_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let refused = |result: Result<Subscription, ClientError>| match result {
            Ok(_) => panic!("the start was accepted"),
            Err(e) => e,
        };
        let bad_predicate =
            SubscriptionFilter { predicate: Some("data.temp >".to_owned()), ..filter(StreamSelector::All) };
        let error = refused(client.subscribe(bad_predicate, SubscribeFrom::Beginning, Credit::default()).await);
        assert_eq!(error.code_name(), Some("INVALID_FILTER"), "{error}");
        assert!(error.to_string().contains("does not compile"), "{error}");
        assert_eq!(error.detail().unwrap().field, "predicate");

        let unknown_variable =
            SubscriptionFilter { predicate: Some("nope > 1".to_owned()), ..filter(StreamSelector::All) };
        let error = refused(client.subscribe(unknown_variable, SubscribeFrom::Beginning, Credit::default()).await);
        assert_eq!(error.code_name(), Some("INVALID_FILTER"), "{error}");

        // The node keeps serving.
        let mut fine =
            client.subscribe(filter(StreamSelector::All), SubscribeFrom::End, Credit::default()).await.unwrap();
        caught_up(&mut fine).await;
    });
    node.stop();
}

#[test]
fn credit_bounds_what_is_sent_and_grants_resume_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        publish(&client, "c", (0..10).map(|i| event("e", &i.to_string()))).await;
        let mut manual = client
            .subscribe(filter(StreamSelector::All), SubscribeFrom::Beginning, Credit::Manual { initial: 4 })
            .await
            .unwrap();
        assert_eq!(datas(&events(&mut manual, 4).await), ["0", "1", "2", "3"]);
        manual.grant(6).await.unwrap();
        assert_eq!(datas(&events(&mut manual, 6).await), ["4", "5", "6", "7", "8", "9"]);
        caught_up(&mut manual).await;
        // Live events wait for credit too, then arrive in order.
        publish(&client, "c", (10..20).map(|i| event("e", &i.to_string()))).await;
        manual.grant(10).await.unwrap();
        assert_eq!(datas(&events(&mut manual, 10).await), (10..20).map(|i| i.to_string()).collect::<Vec<_>>());
    });
    node.stop();
}

/// Reads SSE messages (`event` name and `data`) until `until` says stop.
fn read_sse(reader: &mut impl std::io::BufRead, mut until: impl FnMut(&str, &str) -> bool) -> Vec<(String, String)> {
    let mut messages = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("read an SSE line") > 0, "the event stream ended");
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(name) = line.strip_prefix("event: ").or_else(|| line.strip_prefix("event:")) {
            event = name.to_owned();
        } else if let Some(text) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
            data = text.to_owned();
        } else if line.is_empty() && !event.is_empty() {
            let stop = until(&event, &data);
            messages.push((std::mem::take(&mut event), std::mem::take(&mut data)));
            if stop {
                return messages;
            }
        }
    }
}

#[test]
fn server_sent_events_catch_up_go_live_and_resume_after_the_last_id() {
    use std::io::{BufReader, Write as _};

    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let rt = runtime();
    let client = rt.block_on(Client::connect(&node.grpc.to_string())).unwrap();
    rt.block_on(publish(
        &client,
        "sensor.1",
        (0..5).map(|i| event("reading", &format!("{{\"temp\":{}}}", 60 + 5 * i))),
    ));

    let open = |query: &str, last_event_id: Option<u64>| {
        let mut socket = std::net::TcpStream::connect(node.http).unwrap();
        socket.set_read_timeout(Some(ITEM_DEADLINE)).unwrap();
        let resume = last_event_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
        write!(socket, "GET /v1/subscribe?{query} HTTP/1.1\r\nHost: edgebus\r\nConnection: close\r\n{resume}\r\n")
            .unwrap();
        let mut reader = BufReader::new(socket);
        let mut status = String::new();
        std::io::BufRead::read_line(&mut reader, &mut status).unwrap();
        (status, reader)
    };

    let (status, mut hot) = open("pattern=sensor.*&predicate=data.temp%20%3E%2070&from=start", None);
    assert!(status.contains(" 200 "), "{status}");
    let messages = read_sse(&mut hot, |event, _| event == "caught_up");
    let temps: Vec<_> = messages.iter().filter(|(e, _)| e == "event").map(|(_, d)| d.clone()).collect();
    assert_eq!(temps.len(), 2, "75 and 80 are above 70: {messages:?}");
    assert!(temps[0].contains("\"temp\":75") && temps[1].contains("\"temp\":80"), "{temps:?}");

    rt.block_on(publish(&client, "sensor.2", [event("reading", "{\"temp\":99}")]));
    let live = read_sse(&mut hot, |event, _| event == "event");
    assert!(live[0].1.contains("\"temp\":99"), "{live:?}");
    let position: u64 = serde_json::from_str::<serde_json::Value>(&live[0].1).unwrap()["position"].as_u64().unwrap();

    // A browser reconnecting after that id gets what came after it only.
    rt.block_on(publish(&client, "sensor.1", [event("reading", "{\"temp\":100}")]));
    let (_, mut resumed) = open("pattern=sensor.*&from=start", Some(position));
    let after = read_sse(&mut resumed, |event, _| event == "caught_up");
    assert_eq!(after.len(), 2, "one event, then caught_up: {after:?}");
    assert!(after[0].1.contains("\"temp\":100"), "{after:?}");

    // A predicate that does not compile is refused before the stream starts.
    let (status, mut refused) = open("predicate=data.temp%20%3E", None);
    assert!(status.contains(" 400 "), "{status}");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut refused, &mut rest);
    assert!(rest.contains("\"code\":101") && rest.contains("does not compile"), "{rest}");
    drop((hot, resumed));
    node.stop();
}

#[test]
fn a_subscriber_overtaken_by_the_live_ring_reads_the_log_and_rejoins_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let pattern = StreamSelector::Pattern(StreamPattern::new("ring.>").unwrap());
        // Credit to spare, but the application does not read: the node's
        // sends block on the connection, and the live ring (256 batches)
        // overtakes the subscription.
        let mut slow = client.subscribe(filter(pattern), SubscribeFrom::End, Credit::Window(100_000)).await.unwrap();
        caught_up(&mut slow).await;
        let payload = "x".repeat(8 * 1024);
        for i in 0..600 {
            publish(&client, "ring.a", [event("e", &format!("{i:04}{payload}"))]).await;
        }
        let got = events(&mut slow, 600).await;
        let seqs: Vec<String> = datas(&got).iter().map(|d| d[..4].to_owned()).collect();
        assert_eq!(seqs, (0..600).map(|i| format!("{i:04}")).collect::<Vec<_>>(), "in order, none lost or repeated");
        // Live again: the next event arrives without a new subscription.
        publish(&client, "ring.a", [event("e", "after")]).await;
        assert_eq!(datas(&events(&mut slow, 1).await), ["after"]);
    });
    let metrics = crate::node::http_get(node.http, "/metrics");
    let fell_behind = metrics
        .lines()
        .find(|line| line.starts_with("edgebus_subscription_fell_behind_total{") && line.contains("pattern=\"ring.>\""))
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no fell_behind figure for ring.> in {metrics}"));
    assert!(fell_behind >= 1.0, "the subscription went back to the log at least once");
    node.stop();
}

#[test]
fn subscriptions_over_the_node_limit_are_refused_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = Node::start_with(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--max-subscriptions",
            "2",
        ],
        &[],
    );
    runtime().block_on(async {
        let client = Client::connect(&node.grpc.to_string()).await.unwrap();
        let open = || client.subscribe(filter(StreamSelector::All), SubscribeFrom::End, Credit::default());
        let mut first = open().await.unwrap();
        let mut second = open().await.unwrap();
        caught_up(&mut first).await;
        caught_up(&mut second).await;
        let error = match open().await {
            Ok(_) => panic!("a third subscription was accepted over a limit of 2"),
            Err(e) => e,
        };
        assert_eq!(error.code_name(), Some("RESOURCE_EXHAUSTED"), "{error}");
        assert!(error.to_string().contains("too many subscriptions"), "{error}");
        assert!(error.detail().unwrap().retry_after_ms.is_some());
        // The node frees the place once it sees the subscriber leave.
        drop(first);
        let deadline = tokio::time::Instant::now() + ITEM_DEADLINE;
        let mut third = loop {
            match open().await {
                Ok(subscription) => break subscription,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    assert_eq!(e.code_name(), Some("RESOURCE_EXHAUSTED"), "{e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("the place of a closed subscription was never freed: {e}"),
            }
        };
        caught_up(&mut third).await;
    });
    node.stop();
}
