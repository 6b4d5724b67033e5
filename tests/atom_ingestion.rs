//! Atom ingestion end to end on the embedded default: counts, identities,
//! idempotent re-runs, malformed input, events, and the commit rule.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::AsArray;
use common::*;
use hartonomous::topology::atom_ingestion::counters;
use hartonomous::atom::{AtomIngested, ContentHash};
use hartonomous::avro::{self, Schemas};
use hartonomous::dead_letter;
use hartonomous::flow::Metrics;
use hartonomous::flow::runner::Until;
use hartonomous::log::LogProducer;
use hartonomous::record::{OutgoingRecord, Position, TopicPartition};
use hartonomous::topology::{self, Deps};

const TOPIC: &str = "atoms.ingest";
const DLQ: &str = "atoms.ingest.dlq";

/// N requests: `unique` distinct contents, `dups` repeats of earlier contents,
/// and one malformed request of each kind the validate and decode stages know.
fn acceptance_input(unique: usize, dups: usize) -> (Vec<OutgoingRecord>, BTreeSet<String>, usize) {
    let mut recs = Vec::new();
    let mut contents = BTreeSet::new();
    for i in 0..unique {
        let c = format!("document {i}: {}", "lorem ipsum ".repeat(i % 7 + 1));
        contents.insert(c.clone());
        recs.push(json_record(TOPIC, &request_json(i, &c, ["wiki", "crm", "support"][i % 3])));
    }
    for j in 0..dups {
        let i = (j * 7) % unique;
        let c = format!("document {i}: {}", "lorem ipsum ".repeat(i % 7 + 1));
        recs.push(json_record(TOPIC, &request_json(10_000 + j, &c, "mirror")));
    }
    let mut bad = vec![
        serde_json::json!({"content_type": "image/png", "content": "x", "metadata": {}, "source_system": "s", "correlation_id": "bad-type"}),
        serde_json::json!({"content_type": "text/plain", "content": "", "metadata": {}, "source_system": "s", "correlation_id": "bad-empty"}),
        serde_json::json!({"content_type": "text/plain", "content": [255, 254], "metadata": {}, "source_system": "s", "correlation_id": "bad-utf8"}),
        serde_json::json!({"content_type": "text/plain", "content": 42, "metadata": {}, "source_system": "s", "correlation_id": "bad-wrong-type"}),
        serde_json::json!({"content_type": "text/plain", "content": "no source", "metadata": {}, "correlation_id": "bad-missing"}),
        serde_json::json!({"content_type": "text/plain", "content": "x".repeat((1 << 20) + 1), "metadata": {}, "source_system": "s", "correlation_id": "bad-oversize"}),
    ]
    .into_iter()
    .map(|v| json_record(TOPIC, &v))
    .collect::<Vec<_>>();
    let mut syntax = json_record(TOPIC, &serde_json::json!({}));
    syntax.payload = b"{\"content_type\": \"text/plain\", \"content\": ".to_vec();
    bad.push(syntax);
    let b = bad.len();
    // Interleave the bad records so they land in different windows and partitions.
    for (k, r) in bad.into_iter().enumerate() {
        let at = (k * 37) % recs.len();
        recs.insert(at, r);
    }
    (recs, contents, b)
}

/// The events on the output topic by correlation id (one per request: a
/// second answer to the same request in one run would be a bug here).
async fn read_answers(app: &hartonomous::app::Embedded) -> BTreeMap<String, AtomIngested> {
    let reader = &Schemas::current("AtomIngested").unwrap().schema;
    let mut out = BTreeMap::new();
    for r in app.log.records("atoms.ingested") {
        let (_, v) = avro::decode_message(app.registry.as_ref(), reader, &r.payload).await.unwrap();
        let ev: AtomIngested = apache_avro::from_value(&v).unwrap();
        assert!(out.insert(ev.correlation_id.clone(), ev).is_none(), "one answer per request");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_exactly_the_unique_valid_atoms_and_reruns_add_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (unique, dups) = (400, 60);
    let (input, contents, b) = acceptance_input(unique, dups);
    let n = input.len();
    let spec = topology::bundled("atom-ingestion").unwrap();

    let (app, embedder) = app(dir.path());
    let summary = app.run_to_end(&spec, input.clone()).await.unwrap();
    assert_eq!(summary.records_in as usize, n);
    assert_eq!(summary.count(counters::ATOMS_STORED) as usize, unique, "{}", summary.render());
    assert_eq!(counters::duplicates_matched(&summary) as usize, dups);
    assert_eq!(summary.dead_lettered as usize, b);
    assert_eq!(summary.count(counters::EVENTS_PUBLISHED) as usize, unique + dups, "every accepted request is answered");
    assert_eq!(summary.count(counters::ARRIVALS_STORED) as usize, unique + dups);

    // The embedder saw each unique content exactly once, and nothing else.
    let texts = embedder.texts();
    assert_eq!(texts.len(), n - dups - b);
    assert_eq!(texts.iter().cloned().collect::<BTreeSet<_>>(), contents);

    // The store holds N-D-B atoms; every hash is the SHA-256 of its content.
    assert_eq!(count(&app, "SELECT count(*) FROM atoms").await as usize, n - dups - b);
    assert_eq!(count(&app, "SELECT count(DISTINCT content_hash) FROM atoms").await as usize, unique);
    let batches = app.store.query("SELECT content_hash, content FROM atoms").await.unwrap();
    let mut stored = BTreeSet::new();
    for batch in &batches {
        let hashes = batch.column(0).as_string::<i32>();
        let bodies = batch.column(1).as_binary::<i32>();
        for i in 0..batch.num_rows() {
            assert_eq!(hashes.value(i), ContentHash::of(bodies.value(i)).to_hex());
            stored.insert(String::from_utf8(bodies.value(i).to_vec()).unwrap());
        }
    }
    assert_eq!(stored, contents);

    // One arrival per accepted request: `created` for the request that stored
    // each content (whichever partition got there first), `matched` for the others.
    assert_eq!(count(&app, "SELECT count(*) FROM atom_arrivals").await as usize, unique + dups);
    assert_eq!(count(&app, "SELECT count(*) FROM atom_arrivals WHERE outcome = 'created'").await as usize, unique);
    assert_eq!(count(&app, "SELECT count(DISTINCT content_hash) FROM atom_arrivals WHERE outcome = 'created'").await as usize, unique);
    assert_eq!(count(&app, "SELECT count(*) FROM atom_arrivals WHERE outcome = 'matched'").await as usize, dups);
    // Each atom's lineage is its `created` arrival.
    assert_eq!(
        count(&app, "SELECT count(*) FROM atoms a JOIN atom_arrivals r ON a.source_topic = r.source_topic AND a.source_partition = r.source_partition AND a.source_offset = r.source_offset AND a.content_hash = r.content_hash WHERE r.outcome = 'created'").await as usize,
        unique
    );

    // Every accepted request's correlation id is answered exactly once on the
    // output topic; each content has exactly one `created` answer.
    let answers = read_answers(&app).await;
    assert_eq!(answers.len(), unique + dups);
    let ids: BTreeSet<String> = (0..unique).map(|i| format!("req-{i}")).chain((0..dups).map(|j| format!("req-{}", 10_000 + j))).collect();
    assert_eq!(answers.keys().cloned().collect::<BTreeSet<_>>(), ids);
    let mut created = BTreeMap::new();
    for a in answers.values() {
        match a.outcome {
            hartonomous::atom::ArrivalOutcome::Created => *created.entry(a.content_hash.clone()).or_insert(0) += 1,
            hartonomous::atom::ArrivalOutcome::Matched => assert_eq!(a.embedding_dimension, 0, "a repeat costs no embedding"),
        }
    }
    assert_eq!(created.len(), unique);
    assert!(created.values().all(|n| *n == 1));

    // Exactly B dead letters, each with a reason, on the topic and in the archive.
    let dlq = app.log.records(DLQ);
    assert_eq!(dlq.len(), b);
    for r in &dlq {
        let reason = r.headers.get_str(dead_letter::H_REASON).unwrap();
        let error = r.headers.get_str(dead_letter::H_ERROR).unwrap();
        assert!(!reason.is_empty() && !error.is_empty());
    }
    assert_eq!(count(&app, "SELECT count(*) FROM dead_letters WHERE reason <> '' AND error <> ''").await as usize, b);
    let reasons: BTreeSet<String> = dlq.iter().map(|r| r.headers.get_str(dead_letter::H_REASON).unwrap().to_string()).collect();
    let expected: BTreeSet<String> = ["validate.content_type", "validate.empty", "validate.utf8", "decode.json_schema", "validate.too_large", "decode.json_syntax"]
        .map(String::from)
        .into();
    assert_eq!(reasons, expected);

    // A second run over the same input, as a new process would: no atom, no embedding call.
    drop(app);
    let (again, embedder2) = common::app(dir.path());
    let summary2 = again.run_to_end(&spec, input).await.unwrap();
    assert_eq!(summary2.count(counters::ATOMS_STORED), 0, "{}", summary2.render());
    assert_eq!(summary2.count(counters::EMBEDDING_CALLS), 0);
    assert_eq!(summary2.count(counters::ARRIVALS_STORED), 0, "the same positions: every arrival is recorded already");
    assert!(embedder2.texts().is_empty());
    assert_eq!(count(&again, "SELECT count(*) FROM atoms").await as usize, unique);
    assert_eq!(count(&again, "SELECT count(*) FROM atom_arrivals").await as usize, unique + dups);
    // A replay answers every request again, each with the outcome it had.
    let replayed = read_answers(&again).await;
    assert_eq!(replayed.len(), unique + dups);
    assert!(replayed.iter().all(|(id, a)| a.outcome == answers[id].outcome), "outcomes stand on replay");
    assert_eq!(count(&again, "SELECT count(*) FROM dead_letters").await as usize, b, "dead-letter archive is idempotent by position");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_wire_records_are_dead_lettered_with_their_reason_and_good_ones_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path());
    let spec = topology::bundled("atom-ingestion").unwrap();
    app.register_schemas(&spec).unwrap();
    let good = |id: &str, content: serde_json::Value| {
        serde_json::json!({"content_type": "text/plain", "content": content, "metadata": {}, "source_system": "wire", "correlation_id": id})
    };
    let v2 = |id: &str, content: &str| {
        let mut v = good(id, content.into());
        v["created_at_ms"] = 1_700_000_000_000i64.into();
        wire_record(&app, TOPIC, "AtomIngestionRequest", 2, &v)
    };
    let ok_v2 = v2("ok-v2", "written with the current schema");
    let ok_v1 = wire_record(&app, TOPIC, "AtomIngestionRequest", 1, &good("ok-v1", "written with schema version 1".into()));
    let mut bad_magic = v2("bad-magic", "magic byte is wrong");
    bad_magic.payload[0] = 1;
    let mut unknown_id = v2("unknown-id", "schema id nobody registered");
    unknown_id.payload[1..5].copy_from_slice(&9999u32.to_be_bytes());
    let mut truncated = v2("truncated", "this body is cut short");
    truncated.payload.truncate(truncated.payload.len() - 6);
    let header_only = raw_record(TOPIC, "header-only", vec![0, 0]);
    // A valid AtomIngested message on the request topic: the wrong type for this topic.
    let event = AtomIngested {
        content_hash: "ab".into(),
        content_type: "text/plain".into(),
        content_size: 1,
        source_system: "x".into(),
        correlation_id: "wrong-types".into(),
        embedding_model: "m".into(),
        embedding_dimension: 1,
        source_topic: "t".into(),
        source_partition: 0,
        source_offset: 0,
        ingested_at_ms: 0,
        outcome: hartonomous::atom::ArrivalOutcome::Created,
    };
    let ev_schema = &Schemas::current("AtomIngested").unwrap().schema;
    let ev_id = app.registry.register_schema("other-value", ev_schema).unwrap();
    let value = apache_avro::to_value(event).unwrap().resolve(ev_schema).unwrap();
    let wrong_types = raw_record(TOPIC, "wrong-types", avro::encode(ev_id, ev_schema, &value).unwrap());
    let bad_utf8 = wire_record(&app, TOPIC, "AtomIngestionRequest", 2, &good("bad-utf8", serde_json::json!([104, 105, 0xff])));
    let oversize = wire_record(&app, TOPIC, "AtomIngestionRequest", 2, &good("oversize", "y".repeat(2 << 20).into()));

    let expected: BTreeMap<&str, &str> = [
        ("bad-magic", "decode.bad_magic"),
        ("unknown-id", "decode.unknown_schema"),
        ("truncated", "decode.truncated"),
        ("header-only", "decode.truncated"),
        ("wrong-types", "decode.wrong_schema"),
        ("bad-utf8", "validate.utf8"),
        ("oversize", "validate.too_large"),
    ]
    .into();
    let input = vec![ok_v2, bad_magic.clone(), unknown_id, ok_v1, truncated, header_only, wrong_types, bad_utf8, oversize];
    let summary = app.run_to_end(&spec, input).await.unwrap();
    assert_eq!(summary.count(counters::ATOMS_STORED), 2, "{}", summary.render());
    assert_eq!(summary.dead_lettered as usize, expected.len());

    let mut got = BTreeMap::new();
    for r in app.log.records(DLQ) {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        got.insert(key.clone(), r.headers.get_str(dead_letter::H_REASON).unwrap().to_string());
        let (topic, partition, offset, stage, _) = dead_letter::provenance(&r).unwrap();
        assert_eq!(topic, TOPIC);
        let source = app.log.records(TOPIC).into_iter().find(|s| s.position.tp.partition == partition && s.position.offset == offset).unwrap();
        assert_eq!(source.payload, r.payload, "{key}: the dead letter keeps the original bytes");
        assert!(["decode", "validate"].contains(&stage.as_str()));
        assert_eq!(r.headers.get_str(dead_letter::H_ATTEMPTS), Some("1"));
    }
    let expected: BTreeMap<String, String> = expected.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(got, expected);

    // The v1 record decoded with the v2 reader: no created_at, so event time comes from the log.
    let batches = app.store.query("SELECT correlation_id, CAST(event_time AS BIGINT) FROM atoms ORDER BY correlation_id").await.unwrap();
    let ids = batches[0].column(0).as_string::<i32>();
    assert_eq!((ids.value(0), ids.value(1)), ("ok-v1", "ok-v2"));
    let times = batches[0].column(1).as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(times.value(1), 1_700_000_000_000);
    assert!(times.value(0) > 1_700_000_000_000 && times.value(0) != times.value(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_atom_has_an_event_that_decodes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path());
    let spec = topology::bundled("atom-ingestion").unwrap();
    let (input, contents, _) = acceptance_input(50, 10);
    app.run_to_end(&spec, input).await.unwrap();
    let reader = &Schemas::current("AtomIngested").unwrap().schema;
    let mut events = BTreeMap::new();
    let mut matched = 0;
    for r in app.log.records("atoms.ingested") {
        let (_, value) = avro::decode_message(app.registry.as_ref(), reader, &r.payload).await.unwrap();
        let ev: AtomIngested = apache_avro::from_value(&value).unwrap();
        assert_eq!(r.key.as_deref(), Some(ev.content_hash.as_bytes()));
        assert_eq!(ev.source_topic, TOPIC);
        if ev.outcome == hartonomous::atom::ArrivalOutcome::Matched {
            assert_eq!(ev.embedding_dimension, 0);
            matched += 1;
            continue;
        }
        assert_eq!(ev.embedding_dimension, 64);
        assert!(events.insert(ev.content_hash.clone(), ev).is_none(), "one created event per atom");
    }
    assert_eq!(matched, 10, "the repeats are answered too");
    let expected: BTreeSet<String> = contents.iter().map(|c| ContentHash::of(c.as_bytes()).to_hex()).collect();
    assert_eq!(events.keys().cloned().collect::<BTreeSet<_>>(), expected);
    let batches = app.store.query("SELECT content_hash, source_partition, source_offset FROM atoms").await.unwrap();
    for b in &batches {
        for i in 0..b.num_rows() {
            let ev = &events[b.column(0).as_string::<i32>().value(i)];
            assert_eq!(ev.source_partition, b.column(1).as_primitive::<arrow::datatypes::Int32Type>().value(i));
            assert_eq!(ev.source_offset, b.column(2).as_primitive::<arrow::datatypes::Int64Type>().value(i));
        }
    }
}

/// Holds back the dead letter of one source offset until released.
struct GatedProducer {
    inner: hartonomous::log::embedded::EmbeddedProducer,
    hold_offset: String,
    gate: tokio::sync::watch::Receiver<bool>,
}

impl LogProducer for GatedProducer {
    fn send(&self, record: OutgoingRecord) -> futures::future::BoxFuture<'_, Result<Position, hartonomous::log::LogError>> {
        Box::pin(async move {
            if record.headers.get_str(dead_letter::H_OFFSET) == Some(self.hold_offset.as_str()) {
                let mut gate = self.gate.clone();
                gate.wait_for(|open| *open).await.unwrap();
            }
            self.inner.send(record).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_passes_an_unacknowledged_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path());
    let mut spec = topology::bundled("atom-ingestion").unwrap();
    spec.source.partitions = 1;
    spec.window.max_records = 1;
    spec.commit_interval_ms = Some(5);
    app.register_schemas(&spec).unwrap();
    app.log.create_topic(TOPIC, 1);
    for i in 0..20 {
        let mut r = json_record(TOPIC, &request_json(i, &format!("text {i}"), "s"));
        if i == 5 {
            r.payload = b"not json".to_vec();
        }
        app.log.append(r);
    }
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let deps = Deps {
        producer: Arc::new(GatedProducer { inner: app.log.producer(), hold_offset: "5".into(), gate }),
        registry: app.registry.clone(),
        store: app.store.clone(),
        inference: app.store.clone(),
        scan: Arc::new(app.log.clone()),
        embedder: app.embedder.clone(),
        clock: app.clock.clone(),
        metrics: metrics.clone(),
        breakers: Default::default(),
        cassette: None,
    };
    let consumer = app.log.consumer(&spec.group(), &[TOPIC]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let spec2 = spec.clone();
    let run = tokio::spawn(async move {
        topology::run(&spec2, &deps, consumer, Until::Shutdown, async move {
            let _ = stopped.await;
        })
        .await
    });
    let tp = TopicPartition::new(TOPIC, 0);
    let committed = || app.log.committed(&spec.group(), &tp);
    let wait_for = |want: i64| async move {
        for _ in 0..500 {
            if committed() == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("committed offset never reached {want}; it is {:?}", committed());
    };
    wait_for(5).await;
    // Later records are processed meanwhile, but the commit must stay below the held dead letter.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(committed(), Some(5));
    }
    assert!(metrics.value(counters::EVENTS_PUBLISHED) > 5, "later records did progress past the held one");
    assert!(app.log.records(DLQ).is_empty());
    open_gate.send(true).unwrap();
    wait_for(20).await;
    assert_eq!(app.log.records(DLQ).len(), 1);
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
}
