//! Stage 4: decide what each request does to the store, before anything is
//! embedded, so a repeat never costs an embedding call.
//!
//! Every request that reaches this stage is accepted and will be answered
//! (an arrival row and an `AtomIngested` event); this stage decides the
//! answer. One batched look-up asks the store which of the window's contents
//! are stored, and where their rows came from. Then, per request:
//!
//! 1. **Content stored.** If this request's own arrival is recorded, its
//!    recorded outcome stands (a redelivery after a crash answers as it did
//!    before). Otherwise, if the stored atom's lineage is this request's own
//!    position, this request created it before a crash and is answered
//!    `created` again; else it is `matched` (`duplicate.in_store`).
//! 2. **Content not stored.** The first request of the window with it is
//!    `created`, unless this process admitted the content in an earlier
//!    window that is still in flight (`duplicate.recent`); later ones in the
//!    window are `matched` (`duplicate.in_window`).
//!
//! Rule 1 is what makes a crash harmless: a request whose atom was stored
//! but whose event was not yet acknowledged is, after the restart, still the
//! atom's creator, and its event is published then.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::hash::Hashed;
use super::ledger::SharedLedger;
use crate::atom::{ArrivalOutcome, SourcePosition};
use crate::flow::{Item, Metrics, Stage};
use crate::outcome::{Fatal, Outcome};
use crate::record::Record;
use crate::resilience::Resilient;
use crate::store::AtomStore;

pub const IN_WINDOW: &str = "duplicate.in_window";
pub const RECENT: &str = "duplicate.recent";
pub const IN_STORE: &str = "duplicate.in_store";

/// A request with its answer decided.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub hashed: Hashed,
    pub outcome: ArrivalOutcome,
    /// Why it matched (`duplicate.*`); `None` for `created`.
    pub matched_by: Option<&'static str>,
    /// The atom must still be embedded and stored (a new content).
    pub store_atom: bool,
    /// Its arrival row is stored already (a redelivery).
    pub arrival_recorded: bool,
}

impl Admitted {
    /// A request whose content is new: it creates the atom.
    pub fn created(hashed: Hashed) -> Self {
        Self { hashed, outcome: ArrivalOutcome::Created, matched_by: None, store_atom: true, arrival_recorded: false }
    }

    fn matched(mut self, by: &'static str) -> Self {
        self.outcome = ArrivalOutcome::Matched;
        self.matched_by = Some(by);
        self.store_atom = false;
        self
    }
}

pub fn position(record: &Record) -> SourcePosition {
    SourcePosition::new(&*record.position.tp.topic, record.position.tp.partition, record.position.offset)
}

pub struct Dedup {
    pub store: Arc<dyn AtomStore>,
    pub ledger: SharedLedger,
    pub resilient: Resilient,
    pub metrics: Arc<Metrics>,
}

impl Stage for Dedup {
    type In = Hashed;
    type Out = Admitted;

    async fn process(&mut self, items: Vec<Item<Hashed>>) -> Result<Vec<Outcome<Admitted>>, Fatal> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut distinct = HashSet::with_capacity(items.len());
        let hashes: Vec<_> = items.iter().map(|i| i.value.hash).filter(|h| distinct.insert(*h)).collect();
        let store = self.store.clone();
        let stored = self
            .resilient
            .call(|| store.find_atoms(&hashes))
            .await
            .map_err(|e| Fatal::new("dedup", format!("store look-up failed: {e}")))?;
        let asked: Vec<SourcePosition> = items.iter().filter(|i| stored.contains_key(&i.value.hash)).map(|i| position(&i.record)).collect();
        let recorded: HashMap<SourcePosition, ArrivalOutcome> = if asked.is_empty() {
            HashMap::new()
        } else {
            self.resilient
                .call(|| store.arrival_outcomes(&asked))
                .await
                .map_err(|e| Fatal::new("dedup", format!("arrival look-up failed: {e}")))?
        };

        let mut ledger = self.ledger.lock().unwrap();
        let mut first_in_window = HashSet::with_capacity(items.len());
        let out = items
            .into_iter()
            .map(|item| {
                let hash = item.value.hash;
                let admitted = Admitted::created(item.value);
                let decided = if let Some(lineage) = stored.get(&hash) {
                    let me = position(&item.record);
                    match recorded.get(&me) {
                        Some(&outcome) => {
                            let a = if outcome == ArrivalOutcome::Matched { admitted.matched(IN_STORE) } else { Admitted { store_atom: false, ..admitted } };
                            Admitted { arrival_recorded: true, ..a }
                        }
                        None if lineage.contains(&me) => Admitted { store_atom: false, ..admitted },
                        None => admitted.matched(IN_STORE),
                    }
                } else if !first_in_window.insert(hash) {
                    admitted.matched(IN_WINDOW)
                } else if ledger.is_admitted(&hash) {
                    admitted.matched(RECENT)
                } else {
                    ledger.admit(hash);
                    admitted
                };
                if let Some(by) = decided.matched_by {
                    self.metrics.count(super::counters::matched(by), 1);
                }
                Outcome::Continue(decided)
            })
            .collect();
        Ok(out)
    }
}
