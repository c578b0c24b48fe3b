//! `edgebus bench`: reproducible benchmarks that print the figures
//! `docs/benchmarks.md` quotes, with the machine, the filesystem, the
//! durability setting and ratios to a baseline measured in the same run.

use clap::{Args, Subcommand};

mod histogram;
pub mod log;
pub(crate) mod machine;
pub mod node;
pub mod quota;
pub mod store;
pub mod transform;
pub mod wan;

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
    /// A real node over loopback against NATS JetStream and PostgreSQL: publish with ack, end-to-end latency, fan-out.
    Node(node::NodeBenchArgs),
    /// Ingest quotas: alerts.> throughput alone and beside a runaway telemetry.> producer held by a quota.
    Quota(quota::QuotaBenchArgs),
    /// Racing transform instances: input -> output latency with 1, 2 and 3 instances, with and without pauses.
    Transform(transform::TransformBenchArgs),
    /// Federation through the WAN link emulator: goodput against raw TCP, end-to-end latency, a critical lane beside a saturated bulk lane, a dead route's backlog and RSS; NATS leaf nodes side by side.
    Wan(wan::WanBenchArgs),
}

/// Runs one benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        BenchTarget::Log(args) => log::run(&args),
        BenchTarget::Store(args) => store::run(&args),
        BenchTarget::Node(args) => node::run(&args),
        BenchTarget::Quota(args) => quota::run(&args),
        BenchTarget::Transform(args) => transform::run(&args),
        BenchTarget::Wan(args) => wan::run(&args),
    }
}

/// A fresh scratch directory for one benchmark run, removed when dropped: in
/// `dir` if given (put it on the filesystem of the real data directory), else
/// under `./target` if it exists, else under `$TMPDIR`.
pub(crate) fn scratch_dir(dir: Option<&std::path::Path>, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    use anyhow::Context as _;
    let parent = match dir {
        Some(dir) => {
            anyhow::ensure!(dir.is_dir(), "--dir {} is not a directory", dir.display());
            dir.to_path_buf()
        }
        None if std::path::Path::new("target").is_dir() => std::path::PathBuf::from("target"),
        None => std::env::temp_dir(),
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a scratch directory in {}", parent.display()))
}
