//! A node's figures over a real `edgebus serve`: `/metrics` counts appends
//! by outcome over both transports and carries the latency histogram,
//! `/v1/stats` has the summary fields, and `edgebus stats` prints the summary
//! line and, with `--json`, the same figures as `/v1/stats`; `stats -v` and
//! `edgebus routes` say when a node runs no gateway.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::node::{HttpResponse, Node, http_request};

/// Runs the `edgebus` binary with `args`; the environment's server is ignored.
fn edgebus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgebus-node"))
        .args(args)
        .env_remove("EDGEBUS_SERVER")
        .stdin(Stdio::null())
        .output()
        .expect("run edgebus")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "edgebus failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn json_body(response: &HttpResponse) -> Value {
    assert_eq!(response.status, 200, "{response:?}");
    serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("a JSON body ({e}): {response:?}"))
}

#[test]
fn metrics_stats_and_the_stats_command_report_a_nodes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let server = format!("http://{}", node.grpc);
    let post = |body: &[u8], headers: &[&str]| http_request(node.http, "POST", "/v1/streams/s.one", headers, body);

    // Over HTTP: one event, then two, then a refused expectation.
    assert_eq!(post(br#"{"type": "T", "data": {"n": 1}}"#, &[]).status, 201);
    assert_eq!(post(br#"[{"type": "T", "data": 2}, {"type": "T", "data": 3}]"#, &[]).status, 201);
    let conflict = post(br#"{"type": "T", "data": 4}"#, &["edgebus-expected-version: no_stream"]);
    assert_eq!(conflict.status, 409, "{conflict:?}");
    // Over gRPC: one event.
    stdout(&edgebus(&["publish", "--server", &server, "s.two", "n=5"]));
    // One read over each transport.
    assert_eq!(http_request(node.http, "GET", "/v1/streams/s.one", &[], b"").status, 200);
    stdout(&edgebus(&["read", "--server", &server, "s.two"]));

    let metrics = http_request(node.http, "GET", "/metrics", &[], b"");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let content_type = metrics.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = &metrics.body;
    assert!(text.contains("# TYPE edgebus_appends_total counter"), "{text}");
    assert_eq!(sample(text, r#"edgebus_appends_total{outcome="ok"}"#), Some(3.0), "{text}");
    assert_eq!(sample(text, r#"edgebus_appends_total{outcome="wrong_expected_version"}"#), Some(1.0), "{text}");
    assert_eq!(sample(text, r#"edgebus_append_events_total{outcome="ok"}"#), Some(4.0), "{text}");
    assert!(sample(text, r#"edgebus_append_bytes_total{outcome="ok"}"#) > Some(0.0), "{text}");
    // Every store call is timed, the refused one too.
    assert!(text.contains("# TYPE edgebus_append_duration_seconds histogram"), "{text}");
    assert_eq!(sample(text, "edgebus_append_duration_seconds_count"), Some(4.0), "{text}");
    assert_eq!(sample(text, r#"edgebus_append_duration_seconds_bucket{le="+Inf"}"#), Some(4.0), "{text}");
    assert!(sample(text, "edgebus_append_duration_seconds_sum") > Some(0.0), "{text}");
    assert_eq!(sample(text, "edgebus_reads_total"), Some(2.0), "{text}");
    assert_eq!(sample(text, "edgebus_read_events_total"), Some(4.0), "{text}");
    assert_eq!(sample(text, "edgebus_log_records_total"), Some(4.0), "{text}");
    assert_eq!(sample(text, "edgebus_log_end_position"), Some(4.0), "{text}");
    assert_eq!(sample(text, "edgebus_local_queue"), Some(0.0), "{text}");
    assert_eq!(sample(text, r#"edgebus_backpressure{state="healthy"}"#), Some(1.0), "{text}");

    let stats = json_body(&http_request(node.http, "GET", "/v1/stats", &[], b""));
    assert_eq!(stats["local_queue"], 0, "{stats}");
    assert_eq!(stats["wan_queue"], 0, "{stats}");
    assert_eq!(stats["dropped"], 0, "{stats}");
    assert_eq!(stats["backpressure"], "healthy", "{stats}");
    assert_eq!(stats["subscriptions"], 0, "{stats}");
    assert_eq!(stats["appends"], 3, "{stats}");
    assert_eq!(stats["records"], 4, "{stats}");
    assert_eq!(stats["end_position"], 4, "{stats}");
    assert!(stats["uptime_s"].is_u64(), "{stats}");
    let p99 = stats["append_latency_ms_p99"].as_f64().expect("a latency");
    assert!(p99 > 0.0 && p99 >= stats["append_latency_ms_p50"].as_f64().unwrap(), "{stats}");

    // The CLI: the summary line first, then the figures.
    let human = stdout(&edgebus(&["stats", "--server", &server]));
    let mut lines = human.lines();
    assert_eq!(lines.next(), Some("local_queue=0 wan_queue=0 dropped=0 backpressure=healthy"), "{human}");
    assert!(human.lines().any(|line| line.starts_with("positions") && line.ends_with("start=0 end=4")), "{human}");
    assert!(human.contains("append latency"), "{human}");

    // `--json` over gRPC is the object of `/v1/stats`: the same fields, and
    // the same figures where nothing moved in between.
    let json: Value = serde_json::from_str(&stdout(&edgebus(&["stats", "--server", &server, "--json"]))).unwrap();
    let keys = |value: &Value| value.as_object().expect("an object").keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&json), keys(&stats));
    for field in ["local_queue", "backpressure", "appends", "records", "end_position", "append_latency_ms_p99"] {
        assert_eq!(json[field], stats[field], "{field}: {json} against {stats}");
    }

    // `-v` reads the HTTP API; a node without a gateway says it has none.
    let http = node.http.to_string();
    let verbose = stdout(&edgebus(&["stats", "-v", "--http", &http]));
    let mut lines = verbose.lines();
    assert_eq!(lines.next(), Some("local_queue=0 wan_queue=0 dropped=0 backpressure=healthy"), "{verbose}");
    assert_eq!(lines.next(), Some("gateway  none (the node runs no gateway)"), "{verbose}");
    let routes = edgebus(&["routes", "--http", &http]);
    let refusal = String::from_utf8_lossy(&routes.stderr);
    assert!(!routes.status.success() && refusal.contains("runs no gateway"), "{refusal}");

    node.stop();
}
