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
    /// After the summary line, one line per route, lane, topic and inbound
    /// site; read from the node's HTTP API (`--http`), which serves the
    /// gateway's figures. With --json: the whole object of `/v1/stats`.
    #[arg(short, long)]
    pub verbose: bool,
    /// The node's HTTP address (used with -v).
    #[arg(long, value_name = "ADDR", env = "EDGEBUS_HTTP", default_value = crate::routes::DEFAULT_HTTP)]
    pub http: String,
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
        id: EventId::generate(),
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
/// `--json`, the object of the node's `GET /v1/stats`. With `-v`, the
/// figures come from `GET /v1/stats` over HTTP (the gRPC `Stats` rpc has no
/// per-route figures) and the route, lane, topic and inbound lines follow
/// the summary line.
pub fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    let stats = if args.verbose {
        crate::routes::expect(crate::routes::request(&args.http, "GET", "/v1/stats", None)?, "reading the stats")?
    } else {
        let response = block_on(async {
            let client = Client::connect(&args.connect.server).await?;
            client.stats().await
        })?;
        NodeStats::from(response).to_json()
    };
    if args.connect.json {
        println!("{stats}");
    } else if args.verbose {
        print!("{}", stats_verbose_text(&stats));
    } else {
        print!("{}", stats_text(&stats));
    }
    Ok(())
}

/// The summary line, the shape every edgebus node and gateway prints:
/// `local_queue=N wan_queue=N dropped=N backpressure=STATE`.
fn summary_line(stats: &Value) -> String {
    let n = |key: &str| stats.get(key).and_then(Value::as_u64).unwrap_or(0);
    let backpressure = stats.get("backpressure").and_then(Value::as_str).unwrap_or("unknown");
    format!(
        "local_queue={} wan_queue={} dropped={} backpressure={backpressure}\n",
        n("local_queue"),
        n("wan_queue"),
        n("dropped")
    )
}

/// The node's own figures, one aligned figure per line.
fn node_figures_text(stats: &Value) -> String {
    let n = |key: &str| stats.get(key).and_then(Value::as_u64).unwrap_or(0);
    let ms = |key: &str| stats.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let rows = [
        ["positions".to_owned(), format!("start={} end={}", n("start_position"), n("end_position"))],
        [
            "appends".to_owned(),
            format!("{} ({} records, {} bytes written)", n("appends"), n("records"), n("bytes_written")),
        ],
        ["fsyncs".to_owned(), format!("{} ({} batches)", n("fsyncs"), n("batches"))],
        [
            "index".to_owned(),
            format!(
                "tail={} tables={} pinned={} cache={}",
                n("index_tail"),
                n("index_tables"),
                crate::route_view::bytes_text(n("index_pinned_bytes")),
                crate::route_view::bytes_text(n("index_cache_bytes"))
            ),
        ],
        ["subscriptions".to_owned(), n("subscriptions").to_string()],
        [
            "append latency".to_owned(),
            format!("p50={:.2}ms p99={:.2}ms", ms("append_latency_ms_p50"), ms("append_latency_ms_p99")),
        ],
        ["uptime".to_owned(), format!("{}s", n("uptime_s"))],
    ];
    aligned(&rows)
}

/// `edgebus stats`: the summary line, then the node's figures. `stats` is
/// the object of `/v1/stats`.
fn stats_text(stats: &Value) -> String {
    summary_line(stats) + &node_figures_text(stats)
}

/// `edgebus stats -v`: the summary line, the gateway's route, lane, topic
/// and inbound lines, then the node's figures.
fn stats_verbose_text(stats: &Value) -> String {
    summary_line(stats) + &crate::route_view::gateway_lines(stats.get("gateway")) + &node_figures_text(stats)
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
            index_tail: 3,
            index_tables: 12,
            index_cache_bytes: 3_174,
            ..NodeStats::default()
        };
        let text = stats_text(&stats.to_json());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "local_queue=2 wan_queue=0 dropped=0 backpressure=healthy");
        assert_eq!(lines[1], "positions       start=0 end=7");
        assert!(lines.contains(&"append latency  p50=0.00ms p99=1.23ms"), "{text}");
        assert!(lines.contains(&"subscriptions   0"), "{text}");
        assert!(lines.contains(&"index           tail=3 tables=12 pinned=0 B cache=3.1 KiB"), "{text}");
    }

    #[test]
    fn verbose_stats_put_the_gateway_between_the_summary_line_and_the_figures() {
        let stats = NodeStats { wan_queue: 3, dropped: 1, end_position: 9, ..NodeStats::default() };
        let mut json = stats.to_json();
        json["backpressure"] = "stalled".into();
        let text = stats_verbose_text(&json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "local_queue=0 wan_queue=3 dropped=1 backpressure=stalled");
        assert_eq!(lines[1], "gateway  none (the node runs no gateway)");
        assert_eq!(lines[2], "positions       start=0 end=9");
        json["gateway"] = json!({
            "site": "eu",
            "routes": [{"route": "to-us", "remote_site": "us", "state": "backoff", "reconnects": 2,
                        "window_events": 0, "window_bytes": 0, "health": "stalled",
                        "stalled_since_ms": 0, "stalled_for_ms": 11_000, "reason": "no link",
                        "reason_text": "no link: connecting or backing off",
                        "lanes": [{"lane": "default", "backlog_positions": 3, "health": "stalled",
                                   "stalled_since_ms": 0, "stalled_for_ms": 11_000, "reason": "no link"}],
                        "topics_counts": {">": {"sent": 4, "sampled_out": 0, "compacted": 0, "dropped": 1}}}],
            "inbound": [],
        });
        let text = stats_verbose_text(&json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "local_queue=0 wan_queue=3 dropped=1 backpressure=stalled");
        assert!(lines[1].starts_with("route  to-us  remote=us  link=backoff  reconnects=2"), "{text}");
        assert!(
            lines[1].ends_with("health=stalled since 1970-01-01T00:00:00Z (11s): no link: connecting or backing off"),
            "{text}"
        );
        assert!(lines[2].starts_with("lane  to-us/default  backlog=3"), "{text}");
        assert!(lines[2].ends_with("health=stalled since 1970-01-01T00:00:00Z (11s): no link"), "{text}");
        assert_eq!(lines[3], "topic  to-us/>  sent=4  sampled=0  compacted=0  dropped=1");
        assert_eq!(lines[4], "positions       start=0 end=9");
    }

    #[test]
    fn columns_align() {
        let rows =
            [["0".to_owned(), "10".to_owned(), "x".to_owned()], ["100".to_owned(), "2".to_owned(), "".to_owned()]];
        assert_eq!(aligned(&rows), "0    10  x\n100  2\n");
    }
}
