//! The same pipeline on Sentry's `sentry_arroyo`, composed the way its docs
//! and examples (and Snuba's consumers) do it:
//!
//! `RunTask(transform)` → `Reduce(batch of 10,000 or 200 ms)` →
//! `RunTaskInThreads(insert the batch, send its events, await the acks;
//! 2 batches in flight)` → `CommitOffsets(every second)`.
//!
//! The StreamProcessor runs on its own thread (its `run` blocks), the
//! insert tasks on the runtime that `ConcurrencyConfig` creates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use sentry_arroyo::backends::kafka::InitialOffset;
use sentry_arroyo::backends::kafka::config::KafkaConfig;
use sentry_arroyo::backends::kafka::types::KafkaPayload;
use sentry_arroyo::processing::StreamProcessor;
use sentry_arroyo::processing::strategies::commit_offsets::CommitOffsets;
use sentry_arroyo::processing::strategies::reduce::Reduce;
use sentry_arroyo::processing::strategies::run_task::RunTask;
use sentry_arroyo::processing::strategies::run_task_in_threads::{ConcurrencyConfig, RunTaskError, RunTaskFunc, RunTaskInThreads};
use sentry_arroyo::processing::strategies::{ProcessingStrategy, ProcessingStrategyFactory, SubmitError};
use sentry_arroyo::types::{InnerMessage, Message, Topic};

use super::Args;
use super::work::{self, AtomRowCh, Done, Work, now_ms};

const BATCH: usize = 10_000;
const BATCH_TIME: Duration = Duration::from_millis(200);
const INSERTS_IN_FLIGHT: usize = 2;

struct Factory {
    work: Arc<Work>,
    client: clickhouse::Client,
    producer: FutureProducer,
    out_topic: Arc<str>,
    concurrency: ConcurrencyConfig,
}

#[derive(Debug)]
struct Failed(String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

impl ProcessingStrategyFactory<KafkaPayload> for Factory {
    fn create(&self) -> Box<dyn ProcessingStrategy<KafkaPayload>> {
        let (client, producer, out_topic) = (self.client.clone(), self.producer.clone(), self.out_topic.clone());
        let write = move |message: Message<Vec<Done>>| -> RunTaskFunc<(), Failed> {
            let (client, producer, out_topic) = (client.clone(), producer.clone(), out_topic.clone());
            Box::pin(async move {
                let (message, batch) = message.take();
                let failed = |e: String| RunTaskError::Other(Failed(e));
                let mut insert = client.insert::<AtomRowCh>("atoms").await.map_err(|e| failed(e.to_string()))?;
                for done in &batch {
                    insert.write(&done.row).await.map_err(|e| failed(e.to_string()))?;
                }
                insert.end().await.map_err(|e| failed(e.to_string()))?;
                let sends = batch
                    .iter()
                    .map(|d| producer.send(FutureRecord::to(&out_topic).key(&d.key).payload(&d.event), Duration::from_secs(30)));
                for result in futures::future::join_all(sends).await {
                    result.map_err(|(e, _)| failed(e.to_string()))?;
                }
                Ok(message)
            })
        };
        let writer = RunTaskInThreads::new(CommitOffsets::new(Duration::from_secs(1)), write, &self.concurrency, Some("clickhouse_writer"));
        let batch = Reduce::new(
            writer,
            Arc::new(|mut acc: Vec<Done>, m: Message<Done>| {
                acc.push(m.into_payload());
                Ok(acc)
            }),
            Arc::new(|| Vec::with_capacity(BATCH)),
            BATCH,
            BATCH_TIME,
            |_| 1,
        );
        let work = self.work.clone();
        let transform = move |m: Message<KafkaPayload>| -> Result<Message<Done>, SubmitError<KafkaPayload>> {
            let InnerMessage::BrokerMessage(b) = &m.inner_message else { unreachable!("the consumer gives broker messages") };
            let payload = b.payload.payload().map(|p| p.as_slice()).unwrap_or_default();
            let done = work.transform(payload, b.partition.topic.as_str(), b.partition.index as i32, b.offset as i64, now_ms());
            Ok(m.replace(done))
        };
        Box::new(RunTask::new(transform, batch))
    }
}

/// Runs until the process is killed.
pub fn run(args: &Args) {
    let work = Arc::new(Work::new(&args.registry, &args.out_topic));
    let producer = work::event_producer(&args.kafka);
    let client = clickhouse::Client::default().with_url(&args.clickhouse).with_database(&args.database).with_validation(false);
    // tansu joins a group slowly with the default 45 s session (INFRA.md).
    let overrides = HashMap::from([("session.timeout.ms".to_string(), "6000".to_string()), ("heartbeat.interval.ms".to_string(), "500".to_string())]);
    let config = KafkaConfig::new_consumer_config(vec![args.kafka.clone()], args.group.clone(), InitialOffset::Earliest, false, 30_000, Some(overrides));
    let factory = Factory { work, client, producer, out_topic: args.out_topic.as_str().into(), concurrency: ConcurrencyConfig::new(INSERTS_IN_FLIGHT) };
    let processor = StreamProcessor::with_kafka(config, factory, Topic::new(&args.topic), None);
    processor.run().unwrap();
}
