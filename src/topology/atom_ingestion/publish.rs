//! Stage 7: announce each newly stored atom on the output topic
//! (`AtomIngested`, Confluent wire format). The stage waits for the broker's
//! acknowledgement, so a committed source offset always has its event.

use std::sync::Arc;

use apache_avro::Schema;

use crate::atom::{AtomIngested, AtomRow};
use crate::avro::{SchemaRegistry, Schemas, wire};
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

    pub fn event(row: &AtomRow) -> AtomIngested {
        AtomIngested {
            content_hash: row.content_hash.to_hex(),
            content_type: row.content_type.clone(),
            content_size: row.content.len() as i64,
            source_system: row.source_system.clone(),
            correlation_id: row.correlation_id.clone(),
            embedding_model: row.embedding_model.clone(),
            embedding_dimension: row.embedding.len() as i32,
            source_topic: row.source_topic.clone(),
            source_partition: row.source_partition,
            source_offset: row.source_offset,
            ingested_at_ms: row.ingested_at_ms,
        }
    }

    fn encode(&self, row: &AtomRow) -> Result<Vec<u8>, String> {
        let value = apache_avro::to_value(Self::event(row)).map_err(|e| e.to_string())?;
        let value = value.resolve(&self.schema).map_err(|e| e.to_string())?;
        wire::encode(self.schema_id, &self.schema, &value).map_err(|e| e.to_string())
    }
}

impl Stage for Publish {
    type In = AtomRow;
    type Out = ();

    async fn process(&mut self, items: Vec<Item<AtomRow>>) -> Result<Vec<Outcome<()>>, Fatal> {
        let mut sends = Vec::with_capacity(items.len());
        for item in &items {
            let payload = self.encode(&item.value).map_err(|e| Fatal::new("publish", format!("encoding AtomIngested: {e}")))?;
            let mut headers = Headers::new();
            if let Some(tp) = item.record.headers.get("traceparent") {
                headers.insert("traceparent", tp.to_vec());
            }
            let out = OutgoingRecord {
                topic: self.topic.clone(),
                partition: None,
                key: Some(item.value.content_hash.to_hex().into_bytes()),
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
                    Metrics::add(&self.metrics.events_published, 1);
                    Outcome::Continue(())
                }
                Err(Attempted::Rejected { error, class: ErrorClass::Invalid, attempts }) => {
                    Outcome::Invalid(Rejection::new("publish.rejected", error.to_string()).with_attempts(attempts))
                }
                Err(e) => return Err(Fatal::new("publish", e.to_string())),
            });
        }
        Ok(outcomes)
    }
}
