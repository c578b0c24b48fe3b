//! Racing deterministic transformers (DESIGN §1, third bullet): several
//! identical instances of a [`Transform`] read the same inputs in the same
//! order and race to write the same outputs with `exists_or_write`; the log
//! keeps the first write of each output and tells the others
//! `Exists{same: true}`, so the crash or the pause of one instance costs
//! nothing while another keeps going.
//!
//! The user writes the [`Transform`]: an initial state, `apply(state,
//! input) -> outputs`, and the state's encoding. A [`TransformRunner`] does
//! the rest:
//!
//! - **Before anything is written** it checks the configuration and the
//!   node ([`TransformRunner::run`] lists the checks): a refusal is a
//!   [`TransformError`] that names the problem, and the node is unchanged.
//! - **Outputs** are written with `exists_or_write(stream, index, event)`,
//!   where `index` is the number of outputs the transform has produced in
//!   that stream before this one, and the event is the same in every
//!   instance: its id derives from the transform's name, the stream and the
//!   index, its metadata names the transform and the input
//!   (`{"transform":"NAME","input":"STREAM@VERSION"}`), its time is the
//!   input's. See [`logic`] for the resume rule.
//! - **Divergence**: an output answered `Exists{same: false}` stops the
//!   instance with [`TransformError::Diverged`] (input position, output
//!   stream and index, both content hashes). Every `state_hash_every`
//!   inputs, instances write a hash of their encoded state to
//!   `transform.NAME.statehash` with `exists_or_write` too; a different hash
//!   already there is a [`Notice::StateHashMismatch`] and counts in
//!   [`TransformMetrics::state_hash_mismatches`].
//! - **Snapshots** every `snapshot_every` inputs: the state is encoded
//!   between two inputs and handed to a background task that records it
//!   with the store's snapshot API (`source` `transform.NAME`, stream
//!   `transform.NAME.spec`, version = inputs applied), so the transform does
//!   not wait for the write. A snapshot is taken only where this instance's
//!   state hash agreed with the log's, so an instance that diverged never
//!   records one. On start, the runner resumes from the latest snapshot.
//!
//! What a transform must not do, for the instances to agree: read a clock,
//! a random number, the network or the environment; iterate a `HashMap`;
//! depend on float rounding that differs between builds; depend on an
//! input's log position if its outputs must be equal on every site (the
//! stream and version are the same everywhere).

pub mod logic;
mod runner;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use edgebus_types::{EventType, RecordedEvent, StreamName, StreamPattern};

pub use runner::TransformRunner;

use crate::ClientError;

/// Inputs between two state hashes unless configured.
pub const STATE_HASH_EVERY_DEFAULT: u64 = 100;

/// Inputs between two snapshots unless configured (a multiple of the state
/// hash period).
pub const SNAPSHOT_EVERY_DEFAULT: u64 = 1000;

const _: () = assert!(SNAPSHOT_EVERY_DEFAULT.is_multiple_of(STATE_HASH_EVERY_DEFAULT));

/// A deterministic transform: the same inputs in the same order must give
/// the same outputs and the same encoded state, in every process.
pub trait Transform: Send + 'static {
    /// What the transform remembers between inputs.
    type State: Send + 'static;

    /// The version of [`Transform::encode_state`]'s format. A runner refuses
    /// a snapshot written under another version (see
    /// [`TransformError::IncompatibleSnapshot`]); change it whenever the
    /// encoding changes.
    const STATE_VERSION: u32;

    /// The state before the first input.
    fn initial_state(&self) -> Self::State;

    /// Applies one input to the state and returns the outputs, in order.
    fn apply(&self, state: &mut Self::State, input: &RecordedEvent) -> Vec<Output>;

    /// The state as bytes: for snapshots, and hashed for the state hashes,
    /// so equal states must encode to equal bytes.
    fn encode_state(&self, state: &Self::State) -> Vec<u8>;

    /// Reads [`Transform::encode_state`]'s bytes back.
    fn decode_state(&self, bytes: &[u8]) -> Result<Self::State, String>;
}

/// One output event of a transform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Where it goes; must match the runner's output pattern.
    pub stream: StreamName,
    /// Its type.
    pub event_type: EventType,
    /// Its payload.
    pub data: Vec<u8>,
}

impl Output {
    /// An output of type `event_type`, which must be a valid event type (a
    /// constant in the transform's code; an invalid one is a bug).
    pub fn new(stream: StreamName, event_type: &str, data: Vec<u8>) -> Self {
        let event_type = EventType::new(event_type).unwrap_or_else(|e| panic!("output type {event_type:?}: {e}"));
        Self { stream, event_type, data }
    }
}

/// What a runner runs and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformConfig {
    /// The transform's name on the node: one token (letters, digits,
    /// `_ - : @`). Instances of one transform share it; it names the
    /// control streams `transform.NAME.spec` and `transform.NAME.statehash`.
    pub name: String,
    /// The inputs: every event of the streams matching it, in log order.
    pub inputs: StreamPattern,
    /// Where outputs go; every output stream must match it, and no other
    /// transform's output pattern may overlap it.
    pub outputs: StreamPattern,
    /// Inputs between two state hashes (at least 1).
    pub state_hash_every: u64,
    /// Inputs between two snapshots: 0 for none, else a multiple of
    /// `state_hash_every`.
    pub snapshot_every: u64,
    /// Resume from the latest snapshot (true), or replay every input from
    /// the first (false: after a change of the state's encoding, or to
    /// check a snapshot).
    pub use_snapshots: bool,
    /// Refuse to start when no stream on the node matches `inputs` (true),
    /// since that is usually a mistyped pattern; false waits for them.
    pub require_inputs: bool,
}

impl TransformConfig {
    /// A configuration with the default periods, snapshots on, and inputs
    /// required to exist.
    pub fn new(name: &str, inputs: StreamPattern, outputs: StreamPattern) -> Self {
        Self {
            name: name.to_owned(),
            inputs,
            outputs,
            state_hash_every: STATE_HASH_EVERY_DEFAULT,
            snapshot_every: SNAPSHOT_EVERY_DEFAULT,
            use_snapshots: true,
            require_inputs: true,
        }
    }
}

/// Why a runner refused to start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransformError {
    /// The configuration is not usable; nothing was written.
    #[error("invalid transform configuration: {0}")]
    InvalidConfig(String),
    /// No stream on the node matches the input pattern; nothing was written.
    #[error(
        "input pattern {pattern} matches no stream on the node (a mistyped pattern? publish the first input before \
         starting, or allow starting without inputs)"
    )]
    InputMatchesNothing {
        /// The input pattern.
        pattern: StreamPattern,
    },
    /// Another transform declared outputs that overlap ours; nothing was written.
    #[error("output pattern {ours} overlaps the outputs {theirs} of transform {other}, which owns those streams")]
    OutputsOwned {
        /// Our output pattern.
        ours: StreamPattern,
        /// The other transform.
        other: String,
        /// Its output pattern.
        theirs: String,
    },
    /// A stream matching our output pattern holds an event that this
    /// transform did not write; nothing was written (or, found while
    /// running, the instance stops).
    #[error(
        "output stream {stream} is owned by {owner}, not by transform {name}: its event {version} was written by it"
    )]
    OutputStreamOwned {
        /// The stream.
        stream: StreamName,
        /// The version of the foreign event.
        version: u64,
        /// Who wrote it: `transform OTHER`, or `a producer that is no transform`.
        owner: String,
        /// Our name.
        name: String,
    },
    /// The transform was declared on the node with other inputs or
    /// outputs; nothing was written.
    #[error(
        "transform {name} is declared on the node with inputs {declared_inputs} and outputs {declared_outputs} \
         (transform.{name}.spec), not inputs {inputs} and outputs {outputs}; run it under another name"
    )]
    SpecMismatch {
        /// The transform.
        name: String,
        /// Its declared inputs.
        declared_inputs: String,
        /// Its declared outputs.
        declared_outputs: String,
        /// This run's inputs.
        inputs: StreamPattern,
        /// This run's outputs.
        outputs: StreamPattern,
    },
    /// The latest snapshot was written by another version of the state's
    /// encoding; nothing was written.
    #[error(
        "the latest snapshot of transform {name} (after {inputs_applied} inputs) holds state version {found}, but \
         this transform reads state version {expected}; replay from the first input without snapshots, or delete \
         the snapshots of source transform.{name}"
    )]
    IncompatibleSnapshot {
        /// The transform.
        name: String,
        /// Inputs applied at the snapshot.
        inputs_applied: u64,
        /// The snapshot's state version.
        found: u32,
        /// This transform's [`Transform::STATE_VERSION`].
        expected: u32,
    },
    /// The latest snapshot cannot be read; nothing was written.
    #[error("the latest snapshot of transform {name} (version {version}) cannot be read: {reason}")]
    CorruptSnapshot {
        /// The transform.
        name: String,
        /// The snapshot's version (inputs applied).
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// The latest snapshot counts more outputs in a stream than the stream
    /// holds: the outputs were deleted or truncated, and resuming would
    /// leave a gap; nothing was written.
    #[error(
        "the latest snapshot of transform {name} (after {inputs_applied} inputs) counts {expected} events in \
         {stream}, which holds {found}; the outputs were deleted: replay from the first input without snapshots"
    )]
    SnapshotAheadOfOutputs {
        /// The transform.
        name: String,
        /// Inputs applied at the snapshot.
        inputs_applied: u64,
        /// The output stream.
        stream: StreamName,
        /// Events the snapshot counts in it.
        expected: u64,
        /// Events it holds.
        found: u64,
    },
    /// An output differs from the one already in the log at its index: the
    /// transform is not deterministic (or instances run different code).
    #[error("{0}")]
    Diverged(Box<Divergence>),
    /// The transform produced an output the runner cannot write (outside
    /// the output pattern, too large, too many); nothing of it was written.
    #[error("transform output for input {input} refused: {reason}")]
    BadOutput {
        /// The input.
        input: String,
        /// Why.
        reason: String,
    },
    /// The node refused a call or could not be reached (after the retries).
    #[error(transparent)]
    Client(Box<ClientError>),
}

impl From<ClientError> for TransformError {
    fn from(error: ClientError) -> Self {
        Self::Client(Box::new(error))
    }
}

/// The details of a divergence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The transform.
    pub name: String,
    /// The input that produced the output.
    pub input: logic::InputRef,
    /// The output stream.
    pub stream: StreamName,
    /// The output's index (its version in the stream).
    pub index: u64,
    /// The content hash of this instance's output.
    pub ours: u64,
    /// The content hash of the event in the log at that index.
    pub theirs: u64,
    /// The position of the event in the log.
    pub existing_position: u64,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "transform {} diverged: input {} gave output {} index {} with content hash {:016x}, but the log holds \
             content hash {:016x} there (position {}); this instance is not deterministic and stops",
            self.name, self.input, self.stream, self.index, self.ours, self.theirs, self.existing_position
        )
    }
}

/// Something a runner reports while it runs, for a log line: a runner never
/// prints; [`TransformRunner::on_notice`] decides where notices go (by
/// default, stderr). `Display` is the line, lowercase with `key=value`
/// fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The runner checked the node and starts reading inputs.
    Started {
        /// Inputs already applied (from the snapshot; 0 without one).
        inputs_applied: u64,
        /// The first log position it reads.
        next_position: u64,
        /// Whether it resumed from a snapshot.
        from_snapshot: bool,
    },
    /// Every input written before the subscription started is applied.
    CaughtUp {
        /// The subscription's position.
        position: u64,
        /// Inputs applied.
        inputs_applied: u64,
    },
    /// Another instance wrote a different state hash after the same inputs.
    StateHashMismatch {
        /// Inputs applied.
        inputs_applied: u64,
        /// The input after which the hashes were taken.
        input: String,
        /// This instance's hash.
        ours: u64,
        /// The hash in the log, if it could be read.
        theirs: Option<u64>,
        /// The position of the hash in the log.
        position: u64,
    },
    /// A snapshot was recorded.
    SnapshotRecorded {
        /// Its version: inputs applied.
        inputs_applied: u64,
        /// Its size.
        bytes: usize,
        /// Its log position.
        position: u64,
    },
    /// A snapshot was not recorded.
    SnapshotFailed {
        /// Its version: inputs applied.
        inputs_applied: u64,
        /// Why.
        reason: String,
    },
    /// A call failed for a reason that may pass (the node restarting, a
    /// lost connection); the runner tries again.
    Retrying {
        /// What failed.
        what: String,
        /// The error.
        error: String,
        /// The wait before the next attempt.
        delay_ms: u64,
    },
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Started { inputs_applied, next_position, from_snapshot } => write!(
                f,
                "started inputs_applied={inputs_applied} next_position={next_position} from_snapshot={from_snapshot}"
            ),
            Self::CaughtUp { position, inputs_applied } => {
                write!(f, "caught up position={position} inputs_applied={inputs_applied}")
            }
            Self::StateHashMismatch { inputs_applied, input, ours, theirs, position } => {
                let theirs = theirs.map_or_else(|| "unreadable".to_owned(), |h| format!("{h:016x}"));
                write!(
                    f,
                    "state hash mismatch: instances disagree on the state inputs_applied={inputs_applied} \
                     input={input} ours={ours:016x} theirs={theirs} position={position}"
                )
            }
            Self::SnapshotRecorded { inputs_applied, bytes, position } => {
                write!(f, "snapshot recorded inputs_applied={inputs_applied} bytes={bytes} position={position}")
            }
            Self::SnapshotFailed { inputs_applied, reason } => {
                write!(f, "snapshot not recorded inputs_applied={inputs_applied} reason={reason:?}")
            }
            Self::Retrying { what, error, delay_ms } => {
                write!(f, "retrying what={what:?} delay_ms={delay_ms} error={error:?}")
            }
        }
    }
}

/// A runner's counters, updated as it runs; shared with whoever holds the
/// `Arc` ([`TransformRunner::metrics`]).
#[derive(Debug, Default)]
pub struct TransformMetrics {
    /// Inputs applied (including those applied before a snapshot it resumed from).
    pub inputs_applied: AtomicU64,
    /// The first log position after the last input applied.
    pub next_position: AtomicU64,
    /// Outputs this instance wrote first.
    pub outputs_written: AtomicU64,
    /// Outputs another instance had already written identically (races lost).
    pub outputs_existing: AtomicU64,
    /// State hashes this instance wrote first.
    pub state_hashes_written: AtomicU64,
    /// State hashes another instance had already written identically.
    pub state_hashes_matched: AtomicU64,
    /// State hashes that differed from the one in the log.
    pub state_hash_mismatches: AtomicU64,
    /// Snapshots recorded by this instance.
    pub snapshots_recorded: AtomicU64,
    /// Snapshots not recorded because another instance had recorded them
    /// (or a later one), or because the previous one was still being written.
    pub snapshots_skipped: AtomicU64,
    /// Snapshots that failed (too large, refused by the node).
    pub snapshot_failures: AtomicU64,
    /// Calls and subscriptions tried again after a transient failure.
    pub retries: AtomicU64,
    /// Whether the runner has caught up with the inputs once.
    pub caught_up: AtomicBool,
}

/// A copy of [`TransformMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct MetricsSnapshot {
    pub inputs_applied: u64,
    pub next_position: u64,
    pub outputs_written: u64,
    pub outputs_existing: u64,
    pub state_hashes_written: u64,
    pub state_hashes_matched: u64,
    pub state_hash_mismatches: u64,
    pub snapshots_recorded: u64,
    pub snapshots_skipped: u64,
    pub snapshot_failures: u64,
    pub retries: u64,
    pub caught_up: bool,
}

impl TransformMetrics {
    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            inputs_applied: get(&self.inputs_applied),
            next_position: get(&self.next_position),
            outputs_written: get(&self.outputs_written),
            outputs_existing: get(&self.outputs_existing),
            state_hashes_written: get(&self.state_hashes_written),
            state_hashes_matched: get(&self.state_hashes_matched),
            state_hash_mismatches: get(&self.state_hash_mismatches),
            snapshots_recorded: get(&self.snapshots_recorded),
            snapshots_skipped: get(&self.snapshots_skipped),
            snapshot_failures: get(&self.snapshot_failures),
            retries: get(&self.retries),
            caught_up: self.caught_up.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl MetricsSnapshot {
    /// The counters in the Prometheus text format, labelled with the
    /// transform's name and the instance.
    pub fn render_prometheus(&self, name: &str, instance: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let labels = format!("transform=\"{name}\",instance=\"{instance}\"");
        for (metric, kind, value, help) in [
            ("inputs_applied", "counter", self.inputs_applied, "inputs applied"),
            ("outputs_written_total", "counter", self.outputs_written, "outputs this instance wrote first"),
            ("outputs_existing_total", "counter", self.outputs_existing, "outputs another instance wrote first"),
            ("state_hash_mismatches_total", "counter", self.state_hash_mismatches, "state hashes that differed"),
            ("snapshots_recorded_total", "counter", self.snapshots_recorded, "snapshots recorded"),
            ("caught_up", "gauge", u64::from(self.caught_up), "1 once caught up with the inputs"),
        ] {
            let _ = writeln!(out, "# HELP edgebus_transform_{metric} {help}");
            let _ = writeln!(out, "# TYPE edgebus_transform_{metric} {kind}");
            let _ = writeln!(out, "edgebus_transform_{metric}{{{labels}}} {value}");
        }
        out
    }
}

impl std::fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "inputs={} position={} written={} lost_races={} state_hashes={}+{} mismatches={} snapshots={} retries={}",
            self.inputs_applied,
            self.next_position,
            self.outputs_written,
            self.outputs_existing,
            self.state_hashes_written,
            self.state_hashes_matched,
            self.state_hash_mismatches,
            self.snapshots_recorded,
            self.retries
        )
    }
}
