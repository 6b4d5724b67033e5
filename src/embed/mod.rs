//! Embedding models behind one trait: the built-in [`hashing`] embedder of
//! the embedded default and the [`openai`] client for any service that
//! speaks the OpenAI-compatible `/v1/embeddings` API.

pub mod hashing;
pub mod openai;

use futures::future::BoxFuture;

use crate::outcome::{Classify, ErrorClass};

/// An embedding model.
///
/// Contract: `embed` returns exactly one vector per input text, in input
/// order, each of length `dimension()`. Callers never pass more than
/// `max_batch()` texts in one call. An implementation that talks to a remote
/// service does its own retries, timeouts and circuit breaking, so an error
/// returned here is final for this call.
pub trait Embedder: Send + Sync + 'static {
    /// Model id recorded with each atom (`embedding_model` column).
    fn model(&self) -> &str;
    fn dimension(&self) -> usize;
    fn max_batch(&self) -> usize;
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>>;

    /// The circuit breaker of the service behind this model, if it has one,
    /// so that the runner can pause the partitions while it is open.
    fn breaker(&self) -> Option<std::sync::Arc<crate::resilience::CircuitBreaker>> {
        None
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    /// The service kept failing transiently (5xx, timeouts, malformed answers,
    /// open breaker) for every allowed attempt.
    #[error("embedding service unavailable after {attempts} attempt(s): {message}")]
    Unavailable { message: String, attempts: u32 },
    /// The service refused these inputs (4xx other than auth/not-found).
    #[error("embedding service rejected the input: {message}")]
    Rejected { message: String },
    /// The service or its configuration is wrong for every input (wrong
    /// dimension, auth failure, unknown model): the topology must stop.
    #[error("embedding service misconfigured: {message}")]
    Misconfigured { message: String },
}

impl Classify for EmbedError {
    fn class(&self) -> ErrorClass {
        match self {
            EmbedError::Unavailable { .. } => ErrorClass::Retry,
            EmbedError::Rejected { .. } => ErrorClass::Invalid,
            EmbedError::Misconfigured { .. } => ErrorClass::Fatal,
        }
    }
}
