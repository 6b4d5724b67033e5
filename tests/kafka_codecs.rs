//! Every compression codec a real producer may use (gzip, snappy, lz4,
//! zstd) through the real broker: a plain rdkafka producer set to
//! `compression.type=<codec>` writes a few hundred records (keys, binary
//! payloads, headers), and `hartonomous::log::kafka::KafkaConsumer` must read
//! every one back intact, in order per partition.
//!
//! Two measurements make sure the codec is really on the wire both ways,
//! rather than silently skipped: the producer's librdkafka statistics show it
//! sent far fewer bytes than the payloads hold (it compressed), and a second
//! consumer's statistics show the broker served far fewer bytes than the
//! payloads hold (it stored and served the compressed batches, so the
//! consumer had to decompress that codec). With the test broker (tansu,
//! `tests/services.sh`) all four codecs pass both.
//!
//! The broker address comes from `HARTONOMOUS_TEST_KAFKA` (default
//! `127.0.0.1:19092`); the tests fail, never skip, when no broker answers.
//! Every test uses its own topic and group, and every wait has a deadline.

use std::collections::BTreeMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use hartonomous::log::LogConsumer;
use hartonomous::log::kafka::{KafkaConfig, KafkaConsumer, ensure_topics};
use hartonomous::record::Record;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Header, Headers as _, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::time::Instant;

/// The longest any single wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// Records per codec.
const RECORDS: usize = 300;
/// Payload bytes per record: compressible, but binary (every byte value).
const PAYLOAD: usize = 4096;
const PARTITIONS: i32 = 3;

fn bootstrap() -> String {
    std::env::var("HARTONOMOUS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The test configuration; fails the test when no broker answers.
fn broker() -> KafkaConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let addr = bootstrap();
    let reachable = addr
        .split(',')
        .filter_map(|a| a.trim().to_socket_addrs().ok())
        .flatten()
        .any(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(3)).is_ok());
    assert!(
        reachable,
        "no Kafka broker reachable at {addr}: start one with `tests/services.sh up`, or set HARTONOMOUS_TEST_KAFKA to a broker's host:port"
    );
    let mut c = KafkaConfig::new(addr);
    // tansu joins a group in about a second with these (INFRA.md).
    c.session_timeout_ms = 2000;
    c.heartbeat_interval_ms = 200;
    c
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Keeps the latest librdkafka statistics.
#[derive(Clone, Default)]
struct StatsContext(Arc<Mutex<Option<Statistics>>>);

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        *self.0.lock().unwrap() = Some(statistics);
    }
}

impl ConsumerContext for StatsContext {}

impl StatsContext {
    /// Waits for statistics that satisfy `done`, or fails after the deadline.
    async fn wait(&self, what: &str, done: impl Fn(&Statistics) -> bool) -> Statistics {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.0.lock().unwrap().as_ref().filter(|s| done(s)) {
                return s.clone();
            }
            assert!(Instant::now() < deadline, "{what}: no such statistics within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What was sent as record `seq`.
struct Sent {
    key: Vec<u8>,
    payload: Vec<u8>,
    partition: i32,
    offset: i64,
}

fn payload(seq: usize) -> Vec<u8> {
    let mut p = format!("record {seq}:").into_bytes();
    p.extend((0..PAYLOAD).map(|i| ((i * 7 + i / 256) % 256) as u8));
    p
}

async fn round_trip(codec: &str) {
    let config = broker();
    let topic = unique(&format!("codec-{codec}"));
    ensure_topics(&config, &[(&topic, PARTITIONS)]).await.expect("create topic");

    // --- produce with the codec, as any producer could ---
    let stats = StatsContext::default();
    let producer: FutureProducer<StatsContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("compression.type", codec)
        // Batches of many records, so there is something to compress, and
        // one request in flight per partition, so order is kept even on retry.
        .set("linger.ms", "50")
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.timeout.ms", "30000")
        .set("statistics.interval.ms", "100")
        .create_with_context(stats.clone())
        .unwrap_or_else(|e| panic!("a producer with compression.type={codec}: {e} (is librdkafka built with {codec}?)"));
    let sends = (0..RECORDS).map(|seq| {
        let key = format!("key-{}", seq % 11).into_bytes();
        let payload = payload(seq);
        let headers = OwnedHeaders::new()
            .insert(Header { key: "seq", value: Some(seq.to_string().as_bytes()) })
            .insert(Header { key: "binary", value: Some(&[0u8, 255, 1, 254][..]) })
            .insert(Header { key: "empty", value: Some(&[][..]) })
            .insert(Header::<&[u8]> { key: "null", value: None });
        let producer = &producer;
        let topic = &topic;
        async move {
            let record = FutureRecord::to(topic).key(&key).payload(&payload).headers(headers);
            let delivery = producer.send(record, Duration::from_secs(30)).await.unwrap_or_else(|(e, _)| panic!("{codec}: send {seq}: {e}"));
            Sent { key, payload, partition: delivery.partition, offset: delivery.offset }
        }
    });
    let sent: Vec<Sent> = tokio::time::timeout(DEADLINE, join_all(sends)).await.expect("sends timed out");
    producer.flush(Duration::from_secs(30)).expect("flush");
    let total: usize = sent.iter().map(|s| s.payload.len()).sum();
    let produced = stats.wait("producer statistics", |s| s.txmsgs as usize >= RECORDS).await;
    assert!(
        (produced.tx_bytes as usize) * 4 < total,
        "{codec}: the producer sent {} bytes for {total} bytes of payload: not compressed",
        produced.tx_bytes
    );

    // --- consume with our KafkaConsumer ---
    let mut consumer = KafkaConsumer::new(&config, &unique("codec-group"), &[topic.as_str()]).expect("consumer");
    let mut got: Vec<Record> = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while got.len() < RECORDS {
        assert!(Instant::now() < deadline, "{codec}: got {} of {RECORDS} records within {DEADLINE:?}", got.len());
        got.extend(consumer.poll(1000, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("{codec}: poll: {e}")));
    }
    let extra = consumer.poll(1000, Duration::from_millis(300)).await.expect("poll");
    assert!(extra.is_empty(), "{codec}: {} records more than were sent", extra.len());
    consumer.close().await;

    // Every record intact, at the position its delivery reported.
    let by_position: BTreeMap<(i32, i64), (usize, &Sent)> =
        sent.iter().enumerate().map(|(seq, s)| ((s.partition, s.offset), (seq, s))).collect();
    assert_eq!(by_position.len(), RECORDS, "{codec}: every record has its own position");
    let mut order: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for r in &got {
        let tp = &r.position.tp;
        assert_eq!(&*tp.topic, topic.as_str());
        let (seq, s) = by_position
            .get(&(tp.partition, r.position.offset))
            .unwrap_or_else(|| panic!("{codec}: unexpected record at {tp:?}@{}", r.position.offset));
        assert_eq!(r.key.as_deref(), Some(&s.key[..]), "{codec}: key of {seq}");
        assert!(r.payload == s.payload, "{codec}: payload of {seq} differs");
        assert_eq!(r.headers.get_str("seq"), Some(seq.to_string().as_str()), "{codec}");
        assert_eq!(r.headers.get("binary"), Some(&[0u8, 255, 1, 254][..]), "{codec}");
        assert_eq!(r.headers.get("empty"), Some(&[][..]), "{codec}");
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["seq", "binary", "empty", "null"], "{codec}: headers in order");
        assert_eq!(r.headers.iter().nth(3).map(|(_, v)| v), Some(None), "{codec}: a null header stays null");
        order.entry(tp.partition).or_default().push(*seq);
    }
    // In order per partition: offsets follow the order of sending.
    for (partition, seqs) in &order {
        let offsets: Vec<i64> = got.iter().filter(|r| r.position.tp.partition == *partition).map(|r| r.position.offset).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{codec}: partition {partition} out of offset order");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{codec}: partition {partition} out of send order: {seqs:?}");
    }
    assert_eq!(order.values().map(Vec::len).sum::<usize>(), RECORDS);
    assert!(order.len() > 1, "{codec}: the keys spread over partitions");

    // --- what the broker serves: the compressed batches ---
    let stats = StatsContext::default();
    let reader: BaseConsumer<StatsContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("codec-raw"))
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "100")
        .create_with_context(stats.clone())
        .expect("raw consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    reader.assign(&tpl).unwrap();
    // Statistics arrive through poll, so keep polling until they count
    // every record.
    let mut n = 0;
    let deadline = Instant::now() + DEADLINE;
    let fetched = loop {
        if let Some(s) = stats.0.lock().unwrap().as_ref().filter(|s| n >= RECORDS && s.rxmsgs as usize >= RECORDS) {
            break s.clone();
        }
        assert!(Instant::now() < deadline, "{codec}: the raw consumer got {n} of {RECORDS} records, or no statistics for them");
        match tokio::task::block_in_place(|| reader.poll(Duration::from_millis(100))) {
            Some(Ok(m)) => {
                assert!(m.headers().is_some_and(|h| h.count() == 4), "{codec}");
                n += 1;
            }
            Some(Err(e)) => panic!("{codec}: raw consume: {e}"),
            None => {}
        }
    };
    assert_eq!(n, RECORDS, "{codec}: the raw consumer read each record once");
    eprintln!("{codec}: {total} payload bytes; producer sent {} bytes, broker served {} bytes", produced.tx_bytes, fetched.rx_bytes);
    assert!(
        (fetched.rx_bytes as usize) * 4 < total,
        "{codec}: the broker served {} bytes for {total} bytes of payload: it did not serve the compressed batches",
        fetched.rx_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_batches_arrive_intact_and_in_order() {
    round_trip("gzip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snappy_batches_arrive_intact_and_in_order() {
    round_trip("snappy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lz4_batches_arrive_intact_and_in_order() {
    round_trip("lz4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_batches_arrive_intact_and_in_order() {
    round_trip("zstd").await;
}
