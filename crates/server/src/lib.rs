//! edgebus-server: the node runtime. [`node::run`] opens the store and
//! serves the `edgebus.v1` gRPC services ([`grpc`], and [`grpc_site`] for
//! gateways in their own process) and the HTTP side
//! ([`http`]) until shutdown; [`filter`] decides which recorded events a
//! subscription delivers, by stream, stream pattern, event type and a CEL
//! predicate over the JSON payload; [`subscription`] and [`live`] serve
//! subscriptions; [`group`] runs consumer groups; [`quota`] throttles
//! writes per stream pattern.

mod append_stream;
pub mod filter;
pub mod group;
pub mod grpc;
pub mod grpc_site;
pub mod http;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod node;
pub mod quota;
pub mod state;
pub mod subscription;
