//! What this process has admitted, and what became of it.
//!
//! Stages run one window at a time, in order, so when window `n` reaches a
//! stage every earlier window has left it. The dedup stage admits new
//! contents here (`Pending`); the embed and persist stages record their fate
//! (`Stored` once the store acknowledged the atom, `Rejected` when the
//! content can never be stored). A later request with the same content is
//! matched against a `Pending` or `Stored` admission instead of being
//! embedded again, and the persist stage, which sees it only after the
//! admitting window left persist, answers it from the admission's fate.
//!
//! The ledger is bounded: it remembers the `capacity` most recent
//! admissions. The topology declaration requires `capacity` to be at least
//! the in-flight record budget, so an admission can only be forgotten once
//! its window has left the pipeline; after that, the store answers for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::atom::ContentHash;
use crate::outcome::Rejection;

#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Admitted; its window has not left the persist stage yet.
    Pending,
    /// The store acknowledged the atom.
    Stored,
    /// The content was dead-lettered by a later stage; a later copy is
    /// admitted afresh.
    Rejected(Rejection),
}

#[derive(Debug)]
pub struct Ledger {
    /// Hash → (generation of its latest admission, fate), so a stale queue
    /// entry never evicts a re-admitted hash.
    entries: HashMap<ContentHash, (u64, Fate)>,
    order: VecDeque<(ContentHash, u64)>,
    capacity: usize,
    generation: u64,
}

pub type SharedLedger = Arc<Mutex<Ledger>>;

impl Ledger {
    pub fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1), generation: 0 }
    }

    pub fn shared(capacity: usize) -> SharedLedger {
        Arc::new(Mutex::new(Self::new(capacity)))
    }

    /// True while `h` is admitted and not rejected: a new request with this
    /// content is a repeat.
    pub fn is_admitted(&self, h: &ContentHash) -> bool {
        matches!(self.entries.get(h), Some((_, Fate::Pending | Fate::Stored)))
    }

    pub fn fate(&self, h: &ContentHash) -> Option<&Fate> {
        self.entries.get(h).map(|(_, f)| f)
    }

    /// Admits `h` as pending (re-admits a rejected one).
    pub fn admit(&mut self, h: ContentHash) {
        self.generation += 1;
        self.entries.insert(h, (self.generation, Fate::Pending));
        self.order.push_back((h, self.generation));
        while self.entries.len() > self.capacity {
            let Some((old, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&old).is_some_and(|(g, _)| *g == generation) {
                self.entries.remove(&old);
            }
        }
        // Entries of re-admitted hashes linger in `order`; drop them once they dominate.
        if self.order.len() > 2 * self.capacity {
            let entries = &self.entries;
            self.order.retain(|(h, g)| entries.get(h).is_some_and(|(eg, _)| eg == g));
        }
    }

    pub fn stored(&mut self, h: &ContentHash) {
        if let Some((_, fate)) = self.entries.get_mut(h) {
            *fate = Fate::Stored;
        }
    }

    pub fn rejected(&mut self, h: &ContentHash, why: Rejection) {
        if let Some((_, fate)) = self.entries.get_mut(h) {
            *fate = Fate::Rejected(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> ContentHash {
        ContentHash([b; 32])
    }

    #[test]
    fn bounded_and_evicts_oldest() {
        let mut l = Ledger::new(2);
        l.admit(h(1));
        l.admit(h(2));
        l.admit(h(3));
        assert!(!l.is_admitted(&h(1)) && l.is_admitted(&h(2)) && l.is_admitted(&h(3)));
    }

    #[test]
    fn a_rejected_content_is_admitted_afresh_and_its_stale_entry_never_evicts_it() {
        let mut l = Ledger::new(2);
        l.admit(h(1));
        l.rejected(&h(1), Rejection::new("embed.rejected", "no"));
        assert!(!l.is_admitted(&h(1)));
        assert!(matches!(l.fate(&h(1)), Some(Fate::Rejected(r)) if r.code == "embed.rejected"));
        l.admit(h(2));
        l.admit(h(1));
        assert_eq!(l.fate(&h(1)), Some(&Fate::Pending));
        l.admit(h(3));
        assert!(l.is_admitted(&h(1)) && l.is_admitted(&h(3)) && !l.is_admitted(&h(2)));
        l.stored(&h(1));
        assert_eq!(l.fate(&h(1)), Some(&Fate::Stored));
        assert!(l.is_admitted(&h(1)));
    }
}
