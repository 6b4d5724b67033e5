//! The ensemble-inference domain types: the request upstream systems
//! produce, the events the topology publishes, and the rows analysts query.
//! Field names match `schemas/avro/*.avsc` and `schemas/clickhouse/*.sql`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::atom::SourcePosition;

/// `InferenceRequest` as decoded with the current reader schema (v2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceRequest {
    pub request_id: String,
    pub input: String,
    #[serde(default)]
    pub model_ids: Vec<String>,
    /// An `Aggregation` symbol; `None` takes the ensemble's strategy.
    #[serde(default)]
    pub aggregation: Option<String>,
    #[serde(default)]
    pub quorum: Option<i32>,
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
    pub correlation_id: String,
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    /// Added in version 2.
    #[serde(default)]
    pub ensemble: Option<String>,
}

/// One model's answer, published on the partial-results topic as it arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOutput {
    pub request_id: String,
    pub correlation_id: String,
    pub model_id: String,
    pub model_version: String,
    pub sequence: i32,
    pub label: Option<String>,
    pub score: Option<f64>,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub attempts: i32,
    pub hedged: bool,
    pub coalesced: bool,
    pub late: bool,
    pub flags: Vec<String>,
    pub answered_at_ms: i64,
}

/// One model's contribution inside an [`InferenceResult`] (the nested
/// `ModelOutput` record of `InferenceResult` v1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVote {
    pub model_id: String,
    pub output: Option<String>,
    pub score: Option<f64>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

/// The combined answer, published once the result is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResult {
    pub request_id: String,
    pub correlation_id: String,
    /// `COMPLETE` or `PARTIAL` (a compensated request gets
    /// [`InferenceCompensated`] instead, never a result).
    #[serde(serialize_with = "inference_status")]
    pub status: String,
    pub aggregation: String,
    pub output: Option<String>,
    pub score: Option<f64>,
    pub model_outputs: Vec<ModelVote>,
    pub completed_at_ms: i64,
}

/// The symbols of the schema's `InferenceStatus` enum, in schema order
/// (a test checks them against the bundled schema).
pub const INFERENCE_STATUSES: [&str; 4] = ["COMPLETE", "PARTIAL", "FAILED", "COMPENSATED"];

/// Writes [`InferenceResult::status`] as the enum symbol it names. A
/// schema-aware Avro writer encodes a symbol only from a unit variant (a
/// string fits a string schema only); JSON and `apache_avro::to_value` still
/// see the plain string. A status that is no symbol is an error, as it was
/// when the event was resolved against the schema.
fn inference_status<S: serde::Serializer>(status: &str, s: S) -> Result<S::Ok, S::Error> {
    match INFERENCE_STATUSES.iter().position(|&symbol| symbol == status) {
        Some(i) => s.serialize_unit_variant("InferenceStatus", i as u32, INFERENCE_STATUSES[i]),
        None => Err(serde::ser::Error::custom(format!("`{status}` is not an InferenceStatus symbol ({})", INFERENCE_STATUSES.join(", ")))),
    }
}

/// A saga step failed: undo the steps before it (see the schema's doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceCompensation {
    pub request_id: String,
    pub correlation_id: String,
    pub failed_step: String,
    pub reason_code: String,
    pub reason: String,
    pub done_steps: Vec<String>,
    pub models: Vec<String>,
    pub reservations: i32,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub failed_at_ms: i64,
}

impl InferenceCompensation {
    pub fn position(&self) -> SourcePosition {
        SourcePosition::new(self.source_topic.clone(), self.source_partition, self.source_offset)
    }
}

/// The answer to a compensated request: what was undone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceCompensated {
    pub request_id: String,
    pub correlation_id: String,
    pub failed_step: String,
    pub reason_code: String,
    pub reason: String,
    pub undone_steps: Vec<String>,
    pub retracted_outputs: i32,
    pub retracted_result: bool,
    pub released_reservations: i32,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub compensated_at_ms: i64,
}

/// Row versions: a live row is written with [`LIVE`], its retraction with
/// [`RETRACTED`] and `deleted = 1`. Both are fixed, so a replayed write is
/// the same row again, and a retraction always outranks the row it retracts
/// whatever order they land in (`ReplacingMergeTree(version)` keeps the
/// highest).
pub const LIVE: u64 = 1;
pub const RETRACTED: u64 = 2;

/// A row of `model_outputs`: one model's answer to one request, keyed by the
/// request's source position and the model id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct OutputRow {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub model_id: String,
    pub request_id: String,
    pub correlation_id: String,
    pub model_version: String,
    pub sequence: u32,
    pub label: String,
    pub score: f64,
    pub has_score: u8,
    pub error: String,
    pub latency_ms: u64,
    pub attempts: u32,
    pub hedged: u8,
    pub coalesced: u8,
    pub late: u8,
    pub counted: u8,
    pub flags: String,
    pub answered_at_ms: u64,
    pub deleted: u8,
    pub version: u64,
    /// The trace id of the request's `traceparent` (crate::trace), or empty.
    /// Defaulted: parts written before the column existed have none.
    #[serde(default)]
    pub trace_id: String,
}

impl OutputRow {
    pub fn position(&self) -> SourcePosition {
        SourcePosition::new(self.source_topic.clone(), self.source_partition, self.source_offset)
    }
}

/// A row of `inference_results`: the decided answer to one request, keyed
/// by the request's source position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct ResultRow {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub request_id: String,
    pub correlation_id: String,
    pub status: String,
    pub aggregation: String,
    pub label: String,
    pub score: f64,
    pub has_score: u8,
    pub models_asked: u32,
    /// The models asked, comma-separated, in ensemble order.
    pub models: String,
    pub models_counted: u32,
    pub models_failed: u32,
    pub late_outputs: u32,
    pub flags: String,
    pub ensemble: String,
    pub completed_at_ms: u64,
    pub deleted: u8,
    pub version: u64,
    /// The trace id of the request's `traceparent` (crate::trace), or empty.
    /// Defaulted: parts written before the column existed have none.
    #[serde(default)]
    pub trace_id: String,
}

impl ResultRow {
    pub fn position(&self) -> SourcePosition {
        SourcePosition::new(self.source_topic.clone(), self.source_partition, self.source_offset)
    }
}

/// What a redelivered request was answered with before.
#[derive(Debug, Clone, PartialEq)]
pub enum Recalled {
    /// Its saga failed: the compensation recorded for it.
    Compensation(CompensationRow),
    /// Its live result, with its live model outputs.
    Result(ResultRow, Vec<OutputRow>),
}

/// What a compensation changed in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retracted {
    pub outputs: usize,
    pub result: bool,
}

/// Where the compensation of one request stands, kept in
/// `inference_compensations` so a crash mid-way resumes without doing
/// anything twice, and so a redelivered request is answered the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum CompensationStep {
    /// The saga failed and its compensation event is about to be published
    /// (written by ensemble-inference before it publishes the event).
    Requested = 0,
    /// The rows are retracted; `InferenceCompensated` is not yet out.
    Retracted = 1,
    /// `InferenceCompensated` is being published: `announce_*` is the
    /// output partition and its end offset before the send, where a resumed
    /// compensation looks for it before sending again.
    Announcing = 2,
    /// `InferenceCompensated` is acknowledged.
    Announced = 3,
}

/// A row of `inference_compensations`, keyed by the request's position. It
/// holds the whole compensation event, so the event can be published again
/// exactly as before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct CompensationRow {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub correlation_id: String,
    pub step: u8,
    pub request_id: String,
    pub failed_step: String,
    pub reason_code: String,
    pub reason: String,
    /// Comma-separated, in order.
    pub done_steps: String,
    /// Comma-separated model ids.
    pub models: String,
    pub reservations: u32,
    pub failed_at_ms: u64,
    pub retracted_outputs: u32,
    pub retracted_result: u8,
    pub announce_partition: i32,
    pub announce_offset: i64,
    /// When the rows were retracted (the `compensated_at_ms` announced).
    pub updated_at_ms: u64,
    /// The step's number, so the furthest step wins.
    pub version: u64,
    /// The trace id of the request's `traceparent` (crate::trace), or empty.
    /// Defaulted: parts written before the column existed have none.
    #[serde(default)]
    pub trace_id: String,
}

impl CompensationRow {
    pub fn position(&self) -> SourcePosition {
        SourcePosition::new(self.source_topic.clone(), self.source_partition, self.source_offset)
    }

    /// The row of step `step` for the compensation `event` (not yet
    /// retracted, not yet announced), in the trace `trace_id`.
    pub fn of(event: &InferenceCompensation, step: CompensationStep, trace_id: &str) -> Self {
        Self {
            source_topic: event.source_topic.clone(),
            source_partition: event.source_partition,
            source_offset: event.source_offset,
            correlation_id: event.correlation_id.clone(),
            step: step as u8,
            request_id: event.request_id.clone(),
            failed_step: event.failed_step.clone(),
            reason_code: event.reason_code.clone(),
            reason: event.reason.clone(),
            done_steps: event.done_steps.join(","),
            models: event.models.join(","),
            reservations: event.reservations.max(0) as u32,
            failed_at_ms: event.failed_at_ms.max(0) as u64,
            retracted_outputs: 0,
            retracted_result: 0,
            announce_partition: -1,
            announce_offset: -1,
            updated_at_ms: 0,
            version: step as u64,
            trace_id: trace_id.to_string(),
        }
    }

    /// The compensation event this row was made from.
    pub fn event(&self) -> InferenceCompensation {
        let list = |s: &str| if s.is_empty() { Vec::new() } else { s.split(',').map(String::from).collect() };
        InferenceCompensation {
            request_id: self.request_id.clone(),
            correlation_id: self.correlation_id.clone(),
            failed_step: self.failed_step.clone(),
            reason_code: self.reason_code.clone(),
            reason: self.reason.clone(),
            done_steps: list(&self.done_steps),
            models: list(&self.models),
            reservations: self.reservations as i32,
            source_topic: self.source_topic.clone(),
            source_partition: self.source_partition,
            source_offset: self.source_offset,
            failed_at_ms: self.failed_at_ms as i64,
        }
    }

    /// The same compensation at `step`.
    pub fn at(&self, step: CompensationStep) -> Self {
        Self { step: step as u8, version: step as u64, ..self.clone() }
    }

    pub fn step(&self) -> Option<CompensationStep> {
        match self.step {
            0 => Some(CompensationStep::Requested),
            1 => Some(CompensationStep::Retracted),
            2 => Some(CompensationStep::Announcing),
            3 => Some(CompensationStep::Announced),
            _ => None,
        }
    }
}

impl OutputRow {
    /// The row that retracts the output of `model` for the request at `p`,
    /// in the trace of the compensation that retracts it.
    pub fn retraction_of(p: &SourcePosition, correlation_id: &str, model: &str, trace_id: &str) -> Self {
        Self {
            source_topic: p.topic.clone(),
            source_partition: p.partition,
            source_offset: p.offset,
            model_id: model.to_string(),
            request_id: String::new(),
            correlation_id: correlation_id.to_string(),
            model_version: String::new(),
            sequence: 0,
            label: String::new(),
            score: 0.0,
            has_score: 0,
            error: String::new(),
            latency_ms: 0,
            attempts: 0,
            hedged: 0,
            coalesced: 0,
            late: 0,
            counted: 0,
            flags: String::new(),
            answered_at_ms: 0,
            deleted: 1,
            version: RETRACTED,
            trace_id: trace_id.to_string(),
        }
    }
}

impl ResultRow {
    /// The row that retracts the result of the request at `p`, in the trace
    /// of the compensation that retracts it.
    pub fn retraction_of(p: &SourcePosition, correlation_id: &str, trace_id: &str) -> Self {
        Self {
            source_topic: p.topic.clone(),
            source_partition: p.partition,
            source_offset: p.offset,
            request_id: String::new(),
            correlation_id: correlation_id.to_string(),
            status: String::new(),
            aggregation: String::new(),
            label: String::new(),
            score: 0.0,
            has_score: 0,
            models_asked: 0,
            models: String::new(),
            models_counted: 0,
            models_failed: 0,
            late_outputs: 0,
            flags: String::new(),
            ensemble: String::new(),
            completed_at_ms: 0,
            deleted: 1,
            version: RETRACTED,
            trace_id: trace_id.to_string(),
        }
    }
}
