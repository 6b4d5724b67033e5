//! Stage 6: store the window's new atoms, then every request's arrival, each
//! idempotently and with lineage, and hand the answers to publish.
//!
//! Order matters for what a crash may leave behind (see the dedup stage for
//! how a redelivery reads it back):
//! 1. atoms (only the window's new contents), acknowledged;
//! 2. arrivals (every request not yet recorded), acknowledged;
//! 3. the events, in the publish stage.
//!
//! So an arrival row always has its atom, and an event always has its
//! arrival. A store outage is retried without limit: it holds the window and
//! becomes backpressure. A row the store refuses (it can never be written)
//! dead-letters its request, and so does every repeat in flight that matched
//! that content: they answer with the same reason instead of claiming an
//! atom that does not exist.
//!
//! The topology runs steps 1 and 2 as two stages, [`StoreAtoms`] (`persist`)
//! and [`RecordArrivals`] (`arrivals`), so that one window's arrivals are
//! written while the next window's atoms are: measured in the embedded
//! topology, persist writing both in sequence was the stage every window
//! waited for (`benches/README.md`). The order above still holds per window,
//! because a window reaches `arrivals` only once its atoms are acknowledged.
//! Across windows nothing is ordered, and nothing needs to be: a crash
//! after window N+1's atoms and before window N's arrivals leaves both
//! windows uncommitted, and each redelivered request finds its atom stored
//! with its own lineage (answered `created` again) or another's (`matched`),
//! as after a crash between steps 1 and 2 of one window. [`Persist`] runs
//! both steps as one stage (for tests and tools that want one call).

use std::sync::Arc;

use super::dedup::{Admitted, IN_WINDOW, RECENT};
use super::embed::Embedded;
use super::ledger::{Fate, SharedLedger};
use super::validate::is_text;
use crate::atom::{ArrivalOutcome, ArrivalRow, AtomIngested, AtomRow};
use crate::clock::SharedClock;
use crate::failpoint;
use crate::flow::{Item, Metrics, Stage};
use crate::outcome::{ErrorClass, Fatal, Outcome, Rejection};
use crate::resilience::{Attempted, Resilient};
use crate::store::AtomStore;

pub struct Persist {
    pub store: Arc<dyn AtomStore>,
    pub resilient: Resilient,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    pub embedding_model: String,
    pub embedding_dimension: usize,
    pub ledger: Option<SharedLedger>,
    /// The dedup stage looked the window up in this store, so the store
    /// may skip its own existence check on a first attempt
    /// (`AtomStore::insert_new_atoms`); without dedup it must check.
    pub looked_up: bool,
}

/// Runs `op(first)` under `resilient`: `first` is true for the first attempt
/// only, so that a retry (whose failed predecessor may have written) can
/// take the checked path.
async fn attempts<T, F, Fut>(resilient: &Resilient, mut op: F) -> Result<T, Attempted<crate::store::StoreError>>
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
{
    let mut first = true;
    resilient
        .call(|| {
            let now = std::mem::replace(&mut first, false);
            op(now)
        })
        .await
}

impl Persist {
    fn atom_row(&self, item: &Item<Embedded>, now_ms: i64) -> AtomRow {
        let req = &item.value.admitted.hashed.request;
        let pos = &item.record.position;
        AtomRow {
            content_hash: item.value.admitted.hashed.hash,
            content_type: req.content_type.clone(),
            content: req.content.clone(),
            source_system: req.source_system.clone(),
            correlation_id: req.correlation_id.clone(),
            metadata_json: serde_json::to_string(&req.metadata).unwrap_or_else(|_| "{}".into()),
            embedding_model: if item.value.embedding.is_empty() { String::new() } else { self.embedding_model.clone() },
            embedding: item.value.embedding.clone(),
            event_time_ms: req.created_at_ms.unwrap_or(item.record.event_time_ms),
            source_topic: pos.tp.topic.to_string(),
            source_partition: pos.tp.partition,
            source_offset: pos.offset,
            ingested_at_ms: now_ms,
            trace_id: crate::trace::trace_id(item.record.headers.get_str("traceparent")),
        }
    }

    fn arrival_row(item: &Item<Embedded>, now_ms: i64) -> ArrivalRow {
        let a = &item.value.admitted;
        let req = &a.hashed.request;
        let pos = &item.record.position;
        ArrivalRow {
            source_topic: pos.tp.topic.to_string(),
            source_partition: pos.tp.partition,
            source_offset: pos.offset,
            content_hash: a.hashed.hash,
            outcome: a.outcome,
            content_type: req.content_type.clone(),
            content_size: req.content.len() as u64,
            source_system: req.source_system.clone(),
            correlation_id: req.correlation_id.clone(),
            event_time_ms: req.created_at_ms.unwrap_or(item.record.event_time_ms),
            arrived_at_ms: now_ms,
            trace_id: crate::trace::trace_id(item.record.headers.get_str("traceparent")),
        }
    }

    /// The answer published for one request.
    fn event(&self, item: &Item<Embedded>, now_ms: i64) -> AtomIngested {
        let a = &item.value.admitted;
        let req = &a.hashed.request;
        let pos = &item.record.position;
        // A created atom's embedding: the one computed now, or, for a
        // redelivery of its creator, the one this embedder stored before
        // the crash (same model, same dimension).
        let (model, dimension) = match a.outcome {
            ArrivalOutcome::Created if !item.value.embedding.is_empty() => (self.embedding_model.clone(), item.value.embedding.len()),
            ArrivalOutcome::Created if !a.store_atom && is_text(&req.content_type) => (self.embedding_model.clone(), self.embedding_dimension),
            _ => (String::new(), 0),
        };
        AtomIngested {
            content_hash: a.hashed.hash.to_hex(),
            content_type: req.content_type.clone(),
            content_size: req.content.len() as i64,
            source_system: req.source_system.clone(),
            correlation_id: req.correlation_id.clone(),
            embedding_model: model,
            embedding_dimension: dimension as i32,
            source_topic: pos.tp.topic.to_string(),
            source_partition: pos.tp.partition,
            source_offset: pos.offset,
            ingested_at_ms: now_ms,
            outcome: a.outcome,
        }
    }

    /// Stores the new atoms; `Err` is fatal, per-row refusals come back as
    /// `Some(rejection)` at that row's index.
    /// `at[k]` is the index in the window of `all[k]`.
    async fn store_atoms(&self, at: Vec<usize>, all: Vec<AtomRow>, verdicts: &mut [Option<Rejection>]) -> Result<(), Fatal> {
        if all.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let looked_up = self.looked_up;
        let insert = |first: bool| if first && looked_up { store.insert_new_atoms(&all) } else { store.insert_atoms(&all) };
        match attempts(&self.resilient, insert).await {
            Ok(report) => {
                self.metrics.count(super::counters::ATOMS_STORED, report.inserted as u64);
                return Ok(());
            }
            Err(Attempted::Rejected { class: ErrorClass::Invalid, .. }) => {}
            Err(e) => return Err(Fatal::new("persist", e.to_string())),
        }
        // One bad row fails the whole insert: write row by row to isolate it.
        for (i, row) in at.into_iter().zip(all.iter()) {
            let one = std::slice::from_ref(row);
            match self.resilient.call(|| store.insert_atoms(one)).await {
                Ok(report) => self.metrics.count(super::counters::ATOMS_STORED, report.inserted as u64),
                Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => {
                    verdicts[i] = Some(Rejection::new("persist.rejected", error.to_string()).with_attempts(attempts));
                }
                Err(e) => return Err(Fatal::new("persist", e.to_string())),
            }
        }
        Ok(())
    }
}

impl Persist {
    /// Step 1 (and the ledger): the window's new atoms. Refused rows come
    /// back as verdicts at their index.
    async fn atoms_step(&self, items: &[Item<Embedded>], now: i64) -> Result<Vec<Option<Rejection>>, Fatal> {
        let mut verdicts: Vec<Option<Rejection>> = vec![None; items.len()];
        let (at, rows): (Vec<usize>, Vec<AtomRow>) =
            items.iter().enumerate().filter(|(_, i)| i.value.admitted.store_atom).map(|(n, i)| (n, self.atom_row(i, now))).unzip();
        let wrote_atoms = !rows.is_empty();
        self.store_atoms(at, rows, &mut verdicts).await?;
        if wrote_atoms {
            failpoint::hit("persist.after_insert");
        }
        if let Some(ledger) = &self.ledger {
            let mut ledger = ledger.lock().unwrap();
            for (item, verdict) in items.iter().zip(verdicts.iter_mut()) {
                let a: &Admitted = &item.value.admitted;
                match verdict {
                    Some(r) if a.store_atom => ledger.rejected(&a.hashed.hash, r.clone()),
                    None if a.store_atom => ledger.stored(&a.hashed.hash),
                    None if matches!(a.matched_by, Some(IN_WINDOW | RECENT)) => {
                        if let Some(Fate::Rejected(r)) = ledger.fate(&a.hashed.hash) {
                            *verdict = Some(Rejection::new(
                                r.code.clone(),
                                format!("same content as an earlier request that was dead-lettered ({}); resend it once that is fixed", r.message),
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(verdicts)
    }

    /// Step 2 and the answers: every live request's arrival.
    async fn arrivals_step(&self, items: &[Item<Embedded>], verdicts: Vec<Option<Rejection>>, now: i64) -> Result<Vec<Outcome<AtomIngested>>, Fatal> {
        let arrivals: Vec<ArrivalRow> = items
            .iter()
            .zip(&verdicts)
            .filter(|(i, v)| v.is_none() && !i.value.admitted.arrival_recorded)
            .map(|(i, _)| Self::arrival_row(i, now))
            .collect();
        if !arrivals.is_empty() {
            let store = self.store.clone();
            let looked_up = self.looked_up;
            let insert = |first: bool| if first && looked_up { store.insert_new_arrivals(&arrivals) } else { store.insert_arrivals(&arrivals) };
            match attempts(&self.resilient, insert).await {
                Ok(report) => self.metrics.count(super::counters::ARRIVALS_STORED, report.inserted as u64),
                Err(e) => return Err(Fatal::new("persist", format!("storing arrivals: {e}"))),
            }
            failpoint::hit("persist.after_arrivals");
        }
        Ok(items
            .iter()
            .zip(verdicts)
            .map(|(item, verdict)| match verdict {
                Some(r) => Outcome::Invalid(r),
                None => Outcome::Continue(self.event(item, now)),
            })
            .collect())
    }
}

impl Stage for Persist {
    type In = Embedded;
    type Out = AtomIngested;

    async fn process(&mut self, items: Vec<Item<Embedded>>) -> Result<Vec<Outcome<AtomIngested>>, Fatal> {
        let now = self.clock.now_ms();
        let verdicts = self.atoms_step(&items, now).await?;
        self.arrivals_step(&items, verdicts, now).await
    }
}

/// A request whose window's atoms are stored (and was not refused), with
/// the time they were stored at: its arrival and its event carry the same.
#[derive(Debug, Clone)]
pub struct AtomsStored {
    pub embedded: Embedded,
    pub now_ms: i64,
}

/// Step 1 as a stage: the window's new atoms, and the ledger.
pub struct StoreAtoms(pub Arc<Persist>);

/// Step 2 as a stage: every request's arrival, and the answers for publish.
pub struct RecordArrivals(pub Arc<Persist>);

impl Stage for StoreAtoms {
    type In = Embedded;
    type Out = AtomsStored;

    async fn process(&mut self, items: Vec<Item<Embedded>>) -> Result<Vec<Outcome<AtomsStored>>, Fatal> {
        let now = self.0.clock.now_ms();
        let verdicts = self.0.atoms_step(&items, now).await?;
        Ok(items
            .into_iter()
            .zip(verdicts)
            .map(|(item, verdict)| match verdict {
                Some(r) => Outcome::Invalid(r),
                None => Outcome::Continue(AtomsStored { embedded: item.value, now_ms: now }),
            })
            .collect())
    }
}

impl Stage for RecordArrivals {
    type In = AtomsStored;
    type Out = AtomIngested;

    async fn process(&mut self, items: Vec<Item<AtomsStored>>) -> Result<Vec<Outcome<AtomIngested>>, Fatal> {
        // One window, stored at one time (`StoreAtoms` reads the clock once).
        let Some(now) = items.first().map(|i| i.value.now_ms) else { return Ok(Vec::new()) };
        let items: Vec<Item<Embedded>> = items.into_iter().map(|i| Item { record: i.record, value: i.value.embedded }).collect();
        let verdicts = vec![None; items.len()];
        self.0.arrivals_step(&items, verdicts, now).await
    }
}
