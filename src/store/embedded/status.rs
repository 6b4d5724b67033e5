//! [`RequestLookup`] on the embedded store: one DataFusion query per table,
//! the correlation id passed as a query parameter (never spliced into the
//! SQL), rows read back through Arrow's JSON writer into the shared types.

use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;

use super::{EmbeddedStore, QueryError};
use crate::store::StoreError;
use crate::store::status::{RequestLookup, RequestStatus};

const ARRIVALS: &str = "SELECT source_topic, source_partition, source_offset, outcome, content_hash, source_system, \
     CAST(arrived_at AS BIGINT) AS arrived_at_ms, trace_id FROM atom_arrivals WHERE correlation_id = $1";
const DEAD_LETTERS: &str = "SELECT topology, source_topic, source_partition, source_offset, stage, reason, error, \
     CAST(failed_at AS BIGINT) AS failed_at_ms, trace_id FROM dead_letters WHERE original_key = $1";
const RESULTS: &str = "SELECT source_topic, source_partition, source_offset, status, aggregation, label, score, models_counted, completed_at_ms, trace_id \
     FROM inference_results_live WHERE correlation_id = $1";
/// The furthest step per request, as `FINAL` keeps the highest version on ClickHouse.
const COMPENSATIONS: &str = "SELECT source_topic, source_partition, source_offset, step, failed_step, reason_code, reason, failed_at_ms, trace_id FROM \
     (SELECT *, row_number() OVER (PARTITION BY source_topic, source_partition, source_offset ORDER BY version DESC) AS hartonomous_rank \
      FROM inference_compensations WHERE correlation_id = $1) WHERE hartonomous_rank = 1";

async fn rows<T: DeserializeOwned>(ctx: &SessionContext, sql: &str, param: ScalarValue) -> Result<Vec<T>, QueryError> {
    let batches = ctx.sql(sql).await?.with_param_values(vec![param])?.collect().await?;
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    for b in &batches {
        writer.write(b)?;
    }
    writer.finish()?;
    let json = writer.into_inner();
    if json.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&json).map_err(|e| QueryError(format!("reading the look-up's rows: {e}")))
}

impl RequestLookup for EmbeddedStore {
    fn request_status<'a>(&'a self, correlation_id: &'a str) -> BoxFuture<'a, Result<RequestStatus, StoreError>> {
        Box::pin(async move {
            let lookup = async {
                let ctx = self.session().await?;
                let id = || ScalarValue::Utf8(Some(correlation_id.to_string()));
                let arrivals = rows(&ctx, ARRIVALS, id()).await?;
                let dead_letters = rows(&ctx, DEAD_LETTERS, ScalarValue::Binary(Some(correlation_id.as_bytes().to_vec()))).await?;
                let results = rows(&ctx, RESULTS, id()).await?;
                let compensations = rows(&ctx, COMPENSATIONS, id()).await?;
                Ok::<_, QueryError>(RequestStatus::new(correlation_id, arrivals, dead_letters, results, compensations))
            };
            lookup.await.map_err(|e| StoreError::Unavailable(format!("looking request `{correlation_id}` up: {}", e.0)))
        })
    }
}
