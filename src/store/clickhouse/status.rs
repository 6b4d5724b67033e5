//! [`RequestLookup`] on ClickHouse: one query per table, the correlation id
//! bound as a parameter (never spliced into the SQL), each table read with
//! `FINAL` so a row written twice counts once.

use futures::future::BoxFuture;

use super::ClickHouseStore;
use crate::store::StoreError;
use crate::store::status::{ArrivalStatus, CompensationStatus, DeadLetterStatus, RequestLookup, RequestStatus, ResultStatus};

const ARRIVALS: &str = "SELECT source_topic, source_partition, source_offset, toString(outcome) AS outcome, content_hash, source_system, \
     toInt64(arrived_at_ms) AS arrived_at_ms, trace_id FROM atom_arrivals FINAL WHERE correlation_id = ?";
const DEAD_LETTERS: &str = "SELECT topology, source_topic, source_partition, source_offset, stage, reason, error, failed_at_ms, trace_id \
     FROM dead_letters FINAL WHERE original_key = ?";
const RESULTS: &str = "SELECT source_topic, source_partition, source_offset, status, aggregation, label, score, models_counted, completed_at_ms, trace_id \
     FROM inference_results_live WHERE correlation_id = ?";
const COMPENSATIONS: &str = "SELECT source_topic, source_partition, source_offset, step, failed_step, reason_code, reason, failed_at_ms, trace_id \
     FROM inference_compensations FINAL WHERE correlation_id = ?";

impl ClickHouseStore {
    async fn rows<T>(&self, sql: &'static str, id: &str) -> Result<Vec<T>, StoreError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.timed("looking a request up", self.client.query(sql).bind(id).fetch_all::<T>()).await
    }
}

impl RequestLookup for ClickHouseStore {
    fn request_status<'a>(&'a self, correlation_id: &'a str) -> BoxFuture<'a, Result<RequestStatus, StoreError>> {
        Box::pin(async move {
            let (arrivals, dead_letters, results, compensations) = futures::try_join!(
                self.rows::<ArrivalStatus>(ARRIVALS, correlation_id),
                self.rows::<DeadLetterStatus>(DEAD_LETTERS, correlation_id),
                self.rows::<ResultStatus>(RESULTS, correlation_id),
                self.rows::<CompensationStatus>(COMPENSATIONS, correlation_id),
            )?;
            Ok(RequestStatus::new(correlation_id, arrivals, dead_letters, results, compensations))
        })
    }
}
