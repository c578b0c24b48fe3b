//! The client subcommands: `edgebus publish`, `edgebus read`,
//! `edgebus streams` and `edgebus stats`, thin over `edgebus-client`.
//!
//! Each connects to one node (`--server`, or `EDGEBUS_SERVER`), makes one
//! call and prints the answer: aligned columns for people, or one JSON
//! object per line with `--json` for scripts. A refusal from the node is an
//! error whose message carries the stable code, so the binary prints
//! `error: … (code 1, WRONG_EXPECTED_VERSION)` and exits 1.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use clap::Args;
use edgebus_client::{Client, DEFAULT_SERVER};
use edgebus_server::metrics::NodeStats;
use edgebus_store::{Direction, StreamFrom, StreamInfo};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use serde_json::{Map, Value, json};

/// Events `edgebus read` prints unless told otherwise.
pub const READ_COUNT_DEFAULT: usize = 100;

/// Streams `edgebus streams` lists unless told otherwise.
pub const STREAMS_LIMIT_DEFAULT: usize = 100;

/// Where the node is and how to print: the options every client command shares.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The node's gRPC address.
    #[arg(long, value_name = "ADDR", env = "EDGEBUS_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Print one JSON object per line instead of aligned columns.
    #[arg(long)]
    pub json: bool,
}

/// `edgebus publish STREAM key=value…`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The stream to append to.
    pub stream: StreamName,
    /// The event's data as `key=value` pairs, making a JSON object; values
    /// that read as JSON numbers or booleans keep their type, the others are strings.
    #[arg(value_name = "KEY=VALUE", conflicts_with = "data")]
    pub fields: Vec<String>,
    /// The event's data as a JSON document, instead of `key=value` pairs.
    #[arg(long, value_name = "JSON")]
    pub data: Option<String>,
    /// The event type.
    #[arg(long = "type", value_name = "TYPE", default_value = "Event")]
    pub event_type: EventType,
    /// What the stream's version must be: any, no_stream, stream_exists or a version number.
    #[arg(long, value_name = "EXPECTED", default_value = "any")]
    pub expected_version: ExpectedVersion,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Where `edgebus read` starts: `start`, `end` or a version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FromArg(pub StreamFrom);

impl std::str::FromStr for FromArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "start" => Ok(Self(StreamFrom::Start)),
            "end" => Ok(Self(StreamFrom::End)),
            _ => text
                .parse()
                .map(|version| Self(StreamFrom::Version(version)))
                .map_err(|_| format!("expected \"start\", \"end\" or a version number, got {text:?}")),
        }
    }
}

/// `edgebus read STREAM`.
#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    /// The stream to read (system streams allowed).
    #[arg(value_parser = parse_any_stream)]
    pub stream: StreamName,
    /// Where to start: start, end or a version number [default: start, or
    /// end with --backward].
    #[arg(long, value_name = "FROM")]
    pub from: Option<FromArg>,
    /// At most this many events (the node caps it at its maximum).
    #[arg(long, value_name = "N", default_value_t = READ_COUNT_DEFAULT)]
    pub count: usize,
    /// Read towards the start of the stream.
    #[arg(long)]
    pub backward: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// `edgebus streams`.
#[derive(Debug, Clone, Args)]
pub struct StreamsArgs {
    /// At most this many streams (the node caps it at its maximum).
    #[arg(long, value_name = "N", default_value_t = STREAMS_LIMIT_DEFAULT)]
    pub limit: usize,
    /// Include `$` system streams.
    #[arg(long)]
    pub all: bool,
    /// Only streams whose names sort after this one (the last name of the previous page).
    #[arg(long, value_name = "STREAM")]
    pub after: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// `edgebus stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// A stream name, system streams allowed (for reading and subscribing).
pub(crate) fn parse_any_stream(text: &str) -> Result<StreamName, String> {
    StreamName::system(text).map_err(|e| e.to_string())
}

/// Runs `edgebus publish`.
pub fn publish(args: &PublishArgs) -> anyhow::Result<()> {
    let data = match &args.data {
        Some(text) => {
            let value: Value = serde_json::from_str(text).context("--data is not valid JSON")?;
            serde_json::to_vec(&value)?
        }
        None => serde_json::to_vec(&fields_object(&args.fields)?)?,
    };
    let event = NewEvent {
        id: EventId::from_u128(rand::random()),
        event_type: args.event_type.clone(),
        data,
        metadata: Vec::new(),
        // Not sent: the accepting node stamps its own time.
        timestamp_ms: 0,
    };
    let result = block_on(async {
        let client = Client::connect(&args.connect.server).await?;
        client.append(args.stream.clone(), args.expected_version, vec![event]).await
    })?;
    if args.connect.json {
        let line = json!({
            "stream": args.stream.as_str(),
            "version": result.first_version,
            "position": result.first_position,
            "already_written": result.already_written,
        });
        println!("{line}");
    } else {
        println!("published {}@{} position={}", args.stream, result.first_version, result.first_position);
    }
    Ok(())
}

/// The JSON object that `key=value` pairs describe.
pub fn fields_object(fields: &[String]) -> anyhow::Result<Value> {
    let mut object = Map::new();
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            bail!("{field:?} is not key=value");
        };
        if key.is_empty() {
            bail!("{field:?} has an empty key");
        }
        let value = match serde_json::from_str::<Value>(value) {
            Ok(typed @ (Value::Number(_) | Value::Bool(_))) => typed,
            _ => Value::String(value.to_owned()),
        };
        if object.insert(key.to_owned(), value).is_some() {
            bail!("key {key:?} is given twice");
        }
    }
    Ok(Value::Object(object))
}

/// Runs `edgebus read`.
pub fn read(args: &ReadArgs) -> anyhow::Result<()> {
    let direction = if args.backward { Direction::Backward } else { Direction::Forward };
    let from = args.from.map_or(if args.backward { StreamFrom::End } else { StreamFrom::Start }, |f| f.0);
    let events = block_on(async {
        let client = Client::connect(&args.connect.server).await?;
        client.read_stream(args.stream.clone(), from, direction, args.count).await
    })?;
    if args.connect.json {
        for event in &events {
            println!("{}", edgebus_proto::json::event_value(event));
        }
    } else {
        let rows: Vec<[String; 4]> = events
            .iter()
            .map(|e| [e.version.to_string(), e.position.to_string(), e.event_type.to_string(), data_text(&e.data)])
            .collect();
        print!("{}", aligned(&rows));
    }
    Ok(())
}

/// Runs `edgebus streams`.
pub fn streams(args: &StreamsArgs) -> anyhow::Result<()> {
    let streams = block_on(async {
        let client = Client::connect(&args.connect.server).await?;
        client.list_streams(args.after.clone(), args.limit, args.all).await
    })?;
    if args.connect.json {
        for info in &streams {
            println!("{}", stream_json(info));
        }
    } else {
        let rows: Vec<[String; 3]> = streams
            .iter()
            .map(|s| {
                let version = s.current_version.map_or_else(|| "-".to_owned(), |v| v.to_string());
                let state = if s.tombstoned {
                    "(tombstoned)"
                } else if s.deleted {
                    "(deleted)"
                } else {
                    ""
                };
                [s.stream.to_string(), version, state.to_owned()]
            })
            .collect();
        print!("{}", aligned(&rows));
    }
    Ok(())
}

/// Runs `edgebus stats`: the summary line, then a few aligned figures; with
/// `--json`, the object of the node's `GET /v1/stats`.
pub fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    let response = block_on(async {
        let client = Client::connect(&args.connect.server).await?;
        client.stats().await
    })?;
    let stats = NodeStats::from(response);
    if args.connect.json {
        println!("{}", stats.to_json());
    } else {
        print!("{}", stats_text(&stats));
    }
    Ok(())
}

/// The summary line (the shape every edgebus node and gateway prints), then
/// one aligned figure per line.
fn stats_text(stats: &NodeStats) -> String {
    let mut out = format!(
        "local_queue={} wan_queue={} dropped={} backpressure={}\n",
        stats.local_queue,
        stats.wan_queue,
        stats.dropped,
        stats.backpressure.as_str()
    );
    let rows = [
        ["positions".to_owned(), format!("start={} end={}", stats.start_position, stats.end_position)],
        [
            "appends".to_owned(),
            format!("{} ({} records, {} bytes written)", stats.appends, stats.records, stats.bytes_written),
        ],
        ["fsyncs".to_owned(), format!("{} ({} batches)", stats.fsyncs, stats.batches)],
        ["subscriptions".to_owned(), stats.subscriptions.to_string()],
        [
            "append latency".to_owned(),
            format!("p50={:.2}ms p99={:.2}ms", stats.append_latency_ms_p50, stats.append_latency_ms_p99),
        ],
        ["uptime".to_owned(), format!("{}s", stats.uptime_s)],
    ];
    out.push_str(&aligned(&rows));
    out
}

pub(crate) fn block_on<T>(future: impl Future<Output = Result<T, edgebus_client::ClientError>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the runtime")?;
    Ok(runtime.block_on(future)?)
}

/// Event data for people: compact JSON if it is JSON, else lossy UTF-8.
pub(crate) fn data_text(data: &[u8]) -> String {
    match serde_json::from_slice::<Value>(data) {
        Ok(value) => value.to_string(),
        Err(_) => String::from_utf8_lossy(data).into_owned(),
    }
}

fn stream_json(info: &StreamInfo) -> Value {
    json!({
        "stream": info.stream.as_str(),
        "current_version": info.current_version,
        "first_visible_version": info.first_visible_version,
        "deleted": info.deleted,
        "tombstoned": info.tombstoned,
    })
}

/// Rows as lines, columns padded to their widest cell and separated by two
/// spaces; the last column is not padded and trailing spaces are trimmed.
pub(crate) fn aligned<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        out.push_str(&aligned_line(row, &widths));
        out.push('\n');
    }
    out
}

/// One row as a line without its newline: each cell but the last padded to
/// its column's width and followed by two spaces; trailing spaces trimmed.
pub(crate) fn aligned_line(row: &[String], widths: &[usize]) -> String {
    let mut line = String::new();
    for (i, cell) in row.iter().enumerate() {
        if i + 1 == row.len() {
            line.push_str(cell);
        } else {
            let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
        }
    }
    line.truncate(line.trim_end().len());
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_numbers_and_booleans_typed() {
        let fields = ["temp=71", "site=eu", "ok=true", "ratio=0.5", "empty=", "nothing=null", "eq=a=b"];
        let object = fields_object(&fields.map(str::to_owned)).unwrap();
        assert_eq!(
            object,
            json!({"temp": 71, "site": "eu", "ok": true, "ratio": 0.5, "empty": "", "nothing": "null", "eq": "a=b"})
        );
    }

    #[test]
    fn fields_refuse_missing_equals_empty_keys_and_repeats() {
        assert!(fields_object(&["temp".to_owned()]).is_err());
        assert!(fields_object(&["=1".to_owned()]).is_err());
        assert!(fields_object(&["a=1".to_owned(), "a=2".to_owned()]).is_err());
    }

    #[test]
    fn from_reads_start_end_and_versions() {
        assert_eq!("start".parse::<FromArg>().unwrap().0, StreamFrom::Start);
        assert_eq!("end".parse::<FromArg>().unwrap().0, StreamFrom::End);
        assert_eq!("7".parse::<FromArg>().unwrap().0, StreamFrom::Version(7));
        assert!("-1".parse::<FromArg>().is_err());
    }

    #[test]
    fn data_is_compact_json_or_lossy_text() {
        assert_eq!(data_text(br#"{ "a" : 1 }"#), r#"{"a":1}"#);
        assert_eq!(data_text(b"plain \xff"), "plain \u{fffd}");
    }

    #[test]
    fn stats_open_with_the_summary_line_then_aligned_figures() {
        let stats = NodeStats {
            local_queue: 2,
            end_position: 7,
            appends: 5,
            records: 7,
            fsyncs: 5,
            append_latency_ms_p99: 1.234,
            ..NodeStats::default()
        };
        let text = stats_text(&stats);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "local_queue=2 wan_queue=0 dropped=0 backpressure=healthy");
        assert_eq!(lines[1], "positions       start=0 end=7");
        assert!(lines.contains(&"append latency  p50=0.00ms p99=1.23ms"), "{text}");
        assert!(lines.contains(&"subscriptions   0"), "{text}");
    }

    #[test]
    fn columns_align() {
        let rows =
            [["0".to_owned(), "10".to_owned(), "x".to_owned()], ["100".to_owned(), "2".to_owned(), "".to_owned()]];
        assert_eq!(aligned(&rows), "0    10  x\n100  2\n");
    }
}
