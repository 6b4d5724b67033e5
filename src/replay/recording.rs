//! The recording file: a topic's records with their Kafka metadata, in an
//! Avro object container file (`hartonomous record` writes it, `replay
//! --input` reads it).
//!
//! Why Avro containers: the format is standard (any Avro tool reads it:
//! `avro-tools tojson`, fastavro, DuckDB's avro extension), self-describing
//! (the record schema is in the header), splittable into blocks, and written
//! and read one block at a time, so memory stays flat for a topic of any size.
//!
//! Each entry is one Kafka record: topic, partition, offset, timestamp, key,
//! value and headers, bytes unchanged. A value in the Confluent wire format
//! names its writer schema by a registry id that means nothing without that
//! registry, so the first entry carrying each id also carries the schema
//! (`writer_schema`): the file replays anywhere, with the same ids. The
//! header's `hartonomous.recording` metadata says what was recorded (JSON).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use crate::record::{Headers, Position, Record, TopicPartition};

/// The Avro schema of one entry.
pub const ENTRY_SCHEMA: &str = r#"{
  "type": "record", "name": "KafkaRecord", "namespace": "hartonomous.recording",
  "doc": "One Kafka record with its metadata, bytes unchanged.",
  "fields": [
    {"name": "topic", "type": "string"},
    {"name": "partition", "type": "int"},
    {"name": "offset", "type": "long"},
    {"name": "timestamp_ms", "type": "long", "doc": "The record's timestamp (create or log-append time), ms since the epoch."},
    {"name": "key", "type": ["null", "bytes"], "default": null},
    {"name": "value", "type": ["null", "bytes"], "default": null},
    {"name": "headers", "type": {"type": "array", "items": {
      "type": "record", "name": "Header",
      "fields": [{"name": "key", "type": "string"}, {"name": "value", "type": ["null", "bytes"], "default": null}]}},
     "default": []},
    {"name": "writer_schema", "default": null, "doc": "Set on the first record whose value names this Confluent schema id.",
     "type": ["null", {"type": "record", "name": "WriterSchema",
       "fields": [{"name": "id", "type": "int"}, {"name": "schema", "type": "string"}]}]}
  ]
}"#;

/// The header metadata key holding [`RecordingInfo`] as JSON.
pub const INFO_KEY: &str = "hartonomous.recording";

/// What a recording holds, in its header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordingInfo {
    pub format_version: u32,
    pub topic: String,
    /// The range as asked (`--from`, `--to`), for the record's reader.
    pub from: Option<String>,
    pub to: Option<String>,
    pub partitions: Vec<i32>,
    pub recorded_at_ms: i64,
    pub tool: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

fn err(path: &Path, message: impl std::fmt::Display) -> RecordingError {
    RecordingError::File { file: path.display().to_string(), message: message.to_string() }
}


/// The Confluent schema id a value names, if it is in the wire format.
pub fn wire_schema_id(value: &[u8]) -> Option<u32> {
    match value {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Writes a recording, one entry at a time. Blocks go to disk as they fill,
/// so memory does not grow with the number of records.
pub struct RecordingWriter {
    path: PathBuf,
    writer: apache_avro::Writer<'static, BufWriter<File>>,
    with_schema: HashSet<u32>,
    records: u64,
}

/// The entry schema lives as long as the process: the writer borrows it.
fn static_entry_schema() -> &'static Schema {
    static SCHEMA: std::sync::OnceLock<Schema> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| Schema::parse_str(ENTRY_SCHEMA).expect("the bundled entry schema parses"))
}

impl RecordingWriter {
    pub fn create(path: &Path, info: &RecordingInfo) -> Result<Self, RecordingError> {
        let file = File::create(path).map_err(|e| err(path, format_args!("cannot create: {e}")))?;
        let mut writer = apache_avro::Writer::new(static_entry_schema(), BufWriter::new(file)).map_err(|e| err(path, e))?;
        let json = serde_json::to_string(info).map_err(|e| err(path, e))?;
        writer.add_user_metadata(INFO_KEY.to_string(), json).map_err(|e| err(path, e))?;
        Ok(Self { path: path.to_path_buf(), writer, with_schema: HashSet::new(), records: 0 })
    }

    /// Whether the next record naming `id` must carry its schema.
    pub fn needs_schema(&self, id: u32) -> bool {
        !self.with_schema.contains(&id)
    }

    /// Appends one record; `schema` is the writer schema (JSON) of the id its
    /// value names, given the first time that id is seen ([`needs_schema`](Self::needs_schema)).
    pub fn append(&mut self, record: &Record, schema: Option<(u32, String)>) -> Result<(), RecordingError> {
        let bytes = |b: Option<&[u8]>| match b {
            Some(b) => Value::Union(1, Box::new(Value::Bytes(b.to_vec()))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let headers = record
            .headers
            .iter()
            .map(|(k, v)| Value::Record(vec![("key".into(), Value::String(k.to_string())), ("value".into(), bytes(v))]))
            .collect();
        let writer_schema = match schema {
            Some((id, json)) => {
                self.with_schema.insert(id);
                Value::Union(1, Box::new(Value::Record(vec![("id".into(), Value::Int(id as i32)), ("schema".into(), Value::String(json))])))
            }
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let entry = Value::Record(vec![
            ("topic".into(), Value::String(record.position.tp.topic.to_string())),
            ("partition".into(), Value::Int(record.position.tp.partition)),
            ("offset".into(), Value::Long(record.position.offset)),
            ("timestamp_ms".into(), Value::Long(record.event_time_ms)),
            ("key".into(), bytes(record.key.as_deref())),
            ("value".into(), bytes(Some(&record.payload))),
            ("headers".into(), Value::Array(headers)),
            ("writer_schema".into(), writer_schema),
        ]);
        self.writer.append_value(entry).map_err(|e| err(&self.path, e))?;
        self.records += 1;
        Ok(())
    }

    /// Writes the last block and syncs the file. Returns the records written.
    pub fn finish(self) -> Result<u64, RecordingError> {
        let path = self.path;
        let mut inner = self.writer.into_inner().map_err(|e| err(&path, e))?;
        inner.flush().map_err(|e| err(&path, e))?;
        inner.get_ref().sync_all().map_err(|e| err(&path, e))?;
        Ok(self.records)
    }
}

/// One entry read back.
#[derive(Debug, Clone)]
pub struct Entry {
    pub record: Record,
    pub writer_schema: Option<(u32, String)>,
}

/// Reads a recording one entry at a time.
pub struct RecordingReader {
    path: PathBuf,
    info: RecordingInfo,
    reader: apache_avro::Reader<'static, BufReader<File>>,
}

impl RecordingReader {
    pub fn open(path: &Path) -> Result<Self, RecordingError> {
        let file = File::open(path).map_err(|e| err(path, format_args!("cannot open: {e}")))?;
        let reader = apache_avro::Reader::builder(BufReader::new(file)).reader_schema(static_entry_schema()).build()
            .map_err(|e| err(path, format_args!("not a recording (an Avro container file written by `hartonomous record`): {e}")))?;
        let info = reader
            .user_metadata()
            .get(INFO_KEY)
            .ok_or_else(|| err(path, format_args!("an Avro container file, but without `{INFO_KEY}` metadata: not written by `hartonomous record`")))?;
        let info: RecordingInfo = serde_json::from_slice(info).map_err(|e| err(path, format_args!("unreadable `{INFO_KEY}` metadata: {e}")))?;
        Ok(Self { path: path.to_path_buf(), info, reader })
    }

    /// Whether `path` starts like an Avro container file.
    pub fn sniff(path: &Path) -> bool {
        use std::io::Read;
        let mut magic = [0u8; 4];
        File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"Obj\x01"
    }

    pub fn info(&self) -> &RecordingInfo {
        &self.info
    }
}

impl Iterator for RecordingReader {
    type Item = Result<Entry, RecordingError>;

    fn next(&mut self) -> Option<Self::Item> {
        let value = match self.reader.next()? {
            Ok(v) => v,
            Err(e) => return Some(Err(err(&self.path, format_args!("corrupt entry: {e}")))),
        };
        Some(entry_of(value).map_err(|m| err(&self.path, m)))
    }
}

fn entry_of(value: Value) -> Result<Entry, String> {
    let Value::Record(fields) = value else { return Err("an entry is not a record".into()) };
    let (mut topic, mut partition, mut offset, mut ts) = (String::new(), 0, 0, 0);
    let (mut key, mut payload, mut headers, mut writer_schema) = (None, Vec::new(), Headers::new(), None);
    fn opt_bytes(v: Value) -> Option<Vec<u8>> {
        match v {
            Value::Union(_, b) => opt_bytes(*b),
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
    for (name, v) in fields {
        match (name.as_str(), v) {
            ("topic", Value::String(s)) => topic = s,
            ("partition", Value::Int(p)) => partition = p,
            ("offset", Value::Long(o)) => offset = o,
            ("timestamp_ms", Value::Long(t)) => ts = t,
            ("key", v) => key = opt_bytes(v),
            ("value", v) => payload = opt_bytes(v).unwrap_or_default(),
            ("headers", Value::Array(items)) => {
                for h in items {
                    if let Value::Record(hf) = h {
                        let mut k = String::new();
                        let mut val = None;
                        for (n, x) in hf {
                            match (n.as_str(), x) {
                                ("key", Value::String(s)) => k = s,
                                ("value", x) => val = opt_bytes(x),
                                _ => {}
                            }
                        }
                        headers.push_raw(k, val);
                    }
                }
            }
            ("writer_schema", Value::Union(_, inner)) => {
                if let Value::Record(wf) = *inner {
                    let (mut id, mut schema) = (0u32, String::new());
                    for (n, x) in wf {
                        match (n.as_str(), x) {
                            ("id", Value::Int(i)) => id = i as u32,
                            ("schema", Value::String(s)) => schema = s,
                            _ => {}
                        }
                    }
                    writer_schema = Some((id, schema));
                }
            }
            _ => {}
        }
    }
    let record = Record { position: Position { tp: TopicPartition::new(topic.as_str(), partition), offset }, key, payload, headers, event_time_ms: ts };
    Ok(Entry { record, writer_schema })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, value: Vec<u8>) -> Record {
        let mut headers = Headers::new();
        headers.push_raw("traceparent".into(), Some(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec()));
        headers.push_raw("empty".into(), None);
        Record { position: Position { tp: TopicPartition::new("t", 2), offset }, key: Some(b"k".to_vec()), payload: value, headers, event_time_ms: 1_700_000_000_000 + offset }
    }

    #[test]
    fn a_recording_round_trips_records_metadata_and_writer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.avro");
        let info = RecordingInfo { format_version: 1, topic: "t".into(), from: Some("5".into()), to: None, partitions: vec![2], recorded_at_ms: 1, tool: "test".into() };
        let mut w = RecordingWriter::create(&path, &info).unwrap();
        for o in 0..2500 {
            let value = [&[0u8, 0, 0, 0, 7][..], &o.to_string().into_bytes()].concat();
            let id = wire_schema_id(&value).unwrap();
            let schema = w.needs_schema(id).then(|| (id, "\"string\"".to_string()));
            w.append(&record(o, value), schema).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 2500);
        assert!(RecordingReader::sniff(&path));
        let r = RecordingReader::open(&path).unwrap();
        assert_eq!(r.info(), &info);
        let entries: Vec<Entry> = r.map(Result::unwrap).collect();
        assert_eq!(entries.len(), 2500);
        assert_eq!(entries[0].writer_schema, Some((7, "\"string\"".into())), "the first record of an id carries its schema");
        assert!(entries[1..].iter().all(|e| e.writer_schema.is_none()));
        let last = &entries[2499].record;
        assert_eq!(last, &record(2499, [&[0u8, 0, 0, 0, 7][..], b"2499"].concat()));
        let not = dir.path().join("x.jsonl");
        std::fs::write(&not, "{}\n").unwrap();
        assert!(!RecordingReader::sniff(&not));
        assert!(RecordingReader::open(&not).is_err());
    }
}
