//! A bounded walk over one Avro binary datum, run before apache-avro decodes
//! data written with a *recursive* (or very deep) writer schema.
//!
//! # Why
//!
//! apache-avro decodes recursively, one call per nested value. A recursive
//! schema (a record that refers to itself, e.g.
//! `{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}`)
//! lets a producer nest data without limit, and 100,000 levels overflow the
//! stack, which aborts the whole process: a poison record becomes an outage.
//! Resolving and dropping such a value are recursive too.
//!
//! apache-avro's frames are also large: in a debug build one nesting level
//! (a record and the union holding the next one) takes about 100 KB of
//! stack, so about 21 levels fill a 2 MiB thread stack (measured with
//! apache-avro 0.22). So even a schema that is not recursive, but merely
//! deep, could crash a debug build.
//!
//! # What
//!
//! [`Walker::new`] compiles a writer schema once into a small graph of nodes
//! (named types are shared, so a recursive schema is a cycle), tells
//! whether the schema is recursive ([`Walker::is_recursive`]) and, if not,
//! how deep its data can nest ([`Walker::static_depth`]). Data of a schema
//! bounded to [`INLINE_DEPTH`] levels and without arrays or maps
//! ([`Walker::has_collections`]) needs no walk. For any other,
//! [`Walker::walk`] reads the body against the schema with an explicit depth
//! counter, consuming exactly what a decoder would, and fails with
//! [`WalkError::TooDeep`] as soon as the data nests deeper than
//! [`MAX_DEPTH`]; otherwise it reports how deep the data actually nests.
//! Only a body that passes goes to apache-avro: on the calling thread if it
//! nests at most [`INLINE_DEPTH`] levels, else on a thread with a
//! [`DECODE_STACK_BYTES`] stack, sized for [`MAX_DEPTH`] levels with a wide
//! margin (see `super::decoder`).
//!
//! Depth counts records, arrays and maps (the levels a person sees in the
//! JSON form of the value); the outermost record is level 1. Unions do not
//! count: a union always sits between two such levels of a recursive path,
//! so they at most double the decoder's frames per level.
//!
//! # Guarantees on garbage
//!
//! The walk never panics, allocates nothing that depends on the input, and
//! recurses at most `limit` levels (a few small frames each). Its work is
//! bounded: every value it visits either consumes input bytes or is an
//! array/map item counted against [`item_budget`] (zero-byte items such as
//! `null` could otherwise make a 5-byte block count loop for ever). It checks
//! what it must to stay in step with the bytes (varint length, union branch,
//! enum symbol, non-negative lengths, the input not running out) and leaves
//! everything else (UTF-8, logical-type contents, trailing bytes) to
//! apache-avro, which reads the body next.

use std::collections::{HashMap, HashSet};

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, Name, UuidSchema};
use apache_avro::types::Value;

use super::wire::MAX_ALLOCATION_BYTES;

/// Deepest nesting of records, arrays and maps accepted in data written with
/// a recursive schema. Real data (a request with a few nested structures, or
/// a tree a few dozen levels deep) stays far below it.
pub const MAX_DEPTH: usize = 64;

/// Data of a schema that nests at most this deep is decoded on the calling
/// thread: at about 100 KB per level in a debug build (less in release) it
/// leaves more than half of a 2 MiB stack (tokio's and the test runner's
/// default) to the caller. Deeper or recursive schemas are decoded on a
/// thread of their own with [`DECODE_STACK_BYTES`].
pub const INLINE_DEPTH: usize = 8;

/// Stack of the thread that decodes data nesting deeper than
/// [`INLINE_DEPTH`]: [`MAX_DEPTH`] levels of writer decoding and of reader
/// resolution at debug-build frame sizes, about 13 MB, with room to spare.
/// Only the pages used are committed.
pub const DECODE_STACK_BYTES: usize = 32 * 1024 * 1024;

/// Why a body failed the walk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The data nests deeper than the limit.
    #[error("data nests deeper than {limit} levels of records, arrays and maps")]
    TooDeep { limit: usize },
    /// The body ended before the datum did.
    #[error("body ends before the datum does")]
    Truncated,
    /// The bytes cannot be data of this schema.
    #[error("{0}")]
    Malformed(String),
}

/// Most array and map items one walk visits beyond one per input byte:
/// apache-avro's own ceiling for one collection of [`Value`]s under
/// [`MAX_ALLOCATION_BYTES`]. Items of at least one byte are bounded by the
/// body; this bounds the zero-byte ones (`null`, an empty record, `fixed(0)`).
pub fn item_budget(body_len: usize) -> usize {
    body_len.saturating_add(MAX_ALLOCATION_BYTES / std::mem::size_of::<Value>())
}

/// One node of a compiled schema; children are indices into [`Walker::nodes`].
#[derive(Debug, Clone)]
enum Node {
    Null,
    Boolean,
    /// A varint whose zig-zag value must fit in 32 bits.
    Int,
    /// A varint of at most 10 bytes.
    Long,
    /// `n` raw bytes: float (4), double (8), fixed, duration (12).
    Raw(usize),
    /// A long length, then that many bytes: bytes and string.
    Bytes,
    /// An int index below `symbols`.
    Enum {
        symbols: usize,
    },
    Union(Vec<usize>),
    Array(usize),
    Map(usize),
    Record(Vec<usize>),
}

/// A writer schema compiled for [`Walker::walk`].
#[derive(Debug, Clone)]
pub struct Walker {
    nodes: Vec<Node>,
    recursive: bool,
    /// Deepest nesting of the data, if not recursive.
    depth: usize,
}

impl Walker {
    /// Compiles `schema`. Fails only for a schema apache-avro itself could
    /// not use (a reference to a name it does not define).
    ///
    /// Compilation recurses over the schema's own structure, which is as
    /// deep as its JSON text, and schema text parsed by `serde_json` is at
    /// most 128 levels deep.
    pub fn new(schema: &Schema) -> Result<Self, String> {
        let mut c = Compiler::default();
        let root = c.compile(schema, None)?;
        debug_assert_eq!(root, 0, "the root is compiled first");
        Ok(Self { depth: c.depth[root], nodes: c.nodes, recursive: c.recursive })
    }

    /// Whether some record of the schema contains itself, so that its data
    /// can nest without limit.
    pub fn is_recursive(&self) -> bool {
        self.recursive
    }

    /// How deep data of this schema can nest (records, arrays and maps);
    /// `None` if it is recursive and so has no bound.
    pub fn static_depth(&self) -> Option<usize> {
        (!self.recursive).then_some(self.depth)
    }

    /// Whether data of the schema can hold arrays or maps. A block count
    /// claims many items in a few bytes and an item may take none (`null`,
    /// an empty record), and apache-avro caps each collection at
    /// [`MAX_ALLOCATION_BYTES`] but not their sum: only the walk, which
    /// counts every item of a body against one [`item_budget`], bounds it.
    pub fn has_collections(&self) -> bool {
        self.nodes.iter().any(|n| matches!(n, Node::Array(_) | Node::Map(_)))
    }

    /// Reads one datum from the start of `body` against the schema, nesting
    /// at most `limit` levels. Returns how many bytes the datum takes (what
    /// is left over is the caller's business) and how deep it nests.
    pub fn walk(&self, body: &[u8], limit: usize) -> Result<Walked, WalkError> {
        let mut cursor = Cursor { input: body, at: 0, items_left: item_budget(body.len()), deepest: 0 };
        self.node(0, 0, limit, &mut cursor)?;
        Ok(Walked { len: cursor.at, depth: cursor.deepest })
    }

    fn node(&self, index: usize, depth: usize, limit: usize, c: &mut Cursor<'_>) -> Result<(), WalkError> {
        match &self.nodes[index] {
            Node::Null => Ok(()),
            Node::Boolean => match c.take(1)?[0] {
                0 | 1 => Ok(()),
                b => Err(WalkError::Malformed(format!("boolean byte {b:#04x} is neither 0 nor 1"))),
            },
            Node::Int => c.int().map(drop),
            Node::Long => c.long().map(drop),
            Node::Raw(n) => c.take(*n).map(drop),
            Node::Bytes => {
                let len = c.length()?;
                c.take(len).map(drop)
            }
            Node::Enum { symbols } => {
                let i = c.int()?;
                if i < 0 || i as usize >= *symbols {
                    return Err(WalkError::Malformed(format!("enum index {i} is not one of the {symbols} symbols")));
                }
                Ok(())
            }
            Node::Union(branches) => {
                let i = c.long()?;
                let Some(&branch) = usize::try_from(i).ok().and_then(|i| branches.get(i)) else {
                    return Err(WalkError::Malformed(format!("union branch {i} does not exist (the union has {})", branches.len())));
                };
                // A branch is the same level as the union.
                self.node(branch, depth, limit, c)
            }
            Node::Record(fields) => {
                let depth = c.enter(depth, limit)?;
                for &f in fields {
                    self.node(f, depth, limit, c)?;
                }
                Ok(())
            }
            Node::Array(items) => {
                let depth = c.enter(depth, limit)?;
                while let Some(n) = c.block()? {
                    for _ in 0..n {
                        self.node(*items, depth, limit, c)?;
                    }
                }
                Ok(())
            }
            Node::Map(values) => {
                let depth = c.enter(depth, limit)?;
                while let Some(n) = c.block()? {
                    for _ in 0..n {
                        let key = c.length()?;
                        c.take(key)?;
                        self.node(*values, depth, limit, c)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// What a successful walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// Bytes the datum takes.
    pub len: usize,
    /// How deep the datum nests (records, arrays and maps).
    pub depth: usize,
}

struct Cursor<'a> {
    input: &'a [u8],
    at: usize,
    /// Array and map items this walk may still visit.
    items_left: usize,
    /// Deepest level entered so far.
    deepest: usize,
}

impl Cursor<'_> {
    /// One level deeper, unless that passes `limit`.
    fn enter(&mut self, depth: usize, limit: usize) -> Result<usize, WalkError> {
        if depth >= limit {
            return Err(WalkError::TooDeep { limit });
        }
        self.deepest = self.deepest.max(depth + 1);
        Ok(depth + 1)
    }
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WalkError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.input.len()).ok_or(WalkError::Truncated)?;
        let bytes = &self.input[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    /// A zig-zag varint of at most 10 bytes.
    fn long(&mut self) -> Result<i64, WalkError> {
        let mut raw: u64 = 0;
        for i in 0..10 {
            let b = self.take(1)?[0];
            if i == 9 && b > 1 {
                return Err(WalkError::Malformed("varint overflows 64 bits".into()));
            }
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        Err(WalkError::Malformed("varint longer than 10 bytes".into()))
    }

    fn int(&mut self) -> Result<i32, WalkError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| WalkError::Malformed(format!("int value {v} does not fit in 32 bits")))
    }

    /// A non-negative long length of bytes still to come.
    fn length(&mut self) -> Result<usize, WalkError> {
        let len = self.long()?;
        let len = usize::try_from(len).map_err(|_| WalkError::Malformed(format!("negative length {len}")))?;
        if len > self.input.len() - self.at {
            return Err(WalkError::Truncated);
        }
        Ok(len)
    }

    /// The item count of the next array or map block; `None` at the
    /// terminating empty block. A negative count is followed by the block's
    /// size in bytes, which is read and not trusted.
    fn block(&mut self) -> Result<Option<usize>, WalkError> {
        let count = self.long()?;
        if count == 0 {
            return Ok(None);
        }
        if count < 0 {
            let size = self.long()?;
            if size < 0 {
                return Err(WalkError::Malformed(format!("negative block size {size}")));
            }
        }
        let n = count.checked_abs().and_then(|n| usize::try_from(n).ok());
        match n {
            Some(n) if n <= self.items_left => {
                self.items_left -= n;
                Ok(Some(n))
            }
            _ => Err(WalkError::Malformed(format!("block of {count} items is more than this body can hold"))),
        }
    }
}

#[derive(Default)]
struct Compiler {
    nodes: Vec<Node>,
    /// Parallel to `nodes`: the deepest nesting below and including each
    /// node, ignoring back-edges of cycles.
    depth: Vec<usize>,
    /// Fully qualified name → node, for references.
    named: HashMap<Name, usize>,
    /// Records whose fields are being compiled: a reference to one of them
    /// closes a cycle.
    open: HashSet<usize>,
    recursive: bool,
}

impl Compiler {
    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.depth.push(0);
        self.nodes.len() - 1
    }

    /// Fills in a container node once its children are compiled.
    fn finish(&mut self, index: usize, node: Node, children: &[usize], level: usize) -> usize {
        self.depth[index] = level + children.iter().map(|&c| self.depth[c]).max().unwrap_or(0);
        self.nodes[index] = node;
        index
    }

    fn define(&mut self, name: &Name, namespace: Option<&str>, node: Node) -> usize {
        let index = self.push(node);
        self.named.insert(name.fully_qualified_name(namespace).into_owned(), index);
        index
    }

    fn compile(&mut self, schema: &Schema, namespace: Option<&str>) -> Result<usize, String> {
        Ok(match schema {
            Schema::Null => self.push(Node::Null),
            Schema::Boolean => self.push(Node::Boolean),
            Schema::Int | Schema::Date | Schema::TimeMillis => self.push(Node::Int),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.push(Node::Long),
            Schema::Float => self.push(Node::Raw(4)),
            Schema::Double => self.push(Node::Raw(8)),
            Schema::Bytes
            | Schema::String
            | Schema::BigDecimal
            | Schema::Uuid(UuidSchema::String | UuidSchema::Bytes)
            | Schema::Decimal(apache_avro::schema::DecimalSchema { inner: InnerDecimalSchema::Bytes, .. }) => self.push(Node::Bytes),
            Schema::Fixed(f)
            | Schema::Duration(f)
            | Schema::Uuid(UuidSchema::Fixed(f))
            | Schema::Decimal(apache_avro::schema::DecimalSchema { inner: InnerDecimalSchema::Fixed(f), .. }) => {
                self.define(&f.name, namespace, Node::Raw(f.size))
            }
            Schema::Enum(e) => self.define(&e.name, namespace, Node::Enum { symbols: e.symbols.len() }),
            Schema::Array(a) => {
                let index = self.push(Node::Array(usize::MAX));
                let items = self.compile(&a.items, namespace)?;
                self.finish(index, Node::Array(items), &[items], 1)
            }
            Schema::Map(m) => {
                let index = self.push(Node::Map(usize::MAX));
                let values = self.compile(&m.types, namespace)?;
                self.finish(index, Node::Map(values), &[values], 1)
            }
            Schema::Union(u) => {
                let index = self.push(Node::Union(Vec::new()));
                let branches = u.variants().iter().map(|v| self.compile(v, namespace)).collect::<Result<Vec<_>, _>>()?;
                self.finish(index, Node::Union(branches.clone()), &branches, 0)
            }
            Schema::Record(r) => {
                let name = r.name.fully_qualified_name(namespace).into_owned();
                let inner = name.namespace().map(str::to_string);
                let index = self.define(&name, None, Node::Record(Vec::new()));
                self.open.insert(index);
                let fields = r.fields.iter().map(|f| self.compile(&f.schema, inner.as_deref())).collect::<Result<Vec<_>, _>>()?;
                self.open.remove(&index);
                self.finish(index, Node::Record(fields.clone()), &fields, 1)
            }
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(namespace);
                let &index =
                    self.named.get(full.as_ref()).ok_or_else(|| format!("reference to undefined type `{}`", full.fullname(None)))?;
                if self.open.contains(&index) {
                    self.recursive = true;
                }
                index
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk's length, for comparisons.
    fn run(w: &Walker, body: &[u8], limit: usize) -> Result<usize, WalkError> {
        w.walk(body, limit).map(|walked| walked.len)
    }

    fn walker(json: &str) -> Walker {
        Walker::new(&Schema::parse_str(json).unwrap()).unwrap()
    }

    /// Zig-zag varint of `v`.
    fn zz(v: i64) -> Vec<u8> {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    const NODE: &str = r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#;

    /// `levels` nested Nodes: the first `levels - 1` take branch 1 (Node),
    /// the last takes branch 0 (null).
    fn nodes(levels: usize) -> Vec<u8> {
        let mut body = vec![2u8; levels - 1];
        body.push(0);
        body
    }

    #[test]
    fn each_primitive_consumes_exactly_its_encoding() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (r#""null""#, vec![]),
            (r#""boolean""#, vec![1]),
            (r#""int""#, zz(-70_000)),
            (r#""long""#, zz(i64::MIN)),
            (r#""float""#, 1.5f32.to_le_bytes().to_vec()),
            (r#""double""#, 2.5f64.to_le_bytes().to_vec()),
            (r#""bytes""#, cat(&[&zz(3), &[0, 255, 7]])),
            (r#""string""#, cat(&[&zz(5), b"hello"])),
            (r#"{"type":"fixed","name":"F","size":3}"#, vec![1, 2, 3]),
            (r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#, zz(2)),
            (r#"{"type":"int","logicalType":"date"}"#, zz(19_000)),
            (r#"{"type":"long","logicalType":"timestamp-millis"}"#, zz(1_700_000_000_000)),
            (r#"{"type":"long","logicalType":"local-timestamp-nanos"}"#, zz(-1)),
            (r#"{"type":"bytes","logicalType":"decimal","precision":4,"scale":2}"#, cat(&[&zz(2), &[0x04, 0xd2]])),
            (r#"{"type":"fixed","name":"D","size":4,"logicalType":"decimal","precision":4}"#, vec![0, 0, 4, 210]),
            (r#"{"type":"string","logicalType":"uuid"}"#, cat(&[&zz(36), "67e55044-10b1-426f-9247-bb680e5fe0c8".as_bytes()])),
            (r#"{"type":"fixed","name":"U","size":16,"logicalType":"uuid"}"#, vec![7; 16]),
            (r#"{"type":"fixed","name":"Dur","size":12,"logicalType":"duration"}"#, vec![0; 12]),
        ];
        for (schema, body) in cases {
            let w = walker(schema);
            assert!(!w.is_recursive(), "{schema}");
            let mut with_tail = body.clone();
            with_tail.extend_from_slice(&[0xEE, 0xEE]);
            assert_eq!(run(&w, &with_tail, MAX_DEPTH), Ok(body.len()), "{schema}");
            // Every strict prefix of a non-empty encoding is truncated.
            for cut in 0..body.len() {
                assert_eq!(run(&w, &body[..cut], MAX_DEPTH), Err(WalkError::Truncated), "{schema} cut at {cut}");
            }
        }
    }

    #[test]
    fn the_walk_agrees_with_apache_avro_on_a_composite_value() {
        let json = r#"{"type":"record","name":"R","namespace":"x","fields":[
            {"name":"a","type":{"type":"array","items":"long"}},
            {"name":"m","type":{"type":"map","values":["null","string"]}},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["P","Q"]}},
            {"name":"again","type":"E"},
            {"name":"inner","type":{"type":"record","name":"I","fields":[{"name":"f","type":"float"}]}},
            {"name":"more","type":{"type":"array","items":"I"}}
        ]}"#;
        let schema = Schema::parse_str(json).unwrap();
        let value = Value::Record(vec![
            ("a".into(), Value::Array(vec![Value::Long(1), Value::Long(-300)])),
            ("m".into(), Value::Map([("k".to_string(), Value::Union(1, Box::new(Value::String("v".into()))))].into())),
            ("e".into(), Value::Enum(1, "Q".into())),
            ("again".into(), Value::Enum(0, "P".into())),
            ("inner".into(), Value::Record(vec![("f".into(), Value::Float(0.5))])),
            ("more".into(), Value::Array(vec![Value::Record(vec![("f".into(), Value::Float(1.0))])])),
        ]);
        let body = crate::avro::wire::encode(0, &schema, &value).unwrap()[crate::avro::wire::HEADER_LEN..].to_vec();
        let w = Walker::new(&schema).unwrap();
        assert!(!w.is_recursive(), "a type used twice is not a cycle");
        assert_eq!(run(&w, &body, MAX_DEPTH), Ok(body.len()));
        // Records, arrays and maps are levels: R > more > I is 3 deep.
        assert_eq!(run(&w, &body, 3), Ok(body.len()));
        assert_eq!(run(&w, &body, 2), Err(WalkError::TooDeep { limit: 2 }));
        for cut in 0..body.len() {
            assert_eq!(run(&w, &body[..cut], MAX_DEPTH), Err(WalkError::Truncated), "cut at {cut}");
        }
    }

    #[test]
    fn blocks_with_negative_counts_carry_a_byte_size() {
        let w = walker(r#"{"type":"array","items":"int"}"#);
        // Block of -2 items with a 2-byte size, then a block of 1, then the end.
        let body = cat(&[&zz(-2), &zz(2), &zz(5), &zz(6), &zz(1), &zz(7), &zz(0)]);
        assert_eq!(run(&w, &body, MAX_DEPTH), Ok(body.len()));
        let w = walker(r#"{"type":"map","values":"boolean"}"#);
        let body = cat(&[&zz(-1), &zz(3), &zz(1), b"k", &[1], &zz(0)]);
        assert_eq!(run(&w, &body, MAX_DEPTH), Ok(body.len()));
        // A negative size, and a count whose absolute value overflows.
        let w = walker(r#"{"type":"array","items":"null"}"#);
        assert!(matches!(run(&w, &cat(&[&zz(-1), &zz(-5)]), MAX_DEPTH), Err(WalkError::Malformed(_))));
        assert!(matches!(run(&w, &cat(&[&zz(i64::MIN), &zz(0)]), MAX_DEPTH), Err(WalkError::Malformed(_))));
    }

    #[test]
    fn zero_byte_items_cannot_make_the_walk_loop_for_ever() {
        let w = walker(r#"{"type":"array","items":"null"}"#);
        // A few nulls are fine.
        let body = cat(&[&zz(1000), &zz(0)]);
        assert_eq!(run(&w, &body, MAX_DEPTH), Ok(body.len()));
        // 2^62 nulls in 10 bytes: refused at once, not counted out.
        let body = cat(&[&zz(1 << 62), &zz(0)]);
        assert!(matches!(run(&w, &body, MAX_DEPTH), Err(WalkError::Malformed(m)) if m.contains("more than")));
        // Blocks that pass the budget only together (the body's own bytes
        // add a few items to it).
        let per_block = item_budget(0) as i64 / 2 + 50;
        let body = cat(&[&zz(per_block), &zz(per_block), &zz(0)]);
        assert!(matches!(run(&w, &body, MAX_DEPTH), Err(WalkError::Malformed(_))));
    }

    #[test]
    fn bad_indices_lengths_and_varints_are_malformed() {
        let w = walker(r#"["null","string"]"#);
        assert!(matches!(run(&w, &zz(2), MAX_DEPTH), Err(WalkError::Malformed(m)) if m.contains("branch 2")));
        assert!(matches!(run(&w, &zz(-1), MAX_DEPTH), Err(WalkError::Malformed(_))));
        let w = walker(r#"{"type":"enum","name":"E","symbols":["A"]}"#);
        assert!(matches!(run(&w, &zz(1), MAX_DEPTH), Err(WalkError::Malformed(_))));
        let w = walker(r#""string""#);
        assert!(matches!(run(&w, &zz(-3), MAX_DEPTH), Err(WalkError::Malformed(m)) if m.contains("negative")));
        assert_eq!(run(&w, &zz(i64::MAX), MAX_DEPTH), Err(WalkError::Truncated), "a huge length is never allocated");
        let w = walker(r#""int""#);
        assert!(matches!(run(&w, &zz(1 << 40), MAX_DEPTH), Err(WalkError::Malformed(_))));
        let w = walker(r#""long""#);
        assert!(matches!(run(&w, &[0xff; 11], MAX_DEPTH), Err(WalkError::Malformed(_))));
        assert!(matches!(run(&w, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], MAX_DEPTH), Err(WalkError::Malformed(_))));
        let w = walker(r#""boolean""#);
        assert!(matches!(run(&w, &[2], MAX_DEPTH), Err(WalkError::Malformed(_))));
    }

    #[test]
    fn garbage_never_panics() {
        let schemas = [
            NODE,
            r#"{"type":"record","name":"T","fields":[{"name":"kids","type":{"type":"array","items":"T"}},{"name":"tags","type":{"type":"map","values":"T"}},{"name":"s","type":"string"}]}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"u","type":["null","int","double",{"type":"enum","name":"E","symbols":["A","B"]},{"type":"fixed","name":"F","size":2}]}]}"#,
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for schema in schemas {
            let w = walker(schema);
            for len in 0..200 {
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                if let Ok(n) = run(&w, &body, MAX_DEPTH) {
                    assert!(n <= body.len());
                }
            }
        }
    }

    #[test]
    fn static_depth_counts_records_arrays_and_maps() {
        assert_eq!(walker(r#""string""#).static_depth(), Some(0));
        assert_eq!(walker(r#"{"type":"record","name":"R","fields":[]}"#).static_depth(), Some(1));
        let request = walker(crate::avro::Schemas::current(crate::avro::ATOM_INGESTION_REQUEST).unwrap().source);
        assert_eq!(request.static_depth(), Some(2), "the request record and its metadata map");
        // A type defined once and used again keeps its depth.
        let reuse = walker(
            r#"{"type":"record","name":"R","fields":[
                {"name":"a","type":{"type":"record","name":"I","fields":[{"name":"x","type":{"type":"array","items":"long"}}]}},
                {"name":"b","type":{"type":"map","values":["null","I"]}}]}"#,
        );
        assert_eq!(reuse.static_depth(), Some(4), "R > map > I > array");
        assert_eq!(walker(NODE).static_depth(), None);
    }

    #[test]
    fn collections_are_found_wherever_they_are() {
        assert!(!walker(r#""string""#).has_collections());
        assert!(!walker(NODE).has_collections());
        assert!(
            walker(r#"{"type":"record","name":"R","fields":[{"name":"u","type":["null",{"type":"array","items":"null"}]}]}"#)
                .has_collections()
        );
        assert!(
            walker(crate::avro::Schemas::current(crate::avro::ATOM_INGESTION_REQUEST).unwrap().source).has_collections(),
            "its metadata map"
        );
    }

    #[test]
    fn self_reference_is_recursive_and_shallow_data_passes() {
        let w = walker(NODE);
        assert!(w.is_recursive());
        let body = nodes(3);
        assert_eq!(run(&w, &body, MAX_DEPTH), Ok(3));
        assert_eq!(run(&w, &nodes(MAX_DEPTH), MAX_DEPTH), Ok(MAX_DEPTH), "exactly the limit passes");
        assert_eq!(run(&w, &nodes(MAX_DEPTH + 1), MAX_DEPTH), Err(WalkError::TooDeep { limit: MAX_DEPTH }));
        assert_eq!(w.walk(&nodes(5), MAX_DEPTH), Ok(Walked { len: 5, depth: 5 }), "the walk reports the depth it found");
        assert_eq!(run(&w, &nodes(3)[..2], MAX_DEPTH), Err(WalkError::Truncated));
    }

    #[test]
    fn recursion_through_arrays_maps_and_namespaces_is_found() {
        let tree = walker(
            r#"{"type":"record","name":"Tree","namespace":"a.b","fields":[{"name":"kids","type":{"type":"array","items":"a.b.Tree"}}]}"#,
        );
        assert!(tree.is_recursive());
        // Array of one Tree, nested: each level is a record and an array.
        let mut body = Vec::new();
        for _ in 0..10 {
            body.extend(zz(1));
        }
        body.extend(zz(0));
        body.extend(std::iter::repeat_n(0u8, 10));
        assert_eq!(run(&tree, &body, MAX_DEPTH), Ok(body.len()));
        assert_eq!(run(&tree, &body, 21), Err(WalkError::TooDeep { limit: 21 }), "11 records and 11 arrays");
        assert_eq!(run(&tree, &body, 22), Ok(body.len()));

        let mutual = walker(
            r#"{"type":"record","name":"A","fields":[{"name":"b","type":{"type":"record","name":"B","fields":[{"name":"a","type":["null","A"]}]}}]}"#,
        );
        assert!(mutual.is_recursive(), "A contains B contains A");
        let map = walker(r#"{"type":"record","name":"M","fields":[{"name":"m","type":{"type":"map","values":"M"}}]}"#);
        assert!(map.is_recursive());
    }

    /// 100,000 levels of `Node` on this (2 MiB) test thread: the walk stops
    /// at the limit instead of recursing, so the test finishing proves no
    /// stack overflow (an overflow aborts the test binary).
    #[test]
    fn deep_nesting_is_too_deep_not_a_stack_overflow() {
        let w = walker(NODE);
        let body = nodes(100_000);
        assert_eq!(run(&w, &body, MAX_DEPTH), Err(WalkError::TooDeep { limit: MAX_DEPTH }));
        // The same through arrays, and through maps.
        let tree = walker(r#"{"type":"record","name":"T","fields":[{"name":"k","type":{"type":"array","items":"T"}}]}"#);
        let body = zz(1).repeat(100_000);
        assert_eq!(run(&tree, &body, MAX_DEPTH), Err(WalkError::TooDeep { limit: MAX_DEPTH }));
        let map = walker(r#"{"type":"record","name":"M","fields":[{"name":"m","type":{"type":"map","values":"M"}}]}"#);
        let body = cat(&[&zz(1), &zz(1), b"k"]).repeat(100_000);
        assert_eq!(run(&map, &body, MAX_DEPTH), Err(WalkError::TooDeep { limit: MAX_DEPTH }));
    }
}
