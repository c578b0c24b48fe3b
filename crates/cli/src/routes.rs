//! `edgebus routes` and `edgebus policy`: a gateway's routes and topic
//! policies, over the node's HTTP API (`/v1/routes`, `/v1/policies`).
//!
//! The HTTP client here is deliberately tiny: one request per connection
//! (`Connection: close`), a bounded response, JSON bodies.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use edgebus_gateway::def::{LaneDef, PolicyDef, RouteDef};
use serde_json::Value;

use crate::client_cmds::aligned;
use crate::route_view::routes_table;

/// Default HTTP address of a node.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7291";
/// Largest response read.
const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the node's HTTP API is.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// The node's HTTP address.
    #[arg(long, value_name = "ADDR", env = "EDGEBUS_HTTP", default_value = DEFAULT_HTTP, global = true)]
    pub http: String,
    /// Print JSON instead of aligned columns.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `edgebus routes`.
#[derive(Debug, Clone, Args)]
pub struct RoutesArgs {
    #[command(subcommand)]
    command: Option<RoutesCommand>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub http: HttpArgs,
}

#[derive(Debug, Clone, Subcommand)]
enum RoutesCommand {
    /// A table per route and lane: link, health (stalled since when and why), backlog, in flight, credit, ack p99 (the default).
    Ls,
    /// Add a route, or replace the route of the same name; it starts at once.
    Add(AddRoute),
    /// Remove a route (its cursors are kept in the log).
    Rm {
        /// The route's name.
        name: String,
    },
}

#[derive(Debug, Clone, Args)]
struct AddRoute {
    /// The site it replicates to.
    #[arg(long)]
    remote_site: String,
    /// A gateway address of the remote site (`host:port`); repeat for more.
    #[arg(long = "address", required = true)]
    addresses: Vec<String>,
    /// The route's name [default: the remote site's].
    #[arg(long)]
    name: Option<String>,
    /// A topic pattern the route carries; repeat for more [default: `>`].
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// A lane, `NAME` or `NAME:PERMILLE` (its reserved share of the window
    /// in per mille), highest priority first; repeat for more [default: one lane].
    #[arg(long = "lane")]
    lanes: Vec<String>,
}

/// `edgebus policy`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: Option<PolicyCommand>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub http: HttpArgs,
}

#[derive(Debug, Clone, Subcommand)]
enum PolicyCommand {
    /// The policies in order; the first whose pattern matches decides (the default).
    Ls,
    /// Set the policy of a pattern; it applies from its log position on.
    Set {
        /// Stream pattern, e.g. `telemetry.>`.
        pattern: String,
        /// `replicate`, `sample 1/N`, `sample per 500ms`, `compact`,
        /// `compact data.FIELD`, `drop` or `local-only` (quote the words).
        action: String,
        /// The lane it travels in.
        #[arg(long)]
        lane: Option<String>,
        /// A destination site; repeat for more [default: every route].
        #[arg(long = "dest")]
        destinations: Vec<String>,
    },
    /// Remove the policy of a pattern.
    Rm {
        /// The pattern.
        pattern: String,
    },
}

/// One HTTP exchange; answers the status and the body parsed as JSON
/// (`null` for an empty body).
pub(crate) fn request(address: &str, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(address)
        .with_context(|| format!("cannot connect to the node's HTTP API at {address} (is it running? see --http)"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let body = body.map(|b| serde_json::to_vec(b).expect("serializable")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)?;
    let mut raw = Vec::new();
    stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw).context("reading the node's answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("the node's answer has no header end")?;
    let status: u16 =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("the node's answer has no status")?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).context("the node's answer is not JSON")?
    };
    Ok((status, value))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The answer's body, or an error with the node's message.
pub(crate) fn expect(answer: (u16, Value), what: &str) -> anyhow::Result<Value> {
    let (status, body) = answer;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = body.get("message").and_then(Value::as_str).unwrap_or("no message");
    bail!("{what} refused (HTTP {status}): {message}")
}

/// Runs `edgebus routes`.
pub fn routes(args: &RoutesArgs) -> anyhow::Result<()> {
    let http = &args.http.http;
    match args.command.clone().unwrap_or(RoutesCommand::Ls) {
        RoutesCommand::Ls => {
            let (status, body) = request(http, "GET", "/v1/routes", None)?;
            if status == 404 {
                let message = body.get("message").and_then(Value::as_str).unwrap_or("no /v1/routes");
                bail!("the node at {http} has no routes: {message}");
            }
            let body = expect((status, body), "listing routes")?;
            if args.http.json {
                println!("{body}");
            } else {
                print!("{}", routes_table(&body));
            }
        }
        RoutesCommand::Add(add) => {
            let lanes = add.lanes.iter().map(|l| lane_def(l)).collect::<anyhow::Result<Vec<_>>>()?;
            let def = RouteDef {
                name: add.name.unwrap_or_default(),
                remote_site: add.remote_site,
                addresses: add.addresses,
                topics: add.topics,
                lanes,
                window_min_events: None,
                window_max_events: None,
                window_min_bytes: None,
                window_max_bytes: None,
            };
            let body = serde_json::to_value(&def)?;
            let answer = expect(request(http, "POST", "/v1/routes", Some(&body))?, "adding the route")?;
            println!("route {} added", answer.get("route").and_then(Value::as_str).unwrap_or("?"));
        }
        RoutesCommand::Rm { name } => {
            expect(request(http, "DELETE", &format!("/v1/routes/{name}"), None)?, "removing the route")?;
            println!("route {name} removed");
        }
    }
    Ok(())
}

fn lane_def(text: &str) -> anyhow::Result<LaneDef> {
    let (name, permille) = match text.split_once(':') {
        Some((name, permille)) => (
            name,
            permille
                .parse::<u32>()
                .with_context(|| format!("lane {text:?}: {permille:?} is not a per mille number"))?,
        ),
        None => (text, 0),
    };
    Ok(LaneDef { name: name.to_owned(), reserved_permille: permille, cap_events: None, cap_bytes: None })
}

/// Runs `edgebus policy`.
pub fn policy(args: &PolicyArgs) -> anyhow::Result<()> {
    let http = &args.http.http;
    match args.command.clone().unwrap_or(PolicyCommand::Ls) {
        PolicyCommand::Ls => {
            let body = expect(request(http, "GET", "/v1/policies", None)?, "listing policies")?;
            if args.http.json {
                println!("{body}");
                return Ok(());
            }
            let mut rows = vec![["PATTERN", "ACTION", "LANE", "DESTINATIONS"].map(str::to_owned)];
            let empty = Vec::new();
            for p in body.get("policies").and_then(Value::as_array).unwrap_or(&empty) {
                let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                let destinations = p
                    .get("destinations")
                    .and_then(Value::as_array)
                    .map(|d| d.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                    .unwrap_or_default();
                rows.push([
                    s("pattern"),
                    s("action"),
                    s("lane"),
                    if destinations.is_empty() { "all".into() } else { destinations },
                ]);
            }
            print!("{}", aligned(&rows));
        }
        PolicyCommand::Set { pattern, action, lane, destinations } => {
            let def = PolicyDef { pattern: pattern.clone(), action, lane, destinations };
            // Checked here too, so a typo is named before anything is sent.
            def.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let body = serde_json::to_value(&def)?;
            expect(request(http, "POST", "/v1/policies", Some(&body))?, "setting the policy")?;
            println!("policy for {pattern} set");
        }
        PolicyCommand::Rm { pattern } => {
            let query: String =
                form_urlencoded::Serializer::new(String::new()).append_pair("pattern", &pattern).finish();
            expect(request(http, "DELETE", &format!("/v1/policies?{query}"), None)?, "removing the policy")?;
            println!("policy for {pattern} removed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_parse_with_their_share() {
        assert_eq!(lane_def("critical:250").unwrap().reserved_permille, 250);
        assert_eq!(lane_def("bulk").unwrap().reserved_permille, 0);
        assert!(lane_def("bulk:lots").unwrap_err().to_string().contains("per mille"));
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "hello world");
    }
}
