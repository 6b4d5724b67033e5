//! Framed message → value: what stands between the registry's answer and
//! apache-avro, so that no record, however malformed, can stop the consumer.
//!
//! For each writer schema id, before any body is read:
//!
//! 1. **Right type.** The writer must be what the topic carries. Following
//!    Avro's resolution rule for named types, a reader record accepts a
//!    writer record whose unqualified name is the same, or whose full name is
//!    one of the reader's aliases (a writer union passes if one of its
//!    branches does). Anything else (an `AtomIngested` record on the request
//!    topic, a plain `"string"`) is [`WireError::WrongSchema`]
//!    (`decode.wrong_schema`), whatever the body: a body can decode by
//!    accident under the wrong schema. An unnamed reader (a primitive, array,
//!    map or union) is left to apache-avro's resolution.
//! 2. **Bounded depth.** apache-avro decodes recursively with large frames
//!    ([`super::depth`] has the numbers). A writer schema whose data nests at
//!    most [`INLINE_DEPTH`] levels (records, arrays, maps) and has no arrays
//!    or maps is decoded directly. For any other (recursive, deep, or with
//!    collections, see 3) the body is first
//!    walked with a depth limit: data nesting deeper than [`MAX_DEPTH`] is
//!    [`WireError::TooDeep`] (`decode.too_deep`) instead of a stack overflow
//!    that would abort the process; data that passes is decoded directly if
//!    it turned out shallow, else on a thread with a [`DECODE_STACK_BYTES`]
//!    stack (a thread per such record: recursive schemas are rare, and
//!    deep data rarer).
//! 3. **Bounded items.** An array or map block claims its item count in a
//!    varint, and an item may take no bytes (`null`, an empty record).
//!    apache-avro caps each collection at
//!    [`MAX_ALLOCATION_BYTES`](super::wire::MAX_ALLOCATION_BYTES) of values
//!    but not their sum: under a writer with an array of arrays of `null`s,
//!    a 349-byte body asked for 60 × 64 MiB and aborted the process. The
//!    walk counts the items of the whole body against one budget
//!    ([`super::depth::item_budget`]), so a schema with arrays or maps is
//!    always walked first; the walk reads, it allocates nothing.
//!
//! Then apache-avro decodes the body with the writer schema and resolves it
//! to the reader ([`super::wire::decode`]).
//!
//! Except on the fast path: a writer that passes 1 and is a flat record (the
//! usual case) also gets a [`super::direct::Program`], which reads a body in
//! one pass straight into the reader's value, checking every length and
//! count against the bytes left (so 2 and 3 hold without the walk). It
//! answers only for bodies it decodes; any other body goes the way above, so
//! rejections and their reasons are apache-avro's.
//!
//! [`Decoder`] makes both decisions once per schema id and keeps them;
//! [`decode_message`] makes them on every call, for one-off decoding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use apache_avro::Schema;
use apache_avro::types::Value;

use super::direct::Program;
use super::depth::{DECODE_STACK_BYTES, INLINE_DEPTH, MAX_DEPTH, WalkError, Walker};
use super::registry::{DecodeError, SchemaRegistry};
use super::wire::{self, SchemaProblem, WireError};

/// Most schema ids whose verdict a [`Decoder`] keeps. Only ids the registry
/// resolved are kept, and a deployment sees a handful; past this many the
/// cache starts over rather than grow.
pub const PLAN_CACHE_CAPACITY: usize = 1024;

/// Decodes framed messages for one reader schema through a registry,
/// checking each writer schema once per id (see the module documentation).
/// Share one per stage; it is `Send + Sync`.
pub struct Decoder {
    registry: Arc<dyn SchemaRegistry>,
    reader: Arc<Schema>,
    /// Schema id → what to do with its records. Ids are immutable, so a
    /// verdict never goes stale. Failed look-ups are not kept here (the
    /// registry client decides how long to remember those).
    plans: Mutex<HashMap<u32, Arc<Plan>>>,
}

impl Decoder {
    pub fn new(registry: Arc<dyn SchemaRegistry>, reader: Arc<Schema>) -> Self {
        Self { registry, reader, plans: Mutex::new(HashMap::new()) }
    }

    /// The reader schema values are resolved to.
    pub fn reader(&self) -> &Arc<Schema> {
        &self.reader
    }

    /// Number of schema ids with a cached verdict.
    pub fn cached_ids(&self) -> usize {
        lock(&self.plans).len()
    }

    /// Splits the header, looks up the writer schema (once per id), checks
    /// it, decodes and resolves to the reader. Returns the writer schema id
    /// with the value. Errors are classified as in [`decode_message`].
    pub async fn decode(&self, bytes: &[u8]) -> Result<(u32, Value), DecodeError> {
        let (id, body) = wire::split(bytes)?;
        let cached = lock(&self.plans).get(&id).cloned();
        let plan = match cached {
            Some(plan) => plan,
            None => {
                let writer = self.registry.schema_by_id(id).await?;
                let plan = Arc::new(Plan::new(id, writer, &self.reader));
                let mut plans = lock(&self.plans);
                if plans.len() >= PLAN_CACHE_CAPACITY {
                    plans.clear();
                }
                plans.insert(id, plan.clone());
                plan
            }
        };
        plan.decode(id, &self.reader, body).map(|value| (id, value))
    }
}

/// Decodes a framed message: splits the header, fetches the writer schema
/// from `registry`, checks it against `reader` (type and, for a recursive
/// writer, the data's depth), decodes and resolves to `reader`. Returns the
/// writer schema id with the value.
///
/// Errors: [`DecodeError::Invalid`] for anything that is the record's fault
/// (bad framing, unknown or unusable schema id, wrong type, too deep, a body
/// that does not decode); [`DecodeError::Registry`] when the registry failed
/// (classified by the registry client). Checks the writer schema on every
/// call; [`Decoder`] remembers the verdict per id.
pub async fn decode_message(registry: &dyn SchemaRegistry, reader: &Schema, bytes: &[u8]) -> Result<(u32, Value), DecodeError> {
    let (id, body) = wire::split(bytes)?;
    let writer = registry.schema_by_id(id).await?;
    Plan::new(id, writer, reader).decode(id, reader, body).map(|value| (id, value))
}

/// What to do with the records of one writer schema id.
struct Plan {
    writer: Arc<Schema>,
    /// `Err`: every record with this id is rejected with it.
    verdict: Result<Route, WireError>,
    /// The one-pass decoder, for a writer of the right type that compiles.
    direct: Option<Program>,
}

enum Route {
    /// The schema bounds the data to [`INLINE_DEPTH`] levels and has no
    /// arrays or maps: decode directly.
    Inline,
    /// Recursive, deep, or with arrays or maps: walk each body first.
    Walk(Walker),
}

impl Plan {
    fn new(id: u32, writer: Arc<Schema>, reader: &Schema) -> Self {
        let verdict = check_type(id, &writer, reader).and_then(|()| match Walker::new(&writer) {
            Ok(walker) if walker.static_depth().is_some_and(|d| d <= INLINE_DEPTH) && !walker.has_collections() => Ok(Route::Inline),
            Ok(walker) => Ok(Route::Walk(walker)),
            Err(e) => Err(WireError::UnusableSchema {
                id,
                problem: SchemaProblem::Unparsable,
                message: format!("schema id {id} cannot be used to decode: {e}"),
            }),
        });
        let direct = if verdict.is_ok() { Program::compile(&writer, reader) } else { None };
        Self { writer, verdict, direct }
    }

    fn decode(&self, id: u32, reader: &Schema, body: &[u8]) -> Result<Value, DecodeError> {
        if let Some(value) = self.direct.as_ref().and_then(|p| p.decode(body)) {
            return Ok(value);
        }
        let walker = match &self.verdict {
            Err(e) => return Err(e.clone().into()),
            Ok(Route::Inline) => return Ok(wire::decode(&self.writer, reader, body)?),
            Ok(Route::Walk(walker)) => walker,
        };
        let walked = walker.walk(body, MAX_DEPTH).map_err(|e| match e {
            WalkError::TooDeep { limit } => WireError::TooDeep { id, limit },
            WalkError::Truncated => WireError::Truncated,
            WalkError::Malformed(m) => WireError::Body(m),
        })?;
        if walked.depth <= INLINE_DEPTH {
            return Ok(wire::decode(&self.writer, reader, body)?);
        }
        decode_on_big_stack(&self.writer, reader, body)
    }
}

/// [`wire::decode`] on a thread with a [`DECODE_STACK_BYTES`] stack, for
/// data nesting up to [`MAX_DEPTH`] levels. The deep writer value is built,
/// resolved and dropped there. A panic in apache-avro is this record's
/// rejection rather than the stage's.
fn decode_on_big_stack(writer: &Schema, reader: &Schema, body: &[u8]) -> Result<Value, DecodeError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("avro-deep-decode".into())
            .stack_size(DECODE_STACK_BYTES)
            .spawn_scoped(scope, || wire::decode(writer, reader, body))
            .map_err(|e| DecodeError::Unavailable(format!("cannot start a thread to decode deeply nested data: {e}")))?;
        match handle.join() {
            Ok(result) => Ok(result?),
            Err(panic) => {
                let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                Err(WireError::Body(format!("the Avro decoder panicked: {}", what.unwrap_or_default())).into())
            }
        }
    })
}

/// Avro's rule for named types: same kind, and the same unqualified name or
/// a reader alias naming the writer. A writer union passes if a branch does
/// (each record is then resolved from the branch it took).
fn check_type(id: u32, writer: &Schema, reader: &Schema) -> Result<(), WireError> {
    let Some(expected) = reader.name().filter(|_| kind(reader).is_some()) else {
        return Ok(());
    };
    let fits = match writer {
        Schema::Union(u) => u.variants().iter().any(|branch| names_reader(branch, reader)),
        _ => names_reader(writer, reader),
    };
    if fits { Ok(()) } else { Err(WireError::WrongSchema { id, writer: describe(writer), expected: expected.fullname(None) }) }
}

fn names_reader(writer: &Schema, reader: &Schema) -> bool {
    let (Some(w), Some(r)) = (writer.name(), reader.name()) else { return false };
    if kind(writer) != kind(reader) {
        return false;
    }
    let writer_full = w.fullname(None);
    w.name() == r.name()
        || reader
            .aliases()
            .is_some_and(|aliases| aliases.iter().any(|a| a.fully_qualified_name(r.namespace()).fullname(None) == writer_full))
}

/// The kind of a named schema; `None` for unnamed ones (and references).
fn kind(schema: &Schema) -> Option<&'static str> {
    match schema {
        Schema::Record(_) => Some("record"),
        Schema::Enum(_) => Some("enum"),
        Schema::Ref { .. } => None,
        s if s.is_named() => Some("fixed"),
        _ => None,
    }
}

/// The writer schema in a few words, for the rejection message.
fn describe(schema: &Schema) -> String {
    match (kind(schema), schema.name()) {
        (Some(kind), Some(name)) => format!("{kind} `{}`", name.fullname(None)),
        _ => match schema {
            Schema::Union(u) => format!("a union of [{}]", u.variants().iter().map(describe).collect::<Vec<_>>().join(", ")),
            _ => {
                let mut text = schema.canonical_form();
                if let Some((cut, _)) = text.char_indices().nth(80) {
                    text.truncate(cut);
                    text.push('…');
                }
                format!("type `{text}`")
            }
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the map consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;

    use super::*;
    use crate::avro::registry::FileRegistry;
    use crate::avro::{ATOM_INGESTED, ATOM_INGESTION_REQUEST, Schemas};
    use crate::outcome::{Classify, ErrorClass};

    fn reader() -> Arc<Schema> {
        Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema.clone()
    }

    fn parse(json: &str) -> Schema {
        Schema::parse_str(json).unwrap()
    }

    #[test]
    fn every_bundled_request_version_gets_the_one_pass_program() {
        // A silent fall back to apache-avro would keep every result and lose
        // the speed; the schemas topics carry must compile.
        for version in [1, 2] {
            let writer = Schemas::version(ATOM_INGESTION_REQUEST, version).unwrap().schema.clone();
            let plan = Plan::new(version, writer, &reader());
            assert!(plan.verdict.is_ok() && plan.direct.is_some(), "version {version}");
        }
        // A recursive writer is walked the usual way.
        assert!(Plan::new(9, Arc::new(recursive_request()), &reader()).direct.is_none());
    }

    /// The v2 request schema with one more field, `next`, of type
    /// `["null", <itself>]`: valid, same name, and recursive.
    fn recursive_request() -> Schema {
        let mut json: serde_json::Value = serde_json::from_str(Schemas::current(ATOM_INGESTION_REQUEST).unwrap().source).unwrap();
        json["fields"].as_array_mut().unwrap().push(serde_json::json!({
            "name": "next", "type": ["null", "AtomIngestionRequest"], "default": null
        }));
        parse(&json.to_string())
    }

    /// One level of `recursive_request` data: the v2 fields, then the union
    /// branch of `next` (1: another level follows, 0: null).
    fn level(more: bool) -> Vec<u8> {
        let mut b = vec![20];
        b.extend_from_slice(b"text/plain");
        b.extend_from_slice(&[2, b'x', 0, 2, b's', 2, b'c', 0, if more { 2 } else { 0 }]);
        b
    }

    fn nested(levels: usize) -> Vec<u8> {
        let mut body = level(true).repeat(levels - 1);
        body.extend(level(false));
        body
    }

    #[test]
    fn writer_of_another_type_is_wrong_schema() {
        let reader = reader();
        let ingested = Schemas::current(ATOM_INGESTED).unwrap().schema.clone();
        let err = check_type(7, &ingested, &reader).unwrap_err();
        assert_eq!(err.code(), "decode.wrong_schema");
        assert_eq!(err.class(), ErrorClass::Invalid);
        let text = err.to_string();
        assert!(text.contains("record `io.hartonomous.AtomIngested`") && text.contains("`io.hartonomous.AtomIngestionRequest`"), "{text}");
        let err = check_type(8, &parse(r#""string""#), &reader).unwrap_err();
        assert!(err.to_string().contains(r#"type `"string"`"#), "{err}");
        let enum_named_alike = parse(r#"{"type":"enum","name":"AtomIngestionRequest","symbols":["A"]}"#);
        assert!(check_type(9, &enum_named_alike, &reader).is_err(), "same name, wrong kind");
        let union = parse(r#"["null","string"]"#);
        assert!(check_type(9, &union, &reader).unwrap_err().to_string().contains("a union of"));
    }

    #[test]
    fn same_unqualified_name_alias_or_union_branch_fits() {
        let reader = reader();
        check_type(1, &reader, &reader).unwrap();
        // Another namespace, same unqualified name: Avro resolves it.
        check_type(1, &parse(r#"{"type":"record","name":"other.AtomIngestionRequest","fields":[]}"#), &reader).unwrap();
        let union = parse(r#"["null",{"type":"record","name":"AtomIngestionRequest","fields":[]}]"#);
        check_type(1, &union, &reader).unwrap();
        // Reader aliases name the writer.
        let aliased = parse(r#"{"type":"record","name":"New","namespace":"n","aliases":["Old","x.Legacy"],"fields":[]}"#);
        check_type(1, &parse(r#"{"type":"record","name":"n.Old","fields":[]}"#), &aliased).unwrap();
        check_type(1, &parse(r#"{"type":"record","name":"x.Legacy","fields":[]}"#), &aliased).unwrap();
        assert!(check_type(1, &parse(r#"{"type":"record","name":"y.Legacy2","fields":[]}"#), &aliased).is_err());
        // An unnamed reader is left to resolution.
        check_type(1, &parse(r#""long""#), &parse(r#""string""#)).unwrap();
    }

    #[test]
    fn shallow_recursive_data_decodes_and_deep_data_is_too_deep() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(FileRegistry::open(dir.path().join("r.json")).unwrap());
        let id = registry.register_schema("t-value", &recursive_request()).unwrap();
        let decoder = Decoder::new(registry, reader());

        let ok = wire::frame(id, &nested(3));
        let (got, value) = block_on(decoder.decode(&ok)).unwrap();
        assert_eq!(got, id);
        let req: crate::atom::AtomIngestionRequest = apache_avro::from_value(&value).unwrap();
        assert_eq!(req.content, b"x");

        // At the limit (each request record holds a map one level deeper):
        // still decodes, resolves and drops, on this 2 MiB test thread.
        let at_limit = wire::frame(id, &nested(MAX_DEPTH - 1));
        block_on(decoder.decode(&at_limit)).unwrap();
        let over = wire::frame(id, &nested(MAX_DEPTH));
        assert_eq!(block_on(decoder.decode(&over)).unwrap_err().code(), "decode.too_deep");

        let deep = wire::frame(id, &nested(100_000));
        let err = block_on(decoder.decode(&deep)).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(WireError::TooDeep { id, limit: MAX_DEPTH }));
        assert_eq!(err.code(), "decode.too_deep");
        assert_eq!(err.class(), ErrorClass::Invalid);
        // decode_message, uncached, says the same.
        let reader = reader();
        let err = block_on(decode_message(decoder.registry.as_ref(), &reader, &deep)).unwrap_err();
        assert_eq!(err.code(), "decode.too_deep");
        assert_eq!(decoder.cached_ids(), 1);
    }

    /// 60 nested arrays: not recursive, but deeper than a debug build's
    /// 2 MiB stack allows apache-avro (about 21 levels). Decoded on its own
    /// stack, from this 2 MiB test thread.
    #[test]
    fn deep_but_not_recursive_schema_decodes_on_its_own_stack() {
        const LEVELS: usize = 60;
        let mut json = String::from(r#""long""#);
        for _ in 0..LEVELS {
            json = format!(r#"{{"type":"array","items":{json}}}"#);
        }
        let schema = parse(&json);
        let walker = Walker::new(&schema).unwrap();
        assert_eq!(walker.static_depth(), Some(LEVELS));
        let mut body = vec![2u8; LEVELS];
        body.push(10);
        body.extend(std::iter::repeat_n(0u8, LEVELS));

        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("r.json")).unwrap();
        let id = registry.register_schema("deep-value", &schema).unwrap();
        let (_, value) = block_on(decode_message(&registry, &schema, &wire::frame(id, &body))).unwrap();
        let mut v = &value;
        let mut depth = 0;
        while let Value::Array(items) = v {
            v = &items[0];
            depth += 1;
        }
        assert_eq!((depth, v), (LEVELS, &Value::Long(5)));
    }

    /// The v2 request plus `grid`, an array of arrays of `null`s: each inner
    /// array claims a full allocation's worth of values (apache-avro's cap
    /// per collection) in a few bytes. The walk's item budget is spent
    /// across the body, so the second one is refused before anything is
    /// allocated. (Decoded directly, 60 of them in 349 bytes asked for
    /// 3.8 GB and aborted the process.)
    #[test]
    fn collections_of_empty_items_cannot_add_up_past_the_allocation_cap() {
        let mut json: serde_json::Value = serde_json::from_str(Schemas::current(ATOM_INGESTION_REQUEST).unwrap().source).unwrap();
        json["fields"].as_array_mut().unwrap().push(serde_json::json!({
            "name": "grid", "type": {"type": "array", "items": {"type": "array", "items": "null"}}
        }));
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(FileRegistry::open(dir.path().join("r.json")).unwrap());
        let id = registry.register_schema("t-value", &parse(&json.to_string())).unwrap();
        let decoder = Decoder::new(registry, reader());
        let grid = |inner: &[u64]| {
            // The v2 fields (`level` without the `next` branch), then the grid.
            let mut body = level(false);
            body.pop();
            body.extend(zigzag(inner.len() as u64));
            for &n in inner {
                if n > 0 {
                    body.extend(zigzag(n));
                }
                body.push(0);
            }
            body.push(0);
            wire::frame(id, &body)
        };
        let (_, value) = block_on(decoder.decode(&grid(&[1000, 0, 3]))).unwrap();
        assert!(value.validate(&reader()), "a modest grid decodes; the reader drops it");
        let full = (wire::MAX_ALLOCATION_BYTES / std::mem::size_of::<Value>()) as u64;
        let err = block_on(decoder.decode(&grid(&[full, full]))).unwrap_err();
        assert!(matches!(&err, DecodeError::Invalid(WireError::Body(m)) if m.contains("more than")), "{err:?}");
        assert_eq!(err.code(), "decode.body");
    }

    /// Avro long encoding of a non-negative `n`.
    fn zigzag(n: u64) -> Vec<u8> {
        let mut z = n << 1;
        let mut out = Vec::new();
        while z >= 0x80 {
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
        out
    }

    /// A registry that counts look-ups.
    struct Counting {
        inner: FileRegistry,
        calls: Mutex<u32>,
    }

    impl SchemaRegistry for Counting {
        fn schema_by_id(&self, id: u32) -> futures::future::BoxFuture<'_, Result<Arc<Schema>, super::super::RegistryError>> {
            *self.calls.lock().unwrap() += 1;
            self.inner.schema_by_id(id)
        }
        fn register(&self, subject: &str, schema: &Schema) -> futures::future::BoxFuture<'_, Result<u32, super::super::RegistryError>> {
            self.inner.register(subject, schema)
        }
    }

    #[test]
    fn the_verdict_is_made_once_per_id() {
        let dir = tempfile::tempdir().unwrap();
        let inner = FileRegistry::open(dir.path().join("r.json")).unwrap();
        let wrong = inner.register_schema("t-value", &parse(r#""string""#)).unwrap();
        let good = inner.register_schema("t-value", &recursive_request()).unwrap();
        let registry = Arc::new(Counting { inner, calls: Mutex::new(0) });
        let decoder = Decoder::new(registry.clone(), reader());
        for _ in 0..5 {
            let err = block_on(decoder.decode(&wire::frame(wrong, &[6, b'a', b'b', b'c']))).unwrap_err();
            assert_eq!(err.code(), "decode.wrong_schema");
            block_on(decoder.decode(&wire::frame(good, &nested(2)))).unwrap();
        }
        assert_eq!(*registry.calls.lock().unwrap(), 2, "one look-up per id");
        // Unknown ids are not cached here.
        for _ in 0..2 {
            assert_eq!(block_on(decoder.decode(&wire::frame(99, &[]))).unwrap_err().code(), "decode.unknown_schema");
        }
        assert_eq!(*registry.calls.lock().unwrap(), 4);
        assert_eq!(decoder.cached_ids(), 2);
    }
}
