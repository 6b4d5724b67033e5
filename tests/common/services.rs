//! The test services (tansu and ClickHouse from `tests/services.sh`): their
//! addresses, a loud failure when one is missing, and a connection profile
//! for a processor run as its own process.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hartonomous::log::kafka::KafkaConfig;

pub fn kafka_addr() -> String {
    std::env::var("HARTONOMOUS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn clickhouse_url() -> String {
    std::env::var("HARTONOMOUS_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

/// Fails loudly when a service is missing: these tests never skip.
pub fn require_services() {
    let ch = clickhouse_url().trim_start_matches("http://").to_string();
    for (name, addr) in [("Kafka", kafka_addr()), ("ClickHouse", ch)] {
        let sock: std::net::SocketAddr = addr.parse().unwrap_or_else(|_| panic!("{name} address {addr} is not host:port"));
        if std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).is_err() {
            panic!("{name} is not reachable at {addr}: start the test services with `tests/services.sh up` (tests/run.sh does this)");
        }
    }
}

/// A name no other test or run uses: topics, groups, databases.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{}", std::process::id(), nanos, N.fetch_add(1, Ordering::SeqCst))
}

/// The test broker, with the short group timeouts tansu needs to join fast.
pub fn kafka_config() -> KafkaConfig {
    let mut k = KafkaConfig::default();
    k.bootstrap_servers = kafka_addr();
    k.session_timeout_ms = 6000;
    k.heartbeat_interval_ms = 500;
    k.create_topics = true;
    k
}

/// A progress line with a timestamp, for reading a failed run's output.
pub fn step(what: &str) {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    eprintln!("[{}.{:03}] {what}", (ms / 1000) % 100_000, ms % 1000);
}

/// A connection profile for the test services: data under `dir/data`,
/// ClickHouse database `database`, and the given `[registry]` and
/// `[embedder]` sections and extra `[log.properties]` lines.
pub fn profile_toml(dir: &Path, database: &str, registry: &str, embedder: &str, log_properties: &str) -> String {
    format!(
        r#"data_dir = "{data}"

[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
session_timeout_ms = 6000
heartbeat_interval_ms = 500
create_topics = true

[log.properties]
{log_properties}

[store]
kind = "clickhouse"
url = "{ch}"
database = "{database}"
request_timeout_ms = 10000

[registry]
{registry}

[embedder]
{embedder}
"#,
        data = dir.join("data").display(),
        kafka = kafka_addr(),
        ch = clickhouse_url(),
    )
}
