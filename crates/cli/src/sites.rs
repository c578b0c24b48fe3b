//! Sites on loopback for `edgebus demo` and `edgebus bench wan`: nodes
//! (`edgebus serve`) and gateway processes (`edgebus gateway`) started as
//! children of this executable, each killed when its guard is dropped; the
//! node's JSON HTTP API; the lease holder; subscriptions that hand each
//! event to a callback with its arrival instant; whole-stream reads.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use edgebus_client::{Client, Credit, SubscriptionItem};
use edgebus_proto::convert::{StreamSelector, SubscribeFrom, SubscriptionFilter};
use edgebus_store::{Direction, StreamFrom};
use edgebus_types::{EventId, EventType, NewEvent, RecordedEvent, StreamName, StreamPattern};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub(crate) use crate::bench::node::peers::ChildGuard;

/// Events asked for per read when reading a whole stream: 1 KiB events
/// stay well within the client's 4 MiB message limit.
const READ_PAGE_EVENTS: usize = 1024;
/// How long one HTTP exchange with a node or gateway may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new subscription may take to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Credit window of a subscription.
const SUBSCRIPTION_WINDOW_EVENTS: u64 = 8192;

/// A node process: its guard and addresses.
pub(crate) struct Node {
    pub(crate) guard: ChildGuard,
    pub(crate) grpc: SocketAddr,
    pub(crate) http: SocketAddr,
    /// The WAN listener of its gateway, if it runs one.
    pub(crate) wan: Option<SocketAddr>,
}

/// Starts `edgebus serve --site SITE [--gateway]` on `data_dir` (everything
/// on 127.0.0.1:0, default settings: `fsync=always`) and reads its ready
/// line. `EDGEBUS_*` variables of this process are not passed on.
pub(crate) async fn start_node(site: &'static str, data_dir: &Path, gateway: bool) -> anyhow::Result<Node> {
    let mut command = own_command()?;
    command.args(["serve", "--site", site, "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
    if gateway {
        command.args(["--gateway", "--wan-listen", "127.0.0.1:0"]);
    }
    command.arg("--data-dir").arg(data_dir);
    let (guard, (grpc, http, wan)) = tokio::task::spawn_blocking(move || {
        ChildGuard::spawn_until("edgebus serve", command, |line| {
            let rest = line.strip_prefix("edgebus ready ")?;
            Some((ready_field(rest, "grpc=")?, ready_field(rest, "http=")?, ready_field(rest, "wan=")))
        })
    })
    .await
    .context("the start task failed")??;
    Ok(Node { guard, grpc, http, wan })
}

/// A gateway process (`edgebus gateway`); `guard` is `None` once killed.
pub(crate) struct Gateway {
    pub(crate) name: &'static str,
    pub(crate) guard: Option<ChildGuard>,
    /// Its HTTP API (`/v1/stats`, `/v1/routes`, `/metrics`), from its ready line.
    pub(crate) http: Option<SocketAddr>,
}

/// Starts `edgebus gateway --name NAME --site SITE --node NODE` with the
/// `[gateway]` table of `config` (routes, policies, lease), both listeners
/// on 127.0.0.1:0, and reads its ready line.
pub(crate) async fn start_gateway(
    name: &'static str,
    site: &str,
    node: SocketAddr,
    config: &Path,
) -> anyhow::Result<Gateway> {
    let mut command = own_command()?;
    command
        .args(["gateway", "--name", name, "--site", site, "--node", &node.to_string()])
        .args(["--wan-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--config"])
        .arg(config);
    let (guard, http) = tokio::task::spawn_blocking(move || {
        ChildGuard::spawn_until("edgebus gateway", command, |line| {
            let rest = line.strip_prefix("edgebus gateway ready ")?;
            Some(ready_field(rest, "http="))
        })
    })
    .await
    .context("the start task failed")??;
    Ok(Gateway { name, guard: Some(guard), http })
}

/// This executable, without the `EDGEBUS_*` variables of this process, so
/// that only the settings given apply.
fn own_command() -> anyhow::Result<std::process::Command> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut command = std::process::Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBUS_") {
            command.env_remove(name);
        }
    }
    Ok(command)
}

/// The address after `key` (`grpc=`) in a ready line's fields.
fn ready_field(fields: &str, key: &str) -> Option<SocketAddr> {
    fields.split_whitespace().find_map(|w| w.strip_prefix(key))?.parse().ok()
}

/// One HTTP/1.1 request to a node's or gateway's HTTP API; the JSON answer,
/// or an error with the status and body when it is not a success.
pub(crate) async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .with_context(|| format!("{method} {path}: no answer within {HTTP_TIMEOUT:?}"))??;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response without a header end")?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    anyhow::ensure!((200..300).contains(&status), "{method} {path}: HTTP {status}: {body}");
    if body.trim().is_empty() {
        Ok(Value::Null)
    } else {
        serde_json::from_str(&body).context("a response that is not JSON")
    }
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The lease holder (`GET /v1/gateways` of the site's node): its name and
/// the HTTP address it announced, if any gateway holds the lease.
pub(crate) async fn holder(node_http: SocketAddr) -> anyhow::Result<Option<(String, Option<SocketAddr>)>> {
    let body = http(node_http, "GET", "/v1/gateways", None).await?;
    let holder = &body["lease"]["holder"];
    Ok(holder["gateway"].as_str().map(|name| (name.to_owned(), holder["http"].as_str().and_then(|a| a.parse().ok()))))
}

/// Whether `name` said it is alive lately and is not the holder.
pub(crate) async fn standing_by(node_http: SocketAddr, name: &str) -> anyhow::Result<bool> {
    let body = http(node_http, "GET", "/v1/gateways", None).await?;
    let listed = body["gateways"].as_array().cloned().unwrap_or_default();
    Ok(listed.iter().any(|g| g["gateway"] == name && g["role"] == "standby" && g["alive"] == true))
}

/// Polls `check` every 5 ms until it holds, or fails after `limit`.
pub(crate) async fn await_condition<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A new event with a fresh time-ordered id, stamped by the node.
pub(crate) fn event(data: Vec<u8>, event_type: &str) -> NewEvent {
    NewEvent {
        id: EventId::generate(),
        event_type: EventType::new(event_type).expect("a valid type"),
        data,
        metadata: Vec::new(),
        timestamp_ms: 0,
    }
}

/// A subscription to `pattern` at `client`'s node from `from`; returns
/// once the node said it is caught up, with the task that feeds `on_event`
/// each event and its arrival instant.
pub(crate) async fn subscribe(
    client: &Client,
    pattern: &str,
    from: SubscribeFrom,
    mut on_event: impl FnMut(Instant, &RecordedEvent) + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let filter = SubscriptionFilter {
        streams: StreamSelector::Pattern(StreamPattern::new(pattern).expect("a valid pattern")),
        event_types: Vec::new(),
        predicate: None,
        include_system: false,
    };
    let mut subscription = client.subscribe(filter, from, Credit::Window(SUBSCRIPTION_WINDOW_EVENTS)).await?;
    let (caught_up_tx, caught_up) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut caught_up_tx = Some(caught_up_tx);
        while let Some(Ok(item)) = subscription.next().await {
            match item {
                SubscriptionItem::Event(event) => on_event(Instant::now(), &event),
                SubscriptionItem::CaughtUp { .. } => {
                    if let Some(tx) = caught_up_tx.take() {
                        let _ = tx.send(());
                    }
                }
                SubscriptionItem::Checkpoint { .. } => {}
            }
        }
    });
    tokio::time::timeout(CATCH_UP_TIMEOUT, caught_up)
        .await
        .with_context(|| format!("the subscription did not catch up within {CATCH_UP_TIMEOUT:?}"))?
        .context("the subscription ended before it caught up")?;
    Ok(task)
}

/// What `keep` makes of every event of `stream`, read from its start (an
/// empty list for a stream the node does not have).
pub(crate) async fn read_all<T>(
    client: &Client,
    stream: &StreamName,
    mut keep: impl FnMut(RecordedEvent) -> T,
) -> anyhow::Result<Vec<T>> {
    let mut kept = Vec::new();
    let mut from = 0u64;
    loop {
        let events = match client
            .read_stream(stream.clone(), StreamFrom::Version(from), Direction::Forward, READ_PAGE_EVENTS)
            .await
        {
            Ok(events) => events,
            Err(e) if e.to_string().contains("not found") => return Ok(kept),
            Err(e) => return Err(e).with_context(|| format!("cannot read {stream}")),
        };
        let Some(last) = events.last() else { return Ok(kept) };
        from = last.version + 1;
        let page = events.len();
        kept.extend(events.into_iter().map(&mut keep));
        if page < READ_PAGE_EVENTS {
            return Ok(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"), "{\"a\":1}");
    }

    #[test]
    fn ready_lines_give_their_addresses() {
        let rest = "grpc=127.0.0.1:7290 http=127.0.0.1:7291 data=/tmp/x";
        assert_eq!(ready_field(rest, "http="), Some("127.0.0.1:7291".parse().unwrap()));
        assert_eq!(ready_field(rest, "wan="), None);
    }
}
