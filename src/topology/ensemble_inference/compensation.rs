//! The compensation consumer: its own topology (`inference-compensation`),
//! reading the `InferenceCompensation` events the ensemble-inference
//! topology publishes for every request whose saga failed. One event's
//! path: [`decode`](crate::topology::decode) → [`Retract`] → [`Announce`].
//! Step 0 (`requested`) is written by ensemble-inference before it publishes
//! the event; this consumer writes steps 1 to 3.
//!
//! - **retract**: writes the retraction of the request's result and of every
//!   model's output (`deleted = 1`, version 2; see `crate::inference::LIVE`),
//!   then records step 1 (`retracted`) in `inference_compensations`.
//!   Retracting twice writes the same rows again, so a crash before step 1
//!   is recorded only repeats it.
//! - **announce**: publishes `InferenceCompensated` exactly once per request,
//!   without broker transactions. Before sending, it records step 2
//!   (`announcing`) with the output partition and its end offset; after the
//!   acknowledgement, step 3 (`announced`). A redelivered event whose
//!   request is at step 3 is done; at step 2, the consumer reads the
//!   partition from the recorded offset and sends only if its announcement
//!   is not there. The partition is fixed (the event's own partition, modulo
//!   the output topic's), so the search is one partition.
//!
//! The quota slots of a failed request were released when its calls ended
//! (see `invoke`); the announcement reports how many it held. Everything
//! the announcement says comes from the compensation event and the first
//! recorded step, so a resumed compensation announces the same thing.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::persist::STEPS;
use crate::atom::SourcePosition;
use crate::avro::Decoder;
use crate::clock::SharedClock;
use crate::config::ConfigError;
use crate::failpoint;
use crate::flow::stage::{self, StageContext};
use crate::flow::{Counter, Item, Metrics, Stage};
use crate::inference::{CompensationRow, CompensationStep, InferenceCompensated, InferenceCompensation};
use crate::log::LogScan;
use crate::outcome::{ErrorClass, Fatal, Outcome, Rejection};
use crate::record::TopicPartition;
use crate::resilience::{Attempted, BreakerConfig, Resilient, RetryConfig};
use crate::store::InferenceStore;
use crate::topology::emit::Emitter;
use crate::topology::spec::{StageRule, TopologySpec};
use crate::topology::{Deps, Pipeline, Summary, Topology};

pub const RETRACTED: Counter = Counter::new("retract", "requests_retracted");
pub const OUTPUT_ROWS_RETRACTED: Counter = Counter::new("retract", "output_rows_retracted");
pub const RESULT_ROWS_RETRACTED: Counter = Counter::new("retract", "result_rows_retracted");
pub const ANNOUNCED: Counter = Counter::new("announce", "announced");
pub const ALREADY_ANNOUNCED: Counter = Counter::new("announce", "already_announced");
pub const FOUND_AFTER_CRASH: Counter = Counter::new("announce", "found_after_a_crash");

#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum StageSpec {
    Decode(EmptySpec),
    Retract(RetractSpec),
    Announce(AnnounceSpec),
}

#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmptySpec {}

#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetractSpec {
    pub retry: RetryConfig,
}

impl Default for RetractSpec {
    fn default() -> Self {
        Self { retry: RetryConfig::forever() }
    }
}

#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnnounceSpec {
    /// Where `InferenceCompensated` goes.
    pub topic: String,
    #[serde(default = "RetryConfig::forever")]
    pub retry: RetryConfig,
}


pub const RULES: &[StageRule] =
    &[StageRule { name: "decode", required: true }, StageRule { name: "retract", required: true }, StageRule { name: "announce", required: true }];

fn stages(spec: &TopologySpec) -> Result<(RetractSpec, AnnounceSpec), ConfigError> {
    let stages: Vec<StageSpec> = spec.typed_stages()?;
    let retract = stages.iter().find_map(|s| if let StageSpec::Retract(r) = s { Some(r.clone()) } else { None }).unwrap_or_default();
    let announce = stages
        .iter()
        .find_map(|s| if let StageSpec::Announce(a) = s { Some(a.clone()) } else { None })
        .ok_or_else(|| spec.invalid("stage", "no announce stage; add `[[stage]] name = \"announce\"` with its topic"))?;
    Ok((retract, announce))
}

/// The compensation consumer as a topology.
pub struct CompensationConsumer;

/// The topology's registry entry.
pub static TOPOLOGY: CompensationConsumer = CompensationConsumer;

impl Topology for CompensationConsumer {
    fn name(&self) -> &'static str {
        "inference-compensation"
    }

    fn declaration(&self) -> &'static str {
        include_str!("../../../topologies/inference-compensation.toml")
    }

    fn stage_rules(&self) -> &'static [StageRule] {
        RULES
    }

    fn check(&self, spec: &TopologySpec) -> Result<(), ConfigError> {
        let (retract, announce) = stages(spec)?;
        let i = spec.stages.len().saturating_sub(1);
        if announce.topic == spec.source.topic || announce.topic == spec.dead_letter.topic {
            return Err(spec.invalid(&format!("{}.topic", spec.stage_field(i)), "must differ from source.topic and dead_letter.topic"));
        }
        retract.retry.check().map_err(|e| spec.invalid(&format!("{}.retry", spec.stage_field(1)), e))?;
        announce.retry.check().map_err(|e| spec.invalid(&format!("{}.retry", spec.stage_field(i)), e))
    }

    fn describe(&self, spec: &TopologySpec) -> Result<Vec<(String, String)>, ConfigError> {
        let (_, announce) = stages(spec)?;
        Ok(vec![
            ("decode".into(), format!("Confluent wire format (or JSON by content-type header) -> {}", spec.source.schema)),
            ("retract".into(), "retract the request's result and model outputs (deleted = 1, version 2), record step 1".into()),
            ("announce".into(), format!("-> {} (InferenceCompensated), exactly once: step 2 with the partition's end offset, send, step 3", announce.topic)),
        ])
    }

    fn outputs(&self, spec: &TopologySpec) -> Vec<(String, String)> {
        stages(spec).map(|(_, a)| vec![(a.topic, crate::avro::INFERENCE_COMPENSATED.to_string())]).unwrap_or_default()
    }

    fn build<'a>(&'a self, spec: &'a TopologySpec, deps: &'a Deps, ctx: &'a StageContext) -> BoxFuture<'a, Result<Pipeline, Fatal>> {
        Box::pin(async move {
            let (retract, announce) = stages(spec).map_err(|e| Fatal::new("topology", e.to_string()))?;
            let store_breaker = deps.breakers.breaker("store", BreakerConfig::default());
            let log_breaker = deps.breakers.breaker("log", BreakerConfig::default());
            let (head, rx) = ctx.edge::<()>();
            let reader = crate::avro::Schemas::current(&spec.source.schema)
                .ok_or_else(|| Fatal::new("decode", format!("no bundled schema named `{}`", spec.source.schema)))?;
            let decode = crate::topology::decode::Decode::<InferenceCompensation>::new(deps.registry.clone(), reader.schema.clone(), deps.clock.clone());
            deps.breakers.register(decode.breaker());
            let rx = stage::spawn("decode", decode, rx, ctx);
            let retract = Retract {
                store: deps.inference.clone(),
                resilient: Resilient::new(retract.retry.clone(), store_breaker.clone(), deps.clock.clone()),
                metrics: deps.metrics.clone(),
                clock: deps.clock.clone(),
            };
            let rx = stage::spawn("retract", retract, rx, ctx);
            let emitter = Emitter::new("announce", deps.producer.clone(), deps.registry.as_ref(), &announce.topic, crate::avro::INFERENCE_COMPENSATED, Resilient::new(announce.retry.clone(), log_breaker.clone(), deps.clock.clone())).await?;
            let announced = crate::avro::Schemas::current(crate::avro::INFERENCE_COMPENSATED).expect("bundled").schema.clone();
            let announce = Announce {
                emitter,
                store: deps.inference.clone(),
                scan: deps.scan.clone(),
                decoder: Decoder::new(deps.registry.clone(), announced),
                resilient: Resilient::new(RetryConfig::forever(), store_breaker, deps.clock.clone()),
                metrics: deps.metrics.clone(),
            };
            let tail = stage::spawn("announce", announce, rx, ctx);
            Ok(Pipeline { head, tail })
        })
    }

    fn summarize(&self, s: &Summary) -> Vec<String> {
        vec![
            format!("requests retracted    {:>8}  ({} output rows, {} result rows were live)", s.count(RETRACTED), s.count(OUTPUT_ROWS_RETRACTED), s.count(RESULT_ROWS_RETRACTED)),
            format!("announced             {:>8}  (InferenceCompensated published)", s.count(ANNOUNCED)),
            format!("already announced     {:>8}  ({} found on the topic after a crash)", s.count(ALREADY_ANNOUNCED), s.count(FOUND_AFTER_CRASH)),
        ]
    }
}

/// An event with where its compensation stands.
pub struct Compensating {
    pub event: InferenceCompensation,
    pub state: CompensationRow,
}

/// Step 1 of `event`: what its retraction undid, from the event alone (so a
/// retraction repeated after a crash reports the same), and when, in the
/// trace `trace_id` (the compensation record's).
fn retracted(event: &InferenceCompensation, at_ms: i64, trace_id: &str) -> CompensationRow {
    CompensationRow {
        retracted_outputs: if event.done_steps.iter().any(|s| s == "persist_outputs") { event.models.len() as u32 } else { 0 },
        retracted_result: event.done_steps.iter().any(|s| s == "persist_result") as u8,
        updated_at_ms: at_ms.max(0) as u64,
        ..CompensationRow::of(event, CompensationStep::Retracted, trace_id)
    }
}

pub struct Retract {
    store: Arc<dyn InferenceStore>,
    resilient: Resilient,
    metrics: Arc<Metrics>,
    clock: SharedClock,
}

async fn stored<F, Fut, T>(resilient: &Resilient, stage: &str, op: F) -> Result<T, Fatal>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
{
    resilient.call(op).await.map_err(|e| Fatal::new(stage, e.to_string()))
}

impl Stage for Retract {
    type In = InferenceCompensation;
    type Out = Compensating;

    async fn process(&mut self, items: Vec<Item<InferenceCompensation>>) -> Result<Vec<Outcome<Compensating>>, Fatal> {
        let store = self.store.clone();
        let positions: Vec<SourcePosition> = items.iter().map(|i| i.value.position()).collect();
        let mut known = stored(&self.resilient, "retract", || store.compensations(&positions)).await?;
        let now = self.clock.now_ms();
        let mut fresh = Vec::new();
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let trace = crate::trace::trace_id(item.record.headers.get_str("traceparent"));
            let e = item.value;
            // Step 0 is ensemble-inference's own record: still to retract.
            let state = match known.get(&e.position()).filter(|s| s.step() != Some(CompensationStep::Requested)) {
                Some(s) => s.clone(),
                None => {
                    let p = e.position();
                    let r = stored(&self.resilient, "retract", || store.retract(&p, &e.correlation_id, &e.models, &trace)).await?;
                    self.metrics.count(RETRACTED, 1);
                    self.metrics.count(OUTPUT_ROWS_RETRACTED, r.outputs as u64);
                    self.metrics.count(RESULT_ROWS_RETRACTED, r.result as u64);
                    let s = retracted(&e, now, &trace);
                    fresh.push(s.clone());
                    // The same event twice in one window is retracted once.
                    known.insert(p, s.clone());
                    s
                }
            };
            out.push(Outcome::Continue(Compensating { event: e, state }));
        }
        stored(&self.resilient, "retract", || store.record_compensations(&fresh)).await?;
        Ok(out)
    }
}

pub struct Announce {
    emitter: Emitter,
    store: Arc<dyn InferenceStore>,
    scan: Arc<dyn LogScan>,
    decoder: Decoder,
    resilient: Resilient,
    metrics: Arc<Metrics>,
}

fn announcement(c: &Compensating) -> InferenceCompensated {
    let e = &c.event;
    let compensation_of = |step: &str| STEPS.iter().find(|(s, _)| *s == step).map(|(_, undo)| *undo).unwrap_or("none");
    InferenceCompensated {
        request_id: e.request_id.clone(),
        correlation_id: e.correlation_id.clone(),
        failed_step: e.failed_step.clone(),
        reason_code: e.reason_code.clone(),
        reason: e.reason.clone(),
        undone_steps: e.done_steps.iter().rev().map(|s| compensation_of(s)).filter(|u| *u != "none").map(String::from).collect(),
        retracted_outputs: c.state.retracted_outputs as i32,
        retracted_result: c.state.retracted_result != 0,
        released_reservations: e.reservations,
        source_topic: e.source_topic.clone(),
        source_partition: e.source_partition,
        source_offset: e.source_offset,
        compensated_at_ms: c.state.updated_at_ms as i64,
    }
}

impl Announce {
    /// The requests whose announcement is on `tp` at or after `from`: one
    /// read of the partition for every request of the window that a crash
    /// left at step 2 there.
    async fn announced_on(&self, tp: &TopicPartition, from: i64) -> Result<std::collections::HashSet<SourcePosition>, Fatal> {
        let scan = self.scan.clone();
        let records = self.resilient.call(|| scan.read_from(tp, from)).await.map_err(|e| Fatal::new("announce", format!("reading {tp} back: {e}")))?;
        let mut found = std::collections::HashSet::new();
        for r in records {
            // Anything that is not an announcement is not ours: skip it.
            let Ok((_, value)) = self.decoder.decode(&r.payload).await else { continue };
            let Ok(sent) = crate::topology::decode::to_typed::<InferenceCompensated>(&value) else { continue };
            found.insert(SourcePosition::new(sent.source_topic, sent.source_partition, sent.source_offset));
        }
        Ok(found)
    }
}

impl Stage for Announce {
    type In = Compensating;
    type Out = ();

    async fn process(&mut self, mut items: Vec<Item<Compensating>>) -> Result<Vec<Outcome<()>>, Fatal> {
        let store = self.store.clone();
        let scan = self.scan.clone();
        // Where each request stands now. Retract read its state while the
        // previous window was still being announced, so a request that event
        // carried twice (the inference processor republishes a compensation
        // it recalls after a crash) may have been announced since. Announce
        // is the only writer of steps 2 and 3 and runs one window at a time,
        // so this read is the truth.
        let positions: Vec<SourcePosition> = items.iter().map(|i| i.value.event.position()).collect();
        let current = stored(&self.resilient, "announce", || store.compensations(&positions)).await?;
        for item in &mut items {
            if let Some(now) = current.get(&item.value.event.position()).filter(|now| now.step > item.value.state.step) {
                item.value.state = now.clone();
            }
        }
        let topic = self.emitter.topic().to_string();
        let partitions = self.resilient.call(|| scan.partitions(&topic)).await.map_err(|e| Fatal::new("announce", e.to_string()))?;
        let mut done = Vec::new();
        let mut to_send: Vec<(usize, TopicPartition)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // Requests a crash left at step 2: read each partition they recorded
        // once, from the lowest recorded offset.
        let mut resume_from: HashMap<i32, i64> = HashMap::new();
        for item in &items {
            if item.value.state.step() == Some(CompensationStep::Announcing) {
                let from = resume_from.entry(item.value.state.announce_partition).or_insert(i64::MAX);
                *from = (*from).min(item.value.state.announce_offset);
            }
        }
        let mut found_after_crash = std::collections::HashSet::new();
        for (partition, from) in resume_from {
            found_after_crash.extend(self.announced_on(&TopicPartition::new(topic.as_str(), partition), from).await?);
        }
        for (i, item) in items.iter().enumerate() {
            let c = &item.value;
            let tp = TopicPartition::new(topic.as_str(), item.record.position.tp.partition.rem_euclid(partitions));
            if !seen.insert(c.event.position()) {
                // The same request earlier in this window: announced once.
                self.metrics.count(ALREADY_ANNOUNCED, 1);
                continue;
            }
            match c.state.step() {
                Some(CompensationStep::Announced) => self.metrics.count(ALREADY_ANNOUNCED, 1),
                Some(CompensationStep::Announcing) if found_after_crash.contains(&c.event.position()) => {
                    self.metrics.count(ALREADY_ANNOUNCED, 1);
                    self.metrics.count(FOUND_AFTER_CRASH, 1);
                    done.push(c.state.at(CompensationStep::Announced));
                }
                _ => to_send.push((i, tp)),
            }
        }
        // Step 2 for every request about to be announced, with where to look.
        let mut ends: HashMap<TopicPartition, i64> = HashMap::new();
        let mut announcing = Vec::with_capacity(to_send.len());
        for (i, tp) in &to_send {
            if !ends.contains_key(tp) {
                let end = self.resilient.call(|| scan.end_offset(tp)).await.map_err(|e| Fatal::new("announce", e.to_string()))?;
                ends.insert(tp.clone(), end);
            }
            let state = &items[*i].value.state;
            announcing.push(CompensationRow { announce_partition: tp.partition, announce_offset: ends[tp], ..state.at(CompensationStep::Announcing) });
        }
        stored(&self.resilient, "announce", || store.record_compensations(&announcing)).await?;
        if !announcing.is_empty() {
            failpoint::hit("announce.before_send");
        }
        let mut sends = Vec::with_capacity(to_send.len());
        for (i, tp) in &to_send {
            let item = &items[*i];
            let event = announcement(&item.value);
            let record = self.emitter.record(&event, &event.correlation_id, Some(&item.record), Some(tp.partition))?;
            sends.push(self.emitter.send(record));
        }
        let mut outcomes: Vec<Outcome<()>> = items.iter().map(|_| Outcome::Continue(())).collect();
        for ((result, state), (i, _)) in futures::future::join_all(sends).await.into_iter().zip(&announcing).zip(&to_send) {
            match result {
                Ok(_) => {
                    self.metrics.count(ANNOUNCED, 1);
                    done.push(state.at(CompensationStep::Announced));
                }
                // A refused announcement stays at step 2 and its event is
                // dead-lettered; a replay looks for it again before sending.
                Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => {
                    outcomes[*i] = Outcome::Invalid(
                        Rejection::new("announce.rejected", format!("InferenceCompensated was refused by the broker: {error}")).with_attempts(attempts),
                    );
                }
                Err(e) => return Err(Fatal::new("announce", format!("publishing to {topic}: {e}"))),
            }
        }
        if !to_send.is_empty() {
            failpoint::hit("announce.after_send");
        }
        stored(&self.resilient, "announce", || store.record_compensations(&done)).await?;
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::FileRegistry;
    use crate::clock::ManualClock;
    use crate::flow::Stage;
    use crate::log::embedded::EmbeddedLog;
    use crate::record::{Headers, Position, Record};
    use crate::resilience::CircuitBreaker;
    use crate::store::embedded::EmbeddedStore;

    const OUT: &str = "inference.compensated";

    fn event(request: &str, offset: i64) -> InferenceCompensation {
        InferenceCompensation {
            request_id: request.into(),
            correlation_id: format!("c-{request}"),
            failed_step: "aggregate".into(),
            reason_code: "aggregate.no_result".into(),
            reason: "no quorum".into(),
            done_steps: vec!["reserve".into(), "invoke".into()],
            models: vec!["a".into(), "b".into()],
            reservations: 2,
            source_topic: "inference.requests".into(),
            source_partition: 0,
            source_offset: offset,
            failed_at_ms: 1_000,
        }
    }

    fn item(event: &InferenceCompensation, state: CompensationRow, offset: i64) -> Item<Compensating> {
        let record = Record { position: Position { tp: TopicPartition::new("inference.compensations", 0), offset }, key: None, payload: Vec::new(), headers: Headers::new(), event_time_ms: 0 };
        Item { record: Arc::new(record), value: Compensating { event: event.clone(), state } }
    }

    /// Retract hands announce the state it read, which may be older than
    /// the store's by the time announce runs: the same request's event in an
    /// earlier window was announced in between. Announce goes by the store.
    #[tokio::test]
    async fn a_request_announced_since_retract_read_it_is_not_announced_again() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000).shared();
        let log = EmbeddedLog::new(clock.clone());
        log.create_topic(OUT, 1);
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let registry: Arc<dyn crate::avro::SchemaRegistry> = Arc::new(FileRegistry::open(dir.path().join("registry.json")).unwrap());
        let resilient = || Resilient::new(RetryConfig::forever(), Arc::new(CircuitBreaker::new("t", BreakerConfig::default())), clock.clone());
        let emitter = Emitter::new("announce", Arc::new(log.producer()), registry.as_ref(), OUT, crate::avro::INFERENCE_COMPENSATED, resilient()).await.unwrap();
        let announced = crate::avro::Schemas::current(crate::avro::INFERENCE_COMPENSATED).unwrap().schema.clone();
        let metrics = Arc::new(Metrics::new("inference-compensation"));
        let mut announce = Announce { emitter, store: store.clone(), scan: Arc::new(log.clone()), decoder: Decoder::new(registry, announced), resilient: resilient(), metrics: metrics.clone() };

        let (once, twice) = (event("r1", 7), event("r2", 8));
        let stale = |e: &InferenceCompensation| retracted(e, 1_000, "");
        // Window 1 announces both; window 2 carries r1 again with the state
        // retract read before window 1 was announced, and r2 at step 2 as a
        // crash would have left it.
        announce.process(vec![item(&once, stale(&once), 0), item(&twice, stale(&twice), 1)]).await.unwrap();
        assert_eq!(log.records(OUT).len(), 2);
        let at_step_2 = CompensationRow { announce_partition: 0, announce_offset: 0, ..stale(&twice).at(CompensationStep::Announcing) };
        announce.process(vec![item(&once, stale(&once), 2), item(&twice, at_step_2, 3)]).await.unwrap();
        assert_eq!(log.records(OUT).len(), 2, "nothing announced twice");
        assert_eq!(metrics.value(ANNOUNCED), 2);
        assert_eq!(metrics.value(ALREADY_ANNOUNCED), 2);
        let states = store.compensations(&[once.position(), twice.position()]).await.unwrap();
        assert!(states.values().all(|s| s.step() == Some(CompensationStep::Announced)), "{states:?}");
    }
}
