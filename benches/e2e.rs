//! End-to-end benchmark against the test services (tansu and ClickHouse from
//! `tests/services.sh up`), with the raw ceilings measured in the same run:
//!
//! 1. produce N Avro requests of about 1 KiB to a fresh 3-partition topic;
//! 2. **raw consume**: a bare rdkafka `BaseConsumer` reads the topic, no processing;
//! 3. **raw insert**: bare batched `clickhouse` crate inserts of N equivalent
//!    atom rows (384-dimension embedding, 1 KiB content) in batches of 10,000;
//! 4. the atom-ingestion topology over the same topic, in process, into
//!    ClickHouse: once with the built-in hashing embedder at 384 dimensions,
//!    once with the embed stage left out of the declaration;
//! 5. the first variant again with operations on: `/metrics` served and
//!    scraped every second, and spans exported over OTLP to a collector that
//!    accepts and discards them (inside this process). Step 4 runs with no
//!    endpoint and no span exporter, so 4 vs 5 is their overhead. The
//!    counters behind `/metrics` are plain atomics that are always on.
//!
//! It prints every rate and the ratio of each topology rate to the lower of
//! the two ceilings. Nothing here is asserted about speed; the run only checks
//! that every record arrived.
//!
//! ```sh
//! tests/services.sh up && eval "$(tests/services.sh env)"
//! HARTONOMOUS_KAFKA_STORAGE=memory tests/services.sh up   # broker ceiling without S3 storage
//! cargo bench --bench e2e                                  # N = 100,000 (HARTONOMOUS_E2E_RECORDS overrides)
//! cargo test --bench e2e                                   # smoke run, N = 2,000
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use clickhouse::Row;
use futures::StreamExt;
use hartonomous::topology::atom_ingestion::counters;
use hartonomous::avro::{self, FileRegistry, Schemas};
use hartonomous::config::{EmbedderProfile, HashingProfile, LogProfile, Profile, RegistryProfile, StoreProfile};
use hartonomous::log::LogProducer;
use hartonomous::log::kafka::{KafkaConfig, KafkaProducer, ensure_topics};
use hartonomous::record::OutgoingRecord;
use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use hartonomous::topology::spec::TopologySpec;
use serde::Serialize;

mod common;

const PARTITIONS: i32 = 3;
const DIMENSION: usize = 384;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("HARTONOMOUS_E2E_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(if bench { 100_000 } else { 2_000 });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(n));
}

fn kafka() -> String {
    std::env::var("HARTONOMOUS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

fn clickhouse_url() -> String {
    std::env::var("HARTONOMOUS_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

fn kafka_config() -> KafkaConfig {
    let mut k = KafkaConfig::new(kafka());
    k.session_timeout_ms = 6000;
    k.heartbeat_interval_ms = 500;
    k.create_topics = true;
    k
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn run(n: usize) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let id = format!("e2e_{}_{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    let topic = format!("{id}.ingest");
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("registry.json");
    ensure_topics(&kafka_config(), &[(topic.as_str(), PARTITIONS)])
        .await
        .unwrap_or_else(|e| panic!("Kafka at {}: {e}; start the services with `tests/services.sh up`", kafka()));

    // 1. Produce N requests of about 1 KiB.
    let registry = FileRegistry::open(&registry_path).unwrap();
    let schema = &Schemas::current("AtomIngestionRequest").unwrap().schema;
    let schema_id = registry.register_schema(&Schemas::subject(&topic), schema).unwrap();
    let filler = "stream processing into clickhouse ".repeat(30);
    let producer = KafkaProducer::new(&kafka_config()).unwrap();
    let started = Instant::now();
    let sends = (0..n).map(|i| {
        let v = serde_json::json!({
            "content_type": "text/plain",
            "content": format!("record {i}: {}", &filler[..1000]),
            "metadata": {"i": i.to_string()},
            "source_system": "bench",
            "correlation_id": format!("c{i}"),
        });
        let payload = avro::encode(schema_id, schema, &avro::json_to_avro(&v, schema).unwrap()).unwrap();
        let out = OutgoingRecord { topic: topic.clone(), key: Some(format!("c{i}").into_bytes()), payload, ..Default::default() };
        let producer = &producer;
        async move { producer.send(out).await.unwrap() }
    });
    futures::stream::iter(sends).buffer_unordered(20_000).collect::<Vec<_>>().await;
    let produce = started.elapsed();

    // 2. Raw consume: bare rdkafka, assigned from the beginning, no processing.
    let consume = common::raw_consume(&kafka(), &topic, PARTITIONS, n);

    // 3. Raw insert: bare clickhouse crate, batches of 10,000.
    let insert = raw_insert(&format!("{id}_raw"), n).await;

    // 4. The topology, with and without the embed stage.
    let with_embed = topology(&id, "hashing384", &topic, &registry_path, true, n, None).await;
    let without_embed = topology(&id, "noembed", &topic, &registry_path, false, n, None).await;

    // 5. Operations on: spans to a local collector, /metrics scraped every second.
    let (collector, exported) = sink_collector().await;
    let telemetry = hartonomous::telemetry::init(hartonomous::telemetry::LogFormat::Human, Some(&collector), "e2e-bench").unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let with_ops = topology(&id, "hashing384ops", &topic, &registry_path, true, n, Some(listen)).await;
    telemetry.shutdown();
    let exports = exported.load(std::sync::atomic::Ordering::Relaxed);
    assert!(exports > 0, "no span export reached the collector");

    let ceiling = rate(n, consume).min(rate(n, insert));
    println!("\nend-to-end benchmark, {n} records of ~1 KiB, {PARTITIONS} partitions, {} cores", std::thread::available_parallelism().map_or(0, |p| p.get()));
    println!("  {:<44} {:>12.0} records/s", "produce (acks=all, idempotent)", rate(n, produce));
    println!("  {:<44} {:>12.0} records/s", "raw consume (bare rdkafka)", rate(n, consume));
    println!("  {:<44} {:>12.0} records/s", "raw insert (bare clickhouse crate, 384-dim)", rate(n, insert));
    for (name, (total, steady)) in [
        ("topology, hashing embedder 384-dim", with_embed),
        ("topology, no embed stage", without_embed),
        ("topology, 384-dim, /metrics scraped + OTLP spans", with_ops),
    ] {
        println!(
            "  {:<44} {:>12.0} records/s  ({:.2} of the lower ceiling; {:.0} records/s counting group join)",
            name,
            steady,
            steady / ceiling,
            total
        );
    }
    println!(
        "  operations overhead: {:.1} % of the steady rate ({exports} OTLP export requests, /metrics scraped every second)",
        (1.0 - with_ops.1 / with_embed.1) * 100.0
    );
}

/// An OTLP/HTTP collector that answers every export with 200 and counts them.
async fn sink_collector() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::{AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                while common::read_request(&mut reader).await.is_some() {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if reader.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, count)
}

#[derive(Row, Serialize)]
struct RawAtom {
    content_hash: String,
    content_type: &'static str,
    content: String,
    content_size: u64,
    source_system: &'static str,
    correlation_id: String,
    metadata: &'static str,
    embedding: Vec<f32>,
    embedding_model: &'static str,
    embedding_dimension: u32,
    event_time: u32,
    event_time_ms: i64,
    source_topic: &'static str,
    source_partition: i32,
    source_offset: i64,
    ingested_at: u32,
    ingested_at_ms: u64,
    trace_id: &'static str,
}

async fn raw_insert(database: &str, n: usize) -> Duration {
    let store = ClickHouseStore::connect(ClickHouseConfig::new(clickhouse_url(), database)).await.unwrap();
    store.migrate().await.unwrap();
    let client = clickhouse::Client::default().with_url(clickhouse_url()).with_database(database).with_validation(false);
    let filler = "stream processing into clickhouse ".repeat(30);
    let embedding: Vec<f32> = (0..DIMENSION).map(|i| (i as f32) / DIMENSION as f32).collect();
    let rows: Vec<RawAtom> = (0..n)
        .map(|i| RawAtom {
            content_hash: hex::encode(hartonomous::atom::ContentHash::of(i.to_string().as_bytes()).0),
            content_type: "text/plain",
            content: format!("record {i}: {}", &filler[..1000]),
            content_size: 1010,
            source_system: "bench",
            correlation_id: format!("c{i}"),
            metadata: "{}",
            embedding: embedding.clone(),
            embedding_model: "raw",
            embedding_dimension: DIMENSION as u32,
            event_time: 1_700_000_000,
            event_time_ms: 1_700_000_000_000,
            source_topic: "raw",
            source_partition: 0,
            source_offset: i as i64,
            ingested_at: 1_700_000_000,
            ingested_at_ms: 1_700_000_000_000,
            trace_id: "",
        })
        .collect();
    let started = Instant::now();
    for chunk in rows.chunks(10_000) {
        let mut insert = client.insert::<RawAtom>("atoms").await.unwrap();
        for row in chunk {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }
    let took = started.elapsed();
    assert_eq!(store.query_scalar_u64("SELECT count() FROM atoms").await.unwrap(), n as u64);
    took
}

/// Runs the topology until ClickHouse holds all `n` atoms. Returns the rate
/// counting the group join, and the steady rate from the first stored atom.
async fn topology(id: &str, variant: &str, topic: &str, registry: &Path, embed: bool, n: usize, listen: Option<std::net::SocketAddr>) -> (f64, f64) {
    let database = format!("{id}_{variant}");
    let mut text = hartonomous::topology::TOPOLOGIES[0].declaration().replace("\"atoms.ingest.dlq\"", &format!("\"{topic}.{variant}.dlq\"")).replace(
        "\"atoms.ingested\"",
        &format!("\"{topic}.{variant}.out\""),
    );
    text = text.replace("\"atoms.ingest\"", &format!("\"{topic}\""));
    let mut spec = TopologySpec::parse(Path::new("bench"), &text).unwrap();
    // HARTONOMOUS_E2E_WINDOW=N runs with windows of N records (and room for them in flight).
    if let Some(w) = std::env::var("HARTONOMOUS_E2E_WINDOW").ok().and_then(|v| v.parse::<usize>().ok()) {
        spec.window.max_records = w;
        spec.window.max_bytes = w * 2048;
        spec.limits.in_flight_records = spec.limits.in_flight_records.max(w * 4);
        spec.limits.in_flight_bytes = spec.limits.in_flight_bytes.max(w * 8192);
    }
    spec.source.group = Some(format!("{id}.{variant}"));
    if !embed {
        spec.stages.retain(|s| s.get("name").and_then(|n| n.as_str()) != Some("embed"));
    }
    // HARTONOMOUS_E2E_DROP=publish,dedup leaves optional stages out, to see what each costs.
    let drop = std::env::var("HARTONOMOUS_E2E_DROP").unwrap_or_default();
    spec.stages.retain(|s| !drop.split(',').any(|d| s.get("name").and_then(|n| n.as_str()) == Some(d)));
    let mut store = ClickHouseConfig::new(clickhouse_url(), database.clone());
    store.migrate_on_start = true;
    let profile = Profile {
        data_dir: registry.parent().unwrap().to_path_buf(),
        log: LogProfile::Kafka(kafka_config()),
        store: StoreProfile::Clickhouse(store.clone()),
        registry: RegistryProfile::File(hartonomous::config::FileRegistryProfile { path: Some(registry.to_path_buf()) }),
        embedder: EmbedderProfile::Hashing(HashingProfile { dimension: DIMENSION, max_batch: 256 }),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    // With an address: serve /metrics there and scrape it every second, as Prometheus would.
    let scraper = listen.map(|addr| {
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(r) = client.get(format!("http://{addr}/metrics")).send().await {
                    let _ = r.text().await;
                }
            }
        })
    });
    let listen = listen.map_or(hartonomous::ops::Listen::Off, hartonomous::ops::Listen::On);
    let run = tokio::spawn(async move {
        hartonomous::app::run_kafka(&profile, &spec, listen, async move {
            let _ = stopped.await;
        })
        .await
    });
    // Wait until the processor has created and migrated the database.
    let check = loop {
        if let Ok(s) = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..store.clone() }).await {
            if s.query_scalar_u64("SELECT count() FROM atoms").await.is_ok() {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let c = check.query_scalar_u64("SELECT count() FROM atoms").await.unwrap();
        if c > 0 && first.is_none() {
            first = Some((Instant::now(), c));
        }
        if c >= n as u64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "{variant}: only {c} of {n} atoms");
        assert!(!run.is_finished(), "{variant}: the topology stopped early: {:?}", run.await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = Instant::now();
    if let Some(s) = scraper {
        s.abort();
    }
    stop.send(()).unwrap();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.count(counters::ATOMS_STORED), n as u64, "{variant}: {}", summary.render());
    assert_eq!(check.query_scalar_u64("SELECT count() FROM atoms FINAL").await.unwrap(), n as u64);
    let (t_first, c_first) = first.unwrap();
    let steady = if done > t_first { (n as u64 - c_first) as f64 / (done - t_first).as_secs_f64() } else { f64::NAN };
    (rate(n, done - started), steady)
}
