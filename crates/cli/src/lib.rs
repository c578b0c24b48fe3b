//! The `edgebus` command line: argument parsing and dispatch to subcommands.

/// Runs the command line with the process arguments; returns the exit code.
pub fn main_from_env() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
