//! Operations endpoints of a running processor: `/metrics` (Prometheus text
//! format), `/health` (liveness) and `/ready` (connected, partitions assigned,
//! progress not stuck), and `/requests/{correlation_id}` (what happened to
//! one request, answered from the store as JSON). The first three read the run's [`Metrics`](crate::flow::Metrics)
//! and circuit breakers at request time; nothing on the record path waits
//! for them.
//!
//! - [`exporter`]: every exported metric, named once, and the readiness rule.
//! - [`server`]: the HTTP/1 listener (loopback by default).

pub mod events;
pub mod exporter;
pub mod server;

pub use exporter::Exporter;
pub use server::{DEFAULT_LISTEN, Listen, Requests, serve};
