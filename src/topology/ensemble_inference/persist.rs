//! Stage 5: store every model's output (`model_outputs`), then each decided
//! result (`inference_results`), both keyed by the request's source
//! position, so a redelivered request writes the same rows again.
//!
//! This is where a request's saga can fail, and where it is decided how:
//! - no result by the deadline (`aggregate.no_result`): its outputs are
//!   stored, then it goes on to be compensated;
//! - the store refuses its result row (`persist.rejected`): its outputs
//!   are stored already, so it goes on to be compensated.
//!
//! Either way its compensation is recorded (step 0 in
//! `inference_compensations`, with the whole event) and the next stage
//! publishes that `InferenceCompensation` instead of a result. A store that
//! is down is retried (forever by default: backpressure, not compensation).

use std::sync::Arc;

use super::invoke::Invoked;
use crate::failpoint;
use crate::flow::{Item, Metrics, Stage};
use crate::clock::SharedClock;
use crate::inference::{CompensationRow, CompensationStep, InferenceCompensation, LIVE, OutputRow, ResultRow};
use crate::record::Record;
use crate::outcome::{ErrorClass, Fatal, Outcome};
use crate::resilience::{Attempted, Resilient};
use crate::store::{InferenceStore, StoreError};
use crate::topology::ensemble_inference::aggregate::{Status, Verdict};

/// The saga's steps, in order, as named in compensation events. Each is
/// undone by its compensation: `reserve` by releasing the quota slots
/// (done when the calls end), `invoke` by nothing (its partial results are
/// facts, kept), `persist_outputs` and `persist_result` by retracting the
/// rows, `publish` by nothing (it is the last step).
pub const STEPS: &[(&str, &str)] = &[
    ("reserve", "release_reservations"),
    ("invoke", "none"),
    ("persist_outputs", "retract_outputs"),
    ("persist_result", "retract_result"),
    ("publish", "none"),
];

/// Why a request's saga failed, and what it had done by then.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub step: &'static str,
    pub code: String,
    pub reason: String,
    pub done: Vec<&'static str>,
}

pub struct Persisted {
    pub invoked: Invoked,
    /// The result row as stored with its output rows, or the compensation
    /// to publish (recorded as step 0 already).
    pub outcome: Result<(ResultRow, Vec<OutputRow>), InferenceCompensation>,
}

#[derive(Clone)]
pub struct Persist {
    pub store: Arc<dyn InferenceStore>,
    pub resilient: Resilient,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
}

/// The compensation event of a request whose saga failed with `f`.
pub fn compensation(invoked: &Invoked, source: &Record, f: &Failure, now_ms: i64) -> InferenceCompensation {
    let pos = &source.position;
    InferenceCompensation {
        request_id: invoked.planned.request.request_id.clone(),
        correlation_id: invoked.planned.request.correlation_id.clone(),
        failed_step: f.step.to_string(),
        reason_code: f.code.clone(),
        reason: f.reason.clone(),
        done_steps: f.done.iter().map(|s| s.to_string()).collect(),
        models: invoked.planned.models.iter().map(|m| m.id().to_string()).collect(),
        reservations: invoked.reserved as i32,
        source_topic: pos.tp.topic.to_string(),
        source_partition: pos.tp.partition,
        source_offset: pos.offset,
        failed_at_ms: now_ms,
    }
}

/// Records step 0 of `events` (see `inference_compensations`), each with
/// the trace id of its request: from then on a redelivery of their requests
/// is answered with the same event.
pub async fn request_compensations(
    store: &Arc<dyn InferenceStore>,
    resilient: &Resilient,
    events: &[(InferenceCompensation, String)],
    stage: &str,
) -> Result<(), Fatal> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<CompensationRow> = events.iter().map(|(e, trace)| CompensationRow::of(e, CompensationStep::Requested, trace)).collect();
    resilient.call(|| store.record_compensations(&rows)).await.map_err(|e| Fatal::new(stage, format!("recording compensations: {e}")))
}

fn output_row(item: &Item<Invoked>, o: &crate::inference::ModelOutput) -> OutputRow {
    let pos = &item.record.position;
    OutputRow {
        source_topic: pos.tp.topic.to_string(),
        source_partition: pos.tp.partition,
        source_offset: pos.offset,
        model_id: o.model_id.clone(),
        request_id: o.request_id.clone(),
        correlation_id: o.correlation_id.clone(),
        model_version: o.model_version.clone(),
        sequence: o.sequence.max(0) as u32,
        label: o.label.clone().unwrap_or_default(),
        score: o.score.unwrap_or(0.0),
        has_score: o.score.is_some() as u8,
        error: o.error.clone().unwrap_or_default(),
        latency_ms: o.latency_ms.max(0) as u64,
        attempts: o.attempts.max(0) as u32,
        hedged: o.hedged as u8,
        coalesced: o.coalesced as u8,
        late: o.late as u8,
        counted: item.value.counted.contains(&o.model_id) as u8,
        flags: o.flags.join(","),
        answered_at_ms: o.answered_at_ms.max(0) as u64,
        deleted: 0,
        version: LIVE,
        trace_id: crate::trace::trace_id(item.record.headers.get_str("traceparent")),
    }
}

fn result_row(item: &Item<Invoked>) -> Option<ResultRow> {
    let v = &item.value;
    let Verdict::Decided(d) = &v.verdict else { return None };
    let pos = &item.record.position;
    let p = &v.planned;
    Some(ResultRow {
        source_topic: pos.tp.topic.to_string(),
        source_partition: pos.tp.partition,
        source_offset: pos.offset,
        request_id: p.request.request_id.clone(),
        correlation_id: p.request.correlation_id.clone(),
        // COMPLETE when every model asked answered, counted or late (the
        // decision may come before the last answer); PARTIAL otherwise.
        status: if d.status == Status::Complete || v.outputs.iter().all(|o| o.error.is_none()) { "COMPLETE" } else { "PARTIAL" }.to_string(),
        aggregation: p.strategy.symbol().to_string(),
        label: d.label.clone(),
        score: d.score.unwrap_or(0.0),
        has_score: d.score.is_some() as u8,
        models_asked: p.models.len() as u32,
        models: p.models.iter().map(|m| m.id()).collect::<Vec<_>>().join(","),
        models_counted: d.counted.len() as u32,
        models_failed: v.outputs.iter().filter(|o| o.error.is_some()).count() as u32,
        late_outputs: v.outputs.iter().filter(|o| o.late).count() as u32,
        flags: p.flags.join(","),
        ensemble: p.ensemble.clone(),
        completed_at_ms: v.decided_at_ms.max(0) as u64,
        deleted: 0,
        version: LIVE,
        trace_id: crate::trace::trace_id(item.record.headers.get_str("traceparent")),
    })
}

impl Persist {
    async fn write<F, Fut>(&self, what: &str, op: F) -> Result<Result<(), String>, Fatal>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        match self.resilient.call(op).await {
            Ok(()) => Ok(Ok(())),
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, .. }) => Ok(Err(error.to_string())),
            Err(e) => Err(Fatal::new("persist", format!("{what}: {e}"))),
        }
    }
}

impl Stage for Persist {
    type In = Invoked;
    type Out = Persisted;

    async fn process(&mut self, items: Vec<Item<Invoked>>) -> Result<Vec<Outcome<Persisted>>, Fatal> {
        let outputs: Vec<OutputRow> = items.iter().flat_map(|i| i.value.outputs.iter().map(move |o| output_row(i, o))).collect();
        let store = self.store.clone();
        if let Err(refused) = self.write("storing model outputs", || store.insert_outputs(&outputs)).await? {
            // Rows of plain strings and numbers: a refusal is a store that
            // is wrong for every row (e.g. an altered table).
            return Err(Fatal::new("persist", format!("the store refused model outputs: {refused}")));
        }
        self.metrics.count(super::counters::OUTPUTS_STORED, outputs.len() as u64);

        // Results: all at once; a refusal is isolated row by row.
        let mut results: Vec<Option<ResultRow>> = items.iter().map(result_row).collect();
        let mut refused: Vec<Option<String>> = vec![None; items.len()];
        for (i, r) in results.iter().enumerate() {
            if let Some(r) = r
                && failpoint::refuses("persist.result", &r.correlation_id)
            {
                refused[i] = Some(format!("row rejected by the store: result of {} (refused by {})", r.correlation_id, failpoint::REFUSE_ENV));
            }
        }
        let rows: Vec<ResultRow> = results.iter().zip(&refused).filter(|(_, no)| no.is_none()).filter_map(|(r, _)| r.clone()).collect();
        if let Err(e) = self.write("storing results", || store.insert_results(&rows)).await? {
            tracing::warn!(error = %e, "a result row was refused; storing the window's results one by one");
            for (i, r) in results.iter().enumerate() {
                if let Some(row) = r
                    && refused[i].is_none()
                {
                    let one = std::slice::from_ref(row);
                    if let Err(e) = self.write("storing a result", || store.insert_results(one)).await? {
                        refused[i] = Some(e);
                    }
                }
            }
        }
        let now = self.clock.now_ms();
        let mut outcomes = Vec::with_capacity(items.len());
        for (i, (item, refusal)) in items.iter().zip(refused).enumerate() {
            let outcome = match (results[i].take(), refusal, &item.value.verdict) {
                (Some(row), None, _) => {
                    self.metrics.count(super::counters::RESULTS_STORED, 1);
                    let mine: Vec<OutputRow> = outputs.iter().filter(|o| o.position() == row.position()).cloned().collect();
                    Ok((row, mine))
                }
                (Some(_), Some(reason), _) => Err(Failure {
                    step: "persist_result",
                    code: "persist.rejected".into(),
                    reason,
                    done: vec!["reserve", "invoke", "persist_outputs"],
                }),
                (None, _, Verdict::NoResult(reason)) => Err(Failure {
                    step: "aggregate",
                    code: "aggregate.no_result".into(),
                    reason: reason.clone(),
                    done: vec!["reserve", "invoke", "persist_outputs"],
                }),
                (None, _, Verdict::Decided(_)) => unreachable!("a decided request has a result row"),
            };
            outcomes.push(outcome.map_err(|f| compensation(&item.value, &item.record, &f, now)));
        }
        let events: Vec<(InferenceCompensation, String)> = items
            .iter()
            .zip(&outcomes)
            .filter_map(|(item, o)| o.as_ref().err().map(|e| (e.clone(), crate::trace::trace_id(item.record.headers.get_str("traceparent")))))
            .collect();
        request_compensations(&self.store, &self.resilient, &events, "persist").await?;
        let mut out = Vec::with_capacity(items.len());
        for (item, outcome) in items.into_iter().zip(outcomes) {
            out.push(Outcome::Continue(Persisted { invoked: item.value, outcome }));
        }
        Ok(out)
    }
}
