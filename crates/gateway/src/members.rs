//! Before a gateway takes part in its site's lease: is its name free?
//!
//! Every gateway says it is alive every lease in `$gateway.members` (see
//! [`crate::lease::driver`]). Two processes under one name would share the
//! lease's identity (a holder recognises its lease by name and instance, an
//! operator moves it by name), so a new gateway refuses to start while
//! another instance of its name keeps saying it is alive:
//!
//! - the newest heartbeat of the name is at most two leases old (by its
//!   timestamp against this process's clock), and
//! - another heartbeat of the name comes within one and a half leases.
//!
//! A heartbeat left by a gateway that has since stopped (or was killed)
//! is followed by nothing, so its successor waits at most 1.5 leases. The
//! lease used is the longer of this gateway's and the one the heartbeat
//! announces (each gateway beats at its own lease).

use std::time::{Duration, Instant};

use edgebus_types::SiteName;

use crate::lease::driver::{Member, read_members};
use crate::metrics::now_ms;
use crate::site::{Site, SiteError};

/// Heartbeats read back from the end of `$gateway.members` per look: a
/// heartbeat per gateway per lease, so every live gateway of a site is in
/// there unless the site runs hundreds of them.
const MEMBERS_READ: usize = 1024;

/// Why a gateway may not start under its name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameCheckError {
    /// Another running gateway has the name.
    #[error(
        "a gateway named {name} is already running for site {site} (instance {instance}, last seen {last_seen_ms_ago} ms ago); choose another --name or stop it first"
    )]
    Taken {
        /// The name.
        name: String,
        /// The site.
        site: String,
        /// The other gateway's process (its `instance`).
        instance: String,
        /// How long ago its newest heartbeat was stamped.
        last_seen_ms_ago: u64,
    },
    /// The site could not be read.
    #[error("cannot read the gateways of site {site}: {error}")]
    Site {
        /// The site.
        site: String,
        /// What failed.
        error: SiteError,
    },
}

/// The newest heartbeat of `name` and its timestamp, if any.
async fn newest(site: &dyn Site, site_name: &SiteName, name: &str) -> Result<Option<(Member, u64)>, NameCheckError> {
    let members = read_members(site, MEMBERS_READ)
        .await
        .map_err(|error| NameCheckError::Site { site: site_name.to_string(), error })?;
    Ok(members.into_iter().find(|(member, _)| member.gateway == name))
}

/// Refuses a gateway named `name` (with lease `lease_ms`) while another
/// running gateway of `site_name` has that name; see the module docs.
/// Returns at once when the name was never used or its last heartbeat is
/// old, else after at most 1.5 leases.
pub async fn check_name_free(
    site: &dyn Site,
    site_name: &SiteName,
    name: &str,
    lease_ms: u64,
) -> Result<(), NameCheckError> {
    let Some((member, seen_ms)) = newest(site, site_name, name).await? else { return Ok(()) };
    let lease_ms = lease_ms.max(member.lease_ms);
    if now_ms().saturating_sub(seen_ms) > 2 * lease_ms {
        return Ok(());
    }
    // Recent: wait for proof of life, looking again whenever the log grows,
    // at most every tenth of a lease.
    let pace = Duration::from_millis((lease_ms / 10).clamp(10, 250));
    let deadline = Instant::now() + Duration::from_millis(lease_ms * 3 / 2);
    let mut end = site.end();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        match tokio::time::timeout(left, end.changed()).await {
            Err(_) => return Ok(()), // nothing was written at all
            Ok(Ok(())) => {}
            // The site's end is no longer followed: look at the pace.
            Ok(Err(_)) => tokio::time::sleep(pace.min(left)).await,
        }
        if let Some((again, at_ms)) = newest(site, site_name, name).await?
            && at_ms > seen_ms
        {
            return Err(NameCheckError::Taken {
                name: name.to_owned(),
                site: site_name.to_string(),
                instance: again.instance,
                last_seen_ms_ago: now_ms().saturating_sub(at_ms),
            });
        }
        tokio::time::sleep(pace.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use edgebus_store::{Store, StoreConfig};
    use edgebus_types::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
    use tokio::sync::watch;

    use super::*;
    use crate::lease::{MEMBER_EVENT_TYPE, MEMBERS_STREAM};
    use crate::site::LocalSite;

    struct Fixture {
        _dir: tempfile::TempDir,
        site: Arc<LocalSite>,
        end: watch::Sender<u64>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreConfig::default()).unwrap());
        let (end, watching) = watch::channel(0);
        Fixture { _dir: dir, site: Arc::new(LocalSite::new(store, watching)), end }
    }

    /// Appends a heartbeat of `gateway`/`instance` stamped `timestamp_ms`,
    /// and moves the end watch as the node's live feed would.
    async fn beat(fixture: &Fixture, gateway: &str, instance: &str, lease_ms: u64, timestamp_ms: u64) {
        let member = Member {
            gateway: gateway.into(),
            instance: instance.into(),
            role: "standby".into(),
            term: 0,
            wan: String::new(),
            http: String::new(),
            lease_ms,
        };
        let event = NewEvent {
            id: EventId::generate(),
            event_type: EventType::new(MEMBER_EVENT_TYPE).unwrap(),
            data: serde_json::to_vec(&member).unwrap(),
            metadata: Vec::new(),
            timestamp_ms,
        };
        let stream = StreamName::system(MEMBERS_STREAM).unwrap();
        let written = fixture.site.append(stream, ExpectedVersion::Any, vec![event]).await.unwrap();
        fixture.end.send_replace(written.first_position + 1);
    }

    fn us() -> SiteName {
        SiteName::new("us").unwrap()
    }

    #[tokio::test]
    async fn a_name_never_used_or_long_silent_is_free_at_once() {
        let fixture = fixture();
        let started = Instant::now();
        check_name_free(fixture.site.as_ref(), &us(), "gw-us", 100).await.unwrap();
        beat(&fixture, "gw-us", "a", 100, now_ms() - 1_000).await;
        beat(&fixture, "gw-other", "b", 100, now_ms()).await;
        check_name_free(fixture.site.as_ref(), &us(), "gw-us", 100).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100), "no wait: {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_recent_heartbeat_followed_by_nothing_frees_the_name_after_a_lease_and_a_half() {
        let fixture = fixture();
        beat(&fixture, "gw-us", "a", 100, now_ms()).await;
        // Other writes to the site are no heartbeat of the name.
        beat(&fixture, "gw-other", "b", 100, now_ms()).await;
        let started = Instant::now();
        check_name_free(fixture.site.as_ref(), &us(), "gw-us", 100).await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(140) && waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn a_gateway_that_keeps_beating_holds_its_name() {
        let fixture = Arc::new(fixture());
        beat(&fixture, "gw-us", "a1b2", 100, now_ms()).await;
        let beating = Arc::clone(&fixture);
        let beats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                beat(&beating, "gw-us", "a1b2", 100, now_ms()).await;
            }
        });
        let error = check_name_free(fixture.site.as_ref(), &us(), "gw-us", 100).await.unwrap_err();
        beats.abort();
        let NameCheckError::Taken { ref name, ref site, ref instance, last_seen_ms_ago } = error else {
            panic!("{error:?}")
        };
        assert_eq!((name.as_str(), site.as_str(), instance.as_str()), ("gw-us", "us", "a1b2"));
        assert!(last_seen_ms_ago < 1_000, "{last_seen_ms_ago}");
        let message = error.to_string();
        assert!(
            message.starts_with("a gateway named gw-us is already running for site us (instance a1b2, last seen ")
                && message.ends_with(" ms ago); choose another --name or stop it first"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn the_longer_lease_of_the_heartbeat_counts() {
        // A gateway with a 10 s lease beat 1 s ago: recent for it, although
        // more than two of our 100 ms leases ago.
        let fixture = Arc::new(fixture());
        beat(&fixture, "gw-us", "slow", 10_000, now_ms() - 1_000).await;
        let beating = Arc::clone(&fixture);
        let beats = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            beat(&beating, "gw-us", "slow", 10_000, now_ms()).await;
        });
        let error = check_name_free(fixture.site.as_ref(), &us(), "gw-us", 100).await.unwrap_err();
        beats.await.unwrap();
        assert!(matches!(error, NameCheckError::Taken { ref instance, .. } if instance == "slow"), "{error:?}");
    }
}
