//! Routes and policies over HTTP (the `edgebus routes` and `edgebus policy`
//! commands use these):
//!
//! - `GET /v1/routes`: `{"site", "routes": [ROUTE, ...]}` with every lane's
//!   cursors, backlog, in-flight, credit and stall.
//! - `POST /v1/routes`: adds or replaces a route from a route definition
//!   (`{"name"?, "remote_site", "addresses", "topics"?, "lanes"?: [{"name",
//!   "reserved_permille"?, "cap_events"?, "cap_bytes"?}], "window_*"?}`);
//!   `201` with `{"route": NAME}`.
//! - `DELETE /v1/routes/{name}`: `204`.
//! - `GET /v1/policies`: `{"policies": [{"pattern", "action", "lane"?,
//!   "destinations"?}]}` in order (the first match decides).
//! - `POST /v1/policies`: sets the policy of its pattern; `201`.
//! - `DELETE /v1/policies?pattern=P`: `204`.
//!
//! A node started without `--gateway` answers `404` with a message saying so.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use edgebus_gateway::def::{PolicyDef, RouteDef};
use edgebus_gateway::{AdminError, Gateway};
use edgebus_proto::v1::ErrorCode as WireCode;
use serde_json::json;

use super::{ApiError, json_response};
use crate::state::NodeState;

fn gateway(state: &NodeState) -> Result<Arc<Gateway>, ApiError> {
    state.gateway.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            WireCode::InvalidArgument as u32,
            "this node runs no gateway: start it with --gateway (and --site NAME) to have routes and policies",
        )
    })
}

fn refusal(error: AdminError) -> ApiError {
    match error {
        AdminError::Invalid(e) => {
            let mut refusal = ApiError::invalid(e.to_string());
            refusal.extra.insert("field".into(), json!(e.field));
            refusal
        }
        AdminError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, WireCode::InvalidArgument as u32, m),
        AdminError::TooMany(m) => ApiError::new(StatusCode::CONFLICT, WireCode::ResourceExhausted as u32, m),
        AdminError::Store(m) => ApiError::internal(m),
        AdminError::Standby(m) => ApiError::new(StatusCode::CONFLICT, WireCode::Unavailable as u32, m),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the body is not a valid {what}: {e}")))
}

pub(super) async fn list_routes(State(state): State<Arc<NodeState>>) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    Ok(json_response(StatusCode::OK, &json!({ "site": gateway.site().as_str(), "routes": gateway.routes_json() })))
}

pub(super) async fn set_route(State(state): State<Arc<NodeState>>, body: Bytes) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    let def: RouteDef = parse(&body, "route definition")?;
    let route = gateway.set_route(def).await.map_err(refusal)?;
    Ok(json_response(StatusCode::CREATED, &json!({ "route": route.name })))
}

pub(super) async fn remove_route(
    State(state): State<Arc<NodeState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    gateway.remove_route(&name).await.map_err(refusal)?;
    Ok(StatusCode::NO_CONTENT.into_response_body())
}

pub(super) async fn list_policies(State(state): State<Arc<NodeState>>) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    Ok(json_response(StatusCode::OK, &json!({ "policies": gateway.policies() })))
}

pub(super) async fn set_policy(State(state): State<Arc<NodeState>>, body: Bytes) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    let def: PolicyDef = parse(&body, "policy definition")?;
    let pattern = def.pattern.clone();
    gateway.set_policy(def).await.map_err(refusal)?;
    Ok(json_response(StatusCode::CREATED, &json!({ "pattern": pattern })))
}

pub(super) async fn remove_policy(
    State(state): State<Arc<NodeState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    let pattern = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "pattern")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| ApiError::invalid("the query parameter pattern is required: DELETE /v1/policies?pattern=P"))?;
    gateway.remove_policy(&pattern).await.map_err(refusal)?;
    Ok(StatusCode::NO_CONTENT.into_response_body())
}

trait NoContent {
    fn into_response_body(self) -> Response;
}

impl NoContent for StatusCode {
    fn into_response_body(self) -> Response {
        axum::response::IntoResponse::into_response(self)
    }
}
