//! The ensemble-inference tables of the embedded store, with the same names,
//! columns and versioning as the ClickHouse ones (`schemas/clickhouse/006`
//! to `008`): a row is written only if its key holds no row of the same or
//! a higher version, so a retraction (version 2) outranks the live row
//! (version 1) and a replay writes nothing. The views
//! `inference_results_live` and `model_outputs_live` keep the highest
//! version per key and drop retracted rows, as `FINAL WHERE deleted = 0`
//! does on ClickHouse.
//!
//! These tables are small next to `atoms` (a few rows per request), so
//! `open` reads them whole and keeps every key's version in memory.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, RwLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{arrow_error, io_error, parquet_error};
use super::files::Table;
use super::keys::{read_lock, write_lock};
use crate::atom::SourcePosition;
use crate::inference::{CompensationRow, OutputRow, Recalled, ResultRow, Retracted};
use crate::store::StoreError;

pub const RESULTS_TABLE: &str = "inference_results";
pub const OUTPUTS_TABLE: &str = "model_outputs";
pub const COMPENSATIONS_TABLE: &str = "inference_compensations";

/// The columns, none nullable, then `trace_id` (crate::trace), nullable:
/// parts written before it existed read as null (009_trace_ids.sql adds it
/// on ClickHouse).
fn schema(columns: &[(&str, DataType)]) -> SchemaRef {
    let mut fields: Vec<Field> = columns.iter().map(|(n, t)| Field::new(*n, t.clone(), false)).collect();
    fields.push(Field::new("trace_id", DataType::Utf8, true));
    Arc::new(Schema::new(fields))
}

/// Columns of `inference_results` (see `ResultRow`).
pub fn results_schema() -> SchemaRef {
    use DataType::*;
    schema(&[
        ("source_topic", Utf8),
        ("source_partition", Int32),
        ("source_offset", Int64),
        ("request_id", Utf8),
        ("correlation_id", Utf8),
        ("status", Utf8),
        ("aggregation", Utf8),
        ("label", Utf8),
        ("score", Float64),
        ("has_score", UInt8),
        ("models_asked", UInt32),
        ("models", Utf8),
        ("models_counted", UInt32),
        ("models_failed", UInt32),
        ("late_outputs", UInt32),
        ("flags", Utf8),
        ("ensemble", Utf8),
        ("completed_at_ms", UInt64),
        ("deleted", UInt8),
        ("version", UInt64),
    ])
}

/// Columns of `model_outputs` (see `OutputRow`).
pub fn outputs_schema() -> SchemaRef {
    use DataType::*;
    schema(&[
        ("source_topic", Utf8),
        ("source_partition", Int32),
        ("source_offset", Int64),
        ("model_id", Utf8),
        ("request_id", Utf8),
        ("correlation_id", Utf8),
        ("model_version", Utf8),
        ("sequence", UInt32),
        ("label", Utf8),
        ("score", Float64),
        ("has_score", UInt8),
        ("error", Utf8),
        ("latency_ms", UInt64),
        ("attempts", UInt32),
        ("hedged", UInt8),
        ("coalesced", UInt8),
        ("late", UInt8),
        ("counted", UInt8),
        ("flags", Utf8),
        ("answered_at_ms", UInt64),
        ("deleted", UInt8),
        ("version", UInt64),
    ])
}

/// Columns of `inference_compensations` (see `CompensationRow`).
pub fn compensations_schema() -> SchemaRef {
    use DataType::*;
    schema(&[
        ("source_topic", Utf8),
        ("source_partition", Int32),
        ("source_offset", Int64),
        ("correlation_id", Utf8),
        ("step", UInt8),
        ("request_id", Utf8),
        ("failed_step", Utf8),
        ("reason_code", Utf8),
        ("reason", Utf8),
        ("done_steps", Utf8),
        ("models", Utf8),
        ("reservations", UInt32),
        ("failed_at_ms", UInt64),
        ("retracted_outputs", UInt32),
        ("retracted_result", UInt8),
        ("announce_partition", Int32),
        ("announce_offset", Int64),
        ("updated_at_ms", UInt64),
        ("version", UInt64),
    ])
}

/// Rows as one Arrow batch of `schema` (field names match column names).
fn to_batch<R: Serialize>(schema: &SchemaRef, rows: &[&R]) -> Result<RecordBatch, StoreError> {
    let context = || format!("build a batch of {} rows", rows.len());
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone()).build_decoder().map_err(|e| arrow_error(context(), e))?;
    decoder.serialize(rows).map_err(|e| arrow_error(context(), e))?;
    decoder.flush().map_err(|e| arrow_error(context(), e))?.ok_or_else(|| StoreError::Fatal(format!("{}: no batch", context())))
}

/// Every row of the Parquet file at `path`.
fn read_rows<R: DeserializeOwned>(path: &Path) -> Result<Vec<R>, StoreError> {
    let context = || format!("read {}", path.display());
    let file = File::open(path).map_err(|e| io_error(context(), e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| parquet_error(context(), e))?
        .build()
        .map_err(|e| parquet_error(context(), e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| arrow_error(context(), e))?;
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        writer.write(&batch).map_err(|e| arrow_error(context(), e))?;
        writer.finish().map_err(|e| arrow_error(context(), e))?;
        let mut batch_rows: Vec<R> =
            serde_json::from_slice(&writer.into_inner()).map_err(|e| StoreError::Fatal(format!("{}: {e}", context())))?;
        rows.append(&mut batch_rows);
    }
    Ok(rows)
}

type Pos = (String, i32, i64);

fn pos(p: &SourcePosition) -> Pos {
    (p.topic.clone(), p.partition, p.offset)
}

/// What is stored, by key: the row of the highest version (a retraction
/// when `deleted = 1`).
#[derive(Default)]
struct Versions {
    results: HashMap<Pos, ResultRow>,
    outputs: HashMap<(Pos, String), OutputRow>,
    compensations: HashMap<Pos, CompensationRow>,
}

pub(super) struct InferenceTables {
    results: Table,
    outputs: Table,
    compensations: Table,
    versions: Arc<RwLock<Versions>>,
}

impl InferenceTables {
    pub(super) fn open(tables: &Path, writable: bool) -> Result<Self, StoreError> {
        let mut versions = Versions::default();
        let (results, parts) = Table::open(RESULTS_TABLE, tables.join(RESULTS_TABLE), results_schema(), writable)?;
        for part in &parts {
            for r in read_rows::<ResultRow>(&part.path)? {
                keep_highest(&mut versions.results, pos(&r.position()), r);
            }
        }
        let (outputs, parts) = Table::open(OUTPUTS_TABLE, tables.join(OUTPUTS_TABLE), outputs_schema(), writable)?;
        for part in &parts {
            for r in read_rows::<OutputRow>(&part.path)? {
                keep_highest(&mut versions.outputs, (pos(&r.position()), r.model_id.clone()), r);
            }
        }
        let (compensations, parts) =
            Table::open(COMPENSATIONS_TABLE, tables.join(COMPENSATIONS_TABLE), compensations_schema(), writable)?;
        for part in &parts {
            for r in read_rows::<CompensationRow>(&part.path)? {
                keep_highest(&mut versions.compensations, pos(&r.position()), r);
            }
        }
        Ok(Self { results, outputs, compensations, versions: Arc::new(RwLock::new(versions)) })
    }

    pub(super) fn tables(&self) -> [&Table; 3] {
        [&self.results, &self.outputs, &self.compensations]
    }

    /// Registers the views that hide retracted and replaced rows.
    pub(super) async fn register_views(&self, ctx: &SessionContext) -> Result<(), datafusion::error::DataFusionError> {
        for (view, table, key, schema) in [
            ("inference_results_live", RESULTS_TABLE, "source_topic, source_partition, source_offset", results_schema()),
            ("model_outputs_live", OUTPUTS_TABLE, "source_topic, source_partition, source_offset, model_id", outputs_schema()),
        ] {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let columns = columns.join(", ");
            let sql = format!(
                "CREATE VIEW {view} AS SELECT {columns} FROM (SELECT {columns}, row_number() OVER (PARTITION BY {key} ORDER BY version DESC) AS hartonomous_rank FROM {table}) WHERE hartonomous_rank = 1 AND deleted = 0"
            );
            ctx.sql(&sql).await?;
        }
        Ok(())
    }

    pub(super) async fn insert_results(&self, rows: &[ResultRow]) -> Result<(), StoreError> {
        let guard = self.results.writer.clone().lock_owned().await;
        let fresh: Vec<&ResultRow> = {
            let v = read_lock(&self.versions);
            let mut seen = HashMap::new();
            rows.iter()
                .filter(|r| {
                    let key = pos(&r.position());
                    v.results.get(&key).is_none_or(|s| r.version > s.version) && seen.insert(key, ()).is_none()
                })
                .collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.results.schema, &fresh)?;
        let stored: Vec<ResultRow> = fresh.into_iter().cloned().collect();
        let versions = self.versions.clone();
        self.results
            .write_part(guard, vec![batch], move || {
                let mut v = write_lock(&versions);
                for r in stored {
                    keep_highest(&mut v.results, pos(&r.position()), r);
                }
            })
            .await
    }

    pub(super) async fn insert_outputs(&self, rows: &[OutputRow]) -> Result<(), StoreError> {
        let guard = self.outputs.writer.clone().lock_owned().await;
        let fresh: Vec<&OutputRow> = {
            let v = read_lock(&self.versions);
            let mut seen = HashMap::new();
            rows.iter()
                .filter(|r| {
                    let key = (pos(&r.position()), r.model_id.clone());
                    v.outputs.get(&key).is_none_or(|s| r.version > s.version) && seen.insert(key, ()).is_none()
                })
                .collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.outputs.schema, &fresh)?;
        let stored: Vec<OutputRow> = fresh.into_iter().cloned().collect();
        let versions = self.versions.clone();
        self.outputs
            .write_part(guard, vec![batch], move || {
                let mut v = write_lock(&versions);
                for r in stored {
                    keep_highest(&mut v.outputs, (pos(&r.position()), r.model_id.clone()), r);
                }
            })
            .await
    }

    pub(super) async fn retract(&self, p: &SourcePosition, correlation_id: &str, models: &[String], trace_id: &str) -> Result<Retracted, StoreError> {
        let key = pos(p);
        let (live_outputs, live_result, mut names) = {
            let v = read_lock(&self.versions);
            let stored: Vec<String> = v.outputs.keys().filter(|(k, _)| *k == key).map(|(_, m)| m.clone()).collect();
            let live = stored.iter().filter(|m| v.outputs.get(&(key.clone(), (*m).clone())).is_some_and(|r| r.deleted == 0)).count();
            let result = v.results.get(&key).is_some_and(|r| r.deleted == 0);
            (live, result, stored)
        };
        names.extend(models.iter().cloned());
        names.sort_unstable();
        names.dedup();
        let outputs: Vec<OutputRow> = names.iter().map(|m| OutputRow::retraction_of(p, correlation_id, m, trace_id)).collect();
        self.insert_outputs(&outputs).await?;
        self.insert_results(&[ResultRow::retraction_of(p, correlation_id, trace_id)]).await?;
        Ok(Retracted { outputs: live_outputs, result: live_result })
    }

    pub(super) fn compensations(&self, positions: &[SourcePosition]) -> HashMap<SourcePosition, CompensationRow> {
        let v = read_lock(&self.versions);
        positions.iter().filter_map(|p| v.compensations.get(&pos(p)).map(|r| (p.clone(), r.clone()))).collect()
    }

    /// For each position: its compensation if one was recorded, else its
    /// live result with its live outputs (sequence order).
    pub(super) fn recall(&self, positions: &[SourcePosition]) -> HashMap<SourcePosition, Recalled> {
        let v = read_lock(&self.versions);
        let mut out = HashMap::new();
        for p in positions {
            let key = pos(p);
            if let Some(c) = v.compensations.get(&key) {
                out.insert(p.clone(), Recalled::Compensation(c.clone()));
            } else if let Some(r) = v.results.get(&key).filter(|r| r.deleted == 0) {
                let mut outputs: Vec<OutputRow> = v.outputs.iter().filter(|((k, _), o)| *k == key && o.deleted == 0).map(|(_, o)| o.clone()).collect();
                outputs.sort_by_key(|o| o.sequence);
                out.insert(p.clone(), Recalled::Result(r.clone(), outputs));
            }
        }
        out
    }

    pub(super) async fn record_compensations(&self, rows: &[CompensationRow]) -> Result<(), StoreError> {
        let guard = self.compensations.writer.clone().lock_owned().await;
        let fresh: Vec<&CompensationRow> = {
            let v = read_lock(&self.versions);
            let mut seen = std::collections::HashSet::new();
            rows.iter()
                .filter(|r| v.compensations.get(&pos(&r.position())).is_none_or(|s| r.version > s.version) && seen.insert((pos(&r.position()), r.version)))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.compensations.schema, &fresh)?;
        let stored: Vec<CompensationRow> = fresh.into_iter().cloned().collect();
        let versions = self.versions.clone();
        self.compensations
            .write_part(guard, vec![batch], move || {
                let mut v = write_lock(&versions);
                for r in stored {
                    keep_highest(&mut v.compensations, pos(&r.position()), r);
                }
            })
            .await
    }
}

/// Rows with a version, which the highest one replaces.
trait Versioned {
    fn version(&self) -> u64;
}

impl Versioned for ResultRow {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for OutputRow {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for CompensationRow {
    fn version(&self) -> u64 {
        self.version
    }
}

fn keep_highest<K: std::hash::Hash + Eq, R: Versioned>(map: &mut HashMap<K, R>, key: K, row: R) {
    if map.get(&key).is_none_or(|s| row.version() > s.version()) {
        map.insert(key, row);
    }
}
