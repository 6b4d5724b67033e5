//! The three outcomes of any failure, and the per-record outcome of a stage.
//!
//! Every external client classifies its own errors into an [`ErrorClass`] in
//! one place (see `embed/openai.rs`, `store/embedded/`). The rest of the
//! system only ever looks at the class:
//! - **Retry**: transient; try again later with backoff. Nothing is lost.
//! - **Invalid**: this input can never succeed; it goes to the dead-letter
//!   topic with its original bytes and provenance.
//! - **Fatal**: the topology cannot go on (misconfiguration, broken
//!   contract); it stops and says why. Uncommitted work is repeated on restart.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Retry,
    Invalid,
    Fatal,
}

/// Implemented by every error that crosses an external edge.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

/// Why a record was dead-lettered: a stable `code` that dashboards group by
/// (`validate.content_type`, `decode.unknown_schema`, ...) and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: String,
    pub message: String,
    /// Attempts made before giving up; 1 for inputs rejected outright.
    pub attempts: u32,
}

impl Rejection {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into(), attempts: 1 }
    }

    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// What a stage decided for one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// Pass `T` to the next stage.
    Continue(T),
    /// Finished early without error (for example, a duplicate). The record
    /// counts as done and its offset may be committed.
    Skip(&'static str),
    /// Send the record to the dead-letter topic.
    Invalid(Rejection),
}

/// A whole-batch failure that stops the topology.
#[derive(Debug, Clone, thiserror::Error)]
#[error("fatal in stage `{stage}`: {message}")]
pub struct Fatal {
    pub stage: String,
    pub message: String,
}

impl Fatal {
    pub fn new(stage: impl Into<String>, message: impl Into<String>) -> Self {
        Self { stage: stage.into(), message: message.into() }
    }
}

/// An error with its chain of sources, `a: b: c`, skipping a source whose
/// text its parent already contains. Client libraries (reqwest, hyper,
/// clickhouse) often hide the cause, which is what an operator needs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
