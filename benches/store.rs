//! The embedded store at scale (issue 10): N atoms of about 1 KiB with 384-d
//! embeddings, inserted in windows of 5,000 as the topology writes them,
//! with the background maintenance on (parts merge while inserts go on).
//! Then it reports:
//!
//! - the insert rate and the parts on disk after the last merge;
//! - **open**: dropping the store and opening it again (key indexes, then
//!   the parts they do not cover); also the open with no index at all,
//!   which is what every open cost before the indexes existed;
//! - **dedup look-up per window**: `find_atoms` for 5,000 hashes, half of
//!   them stored;
//! - **queries**: `SELECT count(*) FROM atoms` and
//!   `SELECT source_system, count(*) FROM atoms GROUP BY source_system`.
//!
//! Nothing is asserted about speed; the run checks the counts.
//!
//! ```sh
//! cargo bench --bench store                                    # N = 1,000,000
//! HARTONOMOUS_STORE_ATOMS=200000 cargo bench --bench store     # fewer
//! cargo test --bench store                                     # smoke run, N = 20,000
//! ```

use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use hartonomous::atom::{AtomRow, ContentHash};
use hartonomous::store::AtomStore;
use hartonomous::store::embedded::EmbeddedStore;

const WINDOW: usize = 5_000;
const DIMENSION: usize = 384;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("HARTONOMOUS_STORE_ATOMS").ok().and_then(|v| v.parse().ok()).unwrap_or(if bench { 1_000_000 } else { 20_000 });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(n));
}

/// A different, incompressible embedding per atom (xorshift), as real
/// embeddings are: equal ones would shrink to nothing in Parquet's dictionary.
fn embedding_of(i: usize) -> Vec<f32> {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..DIMENSION)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn row(i: usize, filler: &str) -> AtomRow {
    let content = format!("atom {i}: {}", &filler[..1000]).into_bytes();
    AtomRow {
        content_hash: ContentHash::of(&content),
        content_type: "text/plain".into(),
        content,
        source_system: format!("system-{}", i % 7),
        correlation_id: format!("c{i}"),
        metadata_json: "{}".into(),
        embedding: embedding_of(i),
        embedding_model: "hashing".into(),
        event_time_ms: 1_700_000_000_000 + i as i64,
        source_topic: "atoms.ingest".into(),
        source_partition: (i % 3) as i32,
        source_offset: (i / 3) as i64,
        ingested_at_ms: 1_700_000_000_000 + i as i64,
        trace_id: String::new(),
    }
}

fn secs(d: Duration) -> String {
    if d < Duration::from_millis(10) { format!("{:.2} ms", d.as_secs_f64() * 1000.0) } else { format!("{:.3} s", d.as_secs_f64()) }
}

async fn count(store: &EmbeddedStore, sql: &str) -> (Duration, Vec<arrow::record_batch::RecordBatch>) {
    let started = Instant::now();
    let batches = store.query(sql).await.unwrap();
    (started.elapsed(), batches)
}

async fn run(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let filler = "stream processing into an embedded parquet store ".repeat(30);

    // Insert in windows, as the persist stage does; maintenance runs in the background.
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let mut inserting = Duration::ZERO;
    let mut i = 0;
    while i < n {
        let rows: Vec<AtomRow> = (i..(i + WINDOW).min(n)).map(|j| row(j, &filler)).collect();
        let started = Instant::now();
        let report = store.insert_atoms(&rows).await.unwrap();
        inserting += started.elapsed();
        assert_eq!(report.inserted, rows.len());
        i += rows.len();
    }
    // The last merges and the indexes, as a long-running process would have them.
    let started = Instant::now();
    while !store.compact().await.unwrap().is_empty() {}
    let settling = started.elapsed();
    let visible = store.atom_parts().unwrap();
    let parts_before = std::fs::read_dir(store.atoms_dir()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".parquet")).count();
    let disk: u64 = std::fs::read_dir(store.atoms_dir()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    drop(store);

    // Open, with the indexes.
    let started = Instant::now();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let open = started.elapsed();
    assert_eq!(store.atom_count(), n);
    let read_past = store.parts_read_at_open();

    // Dedup look-up: a window of hashes, half stored.
    let asked: Vec<ContentHash> = (0..WINDOW).map(|k| if k % 2 == 0 { row(k * (n / WINDOW).max(1) % n, &filler).content_hash } else { ContentHash::of(format!("new {k}").as_bytes()) }).collect();
    let mut lookups = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let found = store.find_atoms(&asked).await.unwrap();
        lookups.push(started.elapsed());
        assert!(found.len() >= WINDOW / 2 - 1 && found.len() <= WINDOW / 2 + 1, "{} of {WINDOW} found", found.len());
    }
    lookups.sort();

    // Queries.
    let (count_time, batches) = count(&store, "SELECT count(*) FROM atoms").await;
    assert_eq!(batches[0].column(0).as_primitive::<Int64Type>().value(0), n as i64);
    let (group_time, batches) = count(&store, "SELECT source_system, count(*) AS n FROM atoms GROUP BY source_system").await;
    let grouped: i64 = batches.iter().map(|b| b.column(1).as_primitive::<Int64Type>().values().iter().sum::<i64>()).sum();
    assert_eq!(grouped, n as i64);
    drop(store);

    // Open without the indexes: every part's key columns are read.
    for entry in std::fs::read_dir(dir.path().join("tables")).unwrap() {
        let _ = std::fs::remove_file(entry.unwrap().path().join("keys.idx"));
    }
    let started = Instant::now();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let open_without = started.elapsed();
    assert_eq!(store.atom_count(), n);

    println!("\nembedded store, {n} atoms of ~1 KiB with {DIMENSION}-d embeddings, inserted {WINDOW} per call");
    println!("  {:<52} {:>12.0} atoms/s ({} in insert calls)", "insert (maintenance in the background)", n as f64 / inserting.as_secs_f64(), secs(inserting));
    println!("  {:<52} {:>12}", "last merges + indexes after the inserts", secs(settling));
    println!("  {:<52} {:>12}  ({visible} visible; {parts_before} files, {:.0} MiB, merged inputs kept for the grace period)", "parts", "", disk as f64 / (1 << 20) as f64);
    println!("  {:<52} {:>12}  ({read_past} parts read past the indexes)", "open (key indexes)", secs(open));
    println!("  {:<52} {:>12}", "open without indexes (every part's key columns)", secs(open_without));
    println!("  {:<52} {:>12}  (median of 20; max {})", "dedup look-up, 5,000 hashes (half stored)", secs(lookups[10]), secs(lookups[19]));
    println!("  {:<52} {:>12}", "SELECT count(*) FROM atoms", secs(count_time));
    println!("  {:<52} {:>12}", "SELECT source_system, count(*) ... GROUP BY", secs(group_time));
}
