//! A look from outside a consumer: which partitions hold a record at or
//! after a given offset. Assign-only, nothing joined, nothing committed.
//! The runner's stall watch uses it (`LogConsumer::unstick`) to tell a
//! consumer that waits for records that are not there from one whose fetch
//! is wedged while records wait.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::error::{classify, with_context};
use super::{KafkaConfig, LogContext};
use crate::log::LogError;
use crate::record::TopicPartition;

/// The probe ends once every partition answered, or after this long.
const PROBE_LIMIT: Duration = Duration::from_secs(5);

/// The partitions of `at` that hold a record at or after their offset.
/// Blocking: call it from `spawn_blocking`.
pub(super) fn records_at(config: &KafkaConfig, at: &[(TopicPartition, i64)]) -> Result<BTreeSet<TopicPartition>, LogError> {
    let mut c = config.client_config()?;
    c.set("group.id", "hartonomous-probe").set("enable.auto.commit", "false").set("enable.partition.eof", "false");
    let consumer: BaseConsumer<LogContext> = c.create_with_context(LogContext { name: "probe" }).map_err(|e| with_context(classify(&e), "creating the kafka probe"))?;
    let mut tpl = TopicPartitionList::new();
    for (tp, offset) in at {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset)).map_err(|e| with_context(classify(&e), "assigning the probe"))?;
    }
    consumer.assign(&tpl).map_err(|e| with_context(classify(&e), "assigning the probe"))?;
    let started = Instant::now();
    let mut found = BTreeSet::new();
    while found.len() < at.len() && started.elapsed() < PROBE_LIMIT {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let tp = TopicPartition::new(m.topic(), m.partition());
            if at.iter().any(|(t, o)| *t == tp && m.offset() >= *o) {
                found.insert(tp);
            }
        }
    }
    let _ = consumer.unassign();
    Ok(found)
}
