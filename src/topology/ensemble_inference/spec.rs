//! What `topologies/ensemble-inference.toml` may say: the models, the
//! ensembles, and each stage's settings, checked before anything runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use super::aggregate::Strategy;
use super::call::CallPolicy;
use crate::config::ConfigError;
use crate::model::http::HttpModelConfig;
use crate::model::keyword::KeywordConfig;
use crate::model::similarity::SimilarityConfig;
use crate::resilience::RetryConfig;
use crate::topology::spec::{StageRule, TopologySpec};

/// One stage entry, `[[stage]]` with `name = "..."` and its settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum StageSpec {
    Decode(DecodeSpec),
    Recall(DecodeSpec),
    Plan(PlanSpec),
    Invoke(InvokeSpec),
    Persist(PersistSpec),
    Publish(PublishSpec),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecodeSpec {}

/// Which models a request asks, and how their answers are combined.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Deadline of a request that gives no `timeout_ms`.
    #[serde(default = "five_s")]
    pub default_timeout_ms: u64,
    /// Longest deadline a request may ask for.
    #[serde(default = "one_min")]
    pub max_timeout_ms: u64,
    /// Rollout flags: a TOML file of `[[flag]] name, ensemble, percent`,
    /// reloaded when it changes. Relative to the working directory.
    #[serde(default)]
    pub flags_file: Option<PathBuf>,
    /// Named ensembles a request may ask for by `ensemble`.
    #[serde(default)]
    pub ensemble: Vec<EnsembleSpec>,
}

fn five_s() -> u64 {
    5_000
}

fn one_min() -> u64 {
    60_000
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnsembleSpec {
    pub name: String,
    /// Model ids in order: the first listed wins ties.
    pub models: Vec<String>,
    /// An `Aggregation` symbol; a request may override it.
    pub strategy: String,
    /// k for `QUORUM`.
    #[serde(default)]
    pub quorum: Option<usize>,
    /// Weights for `WEIGHTED_VOTE` (a model not listed weighs 1.0).
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
}

/// A model definition: `[[stage.model]]` with `kind` and that kind's settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelSpec {
    Keyword(KeywordConfig),
    Similarity(SimilarityConfig),
    Http(HttpModelConfig),
}

impl ModelSpec {
    pub fn id(&self) -> &str {
        match self {
            ModelSpec::Keyword(k) => &k.id,
            ModelSpec::Similarity(s) => &s.id,
            ModelSpec::Http(h) => &h.id,
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            ModelSpec::Keyword(k) => k.check(),
            ModelSpec::Similarity(s) => s.check(),
            ModelSpec::Http(h) => h.check(),
        }
    }
}

/// Calling the models: their definitions and call policies, and where each
/// answer is published as it arrives.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InvokeSpec {
    /// Partial-results topic: one `ModelOutput` per model answer, in arrival
    /// order per request (keyed by correlation id).
    pub partial_topic: String,
    /// Requests of one window worked on at once.
    #[serde(default = "sixty_four")]
    pub parallel_requests: usize,
    /// Windows invoke, persist and publish each work on at once (results
    /// still leave in window order). Each window waits on broker and store
    /// round trips; under light load windows are small, and one at a time
    /// made those round trips, not the models, the limit.
    #[serde(default = "four")]
    pub parallel_windows: usize,
    pub model: Vec<ModelSpec>,
    /// The call policy of every model not listed in `calls`.
    #[serde(default)]
    pub call_defaults: CallPolicy,
    /// Per model id: its own call policy (replaces `call_defaults`).
    #[serde(default)]
    pub calls: BTreeMap<String, CallPolicy>,
    #[serde(default = "RetryConfig::forever")]
    pub retry: RetryConfig,
}

fn sixty_four() -> usize {
    64
}

fn four() -> usize {
    4
}

impl InvokeSpec {
    pub fn policy(&self, model: &str) -> &CallPolicy {
        self.calls.get(model).unwrap_or(&self.call_defaults)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PersistSpec {
    /// Store writes retry forever by default: an outage becomes backpressure.
    pub retry: RetryConfig,
}

impl Default for PersistSpec {
    fn default() -> Self {
        Self { retry: RetryConfig::forever() }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    /// `InferenceResult` per decided request.
    pub topic: String,
    /// `InferenceCompensation` per request whose saga failed.
    pub compensation_topic: String,
    #[serde(default = "RetryConfig::forever")]
    pub retry: RetryConfig,
}


impl StageSpec {
    pub fn name(&self) -> &'static str {
        match self {
            StageSpec::Decode(_) => "decode",
            StageSpec::Recall(_) => "recall",
            StageSpec::Plan(_) => "plan",
            StageSpec::Invoke(_) => "invoke",
            StageSpec::Persist(_) => "persist",
            StageSpec::Publish(_) => "publish",
        }
    }
}

/// The stages of ensemble inference, in the only order they run; all required.
pub const RULES: &[StageRule] = &[
    StageRule { name: "decode", required: true },
    StageRule { name: "recall", required: true },
    StageRule { name: "plan", required: true },
    StageRule { name: "invoke", required: true },
    StageRule { name: "persist", required: true },
    StageRule { name: "publish", required: true },
];

/// Parses an `Aggregation` symbol (with `k` for QUORUM and the weights for
/// WEIGHTED_VOTE) into a strategy.
pub fn strategy(symbol: &str, quorum: Option<usize>, weights: &BTreeMap<String, f64>) -> Result<Strategy, String> {
    Ok(match symbol {
        "MAJORITY_VOTE" => Strategy::MajorityVote,
        "WEIGHTED_VOTE" => Strategy::WeightedVote(weights.clone()),
        "MEAN_SCORE" => Strategy::MeanScore,
        "FIRST_SUCCESS" => Strategy::FirstSuccess,
        "QUORUM" => match quorum {
            Some(k) if k >= 1 => Strategy::Quorum(k),
            Some(_) => return Err("QUORUM needs a quorum of at least 1".into()),
            None => return Err("QUORUM needs a quorum (k of n models that must agree)".into()),
        },
        other => return Err(format!("`{other}` is not an aggregation; use MAJORITY_VOTE, WEIGHTED_VOTE, MEAN_SCORE, FIRST_SUCCESS or QUORUM")),
    })
}

/// The declaration's stages, typed.
pub struct Stages(pub Vec<StageSpec>);

impl Stages {
    pub fn of(spec: &TopologySpec) -> Result<Self, ConfigError> {
        spec.typed_stages().map(Self)
    }

    fn index(&self, name: &str) -> usize {
        self.0.iter().position(|s| s.name() == name).unwrap_or(0)
    }

    pub fn plan(&self) -> &PlanSpec {
        self.0.iter().find_map(|s| if let StageSpec::Plan(p) = s { Some(p) } else { None }).expect("plan is a required stage")
    }

    pub fn invoke(&self) -> &InvokeSpec {
        self.0.iter().find_map(|s| if let StageSpec::Invoke(p) = s { Some(p) } else { None }).expect("invoke is a required stage")
    }

    pub fn persist(&self) -> &PersistSpec {
        self.0.iter().find_map(|s| if let StageSpec::Persist(p) = s { Some(p) } else { None }).expect("persist is a required stage")
    }

    pub fn publish(&self) -> &PublishSpec {
        self.0.iter().find_map(|s| if let StageSpec::Publish(p) = s { Some(p) } else { None }).expect("publish is a required stage")
    }

    /// Each stage's settings, against each other and the rest of the declaration.
    pub fn check(&self, spec: &TopologySpec) -> Result<(), ConfigError> {
        let (plan, invoke, publish) = (self.plan(), self.invoke(), self.publish());
        let at = |stage: &str, field: &str| format!("{}.{field}", spec.stage_field(self.index(stage)));
        let mut ids = BTreeSet::new();
        for (i, m) in invoke.model.iter().enumerate() {
            m.check().map_err(|e| spec.invalid(&at("invoke", &format!("model[{i}]")), e))?;
            if !ids.insert(m.id().to_string()) {
                return Err(spec.invalid(&at("invoke", &format!("model[{i}].id")), format!("`{}` is defined twice; give each model its own id", m.id())));
            }
        }
        if ids.is_empty() {
            return Err(spec.invalid(&at("invoke", "model"), "no model is defined; add a `[[stage.model]]` with kind = \"keyword\", \"similarity\" or \"http\""));
        }
        invoke.call_defaults.check().map_err(|e| spec.invalid(&at("invoke", "call_defaults"), e))?;
        for (id, policy) in &invoke.calls {
            if !ids.contains(id) {
                return Err(spec.invalid(&at("invoke", &format!("calls.{id}")), format!("no model `{id}` is defined; known: {ids:?}")));
            }
            policy.check().map_err(|e| spec.invalid(&at("invoke", &format!("calls.{id}")), e))?;
        }
        if invoke.parallel_requests == 0 {
            return Err(spec.invalid(&at("invoke", "parallel_requests"), "is 0; work on at least 1 request at once"));
        }
        if invoke.parallel_windows == 0 {
            return Err(spec.invalid(&at("invoke", "parallel_windows"), "is 0; work on at least 1 window at once"));
        }
        if plan.default_timeout_ms == 0 || plan.default_timeout_ms > plan.max_timeout_ms {
            return Err(spec.invalid(&at("plan", "default_timeout_ms"), format!("is {}; use a deadline between 1 and max_timeout_ms ({})", plan.default_timeout_ms, plan.max_timeout_ms)));
        }
        let mut names = BTreeSet::new();
        for (i, e) in plan.ensemble.iter().enumerate() {
            let field = at("plan", &format!("ensemble[{i}]"));
            if !names.insert(e.name.as_str()) {
                return Err(spec.invalid(&format!("{field}.name"), format!("`{}` is declared twice; keep one", e.name)));
            }
            if e.models.is_empty() {
                return Err(spec.invalid(&format!("{field}.models"), "is empty; list the model ids to ask"));
            }
            if let Some(m) = e.models.iter().find(|m| !ids.contains(*m)) {
                return Err(spec.invalid(&format!("{field}.models"), format!("`{m}` is not a model of the invoke stage; known: {ids:?}")));
            }
            strategy(&e.strategy, e.quorum, &e.weights).map_err(|err| spec.invalid(&format!("{field}.strategy"), err))?;
            if let Some(k) = e.quorum
                && k > e.models.len()
            {
                return Err(spec.invalid(&format!("{field}.quorum"), format!("is {k}, more than the {} models listed", e.models.len())));
            }
        }
        let outputs = [&spec.source.topic, &spec.dead_letter.topic];
        for (stage, field, topic) in [("invoke", "partial_topic", &invoke.partial_topic), ("publish", "topic", &publish.topic), ("publish", "compensation_topic", &publish.compensation_topic)] {
            if outputs.contains(&topic) {
                return Err(spec.invalid(&at(stage, field), "must differ from source.topic and dead_letter.topic"));
            }
        }
        if publish.topic == publish.compensation_topic || invoke.partial_topic == publish.topic || invoke.partial_topic == publish.compensation_topic {
            return Err(spec.invalid(&at("publish", "topic"), "the partial-results, result and compensation topics must all differ"));
        }
        for (stage, retry) in [("invoke", &invoke.retry), ("persist", &self.persist().retry), ("publish", &publish.retry)] {
            retry.check().map_err(|e| spec.invalid(&at(stage, "retry"), e))?;
        }
        Ok(())
    }

    /// One line per stage for `topology show`.
    pub fn describe(&self, spec: &TopologySpec) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|stage| {
                let detail = match stage {
                    StageSpec::Decode(_) => format!("Confluent wire format (or JSON by content-type header) -> {}", spec.source.schema),
                    StageSpec::Recall(_) => "a redelivered request that has a compensation or a live result is answered with it again, not decided again".to_string(),
                    StageSpec::Plan(p) => format!(
                        "models and strategy from the request or one of the ensembles {:?}; deadline {} ms unless the request sets one{}",
                        p.ensemble.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
                        p.default_timeout_ms,
                        p.flags_file.as_ref().map(|f| format!("; rollout flags from {}", f.display())).unwrap_or_default()
                    ),
                    StageSpec::Invoke(i) => format!(
                        "reserve a slot of every model's quota, call them in parallel ({} models: {:?}); each answer -> {} as it arrives; aggregate when ready or at the deadline",
                        i.model.len(),
                        i.model.iter().map(ModelSpec::id).collect::<Vec<_>>(),
                        i.partial_topic
                    ),
                    StageSpec::Persist(_) => "every model's output into `model_outputs`, then the result into `inference_results` (by position)".to_string(),
                    StageSpec::Publish(p) => format!("-> {} (InferenceResult), or -> {} (InferenceCompensation) when the saga failed; then release the reservations", p.topic, p.compensation_topic),
                };
                (stage.name().to_string(), detail)
            })
            .collect()
    }
}
