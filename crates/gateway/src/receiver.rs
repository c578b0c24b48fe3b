//! The receiving end of WAN links: the `edgebus.v1.Wan` service.
//!
//! One task per session reads frames, checks each against the credit core
//! (a frame beyond credit or out of sequence closes the link), and hands
//! the events to a writer task that writes them with
//! [`Store::replicate`](edgebus_store::Store::replicate) (exists-or-write at
//! the origin's versions) and reports what is durable; grants follow
//! durability. The writer keeps one store call in flight per lane, so a
//! critical frame is not written after (and with) the bulk frames ahead of
//! it; the durable prefix it reports is still in sequence order across
//! lanes. Everything already accepted into the writer is written even when
//! the session ends.

use std::sync::Arc;
use std::time::Duration;

use edgebus_proto::v1;
use edgebus_store::{ExistsOrWrite, ReplicaWrite};

use crate::site::{Fence, ReplicaAnswer, ReplicaRefusal, Site, SiteError};
use edgebus_types::{EventId, EventType, NewEvent, Origin, SiteName, StreamName};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::credit::{Amount, CreditReceiver, Grant, ReceiverConfig};
use crate::metrics::{GatewayMetrics, LatencyHistogram, now_ms};

/// The WAN protocol version this gateway speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest WAN frame accepted (a batch of events, encoded).
pub const WAN_FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// HTTP/2 flow-control windows of WAN links (stream and connection), at
/// least the largest credit window: HTTP/2's default 64 KiB would cap a
/// route at 64 KiB per round trip whatever credit the receiver grants.
pub const WAN_H2_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// How long a new session may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most replicated events written in one store call.
const WRITE_BATCH_EVENTS_MAX: usize = 4096;

/// Close codes of `LinkClose` (see wan.proto).
pub mod close {
    /// Unknown protocol version.
    pub const VERSION: u32 = 1;
    /// The hello named another site.
    pub const WRONG_SITE: u32 = 2;
    /// The peer is not an accepted site.
    pub const UNKNOWN_PEER: u32 = 3;
    /// Credit, sequence or frame violation.
    pub const VIOLATION: u32 = 4;
    /// An event the peer may not send.
    pub const REFUSED_EVENT: u32 = 5;
    /// The receiver is stopping.
    pub const STOPPING: u32 = 6;
    /// The store failed.
    pub const STORE: u32 = 7;
    /// The sending gateway's term is older than one its site has since
    /// granted: it was deposed.
    pub const FENCED: u32 = 8;
}

/// What the receiving side needs.
#[derive(Debug, Clone)]
pub struct ReceiverSettings {
    /// This site.
    pub site: SiteName,
    /// Sites accepted as peers; empty: any other site.
    pub peers: Vec<SiteName>,
    /// Window sizing of every session.
    pub credit: ReceiverConfig,
    /// Grants go out at least this often; a sender silent for
    /// [`ReceiverSettings::dead_after`] is dropped.
    pub heartbeat: Duration,
    /// Silence after which a session is judged dead.
    pub dead_after: Duration,
}

/// The `Wan` gRPC service.
#[derive(Debug, Clone)]
pub struct WanService {
    site: Arc<dyn Site>,
    settings: Arc<ReceiverSettings>,
    metrics: Arc<GatewayMetrics>,
    stop: watch::Receiver<bool>,
}

impl WanService {
    /// A service writing into `store`; sessions end when `stop` turns true.
    pub fn new(
        site: Arc<dyn Site>,
        settings: ReceiverSettings,
        metrics: Arc<GatewayMetrics>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self { site, settings: Arc::new(settings), metrics, stop }
    }

    /// The tonic server for this service, with the frame limit.
    pub fn into_server(self) -> v1::wan_server::WanServer<Self> {
        v1::wan_server::WanServer::new(self)
            .max_decoding_message_size(WAN_FRAME_BYTES_MAX)
            .max_encoding_message_size(WAN_FRAME_BYTES_MAX)
    }
}

type ControlSender = mpsc::Sender<Result<v1::LinkControl, Status>>;

#[tonic::async_trait]
impl v1::wan_server::Wan for WanService {
    type LinkStream = ReceiverStream<Result<v1::LinkControl, Status>>;

    async fn link(&self, request: Request<Streaming<v1::LinkFrame>>) -> Result<Response<Self::LinkStream>, Status> {
        let peer = request.remote_addr().map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let inbound = request.into_inner();
        let (out, rx) = mpsc::channel(16);
        let session = Session {
            site: Arc::clone(&self.site),
            settings: Arc::clone(&self.settings),
            metrics: Arc::clone(&self.metrics),
            out,
            peer,
        };
        tokio::spawn(session.run(inbound, self.stop.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why a session ends from our side: a close code and the reason.
#[derive(Debug)]
struct Closing {
    code: u32,
    reason: String,
}

fn closing(code: u32, reason: impl Into<String>) -> Closing {
    Closing { code, reason: reason.into() }
}

struct Session {
    site: Arc<dyn Site>,
    settings: Arc<ReceiverSettings>,
    metrics: Arc<GatewayMetrics>,
    out: ControlSender,
    peer: String,
}

/// Events handed to the writer, with the session amount they end at, when
/// their frame arrived and its lane.
struct Pending {
    end: Amount,
    arrived: std::time::Instant,
    lane: u32,
    writes: Vec<ReplicaWrite>,
}

impl Session {
    async fn run(self, mut inbound: Streaming<v1::LinkFrame>, mut stop: watch::Receiver<bool>) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(v1::LinkFrame { kind: Some(v1::link_frame::Kind::Hello(hello)) }))) => hello,
            Ok(Ok(Some(_))) => return self.refuse(closing(close::VIOLATION, "the first frame must be hello")).await,
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                eprintln!("edgebus gateway: link from {} failed before hello: {}", self.peer, status.message());
                return;
            }
            Err(_) => return self.refuse(closing(close::VIOLATION, "no hello within 10 s")).await,
        };
        let from = match self.check_hello(&hello) {
            Ok(from) => from,
            Err(refusal) => return self.refuse(refusal).await,
        };
        // The link's term is admitted before anything else: a higher one
        // fences every older session from that site at once.
        let fence = Fence { origin: from.to_string(), term: hello.term };
        if let Err(e) = self.site.replicate(fence.clone(), Vec::new()).await {
            let code = if matches!(e, SiteError::Fenced { .. }) { close::FENCED } else { close::STORE };
            return self.refuse(closing(code, e.to_string())).await;
        }
        let welcome = v1::link_control::Kind::Welcome(v1::LinkWelcome {
            protocol_version: PROTOCOL_VERSION,
            site: self.settings.site.to_string(),
        });
        if self.out.send(Ok(v1::LinkControl { kind: Some(welcome) })).await.is_err() {
            return;
        }
        let site_metrics = self.metrics.inbound(from.as_str());
        site_metrics.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let credit = window_within(self.settings.credit, &hello);
        let lanes = hello.lanes.len().max(1);
        let ended = self.serve(&from, &fence, credit, lanes, &mut inbound, &mut stop).await;
        site_metrics.sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(refusal) = ended {
            eprintln!(
                "edgebus gateway: closing the link from site {from} ({}): {} (code {})",
                self.peer, refusal.reason, refusal.code
            );
            site_metrics.closed_by_us.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.refuse(refusal).await;
        }
    }

    async fn refuse(&self, refusal: Closing) {
        let kind = v1::link_control::Kind::Close(v1::LinkClose { code: refusal.code, reason: refusal.reason });
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.out.send(Ok(v1::LinkControl { kind: Some(kind) }))).await;
    }

    fn check_hello(&self, hello: &v1::LinkHello) -> Result<SiteName, Closing> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(closing(
                close::VERSION,
                format!(
                    "protocol version {} is unknown; this gateway speaks {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            ));
        }
        let site = &self.settings.site;
        if hello.target_site != site.as_str() {
            return Err(closing(close::WRONG_SITE, format!("this is site {site}, not {:?}", hello.target_site)));
        }
        let from = SiteName::new(&hello.site).map_err(|e| closing(close::UNKNOWN_PEER, e.to_string()))?;
        if &from == site {
            return Err(closing(close::UNKNOWN_PEER, format!("the peer claims to be site {site}, which is this site")));
        }
        if !self.settings.peers.is_empty() && !self.settings.peers.contains(&from) {
            return Err(closing(close::UNKNOWN_PEER, format!("site {from} is not an accepted peer of site {site}")));
        }
        Ok(from)
    }

    async fn serve(
        &self,
        from: &SiteName,
        fence: &Fence,
        config: ReceiverConfig,
        lanes: usize,
        inbound: &mut Streaming<v1::LinkFrame>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Closing> {
        let started = std::time::Instant::now();
        let clock = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut credit = CreditReceiver::try_new(config, clock())
            .map_err(|e| closing(close::STORE, format!("invalid receiver window settings: {e}")))?;
        // Bounded by credit, not by the channel: a frame is queued only once
        // the credit core accepted it, so what waits here is at most the
        // window (received − durable ≤ the window's upper bound).
        let (pending_tx, pending_rx) = mpsc::unbounded_channel::<Pending>();
        let (durable_tx, mut durable_rx) = watch::channel(Ok((Amount::ZERO, std::time::Instant::now())));
        let writer = tokio::spawn(write_loop(
            Arc::clone(&self.site),
            pending_rx,
            durable_tx,
            Arc::clone(&self.metrics),
            fence.clone(),
        ));
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_frame = clock();
        let dead_after = u64::try_from(self.settings.dead_after.as_millis()).unwrap_or(u64::MAX);
        let result = loop {
            tokio::select! {
                frame = inbound.message() => {
                    let frame = match frame {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break Ok(()),
                        Err(status) => break Err(closing(close::VIOLATION, format!("the link failed: {}", status.message()))),
                    };
                    last_frame = clock();
                    match frame.kind {
                        Some(v1::link_frame::Kind::Batch(batch)) => {
                            if let Err(refusal) = self.accept_batch(from, batch, lanes, &mut credit, clock(), &pending_tx) {
                                break Err(refusal);
                            }
                        }
                        Some(v1::link_frame::Kind::Heartbeat(heartbeat)) => credit.on_echo(heartbeat.echo, clock()),
                        Some(v1::link_frame::Kind::Hello(_)) => break Err(closing(close::VIOLATION, "a second hello")),
                        None => break Err(closing(close::VIOLATION, "a frame with no content")),
                    }
                }
                changed = durable_rx.changed() => {
                    if changed.is_err() {
                        break Err(closing(close::STORE, "the writer stopped"));
                    }
                    let durable = durable_rx.borrow_and_update().clone();
                    match durable {
                        Ok((amount, arrived)) => {
                            let service = u64::try_from(arrived.elapsed().as_millis()).unwrap_or(u64::MAX);
                            credit.on_service_time(service, clock());
                            // Every durable step is acknowledged at once (a
                            // grant is small, and write batches coalesce under
                            // load), so the sender's cursors and ack latency
                            // follow the writes, not the heartbeat.
                            credit.on_durable(amount, clock());
                            self.send_grant(credit.grant(clock()), credit.bandwidth_bytes_per_s());
                        }
                        Err((code, reason)) => break Err(closing(code, reason)),
                    }
                }
                _ = tick.tick() => {
                    if clock().saturating_sub(last_frame) > dead_after {
                        break Err(closing(close::VIOLATION, format!("no frame for {} ms", dead_after)));
                    }
                    self.send_grant(credit.grant(clock()), credit.bandwidth_bytes_per_s());
                }
                _ = stop.changed() => break Err(closing(close::STOPPING, "the receiving gateway is stopping")),
            }
        };
        // What was accepted is written whatever happens to the session.
        drop(pending_tx);
        let _ = writer.await;
        result
    }

    /// Grants are absolute and repeated: one that finds the control queue
    /// full is dropped, the next repeats it.
    fn send_grant(&self, grant: Grant, bandwidth: Option<u64>) {
        let Grant { up_to, durable, window, ping, ping_sent_ms, pace_bytes } = grant;
        let grant = v1::LinkGrant {
            up_to_events: up_to.events,
            up_to_bytes: up_to.bytes,
            durable_events: durable.events,
            durable_bytes: durable.bytes,
            window_events: window.events,
            window_bytes: window.bytes,
            ping,
            ping_sent_ms,
            bandwidth_bytes_per_s: bandwidth.unwrap_or(0),
            pace_bytes,
        };
        let _ = self.out.try_send(Ok(v1::LinkControl { kind: Some(v1::link_control::Kind::Grant(grant)) }));
    }

    fn accept_batch(
        &self,
        from: &SiteName,
        mut batch: v1::LinkBatch,
        lanes: usize,
        credit: &mut CreditReceiver,
        now: u64,
        pending: &mpsc::UnboundedSender<Pending>,
    ) -> Result<(), Closing> {
        if batch.lane as usize >= lanes {
            return Err(closing(
                close::VIOLATION,
                format!("a batch names lane {}, but the hello listed {lanes} lane(s)", batch.lane),
            ));
        }
        crate::wire::restore_repeats(&mut batch.events);
        let events = batch.events.len() as u64;
        let bytes: u64 = batch.events.iter().map(|e| e.encoded_len() as u64).sum();
        credit.on_data(batch.first_seq, events, bytes, now).map_err(|v| closing(close::VIOLATION, v.to_string()))?;
        credit.on_echo(batch.echo, now);
        if batch.app_limited {
            credit.on_app_limited();
        }
        let mut writes = Vec::with_capacity(batch.events.len());
        for (i, event) in batch.events.into_iter().enumerate() {
            let seq = batch.first_seq + i as u64;
            writes.push(
                self.replica_write(from, event)
                    .map_err(|reason| closing(close::REFUSED_EVENT, format!("event at sequence {seq}: {reason}")))?,
            );
        }
        if !writes.is_empty() {
            let _ = pending.send(Pending {
                end: credit.received(),
                arrived: std::time::Instant::now(),
                lane: batch.lane,
                writes,
            });
        }
        Ok(())
    }

    fn replica_write(&self, from: &SiteName, event: v1::ReplicatedEvent) -> Result<ReplicaWrite, String> {
        let stream = StreamName::new(&event.stream).map_err(|e| e.to_string())?;
        let site = SiteName::new(&event.origin_site).map_err(|e| format!("origin site: {e}"))?;
        if site == self.settings.site {
            return Err(format!("stream {stream} belongs to this site ({site}); a peer may not write it"));
        }
        let id: [u8; 16] =
            event.id.as_slice().try_into().map_err(|_| format!("event id is {} bytes, expected 16", event.id.len()))?;
        let event_type = EventType::new(&event.r#type).map_err(|e| e.to_string())?;
        let sparse = !event.note.is_empty();
        Ok(ReplicaWrite {
            stream,
            version: (!sparse).then_some(event.version),
            event: NewEvent {
                id: EventId::from_bytes(id),
                event_type,
                data: event.data,
                metadata: event.metadata,
                timestamp_ms: event.timestamp_ms,
            },
            origin: Origin { site, position: event.origin_position, via: from.clone(), note: event.note },
        })
    }
}

/// This receiver's window settings, narrowed to the bounds the route asks
/// for where they fit inside ours.
fn window_within(mut config: ReceiverConfig, hello: &v1::LinkHello) -> ReceiverConfig {
    let ours = config.bounds;
    let clamp = |asked: u64, ours_min: u64, ours_max: u64, default: u64| {
        if asked == 0 { default } else { asked.clamp(ours_min, ours_max) }
    };
    let max = Amount::new(
        clamp(hello.window_max_events, ours.min.events, ours.max.events, ours.max.events),
        clamp(hello.window_max_bytes, ours.min.bytes, ours.max.bytes, ours.max.bytes),
    );
    let min = Amount::new(
        clamp(hello.window_min_events, ours.min.events, max.events, ours.min.events),
        clamp(hello.window_min_bytes, ours.min.bytes, max.bytes, ours.min.bytes),
    );
    config.bounds = crate::credit::WindowBounds { min, max };
    config
}

/// The durable prefix and when the oldest frame written with it arrived, or
/// why the session must close.
type Durable = Result<(Amount, std::time::Instant), (u32, String)>;

/// A frame in the writer, in sequence order: whether it is written yet.
struct Frame {
    end: Amount,
    arrived: std::time::Instant,
    written: bool,
}

/// A lane's frames waiting for the writer (numbered in sequence order) and
/// whether a store call of the lane is in flight.
#[derive(Default)]
struct LaneWrites {
    queued: std::collections::VecDeque<(u64, Pending)>,
    busy: bool,
}

/// What a store call wrote: its lane, its frames (number, events) and, per
/// event, the origin timestamp and which latency histogram it goes to.
struct Call {
    lane: u32,
    frames: Vec<(u64, usize)>,
    stamps: Vec<(u64, usize)>,
    histograms: Vec<(SiteName, Arc<LatencyHistogram>)>,
}

/// Writes what sessions accepted and publishes the durable prefix.
///
/// Each lane's frames are written in order, queued ones coalesced into one
/// store call, with one call per lane in flight: a stream belongs to one
/// lane at a time (a stream moving lanes waits until the old lane is
/// acknowledged past the change), so each stream's events are written in
/// order, and a lane never waits for another's write. The durable prefix
/// grows in sequence order across lanes: up to the first frame not yet
/// written.
async fn write_loop(
    site: Arc<dyn Site>,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    durable: watch::Sender<Durable>,
    metrics: Arc<GatewayMetrics>,
    fence: Fence,
) {
    use futures_util::StreamExt as _;

    let site_metrics = metrics.inbound(&fence.origin);
    let mut failed = false;
    let mut closed = false;
    // Frames from number `first` on, not yet in the durable prefix.
    let mut frames: std::collections::VecDeque<Frame> = std::collections::VecDeque::new();
    let (mut first, mut next) = (0u64, 0u64);
    // Bounded like `frames`: entries only for lanes with work.
    let mut lanes: std::collections::BTreeMap<u32, LaneWrites> = std::collections::BTreeMap::new();
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    loop {
        // Take everything queued, so that a lane's call coalesces it.
        while let Ok(frame) = pending.try_recv() {
            enqueue(frame, &mut frames, &mut lanes, &mut next);
        }
        if failed {
            lanes.clear(); // the session is closing; nothing more is acknowledged
        }
        for (&lane, writes) in &mut lanes {
            if writes.busy || writes.queued.is_empty() {
                continue;
            }
            writes.busy = true;
            let (call, batch) = take_call(lane, &mut writes.queued, &metrics);
            let written = site.replicate(fence.clone(), batch);
            in_flight.push(async move { (call, written.await) });
        }
        lanes.retain(|_, writes| writes.busy || !writes.queued.is_empty());
        if closed && in_flight.is_empty() && lanes.is_empty() {
            return;
        }
        tokio::select! {
            frame = pending.recv(), if !closed => match frame {
                Some(frame) => enqueue(frame, &mut frames, &mut lanes, &mut next),
                None => closed = true,
            },
            Some((call, answers)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(writes) = lanes.get_mut(&call.lane) {
                    writes.busy = false;
                }
                if failed {
                    continue;
                }
                let answers = match answers {
                    Ok(answers) => answers,
                    Err(e) => {
                        failed = true;
                        let code = if matches!(e, SiteError::Fenced { .. }) { close::FENCED } else { close::STORE };
                        let _ = durable.send(Err((code, e.to_string())));
                        continue;
                    }
                };
                let refusal = check_answers(&call, answers, &site_metrics, |number| {
                    frames[usize::try_from(number - first).expect("a frame in the window")].written = true;
                });
                // The durable prefix: whole frames up to the first not written.
                let mut published = None;
                while frames.front().is_some_and(|f| f.written) {
                    let frame = frames.pop_front().expect("a front frame");
                    first += 1;
                    let arrived = published.map_or(frame.arrived, |(_, arrived)| arrived);
                    published = Some((frame.end, arrived));
                }
                if let Some(prefix) = published {
                    let _ = durable.send(Ok(prefix));
                }
                if let Some(refusal) = refusal {
                    site_metrics.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    failed = true;
                    let _ = durable.send(Err(refusal));
                }
            }
        }
    }
}

/// Numbers a frame, notes it in sequence order and queues it on its lane.
fn enqueue(
    frame: Pending,
    frames: &mut std::collections::VecDeque<Frame>,
    lanes: &mut std::collections::BTreeMap<u32, LaneWrites>,
    next: &mut u64,
) {
    frames.push_back(Frame { end: frame.end, arrived: frame.arrived, written: false });
    lanes.entry(frame.lane).or_default().queued.push_back((*next, frame));
    *next += 1;
}

/// Takes a lane's queued frames for one store call, up to
/// [`WRITE_BATCH_EVENTS_MAX`] events (at least one frame).
fn take_call(
    lane: u32,
    queued: &mut std::collections::VecDeque<(u64, Pending)>,
    metrics: &GatewayMetrics,
) -> (Call, Vec<ReplicaWrite>) {
    let mut call = Call { lane, frames: Vec::new(), stamps: Vec::new(), histograms: Vec::new() };
    let mut writes = Vec::new();
    while let Some((_, frame)) = queued.front() {
        if !writes.is_empty() && writes.len() + frame.writes.len() > WRITE_BATCH_EVENTS_MAX {
            break;
        }
        let (number, frame) = queued.pop_front().expect("a front frame");
        call.frames.push((number, frame.writes.len()));
        writes.extend(frame.writes);
    }
    // Origin timestamps for the latency histograms, which are looked up
    // once per origin site in the call, not once per event.
    for write in &writes {
        let site = &write.origin.site;
        let at = match call.histograms.iter().position(|(s, _)| s == site) {
            Some(at) => at,
            None => {
                call.histograms.push((site.clone(), metrics.latency_histogram(site.as_str())));
                call.histograms.len() - 1
            }
        };
        call.stamps.push((write.event.timestamp_ms, at));
    }
    (call, writes)
}

/// Counts a call's answers and marks each frame written whole (`written`
/// with its number); the refusal that ends the session, if an event was
/// refused (the frames from it on are not marked).
fn check_answers(
    call: &Call,
    answers: Vec<ReplicaAnswer>,
    site_metrics: &crate::metrics::InboundMetrics,
    mut written: impl FnMut(u64),
) -> Option<(u32, String)> {
    let now = now_ms();
    let mut answers = answers.into_iter().zip(&call.stamps);
    for &(number, len) in &call.frames {
        for _ in 0..len {
            let (answer, &(stamp, origin)) = answers.next().expect("one answer per write");
            match answer {
                Ok(ExistsOrWrite::Written { .. }) => {
                    site_metrics.written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    call.histograms[origin].1.observe(now.saturating_sub(stamp));
                }
                Ok(ExistsOrWrite::Exists { same: true, .. }) => {
                    site_metrics.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(ExistsOrWrite::Exists { same: false, position }) => {
                    return Some((
                        close::REFUSED_EVENT,
                        format!(
                            "a different event is already stored at that version (position {position} here): \
                             the home site's history differs from this replica's; compare the two sites' \
                             streams before replicating again"
                        ),
                    ));
                }
                Err(e) => return Some(refusal_of(&e)),
            }
        }
        written(number);
    }
    None
}

fn refusal_of(refusal: &ReplicaRefusal) -> (u32, String) {
    if refusal.retryable {
        (close::STORE, format!("the store cannot write: {}", refusal.message))
    } else {
        (close::REFUSED_EVENT, refusal.message.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credit::WindowBounds;
    use crate::site::SiteFuture;
    use edgebus_store::{AppendResult, Direction, StreamFrom};
    use edgebus_types::{ExpectedVersion, RecordedEvent};

    /// A site whose writes to `bulk.*` streams wait until the gate opens,
    /// and which notes every stream it wrote, in order.
    #[derive(Debug)]
    struct GatedSite {
        gate: watch::Receiver<bool>,
        /// Set once a bulk write waits at the gate.
        bulk_waiting: std::sync::atomic::AtomicBool,
        written: parking_lot::Mutex<Vec<String>>,
        end: watch::Sender<u64>,
    }

    fn unavailable<T>() -> SiteFuture<'static, T> {
        Box::pin(async { Err(SiteError::Unavailable("not in this test".into())) })
    }

    impl Site for GatedSite {
        fn read_log(&self, _: u64, _: usize, _: u64) -> SiteFuture<'_, Vec<RecordedEvent>> {
            unavailable()
        }
        fn read_stream(
            &self,
            _: StreamName,
            _: StreamFrom,
            _: Direction,
            _: usize,
        ) -> SiteFuture<'_, Vec<RecordedEvent>> {
            unavailable()
        }
        fn append(&self, _: StreamName, _: ExpectedVersion, _: Vec<NewEvent>) -> SiteFuture<'_, AppendResult> {
            unavailable()
        }
        fn replicate(&self, _: Fence, writes: Vec<ReplicaWrite>) -> SiteFuture<'_, Vec<ReplicaAnswer>> {
            Box::pin(async move {
                if writes.iter().any(|w| w.stream.as_str().starts_with("bulk.")) {
                    self.bulk_waiting.store(true, std::sync::atomic::Ordering::SeqCst);
                    let mut gate = self.gate.clone();
                    let _ = gate.wait_for(|open| *open).await;
                }
                let mut written = self.written.lock();
                written.extend(writes.iter().map(|w| w.stream.to_string()));
                Ok(writes.iter().map(|_| Ok(ExistsOrWrite::Written { position: 0 })).collect())
            })
        }
        fn end(&self) -> watch::Receiver<u64> {
            self.end.subscribe()
        }
    }

    fn frame(stream: &str, lane: u32, end: u64) -> Pending {
        let event = NewEvent {
            id: EventId::from_u128(u128::from(end)),
            event_type: EventType::new("t").expect("a valid type"),
            data: Vec::new(),
            metadata: Vec::new(),
            timestamp_ms: 1,
        };
        let site = SiteName::new("eu").expect("a valid site");
        Pending {
            end: Amount::new(end, end * 100),
            arrived: std::time::Instant::now(),
            lane,
            writes: vec![ReplicaWrite {
                stream: StreamName::new(stream).expect("a valid name"),
                version: Some(0),
                event,
                origin: Origin { site: site.clone(), position: end, via: site, note: String::new() },
            }],
        }
    }

    /// A critical frame behind a bulk one whose write is slow is written at
    /// once, but acknowledged only when the bulk frame is: the durable
    /// prefix stays in sequence order.
    #[tokio::test]
    async fn a_lane_is_not_written_behind_another_lanes_slow_write() {
        let (open, gate) = watch::channel(false);
        let site = Arc::new(GatedSite {
            gate,
            bulk_waiting: std::sync::atomic::AtomicBool::new(false),
            written: parking_lot::Mutex::new(Vec::new()),
            end: watch::channel(0).0,
        });
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        let (durable_tx, mut durable_rx) = watch::channel(Ok((Amount::ZERO, std::time::Instant::now())));
        let fence = Fence { origin: "eu".into(), term: 1 };
        let site_dyn: Arc<dyn Site> = Arc::clone(&site) as Arc<dyn Site>;
        let writer = tokio::spawn(write_loop(site_dyn, pending_rx, durable_tx, Arc::default(), fence));
        let deadline = std::time::Duration::from_secs(10);
        pending_tx.send(frame("bulk.a", 1, 1)).expect("the writer runs");
        tokio::time::timeout(deadline, async {
            while !site.bulk_waiting.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the bulk write starts");
        pending_tx.send(frame("critical.a", 0, 2)).expect("the writer runs");
        tokio::time::timeout(deadline, async {
            while site.written.lock().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the critical frame is written while the bulk write waits");
        assert_eq!(*site.written.lock(), ["critical.a"]);
        let durable = durable_rx.borrow_and_update().clone().expect("no failure");
        assert_eq!(durable.0, Amount::ZERO, "nothing acknowledged past the unwritten bulk frame");
        open.send(true).expect("the gate is watched");
        let durable =
            tokio::time::timeout(deadline, durable_rx.wait_for(|d| d.as_ref().is_ok_and(|(a, _)| a.events == 2)))
                .await
                .expect("both frames are acknowledged once the bulk one is written")
                .expect("the writer runs")
                .clone();
        assert_eq!(durable.expect("no failure").0, Amount::new(2, 200));
        assert_eq!(*site.written.lock(), ["critical.a", "bulk.a"]);
        drop(pending_tx);
        tokio::time::timeout(deadline, writer).await.expect("the writer ends").expect("without a panic");
    }

    #[test]
    fn a_route_narrows_the_window_within_the_receivers_bounds() {
        let config = ReceiverConfig {
            bounds: WindowBounds { min: Amount::new(64, 1 << 18), max: Amount::new(65_536, 1 << 26) },
            ..ReceiverConfig::default()
        };
        let hello = |min: (u64, u64), max: (u64, u64)| v1::LinkHello {
            window_min_events: min.0,
            window_min_bytes: min.1,
            window_max_events: max.0,
            window_max_bytes: max.1,
            ..v1::LinkHello::default()
        };
        assert_eq!(window_within(config, &hello((0, 0), (0, 0))).bounds.max, config.bounds.max);
        let narrowed = window_within(config, &hello((256, 1 << 20), (1024, 1 << 22))).bounds;
        assert_eq!((narrowed.min, narrowed.max), (Amount::new(256, 1 << 20), Amount::new(1024, 1 << 22)));
        // Asking beyond ours gets ours; a minimum above the maximum gets the maximum.
        let wide = window_within(config, &hello((1, 1), (1 << 40, 1 << 40))).bounds;
        assert_eq!((wide.min, wide.max), (config.bounds.min, config.bounds.max));
        let odd = window_within(config, &hello((5_000, 1 << 19), (1_000, 1 << 18))).bounds;
        assert_eq!(odd.min, Amount::new(1_000, 1 << 18));
    }
}
