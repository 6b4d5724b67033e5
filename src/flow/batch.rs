//! A micro-batch and the per-record slots it carries between stages.

use std::sync::Arc;

use crate::outcome::Rejection;
use crate::record::Record;

/// A record still being processed, with the typed value the last stage made.
/// The original record rides along so that any stage can dead-letter it.
#[derive(Debug, Clone)]
pub struct Item<T> {
    pub record: Arc<Record>,
    pub value: T,
}

/// Why a record left the pipeline before the last stage.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Skipped(&'static str),
    Dead { stage: String, rejection: Rejection, failed_at_ms: i64 },
}

#[derive(Debug, Clone)]
pub enum Slot<T> {
    Live(Item<T>),
    Done { record: Arc<Record>, end: End },
}

impl<T> Slot<T> {
    pub fn record(&self) -> &Arc<Record> {
        match self {
            Slot::Live(i) => &i.record,
            Slot::Done { record, .. } => record,
        }
    }
}

/// A window's worth of records, in source order. Slots never reorder or
/// disappear between stages: the acker needs every offset back.
#[derive(Debug)]
pub struct Batch<T> {
    /// Sequence number of the window, for logs and ordering checks.
    pub seq: u64,
    pub slots: Vec<Slot<T>>,
    /// Sum of the records' `byte_len`, reserved against the in-flight budget.
    pub bytes: usize,
    /// The window's `batch` span, parent of every stage's span for it; it
    /// ends when the acker drops the batch (crate::telemetry). Disabled (and
    /// free) unless spans are exported.
    pub span: tracing::Span,
}

impl<T> Batch<T> {
    pub fn live(&self) -> impl Iterator<Item = &Item<T>> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Live(i) => Some(i),
            Slot::Done { .. } => None,
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
