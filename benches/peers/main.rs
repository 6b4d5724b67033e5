//! Peers: Hartonomous against what users would otherwise run, on the same
//! input, the same services and in the same run (issue 10).
//!
//! Rows, each in a child process of its own (so each has its own peak RSS):
//! - **raw consume**: a bare rdkafka consumer reads the topic, no processing;
//! - **raw insert**: the clickhouse crate inserts N prepared `atoms` rows in
//!   batches of 10,000;
//! - **bare pipeline**: one plain loop on rdkafka and the clickhouse crate
//!   (`bare.rs`);
//! - **sentry_arroyo**: the same work on Sentry's streaming library
//!   (`arroyo.rs`);
//! - **hartonomous**: the atom-ingestion topology, as `hartonomous run` runs it.
//!
//! Every pipeline does the same per-record work (`work.rs`: decode, SHA-256,
//! 384-d hashing embedder, row, AtomIngested event) and is checked after its
//! run: the `atoms` table holds exactly N distinct hashes, the output topic
//! holds an event for every one of them, and both match the hashes of the
//! produced contents (an XOR of their first 8 bytes, computed here and in
//! ClickHouse), so no row is fast because it skipped work.
//!
//! The rate of a pipeline is steady-state: from the first stored row to the
//! last (the group join, which tansu makes slow, is left out; the total is
//! printed too). Each row also gives the CPU seconds it used and what the
//! broker (tansu), its storage (moto) and ClickHouse used meanwhile, so the
//! table shows which resource binds. Nothing is asserted about speed.
//!
//! ```sh
//! benches/peers/run.sh            # services, cmake if missing, then the bench (N = 100,000)
//! HARTONOMOUS_PEERS_RECORDS=20000 HARTONOMOUS_PEERS_ROWS=bare,hartonomous benches/peers/run.sh
//! ```

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hartonomous::avro::{self, FileRegistry, Schemas};
use hartonomous::log::LogProducer;
use hartonomous::log::kafka::{KafkaConfig, KafkaProducer, ensure_topics};
use hartonomous::record::OutgoingRecord;
use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use serde::{Deserialize, Serialize};

#[path = "../common/mod.rs"]
#[allow(dead_code)]
mod common;
mod arroyo;
mod bare;
mod own;
mod work;

const PARTITIONS: i32 = 3;
const ROWS: &[&str] = &["raw-consume", "raw-insert", "bare", "arroyo", "hartonomous", "latency"];
/// How long the latency row sends for, at half the rate Hartonomous reached.
const LATENCY_SECONDS: f64 = 20.0;

/// What a child process is told (as JSON in `HARTONOMOUS_PEERS_CHILD`).
#[derive(Serialize, Deserialize, Clone)]
pub struct Args {
    pub row: String,
    pub kafka: String,
    pub clickhouse: String,
    pub topic: String,
    pub out_topic: String,
    pub group: String,
    pub database: String,
    pub registry: PathBuf,
    pub n: usize,
    /// The latency row's sending rate, records/s.
    pub rate: f64,
    /// Where the hartonomous row serves /metrics (read before it is stopped).
    pub listen: Option<std::net::SocketAddr>,
}

/// Sends the bench's requests: number `i` is `record {i}: <filler>`, about
/// 1 KiB, keyed `c{i}`, in the Confluent wire format.
pub struct Producer {
    inner: KafkaProducer,
    schema: std::sync::Arc<apache_avro::Schema>,
    schema_id: u32,
    topic: String,
    filler: String,
}

impl Producer {
    pub fn new(args: &Args) -> Self {
        let registry = FileRegistry::open(&args.registry).unwrap();
        let schema = Schemas::current("AtomIngestionRequest").unwrap().schema.clone();
        let schema_id = registry.register_schema(&Schemas::subject(&args.topic), &schema).unwrap();
        let config = KafkaConfig::new(args.kafka.clone());
        Self { inner: KafkaProducer::new(&config).unwrap(), schema, schema_id, topic: args.topic.clone(), filler: "stream processing into clickhouse ".repeat(30) }
    }

    pub fn content(&self, i: usize) -> String {
        format!("record {i}: {}", &self.filler[..1000])
    }

    /// Sends request `i`; resolves when the broker acknowledged it.
    pub fn send(&self, i: usize) -> impl std::future::Future<Output = ()> + '_ {
        let v = serde_json::json!({
            "content_type": "text/plain",
            "content": self.content(i),
            "metadata": {"i": i.to_string()},
            "source_system": "bench",
            "correlation_id": format!("c{i}"),
        });
        let payload = avro::encode(self.schema_id, &self.schema, &avro::json_to_avro(&v, &self.schema).unwrap()).unwrap();
        let out = OutgoingRecord { topic: self.topic.clone(), key: Some(format!("c{i}").into_bytes()), payload, ..Default::default() };
        async move {
            self.inner.send(out).await.unwrap();
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if let Ok(json) = std::env::var("HARTONOMOUS_PEERS_CHILD") {
        let args: Args = serde_json::from_str(&json).unwrap();
        return rt.block_on(child(args));
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("HARTONOMOUS_PEERS_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(if bench { 100_000 } else { 2_000 });
    rt.block_on(orchestrate(n));
}

async fn child(args: Args) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match args.row.as_str() {
        "raw-consume" => {
            let took = common::raw_consume(&args.kafka, &args.topic, PARTITIONS, args.n);
            println!("TOOK {}", took.as_secs_f64());
        }
        "raw-insert" => {
            let took = raw_insert(&args).await;
            println!("TOOK {}", took.as_secs_f64());
        }
        "bare" => bare::run(&args).await,
        "arroyo" => {
            let args = args.clone();
            tokio::task::spawn_blocking(move || arroyo::run(&args)).await.unwrap()
        }
        "hartonomous" => own::run(&args).await,
        "latency" => own::latency(&args, args.rate).await,
        other => panic!("unknown row {other}"),
    }
}

// ---- the orchestrator ----

struct Outcome {
    row: &'static str,
    rate: f64,
    total_rate: f64,
    peak_rss_kib: u64,
    /// CPU seconds and wall seconds of the steady part only (pipelines:
    /// first stored row to last), where the rate is measured.
    steady_cpu: Cpu,
    steady_wall: f64,
    check: String,
}

#[derive(Default, Clone, Copy)]
struct Cpu {
    own: f64,
    tansu: f64,
    moto: f64,
    clickhouse: f64,
}

async fn orchestrate(n: usize) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kafka = std::env::var("HARTONOMOUS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let clickhouse = std::env::var("HARTONOMOUS_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:18123".into());
    // In the order given (the latency row needs the hartonomous row before it).
    let rows: Vec<&'static str> = match std::env::var("HARTONOMOUS_PEERS_ROWS") {
        Ok(list) => list.split(',').filter_map(|x| ROWS.iter().copied().find(|r| *r == x.trim())).collect(),
        Err(_) => ROWS.to_vec(),
    };
    let id = format!("peers_{}_{}", std::process::id(), work::now_ms());
    let topic = format!("{id}.ingest");
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.json");
    let mut config = KafkaConfig::new(kafka.clone());
    config.create_topics = true;
    let config = config;
    let outs: Vec<String> = rows.iter().map(|r| format!("{topic}.{r}.out")).collect();
    let mut topics: Vec<(&str, i32)> = vec![(topic.as_str(), PARTITIONS)];
    topics.extend(outs.iter().map(|t| (t.as_str(), PARTITIONS)));
    ensure_topics(&config, &topics).await.unwrap_or_else(|e| panic!("Kafka at {kafka}: {e}; start the services with `tests/services.sh up`"));

    let base = Args {
        row: String::new(),
        kafka,
        clickhouse: clickhouse.clone(),
        topic: topic.clone(),
        out_topic: String::new(),
        group: String::new(),
        database: String::new(),
        registry,
        n,
        rate: 0.0,
        listen: None,
    };
    // The input: N requests of about 1 KiB, and what their hashes XOR to.
    let expected = produce(&base).await;
    let mut results = Vec::new();
    for (row, out) in rows.iter().zip(&outs) {
        let args = Args {
            row: row.to_string(),
            out_topic: out.clone(),
            group: format!("{id}.{row}"),
            database: format!("{id}_{}", row.replace('-', "_")),
            listen: (*row == "hartonomous").then(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()),
            ..base.clone()
        };
        eprintln!("peers: running {row}");
        let outcome = match *row {
            "raw-consume" | "raw-insert" => ceiling(row, &args).await,
            "latency" => {
                let Some(own) = results.iter().find(|r: &&Outcome| r.row == "hartonomous") else {
                    eprintln!("peers: the latency row needs the hartonomous row's rate; add `hartonomous` to HARTONOMOUS_PEERS_ROWS");
                    continue;
                };
                // Half the measured rate, as the target says; other shares
                // (HARTONOMOUS_PEERS_LATENCY_SHARE=0.25) find where it holds.
                let share = std::env::var("HARTONOMOUS_PEERS_LATENCY_SHARE").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.5);
                let rate = own.rate * share;
                let args = Args { topic: format!("{topic}.latency"), rate, n: ((rate * LATENCY_SECONDS) as usize).max(1_000), ..args };
                ensure_topics(&config, &[(args.topic.as_str(), PARTITIONS), (args.out_topic.as_str(), PARTITIONS)]).await.unwrap();
                latency_row(&args).await
            }
            _ => pipeline(row, &args, expected).await,
        };
        results.push(outcome);
    }
    print_table(n, &results);
}

/// Runs a row that measures itself to its end: its stdout, wall seconds,
/// peak RSS and the CPU it and the services used meanwhile.
fn run_to_end(row: &str, args: &Args) -> (String, f64, u64, Cpu) {
    let before = services_cpu();
    let started = Instant::now();
    let child = spawn(args);
    let pid = child.id();
    let rss = std::thread::spawn(move || peak_rss_until_exit(pid));
    let output = child.wait_with_output().unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(output.status.success(), "the {row} row failed");
    let (peak_rss_kib, own) = rss.join().unwrap();
    let mut cpu = services_cpu().minus(before);
    cpu.own = own;
    (String::from_utf8_lossy(&output.stdout).into_owned(), wall, peak_rss_kib, cpu)
}

async fn latency_row(args: &Args) -> Outcome {
    let (text, wall, peak_rss_kib, cpu) = run_to_end("latency", args);
    let line: Vec<String> = text.lines().find_map(|l| l.strip_prefix("LATENCY ")).unwrap().split(' ').map(str::to_string).collect();
    let sent: f64 = line[3].parse().unwrap();
    Outcome {
        row: "latency",
        rate: sent,
        total_rate: sent,
        peak_rss_kib,
        steady_cpu: cpu,
        steady_wall: wall,
        check: format!("p50 ≤ {} s, p99 ≤ {} s, max ≤ {} s at {sent:.0}/s; {} stored + answered", line[0], line[1], line[2], args.n + 1),
    }
}

async fn produce(args: &Args) -> u64 {
    let producer = Producer::new(args);
    let expected = (0..args.n).fold(0u64, |x, i| x ^ xor_key(&hartonomous::atom::ContentHash::of(producer.content(i).as_bytes()).0));
    futures::stream::iter((0..args.n).map(|i| producer.send(i))).buffer_unordered(20_000).collect::<Vec<_>>().await;
    expected
}

/// The first 8 bytes of a SHA-256, little-endian: what ClickHouse's
/// `reinterpretAsUInt64(unhex(substring(content_hash, 1, 16)))` gives.
fn xor_key(hash: &[u8]) -> u64 {
    u64::from_le_bytes(hash[..8].try_into().unwrap())
}

fn spawn(args: &Args) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("HARTONOMOUS_PEERS_CHILD", serde_json::to_string(args).unwrap())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

async fn ceiling(row: &'static str, args: &Args) -> Outcome {
    if row == "raw-insert" {
        store(args).await;
    }
    let (text, wall, peak_rss_kib, cpu) = run_to_end(row, args);
    let took: f64 = text.lines().find_map(|l| l.strip_prefix("TOOK ")).unwrap().parse().unwrap();
    Outcome { row, rate: args.n as f64 / took, total_rate: args.n as f64 / took, peak_rss_kib, steady_cpu: cpu, steady_wall: wall, check: "n records".into() }
}

async fn store(args: &Args) -> ClickHouseStore {
    let store = ClickHouseStore::connect(ClickHouseConfig::new(args.clickhouse.clone(), args.database.clone())).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn pipeline(row: &'static str, args: &Args, expected: u64) -> Outcome {
    let store = store(args).await;
    let n = args.n as u64;
    let started = Instant::now();
    let mut child = spawn(args);
    let pid = child.id();
    let mut first: Option<(Instant, u64)> = None;
    let mut at_first = Cpu::default();
    let mut perf: Option<Child> = None;
    let mut peak = 0;
    loop {
        let c = store.query_scalar_u64("SELECT count() FROM atoms").await.unwrap();
        if c > 0 && first.is_none() {
            first = Some((Instant::now(), c));
            at_first = services_cpu().with_own(pid);
            perf = profile(row, pid);
        }
        peak = peak.max(rss_kib(pid).0);
        if c >= n {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{row} exited early ({status}) with {c} of {n} rows stored");
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "{row}: only {c} of {n} rows after 30 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = Instant::now();
    let wall = (done - started).as_secs_f64();
    let at_done = services_cpu().with_own(pid);
    if let Some(mut p) = perf {
        // SIGINT: perf writes its file and exits.
        let _ = Command::new("kill").args(["-INT", &p.id().to_string()]).status();
        let _ = p.wait();
    }
    peak = peak.max(rss_kib(pid).0);
    // The outputs, with the pipeline still running (its last events may be in flight).
    let stored = store
        .query_scalar_u64("SELECT count() FROM atoms FINAL")
        .await
        .unwrap();
    let distinct = store.query_scalar_u64("SELECT uniqExact(content_hash) FROM atoms FINAL").await.unwrap();
    let dims = store.query_scalar_u64("SELECT countIf(length(embedding) != 384) FROM atoms FINAL").await.unwrap();
    let xor = store.query_scalar_u64("SELECT groupBitXor(reinterpretAsUInt64(unhex(substring(content_hash, 1, 16)))) FROM atoms FINAL").await.unwrap();
    let (events, events_xor) = read_events(&args.kafka, &args.out_topic, args.n);
    if let Some(addr) = args.listen {
        stage_times(addr).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((stored, distinct, dims), (n, n, 0), "{row}: atoms FINAL count, distinct hashes, rows without a 384-d embedding");
    assert_eq!(xor, expected, "{row}: the stored hashes are not those of the produced contents");
    assert_eq!(events, args.n, "{row}: distinct events on {}", args.out_topic);
    assert_eq!(events_xor, expected, "{row}: the events' keys are not the produced contents' hashes");
    let (t_first, c_first) = first.unwrap();
    let steady = if done > t_first { (n - c_first) as f64 / (done - t_first).as_secs_f64() } else { f64::NAN };
    Outcome {
        row,
        rate: steady,
        total_rate: n as f64 / wall,
        peak_rss_kib: peak,
        steady_cpu: at_done.minus(at_first),
        steady_wall: (done - t_first).as_secs_f64(),
        check: format!("{n} atoms, {events} events ok"),
    }
}

/// Prints the mean time per window of each stage of a running processor,
/// from its `/metrics`: where a window's time goes.
async fn stage_times(addr: std::net::SocketAddr) {
    let Ok(text) = reqwest::get(format!("http://{addr}/metrics")).await.and_then(|r| r.error_for_status()) else { return };
    let text = text.text().await.unwrap_or_default();
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut stages: Vec<(String, f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("hartonomous_stage_latency_seconds_sum{")) {
        let stage = line.split("stage=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?").to_string();
        let count = text
            .lines()
            .find(|l| l.starts_with("hartonomous_stage_latency_seconds_count{") && l.contains(&format!("stage=\"{stage}\"")))
            .map(value)
            .unwrap_or(0.0);
        stages.push((stage, value(line), count));
    }
    let e2e_sum = text.lines().find(|l| l.starts_with("hartonomous_record_end_to_end_seconds_sum")).map(value).unwrap_or(0.0);
    let e2e_count = text.lines().find(|l| l.starts_with("hartonomous_record_end_to_end_seconds_count")).map(value).unwrap_or(0.0);
    let pauses = text.lines().find(|l| l.starts_with("hartonomous_partition_pauses_total")).map(value).unwrap_or(0.0);
    let line: Vec<String> = stages.iter().map(|(s, sum, n)| format!("{s} {:.0} ms × {n:.0}", 1000.0 * sum / n.max(1.0))).collect();
    eprintln!("peers: hartonomous, mean time per window: {}; record end-to-end mean {:.2} s; {pauses} pauses", line.join(", "), e2e_sum / e2e_count.max(1.0));
}

/// Reads `topic` from the beginning until `n` distinct keys (content hashes,
/// hex) were seen, or 120 s passed; returns their count and XOR key.
fn read_events(kafka: &str, topic: &str, n: usize) -> (usize, u64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", format!("{topic}.check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut xor = 0u64;
    let started = Instant::now();
    while seen.len() < n && started.elapsed() < Duration::from_secs(120) {
        if let Some(m) = consumer.poll(Duration::from_secs(1)) {
            let m = m.unwrap();
            let key = m.key().unwrap_or_default().to_vec();
            if seen.insert(key.clone()) {
                xor ^= xor_key(&hex::decode(&key).unwrap());
            }
        }
    }
    (seen.len(), xor)
}

// ---- the ceilings, in the child ----

async fn raw_insert(args: &Args) -> Duration {
    let client = clickhouse::Client::default().with_url(&args.clickhouse).with_database(&args.database).with_validation(false);
    let filler = "stream processing into clickhouse ".repeat(30);
    let embedding: Vec<f32> = (0..work::DIMENSION).map(|i| (i as f32) / work::DIMENSION as f32).collect();
    let now = work::now_ms();
    let mut spent = Duration::ZERO;
    for chunk in (0..args.n).collect::<Vec<_>>().chunks(10_000) {
        // Rows are built per batch, so the ceiling's memory stays that of one batch.
        let rows: Vec<work::AtomRowCh> = chunk
            .iter()
            .map(|&i| {
                let content = format!("record {i}: {}", &filler[..1000]);
                work::AtomRowCh {
                    content_hash: hex::encode(hartonomous::atom::ContentHash::of(content.as_bytes()).0),
                    content_type: "text/plain".into(),
                    content_size: content.len() as u64,
                    content,
                    source_system: "bench".into(),
                    correlation_id: format!("c{i}"),
                    metadata: "{}".into(),
                    embedding: embedding.clone(),
                    embedding_model: "raw",
                    embedding_dimension: work::DIMENSION as u32,
                    event_time: (now / 1000) as u32,
                    event_time_ms: now,
                    source_topic: "raw".into(),
                    source_partition: 0,
                    source_offset: i as i64,
                    ingested_at: (now / 1000) as u32,
                    ingested_at_ms: now as u64,
                    trace_id: "",
                }
            })
            .collect();
        let t = Instant::now();
        let mut insert = client.insert::<work::AtomRowCh>("atoms").await.unwrap();
        for row in &rows {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
        // Only the insert counts: building the rows is not the store's work.
        spent += t.elapsed();
    }
    spent
}

// ---- measuring processes ----

/// With `HARTONOMOUS_PEERS_PERF=DIR`, records a `perf` profile (call graphs,
/// 499 Hz) of the pipeline's steady part into `DIR/<row>.perf.data`.
fn profile(row: &str, pid: u32) -> Option<Child> {
    let dir = std::env::var("HARTONOMOUS_PEERS_PERF").ok()?;
    std::fs::create_dir_all(&dir).ok()?;
    Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o", &format!("{dir}/{row}.perf.data"), "-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

/// (VmHWM in KiB, CPU seconds) of a live process; zeros once it is gone.
fn rss_kib(pid: u32) -> (u64, f64) {
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))))
        .unwrap_or(0);
    (hwm, cpu_seconds(pid))
}

/// Polls a child's peak RSS and CPU until it exits; returns the last values seen.
fn peak_rss_until_exit(pid: u32) -> (u64, f64) {
    let mut last = (0, 0.0);
    loop {
        let now = rss_kib(pid);
        if now.0 == 0 {
            return last;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn service_pid(name: &str) -> Option<u32> {
    let cache = std::env::var("HARTONOMOUS_CACHE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/hartonomous"));
    std::fs::read_to_string(cache.join("services").join(name).join("pid")).ok()?.trim().parse().ok()
}

fn services_cpu() -> Cpu {
    let of = |name| service_pid(name).map_or(0.0, cpu_seconds);
    Cpu { own: 0.0, tansu: of("kafka"), moto: of("s3"), clickhouse: of("clickhouse") }
}

impl Cpu {
    fn total(&self) -> f64 {
        self.own + self.tansu + self.moto + self.clickhouse
    }

    fn with_own(mut self, pid: u32) -> Cpu {
        self.own = cpu_seconds(pid);
        self
    }

    fn minus(self, before: Cpu) -> Cpu {
        Cpu { own: self.own - before.own, tansu: self.tansu - before.tansu, moto: self.moto - before.moto, clickhouse: self.clickhouse - before.clickhouse }
    }
}

fn print_table(n: usize, results: &[Outcome]) {
    let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
    let lower = results.iter().filter(|r| r.row.starts_with("raw-")).map(|r| r.rate).fold(f64::INFINITY, f64::min);
    let bare = results.iter().find(|r| r.row == "bare").map(|r| r.rate);
    println!("\npeers: {n} records of ~1 KiB, {PARTITIONS} partitions, 384-d hashing embedder, {cores} cores shared with tansu, moto and ClickHouse");
    println!(
        "| {:<12} | {:>10} | {:>8} | {:>7} | {:>10} | {:>9} | {:>27} | {:>6} | {} |",
        "row", "records/s", "ceiling×", "bare×", "with join", "peak RSS", "CPU µs/record own+tansu+moto+ch", "busy", "outputs checked"
    );
    println!("|{}|", ["-"; 9].map(|_| "---").join("|"));
    for r in results {
        let ratio = if lower.is_finite() { format!("{:.2}", r.rate / lower) } else { "-".into() };
        let vs_bare = bare.map_or("-".into(), |b| format!("{:.2}", r.rate / b));
        // Per record of the steady part: (first row to last) × rate = records in it.
        let records = (r.rate * r.steady_wall).max(1.0);
        let us = |s: f64| 1e6 * s / records;
        let c = &r.steady_cpu;
        println!(
            "| {:<12} | {:>10.0} | {:>8} | {:>7} | {:>10.0} | {:>5} MiB | {:>5.1} = {:>4.1}+{:>4.1}+{:>4.1}+{:>4.1} | {:>5.0}% | {} |",
            r.row,
            r.rate,
            ratio,
            vs_bare,
            r.total_rate,
            r.peak_rss_kib / 1024,
            us(c.total()),
            us(c.own),
            us(c.tansu),
            us(c.moto),
            us(c.clickhouse),
            100.0 * c.total() / (r.steady_wall * cores as f64),
            r.check
        );
    }
    println!("records/s: steady rate (pipelines: from the first stored row to the last); ceiling×: ratio to the lower raw ceiling; with join: counting start-up and the group join;");
    println!("CPU: seconds of the row's process, tansu, moto (tansu's S3 storage) and ClickHouse per record, over the steady part; busy: their sum over its wall time × {cores} cores.");
}
