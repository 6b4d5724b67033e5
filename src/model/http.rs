//! Clients for model servers, one [`HttpModel`] per configured model, in
//! three protocols:
//!
//! - **`openai-chat`**: `POST {base_url}/v1/chat/completions` with the input
//!   as the user message (after an optional system prompt). The label is
//!   the configured label that occurs first in the reply, as a whole word,
//!   ignoring case; a reply that names none is an unusable answer. No score.
//! - **`oip-v2`**: the Open Inference Protocol v2, spoken by KServe, Triton
//!   and Seldon: `POST {base_url}/v2/models/{model}/infer` with one `BYTES`
//!   input tensor of shape `[1]`. The label is the first element of the
//!   output tensor named `label_output`; the score, when `score_output` is
//!   set, the first element of that tensor.
//! - **`json`**: a generic JSON classification endpoint: `POST {base_url}`
//!   with `{"<input_field>": input}`; label and score are read at JSON
//!   pointers (RFC 6901) into the answer.
//!
//! One call is one attempt. What an answer means is decided in one place,
//! [`classify_status`]: transport errors, 408, 425, 429 and 5xx may pass
//! (unavailable); 401, 403, 404 and 405 are setup problems (misconfigured);
//! other 4xx reject the input; a 2xx that cannot be read is an unusable answer.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Model, ModelError, Prediction};
use crate::tls::NoAnswer;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpModelConfig {
    /// The id requests and ensembles use.
    pub id: String,
    /// Recorded with every output; outputs are coalesced within one version.
    #[serde(default = "super::default_version")]
    pub version: String,
    /// Root of the server (`openai-chat`, `oip-v2`) or the full URL (`json`).
    pub base_url: String,
    /// PEM file of extra root certificates for an `https://` base_url.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Environment variable holding a bearer token, read once at start.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Backstop for one attempt; the invoke stage's timeout is the real one.
    #[serde(default = "thirty_s")]
    pub attempt_timeout_ms: u64,
    pub protocol: Protocol,
}

fn thirty_s() -> u64 {
    30_000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Protocol {
    OpenaiChat {
        /// The server's model name.
        model: String,
        #[serde(default)]
        system_prompt: Option<String>,
        /// The labels a reply may name.
        labels: Vec<String>,
    },
    OipV2 {
        /// The `{name}` of `/v2/models/{name}/infer`.
        model: String,
        #[serde(default = "input_name")]
        input_name: String,
        #[serde(default = "label_name")]
        label_output: String,
        #[serde(default)]
        score_output: Option<String>,
    },
    Json {
        #[serde(default = "input_name")]
        input_field: String,
        /// JSON pointer to the label, e.g. `/label` or `/result/class`.
        label_pointer: String,
        #[serde(default)]
        score_pointer: Option<String>,
    },
}

fn input_name() -> String {
    "input".into()
}

fn label_name() -> String {
    "label".into()
}

impl HttpModelConfig {
    /// The error names the field and the fix.
    pub fn check(&self) -> Result<(), String> {
        if self.id.trim().is_empty() {
            return Err("id is empty; name the model as requests and ensembles refer to it".into());
        }
        let url = reqwest::Url::parse(self.base_url.trim()).map_err(|e| format!("base_url `{}` is not a URL ({e}); use e.g. http://127.0.0.1:8000", self.base_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("base_url `{}` has scheme `{}`; use http:// or https://", self.base_url, url.scheme()));
        }
        if self.attempt_timeout_ms == 0 {
            return Err("attempt_timeout_ms is 0; set the longest one attempt may take".into());
        }
        match &self.protocol {
            Protocol::OpenaiChat { labels, model, .. } => {
                if model.trim().is_empty() {
                    return Err("protocol.model is empty; name the server's model".into());
                }
                if labels.iter().all(|l| l.trim().is_empty()) {
                    return Err("protocol.labels is empty; list the labels a reply may name".into());
                }
            }
            Protocol::OipV2 { model, .. } if model.trim().is_empty() => return Err("protocol.model is empty; name the model of /v2/models/{model}/infer".into()),
            Protocol::Json { label_pointer, score_pointer, .. } => {
                for (field, p) in [("label_pointer", Some(label_pointer)), ("score_pointer", score_pointer.as_ref())] {
                    if let Some(p) = p
                        && !p.is_empty()
                        && !p.starts_with('/')
                    {
                        return Err(format!("protocol.{field} `{p}` is not a JSON pointer; start it with `/`, e.g. `/label`"));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn root(&self) -> &str {
        self.base_url.trim().trim_end_matches('/')
    }

    /// Where requests are posted.
    pub fn endpoint(&self) -> String {
        match &self.protocol {
            Protocol::OpenaiChat { .. } => format!("{}/v1/chat/completions", self.root().trim_end_matches("/v1")),
            Protocol::OipV2 { model, .. } => format!("{}/v2/models/{model}/infer", self.root()),
            Protocol::Json { .. } => self.root().to_string(),
        }
    }
}

pub struct HttpModel {
    config: HttpModelConfig,
    endpoint: String,
    client: reqwest::Client,
    auth: Option<HeaderValue>,
}

impl HttpModel {
    pub fn new(config: HttpModelConfig) -> Result<Self, String> {
        config.check()?;
        let auth = match &config.api_key_env {
            None => None,
            Some(var) => {
                let token = std::env::var(var).map_err(|_| format!("api_key_env names `{var}`, which is not set (or not UTF-8); export it or remove api_key_env"))?;
                let mut v = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| format!("the environment variable `{var}` (api_key_env) holds characters not allowed in an HTTP header"))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let what = format!("model `{}`", config.id);
        let client = crate::tls::http_client(config.root(), config.ca_file.as_deref(), Duration::from_millis(config.attempt_timeout_ms), &what)?;
        Ok(Self { endpoint: config.endpoint(), config, client, auth })
    }

    fn body(&self, input: &str) -> Value {
        match &self.config.protocol {
            Protocol::OpenaiChat { model, system_prompt, .. } => {
                let mut messages = Vec::new();
                if let Some(p) = system_prompt {
                    messages.push(json!({"role": "system", "content": p}));
                }
                messages.push(json!({"role": "user", "content": input}));
                json!({"model": model, "messages": messages, "temperature": 0})
            }
            Protocol::OipV2 { input_name, .. } => json!({"inputs": [{"name": input_name, "shape": [1], "datatype": "BYTES", "data": [input]}]}),
            Protocol::Json { input_field, .. } => Value::Object([(input_field.clone(), Value::from(input))].into_iter().collect()),
        }
    }

    async fn attempt(&self, input: &str) -> Result<Prediction, ModelError> {
        let mut request = self.client.post(&self.endpoint).header(CONTENT_TYPE, "application/json").body(self.body(input).to_string());
        if let Some(tp) = crate::trace::outgoing() {
            request = request.header("traceparent", tp);
        }
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.transport(&e))?;
        classify_status(status, &body, &self.endpoint)?;
        let answer: Value = serde_json::from_slice(&body).map_err(|e| ModelError::BadAnswer(format!("{} answered with something that is not JSON ({e}): {}", self.endpoint, excerpt(&body))))?;
        parse(&self.config.protocol, &answer).map_err(|why| ModelError::BadAnswer(format!("{}: {why}: {}", self.endpoint, excerpt(&body))))
    }

    fn transport(&self, e: &reqwest::Error) -> ModelError {
        match crate::tls::no_answer(e) {
            NoAnswer::Untrusted(tls) => ModelError::Misconfigured(format!("the TLS certificate of {} is not trusted ({tls}); set ca_file", self.endpoint)),
            NoAnswer::Unusable(why) => ModelError::Misconfigured(format!("cannot reach {}: {why}", self.endpoint)),
            NoAnswer::Transient(what) => ModelError::Unavailable(format!("{}: {what}", self.endpoint)),
        }
    }
}

impl Model for HttpModel {
    fn id(&self) -> &str {
        &self.config.id
    }

    fn version(&self) -> &str {
        &self.config.version
    }

    fn predict<'a>(&'a self, input: &'a str) -> BoxFuture<'a, Result<Prediction, ModelError>> {
        Box::pin(self.attempt(input))
    }
}

/// What a non-2xx status means (see the module doc).
pub fn classify_status(status: StatusCode, body: &[u8], endpoint: &str) -> Result<(), ModelError> {
    if status.is_success() {
        return Ok(());
    }
    let message = format!("{endpoint} answered HTTP {status}: {}", excerpt(body));
    Err(match status.as_u16() {
        408 | 425 | 429 | 500..=599 => ModelError::Unavailable(message),
        401 | 403 => ModelError::Misconfigured(format!("{message} (check the token in api_key_env)")),
        404 | 405 => ModelError::Misconfigured(format!("{message} (check base_url and the model name)")),
        300..=399 => ModelError::Misconfigured(format!("{message} (redirects are not followed; give the final URL)")),
        _ => ModelError::Rejected(message),
    })
}

/// Reads the label (and score) out of a 2xx answer.
fn parse(protocol: &Protocol, answer: &Value) -> Result<Prediction, String> {
    match protocol {
        Protocol::OpenaiChat { labels, .. } => {
            let reply = answer.pointer("/choices/0/message/content").and_then(Value::as_str).ok_or("no choices[0].message.content in the answer")?;
            let label = first_label(reply, labels).ok_or_else(|| format!("the reply names none of the labels {labels:?}"))?;
            Ok(Prediction { label, score: None })
        }
        Protocol::OipV2 { label_output, score_output, .. } => {
            let outputs = answer.get("outputs").and_then(Value::as_array).ok_or("no `outputs` array in the answer")?;
            let tensor = |name: &str| outputs.iter().find(|o| o.get("name").and_then(Value::as_str) == Some(name)).and_then(|o| o.get("data")).and_then(first_element);
            let label = tensor(label_output).ok_or_else(|| format!("no output tensor `{label_output}` with data"))?;
            let label = scalar_text(label).ok_or_else(|| format!("output `{label_output}` is not text or a number"))?;
            let score = match score_output {
                Some(name) => Some(tensor(name).and_then(Value::as_f64).ok_or_else(|| format!("no numeric output tensor `{name}`"))?),
                None => None,
            };
            Ok(Prediction { label, score })
        }
        Protocol::Json { label_pointer, score_pointer, .. } => {
            let label = answer.pointer(label_pointer).and_then(scalar_text).ok_or_else(|| format!("no text or number at {label_pointer}"))?;
            let score = match score_pointer {
                Some(p) => Some(answer.pointer(p).and_then(Value::as_f64).ok_or_else(|| format!("no number at {p}"))?),
                None => None,
            };
            Ok(Prediction { label, score })
        }
    }
}

/// A tensor's first element: `data` is flat (`["a"]`) or nested (`[["a"]]`).
fn first_element(data: &Value) -> Option<&Value> {
    let mut v = data.as_array()?.first()?;
    while let Some(inner) = v.as_array() {
        v = inner.first()?;
    }
    Some(v)
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The configured label occurring first in `reply`, as a whole word,
/// ignoring case; at the same position the longer label wins
/// ("not spam" before "not").
pub fn first_label(reply: &str, labels: &[String]) -> Option<String> {
    let hay = reply.to_lowercase();
    let mut best: Option<(usize, usize, &String)> = None;
    for label in labels.iter().filter(|l| !l.trim().is_empty()) {
        let needle = label.trim().to_lowercase();
        let mut from = 0;
        while let Some(i) = hay[from..].find(&needle).map(|i| i + from) {
            let before = hay[..i].chars().next_back();
            let after = hay[i + needle.len()..].chars().next();
            if !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric) {
                if best.is_none_or(|(pos, len, _)| i < pos || (i == pos && needle.len() > len)) {
                    best = Some((i, needle.len(), label));
                }
                break;
            }
            from = i + needle.len().max(1);
        }
    }
    best.map(|(_, _, l)| l.trim().to_string())
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_label_named_as_a_word_wins() {
        let labels = ["spam".to_string(), "ham".to_string(), "not spam".to_string()];
        assert_eq!(first_label("Verdict: HAM. Not spam at all.", &labels).as_deref(), Some("ham"));
        assert_eq!(first_label("This is not spam.", &labels).as_deref(), Some("not spam"));
        assert_eq!(first_label("spammy but fine", &labels), None, "a label inside a word does not count");
        assert_eq!(first_label("hamster; spam", &labels).as_deref(), Some("spam"));
    }

    #[test]
    fn answers_are_read_per_protocol() {
        let oip = Protocol::OipV2 { model: "m".into(), input_name: "input".into(), label_output: "label".into(), score_output: Some("score".into()) };
        let answer = json!({"model_name": "m", "outputs": [
            {"name": "score", "shape": [1], "datatype": "FP32", "data": [0.75]},
            {"name": "label", "shape": [1, 1], "datatype": "BYTES", "data": [["spam"]]}
        ]});
        assert_eq!(parse(&oip, &answer).unwrap(), Prediction { label: "spam".into(), score: Some(0.75) });
        assert!(parse(&oip, &json!({"outputs": []})).unwrap_err().contains("`label`"));

        let js = Protocol::Json { input_field: "text".into(), label_pointer: "/result/class".into(), score_pointer: Some("/result/p".into()) };
        assert_eq!(parse(&js, &json!({"result": {"class": 3, "p": 0.5}})).unwrap(), Prediction { label: "3".into(), score: Some(0.5) });
        assert!(parse(&js, &json!({"result": {"class": "a"}})).unwrap_err().contains("/result/p"));

        let chat = Protocol::OpenaiChat { model: "m".into(), system_prompt: None, labels: vec!["yes".into(), "no".into()] };
        let answer = json!({"choices": [{"message": {"role": "assistant", "content": "No, it is not."}}]});
        assert_eq!(parse(&chat, &answer).unwrap(), Prediction { label: "no".into(), score: None });
        assert!(parse(&chat, &json!({"choices": []})).is_err());
    }

    #[test]
    fn statuses_fall_into_the_classes() {
        use crate::outcome::{Classify, ErrorClass};
        let class = |code: u16| classify_status(StatusCode::from_u16(code).unwrap(), b"x", "e").unwrap_err().class();
        for code in [408, 425, 429, 500, 502, 503] {
            assert_eq!(class(code), ErrorClass::Retry, "{code}");
        }
        for code in [400, 413, 422] {
            assert_eq!(class(code), ErrorClass::Invalid, "{code}");
        }
        for code in [301, 401, 403, 404, 405] {
            assert_eq!(class(code), ErrorClass::Fatal, "{code}");
        }
        assert!(classify_status(StatusCode::OK, b"", "e").is_ok());
    }

    #[test]
    fn config_errors_name_the_field() {
        let c = HttpModelConfig {
            id: "m".into(),
            version: "1".into(),
            base_url: "ftp://x".into(),
            ca_file: None,
            api_key_env: None,
            attempt_timeout_ms: 1000,
            protocol: Protocol::Json { input_field: "input".into(), label_pointer: "label".into(), score_pointer: None },
        };
        assert!(c.check().unwrap_err().contains("scheme"));
        let c = HttpModelConfig { base_url: "http://127.0.0.1:9".into(), ..c };
        assert!(c.check().unwrap_err().contains("label_pointer"));
        let c = HttpModelConfig { protocol: Protocol::OipV2 { model: "m".into(), input_name: "i".into(), label_output: "l".into(), score_output: None }, ..c };
        assert_eq!(c.endpoint(), "http://127.0.0.1:9/v2/models/m/infer");
    }
}
