//! Spans over OTLP: `hartonomous run --otlp-endpoint URL` exports a `batch`
//! span per window and a child span per stage call to an OTLP/HTTP
//! collector. The collector here is a small HTTP server inside the test (an
//! edge we do not own) that decodes the protobuf export requests.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// Accepts OTLP/HTTP export requests and keeps their bodies.
fn collector() -> (String, Arc<Mutex<Vec<(String, Vec<u8>)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut length = 0;
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    keep.lock().unwrap().push((path, body));
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if reader.get_mut().write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, got)
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    })
}

#[test]
fn a_run_exports_a_span_per_window_and_per_stage_call() {
    let (url, got) = collector();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .args(["run", "--input", "tests/data/demo-atoms.jsonl", "--otlp-endpoint", &url])
        .env("HARTONOMOUS_DATA_DIR", dir.path())
        .env_remove("HARTONOMOUS_CONNECTORS")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let exports = got.lock().unwrap().clone();
    assert!(!exports.is_empty(), "no export request reached the collector");
    let mut spans = Vec::new();
    for (path, body) in &exports {
        assert_eq!(path, "/v1/traces");
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP protobuf export request");
        for rs in request.resource_spans {
            let service = rs.resource.as_ref().and_then(|r| r.attributes.iter().find(|a| a.key == "service.name")).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            });
            assert_eq!(service.as_deref(), Some("hartonomous"));
            spans.extend(rs.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }
    let batches: HashMap<Vec<u8>, &opentelemetry_proto::tonic::trace::v1::Span> =
        spans.iter().filter(|s| s.name == "batch").map(|s| (s.span_id.clone(), s)).collect();
    assert!(!batches.is_empty(), "no batch span: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let records: u64 = batches.values().map(|b| attribute(b, "records").unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(records, 27, "every input line is in one window's span");
    let mut stages = BTreeSet::new();
    for s in spans.iter().filter(|s| s.name != "batch") {
        let parent = batches.get(&s.parent_span_id).unwrap_or_else(|| panic!("stage span {} has no batch parent", s.name));
        assert_eq!(s.trace_id, parent.trace_id, "a stage span is in its window's trace");
        assert_eq!(attribute(s, "topology").as_deref(), Some("atom-ingestion"));
        assert_eq!(attribute(s, "stage").as_deref(), Some(s.name.as_str()));
        stages.insert(s.name.clone());
    }
    let expected: BTreeSet<String> = ["decode", "validate", "hash", "dedup", "embed", "persist", "arrivals", "publish"].map(String::from).into();
    assert_eq!(stages, expected);
}

/// Without an endpoint nothing is exported and nothing is attempted.
#[test]
fn tracing_is_off_by_default() {
    let (url, got) = collector();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .args(["run", "--input", "tests/data/demo-atoms.jsonl"])
        .env("HARTONOMOUS_DATA_DIR", dir.path())
        // Set, but empty: as good as unset.
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("HARTONOMOUS_OTLP_ENDPOINT")
        .env_remove("HARTONOMOUS_CONNECTORS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(got.lock().unwrap().is_empty(), "spans sent to {url} without being asked");
}
