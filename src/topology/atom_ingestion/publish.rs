//! Stage 7: answer every accepted request on the output topic
//! (`AtomIngested` v2, Confluent wire format): `created` for the request that
//! stored an atom, `matched` for a repeat. The stage waits for the broker's
//! acknowledgement of every event of the window before the window's offsets
//! can be marked done, so a committed source offset always has its event.
//! After a crash before that, the request is redelivered and the dedup stage
//! decides the same answer again (see `dedup.rs`): an event may repeat, but
//! none is lost.
use std::sync::Arc;

use crate::atom::AtomIngested;
use crate::avro::SchemaRegistry;
use crate::failpoint;
use crate::flow::{Item, Metrics, Stage};
use crate::log::LogProducer;
use crate::outcome::{ErrorClass, Fatal, Outcome, Rejection};
use crate::resilience::{Attempted, Resilient};
use crate::topology::emit::Emitter;

pub struct Publish {
    emitter: Emitter,
    metrics: Arc<Metrics>,
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
        Ok(Self { emitter: Emitter::new("publish", producer, registry, topic, schema_name, resilient).await?, metrics })
    }
}

impl Stage for Publish {
    type In = AtomIngested;
    type Out = ();

    async fn process(&mut self, items: Vec<Item<AtomIngested>>) -> Result<Vec<Outcome<()>>, Fatal> {
        let mut sends = Vec::with_capacity(items.len());
        for item in &items {
            // Keyed by content hash, so every answer about one atom lands on
            // one partition in order; timestamped with the ingestion time.
            let mut out = self.emitter.record(&item.value, &item.value.content_hash, Some(&item.record), None)?;
            out.event_time_ms = Some(item.value.ingested_at_ms);
            sends.push(self.emitter.send(out));
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
