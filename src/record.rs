//! The unit that flows through every topology: one log record and where it came from.

use std::sync::Arc;

/// A topic and partition, the unit of ordering and of offset commits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self { topic: topic.into(), partition }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Where a record sits in the log. Offsets are dense per partition on the
/// embedded log and monotonically increasing on Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub tp: TopicPartition,
    pub offset: i64,
}

/// Record headers, kept in order. Keys may repeat and values may be absent,
/// as in Kafka.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Option<Vec<u8>>)>);

impl Headers {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.0.push((key.into(), Some(value.into())));
        self
    }

    pub fn push_raw(&mut self, key: String, value: Option<Vec<u8>>) {
        self.0.push((key, value));
    }

    /// The last value set for `key`, as Kafka clients conventionally read it.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref())
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    pub fn byte_len(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum()
    }
}

/// A record read from a log. It is immutable once read: stages carry an
/// `Arc<Record>` beside their typed value so that a dead letter can always
/// be written with the original bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub position: Position,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Headers,
    /// Event time in milliseconds since the Unix epoch (the producer's
    /// timestamp, or the log-append time when the producer gave none).
    pub event_time_ms: i64,
}

impl Record {
    /// Bytes this record holds in memory, the measure used by byte-bounded edges.
    pub fn byte_len(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, Vec::len) + self.headers.byte_len()
    }
}

/// A record to be produced. The log assigns the position.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutgoingRecord {
    pub topic: String,
    /// `None` lets the log choose from the key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Headers,
    pub event_time_ms: Option<i64>,
}
