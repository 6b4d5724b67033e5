//! Stage 5: embed the content of new atoms, in calls of the model's
//! `max_batch`, with `concurrency` calls in flight.

use std::sync::Arc;

use futures::StreamExt;

use super::dedup::{Recent, forget};
use super::hash::Hashed;
use super::validate::is_text;
use crate::embed::{EmbedError, Embedder};
use crate::flow::{Item, Metrics, Stage};
use crate::outcome::{Fatal, Outcome, Rejection};

#[derive(Debug, Clone)]
pub struct Embedded {
    pub hashed: Hashed,
    /// Empty for content types that are not text (they are stored, not embedded).
    pub embedding: Vec<f32>,
}

#[derive(Clone)]
pub struct Embed {
    pub embedder: Arc<dyn Embedder>,
    pub metrics: Arc<Metrics>,
    pub concurrency: usize,
    /// The dedup stage's recent hashes, forgotten for records dead-lettered here.
    pub recent: Option<Recent>,
}

impl Embed {
    /// One call; a refused multi-text call is split so that only the texts the
    /// service refuses are dead-lettered.
    async fn call(&self, texts: Vec<String>) -> Result<Vec<Result<Vec<f32>, Rejection>>, Fatal> {
        Metrics::add(&self.metrics.embedding_calls, 1);
        match self.embedder.embed(&texts).await {
            Ok(vectors) => {
                Metrics::add(&self.metrics.embedded_texts, texts.len() as u64);
                if vectors.len() != texts.len() {
                    return Err(Fatal::new("embed", format!("model returned {} vectors for {} texts", vectors.len(), texts.len())));
                }
                Ok(vectors.into_iter().map(Ok).collect())
            }
            Err(EmbedError::Rejected { .. }) if texts.len() > 1 => {
                let mut out = Vec::with_capacity(texts.len());
                for t in texts {
                    out.extend(Box::pin(self.call(vec![t])).await?);
                }
                Ok(out)
            }
            Err(e @ EmbedError::Rejected { .. }) => Ok(vec![Err(Rejection::new("embed.rejected", e.to_string()))]),
            Err(EmbedError::Unavailable { message, attempts }) => {
                let r = Rejection::new("embed.unavailable", message).with_attempts(attempts);
                Ok(texts.iter().map(|_| Err(r.clone())).collect())
            }
            Err(e @ EmbedError::Misconfigured { .. }) => Err(Fatal::new("embed", e.to_string())),
        }
    }
}

impl Stage for Embed {
    type In = Hashed;
    type Out = Embedded;

    async fn process(&mut self, items: Vec<Item<Hashed>>) -> Result<Vec<Outcome<Embedded>>, Fatal> {
        let text_idx: Vec<usize> = (0..items.len()).filter(|&i| is_text(&items[i].value.request.content_type)).collect();
        let chunk = self.embedder.max_batch().max(1);
        let calls: Vec<Vec<String>> = text_idx
            .chunks(chunk)
            .map(|c| c.iter().map(|&i| String::from_utf8_lossy(&items[i].value.request.content).into_owned()).collect())
            .collect();
        let results: Vec<_> = futures::stream::iter(calls.into_iter().map(|texts| self.call(texts)))
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
                None => Outcome::Continue(Embedded { hashed: item.value, embedding: Vec::new() }),
                Some(Ok(embedding)) => Outcome::Continue(Embedded { hashed: item.value, embedding }),
                Some(Err(r)) => {
                    forget(&self.recent, &item.value.hash);
                    Outcome::Invalid(r)
                }
            })
            .collect())
    }
}
