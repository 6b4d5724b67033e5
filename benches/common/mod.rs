//! What the Kafka benches share: the raw consume ceiling, and reading the
//! requests their local HTTP servers (model servers, an OTLP collector) answer.

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

/// Reads one HTTP/1.1 request (request line, headers, a `content-length`
/// body) from a keep-alive connection and returns its body; `None` when the
/// client closed the connection or sent a short body.
pub async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(read: &mut R) -> Option<Vec<u8>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut h = String::new();
        if read.read_line(&mut h).await.unwrap_or(0) == 0 {
            return None;
        }
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    read.read_exact(&mut body).await.ok()?;
    Some(body)
}
