//! Retry with exponential backoff and jitter, attempt timeouts, and a circuit
//! breaker per external endpoint. [`Resilient::call`] composes the three and
//! is the only place where a client's errors are retried.

mod breaker;
mod retry;

pub use breaker::{BreakerConfig, BreakerState, Breakers, CircuitBreaker};
pub use retry::{Attempted, Resilient, RetryConfig};
