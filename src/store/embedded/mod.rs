//! The embedded default's store: each table is a directory of Parquet files
//! under a data directory, queried with DataFusion SQL. No server is needed.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/tables/atoms/part-<20-digit sequence>-<unique>.parquet
//! <data_dir>/tables/dead_letters/part-<20-digit sequence>-<unique>.parquet
//! <data_dir>/tables/atom_arrivals/part-<20-digit sequence>-<unique>.parquet
//! ```
//!
//! Every successful insert call that stores at least one new row writes
//! exactly one new Parquet file. In the background, runs of small parts are
//! merged into one `part-<first>-<last>-m-<unique>.parquet` that hides the
//! parts it holds from then on ([`compact`] has the rules: writes are never
//! blocked, and a crash mid-merge loses and duplicates nothing). Each
//! keyed table also keeps `keys.idx`, its keys up to a part sequence
//! (`index.rs`). The column layouts are given by [`atoms_schema`] and
//! [`dead_letters_schema`] and match the ClickHouse tables of the same names.
//!
//! # Crash safety and durability
//!
//! A part is first written to `.part-….parquet.tmp` in the table directory
//! (the listing table reads only names ending in `.parquet`; the `.tmp`
//! suffix is what hides it, as DataFusion does read dot-files), fsynced, renamed to its final `part-….parquet` name
//! (an atomic step) and the directory is fsynced. A crash at any point leaves
//! either no visible file or a complete one; stale temp files are removed by
//! [`EmbeddedStore::open`]. When an insert returns `Ok`, its rows are durable.
//!
//! Writers of one table are serialized by a mutex that is held until the file
//! is in place and the in-memory key set updated, even if the calling future
//! is dropped half way, so concurrent or cancelled calls never write a row
//! twice.
//!
//! # Memory
//!
//! Idempotency checks, [`AtomStore::find_atoms`] and
//! [`AtomStore::arrival_outcomes`] answer from memory, with no scan: `open`
//! reads each table's key index and the key columns of the parts the index
//! does not cover (hash and lineage of atoms, position and outcome of
//! arrivals, position of dead letters) into hash maps, so its cost follows
//! the number of stored keys, not of parts. Expect about **120 bytes of
//! memory per stored atom** (a 32-byte hash, its 16-byte lineage and the
//! map's control bytes and spare capacity, up to twice that right after the
//! map grows), e.g. about 1.2 GB for 10 million atoms, about 60 bytes per
//! arrival and 50 per dead letter, plus each distinct source topic's name
//! once.

mod compact;
mod error;
mod files;
mod index;
mod inference;
mod insert;
mod keys;
mod query;
mod status;
mod tables;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;

use super::{AtomStore, DeadLetterArchive, DeadLetterRow, InferenceStore, InsertReport, StoreError};
use crate::inference::{CompensationRow, OutputRow, Recalled, ResultRow, Retracted};
use crate::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};
use error::io_error;
use files::Table;
use compact::Maintenance;
use index::Kind;
use keys::{DeadLetterKeys, Keys, load_arrival_keys, load_atom_keys, load_dead_letter_keys, load_dead_letters_index, read_lock};

pub use compact::{Merged, Policy};

pub use error::QueryError;
pub use inference::{COMPENSATIONS_TABLE, OUTPUTS_TABLE, RESULTS_TABLE, compensations_schema, outputs_schema, results_schema};
pub use tables::{ARRIVALS_TABLE, ATOMS_TABLE, DEAD_LETTERS_TABLE, arrivals_schema, atoms_schema, dead_letters_schema};

/// The embedded store: Parquet files under a data directory, queried with
/// DataFusion SQL. See the [module docs](self) for layout, crash safety and
/// memory cost.
pub struct EmbeddedStore {
    data_dir: PathBuf,
    atoms: Table,
    dead_letters: Table,
    arrivals: Table,
    keys: Arc<RwLock<Keys>>,
    dead_letter_keys: Arc<RwLock<DeadLetterKeys>>,
    inference: inference::InferenceTables,
    maintenance: Maintenance,
    parts_read_at_open: usize,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("data_dir", &self.data_dir)
            .field("atoms", &self.atom_count())
            .field("dead_letters", &self.dead_letter_count())
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating if missing) the store under `data_dir`: creates
    /// `<data_dir>/tables/atoms/` and `<data_dir>/tables/dead_letters/`,
    /// removes temp files left by a crash mid-write, and loads the stored
    /// content hashes and dead-letter keys into memory (reading only those
    /// columns). Blocking: call it before starting work, or from
    /// `spawn_blocking`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, true)
    }

    /// Opens the store under `data_dir` for queries only (`hartonomous
    /// query`): creates no directory and removes or writes no file, so the
    /// disk is left exactly as it was. A table whose directory is missing
    /// (a fresh or absent `data_dir`) reads as empty; temp files of an
    /// interrupted write are left for the next [`open`](Self::open) (queries
    /// never read them). Do not insert through a store opened this way.
    pub fn open_read_only(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, false)
    }

    fn open_with(data_dir: &Path, writable: bool) -> Result<Self, StoreError> {
        let data_dir = std::path::absolute(data_dir)
            .map_err(|e| io_error(format_args!("resolve data dir {}", data_dir.display()), e))?;
        let tables = data_dir.join("tables");

        let (atoms, atom_parts) = Table::open(ATOMS_TABLE, tables.join(ATOMS_TABLE), atoms_schema(), writable)?;
        let (arrivals, arrival_parts) = Table::open(ARRIVALS_TABLE, tables.join(ARRIVALS_TABLE), arrivals_schema(), writable)?;
        let (dead_letters, dl_parts) =
            Table::open(DEAD_LETTERS_TABLE, tables.join(DEAD_LETTERS_TABLE), dead_letters_schema(), writable)?;

        // Keys: each table's index, then the parts it does not cover.
        let mut keys = Keys::default();
        let mut from_parts = 0;
        for (table, parts, kind) in [(&atoms, &atom_parts, Kind::Atoms), (&arrivals, &arrival_parts, Kind::Arrivals)] {
            let covered = match index::read(&table.dir, kind) {
                Some(ix) => {
                    keys.load_index(&ix)?;
                    Some(ix.covered)
                }
                None => None,
            };
            for part in parts.iter().filter(|p| covered.is_none_or(|c| p.last > c)) {
                from_parts += 1;
                match kind {
                    Kind::Atoms => load_atom_keys(&part.path, &mut keys)?,
                    _ => load_arrival_keys(&part.path, &mut keys)?,
                }
            }
        }
        let mut dl_keys = DeadLetterKeys::new();
        let covered = match index::read(&dead_letters.dir, Kind::DeadLetters) {
            Some(ix) => {
                load_dead_letters_index(&ix, &mut dl_keys)?;
                Some(ix.covered)
            }
            None => None,
        };
        for part in dl_parts.iter().filter(|p| covered.is_none_or(|c| p.last > c)) {
            from_parts += 1;
            load_dead_letter_keys(&part.path, &mut dl_keys)?;
        }

        let inference = inference::InferenceTables::open(&tables, writable)?;

        tracing::info!(
            data_dir = %data_dir.display(),
            atom_parts = atom_parts.len(),
            atoms = keys.atoms.len(),
            arrivals = keys.arrivals.len(),
            dead_letter_parts = dl_parts.len(),
            parts_read_past_index = from_parts,
            "embedded store opened"
        );
        let keys = Arc::new(RwLock::new(keys));
        let dead_letter_keys = Arc::new(RwLock::new(dl_keys));
        let all_tables: Vec<Table> = [&atoms, &arrivals, &dead_letters].into_iter().chain(inference.tables()).cloned().collect();
        // More than a few parts read past an index: write it again at the first chance.
        let stale = writable && from_parts > 4;
        let maintenance = Maintenance::new(all_tables, atoms.clone(), arrivals.clone(), dead_letters.clone(), keys.clone(), dead_letter_keys.clone(), stale);
        Ok(Self { data_dir, atoms, dead_letters, arrivals, keys, dead_letter_keys, inference, maintenance, parts_read_at_open: from_parts })
    }

    /// Runs maintenance now and waits for it: merges every table's small
    /// parts that are due (see [`compact::Policy`]), deletes merged parts
    /// past their grace, and writes the key indexes. Inserts start the same
    /// run in the background on their own; this is for tools and tests.
    pub async fn compact(&self) -> Result<Vec<Merged>, StoreError> {
        let merged = self.maintenance.run().await?;
        if merged.is_empty() {
            self.maintenance.write_indexes().await?;
        }
        Ok(merged)
    }

    /// The `atoms` table's visible parts now (merged parts hide the ones they hold).
    pub fn atom_parts(&self) -> Result<usize, StoreError> {
        Ok(self.atoms.visible_parts()?.len())
    }

    /// How many parts `open` read because no key index covered them.
    pub fn parts_read_at_open(&self) -> usize {
        self.parts_read_at_open
    }

    /// Replaces the maintenance policy (tests and benches use small ones).
    pub fn set_compaction_policy(&mut self, policy: Policy) {
        self.maintenance.policy = policy;
    }

    /// The data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the `atoms` table's Parquet files.
    pub fn atoms_dir(&self) -> &Path {
        &self.atoms.dir
    }

    /// The directory holding the `dead_letters` table's Parquet files.
    pub fn dead_letters_dir(&self) -> &Path {
        &self.dead_letters.dir
    }

    /// Number of stored atoms, from memory.
    pub fn atom_count(&self) -> usize {
        read_lock(&self.keys).atoms.len()
    }

    /// Number of stored arrivals, from memory.
    pub fn arrival_count(&self) -> usize {
        read_lock(&self.keys).arrivals.len()
    }

    /// The directory holding the `atom_arrivals` table's Parquet files.
    pub fn arrivals_dir(&self) -> &Path {
        &self.arrivals.dir
    }

    /// Number of stored dead letters, from memory.
    pub fn dead_letter_count(&self) -> usize {
        read_lock(&self.dead_letter_keys).values().map(HashSet::len).sum()
    }
}

impl AtomStore for EmbeddedStore {
    fn find_atoms<'a>(&'a self, hashes: &'a [ContentHash]) -> BoxFuture<'a, Result<HashMap<ContentHash, Vec<SourcePosition>>, StoreError>> {
        Box::pin(async move {
            let keys = read_lock(&self.keys);
            Ok(hashes.iter().filter_map(|h| keys.atoms.get(h).map(|k| (*h, vec![keys.position(k)]))).collect())
        })
    }

    fn arrival_outcomes<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, ArrivalOutcome>, StoreError>> {
        Box::pin(async move {
            let keys = read_lock(&self.keys);
            Ok(positions
                .iter()
                .filter_map(|p| keys.lookup(p).and_then(|k| keys.arrivals.get(&k)).map(|o| (p.clone(), *o)))
                .collect())
        })
    }

    fn insert_arrivals<'a>(&'a self, rows: &'a [ArrivalRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_arrivals_impl(rows))
    }

    fn insert_atoms<'a>(&'a self, rows: &'a [AtomRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_atoms_impl(rows))
    }

}

impl DeadLetterArchive for EmbeddedStore {
    fn insert_dead_letters<'a>(&'a self, rows: &'a [DeadLetterRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_dead_letters_impl(rows))
    }
}

// Tests through the whole store (open, insert, query, reopen) share these
// fixtures and stay here; tests of one file's helpers live in that file.
#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use super::files::{PART_PREFIX, PART_SUFFIX, TEMP_SUFFIX, part_sequence, write_parquet_file};
    use super::tables::{atoms_batch, embedding_item_field, timestamp_ms_utc};
    use arrow::datatypes::DataType;
    use arrow::record_batch::RecordBatch;
    use std::fs;

    fn atom(content: &str, offset: i64) -> AtomRow {
        let content = content.as_bytes().to_vec();
        AtomRow {
            content_hash: ContentHash::of(&content),
            content_type: "text/plain".into(),
            content,
            source_system: "tests".into(),
            correlation_id: format!("corr-{offset}"),
            metadata_json: format!(r#"{{"n":"{offset}"}}"#),
            embedding: vec![offset as f32, 0.5, -1.25],
            embedding_model: "test-model".into(),
            event_time_ms: 1_700_000_000_000 + offset,
            source_topic: "atoms.requests".into(),
            source_partition: 0,
            source_offset: offset,
            ingested_at_ms: 1_700_000_001_000 + offset,
            trace_id: format!("trace-{offset}"),
        }
    }

    /// Parts written before `trace_id` existed (rewritten here without the
    /// column, as an older version wrote them) still open, query with a null
    /// trace id, and take new rows that have one.
    #[tokio::test]
    async fn parts_written_before_trace_id_existed_still_open_and_read_as_null() {
        use crate::inference::{LIVE, ResultRow};
        use crate::store::RequestLookup;
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let dir = tempfile::tempdir().unwrap();
        let p = SourcePosition::new("inference.requests", 0, 7);
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.insert_dead_letters(&[dead_letter("t", 0, 1)]).await.unwrap();
            let live = ResultRow { deleted: 0, version: LIVE, status: "COMPLETE".into(), ..ResultRow::retraction_of(&p, "c1", "") };
            InferenceStore::insert_results(&store, &[live]).await.unwrap();
        }
        for table in [DEAD_LETTERS_TABLE, RESULTS_TABLE] {
            for entry in fs::read_dir(dir.path().join("tables").join(table)).unwrap() {
                let path = entry.unwrap().path();
                let reader = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(&path).unwrap()).unwrap().build().unwrap();
                let batches: Vec<RecordBatch> = reader
                    .map(|b| {
                        let mut b = b.unwrap();
                        b.remove_column(b.schema().index_of("trace_id").unwrap());
                        b
                    })
                    .collect();
                let schema = batches[0].schema();
                fs::remove_file(&path).unwrap();
                write_parquet_file(&path, &schema, &batches).unwrap();
            }
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let counts = |sql: &'static str| {
            let store = &store;
            async move {
                let b = store.query(sql).await.unwrap();
                (b[0].column(0).as_primitive::<Int64Type>().value(0), b[0].column(1).as_primitive::<Int64Type>().value(0))
            }
        };
        assert_eq!(counts("SELECT count(*), count(trace_id) FROM dead_letters").await, (1, 0));
        assert_eq!(counts("SELECT count(*), count(trace_id) FROM inference_results_live").await, (1, 0));
        assert_eq!(store.request_status("c1").await.unwrap().state, "completed");
        store.insert_dead_letters(&[DeadLetterRow { trace_id: "f".repeat(32), ..dead_letter("t", 0, 2) }]).await.unwrap();
        assert_eq!(counts("SELECT count(*), count(trace_id) FROM dead_letters").await, (2, 1));
        // A merge of an old part and a new one keeps both rows, the old one's trace id null.
        let mut store = store;
        store.set_compaction_policy(by_hand(2, std::time::Duration::ZERO));
        let merged = store.compact().await.unwrap();
        assert!(merged.iter().any(|m| m.table == DEAD_LETTERS_TABLE && m.rows == 2), "{merged:?}");
        let counts = |sql: &'static str| {
            let store = &store;
            async move {
                let b = store.query(sql).await.unwrap();
                (b[0].column(0).as_primitive::<Int64Type>().value(0), b[0].column(1).as_primitive::<Int64Type>().value(0))
            }
        };
        assert_eq!(counts("SELECT count(*), count(trace_id) FROM dead_letters").await, (2, 1));
    }

    fn three_atoms() -> Vec<AtomRow> {
        vec![atom("alpha", 1), atom("beta", 2), atom("gamma", 3)]
    }

    fn dead_letter(topic: &str, partition: i32, offset: i64) -> DeadLetterRow {
        DeadLetterRow {
            topology: "ingest".into(),
            source_topic: topic.into(),
            source_partition: partition,
            source_offset: offset,
            stage: "validate".into(),
            reason: "validate.content_type".into(),
            error: "unsupported content type".into(),
            attempts: 1,
            failed_at_ms: 1_700_000_002_000 + offset,
            original_key: if offset % 2 == 0 { Some(vec![1, 2, 3]) } else { None },
            original_payload: vec![0xde, 0xad, offset as u8],
            trace_id: String::new(),
        }
    }

    async fn count(store: &EmbeddedStore, table: &str) -> i64 {
        let batches = store.query(&format!("SELECT count(*) AS n FROM {table}")).await.unwrap();
        let total: i64 = batches.iter().map(|b| b.column(0).as_primitive::<Int64Type>().values().iter().sum::<i64>()).sum();
        total
    }

    async fn stored_hashes(store: &EmbeddedStore) -> Vec<String> {
        let batches = store.query("SELECT content_hash FROM atoms ORDER BY content_hash").await.unwrap();
        batches
            .iter()
            .flat_map(|b| b.column(0).as_string::<i32>().iter().map(|v| v.unwrap().to_owned()).collect::<Vec<_>>())
            .collect()
    }

    fn sorted_hex(rows: &[AtomRow]) -> Vec<String> {
        let mut v: Vec<String> = rows.iter().map(|r| r.content_hash.to_hex()).collect();
        v.sort();
        v
    }

    fn visible_parts(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(PART_SUFFIX))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn open_creates_table_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(dir.path().join("tables/atoms").is_dir());
        assert!(dir.path().join("tables/dead_letters").is_dir());
        assert_eq!(store.atoms_dir(), dir.path().join("tables/atoms"));
        assert_eq!(store.atom_count(), 0);
    }

    #[tokio::test]
    async fn every_column_round_trips_with_its_arrow_type() {
        // Hashes, lineage, embeddings, idempotency: tests/store_contract.rs.
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.insert_atoms(&three_atoms()).await.unwrap();
        let batches = store
            .query(
                "SELECT content, content_size, content_type, metadata, embedding_dimension, \
                 event_time, source_offset, ingested_at, trace_id FROM atoms WHERE source_offset = 2",
            )
            .await
            .unwrap();
        let b = &batches.iter().find(|b| b.num_rows() > 0).unwrap();
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.column(0).as_binary::<i32>().value(0), b"beta");
        assert_eq!(b.column(1).as_primitive::<arrow::datatypes::UInt64Type>().value(0), 4);
        assert_eq!(b.column(2).as_string::<i32>().value(0), "text/plain");
        assert_eq!(b.column(3).as_string::<i32>().value(0), r#"{"n":"2"}"#);
        assert_eq!(b.column(4).as_primitive::<arrow::datatypes::UInt32Type>().value(0), 3);
        let event_time = b.column(5).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        assert_eq!(event_time.value(0), 1_700_000_000_002);
        assert_eq!(b.schema().field(5).data_type(), &timestamp_ms_utc());
        assert_eq!(b.column(6).as_primitive::<Int64Type>().value(0), 2);
        assert_eq!(
            b.column(7).as_primitive::<arrow::datatypes::TimestampMillisecondType>().value(0),
            1_700_000_001_002
        );
        assert_eq!(b.column(8).as_string::<i32>().value(0), "trace-2");

        let batches = store.query("SELECT embedding FROM atoms").await.unwrap();
        assert_eq!(batches[0].schema().field(0).data_type(), &DataType::List(embedding_item_field()));
    }

    #[tokio::test]
    async fn one_part_file_per_call_that_stores_rows() {
        // What each call reports and stores: tests/store_contract.rs.
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let rows = three_atoms();
        store.insert_atoms(&rows).await.unwrap();
        assert_eq!(visible_parts(store.atoms_dir()).len(), 1, "one file per call");
        store.insert_atoms(&rows).await.unwrap();
        assert_eq!(visible_parts(store.atoms_dir()).len(), 1, "nothing new, no new file");
        store.insert_atoms(&[]).await.unwrap();
        assert_eq!(visible_parts(store.atoms_dir()).len(), 1, "nothing at all, no new file");

        // A mix of old and new rows writes one file, holding the new row.
        let mut mixed = rows.clone();
        mixed.push(atom("delta", 4));
        store.insert_atoms(&mixed).await.unwrap();
        assert_eq!(visible_parts(store.atoms_dir()).len(), 2);
        assert_eq!(count(&store, "atoms").await, 4);
    }

    #[tokio::test]
    async fn reopen_remembers_stored_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let rows = three_atoms();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.insert_atoms(&rows).await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.atom_count(), 3);
        let unknown = ContentHash::of(b"never stored");
        let mut asked: Vec<ContentHash> = rows.iter().map(|r| r.content_hash).collect();
        asked.push(unknown);
        let known = store.existing_hashes(&asked).await.unwrap();
        assert_eq!(known, rows.iter().map(|r| r.content_hash).collect::<HashSet<_>>());
        assert!(!known.contains(&unknown));

        let report = store.insert_atoms(&rows).await.unwrap();
        assert_eq!(report, InsertReport { inserted: 0, already_present: 3 });
        assert_eq!(count(&store, "atoms").await, 3);

        // New parts continue the sequence after the existing ones.
        store.insert_atoms(&[atom("epsilon", 5)]).await.unwrap();
        let parts = visible_parts(store.atoms_dir());
        assert_eq!(parts.len(), 2);
        assert_eq!(part_sequence(&parts[0]), Some(0));
        assert_eq!(part_sequence(&parts[1]), Some(1));
    }

    #[tokio::test]
    async fn reopen_remembers_dead_letter_positions() {
        // Idempotency by position and the stored columns: tests/store_contract.rs.
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![dead_letter("in", 0, 10), dead_letter("in", 0, 11), dead_letter("in", 1, 10), dead_letter("other", 0, 10)];
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.insert_dead_letters(&rows).await.unwrap();
            store.insert_dead_letters(&[dead_letter("in", 0, 12)]).await.unwrap();
            assert_eq!(store.dead_letter_count(), 5);
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.dead_letter_count(), 5);
        // Same position, different content: still known after reopening.
        let mut replay = rows.clone();
        replay[0].error = "a different message".into();
        let report = store.insert_dead_letters(&replay).await.unwrap();
        assert_eq!(report, InsertReport { inserted: 0, already_present: 4 });
        assert_eq!(count(&store, "dead_letters").await, 5);
        assert_eq!(store.dead_letter_count(), 5);
    }

    #[tokio::test]
    async fn orphan_temp_file_is_ignored_by_queries_and_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.insert_atoms(&three_atoms()).await.unwrap();

        // Simulate a crash after a complete, valid temp file was written but
        // before its rename: the temp name a real write would use.
        let orphan_rows = [atom("orphan-1", 100), atom("orphan-2", 101)];
        let batch = atoms_batch(&orphan_rows.iter().collect::<Vec<_>>()).unwrap();
        let orphan = store.atoms_dir().join(format!(".{PART_PREFIX}{:020}-crashed{PART_SUFFIX}{TEMP_SUFFIX}", 7));
        write_parquet_file(&orphan, &atoms_schema(), &[batch]).unwrap();
        // And one that was cut off half way (not valid Parquet).
        let torn = store.atoms_dir().join(format!(".{PART_PREFIX}{:020}-torn{PART_SUFFIX}{TEMP_SUFFIX}", 8));
        fs::write(&torn, b"PAR1 partial").unwrap();

        assert_eq!(count(&store, "atoms").await, 3);
        assert_eq!(stored_hashes(&store).await, sorted_hex(&three_atoms()));
        drop(store);

        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(!orphan.exists());
        assert!(!torn.exists());
        assert_eq!(store.atom_count(), 3);
        assert_eq!(count(&store, "atoms").await, 3);
        // The orphan's rows were never stored, so they can be written now.
        let report = store.insert_atoms(&orphan_rows).await.unwrap();
        assert_eq!(report.inserted, 2);
        assert_eq!(count(&store, "atoms").await, 5);
    }

    fn on_disk(dir: &Path) -> usize {
        visible_parts(dir).len()
    }

    fn by_hand(min_parts: usize, grace: std::time::Duration) -> Policy {
        Policy { min_parts, grace, background: false, ..Policy::default() }
    }

    #[tokio::test]
    async fn small_parts_merge_into_one_and_every_row_reads_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EmbeddedStore::open(dir.path()).unwrap();
        store.set_compaction_policy(by_hand(4, std::time::Duration::ZERO));
        let rows: Vec<AtomRow> = (0..10).map(|i| atom(&format!("content {i}"), i)).collect();
        for row in &rows {
            store.insert_atoms(std::slice::from_ref(row)).await.unwrap();
        }
        assert_eq!(on_disk(store.atoms_dir()), 10);
        let merged = store.compact().await.unwrap();
        assert_eq!(merged, vec![Merged { table: ATOMS_TABLE, parts: 10, rows: 10, first: 0, last: 9 }]);
        // The old parts are still on disk (hidden) until the next run.
        assert_eq!(on_disk(store.atoms_dir()), 11);
        assert_eq!(store.atoms.visible_parts().unwrap().len(), 1);
        assert_eq!(count(&store, "atoms").await, 10);
        assert_eq!(stored_hashes(&store).await, sorted_hex(&rows));
        store.compact().await.unwrap();
        assert_eq!(on_disk(store.atoms_dir()), 1, "hidden parts are deleted after the grace");
        assert_eq!(count(&store, "atoms").await, 10);

        // New parts continue after the merged range, and merge again later.
        let more: Vec<AtomRow> = (10..14).map(|i| atom(&format!("content {i}"), i)).collect();
        for row in &more {
            store.insert_atoms(std::slice::from_ref(row)).await.unwrap();
        }
        assert_eq!(part_sequence(&visible_parts(store.atoms_dir())[1]), Some(10));
        let merged = store.compact().await.unwrap();
        assert_eq!(merged, vec![Merged { table: ATOMS_TABLE, parts: 5, rows: 14, first: 0, last: 13 }]);
        assert_eq!(count(&store, "atoms").await, 14);
    }

    #[tokio::test]
    async fn inserts_start_merges_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EmbeddedStore::open(dir.path()).unwrap();
        store.set_compaction_policy(Policy { min_parts: 3, background: true, ..Policy::default() });
        let rows: Vec<AtomRow> = (0..6).map(|i| atom(&format!("content {i}"), i)).collect();
        for row in &rows {
            store.insert_atoms(std::slice::from_ref(row)).await.unwrap();
        }
        let waited = std::time::Instant::now();
        while store.atom_parts().unwrap() > 2 {
            assert!(waited.elapsed() < std::time::Duration::from_secs(10), "no merge after 6 inserts: {} parts", store.atom_parts().unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(count(&store, "atoms").await, 6);
        assert_eq!(stored_hashes(&store).await, sorted_hex(&rows));
    }

    #[tokio::test]
    async fn a_merge_cut_short_at_any_point_loses_and_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<AtomRow> = (0..6).map(|i| atom(&format!("content {i}"), i)).collect();
        {
            // A long grace: the merge's inputs stay on disk, as after a crash
            // between the rename and the deletion.
            let mut store = EmbeddedStore::open(dir.path()).unwrap();
            store.set_compaction_policy(by_hand(2, std::time::Duration::from_secs(3600)));
            for row in &rows[..4] {
                store.insert_atoms(std::slice::from_ref(row)).await.unwrap();
            }
            store.compact().await.unwrap();
            assert_eq!(on_disk(store.atoms_dir()), 5);
        }
        // And a crash before the rename: a merged part's temp file.
        let atoms_dir = dir.path().join("tables").join(ATOMS_TABLE);
        let batch = atoms_batch(&rows.iter().collect::<Vec<_>>()).unwrap();
        let torn = atoms_dir.join(format!(".{}{TEMP_SUFFIX}", super::files::merged_name(0, 9)));
        write_parquet_file(&torn, &atoms_schema(), &[batch]).unwrap();

        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(!torn.exists(), "open removes the temp file of a merge cut short");
        assert_eq!(store.atom_count(), 4);
        assert_eq!(count(&store, "atoms").await, 4, "hidden inputs are not read twice");
        assert_eq!(store.insert_atoms(&rows).await.unwrap(), InsertReport { inserted: 2, already_present: 4 });
        assert_eq!(count(&store, "atoms").await, 6);
        assert_eq!(stored_hashes(&store).await, sorted_hex(&rows));
    }

    #[tokio::test]
    async fn open_reads_the_key_index_and_only_the_parts_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<AtomRow> = (0..8).map(|i| atom(&format!("content {i}"), i)).collect();
        let arrivals: Vec<ArrivalRow> = rows.iter().map(arrival).collect();
        {
            let mut store = EmbeddedStore::open(dir.path()).unwrap();
            store.set_compaction_policy(by_hand(100, std::time::Duration::ZERO));
            for (row, arrival) in rows[..5].iter().zip(&arrivals) {
                store.insert_atoms(std::slice::from_ref(row)).await.unwrap();
                store.insert_arrivals(std::slice::from_ref(arrival)).await.unwrap();
            }
            store.insert_dead_letters(&[dead_letter("in", 0, 1)]).await.unwrap();
            // Nothing is due for merging; the run writes the indexes.
            assert_eq!(store.compact().await.unwrap(), vec![]);
            for (row, arrival) in rows[5..].iter().zip(&arrivals[5..]) {
                store.insert_atoms(std::slice::from_ref(row)).await.unwrap();
                store.insert_arrivals(std::slice::from_ref(arrival)).await.unwrap();
            }
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.parts_read_at_open(), 6, "3 atom and 3 arrival parts past the indexes");
        assert_eq!((store.atom_count(), store.arrival_count(), store.dead_letter_count()), (8, 8, 1));
        assert_eq!(store.insert_atoms(&rows).await.unwrap().inserted, 0);
        assert_eq!(store.insert_arrivals(&arrivals).await.unwrap().inserted, 0);
        let lineage = store.find_atoms(&[rows[2].content_hash]).await.unwrap();
        assert_eq!(lineage[&rows[2].content_hash], vec![rows[2].position()]);
        let outcome = store.arrival_outcomes(&[arrivals[1].position()]).await.unwrap();
        assert_eq!(outcome[&arrivals[1].position()], arrivals[1].outcome);
        drop(store);

        // A damaged index is not trusted: the keys come from the parts.
        fs::write(dir.path().join("tables").join(ATOMS_TABLE).join(index::INDEX_FILE), b"HKEYIDX1 garbage").unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.parts_read_at_open(), 8 + 3);
        assert_eq!((store.atom_count(), store.arrival_count()), (8, 8));
        assert_eq!(store.insert_atoms(&rows).await.unwrap().inserted, 0);
    }

    fn arrival(row: &AtomRow) -> ArrivalRow {
        ArrivalRow {
            source_topic: row.source_topic.clone(),
            source_partition: row.source_partition,
            source_offset: row.source_offset,
            content_hash: row.content_hash,
            outcome: if row.source_offset % 2 == 0 { ArrivalOutcome::Created } else { ArrivalOutcome::Matched },
            content_type: row.content_type.clone(),
            content_size: row.content.len() as u64,
            source_system: row.source_system.clone(),
            correlation_id: row.correlation_id.clone(),
            event_time_ms: row.event_time_ms,
            arrived_at_ms: row.ingested_at_ms,
            trace_id: row.trace_id.clone(),
        }
    }

    #[tokio::test]
    async fn empty_tables_can_be_queried() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(count(&store, "atoms").await, 0);
        assert_eq!(count(&store, "dead_letters").await, 0);
        let rows: usize = store
            .query("SELECT content_hash, embedding FROM atoms")
            .await
            .unwrap()
            .iter()
            .map(RecordBatch::num_rows)
            .sum();
        assert_eq!(rows, 0);
        let text = store.query_to_string("SELECT content_hash, source_offset FROM atoms").await.unwrap();
        assert!(text.contains("content_hash") && text.contains("source_offset"), "{text}");
    }

    #[tokio::test]
    async fn query_to_string_formats_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.insert_atoms(&three_atoms()).await.unwrap();
        let text = store
            .query_to_string("SELECT source_offset, trace_id FROM atoms ORDER BY source_offset")
            .await
            .unwrap();
        let expected = "\
+---------------+----------+
| source_offset | trace_id |
+---------------+----------+
| 1             | trace-1  |
| 2             | trace-2  |
| 3             | trace-3  |
+---------------+----------+";
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn sql_errors_are_query_errors_with_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let err = store.query("SELEC count(*) FROM atoms").await.unwrap_err();
        assert!(err.0.contains("SELEC"), "{err}");
        let err = store.query("SELECT no_such_column FROM atoms").await.unwrap_err();
        assert!(err.0.contains("no_such_column"), "{err}");
        let err = store.query_to_string("SELECT * FROM no_such_table").await.unwrap_err();
        assert!(err.0.contains("no_such_table"), "{err}");
    }

    #[tokio::test]
    async fn writes_through_sql_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.insert_atoms(&three_atoms()).await.unwrap();
        let target = dir.path().join("copy.parquet");
        let copy = format!("COPY atoms TO '{}'", target.display());
        assert!(store.query(&copy).await.is_err());
        assert!(!target.exists());
        assert!(store.query("CREATE TABLE t (x INT)").await.is_err());
        assert_eq!(count(&store, "atoms").await, 3);
    }

    #[tokio::test]
    async fn write_errors_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        // The table directory vanished under us: not a row problem.
        fs::remove_dir_all(store.atoms_dir()).unwrap();
        let err = store.insert_atoms(&three_atoms()).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert_eq!(store.atom_count(), 0, "failed write must not mark rows stored");

        // A data dir that is a file cannot be used at all.
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let err = EmbeddedStore::open(&file).unwrap_err();
        assert!(matches!(err, StoreError::Fatal(_)), "{err:?}");
    }
}

impl InferenceStore for EmbeddedStore {
    fn insert_outputs<'a>(&'a self, rows: &'a [OutputRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.inference.insert_outputs(rows))
    }

    fn insert_results<'a>(&'a self, rows: &'a [ResultRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.inference.insert_results(rows))
    }

    fn retract<'a>(&'a self, position: &'a SourcePosition, correlation_id: &'a str, models: &'a [String], trace_id: &'a str) -> BoxFuture<'a, Result<Retracted, StoreError>> {
        Box::pin(self.inference.retract(position, correlation_id, models, trace_id))
    }

    fn compensations<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, CompensationRow>, StoreError>> {
        Box::pin(async move { Ok(self.inference.compensations(positions)) })
    }

    fn record_compensations<'a>(&'a self, rows: &'a [CompensationRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.inference.record_compensations(rows))
    }

    fn recall<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, Recalled>, StoreError>> {
        Box::pin(async move { Ok(self.inference.recall(positions)) })
    }
}
