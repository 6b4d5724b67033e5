//! The ClickHouse store: the same `atoms` and `dead_letters` tables as the
//! embedded store, in a ClickHouse server reached over HTTP with the
//! `clickhouse` crate (RowBinary inserts, no client-side schema validation:
//! ClickHouse 18.16 lacks the formats and settings that validation needs).
//!
//! # Connecting
//!
//! `http://` or `https://` (the server's `https_port`; rustls on ring,
//! trusting the system roots plus [`ClickHouseConfig::ca_file`]).
//! [`ClickHouseStore::connect`] creates the database when it is missing and
//! migrates when `migrate_on_start` is set; [`ClickHouseStore::connect_for_query`]
//! (the `query` command) creates and migrates nothing and works for a user
//! whose profile is `readonly = 1`.
//!
//! # Schema
//!
//! The DDL lives in `schemas/clickhouse/*.sql` and is compiled in
//! ([`MIGRATIONS`]). [`ClickHouseStore::migrate`] applies every file not yet
//! recorded in `hartonomous_migrations`, records its SHA-256, and refuses to
//! go on if an applied file has changed since. The files run unchanged on
//! Debian's ClickHouse 18.16 and on current releases; `schemas/clickhouse/README.md`
//! has the analyst queries.
//!
//! # Idempotency
//!
//! `atoms` is a `ReplacingMergeTree` keyed by `content_hash`, `dead_letters`
//! one keyed by source position, so a row written twice is one row under
//! `FINAL` and after merges. On top of that, every insert call first asks
//! which keys are already stored (one `IN (...)` query per 2,000 keys) and
//! writes only the others, so the [`InsertReport`] is exact for callers in
//! this process (calls on one store are serialized per table). On servers
//! that have `insert_deduplication_token` (and `non_replicated_deduplication_window`,
//! both detected at connect time, absent on 18.16) each chunk also carries a
//! deterministic token derived from its rows' positions and hashes, so a
//! retried chunk is dropped by the server. Where the server has
//! `async_insert` (on by default since 26.2) the store's already-batched
//! inserts turn it off, so an insert returns once its rows are in a part.
//!
//! # Errors
//!
//! [`classify`] is the one place where `clickhouse` crate errors and
//! ClickHouse server error codes become [`StoreError`]s: retryable
//! (`Unavailable`), bad row (`RowRejected`) or fatal. See its docs for the table.

mod config;
mod connect;
mod error;
mod inference;
mod insert;
mod migrate;
mod query;
mod status;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::time::Duration;

use clickhouse::Client;
use futures::future::BoxFuture;
use tokio::sync::Mutex;

use super::{AtomStore, DeadLetterArchive, DeadLetterRow, InsertReport, StoreError};
use crate::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};
use error::timed;

pub use config::ClickHouseConfig;
pub use connect::{Capabilities, ServerVersion};
pub use error::{classify, classify_server_message, server_code_class, server_error_code};
pub use insert::{arrivals_dedup_token, atoms_dedup_token, datetime_secs, dead_letters_dedup_token};
pub use migrate::{
    ARRIVALS_COLUMNS, ATOMS_COLUMNS, BOOTSTRAP, DEAD_LETTERS_COLUMNS, MIGRATION_LOCK, MIGRATIONS, MIGRATIONS_TABLE, RUN_IF, Step, checksum,
    split_statements, split_steps,
};

/// The ClickHouse store. See the [module docs](self).
pub struct ClickHouseStore {
    config: ClickHouseConfig,
    /// Scoped to the configured database.
    client: Client,
    capabilities: Capabilities,
    timeout: Duration,
    /// Held across the existence check and the insert, so that calls on this
    /// store never write the same key twice.
    atoms_writer: Mutex<()>,
    arrivals_writer: Mutex<()>,
    dead_letters_writer: Mutex<()>,
}

impl fmt::Debug for ClickHouseStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseStore")
            .field("url", &self.config.url)
            .field("database", &self.config.database)
            .field("user", &self.config.user)
            .field("server", &self.capabilities.version_string)
            .field("supports_dedup_token", &self.capabilities.supports_dedup_token)
            .finish()
    }
}

impl ClickHouseStore {
    pub fn config(&self) -> &ClickHouseConfig {
        &self.config
    }

    pub fn database(&self) -> &str {
        &self.config.database
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    async fn timed<T>(&self, context: &str, request: impl Future<Output = clickhouse::error::Result<T>>) -> Result<T, StoreError> {
        timed(self.timeout, context, request).await
    }

    /// Per-insert settings: synchronous where the server would otherwise
    /// batch asynchronously, and the deduplication token if there is one.
    fn insert_settings<T>(&self, mut insert: clickhouse::insert::Insert<T>, token: Option<&str>) -> clickhouse::insert::Insert<T> {
        if self.capabilities.has_async_insert {
            insert = insert.with_setting("async_insert", "0");
        }
        if let Some(token) = token {
            insert = insert.with_setting("insert_deduplication_token", token);
        }
        insert
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.config.database)
    }
}

impl AtomStore for ClickHouseStore {
    fn find_atoms<'a>(&'a self, hashes: &'a [ContentHash]) -> BoxFuture<'a, Result<HashMap<ContentHash, Vec<SourcePosition>>, StoreError>> {
        Box::pin(self.find_atoms_impl(hashes))
    }

    fn arrival_outcomes<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, ArrivalOutcome>, StoreError>> {
        Box::pin(self.arrival_outcomes_impl(positions))
    }

    fn insert_arrivals<'a>(&'a self, rows: &'a [ArrivalRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_arrivals_impl(rows, true))
    }

    fn insert_new_arrivals<'a>(&'a self, rows: &'a [ArrivalRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_arrivals_impl(rows, false))
    }

    fn existing_hashes<'a>(&'a self, hashes: &'a [ContentHash]) -> BoxFuture<'a, Result<HashSet<ContentHash>, StoreError>> {
        Box::pin(self.existing_hashes_impl(hashes))
    }

    fn insert_atoms<'a>(&'a self, rows: &'a [AtomRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_atoms_impl(rows, true))
    }

    fn insert_new_atoms<'a>(&'a self, rows: &'a [AtomRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_atoms_impl(rows, false))
    }

}

impl DeadLetterArchive for ClickHouseStore {
    fn insert_dead_letters<'a>(&'a self, rows: &'a [DeadLetterRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(self.insert_dead_letters_impl(rows))
    }
}
