//! `OpenAiEmbedder` against a scripted HTTP/1.1 server started by the test.
//!
//! The server runs on std threads (one per connection, so a deliberately slow
//! answer never holds up the next attempt), answers each request with the
//! next scripted behaviour (or the default once the script is used up), and
//! records every request it receives. Tests assert outcomes and request
//! counts, never durations.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hartonomous::clock::system;
use hartonomous::embed::openai::{OpenAiConfig, OpenAiEmbedder};
use hartonomous::embed::{EmbedError, Embedder};
use hartonomous::resilience::{BreakerConfig, BreakerState, RetryConfig};
use serde_json::{Value, json};

mod common;
use common::tls::{CA_PEM, LEAF_KEY_PEM, server_tls_config};

const DIM: usize = 4;

/// What the server does with one request.
#[derive(Debug, Clone)]
enum Behaviour {
    /// 200 with the right vectors, `data` in input order.
    Ok,
    /// 200 with the right vectors, `data` in reverse order (indices intact).
    OkReversed,
    /// Wait this long, then answer like `Ok`.
    Slow(u64),
    /// This status with a small JSON error body.
    Status(u16),
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with well-formed vectors of this length.
    WrongDimension(usize),
}

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Value,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn inputs(&self) -> Vec<String> {
        self.body["input"].as_array().expect("input array").iter().map(|v| v.as_str().unwrap().to_string()).collect()
    }
}

struct Server {
    base_url: String,
    script: Arc<Mutex<VecDeque<Behaviour>>>,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    fn start(default: Behaviour, script: Vec<Behaviour>) -> Server {
        Self::start_with(default, script, None)
    }

    /// Like [`start`](Self::start), over HTTPS with the test leaf
    /// certificate ([`LEAF_PEM`], signed by [`CA_PEM`]).
    fn start_tls(default: Behaviour, script: Vec<Behaviour>) -> Server {
        Self::start_with(default, script, Some(server_tls_config()))
    }

    fn start_with(default: Behaviour, script: Vec<Behaviour>, tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (script.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (s, r, default, tls) = (s.clone(), r.clone(), default.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve(stream, &s, &r, default),
                    Some(config) => {
                        let Ok(connection) = rustls::ServerConnection::new(config) else { return };
                        serve(rustls::StreamOwned::new(connection, stream), &s, &r, default);
                    }
                });
            }
        });
        Server { base_url, script, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn script_left(&self) -> usize {
        self.script.lock().unwrap().len()
    }
}

/// Reads one request, records it, and answers it as scripted. Over TLS a
/// client that rejects the certificate ends the handshake, so nothing is
/// read or recorded.
fn serve(stream: impl Read + Write, script: &Mutex<VecDeque<Behaviour>>, requests: &Mutex<Vec<Request>>, default: Behaviour) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let length: usize =
        headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let request = Request { method, path, headers, body };
    let behaviour = script.lock().unwrap().pop_front().unwrap_or(default);
    requests.lock().unwrap().push(request.clone());

    let (status, payload) = match behaviour {
        Behaviour::Ok => (200, answer(&request, DIM, false)),
        Behaviour::OkReversed => (200, answer(&request, DIM, true)),
        Behaviour::Slow(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            (200, answer(&request, DIM, false))
        }
        Behaviour::Status(code) => (code, json!({"error": format!("scripted {code}")}).to_string()),
        Behaviour::Malformed => (200, "{\"data\": [{\"index\": 0, \"embedding\": [0.1, ".to_string()),
        Behaviour::WrongDimension(d) => (200, answer(&request, d, false)),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Scripted",
    };
    // The request was read to its end, so nothing buffered is lost here.
    let mut stream = reader.into_inner();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    // The client may have given up on a slow answer; writing then fails, which is fine.
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(payload.as_bytes()));
    let _ = stream.flush();
}

/// The vector the server gives `text`: deterministic, distinct per text.
fn vector_for(text: &str, dim: usize) -> Vec<f32> {
    let seed = text.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..dim).map(|j| ((seed.wrapping_add(j as u32 * 17)) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn answer(request: &Request, dim: usize, reversed: bool) -> String {
    let mut data: Vec<Value> = request
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": vector_for(t, dim)}))
        .collect();
    if reversed {
        data.reverse();
    }
    json!({"object": "list", "model": request.body["model"], "data": data}).to_string()
}

fn texts(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Fast retries: a few ms of backoff, short attempt deadline.
fn config(server: &Server, max_attempts: u32) -> OpenAiConfig {
    OpenAiConfig {
        max_batch: 2,
        retry: RetryConfig {
            max_attempts,
            initial_backoff_ms: 2,
            max_backoff_ms: 10,
            multiplier: 2.0,
            jitter: 0.5,
            attempt_timeout_ms: 2_000,
        },
        breaker: BreakerConfig { failure_threshold: 100, open_ms: 60_000 },
        ..OpenAiConfig::new(server.base_url.clone(), "test-model", DIM)
    }
}

fn embedder(config: OpenAiConfig) -> OpenAiEmbedder {
    OpenAiEmbedder::new(config, system()).expect("valid config")
}

#[tokio::test]
async fn happy_path_batches_in_order_and_orders_by_index() {
    let server = Server::start(Behaviour::Ok, vec![Behaviour::OkReversed, Behaviour::Ok, Behaviour::OkReversed]);
    let e = embedder(config(&server, 3));
    assert_eq!(e.model(), "test-model");
    assert_eq!(e.dimension(), DIM);
    assert_eq!(e.max_batch(), 2);

    let all = texts(&["alpha", "beta", "gamma delta", "epsilon", "zeta"]);
    let mut got = Vec::new();
    for chunk in all.chunks(e.max_batch()) {
        got.extend(e.embed(chunk).await.unwrap());
    }
    let want: Vec<Vec<f32>> = all.iter().map(|t| vector_for(t, DIM)).collect();
    assert_eq!(got, want);

    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(e.requests_sent(), 3);
    let batches: Vec<Vec<String>> = requests.iter().map(Request::inputs).collect();
    assert_eq!(batches, vec![texts(&["alpha", "beta"]), texts(&["gamma delta", "epsilon"]), texts(&["zeta"])]);
    for r in &requests {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/embeddings");
        assert_eq!(r.body["model"], "test-model");
        assert!(r.body.get("dimensions").is_none(), "dimensions sent unasked: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("authorization"), None);
    }
    assert_eq!(e.embed(&[]).await.unwrap(), Vec::<Vec<f32>>::new());
    assert_eq!(server.count(), 3, "an empty input sends nothing");
}

#[tokio::test]
async fn oversized_input_is_split_into_consecutive_requests() {
    let server = Server::start(Behaviour::OkReversed, vec![]);
    let mut c = config(&server, 3);
    c.base_url = format!("{}/v1/", server.base_url);
    c.request_dimensions = true;
    let e = embedder(c);
    let all = texts(&["one", "two", "three", "four", "five"]);
    let got = e.embed(&all).await.unwrap();
    assert_eq!(got, all.iter().map(|t| vector_for(t, DIM)).collect::<Vec<_>>());
    let requests = server.requests();
    let sizes: Vec<usize> = requests.iter().map(|r| r.inputs().len()).collect();
    assert_eq!(sizes, vec![2, 2, 1]);
    for r in &requests {
        assert_eq!(r.path, "/v1/embeddings");
        assert_eq!(r.body["dimensions"], json!(DIM));
    }
}

#[tokio::test]
async fn slow_answer_beyond_attempt_timeout_is_retried() {
    let server = Server::start(Behaviour::Ok, vec![Behaviour::Slow(5_000), Behaviour::Ok]);
    let mut c = config(&server, 3);
    c.retry.attempt_timeout_ms = 600;
    let e = embedder(c);
    let got = e.embed(&texts(&["slow"])).await.unwrap();
    assert_eq!(got, vec![vector_for("slow", DIM)]);
    assert_eq!(server.count(), 2);
    assert_eq!(e.requests_sent(), 2);
}

#[tokio::test]
async fn server_errors_twice_then_success() {
    let server = Server::start(Behaviour::Ok, vec![Behaviour::Status(500), Behaviour::Status(503), Behaviour::Ok]);
    let e = embedder(config(&server, 5));
    let got = e.embed(&texts(&["a", "b"])).await.unwrap();
    assert_eq!(got, vec![vector_for("a", DIM), vector_for("b", DIM)]);
    assert_eq!(server.count(), 3);
    assert_eq!(e.requests_sent(), 3);
    assert_eq!(server.script_left(), 0);
    // Every attempt carried the same batch.
    assert!(server.requests().iter().all(|r| r.inputs() == texts(&["a", "b"])));
}

#[tokio::test]
async fn too_many_requests_is_retried() {
    let server = Server::start(Behaviour::Ok, vec![Behaviour::Status(429)]);
    let e = embedder(config(&server, 3));
    let got = e.embed(&texts(&["x"])).await.unwrap();
    assert_eq!(got, vec![vector_for("x", DIM)]);
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn malformed_json_every_time_is_unavailable_after_all_attempts() {
    let server = Server::start(Behaviour::Malformed, vec![]);
    let e = embedder(config(&server, 3));
    match e.embed(&texts(&["a"])).await {
        Err(EmbedError::Unavailable { attempts, message }) => {
            assert_eq!(attempts, 3);
            assert!(message.contains("malformed"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(server.count(), 3);
    assert_eq!(e.requests_sent(), 3);
}

#[tokio::test]
async fn wrong_dimension_is_misconfigured_without_retry() {
    let server = Server::start(Behaviour::WrongDimension(DIM + 3), vec![]);
    let e = embedder(config(&server, 5));
    match e.embed(&texts(&["a", "b"])).await {
        Err(EmbedError::Misconfigured { message }) => {
            assert!(message.contains(&format!("dimension {}", DIM + 3)), "{message}");
            assert!(message.contains(&format!("configured as {DIM}")), "{message}");
        }
        other => panic!("expected Misconfigured, got {other:?}"),
    }
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn bad_request_is_rejected_without_retry() {
    let server = Server::start(Behaviour::Status(400), vec![]);
    let e = embedder(config(&server, 5));
    match e.embed(&texts(&["a"])).await {
        Err(EmbedError::Rejected { message }) => assert!(message.contains("scripted 400"), "{message}"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(server.count(), 1);
    assert_eq!(e.breaker_state(), BreakerState::Closed, "an answered request does not count against the breaker");
}

#[tokio::test]
async fn unauthorized_is_misconfigured_without_retry() {
    let server = Server::start(Behaviour::Status(401), vec![]);
    let e = embedder(config(&server, 5));
    match e.embed(&texts(&["a"])).await {
        Err(EmbedError::Misconfigured { message }) => assert!(message.contains("401"), "{message}"),
        other => panic!("expected Misconfigured, got {other:?}"),
    }
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn open_breaker_fails_fast_without_reaching_the_server() {
    let server = Server::start(Behaviour::Status(503), vec![]);
    let mut c = config(&server, 2);
    c.breaker = BreakerConfig { failure_threshold: 2, open_ms: 600_000 };
    let e = embedder(c);

    match e.embed(&texts(&["a"])).await {
        Err(EmbedError::Unavailable { attempts: 2, message }) => assert!(message.contains("503"), "{message}"),
        other => panic!("expected Unavailable after 2 attempts, got {other:?}"),
    }
    assert_eq!(server.count(), 2);
    assert!(matches!(e.breaker_state(), BreakerState::Open { .. }), "{:?}", e.breaker_state());

    match e.embed(&texts(&["b"])).await {
        Err(EmbedError::Unavailable { message, .. }) => assert!(message.contains("circuit breaker"), "{message}"),
        other => panic!("expected Unavailable from the open breaker, got {other:?}"),
    }
    assert_eq!(server.count(), 2, "no request may reach the server while the breaker is open");
    assert_eq!(e.requests_sent(), 2);
}

#[tokio::test]
#[allow(unsafe_code)] // std::env::set_var is unsafe since edition 2024
async fn bearer_token_from_the_named_variable_is_sent() {
    let var = format!("HARTONOMOUS_TEST_EMBED_KEY_{}", std::process::id());
    // SAFETY: the name is unique to this test and process; std serialises
    // environment access made through std::env.
    unsafe { std::env::set_var(&var, "sekrit-token-123") };
    let server = Server::start(Behaviour::Ok, vec![]);
    let mut c = config(&server, 2);
    c.api_key_env = Some(var.clone());
    let e = embedder(c);
    assert!(!format!("{e:?}").contains("sekrit"), "the token must not appear in Debug output");
    e.embed(&texts(&["a"])).await.unwrap();
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("authorization"), Some("Bearer sekrit-token-123"));

    let mut missing = config(&server, 2);
    missing.api_key_env = Some(format!("{var}_UNSET"));
    let err = OpenAiEmbedder::new(missing, system()).unwrap_err();
    assert!(err.contains(&format!("{var}_UNSET")), "{err}");
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    // Bind and drop a listener to get a port that nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = OpenAiConfig::new(format!("http://127.0.0.1:{port}"), "m", DIM);
    c.retry = RetryConfig { max_attempts: 2, initial_backoff_ms: 1, max_backoff_ms: 5, ..RetryConfig::default() };
    let e = embedder(c);
    match e.embed(&texts(&["a"])).await {
        Err(EmbedError::Unavailable { attempts: 2, .. }) => {}
        other => panic!("expected Unavailable after 2 attempts, got {other:?}"),
    }
    assert_eq!(e.requests_sent(), 2);
}

// --- HTTPS ---------------------------------------------------------------------

#[tokio::test]
async fn https_works_with_the_ca_file_and_an_untrusted_certificate_is_misconfigured() {
    let server = Server::start_tls(Behaviour::Ok, vec![]);
    assert!(server.base_url.starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, CA_PEM).unwrap();

    let trusting = OpenAiConfig { ca_file: Some(ca_file), ..config(&server, 3) };
    trusting.check().unwrap();
    let e = embedder(trusting);
    assert_eq!(e.embed(&texts(&["over", "tls"])).await.unwrap(), vec![vector_for("over", DIM), vector_for("tls", DIM)]);
    assert_eq!(server.count(), 1);

    // Without the CA the certificate is not trusted: a setup problem, not
    // retried (3 attempts allowed), and no request got through.
    let e = embedder(config(&server, 3));
    match e.embed(&texts(&["a"])).await {
        Err(EmbedError::Misconfigured { message }) => {
            assert!(message.contains("ca_file") && message.contains("not trusted"), "{message}")
        }
        other => panic!("expected Misconfigured, got {other:?}"),
    }
    assert_eq!(e.requests_sent(), 1, "a certificate error is not retried");
    assert_eq!(server.count(), 1, "nothing got through the failed handshake");
    assert_eq!(e.breaker_state(), BreakerState::Closed);
}

#[test]
fn a_ca_file_that_is_not_pem_certificates_is_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, LEAF_KEY_PEM).unwrap();
    let c = OpenAiConfig { ca_file: Some(key), ..OpenAiConfig::new("https://127.0.0.1:9", "m", DIM) };
    let err = c.check().unwrap_err();
    assert!(err.starts_with("ca_file") && err.contains("key.pem"), "{err}");
    assert!(OpenAiEmbedder::new(c, system()).is_err());
}

/// The W3C trace context of an input record reaches everything done for it
/// (crate::trace): the `trace_id` of its atom row, the `traceparent` header
/// of its `AtomIngested` event, and the `traceparent` of the embedding
/// request made for it (a child span of the same trace). A record without
/// one starts no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_trace_id_reaches_its_row_its_event_and_the_embedding_request() {
    use arrow::array::{Array, StringArray};
    let server = Server::start(Behaviour::Ok, vec![]);
    let dir = tempfile::tempdir().unwrap();
    let (mut app, _) = common::app(dir.path());
    // One text per request, so each request belongs to one record.
    app.embedder = Arc::new(embedder(OpenAiConfig { max_batch: 1, ..config(&server, 3) }));
    let spec = hartonomous::topology::bundled("atom-ingestion").unwrap();
    let trace = |i: usize| format!("{:032x}", 0xabc000 + i);
    let records: Vec<_> = (0..6)
        .map(|i| {
            let mut r = common::json_record(&spec.source.topic, &common::request_json(i, &format!("traced text {i}"), "tracing"));
            if i % 3 != 2 {
                r.headers.insert("traceparent", format!("00-{}-{:016x}-01", trace(i), 0x77 + i).into_bytes());
            }
            r
        })
        .collect();
    app.run_to_end(&spec, records).await.unwrap();
    let expected = |i: usize| if i % 3 != 2 { trace(i) } else { String::new() };

    // The rows.
    let batches = app.store.query("SELECT correlation_id, trace_id, content_hash FROM atoms ORDER BY correlation_id").await.unwrap();
    let mut rows = Vec::new();
    let mut by_hash = std::collections::HashMap::new();
    for b in &batches {
        let col = |c: usize| b.column(c).as_any().downcast_ref::<StringArray>().unwrap().clone();
        let (ids, traces, hashes) = (col(0), col(1), col(2));
        for i in 0..b.num_rows() {
            rows.push((ids.value(i).to_string(), traces.value(i).to_string()));
            by_hash.insert(hashes.value(i).to_string(), ids.value(i).to_string());
        }
    }
    assert_eq!(rows, (0..6).map(|i| (format!("req-{i}"), expected(i))).collect::<Vec<_>>());

    // The events (keyed by content hash).
    let events = app.log.records("atoms.ingested");
    assert_eq!(events.len(), 6);
    let mut sent: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            let hash = String::from_utf8(e.key.clone().unwrap()).unwrap();
            (by_hash[&hash].clone(), hartonomous::trace::trace_id(e.headers.get_str("traceparent")))
        })
        .collect();
    sent.sort();
    assert_eq!(sent, (0..6).map(|i| (format!("req-{i}"), expected(i))).collect::<Vec<_>>());

    // The embedding requests: one per record, a child of its trace.
    let requests = server.requests();
    assert_eq!(requests.len(), 6);
    let mut seen: Vec<(String, String)> = requests
        .iter()
        .map(|r| {
            let text = r.inputs().remove(0);
            let i: usize = text.rsplit(' ').next().unwrap().parse().unwrap();
            let tp = r.header("traceparent").map(str::to_string);
            if let Some(tp) = &tp {
                assert!(!tp.contains(&format!("{:016x}", 0x77 + i)), "a new span id, not the producer's: {tp}");
            }
            (format!("req-{i}"), hartonomous::trace::trace_id(tp.as_deref()))
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..6).map(|i| (format!("req-{i}"), expected(i))).collect::<Vec<_>>());
}
