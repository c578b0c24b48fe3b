//! The node's own limits ([`NodeLimits`]) and the cap on concurrent
//! connections per listener ([`ConnectionLimiter`]), whose figures (open,
//! cap, refused) `/metrics` and `/v1/stats` report per transport.
//!
//! # Connections over the cap
//!
//! Each listener (gRPC, HTTP) has its own [`ConnectionLimiter`]. An accepted
//! connection takes a slot, held by the [`LimitedStream`] that wraps it and
//! given back when the server drops the connection (the peer closed it, or
//! the server did). A connection accepted while every slot is taken is
//! refused at once, and the connections already open keep being served:
//!
//! - **HTTP**: the node answers `503 Service Unavailable` with `Retry-After: 1`,
//!   `Connection: close` and the JSON body
//!   `{"code":103,"message":"too many connections: the node serves at most N","retry_after_ms":1000}`
//!   (code 103 is `RESOURCE_EXHAUSTED`), then closes the connection.
//! - **gRPC**: the node sends the HTTP/2 server preface (an empty `SETTINGS`)
//!   and a `GOAWAY` with error code `ENHANCE_YOUR_CALM` and the same message
//!   as debug data, then closes the connection. A tonic client sees its call
//!   fail with status `RESOURCE_EXHAUSTED` (gRPC's mapping of
//!   `ENHANCE_YOUR_CALM`), the message in the error's source (the `GOAWAY`'s
//!   debug data); a client whose connection attempt itself failed sees
//!   `UNAVAILABLE`. No request on that connection was processed, so
//!   retrying later is safe.
//!
//! A refusal is written by a task of its own that lingers briefly (at most
//! [`REFUSAL_LINGER`]) reading what the client sends, so that closing the
//! socket does not reset it before the client has read the refusal. At most
//! [`NODE_CONNECTION_REFUSALS_MAX`] refusals are in flight per listener;
//! beyond that an extra connection is closed without a word. Every refused
//! connection is counted in [`ConnectionLimiter::rejected_connections`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use edgebus_types::limits::{
    NODE_CONNECTION_REFUSALS_MAX, NODE_CONNECTIONS_MAX_DEFAULT, NODE_HTTP_IDLE_TIMEOUT_MS_DEFAULT,
    NODE_SUBSCRIPTIONS_MAX_DEFAULT,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;

/// The stable wire code of a refusal for a node limit (`RESOURCE_EXHAUSTED`).
const RESOURCE_EXHAUSTED: u32 = edgebus_proto::v1::ErrorCode::ResourceExhausted as u32;

/// How long a refused connection is kept open, reading and discarding what
/// the client sends, after the refusal was written.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Bytes a refused connection reads and discards at most before it closes.
const REFUSAL_DRAIN_BYTES_MAX: usize = 64 * 1024;
/// What a refused client is told to wait before retrying, in milliseconds
/// (also the `Retry-After: 1` of the HTTP refusal).
pub const REFUSAL_RETRY_AFTER_MS: u64 = 1000;

/// Limits of one node, beyond the store's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLimits {
    /// Most TCP connections each listener (gRPC, HTTP) serves at once; at
    /// least 1.
    pub max_connections: usize,
    /// Most subscriptions the node serves at once, over all connections.
    pub max_subscriptions: usize,
    /// How long an HTTP connection may take to send a request's headers,
    /// from its opening or from its previous response (see `http::serve`).
    pub http_idle_timeout: Duration,
}

impl Default for NodeLimits {
    fn default() -> Self {
        Self {
            max_connections: NODE_CONNECTIONS_MAX_DEFAULT,
            max_subscriptions: NODE_SUBSCRIPTIONS_MAX_DEFAULT,
            http_idle_timeout: Duration::from_millis(NODE_HTTP_IDLE_TIMEOUT_MS_DEFAULT),
        }
    }
}

/// Which protocol a listener speaks, so that a refusal is in its language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1: a `503` with a JSON body.
    Http,
    /// gRPC over HTTP/2: a `GOAWAY`.
    Grpc,
}

/// The cap on concurrent connections of one listener; see the module docs.
///
/// Created by the node for each listener; lives as long as the longest of
/// the listener and its open connections (each [`ConnectionSlot`] holds an
/// `Arc` to it).
#[derive(Debug)]
pub struct ConnectionLimiter {
    protocol: Protocol,
    max_connections: usize,
    open_connections: AtomicUsize,
    refusals_in_flight: AtomicUsize,
    rejected_connections: AtomicU64,
}

impl ConnectionLimiter {
    /// A limiter serving at most `max_connections` (at least 1) connections
    /// of `protocol` at once.
    pub fn new(protocol: Protocol, max_connections: usize) -> Arc<Self> {
        assert!(max_connections >= 1, "a listener serves at least one connection");
        Arc::new(Self {
            protocol,
            max_connections,
            open_connections: AtomicUsize::new(0),
            refusals_in_flight: AtomicUsize::new(0),
            rejected_connections: AtomicU64::new(0),
        })
    }

    /// The cap.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Connections holding a slot now.
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Connections refused because the cap was reached, since the node started.
    pub fn rejected_connections(&self) -> u64 {
        self.rejected_connections.load(Ordering::Relaxed)
    }

    /// A slot for one more connection, or `None` if every slot is taken
    /// (which counts the refusal).
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let acquired = self.open_connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
            (open < self.max_connections).then_some(open + 1)
        });
        match acquired {
            Ok(_) => Some(ConnectionSlot { limiter: Arc::clone(self) }),
            Err(_) => {
                self.rejected_connections.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// The message of a refusal.
    pub fn refusal_message(&self) -> String {
        format!("too many connections: the node serves at most {}", self.max_connections)
    }

    /// Wraps `stream` if a slot is free; otherwise refuses it (on a task of
    /// its own, see the module docs) and answers `None`.
    fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<LimitedStream<TcpStream>> {
        // Servers given their own incoming stream do not set TCP_NODELAY
        // themselves; without it small answers wait for the peer's delayed
        // ACK (about 40 ms). A socket that refuses it still works, slower.
        let _ = stream.set_nodelay(true);
        if let Some(slot) = self.try_acquire() {
            return Some(LimitedStream { inner: stream, _slot: slot });
        }
        let in_flight = self.refusals_in_flight.fetch_add(1, Ordering::AcqRel);
        if in_flight >= NODE_CONNECTION_REFUSALS_MAX {
            // Too many refusals under way already: dropping closes at once.
            self.refusals_in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let limiter = Arc::clone(self);
        tokio::spawn(async move {
            let refusal = match limiter.protocol {
                Protocol::Http => http_refusal(&limiter.refusal_message()),
                Protocol::Grpc => grpc_refusal(&limiter.refusal_message()),
            };
            // The client may be gone already; nothing to do about it.
            let _ = tokio::time::timeout(REFUSAL_LINGER, refuse(stream, &refusal)).await;
            limiter.refusals_in_flight.fetch_sub(1, Ordering::AcqRel);
        });
        None
    }
}

/// Writes `refusal`, ends the write side, and reads (bounded) until the
/// client closes, so that the close does not reset unread data.
async fn refuse(mut stream: TcpStream, refusal: &[u8]) -> io::Result<()> {
    stream.write_all(refusal).await?;
    stream.shutdown().await?;
    let mut buffer = [0u8; 4096];
    let mut drained = 0;
    while drained < REFUSAL_DRAIN_BYTES_MAX {
        match stream.read(&mut buffer).await? {
            0 => break,
            read => drained += read,
        }
    }
    Ok(())
}

/// The whole HTTP/1.1 response refusing a connection.
fn http_refusal(message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "code": RESOURCE_EXHAUSTED,
        "message": message,
        "retry_after_ms": REFUSAL_RETRY_AFTER_MS,
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: {}\r\nconnection: close\r\n\r\n{body}",
        body.len(),
        REFUSAL_RETRY_AFTER_MS.div_ceil(1000),
    )
    .into_bytes()
}

/// HTTP/2 frame types and the error code used (RFC 9113 §6, §7).
const H2_FRAME_SETTINGS: u8 = 0x4;
const H2_FRAME_GOAWAY: u8 = 0x7;
const H2_ENHANCE_YOUR_CALM: u32 = 0xb;

/// The HTTP/2 server preface (an empty `SETTINGS` frame) and a `GOAWAY`
/// that processed no stream, with `message` as debug data.
fn grpc_refusal(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + 9 + 8 + message.len());
    let frame_header = |out: &mut Vec<u8>, length: usize, frame_type: u8| {
        let length = u32::try_from(length).expect("a short frame");
        out.extend_from_slice(&length.to_be_bytes()[1..]);
        out.push(frame_type);
        out.push(0); // flags
        out.extend_from_slice(&0u32.to_be_bytes()); // stream 0: the connection
    };
    frame_header(&mut out, 0, H2_FRAME_SETTINGS);
    frame_header(&mut out, 8 + message.len(), H2_FRAME_GOAWAY);
    out.extend_from_slice(&0u32.to_be_bytes()); // last stream id: none processed
    out.extend_from_slice(&H2_ENHANCE_YOUR_CALM.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// One connection's claim on its listener's cap; gives it back on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let before = self.limiter.open_connections.fetch_sub(1, Ordering::AcqRel);
        assert!(before >= 1, "a slot is given back once");
    }
}

/// A connection holding a slot of its listener's cap; reads and writes go
/// straight to the inner stream.
#[derive(Debug)]
pub struct LimitedStream<S> {
    inner: S,
    _slot: ConnectionSlot,
}

impl<S> LimitedStream<S> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LimitedStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LimitedStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for LimitedStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// An HTTP listener that admits at most its limiter's cap of connections,
/// for `axum::serve`.
#[derive(Debug)]
pub struct LimitedListener {
    listener: TcpListener,
    limiter: Arc<ConnectionLimiter>,
}

impl LimitedListener {
    /// Caps `listener` with `limiter`.
    pub fn new(listener: TcpListener, limiter: Arc<ConnectionLimiter>) -> Self {
        Self { listener, limiter }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's accept retries failed accepts (with a pause when out of
            // file descriptors) and never fails.
            let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
            if let Some(stream) = self.limiter.admit(stream) {
                return (stream, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A gRPC listener's incoming connections, capped by its limiter, for
/// tonic's `serve_with_incoming_shutdown`. Accept errors are passed on as
/// `tokio_stream`'s `TcpListenerStream` does (tonic logs and skips them).
#[derive(Debug)]
pub struct LimitedIncoming {
    listener: TcpListener,
    limiter: Arc<ConnectionLimiter>,
}

impl LimitedIncoming {
    /// Caps `listener` with `limiter`.
    pub fn new(listener: TcpListener, limiter: Arc<ConnectionLimiter>) -> Self {
        Self { listener, limiter }
    }
}

impl Stream for LimitedIncoming {
    type Item = io::Result<LimitedStream<TcpStream>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every refused connection was accepted, so the loop makes progress;
        // it ends when the listener has nothing ready (Pending).
        loop {
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Ok((stream, _addr))) => {
                    if let Some(stream) = self.limiter.admit(stream) {
                        return Poll::Ready(Some(Ok(stream)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_counted_and_given_back() {
        let limiter = ConnectionLimiter::new(Protocol::Http, 2);
        let first = limiter.try_acquire().expect("a slot");
        let second = limiter.try_acquire().expect("a slot");
        assert_eq!(limiter.open_connections(), 2);
        assert!(limiter.try_acquire().is_none());
        assert!(limiter.try_acquire().is_none());
        assert_eq!(limiter.rejected_connections(), 2);
        drop(first);
        assert_eq!(limiter.open_connections(), 1);
        let third = limiter.try_acquire().expect("a slot after one closed");
        drop((second, third));
        assert_eq!(limiter.open_connections(), 0);
        assert_eq!(limiter.rejected_connections(), 2);
    }

    #[test]
    fn the_http_refusal_is_a_whole_503_with_a_json_body() {
        let raw = String::from_utf8(http_refusal("too many connections: the node serves at most 4")).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{head}");
        assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(body["code"], 103);
        assert_eq!(body["message"], "too many connections: the node serves at most 4");
    }

    #[test]
    fn the_grpc_refusal_is_settings_then_goaway() {
        let message = "too many connections: the node serves at most 4";
        let raw = grpc_refusal(message);
        // SETTINGS: empty, on stream 0.
        assert_eq!(&raw[..9], &[0, 0, 0, H2_FRAME_SETTINGS, 0, 0, 0, 0, 0]);
        let goaway = &raw[9..];
        let length = usize::from(goaway[1]) << 8 | usize::from(goaway[2]);
        assert_eq!(goaway[0], 0);
        assert_eq!(length, 8 + message.len());
        assert_eq!(goaway[3], H2_FRAME_GOAWAY);
        assert_eq!(&goaway[9..13], &[0, 0, 0, 0], "no stream processed");
        assert_eq!(&goaway[13..17], &H2_ENHANCE_YOUR_CALM.to_be_bytes());
        assert_eq!(&goaway[17..], message.as_bytes());
        assert_eq!(goaway.len(), 9 + length);
    }

    #[tokio::test]
    async fn an_http_listener_refuses_over_the_cap_and_admits_after_a_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limiter = ConnectionLimiter::new(Protocol::Http, 1);
        let mut limited = LimitedListener::new(listener, Arc::clone(&limiter));

        let first_client = TcpStream::connect(addr).await.unwrap();
        let (first, _) = axum::serve::Listener::accept(&mut limited).await;
        assert_eq!(limiter.open_connections(), 1);
        assert!(first.inner.nodelay().unwrap(), "admitted connections send small answers at once (TCP_NODELAY)");
        // The second is refused inside accept, which then waits for another.
        let mut second_client = TcpStream::connect(addr).await.unwrap();
        let accept_next = tokio::spawn(async move {
            let (next, _) = axum::serve::Listener::accept(&mut limited).await;
            next
        });
        let mut refusal = String::new();
        second_client.read_to_string(&mut refusal).await.unwrap();
        assert!(refusal.starts_with("HTTP/1.1 503 "), "{refusal}");
        assert!(refusal.contains("the node serves at most 1"), "{refusal}");
        assert_eq!(limiter.rejected_connections(), 1);

        // Closing the admitted connection frees its slot for the next one.
        drop((first, first_client));
        assert_eq!(limiter.open_connections(), 0);
        let third_client = TcpStream::connect(addr).await.unwrap();
        let third = tokio::time::timeout(Duration::from_secs(30), accept_next).await.expect("admitted").unwrap();
        assert_eq!(limiter.open_connections(), 1);
        assert_eq!(limiter.rejected_connections(), 1);
        drop((third, third_client));
        assert_eq!(limiter.open_connections(), 0);
    }
}
