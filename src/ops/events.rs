//! The operational log events, declared once (as Vector declares its
//! `internal_events`): each is a type holding what an operator needs to act
//! on, and [`Event::emit`] writes it with its level and fixed wording. Call
//! sites say what happened; how it reads in a log lives here, so a log
//! search, an alert on a log line or a JSON log shipper (`--log-format
//! json`) can rely on it. Counters for the same moments are the run's
//! metrics ([`crate::flow::Metrics`], exported by [`super::exporter`]).
//!
//! Events are logged under the `hartonomous::events` target, so
//! `RUST_LOG=hartonomous::events=info` shows the operational story alone.

/// A log event with a fixed level and message.
pub trait Event {
    fn emit(&self);
}

/// Backpressure paused every assigned partition: the in-flight budget is
/// spent or the first stage's edge is full (debug), or a circuit breaker is
/// open (warn: an outage).
pub struct PartitionsPaused<'a> {
    pub in_flight: usize,
    pub bytes: usize,
    pub queued_windows: usize,
    pub open_breakers: &'a [String],
}

impl Event for PartitionsPaused<'_> {
    fn emit(&self) {
        if self.open_breakers.is_empty() {
            tracing::debug!(target: "hartonomous::events", in_flight = self.in_flight, bytes = self.bytes, queued_windows = self.queued_windows, "backpressure: partitions paused");
        } else {
            tracing::warn!(
                target: "hartonomous::events",
                breakers = ?self.open_breakers,
                in_flight = self.in_flight,
                "backpressure: partitions paused while a circuit breaker is open; they resume when it half-opens"
            );
        }
    }
}

pub struct PartitionsResumed {
    pub in_flight: usize,
    pub bytes: usize,
}

impl Event for PartitionsResumed {
    fn emit(&self) {
        tracing::debug!(target: "hartonomous::events", in_flight = self.in_flight, bytes = self.bytes, "backpressure over: partitions resumed");
    }
}

/// The first failed commit of a run of failures (the same offsets, or later
/// ones, go at every interval; nothing is lost).
pub struct CommitFailing<'a> {
    pub error: &'a dyn std::fmt::Display,
}

impl Event for CommitFailing<'_> {
    fn emit(&self) {
        tracing::warn!(target: "hartonomous::events", error = %self.error, "commit failed; retrying at every interval until the broker takes it");
    }
}

pub struct CommitsRecovered;

impl Event for CommitsRecovered {
    fn emit(&self) {
        tracing::info!(target: "hartonomous::events", "commits go through again");
    }
}

pub struct ShutdownRequested;

impl Event for ShutdownRequested {
    fn emit(&self) {
        tracing::info!(target: "hartonomous::events", "shutdown requested; draining");
    }
}

pub struct DrainTimedOut {
    pub timeout_ms: u64,
}

impl Event for DrainTimedOut {
    fn emit(&self) {
        tracing::warn!(target: "hartonomous::events", timeout_ms = self.timeout_ms, "drain timed out; uncommitted records will be repeated");
    }
}

/// No record polled for a while although records wait (see the runner's
/// stall watch): the runner's and the consumer's state, to tell a paused, a
/// starved and a stuck partition apart.
pub struct NoProgress<'a> {
    pub waiting: i64,
    pub idle_s: i64,
    pub runner: &'a str,
    pub consumer: &'a str,
}

impl Event for NoProgress<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: "hartonomous::events",
            waiting = self.waiting,
            idle_s = self.idle_s,
            runner = %self.runner,
            consumer = %self.consumer,
            "no records polled for a while although records wait in the assigned partitions"
        );
    }
}

/// No record polled for a while and, as far as the log ends say, none
/// waits: normal for a caught-up consumer, so at debug level. The log end
/// comes from the broker's high watermark, which some brokers report wrongly
/// (tansu: the start of the last stored batch + 1), so the consumer's state
/// is logged too: a partition stuck below its real end shows up here.
pub struct Idle<'a> {
    pub idle_s: i64,
    pub consumer: &'a str,
}

impl Event for Idle<'_> {
    fn emit(&self) {
        tracing::debug!(target: "hartonomous::events", idle_s = self.idle_s, consumer = %self.consumer, "no records polled for a while; the log ends say none wait");
    }
}

/// Records waited at the position of partitions that received nothing for
/// a long while although they were not paused; their fetch was restarted
/// there (a seek to the position). Should never happen; if it does, it says
/// which partitions.
pub struct FetchRestarted<'a> {
    pub partitions: &'a [(crate::record::TopicPartition, i64)],
    pub idle_s: i64,
}

impl Event for FetchRestarted<'_> {
    fn emit(&self) {
        let parts: Vec<String> = self.partitions.iter().map(|(tp, o)| format!("{tp}@{o}")).collect();
        tracing::warn!(
            target: "hartonomous::events",
            partitions = ?parts,
            idle_s = self.idle_s,
            "records wait at the position of partitions that received nothing although not paused: restarted their fetch there"
        );
    }
}

/// A stage or the acker stopped the topology.
pub struct FatalStop<'a> {
    pub stage: &'a str,
    pub error: &'a str,
}

impl Event for FatalStop<'_> {
    fn emit(&self) {
        tracing::error!(target: "hartonomous::events", stage = %self.stage, error = %self.error, "fatal error; stopping the topology");
    }
}

/// The group gave this consumer partitions.
pub struct PartitionsAssigned<'a> {
    pub group: &'a str,
    pub partitions: &'a dyn std::fmt::Debug,
    pub total: usize,
}

impl Event for PartitionsAssigned<'_> {
    fn emit(&self) {
        tracing::info!(target: "hartonomous::events", group = %self.group, assigned = ?self.partitions, total = self.total, "partitions assigned");
    }
}

pub struct PartitionsRevoked<'a> {
    pub group: &'a str,
    pub partitions: &'a dyn std::fmt::Debug,
    pub remaining: usize,
}

impl Event for PartitionsRevoked<'_> {
    fn emit(&self) {
        tracing::info!(target: "hartonomous::events", group = %self.group, revoked = ?self.partitions, remaining = self.remaining, "partitions revoked");
    }
}

/// The session timed out (a broker outage, a stalled process): the group
/// took the partitions without a revoke, so nothing is committed for them.
pub struct AssignmentLost<'a> {
    pub group: &'a str,
    pub partitions: &'a dyn std::fmt::Debug,
}

impl Event for AssignmentLost<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: "hartonomous::events",
            group = %self.group,
            partitions = ?self.partitions,
            "assignment lost (session timed out); not committing, the new owner repeats uncommitted records"
        );
    }
}

pub struct BreakerOpened<'a> {
    pub endpoint: &'a str,
    pub failures: u32,
    pub open_ms: u64,
}

impl Event for BreakerOpened<'_> {
    fn emit(&self) {
        tracing::warn!(target: "hartonomous::events", endpoint = %self.endpoint, failures = self.failures, open_ms = self.open_ms, "circuit breaker opened");
    }
}

pub struct BreakerHalfOpen<'a> {
    pub endpoint: &'a str,
}

impl Event for BreakerHalfOpen<'_> {
    fn emit(&self) {
        tracing::info!(target: "hartonomous::events", endpoint = %self.endpoint, "circuit breaker half-open: sending a trial call");
    }
}

pub struct BreakerClosed<'a> {
    pub endpoint: &'a str,
}

impl Event for BreakerClosed<'_> {
    fn emit(&self) {
        tracing::info!(target: "hartonomous::events", endpoint = %self.endpoint, "circuit breaker closed");
    }
}

/// The embedding service stopped answering: the window is held and retried
/// (never dead-lettered), logged once per outage.
pub struct EmbeddingUnavailable<'a> {
    pub model: &'a str,
    pub attempts: u32,
    pub error: &'a str,
}

impl Event for EmbeddingUnavailable<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: "hartonomous::events",
            model = %self.model,
            attempts = self.attempts,
            error = %self.error,
            "embedding service unavailable: holding the window and retrying until it answers (partitions pause while the budget is spent)"
        );
    }
}

pub struct EmbeddingRecovered<'a> {
    pub model: &'a str,
}

impl Event for EmbeddingRecovered<'_> {
    fn emit(&self) {
        tracing::info!(target: "hartonomous::events", model = %self.model, "embedding service answers again; resuming");
    }
}

/// The broker refused a dead letter whole; it goes again with its payload
/// cut to `keep` bytes (the `dead_letters` table keeps it whole).
pub struct DeadLetterTruncated<'a> {
    pub source: &'a str,
    pub payload_bytes: usize,
    pub keep: usize,
    pub error: &'a dyn std::fmt::Display,
}

impl Event for DeadLetterTruncated<'_> {
    fn emit(&self) {
        tracing::warn!(
            target: "hartonomous::events",
            source = %self.source,
            payload_bytes = self.payload_bytes,
            keep = self.keep,
            error = %self.error,
            "the broker refused a dead letter; sending it with a truncated payload (the dead_letters table keeps it whole)"
        );
    }
}
