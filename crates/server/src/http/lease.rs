//! The site's gateways and their lease over HTTP (`edgebus gateways`,
//! `edgebus failover`). The node answers from its own log, so these work
//! whether the gateways run inside the node or as their own processes.
//!
//! - `GET /v1/gateways`: `{"lease": {"holder": {gateway, term, since_ms,
//!   renewed_ms, wan, http, lease_ms}|null, "term", "version",
//!   "released"}, "gateways": [{"gateway", "instance", "role", "term",
//!   "wan", "http", "lease_ms", "last_seen_ms", "alive"}]}` — every gateway
//!   that said it was alive lately (`$gateway.members`), newest first.
//! - `POST /v1/gateways/{name}/failover`: the operator's drill: releases
//!   the lease `name` holds, so a standby takes it at once. `404` for a
//!   gateway the site does not know, `409` for one that is not active.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use edgebus_gateway::LocalSite;
use edgebus_gateway::lease::driver::{ReleaseError, read_lease, read_members};
use edgebus_proto::v1::ErrorCode as WireCode;
use serde_json::json;

use super::{ApiError, json_response};
use crate::state::NodeState;

/// Heartbeats read back to list the gateways.
const MEMBERS_READ: usize = 256;

fn site(state: &NodeState) -> Result<Arc<LocalSite>, ApiError> {
    state.site.get().cloned().ok_or_else(|| ApiError::internal("the node is still starting"))
}

fn unavailable(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, WireCode::Unavailable as u32, error.to_string())
}

pub(super) async fn list(State(state): State<Arc<NodeState>>) -> Result<Response, ApiError> {
    let site = site(&state)?;
    let lease = read_lease(site.as_ref()).await.map_err(unavailable)?;
    let members = read_members(site.as_ref(), MEMBERS_READ).await.map_err(unavailable)?;
    let now = edgebus_gateway::metrics::now_ms();
    let gateways: Vec<serde_json::Value> = members
        .iter()
        .map(|(m, seen)| {
            let holder = lease.holder.as_ref().is_some_and(|h| h.instance == m.instance);
            json!({
                "gateway": m.gateway,
                "instance": m.instance,
                "role": if holder { "active" } else { "standby" },
                "term": if holder { lease.term } else { 0 },
                "wan": m.wan,
                "http": m.http,
                "lease_ms": m.lease_ms,
                "last_seen_ms": seen,
                "alive": now.saturating_sub(*seen) <= 2 * m.lease_ms.max(1),
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "lease": lease, "gateways": gateways })))
}

pub(super) async fn failover(
    State(state): State<Arc<NodeState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let site = site(&state)?;
    let lease = read_lease(site.as_ref()).await.map_err(unavailable)?;
    let members = read_members(site.as_ref(), MEMBERS_READ).await.map_err(unavailable)?;
    let known =
        lease.holder.as_ref().is_some_and(|h| h.gateway == name) || members.iter().any(|(m, _)| m.gateway == name);
    if !known {
        let mut names: Vec<&str> = members.iter().map(|(m, _)| m.gateway.as_str()).collect();
        names.sort_unstable();
        let known = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            WireCode::InvalidArgument as u32,
            format!("no gateway named {name} is known at this site (known gateways: {known})"),
        ));
    }
    match edgebus_gateway::lease::driver::release_by_operator(site.as_ref(), &name, "operator failover drill").await {
        Ok(view) => Ok(json_response(StatusCode::OK, &json!({ "released": name, "lease": view }))),
        Err(ReleaseError::NotHolder(m) | ReleaseError::Moved(m)) => {
            Err(ApiError::new(StatusCode::CONFLICT, WireCode::WrongExpectedVersion as u32, m))
        }
        Err(ReleaseError::Site(e)) => Err(unavailable(e)),
    }
}
