//! The [`AtomStore`] contract (see `src/store/mod.rs`), written once against
//! `Arc<dyn AtomStore>` and run against both implementations: every scenario
//! below is a test `embedded::<scenario>` on an [`EmbeddedStore`] in a
//! temporary directory and a test `clickhouse::<scenario>` on a
//! [`ClickHouseStore`] in a fresh database.
//!
//! What the trait does not expose (how many rows are stored, what a stored
//! row holds) is read back through a small per-implementation [`Harness`].
//!
//! ClickHouse: its HTTP interface at `HARTONOMOUS_TEST_CLICKHOUSE` (default
//! `http://127.0.0.1:18123`, user `default` without password), e.g. from
//! `tests/services.sh up`. The `clickhouse::` tests fail, saying so, when it
//! is not reachable. Each works in a database of its own,
//! `hx_contract_<random>`, dropped when the test ends (also when it fails).
//!
//! Implementation-specific behaviour (part files, reopening, migrations,
//! error classes, insert splitting, SQL queries) is tested next to each
//! implementation: `src/store/embedded/` and `tests/clickhouse_store.rs`.

use std::collections::HashSet;
use std::sync::Arc;

use hartonomous::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};
use hartonomous::store::{AtomStore, DeadLetterRow, InsertReport};

mod common;
use common::rows::{T0_MS, arrival, atom, atoms, dead_letter};

use clickhouse_harness::ClickHouseHarness;
use embedded_harness::EmbeddedHarness;

// ---------------------------------------------------------------------------
// The harness: what each implementation must provide besides the trait
// ---------------------------------------------------------------------------

/// Where a stored atom came from, and its embedding, as read back from the
/// store's `atoms` table.
#[derive(Debug)]
struct Lineage {
    topic: String,
    partition: i32,
    offset: i64,
    embedding: Vec<f32>,
}

trait Harness {
    /// The store under test.
    fn store(&self) -> Arc<dyn AtomStore>;
    /// Distinct atoms stored (by content hash; under `FINAL` for ClickHouse).
    async fn atoms(&self) -> u64;
    /// Rows in the `atoms` table, duplicates included (no `FINAL`).
    async fn atom_rows(&self) -> u64;
    /// Distinct dead letters stored (by source position; under `FINAL` for ClickHouse).
    async fn dead_letters(&self) -> u64;
    /// Rows in the `dead_letters` table, duplicates included (no `FINAL`).
    async fn dead_letter_rows(&self) -> u64;
    /// The lineage and embedding of the atom stored under `hash`; fails the
    /// test unless exactly one row is stored under it.
    async fn lineage(&self, hash: ContentHash) -> Lineage;
    /// The dead letter stored at this source position; fails the test unless
    /// exactly one row is stored there.
    async fn dead_letter(&self, topic: &str, partition: i32, offset: i64) -> DeadLetterRow;
    /// Distinct arrivals stored (by source position; under `FINAL` for ClickHouse).
    async fn arrivals(&self) -> u64;
    /// Rows in the `atom_arrivals` table, duplicates included (no `FINAL`).
    async fn arrival_rows(&self) -> u64;
}

/// Both tables hold exactly these many rows, each key once.
async fn assert_stored(h: &impl Harness, atoms: u64, dead_letters: u64) {
    assert_eq!(h.atoms().await, atoms, "distinct atoms stored");
    assert_eq!(h.atom_rows().await, atoms, "rows in `atoms`: every atom must be written once");
    assert_eq!(h.dead_letters().await, dead_letters, "distinct dead letters stored");
    assert_eq!(h.dead_letter_rows().await, dead_letters, "rows in `dead_letters`: every dead letter must be written once");
}

macro_rules! contract {
    ($($scenario:ident),+ $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let harness = super::EmbeddedHarness::new();
                    super::$scenario(&harness).await;
                }
            )+
        }

        mod clickhouse {
            use futures::FutureExt as _;

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let harness = super::ClickHouseHarness::new().await;
                    let outcome = std::panic::AssertUnwindSafe(super::$scenario(&harness)).catch_unwind().await;
                    harness.drop_database().await;
                    if let Err(panic) = outcome {
                        std::panic::resume_unwind(panic);
                    }
                }
            )+
        }
    };
}

contract!(
    existing_hashes_find_exactly_the_inserted,
    find_atoms_gives_each_stored_hash_its_lineage,
    arrivals_are_idempotent_by_position_and_the_first_outcome_stands,
    reinserting_the_same_rows_stores_nothing_new,
    duplicates_within_one_call_are_written_once,
    concurrent_inserts_of_the_same_rows_write_each_once,
    dead_letters_are_idempotent_by_position,
    an_empty_insert_is_a_no_op,
    embeddings_and_lineage_round_trip,
    rows_found_absent_are_stored_by_the_unchecked_inserts,
);

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

fn hashes(rows: &[AtomRow]) -> Vec<ContentHash> {
    rows.iter().map(|r| r.content_hash).collect()
}


fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|f| f.to_bits()).collect()
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// `existing_hashes` answers for a whole window: exactly the stored hashes
/// among those asked, whatever else is asked with them.
async fn existing_hashes_find_exactly_the_inserted(h: &impl Harness) {
    let store = h.store();
    let stored = atoms("known", 10);
    assert!(store.existing_hashes(&hashes(&stored)).await.unwrap().is_empty(), "nothing is stored yet");

    assert_eq!(store.insert_atoms(&stored).await.unwrap(), InsertReport { inserted: 10, already_present: 0 });
    assert_stored(h, 10, 0).await;
    for row in &stored {
        assert_eq!(h.lineage(row.content_hash).await.offset, row.source_offset, "stored under its content hash");
    }

    let known: HashSet<ContentHash> = hashes(&stored).into_iter().collect();
    let unknown: Vec<ContentHash> = (0..10).map(|i| ContentHash::of(format!("unknown-{i}").as_bytes())).collect();
    let mut asked = hashes(&stored);
    asked.extend(&unknown);
    asked.push(stored[0].content_hash);
    assert_eq!(store.existing_hashes(&asked).await.unwrap(), known, "known and unknown mixed, one asked twice");
    assert!(store.existing_hashes(&unknown).await.unwrap().is_empty(), "only unknown hashes");
    assert!(store.existing_hashes(&[]).await.unwrap().is_empty(), "no hashes");

    // A large window (more than one `IN (...)` query carries in ClickHouse).
    let mut many: Vec<ContentHash> = (0..5_000).map(|i| ContentHash::of(format!("absent-{i}").as_bytes())).collect();
    many.insert(2_500, stored[3].content_hash);
    many.push(stored[7].content_hash);
    let found = store.existing_hashes(&many).await.unwrap();
    assert_eq!(found, HashSet::from([stored[3].content_hash, stored[7].content_hash]));
}

/// `find_atoms` gives every stored hash the position of the request that
/// stored it: how dedup tells a redelivered creator from a repeat.
async fn find_atoms_gives_each_stored_hash_its_lineage(h: &impl Harness) {
    let store = h.store();
    let stored = atoms("lineage", 20);
    store.insert_atoms(&stored).await.unwrap();
    let mut asked = hashes(&stored);
    asked.push(ContentHash::of(b"never stored"));
    asked.push(stored[4].content_hash);
    let found = store.find_atoms(&asked).await.unwrap();
    assert_eq!(found.len(), 20, "each stored hash once, the unknown one absent");
    for row in &stored {
        assert_eq!(found[&row.content_hash], vec![row.position()], "{}", row.content_hash);
    }
    // Storing the same content again from another position changes nothing: the first stored row stays.
    let mut later = stored[4].clone();
    later.source_offset = 500;
    later.ingested_at_ms += 60_000;
    assert_eq!(store.insert_atoms(&[later]).await.unwrap(), InsertReport { inserted: 0, already_present: 1 });
    assert_eq!(store.find_atoms(&[stored[4].content_hash]).await.unwrap()[&stored[4].content_hash], vec![stored[4].position()]);
    assert!(store.find_atoms(&[]).await.unwrap().is_empty());
}

/// One arrival per source position: a repeated insert of the same position
/// (a replay) is reported `already_present`, and the outcome written first
/// stands whatever the replay says.
async fn arrivals_are_idempotent_by_position_and_the_first_outcome_stands(h: &impl Harness) {
    let store = h.store();
    let first: Vec<ArrivalRow> = (0..30).map(|i| arrival("x", i, if i == 0 { ArrivalOutcome::Created } else { ArrivalOutcome::Matched })).collect();
    assert_eq!(store.insert_arrivals(&first).await.unwrap(), InsertReport { inserted: 30, already_present: 0 });
    assert_eq!(h.arrivals().await, 30);
    let positions: Vec<SourcePosition> = first.iter().map(|r| r.position()).collect();
    let outcomes = store.arrival_outcomes(&positions).await.unwrap();
    assert_eq!(outcomes.len(), 30);
    assert_eq!(outcomes[&positions[0]], ArrivalOutcome::Created);
    assert!(positions[1..].iter().all(|p| outcomes[p] == ArrivalOutcome::Matched));

    // A replay of the first ten with the other outcome, plus five new positions, one of them twice.
    let mut replay: Vec<ArrivalRow> = first[..10].iter().cloned().map(|mut r| {
        r.outcome = ArrivalOutcome::Created;
        r.arrived_at_ms += 3_600_000;
        r
    }).collect();
    replay.extend((100..105).map(|i| arrival("y", i, ArrivalOutcome::Created)));
    replay.push(arrival("y", 104, ArrivalOutcome::Matched));
    assert_eq!(store.insert_arrivals(&replay).await.unwrap(), InsertReport { inserted: 5, already_present: 11 });
    assert_eq!(h.arrivals().await, 35);
    assert_eq!(h.arrival_rows().await, 35, "nothing written twice");
    let outcomes = store.arrival_outcomes(&positions[..10]).await.unwrap();
    assert!(positions[1..10].iter().all(|p| outcomes[p] == ArrivalOutcome::Matched), "the first written outcome stands");
    // Unknown positions, and other topics and partitions, are simply absent.
    let unknown = vec![SourcePosition::new("atoms.requests", 0, 7_777), SourcePosition::new("other", 0, 1), SourcePosition::new("atoms.requests", 3, 1)];
    assert!(store.arrival_outcomes(&unknown).await.unwrap().is_empty());
    assert_eq!(store.insert_arrivals(&[]).await.unwrap(), InsertReport::default());
}

/// Idempotent by content hash: rows already stored are reported
/// `already_present` and not written again, alone or mixed with new ones.
async fn reinserting_the_same_rows_stores_nothing_new(h: &impl Harness) {
    let store = h.store();
    let rows = atoms("hundred", 100);
    assert_eq!(store.insert_atoms(&rows).await.unwrap(), InsertReport { inserted: 100, already_present: 0 });
    assert_eq!(store.insert_atoms(&rows).await.unwrap(), InsertReport { inserted: 0, already_present: 100 });
    assert_stored(h, 100, 0).await;

    // Old and new rows mixed, and one of the new ones repeated (from another
    // position) in the same call: only the new rows are written, each once,
    // the first occurrence winning.
    let mut mixed: Vec<AtomRow> = rows[..50].to_vec();
    mixed.extend(atoms("ten-more", 10));
    let mut repeat = mixed[55].clone();
    repeat.source_offset = 9_999;
    repeat.trace_id = "second-occurrence".into();
    mixed.push(repeat);
    assert_eq!(store.insert_atoms(&mixed).await.unwrap(), InsertReport { inserted: 10, already_present: 51 });
    assert_stored(h, 110, 0).await;
    assert_eq!(h.lineage(mixed[55].content_hash).await.offset, mixed[55].source_offset);
    // The rows stored first are untouched by the later calls.
    assert_eq!(h.lineage(rows[0].content_hash).await.offset, rows[0].source_offset);
}

/// `insert_new_atoms` and `insert_new_arrivals` (rows a look-up just found
/// absent) store them like the checked inserts do, a repeat within the call
/// once, and what they stored is found by the checked ones afterwards.
async fn rows_found_absent_are_stored_by_the_unchecked_inserts(h: &impl Harness) {
    let store = h.store();
    let mut rows = atoms("found-absent", 20);
    assert!(store.find_atoms(&hashes(&rows)).await.unwrap().is_empty());
    let mut repeat = rows[3].clone();
    repeat.source_offset = 7_000;
    rows.push(repeat);
    assert_eq!(store.insert_new_atoms(&rows).await.unwrap(), InsertReport { inserted: 20, already_present: 1 });
    assert_stored(h, 20, 0).await;
    assert_eq!(h.lineage(rows[3].content_hash).await.offset, rows[3].source_offset, "the first occurrence is the one stored");
    assert_eq!(store.insert_atoms(&rows[..20]).await.unwrap(), InsertReport { inserted: 0, already_present: 20 });
    assert_stored(h, 20, 0).await;

    let arrivals: Vec<ArrivalRow> = (0..10).map(|i| arrival("absent", i, ArrivalOutcome::Created)).collect();
    assert_eq!(store.insert_new_arrivals(&arrivals).await.unwrap(), InsertReport { inserted: 10, already_present: 0 });
    assert_eq!(store.insert_arrivals(&arrivals).await.unwrap(), InsertReport { inserted: 0, already_present: 10 });
    assert_eq!(h.arrival_rows().await, 10);
}

/// A hash repeated within one call is written once; the first occurrence wins.
async fn duplicates_within_one_call_are_written_once(h: &impl Harness) {
    let store = h.store();
    let first = atom("same", 1);
    let mut again = atom("same", 2);
    again.trace_id = "another-trace".into();
    let report = store.insert_atoms(&[first.clone(), again, atom("other", 3), first.clone()]).await.unwrap();
    assert_eq!(report, InsertReport { inserted: 2, already_present: 2 });
    assert_stored(h, 2, 0).await;
    assert_eq!(h.lineage(first.content_hash).await.offset, 1, "the first occurrence is the one stored");
}

/// Calls racing on one store never write a row twice, and their reports add
/// up: each row is `inserted` by exactly one of them.
async fn concurrent_inserts_of_the_same_rows_write_each_once(h: &impl Harness) {
    let rows = Arc::new(atoms("race", 40));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = h.store();
            let rows = rows.clone();
            tokio::spawn(async move { store.insert_atoms(&rows).await.unwrap() })
        })
        .collect();
    let mut inserted = 0;
    for task in tasks {
        let report = task.await.unwrap();
        assert_eq!(report.inserted + report.already_present, 40, "{report:?}");
        inserted += report.inserted;
    }
    assert_eq!(inserted, 40, "each row inserted by exactly one call");
    assert_stored(h, 40, 0).await;
    assert_eq!(h.store().existing_hashes(&hashes(&rows)).await.unwrap().len(), 40);
}

/// Dead letters are idempotent by (source_topic, source_partition,
/// source_offset): the same position with other content is the same dead
/// letter, and the first archived version stays, every column intact.
async fn dead_letters_are_idempotent_by_position(h: &impl Harness) {
    let store = h.store();
    // Same offset on another partition, and on another topic: different positions.
    let rows = vec![dead_letter("in", 0, 10), dead_letter("in", 0, 11), dead_letter("in", 1, 10), dead_letter("other", 0, 10)];
    assert_eq!(store.insert_dead_letters(&rows).await.unwrap(), InsertReport { inserted: 4, already_present: 0 });

    // Same position, different content: still the same dead letter, also
    // when repeated within the call.
    let mut replay = dead_letter("in", 0, 10);
    replay.error = "a different message".into();
    replay.attempts = 3;
    replay.original_payload = b"another payload".to_vec();
    let report = store.insert_dead_letters(&[replay.clone(), dead_letter("in", 0, 12), replay]).await.unwrap();
    assert_eq!(report, InsertReport { inserted: 1, already_present: 2 });
    assert_eq!(store.insert_dead_letters(&rows).await.unwrap(), InsertReport { inserted: 0, already_present: 4 });
    assert_stored(h, 0, 5).await;

    for want in rows.iter().chain([&dead_letter("in", 0, 12)]) {
        let got = h.dead_letter(&want.source_topic, want.source_partition, want.source_offset).await;
        assert_eq!(&got, want, "the first archived version stays");
    }
    // The columns that vary between the rows above.
    assert_eq!(h.dead_letter("in", 0, 10).await.original_key, Some(vec![1, 2, 3]));
    assert_eq!(h.dead_letter("in", 0, 11).await.original_key, None, "no key is not an empty key");
    assert_eq!(h.dead_letter("in", 0, 11).await.original_payload, vec![0xde, 0xad, 11, 0x00, 0xff]);
    assert_eq!(h.dead_letter("in", 0, 12).await.failed_at_ms, T0_MS + 2_012);
}

/// Inserting nothing reports nothing and stores nothing, on an empty store
/// and on one holding rows.
async fn an_empty_insert_is_a_no_op(h: &impl Harness) {
    let store = h.store();
    assert_eq!(store.insert_atoms(&[]).await.unwrap(), InsertReport::default());
    assert_eq!(store.insert_dead_letters(&[]).await.unwrap(), InsertReport::default());
    assert_stored(h, 0, 0).await;

    store.insert_atoms(&atoms("some", 3)).await.unwrap();
    store.insert_dead_letters(&[dead_letter("in", 0, 1)]).await.unwrap();
    assert_eq!(store.insert_atoms(&[]).await.unwrap(), InsertReport::default());
    assert_eq!(store.insert_dead_letters(&[]).await.unwrap(), InsertReport::default());
    assert_stored(h, 3, 1).await;
    assert!(store.existing_hashes(&[]).await.unwrap().is_empty());
}

/// Embeddings come back bit for bit (empty, extreme, subnormal, infinite,
/// signed zero, a full 384-dimension vector) and the source position of
/// each atom (topic, partition, offset) as given.
async fn embeddings_and_lineage_round_trip(h: &impl Harness) {
    let store = h.store();
    let mut rows = atoms("round-trip", 4);
    rows[0].embedding = vec![];
    rows[1].embedding = vec![f32::MIN_POSITIVE, 1e-7, 3.5, -0.0, 123_456.79, f32::MAX, -f32::MIN_POSITIVE / 4.0, f32::INFINITY];
    rows[2].embedding = (0..384).map(|i| (i as f32 * 0.37).sin()).collect();
    rows[0].source_topic = "tenant-a.atoms.requests".into();
    rows[1].source_partition = 7;
    rows[1].source_offset = 1 << 40;
    rows[2].source_topic = "x".into();
    rows[2].source_partition = i32::MAX;
    rows[2].source_offset = i64::MAX;
    rows[3].source_partition = 2;
    store.insert_atoms(&rows).await.unwrap();
    assert_stored(h, 4, 0).await;

    for want in &rows {
        let got = h.lineage(want.content_hash).await;
        assert_eq!(
            (got.topic.as_str(), got.partition, got.offset),
            (want.source_topic.as_str(), want.source_partition, want.source_offset),
            "lineage of {}",
            want.content_hash
        );
        assert_eq!(bits(&got.embedding), bits(&want.embedding), "embedding of {}", want.content_hash);
    }
}

// ---------------------------------------------------------------------------
// The embedded store
// ---------------------------------------------------------------------------

mod embedded_harness {
    use std::sync::Arc;

    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float32Type, Int32Type, Int64Type, TimestampMillisecondType, UInt32Type};
    use arrow::record_batch::RecordBatch;
    use hartonomous::atom::ContentHash;
    use hartonomous::store::embedded::EmbeddedStore;
    use hartonomous::store::{AtomStore, DeadLetterRow};

    use super::{Harness, Lineage};

    /// An [`EmbeddedStore`] in a temporary directory, read back with SQL.
    pub struct EmbeddedHarness {
        store: Arc<EmbeddedStore>,
        _dir: tempfile::TempDir,
    }

    impl EmbeddedHarness {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().expect("temporary directory");
            let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open the embedded store"));
            Self { store, _dir: dir }
        }

        async fn query(&self, sql: &str) -> Vec<RecordBatch> {
            self.store.query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
        }

        /// The one integer a `count` query yields.
        async fn count(&self, sql: &str) -> u64 {
            let batches = self.query(sql).await;
            let values: Vec<i64> = batches.iter().flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
            assert_eq!(values.len(), 1, "{sql}: {values:?}");
            u64::try_from(values[0]).unwrap()
        }
    }

    impl Harness for EmbeddedHarness {
        fn store(&self) -> Arc<dyn AtomStore> {
            self.store.clone()
        }

        async fn atoms(&self) -> u64 {
            let distinct = self.count("SELECT count(DISTINCT content_hash) FROM atoms").await;
            // The store answers existence from memory: it must agree with the files.
            assert_eq!(self.store.atom_count() as u64, distinct, "in-memory hash set vs. the atoms table");
            distinct
        }

        async fn atom_rows(&self) -> u64 {
            self.count("SELECT count(*) FROM atoms").await
        }

        async fn dead_letters(&self) -> u64 {
            let distinct =
                self.count("SELECT count(*) FROM (SELECT DISTINCT source_topic, source_partition, source_offset FROM dead_letters)").await;
            assert_eq!(self.store.dead_letter_count() as u64, distinct, "in-memory positions vs. the dead_letters table");
            distinct
        }

        async fn dead_letter_rows(&self) -> u64 {
            self.count("SELECT count(*) FROM dead_letters").await
        }

        async fn arrivals(&self) -> u64 {
            let distinct =
                self.count("SELECT count(*) FROM (SELECT DISTINCT source_topic, source_partition, source_offset FROM atom_arrivals)").await;
            assert_eq!(self.store.arrival_count() as u64, distinct, "in-memory positions vs. the atom_arrivals table");
            distinct
        }

        async fn arrival_rows(&self) -> u64 {
            self.count("SELECT count(*) FROM atom_arrivals").await
        }

        async fn lineage(&self, hash: ContentHash) -> Lineage {
            let sql = format!(
                "SELECT source_topic, source_partition, source_offset, embedding FROM atoms WHERE content_hash = '{}'",
                hash.to_hex()
            );
            let mut found = Vec::new();
            for b in self.query(&sql).await {
                let embeddings = b.column(3).as_list::<i32>();
                for i in 0..b.num_rows() {
                    found.push(Lineage {
                        topic: b.column(0).as_string::<i32>().value(i).to_owned(),
                        partition: b.column(1).as_primitive::<Int32Type>().value(i),
                        offset: b.column(2).as_primitive::<Int64Type>().value(i),
                        embedding: embeddings.value(i).as_primitive::<Float32Type>().values().to_vec(),
                    });
                }
            }
            assert_eq!(found.len(), 1, "atom {hash} must be stored exactly once: {found:?}");
            found.pop().unwrap()
        }

        async fn dead_letter(&self, topic: &str, partition: i32, offset: i64) -> DeadLetterRow {
            let sql = format!(
                "SELECT topology, source_topic, source_partition, source_offset, stage, reason, error, attempts, \
                 failed_at, original_key, original_payload, trace_id FROM dead_letters \
                 WHERE source_topic = '{topic}' AND source_partition = {partition} AND source_offset = {offset}"
            );
            let mut found = Vec::new();
            for b in self.query(&sql).await {
                let text = |c: usize, i: usize| b.column(c).as_string::<i32>().value(i).to_owned();
                let keys = b.column(9).as_binary::<i32>();
                for i in 0..b.num_rows() {
                    found.push(DeadLetterRow {
                        topology: text(0, i),
                        source_topic: text(1, i),
                        source_partition: b.column(2).as_primitive::<Int32Type>().value(i),
                        source_offset: b.column(3).as_primitive::<Int64Type>().value(i),
                        stage: text(4, i),
                        reason: text(5, i),
                        error: text(6, i),
                        attempts: b.column(7).as_primitive::<UInt32Type>().value(i),
                        failed_at_ms: b.column(8).as_primitive::<TimestampMillisecondType>().value(i),
                        original_key: (!keys.is_null(i)).then(|| keys.value(i).to_vec()),
                        original_payload: b.column(10).as_binary::<i32>().value(i).to_vec(),
                        trace_id: text(11, i),
                    });
                }
            }
            assert_eq!(found.len(), 1, "dead letter {topic}/{partition}@{offset} must be stored exactly once: {found:?}");
            found.pop().unwrap()
        }
    }
}

// ---------------------------------------------------------------------------
// ClickHouse
// ---------------------------------------------------------------------------

mod clickhouse_harness {
    use std::sync::Arc;
    use std::time::Duration;

    use clickhouse::Row;
    use hartonomous::atom::ContentHash;
    use hartonomous::outcome::error_chain;
    use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
    use hartonomous::store::{AtomStore, DeadLetterRow};
    use serde::Deserialize;

    use super::{Harness, Lineage};

    const DEFAULT_URL: &str = "http://127.0.0.1:18123";

    fn server_url() -> String {
        std::env::var("HARTONOMOUS_TEST_CLICKHOUSE").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| DEFAULT_URL.into())
    }

    /// A [`ClickHouseStore`] on a database of its own, read back with SQL.
    /// Call [`drop_database`](Self::drop_database) when done.
    pub struct ClickHouseHarness {
        url: String,
        database: String,
        http: reqwest::Client,
        store: Arc<ClickHouseStore>,
        /// Scoped to the test database, for reading rows back.
        raw: clickhouse::Client,
    }

    #[derive(Debug, Row, Deserialize)]
    struct StoredLineage {
        source_topic: String,
        source_partition: i32,
        source_offset: i64,
        embedding: Vec<f32>,
    }

    #[derive(Debug, Row, Deserialize)]
    struct StoredDeadLetter {
        topology: String,
        source_topic: String,
        source_partition: i32,
        source_offset: i64,
        stage: String,
        reason: String,
        error: String,
        attempts: u32,
        failed_at: u32,
        failed_at_ms: i64,
        original_key: Option<Vec<u8>>,
        original_payload: Vec<u8>,
        trace_id: String,
    }

    impl ClickHouseHarness {
        /// Connects to the test server, creating and migrating a fresh
        /// database; fails the test, saying why, if the server is not there.
        pub async fn new() -> Self {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let url = server_url();
            let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("HTTP client");
            let unreachable = |why: String| -> ! {
                panic!(
                    "ClickHouse is not reachable at {url}: {why}. The clickhouse:: store contract tests need a \
                     running server: start one with `tests/services.sh up`, or point HARTONOMOUS_TEST_CLICKHOUSE \
                     at its HTTP URL"
                )
            };
            match http.post(&url).body("SELECT 1").timeout(Duration::from_secs(10)).send().await {
                Ok(response) if response.status().is_success() => {
                    let body = response.text().await.unwrap_or_else(|e| unreachable(error_chain(&e)));
                    assert_eq!(body.trim(), "1", "ClickHouse at {url} answered SELECT 1 with {body:?}");
                }
                Ok(response) => {
                    let status = response.status();
                    unreachable(format!("SELECT 1 got HTTP {status}: {}", response.text().await.unwrap_or_default()))
                }
                Err(e) => unreachable(error_chain(&e)),
            }

            let database = format!("hx_contract_{:016x}", rand::random::<u64>());
            let config = ClickHouseConfig { migrate_on_start: false, ..ClickHouseConfig::new(url.as_str(), database.as_str()) };
            let store = ClickHouseStore::connect(config).await.unwrap_or_else(|e| panic!("connect to {url}, database {database}: {e}"));
            store.migrate().await.unwrap_or_else(|e| panic!("migrate database {database}: {e}"));
            let raw = clickhouse::Client::default().with_url(url.as_str()).with_validation(false).with_database(database.as_str());
            Self { url, database, http, store: Arc::new(store), raw }
        }

        /// Drops the test database (reports, does not fail, if it cannot).
        pub async fn drop_database(&self) {
            let sql = format!("DROP DATABASE IF EXISTS {}", self.database);
            match self.http.post(&self.url).body(sql).send().await {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => eprintln!("could not drop test database {}: HTTP {}", self.database, response.status()),
                Err(e) => eprintln!("could not drop test database {}: {}", self.database, error_chain(&e)),
            }
        }

        async fn count(&self, sql: &str) -> u64 {
            self.store.query_scalar_u64(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    }

    impl Harness for ClickHouseHarness {
        fn store(&self) -> Arc<dyn AtomStore> {
            self.store.clone()
        }

        async fn atoms(&self) -> u64 {
            // `SELECT count() FROM atoms FINAL`
            self.store.count_atoms_final().await.unwrap_or_else(|e| panic!("count atoms: {e}"))
        }

        async fn atom_rows(&self) -> u64 {
            self.count("SELECT count() FROM atoms").await
        }

        async fn dead_letters(&self) -> u64 {
            // `SELECT count() FROM dead_letters FINAL`
            self.store.count_dead_letters_final().await.unwrap_or_else(|e| panic!("count dead letters: {e}"))
        }

        async fn dead_letter_rows(&self) -> u64 {
            self.count("SELECT count() FROM dead_letters").await
        }

        async fn arrivals(&self) -> u64 {
            self.count("SELECT count() FROM atom_arrivals FINAL").await
        }

        async fn arrival_rows(&self) -> u64 {
            self.count("SELECT count() FROM atom_arrivals").await
        }

        async fn lineage(&self, hash: ContentHash) -> Lineage {
            let mut found: Vec<StoredLineage> = self
                .raw
                .query("SELECT ?fields FROM atoms WHERE content_hash = ?")
                .bind(hash.to_hex())
                .fetch_all()
                .await
                .unwrap_or_else(|e| panic!("read atom {hash}: {}", error_chain(&e)));
            assert_eq!(found.len(), 1, "atom {hash} must be stored exactly once: {found:?}");
            let row = found.pop().unwrap();
            Lineage { topic: row.source_topic, partition: row.source_partition, offset: row.source_offset, embedding: row.embedding }
        }

        async fn dead_letter(&self, topic: &str, partition: i32, offset: i64) -> DeadLetterRow {
            let mut found: Vec<StoredDeadLetter> = self
                .raw
                .query("SELECT ?fields FROM dead_letters WHERE source_topic = ? AND source_partition = ? AND source_offset = ?")
                .bind(topic)
                .bind(partition)
                .bind(offset)
                .fetch_all()
                .await
                .unwrap_or_else(|e| panic!("read dead letter {topic}/{partition}@{offset}: {}", error_chain(&e)));
            assert_eq!(found.len(), 1, "dead letter {topic}/{partition}@{offset} must be stored exactly once: {found:?}");
            let row = found.pop().unwrap();
            // ClickHouse-specific: `failed_at` is a DateTime (seconds, clamped
            // to its range) next to the exact `failed_at_ms`.
            assert_eq!(
                i64::from(row.failed_at),
                row.failed_at_ms.div_euclid(1000).clamp(0, i64::from(u32::MAX)),
                "failed_at of {topic}/{partition}@{offset}"
            );
            DeadLetterRow {
                topology: row.topology,
                source_topic: row.source_topic,
                source_partition: row.source_partition,
                source_offset: row.source_offset,
                stage: row.stage,
                reason: row.reason,
                error: row.error,
                attempts: row.attempts,
                failed_at_ms: row.failed_at_ms,
                original_key: row.original_key,
                original_payload: row.original_payload,
                trace_id: row.trace_id,
            }
        }
    }
}
