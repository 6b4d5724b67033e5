//! Drives one topology: poll → budget → window → stages → acker → commit.
//!
//! The source loop owns the consumer. It is the only place that polls,
//! pauses, resumes and commits, so none of those race. The acker runs beside
//! it: it writes dead letters, waits for their acknowledgement, and only then
//! marks the batch's offsets done and returns its budget.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};

use super::batch::{Batch, Item, Slot};
use super::commit::OffsetTracker;
use super::metrics::{Metrics, PartitionGauges};
use super::stage::StageContext;
use super::window::{Window, WindowConfig};
use crate::dead_letter::{DeadLetter, DeadLetterArchive};
use crate::log::{LogConsumer, LogError, LogProducer, PollLimit};
use crate::ops::events::{
    CommitFailing, CommitsRecovered, DeadLetterTruncated, DrainTimedOut, Event, FatalStop, FetchRestarted, Idle, NoProgress, PartitionsPaused, PartitionsResumed, ShutdownRequested,
};
use crate::outcome::{Classify, ErrorClass, Fatal};
use crate::record::TopicPartition;
use crate::resilience::{Attempted, BreakerConfig, Resilient, RetryConfig};

/// The one place where in-flight capacity is set.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Records polled but not yet acknowledged. When reached, every assigned
    /// partition is paused until a quarter of the budget is free again.
    pub in_flight_records: usize,
    /// The same bound in bytes (payload + key + headers).
    pub in_flight_bytes: usize,
    /// Batches each edge between stages can hold.
    pub edge_batches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { in_flight_records: 20_000, in_flight_bytes: 64 << 20, edge_batches: 4 }
    }
}

impl Limits {
    pub fn check(&self) -> Result<(), String> {
        if self.in_flight_records == 0 || self.in_flight_bytes == 0 || self.edge_batches == 0 {
            return Err("in_flight_records, in_flight_bytes and edge_batches must all be at least 1".into());
        }
        Ok(())
    }
}

/// When the run ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Once every assigned partition is read to its end and nothing is in
    /// flight (`hartonomous run --input`, tests, replays).
    Drained,
    /// Until the shutdown future completes or a fatal error occurs.
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub topology: String,
    pub dead_letter_topic: String,
    pub window: WindowConfig,
    pub limits: Limits,
    pub poll_wait: Duration,
    pub commit_interval: Duration,
    /// How long shutdown waits for in-flight batches before committing what is done.
    pub drain_timeout: Duration,
    /// How long a group rebalance waits for in-flight records of revoked
    /// partitions. Keep it well below the group's session timeout.
    pub revoke_timeout: Duration,
    pub until: Until,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Fatal(#[from] Fatal),
    #[error("log error: {0}")]
    Log(#[from] LogError),
}

/// What the run committed last, per partition, and the most it held in flight.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub committed: BTreeMap<TopicPartition, i64>,
    /// The highest number of records in flight at any moment. Admission stops
    /// at `limits.in_flight_records`, so this never exceeds it.
    pub peak_in_flight_records: usize,
    /// The highest number of bytes in flight at any moment: at most
    /// `limits.in_flight_bytes` plus one record (a record larger than what is
    /// left of the budget is admitted alone, or it could never pass).
    pub peak_in_flight_bytes: usize,
}

/// Records and bytes in flight, shared by the source (reserves) and the acker (releases).
#[derive(Default)]
struct Budget {
    records: AtomicUsize,
    bytes: AtomicUsize,
    released: Notify,
}

/// Where dead letters go.
pub struct DeadLetterSink {
    pub producer: Arc<dyn LogProducer>,
    /// Optional archive table (`dead_letters`) for analysts.
    pub archive: Option<Arc<dyn DeadLetterArchive>>,
    pub retry: RetryConfig,
}

/// Runs a topology whose stages are already spawned between `head` and `tail`.
pub async fn run<C, T>(
    mut consumer: C,
    head: mpsc::Sender<Batch<()>>,
    tail: mpsc::Receiver<Batch<T>>,
    dlq: DeadLetterSink,
    ctx: StageContext,
    cfg: RunConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<RunReport, RunError>
where
    C: LogConsumer,
    T: Send + 'static,
{
    cfg.window.check().map_err(|e| Fatal::new("runner", format!("window: {e}")))?;
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let budget = Arc::new(Budget::default());
    consumer.set_revoke_handler(revoke_handler(tracker.clone(), cfg.revoke_timeout));
    let acker = tokio::spawn(ack_loop(tail, dlq, ctx.clone(), cfg.clone(), tracker.clone(), budget.clone()));

    let clock = ctx.clock.clone();
    let metrics = ctx.metrics.clone();
    let mut fatal_rx = ctx.fatal.subscribe();
    let mut window = Window::new(cfg.window);
    let mut head = Some(head);
    let mut seq = 0u64;
    // Whether the partitions are meant to be paused. The intent, not a list:
    // it is applied to the current assignment on every turn, so partitions a
    // rebalance hands over while paused are paused too.
    let mut paused = false;
    let mut commit_failing = false;
    let mut last_commit = clock.now_ms();
    let mut last_gauges: Option<i64> = None;
    let mut stall = StallWatch::new(clock.now_ms());
    // A check for a wedged fetch, running beside the loop (see `StallWatch::wants_unstick`).
    let mut unsticking: Option<tokio::task::JoinHandle<Result<Vec<(TopicPartition, i64)>, LogError>>> = None;
    // Event time of the newest record handed out per partition (lag in seconds).
    let mut newest: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    metrics.started_ms.store(clock.now_ms(), Ordering::Relaxed);
    let mut report = RunReport::default();
    tokio::pin!(shutdown);

    // Windows the first edge had no room for. While any wait here the
    // partitions stay paused: the source loop never blocks on a full edge, so
    // it keeps polling (which Kafka needs for group membership).
    let mut pending: VecDeque<Batch<()>> = VecDeque::new();

    let outcome: Result<(), RunError> = loop {
        if let Some(f) = fatal_rx.borrow_and_update().clone() {
            break Err(f.into());
        }

        // Backpressure: pause everything while the budget is spent, the first
        // edge is full or an external dependency's breaker is open; resume
        // with hysteresis once none of that holds.
        let (recs, bytes) = (budget.records.load(Ordering::Acquire), budget.bytes.load(Ordering::Acquire));
        let spent = recs >= cfg.limits.in_flight_records || bytes >= cfg.limits.in_flight_bytes;
        let open = ctx.breakers.open(clock.now_ms());
        let may_resume = pending.is_empty() && open.is_empty() && recs * 4 <= cfg.limits.in_flight_records * 3 && bytes * 4 <= cfg.limits.in_flight_bytes * 3;
        if !paused && (spent || !pending.is_empty() || !open.is_empty()) {
            paused = true;
            Metrics::add(&metrics.partition_pauses, 1);
            PartitionsPaused { in_flight: recs, bytes, queued_windows: pending.len(), open_breakers: &open }.emit();
        } else if paused && may_resume {
            consumer.resume(&consumer.assignment())?;
            paused = false;
            PartitionsResumed { in_flight: recs, bytes }.emit();
        }
        if paused {
            // Cheap when nothing changed: only partitions not paused yet are touched.
            consumer.pause(&consumer.assignment())?;
        }
        metrics.in_flight_records.store(recs as u64, Ordering::Relaxed);
        metrics.in_flight_bytes.store(bytes as u64, Ordering::Relaxed);
        if last_gauges.is_none_or(|t| clock.now_ms() - t >= GAUGE_INTERVAL_MS) {
            last_gauges = Some(clock.now_ms());
            publish_gauges(&consumer, &tracker, &metrics, paused, &mut newest);
            stall.check(&consumer, clock.now_ms(), || {
                format!(
                    "paused={paused} in_flight={recs} bytes={bytes} queued_windows={} tracked_in_flight={} open_breakers={:?}",
                    pending.len(),
                    tracker.lock().unwrap().in_flight(),
                    ctx.breakers.open(clock.now_ms())
                )
            });
        }

        if unsticking.as_ref().is_some_and(|h| h.is_finished()) {
            match unsticking.take().expect("present").await {
                Ok(Ok(parts)) if !parts.is_empty() => FetchRestarted { partitions: &parts, idle_s: stall.idle_s(clock.now_ms()) }.emit(),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "checking partitions for a wedged fetch failed"),
                Err(e) => tracing::warn!(error = %e, "the wedged-fetch check panicked"),
            }
        } else if unsticking.is_none() && !paused && stall.wants_unstick(clock.now_ms()) {
            unsticking = Some(tokio::spawn(consumer.unstick()));
        }

        let now = clock.now_ms();
        let mut wait = cfg.poll_wait;
        if let Some(d) = window.deadline_ms() {
            wait = wait.min(Duration::from_millis((d - now).max(0) as u64));
        }
        // Admission: never more than what is left of the budget, in records
        // and bytes, so the pending queue and every edge stay within it.
        let limit = PollLimit {
            records: if paused { 0 } else { cfg.limits.in_flight_records.saturating_sub(recs).min(cfg.window.max_records.max(1)) },
            bytes: cfg.limits.in_flight_bytes.saturating_sub(bytes),
        };
        let Some(tx) = head.clone() else { break Ok(()) };
        let polled = tokio::select! {
            biased;
            _ = &mut shutdown => {
                ShutdownRequested.emit();
                break Ok(());
            }
            _ = fatal_rx.changed() => continue,
            permit = tx.reserve(), if !pending.is_empty() => {
                match permit {
                    Ok(p) => p.send(pending.pop_front().expect("non-empty")),
                    Err(_) => continue, // the pipeline is gone; the fatal check above says why
                }
                Vec::new()
            }
            _ = budget.released.notified(), if paused => Vec::new(),
            r = consumer.poll_bounded(limit, wait) => r?,
        };

        let now = clock.now_ms();
        let got_any = !polled.is_empty();
        if got_any {
            stall.progressed(now);
        }
        for record in polled {
            let size = record.byte_len();
            tracker.lock().unwrap().track(&record.position.tp, record.position.offset);
            match newest.get_mut(&record.position.tp) {
                Some(t) => *t = record.event_time_ms,
                None => {
                    newest.insert(record.position.tp.clone(), record.event_time_ms);
                }
            }
            let recs = budget.records.fetch_add(1, Ordering::AcqRel) + 1;
            let bytes = budget.bytes.fetch_add(size, Ordering::AcqRel) + size;
            report.peak_in_flight_records = report.peak_in_flight_records.max(recs);
            report.peak_in_flight_bytes = report.peak_in_flight_bytes.max(bytes);
            Metrics::add(&metrics.records_in, 1);
            Metrics::add(&metrics.bytes_in, size as u64);
            if window.would_overflow(size) {
                flush(&mut window, &mut seq, &tx, &mut pending);
            }
            if window.push(record, now) {
                flush(&mut window, &mut seq, &tx, &mut pending);
            }
        }
        if window.is_due(clock.now_ms()) {
            flush(&mut window, &mut seq, &tx, &mut pending);
        }

        if cfg.until == Until::Drained && !got_any && !paused && caught_up(&consumer) {
            // Nothing more will arrive: close the partial window now instead of waiting for its age.
            flush(&mut window, &mut seq, &tx, &mut pending);
            if tracker.lock().unwrap().in_flight() == 0 {
                break Ok(());
            }
        }

        if clock.now_ms() - last_commit >= cfg.commit_interval.as_millis() as i64 {
            match commit(&mut consumer, &tracker, &metrics, &mut report).await {
                // A failed commit loses nothing: the same offsets (or later ones) go next time.
                Err(e) if e.class() == ErrorClass::Retry => {
                    if !commit_failing {
                        CommitFailing { error: &e }.emit();
                    }
                    commit_failing = true;
                }
                Ok(()) if commit_failing => {
                    CommitsRecovered.emit();
                    commit_failing = false;
                }
                other => other?,
            }
            last_commit = clock.now_ms();
        }
    };

    // Drain: hand over what is queued, close the head so stages finish what
    // they hold, then wait for the acker.
    if outcome.is_ok() {
        if let Some(tx) = head.clone() {
            flush(&mut window, &mut seq, &tx, &mut pending);
            while let Some(b) = pending.pop_front() {
                if tx.send(b).await.is_err() {
                    break;
                }
            }
        }
    }
    head.take();
    let drained = crate::clock::timeout(clock.as_ref(), cfg.drain_timeout, acker).await;
    if drained.is_none() {
        DrainTimedOut { timeout_ms: cfg.drain_timeout.as_millis() as u64 }.emit();
    }
    // Whatever happened, committing what is acknowledged is always safe.
    commit(&mut consumer, &tracker, &metrics, &mut report).await?;
    if let Some(f) = fatal_rx.borrow().clone() {
        return Err(f.into());
    }
    outcome.map(|_| report)
}

/// Says so, loudly and with the state an operator needs, when no record has
/// arrived for a while although records wait in the assigned partitions.
/// Backpressure (an outage, a full budget) is a legitimate reason; the line
/// gives it. At most one line per `EVERY_MS`.
struct StallWatch {
    last_record_ms: i64,
    last_warned_ms: Option<i64>,
    last_unstick_ms: Option<i64>,
}

impl StallWatch {
    const AFTER_MS: i64 = 20_000;
    const EVERY_MS: i64 = 30_000;
    /// A consumer that has polled nothing for this long while not paused is
    /// checked from outside for records waiting at its position
    /// (`LogConsumer::unstick`), then again at most every `UNSTICK_EVERY_MS`.
    /// Once a caught-up consumer idles, that is one short look per minute.
    const UNSTICK_AFTER_MS: i64 = 30_000;
    const UNSTICK_EVERY_MS: i64 = 60_000;

    fn new(now_ms: i64) -> Self {
        Self { last_record_ms: now_ms, last_warned_ms: None, last_unstick_ms: None }
    }

    fn progressed(&mut self, now_ms: i64) {
        self.last_record_ms = now_ms;
        self.last_warned_ms = None;
        self.last_unstick_ms = None;
    }

    fn idle_s(&self, now_ms: i64) -> i64 {
        (now_ms - self.last_record_ms) / 1000
    }

    fn wants_unstick(&mut self, now_ms: i64) -> bool {
        let due = now_ms - self.last_record_ms >= Self::UNSTICK_AFTER_MS && self.last_unstick_ms.is_none_or(|t| now_ms - t >= Self::UNSTICK_EVERY_MS);
        if due {
            self.last_unstick_ms = Some(now_ms);
        }
        due
    }

    fn check<C: LogConsumer>(&mut self, consumer: &C, now_ms: i64, runner_state: impl FnOnce() -> String) {
        if now_ms - self.last_record_ms < Self::AFTER_MS || self.last_warned_ms.is_some_and(|t| now_ms - t < Self::EVERY_MS) {
            return;
        }
        let waiting: i64 = consumer.positions().values().filter_map(|p| p.end.map(|e| (e - p.next).max(0))).sum();
        self.last_warned_ms = Some(now_ms);
        if waiting == 0 {
            Idle { idle_s: (now_ms - self.last_record_ms) / 1000, consumer: &consumer.describe() }.emit();
            return;
        }
        NoProgress { waiting, idle_s: (now_ms - self.last_record_ms) / 1000, runner: &runner_state(), consumer: &consumer.describe() }.emit();
    }
}

/// How often the runner refreshes the partition gauges (`/metrics`, `/ready`).
const GAUGE_INTERVAL_MS: i64 = 500;

/// Publishes where each assigned partition stands. Partitions no longer
/// assigned drop out, here and from `newest`.
fn publish_gauges<C: LogConsumer>(consumer: &C, tracker: &Mutex<OffsetTracker>, metrics: &Metrics, paused: bool, newest: &mut BTreeMap<TopicPartition, i64>) {
    let positions = consumer.positions();
    newest.retain(|tp, _| positions.contains_key(tp));
    let committed = tracker.lock().unwrap().committed();
    let gauges = positions
        .into_iter()
        .map(|(tp, p)| {
            let g = PartitionGauges { position: p.next, end: p.end, committed: committed.get(&tp).copied(), paused, newest_event_ms: newest.get(&tp).copied() };
            (tp, g)
        })
        .collect();
    metrics.set_partitions(gauges);
}

/// Drains revoked partitions for the consumer's rebalance callback. It runs
/// on the thread that polls, so it waits with a plain blocking sleep; the
/// stages and the acker keep running on the runtime's other threads. Records
/// of these partitions still in the open window cannot finish meanwhile: they
/// run out the deadline and are repeated by the new owner.
fn revoke_handler(tracker: Arc<Mutex<OffsetTracker>>, timeout: Duration) -> crate::log::RevokeHandler {
    Arc::new(move |revoked: &[TopicPartition]| {
        let deadline = std::time::Instant::now() + timeout;
        while tracker.lock().unwrap().in_flight_for(revoked) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut t = tracker.lock().unwrap();
        let offsets: BTreeMap<TopicPartition, i64> = t.committable().into_iter().filter(|(tp, _)| revoked.contains(tp)).collect();
        tracing::info!(partitions = revoked.len(), left_in_flight = t.in_flight_for(revoked), "partitions revoked; committing what finished");
        t.forget(revoked);
        offsets
    })
}

/// Every assigned partition is read to its end. False while nothing is
/// assigned yet (a group still joining is not caught up).
fn caught_up<C: LogConsumer>(consumer: &C) -> bool {
    let positions = consumer.positions();
    !positions.is_empty() && positions.values().all(|p| p.end.is_some_and(|end| p.next >= end))
}

/// Traces a window links to, at most: a span carries its links in every export.
const MAX_BATCH_LINKS: usize = 128;

/// The root span of one window, linked to the trace of each record that
/// carried a `traceparent` (crate::trace), so that a trace viewer leads from
/// a producer's trace to the windows that processed it.
fn batch_span(seq: u64, records: &[crate::record::Record]) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(parent: None, "batch", batch = seq, records = records.len());
    if span.is_disabled() {
        return span;
    }
    let mut linked = std::collections::HashSet::new();
    for r in records {
        let Some(tp) = crate::trace::TraceParent::of_header(r.headers.get("traceparent")) else { continue };
        if linked.len() >= MAX_BATCH_LINKS {
            break;
        }
        if linked.insert(tp.trace_id().to_string()) {
            if let Some(cx) = tp.span_context() {
                span.add_link(cx);
            }
        }
    }
    span
}

/// Hands the window to the first edge, or queues it when the edge is full
/// (the caller then pauses the partitions).
fn flush(window: &mut Window, seq: &mut u64, head: &mpsc::Sender<Batch<()>>, pending: &mut VecDeque<Batch<()>>) {
    let (records, bytes) = window.take();
    if records.is_empty() {
        return;
    }
    *seq += 1;
    let span = batch_span(*seq, &records);
    let slots = records.into_iter().map(|r| Slot::Live(Item { record: Arc::new(r), value: () })).collect();
    let batch = Batch { seq: *seq, slots, bytes, span };
    if !pending.is_empty() {
        pending.push_back(batch);
        return;
    }
    match head.try_send(batch) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(b)) => pending.push_back(b),
        // The pipeline is gone (a stage failed fatally); the run loop reports it.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

async fn commit<C: LogConsumer>(consumer: &mut C, tracker: &Mutex<OffsetTracker>, metrics: &Metrics, report: &mut RunReport) -> Result<(), LogError> {
    let offsets = tracker.lock().unwrap().committable();
    if offsets.is_empty() {
        return Ok(());
    }
    crate::failpoint::hit("commit.before");
    consumer.commit(&offsets).await?;
    tracker.lock().unwrap().mark_committed(&offsets);
    Metrics::add(&metrics.commits, 1);
    report.committed.extend(offsets);
    Ok(())
}

/// The end of every pipeline: dead letters out, then offsets done.
async fn ack_loop<T: Send + 'static>(
    mut tail: mpsc::Receiver<Batch<T>>,
    dlq: DeadLetterSink,
    ctx: StageContext,
    cfg: RunConfig,
    tracker: Arc<Mutex<OffsetTracker>>,
    budget: Arc<Budget>,
) {
    let breaker = ctx.breakers.breaker(format!("dead-letter:{}", cfg.dead_letter_topic), BreakerConfig::default());
    let resilient = Resilient::new(dlq.retry.clone(), breaker, ctx.clock.clone());
    while let Some(batch) = tail.recv().await {
        let mut letters = Vec::new();
        for slot in &batch.slots {
            if let Slot::Done { record, end } = slot {
                if let Some(d) = DeadLetter::from_end(&cfg.topology, record, end) {
                    letters.push(d);
                }
            }
        }
        let producer = dlq.producer.as_ref();
        let sends = letters.iter().map(|d| send_dead_letter(&resilient, producer, d, &cfg.dead_letter_topic));
        for (d, sent) in letters.iter().zip(join_all(sends).await) {
            if let Err(e) = sent {
                // A dead letter that cannot be written must not be committed past: stop.
                return ctx_fatal(&ctx, format!("writing dead letter for {}@{} failed: {e}", d.record.position.tp, d.record.position.offset));
            }
            ctx.metrics.dead_lettered_in(d.stage, d.reason);
        }
        if let (Some(store), false) = (&dlq.archive, letters.is_empty()) {
            let rows: Vec<_> = letters.iter().map(DeadLetter::to_row).collect();
            if let Err(e) = resilient.call(|| store.insert_dead_letters(&rows)).await {
                return ctx_fatal(&ctx, format!("archiving dead letters failed: {e}"));
            }
        }
        if !letters.is_empty() {
            crate::failpoint::hit("dead_letter.after_write");
        }
        let done = batch.slots.iter().filter(|s| matches!(s, Slot::Live(_))).count();
        Metrics::add(&ctx.metrics.records_done, done as u64);
        ctx.metrics.finished(ctx.clock.now_ms(), batch.slots.iter().map(|s| s.record().event_time_ms));
        ctx.metrics.last_progress_ms.store(ctx.clock.now_ms(), Ordering::Relaxed);
        Metrics::add(&ctx.metrics.batches, 1);
        {
            let mut t = tracker.lock().unwrap();
            for slot in &batch.slots {
                let p = &slot.record().position;
                t.done(&p.tp, p.offset);
            }
        }
        budget.records.fetch_sub(batch.len(), Ordering::AcqRel);
        budget.bytes.fetch_sub(batch.bytes, Ordering::AcqRel);
        budget.released.notify_waiters();
    }
}

/// Writes one dead letter. A copy the broker refuses as such (too large for
/// the dead-letter topic, typically) is sent again with its payload cut to
/// [`TRUNCATED_PAYLOAD_BYTES`], then to nothing: the provenance headers
/// always go out, `hartonomous.dlq.truncated` says how large the payload was,
/// and the `dead_letters` table (when archiving is on) keeps it whole.
async fn send_dead_letter(resilient: &Resilient, producer: &dyn LogProducer, d: &DeadLetter<'_>, topic: &str) -> Result<(), String> {
    let mut out = d.to_outgoing(topic);
    for keep in [Some(TRUNCATED_PAYLOAD_BYTES), Some(0), None] {
        match resilient.call(|| producer.send(out.clone())).await {
            Ok(_) => return Ok(()),
            Err(Attempted::Rejected { error, class: ErrorClass::Invalid, .. }) => match keep {
                Some(keep) => {
                    let source = format!("{}@{}", d.record.position.tp, d.record.position.offset);
                    DeadLetterTruncated { source: &source, payload_bytes: d.record.payload.len(), keep, error: &error }.emit();
                    out = d.to_truncated_outgoing(topic, keep);
                }
                None => return Err(error.to_string()),
            },
            Err(e) => return Err(e.to_string()),
        }
    }
    unreachable!("the last round returns")
}

/// The payload kept in a dead letter the broker refused whole.
pub const TRUNCATED_PAYLOAD_BYTES: usize = 64 * 1024;

fn ctx_fatal(ctx: &StageContext, message: String) {
    FatalStop { stage: "acker", error: &message }.emit();
    ctx.fatal.send_if_modified(|f| {
        if f.is_none() {
            *f = Some(Fatal::new("dead-letter", message));
            true
        } else {
            false
        }
    });
}

impl<E: std::fmt::Display> From<Attempted<E>> for Fatal {
    fn from(a: Attempted<E>) -> Self {
        let class = match &a {
            Attempted::Rejected { class, .. } => *class,
            Attempted::Exhausted { .. } => ErrorClass::Retry,
        };
        Fatal::new("runner", format!("{a} ({class:?})"))
    }
}
