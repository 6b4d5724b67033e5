//! Publishing events of a bundled schema to one topic, for any stage of any
//! topology: the schema is registered under `<topic>-value` once, each event
//! is encoded in the Confluent wire format and sent with retries and the
//! log's breaker. A send returns once the broker acknowledged it.
//!
//! Events are serialised straight to Avro (`wire::encode_ser`, apache-avro's
//! schema-aware serde writer) rather than built as a `Value`, resolved and
//! then encoded: a tenth of the CPU per event (`per_record/event_encode_*`
//! in `benches/ingest.rs`), the same bytes (this module's tests compare them
//! for every event type the topologies publish).

use std::sync::Arc;

use apache_avro::writer::datum::GenericDatumWriter;
use serde::Serialize;

use crate::avro::{SchemaRegistry, Schemas, wire};
use crate::log::{LogError, LogProducer};
use crate::outcome::Fatal;
use crate::record::{Headers, OutgoingRecord, Position, Record};
use crate::resilience::{Attempted, Resilient};

pub struct Emitter {
    stage: String,
    producer: Arc<dyn LogProducer>,
    topic: String,
    /// Built once: the bundled schemas live for the whole process.
    writer: GenericDatumWriter<'static>,
    schema_id: u32,
    resilient: Resilient,
}

impl Emitter {
    /// Registers (or looks up) the current version of `schema_name` for `topic`.
    pub async fn new(
        stage: &str,
        producer: Arc<dyn LogProducer>,
        registry: &dyn SchemaRegistry,
        topic: &str,
        schema_name: &str,
        resilient: Resilient,
    ) -> Result<Self, Fatal> {
        let current = Schemas::current(schema_name).ok_or_else(|| Fatal::new(stage, format!("no bundled schema named `{schema_name}`")))?;
        let schema_id = registry
            .register(&Schemas::subject(topic), &current.schema)
            .await
            .map_err(|e| Fatal::new(stage, format!("registering {schema_name} for {topic}: {e}")))?;
        let writer = GenericDatumWriter::builder(current.schema.as_ref())
            .build()
            .map_err(|e| Fatal::new(stage, format!("the bundled {schema_name} schema: {e}")))?;
        Ok(Self { stage: stage.to_string(), producer, topic: topic.to_string(), writer, schema_id, resilient })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The event as a record of this topic, keyed by `key`, carrying the
    /// source record's `traceparent` header if it has one. An event that
    /// does not fit the schema is a bug, hence the `Fatal`.
    pub fn record<E: Serialize>(&self, event: &E, key: &str, source: Option<&Record>, partition: Option<i32>) -> Result<OutgoingRecord, Fatal> {
        let payload = wire::encode_ser(self.schema_id, &self.writer, event).map_err(|e| Fatal::new(&self.stage, format!("encoding an event for {}: {e}", self.topic)))?;
        let mut headers = Headers::new();
        if let Some(tp) = source.and_then(|r| r.headers.get("traceparent")) {
            headers.insert("traceparent", tp.to_vec());
        }
        Ok(OutgoingRecord { topic: self.topic.clone(), partition, key: Some(key.as_bytes().to_vec()), payload, headers, event_time_ms: None })
    }

    /// Hands `record` to the log now, without retries (see
    /// [`LogProducer::enqueue`]); `Err` gives it back, for [`send`](Self::send).
    pub fn enqueue(&self, record: OutgoingRecord) -> Result<futures::future::BoxFuture<'static, Result<Position, LogError>>, OutgoingRecord> {
        self.producer.enqueue(record)
    }

    /// Sends `record`, retrying as configured, until the broker acknowledges it.
    pub async fn send(&self, record: OutgoingRecord) -> Result<Position, Attempted<LogError>> {
        let producer = self.producer.as_ref();
        self.resilient.call(|| producer.send(record.clone())).await
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use apache_avro::Schema;
    use serde::de::DeserializeOwned;

    use super::*;
    use crate::atom::{ArrivalOutcome, AtomIngested};
    use crate::avro::{self, FileRegistry};
    use crate::clock::ManualClock;
    use crate::inference::{INFERENCE_STATUSES, InferenceCompensated, InferenceCompensation, InferenceResult, ModelOutput, ModelVote};
    use crate::log::embedded::EmbeddedLog;
    use crate::record::{Position, TopicPartition};
    use crate::resilience::{BreakerConfig, CircuitBreaker, RetryConfig};

    /// Every event encodes to the bytes the `to_value` + `resolve` +
    /// `wire::encode` path wrote, and reads back as itself.
    fn encodes_as_the_resolved_value<E: Serialize + DeserializeOwned + PartialEq + Debug>(name: &str, events: &[E]) {
        let schema: &Schema = &Schemas::current(name).unwrap().schema;
        let writer = GenericDatumWriter::builder(schema).build().unwrap();
        for e in events {
            let value = apache_avro::to_value(e).unwrap().resolve(schema).unwrap();
            let direct = wire::encode_ser(5, &writer, e).unwrap();
            assert_eq!(direct, wire::encode(5, schema, &value).unwrap(), "{name}: {e:?}");
            let back: E = apache_avro::from_value(&wire::decode(schema, schema, wire::split(&direct).unwrap().1).unwrap()).unwrap();
            assert_eq!(&back, e, "{name}");
        }
    }

    fn vote(model: &str, ok: bool) -> ModelVote {
        ModelVote {
            model_id: model.into(),
            output: ok.then(|| "positive ✓".into()),
            score: ok.then_some(-0.0),
            latency_ms: i64::MAX,
            error: (!ok).then(|| "timeout after 3 attempts".into()),
        }
    }

    fn result(status: &str, votes: Vec<ModelVote>, scored: bool) -> InferenceResult {
        InferenceResult {
            request_id: "r-1".into(),
            correlation_id: "c-ü".into(),
            status: status.into(),
            aggregation: "majority_vote".into(),
            output: scored.then(|| "positive".into()),
            score: scored.then_some(f64::MAX),
            model_outputs: votes,
            completed_at_ms: -1,
        }
    }

    #[test]
    fn inference_results_encode_as_the_resolved_value_did() {
        let mut events: Vec<_> = INFERENCE_STATUSES.iter().map(|s| result(s, vec![vote("a", true), vote("b", false)], true)).collect();
        events.push(result("PARTIAL", vec![], false));
        encodes_as_the_resolved_value(avro::INFERENCE_RESULT, &events);
    }

    #[test]
    fn a_status_that_is_no_symbol_is_refused() {
        let schema: &Schema = &Schemas::current(avro::INFERENCE_RESULT).unwrap().schema;
        let Schema::Record(record) = schema else { panic!("InferenceResult is a record") };
        let status = record.fields.iter().find(|f| f.name == "status").unwrap();
        let Schema::Enum(symbols) = &status.schema else { panic!("status is an enum") };
        assert_eq!(symbols.symbols, INFERENCE_STATUSES, "INFERENCE_STATUSES must list the schema's symbols in order");
        let writer = GenericDatumWriter::builder(schema).build().unwrap();
        let err = wire::encode_ser(5, &writer, &result("DONE", vec![], true)).unwrap_err();
        assert!(err.to_string().contains("`DONE` is not an InferenceStatus symbol"), "{err}");
    }

    #[test]
    fn model_outputs_encode_as_the_resolved_value_did() {
        let answered = ModelOutput {
            request_id: "r-1".into(),
            correlation_id: "c-1".into(),
            model_id: "sentiment".into(),
            model_version: "2026-11".into(),
            sequence: 0,
            label: Some("negative".into()),
            score: Some(0.25),
            error: None,
            latency_ms: 12,
            attempts: 2,
            hedged: true,
            coalesced: false,
            late: true,
            flags: vec!["canary=on".into(), "shadow=off".into()],
            answered_at_ms: 1_764_000_000_000,
        };
        let failed = ModelOutput { label: None, score: None, error: Some("HTTP 503".into()), flags: vec![], sequence: i32::MAX, hedged: false, coalesced: true, late: false, ..answered.clone() };
        encodes_as_the_resolved_value(avro::MODEL_OUTPUT, &[answered, failed]);
    }

    #[test]
    fn compensation_events_encode_as_the_resolved_value_did() {
        let compensation = InferenceCompensation {
            request_id: "r-2".into(),
            correlation_id: "c-2".into(),
            failed_step: "store_result".into(),
            reason_code: "store.unavailable".into(),
            reason: "ClickHouse refused the insert".into(),
            done_steps: vec!["reserve".into(), "invoke".into()],
            models: vec![],
            reservations: 3,
            source_topic: "inference.requests".into(),
            source_partition: 1,
            source_offset: 42,
            failed_at_ms: 7,
        };
        encodes_as_the_resolved_value(avro::INFERENCE_COMPENSATION, &[compensation.clone(), InferenceCompensation { done_steps: vec![], models: vec!["a".into()], ..compensation }]);
        let compensated = InferenceCompensated {
            request_id: "r-2".into(),
            correlation_id: "c-2".into(),
            failed_step: "invoke".into(),
            reason_code: "quorum.missed".into(),
            reason: "1 of 3 models answered; 2 needed".into(),
            undone_steps: vec!["retract_outputs".into(), "release_reservations".into()],
            retracted_outputs: 1,
            retracted_result: false,
            released_reservations: 3,
            source_topic: "inference.requests".into(),
            source_partition: 0,
            source_offset: i64::MAX,
            compensated_at_ms: 9,
        };
        encodes_as_the_resolved_value(avro::INFERENCE_COMPENSATED, &[compensated.clone(), InferenceCompensated { undone_steps: vec![], retracted_result: true, ..compensated }]);
    }

    #[test]
    fn atom_events_encode_as_the_resolved_value_did() {
        let created = AtomIngested {
            content_hash: "ab".repeat(32),
            content_type: "text/plain".into(),
            content_size: 1_048_576,
            source_system: "crm ünïcode".into(),
            correlation_id: String::new(),
            embedding_model: "hashing-v1-d384".into(),
            embedding_dimension: 384,
            source_topic: "atoms.ingest".into(),
            source_partition: 2,
            source_offset: i64::MAX,
            ingested_at_ms: -1,
            outcome: ArrivalOutcome::Created,
        };
        let matched = AtomIngested { outcome: ArrivalOutcome::Matched, embedding_model: String::new(), embedding_dimension: 0, ..created.clone() };
        encodes_as_the_resolved_value(avro::ATOM_INGESTED, &[created, matched]);
    }

    /// The emitter frames with the id the registry gave the topic's subject
    /// and carries the source's `traceparent`; an event that does not fit is
    /// a fatal error of the emitter's stage.
    #[tokio::test]
    async fn records_carry_the_registered_id_and_the_trace() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000).shared();
        let log = EmbeddedLog::new(clock.clone());
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        let resilient = Resilient::new(RetryConfig::default(), Arc::new(CircuitBreaker::new("t", BreakerConfig::default())), clock);
        let emitter = Emitter::new("publish", Arc::new(log.producer()), &registry, "inference.results", avro::INFERENCE_RESULT, resilient).await.unwrap();
        let schema = &Schemas::current(avro::INFERENCE_RESULT).unwrap().schema;
        let id = registry.register(&Schemas::subject("inference.results"), schema).await.unwrap();
        let mut headers = Headers::new();
        headers.insert("traceparent", b"00-abc-def-01".to_vec());
        let source = Record { position: Position { tp: TopicPartition::new("inference.requests", 0), offset: 3 }, key: None, payload: Vec::new(), headers, event_time_ms: 0 };
        let out = emitter.record(&result("COMPLETE", vec![], true), "c-1", Some(&source), Some(2)).unwrap();
        assert_eq!(wire::split(&out.payload).unwrap().0, id);
        assert_eq!((out.topic.as_str(), out.partition, out.key.as_deref()), ("inference.results", Some(2), Some(&b"c-1"[..])));
        assert_eq!(out.headers.get("traceparent"), Some(&b"00-abc-def-01"[..]));
        let err = emitter.record(&result("DONE", vec![], true), "c-1", None, None).unwrap_err();
        assert_eq!(err.stage, "publish");
    }
}
