//! The ensemble-inference topology (issue 7), being built in steps. What is
//! here so far are its pure parts, each with its own tests:
//! - [`aggregate`]: the five strategies and the tie rule;
//! - [`rollout`]: sticky percentage rollout with a flag file that reloads;
//! - [`invoke`]: calling one model: quota, per-attempt timeout on the
//!   injected clock, retries, circuit breaker, hedging and coalescing.
//!
//! Not yet here, so not yet in `TOPOLOGIES`: the declaration, the stages
//! (decode, reserve, invoke, partial results, aggregate, persist, publish),
//! the saga and its compensation consumer, and the tables.

pub mod aggregate;
pub mod invoke;
pub mod rollout;
