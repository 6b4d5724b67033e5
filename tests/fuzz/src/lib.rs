//! What the fuzz targets share: the writer schemas they decode with, and the
//! registry-backed decoder of the processor's decode stage.
//!
//! Targets (`fuzz_targets/`), run by `tests/fuzz.sh`:
//! - `wire_decoder`: bytes → [`hartonomous::avro::Decoder`] over a file
//!   registry ([`wire_fixture`]); the first input byte picks the schema id.
//! - `depth_walker`: bytes → [`hartonomous::avro::depth::Walker`] against
//!   recursive and plain schemas ([`walker_schemas`]), checked against
//!   apache-avro on data shallow enough to decode directly.
//! - `json_bridge`: bytes → `parse_line` → `json_to_avro` → wire bytes and
//!   back ([`json_schemas`]).
//!
//! Every target asserts the same contract: no panic, no abort, no absurd
//! allocation (apache-avro's per-allocation cap is set first, and the
//! script runs libFuzzer with `-malloc_limit_mb` and `-rss_limit_mb`), and
//! every failure is a classified error with a stable reason code.

use std::sync::{Arc, LazyLock};

use apache_avro::Schema;
use apache_avro::types::Value;
use hartonomous::avro::depth::Walker;
use hartonomous::avro::wire::{self, MAX_ALLOCATION_BYTES};
use hartonomous::avro::{ATOM_INGESTED, ATOM_INGESTION_REQUEST, Decoder, FileRegistry, Schemas};
use serde_json::{Value as Json, json};

/// The topic the decode stage reads; its subject holds the request schemas.
pub const TOPIC: &str = "atoms.ingest";

/// An id nothing is registered under.
pub const UNKNOWN_ID: u32 = 4242;

/// Caps apache-avro's allocations before anything is decoded, and checks
/// that the cap in force is ours.
pub fn limit_allocations() {
    assert_eq!(wire::limit_allocations(), MAX_ALLOCATION_BYTES, "apache-avro's allocation cap was set elsewhere first");
}

/// The `.avsc` text of the current request schema, as JSON.
fn request_json() -> Json {
    serde_json::from_str(Schemas::current(ATOM_INGESTION_REQUEST).unwrap().source).unwrap()
}

fn with_fields(extra: Json) -> Schema {
    let mut schema = request_json();
    schema["fields"].as_array_mut().unwrap().extend(extra.as_array().unwrap().iter().cloned());
    Schema::parse_str(&schema.to_string()).unwrap()
}

/// The v2 request plus a `tree` of `Node`s, a linked list as deep as the
/// producer likes (as in `tests/poison.rs`): recursive, so every body is
/// walked with the depth limit first.
pub fn recursive_request() -> Schema {
    with_fields(json!([{
        "name": "tree",
        "type": {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]},
        "doc": "a linked list, as deep as the producer likes"
    }]))
}

/// The v2 request plus writer-only fields of every other kind of type (the
/// reader drops them): collections of zero-byte items, nested collections,
/// enums, fixed, numbers, a union of five branches and logical types. Not
/// recursive and shallow, so decoded without a walk.
pub fn wide_request() -> Schema {
    with_fields(json!([
        {"name": "flags", "type": {"type": "array", "items": "null"}},
        {"name": "grid", "type": {"type": "array", "items": {"type": "array", "items": "null"}}},
        {"name": "scores", "type": {"type": "map", "values": {"type": "array", "items": "double"}}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B", "C"]}},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
        {"name": "ratio", "type": "float"},
        {"name": "ok", "type": "boolean"},
        {"name": "count", "type": "int"},
        {"name": "choice", "type": ["null", "string", "bytes", "long",
            {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "long"}]}]},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}},
        {"name": "span", "type": {"type": "fixed", "name": "Span", "size": 12, "logicalType": "duration"}}
    ]))
}

/// The v2 request plus ten nested records: not recursive, but too deep to
/// decode on the caller's stack, so walked and then decoded on a thread of
/// its own.
pub fn deep_request() -> Schema {
    let mut inner = json!({"type": "record", "name": "L10", "fields": [{"name": "tags", "type": {"type": "map", "values": "string"}}]});
    for level in (1..10).rev() {
        inner = json!({"type": "record", "name": format!("L{level}"), "fields": [{"name": "down", "type": inner}]});
    }
    with_fields(json!([{"name": "envelope", "type": inner}]))
}

/// A registry as the decode stage sees one, and the decoder over it.
pub struct WireFixture {
    pub decoder: Decoder,
    /// What the first input byte chooses between, in this order:
    /// (schema id, what it is). The last choice, one past these, frames
    /// nothing: the rest of the input is the whole message.
    pub choices: Vec<(u32, Choice)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A schema of the type the topic carries.
    Request(&'static str),
    /// `AtomIngested`: valid Avro, the wrong record type.
    WrongType,
    /// Not registered.
    Unknown,
}

/// The registry is a [`FileRegistry`] in a temporary directory holding
/// every bundled request version under the topic's subject, the recursive,
/// wide and deep request variants, and `AtomIngested` under its own topic.
/// It answers from memory once loaded, so the directory is removed at once.
pub fn wire_fixture() -> &'static WireFixture {
    static FIXTURE: LazyLock<WireFixture> = LazyLock::new(|| {
        limit_allocations();
        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        let subject = Schemas::subject(TOPIC);
        let mut choices = Vec::new();
        for r in registry.register_bundled(&[(TOPIC, ATOM_INGESTION_REQUEST)]).unwrap() {
            let what = if r.bundle_version == 1 { "request v1" } else { "request v2" };
            choices.push((r.id, Choice::Request(what)));
        }
        choices.push((registry.register_schema(&subject, &recursive_request()).unwrap(), Choice::Request("recursive")));
        choices.push((registry.register_schema(&subject, &wide_request()).unwrap(), Choice::Request("wide")));
        choices.push((registry.register_schema(&subject, &deep_request()).unwrap(), Choice::Request("deep")));
        let ingested = &Schemas::current(ATOM_INGESTED).unwrap().schema;
        choices.push((registry.register_schema(&Schemas::subject("atoms.ingested"), ingested).unwrap(), Choice::WrongType));
        choices.push((UNKNOWN_ID, Choice::Unknown));
        let reader = Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema.clone();
        WireFixture { decoder: Decoder::new(Arc::new(registry), reader), choices }
    });
    &FIXTURE
}

/// Schemas for the depth walker: (what, schema, compiled walker).
pub fn walker_schemas() -> &'static [(&'static str, Schema, Walker)] {
    static SCHEMAS: LazyLock<Vec<(&'static str, Schema, Walker)>> = LazyLock::new(|| {
        limit_allocations();
        let parse = |s: &str| Schema::parse_str(s).unwrap();
        let schemas = vec![
            ("recursive request", recursive_request()),
            ("request v2", (*Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema).clone()),
            ("node", parse(r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#)),
            (
                "tree",
                parse(
                    r#"{"type":"record","name":"T","fields":[
                        {"name":"kids","type":{"type":"array","items":"T"}},
                        {"name":"tags","type":{"type":"map","values":["null","T"]}},
                        {"name":"s","type":"string"}]}"#,
                ),
            ),
            (
                "mutual",
                parse(
                    r#"{"type":"record","name":"A","fields":[
                        {"name":"b","type":{"type":"record","name":"B","fields":[
                            {"name":"a","type":["null","A"]},
                            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}}]}},
                        {"name":"f","type":{"type":"fixed","name":"F","size":2}}]}"#,
                ),
            ),
            ("wide request", wide_request()),
            ("deep request", deep_request()),
        ];
        schemas.into_iter().map(|(what, schema)| (what, schema.clone(), Walker::new(&schema).unwrap())).collect()
    });
    &SCHEMAS
}

/// Schemas for the JSON bridge: the current request (what the decode stage
/// converts `application/json` records with) and a record of every type the
/// bridge maps, so that all of its conversions are reached.
pub fn json_schemas() -> &'static [(&'static str, Schema)] {
    static SCHEMAS: LazyLock<Vec<(&'static str, Schema)>> = LazyLock::new(|| {
        limit_allocations();
        let all = Schema::parse_str(
            r#"{"type":"record","name":"All","namespace":"fuzz","fields":[
                {"name":"n","type":["null","int"],"default":null},
                {"name":"b","type":"boolean","default":false},
                {"name":"l","type":"long","default":0},
                {"name":"f","type":"float","default":0},
                {"name":"d","type":"double","default":0},
                {"name":"by","type":"bytes","default":""},
                {"name":"s","type":"string","default":""},
                {"name":"fx","type":{"type":"fixed","name":"Fx","size":3},"default":"abc"},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]},"default":"X"},
                {"name":"a","type":{"type":"array","items":["null","long","string"]},"default":[]},
                {"name":"m","type":{"type":"map","values":{"type":"array","items":"double"}},"default":{}},
                {"name":"r","type":["null",{"type":"record","name":"R","fields":[{"name":"next","type":["null","R"],"default":null},{"name":"v","type":"string","default":""}]}],"default":null},
                {"name":"date","type":{"type":"int","logicalType":"date"},"default":0},
                {"name":"tm","type":{"type":"int","logicalType":"time-millis"},"default":0},
                {"name":"tu","type":{"type":"long","logicalType":"time-micros"},"default":0},
                {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"},"default":0},
                {"name":"lts","type":{"type":"long","logicalType":"local-timestamp-nanos"},"default":0},
                {"name":"uid","type":{"type":"string","logicalType":"uuid"},"default":"67e55044-10b1-426f-9247-bb680e5fe0c8"},
                {"name":"dec","type":{"type":"bytes","logicalType":"decimal","precision":8,"scale":3}},
                {"name":"decf","type":{"type":"fixed","name":"DecF","size":5,"logicalType":"decimal","precision":10,"scale":2}},
                {"name":"big","type":{"type":"bytes","logicalType":"big-decimal"}},
                {"name":"dur","type":{"type":"fixed","name":"Dur","size":12,"logicalType":"duration"}}
            ]}"#,
        )
        .unwrap();
        vec![("request v2", (*Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema).clone()), ("all types", all)]
    });
    &SCHEMAS
}

/// Structural equality that takes a NaN for itself (JSON input can carry
/// `"NaN"` for a float, and NaN ≠ NaN).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
        (Value::Double(x), Value::Double(y)) => x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
        (Value::Union(i, x), Value::Union(j, y)) => i == j && same(x, y),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Map(x), Value::Map(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w))),
        (Value::Record(x), Value::Record(y)) => x.len() == y.len() && x.iter().zip(y).all(|((k, v), (l, w))| k == l && same(v, w)),
        _ => a == b,
    }
}
