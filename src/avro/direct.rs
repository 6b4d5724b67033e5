//! One-pass decoding of flat records: the body is read once, straight into
//! the value resolved to the reader schema.
//!
//! apache-avro decodes a body into a value of the writer schema, then
//! resolves that value to the reader (a second copy of every field, looked up
//! by name), and the [`super::decoder`] walks every body that has a map or an
//! array before that. For the schemas topics carry (records of primitives,
//! maps, arrays, enums and unions of those) [`Program`] does all of it in one
//! pass, compiled once per writer schema id from Avro's resolution rules:
//! writer fields the reader lacks are skipped, reader fields the writer lacks
//! take the value apache-avro gives them (computed once, by apache-avro
//! itself), and the promotions are Avro's (`int` → `long`, `float`,
//! `double`; `long` → `float`, `double`; `float` → `double`; `string` ↔
//! `bytes`).
//!
//! Contract: whenever [`Program::decode`] returns a value, it is the value
//! apache-avro's decode-and-resolve returns for the same body (tests below
//! compare them on many schema pairs and bodies). It returns `None` for
//! anything it does not take on: a schema it cannot compile (nested records,
//! named references, fixed, decimals, aliases, unions that need a
//! promotion), and every body that fails. The caller then decodes the usual
//! way, so errors, their codes and their wording stay apache-avro's.
//!
//! Bounds: a length or an item count is checked against the bytes left
//! before anything is allocated, and the compiled schemas have no items that
//! take zero bytes, so no body can ask for more memory than its own size in
//! items. Nesting is at most two levels (a record of maps or arrays).

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;
use apache_avro::types::Value;

/// A compiled writer → reader resolution for one flat record schema pair.
pub struct Program {
    /// In writer field order: what to do with each.
    steps: Vec<Step>,
    /// In reader field order: the field name, and the value of fields the
    /// writer lacks.
    fields: Vec<(String, Option<Value>)>,
}

enum Step {
    /// Read the writer's field into reader field `target`.
    Read { target: usize, read: Read },
    /// The reader has no such field: read past it.
    Skip(Read),
}

/// How to read one writer datum and what value it becomes for the reader.
#[derive(Clone)]
enum Read {
    Null,
    Boolean,
    /// A writer `int`, as the reader's type.
    Int(Num),
    /// A writer `long`, as the reader's type.
    Long(Num),
    Float(Num),
    Double,
    /// A writer `bytes` or `string`, as the reader's `bytes` or `string`.
    Bytes { utf8_in: bool, as_string: bool },
    /// Writer symbol index → reader (index, symbol).
    Enum(Vec<(u32, String)>),
    /// Writer branch index → (reader branch index, when the reader is a
    /// union too; how to read the branch).
    Union(Vec<(Option<u32>, Read)>),
    /// A writer that is not a union, read as reader union branch `.0`.
    Wrap(u32, Box<Read>),
    Map(Box<Read>),
    Array(Box<Read>),
}

/// What a number becomes (Avro's promotions).
#[derive(Clone, Copy, PartialEq)]
enum Num {
    Int,
    Long,
    Float,
    Double,
    TimestampMillis,
    TimestampMicros,
}

impl Program {
    /// The program for records written with `writer` and read as `reader`,
    /// or `None` if either is not a flat record this module decodes.
    pub fn compile(writer: &Schema, reader: &Schema) -> Option<Program> {
        let (Schema::Record(w), Schema::Record(r)) = (writer, reader) else { return None };
        if r.fields.iter().any(|f| !f.aliases.is_empty()) {
            return None;
        }
        let mut steps = Vec::with_capacity(w.fields.len());
        let mut filled = vec![false; r.fields.len()];
        for wf in &w.fields {
            let read = match r.lookup.get(&wf.name) {
                Some(&target) => {
                    filled[target] = true;
                    Step::Read { target, read: resolve(&wf.schema, &r.fields[target].schema)? }
                }
                None => Step::Skip(resolve(&wf.schema, &wf.schema)?),
            };
            steps.push(read);
        }
        let mut fields = Vec::with_capacity(r.fields.len());
        for (i, rf) in r.fields.iter().enumerate() {
            let default = if filled[i] { None } else { Some(default_of(r, i)?) };
            fields.push((rf.name.clone(), default));
        }
        Some(Program { steps, fields })
    }

    /// The reader's value of one body, or `None` (see the module contract).
    pub fn decode(&self, body: &[u8]) -> Option<Value> {
        let mut out: Vec<Option<Value>> = self.fields.iter().map(|(_, d)| d.clone()).collect();
        let mut input = Input { rest: body };
        for step in &self.steps {
            match step {
                Step::Read { target, read } => out[*target] = Some(input.value(read)?),
                Step::Skip(read) => {
                    input.value(read)?;
                }
            }
        }
        if !input.rest.is_empty() {
            return None;
        }
        let record = self.fields.iter().zip(out).map(|((name, _), v)| v.map(|v| (name.clone(), v))).collect::<Option<Vec<_>>>()?;
        Some(Value::Record(record))
    }
}

/// Reads a `writer` datum as `reader`, or `None` where this module leaves
/// the resolution to apache-avro.
fn resolve(writer: &Schema, reader: &Schema) -> Option<Read> {
    use Schema as S;
    Some(match (writer, reader) {
        (S::Union(w), S::Union(r)) => {
            let mut branches = Vec::with_capacity(w.variants().len());
            for wb in w.variants() {
                // The reader branch of exactly the writer branch's type; any
                // other match (a promotion, a named type) is left to apache-avro.
                let (i, rb) = branch(wb, r.variants())?;
                branches.push((Some(i as u32), resolve(wb, rb)?));
            }
            Read::Union(branches)
        }
        (S::Union(w), r) => {
            // Each branch resolves to the reader; one that cannot fails the
            // record in apache-avro, so it is not compiled at all.
            let branches = w.variants().iter().map(|wb| resolve(wb, r).map(|read| (None, read))).collect::<Option<Vec<_>>>()?;
            Read::Union(branches)
        }
        (w, S::Union(r)) => {
            let (i, rb) = branch(w, r.variants())?;
            Read::Wrap(i as u32, Box::new(resolve(w, rb)?))
        }
        (S::Null, S::Null) => Read::Null,
        (S::Boolean, S::Boolean) => Read::Boolean,
        (S::Int, r) => Read::Int(num(r, &[Num::Int, Num::Long, Num::Float, Num::Double])?),
        (S::Long, r) => Read::Long(num(r, &[Num::Long, Num::Float, Num::Double])?),
        (S::TimestampMillis, S::TimestampMillis) => Read::Long(Num::TimestampMillis),
        (S::TimestampMicros, S::TimestampMicros) => Read::Long(Num::TimestampMicros),
        (S::Float, r) => Read::Float(num(r, &[Num::Float, Num::Double])?),
        (S::Double, S::Double) => Read::Double,
        (S::Bytes | S::String, S::Bytes | S::String) => {
            Read::Bytes { utf8_in: matches!(writer, S::String), as_string: matches!(reader, S::String) }
        }
        (S::Enum(w), S::Enum(r)) => {
            let mut symbols = Vec::with_capacity(w.symbols.len());
            for s in &w.symbols {
                let i = r.symbols.iter().position(|x| x == s)?;
                symbols.push((i as u32, s.clone()));
            }
            Read::Enum(symbols)
        }
        (S::Map(w), S::Map(r)) => Read::Map(Box::new(item(&w.types, &r.types)?)),
        (S::Array(w), S::Array(r)) => Read::Array(Box::new(item(&w.items, &r.items)?)),
        _ => return None,
    })
}

impl Read {
    /// Whether a datum may take no bytes at all (only `null` does: a union
    /// has its index, a map or an array its end marker).
    fn may_be_empty(&self) -> bool {
        match self {
            Read::Null => true,
            Read::Wrap(_, inner) => inner.may_be_empty(),
            _ => false,
        }
    }
}

/// Items of a map or an array: each takes at least one byte, so an item
/// count is bounded by the bytes left.
fn item(writer: &Schema, reader: &Schema) -> Option<Read> {
    let read = resolve(writer, reader)?;
    if read.may_be_empty() { None } else { Some(read) }
}

fn num(reader: &Schema, allowed: &[Num]) -> Option<Num> {
    let n = match reader {
        Schema::Int => Num::Int,
        Schema::Long => Num::Long,
        Schema::Float => Num::Float,
        Schema::Double => Num::Double,
        _ => return None,
    };
    allowed.contains(&n).then_some(n)
}

/// The reader union branch a `writer` datum goes to, where apache-avro's
/// choice is sure: the one branch of exactly its kind (apache-avro looks
/// unnamed kinds up directly). Named types are tried in order and may match
/// under another name, so a reader union with two enums is left to it.
fn branch<'a>(writer: &Schema, variants: &'a [Schema]) -> Option<(usize, &'a Schema)> {
    if matches!(writer, Schema::Enum(_)) && variants.iter().filter(|v| matches!(v, Schema::Enum(_))).count() > 1 {
        return None;
    }
    variants.iter().enumerate().find(|(_, rb)| same_kind(writer, rb))
}

fn same_kind(a: &Schema, b: &Schema) -> bool {
    use Schema as S;
    match (a, b) {
        (S::Enum(x), S::Enum(y)) => x.name == y.name,
        (S::Map(_), S::Map(_)) | (S::Array(_), S::Array(_)) => true,
        (S::Record(_), _) | (_, S::Record(_)) | (S::Ref { .. }, _) | (_, S::Ref { .. }) | (S::Fixed(_), _) => false,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// The value apache-avro gives reader field `i` when the writer lacks it:
/// asked of apache-avro itself, by resolving an empty record of the
/// reader's name to a record of that one field.
fn default_of(reader: &RecordSchema, i: usize) -> Option<Value> {
    let field = &reader.fields[i];
    field.default.as_ref()?;
    let mut json = serde_json::to_value(Schema::Record(reader.clone())).ok()?;
    let one = json.get("fields")?.as_array()?.get(i)?.clone();
    json["fields"] = serde_json::Value::Array(vec![one]);
    let single = Schema::parse(&json).ok()?;
    let mut empty = json;
    empty["fields"] = serde_json::Value::Array(Vec::new());
    let empty = Schema::parse(&empty).ok()?;
    match super::wire::decode(&empty, &single, &[]).ok()? {
        Value::Record(mut f) if f.len() == 1 => f.pop().map(|(_, v)| v),
        _ => None,
    }
}

struct Input<'a> {
    rest: &'a [u8],
}

impl Input<'_> {
    fn value(&mut self, read: &Read) -> Option<Value> {
        Some(match read {
            Read::Null => Value::Null,
            Read::Boolean => match self.byte()? {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                _ => return None,
            },
            Read::Int(n) => {
                let v = self.long()?;
                let v = i32::try_from(v).ok()?;
                match n {
                    Num::Int => Value::Int(v),
                    Num::Long => Value::Long(v.into()),
                    Num::Float => Value::Float(v as f32),
                    Num::Double => Value::Double(v.into()),
                    _ => return None,
                }
            }
            Read::Long(n) => {
                let v = self.long()?;
                match n {
                    Num::Long => Value::Long(v),
                    Num::Float => Value::Float(v as f32),
                    Num::Double => Value::Double(v as f64),
                    Num::TimestampMillis => Value::TimestampMillis(v),
                    Num::TimestampMicros => Value::TimestampMicros(v),
                    Num::Int => return None,
                }
            }
            Read::Float(n) => {
                let v = f32::from_le_bytes(self.take(4)?.try_into().ok()?);
                match n {
                    Num::Float => Value::Float(v),
                    Num::Double => Value::Double(v.into()),
                    _ => return None,
                }
            }
            Read::Double => Value::Double(f64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            Read::Bytes { utf8_in, as_string } => {
                let bytes = self.sized()?;
                if *utf8_in || *as_string {
                    let text = std::str::from_utf8(bytes).ok()?;
                    if *as_string { Value::String(text.to_owned()) } else { Value::Bytes(bytes.to_vec()) }
                } else {
                    Value::Bytes(bytes.to_vec())
                }
            }
            Read::Enum(symbols) => {
                let i = usize::try_from(self.long()?).ok()?;
                let (index, symbol) = symbols.get(i)?;
                Value::Enum(*index, symbol.clone())
            }
            Read::Union(branches) => {
                let i = usize::try_from(self.long()?).ok()?;
                let (target, read) = branches.get(i)?;
                let v = self.value(read)?;
                match target {
                    Some(t) => Value::Union(*t, Box::new(v)),
                    None => v,
                }
            }
            Read::Wrap(target, read) => Value::Union(*target, Box::new(self.value(read)?)),
            Read::Map(values) => {
                let mut map = HashMap::new();
                while let Some(n) = self.block()? {
                    for _ in 0..n {
                        let key = std::str::from_utf8(self.sized()?).ok()?.to_owned();
                        let v = self.value(values)?;
                        map.insert(key, v);
                    }
                }
                Value::Map(map)
            }
            Read::Array(items) => {
                let mut list = Vec::new();
                while let Some(n) = self.block()? {
                    list.reserve(n);
                    for _ in 0..n {
                        list.push(self.value(items)?);
                    }
                }
                Value::Array(list)
            }
        })
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    /// A zig-zag varint of at most 10 bytes whose bits fit 64.
    fn long(&mut self) -> Option<i64> {
        let mut raw = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            if i == 9 && b > 1 {
                return None;
            }
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        None
    }

    /// A length-prefixed byte string, its length checked against the input.
    fn sized(&mut self) -> Option<&[u8]> {
        let n = usize::try_from(self.long()?).ok()?;
        self.take(n)
    }

    /// The item count of the next block of a map or array (`None` inside
    /// the `Option` at the end marker). A negative count is followed by the
    /// block's size in bytes. Every item takes at least a byte, so a count
    /// above the bytes left cannot be honest.
    fn block(&mut self) -> Option<Option<usize>> {
        let n = self.long()?;
        if n == 0 {
            return Some(None);
        }
        let n = if n < 0 {
            self.long()?;
            n.checked_neg()?
        } else {
            n
        };
        let n = usize::try_from(n).ok()?;
        if n > self.rest.len() {
            return None;
        }
        Some(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::types::Value;

    use super::*;
    use crate::avro::wire;
    use crate::avro::{ATOM_INGESTION_REQUEST, Schemas};

    fn parse(json: &str) -> Schema {
        Schema::parse_str(json).unwrap()
    }

    /// Equal as Avro values: floats by their bits (NaN included), maps by key.
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
            (Value::Double(x), Value::Double(y)) => x.to_bits() == y.to_bits(),
            (Value::Union(i, x), Value::Union(j, y)) => i == j && same(x, y),
            (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
            (Value::Map(x), Value::Map(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w))),
            (Value::Record(x), Value::Record(y)) => x.len() == y.len() && x.iter().zip(y).all(|((k, v), (l, w))| k == l && same(v, w)),
            _ => a == b,
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A random value of `schema` (flat schemas only).
    fn random(schema: &Schema, rng: &mut Rng) -> Value {
        match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => Value::Boolean(rng.below(2) == 1),
            Schema::Int => Value::Int(rng.next() as i32 >> rng.below(32)),
            Schema::Long => Value::Long(rng.next() as i64 >> rng.below(64)),
            Schema::TimestampMillis => Value::TimestampMillis(rng.next() as i64 >> rng.below(64)),
            Schema::Float => Value::Float(f32::from_bits(rng.next() as u32)),
            Schema::Double => Value::Double(f64::from_bits(rng.next())),
            Schema::Bytes => Value::Bytes((0..rng.below(12)).map(|_| rng.next() as u8).collect()),
            Schema::String => Value::String((0..rng.below(12)).map(|_| ['a', 'é', '😀', 'z'][rng.below(4)]).collect()),
            Schema::Enum(e) => {
                let i = rng.below(e.symbols.len());
                Value::Enum(i as u32, e.symbols[i].clone())
            }
            Schema::Union(u) => {
                let i = rng.below(u.variants().len());
                Value::Union(i as u32, Box::new(random(&u.variants()[i], rng)))
            }
            Schema::Array(a) => Value::Array((0..rng.below(4)).map(|_| random(&a.items, rng)).collect()),
            Schema::Map(m) => Value::Map((0..rng.below(4)).map(|i| (format!("k{i}"), random(&m.types, rng))).collect()),
            Schema::Record(r) => Value::Record(r.fields.iter().map(|f| (f.name.clone(), random(&f.schema, rng))).collect()),
            other => panic!("no random values of {other:?}"),
        }
    }

    /// For random records of `writer`, and every prefix and many mutations
    /// of their bodies: whenever the program answers, apache-avro answers
    /// the same. Returns how many bodies the program decoded.
    fn agrees(writer: &Schema, reader: &Schema, seed: u64) -> usize {
        let program = Program::compile(writer, reader).expect("compiles");
        let mut rng = Rng(seed);
        let mut decoded = 0;
        for _ in 0..200 {
            #[allow(deprecated)]
            let body = apache_avro::to_avro_datum(writer, random(writer, &mut rng)).unwrap();
            // A body of the writer schema that the reader cannot take (bytes
            // that are not UTF-8, read as a string) is apache-avro's to reject.
            match wire::decode(writer, reader, &body) {
                Ok(slow) => {
                    let fast = program.decode(&body).expect("a body apache-avro decodes decodes on the fast path");
                    assert!(same(&fast, &slow), "fast {fast:?}\nslow {slow:?}");
                    decoded += 1;
                }
                Err(_) => assert!(program.decode(&body).is_none(), "fast path decoded what apache-avro rejects: {body:?}"),
            }
            let mut bodies: Vec<Vec<u8>> = (0..body.len()).map(|n| body[..n].to_vec()).collect();
            bodies.push([body.as_slice(), &[0]].concat());
            for _ in 0..20 {
                let mut m = body.clone();
                if !m.is_empty() {
                    let i = rng.below(m.len());
                    m[i] = rng.next() as u8;
                }
                bodies.push(m);
            }
            for b in bodies {
                if let Some(fast) = program.decode(&b) {
                    let slow = wire::decode(writer, reader, &b).unwrap_or_else(|e| panic!("fast path decoded what apache-avro rejects ({e}): {b:?}"));
                    assert!(same(&fast, &slow), "fast {fast:?}\nslow {slow:?}\nbody {b:?}");
                    decoded += 1;
                }
            }
        }
        decoded
    }

    fn request(version: u32) -> Schema {
        Schemas::version(ATOM_INGESTION_REQUEST, version).unwrap().schema.as_ref().clone()
    }

    #[test]
    fn request_schemas_agree_with_apache_avro_in_every_direction() {
        let (v1, v2) = (request(1), request(2));
        for (w, r) in [(&v2, &v2), (&v1, &v2), (&v2, &v1), (&v1, &v1)] {
            assert!(agrees(w, r, 7) > 200);
        }
    }

    #[test]
    fn a_v1_body_reads_as_v2_with_created_at_null() {
        let body = [20, b't', b'e', b'x', b't', b'/', b'p', b'l', b'a', b'i', b'n', 2, b'x', 0, 2, b's', 2, b'c'];
        let Value::Record(fields) = Program::compile(&request(1), &request(2)).unwrap().decode(&body).unwrap() else { panic!() };
        assert_eq!(fields.last().unwrap(), &("created_at_ms".to_string(), Value::Union(0, Box::new(Value::Null))));
    }

    #[test]
    fn promotions_defaults_enums_and_dropped_fields_agree_with_apache_avro() {
        let writer = parse(
            r#"{"type":"record","name":"R","fields":[
              {"name":"a","type":"int"},{"name":"b","type":"long"},{"name":"c","type":"float"},
              {"name":"d","type":"string"},{"name":"e","type":"bytes"},
              {"name":"f","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
              {"name":"g","type":{"type":"array","items":"int"}},{"name":"h","type":{"type":"map","values":"long"}},
              {"name":"u","type":["null","string"]},{"name":"s","type":"string"},{"name":"dropped","type":["null","double","boolean"]},
              {"name":"i","type":"int"},{"name":"l","type":"long"}]}"#,
        );
        let reader = parse(
            r#"{"type":"record","name":"R","fields":[
              {"name":"extra","type":"int","default":7},
              {"name":"h","type":{"type":"map","values":"double"}},{"name":"g","type":{"type":"array","items":"long"}},
              {"name":"a","type":"long"},{"name":"b","type":"double"},{"name":"c","type":"double"},
              {"name":"d","type":"bytes"},{"name":"e","type":"string"},
              {"name":"f","type":{"type":"enum","name":"E","symbols":["Z","Y","X"]}},
              {"name":"u","type":["null","string"]},{"name":"s","type":["null","string"]},
              {"name":"i","type":"float"},{"name":"l","type":"float"},
              {"name":"extra2","type":["null","long"],"default":null},{"name":"extra3","type":"string","default":"x"},
              {"name":"extra4","type":{"type":"map","values":"string"},"default":{"k":"v"}}]}"#,
        );
        // `e` is bytes read as a string: random bytes are rarely UTF-8, and
        // apache-avro rejects those; the program must leave them to it.
        assert!(agrees(&writer, &reader, 11) > 200);
    }

    #[test]
    fn what_it_does_not_take_on_is_left_to_apache_avro() {
        let nested = parse(r#"{"type":"record","name":"R","fields":[{"name":"n","type":{"type":"record","name":"N","fields":[]}}]}"#);
        assert!(Program::compile(&nested, &nested).is_none());
        // A union branch that needs a promotion, and a writer union whose
        // null branch the reader cannot take.
        let w = parse(r#"{"type":"record","name":"R","fields":[{"name":"x","type":["null","int"]}]}"#);
        let r = parse(r#"{"type":"record","name":"R","fields":[{"name":"x","type":["null","long"]}]}"#);
        assert!(Program::compile(&w, &r).is_none());
        let r = parse(r#"{"type":"record","name":"R","fields":[{"name":"x","type":"int"}]}"#);
        assert!(Program::compile(&w, &r).is_none());
        // A missing reader field without a default fails in apache-avro.
        let r = parse(r#"{"type":"record","name":"R","fields":[{"name":"y","type":"int"}]}"#);
        assert!(Program::compile(&w, &r).is_none());
        // A reader union of two enums: apache-avro tries them in order.
        let w = parse(r#"{"type":"record","name":"R","fields":[{"name":"x","type":{"type":"enum","name":"A","symbols":["S"]}}]}"#);
        let r = parse(
            r#"{"type":"record","name":"R","fields":[{"name":"x","type":[{"type":"enum","name":"B","symbols":["S"]},{"type":"enum","name":"A","symbols":["S"]}]}]}"#,
        );
        assert!(Program::compile(&w, &r).is_none());
        // Arrays of nulls take no bytes per item: their count is not bounded by the body.
        let nulls = parse(r#"{"type":"record","name":"R","fields":[{"name":"x","type":{"type":"array","items":"null"}}]}"#);
        assert!(Program::compile(&nulls, &nulls).is_none());
    }

    #[test]
    fn a_count_beyond_the_body_allocates_nothing() {
        let s = parse(r#"{"type":"record","name":"R","fields":[{"name":"x","type":{"type":"map","values":"string"}}]}"#);
        let p = Program::compile(&s, &s).unwrap();
        // A block of 2^62 items in a 10-byte body, and a string of 2^62 bytes.
        assert!(p.decode(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0]).is_none());
        assert!(p.decode(&[2, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_none());
    }
}
