//! The ensemble-inference tables (`inference_results`, `model_outputs`,
//! `inference_compensations`): plain inserts, since every table is a
//! `ReplacingMergeTree(version)` keyed by source position and a repeated
//! row collapses under FINAL; lookups read with FINAL.

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;

use super::ClickHouseStore;
use super::query::SqlTuple;
use crate::atom::SourcePosition;
use crate::inference::{CompensationRow, LIVE, OutputRow, RETRACTED, Recalled, ResultRow, Retracted};
use crate::store::{InferenceStore, StoreError};

impl ClickHouseStore {
    async fn insert_rows<T: clickhouse::RowOwned + clickhouse::RowWrite>(&self, table: &str, rows: &[T]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        for chunk in rows.chunks(self.config.max_rows_per_insert.max(1)) {
            let context = format!("insert {} rows into {}", chunk.len(), self.table(table));
            self.timed(&context, async {
                let insert = self.client.insert::<T>(table).await?;
                let mut insert = self.insert_settings(insert, None);
                for row in chunk {
                    insert.write(row).await?;
                }
                insert.end().await
            })
            .await?;
        }
        Ok(())
    }

    async fn retract_impl(&self, p: &SourcePosition, correlation_id: &str, models: &[String], trace_id: &str) -> Result<Retracted, StoreError> {
        let live_outputs: Vec<String> = self
            .timed(
                &format!("look up the outputs of {p} in {}", self.table("model_outputs")),
                self.client
                    .query("SELECT model_id FROM model_outputs FINAL WHERE source_topic = ? AND source_partition = ? AND source_offset = ? AND deleted = 0")
                    .bind(&p.topic)
                    .bind(p.partition)
                    .bind(p.offset)
                    .fetch_all::<String>(),
            )
            .await?;
        let live_result: u64 = self
            .timed(
                &format!("look up the result of {p} in {}", self.table("inference_results")),
                self.client
                    .query("SELECT count() FROM inference_results FINAL WHERE source_topic = ? AND source_partition = ? AND source_offset = ? AND deleted = 0")
                    .bind(&p.topic)
                    .bind(p.partition)
                    .bind(p.offset)
                    .fetch_one::<u64>(),
            )
            .await?;
        // Every model asked gets a retraction row, stored or not: it also
        // outranks an output written later by a replay.
        let mut names: Vec<&str> = models.iter().map(String::as_str).chain(live_outputs.iter().map(String::as_str)).collect();
        names.sort_unstable();
        names.dedup();
        let outputs: Vec<OutputRow> = names.iter().map(|m| OutputRow::retraction_of(p, correlation_id, m, trace_id)).collect();
        self.insert_rows("model_outputs", &outputs).await?;
        self.insert_rows("inference_results", &[ResultRow::retraction_of(p, correlation_id, trace_id)]).await?;
        Ok(Retracted { outputs: live_outputs.len(), result: live_result > 0 })
    }

    /// The rows of `table` (FINAL, and `filter`) at `positions`, one query
    /// per (topic, partition) and 2,000 offsets.
    async fn rows_at<T: clickhouse::RowOwned + clickhouse::RowRead>(&self, table: &str, filter: &str, positions: &[SourcePosition]) -> Result<Vec<T>, StoreError> {
        let mut by_place: BTreeMap<(&str, i32), Vec<i64>> = BTreeMap::new();
        for p in positions {
            by_place.entry((p.topic.as_str(), p.partition)).or_default().push(p.offset);
        }
        let mut found = Vec::new();
        for ((topic, partition), mut offsets) in by_place {
            offsets.sort_unstable();
            offsets.dedup();
            for chunk in offsets.chunks(2_000) {
                let sql = format!("SELECT ?fields FROM {table} FINAL WHERE source_topic = ? AND source_partition = ? AND source_offset IN ?{filter}");
                let mut rows: Vec<T> = self
                    .timed(
                        &format!("look up {} positions of {topic}/{partition} in {}", chunk.len(), self.table(table)),
                        self.client.query(&sql).bind(topic).bind(partition).bind(SqlTuple(chunk)).fetch_all::<T>(),
                    )
                    .await?;
                found.append(&mut rows);
            }
        }
        Ok(found)
    }

    async fn compensations_impl(&self, positions: &[SourcePosition]) -> Result<HashMap<SourcePosition, CompensationRow>, StoreError> {
        let rows: Vec<CompensationRow> = self.rows_at("inference_compensations", "", positions).await?;
        Ok(rows.into_iter().map(|r| (r.position(), r)).collect())
    }

    async fn recall_impl(&self, positions: &[SourcePosition]) -> Result<HashMap<SourcePosition, Recalled>, StoreError> {
        let mut out: HashMap<SourcePosition, Recalled> =
            self.compensations_impl(positions).await?.into_iter().map(|(p, c)| (p, Recalled::Compensation(c))).collect();
        let rest: Vec<SourcePosition> = positions.iter().filter(|p| !out.contains_key(*p)).cloned().collect();
        let results: Vec<ResultRow> = self.rows_at("inference_results", " AND deleted = 0", &rest).await?;
        if results.is_empty() {
            return Ok(out);
        }
        let decided: Vec<SourcePosition> = results.iter().map(ResultRow::position).collect();
        let mut outputs: HashMap<SourcePosition, Vec<OutputRow>> = HashMap::new();
        for o in self.rows_at::<OutputRow>("model_outputs", " AND deleted = 0", &decided).await? {
            outputs.entry(o.position()).or_default().push(o);
        }
        for r in results {
            let mut mine = outputs.remove(&r.position()).unwrap_or_default();
            mine.sort_by_key(|o| o.sequence);
            out.insert(r.position(), Recalled::Result(r, mine));
        }
        Ok(out)
    }
}

impl InferenceStore for ClickHouseStore {
    fn insert_outputs<'a>(&'a self, rows: &'a [OutputRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_rows("model_outputs", rows))
    }

    fn insert_results<'a>(&'a self, rows: &'a [ResultRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_rows("inference_results", rows))
    }

    fn retract<'a>(&'a self, position: &'a SourcePosition, correlation_id: &'a str, models: &'a [String], trace_id: &'a str) -> BoxFuture<'a, Result<Retracted, StoreError>> {
        Box::pin(self.retract_impl(position, correlation_id, models, trace_id))
    }

    fn compensations<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, CompensationRow>, StoreError>> {
        Box::pin(self.compensations_impl(positions))
    }

    fn record_compensations<'a>(&'a self, rows: &'a [CompensationRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_rows("inference_compensations", rows))
    }

    fn recall<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, Recalled>, StoreError>> {
        Box::pin(self.recall_impl(positions))
    }
}

// Versions are fixed per kind of row (see `crate::inference::LIVE`).
const _: () = assert!(LIVE < RETRACTED);
