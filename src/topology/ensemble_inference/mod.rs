//! The ensemble-inference topology, run as a saga. One request's path, one
//! file per stage: [`decode`](crate::topology::decode) → [`recall`] → [`plan`] →
//! [`invoke`] (reserve, call every model, publish each answer, aggregate)
//! → [`persist`] → [`publish`], then the runner's acker (dead letters,
//! commit). A request whose saga fails leaves `publish` as an
//! `InferenceCompensation`, which the [`compensation`] topology applies.
//!
//! The parts: [`call`] calls one model (quota, retries, breaker, hedging,
//! coalescing), [`aggregate`] holds the five strategies and the tie rule,
//! [`rollout`] the sticky percentage rollout.

pub mod aggregate;
pub mod call;
pub mod compensation;
pub mod invoke;
pub mod persist;
pub mod plan;
pub mod publish;
pub mod recall;
pub mod rollout;
pub mod spec;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::spec::{StageRule, TopologySpec};
use super::{Deps, Pipeline, Summary, Topology};
use crate::config::ConfigError;
use crate::flow::stage::{self, StageContext};
use crate::model::Model;
use crate::outcome::Fatal;
use crate::resilience::{BreakerConfig, Resilient};
use crate::topology::emit::Emitter;
use call::Invoker;
use spec::{ModelSpec, Stages};

/// The counters this topology's stages keep.
pub mod counters {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use crate::flow::Counter;

    pub const PARTIALS_PUBLISHED: Counter = Counter::new("invoke", "partials_published");
    pub const LATE_OUTPUTS: Counter = Counter::new("invoke", "late_outputs");
    pub const UNANSWERED: Counter = Counter::new("invoke", "unanswered_by_deadline");
    pub const CALLS_COALESCED: Counter = Counter::new("invoke", "calls_saved_by_coalescing");
    pub const HEDGED: Counter = Counter::new("invoke", "hedged_calls");
    pub const OUTPUTS_STORED: Counter = Counter::new("persist", "outputs_stored");
    pub const RESULTS_STORED: Counter = Counter::new("persist", "results_stored");
    pub const RESULTS_PUBLISHED: Counter = Counter::new("publish", "results_published");
    pub const COMPENSATIONS_REQUESTED: Counter = Counter::new("publish", "compensations_requested");
    /// Redelivered requests answered with their earlier answer.
    pub const ANSWERED_AGAIN: Counter = Counter::new("recall", "answered_again");

    /// Model outputs by whether the model answered.
    pub const fn model_output(ok: bool) -> Counter {
        Counter::new("invoke", if ok { "model_answers" } else { "model_failures" })
    }

    /// Compensations by the code of the failure.
    pub fn compensated_for(code: &str) -> Counter {
        Counter::new("publish", intern(&format!("compensation.{code}")))
    }

    /// Results published per rollout flag state (`flag.<name>=on|off`).
    pub fn flag_state(state: &str) -> Counter {
        Counter::new("publish", intern(&format!("flag.{state}")))
    }

    /// Counter names made at run time, kept once each. They come from the
    /// configuration (flag names) and a fixed set of codes, so the set is small.
    fn intern(name: &str) -> &'static str {
        static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
        let mut names = NAMES.lock().unwrap();
        let names = names.get_or_insert_with(HashSet::new);
        if let Some(n) = names.get(name) {
            return n;
        }
        let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
        names.insert(leaked);
        leaked
    }
}

/// Ensemble inference: `InferenceRequest` in; `ModelOutput` events,
/// `model_outputs` and `inference_results` rows, and an `InferenceResult`
/// (or an `InferenceCompensation`) per request out.
pub struct EnsembleInference;

impl Topology for EnsembleInference {
    fn name(&self) -> &'static str {
        "ensemble-inference"
    }

    fn declaration(&self) -> &'static str {
        include_str!("../../../topologies/ensemble-inference.toml")
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
        let Ok(stages) = Stages::of(spec) else { return Vec::new() };
        vec![
            (stages.invoke().partial_topic.clone(), crate::avro::MODEL_OUTPUT.to_string()),
            (stages.publish().topic.clone(), crate::avro::INFERENCE_RESULT.to_string()),
            (stages.publish().compensation_topic.clone(), crate::avro::INFERENCE_COMPENSATION.to_string()),
        ]
    }

    fn build<'a>(&'a self, spec: &'a TopologySpec, deps: &'a Deps, ctx: &'a StageContext) -> BoxFuture<'a, Result<Pipeline, Fatal>> {
        Box::pin(build(spec, deps, ctx))
    }

    fn summarize(&self, s: &Summary) -> Vec<String> {
        use counters::*;
        let mut lines = vec![
            format!("model answers         {:>8}  ({} failed, {} unanswered by the deadline, {} late)", s.count(model_output(true)), s.count(model_output(false)), s.count(UNANSWERED), s.count(LATE_OUTPUTS)),
            format!("partial results       {:>8}", s.count(PARTIALS_PUBLISHED)),
            format!("calls saved           {:>8}  (coalesced with an identical call)", s.count(CALLS_COALESCED)),
            format!("hedged calls          {:>8}", s.count(HEDGED)),
            format!("results stored        {:>8}  ({} model outputs)", s.count(RESULTS_STORED), s.count(OUTPUTS_STORED)),
            format!("results published     {:>8}", s.count(RESULTS_PUBLISHED)),
            format!("compensations         {:>8}  (sent to the compensation consumer)", s.count(COMPENSATIONS_REQUESTED)),
            format!("answered again        {:>8}  (redelivered, answered as before)", s.count(ANSWERED_AGAIN)),
        ];
        for (reason, n) in s.counted("publish", "compensation.") {
            lines.push(format!("  {reason:<22}{n:>6}"));
        }
        for (state, n) in s.counted("publish", "flag.") {
            lines.push(format!("  {state:<22}{n:>6}"));
        }
        lines
    }
}

/// The models of the invoke stage, each behind its [`Invoker`].
pub fn invokers(stages: &Stages, deps: &Deps) -> Result<BTreeMap<String, Arc<Invoker>>, Fatal> {
    let invoke = stages.invoke();
    let mut out = BTreeMap::new();
    for m in &invoke.model {
        let model: Arc<dyn Model> = match m {
            ModelSpec::Keyword(k) => Arc::new(crate::model::keyword::KeywordModel::new(k.clone()).map_err(|e| Fatal::new("invoke", e))?),
            ModelSpec::Similarity(s) => {
                Arc::new(crate::model::similarity::SimilarityModel::new(s.clone(), deps.embedder.clone()).map_err(|e| Fatal::new("invoke", e))?)
            }
            ModelSpec::Http(h) => Arc::new(crate::model::http::HttpModel::new(h.clone()).map_err(|e| Fatal::new("invoke", e))?),
        };
        let model = match &deps.cassette {
            Some(c) => c.model(model),
            None => model,
        };
        // Model breakers are not the run's: one model down must not pause
        // the partitions, since the others may still decide.
        out.insert(m.id().to_string(), Invoker::new(model, invoke.policy(m.id()).clone(), deps.clock.clone()));
    }
    Ok(out)
}

async fn build(spec: &TopologySpec, deps: &Deps, ctx: &StageContext) -> Result<Pipeline, Fatal> {
    let stages = Stages::of(spec).map_err(|e| Fatal::new("topology", e.to_string()))?;
    let store_breaker = deps.breakers.breaker("store", BreakerConfig::default());
    let log_breaker = deps.breakers.breaker("log", BreakerConfig::default());
    let resilient = |retry: &crate::resilience::RetryConfig, breaker: &Arc<crate::resilience::CircuitBreaker>| {
        Resilient::new(retry.clone(), breaker.clone(), deps.clock.clone())
    };
    let invoke_spec = stages.invoke();
    let publish_spec = stages.publish();
    let flags = match &stages.plan().flags_file {
        Some(path) => Some(Arc::new(rollout::Flags::load(path).map_err(|e| Fatal::new("plan", e.to_string()))?)),
        None => None,
    };

    let (head, rx) = ctx.edge::<()>();
    let reader = crate::avro::Schemas::current(&spec.source.schema)
        .ok_or_else(|| Fatal::new("decode", format!("no bundled schema named `{}`", spec.source.schema)))?;
    let decode = crate::topology::decode::Decode::<crate::inference::InferenceRequest>::new(deps.registry.clone(), reader.schema.clone(), deps.clock.clone());
    deps.breakers.register(decode.breaker());
    let rx = stage::spawn("decode", decode, rx, ctx);
    let answers = Arc::new(publish::Answers {
        results: Emitter::new("publish", deps.producer.clone(), deps.registry.as_ref(), &publish_spec.topic, crate::avro::INFERENCE_RESULT, resilient(&publish_spec.retry, &log_breaker)).await?,
        compensations: Emitter::new(
            "publish",
            deps.producer.clone(),
            deps.registry.as_ref(),
            &publish_spec.compensation_topic,
            crate::avro::INFERENCE_COMPENSATION,
            resilient(&publish_spec.retry, &log_breaker),
        )
        .await?,
        metrics: deps.metrics.clone(),
    });
    let store_retry = &stages.persist().retry;
    let recall = recall::Recall { store: deps.inference.clone(), resilient: resilient(store_retry, &store_breaker), answers: answers.clone(), metrics: deps.metrics.clone() };
    let rx = stage::spawn("recall", recall, rx, ctx);
    let plan = plan::Plan { spec: stages.plan().clone(), invokers: invokers(&stages, deps)?, flags };
    let rx = stage::spawn("plan", plan, rx, ctx);
    let partial = Emitter::new("invoke", deps.producer.clone(), deps.registry.as_ref(), &invoke_spec.partial_topic, crate::avro::MODEL_OUTPUT, resilient(&invoke_spec.retry, &log_breaker)).await?;
    let invoke = invoke::Invoke { partial: Arc::new(partial), clock: deps.clock.clone(), metrics: deps.metrics.clone(), parallel: invoke_spec.parallel_requests };
    let windows = invoke_spec.parallel_windows;
    let rx = stage::spawn_concurrent("invoke", invoke, windows, rx, ctx);
    let persist = persist::Persist { store: deps.inference.clone(), resilient: resilient(store_retry, &store_breaker), metrics: deps.metrics.clone(), clock: deps.clock.clone() };
    let rx = stage::spawn_concurrent("persist", persist, windows, rx, ctx);
    let publish = publish::Publish {
        answers,
        store: deps.inference.clone(),
        resilient: resilient(store_retry, &store_breaker),
        metrics: deps.metrics.clone(),
        clock: deps.clock.clone(),
    };
    let tail = stage::spawn_concurrent("publish", publish, windows, rx, ctx);
    Ok(Pipeline { head, tail })
}
