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
//!
//! The routes are mounted over anything that may hold a gateway
//! ([`GatewayHost`]): the node's state, or a gateway process's own (see
//! `gateway_process`).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get};
use edgebus_gateway::def::{PolicyDef, RouteDef};
use edgebus_gateway::{AdminError, Gateway};
use edgebus_proto::v1::ErrorCode as WireCode;
use serde_json::json;

use super::{ApiError, json_response};
use crate::state::NodeState;

/// What the gateway routes are served over: something that may hold a
/// gateway.
pub trait GatewayHost: Clone + Send + Sync + 'static {
    /// The gateway, if there is one.
    fn gateway(&self) -> Option<Arc<Gateway>>;
}

/// A node runs its site's gateway only when started with `--gateway`.
impl GatewayHost for Arc<NodeState> {
    fn gateway(&self) -> Option<Arc<Gateway>> {
        self.gateway.get().cloned()
    }
}

/// `/v1/routes` and `/v1/policies` over `S`'s gateway.
pub(super) fn routes<S: GatewayHost>() -> Router<S> {
    Router::new()
        .route("/v1/routes", get(list_routes::<S>).post(set_route::<S>))
        .route("/v1/routes/{name}", delete(remove_route::<S>))
        .route("/v1/policies", get(list_policies::<S>).post(set_policy::<S>).delete(remove_policy::<S>))
}

fn gateway<S: GatewayHost>(host: &S) -> Result<Arc<Gateway>, ApiError> {
    host.gateway().ok_or_else(|| {
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

async fn list_routes<S: GatewayHost>(State(state): State<S>) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    Ok(json_response(StatusCode::OK, &json!({ "site": gateway.site().as_str(), "routes": gateway.routes_json() })))
}

async fn set_route<S: GatewayHost>(State(state): State<S>, body: Bytes) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    let def: RouteDef = parse(&body, "route definition")?;
    let route = gateway.set_route(def).await.map_err(refusal)?;
    Ok(json_response(StatusCode::CREATED, &json!({ "route": route.name })))
}

async fn remove_route<S: GatewayHost>(State(state): State<S>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    gateway.remove_route(&name).await.map_err(refusal)?;
    Ok(StatusCode::NO_CONTENT.into_response_body())
}

async fn list_policies<S: GatewayHost>(State(state): State<S>) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    Ok(json_response(StatusCode::OK, &json!({ "policies": gateway.policies() })))
}

async fn set_policy<S: GatewayHost>(State(state): State<S>, body: Bytes) -> Result<Response, ApiError> {
    let gateway = gateway(&state)?;
    let def: PolicyDef = parse(&body, "policy definition")?;
    let pattern = def.pattern.clone();
    gateway.set_policy(def).await.map_err(refusal)?;
    Ok(json_response(StatusCode::CREATED, &json!({ "pattern": pattern })))
}

async fn remove_policy<S: GatewayHost>(
    State(state): State<S>,
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
