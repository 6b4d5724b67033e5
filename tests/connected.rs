//! The processor as a real process against the real broker (tansu) and a
//! real ClickHouse, both started by `tests/services.sh up`: the full
//! workflow, crash safety under kill -9, a ClickHouse outage, scale-out, and
//! a broker restart. These tests stop and start the shared services, so they
//! run one at a time (see `SERIAL`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hartonomous::atom::ContentHash;
use hartonomous::avro::{self, FileRegistry, Schemas};
use hartonomous::dead_letter;
use hartonomous::log::kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
use hartonomous::log::{LogConsumer, LogProducer};
use hartonomous::record::{Headers, OutgoingRecord, Record};
use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore};

static SERIAL: Mutex<()> = Mutex::new(());

fn kafka_addr() -> String {
    std::env::var("HARTONOMOUS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

fn clickhouse_url() -> String {
    std::env::var("HARTONOMOUS_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

fn services() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/services.sh")
}

/// Fails loudly when a service is missing: these tests never skip.
fn require_services() {
    let kafka = kafka_addr();
    let ch = clickhouse_url().trim_start_matches("http://").to_string();
    for (name, addr) in [("Kafka", kafka.as_str()), ("ClickHouse", ch.as_str())] {
        let sock: std::net::SocketAddr = addr.parse().unwrap_or_else(|_| panic!("{name} address {addr} is not host:port"));
        if std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).is_err() {
            panic!("{name} is not reachable at {addr}: start the test services with `tests/services.sh up` (tests/run.sh does this)");
        }
    }
}

fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{}", std::process::id(), nanos, N.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
}

fn kafka_config() -> KafkaConfig {
    let mut k = KafkaConfig::default();
    k.bootstrap_servers = kafka_addr();
    k.session_timeout_ms = 6000;
    k.heartbeat_interval_ms = 500;
    k.create_topics = true;
    k
}

/// One scenario's topics, database, registry and processor configuration.
struct Setup {
    dir: tempfile::TempDir,
    topic: String,
    dlq: String,
    out: String,
    database: String,
    profile: PathBuf,
    topology: PathBuf,
    partitions: i32,
}

impl Setup {
    async fn new(name: &str, partitions: i32) -> Self {
        require_services();
        let dir = tempfile::tempdir().unwrap();
        let id = unique(name);
        let (topic, dlq, out, database) = (format!("{id}.ingest"), format!("{id}.ingest.dlq"), format!("{id}.ingested"), format!("hx_{id}"));
        let profile = dir.path().join("profile.toml");
        std::fs::write(
            &profile,
            format!(
                r#"data_dir = "{data}"

[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
session_timeout_ms = 6000
heartbeat_interval_ms = 500
create_topics = true

[store]
kind = "clickhouse"
url = "{ch}"
database = "{database}"

[registry]
kind = "file"
path = "{registry}"

[embedder]
kind = "hashing"
dimension = 64
max_batch = 256
"#,
                data = dir.path().join("data").display(),
                kafka = kafka_addr(),
                ch = clickhouse_url(),
                registry = dir.path().join("registry.json").display(),
            ),
        )
        .unwrap();
        let topology = dir.path().join("topology.toml");
        let text = hartonomous::topology::BUNDLED[0]
            .1
            .replace("\"atoms.ingest.dlq\"", &format!("\"{dlq}\""))
            .replace("\"atoms.ingested\"", &format!("\"{out}\""))
            .replace("\"atoms.ingest\"", &format!("\"{topic}\""))
            .replace("partitions = 3", &format!("partitions = {partitions}"))
            .replace("commit_interval_ms = 1000", "commit_interval_ms = 200")
            .replace("max_records = 5000", "max_records = 200");
        std::fs::write(&topology, text).unwrap();
        let s = Self { dir, topic, dlq, out, database, profile, topology, partitions };
        // Topics exist before anyone produces, with the partition count of the declaration.
        hartonomous::log::kafka::ensure_topics(&kafka_config(), &[(s.topic.as_str(), partitions), (s.dlq.as_str(), partitions), (s.out.as_str(), partitions)])
            .await
            .unwrap();
        // The tables exist before any processor starts (its own migration is then a no-op).
        ClickHouseStore::connect(ClickHouseConfig::new(clickhouse_url(), s.database.clone())).await.unwrap().migrate().await.unwrap();
        s
    }

    fn registry(&self) -> FileRegistry {
        let r = FileRegistry::open(self.dir.path().join("registry.json")).unwrap();
        r.register_bundled(&[(self.topic.as_str(), "AtomIngestionRequest")]).unwrap();
        r
    }

    /// Encodes requests as Avro (current schema) in the wire format; `Raw`
    /// entries are sent as they are.
    async fn produce(&self, inputs: &[Input]) {
        let registry = self.registry();
        let schema = &Schemas::current("AtomIngestionRequest").unwrap().schema;
        let id = registry.register_schema(&Schemas::subject(&self.topic), schema).unwrap();
        let producer = KafkaProducer::new(&kafka_config()).unwrap();
        let sends = inputs.iter().map(|i| {
            let (key, payload) = match i {
                Input::Request(v) => {
                    let key = v["correlation_id"].as_str().unwrap().as_bytes().to_vec();
                    (key, avro::encode(id, schema, &avro::json_to_avro(v, schema).unwrap()).unwrap())
                }
                Input::Raw(key, payload) => (key.as_bytes().to_vec(), payload.clone()),
            };
            producer.send(OutgoingRecord { topic: self.topic.clone(), key: Some(key), payload, headers: Headers::new(), ..Default::default() })
        });
        futures::future::try_join_all(sends).await.unwrap();
    }

    fn spawn(&self, name: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_hartonomous"))
            .args(["--connectors", self.profile.to_str().unwrap(), "run", "--topology-file", self.topology.to_str().unwrap()])
            .env("RUST_LOG", "hartonomous=debug,rdkafka=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    async fn store(&self) -> ClickHouseStore {
        let mut c = ClickHouseConfig::new(clickhouse_url(), self.database.clone());
        c.migrate_on_start = false;
        ClickHouseStore::connect(c).await.unwrap()
    }

    async fn scalar(&self, sql: &str) -> u64 {
        let store = self.store().await;
        let mut last = None;
        // The database appears once the processor has migrated it.
        for _ in 0..3 {
            match store.query_scalar_u64(sql).await {
                Ok(v) => return v,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("{sql}: {last:?}")
    }

    /// Runs a statement that is not a query (the store's query API is read-only).
    async fn execute(&self, sql: &str) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = format!("{}/?database={}", clickhouse_url(), self.database);
        let resp = reqwest::Client::new().post(url).body(sql.to_string()).send().await.unwrap();
        let status = resp.status();
        assert!(status.is_success(), "{sql}: {status} {}", resp.text().await.unwrap_or_default());
    }

    async fn atoms_final(&self) -> u64 {
        self.scalar("SELECT count() FROM atoms FINAL").await
    }

    async fn hashes_final(&self) -> BTreeSet<String> {
        let store = self.store().await;
        let text = store.query_text("SELECT content_hash FROM atoms FINAL ORDER BY content_hash FORMAT TabSeparated").await.unwrap();
        text.lines().map(str::to_string).collect()
    }

    /// Every record on `topic`, read from the start by a fresh group, once
    /// `expected` records are there and no more arrive for a moment.
    async fn read_topic(&self, topic: &str, expected: usize) -> Vec<Record> {
        let mut consumer = KafkaConsumer::new(&kafka_config(), &unique("reader"), &[topic]).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            let got = consumer.poll(1000, Duration::from_millis(200)).await.unwrap();
            if got.is_empty() {
                if out.len() >= expected && quiet_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            } else {
                quiet_since = Instant::now();
                out.extend(got);
            }
        }
        out
    }
}

#[derive(Clone)]
enum Input {
    Request(serde_json::Value),
    Raw(String, Vec<u8>),
}

/// `unique` distinct contents, `dups` repeats, and malformed records of each kind.
fn workload(tag: &str, unique: usize, dups: usize) -> (Vec<Input>, BTreeSet<String>, usize) {
    let mut inputs = Vec::new();
    let mut hashes = BTreeSet::new();
    let content = |i: usize| format!("{tag} content {i} {}", "payload text ".repeat(60));
    for i in 0..unique {
        hashes.insert(ContentHash::of(content(i).as_bytes()).to_hex());
        let source = ["wiki", "crm", "support"][i % 3];
        inputs.push(Input::Request(serde_json::json!({
            "content_type": "text/plain", "content": content(i), "metadata": {"i": i.to_string()},
            "source_system": source, "correlation_id": format!("{tag}-{i}"),
        })));
    }
    for j in 0..dups {
        inputs.push(Input::Request(serde_json::json!({
            "content_type": "text/plain", "content": content((j * 31) % unique), "metadata": {},
            "source_system": "mirror", "correlation_id": format!("{tag}-dup-{j}"),
        })));
    }
    let bad = vec![
        Input::Raw(format!("{tag}-bad-magic"), vec![7, 0, 0, 0, 1, 2, 3]),
        Input::Raw(format!("{tag}-bad-short"), vec![0, 0]),
        Input::Raw(format!("{tag}-bad-unknown-id"), vec![0, 0, 0, 0x7f, 0xff, 2, 2]),
        Input::Request(serde_json::json!({"content_type": "image/gif", "content": "gif", "metadata": {}, "source_system": "s", "correlation_id": format!("{tag}-bad-type")})),
        Input::Request(serde_json::json!({"content_type": "text/plain", "content": "", "metadata": {}, "source_system": "s", "correlation_id": format!("{tag}-bad-empty")})),
        Input::Request(serde_json::json!({"content_type": "text/plain", "content": [0xc3, 0x28], "metadata": {}, "source_system": "s", "correlation_id": format!("{tag}-bad-utf8")})),
    ];
    let b = bad.len();
    for (k, r) in bad.into_iter().enumerate() {
        let at = (k * 97 + 13) % inputs.len();
        inputs.insert(at, r);
    }
    (inputs, hashes, b)
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "processor did not stop within 60 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Distinct source positions of the dead letters on the DLQ topic (a crash
/// may repeat a dead letter; none may go missing).
fn dead_letter_positions(records: &[Record]) -> BTreeSet<(i32, i64)> {
    records.iter().map(|r| {
        let (_, p, o, _, _) = dead_letter::provenance(r).expect("provenance headers");
        (p, o)
    }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_workflow_against_kafka_and_clickhouse() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("full", 3).await;
    let (inputs, hashes, b) = workload("full", 600, 80);
    s.produce(&inputs).await;
    let mut child = s.spawn("p");
    wait_for("all atoms in ClickHouse", Duration::from_secs(120), || async { s.atoms_final().await == hashes.len() as u64 }).await;
    wait_for("all dead letters archived", Duration::from_secs(60), || async { s.scalar("SELECT count() FROM dead_letters FINAL").await == b as u64 }).await;
    let status = terminate(&mut child);
    assert!(status.success(), "graceful stop failed: {status}\n{}", s.log("p"));
    assert!(s.log("p").contains("atom-ingestion summary"), "{}", s.log("p"));

    assert_eq!(s.hashes_final().await, hashes);
    assert_eq!(s.scalar("SELECT count() FROM atoms FINAL WHERE embedding_dimension = 64 AND length(embedding) = 64").await, hashes.len() as u64);

    let letters = s.read_topic(&s.dlq, b).await;
    assert_eq!(letters.len(), b, "exactly the malformed records, once each after a clean run");
    for r in &letters {
        let (topic, _, _, stage, reason) = dead_letter::provenance(r).unwrap();
        assert_eq!(topic, s.topic);
        assert!(["decode", "validate"].contains(&stage.as_str()), "{stage}");
        assert!(!reason.is_empty() && r.headers.get_str(dead_letter::H_ERROR).is_some_and(|e| !e.is_empty()));
    }
    let reasons: BTreeSet<String> = letters.iter().map(|r| r.headers.get_str(dead_letter::H_REASON).unwrap().to_string()).collect();
    let expected: BTreeSet<String> =
        ["decode.bad_magic", "decode.truncated", "decode.unknown_schema", "validate.content_type", "validate.empty", "validate.utf8"].map(String::from).into();
    assert_eq!(reasons, expected);

    let registry = s.registry();
    let reader = &Schemas::current("AtomIngested").unwrap().schema;
    let events = s.read_topic(&s.out, hashes.len()).await;
    let mut seen = BTreeSet::new();
    for r in &events {
        let (_, v) = avro::decode_message(&registry, reader, &r.payload).await.unwrap();
        let ev: hartonomous::atom::AtomIngested = apache_avro::from_value(&v).unwrap();
        assert_eq!(ev.source_topic, s.topic);
        assert_eq!(ev.embedding_dimension, 64);
        seen.insert(ev.content_hash);
    }
    assert_eq!(seen, hashes, "each stored atom has an AtomIngested event");
    let _ = s.partitions;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_five_times_loses_nothing_and_duplicates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("crash", 3).await;
    let (inputs, hashes, b) = workload("crash", 6000, 600);
    let chunks: Vec<&[Input]> = inputs.chunks(inputs.len() / 6 + 1).collect();
    let mut rng_state = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut next_delay = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        Duration::from_millis(rng_state % 800)
    };
    let (mut kills, mut mid_stream) = (0, 0);
    for (round, chunk) in chunks.iter().enumerate() {
        s.produce(chunk).await;
        let before = s.atoms_final().await;
        let mut child = s.spawn(&format!("p{round}"));
        if round + 1 < chunks.len() {
            // Kill at a random point after this process has made progress of its own.
            wait_for("progress before the kill", Duration::from_secs(60), || async { s.atoms_final().await > before }).await;
            tokio::time::sleep(next_delay()).await;
            child.kill().unwrap(); // SIGKILL: no drain, no final commit
            child.wait().unwrap();
            kills += 1;
            if s.atoms_final().await < hashes.len() as u64 {
                mid_stream += 1;
            }
        } else {
            wait_for("every unique atom after the crashes", Duration::from_secs(180), || async { s.atoms_final().await == hashes.len() as u64 }).await;
            wait_for("every dead letter archived", Duration::from_secs(60), || async { s.scalar("SELECT count() FROM dead_letters FINAL").await == b as u64 }).await;
            let status = terminate(&mut child);
            assert!(status.success(), "{}", s.log(&format!("p{round}")));
        }
    }
    assert_eq!(mid_stream, kills, "every kill landed while work was outstanding");
    assert!(kills >= 5, "only {kills} kills");
    assert_eq!(s.hashes_final().await, hashes, "no hash missing, none extra");
    assert_eq!(s.scalar("SELECT uniqExact(content_hash) FROM atoms").await, hashes.len() as u64);
    let letters = s.read_topic(&s.dlq, b).await;
    assert_eq!(dead_letter_positions(&letters).len(), b, "no dead letter lost (repeats after a crash are allowed)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_outage_pauses_then_resumes_without_loss() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("outage", 3).await;
    // A budget smaller than what arrives during the outage, so the pause is certain.
    let topology = std::fs::read_to_string(&s.topology).unwrap().replace("in_flight_records = 20000", "in_flight_records = 1000");
    assert!(topology.contains("in_flight_records = 1000"));
    std::fs::write(&s.topology, topology).unwrap();
    let (inputs, hashes, _) = workload("outage", 4000, 200);
    let (first, second) = inputs.split_at(inputs.len() / 3);
    s.produce(first).await;
    let mut child = s.spawn("p");
    wait_for("the first atoms", Duration::from_secs(60), || async { s.atoms_final().await > 0 }).await;

    let stop = Command::new(services()).args(["stop", "clickhouse"]).status().unwrap();
    assert!(stop.success());
    let outage = Instant::now();
    s.produce(second).await;
    let mut peak_kib = 0;
    while outage.elapsed() < Duration::from_secs(20) {
        assert!(child.try_wait().unwrap().is_none(), "the processor must survive the outage:\n{}", s.log("p"));
        peak_kib = peak_kib.max(rss_kib(child.id()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let start = Command::new(services()).args(["start", "clickhouse"]).status().unwrap();
    assert!(start.success());
    wait_for("all atoms after the outage", Duration::from_secs(180), || async { s.atoms_final().await == hashes.len() as u64 }).await;
    let status = terminate(&mut child);
    assert!(status.success(), "{}", s.log("p"));
    assert_eq!(s.hashes_final().await, hashes);
    let log = s.log("p");
    assert!(log.contains("backpressure: partitions paused"), "partitions paused during the outage:\n{}", &log[log.len().saturating_sub(4000)..]);
    // In-flight work is bounded (20k records, 64 MiB by default), so memory is too.
    assert!(peak_kib > 0 && peak_kib < 768 * 1024, "peak RSS {peak_kib} KiB during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_group_and_one_takes_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("scale", 4).await;
    let (inputs, hashes, _) = workload("scale", 4000, 300);
    let (first, second) = inputs.split_at(inputs.len() / 2);
    s.produce(first).await;
    let mut a = s.spawn("a");
    let mut b = s.spawn("b");
    wait_for("some progress", Duration::from_secs(60), || async { s.atoms_final().await > 200 }).await;
    let status = terminate(&mut a);
    assert!(status.success(), "{}", s.log("a"));
    s.produce(second).await;
    wait_for("all atoms by the survivor", Duration::from_secs(180), || async { s.atoms_final().await == hashes.len() as u64 }).await;
    let status = terminate(&mut b);
    assert!(status.success(), "{}", s.log("b"));
    assert_eq!(s.hashes_final().await, hashes);
    s.execute("OPTIMIZE TABLE atoms FINAL").await;
    assert_eq!(s.scalar("SELECT count() FROM atoms").await, hashes.len() as u64, "no duplicate rows after merging");
    assert!(s.log("b").contains("assigned") || s.log("b").contains("revoked") || s.log("b").contains("rebalance"), "the survivor saw a rebalance:\n{}", s.log("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let storage = std::env::var("HARTONOMOUS_TEST_KAFKA_STORAGE").unwrap_or_else(|_| "s3".into());
    assert_eq!(storage, "s3", "the broker-restart test needs tansu's persistent (S3) storage; tests/services.sh uses it unless HARTONOMOUS_KAFKA_STORAGE=memory");
    let s = Setup::new("restart", 3).await;
    let (inputs, hashes, _) = workload("restart", 3000, 200);
    let (first, second) = inputs.split_at(inputs.len() / 2);
    s.produce(first).await;
    let mut child = s.spawn("p");
    wait_for("some progress", Duration::from_secs(60), || async { s.atoms_final().await > 100 }).await;
    let restart = Command::new(services()).args(["restart", "kafka"]).stdout(Stdio::null()).status().unwrap();
    assert!(restart.success());
    s.produce(second).await;
    wait_for("all atoms after the broker restart", Duration::from_secs(180), || async { s.atoms_final().await == hashes.len() as u64 }).await;
    let status = terminate(&mut child);
    assert!(status.success(), "{}", s.log("p"));
    assert_eq!(s.hashes_final().await, hashes);
}
