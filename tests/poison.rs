//! Poison records never stop the pipeline (the decode side): a record whose
//! schema id is unknown, resolves to a JSON or Protobuf schema, to an Avro
//! schema with references, to schema text that does not parse, or to a
//! schema of another type, and a record nesting 100,000 levels deep under a
//! recursive writer schema, each become a dead letter with its own reason
//! code, while the good records around them go on. Nothing is fatal.
//!
//! The Confluent cases run against a fake Confluent Schema Registry started
//! by each test (an edge we do not own, so a local HTTP fake is allowed): it
//! answers `GET /schemas/ids/{id}` with whatever the test put under that id
//! and counts the requests. The deep-nesting cases run on tokio worker
//! threads and the test thread, whose stacks are 2 MiB: without the depth
//! bound the test binary would abort with a stack overflow.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::*;
use hartonomous::topology::atom_ingestion::counters;
use hartonomous::avro::confluent::{ConfluentRegistry, ConfluentRegistryConfig};
use hartonomous::avro::depth::MAX_DEPTH;
use hartonomous::avro::{self, ATOM_INGESTED, ATOM_INGESTION_REQUEST, SchemaRegistry, Schemas};
use hartonomous::clock::ManualClock;
use hartonomous::dead_letter;
use hartonomous::flow::runner::Until;
use hartonomous::flow::{Item, Metrics, Stage};
use hartonomous::outcome::Outcome;
use hartonomous::record::{Headers, OutgoingRecord, Position, Record, TopicPartition};
use hartonomous::topology::atom_ingestion::decode::Decode;
use hartonomous::topology::{self, Deps};
use serde_json::json;

const TOPIC: &str = "atoms.ingest";
const DLQ: &str = "atoms.ingest.dlq";
/// How deep the poison record nests.
const DEEP: usize = 100_000;

// --- a fake Confluent registry ----------------------------------------------

/// Answers `GET /schemas/ids/{id}` from `answers` (200 with the JSON body),
/// 404 with the registry's "Schema not found" body otherwise. `POST
/// /subjects/{subject}/versions` (the publish stage registers its event
/// schema) stores the schema under a new id from 1000 on.
#[derive(Default)]
struct FakeRegistry {
    answers: Mutex<HashMap<u32, String>>,
    /// Request paths, without the query.
    log: Mutex<Vec<String>>,
}

impl FakeRegistry {
    fn start() -> (Arc<Self>, String) {
        let fake = Arc::new(Self::default());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let f = fake.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let fake = f.clone();
                std::thread::spawn(move || fake.serve(stream));
            }
        });
        (fake, url)
    }

    fn set(&self, id: u32, answer: serde_json::Value) {
        self.answers.lock().unwrap().insert(id, answer.to_string());
    }

    /// An Avro schema under `id`, as Confluent answers it.
    fn avro(&self, id: u32, schema: &str) {
        self.set(id, json!({ "schema": schema }));
    }

    fn requests(&self, id: u32) -> usize {
        let path = format!("/schemas/ids/{id}");
        self.log.lock().unwrap().iter().filter(|p| **p == path).count()
    }

    fn serve(&self, mut stream: std::net::TcpStream) {
        let mut reader = BufReader::new(&mut stream);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or_default().split('?').next().unwrap_or_default().to_string();
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        self.log.lock().unwrap().push(path.clone());
        let answer = if line.starts_with("POST ") && path.starts_with("/subjects/") {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut answers = self.answers.lock().unwrap();
            let id = 1000 + answers.len() as u32;
            answers.insert(id, json!({"schema": request["schema"]}).to_string());
            Some(json!({ "id": id }).to_string())
        } else {
            path.strip_prefix("/schemas/ids/")
                .and_then(|id| id.parse::<u32>().ok())
                .and_then(|id| self.answers.lock().unwrap().get(&id).cloned())
        };
        let (status, body) = match answer {
            Some(body) => (200, body),
            None => (404, json!({"error_code": 40403, "message": "Schema not found"}).to_string()),
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
}

// --- schemas and records --------------------------------------------------------

/// Ids the fake registry knows, one per case.
const GOOD_V2: u32 = 1;
const GOOD_V1: u32 = 2;
const JSON_SCHEMA: u32 = 3;
const PROTOBUF: u32 = 4;
const REFERENCES: u32 = 5;
const UNPARSABLE: u32 = 6;
const ATOM_INGESTED_ID: u32 = 7;
const PLAIN_STRING: u32 = 8;
const RECURSIVE: u32 = 9;
const UNKNOWN: u32 = 4_040;

fn source(name: &str, version: u32) -> &'static str {
    Schemas::version(name, version).unwrap().source
}

/// The v2 request schema plus a field `tree` whose type refers to itself:
/// `Node {next: ["null", Node]}`. Same record name, so it passes the type
/// check, and data can nest without limit.
fn recursive_request() -> String {
    let mut schema: serde_json::Value = serde_json::from_str(source(ATOM_INGESTION_REQUEST, 2)).unwrap();
    schema["fields"].as_array_mut().unwrap().push(json!({
        "name": "tree",
        "type": {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]},
        "doc": "a linked list, as deep as the producer likes"
    }));
    schema.to_string()
}

/// Puts every case's schema under its id.
fn load(fake: &FakeRegistry) {
    fake.avro(GOOD_V2, source(ATOM_INGESTION_REQUEST, 2));
    fake.avro(GOOD_V1, source(ATOM_INGESTION_REQUEST, 1));
    fake.set(JSON_SCHEMA, json!({"schemaType": "JSON", "schema": r#"{"type":"object","properties":{"content":{"type":"string"}}}"#}));
    fake.set(PROTOBUF, json!({"schemaType": "PROTOBUF", "schema": "syntax = \"proto3\"; message Atom { bytes content = 1; }"}));
    fake.set(
        REFERENCES,
        json!({
            "schema": r#"{"type":"record","name":"AtomIngestionRequest","namespace":"io.hartonomous","fields":[{"name":"meta","type":"io.hartonomous.Meta"}]}"#,
            "references": [{"name": "io.hartonomous.Meta", "subject": "meta-value", "version": 1}]
        }),
    );
    fake.avro(UNPARSABLE, r#"{"type":"record","name":"AtomIngestionRequest","fields":[{"name":"f","type":"no-such-type"}]}"#);
    fake.avro(ATOM_INGESTED_ID, source(ATOM_INGESTED, 1));
    fake.avro(PLAIN_STRING, r#""string""#);
    fake.avro(RECURSIVE, &recursive_request());
}

/// The Avro body of a v2 request (`created_at_ms` null) for `content`.
fn request_body(content: &str, correlation_id: &str) -> Vec<u8> {
    let schema = &Schemas::version(ATOM_INGESTION_REQUEST, 2).unwrap().schema;
    let value = avro::json_to_avro(
        &json!({"content_type": "text/plain", "content": content, "metadata": {"k": "v"}, "source_system": "poison", "correlation_id": correlation_id}),
        schema,
    )
    .unwrap();
    avro::encode(0, schema, &value).unwrap()[avro::wire::HEADER_LEN..].to_vec()
}

/// A request written with `recursive_request`: the v2 fields, then a `tree`
/// of `levels` Nodes (union branch 1 = another Node, 0 = null).
fn recursive_body(content: &str, correlation_id: &str, levels: usize) -> Vec<u8> {
    let mut body = request_body(content, correlation_id);
    body.extend(std::iter::repeat_n(2u8, levels - 1));
    body.push(0);
    body
}

/// Every case as (key, framed payload, expected outcome: `continue` or the
/// reason code). Good records are interleaved with the bad ones.
fn cases() -> Vec<(String, Vec<u8>, &'static str)> {
    let mut out = Vec::new();
    let good = |out: &mut Vec<(String, Vec<u8>, &'static str)>, i: usize| {
        let key = format!("good-{i}");
        let id = if i.is_multiple_of(2) { GOOD_V2 } else { GOOD_V1 };
        let body = if id == GOOD_V2 {
            request_body(&format!("good content {i}"), &key)
        } else {
            // v1 has no created_at_ms: drop the trailing null union index.
            let mut b = request_body(&format!("good content {i}"), &key);
            b.pop();
            b
        };
        out.push((key, avro::wire::frame(id, &body), "continue"));
    };
    let bad: Vec<(&str, u32, Vec<u8>, &'static str)> = vec![
        ("json-schema", JSON_SCHEMA, request_body("a", "b"), "decode.schema_not_avro"),
        ("protobuf", PROTOBUF, vec![0x0a, 0x01, b'x'], "decode.schema_not_avro"),
        ("references", REFERENCES, request_body("a", "b"), "decode.schema_references"),
        ("unparsable", UNPARSABLE, request_body("a", "b"), "decode.schema_unparsable"),
        ("atom-ingested", ATOM_INGESTED_ID, request_body("looks like a request", "x"), "decode.wrong_schema"),
        ("plain-string", PLAIN_STRING, vec![6, b'a', b'b', b'c'], "decode.wrong_schema"),
        ("deep", RECURSIVE, recursive_body("deep", "deep", DEEP), "decode.too_deep"),
        ("just-too-deep", RECURSIVE, recursive_body("deep", "deep", MAX_DEPTH), "decode.too_deep"),
    ];
    let mut i = 0;
    for (key, id, body, code) in bad {
        good(&mut out, i);
        i += 1;
        out.push((key.to_string(), avro::wire::frame(id, &body), code));
    }
    // A recursive writer with shallow data is a good record.
    out.push(("good-recursive".into(), avro::wire::frame(RECURSIVE, &recursive_body("shallow tree", "good-recursive", 3)), "continue"));
    // A burst of one unknown id, good records between.
    for j in 0..200 {
        out.push((format!("unknown-{j}"), avro::wire::frame(UNKNOWN, &request_body("who knows", "u")), "decode.unknown_schema"));
        if j % 50 == 0 {
            good(&mut out, i);
            i += 1;
        }
    }
    good(&mut out, i);
    out
}

fn record(offset: i64, key: &str, payload: Vec<u8>) -> Arc<Record> {
    Arc::new(Record {
        position: Position { tp: TopicPartition::new(TOPIC, 0), offset },
        key: Some(key.as_bytes().to_vec()),
        payload,
        headers: Headers::new(),
        event_time_ms: 1_700_000_000_000 + offset,
    })
}

fn confluent(url: &str, clock: &ManualClock) -> Arc<ConfluentRegistry> {
    let config = ConfluentRegistryConfig { timeout_ms: 5_000, ..ConfluentRegistryConfig::new(url) };
    Arc::new(ConfluentRegistry::with_clock(config, clock.shared()).unwrap())
}

// --- the decode stage --------------------------------------------------------------

#[tokio::test]
async fn every_poison_record_is_rejected_with_its_reason_and_good_ones_decode() {
    let (fake, url) = FakeRegistry::start();
    load(&fake);
    let clock = ManualClock::new(0);
    let registry = confluent(&url, &clock);
    let reader = Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema.clone();
    let mut stage = Decode::new(registry, reader, clock.shared());

    let cases = cases();
    let mut outcomes = Vec::new();
    // In windows of 37, as the runner would cut them; none may be fatal.
    for (w, window) in cases.chunks(37).enumerate() {
        let items = window
            .iter()
            .enumerate()
            .map(|(i, (key, payload, _))| Item { record: record((w * 37 + i) as i64, key, payload.clone()), value: () })
            .collect();
        outcomes.extend(stage.process(items).await.expect("no poison record is fatal"));
    }
    assert_eq!(outcomes.len(), cases.len());
    for ((key, _, expected), outcome) in cases.iter().zip(&outcomes) {
        match outcome {
            Outcome::Continue(req) => {
                assert_eq!(*expected, "continue", "{key}");
                if key.starts_with("good-") {
                    assert_eq!(req.correlation_id, *key);
                }
            }
            Outcome::Invalid(r) => {
                assert_eq!(r.code, *expected, "{key}: {}", r.message);
                assert_eq!(r.attempts, 1, "{key}");
            }
            Outcome::Skip(reason) => panic!("{key}: skipped ({reason})"),
        }
    }
    let message = |key: &str| match &outcomes[cases.iter().position(|(k, _, _)| k == key).unwrap()] {
        Outcome::Invalid(r) => r.message.clone(),
        _ => unreachable!(),
    };
    let wrong = message("atom-ingested");
    assert!(wrong.contains("io.hartonomous.AtomIngested") && wrong.contains("io.hartonomous.AtomIngestionRequest"), "{wrong}");
    assert!(message("plain-string").contains(r#""string""#), "{}", message("plain-string"));
    assert!(message("protobuf").contains("PROTOBUF"), "{}", message("protobuf"));
    assert!(message("deep").contains(&MAX_DEPTH.to_string()), "{}", message("deep"));

    // One request per id: the negative answers and the verdicts are cached
    // (the 200 records with the unknown id cost one request).
    for id in [GOOD_V2, GOOD_V1, JSON_SCHEMA, PROTOBUF, REFERENCES, UNPARSABLE, ATOM_INGESTED_ID, PLAIN_STRING, RECURSIVE, UNKNOWN] {
        assert_eq!(fake.requests(id), 1, "schema id {id}");
    }
}

// --- the whole embedded topology -------------------------------------------------

/// Runs atom ingestion on the embedded default, but with `registry`, over
/// `input`, until drained.
async fn run_with(
    app: &hartonomous::app::Embedded,
    registry: Arc<dyn SchemaRegistry>,
    input: Vec<OutgoingRecord>,
) -> hartonomous::app::Summary {
    let spec = topology::bundled("atom-ingestion").unwrap();
    app.log.create_topic(&spec.source.topic, spec.source.partitions);
    for r in input {
        app.log.append(r);
    }
    let metrics = Arc::new(Metrics::default());
    let deps = Deps {
        producer: Arc::new(app.log.producer()),
        registry,
        store: app.store.clone(),
        inference: app.store.clone(),
        scan: Arc::new(app.log.clone()),
        embedder: app.embedder.clone(),
        clock: app.clock.clone(),
        metrics: metrics.clone(),
        breakers: Default::default(),
        cassette: None,
    };
    let consumer = app.log.consumer(&spec.group(), &[spec.source.topic.as_str()]);
    let report = topology::run(&spec, &deps, consumer, Until::Drained, std::future::pending())
        .await
        .expect("a poison record must not stop the topology");
    hartonomous::app::Summary::new(&spec.name, &metrics, report)
}

/// Dead letters on the DLQ topic, by key → reason; checks each keeps the
/// original bytes and says it came from the decode stage.
fn dead_letters(app: &hartonomous::app::Embedded) -> BTreeMap<String, String> {
    let mut got = BTreeMap::new();
    for r in app.log.records(DLQ) {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        let (topic, partition, offset, stage, _) = dead_letter::provenance(&r).unwrap();
        assert_eq!((topic.as_str(), stage.as_str()), (TOPIC, "decode"), "{key}");
        let source =
            app.log.records(TOPIC).into_iter().find(|s| s.position.tp.partition == partition && s.position.offset == offset).unwrap();
        assert_eq!(source.payload, r.payload, "{key}: the dead letter keeps the original bytes");
        got.insert(key, r.headers.get_str(dead_letter::H_REASON).unwrap().to_string());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_dead_letters_poison_from_a_confluent_registry_and_stores_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path());
    let (fake, url) = FakeRegistry::start();
    load(&fake);
    let registry = confluent(&url, &ManualClock::new(0));

    let cases = cases();
    let input: Vec<OutgoingRecord> = cases.iter().map(|(key, payload, _)| raw_record(TOPIC, key, payload.clone())).collect();
    let summary = run_with(&app, registry, input).await;

    let good = cases.iter().filter(|(_, _, e)| *e == "continue").count();
    let expected: BTreeMap<String, String> =
        cases.iter().filter(|(_, _, e)| *e != "continue").map(|(k, _, e)| (k.clone(), e.to_string())).collect();
    assert_eq!(summary.records_in as usize, cases.len(), "{}", summary.render());
    assert_eq!(summary.count(counters::ATOMS_STORED) as usize, good, "{}", summary.render());
    assert_eq!(summary.dead_lettered as usize, expected.len(), "{}", summary.render());
    assert_eq!(dead_letters(&app), expected);
    assert_eq!(count(&app, "SELECT count(*) FROM atoms").await as usize, good);
    assert_eq!(count(&app, "SELECT count(*) FROM dead_letters WHERE reason LIKE 'decode.%'").await as usize, expected.len());
    assert_eq!(fake.requests(UNKNOWN), 1, "200 records with an unknown id, one request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_dead_letters_poison_from_the_file_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path());
    let spec = topology::bundled("atom-ingestion").unwrap();
    app.register_schemas(&spec).unwrap();
    let subject = Schemas::subject(TOPIC);
    let register = |json: &str| app.registry.register_schema(&subject, &apache_avro::Schema::parse_str(json).unwrap()).unwrap();
    let ingested = register(source(ATOM_INGESTED, 1));
    let string = register(r#""string""#);
    let recursive = register(&recursive_request());
    let v2 = wire_record(&app, TOPIC, ATOM_INGESTION_REQUEST, 2, &request_json(0, "good", "file")).payload;
    let (_, good_body) = avro::split(&v2).unwrap();

    let input = vec![
        raw_record(TOPIC, "good-1", v2.clone()),
        raw_record(TOPIC, "atom-ingested", avro::wire::frame(ingested, good_body)),
        raw_record(TOPIC, "plain-string", avro::wire::frame(string, &[6, b'a', b'b', b'c'])),
        raw_record(TOPIC, "deep", avro::wire::frame(recursive, &recursive_body("deep", "deep", DEEP))),
        raw_record(TOPIC, "good-recursive", avro::wire::frame(recursive, &recursive_body("a shallow tree", "good-recursive", 5))),
        raw_record(TOPIC, "unknown", avro::wire::frame(9_999, good_body)),
    ];
    let summary = app.run_to_end(&spec, input).await.expect("a poison record must not stop the topology");
    assert_eq!(summary.count(counters::ATOMS_STORED), 2, "{}", summary.render());
    let expected: BTreeMap<String, String> = [
        ("atom-ingested", "decode.wrong_schema"),
        ("plain-string", "decode.wrong_schema"),
        ("deep", "decode.too_deep"),
        ("unknown", "decode.unknown_schema"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(dead_letters(&app), expected);
}
