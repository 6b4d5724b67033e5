//! Every output of a finished embedded run as sorted text files, and the
//! readable diff of two such sets (`replay --out`, `replay --expect`).
//!
//! The files, one JSON object per line, lines sorted, so that two runs over
//! the same input compare byte for byte whatever order work finished in:
//! - `tables/<table>.jsonl`: every row of every store table. A float vector
//!   (an embedding) is written as its length and the SHA-256 of its
//!   little-endian f32 bytes: exact, and a line stays short.
//! - `topics/<topic>.jsonl`: every event on each output topic: partition,
//!   key, headers and the value decoded with the topic's schema.
//! - `topics/<dead-letter topic>.jsonl`: every dead letter: partition, key,
//!   headers (the provenance and the reason) and the original bytes in hex.
//!
//! Offsets of the output topics are left out: they number events in the
//! order they were produced, which concurrent stages do not fix.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::avro::SchemaRegistry;
use crate::log::embedded::EmbeddedLog;
use crate::store::embedded::EmbeddedStore;

/// One output file: its path under the output directory and its lines.
pub type Outputs = BTreeMap<String, Vec<String>>;

/// Dumps the store's tables and the given topics. `topics` pairs each output
/// topic with the bundled schema its events are decoded with; `dead_letter_topics`
/// are written as bytes.
pub async fn collect(
    store: &EmbeddedStore,
    log: &EmbeddedLog,
    registry: &dyn SchemaRegistry,
    topics: &[(String, String)],
    dead_letter_topics: &[String],
) -> anyhow::Result<Outputs> {
    let mut out = Outputs::new();
    let tables = store.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name").await?;
    let mut names = Vec::new();
    for b in &tables {
        let col = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        names.extend(col.as_string::<i32>().iter().flatten().map(str::to_string));
    }
    for table in names {
        let mut lines = Vec::new();
        for b in store.query(&format!("SELECT * FROM {table}")).await? {
            let columns: Vec<(String, ArrayRef)> = b.schema().fields().iter().zip(b.columns()).map(|(f, c)| (f.name().clone(), c.clone())).collect();
            for i in 0..b.num_rows() {
                let mut row = serde_json::Map::new();
                for (name, col) in &columns {
                    row.insert(name.clone(), cell(col.as_ref(), i)?);
                }
                lines.push(Value::Object(row).to_string());
            }
        }
        lines.sort();
        out.insert(format!("tables/{table}.jsonl"), lines);
    }
    for (topic, schema) in topics {
        let reader = &crate::avro::Schemas::current(schema).ok_or_else(|| anyhow::anyhow!("no bundled schema {schema}"))?.schema;
        let mut lines = Vec::new();
        for r in log.records(topic) {
            let value = match crate::avro::decode_message(registry, reader, &r.payload).await {
                Ok((_, v)) => crate::avro::avro_to_json(&v),
                Err(e) => json!({ "undecodable": e.to_string(), "bytes_hex": hex::encode(&r.payload) }),
            };
            lines.push(json!({ "partition": r.position.tp.partition, "key": text(r.key.as_deref()), "headers": headers(&r.headers), "value": value }).to_string());
        }
        lines.sort();
        out.insert(format!("topics/{topic}.jsonl"), lines);
    }
    for topic in dead_letter_topics {
        let mut lines: Vec<String> = log
            .records(topic)
            .iter()
            .map(|r| json!({ "partition": r.position.tp.partition, "key": text(r.key.as_deref()), "headers": headers(&r.headers), "value_hex": hex::encode(&r.payload) }).to_string())
            .collect();
        lines.sort();
        out.insert(format!("topics/{topic}.jsonl"), lines);
    }
    Ok(out)
}

/// Text as text, other bytes as `hex:…`, absent as null.
fn text(bytes: Option<&[u8]>) -> Value {
    match bytes {
        None => Value::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => s.into(),
            Err(_) => format!("hex:{}", hex::encode(b)).into(),
        },
    }
}

fn headers(h: &crate::record::Headers) -> Value {
    Value::Array(h.iter().map(|(k, v)| json!([k, text(v)])).collect())
}

/// Cell `i` of `column` as JSON.
fn cell(column: &dyn Array, i: usize) -> anyhow::Result<Value> {
    if column.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match column.data_type() {
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(_, _) => {
            let values = match column.data_type() {
                DataType::List(_) => column.as_list::<i32>().value(i),
                DataType::LargeList(_) => column.as_list::<i64>().value(i),
                _ => column.as_fixed_size_list().value(i),
            };
            match values.data_type() {
                DataType::Float32 => vector(values.as_primitive::<Float32Type>().values().iter().flat_map(|x| x.to_le_bytes()).collect(), values.len()),
                DataType::Float64 => vector(values.as_primitive::<Float64Type>().values().iter().flat_map(|x| x.to_le_bytes()).collect(), values.len()),
                _ => Value::Array((0..values.len()).map(|j| cell(values.as_ref(), j)).collect::<anyhow::Result<_>>()?),
            }
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            let b = arrow::compute::cast(&column.slice(i, 1), &DataType::Binary)?;
            format!("hex:{}", hex::encode(b.as_binary::<i32>().value(0))).into()
        }
        DataType::Boolean => column.as_boolean().value(i).into(),
        DataType::Float32 => json!(column.as_primitive::<Float32Type>().value(i)),
        DataType::Float64 => json!(column.as_primitive::<Float64Type>().value(i)),
        t if t.is_integer() => {
            let v = arrow::compute::cast(&column.slice(i, 1), &DataType::Int64)?;
            v.as_primitive::<arrow::datatypes::Int64Type>().value(0).into()
        }
        _ => {
            let v = arrow::compute::cast(&column.slice(i, 1), &DataType::Utf8)?;
            v.as_string::<i32>().value(0).into()
        }
    })
}

fn vector(le_bytes: Vec<u8>, len: usize) -> Value {
    json!({ "len": len, "sha256": hex::encode(Sha256::digest(&le_bytes)) })
}

/// Writes `outputs` under `dir` (created if missing; files of earlier runs
/// that this run does not produce are removed, so the directory is exactly
/// this run's outputs).
pub fn write(dir: &Path, outputs: &Outputs) -> std::io::Result<()> {
    for sub in ["tables", "topics"] {
        let d = dir.join(sub);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
    }
    for (name, lines) in outputs {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>())?;
    }
    Ok(())
}

/// Reads a directory [`write`] wrote.
pub fn read(dir: &Path) -> std::io::Result<Outputs> {
    let mut out = Outputs::new();
    for sub in ["tables", "topics"] {
        let d = dir.join(sub);
        if !d.exists() {
            continue;
        }
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let text = std::fs::read_to_string(e.path())?;
            out.insert(format!("{sub}/{}", e.file_name().to_string_lossy()), text.lines().map(str::to_string).collect());
        }
    }
    Ok(out)
}

/// Lines shown per side of a file's difference.
const SHOWN: usize = 10;

/// The differences between `expected` and `actual`, readable; empty when
/// they are the same. Files are sorted sets of lines, so a difference is the
/// lines only one side has.
pub fn diff(expected: &Outputs, actual: &Outputs) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let names: std::collections::BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    for name in names {
        match (expected.get(name), actual.get(name)) {
            (Some(_), None) => {
                let _ = writeln!(out, "{name}: expected, but this run did not write it");
            }
            (None, Some(a)) => {
                let _ = writeln!(out, "{name}: written by this run ({} lines), but not expected", a.len());
            }
            (Some(e), Some(a)) if e != a => {
                let (es, as_): (std::collections::BTreeSet<&String>, std::collections::BTreeSet<&String>) = (e.iter().collect(), a.iter().collect());
                let missing: Vec<&&String> = es.difference(&as_).collect();
                let extra: Vec<&&String> = as_.difference(&es).collect();
                let _ = writeln!(out, "{name}: {} expected lines, {} actual; {} missing, {} unexpected", e.len(), a.len(), missing.len(), extra.len());
                if missing.is_empty() && extra.is_empty() {
                    let _ = writeln!(out, "  (the same lines, repeated a different number of times)");
                }
                for l in missing.iter().take(SHOWN) {
                    let _ = writeln!(out, "  - {l}");
                }
                if missing.len() > SHOWN {
                    let _ = writeln!(out, "  - … {} more", missing.len() - SHOWN);
                }
                for l in extra.iter().take(SHOWN) {
                    let _ = writeln!(out, "  + {l}");
                }
                if extra.len() > SHOWN {
                    let _ = writeln!(out, "  + … {} more", extra.len() - SHOWN);
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_names_the_file_and_shows_missing_and_unexpected_lines() {
        let mut e = Outputs::new();
        e.insert("tables/atoms.jsonl".into(), vec!["a".into(), "b".into()]);
        e.insert("topics/x.jsonl".into(), vec!["1".into()]);
        let mut a = e.clone();
        assert_eq!(diff(&e, &a), "");
        a.insert("tables/atoms.jsonl".into(), vec!["a".into(), "c".into()]);
        a.remove("topics/x.jsonl");
        let d = diff(&e, &a);
        assert!(d.contains("tables/atoms.jsonl: 2 expected lines, 2 actual; 1 missing, 1 unexpected"), "{d}");
        assert!(d.contains("  - b") && d.contains("  + c"), "{d}");
        assert!(d.contains("topics/x.jsonl: expected, but this run did not write it"), "{d}");
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &e).unwrap();
        assert_eq!(read(dir.path()).unwrap(), e);
    }
}
