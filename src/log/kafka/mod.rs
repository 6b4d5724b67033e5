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
//!   or reorder), `linger.ms=25` unless configured ([`DEFAULT_LINGER_MS`]:
//!   a window's events then leave as one batch per partition).
//!
//! Every librdkafka error is classified in one place, [`classify`].

mod admin;
mod config;
mod consumer;
mod error;
mod lag;
mod offsets;
mod probe;
mod producer;
mod range;
mod scan;
mod stats;

use rdkafka::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

pub use admin::ensure_topics;
pub use config::KafkaConfig;
pub use consumer::KafkaConsumer;
pub use error::classify;
pub use lag::{PartitionLag, group_lag, render as render_lag};
pub use offsets::{group_commit, group_committed};
pub use producer::{DEFAULT_LINGER_MS, KafkaProducer};
pub use range::{Bound, PartitionRead, RangeReport, RangeSpec, read_range};
pub use scan::KafkaScanner;

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

/// Context of the producer, admin and scan clients: logs only.
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

impl ConsumerContext for LogContext {}
