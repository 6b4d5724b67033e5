//! A consumer group's committed offsets, read and written from outside the
//! group (no subscribe, no membership): for tools that keep their place in a
//! topic between runs, such as `hartonomous dlq redrive`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::error::{classify, with_context};
use super::{KafkaConfig, LogContext};
use crate::log::LogError;
use crate::record::TopicPartition;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn client(config: &KafkaConfig, group: &str) -> Result<BaseConsumer<LogContext>, LogError> {
    let mut c = config.client_config()?;
    c.set("group.id", group).set("enable.auto.commit", "false");
    c.create_with_context(LogContext { name: "offsets" }).map_err(|e| with_context(classify(&e), "creating the kafka offsets client"))
}

/// `group`'s committed offsets for `partitions`; partitions without one are absent.
pub async fn group_committed(config: &KafkaConfig, group: &str, partitions: &[TopicPartition]) -> Result<BTreeMap<TopicPartition, i64>, LogError> {
    let consumer = client(config, group)?;
    let partitions = partitions.to_vec();
    tokio::task::spawn_blocking(move || committed_on(&consumer, &partitions))
        .await
        .map_err(|e| LogError::Fatal(format!("offsets task failed: {e}")))?
}

/// The committed offsets of `consumer`'s group for `partitions` (those
/// without one are absent). Blocks for up to the request timeout.
pub(super) fn committed_on<C: ConsumerContext>(consumer: &BaseConsumer<C>, partitions: &[TopicPartition]) -> Result<BTreeMap<TopicPartition, i64>, LogError> {
    let mut tpl = TopicPartitionList::new();
    for tp in partitions {
        tpl.add_partition(&tp.topic, tp.partition);
    }
    let got = consumer.committed_offsets(tpl, REQUEST_TIMEOUT).map_err(|e| with_context(classify(&e), "reading the group's committed offsets"))?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((TopicPartition::new(e.topic(), e.partition()), o)),
            _ => None,
        })
        .collect())
}

/// Commits `offsets` (the next offset to read, per partition) for `group`.
pub async fn group_commit(config: &KafkaConfig, group: &str, offsets: &BTreeMap<TopicPartition, i64>) -> Result<(), LogError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let consumer = client(config, group)?;
    let offsets = offsets.clone();
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        for (tp, o) in &offsets {
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*o)).map_err(|e| classify(&e))?;
        }
        consumer.commit(&tpl, CommitMode::Sync).map_err(|e| with_context(classify(&e), "committing offsets"))
    })
    .await
    .map_err(|e| LogError::Fatal(format!("offsets task failed: {e}")))?
}
