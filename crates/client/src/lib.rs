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

use std::time::Duration;

use edgebus_proto::convert::{self, AppendArgs, ConvertError, ListStreamsArgs, ReadStreamArgs, StreamInfoArgs};
use edgebus_proto::v1;
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
    addr: String,
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
        Ok(Self { inner: EventStoreClient::new(channel), addr: uri })
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
        let response = self.inner.clone().append(request).await.map_err(|s| self.status(s))?;
        Ok(AppendResult::from(response.into_inner()))
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
        let response = self.inner.clone().read_stream(request).await.map_err(|s| self.status(s))?;
        Ok(convert::read_stream_events(response.into_inner())?)
    }

    /// What the node knows of `stream`; `None` if it never had events.
    pub async fn stream_info(&self, stream: StreamName) -> Result<Option<StreamInfo>, ClientError> {
        let request = v1::StreamInfoRequest::from(StreamInfoArgs { stream });
        let response = self.inner.clone().stream_info(request).await.map_err(|s| self.status(s))?;
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
        let response = self.inner.clone().list_streams(request).await.map_err(|s| self.status(s))?;
        Ok(convert::list_streams(response.into_inner())?)
    }

    fn status(&self, status: tonic::Status) -> ClientError {
        ClientError::from_status(&self.addr, status)
    }
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
