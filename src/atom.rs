//! The atom-ingestion domain types: the request upstream systems produce,
//! the row analysts query, and the event published once an atom is stored.
//! Field names match `schemas/avro/*.avsc` and `schemas/clickhouse/*.sql`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `AtomIngestionRequest` as decoded with the current reader schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AtomIngestionRequest {
    pub content_type: String,
    #[serde(with = "serde_bytes_compat")]
    pub content: Vec<u8>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub source_system: String,
    pub correlation_id: String,
    /// Added in schema version 2; `None` for records written with version 1.
    #[serde(default)]
    pub created_at_ms: Option<i64>,
}

/// Avro `bytes` arrive through serde as a byte buffer or as a sequence of
/// numbers depending on the path; accept both.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                Ok(v.as_bytes().to_vec())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// SHA-256 of an atom's content: its identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    pub fn of(content: &[u8]) -> Self {
        Self(Sha256::digest(content).into())
    }

    /// Lower-case hex. `hex::encode` collects the digits one `char` at a
    /// time, which showed in the profile: every stored row and event takes
    /// this once or more.
    pub fn to_hex(&self) -> String {
        let mut out = [0u8; 64];
        hex::encode_to_slice(self.0, &mut out).expect("64 digits for 32 bytes");
        std::str::from_utf8(&out).expect("hex digits are ASCII").to_owned()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

/// One row of the `atoms` table. The same columns exist in the embedded store
/// and in ClickHouse. `content_hash` is the key: writing a row whose hash is
/// already stored is a no-op, so replays never duplicate.
#[derive(Debug, Clone, PartialEq)]
pub struct AtomRow {
    pub content_hash: ContentHash,
    pub content_type: String,
    pub content: Vec<u8>,
    pub source_system: String,
    pub correlation_id: String,
    /// The request's metadata map as a JSON object (ClickHouse 18.16 has no Map type).
    pub metadata_json: String,
    pub embedding: Vec<f32>,
    pub embedding_model: String,
    pub event_time_ms: i64,
    // Lineage: where the request was read, when it was stored, and its trace.
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub ingested_at_ms: i64,
    pub trace_id: String,
}

/// Where a request was read: topic, partition and offset. The key of its
/// arrival, and the lineage of the atom it created.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl SourcePosition {
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        Self { topic: topic.into(), partition, offset }
    }
}

impl fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// What one accepted request did to the atom store. The same symbols, in the
/// same order, as the Avro enum `AtomArrivalOutcome` and the ClickHouse
/// `Enum8` column `atom_arrivals.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArrivalOutcome {
    /// This request stored the atom.
    #[serde(rename = "CREATED")]
    Created,
    /// The content was already stored (or admitted earlier): nothing new was
    /// stored and no embedding call was made.
    #[serde(rename = "MATCHED")]
    Matched,
}

impl ArrivalOutcome {
    /// The lower-case name used in tables: `created` / `matched`.
    pub fn as_str(self) -> &'static str {
        match self {
            ArrivalOutcome::Created => "created",
            ArrivalOutcome::Matched => "matched",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(ArrivalOutcome::Created),
            "matched" => Some(ArrivalOutcome::Matched),
            _ => None,
        }
    }
}

/// One row of `atom_arrivals`: one accepted request, keyed by its source
/// position, so a replay never doubles it. Analysts count what each source
/// sent here, repeats included; `atoms` holds each content once.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivalRow {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub content_hash: ContentHash,
    pub outcome: ArrivalOutcome,
    pub content_type: String,
    pub content_size: u64,
    pub source_system: String,
    pub correlation_id: String,
    pub event_time_ms: i64,
    /// When this request was processed.
    pub arrived_at_ms: i64,
    pub trace_id: String,
}

impl ArrivalRow {
    pub fn position(&self) -> SourcePosition {
        SourcePosition::new(self.source_topic.clone(), self.source_partition, self.source_offset)
    }
}

impl AtomRow {
    /// The request that created this atom: its lineage.
    pub fn position(&self) -> SourcePosition {
        SourcePosition::new(self.source_topic.clone(), self.source_partition, self.source_offset)
    }
}

/// The event published on `atoms.ingested` for every accepted request (see
/// `schemas/avro/AtomIngested.v2.avsc` for the rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AtomIngested {
    pub content_hash: String,
    pub content_type: String,
    pub content_size: i64,
    pub source_system: String,
    pub correlation_id: String,
    pub embedding_model: String,
    pub embedding_dimension: i32,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub ingested_at_ms: i64,
    /// Added in version 2; version-1 events read as `Created`.
    #[serde(default = "created")]
    pub outcome: ArrivalOutcome,
}

fn created() -> ArrivalOutcome {
    ArrivalOutcome::Created
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_and_roundtrips_hex() {
        let h = ContentHash::of(b"abc");
        assert_eq!(h.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(ContentHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(ContentHash::from_hex("zz"), None);
    }
}
