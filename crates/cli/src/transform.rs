//! `edgebus transform`: racing deterministic transformers without writing
//! code. `run` starts instances of a built-in transform against a node (each
//! with its own connection, as separate processes would have), and `feed`
//! publishes the example order flow for it to work on.
//!
//! The one built-in is `matcher`, the order-matching engine of
//! `crates/client/examples/order_matcher/engine.rs`: this module includes
//! that file, so the command and the standalone example run the same code.
//!
//! Each instance reports on stderr, one line per event, prefixed with the
//! transform and instance (`transform matcher instance 2: caught up
//! position=… inputs_applied=…`), and a progress line every
//! [`PROGRESS_INTERVAL`]. SIGTERM or Ctrl-C stops every instance between two
//! inputs (exit 0); an instance that fails (a divergence, a refusal before
//! the start) stops the others and the command exits 1 with its error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use edgebus_client::Client;
use edgebus_client::transform::{
    MetricsSnapshot, Notice, SNAPSHOT_EVERY_DEFAULT, STATE_HASH_EVERY_DEFAULT, TransformConfig, TransformError,
    TransformRunner,
};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName, StreamPattern};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::client_cmds::ConnectArgs;

/// The order-matching engine, shared with the standalone example.
#[path = "../../client/examples/order_matcher/engine.rs"]
pub mod matcher;

/// Most instances one `edgebus transform run` starts.
pub const INSTANCES_MAX: usize = 16;

/// How often each instance's progress line is printed.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// The built-in transforms: name and what it does.
pub const BUILT_IN: &[(&str, &str)] =
    &[("matcher", "an order-matching engine: PlaceOrder/CancelOrder on orders.> to trades on trades.*")];

/// `edgebus transform`.
#[derive(Debug, Args)]
pub struct TransformArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: TransformCommand,
}

/// The transform subcommands.
#[derive(Debug, Subcommand)]
pub enum TransformCommand {
    /// Run instances of a built-in transform against a node; they race to write each output once.
    Run(RunArgs),
    /// Publish the example's order flow (input for the matcher).
    Feed(FeedArgs),
}

/// `edgebus transform run NAME`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The built-in transform: `matcher` (an order-matching engine over
    /// orders.> producing trades.*).
    pub transform: String,
    /// The transform's name on the node [default: the built-in's name]; its
    /// instances share it.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Instances to run in this process, each with its own connection.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub instances: usize,
    /// The input streams.
    #[arg(long, value_name = "PATTERN", default_value = "orders.>")]
    pub inputs: StreamPattern,
    /// Outputs go to PREFIX.INSTRUMENT.
    #[arg(long, value_name = "PREFIX", default_value = "trades")]
    pub output_prefix: String,
    /// Inputs between two state hashes (transform.NAME.statehash).
    #[arg(long, value_name = "N", default_value_t = STATE_HASH_EVERY_DEFAULT)]
    pub state_hash_every: u64,
    /// Inputs between two snapshots: 0 for none, else a multiple of --state-hash-every.
    #[arg(long, value_name = "N", default_value_t = SNAPSHOT_EVERY_DEFAULT)]
    pub snapshot_every: u64,
    /// Replay from the first input instead of resuming from the latest snapshot.
    #[arg(long)]
    pub no_snapshot: bool,
    /// Start even if no stream matches --inputs yet.
    #[arg(long)]
    pub allow_no_input: bool,
    /// Exit 0 once every input written before the start is applied.
    #[arg(long)]
    pub until_caught_up: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// `edgebus transform feed`.
#[derive(Debug, Clone, Args)]
pub struct FeedArgs {
    /// Orders to publish.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub orders: u64,
    /// Orders per second; 0: each as soon as the previous one is acknowledged.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub rate: u64,
    /// Orders go to PREFIX.INSTRUMENT.
    #[arg(long, value_name = "PREFIX", default_value = "orders")]
    pub prefix: String,
    /// The instruments, comma-separated.
    #[arg(long, value_name = "LIST", default_value = "BTC-EUR,ETH-EUR", value_delimiter = ',')]
    pub instruments: Vec<String>,
    /// The flow's seed: the same seed publishes the same orders.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Runs `edgebus transform`.
pub fn run(args: &TransformArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("edgebus-transform")
        .build()
        .context("cannot start the async runtime")?;
    match &args.command {
        TransformCommand::Run(args) => runtime.block_on(run_instances(args)),
        TransformCommand::Feed(args) => runtime.block_on(feed(args)),
    }
}

/// The configuration of `args`, or why it is refused (before any connection).
pub fn config(args: &RunArgs) -> anyhow::Result<(TransformConfig, matcher::OrderMatcher)> {
    let Some((builtin, _)) = BUILT_IN.iter().find(|(name, _)| *name == args.transform) else {
        let known: Vec<String> = BUILT_IN.iter().map(|(name, what)| format!("{name} ({what})")).collect();
        bail!("no built-in transform named {:?}; the built-in transforms are: {}", args.transform, known.join(", "));
    };
    if args.instances == 0 || args.instances > INSTANCES_MAX {
        bail!("--instances {} is out of range: 1 to {INSTANCES_MAX}", args.instances);
    }
    let engine = matcher::OrderMatcher::new(&args.output_prefix).map_err(anyhow::Error::msg)?;
    let name = args.name.as_deref().unwrap_or(builtin);
    let mut config = TransformConfig::new(name, args.inputs.clone(), engine.outputs());
    config.state_hash_every = args.state_hash_every;
    config.snapshot_every = args.snapshot_every;
    config.use_snapshots = !args.no_snapshot;
    config.require_inputs = !args.allow_no_input;
    Ok((config, engine))
}

/// Prints a line on stderr; never panics on a closed stderr.
fn report(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

async fn run_instances(args: &RunArgs) -> anyhow::Result<()> {
    let (config, engine) = config(args)?;
    let name = config.name.clone();
    let (stop, stopped) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut instances = tokio::task::JoinSet::new();
    let mut all_metrics = Vec::new();
    for instance in 1..=args.instances {
        let client = Client::connect(&args.connect.server).await?;
        let prefix = format!("transform {name} instance {instance}");
        let runner = TransformRunner::new(client, config.clone(), engine.clone())
            .on_notice(move |notice: &Notice| report(format_args!("{prefix}: {notice}")));
        let runner = if args.until_caught_up { runner.stop_when_caught_up() } else { runner };
        all_metrics.push((instance, runner.metrics()));
        let mut stopped = stopped.clone();
        instances.spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            (instance, runner.run(shutdown).await)
        });
    }
    let all_metrics = Arc::new(all_metrics);
    let progress = {
        let (all_metrics, name) = (Arc::clone(&all_metrics), name.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                for (instance, metrics) in all_metrics.iter() {
                    report(format_args!("transform {name} instance {instance}: {}", metrics.snapshot()));
                }
            }
        })
    };
    let mut failure: Option<(usize, TransformError)> = None;
    let mut ended: Vec<(usize, MetricsSnapshot)> = Vec::new();
    loop {
        tokio::select! {
            _ = terminate.recv() => { let _ = stop.send(true); }
            _ = interrupt.recv() => { let _ = stop.send(true); }
            joined = instances.join_next() => match joined {
                None => break,
                Some(Ok((instance, Ok(end)))) => ended.push((instance, end)),
                Some(Ok((instance, Err(error)))) => {
                    report(format_args!("transform {name} instance {instance}: stopped: {error}"));
                    failure.get_or_insert((instance, error));
                    let _ = stop.send(true);
                }
                Some(Err(panic)) => bail!("a transform instance panicked: {panic}"),
            },
        }
    }
    progress.abort();
    ended.sort_by_key(|(instance, _)| *instance);
    for (instance, end) in &ended {
        report(format_args!("transform {name} instance {instance}: stopped {end}"));
        if args.connect.json {
            println!("{}", metrics_json(&name, *instance, end));
        }
    }
    match failure {
        Some((instance, error)) => {
            Err(anyhow::Error::new(error).context(format!("transform {name} instance {instance}")))
        }
        None => Ok(()),
    }
}

/// An instance's final figures as one JSON object.
fn metrics_json(name: &str, instance: usize, end: &MetricsSnapshot) -> serde_json::Value {
    serde_json::json!({
        "transform": name,
        "instance": instance,
        "inputs_applied": end.inputs_applied,
        "next_position": end.next_position,
        "outputs_written": end.outputs_written,
        "outputs_existing": end.outputs_existing,
        "state_hashes_written": end.state_hashes_written,
        "state_hashes_matched": end.state_hashes_matched,
        "state_hash_mismatches": end.state_hash_mismatches,
        "snapshots_recorded": end.snapshots_recorded,
        "snapshots_skipped": end.snapshots_skipped,
        "snapshot_failures": end.snapshot_failures,
        "retries": end.retries,
        "caught_up": end.caught_up,
    })
}

async fn feed(args: &FeedArgs) -> anyhow::Result<()> {
    if args.instruments.is_empty() {
        bail!("--instruments names no instrument");
    }
    let mut streams = std::collections::BTreeMap::new();
    for instrument in &args.instruments {
        let stream = StreamName::new(&format!("{}.{instrument}", args.prefix))
            .with_context(|| format!("--prefix {:?} and instrument {instrument:?}", args.prefix))?;
        streams.insert(instrument.clone(), stream);
    }
    let instruments: Vec<&str> = args.instruments.iter().map(String::as_str).collect();
    let mut flow = matcher::OrderFlow::new(args.seed, &instruments);
    let client = Client::connect(&args.connect.server).await?;
    let started = tokio::time::Instant::now();
    for sent in 0..args.orders {
        if args.rate > 0 {
            tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / args.rate as f64)).await;
        }
        let order = flow.next_order();
        let event = NewEvent {
            id: EventId::generate(),
            event_type: EventType::new(order.event_type).expect("the flow's types are valid"),
            data: order.data,
            metadata: Vec::new(),
            timestamp_ms: 0,
        };
        client.append(streams[&order.instrument].clone(), ExpectedVersion::Any, vec![event]).await?;
    }
    println!(
        "published {} orders to {}.{{{}}} in {:.1} s",
        args.orders,
        args.prefix,
        args.instruments.join(","),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use edgebus_client::transform::{Output, Transform};
    use edgebus_types::RecordedEvent;

    use super::matcher::{Books, OrderFlow, OrderMatcher};
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        let mut all = vec!["edgebus", "transform", "run"];
        all.extend_from_slice(args);
        let cli = crate::Cli::try_parse_from(all).expect("parses");
        let crate::Command::Transform(TransformArgs { command: TransformCommand::Run(args) }) = cli.command else {
            panic!("expected transform run");
        };
        args
    }

    #[test]
    fn run_arguments_make_the_configuration() {
        let args = parse(&["matcher", "--instances", "3", "--state-hash-every", "10", "--snapshot-every", "50"]);
        let (config, _) = super::config(&args).unwrap();
        assert_eq!(config.name, "matcher");
        assert_eq!(config.inputs.as_str(), "orders.>");
        assert_eq!(config.outputs.as_str(), "trades.*");
        assert_eq!((config.state_hash_every, config.snapshot_every), (10, 50));
        assert!(config.use_snapshots && config.require_inputs);
        let args = parse(&["matcher", "--name", "m2", "--output-prefix", "fills.eu", "--no-snapshot"]);
        let (config, _) = super::config(&args).unwrap();
        assert_eq!((config.name.as_str(), config.outputs.as_str()), ("m2", "fills.eu.*"));
        assert!(!config.use_snapshots);
    }

    #[test]
    fn unknown_transforms_and_instance_counts_are_refused_with_the_choices() {
        let error = config(&parse(&["nosuch"])).unwrap_err().to_string();
        assert!(error.contains("no built-in transform named \"nosuch\""), "{error}");
        assert!(error.contains("matcher (an order-matching engine"), "{error}");
        let error = config(&parse(&["matcher", "--instances", "0"])).unwrap_err().to_string();
        assert!(error.contains("1 to 16"), "{error}");
        let error = config(&parse(&["matcher", "--output-prefix", "a.*"])).unwrap_err().to_string();
        assert!(error.contains("output prefix"), "{error}");
    }

    fn order(stream: &str, version: u64, event_type: &str, data: &str) -> RecordedEvent {
        RecordedEvent {
            stream: StreamName::new(stream).unwrap(),
            version,
            position: version,
            id: EventId::from_u128(u128::from(version)),
            event_type: EventType::new(event_type).unwrap(),
            data: data.as_bytes().to_vec(),
            metadata: Vec::new(),
            timestamp_ms: 1,
            origin: None,
        }
    }

    /// Applies `inputs` to `books` and renders each output as `TYPE DATA`.
    fn apply(engine: &OrderMatcher, books: &mut Books, inputs: &[(&str, &str)]) -> Vec<String> {
        let mut lines = Vec::new();
        for (version, (event_type, data)) in inputs.iter().enumerate() {
            let input = order("orders.BTC", version as u64, event_type, data);
            for Output { stream, event_type, data } in engine.apply(books, &input) {
                assert_eq!(stream.as_str(), "trades.BTC");
                lines.push(format!("{event_type} {}", String::from_utf8(data).unwrap()));
            }
        }
        lines
    }

    #[test]
    fn the_matcher_fills_by_price_then_time_and_rests_or_cancels_the_rest() {
        let engine = OrderMatcher::new("trades").unwrap();
        let mut books = engine.initial_state();
        let lines = apply(
            &engine,
            &mut books,
            &[
                ("PlaceOrder", r#"{"order_id":"s1","side":"sell","qty":5,"price":101}"#),
                ("PlaceOrder", r#"{"order_id":"s2","side":"sell","qty":5,"price":100}"#),
                ("PlaceOrder", r#"{"order_id":"s3","side":"sell","qty":5,"price":100}"#),
                // Takes s2 (best price, earliest), then 2 of s3; the limit stops it before s1.
                ("PlaceOrder", r#"{"order_id":"b1","side":"buy","qty":7,"price":100}"#),
                // A market order takes the rest of s3 and all of s1, then has nothing left to take.
                ("PlaceOrder", r#"{"order_id":"b2","side":"buy","qty":10}"#),
            ],
        );
        assert_eq!(
            lines,
            [
                r#"OrderRested {"order_id":"s1","side":"sell","price":101,"qty":5}"#,
                r#"OrderRested {"order_id":"s2","side":"sell","price":100,"qty":5}"#,
                r#"OrderRested {"order_id":"s3","side":"sell","price":100,"qty":5}"#,
                r#"Trade {"instrument":"BTC","trade":1,"price":100,"qty":5,"buy_order":"b1","sell_order":"s2","taker":"buy"}"#,
                r#"Trade {"instrument":"BTC","trade":2,"price":100,"qty":2,"buy_order":"b1","sell_order":"s3","taker":"buy"}"#,
                r#"Trade {"instrument":"BTC","trade":3,"price":100,"qty":3,"buy_order":"b2","sell_order":"s3","taker":"buy"}"#,
                r#"Trade {"instrument":"BTC","trade":4,"price":101,"qty":5,"buy_order":"b2","sell_order":"s1","taker":"buy"}"#,
                r#"OrderCancelled {"order_id":"b2","qty":2,"reason":"no more liquidity for a market order"}"#,
            ]
        );
        assert_eq!((books.resting_orders(), books.trades()), (0, 4));
    }

    #[test]
    fn the_matcher_cancels_and_rejects_with_reasons() {
        let engine = OrderMatcher::new("trades").unwrap();
        let mut books = engine.initial_state();
        let lines = apply(
            &engine,
            &mut books,
            &[
                ("PlaceOrder", r#"{"side":"buy","qty":3,"price":99}"#),
                ("PlaceOrder", r#"{"order_id":"orders.BTC@0","side":"buy","qty":1,"price":98}"#),
                ("CancelOrder", r#"{"order_id":"orders.BTC@0"}"#),
                ("CancelOrder", r#"{"order_id":"orders.BTC@0"}"#),
                ("PlaceOrder", r#"{"side":"buy","qty":0,"price":99}"#),
                ("PlaceOrder", r#"{"side":"buy","qty":1,"price":99.5}"#),
                ("Event", r#"{}"#),
            ],
        );
        assert_eq!(lines[0], r#"OrderRested {"order_id":"orders.BTC@0","side":"buy","price":99,"qty":3}"#);
        assert_eq!(
            lines[1],
            r#"OrderRejected {"order_id":"orders.BTC@0","reason":"an order with this id is live already"}"#
        );
        assert_eq!(lines[2], r#"OrderCancelled {"order_id":"orders.BTC@0","qty":3,"reason":"cancelled"}"#);
        assert_eq!(lines[3], r#"OrderRejected {"order_id":"orders.BTC@0","reason":"no live order with this id"}"#);
        assert_eq!(lines[4], r#"OrderRejected {"order_id":"orders.BTC@4","reason":"qty must be at least 1"}"#);
        assert!(
            lines[5].starts_with(r#"OrderRejected {"order_id":null,"reason":"invalid PlaceOrder: "#),
            "{}",
            lines[5]
        );
        assert!(lines[6].contains("unknown input type Event: expected PlaceOrder or CancelOrder"), "{}", lines[6]);
        assert_eq!(lines.len(), 7, "one output per input here");
        assert_eq!(books.resting_orders(), 0);
    }

    #[test]
    fn the_matcher_state_round_trips_and_a_replayed_flow_is_identical() {
        let engine = OrderMatcher::new("trades").unwrap();
        let run = || {
            let mut flow = OrderFlow::new(7, &["BTC", "ETH"]);
            let mut books = engine.initial_state();
            let mut outputs = Vec::new();
            for version in 0..2_000 {
                let order = flow.next_order();
                let input = order_for(&order, version);
                outputs.extend(engine.apply(&mut books, &input));
            }
            (books, outputs)
        };
        let (books, outputs) = run();
        assert_eq!(run(), (books.clone(), outputs.clone()), "the same flow gives the same outputs and state");
        assert!(books.trades() > 300, "about half the orders trade: {}", books.trades());
        assert!(outputs.len() >= 2_000, "every input gives an output");
        let encoded = engine.encode_state(&books);
        let decoded = engine.decode_state(&encoded).unwrap();
        assert_eq!(decoded, books);
        assert_eq!(engine.encode_state(&decoded), encoded, "equal states encode to equal bytes");
    }

    fn order_for(order: &matcher::FlowOrder, version: u64) -> RecordedEvent {
        let mut input = self::order(&format!("orders.{}", order.instrument), version, order.event_type, "");
        input.data = order.data.clone();
        input
    }
}
