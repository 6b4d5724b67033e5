//! [`LogScan`] on Kafka: a consumer with no group that is assigned one
//! partition at an offset and reads to the end. Its calls block, so they
//! run on Tokio's blocking pool.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::error::{classify, with_context};
use super::{KafkaConfig, LogContext};
use crate::log::{LogError, LogScan};
use crate::record::{Position, Record, TopicPartition};

/// Bound on one metadata or watermark request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A read ends when nothing arrived for this long. The end-of-partition
/// signal is not trusted: librdkafka raises it when the fetch position
/// reaches the high watermark the broker reports, and tansu reports the
/// start of its last stored batch + 1 (../shared/INFRA.md), so the signal
/// can come before records that are there. Reads are rare (a compensation
/// resumed after a crash), so waiting out the idle time is affordable.
const IDLE_END: Duration = Duration::from_secs(2);
/// Longest a read may take in all.
const READ_LIMIT: Duration = Duration::from_secs(60);

pub struct KafkaScanner {
    config: KafkaConfig,
}

impl KafkaScanner {
    pub fn new(config: &KafkaConfig) -> Self {
        Self { config: config.clone() }
    }

    fn consumer(&self) -> Result<BaseConsumer<LogContext>, LogError> {
        let mut c = self.config.client_config()?;
        // A group id is required by librdkafka for a consumer; this one is
        // never joined (assign only) and never commits.
        c.set("group.id", "hartonomous-scan").set("enable.auto.commit", "false").set("enable.partition.eof", "false");
        c.create_with_context(LogContext { name: "scan" }).map_err(|e| with_context(classify(&e), "creating the kafka scan consumer"))
    }

    async fn blocking<T: Send + 'static>(&self, what: &'static str, f: impl FnOnce(BaseConsumer<LogContext>) -> Result<T, KafkaError> + Send + 'static) -> Result<T, LogError> {
        let consumer = self.consumer()?;
        tokio::task::spawn_blocking(move || f(consumer))
            .await
            .map_err(|e| LogError::Fatal(format!("{what}: task failed: {e}")))?
            .map_err(|e| with_context(classify(&e), what))
    }
}

impl LogScan for KafkaScanner {
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<i32, LogError>> {
        let topic = topic.to_string();
        Box::pin(async move {
            let t = topic.clone();
            let n = self
                .blocking("reading topic metadata", move |c| {
                    let md = c.fetch_metadata(Some(&t), REQUEST_TIMEOUT)?;
                    Ok(md.topics().iter().find(|m| m.name() == t).map_or(0, |m| m.partitions().len() as i32))
                })
                .await?;
            if n == 0 { Err(LogError::Unavailable(format!("topic {topic} has no partitions (yet)"))) } else { Ok(n) }
        })
    }

    fn end_offset<'a>(&'a self, tp: &'a TopicPartition) -> BoxFuture<'a, Result<i64, LogError>> {
        let (topic, partition) = (tp.topic.to_string(), tp.partition);
        Box::pin(async move { self.blocking("reading a watermark", move |c| Ok(c.fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)?.1)).await })
    }

    fn read_from<'a>(&'a self, tp: &'a TopicPartition, from: i64) -> BoxFuture<'a, Result<Vec<Record>, LogError>> {
        let tp = tp.clone();
        Box::pin(async move {
            self.blocking("reading a partition", move |c| {
                let mut list = TopicPartitionList::new();
                list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(from.max(0)))?;
                c.assign(&list)?;
                let started = Instant::now();
                let mut last = Instant::now();
                let mut out = Vec::new();
                while last.elapsed() < IDLE_END && started.elapsed() < READ_LIMIT {
                    match c.poll(Duration::from_millis(200)) {
                        None => {}
                        Some(Err(e)) => return Err(e),
                        Some(Ok(m)) => {
                            last = Instant::now();
                            out.push(Record {
                                position: Position { tp: tp.clone(), offset: m.offset() },
                                key: m.key().map(<[u8]>::to_vec),
                                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                                headers: super::consumer::read_headers(&m),
                                event_time_ms: m.timestamp().to_millis().unwrap_or(0),
                            });
                        }
                    }
                }
                Ok(out)
            })
            .await
        })
    }
}
