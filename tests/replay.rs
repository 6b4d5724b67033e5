//! `hartonomous replay` on the embedded default (no servers): two replays of
//! one input write the same bytes, `--expect` catches a changed output, a
//! recording keeps its writer schema ids, and a cassette replay calls no
//! model. The recording of a real topic is in tests/kafka_record.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use hartonomous::avro::{self, Schemas};
use hartonomous::record::{Headers, Position, Record, TopicPartition};
use hartonomous::replay::recording::{RecordingInfo, RecordingWriter, wire_schema_id};
use serde_json::{Value, json};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hartonomous"));
    c.env_remove("HARTONOMOUS_CONNECTORS").env_remove("HARTONOMOUS_DATA_DIR");
    c
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/demo-atoms.jsonl")
}

/// Every file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for sub in ["tables", "topics"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let e = e.unwrap();
            out.insert(format!("{sub}/{}", e.file_name().to_string_lossy()), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

#[test]
fn two_replays_write_the_same_bytes_and_expect_catches_a_changed_output() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let o = bin().current_dir(dir.path()).args(["replay", "--input", demo().to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("tables/atoms.jsonl: 16 lines") && stdout.contains("topics/atoms.ingest.dlq.jsonl: 6 lines"), "{stdout}");
    }
    let (ta, tb) = (tree(&a), tree(&b));
    assert_eq!(ta, tb, "two replays of one input differ");
    // Every output a user sees is there, with rows.
    for f in ["tables/atoms.jsonl", "tables/atom_arrivals.jsonl", "tables/dead_letters.jsonl", "topics/atoms.ingested.jsonl", "topics/atoms.ingest.dlq.jsonl"] {
        assert!(ta.get(f).is_some_and(|b| !b.is_empty()), "{f} missing or empty: {:?}", ta.keys());
    }
    // Nothing was left in the working directory: replays use a scratch store.
    assert!(!dir.path().join("hartonomous-data").exists());

    let ok = bin().args(["replay", "--input", demo().to_str().unwrap(), "--expect", a.to_str().unwrap()]).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("outputs match"));

    // One changed field in one event, and one dead letter removed.
    let events = a.join("topics/atoms.ingested.jsonl");
    let text = std::fs::read_to_string(&events).unwrap();
    let changed = text.replacen("\"CREATED\"", "\"MATCHED\"", 1);
    assert!(changed != text, "the events carry outcomes");
    std::fs::write(&events, changed).unwrap();
    let letters = a.join("topics/atoms.ingest.dlq.jsonl");
    let text = std::fs::read_to_string(&letters).unwrap();
    std::fs::write(&letters, text.lines().skip(1).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let bad = bin().args(["replay", "--input", demo().to_str().unwrap(), "--expect", a.to_str().unwrap()]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1), "a difference exits with 1");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("topics/atoms.ingested.jsonl: 21 expected lines, 21 actual; 1 missing, 1 unexpected"), "{err}");
    assert!(err.contains("topics/atoms.ingest.dlq.jsonl: 5 expected lines, 6 actual; 0 missing, 1 unexpected"), "{err}");
    assert!(err.lines().any(|l| l.starts_with("  - ") && l.contains("\"MATCHED\"")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("  + ") && l.contains("\"CREATED\"")), "{err}");
}

fn entry(partition: i32, offset: i64, payload: Vec<u8>, key: &str) -> Record {
    let mut headers = Headers::new();
    headers.insert("traceparent", format!("00-{:032x}-{:016x}-01", offset + 1, offset + 1).into_bytes());
    Record { position: Position { tp: TopicPartition::new("prod.requests", partition), offset }, key: Some(key.as_bytes().to_vec()), payload, headers, event_time_ms: 1_764_000_000_000 + offset }
}

/// A recording of `n` requests written with writer schema id 1 (as a
/// production registry numbered the current schema; a fresh registry gives
/// id 1 to the oldest bundled version, so the recorded id must win), a repeat, and one record naming id 99,
/// which the recording has no schema for.
fn write_recording(path: &Path, n: usize) -> usize {
    let info = RecordingInfo { format_version: 1, topic: "prod.requests".into(), from: None, to: None, partitions: vec![0, 1, 2, 3], recorded_at_ms: 1_764_000_100_000, tool: "test".into() };
    let mut w = RecordingWriter::create(path, &info).unwrap();
    let schema = &Schemas::current("AtomIngestionRequest").unwrap().schema;
    let mut offsets = [0i64; 4];
    let mut put = |w: &mut RecordingWriter, i: usize, payload: Vec<u8>| {
        let p = i % 4;
        let id = wire_schema_id(&payload).unwrap();
        let with = (id == 1 && w.needs_schema(id)).then(|| (id, schema.canonical_form()));
        w.append(&entry(p as i32, offsets[p], payload, &format!("r-{i}")), with).unwrap();
        offsets[p] += 1;
    };
    for i in 0..n {
        let v = json!({"content_type": "text/plain", "content": format!("recorded text {}", i % (n - 1)), "metadata": {}, "source_system": "prod", "correlation_id": format!("r-{i}")});
        let value = avro::json_to_avro(&v, schema).unwrap();
        put(&mut w, i, avro::encode(1, schema, &value).unwrap());
    }
    put(&mut w, n, vec![0, 0, 0, 0, 99, 2, 2]);
    w.finish().unwrap() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_replays_with_its_writer_schema_ids_and_its_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rec.avro");
    assert_eq!(write_recording(&file, 40), 41);
    let profile = common::profile(&dir.path().join("unused"));
    let spec = hartonomous::topology::bundled("atom-ingestion").unwrap();
    let first = hartonomous::replay::replay_file(&profile, &spec, &file, None, None).await.unwrap();
    let second = hartonomous::replay::replay_file(&profile, &spec, &file, None, None).await.unwrap();
    assert_eq!(first.records, 41);
    assert_eq!(first.outputs, second.outputs, "two replays of one recording differ");
    assert_eq!(first.now_ms, 1_764_000_100_000, "the clock is frozen at the recording's time");
    let o = &first.outputs;
    // 40 requests over 39 distinct texts (the last repeats the first).
    assert_eq!(o["tables/atoms.jsonl"].len(), 39);
    assert_eq!(o["tables/atom_arrivals.jsonl"].len(), 40);
    assert_eq!(o["topics/atoms.ingested.jsonl"].len(), 40, "every request is answered");
    let letters = &o["topics/atoms.ingest.dlq.jsonl"];
    assert_eq!(letters.len(), 1);
    assert!(letters[0].contains("unknown") && letters[0].contains("99"), "{}", letters[0]);
    // The recorded partitions (4, more than the declaration's 3) are kept,
    // and the trace context travels to the events.
    let partitions: std::collections::BTreeSet<i64> =
        o["tables/atom_arrivals.jsonl"].iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["source_partition"].as_i64().unwrap()).collect();
    assert_eq!(partitions, (0..4).collect());
    assert!(o["topics/atoms.ingested.jsonl"].iter().all(|l| l.contains("\"traceparent\"")));
}

#[test]
fn a_cassette_replay_calls_no_model_and_a_missing_answer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::embedding_server(16);
    let profile = dir.path().join("profile.toml");
    std::fs::write(
        &profile,
        format!(
            "[log]\nkind = \"embedded\"\n[store]\nkind = \"embedded\"\n[embedder]\nkind = \"openai\"\nbase_url = \"{}\"\nmodel = \"test-embed\"\ndimension = 16\nmax_batch = 4\n",
            server.url
        ),
    )
    .unwrap();
    let cassette = dir.path().join("cassette.jsonl");
    let replay = |out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["--connectors", profile.to_str().unwrap(), "replay", "--input", demo().to_str().unwrap(), "--out", out.to_str().unwrap()]);
        c.args(extra);
        c.output().unwrap()
    };
    // First: no cassette file yet, so the model is called and every answer kept.
    let rec = replay(&dir.path().join("a"), &["--cassette", cassette.to_str().unwrap()]);
    assert!(rec.status.success(), "{}", String::from_utf8_lossy(&rec.stderr));
    let called = server.requests.load(Ordering::SeqCst);
    assert!(called > 0, "recording calls the model");
    let entries = std::fs::read_to_string(&cassette).unwrap().lines().count();
    assert_eq!(entries, 16, "one answer per distinct content embedded");
    // Then: played back, no call, the same bytes.
    let play = replay(&dir.path().join("b"), &["--cassette", cassette.to_str().unwrap()]);
    assert!(play.status.success(), "{}", String::from_utf8_lossy(&play.stderr));
    assert_eq!(server.requests.load(Ordering::SeqCst), called, "a cassette replay calls no model");
    assert!(String::from_utf8_lossy(&play.stdout).contains("cassette: 16 answers played back, 0 not in it"), "{}", String::from_utf8_lossy(&play.stdout));
    assert_eq!(tree(&dir.path().join("a")), tree(&dir.path().join("b")));

    // A cassette without one answer: named and failed by default, called with --on-missing call.
    let text = std::fs::read_to_string(&cassette).unwrap();
    let short = dir.path().join("short.jsonl");
    std::fs::write(&short, text.lines().skip(1).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let fail = replay(&dir.path().join("c"), &["--cassette", short.to_str().unwrap()]);
    assert!(!fail.status.success());
    let err = String::from_utf8_lossy(&fail.stderr);
    assert!(err.contains("has no embedding for `embedding/test-embed/16/") && err.contains("--on-missing call"), "{err}");
    let before = server.requests.load(Ordering::SeqCst);
    let call = replay(&dir.path().join("d"), &["--cassette", short.to_str().unwrap(), "--on-missing", "call"]);
    assert!(call.status.success(), "{}", String::from_utf8_lossy(&call.stderr));
    assert_eq!(server.requests.load(Ordering::SeqCst), before + 1, "only the missing answer is asked for");
    assert_eq!(std::fs::read_to_string(&short).unwrap(), text, "the answer it called for is kept");
    assert_eq!(tree(&dir.path().join("a")), tree(&dir.path().join("d")));
}
