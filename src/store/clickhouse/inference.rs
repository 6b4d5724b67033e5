//! The ensemble-inference tables (`inference_results`, `model_outputs`,
//! `inference_compensations`): plain inserts, since every table is a
//! `ReplacingMergeTree(version)` keyed by source position and a repeated
//! row collapses under FINAL; lookups read with FINAL.

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;

use super::ClickHouseStore;
use super::query::SqlTuple;
use crate::atom::SourcePosition;
use crate::inference::{CompensationRow, LIVE, OutputRow, RETRACTED, ResultRow, Retracted};
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

    async fn retract_impl(&self, p: &SourcePosition, correlation_id: &str, models: &[String]) -> Result<Retracted, StoreError> {
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
        let outputs: Vec<OutputRow> = names.iter().map(|m| OutputRow::retraction_of(p, correlation_id, m)).collect();
        self.insert_rows("model_outputs", &outputs).await?;
        self.insert_rows("inference_results", &[ResultRow::retraction_of(p, correlation_id)]).await?;
        Ok(Retracted { outputs: live_outputs.len(), result: live_result > 0 })
    }

    async fn compensations_impl(&self, positions: &[SourcePosition]) -> Result<HashMap<SourcePosition, CompensationRow>, StoreError> {
        let mut by_place: BTreeMap<(&str, i32), Vec<i64>> = BTreeMap::new();
        for p in positions {
            by_place.entry((p.topic.as_str(), p.partition)).or_default().push(p.offset);
        }
        let mut found = HashMap::new();
        for ((topic, partition), mut offsets) in by_place {
            offsets.sort_unstable();
            offsets.dedup();
            for chunk in offsets.chunks(2_000) {
                let rows: Vec<CompensationRow> = self
                    .timed(
                        &format!("look up {} compensations of {topic}/{partition}", chunk.len()),
                        self.client
                            .query(
                                "SELECT ?fields FROM inference_compensations FINAL \
                                 WHERE source_topic = ? AND source_partition = ? AND source_offset IN ?",
                            )
                            .bind(topic)
                            .bind(partition)
                            .bind(SqlTuple(chunk))
                            .fetch_all::<CompensationRow>(),
                    )
                    .await?;
                for row in rows {
                    found.insert(row.position(), row);
                }
            }
        }
        Ok(found)
    }
}

impl InferenceStore for ClickHouseStore {
    fn insert_outputs<'a>(&'a self, rows: &'a [OutputRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_rows("model_outputs", rows))
    }

    fn insert_results<'a>(&'a self, rows: &'a [ResultRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_rows("inference_results", rows))
    }

    fn retract<'a>(&'a self, position: &'a SourcePosition, correlation_id: &'a str, models: &'a [String]) -> BoxFuture<'a, Result<Retracted, StoreError>> {
        Box::pin(self.retract_impl(position, correlation_id, models))
    }

    fn compensations<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, CompensationRow>, StoreError>> {
        Box::pin(self.compensations_impl(positions))
    }

    fn record_compensations<'a>(&'a self, rows: &'a [CompensationRow]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.insert_rows("inference_compensations", rows))
    }
}

// Versions are fixed per kind of row (see `crate::inference::LIVE`).
const _: () = assert!(LIVE < RETRACTED);
