//! Models an ensemble asks, behind one trait: built-in deterministic models
//! for the embedded default ([`keyword`], [`similarity`]) and clients for
//! model servers ([`http`]: OpenAI-compatible chat, Open Inference Protocol
//! v2, generic JSON).
//!
//! A [`Model`] makes one attempt per call. Timeouts, retries, hedging and
//! circuit breaking are the invoke stage's, the same for every model, so a
//! client only says what went wrong ([`ModelError`]).

pub mod http;
pub mod keyword;
pub mod similarity;

use futures::future::BoxFuture;

use crate::outcome::{Classify, ErrorClass};

/// One model's answer: a label, and its confidence in it when it gives one.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub score: Option<f64>,
}

/// A classifier.
///
/// Contract: `predict` is one attempt, and deterministic for the built-in
/// models (the same input gives the same prediction). `id` is what requests
/// and ensembles name; `version` is recorded with every output, and outputs
/// are coalesced only within one version.
pub trait Model: Send + Sync + 'static {
    fn id(&self) -> &str;
    fn version(&self) -> &str;
    fn predict<'a>(&'a self, input: &'a str) -> BoxFuture<'a, Result<Prediction, ModelError>>;
}

/// The version a model configuration gets when it names none.
pub(crate) fn default_version() -> String {
    "1".into()
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The model could not be reached or answered with a server error; another
    /// attempt may succeed.
    #[error("model unavailable: {0}")]
    Unavailable(String),
    /// The model answered, but nothing usable (no label, not JSON, a label
    /// the rule does not know). Another attempt is not expected to help: the
    /// model's output for this request is this error.
    #[error("model answer unusable: {0}")]
    BadAnswer(String),
    /// The model refused this input (a 4xx other than auth). Final for this
    /// request.
    #[error("model rejected the input: {0}")]
    Rejected(String),
    /// Wrong for every input (auth, unknown model, bad configuration): stop.
    #[error("model misconfigured: {0}")]
    Misconfigured(String),
}

impl Classify for ModelError {
    fn class(&self) -> ErrorClass {
        match self {
            ModelError::Unavailable(_) => ErrorClass::Retry,
            ModelError::BadAnswer(_) | ModelError::Rejected(_) => ErrorClass::Invalid,
            ModelError::Misconfigured(_) => ErrorClass::Fatal,
        }
    }
}
