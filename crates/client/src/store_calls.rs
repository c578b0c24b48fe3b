//! The event store's conditional write and snapshot calls:
//! [`Client::exists_or_write`], [`Client::record_snapshot`],
//! [`Client::read_snapshot`], [`Client::list_snapshots`] and
//! [`Client::delete_snapshot`]. Like the other calls, a `BUSY` refusal is
//! retried within the client's [`RetryPolicy`](crate::RetryPolicy): both
//! writes are safe to send again (exists-or-write answers `Exists{same:
//! true}` to its own earlier write, and recording a snapshot again at the
//! same version replaces it with the same bytes).

use edgebus_proto::convert::{
    DeleteSnapshotArgs, ExistsOrWriteArgs, ListSnapshotsArgs, ReadSnapshotArgs, RecordSnapshotArgs,
};
use edgebus_proto::v1;
use edgebus_store::{ExistsOrWrite, Snapshot, SnapshotInfo};
use edgebus_types::{NewEvent, StreamName, StreamPattern};

use crate::{Client, ClientError};

impl Client {
    /// Writes `event` at version `index` of `stream` iff the stream holds
    /// exactly `index` events. If an event already sits at `index`, nothing
    /// is written and the answer says whether it is the same event (same
    /// content hash: type, data and metadata; not id or timestamp).
    ///
    /// A non-zero `event.timestamp_ms` is kept as the event's time (as a
    /// gateway keeps the origin's, or a transform its input's); 0 lets the
    /// node stamp its own clock. An `index` past the stream's end is refused
    /// with `GAP`.
    pub async fn exists_or_write(
        &self,
        stream: StreamName,
        index: u64,
        event: NewEvent,
    ) -> Result<ExistsOrWrite, ClientError> {
        let stamped = event.timestamp_ms != 0;
        let mut request = v1::ExistsOrWriteRequest::from(ExistsOrWriteArgs { stream, index, event });
        if !stamped {
            request.origin_timestamp_ms = None;
        }
        let response = self.retrying(request, |mut inner, r| async move { inner.exists_or_write(r).await }).await?;
        Ok(ExistsOrWrite::try_from(response.into_inner())?)
    }

    /// Records `state` as the snapshot of `stream` by `source` at `version`,
    /// replacing one recorded at the same version; answers its log position.
    /// The state is stored as one event, so it is bounded by the event data
    /// limit (`edgebus_types::limits::EVENT_DATA_BYTES_MAX`, less a little
    /// for the key).
    pub async fn record_snapshot(
        &self,
        source: &str,
        stream: StreamName,
        version: u64,
        state: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let request =
            v1::RecordSnapshotRequest::from(RecordSnapshotArgs { source: source.to_owned(), stream, version, state });
        let response = self.retrying(request, |mut inner, r| async move { inner.record_snapshot(r).await }).await?;
        Ok(response.into_inner().position)
    }

    /// The latest snapshot of `stream` by `source` at or below `at_or_below`
    /// (the latest of all if `None`); `None` if there is none.
    pub async fn read_snapshot(
        &self,
        source: &str,
        stream: StreamName,
        at_or_below: Option<u64>,
    ) -> Result<Option<Snapshot>, ClientError> {
        let request =
            v1::ReadSnapshotRequest::from(ReadSnapshotArgs { source: source.to_owned(), stream, at_or_below });
        match self.retrying(request, |mut inner, r| async move { inner.read_snapshot(r).await }).await {
            Ok(response) => Ok(Some(Snapshot::try_from(response.into_inner())?)),
            Err(error) if error.error_code() == Some(v1::ErrorCode::SnapshotNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Up to `limit` snapshot keys in (source, stream, version) order,
    /// optionally of one `source` and of streams matching `stream`.
    pub async fn list_snapshots(
        &self,
        source: Option<&str>,
        stream: Option<StreamPattern>,
        limit: usize,
    ) -> Result<Vec<SnapshotInfo>, ClientError> {
        let request =
            v1::ListSnapshotsRequest::from(ListSnapshotsArgs { source: source.map(str::to_owned), stream, limit });
        let response = self.retrying(request, |mut inner, r| async move { inner.list_snapshots(r).await }).await?;
        Ok(response.into_inner().snapshots.into_iter().map(SnapshotInfo::from).collect())
    }

    /// Deletes the snapshot of `stream` by `source` at `version`; answers
    /// the position of the deletion.
    pub async fn delete_snapshot(&self, source: &str, stream: StreamName, version: u64) -> Result<u64, ClientError> {
        let request =
            v1::DeleteSnapshotRequest::from(DeleteSnapshotArgs { source: source.to_owned(), stream, version });
        let response = self.retrying(request, |mut inner, r| async move { inner.delete_snapshot(r).await }).await?;
        Ok(response.into_inner().position)
    }
}
