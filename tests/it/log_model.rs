//! Model-based test of the log: random sequences of appends, forward and
//! backward reads, reopens and segment removals run against the log and
//! against a plain in-memory model (the records and the start position);
//! every read must equal what the model says, exactly.

use std::path::Path;

use edgebus_log::{LogConfig, ReadError, Record};
use edgebus_tests::guarded;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// One atomic append of records with these payload sizes.
    Append(Vec<usize>),
    /// Forward read; `from` is a fraction of the way from 0 to past the end.
    Read { from: Spot, max_records: usize, max_bytes: u64 },
    /// Backward read from a spot, inclusive.
    ReadBackward { from: Spot, max_records: usize, max_bytes: u64 },
    /// Close and open again.
    Reopen,
    /// Remove whole segments before a spot.
    RemoveBefore(Spot),
    /// Remove whole segments before a position next to a segment boundary
    /// (the base of the `segment`th segment file, modulo their number, plus
    /// `delta`), where an off-by-one would show.
    RemoveNearBoundary { segment: usize, delta: i8 },
}

/// A position chosen relative to the log's size at the time, so that reads
/// hit removed, present and future positions alike.
#[derive(Debug, Clone, Copy)]
struct Spot(u16);

impl Spot {
    fn resolve(self, end: u64) -> u64 {
        // 0..=1100 per mille of end + 2: a little past the end too.
        (end + 2) * u64::from(self.0) / 1000
    }
}

fn spot() -> impl Strategy<Value = Spot> {
    (0u16..=1100).prop_map(Spot)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(0usize..600, 1..=5).prop_map(Op::Append),
        2 => (spot(), 1usize..40, prop_oneof![Just(u64::MAX), 0u64..3000])
            .prop_map(|(from, max_records, max_bytes)| Op::Read { from, max_records, max_bytes }),
        2 => (spot(), 1usize..40, prop_oneof![Just(u64::MAX), 0u64..3000])
            .prop_map(|(from, max_records, max_bytes)| Op::ReadBackward { from, max_records, max_bytes }),
        1 => Just(Op::Reopen),
        1 => spot().prop_map(Op::RemoveBefore),
        1 => (0usize..8, -1i8..=1).prop_map(|(segment, delta)| Op::RemoveNearBoundary { segment, delta }),
    ]
}

/// What the log should hold: every record ever appended, and the first one still present.
#[derive(Debug, Default)]
struct Model {
    records: Vec<Vec<u8>>,
    start: u64,
}

impl Model {
    fn end(&self) -> u64 {
        self.records.len() as u64
    }

    fn take(&self, positions: impl Iterator<Item = u64>, max_records: usize, max_bytes: u64) -> Vec<Record> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for position in positions.take(max_records) {
            let payload = &self.records[position as usize];
            let len = payload.len() as u64;
            if !out.is_empty() && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            out.push(Record { position, payload: payload.clone().into() });
        }
        out
    }

    fn read(&self, from: u64, max_records: usize, max_bytes: u64) -> Result<Vec<Record>, (u64, u64)> {
        if from < self.start {
            return Err((from, self.start));
        }
        Ok(self.take(from..self.end(), max_records, max_bytes))
    }

    fn read_backward(&self, from: u64, max_records: usize, max_bytes: u64) -> Result<Vec<Record>, (u64, u64)> {
        if self.end() == 0 {
            return Ok(Vec::new());
        }
        let from = from.min(self.end() - 1);
        if from < self.start {
            return Err((from, self.start));
        }
        Ok(self.take((self.start..=from).rev(), max_records, max_bytes))
    }
}

fn payload(position: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (position as usize * 31 + i) as u8).collect()
}

fn check_read(
    what: &str,
    got: Result<Vec<Record>, ReadError>,
    want: Result<Vec<Record>, (u64, u64)>,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Ok(got), Ok(want)) => prop_assert_eq!(got, want, "{}", what),
        (Err(ReadError::Removed { position, start }), Err(want)) => {
            prop_assert_eq!((position, start), want, "{}", what);
        }
        (got, want) => prop_assert!(false, "{what}: got {got:?}, model says {want:?}"),
    }
    Ok(())
}

/// The log's segment files, by base position, ascending.
fn segment_bases(dir: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| edgebus_log::format::parse_segment_file_name(&e.unwrap().file_name().to_string_lossy()))
        .collect();
    bases.sort_unstable();
    bases
}

fn run(segment_bytes: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::small_segments(segment_bytes);
    let mut log = guarded::open(dir.path(), config.clone()).unwrap();
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        let what = format!("step {step}: {op:?}");
        match op {
            Op::Append(sizes) => {
                let first = model.end();
                let records: Vec<Vec<u8>> =
                    sizes.iter().enumerate().map(|(i, &len)| payload(first + i as u64, len)).collect();
                let outcome = log.append(&records).unwrap();
                prop_assert_eq!(outcome.positions(), first..first + records.len() as u64, "{}", what);
                model.records.extend(records);
            }
            Op::Read { from, max_records, max_bytes } => {
                let from = from.resolve(model.end());
                let got = log.read(from, *max_records, *max_bytes);
                check_read(&what, got, model.read(from, *max_records, *max_bytes))?;
            }
            Op::ReadBackward { from, max_records, max_bytes } => {
                let from = from.resolve(model.end());
                let got = log.read_backward(from, *max_records, *max_bytes);
                check_read(&what, got, model.read_backward(from, *max_records, *max_bytes))?;
            }
            Op::Reopen => {
                log.close().unwrap();
                drop(log);
                log = guarded::open(dir.path(), config.clone()).unwrap();
                prop_assert_eq!(log.recovery_report().truncated.clone(), None, "{}", what);
            }
            Op::RemoveBefore(_) | Op::RemoveNearBoundary { .. } => {
                let before = match op {
                    Op::RemoveBefore(spot) => spot.resolve(model.end()),
                    Op::RemoveNearBoundary { segment, delta } => {
                        let bases = segment_bases(dir.path());
                        bases[segment % bases.len()].saturating_add_signed(i64::from(*delta))
                    }
                    _ => unreachable!("matched above"),
                };
                let start = log.remove_segments_before(before).unwrap();
                prop_assert!(start >= model.start, "{what}: start moved back to {start}");
                prop_assert!(start <= before.max(model.start), "{what}: removed past {before}: start {start}");
                // Exactly the whole segments that lie below `before` went:
                // the first one left is the active one or reaches `before`.
                let bases = segment_bases(dir.path());
                prop_assert_eq!(bases[0], start, "{}", what);
                prop_assert!(bases.len() == 1 || bases[1] > before, "{what}: segment {bases:?} could go");
                model.start = start;
            }
        }
        prop_assert_eq!((log.start_position(), log.end_position()), (model.start, model.end()), "{}", what);
    }
    prop_assert_eq!(log.verify().unwrap(), model.end() - model.start);
    Ok(())
}

/// Regression: reading backward from a removed position answered as if the
/// log were empty instead of failing with `Removed` like a forward read.
#[test]
fn reading_backward_from_a_removed_position_says_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = guarded::open(dir.path(), LogConfig::small_segments(4096)).unwrap();
    for i in 0..100 {
        log.append(&[payload(i, 100)]).unwrap();
    }
    let start = log.remove_segments_before(50).unwrap();
    assert!(start > 0 && start <= 50, "start {start}");
    for from in [0, start - 1] {
        assert!(matches!(
            log.read_backward(from, 10, u64::MAX),
            Err(ReadError::Removed { position, start: s }) if position == from && s == start
        ));
        assert!(matches!(log.read(from, 10, u64::MAX), Err(ReadError::Removed { .. })));
    }
    let back = log.read_backward(start, 10, u64::MAX).unwrap();
    assert_eq!(back.iter().map(|r| r.position).collect::<Vec<_>>(), [start]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_an_in_memory_model(
        segment_bytes in prop_oneof![Just(4096u64), Just(6144), Just(8192)],
        ops in prop::collection::vec(op(), 1..=40),
    ) {
        run(segment_bytes, &ops)?;
    }
}
