//! The `edgebus` command line, built inside the test crate so that its
//! scenarios can start real nodes (`CARGO_BIN_EXE_edgebus-node`).

fn main() -> std::process::ExitCode {
    edgebus::main_from_env()
}
