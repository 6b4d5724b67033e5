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

    fn encode(&self, event: &AtomIngested) -> Result<Vec<u8>, String> {
        let value = apache_avro::to_value(event).map_err(|e| e.to_string())?;
        let value = value.resolve(&self.schema).map_err(|e| e.to_string())?;
        wire::encode(self.schema_id, &self.schema, &value).map_err(|e| e.to_string())
    }
}

impl Stage for Publish {
    type In = AtomIngested;
    type Out = ();

    async fn process(&mut self, items: Vec<Item<AtomIngested>>) -> Result<Vec<Outcome<()>>, Fatal> {
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
