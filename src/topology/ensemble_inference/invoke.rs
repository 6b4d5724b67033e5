//! Stage 4: ask every model of a request's ensemble, publish each answer as
//! it arrives, and decide.
//!
//! For each request (up to `parallel_requests` of a window at once):
//! 1. **reserve**: a slot of every model's quota, in model-id order
//!    ([`Invoker::reserve_all`]). A full quota makes the request wait, which
//!    holds the window, fills the edges and pauses the partitions: the
//!    request is held back, never dropped. Each model's slot is released
//!    when its call ends, answered or not, or at the deadline (a
//!    compensation has nothing left to release, and says so).
//! 2. **invoke**: every model in parallel ([`Invoker::invoke`]: per-attempt
//!    timeout, retries, breaker, hedging, coalescing). The deadline, a
//!    sleep on the injected clock, starts once the slots are held.
//! 3. **partial results**: each answer (or failure) is published as a
//!    `ModelOutput` as soon as it arrives, keyed by correlation id (one
//!    partition per request). They are handed to the log in arrival order
//!    without waiting for each other (the idempotent producer keeps that
//!    order), and all are acknowledged before the request moves on, so the
//!    partial-results stream of a request is in arrival order. Waiting for
//!    each acknowledgement before the next made a request cost three broker
//!    round trips.
//! 4. **aggregate**: as soon as the answers so far decide the result
//!    ([`aggregate::ready`]), or at the deadline with what arrived. Answers
//!    that arrive after the decision are published and stored with
//!    `late = true` and never change it. A model with no answer by the
//!    deadline gets an output with that error.
//!
//! A model that is misconfigured (wrong for every input) stops the topology;
//! every other failure is that model's output for the request.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

use super::aggregate::{self, Answer, Verdict};
use super::call::{Invocation, Invoker, Reservation};
use super::plan::Planned;
use crate::clock::SharedClock;
use crate::flow::{Item, Metrics, Stage};
use crate::inference::ModelOutput;
use crate::outcome::{ErrorClass, Fatal, Outcome, Rejection};
use crate::log::LogError;
use crate::record::{OutgoingRecord, Position, Record};
use crate::resilience::Attempted;
use crate::topology::emit::Emitter;

/// A request after its models answered (or the deadline passed).
pub struct Invoked {
    pub planned: Planned,
    /// Every model's output, in arrival order (`sequence` 0, 1, ...), then
    /// the models that never answered.
    pub outputs: Vec<ModelOutput>,
    /// The models whose answers the decision counted.
    pub counted: HashSet<String>,
    pub verdict: Verdict,
    /// Quota slots held while the models were called (released since).
    pub reserved: usize,
    pub decided_at_ms: i64,
}

/// The partial results of one request on their way to the log: each with
/// its acknowledgement, or `None` once the log could not take one at once
/// (from then on they go one by one, in [`Invoke::settle`]).
#[derive(Default)]
struct Partials {
    pending: Vec<(OutgoingRecord, Option<BoxFuture<'static, Result<Position, LogError>>>)>,
    one_by_one: bool,
}

#[derive(Clone)]
pub struct Invoke {
    pub partial: Arc<Emitter>,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub parallel: usize,
}

impl Invoke {
    fn output(&self, p: &Planned, model: &Invoker, sequence: usize, inv: &Invocation, late: bool) -> ModelOutput {
        let (label, score, error) = match &inv.outcome {
            Ok(pred) => (Some(pred.label.clone()), pred.score, None),
            Err(e) => (None, None, Some(e.clone())),
        };
        ModelOutput {
            request_id: p.request.request_id.clone(),
            correlation_id: p.request.correlation_id.clone(),
            model_id: model.id().to_string(),
            model_version: model.version().to_string(),
            sequence: sequence as i32,
            label,
            score,
            error,
            latency_ms: inv.latency_ms,
            attempts: inv.attempts as i32,
            hedged: inv.hedged,
            coalesced: inv.coalesced,
            late,
            flags: p.flags.clone(),
            answered_at_ms: self.clock.now_ms(),
        }
    }

    /// Hands a partial result to the log (step 3) without waiting for the
    /// ones before it to be acknowledged; [`settle`](Self::settle) waits.
    fn publish(&self, partials: &mut Partials, output: &ModelOutput, source: &Record) -> Result<(), Result<Rejection, Fatal>> {
        let record = self.partial.record(output, &output.correlation_id, Some(source), None).map_err(Err)?;
        let ack = if partials.one_by_one {
            None
        } else {
            match self.partial.enqueue(record.clone()) {
                Ok(ack) => Some(ack),
                Err(_) => {
                    partials.one_by_one = true;
                    None
                }
            }
        };
        partials.pending.push((record, ack));
        Ok(())
    }

    /// Waits for every partial result of a request to be acknowledged, in
    /// order. From the first one that was not (or could not be enqueued),
    /// it and every later one are sent again one at a time, each
    /// acknowledged before the next: the order holds, and a partial result
    /// delivered before its failed predecessor may appear twice (readers
    /// key them by correlation id and sequence).
    async fn settle(&self, partials: Partials) -> Result<(), Result<Rejection, Fatal>> {
        let mut pending = partials.pending.into_iter();
        let mut again = Vec::new();
        while let Some((record, ack)) = pending.next() {
            let acknowledged = match ack {
                Some(ack) => ack.await.is_ok(),
                None => false,
            };
            if acknowledged {
                self.metrics.count(super::counters::PARTIALS_PUBLISHED, 1);
                continue;
            }
            again.push(record);
            again.extend(pending.by_ref().map(|(r, _)| r));
        }
        for record in again {
            self.send_one(record).await?;
        }
        Ok(())
    }

    async fn send_one(&self, record: OutgoingRecord) -> Result<(), Result<Rejection, Fatal>> {
        match self.partial.send(record).await {
            Ok(_) => {
                self.metrics.count(super::counters::PARTIALS_PUBLISHED, 1);
                Ok(())
            }
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => {
                Err(Ok(Rejection::new("invoke.partial_rejected", format!("the partial result was refused by the broker: {error}")).with_attempts(attempts)))
            }
            Err(e) => Err(Err(Fatal::new("invoke", format!("publishing a partial result to {}: {e}", self.partial.topic())))),
        }
    }

    /// Steps 1 to 4 for one request.
    async fn ask(&self, planned: Planned, source: &Record) -> Result<Invoked, Result<Rejection, Fatal>> {
        let mut reservations: HashMap<String, Reservation> =
            Invoker::reserve_all(&planned.models).await.into_iter().map(|r| (r.model.clone(), r)).collect();
        let reserved = reservations.len();
        let asked: Vec<&str> = planned.models.iter().map(|m| m.id()).collect();
        let input = planned.request.input.as_str();
        // Each call gives its model's slot back as soon as it ends, not when
        // the whole request does: a slot held through the partial-result
        // acknowledgements of the other models made the quota, not the
        // models, the limit (16 slots / three sequential broker round trips).
        let mut calls: FuturesUnordered<_> = planned
            .models
            .iter()
            .enumerate()
            .map(|(position, model)| {
                let slot = reservations.remove(model.id());
                let context = crate::trace::TraceParent::of_header(source.headers.get("traceparent"));
                async move {
                    // The model server sees this request's trace (crate::trace).
                    let inv = crate::trace::within(context, model.invoke(input)).await;
                    drop(slot);
                    (position, inv)
                }
            })
            .collect();
        let deadline = self.clock.sleep(Duration::from_millis(planned.timeout_ms.max(0) as u64));
        tokio::pin!(deadline);
        let mut arrived: Vec<Answer> = Vec::with_capacity(asked.len());
        let mut outputs: Vec<ModelOutput> = Vec::with_capacity(asked.len());
        let mut answered = vec![false; asked.len()];
        let mut verdict: Option<(Verdict, i64)> = None;
        let mut partials = Partials::default();
        while !calls.is_empty() {
            tokio::select! {
                biased;
                Some((position, inv)) = calls.next() => {
                    let model = &planned.models[position];
                    if inv.fatal {
                        let message = inv.outcome.as_ref().err().cloned().unwrap_or_default();
                        return Err(Err(Fatal::new("invoke", format!("model `{}`: {message}", model.id()))));
                    }
                    answered[position] = true;
                    let late = verdict.is_some();
                    let output = self.output(&planned, model, outputs.len(), &inv, late);
                    self.publish(&mut partials, &output, source)?;
                    outputs.push(output);
                    if late {
                        self.metrics.count(super::counters::LATE_OUTPUTS, 1);
                        continue;
                    }
                    arrived.push(match &inv.outcome {
                        Ok(p) => Answer::ok(model.id(), position, &p.label, p.score),
                        Err(e) => Answer::failed(model.id(), position, e),
                    });
                    if aggregate::ready(&planned.strategy, &asked, &arrived) {
                        verdict = Some((aggregate::aggregate(&planned.strategy, &asked, &arrived), self.clock.now_ms()));
                    }
                }
                _ = &mut deadline => break,
            }
        }
        // Calls still running at the deadline are dropped here; a dropped
        // call gives its slot back and is recorded as unanswered.
        drop(calls);
        drop(reservations);
        let waited = planned.timeout_ms;
        for (_, model) in planned.models.iter().enumerate().filter(|(p, _)| !answered[*p]) {
            let inv = Invocation {
                outcome: Err(format!("no answer within the deadline ({waited} ms)")),
                latency_ms: waited,
                attempts: 0,
                hedged: false,
                coalesced: false,
                fatal: false,
            };
            let output = self.output(&planned, model, outputs.len(), &inv, verdict.is_some());
            self.publish(&mut partials, &output, source)?;
            outputs.push(output);
            self.metrics.count(super::counters::UNANSWERED, 1);
        }
        // Every partial result is acknowledged before the request moves on.
        self.settle(partials).await?;
        let (verdict, decided_at_ms) = verdict.unwrap_or_else(|| (aggregate::aggregate(&planned.strategy, &asked, &arrived), self.clock.now_ms()));
        let counted = match &verdict {
            Verdict::Decided(d) => d.counted.iter().cloned().collect(),
            Verdict::NoResult(_) => HashSet::new(),
        };
        for o in &outputs {
            self.metrics.count(super::counters::model_output(o.error.is_none()), 1);
            if o.coalesced {
                self.metrics.count(super::counters::CALLS_COALESCED, 1);
            }
            if o.hedged {
                self.metrics.count(super::counters::HEDGED, 1);
            }
        }
        Ok(Invoked { planned, outputs, counted, verdict, reserved, decided_at_ms })
    }
}

impl Stage for Invoke {
    type In = Planned;
    type Out = Invoked;

    async fn process(&mut self, items: Vec<Item<Planned>>) -> Result<Vec<Outcome<Invoked>>, Fatal> {
        let this = &*self;
        let results: Vec<Result<Invoked, Result<Rejection, Fatal>>> =
            futures::stream::iter(items).map(|item| async move { this.ask(item.value, &item.record).await }).buffered(this.parallel.max(1)).collect().await;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            out.push(match r {
                Ok(invoked) => Outcome::Continue(invoked),
                Err(Ok(rejection)) => Outcome::Invalid(rejection),
                Err(Err(fatal)) => return Err(fatal),
            });
        }
        Ok(out)
    }
}
