//! The HTTP side of a gateway in its own process (`edgebus gateway`):
//!
//! - `GET /healthz`: the process serves.
//! - `GET /readyz`: `ready` once the gateway has started (this router
//!   exists only then), `503` once it is stopping.
//! - `GET /metrics`: the gateway's routes, lanes, topics and inbound links
//!   (as a node with `--gateway` renders them), its lease, and a few
//!   process figures: uptime, resident memory, open file descriptors, and
//!   the site's log end as the gateway follows it.
//! - `GET /v1/stats`: `{"gateway": <the gateway section of a node's
//!   stats>, "lease": <this gateway's view of the lease>}`.
//! - `/v1/routes`, `/v1/policies`: as a node serves them (see
//!   [`super::gateway`]).
//!
//! Refusals are JSON `{code, message}` as on a node.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use edgebus_gateway::Gateway;
use edgebus_proto::v1::ErrorCode as WireCode;
use serde_json::json;
use tokio::sync::watch;

use super::gateway::GatewayHost;
use super::{ApiError, HTTP_BODY_BYTES_MAX, json_response, method_not_allowed};
use crate::metrics::PROMETHEUS_CONTENT_TYPE;

/// What the routes of a gateway process share.
#[derive(Debug)]
pub struct GatewayProcess {
    gateway: Arc<Gateway>,
    started: Instant,
    stopping: watch::Receiver<bool>,
}

impl GatewayHost for Arc<GatewayProcess> {
    fn gateway(&self) -> Option<Arc<Gateway>> {
        Some(Arc::clone(&self.gateway))
    }
}

/// The routes of a gateway process over its started `gateway`; `/readyz`
/// answers `503` once `stopping` is true.
pub fn router(gateway: Arc<Gateway>, stopping: watch::Receiver<bool>) -> Router {
    let process = Arc::new(GatewayProcess { gateway, started: Instant::now(), stopping });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .merge(super::gateway::routes())
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(HTTP_BODY_BYTES_MAX))
        .with_state(process)
}

async fn ready(State(process): State<Arc<GatewayProcess>>) -> Response {
    if *process.stopping.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn stats(State(process): State<Arc<GatewayProcess>>) -> Response {
    let gateway = &process.gateway;
    json_response(StatusCode::OK, &json!({ "gateway": gateway.stats_json(), "lease": gateway.lease_status() }))
}

async fn metrics(State(process): State<Arc<GatewayProcess>>) -> Response {
    let gateway = &process.gateway;
    let mut text = String::new();
    gateway.render_metrics(&mut text);
    let lease = gateway.lease_status();
    let labels = format!("gateway=\"{}\",site=\"{}\"", gateway.name(), gateway.site());
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}");
    };
    gauge(
        "edgebus_gateway_lease_active",
        "1 while this gateway holds its site's lease.",
        u64::from(lease.role == "active"),
    );
    gauge("edgebus_gateway_lease_term", "The term this gateway sends under (0 when standby).", lease.term);
    gauge(
        "edgebus_gateway_site_end_position",
        "The site's log end as this gateway follows it.",
        *gateway.site_access().end().borrow(),
    );
    gauge(
        "edgebus_gateway_uptime_seconds",
        "Seconds since the gateway process started serving.",
        process.started.elapsed().as_secs(),
    );
    if let Some(bytes) = resident_bytes() {
        gauge("edgebus_process_resident_memory_bytes", "Resident memory of the gateway process.", bytes);
    }
    if let Some(count) = open_fds() {
        gauge("edgebus_process_open_fds", "Open file descriptors of the gateway process.", count);
    }
    ([(header::CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE))], text).into_response()
}

/// Resident memory from `/proc/self/status` (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open file descriptors from `/proc/self/fd` (Linux; `None` elsewhere).
fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        WireCode::InvalidArgument as u32,
        format!(
            "no such route {}: a gateway process serves /healthz, /readyz, /metrics, /v1/stats, /v1/routes and /v1/policies",
            uri.path()
        ),
    )
}
