//! The `edgebus` command line: argument parsing and dispatch to subcommands.
//!
//! The binary is thin: `main` calls [`main_from_env`], which parses the
//! arguments into a [`Cli`] and hands it to [`run`]. Each subcommand lives in
//! its own module with its own `Args` struct and `run` function, so that new
//! ones (serve, gateway, publish, read, subscribe, stats, routes, policy,
//! failover, demo, transform) slot into [`Command`] and the `match` in [`run`] without
//! touching the others.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod allocator;
pub mod bench;
pub mod client_cmds;
pub mod config;
pub mod demo;
pub mod failover;
pub mod gateway_cmd;
pub mod group;
pub mod route_view;
pub mod routes;
pub mod serve;
mod sites;
pub mod subscribe;
pub mod transform;

/// The parsed command line.
#[derive(Debug, Parser)]
#[command(name = "edgebus", version, about = "edgebus: a durable event store", propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a site node: the event store with its gRPC and HTTP APIs.
    Serve(serve::ServeArgs),
    /// Run a site's gateway as its own process, against the site's node.
    Gateway(gateway_cmd::GatewayArgs),
    /// Measure a component of edgebus on this machine and report the figures.
    Bench(bench::BenchArgs),
    /// Append one event to a stream on a node.
    Publish(client_cmds::PublishArgs),
    /// Print a stream's events from a node.
    Read(client_cmds::ReadArgs),
    /// List the streams on a node.
    Streams(client_cmds::StreamsArgs),
    /// Print a node's figures: queues, backpressure, log counters, latency.
    Stats(client_cmds::StatsArgs),
    /// Follow a node's events: catch up from a start, then live.
    Subscribe(subscribe::SubscribeArgs),
    /// Manage consumer groups, or consume from one.
    Group(group::GroupArgs),
    /// Run racing deterministic transformers (a built-in example) and feed them.
    Transform(transform::TransformArgs),
    /// A gateway's routes: list them with their lanes' figures, add, remove.
    Routes(routes::RoutesArgs),
    /// A site's topic policies: list, set, remove.
    Policy(routes::PolicyArgs),
    /// A site's gateways: who holds the lease, under which term, since when.
    Gateways(failover::GatewaysArgs),
    /// The failover drill: move the lease from an active gateway to a standby.
    Failover(failover::FailoverArgs),
    /// The golden path in one command: two sites, a WAN link, alerts and telemetry, a failover drill, a verdict.
    Demo(demo::DemoArgs),
}

/// Runs a parsed command line to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Gateway(args) => gateway_cmd::run(&args),
        Command::Bench(args) => bench::run(args),
        Command::Publish(args) => client_cmds::publish(&args),
        Command::Read(args) => client_cmds::read(&args),
        Command::Streams(args) => client_cmds::streams(&args),
        Command::Stats(args) => client_cmds::stats(&args),
        Command::Subscribe(args) => subscribe::run(&args),
        Command::Group(args) => group::run(&args),
        Command::Transform(args) => transform::run(&args),
        Command::Routes(args) => routes::routes(&args),
        Command::Policy(args) => routes::policy(&args),
        Command::Gateways(args) => failover::gateways(&args),
        Command::Failover(args) => failover::failover(&args),
        Command::Demo(args) => demo::run(&args),
    }
}

/// Runs the command line with the process arguments; returns the exit code.
///
/// Usage errors are reported by clap with exit code 2 (`--help` and
/// `--version` exit 0); a failed command prints `error: <message>` (with its
/// causes) on stderr and exits 1.
pub fn main_from_env() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bench_log_quick_json_parses() {
        let cli = Cli::try_parse_from(["edgebus", "bench", "log", "--quick", "--json"]).expect("parses");
        let Command::Bench(bench::BenchArgs { target: bench::BenchTarget::Log(args) }) = cli.command else {
            panic!("expected bench log");
        };
        assert!(args.quick);
        assert!(args.json);
        assert_eq!(args.dir, None);
    }

    #[test]
    fn bench_log_defaults_to_the_full_human_run() {
        let cli = Cli::try_parse_from(["edgebus", "bench", "log", "--dir", "/data"]).expect("parses");
        let Command::Bench(bench::BenchArgs { target: bench::BenchTarget::Log(args) }) = cli.command else {
            panic!("expected bench log");
        };
        assert!(!args.quick);
        assert!(!args.json);
        assert_eq!(args.dir.as_deref(), Some(std::path::Path::new("/data")));
    }

    #[test]
    fn usage_errors_are_refused_with_exit_code_2() {
        let err = Cli::try_parse_from(["edgebus", "bench", "log", "--fast"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["edgebus", "bench"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["edgebus"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
