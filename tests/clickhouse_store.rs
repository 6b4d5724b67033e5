//! The ClickHouse store against a real server: what is specific to it
//! (migrations, errors, insert splitting, `FINAL` and merges, queries). The
//! `AtomStore` contract it shares with the embedded store is tested, for both,
//! in `tests/store_contract.rs`.
//!
//! Needs ClickHouse's HTTP interface at `HARTONOMOUS_TEST_CLICKHOUSE`
//! (default `http://127.0.0.1:18123`, user `default` without password), e.g.
//! from `tests/services.sh up`. Every test fails, saying so, when it is not
//! reachable. Each test works in a database of its own,
//! `hartonomous_test_<pid>_<random>`, dropped when the test ends (also when it
//! fails).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hartonomous::atom::{AtomRow, ContentHash};
use hartonomous::outcome::error_chain;
use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore, MIGRATIONS, ServerVersion};
use hartonomous::store::{AtomStore, DeadLetterArchive, InsertReport, StoreError};
use serde::Deserialize;

mod common;
use common::rows::{T0_MS, atom, atoms, dead_letter};

const DEFAULT_URL: &str = "http://127.0.0.1:18123";

fn server_url() -> String {
    std::env::var("HARTONOMOUS_TEST_CLICKHOUSE").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| DEFAULT_URL.into())
}

/// A database of its own for one test, dropped on drop.
struct TestDb {
    url: String,
    name: String,
    /// Scoped to the test database, for raw statements that bypass the store.
    raw: clickhouse::Client,
}

impl TestDb {
    async fn new() -> Self {
        let url = server_url();
        let server = clickhouse::Client::default().with_url(url.as_str()).with_validation(false);
        let probe = tokio::time::timeout(Duration::from_secs(10), server.query("SELECT 1").fetch_one::<u8>()).await;
        match probe {
            Ok(Ok(1)) => {}
            Ok(Ok(other)) => panic!("ClickHouse at {url} answered SELECT 1 with {other}"),
            Ok(Err(e)) => panic!(
                "ClickHouse is not reachable at {url}: {}. These tests need a running server: \
                 start one with `tests/services.sh up`, or point HARTONOMOUS_TEST_CLICKHOUSE at its HTTP URL",
                error_chain(&e)
            ),
            Err(_) => panic!(
                "ClickHouse at {url} did not answer SELECT 1 within 10 s. Start one with \
                 `tests/services.sh up`, or point HARTONOMOUS_TEST_CLICKHOUSE at its HTTP URL"
            ),
        }
        let name = format!("hartonomous_test_{}_{:08x}", std::process::id(), rand::random::<u32>());
        let raw = server.with_database(name.as_str());
        Self { url, name, raw }
    }

    fn config(&self) -> ClickHouseConfig {
        ClickHouseConfig { url: self.url.clone(), database: self.name.clone(), ..ClickHouseConfig::default() }
    }

    async fn store(&self) -> ClickHouseStore {
        ClickHouseStore::connect(self.config()).await.expect("connect and migrate")
    }

    /// Runs a statement in the test database, outside the store.
    async fn exec(&self, sql: &str) {
        self.raw.query(sql).execute().await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Blocking and dependency-free, so it also runs while a test panics.
        if let Err(e) = http_post(&self.url, &format!("DROP DATABASE IF EXISTS {}", self.name)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

fn http_post(url: &str, body: &str) -> std::io::Result<String> {
    let parsed = reqwest::Url::parse(url).map_err(std::io::Error::other)?;
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let port = parsed.port_or_known_default().unwrap_or(8123);
    let mut stream = TcpStream::connect((host, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST {} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        parsed.path(),
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") && !response.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(response));
    }
    Ok(response)
}

fn expect_fatal<T: std::fmt::Debug>(result: Result<T, StoreError>, mentions: &str) -> String {
    match result {
        Err(StoreError::Fatal(message)) => {
            assert!(message.contains(mentions), "expected `{mentions}` in: {message}");
            message
        }
        other => panic!("expected StoreError::Fatal mentioning `{mentions}`, got {other:?}"),
    }
}

#[tokio::test]
async fn migrate_creates_the_tables_and_is_idempotent() {
    let db = TestDb::new().await;
    let store = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..db.config() }).await.unwrap();
    // connect created the database, and nothing else.
    assert_eq!(store.query_scalar_u64(&format!("SELECT count() FROM system.databases WHERE name = '{}'", db.name)).await.unwrap(), 1);
    assert_eq!(store.query_scalar_u64("SELECT count() FROM system.tables WHERE database = currentDatabase()").await.unwrap(), 0);

    let applied = store.migrate().await.unwrap();
    let all: Vec<String> = MIGRATIONS.iter().map(|(name, _)| name.to_string()).collect();
    assert_eq!(applied, all);
    assert_eq!(store.migrate().await.unwrap(), Vec::<String>::new(), "second migrate applies nothing");

    let tables = store
        .query_scalar_u64(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name IN \
             ('hartonomous_migrations', 'atoms', 'dead_letters', 'atoms_per_source_hour', 'atoms_per_source_hour_mv', 'atom_arrivals', \
             'inference_results', 'inference_results_live', 'model_outputs', 'model_outputs_live', 'inference_compensations')",
        )
        .await
        .unwrap();
    assert_eq!(tables, 11);
    // The rebuild of 005 left nothing behind.
    assert_eq!(store.query_scalar_u64("SELECT count() FROM system.tables WHERE database = currentDatabase()").await.unwrap(), 11);
    assert_eq!(store.query_scalar_u64("SELECT count() FROM hartonomous_migrations").await.unwrap(), all.len() as u64);

    // Another store with migrate_on_start finds everything in place.
    let again = db.store().await;
    assert_eq!(again.query_scalar_u64("SELECT count() FROM hartonomous_migrations").await.unwrap(), all.len() as u64);
    let engines = again.query_text("SHOW CREATE TABLE atoms").await.unwrap();
    assert!(engines.contains("ReplacingMergeTree(first_wins_rank)"), "{engines}");
}

/// Runs schema files 000..=`last` by hand and records them, as a database
/// migrated by an older build would be.
async fn migrate_by_hand_up_to(db: &TestDb, last: &str) {
    http_post(&db.url, &format!("CREATE DATABASE IF NOT EXISTS {}", db.name)).expect("create the test database");
    let files = std::iter::once(&hartonomous::store::clickhouse::BOOTSTRAP).chain(MIGRATIONS.iter());
    for (name, sql) in files {
        // On a fresh database every `run-if` guard holds: every step runs.
        for step in hartonomous::store::clickhouse::split_steps(sql) {
            db.exec(&step.sql).await;
        }
        if name.starts_with("000") {
            continue;
        }
        let sum = hartonomous::store::clickhouse::checksum(sql);
        db.exec(&format!("INSERT INTO hartonomous_migrations VALUES ('{name}', '{sum}', now())")).await;
        if *name == last {
            return;
        }
    }
}

/// The names of the bundled migrations after `last`, in order: what a
/// database migrated by hand up to `last` still needs.
fn applied_after(last: &str) -> Vec<String> {
    MIGRATIONS.iter().map(|(name, _)| name.to_string()).skip_while(|name| name != last).skip(1).collect()
}

/// Rows of the old `atoms` (no first_wins_rank), the way the store wrote them.
///
/// One INSERT, so one part per partition: a ReplacingMergeTree only collapses
/// rows when it merges parts, and a background merge of many one-row parts
/// (under the old engine, keeping the LATER of two racing rows) would delete
/// the earlier row before a test could see the rebuild keep it.
async fn old_atoms(db: &TestDb, rows: &[AtomRow]) {
    let values: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "('{}', 'x', 1, '{}', '{}', {}, {}, toDateTime({}, 'UTC'), {}, '{}')",
                r.content_hash.to_hex(),
                r.source_system,
                r.source_topic,
                r.source_partition,
                r.source_offset,
                r.ingested_at_ms / 1000,
                r.ingested_at_ms,
                r.trace_id
            )
        })
        .collect();
    db.exec(&format!(
        "INSERT INTO atoms (content_hash, content, content_size, source_system, source_topic, source_partition, source_offset, \
         ingested_at, ingested_at_ms, trace_id) VALUES {}",
        values.join(", ")
    ))
    .await;
}

#[tokio::test]
async fn a_database_from_before_005_is_rebuilt_keeping_its_rows_and_the_first_arrival_wins() {
    let db = TestDb::new().await;
    migrate_by_hand_up_to(&db, "003_atoms_per_source_hour.sql").await;
    // Under the old engine a racing later insert of the same content won; write both.
    let mut first = atom("raced", 1);
    first.trace_id = "first".into();
    let mut later = atom("raced", 2);
    later.trace_id = "later".into();
    later.ingested_at_ms += 5_000;
    let mut rows = atoms("kept", 10);
    rows.extend([first.clone(), later.clone()]);
    old_atoms(&db, &rows).await;

    let store = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..db.config() }).await.unwrap();
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms FINAL WHERE trace_id = 'later'").await.unwrap(), 1, "old engine: the later row wins");
    let applied = store.migrate().await.unwrap();
    assert_eq!(applied, applied_after("003_atoms_per_source_hour.sql"));

    assert_eq!(store.count_atoms_final().await.unwrap(), 11, "every atom kept");
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms FINAL WHERE trace_id = 'first'").await.unwrap(), 1, "the first arrival wins now");
    let engine = store.query_text("SHOW CREATE TABLE atoms").await.unwrap();
    assert!(engine.contains("ReplacingMergeTree(first_wins_rank)"), "{engine}");
    // The summary view feeds from the new table.
    store.insert_atoms(&atoms("after", 3)).await.unwrap();
    assert_eq!(store.query_scalar_u64("SELECT uniqExactMerge(atoms) FROM atoms_per_source_hour").await.unwrap(), 14);
    // Nothing left behind, and a second migrate is a no-op.
    assert_eq!(store.query_scalar_u64("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'atoms\\_%0%'").await.unwrap(), 0);
    assert!(store.migrate().await.unwrap().is_empty());
}

/// 009 on a database migrated to 008 by an older build, interrupted after
/// its first ALTER: the next migrate finishes it (the guards skip what is
/// done), old rows read `trace_id = ''`, the recreated views show the
/// column, and new rows keep their trace id.
#[tokio::test]
async fn a_database_from_before_009_gets_trace_ids_and_its_views_show_them() {
    let db = TestDb::new().await;
    migrate_by_hand_up_to(&db, "008_inference_compensations.sql").await;
    db.exec(
        "INSERT INTO dead_letters (topology, source_topic, source_partition, source_offset, stage, reason, error, attempts, failed_at, failed_at_ms, original_key, original_payload) \
         VALUES ('a', 't', 0, 1, 's', 'r', 'e', 1, now(), 0, NULL, 'x')",
    )
    .await;
    db.exec("INSERT INTO inference_results (source_topic, source_partition, source_offset, correlation_id, status, deleted, version) VALUES ('t', 0, 1, 'c1', 'COMPLETE', 0, 1)").await;
    let steps = hartonomous::store::clickhouse::split_steps(MIGRATIONS[8].1);
    assert!(steps[0].sql.starts_with("ALTER TABLE dead_letters") && steps[0].guard.is_some(), "{steps:#?}");
    db.exec(&steps[0].sql).await;

    let store = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..db.config() }).await.unwrap();
    assert_eq!(store.migrate().await.unwrap(), applied_after("008_inference_compensations.sql"));
    for table in ["dead_letters", "inference_results", "model_outputs", "inference_compensations", "inference_results_live", "model_outputs_live"] {
        let sql = format!("SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = '{table}' AND name = 'trace_id'");
        assert_eq!(store.query_scalar_u64(&sql).await.unwrap(), 1, "{table} has trace_id");
    }
    assert_eq!(store.query_scalar_u64("SELECT count() FROM dead_letters FINAL WHERE trace_id = ''").await.unwrap(), 1);
    assert_eq!(store.query_scalar_u64("SELECT count() FROM inference_results_live WHERE trace_id = ''").await.unwrap(), 1);
    let mut traced = dead_letter("t", 0, 2);
    traced.trace_id = "0af7651916cd43dd8448eb211c80319c".into();
    store.insert_dead_letters(&[traced]).await.unwrap();
    assert_eq!(store.query_scalar_u64("SELECT count() FROM dead_letters FINAL WHERE trace_id = '0af7651916cd43dd8448eb211c80319c'").await.unwrap(), 1);
    assert!(store.migrate().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_rebuild_interrupted_after_its_rename_completes_on_the_next_migrate() {
    let db = TestDb::new().await;
    migrate_by_hand_up_to(&db, "004_atom_arrivals.sql").await;
    old_atoms(&db, &atoms("before the crash", 25)).await;
    // The first three steps of 005 ran, then the process died: the new, empty
    // table is `atoms`, the rows wait in atoms_before_005, the view is gone.
    let rebuild = hartonomous::store::clickhouse::split_steps(MIGRATIONS[4].1);
    for step in &rebuild[..3] {
        db.exec(&step.sql).await;
    }
    let store = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..db.config() }).await.unwrap();
    assert_eq!(store.count_atoms_final().await.unwrap(), 0);
    assert_eq!(store.migrate().await.unwrap(), applied_after("004_atom_arrivals.sql"));
    assert_eq!(store.count_atoms_final().await.unwrap(), 25, "the copy ran on the retry");
    assert_eq!(store.query_scalar_u64("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'atoms_before_005'").await.unwrap(), 0);
    assert_eq!(store.query_scalar_u64("SELECT uniqExactMerge(atoms) FROM atoms_per_source_hour").await.unwrap(), 25, "the view was rebuilt and fed");
}

/// Several instances started together after a deploy all migrate: the lock
/// lets one run the rebuild of 005 while the others wait, so no schedule
/// can rename `atoms` away twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_an_old_database_are_serialized() {
    let db = TestDb::new().await;
    migrate_by_hand_up_to(&db, "003_atoms_per_source_hour.sql").await;
    old_atoms(&db, &atoms("before the deploy", 50)).await;
    let config = ClickHouseConfig { migrate_on_start: false, ..db.config() };
    let stores: Vec<ClickHouseStore> = futures::future::join_all((0..4).map(|_| ClickHouseStore::connect(config.clone()))).await.into_iter().map(Result::unwrap).collect();
    let results = futures::future::join_all(stores.iter().map(|s| s.migrate())).await;
    let mut applied = Vec::new();
    for r in results {
        applied.extend(r.expect("every concurrent migrate succeeds"));
    }
    applied.sort();
    assert_eq!(applied, applied_after("003_atoms_per_source_hour.sql"), "each file applied once");
    let store = &stores[0];
    assert_eq!(store.count_atoms_final().await.unwrap(), 50);
    let left: Vec<String> = store.query_text("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name FORMAT TabSeparated").await.unwrap().lines().map(str::to_string).collect();
    assert_eq!(
        left,
        [
            "atom_arrivals",
            "atoms",
            "atoms_per_source_hour",
            "atoms_per_source_hour_mv",
            "dead_letters",
            "hartonomous_migrations",
            "inference_compensations",
            "inference_results",
            "inference_results_live",
            "model_outputs",
            "model_outputs_live"
        ],
        "no lock or temporary table left"
    );
}

#[tokio::test]
async fn a_migration_lock_left_by_a_dead_process_is_taken_over() {
    let db = TestDb::new().await;
    http_post(&db.url, &format!("CREATE DATABASE IF NOT EXISTS {}", db.name)).unwrap();
    // A holder whose last heartbeat is a minute old.
    db.exec("CREATE TABLE hartonomous_migrate_lock ENGINE = Log AS SELECT 'dead-host-1' AS holder, toDateTime(now() - 60, 'UTC') AS at").await;
    let store = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..db.config() }).await.unwrap();
    let applied = store.migrate().await.unwrap();
    assert_eq!(applied.len(), MIGRATIONS.len());
    assert_eq!(store.query_scalar_u64("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'hartonomous_migrate_lock%'").await.unwrap(), 0);
}

#[tokio::test]
async fn racing_writers_keep_the_lineage_of_the_first_arrival_whatever_lands_first() {
    let db = TestDb::new().await;
    let store = db.store().await;
    // Two processes stored the same new content from two positions: the
    // existence check of each ran before the other's insert. Either insert
    // may land first; the row ingested first is the atom's lineage.
    let mut early = atom("contested", 1);
    early.trace_id = "early".into();
    let mut late = atom("contested", 2);
    late.trace_id = "late".into();
    late.ingested_at_ms = early.ingested_at_ms + 250;
    let mut early2 = atom("contested too", 3);
    early2.trace_id = "early".into();
    let mut late2 = atom("contested too", 4);
    late2.trace_id = "late".into();
    late2.ingested_at_ms = early2.ingested_at_ms + 250;
    // One pair lands early-then-late, the other late-then-early, each through its own store.
    let other = db.store().await;
    store.insert_atoms(&[early.clone()]).await.unwrap();
    other.insert_atoms(&[late2.clone()]).await.unwrap();
    // Behind the existence checks, as the losing racer's insert would be.
    old_atoms(&db, &[late]).await;
    old_atoms(&db, &[early2]).await;
    // Not asserted: count() without FINAL, which is 4 only until a background merge.
    assert_eq!(store.count_atoms_final().await.unwrap(), 2);
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms FINAL WHERE trace_id = 'early'").await.unwrap(), 2);
    db.exec("OPTIMIZE TABLE atoms FINAL").await;
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms WHERE trace_id = 'early'").await.unwrap(), 2);
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms").await.unwrap(), 2, "merged to the first arrivals");
}

#[tokio::test]
async fn an_edited_applied_schema_file_is_refused_by_name() {
    let db = TestDb::new().await;
    let store = db.store().await;
    // As if 002 had been applied with different text.
    db.exec("INSERT INTO hartonomous_migrations SELECT '002_dead_letters.sql', 'not-the-bundled-checksum', now()").await;
    let message = expect_fatal(store.migrate().await, "002_dead_letters.sql");
    assert!(message.contains("not-the-bundled-checksum"), "{message}");
}

#[tokio::test]
async fn a_table_altered_behind_the_store_is_refused() {
    let db = TestDb::new().await;
    let store = db.store().await;
    db.exec("ALTER TABLE atoms MODIFY COLUMN source_partition Int64").await;
    let message = expect_fatal(store.migrate().await, "source_partition");
    assert!(message.contains("Int64") && message.contains("Int32"), "{message}");
}

#[tokio::test]
async fn a_replay_that_bypasses_the_check_still_counts_each_atom_once() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let rows = atoms("replayed", 20);
    store.insert_atoms(&rows).await.unwrap();

    // A crash-replay written behind the store's back: exact copies of five
    // rows, and five re-ingested two hours later (another hour of the summary).
    db.exec("INSERT INTO atoms SELECT * FROM atoms WHERE source_offset < 5").await;
    db.exec(
        "INSERT INTO atoms (content_hash, content_type, content, content_size, source_system, correlation_id, \
         metadata, embedding, embedding_model, embedding_dimension, event_time, event_time_ms, source_topic, \
         source_partition, source_offset, ingested_at, ingested_at_ms, trace_id) \
         SELECT content_hash, content_type, content, content_size, source_system, correlation_id, metadata, \
         embedding, embedding_model, embedding_dimension, event_time, event_time_ms, source_topic, \
         source_partition, source_offset, ingested_at + 7200, ingested_at_ms + 7200000, 'replay' \
         FROM atoms WHERE source_offset >= 15",
    )
    .await;

    assert_eq!(store.count_atoms_final().await.unwrap(), 20);
    // FINAL keeps the first stored version of each replayed atom: its lineage never moves to a replay.
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms FINAL WHERE trace_id = 'replay'").await.unwrap(), 0);

    let total_bytes: u64 = rows.iter().map(|r| r.content.len() as u64).sum();
    assert_eq!(
        store.query_scalar_u64("SELECT uniqExactMerge(atoms) FROM atoms_per_source_hour WHERE source_system = 'tests'").await.unwrap(),
        20
    );
    assert_eq!(
        store
            .query_scalar_u64(
                "SELECT arraySum(arrayMap(t -> t.2, groupUniqArrayMerge(bytes))) FROM atoms_per_source_hour \
                 WHERE source_system = 'tests'"
            )
            .await
            .unwrap(),
        total_bytes
    );
    // Per hour: the first hour saw all 20 (the exact copies changed nothing),
    // the later hour the 5 re-ingested ones: the replays did reach the view.
    let hour0 = (T0_MS / 1000 / 3600) * 3600;
    let per_hour = |hour: i64| format!("SELECT uniqExactMerge(atoms) FROM atoms_per_source_hour WHERE hour = toDateTime({hour}, 'UTC')");
    assert_eq!(store.query_scalar_u64(&per_hour(hour0)).await.unwrap(), 20);
    assert_eq!(store.query_scalar_u64(&per_hour(hour0 + 7200)).await.unwrap(), 5);

    // After a full merge the duplicates are gone physically too.
    db.exec("OPTIMIZE TABLE atoms FINAL").await;
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms").await.unwrap(), 20);

    // And the store still treats them as present.
    assert_eq!(store.insert_atoms(&rows).await.unwrap(), InsertReport { inserted: 0, already_present: 20 });
}

#[tokio::test]
async fn missing_tables_and_databases_are_fatal() {
    let db = TestDb::new().await;
    // Connected, but the schema was never applied.
    let store = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..db.config() }).await.unwrap();
    expect_fatal(store.insert_atoms(&atoms("x", 3)).await, "UNKNOWN_TABLE");
    expect_fatal(store.existing_hashes(&[ContentHash::of(b"x")]).await, "UNKNOWN_TABLE");
    expect_fatal(store.insert_dead_letters(&[dead_letter("in", 0, 1)]).await, "UNKNOWN_TABLE");
    expect_fatal(store.query_text("SELECT * FROM no_such_table").await, "no_such_table");

    // The database disappears under a working store.
    let store = db.store().await;
    store.insert_atoms(&atoms("before", 2)).await.unwrap();
    db.exec(&format!("DROP DATABASE {}", db.name)).await;
    expect_fatal(store.insert_atoms(&atoms("after", 2)).await, "UNKNOWN_DATABASE");
    expect_fatal(store.count_atoms_final().await, "UNKNOWN_DATABASE");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let config = ClickHouseConfig { url: "http://127.0.0.1:1".into(), request_timeout_ms: 5_000, ..ClickHouseConfig::default() };
    match ClickHouseStore::connect(config).await {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains("127.0.0.1:1"), "{message}");
            println!("connecting to a closed port: {message}");
        }
        other => panic!("expected StoreError::Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_password_is_fatal() {
    let db = TestDb::new().await;
    let result = ClickHouseStore::connect_with_password(db.config(), Some("certainly-not-the-password".into())).await;
    match result {
        Err(StoreError::Fatal(message)) => {
            assert!(
                ["WRONG_PASSWORD", "AUTHENTICATION_FAILED", "REQUIRED_PASSWORD"].iter().any(|code| message.contains(code)),
                "{message}"
            );
            assert!(!message.contains("certainly-not-the-password"), "the password leaked: {message}");
        }
        other => panic!("expected StoreError::Fatal, got {other:?}"),
    }
    // And a password variable that is not set is named.
    let config = ClickHouseConfig { password_env: Some("HARTONOMOUS_TEST_NO_SUCH_PASSWORD_VAR".into()), ..db.config() };
    expect_fatal(ClickHouseStore::connect(config).await, "HARTONOMOUS_TEST_NO_SUCH_PASSWORD_VAR");
}

#[tokio::test]
async fn large_calls_are_split_by_rows_and_bytes() {
    let db = TestDb::new().await;
    let store = ClickHouseStore::connect(ClickHouseConfig { max_rows_per_insert: 7, ..db.config() }).await.unwrap();
    let rows = atoms("split", 50);
    assert_eq!(store.insert_atoms(&rows).await.unwrap(), InsertReport { inserted: 50, already_present: 0 });
    assert_eq!(store.count_atoms_final().await.unwrap(), 50);
    // Each INSERT into one partition takes the next block number; merges keep the maximum.
    let blocks = "SELECT max(max_block_number) FROM system.parts WHERE database = currentDatabase() AND table = 'atoms'";
    assert_eq!(store.query_scalar_u64(blocks).await.unwrap(), 8, "50 rows at 7 per insert");

    let db = TestDb::new().await;
    let mut big = atoms("bytes", 20);
    for row in &mut big {
        row.content = vec![b'x'; 3_200];
        row.content.extend(row.correlation_id.as_bytes());
        row.content_hash = ContentHash::of(&row.content);
    }
    let store = ClickHouseStore::connect(ClickHouseConfig { max_bytes_per_insert: 10_000, ..db.config() }).await.unwrap();
    assert_eq!(store.insert_atoms(&big).await.unwrap().inserted, 20);
    assert_eq!(store.count_atoms_final().await.unwrap(), 20);
    assert_eq!(store.query_scalar_u64(blocks).await.unwrap(), 10, "about 3.5 KB per row, 2 rows per 10 KB insert");

    // A single row over the limit cannot be written: rejected, naming it.
    let mut huge = atom("huge", 99);
    huge.content = vec![b'y'; 20_000];
    huge.content_hash = ContentHash::of(&huge.content);
    match store.insert_atoms(&[huge.clone()]).await {
        Err(StoreError::RowRejected(message)) => {
            assert!(message.contains(&huge.content_hash.to_hex()) && message.contains("max_bytes_per_insert"), "{message}")
        }
        other => panic!("expected RowRejected, got {other:?}"),
    }
    assert_eq!(store.count_atoms_final().await.unwrap(), 20);
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct StoredAtom {
    content_hash: String,
    content: Vec<u8>,
    content_size: u64,
    metadata: String,
    embedding: Vec<f32>,
    embedding_dimension: u32,
    event_time: u32,
    event_time_ms: i64,
    ingested_at: u32,
    ingested_at_ms: u64,
    source_offset: i64,
    trace_id: String,
}

#[tokio::test]
async fn embeddings_binary_content_and_times_round_trip() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let mut rows = atoms("round-trip", 3);
    rows[0].embedding = vec![];
    rows[1].embedding = vec![f32::MIN_POSITIVE, 1e-7, 3.5, -0.0, 123_456.79, f32::MAX, -f32::MIN_POSITIVE / 4.0, f32::INFINITY];
    rows[2].embedding = (0..384).map(|i| (i as f32 * 0.37).sin()).collect();
    rows[2].content = vec![0x00, 0xff, b'\n', b'\r', 0xc3, 0x28];
    rows[2].content_hash = ContentHash::of(&rows[2].content);
    rows[2].event_time_ms = -1_500; // before 1970: the DateTime clamps, the milliseconds stay exact
    rows[1].event_time_ms = T0_MS + 999;
    store.insert_atoms(&rows).await.unwrap();

    let stored: Vec<StoredAtom> = db.raw.query("SELECT ?fields FROM atoms FINAL ORDER BY source_offset").fetch_all().await.unwrap();
    assert_eq!(stored.len(), 3);
    for (got, want) in stored.iter().zip(&rows) {
        assert_eq!(got.content_hash, want.content_hash.to_hex());
        assert_eq!(got.content, want.content);
        assert_eq!(got.content_size, want.content.len() as u64);
        assert_eq!(got.metadata, want.metadata_json);
        assert_eq!(got.embedding_dimension as usize, want.embedding.len());
        let got_bits: Vec<u32> = got.embedding.iter().map(|f| f.to_bits()).collect();
        let want_bits: Vec<u32> = want.embedding.iter().map(|f| f.to_bits()).collect();
        assert_eq!(got_bits, want_bits, "embedding of offset {}", want.source_offset);
        assert_eq!(got.event_time_ms, want.event_time_ms);
        assert_eq!(got.ingested_at_ms, want.ingested_at_ms as u64);
        assert_eq!(got.ingested_at as i64, want.ingested_at_ms / 1000);
        assert_eq!(got.source_offset, want.source_offset);
        assert_eq!(got.trace_id, want.trace_id);
    }
    assert_eq!(stored[1].event_time, 1_700_000_000);
    assert_eq!(stored[2].event_time, 0);

    let text = store
        .query_text("SELECT source_offset, toString(event_time) AS t, toString(ingested_at) AS i FROM atoms FINAL ORDER BY source_offset")
        .await
        .unwrap();
    assert!(text.contains("2023-11-14 22:13:20"), "{text}");
    // The clamped zero DateTime: 18.16 prints it as 0000-00-00, current releases as 1970-01-01.
    assert!(text.contains("1970-01-01 00:00:00") || text.contains("0000-00-00 00:00:00"), "{text}");
    assert!(text.contains("2023-11-14 22:13:21"), "{text}");
}

#[tokio::test]
async fn query_text_formats_tables_and_refuses_writes() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store.insert_atoms(&atoms("q", 3)).await.unwrap();
    let text = store.query_text("SELECT source_offset, trace_id FROM atoms FINAL ORDER BY source_offset").await.unwrap();
    println!("{text}");
    assert!(text.contains("source_offset") && text.contains("trace_id"), "{text}");
    assert!(text.contains("trace-0") && text.contains("trace-2"), "{text}");
    assert!(text.contains('┌') && !text.contains('\u{1b}'), "pretty, without colour escapes: {text:?}");
    assert_eq!(text.lines().count(), 5, "{text}");

    expect_fatal(store.query_text("INSERT INTO atoms SELECT * FROM atoms").await, "INSERT");
    expect_fatal(store.query_text("DROP TABLE atoms").await, "DROP");
    expect_fatal(store.query_text("SYSTEM STOP MERGES").await, "SYSTEM");
    // The server refuses too: the query runs with readonly=2.
    expect_fatal(store.query_text("SELECT count() FROM atoms SETTINGS readonly = 0").await, "readonly");
    expect_fatal(store.query_text("SELEC 1").await, "SELEC");
    assert_eq!(store.count_atoms_final().await.unwrap(), 3);

    expect_fatal(store.query_scalar_u64("SELECT 'not a number'").await, "not a number");
    assert_eq!(store.query_scalar_u64("SELECT toUInt8(7)").await.unwrap(), 7);
}

#[tokio::test]
async fn dedup_token_support_is_detected_from_the_server() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let caps = store.capabilities().clone();
    println!(
        "server {} ({}), dedup tokens: {}, async_insert setting: {}",
        caps.version_string, caps.version, caps.supports_dedup_token, caps.has_async_insert
    );
    let has_setting =
        store.query_scalar_u64("SELECT count() FROM system.settings WHERE name = 'insert_deduplication_token'").await.unwrap();
    if caps.version < (ServerVersion { major: 21, minor: 0 }) {
        assert!(!caps.supports_dedup_token && !caps.has_async_insert, "{caps:?}");
        assert_eq!(has_setting, 0);
    }
    if caps.supports_dedup_token {
        assert_eq!(has_setting, 1);
        let with_window = store
            .query_scalar_u64(
                "SELECT count() FROM system.tables WHERE database = currentDatabase() \
                 AND name IN ('atoms', 'dead_letters') AND engine_full LIKE '%non_replicated_deduplication_window%'",
            )
            .await
            .unwrap();
        assert_eq!(with_window, 2);
    }
}

/// One quick measurement, printed, not asserted on time: 10,000 atoms of
/// about 2.1 KB (500 B of text and a 384-dimension embedding) in one call.
#[tokio::test]
async fn insert_rate_of_10k_rows_with_384_dim_embeddings() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let text = "Kafka topics feed ClickHouse tables with atoms. ".repeat(10);
    let rows: Vec<AtomRow> = (0..10_000)
        .map(|i| {
            let mut row = atom(&format!("{i:06} {text}"), i);
            row.content.truncate(500);
            row.content_hash = ContentHash::of(&row.content);
            row.embedding = (0..384).map(|d| ((i * 384 + d) as f32).sin()).collect();
            row
        })
        .collect();
    let unique: HashSet<ContentHash> = rows.iter().map(|r| r.content_hash).collect();
    assert_eq!(unique.len(), 10_000);
    let bytes: usize = rows.iter().map(|r| r.content.len() + 4 * r.embedding.len() + 150).sum();

    let started = Instant::now();
    let report = store.insert_atoms(&rows).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report, InsertReport { inserted: 10_000, already_present: 0 });
    println!(
        "insert_atoms: 10000 rows of ~{} B ({:.1} MB) in {:.3} s = {:.0} rows/s, {:.1} MB/s (server {})",
        bytes / rows.len(),
        bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        10_000.0 / elapsed.as_secs_f64(),
        bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        store.capabilities().version_string
    );
    let started = Instant::now();
    let report = store.insert_atoms(&rows).await.unwrap();
    println!("re-insert (all present, existence check only): {:.3} s", started.elapsed().as_secs_f64());
    assert_eq!(report.already_present, 10_000);
    assert_eq!(store.count_atoms_final().await.unwrap(), 10_000);
}
