//! Dead-letter tools: `hartonomous dlq inspect` (what is on a dead-letter
//! topic, grouped by stage and reason, with provenance) and `dlq redrive`
//! (the original bytes and headers back to their source topic, or another,
//! once the cause is fixed).
//!
//! A dead letter is the original key, payload and headers plus the
//! provenance headers of [`crate::dead_letter`]. Redrive copies key, payload
//! and every header (the provenance stays, so a redriven record still says
//! where it failed before) and adds [`H_REDRIVE_COUNT`] (one more than the
//! dead letter carried) and [`H_REDRIVE_FROM`]. A record that fails again
//! carries its count into its next dead letter, so once a record has been
//! redriven `max_redrives` times it is refused: a poison record cannot loop
//! forever. A truncated copy (the broker refused the whole payload) is
//! refused too; its whole payload is in the `dead_letters` table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dead_letter::{self, H_ATTEMPTS, H_ERROR, H_FAILED_AT, H_TOPOLOGY, H_TRUNCATED};
use crate::record::{OutgoingRecord, Record};

/// How many times the record was redriven before (absent: never).
pub const H_REDRIVE_COUNT: &str = "hartonomous.redrive.count";
/// The dead letter a redriven record was copied from: `topic/partition@offset`.
pub const H_REDRIVE_FROM: &str = "hartonomous.redrive.from";

/// One dead letter as the tools show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Letter {
    /// Where the dead letter is: `topic/partition@offset` on the dead-letter topic.
    pub at: String,
    /// The record key, as text (lossy when not UTF-8).
    pub key: Option<String>,
    pub topology: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub reason: String,
    pub error: String,
    pub attempts: u32,
    pub failed_at_ms: i64,
    /// Times redriven before this failure.
    pub redrives: u32,
    /// The original payload size when this copy was truncated.
    pub truncated_from: Option<u64>,
    pub payload_bytes: usize,
}

impl Letter {
    /// `None` for a record without provenance headers (not a dead letter).
    pub fn of(record: &Record) -> Option<Self> {
        let (source_topic, source_partition, source_offset, stage, reason) = dead_letter::provenance(record)?;
        let h = &record.headers;
        let p = &record.position;
        Some(Self {
            at: format!("{}/{}@{}", p.tp.topic, p.tp.partition, p.offset),
            key: record.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
            topology: h.get_str(H_TOPOLOGY).unwrap_or_default().to_string(),
            source_topic,
            source_partition,
            source_offset,
            stage,
            reason,
            error: h.get_str(H_ERROR).unwrap_or_default().to_string(),
            attempts: h.get_str(H_ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(0),
            failed_at_ms: h.get_str(H_FAILED_AT).and_then(|a| a.parse().ok()).unwrap_or(0),
            redrives: redrives(record),
            truncated_from: h.get_str(H_TRUNCATED).and_then(|a| a.parse().ok()),
            payload_bytes: record.payload.len(),
        })
    }
}

/// Times `record` was redriven (its [`H_REDRIVE_COUNT`], 0 without one).
pub fn redrives(record: &Record) -> u32 {
    record.headers.get_str(H_REDRIVE_COUNT).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The dead letters of one stage and reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    pub stage: String,
    pub reason: String,
    pub count: u64,
    pub first_failed_at_ms: i64,
    pub last_failed_at_ms: i64,
    /// The first few, in topic order.
    pub examples: Vec<Letter>,
}

/// What `dlq inspect` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Inspection {
    pub topic: String,
    pub total: u64,
    /// Records on the topic without provenance headers.
    pub not_dead_letters: u64,
    /// By count, largest first.
    pub groups: Vec<Group>,
}

impl Inspection {
    pub fn new(topic: &str) -> Self {
        Self { topic: topic.to_string(), ..Self::default() }
    }

    /// Counts `record`, keeping at most `examples` examples per group.
    pub fn add(&mut self, record: &Record, examples: usize) {
        self.total += 1;
        let Some(letter) = Letter::of(record) else {
            self.not_dead_letters += 1;
            return;
        };
        let group = match self.groups.iter_mut().position(|g| g.stage == letter.stage && g.reason == letter.reason) {
            Some(i) => &mut self.groups[i],
            None => {
                self.groups.push(Group {
                    stage: letter.stage.clone(),
                    reason: letter.reason.clone(),
                    count: 0,
                    first_failed_at_ms: letter.failed_at_ms,
                    last_failed_at_ms: letter.failed_at_ms,
                    examples: Vec::new(),
                });
                self.groups.last_mut().expect("just pushed")
            }
        };
        group.count += 1;
        group.first_failed_at_ms = group.first_failed_at_ms.min(letter.failed_at_ms);
        group.last_failed_at_ms = group.last_failed_at_ms.max(letter.failed_at_ms);
        if group.examples.len() < examples {
            group.examples.push(letter);
        }
    }

    /// Groups by count, largest first; ties by stage and reason.
    pub fn finish(mut self) -> Self {
        self.groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| (&a.stage, &a.reason).cmp(&(&b.stage, &b.reason))));
        self
    }

    /// A table per group, with its examples' provenance.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = format!("{}: {} record(s), {} dead letter group(s)", self.topic, self.total, self.groups.len());
        if self.not_dead_letters > 0 {
            let _ = write!(out, ", {} without provenance headers", self.not_dead_letters);
        }
        out.push('\n');
        for g in &self.groups {
            let _ = writeln!(out, "\n{:>8}  {} / {}", g.count, g.stage, g.reason);
            for e in &g.examples {
                let _ = writeln!(
                    out,
                    "          {} <- {}/{}@{} key {:?}{}{}: {}",
                    e.at,
                    e.source_topic,
                    e.source_partition,
                    e.source_offset,
                    e.key.as_deref().unwrap_or("(none)"),
                    if e.redrives > 0 { format!(", redriven {}x", e.redrives) } else { String::new() },
                    e.truncated_from.map_or(String::new(), |n| format!(", truncated from {n} bytes")),
                    e.error
                );
            }
        }
        out
    }
}

/// What `dlq redrive` does with one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Redrive(OutgoingRecord),
    /// Redriven `max_redrives` times already.
    OverLimit,
    /// A truncated copy: redriving it would send a cut payload.
    Truncated,
    /// Another reason than the one asked for.
    OtherReason,
    /// No provenance headers.
    NotDeadLetter,
}

/// Which dead letters `dlq redrive` copies, and where.
#[derive(Debug, Clone)]
pub struct RedrivePlan {
    /// Only dead letters with this reason (all when `None`).
    pub reason: Option<String>,
    /// The topic to copy to; `None`: each record's source topic and partition.
    pub to: Option<String>,
    pub max_redrives: u32,
}

impl RedrivePlan {
    pub fn decide(&self, record: &Record) -> Decision {
        let Some(letter) = Letter::of(record) else { return Decision::NotDeadLetter };
        if self.reason.as_deref().is_some_and(|r| r != letter.reason) {
            return Decision::OtherReason;
        }
        if letter.truncated_from.is_some() {
            return Decision::Truncated;
        }
        if letter.redrives >= self.max_redrives {
            return Decision::OverLimit;
        }
        let mut headers = record.headers.clone();
        headers.insert(H_REDRIVE_COUNT, (letter.redrives + 1).to_string()).insert(H_REDRIVE_FROM, letter.at.clone());
        let (topic, partition) = match &self.to {
            Some(t) => (t.clone(), None),
            None => (letter.source_topic.clone(), Some(letter.source_partition)),
        };
        Decision::Redrive(OutgoingRecord { topic, partition, key: record.key.clone(), payload: record.payload.clone(), headers, event_time_ms: None })
    }
}

/// What a redrive did, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedriveReport {
    pub read: u64,
    pub redriven: u64,
    pub refused_over_limit: u64,
    pub refused_truncated: u64,
    pub other_reason: u64,
    pub not_dead_letters: u64,
    /// Redriven, by target topic.
    pub to: BTreeMap<String, u64>,
}

impl RedriveReport {
    pub fn count(&mut self, decision: &Decision) {
        self.read += 1;
        match decision {
            Decision::Redrive(r) => {
                self.redriven += 1;
                *self.to.entry(r.topic.clone()).or_default() += 1;
            }
            Decision::OverLimit => self.refused_over_limit += 1,
            Decision::Truncated => self.refused_truncated += 1,
            Decision::OtherReason => self.other_reason += 1,
            Decision::NotDeadLetter => self.not_dead_letters += 1,
        }
    }

    pub fn render(&self, max_redrives: u32) -> String {
        let mut out = format!("read {} record(s); redriven {}", self.read, self.redriven);
        for (t, n) in &self.to {
            out.push_str(&format!("\n  {n:>8} to {t}"));
        }
        out.push_str(&format!(
            "\nrefused: {} redriven {max_redrives} time(s) already (the limit), {} truncated (the whole payload is in the dead_letters table)\nleft alone: {} with another reason, {} without provenance headers",
            self.refused_over_limit, self.refused_truncated, self.other_reason, self.not_dead_letters
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::DeadLetter;
    use crate::record::{Headers, Position, TopicPartition};

    fn dead(reason: &str, offset: i64, headers: Headers) -> Record {
        let source = Record {
            position: Position { tp: TopicPartition::new("atoms.ingest", 2), offset },
            key: Some(b"k".to_vec()),
            payload: b"payload".to_vec(),
            headers,
            event_time_ms: 5,
        };
        let letter = DeadLetter { topology: "atom-ingestion", record: &source, stage: "validate", reason, error: "bad", attempts: 1, failed_at_ms: 100 + offset };
        let out = letter.to_outgoing("atoms.ingest.dlq");
        Record { position: Position { tp: TopicPartition::new("atoms.ingest.dlq", 0), offset }, key: out.key, payload: out.payload, headers: out.headers, event_time_ms: 5 }
    }

    #[test]
    fn inspect_groups_by_stage_and_reason_with_provenance() {
        let mut i = Inspection::new("atoms.ingest.dlq");
        for (n, reason) in ["validate.empty", "validate.type", "validate.empty"].iter().enumerate() {
            i.add(&dead(reason, n as i64, Headers::new()), 1);
        }
        i.add(&Record { position: Position { tp: TopicPartition::new("atoms.ingest.dlq", 0), offset: 9 }, key: None, payload: vec![], headers: Headers::new(), event_time_ms: 0 }, 1);
        let i = i.finish();
        assert_eq!((i.total, i.not_dead_letters), (4, 1));
        assert_eq!(i.groups.iter().map(|g| (g.reason.as_str(), g.count)).collect::<Vec<_>>(), vec![("validate.empty", 2), ("validate.type", 1)]);
        let e = &i.groups[0].examples[0];
        assert_eq!((e.source_topic.as_str(), e.source_partition, e.source_offset, e.at.as_str()), ("atoms.ingest", 2, 0, "atoms.ingest.dlq/0@0"));
        assert_eq!((i.groups[0].first_failed_at_ms, i.groups[0].last_failed_at_ms), (100, 102));
        assert!(i.render().contains("validate.empty"), "{}", i.render());
    }

    #[test]
    fn redrive_copies_bytes_and_headers_counts_and_refuses_over_the_limit() {
        let mut original = Headers::new();
        original.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let plan = RedrivePlan { reason: None, to: None, max_redrives: 2 };
        let Decision::Redrive(out) = plan.decide(&dead("validate.empty", 3, original)) else { panic!() };
        assert_eq!((out.topic.as_str(), out.partition, out.payload.as_slice(), out.key.as_deref()), ("atoms.ingest", Some(2), &b"payload"[..], Some(&b"k"[..])));
        assert_eq!(out.headers.get_str("traceparent"), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        assert_eq!(out.headers.get_str(H_REDRIVE_COUNT), Some("1"));
        assert_eq!(out.headers.get_str(H_REDRIVE_FROM), Some("atoms.ingest.dlq/0@3"));
        assert_eq!(out.headers.get_str(crate::dead_letter::H_REASON), Some("validate.empty"), "provenance kept");

        let mut twice = Headers::new();
        twice.insert(H_REDRIVE_COUNT, "2");
        assert_eq!(plan.decide(&dead("validate.empty", 4, twice)), Decision::OverLimit);
        let mut once = Headers::new();
        once.insert(H_REDRIVE_COUNT, "1");
        assert!(matches!(plan.decide(&dead("validate.empty", 5, once)), Decision::Redrive(r) if r.headers.get_str(H_REDRIVE_COUNT) == Some("2")));
        let only = RedrivePlan { reason: Some("validate.type".into()), to: Some("elsewhere".into()), max_redrives: 2 };
        assert_eq!(only.decide(&dead("validate.empty", 6, Headers::new())), Decision::OtherReason);
        assert!(matches!(only.decide(&dead("validate.type", 7, Headers::new())), Decision::Redrive(r) if r.topic == "elsewhere" && r.partition.is_none()));
        let mut cut = dead("validate.type", 8, Headers::new());
        cut.headers.insert(H_TRUNCATED, "5000000");
        assert_eq!(only.decide(&cut), Decision::Truncated);
    }
}

/// Reads every partition of `topic` from its start and inspects it.
pub async fn inspect_topic(scan: &dyn crate::log::LogScan, topic: &str, examples: usize) -> Result<Inspection, crate::log::LogError> {
    let mut inspection = Inspection::new(topic);
    for p in 0..scan.partitions(topic).await? {
        let tp = crate::record::TopicPartition::new(topic, p);
        for r in scan.read_from(&tp, 0).await? {
            inspection.add(&r, examples);
        }
    }
    Ok(inspection.finish())
}

/// Redrives the dead letters of `topic` that `group` has not redriven yet,
/// as `plan` says, and then commits `group`'s place, so the next run takes
/// only newer dead letters. A partition's place moves only after every copy
/// from it is acknowledged: a crash repeats copies, never skips any.
pub async fn redrive_topic(
    kafka: &crate::log::kafka::KafkaConfig,
    topic: &str,
    group: &str,
    plan: &RedrivePlan,
) -> Result<RedriveReport, crate::log::LogError> {
    use crate::log::{LogProducer, LogScan};
    let scan = crate::log::kafka::KafkaScanner::new(kafka);
    let producer = crate::log::kafka::KafkaProducer::new(kafka)?;
    let partitions: Vec<_> = (0..scan.partitions(topic).await?).map(|p| crate::record::TopicPartition::new(topic, p)).collect();
    let committed = crate::log::kafka::group_committed(kafka, group, &partitions).await?;
    let mut report = RedriveReport::default();
    for tp in &partitions {
        let from = committed.get(tp).copied().unwrap_or(0);
        let records = scan.read_from(tp, from).await?;
        let Some(last) = records.last().map(|r| r.position.offset) else { continue };
        let mut copies = Vec::new();
        for r in &records {
            let d = plan.decide(r);
            report.count(&d);
            if let Decision::Redrive(out) = d {
                copies.push(out);
            }
        }
        for chunk in copies.chunks(1000) {
            futures::future::try_join_all(chunk.iter().map(|c| producer.send(c.clone()))).await?;
        }
        crate::log::kafka::group_commit(kafka, group, &BTreeMap::from([(tp.clone(), last + 1)])).await?;
    }
    Ok(report)
}
