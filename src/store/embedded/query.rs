//! SQL: read-only DataFusion queries over the tables, each table registered
//! as a listing table over its visible part files.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::listing::{ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::error::DataFusionError;
use datafusion::execution::options::ReadOptions;
use datafusion::prelude::{ParquetReadOptions, SQLOptions, SessionConfig, SessionContext};

use super::files::{PART_SUFFIX, Table};
use super::{EmbeddedStore, QueryError};

impl EmbeddedStore {
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

    /// A fresh session with every table and view registered: it sees every
    /// file written before it was made.
    pub(super) async fn session(&self) -> Result<SessionContext, QueryError> {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(true));
        for table in [&self.atoms, &self.dead_letters, &self.arrivals].into_iter().chain(self.inference.tables()) {
            table.register(&ctx).await?;
        }
        self.inference.register_views(&ctx).await?;
        Ok(ctx)
    }

    async fn run_query(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let ctx = self.session().await?;
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
    /// Registers this table in `ctx` as a listing table over its visible
    /// parts (a merged part hides the parts it holds; see `files::visible`).
    async fn register(&self, ctx: &SessionContext) -> Result<(), DataFusionError> {
        let options = ParquetReadOptions {
            file_extension: PART_SUFFIX,
            schema: Some(&self.schema),
            ..Default::default()
        };
        let parts = self.visible_parts().map_err(|e| DataFusionError::External(Box::new(e)))?;
        if parts.is_empty() {
            // No part at all: the directory (or its absence) reads as an empty table.
            let url = format!("{}{}", self.dir.display(), std::path::MAIN_SEPARATOR);
            return ctx.register_parquet(self.name, url, options).await;
        }
        let listing = options.to_listing_options(&ctx.copied_config(), ctx.copied_table_options());
        let urls = parts
            .iter()
            .map(|p| ListingTableUrl::parse(p.path.to_string_lossy()))
            .collect::<Result<Vec<_>, _>>()?;
        let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(listing).with_schema(self.schema.clone());
        ctx.register_table(self.name, Arc::new(ListingTable::try_new(config)?))?;
        Ok(())
    }
}
