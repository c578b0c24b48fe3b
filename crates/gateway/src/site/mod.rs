//! What a gateway needs of its site, behind one trait: a gateway runs inside
//! the node ([`LocalSite`], the store itself) or as its own process talking
//! to the node over gRPC ([`RemoteSite`], the node's `edgebus.v1.Site`
//! service). Everything a gateway keeps — routes, policies, cursors, the
//! lease — lives in the site's log, so any gateway of the site can take
//! over from any other.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use edgebus_store::{AppendResult, Direction, ExistsOrWrite, ReplicaWrite, Store, StreamFrom, WriteError};
use edgebus_types::{ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::metrics::now_ms;

pub mod remote;

pub use remote::RemoteSite;

/// A boxed future of a site call.
pub type SiteFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SiteError>> + Send + 'a>>;

/// A site call that failed as a whole.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SiteError {
    /// A conditional append found the stream elsewhere.
    #[error("the stream is at version {current:?}, not the one expected")]
    WrongVersion {
        /// The stream's last version (`None`: no stream).
        current: Option<u64>,
    },
    /// Replicated writes under a term older than one the site has seen from
    /// the same origin: they come from a deposed gateway.
    #[error(
        "site {origin} is at gateway term {current} here; writes under term {term} come from a deposed gateway and are refused"
    )]
    Fenced {
        /// The origin site.
        origin: String,
        /// The term the writes carried.
        term: u64,
        /// The highest term seen from that origin.
        current: u64,
    },
    /// The request was refused (it names the problem).
    #[error("{0}")]
    Refused(String),
    /// The site could not be reached or could not serve the call; retry.
    #[error("{0}")]
    Unavailable(String),
}

/// Why one replicated write was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRefusal {
    /// The store could not write now (busy, unavailable): the link closes
    /// and the sender retries later; otherwise the event itself is refused.
    pub retryable: bool,
    /// What went wrong.
    pub message: String,
}

impl From<&WriteError> for ReplicaRefusal {
    fn from(error: &WriteError) -> Self {
        let retryable = matches!(error, WriteError::Busy | WriteError::Unavailable(_) | WriteError::Index(_));
        Self { retryable, message: error.to_string() }
    }
}

/// The answer to one replicated write.
pub type ReplicaAnswer = Result<ExistsOrWrite, ReplicaRefusal>;

/// The fence a batch of replicated writes carries: the sending gateway's
/// term at its home site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The origin site.
    pub origin: String,
    /// The sending gateway's lease term (0: a gateway without a lease).
    pub term: u64,
}

/// What a gateway needs of its site.
pub trait Site: Send + Sync + fmt::Debug + 'static {
    /// Up to `max_records` events (and about `max_bytes`) of the log from
    /// position `from`, every stream included.
    fn read_log(&self, from: u64, max_records: usize, max_bytes: u64) -> SiteFuture<'_, Vec<RecordedEvent>>;

    /// Up to `count` events of a (system) stream; a stream that does not
    /// exist reads as empty.
    fn read_stream(
        &self,
        stream: StreamName,
        from: StreamFrom,
        direction: Direction,
        count: usize,
    ) -> SiteFuture<'_, Vec<RecordedEvent>>;

    /// Appends to a `$gateway` stream, conditionally on `expected`.
    fn append(
        &self,
        stream: StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> SiteFuture<'_, AppendResult>;

    /// Writes events of other sites at their origin versions, one answer
    /// per write, unless `fence` is older than a term the site has seen.
    fn replicate(&self, fence: Fence, writes: Vec<ReplicaWrite>) -> SiteFuture<'_, Vec<ReplicaAnswer>>;

    /// The log's end position, as it grows.
    fn end(&self) -> watch::Receiver<u64>;
}

/// The highest gateway term seen per origin site. Kept in memory by the
/// node, shared by every gateway writing into it (embedded or remote): a
/// node restart forgets it, and the first link of the new holder teaches it
/// again (stated in docs/operations.md).
#[derive(Debug, Default)]
pub struct Fences {
    terms: Mutex<HashMap<String, u64>>,
}

/// Most origin sites whose gateway terms a site keeps (one entry each).
pub const FENCED_ORIGINS_MAX: usize = 1024;

impl Fences {
    /// Admits `fence` (raising the origin's term) or says why not.
    pub fn admit(&self, fence: &Fence) -> Result<(), SiteError> {
        let mut terms = self.terms.lock();
        if !terms.contains_key(&fence.origin) && terms.len() >= FENCED_ORIGINS_MAX {
            return Err(SiteError::Refused(format!(
                "this site already keeps gateway terms for {FENCED_ORIGINS_MAX} origin sites and takes links from no \
                 other; list the sites it replicates from in [gateway] peers"
            )));
        }
        let current = terms.entry(fence.origin.clone()).or_insert(0);
        if fence.term < *current {
            return Err(SiteError::Fenced { origin: fence.origin.clone(), term: fence.term, current: *current });
        }
        *current = fence.term;
        Ok(())
    }

    /// The highest term seen from `origin`.
    pub fn term(&self, origin: &str) -> u64 {
        self.terms.lock().get(origin).copied().unwrap_or(0)
    }
}

/// The site as seen from inside the node: its store.
#[derive(Clone)]
pub struct LocalSite {
    store: Arc<Store>,
    end: watch::Receiver<u64>,
    fences: Arc<Fences>,
}

impl fmt::Debug for LocalSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSite").field("end", &*self.end.borrow()).finish_non_exhaustive()
    }
}

impl LocalSite {
    /// The site of `store`, whose log end `end` follows.
    pub fn new(store: Arc<Store>, end: watch::Receiver<u64>) -> Self {
        Self { store, end, fences: Arc::new(Fences::default()) }
    }

    /// The terms this site has seen.
    pub fn fences(&self) -> &Arc<Fences> {
        &self.fences
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Store) -> Result<T, SiteError> + Send + 'static,
    ) -> Result<T, SiteError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || call(&store))
            .await
            .map_err(|e| SiteError::Unavailable(format!("the store task failed: {e}")))?
    }
}

impl Site for LocalSite {
    fn read_log(&self, from: u64, max_records: usize, max_bytes: u64) -> SiteFuture<'_, Vec<RecordedEvent>> {
        Box::pin(self.blocking(move |store| {
            store.read_log(from, max_records, max_bytes).map_err(|e| SiteError::Unavailable(e.to_string()))
        }))
    }

    fn read_stream(
        &self,
        stream: StreamName,
        from: StreamFrom,
        direction: Direction,
        count: usize,
    ) -> SiteFuture<'_, Vec<RecordedEvent>> {
        Box::pin(self.blocking(move |store| match store.read_stream(&stream, from, direction, count, now_ms()) {
            Ok(events) => Ok(events),
            Err(e) if e.code() == edgebus_store::ErrorCode::StreamNotFound => Ok(Vec::new()),
            Err(e) => Err(SiteError::Unavailable(e.to_string())),
        }))
    }

    fn append(
        &self,
        stream: StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> SiteFuture<'_, AppendResult> {
        Box::pin(
            self.blocking(move |store| {
                store.append_system(&stream, expected, events).map_err(|e| site_error_of_write(&e))
            }),
        )
    }

    fn replicate(&self, fence: Fence, writes: Vec<ReplicaWrite>) -> SiteFuture<'_, Vec<ReplicaAnswer>> {
        Box::pin(async move {
            self.fences.admit(&fence)?;
            if writes.is_empty() {
                return Ok(Vec::new());
            }
            self.blocking(move |store| {
                Ok(store.replicate(writes).into_iter().map(|a| a.map_err(|e| ReplicaRefusal::from(&e))).collect())
            })
            .await
        })
    }

    fn end(&self) -> watch::Receiver<u64> {
        self.end.clone()
    }
}

/// The site error a failed system append becomes.
pub fn site_error_of_write(error: &WriteError) -> SiteError {
    match error {
        WriteError::WrongExpectedVersion { source, .. } => SiteError::WrongVersion { current: source.current },
        WriteError::Busy | WriteError::Unavailable(_) | WriteError::Index(_) => {
            SiteError::Unavailable(error.to_string())
        }
        other => SiteError::Refused(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(origin: &str, term: u64) -> Fence {
        Fence { origin: origin.to_owned(), term }
    }

    #[test]
    fn a_lower_term_is_fenced_and_the_origins_kept_are_bounded() {
        let fences = Fences::default();
        assert_eq!(fences.admit(&fence("eu", 3)), Ok(()));
        assert_eq!(fences.admit(&fence("eu", 3)), Ok(()), "the same term again");
        assert_eq!(fences.admit(&fence("eu", 2)), Err(SiteError::Fenced { origin: "eu".into(), term: 2, current: 3 }));
        assert_eq!(fences.term("eu"), 3);
        for i in 1..FENCED_ORIGINS_MAX {
            assert_eq!(fences.admit(&fence(&format!("s{i}"), 1)), Ok(()));
        }
        assert!(
            matches!(fences.admit(&fence("one-more", 1)), Err(SiteError::Refused(m)) if m.contains("1024 origin sites"))
        );
        assert_eq!(fences.admit(&fence("eu", 4)), Ok(()), "a known origin still moves on");
    }
}
