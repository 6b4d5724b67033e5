//! Publishing events of a bundled schema to one topic, for any stage of any
//! topology: the schema is registered under `<topic>-value` once, each event
//! is encoded in the Confluent wire format and sent with retries and the
//! log's breaker. A send returns once the broker acknowledged it.

use std::sync::Arc;

use apache_avro::Schema;
use serde::Serialize;

use crate::avro::{SchemaRegistry, Schemas, wire};
use crate::log::{LogError, LogProducer};
use crate::outcome::Fatal;
use crate::record::{Headers, OutgoingRecord, Position, Record};
use crate::resilience::{Attempted, Resilient};

pub struct Emitter {
    producer: Arc<dyn LogProducer>,
    topic: String,
    schema: Arc<Schema>,
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
        let schema = current.schema.clone();
        let schema_id = registry
            .register(&Schemas::subject(topic), &schema)
            .await
            .map_err(|e| Fatal::new(stage, format!("registering {schema_name} for {topic}: {e}")))?;
        Ok(Self { producer, topic: topic.to_string(), schema, schema_id, resilient })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The event as a record of this topic, keyed by `key`, carrying the
    /// source record's `traceparent` header if it has one. An event that
    /// does not fit the schema is a bug, hence the `Fatal`.
    pub fn record<E: Serialize>(&self, event: &E, key: &str, source: Option<&Record>, partition: Option<i32>) -> Result<OutgoingRecord, Fatal> {
        let value = apache_avro::to_value(event).and_then(|v| v.resolve(&self.schema)).map_err(|e| Fatal::new("emit", format!("encoding an event for {}: {e}", self.topic)))?;
        let payload = wire::encode(self.schema_id, &self.schema, &value).map_err(|e| Fatal::new("emit", format!("encoding an event for {}: {e}", self.topic)))?;
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
