//! Stage 7: answer every accepted request on the output topic
//! (`AtomIngested` v2, Confluent wire format): `created` for the request that
//! stored an atom, `matched` for a repeat. The stage waits for the broker's
//! acknowledgement of every event of the window before the window's offsets
//! can be marked done, so a committed source offset always has its event.
//! After a crash before that, the request is redelivered and the dedup stage
//! decides the same answer again (see `dedup.rs`): an event may repeat, but
//! none is lost.
use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::atom::AtomIngested;
use crate::avro::{SchemaRegistry, Schemas, wire};
use crate::failpoint;
use crate::flow::{Item, Metrics, Stage};
use crate::log::LogProducer;
use crate::outcome::{ErrorClass, Fatal, Outcome, Rejection};
use crate::record::{Headers, OutgoingRecord};
use crate::resilience::{Attempted, Resilient};

pub struct Publish {
    pub producer: Arc<dyn LogProducer>,
    pub topic: String,
    pub schema: Arc<Schema>,
    pub schema_id: u32,
    pub resilient: Resilient,
    pub metrics: Arc<Metrics>,
}

impl Publish {
    /// Registers (or looks up) the event schema under `<topic>-value`.
    pub async fn new(
        producer: Arc<dyn LogProducer>,
        registry: &dyn SchemaRegistry,
        topic: &str,
        schema_name: &str,
        resilient: Resilient,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Fatal> {
        let current = Schemas::current(schema_name).ok_or_else(|| Fatal::new("publish", format!("no bundled schema named `{schema_name}`")))?;
        let schema = current.schema.clone();
        let schema_id = registry
            .register(&Schemas::subject(topic), &schema)
            .await
            .map_err(|e| Fatal::new("publish", format!("registering {schema_name} for {topic}: {e}")))?;
        Ok(Self { producer, topic: topic.to_string(), schema, schema_id, resilient, metrics })
    }
}

impl Stage for Publish {
    type In = AtomIngested;
    type Out = ();

    async fn process(&mut self, items: Vec<Item<AtomIngested>>) -> Result<Vec<Outcome<()>>, Fatal> {
        // Events are serialised straight to Avro (`wire::encode_ser`): a
        // tenth of the CPU of building and resolving a `Value` per event.
        let writer = GenericDatumWriter::builder(&self.schema)
            .build()
            .map_err(|e| Fatal::new("publish", format!("the AtomIngested schema: {e}")))?;
        let mut sends = Vec::with_capacity(items.len());
        for item in &items {
            let payload = wire::encode_ser(self.schema_id, &writer, &item.value).map_err(|e| Fatal::new("publish", format!("encoding AtomIngested: {e}")))?;
            let mut headers = Headers::new();
            if let Some(tp) = item.record.headers.get("traceparent") {
                headers.insert("traceparent", tp.to_vec());
            }
            let out = OutgoingRecord {
                topic: self.topic.clone(),
                partition: None,
                key: Some(item.value.content_hash.clone().into_bytes()),
                payload,
                headers,
                event_time_ms: Some(item.value.ingested_at_ms),
            };
            let (producer, resilient) = (self.producer.as_ref(), &self.resilient);
            sends.push(async move { resilient.call(|| producer.send(out.clone())).await });
        }
        let mut outcomes = Vec::with_capacity(items.len());
        for result in futures::future::join_all(sends).await {
            outcomes.push(match result {
                Ok(_) => {
                    self.metrics.count(super::counters::EVENTS_PUBLISHED, 1);
                    Outcome::Continue(())
                }
                Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => {
                    Outcome::Invalid(Rejection::new("publish.rejected", error.to_string()).with_attempts(attempts))
                }
                Err(e) => return Err(Fatal::new("publish", e.to_string())),
            });
        }
        if !outcomes.is_empty() {
            failpoint::hit("publish.after_ack");
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atom::ArrivalOutcome;

    fn event(outcome: ArrivalOutcome, model: &str, dimension: i32) -> AtomIngested {
        AtomIngested {
            content_hash: "ab".repeat(32),
            content_type: "text/plain".into(),
            content_size: 1_048_576,
            source_system: "crm ünïcode".into(),
            correlation_id: String::new(),
            embedding_model: model.into(),
            embedding_dimension: dimension,
            source_topic: "atoms.ingest".into(),
            source_partition: 2,
            source_offset: i64::MAX,
            ingested_at_ms: -1,
            outcome,
        }
    }

    /// The direct encoding is what the `Value` path wrote, byte for byte,
    /// and reads back as the same event under the bundled schema.
    #[test]
    fn events_encode_as_the_resolved_value_did() {
        let schema = Schemas::current("AtomIngested").unwrap().schema.clone();
        let writer = GenericDatumWriter::builder(&schema).build().unwrap();
        for e in [event(ArrivalOutcome::Created, "hashing-v1-d384", 384), event(ArrivalOutcome::Matched, "", 0)] {
            let value = apache_avro::to_value(&e).unwrap().resolve(&schema).unwrap();
            let direct = wire::encode_ser(3, &writer, &e).unwrap();
            assert_eq!(direct, wire::encode(3, &schema, &value).unwrap(), "{e:?}");
            let (id, body) = wire::split(&direct).unwrap();
            assert_eq!(id, 3);
            let back: AtomIngested = apache_avro::from_value(&wire::decode(&schema, &schema, body).unwrap()).unwrap();
            assert_eq!(back, e);
        }
    }
}
