//! Test kit: the WAN link emulator used by tests, benchmarks and `edgebus demo`.
//!
//! [`Link`] is a userspace TCP proxy on `127.0.0.1` that emulates a slow,
//! lossy or failing WAN link between two sites: bandwidth shared by all
//! connections of a direction, latency, jitter that never reorders bytes,
//! stalls (loss as TCP experiences it), bounded buffering with backpressure,
//! and cut, blackhole and restore, now or on a schedule. [`EchoServer`],
//! [`SinkServer`] and [`measure_raw_goodput`] are helpers for tests and
//! benchmarks.
//!
//! ```no_run
//! # async fn example(target: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use edgebus_testkit::{Action, Link, LinkConfig};
//!
//! let config = LinkConfig {
//!     bandwidth_bps: Some(10_000_000),
//!     latency: Duration::from_millis(40),
//!     ..LinkConfig::default()
//! };
//! let link = Link::start(target, config).await?;
//! // Connect to link.addr() instead of target.
//! link.schedule(Duration::from_secs(5), Action::Cut);
//! link.schedule(Duration::from_secs(8), Action::Restore);
//! # link.stop().await;
//! # Ok(())
//! # }
//! ```

mod config;
pub mod limits;
mod link;
mod pipe;
mod servers;

pub use config::{LinkConfig, LinkConfigError, Stall};
pub use link::{Action, Link, LinkStats};
pub use servers::{EchoServer, SinkServer, measure_raw_goodput};
