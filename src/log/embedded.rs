//! The in-process log of the embedded default: topics with partitions held in
//! memory, consumer groups with committed offsets, pause and resume. It is
//! also the test double for every topology test, in the spirit of Kafka
//! Streams' TopologyTestDriver and Arroyo's LocalBroker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use super::{LogConsumer, LogError, LogProducer, LogScan, PartitionPosition, PollLimit};
use crate::clock::SharedClock;
use crate::record::{OutgoingRecord, Position, Record, TopicPartition};

/// A shared handle to one in-process log. Clones see the same topics.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    appended: Notify,
    clock: SharedClock,
}

/// One partition: its records from offset `base` on. Records below `base`
/// were released ([`EmbeddedLog::release`]) after their group committed them.
#[derive(Default, Clone)]
struct Part {
    base: i64,
    records: std::collections::VecDeque<Record>,
}

impl Part {
    /// One past the last offset.
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }

    fn get(&self, offset: i64) -> Option<&Record> {
        if offset < self.base {
            return None;
        }
        self.records.get((offset - self.base) as usize)
    }
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Vec<Part>>,
    committed: HashMap<(String, TopicPartition), i64>,
    round_robin: u64,
    /// Topics still being fed ([`EmbeddedLog::open_feed`]): their end is not
    /// known yet, so no consumer of them counts as caught up.
    feeding: std::collections::HashSet<String>,
}

impl EmbeddedLog {
    pub fn new(clock: SharedClock) -> Self {
        Self { inner: Arc::new(Inner { state: Mutex::default(), appended: Notify::new(), clock }) }
    }

    /// Creates `topic` with `partitions` partitions; a no-op if it exists.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let mut s = self.inner.state.lock().unwrap();
        s.topics.entry(topic.to_string()).or_insert_with(|| vec![Part::default(); partitions.max(1) as usize]);
    }

    pub fn partitions(&self, topic: &str) -> Option<i32> {
        self.inner.state.lock().unwrap().topics.get(topic).map(|p| p.len() as i32)
    }

    /// Appends one record. Topics that do not exist are created with one
    /// partition, as brokers with auto-create do. A record without an explicit
    /// partition goes to `fnv1a(key) % partitions`, or round-robin without a key.
    pub fn append(&self, rec: OutgoingRecord) -> Position {
        let now = self.inner.clock.now_ms();
        let pos = {
            let mut s = self.inner.state.lock().unwrap();
            let rr = s.round_robin;
            s.round_robin += 1;
            let parts = s.topics.entry(rec.topic.clone()).or_insert_with(|| vec![Part::default()]);
            let n = parts.len() as u64;
            let p = match (rec.partition, &rec.key) {
                (Some(p), _) => (p.max(0) as u64 % n) as usize,
                (None, Some(k)) => (fnv1a(k) % n) as usize,
                (None, None) => (rr % n) as usize,
            };
            let offset = parts[p].end();
            let position = Position { tp: TopicPartition::new(rec.topic.as_str(), p as i32), offset };
            parts[p].records.push_back(Record {
                position: position.clone(),
                key: rec.key,
                payload: rec.payload,
                headers: rec.headers,
                event_time_ms: rec.event_time_ms.unwrap_or(now),
            });
            position
        };
        self.inner.appended.notify_waiters();
        pos
    }

    /// Every record of `topic` still held, partition by partition, in offset order.
    pub fn records(&self, topic: &str) -> Vec<Record> {
        let s = self.inner.state.lock().unwrap();
        s.topics.get(topic).map(|ps| ps.iter().flat_map(|p| p.records.iter()).cloned().collect()).unwrap_or_default()
    }

    /// Marks `topic` as being fed: until [`seal`](Self::seal), its end is
    /// unknown, so a run `Until::Drained` over it does not end when it
    /// catches up with what was appended so far.
    pub fn open_feed(&self, topic: &str) {
        self.inner.state.lock().unwrap().feeding.insert(topic.to_string());
    }

    /// Ends [`open_feed`](Self::open_feed): everything is appended.
    pub fn seal(&self, topic: &str) {
        self.inner.state.lock().unwrap().feeding.remove(topic);
        self.inner.appended.notify_waiters();
    }

    /// Records of `topic` appended but not yet committed by `group`.
    pub fn backlog(&self, topic: &str, group: &str) -> i64 {
        let s = self.inner.state.lock().unwrap();
        let Some(parts) = s.topics.get(topic) else { return 0 };
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| p.end() - s.committed.get(&(group.to_string(), TopicPartition::new(topic, i as i32))).copied().unwrap_or(0).max(p.base))
            .sum()
    }

    /// Drops the records of `topic` that `group` has committed, so a feed of
    /// any length holds only what is not processed yet. Their offsets stay
    /// taken; reading below the first held record starts at it.
    pub fn release(&self, topic: &str, group: &str) {
        let mut s = self.inner.state.lock().unwrap();
        let committed: Vec<i64> = match s.topics.get(topic) {
            Some(parts) => (0..parts.len()).map(|i| s.committed.get(&(group.to_string(), TopicPartition::new(topic, i as i32))).copied().unwrap_or(0)).collect(),
            None => return,
        };
        let parts = s.topics.get_mut(topic).expect("checked");
        for (p, upto) in parts.iter_mut().zip(committed) {
            while p.base < upto && p.records.pop_front().is_some() {
                p.base += 1;
            }
        }
    }

    pub fn committed(&self, group: &str, tp: &TopicPartition) -> Option<i64> {
        self.inner.state.lock().unwrap().committed.get(&(group.to_string(), tp.clone())).copied()
    }

    pub fn producer(&self) -> EmbeddedProducer {
        EmbeddedProducer { log: self.clone() }
    }

    /// A consumer in `group` assigned every partition of `topics`, starting at
    /// the group's committed offsets, or at the beginning.
    pub fn consumer(&self, group: &str, topics: &[&str]) -> EmbeddedConsumer {
        let s = self.inner.state.lock().unwrap();
        let mut next = BTreeMap::new();
        for t in topics {
            let n = s.topics.get(*t).map_or(1, Vec::len);
            for p in 0..n as i32 {
                let tp = TopicPartition::new(*t, p);
                let from = s.committed.get(&(group.to_string(), tp.clone())).copied().unwrap_or(0);
                next.insert(tp, from);
            }
        }
        EmbeddedConsumer { log: self.clone(), group: group.to_string(), next, paused: BTreeSet::new(), cursor: 0 }
    }
}

impl LogScan for EmbeddedLog {
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<i32, LogError>> {
        let n = EmbeddedLog::partitions(self, topic);
        Box::pin(async move { n.ok_or_else(|| LogError::Fatal(format!("topic {topic} does not exist"))) })
    }

    fn end_offset<'a>(&'a self, tp: &'a TopicPartition) -> BoxFuture<'a, Result<i64, LogError>> {
        let s = self.inner.state.lock().unwrap();
        let end = s.topics.get(tp.topic.as_ref()).and_then(|ps| ps.get(tp.partition.max(0) as usize)).map_or(0, Part::end);
        Box::pin(async move { Ok(end) })
    }

    fn read_from<'a>(&'a self, tp: &'a TopicPartition, from: i64) -> BoxFuture<'a, Result<Vec<Record>, LogError>> {
        let s = self.inner.state.lock().unwrap();
        let records = s
            .topics
            .get(tp.topic.as_ref())
            .and_then(|ps| ps.get(tp.partition.max(0) as usize))
            .map(|p| p.records.iter().skip((from - p.base).max(0) as usize).cloned().collect())
            .unwrap_or_default();
        Box::pin(async move { Ok(records) })
    }
}

/// FNV-1a, 64 bit: stable across platforms and releases, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[derive(Clone)]
pub struct EmbeddedProducer {
    log: EmbeddedLog,
}

impl LogProducer for EmbeddedProducer {
    fn send(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<Position, LogError>> {
        let pos = self.log.append(record);
        Box::pin(async move { Ok(pos) })
    }

    fn enqueue(&self, record: OutgoingRecord) -> Result<BoxFuture<'static, Result<Position, LogError>>, OutgoingRecord> {
        let pos = self.log.append(record);
        Ok(Box::pin(async move { Ok(pos) }))
    }
}

pub struct EmbeddedConsumer {
    log: EmbeddedLog,
    group: String,
    next: BTreeMap<TopicPartition, i64>,
    paused: BTreeSet<TopicPartition>,
    cursor: usize,
}

impl EmbeddedConsumer {
    fn take(&mut self, limit: PollLimit) -> Vec<Record> {
        let s = self.log.inner.state.lock().unwrap();
        let tps: Vec<TopicPartition> = self.next.keys().filter(|tp| !self.paused.contains(*tp)).cloned().collect();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if tps.is_empty() || limit.records == 0 {
            return out;
        }
        // Start at a rotating partition so that one busy partition cannot starve the others.
        self.cursor = (self.cursor + 1) % tps.len();
        for i in 0..tps.len() {
            let tp = &tps[(self.cursor + i) % tps.len()];
            let Some(log) = s.topics.get(&*tp.topic).and_then(|ps| ps.get(tp.partition as usize)) else { continue };
            let next = self.next.get_mut(tp).expect("assigned");
            // Released records are gone: a position below them moves up.
            *next = (*next).max(log.base);
            while let Some(r) = log.get(*next).filter(|r| limit.admits(out.len(), bytes, r.byte_len())) {
                bytes += r.byte_len();
                out.push(r.clone());
                *next += 1;
            }
            if *next < log.end() {
                break; // the limit is reached
            }
        }
        out
    }
}

impl LogConsumer for EmbeddedConsumer {
    fn poll_bounded(&mut self, limit: PollLimit, wait: Duration) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            let log = self.log.clone();
            let notified = log.inner.appended.notified();
            tokio::pin!(notified);
            // Register interest before looking, so an append in between is not missed.
            notified.as_mut().enable();
            let got = self.take(limit);
            if !got.is_empty() || wait.is_zero() {
                return Ok(got);
            }
            tokio::select! {
                _ = notified => {}
                _ = log.inner.clock.sleep(wait) => {}
            }
            Ok(self.take(limit))
        })
    }

    fn commit(&mut self, offsets: &BTreeMap<TopicPartition, i64>) -> BoxFuture<'_, Result<(), LogError>> {
        {
            let mut s = self.log.inner.state.lock().unwrap();
            for (tp, off) in offsets {
                if self.next.contains_key(tp) {
                    s.committed.insert((self.group.clone(), tp.clone()), *off);
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError> {
        self.paused.extend(partitions.iter().cloned());
        Ok(())
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError> {
        for tp in partitions {
            self.paused.remove(tp);
        }
        Ok(())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.next.keys().cloned().collect()
    }

    fn positions(&self) -> BTreeMap<TopicPartition, PartitionPosition> {
        let s = self.log.inner.state.lock().unwrap();
        self.next
            .iter()
            .map(|(tp, next)| {
                let end = s.topics.get(&*tp.topic).and_then(|ps| ps.get(tp.partition as usize)).map_or(0, Part::end);
                let end = (!s.feeding.contains(&*tp.topic)).then_some(end);
                (tp.clone(), PartitionPosition { next: *next, end })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn rec(topic: &str, key: &str, v: &str) -> OutgoingRecord {
        OutgoingRecord { topic: topic.into(), key: Some(key.into()), payload: v.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn keyed_records_keep_partition_order_and_commits_resume_the_group() {
        let log = EmbeddedLog::new(ManualClock::new(0).shared());
        log.create_topic("t", 3);
        for i in 0..30 {
            log.append(rec("t", &format!("k{}", i % 5), &i.to_string()));
        }
        let mut c = log.consumer("g", &["t"]);
        let got = c.poll(100, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 30);
        for tp in c.assignment() {
            let offs: Vec<i64> = got.iter().filter(|r| r.position.tp == tp).map(|r| r.position.offset).collect();
            assert!(offs.windows(2).all(|w| w[1] == w[0] + 1), "{tp}: {offs:?}");
        }
        let first = c.assignment()[0].clone();
        c.commit(&BTreeMap::from([(first.clone(), 2)])).await.unwrap();
        let mut again = log.consumer("g", &["t"]);
        let resumed = again.poll(100, Duration::ZERO).await.unwrap();
        assert_eq!(resumed.len(), 28);
        assert!(resumed.iter().filter(|r| r.position.tp == first).all(|r| r.position.offset >= 2));
    }

    #[tokio::test]
    async fn paused_partitions_yield_nothing_until_resumed() {
        let log = EmbeddedLog::new(ManualClock::new(0).shared());
        log.create_topic("t", 1);
        log.append(rec("t", "a", "1"));
        let mut c = log.consumer("g", &["t"]);
        let tps = c.assignment();
        c.pause(&tps).unwrap();
        assert!(c.poll(10, Duration::ZERO).await.unwrap().is_empty());
        c.resume(&tps).unwrap();
        assert_eq!(c.poll(10, Duration::ZERO).await.unwrap().len(), 1);
        let p = c.positions()[&tps[0]];
        assert_eq!(p, PartitionPosition { next: 1, end: Some(1) });
    }

    #[tokio::test]
    async fn polls_stop_at_the_record_and_byte_limits_and_lose_nothing() {
        let log = EmbeddedLog::new(ManualClock::new(0).shared());
        log.create_topic("t", 1);
        for i in 0..10 {
            log.append(rec("t", "k", &format!("{i:09}")));
        }
        let mut c = log.consumer("g", &["t"]);
        assert!(c.poll_bounded(PollLimit { records: 0, bytes: usize::MAX }, Duration::ZERO).await.unwrap().is_empty());
        // Each record is 1 + 9 bytes: a 25-byte limit takes two.
        let got = c.poll_bounded(PollLimit { records: 100, bytes: 25 }, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 2);
        // A limit below one record still hands out one.
        assert_eq!(c.poll_bounded(PollLimit { records: 100, bytes: 1 }, Duration::ZERO).await.unwrap().len(), 1);
        let rest = c.poll(100, Duration::ZERO).await.unwrap();
        let offsets: Vec<i64> = got.iter().chain(&rest).map(|r| r.position.offset).collect();
        assert_eq!(offsets, vec![0, 1, 3, 4, 5, 6, 7, 8, 9]);
    }

    #[tokio::test]
    async fn poll_wakes_on_append_without_time_passing() {
        let log = EmbeddedLog::new(ManualClock::new(0).shared());
        log.create_topic("t", 1);
        let mut c = log.consumer("g", &["t"]);
        let l2 = log.clone();
        let h = tokio::spawn(async move { c.poll(10, Duration::from_secs(3600)).await.unwrap().len() });
        tokio::task::yield_now().await;
        l2.append(rec("t", "a", "1"));
        assert_eq!(h.await.unwrap(), 1);
    }
}
