//! Counters of one topology run. The flow core keeps its own (records in,
//! commits, pauses, dead letters); a topology's stages keep theirs as
//! [`Counter`]s labelled by stage, so a new topology adds counters without
//! touching this file. The summary printed by the CLI reads these, and so
//! does `/metrics` (`crate::ops`), at scrape time: the hot path only bumps
//! atomics and, once per batch, a stage's tallies.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::record::TopicPartition;

/// A counter a topology's stage keeps, named by the stage and what it counts
/// (`persist` / `atoms_stored`). Declare them as constants next to the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Counter {
    pub stage: &'static str,
    pub name: &'static str,
}

impl Counter {
    pub const fn new(stage: &'static str, name: &'static str) -> Self {
        Self { stage, name }
    }
}

impl std::fmt::Display for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.stage, self.name)
    }
}

/// Upper bounds (seconds) of the stage latency histogram: 1 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds (seconds) of the end-to-end latency histogram: 5 ms to 5 min,
/// fine around the quarter second that a p99 target is usually set at.
pub const E2E_BUCKETS: [f64; 20] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Upper bounds (records) of the batch size histogram.
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 10000.0];

/// A histogram as Prometheus keeps one: a count per upper bound (not
/// cumulative here; the exporter sums them), the sum and the count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Tally {
    /// The upper bound of the bucket holding quantile `q` (0..1) of the
    /// observations, from `bounds` the tally was kept with; `None` when empty
    /// or when it falls past the last bound.
    pub fn quantile_bound(&self, bounds: &[f64], q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (count, bound) in self.buckets.iter().zip(bounds) {
            seen += count;
            if seen >= rank {
                return Some(*bound);
            }
        }
        None
    }

    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.buckets.len() != bounds.len() {
            self.buckets = vec![0; bounds.len()];
        }
        if let Some(i) = bounds.iter().position(|b| value <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }
}

/// What one stage did, tallied once per batch by the stage task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageTallies {
    /// Live records handed to `process`.
    pub records_in: u64,
    /// Records it passed on (`Outcome::Continue`).
    pub records_out: u64,
    /// Seconds per `process` call, on the run's clock.
    pub latency: Tally,
    /// Live records per `process` call.
    pub batch_records: Tally,
}

/// Where a partition stands, as the runner last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionGauges {
    /// The next offset the consumer hands out.
    pub position: i64,
    /// The log end from the client's statistics (`None` until known).
    pub end: Option<i64>,
    /// The last offset this run committed (`None` before its first commit).
    pub committed: Option<i64>,
    pub paused: bool,
    /// Event time of the newest record handed out, for the lag in seconds.
    pub newest_event_ms: Option<i64>,
}

impl PartitionGauges {
    /// Records between the committed offset (or the position, before the
    /// first commit) and the log end; 0 while the end is unknown.
    pub fn lag_records(&self) -> i64 {
        let from = self.committed.unwrap_or(self.position);
        self.end.map_or(0, |end| (end - from).max(0))
    }

    /// How far behind the partition is in time: the age of the newest record
    /// handed out while records remain, 0 when caught up.
    pub fn lag_seconds(&self, now_ms: i64) -> f64 {
        match (self.lag_records(), self.newest_event_ms) {
            (0, _) | (_, None) => 0.0,
            (_, Some(t)) => ((now_ms - t).max(0) as f64) / 1000.0,
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// The topology these counters belong to (a label on every counter).
    pub topology: String,
    pub records_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub records_done: AtomicU64,
    pub batches: AtomicU64,
    pub commits: AtomicU64,
    pub partition_pauses: AtomicU64,
    /// Records and bytes polled but not yet acknowledged (set by the runner).
    pub in_flight_records: AtomicU64,
    pub in_flight_bytes: AtomicU64,
    /// When the acker last finished a batch, in ms on the run's clock (0: never).
    pub last_progress_ms: AtomicI64,
    /// When the run started, in ms on the run's clock.
    pub started_ms: AtomicI64,
    skipped: Mutex<BTreeMap<&'static str, u64>>,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
    /// Dead letters by (stage, reason).
    dead_lettered_at: Mutex<BTreeMap<(String, String), u64>>,
    counters: Mutex<BTreeMap<Counter, u64>>,
    stages: Mutex<BTreeMap<&'static str, StageTallies>>,
    /// Seconds from each record's timestamp to the acknowledgement of all its outputs.
    end_to_end: Mutex<Tally>,
    /// The assigned partitions, replaced by the runner about twice a second.
    partitions: Mutex<BTreeMap<TopicPartition, PartitionGauges>>,
}

impl Metrics {
    pub fn new(topology: impl Into<String>) -> Self {
        Self { topology: topology.into(), ..Self::default() }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds `n` to a stage's counter. Stages count per window, not per
    /// record, so one lock per call is cheap.
    pub fn count(&self, counter: Counter, n: u64) {
        *self.counters.lock().unwrap().entry(counter).or_default() += n;
    }

    /// A stage's counter (0 when never counted).
    pub fn value(&self, counter: Counter) -> u64 {
        self.counters.lock().unwrap().get(&counter).copied().unwrap_or(0)
    }

    /// Every stage counter counted so far.
    pub fn counters(&self) -> BTreeMap<Counter, u64> {
        self.counters.lock().unwrap().clone()
    }

    pub fn skipped(&self, reason: &'static str) {
        *self.skipped.lock().unwrap().entry(reason).or_default() += 1;
    }

    pub fn dead_lettered(&self, reason: &str) {
        *self.dead_lettered.lock().unwrap().entry(reason.to_string()).or_default() += 1;
    }

    /// A dead letter written for `stage` with `reason` (also counted by reason alone).
    pub fn dead_lettered_in(&self, stage: &str, reason: &str) {
        self.dead_lettered(reason);
        *self.dead_lettered_at.lock().unwrap().entry((stage.to_string(), reason.to_string())).or_default() += 1;
    }

    pub fn dead_letters_by_stage_and_reason(&self) -> BTreeMap<(String, String), u64> {
        self.dead_lettered_at.lock().unwrap().clone()
    }

    /// One `process` call of `stage`: `records_in` live records in,
    /// `records_out` passed on, `seconds` long.
    pub fn stage_batch(&self, stage: &'static str, records_in: usize, records_out: usize, seconds: f64) {
        let mut stages = self.stages.lock().unwrap();
        let t = stages.entry(stage).or_default();
        t.records_in += records_in as u64;
        t.records_out += records_out as u64;
        t.latency.observe(&LATENCY_BUCKETS, seconds);
        t.batch_records.observe(&BATCH_BUCKETS, records_in as f64);
    }

    /// Records whose outputs (store rows, events, dead letters) are all
    /// acknowledged now, `now_ms`, with their timestamps: how long each took
    /// from its timestamp (set by its producer or the broker) to here. Kafka
    /// Streams calls this the record's end-to-end latency.
    pub fn finished(&self, now_ms: i64, timestamps_ms: impl Iterator<Item = i64>) {
        let mut t = self.end_to_end.lock().unwrap();
        for ts in timestamps_ms {
            t.observe(&E2E_BUCKETS, (now_ms - ts).max(0) as f64 / 1000.0);
        }
    }

    pub fn end_to_end(&self) -> Tally {
        self.end_to_end.lock().unwrap().clone()
    }

    pub fn stages(&self) -> BTreeMap<&'static str, StageTallies> {
        self.stages.lock().unwrap().clone()
    }

    /// Replaces the partition gauges with the current assignment's.
    pub fn set_partitions(&self, partitions: BTreeMap<TopicPartition, PartitionGauges>) {
        *self.partitions.lock().unwrap() = partitions;
    }

    pub fn partitions(&self) -> BTreeMap<TopicPartition, PartitionGauges> {
        self.partitions.lock().unwrap().clone()
    }

    pub fn skipped_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.skipped.lock().unwrap().clone()
    }

    pub fn dead_letters_by_reason(&self) -> BTreeMap<String, u64> {
        self.dead_lettered.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_is_the_bound_of_the_bucket_that_holds_it() {
        let m = Metrics::new("t");
        m.finished(10_000, [9_990, 9_960, 9_900, 9_800, 7_000].into_iter());
        let t = m.end_to_end();
        assert_eq!(t.count, 5);
        assert_eq!(t.quantile_bound(&E2E_BUCKETS, 0.4), Some(0.05), "the 2nd of 5 took 40 ms");
        assert_eq!(t.quantile_bound(&E2E_BUCKETS, 0.5), Some(0.1), "the 3rd took 100 ms");
        assert_eq!(t.quantile_bound(&E2E_BUCKETS, 0.8), Some(0.2), "the 4th took 200 ms");
        assert_eq!(t.quantile_bound(&E2E_BUCKETS, 0.99), Some(5.0), "the 5th took 3 s");
        assert_eq!(Tally::default().quantile_bound(&E2E_BUCKETS, 0.99), None);
    }
}
