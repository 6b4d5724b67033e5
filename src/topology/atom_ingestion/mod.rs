//! The atom-ingestion topology. One record's path, one file per stage:
//! [`decode`] → [`validate`] → [`hash`] → [`dedup`] → [`embed`] → [`persist`]
//! → [`publish`], then the runner's acker (dead letters, commit). The
//! [`ledger`] is what dedup admitted and what became of it.

pub mod decode;
pub mod dedup;
pub mod embed;
pub mod hash;
pub mod ledger;
pub mod persist;
pub mod publish;
pub mod validate;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Deps;
use super::spec::{StageSpec, TopologySpec};
use crate::flow::runner::{self, DeadLetterSink, RunConfig, RunError, RunReport, Until};
use crate::flow::stage::{self, StageContext};
use crate::flow::{Batch, FnStage, Item};
use crate::log::LogConsumer;
use crate::outcome::{Fatal, Outcome};
use crate::resilience::{BreakerConfig, CircuitBreaker, Resilient, RetryConfig};

/// Builds the stages the declaration lists and runs them over `consumer`.
pub async fn run<C: LogConsumer>(
    spec: &TopologySpec,
    deps: &Deps,
    consumer: C,
    until: Until,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<RunReport, RunError> {
    let ctx = StageContext::new(deps.metrics.clone(), deps.clock.clone(), spec.limits.edge_batches).with_breakers(deps.breakers.clone());
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
    let rx = stage::spawn("decode", decode, rx, &ctx);
    let validate = spec.stage(|s| if let StageSpec::Validate(v) = s { Some(v) } else { None }).cloned().unwrap_or_default();
    let rx = stage::spawn("validate", validate::stage(validate), rx, &ctx);
    let rx = stage::spawn("hash", hash::stage(), rx, &ctx);
    let dedup_spec = spec.stage(|s| if let StageSpec::Dedup(d) = s { Some(d) } else { None });
    let ledger = dedup_spec.map(|d| ledger::Ledger::shared(d.recent_capacity));
    let rx: mpsc::Receiver<Batch<dedup::Admitted>> = match (dedup_spec, &ledger) {
        (Some(d), Some(ledger)) => stage::spawn(
            "dedup",
            dedup::Dedup { store: deps.store.clone(), ledger: ledger.clone(), resilient: resilient(&d.retry, &store_breaker), metrics: deps.metrics.clone() },
            rx,
            &ctx,
        ),
        // Without dedup every request creates its atom (the store still
        // writes each content once).
        _ => stage::spawn("dedup", FnStage::new(|item: Item<hash::Hashed>| Outcome::Continue(dedup::Admitted::created(item.value))), rx, &ctx),
    };
    let rx: mpsc::Receiver<Batch<embed::Embedded>> = match spec.stage(|s| if let StageSpec::Embed(e) = s { Some(e) } else { None }) {
        Some(e) => {
            let stage = embed::Embed {
                embedder: deps.embedder.clone(),
                metrics: deps.metrics.clone(),
                concurrency: e.concurrency,
                clock: deps.clock.clone(),
                ledger: ledger.clone(),
                outage: Arc::new(AtomicBool::new(false)),
            };
            stage::spawn("embed", stage, rx, &ctx)
        }
        None => stage::spawn("embed", FnStage::new(|item: Item<dedup::Admitted>| Outcome::Continue(embed::Embedded { admitted: item.value, embedding: Vec::new() })), rx, &ctx),
    };
    let persist = spec.stage(|s| if let StageSpec::Persist(p) = s { Some(p) } else { None }).cloned().unwrap_or_default();
    let persist = persist::Persist {
        store: deps.store.clone(),
        resilient: resilient(&persist.retry, &store_breaker),
        metrics: deps.metrics.clone(),
        clock: deps.clock.clone(),
        embedding_model: deps.embedder.model().to_string(),
        embedding_dimension: deps.embedder.dimension(),
        ledger: ledger.clone(),
    };
    let rx = stage::spawn("persist", persist, rx, &ctx);
    let tail: mpsc::Receiver<Batch<()>> = match spec.stage(|s| if let StageSpec::Publish(p) = s { Some(p) } else { None }) {
        Some(p) => {
            let publish = publish::Publish::new(deps.producer.clone(), deps.registry.as_ref(), &p.topic, &p.schema, resilient(&p.retry, &log_breaker), deps.metrics.clone()).await?;
            stage::spawn("publish", publish, rx, &ctx)
        }
        None => stage::spawn("publish", FnStage::new(|_: Item<crate::atom::AtomIngested>| Outcome::Continue(())), rx, &ctx),
    };

    let dlq = DeadLetterSink {
        producer: deps.producer.clone(),
        archive: spec.dead_letter.archive.then(|| deps.store.clone() as Arc<dyn crate::dead_letter::DeadLetterArchive>),
        retry: RetryConfig { max_attempts: 0, ..RetryConfig::default() },
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
