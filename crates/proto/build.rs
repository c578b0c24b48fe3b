//! Compiles `proto/edgebus/v1/*.proto` without a system `protoc`: `protox`
//! (a protobuf compiler written in Rust) parses them into a
//! `FileDescriptorSet`, and `tonic-prost-build` generates the prost messages
//! and the tonic client and server from it, into `OUT_DIR`.

use std::path::Path;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "proto/edgebus/v1/edgebus.proto",
    "proto/edgebus/v1/groups.proto",
    "proto/edgebus/v1/wan.proto",
    "proto/edgebus/v1/site.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let out_dir = std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?;
    let out_dir = Path::new(&out_dir);
    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    // Source info keeps the comments, which prost turns into rustdoc and
    // reflection clients show.
    compiler.include_source_info(true).include_imports(true).open_files(PROTO_FILES)?;
    std::fs::write(out_dir.join("edgebus.v1.fds.bin"), compiler.encode_file_descriptor_set())?;
    let descriptors = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The `connect` helper needs tonic's transport feature, which this
        // crate does not enable: the server and client crates bring their own.
        .build_transport(false)
        // Rare and large: boxed, so that an `ErrorDetail` (which clients
        // keep in their error types) stays small.
        .boxed(".edgebus.v1.ErrorDetail.fenced")
        .out_dir(out_dir)
        .compile_fds(descriptors)?;
    Ok(())
}
