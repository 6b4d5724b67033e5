//! Stage 3: which models a request asks, how their answers are combined,
//! and how long they have. A request names its models (`model_ids`) or a configured
//! ensemble (`ensemble`, whose rollout flags may add a model for a sticky
//! share of correlation ids); its own `aggregation`, `quorum` and `weights`
//! override the ensemble's. A request that names an unknown model or
//! ensemble, no model at all, a strategy without what it needs, or a
//! deadline out of range is dead-lettered with the reason (`plan.*`).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::aggregate::Strategy;
use super::call::Invoker;
use super::rollout::Flags;
use super::spec::{EnsembleSpec, PlanSpec, strategy};
use crate::flow::{Item, Stage};
use crate::inference::InferenceRequest;
use crate::outcome::{Fatal, Outcome, Rejection};

/// A request with everything the invoke stage needs.
#[derive(Clone)]
pub struct Planned {
    pub request: InferenceRequest,
    /// The models to ask, in ensemble order (the first listed wins ties).
    pub models: Vec<Arc<Invoker>>,
    pub strategy: Strategy,
    /// How long the models have, from when the calls start (after the
    /// quota is reserved, so waiting for a slot never eats into it).
    pub timeout_ms: i64,
    /// The ensemble's name, or "" for a request that listed its models.
    pub ensemble: String,
    /// Rollout flag states for this request (`name=on|off`).
    pub flags: Vec<String>,
}

pub struct Plan {
    pub spec: PlanSpec,
    pub invokers: BTreeMap<String, Arc<Invoker>>,
    pub flags: Option<Arc<Flags>>,
}

impl Plan {
    fn ensemble(&self, name: &str) -> Option<&EnsembleSpec> {
        self.spec.ensemble.iter().find(|e| e.name == name)
    }

    pub fn plan(&self, request: InferenceRequest) -> Result<Planned, Rejection> {
        let ensemble = match &request.ensemble {
            Some(name) => Some(self.ensemble(name).ok_or_else(|| {
                let known: Vec<&str> = self.spec.ensemble.iter().map(|e| e.name.as_str()).collect();
                Rejection::new("plan.unknown_ensemble", format!("ensemble `{name}` is not configured; known: {known:?}"))
            })?),
            None => None,
        };
        let mut flags = Vec::new();
        let mut ids: Vec<String> = if !request.model_ids.is_empty() {
            request.model_ids.clone()
        } else if let Some(e) = ensemble {
            let mut ids = e.models.clone();
            if let Some(f) = &self.flags {
                let (joining, states) = f.current().joining(&e.name, &request.correlation_id);
                ids.extend(joining);
                flags = states;
            }
            ids
        } else {
            return Err(Rejection::new("plan.no_models", "the request lists no model_ids and names no ensemble; give one of them"));
        };
        let mut seen = std::collections::HashSet::new();
        ids.retain(|m| seen.insert(m.clone()));
        let mut models = Vec::with_capacity(ids.len());
        for id in &ids {
            match self.invokers.get(id) {
                Some(i) => models.push(i.clone()),
                None => {
                    let known: Vec<&String> = self.invokers.keys().collect();
                    return Err(Rejection::new("plan.unknown_model", format!("model `{id}` is not configured; known: {known:?}")));
                }
            }
        }
        let symbol = request.aggregation.clone().or_else(|| ensemble.map(|e| e.strategy.clone())).ok_or_else(|| {
            Rejection::new("plan.no_strategy", "the request gives no aggregation and names no ensemble to take one from")
        })?;
        let quorum = request.quorum.map(|k| k.max(0) as usize).or_else(|| ensemble.and_then(|e| e.quorum));
        let mut weights = ensemble.map(|e| e.weights.clone()).unwrap_or_default();
        weights.extend(request.weights.iter().map(|(k, v)| (k.clone(), *v)));
        if let Some((m, w)) = weights.iter().find(|(_, w)| !w.is_finite() || **w < 0.0) {
            return Err(Rejection::new("plan.bad_weight", format!("weight of `{m}` is {w}; weights must be finite and not negative")));
        }
        let strategy = strategy(&symbol, quorum, &weights).map_err(|e| Rejection::new("plan.bad_strategy", e))?;
        if let Strategy::Quorum(k) = strategy
            && k > models.len()
        {
            return Err(Rejection::new("plan.bad_strategy", format!("quorum {k} is more than the {} models asked", models.len())));
        }
        let timeout = match request.timeout_ms {
            None => self.spec.default_timeout_ms as i64,
            Some(t) if t >= 1 && t as u64 <= self.spec.max_timeout_ms => t,
            Some(t) => {
                return Err(Rejection::new(
                    "plan.bad_deadline",
                    format!("timeout_ms is {t}; use 1 to {} (max_timeout_ms), or null for the default", self.spec.max_timeout_ms),
                ));
            }
        };
        let ensemble = ensemble.map(|e| e.name.clone()).unwrap_or_default();
        Ok(Planned { request, models, strategy, timeout_ms: timeout, ensemble, flags })
    }
}

impl Stage for Plan {
    type In = InferenceRequest;
    type Out = Planned;

    async fn process(&mut self, items: Vec<Item<InferenceRequest>>) -> Result<Vec<Outcome<Planned>>, Fatal> {
        if let Some(f) = &self.flags {
            f.refresh();
        }
        Ok(items
            .into_iter()
            .map(|item| match self.plan(item.value) {
                Ok(p) => Outcome::Continue(p),
                Err(r) => Outcome::Invalid(r),
            })
            .collect())
    }
}
