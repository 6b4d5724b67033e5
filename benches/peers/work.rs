//! The per-record work every peer does, so that no row is faster because it
//! skipped some: decode the Confluent-framed Avro request, hash its content
//! (SHA-256), embed it (the built-in hashing embedder, 384 dimensions), build
//! the `atoms` row, and encode the `AtomIngested` event. The peers call the
//! same functions the processor's stages call (apache-avro, sha2, the hashing
//! embedder), so the rows differ only in how the pipeline around them runs.

use std::sync::Arc;

use apache_avro::Schema;
use clickhouse::Row;
use hartonomous::atom::{AtomIngested, AtomIngestionRequest, ArrivalOutcome, ContentHash};
use hartonomous::avro::{FileRegistry, Schemas, wire};
use hartonomous::embed::hashing::HashingEmbedder;
use serde::Serialize;

pub const DIMENSION: usize = 384;

/// One row of the `atoms` table (the processor's DDL, `hartonomous migrate`),
/// written with the clickhouse crate's RowBinary insert.
#[derive(Row, Serialize)]
pub struct AtomRowCh {
    pub content_hash: String,
    pub content_type: String,
    pub content: String,
    pub content_size: u64,
    pub source_system: String,
    pub correlation_id: String,
    pub metadata: String,
    pub embedding: Vec<f32>,
    pub embedding_model: &'static str,
    pub embedding_dimension: u32,
    pub event_time: u32,
    pub event_time_ms: i64,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub ingested_at: u32,
    pub ingested_at_ms: u64,
    pub trace_id: &'static str,
}

/// What one record becomes: its row and its event (key, Avro payload).
pub struct Done {
    pub row: AtomRowCh,
    pub key: Vec<u8>,
    pub event: Vec<u8>,
}

pub struct Work {
    registry: FileRegistry,
    reader: Arc<Schema>,
    event_schema: Arc<Schema>,
    event_schema_id: u32,
    embedder: HashingEmbedder,
}

impl Work {
    /// `registry` holds the writer schemas of the input; the event schema is
    /// registered there for `out_topic`.
    pub fn new(registry: &std::path::Path, out_topic: &str) -> Self {
        let registry = FileRegistry::open(registry).unwrap();
        let reader = Schemas::current("AtomIngestionRequest").unwrap().schema.clone();
        let event_schema = Schemas::current("AtomIngested").unwrap().schema.clone();
        let event_schema_id = registry.register_schema(&Schemas::subject(out_topic), &event_schema).unwrap();
        Self { registry, reader, event_schema, event_schema_id, embedder: HashingEmbedder::new(DIMENSION, 256) }
    }

    /// Decodes, hashes, embeds and encodes one record. Panics on bad input:
    /// the bench produces none, and a peer that met some would be wrong.
    pub fn transform(&self, payload: &[u8], topic: &str, partition: i32, offset: i64, now_ms: i64) -> Done {
        let (id, body) = wire::split(payload).unwrap();
        let writer = self.registry.get(id).unwrap();
        let value = wire::decode(&writer, &self.reader, body).unwrap();
        let req: AtomIngestionRequest = apache_avro::from_value(&value).unwrap();
        let hash = ContentHash::of(&req.content);
        let text = String::from_utf8_lossy(&req.content).into_owned();
        let embedding = self.embedder.embed_one(&text);
        let event = AtomIngested {
            content_hash: hash.to_hex(),
            content_type: req.content_type.clone(),
            content_size: req.content.len() as i64,
            source_system: req.source_system.clone(),
            correlation_id: req.correlation_id.clone(),
            embedding_model: "hashing".into(),
            embedding_dimension: DIMENSION as i32,
            source_topic: topic.to_string(),
            source_partition: partition,
            source_offset: offset,
            ingested_at_ms: now_ms,
            outcome: ArrivalOutcome::Created,
        };
        let value = apache_avro::to_value(&event).unwrap().resolve(&self.event_schema).unwrap();
        let payload = wire::encode(self.event_schema_id, &self.event_schema, &value).unwrap();
        let event_ms = req.created_at_ms.unwrap_or(now_ms);
        let row = AtomRowCh {
            content_hash: event.content_hash.clone(),
            content_size: req.content.len() as u64,
            content: text,
            content_type: req.content_type,
            source_system: req.source_system,
            correlation_id: req.correlation_id,
            metadata: serde_json::to_string(&req.metadata).unwrap(),
            embedding,
            embedding_model: "hashing",
            embedding_dimension: DIMENSION as u32,
            event_time: (event_ms / 1000) as u32,
            event_time_ms: event_ms,
            source_topic: topic.to_string(),
            source_partition: partition,
            source_offset: offset,
            ingested_at: (now_ms / 1000) as u32,
            ingested_at_ms: now_ms as u64,
            trace_id: "",
        };
        Done { row, key: event.content_hash.into_bytes(), event: payload }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The events' producer every peer uses: acks from all replicas, idempotent,
/// the processor's default linger (`DEFAULT_LINGER_MS`), so that no row
/// wins by batching its events differently.
pub fn event_producer(kafka: &str) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", hartonomous::log::kafka::DEFAULT_LINGER_MS.to_string())
        .create()
        .unwrap()
}
