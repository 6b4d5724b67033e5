//! The HTTP/1 listener for `/metrics`, `/health`, `/ready` and
//! `/requests/{correlation_id}`.
//!
//! It binds to loopback by default ([`DEFAULT_LISTEN`]): metrics name topics,
//! groups and endpoints, which are not for every network the host is on. A
//! scraper elsewhere needs `--listen 0.0.0.0:9464` (or a sidecar) on purpose.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::Exporter;
use crate::store::RequestLookup;

/// The store `/requests/{correlation_id}` answers from. Set once the store
/// is open; until then the endpoint answers 503.
#[derive(Clone, Default)]
pub struct Requests(Arc<OnceLock<Arc<dyn RequestLookup>>>);

impl Requests {
    pub fn set(&self, store: Arc<dyn RequestLookup>) {
        let _ = self.0.set(store);
    }
}

/// Where the endpoints listen unless `--listen` says otherwise (9464: the
/// OpenTelemetry Prometheus exporter's default port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// The `--listen` setting: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    On(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse::<SocketAddr>()
            .map(Listen::On)
            .map_err(|e| format!("`{s}` is not an address ({e}); give HOST:PORT with an IP host, such as {DEFAULT_LISTEN}, or `off`"))
    }
}

/// Binds `addr` and serves the endpoints until the returned task is
/// aborted. Returns the bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, exporter: Arc<Exporter>, requests: Requests) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /metrics, /health, /ready and /requests/{{correlation_id}}");
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, typically: back off, keep serving.
                    tracing::warn!(error = %e, "ops endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (exporter, requests) = (exporter.clone(), requests.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (exporter, requests) = (exporter.clone(), requests.clone());
                    async move { Ok::<_, std::convert::Infallible>(route(&req, &exporter, &requests).await) }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    tracing::debug!(error = %e, "ops endpoint: connection ended with an error");
                }
            });
        }
    });
    Ok((bound, task))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

const JSON: &str = "application/json";

async fn route(req: &Request<Incoming>, exporter: &Exporter, requests: &Requests) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
    }
    if let Some(id) = req.uri().path().strip_prefix("/requests/") {
        return request_status(id, requests).await;
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", exporter.render()),
        "/health" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/ready" => match exporter.readiness() {
            Ok(s) => text(StatusCode::OK, PLAIN, format!("{s}\n")),
            Err(s) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{s}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found; try /metrics, /health, /ready or /requests/{correlation_id}\n".into()),
    }
}

/// `GET /requests/{correlation_id}` (percent-encoded in the path): 200 with
/// the request's status as JSON when the store knows it, 404 with the same
/// JSON (`"state": "unknown"`) when it does not (not arrived, in flight, or
/// never sent: callers poll), 503 while the store is not open or answers
/// with an error.
async fn request_status(encoded: &str, requests: &Requests) -> Response<Full<Bytes>> {
    let id = match percent_decode(encoded) {
        Some(id) if !id.is_empty() => id,
        _ => return text(StatusCode::BAD_REQUEST, PLAIN, "give a correlation id: /requests/{correlation_id}, percent-encoded\n".into()),
    };
    let Some(store) = requests.0.get() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "the store is not open yet; retry\n".into());
    };
    match store.request_status(&id).await {
        Ok(status) => {
            let code = if status.is_known() { StatusCode::OK } else { StatusCode::NOT_FOUND };
            let body = serde_json::to_string(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            text(code, JSON, body + "\n")
        }
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("looking the request up failed: {e}\n")),
    }
}

/// `%XX` escapes decoded; `None` when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Metrics;

    #[test]
    fn listen_takes_an_address_or_off_and_names_the_fix() {
        assert_eq!("off".parse::<Listen>().unwrap(), Listen::Off);
        assert_eq!("127.0.0.1:0".parse::<Listen>().unwrap(), Listen::On("127.0.0.1:0".parse().unwrap()));
        let err = "localhost:9464".parse::<Listen>().unwrap_err();
        assert!(err.contains("HOST:PORT") && err.contains(DEFAULT_LISTEN), "{err}");
    }

    #[tokio::test]
    async fn the_endpoints_answer_over_http() {
        let exporter = Arc::new(Exporter {
            metrics: Arc::new(Metrics::new("t")),
            breakers: Default::default(),
            group: "g".into(),
            clock: crate::clock::system(),
        });
        Metrics::add(&exporter.metrics.records_in, 3);
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), exporter, Requests::default()).await.unwrap();
        let client = crate::tls::http_client("http://127.0.0.1", None, std::time::Duration::from_secs(5), "ops test").unwrap();
        let get = |path: &'static str| {
            let client = client.clone();
            async move {
                let r = client.get(format!("http://{addr}{path}")).send().await.unwrap();
                let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), ct, r.text().await.unwrap())
            }
        };
        let (status, ct, body) = get("/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(ct.as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
        assert!(body.contains("hartonomous_records_in_total{topology=\"t\"} 3"), "{body}");
        assert_eq!(get("/health").await, (200, Some(PLAIN.into()), "ok\n".into()));
        let (status, _, body) = get("/ready").await;
        assert_eq!(status, 503, "nothing assigned: {body}");
        assert_eq!(get("/other").await.0, 404);
        let r = client.post(format!("http://{addr}/metrics")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 405);
        task.abort();
    }
}
