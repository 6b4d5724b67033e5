//! JSON ↔ Avro values, for test data written by hand (one JSON object per
//! line) and for display.
//!
//! [`json_to_avro`] is strict: a value must fit the schema exactly, and every
//! error names the JSON path where it happened, e.g.
//! `$.metadata.k: expected string, found number`. The mapping is:
//!
//! | Avro schema | accepted JSON |
//! |---|---|
//! | `record` | object; unknown keys are errors; missing keys take the field default or are errors |
//! | `string` | string |
//! | `bytes` | string (its UTF-8 bytes) or array of integers 0..=255 (any bytes, e.g. invalid UTF-8) |
//! | `fixed` | as `bytes`, of exactly the fixed size |
//! | `int`, `long` | integer within range (not `1.0`) |
//! | `float`, `double` | any number |
//! | `boolean`, `null` | `true`/`false`, `null` |
//! | `map` | object |
//! | `array` | array |
//! | `enum` | string, one of the symbols |
//! | union | `null` picks the `null` branch; otherwise the first branch that accepts the value (no `{"type": value}` wrapper) |
//! | `date`, `time-millis` | integer (int range) |
//! | `time-micros`, `timestamp-*`, `local-timestamp-*` | integer |
//! | `uuid` | string in UUID syntax |
//! | `decimal`, `big-decimal` | string such as `"12.50"` (or a number); must fit precision and scale |
//! | `duration` | object `{"months": u32, "days": u32, "millis": u32}` |
//!
//! Field defaults are read as the Avro specification says: a union default
//! belongs to the union's first branch, and a `bytes`/`fixed` default string
//! maps each character U+0000..U+00FF to one byte.

use std::collections::HashMap;

use apache_avro::schema::{
    DecimalSchema, InnerDecimalSchema, Name, RecordSchema, ResolvedSchema, UnionSchema,
};
use apache_avro::types::Value;
use apache_avro::{BigDecimal, Days, Decimal, Duration, Millis, Months, Schema, Uuid};
use serde_json::Value as Json;

use crate::outcome::{Classify, ErrorClass};

/// Why a line of JSON could not become an Avro value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The line is not JSON.
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// The JSON does not fit the schema at `path` (`$` is the root).
    #[error("{path}: {message}")]
    Schema { path: String, message: String },
}

impl JsonError {
    /// Stable reason code: `decode.json_syntax` or `decode.json_schema`.
    pub fn code(&self) -> &'static str {
        match self {
            JsonError::Syntax(_) => "decode.json_syntax",
            JsonError::Schema { .. } => "decode.json_schema",
        }
    }
}

impl Classify for JsonError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Invalid
    }
}

/// Parses one line of JSON (surrounding whitespace, including a trailing
/// `\r`, is allowed).
pub fn parse_line(line: &[u8]) -> Result<Json, JsonError> {
    serde_json::from_slice(line).map_err(|e| JsonError::Syntax(e.to_string()))
}

/// Converts `json` into an Avro value conforming to `schema`, ready for
/// [`encode`](super::wire::encode). See the module docs for the mapping.
pub fn json_to_avro(json: &Json, schema: &Schema) -> Result<Value, JsonError> {
    let resolved = ResolvedSchema::try_from(schema).map_err(|e| JsonError::Schema {
        path: "$".into(),
        message: format!("unusable schema: {e}"),
    })?;
    let conv = Converter { names: resolved.get_names() };
    conv.convert(json, schema, None, "$", Mode::Input)
}

/// Renders an Avro value as JSON, for display and tests.
///
/// Records and maps become objects, unions their inner value (no type
/// wrapper), enums their symbol, logical types their underlying number.
/// `bytes` and `fixed` become a string when they are valid UTF-8 and an array
/// of integers otherwise, so `json_to_avro(avro_to_json(v))` gives `v` back
/// for the bundled schemas. Non-finite floats become the strings `"NaN"`,
/// `"inf"`, `"-inf"`; `decimal` becomes `{"unscaled": "<integer>"}` (its
/// scale lives in the schema); `big-decimal` a decimal string; `uuid` its
/// hyphenated form; `duration` `{"months", "days", "millis"}`.
pub fn avro_to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Json::from(*i),
        Value::Long(i)
        | Value::TimeMicros(i)
        | Value::TimestampMillis(i)
        | Value::TimestampMicros(i)
        | Value::TimestampNanos(i)
        | Value::LocalTimestampMillis(i)
        | Value::LocalTimestampMicros(i)
        | Value::LocalTimestampNanos(i) => Json::from(*i),
        Value::Float(f) => float_json(f64::from(*f)),
        Value::Double(f) => float_json(*f),
        Value::Bytes(b) | Value::Fixed(_, b) => bytes_json(b),
        Value::String(s) | Value::Enum(_, s) => Json::String(s.clone()),
        Value::Union(_, inner) => avro_to_json(inner),
        Value::Array(items) => Json::Array(items.iter().map(avro_to_json).collect()),
        Value::Map(items) => {
            Json::Object(items.iter().map(|(k, v)| (k.clone(), avro_to_json(v))).collect())
        }
        Value::Record(fields) => {
            Json::Object(fields.iter().map(|(k, v)| (k.clone(), avro_to_json(v))).collect())
        }
        Value::Decimal(d) => {
            let unscaled = BigDecimal::new(d.clone().into(), 0);
            serde_json::json!({ "unscaled": unscaled.to_string() })
        }
        Value::BigDecimal(d) => Json::String(d.to_string()),
        Value::Duration(d) => serde_json::json!({
            "months": u32::from(d.months()),
            "days": u32::from(d.days()),
            "millis": u32::from(d.millis()),
        }),
        Value::Uuid(u) => Json::String(u.hyphenated().to_string()),
    }
}

fn float_json(f: f64) -> Json {
    match serde_json::Number::from_f64(f) {
        Some(n) => Json::Number(n),
        None if f.is_nan() => Json::String("NaN".into()),
        None if f > 0.0 => Json::String("inf".into()),
        None => Json::String("-inf".into()),
    }
}

fn bytes_json(b: &[u8]) -> Json {
    match std::str::from_utf8(b) {
        Ok(s) => Json::String(s.to_string()),
        Err(_) => Json::Array(b.iter().map(|&x| Json::from(x)).collect()),
    }
}

/// How to read JSON: user input, or a field default from a schema (which
/// follows the Avro specification's conventions).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Input,
    Default,
}

struct Converter<'a, 's> {
    names: &'a HashMap<Name, &'s Schema>,
}

fn fail<T>(path: &str, message: impl Into<String>) -> Result<T, JsonError> {
    Err(JsonError::Schema { path: path.to_string(), message: message.into() })
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn expected<T>(path: &str, what: &str, json: &Json) -> Result<T, JsonError> {
    fail(path, format!("expected {what}, found {}", kind(json)))
}

/// Appends `.key`, or `["key"]` when the key is not a plain identifier.
fn child_key(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !key.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        format!("{path}.{key}")
    } else {
        format!("{path}[{}]", Json::String(key.to_string()))
    }
}

fn child_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Short human description of a schema, for error messages.
fn describe(schema: &Schema) -> String {
    match schema {
        Schema::Null => "null".into(),
        Schema::Boolean => "boolean".into(),
        Schema::Int => "int".into(),
        Schema::Long => "long".into(),
        Schema::Float => "float".into(),
        Schema::Double => "double".into(),
        Schema::Bytes => "bytes".into(),
        Schema::String => "string".into(),
        Schema::Array(a) => format!("array<{}>", describe(&a.items)),
        Schema::Map(m) => format!("map<{}>", describe(&m.types)),
        Schema::Union(u) => {
            let parts: Vec<String> = u.variants().iter().map(describe).collect();
            format!("union [{}]", parts.join(", "))
        }
        Schema::Record(r) => format!("record {}", r.name.name()),
        Schema::Enum(e) => format!("enum {}", e.name.name()),
        Schema::Fixed(f) => format!("fixed {} ({} bytes)", f.name.name(), f.size),
        Schema::Decimal(_) => "decimal".into(),
        Schema::BigDecimal => "big-decimal".into(),
        Schema::Uuid(_) => "uuid".into(),
        Schema::Date => "date".into(),
        Schema::TimeMillis => "time-millis".into(),
        Schema::TimeMicros => "time-micros".into(),
        Schema::TimestampMillis => "timestamp-millis".into(),
        Schema::TimestampMicros => "timestamp-micros".into(),
        Schema::TimestampNanos => "timestamp-nanos".into(),
        Schema::LocalTimestampMillis => "local-timestamp-millis".into(),
        Schema::LocalTimestampMicros => "local-timestamp-micros".into(),
        Schema::LocalTimestampNanos => "local-timestamp-nanos".into(),
        Schema::Duration(_) => "duration".into(),
        Schema::Ref { name } => name.name().to_string(),
    }
}

impl<'s> Converter<'_, 's> {
    fn convert(
        &self,
        json: &Json,
        schema: &Schema,
        ns: Option<&str>,
        path: &str,
        mode: Mode,
    ) -> Result<Value, JsonError> {
        match schema {
            Schema::Null => match json {
                Json::Null => Ok(Value::Null),
                _ => expected(path, "null", json),
            },
            Schema::Boolean => match json {
                Json::Bool(b) => Ok(Value::Boolean(*b)),
                _ => expected(path, "boolean", json),
            },
            Schema::Int => int(json, path, "int").map(Value::Int),
            Schema::Date => int(json, path, "date").map(Value::Date),
            Schema::TimeMillis => int(json, path, "time-millis").map(Value::TimeMillis),
            Schema::Long => long(json, path, "long").map(Value::Long),
            Schema::TimeMicros => long(json, path, "time-micros").map(Value::TimeMicros),
            Schema::TimestampMillis => {
                long(json, path, "timestamp-millis").map(Value::TimestampMillis)
            }
            Schema::TimestampMicros => {
                long(json, path, "timestamp-micros").map(Value::TimestampMicros)
            }
            Schema::TimestampNanos => {
                long(json, path, "timestamp-nanos").map(Value::TimestampNanos)
            }
            Schema::LocalTimestampMillis => {
                long(json, path, "local-timestamp-millis").map(Value::LocalTimestampMillis)
            }
            Schema::LocalTimestampMicros => {
                long(json, path, "local-timestamp-micros").map(Value::LocalTimestampMicros)
            }
            Schema::LocalTimestampNanos => {
                long(json, path, "local-timestamp-nanos").map(Value::LocalTimestampNanos)
            }
            Schema::Float => {
                let f = number(json, path, "float")?;
                if f.is_finite() && f.abs() > f64::from(f32::MAX) {
                    return fail(path, format!("{json} is out of range for float"));
                }
                Ok(Value::Float(f as f32))
            }
            Schema::Double => number(json, path, "double").map(Value::Double),
            Schema::String => match json {
                Json::String(s) => Ok(Value::String(s.clone())),
                _ => expected(path, "string", json),
            },
            Schema::Bytes => bytes(json, path, mode, "bytes").map(Value::Bytes),
            Schema::Fixed(f) => {
                let b = bytes(json, path, mode, &describe(schema))?;
                if b.len() != f.size {
                    return fail(
                        path,
                        format!(
                            "expected exactly {} bytes for {}, found {}",
                            f.size,
                            describe(schema),
                            b.len()
                        ),
                    );
                }
                Ok(Value::Fixed(f.size, b))
            }
            Schema::Uuid(_) => match json {
                Json::String(s) => Uuid::parse_str(s)
                    .map(Value::Uuid)
                    .or_else(|e| fail(path, format!("invalid uuid {s:?}: {e}"))),
                _ => expected(path, "uuid string", json),
            },
            Schema::Decimal(d) => self.decimal(json, d, path),
            Schema::BigDecimal => big_decimal(json, path, "big-decimal").map(Value::BigDecimal),
            Schema::Duration(_) => duration(json, path),
            Schema::Enum(e) => match json {
                Json::String(s) => match e.symbols.iter().position(|sym| sym == s) {
                    Some(i) => Ok(Value::Enum(i as u32, s.clone())),
                    None => fail(
                        path,
                        format!(
                            "{s:?} is not a symbol of {} (expected one of {})",
                            describe(schema),
                            e.symbols.join(", ")
                        ),
                    ),
                },
                _ => expected(path, &format!("{} symbol (string)", describe(schema)), json),
            },
            Schema::Array(a) => match json {
                Json::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.convert(item, &a.items, ns, &child_index(path, i), mode))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array),
                _ => expected(path, &describe(schema), json),
            },
            Schema::Map(m) => match json {
                Json::Object(obj) => obj
                    .iter()
                    .map(|(k, v)| {
                        let value = self.convert(v, &m.types, ns, &child_key(path, k), mode)?;
                        Ok((k.clone(), value))
                    })
                    .collect::<Result<HashMap<_, _>, _>>()
                    .map(Value::Map),
                _ => expected(path, &format!("object for {}", describe(schema)), json),
            },
            Schema::Record(r) => self.record(json, r, path, mode),
            Schema::Union(u) => self.union(json, u, ns, path, mode),
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(ns);
                match self.names.get(&*full) {
                    Some(target) => self.convert(json, target, ns, path, mode),
                    None => {
                        fail(path, format!("schema refers to unknown type {}", full.fullname(None)))
                    }
                }
            }
        }
    }

    fn record(
        &self,
        json: &Json,
        r: &RecordSchema,
        path: &str,
        mode: Mode,
    ) -> Result<Value, JsonError> {
        let Json::Object(obj) = json else {
            return expected(path, &format!("object for record {}", r.name.name()), json);
        };
        if let Some(unknown) = obj.keys().find(|k| !r.lookup.contains_key(k.as_str())) {
            let known: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
            return fail(
                &child_key(path, unknown),
                format!(
                    "unknown field {unknown:?}; record {} has fields {}",
                    r.name.name(),
                    known.join(", ")
                ),
            );
        }
        let ns = r.name.namespace();
        let mut fields = Vec::with_capacity(r.fields.len());
        for f in &r.fields {
            let field_path = child_key(path, &f.name);
            let value = match (obj.get(&f.name), &f.default) {
                (Some(v), _) => self.convert(v, &f.schema, ns, &field_path, mode)?,
                (None, Some(default)) => {
                    self.convert(default, &f.schema, ns, &field_path, Mode::Default)?
                }
                (None, None) => {
                    return fail(
                        path,
                        format!("missing field {:?} ({}, no default)", f.name, describe(&f.schema)),
                    );
                }
            };
            fields.push((f.name.clone(), value));
        }
        Ok(Value::Record(fields))
    }

    fn union(
        &self,
        json: &Json,
        u: &UnionSchema,
        ns: Option<&str>,
        path: &str,
        mode: Mode,
    ) -> Result<Value, JsonError> {
        let variants = u.variants();
        let describe_union = || {
            let parts: Vec<String> = variants.iter().map(describe).collect();
            format!("one of [{}]", parts.join(", "))
        };
        if mode == Mode::Default {
            // A union's default belongs to its first branch.
            let Some(first) = variants.first() else {
                return fail(path, "empty union has no default");
            };
            return Ok(Value::Union(0, Box::new(self.convert(json, first, ns, path, mode)?)));
        }
        if json.is_null() {
            return match variants.iter().position(|v| matches!(v, Schema::Null)) {
                Some(i) => Ok(Value::Union(i as u32, Box::new(Value::Null))),
                None => expected(path, &describe_union(), json),
            };
        }
        let mut first_error = None;
        for (i, variant) in variants.iter().enumerate() {
            if !self.plausible(json, variant, ns) {
                continue;
            }
            match self.convert(json, variant, ns, path, mode) {
                Ok(v) => return Ok(Value::Union(i as u32, Box::new(v))),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            // A branch of the right shape rejected something inside: its
            // error is the useful one.
            Some(e) => Err(e),
            None => expected(path, &describe_union(), json),
        }
    }

    /// Whether `json` has the right shape for `schema` (checked before trying
    /// a union branch, so the error reported is the branch's own).
    fn plausible(&self, json: &Json, schema: &Schema, ns: Option<&str>) -> bool {
        match schema {
            Schema::Null => json.is_null(),
            Schema::Boolean => json.is_boolean(),
            Schema::Int
            | Schema::Long
            | Schema::Float
            | Schema::Double
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => json.is_number(),
            Schema::String | Schema::Enum(_) | Schema::Uuid(_) => json.is_string(),
            Schema::Bytes | Schema::Fixed(_) => json.is_string() || json.is_array(),
            Schema::Decimal(_) | Schema::BigDecimal => json.is_string() || json.is_number(),
            Schema::Array(_) => json.is_array(),
            Schema::Map(_) | Schema::Record(_) | Schema::Duration(_) => json.is_object(),
            Schema::Union(_) => true,
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(ns);
                self.names.get(&*full).is_some_and(|target| self.plausible(json, target, ns))
            }
        }
    }

    fn decimal(&self, json: &Json, d: &DecimalSchema, path: &str) -> Result<Value, JsonError> {
        let value = big_decimal(json, path, "decimal")?;
        // Decide from the digits and the exponent before rescaling: rescaling
        // computes 10^(scale difference), and the exponent comes from the
        // input ("1e999999999999" is a valid decimal), so a hostile one would
        // make that power gigabytes long (found by the `json_bridge` fuzz
        // target). Without trailing zeros a value is `digits × 10^-exponent`:
        // it fits `scale` only if `exponent <= scale`, and then takes
        // `digits + scale - exponent` digits.
        let normal = value.normalized();
        if normal != BigDecimal::from(0) {
            let (_, exponent) = normal.as_bigint_and_exponent();
            let (exponent, scale) = (i128::from(exponent), i128::try_from(d.scale).unwrap_or(i128::MAX));
            if exponent > scale {
                return fail(path, format!("{value} has more than {} decimal places", d.scale));
            }
            if i128::from(normal.digits()) + (scale - exponent) > i128::try_from(d.precision).unwrap_or(i128::MAX) {
                return fail(path, format!("{value} has more than {} significant digits", d.precision));
            }
        }
        // At most `precision` digits now.
        let (unscaled, _) = normal.with_scale(i64::try_from(d.scale).unwrap_or(i64::MAX)).into_bigint_and_exponent();
        let mut bytes = unscaled.to_signed_bytes_be();
        // apache-avro checks, when resolving a decoded decimal, that its byte
        // length could hold any value of the schema's precision; so write as
        // many bytes as the precision needs (or the fixed size), sign-extended.
        let width = match &d.inner {
            InnerDecimalSchema::Fixed(f) => f.size,
            InnerDecimalSchema::Bytes => bytes_for_precision(d.precision),
        };
        if bytes.len() > width {
            return fail(path, format!("{value} does not fit in {width} bytes"));
        }
        let sign = if bytes.first().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 };
        let mut padded = vec![sign; width - bytes.len()];
        padded.append(&mut bytes);
        Ok(Value::Decimal(Decimal::from(padded)))
    }
}

/// Smallest two's-complement width holding every value of `precision`
/// decimal digits (the rule apache-avro applies).
fn bytes_for_precision(precision: usize) -> usize {
    (1..)
        .find(|&len: &usize| {
            let bits = i32::try_from(8 * len - 1).unwrap_or(i32::MAX);
            (2f64.powi(bits) - 1.0).log10().floor() as usize >= precision
        })
        .unwrap_or(1)
}

fn int(json: &Json, path: &str, what: &str) -> Result<i32, JsonError> {
    let i = long(json, path, what)?;
    i32::try_from(i).or_else(|_| fail(path, format!("{i} is out of range for {what}")))
}

fn long(json: &Json, path: &str, what: &str) -> Result<i64, JsonError> {
    match json {
        Json::Number(n) => match n.as_i64() {
            Some(i) => Ok(i),
            None if n.is_u64() => fail(path, format!("{n} is out of range for {what}")),
            None => fail(path, format!("expected {what} (an integer), found {n}")),
        },
        _ => expected(path, what, json),
    }
}

fn number(json: &Json, path: &str, what: &str) -> Result<f64, JsonError> {
    match json.as_f64() {
        Some(f) => Ok(f),
        None => expected(path, what, json),
    }
}

fn bytes(json: &Json, path: &str, mode: Mode, what: &str) -> Result<Vec<u8>, JsonError> {
    match json {
        Json::String(s) if mode == Mode::Input => Ok(s.as_bytes().to_vec()),
        Json::String(s) => s
            .chars()
            .map(|c| u8::try_from(u32::from(c)))
            .collect::<Result<Vec<u8>, _>>()
            .or_else(|_| fail(path, "default for bytes has a character above U+00FF")),
        Json::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.as_u64().and_then(|b| u8::try_from(b).ok()) {
                Some(b) => Ok(b),
                None => fail(
                    &child_index(path, i),
                    format!("expected a byte (integer 0..=255), found {item}"),
                ),
            })
            .collect(),
        _ => expected(path, &format!("{what} (string or array of byte values)"), json),
    }
}

fn big_decimal(json: &Json, path: &str, what: &str) -> Result<BigDecimal, JsonError> {
    let text = match json {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        _ => return expected(path, &format!("{what} (string such as \"12.50\")"), json),
    };
    text.trim()
        .parse::<BigDecimal>()
        .or_else(|e| fail(path, format!("invalid {what} {text:?}: {e}")))
}

fn duration(json: &Json, path: &str) -> Result<Value, JsonError> {
    let Json::Object(obj) = json else {
        return expected(path, "duration object {\"months\", \"days\", \"millis\"}", json);
    };
    if let Some(k) = obj.keys().find(|k| !["months", "days", "millis"].contains(&k.as_str())) {
        return fail(&child_key(path, k), format!("unknown duration field {k:?}"));
    }
    let part = |name: &str| -> Result<u32, JsonError> {
        let p = child_key(path, name);
        match obj.get(name) {
            None => Ok(0),
            Some(v) => {
                let n = long(v, &p, "u32")?;
                u32::try_from(n).or_else(|_| fail(&p, format!("{n} is out of range for u32")))
            }
        }
    };
    Ok(Value::Duration(Duration::new(
        Months::new(part("months")?),
        Days::new(part("days")?),
        Millis::new(part("millis")?),
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::atom::AtomIngestionRequest;
    use crate::avro::{
        ATOM_INGESTION_REQUEST, DEAD_LETTER, INFERENCE_REQUEST, INFERENCE_RESULT, Schemas, wire,
    };

    fn current(name: &str) -> Schema {
        (*Schemas::current(name).unwrap().schema).clone()
    }

    fn schema_err(json: Json, schema: &Schema) -> String {
        let err = json_to_avro(&json, schema).unwrap_err();
        assert_eq!(err.code(), "decode.json_schema");
        err.to_string()
    }

    #[test]
    fn request_line_converts_encodes_and_deserialises() {
        let schema = current(ATOM_INGESTION_REQUEST);
        let line = br#"{"content_type":"text/plain","content":"hi","metadata":{"k":"v"},"source_system":"s","correlation_id":"c","created_at_ms":1700000000000}"#;
        let json = parse_line(line).unwrap();
        let value = json_to_avro(&json, &schema).unwrap();
        assert!(value.validate(&schema));
        let bytes = wire::encode(1, &schema, &value).unwrap();
        let (_, body) = wire::split(&bytes).unwrap();
        let decoded = wire::decode(&schema, &schema, body).unwrap();
        let req: AtomIngestionRequest = apache_avro::from_value(&decoded).unwrap();
        assert_eq!(
            req,
            AtomIngestionRequest {
                content_type: "text/plain".into(),
                content: b"hi".to_vec(),
                metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
                source_system: "s".into(),
                correlation_id: "c".into(),
                created_at_ms: Some(1_700_000_000_000),
            }
        );
        assert_eq!(avro_to_json(&decoded), json);
    }

    #[test]
    fn missing_fields_with_defaults_are_filled() {
        let schema = current(ATOM_INGESTION_REQUEST);
        let json = json!({"content_type": "a/b", "content": [0, 159, 255], "source_system": "s", "correlation_id": "c"});
        let value = json_to_avro(&json, &schema).unwrap();
        let Value::Record(fields) = &value else { panic!() };
        assert_eq!(fields[1], ("content".into(), Value::Bytes(vec![0, 159, 255])));
        assert_eq!(fields[2], ("metadata".into(), Value::Map(HashMap::new())));
        assert_eq!(fields[5], ("created_at_ms".into(), Value::Union(0, Box::new(Value::Null))));
        assert!(value.validate(&schema));
        // Invalid UTF-8 renders back as an array of byte values.
        assert_eq!(avro_to_json(&fields[1].1), json!([0, 159, 255]));
    }

    #[test]
    fn explicit_null_picks_null_branch() {
        let schema = current(ATOM_INGESTION_REQUEST);
        let json = json!({"content_type": "a/b", "content": "", "source_system": "s", "correlation_id": "c", "created_at_ms": null});
        let value = json_to_avro(&json, &schema).unwrap();
        assert!(value.validate(&schema));
    }

    #[test]
    fn errors_name_the_path() {
        let schema = current(ATOM_INGESTION_REQUEST);
        let base = json!({"content_type": "a/b", "content": "x", "source_system": "s", "correlation_id": "c"});
        let with = |k: &str, v: Json| {
            let mut j = base.clone();
            j[k] = v;
            j
        };
        assert_eq!(
            schema_err(with("metadata", json!({"k": 1})), &schema),
            "$.metadata.k: expected string, found number"
        );
        assert_eq!(
            schema_err(with("metadata", json!({"a b": true})), &schema),
            "$.metadata[\"a b\"]: expected string, found boolean"
        );
        assert_eq!(
            schema_err(with("content", json!([1, 256])), &schema),
            "$.content[1]: expected a byte (integer 0..=255), found 256"
        );
        assert_eq!(
            schema_err(with("created_at_ms", json!("yesterday")), &schema),
            "$.created_at_ms: expected one of [null, timestamp-millis], found string"
        );
        assert_eq!(
            schema_err(with("created_at_ms", json!(1.5)), &schema),
            "$.created_at_ms: expected timestamp-millis (an integer), found 1.5"
        );
        assert_eq!(
            schema_err(with("extra", json!(1)), &schema),
            "$.extra: unknown field \"extra\"; record AtomIngestionRequest has fields \
             content_type, content, metadata, source_system, correlation_id, created_at_ms"
        );
        let mut missing = base.clone();
        missing.as_object_mut().unwrap().remove("source_system");
        assert_eq!(
            schema_err(missing, &schema),
            "$: missing field \"source_system\" (string, no default)"
        );
        assert_eq!(
            schema_err(json!([1]), &schema),
            "$: expected object for record AtomIngestionRequest, found array"
        );
        assert_eq!(
            schema_err(with("source_system", Json::Null), &schema),
            "$.source_system: expected string, found null"
        );
    }

    #[test]
    fn integer_ranges_are_checked() {
        let dl = current(DEAD_LETTER);
        let base = json!({"topology": "t", "source_topic": "s", "source_partition": 0, "source_offset": 1,
            "stage": "decode", "reason": "decode.body", "error": "e", "attempts": 1, "failed_at_ms": 2,
            "original_payload": [0, 0, 0, 0, 1]});
        let value = json_to_avro(&base, &dl).unwrap();
        assert!(value.validate(&dl));
        let mut j = base.clone();
        j["source_partition"] = json!(3_000_000_000u64);
        assert_eq!(schema_err(j, &dl), "$.source_partition: 3000000000 is out of range for int");
        let mut j = base.clone();
        j["source_offset"] = json!(u64::MAX);
        assert_eq!(
            schema_err(j, &dl),
            "$.source_offset: 18446744073709551615 is out of range for long"
        );
        let mut j = base.clone();
        j["original_key"] = json!("key-1");
        let Value::Record(fields) = json_to_avro(&j, &dl).unwrap() else { panic!() };
        assert_eq!(fields[9].1, Value::Union(1, Box::new(Value::Bytes(b"key-1".to_vec()))));
    }

    #[test]
    fn inference_schemas_accept_enums_arrays_and_nested_records() {
        let req = current(INFERENCE_REQUEST);
        let json = json!({"request_id": "r1", "input": "2+2?", "model_ids": ["a", "b", "c"],
            "aggregation": "QUORUM", "quorum": 2, "weights": {"a": 2.0, "b": 1}, "correlation_id": "c"});
        let value = json_to_avro(&json, &req).unwrap();
        assert!(value.validate(&req));
        let Value::Record(fields) = &value else { panic!() };
        assert_eq!(fields[3].1, Value::Union(1, Box::new(Value::Enum(4, "QUORUM".into()))));
        assert_eq!(fields[7], ("timeout_ms".into(), Value::Union(0, Box::new(Value::Null))));

        let mut bad = json.clone();
        bad["aggregation"] = json!("AVERAGE");
        assert_eq!(
            schema_err(bad, &req),
            "$.aggregation: \"AVERAGE\" is not a symbol of enum Aggregation (expected one of \
             MAJORITY_VOTE, WEIGHTED_VOTE, MEAN_SCORE, FIRST_SUCCESS, QUORUM)"
        );
        let mut bad = json.clone();
        bad["model_ids"] = json!(["a", 7]);
        assert_eq!(schema_err(bad, &req), "$.model_ids[1]: expected string, found number");

        let res = current(INFERENCE_RESULT);
        let json = json!({"request_id": "r1", "correlation_id": "c", "status": "PARTIAL",
            "aggregation": "QUORUM", "output": "4", "score": 0.66,
            "model_outputs": [
                {"model_id": "a", "output": "4", "score": 0.9, "latency_ms": 12},
                {"model_id": "b", "latency_ms": 30000, "error": "timeout"}
            ],
            "completed_at_ms": 1700000000000i64});
        let value = json_to_avro(&json, &res).unwrap();
        assert!(value.validate(&res));
        let bytes = wire::encode(5, &res, &value).unwrap();
        let decoded = wire::decode(&res, &res, &bytes[wire::HEADER_LEN..]).unwrap();
        assert_eq!(decoded, value);

        let mut bad = json.clone();
        bad["model_outputs"][1]["latency_ms"] = json!("slow");
        assert_eq!(
            schema_err(bad, &res),
            "$.model_outputs[1].latency_ms: expected long, found string"
        );
        let mut bad = json.clone();
        bad["model_outputs"][0].as_object_mut().unwrap().remove("model_id");
        assert_eq!(
            schema_err(bad, &res),
            "$.model_outputs[0]: missing field \"model_id\" (string, no default)"
        );
    }

    #[test]
    fn union_branch_errors_are_reported_from_inside_the_branch() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"u","type":["null",{"type":"record","name":"Inner","fields":[{"name":"n","type":"int"}]}]},
                {"name":"again","type":["null","Inner"],"default":null}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            schema_err(json!({"u": {"n": "x"}}), &schema),
            "$.u.n: expected int, found string"
        );
        let value = json_to_avro(&json!({"u": {"n": 1}, "again": {"n": 2}}), &schema).unwrap();
        assert!(value.validate(&schema));
        let Value::Record(fields) = value else { panic!() };
        assert_eq!(
            fields[1].1,
            Value::Union(1, Box::new(Value::Record(vec![("n".into(), Value::Int(2))])))
        );
    }

    #[test]
    fn defaults_follow_the_avro_specification() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"D","fields":[
                {"name":"b","type":"bytes","default":"\u00ff\u0000A"},
                {"name":"u","type":["long","null"],"default":7},
                {"name":"f","type":{"type":"fixed","name":"F","size":2},"default":"ab"},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]},"default":"Y"},
                {"name":"a","type":{"type":"array","items":"double"},"default":[1, 2.5]}
            ]}"#,
        )
        .unwrap();
        let value = json_to_avro(&json!({}), &schema).unwrap();
        assert!(value.validate(&schema));
        assert_eq!(
            value,
            Value::Record(vec![
                ("b".into(), Value::Bytes(vec![0xff, 0, b'A'])),
                ("u".into(), Value::Union(0, Box::new(Value::Long(7)))),
                ("f".into(), Value::Fixed(2, b"ab".to_vec())),
                ("e".into(), Value::Enum(1, "Y".into())),
                ("a".into(), Value::Array(vec![Value::Double(1.0), Value::Double(2.5)])),
            ])
        );
        assert_eq!(
            schema_err(json!({"f": "abc"}), &schema),
            "$.f: expected exactly 2 bytes for fixed F (2 bytes), found 3"
        );
    }

    #[test]
    fn logical_types_convert() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"L","fields":[
                {"name":"d","type":{"type":"int","logicalType":"date"}},
                {"name":"id","type":{"type":"string","logicalType":"uuid"}},
                {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":6,"scale":2}},
                {"name":"big","type":{"type":"bytes","logicalType":"big-decimal"}},
                {"name":"dur","type":{"type":"fixed","name":"Dur","size":12,"logicalType":"duration"}},
                {"name":"us","type":{"type":"long","logicalType":"timestamp-micros"}},
                {"name":"f","type":"float"}
            ]}"#,
        )
        .unwrap();
        let json = json!({"d": 19000, "id": "67e55044-10b1-426f-9247-bb680e5fe0c8", "amount": "-12.5",
            "big": "3.14159", "dur": {"months": 1, "days": 2, "millis": 3}, "us": 5, "f": 0.5});
        let value = json_to_avro(&json, &schema).unwrap();
        assert!(value.validate(&schema));
        let bytes = wire::encode(1, &schema, &value).unwrap();
        let decoded = wire::decode(&schema, &schema, &bytes[wire::HEADER_LEN..]).unwrap();
        assert_eq!(decoded, value);
        let rendered = avro_to_json(&decoded);
        assert_eq!(rendered["amount"], json!({"unscaled": "-1250"}));
        assert_eq!(rendered["id"], json!("67e55044-10b1-426f-9247-bb680e5fe0c8"));
        assert_eq!(rendered["big"], json!("3.14159"));
        assert_eq!(rendered["dur"], json!({"months": 1, "days": 2, "millis": 3}));
        assert_eq!(rendered["us"], json!(5));

        let mut bad = json.clone();
        bad["amount"] = json!("1.234");
        assert_eq!(schema_err(bad, &schema), "$.amount: 1.234 has more than 2 decimal places");
        let mut bad = json.clone();
        bad["amount"] = json!("100000");
        assert_eq!(schema_err(bad, &schema), "$.amount: 100000 has more than 6 significant digits");
        // Exponents far out either way are refused from the digit count,
        // without computing the power of ten (which would take gigabytes).
        let mut bad = json.clone();
        bad["amount"] = json!("1e999999999999");
        assert_eq!(schema_err(bad, &schema), "$.amount: 1e+999999999999 has more than 6 significant digits");
        let mut bad = json.clone();
        bad["amount"] = json!("-5E-3193557124355224006");
        assert!(schema_err(bad, &schema).ends_with("has more than 2 decimal places"));
        let mut ok = json.clone();
        ok["amount"] = json!("0e999999999999");
        assert!(json_to_avro(&ok, &schema).is_ok());
        ok["amount"] = json!("1234.5000e0");
        assert!(json_to_avro(&ok, &schema).is_ok(), "trailing zeros are not digits");
        let mut bad = json.clone();
        bad["id"] = json!("not-a-uuid");
        assert!(schema_err(bad, &schema).starts_with("$.id: invalid uuid \"not-a-uuid\""));
        let mut bad = json.clone();
        bad["dur"] = json!({"weeks": 1});
        assert_eq!(schema_err(bad, &schema), "$.dur.weeks: unknown duration field \"weeks\"");
        let mut bad = json.clone();
        bad["f"] = json!(1e300);
        assert_eq!(schema_err(bad, &schema), "$.f: 1e+300 is out of range for float");
    }

    #[test]
    fn parse_line_reports_syntax_errors() {
        let err = parse_line(b"{\"content_type\": ").unwrap_err();
        assert_eq!(err.code(), "decode.json_syntax");
        assert!(matches!(err, JsonError::Syntax(_)));
        assert!(parse_line(b"not json").is_err());
        assert_eq!(parse_line(b"{\"a\": 1}\r\n").unwrap(), json!({"a": 1}));
        assert_eq!(err.class(), ErrorClass::Invalid);
    }

    #[test]
    fn avro_to_json_renders_special_values() {
        let lines = [
            avro_to_json(&Value::Float(f32::NAN)).to_string(),
            avro_to_json(&Value::Double(f64::INFINITY)).to_string(),
            avro_to_json(&Value::Double(f64::NEG_INFINITY)).to_string(),
            avro_to_json(&Value::Fixed(2, vec![b'o', b'k'])).to_string(),
            avro_to_json(&Value::Enum(0, "A".into())).to_string(),
            avro_to_json(&Value::Union(1, Box::new(Value::TimestampMillis(9)))).to_string(),
        ];
        assert_eq!(lines, ["\"NaN\"", "\"inf\"", "\"-inf\"", "\"ok\"", "\"A\"", "9"]);
    }
}
