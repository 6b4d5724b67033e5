//! Topologies: each is a folder of stages plus a declaration in
//! `topologies/<name>.toml`, and one line in [`TOPOLOGIES`]. The flow core
//! (`src/flow/`) knows none of them: a topology hands the runner the two ends
//! of its stage graph ([`Pipeline`]) and the runner does the rest.

pub mod atom_ingestion;
pub mod decode;
pub mod emit;
pub mod ensemble_inference;
pub mod spec;
pub mod summary;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

pub use summary::Summary;

use crate::avro::SchemaRegistry;
use crate::clock::SharedClock;
use crate::config::ConfigError;
use crate::dead_letter::DeadLetterArchive;
use crate::embed::Embedder;
use crate::flow::runner::{self, DeadLetterSink, RunConfig, RunError, RunReport, Until};
use crate::flow::stage::StageContext;
use crate::flow::{Batch, Metrics};
use crate::log::{LogConsumer, LogProducer, LogScan};
use crate::outcome::Fatal;
use crate::resilience::{Breakers, RetryConfig};
use crate::store::{AtomStore, InferenceStore};
use spec::{StageRule, TopologySpec};

/// Every topology this binary runs. Adding one is a folder under
/// `src/topology/`, a declaration in `topologies/`, and a line here.
pub static TOPOLOGIES: &[&dyn Topology] =
    &[&atom_ingestion::AtomIngestion, &ensemble_inference::EnsembleInference, &ensemble_inference::compensation::TOPOLOGY];

/// One kind of topology: what its declaration may say and how its stages are
/// wired. The common part of a declaration (source, dead letters, window,
/// limits) is checked before [`Topology::check`] is called, and the stage
/// order against [`Topology::stage_rules`].
pub trait Topology: Send + Sync + 'static {
    /// The name declarations use (`name = "atom-ingestion"`) and `--topology` takes.
    fn name(&self) -> &'static str;

    /// The bundled declaration, `topologies/<name>.toml`, compiled in.
    fn declaration(&self) -> &'static str;

    /// The stages it understands, in the only order they run.
    fn stage_rules(&self) -> &'static [StageRule];

    /// Checks each stage's settings (read with [`TopologySpec::typed_stages`]).
    fn check(&self, spec: &TopologySpec) -> Result<(), ConfigError>;

    /// One `(stage, what it does)` line per stage, for `topology show`.
    fn describe(&self, spec: &TopologySpec) -> Result<Vec<(String, String)>, ConfigError>;

    /// Topics it writes besides the dead-letter topic (created with the
    /// source's partition count when a profile creates topics), each with
    /// the bundled schema its values are written with.
    fn outputs(&self, spec: &TopologySpec) -> Vec<(String, String)>;

    /// Spawns its stages on `ctx` and returns the two ends of the graph.
    fn build<'a>(&'a self, spec: &'a TopologySpec, deps: &'a Deps, ctx: &'a StageContext) -> BoxFuture<'a, Result<Pipeline, Fatal>>;

    /// Its lines of the run summary, from the counters its stages keep.
    fn summarize(&self, summary: &Summary) -> Vec<String>;
}

/// The two ends of a topology's stage graph: the runner sends windows into
/// `head` and acknowledges what comes out of `tail`. Every record of a window
/// comes out exactly once, live or with its end (skipped, dead).
pub struct Pipeline {
    pub head: mpsc::Sender<Batch<()>>,
    pub tail: mpsc::Receiver<Batch<()>>,
}

/// Everything a topology talks to, each behind its trait, so the same wiring
/// runs on the embedded default and on Kafka + ClickHouse.
#[derive(Clone)]
pub struct Deps {
    pub producer: Arc<dyn LogProducer>,
    pub registry: Arc<dyn SchemaRegistry>,
    pub store: Arc<dyn AtomStore>,
    /// The same store, as the ensemble-inference tables.
    pub inference: Arc<dyn InferenceStore>,
    /// Reads a partition back (the compensation consumer's exactly-once check).
    pub scan: Arc<dyn LogScan>,
    pub embedder: Arc<dyn Embedder>,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    /// Every circuit breaker of the run (the topology registers its own here).
    pub breakers: Breakers,
    /// Model answers to play back or record (replays); `None` calls the models.
    pub cassette: Option<Arc<crate::replay::cassette::Cassette>>,
}

/// The topology named `name`.
pub fn find(name: &str) -> Option<&'static dyn Topology> {
    TOPOLOGIES.iter().copied().find(|t| t.name() == name)
}

/// The names of every topology, for messages.
pub fn names() -> Vec<&'static str> {
    TOPOLOGIES.iter().map(|t| t.name()).collect()
}

/// The bundled declaration named `name`, parsed and checked.
pub fn bundled(name: &str) -> Result<TopologySpec, ConfigError> {
    let path = std::path::PathBuf::from(format!("topologies/{name}.toml (built in)"));
    match find(name) {
        Some(t) => TopologySpec::parse(&path, t.declaration()),
        None => Err(ConfigError::invalid(Path::new("command line"), "--topology", format!("`{name}` is neither a bundled topology {:?} nor a declaration file (a path with a `/` or ending in .toml)", names()))),
    }
}

/// What `--topology` names: a bundled topology, or a declaration file (any
/// value with a `/` or ending in `.toml`, or an existing file).
pub fn resolve(name_or_path: &str) -> Result<TopologySpec, ConfigError> {
    let path = Path::new(name_or_path);
    if find(name_or_path).is_none() && (name_or_path.contains('/') || name_or_path.ends_with(".toml") || path.is_file()) {
        TopologySpec::load(path)
    } else {
        bundled(name_or_path)
    }
}

/// Builds the topology `spec` declares and runs it over `consumer`.
pub async fn run<C: LogConsumer>(
    spec: &TopologySpec,
    deps: &Deps,
    consumer: C,
    until: Until,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<RunReport, RunError> {
    let topology = spec.topology().map_err(|e| Fatal::new("topology", e.to_string()))?;
    let ctx = StageContext::new(deps.metrics.clone(), deps.clock.clone(), spec.limits.edge_batches).with_breakers(deps.breakers.clone());
    let Pipeline { head, tail } = topology.build(spec, deps, &ctx).await?;
    let dlq = DeadLetterSink {
        producer: deps.producer.clone(),
        archive: spec.dead_letter.archive.then(|| deps.store.clone() as Arc<dyn DeadLetterArchive>),
        retry: RetryConfig::forever(),
    };
    let cfg = RunConfig {
        topology: spec.name.clone(),
        dead_letter_topic: spec.dead_letter.topic.clone(),
        window: spec.window,
        limits: spec.limits,
        poll_wait: Duration::from_millis(100),
        commit_interval: Duration::from_millis(spec.commit_interval_ms.unwrap_or(1_000)),
        drain_timeout: Duration::from_secs(30),
        revoke_timeout: Duration::from_secs(3),
        until,
    };
    runner::run(consumer, head, tail, dlq, ctx, cfg, shutdown).await
}
