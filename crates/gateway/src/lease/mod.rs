//! The gateway lease (DESIGN §3.4, failover): which of a site's gateways
//! sends on its routes, arbitrated by the site's log.
//!
//! The lease is the stream `$gateway.lease`: `acquired`, `renewed` and
//! `released` records, each appended on the condition that the stream is
//! still at the version its writer last saw. The log orders them, so at most
//! one writer wins each version, and every acquisition raises the term.
//!
//! - The holder renews every third of the lease. It considers itself active
//!   until the time it *sent* its last successful renewal plus 80% of the
//!   lease, on its own monotonic clock.
//! - A standby takes over (`acquired`, term + 1) once the stream has not
//!   changed for 85% of the lease since it *saw* the last change; that
//!   moment is after the holder sent it, so the holder's validity ends
//!   first (the 5% between them absorbs clocks running at slightly
//!   different rates). The standby reads the stream every twentieth of the
//!   lease, so it takes over within about 90% of the lease after the
//!   holder's last renewal: `lease_ms` bounds the silence before a
//!   takeover. A released lease is taken at once.
//! - A holder whose append finds the stream moved has been deposed.
//! - Clocks only ever shorten a holder's belief or hasten a standby; two
//!   gateways that both believe they hold the lease (a frozen process, a
//!   clock jump) still cannot both write: the receiving sites remember the
//!   highest term per origin and refuse the lower one (see [`crate::site::Fences`]).
//!
//! [`LeaseCore`] is I/O-free (records and times in, appends out);
//! [`driver`] runs it against a [`crate::Site`].

pub mod driver;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

/// The lease stream of a site.
pub const LEASE_STREAM: &str = "$gateway.lease";
/// Where every gateway of the site says, every lease, that it is alive.
pub const MEMBERS_STREAM: &str = "$gateway.members";
/// Event type of lease records.
pub const LEASE_EVENT_TYPE: &str = "$lease";
/// Event type of membership heartbeats.
pub const MEMBER_EVENT_TYPE: &str = "$member";
/// Shortest lease.
pub const LEASE_MS_MIN: u64 = 100;
/// Longest lease.
pub const LEASE_MS_MAX: u64 = 600_000;
/// The default lease.
pub const LEASE_MS_DEFAULT: u64 = 3_000;

/// One record of the lease stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeaseRecord {
    /// `gateway` holds the lease from now, under `term`.
    Acquired {
        /// The gateway's name.
        gateway: String,
        /// The gateway process (random per start).
        instance: String,
        /// The new term (one more than any before).
        term: u64,
        /// The lease length the holder keeps.
        lease_ms: u64,
        /// Where the holder serves its WAN links and HTTP (for operators).
        wan: String,
        /// The holder's HTTP address (empty: none).
        http: String,
    },
    /// The holder is alive. It repeats what `acquired` said, so that the
    /// last record alone tells the whole lease: nobody reads the stream's
    /// history, however long a holder keeps renewing.
    Renewed {
        /// The gateway's name.
        gateway: String,
        /// Its process.
        instance: String,
        /// Its term.
        term: u64,
        /// Its lease length.
        lease_ms: u64,
        /// Its WAN address.
        wan: String,
        /// Its HTTP address.
        http: String,
        /// When it acquired the lease (the `acquired` record's timestamp).
        since_ms: u64,
    },
    /// The lease of `term` ends now: its holder stopped, or an operator
    /// moved it (`edgebus failover`).
    Released {
        /// The holder that loses it.
        gateway: String,
        /// The term that ends.
        term: u64,
        /// Why.
        reason: String,
        /// Who released it: the holder itself or `operator`.
        by: String,
    },
}

/// The holder the lease stream names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// Its name.
    pub gateway: String,
    /// Its process.
    pub instance: String,
    /// Its term.
    pub term: u64,
    /// Its lease length.
    pub lease_ms: u64,
    /// Its WAN address.
    pub wan: String,
    /// Its HTTP address.
    pub http: String,
    /// When it acquired the lease (the record's timestamp).
    pub since_ms: u64,
    /// When it last renewed (the record's timestamp).
    pub renewed_ms: u64,
}

/// The lease as the stream tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LeaseView {
    /// The stream's last version (`None`: no record yet).
    pub version: Option<u64>,
    /// The current holder, unless released.
    pub holder: Option<Holder>,
    /// The highest term so far.
    pub term: u64,
    /// The last release, if the lease is free.
    pub released: Option<Released>,
}

/// A release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Released {
    /// Who lost the lease.
    pub gateway: String,
    /// Its term.
    pub term: u64,
    /// Why.
    pub reason: String,
    /// Who released it.
    pub by: String,
}

impl LeaseView {
    /// Applies the record at `version` (stamped `timestamp_ms`). Every
    /// record is appended conditionally on the one before, so it speaks of
    /// the current lease, and the last record alone gives the whole view.
    pub fn apply(&mut self, version: u64, record: &LeaseRecord, timestamp_ms: u64) {
        self.version = Some(version);
        let holder =
            |gateway: &String, instance: &String, term: u64, lease_ms: u64, wan: &String, http: &String| Holder {
                gateway: gateway.clone(),
                instance: instance.clone(),
                term,
                lease_ms,
                wan: wan.clone(),
                http: http.clone(),
                since_ms: timestamp_ms,
                renewed_ms: timestamp_ms,
            };
        match record {
            LeaseRecord::Acquired { gateway, instance, term, lease_ms, wan, http } => {
                self.term = self.term.max(*term);
                self.released = None;
                self.holder = Some(holder(gateway, instance, *term, *lease_ms, wan, http));
            }
            LeaseRecord::Renewed { gateway, instance, term, lease_ms, wan, http, since_ms } => {
                self.term = self.term.max(*term);
                self.released = None;
                self.holder =
                    Some(Holder { since_ms: *since_ms, ..holder(gateway, instance, *term, *lease_ms, wan, http) });
            }
            LeaseRecord::Released { gateway, term, reason, by } => {
                self.term = self.term.max(*term);
                self.holder = None;
                self.released =
                    Some(Released { gateway: gateway.clone(), term: *term, reason: reason.clone(), by: by.clone() });
            }
        }
    }
}

/// Who this gateway is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    /// Its name.
    pub gateway: String,
    /// Its process.
    pub instance: String,
    /// Its WAN address.
    pub wan: String,
    /// Its HTTP address.
    pub http: String,
    /// The lease length.
    pub lease_ms: u64,
}

/// An append the core wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The stream version it must find (`None`: no stream yet).
    pub expected: Option<u64>,
    /// What to append.
    pub record: LeaseRecord,
}

/// How an append ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written at this version.
    Written(u64),
    /// The stream had moved on.
    Conflict,
    /// Not written (the site could not be reached); try again later.
    Failed,
}

/// What this gateway is, now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It may send, under `term`, until `valid_until` (monotonic ms).
    Active {
        /// The term.
        term: u64,
        /// Until when.
        valid_until: u64,
    },
    /// It waits.
    Standby,
}

/// The lease state machine of one gateway. Time is monotonic milliseconds
/// from any origin, given by the caller.
#[derive(Debug, Clone)]
pub struct LeaseCore {
    me: Me,
    view: LeaseView,
    /// When the view last changed (monotonic, as observed).
    changed_at: u64,
    /// Whether the view was read at least once.
    synced: bool,
    /// The append in flight and when it was sent.
    pending: Option<(Append, u64)>,
    /// Active under a term until a time.
    active: Option<(u64, u64)>,
    /// When the last renewal was sent.
    renewed_at: u64,
    /// Not before this time may this gateway acquire (after an operator
    /// moved the lease away from it).
    hold_off_until: u64,
    /// Until the first decision: a lease held under this gateway's own name
    /// by another process is an earlier run of it, taken back at once.
    starting: bool,
}

impl LeaseCore {
    /// A core for `me`, started at `now`.
    pub fn new(me: Me, now: u64) -> Self {
        Self {
            me,
            view: LeaseView::default(),
            changed_at: now,
            synced: false,
            pending: None,
            active: None,
            renewed_at: 0,
            hold_off_until: 0,
            starting: true,
        }
    }

    /// The lease as last read.
    pub fn view(&self) -> &LeaseView {
        &self.view
    }

    /// This gateway.
    pub fn me(&self) -> &Me {
        &self.me
    }

    fn renew_every(&self) -> u64 {
        (self.me.lease_ms / 3).max(1)
    }

    /// How long this gateway keeps acting after sending a renewal: 80% of
    /// the lease.
    fn validity(&self) -> u64 {
        self.me.lease_ms * 8 / 10
    }

    /// How long a standby waits after it saw the lease stream change: 85%
    /// of the lease, longer than any holder's validity.
    fn silence(lease_ms: u64) -> u64 {
        lease_ms * 85 / 100
    }

    /// The lease stream has been read to its end (possibly with no new
    /// record): the view is current.
    pub fn synced(&mut self) {
        self.synced = true;
    }

    /// A record read from the stream, in order.
    pub fn observe(&mut self, version: u64, record: &LeaseRecord, timestamp_ms: u64, now: u64) {
        if self.view.version.is_some_and(|v| version <= v) {
            return; // seen already (our own append, applied when it returned)
        }
        self.view.apply(version, record, timestamp_ms);
        self.changed_at = now;
        self.after_change(now);
    }

    fn after_change(&mut self, now: u64) {
        let mine = self.view.holder.as_ref().is_some_and(|h| h.instance == self.me.instance);
        if !mine {
            self.active = None;
        }
        if let Some(released) = &self.view.released
            && released.gateway == self.me.gateway
            && released.by == "operator"
        {
            // Let the others take it first.
            self.hold_off_until = self.changed_at + self.me.lease_ms;
        }
        let _ = now;
    }

    /// The append to make now, if any (one at a time).
    pub fn poll(&mut self, now: u64) -> Option<Append> {
        if self.pending.is_some() || !self.synced {
            return None;
        }
        let starting = std::mem::take(&mut self.starting);
        let next_term = self.view.term + 1;
        let acquire = |me: &Me| LeaseRecord::Acquired {
            gateway: me.gateway.clone(),
            instance: me.instance.clone(),
            term: next_term,
            lease_ms: me.lease_ms,
            wan: me.wan.clone(),
            http: me.http.clone(),
        };
        let append = match &self.view.holder {
            Some(holder) if holder.instance == self.me.instance => {
                // A renewal also restores a holder that lost track of its
                // own append (one that timed out but was written).
                if self.active.is_some() && now < self.renewed_at + self.renew_every() {
                    return None;
                }
                LeaseRecord::Renewed {
                    gateway: self.me.gateway.clone(),
                    instance: self.me.instance.clone(),
                    term: holder.term,
                    lease_ms: self.me.lease_ms,
                    wan: self.me.wan.clone(),
                    http: self.me.http.clone(),
                    since_ms: holder.since_ms,
                }
            }
            // At start, our own name in the lease under another process: an
            // earlier run of this gateway (names are unique among running
            // gateways; `edgebus gateway` checks before it starts).
            Some(holder) if starting && holder.gateway == self.me.gateway => acquire(&self.me),
            Some(holder) => {
                let silence = Self::silence(holder.lease_ms.max(self.me.lease_ms));
                if now < self.changed_at + silence || now < self.hold_off_until {
                    return None;
                }
                acquire(&self.me)
            }
            None => {
                if now < self.hold_off_until {
                    return None;
                }
                acquire(&self.me)
            }
        };
        let append = Append { expected: self.view.version, record: append };
        self.pending = Some((append.clone(), now));
        Some(append)
    }

    /// The outcome of the append [`LeaseCore::poll`] returned.
    pub fn on_appended(&mut self, outcome: Appended, timestamp_ms: u64, now: u64) {
        let Some((append, sent_at)) = self.pending.take() else { return };
        match outcome {
            Appended::Written(version) => {
                self.view.apply(version, &append.record, timestamp_ms);
                self.changed_at = now;
                match &append.record {
                    LeaseRecord::Acquired { term, .. } | LeaseRecord::Renewed { term, .. } => {
                        self.active = Some((*term, sent_at + self.validity()));
                        self.renewed_at = sent_at;
                    }
                    LeaseRecord::Released { .. } => self.active = None,
                }
            }
            Appended::Conflict => {
                // Someone else wrote: whatever it was, our term (if any) is
                // over until the stream, read again, says otherwise.
                self.active = None;
                self.synced = false;
            }
            Appended::Failed => {}
        }
    }

    /// What this gateway is at `now`.
    pub fn role(&self, now: u64) -> Role {
        match self.active {
            Some((term, valid_until)) if now < valid_until => Role::Active { term, valid_until },
            _ => Role::Standby,
        }
    }

    /// The record releasing the lease when this gateway stops (if it holds it).
    pub fn release(&mut self, reason: &str) -> Option<Append> {
        let (term, _) = self.active.take()?;
        Some(Append {
            expected: self.view.version,
            record: LeaseRecord::Released {
                gateway: self.me.gateway.clone(),
                term,
                reason: reason.to_owned(),
                by: self.me.gateway.clone(),
            },
        })
    }
}
