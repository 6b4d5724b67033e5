//! The atom-ingestion topology. One record's path, one file per stage:
//! [`decode`] → [`validate`] → [`hash`] → [`dedup`] → [`embed`] → [`persist`]
//! (two stages: the atoms, then the arrivals) → [`publish`], then the
//! runner's acker (dead letters, commit). The
//! [`ledger`] is what dedup admitted and what became of it.

/// Stage 1, shared by every topology (see [`crate::topology::decode`]).
pub mod decode {
    pub use crate::topology::decode::{JSON_CONTENT_TYPE, to_request};
    /// Decodes `AtomIngestionRequest`s.
    pub type Decode = crate::topology::decode::Decode<crate::atom::AtomIngestionRequest>;
}
pub mod dedup;
pub mod embed;
pub mod hash;
pub mod ledger;
pub mod persist;
pub mod publish;
pub mod spec;
pub mod validate;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::spec::{StageRule, TopologySpec};
use super::{Deps, Pipeline, Summary, Topology};
use crate::config::ConfigError;
use crate::flow::stage::{self, StageContext};
use crate::flow::{Batch, FnStage, Item};
use crate::outcome::{Fatal, Outcome};
use crate::resilience::{BreakerConfig, CircuitBreaker, Resilient, RetryConfig};
use spec::Stages;

/// The counters this topology's stages keep.
pub mod counters {
    use crate::flow::Counter;
    use crate::topology::Summary;

    pub const EMBEDDING_CALLS: Counter = Counter::new("embed", "embedding_calls");
    pub const EMBEDDED_TEXTS: Counter = Counter::new("embed", "embedded_texts");
    pub const ATOMS_STORED: Counter = Counter::new("persist", "atoms_stored");
    /// Accepted requests recorded in `atom_arrivals` (a redelivered request
    /// recorded before is not counted again).
    pub const ARRIVALS_STORED: Counter = Counter::new("persist", "arrivals_stored");
    pub const EVENTS_PUBLISHED: Counter = Counter::new("publish", "events_published");

    /// Requests whose content was already stored or admitted, by how
    /// (`duplicate.*`, see `dedup`).
    pub const fn matched(reason: &'static str) -> Counter {
        Counter::new("dedup", reason)
    }

    /// Every request matched to content already stored or admitted.
    pub fn duplicates_matched(s: &Summary) -> u64 {
        s.counted("dedup", "duplicate.").values().sum()
    }
}

/// Content atoms: `AtomIngestionRequest` in, `atoms` + `atom_arrivals` rows
/// and `AtomIngested` events out.
pub struct AtomIngestion;

impl Topology for AtomIngestion {
    fn name(&self) -> &'static str {
        "atom-ingestion"
    }

    fn declaration(&self) -> &'static str {
        include_str!("../../../topologies/atom-ingestion.toml")
    }

    fn stage_rules(&self) -> &'static [StageRule] {
        spec::RULES
    }

    fn check(&self, spec: &TopologySpec) -> Result<(), ConfigError> {
        Stages::of(spec)?.check(spec)
    }

    fn describe(&self, spec: &TopologySpec) -> Result<Vec<(String, String)>, ConfigError> {
        Ok(Stages::of(spec)?.describe(spec))
    }

    fn outputs(&self, spec: &TopologySpec) -> Vec<(String, String)> {
        Stages::of(spec).ok().and_then(|s| s.publish().map(|p| vec![(p.topic.clone(), p.schema.clone())])).unwrap_or_default()
    }

    fn build<'a>(&'a self, spec: &'a TopologySpec, deps: &'a Deps, ctx: &'a StageContext) -> BoxFuture<'a, Result<Pipeline, Fatal>> {
        Box::pin(build(spec, deps, ctx))
    }

    fn summarize(&self, s: &Summary) -> Vec<String> {
        use counters::*;
        let mut lines = vec![
            format!("atoms stored          {:>8}", s.count(ATOMS_STORED)),
            format!("arrivals recorded     {:>8}", s.count(ARRIVALS_STORED)),
            format!("duplicates matched    {:>8}  (stored nothing, no embedding call)", duplicates_matched(s)),
        ];
        for (reason, n) in s.counted("dedup", "duplicate.") {
            lines.push(format!("  {reason:<22}{n:>6}"));
        }
        lines.push(format!("embedding calls       {:>8}  ({} contents embedded)", s.count(EMBEDDING_CALLS), s.count(EMBEDDED_TEXTS)));
        lines.push(format!("events published      {:>8}  (one per accepted request)", s.count(EVENTS_PUBLISHED)));
        lines
    }
}

/// Spawns the stages the declaration lists.
async fn build(spec: &TopologySpec, deps: &Deps, ctx: &StageContext) -> Result<Pipeline, Fatal> {
    let stages = Stages::of(spec).map_err(|e| Fatal::new("topology", e.to_string()))?;
    let store_breaker = deps.breakers.breaker("store", BreakerConfig::default());
    let log_breaker = deps.breakers.breaker("log", BreakerConfig::default());
    if let Some(b) = deps.embedder.breaker() {
        deps.breakers.register(b);
    }
    let resilient = |retry: &RetryConfig, breaker: &Arc<CircuitBreaker>| Resilient::new(retry.clone(), breaker.clone(), deps.clock.clone());

    let (head, rx) = ctx.edge::<()>();
    let reader = crate::avro::Schemas::current(&spec.source.schema)
        .ok_or_else(|| Fatal::new("decode", format!("no bundled schema named `{}`", spec.source.schema)))?;
    let decode = decode::Decode::new(deps.registry.clone(), reader.schema.clone(), deps.clock.clone());
    deps.breakers.register(decode.breaker());
    let rx = stage::spawn("decode", decode, rx, ctx);
    let rx = stage::spawn("validate", validate::stage(stages.validate().cloned().unwrap_or_default()), rx, ctx);
    let rx = stage::spawn("hash", hash::stage(), rx, ctx);
    let dedup_spec = stages.dedup();
    let ledger = dedup_spec.map(|d| ledger::Ledger::shared(d.recent_capacity));
    let rx: mpsc::Receiver<Batch<dedup::Admitted>> = match (dedup_spec, &ledger) {
        (Some(d), Some(ledger)) => stage::spawn(
            "dedup",
            dedup::Dedup { store: deps.store.clone(), ledger: ledger.clone(), resilient: resilient(&d.retry, &store_breaker), metrics: deps.metrics.clone() },
            rx,
            ctx,
        ),
        // Without dedup every request creates its atom (the store still
        // writes each content once).
        _ => stage::spawn("dedup", FnStage::new(|item: Item<hash::Hashed>| Outcome::Continue(dedup::Admitted::created(item.value))), rx, ctx),
    };
    let rx: mpsc::Receiver<Batch<embed::Embedded>> = match stages.embed() {
        Some(e) => {
            let stage = embed::Embed {
                embedder: deps.embedder.clone(),
                metrics: deps.metrics.clone(),
                concurrency: e.concurrency,
                clock: deps.clock.clone(),
                ledger: ledger.clone(),
                outage: Arc::new(AtomicBool::new(false)),
            };
            stage::spawn("embed", stage, rx, ctx)
        }
        None => stage::spawn("embed", FnStage::new(|item: Item<dedup::Admitted>| Outcome::Continue(embed::Embedded { admitted: item.value, embedding: Vec::new() })), rx, ctx),
    };
    let persist = stages.persist().cloned().unwrap_or_default();
    let persist = persist::Persist {
        store: deps.store.clone(),
        resilient: resilient(&persist.retry, &store_breaker),
        metrics: deps.metrics.clone(),
        clock: deps.clock.clone(),
        embedding_model: deps.embedder.model().to_string(),
        embedding_dimension: deps.embedder.dimension(),
        ledger: ledger.clone(),
        looked_up: dedup_spec.is_some(),
    };
    // One window's arrivals are written while the next window's atoms are
    // (see persist.rs); both stages use the `persist` configuration.
    let persist = Arc::new(persist);
    let rx = stage::spawn("persist", persist::StoreAtoms(persist.clone()), rx, ctx);
    let rx = stage::spawn("arrivals", persist::RecordArrivals(persist), rx, ctx);
    let tail: mpsc::Receiver<Batch<()>> = match stages.publish() {
        Some(p) => {
            let publish = publish::Publish::new(deps.producer.clone(), deps.registry.as_ref(), &p.topic, &p.schema, resilient(&p.retry, &log_breaker), deps.metrics.clone()).await?;
            stage::spawn("publish", publish, rx, ctx)
        }
        None => stage::spawn("publish", FnStage::new(|_: Item<crate::atom::AtomIngested>| Outcome::Continue(())), rx, ctx),
    };
    Ok(Pipeline { head, tail })
}
