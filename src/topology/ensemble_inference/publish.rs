//! Stage 5: answer each request. A stored result goes out as an
//! `InferenceResult` on the result topic; a failed saga goes out as an
//! `InferenceCompensation` on the compensation topic, for the compensation
//! consumer (the `inference-compensation` topology) to undo its steps. Both
//! are keyed by correlation id and acknowledged before the request's offset
//! can be committed, so a committed request always has one or the other
//! (a crash before that redelivers it, and it is decided again).
//!
//! A result the broker refuses is compensated too (failed step `publish`,
//! its stored result then retracted).

use std::sync::Arc;

use super::invoke::Invoked;
use super::persist::{Failure, Persisted};
use crate::clock::SharedClock;
use crate::flow::{Item, Metrics, Stage};
use crate::inference::{InferenceCompensation, InferenceResult, ModelVote, ResultRow};
use crate::outcome::{ErrorClass, Fatal, Outcome, Rejection};
use crate::record::Record;
use crate::resilience::Attempted;
use crate::topology::emit::Emitter;

pub struct Publish {
    pub results: Emitter,
    pub compensations: Emitter,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
}

fn result_event(invoked: &Invoked, row: &ResultRow) -> InferenceResult {
    InferenceResult {
        request_id: row.request_id.clone(),
        correlation_id: row.correlation_id.clone(),
        status: row.status.clone(),
        aggregation: row.aggregation.clone(),
        output: Some(row.label.clone()),
        score: (row.has_score != 0).then_some(row.score),
        model_outputs: invoked
            .planned
            .models
            .iter()
            .map(|m| {
                let o = invoked.outputs.iter().find(|o| o.model_id == m.id());
                ModelVote {
                    model_id: m.id().to_string(),
                    output: o.and_then(|o| o.label.clone()),
                    score: o.and_then(|o| o.score),
                    latency_ms: o.map_or(0, |o| o.latency_ms),
                    error: o.and_then(|o| o.error.clone()),
                }
            })
            .collect(),
        completed_at_ms: row.completed_at_ms as i64,
    }
}

fn compensation_event(invoked: &Invoked, source: &Record, f: &Failure, now_ms: i64) -> InferenceCompensation {
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

impl Publish {
    async fn compensate(&self, item: &Item<Persisted>, failure: &Failure) -> Result<Outcome<()>, Fatal> {
        let event = compensation_event(&item.value.invoked, &item.record, failure, self.clock.now_ms());
        let record = self.compensations.record(&event, &event.correlation_id, Some(&item.record), None)?;
        match self.compensations.send(record).await {
            Ok(_) => {
                self.metrics.count(super::counters::COMPENSATIONS_REQUESTED, 1);
                self.metrics.count(super::counters::compensated_for(&failure.code), 1);
                Ok(Outcome::Continue(()))
            }
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => Ok(Outcome::Invalid(
                Rejection::new("publish.compensation_rejected", format!("the compensation event was refused by the broker: {error}")).with_attempts(attempts),
            )),
            Err(e) => Err(Fatal::new("publish", format!("publishing a compensation to {}: {e}", self.compensations.topic()))),
        }
    }

    async fn answer(&self, item: &Item<Persisted>) -> Result<Outcome<()>, Fatal> {
        let row = match &item.value.outcome {
            Ok(row) => row,
            Err(failure) => return self.compensate(item, failure).await,
        };
        let event = result_event(&item.value.invoked, row);
        let record = self.results.record(&event, &event.correlation_id, Some(&item.record), None)?;
        match self.results.send(record).await {
            Ok(_) => {
                self.metrics.count(super::counters::RESULTS_PUBLISHED, 1);
                for flag in &item.value.invoked.planned.flags {
                    self.metrics.count(super::counters::flag_state(flag), 1);
                }
                Ok(Outcome::Continue(()))
            }
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, .. }) => {
                let failure = Failure {
                    step: "publish",
                    code: "publish.rejected".into(),
                    reason: format!("the result was refused by the broker: {error}"),
                    done: vec!["reserve", "invoke", "persist_outputs", "persist_result"],
                };
                self.compensate(item, &failure).await
            }
            Err(e) => Err(Fatal::new("publish", format!("publishing a result to {}: {e}", self.results.topic()))),
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
