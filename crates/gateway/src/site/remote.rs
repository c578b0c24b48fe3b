//! [`RemoteSite`]: the site of a gateway running as its own process
//! (`edgebus gateway`), reached over the node's `edgebus.v1.Site` gRPC
//! service; and the wire form of what only the gateway's types say (the
//! per-write answers of `Replicate`, a [`SiteError`] as a status), which
//! the node's side of the service uses too.
//!
//! Lifecycle: [`RemoteSite::connect`] opens the channel and the `WatchEnd`
//! stream and waits for the first end position, so a node that cannot be
//! reached (or does not serve the service) fails the connect. A background
//! task then holds the `WatchEnd` stream and feeds [`Site::end`]; when the
//! stream breaks it reconnects with backoff (100 ms doubling to 5 s, with
//! jitter). The task ends when the `RemoteSite` is dropped or
//! [`RemoteSite::stop`] is called. Calls share the channel, which
//! reconnects by itself; each is bounded by the connect timeout.

use std::fmt;
use std::time::Duration;

use edgebus_proto::convert::{self, ReadStreamArgs, SiteAppendArgs};
use edgebus_proto::v1;
use edgebus_proto::v1::site_client::SiteClient;
use edgebus_store::{AppendResult, Direction, ExistsOrWrite, ReplicaWrite, StreamFrom};
use edgebus_types::limits::{SITE_REPLICATE_CALL_BYTES_MAX, SITE_REPLICATE_WRITES_MAX};
use edgebus_types::{ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use prost::Message as _;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::{Fence, ReplicaAnswer, ReplicaRefusal, Site, SiteError, SiteFuture};

/// Largest message a remote site's calls send or accept: the node's gRPC
/// limit (`edgebus_server::node::GRPC_MESSAGE_BYTES_MAX`).
pub const SITE_MESSAGE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// First pause before the end watch reconnects.
pub const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between reconnections of the end watch.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A site reached over gRPC; see the module docs.
pub struct RemoteSite {
    address: String,
    client: SiteClient<Channel>,
    timeout: Duration,
    end: watch::Receiver<u64>,
    /// Dropping it (with the site) or sending `true` ends the watch task.
    stop: watch::Sender<bool>,
}

impl fmt::Debug for RemoteSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSite")
            .field("address", &self.address)
            .field("end", &*self.end.borrow())
            .finish_non_exhaustive()
    }
}

/// What a failed call was, for the error it becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// A read: any failure is the site's (as in process).
    Read,
    /// A write: a refusal of the request itself is [`SiteError::Refused`].
    Write,
}

impl RemoteSite {
    /// Connects to the node at `address` (`host:port`, or a URI) within
    /// `timeout`, which also bounds every later call.
    pub async fn connect(address: &str, timeout: Duration) -> Result<Self, SiteError> {
        let address = address.strip_prefix("http://").unwrap_or(address).to_owned();
        let unreachable =
            |why: String| SiteError::Unavailable(format!("cannot reach the site node at {address}: {why}"));
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| SiteError::Refused(format!("{address} is not a node address such as 127.0.0.1:7290: {e}")))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(unreachable(transport_error_text(&e))),
            Err(_) => return Err(unreachable(format!("no connection within {} ms", timeout.as_millis()))),
        };
        let client = SiteClient::new(channel)
            .max_decoding_message_size(SITE_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(SITE_MESSAGE_BYTES_MAX);
        let (stream, first) = match tokio::time::timeout(timeout, open_watch(client.clone())).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                return Err(SiteError::Unavailable(format!(
                    "the node at {address} does not serve edgebus.v1.Site (a node older than this gateway?)"
                )));
            }
            Ok(Err(status)) => return Err(unreachable(status_text(&status))),
            Err(_) => return Err(unreachable(format!("no end position within {} ms", timeout.as_millis()))),
        };
        let (end_sender, end) = watch::channel(first);
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(watch_end(client.clone(), address.clone(), stream, end_sender, stopped));
        Ok(Self { address, client, timeout, end, stop })
    }

    /// The node's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Ends the background watch of the log's end ([`Site::end`] then stays
    /// where it was); dropping the site does the same.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Runs one call within the timeout, mapping its failure.
    async fn call<T>(
        &self,
        call: Call,
        what: &str,
        future: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, SiteError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(site_error_of_status(&self.address, call, &status)),
            Err(_) => Err(SiteError::Unavailable(format!(
                "the site node at {} did not answer {what} within {} ms",
                self.address,
                self.timeout.as_millis()
            ))),
        }
    }

    fn invalid_answer(&self, what: &str, error: impl fmt::Display) -> SiteError {
        SiteError::Unavailable(format!("the site node at {} sent an invalid {what} answer: {error}", self.address))
    }

    async fn replicate_call(
        &self,
        fence: &Fence,
        writes: Vec<v1::ReplicaWrite>,
    ) -> Result<Vec<ReplicaAnswer>, SiteError> {
        let count = writes.len();
        let request = v1::ReplicateRequest { fence_origin: fence.origin.clone(), fence_term: fence.term, writes };
        let mut client = self.client.clone();
        let response = self.call(Call::Write, "Replicate", client.replicate(request)).await?;
        if response.answers.len() != count {
            return Err(
                self.invalid_answer("Replicate", format!("{} answers to {count} writes", response.answers.len()))
            );
        }
        response
            .answers
            .into_iter()
            .map(|a| answer_from_wire(a).map_err(|e| self.invalid_answer("Replicate", e)))
            .collect()
    }
}

impl Site for RemoteSite {
    fn read_log(&self, from: u64, max_records: usize, max_bytes: u64) -> SiteFuture<'_, Vec<RecordedEvent>> {
        Box::pin(async move {
            let request = v1::ReadLogRequest {
                from,
                max_records: u32::try_from(max_records).unwrap_or(u32::MAX).max(1),
                max_bytes: max_bytes.max(1),
            };
            let mut client = self.client.clone();
            let response = self.call(Call::Read, "ReadLog", client.read_log(request)).await?;
            let events = response
                .events
                .into_iter()
                .map(RecordedEvent::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.invalid_answer("ReadLog", e))?;
            // The routes rely on a hole-free run of positions from `from`.
            for (i, event) in events.iter().enumerate() {
                if event.position != from + i as u64 {
                    return Err(self.invalid_answer(
                        "ReadLog",
                        format!("position {} where {} was due", event.position, from + i as u64),
                    ));
                }
            }
            Ok(events)
        })
    }

    fn read_stream(
        &self,
        stream: StreamName,
        from: StreamFrom,
        direction: Direction,
        count: usize,
    ) -> SiteFuture<'_, Vec<RecordedEvent>> {
        Box::pin(async move {
            if count == 0 {
                return Ok(Vec::new()); // 0 on the wire means the node's maximum
            }
            let request = v1::ReadStreamRequest::from(ReadStreamArgs { stream, from, direction, max_count: count });
            let mut client = self.client.clone();
            let response = self.call(Call::Read, "ReadStream", client.read_stream(request)).await?;
            convert::read_stream_events(response).map_err(|e| self.invalid_answer("ReadStream", e))
        })
    }

    fn append(
        &self,
        stream: StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> SiteFuture<'_, AppendResult> {
        Box::pin(async move {
            let request = v1::SiteAppendRequest::from(SiteAppendArgs { stream, expected, events });
            let mut client = self.client.clone();
            let response = self.call(Call::Write, "Append", client.append(request)).await?;
            Ok(AppendResult::from(response))
        })
    }

    /// Sends the writes in calls of at most [`SITE_REPLICATE_WRITES_MAX`]
    /// writes and about [`SITE_REPLICATE_CALL_BYTES_MAX`] bytes, in order.
    /// A failed call fails the whole batch: what earlier calls wrote stays
    /// written, and a resend is absorbed as `Exists { same: true }`.
    fn replicate(&self, fence: Fence, writes: Vec<ReplicaWrite>) -> SiteFuture<'_, Vec<ReplicaAnswer>> {
        Box::pin(async move {
            if writes.is_empty() {
                // Still a call: the fence alone is news to the site (a hello).
                return self.replicate_call(&fence, Vec::new()).await;
            }
            let mut answers = Vec::with_capacity(writes.len());
            let mut chunk: Vec<v1::ReplicaWrite> = Vec::new();
            let mut chunk_bytes = 0usize;
            for write in writes {
                let wire = v1::ReplicaWrite::from(write);
                let bytes = wire.encoded_len();
                let full =
                    chunk.len() == SITE_REPLICATE_WRITES_MAX || chunk_bytes + bytes > SITE_REPLICATE_CALL_BYTES_MAX;
                if !chunk.is_empty() && full {
                    answers.extend(self.replicate_call(&fence, std::mem::take(&mut chunk)).await?);
                    chunk_bytes = 0;
                }
                chunk_bytes += bytes;
                chunk.push(wire);
            }
            answers.extend(self.replicate_call(&fence, chunk).await?);
            Ok(answers)
        })
    }

    fn end(&self) -> watch::Receiver<u64> {
        self.end.clone()
    }
}

/// Opens a `WatchEnd` stream and reads its first position.
async fn open_watch(mut client: SiteClient<Channel>) -> Result<(tonic::Streaming<v1::LogEnd>, u64), Status> {
    let mut stream = client.watch_end(v1::WatchEndRequest {}).await?.into_inner();
    match stream.message().await? {
        Some(end) => Ok((stream, end.end_position)),
        None => Err(Status::unavailable("the end watch ended before its first position")),
    }
}

/// Feeds `end` from the `WatchEnd` stream, reopening it with backoff when
/// it breaks, until `stop` says so or its sender (the site) is gone.
async fn watch_end(
    client: SiteClient<Channel>,
    address: String,
    mut stream: tonic::Streaming<v1::LogEnd>,
    end: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let publish = |position: u64| {
        end.send_if_modified(|current| {
            let moved = position > *current;
            *current = (*current).max(position);
            moved
        });
    };
    let mut backoff = WATCH_BACKOFF_MIN;
    loop {
        // Follow the stream until it breaks.
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(position)) => publish(position.end_position),
                    Ok(None) => {
                        eprintln!("edgebus gateway: the end watch of the site node at {address} ended; reconnecting");
                        break;
                    }
                    Err(status) => {
                        eprintln!(
                            "edgebus gateway: the end watch of the site node at {address} failed: {}; reconnecting",
                            status_text(&status)
                        );
                        break;
                    }
                },
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            }
        }
        // Reopen it, pausing longer after each failure.
        loop {
            let pause = jittered(backoff);
            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            }
            let opened = tokio::select! {
                opened = open_watch(client.clone()) => opened,
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return } else { continue },
            };
            match opened {
                Ok((reopened, first)) => {
                    publish(first);
                    stream = reopened;
                    backoff = WATCH_BACKOFF_MIN;
                    eprintln!("edgebus gateway: the end watch of the site node at {address} is back");
                    break;
                }
                Err(status) => eprintln!(
                    "edgebus gateway: cannot reopen the end watch of the site node at {address}: {}",
                    status_text(&status)
                ),
            }
        }
    }
}

/// `pause` less up to a fifth, at random, so that gateways restarted
/// together do not reconnect in step.
fn jittered(pause: Duration) -> Duration {
    pause.mul_f64(1.0 - rand::random::<f64>() * 0.2)
}

/// A transport error with its causes (tonic's own text is often just
/// "transport error").
fn transport_error_text(error: &tonic::transport::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A status as a person reads it: its message, or its code when empty.
fn status_text(status: &Status) -> String {
    if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().to_owned() }
}

/// The site error a failed call becomes: a conflict and a fence keep their
/// facts; a failure of the node or of the way to it is
/// [`SiteError::Unavailable`] naming the node; a refusal of a write's
/// request is [`SiteError::Refused`]. Reads fail only as unavailable, as in
/// process.
fn site_error_of_status(address: &str, call: Call, status: &Status) -> SiteError {
    let unavailable = |why: &str| SiteError::Unavailable(format!("the site node at {address}: {why}"));
    let Some(detail) = convert::error_detail_from_status(status) else {
        return unavailable(&status_text(status));
    };
    match detail.error_code() {
        v1::ErrorCode::WrongExpectedVersion => SiteError::WrongVersion { current: detail.current },
        v1::ErrorCode::Fenced => {
            let fenced = detail.fenced.unwrap_or_default();
            SiteError::Fenced { origin: fenced.origin_site, term: fenced.term, current: fenced.current_term }
        }
        v1::ErrorCode::Busy | v1::ErrorCode::Unavailable | v1::ErrorCode::IndexFailure => unavailable(&detail.message),
        _ if call == Call::Read => unavailable(&detail.message),
        _ => SiteError::Refused(detail.message),
    }
}

/// The status a [`SiteError`] of the node's own site becomes on the wire
/// (the node's side of `Site.Replicate`); [`RemoteSite`] maps it back.
pub fn status_of_site_error(error: &SiteError) -> Status {
    let mut detail = v1::ErrorDetail { message: error.to_string(), ..v1::ErrorDetail::default() };
    detail.code = match error {
        SiteError::WrongVersion { current } => {
            detail.current = *current;
            v1::ErrorCode::WrongExpectedVersion
        }
        SiteError::Fenced { origin, term, current } => {
            detail.fenced =
                Some(Box::new(v1::FencedDetail { origin_site: origin.clone(), term: *term, current_term: *current }));
            v1::ErrorCode::Fenced
        }
        SiteError::Refused(_) => v1::ErrorCode::InvalidArgument,
        SiteError::Unavailable(_) => v1::ErrorCode::Unavailable,
    } as u32;
    convert::status_from_error_detail(detail)
}

/// The wire form of one replicated write's answer.
pub fn answer_to_wire(answer: &ReplicaAnswer) -> v1::ReplicaAnswer {
    use v1::exists_or_write_response::{Exists, Written};
    use v1::replica_answer::Outcome;
    let outcome = match answer {
        Ok(ExistsOrWrite::Written { position }) => Outcome::Written(Written { position: *position }),
        Ok(ExistsOrWrite::Exists { position, same }) => Outcome::Exists(Exists { position: *position, same: *same }),
        Err(refusal) => {
            Outcome::Refused(v1::ReplicaRefused { retryable: refusal.retryable, message: refusal.message.clone() })
        }
    };
    v1::ReplicaAnswer { outcome: Some(outcome) }
}

/// One replicated write's answer from the wire.
fn answer_from_wire(answer: v1::ReplicaAnswer) -> Result<ReplicaAnswer, String> {
    use v1::replica_answer::Outcome;
    Ok(match answer.outcome.ok_or("an answer without an outcome")? {
        Outcome::Written(written) => Ok(ExistsOrWrite::Written { position: written.position }),
        Outcome::Exists(exists) => Ok(ExistsOrWrite::Exists { position: exists.position, same: exists.same }),
        Outcome::Refused(refused) => Err(ReplicaRefusal { retryable: refused.retryable, message: refused.message }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over_the_wire(status: &Status) -> Status {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        status.add_header(&mut headers).expect("status encodes as headers");
        Status::from_header_map(&headers).expect("headers decode as a status")
    }

    #[test]
    fn site_errors_survive_the_wire() {
        let errors = [
            SiteError::WrongVersion { current: Some(4) },
            SiteError::WrongVersion { current: None },
            SiteError::Fenced { origin: "eu".into(), term: 2, current: 5 },
            SiteError::Refused("no such thing".into()),
        ];
        for error in errors {
            let back = site_error_of_status("n:1", Call::Write, &over_the_wire(&status_of_site_error(&error)));
            assert_eq!(back, error);
        }
        let back = site_error_of_status(
            "n:1",
            Call::Write,
            &over_the_wire(&status_of_site_error(&SiteError::Unavailable("disk".into()))),
        );
        assert_eq!(back, SiteError::Unavailable("the site node at n:1: disk".into()));
        // A refusal of a read is the site's failure, as in process.
        let back = site_error_of_status(
            "n:1",
            Call::Read,
            &over_the_wire(&status_of_site_error(&SiteError::Refused("bad".into()))),
        );
        assert!(matches!(back, SiteError::Unavailable(_)), "{back:?}");
        // A status without a detail (the transport, a proxy) names the node.
        let back = site_error_of_status("n:1", Call::Write, &Status::unavailable("connection refused"));
        assert_eq!(back, SiteError::Unavailable("the site node at n:1: connection refused".into()));
    }

    #[test]
    fn answers_survive_the_wire() {
        let answers: [ReplicaAnswer; 4] = [
            Ok(ExistsOrWrite::Written { position: 7 }),
            Ok(ExistsOrWrite::Exists { position: 3, same: true }),
            Ok(ExistsOrWrite::Exists { position: 3, same: false }),
            Err(ReplicaRefusal { retryable: true, message: "busy".into() }),
        ];
        for answer in answers {
            let wire = v1::ReplicaAnswer::decode(answer_to_wire(&answer).encode_to_vec().as_slice()).expect("decodes");
            assert_eq!(answer_from_wire(wire).expect("valid"), answer);
        }
        assert!(answer_from_wire(v1::ReplicaAnswer { outcome: None }).is_err());
    }
}
