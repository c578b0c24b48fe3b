//! The gateway of a site: its routes and policies, kept as commands in the
//! log (`$gateway`), the route tasks, the WAN service, and what operators
//! see (Prometheus text, JSON).
//!
//! Lifecycle: [`Gateway::start`] runs the lease (see [`crate::lease`]): a
//! site may run several gateways, and only the one holding the lease sends.
//! When this gateway becomes active it replays `$gateway` (another gateway
//! may have changed it), writes the config file's routes and policies where
//! they differ from the log (the config declares; runtime changes last
//! until the next restart with a config that says otherwise), and starts
//! one task per route under its term; each resumes from the cursors the
//! previous holder checkpointed. When it loses the lease it stops them.
//! Runtime changes (only on the active gateway) append a command and apply
//! it at once; a policy change takes effect at its command's log position.
//! Every gateway, active or not, receives inbound links.
//! [`Gateway::stop`] stops every route, which checkpoints its cursors, and
//! releases the lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgebus_store::{Direction, StreamFrom};

use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, SiteName, StreamName};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::credit::ReceiverConfig;
use crate::def::{DefError, POLICIES_MAX, Policy, PolicyDef, ROUTES_MAX, Route, RouteDef, route_name};
use crate::health::{self, Health};
use crate::lease::driver::{Authority, Clock, LeaseDriver, LeaseStatus, MonotonicClock};
use crate::lease::{LEASE_MS_DEFAULT, LEASE_MS_MAX, LEASE_MS_MIN, Me};
use crate::metrics::{GatewayMetrics, now_ms};
use crate::policy::{PolicyHistory, PolicySet};
use crate::receiver::{ReceiverSettings, WanService};
use crate::sender::{self, RouteContext, RouteHandle, SenderSettings, stall, state};
use crate::site::Site;

/// The stream of route and policy commands.
pub const GATEWAY_STREAM: &str = "$gateway";
const TYPE_ROUTE_SET: &str = "$route-set";
const TYPE_ROUTE_REMOVED: &str = "$route-removed";
pub(crate) const TYPE_POLICY_SET: &str = "$policy-set";
pub(crate) const TYPE_POLICY_REMOVED: &str = "$policy-removed";
/// Commands read per page when replaying `$gateway`.
const REPLAY_PAGE: usize = 1024;

/// What a gateway needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This site.
    pub site: SiteName,
    /// Routes declared in the config file.
    pub routes: Vec<RouteDef>,
    /// Policies declared in the config file, in order.
    pub policies: Vec<PolicyDef>,
    /// Sites accepted on inbound links; empty: any other site.
    pub peers: Vec<SiteName>,
    /// Window sizing of inbound sessions.
    pub credit: ReceiverConfig,
    /// Heartbeat and grant interval of links.
    pub heartbeat: Duration,
    /// Silence after which a link is dead.
    pub dead_after: Duration,
    /// This gateway's name, unique among the site's gateways.
    pub name: String,
    /// The lease length: a standby takes over after this much silence.
    pub lease_ms: u64,
    /// The WAN address operators and peers are told (may be empty).
    pub wan_address: String,
    /// The HTTP address operators are told (may be empty).
    pub http_address: String,
    /// The clock of the lease (a test injects one that jumps).
    pub clock: Arc<dyn Clock>,
}

impl GatewayConfig {
    /// A gateway of `site` with no routes or policies and default timing.
    pub fn new(site: SiteName) -> Self {
        Self {
            routes: Vec::new(),
            policies: Vec::new(),
            peers: Vec::new(),
            credit: ReceiverConfig::default(),
            heartbeat: Duration::from_millis(250),
            dead_after: Duration::from_secs(5),
            name: format!("gw-{}", site.as_str()),
            lease_ms: LEASE_MS_DEFAULT,
            wan_address: String::new(),
            http_address: String::new(),
            clock: Arc::new(MonotonicClock::default()),
            site,
        }
    }
}

/// A refused operator change.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The definition is invalid.
    #[error("invalid definition: {0}")]
    Invalid(#[from] DefError),
    /// No such route or policy.
    #[error("{0}")]
    NotFound(String),
    /// A limit is reached.
    #[error("{0}")]
    TooMany(String),
    /// The command could not be written.
    #[error("cannot record the change: {0}")]
    Store(String),
    /// This gateway does not hold the lease; the active one takes changes.
    #[error("{0}")]
    Standby(String),
}

/// A site's gateway.
#[derive(Debug)]
pub struct Gateway {
    site: Arc<dyn Site>,
    config: GatewayConfig,
    metrics: Arc<GatewayMetrics>,
    routes: tokio::sync::Mutex<BTreeMap<String, RouteHandle>>,
    route_metrics: Mutex<BTreeMap<String, (Route, Arc<sender::RouteMetrics>)>>,
    policies: Mutex<Vec<Policy>>,
    history: watch::Sender<Arc<PolicyHistory>>,
    end: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    authority: Arc<Authority>,
    lease: watch::Receiver<LeaseStatus>,
    /// The term the routes run under (0: not active).
    active_term: AtomicU64,
    /// Times this gateway became active, and stopped being active.
    pub(crate) activations: AtomicU64,
    pub(crate) deactivations: AtomicU64,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The state `$gateway` describes.
#[derive(Debug, Default)]
struct Replayed {
    routes: BTreeMap<String, RouteDef>,
    policies: Vec<PolicyDef>,
    history: PolicyHistory,
}

impl Gateway {
    /// Starts the gateway (see the module docs). `end` follows the log's end.
    pub async fn start(site: Arc<dyn Site>, config: GatewayConfig) -> anyhow::Result<Arc<Self>> {
        let end = site.end();
        for (i, def) in config.routes.iter().enumerate() {
            def.validate(&config.site).map_err(|e| anyhow::anyhow!("gateway route {i} ({}): {e}", def.remote_site))?;
        }
        for (i, def) in config.policies.iter().enumerate() {
            def.validate().map_err(|e| anyhow::anyhow!("gateway policy {i} ({}): {e}", def.pattern))?;
        }
        if !(LEASE_MS_MIN..=LEASE_MS_MAX).contains(&config.lease_ms) {
            anyhow::bail!(
                "gateway lease_ms {} is outside {LEASE_MS_MIN}..={LEASE_MS_MAX} (milliseconds)",
                config.lease_ms
            );
        }
        route_name("gateway name", &config.name).map_err(|e| anyhow::anyhow!("{e}"))?;
        let replayed = replay(site.as_ref()).await?;
        let (history, _) = watch::channel(Arc::new(replayed.history.clone()));
        let (stop, _) = watch::channel(false);
        let policies = replayed.policies.iter().filter_map(|d| d.validate().ok()).collect::<Vec<_>>();
        let me = Me {
            gateway: config.name.clone(),
            instance: format!("{:016x}", rand::random::<u64>()),
            wan: config.wan_address.clone(),
            http: config.http_address.clone(),
            lease_ms: config.lease_ms,
        };
        let mut driver = LeaseDriver::new(Arc::clone(&site), me, Arc::clone(&config.clock));
        let gateway = Arc::new(Self {
            site,
            metrics: Arc::new(GatewayMetrics::default()),
            routes: tokio::sync::Mutex::new(BTreeMap::new()),
            route_metrics: Mutex::new(BTreeMap::new()),
            policies: Mutex::new(policies),
            history,
            end,
            stop,
            authority: driver.authority(),
            lease: driver.status(),
            active_term: AtomicU64::new(0),
            activations: AtomicU64::new(0),
            deactivations: AtomicU64::new(0),
            supervisor: Mutex::new(None),
            config,
        });
        // The first steps run here, so a gateway whose lease is free or its
        // own starts its routes before `start` returns.
        driver.step().await;
        if driver.status().borrow().role != "active" {
            driver.step().await;
        }
        gateway.follow_lease().await?;
        let supervisor = tokio::spawn(Arc::clone(&gateway).supervise(driver));
        *gateway.supervisor.lock() = Some(supervisor);
        Ok(gateway)
    }

    /// Runs the lease and follows its role until the gateway stops.
    async fn supervise(self: Arc<Self>, driver: LeaseDriver) {
        let mut status = driver.status();
        let lease = tokio::spawn(driver.run(self.stop.subscribe()));
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Err(e) = self.follow_lease().await {
                        eprintln!("edgebus gateway {}: cannot take over the routes: {e}", self.config.name);
                    }
                }
                _ = stop.changed() => break,
            }
        }
        let _ = lease.await;
    }

    /// Starts or stops the routes as the lease says.
    async fn follow_lease(&self) -> anyhow::Result<()> {
        let (role, term) = {
            let status = self.lease.borrow();
            (status.role, status.term)
        };
        let mut routes = self.routes.lock().await;
        let running = self.active_term.load(Ordering::Acquire);
        if role == "active" && running == term {
            return Ok(());
        }
        if running != 0 {
            self.active_term.store(0, Ordering::Release);
            self.deactivations.fetch_add(1, Ordering::Relaxed);
            for (_, handle) in std::mem::take(&mut *routes) {
                handle.stop().await;
            }
            self.route_metrics.lock().clear();
            eprintln!("edgebus gateway {}: standby (the lease of term {running} is no longer ours)", self.config.name);
        }
        if role != "active" || *self.stop.borrow() {
            return Ok(());
        }
        // Active: the log's routes and policies, then the config file's
        // where they differ.
        let replayed = replay(self.site.as_ref()).await?;
        {
            let mut policies = self.policies.lock();
            *policies = replayed.policies.iter().filter_map(|d| d.validate().ok()).collect();
        }
        self.history.send_replace(Arc::new(replayed.history.clone()));
        self.active_term.store(term, Ordering::Release);
        self.activations.fetch_add(1, Ordering::Relaxed);
        eprintln!("edgebus gateway {}: active under term {term}", self.config.name);
        for def in replayed.routes.values() {
            match def.validate(&self.config.site) {
                Ok(route) => self.launch(&mut routes, route, term).await,
                Err(e) => eprintln!("edgebus gateway: route {} in the log is invalid and not started: {e}", def.name),
            }
        }
        for def in &self.config.routes {
            let route = def.validate(&self.config.site)?;
            let mut named = def.clone();
            named.name = route.name.clone();
            if replayed.routes.get(&named.name) != Some(&named) {
                self.record_route(&named).await?;
                self.launch(&mut routes, route, term).await;
            }
        }
        drop(routes);
        for def in &self.config.policies {
            if !replayed.policies.contains(def) {
                self.set_policy(def.clone()).await?;
            }
        }
        Ok(())
    }

    /// The lease as this gateway sees it.
    pub fn lease_status(&self) -> LeaseStatus {
        self.lease.borrow().clone()
    }

    /// The lease's Prometheus figures: role, term, failovers.
    fn render_lease_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let status = self.lease_status();
        let gateway = &self.config.name;
        let active = u8::from(status.role == "active");
        let _ = writeln!(
            out,
            "# HELP edgebus_gateway_active 1 while this gateway holds its site's lease and sends on its routes.\n\
             # TYPE edgebus_gateway_active gauge\n\
             edgebus_gateway_active{{gateway=\"{gateway}\"}} {active}\n\
             # HELP edgebus_gateway_lease_term The lease term this gateway sends under (0 while standby).\n\
             # TYPE edgebus_gateway_lease_term gauge\n\
             edgebus_gateway_lease_term{{gateway=\"{gateway}\"}} {}\n\
             # HELP edgebus_gateway_lease_site_term The highest term in the site's lease stream.\n\
             # TYPE edgebus_gateway_lease_site_term gauge\n\
             edgebus_gateway_lease_site_term{{gateway=\"{gateway}\"}} {}\n\
             # HELP edgebus_gateway_takeovers_total Times this gateway became active (took the lease).\n\
             # TYPE edgebus_gateway_takeovers_total counter\n\
             edgebus_gateway_takeovers_total{{gateway=\"{gateway}\"}} {}\n\
             # HELP edgebus_gateway_failovers_total Times this gateway lost the lease (deposed, released or lapsed).\n\
             # TYPE edgebus_gateway_failovers_total counter\n\
             edgebus_gateway_failovers_total{{gateway=\"{gateway}\"}} {}",
            status.term,
            status.lease.term,
            self.activations.load(Ordering::Relaxed),
            self.deactivations.load(Ordering::Relaxed),
        );
    }

    /// This gateway's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The site (for operator reads of the lease and members).
    pub fn site_access(&self) -> &Arc<dyn Site> {
        &self.site
    }

    fn require_active(&self) -> Result<u64, AdminError> {
        match self.active_term.load(Ordering::Acquire) {
            0 => {
                let status = self.lease.borrow();
                let holder = status.lease.holder.as_ref().map_or_else(
                    || "no gateway holds the lease yet".to_owned(),
                    |h| format!("the lease is held by {} (term {}, http {})", h.gateway, h.term, h.http),
                );
                Err(AdminError::Standby(format!(
                    "gateway {} is standby and takes no route or policy changes; {holder}",
                    self.config.name
                )))
            }
            term => Ok(term),
        }
    }

    /// This site.
    pub fn site(&self) -> &SiteName {
        &self.config.site
    }

    /// The WAN service accepting this site's inbound links.
    pub fn wan_service(&self) -> WanService {
        let settings = ReceiverSettings {
            site: self.config.site.clone(),
            peers: self.config.peers.clone(),
            credit: self.config.credit,
            heartbeat: self.config.heartbeat,
            dead_after: self.config.dead_after,
        };
        WanService::new(Arc::clone(&self.site), settings, Arc::clone(&self.metrics), self.stop.subscribe())
    }

    /// The inbound counters.
    pub fn metrics(&self) -> &Arc<GatewayMetrics> {
        &self.metrics
    }

    async fn launch(&self, routes: &mut BTreeMap<String, RouteHandle>, route: Route, term: u64) {
        let context = RouteContext {
            site: Arc::clone(&self.site),
            site_name: self.config.site.clone(),
            gateway: self.config.name.clone(),
            term,
            authority: Arc::clone(&self.authority),
            end: self.end.clone(),
            policies: self.history.subscribe(),
            settings: SenderSettings {
                heartbeat: self.config.heartbeat,
                dead_after: self.config.dead_after,
                checkpoint_every: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(5),
            },
        };
        let handle = sender::start(route.clone(), context);
        self.route_metrics.lock().insert(route.name.clone(), (route.clone(), Arc::clone(&handle.metrics)));
        if let Some(old) = routes.insert(route.name.clone(), handle) {
            old.stop().await;
        }
    }

    async fn record(&self, event_type: &str, data: serde_json::Value) -> Result<u64, AdminError> {
        let event = NewEvent {
            id: EventId::generate(),
            event_type: EventType::new(event_type).expect("valid type"),
            data: serde_json::to_vec(&data).expect("serializable"),
            metadata: Vec::new(),
            timestamp_ms: now_ms(),
        };
        let written = (self.site.append(gateway_stream(), ExpectedVersion::Any, vec![event]).await)
            .map_err(|e| AdminError::Store(e.to_string()))?;
        Ok(written.first_position)
    }

    /// Adds or replaces a route; it starts at once.
    pub async fn set_route(&self, def: RouteDef) -> Result<Route, AdminError> {
        let route = def.validate(&self.config.site)?;
        {
            let routes = self.route_metrics.lock();
            if !routes.contains_key(&route.name) && routes.len() >= ROUTES_MAX {
                return Err(AdminError::TooMany(format!("a gateway has at most {ROUTES_MAX} routes")));
            }
        }
        let mut routes = self.routes.lock().await;
        let term = self.require_active()?;
        let mut stored = route.def.clone();
        stored.name = route.name.clone();
        self.record_route(&stored).await?;
        self.launch(&mut routes, route.clone(), term).await;
        Ok(route)
    }

    async fn record_route(&self, def: &RouteDef) -> Result<u64, AdminError> {
        self.record(TYPE_ROUTE_SET, serde_json::to_value(def).expect("serializable")).await
    }

    /// Removes a route; its task checkpoints its cursors and stops.
    pub async fn remove_route(&self, name: &str) -> Result<(), AdminError> {
        let name = route_name("name", name)?;
        let mut routes = self.routes.lock().await;
        self.require_active()?;
        if !self.route_metrics.lock().contains_key(&name) {
            return Err(AdminError::NotFound(format!("no route named {name}")));
        }
        self.record(TYPE_ROUTE_REMOVED, serde_json::json!({ "name": name })).await?;
        self.route_metrics.lock().remove(&name);
        if let Some(handle) = routes.remove(&name) {
            handle.stop().await;
        }
        Ok(())
    }

    /// Sets the policy for `def.pattern` (replacing one with the same
    /// pattern in place, else appending); it applies from its command's
    /// log position on.
    pub async fn set_policy(&self, def: PolicyDef) -> Result<(), AdminError> {
        let policy = def.validate()?;
        self.require_active()?;
        {
            let policies = self.policies.lock();
            if !policies.iter().any(|p| p.def.pattern == def.pattern) && policies.len() >= POLICIES_MAX {
                return Err(AdminError::TooMany(format!("a site has at most {POLICIES_MAX} policies")));
            }
        }
        let position = self.record(TYPE_POLICY_SET, serde_json::to_value(&def).expect("serializable")).await?;
        let set = {
            let mut policies = self.policies.lock();
            match policies.iter_mut().find(|p| p.def.pattern == def.pattern) {
                Some(existing) => *existing = policy,
                None => policies.push(policy),
            }
            PolicySet { rules: policies.clone() }
        };
        self.push_policies(position, set);
        Ok(())
    }

    /// Removes the policy for `pattern`.
    pub async fn remove_policy(&self, pattern: &str) -> Result<(), AdminError> {
        self.require_active()?;
        if !self.policies.lock().iter().any(|p| p.def.pattern == pattern) {
            return Err(AdminError::NotFound(format!("no policy for pattern {pattern}")));
        }
        let position = self.record(TYPE_POLICY_REMOVED, serde_json::json!({ "pattern": pattern })).await?;
        let set = {
            let mut policies = self.policies.lock();
            policies.retain(|p| p.def.pattern != pattern);
            PolicySet { rules: policies.clone() }
        };
        self.push_policies(position, set);
        Ok(())
    }

    fn push_policies(&self, position: u64, set: PolicySet) {
        self.history.send_modify(|history| {
            let mut next = (**history).clone();
            next.push(position, set);
            *history = Arc::new(next);
        });
    }

    /// The policies, in order.
    pub fn policies(&self) -> Vec<PolicyDef> {
        self.policies.lock().iter().map(|p| p.def.clone()).collect()
    }

    /// Stops every route (each checkpoints its cursors) and ends inbound sessions.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let routes = std::mem::take(&mut *self.routes.lock().await);
        for (_, handle) in routes {
            handle.stop().await;
        }
        self.active_term.store(0, Ordering::Release);
        let supervisor = self.supervisor.lock().take();
        if let Some(supervisor) = supervisor {
            let _ = supervisor.await;
        }
    }

    /// Every route and lane, as JSON (for `/v1/routes` and `/v1/stats`),
    /// each with its health (see [`health`]): `health`, and when stalled
    /// `stalled_since_ms` / `stalled_for_ms`, and when throttled or stalled
    /// `reason`.
    pub fn routes_json(&self) -> serde_json::Value {
        let end = *self.end.borrow();
        let now = now_ms();
        let routes = self.route_metrics.lock().clone();
        let health_fields = |object: &mut serde_json::Value, h: &Health| {
            object["health"] = h.state.as_str().into();
            object["stalled_since_ms"] = h.since_ms.into();
            object["stalled_for_ms"] = h.since_ms.map(|since| now.saturating_sub(since)).into();
            object["reason"] = h.reason.map(health::Reason::code).into();
            object["reason_text"] = h.reason.map(health::Reason::text).into();
        };
        let list: Vec<serde_json::Value> = routes
            .values()
            .map(|(route, m)| {
                let (route_health, lane_health) = health::assess(m, end, now);
                let lanes: Vec<serde_json::Value> = m
                    .lanes
                    .iter()
                    .zip(&route.lanes)
                    .zip(&lane_health)
                    .map(|((l, def), h)| {
                        let acked = l.acked_position.load(Ordering::Relaxed);
                        let oldest = l.oldest_unacked_ms.load(Ordering::Relaxed);
                        let mut lane = serde_json::json!({
                            "lane": l.name,
                            "reserved_permille": def.reserved_permille,
                            "read_position": l.read_position.load(Ordering::Relaxed),
                            "acked_position": acked,
                            "backlog_positions": end.saturating_sub(acked),
                            "oldest_unacked_age_ms": (oldest > 0).then(|| now.saturating_sub(oldest)),
                            "in_flight_events": l.in_flight_events.load(Ordering::Relaxed),
                            "in_flight_bytes": l.in_flight_bytes.load(Ordering::Relaxed),
                            "buffered_events": l.buffered_events.load(Ordering::Relaxed),
                            "sent_events": l.sent_events.load(Ordering::Relaxed),
                            "sent_bytes": l.sent_bytes.load(Ordering::Relaxed),
                            "acked_events": l.acked_events.load(Ordering::Relaxed),
                            "ack_p50_ms": l.ack_latency.quantile_ms(0.5),
                            "ack_p99_ms": l.ack_latency.quantile_ms(0.99),
                            "stall": stall::NAMES[usize::from(l.stall.load(Ordering::Relaxed))],
                        });
                        health_fields(&mut lane, h);
                        lane
                    })
                    .collect();
                let granted =
                    m.credit_granted_events.load(Ordering::Relaxed) + m.session_granted_events.load(Ordering::Relaxed);
                let used = m.credit_used_events.load(Ordering::Relaxed) + m.session_used_events.load(Ordering::Relaxed);
                let mut route_json = serde_json::json!({
                    "route": route.name,
                    "remote_site": route.remote_site.as_str(),
                    "addresses": route.addresses,
                    "topics": route.def.topics,
                    "state": state::NAMES[usize::from(m.state.load(Ordering::Relaxed))],
                    "address": m.address.lock().clone(),
                    "reconnects": m.reconnects.load(Ordering::Relaxed),
                    "failures": m.failures.load(Ordering::Relaxed),
                    "last_error": m.last_error.lock().clone(),
                    "window_events": m.window_events.load(Ordering::Relaxed),
                    "window_bytes": m.window_bytes.load(Ordering::Relaxed),
                    "credit_granted_events": granted,
                    "credit_used_events": used,
                    "demand_fulfillment": m.demand_fulfillment(),
                    "lanes": lanes,
                    "topics_counts": m.topics.lock().clone(),
                    "topics_queued": m.topics_queued.lock().clone(),
                });
                health_fields(&mut route_json, &route_health);
                route_json
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// The gateway's part of the summary line: events read ahead or in
    /// flight on every route (bounded by the windows), events dropped by
    /// policy since the node started, and the worst route's health.
    pub fn summary(&self) -> health::Summary {
        let end = *self.end.borrow();
        let now = now_ms();
        let routes = self.route_metrics.lock().clone();
        let mut summary = health::Summary::default();
        for (_, m) in routes.values() {
            for lane in &m.lanes {
                summary.wan_queue +=
                    lane.in_flight_events.load(Ordering::Relaxed) + lane.buffered_events.load(Ordering::Relaxed);
            }
            summary.dropped += m.topics.lock().values().map(|c| c.dropped).sum::<u64>();
            summary.health = summary.health.max(health::assess(m, end, now).0.state);
        }
        summary
    }

    /// The gateway section of `/v1/stats`.
    pub fn stats_json(&self) -> serde_json::Value {
        let summary = self.summary();
        serde_json::json!({
            "site": self.config.site.as_str(),
            "name": self.config.name,
            "lease": self.lease_status(),
            "routes": self.routes_json(),
            "health": summary.health.as_str(),
            "wan_queue": summary.wan_queue,
            "dropped": summary.dropped,
            "inbound": self.metrics.to_json(),
            "policies": self.policies(),
        })
    }

    /// Prometheus text of every route, lane and topic, and the inbound side.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        self.render_lease_metrics(out);
        let end = *self.end.borrow();
        let now = now_ms();
        let routes = self.route_metrics.lock().clone();
        let healths: BTreeMap<&str, (Health, Vec<Health>)> =
            routes.iter().map(|(name, (_, m))| (name.as_str(), health::assess(m, end, now))).collect();
        let mut family = |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = (String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let route_rows = |f: &dyn Fn(&sender::RouteMetrics) -> String| -> Vec<(String, String)> {
            routes.values().map(|(r, m)| (format!("route=\"{}\",remote=\"{}\"", r.name, r.remote_site), f(m))).collect()
        };
        family(
            "edgebus_route_up",
            "gauge",
            "1 while the route has a link session.",
            &mut route_rows(&|m| u8::from(m.state.load(Ordering::Relaxed) == state::CONNECTED).to_string()).into_iter(),
        );
        let mut rows = routes.values().flat_map(|(r, _)| {
            let current = healths[r.name.as_str()].0.state;
            health::State::ALL.into_iter().map(move |state| {
                (
                    format!("route=\"{}\",remote=\"{}\",state=\"{}\"", r.name, r.remote_site, state.as_str()),
                    u8::from(state == current).to_string(),
                )
            })
        });
        family(
            "edgebus_route_health",
            "gauge",
            "1 for the route's health: healthy, throttled (moving at the pace credit allows) or stalled (backlog and a cursor that has not moved for 10 s); its worst lane's.",
            &mut rows,
        );
        let mut rows = routes.values().flat_map(|(r, m)| {
            let current = usize::from(m.state.load(Ordering::Relaxed));
            state::NAMES.iter().enumerate().map(move |(i, name)| {
                (
                    format!("route=\"{}\",remote=\"{}\",state=\"{name}\"", r.name, r.remote_site),
                    u8::from(i == current).to_string(),
                )
            })
        });
        family(
            "edgebus_route_link_state",
            "gauge",
            "1 for the route's link state: connecting, connected, backoff, open (failing repeatedly, retried at the longest delay) or stopped.",
            &mut rows,
        );
        family(
            "edgebus_route_failures",
            "gauge",
            "Consecutive failed link sessions (0 once a session makes progress).",
            &mut route_rows(&|m| m.failures.load(Ordering::Relaxed).to_string()).into_iter(),
        );
        family(
            "edgebus_route_reconnects_total",
            "counter",
            "Link sessions that ended and were retried.",
            &mut route_rows(&|m| m.reconnects.load(Ordering::Relaxed).to_string()).into_iter(),
        );
        family(
            "edgebus_route_window_bytes",
            "gauge",
            "The receiver's current credit window in bytes.",
            &mut route_rows(&|m| m.window_bytes.load(Ordering::Relaxed).to_string()).into_iter(),
        );
        family(
            "edgebus_route_window_events",
            "gauge",
            "The receiver's current credit window in events.",
            &mut route_rows(&|m| m.window_events.load(Ordering::Relaxed).to_string()).into_iter(),
        );
        family(
            "edgebus_route_credit_granted_events_total",
            "counter",
            "Credit granted by the remote site, in events (the highest limit of each session, summed).",
            &mut route_rows(&|m| {
                (m.credit_granted_events.load(Ordering::Relaxed) + m.session_granted_events.load(Ordering::Relaxed))
                    .to_string()
            })
            .into_iter(),
        );
        family(
            "edgebus_route_demand_fulfillment_ratio",
            "gauge",
            "While data waited: the mean share of the granted window in use (1: the sender keeps the pipe full).",
            &mut route_rows(&|m| m.demand_fulfillment().map_or("NaN".to_owned(), |r| format!("{r:.3}"))).into_iter(),
        );
        family(
            "edgebus_route_credit_used_events_total",
            "counter",
            "Credit used: events sent, summed over sessions.",
            &mut route_rows(&|m| {
                (m.credit_used_events.load(Ordering::Relaxed) + m.session_used_events.load(Ordering::Relaxed))
                    .to_string()
            })
            .into_iter(),
        );
        type LaneField = fn(&sender::LaneMetrics, u64, u64) -> u64;
        let lane_families: [(&str, &str, &str, LaneField); 11] = [
            (
                "edgebus_lane_acked_position",
                "gauge",
                "The lane's acknowledged cursor: every event of the lane below it is durable at the remote site.",
                |l, _, _| l.acked_position.load(Ordering::Relaxed),
            ),
            ("edgebus_lane_read_position", "gauge", "The next log position the lane reads.", |l, _, _| {
                l.read_position.load(Ordering::Relaxed)
            }),
            (
                "edgebus_lane_backlog_positions",
                "gauge",
                "Log positions between the lane's acknowledged cursor and the log's end.",
                |l, end, _| end.saturating_sub(l.acked_position.load(Ordering::Relaxed)),
            ),
            (
                "edgebus_lane_oldest_unacked_age_seconds",
                "gauge",
                "Age of the oldest event read or sent but not acknowledged (0: none).",
                |l, _, now| {
                    let o = l.oldest_unacked_ms.load(Ordering::Relaxed);
                    if o == 0 { 0 } else { now.saturating_sub(o) / 1000 }
                },
            ),
            ("edgebus_lane_in_flight_events", "gauge", "Events sent and not yet acknowledged.", |l, _, _| {
                l.in_flight_events.load(Ordering::Relaxed)
            }),
            ("edgebus_lane_in_flight_bytes", "gauge", "Bytes sent and not yet acknowledged.", |l, _, _| {
                l.in_flight_bytes.load(Ordering::Relaxed)
            }),
            (
                "edgebus_lane_buffered_events",
                "gauge",
                "Events read ahead and not yet sent (bounded by the read-ahead).",
                |l, _, _| l.buffered_events.load(Ordering::Relaxed),
            ),
            (
                "edgebus_lane_sent_events_total",
                "counter",
                "Events sent (resends after a reconnect included).",
                |l, _, _| l.sent_events.load(Ordering::Relaxed),
            ),
            ("edgebus_lane_sent_bytes_total", "counter", "Bytes sent.", |l, _, _| l.sent_bytes.load(Ordering::Relaxed)),
            (
                "edgebus_lane_acked_events_total",
                "counter",
                "Events acknowledged durable by the remote site.",
                |l, _, _| l.acked_events.load(Ordering::Relaxed),
            ),
            (
                "edgebus_lane_stalled_seconds",
                "gauge",
                "How long the acknowledged cursor has not moved while the lane has backlog (0: moving).",
                |l, _, now| {
                    let s = l.stalled_since_ms.load(Ordering::Relaxed);
                    if s == 0 { 0 } else { now.saturating_sub(s) / 1000 }
                },
            ),
        ];
        for (name, kind, help, field) in lane_families {
            let mut rows = routes.values().flat_map(|(r, m)| {
                m.lanes
                    .iter()
                    .map(move |l| (format!("route=\"{}\",lane=\"{}\"", r.name, l.name), field(l, end, now).to_string()))
            });
            family(name, kind, help, &mut rows);
        }
        let mut rows = routes.values().flat_map(|(r, m)| {
            m.lanes.iter().flat_map(move |l| {
                let current = l.stall.load(Ordering::Relaxed);
                stall::NAMES.iter().enumerate().skip(1).map(move |(i, reason)| {
                    (
                        format!("route=\"{}\",lane=\"{}\",reason=\"{reason}\"", r.name, l.name),
                        u8::from(usize::from(current) == i).to_string(),
                    )
                })
            })
        });
        family("edgebus_lane_stalled", "gauge", "1 for the reason the lane waits although it has data.", &mut rows);
        let mut rows = routes.values().flat_map(|(r, m)| {
            m.lanes.iter().flat_map(move |l| {
                stall::NAMES.iter().enumerate().skip(1).map(move |(i, reason)| {
                    (
                        format!("route=\"{}\",lane=\"{}\",reason=\"{reason}\"", r.name, l.name),
                        l.stalls[i].load(Ordering::Relaxed).to_string(),
                    )
                })
            })
        });
        family(
            "edgebus_lane_stalls_total",
            "counter",
            "Times the lane started waiting although it had data, by reason (credit stalls: reason=\"no credit\").",
            &mut rows,
        );
        let lane_healths = || {
            routes
                .values()
                .flat_map(|(r, m)| m.lanes.iter().zip(&healths[r.name.as_str()].1).map(move |(l, h)| (r, l, *h)))
        };
        let mut rows = lane_healths().flat_map(|(r, l, h)| {
            health::State::ALL.into_iter().map(move |state| {
                (
                    format!("route=\"{}\",lane=\"{}\",state=\"{}\"", r.name, l.name, state.as_str()),
                    u8::from(state == h.state).to_string(),
                )
            })
        });
        family(
            "edgebus_lane_health",
            "gauge",
            "1 for the lane's health: healthy, throttled (moving at the pace credit allows) or stalled (backlog and a cursor that has not moved for 10 s).",
            &mut rows,
        );
        let mut rows = lane_healths().flat_map(|(r, l, h)| {
            let current = h.reason.map(health::Reason::code);
            health::Reason::CODES.into_iter().map(move |reason| {
                (
                    format!("route=\"{}\",lane=\"{}\",reason=\"{reason}\"", r.name, l.name),
                    u8::from(current == Some(reason)).to_string(),
                )
            })
        });
        family(
            "edgebus_lane_health_reason",
            "gauge",
            "1 for the reason the lane is throttled or stalled (all 0 when healthy).",
            &mut rows,
        );
        let mut rows = lane_healths().map(|(r, l, h)| {
            (
                format!("route=\"{}\",lane=\"{}\"", r.name, l.name),
                h.since_ms.map_or("0".to_owned(), |ms| format!("{:.3}", ms as f64 / 1000.0)),
            )
        });
        family(
            "edgebus_lane_stalled_since_timestamp_seconds",
            "gauge",
            "When a stalled lane's acknowledged cursor last moved, in seconds since the epoch (0: not stalled).",
            &mut rows,
        );
        let topics: Vec<(String, String, sender::TopicCounts)> = routes
            .values()
            .flat_map(|(r, m)| m.topics.lock().iter().map(|(t, c)| (r.name.clone(), t.clone(), *c)).collect::<Vec<_>>())
            .collect();
        let mut rows = topics.iter().flat_map(|(route, topic, c)| {
            [("sampled_out", c.sampled_out), ("compacted", c.compacted), ("dropped", c.dropped)].into_iter().map(
                move |(reason, n)| (format!("route=\"{route}\",topic=\"{topic}\",reason=\"{reason}\""), n.to_string()),
            )
        });
        family(
            "edgebus_route_policy_skipped_total",
            "counter",
            "Events a policy kept from the route, per topic pattern and reason.",
            &mut rows,
        );
        let mut rows =
            topics.iter().map(|(route, topic, c)| (format!("route=\"{route}\",topic=\"{topic}\""), c.sent.to_string()));
        family(
            "edgebus_route_topic_sent_total",
            "counter",
            "Events sent per route and deciding topic pattern.",
            &mut rows,
        );
        let queued: Vec<(String, String, u64)> = routes
            .values()
            .flat_map(|(r, m)| {
                m.topics_queued.lock().iter().map(|(t, n)| (r.name.clone(), t.clone(), *n)).collect::<Vec<_>>()
            })
            .collect();
        let mut rows =
            queued.iter().map(|(route, topic, n)| (format!("route=\"{route}\",topic=\"{topic}\""), n.to_string()));
        family(
            "edgebus_route_topic_queued_events",
            "gauge",
            "Events read ahead or in flight on the route now, per deciding topic pattern (the rest of the backlog is in the log).",
            &mut rows,
        );
        let name = "edgebus_lane_ack_latency_seconds";
        let _ =
            writeln!(out, "# HELP {name} Send to durable-acknowledgement latency per lane.\n# TYPE {name} histogram");
        for (r, m) in routes.values() {
            for l in &m.lanes {
                l.ack_latency_render(out, name, &format!("route=\"{}\",lane=\"{}\"", r.name, l.name));
            }
        }
        self.metrics.render(out);
    }
}

fn gateway_stream() -> StreamName {
    StreamName::system(GATEWAY_STREAM).expect("valid system stream")
}

async fn replay(site: &dyn Site) -> anyhow::Result<Replayed> {
    let mut replayed = Replayed::default();
    replayed.history.push(0, PolicySet::default());
    let mut from = 0u64;
    loop {
        let events =
            (site.read_stream(gateway_stream(), StreamFrom::Version(from), Direction::Forward, REPLAY_PAGE).await)
                .map_err(|e| anyhow::anyhow!("cannot read {GATEWAY_STREAM}: {e}"))?;
        let Some(last) = events.last() else { break };
        from = last.version + 1;
        for event in &events {
            apply(&mut replayed, event);
        }
        if events.len() < REPLAY_PAGE {
            break;
        }
    }
    Ok(replayed)
}

fn apply(replayed: &mut Replayed, event: &edgebus_types::RecordedEvent) {
    let json: serde_json::Value = serde_json::from_slice(&event.data).unwrap_or_default();
    let mut policies_changed = false;
    match event.event_type.as_str() {
        TYPE_ROUTE_SET => {
            if let Ok(def) = serde_json::from_value::<RouteDef>(json) {
                replayed.routes.insert(def.name.clone(), def);
            }
        }
        TYPE_ROUTE_REMOVED => {
            if let Some(name) = json.get("name").and_then(|n| n.as_str()) {
                replayed.routes.remove(name);
            }
        }
        TYPE_POLICY_SET => {
            if let Ok(def) = serde_json::from_value::<PolicyDef>(json) {
                match replayed.policies.iter_mut().find(|p| p.pattern == def.pattern) {
                    Some(existing) => *existing = def,
                    None => replayed.policies.push(def),
                }
                policies_changed = true;
            }
        }
        TYPE_POLICY_REMOVED => {
            if let Some(pattern) = json.get("pattern").and_then(|n| n.as_str()) {
                replayed.policies.retain(|p| p.pattern != pattern);
                policies_changed = true;
            }
        }
        _ => {}
    }
    if policies_changed {
        let rules = replayed.policies.iter().filter_map(|d| d.validate().ok()).collect();
        replayed.history.push(event.position, PolicySet { rules });
    }
}
