//! The node's HTTP side: `/healthz` (the process serves), `/readyz` (the
//! store is open: the server starts only after it is), and a JSON API over
//! the store for clients without gRPC:
//!
//! - `POST /v1/streams/{stream}` appends. The body is one event
//!   `{"type": "...", "data": <any JSON>, "metadata": <optional JSON>,
//!   "id": "<optional uuid>"}`, an array of them, or a wrapper
//!   `{"expected_version": "any|no_stream|stream_exists|N", "events": [...]}`.
//!   Without a wrapper the expected version comes from the
//!   `edgebus-expected-version` header (a wrapper's field wins if both are
//!   given); the default is `any`. `data` and `metadata` are stored as their
//!   compact JSON text (`metadata` absent or `null`: empty). An event without
//!   an `id` gets a fresh time-ordered (UUID version 7) one, which makes a retry of that
//!   request a new write, not an idempotent one: producers that retry send
//!   their own ids. The node stamps `timestamp_ms`. Answers `201` with
//!   `{"first_version", "first_position", "count", "already_written"}`.
//! - `GET /v1/streams/{stream}?from=start|end|N&count=N&direction=forward|backward`
//!   reads (defaults: `start`, [`READ_COUNT_DEFAULT`], `forward`). Each
//!   event's `data` and `metadata` are given as JSON if they parse as JSON,
//!   otherwise as a string holding their text with invalid UTF-8 replaced
//!   (lossy: binary payloads written over gRPC do not round-trip here);
//!   empty metadata is `null`.
//! - `GET /v1/stats`: the node's figures as one JSON object (the same as
//!   the gRPC `Stats` rpc and `edgebus stats --json`, from
//!   [`NodeStats::gather`]): `local_queue` (events accepted but not yet
//!   durable), `wan_queue` and `dropped` (0 without a gateway),
//!   `backpressure` (`healthy`; `throttled` when a write queue is above 80%
//!   of its capacity or a route moves at the pace of its credit; `stalled`
//!   when the store takes no writes or a route is stalled; see
//!   [`Backpressure`](crate::metrics::Backpressure)), `subscriptions`,
//!   `uptime_s`, the log's counters and positions, the queues one by one and
//!   append latency `append_latency_ms_p50`/`_p99`, the index's
//!   `index_tail` (changes not yet flushed), `index_tables`,
//!   `index_pinned_bytes` and `index_cache_bytes`; with a gateway,
//!   `gateway` (its site, every route and lane with its health, the inbound
//!   side, the policies).
//! - `GET /metrics`: Prometheus text format 0.0.4, every metric prefixed
//!   `edgebus_` (see [`crate::metrics`]).
//! - `GET /v1/subscribe?stream=|pattern=&type=&predicate=&from=`: a
//!   subscription as server-sent events (see the `sse` module).
//! - `/v1/groups...`: consumer group management (see [`groups`]).
//!
//! Every refusal is a status and a JSON body `{"code", "message"}` whose
//! `code` is the stable wire number of `edgebus.v1.ErrorCode` (the store's
//! codes, `100` for an invalid name, …); a version conflict adds `expected`
//! and `current`, `BUSY` adds `retry_after_ms` and a `Retry-After` header.
//! An append over an ingest quota (see [`crate::quota`]) is refused before
//! the store sees it with `429`, code `103` (`RESOURCE_EXHAUSTED`),
//! `retry_after_ms` and `Retry-After` (whole seconds, rounded up).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgebus_proto::convert::BUSY_RETRY_AFTER_MS;
use edgebus_proto::v1::ErrorCode as WireCode;
use edgebus_store::{Direction, ErrorCode, ReadError, Store, StreamFrom, WriteError};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use serde_json::{Value, json};

use crate::metrics::{NodeStats, Outcome, PROMETHEUS_CONTENT_TYPE};
use crate::quota::QuotaRefusal;
use crate::state::NodeState;

pub mod gateway;
pub mod gateway_process;
pub mod groups;
mod lease;
pub mod serve;
mod sse;

/// Largest request body the JSON API accepts: one maximal append (the log's
/// default append limit); JSON text of a batch is larger than its encoding,
/// so a batch near the store's limit may be refused here first.
pub const HTTP_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
const _: () = assert!(edgebus_types::limits::LOG_APPEND_BYTES_DEFAULT as usize <= HTTP_BODY_BYTES_MAX);

/// Events a read returns when the request does not say `count`.
pub const READ_COUNT_DEFAULT: usize = 100;

/// The header that carries an append's expected version.
pub const EXPECTED_VERSION_HEADER: &str = "edgebus-expected-version";

/// The HTTP routes over the node's `state`.
pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/v1/streams/{stream}", get(read_stream).post(append))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/v1/subscribe", get(sse::subscribe))
        .route("/v1/groups", get(groups::list).post(groups::create))
        .route("/v1/groups/{name}", get(groups::describe).patch(groups::update).delete(groups::delete))
        .route("/v1/groups/{name}/parked", get(groups::parked))
        .route("/v1/groups/{name}/replay-parked", post(groups::replay_parked))
        .merge(gateway::routes())
        .route("/v1/gateways", get(lease::list))
        .route("/v1/gateways/{name}/failover", post(lease::failover))
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(HTTP_BODY_BYTES_MAX))
        .with_state(state)
}

/// A path the node does not serve: JSON like every other refusal.
async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        WireCode::InvalidArgument as u32,
        format!(
            "no such route {}: the node serves /healthz, /readyz, /metrics, /v1/stats, /v1/streams/{{stream}}, /v1/subscribe and /v1/groups",
            uri.path()
        ),
    )
}

/// A served path asked with a method it does not take.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        WireCode::InvalidArgument as u32,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A refusal: status, stable code, message and extra JSON fields.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
    extra: serde_json::Map<String, Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), extra: serde_json::Map::new() }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, WireCode::InvalidArgument as u32, message)
    }

    fn invalid_name(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, WireCode::InvalidName as u32, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, WireCode::Unspecified as u32, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        body.insert("code".to_owned(), json!(self.code));
        body.insert("message".to_owned(), json!(self.message));
        // Every refusal that advises a wait (`BUSY`, a quota) says it in
        // whole seconds too, rounded up.
        let retry_after_ms = body.get("retry_after_ms").and_then(Value::as_u64);
        let mut response = json_response(self.status, &Value::Object(body));
        if let Some(retry_after_ms) = retry_after_ms {
            let seconds = retry_after_ms.div_ceil(1000).max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let text = serde_json::to_vec(body).expect("a JSON value serializes");
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], text).into_response()
}

/// The HTTP status for a stable code, mirroring the gRPC mapping in
/// `edgebus_proto::convert::grpc_code`.
fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::WrongExpectedVersion
        | ErrorCode::StreamDeleted
        | ErrorCode::DuplicateEventId
        | ErrorCode::IdempotencyConflict
        | ErrorCode::Gap => StatusCode::CONFLICT,
        ErrorCode::StreamNotFound | ErrorCode::SnapshotNotFound => StatusCode::NOT_FOUND,
        ErrorCode::EventTooLarge | ErrorCode::BatchTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::ReservedStream | ErrorCode::EmptyAppend | ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorCode::PositionRemoved => StatusCode::GONE,
        ErrorCode::Unavailable | ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Corrupt | ErrorCode::IndexFailure => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn wire(code: ErrorCode) -> u32 {
    edgebus_proto::convert::wire_error_code(code)
}

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> Self {
        let mut out = Self::new(http_status(error.code()), wire(error.code()), error.to_string());
        match &error {
            WriteError::WrongExpectedVersion { stream, source } => {
                out.extra.insert("stream".to_owned(), json!(stream.as_str()));
                out.extra.insert("expected".to_owned(), json!(source.expected.to_string()));
                out.extra.insert("current".to_owned(), json!(source.current));
            }
            WriteError::Busy => {
                out.extra.insert("retry_after_ms".to_owned(), json!(BUSY_RETRY_AFTER_MS));
            }
            _ => {}
        }
        out
    }
}

/// An ingest quota's refusal: `429 Too Many Requests`, code 103, with
/// `retry_after_ms` (and `Retry-After`).
impl From<QuotaRefusal> for ApiError {
    fn from(refusal: QuotaRefusal) -> Self {
        let mut out = Self::new(StatusCode::TOO_MANY_REQUESTS, WireCode::ResourceExhausted as u32, refusal.to_string());
        out.extra.insert("stream".to_owned(), json!(refusal.stream));
        out.extra.insert("retry_after_ms".to_owned(), json!(refusal.retry_after_ms));
        out
    }
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> Self {
        // As over gRPC: a tombstoned stream is not found to a reader, and a
        // log read that failed on I/O is unavailable rather than corrupt.
        let status = match &error {
            ReadError::StreamDeleted { .. } => StatusCode::NOT_FOUND,
            ReadError::Log(edgebus_log::ReadError::Io(_)) => StatusCode::SERVICE_UNAVAILABLE,
            _ => http_status(error.code()),
        };
        Self::new(status, wire(error.code()), error.to_string())
    }
}

/// The stream named by the path; a path that does not decode is refused as
/// an invalid name, in JSON like every other refusal.
fn stream_name(path: Result<Path<String>, PathRejection>) -> Result<StreamName, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::invalid_name(format!("stream name: {e}")))?;
    StreamName::new(&raw).map_err(|e| ApiError::invalid_name(e.to_string()))
}

/// Runs a blocking store call on the blocking pool.
async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    store: &Arc<Store>,
    call: impl FnOnce(&Store) -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || call(&store)).await {
        Ok(result) => result.map_err(Into::into),
        Err(join) => Err(ApiError::internal(format!("store call failed: {join}"))),
    }
}

/// One event of a request body, checked and stamped.
fn new_event(value: Value, index: usize, timestamp_ms: u64) -> Result<NewEvent, ApiError> {
    let Value::Object(mut fields) = value else {
        return Err(ApiError::invalid(format!("events[{index}]: an event is a JSON object")));
    };
    let event_type = match fields.remove("type") {
        Some(Value::String(text)) => {
            EventType::new(&text).map_err(|e| ApiError::invalid_name(format!("events[{index}].type: {e}")))?
        }
        Some(_) => return Err(ApiError::invalid(format!("events[{index}].type: a string is required"))),
        None => return Err(ApiError::invalid(format!("events[{index}].type is missing"))),
    };
    let data = match fields.remove("data") {
        Some(value) => serde_json::to_vec(&value).expect("a JSON value serializes"),
        None => return Err(ApiError::invalid(format!("events[{index}].data is missing"))),
    };
    let metadata = match fields.remove("metadata") {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => serde_json::to_vec(&value).expect("a JSON value serializes"),
    };
    let id = match fields.remove("id") {
        None | Some(Value::Null) => EventId::generate(),
        Some(Value::String(text)) => text.parse().map_err(|e| ApiError::invalid(format!("events[{index}].id: {e}")))?,
        Some(_) => return Err(ApiError::invalid(format!("events[{index}].id: a UUID string is required"))),
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(ApiError::invalid(format!("events[{index}]: unknown field {unknown:?}")));
    }
    Ok(NewEvent { id, event_type, data, metadata, timestamp_ms })
}

fn parse_expected(text: &str, source: &str) -> Result<ExpectedVersion, ApiError> {
    text.parse().map_err(|e| ApiError::invalid(format!("{source}: {e}")))
}

/// The expected version and the events of an append body.
fn append_body(headers: &HeaderMap, body: &[u8]) -> Result<(ExpectedVersion, Vec<Value>), ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    let mut expected = match headers.get(EXPECTED_VERSION_HEADER) {
        None => ExpectedVersion::Any,
        Some(header) => {
            let text =
                header.to_str().map_err(|_| ApiError::invalid(format!("{EXPECTED_VERSION_HEADER}: not ASCII text")))?;
            parse_expected(text, EXPECTED_VERSION_HEADER)?
        }
    };
    let events = match value {
        Value::Array(events) => events,
        Value::Object(mut wrapper) if wrapper.contains_key("events") || wrapper.contains_key("expected_version") => {
            match wrapper.remove("expected_version") {
                None | Some(Value::Null) => {}
                Some(Value::String(text)) => expected = parse_expected(&text, "expected_version")?,
                Some(Value::Number(number)) => expected = parse_expected(&number.to_string(), "expected_version")?,
                Some(_) => return Err(ApiError::invalid("expected_version: a string or a number is required")),
            }
            if let Some(unknown) = wrapper.keys().find(|key| *key != "events") {
                return Err(ApiError::invalid(format!("unknown field {unknown:?}")));
            }
            match wrapper.remove("events") {
                Some(Value::Array(events)) => events,
                _ => return Err(ApiError::invalid("events: an array is required")),
            }
        }
        event @ Value::Object(_) => vec![event],
        _ => return Err(ApiError::invalid("the body is an event, an array of events or {\"events\": [...]}")),
    };
    Ok((expected, events))
}

/// Appends, counting the request in the metrics whatever its outcome.
async fn append(
    State(state): State<Arc<NodeState>>,
    stream: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Events and payload bytes as far as the body was read.
    let mut carried = (0, 0);
    let result = append_counted(&state, stream, &headers, body, &mut carried).await;
    let outcome = result.as_ref().map_or_else(|error| Outcome::Refused(error.code), |_| Outcome::Ok);
    state.metrics.record_append(outcome, carried.0, carried.1);
    result
}

async fn append_counted(
    state: &NodeState,
    stream: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    carried: &mut (u64, u64),
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            wire(ErrorCode::BatchTooLarge)
        } else {
            WireCode::InvalidArgument as u32
        };
        ApiError::new(status, code, format!("cannot read the body: {rejection}"))
    })?;
    let stream = stream_name(stream)?;
    let (expected, values) = append_body(headers, &body)?;
    carried.0 = values.len() as u64;
    let timestamp_ms = crate::grpc::now_ms();
    let events = values
        .into_iter()
        .enumerate()
        .map(|(index, value)| new_event(value, index, timestamp_ms))
        .collect::<Result<Vec<_>, _>>()?;
    carried.1 = events.iter().map(|event| (event.data.len() + event.metadata.len()) as u64).sum();
    if let Err(refusal) = state.quotas.admit(&stream, carried.0, carried.1) {
        // Answered after its hold (see `crate::quota`), without the events.
        drop(events);
        tokio::time::sleep(refusal.hold).await;
        return Err(refusal.into());
    }
    let started = Instant::now();
    let result = state.store.append_async(&stream, expected, events).await.map_err(ApiError::from);
    state.metrics.record_append_latency(started.elapsed());
    let result = result?;
    let body = json!({
        "first_version": result.first_version,
        "first_position": result.first_position,
        "count": result.count,
        "already_written": result.already_written,
    });
    Ok(json_response(StatusCode::CREATED, &body))
}

/// The `from`, `count` and `direction` of a read's query string.
fn read_query(query: Option<&str>) -> Result<(StreamFrom, usize, Direction), ApiError> {
    let mut from = StreamFrom::Start;
    let mut count = READ_COUNT_DEFAULT;
    let mut direction = Direction::Forward;
    for pair in query.unwrap_or("").split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "from" => {
                from = match value {
                    "start" => StreamFrom::Start,
                    "end" => StreamFrom::End,
                    number => StreamFrom::Version(number.parse().map_err(|_| {
                        ApiError::invalid(format!("from: {number:?} is not start, end or a version number"))
                    })?),
                };
            }
            "count" => {
                count = value
                    .parse()
                    .map_err(|_| ApiError::invalid(format!("count: {value:?} is not a non-negative number")))?;
            }
            "direction" => {
                direction = match value {
                    "forward" => Direction::Forward,
                    "backward" => Direction::Backward,
                    other => {
                        return Err(ApiError::invalid(format!("direction: {other:?} is not forward or backward")));
                    }
                };
            }
            other => return Err(ApiError::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok((from, count, direction))
}

async fn read_stream(
    State(state): State<Arc<NodeState>>,
    stream: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let stream = stream_name(stream)?;
    let (from, count, direction) = read_query(query.as_deref())?;
    let now = crate::grpc::now_ms();
    let events = blocking(&state.store, move |store| store.read_stream(&stream, from, direction, count, now)).await;
    state.metrics.record_read(events.as_ref().ok().map(|events| events.len() as u64));
    let events = events?;
    let events: Vec<Value> = events.iter().map(edgebus_proto::json::event_value).collect();
    Ok(json_response(StatusCode::OK, &json!({ "events": events })))
}

/// The node's figures as JSON; gathering takes the log's and the store's
/// queue locks, so it runs off the async workers.
async fn stats(State(state): State<Arc<NodeState>>) -> Result<Response, ApiError> {
    let gateway = state.gateway.get().cloned();
    let stats = tokio::task::spawn_blocking(move || NodeStats::gather(&state))
        .await
        .map_err(|join| ApiError::internal(format!("gathering the stats failed: {join}")))?;
    let mut json = stats.to_json();
    if let (Some(gateway), Some(object)) = (gateway, json.as_object_mut()) {
        object.insert("gateway".into(), gateway.stats_json());
    }
    Ok(json_response(StatusCode::OK, &json))
}

/// Every metric in Prometheus text format 0.0.4.
async fn metrics(State(state): State<Arc<NodeState>>) -> Result<Response, ApiError> {
    let rendering = Arc::clone(&state);
    let mut text = tokio::task::spawn_blocking(move || rendering.metrics.render(&rendering))
        .await
        .map_err(|join| ApiError::internal(format!("rendering the metrics failed: {join}")))?;
    state.groups.render_metrics(&mut text).await;
    if let Some(gateway) = state.gateway.get() {
        gateway.render_metrics(&mut text);
    }
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE))], text).into_response())
}

#[cfg(test)]
mod tests {
    use edgebus_types::WrongExpectedVersion;

    use super::*;

    #[test]
    fn busy_is_503_with_retry_after_and_the_busy_code() {
        let response = ApiError::from(WriteError::Busy).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
        let error = ApiError::from(WriteError::Busy);
        assert_eq!(error.code, 13);
        assert_eq!(error.extra.get("retry_after_ms"), Some(&json!(BUSY_RETRY_AFTER_MS)));
    }

    #[test]
    fn a_quota_refusal_is_429_with_retry_after_rounded_up_and_code_103() {
        let refusal = QuotaRefusal {
            stream: "telemetry.t1".to_owned(),
            pattern: "telemetry.>".to_owned(),
            rate: "1000 events/s".to_owned(),
            wait_ms: 1300,
            hold: std::time::Duration::from_millis(100),
            retry_after_ms: 1200,
        };
        let error = ApiError::from(refusal.clone());
        assert_eq!((error.status, error.code), (StatusCode::TOO_MANY_REQUESTS, 103));
        assert_eq!(error.message, "ingest quota for telemetry.> exceeded (1000 events/s); retry after 1200 ms");
        assert_eq!(error.extra.get("retry_after_ms"), Some(&json!(1200)));
        let response = ApiError::from(refusal).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("2"));
        // Refusals without a delay say nothing of retrying.
        let response = ApiError::invalid("no").into_response();
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn a_conflict_is_409_with_the_versions() {
        let stream = StreamName::new("a.b").unwrap();
        let source = WrongExpectedVersion { expected: ExpectedVersion::Exact(3), current: None };
        let error = ApiError::from(WriteError::WrongExpectedVersion { stream, source });
        assert_eq!((error.status, error.code), (StatusCode::CONFLICT, 1));
        assert_eq!(error.extra.get("expected"), Some(&json!("3")));
        assert_eq!(error.extra.get("current"), Some(&Value::Null));
    }

    #[test]
    fn read_errors_mirror_the_grpc_mapping() {
        let stream = StreamName::new("a.b").unwrap();
        let missing = ApiError::from(ReadError::StreamNotFound { stream: stream.clone() });
        assert_eq!((missing.status, missing.code), (StatusCode::NOT_FOUND, 3));
        let deleted = ApiError::from(ReadError::StreamDeleted { stream });
        assert_eq!((deleted.status, deleted.code), (StatusCode::NOT_FOUND, 2));
    }

    #[test]
    fn bodies_take_one_event_an_array_or_a_wrapper() {
        let headers = HeaderMap::new();
        let (expected, events) = append_body(&headers, br#"{"type": "T", "data": 1}"#).unwrap();
        assert_eq!((expected, events.len()), (ExpectedVersion::Any, 1));
        let (_, events) = append_body(&headers, br#"[{"type": "T", "data": 1}, {"type": "T", "data": 2}]"#).unwrap();
        assert_eq!(events.len(), 2);
        let (expected, events) = append_body(&headers, br#"{"expected_version": 7, "events": []}"#).unwrap();
        assert_eq!((expected, events.len()), (ExpectedVersion::Exact(7), 0));
        let mut with_header = HeaderMap::new();
        with_header.insert(EXPECTED_VERSION_HEADER, HeaderValue::from_static("stream_exists"));
        let (expected, _) = append_body(&with_header, br#"{"type": "T", "data": 1}"#).unwrap();
        assert_eq!(expected, ExpectedVersion::StreamExists);
        let (expected, _) = append_body(&with_header, br#"{"expected_version": "no_stream", "events": []}"#).unwrap();
        assert_eq!(expected, ExpectedVersion::NoStream, "the wrapper's field wins");
        assert_eq!(append_body(&headers, b"{").unwrap_err().code, 14);
        assert_eq!(append_body(&headers, b"3").unwrap_err().code, 14);
    }

    #[test]
    fn events_are_checked_and_get_v7_ids() {
        let event = new_event(json!({"type": "T", "data": {"a": 1}}), 0, 5).unwrap();
        assert_eq!((event.data.as_slice(), event.metadata.len(), event.timestamp_ms), (br#"{"a":1}"#.as_slice(), 0, 5));
        let bytes = event.id.as_bytes();
        assert_eq!((bytes[6] >> 4, bytes[8] >> 6), (7, 0b10), "a version 7, RFC 9562 variant id");
        assert_eq!(new_event(json!({"type": "bad type", "data": 1}), 0, 0).unwrap_err().code, 100);
        assert_eq!(new_event(json!({"type": "T"}), 0, 0).unwrap_err().code, 14);
        assert_eq!(new_event(json!({"type": "T", "data": 1, "extra": 1}), 0, 0).unwrap_err().code, 14);
        assert_eq!(new_event(json!({"type": "T", "data": 1, "id": "nope"}), 0, 0).unwrap_err().code, 14);
    }

    #[test]
    fn payloads_read_back_as_json_or_lossy_text() {}
}
