//! `ConfluentRegistry` against a fake Confluent Schema Registry started by the
//! test: HTTP/1.1 (or HTTPS through rustls) on 127.0.0.1, std threads, one
//! connection per request.
//!
//! The fake implements what the client calls: `GET /schemas/ids/{id}` and
//! `POST /subjects/{subject}/versions` (ids are global and assigned per
//! distinct schema, by Parsing Canonical Form, like Confluent), with optional
//! basic-auth checking. It logs every request; tests assert outcomes and
//! request counts, never durations.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::types::Value;
use hartonomous::atom::AtomIngestionRequest;
use hartonomous::avro::confluent::DEFAULT_NEGATIVE_CACHE_MS;
use hartonomous::avro::confluent::{ConfluentRegistry, ConfluentRegistryConfig};
use hartonomous::avro::{
    ATOM_INGESTION_REQUEST, DecodeError, RegistryError, SchemaProblem, SchemaRegistry, Schemas, WireError, decode_message, encode,
};
use hartonomous::clock::ManualClock;
use hartonomous::outcome::{Classify, ErrorClass};
use serde_json::json;

mod common;
use common::tls::{CA_PEM, server_tls_config};

const USER: &str = "registry-user";
const PASSWORD: &str = "s3cret-p4ss";
const PASSWORD_ENV: &str = "HARTONOMOUS_TEST_CONFLUENT_REGISTRY_PASSWORD";
const WRONG_PASSWORD_ENV: &str = "HARTONOMOUS_TEST_CONFLUENT_REGISTRY_WRONG_PASSWORD";

#[allow(unsafe_code)] // std::env::set_var is unsafe since edition 2024
fn set_password_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: these variables are only ever written here, once, and only
        // read through std::env (which synchronises with set_var); no code in
        // this test binary reads the environment through libc concurrently.
        unsafe {
            std::env::set_var(PASSWORD_ENV, PASSWORD);
            std::env::set_var(WRONG_PASSWORD_ENV, "not-the-password");
        }
    });
}

// --- the fake registry -------------------------------------------------------

#[derive(Default)]
struct State {
    /// id - 1 → (canonical form, schema text as registered).
    schemas: Vec<(String, String)>,
    /// subject → ids registered under it.
    subjects: HashMap<String, Vec<u32>>,
    /// `METHOD path` of every request received.
    log: Vec<String>,
    /// When set, every request gets exactly these bytes as its response.
    canned: Option<Vec<u8>>,
    /// Pause before answering a schema lookup (to make lookups overlap).
    lookup_delay_ms: u64,
}

struct Fake {
    /// Expected `Authorization` header, if the fake checks credentials.
    auth: Option<String>,
    state: Mutex<State>,
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn count(&self, prefix: &str) -> usize {
        self.state().log.iter().filter(|l| l.starts_with(prefix)).count()
    }

    /// Answers every following request with `response` (raw HTTP bytes).
    fn can(&self, response: impl Into<Vec<u8>>) {
        self.state().canned = Some(response.into());
    }

    fn uncan(&self) {
        self.state().canned = None;
    }

    /// Puts `text` directly into the fake's store, returning its id.
    fn preload(&self, subject: &str, text: &str) -> u32 {
        let canonical = Schema::parse_str(text).unwrap().canonical_form();
        let mut s = self.state();
        s.schemas.push((canonical, text.to_string()));
        let id = s.schemas.len() as u32;
        s.subjects.entry(subject.to_string()).or_default().push(id);
        id
    }

    fn answer(&self, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> Vec<u8> {
        let delay = {
            let mut s = self.state();
            s.log.push(format!("{method} {path}"));
            if let Some(canned) = &s.canned {
                return canned.clone();
            }
            s.lookup_delay_ms
        };
        if let Some(expected) = &self.auth
            && auth != Some(expected.as_str())
        {
            return response(401, &json!({"error_code": 401, "message": "Unauthorized"}).to_string());
        }
        let route = path.split('?').next().unwrap_or_default();
        let parts: Vec<&str> = route.trim_start_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            ("GET", ["schemas", "ids", id]) => {
                if delay > 0 {
                    std::thread::sleep(Duration::from_millis(delay));
                }
                let s = self.state();
                match id.parse::<usize>().ok().and_then(|i| s.schemas.get(i.wrapping_sub(1))) {
                    Some((_, text)) => response(200, &json!({"schema": text}).to_string()),
                    None => response(404, &json!({"error_code": 40403, "message": "Schema not found"}).to_string()),
                }
            }
            ("POST", ["subjects", subject, "versions"]) => {
                let request: serde_json::Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(_) => {
                        return response(400, &json!({"error_code": 400, "message": "bad JSON"}).to_string());
                    }
                };
                assert_eq!(request["schemaType"], "AVRO", "{request}");
                let text = request["schema"].as_str().expect("schema string").to_string();
                let canonical = match Schema::parse_str(&text) {
                    Ok(s) => s.canonical_form(),
                    Err(e) => {
                        return response(422, &json!({"error_code": 42201, "message": format!("Invalid schema: {e}")}).to_string());
                    }
                };
                let mut s = self.state();
                let id = match s.schemas.iter().position(|(c, _)| *c == canonical) {
                    Some(i) => i as u32 + 1,
                    None => {
                        s.schemas.push((canonical, text));
                        s.schemas.len() as u32
                    }
                };
                let ids = s.subjects.entry(subject.to_string()).or_default();
                if !ids.contains(&id) {
                    ids.push(id);
                }
                response(200, &json!({"id": id}).to_string())
            }
            _ => response(404, &json!({"error_code": 404, "message": "HTTP 404 Not Found"}).to_string()),
        }
    }
}

fn response(status: u16, body: &str) -> Vec<u8> {
    raw_response(status, "application/vnd.schemaregistry.v1+json", body)
}

fn raw_response(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// Reads one request from `stream`, answers it, and returns.
fn serve_one(fake: &Fake, stream: &mut (impl Read + Write)) {
    let mut reader = BufReader::new(&mut *stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return; // e.g. a TLS handshake the client aborted
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let path = words.next().unwrap_or_default().to_string();
    let mut length = 0usize;
    let mut auth = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() {
            return;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "authorization" => auth = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    drop(reader);
    let answer = fake.answer(&method, &path, auth.as_deref(), &body);
    let _ = stream.write_all(&answer);
    let _ = stream.flush();
}

struct Server {
    base_url: String,
    fake: Arc<Fake>,
}

/// Starts a fake registry; with `tls`, it speaks HTTPS with the test leaf
/// certificate.
fn start(auth: bool, tls: bool) -> Server {
    let fake = Arc::new(Fake {
        auth: auth.then(|| format!("Basic {}", base64(format!("{USER}:{PASSWORD}").as_bytes()))),
        state: Mutex::new(State::default()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls_config = tls.then(server_tls_config);
    let f = fake.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let fake = f.clone();
            let tls_config = tls_config.clone();
            std::thread::spawn(move || handle(&fake, tcp, tls_config));
        }
    });
    let scheme = if tls { "https" } else { "http" };
    Server { base_url: format!("{scheme}://127.0.0.1:{port}"), fake }
}

fn handle(fake: &Fake, tcp: TcpStream, tls: Option<Arc<rustls::ServerConfig>>) {
    match tls {
        None => {
            let mut tcp = tcp;
            serve_one(fake, &mut tcp);
        }
        Some(config) => {
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            serve_one(fake, &mut stream);
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    }
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// --- helpers -------------------------------------------------------------------

fn config(url: &str) -> ConfluentRegistryConfig {
    ConfluentRegistryConfig { timeout_ms: 5_000, ..ConfluentRegistryConfig::new(url) }
}

fn authed(url: &str) -> ConfluentRegistryConfig {
    set_password_env();
    ConfluentRegistryConfig { username: Some(USER.into()), password_env: Some(PASSWORD_ENV.into()), ..config(url) }
}

fn bundled(version: u32) -> Arc<Schema> {
    Schemas::version(ATOM_INGESTION_REQUEST, version).unwrap().schema.clone()
}

/// A URL nothing listens on: a port that was just free.
fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

const SUBJECT: &str = "atoms.ingest-value";

// --- tests -----------------------------------------------------------------------

#[tokio::test]
async fn register_then_fetch_round_trips_and_repeat_lookups_are_cached() {
    let server = start(true, false);
    let registry = ConfluentRegistry::new(authed(&server.base_url)).unwrap();
    let v1 = bundled(1);

    let id = registry.register(SUBJECT, &v1).await.unwrap();
    assert_eq!(server.fake.count("POST /subjects/atoms.ingest-value/versions"), 1);
    // Same subject and schema again: answered from the registration cache.
    assert_eq!(registry.register(SUBJECT, &v1).await.unwrap(), id);
    assert_eq!(server.fake.count("POST"), 1);
    // Another client (no cache) gets the same id from the registry.
    let other = ConfluentRegistry::new(authed(&server.base_url)).unwrap();
    assert_eq!(other.register(SUBJECT, &v1).await.unwrap(), id);
    assert_eq!(server.fake.count("POST"), 2);
    // A different schema gets a different id.
    let id2 = registry.register(SUBJECT, &bundled(2)).await.unwrap();
    assert_ne!(id2, id);

    let fetched = registry.schema_by_id(id).await.unwrap();
    assert_eq!(fetched.canonical_form(), v1.canonical_form());
    assert_eq!(server.fake.count(&format!("GET /schemas/ids/{id}")), 1);
    assert_eq!(registry.cached_ids(), 1);

    let again = registry.schema_by_id(id).await.unwrap();
    assert!(Arc::ptr_eq(&fetched, &again), "second lookup is the cached schema");
    assert_eq!(server.fake.count("GET"), 1, "second lookup made no request");
}

#[tokio::test]
async fn fetched_schema_keeps_logical_types_and_defaults() {
    let server = start(false, false);
    let registry = ConfluentRegistry::new(config(&server.base_url)).unwrap();
    let v2 = bundled(2);
    let id = registry.register(SUBJECT, &v2).await.unwrap();
    let fetched = registry.schema_by_id(id).await.unwrap();
    assert_eq!(fetched.canonical_form(), v2.canonical_form());
    let text = serde_json::to_string(&*fetched).unwrap();
    assert!(text.contains("timestamp-millis"), "{text}");
    assert_eq!(
        serde_json::to_value(&*fetched).unwrap(),
        serde_json::to_value(&*v2).unwrap(),
        "the full schema, docs and defaults included, survives the round trip"
    );
}

#[tokio::test]
async fn v1_message_decodes_with_v2_reader_through_the_registry() {
    let server = start(true, false);
    let producer = ConfluentRegistry::new(authed(&server.base_url)).unwrap();
    let writer = bundled(1);
    let id = producer.register(SUBJECT, &writer).await.unwrap();

    let value = Value::Record(vec![
        ("content_type".into(), Value::String("text/plain".into())),
        ("content".into(), Value::Bytes(b"hello registry".to_vec())),
        ("metadata".into(), Value::Map([("k".to_string(), Value::String("v".into()))].into())),
        ("source_system".into(), Value::String("legacy-producer".into())),
        ("correlation_id".into(), Value::String("c-42".into())),
    ])
    .resolve(&writer)
    .unwrap();
    let bytes = encode(id, &writer, &value).unwrap();

    // A consumer with its own client: the writer schema comes from the registry.
    let consumer = ConfluentRegistry::new(authed(&server.base_url)).unwrap();
    let reader = Schemas::current(ATOM_INGESTION_REQUEST).unwrap();
    assert_eq!(reader.version, 2);
    let (got_id, decoded) = decode_message(&consumer, &reader.schema, &bytes).await.unwrap();
    assert_eq!(got_id, id);
    let request: AtomIngestionRequest = apache_avro::from_value(&decoded).unwrap();
    assert_eq!(
        request,
        AtomIngestionRequest {
            content_type: "text/plain".into(),
            content: b"hello registry".to_vec(),
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
            source_system: "legacy-producer".into(),
            correlation_id: "c-42".into(),
            created_at_ms: None,
        }
    );
    assert_eq!(server.fake.count(&format!("GET /schemas/ids/{id}")), 1);
}

#[tokio::test]
async fn unknown_id_is_unknown_id_and_is_remembered_only_for_negative_cache_ms() {
    let server = start(false, false);
    let clock = ManualClock::new(1_000_000);
    let registry = ConfluentRegistry::with_clock(config(&server.base_url), clock.shared()).unwrap();

    let err = registry.schema_by_id(7).await.unwrap_err();
    assert_eq!(err, RegistryError::UnknownId(7));
    assert_eq!(err.code(), "decode.unknown_schema");
    assert_eq!(err.class(), ErrorClass::Invalid);

    // Through decode_message it is the record's fault: dead-letter it.
    let writer = bundled(1);
    let value = Value::Record(vec![
        ("content_type".into(), Value::String("text/plain".into())),
        ("content".into(), Value::Bytes(b"x".to_vec())),
        ("metadata".into(), Value::Map(HashMap::new())),
        ("source_system".into(), Value::String("s".into())),
        ("correlation_id".into(), Value::String("c".into())),
    ])
    .resolve(&writer)
    .unwrap();
    let bytes = encode(7, &writer, &value).unwrap();
    let err = decode_message(&registry, &bundled(2), &bytes).await.unwrap_err();
    assert_eq!(err, DecodeError::Invalid(WireError::UnknownSchema(7)));
    assert_eq!(err.class(), ErrorClass::Invalid);

    assert_eq!(server.fake.count("GET /schemas/ids/7"), 1, "the second look-up was answered from memory");

    // Registered later, the id resolves once the negative answer expires.
    let id = server.fake.preload(SUBJECT, Schemas::version(ATOM_INGESTION_REQUEST, 1).unwrap().source);
    assert_eq!(id, 1);
    for i in 1..=6 {
        server.fake.preload("filler-value", &format!(r#"{{"type":"record","name":"F{i}","fields":[]}}"#));
    }
    assert_eq!(registry.schema_by_id(7).await.unwrap_err(), RegistryError::UnknownId(7), "still remembered");
    clock.advance(Duration::from_millis(DEFAULT_NEGATIVE_CACHE_MS));
    let schema = registry.schema_by_id(7).await.unwrap();
    assert!(schema.canonical_form().contains("F6"), "{}", schema.canonical_form());
    assert_eq!(server.fake.count("GET /schemas/ids/7"), 2);
    assert_eq!(registry.negative_ids(), 0, "the expired answer is gone");
}

#[tokio::test]
async fn a_burst_of_one_unknown_id_makes_one_request_per_negative_cache_ms() {
    let server = start(false, false);
    let clock = ManualClock::new(0);
    let registry =
        ConfluentRegistry::with_clock(ConfluentRegistryConfig { negative_cache_ms: 5_000, ..config(&server.base_url) }, clock.shared())
            .unwrap();
    // 1,000 look-ups at once (they overlap the first request) ...
    let burst = futures::future::join_all((0..1_000).map(|_| registry.schema_by_id(4242))).await;
    assert!(burst.iter().all(|r| matches!(r, Err(RegistryError::UnknownId(4242)))));
    assert_eq!(server.fake.count("GET /schemas/ids/4242"), 1);
    // ... and one after another, until just before the TTL ends.
    for _ in 0..1_000 {
        assert!(matches!(registry.schema_by_id(4242).await, Err(RegistryError::UnknownId(4242))));
    }
    clock.advance(Duration::from_millis(4_999));
    assert!(registry.schema_by_id(4242).await.is_err());
    assert_eq!(server.fake.count("GET"), 1, "exactly one request within the TTL");
    // Past the TTL the registry is asked again, once, and the answer is remembered again.
    clock.advance(Duration::from_millis(1));
    for _ in 0..100 {
        assert!(matches!(registry.schema_by_id(4242).await, Err(RegistryError::UnknownId(4242))));
    }
    assert_eq!(server.fake.count("GET"), 2);
    // Another unknown id is its own entry.
    assert!(registry.schema_by_id(4243).await.is_err());
    assert_eq!(server.fake.count("GET"), 3);
    assert_eq!(registry.negative_ids(), 2);
    // Registering a schema through this client clears a negative answer for
    // its id at once.
    assert!(matches!(registry.schema_by_id(1).await, Err(RegistryError::UnknownId(1))));
    let id = registry.register(SUBJECT, &bundled(1)).await.unwrap();
    assert_eq!(id, 1);
    assert_eq!(registry.schema_by_id(id).await.unwrap().canonical_form(), bundled(1).canonical_form());
    assert_eq!(server.fake.count("GET"), 5);
}

/// A registry answer for `schema` with extra fields (`schemaType`, `references`).
fn schema_answer(schema: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut body = json!({ "schema": schema });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    response(200, &body.to_string())
}

#[tokio::test]
async fn schemas_that_cannot_be_decoded_with_are_per_record_rejections_with_their_code() {
    let server = start(false, false);
    let clock = ManualClock::new(0);
    let registry = ConfluentRegistry::with_clock(config(&server.base_url), clock.shared()).unwrap();
    let json_schema = r#"{"type":"object","properties":{"content":{"type":"string"}}}"#;
    let cases: Vec<(u32, &str, Vec<u8>, SchemaProblem, &str)> = vec![
        (21, "JSON Schema", schema_answer(json_schema, json!({"schemaType": "JSON"})), SchemaProblem::NotAvro, "decode.schema_not_avro"),
        (
            22,
            "Protobuf schema",
            schema_answer("syntax = \"proto3\"; message Atom { bytes content = 1; }", json!({"schemaType": "PROTOBUF"})),
            SchemaProblem::NotAvro,
            "decode.schema_not_avro",
        ),
        (
            23,
            "Avro with references",
            schema_answer(
                r#"{"type":"record","name":"A","fields":[{"name":"b","type":"B"}]}"#,
                json!({"schemaType": "AVRO", "references": [{"name": "B", "subject": "b-value", "version": 1}]}),
            ),
            SchemaProblem::References,
            "decode.schema_references",
        ),
        (24, "unparsable Avro", schema_answer(r#"{"type": "nope"}"#, json!({})), SchemaProblem::Unparsable, "decode.schema_unparsable"),
        (
            25,
            "Avro that is not JSON",
            schema_answer("{not json", json!({"schemaType": "AVRO"})),
            SchemaProblem::Unparsable,
            "decode.schema_unparsable",
        ),
    ];
    let writer = bundled(1);
    let value = Value::Record(vec![
        ("content_type".into(), Value::String("text/plain".into())),
        ("content".into(), Value::Bytes(b"x".to_vec())),
        ("metadata".into(), Value::Map(HashMap::new())),
        ("source_system".into(), Value::String("s".into())),
        ("correlation_id".into(), Value::String("c".into())),
    ])
    .resolve(&writer)
    .unwrap();
    for (id, what, answer, problem, code) in cases {
        server.fake.can(answer);
        let err = registry.schema_by_id(id).await.unwrap_err();
        assert!(matches!(&err, RegistryError::Unusable { id: i, problem: p, .. } if *i == id && *p == problem), "{what}: {err:?}");
        assert_eq!(err.class(), ErrorClass::Invalid, "{what}: the record's fault, not the registry's");
        assert_eq!(err.code(), code, "{what}");
        assert!(err.to_string().contains(&format!("schema id {id}")), "{what}: {err}");
        // Through decode_message: a per-record rejection with the same code.
        let bytes = encode(id, &writer, &value).unwrap();
        let err = decode_message(&registry, &bundled(2), &bytes).await.unwrap_err();
        assert!(matches!(&err, DecodeError::Invalid(WireError::UnusableSchema { .. })), "{what}: {err:?}");
        assert_eq!((err.code(), err.class()), (code, ErrorClass::Invalid), "{what}");
        assert_eq!(server.fake.count(&format!("GET /schemas/ids/{id}")), 1, "{what}: remembered, asked once");
    }
    assert_eq!(registry.cached_ids(), 0);
    assert_eq!(registry.negative_ids(), 5);
}

#[tokio::test]
async fn server_errors_are_unavailable_and_retryable() {
    let server = start(false, false);
    let registry = ConfluentRegistry::new(config(&server.base_url)).unwrap();
    let id = registry.register(SUBJECT, &bundled(1)).await.unwrap();

    for status in [500, 503] {
        server.fake.can(response(status, &json!({"error_code": 50001, "message": "Error in the backend data store"}).to_string()));
        let err = registry.schema_by_id(id).await.unwrap_err();
        assert!(matches!(&err, RegistryError::Unavailable(m) if m.contains(&status.to_string())), "{err:?}");
        assert_eq!(err.class(), ErrorClass::Retry);
        assert_eq!(err.code(), "registry.unavailable");
        let err = registry.register("other-value", &bundled(2)).await.unwrap_err();
        assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    }
    // A 500 whose body is not a registry error is still the server's problem.
    server.fake.can(raw_response(500, "text/plain", "oops"));
    let err = registry.schema_by_id(id).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");

    // Once the registry recovers, the same calls succeed.
    server.fake.uncan();
    assert_eq!(registry.schema_by_id(id).await.unwrap().canonical_form(), bundled(1).canonical_form());
    assert!(registry.register("other-value", &bundled(2)).await.is_ok());
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_fatal_and_the_password_is_never_shown() {
    let server = start(true, false);
    let good = ConfluentRegistry::new(authed(&server.base_url)).unwrap();
    let id = good.register(SUBJECT, &bundled(1)).await.unwrap();

    let wrong =
        ConfluentRegistry::new(ConfluentRegistryConfig { password_env: Some(WRONG_PASSWORD_ENV.into()), ..authed(&server.base_url) })
            .unwrap();
    let err = wrong.schema_by_id(id).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Invalid(m) if m.contains("401") && m.contains("password_env")), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Fatal);
    let err = wrong.register(SUBJECT, &bundled(1)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Fatal, "{err:?}");

    let anonymous = ConfluentRegistry::new(config(&server.base_url)).unwrap();
    let err = anonymous.schema_by_id(id).await.unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)), "{err:?}");

    let shown = format!("{good:?} {wrong:?}");
    assert!(shown.contains(USER), "{shown}");
    assert!(!shown.contains(PASSWORD) && !shown.contains("not-the-password"), "{shown}");
    assert!(!err.to_string().contains(PASSWORD));
}

#[tokio::test]
async fn unreachable_registry_is_unavailable_and_later_urls_are_tried() {
    let dead = dead_url();
    let registry = ConfluentRegistry::new(config(&dead)).unwrap();
    let err = registry.schema_by_id(1).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Unavailable(m) if m.contains(&dead)), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Retry);
    let err = registry.register(SUBJECT, &bundled(1)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");

    let server = start(false, false);
    let registry = ConfluentRegistry::new(config(&format!("{dead}, {}/", server.base_url))).unwrap();
    assert_eq!(registry.urls(), [dead.clone(), server.base_url.clone()]);
    let id = registry.register(SUBJECT, &bundled(1)).await.unwrap();
    assert_eq!(registry.schema_by_id(id).await.unwrap().canonical_form(), bundled(1).canonical_form());
}

#[tokio::test]
async fn answers_that_are_not_a_registry_are_invalid_but_cut_off_answers_are_unavailable() {
    let server = start(false, false);
    let registry = ConfluentRegistry::new(config(&server.base_url)).unwrap();
    // (Answers that are registry JSON but carry a schema this client cannot
    // use are per-record rejections: see the test above.)
    let invalid: Vec<(&str, Vec<u8>)> = vec![
        ("bare 404 (wrong path or proxy)", raw_response(404, "text/html", "<h1>Not Found</h1>")),
        ("HTML page", raw_response(200, "text/html", "<html>login</html>")),
        ("JSON without a schema", response(200, r#"{"foo": 1}"#)),
        ("a JSON string, not an object", response(200, r#""schema""#)),
    ];
    for (what, canned) in invalid {
        server.fake.can(canned);
        let err = registry.schema_by_id(1).await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{what}: {err:?}");
        assert_eq!(err.class(), ErrorClass::Fatal, "{what}");
    }
    // Registration: an answer without an id, and a schema the registry rejects.
    server.fake.can(response(200, r#"{"version": 1}"#));
    let err = registry.register(SUBJECT, &bundled(1)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)), "{err:?}");
    server.fake.can(response(409, &json!({"error_code": 409, "message": "Schema being registered is incompatible"}).to_string()));
    let err = registry.register(SUBJECT, &bundled(1)).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Invalid(m) if m.contains("incompatible")), "{err:?}");
    assert!(registry.cached_ids() == 0);

    // The body announces more bytes than arrive before the connection closes.
    server.fake.can(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\nConnection: close\r\n\r\n{\"schema\": \"{".as_bytes(),
    );
    let err = registry.schema_by_id(1).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn subjects_that_cannot_go_into_a_url_are_rejected_without_a_request() {
    let server = start(false, false);
    let registry = ConfluentRegistry::new(config(&server.base_url)).unwrap();
    for subject in ["", "a b-value", "a?b-value", "a#b"] {
        let err = registry.register(subject, &bundled(1)).await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{subject:?}: {err:?}");
    }
    assert_eq!(server.fake.count(""), 0);
    // A slash is escaped and reaches the registry as one path segment.
    registry.register("team/atoms-value", &bundled(1)).await.unwrap();
    assert_eq!(server.fake.count("POST /subjects/team%2Fatoms-value/versions"), 1);
}

#[tokio::test]
async fn concurrent_lookups_of_one_id_make_one_request() {
    let server = start(false, false);
    let id = server.fake.preload(SUBJECT, Schemas::version(ATOM_INGESTION_REQUEST, 1).unwrap().source);
    server.fake.state().lookup_delay_ms = 50;
    let registry = ConfluentRegistry::new(config(&server.base_url)).unwrap();
    let lookups = (0..8).map(|_| registry.schema_by_id(id));
    let results = futures::future::join_all(lookups).await;
    for r in &results {
        assert_eq!(r.as_ref().unwrap().canonical_form(), bundled(1).canonical_form());
    }
    assert_eq!(server.fake.count("GET"), 1);
}

#[tokio::test]
async fn bounded_cache_refetches_evicted_ids() {
    let server = start(false, false);
    let a = server.fake.preload("a-value", r#"{"type":"record","name":"A","fields":[]}"#);
    let b = server.fake.preload("b-value", r#"{"type":"record","name":"B","fields":[]}"#);

    let one = ConfluentRegistry::new(ConfluentRegistryConfig { cache_capacity: Some(1), ..config(&server.base_url) }).unwrap();
    for id in [a, b, a] {
        one.schema_by_id(id).await.unwrap();
    }
    assert_eq!(one.cached_ids(), 1);
    assert_eq!(server.fake.count("GET"), 3, "capacity 1: `a` was evicted by `b`");

    let two = ConfluentRegistry::new(ConfluentRegistryConfig { cache_capacity: Some(2), ..config(&server.base_url) }).unwrap();
    for id in [a, b, a, b] {
        two.schema_by_id(id).await.unwrap();
    }
    assert_eq!(two.cached_ids(), 2);
    assert_eq!(server.fake.count("GET"), 5, "capacity 2: two more requests");
}

#[test]
fn config_parses_from_toml_and_check_names_the_field_and_the_fix() {
    let c: ConfluentRegistryConfig = toml::from_str(
        r#"
        url = "http://a:8081, https://b:8081/"
        username = "key"
        password_env = "SR_SECRET"
        timeout_ms = 2500
        cache_capacity = 100
        negative_cache_ms = 1500
        "#,
    )
    .unwrap();
    assert_eq!(c.negative_cache_ms, 1500);
    assert_eq!(c.url, vec!["http://a:8081", "https://b:8081/"]);
    assert_eq!(c.urls(), vec!["http://a:8081", "https://b:8081"]);
    assert_eq!((c.timeout_ms, c.cache_capacity), (2500, Some(100)));
    c.check().unwrap();

    let c: ConfluentRegistryConfig = toml::from_str(r#"url = ["http://a:8081", "http://b:8081"]"#).unwrap();
    assert_eq!(c.url.len(), 2);
    assert_eq!(c.timeout_ms, 10_000);
    assert_eq!(c.negative_cache_ms, 10_000);
    let d: ConfluentRegistryConfig = toml::from_str("").unwrap();
    assert_eq!(d.url, vec!["http://localhost:8081"]);
    d.check().unwrap();

    let err = toml::from_str::<ConfluentRegistryConfig>(r#"urls = "http://a""#).unwrap_err();
    assert!(err.to_string().contains("urls"), "{err}");

    let base = ConfluentRegistryConfig::new("http://localhost:8081");
    let cases: Vec<(ConfluentRegistryConfig, &str)> = vec![
        (ConfluentRegistryConfig { url: vec![], ..base.clone() }, "url is empty"),
        (ConfluentRegistryConfig::new("localhost:8081"), "scheme"),
        (ConfluentRegistryConfig::new("ftp://h"), "use http:// or https://"),
        (ConfluentRegistryConfig::new("not a url"), "not a valid URL"),
        (ConfluentRegistryConfig::new("http://u:pw@h:8081"), "username and password_env"),
        (ConfluentRegistryConfig::new("http://h:8081?x=1"), "query"),
        (ConfluentRegistryConfig { username: Some("k".into()), ..base.clone() }, "password_env is not"),
        (ConfluentRegistryConfig { password_env: Some("X".into()), ..base.clone() }, "username is not"),
        (ConfluentRegistryConfig { username: Some(" ".into()), password_env: Some("X".into()), ..base.clone() }, "username is empty"),
        (
            ConfluentRegistryConfig { username: Some("k".into()), password_env: Some("".into()), ..base.clone() },
            "password_env is not an environment variable name",
        ),
        (ConfluentRegistryConfig { timeout_ms: 0, ..base.clone() }, "timeout_ms is 0"),
        (ConfluentRegistryConfig { cache_capacity: Some(0), ..base.clone() }, "cache_capacity is 0"),
        (ConfluentRegistryConfig { negative_cache_ms: 0, ..base.clone() }, "negative_cache_ms is 0; set it to at least 1"),
        (ConfluentRegistryConfig { negative_cache_ms: 300_001, ..base.clone() }, "negative_cache_ms is 300001; set at most 300000"),
        (ConfluentRegistryConfig { ca_file: Some("".into()), ..base.clone() }, "ca_file is empty"),
    ];
    for (config, expected) in cases {
        let err = config.check().unwrap_err();
        assert!(err.contains(expected), "{config:?}: {err}");
        // The constructor refuses the same configuration.
        assert_eq!(ConfluentRegistry::new(config).unwrap_err(), err);
    }
    // Credentials in the URL are not echoed back.
    let err = ConfluentRegistryConfig::new("http://u:pw@h:8081").check().unwrap_err();
    assert!(!err.contains("pw@"), "{err}");
}

#[test]
fn construction_reports_a_missing_password_variable_and_a_bad_ca_file() {
    let err = ConfluentRegistry::new(ConfluentRegistryConfig {
        username: Some("k".into()),
        password_env: Some("HARTONOMOUS_TEST_CONFLUENT_REGISTRY_UNSET_VARIABLE".into()),
        ..ConfluentRegistryConfig::default()
    })
    .unwrap_err();
    assert!(err.contains("HARTONOMOUS_TEST_CONFLUENT_REGISTRY_UNSET_VARIABLE") && err.contains("not set"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = ConfluentRegistry::new(ConfluentRegistryConfig {
        ca_file: Some(missing),
        ..ConfluentRegistryConfig::new("https://registry.example:8081")
    })
    .unwrap_err();
    assert!(err.contains("ca_file") && err.contains("cannot be read"), "{err}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    let err = ConfluentRegistry::new(ConfluentRegistryConfig {
        ca_file: Some(empty),
        ..ConfluentRegistryConfig::new("https://registry.example:8081")
    })
    .unwrap_err();
    assert!(err.contains("ca_file"), "{err}");
}

// --- HTTPS ---------------------------------------------------------------------

#[tokio::test]
async fn https_works_with_a_private_ca_and_an_untrusted_certificate_is_fatal() {
    let server = start(true, true);
    assert!(server.base_url.starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, CA_PEM).unwrap();

    let registry = ConfluentRegistry::new(ConfluentRegistryConfig { ca_file: Some(ca_file), ..authed(&server.base_url) }).unwrap();
    let id = registry.register(SUBJECT, &bundled(1)).await.unwrap();
    assert_eq!(registry.schema_by_id(id).await.unwrap().canonical_form(), bundled(1).canonical_form());
    assert_eq!(server.fake.count("POST"), 1);
    assert_eq!(server.fake.count("GET"), 1);

    // Without the CA the server's certificate is not trusted: a setup problem.
    let untrusting = ConfluentRegistry::new(authed(&server.base_url)).unwrap();
    let err = untrusting.schema_by_id(id).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Invalid(m) if m.contains("ca_file")), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert_eq!(server.fake.count("GET"), 1, "no request got through the failed handshake");
}
