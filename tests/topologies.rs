//! Golden-file topology tests: every folder under `tests/golden/<name>/`
//! holds an input, a `golden.toml` saying which tables to read, and the
//! expected content of every output a user sees: the store's tables, each
//! output topic of the topology and the dead-letter topic. The input runs
//! through the bundled declaration on the embedded default. Times that come
//! from the clock are left out; everything else is compared. The bundled
//! topologies that read what the topology wrote run after it and are
//! compared the same way (`inference-compensation` after `ensemble-inference`). Run with
//! `UPDATE_GOLDEN=1` to rewrite the expected files after an intended change,
//! and review the diff. A new topology needs only a new folder.

mod common;

use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int64Type};
use hartonomous::dead_letter;
use hartonomous::topology;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    topology: String,
    input: String,
    /// Event fields that come from the clock (at any depth).
    #[serde(default)]
    volatile: Vec<String>,
    #[serde(default)]
    table: Vec<Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    file: String,
    sql: String,
    /// Text columns holding JSON, compared as JSON.
    #[serde(default)]
    json: Vec<String>,
}

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

/// A column with every text type as Utf8, every integer as Int64 and every
/// float as Float64, so that [`cell`] reads each kind one way. Cast once per
/// column, not per cell.
fn normalise(column: &ArrayRef) -> ArrayRef {
    let to = match column.data_type() {
        DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
        DataType::Float32 => DataType::Float64,
        t if t.is_integer() && *t != DataType::Int64 => DataType::Int64,
        _ => return column.clone(),
    };
    arrow::compute::cast(column, &to).unwrap()
}

/// One cell as JSON; a vector (a list of floats) becomes `(norm, head)`.
enum Cell {
    Value(Value),
    Vector { norm: String, head: Vec<String> },
}

/// Cell `i` of a [`normalise`]d column.
fn cell(column: &dyn Array, i: usize, as_json: bool) -> Cell {
    if column.is_null(i) {
        return Cell::Value(Value::Null);
    }
    match column.data_type() {
        DataType::Utf8 => {
            let s = column.as_string::<i32>().value(i).to_string();
            Cell::Value(if as_json { serde_json::from_str(&s).unwrap() } else { Value::String(s) })
        }
        DataType::Boolean => Cell::Value(column.as_boolean().value(i).into()),
        DataType::Float64 => Cell::Value(column.as_primitive::<Float64Type>().value(i).into()),
        DataType::Int64 => Cell::Value(column.as_primitive::<Int64Type>().value(i).into()),
        DataType::List(_) => {
            let values = column.as_list::<i32>().value(i);
            let values = values.as_primitive::<Float32Type>();
            let norm: f32 = values.values().iter().map(|x| x * x).sum::<f32>().sqrt();
            Cell::Vector { norm: format!("{norm:.4}"), head: values.values().iter().take(4).map(|x| format!("{x:.5}")).collect() }
        }
        other => panic!("golden tables cannot compare a {other} column yet"),
    }
}

/// Removes `fields` from `v` and from every object nested in it.
fn drop_fields(v: &mut Value, fields: &[String]) {
    match v {
        Value::Object(o) => {
            for f in fields {
                o.remove(f);
            }
            o.values_mut().for_each(|x| drop_fields(x, fields));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| drop_fields(x, fields)),
        _ => {}
    }
}

async fn run_folder(folder: &Path) {
    let golden: Golden = toml::from_str(&std::fs::read_to_string(folder.join("golden.toml")).unwrap()).unwrap();
    let name = folder.file_name().unwrap().to_str().unwrap();
    assert_eq!(golden.topology, name, "{}: the folder is named after its topology", folder.display());
    let dir = tempfile::tempdir().unwrap();
    let app = hartonomous::app::Embedded::open(&common::profile(dir.path()), hartonomous::clock::system()).unwrap();
    let spec = topology::bundled(&golden.topology).unwrap();
    let input = hartonomous::input::read(&folder.join(&golden.input), &spec.source.topic).unwrap();
    // The topologies that read what this one wrote run after it (as
    // `run --input` does), and their outputs are compared too.
    let chain: Vec<_> = app.run_chain_to_end(&spec, input).await.unwrap().iter().map(|s| topology::bundled(&s.topology).unwrap()).collect();

    for table in &golden.table {
        let mut rows = Vec::new();
        for b in app.store.query(&table.sql).await.unwrap() {
            let columns: Vec<ArrayRef> = b.columns().iter().map(normalise).collect();
            for i in 0..b.num_rows() {
                let mut row = serde_json::Map::new();
                for (c, field) in b.schema().fields().iter().enumerate() {
                    match cell(columns[c].as_ref(), i, table.json.contains(field.name())) {
                        Cell::Value(v) => {
                            row.insert(field.name().clone(), v);
                        }
                        Cell::Vector { norm, head } => {
                            row.insert(format!("{}_norm", field.name()), norm.into());
                            row.insert(format!("{}_head", field.name()), head.into());
                        }
                    }
                }
                rows.push(Value::Object(row).to_string());
            }
        }
        assert!(!rows.is_empty(), "{}: the golden input leaves rows in `{}`", folder.display(), table.file);
        compare(&folder.join(&table.file), &rows);
    }

    for (topic, schema) in chain.iter().flat_map(|spec| spec.topology().unwrap().outputs(spec)) {
        let reader = &hartonomous::avro::Schemas::current(&schema).unwrap().schema;
        let mut events = Vec::new();
        for r in app.log.records(&topic) {
            let (_, v) = hartonomous::avro::decode_message(app.registry.as_ref(), reader, &r.payload).await.unwrap();
            let mut e = hartonomous::avro::avro_to_json(&v);
            drop_fields(&mut e, &golden.volatile);
            e["key"] = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into();
            events.push(e.to_string());
        }
        events.sort();
        assert!(!events.is_empty(), "{}: the golden input publishes on {topic}", folder.display());
        compare(&folder.join(format!("{topic}.expected.jsonl")), &events);
    }

    let mut letters: Vec<String> = app
        .log
        .records(&spec.dead_letter.topic)
        .iter()
        .map(|r| {
            let h = |k| r.headers.get_str(k).unwrap_or("").to_string();
            json!({
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
    assert!(!letters.is_empty(), "{}: the golden input exercises the dead-letter path", folder.display());
    compare(&folder.join("dead_letters.expected.jsonl"), &letters);
}

/// Every folder, and a folder for every bundled topology.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topology_matches_its_golden_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut folders: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    folders.sort();
    for t in topology::TOPOLOGIES {
        assert!(folders.iter().any(|f| f.ends_with(t.name())), "topology {} has no folder tests/golden/{}/", t.name(), t.name());
    }
    for folder in &folders {
        run_folder(folder).await;
    }
}
