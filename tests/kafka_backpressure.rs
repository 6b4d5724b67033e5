//! Backpressure and dead letters of the atom-ingestion topology on the real
//! broker, run in-process so its run report (the most it ever held in
//! flight) can be read: admission within the budget in records and bytes,
//! a budget that holds through a group rebalance while it is spent, a
//! dead-letter topic with fewer partitions than the source, and a dead
//! letter too large for the broker.
//!
//! Needs the broker of `tests/services.sh up` (`HARTONOMOUS_TEST_KAFKA`,
//! default `127.0.0.1:19092`); fails, saying so, when it is not reachable.
//! The store is the embedded one (ClickHouse is not what these test).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use hartonomous::topology::atom_ingestion::counters;
use hartonomous::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};
use hartonomous::avro::{FileRegistry, Schemas};
use hartonomous::dead_letter;
use hartonomous::embed::hashing::HashingEmbedder;
use hartonomous::flow::Metrics;
use hartonomous::flow::runner::{RunReport, Until};
use hartonomous::log::kafka::{KafkaConfig, KafkaConsumer, KafkaProducer, ensure_topics};
use hartonomous::log::{LogConsumer, LogProducer, PollLimit};
use hartonomous::record::{Headers, OutgoingRecord, Record};
use hartonomous::store::embedded::EmbeddedStore;
use hartonomous::store::{AtomStore, DeadLetterArchive, DeadLetterRow, InsertReport, StoreError};
use hartonomous::topology::{self, Deps, spec::TopologySpec};
use tokio::sync::watch;
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(90);

fn broker() -> KafkaConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let addr = std::env::var("HARTONOMOUS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let reachable = addr.split(',').filter_map(|a| a.trim().to_socket_addrs().ok()).flatten().any(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(3)).is_ok());
    assert!(reachable, "no Kafka broker reachable at {addr}: start one with `tests/services.sh up`, or set HARTONOMOUS_TEST_KAFKA");
    let mut c = KafkaConfig::new(addr);
    // tansu joins a group in about a second with these (INFRA.md).
    c.session_timeout_ms = 2000;
    c.heartbeat_interval_ms = 200;
    c.statistics_interval_ms = 500;
    c.properties.insert("message.timeout.ms".into(), "60000".into());
    c
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// The bundled topology on topics of its own.
fn spec(topic: &str, dlq: &str, out: &str, partitions: i32, edit: impl Fn(String) -> String) -> TopologySpec {
    let text = topology::TOPOLOGIES[0]
        .declaration()
        .replace("\"atoms.ingest.dlq\"", &format!("\"{dlq}\""))
        .replace("\"atoms.ingested\"", &format!("\"{out}\""))
        .replace("\"atoms.ingest\"", &format!("\"{topic}\""))
        .replace("partitions = 3", &format!("partitions = {partitions}\ngroup = \"{}\"", unique("bp-group")))
        .replace("commit_interval_ms = 1000", "commit_interval_ms = 200");
    TopologySpec::parse(std::path::Path::new("test.toml"), &edit(text)).unwrap()
}

/// An embedded store whose atom inserts wait while the gate is closed, as a
/// store outage would hold them.
struct GatedStore {
    inner: Arc<EmbeddedStore>,
    open: watch::Receiver<bool>,
}

impl AtomStore for GatedStore {
    fn find_atoms<'a>(&'a self, hashes: &'a [ContentHash]) -> BoxFuture<'a, Result<std::collections::HashMap<ContentHash, Vec<SourcePosition>>, StoreError>> {
        self.inner.find_atoms(hashes)
    }
    fn insert_atoms<'a>(&'a self, rows: &'a [AtomRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        Box::pin(async move {
            let mut open = self.open.clone();
            open.wait_for(|o| *o).await.unwrap();
            self.inner.insert_atoms(rows).await
        })
    }
    fn arrival_outcomes<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<std::collections::HashMap<SourcePosition, ArrivalOutcome>, StoreError>> {
        self.inner.arrival_outcomes(positions)
    }
    fn insert_arrivals<'a>(&'a self, rows: &'a [ArrivalRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        self.inner.insert_arrivals(rows)
    }
}

impl DeadLetterArchive for GatedStore {
    fn insert_dead_letters<'a>(&'a self, rows: &'a [DeadLetterRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        self.inner.insert_dead_letters(rows)
    }
}

struct Run {
    _dir: tempfile::TempDir,
    config: KafkaConfig,
    registry: Arc<FileRegistry>,
    store: Arc<EmbeddedStore>,
}

impl Run {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(FileRegistry::open(dir.path().join("registry.json")).unwrap());
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("data")).unwrap());
        Self { _dir: dir, config: broker(), registry, store }
    }

    fn deps(&self, store: Arc<dyn AtomStore>) -> Deps {
        Deps {
            producer: Arc::new(KafkaProducer::new(&self.config).unwrap()),
            registry: self.registry.clone(),
            store,
            inference: self.store.clone(),
            scan: Arc::new(hartonomous::log::kafka::KafkaScanner::new(&self.config)),
            embedder: Arc::new(HashingEmbedder::new(16, 256)),
            clock: hartonomous::clock::system(),
            metrics: Arc::new(Metrics::default()),
            breakers: Default::default(),
            cassette: None,
        }
    }

    /// Produces requests (Avro, current schema) with `content(i)` to `topic`,
    /// keyed by correlation id, and returns their correlation ids.
    async fn produce(&self, topic: &str, n: usize, content: impl Fn(usize) -> String) -> Vec<String> {
        self.registry.register_bundled(&[(topic, "AtomIngestionRequest")]).unwrap();
        let schema = &Schemas::current("AtomIngestionRequest").unwrap().schema;
        let id = self.registry.register_schema(&Schemas::subject(topic), schema).unwrap();
        let producer = KafkaProducer::new(&self.config).unwrap();
        let mut ids = Vec::new();
        let mut sends = Vec::new();
        for i in 0..n {
            let corr = format!("{topic}-{i}");
            let v = serde_json::json!({"content_type": "text/plain", "content": content(i), "metadata": {}, "source_system": "bp", "correlation_id": corr});
            let payload = hartonomous::avro::encode(id, schema, &hartonomous::avro::json_to_avro(&v, schema).unwrap()).unwrap();
            sends.push(OutgoingRecord { topic: topic.into(), key: Some(corr.clone().into_bytes()), payload, headers: Headers::new(), ..Default::default() });
            ids.push(corr);
        }
        for chunk in sends.chunks(500) {
            let sent = join_all(chunk.iter().map(|r| producer.send(r.clone()))).await;
            sent.into_iter().collect::<Result<Vec<_>, _>>().unwrap();
        }
        ids
    }
}

/// Every record of `topic` from the start (see `common::read_topic`).
async fn read_all(config: &KafkaConfig, topic: &str, expected: usize) -> Vec<Record> {
    common::read_topic(config, topic, expected, DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_polls_stay_within_the_record_and_byte_limits_and_lose_nothing() {
    let config = broker();
    let t = unique("limits");
    ensure_topics(&config, &[(&t, 2)]).await.unwrap();
    let producer = KafkaProducer::new(&config).unwrap();
    let sends = (0..400).map(|i| producer.send(OutgoingRecord { topic: t.clone(), key: Some(format!("k{i}").into_bytes()), payload: vec![b'x'; 100], ..Default::default() }));
    join_all(sends).await.into_iter().collect::<Result<Vec<_>, _>>().unwrap();
    let mut c = KafkaConsumer::new(&config, &unique("limits-group"), &[&t]).unwrap();
    let mut got: Vec<Record> = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let mut polls = 0;
    while got.len() < 400 {
        assert!(Instant::now() < deadline, "only {} of 400", got.len());
        // Alternate limits: nothing, a few records, a few hundred bytes.
        let limit = match polls % 3 {
            0 => PollLimit { records: 0, bytes: usize::MAX },
            1 => PollLimit::records(7),
            _ => PollLimit { records: 1000, bytes: 350 },
        };
        polls += 1;
        let batch = c.poll_bounded(limit, Duration::from_millis(100)).await.unwrap();
        let bytes: usize = batch.iter().map(Record::byte_len).sum();
        assert!(batch.len() <= limit.records, "{} records over a limit of {}", batch.len(), limit.records);
        assert!(batch.len() <= 1 || bytes <= limit.bytes, "{bytes} bytes over a limit of {}", limit.bytes);
        got.extend(batch);
    }
    // Every record once, in order per partition.
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in &got {
        by_partition.entry(r.position.tp.partition).or_default().push(r.position.offset);
    }
    for offsets in by_partition.values() {
        assert_eq!(offsets, &(0..offsets.len() as i64).collect::<Vec<_>>());
    }
    assert_eq!(got.len(), 400);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_budget_holds_through_a_rebalance_while_it_is_spent() {
    let run = Run::new();
    let (topic, dlq, out) = (unique("bp"), unique("bp-dlq"), unique("bp-out"));
    ensure_topics(&run.config, &[(&topic, 4), (&dlq, 4), (&out, 4)]).await.unwrap();
    let spec = spec(&topic, &dlq, &out, 4, |t| {
        t.replace("max_records = 5000", "max_records = 50")
            .replace("in_flight_records = 20000", "in_flight_records = 200")
            .replace("in_flight_bytes = 67108864", "in_flight_bytes = 150000")
            .replace("recent_capacity = 100000", "recent_capacity = 1000")
    });
    // About 1 KiB per record: the byte budget (150 KB) binds before the record budget (200).
    let n = 2_000;
    let ids = run.produce(&topic, n, |i| format!("{i} {}", "padding ".repeat(120))).await;

    let (gate, open) = watch::channel(false);
    let store: Arc<dyn AtomStore> = Arc::new(GatedStore { inner: run.store.clone(), open });
    let deps = run.deps(store);
    let metrics = deps.metrics.clone();
    let consumer = KafkaConsumer::new(&run.config, &spec.group(), &[topic.as_str()]).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let spec2 = spec.clone();
    let runner = tokio::spawn(async move {
        topology::run(&spec2, &deps, consumer, Until::Shutdown, async move {
            let _ = stopped.await;
        })
        .await
    });

    // The store holds every insert: the budget fills and the partitions pause.
    let deadline = Instant::now() + DEADLINE;
    while Metrics::get(&metrics.partition_pauses) == 0 {
        assert!(Instant::now() < deadline, "the partitions never paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second member joins while the budget is spent, reads what it is given
    // (without committing), then leaves: its partitions come back to the first
    // member, which must keep them paused.
    let mut other = KafkaConsumer::new(&run.config, &spec.group(), &[topic.as_str()]).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut taken = 0;
    while other.assignment().is_empty() || taken == 0 {
        assert!(Instant::now() < deadline, "the second member was never given partitions");
        taken += other.poll(100, Duration::from_millis(200)).await.unwrap().len();
    }
    let rebalances_seen = Metrics::get(&metrics.records_in);
    other.close().await;
    // Let the first member take everything back and sit on it for a while, budget still spent.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(Metrics::get(&metrics.records_in) <= rebalances_seen + 200, "records kept flowing in while the budget was spent");

    gate.send(true).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while metrics.value(counters::EVENTS_PUBLISHED) < n as u64 {
        assert!(Instant::now() < deadline, "only {} of {n} requests answered", metrics.value(counters::EVENTS_PUBLISHED));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.send(()).unwrap();
    let report: RunReport = runner.await.unwrap().unwrap();
    assert!(report.peak_in_flight_records <= 200, "peak {} records in flight", report.peak_in_flight_records);
    let biggest = 1_200; // one record, with key and headers
    assert!(report.peak_in_flight_bytes <= 150_000 + biggest, "peak {} bytes in flight", report.peak_in_flight_bytes);
    assert!(taken > 0, "the second member did read records before leaving");

    // Nothing lost: every request stored and answered.
    assert_eq!(run.store.atom_count(), n);
    let events = read_all(&run.config, &out, n).await;
    let answered: BTreeSet<String> = events
        .iter()
        .map(|r| {
            let (_, v) = futures::executor::block_on(hartonomous::avro::decode_message(run.registry.as_ref(), &Schemas::current("AtomIngested").unwrap().schema, &r.payload)).unwrap();
            apache_avro::from_value::<hartonomous::atom::AtomIngested>(&v).unwrap().correlation_id
        })
        .collect();
    assert_eq!(answered, ids.into_iter().collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_fit_a_smaller_dead_letter_topic_and_an_oversized_one_is_truncated_with_its_provenance() {
    let run = Run::new();
    let (topic, dlq, out) = (unique("dl"), unique("dl-dlq"), unique("dl-out"));
    // Four source partitions, one dead-letter partition.
    ensure_topics(&run.config, &[(&topic, 4), (&dlq, 1), (&out, 4)]).await.unwrap();
    let spec = spec(&topic, &dlq, &out, 4, |t| t);
    let good = run.produce(&topic, 40, |i| format!("fine content {i}")).await;
    let producer = KafkaProducer::new(&run.config).unwrap();
    // Garbage on every partition, and one record so large that its dead
    // letter (the record plus provenance headers) exceeds what the producer
    // may send (librdkafka's message.max.bytes, 1,000,000 by default).
    let mut bad = Vec::new();
    for p in 0..4 {
        bad.push(OutgoingRecord { topic: topic.clone(), partition: Some(p), key: Some(format!("garbage-{p}").into_bytes()), payload: vec![9, 9, 9], ..Default::default() });
    }
    let huge = vec![0x42u8; 999_800];
    bad.push(OutgoingRecord { topic: topic.clone(), partition: Some(2), key: Some(b"huge".to_vec()), payload: huge.clone(), ..Default::default() });
    join_all(bad.iter().map(|r| producer.send(r.clone()))).await.into_iter().collect::<Result<Vec<_>, _>>().unwrap();

    let deps = run.deps(run.store.clone());
    let metrics = deps.metrics.clone();
    let consumer = KafkaConsumer::new(&run.config, &spec.group(), &[topic.as_str()]).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let spec2 = spec.clone();
    let runner = tokio::spawn(async move {
        topology::run(&spec2, &deps, consumer, Until::Shutdown, async move {
            let _ = stopped.await;
        })
        .await
    });
    let deadline = Instant::now() + DEADLINE;
    while metrics.value(counters::EVENTS_PUBLISHED) < good.len() as u64 || run.store.dead_letter_count() < 5 {
        assert!(Instant::now() < deadline, "not done: {} events, {} dead letters", metrics.value(counters::EVENTS_PUBLISHED), run.store.dead_letter_count());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.send(()).unwrap();
    runner.await.unwrap().expect("no fatal stop");

    let letters = read_all(&run.config, &dlq, 5).await;
    assert_eq!(letters.len(), 5, "each malformed record once");
    assert!(letters.iter().all(|r| r.position.tp.partition == 0));
    let sources: BTreeSet<(i32, String)> = letters
        .iter()
        .map(|r| {
            let (t, p, _, stage, reason) = dead_letter::provenance(r).expect("provenance headers");
            assert_eq!((t.as_str(), stage.as_str(), reason.as_str()), (topic.as_str(), "decode", "decode.bad_magic"));
            (p, String::from_utf8(r.key.clone().unwrap()).unwrap())
        })
        .collect();
    assert_eq!(sources.len(), 5);
    let big = letters.iter().find(|r| r.key.as_deref() == Some(b"huge".as_slice())).unwrap();
    assert_eq!(big.headers.get_str(dead_letter::H_TRUNCATED), Some("999800"));
    assert_eq!(big.payload.len(), hartonomous::flow::runner::TRUNCATED_PAYLOAD_BYTES);
    assert_eq!(big.payload[..], huge[..big.payload.len()]);
    assert!(letters.iter().filter(|r| r.key.as_deref() != Some(b"huge".as_slice())).all(|r| r.headers.get(dead_letter::H_TRUNCATED).is_none() && r.payload == vec![9, 9, 9]));
    // The archive keeps the whole payload.
    let full = common::count_embedded(&run.store, "SELECT count(*) FROM dead_letters WHERE length(original_payload) = 999800").await;
    assert_eq!(full, 1);
}
