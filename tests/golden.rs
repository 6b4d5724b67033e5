//! Golden-file topology tests: each folder under `tests/golden/<topology>/`
//! holds `input.jsonl` and every output the embedded default must produce
//! from it: `atoms.expected.jsonl` and `atom_arrivals.expected.jsonl` (the
//! store's tables), `events.expected.jsonl` (the output topic) and
//! `dead_letters.expected.jsonl` (the dead-letter topic). Times that come
//! from the clock are left out; everything else is compared. Run with
//! `UPDATE_GOLDEN=1` to rewrite the expected files after an intended change,
//! and review the diff.

mod common;

use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::{Float32Type, Int32Type, Int64Type};
use hartonomous::dead_letter;
use hartonomous::topology;

fn compare(path: &Path, actual: &[String]) {
    let text = actual.iter().map(|l| format!("{l}\n")).collect::<String>();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1 to create it", path.display()));
    let exp: Vec<&str> = expected.lines().collect();
    for (i, (e, a)) in exp.iter().zip(actual).enumerate() {
        assert_eq!(e, a, "{} line {}", path.display(), i + 1);
    }
    assert_eq!(exp.len(), actual.len(), "{}: expected {} lines, got {}", path.display(), exp.len(), actual.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atom_ingestion_golden() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/atom-ingestion");
    let dir = tempfile::tempdir().unwrap();
    let app = hartonomous::app::Embedded::open(&common::profile(dir.path()), hartonomous::clock::system()).unwrap();
    let spec = topology::bundled("atom-ingestion").unwrap();
    let input = hartonomous::input::read(&golden.join("input.jsonl"), &spec.source.topic).unwrap();
    app.run_to_end(&spec, input).await.unwrap();

    let sql = "SELECT content_hash, content_type, source_system, correlation_id, metadata, source_partition, source_offset, \
               embedding_model, embedding_dimension, embedding FROM atoms ORDER BY content_hash";
    let mut atoms = Vec::new();
    for b in app.store.query(sql).await.unwrap() {
        for i in 0..b.num_rows() {
            let s = |c: usize| b.column(c).as_string::<i32>().value(i).to_string();
            let embedding = b.column(9).as_list::<i32>().value(i);
            let embedding = embedding.as_primitive::<Float32Type>();
            let norm: f32 = embedding.values().iter().map(|x| x * x).sum::<f32>().sqrt();
            let head: Vec<String> = embedding.values().iter().take(4).map(|x| format!("{x:.5}")).collect();
            atoms.push(
                serde_json::json!({
                    "content_hash": s(0),
                    "content_type": s(1),
                    "source_system": s(2),
                    "correlation_id": s(3),
                    "metadata": serde_json::from_str::<serde_json::Value>(&s(4)).unwrap(),
                    "source": format!("{}/{}", b.column(5).as_primitive::<Int32Type>().value(i), b.column(6).as_primitive::<Int64Type>().value(i)),
                    "embedding_model": s(7),
                    "embedding_dimension": b.column(8).as_primitive::<arrow::datatypes::UInt32Type>().value(i),
                    "embedding_norm": format!("{norm:.4}"),
                    "embedding_head": head,
                })
                .to_string(),
            );
        }
    }
    compare(&golden.join("atoms.expected.jsonl"), &atoms);

    let sql = "SELECT source_partition, source_offset, content_hash, outcome, content_type, content_size, source_system, correlation_id \
               FROM atom_arrivals ORDER BY source_partition, source_offset";
    let mut arrivals = Vec::new();
    for b in app.store.query(sql).await.unwrap() {
        for i in 0..b.num_rows() {
            let s = |c: usize| b.column(c).as_string::<i32>().value(i).to_string();
            arrivals.push(
                serde_json::json!({
                    "source": format!("{}/{}", b.column(0).as_primitive::<Int32Type>().value(i), b.column(1).as_primitive::<Int64Type>().value(i)),
                    "content_hash": s(2),
                    "outcome": s(3),
                    "content_type": s(4),
                    "content_size": b.column(5).as_primitive::<arrow::datatypes::UInt64Type>().value(i),
                    "source_system": s(6),
                    "correlation_id": s(7),
                })
                .to_string(),
            );
        }
    }
    compare(&golden.join("atom_arrivals.expected.jsonl"), &arrivals);

    let reader = &hartonomous::avro::Schemas::current("AtomIngested").unwrap().schema;
    let publish = spec.stage(|s| if let topology::spec::StageSpec::Publish(p) = s { Some(p) } else { None }).unwrap();
    let mut events = Vec::new();
    for r in app.log.records(&publish.topic) {
        let (_, v) = hartonomous::avro::decode_message(app.registry.as_ref(), reader, &r.payload).await.unwrap();
        let mut e = hartonomous::avro::avro_to_json(&v);
        e.as_object_mut().unwrap().remove("ingested_at_ms");
        e["key"] = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into();
        events.push(e.to_string());
    }
    events.sort();
    compare(&golden.join("events.expected.jsonl"), &events);
    assert_eq!(events.len(), arrivals.len(), "one event per arrival");

    let mut letters: Vec<String> = app
        .log
        .records(&spec.dead_letter.topic)
        .iter()
        .map(|r| {
            let h = |k| r.headers.get_str(k).unwrap_or("").to_string();
            serde_json::json!({
                "source": format!("{}/{}", h(dead_letter::H_PARTITION), h(dead_letter::H_OFFSET)),
                "key": String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
                "stage": h(dead_letter::H_STAGE),
                "reason": h(dead_letter::H_REASON),
                "error": h(dead_letter::H_ERROR),
                "attempts": h(dead_letter::H_ATTEMPTS),
            })
            .to_string()
        })
        .collect();
    letters.sort();
    compare(&golden.join("dead_letters.expected.jsonl"), &letters);
    assert!(atoms.len() > 0 && letters.len() > 0, "the golden input exercises both paths");
}
