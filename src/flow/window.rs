//! Micro-batching windows that close on count, bytes or age, whichever first.

use serde::Deserialize;

use crate::record::Record;

/// Limits of one window. All three are required to be positive.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    pub max_records: usize,
    pub max_bytes: usize,
    /// Age of the oldest record after which the window closes.
    pub max_age_ms: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self { max_records: 5000, max_bytes: 8 << 20, max_age_ms: 200 }
    }
}

impl WindowConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.max_records == 0 {
            return Err("max_records is 0; set it to at least 1".into());
        }
        if self.max_bytes == 0 {
            return Err("max_bytes is 0; set it to at least the largest record you accept".into());
        }
        if self.max_age_ms == 0 {
            return Err("max_age_ms is 0; set it to at least 1 (milliseconds)".into());
        }
        Ok(())
    }
}

/// An open window. Time is passed in by the caller (from the injected clock),
/// so the window itself never reads a clock.
#[derive(Debug)]
pub struct Window {
    config: WindowConfig,
    records: Vec<Record>,
    bytes: usize,
    opened_at_ms: Option<i64>,
}

impl Window {
    pub fn new(config: WindowConfig) -> Self {
        Self { config, records: Vec::new(), bytes: 0, opened_at_ms: None }
    }

    /// Adds a record. Returns true when the window is full by count or bytes
    /// and must be taken now. A single record larger than `max_bytes` makes a
    /// window of its own rather than being refused: size limits on content are
    /// the validate stage's job, which dead-letters with a reason.
    pub fn push(&mut self, record: Record, now_ms: i64) -> bool {
        self.opened_at_ms.get_or_insert(now_ms);
        self.bytes += record.byte_len();
        self.records.push(record);
        self.records.len() >= self.config.max_records || self.bytes >= self.config.max_bytes
    }

    /// Would adding a record of `bytes` overflow the byte limit? The caller then
    /// takes the window first, so windows stay under `max_bytes` where possible.
    pub fn would_overflow(&self, bytes: usize) -> bool {
        !self.records.is_empty() && self.bytes + bytes > self.config.max_bytes
    }

    /// When the window must close by age, if it holds anything.
    pub fn deadline_ms(&self) -> Option<i64> {
        self.opened_at_ms.map(|t| t + self.config.max_age_ms as i64)
    }

    pub fn is_due(&self, now_ms: i64) -> bool {
        self.deadline_ms().is_some_and(|d| now_ms >= d)
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Takes the contents and reopens empty: (records, bytes).
    pub fn take(&mut self) -> (Vec<Record>, usize) {
        self.opened_at_ms = None;
        (std::mem::take(&mut self.records), std::mem::replace(&mut self.bytes, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Headers, Position, TopicPartition};

    fn rec(n: usize) -> Record {
        Record {
            position: Position { tp: TopicPartition::new("t", 0), offset: 0 },
            key: None,
            payload: vec![0; n],
            headers: Headers::new(),
            event_time_ms: 0,
        }
    }

    #[test]
    fn closes_on_count() {
        let mut w = Window::new(WindowConfig { max_records: 3, max_bytes: 1 << 20, max_age_ms: 1000 });
        assert!(!w.push(rec(1), 0));
        assert!(!w.push(rec(1), 0));
        assert!(w.push(rec(1), 0));
        assert_eq!(w.take().0.len(), 3);
        assert!(w.is_empty() && w.deadline_ms().is_none());
    }

    #[test]
    fn closes_on_bytes_and_warns_before_overflow() {
        let mut w = Window::new(WindowConfig { max_records: 100, max_bytes: 100, max_age_ms: 1000 });
        assert!(!w.push(rec(60), 0));
        assert!(w.would_overflow(60));
        assert!(w.push(rec(40), 0));
        let mut single = Window::new(WindowConfig { max_records: 100, max_bytes: 100, max_age_ms: 1000 });
        assert!(!single.would_overflow(500), "an empty window takes any record");
        assert!(single.push(rec(500), 0));
    }

    #[test]
    fn closes_on_age_measured_from_the_first_record() {
        let mut w = Window::new(WindowConfig { max_records: 100, max_bytes: 1 << 20, max_age_ms: 200 });
        assert!(!w.is_due(1_000_000), "an empty window is never due");
        w.push(rec(1), 1_000);
        w.push(rec(1), 1_150);
        assert_eq!(w.deadline_ms(), Some(1_200));
        assert!(!w.is_due(1_199));
        assert!(w.is_due(1_200));
    }
}
