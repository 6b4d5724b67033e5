//! Stage 5: embed the content of new atoms, in calls of the model's
//! `max_batch`, with `concurrency` calls in flight. Repeats (requests that
//! matched a stored or admitted content) pass through without a call.
//!
//! An embedding service that is down is backpressure, never a dead letter:
//! a call that fails as `Unavailable` (its own retries exhausted, or its
//! breaker open) is tried again after a pause, for as long as it takes,
//! while the window waits, the in-flight budget fills and the runner pauses
//! the partitions. Only a service that refuses one input (`Rejected`)
//! dead-letters that record.

use crate::ops::events::{EmbeddingRecovered, EmbeddingUnavailable, Event};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;

use super::dedup::Admitted;
use super::ledger::SharedLedger;
use super::validate::is_text;
use crate::clock::SharedClock;
use crate::embed::{EmbedError, Embedder};
use crate::flow::{Item, Metrics, Stage};
use crate::outcome::{Fatal, Outcome, Rejection};

/// The pause between two rounds of a call whose service is unavailable.
/// The embedder's own retries and breaker pace the attempts within a round.
const UNAVAILABLE_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Embedded {
    pub admitted: Admitted,
    /// Empty for content types that are not text (they are stored, not
    /// embedded), and for repeats.
    pub embedding: Vec<f32>,
}

#[derive(Clone)]
pub struct Embed {
    pub embedder: Arc<dyn Embedder>,
    pub metrics: Arc<Metrics>,
    pub concurrency: usize,
    pub clock: SharedClock,
    pub ledger: Option<SharedLedger>,
    /// Set while the service is failing, so an outage is logged once, not
    /// once per call.
    pub outage: Arc<AtomicBool>,
}

impl Embed {
    /// One call; a refused multi-text call is split so that only the texts the
    /// service refuses are dead-lettered.
    async fn call(&self, texts: Vec<String>) -> Result<Vec<Result<Vec<f32>, Rejection>>, Fatal> {
        loop {
            self.metrics.count(super::counters::EMBEDDING_CALLS, 1);
            match self.embedder.embed(&texts).await {
                Ok(vectors) => {
                    if self.outage.swap(false, Ordering::AcqRel) {
                        EmbeddingRecovered { model: self.embedder.model() }.emit();
                    }
                    self.metrics.count(super::counters::EMBEDDED_TEXTS, texts.len() as u64);
                    if vectors.len() != texts.len() {
                        return Err(Fatal::new("embed", format!("model returned {} vectors for {} texts", vectors.len(), texts.len())));
                    }
                    return Ok(vectors.into_iter().map(Ok).collect());
                }
                Err(EmbedError::Rejected { .. }) if texts.len() > 1 => {
                    let mut out = Vec::with_capacity(texts.len());
                    for t in texts {
                        out.extend(Box::pin(self.call(vec![t])).await?);
                    }
                    return Ok(out);
                }
                Err(e @ EmbedError::Rejected { .. }) => return Ok(vec![Err(Rejection::new("embed.rejected", e.to_string()))]),
                Err(EmbedError::Unavailable { message, attempts }) => {
                    if !self.outage.swap(true, Ordering::AcqRel) {
                        EmbeddingUnavailable { model: self.embedder.model(), attempts, error: &message }.emit();
                    }
                    self.clock.sleep(UNAVAILABLE_PAUSE).await;
                }
                Err(e @ EmbedError::Misconfigured { .. }) => return Err(Fatal::new("embed", e.to_string())),
            }
        }
    }
}

/// The text to embed. Validate has checked that text content is UTF-8, so
/// the fast check answers; `from_utf8_lossy` alone walks every byte through
/// its slow path (3 % of the process in the Kafka profile).
fn text_of(content: &[u8]) -> String {
    match std::str::from_utf8(content) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(content).into_owned(),
    }
}

impl Stage for Embed {
    type In = Admitted;
    type Out = Embedded;

    async fn process(&mut self, items: Vec<Item<Admitted>>) -> Result<Vec<Outcome<Embedded>>, Fatal> {
        let wanted = |a: &Admitted| a.store_atom && is_text(&a.hashed.request.content_type);
        let text_idx: Vec<usize> = (0..items.len()).filter(|&i| wanted(&items[i].value)).collect();
        let chunk = self.embedder.max_batch().max(1);
        // Each call carries the trace context of its first record (crate::trace).
        let calls: Vec<(Option<crate::trace::TraceParent>, Vec<String>)> = text_idx
            .chunks(chunk)
            .map(|c| {
                let context = c.iter().find_map(|&i| crate::trace::TraceParent::of_header(items[i].record.headers.get("traceparent")));
                (context, c.iter().map(|&i| text_of(&items[i].value.hashed.request.content)).collect())
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(calls.into_iter().map(|(context, texts)| crate::trace::within(context, self.call(texts))))
            .buffered(self.concurrency.max(1))
            .collect()
            .await;
        let mut vectors: Vec<Option<Result<Vec<f32>, Rejection>>> = (0..items.len()).map(|_| None).collect();
        let mut flat = Vec::with_capacity(text_idx.len());
        for r in results {
            flat.extend(r?);
        }
        for (i, v) in text_idx.into_iter().zip(flat) {
            vectors[i] = Some(v);
        }
        Ok(items
            .into_iter()
            .zip(vectors)
            .map(|(item, v)| match v {
                None => Outcome::Continue(Embedded { admitted: item.value, embedding: Vec::new() }),
                Some(Ok(embedding)) => Outcome::Continue(Embedded { admitted: item.value, embedding }),
                Some(Err(r)) => {
                    if let Some(l) = &self.ledger {
                        l.lock().unwrap().rejected(&item.value.hashed.hash, r.clone());
                    }
                    Outcome::Invalid(r)
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::text_of;

    #[test]
    fn text_of_keeps_utf8_and_replaces_invalid_bytes() {
        assert_eq!(text_of("naïve text ✓".as_bytes()), "naïve text ✓");
        assert_eq!(text_of(b"ok \xff end"), "ok \u{fffd} end");
        assert_eq!(text_of(b""), "");
    }
}
