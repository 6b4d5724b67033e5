//! What happened to one request, by its correlation id, as the store knows
//! it: `GET /requests/{correlation_id}` (the original design's "202 Accepted
//! plus status tracking", for callers that cannot read a topic).
//!
//! The answer lists every row the store holds for that id, in every table a
//! topology writes: arrivals (atom ingestion), dead letters, inference
//! results and compensations. A caller that sent the same id twice sees both.
//! Dead letters carry no decoded fields (the record may not decode at all),
//! so they are found by the record's Kafka key; Hartonomous's own `produce`
//! and the documented producers key records by correlation id.
//!
//! The id is not part of any table's sort key, so a look-up reads each
//! table's correlation-id column: fine for status checks, not for bulk
//! reporting (use SQL for that).

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// One accepted atom-ingestion request (`atom_arrivals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct ArrivalStatus {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    /// `created` (this request stored the atom) or `matched` (it was stored already).
    pub outcome: String,
    pub content_hash: String,
    pub source_system: String,
    pub arrived_at_ms: i64,
    /// The W3C trace id of the record's `traceparent`, or empty (crate::trace).
    #[serde(default)]
    pub trace_id: String,
}

/// A record that went to the dead-letter topic (`dead_letters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct DeadLetterStatus {
    pub topology: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub reason: String,
    pub error: String,
    pub failed_at_ms: i64,
    /// The W3C trace id of the record's `traceparent`, or empty (crate::trace).
    #[serde(default)]
    pub trace_id: String,
}

/// The live result of an inference request (`inference_results_live`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct ResultStatus {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub status: String,
    pub aggregation: String,
    pub label: String,
    pub score: f64,
    pub models_counted: u32,
    pub completed_at_ms: u64,
    /// The W3C trace id of the record's `traceparent`, or empty (crate::trace).
    #[serde(default)]
    pub trace_id: String,
}

/// The compensation of an inference request (`inference_compensations`,
/// its furthest step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct CompensationStatus {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    /// 1 recorded, 2 retracted, 3 announced (`InferenceCompensated` published).
    pub step: u8,
    pub failed_step: String,
    pub reason_code: String,
    pub reason: String,
    pub failed_at_ms: u64,
    /// The W3C trace id of the record's `traceparent`, or empty (crate::trace).
    #[serde(default)]
    pub trace_id: String,
}

/// Everything the store holds for one correlation id.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestStatus {
    pub correlation_id: String,
    /// One word for callers that only branch: see [`RequestStatus::state`].
    pub state: &'static str,
    pub arrivals: Vec<ArrivalStatus>,
    pub dead_letters: Vec<DeadLetterStatus>,
    pub results: Vec<ResultStatus>,
    pub compensations: Vec<CompensationStatus>,
}

impl RequestStatus {
    /// Fills in `state` from the rows, the most final answer first:
    /// `compensated` (an inference request was refused and undone),
    /// `completed` (it has a live result), `stored` (an ingestion request
    /// created its atom), `matched` (its content was stored already),
    /// `dead_lettered` (it could not be processed; the reason is in
    /// `dead_letters`), or `unknown` (nothing yet: not arrived, still in
    /// flight, or never sent).
    pub fn new(
        correlation_id: &str,
        mut arrivals: Vec<ArrivalStatus>,
        mut dead_letters: Vec<DeadLetterStatus>,
        mut results: Vec<ResultStatus>,
        mut compensations: Vec<CompensationStatus>,
    ) -> Self {
        // Stable answers whatever order the store returned rows in.
        arrivals.sort_by_key(|r| (r.source_topic.clone(), r.source_partition, r.source_offset));
        dead_letters.sort_by_key(|r| (r.source_topic.clone(), r.source_partition, r.source_offset));
        results.sort_by_key(|r| (r.source_topic.clone(), r.source_partition, r.source_offset));
        compensations.sort_by_key(|r| (r.source_topic.clone(), r.source_partition, r.source_offset));
        let state = if !compensations.is_empty() {
            "compensated"
        } else if !results.is_empty() {
            "completed"
        } else if arrivals.iter().any(|a| a.outcome == "created") {
            "stored"
        } else if !arrivals.is_empty() {
            "matched"
        } else if !dead_letters.is_empty() {
            "dead_lettered"
        } else {
            "unknown"
        };
        Self { correlation_id: correlation_id.to_string(), state, arrivals, dead_letters, results, compensations }
    }

    pub fn is_known(&self) -> bool {
        self.state != "unknown"
    }
}

/// Looks a request up by correlation id. Both stores implement it.
pub trait RequestLookup: Send + Sync + 'static {
    fn request_status<'a>(&'a self, correlation_id: &'a str) -> BoxFuture<'a, Result<RequestStatus, StoreError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(outcome: &str, offset: i64) -> ArrivalStatus {
        ArrivalStatus {
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: offset,
            outcome: outcome.into(),
            content_hash: "h".into(),
            source_system: "s".into(),
            arrived_at_ms: 1,
            trace_id: String::new(),
        }
    }

    #[test]
    fn the_state_is_the_most_final_answer() {
        assert_eq!(RequestStatus::new("c", vec![], vec![], vec![], vec![]).state, "unknown");
        assert_eq!(RequestStatus::new("c", vec![arrival("matched", 2), arrival("created", 1)], vec![], vec![], vec![]).state, "stored");
        let s = RequestStatus::new("c", vec![arrival("matched", 2)], vec![], vec![], vec![]);
        assert_eq!(s.state, "matched");
        assert!(s.is_known());
        let dl = DeadLetterStatus {
            topology: "a".into(),
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: 3,
            stage: "decode".into(),
            reason: "bad".into(),
            error: "e".into(),
            failed_at_ms: 1,
            trace_id: String::new(),
        };
        assert_eq!(RequestStatus::new("c", vec![], vec![dl], vec![], vec![]).state, "dead_lettered");
        let sorted = RequestStatus::new("c", vec![arrival("matched", 2), arrival("created", 1)], vec![], vec![], vec![]);
        assert_eq!(sorted.arrivals.iter().map(|a| a.source_offset).collect::<Vec<_>>(), vec![1, 2]);
    }
}
