//! The receiving end of WAN links: the `edgebus.v1.Wan` service.
//!
//! One task per session reads frames, checks each against the credit core
//! (a frame beyond credit or out of sequence closes the link), and hands
//! the events to a writer task that writes them with
//! [`Store::replicate`](edgebus_store::Store::replicate) (exists-or-write at
//! the origin's versions) and reports what is durable; grants follow
//! durability. Everything already accepted into the writer is written even
//! when the session ends.

use std::sync::Arc;
use std::time::Duration;

use edgebus_proto::v1;
use edgebus_store::{ExistsOrWrite, ReplicaWrite};

use crate::site::{Fence, ReplicaRefusal, Site, SiteError};
use edgebus_types::{EventId, EventType, NewEvent, Origin, SiteName, StreamName};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::credit::{Amount, CreditReceiver, Grant, ReceiverConfig};
use crate::metrics::{GatewayMetrics, LatencyHistogram, now_ms};

/// The WAN protocol version this gateway speaks.
pub const PROTOCOL_VERSION: u32 = 1;
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

/// Events handed to the writer, with the session amount they end at and
/// when their frame arrived.
struct Pending {
    end: Amount,
    arrived: std::time::Instant,
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
        let ended = self.serve(&from, &fence, credit, &mut inbound, &mut stop).await;
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
                            if let Err(refusal) = self.accept_batch(from, batch, &mut credit, clock(), &pending_tx) {
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
        batch: v1::LinkBatch,
        credit: &mut CreditReceiver,
        now: u64,
        pending: &mpsc::UnboundedSender<Pending>,
    ) -> Result<(), Closing> {
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
            let _ = pending.send(Pending { end: credit.received(), arrived: std::time::Instant::now(), writes });
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

/// Writes what sessions accepted, coalescing queued batches into one store
/// call, and publishes the durable prefix.
async fn write_loop(
    site: Arc<dyn Site>,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    durable: watch::Sender<Durable>,
    metrics: Arc<GatewayMetrics>,
    fence: Fence,
) {
    let site_metrics = metrics.inbound(&fence.origin);
    let mut failed = false;
    while let Some(first) = pending.recv().await {
        let mut batches = vec![first];
        let mut count = batches[0].writes.len();
        while count < WRITE_BATCH_EVENTS_MAX {
            match pending.try_recv() {
                Ok(next) => {
                    count += next.writes.len();
                    batches.push(next);
                }
                Err(_) => break,
            }
        }
        if failed {
            continue; // the session is closing; nothing more is acknowledged
        }
        let ends: Vec<(usize, Amount)> = batches.iter().map(|b| (b.writes.len(), b.end)).collect();
        let arrived = batches[0].arrived;
        let writes: Vec<ReplicaWrite> = batches.into_iter().flat_map(|b| b.writes).collect();
        // Origin timestamps for the latency histograms, which are looked up
        // once per origin site in the batch, not once per event.
        let mut histograms: Vec<(SiteName, Arc<LatencyHistogram>)> = Vec::new();
        let mut stamps: Vec<(u64, usize)> = Vec::with_capacity(writes.len());
        for write in &writes {
            let site = &write.origin.site;
            let at = match histograms.iter().position(|(s, _)| s == site) {
                Some(at) => at,
                None => {
                    histograms.push((site.clone(), metrics.latency_histogram(site.as_str())));
                    histograms.len() - 1
                }
            };
            stamps.push((write.event.timestamp_ms, at));
        }
        let answers = match site.replicate(fence.clone(), writes).await {
            Ok(answers) => answers,
            Err(e) => {
                failed = true;
                let code = if matches!(e, SiteError::Fenced { .. }) { close::FENCED } else { close::STORE };
                let _ = durable.send(Err((code, e.to_string())));
                continue;
            }
        };
        let now = now_ms();
        // The durable prefix: whole frames up to the first refused event.
        let mut prefix = None;
        let mut refusal = None;
        let mut answers = answers.into_iter().zip(stamps);
        'frames: for (len, end) in ends {
            for _ in 0..len {
                let (answer, (stamp, origin)) = answers.next().expect("one answer per write");
                match answer {
                    Ok(ExistsOrWrite::Written { .. }) => {
                        site_metrics.written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        histograms[origin].1.observe(now.saturating_sub(stamp));
                    }
                    Ok(ExistsOrWrite::Exists { same: true, .. }) => {
                        site_metrics.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(ExistsOrWrite::Exists { same: false, position }) => {
                        refusal = Some((
                            close::REFUSED_EVENT,
                            format!(
                                "a different event is already stored at that version (position {position} here): \
                                 the home site's history differs from this replica's; compare the two sites' \
                                 streams before replicating again"
                            ),
                        ));
                        break 'frames;
                    }
                    Err(e) => {
                        refusal = Some(refusal_of(&e));
                        break 'frames;
                    }
                }
            }
            prefix = Some(end);
        }
        if let Some(end) = prefix {
            let _ = durable.send(Ok((end, arrived)));
        }
        if let Some(refusal) = refusal {
            site_metrics.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            failed = true;
            let _ = durable.send(Err(refusal));
        }
    }
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
