//! `hartonomous record` against the real broker, then `replay` of the file on
//! the embedded default (issue 9's acceptance): 10,000 ingestion records
//! recorded with their metadata, replayed twice to the same bytes, the
//! second time with a cassette and no model call; ranges by offset and by
//! time select exactly their records. Needs tests/services.sh.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use common::services::{kafka_addr, kafka_config, require_services, unique};
use hartonomous::avro::{self, FileRegistry, Schemas};
use hartonomous::log::LogProducer;
use hartonomous::log::kafka::KafkaProducer;
use hartonomous::record::{Headers, OutgoingRecord};
use hartonomous::replay::recording::RecordingReader;
use serde_json::json;

const PARTITIONS: i32 = 3;
/// The first record's timestamp; record i is stamped `T0 + 10 * i` ms.
const T0: i64 = 1_764_000_000_000;

fn profile(dir: &Path, embedder: &str) -> std::path::PathBuf {
    let path = dir.join("profile.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[log]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\nsession_timeout_ms = 6000\nheartbeat_interval_ms = 500\n[store]\nkind = \"embedded\"\n[registry]\nkind = \"file\"\npath = \"{}\"\n[embedder]\n{embedder}\n",
            dir.join("data").display(),
            kafka_addr(),
            dir.join("registry.json").display()
        ),
    )
    .unwrap();
    path
}

fn run(profile: &Path, args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_hartonomous")).arg("--connectors").arg(profile).args(args).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert!(o.status.success(), "{args:?} failed:\n{out}\n{err}");
    (out, err)
}

/// What was produced: per partition, (offset → (key, timestamp)).
type Produced = BTreeMap<i32, BTreeMap<i64, (String, i64)>>;

/// `n` records: requests over `n * 9 / 10` distinct texts (the rest repeat
/// earlier ones), and every 50th a malformed record; each with a key, a
/// traceparent header and an increasing timestamp.
async fn produce(dir: &Path, topic: &str, n: usize) -> (Produced, usize, usize, usize) {
    hartonomous::log::kafka::ensure_topics(&kafka_config(), &[(topic, PARTITIONS)]).await.unwrap();
    let registry = FileRegistry::open(dir.join("registry.json")).unwrap();
    let schema = &Schemas::current("AtomIngestionRequest").unwrap().schema;
    let id = registry.register_schema(&Schemas::subject(topic), schema).unwrap();
    let distinct = n * 9 / 10;
    let producer = KafkaProducer::new(&kafka_config()).unwrap();
    let (mut requests, mut malformed) = (0, 0);
    let mut sends = Vec::new();
    for i in 0..n {
        let key = format!("rec-{i}");
        let payload = if i % 50 == 49 {
            malformed += 1;
            format!("not avro {i}").into_bytes()
        } else {
            requests += 1;
            let v = json!({"content_type": "text/plain", "content": format!("recorded content {} {}", i % distinct, "words ".repeat(40)), "metadata": {}, "source_system": "rec", "correlation_id": key});
            avro::encode(id, schema, &avro::json_to_avro(&v, schema).unwrap()).unwrap()
        };
        let mut headers = Headers::new();
        headers.insert("traceparent", format!("00-{:032x}-{:016x}-01", i + 1, i + 1).into_bytes());
        let record = OutgoingRecord { topic: topic.into(), partition: Some(i as i32 % PARTITIONS), key: Some(key.into_bytes()), payload, headers, event_time_ms: Some(T0 + 10 * i as i64) };
        sends.push(record);
        if sends.len() == 1000 || i + 1 == n {
            // Sent together, so librdkafka batches them (one at a time, tansu
            // stores and serves one record per batch, very slowly).
            futures::future::try_join_all(sends.drain(..).map(|r| producer.send(r))).await.unwrap();
        }
    }
    // Offsets per partition, in production order (one partition per record, sent in order).
    let mut produced = Produced::new();
    for i in 0..n {
        let p = i as i32 % PARTITIONS;
        let part = produced.entry(p).or_default();
        let offset = part.len() as i64;
        part.insert(offset, (format!("rec-{i}"), T0 + 10 * i as i64));
    }
    let unique = (0..n).filter(|i| i % 50 != 49).map(|i| i % distinct).collect::<std::collections::BTreeSet<_>>().len();
    (produced, requests, malformed, unique)
}

fn read(file: &Path) -> Vec<hartonomous::record::Record> {
    RecordingReader::open(file).unwrap().map(|e| e.unwrap().record).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_recorded_replay_twice_to_the_same_bytes_the_second_time_without_a_model_call() {
    require_services();
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("record");
    let (produced, requests, malformed, unique_contents) = produce(dir.path(), &topic, 10_000).await;
    let server = common::embedding_server(32);
    let embedder = format!("kind = \"openai\"\nbase_url = \"{}\"\nmodel = \"rec-embed\"\ndimension = 32\nmax_batch = 64", server.url);
    let profile = profile(dir.path(), &embedder);

    // Record the whole topic.
    let file = dir.path().join("all.avro");
    let (out, _) = run(&profile, &["record", "--topic", &topic, "--out", file.to_str().unwrap()]);
    eprintln!("{out}");
    assert!(out.contains("recorded 10000 records"), "{out}");
    let records = read(&file);
    assert_eq!(records.len(), 10_000);
    let mut got = Produced::new();
    for r in &records {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        assert!(got.entry(r.position.tp.partition).or_default().insert(r.position.offset, (key, r.event_time_ms)).is_none(), "a record twice");
        let i: i64 = String::from_utf8(r.key.clone().unwrap()).unwrap()[4..].parse().unwrap();
        assert_eq!(r.headers.get_str("traceparent"), Some(format!("00-{:032x}-{:016x}-01", i + 1, i + 1).as_str()), "headers kept");
    }
    assert_eq!(got, produced, "every record, with its partition, offset, key and timestamp");

    // Replay it twice: the first records the model's answers, the second plays them back.
    let cassette = dir.path().join("cassette.jsonl");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let started = std::time::Instant::now();
    let (first, _) = run(&profile, &["replay", "--input", file.to_str().unwrap(), "--out", a.to_str().unwrap(), "--cassette", cassette.to_str().unwrap()]);
    eprintln!("first replay (recording the cassette) in {:.1} s:\n{first}", started.elapsed().as_secs_f64());
    let calls = server.requests.load(Ordering::SeqCst);
    assert!(calls > 0);
    let started = std::time::Instant::now();
    let (second, _) = run(&profile, &["replay", "--input", file.to_str().unwrap(), "--out", b.to_str().unwrap(), "--cassette", cassette.to_str().unwrap()]);
    eprintln!("second replay (from the cassette) in {:.1} s:\n{second}", started.elapsed().as_secs_f64());
    assert_eq!(server.requests.load(Ordering::SeqCst), calls, "the cassette replay called no model");
    assert!(second.contains(&format!("cassette: {unique_contents} answers played back, 0 not in it")), "{second}");
    let files = |d: &Path| -> BTreeMap<String, Vec<u8>> {
        ["tables", "topics"]
            .iter()
            .flat_map(|s| std::fs::read_dir(d.join(s)).unwrap().map(move |e| (s, e.unwrap())))
            .map(|(s, e)| (format!("{s}/{}", e.file_name().to_string_lossy()), std::fs::read(e.path()).unwrap()))
            .collect()
    };
    let (fa, fb) = (files(&a), files(&b));
    assert!(fa == fb, "the two replays differ");
    let lines = |f: &str| String::from_utf8(fa[f].clone()).unwrap().lines().count();
    assert_eq!(lines("tables/atoms.jsonl"), unique_contents);
    assert_eq!(lines("tables/atom_arrivals.jsonl"), requests);
    assert_eq!(lines("topics/atoms.ingested.jsonl"), requests, "every request answered");
    assert_eq!(lines("topics/atoms.ingest.dlq.jsonl"), malformed, "every malformed record dead-lettered");
    assert_eq!(lines("tables/dead_letters.jsonl"), malformed);

    // An offset range of one partition: exactly those offsets.
    let part = dir.path().join("part.avro");
    let (out, _) = run(&profile, &["record", "--topic", &topic, "--partition", "1", "--from", "100", "--to", "250", "--out", part.to_str().unwrap()]);
    let offsets: Vec<(i32, i64)> = read(&part).iter().map(|r| (r.position.tp.partition, r.position.offset)).collect();
    assert_eq!(offsets, (100..250).map(|o| (1, o)).collect::<Vec<_>>(), "{out}");

    // A time range: exactly the records stamped in [from, to), whatever the
    // broker answers for offsets-for-times (tansu answers 0: the read then
    // starts at each partition's start and skips to the first record in range).
    let (from, to) = (T0 + 10 * 3_000, T0 + 10 * 3_300);
    let times = dir.path().join("times.avro");
    let (out, _) = run(&profile, &["record", "--topic", &topic, "--from", &format!("ms:{from}"), "--to", &format!("ms:{to}"), "--out", times.to_str().unwrap()]);
    eprintln!("{out}");
    let mut keys: Vec<String> = read(&times).iter().map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap()).collect();
    keys.sort();
    let mut want: Vec<String> = (3_000..3_300).map(|i| format!("rec-{i}")).collect();
    want.sort();
    assert_eq!(keys, want, "{out}");
}
