//! Small servers for tests and benchmarks on `127.0.0.1:0`: an echo server,
//! a sink that counts what it receives, and [`measure_raw_goodput`], the
//! rate a plain TCP stream achieves through a link.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::LinkConfig;
use crate::limits::PIECE_BYTES_MAX;
use crate::link::Link;

/// A server that writes back every byte it reads, on every connection,
/// until the client ends its stream. Dropping it stops it and closes its
/// connections.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Listens on `127.0.0.1:0`. Must be called within a tokio runtime.
    pub async fn start() -> io::Result<EchoServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, |mut stream: TcpStream| async move {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        }));
        Ok(EchoServer { addr, task })
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server that reads and discards everything sent to it, on every
/// connection, and counts the bytes. Dropping it stops it and closes its
/// connections.
#[derive(Debug)]
pub struct SinkServer {
    addr: SocketAddr,
    bytes_received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SinkServer {
    /// Listens on `127.0.0.1:0`. Must be called within a tokio runtime.
    pub async fn start() -> io::Result<SinkServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let bytes_received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&bytes_received);
        let task = tokio::spawn(serve(listener, move |mut stream: TcpStream| {
            let counter = Arc::clone(&counter);
            async move {
                let mut buffer = vec![0; PIECE_BYTES_MAX];
                while let Ok(read @ 1..) = stream.read(&mut buffer).await {
                    counter.fetch_add(read as u64, Ordering::Relaxed);
                }
            }
        }));
        Ok(SinkServer { addr, bytes_received, task })
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes received so far, all connections together.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections and runs `handle` on each, each on a task owned by a
/// `JoinSet` that ends with this future.
async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(handle(stream));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
        }
    }
}

/// Pushes `bytes` bytes over one plain TCP stream through a fresh [`Link`]
/// with `config` to a local sink, and returns the rate achieved in bits per
/// second: the bytes over the time from the first write to the last byte's
/// arrival (which includes one latency). Benchmarks divide their goodput by
/// this to report a fraction of the link's raw capacity. It does not bound
/// its own duration: wrap it in a timeout.
pub async fn measure_raw_goodput(config: &LinkConfig, bytes: u64) -> io::Result<f64> {
    if bytes == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "measure at least one byte"));
    }
    let sink = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let link = Link::start(sink.local_addr()?, config.clone()).await?;
    // In a JoinSet so that the receiving task ends if this future is dropped.
    let mut receiver = JoinSet::new();
    receiver.spawn(async move {
        let (mut stream, _) = sink.accept().await?;
        let mut buffer = vec![0; PIECE_BYTES_MAX];
        let mut received: u64 = 0;
        let mut last_byte_at = Instant::now();
        loop {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                return Ok::<_, io::Error>((received, last_byte_at));
            }
            received += read as u64;
            last_byte_at = Instant::now();
        }
    });
    let mut stream = TcpStream::connect(link.addr()).await?;
    stream.set_nodelay(true)?;
    let chunk = vec![0x5a; PIECE_BYTES_MAX];
    let started_at = Instant::now();
    let mut remaining = bytes;
    while remaining > 0 {
        let now = usize::try_from(remaining).unwrap_or(usize::MAX).min(chunk.len());
        stream.write_all(&chunk[..now]).await?;
        remaining -= now as u64;
    }
    stream.shutdown().await?;
    let (received, last_byte_at) =
        receiver.join_next().await.expect("one receiver task").map_err(io::Error::other)??;
    link.stop().await;
    if received != bytes {
        return Err(io::Error::other(format!("sent {bytes} bytes through the link, {received} arrived")));
    }
    let elapsed_secs = last_byte_at.duration_since(started_at).as_secs_f64().max(1e-9);
    Ok(bytes as f64 * 8.0 / elapsed_secs)
}
