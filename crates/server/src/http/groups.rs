//! Consumer group management over HTTP (consuming is gRPC's `Consume`):
//!
//! - `GET /v1/groups`: every group, `{"groups": [GROUP, ...]}`.
//! - `POST /v1/groups`: creates one from
//!   `{"name", "filter": {"stream"|"stream_pattern", "event_types", "predicate"},
//!   "settings": {"max_in_flight", "message_timeout_ms", "max_retries",
//!   "strategy": "round_robin"|"by_stream", "checkpoint_after",
//!   "checkpoint_interval_ms"}, "start": "beginning"|"end"|{"position": N}}`;
//!   `201` with the GROUP.
//! - `GET /v1/groups/{name}`: one GROUP.
//! - `PATCH /v1/groups/{name}`: changes `filter` and `settings` (the
//!   fields given); the GROUP.
//! - `DELETE /v1/groups/{name}`: `204`.
//! - `GET /v1/groups/{name}/parked?offset=N&limit=N`: `{"total", "events":
//!   [{"event", "reason", "attempts", "consumer", "parked_at_ms"}]}`.
//! - `POST /v1/groups/{name}/replay-parked`: `{"replaying": N}`.
//!
//! A GROUP is the JSON of `edgebus.v1.GroupInfo` (see [`group_json`]).
//! Refusals are as everywhere on the HTTP side: `{"code", "message",
//! "field"?}` with the stable code.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use edgebus_proto::v1;
use serde_json::{Value, json};

use super::{ApiError, json_response};
use crate::group::def::{FilterDef, GroupRequest, Strategy};
use crate::state::NodeState;

/// The HTTP status of a refused group request.
fn refusal(detail: Box<v1::ErrorDetail>) -> ApiError {
    let status = match detail.error_code() {
        v1::ErrorCode::GroupNotFound => StatusCode::NOT_FOUND,
        v1::ErrorCode::GroupExists | v1::ErrorCode::ConsumerExists => StatusCode::CONFLICT,
        v1::ErrorCode::InvalidFilter | v1::ErrorCode::InvalidArgument | v1::ErrorCode::InvalidName => {
            StatusCode::BAD_REQUEST
        }
        v1::ErrorCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        v1::ErrorCode::Unavailable | v1::ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let v1::ErrorDetail { code, message, field, .. } = *detail;
    let mut error = ApiError::new(status, code, message);
    if !field.is_empty() {
        error.extra.insert("field".to_owned(), json!(field));
    }
    error
}

fn strategy_name(strategy: i32) -> &'static str {
    match v1::GroupStrategy::try_from(strategy) {
        Ok(v1::GroupStrategy::ByStream) => Strategy::ByStream.as_str(),
        _ => Strategy::RoundRobin.as_str(),
    }
}

/// A group's figures as JSON.
pub fn group_json(info: &v1::GroupInfo) -> Value {
    let settings = info.settings.unwrap_or_default();
    let filter = FilterDef::from_wire(info.filter.clone());
    json!({
        "name": info.name,
        "filter": filter,
        "settings": {
            "max_in_flight": settings.max_in_flight,
            "message_timeout_ms": settings.message_timeout_ms,
            "max_retries": settings.max_retries,
            "strategy": strategy_name(settings.strategy),
            "checkpoint_after": settings.checkpoint_after,
            "checkpoint_interval_ms": settings.checkpoint_interval_ms,
        },
        "start_position": info.start_position,
        "checkpoint": info.checkpoint,
        "read_position": info.read_position,
        "pending": info.pending,
        "in_flight": info.in_flight,
        "parked": info.parked,
        "delivered": info.delivered,
        "acked": info.acked,
        "retried": info.retried,
        "skipped": info.skipped,
        "lag": info.lag,
        "consumers": info.consumers.iter().map(|c| json!({
            "name": c.name,
            "max_in_flight": c.max_in_flight,
            "in_flight": c.in_flight,
            "delivered": c.delivered,
            "acked": c.acked,
            "nacked": c.nacked,
        })).collect::<Vec<_>>(),
    })
}

fn name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(name)| name).map_err(|e| ApiError::invalid(format!("bad group name in the path: {e}")))
}

fn request(body: &[u8]) -> Result<GroupRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the body is not a group request: {e}")))
}

pub(super) async fn list(State(state): State<Arc<NodeState>>) -> Response {
    let groups: Vec<Value> = state.groups.list().await.iter().map(group_json).collect();
    json_response(StatusCode::OK, &json!({ "groups": groups }))
}

pub(super) async fn create(State(state): State<Arc<NodeState>>, body: Bytes) -> Result<Response, ApiError> {
    let request = request(&body)?;
    let info = state.groups.create(&state, request).await.map_err(refusal)?;
    Ok(json_response(StatusCode::CREATED, &group_json(&info)))
}

pub(super) async fn describe(
    State(state): State<Arc<NodeState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let info = state.groups.describe(&name(path)?).await.map_err(refusal)?;
    Ok(json_response(StatusCode::OK, &group_json(&info)))
}

pub(super) async fn update(
    State(state): State<Arc<NodeState>>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = name(path)?;
    let request = request(&body)?;
    if !request.name.is_empty() && request.name != name {
        return Err(ApiError::invalid(format!("a group cannot be renamed ({name} to {})", request.name)));
    }
    let info = state.groups.update(&state, &name, request).await.map_err(refusal)?;
    Ok(json_response(StatusCode::OK, &group_json(&info)))
}

pub(super) async fn delete(
    State(state): State<Arc<NodeState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    state.groups.delete(&state, &name(path)?).await.map_err(refusal)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn parked(
    State(state): State<Arc<NodeState>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let name = name(path)?;
    let (mut offset, mut limit) = (0u64, 0u32);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "offset" => {
                offset = value.parse().map_err(|_| ApiError::invalid(format!("offset {value:?} is not a count")))?;
            }
            "limit" => {
                limit = value.parse().map_err(|_| ApiError::invalid(format!("limit {value:?} is not a count")))?;
            }
            other => return Err(ApiError::invalid(format!("unknown query parameter {other:?}: use offset and limit"))),
        }
    }
    let (events, total) = state.groups.list_parked(&state, &name, offset, limit).await.map_err(refusal)?;
    let events: Vec<Value> = events
        .iter()
        .map(|p| {
            let event = p
                .event
                .clone()
                .and_then(|e| edgebus_types::RecordedEvent::try_from(e).ok())
                .map(|e| edgebus_proto::json::event_value(&e));
            json!({
                "event": event,
                "reason": p.reason,
                "attempts": p.attempts,
                "consumer": p.consumer,
                "parked_at_ms": p.parked_at_ms,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "total": total, "events": events })))
}

pub(super) async fn replay_parked(
    State(state): State<Arc<NodeState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let replaying = state.groups.replay_parked(&state, &name(path)?).await.map_err(refusal)?;
    Ok(json_response(StatusCode::OK, &json!({ "replaying": replaying })))
}
