//! `edgebus bench`: reproducible benchmarks that print the figures
//! `docs/benchmarks.md` quotes, with the machine, the filesystem, the
//! durability setting and ratios to a baseline measured in the same run.

use clap::{Args, Subcommand};

mod histogram;
pub mod log;
mod machine;
pub mod store;

/// Arguments of `edgebus bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[command(subcommand)]
    pub target: BenchTarget,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchTarget {
    /// The durable log: raw write+fdatasync limit, group-committed appends, sequential reads.
    Log(log::LogBenchArgs),
    /// The event store: appends with expected versions, exists-or-write races, stream reads, open time and memory.
    Store(store::StoreBenchArgs),
}

/// Runs one benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        BenchTarget::Log(args) => log::run(&args),
        BenchTarget::Store(args) => store::run(&args),
    }
}
