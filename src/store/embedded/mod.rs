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
//! exactly one new Parquet file; files are never rewritten or merged. The
//! column layouts are given by [`atoms_schema`] and [`dead_letters_schema`]
//! and match the ClickHouse tables of the same names.
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
//! reads the key columns of every part (hash and lineage of atoms, position
//! and outcome of arrivals, position of dead letters) into hash maps. Expect
//! about **120 bytes of memory per stored atom** (a 32-byte hash, its
//! 16-byte lineage and the map's control bytes and spare capacity, up to
//! twice that right after the map grows), e.g. about 1.2 GB for 10 million
//! atoms, about 60 bytes per arrival and 50 per dead letter, plus each
//! distinct source topic's name once.
//! `open` time grows with the number of stored rows too, since it reads one
//! column of every part.

mod error;
mod files;
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
use keys::{DeadLetterKeys, Keys, load_arrival_keys, load_atom_keys, load_dead_letter_keys, read_lock};

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
        let mut keys = Keys::default();
        for part in &atom_parts {
            load_atom_keys(part, &mut keys)?;
        }
        let (arrivals, arrival_parts) = Table::open(ARRIVALS_TABLE, tables.join(ARRIVALS_TABLE), arrivals_schema(), writable)?;
        for part in &arrival_parts {
            load_arrival_keys(part, &mut keys)?;
        }

        let (dead_letters, dl_parts) =
            Table::open(DEAD_LETTERS_TABLE, tables.join(DEAD_LETTERS_TABLE), dead_letters_schema(), writable)?;
        let mut dl_keys = DeadLetterKeys::new();
        for part in &dl_parts {
            load_dead_letter_keys(part, &mut dl_keys)?;
        }

        let inference = inference::InferenceTables::open(&tables, writable)?;

        tracing::info!(
            data_dir = %data_dir.display(),
            atom_parts = atom_parts.len(),
            atoms = keys.atoms.len(),
            arrivals = keys.arrivals.len(),
            dead_letter_parts = dl_parts.len(),
            "embedded store opened"
        );
        Ok(Self {
            data_dir,
            atoms,
            dead_letters,
            arrivals,
            keys: Arc::new(RwLock::new(keys)),
            dead_letter_keys: Arc::new(RwLock::new(dl_keys)),
            inference,
        })
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
