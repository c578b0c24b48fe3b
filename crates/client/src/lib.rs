//! edgebus-client: the async Rust client of an edgebus node.
//!
//! A [`Client`] holds one gRPC channel to a node (`edgebus serve`) and
//! speaks `edgebus.v1` through the generated tonic client. Arguments and
//! answers are the edgebus types (`StreamName`, `NewEvent`,
//! `RecordedEvent`, …); the conversions are `edgebus-proto`'s, so this crate
//! never touches a protobuf message by hand.
//!
//! Every failure is a [`ClientError`]. A node's refusal carries the stable
//! error code and, for a failed expectation, what was expected and where the
//! stream is, so that a caller can branch on [`ClientError::code`] rather
//! than on message text.
//!
//! A call the node refuses as `BUSY` (its write queue is full) or as
//! `RESOURCE_EXHAUSTED` with a retry delay (an ingest quota of its stream
//! pattern is used up) was not accepted, and is sent again after the node's
//! advised pause, with jittered exponential backoff, within the bounds of
//! the client's [`RetryPolicy`] (by default at most 5 attempts and 10 s of
//! waiting; see [`Client::with_retry`]). A producer over its quota is so
//! slowed to the quota's rate; once the policy gives up, the refusal is
//! returned, and [`ClientError::retry_after`] says when to try again.
//!
//! [`transform`] runs racing deterministic transformers over a node.

mod append_stream;
mod group;
mod store_calls;
mod subscription;
pub mod transform;

pub use edgebus_proto::convert::{StreamSelector, SubscribeFrom, SubscriptionFilter};
pub use group::{Consumer, ConsumerItem};
pub use subscription::{CREDIT_WINDOW_DEFAULT, Credit, Subscription, SubscriptionItem};

use std::time::Duration;

use edgebus_proto::convert::{self, AppendArgs, ConvertError, ListStreamsArgs, ReadStreamArgs, StreamInfoArgs};
use edgebus_proto::v1;
use edgebus_proto::v1::consumer_groups_client::ConsumerGroupsClient;
use edgebus_proto::v1::event_store_client::EventStoreClient;
use edgebus_store::{AppendResult, Direction, StreamFrom, StreamInfo};
use edgebus_types::{ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use tonic::transport::{Channel, Endpoint};

/// The address a node's gRPC API listens on unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7290";

/// How long establishing the connection may take before it fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one call may take before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one edgebus node.
///
/// Cheap to clone: clones share the underlying HTTP/2 channel.
#[derive(Debug, Clone)]
pub struct Client {
    inner: EventStoreClient<Channel>,
    /// The connection's `AppendStream`, shared by clones.
    appends: std::sync::Arc<append_stream::AppendStreams>,
    groups: ConsumerGroupsClient<Channel>,
    addr: String,
    retry: RetryPolicy,
}

impl Client {
    /// Connects to the node at `addr`: a URI such as `http://127.0.0.1:7290`,
    /// or `host:port`, which is taken as `http://host:port`.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|source| ClientError::InvalidAddress { addr: addr.to_owned(), source })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|source| ClientError::Connect { addr: uri.clone(), source })?;
        Ok(Self {
            inner: EventStoreClient::new(channel.clone()),
            appends: std::sync::Arc::default(),
            groups: ConsumerGroupsClient::new(channel),
            addr: uri,
            retry: RetryPolicy::default(),
        })
    }

    /// This client with `policy` for calls the node refuses as `BUSY` or
    /// over a quota ([`RetryPolicy::default`] unless set;
    /// [`RetryPolicy::none`] to never retry).
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The address this client connected to, as a URI.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Appends `events` to `stream` if its version is what `expected` says.
    pub async fn append(
        &self,
        stream: StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, ClientError> {
        let request = v1::AppendRequest::from(AppendArgs { stream, expected, events });
        let response = self.retrying(request, |inner, r| self.append_once(inner, r)).await?;
        Ok(AppendResult::from(response.into_inner()))
    }

    /// One attempt of an append: over the connection's append stream, or
    /// by unary call if the stream broke before answering (the same event
    /// ids make the second sending idempotent) or the node has no stream.
    async fn append_once(
        &self,
        mut inner: EventStoreClient<Channel>,
        request: v1::AppendRequest,
    ) -> Result<tonic::Response<v1::AppendResponse>, tonic::Status> {
        let streamed = tokio::time::timeout(REQUEST_TIMEOUT, self.appends.append(&inner, request.clone())).await;
        match streamed {
            Ok(append_stream::Answer::Answered(answer)) => answer.map(tonic::Response::new),
            Ok(append_stream::Answer::Broken) => inner.append(request).await,
            Err(_) => {
                Err(tonic::Status::deadline_exceeded(format!("no answer to the append within {REQUEST_TIMEOUT:?}")))
            }
        }
    }

    /// Reads up to `max_count` events of `stream` from `from` in `direction`.
    /// A `max_count` of 0 or above the node's maximum reads the maximum.
    pub async fn read_stream(
        &self,
        stream: StreamName,
        from: StreamFrom,
        direction: Direction,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, ClientError> {
        let request = v1::ReadStreamRequest::from(ReadStreamArgs { stream, from, direction, max_count });
        let response = self.retrying(request, |mut inner, r| async move { inner.read_stream(r).await }).await?;
        Ok(convert::read_stream_events(response.into_inner())?)
    }

    /// What the node knows of `stream`; `None` if it never had events.
    pub async fn stream_info(&self, stream: StreamName) -> Result<Option<StreamInfo>, ClientError> {
        let request = v1::StreamInfoRequest::from(StreamInfoArgs { stream });
        let response = self.retrying(request, |mut inner, r| async move { inner.stream_info(r).await }).await?;
        Ok(response.into_inner().info.map(StreamInfo::try_from).transpose()?)
    }

    /// Up to `limit` streams in name order, after the name `after` when
    /// given (a cursor: the last name of the previous page).
    pub async fn list_streams(
        &self,
        after: Option<String>,
        limit: usize,
        include_system: bool,
    ) -> Result<Vec<StreamInfo>, ClientError> {
        let request = v1::ListStreamsRequest::from(ListStreamsArgs { after, limit, include_system });
        let response = self.retrying(request, |mut inner, r| async move { inner.list_streams(r).await }).await?;
        Ok(convert::list_streams(response.into_inner())?)
    }

    /// The node's figures now: queues, backpressure, log counters and
    /// positions, subscriptions, append latency. The wire message itself, a
    /// flat record of numbers documented in `edgebus.proto`; the same figures
    /// as the node's `GET /v1/stats`.
    pub async fn stats(&self) -> Result<v1::StatsResponse, ClientError> {
        let response = self.inner.clone().stats(v1::StatsRequest {}).await.map_err(|s| self.status(s))?;
        Ok(response.into_inner())
    }

    fn status(&self, status: tonic::Status) -> ClientError {
        ClientError::from_status(&self.addr, status)
    }

    /// Runs `call` with `request`, again after a pause while the node
    /// refuses it as retryable (see [`ClientError::retry_after`]) and the
    /// retry policy allows: such a request was not accepted, so sending it
    /// again is safe. The request is cloned only
    /// for attempts that may be followed by another.
    async fn retrying<Req: Clone, T, Fut>(
        &self,
        request: Req,
        call: impl Fn(EventStoreClient<Channel>, Req) -> Fut,
    ) -> Result<tonic::Response<T>, ClientError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut request = Some(request);
        let mut waited = Duration::ZERO;
        for attempt in 1u32.. {
            let last = attempt >= self.retry.max_attempts;
            let this_request = if last { request.take() } else { request.clone() };
            let status = match call(self.inner.clone(), this_request.expect("a request per attempt")).await {
                Ok(response) => return Ok(response),
                Err(status) => status,
            };
            let advised = match convert::error_detail_from_status(&status).as_ref().and_then(retryable_after) {
                Some(advised) => advised,
                None => return Err(self.status(status)),
            };
            match self.retry.delay_before_retry(attempt, advised, waited, jitter()) {
                Some(delay) => {
                    tokio::time::sleep(delay).await;
                    waited += delay;
                }
                None => return Err(self.status(status)),
            }
        }
        unreachable!("the policy stops the attempts before u32::MAX")
    }
}

/// The wait a refusal advises if it is one a client may retry as it is:
/// `BUSY` (the write queue was full; 0 if no wait is given), or
/// `RESOURCE_EXHAUSTED` with `retry_after_ms` (an ingest quota). Other
/// `RESOURCE_EXHAUSTED` refusals (too many subscriptions) give no delay and
/// are not retried.
fn retryable_after(detail: &v1::ErrorDetail) -> Option<Duration> {
    match detail.error_code() {
        v1::ErrorCode::Busy => Some(Duration::from_millis(detail.retry_after_ms.unwrap_or(0))),
        v1::ErrorCode::ResourceExhausted => detail.retry_after_ms.map(Duration::from_millis),
        _ => None,
    }
}

/// How a [`Client`] retries a call that the node refused as `BUSY` (its
/// write queue was full) or over an ingest quota (`RESOURCE_EXHAUSTED` with
/// a retry delay); neither request was accepted.
///
/// Before retry `n` (1 for the first) it waits the larger of what the node
/// advised (`retry_after_ms`) and `base_delay × 2^(n-1)` (at most
/// `max_delay`), plus a random 0–50 % of that, so that clients refused
/// together do not return together. It gives up, returning the last
/// refusal, after `max_attempts` attempts or when the next wait would bring
/// the total waited above `max_total_delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts of one call, the first included; 1 never retries.
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles with each retry.
    pub base_delay: Duration,
    /// Longest backoff before one retry (the node's advice may be longer).
    pub max_delay: Duration,
    /// Longest total wait over all retries of one call.
    pub max_total_delay: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts within ten seconds, starting at 100 ms.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_total_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Never retry: a `BUSY` or quota refusal is returned at once.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// The wait before the attempt after `attempt` (1 for the first), given
    /// the node's `advised` wait, the total `waited` so far and `jitter` in
    /// `[0, 1)`; `None` when the policy gives up.
    pub fn delay_before_retry(
        &self,
        attempt: u32,
        advised: Duration,
        waited: Duration,
        jitter: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let doublings = attempt.saturating_sub(1).min(31);
        let backoff = self.base_delay.saturating_mul(1 << doublings).min(self.max_delay);
        let floor = backoff.max(advised);
        let delay = floor.saturating_add(floor.mul_f64(jitter.clamp(0.0, 1.0) * 0.5));
        (waited.saturating_add(delay) <= self.max_total_delay).then_some(delay)
    }
}

/// A number in `[0, 1)` that differs between calls and processes, for
/// jitter: the hash of a counter under std's randomly keyed hasher.
fn jitter() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address is not a valid URI.
    #[error("invalid server address {addr:?}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it does not parse.
        #[source]
        source: tonic::transport::Error,
    },
    /// No connection could be made.
    #[error("cannot connect to an edgebus node at {addr} (is one running? start it with `edgebus serve`)")]
    Connect {
        /// The address tried.
        addr: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The node refused the call with a stable error code.
    #[error("{} (code {}, {})", detail.message, detail.code, code_name(detail.code))]
    Refused {
        /// The node's error detail: code, message and the fields the code documents.
        detail: v1::ErrorDetail,
    },
    /// The call failed without an edgebus error detail: the connection was
    /// lost, or a proxy or the gRPC runtime answered.
    #[error("call to {addr} failed: {} ({:?})", status.message(), status.code())]
    Rpc {
        /// The node's address.
        addr: String,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// The node answered with something this client cannot read.
    #[error("invalid answer from the node: {0}")]
    InvalidResponse(#[from] ConvertError),
}

impl ClientError {
    fn from_status(addr: &str, status: tonic::Status) -> Self {
        match convert::error_detail_from_status(&status) {
            Some(detail) => Self::Refused { detail },
            None => Self::Rpc { addr: addr.to_owned(), status: Box::new(status) },
        }
    }

    /// The stable error code number (`ErrorDetail.code`), if the node sent one.
    pub fn code(&self) -> Option<u32> {
        match self {
            Self::Refused { detail } => Some(detail.code),
            _ => None,
        }
    }

    /// The stable error code, `Unspecified` for a number this version does
    /// not know; `None` if the node sent none.
    pub fn error_code(&self) -> Option<v1::ErrorCode> {
        match self {
            Self::Refused { detail } => Some(detail.error_code()),
            _ => None,
        }
    }

    /// The stable code's name without its prefix, e.g. `WRONG_EXPECTED_VERSION`.
    pub fn code_name(&self) -> Option<&'static str> {
        self.code().map(code_name)
    }

    /// The failed expectation of a `WRONG_EXPECTED_VERSION` refusal.
    pub fn wrong_expected_version(&self) -> Option<edgebus_types::WrongExpectedVersion> {
        match self {
            Self::Refused { detail } => detail.wrong_expected_version(),
            _ => None,
        }
    }

    /// How long the node advised to wait before sending this call again, if
    /// it is a refusal that may be retried as it is: `BUSY`, or
    /// `RESOURCE_EXHAUSTED` from an ingest quota (`ingest quota for
    /// telemetry.> exceeded (1000 events/s); retry after 12 ms`). The
    /// client's [`RetryPolicy`] already retried it as far as it allows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.detail().and_then(retryable_after)
    }

    /// The node's error detail, if it sent one.
    pub fn detail(&self) -> Option<&v1::ErrorDetail> {
        match self {
            Self::Refused { detail } => Some(detail),
            _ => None,
        }
    }
}

/// The name of a stable code without the `ERROR_CODE_` prefix; `UNKNOWN` for
/// a number this version does not know.
pub fn code_name(code: u32) -> &'static str {
    match i32::try_from(code).ok().and_then(|c| v1::ErrorCode::try_from(c).ok()) {
        Some(v1::ErrorCode::Unspecified) | None => "UNKNOWN",
        Some(known) => known.as_str_name().trim_start_matches("ERROR_CODE_"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_drop_the_prefix() {
        assert_eq!(code_name(1), "WRONG_EXPECTED_VERSION");
        assert_eq!(code_name(100), "INVALID_NAME");
        assert_eq!(code_name(9999), "UNKNOWN");
        assert_eq!(code_name(0), "UNKNOWN");
    }

    #[test]
    fn a_refusal_displays_its_message_and_code() {
        let detail = v1::ErrorDetail {
            code: 1,
            message: "wrong expected version: expected no_stream, stream is at 2".to_owned(),
            expected: Some(ExpectedVersion::NoStream.into()),
            current: Some(2),
            ..v1::ErrorDetail::default()
        };
        let error = ClientError::from_status("http://x", convert::status_from_error_detail(detail));
        assert_eq!(
            error.to_string(),
            "wrong expected version: expected no_stream, stream is at 2 (code 1, WRONG_EXPECTED_VERSION)"
        );
        let wrong = error.wrong_expected_version().expect("a wrong expected version");
        assert_eq!((wrong.expected, wrong.current), (ExpectedVersion::NoStream, Some(2)));
    }

    #[test]
    fn busy_retries_back_off_exponentially_above_the_advice_and_stop_at_the_bounds() {
        let policy = RetryPolicy::default();
        let ms = Duration::from_millis;
        let advised = ms(100);
        // Without jitter: 100, 200, 400, 800 ms, then the fifth attempt is the last.
        let waits: Vec<Option<Duration>> =
            (1..=5).map(|attempt| policy.delay_before_retry(attempt, advised, Duration::ZERO, 0.0)).collect();
        assert_eq!(waits, [Some(ms(100)), Some(ms(200)), Some(ms(400)), Some(ms(800)), None]);
        // Jitter adds up to half, never less than the advice.
        assert_eq!(policy.delay_before_retry(1, advised, Duration::ZERO, 0.5), Some(ms(125)));
        assert_eq!(
            policy.delay_before_retry(1, advised, Duration::ZERO, 0.999_999),
            Some(ms(149) + Duration::from_nanos(999_950))
        );
        // A longer advice wins over the backoff, and over max_delay.
        assert_eq!(policy.delay_before_retry(2, ms(3000), Duration::ZERO, 0.0), Some(ms(3000)));
        // The backoff is capped at max_delay.
        let many = RetryPolicy { max_attempts: 100, max_total_delay: Duration::from_secs(3600), ..policy.clone() };
        assert_eq!(many.delay_before_retry(40, Duration::ZERO, Duration::ZERO, 0.0), Some(Duration::from_secs(2)));
        // The total wait stays within max_total_delay.
        assert_eq!(policy.delay_before_retry(2, advised, ms(9_800), 0.0), Some(ms(200)));
        assert_eq!(policy.delay_before_retry(2, advised, ms(9_801), 0.0), None);
        assert_eq!(policy.delay_before_retry(1, Duration::from_secs(11), Duration::ZERO, 0.0), None);
        // none() never retries.
        assert_eq!(RetryPolicy::none().delay_before_retry(1, advised, Duration::ZERO, 0.0), None);
    }

    #[test]
    fn the_default_schedule_waits_at_most_the_total_bound() {
        let policy = RetryPolicy::default();
        for jitter in [0.0, 0.3, 0.999] {
            let mut waited = Duration::ZERO;
            let mut attempts = 1;
            while let Some(delay) = policy.delay_before_retry(attempts, Duration::from_millis(100), waited, jitter) {
                waited += delay;
                attempts += 1;
            }
            assert!(attempts <= policy.max_attempts, "{attempts}");
            assert!(waited <= policy.max_total_delay, "{waited:?}");
        }
    }

    #[test]
    fn jitter_is_in_the_unit_interval_and_varies() {
        let samples: Vec<f64> = (0..100).map(|_| jitter()).collect();
        assert!(samples.iter().all(|j| (0.0..1.0).contains(j)), "{samples:?}");
        assert!(samples.windows(2).any(|pair| pair[0] != pair[1]), "{samples:?}");
    }

    /// A client whose channel never connects: the calls under test answer
    /// without it.
    fn unconnected(retry: RetryPolicy) -> Client {
        let channel = Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        Client {
            inner: EventStoreClient::new(channel.clone()),
            appends: std::sync::Arc::default(),
            groups: ConsumerGroupsClient::new(channel),
            addr: "http://127.0.0.1:9".to_owned(),
            retry,
        }
    }

    /// Runs `retrying` over a call that answers `answers[i]` at attempt `i`
    /// (the last answer repeats); returns the outcome and the attempts made.
    async fn attempts_with(retry: RetryPolicy, answers: &[Option<u32>]) -> (Result<(), ClientError>, usize) {
        let client = unconnected(retry);
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let result = client
            .retrying("request".to_owned(), |_inner, request| {
                assert_eq!(request, "request");
                let attempt = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let answer = answers[attempt.min(answers.len() - 1)];
                async move {
                    match answer {
                        None => Ok(tonic::Response::new(())),
                        Some(code) => Err(convert::status_from_error_detail(v1::ErrorDetail {
                            code,
                            message: "refused".to_owned(),
                            retry_after_ms: Some(1),
                            ..v1::ErrorDetail::default()
                        })),
                    }
                }
            })
            .await;
        (result.map(|_| ()), attempts.into_inner())
    }

    #[tokio::test]
    async fn busy_calls_are_retried_within_the_policy_and_other_refusals_are_not() {
        const BUSY: u32 = v1::ErrorCode::Busy as u32;
        let fast = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_total_delay: Duration::from_secs(1),
        };
        let (result, attempts) = attempts_with(fast.clone(), &[Some(BUSY), Some(BUSY), None]).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(attempts, 3);
        // Always busy: the last refusal is returned after max_attempts.
        let (result, attempts) = attempts_with(fast.clone(), &[Some(BUSY)]).await;
        assert_eq!(result.unwrap_err().code(), Some(BUSY));
        assert_eq!(attempts, 4);
        // Any other refusal is returned at once.
        let (result, attempts) = attempts_with(fast, &[Some(1), None]).await;
        assert_eq!(result.unwrap_err().code(), Some(1));
        assert_eq!(attempts, 1);
        let (result, attempts) = attempts_with(RetryPolicy::none(), &[Some(BUSY), None]).await;
        assert_eq!(result.unwrap_err().code(), Some(BUSY));
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn quota_refusals_are_retried_and_report_their_delay_but_other_exhaustion_is_not() {
        const EXHAUSTED: u32 = v1::ErrorCode::ResourceExhausted as u32;
        let fast = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_total_delay: Duration::from_secs(1),
        };
        // A quota refusal carries its delay: retried, then returned with it.
        let (result, attempts) = attempts_with(fast.clone(), &[Some(EXHAUSTED), None]).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(attempts, 2);
        let (result, attempts) = attempts_with(fast.clone(), &[Some(EXHAUSTED)]).await;
        let error = result.unwrap_err();
        assert_eq!((error.code(), error.retry_after(), attempts), (Some(EXHAUSTED), Some(Duration::from_millis(1)), 3));
        // Without a delay (too many subscriptions): returned at once.
        let client = unconnected(fast);
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let result = client
            .retrying((), |_inner, ()| {
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async {
                    Err::<tonic::Response<()>, _>(convert::status_from_error_detail(v1::ErrorDetail {
                        code: EXHAUSTED,
                        message: "too many subscriptions: the node serves at most 1".to_owned(),
                        ..v1::ErrorDetail::default()
                    }))
                }
            })
            .await;
        let error = result.unwrap_err();
        assert_eq!((error.code(), error.retry_after()), (Some(EXHAUSTED), None));
        assert_eq!(attempts.into_inner(), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_address_and_suggests_serve() {
        // Bind then drop a listener so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let error = Client::connect(&format!("127.0.0.1:{port}")).await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains(&format!("http://127.0.0.1:{port}")), "{text}");
        assert!(text.contains("edgebus serve"), "{text}");
    }
}
