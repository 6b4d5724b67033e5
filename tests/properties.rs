//! Property tests: round trips and bookkeeping invariants checked on
//! generated inputs rather than on a few hand-picked ones.
//!
//! - the wire path: any request → Avro value → Confluent wire bytes → the
//!   registry-backed [`Decoder`] → the same request; v1 data reads with the
//!   v2 reader; `frame`/`split` round-trip; every truncation of a valid
//!   message is a classified error;
//! - the JSON bridge: `avro_to_json` then `json_to_avro` gives the value back;
//! - [`OffsetTracker`] against a model: a commit never passes a record in
//!   flight and reaches one past the highest once all are done;
//! - [`PollLimit`] on the embedded log: every record handed out exactly once,
//!   in order per partition, each poll within its limits;
//! - [`Ledger`] against a model: a bounded FIFO of admissions with fates.
//!
//! Each block runs a few hundred cases at most so that the file takes
//! seconds; `PROPTEST_CASES` overrides the count for a longer local run.
//! A failing case is shrunk and printed, and proptest saves its seed in
//! `tests/properties.proptest-regressions` (commit that file: the case is
//! then replayed first on every run).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::types::Value;
use futures::executor::block_on;
use hartonomous::atom::{AtomIngestionRequest, ContentHash};
use hartonomous::avro::wire::{self, HEADER_LEN};
use hartonomous::avro::{self, ATOM_INGESTION_REQUEST, DecodeError, Decoder, FileRegistry, Schemas, WireError};
use hartonomous::clock::ManualClock;
use hartonomous::flow::commit::OffsetTracker;
use hartonomous::log::embedded::EmbeddedLog;
use hartonomous::log::{LogConsumer, PollLimit};
use hartonomous::outcome::Rejection;
use hartonomous::record::{OutgoingRecord, TopicPartition};
use hartonomous::topology::atom_ingestion::decode::to_request;
use hartonomous::topology::atom_ingestion::ledger::{Fate, Ledger};
use proptest::prelude::*;

const TOPIC: &str = "atoms.ingest";

// ---------------------------------------------------------------- generators

/// Any string: every Unicode scalar, control characters and newlines included.
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("(?s).{{0,{max}}}")).expect("valid regex")
}

fn content_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("text/plain".to_string()),
        Just("text/markdown; charset=utf-8".to_string()),
        Just("application/json".to_string()),
        Just("application/octet-stream".to_string()),
        Just(String::new()),
        text(24),
    ]
}

/// Any request: arbitrary content bytes (valid UTF-8 or not), content types,
/// metadata maps, source system, correlation id and optional creation time.
fn request() -> impl Strategy<Value = AtomIngestionRequest> {
    (
        content_type(),
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..256), text(64).prop_map(String::into_bytes)],
        proptest::collection::btree_map(text(12), text(24), 0..6),
        text(24),
        text(40),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(content_type, content, metadata, source_system, correlation_id, created_at_ms)| AtomIngestionRequest {
            content_type,
            content,
            metadata,
            source_system,
            correlation_id,
            created_at_ms,
        })
}

// ----------------------------------------------------------------- fixtures

/// A file registry holding every bundled request version under the topic's
/// subject, with a decoder for the current reader; one per test binary.
struct Wire {
    decoder: Decoder,
    /// Bundle version → schema id.
    ids: BTreeMap<u32, u32>,
}

static WIRE: LazyLock<Wire> = LazyLock::new(|| {
    wire::limit_allocations();
    // The registry reads its file when opened and writes it when a schema is
    // registered; it answers look-ups from memory, so the directory can go.
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FileRegistry::open(dir.path().join("registry.json")).unwrap());
    let ids =
        registry.register_bundled(&[(TOPIC, ATOM_INGESTION_REQUEST)]).unwrap().into_iter().map(|r| (r.bundle_version, r.id)).collect();
    let decoder = Decoder::new(registry, Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema.clone());
    Wire { decoder, ids }
});

impl Wire {
    fn decode(&self, bytes: &[u8]) -> Result<(u32, Value), DecodeError> {
        block_on(self.decoder.decode(bytes))
    }
}

fn schema(version: u32) -> &'static Schema {
    &Schemas::version(ATOM_INGESTION_REQUEST, version).unwrap().schema
}

/// The request as a value of the current schema.
fn to_v2(req: &AtomIngestionRequest) -> Value {
    apache_avro::to_value(req).unwrap().resolve(schema(2)).unwrap()
}

/// The request as a value of schema v1 (which has no `created_at_ms`).
fn to_v1(req: &AtomIngestionRequest) -> Value {
    let metadata = req.metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<HashMap<_, _>>();
    let value = Value::Record(vec![
        ("content_type".into(), Value::String(req.content_type.clone())),
        ("content".into(), Value::Bytes(req.content.clone())),
        ("metadata".into(), Value::Map(metadata)),
        ("source_system".into(), Value::String(req.source_system.clone())),
        ("correlation_id".into(), Value::String(req.correlation_id.clone())),
    ]);
    assert!(value.validate(schema(1)));
    value
}

// --------------------------------------------------------- wire round trips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_request_round_trips_through_the_wire_and_the_registry(req in request()) {
        let wire = &*WIRE;
        let id = wire.ids[&2];
        let bytes = avro::encode(id, schema(2), &to_v2(&req)).unwrap();
        let (got_id, value) = wire.decode(&bytes).unwrap();
        prop_assert_eq!(got_id, id);
        prop_assert_eq!(to_request(&value).unwrap(), req);
    }

    #[test]
    fn a_v1_record_reads_with_the_v2_reader_with_no_creation_time(req in request()) {
        let wire = &*WIRE;
        let id = wire.ids[&1];
        prop_assert_ne!(id, wire.ids[&2]);
        let bytes = avro::encode(id, schema(1), &to_v1(&req)).unwrap();
        let (got_id, value) = wire.decode(&bytes).unwrap();
        prop_assert_eq!(got_id, id);
        prop_assert_eq!(to_request(&value).unwrap(), AtomIngestionRequest { created_at_ms: None, ..req });
    }

    #[test]
    fn the_json_form_of_a_request_converts_back_to_the_same_value(req in request()) {
        let value = to_v2(&req);
        let json = avro::avro_to_json(&value);
        prop_assert_eq!(&avro::json_to_avro(&json, schema(2)).unwrap(), &value);
        // The same through the text form, as a JSON line arrives.
        let line = avro::parse_line(json.to_string().as_bytes()).unwrap();
        prop_assert_eq!(&avro::json_to_avro(&line, schema(2)).unwrap(), &value);
    }

    #[test]
    fn frame_and_split_round_trip(id in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let framed = wire::frame(id, &body);
        prop_assert_eq!(framed.len(), HEADER_LEN + body.len());
        prop_assert_eq!(wire::split(&framed), Ok((id, &body[..])));
    }

    #[test]
    fn bytes_not_starting_with_the_magic_byte_are_bad_magic(first in 1u8.., rest in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = vec![first];
        bytes.extend(rest);
        prop_assert_eq!(wire::split(&bytes), Err(WireError::BadMagic(first)));
    }
}

proptest! {
    // Each case decodes every prefix of a message: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error(req in request(), v1 in any::<bool>()) {
        let wire = &*WIRE;
        let bytes = if v1 {
            avro::encode(wire.ids[&1], schema(1), &to_v1(&req)).unwrap()
        } else {
            avro::encode(wire.ids[&2], schema(2), &to_v2(&req)).unwrap()
        };
        for len in 0..bytes.len() {
            let err = wire.decode(&bytes[..len]).expect_err("a strict prefix never decodes");
            prop_assert!(
                matches!(err, DecodeError::Invalid(WireError::Truncated | WireError::Body(_))),
                "cut at {} of {}: {:?}", len, bytes.len(), err
            );
        }
        prop_assert!(wire.decode(&bytes).is_ok());
    }
}

// ------------------------------------------------------------ offset commits

/// One step of the pipeline's bookkeeping, as the runner drives it.
#[derive(Debug, Clone)]
enum Step {
    /// Track the next polled offset (polls come in offset order).
    Track,
    /// Finish the `n`-th record still in flight (modulo their count).
    Done(usize),
    /// Commit what `committable()` offers.
    Commit,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![3 => Just(Step::Track), 3 => any::<usize>().prop_map(Step::Done), 1 => Just(Step::Commit)],
        0..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any tracked offsets (with gaps, as Kafka offsets may have, on up
    /// to three partitions) and any order of `done`, `committable()` is
    /// exactly the lowest offset still in flight, or one past the highest
    /// tracked when none is: never past a record in flight. Once every
    /// record is done it is one past the highest.
    #[test]
    fn committable_never_passes_a_record_in_flight(
        partitions in 1usize..=3,
        gaps in proptest::collection::vec(1i64..4, 1..200),
        first in 0i64..1000,
        steps in steps(),
        on in proptest::collection::vec(any::<prop::sample::Index>(), 120),
    ) {
        let tps: Vec<TopicPartition> = (0..partitions).map(|p| TopicPartition::new(TOPIC, p as i32)).collect();
        let mut tracker = OffsetTracker::default();
        // Model per partition: offsets still to poll, offsets in flight, highest tracked.
        let mut next_offset: Vec<i64> = vec![first; partitions];
        let mut polled: Vec<usize> = vec![0; partitions];
        let mut in_flight: Vec<Vec<i64>> = vec![Vec::new(); partitions];
        let mut highest: Vec<Option<i64>> = vec![None; partitions];
        let mut committed: Vec<Option<i64>> = vec![None; partitions];

        let check = |tracker: &OffsetTracker, in_flight: &[Vec<i64>], highest: &[Option<i64>], committed: &[Option<i64>]| -> Result<(), TestCaseError> {
            let offered = tracker.committable();
            for (p, tp) in tps.iter().enumerate() {
                let expected = match (in_flight[p].iter().min(), highest[p]) {
                    (Some(&lowest), _) => Some(lowest),
                    (None, Some(h)) => Some(h + 1),
                    (None, None) => None,
                };
                // Offered only when it moved since the last commit (and is past 0).
                let expected = expected.filter(|&o| o > 0 && committed[p] != Some(o));
                prop_assert_eq!(offered.get(tp).copied(), expected, "partition {}", p);
                if let Some(&o) = offered.get(tp) {
                    prop_assert!(in_flight[p].iter().all(|&f| f >= o), "commit {} passes a record in flight: {:?}", o, in_flight[p]);
                }
            }
            prop_assert_eq!(tracker.in_flight(), in_flight.iter().map(Vec::len).sum::<usize>());
            Ok(())
        };

        for (i, step) in steps.iter().enumerate() {
            let p = on[i % on.len()].index(partitions);
            match step {
                Step::Track => {
                    let Some(gap) = gaps.get(polled[p]) else { continue };
                    let offset = next_offset[p];
                    tracker.track(&tps[p], offset);
                    in_flight[p].push(offset);
                    highest[p] = Some(offset);
                    next_offset[p] += gap;
                    polled[p] += 1;
                }
                Step::Done(n) => {
                    if in_flight[p].is_empty() {
                        continue;
                    }
                    let at = n % in_flight[p].len();
                    let offset = in_flight[p].remove(at);
                    tracker.done(&tps[p], offset);
                }
                Step::Commit => {
                    let offered = tracker.committable();
                    tracker.mark_committed(&offered);
                    for (p, tp) in tps.iter().enumerate() {
                        if let Some(&o) = offered.get(tp) {
                            committed[p] = Some(o);
                        }
                    }
                }
            }
            check(&tracker, &in_flight, &highest, &committed)?;
        }

        // Finish everything, in the order left: one past the highest.
        for (p, tp) in tps.iter().enumerate() {
            for offset in std::mem::take(&mut in_flight[p]) {
                tracker.done(tp, offset);
            }
        }
        check(&tracker, &in_flight, &highest, &committed)?;
        let offered = tracker.committable();
        for (p, tp) in tps.iter().enumerate() {
            if let Some(h) = highest[p] {
                let reached = offered.get(tp).copied().or(committed[p]);
                prop_assert_eq!(reached, Some(h + 1), "partition {}", p);
            }
        }
        prop_assert_eq!(tracker.in_flight(), 0);
    }
}

// ------------------------------------------------------- polls and their limits

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Records of random sizes on up to four partitions, consumed by polls
    /// with random record and byte limits: every record comes out exactly
    /// once, in offset order per partition; no poll hands out more records
    /// than its limit, nor more bytes unless it hands out one record alone;
    /// a poll allowed any record hands out at least one while any is left.
    #[test]
    fn bounded_polls_hand_out_every_record_once_in_order_within_limits(
        partitions in 1i32..=4,
        records in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..48, proptest::option::of(0usize..8)), 0..80),
        limits in proptest::collection::vec((0usize..6, 1usize..120), 1..12),
    ) {
        let log = EmbeddedLog::new(ManualClock::new(0).shared());
        log.create_topic(TOPIC, partitions);
        // What was appended, per partition, in offset order.
        let mut appended: BTreeMap<i32, Vec<Vec<u8>>> = BTreeMap::new();
        for (i, (p, size, key)) in records.iter().enumerate() {
            let partition = p.index(partitions as usize) as i32;
            // Unique payloads, so "exactly once" can be checked by content too.
            let mut payload = format!("{i:04}").into_bytes();
            payload.resize(payload.len() + size, b'x');
            let pos = log.append(OutgoingRecord {
                topic: TOPIC.into(),
                partition: Some(partition),
                key: key.map(|k| vec![b'k'; k]),
                payload: payload.clone(),
                ..Default::default()
            });
            let mine = appended.entry(partition).or_default();
            prop_assert_eq!(pos.offset, mine.len() as i64);
            mine.push(payload);
        }

        // At least one poll in the cycle may take something.
        let mut limits = limits;
        limits[0].0 = limits[0].0.max(1);
        let mut consumer = log.consumer("g", &[TOPIC]);
        let mut received: BTreeMap<i32, Vec<(i64, Vec<u8>)>> = BTreeMap::new();
        let mut left = records.len();
        let mut polls = 0usize;
        let most_polls = (records.len() + 1) * limits.len();
        while left > 0 {
            prop_assert!(polls < most_polls, "{} record(s) never handed out", left);
            let (max_records, max_bytes) = limits[polls % limits.len()];
            polls += 1;
            let limit = PollLimit { records: max_records, bytes: max_bytes };
            let got = block_on(consumer.poll_bounded(limit, Duration::ZERO)).unwrap();
            prop_assert!(got.len() <= max_records, "{} records for a limit of {}", got.len(), max_records);
            let bytes: usize = got.iter().map(|r| r.byte_len()).sum();
            prop_assert!(got.len() <= 1 || bytes <= max_bytes, "{} bytes in {} records for a limit of {}", bytes, got.len(), max_bytes);
            prop_assert_eq!(got.is_empty(), max_records == 0, "progress unless the poll may take nothing");
            // Whether the poll admitted exactly what the limit's rule admits, record by record.
            let mut taken_bytes = 0;
            for (taken, r) in got.iter().enumerate() {
                prop_assert!(limit.admits(taken, taken_bytes, r.byte_len()));
                taken_bytes += r.byte_len();
            }
            for r in got {
                prop_assert_eq!(&*r.position.tp.topic, TOPIC);
                received.entry(r.position.tp.partition).or_default().push((r.position.offset, r.payload));
                left -= 1;
            }
        }
        prop_assert!(block_on(consumer.poll(usize::MAX, Duration::ZERO)).unwrap().is_empty(), "nothing beyond what was appended");
        for (partition, payloads) in &appended {
            let expected: Vec<(i64, Vec<u8>)> = payloads.iter().cloned().enumerate().map(|(o, p)| (o as i64, p)).collect();
            prop_assert_eq!(received.get(partition), Some(&expected), "partition {}", partition);
        }
        prop_assert_eq!(received.len(), appended.len());
    }

    /// `PollLimit::admits` on its own: filling greedily from a queue of sizes
    /// stays within the limits, always takes a first record, and stops only
    /// at the record limit or at a record that would pass the byte limit.
    #[test]
    fn admits_fills_greedily_within_the_limits(
        sizes in proptest::collection::vec(0usize..100, 0..40),
        max_records in 0usize..10,
        max_bytes in 0usize..300,
    ) {
        let limit = PollLimit { records: max_records, bytes: max_bytes };
        let (mut taken, mut bytes) = (0, 0);
        while taken < sizes.len() && limit.admits(taken, bytes, sizes[taken]) {
            bytes += sizes[taken];
            taken += 1;
        }
        prop_assert!(taken <= max_records);
        prop_assert!(taken <= 1 || bytes <= max_bytes);
        if max_records > 0 && !sizes.is_empty() {
            prop_assert!(taken >= 1, "the first record always passes");
        }
        if taken < sizes.len() {
            prop_assert!(taken == max_records || bytes + sizes[taken] > max_bytes, "stopped early at {}", taken);
        }
    }
}

// --------------------------------------------------------------- the ledger

#[derive(Debug, Clone)]
enum LedgerOp {
    Admit(u8),
    Stored(u8),
    Rejected(u8),
}

/// The model: admissions oldest first, each hash at most once, at the place
/// of its latest admission; at most `capacity`, the oldest forgotten first.
struct Model {
    capacity: usize,
    admissions: VecDeque<(u8, Fate)>,
}

impl Model {
    fn fate(&self, h: u8) -> Option<&Fate> {
        self.admissions.iter().find(|(x, _)| *x == h).map(|(_, f)| f)
    }

    fn set(&mut self, h: u8, fate: Fate) {
        if let Some((_, f)) = self.admissions.iter_mut().find(|(x, _)| *x == h) {
            *f = fate;
        }
    }

    fn apply(&mut self, op: &LedgerOp) {
        match op {
            LedgerOp::Admit(h) => {
                self.admissions.retain(|(x, _)| x != h);
                self.admissions.push_back((*h, Fate::Pending));
                while self.admissions.len() > self.capacity {
                    self.admissions.pop_front();
                }
            }
            LedgerOp::Stored(h) => self.set(*h, Fate::Stored),
            LedgerOp::Rejected(h) => self.set(*h, Fate::Rejected(rejection(*h))),
        }
    }
}

fn rejection(h: u8) -> Rejection {
    Rejection::new("embed.rejected", format!("content {h}"))
}

fn hash(h: u8) -> ContentHash {
    ContentHash([h; 32])
}

/// Few distinct hashes, so that re-admissions, evictions and stale queue
/// entries are common.
const HASHES: u8 = 10;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_ledger_behaves_as_a_bounded_fifo_of_admissions(
        capacity in 0usize..8,
        ops in proptest::collection::vec(
            prop_oneof![
                3 => (0..HASHES).prop_map(LedgerOp::Admit),
                2 => (0..HASHES).prop_map(LedgerOp::Stored),
                1 => (0..HASHES).prop_map(LedgerOp::Rejected),
            ],
            0..200,
        ),
    ) {
        let mut ledger = Ledger::new(capacity);
        // A capacity of 0 is taken as 1.
        let mut model = Model { capacity: capacity.max(1), admissions: VecDeque::new() };
        for (i, op) in ops.iter().enumerate() {
            match op {
                LedgerOp::Admit(h) => ledger.admit(hash(*h)),
                LedgerOp::Stored(h) => ledger.stored(&hash(*h)),
                LedgerOp::Rejected(h) => ledger.rejected(&hash(*h), rejection(*h)),
            }
            model.apply(op);
            for h in 0..HASHES {
                prop_assert_eq!(ledger.fate(&hash(h)), model.fate(h), "hash {} after step {} ({:?})", h, i, op);
                let admitted = matches!(model.fate(h), Some(Fate::Pending | Fate::Stored));
                prop_assert_eq!(ledger.is_admitted(&hash(h)), admitted, "hash {} after step {}", h, i);
            }
        }
    }
}
