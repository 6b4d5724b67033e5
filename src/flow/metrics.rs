//! Counters of one topology run. The flow core keeps its own (records in,
//! commits, pauses, dead letters); a topology's stages keep theirs as
//! [`Counter`]s labelled by stage, so a new topology adds counters without
//! touching this file. The summary printed by the CLI reads these.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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
    skipped: Mutex<BTreeMap<&'static str, u64>>,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
    counters: Mutex<BTreeMap<Counter, u64>>,
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

    pub fn skipped_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.skipped.lock().unwrap().clone()
    }

    pub fn dead_letters_by_reason(&self) -> BTreeMap<String, u64> {
        self.dead_lettered.lock().unwrap().clone()
    }
}
