//! The WAN link emulator (`edgebus-testkit`) through real sockets on
//! `127.0.0.1`: bytes arrive intact, latency and bandwidth are at least what
//! was asked (only lower bounds on time: the machine is shared), the
//! bandwidth is shared by connections, the pipe's buffer is bounded, and
//! cut, blackhole, restore, schedule and stop do what they promise.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use edgebus_testkit::{Action, EchoServer, Link, LinkConfig, SinkServer, Stall, measure_raw_goodput};
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The bound on any awaited condition: a test that waits longer failed.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long a blackholed request is watched for an answer that must not come.
const SILENCE: Duration = Duration::from_millis(300);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future).await.unwrap_or_else(|_| panic!("{what} took over {DEADLINE:?}"))
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// Writes `request` and reads as many bytes back (from an echo server).
async fn round_trip(stream: &mut TcpStream, request: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(request).await?;
    let mut response = vec![0; request.len()];
    stream.read_exact(&mut response).await?;
    Ok(response)
}

/// Whether the peer ended the stream or reset it (rather than sent data).
async fn sees_end(stream: &mut TcpStream) -> bool {
    let mut byte = [0; 1];
    matches!(stream.read(&mut byte).await, Ok(0) | Err(_))
}

/// Connects through the link until an echo round trip succeeds (the link
/// was restored), within [`DEADLINE`] and a bounded number of tries.
async fn until_echo_works(addr: SocketAddr) -> TcpStream {
    let started = Instant::now();
    for _ in 0..1000 {
        if let Ok(mut stream) = TcpStream::connect(addr).await
            && let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(1), round_trip(&mut stream, b"ping")).await
            && response == b"ping"
        {
            return stream;
        }
        assert!(started.elapsed() < DEADLINE, "the link did not forward again within {DEADLINE:?}");
        // Nothing to await: a refused connection fails at once, so pace the tries.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the link did not forward again after 1000 tries");
}

/// Accepts `connections` connections on `listener`, reads each to its end,
/// and returns the bytes received and when the last byte arrived.
async fn receive_all(listener: TcpListener, connections: usize) -> (u64, Instant) {
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (mut stream, _) = listener.accept().await.expect("accept");
        readers.spawn(async move {
            let mut buffer = vec![0; 64 * 1024];
            let mut received = 0u64;
            let mut last_byte_at = Instant::now();
            while let Ok(read @ 1..) = stream.read(&mut buffer).await {
                received += read as u64;
                last_byte_at = Instant::now();
            }
            (received, last_byte_at)
        });
    }
    let mut total = 0;
    let mut last = None::<Instant>;
    while let Some(joined) = readers.join_next().await {
        let (received, last_byte_at) = joined.expect("reader task");
        total += received;
        last = Some(last.map_or(last_byte_at, |last| last.max(last_byte_at)));
    }
    (total, last.expect("at least one connection"))
}

async fn send_all(addr: SocketAddr, bytes: Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&bytes).await.expect("write");
    stream.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_intact_both_ways_on_concurrent_connections() {
    let echo = EchoServer::start().await.expect("echo");
    // Jitter far above the time between pieces, so that a reordering would show.
    let config = LinkConfig {
        bandwidth_bps: Some(400_000_000),
        latency: Duration::from_millis(2),
        jitter: Duration::from_millis(10),
        ..LinkConfig::default()
    };
    let link = Link::start(echo.addr(), config).await.expect("link");
    const CONNECTIONS: u64 = 4;
    const BYTES: usize = 512 * 1024;
    let mut clients = tokio::task::JoinSet::new();
    for seed in 0..CONNECTIONS {
        let addr = link.addr();
        clients.spawn(async move {
            let sent = random_bytes(seed, BYTES);
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let (mut read, mut write) = stream.split();
            let writing = async {
                write.write_all(&sent).await.expect("write");
                write.shutdown().await.expect("shutdown");
            };
            let reading = async {
                let mut received = Vec::with_capacity(BYTES);
                read.read_to_end(&mut received).await.expect("read");
                received
            };
            let ((), received) = tokio::join!(writing, reading);
            assert_eq!(received.len(), sent.len(), "connection {seed}: length");
            assert!(received == sent, "connection {seed}: the bytes came back altered or reordered");
        });
    }
    within("the echoes", async {
        while let Some(joined) = clients.join_next().await {
            joined.expect("client task");
        }
    })
    .await;
    let stats = link.stats();
    let total = CONNECTIONS * BYTES as u64;
    assert_eq!(stats.bytes_to_target, total);
    assert_eq!(stats.bytes_to_client, total);
    assert_eq!(stats.connections_accepted, CONNECTIONS);
    assert_eq!(stats.bytes_discarded, 0);
    assert_eq!(stats.connections_reset, 0);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_takes_at_least_twice_the_latency() {
    let echo = EchoServer::start().await.expect("echo");
    let latency = Duration::from_millis(50);
    let link = Link::start(echo.addr(), LinkConfig { latency, ..LinkConfig::default() }).await.expect("link");
    let mut stream = TcpStream::connect(link.addr()).await.expect("connect");
    for round in 0..3u8 {
        let started = Instant::now();
        let response = within("a round trip", round_trip(&mut stream, &[round; 16])).await.expect("round trip");
        let elapsed = started.elapsed();
        assert_eq!(response, [round; 16]);
        assert!(elapsed >= 2 * latency, "round {round} took {elapsed:?}, under twice the latency {latency:?}");
    }
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_bounds_transfer_time_and_is_shared_by_connections() {
    // 8 Mbit/s: one byte per microsecond, one megabyte per second.
    let bandwidth_bps = 8_000_000;
    let config = LinkConfig { bandwidth_bps: Some(bandwidth_bps), ..LinkConfig::default() };
    let min_duration = |bytes: u64| Duration::from_secs_f64(bytes as f64 * 8.0 / bandwidth_bps as f64 * 0.9);

    // One connection.
    let sink = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let link = Link::start(sink.local_addr().expect("addr"), config.clone()).await.expect("link");
    let bytes = 400_000;
    let started = Instant::now();
    let receiving = tokio::spawn(receive_all(sink, 1));
    send_all(link.addr(), random_bytes(1, bytes)).await;
    let (received, last_byte_at) = within("one transfer", receiving).await.expect("receiver");
    assert_eq!(received, bytes as u64);
    let elapsed = last_byte_at - started;
    assert!(elapsed >= min_duration(received), "{received} bytes took {elapsed:?} at {bandwidth_bps} bit/s");
    link.stop().await;

    // Two connections at once share the rate: together they take as long as
    // their bytes together need, not as long as one's.
    let sink = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let link = Link::start(sink.local_addr().expect("addr"), config).await.expect("link");
    let bytes = 300_000;
    let started = Instant::now();
    let receiving = tokio::spawn(receive_all(sink, 2));
    tokio::join!(send_all(link.addr(), random_bytes(2, bytes)), send_all(link.addr(), random_bytes(3, bytes)));
    let (received, last_byte_at) = within("two transfers", receiving).await.expect("receiver");
    assert_eq!(received, 2 * bytes as u64);
    let elapsed = last_byte_at - started;
    assert!(elapsed >= min_duration(received), "two connections moved {received} bytes in {elapsed:?}");
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_raw_goodput_reports_at_most_the_configured_rate() {
    let bandwidth_bps = 16_000_000;
    let config = LinkConfig { bandwidth_bps: Some(bandwidth_bps), ..LinkConfig::default() };
    let rate_bps = within("the measurement", measure_raw_goodput(&config, 500_000)).await.expect("measure");
    assert!(rate_bps > 0.0);
    assert!(rate_bps <= bandwidth_bps as f64 * 1.1, "measured {rate_bps} bit/s through a {bandwidth_bps} bit/s link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_holds_at_most_its_buffer() {
    let sink = SinkServer::start().await.expect("sink");
    let buffer_bytes = 64 * 1024;
    let config = LinkConfig { bandwidth_bps: Some(4_000_000), buffer_bytes, ..LinkConfig::default() };
    let link = Link::start(sink.addr(), config).await.expect("link");
    let bytes = 300_000;
    let sending = tokio::spawn(send_all(link.addr(), random_bytes(4, bytes)));
    let started = Instant::now();
    let mut queued_max = 0;
    // Sampled while the transfer runs (about 0.6 s at this rate).
    for _ in 0..10_000 {
        queued_max = queued_max.max(link.stats().bytes_queued);
        if sink.bytes_received() == bytes as u64 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the transfer did not finish within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(sink.bytes_received(), bytes as u64);
    within("the sender", sending).await.expect("sender");
    assert!(queued_max > 0, "the pipe was never seen holding bytes");
    // A piece is admitted whole, and pieces are at most 64 KiB.
    assert!(queued_max <= (buffer_bytes + 64 * 1024) as u64, "the pipe held {queued_max} bytes");
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_pause_delivery() {
    let echo = EchoServer::start().await.expect("echo");
    // Stalled most of the time: 150 ms stalls about 100 ms apart.
    let stall = Stall { every: Duration::from_millis(100), duration: Duration::from_millis(150) };
    let config = LinkConfig { stall: Some(stall), ..LinkConfig::default() };
    let link = Link::start_seeded(echo.addr(), config, 42).await.expect("link");
    let mut stream = TcpStream::connect(link.addr()).await.expect("connect");
    let mut slowest = Duration::ZERO;
    for round in 0..20u8 {
        let started = Instant::now();
        let response = within("a round trip", round_trip(&mut stream, &[round; 8])).await.expect("round trip");
        assert_eq!(response, [round; 8]);
        slowest = slowest.max(started.elapsed());
        // Spread the rounds over at least half a second: the first stall
        // starts about 100 ms after the link first carries bytes.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(slowest >= Duration::from_millis(50), "no round trip waited for a stall (slowest {slowest:?})");
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_resets_connections_and_refuses_new_ones_until_restore() {
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let link = Link::start(target.local_addr().expect("addr"), LinkConfig::default()).await.expect("link");
    let mut client = TcpStream::connect(link.addr()).await.expect("connect");
    let (mut server, _) = within("the forwarded connection", target.accept()).await.expect("accept");
    client.write_all(b"hello").await.expect("write");
    let mut hello = [0; 5];
    within("the forwarded bytes", server.read_exact(&mut hello)).await.expect("read");
    assert_eq!(&hello, b"hello");

    link.cut();
    assert!(within("the client's end", sees_end(&mut client)).await, "the client was sent data after the cut");
    assert!(within("the target's end", sees_end(&mut server)).await, "the target was sent data after the cut");

    // A new connection is accepted and reset at once (the reset may even
    // reach the client before its connect returns); the target sees nothing.
    if let Ok(mut refused) = TcpStream::connect(link.addr()).await {
        assert!(within("the refusal", sees_end(&mut refused)).await);
    }
    assert!(tokio::time::timeout(SILENCE, target.accept()).await.is_err(), "a connection reached the target while cut");

    link.restore();
    let echo_through = tokio::spawn(async move {
        let (mut server, _) = target.accept().await.expect("accept");
        let mut request = [0; 4];
        server.read_exact(&mut request).await.expect("read");
        server.write_all(&request).await.expect("write");
    });
    let mut client = TcpStream::connect(link.addr()).await.expect("connect after restore");
    let response = within("a round trip after restore", round_trip(&mut client, b"ping")).await.expect("round trip");
    assert_eq!(response, b"ping");
    within("the target", echo_through).await.expect("target task");

    let stats = link.stats();
    assert_eq!(stats.cuts, 1);
    assert_eq!(stats.connections_accepted, 3);
    assert_eq!(stats.connections_refused, 1);
    assert_eq!(stats.connections_reset, 1);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_answers_nothing_and_restore_resets_only_connections_that_lost_bytes() {
    let echo = EchoServer::start().await.expect("echo");
    let link = Link::start(echo.addr(), LinkConfig::default()).await.expect("link");
    let mut talker = TcpStream::connect(link.addr()).await.expect("connect");
    assert_eq!(within("a round trip", round_trip(&mut talker, b"one")).await.expect("round trip"), b"one");
    let mut idle = TcpStream::connect(link.addr()).await.expect("connect");
    assert_eq!(within("a round trip", round_trip(&mut idle, b"two")).await.expect("round trip"), b"two");

    link.blackhole();
    // An open connection gets no answer, and is not closed either.
    talker.write_all(b"lost").await.expect("write into the blackhole");
    let mut byte = [0; 1];
    assert!(tokio::time::timeout(SILENCE, talker.read(&mut byte)).await.is_err(), "the blackhole answered");
    // A new connection is accepted, and gets no answer either.
    let mut newcomer = TcpStream::connect(link.addr()).await.expect("connect into the blackhole");
    newcomer.write_all(b"hello?").await.expect("write into the blackhole");
    assert!(tokio::time::timeout(SILENCE, newcomer.read(&mut byte)).await.is_err(), "the blackhole answered");
    let stats = link.stats();
    assert_eq!(stats.bytes_discarded, 10, "{stats:?}");
    assert_eq!(stats.connections_open, 3);

    link.restore();
    // The connections that lost bytes are reset rather than resumed with a
    // hole in their stream; the idle one carries on.
    assert!(within("the talker's reset", sees_end(&mut talker)).await);
    assert!(within("the newcomer's reset", sees_end(&mut newcomer)).await);
    assert_eq!(within("a round trip", round_trip(&mut idle, b"three")).await.expect("round trip"), b"three");
    let mut fresh = TcpStream::connect(link.addr()).await.expect("connect after restore");
    assert_eq!(within("a round trip", round_trip(&mut fresh, b"four")).await.expect("round trip"), b"four");
    assert_eq!(link.stats().connections_reset, 2);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_actions_fire() {
    let echo = EchoServer::start().await.expect("echo");
    let link = Link::start(echo.addr(), LinkConfig::default()).await.expect("link");
    let mut client = TcpStream::connect(link.addr()).await.expect("connect");
    assert_eq!(within("a round trip", round_trip(&mut client, b"ping")).await.expect("round trip"), b"ping");

    let started = Instant::now();
    let cut_after = Duration::from_millis(100);
    link.schedule(cut_after, Action::Cut);
    link.schedule(Duration::from_millis(300), Action::Restore);
    let latency = Duration::from_millis(40);
    link.schedule(Duration::from_millis(200), Action::SetConfig(LinkConfig { latency, ..LinkConfig::default() }));
    assert!(within("the scheduled cut", sees_end(&mut client)).await);
    assert!(started.elapsed() >= cut_after, "the cut came early");

    let mut client = within("the scheduled restore", until_echo_works(link.addr())).await;
    assert!(started.elapsed() >= Duration::from_millis(300), "the restore came early");
    assert_eq!(link.config().latency, latency);
    let round_started = Instant::now();
    assert_eq!(within("a round trip", round_trip(&mut client, b"slow")).await.expect("round trip"), b"slow");
    assert!(round_started.elapsed() >= 2 * latency, "the scheduled configuration did not apply");
    assert_eq!(link.stats().cuts, 1);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_drop_release_the_port_and_connections() {
    let echo = EchoServer::start().await.expect("echo");
    let link = Link::start(echo.addr(), LinkConfig::default()).await.expect("link");
    let addr = link.addr();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(within("a round trip", round_trip(&mut client, b"ping")).await.expect("round trip"), b"ping");
    within("the stop", link.stop()).await;
    assert!(within("the client's end", sees_end(&mut client)).await);
    assert!(TcpStream::connect(addr).await.is_err(), "the stopped link still accepts");

    // Dropping stops too, without waiting: the port closes a moment later.
    let link = Link::start(echo.addr(), LinkConfig::default()).await.expect("link");
    let addr = link.addr();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(within("a round trip", round_trip(&mut client, b"ping")).await.expect("round trip"), b"ping");
    drop(link);
    assert!(within("the client's end", sees_end(&mut client)).await);
    let started = Instant::now();
    for attempt in 0..1000 {
        if TcpStream::connect(addr).await.is_err() {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "the dropped link still accepts after {attempt} tries");
        // Nothing to await: the accept task is aborted asynchronously.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the dropped link still accepts after 1000 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_refused() {
    let echo = EchoServer::start().await.expect("echo");
    let config = LinkConfig { buffer_bytes: 0, ..LinkConfig::default() };
    let error = Link::start(echo.addr(), config).await.expect_err("a zero buffer");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_resets_the_client() {
    // A port that was bound and released: nothing listens there.
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let link = Link::start(target, LinkConfig::default()).await.expect("link");
    if let Ok(mut client) = TcpStream::connect(link.addr()).await {
        assert!(within("the client's end", sees_end(&mut client)).await);
    }
    // The counters move just before the client's socket is closed, so they
    // are usually right at once; a failed connect of our own gives no such
    // moment to await, hence the bounded polling.
    let started = Instant::now();
    for _ in 0..1000 {
        if link.stats().connections_reset == 1 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the failed connect was not counted within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = link.stats();
    assert_eq!(stats.connections_reset, 1);
    assert_eq!(stats.connections_open, 0);
    link.stop().await;
}
