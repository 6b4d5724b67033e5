//! Ensemble-inference benchmark against the test services (tansu and
//! ClickHouse from `tests/services.sh up`), with the raw ceilings measured in
//! the same run:
//!
//! 1. produce N InferenceRequests (ensemble `sentiment`: three models,
//!    MAJORITY_VOTE) to a fresh 3-partition topic;
//! 2. **raw consume**: a bare rdkafka `BaseConsumer` reads the topic;
//! 3. **raw insert**: bare batched `clickhouse` crate inserts of what the
//!    topology stores for N requests (N `inference_results` rows and 3N
//!    `model_outputs` rows), in batches of 10,000;
//! 4. **raw model calls**: 3N bare `reqwest` calls to the three local model
//!    servers, 16 at a time per model (the topology's default quota);
//! 5. the ensemble-inference topology, in process, over the same topic into
//!    ClickHouse, once with three HTTP models (the local servers: keep-alive,
//!    generic JSON protocol, answering at once unless
//!    `HARTONOMOUS_INFER_MODEL_DELAY_MS` says otherwise) and once with the
//!    bundled declaration's built-in models;
//! 6. **latency**, HTTP variant, while it keeps running: M more requests
//!    produced at a steady half of the throughput measured in step 5; each
//!    request's latency is its result event's broker timestamp minus the
//!    time the request was handed to the producer (one clock: same machine).
//!
//! Throughput is steady state: results stored from the first stored result
//! on, so the consumer-group join is left out (and shown separately). Every
//! rate is also given as a share of the lowest ceiling. Nothing here is
//! asserted about speed; the run checks that every request got a result.
//!
//! ```sh
//! tests/services.sh up && eval "$(tests/services.sh env)"
//! cargo bench --bench inference        # N = 20,000 (HARTONOMOUS_INFER_REQUESTS overrides)
//! cargo test --bench inference         # smoke run, N = 300
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickhouse::Row;
use futures::StreamExt;
use hartonomous::avro::{self, FileRegistry, Schemas};
use hartonomous::config::{EmbedderProfile, HashingProfile, LogProfile, Profile, RegistryProfile, StoreProfile};
use hartonomous::log::LogProducer;
use hartonomous::log::kafka::{KafkaConfig, KafkaProducer, ensure_topics};
use hartonomous::record::OutgoingRecord;
use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use hartonomous::topology::spec::TopologySpec;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

mod common;

const PARTITIONS: i32 = 3;
/// The bundled ensemble `sentiment` names these; the HTTP variant gives
/// the same ids to the local servers, so one request set serves both.
const MODELS: [&str; 3] = ["similarity", "keywords", "lexicon"];
const LABELS: [&str; 3] = ["positive", "negative", "neutral"];
const PER_MODEL_QUOTA: usize = 16;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("HARTONOMOUS_INFER_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(if bench { 20_000 } else { 300 });
    let delay = Duration::from_millis(std::env::var("HARTONOMOUS_INFER_MODEL_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(n, bench, delay));
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

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn run(n: usize, bench: bool, delay: Duration) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let id = format!("infer_{}_{}", std::process::id(), now_ms());
    let topic = format!("{id}.requests");
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("registry.json");
    ensure_topics(&kafka_config(), &[(topic.as_str(), PARTITIONS)])
        .await
        .unwrap_or_else(|e| panic!("Kafka at {}: {e}; start the services with `tests/services.sh up`", kafka()));
    let servers = ModelServers::start(delay);

    // 1. Produce N requests.
    let requests = Requests::new(&registry_path, &topic);
    let producer = Arc::new(KafkaProducer::new(&kafka_config()).unwrap());
    let started = Instant::now();
    let sends = (0..n).map(|i| {
        let out = requests.record(&format!("t{i}"), i, None);
        let producer = &producer;
        async move { producer.send(out).await.unwrap() }
    });
    futures::stream::iter(sends).buffer_unordered(20_000).collect::<Vec<_>>().await;
    let produce = started.elapsed();

    // 2-4. The ceilings.
    let consume = common::raw_consume(&kafka(), &topic, PARTITIONS, n);
    let insert = raw_insert(&format!("{id}_raw"), n).await;
    let calls = raw_calls(&servers.urls, n).await;

    // 5-6. The topology.
    let m_for = |steady: f64| if bench { ((steady / 2.0) * 20.0).clamp(100.0, 20_000.0) as usize } else { 60 };
    let http = topology(&id, "http", &topic, &registry_path, Some(&servers.urls), n, &requests, &producer, m_for).await;
    // The built-in run reads the same topic, latency requests included.
    let on_topic = n + http.latency.as_ref().map_or(0, |l| l.requests);
    let builtin = topology(&id, "builtin", &topic, &registry_path, None, on_topic, &requests, &producer, |_| 0).await;

    let ceilings = [rate(n, consume), rate(n, insert), rate(n, calls)];
    let ceiling = ceilings.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "\nensemble-inference benchmark, {n} requests, 3 models each (MAJORITY_VOTE), {PARTITIONS} partitions, {} cores, model delay {} ms",
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        delay.as_millis()
    );
    println!("  {:<52} {:>10.0} requests/s", "produce (acks=all, idempotent)", rate(n, produce));
    println!("  {:<52} {:>10.0} requests/s", "raw consume (bare rdkafka)", ceilings[0]);
    println!("  {:<52} {:>10.0} requests/s", "raw insert (1 result + 3 output rows per request)", ceilings[1]);
    println!("  {:<52} {:>10.0} requests/s", "raw model calls (3 per request, 16 at a time each)", ceilings[2]);
    for (name, r) in [("topology, 3 HTTP models (local servers)", &http), ("topology, 3 built-in models", &builtin)] {
        println!(
            "  {:<52} {:>10.0} requests/s  ({:.2} of the lowest ceiling; {:.0} requests/s counting group join; {} requests, {} compensated)",
            name,
            r.steady,
            r.steady / ceiling,
            r.total,
            r.requests,
            r.compensated
        );
    }
    if let Some(l) = &http.latency {
        println!(
            "  latency, HTTP models, {} requests at {:.0} requests/s: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (request produced -> result on the broker)",
            l.requests, l.rate, l.p50, l.p90, l.p99, l.max
        );
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

struct Requests {
    topic: String,
    schema: std::sync::Arc<apache_avro::Schema>,
    schema_id: u32,
}

impl Requests {
    fn new(registry_path: &Path, topic: &str) -> Self {
        let registry = FileRegistry::open(registry_path).unwrap();
        let schema = Schemas::current("InferenceRequest").unwrap().schema.clone();
        let schema_id = registry.register_schema(&Schemas::subject(topic), &schema).unwrap();
        Self { topic: topic.to_string(), schema, schema_id }
    }

    /// Request `i` under correlation id `id`. The input carries a word the
    /// built-in models classify and the `#label=` the local servers answer.
    fn record(&self, id: &str, i: usize, event_time_ms: Option<i64>) -> OutgoingRecord {
        let label = LABELS[i % 3];
        let words = ["great, I love it, works perfectly", "terrible, broken, I want a refund", "what are your opening hours"][i % 3];
        let v = serde_json::json!({
            "request_id": format!("r{i}"),
            "input": format!("request {i}: {words} #label={label}"),
            "ensemble": "sentiment",
            "correlation_id": id,
        });
        let payload = avro::encode(self.schema_id, &self.schema, &avro::json_to_avro(&v, &self.schema).unwrap()).unwrap();
        OutgoingRecord { topic: self.topic.clone(), key: Some(id.as_bytes().to_vec()), payload, event_time_ms, ..Default::default() }
    }
}

// ---------------------------------------------------------------------------
// Local model servers: generic JSON protocol, HTTP/1.1 keep-alive
// ---------------------------------------------------------------------------

/// Three servers on a runtime of their own (one thread), so their work is
/// not scheduled among the topology's tasks. Each answers
/// `{"input": "... #label=x ..."}` with `{"label": "x", "score": 0.9}`.
struct ModelServers {
    urls: Vec<String>,
}

impl ModelServers {
    fn start(delay: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut urls = Vec::new();
                for _ in MODELS {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    urls.push(format!("http://{}/classify", listener.local_addr().unwrap()));
                    tokio::spawn(async move {
                        while let Ok((stream, _)) = listener.accept().await {
                            tokio::spawn(serve(stream, delay));
                        }
                    });
                }
                tx.send(urls).unwrap();
                std::future::pending::<()>().await
            })
        });
        Self { urls: rx.recv().unwrap() }
    }
}

async fn serve(stream: tokio::net::TcpStream, delay: Duration) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    while let Some(body) = common::read_request(&mut read).await {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let input = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["input"].as_str().map(String::from)).unwrap_or_default();
        let label = input.split("#label=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("none");
        let answer = serde_json::json!({"label": label, "score": 0.9}).to_string();
        let reply = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}", answer.len());
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Ceilings
// ---------------------------------------------------------------------------

#[derive(Row, Serialize)]
struct RawResult {
    source_topic: &'static str,
    source_partition: i32,
    source_offset: i64,
    request_id: String,
    correlation_id: String,
    status: &'static str,
    aggregation: &'static str,
    label: &'static str,
    score: f64,
    has_score: u8,
    models_asked: u32,
    models: &'static str,
    models_counted: u32,
    models_failed: u32,
    late_outputs: u32,
    flags: &'static str,
    ensemble: &'static str,
    completed_at_ms: u64,
    deleted: u8,
    version: u64,
}

#[derive(Row, Serialize)]
struct RawOutput {
    source_topic: &'static str,
    source_partition: i32,
    source_offset: i64,
    model_id: &'static str,
    request_id: String,
    correlation_id: String,
    model_version: &'static str,
    sequence: u32,
    label: &'static str,
    score: f64,
    has_score: u8,
    error: &'static str,
    latency_ms: u64,
    attempts: u32,
    hedged: u8,
    coalesced: u8,
    late: u8,
    counted: u8,
    flags: &'static str,
    answered_at_ms: u64,
    deleted: u8,
    version: u64,
}

/// What the topology stores for `n` requests, written with the bare
/// clickhouse crate: results and outputs in batches of 10,000 rows.
async fn raw_insert(database: &str, n: usize) -> Duration {
    let store = ClickHouseStore::connect(ClickHouseConfig::new(clickhouse_url(), database)).await.unwrap();
    store.migrate().await.unwrap();
    let client = clickhouse::Client::default().with_url(clickhouse_url()).with_database(database).with_validation(false);
    let results: Vec<RawResult> = (0..n)
        .map(|i| RawResult {
            source_topic: "raw",
            source_partition: 0,
            source_offset: i as i64,
            request_id: format!("r{i}"),
            correlation_id: format!("t{i}"),
            status: "completed",
            aggregation: "MAJORITY_VOTE",
            label: LABELS[i % 3],
            score: 0.9,
            has_score: 1,
            models_asked: 3,
            models: "similarity,keywords,lexicon",
            models_counted: 3,
            models_failed: 0,
            late_outputs: 0,
            flags: "",
            ensemble: "sentiment",
            completed_at_ms: 1_700_000_000_000,
            deleted: 0,
            version: 1,
        })
        .collect();
    let outputs: Vec<RawOutput> = (0..n * 3)
        .map(|j| RawOutput {
            source_topic: "raw",
            source_partition: 0,
            source_offset: (j / 3) as i64,
            model_id: MODELS[j % 3],
            request_id: format!("r{}", j / 3),
            correlation_id: format!("t{}", j / 3),
            model_version: "1",
            sequence: (j % 3) as u32,
            label: LABELS[(j / 3) % 3],
            score: 0.9,
            has_score: 1,
            error: "",
            latency_ms: 1,
            attempts: 1,
            hedged: 0,
            coalesced: 0,
            late: 0,
            counted: 1,
            flags: "",
            answered_at_ms: 1_700_000_000_000,
            deleted: 0,
            version: 1,
        })
        .collect();
    let started = Instant::now();
    for chunk in results.chunks(10_000) {
        let mut insert = client.insert::<RawResult>("inference_results").await.unwrap();
        for row in chunk {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }
    for chunk in outputs.chunks(10_000) {
        let mut insert = client.insert::<RawOutput>("model_outputs").await.unwrap();
        for row in chunk {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }
    let took = started.elapsed();
    assert_eq!(store.query_scalar_u64("SELECT count() FROM inference_results").await.unwrap(), n as u64);
    assert_eq!(store.query_scalar_u64("SELECT count() FROM model_outputs").await.unwrap(), 3 * n as u64);
    took
}

/// 3n calls, `PER_MODEL_QUOTA` at a time per model, with one pooled client.
async fn raw_calls(urls: &[String], n: usize) -> Duration {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let per_model = urls.iter().map(|url| {
        let client = &client;
        async move {
            futures::stream::iter(0..n)
                .map(|i| async move {
                    let body = serde_json::json!({"input": format!("request {i} #label={}", LABELS[i % 3])});
                    let answer: serde_json::Value = client.post(url.as_str()).json(&body).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
                    assert_eq!(answer["label"], LABELS[i % 3]);
                })
                .buffer_unordered(PER_MODEL_QUOTA)
                .collect::<Vec<_>>()
                .await
        }
    });
    futures::future::join_all(per_model).await;
    started.elapsed()
}

// ---------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------

struct Run {
    requests: usize,
    /// Requests per second counting the group join.
    total: f64,
    /// Requests per second from the first stored result on.
    steady: f64,
    compensated: u64,
    latency: Option<Latency>,
}

struct Latency {
    requests: usize,
    rate: f64,
    p50: i64,
    p90: i64,
    p99: i64,
    max: i64,
}

/// The bundled declaration over this run's topics; with `urls`, its three
/// built-in models replaced by HTTP models of the same ids.
fn declaration(id: &str, variant: &str, topic: &str, urls: Option<&[String]>) -> TopologySpec {
    let base = format!("{topic}.{variant}");
    let text = hartonomous::topology::find("ensemble-inference")
        .unwrap()
        .declaration()
        .replace("\"inference.requests.dlq\"", &format!("\"{base}.dlq\""))
        .replace("\"inference.requests\"", &format!("\"{topic}\""))
        .replace("\"inference.partial\"", &format!("\"{base}.partial\""))
        .replace("\"inference.results\"", &format!("\"{base}.results\""))
        .replace("\"inference.compensations\"", &format!("\"{base}.compensations\""));
    let mut spec = TopologySpec::parse(Path::new("bench"), &text).unwrap();
    spec.source.group = Some(format!("{id}.{variant}"));
    if let Some(urls) = urls {
        let invoke = spec.stages.iter_mut().find(|s| s.get("name").and_then(|n| n.as_str()) == Some("invoke")).expect("the bundled declaration has an invoke stage");
        let models: Vec<toml::Value> = MODELS
            .iter()
            .zip(urls)
            .map(|(m, url)| {
                toml::Value::Table(
                    toml::from_str(&format!("kind = \"http\"\nid = \"{m}\"\nbase_url = \"{url}\"\nprotocol = {{ kind = \"json\", label_pointer = \"/label\", score_pointer = \"/score\" }}"))
                        .unwrap(),
                )
            })
            .collect();
        invoke.insert("model".into(), toml::Value::Array(models));
    }
    spec
}

async fn ended(store: &ClickHouseStore) -> (u64, u64) {
    let results = store.query_scalar_u64("SELECT count() FROM inference_results").await.unwrap();
    let compensated = store.query_scalar_u64("SELECT uniqExact(correlation_id) FROM inference_compensations").await.unwrap();
    (results, compensated)
}

/// Runs the topology until every one of the `n` requests on the topic
/// ended (a stored result or a compensation), then, when `latency_requests`
/// asks for any, produces that many more at half the steady rate and reads
/// their results' timestamps.
#[allow(clippy::too_many_arguments)]
async fn topology(
    id: &str,
    variant: &str,
    topic: &str,
    registry: &Path,
    urls: Option<&[String]>,
    n: usize,
    requests: &Requests,
    producer: &Arc<KafkaProducer>,
    latency_requests: impl Fn(f64) -> usize,
) -> Run {
    let database = format!("{id}_{variant}");
    let spec = declaration(id, variant, topic, urls);
    let results_topic = format!("{topic}.{variant}.results");
    let mut store = ClickHouseConfig::new(clickhouse_url(), database.clone());
    store.migrate_on_start = true;
    let profile = Profile {
        data_dir: registry.parent().unwrap().to_path_buf(),
        log: LogProfile::Kafka(kafka_config()),
        store: StoreProfile::Clickhouse(store.clone()),
        registry: RegistryProfile::File(hartonomous::config::FileRegistryProfile { path: Some(registry.to_path_buf()) }),
        embedder: EmbedderProfile::Hashing(HashingProfile { dimension: 64, max_batch: 256 }),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let run = tokio::spawn(async move {
        hartonomous::app::run_kafka(&profile, &spec, hartonomous::ops::Listen::Off, async move {
            let _ = stopped.await;
        })
        .await
    });
    // Wait until the processor has created and migrated the database.
    let check = loop {
        if let Ok(s) = ClickHouseStore::connect(ClickHouseConfig { migrate_on_start: false, ..store.clone() }).await {
            if s.query_scalar_u64("SELECT count() FROM inference_compensations").await.is_ok() {
                break s;
            }
        }
        assert!(!run.is_finished(), "{variant}: the topology stopped early: {:?}", run.await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let wait_for = |target: u64| {
        let check = &check;
        let run = &run;
        async move {
            let mut first: Option<(Instant, u64)> = None;
            loop {
                let (r, c) = ended(check).await;
                if r + c > 0 && first.is_none() {
                    first = Some((Instant::now(), r + c));
                }
                if r + c >= target {
                    return (Instant::now(), first.unwrap());
                }
                assert!(started.elapsed() < Duration::from_secs(1800), "{variant}: only {r} results and {c} compensations of {target} requests");
                assert!(!run.is_finished(), "{variant}: the topology stopped early");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (done, (t_first, c_first)) = wait_for(n as u64).await;
    let steady = if done > t_first { (n as u64 - c_first) as f64 / (done - t_first).as_secs_f64() } else { f64::NAN };
    let total = rate(n, done - started);

    let m = latency_requests(steady);
    let latency = if m > 0 { Some(latency(requests, producer, &results_topic, m, (steady / 2.0).max(10.0), || wait_for((n + m) as u64)).await) } else { None };

    stop.send(()).unwrap();
    let summary = run.await.unwrap().unwrap();
    let (_, compensated) = ended(&check).await;
    let live = check.query_scalar_u64("SELECT count() FROM inference_results FINAL WHERE deleted = 0").await.unwrap();
    assert_eq!(live + compensated, (n + m) as u64, "{variant}: every request ends once\n{}", summary.render());
    Run { requests: n + m, total, steady, compensated, latency }
}

/// Produces `m` requests at `per_second`, waits for them to end, and reads
/// their results' broker timestamps from `results_topic`.
async fn latency<F: std::future::Future>(requests: &Requests, producer: &Arc<KafkaProducer>, results_topic: &str, m: usize, per_second: f64, ended: impl FnOnce() -> F) -> Latency {
    let mut sent_at: HashMap<String, i64> = HashMap::with_capacity(m);
    let mut sends = Vec::with_capacity(m);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut i = 0;
    while i < m {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * per_second) as usize + 1).min(m);
        while i < due {
            let id = format!("l{i}");
            let at = now_ms();
            // Inputs unlike the throughput phase's, so no answer is shared.
            let record = requests.record(&id, 1_000_000 + i, Some(at));
            sent_at.insert(id, at);
            let producer = producer.clone();
            sends.push(tokio::spawn(async move { producer.send(record).await.unwrap() }));
            i += 1;
        }
    }
    for s in sends {
        s.await.unwrap();
    }
    ended().await;

    // Every result event of this phase, by key (the correlation id).
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", kafka()).set("group.id", format!("{results_topic}.latency")).set("enable.auto.commit", "false").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(results_topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut latencies = Vec::with_capacity(m);
    let deadline = Instant::now() + Duration::from_secs(300);
    while latencies.len() < m {
        if let Some(msg) = consumer.poll(Duration::from_secs(1)) {
            let msg = msg.unwrap();
            let key = msg.key().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default();
            if let (Some(sent), Some(ts)) = (sent_at.remove(&key), msg.timestamp().to_millis()) {
                latencies.push(ts - sent);
            }
        }
        assert!(Instant::now() < deadline, "found the result events of only {} of {m} latency requests on {results_topic}", latencies.len());
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    Latency { requests: m, rate: per_second, p50: at(0.50), p90: at(0.90), p99: at(0.99), max: *latencies.last().unwrap() }
}
