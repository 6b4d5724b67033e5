//! The stored keys in memory (atom hashes with their lineage, arrival outcomes,
//! dead-letter positions), and reading them from every part at open.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use arrow::array::{Array, Int32Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::error::{arrow_error, io_error, parquet_error};
use super::index::{Index, Kind};
use crate::atom::{ArrivalOutcome, ContentHash, SourcePosition};
use crate::store::StoreError;

/// Dead-letter keys, grouped by source topic so each topic name is held once.
pub(super) type DeadLetterKeys = HashMap<String, HashSet<(i32, i64)>>;

/// A source position in memory: the topic as an index into [`Keys::topics`].
type PosKey = (u32, i32, i64);

/// The atoms' and arrivals' keys, under one lock so the two stay consistent.
#[derive(Default)]
pub(super) struct Keys {
    /// Hash → lineage of the stored atom.
    pub(super) atoms: HashMap<ContentHash, PosKey>,
    /// Source position → recorded outcome.
    pub(super) arrivals: HashMap<PosKey, ArrivalOutcome>,
    topics: Vec<Arc<str>>,
    topic_index: HashMap<Arc<str>, u32>,
}

impl Keys {
    pub(super) fn intern(&mut self, topic: &str) -> u32 {
        if let Some(i) = self.topic_index.get(topic) {
            return *i;
        }
        let name: Arc<str> = Arc::from(topic);
        let i = self.topics.len() as u32;
        self.topics.push(name.clone());
        self.topic_index.insert(name, i);
        i
    }

    pub(super) fn lookup(&self, p: &SourcePosition) -> Option<PosKey> {
        self.topic_index.get(p.topic.as_str()).map(|t| (*t, p.partition, p.offset))
    }

    pub(super) fn position(&self, k: &PosKey) -> SourcePosition {
        SourcePosition::new(&*self.topics[k.0 as usize], k.1, k.2)
    }
}

pub(super) fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads only `columns` of the Parquet file at `path`, batch by batch.
fn read_columns(
    path: &Path,
    columns: &[&str],
    mut each: impl FnMut(&RecordBatch) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let context = || format!("read {}", path.display());
    let file = File::open(path).map_err(|e| io_error(context(), e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_error(context(), e))?;
    let mut indices = Vec::with_capacity(columns.len());
    for column in columns {
        let index = builder
            .schema()
            .index_of(column)
            .map_err(|_| StoreError::Fatal(format!("{}: no column `{column}`", context())))?;
        indices.push(index);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let reader = builder.with_projection(mask).build().map_err(|e| parquet_error(context(), e))?;
    for batch in reader {
        each(&batch.map_err(|e| arrow_error(context(), e))?)?;
    }
    Ok(())
}

fn column<'b, T: 'static>(batch: &'b RecordBatch, name: &str, path: &Path) -> Result<&'b T, StoreError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            StoreError::Fatal(format!(
                "{}: column `{name}` has an unexpected type ({:?})",
                path.display(),
                batch.column_by_name(name).map(|c| c.data_type().clone())
            ))
        })
}

fn parse_hash(value: &str, path: &Path) -> Result<ContentHash, StoreError> {
    ContentHash::from_hex(value)
        .ok_or_else(|| StoreError::Fatal(format!("{}: content_hash {value:?} is not 64 hex chars", path.display())))
}

pub(super) fn load_atom_keys(path: &Path, keys: &mut Keys) -> Result<(), StoreError> {
    read_columns(path, &["content_hash", "source_topic", "source_partition", "source_offset"], |batch| {
        let hashes = column::<StringArray>(batch, "content_hash", path)?;
        let topics = column::<StringArray>(batch, "source_topic", path)?;
        let partitions = column::<Int32Array>(batch, "source_partition", path)?;
        let offsets = column::<Int64Array>(batch, "source_offset", path)?;
        for i in 0..batch.num_rows() {
            let hash = parse_hash(hashes.value(i), path)?;
            let topic = keys.intern(topics.value(i));
            // The first stored row of a hash is its lineage; inserts never write a second.
            keys.atoms.entry(hash).or_insert((topic, partitions.value(i), offsets.value(i)));
        }
        Ok(())
    })
}

pub(super) fn load_arrival_keys(path: &Path, keys: &mut Keys) -> Result<(), StoreError> {
    read_columns(path, &["source_topic", "source_partition", "source_offset", "outcome"], |batch| {
        let topics = column::<StringArray>(batch, "source_topic", path)?;
        let partitions = column::<Int32Array>(batch, "source_partition", path)?;
        let offsets = column::<Int64Array>(batch, "source_offset", path)?;
        let outcomes = column::<StringArray>(batch, "outcome", path)?;
        for i in 0..batch.num_rows() {
            let outcome = ArrivalOutcome::parse(outcomes.value(i)).ok_or_else(|| {
                StoreError::Fatal(format!("{}: outcome {:?} is neither created nor matched", path.display(), outcomes.value(i)))
            })?;
            let topic = keys.intern(topics.value(i));
            keys.arrivals.entry((topic, partitions.value(i), offsets.value(i))).or_insert(outcome);
        }
        Ok(())
    })
}

pub(super) fn load_dead_letter_keys(path: &Path, keys: &mut DeadLetterKeys) -> Result<(), StoreError> {
    read_columns(path, &["source_topic", "source_partition", "source_offset"], |batch| {
        let topics = column::<StringArray>(batch, "source_topic", path)?;
        let partitions = column::<Int32Array>(batch, "source_partition", path)?;
        let offsets = column::<Int64Array>(batch, "source_offset", path)?;
        for i in 0..batch.num_rows() {
            let topic = topics.value(i);
            let key = (partitions.value(i), offsets.value(i));
            match keys.get_mut(topic) {
                Some(set) => {
                    set.insert(key);
                }
                None => {
                    keys.insert(topic.to_owned(), HashSet::from([key]));
                }
            }
        }
        Ok(())
    })
}

// ---- key indexes (index.rs): what goes in, and loading them ----

impl Keys {
    /// The atoms' keys as index entries (hash, topic, partition, offset).
    pub(super) fn atoms_index(&self) -> (Vec<Arc<str>>, Vec<u8>) {
        let mut entries = Vec::with_capacity(self.atoms.len() * Kind::Atoms.entry_len());
        for (hash, (topic, partition, offset)) in &self.atoms {
            entries.extend_from_slice(&hash.0);
            entries.extend_from_slice(&topic.to_le_bytes());
            entries.extend_from_slice(&partition.to_le_bytes());
            entries.extend_from_slice(&offset.to_le_bytes());
        }
        (self.topics.clone(), entries)
    }

    /// The arrivals' keys as index entries (topic, partition, offset, outcome).
    pub(super) fn arrivals_index(&self) -> (Vec<Arc<str>>, Vec<u8>) {
        let mut entries = Vec::with_capacity(self.arrivals.len() * Kind::Arrivals.entry_len());
        for ((topic, partition, offset), outcome) in &self.arrivals {
            entries.extend_from_slice(&topic.to_le_bytes());
            entries.extend_from_slice(&partition.to_le_bytes());
            entries.extend_from_slice(&offset.to_le_bytes());
            entries.push(match outcome {
                ArrivalOutcome::Created => 0,
                ArrivalOutcome::Matched => 1,
            });
        }
        (self.topics.clone(), entries)
    }

    /// Adds the keys of an atoms or arrivals index.
    pub(super) fn load_index(&mut self, index: &Index) -> Result<(), StoreError> {
        let topics: Vec<u32> = index.topics.iter().map(|t| self.intern(t)).collect();
        let topic = |raw: &[u8]| -> Result<u32, StoreError> {
            let i = u32::from_le_bytes(raw.try_into().expect("4 bytes")) as usize;
            topics.get(i).copied().ok_or_else(|| StoreError::Fatal(format!("key index: topic {i} of {}", topics.len())))
        };
        let int32 = |raw: &[u8]| i32::from_le_bytes(raw.try_into().expect("4 bytes"));
        let int64 = |raw: &[u8]| i64::from_le_bytes(raw.try_into().expect("8 bytes"));
        match index.kind {
            Kind::Atoms => {
                self.atoms.reserve(index.entries.len() / Kind::Atoms.entry_len());
                for e in index.entries() {
                    let hash = ContentHash(e[..32].try_into().expect("32 bytes"));
                    let key = (topic(&e[32..36])?, int32(&e[36..40]), int64(&e[40..48]));
                    self.atoms.entry(hash).or_insert(key);
                }
            }
            Kind::Arrivals => {
                self.arrivals.reserve(index.entries.len() / Kind::Arrivals.entry_len());
                for e in index.entries() {
                    let outcome = if e[16] == 0 { ArrivalOutcome::Created } else { ArrivalOutcome::Matched };
                    self.arrivals.entry((topic(&e[..4])?, int32(&e[4..8]), int64(&e[8..16]))).or_insert(outcome);
                }
            }
            Kind::DeadLetters => return Err(StoreError::Fatal("key index: dead letters are not atom keys".into())),
        }
        Ok(())
    }
}

/// The dead letters' keys as index entries (topic, partition, offset).
pub(super) fn dead_letters_index(keys: &DeadLetterKeys) -> (Vec<String>, Vec<u8>) {
    let mut topics = Vec::with_capacity(keys.len());
    let mut entries = Vec::new();
    for (i, (topic, positions)) in keys.iter().enumerate() {
        topics.push(topic.clone());
        for (partition, offset) in positions {
            entries.extend_from_slice(&(i as u32).to_le_bytes());
            entries.extend_from_slice(&partition.to_le_bytes());
            entries.extend_from_slice(&offset.to_le_bytes());
        }
    }
    (topics, entries)
}

pub(super) fn load_dead_letters_index(index: &Index, keys: &mut DeadLetterKeys) -> Result<(), StoreError> {
    for e in index.entries() {
        let i = u32::from_le_bytes(e[..4].try_into().expect("4 bytes")) as usize;
        let topic = index.topics.get(i).ok_or_else(|| StoreError::Fatal(format!("key index: topic {i} of {}", index.topics.len())))?;
        let key = (i32::from_le_bytes(e[4..8].try_into().expect("4 bytes")), i64::from_le_bytes(e[8..16].try_into().expect("8 bytes")));
        keys.entry(topic.clone()).or_default().insert(key);
    }
    Ok(())
}
