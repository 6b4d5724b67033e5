//! Helpers shared by the integration tests: an embedded app in a temporary
//! directory, an embedder that counts what it is asked, and request builders.
#![allow(dead_code)]

pub mod rows;
pub mod services;
pub mod tls;

use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use hartonomous::app::Embedded;
use hartonomous::avro::{self, Schemas};
use hartonomous::config::Profile;
use hartonomous::embed::hashing::HashingEmbedder;
use hartonomous::embed::{EmbedError, Embedder};
use hartonomous::record::{Headers, OutgoingRecord};

/// Wraps the hashing embedder and records every text it is asked to embed.
pub struct CountingEmbedder {
    inner: HashingEmbedder,
    pub texts: Mutex<Vec<String>>,
    pub calls: Mutex<usize>,
}

impl CountingEmbedder {
    pub fn new(dimension: usize, max_batch: usize) -> Arc<Self> {
        Arc::new(Self { inner: HashingEmbedder::new(dimension, max_batch), texts: Mutex::default(), calls: Mutex::default() })
    }

    pub fn texts(&self) -> Vec<String> {
        self.texts.lock().unwrap().clone()
    }
}

impl Embedder for CountingEmbedder {
    fn model(&self) -> &str {
        self.inner.model()
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        assert!(texts.len() <= self.max_batch(), "caller broke the max_batch contract");
        *self.calls.lock().unwrap() += 1;
        self.texts.lock().unwrap().extend(texts.iter().cloned());
        self.inner.embed(texts)
    }
}

pub fn profile(dir: &Path) -> Profile {
    let env = vec![("HARTONOMOUS_DATA_DIR".to_string(), dir.display().to_string())];
    Profile::parse(Path::new("test"), hartonomous::config::EMBEDDED_PROFILE, env.into_iter()).unwrap()
}

/// An embedded app on `dir` whose embedder counts its inputs.
pub fn app(dir: &Path) -> (Embedded, Arc<CountingEmbedder>) {
    let mut app = Embedded::open(&profile(dir), hartonomous::clock::system()).unwrap();
    let counting = CountingEmbedder::new(64, 16);
    app.embedder = counting.clone();
    (app, counting)
}

pub fn request_json(i: usize, content: &str, source: &str) -> serde_json::Value {
    serde_json::json!({
        "content_type": "text/plain",
        "content": content,
        "metadata": {"i": i.to_string()},
        "source_system": source,
        "correlation_id": format!("req-{i}"),
    })
}

pub fn json_record(topic: &str, v: &serde_json::Value) -> OutgoingRecord {
    hartonomous::input::json_lines(v.to_string().as_bytes(), topic).remove(0)
}

/// Encodes `v` as Avro with bundled schema `name` version `version`,
/// registered under `<topic>-value`, in the Confluent wire format.
pub fn wire_record(app: &Embedded, topic: &str, name: &str, version: u32, v: &serde_json::Value) -> OutgoingRecord {
    let schema = &Schemas::version(name, version).unwrap().schema;
    let id = app.registry.register_schema(&Schemas::subject(topic), schema).unwrap();
    let value = avro::json_to_avro(v, schema).unwrap();
    OutgoingRecord {
        topic: topic.into(),
        key: v.get("correlation_id").and_then(|c| c.as_str()).map(|s| s.as_bytes().to_vec()),
        payload: avro::encode(id, schema, &value).unwrap(),
        headers: Headers::new(),
        ..Default::default()
    }
}

pub fn raw_record(topic: &str, key: &str, payload: Vec<u8>) -> OutgoingRecord {
    OutgoingRecord { topic: topic.into(), key: Some(key.as_bytes().to_vec()), payload, ..Default::default() }
}

/// Runs a query and returns the single integer it yields.
pub async fn count(app: &Embedded, sql: &str) -> i64 {
    use arrow::array::AsArray;
    let batches = app.store.query(sql).await.unwrap();
    let col = batches[0].column(0);
    col.as_primitive::<arrow::datatypes::Int64Type>().value(0)
}

/// Runs a query on an embedded store and returns the single integer it yields.
pub async fn count_embedded(store: &hartonomous::store::embedded::EmbeddedStore, sql: &str) -> i64 {
    use arrow::array::AsArray;
    let batches = store.query(sql).await.unwrap();
    batches[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0)
}

/// Every record on `topic`, read from the start by a fresh consumer group,
/// once at least `expected` arrived and no more came for two seconds (or
/// `within` passed: the caller's assertions then show what is missing).
pub async fn read_topic(config: &hartonomous::log::kafka::KafkaConfig, topic: &str, expected: usize, within: std::time::Duration) -> Vec<hartonomous::record::Record> {
    use hartonomous::log::LogConsumer;
    use std::time::{Duration, Instant};
    let group = format!("reader-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let mut consumer = hartonomous::log::kafka::KafkaConsumer::new(config, &group, &[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let got = consumer.poll(5000, Duration::from_millis(200)).await.unwrap();
        if got.is_empty() {
            if out.len() >= expected && quiet_since.elapsed() > Duration::from_secs(2) {
                break;
            }
        } else {
            quiet_since = Instant::now();
            out.extend(got);
        }
    }
    consumer.close().await;
    out
}

/// An OpenAI-compatible embeddings server that counts the requests it answers.
pub struct EmbeddingServer {
    pub url: String,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
}

pub fn embedding_server(dim: usize) -> EmbeddingServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                use std::io::{BufRead, Read, Write};
                let mut reader = std::io::BufReader::new(stream);
                let mut length = 0usize;
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some((n, v)) = h.split_once(':') {
                        if n.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let inputs: Vec<String> = match &body["input"] {
                    serde_json::Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_string()).collect(),
                    v => vec![v.as_str().unwrap().to_string()],
                };
                let data: Vec<serde_json::Value> = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let seed = t.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
                        let v: Vec<f32> = (0..dim).map(|j| (seed.wrapping_add(j as u32 * 17) % 1000) as f32 / 1000.0 - 0.5).collect();
                        serde_json::json!({"object": "embedding", "index": i, "embedding": v})
                    })
                    .collect();
                let payload = serde_json::json!({"object": "list", "model": body["model"], "data": data}).to_string();
                let mut stream = reader.into_inner();
                let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}", payload.len());
            });
        }
    });
    EmbeddingServer { url, requests }
}
