//! The runner: the I/O around [`Core`]. It checks the node before writing
//! anything, declares the transform, subscribes to the inputs from where the
//! core stands, writes each input's outputs and state hash in order, hands
//! snapshots to a background task, and retries what a restarting node or a
//! lost connection makes fail.
//!
//! Lifecycle: [`TransformRunner::run`] owns everything it starts. The
//! snapshot task lives from the declaration to the end of `run`, which
//! closes its queue and waits (bounded) for the snapshot in flight. The
//! subscription is replaced after a transient failure, from the first
//! position not yet applied.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgebus_proto::v1;
use edgebus_store::{Direction, ExistsOrWrite, StreamFrom, StreamInfo};
use edgebus_types::{EventType, NewEvent, RecordedEvent, StreamName, StreamPattern};
use tokio::sync::mpsc;

use super::logic::{
    ControlNames, Core, InputRef, Planned, Progress, SNAPSHOT_BYTES_MAX, SPEC_TYPE, Step, decode_snapshot, derived_id,
    metadata_transform, parse_spec, parse_state_hash, patterns_overlap, spec_data,
};
use super::{Divergence, MetricsSnapshot, Notice, Transform, TransformConfig, TransformError, TransformMetrics};
use crate::{Client, ClientError, Credit, StreamSelector, SubscribeFrom, SubscriptionFilter, SubscriptionItem};

/// Streams listed per page while checking the node.
const LIST_PAGE_STREAMS: usize = 1000;

/// Streams the start-up checks list at most per pattern (and transform
/// declarations at most): beyond it, the remaining streams are not checked.
const CHECK_STREAMS_MAX: usize = 10_000;

/// How long a transient failure may last, without progress in between,
/// before the runner gives up with it.
const RETRY_BUDGET: Duration = Duration::from_secs(30);
const RETRY_DELAY_FIRST: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);

/// How long the end of a run waits for a snapshot being written.
const SNAPSHOT_DRAIN: Duration = Duration::from_secs(10);

/// Runs one instance of a transform against one node.
pub struct TransformRunner<T: Transform> {
    client: Client,
    config: TransformConfig,
    transform: T,
    metrics: Arc<TransformMetrics>,
    notices: Arc<dyn Fn(&Notice) + Send + Sync>,
    stop_when_caught_up: bool,
}

impl<T: Transform> std::fmt::Debug for TransformRunner<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransformRunner")
            .field("config", &self.config)
            .field("stop_when_caught_up", &self.stop_when_caught_up)
            .finish_non_exhaustive()
    }
}

/// What every step of a run needs.
struct Context {
    client: Client,
    config: TransformConfig,
    names: ControlNames,
    metrics: Arc<TransformMetrics>,
    notices: Arc<dyn Fn(&Notice) + Send + Sync>,
}

/// Where a run starts.
struct Start<S> {
    progress: Progress,
    state: S,
    from_snapshot: bool,
}

/// A snapshot for the background task.
struct SnapshotJob {
    inputs_applied: u64,
    bytes: Vec<u8>,
}

impl<T: Transform> TransformRunner<T> {
    /// A runner of `transform` under `config`, talking to the node of
    /// `client`. Notices are dropped unless [`Self::on_notice`] says where
    /// they go.
    pub fn new(client: Client, config: TransformConfig, transform: T) -> Self {
        Self {
            client,
            config,
            transform,
            metrics: Arc::default(),
            notices: Arc::new(|_: &Notice| {}),
            stop_when_caught_up: false,
        }
    }

    /// The runner's counters, live while it runs.
    pub fn metrics(&self) -> Arc<TransformMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Sends every [`Notice`] to `sink` (for a log line), from the task that
    /// runs the runner or from its snapshot task: keep it short.
    #[must_use]
    pub fn on_notice(mut self, sink: impl Fn(&Notice) + Send + Sync + 'static) -> Self {
        self.notices = Arc::new(sink);
        self
    }

    /// Ends the run once every input written before it started is applied
    /// (at the subscription's `caught_up`), instead of running until
    /// `shutdown`.
    #[must_use]
    pub fn stop_when_caught_up(mut self) -> Self {
        self.stop_when_caught_up = true;
        self
    }

    /// Checks, resumes and runs until `shutdown` completes (between two
    /// inputs), until caught up if so configured, or until an error.
    /// Answers the counters at the end.
    ///
    /// Before its first write, it refuses with a [`TransformError`]:
    /// an invalid configuration (name, patterns that overlap each other or
    /// the control streams `transform.>`, periods); a transform declared on
    /// the node with other patterns; another transform whose output pattern
    /// overlaps ours; an existing output stream holding an event this
    /// transform did not write; an input pattern that matches no stream
    /// (unless `require_inputs` is off); a latest snapshot of another state
    /// version, unreadable, or counting outputs the streams no longer hold.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<MetricsSnapshot, TransformError> {
        let Self { client, config, transform, metrics, notices, stop_when_caught_up } = self;
        let names = ControlNames::new(&config.name).map_err(TransformError::InvalidConfig)?;
        check_config(&config)?;
        let context = Context { client, config, names, metrics, notices };
        let start = context.prepare(&transform).await?;
        context.declare().await?;
        let mut core = Core::new(
            transform,
            context.names.clone(),
            context.config.outputs.clone(),
            context.config.state_hash_every,
            context.config.snapshot_every,
            start.state,
            start.progress,
        );
        context.publish_progress(core.progress());
        context.notice(&Notice::Started {
            inputs_applied: core.progress().inputs_applied,
            next_position: core.progress().next_position,
            from_snapshot: start.from_snapshot,
        });
        let (jobs, queue) = mpsc::channel(1);
        let writer = tokio::spawn(record_snapshots(
            context.client.clone(),
            context.names.clone(),
            queue,
            Arc::clone(&context.metrics),
            Arc::clone(&context.notices),
        ));
        let result = context.feed(&mut core, &jobs, shutdown, stop_when_caught_up).await;
        drop(jobs);
        if tokio::time::timeout(SNAPSHOT_DRAIN, writer).await.is_err() {
            context.notice(&Notice::SnapshotFailed {
                inputs_applied: core.progress().inputs_applied,
                reason: format!("still being written after {} s at the end of the run", SNAPSHOT_DRAIN.as_secs()),
            });
        }
        result.map(|()| context.metrics.snapshot())
    }
}

/// The checks that need no node.
fn check_config(config: &TransformConfig) -> Result<(), TransformError> {
    let invalid = |message: String| Err(TransformError::InvalidConfig(message));
    let control = ControlNames::all_control_streams();
    for (what, pattern) in [("input", &config.inputs), ("output", &config.outputs)] {
        if pattern.as_str().starts_with('$') {
            return invalid(format!("{what} pattern {pattern} names system streams"));
        }
        if patterns_overlap(pattern, &control) {
            return invalid(format!(
                "{what} pattern {pattern} overlaps {control}, the transforms' own control streams; narrow it"
            ));
        }
    }
    if patterns_overlap(&config.inputs, &config.outputs) {
        return invalid(format!(
            "input pattern {} overlaps output pattern {}: the transform would read its own outputs",
            config.inputs, config.outputs
        ));
    }
    if config.state_hash_every == 0 {
        return invalid("state_hash_every must be at least 1".to_owned());
    }
    if !config.snapshot_every.is_multiple_of(config.state_hash_every) {
        return invalid(format!(
            "snapshot_every ({}) must be 0 or a multiple of state_hash_every ({}): snapshots are taken where the \
             state hash agreed",
            config.snapshot_every, config.state_hash_every
        ));
    }
    Ok(())
}

/// Whether `error` may pass by itself: a lost connection or a node that is
/// busy, stopping or out of a resource.
fn transient(error: &ClientError) -> bool {
    match error {
        ClientError::Rpc { .. } | ClientError::Connect { .. } => true,
        _ => matches!(
            error.error_code(),
            Some(v1::ErrorCode::Busy | v1::ErrorCode::Unavailable | v1::ErrorCode::ResourceExhausted)
        ),
    }
}

/// Exponential backoff over transient failures, given up when they last
/// [`RETRY_BUDGET`] without progress.
struct Backoff {
    failing_since: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { failing_since: None, delay: RETRY_DELAY_FIRST }
    }

    fn progressed(&mut self) {
        *self = Self::new();
    }

    /// The wait before trying again, or `None` once the budget is spent.
    fn next_delay(&mut self) -> Option<Duration> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= RETRY_BUDGET {
            return None;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(RETRY_DELAY_MAX);
        Some(delay)
    }
}

impl Context {
    fn notice(&self, notice: &Notice) {
        (self.notices)(notice);
    }

    fn publish_progress(&self, progress: &Progress) {
        self.metrics.inputs_applied.store(progress.inputs_applied, Ordering::Relaxed);
        self.metrics.next_position.store(progress.next_position, Ordering::Relaxed);
    }

    /// Runs `call` until it succeeds, fails for good, or transient failures
    /// outlast the budget.
    async fn retrying<R, Fut>(&self, what: &str, call: impl Fn() -> Fut) -> Result<R, TransformError>
    where
        Fut: Future<Output = Result<R, ClientError>>,
    {
        let mut backoff = Backoff::new();
        loop {
            match call().await {
                Ok(result) => return Ok(result),
                Err(error) if transient(&error) => {
                    let message = error.to_string();
                    let Some(delay) = backoff.next_delay() else { return Err(error.into()) };
                    self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                    self.notice(&Notice::Retrying {
                        what: what.to_owned(),
                        error: message,
                        delay_ms: delay.as_millis() as u64,
                    });
                    tokio::time::sleep(delay).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// The first event of `stream`, if it has one.
    async fn first_event(&self, stream: &StreamName) -> Result<Option<RecordedEvent>, TransformError> {
        self.read_one(stream, StreamFrom::Start).await
    }

    /// The event at version `index` of `stream`.
    async fn event_at(&self, stream: &StreamName, index: u64) -> Result<Option<RecordedEvent>, TransformError> {
        let event = self.read_one(stream, StreamFrom::Version(index)).await?;
        Ok(event.filter(|event| event.version == index))
    }

    /// The first event of `stream` from `from`; `None` if there is none or
    /// the stream has no events.
    async fn read_one(&self, stream: &StreamName, from: StreamFrom) -> Result<Option<RecordedEvent>, TransformError> {
        let read = self.retrying("read", || self.client.read_stream(stream.clone(), from, Direction::Forward, 1)).await;
        match read {
            Ok(events) => Ok(events.into_iter().next()),
            Err(TransformError::Client(error)) if error.error_code() == Some(v1::ErrorCode::StreamNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Up to `max` streams with events that match `pattern`, in name order,
    /// listing at most [`CHECK_STREAMS_MAX`] names.
    async fn matching_streams(&self, pattern: &StreamPattern, max: usize) -> Result<Vec<StreamInfo>, TransformError> {
        let has_events = |info: &StreamInfo| info.current_version.is_some() && !info.tombstoned;
        if pattern.is_literal() {
            let stream = StreamName::new(pattern.as_str()).map_err(|e| TransformError::InvalidConfig(e.to_string()))?;
            let info = self.retrying("stream info", || self.client.stream_info(stream.clone())).await?;
            return Ok(info.filter(has_events).into_iter().collect());
        }
        // Every matching name starts with the literal prefix and a dot; only
        // '-' sorts below '.', so names from the prefix on that are below
        // "prefix." are skipped, and the first one above that does not start
        // with it ends the scan.
        let prefix = pattern.literal_prefix();
        let needle = if prefix.is_empty() { String::new() } else { format!("{prefix}.") };
        let mut after = (!prefix.is_empty()).then(|| prefix.to_owned());
        let (mut found, mut listed) = (Vec::new(), 0);
        loop {
            let page = self
                .retrying("list streams", || self.client.list_streams(after.clone(), LIST_PAGE_STREAMS, false))
                .await?;
            for info in &page {
                let name = info.stream.as_str();
                if name < needle.as_str() {
                    continue;
                }
                if !name.starts_with(&needle) {
                    return Ok(found);
                }
                if pattern.matches(&info.stream) && has_events(info) {
                    found.push(info.clone());
                    if found.len() >= max {
                        return Ok(found);
                    }
                }
            }
            listed += page.len();
            match page.last() {
                Some(last) if page.len() == LIST_PAGE_STREAMS && listed < CHECK_STREAMS_MAX => {
                    after = Some(last.stream.as_str().to_owned());
                }
                _ => return Ok(found),
            }
        }
    }

    /// Reads the node and decides where to start; writes nothing.
    async fn prepare<T: Transform>(&self, transform: &T) -> Result<Start<T::State>, TransformError> {
        let config = &self.config;
        let name = &self.names.name;
        // Our own declaration, if any, must be this one.
        if let Some(spec) = self.first_event(&self.names.spec).await? {
            let (declared_inputs, declared_outputs) =
                parse_spec(&spec.data).unwrap_or_else(|| ("(unreadable)".to_owned(), "(unreadable)".to_owned()));
            if declared_inputs != config.inputs.as_str() || declared_outputs != config.outputs.as_str() {
                return Err(TransformError::SpecMismatch {
                    name: name.clone(),
                    declared_inputs,
                    declared_outputs,
                    inputs: config.inputs.clone(),
                    outputs: config.outputs.clone(),
                });
            }
        }
        // No other transform may own streams our outputs could name.
        let declarations = StreamPattern::new("transform.*.spec").expect("a valid pattern");
        for info in self.matching_streams(&declarations, CHECK_STREAMS_MAX).await? {
            let Some(other) = info.stream.as_str().strip_prefix("transform.").and_then(|s| s.strip_suffix(".spec"))
            else {
                continue;
            };
            if other == name {
                continue;
            }
            let Some((_, theirs)) = self.first_event(&info.stream).await?.and_then(|e| parse_spec(&e.data)) else {
                continue;
            };
            let overlaps = StreamPattern::new(&theirs).is_ok_and(|theirs| patterns_overlap(&theirs, &config.outputs));
            if overlaps {
                return Err(TransformError::OutputsOwned {
                    ours: config.outputs.clone(),
                    other: other.to_owned(),
                    theirs,
                });
            }
        }
        // Existing output streams must hold only our events (their first
        // one tells: a stream is written by one transform from its start).
        for info in self.matching_streams(&config.outputs, CHECK_STREAMS_MAX).await? {
            let Some(first) = self.first_event(&info.stream).await? else { continue };
            let owner = metadata_transform(&first.metadata);
            if owner.as_deref() != Some(name.as_str()) {
                return Err(TransformError::OutputStreamOwned {
                    stream: info.stream.clone(),
                    version: first.version,
                    owner: owner
                        .map_or_else(|| "a producer that is no transform".to_owned(), |o| format!("transform {o}")),
                    name: name.clone(),
                });
            }
        }
        if config.require_inputs && self.matching_streams(&config.inputs, 1).await?.is_empty() {
            return Err(TransformError::InputMatchesNothing { pattern: config.inputs.clone() });
        }
        if !config.use_snapshots {
            return Ok(Start { progress: Progress::default(), state: transform.initial_state(), from_snapshot: false });
        }
        let snapshot = self
            .retrying("read snapshot", || {
                self.client.read_snapshot(&self.names.snapshot_source, self.names.spec.clone(), None)
            })
            .await?;
        let Some(snapshot) = snapshot else {
            return Ok(Start { progress: Progress::default(), state: transform.initial_state(), from_snapshot: false });
        };
        let corrupt =
            |reason: String| TransformError::CorruptSnapshot { name: name.clone(), version: snapshot.version, reason };
        let decoded = decode_snapshot(&snapshot.state).map_err(corrupt)?;
        if decoded.state_version != T::STATE_VERSION {
            return Err(TransformError::IncompatibleSnapshot {
                name: name.clone(),
                inputs_applied: decoded.progress.inputs_applied,
                found: decoded.state_version,
                expected: T::STATE_VERSION,
            });
        }
        if decoded.progress.inputs_applied != snapshot.version {
            return Err(corrupt(format!("it holds {} inputs applied", decoded.progress.inputs_applied)));
        }
        let state =
            transform.decode_state(&decoded.state).map_err(|e| corrupt(format!("the state does not decode: {e}")))?;
        // The snapshot must not be ahead of the outputs, or resuming would
        // leave a gap where they were.
        for (stream, &expected) in &decoded.progress.output_counts {
            let info = self.retrying("stream info", || self.client.stream_info(stream.clone())).await?;
            let found = info.and_then(|i| i.current_version).map_or(0, |v| v + 1);
            if found < expected {
                return Err(TransformError::SnapshotAheadOfOutputs {
                    name: name.clone(),
                    inputs_applied: decoded.progress.inputs_applied,
                    stream: stream.clone(),
                    expected,
                    found,
                });
            }
        }
        Ok(Start { progress: decoded.progress, state, from_snapshot: true })
    }

    /// Writes the declaration at version 0 of `transform.NAME.spec`, the
    /// first write of a run; instances that race on it agree.
    async fn declare(&self) -> Result<(), TransformError> {
        let config = &self.config;
        let name = &self.names.name;
        let event = NewEvent {
            id: derived_id(name, &self.names.spec, 0),
            event_type: EventType::new(SPEC_TYPE).expect("a valid type"),
            data: spec_data(name, &config.inputs, &config.outputs),
            metadata: format!("{{\"transform\":\"{name}\"}}").into_bytes(),
            timestamp_ms: 0,
        };
        let outcome =
            self.retrying("declare", || self.client.exists_or_write(self.names.spec.clone(), 0, event.clone())).await?;
        if let ExistsOrWrite::Exists { same: false, .. } = outcome {
            let declared = self.first_event(&self.names.spec).await?.and_then(|e| parse_spec(&e.data));
            let (declared_inputs, declared_outputs) =
                declared.unwrap_or_else(|| ("(unreadable)".to_owned(), "(unreadable)".to_owned()));
            return Err(TransformError::SpecMismatch {
                name: name.clone(),
                declared_inputs,
                declared_outputs,
                inputs: config.inputs.clone(),
                outputs: config.outputs.clone(),
            });
        }
        Ok(())
    }

    /// Subscribes to the inputs and applies them until shutdown, caught up
    /// (if asked) or an error.
    async fn feed<T: Transform>(
        &self,
        core: &mut Core<T>,
        jobs: &mpsc::Sender<SnapshotJob>,
        shutdown: impl Future<Output = ()>,
        stop_when_caught_up: bool,
    ) -> Result<(), TransformError> {
        let shutdown = std::pin::pin!(shutdown);
        let mut shutdown = shutdown;
        let mut backoff = Backoff::new();
        let filter = SubscriptionFilter {
            streams: StreamSelector::Pattern(self.config.inputs.clone()),
            event_types: Vec::new(),
            predicate: None,
            include_system: false,
        };
        loop {
            let next = core.progress().next_position;
            let from = if next == 0 { SubscribeFrom::Beginning } else { SubscribeFrom::Position(next) };
            let opened = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                opened = self.client.subscribe(filter.clone(), from, Credit::default()) => opened,
            };
            let failure = match opened {
                Ok(mut subscription) => loop {
                    let item = tokio::select! {
                        biased;
                        () = &mut shutdown => return Ok(()),
                        item = subscription.next() => item,
                    };
                    match item {
                        Some(Ok(SubscriptionItem::Event(event))) => {
                            backoff.progressed();
                            if let Some(step) = core.apply(&event)? {
                                self.write_step(step, jobs).await?;
                                self.publish_progress(core.progress());
                            }
                        }
                        Some(Ok(SubscriptionItem::CaughtUp { position })) => {
                            self.metrics.caught_up.store(true, Ordering::Relaxed);
                            let inputs_applied = core.progress().inputs_applied;
                            self.notice(&Notice::CaughtUp { position, inputs_applied });
                            if stop_when_caught_up {
                                return Ok(());
                            }
                        }
                        Some(Ok(SubscriptionItem::Checkpoint { .. })) => {}
                        Some(Err(error)) => break error,
                        None => {
                            break ClientError::Rpc {
                                addr: self.client.addr().to_owned(),
                                status: Box::new(tonic::Status::unavailable("the node ended the subscription")),
                            };
                        }
                    }
                },
                Err(error) => error,
            };
            if !transient(&failure) {
                return Err(failure.into());
            }
            let message = failure.to_string();
            let Some(delay) = backoff.next_delay() else { return Err(failure.into()) };
            self.metrics.retries.fetch_add(1, Ordering::Relaxed);
            self.notice(&Notice::Retrying {
                what: "subscribe".to_owned(),
                error: message,
                delay_ms: delay.as_millis() as u64,
            });
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Writes one input's outputs, then its state hash; queues the snapshot
    /// if the hash agreed with the log.
    async fn write_step(&self, step: Step, jobs: &mpsc::Sender<SnapshotJob>) -> Result<(), TransformError> {
        let metrics = &self.metrics;
        for planned in &step.outputs {
            match self.write(planned).await? {
                ExistsOrWrite::Written { .. } => TransformMetrics::add(&metrics.outputs_written, 1),
                ExistsOrWrite::Exists { same: true, .. } => TransformMetrics::add(&metrics.outputs_existing, 1),
                ExistsOrWrite::Exists { same: false, position } => {
                    return Err(self.divergence(&step.input, planned, position).await);
                }
            }
        }
        let Some(check) = step.state_check else { return Ok(()) };
        let agreed = match self.write(&check.planned).await? {
            ExistsOrWrite::Written { .. } => {
                TransformMetrics::add(&metrics.state_hashes_written, 1);
                true
            }
            ExistsOrWrite::Exists { same: true, .. } => {
                TransformMetrics::add(&metrics.state_hashes_matched, 1);
                true
            }
            ExistsOrWrite::Exists { same: false, position } => {
                TransformMetrics::add(&metrics.state_hash_mismatches, 1);
                let theirs = self
                    .event_at(&check.planned.stream, check.planned.index)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|event| parse_state_hash(&event.data));
                self.notice(&Notice::StateHashMismatch {
                    inputs_applied: check.inputs_applied,
                    input: step.input.to_string(),
                    ours: check.state_hash,
                    theirs,
                    position,
                });
                false
            }
        };
        if let (true, Some(bytes)) = (agreed, check.snapshot) {
            let inputs_applied = check.inputs_applied;
            if bytes.len() > SNAPSHOT_BYTES_MAX {
                TransformMetrics::add(&metrics.snapshot_failures, 1);
                self.notice(&Notice::SnapshotFailed {
                    inputs_applied,
                    reason: format!("{} bytes, more than the maximum of {SNAPSHOT_BYTES_MAX}", bytes.len()),
                });
            } else if jobs.try_send(SnapshotJob { inputs_applied, bytes }).is_err() {
                // The previous snapshot is still being written: a later one follows.
                TransformMetrics::add(&metrics.snapshots_skipped, 1);
            }
        }
        Ok(())
    }

    async fn write(&self, planned: &Planned) -> Result<ExistsOrWrite, TransformError> {
        self.retrying("exists_or_write", || {
            self.client.exists_or_write(planned.stream.clone(), planned.index, planned.event.clone())
        })
        .await
    }

    /// The error for an output answered `Exists{same: false}`: a foreign
    /// event (another producer's) or a divergence of ours.
    async fn divergence(&self, input: &InputRef, planned: &Planned, position: u64) -> TransformError {
        let existing = match self.event_at(&planned.stream, planned.index).await {
            Ok(existing) => existing,
            Err(error) => return error,
        };
        let Some(existing) = existing else {
            return TransformError::BadOutput {
                input: input.to_string(),
                reason: format!(
                    "{}@{} differs from the event at position {position}, which can no longer be read",
                    planned.stream, planned.index
                ),
            };
        };
        let owner = metadata_transform(&existing.metadata);
        if owner.as_deref() != Some(self.names.name.as_str()) {
            return TransformError::OutputStreamOwned {
                stream: planned.stream.clone(),
                version: planned.index,
                owner: owner.map_or_else(|| "a producer that is no transform".to_owned(), |o| format!("transform {o}")),
                name: self.names.name.clone(),
            };
        }
        TransformError::Diverged(Box::new(Divergence {
            name: self.names.name.clone(),
            input: input.clone(),
            stream: planned.stream.clone(),
            index: planned.index,
            ours: planned.event.content_hash(),
            theirs: existing.content_hash(),
            existing_position: position,
        }))
    }
}

/// The snapshot task: records each queued snapshot unless one at least as
/// recent is already there (another instance recorded it). Failures are
/// counted and reported, never fatal: the next snapshot may succeed, and
/// without any the instance replays from the start.
async fn record_snapshots(
    client: Client,
    names: ControlNames,
    mut jobs: mpsc::Receiver<SnapshotJob>,
    metrics: Arc<TransformMetrics>,
    notices: Arc<dyn Fn(&Notice) + Send + Sync>,
) {
    while let Some(SnapshotJob { inputs_applied, bytes }) = jobs.recv().await {
        let latest = client.read_snapshot(&names.snapshot_source, names.spec.clone(), None).await;
        if let Ok(Some(latest)) = &latest
            && latest.version >= inputs_applied
        {
            TransformMetrics::add(&metrics.snapshots_skipped, 1);
            continue;
        }
        let size = bytes.len();
        match client.record_snapshot(&names.snapshot_source, names.spec.clone(), inputs_applied, bytes).await {
            Ok(position) => {
                TransformMetrics::add(&metrics.snapshots_recorded, 1);
                notices(&Notice::SnapshotRecorded { inputs_applied, bytes: size, position });
            }
            Err(error) => {
                TransformMetrics::add(&metrics.snapshot_failures, 1);
                notices(&Notice::SnapshotFailed { inputs_applied, reason: error.to_string() });
            }
        }
    }
}
