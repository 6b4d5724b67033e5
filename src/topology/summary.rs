//! What one run did, as printed by `demo` and `run`: the flow core's counts
//! (records in, dead letters, commits) around the topology's own lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::flow::runner::RunReport;
use crate::flow::{Counter, Metrics};
use crate::record::TopicPartition;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub topology: String,
    pub records_in: u64,
    pub skipped_by_reason: BTreeMap<String, u64>,
    pub dead_lettered: u64,
    pub dead_letters_by_reason: BTreeMap<String, u64>,
    /// Every counter the topology's stages kept.
    pub counters: BTreeMap<Counter, u64>,
    pub committed: BTreeMap<TopicPartition, i64>,
}

impl Summary {
    pub fn new(topology: &str, m: &Metrics, report: RunReport) -> Self {
        let dead = m.dead_letters_by_reason();
        Self {
            topology: topology.to_string(),
            records_in: Metrics::get(&m.records_in),
            skipped_by_reason: m.skipped_by_reason().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            dead_lettered: dead.values().sum(),
            dead_letters_by_reason: dead,
            counters: m.counters(),
            committed: report.committed,
        }
    }

    /// A stage's counter (0 when never counted).
    pub fn count(&self, counter: Counter) -> u64 {
        self.counters.get(&counter).copied().unwrap_or(0)
    }

    /// The counters of `stage` whose name starts with `prefix`, by name.
    pub fn counted(&self, stage: &str, prefix: &str) -> BTreeMap<&'static str, u64> {
        self.counters.iter().filter(|(c, _)| c.stage == stage && c.name.starts_with(prefix)).map(|(c, n)| (c.name, *n)).collect()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{} summary", self.topology);
        let _ = writeln!(s, "  records in            {:>8}", self.records_in);
        match crate::topology::find(&self.topology) {
            Some(t) => {
                for line in t.summarize(self) {
                    let _ = writeln!(s, "  {line}");
                }
            }
            None => {
                for (c, n) in &self.counters {
                    let _ = writeln!(s, "  {:<22}{n:>8}", c.to_string());
                }
            }
        }
        for (reason, n) in &self.skipped_by_reason {
            let _ = writeln!(s, "  skipped {reason:<14}{n:>8}");
        }
        let _ = writeln!(s, "  dead-lettered         {:>8}", self.dead_lettered);
        for (reason, n) in &self.dead_letters_by_reason {
            let _ = writeln!(s, "    {reason:<22}{n:>6}");
        }
        let committed: Vec<String> = self.committed.iter().map(|(tp, o)| format!("{tp}@{o}")).collect();
        let _ = write!(s, "  committed             {}", if committed.is_empty() { "nothing".to_string() } else { committed.join(" ") });
        s
    }
}
