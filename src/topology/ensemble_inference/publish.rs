//! Stage 6: answer each request. A stored result goes out as an
//! `InferenceResult` on the result topic; a failed saga goes out as an
//! `InferenceCompensation` on the compensation topic, for the compensation
//! consumer (the `inference-compensation` topology) to undo its steps. Both
//! are keyed by correlation id and acknowledged before the request's offset
//! can be committed, so a committed request always has one or the other; a
//! crash before that redelivers it, and the `recall` stage answers it the
//! same way again.
//!
//! A result the broker refuses is compensated too (failed step `publish`,
//! its stored result then retracted), its step 0 recorded first.

use std::sync::Arc;

use super::persist::{Failure, Persisted, compensation, request_compensations};
use crate::clock::SharedClock;
use crate::flow::{Item, Metrics, Stage};
use crate::inference::{InferenceCompensation, InferenceResult, ModelVote, OutputRow, ResultRow};
use crate::outcome::{ErrorClass, Fatal, Outcome, Rejection};
use crate::record::Record;
use crate::resilience::{Attempted, Resilient};
use crate::store::InferenceStore;
use crate::topology::emit::Emitter;

/// Where answers go: the result and compensation topics.
pub struct Answers {
    pub results: Emitter,
    pub compensations: Emitter,
    pub metrics: Arc<Metrics>,
}

/// The `InferenceResult` of a stored result: one entry per model asked, in
/// ensemble order, from the stored rows (so a redelivered request gets the
/// same event).
pub fn result_event(row: &ResultRow, outputs: &[OutputRow]) -> InferenceResult {
    InferenceResult {
        request_id: row.request_id.clone(),
        correlation_id: row.correlation_id.clone(),
        status: row.status.clone(),
        aggregation: row.aggregation.clone(),
        output: Some(row.label.clone()),
        score: (row.has_score != 0).then_some(row.score),
        model_outputs: row
            .models
            .split(',')
            .filter(|m| !m.is_empty())
            .map(|m| {
                let o = outputs.iter().find(|o| o.model_id == m);
                ModelVote {
                    model_id: m.to_string(),
                    output: o.filter(|o| o.error.is_empty()).map(|o| o.label.clone()),
                    score: o.filter(|o| o.has_score != 0).map(|o| o.score),
                    latency_ms: o.map_or(0, |o| o.latency_ms as i64),
                    error: o.filter(|o| !o.error.is_empty()).map(|o| o.error.clone()),
                }
            })
            .collect(),
        completed_at_ms: row.completed_at_ms as i64,
    }
}

impl Answers {
    /// Publishes a result; `Ok(Err(why))` when the broker refused it.
    pub async fn result(&self, row: &ResultRow, outputs: &[OutputRow], source: &Record) -> Result<Result<(), String>, Fatal> {
        let event = result_event(row, outputs);
        let record = self.results.record(&event, &event.correlation_id, Some(source), None)?;
        match self.results.send(record).await {
            Ok(_) => {
                self.metrics.count(super::counters::RESULTS_PUBLISHED, 1);
                Ok(Ok(()))
            }
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, .. }) => Ok(Err(error.to_string())),
            Err(e) => Err(Fatal::new("publish", format!("publishing a result to {}: {e}", self.results.topic()))),
        }
    }

    /// Publishes a compensation event (its step 0 is recorded already).
    pub async fn compensation(&self, event: &InferenceCompensation, source: &Record) -> Result<Outcome<()>, Fatal> {
        let record = self.compensations.record(event, &event.correlation_id, Some(source), None)?;
        match self.compensations.send(record).await {
            Ok(_) => {
                self.metrics.count(super::counters::COMPENSATIONS_REQUESTED, 1);
                self.metrics.count(super::counters::compensated_for(&event.reason_code), 1);
                Ok(Outcome::Continue(()))
            }
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => Ok(Outcome::Invalid(
                Rejection::new("publish.compensation_rejected", format!("the compensation event was refused by the broker: {error}")).with_attempts(attempts),
            )),
            Err(e) => Err(Fatal::new("publish", format!("publishing a compensation to {}: {e}", self.compensations.topic()))),
        }
    }
}

#[derive(Clone)]
pub struct Publish {
    pub answers: Arc<Answers>,
    pub store: Arc<dyn InferenceStore>,
    pub resilient: Resilient,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
}

impl Publish {
    async fn answer(&self, item: &Item<Persisted>) -> Result<Outcome<()>, Fatal> {
        let (row, outputs) = match &item.value.outcome {
            Ok(stored) => stored,
            Err(event) => return self.answers.compensation(event, &item.record).await,
        };
        match self.answers.result(row, outputs, &item.record).await? {
            Ok(()) => {
                for flag in &item.value.invoked.planned.flags {
                    self.metrics.count(super::counters::flag_state(flag), 1);
                }
                Ok(Outcome::Continue(()))
            }
            Err(refused) => {
                let failure = Failure {
                    step: "publish",
                    code: "publish.rejected".into(),
                    reason: format!("the result was refused by the broker: {refused}"),
                    done: vec!["reserve", "invoke", "persist_outputs", "persist_result"],
                };
                let event = compensation(&item.value.invoked, &item.record, &failure, self.clock.now_ms());
                let trace = crate::trace::trace_id(item.record.headers.get_str("traceparent"));
                request_compensations(&self.store, &self.resilient, &[(event.clone(), trace)], "publish").await?;
                self.answers.compensation(&event, &item.record).await
            }
        }
    }
}

impl Stage for Publish {
    type In = Persisted;
    type Out = ();

    async fn process(&mut self, items: Vec<Item<Persisted>>) -> Result<Vec<Outcome<()>>, Fatal> {
        let this = &*self;
        let answers = futures::future::join_all(items.iter().map(|item| this.answer(item))).await;
        answers.into_iter().collect()
    }
}
