//! The log contract: what every topology needs from a broker. Kafka and the
//! in-process [`embedded`] log are two implementations of it.

pub mod embedded;
pub mod kafka;

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use crate::outcome::{Classify, ErrorClass};
use crate::record::{OutgoingRecord, Position, Record, TopicPartition};

/// How much one poll may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollLimit {
    /// At most this many records; 0 hands out nothing but still serves the
    /// consumer (group membership, rebalances) for up to `wait`.
    pub records: usize,
    /// Stop before a record that would take the total `byte_len` past this,
    /// except that the first record is always handed out (a record larger
    /// than the whole budget must still pass, alone).
    pub bytes: usize,
}

impl PollLimit {
    pub fn records(records: usize) -> Self {
        Self { records, bytes: usize::MAX }
    }

    /// Whether `out` (holding `bytes` so far) may take one more record of `size` bytes.
    pub fn admits(&self, taken: usize, bytes: usize, size: usize) -> bool {
        taken < self.records && (taken == 0 || bytes.saturating_add(size) <= self.bytes)
    }
}

/// Reading side of the log, owned by one topology's source task.
///
/// Contract:
/// - `poll_bounded` returns records in offset order per partition, never from
///   a paused partition, within `limit` (records not handed out stay queued
///   in order for later polls). It returns an empty batch (not an error) when
///   nothing arrived within `wait`.
/// - `commit` stores, per partition, the offset of the *next* record to read
///   (Kafka's convention). Callers only pass offsets whose records and all
///   their outputs are acknowledged. A restarted consumer in the same group
///   resumes from the committed offsets.
/// - `assignment` may change between polls on a group rebalance; records of a
///   revoked partition that are still in flight must not be committed by this
///   consumer afterwards (commit ignores partitions it no longer owns).
pub trait LogConsumer: Send + 'static {
    fn poll_bounded(&mut self, limit: PollLimit, wait: std::time::Duration) -> BoxFuture<'_, Result<Vec<Record>, LogError>>;

    /// `poll_bounded` with at most `max` records and no byte bound.
    fn poll(&mut self, max: usize, wait: std::time::Duration) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        self.poll_bounded(PollLimit::records(max), wait)
    }

    fn commit(&mut self, offsets: &BTreeMap<TopicPartition, i64>) -> BoxFuture<'_, Result<(), LogError>>;
    /// Pauses `partitions` (those assigned; already paused ones are left
    /// alone, so calling it on every loop is cheap). A partition that is
    /// revoked and assigned again comes back unpaused.
    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError>;
    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError>;
    fn assignment(&self) -> Vec<TopicPartition>;
    /// Per assigned partition: the next offset this consumer will read and the
    /// log-end offset, so that `end - position` is the lag. `None` end means
    /// the broker could not say.
    fn positions(&self) -> BTreeMap<TopicPartition, PartitionPosition>;

    /// One line on where each assigned partition's fetching stands, for the
    /// runner's stall warning (what an operator needs to tell a paused, a
    /// starved and a stuck partition apart). Empty when there is nothing more
    /// to say than `positions`.
    fn describe(&self) -> String {
        String::new()
    }

    /// Called by the runner when nothing has been polled for a long while
    /// although the partitions are not paused: checks, from outside this
    /// consumer, whether records wait at or after this consumer's position in
    /// an assigned partition, and if so restarts its fetch there (a seek to
    /// the position: nothing is skipped, a record already handed out is not
    /// handed out twice). Returns the partitions restarted with their
    /// positions. The future borrows nothing, so the runner keeps polling
    /// while it runs. Logs that cannot wedge (the embedded log) do nothing.
    fn unstick(&self) -> BoxFuture<'static, Result<Vec<(TopicPartition, i64)>, LogError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Installs the handler called when the group takes partitions away from
    /// this consumer. Logs without consumer groups (the embedded log) never
    /// call it, hence the default.
    fn set_revoke_handler(&mut self, handler: RevokeHandler) {
        let _ = handler;
    }
}

/// Called from inside the consumer when `partitions` are about to be revoked.
/// It may block (up to a deadline below the group session timeout) while the
/// records in flight from those partitions finish, and returns the offsets to
/// commit for them before they go; the consumer commits those synchronously.
/// Records of revoked partitions that did not finish are repeated by the new
/// owner, which idempotent sinks make harmless.
pub type RevokeHandler = std::sync::Arc<dyn Fn(&[TopicPartition]) -> BTreeMap<TopicPartition, i64> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionPosition {
    pub next: i64,
    pub end: Option<i64>,
}

/// Writing side of the log. Cheap to clone and shared by stages.
///
/// Contract: the future resolves only when the log has durably accepted the
/// record (acks=all on Kafka). Only then may the source offset that caused it
/// be committed.
pub trait LogProducer: Send + Sync + 'static {
    fn send(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<Position, LogError>>;

    /// Hands `record` to the log now and returns the wait for its
    /// acknowledgement, so that records of one partition enqueued one after
    /// another are stored in that order without each waiting for the one
    /// before (Kafka: the idempotent producer keeps that order through its
    /// retries). `Err` gives the record back when it cannot be handed over
    /// now (a full local queue, or a log without this): send it, and every
    /// later record that must follow it, with [`send`](Self::send).
    fn enqueue(&self, record: OutgoingRecord) -> Result<BoxFuture<'static, Result<Position, LogError>>, OutgoingRecord> {
        Err(record)
    }
}

/// Reading one partition directly, outside any consumer group, for a stage
/// that must see what it wrote before a crash (the compensation consumer
/// looks for its own announcement before sending it again).
pub trait LogScan: Send + Sync + 'static {
    /// Partitions of `topic` (an error if it does not exist).
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<i32, LogError>>;
    /// An offset at or below the one the next record written to `tp` gets
    /// (exact on Kafka; lower on tansu, whose high watermark lags, which
    /// only makes a later [`read_from`](Self::read_from) read more).
    fn end_offset<'a>(&'a self, tp: &'a TopicPartition) -> BoxFuture<'a, Result<i64, LogError>>;
    /// Every record of `tp` from offset `from` to the end of what is stored.
    fn read_from<'a>(&'a self, tp: &'a TopicPartition, from: i64) -> BoxFuture<'a, Result<Vec<Record>, LogError>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("broker temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("record rejected by the broker: {0}")]
    Rejected(String),
    #[error("log unusable: {0}")]
    Fatal(String),
}

impl Classify for LogError {
    fn class(&self) -> ErrorClass {
        match self {
            LogError::Unavailable(_) => ErrorClass::Retry,
            LogError::Rejected(_) => ErrorClass::Invalid,
            LogError::Fatal(_) => ErrorClass::Fatal,
        }
    }
}
