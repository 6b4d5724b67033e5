//! The producer: idempotent and `acks=all`, so that a sent record is durable
//! on every in-sync replica before its source offset may be committed.

use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::error::{classify, with_context};
use super::{KafkaConfig, LogContext};
use crate::log::{LogError, LogProducer};
use crate::record::{OutgoingRecord, Position, TopicPartition};

/// How long `send` keeps retrying while librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(30);

/// `linger.ms` unless the configuration sets it: how long librdkafka waits
/// to fill a batch. A stage hands over a whole window's events at once, and
/// handing over 5,000 takes longer than librdkafka's default of 5 ms, so
/// with 5 ms each partition's share went out as two produce requests. On
/// tansu every produce request costs three S3 writes (the batch, the
/// watermark and `meta.json`): in the peers bench (`benches/README.md`) 25 ms
/// halved the event batches (118 → 63 per 100k records) and cut the
/// broker's CPU per record from 43 to 25 µs. Kafka Streams' producers default
/// to 100 ms; every event already waits for its window, so 25 ms is small.
pub const DEFAULT_LINGER_MS: u32 = 25;

/// An idempotent, `acks=all` producer. Clones share one librdkafka client.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer<LogContext>,
}

impl KafkaProducer {
    pub fn new(config: &KafkaConfig) -> Result<Self, LogError> {
        let inner = client_config(config)?
            .create_with_context(LogContext { name: "producer" })
            .map_err(|e| with_context(classify(&e), "creating the kafka producer"))?;
        Ok(Self { inner })
    }

    async fn send_record(&self, record: OutgoingRecord) -> Result<Position, LogError> {
        match self.inner.send(future_record(&record), Timeout::After(QUEUE_FULL_WAIT)).await {
            Ok(d) => Ok(Position { tp: TopicPartition::new(record.topic.as_str(), d.partition), offset: d.offset }),
            Err((e, _)) => Err(with_context(classify(&e), &format!("producing to `{}`", record.topic))),
        }
    }
}

/// The producer's librdkafka settings: the configured ones, then ours.
fn client_config(config: &KafkaConfig) -> Result<rdkafka::ClientConfig, LogError> {
    let mut c = config.client_config()?;
    c.set("acks", "all").set("enable.idempotence", "true");
    if !config.properties.contains_key("linger.ms") && !config.properties.contains_key("queue.buffering.max.ms") {
        c.set("linger.ms", DEFAULT_LINGER_MS.to_string());
    }
    Ok(c)
}

fn future_record(record: &OutgoingRecord) -> FutureRecord<'_, [u8], [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.iter().count());
    for (key, value) in record.headers.iter() {
        headers = headers.insert(Header { key, value });
    }
    let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic).payload(&record.payload[..]).headers(headers);
    if let Some(key) = &record.key {
        fr = fr.key(&key[..]);
    }
    if let Some(p) = record.partition {
        fr = fr.partition(p);
    }
    if let Some(ts) = record.event_time_ms {
        fr = fr.timestamp(ts);
    }
    fr
}

impl LogProducer for KafkaProducer {
    fn send(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<Position, LogError>> {
        Box::pin(self.send_record(record))
    }

    /// `send_result`: librdkafka takes the record into its queue now, in
    /// call order; a full queue (or any refusal) gives the record back.
    fn enqueue(&self, record: OutgoingRecord) -> Result<BoxFuture<'static, Result<Position, LogError>>, OutgoingRecord> {
        let delivery = match self.inner.send_result(future_record(&record)) {
            Ok(d) => d,
            Err(_) => return Err(record),
        };
        let topic = record.topic;
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(d)) => Ok(Position { tp: TopicPartition::new(topic.as_str(), d.partition), offset: d.offset }),
                Ok(Err((e, _))) => Err(with_context(classify(&e), &format!("producing to `{topic}`"))),
                Err(_) => Err(LogError::Unavailable(format!("producing to `{topic}`: the producer went away before the broker answered"))),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linger_defaults_to_a_window_sized_wait_unless_configured() {
        let config = KafkaConfig::new("127.0.0.1:1".to_string());
        assert_eq!(client_config(&config).unwrap().get("linger.ms"), Some("25"));
        for key in ["linger.ms", "queue.buffering.max.ms"] {
            let mut config = KafkaConfig::new("127.0.0.1:1".to_string());
            config.properties.insert(key.to_string(), "0".to_string());
            let c = client_config(&config).unwrap();
            assert_eq!(c.get(key), Some("0"));
            if key != "linger.ms" {
                assert_eq!(c.get("linger.ms"), None);
            }
        }
    }
}
