//! The consumer: a group member with manual commits, pause and resume, the
//! revoke handler, and positions and lag from librdkafka's statistics.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::error::{classify, commit_retriable, with_context};
use super::stats::{PartitionStats, parse_stats};
use super::{KafkaConfig, forward_log};
use crate::log::{LogConsumer, LogError, PartitionPosition, PollLimit, RevokeHandler};
use crate::ops::events::{AssignmentLost, Event, PartitionsAssigned, PartitionsRevoked};
use crate::record::{Headers, Position, Record, TopicPartition};

/// How long a commit may take before it counts as failed (`Unavailable`).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

fn tpl_of(offsets: impl IntoIterator<Item = (TopicPartition, Option<i64>)>) -> Result<TopicPartitionList, LogError> {
    let mut tpl = TopicPartitionList::new();
    for (tp, off) in offsets {
        let offset = off.map_or(Offset::Invalid, Offset::Offset);
        tpl.add_partition_offset(&tp.topic, tp.partition, offset).map_err(|e| classify(&e))?;
    }
    Ok(tpl)
}

/// What the consumer and its rebalance callbacks share. Callbacks run on the
/// thread that polls, so they never run while `poll` holds the lock.
#[derive(Default)]
struct State {
    /// Assigned partitions and the generation at which each was assigned.
    assigned: BTreeMap<TopicPartition, u64>,
    paused: BTreeSet<TopicPartition>,
    /// One past the last record handed out, per partition.
    next: BTreeMap<TopicPartition, i64>,
    /// Records that arrived for a paused partition (fetched before the pause
    /// took effect); handed out first after resume, in order.
    held: BTreeMap<TopicPartition, VecDeque<Record>>,
    stats: BTreeMap<TopicPartition, PartitionStats>,
}

struct Shared {
    group: String,
    state: Mutex<State>,
    handler: Mutex<Option<RevokeHandler>>,
    /// Bumped on every assignment change.
    generation: AtomicU64,
    read_committed: bool,
    topics: Vec<Arc<str>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn intern(&self, topic: &str) -> Arc<str> {
        self.topics.iter().find(|t| &***t == topic).cloned().unwrap_or_else(|| Arc::from(topic))
    }

    fn tps(&self, tpl: &TopicPartitionList) -> Vec<TopicPartition> {
        tpl.elements().iter().map(|e| TopicPartition::new(self.intern(e.topic()), e.partition())).collect()
    }
}

/// Runs a callback that may block: on a multi-threaded runtime the worker's
/// other tasks move to another thread first, so that the tasks the callback
/// waits for can run.
fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The consumer's librdkafka context: assignment tracking, the revoke
/// handler with its synchronous commit, and statistics.
struct KafkaContext {
    shared: Arc<Shared>,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(&self.shared.group, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(group = %self.shared.group, %error, "kafka consumer error: {reason}");
    }

    fn stats_raw(&self, statistics: &[u8]) {
        match parse_stats(statistics, self.shared.read_committed) {
            Ok(parts) => {
                let mut st = self.shared.state();
                for (topic, partition, stats) in parts {
                    let tp = TopicPartition::new(self.shared.intern(&topic), partition);
                    if st.assigned.contains_key(&tp) {
                        st.stats.insert(tp, stats);
                    }
                }
            }
            Err(e) => tracing::debug!(group = %self.shared.group, "unreadable librdkafka statistics: {e}"),
        }
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.on_revoke(base, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(group = %self.shared.group, error = %e, "group rebalance failed; librdkafka rejoins"),
        }
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let added = self.shared.tps(tpl);
            let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
            let mut st = self.shared.state();
            if !matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative) {
                // Eager: the list is the whole new assignment.
                *st = State::default();
            }
            for tp in &added {
                st.assigned.insert(tp.clone(), generation);
                st.paused.remove(tp);
                // librdkafka fetches a newly assigned partition from the
                // committed offset, so whatever this consumer handed out or
                // held before is stale. A `next` left over from an earlier
                // assignment would drop every re-fetched record below it as
                // "handed out already", and the partition would look stuck.
                st.next.remove(tp);
                st.held.remove(tp);
            }
            // librdkafka keeps a partition's application pause across revoke
            // and re-assignment (confluentinc/librdkafka#1849), while `State`
            // forgets it on revoke. Left alone, a partition paused when its
            // assignment was lost (a session timeout during a broker outage)
            // came back paused in librdkafka but not here: the runner's
            // resume skipped it and it was never fetched again. A newly
            // assigned partition therefore starts resumed in both; the
            // runner pauses it again on its next turn if it means to.
            if !added.is_empty() {
                let resumed = tpl_of(added.iter().map(|tp| (tp.clone(), None))).and_then(|tpl| base.resume(&tpl).map_err(|e| classify(&e)));
                if let Err(e) = resumed {
                    tracing::warn!(group = %self.shared.group, error = %e, "resuming newly assigned partitions failed");
                }
            }
            PartitionsAssigned { group: &self.shared.group, partitions: &added, total: st.assigned.len() }.emit();
        }
    }
}

impl KafkaContext {
    /// Before partitions go: let the handler finish (or give up on) their
    /// records in flight, commit what it returns synchronously, then forget
    /// the partitions.
    fn on_revoke(&self, base: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let group = &self.shared.group;
        let revoked = self.shared.tps(tpl);
        let lost = base.assignment_lost();
        let handler = self.shared.handler.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let offsets = match handler {
            _ if lost => {
                AssignmentLost { group, partitions: &revoked }.emit();
                BTreeMap::new()
            }
            Some(h) => run_blocking(|| h(&revoked)),
            None => BTreeMap::new(),
        };
        let to_commit: Vec<(TopicPartition, Option<i64>)> = {
            let st = self.shared.state();
            offsets.into_iter().filter(|(tp, off)| *off >= 0 && st.assigned.contains_key(tp)).map(|(tp, off)| (tp, Some(off))).collect()
        };
        if !to_commit.is_empty() {
            let result = tpl_of(to_commit.iter().cloned()).and_then(|tpl| base.commit(&tpl, CommitMode::Sync).map_err(|e| classify(&e)));
            match result {
                Ok(()) => tracing::info!(group = %group, offsets = ?to_commit, "committed offsets of revoked partitions"),
                Err(e) => {
                    tracing::warn!(group = %group, error = %e, "commit before revoke failed; the new owner repeats uncommitted records")
                }
            }
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let mut st = self.shared.state();
        for tp in &revoked {
            st.assigned.remove(tp);
            st.paused.remove(tp);
            st.next.remove(tp);
            st.held.remove(tp);
            st.stats.remove(tp);
        }
        PartitionsRevoked { group, partitions: &revoked, remaining: st.assigned.len() }.emit();
    }
}

/// A group member reading `topics` through librdkafka. Create it inside a
/// Tokio runtime. Dropping it leaves the group (the revoke handler runs and
/// its offsets are committed); [`KafkaConsumer::close`] does that off the
/// async threads.
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<KafkaContext>>,
    shared: Arc<Shared>,
    /// For [`LogConsumer::unstick`]'s look from outside.
    config: KafkaConfig,
    topics: Vec<String>,
    /// An error met after records were collected, returned by the next poll.
    deferred: Option<LogError>,
}

/// The consumer's librdkafka settings: the configured ones, then ours.
fn client_config(config: &KafkaConfig, group: &str) -> Result<rdkafka::ClientConfig, LogError> {
    let mut c = config.client_config()?;
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", config.heartbeat_interval_ms.to_string())
        .set("max.poll.interval.ms", config.max_poll_interval_ms.to_string())
        .set("statistics.interval.ms", config.statistics_interval_ms.to_string());
    if let Some(id) = &config.group_instance_id {
        c.set("group.instance.id", id);
    }
    // Defaults a profile may override in `properties`. Not
    // `fetch.wait.max.ms`: tansu holds every fetch for up to that long even
    // when records are waiting, so a shorter wait cut its produce-to-consume
    // latency (191 -> 47 ms at the median), but with 100 ms the fault suite's
    // continuous-load kill test on tansu's S3 storage stored 3,000 of
    // 22,000 records in twenty rounds and never caught up (benches/README.md,
    // "What a record waits for"). A profile that wants the latency sets it.
    for (k, v) in [("auto.offset.reset", "earliest"), ("partition.assignment.strategy", "cooperative-sticky")] {
        if !config.properties.contains_key(k) && !config.properties_env.contains_key(k) {
            c.set(k, v);
        }
    }
    Ok(c)
}

impl KafkaConsumer {
    pub fn new(config: &KafkaConfig, group: &str, topics: &[&str]) -> Result<Self, LogError> {
        if group.trim().is_empty() {
            return Err(LogError::Fatal("kafka consumer group is empty; name the topology".into()));
        }
        if topics.is_empty() {
            return Err(LogError::Fatal("kafka consumer subscribes to no topic".into()));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(LogError::Fatal("KafkaConsumer::new must be called inside a Tokio runtime".into()));
        }
        let c = client_config(config, group)?;
        let shared = Arc::new(Shared {
            group: group.to_string(),
            state: Mutex::default(),
            handler: Mutex::new(None),
            generation: AtomicU64::new(0),
            read_committed: config.reads_committed_only(),
            topics: topics.iter().map(|t| Arc::from(*t)).collect(),
        });
        let consumer: StreamConsumer<KafkaContext> = c
            .create_with_context(KafkaContext { shared: shared.clone() })
            .map_err(|e| with_context(classify(&e), "creating the kafka consumer"))?;
        consumer.subscribe(topics).map_err(|e| with_context(classify(&e), &format!("subscribing to {topics:?}")))?;
        Ok(Self { consumer: Arc::new(consumer), shared, config: config.clone(), topics: topics.iter().map(|t| t.to_string()).collect(), deferred: None })
    }

    pub fn group(&self) -> &str {
        &self.shared.group
    }

    /// Per assigned partition, the group's lag as librdkafka's statistics
    /// report it (`consumer_lag`: log end minus the committed offset), for
    /// partitions where it is known. At most `statistics_interval_ms` old.
    pub fn lag(&self) -> BTreeMap<TopicPartition, i64> {
        let st = self.shared.state();
        st.assigned.keys().filter_map(|tp| st.stats.get(tp).and_then(|s| s.lag).map(|l| (tp.clone(), l))).collect()
    }

    /// The group's committed offsets for `partitions` (any partitions, not
    /// only assigned ones), asked of the broker. Partitions without a
    /// committed offset are absent.
    pub async fn committed(&self, partitions: &[TopicPartition]) -> Result<BTreeMap<TopicPartition, i64>, LogError> {
        let tpl = tpl_of(partitions.iter().map(|tp| (tp.clone(), None)))?;
        let consumer = self.consumer.clone();
        let task = tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, COMMIT_TIMEOUT));
        let tpl = match tokio::time::timeout(COMMIT_TIMEOUT + Duration::from_secs(1), task).await {
            Err(_) => return Err(LogError::Unavailable("reading committed offsets timed out".into())),
            Ok(Err(e)) => return Err(LogError::Fatal(format!("reading committed offsets: {e}"))),
            Ok(Ok(r)) => r.map_err(|e| with_context(classify(&e), "reading committed offsets"))?,
        };
        Ok(tpl
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((TopicPartition::new(self.shared.intern(e.topic()), e.partition()), o)),
                _ => None,
            })
            .collect())
    }

    /// Leaves the group on a blocking thread: the revoke handler runs for the
    /// partitions still assigned and its offsets are committed.
    pub async fn close(self) {
        let consumer = self.consumer;
        if let Err(e) = tokio::task::spawn_blocking(move || drop(consumer)).await {
            tracing::warn!(group = %self.shared.group, "closing the kafka consumer failed: {e}");
        }
    }

    /// Turns one message into a record if it may be handed out now; holds it
    /// if its partition is paused or this poll's `limit` is reached; drops it
    /// if the partition is not assigned (revoked meanwhile) or it was handed
    /// out already.
    fn accept(&self, msg: &BorrowedMessage<'_>, out: &mut Vec<Record>, limit: PollLimit, bytes: &mut usize) {
        let tp = TopicPartition::new(self.shared.intern(msg.topic()), msg.partition());
        let offset = msg.offset();
        let record = Record {
            position: Position { tp, offset },
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: read_headers(msg),
            event_time_ms: msg.timestamp().to_millis().unwrap_or_else(now_ms),
        };
        let mut st = self.shared.state();
        let tp = &record.position.tp;
        if !st.assigned.contains_key(tp) {
            return;
        }
        let seen = st.held.get(tp).and_then(|h| h.back()).map(|r| r.position.offset + 1).or_else(|| st.next.get(tp).copied());
        if seen.is_some_and(|s| offset < s) {
            return;
        }
        if st.paused.contains(tp) || st.held.get(tp).is_some_and(|h| !h.is_empty()) || !limit.admits(out.len(), *bytes, record.byte_len()) {
            st.held.entry(tp.clone()).or_default().push_back(record);
            return;
        }
        st.next.insert(tp.clone(), offset + 1);
        drop(st);
        *bytes += record.byte_len();
        out.push(record);
    }

    /// Hands out records held for partitions that are not paused, within `limit`.
    fn take_held(&self, out: &mut Vec<Record>, limit: PollLimit, bytes: &mut usize) {
        let mut st = self.shared.state();
        let State { held, paused, next, .. } = &mut *st;
        for (tp, queue) in held.iter_mut() {
            if paused.contains(tp) {
                continue;
            }
            while let Some(r) = queue.front() {
                if !limit.admits(out.len(), *bytes, r.byte_len()) {
                    break;
                }
                let r = queue.pop_front().expect("front exists");
                next.insert(tp.clone(), r.position.offset + 1);
                *bytes += r.byte_len();
                out.push(r);
            }
        }
        held.retain(|_, q| !q.is_empty());
    }

    /// After a rebalance inside the poll, keeps only records whose partition
    /// has stayed assigned since they were collected at `generation`.
    fn revalidate(&self, out: &mut Vec<Record>, generation: u64) -> u64 {
        let now = self.shared.generation.load(Ordering::Acquire);
        if now != generation && !out.is_empty() {
            let st = self.shared.state();
            out.retain(|r| st.assigned.get(&r.position.tp).is_some_and(|since| *since <= generation));
        }
        now
    }

    /// Transient errors are logged (librdkafka recovers by itself); others are returned.
    fn on_error(&self, e: KafkaError) -> Option<LogError> {
        match classify(&e) {
            LogError::Unavailable(m) => {
                tracing::warn!(group = %self.shared.group, "kafka consumer: {m} (librdkafka retries)");
                None
            }
            other => Some(with_context(other, &format!("consumer of group `{}` on topics {:?}", self.shared.group, self.topics))),
        }
    }

    /// Cancellation-safe (the runner polls inside `select!`): the only await
    /// is the wait for the first record, and it happens only while nothing
    /// has been taken; once a record is in hand the rest runs without yielding.
    async fn poll_records(&mut self, limit: PollLimit, wait: Duration) -> Result<Vec<Record>, LogError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut generation = self.shared.generation.load(Ordering::Acquire);
        self.take_held(&mut out, limit, &mut bytes);
        let consumer = self.consumer.clone();
        let stream = consumer.stream();
        tokio::pin!(stream);
        let deadline = tokio::time::Instant::now() + wait;
        let mut failed = None;
        // Wait (at most until the deadline) for the first record...
        while out.is_empty() && failed.is_none() {
            let item = match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(item)) => item,
                Ok(None) | Err(_) => break,
            };
            generation = self.revalidate(&mut out, generation);
            match item {
                Ok(msg) => self.accept(&msg, &mut out, limit, &mut bytes),
                Err(e) => failed = self.on_error(e),
            }
            if limit.records == 0 {
                // Nothing may be handed out: one message served the consumer; stop
                // so that librdkafka's bounded prefetch is not drained into `held`.
                break;
            }
        }
        // ...then take only what is there already.
        while out.len() < limit.records && failed.is_none() {
            let Some(Some(item)) = stream.next().now_or_never() else { break };
            generation = self.revalidate(&mut out, generation);
            let before = out.len();
            match item {
                Ok(msg) => self.accept(&msg, &mut out, limit, &mut bytes),
                Err(e) => failed = self.on_error(e),
            }
            if out.len() == before {
                // Held (paused partition, or the byte limit is reached) or
                // dropped: leave the rest in librdkafka's bounded queue rather
                // than moving it into `held`.
                break;
            }
        }
        self.revalidate(&mut out, generation);
        if !out.is_empty() && crate::failpoint::fires("consumer.wedge") {
            let assigned: Vec<TopicPartition> = self.shared.state().assigned.keys().cloned().collect();
            if let Ok(tpl) = tpl_of(assigned.into_iter().map(|tp| (tp, None))) {
                let _ = self.consumer.pause(&tpl);
                eprintln!("failpoint consumer.wedge: partitions paused inside librdkafka only");
            }
        }
        match failed {
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                self.deferred = Some(e);
                Ok(out)
            }
            None => Ok(out),
        }
    }

    async fn commit_offsets(&self, tpl: TopicPartitionList) -> Result<(), LogError> {
        let deadline = tokio::time::Instant::now() + COMMIT_TIMEOUT;
        let mut backoff = Duration::from_millis(50);
        loop {
            let (consumer, attempt) = (self.consumer.clone(), tpl.clone());
            let task = tokio::task::spawn_blocking(move || consumer.commit(&attempt, CommitMode::Sync));
            let e = match tokio::time::timeout_at(deadline, task).await {
                Err(_) => return Err(LogError::Unavailable(format!("commit not acknowledged within {} s", COMMIT_TIMEOUT.as_secs()))),
                Ok(Err(e)) => return Err(LogError::Fatal(format!("commit task failed: {e}"))),
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(e))) => e,
            };
            if !commit_retriable(&e) || tokio::time::Instant::now() + backoff >= deadline {
                return Err(with_context(classify(&e), "commit"));
            }
            tracing::debug!(group = %self.shared.group, error = %e, "commit failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The headers of a consumed message, in order, with duplicate keys and
/// absent values kept. Read directly so that a key that is not UTF-8 becomes
/// lossy text instead of a panic.
#[allow(unsafe_code)] // rust-rdkafka's safe header API panics on a key that is not UTF-8
pub(super) fn read_headers(msg: &BorrowedMessage<'_>) -> Headers {
    use rdkafka::bindings as rd;
    use rdkafka::types::RDKafkaRespErr;
    let mut out = Headers::new();
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg.ptr()` is a live message for the lifetime of `msg`; the
    // header list it returns is owned by the message and only read here.
    let err = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut hdrs) };
    if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return out;
    }
    // SAFETY: `hdrs` is valid (checked above) while `msg` lives.
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    for idx in 0..count {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const std::os::raw::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `idx < count`; the out-pointers point to locals.
        let err = unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: librdkafka returns a NUL-terminated name and `size` bytes of value, both owned by the message.
        let key = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        let value = (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec());
        out.push_raw(key, value);
    }
    out
}

impl LogConsumer for KafkaConsumer {
    fn poll_bounded(&mut self, limit: PollLimit, wait: Duration) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(self.poll_records(limit, wait))
    }

    fn commit(&mut self, offsets: &BTreeMap<TopicPartition, i64>) -> BoxFuture<'_, Result<(), LogError>> {
        let owned: Vec<(TopicPartition, Option<i64>)> = {
            let st = self.shared.state();
            offsets
                .iter()
                .filter(|(tp, off)| **off >= 0 && st.assigned.contains_key(*tp))
                .map(|(tp, off)| (tp.clone(), Some(*off)))
                .collect()
        };
        Box::pin(async move {
            if owned.is_empty() {
                return Ok(());
            }
            let tpl = tpl_of(owned)?;
            self.commit_offsets(tpl).await
        })
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError> {
        let mut st = self.shared.state();
        let tps: Vec<TopicPartition> = partitions.iter().filter(|tp| st.assigned.contains_key(*tp) && !st.paused.contains(*tp)).cloned().collect();
        if tps.is_empty() {
            return Ok(());
        }
        let tpl = tpl_of(tps.iter().map(|tp| (tp.clone(), None)))?;
        self.consumer.pause(&tpl).map_err(|e| with_context(classify(&e), "pause"))?;
        st.paused.extend(tps);
        Ok(())
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError> {
        let mut st = self.shared.state();
        let tps: Vec<TopicPartition> =
            partitions.iter().filter(|tp| st.assigned.contains_key(*tp) && st.paused.contains(*tp)).cloned().collect();
        if tps.is_empty() {
            return Ok(());
        }
        let tpl = tpl_of(tps.iter().map(|tp| (tp.clone(), None)))?;
        self.consumer.resume(&tpl).map_err(|e| with_context(classify(&e), "resume"))?;
        for tp in &tps {
            st.paused.remove(tp);
        }
        Ok(())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.shared.state().assigned.keys().cloned().collect()
    }

    /// `next` is one past the last record handed out; before the first
    /// record of a partition it is the committed offset, or where librdkafka
    /// will fetch when it holds nothing fetched. `end` is the log end from the
    /// last statistics report (`None` until one arrived), never below `next`.
    fn positions(&self) -> BTreeMap<TopicPartition, PartitionPosition> {
        let st = self.shared.state();
        st.assigned
            .keys()
            .map(|tp| {
                let stats = st.stats.get(tp);
                let next = st
                    .held
                    .get(tp)
                    .and_then(|h| h.front())
                    .map(|r| r.position.offset)
                    .or_else(|| st.next.get(tp).copied())
                    .or_else(|| stats.and_then(|s| s.committed))
                    .or_else(|| stats.filter(|s| s.fetched == 0).and_then(|s| s.next_fetch))
                    .or_else(|| stats.and_then(|s| s.start))
                    .unwrap_or(0);
                let end = stats.and_then(|s| s.end).map(|e| e.max(next));
                (tp.clone(), PartitionPosition { next, end })
            })
            .collect()
    }

    fn describe(&self) -> String {
        let st = self.shared.state();
        let parts: Vec<String> = st
            .assigned
            .iter()
            .map(|(tp, since)| {
                let s = st.stats.get(tp).copied().unwrap_or_default();
                format!(
                    "{tp}: assigned@{since} paused={} next={:?} held={} | librdkafka: state={} next_fetch={:?} queued={} committed={:?} end={:?}",
                    st.paused.contains(tp),
                    st.next.get(tp),
                    st.held.get(tp).map_or(0, VecDeque::len),
                    s.fetch_state,
                    s.next_fetch,
                    s.fetched,
                    s.committed,
                    s.end
                )
            })
            .collect();
        format!("generation {}; {}", self.shared.generation.load(Ordering::Acquire), parts.join("; "))
    }

    fn unstick(&self) -> BoxFuture<'static, Result<Vec<(TopicPartition, i64)>, LogError>> {
        let at: Vec<(TopicPartition, i64)> = {
            let positions = self.positions();
            let st = self.shared.state();
            positions.into_iter().filter(|(tp, _)| !st.paused.contains(tp)).map(|(tp, p)| (tp, p.next)).collect()
        };
        let (config, consumer, shared) = (self.config.clone(), self.consumer.clone(), self.shared.clone());
        Box::pin(async move {
            if at.is_empty() {
                return Ok(Vec::new());
            }
            let generation = shared.generation.load(Ordering::Acquire);
            tokio::task::spawn_blocking(move || -> Result<Vec<(TopicPartition, i64)>, LogError> {
                let waiting = super::probe::records_at(&config, &at)?;
                let sought: Vec<(TopicPartition, i64)> = at
                    .into_iter()
                    .filter(|(tp, _)| waiting.contains(tp))
                    // Only partitions this consumer still owns, at the position it had.
                    .filter(|_| shared.generation.load(Ordering::Acquire) == generation)
                    // Resume too: a pause librdkafka kept while this consumer
                    // forgot it (confluentinc/librdkafka#1849) stops a fetch
                    // as surely as a wedged fetcher; neither is meant here,
                    // since only partitions not paused here are looked at.
                    .filter(|(tp, _)| {
                        let mut one = TopicPartitionList::new();
                        let resumed = one.add_partition_offset(&tp.topic, tp.partition, Offset::Invalid).and_then(|_| consumer.resume(&one));
                        if let Err(e) = resumed {
                            tracing::warn!(partition = %tp, error = %e, "resuming a stuck partition failed");
                        }
                        true
                    })
                    .filter(|(tp, next)| match consumer.seek(&tp.topic, tp.partition, Offset::Offset(*next), Duration::from_secs(10)) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(partition = %tp, offset = next, error = %e, "seeking a stuck partition to its position failed");
                            false
                        }
                    })
                    .collect();
                // The seek drops what librdkafka had fetched; what was held
                // here is fetched again, so it is forgotten too.
                let mut st = shared.state();
                for (tp, _) in &sought {
                    st.held.remove(tp);
                }
                Ok(sought)
            })
            .await
            .map_err(|e| LogError::Fatal(format!("unstick task failed: {e}")))?
        })
    }

    fn set_revoke_handler(&mut self, handler: RevokeHandler) {
        *self.shared.handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_settings_and_defaults_apply_and_a_profile_overrides_the_defaults() {
        let config = KafkaConfig::new("127.0.0.1:1".to_string());
        let c = client_config(&config, "g").unwrap();
        assert_eq!(c.get("group.id"), Some("g"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("fetch.wait.max.ms"), None, "librdkafka's default");
        let mut config = KafkaConfig::new("127.0.0.1:1".to_string());
        config.properties.insert("auto.offset.reset".to_string(), "latest".to_string());
        config.properties.insert("fetch.wait.max.ms".to_string(), "100".to_string());
        let c = client_config(&config, "g").unwrap();
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
        assert_eq!(c.get("fetch.wait.max.ms"), Some("100"));
    }
}
