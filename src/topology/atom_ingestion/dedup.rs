//! Stage 4: duplicates stop here, so a duplicate never costs an embedding call.
//!
//! Three checks, cheapest first: within the window; against hashes this
//! process admitted recently (they may still be in flight, not yet stored);
//! then one batched look-up in the store for the rest.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use super::hash::Hashed;
use crate::atom::ContentHash;
use crate::flow::{Item, Stage};
use crate::outcome::{Fatal, Outcome};
use crate::resilience::Resilient;
use crate::store::AtomStore;

pub const IN_WINDOW: &str = "duplicate.in_window";
pub const RECENT: &str = "duplicate.recent";
pub const IN_STORE: &str = "duplicate.in_store";

/// A bounded set remembering the most recent insertions (FIFO eviction).
#[derive(Debug)]
pub struct RecentSet {
    set: HashSet<ContentHash>,
    order: VecDeque<ContentHash>,
    capacity: usize,
}

impl RecentSet {
    pub fn new(capacity: usize) -> Self {
        Self { set: HashSet::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    pub fn contains(&self, h: &ContentHash) -> bool {
        self.set.contains(h)
    }

    pub fn insert(&mut self, h: ContentHash) {
        if self.set.insert(h) {
            self.order.push_back(h);
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

pub struct Dedup {
    pub store: Arc<dyn AtomStore>,
    pub recent: RecentSet,
    pub resilient: Resilient,
}

impl Stage for Dedup {
    type In = Hashed;
    type Out = Hashed;

    async fn process(&mut self, items: Vec<Item<Hashed>>) -> Result<Vec<Outcome<Hashed>>, Fatal> {
        let mut seen = HashSet::with_capacity(items.len());
        // None = still a candidate; Some = decided.
        let mut verdicts: Vec<Option<&'static str>> = items
            .iter()
            .map(|i| {
                let h = i.value.hash;
                if !seen.insert(h) {
                    Some(IN_WINDOW)
                } else if self.recent.contains(&h) {
                    Some(RECENT)
                } else {
                    None
                }
            })
            .collect();
        let lookup: Vec<ContentHash> = items.iter().zip(&verdicts).filter(|(_, v)| v.is_none()).map(|(i, _)| i.value.hash).collect();
        if !lookup.is_empty() {
            let store = self.store.clone();
            let stored = self
                .resilient
                .call(|| store.existing_hashes(&lookup))
                .await
                .map_err(|e| Fatal::new("dedup", format!("store look-up failed: {e}")))?;
            for (item, v) in items.iter().zip(verdicts.iter_mut()) {
                if v.is_none() && stored.contains(&item.value.hash) {
                    *v = Some(IN_STORE);
                }
            }
        }
        Ok(items
            .into_iter()
            .zip(verdicts)
            .map(|(item, v)| match v {
                Some(reason) => Outcome::Skip(reason),
                None => {
                    self.recent.insert(item.value.hash);
                    Outcome::Continue(item.value)
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_set_is_bounded_and_evicts_oldest() {
        let mut r = RecentSet::new(2);
        let h = |b: u8| ContentHash([b; 32]);
        r.insert(h(1));
        r.insert(h(2));
        r.insert(h(1));
        r.insert(h(3));
        assert!(!r.contains(&h(1)) && r.contains(&h(2)) && r.contains(&h(3)));
    }
}
