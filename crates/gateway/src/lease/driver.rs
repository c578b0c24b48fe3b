//! Runs a [`LeaseCore`] against a site: reads the lease stream, makes the
//! appends the core asks for, says every lease that this gateway is alive
//! (`$gateway.members`), and publishes the role.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgebus_store::{Direction, StreamFrom};
use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    Append, Appended, LEASE_EVENT_TYPE, LEASE_STREAM, LeaseCore, LeaseRecord, LeaseView, MEMBER_EVENT_TYPE,
    MEMBERS_STREAM, Me, Role,
};
use crate::metrics::now_ms;
use crate::site::{Site, SiteError};

/// Lease records read per call.
const READ_PAGE: usize = 256;

/// A monotonic clock in milliseconds; tests inject one that jumps.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since an origin of the clock's choosing.
    fn now(&self) -> u64;
}

/// The process's monotonic clock.
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// What a route asks before every frame: may this gateway still send, and
/// under which term.
#[derive(Debug)]
pub struct Authority {
    clock: Arc<dyn Clock>,
    term: AtomicU64,
    valid_until: AtomicU64,
}

impl Authority {
    /// An authority that is never active until a lease says so.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock, term: AtomicU64::new(0), valid_until: AtomicU64::new(0) }
    }

    /// Whether frames under `term` may go out now.
    pub fn allows(&self, term: u64) -> bool {
        self.term.load(Ordering::Acquire) == term && self.clock.now() < self.valid_until.load(Ordering::Acquire)
    }

    fn set(&self, role: Role) {
        match role {
            Role::Active { term, valid_until } => {
                self.term.store(term, Ordering::Release);
                self.valid_until.store(valid_until, Ordering::Release);
            }
            Role::Standby => self.valid_until.store(0, Ordering::Release),
        }
    }
}

/// The lease as this gateway sees it, for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseStatus {
    /// This gateway.
    pub gateway: String,
    /// `active` or `standby`.
    pub role: &'static str,
    /// The term it sends under (0 when standby).
    pub term: u64,
    /// The lease stream's view.
    pub lease: LeaseView,
    /// The lease length.
    pub lease_ms: u64,
}

/// A membership heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The gateway's name.
    pub gateway: String,
    /// Its process.
    pub instance: String,
    /// `active` or `standby`.
    pub role: String,
    /// Its term when active.
    pub term: u64,
    /// Its WAN address.
    pub wan: String,
    /// Its HTTP address.
    pub http: String,
    /// Its lease length.
    pub lease_ms: u64,
}

/// Runs the lease of one gateway.
#[derive(Debug)]
pub struct LeaseDriver {
    site: Arc<dyn Site>,
    clock: Arc<dyn Clock>,
    core: LeaseCore,
    authority: Arc<Authority>,
    status: watch::Sender<LeaseStatus>,
    next_member_at: u64,
}

fn lease_stream() -> StreamName {
    StreamName::system(LEASE_STREAM).expect("valid system stream")
}

fn members_stream() -> StreamName {
    StreamName::system(MEMBERS_STREAM).expect("valid system stream")
}

fn event(event_type: &str, data: &impl Serialize) -> NewEvent {
    NewEvent {
        id: EventId::generate(),
        event_type: EventType::new(event_type).expect("valid type"),
        data: serde_json::to_vec(data).expect("serializable"),
        metadata: Vec::new(),
        timestamp_ms: now_ms(),
    }
}

/// Reads the lease stream's records from `from` (for operators and tests).
pub async fn read_lease(site: &dyn Site) -> Result<LeaseView, SiteError> {
    let mut view = LeaseView::default();
    if let Some((version, record, timestamp_ms)) = last_record(site).await? {
        view.apply(version, &record, timestamp_ms);
    }
    Ok(view)
}

/// The lease stream's last record: it alone tells the lease (see
/// [`LeaseView::apply`]).
async fn last_record(site: &dyn Site) -> Result<Option<(u64, LeaseRecord, u64)>, SiteError> {
    let events = site.read_stream(lease_stream(), StreamFrom::End, Direction::Backward, 1).await?;
    Ok(events.first().and_then(|e| {
        serde_json::from_slice::<LeaseRecord>(&e.data).ok().map(|record| (e.version, record, e.timestamp_ms))
    }))
}

/// The last heartbeat of every gateway, newest first (for operators).
pub async fn read_members(site: &dyn Site, count: usize) -> Result<Vec<(Member, u64)>, SiteError> {
    let events = site.read_stream(members_stream(), StreamFrom::End, Direction::Backward, count).await?;
    let mut seen: Vec<(Member, u64)> = Vec::new();
    for e in events {
        if let Ok(member) = serde_json::from_slice::<Member>(&e.data)
            && !seen.iter().any(|(m, _)| m.gateway == member.gateway)
        {
            seen.push((member, e.timestamp_ms));
        }
    }
    Ok(seen)
}

/// Appends an operator's release of `gateway`'s lease (the failover drill):
/// it must hold the lease now. Returns the view after the release.
pub async fn release_by_operator(site: &dyn Site, gateway: &str, reason: &str) -> Result<LeaseView, ReleaseError> {
    let view = read_lease(site).await.map_err(ReleaseError::Site)?;
    let holder = match &view.holder {
        Some(h) if h.gateway == gateway => h.clone(),
        Some(h) => {
            return Err(ReleaseError::NotHolder(format!(
                "gateway {gateway} does not hold the lease: {} does (term {})",
                h.gateway, h.term
            )));
        }
        None => return Err(ReleaseError::NotHolder(format!("no gateway holds the lease; {gateway} is not active"))),
    };
    let record = LeaseRecord::Released {
        gateway: gateway.to_owned(),
        term: holder.term,
        reason: reason.to_owned(),
        by: "operator".to_owned(),
    };
    let expected = view.version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
    match site.append(lease_stream(), expected, vec![event(LEASE_EVENT_TYPE, &record)]).await {
        Ok(_) => read_lease(site).await.map_err(ReleaseError::Site),
        Err(SiteError::WrongVersion { .. }) => {
            Err(ReleaseError::Moved("the lease changed while releasing it; look again with `edgebus gateways`".into()))
        }
        Err(e) => Err(ReleaseError::Site(e)),
    }
}

/// Why an operator's release failed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The named gateway does not hold the lease.
    #[error("{0}")]
    NotHolder(String),
    /// The lease moved meanwhile.
    #[error("{0}")]
    Moved(String),
    /// The site failed.
    #[error("{0}")]
    Site(SiteError),
}

impl LeaseDriver {
    /// A driver for `me` over `site`.
    pub fn new(site: Arc<dyn Site>, me: Me, clock: Arc<dyn Clock>) -> Self {
        let status = LeaseStatus {
            gateway: me.gateway.clone(),
            role: "standby",
            term: 0,
            lease: LeaseView::default(),
            lease_ms: me.lease_ms,
        };
        let core = LeaseCore::new(me, clock.now());
        Self {
            site,
            authority: Arc::new(Authority::new(Arc::clone(&clock))),
            clock,
            core,
            status: watch::channel(status).0,
            next_member_at: 0,
        }
    }

    /// What routes consult before every frame.
    pub fn authority(&self) -> Arc<Authority> {
        Arc::clone(&self.authority)
    }

    /// The published status.
    pub fn status(&self) -> watch::Receiver<LeaseStatus> {
        self.status.subscribe()
    }

    /// How often the driver runs a step.
    pub fn tick(&self) -> Duration {
        Duration::from_millis((self.core.me().lease_ms / 20).clamp(5, 250))
    }

    /// One step: read what is new, append what the core asks for, publish.
    pub async fn step(&mut self) {
        self.read().await;
        let now = self.clock.now();
        if let Some(append) = self.core.poll(now) {
            let outcome = self.append(&append).await;
            self.core.on_appended(outcome, now_ms(), self.clock.now());
            if outcome == Appended::Conflict {
                self.read().await;
            }
        }
        let now = self.clock.now();
        self.publish(now);
        if now >= self.next_member_at {
            self.next_member_at = now + self.core.me().lease_ms;
            let role = self.core.role(now);
            let me = self.core.me();
            let member = Member {
                gateway: me.gateway.clone(),
                instance: me.instance.clone(),
                role: if matches!(role, Role::Active { .. }) { "active" } else { "standby" }.to_owned(),
                term: match role {
                    Role::Active { term, .. } => term,
                    Role::Standby => 0,
                },
                wan: me.wan.clone(),
                http: me.http.clone(),
                lease_ms: me.lease_ms,
            };
            let _ =
                self.site.append(members_stream(), ExpectedVersion::Any, vec![event(MEMBER_EVENT_TYPE, &member)]).await;
        }
    }

    fn publish(&self, now: u64) {
        let role = self.core.role(now);
        self.authority.set(role);
        let status = LeaseStatus {
            gateway: self.core.me().gateway.clone(),
            role: if matches!(role, Role::Active { .. }) { "active" } else { "standby" },
            term: match role {
                Role::Active { term, .. } => term,
                Role::Standby => 0,
            },
            lease: self.core.view().clone(),
            lease_ms: self.core.me().lease_ms,
        };
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    async fn read(&mut self) {
        if self.core.view().version.is_none() {
            // First read: the last record, not the stream's whole history.
            match last_record(self.site.as_ref()).await {
                Ok(Some((version, record, timestamp_ms))) => {
                    self.core.observe(version, &record, timestamp_ms, self.clock.now());
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
        loop {
            let from = self.core.view().version.map_or(0, |v| v + 1);
            let Ok(events) =
                self.site.read_stream(lease_stream(), StreamFrom::Version(from), Direction::Forward, READ_PAGE).await
            else {
                return;
            };
            let now = self.clock.now();
            for e in &events {
                if let Ok(record) = serde_json::from_slice::<LeaseRecord>(&e.data) {
                    self.core.observe(e.version, &record, e.timestamp_ms, now);
                }
            }
            if events.len() < READ_PAGE {
                self.core.synced();
                return;
            }
        }
    }

    async fn append(&self, append: &Append) -> Appended {
        let expected = append.expected.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let limit = Duration::from_millis((self.core.me().lease_ms / 3).max(50));
        let call = self.site.append(lease_stream(), expected, vec![event(LEASE_EVENT_TYPE, &append.record)]);
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(written)) => Appended::Written(written.first_version),
            Ok(Err(SiteError::WrongVersion { .. })) => Appended::Conflict,
            Ok(Err(e)) => {
                eprintln!("edgebus gateway {}: lease append failed: {e}", self.core.me().gateway);
                Appended::Failed
            }
            Err(_) => Appended::Failed,
        }
    }

    /// Runs until `stop`; releases the lease on the way out if it holds it.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.step().await,
                _ = stop.changed() => break,
            }
        }
        if let Some(release) = self.core.release("the gateway stopped") {
            self.authority.set(Role::Standby);
            let _ = self.append(&release).await;
        }
        self.publish(self.clock.now());
    }
}
