//! The `edgebus` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    edgebus::allocator::tune();
    edgebus::main_from_env()
}
