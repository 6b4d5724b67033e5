//! Topologies: declared in `topologies/*.toml` ([`spec`]), wired here from
//! the stages in their own folders.

pub mod atom_ingestion;
pub mod spec;

use std::sync::Arc;

use crate::avro::SchemaRegistry;
use crate::clock::SharedClock;
use crate::embed::Embedder;
use crate::flow::Metrics;
use crate::log::LogProducer;
use crate::resilience::Breakers;
use crate::store::AtomStore;

/// Everything a topology talks to, each behind its trait, so the same wiring
/// runs on the embedded default and on Kafka + ClickHouse.
#[derive(Clone)]
pub struct Deps {
    pub producer: Arc<dyn LogProducer>,
    pub registry: Arc<dyn SchemaRegistry>,
    pub store: Arc<dyn AtomStore>,
    pub embedder: Arc<dyn Embedder>,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    /// Every circuit breaker of the run (the topology registers its own here).
    pub breakers: Breakers,
}

/// Topology declarations compiled into the binary, by name. The files in
/// `topologies/` are the same text; `--topology-file` runs an edited copy.
pub const BUNDLED: &[(&str, &str)] = &[("atom-ingestion", include_str!("../../topologies/atom-ingestion.toml"))];

/// The bundled declaration named `name`, parsed and checked.
pub fn bundled(name: &str) -> Result<spec::TopologySpec, crate::config::ConfigError> {
    let path = std::path::PathBuf::from(format!("topologies/{name}.toml (built in)"));
    match BUNDLED.iter().find(|(n, _)| *n == name) {
        Some((_, text)) => spec::TopologySpec::parse(&path, text),
        None => Err(crate::config::ConfigError::invalid(
            &path,
            "--topology",
            format!("`{name}` is not a topology; use one of {:?}", BUNDLED.iter().map(|(n, _)| *n).collect::<Vec<_>>()),
        )),
    }
}
