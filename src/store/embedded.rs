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

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, ArrayRef, BinaryArray, Float32Array, Int32Array, Int64Array, ListArray, StringArray,
    TimestampMillisecondArray, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::prelude::{ParquetReadOptions, SQLOptions, SessionConfig, SessionContext};
use futures::future::BoxFuture;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{AtomStore, DeadLetterArchive, DeadLetterRow, InsertReport, StoreError};
use crate::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};

/// Name of the atoms table (and of its directory under `<data_dir>/tables`).
pub const ATOMS_TABLE: &str = "atoms";
/// Name of the dead-letters table (and of its directory under `<data_dir>/tables`).
pub const DEAD_LETTERS_TABLE: &str = "dead_letters";
/// Name of the arrivals table (and of its directory under `<data_dir>/tables`).
pub const ARRIVALS_TABLE: &str = "atom_arrivals";

const PART_PREFIX: &str = "part-";
const PART_SUFFIX: &str = ".parquet";
const TEMP_PREFIX: &str = ".part-";
const TEMP_SUFFIX: &str = ".tmp";

/// Upper bound on the variable-length bytes (binary, text, embedding floats)
/// put in one Arrow batch. Arrow's `Utf8`/`Binary`/`List` columns use 32-bit
/// offsets, so a batch must stay well under 2 GiB per column; larger calls
/// are split into several batches of the same file.
const BATCH_BYTE_BUDGET: usize = 512 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Schemas
// ---------------------------------------------------------------------------

/// Millisecond timestamps in UTC, as ClickHouse `DateTime64(3, 'UTC')`.
fn timestamp_ms_utc() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The item field of `atoms.embedding`: `item`, `Float32`, not nullable
/// (as ClickHouse `Array(Float32)`).
fn embedding_item_field() -> FieldRef {
    Arc::new(Field::new_list_field(DataType::Float32, false))
}

/// Columns of the `atoms` table, one row per stored atom, keyed by
/// `content_hash`. Every column is non-nullable.
///
/// | column | type | from [`AtomRow`] |
/// | --- | --- | --- |
/// | `content_hash` | Utf8 | 64 lowercase hex chars of the SHA-256 |
/// | `content_type` | Utf8 | `content_type` |
/// | `content` | Binary | `content` |
/// | `content_size` | UInt64 | `content.len()` |
/// | `source_system` | Utf8 | `source_system` |
/// | `correlation_id` | Utf8 | `correlation_id` |
/// | `metadata` | Utf8 | `metadata_json` (a JSON object as text) |
/// | `embedding` | List<Float32> (item `item`, non-nullable) | `embedding` |
/// | `embedding_model` | Utf8 | `embedding_model` |
/// | `embedding_dimension` | UInt32 | `embedding.len()` |
/// | `event_time` | Timestamp(ms, "UTC") | `event_time_ms` |
/// | `source_topic` | Utf8 | `source_topic` |
/// | `source_partition` | Int32 | `source_partition` |
/// | `source_offset` | Int64 | `source_offset` |
/// | `ingested_at` | Timestamp(ms, "UTC") | `ingested_at_ms` |
/// | `trace_id` | Utf8 | `trace_id` |
pub fn atoms_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("content_type", DataType::Utf8, false),
        Field::new("content", DataType::Binary, false),
        Field::new("content_size", DataType::UInt64, false),
        Field::new("source_system", DataType::Utf8, false),
        Field::new("correlation_id", DataType::Utf8, false),
        Field::new("metadata", DataType::Utf8, false),
        Field::new("embedding", DataType::List(embedding_item_field()), false),
        Field::new("embedding_model", DataType::Utf8, false),
        Field::new("embedding_dimension", DataType::UInt32, false),
        Field::new("event_time", timestamp_ms_utc(), false),
        Field::new("source_topic", DataType::Utf8, false),
        Field::new("source_partition", DataType::Int32, false),
        Field::new("source_offset", DataType::Int64, false),
        Field::new("ingested_at", timestamp_ms_utc(), false),
        Field::new("trace_id", DataType::Utf8, false),
    ]))
}

/// Columns of the `dead_letters` table, one row per dead-lettered record,
/// keyed by (`source_topic`, `source_partition`, `source_offset`). Only
/// `original_key` is nullable.
///
/// | column | type | from [`DeadLetterRow`] |
/// | --- | --- | --- |
/// | `topology` | Utf8 | `topology` |
/// | `source_topic` | Utf8 | `source_topic` |
/// | `source_partition` | Int32 | `source_partition` |
/// | `source_offset` | Int64 | `source_offset` |
/// | `stage` | Utf8 | `stage` |
/// | `reason` | Utf8 | `reason` |
/// | `error` | Utf8 | `error` |
/// | `attempts` | UInt32 | `attempts` |
/// | `failed_at` | Timestamp(ms, "UTC") | `failed_at_ms` |
/// | `original_key` | Binary, nullable | `original_key` |
/// | `original_payload` | Binary | `original_payload` |
pub fn dead_letters_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("topology", DataType::Utf8, false),
        Field::new("source_topic", DataType::Utf8, false),
        Field::new("source_partition", DataType::Int32, false),
        Field::new("source_offset", DataType::Int64, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("attempts", DataType::UInt32, false),
        Field::new("failed_at", timestamp_ms_utc(), false),
        Field::new("original_key", DataType::Binary, true),
        Field::new("original_payload", DataType::Binary, false),
    ]))
}

/// Columns of the `atom_arrivals` table, one row per accepted request, keyed
/// by (`source_topic`, `source_partition`, `source_offset`). Every column is
/// non-nullable.
///
/// | column | type | from [`ArrivalRow`] |
/// | --- | --- | --- |
/// | `source_topic` | Utf8 | `source_topic` |
/// | `source_partition` | Int32 | `source_partition` |
/// | `source_offset` | Int64 | `source_offset` |
/// | `content_hash` | Utf8 | 64 lowercase hex chars |
/// | `outcome` | Utf8 | `created` or `matched` |
/// | `content_type` | Utf8 | `content_type` |
/// | `content_size` | UInt64 | `content_size` |
/// | `source_system` | Utf8 | `source_system` |
/// | `correlation_id` | Utf8 | `correlation_id` |
/// | `event_time` | Timestamp(ms, "UTC") | `event_time_ms` |
/// | `arrived_at` | Timestamp(ms, "UTC") | `arrived_at_ms` |
/// | `trace_id` | Utf8 | `trace_id` |
pub fn arrivals_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source_topic", DataType::Utf8, false),
        Field::new("source_partition", DataType::Int32, false),
        Field::new("source_offset", DataType::Int64, false),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("content_type", DataType::Utf8, false),
        Field::new("content_size", DataType::UInt64, false),
        Field::new("source_system", DataType::Utf8, false),
        Field::new("correlation_id", DataType::Utf8, false),
        Field::new("event_time", timestamp_ms_utc(), false),
        Field::new("arrived_at", timestamp_ms_utc(), false),
        Field::new("trace_id", DataType::Utf8, false),
    ]))
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A SQL query that could not be answered: a syntax or planning error (an
/// unknown column, a typo), a statement that is not allowed (only read-only
/// queries are), or a failure while reading the tables. Carries DataFusion's
/// message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query failed: {0}")]
pub struct QueryError(pub String);

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        QueryError(e.to_string())
    }
}

impl From<ArrowError> for QueryError {
    fn from(e: ArrowError) -> Self {
        QueryError(e.to_string())
    }
}

/// I/O errors: a problem with the path itself (permissions, not a directory,
/// read-only file system) makes the store unusable; anything else (disk full,
/// interrupted, ...) may pass.
fn io_error(context: impl std::fmt::Display, e: io::Error) -> StoreError {
    let msg = format!("{context}: {e}");
    match e.kind() {
        io::ErrorKind::PermissionDenied
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory
        | io::ErrorKind::ReadOnlyFilesystem
        | io::ErrorKind::InvalidFilename
        | io::ErrorKind::InvalidInput => StoreError::Fatal(msg),
        _ => StoreError::Unavailable(msg),
    }
}

/// Parquet errors: an I/O error underneath is classified as such; anything
/// else (encoding, schema) is a bug or a corrupt file and is fatal.
fn parquet_error(context: impl std::fmt::Display, e: ParquetError) -> StoreError {
    match e {
        ParquetError::External(inner) => match inner.downcast::<io::Error>() {
            Ok(io) => io_error(context, *io),
            Err(other) => StoreError::Fatal(format!("{context}: {other}")),
        },
        other => StoreError::Fatal(format!("{context}: {other}")),
    }
}

fn arrow_error(context: impl std::fmt::Display, e: ArrowError) -> StoreError {
    match e {
        ArrowError::IoError(msg, io) => io_error(format!("{context}: {msg}"), io),
        other => StoreError::Fatal(format!("{context}: {other}")),
    }
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

/// One table directory and its writer lock.
struct Table {
    name: &'static str,
    dir: PathBuf,
    schema: SchemaRef,
    /// The next part sequence number. Locked for a whole write, and released
    /// only once the file is in place and the in-memory keys are updated.
    writer: Arc<Mutex<u64>>,
}

/// Dead-letter keys, grouped by source topic so each topic name is held once.
type DeadLetterKeys = HashMap<String, HashSet<(i32, i64)>>;

/// A source position in memory: the topic as an index into [`Keys::topics`].
type PosKey = (u32, i32, i64);

/// The atoms' and arrivals' keys, under one lock so the two stay consistent.
#[derive(Default)]
struct Keys {
    /// Hash → lineage of the stored atom.
    atoms: HashMap<ContentHash, PosKey>,
    /// Source position → recorded outcome.
    arrivals: HashMap<PosKey, ArrivalOutcome>,
    topics: Vec<Arc<str>>,
    topic_index: HashMap<Arc<str>, u32>,
}

impl Keys {
    fn intern(&mut self, topic: &str) -> u32 {
        if let Some(i) = self.topic_index.get(topic) {
            return *i;
        }
        let name: Arc<str> = Arc::from(topic);
        let i = self.topics.len() as u32;
        self.topics.push(name.clone());
        self.topic_index.insert(name, i);
        i
    }

    fn lookup(&self, p: &SourcePosition) -> Option<PosKey> {
        self.topic_index.get(p.topic.as_str()).map(|t| (*t, p.partition, p.offset))
    }

    fn position(&self, k: &PosKey) -> SourcePosition {
        SourcePosition::new(&*self.topics[k.0 as usize], k.1, k.2)
    }
}

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

fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
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

    /// Runs one read-only SQL query over the tables `atoms` and
    /// `dead_letters` and returns all result batches. Each call uses a fresh
    /// DataFusion session, so it sees every file written before it started.
    /// DDL, DML (`INSERT`, `COPY`) and session statements (`SET`) are refused.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        Ok(self.run_query(sql).await?.1)
    }

    /// Like [`query`](Self::query), formatted as a text table (column
    /// headers are shown even when there are no rows).
    pub async fn query_to_string(&self, sql: &str) -> Result<String, QueryError> {
        let (schema, batches) = self.run_query(sql).await?;
        let table = arrow::util::pretty::pretty_format_batches_with_schema(schema, &batches)?;
        Ok(table.to_string())
    }

    async fn run_query(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(true));
        for table in [&self.atoms, &self.dead_letters, &self.arrivals] {
            table.register(&ctx).await?;
        }
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = ctx.sql_with_options(sql, options).await?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame.collect().await?;
        Ok((schema, batches))
    }
}

impl Table {
    /// Creates the directory if missing, removes stale temp files, and
    /// returns the table with the visible part files (sorted by name). Not
    /// `writable`: touches nothing on disk, and a missing directory is an
    /// empty table.
    fn open(name: &'static str, dir: PathBuf, schema: SchemaRef, writable: bool) -> Result<(Self, Vec<PathBuf>), StoreError> {
        if writable {
            fs::create_dir_all(&dir).map_err(|e| io_error(format_args!("create {}", dir.display()), e))?;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => Some(entries),
            Err(e) if !writable && e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(format_args!("list {}", dir.display()), e)),
        };
        let mut parts = Vec::new();
        let mut next_seq = 0u64;
        for entry in entries.into_iter().flatten() {
            let entry = entry.map_err(|e| io_error(format_args!("list {}", dir.display()), e))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else { continue };
            let path = entry.path();
            if file_name.starts_with(TEMP_PREFIX) && file_name.ends_with(TEMP_SUFFIX) && writable {
                tracing::warn!(path = %path.display(), "removing temp file left by an interrupted write");
                fs::remove_file(&path).map_err(|e| io_error(format_args!("remove {}", path.display()), e))?;
                continue;
            }
            // Exactly the files the listing table reads: names ending in
            // `.parquet` directly in the table directory.
            if !file_name.ends_with(PART_SUFFIX) {
                continue;
            }
            let is_file = entry
                .file_type()
                .map_err(|e| io_error(format_args!("stat {}", path.display()), e))?
                .is_file();
            if !is_file {
                continue;
            }
            if let Some(seq) = part_sequence(file_name) {
                next_seq = next_seq.max(seq.saturating_add(1));
            }
            parts.push(path);
        }
        parts.sort();
        let table = Table { name, dir, schema, writer: Arc::new(Mutex::new(next_seq)) };
        Ok((table, parts))
    }

    /// Registers this table in `ctx` as a listing table over its directory.
    async fn register(&self, ctx: &SessionContext) -> Result<(), DataFusionError> {
        // A trailing separator makes DataFusion treat the path as a directory.
        let url = format!("{}{}", self.dir.display(), std::path::MAIN_SEPARATOR);
        let options = ParquetReadOptions {
            file_extension: PART_SUFFIX,
            schema: Some(&self.schema),
            ..Default::default()
        };
        ctx.register_parquet(self.name, url, options).await
    }

    /// Writes `batches` as one new part file. `seq` is the held writer lock;
    /// it is released only after the file is in place and `on_visible` ran,
    /// even if the returned future is dropped early.
    async fn write_part(
        &self,
        mut seq: OwnedMutexGuard<u64>,
        batches: Vec<RecordBatch>,
        on_visible: impl FnOnce() + Send + 'static,
    ) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let schema = self.schema.clone();
        let task = tokio::task::spawn_blocking(move || {
            let n = *seq;
            *seq = n + 1;
            let result = write_part_file(&dir, &schema, n, &batches);
            match &result {
                Ok(path) => {
                    on_visible();
                    tracing::debug!(path = %path.display(), "part written");
                }
                Err(failure) if failure.visible => on_visible(),
                Err(_) => {}
            }
            drop(seq);
            result.map(|_| ()).map_err(|failure| failure.error)
        });
        task.await.map_err(|e| StoreError::Fatal(format!("{} writer task failed: {e}", self.name)))?
    }
}

/// The sequence number of a part file name `part-<seq>-<unique>.parquet`.
fn part_sequence(file_name: &str) -> Option<u64> {
    let rest = file_name.strip_prefix(PART_PREFIX)?;
    let digits = rest.split('-').next()?;
    digits.parse().ok()
}

/// Unique within this process and, with the pid and clock, across processes.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}-{:x}-{n:x}", std::process::id())
}

struct WriteFailure {
    error: StoreError,
    /// The part became visible to queries although the write failed (its
    /// directory entry could not be made durable nor removed).
    visible: bool,
}

impl From<StoreError> for WriteFailure {
    fn from(error: StoreError) -> Self {
        WriteFailure { error, visible: false }
    }
}

/// Temp file, fsync, rename, fsync the directory.
fn write_part_file(dir: &Path, schema: &SchemaRef, seq: u64, batches: &[RecordBatch]) -> Result<PathBuf, WriteFailure> {
    let final_name = format!("{PART_PREFIX}{seq:020}-{}{PART_SUFFIX}", unique_suffix());
    let temp = dir.join(format!(".{final_name}{TEMP_SUFFIX}"));
    let path = dir.join(&final_name);

    if let Err(e) = write_parquet_file(&temp, schema, batches) {
        let _ = fs::remove_file(&temp);
        return Err(e.into());
    }
    if let Err(e) = fs::rename(&temp, &path) {
        let _ = fs::remove_file(&temp);
        return Err(io_error(format_args!("rename {} to {}", temp.display(), path.display()), e).into());
    }
    if let Err(e) = sync_dir(dir) {
        let error = io_error(format_args!("fsync {}", dir.display()), e);
        // Not durable: take it back so a retry writes it again.
        let visible = fs::remove_file(&path).is_err();
        return Err(WriteFailure { error, visible });
    }
    Ok(path)
}

fn write_parquet_file(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<(), StoreError> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error(format_args!("create {}", path.display()), e))?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let context = || format!("write {}", path.display());
    let mut writer =
        ArrowWriter::try_new(&file, schema.clone(), Some(props)).map_err(|e| parquet_error(context(), e))?;
    for batch in batches {
        writer.write(batch).map_err(|e| parquet_error(context(), e))?;
    }
    writer.close().map_err(|e| parquet_error(context(), e))?;
    file.sync_all().map_err(|e| io_error(format_args!("fsync {}", path.display()), e))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

// ---------------------------------------------------------------------------
// Loading keys at open
// ---------------------------------------------------------------------------

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

fn load_atom_keys(path: &Path, keys: &mut Keys) -> Result<(), StoreError> {
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

fn load_arrival_keys(path: &Path, keys: &mut Keys) -> Result<(), StoreError> {
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

fn load_dead_letter_keys(path: &Path, keys: &mut DeadLetterKeys) -> Result<(), StoreError> {
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

// ---------------------------------------------------------------------------
// Building batches
// ---------------------------------------------------------------------------

/// Splits `rows` into chunks whose variable-length bytes stay within
/// [`BATCH_BYTE_BUDGET`]; a single row over the budget is rejected.
fn chunk_by_size<'r, T>(
    rows: &[&'r T],
    size: impl Fn(&T) -> usize,
    describe: impl Fn(&T) -> String,
) -> Result<Vec<Vec<&'r T>>, StoreError> {
    let mut chunks = Vec::new();
    let mut current: Vec<&T> = Vec::new();
    let mut current_bytes = 0usize;
    for &row in rows {
        let bytes = size(row);
        if bytes > BATCH_BYTE_BUDGET {
            return Err(StoreError::RowRejected(format!(
                "{} is {bytes} bytes, over the embedded store's limit of {BATCH_BYTE_BUDGET} bytes per row",
                describe(row)
            )));
        }
        if !current.is_empty() && current_bytes + bytes > BATCH_BYTE_BUDGET {
            chunks.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(row);
        current_bytes += bytes;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Ok(chunks)
}

fn atom_bytes(row: &AtomRow) -> usize {
    64 + row.content_type.len()
        + row.content.len()
        + row.source_system.len()
        + row.correlation_id.len()
        + row.metadata_json.len()
        + row.embedding.len() * size_of::<f32>()
        + row.embedding_model.len()
        + row.source_topic.len()
        + row.trace_id.len()
}

fn dead_letter_bytes(row: &DeadLetterRow) -> usize {
    row.topology.len()
        + row.source_topic.len()
        + row.stage.len()
        + row.reason.len()
        + row.error.len()
        + row.original_key.as_ref().map_or(0, Vec::len)
        + row.original_payload.len()
}

fn strings<'r, T: 'r>(rows: &[&'r T], f: impl Fn(&'r T) -> &'r str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| f(r))))
}

fn timestamps<T>(rows: &[&T], f: impl Fn(&T) -> i64) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| f(r))).with_timezone("UTC"))
}

/// Builds one batch of the `atoms` table (rows must fit [`BATCH_BYTE_BUDGET`]).
fn atoms_batch(rows: &[&AtomRow]) -> Result<RecordBatch, StoreError> {
    let mut dimensions = Vec::with_capacity(rows.len());
    for row in rows {
        let dim = u32::try_from(row.embedding.len()).map_err(|_| {
            StoreError::RowRejected(format!("atom {}: embedding too long", row.content_hash))
        })?;
        dimensions.push(dim);
    }
    let values = Float32Array::from_iter_values(rows.iter().flat_map(|r| r.embedding.iter().copied()));
    let offsets = OffsetBuffer::<i32>::from_lengths(rows.iter().map(|r| r.embedding.len()));
    let embedding = ListArray::try_new(embedding_item_field(), offsets, Arc::new(values), None)
        .map_err(|e| arrow_error("build atoms.embedding", e))?;

    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.content_hash.to_hex()))),
        strings(rows, |r| &r.content_type),
        Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| r.content.as_slice()))),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.content.len() as u64))),
        strings(rows, |r| &r.source_system),
        strings(rows, |r| &r.correlation_id),
        strings(rows, |r| &r.metadata_json),
        Arc::new(embedding),
        strings(rows, |r| &r.embedding_model),
        Arc::new(UInt32Array::from(dimensions)),
        timestamps(rows, |r| r.event_time_ms),
        strings(rows, |r| &r.source_topic),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.source_partition))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.source_offset))),
        timestamps(rows, |r| r.ingested_at_ms),
        strings(rows, |r| &r.trace_id),
    ];
    RecordBatch::try_new(atoms_schema(), columns).map_err(|e| arrow_error("build atoms batch", e))
}

fn arrival_bytes(row: &ArrivalRow) -> usize {
    96 + row.source_topic.len() + row.content_type.len() + row.source_system.len() + row.correlation_id.len() + row.trace_id.len()
}

/// Builds one batch of the `atom_arrivals` table (rows must fit [`BATCH_BYTE_BUDGET`]).
fn arrivals_batch(rows: &[&ArrivalRow]) -> Result<RecordBatch, StoreError> {
    let columns: Vec<ArrayRef> = vec![
        strings(rows, |r| &r.source_topic),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.source_partition))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.source_offset))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.content_hash.to_hex()))),
        strings(rows, |r| r.outcome.as_str()),
        strings(rows, |r| &r.content_type),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.content_size))),
        strings(rows, |r| &r.source_system),
        strings(rows, |r| &r.correlation_id),
        timestamps(rows, |r| r.event_time_ms),
        timestamps(rows, |r| r.arrived_at_ms),
        strings(rows, |r| &r.trace_id),
    ];
    RecordBatch::try_new(arrivals_schema(), columns).map_err(|e| arrow_error("build atom_arrivals batch", e))
}

/// Builds one batch of the `dead_letters` table (rows must fit [`BATCH_BYTE_BUDGET`]).
fn dead_letters_batch(rows: &[&DeadLetterRow]) -> Result<RecordBatch, StoreError> {
    let columns: Vec<ArrayRef> = vec![
        strings(rows, |r| &r.topology),
        strings(rows, |r| &r.source_topic),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.source_partition))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.source_offset))),
        strings(rows, |r| &r.stage),
        strings(rows, |r| &r.reason),
        strings(rows, |r| &r.error),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.attempts))),
        timestamps(rows, |r| r.failed_at_ms),
        Arc::new(BinaryArray::from_iter(rows.iter().map(|r| r.original_key.as_deref()))),
        Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| r.original_payload.as_slice()))),
    ];
    RecordBatch::try_new(dead_letters_schema(), columns).map_err(|e| arrow_error("build dead_letters batch", e))
}

// ---------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------

impl EmbeddedStore {
    async fn insert_atoms_impl(&self, rows: &[AtomRow]) -> Result<InsertReport, StoreError> {
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
        Ok(report)
    }

    async fn insert_arrivals_impl(&self, rows: &[ArrivalRow]) -> Result<InsertReport, StoreError> {
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
        Ok(report)
    }

    async fn insert_dead_letters_impl(&self, rows: &[DeadLetterRow]) -> Result<InsertReport, StoreError> {
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
        Ok(report)
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

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

    #[test]
    fn oversized_rows_are_rejected_and_large_calls_split() {
        let chunks = chunk_by_size(&[&1usize, &2, &3], |n| n * BATCH_BYTE_BUDGET / 2, |n| format!("row {n}")).unwrap_err();
        assert!(matches!(chunks, StoreError::RowRejected(ref m) if m.contains("row 3")), "{chunks:?}");
        let chunks = chunk_by_size(&[&1usize, &1, &1, &2], |n| n * BATCH_BYTE_BUDGET / 2, |n| format!("row {n}")).unwrap();
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1, 1]);
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

    #[test]
    fn part_names_parse() {
        assert_eq!(part_sequence("part-00000000000000000042-abc-1-0.parquet"), Some(42));
        assert_eq!(part_sequence("other.parquet"), None);
    }
}
