//! The ClickHouse store over HTTPS, against the test server's `https_port`.
//!
//! `tests/services.sh up` gives the test ClickHouse an https port (default
//! `https://127.0.0.1:18443`, `HARTONOMOUS_TEST_CLICKHOUSE_HTTPS`) whose
//! certificate is signed by a private test CA (`HARTONOMOUS_TEST_CLICKHOUSE_CA`,
//! default `~/.cache/hartonomous/services/clickhouse/tls/ca.pem`). The plain
//! HTTP port (`HARTONOMOUS_TEST_CLICKHOUSE`) is used to set up and check, outside
//! the store. Every test fails, saying so, when the server or the CA file is
//! missing. Each test works in a database of its own, dropped at the end.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use hartonomous::atom::ContentHash;
use hartonomous::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use hartonomous::store::{AtomStore, DeadLetterArchive, InsertReport, StoreError};

mod common;
use common::rows::{atoms, dead_letter};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| default.into())
}

fn http_url() -> String {
    env_or("HARTONOMOUS_TEST_CLICKHOUSE", "http://127.0.0.1:18123")
}

fn https_url() -> String {
    env_or("HARTONOMOUS_TEST_CLICKHOUSE_HTTPS", "https://127.0.0.1:18443")
}

/// The test CA that signed the server's certificate; panics, saying how to
/// get it, when it is missing.
fn ca_file() -> PathBuf {
    let path = match std::env::var("HARTONOMOUS_TEST_CLICKHOUSE_CA").ok().filter(|s| !s.trim().is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var("HARTONOMOUS_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/hartonomous"));
            cache.join("services/clickhouse/tls/ca.pem")
        }
    };
    assert!(
        path.is_file(),
        "the test CA {} is missing: start the test services with `tests/services.sh up` (it makes the CA and \
         serves ClickHouse over https), or point HARTONOMOUS_TEST_CLICKHOUSE_CA at the CA of your server",
        path.display()
    );
    path
}

/// `body` POSTed to the plain HTTP interface; the answer's body, or the error text.
fn http_post(body: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(&http_url()).map_err(|e| e.to_string())?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port_or_known_default().unwrap_or(8123);
    let mut stream = TcpStream::connect((host.as_str(), port)).map_err(|e| {
        format!("ClickHouse is not reachable at {url} ({e}); start it with `tests/services.sh up`, or set HARTONOMOUS_TEST_CLICKHOUSE")
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    write!(stream, "POST / HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, rest) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(response.clone());
    }
    // Chunked answers: keep only the data lines, which is enough for one small value.
    let text = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        rest.split("\r\n").enumerate().filter(|(i, _)| i % 2 == 1).map(|(_, l)| l).collect::<String>()
    } else {
        rest.to_string()
    };
    Ok(text)
}

fn database_exists(name: &str) -> bool {
    let n = http_post(&format!("SELECT count() FROM system.databases WHERE name = '{name}'")).unwrap();
    n.trim() == "1"
}

/// A database name of its own for one test; the database is dropped on drop.
struct TestDb {
    name: String,
}

impl TestDb {
    fn new() -> Self {
        let one = http_post("SELECT 1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.trim(), "1", "ClickHouse at {} answered SELECT 1 with {one}", http_url());
        Self { name: format!("hartonomous_tls_{}_{:08x}", std::process::id(), rand::random::<u32>()) }
    }

    fn config(&self, url: String, ca_file: Option<PathBuf>) -> ClickHouseConfig {
        ClickHouseConfig { url, ca_file, database: self.name.clone(), request_timeout_ms: 10_000, ..ClickHouseConfig::default() }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Err(e) = http_post(&format!("DROP DATABASE IF EXISTS {}", self.name)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

fn expect_fatal<T: std::fmt::Debug>(result: Result<T, StoreError>, mentions: &[&str]) -> String {
    match result {
        Err(StoreError::Fatal(message)) => {
            for m in mentions {
                assert!(message.contains(m), "expected `{m}` in: {message}");
            }
            message
        }
        other => panic!("expected StoreError::Fatal mentioning {mentions:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn https_with_the_ca_file_migrates_and_round_trips_rows() {
    let db = TestDb::new();
    let config = db.config(https_url(), Some(ca_file()));
    config.check().unwrap();
    let store = ClickHouseStore::connect(config).await.expect("connect over https with ca_file");
    assert!(database_exists(&db.name), "connect created the database over https");

    let rows = atoms("tls", 25);
    assert_eq!(store.insert_atoms(&rows).await.unwrap(), InsertReport { inserted: 25, already_present: 0 });
    assert_eq!(store.insert_atoms(&rows[..5]).await.unwrap(), InsertReport { inserted: 0, already_present: 5 });
    let mut asked: Vec<ContentHash> = rows.iter().map(|r| r.content_hash).collect();
    asked.push(ContentHash::of(b"never stored"));
    let found = store.existing_hashes(&asked).await.unwrap();
    assert_eq!(found.len(), 25);
    assert!(!found.contains(&ContentHash::of(b"never stored")));
    assert_eq!(store.insert_dead_letters(&[dead_letter("in", 0, 7)]).await.unwrap().inserted, 1);
    assert_eq!(store.count_atoms_final().await.unwrap(), 25);
    assert_eq!(store.count_dead_letters_final().await.unwrap(), 1);

    // What went over TLS is what the plain port sees.
    let sum = http_post(&format!("SELECT sum(source_offset) FROM {}.atoms FINAL", db.name)).unwrap();
    assert_eq!(sum.trim(), (0..25).sum::<i64>().to_string());
    let text = store.query_text("SELECT count() AS n FROM atoms").await.unwrap();
    assert!(text.contains("25"), "{text}");
}

#[tokio::test]
async fn https_without_the_ca_file_is_fatal_and_names_ca_file() {
    ca_file();
    let db = TestDb::new();
    let message = expect_fatal(ClickHouseStore::connect(db.config(https_url(), None)).await, &["ca_file", "not trusted"]);
    println!("without ca_file: {message}");
    assert!(!database_exists(&db.name), "nothing was created through a failed handshake");

    // A ca_file with another CA does not help either.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, OTHER_CA_PEM).unwrap();
    expect_fatal(ClickHouseStore::connect(db.config(https_url(), Some(other))).await, &["ca_file", "UnknownIssuer"]);
    // The query path classifies the same way.
    expect_fatal(ClickHouseStore::connect_for_query(db.config(https_url(), None)).await, &["ca_file"]);
}

/// An https url pointing at something that answers in plain HTTP (a proxy or
/// a web server; ClickHouse's own HTTP port just waits for more, so that case
/// ends in `request_timeout_ms`).
#[tokio::test]
async fn an_https_url_answered_in_plain_http_is_fatal() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut hello = [0u8; 512];
            let _ = stream.read(&mut hello);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let config = ClickHouseConfig { url: format!("https://127.0.0.1:{port}"), ca_file: Some(ca_file()), ..ClickHouseConfig::default() };
    expect_fatal(ClickHouseStore::connect(config).await, &["does not speak TLS", "https_port"]);
}

#[tokio::test]
async fn a_refused_https_connection_stays_retryable() {
    // Bind and drop a listener to get a port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = ClickHouseConfig {
        url: format!("https://127.0.0.1:{port}"),
        ca_file: Some(ca_file()),
        request_timeout_ms: 5_000,
        ..ClickHouseConfig::default()
    };
    match ClickHouseStore::connect(config).await {
        Err(StoreError::Unavailable(message)) => assert!(message.contains(&port.to_string()), "{message}"),
        other => panic!("expected StoreError::Unavailable, got {other:?}"),
    }
}

#[test]
fn a_ca_file_that_is_not_pem_is_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----\n").unwrap();
    let config = ClickHouseConfig { url: https_url(), ca_file: Some(key), ..ClickHouseConfig::default() };
    let err = config.check().unwrap_err();
    assert!(err.starts_with("ca_file") && err.contains("key.pem") && err.contains("PEM"), "{err}");
    let missing = ClickHouseConfig { ca_file: Some(dir.path().join("nope.pem")), ..config };
    let err = missing.check().unwrap_err();
    assert!(err.starts_with("ca_file") && err.contains("nope.pem") && err.contains("cannot be read"), "{err}");
}

/// A CA that signed nothing the server has (the Confluent registry test's CA).
const OTHER_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBcTCCARagAwIBAgICEAAwCgYIKoZIzj0EAwIwHjEcMBoGA1UEAwwTSGFydG9u
b21vdXMgVGVzdCBDQTAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFow
HjEcMBoGA1UEAwwTSGFydG9ub21vdXMgVGVzdCBDQTBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABPhMYjT8cUxiIprpClLtC6H6Ptrmsqj4i61K/P7MdgKj46yl8U88
VkGWCtoFrF21OOaFzSNEAcY5ahLbjRPzojujQjBAMA8GA1UdEwEB/wQFMAMBAf8w
DgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBSnK4i08UF263rByA+o64xgLNdpUzAK
BggqhkjOPQQDAgNJADBGAiEAny4loud1lGVjOdUrDU0/t630XQLRc7p2HSbvPcGT
VCkCIQD3kYRNt4OoIyN9O7KS38lgaBBAeSwCmH7lIqn1nH9JwQ==
-----END CERTIFICATE-----
";
