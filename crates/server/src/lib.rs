//! edgebus-server: the node runtime. For now it holds only the subscription
//! filter ([`filter`]): which recorded events a subscription delivers, by
//! stream, stream pattern, event type and a CEL predicate over the JSON
//! payload. The gRPC and HTTP services, subscriptions and consumer groups
//! will live here too, on top of `edgebus-store` and `edgebus-proto`.

pub mod filter;
