//! Background maintenance of the embedded store: merging small parts into
//! larger ones (compaction) and keeping the key indexes (`index.rs`) current.
//!
//! # Compaction
//!
//! Each insert writes one part, so a long run leaves thousands of small
//! files. When a table's newest visible parts include at least
//! [`Policy::min_parts`] small ones in a row (each under
//! [`Policy::small_bytes`]), they are merged into one part named for the
//! range of sequence numbers it holds (`part-<first>-<last>-m-…`).
//!
//! - **Writes are never blocked.** A merge takes no writer lock: it only
//!   reads parts that exist, and every insert in progress has a higher
//!   sequence number than any of them, so it lands outside the range.
//! - **Readers never see a row twice or miss one.** The merged part appears
//!   with one rename; from that moment the parts in its range are hidden by
//!   name (`files::visible`), deleted or not. A crash before the rename
//!   leaves a temp file that the next open removes; a crash after it leaves
//!   hidden parts that a later run deletes. No row is lost either way.
//! - **Hidden parts wait [`Policy::grace`] before they are deleted**, so a
//!   query that listed them a moment before the merge (in this process or in
//!   `hartonomous query`) can still read them.
//!
//! # Key indexes
//!
//! After a run that merged something, or when open had to read parts past a
//! table's index, the index is written again from memory, holding the
//! table's writer lock only while the keys are copied (so an index never
//! misses a key of a part it claims to cover).

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use arrow::array::{ArrayRef, new_null_array};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::error::{arrow_error, io_error, parquet_error};
use super::files::{Part, TEMP_SUFFIX, Table, hidden, list_parts, merged_name, sync_dir, visible};
use super::index::{self, Kind};
use super::keys::{DeadLetterKeys, Keys, dead_letters_index, read_lock};
use crate::store::StoreError;

/// When parts are merged and hidden ones deleted.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Merge once at least this many small parts follow each other at the
    /// newest end of a table.
    pub min_parts: usize,
    /// A part of at least this many bytes is left alone.
    pub small_bytes: u64,
    /// How long a hidden part stays on disk after the merge that hid it.
    pub grace: Duration,
    /// Rows per row group of a merged part (bounds the merge's memory).
    pub row_group_rows: usize,
    /// Start runs in the background after inserts; `false` leaves them to
    /// [`EmbeddedStore::compact`](super::EmbeddedStore::compact).
    pub background: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self { min_parts: 8, small_bytes: 256 << 20, grace: Duration::from_secs(60), row_group_rows: 16_384, background: true }
    }
}

/// What one merge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub table: &'static str,
    pub parts: usize,
    pub rows: usize,
    pub first: u64,
    pub last: u64,
}

/// The store's maintenance state, shared with the background task.
#[derive(Clone)]
pub(super) struct Maintenance {
    pub(super) tables: Vec<Table>,
    pub(super) atoms: Table,
    pub(super) arrivals: Table,
    pub(super) dead_letters: Table,
    pub(super) keys: Arc<RwLock<Keys>>,
    pub(super) dead_letter_keys: Arc<RwLock<DeadLetterKeys>>,
    pub(super) policy: Policy,
    running: Arc<AtomicBool>,
    /// Inserts since the last run; a run is due every `min_parts` of them.
    inserts: Arc<AtomicUsize>,
    /// Open read parts past an index: write the indexes at the next run.
    stale_index: Arc<AtomicBool>,
}

impl Maintenance {
    pub(super) fn new(
        tables: Vec<Table>,
        atoms: Table,
        arrivals: Table,
        dead_letters: Table,
        keys: Arc<RwLock<Keys>>,
        dead_letter_keys: Arc<RwLock<DeadLetterKeys>>,
        stale_index: bool,
    ) -> Self {
        let policy = Policy::default();
        Self {
            tables,
            atoms,
            arrivals,
            dead_letters,
            keys,
            dead_letter_keys,
            policy,
            running: Arc::new(AtomicBool::new(false)),
            // A stale index makes the first insert start a run.
            inserts: Arc::new(AtomicUsize::new(if stale_index { policy.min_parts } else { 0 })),
            stale_index: Arc::new(AtomicBool::new(stale_index)),
        }
    }

    /// Called after every insert that wrote a part: starts a background run
    /// every `min_parts` inserts, unless one is running. Needs a Tokio runtime.
    pub(super) fn after_insert(&self) {
        if !self.policy.background {
            return;
        }
        if self.inserts.fetch_add(1, Ordering::Relaxed) + 1 < self.policy.min_parts {
            return;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inserts.store(0, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.run().await {
                    tracing::warn!(error = %e, "embedded store maintenance failed; it is tried again after later inserts");
                }
                this.running.store(false, Ordering::Release);
                // Inserts that came due while this run was busy found it
                // running and left their run to it: run again for them.
                if this.inserts.load(Ordering::Relaxed) < this.policy.min_parts || this.running.swap(true, Ordering::AcqRel) {
                    break;
                }
                this.inserts.store(0, Ordering::Relaxed);
            }
        });
    }

    /// One run: merge what is due in every table, delete hidden parts past
    /// their grace, and write the key indexes if anything changed.
    pub(super) async fn run(&self) -> Result<Vec<Merged>, StoreError> {
        let mut merged = Vec::new();
        for table in &self.tables {
            let (table, policy) = (table.clone(), self.policy);
            let done = tokio::task::spawn_blocking(move || compact_table(&table, &policy))
                .await
                .map_err(|e| StoreError::Fatal(format!("compaction task failed: {e}")))??;
            merged.extend(done);
        }
        if !merged.is_empty() || self.stale_index.swap(false, Ordering::AcqRel) {
            self.write_indexes().await?;
        }
        Ok(merged)
    }

    /// Writes the key index of atoms, arrivals and dead letters from memory.
    pub(super) async fn write_indexes(&self) -> Result<(), StoreError> {
        for (table, kind) in [(&self.atoms, Kind::Atoms), (&self.arrivals, Kind::Arrivals), (&self.dead_letters, Kind::DeadLetters)] {
            let bytes = {
                // Holding the writer lock: every part up to `covered` is in memory.
                let next = table.writer.lock().await;
                let Some(covered) = next.checked_sub(1) else { continue };
                match kind {
                    Kind::Atoms => {
                        let (topics, entries) = read_lock(&self.keys).atoms_index();
                        index::encode(kind, covered, &topics, &entries)
                    }
                    Kind::Arrivals => {
                        let (topics, entries) = read_lock(&self.keys).arrivals_index();
                        index::encode(kind, covered, &topics, &entries)
                    }
                    Kind::DeadLetters => {
                        let (topics, entries) = dead_letters_index(&read_lock(&self.dead_letter_keys));
                        index::encode(kind, covered, &topics, &entries)
                    }
                }
            };
            let dir = table.dir.clone();
            tokio::task::spawn_blocking(move || index::write(&dir, &bytes))
                .await
                .map_err(|e| StoreError::Fatal(format!("index task failed: {e}")))??;
        }
        Ok(())
    }
}

/// Deletes the hidden parts of `table` whose merge is older than the
/// grace, then merges its newest run of small parts if it is long enough.
pub(super) fn compact_table(table: &Table, policy: &Policy) -> Result<Option<Merged>, StoreError> {
    let Ok(_only_one) = table.compacting.try_lock() else { return Ok(None) };
    let all = list_parts(&table.dir, false)?;
    let shown = visible(all.clone());
    delete_expired(&all, &shown, policy.grace);
    let start = shown.iter().rposition(|p| p.bytes >= policy.small_bytes).map_or(0, |i| i + 1);
    let run = &shown[start..];
    if run.len() < policy.min_parts {
        return Ok(None);
    }
    let rows = merge(table, run, policy)?;
    let merged = Merged { table: table.name, parts: run.len(), rows, first: run[0].first, last: run[run.len() - 1].last };
    tracing::debug!(table = table.name, parts = merged.parts, rows, first = merged.first, last = merged.last, "parts merged");
    Ok(Some(merged))
}

/// Deletes hidden parts whose covering part is older than `grace`.
fn delete_expired(all: &[Part], shown: &[Part], grace: Duration) {
    for part in hidden(all, shown) {
        let Some(cover) = shown.iter().find(|v| v.first <= part.first && part.last <= v.last) else { continue };
        let age = fs::metadata(&cover.path).and_then(|m| m.modified()).ok().and_then(|t| SystemTime::now().duration_since(t).ok());
        if age.is_some_and(|a| a >= grace) {
            match fs::remove_file(&part.path) {
                Ok(()) => tracing::debug!(path = %part.path.display(), "merged part removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %part.path.display(), error = %e, "could not remove a merged part; it stays hidden"),
            }
        }
    }
}

/// Writes the rows of `run` (in order) as one merged part: temp file,
/// fsync, rename (the moment the merge takes effect), fsync the directory.
fn merge(table: &Table, run: &[Part], policy: &Policy) -> Result<usize, StoreError> {
    let name = merged_name(run[0].first, run[run.len() - 1].last);
    let temp = table.dir.join(format!(".{name}{TEMP_SUFFIX}"));
    let path = table.dir.join(&name);
    let written = write_merged(&temp, &table.schema, run, policy);
    let rows = match written {
        Ok(rows) => rows,
        Err(e) => {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
    };
    if let Err(e) = fs::rename(&temp, &path) {
        let _ = fs::remove_file(&temp);
        return Err(io_error(format_args!("rename {} to {}", temp.display(), path.display()), e));
    }
    // The merged part is visible now; if this fsync fails, a crash may take
    // the rename back, which leaves the old parts visible: nothing is lost.
    sync_dir(&table.dir).map_err(|e| io_error(format_args!("fsync {}", table.dir.display()), e))?;
    Ok(rows)
}

fn write_merged(temp: &std::path::Path, schema: &SchemaRef, run: &[Part], policy: &Policy) -> Result<usize, StoreError> {
    let file = fs::File::options().write(true).create_new(true).open(temp).map_err(|e| io_error(format_args!("create {}", temp.display()), e))?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).set_max_row_group_row_count(Some(policy.row_group_rows)).build();
    let context = || format!("write {}", temp.display());
    let mut writer = ArrowWriter::try_new(&file, schema.clone(), Some(props)).map_err(|e| parquet_error(context(), e))?;
    let mut rows = 0;
    for part in run {
        let read_context = || format!("read {}", part.path.display());
        let input = fs::File::open(&part.path).map_err(|e| io_error(read_context(), e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(input)
            .map_err(|e| parquet_error(read_context(), e))?
            .with_batch_size(4096)
            .build()
            .map_err(|e| parquet_error(read_context(), e))?;
        for batch in reader {
            let batch = conform(&batch.map_err(|e| arrow_error(read_context(), e))?, schema, &part.path)?;
            rows += batch.num_rows();
            writer.write(&batch).map_err(|e| parquet_error(context(), e))?;
        }
    }
    writer.close().map_err(|e| parquet_error(context(), e))?;
    file.sync_all().map_err(|e| io_error(format_args!("fsync {}", temp.display()), e))?;
    Ok(rows)
}

/// A batch of an older part in the table's current columns: a column the
/// part predates (always nullable, e.g. `trace_id`) is filled with nulls.
fn conform(batch: &RecordBatch, schema: &SchemaRef, path: &std::path::Path) -> Result<RecordBatch, StoreError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => c.clone(),
            None => new_null_array(f.data_type(), batch.num_rows()),
        })
        .collect();
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| arrow_error(format!("merge {}", path.display()), e))
}
