//! The `edgebus` command line, built inside the test crate so that its
//! scenarios can start real nodes (`CARGO_BIN_EXE_edgebus-node`).

fn main() -> std::process::ExitCode {
    // As the `edgebus` binary does: scenarios that read a node's memory
    // measure the allocator that operators run.
    edgebus::allocator::tune();
    edgebus::main_from_env()
}
