//! Logs and traces for the command line: log lines on stderr (human or JSON)
//! and, when an endpoint is configured, spans exported over OTLP/HTTP
//! (protobuf) to an OpenTelemetry collector.
//!
//! Tracing is off by default. It is on when `--otlp-endpoint` (or
//! `HARTONOMOUS_OTLP_ENDPOINT`) names a collector, or when the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set; the other standard variables (`OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_SERVICE_NAME`, ...) apply as the OpenTelemetry SDK reads them.
//!
//! What is exported: a `batch` span per window (with links to the trace of
//! every record in it that carried a `traceparent`) and a `stage` span per
//! stage call, its child. Spans are batched and sent off the record path; an
//! unreachable collector costs dropped spans and a warning, never progress.
//!
//! The exporter's HTTP requests go through the project's own reqwest client
//! ([`OtlpHttp`]), spawned on the Tokio runtime, so no second HTTP stack is
//! built for them.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Text, coloured only when stderr is a terminal.
    Human,
    /// One JSON object per line (timestamp, level, target, fields, span).
    Json,
}

/// Where spans go; `None` leaves tracing off.
pub fn otlp_endpoint(flag: Option<String>) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    flag.filter(|v| !v.trim().is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| format!("{}/v1/traces", base.trim_end_matches('/'))))
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default
/// `warn`), and spans at `info` and above from Hartonomous to `endpoint`
/// when given. Call it inside the Tokio runtime the process runs on.
pub fn init(format: LogFormat, endpoint: Option<&str>, service: &str) -> Result<Telemetry, String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Human => logs.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => logs.json().with_ansi(false).with_current_span(true).with_span_list(false).boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    let Some(endpoint) = endpoint else {
        registry.try_init().map_err(|e| e.to_string())?;
        return Ok(Telemetry { provider: None });
    };
    let provider = provider(endpoint, service)?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("hartonomous"))
        .with_filter(tracing_subscriber::filter::Targets::new().with_target("hartonomous", tracing::Level::INFO));
    registry.with(spans).try_init().map_err(|e| e.to_string())?;
    tracing::info!(%endpoint, "exporting spans over OTLP/HTTP");
    Ok(Telemetry { provider: Some(provider) })
}

/// A tracer provider batching spans to `endpoint` (the full URL, ending in
/// `/v1/traces`).
pub fn provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, String> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| "the OTLP exporter needs a Tokio runtime".to_string())?;
    let client = crate::tls::http_client(endpoint, None, Duration::from_secs(10), "OTLP exporter")?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpHttp { client, runtime })
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_string()).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// The OTLP exporter's HTTP client: the project's reqwest client, each
/// request run on the Tokio runtime (the SDK's batch processor exports from
/// a thread of its own, outside any runtime).
#[derive(Debug, Clone)]
struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
        let answer = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        });
        let (status, body) = answer.await??;
        let mut out = http::Response::new(body);
        *out.status_mut() = status;
        Ok(out)
    }
}
