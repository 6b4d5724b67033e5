//! The schema: the bundled schema files and their `run-if` guarded steps, the
//! migration lock, and applying the files and checking the tables' columns.

use std::time::Duration;

use clickhouse::Row;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::ClickHouseStore;
use super::error::{classify, server_error_code};
use super::insert::datetime_secs;
use crate::outcome::error_chain;
use crate::store::StoreError;

/// The table recording applied schema files.
pub const MIGRATIONS_TABLE: &str = "hartonomous_migrations";

/// Creates [`MIGRATIONS_TABLE`]; run before every migration, never recorded.
pub const BOOTSTRAP: (&str, &str) =
    ("000_hartonomous_migrations.sql", include_str!("../../../schemas/clickhouse/000_hartonomous_migrations.sql"));

/// The numbered schema files, in the order they are applied. Append new
/// files; never edit or reorder applied ones ([`ClickHouseStore::migrate`]
/// refuses an applied file whose text changed).
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("001_atoms.sql", include_str!("../../../schemas/clickhouse/001_atoms.sql")),
    ("002_dead_letters.sql", include_str!("../../../schemas/clickhouse/002_dead_letters.sql")),
    ("003_atoms_per_source_hour.sql", include_str!("../../../schemas/clickhouse/003_atoms_per_source_hour.sql")),
    ("004_atom_arrivals.sql", include_str!("../../../schemas/clickhouse/004_atom_arrivals.sql")),
    ("005_atoms_first_arrival_wins.sql", include_str!("../../../schemas/clickhouse/005_atoms_first_arrival_wins.sql")),
    ("006_inference_results.sql", include_str!("../../../schemas/clickhouse/006_inference_results.sql")),
    ("007_model_outputs.sql", include_str!("../../../schemas/clickhouse/007_model_outputs.sql")),
    ("008_inference_compensations.sql", include_str!("../../../schemas/clickhouse/008_inference_compensations.sql")),
    ("009_trace_ids.sql", include_str!("../../../schemas/clickhouse/009_trace_ids.sql")),
];

/// A schema-file comment that guards the statement after it:
/// `-- hartonomous:run-if: <query returning one number>`. The statement runs
/// only when the query returns a non-zero number; when the statement fails
/// and the query then returns 0, a concurrent migrator did the step, and the
/// failure is ignored. Guards make multi-step rebuilds (such as
/// 005_atoms_first_arrival_wins.sql) safe to repeat after a crash.
pub const RUN_IF: &str = "-- hartonomous:run-if:";

/// Columns the store writes to `atoms`, with their ClickHouse types. Checked
/// by [`ClickHouseStore::migrate`]: RowBinary inserts carry no types, so a
/// table altered behind the store's back must be caught before it is written.
pub const ATOMS_COLUMNS: &[(&str, &str)] = &[
    ("content_hash", "String"),
    ("content_type", "String"),
    ("content", "String"),
    ("content_size", "UInt64"),
    ("source_system", "String"),
    ("correlation_id", "String"),
    ("metadata", "String"),
    ("embedding", "Array(Float32)"),
    ("embedding_model", "String"),
    ("embedding_dimension", "UInt32"),
    ("event_time", "DateTime('UTC')"),
    ("event_time_ms", "Int64"),
    ("source_topic", "String"),
    ("source_partition", "Int32"),
    ("source_offset", "Int64"),
    ("ingested_at", "DateTime('UTC')"),
    ("ingested_at_ms", "UInt64"),
    ("trace_id", "String"),
    // Not written: its DEFAULT ranks the first stored row highest (005).
    ("first_wins_rank", "UInt64"),
];

/// Columns the store writes to `atom_arrivals`, with their ClickHouse types.
pub const ARRIVALS_COLUMNS: &[(&str, &str)] = &[
    ("source_topic", "String"),
    ("source_partition", "Int32"),
    ("source_offset", "Int64"),
    ("content_hash", "String"),
    ("outcome", "Enum8('created' = 1, 'matched' = 2)"),
    ("content_type", "String"),
    ("content_size", "UInt64"),
    ("source_system", "String"),
    ("correlation_id", "String"),
    ("event_time", "DateTime('UTC')"),
    ("event_time_ms", "Int64"),
    ("arrived_at", "DateTime('UTC')"),
    ("arrived_at_ms", "UInt64"),
    ("trace_id", "String"),
    ("first_wins_rank", "UInt64"),
];

/// Columns the store writes to `dead_letters`, with their ClickHouse types.
pub const DEAD_LETTERS_COLUMNS: &[(&str, &str)] = &[
    ("topology", "String"),
    ("source_topic", "String"),
    ("source_partition", "Int32"),
    ("source_offset", "Int64"),
    ("stage", "String"),
    ("reason", "String"),
    ("error", "String"),
    ("attempts", "UInt32"),
    ("failed_at", "DateTime('UTC')"),
    ("failed_at_ms", "Int64"),
    ("original_key", "Nullable(String)"),
    ("original_payload", "String"),
    // Added by 009_trace_ids.sql.
    ("trace_id", "String"),
];

/// The migration lock table (see `ClickHouseStore::lock_migrations`).
pub const MIGRATION_LOCK: &str = "hartonomous_migrate_lock";
/// A lock whose newest heartbeat is older than this belongs to a dead process.
const LOCK_STALE: Duration = Duration::from_secs(30);
const LOCK_HEARTBEAT: Duration = Duration::from_secs(5);
/// The longest a migrator waits for another one.
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// A held migration lock: its heartbeat task runs until `release`.
struct MigrationLock {
    holder: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl MigrationLock {
    fn start(store: &ClickHouseStore, holder: String) -> Self {
        let client = store.client.clone();
        let who = holder.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_HEARTBEAT).await;
                let sql = format!("INSERT INTO {MIGRATION_LOCK} SELECT '{who}', toDateTime(now(), 'UTC')");
                if let Err(e) = client.query(&sql).execute().await {
                    tracing::warn!(error = %error_chain(&e), "migration lock heartbeat failed");
                }
            }
        });
        Self { holder, heartbeat }
    }

    async fn release(self, store: &ClickHouseStore) {
        self.heartbeat.abort();
        if let Err(e) = store.client.query(&format!("DROP TABLE IF EXISTS {MIGRATION_LOCK}")).execute().await {
            tracing::warn!(error = %error_chain(&e), "could not release the migration lock; the next migrator takes it over after {} s", LOCK_STALE.as_secs());
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into())
}

/// Blocks remembered per table for insert deduplication, on servers that can.
const DEDUP_WINDOW: u32 = 1_000;

#[derive(Row, Serialize)]
struct MigrationInsert<'a> {
    name: &'a str,
    checksum: &'a str,
    applied_at: u32,
}

/// SHA-256 (hex) of a schema file's text, as recorded in `hartonomous_migrations`.
pub fn checksum(sql: &str) -> String {
    let digest: [u8; 32] = Sha256::digest(sql.as_bytes()).into();
    hex::encode(digest)
}

/// Splits a script into statements at `;`, dropping `--` and `/* */`
/// comments and empty statements, and leaving quoted text ('...', "...",
/// `...`) alone.
pub fn split_statements(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = script.chars().peekable();
    let mut quote: Option<char> = None;
    let mut flush = |current: &mut String| {
        let statement = current.trim();
        if !statement.is_empty() {
            out.push(statement.to_string());
        }
        current.clear();
    };
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            current.push(c);
            if c == '\\' {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' | '`' => {
                quote = Some(c);
                current.push(c);
            }
            '-' if chars.peek() == Some(&'-') => {
                for next in chars.by_ref() {
                    if next == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = '\0';
                for next in chars.by_ref() {
                    if previous == '*' && next == '/' {
                        break;
                    }
                    previous = next;
                }
                current.push(' ');
            }
            ';' => flush(&mut current),
            _ => current.push(c),
        }
    }
    flush(&mut current);
    out
}

/// One statement of a schema file and the guard (see [`RUN_IF`]) before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub guard: Option<String>,
    pub sql: String,
}

/// Splits a schema file into statements, each with the `-- hartonomous:run-if:`
/// guard written on the line before it, if any.
pub fn split_steps(script: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut segment = String::new();
    let mut guard: Option<String> = None;
    let mut flush = |segment: &mut String, guard: Option<String>| {
        for (i, sql) in split_statements(segment).into_iter().enumerate() {
            steps.push(Step { guard: if i == 0 { guard.clone() } else { None }, sql });
        }
        segment.clear();
    };
    for line in script.lines() {
        if let Some(query) = line.trim_start().strip_prefix(RUN_IF) {
            flush(&mut segment, guard.take());
            guard = Some(query.trim().to_string());
        } else {
            segment.push_str(line);
            segment.push('\n');
        }
    }
    flush(&mut segment, guard);
    steps
}

impl ClickHouseStore {
    /// Applies the bundled schema: creates `hartonomous_migrations` if
    /// needed, then runs each file of [`MIGRATIONS`] not yet recorded there,
    /// in order, and records it with its checksum. Returns the names of the
    /// files applied by this call (empty when the schema was already
    /// current). Fails, naming the file, if a recorded file's bundled text
    /// has changed since it was applied.
    ///
    /// Afterwards, on servers with insert deduplication tokens, sets
    /// `non_replicated_deduplication_window` on `atoms` and `dead_letters`
    /// (not for Replicated/Shared engines, which deduplicate already), and
    /// finally checks that both tables have the columns and types the store
    /// writes.
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        self.execute_script(BOOTSTRAP.0, BOOTSTRAP.1).await?;
        // The common case, a database already current, takes no lock.
        if self.pending_migrations().await?.is_empty() {
            return self.migrate_locked().await;
        }
        let lock = self.lock_migrations().await?;
        let result = self.migrate_locked().await;
        lock.release(self).await;
        result
    }

    /// Files of [`MIGRATIONS`] not yet recorded.
    async fn pending_migrations(&self) -> Result<Vec<&'static str>, StoreError> {
        let recorded: Vec<String> = self
            .timed(
                &format!("read {}", self.table(MIGRATIONS_TABLE)),
                self.client.query("SELECT DISTINCT name FROM hartonomous_migrations").fetch_all::<String>(),
            )
            .await?;
        Ok(MIGRATIONS.iter().map(|(n, _)| *n).filter(|n| !recorded.iter().any(|r| r == n)).collect())
    }

    /// Takes the database's migration lock: the table [`MIGRATION_LOCK`],
    /// created without `IF NOT EXISTS`, so only one creator succeeds (DDL is
    /// atomic per table on every version). The holder writes a heartbeat row
    /// every few seconds; a lock without one for [`LOCK_STALE`] belongs to a
    /// process that died mid-migration and is taken over: renamed away first
    /// (a single-table RENAME succeeds for one renamer only), then dropped.
    /// Waits at most [`LOCK_WAIT`].
    async fn lock_migrations(&self) -> Result<MigrationLock, StoreError> {
        let holder = format!("{}-{}-{:08x}", hostname(), std::process::id(), rand::random::<u32>());
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        // Created with its first heartbeat in one statement.
        let create = format!("CREATE TABLE {MIGRATION_LOCK} ENGINE = Log AS SELECT '{holder}' AS holder, toDateTime(now(), 'UTC') AS at");
        let mut empty_since: Option<std::time::Instant> = None;
        loop {
            match self.client.query(&create).execute().await {
                Ok(()) => {
                    let lock = MigrationLock::start(self, holder);
                    tracing::info!(database = %self.config.database, holder = %lock.holder, "took the migration lock");
                    return Ok(lock);
                }
                Err(e) if server_error_code(&e.to_string()) == Some(57) => {}
                Err(e) => return Err(classify(&format!("create {}", self.table(MIGRATION_LOCK)), &e)),
            }
            let age = self
                .client
                .query(&format!("SELECT count(), toUInt64(now() - max(at)) FROM {MIGRATION_LOCK}"))
                .fetch_one::<(u64, u64)>()
                .await
                .ok()
                .map(|(rows, age)| {
                    // A lock seen empty (its creator died between creating and
                    // filling it) counts its age from when it was first seen so.
                    if rows > 0 {
                        empty_since = None;
                        age
                    } else {
                        empty_since.get_or_insert_with(std::time::Instant::now).elapsed().as_secs()
                    }
                });
            match age {
                Some(age) if age > LOCK_STALE.as_secs() => {
                    let stale = format!("{MIGRATION_LOCK}_stale_{:08x}", rand::random::<u32>());
                    if self.client.query(&format!("RENAME TABLE {MIGRATION_LOCK} TO {stale}")).execute().await.is_ok() {
                        tracing::warn!(database = %self.config.database, age_s = age, "took over a migration lock without a heartbeat for {age} s (its holder died)");
                        let _ = self.client.query(&format!("DROP TABLE IF EXISTS {stale}")).execute().await;
                    }
                    continue;
                }
                _ => {}
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "another process has been migrating database `{}` for over {} s (table {MIGRATION_LOCK} holds its heartbeat);                      wait for it, or drop that table if no process is migrating",
                    self.config.database,
                    LOCK_WAIT.as_secs()
                )));
            }
            tracing::info!(database = %self.config.database, "another process is migrating; waiting for it");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn migrate_locked(&self) -> Result<Vec<String>, StoreError> {
        let recorded: Vec<(String, String)> = self
            .timed(
                &format!("read {}", self.table(MIGRATIONS_TABLE)),
                self.client
                    .query("SELECT name, checksum FROM hartonomous_migrations ORDER BY name, applied_at")
                    .fetch_all::<(String, String)>(),
            )
            .await?;
        let mut applied = Vec::new();
        for &(name, sql) in MIGRATIONS {
            let sum = checksum(sql);
            let previous: Vec<&str> = recorded.iter().filter(|(n, _)| n == name).map(|(_, c)| c.as_str()).collect();
            if !previous.is_empty() {
                if let Some(other) = previous.iter().find(|c| **c != sum) {
                    return Err(StoreError::Fatal(format!(
                        "schemas/clickhouse/{name} has changed since it was applied to database `{}` \
                         (recorded sha256 {other}, bundled {sum}); never edit an applied schema file: \
                         restore it and put the change in a new numbered file",
                        self.config.database
                    )));
                }
                continue;
            }
            self.execute_script(name, sql).await?;
            let row = MigrationInsert { name, checksum: &sum, applied_at: datetime_secs(now_ms()) };
            let context = format!("record {name} in {}", self.table(MIGRATIONS_TABLE));
            self.timed(&context, async {
                let insert = self.client.insert::<MigrationInsert<'_>>(MIGRATIONS_TABLE).await?;
                let mut insert = self.insert_settings(insert, None);
                insert.write(&row).await?;
                insert.end().await
            })
            .await?;
            tracing::info!(database = %self.config.database, file = name, "applied ClickHouse schema file");
            applied.push(name.to_string());
        }
        if self.capabilities.supports_dedup_token {
            for table in ["atoms", "dead_letters", "atom_arrivals"] {
                self.enable_dedup_window(table).await?;
            }
        }
        self.verify_columns("atoms", ATOMS_COLUMNS).await?;
        self.verify_columns("dead_letters", DEAD_LETTERS_COLUMNS).await?;
        self.verify_columns("atom_arrivals", ARRIVALS_COLUMNS).await?;
        Ok(applied)
    }

    async fn execute_script(&self, name: &str, script: &str) -> Result<(), StoreError> {
        for (i, step) in split_steps(script).iter().enumerate() {
            let context = format!("schemas/clickhouse/{name} statement {} in database `{}`", i + 1, self.config.database);
            if let Some(guard) = &step.guard
                && !self.guard_holds(&context, guard).await?
            {
                tracing::debug!(file = name, statement = i + 1, "schema step skipped: its run-if condition is false");
                continue;
            }
            if let Err(e) = self.timed(&context, self.client.query_raw(&step.sql).execute()).await {
                match &step.guard {
                    Some(guard) if !self.guard_holds(&context, guard).await? => {
                        tracing::info!(file = name, statement = i + 1, error = %e, "schema step failed but is done: another migrator ran it");
                    }
                    _ => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Evaluates a [`RUN_IF`] guard: true when it returns a non-zero number.
    async fn guard_holds(&self, context: &str, query: &str) -> Result<bool, StoreError> {
        let value: u64 = self
            .timed(&format!("{context}: run-if `{query}`"), self.client.query_raw(&format!("SELECT toUInt64(({query}))")).fetch_one::<u64>())
            .await?;
        Ok(value != 0)
    }

    async fn enable_dedup_window(&self, table: &str) -> Result<(), StoreError> {
        let engine: String = self
            .timed(
                &format!("read the engine of {}", self.table(table)),
                self.client
                    .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
                    .bind(self.config.database.as_str())
                    .bind(table)
                    .fetch_one::<String>(),
            )
            .await?;
        if engine.starts_with("Replicated") || engine.starts_with("Shared") {
            return Ok(());
        }
        let sql = format!("ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = {DEDUP_WINDOW}");
        self.timed(&format!("enable insert deduplication on {}", self.table(table)), self.client.query(&sql).execute()).await
    }

    async fn verify_columns(&self, table: &str, expected: &[(&str, &str)]) -> Result<(), StoreError> {
        let actual: Vec<(String, String)> = self
            .timed(
                &format!("read the columns of {}", self.table(table)),
                self.client
                    .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
                    .bind(self.config.database.as_str())
                    .bind(table)
                    .fetch_all::<(String, String)>(),
            )
            .await?;
        let mut problems = Vec::new();
        for (name, ty) in expected {
            match actual.iter().find(|(n, _)| n == name) {
                None => problems.push(format!("column `{name}` ({ty}) is missing")),
                Some((_, actual_ty)) if actual_ty != ty => problems.push(format!("column `{name}` is {actual_ty}, expected {ty}")),
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Fatal(format!(
                "table {} does not match the schema this build writes: {}; restore it to \
                 schemas/clickhouse/ (or migrate a fresh database)",
                self.table(table),
                problems.join("; ")
            )))
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_split_into_statements() {
        let script = "-- a comment; with a semicolon and it's quoted\nCREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory;\n\
                      /* block; comment */ CREATE VIEW v AS SELECT 'it''s', \"q;\" FROM a;\n\n-- trailing\n";
        assert_eq!(
            split_statements(script),
            vec![
                "CREATE TABLE a (x String DEFAULT 'a;b') ENGINE = Memory".to_string(),
                "CREATE VIEW v AS SELECT 'it''s', \"q;\" FROM a".to_string(),
            ]
        );
        for (name, sql) in MIGRATIONS.iter().chain(std::iter::once(&BOOTSTRAP)) {
            let steps = split_steps(sql);
            assert!(!steps.is_empty(), "{name}");
            for s in &steps {
                // Plain files only create; a rebuild guards every step that is not idempotent by itself.
                assert!(s.sql.starts_with("CREATE ") || s.guard.is_some() || s.sql.starts_with("DROP TABLE IF EXISTS"), "{name}: unguarded {}", s.sql);
                assert!(!s.sql.contains("--"), "{name}: comment left in {}", s.sql);
            }
        }
        assert_eq!(split_statements(MIGRATIONS[2].1).len(), 2);
    }

    #[test]
    fn run_if_guards_attach_to_the_statement_after_them() {
        let script = "-- intro\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n-- hartonomous:run-if: SELECT 1\nRENAME TABLE a TO b;\nDROP TABLE IF EXISTS c;\n  -- hartonomous:run-if: SELECT count() FROM t\nINSERT INTO b SELECT 1";
        let steps = split_steps(script);
        assert_eq!(
            steps,
            vec![
                Step { guard: None, sql: "CREATE TABLE a (x UInt8) ENGINE = Memory".into() },
                Step { guard: Some("SELECT 1".into()), sql: "RENAME TABLE a TO b".into() },
                Step { guard: None, sql: "DROP TABLE IF EXISTS c".into() },
                Step { guard: Some("SELECT count() FROM t".into()), sql: "INSERT INTO b SELECT 1".into() },
            ]
        );
        let rebuild = split_steps(MIGRATIONS[4].1);
        assert_eq!(rebuild.len(), 6, "{rebuild:#?}");
        assert_eq!(rebuild.iter().filter(|s| s.guard.is_some()).count(), 4);
        assert!(rebuild[2].sql.starts_with("RENAME TABLE atoms TO atoms_before_005") && rebuild[2].guard.is_some());
    }

    #[test]
    fn bundled_schema_files_avoid_what_18_16_lacks() {
        for (name, sql) in MIGRATIONS.iter().chain(std::iter::once(&BOOTSTRAP)) {
            let code = split_statements(sql).join("\n");
            for word in ["DateTime64", "LowCardinality", "Map(", "Bool", "CODEC", "TTL", "SETTINGS", "{db}"] {
                assert!(!code.contains(word), "{name} uses {word}");
            }
            // Idempotent: IF NOT EXISTS, or every ALTER guarded by `run-if`.
            let alters_guarded = split_steps(sql).iter().filter(|s| s.sql.starts_with("ALTER")).all(|s| s.guard.is_some());
            assert!(code.contains("IF NOT EXISTS") && alters_guarded, "{name} is not idempotent");
            assert!(sql.trim_start().starts_with("--"), "{name} must explain what it avoids");
        }
        let arrivals = MIGRATIONS[3].1;
        for (column, ty) in ARRIVALS_COLUMNS {
            assert!(arrivals.contains(&format!("    {column} {ty}")), "004 lacks {column} {ty}");
        }
        let rebuilt = MIGRATIONS[4].1;
        // Numbered, in order, unique.
        let names: Vec<&str> = MIGRATIONS.iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        // The column lists match the DDL.
        for (column, ty) in ATOMS_COLUMNS {
            assert!(rebuilt.contains(&format!("    {column} {ty}")), "005 lacks {column} {ty}");
            if *column != "first_wins_rank" {
                assert!(MIGRATIONS[0].1.contains(&format!("    {column} {ty}")), "001_atoms.sql lacks {column} {ty}");
            }
        }
        let dead_letters = MIGRATIONS[1].1;
        for (column, ty) in DEAD_LETTERS_COLUMNS {
            let added = MIGRATIONS[8].1.contains(&format!("ALTER TABLE dead_letters ADD COLUMN {column} {ty} "));
            assert!(dead_letters.contains(&format!("    {column} {ty}")) || added, "neither 002 nor 009 has {column} {ty}");
        }
    }

    #[test]
    fn checksums_are_sha256_hex() {
        assert_eq!(checksum("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
