//! The `[log]` settings of a Kafka profile ([`KafkaConfig`]), their checks,
//! and the librdkafka client configuration that every client starts from.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use serde::Deserialize;

use crate::log::LogError;

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
    /// Create the topics a topology reads and writes at start-up ([`ensure_topics`](super::ensure_topics)).
    #[serde(default)]
    pub create_topics: bool,
    /// Replication factor of topics created by [`ensure_topics`](super::ensure_topics).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// How often librdkafka reports statistics, the source of the log end in
    /// [`LogConsumer::positions`](crate::log::LogConsumer::positions) and of [`KafkaConsumer::lag`](super::KafkaConsumer::lag).
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
    pub(super) fn client_config(&self) -> Result<ClientConfig, LogError> {
        self.check().map_err(|m| LogError::Fatal(format!("kafka configuration: {m}")))?;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers).set("client.id", &self.client_id);
        c.set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in self.resolved_properties()? {
            c.set(k, v);
        }
        Ok(c)
    }

    pub(super) fn reads_committed_only(&self) -> bool {
        self.properties.get("isolation.level").is_none_or(|v| v.trim() != "read_uncommitted")
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
}
