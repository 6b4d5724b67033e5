//! Stage 6: write the atoms, idempotently, with lineage.

use std::sync::Arc;

use super::dedup::{Recent, forget};
use super::embed::Embedded;
use crate::atom::AtomRow;
use crate::clock::SharedClock;
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
    /// The dedup stage's recent hashes, forgotten for rows the store rejects.
    pub recent: Option<Recent>,
}

impl Persist {
    fn row(&self, item: &Item<Embedded>, now_ms: i64) -> AtomRow {
        let req = &item.value.hashed.request;
        let pos = &item.record.position;
        AtomRow {
            content_hash: item.value.hashed.hash,
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
            trace_id: trace_id(item.record.headers.get_str("traceparent")),
        }
    }
}

/// The trace id of a W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`),
/// or empty when there is none or it is malformed.
pub fn trace_id(traceparent: Option<&str>) -> String {
    let Some(tp) = traceparent else { return String::new() };
    let mut parts = tp.trim().split('-');
    match (parts.next(), parts.next()) {
        (Some(v), Some(id)) if v.len() == 2 && id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => id.to_ascii_lowercase(),
        _ => String::new(),
    }
}

impl Stage for Persist {
    type In = Embedded;
    type Out = AtomRow;

    async fn process(&mut self, items: Vec<Item<Embedded>>) -> Result<Vec<Outcome<AtomRow>>, Fatal> {
        let now = self.clock.now_ms();
        let rows: Vec<AtomRow> = items.iter().map(|i| self.row(i, now)).collect();
        let store = self.store.clone();
        match self.resilient.call(|| store.insert_atoms(&rows)).await {
            Ok(report) => {
                Metrics::add(&self.metrics.atoms_stored, report.inserted as u64);
                return Ok(rows.into_iter().map(Outcome::Continue).collect());
            }
            Err(Attempted::Rejected { class: ErrorClass::Invalid, .. }) => {}
            Err(e) => return Err(Fatal::new("persist", e.to_string())),
        }
        // One bad row fails the whole insert: write row by row to isolate it.
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let one = std::slice::from_ref(&row);
            out.push(match self.resilient.call(|| store.insert_atoms(one)).await {
                Ok(report) => {
                    Metrics::add(&self.metrics.atoms_stored, report.inserted as u64);
                    Outcome::Continue(row)
                }
                Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => {
                    forget(&self.recent, &row.content_hash);
                    Outcome::Invalid(Rejection::new("persist.rejected", error.to_string()).with_attempts(attempts))
                }
                Err(e) => return Err(Fatal::new("persist", e.to_string())),
            });
        }
        Ok(out)
    }
}
