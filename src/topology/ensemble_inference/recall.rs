//! Stage 2: answer a redelivered request the way it was answered before.
//!
//! A request is redelivered after a crash or a rebalance when its offset
//! was not committed, although it may have been decided, stored and even
//! answered already. Deciding it again could give another answer (a model
//! that failed now succeeds), and a request must end in exactly one state:
//! a result, or a compensation. So before anything is called, the store is
//! asked (one look-up per window) what became of each request:
//! - a recorded compensation (any step): its `InferenceCompensation` is
//!   published again, unchanged (the compensation consumer applies it once);
//! - a live result: its `InferenceResult` is published again, built from the
//!   stored rows;
//! - nothing: the request goes on to be planned and its models called.
//!
//! A request answered again leaves the pipeline here (skipped as
//! `recall.*`), and its offset is committed once the answer is acknowledged.

use std::sync::Arc;

use super::publish::Answers;
use crate::atom::SourcePosition;
use crate::flow::{Item, Metrics, Stage};
use crate::inference::{InferenceRequest, Recalled};
use crate::outcome::{Fatal, Outcome, Rejection};
use crate::resilience::Resilient;
use crate::store::InferenceStore;

pub struct Recall {
    pub store: Arc<dyn InferenceStore>,
    pub resilient: Resilient,
    pub answers: Arc<Answers>,
    pub metrics: Arc<Metrics>,
}

impl Stage for Recall {
    type In = InferenceRequest;
    type Out = InferenceRequest;

    async fn process(&mut self, items: Vec<Item<InferenceRequest>>) -> Result<Vec<Outcome<InferenceRequest>>, Fatal> {
        let positions: Vec<SourcePosition> =
            items.iter().map(|i| SourcePosition::new(i.record.position.tp.topic.to_string(), i.record.position.tp.partition, i.record.position.offset)).collect();
        let store = self.store.clone();
        let known = self.resilient.call(|| store.recall(&positions)).await.map_err(|e| Fatal::new("recall", format!("looking up earlier answers: {e}")))?;
        let mut out = Vec::with_capacity(items.len());
        for (item, p) in items.into_iter().zip(&positions) {
            out.push(match known.get(p) {
                None => Outcome::Continue(item.value),
                Some(Recalled::Compensation(c)) => match self.answers.compensation(&c.event(), &item.record).await? {
                    Outcome::Continue(()) => {
                        self.metrics.count(super::counters::ANSWERED_AGAIN, 1);
                        Outcome::Skip("recall.compensation_again")
                    }
                    Outcome::Invalid(r) => Outcome::Invalid(r),
                    Outcome::Skip(s) => Outcome::Skip(s),
                },
                Some(Recalled::Result(row, outputs)) => match self.answers.result(row, outputs, &item.record).await? {
                    Ok(()) => {
                        self.metrics.count(super::counters::ANSWERED_AGAIN, 1);
                        Outcome::Skip("recall.result_again")
                    }
                    Err(refused) => Outcome::Invalid(Rejection::new("recall.result_rejected", format!("the stored result could not be published again: {refused}"))),
                },
            });
        }
        Ok(out)
    }
}
