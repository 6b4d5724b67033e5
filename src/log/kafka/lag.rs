//! A consumer group's lag, read from outside the group (`hartonomous lag`):
//! per partition, the group's committed offset, the log end, and the
//! difference. It joins nothing and commits nothing, so it is safe to run
//! against a group that is working.
//!
//! The log end is not taken from the broker's ListOffsets answer alone:
//! tansu's answer is below the end (../shared/INFRA.md says the start of its
//! last stored batch + 1; 1 was measured here on partitions of thousands of
//! records), which would undercount the lag. So the end is
//! `max(ListOffsets, last offset read + 1)`, reading each partition from one
//! before the highest of that answer and the group's committed offset until
//! nothing more arrives (at most [`TAIL_LIMIT`] in all). On a broker whose
//! answer is right, the read sees one record and changes nothing; on tansu it
//! reads the group's lag, so a lag larger than the limit lets it read is
//! still undercounted there.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::error::{classify, with_context};
use super::{KafkaConfig, LogContext};
use crate::log::LogError;
use crate::record::TopicPartition;

/// Bound on each metadata, offset and watermark request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The tail read ends when nothing arrived for this long...
const TAIL_IDLE: Duration = Duration::from_millis(500);
/// ...or after this long in all (a busy topic never goes idle).
const TAIL_LIMIT: Duration = Duration::from_secs(5);

/// One row of `hartonomous lag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub tp: TopicPartition,
    /// The group's committed offset (the next record it will read); `None`
    /// when the group never committed on this partition.
    pub committed: Option<i64>,
    /// The log start and end (one past the last record).
    pub start: i64,
    pub end: i64,
}

impl PartitionLag {
    /// Records the group has not committed yet. Without a commit, a group
    /// with `auto.offset.reset=earliest` (the processor's) has the whole
    /// retained log ahead of it.
    pub fn lag(&self) -> i64 {
        (self.end - self.committed.unwrap_or(self.start)).max(0)
    }
}

/// The lag of `group` on `topics` (every topic the broker lists, internal
/// ones excepted, when empty), sorted by topic and partition. Partitions the
/// group never committed on are included only for topics named in `topics`.
pub async fn group_lag(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, LogError> {
    if group.trim().is_empty() {
        return Err(LogError::Fatal("name the consumer group (--group); the processor's group is its topology's name".into()));
    }
    let mut c = config.client_config()?;
    // The group id is what OffsetFetch asks about; this client never joins
    // (no subscribe) and never commits.
    c.set("group.id", group).set("enable.auto.commit", "false").set("enable.partition.eof", "false");
    let consumer: BaseConsumer<LogContext> =
        c.create_with_context(LogContext { name: "lag" }).map_err(|e| with_context(classify(&e), "creating the kafka lag client"))?;
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || read_lag(&consumer, &topics)).await.map_err(|e| LogError::Fatal(format!("lag task failed: {e}")))?
}

fn read_lag(consumer: &BaseConsumer<LogContext>, named: &[String]) -> Result<Vec<PartitionLag>, LogError> {
    let kafka = |what: &'static str| move |e: KafkaError| with_context(classify(&e), what);
    let md = consumer.fetch_metadata(None, REQUEST_TIMEOUT).map_err(kafka("reading topic metadata"))?;
    let mut partitions = Vec::new();
    for t in md.topics() {
        let wanted = if named.is_empty() { !t.name().starts_with("__") } else { named.iter().any(|n| n == t.name()) };
        if wanted && t.error().is_none() {
            partitions.extend(t.partitions().iter().map(|p| TopicPartition::new(t.name(), p.id())));
        }
    }
    if let Some(missing) = named.iter().find(|n| !partitions.iter().any(|tp| &*tp.topic == n.as_str())) {
        return Err(LogError::Fatal(format!("the broker lists no topic `{missing}`; check --topic")));
    }
    let committed = super::offsets::committed_on(consumer, &partitions)?;
    let mut rows = Vec::new();
    for tp in partitions {
        let committed = committed.get(&tp).copied();
        if committed.is_none() && named.is_empty() {
            continue;
        }
        let (start, end) = consumer.fetch_watermarks(&tp.topic, tp.partition, REQUEST_TIMEOUT).map_err(kafka("reading watermarks"))?;
        rows.push(PartitionLag { tp, committed, start, end });
    }
    correct_ends(consumer, &mut rows).map_err(kafka("reading the partitions' last records"))?;
    rows.sort_by(|a, b| a.tp.cmp(&b.tp));
    Ok(rows)
}

/// Raises each row's end to one past the last record actually there, read
/// from one before the broker's answer (see the module doc).
fn correct_ends(consumer: &BaseConsumer<LogContext>, rows: &mut [PartitionLag]) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for r in rows.iter() {
        let from = (r.end.max(r.committed.unwrap_or(r.start)) - 1).max(r.start);
        tpl.add_partition_offset(&r.tp.topic, r.tp.partition, Offset::Offset(from))?;
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut last = Instant::now();
    let mut seen: BTreeMap<(String, i32), i64> = BTreeMap::new();
    while last.elapsed() < TAIL_IDLE && started.elapsed() < TAIL_LIMIT {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => return Err(e),
            Some(Ok(m)) => {
                last = Instant::now();
                let e = seen.entry((m.topic().to_string(), m.partition())).or_insert(m.offset());
                *e = (*e).max(m.offset());
            }
        }
    }
    consumer.unassign()?;
    for r in rows.iter_mut() {
        if let Some(o) = seen.get(&(r.tp.topic.to_string(), r.tp.partition)) {
            r.end = r.end.max(o + 1);
        }
    }
    Ok(())
}

/// The table `hartonomous lag` prints: one line per partition and a total.
pub fn render(group: &str, rows: &[PartitionLag]) -> String {
    use std::fmt::Write;
    let width = rows.iter().map(|r| r.tp.topic.len()).max().unwrap_or(5).max(5);
    let mut out = format!("{:<width$}  {:>9}  {:>12}  {:>12}  {:>10}\n", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG");
    for r in rows {
        let committed = r.committed.map_or_else(|| "-".to_string(), |c| c.to_string());
        let _ = writeln!(out, "{:<width$}  {:>9}  {:>12}  {:>12}  {:>10}", r.tp.topic, r.tp.partition, committed, r.end, r.lag());
    }
    let total: i64 = rows.iter().map(PartitionLag::lag).sum();
    let _ = writeln!(out, "group {group}: {} partition(s), total lag {total}", rows.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_commit_or_from_the_start_without_one() {
        let row = |committed, start, end| PartitionLag { tp: TopicPartition::new("t", 0), committed, start, end };
        assert_eq!(row(Some(5), 0, 10).lag(), 5);
        assert_eq!(row(None, 3, 10).lag(), 7, "no commit: everything retained is ahead");
        assert_eq!(row(Some(12), 0, 10).lag(), 0, "never negative");
        let table = render("g", &[row(Some(5), 0, 10), row(None, 0, 4)]);
        assert!(table.contains("TOPIC") && table.contains("total lag 9"), "{table}");
        assert!(table.lines().nth(2).unwrap().contains(" - "), "{table}");
    }
}
