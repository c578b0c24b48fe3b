//! The credit (demand) core: a stand-in with the final API, replaced by the
//! full core (window adaptation, lane shares) on merge.

/// Cumulative counters of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    /// Events.
    pub events: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What the receiver sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Absolute limit.
    pub up_to: Amount,
    /// Durable at the receiver.
    pub durable: Amount,
    /// Window size.
    pub window: Amount,
    /// Ping id.
    pub ping: u64,
    /// Receiver clock at the ping.
    pub ping_sent_ms: u64,
}

/// Window bounds.
#[derive(Debug, Clone, Copy)]
pub struct WindowBounds {
    /// Smallest window.
    pub min: Amount,
    /// Largest window.
    pub max: Amount,
}

/// Receiver settings.
#[derive(Debug, Clone, Copy)]
pub struct ReceiverConfig {
    /// Window bounds.
    pub bounds: WindowBounds,
    /// Gain in percent.
    pub gain_percent: u32,
    /// Min-RTT horizon.
    pub rtt_window_ms: u64,
}

/// A protocol violation by the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Not contiguous.
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap {
        /// Expected first sequence.
        expected: u64,
        /// Received first sequence.
        got: u64,
    },
    /// Beyond credit.
    #[error("beyond credit: limit {limit:?}, reached {reached:?}")]
    BeyondCredit {
        /// The limit.
        limit: Amount,
        /// What was reached.
        reached: Amount,
    },
}

/// Receiver side.
#[derive(Debug)]
pub struct CreditReceiver {
    config: ReceiverConfig,
    received: Amount,
    durable: Amount,
    granted: Amount,
    last_grant_durable: Amount,
    ping: u64,
}

impl CreditReceiver {
    /// Starts at the minimum window.
    pub fn new(config: ReceiverConfig, _now_ms: u64) -> Self {
        Self {
            config,
            received: Amount::default(),
            durable: Amount::default(),
            granted: config.bounds.max,
            last_grant_durable: Amount::default(),
            ping: 0,
        }
    }
    /// A data frame arrived.
    pub fn on_data(&mut self, first_seq: u64, events: u64, bytes: u64, _now_ms: u64) -> Result<(), Violation> {
        if first_seq != self.received.events {
            return Err(Violation::Gap { expected: self.received.events, got: first_seq });
        }
        let reached = Amount { events: self.received.events + events, bytes: self.received.bytes + bytes };
        if reached.events > self.granted.events || reached.bytes > self.granted.bytes && events > 1 {
            return Err(Violation::BeyondCredit { limit: self.granted, reached });
        }
        self.received = reached;
        Ok(())
    }
    /// Durable through.
    pub fn on_durable(&mut self, through: Amount, _now_ms: u64) {
        self.durable = through;
    }
    /// Echo.
    pub fn on_echo(&mut self, _ping: u64, _now_ms: u64) {}
    /// The grant to send.
    pub fn grant(&mut self, now_ms: u64) -> Grant {
        let window = self.config.bounds.max;
        let up_to = Amount {
            events: (self.durable.events + window.events).max(self.granted.events),
            bytes: (self.durable.bytes + window.bytes).max(self.granted.bytes),
        };
        self.granted = up_to;
        self.last_grant_durable = self.durable;
        self.ping += 1;
        Grant { up_to, durable: self.durable, window, ping: self.ping, ping_sent_ms: now_ms }
    }
    /// Whether a grant is worth sending now.
    pub fn grant_due(&self) -> bool {
        self.durable.events - self.last_grant_durable.events >= self.config.bounds.max.events / 4
    }
    /// Received so far.
    pub fn received(&self) -> Amount {
        self.received
    }
    /// Durable so far.
    pub fn durable(&self) -> Amount {
        self.durable
    }
    /// The window.
    pub fn window(&self) -> Amount {
        self.config.bounds.max
    }
    /// Measured RTT.
    pub fn rtt_ms(&self) -> Option<u64> {
        None
    }
    /// Measured bandwidth.
    pub fn bandwidth_bytes_per_s(&self) -> Option<u64> {
        None
    }
}

/// A lane's share.
#[derive(Debug, Clone, Copy)]
pub struct LaneShare {
    /// Reserved per mille of the window.
    pub reserved_permille: u32,
    /// Cap of the lane's in-flight amount.
    pub cap: Amount,
}

/// Why a lane cannot send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// The absolute limit.
    NoCredit,
    /// Lane arithmetic.
    LaneShare,
    /// Lane cap.
    LaneCap,
}

/// Sender side.
#[derive(Debug)]
pub struct CreditSender {
    lanes: Vec<LaneShare>,
    limit: Amount,
    durable: Amount,
    sent: Amount,
    echo: u64,
    in_flight: std::collections::VecDeque<(usize, u64)>,
    lane_in_flight: Vec<Amount>,
}

impl CreditSender {
    /// New sender.
    pub fn new(lanes: Vec<LaneShare>) -> Self {
        let n = lanes.len();
        Self {
            lanes,
            limit: Amount::default(),
            durable: Amount::default(),
            sent: Amount::default(),
            echo: 0,
            in_flight: std::collections::VecDeque::new(),
            lane_in_flight: vec![Amount::default(); n],
        }
    }
    /// A grant arrived.
    pub fn on_grant(&mut self, grant: &Grant) -> Amount {
        self.limit.events = self.limit.events.max(grant.up_to.events);
        self.limit.bytes = self.limit.bytes.max(grant.up_to.bytes);
        self.echo = self.echo.max(grant.ping);
        while self.durable.events < grant.durable.events.min(self.sent.events) {
            let (lane, bytes) = self.in_flight.pop_front().expect("in flight");
            self.lane_in_flight[lane].events -= 1;
            self.lane_in_flight[lane].bytes -= bytes;
            self.durable.events += 1;
            self.durable.bytes += bytes;
        }
        self.durable
    }
    /// Whether lane may send.
    pub fn may_send(&self, lane: usize, bytes: u64) -> bool {
        self.stall(lane, bytes).is_none()
    }
    /// Record a send.
    pub fn on_sent(&mut self, lane: usize, bytes: u64) -> u64 {
        let seq = self.sent.events;
        self.sent.events += 1;
        self.sent.bytes += bytes;
        self.in_flight.push_back((lane, bytes));
        self.lane_in_flight[lane].events += 1;
        self.lane_in_flight[lane].bytes += bytes;
        seq
    }
    /// Ping to echo.
    pub fn echo(&self) -> u64 {
        self.echo
    }
    /// Sent.
    pub fn sent(&self) -> Amount {
        self.sent
    }
    /// Durable.
    pub fn durable(&self) -> Amount {
        self.durable
    }
    /// Limit.
    pub fn limit(&self) -> Amount {
        self.limit
    }
    /// Lane in flight.
    pub fn in_flight(&self, lane: usize) -> Amount {
        self.lane_in_flight[lane]
    }
    /// Why lane cannot send.
    pub fn stall(&self, lane: usize, bytes: u64) -> Option<Stall> {
        let alone = self.sent == self.durable;
        if self.sent.events >= self.limit.events || (self.sent.bytes + bytes > self.limit.bytes && !alone) {
            return Some(Stall::NoCredit);
        }
        let cap = self.lanes[lane].cap;
        if self.lane_in_flight[lane].events >= cap.events {
            return Some(Stall::LaneCap);
        }
        None
    }
}
