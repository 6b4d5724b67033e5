//! The bare pipeline: what a competent engineer writes in an afternoon with
//! rdkafka and the clickhouse crate and no framework. One loop: poll up to a
//! batch (10,000 records or 200 ms), transform each record, insert the batch,
//! send every event and wait for the acknowledgements, commit the batch's
//! offsets synchronously, repeat. Nothing is lost (the commit follows the
//! insert and the acks) and nothing overlaps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::Args;
use super::work::{self, AtomRowCh, Work, now_ms};

const BATCH: usize = 10_000;
const BATCH_TIME: Duration = Duration::from_millis(200);

pub async fn run(args: &Args) {
    let work = Work::new(&args.registry, &args.out_topic);
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[&args.topic]).unwrap();
    let producer = work::event_producer(&args.kafka);
    let client = clickhouse::Client::default().with_url(&args.clickhouse).with_database(&args.database).with_validation(false);
    loop {
        // 1. A batch.
        let mut rows: Vec<AtomRowCh> = Vec::with_capacity(BATCH);
        let mut events: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(BATCH);
        let mut next: HashMap<i32, i64> = HashMap::new();
        let deadline = Instant::now() + BATCH_TIME;
        while rows.len() < BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Ok(m)) = tokio::time::timeout(left, consumer.recv()).await else { break };
            let done = work.transform(m.payload().unwrap_or_default(), m.topic(), m.partition(), m.offset(), now_ms());
            next.insert(m.partition(), m.offset() + 1);
            rows.push(done.row);
            events.push((done.key, done.event));
        }
        if rows.is_empty() {
            continue;
        }
        // 2. Insert.
        let mut insert = client.insert::<AtomRowCh>("atoms").await.unwrap();
        for row in &rows {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
        // 3. Events, acknowledged.
        let sends = events.iter().map(|(key, payload)| {
            producer.send(FutureRecord::to(&args.out_topic).key(key).payload(payload), Duration::from_secs(30))
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| e).unwrap();
        }
        // 4. Commit.
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(&args.topic, p, Offset::Offset(o)).unwrap();
        }
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
    }
}
