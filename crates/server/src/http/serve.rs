//! The HTTP listener's accept loop: each admitted connection (see
//! [`LimitedListener`]) is served by hyper's HTTP/1.1 server on a task of
//! its own, with a timeout on reading request headers so that an idle
//! connection does not hold a slot for ever.
//!
//! The timeout runs from the connection's opening, and again from the end
//! of each response while the connection waits for the next request; a
//! client that has not sent a whole request head by then loses the
//! connection. A request being served (an append waiting to be durable, a
//! server-sent events subscription) is not idle, whatever its length.
//!
//! On `stop` the loop stops accepting, asks every open connection to finish
//! its request in flight and close, and returns once all have closed (the
//! node bounds that wait).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::limits::LimitedListener;

/// Serves `router` on `listener` until `stop` resolves, then drains; see
/// the module docs.
pub async fn serve(
    mut listener: LimitedListener,
    router: Router,
    idle_timeout: Duration,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(idle_timeout);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            () = &mut stop => break,
            // The limited listener retries failed accepts and never fails.
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that went away or timed out is nothing to report.
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
