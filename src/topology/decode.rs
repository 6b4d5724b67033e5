//! The first stage of every topology: bytes → the source schema's type
//! (`AtomIngestionRequest`, `InferenceRequest`, ...).
//!
//! A record is Avro in the Confluent wire format (magic byte 0, 4-byte
//! big-endian schema id, Avro body), decoded with its writer schema from the
//! registry and resolved to the current reader schema, so records written
//! with an older compatible schema decode too. The writer schema is checked
//! once per id by [`avro::Decoder`]: a schema id that is unknown, not Avro,
//! uses references, does not parse, or names another type, and data nested
//! too deep under a recursive schema, are dead-lettered with their own
//! reason (`decode.*`), never fatal. Only a registry that is unreachable
//! (retried with backoff) or wrong for every record (fatal: bad URL or
//! credentials, untrusted certificate, not a registry) stops anything.
//!
//! A record whose `content-type` header is `application/json` is instead a
//! JSON object with the schema's field names (for hand-written test input),
//! checked against the same reader schema.

use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::types::Value;

use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::atom::AtomIngestionRequest;
use crate::avro::{self, DecodeError, Decoder, SchemaRegistry};
use crate::flow::{Item, Stage};
use crate::outcome::{Classify, ErrorClass, Fatal, Outcome, Rejection};
use crate::record::Record;
use crate::resilience::{Attempted, BreakerConfig, CircuitBreaker, Resilient, RetryConfig};

pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Decodes into `T`, the Rust type of the source schema.
pub struct Decode<T> {
    decoder: Decoder,
    resilient: Resilient,
    _type: PhantomData<fn() -> T>,
}

impl<T> Decode<T> {
    pub fn new(registry: Arc<dyn SchemaRegistry>, reader: Arc<Schema>, clock: crate::clock::SharedClock) -> Self {
        let breaker = Arc::new(CircuitBreaker::new("schema-registry", BreakerConfig::default()));
        let retry = RetryConfig::forever();
        Self { decoder: Decoder::new(registry, reader), resilient: Resilient::new(retry, breaker, clock), _type: PhantomData }
    }

    async fn value(&self, record: &Record) -> Result<Value, Result<Rejection, Fatal>> {
        let media = record.headers.get_str("content-type").map(|v| v.split(';').next().unwrap_or("").trim());
        if media.is_some_and(|m| m.eq_ignore_ascii_case(JSON_CONTENT_TYPE)) {
            let json = avro::parse_line(&record.payload).map_err(|e| Ok(Rejection::new(e.code(), e.to_string())))?;
            return avro::json_to_avro(&json, self.decoder.reader()).map_err(|e| Ok(Rejection::new(e.code(), e.to_string())));
        }
        let decoder = &self.decoder;
        // The common case needs no retry machinery (no timer per record): only
        // a registry that is unavailable goes through backoff and the breaker.
        let first = decoder.decode(&record.payload).await;
        let result = match first {
            Err(e) if e.class() == ErrorClass::Retry => self.resilient.call(|| decoder.decode(&record.payload)).await,
            Err(error) => {
                let class = error.class();
                Err(Attempted::Rejected { error, class, attempts: 1 })
            }
            Ok(v) => Ok(v),
        };
        match result {
            Ok((_, value)) => Ok(value),
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, .. }) => Err(Ok(Rejection::new(error.code(), error.to_string()))),
            Err(Attempted::Rejected { error: DecodeError::Registry(e), .. }) => Err(Err(Fatal::new("decode", e.to_string()))),
            Err(e) => Err(Err(Fatal::new("decode", e.to_string()))),
        }
    }
}

impl<T> Decode<T> {
    /// The schema registry's breaker, for the runner's list of breakers.
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.resilient.breaker.clone()
    }
}

/// Avro value → the typed request. Failing here means the value matched the
/// schema but not our type, which only a schema/type mismatch can cause.
pub fn to_request(value: &Value) -> Result<AtomIngestionRequest, Rejection> {
    to_typed(value)
}

/// The Rust type of a source schema, built from its decoded value.
pub trait FromAvro: DeserializeOwned {
    /// Contract: the same result as [`to_typed`] on the value. The default
    /// is serde over the value, which copies every string and byte buffer.
    fn from_avro(value: Value) -> Result<Self, Rejection> {
        to_typed(&value)
    }
}

impl FromAvro for crate::inference::InferenceRequest {}
impl FromAvro for crate::inference::InferenceCompensation {}

impl FromAvro for AtomIngestionRequest {
    /// Moves the content and the strings out of the value (the content is
    /// most of a record's bytes, and serde's path copies it). A value of any
    /// other shape than the current reader schema's goes serde's way.
    fn from_avro(value: Value) -> Result<Self, Rejection> {
        if !is_request_shape(&value) {
            return to_typed(&value);
        }
        let Value::Record(fields) = value else { unreachable!("checked by is_request_shape") };
        let mut req = AtomIngestionRequest {
            content_type: String::new(),
            content: Vec::new(),
            metadata: Default::default(),
            source_system: String::new(),
            correlation_id: String::new(),
            created_at_ms: None,
        };
        for (name, v) in fields {
            match (name.as_str(), v) {
                ("content_type", Value::String(s)) => req.content_type = s,
                ("content", Value::Bytes(b)) => req.content = b,
                ("metadata", Value::Map(m)) => {
                    req.metadata = m.into_iter().map(|(k, v)| (k, if let Value::String(s) = v { s } else { unreachable!("checked") })).collect()
                }
                ("source_system", Value::String(s)) => req.source_system = s,
                ("correlation_id", Value::String(s)) => req.correlation_id = s,
                ("created_at_ms", Value::Union(_, v)) => {
                    req.created_at_ms = match *v {
                        Value::Long(t) | Value::TimestampMillis(t) => Some(t),
                        _ => None,
                    }
                }
                _ => unreachable!("checked by is_request_shape"),
            }
        }
        Ok(req)
    }
}

/// Exactly the fields of `AtomIngestionRequest`, each of the type the
/// current reader schema decodes it to.
fn is_request_shape(value: &Value) -> bool {
    let Value::Record(fields) = value else { return false };
    let mut seen = [false; 6];
    for (name, v) in fields {
        let i = match (name.as_str(), v) {
            ("content_type", Value::String(_)) => 0,
            ("content", Value::Bytes(_)) => 1,
            ("metadata", Value::Map(m)) if m.values().all(|v| matches!(v, Value::String(_))) => 2,
            ("source_system", Value::String(_)) => 3,
            ("correlation_id", Value::String(_)) => 4,
            ("created_at_ms", Value::Union(_, v)) if matches!(**v, Value::Null | Value::Long(_) | Value::TimestampMillis(_)) => 5,
            _ => return false,
        };
        if std::mem::replace(&mut seen[i], true) {
            return false;
        }
    }
    seen.iter().all(|s| *s)
}

/// Avro value → `T` (see [`to_request`]).
pub fn to_typed<T: DeserializeOwned>(value: &Value) -> Result<T, Rejection> {
    apache_avro::from_value::<T>(value).map_err(|e| {
        let name = std::any::type_name::<T>().rsplit("::").next().unwrap_or("the request type");
        Rejection::new("decode.body", format!("does not map to {name}: {e}"))
    })
}

impl<T: FromAvro + Send + 'static> Stage for Decode<T> {
    type In = ();
    type Out = T;

    async fn process(&mut self, items: Vec<Item<()>>) -> Result<Vec<Outcome<T>>, Fatal> {
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            out.push(match self.value(&item.record).await {
                Ok(v) => match T::from_avro(v) {
                    Ok(req) => Outcome::Continue(req),
                    Err(r) => Outcome::Invalid(r),
                },
                Err(Ok(rejection)) => Outcome::Invalid(rejection),
                Err(Err(fatal)) => return Err(fatal),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::{ATOM_INGESTION_REQUEST, Schemas};

    fn value(json: serde_json::Value) -> Value {
        let reader = Schemas::current(ATOM_INGESTION_REQUEST).unwrap().schema.clone();
        avro::json_to_avro(&json, &reader).unwrap()
    }

    #[test]
    fn moving_a_request_out_of_its_value_gives_what_serde_gives() {
        let full = serde_json::json!({"content_type": "text/plain", "content": "héllo", "metadata": {"a": "1", "b": "2"},
            "source_system": "s", "correlation_id": "c", "created_at_ms": 1_700_000_000_123i64});
        let bare = serde_json::json!({"content_type": "text/plain", "content": "", "source_system": "", "correlation_id": "", "created_at_ms": null});
        for json in [full, bare] {
            let v = value(json);
            assert!(is_request_shape(&v), "{v:?}");
            assert_eq!(AtomIngestionRequest::from_avro(v.clone()).unwrap(), to_typed::<AtomIngestionRequest>(&v).unwrap());
        }
        // Values of another shape take serde's way, errors included.
        let Value::Record(mut fields) = value(serde_json::json!({"content_type": "t", "content": "x", "source_system": "s", "correlation_id": "c"})) else { panic!() };
        fields.push(("unknown".into(), Value::Int(1)));
        let extra = Value::Record(fields.clone());
        assert!(!is_request_shape(&extra));
        assert_eq!(AtomIngestionRequest::from_avro(extra.clone()).unwrap(), to_typed::<AtomIngestionRequest>(&extra).unwrap());
        fields.retain(|(n, _)| n != "content_type");
        let missing = Value::Record(fields);
        assert!(!is_request_shape(&missing));
        assert_eq!(AtomIngestionRequest::from_avro(missing.clone()).unwrap_err(), to_typed::<AtomIngestionRequest>(&missing).unwrap_err());
    }
}
