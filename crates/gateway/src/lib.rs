//! Federation between sites (DESIGN §3.4): routes are cursors over the
//! local log, lanes share a credit window granted by the receiver, topic
//! policies decide what crosses, and the receiver writes with
//! exists-or-write at the origin's versions.

pub mod credit;
pub mod def;
pub mod gateway;
pub mod health;
pub mod lease;
pub mod members;
pub mod metrics;
pub mod policy;
pub mod receiver;
pub mod sender;
pub mod site;
mod wire;

pub use gateway::{AdminError, Gateway, GatewayConfig};
pub use site::{Fence, Fences, LocalSite, RemoteSite, Site, SiteError};
