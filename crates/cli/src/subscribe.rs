//! `edgebus subscribe`: follow a node's events as they are written, thin
//! over [`Client::subscribe`].
//!
//! The command catches up on the matching events from where it starts, says
//! when it has caught up, then prints live events until it is told to stop:
//! `--count N` events, Ctrl-C or SIGTERM (all exit 0), or the node ending the
//! subscription (exit 1 with the node's message). Events are printed as
//! `edgebus read` prints them: an aligned line for people, or with `--json`
//! exactly the object `read --json` prints, one per line, with the markers
//! `{"caught_up":N}` and `{"checkpoint":N}` on lines of their own. Every
//! line is flushed as it is written, so the command can feed a pipe; a pipe
//! closed by its reader (`| head -1`) ends it quietly with exit 0, at once
//! rather than at the next event.
//!
//! The rendering is [`Render`], pure state without I/O; [`run`] owns the
//! connection, the signals, the progress timer and the writes. Signals and a
//! closed stdout are watched around everything else, so that they end the
//! command even while it connects or while a write waits for a slow reader.

use std::io::{ErrorKind, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::fs::FileTypeExt as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use edgebus_client::{
    CREDIT_WINDOW_DEFAULT, Client, Credit, StreamSelector, SubscribeFrom, SubscriptionFilter, SubscriptionItem,
};
use edgebus_types::{EventType, RecordedEvent, StreamName, StreamPattern};
use serde_json::json;
use tokio::io::Interest;
use tokio::signal::unix::{SignalKind, signal};

use crate::client_cmds::{ConnectArgs, aligned_line, data_text, parse_any_stream};

/// How often a progress line is printed while a long catch-up goes on.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The end of `edgebus subscribe --help`: the output and the exits.
const SUBSCRIBE_AFTER_LONG_HELP: &str = "\
Output: one line per event, `POSITION  STREAM@VERSION  TYPE  DATA`; on stderr
`-- caught up at position N (live from here)` once the backlog is delivered,
and `catching up: ...` every second while a long backlog is delivered.
With --json, each event is the object `edgebus read --json` prints, one per
line, and the markers are lines of their own: {\"caught_up\":N} once, and
{\"checkpoint\":N} when the node reports progress over skipped events
(N: the first log position not yet delivered or skipped, a resume point for
--from).

Exits 0 after --count events, on Ctrl-C or SIGTERM, or when stdout is
closed; exits 1 with the node's message when the node ends the subscription
(it is shutting down) or refuses it (a --where that does not compile).";

/// `edgebus subscribe [STREAM | --pattern P]`.
///
/// `--version` is the stream version to start at here, so the command has
/// no `--version` flag of its own (`edgebus --version` prints the version).
#[derive(Debug, Clone, Args)]
#[command(after_long_help = SUBSCRIBE_AFTER_LONG_HELP, disable_version_flag = true)]
pub struct SubscribeArgs {
    /// The one stream to follow (system streams allowed); with neither it
    /// nor --pattern, every stream.
    #[arg(value_parser = parse_any_stream, conflicts_with = "pattern")]
    pub stream: Option<StreamName>,
    /// Follow the streams matching this pattern: `*` is one token, `>` the
    /// remaining ones (`orders.*`, `sensor.>`).
    #[arg(long, value_name = "PATTERN")]
    pub pattern: Option<StreamPattern>,
    /// Only events of this type; repeat for several (any of them).
    #[arg(long = "type", value_name = "TYPE")]
    pub event_types: Vec<EventType>,
    /// Only events for which this CEL expression is true, e.g.
    /// 'data.temp > 70 && type == "reading"'. It sees data (the payload as
    /// JSON), stream, type, version and position; the node compiles it.
    #[arg(long = "where", value_name = "CEL")]
    pub predicate: Option<String>,
    /// Where to start: start (the first event), end (only events written
    /// from now on) or a log position, inclusive [default: end].
    #[arg(long, value_name = "FROM", conflicts_with = "version")]
    pub from: Option<FromPosition>,
    /// Start at this version of STREAM, inclusive (instead of --from).
    #[arg(long, value_name = "N", requires = "stream", conflicts_with = "pattern")]
    pub version: Option<u64>,
    /// Include `$` system streams (implied when STREAM or --pattern names one).
    #[arg(long)]
    pub include_system: bool,
    /// Exit 0 after this many events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Where `edgebus subscribe --from` starts: `start`, `end` or a log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FromPosition(pub SubscribeFrom);

impl std::str::FromStr for FromPosition {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "start" => Ok(Self(SubscribeFrom::Beginning)),
            "end" => Ok(Self(SubscribeFrom::End)),
            _ => text
                .parse()
                .map(|position| Self(SubscribeFrom::Position(position)))
                .map_err(|_| format!("expected \"start\", \"end\" or a log position, got {text:?}")),
        }
    }
}

impl SubscribeArgs {
    /// What the node is asked to deliver.
    pub fn filter(&self) -> SubscriptionFilter {
        let (streams, names_system) = match (&self.stream, &self.pattern) {
            (Some(stream), _) => (StreamSelector::Stream(stream.clone()), stream.is_system()),
            (None, Some(pattern)) => (StreamSelector::Pattern(pattern.clone()), pattern.as_str().starts_with('$')),
            (None, None) => (StreamSelector::All, false),
        };
        SubscriptionFilter {
            streams,
            event_types: self.event_types.clone(),
            predicate: self.predicate.clone(),
            // Asking for a system stream by name and getting nothing for
            // want of a second flag would be a trap.
            include_system: self.include_system || names_system,
        }
    }

    /// Where the subscription starts.
    pub fn start(&self) -> SubscribeFrom {
        match (self.version, self.from) {
            (Some(version), _) => SubscribeFrom::StreamVersion(version),
            (None, Some(from)) => from.0,
            (None, None) => SubscribeFrom::End,
        }
    }
}

/// A line to write, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// Data: an event, or a marker with `--json`.
    Out(String),
    /// For the person watching: caught up, progress.
    Err(String),
}

/// What `edgebus subscribe` prints for each item: the lines and the
/// progress figures, without I/O.
#[derive(Debug, Clone, Default)]
pub struct Render {
    json: bool,
    /// Widths of the human columns so far; they only grow, so lines stay
    /// aligned unless a later cell is wider than every earlier one.
    widths: [usize; 4],
    /// Events delivered so far.
    events: u64,
    /// The first log position not yet delivered or skipped, once known.
    position: Option<u64>,
    /// One past the node's last position when the command started, if known.
    end_position: Option<u64>,
    caught_up: bool,
}

impl Render {
    /// A rendering for people, or NDJSON with `json`; `end_position` is the
    /// node's log end at the start, for the progress line.
    pub fn new(json: bool, end_position: Option<u64>) -> Self {
        Self { json, end_position, ..Self::default() }
    }

    /// The line for `item`, if it has one.
    pub fn item(&mut self, item: &SubscriptionItem) -> Option<Line> {
        match item {
            SubscriptionItem::Event(event) => {
                self.events += 1;
                self.position = Some(event.position + 1);
                Some(Line::Out(self.event_line(event)))
            }
            SubscriptionItem::CaughtUp { position } => {
                self.position = Some(*position);
                self.caught_up = true;
                Some(if self.json {
                    Line::Out(json!({ "caught_up": position }).to_string())
                } else {
                    Line::Err(format!("-- caught up at position {position} (live from here)"))
                })
            }
            SubscriptionItem::Checkpoint { position } => {
                self.position = Some(*position);
                self.json.then(|| Line::Out(json!({ "checkpoint": position }).to_string()))
            }
        }
    }

    /// Whether progress lines are due: for people, while catching up (with
    /// `--json` the reader has the markers).
    pub fn shows_progress(&self) -> bool {
        !self.json && !self.caught_up
    }

    /// The progress line while catching up, for people; `None` once caught
    /// up or with `--json`.
    pub fn progress(&self) -> Option<String> {
        if !self.shows_progress() {
            return None;
        }
        let mut line = format!("catching up: {} events", self.events);
        match (self.position, self.end_position) {
            (Some(position), Some(end)) => line.push_str(&format!(", position {position} of {}", end.max(position))),
            (Some(position), None) => line.push_str(&format!(", position {position}")),
            (None, _) => {}
        }
        Some(line)
    }

    fn event_line(&mut self, event: &RecordedEvent) -> String {
        if self.json {
            return edgebus_proto::json::event_value(event).to_string();
        }
        let row = [
            event.position.to_string(),
            format!("{}@{}", event.stream, event.version),
            event.event_type.to_string(),
            data_text(&event.data),
        ];
        for (width, cell) in self.widths.iter_mut().zip(&row) {
            *width = (*width).max(cell.chars().count());
        }
        aligned_line(&row, &self.widths)
    }
}

/// Runs `edgebus subscribe` until `--count` events, a signal, a closed
/// stdout or the end of the subscription.
pub fn run(args: &SubscribeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the runtime")?;
    let result = runtime.block_on(async {
        // Installed before anything else, so that a signal at any moment
        // from here on, even while connecting, ends the command with 0
        // rather than the default death.
        let mut interrupt = signal(SignalKind::interrupt()).context("install a SIGINT handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("install a SIGTERM handler")?;
        let stdout_watch = StdoutWatch::new();
        tokio::select! {
            result = follow(args) => result,
            _ = interrupt.recv() => Ok(()),
            _ = terminate.recv() => Ok(()),
            () = stdout_watch.closed() => Ok(()),
        }
    });
    // A write still blocked on a reader that stopped reading (the command
    // was told to stop meanwhile) must not keep the process alive.
    runtime.shutdown_background();
    result
}

/// Subscribes and prints until `--count` events, a closed stdout or the end
/// of the subscription; [`run`] ends it early on a signal.
async fn follow(args: &SubscribeArgs) -> anyhow::Result<()> {
    let client = Client::connect(&args.connect.server).await?;
    let start = args.start();
    // The log's end, only for the progress line of a catch-up: one cheap
    // call, and the line makes do without it if the call fails.
    let end_position = if args.connect.json || start == SubscribeFrom::End {
        None
    } else {
        client.stats().await.ok().map(|stats| stats.end_position)
    };
    let window = args.count.map_or(CREDIT_WINDOW_DEFAULT, |count| count.min(CREDIT_WINDOW_DEFAULT));
    let mut subscription = client.subscribe(args.filter(), start, Credit::Window(window)).await?;

    let mut render = Render::new(args.connect.json, end_position);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events_left = args.count;
    loop {
        // `next` is kept across ticks rather than dropped and made again:
        // it may have taken an event off the wire when a tick fires.
        let item = {
            let next = subscription.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    item = &mut next => break item,
                    // No wakeups once live: progress is for the catch-up only.
                    _ = ticks.tick(), if render.shows_progress() => {
                        if let Some(line) = render.progress() {
                            write_stderr(&line);
                        }
                    }
                }
            }
        };
        let item = match item {
            Some(Ok(item)) => item,
            Some(Err(error)) => return Err(anyhow::Error::new(error).context("the node ended the subscription")),
            None => bail!("the node ended the subscription"),
        };
        match render.item(&item) {
            Some(Line::Out(line)) => match write_line(line).await {
                Ok(()) => {}
                // The reader is gone (`| head -1`): nobody wants more.
                Err(error) if error.kind() == ErrorKind::BrokenPipe => return Ok(()),
                Err(error) => return Err(error).context("write to stdout"),
            },
            Some(Line::Err(line)) => write_stderr(&line),
            None => {}
        }
        if let (SubscriptionItem::Event(_), Some(left)) = (&item, &mut events_left) {
            *left -= 1;
            if *left == 0 {
                return Ok(());
            }
        }
    }
}

/// Notices that stdout's reader has gone while nothing is being written:
/// `edgebus subscribe | head -1` must end when `head` does, not at the next
/// event, which may never come. When stdout is a pipe, a duplicate of it is
/// registered with the runtime only to learn of the error readiness a pipe
/// reports once its reader has closed; nothing is written through it, so
/// stdout keeps its blocking mode. Any other stdout is not watched: a file
/// never closes, and a closed socket or terminal fails the next write.
#[derive(Debug)]
struct StdoutWatch(Option<tokio::net::unix::pipe::Sender>);

impl StdoutWatch {
    fn new() -> Self {
        let pipe = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(std::fs::File::from)
            .filter(|file| file.metadata().is_ok_and(|metadata| metadata.file_type().is_fifo()))
            .and_then(|file| tokio::net::unix::pipe::Sender::from_file_unchecked(file).ok());
        Self(pipe)
    }

    /// Resolves once stdout's reader is gone; never if it cannot tell.
    async fn closed(&self) {
        if let Some(pipe) = &self.0
            && pipe.ready(Interest::ERROR).await.is_ok_and(|ready| ready.is_error())
        {
            return;
        }
        std::future::pending::<()>().await;
    }
}

/// One line on stdout, flushed at once for whoever reads the pipe. Written
/// on the runtime's blocking pool, so that a reader that stops reading blocks
/// neither the signals nor the watch on stdout.
async fn write_line(line: String) -> std::io::Result<()> {
    let write = tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()
    });
    write.await.map_err(std::io::Error::other)?
}

/// One line on stderr; a closed stderr is no reason to stop following.
fn write_stderr(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use edgebus_types::EventId;

    use super::*;

    fn event(stream: &str, version: u64, position: u64, data: &str) -> RecordedEvent {
        RecordedEvent {
            stream: StreamName::new(stream).unwrap(),
            version,
            position,
            id: EventId::from_u128(7),
            event_type: EventType::new("placed").unwrap(),
            data: data.as_bytes().to_vec(),
            metadata: Vec::new(),
            timestamp_ms: 1,
            origin: None,
        }
    }

    fn out(line: Option<Line>) -> String {
        match line {
            Some(Line::Out(text)) => text,
            other => panic!("expected a stdout line, got {other:?}"),
        }
    }

    fn parse(args: &[&str]) -> Result<SubscribeArgs, clap::Error> {
        use clap::Parser as _;
        let cli = crate::Cli::try_parse_from(["edgebus", "subscribe"].iter().chain(args))?;
        match cli.command {
            crate::Command::Subscribe(args) => Ok(args),
            other => panic!("expected subscribe, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_every_stream_from_the_end() {
        let args = parse(&[]).unwrap();
        assert_eq!(
            args.filter(),
            SubscriptionFilter {
                streams: StreamSelector::All,
                event_types: Vec::new(),
                predicate: None,
                include_system: false,
            }
        );
        assert_eq!(args.start(), SubscribeFrom::End);
        assert_eq!((args.count, args.connect.json), (None, false));
    }

    #[test]
    fn every_flag_reaches_the_filter_and_the_start() {
        let args = parse(&[
            "orders.1",
            "--type",
            "placed",
            "--type",
            "paid",
            "--where",
            "data.n > 1",
            "--version",
            "4",
            "--count",
            "3",
            "--json",
        ])
        .unwrap();
        let filter = args.filter();
        assert_eq!(filter.streams, StreamSelector::Stream(StreamName::new("orders.1").unwrap()));
        assert_eq!(filter.event_types, [EventType::new("placed").unwrap(), EventType::new("paid").unwrap()]);
        assert_eq!(filter.predicate.as_deref(), Some("data.n > 1"));
        assert_eq!(args.start(), SubscribeFrom::StreamVersion(4));
        assert_eq!((args.count, args.connect.json), (Some(3), true));

        let args = parse(&["--pattern", "orders.*", "--from", "17"]).unwrap();
        assert_eq!(args.filter().streams, StreamSelector::Pattern(StreamPattern::new("orders.*").unwrap()));
        assert_eq!(args.start(), SubscribeFrom::Position(17));
    }

    #[test]
    fn naming_a_system_stream_includes_system_streams() {
        assert!(parse(&["$sys.streams"]).unwrap().filter().include_system);
        assert!(parse(&["--pattern", "$snapshots.>"]).unwrap().filter().include_system);
        assert!(!parse(&["--pattern", ">"]).unwrap().filter().include_system);
        assert!(parse(&["--include-system"]).unwrap().filter().include_system);
    }

    #[test]
    fn contradictions_and_bad_names_are_usage_errors_naming_the_argument() {
        let usage = |args: &[&str]| {
            let error = parse(args).expect_err("refused");
            assert_eq!(error.exit_code(), 2, "{error}");
            error.to_string()
        };
        assert!(usage(&["orders.1", "--pattern", "orders.*"]).contains("--pattern"));
        assert!(usage(&["--version", "3"]).contains("STREAM"));
        assert!(usage(&["--pattern", "orders.*", "--version", "3"]).contains("--version"));
        assert!(usage(&["orders.1", "--version", "3", "--from", "start"]).contains("--from"));
        assert!(usage(&["--count", "0"]).contains("--count"));
        let message = usage(&["--pattern", "orders..x"]);
        assert!(message.contains("--pattern") && message.contains("empty token"), "{message}");
        let message = usage(&["orders.*"]);
        assert!(message.contains("[STREAM]") && message.contains("orders.*"), "{message}");
        assert!(usage(&["--from", "later"]).contains("--from"));
    }

    #[test]
    fn from_reads_start_end_and_positions() {
        assert_eq!("start".parse::<FromPosition>().unwrap().0, SubscribeFrom::Beginning);
        assert_eq!("end".parse::<FromPosition>().unwrap().0, SubscribeFrom::End);
        assert_eq!("42".parse::<FromPosition>().unwrap().0, SubscribeFrom::Position(42));
        assert!("-1".parse::<FromPosition>().is_err());
    }

    #[test]
    fn human_lines_align_as_they_go_and_markers_go_to_stderr() {
        let mut render = Render::new(false, Some(1000));
        let first = out(render.item(&SubscriptionItem::Event(event("orders.1", 0, 5, r#"{ "n" : 1 }"#))));
        assert_eq!(first, r#"5  orders.1@0  placed  {"n":1}"#);
        let second = out(render.item(&SubscriptionItem::Event(event("o.2", 12, 900, "x"))));
        assert_eq!(second, "900  o.2@12      placed  x");
        assert_eq!(render.item(&SubscriptionItem::Checkpoint { position: 950 }), None);
        assert_eq!(render.progress().as_deref(), Some("catching up: 2 events, position 950 of 1000"));
        assert_eq!(
            render.item(&SubscriptionItem::CaughtUp { position: 960 }),
            Some(Line::Err("-- caught up at position 960 (live from here)".to_owned()))
        );
        assert_eq!(render.progress(), None);
    }

    #[test]
    fn progress_makes_do_without_the_end_or_a_position() {
        let mut render = Render::new(false, None);
        assert_eq!(render.progress().as_deref(), Some("catching up: 0 events"));
        render.item(&SubscriptionItem::Event(event("a", 0, 3, "1")));
        assert_eq!(render.progress().as_deref(), Some("catching up: 1 events, position 4"));
        // Events written since the start carry the position past the end seen then.
        let mut render = Render::new(false, Some(2));
        render.item(&SubscriptionItem::Checkpoint { position: 9 });
        assert_eq!(render.progress().as_deref(), Some("catching up: 0 events, position 9 of 9"));
    }

    #[test]
    fn json_lines_are_the_events_of_read_and_the_markers() {
        let mut render = Render::new(true, None);
        let recorded = event("orders.1", 3, 8, r#"{"n":2}"#);
        let line = out(render.item(&SubscriptionItem::Event(recorded.clone())));
        assert_eq!(line, edgebus_proto::json::event_value(&recorded).to_string());
        assert_eq!(out(render.item(&SubscriptionItem::Checkpoint { position: 10 })), r#"{"checkpoint":10}"#);
        assert_eq!(out(render.item(&SubscriptionItem::CaughtUp { position: 11 })), r#"{"caught_up":11}"#);
        assert_eq!(render.progress(), None);
    }
}
