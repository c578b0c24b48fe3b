//! `edgebus group`: consumer groups from the command line. `create`,
//! `update`, `ls`, `show`, `rm`, `parked` and `replay-parked` manage them;
//! `consume` joins one and prints (and acks) what it receives, for trying
//! a group out and for scripts.
//!
//! Like the other client commands: one node (`--server`), aligned text for
//! people or one JSON object per line with `--json`, and a refusal from
//! the node as `error: … (code N, NAME)` with exit code 1.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use edgebus_client::{Client, ConsumerItem};
use edgebus_proto::v1;
use edgebus_server::group::def::FilterDef;
use edgebus_server::http::groups::group_json;

use crate::client_cmds::{ConnectArgs, aligned, block_on, data_text};

/// `edgebus group …`.
#[derive(Debug, Clone, Args)]
pub struct GroupArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: GroupCommand,
}

/// The group subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum GroupCommand {
    /// Create a consumer group.
    Create(CreateArgs),
    /// Change a group's filter or settings (only the options given).
    Update(UpdateArgs),
    /// List the groups.
    Ls(ConnectOnly),
    /// Show one group: settings, progress, consumers.
    Show(NameArgs),
    /// Delete a group.
    Rm(NameArgs),
    /// List a group's parked events with the reasons.
    Parked(ParkedArgs),
    /// Hand a group's parked events back to its consumers.
    ReplayParked(NameArgs),
    /// Join a group and print what arrives, acking each event.
    Consume(ConsumeArgs),
}

/// Options with only the connection.
#[derive(Debug, Clone, Args)]
pub struct ConnectOnly {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// A group name.
#[derive(Debug, Clone, Args)]
pub struct NameArgs {
    /// The group.
    pub name: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// How a group spreads events over its consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum StrategyArg {
    /// Each event to the next consumer with room.
    RoundRobin,
    /// Each stream pinned to one consumer, in order.
    ByStream,
}

/// A group's filter and settings on the command line.
#[derive(Debug, Clone, Args)]
pub struct GroupOptions {
    /// Only this stream.
    #[arg(long, conflicts_with = "pattern")]
    pub stream: Option<String>,
    /// Only streams matching this pattern (`*` one token, `>` the rest).
    #[arg(long)]
    pub pattern: Option<String>,
    /// Only these event types (repeatable).
    #[arg(long = "type", value_name = "TYPE")]
    pub event_types: Vec<String>,
    /// A CEL predicate over the JSON payload, e.g. `data.total > 10`.
    #[arg(long, value_name = "CEL")]
    pub predicate: Option<String>,
    /// The group's demand window: events in flight over all consumers.
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<u32>,
    /// How long a consumer may hold an event before it is retried.
    #[arg(long, value_name = "MS")]
    pub message_timeout_ms: Option<u64>,
    /// Retries before an event is parked.
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// How events are spread over consumers.
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyArg>,
    /// Settled events between checkpoints.
    #[arg(long, value_name = "N")]
    pub checkpoint_after: Option<u32>,
    /// Longest wait before settled events are checkpointed.
    #[arg(long, value_name = "MS")]
    pub checkpoint_interval_ms: Option<u64>,
}

impl GroupOptions {
    fn filter_given(&self) -> bool {
        self.stream.is_some() || self.pattern.is_some() || !self.event_types.is_empty() || self.predicate.is_some()
    }

    fn filter(&self) -> v1::GroupFilter {
        FilterDef {
            stream: self.stream.clone(),
            stream_pattern: self.pattern.clone(),
            event_types: self.event_types.clone(),
            predicate: self.predicate.clone(),
        }
        .to_wire()
    }

    fn settings(&self) -> v1::GroupSettings {
        let strategy = match self.strategy {
            None => v1::GroupStrategy::Unspecified,
            Some(StrategyArg::RoundRobin) => v1::GroupStrategy::RoundRobin,
            Some(StrategyArg::ByStream) => v1::GroupStrategy::ByStream,
        };
        v1::GroupSettings {
            max_in_flight: self.max_in_flight,
            message_timeout_ms: self.message_timeout_ms,
            max_retries: self.max_retries,
            strategy: strategy as i32,
            checkpoint_after: self.checkpoint_after,
            checkpoint_interval_ms: self.checkpoint_interval_ms,
        }
    }
}

/// Where a new group starts: `beginning`, `end` or a log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartArg(pub v1::create_group_request::StartAt);

impl std::str::FromStr for StartArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        use v1::create_group_request::StartAt;
        match text {
            "beginning" | "start" => Ok(Self(StartAt::Beginning(v1::Empty {}))),
            "end" => Ok(Self(StartAt::End(v1::Empty {}))),
            _ => text
                .parse()
                .map(|position| Self(StartAt::Position(position)))
                .map_err(|_| format!("expected \"beginning\", \"end\" or a log position, got {text:?}")),
        }
    }
}

/// `edgebus group create NAME`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The group's name: letters, digits, `-` and `_`.
    pub name: String,
    /// Where the group starts: beginning, end or a log position.
    #[arg(long, value_name = "FROM", default_value = "end")]
    pub from: StartArg,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: GroupOptions,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// `edgebus group update NAME`.
#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    /// The group.
    pub name: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: GroupOptions,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// `edgebus group parked NAME`.
#[derive(Debug, Clone, Args)]
pub struct ParkedArgs {
    /// The group.
    pub name: String,
    /// Skip this many parked events.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// At most this many (the node's maximum is 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// What `edgebus group consume` does with each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SettleArg {
    /// Ack it.
    Ack,
    /// Nack it: retry.
    Retry,
    /// Nack it: park.
    Park,
    /// Nack it: skip.
    Skip,
}

/// `edgebus group consume NAME`.
#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    /// The group.
    pub name: String,
    /// This consumer's name (default: the node picks one).
    #[arg(long)]
    pub consumer: Option<String>,
    /// This consumer's window (0: the group's).
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: u32,
    /// Stop after this many events (default: run until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// What to do with each event.
    #[arg(long, value_enum, default_value = "ack")]
    pub settle: SettleArg,
    /// The reason given with a nack.
    #[arg(long, default_value = "nacked from the command line")]
    pub reason: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Runs `edgebus group …`.
pub fn run(args: &GroupArgs) -> anyhow::Result<()> {
    match &args.command {
        GroupCommand::Create(a) => {
            let request = v1::CreateGroupRequest {
                name: a.name.clone(),
                filter: Some(a.options.filter()),
                settings: Some(a.options.settings()),
                start_at: Some(a.from.0),
            };
            let info = block_on(async { Client::connect(&a.connect.server).await?.create_group(request).await })?;
            print_group(&info, a.connect.json, "created ");
        }
        GroupCommand::Update(a) => {
            let request = v1::UpdateGroupRequest {
                name: a.name.clone(),
                filter: a.options.filter_given().then(|| a.options.filter()),
                settings: Some(a.options.settings()),
            };
            let info = block_on(async { Client::connect(&a.connect.server).await?.update_group(request).await })?;
            print_group(&info, a.connect.json, "updated ");
        }
        GroupCommand::Ls(a) => {
            let groups = block_on(async { Client::connect(&a.connect.server).await?.list_groups().await })?;
            if a.connect.json {
                for group in &groups {
                    println!("{}", group_json(group));
                }
            } else {
                let mut rows = vec![
                    ["group", "strategy", "checkpoint", "pending", "in_flight", "parked", "consumers", "lag"]
                        .map(str::to_owned),
                ];
                for g in &groups {
                    let json = group_json(g);
                    rows.push([
                        g.name.clone(),
                        json["settings"]["strategy"].as_str().unwrap_or("").to_owned(),
                        g.checkpoint.to_string(),
                        g.pending.to_string(),
                        g.in_flight.to_string(),
                        g.parked.to_string(),
                        g.consumers.len().to_string(),
                        g.lag.to_string(),
                    ]);
                }
                print!("{}", aligned(&rows));
            }
        }
        GroupCommand::Show(a) => {
            let info = block_on(async { Client::connect(&a.connect.server).await?.describe_group(&a.name).await })?;
            print_group(&info, a.connect.json, "");
        }
        GroupCommand::Rm(a) => {
            block_on(async { Client::connect(&a.connect.server).await?.delete_group(&a.name).await })?;
            if a.connect.json {
                println!("{}", serde_json::json!({ "deleted": a.name }));
            } else {
                println!("deleted group {}", a.name);
            }
        }
        GroupCommand::Parked(a) => {
            let page = block_on(async {
                Client::connect(&a.connect.server).await?.list_parked(&a.name, a.offset, a.limit).await
            })?;
            for parked in &page.events {
                let event = parked.event.clone().map(edgebus_types::RecordedEvent::try_from).transpose()?;
                if a.connect.json {
                    let line = serde_json::json!({
                        "event": event.as_ref().map(edgebus_proto::json::event_value),
                        "reason": parked.reason,
                        "attempts": parked.attempts,
                        "consumer": parked.consumer,
                        "parked_at_ms": parked.parked_at_ms,
                    });
                    println!("{line}");
                } else if let Some(event) = event {
                    println!(
                        "{}@{} position={} attempts={} reason: {}",
                        event.stream, event.version, event.position, parked.attempts, parked.reason
                    );
                }
            }
            if !a.connect.json {
                println!("{} parked in all", page.total);
            }
        }
        GroupCommand::ReplayParked(a) => {
            let n = block_on(async { Client::connect(&a.connect.server).await?.replay_parked(&a.name).await })?;
            if a.connect.json {
                println!("{}", serde_json::json!({ "group": a.name, "replaying": n }));
            } else {
                println!("replaying {n} parked events of group {}", a.name);
            }
        }
        GroupCommand::Consume(a) => consume(a)?,
    }
    Ok(())
}

fn print_group(info: &v1::GroupInfo, json: bool, verb: &str) {
    let value = group_json(info);
    if json {
        println!("{value}");
        return;
    }
    println!("{verb}group {}", info.name);
    let filter = &value["filter"];
    let settings = &value["settings"];
    let rows = [
        ["filter".to_owned(), filter.to_string()],
        [
            "settings".to_owned(),
            format!(
                "strategy={} max_in_flight={} message_timeout_ms={} max_retries={} checkpoint_after={} checkpoint_interval_ms={}",
                settings["strategy"].as_str().unwrap_or(""),
                settings["max_in_flight"],
                settings["message_timeout_ms"],
                settings["max_retries"],
                settings["checkpoint_after"],
                settings["checkpoint_interval_ms"]
            ),
        ],
        [
            "progress".to_owned(),
            format!(
                "start={} checkpoint={} read={} lag={}",
                info.start_position, info.checkpoint, info.read_position, info.lag
            ),
        ],
        [
            "events".to_owned(),
            format!(
                "pending={} in_flight={} delivered={} acked={} retried={} skipped={} parked={}",
                info.pending, info.in_flight, info.delivered, info.acked, info.retried, info.skipped, info.parked
            ),
        ],
    ];
    print!("{}", aligned(&rows));
    for c in &info.consumers {
        println!(
            "consumer {}  in_flight={}/{} delivered={} acked={} nacked={}",
            c.name, c.in_flight, c.max_in_flight, c.delivered, c.acked, c.nacked
        );
    }
}

fn consume(args: &ConsumeArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        bail!("--count must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the runtime")?;
    runtime.block_on(async {
        let client = Client::connect(&args.connect.server).await?;
        // With a count, hold no more than will be acked.
        let window = match args.count {
            Some(count) => {
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                if args.max_in_flight == 0 { count.min(1000) } else { args.max_in_flight.min(count) }
            }
            None => args.max_in_flight,
        };
        let mut consumer = client.consume(&args.name, args.consumer.as_deref(), window).await?;
        eprintln!("joined group {} as {} (window {})", args.name, consumer.name(), consumer.window());
        let mut seen = 0u64;
        while args.count.is_none_or(|count| seen < count) {
            let item = tokio::select! {
                item = consumer.next() => item,
                _ = tokio::signal::ctrl_c() => break,
            };
            let Some(item) = item else { break };
            match item? {
                ConsumerItem::Delivery { event, attempt, replayed } => {
                    seen += 1;
                    if args.connect.json {
                        let mut line = edgebus_proto::json::event_value(&event);
                        line["attempt"] = attempt.into();
                        line["replayed"] = replayed.into();
                        println!("{line}");
                    } else {
                        println!(
                            "{}@{} position={} type={} attempt={attempt}{} {}",
                            event.stream,
                            event.version,
                            event.position,
                            event.event_type,
                            if replayed { " replayed" } else { "" },
                            data_text(&event.data)
                        );
                    }
                    let action = match args.settle {
                        SettleArg::Ack => None,
                        SettleArg::Retry => Some(v1::NackAction::Retry),
                        SettleArg::Park => Some(v1::NackAction::Park),
                        SettleArg::Skip => Some(v1::NackAction::Skip),
                    };
                    match action {
                        None => consumer.ack(vec![event.position]).await?,
                        Some(action) => consumer.nack(vec![event.position], action, &args.reason).await?,
                    }
                }
                ConsumerItem::Refused { positions, detail } => {
                    eprintln!("refused {positions:?}: {}", detail.message);
                }
            }
        }
        // Leave only once the node has every ack and nack.
        consumer.close(std::time::Duration::from_secs(5)).await;
        anyhow::Ok(())
    })
}
