//! Appends over one `AppendStream` per connection.
//!
//! Why: every concurrent [`crate::Client::append`] of one connection (the
//! client and its clones) shares one gRPC stream instead of making a unary
//! call each, which costs the node and the client an HTTP/2 stream per
//! append. A task owns the stream: callers hand it their request and a
//! reply slot, it numbers the request, sends it, and routes each answer to
//! its caller by number.
//!
//! When the stream breaks (node restart, connection lost), every append it
//! had not answered is sent again by its caller as a unary `Append`: the
//! same event ids make that retry idempotent, so an append that did land
//! answers `already_written` instead of being written twice. The next
//! append opens a new stream. A node without `AppendStream`
//! (`UNIMPLEMENTED`) is served by unary calls from then on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use edgebus_proto::v1;
use edgebus_proto::v1::event_store_client::EventStoreClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Appends of one connection sent and not yet answered, at most (the
/// node's own bound per stream is the same).
const IN_FLIGHT_MAX: usize = 1024;

/// What the stream's task answers a caller.
pub(crate) enum Answer {
    /// The node's answer.
    Answered(Result<v1::AppendResponse, tonic::Status>),
    /// The stream broke before an answer came: send it again by unary call.
    Broken,
}

type Command = (v1::AppendRequest, oneshot::Sender<Answer>);

/// The connection's append stream, started on first use; shared by clones.
#[derive(Debug, Default)]
pub(crate) struct AppendStreams {
    sender: Mutex<Option<mpsc::Sender<Command>>>,
    /// The node answered `UNIMPLEMENTED`: use unary calls.
    unsupported: AtomicBool,
}

impl AppendStreams {
    /// Sends `request` over the stream (opening it if needed) and waits for
    /// its answer; [`Answer::Broken`] when the caller should send it by
    /// unary call instead.
    pub(crate) async fn append(
        self: &Arc<Self>,
        client: &EventStoreClient<Channel>,
        request: v1::AppendRequest,
    ) -> Answer {
        let Some(sender) = self.sender(client) else { return Answer::Broken };
        let (reply, answer) = oneshot::channel();
        if sender.send((request, reply)).await.is_err() {
            return Answer::Broken;
        }
        answer.await.unwrap_or(Answer::Broken)
    }

    fn sender(self: &Arc<Self>, client: &EventStoreClient<Channel>) -> Option<mpsc::Sender<Command>> {
        if self.unsupported.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = self.sender.lock().expect("append stream lock");
        if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Some(sender.clone());
        }
        let (sender, commands) = mpsc::channel(IN_FLIGHT_MAX);
        tokio::spawn(run(Arc::clone(self), client.clone(), commands));
        *slot = Some(sender.clone());
        Some(sender)
    }
}

/// Owns one stream until it breaks or every client handle is gone.
async fn run(
    streams: Arc<AppendStreams>,
    mut client: EventStoreClient<Channel>,
    mut commands: mpsc::Receiver<Command>,
) {
    let (requests, outbound) = mpsc::channel(IN_FLIGHT_MAX);
    let mut responses = match client.append_stream(ReceiverStream::new(outbound)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            if status.code() == tonic::Code::Unimplemented {
                streams.unsupported.store(true, Ordering::Relaxed);
            }
            return; // the queued callers see the channel close: unary calls
        }
    };
    let mut pending: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
    let mut next = 0u64;
    loop {
        tokio::select! {
            command = commands.recv(), if pending.len() < IN_FLIGHT_MAX => {
                let Some((append, reply)) = command else { break };
                next += 1;
                // `requests` holds at most the unanswered requests, fewer than its capacity.
                if requests.try_send(v1::AppendStreamRequest { correlation: next, append: Some(append) }).is_err() {
                    let _ = reply.send(Answer::Broken);
                    break;
                }
                pending.insert(next, reply);
            }
            response = responses.message() => match response {
                Ok(Some(response)) => {
                    if let Some(reply) = pending.remove(&response.correlation) {
                        let _ = reply.send(answer_of(response));
                    }
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    for reply in pending.into_values() {
        let _ = reply.send(Answer::Broken);
    }
}

fn answer_of(response: v1::AppendStreamResponse) -> Answer {
    use v1::append_stream_response::Result as R;
    match response.result {
        Some(R::Appended(appended)) => Answer::Answered(Ok(appended)),
        Some(R::Error(detail)) => Answer::Answered(Err(edgebus_proto::convert::status_from_error_detail(detail))),
        None => Answer::Answered(Err(tonic::Status::internal("the node answered an append with no result"))),
    }
}
