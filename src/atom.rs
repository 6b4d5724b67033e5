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

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
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

/// The event published on `atoms.ingested` for each newly stored atom.
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
