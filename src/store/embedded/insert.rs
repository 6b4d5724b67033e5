//! Inserts: each call writes the rows not stored yet as one new part, then
//! adds their keys to memory (under the table's writer lock).

use std::collections::HashSet;

use super::EmbeddedStore;
use super::keys::{read_lock, write_lock};
use super::tables::{arrival_bytes, arrivals_batch, atom_bytes, atoms_batch, chunk_by_size, dead_letter_bytes, dead_letters_batch};
use crate::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};
use crate::store::{DeadLetterRow, InsertReport, StoreError};

impl EmbeddedStore {
    pub(super) async fn insert_atoms_impl(&self, rows: &[AtomRow]) -> Result<InsertReport, StoreError> {
        let guard = self.atoms.writer.clone().lock_owned().await;
        // Only writers add hashes and they hold `guard`, so this view stays
        // current until the write below completes.
        let fresh: Vec<&AtomRow> = {
            let stored = read_lock(&self.keys);
            let mut seen = HashSet::with_capacity(rows.len());
            rows.iter()
                .filter(|r| !stored.atoms.contains_key(&r.content_hash) && seen.insert(r.content_hash))
                .collect()
        };
        let report = InsertReport { inserted: fresh.len(), already_present: rows.len() - fresh.len() };
        if fresh.is_empty() {
            return Ok(report);
        }
        let batches = chunk_by_size(&fresh, atom_bytes, |r| format!("atom {}", r.content_hash))?
            .iter()
            .map(|chunk| atoms_batch(chunk))
            .collect::<Result<Vec<_>, _>>()?;
        let new_keys: Vec<(ContentHash, SourcePosition)> = fresh.iter().map(|r| (r.content_hash, r.position())).collect();
        let keys = self.keys.clone();
        self.atoms
            .write_part(guard, batches, move || {
                let mut keys = write_lock(&keys);
                for (hash, p) in new_keys {
                    let topic = keys.intern(&p.topic);
                    keys.atoms.insert(hash, (topic, p.partition, p.offset));
                }
            })
            .await?;
        self.maintenance.after_insert();
        Ok(report)
    }

    pub(super) async fn insert_arrivals_impl(&self, rows: &[ArrivalRow]) -> Result<InsertReport, StoreError> {
        let guard = self.arrivals.writer.clone().lock_owned().await;
        let fresh: Vec<&ArrivalRow> = {
            let stored = read_lock(&self.keys);
            let mut seen = HashSet::with_capacity(rows.len());
            rows.iter()
                .filter(|r| {
                    let p = r.position();
                    let known = stored.lookup(&p).is_some_and(|k| stored.arrivals.contains_key(&k));
                    !known && seen.insert(p)
                })
                .collect()
        };
        let report = InsertReport { inserted: fresh.len(), already_present: rows.len() - fresh.len() };
        if fresh.is_empty() {
            return Ok(report);
        }
        let batches = chunk_by_size(&fresh, arrival_bytes, |r| format!("arrival {}", r.position()))?
            .iter()
            .map(|chunk| arrivals_batch(chunk))
            .collect::<Result<Vec<_>, _>>()?;
        let new_keys: Vec<(SourcePosition, ArrivalOutcome)> = fresh.iter().map(|r| (r.position(), r.outcome)).collect();
        let keys = self.keys.clone();
        self.arrivals
            .write_part(guard, batches, move || {
                let mut keys = write_lock(&keys);
                for (p, outcome) in new_keys {
                    let topic = keys.intern(&p.topic);
                    keys.arrivals.insert((topic, p.partition, p.offset), outcome);
                }
            })
            .await?;
        self.maintenance.after_insert();
        Ok(report)
    }

    pub(super) async fn insert_dead_letters_impl(&self, rows: &[DeadLetterRow]) -> Result<InsertReport, StoreError> {
        let guard = self.dead_letters.writer.clone().lock_owned().await;
        let fresh: Vec<&DeadLetterRow> = {
            let stored = read_lock(&self.dead_letter_keys);
            let mut seen = HashSet::with_capacity(rows.len());
            rows.iter()
                .filter(|r| {
                    let key = (r.source_partition, r.source_offset);
                    let known = stored.get(&r.source_topic).is_some_and(|set| set.contains(&key));
                    !known && seen.insert((r.source_topic.as_str(), key))
                })
                .collect()
        };
        let report = InsertReport { inserted: fresh.len(), already_present: rows.len() - fresh.len() };
        if fresh.is_empty() {
            return Ok(report);
        }
        let batches = chunk_by_size(&fresh, dead_letter_bytes, |r| {
            format!("dead letter {}/{}@{}", r.source_topic, r.source_partition, r.source_offset)
        })?
        .iter()
        .map(|chunk| dead_letters_batch(chunk))
        .collect::<Result<Vec<_>, _>>()?;
        let new_keys: Vec<(String, i32, i64)> =
            fresh.iter().map(|r| (r.source_topic.clone(), r.source_partition, r.source_offset)).collect();
        let keys = self.dead_letter_keys.clone();
        self.dead_letters
            .write_part(guard, batches, move || {
                let mut keys = write_lock(&keys);
                for (topic, partition, offset) in new_keys {
                    keys.entry(topic).or_default().insert((partition, offset));
                }
            })
            .await?;
        self.maintenance.after_insert();
        Ok(report)
    }
}
