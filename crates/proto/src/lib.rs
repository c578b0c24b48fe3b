//! edgebus-proto: the `edgebus.v1` gRPC contract and its Rust side. The
//! only crate that knows protobuf: everything else speaks `edgebus-types`
//! and `edgebus-store` types, and converts at this boundary.
//!
//! - `proto/edgebus/v1/edgebus.proto` is the public contract (documented
//!   field by field; numbers and error codes are never reused).
//! - [`v1`] is the code generated from it at build time: prost messages, the
//!   tonic client (`v1::event_store_client`) and server
//!   (`v1::event_store_server`). The build needs no `protoc`: `build.rs`
//!   compiles the `.proto` files with `protox`, in Rust.
//! - [`convert`] turns wire messages into validated edgebus values and back,
//!   and store errors into `tonic::Status` with a stable
//!   [`v1::ErrorDetail`].
//!
//! This crate enables only tonic's `codegen` feature; the server and client
//! crates bring the transport (`tonic/transport`, or `server` / `channel`).

pub mod convert;
pub mod json;

/// The generated `edgebus.v1` messages, client and server. Their rustdoc is
/// the comments of the `.proto` file.
#[allow(missing_docs, missing_debug_implementations, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/edgebus.v1.rs"));

    /// The encoded `FileDescriptorSet` of the `edgebus.v1` files, with their
    /// comments, for gRPC server reflection and dynamic clients.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/edgebus.v1.fds.bin"));
}

#[cfg(test)]
mod tests;
