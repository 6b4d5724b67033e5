//! What the Kafka benches share: the raw consume ceiling.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Reads the first `n` records of `topic` (partitions 0..`partitions`) with a
/// bare rdkafka consumer and returns how long that took: the consume ceiling.
pub fn raw_consume(bootstrap: &str, topic: &str, partitions: i32, n: usize) -> Duration {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}.raw"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let started = Instant::now();
    let mut seen = 0;
    while seen < n {
        if let Some(m) = consumer.poll(Duration::from_secs(5)) {
            m.unwrap();
            seen += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "raw consume saw {seen} of {n}");
    }
    started.elapsed()
}
