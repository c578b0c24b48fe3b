//! The node's HTTP JSON API over a real `edgebus serve`: publish JSON, read
//! it back, and every refusal is a status with a JSON `{code, message}`
//! whose code is the stable wire number.

use serde_json::{Value, json};

use crate::node::{HttpResponse, Node, http_request};

fn json_body(response: &HttpResponse) -> Value {
    assert_eq!(response.header("content-type"), Some("application/json"), "{response:?}");
    serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("a JSON body ({e}): {response:?}"))
}

#[test]
fn http_api_appends_reads_refuses_with_stable_codes_and_counts_appends() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let post = |path: &str, headers: &[&str], body: &[u8]| http_request(node.http, "POST", path, headers, body);
    let get = |path: &str| http_request(node.http, "GET", path, &[], b"");

    // One event, then a wrapper with two events and an expected version.
    let one = post(
        "/v1/streams/orders.o-1",
        &["edgebus-expected-version: no_stream"],
        br#"{"type": "OrderPlaced", "data": {"total": 42, "items": ["a"]}, "id": "00000000-0000-0000-0000-000000000001"}"#,
    );
    assert_eq!(one.status, 201, "{one:?}");
    let one = json_body(&one);
    assert_eq!(one["first_version"], 0, "{one}");
    assert_eq!(one["count"], 1, "{one}");
    assert_eq!(one["already_written"], false, "{one}");
    let two = post(
        "/v1/streams/orders.o-1",
        &[],
        br#"{"expected_version": "0", "events": [
            {"type": "OrderPaid", "data": "card", "metadata": {"by": "test"}},
            {"type": "OrderShipped", "data": null}
        ]}"#,
    );
    assert_eq!(two.status, 201, "{two:?}");
    let two = json_body(&two);
    assert_eq!((two["first_version"].as_u64(), two["count"].as_u64()), (Some(1), Some(2)), "{two}");

    // An idempotent retry of the first event writes nothing.
    let retry = post(
        "/v1/streams/orders.o-1",
        &[],
        br#"[{"type": "OrderPlaced", "data": {"total": 42, "items": ["a"]}, "id": "00000000-0000-0000-0000-000000000001"}]"#,
    );
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(json_body(&retry)["already_written"], true);

    // Read it back, forward and backward.
    let read = get("/v1/streams/orders.o-1");
    assert_eq!(read.status, 200, "{read:?}");
    let read = json_body(&read);
    let events = read["events"].as_array().expect("events");
    assert_eq!(events.len(), 3, "{read}");
    assert_eq!(events[0]["type"], "OrderPlaced");
    assert_eq!(events[0]["data"], json!({"total": 42, "items": ["a"]}));
    assert_eq!(events[0]["id"], "00000000-0000-0000-0000-000000000001");
    assert_eq!(events[0]["metadata"], Value::Null);
    assert_eq!(events[1]["data"], "card");
    assert_eq!(events[1]["metadata"], json!({"by": "test"}));
    assert_eq!(events[2]["data"], Value::Null);
    assert_eq!(events[2]["version"], 2);
    assert_eq!(events[2]["stream"], "orders.o-1");
    assert!(events.iter().all(|e| e["timestamp_ms"].as_u64() > Some(0)), "the node stamps time: {read}");
    assert_ne!(events[1]["id"], events[2]["id"], "fresh ids differ");
    let back = json_body(&get("/v1/streams/orders.o-1?from=end&count=2&direction=backward"));
    let versions: Vec<u64> =
        back["events"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [2, 1], "{back}");

    // A conflict: 409, code 1, with the versions.
    let conflict = post(
        "/v1/streams/orders.o-1",
        &["edgebus-expected-version: no_stream"],
        br#"{"type": "OrderPlaced", "data": 1}"#,
    );
    assert_eq!(conflict.status, 409, "{conflict:?}");
    let conflict = json_body(&conflict);
    assert_eq!(conflict["code"], 1, "{conflict}");
    assert_eq!(conflict["expected"], "no_stream", "{conflict}");
    assert_eq!(conflict["current"], 2, "{conflict}");
    assert!(conflict["message"].as_str().is_some_and(|m| m.contains("expected")), "{conflict}");

    // A bad stream name: 400, code 100 (InvalidName).
    let bad_name = post("/v1/streams/bad..name", &[], br#"{"type": "T", "data": 1}"#);
    assert_eq!(bad_name.status, 400, "{bad_name:?}");
    assert_eq!(json_body(&bad_name)["code"], 100);
    let spaced = post("/v1/streams/bad%20name", &[], br#"{"type": "T", "data": 1}"#);
    assert_eq!((spaced.status, json_body(&spaced)["code"].as_u64()), (400, Some(100)), "{spaced:?}");
    let bad_name_read = get("/v1/streams/bad..name");
    assert_eq!(bad_name_read.status, 400, "{bad_name_read:?}");
    assert_eq!(json_body(&bad_name_read)["code"], 100);

    // Malformed JSON: 400 with a JSON error body (InvalidArgument).
    let malformed = post("/v1/streams/orders.o-1", &[], br#"{"type": "T", "data": "#);
    assert_eq!(malformed.status, 400, "{malformed:?}");
    let malformed = json_body(&malformed);
    assert_eq!(malformed["code"], 14, "{malformed}");
    assert!(malformed["message"].as_str().is_some_and(|m| m.contains("JSON")), "{malformed}");

    // A bad expected version and a bad query are refused too.
    let bad_expected =
        post("/v1/streams/orders.o-1", &["edgebus-expected-version: some"], br#"{"type": "T", "data": 1}"#);
    assert_eq!((bad_expected.status, json_body(&bad_expected)["code"].as_u64()), (400, Some(14)), "{bad_expected:?}");
    let bad_query = get("/v1/streams/orders.o-1?direction=sideways");
    assert_eq!((bad_query.status, json_body(&bad_query)["code"].as_u64()), (400, Some(14)), "{bad_query:?}");

    // An unknown stream: 404, code 3.
    let missing = get("/v1/streams/orders.none");
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_eq!(json_body(&missing)["code"], 3);

    // Routes and methods the node does not serve are refused in JSON too.
    let no_route = get("/v2/nothing");
    assert_eq!((no_route.status, json_body(&no_route)["code"].as_u64()), (404, Some(14)), "{no_route:?}");
    assert!(json_body(&no_route)["message"].as_str().is_some_and(|m| m.contains("/v2/nothing")));
    let wrong_method = http_request(node.http, "DELETE", "/v1/stats", &[], b"");
    assert_eq!((wrong_method.status, json_body(&wrong_method)["code"].as_u64()), (405, Some(14)), "{wrong_method:?}");

    // A body over the limit: 413 with a JSON error body.
    let huge = vec![b' '; 9 * 1024 * 1024];
    let too_large = post("/v1/streams/orders.o-1", &[], &huge);
    assert_eq!(too_large.status, 413, "{:?}", (too_large.status, &too_large.headers));
    assert_eq!(json_body(&too_large)["code"], 6);

    // Stats count the appends: two new writes (the retry wrote nothing new
    // to the log), three records.
    let stats = get("/v1/stats");
    assert_eq!(stats.status, 200, "{stats:?}");
    let stats = json_body(&stats);
    assert_eq!(stats["appends"], 2, "{stats}");
    assert_eq!(stats["records"], 3, "{stats}");
    assert_eq!(stats["end_position"], 3, "{stats}");
    assert_eq!(stats["start_position"], 0, "{stats}");
    assert!(stats["bytes_written"].as_u64() > Some(0), "{stats}");

    node.stop();
}
