//! The Confluent wire format: `[0][schema id: u32 BE][Avro binary datum]`.
//!
//! [`encode`] frames one datum; [`split`] checks the header and returns the
//! schema id and the body; [`decode`] reads the body with the writer schema
//! and resolves it to the reader schema. Decoding untrusted bytes never
//! panics: truncated bodies, wrong types and trailing bytes are errors, and
//! no single allocation driven by a length prefix can exceed
//! [`MAX_ALLOCATION_BYTES`] (see [`limit_allocations`]).

use std::io;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::outcome::{Classify, ErrorClass};

/// The first byte of every framed message.
pub const MAGIC: u8 = 0;
/// Magic byte plus the four-byte schema id.
pub const HEADER_LEN: usize = 5;
/// Ceiling for one allocation made while decoding (a `bytes`/`string`
/// length, or an array/map block). A corrupt length prefix is rejected
/// before anything this large is allocated. 64 MiB is far above any Kafka
/// message the topologies accept (brokers default to 1 MiB).
pub const MAX_ALLOCATION_BYTES: usize = 64 * 1024 * 1024;

/// Why a message could not be framed, split or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes, or the body ended mid-datum.
    #[error("message truncated: it ends before the data it announces")]
    Truncated,
    /// The first byte is not [`MAGIC`]: not Confluent-framed Avro.
    #[error("bad magic byte {0:#04x}: not Confluent-framed Avro (expected 0x00)")]
    BadMagic(u8),
    /// The schema id is not in the registry.
    #[error("schema id {0} is not registered")]
    UnknownSchema(u32),
    /// The body does not decode with the writer schema, or does not resolve
    /// to the reader schema.
    #[error("Avro body does not decode: {0}")]
    Body(String),
    /// A complete datum was read but this many bytes were left over.
    #[error("{0} unexpected byte(s) after the Avro datum")]
    TrailingBytes(usize),
    /// The value does not conform to the schema it is encoded with.
    #[error("cannot encode value: {0}")]
    Encode(String),
    /// The schema id resolves, but to a schema this client cannot decode
    /// with (not Avro, with references, unparsable); see
    /// [`SchemaProblem`]. A property of the record, not of the registry.
    #[error("{message}")]
    UnusableSchema { id: u32, problem: SchemaProblem, message: String },
    /// The writer schema is valid Avro but not the type this topic carries:
    /// not a record with the reader's name (or one of its aliases).
    #[error("schema id {id} is {writer}, but this topic carries records of type `{expected}`")]
    WrongSchema {
        id: u32,
        /// The writer schema, described: e.g. record `x.Y`, or type `"string"`.
        writer: String,
        /// Full name of the reader schema.
        expected: String,
    },
    /// The data nests deeper than `limit` levels under a recursive (or
    /// otherwise very deep) writer schema (see [`super::depth`]).
    #[error("data nests deeper than {limit} levels of records, arrays and maps under writer schema id {id}")]
    TooDeep { id: u32, limit: usize },
}

/// Why a registered schema cannot be used to decode, each with its own
/// reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaProblem {
    /// A JSON Schema or Protobuf schema (registry `schemaType` other than AVRO).
    NotAvro,
    /// An Avro schema that imports other subjects through `references`.
    References,
    /// Avro schema text that does not parse.
    Unparsable,
}

impl SchemaProblem {
    /// Stable reason code.
    pub fn code(self) -> &'static str {
        match self {
            SchemaProblem::NotAvro => "decode.schema_not_avro",
            SchemaProblem::References => "decode.schema_references",
            SchemaProblem::Unparsable => "decode.schema_unparsable",
        }
    }
}

impl WireError {
    /// Stable reason code, as written to the dead-letter topic.
    pub fn code(&self) -> &'static str {
        match self {
            WireError::Truncated => "decode.truncated",
            WireError::BadMagic(_) => "decode.bad_magic",
            WireError::UnknownSchema(_) => "decode.unknown_schema",
            WireError::Body(_) => "decode.body",
            WireError::TrailingBytes(_) => "decode.trailing_bytes",
            WireError::Encode(_) => "encode.failed",
            WireError::UnusableSchema { problem, .. } => problem.code(),
            WireError::WrongSchema { .. } => "decode.wrong_schema",
            WireError::TooDeep { .. } => "decode.too_deep",
        }
    }
}

impl Classify for WireError {
    /// Decoding errors are properties of the input: `Invalid`. An encoding
    /// error means our own output breaks its schema: `Fatal`.
    fn class(&self) -> ErrorClass {
        match self {
            WireError::Encode(_) => ErrorClass::Fatal,
            _ => ErrorClass::Invalid,
        }
    }
}

/// Caps apache-avro's per-allocation limit at [`MAX_ALLOCATION_BYTES`] and
/// returns the limit in force.
///
/// apache-avro keeps this limit in a process-wide set-once cell: the first
/// caller wins. [`decode`] calls this before every decode, so unless other
/// code set a different limit first, the cap is in place before any untrusted
/// byte is read. Call it at start-up to make that certain.
pub fn limit_allocations() -> usize {
    apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES)
}

/// Frames an already encoded Avro `body` with the wire header.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Encodes `value` (which must conform to `schema`) as a framed message
/// carrying `schema_id`.
pub fn encode(schema_id: u32, schema: &Schema, value: &Value) -> Result<Vec<u8>, WireError> {
    let writer = GenericDatumWriter::builder(schema)
        .build()
        .map_err(|e| WireError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(64);
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    writer.write_value_ref(&mut out, value).map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(out)
}

/// Frames `value` serialised straight to Avro by apache-avro's schema-aware
/// serde writer, without building a [`Value`] first: the hot path of event
/// publishing, where `to_value`, `resolve` and [`encode`]'s validation cost
/// more than the encoding itself. `writer` is built once per batch with
/// [`GenericDatumWriter::builder`]. The bytes are the same as [`encode`]'s
/// of the resolved value for the types it is used with (tests compare
/// them); a value that does not fit the schema is an error, as there.
pub fn encode_ser<T: serde::Serialize>(schema_id: u32, writer: &GenericDatumWriter<'_>, value: &T) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(256);
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    writer.write_ser(&mut out, value).map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(out)
}

/// Checks the header of a framed message and returns `(schema id, body)`.
pub fn split(bytes: &[u8]) -> Result<(u32, &[u8]), WireError> {
    // Magic first: a one-byte message that is not 0 is better reported as
    // "not our format" than as "too short".
    match bytes.first() {
        None => return Err(WireError::Truncated),
        Some(&b) if b != MAGIC => return Err(WireError::BadMagic(b)),
        Some(_) => {}
    }
    if bytes.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_LEN..]))
}

/// Decodes one datum from `body` with the `writer` schema, then resolves it
/// to the `reader` schema (Avro schema resolution: defaults for added
/// fields, promotions, dropped fields ignored).
///
/// The whole body must be exactly one datum: leftover bytes are
/// [`WireError::TrailingBytes`]. A body that ends early is
/// [`WireError::Truncated`]; anything else that fails is [`WireError::Body`].
pub fn decode(writer: &Schema, reader: &Schema, body: &[u8]) -> Result<Value, WireError> {
    limit_allocations();
    let datum_reader = GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()
        .map_err(|e| WireError::Body(e.to_string()))?;
    let mut input = Input { rest: body, wanted_more: false };
    // A body cut short can fail in apache-avro with whatever it made of the
    // missing bytes (e.g. "expected a string, got null"): any attempt to read
    // past the end means the datum was incomplete, whatever the error says.
    let value = match datum_reader.read_value(&mut input) {
        Ok(v) => v,
        Err(_) if input.wanted_more => return Err(WireError::Truncated),
        Err(e) => return Err(body_error(&e)),
    };
    // apache-avro reads a union index cut off by the end of input as branch
    // 0 (usually null) instead of failing; a body missing its last bytes
    // would then decode. Any attempt to read past the end means the datum
    // was incomplete.
    if input.wanted_more {
        return Err(WireError::Truncated);
    }
    if !input.rest.is_empty() {
        return Err(WireError::TrailingBytes(input.rest.len()));
    }
    Ok(value)
}

/// The body being decoded; remembers whether the decoder asked for bytes
/// after the end (a complete datum never does: Avro decoding never reads ahead).
struct Input<'a> {
    rest: &'a [u8],
    wanted_more: bool,
}

impl io::Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.len() > self.rest.len() {
            self.wanted_more = true;
        }
        self.rest.read(buf)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > self.rest.len() {
            self.wanted_more = true;
        }
        self.rest.read_exact(buf)
    }
}

/// Running out of input surfaces from apache-avro as an I/O error of kind
/// `UnexpectedEof` somewhere in the source chain.
fn body_error(e: &apache_avro::Error) -> WireError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::UnexpectedEof
        {
            return WireError::Truncated;
        }
        source = err.source();
    }
    WireError::Body(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::atom::AtomIngestionRequest;
    use crate::avro::{ATOM_INGESTED, ATOM_INGESTION_REQUEST, Schemas};

    fn request_v2() -> Schema {
        (*Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema).clone()
    }

    fn sample_request() -> AtomIngestionRequest {
        AtomIngestionRequest {
            content_type: "text/plain".into(),
            content: b"hello atoms".to_vec(),
            metadata: BTreeMap::from([("lang".to_string(), "en".to_string())]),
            source_system: "tests".into(),
            correlation_id: "corr-1".into(),
            created_at_ms: Some(1_700_000_000_123),
        }
    }

    fn sample_value(schema: &Schema) -> Value {
        Value::Record(vec![
            ("content_type".into(), Value::String("text/plain".into())),
            ("content".into(), Value::Bytes(b"hello atoms".to_vec())),
            (
                "metadata".into(),
                Value::Map([("lang".to_string(), Value::String("en".into()))].into()),
            ),
            ("source_system".into(), Value::String("tests".into())),
            ("correlation_id".into(), Value::String("corr-1".into())),
            (
                "created_at_ms".into(),
                Value::Union(1, Box::new(Value::TimestampMillis(1_700_000_000_123))),
            ),
        ])
        .resolve(schema)
        .unwrap()
    }

    #[test]
    fn round_trip_encode_split_decode_into_struct() {
        let schema = request_v2();
        let value = sample_value(&schema);
        let bytes = encode(42, &schema, &value).unwrap();
        assert_eq!(bytes[0], MAGIC);
        assert_eq!(&bytes[1..5], &42u32.to_be_bytes());
        let (id, body) = split(&bytes).unwrap();
        assert_eq!(id, 42);
        let back = decode(&schema, &schema, body).unwrap();
        assert_eq!(back, value);
        let req: AtomIngestionRequest = apache_avro::from_value(&back).unwrap();
        assert_eq!(req, sample_request());
    }

    #[test]
    fn struct_serialised_with_to_value_encodes() {
        let schema = request_v2();
        let value = apache_avro::to_value(sample_request()).unwrap().resolve(&schema).unwrap();
        let bytes = encode(1, &schema, &value).unwrap();
        let (_, body) = split(&bytes).unwrap();
        let req: AtomIngestionRequest =
            apache_avro::from_value(&decode(&schema, &schema, body).unwrap()).unwrap();
        assert_eq!(req, sample_request());
    }

    #[test]
    fn encode_ser_writes_the_bytes_of_the_resolved_value() {
        let schema = request_v2();
        let writer = GenericDatumWriter::builder(&schema).build().unwrap();
        let mut bare = sample_request();
        bare.metadata.clear();
        bare.created_at_ms = None;
        for req in [sample_request(), bare] {
            let value = apache_avro::to_value(&req).unwrap().resolve(&schema).unwrap();
            assert_eq!(encode_ser(7, &writer, &req).unwrap(), encode(7, &schema, &value).unwrap(), "{req:?}");
        }
        assert!(matches!(encode_ser(7, &writer, &"not a record"), Err(WireError::Encode(_))));
    }

    #[test]
    fn frame_matches_encode() {
        let schema = request_v2();
        let value = sample_value(&schema);
        let bytes = encode(9, &schema, &value).unwrap();
        assert_eq!(frame(9, &bytes[HEADER_LEN..]), bytes);
    }

    #[test]
    fn encode_rejects_value_not_matching_schema() {
        let schema = request_v2();
        let err = encode(1, &schema, &Value::String("nope".into())).unwrap_err();
        assert!(matches!(err, WireError::Encode(_)));
        assert_eq!(err.code(), "encode.failed");
        assert_eq!(err.class(), ErrorClass::Fatal);
    }

    #[test]
    fn split_rejects_bad_magic_and_short_input() {
        assert_eq!(split(&[]), Err(WireError::Truncated));
        assert_eq!(split(&[0]), Err(WireError::Truncated));
        assert_eq!(split(&[0, 0, 0, 1]), Err(WireError::Truncated));
        assert_eq!(split(&[1, 0, 0, 0, 1, 2]), Err(WireError::BadMagic(1)));
        assert_eq!(split(b"{\"json\":1}"), Err(WireError::BadMagic(b'{')));
        assert_eq!(split(&[0, 0, 0, 1, 0]), Ok((256, &[][..])));
        assert_eq!(split(&[0, 0xff, 0xff, 0xff, 0xff]), Ok((u32::MAX, &[][..])));
        assert_eq!(WireError::BadMagic(1).code(), "decode.bad_magic");
        assert_eq!(WireError::Truncated.code(), "decode.truncated");
        assert_eq!(WireError::BadMagic(1).class(), ErrorClass::Invalid);
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error() {
        let schema = request_v2();
        let bytes = encode(3, &schema, &sample_value(&schema)).unwrap();
        for len in 0..bytes.len() {
            let cut = &bytes[..len];
            let result = split(cut).and_then(|(_, body)| decode(&schema, &schema, body));
            let err = result.expect_err(&format!("cut at {len} must fail"));
            // Wherever the cut falls, the reason is the cut, not what the
            // decoder made of the missing bytes.
            assert_eq!(err, WireError::Truncated, "cut at {len}");
        }
        // The full message still decodes.
        let (_, body) = split(&bytes).unwrap();
        assert!(decode(&schema, &schema, body).is_ok());
    }

    #[test]
    fn body_ending_inside_a_field_is_truncated() {
        let schema = request_v2();
        let bytes = encode(3, &schema, &sample_value(&schema)).unwrap();
        let (_, body) = split(&bytes).unwrap();
        // content_type is "text/plain": length 10 then 10 bytes; cut after 4.
        let err = decode(&schema, &schema, &body[..5]).unwrap_err();
        assert_eq!(err, WireError::Truncated);
        assert_eq!(err.code(), "decode.truncated");
    }

    #[test]
    fn huge_claimed_length_fails_without_allocating_it() {
        // Another test may have reached apache-avro first; whatever limit is
        // in force, a length above it is refused before allocation.
        let limit = limit_allocations();
        assert!(limit <= apache_avro::util::DEFAULT_MAX_ALLOCATION_BYTES);
        let schema = request_v2();
        // content_type claims i64::MAX bytes, then the body ends.
        let mut body = varint(u64::MAX - 1);
        body.extend_from_slice(b"abc");
        let err = decode(&schema, &schema, &body).unwrap_err();
        assert!(matches!(err, WireError::Body(_)), "{err:?}");
        // Just above the limit.
        let over = (limit as u64 + 1) * 2;
        let mut body = varint(over);
        body.extend_from_slice(b"abc");
        let err = decode(&schema, &schema, &body).unwrap_err();
        assert!(matches!(&err, WireError::Body(m) if m.contains("maximum")), "{err:?}");
        // Below the limit but beyond the body: the body runs out.
        let mut body = varint(10 * 1024 * 1024 * 2);
        body.extend_from_slice(b"abc");
        assert_eq!(decode(&schema, &schema, &body), Err(WireError::Truncated));
        // A negative length.
        let err = decode(&schema, &schema, &[0x01, b'a']).unwrap_err();
        assert!(matches!(err, WireError::Body(_)), "{err:?}");
        // Metadata map claiming a billion entries.
        let mut body = vec![0x02, b'a', 0x00];
        body.extend_from_slice(&varint(2_000_000_000));
        let err = decode(&schema, &schema, &body).unwrap_err();
        assert!(matches!(err, WireError::Body(_) | WireError::Truncated), "{err:?}");
    }

    /// Avro long encoding of an already zigzagged value.
    fn varint(mut n: u64) -> Vec<u8> {
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

    #[test]
    fn trailing_bytes_are_rejected() {
        let schema = request_v2();
        let mut bytes = encode(3, &schema, &sample_value(&schema)).unwrap();
        bytes.extend_from_slice(&[0xde, 0xad]);
        let (_, body) = split(&bytes).unwrap();
        let err = decode(&schema, &schema, body).unwrap_err();
        assert_eq!(err, WireError::TrailingBytes(2));
        assert_eq!(err.code(), "decode.trailing_bytes");
    }

    #[test]
    fn body_written_with_another_schema_is_rejected() {
        let request = request_v2();
        let ingested = (*Schemas::current(ATOM_INGESTED).unwrap().schema).clone();
        let bytes = encode(3, &request, &sample_value(&request)).unwrap();
        let (_, body) = split(&bytes).unwrap();
        // The id claims AtomIngested but the body is a request.
        let err = decode(&ingested, &ingested, body).unwrap_err();
        assert!(
            matches!(err, WireError::Body(_) | WireError::Truncated | WireError::TrailingBytes(_)),
            "{err:?}"
        );
        // Right writer, but a reader schema it cannot resolve to.
        let err = decode(&request, &ingested, body).unwrap_err();
        assert!(matches!(err, WireError::Body(_)), "{err:?}");
        assert_eq!(err.code(), "decode.body");
    }

    #[test]
    fn invalid_union_index_and_utf8_are_rejected() {
        let schema = request_v2();
        let bytes = encode(3, &schema, &sample_value(&schema)).unwrap();
        let (_, body) = split(&bytes).unwrap();
        // The last field is the union; its index is the first byte after the
        // other fields. Index 1 (zigzag 2) is valid; 5 (zigzag 10) is not.
        let union_at = body.len() - 1 - varint(1_700_000_000_123u64 * 2).len();
        assert_eq!(body[union_at], 2);
        let mut bad = body.to_vec();
        bad[union_at] = 10;
        assert!(matches!(decode(&schema, &schema, &bad), Err(WireError::Body(_))));
        // content_type bytes that are not UTF-8.
        let mut bad = body.to_vec();
        bad[1] = 0xff;
        assert!(matches!(decode(&schema, &schema, &bad), Err(WireError::Body(_))));
    }
}
