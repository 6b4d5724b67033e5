//! Ensemble inference as real processes against the real broker (tansu)
//! and a real ClickHouse (both started by `tests/services.sh up`), with
//! three local model servers started by each test: one steady, one that
//! fails 30 % of its calls, one slow. The compensation consumer
//! (`inference-compensation`) runs as its own process.
//!
//! Every scenario ends in [`Ends::check`], which reads every output a user
//! sees (the result topic, the compensation and compensated topics, the
//! partial-results topic, the dead-letter topic, and the tables through
//! FINAL) and asserts that every request ends in exactly one of two
//! states: a persisted and published result, or a complete compensation
//! (no live row, `InferenceCompensated` published exactly once). None ends
//! in both, none in neither.

mod common;

use common::services::{clickhouse_url, kafka_config, profile_toml, require_services, step, unique};

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hartonomous::avro::{self, FileRegistry, Schemas};
use hartonomous::inference::{InferenceCompensated, InferenceCompensation, InferenceResult, ModelOutput};
use hartonomous::log::kafka::KafkaProducer;
use hartonomous::log::LogProducer;
use hartonomous::record::{Headers, OutgoingRecord, Record};
use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore};

static SERIAL: Mutex<()> = Mutex::new(());


// ---------------------------------------------------------------------------
// Model servers: the generic JSON classification protocol
// ---------------------------------------------------------------------------

/// How a model server answers `{"input": "..."}`:
/// - the label is the word after `#label=` in the input, or, when the input
///   holds `#split`, the server's own name (so the servers disagree);
/// - `fail_percent` of its calls (every call whose number mod 100 is below
///   it, so exactly that share) answer 503;
/// - every answer waits `delay_ms` first.
struct ModelServer {
    url: String,
    calls: Arc<AtomicU64>,
}

impl ModelServer {
    fn start(name: &'static str, fail_percent: u64, delay_ms: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/classify", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let input = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["input"].as_str().map(String::from)).unwrap_or_default();
                    std::thread::sleep(Duration::from_millis(delay_ms));
                    let (status, answer) = if n % 100 < fail_percent {
                        (503, r#"{"error":"overloaded"}"#.to_string())
                    } else {
                        let label = if input.contains("#split") {
                            name.to_string()
                        } else {
                            input.split("#label=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("none").to_string()
                        };
                        (200, serde_json::json!({"label": label, "score": 0.9}).to_string())
                    };
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = stream.write_all(reply.as_bytes());
                });
            }
        });
        Self { url, calls }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// One scenario: topics, database, declarations, processes
// ---------------------------------------------------------------------------

struct Topics {
    requests: String,
    dlq: String,
    partial: String,
    results: String,
    compensations: String,
    compensations_dlq: String,
    compensated: String,
}

struct Setup {
    dir: tempfile::TempDir,
    t: Topics,
    database: String,
    profile: PathBuf,
    inference: PathBuf,
    compensation: PathBuf,
    servers: Vec<ModelServer>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Setup {
    /// Three model servers (`steady`, `flaky` failing 30 % of calls, `slow`
    /// answering after 150 ms), both declarations, topics and tables.
    /// `quota` is every model's concurrency.
    async fn new(name: &str, quota: usize) -> Self {
        require_services();
        let dir = tempfile::tempdir().unwrap();
        let id = unique(name).replace('-', "_");
        let t = Topics {
            requests: format!("{id}.requests"),
            dlq: format!("{id}.requests.dlq"),
            partial: format!("{id}.partial"),
            results: format!("{id}.results"),
            compensations: format!("{id}.compensations"),
            compensations_dlq: format!("{id}.compensations.dlq"),
            compensated: format!("{id}.compensated"),
        };
        let database = format!("hx_{id}");
        let servers = vec![ModelServer::start("steady", 0, 0), ModelServer::start("flaky", 30, 0), ModelServer::start("slow", 0, 150)];
        let profile = dir.path().join("profile.toml");
        let registry = format!("kind = \"file\"\npath = \"{}\"", dir.path().join("registry.json").display());
        std::fs::write(&profile, profile_toml(dir.path(), &database, &registry, "kind = \"hashing\"\ndimension = 64\nmax_batch = 256", "")).unwrap();
        let models: String = ["steady", "flaky", "slow"]
            .iter()
            .zip(&servers)
            .map(|(m, s)| {
                format!(
                    "[[stage.model]]\nkind = \"http\"\nid = \"{m}\"\nbase_url = \"{}\"\nprotocol = {{ kind = \"json\", label_pointer = \"/label\", score_pointer = \"/score\" }}\n\n",
                    s.url
                )
            })
            .collect();
        let inference = dir.path().join("ensemble-inference.toml");
        std::fs::write(
            &inference,
            format!(
                r#"name = "ensemble-inference"
commit_interval_ms = 200

[source]
topic = "{requests}"
schema = "InferenceRequest"
partitions = 3
group = "{id}-inference"

[dead_letter]
topic = "{dlq}"

[window]
max_records = 100
max_age_ms = 50

[[stage]]
name = "decode"

[[stage]]
name = "recall"

[[stage]]
name = "plan"
default_timeout_ms = 4000

[[stage.ensemble]]
name = "trio"
models = ["steady", "flaky", "slow"]
strategy = "MAJORITY_VOTE"

[[stage.ensemble]]
name = "trio-all"
models = ["steady", "flaky", "slow"]
strategy = "QUORUM"
quorum = 3

[[stage]]
name = "invoke"
partial_topic = "{partial}"
parallel_requests = 32

{models}[stage.call_defaults]
concurrency = {quota}
coalesce_ms = 0
retry = {{ max_attempts = 3, attempt_timeout_ms = 2000, initial_backoff_ms = 20, max_backoff_ms = 200 }}
breaker = {{ failure_threshold = 1000 }}

[[stage]]
name = "persist"

[[stage]]
name = "publish"
topic = "{results}"
compensation_topic = "{compensations}"
"#,
                requests = t.requests,
                dlq = t.dlq,
                partial = t.partial,
                results = t.results,
                compensations = t.compensations,
            ),
        )
        .unwrap();
        let compensation = dir.path().join("inference-compensation.toml");
        let declaration = hartonomous::topology::find("inference-compensation")
            .unwrap()
            .declaration()
            .replace("\"inference.compensations.dlq\"", &format!("\"{}\"", t.compensations_dlq))
            .replace("\"inference.compensations\"", &format!("\"{}\"", t.compensations))
            .replace("\"inference.compensated\"", &format!("\"{}\"", t.compensated))
            .replace("partitions = 3", &format!("partitions = 3\ngroup = \"{id}-compensation\""))
            .replace("commit_interval_ms = 1000", "commit_interval_ms = 200");
        std::fs::write(&compensation, declaration).unwrap();
        let s = Self { dir, t, database, profile, inference, compensation, servers };
        let topics: Vec<(&str, i32)> = [&s.t.requests, &s.t.dlq, &s.t.partial, &s.t.results, &s.t.compensations, &s.t.compensations_dlq, &s.t.compensated]
            .iter()
            .map(|t| (t.as_str(), 3))
            .collect();
        hartonomous::log::kafka::ensure_topics(&kafka_config(), &topics).await.unwrap();
        ClickHouseStore::connect(ClickHouseConfig::new(clickhouse_url(), s.database.clone())).await.unwrap().migrate().await.unwrap();
        s
    }

    fn registry(&self) -> FileRegistry {
        let r = FileRegistry::open(self.dir.path().join("registry.json")).unwrap();
        r.register_bundled(&[(self.t.requests.as_str(), "InferenceRequest")]).unwrap();
        r
    }

    async fn produce(&self, requests: &[serde_json::Value], malformed: &[(String, Vec<u8>)]) {
        let registry = self.registry();
        let schema = &Schemas::current("InferenceRequest").unwrap().schema;
        let id = registry.register_schema(&Schemas::subject(&self.t.requests), schema).unwrap();
        let mut records: Vec<OutgoingRecord> = requests
            .iter()
            .map(|v| OutgoingRecord {
                topic: self.t.requests.clone(),
                key: Some(v["correlation_id"].as_str().unwrap().as_bytes().to_vec()),
                payload: avro::encode(id, schema, &avro::json_to_avro(v, schema).unwrap()).unwrap(),
                headers: Headers::new(),
                ..Default::default()
            })
            .collect();
        for (key, payload) in malformed {
            records.push(OutgoingRecord { topic: self.t.requests.clone(), key: Some(key.as_bytes().to_vec()), payload: payload.clone(), ..Default::default() });
        }
        let producer = KafkaProducer::new(&kafka_config()).unwrap();
        for chunk in records.chunks(500) {
            futures::future::try_join_all(chunk.iter().map(|r| producer.send(r.clone()))).await.unwrap();
        }
    }

    fn spawn(&self, name: &str, declaration: &PathBuf, env: &[(&str, &str)]) -> Proc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hartonomous"));
        cmd.args(["--connectors", self.profile.to_str().unwrap(), "run", "--topology", declaration.to_str().unwrap()])
            .env("RUST_LOG", "hartonomous=info,rdkafka=warn")
            // The processor and its compensation consumer run at once.
            .env("HARTONOMOUS_LISTEN", "off")
            .env_remove(hartonomous::failpoint::ENV)
            .env_remove(hartonomous::failpoint::REFUSE_ENV)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc(cmd.spawn().unwrap())
    }

    fn inference(&self, env: &[(&str, &str)]) -> Proc {
        self.spawn("inference", &self.inference.clone(), env)
    }

    fn compensator(&self, env: &[(&str, &str)]) -> Proc {
        self.spawn("compensation", &self.compensation.clone(), env)
    }

    fn tail(&self, name: &str) -> String {
        let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        log[log.len().saturating_sub(4000)..].to_string()
    }

    async fn store(&self) -> ClickHouseStore {
        ClickHouseStore::connect_for_query(ClickHouseConfig::new(clickhouse_url(), self.database.clone())).await.unwrap()
    }

    async fn scalar(&self, sql: &str) -> u64 {
        let mut last = None;
        for _ in 0..40 {
            match self.store().await.query_scalar_u64(sql).await {
                Ok(v) => return v,
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{sql}: {last:?}")
    }

    async fn lines(&self, sql: &str) -> Vec<String> {
        let text = self.store().await.query_text(&format!("{sql} FORMAT TabSeparated")).await.unwrap();
        text.lines().map(str::to_string).collect()
    }

    /// Requests that reached an end state so far: a live result, or an
    /// announced compensation.
    async fn ended(&self) -> u64 {
        self.scalar("SELECT count() FROM inference_results FINAL WHERE deleted = 0").await
            + self.scalar("SELECT count() FROM inference_compensations FINAL WHERE step = 3").await
    }

    async fn wait_until_ended(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ended = self.ended().await;
            if ended >= n {
                return;
            }
            assert!(Instant::now() < deadline, "only {ended} of {n} requests ended within {timeout:?}\ninference:\n{}\ncompensation:\n{}", self.tail("inference"), self.tail("compensation"));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn read_topic(&self, topic: &str, at_least: usize) -> Vec<Record> {
        common::read_topic(&kafka_config(), topic, at_least, Duration::from_secs(120)).await
    }

    async fn events<T: serde::de::DeserializeOwned>(&self, topic: &str, schema: &str, at_least: usize) -> Vec<(Record, T)> {
        let registry = self.registry();
        let reader = &Schemas::current(schema).unwrap().schema;
        let mut out = Vec::new();
        for r in self.read_topic(topic, at_least).await {
            let (_, v) = avro::decode_message(&registry, reader, &r.payload).await.unwrap();
            let event: T = apache_avro::from_value(&v).unwrap();
            out.push((r, event));
        }
        out
    }

    /// Everything a user sees, once every request ended.
    async fn ends(&self, accepted: usize, malformed: usize) -> Ends {
        // The store says how many events at least must be on each topic (a
        // live result was published before its offset committed, an
        // announcement before its step 3): read until they are all there,
        // then until the topic stays quiet, so extra events show too.
        let live_results: BTreeSet<String> = self.lines("SELECT correlation_id, label FROM inference_results FINAL WHERE deleted = 0").await.into_iter().collect();
        let announced: BTreeSet<String> = self.lines("SELECT correlation_id FROM inference_compensations FINAL WHERE step = 3").await.into_iter().collect();
        let results = self.events::<InferenceResult>(&self.t.results, "InferenceResult", live_results.len()).await;
        let compensated = self.events::<InferenceCompensated>(&self.t.compensated, "InferenceCompensated", announced.len()).await;
        let requested = self.events::<InferenceCompensation>(&self.t.compensations, "InferenceCompensation", compensated.len()).await;
        let partial = self.events::<ModelOutput>(&self.t.partial, "ModelOutput", accepted).await;
        let letters = self.read_topic(&self.t.dlq, malformed).await;
        Ends {
            results: results.into_iter().map(|(_, e)| e).collect(),
            compensated: compensated.into_iter().map(|(_, e)| e).collect(),
            requested: requested.into_iter().map(|(_, e)| e).collect(),
            partial: partial.into_iter().map(|(r, e)| (r.position.tp.partition, r.position.offset, e)).collect(),
            letters: letters.iter().filter_map(|r| r.key.as_ref().map(|k| String::from_utf8_lossy(k).to_string())).collect(),
            live_results,
            live_outputs: self.lines("SELECT DISTINCT correlation_id FROM model_outputs FINAL WHERE deleted = 0").await.into_iter().collect(),
            announced,
        }
    }
}

/// What the outputs say about every request.
struct Ends {
    results: Vec<InferenceResult>,
    compensated: Vec<InferenceCompensated>,
    requested: Vec<InferenceCompensation>,
    /// (partition, offset, event) of every partial result.
    partial: Vec<(i32, i64, ModelOutput)>,
    letters: BTreeSet<String>,
    /// `correlation_id \t label` of the live result rows.
    live_results: BTreeSet<String>,
    live_outputs: BTreeSet<String>,
    announced: BTreeSet<String>,
}

impl Ends {
    /// Exactly one end state per accepted request, nothing for the others.
    fn check(&self, accepted: &BTreeSet<String>, malformed: &BTreeSet<String>, models: usize, scenario: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        let resulted: BTreeSet<String> = self.results.iter().map(|r| r.correlation_id.clone()).collect();
        let mut announcements: BTreeMap<String, usize> = BTreeMap::new();
        for c in &self.compensated {
            *announcements.entry(c.correlation_id.clone()).or_default() += 1;
        }
        let compensated: BTreeSet<String> = announcements.keys().cloned().collect();
        let twice: Vec<_> = announcements.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{scenario}: InferenceCompensated published more than once: {twice:?}");
        let both: Vec<_> = resulted.intersection(&compensated).collect();
        assert!(both.is_empty(), "{scenario}: requests with a result and a compensation: {both:?}");
        let ended: BTreeSet<String> = resulted.union(&compensated).cloned().collect();
        let neither: Vec<_> = accepted.difference(&ended).collect();
        assert!(neither.is_empty(), "{scenario}: {} requests with neither a result nor a compensation, e.g. {:?}", neither.len(), neither.iter().take(5).collect::<Vec<_>>());
        let strangers: Vec<_> = ended.difference(accepted).collect();
        assert!(strangers.is_empty(), "{scenario}: answers for requests never sent: {strangers:?}");

        // The store agrees with the topics: a live result row for each
        // result (with the published label), nothing live for a
        // compensated request, and its compensation recorded as announced.
        let published: BTreeSet<String> = self.results.iter().map(|r| format!("{}\t{}", r.correlation_id, r.output.clone().unwrap_or_default())).collect();
        assert_eq!(self.live_results, published, "{scenario}: live result rows are exactly the published results");
        let live_compensated: Vec<_> = self.live_outputs.intersection(&compensated).collect();
        assert!(live_compensated.is_empty(), "{scenario}: compensated requests with live model outputs: {live_compensated:?}");
        assert_eq!(self.announced, compensated, "{scenario}: every announced compensation is recorded as step 3, and only those");
        let requested: BTreeSet<String> = self.requested.iter().map(|c| c.correlation_id.clone()).collect();
        assert_eq!(requested, compensated, "{scenario}: every compensation requested was completed");

        // Every model's answer to every decided request is on the partial
        // topic, and within one partition a request's answers come in
        // arrival order (sequence 0, 1, 2 ... as offsets grow).
        let mut by_request: BTreeMap<&str, Vec<&(i32, i64, ModelOutput)>> = BTreeMap::new();
        for p in &self.partial {
            by_request.entry(p.2.correlation_id.as_str()).or_default().push(p);
        }
        for id in &resulted {
            let outs = by_request.get(id.as_str()).unwrap_or_else(|| panic!("{scenario}: no partial results for {id}"));
            let mut ms: BTreeSet<&str> = BTreeSet::new();
            for o in outs {
                ms.insert(o.2.model_id.as_str());
            }
            assert_eq!(ms.len(), models, "{scenario}: {id} has partial results from {ms:?}");
        }
        for (id, outs) in &by_request {
            let mut sorted = outs.clone();
            sorted.sort_by_key(|o| (o.0, o.1));
            // A redelivered request publishes its answers again from 0: each
            // run of the sequence starts at 0 and counts up.
            let mut expect = 0;
            for o in sorted {
                if o.2.sequence == 0 {
                    expect = 0;
                }
                assert_eq!(o.2.sequence, expect, "{scenario}: {id}'s partial results out of order");
                expect += 1;
            }
        }
        assert_eq!(&self.letters, malformed, "{scenario}: exactly the malformed records are dead-lettered");
        (resulted, compensated)
    }
}

/// `n` requests over the ensembles: three quarters majority votes (`trio`),
/// decided unless two models fail; one quarter `#split` inputs asked with
/// QUORUM 2 of 3, on which the servers disagree, so they are always
/// compensated (`aggregate.no_result`). Labels cycle through four values.
fn requests(tag: &str, n: usize) -> (Vec<serde_json::Value>, BTreeSet<String>, BTreeSet<String>) {
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    let mut split = BTreeSet::new();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let label = ["spam", "ham", "eggs", "toast"][i % 4];
        let v = if i % 4 == 3 {
            split.insert(id.clone());
            serde_json::json!({"request_id": format!("r{i}"), "input": format!("request {i} #split"), "ensemble": "trio", "aggregation": "QUORUM", "quorum": 2, "correlation_id": id})
        } else {
            serde_json::json!({"request_id": format!("r{i}"), "input": format!("request {i} #label={label}"), "ensemble": "trio", "correlation_id": id})
        };
        ids.insert(id);
        out.push(v);
    }
    (out, ids, split)
}

fn malformed(tag: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|k| (format!("{tag}-bad-{k}"), format!("not avro {k}").into_bytes())).collect()
}

/// The acceptance run: 1,000 requests through the real broker and
/// ClickHouse to three model servers, one failing 30 % of its calls and one
/// slow, with the inference processor and the compensation consumer each
/// killed with -9 mid-stream and restarted. Every request ends in exactly
/// one state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_to_three_model_servers_end_in_exactly_one_state_across_kill_dash_nine() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("ensemble", 16).await;
    let (reqs, accepted, split) = requests("e", 1000);
    let bad = malformed("e", 10);
    let bad_keys: BTreeSet<String> = bad.iter().map(|(k, _)| k.clone()).collect();
    s.produce(&reqs, &bad).await;
    step("produced 1000 requests and 10 malformed records");
    let mut p = s.inference(&[]);
    let mut c = s.compensator(&[]);
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(240);
    while s.ended().await < 250 {
        assert!(Instant::now() < deadline, "no progress:\n{}", s.tail("inference"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.0.kill().unwrap();
    p.0.wait().unwrap();
    step("inference processor killed with -9");
    let _p2 = s.inference(&[]);
    let deadline = Instant::now() + Duration::from_secs(240);
    while s.scalar("SELECT count() FROM inference_compensations FINAL WHERE step = 3").await < 40 {
        if Instant::now() > deadline {
            let requested = s.scalar("SELECT count() FROM inference_compensations FINAL").await;
            panic!("no compensation progress ({requested} requested):\ncompensation:\n{}\ninference:\n{}", s.tail("compensation"), s.tail("inference"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.0.kill().unwrap();
    c.0.wait().unwrap();
    step("compensation consumer killed with -9");
    let _c2 = s.compensator(&[]);
    s.wait_until_ended(accepted.len() as u64, Duration::from_secs(600)).await;
    step(&format!("every request ended after {:?}", started.elapsed()));
    let ends = s.ends(accepted.len(), bad.len()).await;
    let (resulted, compensated) = ends.check(&accepted, &bad_keys, 3, "1,000 requests with kill -9");
    // Every split request is compensated: no two servers agree on it.
    let missing: Vec<_> = split.difference(&compensated).collect();
    assert!(missing.is_empty(), "split requests not compensated: {missing:?}");
    for c in &ends.compensated {
        if split.contains(&c.correlation_id) {
            assert_eq!(c.reason_code, "aggregate.no_result", "{c:?}");
            assert_eq!(c.undone_steps, vec!["retract_outputs", "release_reservations"], "{c:?}");
            assert_eq!(c.retracted_outputs, 3);
        }
    }
    // The decided ones carry the label the servers gave.
    for r in &ends.results {
        let i: usize = r.correlation_id.trim_start_matches("e-").parse().unwrap();
        assert_eq!(r.output.as_deref(), Some(["spam", "ham", "eggs", "toast"][i % 4]), "{r:?}");
    }
    let flaky = s.servers[1].calls();
    eprintln!(
        "results {}, compensations {} (split {}), model calls: steady {}, flaky {} (30 % failed), slow {}",
        resulted.len(),
        compensated.len(),
        split.len(),
        s.servers[0].calls(),
        flaky,
        s.servers[2].calls()
    );
}

/// Saga rollback: the store refuses the result rows of some requests after
/// their model outputs were stored. Those requests are compensated: their
/// outputs are retracted (no live row under FINAL), `InferenceCompensated`
/// is published exactly once, and the reservations are released (every
/// model's quota is 1, so a leaked slot would stop every later request).
/// Then the compensation consumer is killed with -9 at both of its crash
/// points in turn and restarted: the end state is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_result_is_compensated_once_also_when_the_compensation_is_killed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("rollback", 1).await;
    let mut reqs = Vec::new();
    let mut accepted = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for i in 0..60 {
        let id = if i % 3 == 0 { format!("refuse-me-{i}") } else { format!("keep-{i}") };
        if i % 3 == 0 {
            refused.insert(id.clone());
        }
        accepted.insert(id.clone());
        reqs.push(serde_json::json!({"request_id": format!("r{i}"), "input": format!("r {i} #label=ok"), "model_ids": ["steady", "slow"], "aggregation": "MAJORITY_VOTE", "correlation_id": id}));
    }
    s.produce(&reqs, &[]).await;
    let _p = s.inference(&[(hartonomous::failpoint::REFUSE_ENV, "persist.result:refuse-me")]);
    // The first compensation consumer dies after sending, before recording
    // step 3; the second before sending, after recording step 2; the third
    // finishes.
    let mut c = s.compensator(&[(hartonomous::failpoint::ENV, "announce.after_send")]);
    let status = wait_exit(&mut c, Duration::from_secs(240)).unwrap_or_else(|| panic!("the compensation consumer did not reach announce.after_send:\n{}", s.tail("compensation")));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(6), "aborted at announce.after_send:\n{}", s.tail("compensation"));
    step("compensation consumer aborted after sending");
    let mut c = s.compensator(&[(hartonomous::failpoint::ENV, "announce.before_send")]);
    let status = wait_exit(&mut c, Duration::from_secs(240));
    // It may have nothing left to send (everything was found on the topic):
    // then it runs on, and is stopped here.
    if status.is_none() {
        step("second compensation consumer had nothing to send before the wait ended");
    }
    drop(c);
    let _c = s.compensator(&[]);
    s.wait_until_ended(accepted.len() as u64, Duration::from_secs(300)).await;
    let ends = s.ends(accepted.len(), 0).await;
    let (_, compensated) = ends.check(&accepted, &BTreeSet::new(), 2, "refused results");
    assert_eq!(compensated, refused, "exactly the refused requests are compensated");
    for c in &ends.compensated {
        assert_eq!(c.reason_code, "persist.rejected", "{c:?}");
        assert_eq!(c.released_reservations, 2, "{c:?}");
        assert!(!c.retracted_result, "{c:?}");
    }
    for id in &refused {
        let live = s.scalar(&format!("SELECT count() FROM model_outputs FINAL WHERE correlation_id = '{id}' AND deleted = 0")).await
            + s.scalar(&format!("SELECT count() FROM inference_results FINAL WHERE correlation_id = '{id}' AND deleted = 0")).await;
        assert_eq!(live, 0, "{id} has live rows after its compensation");
    }
}

/// Waits for `child` to exit; `None` if it still runs after `timeout`.
fn wait_exit(child: &mut Proc, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
