//! `GET /v1/subscribe`: a subscription as server-sent events, for browsers
//! and `curl -N`.
//!
//! Query parameters (all optional, percent-encoded):
//!
//! - `stream=NAME` or `pattern=PATTERN` (not both): which streams; neither:
//!   every stream;
//! - `type=T` (repeatable, or comma-separated): only these event types;
//! - `predicate=CEL`: a CEL expression over the event with `data` parsed as
//!   JSON, e.g. `data.temp > 70`;
//! - `include_system=true`: also `$` system streams;
//! - `from=start|end|N`: the first event, only new events (the default), or
//!   log position `N`; `version=N` instead starts at version `N` of `stream`.
//!   A `Last-Event-ID` header (sent by browsers when they reconnect) resumes
//!   after that position and wins over `from`.
//!
//! Each event is an SSE message `event: event` with `id:` its log position
//! and `data:` its JSON (as `GET /v1/streams/{stream}` renders it);
//! `event: caught_up` and `event: checkpoint` carry `{"position": N}`; a
//! failure is a last `event: error` with `{"code", "message"}`. A comment
//! line every 15 s keeps idle connections open through proxies.
//!
//! Flow control is the connection's: the subscription fills a small outbox
//! that the response body drains as the socket takes it, so a slow reader
//! slows its own subscription (which then reads the log) and holds no more
//! memory than the outbox.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use edgebus_proto::convert::{ServerMessage, StreamSelector, SubscribeFrom, SubscribeStart, SubscriptionFilter};
use edgebus_proto::v1;
use edgebus_types::limits::FILTER_PREDICATE_BYTES_MAX;
use edgebus_types::{EventType, StreamName, StreamPattern};
use serde_json::json;
use tokio_stream::StreamExt as _;

use super::ApiError;
use crate::state::NodeState;
use crate::subscription::{self, Credit, Opened};

/// Interval of the keep-alive comment lines.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The subscription a query string asks for.
pub(super) fn parse_start(query: Option<&str>, last_event_id: Option<&str>) -> Result<SubscribeStart, ApiError> {
    let mut stream = None;
    let mut pattern = None;
    let mut event_types = Vec::new();
    let mut predicate = None;
    let mut include_system = false;
    let mut from = SubscribeFrom::End;
    let mut version = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "stream" => {
                stream = Some(StreamName::new(&value).map_err(|e| ApiError::invalid_name(format!("stream: {e}")))?);
            }
            "pattern" => {
                pattern =
                    Some(StreamPattern::new(&value).map_err(|e| ApiError::invalid_name(format!("pattern: {e}")))?);
            }
            "type" => {
                for name in value.split(',').filter(|name| !name.is_empty()) {
                    event_types.push(EventType::new(name).map_err(|e| ApiError::invalid_name(format!("type: {e}")))?);
                }
            }
            "predicate" => {
                if value.len() > FILTER_PREDICATE_BYTES_MAX {
                    return Err(ApiError::invalid(format!(
                        "predicate: {} bytes, more than the maximum of {FILTER_PREDICATE_BYTES_MAX}",
                        value.len()
                    )));
                }
                predicate = Some(value.into_owned());
            }
            "include_system" => {
                include_system = match &*value {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    other => return Err(ApiError::invalid(format!("include_system: {other:?} is not true or false"))),
                };
            }
            "from" => {
                from = match &*value {
                    "start" => SubscribeFrom::Beginning,
                    "end" => SubscribeFrom::End,
                    number => SubscribeFrom::Position(number.parse().map_err(|_| {
                        ApiError::invalid(format!("from: {number:?} is not start, end or a log position"))
                    })?),
                };
            }
            "version" => {
                version =
                    Some(value.parse().map_err(|_| ApiError::invalid(format!("version: {value:?} is not a version")))?);
            }
            other => return Err(ApiError::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    let streams = match (stream, pattern) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("give stream or pattern, not both")),
        (Some(name), None) => StreamSelector::Stream(name),
        (None, Some(pattern)) => StreamSelector::Pattern(pattern),
        (None, None) => StreamSelector::All,
    };
    if let Some(version) = version {
        if !matches!(streams, StreamSelector::Stream(_)) {
            return Err(ApiError::invalid("version: starting at a version needs one stream (stream=NAME)"));
        }
        from = SubscribeFrom::StreamVersion(version);
    }
    if let Some(id) = last_event_id {
        let position: u64 =
            id.trim().parse().map_err(|_| ApiError::invalid(format!("Last-Event-ID: {id:?} is not a log position")))?;
        from = SubscribeFrom::Position(position.saturating_add(1));
    }
    let filter = SubscriptionFilter { streams, event_types, predicate, include_system };
    Ok(SubscribeStart { filter, from, initial_grant_events: 0 })
}

/// The HTTP status of a refused subscription.
fn refusal(detail: v1::ErrorDetail) -> ApiError {
    let status = match detail.error_code() {
        v1::ErrorCode::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        v1::ErrorCode::InvalidFilter | v1::ErrorCode::InvalidArgument | v1::ErrorCode::InvalidName => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut error = ApiError::new(status, detail.code, detail.message);
    if !detail.field.is_empty() {
        error.extra.insert("field".to_owned(), json!(detail.field));
    }
    if let Some(retry_after_ms) = detail.retry_after_ms {
        error.extra.insert("retry_after_ms".to_owned(), json!(retry_after_ms));
    }
    error
}

/// One subscription message as an SSE event.
fn sse_event(message: ServerMessage) -> Event {
    match message {
        ServerMessage::Event(event) => Event::default()
            .event("event")
            .id(event.position.to_string())
            .data(edgebus_proto::json::event_value(&event).to_string()),
        ServerMessage::CaughtUp { position } => {
            Event::default().event("caught_up").data(json!({ "position": position }).to_string())
        }
        ServerMessage::Checkpoint { position } => {
            Event::default().event("checkpoint").data(json!({ "position": position }).to_string())
        }
        ServerMessage::Error(detail) => {
            Event::default().event("error").data(json!({ "code": detail.code, "message": detail.message }).to_string())
        }
    }
}

/// The route's handler.
pub(super) async fn subscribe(
    State(state): State<Arc<NodeState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().map_err(|_| ApiError::invalid("Last-Event-ID is not text"))?),
        None => None,
    };
    let start = parse_start(query.as_deref(), last_event_id)?;
    let Opened { messages, abort, .. } =
        subscription::open(&state, start, Credit::unlimited()).await.map_err(|detail| refusal(*detail))?;
    // Nothing aborts an SSE subscription from the client side but leaving.
    drop(abort);
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(messages).map(|message| Ok::<_, Infallible>(sse_event(message)));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_name_what_is_wrong() {
        let start = parse_start(Some("pattern=sensor.%3E&type=reading,alarm&predicate=data.temp%20%3E%2070"), None)
            .expect("a valid query");
        assert_eq!(start.filter.streams, StreamSelector::Pattern(StreamPattern::new("sensor.>").unwrap()));
        assert_eq!(start.filter.event_types.len(), 2);
        assert_eq!(start.filter.predicate.as_deref(), Some("data.temp > 70"));
        assert_eq!(start.from, SubscribeFrom::End);

        let start = parse_start(Some("stream=a&version=3"), None).unwrap();
        assert_eq!(start.from, SubscribeFrom::StreamVersion(3));
        let start = parse_start(Some("from=start"), Some("41")).unwrap();
        assert_eq!(start.from, SubscribeFrom::Position(42), "Last-Event-ID resumes after it");

        for (query, needle) in [
            ("stream=a&pattern=b.*", "not both"),
            ("version=3", "needs one stream"),
            ("from=soon", "from"),
            ("stream=a%20b", "stream"),
            ("colour=red", "unknown query parameter"),
            ("include_system=maybe", "include_system"),
        ] {
            let error = parse_start(Some(query), None).expect_err(query);
            assert!(error.message.contains(needle), "{query}: {}", error.message);
        }
    }
}
