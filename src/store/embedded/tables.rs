//! The tables' Arrow layout: their names and schemas (matching the ClickHouse
//! tables of the same names), and building record batches of rows in it.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, Float32Array, Int32Array, Int64Array, ListArray, StringArray, TimestampMillisecondArray, UInt32Array,
    UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use super::error::arrow_error;
use crate::atom::{ArrivalRow, AtomRow};
use crate::store::{DeadLetterRow, StoreError};

/// Name of the atoms table (and of its directory under `<data_dir>/tables`).
pub const ATOMS_TABLE: &str = "atoms";
/// Name of the dead-letters table (and of its directory under `<data_dir>/tables`).
pub const DEAD_LETTERS_TABLE: &str = "dead_letters";
/// Name of the arrivals table (and of its directory under `<data_dir>/tables`).
pub const ARRIVALS_TABLE: &str = "atom_arrivals";

/// Upper bound on the variable-length bytes (binary, text, embedding floats)
/// put in one Arrow batch. Arrow's `Utf8`/`Binary`/`List` columns use 32-bit
/// offsets, so a batch must stay well under 2 GiB per column; larger calls
/// are split into several batches of the same file.
const BATCH_BYTE_BUDGET: usize = 512 * 1024 * 1024;

/// Millisecond timestamps in UTC, as ClickHouse `DateTime64(3, 'UTC')`.
pub(super) fn timestamp_ms_utc() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The item field of `atoms.embedding`: `item`, `Float32`, not nullable
/// (as ClickHouse `Array(Float32)`).
pub(super) fn embedding_item_field() -> FieldRef {
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
/// `original_key` and `trace_id` are nullable.
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
/// | `trace_id` | Utf8, nullable | `trace_id` (null in parts written before it existed) |
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
        // Nullable: parts written before the column existed read as null.
        Field::new("trace_id", DataType::Utf8, true),
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

/// Splits `rows` into chunks whose variable-length bytes stay within
/// [`BATCH_BYTE_BUDGET`]; a single row over the budget is rejected.
pub(super) fn chunk_by_size<'r, T>(
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

pub(super) fn atom_bytes(row: &AtomRow) -> usize {
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

pub(super) fn dead_letter_bytes(row: &DeadLetterRow) -> usize {
    row.topology.len()
        + row.source_topic.len()
        + row.stage.len()
        + row.reason.len()
        + row.error.len()
        + row.original_key.as_ref().map_or(0, Vec::len)
        + row.original_payload.len()
        + row.trace_id.len()
}

fn strings<'r, T: 'r>(rows: &[&'r T], f: impl Fn(&'r T) -> &'r str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| f(r))))
}

fn timestamps<T>(rows: &[&T], f: impl Fn(&T) -> i64) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| f(r))).with_timezone("UTC"))
}

/// Builds one batch of the `atoms` table (rows must fit [`BATCH_BYTE_BUDGET`]).
pub(super) fn atoms_batch(rows: &[&AtomRow]) -> Result<RecordBatch, StoreError> {
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

pub(super) fn arrival_bytes(row: &ArrivalRow) -> usize {
    96 + row.source_topic.len() + row.content_type.len() + row.source_system.len() + row.correlation_id.len() + row.trace_id.len()
}

/// Builds one batch of the `atom_arrivals` table (rows must fit [`BATCH_BYTE_BUDGET`]).
pub(super) fn arrivals_batch(rows: &[&ArrivalRow]) -> Result<RecordBatch, StoreError> {
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
pub(super) fn dead_letters_batch(rows: &[&DeadLetterRow]) -> Result<RecordBatch, StoreError> {
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
        strings(rows, |r| &r.trace_id),
    ];
    RecordBatch::try_new(dead_letters_schema(), columns).map_err(|e| arrow_error("build dead_letters batch", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_rows_are_rejected_and_large_calls_split() {
        let chunks = chunk_by_size(&[&1usize, &2, &3], |n| n * BATCH_BYTE_BUDGET / 2, |n| format!("row {n}")).unwrap_err();
        assert!(matches!(chunks, StoreError::RowRejected(ref m) if m.contains("row 3")), "{chunks:?}");
        let chunks = chunk_by_size(&[&1usize, &1, &1, &2], |n| n * BATCH_BYTE_BUDGET / 2, |n| format!("row {n}")).unwrap();
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1, 1]);
    }
}
