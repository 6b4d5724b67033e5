//! Avro on Kafka: the bundled schemas, the Confluent wire format, the schema
//! registry, and a JSON bridge for hand-written test data.
//!
//! # Wire format
//!
//! Every Kafka record value produced or consumed by Hartonomous uses the
//! Confluent wire format (see [`wire`]):
//!
//! ```text
//! byte 0      magic byte, always 0
//! bytes 1..5  schema id, u32 big-endian, as assigned by the schema registry
//! bytes 5..   one Avro datum in binary encoding (no container-file header)
//! ```
//!
//! The id names the *writer* schema. A consumer fetches that schema from the
//! registry, decodes the body with it, then resolves the value to its own
//! *reader* schema (the highest bundled version, see [`Schemas::current`]).
//! This is how a record written with `AtomIngestionRequest` v1 is read as v2:
//! fields added since v1 take their defaults.
//!
//! Between the registry and the decoder, [`Decoder`] checks each writer
//! schema once per id: it must be the type the topic carries, and data of a
//! recursive schema is walked with a depth limit before it is decoded
//! ([`decoder`], [`depth`]). Every way a record can be malformed is a
//! per-record [`WireError`] with a stable reason code, never a crash.
//!
//! # Registry
//!
//! A [`SchemaRegistry`] maps ids to schemas and registers schemas under
//! *subjects*. Subjects follow Confluent's `TopicNameStrategy`: the value
//! schema of topic `t` lives under subject `t-value` ([`Schemas::subject`]).
//! Registration is register-or-lookup: the same schema (by Parsing Canonical
//! Form) under the same subject always returns the same id. The embedded
//! default is [`FileRegistry`], a JSON file in the data directory;
//! [`confluent::ConfluentRegistry`] talks to a Confluent-compatible registry.
//!
//! # Bundled schemas
//!
//! The `.avsc` files in `schemas/avro/` (one per name and version, namespace
//! `io.hartonomous`) are compiled into the binary; [`Schemas`] lists them.
//! [`FileRegistry::register_bundled`] registers every version of a schema so
//! that data written by older producers keeps an id.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use apache_avro::Schema;

pub mod confluent;
pub mod decoder;
pub mod depth;
pub mod direct;
pub mod json;
pub mod registry;
pub mod wire;

pub use decoder::{Decoder, decode_message};
pub use json::{JsonError, avro_to_json, json_to_avro, parse_line};
pub use registry::{
    BundledRegistration, DecodeError, FileRegistry, RegisteredSchema, RegistryError,
    SchemaRegistry,
};
pub use wire::{SchemaProblem, WireError, decode, encode, split};

/// Namespace of every bundled schema.
pub const NAMESPACE: &str = "io.hartonomous";

/// Name of the atom-ingestion request schema.
pub const ATOM_INGESTION_REQUEST: &str = "AtomIngestionRequest";
/// Name of the event published for each newly stored atom.
pub const ATOM_INGESTED: &str = "AtomIngested";
/// Name of the dead-letter envelope schema.
pub const DEAD_LETTER: &str = "DeadLetter";
/// Name of the ensemble-inference request schema.
pub const INFERENCE_REQUEST: &str = "InferenceRequest";
/// Name of the ensemble-inference result schema.
pub const INFERENCE_RESULT: &str = "InferenceResult";
/// Name of one model's answer, published as a partial result.
pub const MODEL_OUTPUT: &str = "ModelOutput";
/// Name of the saga's compensation event.
pub const INFERENCE_COMPENSATION: &str = "InferenceCompensation";
/// Name of the answer to a compensated inference request.
pub const INFERENCE_COMPENSATED: &str = "InferenceCompensated";

/// Every bundled schema file: (name, version, source). Versions of one name
/// are listed in increasing order.
const BUNDLED: &[(&str, u32, &str)] = &[
    (ATOM_INGESTION_REQUEST, 1, include_str!("../../schemas/avro/AtomIngestionRequest.v1.avsc")),
    (ATOM_INGESTION_REQUEST, 2, include_str!("../../schemas/avro/AtomIngestionRequest.v2.avsc")),
    (ATOM_INGESTED, 1, include_str!("../../schemas/avro/AtomIngested.v1.avsc")),
    (ATOM_INGESTED, 2, include_str!("../../schemas/avro/AtomIngested.v2.avsc")),
    (DEAD_LETTER, 1, include_str!("../../schemas/avro/DeadLetter.v1.avsc")),
    (INFERENCE_REQUEST, 1, include_str!("../../schemas/avro/InferenceRequest.v1.avsc")),
    (INFERENCE_REQUEST, 2, include_str!("../../schemas/avro/InferenceRequest.v2.avsc")),
    (INFERENCE_RESULT, 1, include_str!("../../schemas/avro/InferenceResult.v1.avsc")),
    (MODEL_OUTPUT, 1, include_str!("../../schemas/avro/ModelOutput.v1.avsc")),
    (INFERENCE_COMPENSATION, 1, include_str!("../../schemas/avro/InferenceCompensation.v1.avsc")),
    (INFERENCE_COMPENSATED, 1, include_str!("../../schemas/avro/InferenceCompensated.v1.avsc")),
];

/// One version of a bundled schema.
#[derive(Debug, Clone)]
pub struct SchemaVersion {
    /// Short record name, e.g. `AtomIngestionRequest`.
    pub name: &'static str,
    /// Bundle version (the `vN` in the file name), starting at 1.
    pub version: u32,
    /// The parsed schema.
    pub schema: Arc<Schema>,
    /// The `.avsc` text as bundled.
    pub source: &'static str,
}

/// The catalogue of schemas compiled into the binary.
///
/// Schemas are parsed on first use. A bundled schema that does not parse is a
/// build defect, caught by this module's tests, so lookups panic on it rather
/// than returning an error every caller would have to handle.
pub struct Schemas;

impl Schemas {
    /// The registry subject holding the value schema of `topic`
    /// (Confluent `TopicNameStrategy`): `<topic>-value`.
    pub fn subject(topic: &str) -> String {
        format!("{topic}-value")
    }

    /// Names of all bundled schemas, sorted.
    pub fn names() -> Vec<&'static str> {
        catalogue().keys().copied().collect()
    }

    /// Every bundled version of `name`, oldest first; `None` for an unknown name.
    pub fn versions(name: &str) -> Option<&'static [SchemaVersion]> {
        catalogue().get(name).map(Vec::as_slice)
    }

    /// The current (highest) version of `name`: the reader schema consumers use.
    pub fn current(name: &str) -> Option<&'static SchemaVersion> {
        Self::versions(name).and_then(<[SchemaVersion]>::last)
    }

    /// One specific version of `name`.
    pub fn version(name: &str, version: u32) -> Option<&'static SchemaVersion> {
        Self::versions(name)?.iter().find(|v| v.version == version)
    }
}

fn catalogue() -> &'static BTreeMap<&'static str, Vec<SchemaVersion>> {
    static CATALOGUE: OnceLock<BTreeMap<&'static str, Vec<SchemaVersion>>> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        let mut map: BTreeMap<&'static str, Vec<SchemaVersion>> = BTreeMap::new();
        for &(name, version, source) in BUNDLED {
            let schema = Schema::parse_str(source)
                .unwrap_or_else(|e| panic!("bundled schema {name} v{version} does not parse: {e}"));
            map.entry(name).or_default().push(SchemaVersion {
                name,
                version,
                schema: Arc::new(schema),
                source,
            });
        }
        for versions in map.values_mut() {
            versions.sort_by_key(|v| v.version);
        }
        map
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_schema_parses_with_its_name_and_namespace() {
        assert_eq!(
            Schemas::names(),
            vec![
                ATOM_INGESTED,
                ATOM_INGESTION_REQUEST,
                DEAD_LETTER,
                INFERENCE_COMPENSATED,
                INFERENCE_COMPENSATION,
                INFERENCE_REQUEST,
                INFERENCE_RESULT,
                MODEL_OUTPUT
            ]
        );
        for name in Schemas::names() {
            for v in Schemas::versions(name).unwrap() {
                let n = v.schema.name().expect("bundled schemas are named records");
                assert_eq!(n.name(), name);
                assert_eq!(n.namespace(), Some(NAMESPACE));
                assert!(matches!(*v.schema, Schema::Record(_)), "{name} v{}", v.version);
            }
        }
    }

    #[test]
    fn versions_are_ordered_and_current_is_highest() {
        let versions = Schemas::versions(ATOM_INGESTION_REQUEST).unwrap();
        assert_eq!(versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(Schemas::current(ATOM_INGESTION_REQUEST).unwrap().version, 2);
        assert_eq!(Schemas::version(ATOM_INGESTION_REQUEST, 1).unwrap().version, 1);
        assert!(Schemas::version(ATOM_INGESTION_REQUEST, 3).is_none());
        assert!(Schemas::versions("NoSuchSchema").is_none());
        assert!(Schemas::current("NoSuchSchema").is_none());
        assert_eq!(Schemas::current(ATOM_INGESTED).unwrap().version, 2);
        assert_eq!(Schemas::current(INFERENCE_REQUEST).unwrap().version, 2);
        for name in [DEAD_LETTER, INFERENCE_RESULT, MODEL_OUTPUT, INFERENCE_COMPENSATION, INFERENCE_COMPENSATED] {
            assert_eq!(Schemas::current(name).unwrap().version, 1);
        }
    }

    #[test]
    fn subject_uses_topic_name_strategy() {
        assert_eq!(Schemas::subject("atoms.requests"), "atoms.requests-value");
    }

    #[test]
    fn every_field_is_documented() {
        fn check(schema: &Schema, what: &str) {
            if let Schema::Record(r) = schema {
                assert!(r.doc.as_deref().is_some_and(|d| !d.is_empty()), "{what}: record doc");
                for f in &r.fields {
                    assert!(
                        f.doc.as_deref().is_some_and(|d| !d.is_empty()),
                        "{what}.{}: field doc",
                        f.name
                    );
                    check(&f.schema, &format!("{what}.{}", f.name));
                }
            } else if let Schema::Array(a) = schema {
                check(&a.items, what);
            }
        }
        for name in Schemas::names() {
            for v in Schemas::versions(name).unwrap() {
                check(&v.schema, &format!("{name} v{}", v.version));
            }
        }
    }

    #[test]
    fn atom_ingested_schema_matches_struct_field_for_field() {
        let schema = &Schemas::current(ATOM_INGESTED).unwrap().schema;
        let Schema::Record(r) = &**schema else { panic!("record expected") };
        let fields: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "content_hash",
                "content_type",
                "content_size",
                "source_system",
                "correlation_id",
                "embedding_model",
                "embedding_dimension",
                "source_topic",
                "source_partition",
                "source_offset",
                "ingested_at_ms",
                "outcome"
            ]
        );
        let event = crate::atom::AtomIngested {
            content_hash: "ab".repeat(32),
            content_type: "text/plain".into(),
            content_size: 5,
            source_system: "tests".into(),
            correlation_id: "c-1".into(),
            embedding_model: "hashing-384".into(),
            embedding_dimension: 384,
            source_topic: "atoms.requests".into(),
            source_partition: 2,
            source_offset: 41,
            ingested_at_ms: 1_700_000_000_000,
            outcome: crate::atom::ArrivalOutcome::Matched,
        };
        let value = apache_avro::to_value(&event).unwrap().resolve(schema).unwrap();
        let bytes = encode(7, schema, &value).unwrap();
        let (id, body) = split(&bytes).unwrap();
        assert_eq!(id, 7);
        let back = decode(schema, schema, body).unwrap();
        let event_back: crate::atom::AtomIngested = apache_avro::from_value(&back).unwrap();
        assert_eq!(event_back, event);
    }
}
