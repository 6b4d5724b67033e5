//! Which offsets may be committed.
//!
//! Contract: the committable offset of a partition is the offset of its
//! lowest record that is still in flight, or one past the highest record
//! polled when none is. So a commit never passes a record whose sink and
//! dead-letter writes are not yet acknowledged, whatever order batches
//! finish in.

use std::collections::{BTreeMap, BTreeSet};

use crate::record::TopicPartition;

#[derive(Debug, Default)]
struct Track {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset handed to the pipeline.
    next: i64,
    committed: Option<i64>,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: BTreeMap<TopicPartition, Track>,
}

impl OffsetTracker {
    /// A record entered the pipeline.
    pub fn track(&mut self, tp: &TopicPartition, offset: i64) {
        let t = self.parts.entry(tp.clone()).or_default();
        t.in_flight.insert(offset);
        t.next = t.next.max(offset + 1);
    }

    /// A record left the pipeline with all its writes acknowledged.
    pub fn done(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(t) = self.parts.get_mut(tp) {
            t.in_flight.remove(&offset);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|t| t.in_flight.len()).sum()
    }

    /// Offsets that may be committed and differ from the last commit.
    pub fn committable(&self) -> BTreeMap<TopicPartition, i64> {
        self.parts
            .iter()
            .filter_map(|(tp, t)| {
                let upto = t.in_flight.first().copied().unwrap_or(t.next);
                (t.committed != Some(upto) && upto > 0).then(|| (tp.clone(), upto))
            })
            .collect()
    }

    pub fn mark_committed(&mut self, offsets: &BTreeMap<TopicPartition, i64>) {
        for (tp, off) in offsets {
            if let Some(t) = self.parts.get_mut(tp) {
                t.committed = Some(*off);
            }
        }
    }

    /// The last offset committed per partition (partitions never committed are absent).
    pub fn committed(&self) -> BTreeMap<TopicPartition, i64> {
        self.parts.iter().filter_map(|(tp, t)| t.committed.map(|c| (tp.clone(), c))).collect()
    }

    pub fn in_flight_for(&self, tps: &[TopicPartition]) -> usize {
        tps.iter().filter_map(|tp| self.parts.get(tp)).map(|t| t.in_flight.len()).sum()
    }

    /// Stops tracking partitions this consumer no longer owns; their records
    /// still in flight will be repeated by the new owner.
    pub fn forget(&mut self, revoked: &[TopicPartition]) {
        for tp in revoked {
            self.parts.remove(tp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_stops_at_the_lowest_unacknowledged_offset() {
        let tp = TopicPartition::new("t", 0);
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.track(&tp, o);
        }
        assert!(t.committable().get(&tp).is_some_and(|o| *o == 10));
        // 12 and 13 finish out of order; 10 and 11 are not acknowledged yet.
        t.done(&tp, 13);
        t.done(&tp, 12);
        assert_eq!(t.committable()[&tp], 10);
        t.done(&tp, 10);
        assert_eq!(t.committable()[&tp], 11);
        t.done(&tp, 11);
        assert_eq!(t.committable()[&tp], 14);
        t.done(&tp, 14);
        assert_eq!(t.committable()[&tp], 15);
        let c = t.committable();
        t.mark_committed(&c);
        assert!(t.committable().is_empty(), "nothing new to commit");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_forget_drops_revoked() {
        let a = TopicPartition::new("t", 0);
        let b = TopicPartition::new("t", 1);
        let mut t = OffsetTracker::default();
        t.track(&a, 0);
        t.track(&b, 0);
        t.done(&b, 0);
        let c = t.committable();
        assert_eq!(c.get(&b), Some(&1));
        assert_eq!(c.get(&a), None, "offset 0 in flight: nothing to commit yet");
        t.forget(&[a.clone()]);
        assert_eq!(t.in_flight(), 0);
    }
}
