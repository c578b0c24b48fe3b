//! The node's HTTP side. For now: `/healthz` (the process serves) and
//! `/readyz` (the store is open: the server starts only after it is).

use axum::Router;
use axum::routing::get;

/// The HTTP routes.
pub fn router() -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(|| async { "ready\n" }))
}
