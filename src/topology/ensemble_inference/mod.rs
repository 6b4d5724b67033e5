//! The ensemble-inference topology (issue 7), being built in steps. What is
//! here so far are its pure parts, each with its own tests:
//! - [`aggregate`]: the five strategies and the tie rule;
//! - [`rollout`]: sticky percentage rollout with a flag file that reloads.
//!
//! Not yet here, so not yet in `TOPOLOGIES`: the declaration, the stages
//! (decode, reserve, invoke, partial results, aggregate, persist, publish),
//! the saga and its compensation consumer, and the tables.

pub mod aggregate;
pub mod rollout;
