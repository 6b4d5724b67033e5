//! Counters of one topology run, named in one place. The summary printed by
//! the CLI and the Prometheus exporter both read these.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub records_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub records_done: AtomicU64,
    pub batches: AtomicU64,
    pub commits: AtomicU64,
    pub partition_pauses: AtomicU64,
    pub embedding_calls: AtomicU64,
    pub embedded_texts: AtomicU64,
    pub atoms_stored: AtomicU64,
    pub arrivals_stored: AtomicU64,
    pub events_published: AtomicU64,
    skipped: Mutex<BTreeMap<&'static str, u64>>,
    matched: Mutex<BTreeMap<&'static str, u64>>,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn skipped(&self, reason: &'static str) {
        *self.skipped.lock().unwrap().entry(reason).or_default() += 1;
    }

    /// A request matched content already stored or admitted (`duplicate.*`).
    pub fn matched(&self, by: &'static str) {
        *self.matched.lock().unwrap().entry(by).or_default() += 1;
    }

    pub fn matched_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.matched.lock().unwrap().clone()
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
