//! The link runtime: [`Link`], a TCP proxy on `127.0.0.1` that forwards each
//! accepted connection to a target through two emulated pipes (one per
//! direction, see `pipe.rs`), and can cut, blackhole and restore the link.
//!
//! # Lifecycle
//!
//! [`Link::start`] binds the listener and spawns the accept task, which owns
//! the listener and a `JoinSet` with one task per forwarded connection.
//! [`Link::stop`] (or dropping the [`Link`]) ends the accept task; the
//! connection tasks end with it (their sockets are closed) and so do the
//! tasks of [`Link::schedule`]. Nothing outlives the [`Link`] but the
//! [`Arc`] of shared state held by tasks that are being torn down.
//!
//! # One connection
//!
//! A connection task runs, for each direction, a reader and a writer joined
//! by a bounded queue of pieces. The reader reads a piece from the sender,
//! waits until the direction's pipe has room for it ([`LinkConfig::buffer_bytes`],
//! shared by every connection), asks the pipe when the piece is due and
//! queues it. The writer sleeps until that instant, gives the piece's room
//! back and writes it to the receiver. The sender's end of stream travels
//! the same way and half-closes the receiver. An error on any socket resets
//! both sides of the connection.
//!
//! # Cut, blackhole, restore
//!
//! - A cut resets every open connection at once (both sockets are closed
//!   with `SO_LINGER` 0, so both peers see a reset or end of stream) and, until
//!   [`Link::restore`], accepts each new connection and resets it at once.
//! - A blackhole keeps connections open and accepts new ones, but delivers
//!   nothing: readers keep reading and discard what they read, and writers
//!   discard the pieces that fall due. A connection that lost any byte, or
//!   its sender's end of stream, this way is *tainted*: it is reset when the
//!   link is restored (or cut), because carrying on would deliver a byte
//!   stream with a hole in it. A connection that sent nothing during the
//!   blackhole carries on after the restore. Whatever a tainted connection
//!   had queued is discarded with it.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::LinkConfig;
use crate::limits::{CONNECT_TIMEOUT, CONNECTION_QUEUE_PIECES_MAX, PIECE_BYTES_MAX, SCHEDULED_ACTIONS_MAX};
use crate::pipe::{Budget, ConnectionClock, PipeClock};

/// Something to do to a link later, with [`Link::schedule`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// [`Link::cut`].
    Cut,
    /// [`Link::blackhole`].
    Blackhole,
    /// [`Link::restore`].
    Restore,
    /// [`Link::set_config`].
    SetConfig(LinkConfig),
}

/// A link's counters since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// Bytes delivered to the target, all connections together.
    pub bytes_to_target: u64,
    /// Bytes delivered back to the clients, all connections together.
    pub bytes_to_client: u64,
    /// Bytes read from either side and discarded by a blackhole.
    pub bytes_discarded: u64,
    /// Bytes in the two pipes now: read from senders and not yet due.
    pub bytes_queued: u64,
    /// Connections the listener accepted, including those refused by a cut.
    pub connections_accepted: u64,
    /// Connections being forwarded now.
    pub connections_open: u64,
    /// Connections accepted while the link was cut and reset at once.
    pub connections_refused: u64,
    /// Forwarded connections that ended in a reset: by a cut, by a restore
    /// (tainted by a blackhole), by a socket error, or a failed connect to
    /// the target.
    pub connections_reset: u64,
    /// Calls to [`Link::cut`] (directly or scheduled).
    pub cuts: u64,
}

/// An emulated WAN link: a TCP proxy listening on `127.0.0.1` that forwards
/// every connection to one target through two emulated pipes. See the
/// module documentation for its lifecycle and what cut and blackhole do.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropping it tells the accept task to stop.
    stop_tx: Option<watch::Sender<()>>,
    accept_task: Option<JoinHandle<()>>,
    scheduled: Mutex<JoinSet<()>>,
}

impl Link {
    /// Listens on `127.0.0.1:0` and forwards each accepted connection to
    /// `target` with the behaviour of `config`. Fails with
    /// [`io::ErrorKind::InvalidInput`] if `config` is invalid
    /// ([`LinkConfig::validate`]). Must be called within a tokio runtime.
    pub async fn start(target: SocketAddr, config: LinkConfig) -> io::Result<Link> {
        Link::start_seeded(target, config, rand::random()).await
    }

    /// [`Link::start`] with the seed of the random draws (jitter, stall
    /// intervals), for a reproducible schedule.
    pub async fn start_seeded(target: SocketAddr, config: LinkConfig, seed: u64) -> io::Result<Link> {
        config.validate().map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(LinkState { mode: Mode::Normal, cuts: 0 });
        let shared = Arc::new(Shared {
            target,
            config: Mutex::new(config),
            state,
            pipes: [Pipe::new(seed), Pipe::new(seed.wrapping_add(1))],
            counters: Counters::default(),
        });
        let (stop_tx, stop_rx) = watch::channel(());
        let accept_task = tokio::spawn(accept_loop(Arc::clone(&shared), listener, stop_rx));
        Ok(Link {
            addr,
            shared,
            stop_tx: Some(stop_tx),
            accept_task: Some(accept_task),
            scheduled: Mutex::new(JoinSet::new()),
        })
    }

    /// The address the link listens on; clients connect here instead of to
    /// the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The target every connection is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The configuration in force.
    pub fn config(&self) -> LinkConfig {
        self.shared.config().clone()
    }

    /// Replaces the configuration. It applies to bytes read from now on;
    /// bytes already in a pipe keep the delivery instant they were given.
    ///
    /// # Panics
    ///
    /// If `config` is invalid ([`LinkConfig::validate`]): a test asking for
    /// an impossible link is a bug in the test.
    pub fn set_config(&self, config: LinkConfig) {
        self.shared.set_config(config);
    }

    /// Resets every open connection at once and resets each new one as soon
    /// as it is accepted, until [`Link::restore`].
    pub fn cut(&self) {
        self.shared.apply(Action::Cut);
    }

    /// Delivers nothing in either direction until [`Link::restore`], while
    /// connections stay open and new ones are accepted; what is read is
    /// discarded. See the module documentation for what happens to the
    /// connections at the restore.
    pub fn blackhole(&self) {
        self.shared.apply(Action::Blackhole);
    }

    /// Ends a cut or a blackhole. Connections that lost bytes to a blackhole
    /// are reset now; new connections are forwarded normally.
    pub fn restore(&self) {
        self.shared.apply(Action::Restore);
    }

    /// Performs `action` once `after` has elapsed (unless the link is
    /// stopped first). Must be called within a tokio runtime.
    ///
    /// # Panics
    ///
    /// If `action` sets an invalid configuration, or if more than
    /// [`SCHEDULED_ACTIONS_MAX`] actions are pending.
    pub fn schedule(&self, after: Duration, action: Action) {
        if let Action::SetConfig(config) = &action {
            assert_eq!(config.validate(), Ok(()), "scheduled an invalid link configuration");
        }
        let mut scheduled = self.scheduled.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while scheduled.try_join_next().is_some() {}
        assert!(scheduled.len() < SCHEDULED_ACTIONS_MAX, "too many pending link actions");
        let shared = Arc::clone(&self.shared);
        scheduled.spawn(async move {
            tokio::time::sleep(after).await;
            shared.apply(action);
        });
    }

    /// The link's counters now.
    pub fn stats(&self) -> LinkStats {
        let counters = &self.shared.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LinkStats {
            bytes_to_target: load(&counters.bytes_to_target),
            bytes_to_client: load(&counters.bytes_to_client),
            bytes_discarded: load(&counters.bytes_discarded),
            bytes_queued: self.shared.pipes.iter().map(|pipe| pipe.lock().budget.held_bytes() as u64).sum(),
            connections_accepted: load(&counters.connections_accepted),
            connections_open: load(&counters.connections_open),
            connections_refused: load(&counters.connections_refused),
            connections_reset: load(&counters.connections_reset),
            cuts: self.shared.state.borrow().cuts,
        }
    }

    /// Stops the link and waits until the listener is closed and every
    /// connection task has ended (their sockets closed). Pending scheduled
    /// actions are dropped. Dropping a [`Link`] stops it too, without
    /// waiting.
    pub async fn stop(mut self) {
        self.scheduled.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).abort_all();
        drop(self.stop_tx.take());
        if let Some(accept_task) = self.accept_task.take() {
            // The accept task only ends by being told to, or by a panic,
            // which the test running it should see.
            if let Err(error) = accept_task.await
                && error.is_panic()
            {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Aborting the accept task drops the listener and its JoinSet, which
        // aborts every connection task; the scheduled actions' JoinSet
        // aborts its tasks when it is dropped with the Link.
        if let Some(accept_task) = self.accept_task.take() {
            accept_task.abort();
        }
    }
}

/// The state shared by the [`Link`] handle and its tasks.
#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    config: Mutex<LinkConfig>,
    /// The link's mode; connection tasks watch it to learn of cuts and
    /// restores.
    state: watch::Sender<LinkState>,
    /// Indexed by [`Direction`].
    pipes: [Pipe; 2],
    counters: Counters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkState {
    mode: Mode,
    /// Cuts so far: a connection that sees it change was cut, even if the
    /// link was restored before the connection looked.
    cuts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Cut,
    Blackhole,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_to_target: AtomicU64,
    bytes_to_client: AtomicU64,
    bytes_discarded: AtomicU64,
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    connections_reset: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToTarget = 0,
    ToClient = 1,
}

impl Shared {
    fn config(&self) -> MutexGuard<'_, LinkConfig> {
        // The lock is never held across a panic-prone section, but a poisoned
        // one still holds a valid configuration.
        self.config.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_config(&self, config: LinkConfig) {
        assert_eq!(config.validate(), Ok(()), "invalid link configuration");
        *self.config() = config;
        // A larger buffer may let waiting readers in.
        for pipe in &self.pipes {
            pipe.room_freed.notify_waiters();
        }
    }

    fn apply(&self, action: Action) {
        match action {
            Action::Cut => self.state.send_modify(|state| {
                state.mode = Mode::Cut;
                state.cuts += 1;
            }),
            Action::Blackhole => self.state.send_modify(|state| state.mode = Mode::Blackhole),
            Action::Restore => self.state.send_modify(|state| state.mode = Mode::Normal),
            Action::SetConfig(config) => self.set_config(config),
        }
    }

    fn mode(&self) -> Mode {
        self.state.borrow().mode
    }

    fn delivered(&self, direction: Direction, bytes: usize) {
        let counter = match direction {
            Direction::ToTarget => &self.counters.bytes_to_target,
            Direction::ToClient => &self.counters.bytes_to_client,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn discarded(&self, bytes: usize) {
        self.counters.bytes_discarded.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// One direction's pipe: its clock and its byte budget, behind one lock
/// that is never held across an await.
#[derive(Debug)]
struct Pipe {
    state: Mutex<PipeState>,
    room_freed: Notify,
}

#[derive(Debug)]
struct PipeState {
    clock: PipeClock,
    budget: Budget,
}

impl Pipe {
    fn new(seed: u64) -> Pipe {
        Pipe {
            state: Mutex::new(PipeState { clock: PipeClock::new(seed), budget: Budget::default() }),
            room_freed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until the pipe has room for `bytes`, takes it and returns the
    /// piece's delivery instant.
    async fn enter(&self, shared: &Shared, bytes: usize, connection: &mut ConnectionClock) -> Instant {
        loop {
            let room_freed = self.room_freed.notified();
            tokio::pin!(room_freed);
            // Registered before the check, so a release between the check
            // and the await is not missed.
            room_freed.as_mut().enable();
            {
                let config = shared.config().clone();
                let mut state = self.lock();
                if state.budget.try_take(bytes, config.buffer_bytes) {
                    return state.clock.schedule(&config, Instant::now(), bytes, connection);
                }
            }
            room_freed.await;
        }
    }

    fn leave(&self, bytes: usize) {
        self.lock().budget.give_back(bytes);
        self.room_freed.notify_waiters();
    }
}

/// A piece of one connection in one direction, on its way to the writer.
/// Empty bytes stand for the sender's end of stream.
#[derive(Debug)]
struct Piece<'pipe> {
    bytes: Vec<u8>,
    release_at: Instant,
    /// The piece's room in the pipe, given back when it is dropped (after
    /// delivery, or with a connection that is torn down).
    _room: Room<'pipe>,
}

#[derive(Debug)]
struct Room<'pipe> {
    pipe: &'pipe Pipe,
    bytes: usize,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.pipe.leave(self.bytes);
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop_rx: watch::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // The sender is only dropped, never used: this resolves at stop.
            _ = stop_rx.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    shared.counters.connections_accepted.fetch_add(1, Ordering::Relaxed);
                    let state = *shared.state.borrow();
                    if state.mode == Mode::Cut {
                        shared.counters.connections_refused.fetch_add(1, Ordering::Relaxed);
                        reset(&client);
                        continue;
                    }
                    connections.spawn(forward_connection(Arc::clone(&shared), client, state.cuts));
                }
                // Out of file descriptors and the like: pause rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Forwards one accepted connection until both directions have ended, or
/// resets it (cut, tainted by a blackhole, socket error).
async fn forward_connection(shared: Arc<Shared>, mut client: TcpStream, cuts_at_accept: u64) {
    let counters = &shared.counters;
    counters.connections_open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(counters);
    let tainted = AtomicBool::new(false);
    let kill = killed(shared.state.subscribe(), cuts_at_accept, &tainted);
    tokio::pin!(kill);
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(shared.target));
    let connected = tokio::select! {
        connected = connect => connected.ok().and_then(Result::ok),
        // Cut while connecting.
        () = &mut kill => None,
    };
    let Some(mut target) = connected else {
        counters.connections_reset.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        return;
    };
    // Nagle's algorithm would add delays the configuration did not ask for.
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    let completed = {
        let (client_read, client_write) = client.split();
        let (target_read, target_write) = target.split();
        let forward = async {
            tokio::try_join!(
                forward_direction(&shared, Direction::ToTarget, client_read, target_write, &tainted),
                forward_direction(&shared, Direction::ToClient, target_read, client_write, &tainted),
            )
        };
        tokio::select! {
            outcome = forward => outcome.is_ok(),
            () = &mut kill => false,
        }
    };
    if !completed {
        counters.connections_reset.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        reset(&target);
    }
}

struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes the socket's close a reset rather than an orderly end of stream.
fn reset(stream: &TcpStream) {
    // Failing only means the peer sees an orderly close instead.
    let _ = stream.set_zero_linger();
}

/// Resolves when the connection must be reset: the link was cut since it
/// was accepted, or it was restored while the connection is tainted, or the
/// link is gone.
async fn killed(mut state_rx: watch::Receiver<LinkState>, cuts_at_accept: u64, tainted: &AtomicBool) {
    loop {
        let state = *state_rx.borrow_and_update();
        if state.mode == Mode::Cut || state.cuts != cuts_at_accept {
            return;
        }
        // The readers and writers set the taint in the same poll in which
        // they see the blackhole, so a restore after that is seen here.
        if state.mode == Mode::Normal && tainted.load(Ordering::Relaxed) {
            return;
        }
        if state_rx.changed().await.is_err() {
            return;
        }
    }
}

/// One direction of one connection: a reader and a writer joined by a
/// bounded queue.
async fn forward_direction(
    shared: &Shared,
    direction: Direction,
    from: ReadHalf<'_>,
    to: WriteHalf<'_>,
    tainted: &AtomicBool,
) -> io::Result<()> {
    let (pieces_tx, pieces_rx) = mpsc::channel(CONNECTION_QUEUE_PIECES_MAX);
    tokio::try_join!(
        read_pieces(shared, direction, from, pieces_tx, tainted),
        write_pieces(shared, direction, to, pieces_rx, tainted),
    )?;
    Ok(())
}

/// Marks the connection as having lost data to a blackhole.
fn taint(shared: &Shared, tainted: &AtomicBool, bytes: usize) {
    tainted.store(true, Ordering::Relaxed);
    shared.discarded(bytes);
}

async fn read_pieces<'pipe>(
    shared: &'pipe Shared,
    direction: Direction,
    mut from: ReadHalf<'_>,
    pieces_tx: mpsc::Sender<Piece<'pipe>>,
    tainted: &AtomicBool,
) -> io::Result<()> {
    let pipe = &shared.pipes[direction as usize];
    let mut connection = ConnectionClock::default();
    let mut buffer = vec![0; PIECE_BYTES_MAX];
    loop {
        let piece_bytes = PipeClock::piece_bytes(&shared.config());
        let read = from.read(&mut buffer[..piece_bytes]).await;
        if shared.mode() == Mode::Blackhole {
            // Lost in the blackhole, end of stream and errors included: the
            // other side must hear nothing of them.
            taint(shared, tainted, *read.as_ref().unwrap_or(&0));
            if matches!(read, Ok(0) | Err(_)) {
                return std::future::pending().await;
            }
            continue;
        }
        let bytes = read?;
        let release_at = pipe.enter(shared, bytes, &mut connection).await;
        let room = Room { pipe, bytes };
        if shared.mode() == Mode::Blackhole {
            // The blackhole began while the piece waited for room.
            taint(shared, tainted, bytes);
            if bytes == 0 {
                return std::future::pending().await;
            }
            continue;
        }
        let piece = Piece { bytes: buffer[..bytes].to_vec(), release_at, _room: room };
        if pieces_tx.send(piece).await.is_err() || bytes == 0 {
            // The writer only stops early with an error, which ends the
            // connection anyway.
            return Ok(());
        }
    }
}

async fn write_pieces(
    shared: &Shared,
    direction: Direction,
    mut to: WriteHalf<'_>,
    mut pieces_rx: mpsc::Receiver<Piece<'_>>,
    tainted: &AtomicBool,
) -> io::Result<()> {
    while let Some(piece) = pieces_rx.recv().await {
        tokio::time::sleep_until(piece.release_at).await;
        // The piece leaves the pipe: its room goes back to the readers.
        let Piece { bytes, release_at: _, _room: room } = piece;
        drop(room);
        if shared.mode() == Mode::Blackhole {
            taint(shared, tainted, bytes.len());
            if bytes.is_empty() {
                return std::future::pending().await;
            }
            continue;
        }
        if bytes.is_empty() {
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&bytes).await?;
        shared.delivered(direction, bytes.len());
    }
    // The reader stopped without an end of stream: it only does so when the
    // connection is ending anyway.
    Ok(())
}
