//! Client for the OpenAI-compatible `POST {base_url}/v1/embeddings` API, as
//! served by text-embeddings-inference, Ollama, vLLM and OpenAI itself.
//!
//! Request: `{"model": "...", "input": ["text1", ...]}`, plus `"dimensions"`
//! when [`OpenAiConfig::request_dimensions`] is set. Answer:
//! `{"data": [{"index": 0, "embedding": [...]}, ...], "model": "..."}`;
//! vectors are placed by `index`, never by their position in `data`.
//!
//! Every request goes through [`Resilient::call`]: retries with jittered
//! exponential backoff, a per-attempt deadline and one circuit breaker for
//! this embedder's service. What is retried and what is final is decided in
//! one place, [`classify`].
//!
//! `https://` services are reached with rustls on ring; their certificate
//! must chain to a system root or to a certificate in
//! [`OpenAiConfig::ca_file`]. One that does not is a setup problem
//! ([`EmbedError::Misconfigured`]), never retried.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::{Deserialize, Serialize};

use super::{EmbedError, Embedder};
use crate::clock::SharedClock;
use crate::outcome::{Classify, ErrorClass};
use crate::tls::NoAnswer;
use crate::resilience::{Attempted, BreakerConfig, BreakerState, CircuitBreaker, Resilient, RetryConfig};

/// Configuration of an [`OpenAiEmbedder`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Root of the service, e.g. `http://127.0.0.1:8080`. A trailing `/` and
    /// a trailing `/v1` are both accepted; `/v1/embeddings` is appended.
    pub base_url: String,
    /// PEM file of extra root certificates (e.g. a private CA) trusted for an
    /// `https://` base_url, in addition to the system's roots. Checked (it
    /// must hold PEM certificates) by [`check`](Self::check). A service
    /// certificate that chains to neither makes every request fail as
    /// misconfigured, with a message naming this field.
    pub ca_file: Option<PathBuf>,
    /// Model name sent in every request and recorded with each atom.
    pub model: String,
    /// Length of the vectors the model returns; every answer is checked
    /// against it, and a mismatch stops the topology.
    pub dimension: usize,
    /// Most texts sent in one request.
    pub max_batch: usize,
    /// Name of an environment variable holding a bearer token. It is read
    /// once, when the embedder is built, and never logged.
    pub api_key_env: Option<String>,
    /// Send `"dimensions": dimension` in each request (for models that can
    /// shorten their vectors, such as OpenAI's `text-embedding-3-*`). Off by
    /// default because some servers reject the field.
    pub request_dimensions: bool,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
}

impl Default for OpenAiConfig {
    /// Defaults for everything but `model` and `dimension`, which have no
    /// sensible default: [`OpenAiConfig::check`] insists they be set.
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080".into(),
            ca_file: None,
            model: String::new(),
            dimension: 0,
            max_batch: 64,
            api_key_env: None,
            request_dimensions: false,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

impl OpenAiConfig {
    /// A configuration with defaults for everything else.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>, dimension: usize) -> Self {
        Self { base_url: base_url.into(), model: model.into(), dimension, ..Self::default() }
    }

    /// Checks that the values make sense; the error names the field and the
    /// fix. Reads `ca_file`, if set, to check that it holds PEM certificates.
    pub fn check(&self) -> Result<(), String> {
        let root = self.service_root();
        if root.is_empty() {
            return Err("base_url is empty; set it to the service root, e.g. http://127.0.0.1:8080".into());
        }
        let url = reqwest::Url::parse(&root).map_err(|e| {
            format!("base_url `{}` is not a valid URL ({e}); use e.g. http://127.0.0.1:8080", self.base_url)
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("base_url `{}` has scheme `{}`; use http:// or https://", self.base_url, url.scheme()));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("base_url `{}` has no host; use e.g. http://127.0.0.1:8080", self.base_url));
        }
        if let Some(path) = &self.ca_file {
            if url.scheme() != "https" {
                return Err(format!(
                    "ca_file is set, but base_url `{}` uses plain http, where no certificate is checked; \
                     use https://, or remove ca_file",
                    self.base_url
                ));
            }
            crate::tls::read_ca_file(path)?;
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "base_url `{}` has a query or fragment; give only scheme, host, port and path",
                self.base_url
            ));
        }
        if root.ends_with("/embeddings") {
            return Err(format!(
                "base_url `{}` already ends with /embeddings; give the service root (without /v1/embeddings), e.g. http://127.0.0.1:8080",
                self.base_url
            ));
        }
        if self.model.trim().is_empty() {
            return Err("model is empty; set it to the name of the model the service serves".into());
        }
        if self.dimension == 0 {
            return Err("dimension is 0; set it to the length of the vectors the model returns".into());
        }
        if self.max_batch == 0 {
            return Err("max_batch is 0; set it to at least 1".into());
        }
        if let Some(var) = &self.api_key_env
            && var.trim().is_empty()
        {
            return Err(
                "api_key_env is empty; name the environment variable holding the token, or remove the field".into()
            );
        }
        self.retry.check().map_err(|e| format!("retry.{e}"))?;
        Ok(())
    }

    /// `base_url` without trailing `/` and `/v1`.
    fn service_root(&self) -> String {
        let mut root = self.base_url.trim().trim_end_matches('/');
        if let Some(stripped) = root.strip_suffix("/v1") {
            root = stripped.trim_end_matches('/');
        }
        root.to_string()
    }

    /// The full URL requests are posted to: `{root}/v1/embeddings`.
    pub fn endpoint(&self) -> String {
        format!("{}/v1/embeddings", self.service_root())
    }
}

/// An [`Embedder`] backed by an OpenAI-compatible embeddings service.
pub struct OpenAiEmbedder {
    config: OpenAiConfig,
    endpoint: String,
    client: reqwest::Client,
    /// `Bearer <token>`, marked sensitive so that it is never printed.
    auth: Option<HeaderValue>,
    resilient: Resilient,
    requests_sent: AtomicU64,
}

impl std::fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("endpoint", &self.endpoint)
            .field("model", &self.config.model)
            .field("dimension", &self.config.dimension)
            .field("max_batch", &self.config.max_batch)
            .field("authenticated", &self.auth.is_some())
            .field("breaker", &self.resilient.breaker.state())
            .finish()
    }
}

impl OpenAiEmbedder {
    /// Validates `config`, reads the token named by `api_key_env`, and
    /// builds the HTTP client (rustls with the ring provider; for https the
    /// system roots plus `ca_file`, for http no certificate store at all, so
    /// a minimal container without one still works). The circuit
    /// breaker is this embedder's own and is named after the service root;
    /// share one `OpenAiEmbedder` (e.g. in an `Arc`) to share it.
    pub fn new(config: OpenAiConfig, clock: SharedClock) -> Result<Self, String> {
        config.check()?;
        let auth = match &config.api_key_env {
            None => None,
            Some(var) => {
                let token = std::env::var(var).map_err(|e| match e {
                    std::env::VarError::NotPresent => format!(
                        "api_key_env names `{var}`, but that environment variable is not set; export it or remove api_key_env"
                    ),
                    std::env::VarError::NotUnicode(_) => {
                        format!("the environment variable `{var}` (api_key_env) is not valid UTF-8; fix its value")
                    }
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(format!(
                        "the environment variable `{var}` (api_key_env) is empty; put the token in it"
                    ));
                }
                let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    format!("the environment variable `{var}` (api_key_env) holds characters not allowed in an HTTP header; fix its value")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };

        let attempt_timeout = Duration::from_millis(config.retry.attempt_timeout_ms);
        let client = crate::tls::http_client(&config.service_root(), config.ca_file.as_deref(), attempt_timeout, "the embedding service")?;

        let endpoint = config.endpoint();
        let breaker = Arc::new(CircuitBreaker::new(format!("embed:{}", config.service_root()), config.breaker.clone()));
        let resilient = Resilient::new(config.retry.clone(), breaker, clock);
        Ok(Self { config, endpoint, client, auth, resilient, requests_sent: AtomicU64::new(0) })
    }

    /// HTTP requests sent so far, retries included (an attempt counts once it
    /// starts sending, even if it then fails to connect or times out). Calls
    /// refused by an open circuit breaker send nothing and are not counted.
    pub fn requests_sent(&self) -> u64 {
        self.requests_sent.load(Ordering::Relaxed)
    }

    /// The URL requests are posted to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.resilient.breaker.state()
    }

    /// One batch of at most `max_batch` texts, with retries.
    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let request = EmbeddingRequest {
            model: &self.config.model,
            input: texts,
            dimensions: self.config.request_dimensions.then_some(self.config.dimension),
        };
        let body = serde_json::to_vec(&request)
            .map_err(|e| EmbedError::Rejected { message: format!("cannot encode the request as JSON: {e}") })?;
        let result = self
            .resilient
            .call(|| {
                let body = body.clone();
                async move {
                    let mut request =
                        self.client.post(&self.endpoint).header(CONTENT_TYPE, "application/json").body(body);
                    if let Some(tp) = crate::trace::outgoing() {
                        request = request.header("traceparent", tp);
                    }
                    if let Some(auth) = &self.auth {
                        request = request.header(AUTHORIZATION, auth.clone());
                    }
                    self.requests_sent.fetch_add(1, Ordering::Relaxed);
                    let answer = match request.send().await {
                        Ok(response) => {
                            let status = response.status();
                            response.bytes().await.map(|body| (status, body))
                        }
                        Err(e) => Err(e),
                    };
                    let answer = match &answer {
                        Ok((status, body)) => Answer::Http { status: *status, body },
                        Err(e) => Answer::Transport(e),
                    };
                    classify(answer, texts.len(), &self.config)
                }
            })
            .await;
        result.map_err(|failed| match failed {
            Attempted::Exhausted { last, attempts } => EmbedError::Unavailable { message: last, attempts },
            Attempted::Rejected { error, attempts, .. } => error.into_embed_error(attempts),
        })
    }
}

impl Embedder for OpenAiEmbedder {
    fn model(&self) -> &str {
        &self.config.model
    }

    fn dimension(&self) -> usize {
        self.config.dimension
    }

    fn max_batch(&self) -> usize {
        self.config.max_batch
    }

    fn breaker(&self) -> Option<Arc<CircuitBreaker>> {
        Some(self.resilient.breaker.clone())
    }

    /// Callers should pass at most `max_batch` texts; if they pass more, the
    /// texts are sent as consecutive requests of at most `max_batch` each
    /// (each with its own retries), and the first failing request fails the
    /// whole call. An empty input sends nothing.
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        Box::pin(async move {
            if texts.len() <= self.config.max_batch {
                if texts.is_empty() {
                    return Ok(Vec::new());
                }
                return self.embed_batch(texts).await;
            }
            let mut out = Vec::with_capacity(texts.len());
            for chunk in texts.chunks(self.config.max_batch) {
                out.extend(self.embed_batch(chunk).await?);
            }
            Ok(out)
        })
    }
}

#[derive(Serialize)]
struct EmbeddingRequest<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    /// Position of the input this vector belongs to. Servers that omit it
    /// are taken to answer in input order.
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

/// What one attempt got back.
enum Answer<'a> {
    /// No complete HTTP answer: connect failure, reset, timeout, body cut off.
    Transport(&'a reqwest::Error),
    Http {
        status: StatusCode,
        body: &'a [u8],
    },
}

/// The failure of one attempt, by class.
#[derive(Debug, Clone, PartialEq)]
enum AttemptError {
    /// Worth retrying: the service may answer properly next time.
    Transient(String),
    /// These inputs can never succeed.
    Rejected(String),
    /// No input can succeed until the configuration or service is fixed.
    Misconfigured(String),
}

impl AttemptError {
    fn into_embed_error(self, attempts: u32) -> EmbedError {
        match self {
            AttemptError::Transient(message) => EmbedError::Unavailable { message, attempts },
            AttemptError::Rejected(message) => EmbedError::Rejected { message },
            AttemptError::Misconfigured(message) => EmbedError::Misconfigured { message },
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Transient(m) | AttemptError::Rejected(m) | AttemptError::Misconfigured(m) => f.write_str(m),
        }
    }
}

impl Classify for AttemptError {
    fn class(&self) -> ErrorClass {
        match self {
            AttemptError::Transient(_) => ErrorClass::Retry,
            AttemptError::Rejected(_) => ErrorClass::Invalid,
            AttemptError::Misconfigured(_) => ErrorClass::Fatal,
        }
    }
}

/// The one place that decides what an answer means.
///
/// - transport errors (connect, reset, timeout, truncated body), 5xx, 408,
///   425, 429, a body that is not the expected JSON, the wrong number of
///   vectors or bad indices → retryable;
/// - 400, 413, 422 and other 4xx → the input is rejected;
/// - 401, 403, 404, 405, redirects left unfollowed, unusable URL, a TLS
///   certificate that is not trusted (unknown CA, expired, wrong host name),
///   and a vector whose length is not the configured dimension → misconfigured.
fn classify(answer: Answer<'_>, expected: usize, config: &OpenAiConfig) -> Result<Vec<Vec<f32>>, AttemptError> {
    let (status, body) = match answer {
        Answer::Transport(e) => {
            return Err(match crate::tls::no_answer(e) {
                NoAnswer::Untrusted(tls) => AttemptError::Misconfigured(format!(
                    "the TLS certificate of {} is not trusted ({tls}); set ca_file to the PEM file of the CA that \
                     signed it, or fix the service's certificate (it must name base_url's host)",
                    config.endpoint()
                )),
                NoAnswer::Unusable(why) => AttemptError::Misconfigured(format!("cannot reach {}: {why}", config.endpoint())),
                NoAnswer::Transient(what) => AttemptError::Transient(what),
            });
        }
        Answer::Http { status, body } => (status, body),
    };

    if !status.is_success() {
        let code = status.as_u16();
        let said = body_excerpt(body);
        let message = |hint: &str| format!("{} answered HTTP {status}{hint}: {said}", config.endpoint());
        return Err(match code {
            408 | 425 | 429 | 500..=599 => AttemptError::Transient(message("")),
            401 | 403 => AttemptError::Misconfigured(message(" (check the token in api_key_env)")),
            404 | 405 => AttemptError::Misconfigured(message(" (check base_url and model)")),
            400..=499 => AttemptError::Rejected(message("")),
            _ => AttemptError::Misconfigured(message(" (unexpected status; check base_url)")),
        });
    }

    let response: EmbeddingResponse = serde_json::from_slice(body).map_err(|e| {
        AttemptError::Transient(format!(
            "malformed answer (HTTP {status}) from {}: {e}; body: {}",
            config.endpoint(),
            body_excerpt(body)
        ))
    })?;

    if let Some(bad) = response.data.iter().find(|item| item.embedding.len() != config.dimension) {
        return Err(AttemptError::Misconfigured(format!(
            "model `{}` at {} returned vectors of dimension {}, but dimension is configured as {}; \
             set dimension = {} or use a model with {} dimensions",
            config.model,
            config.endpoint(),
            bad.embedding.len(),
            config.dimension,
            bad.embedding.len(),
            config.dimension
        )));
    }
    if response.data.len() != expected {
        return Err(AttemptError::Transient(format!(
            "asked {} for {expected} vector(s) and got {}",
            config.endpoint(),
            response.data.len()
        )));
    }
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (position, item) in response.data.into_iter().enumerate() {
        let index = item.index.unwrap_or(position);
        if index >= expected {
            return Err(AttemptError::Transient(format!("answer has index {index} for {expected} input(s)")));
        }
        if item.embedding.iter().any(|x| !x.is_finite()) {
            return Err(AttemptError::Transient(format!(
                "answer has a non-finite value in the vector at index {index}"
            )));
        }
        if slots[index].replace(item.embedding).is_some() {
            return Err(AttemptError::Transient(format!("answer has index {index} more than once")));
        }
    }
    // `data.len() == expected`, every index < expected and none repeated,
    // so every slot is filled.
    Ok(slots.into_iter().flatten().collect())
}

/// The first bytes of a body, for error messages.
fn body_excerpt(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let text = text.trim();
    match (text.is_empty(), body.len() > MAX) {
        (true, _) => "(empty body)".into(),
        (false, true) => format!("{text}…"),
        (false, false) => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dimension: usize) -> OpenAiConfig {
        OpenAiConfig::new("http://127.0.0.1:9", "m", dimension)
    }

    fn http(status: u16, body: &str, expected: usize, config: &OpenAiConfig) -> Result<Vec<Vec<f32>>, AttemptError> {
        classify(
            Answer::Http { status: StatusCode::from_u16(status).unwrap(), body: body.as_bytes() },
            expected,
            config,
        )
    }

    fn class_of(status: u16, body: &str) -> ErrorClass {
        http(status, body, 1, &config(2)).unwrap_err().class()
    }

    #[test]
    fn base_url_variants_give_the_same_endpoint() {
        for base in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.0.0.1:8080/v1",
            "http://127.0.0.1:8080/v1/",
            " http://127.0.0.1:8080// ",
        ] {
            let c = OpenAiConfig::new(base, "m", 4);
            assert_eq!(c.endpoint(), "http://127.0.0.1:8080/v1/embeddings", "{base}");
            c.check().unwrap();
        }
        assert_eq!(OpenAiConfig::new("https://h/openai/v1", "m", 4).endpoint(), "https://h/openai/v1/embeddings");
    }

    #[test]
    fn check_names_the_field_and_the_fix() {
        let cases: Vec<(OpenAiConfig, &str)> = vec![
            (OpenAiConfig { max_batch: 0, ..config(4) }, "max_batch is 0; set it to at least 1"),
            (OpenAiConfig { dimension: 0, ..config(4) }, "dimension is 0"),
            (OpenAiConfig { model: " ".into(), ..config(4) }, "model is empty"),
            (OpenAiConfig { base_url: "".into(), ..config(4) }, "base_url is empty"),
            (OpenAiConfig { base_url: "ftp://h".into(), ..config(4) }, "use http:// or https://"),
            (OpenAiConfig { base_url: "not a url".into(), ..config(4) }, "not a valid URL"),
            (OpenAiConfig { base_url: "http://h/v1/embeddings".into(), ..config(4) }, "already ends with /embeddings"),
            (OpenAiConfig { api_key_env: Some("".into()), ..config(4) }, "api_key_env is empty"),
            (OpenAiConfig { ca_file: Some("/nonexistent/ca.pem".into()), ..config(4) }, "ca_file is set, but base_url"),
            (
                OpenAiConfig { base_url: "https://h".into(), ca_file: Some("/nonexistent/ca.pem".into()), ..config(4) },
                "ca_file `/nonexistent/ca.pem` cannot be read",
            ),
            (
                OpenAiConfig { retry: RetryConfig { attempt_timeout_ms: 0, ..RetryConfig::default() }, ..config(4) },
                "retry.attempt_timeout_ms is 0",
            ),
        ];
        for (c, want) in cases {
            let err = c.check().unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        assert_eq!(
            OpenAiConfig::default().check().unwrap_err(),
            "model is empty; set it to the name of the model the service serves"
        );
    }

    #[test]
    fn config_deserializes_with_defaults_and_refuses_unknown_fields() {
        let c: OpenAiConfig =
            serde_json::from_str(r#"{"base_url": "http://e:80/v1", "model": "bge", "dimension": 384}"#).unwrap();
        assert_eq!(c, OpenAiConfig::new("http://e:80/v1", "bge", 384));
        assert_eq!(c.max_batch, 64);
        assert!(!c.request_dimensions);
        assert_eq!(c.api_key_env, None);
        let err = serde_json::from_str::<OpenAiConfig>(r#"{"model": "bge", "dimension": 3, "batch": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `batch`"), "{err}");
        let c: OpenAiConfig = serde_json::from_str(
            r#"{"model": "m", "dimension": 3, "retry": {"max_attempts": 2}, "breaker": {"open_ms": 7}}"#,
        )
        .unwrap();
        assert_eq!(c.retry.max_attempts, 2);
        assert_eq!(c.breaker.open_ms, 7);
        assert_eq!(c.breaker.failure_threshold, BreakerConfig::default().failure_threshold);
    }

    #[test]
    fn request_body_has_dimensions_only_when_asked() {
        let input = vec!["a".to_string(), "b".to_string()];
        let plain = serde_json::to_value(EmbeddingRequest { model: "m", input: &input, dimensions: None }).unwrap();
        assert_eq!(plain, serde_json::json!({"model": "m", "input": ["a", "b"]}));
        let sized = serde_json::to_value(EmbeddingRequest { model: "m", input: &input, dimensions: Some(8) }).unwrap();
        assert_eq!(sized, serde_json::json!({"model": "m", "input": ["a", "b"], "dimensions": 8}));
    }

    #[test]
    fn statuses_are_classified() {
        for code in [500, 502, 503, 504, 429, 408] {
            assert_eq!(class_of(code, "busy"), ErrorClass::Retry, "{code}");
        }
        for code in [400, 413, 422, 409] {
            assert_eq!(class_of(code, "{\"error\":\"too long\"}"), ErrorClass::Invalid, "{code}");
        }
        for code in [401, 403, 404, 405] {
            assert_eq!(class_of(code, ""), ErrorClass::Fatal, "{code}");
        }
        let err = http(422, "{\"error\":\"input too long\"}", 1, &config(2)).unwrap_err();
        assert!(err.to_string().contains("input too long"), "{err}");
        assert!(http(401, "", 1, &config(2)).unwrap_err().to_string().contains("api_key_env"));
    }

    #[test]
    fn vectors_are_placed_by_index_not_array_order() {
        let body = r#"{"object":"list","model":"m","data":[
            {"object":"embedding","index":2,"embedding":[3.0,3.5]},
            {"object":"embedding","index":0,"embedding":[1.0,1.5]},
            {"object":"embedding","index":1,"embedding":[2.0,2.5]}],"usage":{"prompt_tokens":3}}"#;
        let out = http(200, body, 3, &config(2)).unwrap();
        assert_eq!(out, vec![vec![1.0, 1.5], vec![2.0, 2.5], vec![3.0, 3.5]]);
        let no_index = r#"{"data":[{"embedding":[1.0,0.0]},{"embedding":[0.0,1.0]}]}"#;
        assert_eq!(http(200, no_index, 2, &config(2)).unwrap(), vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
    }

    #[test]
    fn malformed_answers_are_retryable() {
        let c = config(2);
        for (body, expected, what) in [
            ("{not json", 1, "malformed"),
            ("{\"data\": 5}", 1, "malformed"),
            (r#"{"data":[{"index":0,"embedding":[1,2]}]}"#, 2, "got 1"),
            (r#"{"data":[{"index":0,"embedding":[1,2]},{"index":0,"embedding":[1,2]}]}"#, 2, "more than once"),
            (r#"{"data":[{"index":0,"embedding":[1,2]},{"index":5,"embedding":[1,2]}]}"#, 2, "index 5"),
        ] {
            let err = http(200, body, expected, &c).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Retry, "{body}");
            assert!(err.to_string().contains(what), "{err} should contain {what}");
        }
    }

    #[test]
    fn wrong_dimension_is_misconfigured_and_names_both_sizes() {
        let err = http(200, r#"{"data":[{"index":0,"embedding":[1,2,3]}]}"#, 1, &config(2)).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Fatal);
        let msg = err.to_string();
        assert!(msg.contains("dimension 3") && msg.contains("configured as 2"), "{msg}");
        let mapped = err.into_embed_error(1);
        assert!(matches!(mapped, EmbedError::Misconfigured { .. }), "{mapped:?}");
    }

    #[test]
    fn missing_api_key_variable_is_reported_by_name() {
        let c = OpenAiConfig { api_key_env: Some("HARTONOMOUS_TEST_SURELY_UNSET_VAR_7f3a".into()), ..config(2) };
        let err = OpenAiEmbedder::new(c, crate::clock::system()).unwrap_err();
        assert!(err.contains("HARTONOMOUS_TEST_SURELY_UNSET_VAR_7f3a") && err.contains("not set"), "{err}");
    }

    #[test]
    fn body_excerpt_is_bounded() {
        assert_eq!(body_excerpt(b""), "(empty body)");
        assert_eq!(body_excerpt(b" oops \n"), "oops");
        let long = "x".repeat(1000);
        assert_eq!(body_excerpt(long.as_bytes()).chars().count(), 301);
    }
}
