//! Dead letters: a record that a stage could not process, kept with its
//! original bytes and its provenance.
//!
//! On the dead-letter topic a dead letter is the original key and payload,
//! unchanged, with the original headers plus the provenance headers below
//! (the convention of Kafka Connect's `errors.deadletterqueue.context.headers`).
//! Redriving is then a plain copy back to the source topic. The same facts are
//! archived in the store's `dead_letters` table, shaped like
//! `schemas/avro/DeadLetter.v1.avsc`.

use futures::future::BoxFuture;

use crate::flow::batch::End;
use crate::record::{OutgoingRecord, Record};
use crate::store::{InsertReport, StoreError};

pub const H_TOPOLOGY: &str = "hartonomous.dlq.topology";
pub const H_TOPIC: &str = "hartonomous.dlq.source.topic";
pub const H_PARTITION: &str = "hartonomous.dlq.source.partition";
pub const H_OFFSET: &str = "hartonomous.dlq.source.offset";
pub const H_STAGE: &str = "hartonomous.dlq.stage";
pub const H_REASON: &str = "hartonomous.dlq.reason";
pub const H_ERROR: &str = "hartonomous.dlq.error";
pub const H_ATTEMPTS: &str = "hartonomous.dlq.attempts";
pub const H_FAILED_AT: &str = "hartonomous.dlq.failed_at_ms";
/// Present only on a copy whose payload was cut because the broker refused it
/// whole: the original payload's size in bytes. The `dead_letters` table
/// keeps the whole payload.
pub const H_TRUNCATED: &str = "hartonomous.dlq.truncated";

/// Longest error text put in the `hartonomous.dlq.error` header (the
/// `dead_letters` table keeps it whole). Registry and server answers can be
/// long; a header that size would risk the broker refusing the dead letter.
pub const MAX_ERROR_HEADER_BYTES: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The facts about one dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter<'a> {
    pub topology: &'a str,
    pub record: &'a Record,
    pub stage: &'a str,
    pub reason: &'a str,
    pub error: &'a str,
    pub attempts: u32,
    pub failed_at_ms: i64,
}

impl<'a> DeadLetter<'a> {
    /// `None` unless `end` is a dead end.
    pub fn from_end(topology: &'a str, record: &'a Record, end: &'a End) -> Option<Self> {
        match end {
            End::Dead { stage, rejection, failed_at_ms } => Some(Self {
                topology,
                record,
                stage,
                reason: &rejection.code,
                error: &rejection.message,
                attempts: rejection.attempts,
                failed_at_ms: *failed_at_ms,
            }),
            End::Skipped(_) => None,
        }
    }

    pub fn to_outgoing(&self, dlq_topic: &str) -> OutgoingRecord {
        let mut headers = self.record.headers.clone();
        let p = &self.record.position;
        headers
            .insert(H_TOPOLOGY, self.topology)
            .insert(H_TOPIC, &*p.tp.topic)
            .insert(H_PARTITION, p.tp.partition.to_string())
            .insert(H_OFFSET, p.offset.to_string())
            .insert(H_STAGE, self.stage)
            .insert(H_REASON, self.reason)
            .insert(H_ERROR, clip(self.error, MAX_ERROR_HEADER_BYTES))
            .insert(H_ATTEMPTS, self.attempts.to_string())
            .insert(H_FAILED_AT, self.failed_at_ms.to_string());
        OutgoingRecord {
            topic: dlq_topic.to_string(),
            // Partitioned by the original key, so the dead-letter topic may
            // have any number of partitions and a key's dead letters stay in
            // order; the source partition is in the provenance headers.
            partition: None,
            key: self.record.key.clone(),
            payload: self.record.payload.clone(),
            headers,
            event_time_ms: Some(self.record.event_time_ms),
        }
    }

    /// The same dead letter with its payload cut to `keep` bytes and the
    /// [`H_TRUNCATED`] header giving the original size.
    pub fn to_truncated_outgoing(&self, dlq_topic: &str, keep: usize) -> OutgoingRecord {
        let mut out = self.to_outgoing(dlq_topic);
        out.payload.truncate(keep);
        out.headers.insert(H_TRUNCATED, self.record.payload.len().to_string());
        out
    }

    pub fn to_row(&self) -> DeadLetterRow {
        let p = &self.record.position;
        DeadLetterRow {
            topology: self.topology.to_string(),
            source_topic: p.tp.topic.to_string(),
            source_partition: p.tp.partition,
            source_offset: p.offset,
            stage: self.stage.to_string(),
            reason: self.reason.to_string(),
            error: self.error.to_string(),
            attempts: self.attempts,
            failed_at_ms: self.failed_at_ms,
            original_key: self.record.key.clone(),
            original_payload: self.record.payload.clone(),
            trace_id: crate::trace::trace_id(self.record.headers.get_str("traceparent")),
        }
    }
}

/// One record that went to a dead-letter topic, as archived for analysts
/// (table `dead_letters`). Keyed by its source position, so re-archiving the
/// same record is a no-op.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    pub topology: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub reason: String,
    pub error: String,
    pub attempts: u32,
    pub failed_at_ms: i64,
    pub original_key: Option<Vec<u8>>,
    pub original_payload: Vec<u8>,
    /// The trace id of the record's `traceparent` header, or empty (crate::trace).
    pub trace_id: String,
}

/// Where dead letters are archived for analysts (table `dead_letters`).
/// Each store implements it; the runner's acker is its only caller, so the
/// flow core needs no store contract.
///
/// Contract: idempotent by (source_topic, source_partition, source_offset);
/// when it returns `Ok` the rows are durable, and only then may their source
/// offsets be committed.
pub trait DeadLetterArchive: Send + Sync + 'static {
    fn insert_dead_letters<'a>(&'a self, rows: &'a [DeadLetterRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>>;
}

/// Reads the provenance back from a record on a dead-letter topic.
pub fn provenance(record: &Record) -> Option<(String, i32, i64, String, String)> {
    let h = &record.headers;
    Some((
        h.get_str(H_TOPIC)?.to_string(),
        h.get_str(H_PARTITION)?.parse().ok()?,
        h.get_str(H_OFFSET)?.parse().ok()?,
        h.get_str(H_STAGE)?.to_string(),
        h.get_str(H_REASON)?.to_string(),
    ))
}
