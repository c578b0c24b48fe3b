//! The runner's logic without I/O: the user's state plus the runner's
//! progress, what each input makes the instance write (outputs with their
//! indexes, ids and metadata; a state hash at the configured inputs), and the
//! snapshot bytes. The same inputs in the same order give the same writes,
//! byte for byte, in every instance: that is what lets instances race.
//!
//! # Progress and the resume rule
//!
//! After `k` inputs (the events matching the input pattern, in log order)
//! the runner holds the state `S_k`, the number of outputs it has produced
//! in each output stream `C_k[s]`, and the first log position after the
//! `k`-th input. The `j`-th output of stream `s` is written with
//! `exists_or_write(s, j, event)`, so output indexes are the output count
//! before the output, and every instance computes the same event for the
//! same `(s, j)`.
//!
//! A snapshot taken after input `k` stores `(S_k, C_k, position, k)`, and
//! is only taken once every output of inputs `1..=k` is in the log. An
//! instance that starts from it subscribes from that position with `C_k` as
//! its counts: the outputs of inputs after `k` get the indexes they got the
//! first time, so those already written come back as `Exists{same: true}`
//! (nothing is written twice) and the first one missing is written at
//! exactly the stream's end (no gap). Without a snapshot it starts from the
//! first input with the initial state, which is the same rule with `k = 0`.

use std::collections::BTreeMap;

use edgebus_types::limits::EVENT_DATA_BYTES_MAX;
use edgebus_types::{EventId, EventType, NewEvent, RecordedEvent, StreamName, StreamPattern, content_hash};

use super::{Output, Transform, TransformError};

/// Outputs one input may produce; more is a bug in the transform.
pub const OUTPUTS_PER_INPUT_MAX: usize = 4096;

/// Largest snapshot (header and state) the runner records: a snapshot is
/// stored as one event, and its key and encoding take a little room.
pub const SNAPSHOT_BYTES_MAX: usize = EVENT_DATA_BYTES_MAX - 4096;

/// First bytes of every snapshot the runner records.
const SNAPSHOT_MAGIC: &[u8; 8] = b"EBXFORM1";

/// Where a runner is: inputs applied, the first log position not yet
/// considered, outputs produced per output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Inputs applied so far (`k`).
    pub inputs_applied: u64,
    /// The first log position after the last input applied (0 before any).
    pub next_position: u64,
    /// Outputs produced so far in each output stream (`C_k`): the index the
    /// next output to that stream gets.
    pub output_counts: BTreeMap<StreamName, u64>,
}

/// An input, as outputs and errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    /// Its stream.
    pub stream: StreamName,
    /// Its version in that stream.
    pub version: u64,
    /// Its log position.
    pub position: u64,
}

impl std::fmt::Display for InputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{} (position {})", self.stream, self.version, self.position)
    }
}

/// One planned `exists_or_write`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The stream.
    pub stream: StreamName,
    /// The version to write at.
    pub index: u64,
    /// The event, identical in every instance.
    pub event: NewEvent,
}

/// A state hash due after an input, and the snapshot that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCheck {
    /// The state hash event for the state hash stream.
    pub planned: Planned,
    /// The hash written in it.
    pub state_hash: u64,
    /// Inputs applied at this point.
    pub inputs_applied: u64,
    /// Snapshot bytes, when a snapshot is due here too.
    pub snapshot: Option<Vec<u8>>,
}

/// What one input makes the instance write, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The input.
    pub input: InputRef,
    /// Its outputs, in the order the transform produced them.
    pub outputs: Vec<Planned>,
    /// The state hash (and snapshot), if due after this input.
    pub state_check: Option<StateCheck>,
}

/// The names a transform uses on the node, all derived from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNames {
    /// The transform's name.
    pub name: String,
    /// `transform.NAME.spec`: the declaration (inputs, outputs) at version
    /// 0; also the stream its snapshots are recorded under.
    pub spec: StreamName,
    /// `transform.NAME.statehash`: the state hashes.
    pub state_hash: StreamName,
    /// `transform.NAME`: the snapshot source.
    pub snapshot_source: String,
}

/// First token of every transform's control streams; patterns that match
/// them are refused as inputs and outputs.
pub const CONTROL_PREFIX: &str = "transform";

impl ControlNames {
    /// The names of transform `name` (a valid single token).
    pub fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.contains('.') || name.contains('$') {
            return Err(format!(
                "transform name {name:?} must be one token of letters, digits and _ - : @ (no dots, not empty)"
            ));
        }
        let spec = StreamName::new(&format!("{CONTROL_PREFIX}.{name}.spec"))
            .map_err(|e| format!("transform name {name:?} is not valid in a stream name: {e}"))?;
        let state_hash = StreamName::new(&format!("{CONTROL_PREFIX}.{name}.statehash"))
            .map_err(|e| format!("transform name {name:?} is not valid in a stream name: {e}"))?;
        Ok(Self { name: name.to_owned(), spec, state_hash, snapshot_source: format!("{CONTROL_PREFIX}.{name}") })
    }

    /// The pattern of every transform's control streams, `transform.>`.
    pub fn all_control_streams() -> StreamPattern {
        StreamPattern::new(&format!("{CONTROL_PREFIX}.>")).expect("a valid pattern")
    }
}

/// The runner's state machine over one transform.
#[derive(Debug)]
pub struct Core<T: Transform> {
    transform: T,
    names: ControlNames,
    outputs: StreamPattern,
    state_hash_every: u64,
    snapshot_every: u64,
    state: T::State,
    progress: Progress,
}

impl<T: Transform> Core<T> {
    /// A core at `progress` with `state`. `snapshot_every` is 0 (never) or a
    /// multiple of `state_hash_every`, which is at least 1.
    pub fn new(
        transform: T,
        names: ControlNames,
        outputs: StreamPattern,
        state_hash_every: u64,
        snapshot_every: u64,
        state: T::State,
        progress: Progress,
    ) -> Self {
        assert!(state_hash_every >= 1, "state hashes need a period");
        assert!(snapshot_every.is_multiple_of(state_hash_every), "snapshots are taken at state hashes");
        Self { transform, names, outputs, state_hash_every, snapshot_every, state, progress }
    }

    /// Where the core is.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The state (for tests and for a caller that inspects it after a run).
    pub fn state(&self) -> &T::State {
        &self.state
    }

    /// Applies one input. `None` for an input at or before the last one
    /// applied (a subscription delivers each position once, so this only
    /// guards against a resubscription that overlaps).
    pub fn apply(&mut self, input: &RecordedEvent) -> Result<Option<Step>, TransformError> {
        if input.position < self.progress.next_position {
            return Ok(None);
        }
        let input_ref = InputRef { stream: input.stream.clone(), version: input.version, position: input.position };
        let produced = self.transform.apply(&mut self.state, input);
        if produced.len() > OUTPUTS_PER_INPUT_MAX {
            return Err(TransformError::BadOutput {
                input: input_ref.to_string(),
                reason: format!(
                    "{} outputs for one input, more than the maximum of {OUTPUTS_PER_INPUT_MAX}",
                    produced.len()
                ),
            });
        }
        // The node keeps a non-zero time as given; 0 would make it stamp
        // its own clock, which differs between instances.
        let timestamp_ms = input.timestamp_ms.max(1);
        let metadata = output_metadata(&self.names.name, input);
        let mut outputs = Vec::with_capacity(produced.len());
        for Output { stream, event_type, data } in produced {
            if !self.outputs.matches(&stream) {
                return Err(TransformError::BadOutput {
                    input: input_ref.to_string(),
                    reason: format!("output stream {stream} is outside the output pattern {}", self.outputs),
                });
            }
            let count = self.progress.output_counts.entry(stream.clone()).or_insert(0);
            let index = *count;
            *count += 1;
            let event = NewEvent {
                id: derived_id(&self.names.name, &stream, index),
                event_type,
                data,
                metadata: metadata.clone(),
                timestamp_ms,
            };
            event.validate().map_err(|e| TransformError::BadOutput {
                input: input_ref.to_string(),
                reason: format!("output {stream}@{index}: {e}"),
            })?;
            outputs.push(Planned { stream, index, event });
        }
        self.progress.inputs_applied += 1;
        self.progress.next_position = input.position + 1;
        let inputs_applied = self.progress.inputs_applied;
        let state_check = inputs_applied.is_multiple_of(self.state_hash_every).then(|| {
            let state = self.transform.encode_state(&self.state);
            let state_hash = state_hash(&state);
            let index = inputs_applied / self.state_hash_every - 1;
            let data = format!(
                "{{\"inputs\":{inputs_applied},\"input\":\"{}@{}\",\"state_hash\":\"{state_hash:016x}\",\"state_bytes\":{}}}",
                input.stream,
                input.version,
                state.len()
            );
            let event = NewEvent {
                id: derived_id(&self.names.name, &self.names.state_hash, index),
                event_type: EventType::new(STATE_HASH_TYPE).expect("a valid type"),
                data: data.into_bytes(),
                metadata: metadata.clone(),
                timestamp_ms,
            };
            let snapshot = (self.snapshot_every > 0 && inputs_applied.is_multiple_of(self.snapshot_every))
                .then(|| encode_snapshot(T::STATE_VERSION, &self.progress, &state));
            StateCheck {
                planned: Planned { stream: self.names.state_hash.clone(), index, event },
                state_hash,
                inputs_applied,
                snapshot,
            }
        });
        Ok(Some(Step { input: input_ref, outputs, state_check }))
    }
}

/// The event type of state hash events.
pub const STATE_HASH_TYPE: &str = "StateHash";

/// The event type of a transform's declaration.
pub const SPEC_TYPE: &str = "TransformDeclared";

/// The metadata of every event an instance writes for `input`: which
/// transform and which input (by stream and version, which are the same on
/// every site, unlike positions). Names hold no character that JSON escapes.
pub fn output_metadata(name: &str, input: &RecordedEvent) -> Vec<u8> {
    debug_assert!(!name.contains(['"', '\\']));
    format!("{{\"transform\":\"{name}\",\"input\":\"{}@{}\"}}", input.stream, input.version).into_bytes()
}

/// The transform named in an event's metadata, if it was written by one.
pub fn metadata_transform(metadata: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(metadata).ok()?;
    value.get("transform")?.as_str().map(str::to_owned)
}

/// The id of the event at `index` of `stream` written by transform `name`:
/// the same in every instance, different for every (name, stream, index).
/// Two XXH64 content hashes (fixed forever, see `edgebus_types::content_hash`)
/// of the three, under two different domain types.
pub fn derived_id(name: &str, stream: &StreamName, index: u64) -> EventId {
    let mut key = Vec::with_capacity(stream.as_str().len() + 9);
    key.extend_from_slice(stream.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&index.to_le_bytes());
    let high = content_hash(&EventType::new("edgebus.transform.id.high").expect("valid"), name.as_bytes(), &key);
    let low = content_hash(&EventType::new("edgebus.transform.id.low").expect("valid"), name.as_bytes(), &key);
    EventId::from_u128((u128::from(high) << 64) | u128::from(low))
}

/// The hash of an encoded state that instances compare.
pub fn state_hash(state: &[u8]) -> u64 {
    content_hash(&EventType::new("edgebus.transform.state").expect("valid"), state, &[])
}

/// The spec (declaration) event's data: `{"transform","inputs","outputs"}`.
pub fn spec_data(name: &str, inputs: &StreamPattern, outputs: &StreamPattern) -> Vec<u8> {
    format!("{{\"transform\":\"{name}\",\"inputs\":\"{inputs}\",\"outputs\":\"{outputs}\"}}").into_bytes()
}

/// A declaration read back: the inputs and outputs patterns.
pub fn parse_spec(data: &[u8]) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    Some((value.get("inputs")?.as_str()?.to_owned(), value.get("outputs")?.as_str()?.to_owned()))
}

/// The state hash in a state hash event's data.
pub fn parse_state_hash(data: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    u64::from_str_radix(value.get("state_hash")?.as_str()?, 16).ok()
}

/// Whether some stream name matches both patterns (NATS rules: `*` one
/// token, `>` one or more trailing tokens).
pub fn patterns_overlap(a: &StreamPattern, b: &StreamPattern) -> bool {
    fn overlap(a: &[&str], b: &[&str]) -> bool {
        match (a.split_first(), b.split_first()) {
            (None, None) => true,
            (Some((&">", _)), Some(_)) | (Some(_), Some((&">", _))) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some((x, a_rest)), Some((y, b_rest))) => (*x == "*" || *y == "*" || x == y) && overlap(a_rest, b_rest),
        }
    }
    let a: Vec<&str> = a.as_str().split('.').collect();
    let b: Vec<&str> = b.as_str().split('.').collect();
    overlap(&a, &b)
}

/// A decoded snapshot: what it says about the runner, and the user's state
/// bytes with the state version that wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedSnapshot {
    /// The transform's `STATE_VERSION` when it was written.
    pub state_version: u32,
    /// The runner's progress at the snapshot.
    pub progress: Progress,
    /// The user's encoded state.
    pub state: Vec<u8>,
}

/// Snapshot bytes, little-endian: magic, state version (u32), inputs
/// applied (u64), next position (u64), number of output streams (u32), per
/// stream its name length (u16), name and count (u64), then the state's
/// length (u64) and the state.
pub fn encode_snapshot(state_version: u32, progress: &Progress, state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + state.len() + progress.output_counts.len() * 32);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&state_version.to_le_bytes());
    out.extend_from_slice(&progress.inputs_applied.to_le_bytes());
    out.extend_from_slice(&progress.next_position.to_le_bytes());
    let streams = u32::try_from(progress.output_counts.len()).expect("fewer than 2^32 output streams");
    out.extend_from_slice(&streams.to_le_bytes());
    for (stream, count) in &progress.output_counts {
        let name = stream.as_str().as_bytes();
        let len = u16::try_from(name.len()).expect("stream names are at most 255 bytes");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&count.to_le_bytes());
    }
    out.extend_from_slice(&(state.len() as u64).to_le_bytes());
    out.extend_from_slice(state);
    out
}

/// Reads [`encode_snapshot`]'s bytes; says what is wrong with them if they
/// are not a runner snapshot.
pub fn decode_snapshot(bytes: &[u8]) -> Result<DecodedSnapshot, String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err(format!("it ends inside its {what}"));
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn u64(&mut self, what: &str) -> Result<u64, String> {
            Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
        }
    }
    let mut reader = Reader(bytes);
    if reader.take(SNAPSHOT_MAGIC.len(), "header")? != SNAPSHOT_MAGIC {
        return Err("it does not start with the runner's snapshot header (not written by a transform runner)".into());
    }
    let state_version = u32::from_le_bytes(reader.take(4, "state version")?.try_into().expect("4 bytes"));
    let inputs_applied = reader.u64("input count")?;
    let next_position = reader.u64("position")?;
    let streams = u32::from_le_bytes(reader.take(4, "stream count")?.try_into().expect("4 bytes"));
    let mut output_counts = BTreeMap::new();
    for _ in 0..streams {
        let len = u16::from_le_bytes(reader.take(2, "stream name length")?.try_into().expect("2 bytes"));
        let name = reader.take(usize::from(len), "stream name")?;
        let name = std::str::from_utf8(name).map_err(|_| "a stream name is not UTF-8".to_owned())?;
        let stream = StreamName::new(name).map_err(|e| format!("stream name {name:?}: {e}"))?;
        let count = reader.u64("output count")?;
        output_counts.insert(stream, count);
    }
    let state_len = reader.u64("state length")?;
    let state = reader.take(usize::try_from(state_len).map_err(|_| "state too long")?, "state")?.to_vec();
    if !reader.0.is_empty() {
        return Err(format!("{} bytes follow the state", reader.0.len()));
    }
    Ok(DecodedSnapshot { state_version, progress: Progress { inputs_applied, next_position, output_counts }, state })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts inputs per stream; emits one output per input to `out.<last
    /// token>` and a second one every third input.
    #[derive(Debug)]
    struct Counter;

    impl Transform for Counter {
        type State = BTreeMap<String, u64>;
        const STATE_VERSION: u32 = 7;

        fn initial_state(&self) -> Self::State {
            BTreeMap::new()
        }

        fn apply(&self, state: &mut Self::State, input: &RecordedEvent) -> Vec<Output> {
            let token = input.stream.tokens().next_back().expect("a token").to_owned();
            let seen = state.entry(token.clone()).or_insert(0);
            *seen += 1;
            let stream = StreamName::new(&format!("out.{token}")).expect("valid");
            let mut outputs = vec![Output::new(stream.clone(), "Seen", seen.to_string().into_bytes())];
            if *seen % 3 == 0 {
                outputs.push(Output::new(stream, "Third", Vec::new()));
            }
            outputs
        }

        fn encode_state(&self, state: &Self::State) -> Vec<u8> {
            state.iter().map(|(k, v)| format!("{k}={v};")).collect::<String>().into_bytes()
        }

        fn decode_state(&self, bytes: &[u8]) -> Result<Self::State, String> {
            let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
            text.split_terminator(';')
                .map(|pair| {
                    let (k, v) = pair.split_once('=').ok_or("no =")?;
                    Ok((k.to_owned(), v.parse().map_err(|_| "not a number")?))
                })
                .collect()
        }
    }

    fn input(stream: &str, version: u64, position: u64) -> RecordedEvent {
        RecordedEvent {
            stream: StreamName::new(stream).unwrap(),
            version,
            position,
            id: EventId::from_u128(u128::from(position) + 1),
            event_type: EventType::new("In").unwrap(),
            data: Vec::new(),
            metadata: Vec::new(),
            timestamp_ms: 1_000 + position,
            origin: None,
        }
    }

    fn core(progress: Progress, state: BTreeMap<String, u64>) -> Core<Counter> {
        Core::new(
            Counter,
            ControlNames::new("counter").unwrap(),
            StreamPattern::new("out.*").unwrap(),
            2,
            4,
            state,
            progress,
        )
    }

    fn inputs() -> Vec<RecordedEvent> {
        // Sparse positions, as when other streams interleave with the inputs.
        (0..12).map(|i| input(if i % 2 == 0 { "in.a" } else { "in.b" }, i / 2, i * 3 + 1)).collect()
    }

    fn run(core: &mut Core<Counter>, inputs: &[RecordedEvent]) -> Vec<Step> {
        inputs.iter().filter_map(|event| core.apply(event).unwrap()).collect()
    }

    #[test]
    fn outputs_are_indexed_by_the_count_before_them_and_identical_between_instances() {
        let mut first = core(Progress::default(), BTreeMap::new());
        let mut second = core(Progress::default(), BTreeMap::new());
        let steps = run(&mut first, &inputs());
        assert_eq!(steps, run(&mut second, &inputs()));
        let out_a: Vec<u64> =
            steps.iter().flat_map(|s| &s.outputs).filter(|p| p.stream.as_str() == "out.a").map(|p| p.index).collect();
        assert_eq!(out_a, (0..8).collect::<Vec<u64>>(), "6 inputs: 6 Seen and 2 Third, dense from 0");
        let third = &steps[4].outputs[1];
        assert_eq!((third.stream.as_str(), third.index, third.event.event_type.as_str()), ("out.a", 3, "Third"));
        assert_eq!(third.event.timestamp_ms, 1_000 + 13, "the input's time");
        assert_eq!(third.event.metadata, br#"{"transform":"counter","input":"in.a@2"}"#);
        assert_eq!(third.event.id, derived_id("counter", &third.stream, 3));
        assert_ne!(third.event.id, derived_id("counter", &third.stream, 2));
        assert_ne!(third.event.id, derived_id("other", &third.stream, 3));
        assert_eq!(first.progress().inputs_applied, 12);
        assert_eq!(first.progress().next_position, 11 * 3 + 2);
    }

    #[test]
    fn state_hashes_and_snapshots_come_at_their_periods() {
        let mut core = core(Progress::default(), BTreeMap::new());
        let steps = run(&mut core, &inputs());
        let checks: Vec<(u64, u64, bool)> = steps
            .iter()
            .filter_map(|s| s.state_check.as_ref())
            .map(|c| (c.inputs_applied, c.planned.index, c.snapshot.is_some()))
            .collect();
        assert_eq!(checks, [(2, 0, false), (4, 1, true), (6, 2, false), (8, 3, true), (10, 4, false), (12, 5, true)]);
        let check = steps[3].state_check.as_ref().unwrap();
        assert_eq!(check.planned.stream.as_str(), "transform.counter.statehash");
        assert_eq!(parse_state_hash(&check.planned.event.data), Some(check.state_hash));
        assert_eq!(check.state_hash, state_hash(b"a=2;b=2;"));
    }

    #[test]
    fn resuming_from_any_snapshot_writes_exactly_what_an_uninterrupted_run_writes() {
        let all = inputs();
        let mut whole = core(Progress::default(), BTreeMap::new());
        let expected = run(&mut whole, &all);
        for (at, step) in expected.iter().enumerate() {
            let Some(snapshot) = step.state_check.as_ref().and_then(|c| c.snapshot.as_ref()) else { continue };
            let decoded = decode_snapshot(snapshot).unwrap();
            assert_eq!(decoded.state_version, 7);
            assert_eq!(decoded.progress.inputs_applied, at as u64 + 1);
            let state = Counter.decode_state(&decoded.state).unwrap();
            let mut resumed = core(decoded.progress, state);
            // The subscription restarts at the snapshot's position; inputs
            // before it (if delivered again) are skipped.
            let replayed = run(&mut resumed, &all);
            assert_eq!(replayed, expected[at + 1..], "resumed after input {}", at + 1);
        }
    }

    #[test]
    fn outputs_outside_the_pattern_are_refused() {
        let mut core = Core::new(
            Counter,
            ControlNames::new("counter").unwrap(),
            StreamPattern::new("elsewhere.*").unwrap(),
            1,
            0,
            BTreeMap::new(),
            Progress::default(),
        );
        let error = core.apply(&input("in.a", 0, 0)).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("out.a is outside the output pattern elsewhere.*"), "{text}");
        assert!(text.contains("in.a@0"), "{text}");
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_named() {
        let progress = Progress {
            inputs_applied: 42,
            next_position: 99,
            output_counts: [(StreamName::new("out.a").unwrap(), 5), (StreamName::new("out.b").unwrap(), 9)].into(),
        };
        let bytes = encode_snapshot(3, &progress, b"state");
        let decoded = decode_snapshot(&bytes).unwrap();
        assert_eq!(decoded, DecodedSnapshot { state_version: 3, progress, state: b"state".to_vec() });
        assert!(decode_snapshot(&bytes[..bytes.len() - 1]).unwrap_err().contains("ends inside its state"));
        assert!(decode_snapshot(b"something else").unwrap_err().contains("header"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_snapshot(&longer).unwrap_err().contains("1 bytes follow"));
    }

    #[test]
    fn pattern_overlap_follows_the_wildcards() {
        let overlap = |a: &str, b: &str| {
            let (a, b) = (StreamPattern::new(a).unwrap(), StreamPattern::new(b).unwrap());
            assert_eq!(patterns_overlap(&a, &b), patterns_overlap(&b, &a), "symmetric");
            patterns_overlap(&a, &b)
        };
        assert!(overlap("trades.*", "trades.btc"));
        assert!(overlap("trades.*", "trades.>"));
        assert!(overlap(">", "transform.x.spec"));
        assert!(overlap("*.x", "a.*"));
        assert!(overlap("orders.>", "orders.eu.x"));
        assert!(!overlap("trades.*", "trades.a.b"));
        assert!(!overlap("trades.>", "trades"));
        assert!(!overlap("orders.>", "trades.*"));
        assert!(!overlap("a.*.c", "a.b.d"));
    }

    #[test]
    fn control_names_need_one_token() {
        assert_eq!(ControlNames::new("matcher").unwrap().spec.as_str(), "transform.matcher.spec");
        assert!(ControlNames::new("a.b").is_err());
        assert!(ControlNames::new("").is_err());
        assert!(ControlNames::new("$x").is_err());
        assert!(ControlNames::new("sp ace").is_err());
    }
}
