//! Bad input on a WAN link (`edgebus.v1.Wan/Link`), sent by a raw tonic
//! client to a real site: each protocol violation is answered with
//! `LinkClose` and the code wan.proto gives it, and the receiving site keeps
//! serving: a later good session works and nothing it accepted is lost.

use std::net::SocketAddr;
use std::time::Duration;

use edgebus_proto::v1;
use edgebus_proto::v1::link_control::Kind as Control;
use edgebus_proto::v1::link_frame::Kind as Frame;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::sites::{GATEWAY_TIMING, Site, runtime, snapshot};

/// How long one answer may take.
const ANSWER_DEADLINE: Duration = Duration::from_secs(20);

/// One raw session: frames out, control messages in.
struct RawLink {
    frames: mpsc::Sender<v1::LinkFrame>,
    controls: tonic::Streaming<v1::LinkControl>,
}

/// What ended a session from the receiver's side.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// A `LinkClose` with this code.
    Closed(u32),
    /// The call ended without one (end of stream or an error status).
    Ended(String),
}

fn hello(site: &str, target_site: &str) -> v1::LinkFrame {
    v1::LinkFrame {
        kind: Some(Frame::Hello(v1::LinkHello {
            protocol_version: 2,
            site: site.into(),
            target_site: target_site.into(),
            route: "raw".into(),
            lanes: vec!["default".into()],
            ..v1::LinkHello::default()
        })),
    }
}

/// Event `version` of `stream`, homed at `origin_site`; its id is derived
/// from both so the test can recognise it.
fn replicated(stream: &str, version: u64, origin_site: &str) -> v1::ReplicatedEvent {
    let id = (u128::from(version) << 64) | u128::from(stream.len() as u64);
    v1::ReplicatedEvent {
        stream: stream.into(),
        version,
        id: id.to_be_bytes().to_vec(),
        r#type: "raw".into(),
        data: format!("{{\"v\":{version}}}").into_bytes(),
        metadata: Vec::new(),
        timestamp_ms: 1_700_000_000_000 + version,
        origin_site: origin_site.into(),
        origin_position: 1000 + version,
        note: String::new(),
    }
}

/// `replicated` events as a sender puts them in one batch: `stream`, `type`
/// and `origin_site` empty where they repeat the previous event's.
fn elided(mut events: Vec<v1::ReplicatedEvent>) -> Vec<v1::ReplicatedEvent> {
    for event in events.iter_mut().skip(1) {
        event.stream.clear();
        event.r#type.clear();
        event.origin_site.clear();
    }
    events
}

fn batch(first_seq: u64, events: Vec<v1::ReplicatedEvent>) -> v1::LinkFrame {
    v1::LinkFrame {
        kind: Some(Frame::Batch(v1::LinkBatch { first_seq, lane: 0, events, echo: 0, app_limited: false })),
    }
}

impl RawLink {
    /// Opens a session at `wan` with `first` as its first frame.
    async fn open(wan: SocketAddr, first: v1::LinkFrame) -> RawLink {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{wan}"))
            .expect("a URI")
            .connect()
            .await
            .expect("connect to the WAN port");
        let mut client = v1::wan_client::WanClient::new(channel);
        let (frames, rx) = mpsc::channel(16);
        frames.send(first).await.expect("queue the first frame");
        let controls = tokio::time::timeout(ANSWER_DEADLINE, client.link(ReceiverStream::new(rx)))
            .await
            .expect("the link call is answered")
            .expect("the link call is accepted")
            .into_inner();
        RawLink { frames, controls }
    }

    async fn send(&self, frame: v1::LinkFrame) {
        // The receiver may already have ended the call: a failed send shows
        // up as the ending read next.
        let _ = self.frames.send(frame).await;
    }

    /// The next control message, `None` when the call ended.
    async fn next(&mut self) -> Result<Option<Control>, String> {
        let message = tokio::time::timeout(ANSWER_DEADLINE, self.controls.message())
            .await
            .map_err(|_| format!("no control message within {ANSWER_DEADLINE:?}"))?;
        match message {
            Ok(Some(v1::LinkControl { kind })) => Ok(Some(kind.ok_or("an empty control message")?)),
            Ok(None) => Ok(None),
            Err(status) => Err(format!("status {status:?}")),
        }
    }

    /// Expects the welcome of site `site`.
    async fn welcomed(&mut self, site: &str) {
        match self.next().await {
            Ok(Some(Control::Welcome(welcome))) => {
                assert_eq!(welcome.site, site);
                assert_eq!(welcome.protocol_version, 2);
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// The first grant.
    async fn grant(&mut self) -> v1::LinkGrant {
        match self.next().await {
            Ok(Some(Control::Grant(grant))) => grant,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    /// Reads grants until one acknowledges `events` events as durable.
    async fn durable(&mut self, events: u64) {
        loop {
            match self.next().await {
                Ok(Some(Control::Grant(grant))) if grant.durable_events >= events => return,
                Ok(Some(Control::Grant(_))) => {}
                other => panic!("expected grants up to {events} durable events, got {other:?}"),
            }
        }
    }

    /// Reads (skipping grants) until the session ends.
    async fn ending(&mut self) -> Ending {
        loop {
            match self.next().await {
                Ok(Some(Control::Grant(_))) => {}
                Ok(Some(Control::Close(close))) => return Ending::Closed(close.code),
                Ok(Some(other)) => panic!("unexpected control message {other:?}"),
                Ok(None) => return Ending::Ended("end of stream".into()),
                Err(error) => return Ending::Ended(error),
            }
        }
    }
}

/// Every violation gets its close code; the site keeps what it accepted
/// before and serves a later good session.
#[test]
fn wan_link_bad_input_is_refused_and_the_site_keeps_serving() {
    let rt = runtime();
    let us = Site::start("us", &format!("[gateway]\n{GATEWAY_TIMING}peers = [\"eu\"]\n"));
    let wan = us.wan;
    rt.block_on(async {
        // A good session first: ten events of orders.eu.0.
        let mut good = RawLink::open(wan, hello("eu", "us")).await;
        good.welcomed("us").await;
        good.grant().await;
        good.send(batch(0, (0..10).map(|v| replicated("orders.eu.0", v, "eu")).collect())).await;
        good.durable(10).await;
        drop(good);

        let refused_hello = [
            (
                "an unknown protocol version",
                v1::LinkFrame {
                    kind: Some(Frame::Hello(v1::LinkHello { protocol_version: 3, ..hello_of("eu", "us") })),
                },
                1,
            ),
            ("a hello naming another site", hello("eu", "mars"), 2),
            ("a peer claiming to be this site", hello("us", "us"), 3),
            ("a peer not among the peers", hello("ap", "us"), 3),
            ("a batch before any hello", batch(0, vec![replicated("orders.eu.9", 0, "eu")]), 4),
        ];
        for (what, first, code) in refused_hello {
            let mut link = RawLink::open(wan, first).await;
            assert_eq!(link.ending().await, Ending::Closed(code), "{what}");
        }

        // A batch beyond the granted credit: refused whole.
        let mut link = RawLink::open(wan, hello("eu", "us")).await;
        link.welcomed("us").await;
        let grant = link.grant().await;
        assert!(grant.up_to_events > 0 && grant.up_to_events < 100_000, "{grant:?}");
        let beyond = (0..=grant.up_to_events).map(|v| replicated("orders.eu.1", v, "eu")).collect();
        link.send(batch(0, beyond)).await;
        assert_eq!(link.ending().await, Ending::Closed(4), "a batch beyond credit");

        // A gap in the sequence.
        let mut link = RawLink::open(wan, hello("eu", "us")).await;
        link.welcomed("us").await;
        link.grant().await;
        link.send(batch(5, vec![replicated("orders.eu.2", 0, "eu")])).await;
        assert_eq!(link.ending().await, Ending::Closed(4), "a gap in first_seq");

        // An event homed at the receiving site, after a good batch in the same session.
        let mut link = RawLink::open(wan, hello("eu", "us")).await;
        link.welcomed("us").await;
        link.grant().await;
        link.send(batch(0, (10..20).map(|v| replicated("orders.eu.0", v, "eu")).collect())).await;
        link.durable(10).await;
        link.send(batch(10, vec![replicated("orders.us.0", 0, "us")])).await;
        assert_eq!(link.ending().await, Ending::Closed(5), "an event whose origin is the receiving site");

        // A second hello.
        let mut link = RawLink::open(wan, hello("eu", "us")).await;
        link.welcomed("us").await;
        link.send(hello("eu", "us")).await;
        assert_eq!(link.ending().await, Ending::Closed(4), "a second hello");

        // A batch whose first event leaves out its stream (there is no
        // event before it in the batch to take the stream from).
        let mut link = RawLink::open(wan, hello("eu", "us")).await;
        link.welcomed("us").await;
        link.grant().await;
        let mut first = replicated("orders.eu.4", 0, "eu");
        first.stream.clear();
        link.send(batch(0, vec![first])).await;
        assert_eq!(link.ending().await, Ending::Closed(5), "a first event without its stream");

        // A batch naming a lane the hello did not list.
        let mut link = RawLink::open(wan, hello("eu", "us")).await;
        link.welcomed("us").await;
        link.grant().await;
        let mut unlisted = batch(0, vec![replicated("orders.eu.3", 0, "eu")]);
        if let Some(Frame::Batch(b)) = &mut unlisted.kind {
            b.lane = 1;
        }
        link.send(unlisted).await;
        assert_eq!(link.ending().await, Ending::Closed(4), "a lane the hello did not list");

        // A later good session works, with the repeated fields left out.
        let mut good = RawLink::open(wan, hello("eu", "us")).await;
        good.welcomed("us").await;
        good.grant().await;
        good.send(batch(0, elided((20..30).map(|v| replicated("orders.eu.0", v, "eu")).collect()))).await;
        good.durable(10).await;
    });

    // What was accepted is there, once, in order; nothing refused is.
    let held = snapshot(&rt, &us.grpc_uri());
    let names: Vec<&String> = held.keys().collect();
    assert_eq!(names, ["orders.eu.0"], "only the accepted stream exists");
    let events = &held["orders.eu.0"];
    assert_eq!(events.len(), 30);
    for (version, event) in events.iter().enumerate() {
        let want = replicated("orders.eu.0", version as u64, "eu");
        assert_eq!(event.version, version as u64);
        assert_eq!(event.id.as_bytes().as_slice(), want.id.as_slice());
        assert_eq!(event.event_type.as_str(), want.r#type);
        assert_eq!(event.data, want.data);
        assert_eq!(event.timestamp_ms, want.timestamp_ms);
        let origin = event.origin.as_ref().expect("a replicated event");
        assert_eq!((origin.site.as_str(), origin.via.as_str(), origin.position), ("eu", "eu", want.origin_position));
    }
    let inbound = us.inbound("eu");
    assert_eq!(inbound["events_written"], 30, "{inbound}");
    // The sessions that broke the protocol after their welcome were closed by us.
    assert!(inbound["closed"].as_u64().unwrap_or(0) >= 4, "{inbound}");
}

fn hello_of(site: &str, target_site: &str) -> v1::LinkHello {
    match hello(site, target_site).kind {
        Some(Frame::Hello(hello)) => hello,
        _ => unreachable!("hello() builds a hello"),
    }
}
