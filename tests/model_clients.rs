//! The HTTP model clients against local model servers started by each test:
//! what they send, how they read each protocol's answer, and how a server's
//! failures are classified (unavailable, rejected, misconfigured, unusable).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use hartonomous::model::http::{HttpModel, HttpModelConfig, Protocol};
use hartonomous::model::{Model, ModelError, Prediction};

mod common;

/// A model server that answers every request with `status` and `body`, and
/// records each request's path and body.
struct Server {
    url: String,
    seen: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    /// Each request's `traceparent` header, if it had one.
    traceparents: Arc<Mutex<Vec<Option<String>>>>,
}

impl Server {
    fn start(status: u16, body: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let traceparents = Arc::new(Mutex::new(Vec::new()));
        let (log, traces, body) = (seen.clone(), traceparents.clone(), body.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                let mut length = 0;
                let mut traceparent = None;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("traceparent:") {
                        traceparent = Some(v.trim().to_string());
                    }
                }
                traces.lock().unwrap().push(traceparent);
                let mut request = vec![0; length];
                reader.read_exact(&mut request).unwrap();
                log.lock().unwrap().push((path, serde_json::from_slice(&request).unwrap_or_default()));
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Self { url, seen, traceparents }
    }

    fn seen(&self) -> Vec<(String, serde_json::Value)> {
        self.seen.lock().unwrap().clone()
    }
}

fn model(url: &str, protocol: Protocol) -> HttpModel {
    HttpModel::new(HttpModelConfig {
        id: "m1".into(),
        version: "7".into(),
        base_url: url.into(),
        ca_file: None,
        api_key_env: None,
        attempt_timeout_ms: 5_000,
        protocol,
    })
    .unwrap()
}

fn oip() -> Protocol {
    Protocol::OipV2 { model: "clf".into(), input_name: "text".into(), label_output: "label".into(), score_output: Some("score".into()) }
}

#[tokio::test]
async fn open_inference_protocol_v2() {
    let server = Server::start(200, r#"{"model_name":"clf","outputs":[{"name":"label","shape":[1],"datatype":"BYTES","data":["spam"]},{"name":"score","shape":[1],"datatype":"FP32","data":[0.9]}]}"#);
    let m = model(&server.url, oip());
    assert_eq!(m.predict("win a prize").await.unwrap(), Prediction { label: "spam".into(), score: Some(0.9) });
    assert_eq!((m.id(), m.version()), ("m1", "7"));
    let (path, body) = &server.seen()[0];
    assert_eq!(path, "/v2/models/clf/infer");
    assert_eq!(body["inputs"][0], serde_json::json!({"name": "text", "shape": [1], "datatype": "BYTES", "data": ["win a prize"]}));
}

#[tokio::test]
async fn openai_compatible_chat() {
    let server = Server::start(200, r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Label: positive."}}]}"#);
    let protocol = Protocol::OpenaiChat { model: "llm".into(), system_prompt: Some("Answer positive or negative.".into()), labels: vec!["positive".into(), "negative".into()] };
    let m = model(&format!("{}/v1", server.url), protocol);
    assert_eq!(m.predict("great film").await.unwrap(), Prediction { label: "positive".into(), score: None });
    let (path, body) = &server.seen()[0];
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(body["model"], "llm");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1], serde_json::json!({"role": "user", "content": "great film"}));
}

#[tokio::test]
async fn generic_json_endpoint() {
    let server = Server::start(200, r#"{"prediction":{"label":"fraud","confidence":0.61}}"#);
    let protocol = Protocol::Json { input_field: "text".into(), label_pointer: "/prediction/label".into(), score_pointer: Some("/prediction/confidence".into()) };
    let m = model(&format!("{}/classify", server.url), protocol);
    assert_eq!(m.predict("wire $9,000").await.unwrap(), Prediction { label: "fraud".into(), score: Some(0.61) });
    assert_eq!(server.seen()[0], ("/classify".to_string(), serde_json::json!({"text": "wire $9,000"})));
}

#[tokio::test]
async fn failures_are_classified() {
    let cases: [(u16, &str, fn(&ModelError) -> bool); 5] = [
        (503, "overloaded", |e| matches!(e, ModelError::Unavailable(_))),
        (429, "slow down", |e| matches!(e, ModelError::Unavailable(_))),
        (422, "bad input", |e| matches!(e, ModelError::Rejected(_))),
        (404, "no such model", |e| matches!(e, ModelError::Misconfigured(_))),
        (200, "<html>garbage</html>", |e| matches!(e, ModelError::BadAnswer(_))),
    ];
    for (status, body, expect) in cases {
        let server = Server::start(status, body);
        let e = model(&server.url, oip()).predict("x").await.unwrap_err();
        assert!(expect(&e), "HTTP {status}: {e}");
        assert!(e.to_string().contains(body), "the error quotes the server: {e}");
    }
    // A JSON answer without the label tensor is unusable, and says which tensor.
    let server = Server::start(200, r#"{"outputs":[{"name":"other","data":["x"]}]}"#);
    let e = model(&server.url, oip()).predict("x").await.unwrap_err();
    assert!(matches!(&e, ModelError::BadAnswer(m) if m.contains("`label`")), "{e}");
    // Nobody listening: unavailable.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = model(&format!("http://127.0.0.1:{port}"), oip()).predict("x").await.unwrap_err();
    assert!(matches!(e, ModelError::Unavailable(_)), "{e}");
}

/// A call made within a request's trace context sends a child `traceparent`
/// of it (same trace id, a new span id); a call outside any sends none.
#[tokio::test]
async fn a_call_carries_the_requests_trace_context() {
    use hartonomous::trace::{TraceParent, within};
    let server = Server::start(200, r#"{"prediction":{"label":"ok"}}"#);
    let protocol = Protocol::Json { input_field: "text".into(), label_pointer: "/prediction/label".into(), score_pointer: None };
    let m = model(&server.url, protocol);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    within(TraceParent::parse(tp), m.predict("traced")).await.unwrap();
    m.predict("untraced").await.unwrap();
    let sent = server.traceparents.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    let child = TraceParent::parse(sent[0].as_deref().expect("a traceparent on the traced call")).unwrap();
    assert_eq!(child.trace_id(), "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(sent[0].as_deref(), Some(tp), "a new span id");
    assert_eq!(sent[1], None);
}

/// Through the ensemble-inference topology on the embedded default, with a
/// model server over HTTP: a request's trace id reaches the call the server
/// receives (a child span), its result and model-output rows, and the
/// headers of its published result and partial result. A request without a
/// `traceparent` starts no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_requests_trace_id_reaches_the_model_server_its_rows_and_its_events() {
    use arrow::array::{Array, StringArray};
    let server = Server::start(200, r#"{"prediction":{"label":"ok","confidence":0.8}}"#);
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = common::app(dir.path());
    let bundled = hartonomous::topology::TOPOLOGIES.iter().find(|t| t.name() == "ensemble-inference").unwrap().declaration();
    let remote = format!(
        "[[stage.model]]\nkind = \"http\"\nid = \"remote\"\nbase_url = \"{}/classify\"\nprotocol = {{ kind = \"json\", label_pointer = \"/prediction/label\", score_pointer = \"/prediction/confidence\" }}\n\n[stage.call_defaults]",
        server.url
    );
    let text = bundled.replacen("[stage.call_defaults]", &remote, 1);
    let spec = hartonomous::topology::spec::TopologySpec::parse(std::path::Path::new("test"), &text).unwrap();
    let trace = |i: usize| format!("{:032x}", 0x7ace00 + i);
    let traced = |i: usize| i != 2;
    let records: Vec<_> = (0..4)
        .map(|i| {
            let v = serde_json::json!({"request_id": format!("r-{i}"), "input": format!("text {i}"), "model_ids": ["remote"], "aggregation": "FIRST_SUCCESS", "correlation_id": format!("inf-{i}")});
            let mut r = common::json_record(&spec.source.topic, &v);
            if traced(i) {
                r.headers.insert("traceparent", format!("00-{}-{:016x}-01", trace(i), 0x99 + i).into_bytes());
            }
            r
        })
        .collect();
    let summaries = app.run_chain_to_end(&spec, records).await.unwrap();
    let rendered: Vec<String> = summaries.iter().map(|s| s.render()).collect();
    let dead = app.log.records(&spec.dead_letter.topic);
    assert!(dead.is_empty(), "dead letters: {:?}\n{}", dead.iter().map(|r| format!("{:?} {:?}", r.headers.get_str(hartonomous::dead_letter::H_REASON), r.headers.get_str(hartonomous::dead_letter::H_ERROR))).collect::<Vec<_>>(), rendered.join("\n"));
    let expected: Vec<(String, String)> = (0..4).map(|i| (format!("inf-{i}"), if traced(i) { trace(i) } else { String::new() })).collect();

    // The model server: one call per request (inputs differ, nothing coalesces).
    let calls: Vec<String> = server.seen().iter().map(|(_, body)| body["input"].as_str().unwrap_or_default().to_string()).collect();
    let mut sent: Vec<(String, String)> = calls
        .iter()
        .zip(server.traceparents.lock().unwrap().iter())
        .map(|(input, tp)| (format!("inf-{}", input.trim_start_matches("text ")), hartonomous::trace::trace_id(tp.as_deref())))
        .collect();
    sent.sort();
    assert_eq!(sent, expected, "inputs seen: {calls:?}");

    // The rows.
    for sql in [
        "SELECT correlation_id, trace_id FROM inference_results_live ORDER BY correlation_id",
        "SELECT correlation_id, trace_id FROM model_outputs_live ORDER BY correlation_id",
    ] {
        let mut rows = Vec::new();
        for b in app.store.query(sql).await.unwrap() {
            let col = |c: usize| b.column(c).as_any().downcast_ref::<StringArray>().unwrap().clone();
            let (ids, traces) = (col(0), col(1));
            rows.extend((0..b.num_rows()).map(|i| (ids.value(i).to_string(), traces.value(i).to_string())));
        }
        assert_eq!(rows, expected, "{sql}");
    }

    // The events: every result and partial result carries its request's trace.
    for topic in ["inference.results", "inference.partial"] {
        let events = app.log.records(topic);
        assert_eq!(events.len(), 4, "{topic}");
        let mut seen: Vec<String> = events.iter().map(|e| hartonomous::trace::trace_id(e.headers.get_str("traceparent"))).collect();
        seen.sort();
        let mut want: Vec<String> = expected.iter().map(|(_, t)| t.clone()).collect();
        want.sort();
        assert_eq!(seen, want, "{topic}");
    }
}
