//! Stage 4: duplicates stop here, so a duplicate never costs an embedding call.
//!
//! Three checks, cheapest first: within the window; against hashes this
//! process admitted recently (they may still be in flight, not yet stored);
//! then one batched look-up in the store for the rest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use super::hash::Hashed;
use crate::atom::ContentHash;
use crate::flow::{Item, Stage};
use crate::outcome::{Fatal, Outcome};
use crate::resilience::Resilient;
use crate::store::AtomStore;

pub const IN_WINDOW: &str = "duplicate.in_window";
pub const RECENT: &str = "duplicate.recent";
pub const IN_STORE: &str = "duplicate.in_store";

/// Hashes admitted recently, shared by the dedup stage (which adds them) and
/// the later stages (which remove a hash when its record is dead-lettered, so
/// that a later copy of that content is not skipped as a duplicate of a record
/// that was never stored).
pub type Recent = Arc<Mutex<RecentSet>>;

/// A bounded set remembering the most recent insertions (FIFO eviction).
#[derive(Debug)]
pub struct RecentSet {
    /// Hash → generation of its latest insertion, so a stale queue entry
    /// never evicts a re-inserted hash.
    set: HashMap<ContentHash, u64>,
    order: VecDeque<(ContentHash, u64)>,
    capacity: usize,
    generation: u64,
}

impl RecentSet {
    pub fn new(capacity: usize) -> Self {
        Self { set: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1), generation: 0 }
    }

    pub fn shared(capacity: usize) -> Recent {
        Arc::new(Mutex::new(Self::new(capacity)))
    }

    pub fn contains(&self, h: &ContentHash) -> bool {
        self.set.contains_key(h)
    }

    pub fn insert(&mut self, h: ContentHash) {
        if self.set.contains_key(&h) {
            return;
        }
        self.generation += 1;
        self.set.insert(h, self.generation);
        self.order.push_back((h, self.generation));
        while self.set.len() > self.capacity {
            let Some((old, generation)) = self.order.pop_front() else { break };
            if self.set.get(&old) == Some(&generation) {
                self.set.remove(&old);
            }
        }
        // Entries of removed hashes linger in `order`; drop them once they dominate.
        if self.order.len() > 2 * self.capacity {
            let set = &self.set;
            self.order.retain(|(h, g)| set.get(h) == Some(g));
        }
    }

    pub fn remove(&mut self, h: &ContentHash) {
        self.set.remove(h);
    }
}

/// Forgets `hash` after its record was dead-lettered by a later stage.
pub fn forget(recent: &Option<Recent>, hash: &ContentHash) {
    if let Some(r) = recent {
        r.lock().unwrap().remove(hash);
    }
}

pub struct Dedup {
    pub store: Arc<dyn AtomStore>,
    pub recent: Recent,
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
                } else if self.recent.lock().unwrap().contains(&h) {
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
                    self.recent.lock().unwrap().insert(item.value.hash);
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

    #[test]
    fn a_removed_and_reinserted_hash_is_not_evicted_by_its_stale_entry() {
        let mut r = RecentSet::new(2);
        let h = |b: u8| ContentHash([b; 32]);
        r.insert(h(1));
        r.remove(&h(1));
        r.insert(h(2));
        r.insert(h(1));
        r.insert(h(3));
        assert!(r.contains(&h(1)) && r.contains(&h(3)) && !r.contains(&h(2)));
    }
}
