//! The log contract on any Kafka-protocol broker, through librdkafka
//! (rdkafka with the bundled library). It mirrors [`super::embedded`]:
//! records in offset order per partition, commits of the *next* offset to
//! read, pause and resume, and positions with the log end.
//!
//! What librdkafka is told, and why:
//! - consumer: `enable.auto.commit=false` and `enable.auto.offset.store=false`
//!   (only the runner knows which records are acknowledged), commits are
//!   synchronous (an asynchronous commit's result is not observable on every
//!   broker), `auto.offset.reset=earliest` (a new group reads everything),
//!   `partition.assignment.strategy=cooperative-sticky` (a rebalance only moves
//!   the partitions that change owner, so the others keep flowing), and
//!   `statistics.interval.ms` (the per-partition log end and lag come from the
//!   statistics, which stay correct on brokers whose ListOffsets answer is not).
//! - producer: `acks=all`, `enable.idempotence=true` (retries never duplicate
//!   or reorder), `linger.ms=5`.
//!
//! Every librdkafka error is classified in one place, [`classify`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use serde::Deserialize;

use super::{LogConsumer, LogError, LogProducer, PartitionPosition, PollLimit, RevokeHandler};
use crate::record::{Headers, OutgoingRecord, Position, Record, TopicPartition};

/// How long a commit may take before it counts as failed (`Unavailable`).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `send` keeps retrying while librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(30);
/// Bound on the admin calls and on waiting for new topics to appear in metadata.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The `[log]` section of a profile with `kind = "kafka"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]` of at least one broker.
    pub bootstrap_servers: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// The group session: a consumer that sends no heartbeat for this long
    /// loses its partitions. Real Kafka accepts 6000..=1800000 by default
    /// (`group.min.session.timeout.ms`); tansu joins fastest at 2000.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// The longest time between two polls before librdkafka leaves the group.
    #[serde(default = "default_max_poll_interval_ms")]
    pub max_poll_interval_ms: u64,
    /// Static group membership (KIP-345, `group.instance.id`): a stable name
    /// per instance, e.g. from `HARTONOMOUS__LOG__GROUP_INSTANCE_ID=$HOSTNAME`.
    /// A restarted instance with the same name takes its partitions back at
    /// once instead of waiting out its dead predecessor's session; the price
    /// is that a crashed instance's partitions wait `session_timeout_ms` before
    /// another instance gets them. Every instance of a group needs its own name.
    #[serde(default)]
    pub group_instance_id: Option<String>,
    /// Passed to librdkafka as they are (`security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `ssl.ca.location`, `compression.type`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka property → NAME of the environment variable holding its
    /// value, for secrets such as `sasl.password`. Read when a client is
    /// created; the value is never logged.
    #[serde(default)]
    pub properties_env: BTreeMap<String, String>,
    /// Create the topics a topology reads and writes at start-up ([`ensure_topics`]).
    #[serde(default)]
    pub create_topics: bool,
    /// Replication factor of topics created by [`ensure_topics`].
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// How often librdkafka reports statistics, the source of the log end in
    /// [`LogConsumer::positions`] and of [`KafkaConsumer::lag`].
    #[serde(default = "default_statistics_interval_ms")]
    pub statistics_interval_ms: u64,
}

fn default_client_id() -> String {
    "hartonomous".into()
}
fn default_session_timeout_ms() -> u64 {
    6000
}
fn default_heartbeat_interval_ms() -> u64 {
    500
}
fn default_max_poll_interval_ms() -> u64 {
    300_000
}
fn default_replication_factor() -> i32 {
    1
}
fn default_statistics_interval_ms() -> u64 {
    1000
}

/// Properties Hartonomous sets itself, and why a profile may not change them.
const OWNED_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "offsets are committed by Hartonomous only after every output of a record is acknowledged; auto-commit would commit records still in flight and lose them on a crash",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored by Hartonomous only after every output of a record is acknowledged; automatic storing would let a commit pass records still in flight",
    ),
    ("group.id", "the consumer group is the topology's name and is set per consumer"),
    ("enable.idempotence", "the producer is always idempotent so that its retries never duplicate or reorder records"),
    ("acks", "always `all`: a source offset is committed only after its outputs are durable on every in-sync replica"),
    (
        "request.required.acks",
        "an alias of `acks`, which is always `all`: outputs must be durable on every in-sync replica before their source offset is committed",
    ),
    ("transactional.id", "Hartonomous does not use transactions: delivery is at-least-once into idempotent sinks"),
];

/// Properties that have a field of their own.
const FIELD_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "bootstrap_servers"),
    ("metadata.broker.list", "bootstrap_servers"),
    ("client.id", "client_id"),
    ("session.timeout.ms", "session_timeout_ms"),
    ("heartbeat.interval.ms", "heartbeat_interval_ms"),
    ("max.poll.interval.ms", "max_poll_interval_ms"),
    ("statistics.interval.ms", "statistics_interval_ms"),
    ("group.instance.id", "group_instance_id"),
];

/// Every default, with Kafka's conventional `localhost:9092`. A profile must
/// still name `bootstrap_servers`: it has no serde default.
impl Default for KafkaConfig {
    fn default() -> Self {
        Self::new("localhost:9092")
    }
}

impl KafkaConfig {
    /// A configuration with every default and the given brokers.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            client_id: default_client_id(),
            session_timeout_ms: default_session_timeout_ms(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            max_poll_interval_ms: default_max_poll_interval_ms(),
            group_instance_id: None,
            properties: BTreeMap::new(),
            properties_env: BTreeMap::new(),
            create_topics: false,
            replication_factor: default_replication_factor(),
            statistics_interval_ms: default_statistics_interval_ms(),
        }
    }

    /// Checks everything that can be checked without a broker. Messages name
    /// the field and the fix.
    pub fn check(&self) -> Result<(), String> {
        if self.bootstrap_servers.split(',').all(|s| s.trim().is_empty()) {
            return Err("bootstrap_servers is empty; set `host:port` of at least one broker (several separated by commas)".into());
        }
        if self.client_id.trim().is_empty() {
            return Err("client_id is empty; set a name for broker logs and quotas, e.g. \"hartonomous\"".into());
        }
        if !(1..=3_600_000).contains(&self.session_timeout_ms) {
            return Err(format!(
                "session_timeout_ms is {}; use 1..=3600000 (real Kafka accepts 6000 and more by default)",
                self.session_timeout_ms
            ));
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms >= self.session_timeout_ms {
            return Err(format!(
                "heartbeat_interval_ms is {} but must be above 0 and below session_timeout_ms ({}); a third of it or less is usual",
                self.heartbeat_interval_ms, self.session_timeout_ms
            ));
        }
        if self.max_poll_interval_ms < self.session_timeout_ms || self.max_poll_interval_ms > 86_400_000 {
            return Err(format!(
                "max_poll_interval_ms is {}; use at least session_timeout_ms ({}) and at most 86400000",
                self.max_poll_interval_ms, self.session_timeout_ms
            ));
        }
        if self.statistics_interval_ms == 0 || self.statistics_interval_ms > 86_400_000 {
            return Err(format!(
                "statistics_interval_ms is {}; use 1..=86400000 (1000 is usual): the log end and the lag come from librdkafka's statistics",
                self.statistics_interval_ms
            ));
        }
        if let Some(id) = &self.group_instance_id
            && (id.trim().is_empty() || id.len() > 249 || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "group_instance_id `{id}` is not a valid name; use 1 to 249 of [a-zA-Z0-9._-], one per instance (e.g. the host name), or remove it"
            ));
        }
        if self.replication_factor < 1 {
            return Err(format!(
                "replication_factor is {}; use 1 for a single broker, 3 for a production cluster",
                self.replication_factor
            ));
        }
        for key in self.properties.keys().chain(self.properties_env.keys()) {
            let k = key.trim();
            if k.is_empty() {
                return Err("properties contains an empty key; remove it".into());
            }
            if let Some((_, why)) = OWNED_PROPERTIES.iter().find(|(p, _)| *p == k) {
                return Err(format!("properties.\"{k}\" cannot be set: {why}; remove it"));
            }
            if let Some((_, field)) = FIELD_PROPERTIES.iter().find(|(p, _)| *p == k) {
                return Err(format!("properties.\"{k}\" cannot be set there; use the field `{field}` instead"));
            }
        }
        for (key, var) in &self.properties_env {
            if self.properties.contains_key(key) {
                return Err(format!("\"{key}\" is in both properties and properties_env; keep only one"));
            }
            if var.trim().is_empty() {
                return Err(format!(
                    "properties_env.\"{key}\" names no environment variable; set the variable's name, e.g. \"KAFKA_PASSWORD\""
                ));
            }
        }
        Ok(())
    }

    /// `properties` plus the values of `properties_env`, read now.
    fn resolved_properties(&self) -> Result<BTreeMap<String, String>, LogError> {
        let mut out = self.properties.clone();
        for (key, var) in &self.properties_env {
            let value = std::env::var(var).map_err(|_| {
                LogError::Fatal(format!(
                    "kafka property `{key}` is read from the environment variable `{var}`, which is not set (or not UTF-8); export it before starting"
                ))
            })?;
            out.insert(key.clone(), value);
        }
        Ok(out)
    }

    /// Settings shared by every client: brokers, id, then the pass-through properties.
    fn client_config(&self) -> Result<ClientConfig, LogError> {
        self.check().map_err(|m| LogError::Fatal(format!("kafka configuration: {m}")))?;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers).set("client.id", &self.client_id);
        c.set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in self.resolved_properties()? {
            c.set(k, v);
        }
        Ok(c)
    }

    fn reads_committed_only(&self) -> bool {
        self.properties.get("isolation.level").is_none_or(|v| v.trim() != "read_uncommitted")
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// The one place where librdkafka errors become [`LogError`]s:
/// - broker, network and coordinator trouble that passes by itself → `Unavailable`;
/// - a record the broker will never take (too large, invalid) → `Rejected`;
/// - authentication, authorisation, unknown topics, invalid configuration,
///   fatal client states → `Fatal`.
///
/// Codes not listed are treated as transient: retrying is the safe default.
pub fn classify(e: &KafkaError) -> LogError {
    use RDKafkaErrorCode as C;
    let msg = e.to_string();
    if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
        return LogError::Fatal(msg);
    }
    let Some(code) = e.rdkafka_error_code() else {
        return match e {
            KafkaError::Canceled | KafkaError::NoMessageReceived | KafkaError::PartitionEOF(_) => LogError::Unavailable(msg),
            // Configuration, client creation, subscription, NUL bytes, pause/seek on unknown partitions.
            _ => LogError::Fatal(msg),
        };
    };
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidRecord
        | C::MessageBatchTooLarge
        | C::InvalidTimestamp
        | C::BadMessage
        | C::BadCompression
        | C::KeySerialization
        | C::ValueSerialization
        | C::UnsupportedForMessageFormat => LogError::Rejected(msg),
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::SSL
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::InvalidTopic
        | C::TopicDeletionDisabled
        | C::InvalidConfig
        | C::InvalidArgument
        | C::InvalidGroupId
        | C::InvalidSessionTimeout
        | C::InvalidReplicationFactor
        | C::InvalidPartitions
        | C::InvalidReplicaAssignment
        | C::InvalidRequiredAcks
        | C::InvalidRequest
        | C::InconsistentGroupProtocol
        | C::UnsupportedAssignor
        | C::UnsupportedVersion
        | C::UnsupportedFeature
        | C::UnsupportedCompressionType
        | C::NotImplemented
        | C::NotConfigured
        | C::SecurityDisabled
        | C::PolicyViolation
        | C::GroupMaxSizeReached
        | C::FencedInstanceId
        | C::ProducerFenced
        | C::Fenced
        | C::Fatal
        | C::Conflict
        | C::ExistingSubscription
        | C::InvalidType => LogError::Fatal(msg),
        _ => LogError::Unavailable(msg),
    }
}

/// Commit errors that go away without a poll, so `commit` retries them itself.
fn commit_retriable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::CoordinatorLoadInProgress
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::RequestTimedOut
                | C::RebalanceInProgress
                | C::WaitingForCoordinator
                | C::TimedOutQueue
                | C::OperationTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
        )
    )
}

fn with_context(e: LogError, context: &str) -> LogError {
    match e {
        LogError::Unavailable(m) => LogError::Unavailable(format!("{context}: {m}")),
        LogError::Rejected(m) => LogError::Rejected(format!("{context}: {m}")),
        LogError::Fatal(m) => LogError::Fatal(format!("{context}: {m}")),
    }
}

/// librdkafka's log lines go to `tracing`, where everything else goes. The
/// one profile's `properties` serve consumers and producers alike, so the
/// warning that a property belongs to the other kind of client is only debug.
fn forward_log(client: &str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    let level = if fac == "CONFWARN" && message.contains("will be ignored by this") { RDKafkaLogLevel::Debug } else { level };
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(client, facility = fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(client, facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(client, facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(client, facility = fac, "librdkafka: {message}"),
    }
}

/// Context of the producer and admin clients: logs only.
struct LogContext {
    name: &'static str,
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(self.name, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(client = self.name, %error, "kafka client error: {reason}");
    }
}

fn tpl_of(offsets: impl IntoIterator<Item = (TopicPartition, Option<i64>)>) -> Result<TopicPartitionList, LogError> {
    let mut tpl = TopicPartitionList::new();
    for (tp, off) in offsets {
        let offset = off.map_or(Offset::Invalid, Offset::Offset);
        tpl.add_partition_offset(&tp.topic, tp.partition, offset).map_err(|e| classify(&e))?;
    }
    Ok(tpl)
}

// ---------------------------------------------------------------------------
// Consumer
// ---------------------------------------------------------------------------

/// Per partition, from the last statistics report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PartitionStats {
    /// The log end librdkafka measures lag against: the last stable offset
    /// (read_committed) or the high watermark (read_uncommitted).
    end: Option<i64>,
    /// `end - committed`, as librdkafka computes `consumer_lag`.
    lag: Option<i64>,
    committed: Option<i64>,
    /// Next offset librdkafka will fetch, and how many records it holds fetched.
    next_fetch: Option<i64>,
    fetched: i64,
    /// The log start.
    start: Option<i64>,
}

/// The subset of librdkafka's statistics JSON read here.
#[derive(Deserialize)]
struct RawStats {
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
}

#[derive(Deserialize)]
struct RawTopic {
    #[serde(default)]
    partitions: HashMap<String, RawPartition>,
}

fn invalid_offset() -> i64 {
    -1001
}

#[derive(Deserialize)]
struct RawPartition {
    partition: i32,
    #[serde(default = "invalid_offset")]
    hi_offset: i64,
    #[serde(default = "invalid_offset")]
    ls_offset: i64,
    #[serde(default = "invalid_offset")]
    lo_offset: i64,
    #[serde(default = "invalid_offset")]
    committed_offset: i64,
    #[serde(default = "invalid_offset")]
    next_offset: i64,
    #[serde(default = "invalid_offset")]
    consumer_lag: i64,
    #[serde(default)]
    fetchq_cnt: i64,
}

fn valid(offset: i64) -> Option<i64> {
    (offset >= 0).then_some(offset)
}

impl RawPartition {
    fn to_stats(&self, read_committed: bool) -> PartitionStats {
        PartitionStats {
            end: valid(if read_committed { self.ls_offset } else { self.hi_offset }),
            lag: valid(self.consumer_lag),
            committed: valid(self.committed_offset),
            next_fetch: valid(self.next_offset),
            fetched: self.fetchq_cnt,
            start: valid(self.lo_offset),
        }
    }
}

/// Parses one statistics report: (topic, partition) → stats. Internal
/// partitions (-1) are skipped.
fn parse_stats(json: &[u8], read_committed: bool) -> Result<Vec<(String, i32, PartitionStats)>, serde_json::Error> {
    let raw: RawStats = serde_json::from_slice(json)?;
    let mut out = Vec::new();
    for (topic, t) in raw.topics {
        for p in t.partitions.values() {
            if p.partition >= 0 {
                out.push((topic.clone(), p.partition, p.to_stats(read_committed)));
            }
        }
    }
    Ok(out)
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
            }
            tracing::info!(group = %self.shared.group, assigned = ?added, total = st.assigned.len(), "partitions assigned");
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
                tracing::warn!(group = %group, partitions = ?revoked, "assignment lost (session timed out); not committing, the new owner repeats uncommitted records");
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
        tracing::info!(group = %group, revoked = ?revoked, remaining = st.assigned.len(), "partitions revoked");
    }
}

/// A group member reading `topics` through librdkafka. Create it inside a
/// Tokio runtime. Dropping it leaves the group (the revoke handler runs and
/// its offsets are committed); [`KafkaConsumer::close`] does that off the
/// async threads.
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<KafkaContext>>,
    shared: Arc<Shared>,
    topics: Vec<String>,
    /// An error met after records were collected, returned by the next poll.
    deferred: Option<LogError>,
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
        // Defaults a profile may override in `properties`.
        for (k, v) in [("auto.offset.reset", "earliest"), ("partition.assignment.strategy", "cooperative-sticky")] {
            if !config.properties.contains_key(k) && !config.properties_env.contains_key(k) {
                c.set(k, v);
            }
        }
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
        Ok(Self { consumer: Arc::new(consumer), shared, topics: topics.iter().map(|t| t.to_string()).collect(), deferred: None })
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
fn read_headers(msg: &BorrowedMessage<'_>) -> Headers {
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

    fn set_revoke_handler(&mut self, handler: RevokeHandler) {
        *self.shared.handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }
}

// ---------------------------------------------------------------------------
// Producer
// ---------------------------------------------------------------------------

/// An idempotent, `acks=all` producer. Clones share one librdkafka client.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer<LogContext>,
}

impl KafkaProducer {
    pub fn new(config: &KafkaConfig) -> Result<Self, LogError> {
        let mut c = config.client_config()?;
        c.set("acks", "all").set("enable.idempotence", "true");
        if !config.properties.contains_key("linger.ms") && !config.properties.contains_key("queue.buffering.max.ms") {
            c.set("linger.ms", "5");
        }
        let inner = c
            .create_with_context(LogContext { name: "producer" })
            .map_err(|e| with_context(classify(&e), "creating the kafka producer"))?;
        Ok(Self { inner })
    }

    async fn send_record(&self, record: OutgoingRecord) -> Result<Position, LogError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.iter().count());
        for (key, value) in record.headers.iter() {
            headers = headers.insert(Header { key, value });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic).payload(&record.payload[..]).headers(headers);
        if let Some(key) = &record.key {
            fr = fr.key(&key[..]);
        }
        if let Some(p) = record.partition {
            fr = fr.partition(p);
        }
        if let Some(ts) = record.event_time_ms {
            fr = fr.timestamp(ts);
        }
        match self.inner.send(fr, Timeout::After(QUEUE_FULL_WAIT)).await {
            Ok(d) => Ok(Position { tp: TopicPartition::new(record.topic.as_str(), d.partition), offset: d.offset }),
            Err((e, _)) => Err(with_context(classify(&e), &format!("producing to `{}`", record.topic))),
        }
    }
}

impl LogProducer for KafkaProducer {
    fn send(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<Position, LogError>> {
        Box::pin(self.send_record(record))
    }
}

// ---------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------

/// Creates the topics that do not exist yet (`(name, partitions)`), with
/// `config.replication_factor`, and returns once the broker's metadata
/// lists every one of them. Topics that exist already are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[(&str, i32)]) -> Result<(), LogError> {
    if topics.is_empty() {
        return Ok(());
    }
    if let Some((t, p)) = topics.iter().find(|(t, p)| t.trim().is_empty() || *p < 1) {
        return Err(LogError::Fatal(format!("cannot create topic `{t}` with {p} partitions; name it and give it at least 1 partition")));
    }
    let admin: AdminClient<LogContext> = config
        .client_config()?
        .create_with_context(LogContext { name: "admin" })
        .map_err(|e| with_context(classify(&e), "creating the kafka admin client"))?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(config.replication_factor))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
    let results = tokio::time::timeout(ADMIN_TIMEOUT + Duration::from_secs(5), admin.create_topics(&new, &opts))
        .await
        .map_err(|_| LogError::Unavailable(format!("creating topics timed out after {} s", ADMIN_TIMEOUT.as_secs())))?
        .map_err(|e| with_context(classify(&e), "creating topics"))?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(with_context(classify(&KafkaError::AdminOp(code)), &format!("creating topic `{name}`"))),
        }
    }
    // Wait until the metadata shows them, so that clients created next do not
    // see "unknown topic".
    let admin = Arc::new(admin);
    let names: Vec<String> = topics.iter().map(|(t, _)| t.to_string()).collect();
    let deadline = tokio::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        let (a, n) = (admin.clone(), names.clone());
        let missing = tokio::task::spawn_blocking(move || -> Result<Vec<String>, KafkaError> {
            let md = a.inner().fetch_metadata(None, Duration::from_secs(5))?;
            Ok(n.into_iter()
                .filter(|t| !md.topics().iter().any(|m| m.name() == t && m.error().is_none() && !m.partitions().is_empty()))
                .collect())
        })
        .await
        .map_err(|e| LogError::Fatal(format!("metadata task failed: {e}")))?;
        match missing {
            Ok(m) if m.is_empty() => return Ok(()),
            Ok(m) if tokio::time::Instant::now() >= deadline => {
                return Err(LogError::Unavailable(format!(
                    "topics {m:?} were created but are not in the broker's metadata after {} s",
                    ADMIN_TIMEOUT.as_secs()
                )));
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(with_context(classify(&e), "reading metadata")),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KafkaConfig, String> {
        toml::from_str::<KafkaConfig>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_apply_and_unknown_fields_are_denied() {
        let c = parse("bootstrap_servers = \"b:9092\"").unwrap();
        assert_eq!(c, KafkaConfig::new("b:9092"));
        assert_eq!((c.client_id.as_str(), c.session_timeout_ms, c.heartbeat_interval_ms), ("hartonomous", 6000, 500));
        assert_eq!((c.statistics_interval_ms, c.replication_factor, c.create_topics), (1000, 1, false));
        c.check().unwrap();
        let e = parse("bootstrap_servers = \"b:9092\"\nsesion_timeout_ms = 1").unwrap_err();
        assert!(e.contains("sesion_timeout_ms"), "{e}");
        assert!(parse("client_id = \"x\"").unwrap_err().contains("bootstrap_servers"));
        let stat = parse("bootstrap_servers = \"b:9092\"\ngroup_instance_id = \"host-1\"").unwrap();
        assert_eq!(stat.group_instance_id.as_deref(), Some("host-1"));
        stat.check().unwrap();
        let bad = KafkaConfig { group_instance_id: Some("has space".into()), ..KafkaConfig::new("b:9092") };
        assert!(bad.check().unwrap_err().contains("group_instance_id"));
    }

    #[test]
    fn check_refuses_owned_and_duplicated_properties_with_the_reason() {
        let mut c = KafkaConfig::new("b:9092");
        c.properties.insert("enable.auto.commit".into(), "true".into());
        let e = c.check().unwrap_err();
        assert!(e.contains("enable.auto.commit") && e.contains("in flight"), "{e}");
        for (key, fragment) in [
            ("acks", "durable"),
            ("group.id", "topology"),
            ("enable.idempotence", "idempotent"),
            ("session.timeout.ms", "session_timeout_ms"),
        ] {
            let mut c = KafkaConfig::new("b:9092");
            c.properties_env.insert(key.into(), "VAR".into());
            let e = c.check().unwrap_err();
            assert!(e.contains(key) && e.contains(fragment), "{key}: {e}");
        }
        let mut c = KafkaConfig::new("b:9092");
        c.heartbeat_interval_ms = 6000;
        assert!(c.check().unwrap_err().contains("heartbeat_interval_ms"));
        let mut c = KafkaConfig::new(" ");
        assert!(c.check().unwrap_err().contains("bootstrap_servers"));
        c.bootstrap_servers = "b:9092".into();
        c.statistics_interval_ms = 0;
        assert!(c.check().unwrap_err().contains("statistics_interval_ms"));
    }

    #[test]
    fn secrets_come_from_the_named_variable_and_a_missing_one_is_named() {
        let mut c = KafkaConfig::new("b:9092");
        c.properties_env.insert("sasl.password".into(), "HARTONOMOUS_TEST_KAFKA_UNSET_SECRET_VAR".into());
        let e = c.resolved_properties().unwrap_err().to_string();
        assert!(e.contains("HARTONOMOUS_TEST_KAFKA_UNSET_SECRET_VAR") && e.contains("sasl.password"), "{e}");
        // PATH is set in every environment this runs in.
        let path = std::env::var("PATH").unwrap();
        c.properties_env = BTreeMap::from([("sasl.password".to_string(), "PATH".to_string())]);
        assert_eq!(c.resolved_properties().unwrap()["sasl.password"], path);
    }

    #[test]
    fn errors_fall_into_the_three_classes() {
        use RDKafkaErrorCode as C;
        let class = |e: KafkaError| match classify(&e) {
            LogError::Unavailable(_) => "retry",
            LogError::Rejected(_) => "invalid",
            LogError::Fatal(_) => "fatal",
        };
        assert_eq!(class(KafkaError::MessageProduction(C::MessageSizeTooLarge)), "invalid");
        assert_eq!(class(KafkaError::MessageProduction(C::InvalidRecord)), "invalid");
        assert_eq!(class(KafkaError::MessageProduction(C::MessageTimedOut)), "retry");
        assert_eq!(class(KafkaError::MessageProduction(C::QueueFull)), "retry");
        assert_eq!(class(KafkaError::MessageConsumption(C::BrokerTransportFailure)), "retry");
        assert_eq!(class(KafkaError::MessageConsumption(C::AllBrokersDown)), "retry");
        assert_eq!(class(KafkaError::ConsumerCommit(C::RebalanceInProgress)), "retry");
        assert_eq!(class(KafkaError::MessageConsumption(C::UnknownTopicOrPartition)), "fatal");
        assert_eq!(class(KafkaError::Global(C::SaslAuthenticationFailed)), "fatal");
        assert_eq!(class(KafkaError::MessageConsumption(C::TopicAuthorizationFailed)), "fatal");
        assert_eq!(class(KafkaError::MessageConsumptionFatal(C::BrokerTransportFailure)), "fatal");
        assert_eq!(class(KafkaError::ClientCreation("bad".into())), "fatal");
    }

    #[test]
    fn statistics_give_the_end_lag_and_committed_offset_per_partition() {
        let json = br#"{"name":"c","topics":{"t":{"topic":"t","partitions":{
            "0":{"partition":0,"hi_offset":20,"ls_offset":18,"lo_offset":0,"committed_offset":5,"next_offset":20,"consumer_lag":13,"fetchq_cnt":3,"unknown_field":1},
            "-1":{"partition":-1,"hi_offset":-1001,"ls_offset":-1001,"lo_offset":-1001,"committed_offset":-1001,"next_offset":0,"consumer_lag":-1,"fetchq_cnt":0}}}}}"#;
        let parsed = parse_stats(json, true).unwrap();
        assert_eq!(parsed.len(), 1, "the internal partition -1 is skipped");
        let (topic, partition, s) = &parsed[0];
        assert_eq!((topic.as_str(), *partition), ("t", 0));
        assert_eq!(
            *s,
            PartitionStats { end: Some(18), lag: Some(13), committed: Some(5), next_fetch: Some(20), fetched: 3, start: Some(0) }
        );
        assert_eq!(parse_stats(json, false).unwrap()[0].2.end, Some(20));
        assert!(parse_stats(br#"{"name":"p"}"#, true).unwrap().is_empty());
    }
}
