//! Unit tests of the seven atom-ingestion stages, each driven directly
//! through `Stage::process` with hand-built items (no runner, no windows).
//! Fakes for the embedder and the store live at the bottom of this file.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use hartonomous::topology::atom_ingestion::counters;
use hartonomous::atom::{ArrivalOutcome, ArrivalRow, AtomIngested, AtomIngestionRequest, AtomRow, ContentHash, SourcePosition};
use hartonomous::avro::{self, FileRegistry, SchemaRegistry, Schemas};
use hartonomous::clock::{self, ManualClock};
use hartonomous::embed::{EmbedError, Embedder};
use hartonomous::flow::{Item, Metrics, Stage};
use hartonomous::log::embedded::EmbeddedLog;
use hartonomous::outcome::{Fatal, Outcome, Rejection};
use hartonomous::record::{Headers, Position, Record, TopicPartition};
use hartonomous::resilience::{BreakerConfig, CircuitBreaker, Resilient, RetryConfig};
use hartonomous::store::embedded::EmbeddedStore;
use hartonomous::store::{AtomStore, DeadLetterArchive, DeadLetterRow, InsertReport, StoreError};
use hartonomous::topology::atom_ingestion::decode::{self, Decode};
use hartonomous::topology::atom_ingestion::dedup::{self, Admitted, Dedup};
use hartonomous::topology::atom_ingestion::embed::{Embed, Embedded};
use hartonomous::topology::atom_ingestion::hash::{self, Hashed};
use hartonomous::topology::atom_ingestion::ledger::{Fate, Ledger};
use hartonomous::topology::atom_ingestion::persist::{Persist, RecordArrivals, StoreAtoms};
use hartonomous::topology::atom_ingestion::publish::Publish;
use hartonomous::topology::atom_ingestion::validate;
use hartonomous::topology::atom_ingestion::spec::ValidateSpec;
use serde_json::json;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

const TOPIC: &str = "atoms.ingest";
const REQUEST: &str = avro::ATOM_INGESTION_REQUEST;
/// Event time of a record at offset 0; each later offset adds one ms.
const EVENT_TIME_MS: i64 = 1_650_000_000_000;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A record as a consumer would have read it from `TOPIC`.
fn record(partition: i32, offset: i64, key: Option<&str>, payload: Vec<u8>, headers: &[(&str, &str)]) -> Arc<Record> {
    let mut h = Headers::new();
    for (k, v) in headers {
        h.insert(*k, v.as_bytes());
    }
    Arc::new(Record {
        position: Position { tp: TopicPartition::new(TOPIC, partition), offset },
        key: key.map(|k| k.as_bytes().to_vec()),
        payload,
        headers: h,
        event_time_ms: EVENT_TIME_MS + offset,
    })
}

/// A record at `offset` of partition 0 whose bytes do not matter to the stage under test.
fn plain_record(offset: i64) -> Arc<Record> {
    record(0, offset, Some(&format!("k{offset}")), Vec::new(), &[])
}

fn item<T>(record: Arc<Record>, value: T) -> Item<T> {
    Item { record, value }
}

fn request(content_type: &str, content: &[u8]) -> AtomIngestionRequest {
    AtomIngestionRequest {
        content_type: content_type.into(),
        content: content.to_vec(),
        metadata: BTreeMap::from([("origin".to_string(), "unit-test".to_string())]),
        source_system: "tests".into(),
        correlation_id: format!("corr-{}", String::from_utf8_lossy(content)),
        created_at_ms: None,
    }
}

fn hashed(content_type: &str, content: &[u8]) -> Hashed {
    Hashed { request: request(content_type, content), hash: ContentHash::of(content) }
}

/// Text items at offsets 0.. of partition 0.
fn hashed_items(contents: &[&str]) -> Vec<Item<Hashed>> {
    contents.iter().enumerate().map(|(i, c)| item(plain_record(i as i64), hashed("text/plain", c.as_bytes()))).collect()
}

/// One short line per outcome, so a batch's outcomes compare as a list:
/// `continue`, `skip:<reason>` or `invalid:<code>`.
fn summary<T>(outcomes: &[Outcome<T>]) -> Vec<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Continue(_) => "continue".to_string(),
            Outcome::Skip(reason) => format!("skip:{reason}"),
            Outcome::Invalid(r) => format!("invalid:{}", r.code),
        })
        .collect()
}

fn continued<T>(o: Outcome<T>) -> T {
    match o {
        Outcome::Continue(v) => v,
        Outcome::Skip(reason) => panic!("expected Continue, got Skip({reason})"),
        Outcome::Invalid(r) => panic!("expected Continue, got Invalid({r})"),
    }
}

fn rejection<T>(o: &Outcome<T>) -> &Rejection {
    match o {
        Outcome::Invalid(r) => r,
        Outcome::Continue(_) => panic!("expected Invalid, got Continue"),
        Outcome::Skip(reason) => panic!("expected Invalid, got Skip({reason})"),
    }
}

fn resilient(clock: hartonomous::clock::SharedClock) -> Resilient {
    Resilient::new(RetryConfig::default(), Arc::new(CircuitBreaker::new("t", BreakerConfig::default())), clock)
}

fn open_store(dir: &tempfile::TempDir) -> Arc<EmbeddedStore> {
    Arc::new(EmbeddedStore::open(&dir.path().join("data")).unwrap())
}

/// A stored-atom row for `content`, as persist would build it.
fn atom_row(content: &str, offset: i64) -> AtomRow {
    AtomRow {
        content_hash: ContentHash::of(content.as_bytes()),
        content_type: "text/plain".into(),
        content: content.as_bytes().to_vec(),
        source_system: "tests".into(),
        correlation_id: format!("corr-{offset}"),
        metadata_json: "{}".into(),
        embedding: vec![0.25, -0.5, 1.0],
        embedding_model: "fake-model".into(),
        event_time_ms: EVENT_TIME_MS + offset,
        source_topic: TOPIC.into(),
        source_partition: 0,
        source_offset: offset,
        ingested_at_ms: 1_700_000_000_000 + offset,
        trace_id: String::new(),
    }
}

// ---------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------

struct DecodeFixture {
    _dir: tempfile::TempDir,
    v1_id: u32,
    v2_id: u32,
    stage: Decode,
}

fn decode_fixture() -> DecodeFixture {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(FileRegistry::open(dir.path().join("registry.json")).unwrap());
    let regs = registry.register_bundled(&[(TOPIC, REQUEST)]).unwrap();
    let id = |v: u32| regs.iter().find(|r| r.bundle_version == v).unwrap().id;
    let (v1_id, v2_id) = (id(1), id(2));
    assert_ne!(v1_id, v2_id);
    let reader = Schemas::current(REQUEST).unwrap().schema.clone();
    let registry: Arc<dyn SchemaRegistry> = registry;
    DecodeFixture { v1_id, v2_id, stage: Decode::new(registry, reader, clock::system()), _dir: dir }
}

/// `json` encoded with bundled `AtomIngestionRequest` version `version`, framed with `id`.
fn wire(id: u32, version: u32, json: &serde_json::Value) -> Vec<u8> {
    let schema = &Schemas::version(REQUEST, version).unwrap().schema;
    avro::encode(id, schema, &avro::json_to_avro(json, schema).unwrap()).unwrap()
}

fn v1_json(content: &str) -> serde_json::Value {
    json!({
        "content_type": "text/plain",
        "content": content,
        "metadata": {"lang": "en"},
        "source_system": "crm",
        "correlation_id": format!("c-{content}"),
    })
}

fn v2_json(content: &str, created_at_ms: i64) -> serde_json::Value {
    let mut v = v1_json(content);
    v["created_at_ms"] = json!(created_at_ms);
    v
}

fn expected_request(content: &str, created_at_ms: Option<i64>) -> AtomIngestionRequest {
    AtomIngestionRequest {
        content_type: "text/plain".into(),
        content: content.as_bytes().to_vec(),
        metadata: BTreeMap::from([("lang".to_string(), "en".to_string())]),
        source_system: "crm".into(),
        correlation_id: format!("c-{content}"),
        created_at_ms,
    }
}

const JSON_HEADER: &[(&str, &str)] = &[("content-type", decode::JSON_CONTENT_TYPE)];

#[tokio::test]
async fn decode_wire_v2_record_gives_the_request() {
    let mut f = decode_fixture();
    let payload = wire(f.v2_id, 2, &v2_json("hello", 1_700_000_000_123));
    let out = f.stage.process(vec![item(record(0, 0, Some("c-hello"), payload, &[]), ())]).await.unwrap();
    assert_eq!(out, vec![Outcome::Continue(expected_request("hello", Some(1_700_000_000_123)))]);
}

#[tokio::test]
async fn decode_wire_v1_record_reads_with_created_at_none() {
    let mut f = decode_fixture();
    let payload = wire(f.v1_id, 1, &v1_json("old producer"));
    let out = f.stage.process(vec![item(record(0, 0, None, payload, &[]), ())]).await.unwrap();
    assert_eq!(out, vec![Outcome::Continue(expected_request("old producer", None))]);
}

#[tokio::test]
async fn decode_json_record_by_content_type_header() {
    let mut f = decode_fixture();
    let with_time = serde_json::to_vec(&v2_json("from json", 42)).unwrap();
    let without_time = serde_json::to_vec(&v1_json("no time")).unwrap();
    let out = f
        .stage
        .process(vec![item(record(0, 0, None, with_time, JSON_HEADER), ()), item(record(0, 1, None, without_time, JSON_HEADER), ())])
        .await
        .unwrap();
    assert_eq!(out, vec![Outcome::Continue(expected_request("from json", Some(42))), Outcome::Continue(expected_request("no time", None))]);
}

#[tokio::test]
async fn decode_keeps_input_order_and_gives_each_bad_record_its_reason() {
    let mut f = decode_fixture();
    let good_v2 = wire(f.v2_id, 2, &v2_json("one", 1));
    let mut bad_magic = good_v2.clone();
    bad_magic[0] = 7;
    let unknown_schema = wire(9_999, 2, &v2_json("two", 2));
    let cut_in_body = good_v2[..10].to_vec(); // header + 5 bytes: ends inside content_type
    let good_v1 = wire(f.v1_id, 1, &v1_json("three"));
    let good_json = serde_json::to_vec(&v1_json("four")).unwrap();
    let json_schema = serde_json::to_vec(&json!({"content_type": 5, "content": "x", "source_system": "s", "correlation_id": "c"})).unwrap();

    let inputs: Vec<(Vec<u8>, &[(&str, &str)])> = vec![
        (good_v2, &[]),
        (bad_magic, &[]),
        (unknown_schema, &[]),
        (good_json, JSON_HEADER),
        (vec![0, 0, 0], &[]), // shorter than the 5-byte header
        (b"{\"content_type\": ".to_vec(), JSON_HEADER),
        (good_v1, &[]),
        (json_schema, JSON_HEADER),
        (cut_in_body, &[]),
    ];
    let items = inputs.into_iter().enumerate().map(|(i, (p, h))| item(record(0, i as i64, None, p, h), ())).collect();
    let out = f.stage.process(items).await.unwrap();
    assert_eq!(
        summary(&out),
        vec![
            "continue",
            "invalid:decode.bad_magic",
            "invalid:decode.unknown_schema",
            "continue",
            "invalid:decode.truncated",
            "invalid:decode.json_syntax",
            "continue",
            "invalid:decode.json_schema",
            "invalid:decode.truncated",
        ]
    );
    // The good ones are the right requests, in place.
    assert_eq!(out[0], Outcome::Continue(expected_request("one", Some(1))));
    assert_eq!(out[3], Outcome::Continue(expected_request("four", None)));
    assert_eq!(out[6], Outcome::Continue(expected_request("three", None)));
    // Rejected outright: one attempt, with a message for humans.
    for o in out.iter().filter(|o| matches!(o, Outcome::Invalid(_))) {
        let r = rejection(o);
        assert_eq!(r.attempts, 1, "{r}");
        assert!(!r.message.is_empty(), "{r:?}");
    }
    assert!(rejection(&out[2]).message.contains("9999"), "{:?}", rejection(&out[2]));
    assert!(rejection(&out[7]).message.contains("content_type"), "{:?}", rejection(&out[7]));
}

// ---------------------------------------------------------------------------
// validate
// ---------------------------------------------------------------------------

#[tokio::test]
async fn validate_outcomes_align_with_inputs_through_process() {
    let spec = ValidateSpec { max_content_bytes: 16, ..ValidateSpec::default() };
    let mut stage = validate::stage(spec);
    let reqs = vec![
        request("text/plain", b"fine"),
        request("image/png", b"\x89PNG"),
        request("text/markdown", b"# also fine"),
        request("text/plain", b""),
        request("text/plain", b"far too long for the limit"),
        request("text/plain", &[0xff, 0xfe, 0xfd]),
        request("application/json; charset=utf-8", b"{\"ok\":true}"),
    ];
    let items = reqs.iter().cloned().enumerate().map(|(i, r)| item(plain_record(i as i64), r)).collect();
    let out = stage.process(items).await.unwrap();
    assert_eq!(
        summary(&out),
        vec![
            "continue",
            "invalid:validate.content_type",
            "continue",
            "invalid:validate.empty",
            "invalid:validate.too_large",
            "invalid:validate.utf8",
            "continue",
        ]
    );
    // Valid requests pass through unchanged, at their own position.
    for i in [0, 2, 6] {
        assert_eq!(out[i], Outcome::Continue(reqs[i].clone()));
    }
}

// ---------------------------------------------------------------------------
// hash
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hash_is_sha256_of_content_and_request_passes_through() {
    let mut stage = hash::stage();
    let reqs = vec![request("text/plain", b"abc"), request("application/octet-stream", &[0, 1, 2, 255]), request("text/plain", b"")];
    let items = reqs.iter().cloned().enumerate().map(|(i, r)| item(plain_record(i as i64), r)).collect();
    let out = stage.process(items).await.unwrap();
    assert_eq!(out.len(), reqs.len());
    for (o, req) in out.into_iter().zip(&reqs) {
        let h = continued(o);
        let expected = Sha256::digest(&req.content);
        assert_eq!(h.hash.0.as_slice(), expected.as_slice());
        assert_eq!(h.hash.to_hex(), hex::encode(expected.as_slice()));
        assert_eq!(&h.request, req);
    }
    // The well-known SHA-256 test vector, as a guard against comparing a hash with itself.
    assert_eq!(ContentHash::of(b"abc").to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

// ---------------------------------------------------------------------------
// dedup
// ---------------------------------------------------------------------------

fn dedup_stage(store: Arc<dyn AtomStore>, capacity: usize) -> Dedup {
    Dedup { store, ledger: Ledger::shared(capacity), resilient: resilient(clock::system()), metrics: Arc::new(Metrics::default()) }
}

/// One short line per decision: `created`, `created+stored` (a redelivery
/// of the creator: nothing left to store), `matched:<why>`, with
/// `+recorded` when the arrival row exists already.
fn decisions(out: &[Outcome<Admitted>]) -> Vec<String> {
    out.iter()
        .map(|o| match o {
            Outcome::Continue(a) => {
                let mut s = match (a.outcome, a.matched_by) {
                    (ArrivalOutcome::Created, _) if a.store_atom => "created".to_string(),
                    (ArrivalOutcome::Created, _) => "created+stored".to_string(),
                    (ArrivalOutcome::Matched, by) => format!("matched:{}", by.unwrap_or("?")),
                };
                if a.arrival_recorded {
                    s.push_str("+recorded");
                }
                s
            }
            other => summary(std::slice::from_ref(other))[0].clone(),
        })
        .collect()
}

#[tokio::test]
async fn dedup_second_equal_content_in_one_window_is_matched_and_still_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut stage = dedup_stage(open_store(&dir), 100);
    let out = stage.process(hashed_items(&["a", "b", "a", "c", "b"])).await.unwrap();
    assert_eq!(decisions(&out), vec!["created", "created", "matched:duplicate.in_window", "created", "matched:duplicate.in_window"]);
    // Every request goes on (it will be answered); the value carries its own request and hash.
    let all: Vec<Admitted> = out.into_iter().map(continued).collect();
    assert_eq!(all[0].hashed.hash, ContentHash::of(b"a"));
    assert_eq!(all[2].hashed.request, request("text/plain", b"a"));
    assert_eq!(stage.metrics.value(counters::matched(dedup::IN_WINDOW)), 2);
}

#[tokio::test]
async fn dedup_content_admitted_in_an_earlier_window_is_recent() {
    let dir = tempfile::tempdir().unwrap();
    let mut stage = dedup_stage(open_store(&dir), 100);
    let first = stage.process(hashed_items(&["a", "b"])).await.unwrap();
    assert_eq!(decisions(&first), vec!["created", "created"]);
    // Nothing was stored in between: only the ledger knows "a" and "b".
    let second = stage.process(hashed_items(&["c", "a", "b", "c"])).await.unwrap();
    assert_eq!(decisions(&second), vec!["created", "matched:duplicate.recent", "matched:duplicate.recent", "matched:duplicate.in_window"]);
}

#[tokio::test]
async fn dedup_content_in_the_store_is_matched_unless_this_request_created_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    // Stored by the request at partition 0, offset 1 (before a crash, say).
    assert_eq!(store.insert_atoms(&[atom_row("stored before", 1)]).await.unwrap().inserted, 1);
    let mut stage = dedup_stage(store, 100);
    let out = stage.process(hashed_items(&["new", "stored before", "stored before"])).await.unwrap();
    // Offset 1 is the atom's creator redelivered: created again, nothing to store.
    // Offset 2 repeats it, and would whatever the window.
    assert_eq!(decisions(&out), vec!["created", "created+stored", "matched:duplicate.in_store"]);
    let again = stage.process(hashed_items(&["stored before"])).await.unwrap();
    assert_eq!(decisions(&again), vec!["matched:duplicate.in_store"], "offset 0 is another request");
}

#[tokio::test]
async fn dedup_a_recorded_arrival_keeps_its_outcome_on_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.insert_atoms(&[atom_row("x", 5)]).await.unwrap();
    // Offset 0 was answered `matched` and offset 1 `created` before a crash
    // (another process's race put the atom's lineage elsewhere): their
    // recorded outcomes stand, whatever the lineage says now.
    let arrival = |offset: i64, outcome| ArrivalRow {
        source_topic: TOPIC.into(),
        source_partition: 0,
        source_offset: offset,
        content_hash: ContentHash::of(b"x"),
        outcome,
        content_type: "text/plain".into(),
        content_size: 1,
        source_system: "tests".into(),
        correlation_id: format!("c{offset}"),
        event_time_ms: 0,
        arrived_at_ms: 0,
        trace_id: String::new(),
    };
    store.insert_arrivals(&[arrival(0, ArrivalOutcome::Matched), arrival(1, ArrivalOutcome::Created)]).await.unwrap();
    let mut stage = dedup_stage(store, 100);
    let out = stage.process(hashed_items(&["x", "x", "x"])).await.unwrap();
    assert_eq!(decisions(&out), vec!["matched:duplicate.in_store+recorded", "created+stored+recorded", "matched:duplicate.in_store"]);
}

#[tokio::test]
async fn dedup_ledger_is_bounded_so_an_evicted_unstored_content_is_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut stage = dedup_stage(open_store(&dir), 1);
    assert_eq!(decisions(&stage.process(hashed_items(&["a"])).await.unwrap()), vec!["created"]);
    assert_eq!(decisions(&stage.process(hashed_items(&["a"])).await.unwrap()), vec!["matched:duplicate.recent"]);
    // "b" takes the only place; "a" is forgotten and was never stored.
    assert_eq!(decisions(&stage.process(hashed_items(&["b"])).await.unwrap()), vec!["created"]);
    assert_eq!(decisions(&stage.process(hashed_items(&["a"])).await.unwrap()), vec!["created"]);
}

#[tokio::test]
async fn dedup_asks_the_store_once_per_window_and_about_arrivals_only_for_stored_contents() {
    let store = Arc::new(FakeStore::default());
    let mut stage = dedup_stage(store.clone(), 100);
    stage.process(hashed_items(&["a", "b", "a"])).await.unwrap();
    assert_eq!(store.lookups(), vec![vec![ContentHash::of(b"a"), ContentHash::of(b"b")]]);
    assert!(store.arrival_lookups().is_empty(), "nothing stored: no arrival can exist");
    // An empty window makes no call.
    assert!(stage.process(Vec::new()).await.unwrap().is_empty());
    assert_eq!(store.lookups().len(), 1);
}

#[tokio::test]
async fn dedup_fatal_store_error_fails_the_batch() {
    let store = Arc::new(FakeStore { fail_lookups: true, ..FakeStore::default() });
    let mut stage = dedup_stage(store.clone(), 100);
    let err: Fatal = stage.process(hashed_items(&["a", "b"])).await.unwrap_err();
    assert_eq!(err.stage, "dedup");
    assert!(err.message.contains("disk is gone"), "{err}");
    // Fatal is not retried.
    assert_eq!(store.lookups().len(), 1);
    // Nothing was admitted by the failed batch.
    let store_ok: Arc<dyn AtomStore> = Arc::new(FakeStore::default());
    stage.store = store_ok;
    assert_eq!(decisions(&stage.process(hashed_items(&["a"])).await.unwrap()), vec!["created"]);
}

// ---------------------------------------------------------------------------
// embed
// ---------------------------------------------------------------------------

fn embed_stage(embedder: Arc<FakeEmbedder>, concurrency: usize) -> (Embed, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let stage = Embed {
        embedder,
        metrics: metrics.clone(),
        concurrency,
        clock: clock::system(),
        ledger: None,
        outage: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    (stage, metrics)
}

fn embedded(o: Outcome<Embedded>) -> Embedded {
    continued(o)
}

/// New contents, as dedup admits them.
fn admitted(content_type: &str, content: &[u8]) -> Admitted {
    Admitted::created(hashed(content_type, content))
}

fn admitted_items(contents: &[&str]) -> Vec<Item<Admitted>> {
    contents.iter().enumerate().map(|(i, c)| item(plain_record(i as i64), admitted("text/plain", c.as_bytes()))).collect()
}

#[tokio::test]
async fn embed_sends_texts_in_calls_of_max_batch_and_puts_vectors_on_the_right_items() {
    let embedder = FakeEmbedder::new(2, Mode::Normal);
    let (mut stage, metrics) = embed_stage(embedder.clone(), 2);
    let mut repeat = admitted("text/plain", b"already stored");
    repeat.store_atom = false;
    repeat.outcome = ArrivalOutcome::Matched;
    let items = vec![
        item(plain_record(0), admitted("text/plain", b"a")),
        item(plain_record(1), admitted("text/plain", b"bb")),
        item(plain_record(2), admitted("application/octet-stream", &[0xff, 0x00, 0x01])),
        item(plain_record(3), admitted("text/markdown", b"dddd")),
        item(plain_record(4), admitted("application/json", b"{\"e\":5}")),
        item(plain_record(5), admitted("application/octet-stream", b"binary too")),
        item(plain_record(6), admitted("text/plain; charset=utf-8", b"ffffff")),
        item(plain_record(7), repeat),
    ];
    let inputs: Vec<Hashed> = items.iter().map(|i| i.value.hashed.clone()).collect();
    let out = stage.process(items).await.unwrap();
    assert_eq!(out.len(), 8);
    let out: Vec<Embedded> = out.into_iter().map(embedded).collect();
    for (e, input) in out.iter().zip(&inputs) {
        assert_eq!(e.admitted.hashed.hash, input.hash);
        assert_eq!(e.admitted.hashed.request, input.request);
    }
    let lens: Vec<Vec<f32>> = out.iter().map(|e| e.embedding.clone()).collect();
    assert_eq!(lens, vec![vec![1.0, 1.0], vec![2.0, 1.0], vec![], vec![4.0, 1.0], vec![7.0, 1.0], vec![], vec![6.0, 1.0], vec![]]);

    // Only new text was sent (never the repeat), each call within max_batch, every text exactly once.
    let calls = embedder.calls();
    assert!(calls.iter().all(|c| !c.is_empty() && c.len() <= 2), "{calls:?}");
    assert_eq!(calls.len(), 3, "{calls:?}");
    let mut sent: Vec<String> = calls.concat();
    sent.sort();
    assert_eq!(sent, vec!["a", "bb", "dddd", "ffffff", "{\"e\":5}"]);
    assert_eq!(metrics.value(counters::EMBEDDING_CALLS), 3);
    assert_eq!(metrics.value(counters::EMBEDDED_TEXTS), 5);
}

#[tokio::test]
async fn embed_batch_of_only_non_text_makes_no_call() {
    let embedder = FakeEmbedder::new(4, Mode::Normal);
    let (mut stage, metrics) = embed_stage(embedder.clone(), 1);
    let items = vec![item(plain_record(0), admitted("application/octet-stream", b"x")), item(plain_record(1), admitted("image/png", b"y"))];
    let out: Vec<Embedded> = stage.process(items).await.unwrap().into_iter().map(embedded).collect();
    assert!(out.iter().all(|e| e.embedding.is_empty()));
    assert!(embedder.calls().is_empty());
    assert_eq!(metrics.value(counters::EMBEDDING_CALLS), 0);
    assert!(stage.process(Vec::new()).await.unwrap().is_empty());
    assert!(embedder.calls().is_empty());
}

#[tokio::test]
async fn embed_rejected_call_is_split_so_only_the_refused_text_is_invalid() {
    let embedder = FakeEmbedder::new(3, Mode::RefuseBad);
    let (mut stage, metrics) = embed_stage(embedder.clone(), 1);
    let ledger = Ledger::shared(10);
    ledger.lock().unwrap().admit(ContentHash::of(b"this is BAD"));
    stage.ledger = Some(ledger.clone());
    let items = admitted_items(&["ok one", "this is BAD", "ok three", "ok four"]);
    let out = stage.process(items).await.unwrap();
    assert_eq!(summary(&out), vec!["continue", "invalid:embed.rejected", "continue", "continue"]);
    let r = rejection(&out[1]);
    assert_eq!(r.attempts, 1);
    assert!(r.message.contains("BAD is not allowed"), "{r:?}");
    // The ledger remembers the refusal, so a repeat in flight is answered with it.
    assert!(matches!(ledger.lock().unwrap().fate(&ContentHash::of(b"this is BAD")), Some(Fate::Rejected(r)) if r.code == "embed.rejected"));
    let lens: Vec<f32> = out.into_iter().filter_map(|o| if let Outcome::Continue(e) = o { Some(e.embedding[0]) } else { None }).collect();
    assert_eq!(lens, vec![6.0, 8.0, 7.0]);
    // One refused call of three, then one call per text of it, then the last chunk.
    let calls = embedder.calls();
    assert_eq!(
        calls,
        vec![
            vec!["ok one".to_string(), "this is BAD".into(), "ok three".into()],
            vec!["ok one".to_string()],
            vec!["this is BAD".to_string()],
            vec!["ok three".to_string()],
            vec!["ok four".to_string()],
        ]
    );
    assert_eq!(metrics.value(counters::EMBEDDING_CALLS), 5);
    assert_eq!(metrics.value(counters::EMBEDDED_TEXTS), 3);
}

#[tokio::test]
async fn embed_unavailable_service_is_waited_for_and_nothing_is_dead_lettered() {
    // Down for the first three calls that carry the marker, then back.
    let embedder = FakeEmbedder::new(2, Mode::DownFor("DOWN", 3));
    let clock = ManualClock::new(0);
    let (mut stage, metrics) = embed_stage(embedder.clone(), 2);
    stage.clock = clock.shared();
    let items = vec![
        item(plain_record(0), admitted("text/plain", b"first")),
        item(plain_record(1), admitted("application/octet-stream", b"not sent")),
        item(plain_record(2), admitted("text/plain", b"DOWN here")),
        item(plain_record(3), admitted("text/plain", b"third")),
        item(plain_record(4), admitted("text/plain", b"fourth")),
    ];
    let task = tokio::spawn(async move { stage.process(items).await });
    // Time passes only on the manual clock: each round of the outage waits on it.
    while !task.is_finished() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        clock.advance(std::time::Duration::from_secs(1));
    }
    let out = task.await.unwrap().unwrap();
    assert_eq!(summary(&out), vec!["continue"; 5], "an outage is backpressure, never a dead letter");
    let out: Vec<Embedded> = out.into_iter().map(embedded).collect();
    assert_eq!(out[0].embedding, vec![5.0, 1.0]);
    assert_eq!(out[2].embedding, vec![9.0, 1.0]);
    // The chunk with the marker was tried until it worked (3 failures + 1).
    let tries = embedder.calls().iter().filter(|c| c.iter().any(|t| t.contains("DOWN"))).count();
    assert_eq!(tries, 4);
    assert_eq!(metrics.value(counters::EMBEDDED_TEXTS), 4);
}

#[tokio::test]
async fn embed_misconfigured_model_is_fatal() {
    let embedder = FakeEmbedder::new(2, Mode::Misconfigured);
    let (mut stage, _) = embed_stage(embedder, 1);
    let err = stage.process(admitted_items(&["a", "b", "c"])).await.unwrap_err();
    assert_eq!(err.stage, "embed");
    assert!(err.message.contains("wrong dimension"), "{err}");
}

#[tokio::test]
async fn embed_wrong_number_of_vectors_is_fatal() {
    let embedder = FakeEmbedder::new(4, Mode::DropLast);
    let (mut stage, _) = embed_stage(embedder, 1);
    let err = stage.process(admitted_items(&["a", "b"])).await.unwrap_err();
    assert_eq!(err.stage, "embed");
    assert!(err.message.contains("1 vectors for 2 texts"), "{err}");
}

// ---------------------------------------------------------------------------
// persist
// ---------------------------------------------------------------------------

const NOW_MS: i64 = 1_700_000_500_000;
const MODEL: &str = "fake-embedder-v1";

fn persist_stage(store: Arc<dyn AtomStore>, clock: &ManualClock) -> (Persist, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let stage = Persist {
        store,
        resilient: resilient(clock.shared()),
        metrics: metrics.clone(),
        clock: clock.shared(),
        embedding_model: MODEL.into(),
        embedding_dimension: 2,
        ledger: None,
        looked_up: true,
    };
    (stage, metrics)
}

fn new_atom(h: Hashed, embedding: Vec<f32>) -> Embedded {
    Embedded { admitted: Admitted::created(h), embedding }
}

/// Three new contents from different positions: one with `created_at_ms` and
/// a trace, one without either, and one binary (not embedded).
fn persist_items() -> Vec<Item<Embedded>> {
    let mut with_time = hashed("text/plain", b"alpha");
    with_time.request.created_at_ms = Some(1_690_000_000_000);
    with_time.request.metadata = BTreeMap::from([("b".to_string(), "2".to_string()), ("a".to_string(), "quote \" here".to_string())]);
    let mut no_metadata = hashed("text/plain", b"beta");
    no_metadata.request.metadata.clear();
    let binary = hashed("application/octet-stream", &[0xde, 0xad]);
    vec![
        item(record(3, 41, Some("k41"), b"orig".to_vec(), &[("traceparent", TRACEPARENT)]), new_atom(with_time, vec![0.5, -0.25])),
        item(record(0, 7, None, Vec::new(), &[]), new_atom(no_metadata, vec![1.0, 2.0])),
        item(record(1, 9, None, Vec::new(), &[("other", "x")]), new_atom(binary, Vec::new())),
    ]
}

async fn stored_atoms(store: &EmbeddedStore) -> Vec<AtomRow> {
    use arrow::array::AsArray;
    let sql = "SELECT content_hash, content_type, content, source_system, correlation_id, metadata, embedding, embedding_model, \
               CAST(event_time AS BIGINT), source_topic, source_partition, source_offset, CAST(ingested_at AS BIGINT), trace_id \
               FROM atoms ORDER BY source_partition DESC, source_offset";
    let mut rows = Vec::new();
    for b in store.query(sql).await.unwrap() {
        for i in 0..b.num_rows() {
            let s = |c: usize| b.column(c).as_string::<i32>().value(i).to_string();
            let embedding = b.column(6).as_list::<i32>().value(i);
            rows.push(AtomRow {
                content_hash: ContentHash::from_hex(&s(0)).unwrap(),
                content_type: s(1),
                content: b.column(2).as_binary::<i32>().value(i).to_vec(),
                source_system: s(3),
                correlation_id: s(4),
                metadata_json: s(5),
                embedding: embedding.as_primitive::<arrow::datatypes::Float32Type>().values().to_vec(),
                embedding_model: s(7),
                event_time_ms: b.column(8).as_primitive::<arrow::datatypes::Int64Type>().value(i),
                source_topic: s(9),
                source_partition: b.column(10).as_primitive::<arrow::datatypes::Int32Type>().value(i),
                source_offset: b.column(11).as_primitive::<arrow::datatypes::Int64Type>().value(i),
                ingested_at_ms: b.column(12).as_primitive::<arrow::datatypes::Int64Type>().value(i),
                trace_id: s(13),
            });
        }
    }
    rows
}

#[tokio::test]
async fn persist_rows_carry_lineage_metadata_event_time_and_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    let clock = ManualClock::new(NOW_MS);
    let (mut stage, metrics) = persist_stage(store.clone(), &clock);
    let out = stage.process(persist_items()).await.unwrap();
    let events: Vec<AtomIngested> = out.into_iter().map(continued).collect();

    let expected = vec![
        AtomRow {
            content_hash: ContentHash::of(b"alpha"),
            content_type: "text/plain".into(),
            content: b"alpha".to_vec(),
            source_system: "tests".into(),
            correlation_id: "corr-alpha".into(),
            metadata_json: r#"{"a":"quote \" here","b":"2"}"#.into(),
            embedding: vec![0.5, -0.25],
            embedding_model: MODEL.into(),
            event_time_ms: 1_690_000_000_000, // from created_at_ms
            source_topic: TOPIC.into(),
            source_partition: 3,
            source_offset: 41,
            ingested_at_ms: NOW_MS,
            trace_id: TRACEPARENT.split('-').nth(1).unwrap().into(),
        },
        AtomRow {
            content_hash: ContentHash::of(&[0xde, 0xad]),
            content_type: "application/octet-stream".into(),
            content: vec![0xde, 0xad],
            source_system: "tests".into(),
            correlation_id: format!("corr-{}", String::from_utf8_lossy(&[0xde, 0xad])),
            metadata_json: r#"{"origin":"unit-test"}"#.into(),
            embedding: Vec::new(),
            embedding_model: String::new(), // nothing embedded, no model recorded
            event_time_ms: EVENT_TIME_MS + 9,
            source_topic: TOPIC.into(),
            source_partition: 1,
            source_offset: 9,
            ingested_at_ms: NOW_MS,
            trace_id: String::new(),
        },
        AtomRow {
            content_hash: ContentHash::of(b"beta"),
            content_type: "text/plain".into(),
            content: b"beta".to_vec(),
            source_system: "tests".into(),
            correlation_id: "corr-beta".into(),
            metadata_json: "{}".into(),
            embedding: vec![1.0, 2.0],
            embedding_model: MODEL.into(),
            event_time_ms: EVENT_TIME_MS + 7, // the record's event time
            source_topic: TOPIC.into(),
            source_partition: 0,
            source_offset: 7,
            ingested_at_ms: NOW_MS,
            trace_id: String::new(),
        },
    ];
    assert_eq!(stored_atoms(&store).await, expected);
    // metadata_json is the JSON of the map.
    let parsed: BTreeMap<String, String> = serde_json::from_str(&expected[0].metadata_json).unwrap();
    assert_eq!(parsed, persist_items()[0].value.admitted.hashed.request.metadata);
    assert_eq!(metrics.value(counters::ATOMS_STORED), 3);
    assert_eq!(store.arrival_count(), 3, "each request has its arrival");
    assert_eq!(metrics.value(counters::ARRIVALS_STORED), 3);

    // The answers: created, with the request's own position and the embedding's shape.
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.outcome == ArrivalOutcome::Created && e.ingested_at_ms == NOW_MS));
    assert_eq!((events[0].source_partition, events[0].source_offset, events[0].embedding_dimension), (3, 41, 2));
    assert_eq!(events[0].embedding_model, MODEL);
    assert_eq!((events[2].embedding_model.as_str(), events[2].embedding_dimension), ("", 0), "binary: not embedded");

    // The clock, not the wall, stamps ingestion.
    clock.advance(std::time::Duration::from_secs(5));
    let later = stage.process(vec![item(plain_record(50), new_atom(hashed("text/plain", b"gamma"), vec![1.0]))]).await.unwrap();
    assert_eq!(continued(later.into_iter().next().unwrap()).ingested_at_ms, NOW_MS + 5_000);
}

#[tokio::test]
async fn persist_repeats_store_only_their_arrival_and_are_answered_matched() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    let clock = ManualClock::new(NOW_MS);
    let (mut stage, metrics) = persist_stage(store.clone(), &clock);
    let mut repeat = Admitted::created(hashed("text/plain", b"alpha"));
    repeat.outcome = ArrivalOutcome::Matched;
    repeat.matched_by = Some(dedup::IN_WINDOW);
    repeat.store_atom = false;
    let mut items = persist_items();
    items.push(item(record(3, 42, None, Vec::new(), &[]), Embedded { admitted: repeat, embedding: Vec::new() }));
    let out: Vec<AtomIngested> = stage.process(items).await.unwrap().into_iter().map(continued).collect();
    assert_eq!(store.atom_count(), 3);
    assert_eq!(store.arrival_count(), 4);
    let answer = &out[3];
    assert_eq!((answer.outcome, answer.source_offset, answer.embedding_dimension), (ArrivalOutcome::Matched, 42, 0));
    assert_eq!(answer.content_hash, ContentHash::of(b"alpha").to_hex());
    // A replay: every request still answered, nothing new stored.
    let again = stage.process(persist_items()).await.unwrap();
    assert_eq!(summary(&again), vec!["continue"; 3]);
    assert_eq!(metrics.value(counters::ATOMS_STORED), 3);
    assert_eq!(store.atom_count(), 3);
    assert_eq!(store.arrival_count(), 4);
}

/// A repeat, in the same window, of `persist_items`' "beta".
fn repeat_of_beta() -> Item<Embedded> {
    let mut repeat = Admitted::created(hashed("text/plain", b"beta"));
    repeat.outcome = ArrivalOutcome::Matched;
    repeat.matched_by = Some(dedup::IN_WINDOW);
    repeat.store_atom = false;
    item(record(0, 8, None, Vec::new(), &[]), Embedded { admitted: repeat, embedding: Vec::new() })
}

#[tokio::test]
async fn persist_row_rejected_by_the_store_is_isolated_and_its_repeats_answer_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let inner = open_store(&dir);
    let poison = ContentHash::of(b"beta");
    let store = Arc::new(FakeStore { inner: Some(inner.clone()), reject: Some(poison), ..FakeStore::default() });
    let clock = ManualClock::new(NOW_MS);
    let (mut stage, metrics) = persist_stage(store.clone(), &clock);
    let ledger = Ledger::shared(10);
    for i in persist_items() {
        ledger.lock().unwrap().admit(i.value.admitted.hashed.hash);
    }
    stage.ledger = Some(ledger.clone());
    // A repeat of the poison content in the same window.
    let mut items = persist_items();
    items.push(repeat_of_beta());
    let out = stage.process(items).await.unwrap();
    assert_eq!(summary(&out), vec!["continue", "invalid:persist.rejected", "continue", "invalid:persist.rejected"]);
    let r = rejection(&out[1]);
    assert_eq!(r.attempts, 1);
    assert!(r.message.contains(&poison.to_hex()), "{r:?}");
    assert!(rejection(&out[3]).message.contains("same content as an earlier request"), "{:?}", rejection(&out[3]));
    assert_eq!(continued(out[0].clone()).content_hash, ContentHash::of(b"alpha").to_hex());
    assert_eq!(metrics.value(counters::ATOMS_STORED), 2);
    assert_eq!(inner.atom_count(), 2);
    assert_eq!(inner.arrival_count(), 2, "dead-lettered requests have no arrival");
    assert!(inner.existing_hashes(&[poison]).await.unwrap().is_empty());
    assert_eq!(ledger.lock().unwrap().fate(&ContentHash::of(b"alpha")), Some(&Fate::Stored));
    // The whole batch first, then one row at a time.
    assert_eq!(store.insert_sizes(), vec![3, 1, 1, 1]);
}

/// The topology runs persist as two stages (atoms, then arrivals) so that
/// one window's arrivals overlap the next window's atoms. Together they
/// answer as the one stage does, the arrivals wait for the atoms, and the
/// arrivals and events carry the time the atoms were stored at.
#[tokio::test]
async fn persist_as_two_stages_answers_as_one_and_stores_atoms_first() {
    let window = |store: &Arc<dyn AtomStore>, clock: &ManualClock| {
        let (mut stage, metrics) = persist_stage(store.clone(), clock);
        let ledger = Ledger::shared(10);
        for i in persist_items() {
            ledger.lock().unwrap().admit(i.value.admitted.hashed.hash);
        }
        stage.ledger = Some(ledger);
        let mut items = persist_items();
        items.push(repeat_of_beta());
        (stage, metrics, items)
    };
    let poison = ContentHash::of(b"beta");

    let one_dir = tempfile::tempdir().unwrap();
    let one_inner = open_store(&one_dir);
    let one_store: Arc<dyn AtomStore> = Arc::new(FakeStore { inner: Some(one_inner.clone()), reject: Some(poison), ..FakeStore::default() });
    let (mut one, _, items) = window(&one_store, &ManualClock::new(NOW_MS));
    let expected = one.process(items).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let inner = open_store(&dir);
    let store: Arc<dyn AtomStore> = Arc::new(FakeStore { inner: Some(inner.clone()), reject: Some(poison), ..FakeStore::default() });
    let clock = ManualClock::new(NOW_MS);
    let (stage, metrics, items) = window(&store, &clock);
    let records: Vec<_> = items.iter().map(|i| i.record.clone()).collect();
    let stage = Arc::new(stage);
    let stored = StoreAtoms(stage.clone()).process(items).await.unwrap();
    assert_eq!(inner.atom_count(), 2, "atoms first");
    assert_eq!(inner.arrival_count(), 0, "no arrival before the arrivals stage");
    assert_eq!(metrics.value(counters::ATOMS_STORED), 2);
    clock.advance(std::time::Duration::from_secs(3));
    let mut outcomes: Vec<Option<Outcome<AtomIngested>>> = Vec::new();
    let mut live = Vec::new();
    for (record, o) in records.into_iter().zip(stored) {
        match o {
            Outcome::Continue(v) => {
                outcomes.push(None);
                live.push(Item { record, value: v });
            }
            Outcome::Invalid(r) => outcomes.push(Some(Outcome::Invalid(r))),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    let mut answered = RecordArrivals(stage).process(live).await.unwrap().into_iter();
    let got: Vec<Outcome<AtomIngested>> = outcomes.into_iter().map(|o| o.unwrap_or_else(|| answered.next().unwrap())).collect();
    assert_eq!(summary(&got), vec!["continue", "invalid:persist.rejected", "continue", "invalid:persist.rejected"]);
    assert_eq!(summary(&got), summary(&expected));
    for (g, e) in got.iter().zip(&expected) {
        match (g, e) {
            (Outcome::Continue(g), Outcome::Continue(e)) => assert_eq!(g, e, "events stamped with the atoms' time, NOW_MS"),
            (Outcome::Invalid(g), Outcome::Invalid(e)) => assert_eq!((&g.code, &g.message), (&e.code, &e.message)),
            _ => unreachable!(),
        }
    }
    assert_eq!((inner.atom_count(), inner.arrival_count()), (one_inner.atom_count(), one_inner.arrival_count()));
    assert_eq!(inner.arrival_count(), 2);
    assert_eq!(metrics.value(counters::ARRIVALS_STORED), 2);
}

#[tokio::test]
async fn persist_fatal_store_error_fails_the_batch() {
    let store = Arc::new(FakeStore { fail_inserts: true, ..FakeStore::default() });
    let clock = ManualClock::new(NOW_MS);
    let (mut stage, metrics) = persist_stage(store.clone(), &clock);
    let err = stage.process(persist_items()).await.unwrap_err();
    assert_eq!(err.stage, "persist");
    assert_eq!(store.insert_sizes(), vec![3]);
    assert_eq!(metrics.value(counters::ATOMS_STORED), 0);
}

// ---------------------------------------------------------------------------
// publish
// ---------------------------------------------------------------------------

const OUT_TOPIC: &str = "atoms.ingested";

fn event(content: &str, offset: i64, outcome: ArrivalOutcome) -> AtomIngested {
    AtomIngested {
        content_hash: ContentHash::of(content.as_bytes()).to_hex(),
        content_type: "text/plain".into(),
        content_size: content.len() as i64,
        source_system: "tests".into(),
        correlation_id: format!("corr-{offset}"),
        embedding_model: if outcome == ArrivalOutcome::Created { "fake-model".into() } else { String::new() },
        embedding_dimension: if outcome == ArrivalOutcome::Created { 3 } else { 0 },
        source_topic: TOPIC.into(),
        source_partition: 0,
        source_offset: offset,
        ingested_at_ms: 1_700_000_000_000 + offset,
        outcome,
    }
}

#[tokio::test]
async fn publish_one_decodable_event_per_item_keyed_by_hash_with_trace() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
    let clock = ManualClock::new(NOW_MS);
    let log = EmbeddedLog::new(clock.shared());
    log.create_topic(OUT_TOPIC, 1);
    let metrics = Arc::new(Metrics::default());
    let mut stage = Publish::new(Arc::new(log.producer()), &registry, OUT_TOPIC, avro::ATOM_INGESTED, resilient(clock.shared()), metrics.clone())
        .await
        .unwrap();

    let mut events = vec![event("alpha", 0, ArrivalOutcome::Created), event("beta", 1, ArrivalOutcome::Created), event("alpha", 2, ArrivalOutcome::Matched)];
    events[2].source_partition = 4;
    let records = vec![
        record(0, 0, Some("k0"), b"in-0".to_vec(), &[("traceparent", TRACEPARENT), ("content-type", "application/json")]),
        record(0, 1, None, b"in-1".to_vec(), &[]),
        record(4, 2, None, b"in-2".to_vec(), &[("other", "x")]),
    ];
    let items = records.into_iter().zip(events.iter().cloned()).map(|(r, e)| item(r, e)).collect();
    let out = stage.process(items).await.unwrap();
    assert_eq!(out, vec![Outcome::Continue(()); 3]);
    assert_eq!(metrics.value(counters::EVENTS_PUBLISHED), 3);

    let published = log.records(OUT_TOPIC);
    assert_eq!(published.len(), 3);
    let reader = &Schemas::current(avro::ATOM_INGESTED).unwrap().schema;
    for (rec, sent) in published.iter().zip(&events) {
        assert_eq!(rec.key.as_deref(), Some(sent.content_hash.as_bytes()), "keyed by content hash");
        let (id, value) = avro::decode_message(&registry, reader, &rec.payload).await.unwrap();
        assert_eq!(id, registry.list()[0].id, "framed with the id of the topic's subject");
        let back: AtomIngested = apache_avro::from_value(&value).unwrap();
        assert_eq!(&back, sent);
        assert_eq!(rec.event_time_ms, sent.ingested_at_ms);
    }
    // The event schema is registered under the topic's subject.
    let subjects: Vec<String> = registry.list().into_iter().map(|r| r.subject).collect();
    assert_eq!(subjects, vec![Schemas::subject(OUT_TOPIC)]);

    // Only `traceparent` is copied, and only where the source had one.
    assert_eq!(published[0].headers.get_str("traceparent"), Some(TRACEPARENT));
    assert_eq!(published[0].headers.iter().count(), 1);
    assert!(published[1..].iter().all(|r| r.headers.iter().count() == 0));

    // A reader still on version 1 of the schema decodes version-2 events (it ignores `outcome`).
    let v1 = &Schemas::version(avro::ATOM_INGESTED, 1).unwrap().schema;
    let (_, old) = avro::decode_message(&registry, v1, &published[2].payload).await.unwrap();
    let old = apache_avro::from_value::<AtomIngested>(&old).unwrap();
    assert_eq!(old.source_offset, 2);
}

#[tokio::test]
async fn publish_empty_batch_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
    let log = EmbeddedLog::new(clock::system());
    let metrics = Arc::new(Metrics::default());
    let mut stage = Publish::new(Arc::new(log.producer()), &registry, OUT_TOPIC, avro::ATOM_INGESTED, resilient(clock::system()), metrics.clone())
        .await
        .unwrap();
    assert!(stage.process(Vec::new()).await.unwrap().is_empty());
    assert!(log.records(OUT_TOPIC).is_empty());
    assert_eq!(metrics.value(counters::EVENTS_PUBLISHED), 0);
}

// ---------------------------------------------------------------------------
// Fakes
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Mode {
    /// Every text gets `[len, 1.0]`.
    Normal,
    /// A call containing a text with "BAD" is refused as a whole.
    RefuseBad,
    /// A call containing a text with the marker fails as unavailable this many times, then works.
    DownFor(&'static str, u32),
    Misconfigured,
    /// Returns one vector too few.
    DropLast,
}

/// An embedder that records every call and answers by `Mode`.
struct FakeEmbedder {
    max_batch: usize,
    mode: Mode,
    calls: Mutex<Vec<Vec<String>>>,
    failures: Mutex<u32>,
}

impl FakeEmbedder {
    fn new(max_batch: usize, mode: Mode) -> Arc<Self> {
        Arc::new(Self { max_batch, mode, calls: Mutex::default(), failures: Mutex::default() })
    }

    fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }
}

impl Embedder for FakeEmbedder {
    fn model(&self) -> &str {
        "fake"
    }
    fn dimension(&self) -> usize {
        2
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        self.calls.lock().unwrap().push(texts.to_vec());
        let vectors = || texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect::<Vec<_>>();
        let result = match self.mode {
            Mode::Normal => Ok(vectors()),
            Mode::RefuseBad if texts.iter().any(|t| t.contains("BAD")) => Err(EmbedError::Rejected { message: "400: BAD is not allowed".into() }),
            Mode::RefuseBad => Ok(vectors()),
            Mode::DownFor(marker, times) if texts.iter().any(|t| t.contains(marker)) => {
                let mut failures = self.failures.lock().unwrap();
                if *failures < times {
                    *failures += 1;
                    Err(EmbedError::Unavailable { message: "503 service unavailable".into(), attempts: 4 })
                } else {
                    Ok(vectors())
                }
            }
            Mode::DownFor(..) => Ok(vectors()),
            Mode::Misconfigured => Err(EmbedError::Misconfigured { message: "wrong dimension 3, expected 2".into() }),
            Mode::DropLast => {
                let mut v = vectors();
                v.pop();
                Ok(v)
            }
        };
        Box::pin(async move { result })
    }
}

/// A store that records what it is asked. It stores into `inner` when given
/// one (otherwise it pretends), refuses every insert that includes the
/// `reject` hash, and fails look-ups or inserts as unusable on demand.
#[derive(Default)]
struct FakeStore {
    inner: Option<Arc<EmbeddedStore>>,
    reject: Option<ContentHash>,
    fail_lookups: bool,
    fail_inserts: bool,
    lookups: Mutex<Vec<Vec<ContentHash>>>,
    arrival_lookups: Mutex<Vec<usize>>,
    inserts: Mutex<Vec<usize>>,
}

impl FakeStore {
    fn lookups(&self) -> Vec<Vec<ContentHash>> {
        self.lookups.lock().unwrap().clone()
    }

    fn arrival_lookups(&self) -> Vec<usize> {
        self.arrival_lookups.lock().unwrap().clone()
    }

    fn insert_sizes(&self) -> Vec<usize> {
        self.inserts.lock().unwrap().clone()
    }
}

impl AtomStore for FakeStore {
    fn find_atoms<'a>(&'a self, hashes: &'a [ContentHash]) -> BoxFuture<'a, Result<HashMap<ContentHash, Vec<SourcePosition>>, StoreError>> {
        self.lookups.lock().unwrap().push(hashes.to_vec());
        Box::pin(async move {
            if self.fail_lookups {
                return Err(StoreError::Fatal("disk is gone".into()));
            }
            match &self.inner {
                Some(inner) => inner.find_atoms(hashes).await,
                None => Ok(HashMap::new()),
            }
        })
    }

    fn arrival_outcomes<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, ArrivalOutcome>, StoreError>> {
        self.arrival_lookups.lock().unwrap().push(positions.len());
        Box::pin(async move {
            match &self.inner {
                Some(inner) => inner.arrival_outcomes(positions).await,
                None => Ok(HashMap::new()),
            }
        })
    }

    fn insert_arrivals<'a>(&'a self, rows: &'a [ArrivalRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(async move {
            match &self.inner {
                Some(inner) => inner.insert_arrivals(rows).await,
                None => Ok(InsertReport { inserted: rows.len(), already_present: 0 }),
            }
        })
    }

    fn insert_atoms<'a>(&'a self, rows: &'a [AtomRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        self.inserts.lock().unwrap().push(rows.len());
        Box::pin(async move {
            if self.fail_inserts {
                return Err(StoreError::Fatal("schema mismatch".into()));
            }
            if let Some(bad) = self.reject.filter(|h| rows.iter().any(|r| r.content_hash == *h)) {
                return Err(StoreError::RowRejected(format!("atom {bad}: value out of range")));
            }
            match &self.inner {
                Some(inner) => inner.insert_atoms(rows).await,
                None => Ok(InsertReport { inserted: rows.len(), already_present: 0 }),
            }
        })
    }
}

impl DeadLetterArchive for FakeStore {
    fn insert_dead_letters<'a>(&'a self, rows: &'a [DeadLetterRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(async move { Ok(InsertReport { inserted: rows.len(), already_present: 0 }) })
    }
}

// ---------------------------------------------------------------------------
// across stages
// ---------------------------------------------------------------------------

#[tokio::test]
async fn embed_treats_media_types_case_insensitively() {
    let req = request("TEXT/PLAIN", b"hello");
    assert!(validate::check(&ValidateSpec::default(), &req).is_ok(), "validate accepts it as text/plain");
    let embedder = FakeEmbedder::new(4, Mode::Normal);
    let (mut stage, _) = embed_stage(embedder.clone(), 1);
    let out = stage.process(vec![item(plain_record(0), Admitted::created(Hashed { hash: ContentHash::of(&req.content), request: req }))]).await.unwrap();
    let e = continued(out.into_iter().next().unwrap());
    assert_eq!(embedder.calls(), vec![vec!["hello".to_string()]]);
    assert_eq!(e.embedding, vec![5.0, 1.0]);
}

#[tokio::test]
async fn a_content_dead_lettered_downstream_is_admitted_afresh_when_it_comes_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    let mut dedup = dedup_stage(store.clone(), 100);
    let (mut embed, _) = embed_stage(FakeEmbedder::new(4, Mode::RefuseBad), 1);
    embed.ledger = Some(dedup.ledger.clone());
    let admitted: Vec<Item<Admitted>> =
        dedup.process(hashed_items(&["BAD for now"])).await.unwrap().into_iter().map(|o| item(plain_record(0), continued(o))).collect();
    let out = embed.process(admitted).await.unwrap();
    assert_eq!(summary(&out), vec!["invalid:embed.rejected"]);
    assert_eq!(store.atom_count(), 0, "dead-lettered, never stored");
    let replay = dedup.process(hashed_items(&["BAD for now"])).await.unwrap();
    assert_eq!(decisions(&replay), vec!["created"]);
}

/// Answers `Unavailable` for the first `failures` look-ups, then delegates.
struct FlakyRegistry {
    inner: Arc<FileRegistry>,
    failures: Mutex<u32>,
    calls: Mutex<u32>,
}

impl SchemaRegistry for FlakyRegistry {
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Arc<apache_avro::Schema>, hartonomous::avro::RegistryError>> {
        *self.calls.lock().unwrap() += 1;
        let fail = {
            let mut f = self.failures.lock().unwrap();
            let fail = *f > 0;
            *f = f.saturating_sub(1);
            fail
        };
        if fail {
            return Box::pin(async { Err(hartonomous::avro::RegistryError::Unavailable("registry restarting".into())) });
        }
        self.inner.schema_by_id(id)
    }

    fn register(&self, subject: &str, schema: &apache_avro::Schema) -> BoxFuture<'_, Result<u32, hartonomous::avro::RegistryError>> {
        self.inner.register(subject, schema)
    }
}

#[tokio::test]
async fn decode_retries_an_unavailable_registry_instead_of_dead_lettering() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(FileRegistry::open(dir.path().join("registry.json")).unwrap());
    let regs = file.register_bundled(&[(TOPIC, REQUEST)]).unwrap();
    let v2_id = regs.iter().find(|r| r.bundle_version == 2).unwrap().id;
    let flaky = Arc::new(FlakyRegistry { inner: file, failures: Mutex::new(2), calls: Mutex::new(0) });
    let reader = Schemas::current(REQUEST).unwrap().schema.clone();
    let mut stage = Decode::new(flaky.clone(), reader, clock::system());
    let payload = wire(v2_id, 2, &v2_json("through a flaky registry", 1_700_000_000_000));
    let out = stage.process(vec![item(record(0, 0, None, payload, &[]), ())]).await.unwrap();
    assert_eq!(summary(&out), vec!["continue"]);
    assert_eq!(*flaky.calls.lock().unwrap(), 3, "two failed look-ups, then the one that worked");
}
