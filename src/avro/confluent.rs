//! [`ConfluentRegistry`]: a [`SchemaRegistry`] backed by a Confluent-compatible
//! Schema Registry over HTTP (Confluent, Karapace, Redpanda, Apicurio's
//! `ccompat` API, ...).
//!
//! # Calls
//!
//! All HTTP goes through `schema_registry_converter`'s async API
//! ([`get_schema_by_id`], [`post_schema`] with an [`SrSettings`] built by
//! `SrSettingsBuilder`):
//!
//! - [`SchemaRegistry::schema_by_id`] → `GET {url}/schemas/ids/{id}?deleted=true`
//!   (soft-deleted schemas still resolve, so old records still decode);
//! - [`SchemaRegistry::register`] → `POST {url}/subjects/{subject}/versions`
//!   with `{"schema": "<full schema JSON>", "schemaType": "AVRO"}`. The
//!   registry answers with the id of an existing identical schema or registers
//!   a new version: register-or-lookup in one call.
//!
//! The HTTP client is a `reqwest::Client` built here and handed to the crate
//! (`SrSettingsBuilder::build_with`), so it uses the same rustls stack (ring
//! provider) as the rest of the process; `timeout_ms` is the crate's request
//! timeout. `https://` URLs work: `schema_registry_converter` is built without
//! its own TLS features, but it shares reqwest 0.13 with this crate, whose
//! `rustls-no-provider` feature gives that client TLS. Server certificates are
//! checked against the system roots plus the PEM file `ca_file`, if set.
//!
//! Each call makes one attempt (per URL, see below) and classifies its
//! failure; retries, backoff and circuit breaking belong to the caller's
//! [`crate::resilience::Resilient`], as for every other registry.
//!
//! # Several URLs
//!
//! `url` may list several registry nodes. The crate tries them in the order
//! given, for every call, until one succeeds, and reports the last failure.
//! A dead first node therefore costs every uncached call a failed connect
//! (up to `timeout_ms`) before the next node is tried.
//!
//! # Caching
//!
//! - **By id**: ids are immutable, so a fetched schema is cached forever;
//!   with `cache_capacity` the cache keeps at most that many schemas and
//!   evicts the least recently used.
//! - **Negative answers**: an unknown id ([`RegistryError::UnknownId`]) and
//!   an id whose schema cannot be used ([`RegistryError::Unusable`]) are
//!   remembered for `negative_cache_ms` (default 10 s), measured on the
//!   injected clock, so a burst of records carrying a bad id costs one
//!   request, not one per record. After that the id is asked again: it may
//!   have been registered meanwhile. At most [`NEGATIVE_CACHE_CAPACITY`] ids
//!   are remembered (expired ones are dropped first, then the oldest).
//!   Other failures are never cached.
//! - **No stampede**: concurrent lookups of one uncached id are serialised by
//!   a per-id lock; the first fetches, the others find the cache (positive or
//!   negative) filled. A failure that is not cached is not shared: the next
//!   waiter tries again itself.
//! - **Registrations**: `(subject, full schema JSON)` → id, unbounded (a
//!   process registers a handful of schemas). The key is the exact JSON sent,
//!   not the Parsing Canonical Form: two schemas with the same canonical form
//!   but different logical types or docs are different requests to the
//!   registry, and only the registry knows which id each gets. (Confluent
//!   itself compares the full schema, so the trait's "same canonical form,
//!   same id" holds for schemas whose JSON is identical.)
//!
//! # Errors
//!
//! | what happened | [`RegistryError`] | class |
//! |---|---|---|
//! | `404` with a registry error body (`error_code` 40403, "Schema not found") on lookup by id | `UnknownId(id)` | Invalid (dead-letter) |
//! | `404` without a registry error body (wrong `url` path, a proxy) | `Invalid` | Fatal |
//! | `401` / `403`: wrong username/password or missing permission | `Invalid` | Fatal |
//! | other `4xx` (`409` incompatible schema, `422` invalid schema, ...) | `Invalid` | Fatal |
//! | `5xx`, `408`, `429` | `Unavailable` | Retry |
//! | connection refused/reset, timeout, body cut off mid-way | `Unavailable` | Retry |
//! | TLS certificate not trusted (or expired, wrong host name) | `Invalid` | Fatal |
//! | a complete `2xx` answer that is not the expected JSON, or lacks the schema or id | `Invalid` | Fatal |
//! | a registry answer for a `JSON` or `PROTOBUF` schema (`schemaType`) | `Unusable` (`decode.schema_not_avro`) | Invalid (dead-letter) |
//! | an Avro schema with `references` | `Unusable` (`decode.schema_references`) | Invalid (dead-letter) |
//! | Avro schema text that does not parse | `Unusable` (`decode.schema_unparsable`) | Invalid (dead-letter) |
//!
//! Answers that are not registry JSON are `Invalid` rather than
//! `Unavailable` because a complete answer that is not schema-registry JSON
//! comes from something that is not a schema registry (wrong host or port, a
//! captive proxy); waiting will not fix it, and the decode stage retries
//! `Unavailable` forever. An answer cut off by the network is `Unavailable`.
//! A well-formed answer whose schema this client cannot decode with is
//! different: the registry works, and only the records carrying that id are
//! unusable, so they are dead-lettered and processing goes on.
//!
//! The password is read from the environment once, at construction; it is
//! never logged and [`ConfluentRegistry`]'s `Debug` output omits it.

use crate::outcome::error_chain;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::SharedClock;
use apache_avro::Schema;
use futures::future::BoxFuture;
use schema_registry_converter::async_impl::schema_registry::{SrSettings, get_schema_by_id, post_schema};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{RawError, RegisteredSchema as SrRegisteredSchema, SchemaType, SuppliedSchema};
use serde::{Deserialize, Deserializer};

use super::registry::{RegistryError, SchemaRegistry};
use super::wire::SchemaProblem;

/// Registry URL used when none is configured (Confluent's default port).
pub const DEFAULT_URL: &str = "http://localhost:8081";
/// Default request timeout, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default time an unknown or unusable schema id is remembered, in milliseconds.
pub const DEFAULT_NEGATIVE_CACHE_MS: u64 = 10_000;
/// Longest accepted `negative_cache_ms`: a newly registered schema must not
/// stay invisible for long.
pub const MAX_NEGATIVE_CACHE_MS: u64 = 300_000;
/// Most schema ids remembered as unknown or unusable at once.
pub const NEGATIVE_CACHE_CAPACITY: usize = 10_000;

/// Configuration of a [`ConfluentRegistry`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConfluentRegistryConfig {
    /// Registry root URL(s), e.g. `http://localhost:8081`. Several nodes may
    /// be given as a list or as one comma-separated string; they are tried in
    /// order. A trailing `/` is ignored. Credentials do not belong here: use
    /// `username` and `password_env`.
    #[serde(deserialize_with = "deserialize_urls")]
    pub url: Vec<String>,
    /// User name for HTTP basic authentication (the API key on Confluent
    /// Cloud). Requires `password_env`.
    pub username: Option<String>,
    /// Name of the environment variable holding the basic-auth password (the
    /// API secret on Confluent Cloud). Read once, when the registry is built;
    /// never logged. Requires `username`.
    pub password_env: Option<String>,
    /// Deadline for one HTTP request (connect, send and read), per URL.
    pub timeout_ms: u64,
    /// Most schemas kept in the by-id cache; unset means unbounded (ids are
    /// immutable, and a deployment uses few schemas).
    pub cache_capacity: Option<usize>,
    /// PEM file with extra root certificates (e.g. a private CA) trusted for
    /// `https://` URLs in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// How long an unknown schema id, or one whose schema cannot be used
    /// (JSON/Protobuf, references, unparsable), is answered from memory
    /// before the registry is asked again (1..=300000; default 10000). A
    /// burst of records with such an id then costs one request; a schema
    /// registered meanwhile is seen after at most this long.
    pub negative_cache_ms: u64,
}

impl Default for ConfluentRegistryConfig {
    fn default() -> Self {
        Self {
            url: vec![DEFAULT_URL.to_string()],
            username: None,
            password_env: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            cache_capacity: None,
            ca_file: None,
            negative_cache_ms: DEFAULT_NEGATIVE_CACHE_MS,
        }
    }
}

/// `url = "http://a, http://b"` or `url = ["http://a", "http://b"]`.
fn deserialize_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => split_urls([s]),
        OneOrMany::Many(v) => split_urls(v),
    })
}

/// Splits every item on commas, trims, and drops empty pieces.
fn split_urls<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Vec<String> {
    items
        .into_iter()
        .flat_map(|s| s.as_ref().split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect::<Vec<_>>())
        .collect()
}

impl ConfluentRegistryConfig {
    /// A configuration for `url` (one URL or several, comma-separated) with
    /// defaults for everything else.
    pub fn new(url: impl AsRef<str>) -> Self {
        Self { url: split_urls([url]), ..Self::default() }
    }

    /// Checks that the values make sense; the error names the field and the fix.
    pub fn check(&self) -> Result<(), String> {
        if self.url.is_empty() {
            return Err(format!(
                "url is empty; set it to the schema registry root, e.g. {DEFAULT_URL} (several: a list or comma-separated)"
            ));
        }
        for url in &self.url {
            check_url(url)?;
        }
        match (&self.username, &self.password_env) {
            (Some(_), None) => {
                return Err(
                    "username is set but password_env is not; name the environment variable holding the password, or remove username"
                        .into(),
                );
            }
            (None, Some(_)) => {
                return Err(
                    "password_env is set but username is not; set username (the API key on Confluent Cloud), or remove password_env".into(),
                );
            }
            _ => {}
        }
        if let Some(user) = &self.username
            && (user.trim().is_empty() || user.contains(':'))
        {
            return Err("username is empty or contains `:`; give the basic-auth user name (the API key on Confluent Cloud)".into());
        }
        if let Some(var) = &self.password_env
            && (var.trim().is_empty() || var.contains('='))
        {
            return Err(
                "password_env is not an environment variable name; name the variable holding the password, e.g. SCHEMA_REGISTRY_PASSWORD"
                    .into(),
            );
        }
        if self.timeout_ms == 0 {
            return Err("timeout_ms is 0; give each request at least 1 ms (default 10000)".into());
        }
        if self.negative_cache_ms == 0 {
            return Err(format!(
                "negative_cache_ms is 0; set it to at least 1 (default {DEFAULT_NEGATIVE_CACHE_MS}), so that a burst of records with an unknown schema id does not ask the registry once per record"
            ));
        }
        if self.negative_cache_ms > MAX_NEGATIVE_CACHE_MS {
            return Err(format!(
                "negative_cache_ms is {}; set at most {MAX_NEGATIVE_CACHE_MS} (5 minutes), or a newly registered schema stays unknown that long (default {DEFAULT_NEGATIVE_CACHE_MS})",
                self.negative_cache_ms
            ));
        }
        if self.cache_capacity == Some(0) {
            return Err("cache_capacity is 0; set at least 1, or remove it for an unbounded cache".into());
        }
        if let Some(path) = &self.ca_file
            && path.as_os_str().is_empty()
        {
            return Err("ca_file is empty; give the path of a PEM file with the CA certificate(s), or remove it".into());
        }
        Ok(())
    }

    /// The configured URLs without trailing `/`, in the order they are tried.
    pub fn urls(&self) -> Vec<String> {
        self.url.iter().map(|u| u.trim().trim_end_matches('/').to_string()).collect()
    }
}

fn check_url(raw: &str) -> Result<(), String> {
    let trimmed = raw.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(trimmed).map_err(|e| format!("url `{raw}` is not a valid URL ({e}); use e.g. {DEFAULT_URL}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("url `{raw}` has scheme `{}`; use http:// or https://", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("url `{raw}` has no host; use e.g. {DEFAULT_URL}"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "url `{}` contains credentials; remove them from the URL and use username and password_env",
            redact_userinfo(&url)
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("url `{raw}` has a query or fragment; give only scheme, host, port and (optionally) a path prefix"));
    }
    Ok(())
}

fn redact_userinfo(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// A [`SchemaRegistry`] client for a Confluent-compatible Schema Registry.
/// See the [module documentation](self) for the calls made, caching and the
/// error classes. Share one instance (e.g. in an `Arc`) to share its caches.
pub struct ConfluentRegistry {
    settings: SrSettings,
    urls: Vec<String>,
    /// `urls` joined, for error messages.
    target: String,
    username: Option<String>,
    by_id: Mutex<IdCache>,
    /// Per-id locks against concurrent fetches of one id.
    inflight: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    /// (subject, schema JSON as sent) → id.
    registered: Mutex<HashMap<(String, String), u32>>,
    /// Ids recently answered as unknown or unusable.
    negative: Mutex<NegativeCache>,
    clock: SharedClock,
}

impl std::fmt::Debug for ConfluentRegistry {
    /// Never shows the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfluentRegistry")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("cached_ids", &self.cached_ids())
            .finish_non_exhaustive()
    }
}

impl ConfluentRegistry {
    /// Checks `config`, reads the password from the variable named by
    /// `password_env`, loads `ca_file`, and builds the HTTP client (rustls
    /// with the ring provider, installed here if no provider is installed
    /// yet). Makes no request: an unreachable registry shows up on first use.
    /// Negative answers expire on the system clock.
    pub fn new(config: ConfluentRegistryConfig) -> Result<Self, String> {
        Self::with_clock(config, crate::clock::system())
    }

    /// [`ConfluentRegistry::new`] with the clock that times negative answers
    /// (`negative_cache_ms`).
    pub fn with_clock(config: ConfluentRegistryConfig, clock: SharedClock) -> Result<Self, String> {
        config.check()?;
        let password = match &config.password_env {
            None => None,
            Some(var) => {
                let value = std::env::var(var).map_err(|e| match e {
                    std::env::VarError::NotPresent => {
                        format!("password_env names `{var}`, but that environment variable is not set; export it or remove password_env")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("the environment variable `{var}` (password_env) is not valid UTF-8; fix its value")
                    }
                })?;
                if value.is_empty() {
                    return Err(format!("the environment variable `{var}` (password_env) is empty; put the password in it"));
                }
                Some(value)
            }
        };

        // reqwest is built with `rustls-no-provider`: pick ring for the
        // process. Fails harmlessly if a provider is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();

        let urls = config.urls();
        let extra_roots = match &config.ca_file {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("ca_file `{}` cannot be read ({e}); fix the path or remove ca_file", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    format!("ca_file `{}` is not a PEM certificate bundle ({e}); give PEM CA certificate(s)", path.display())
                })?;
                if certs.is_empty() {
                    return Err(format!("ca_file `{}` holds no certificate; give PEM CA certificate(s) or remove ca_file", path.display()));
                }
                certs
            }
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("hartonomous/", env!("CARGO_PKG_VERSION")));
        let client = if urls.iter().any(|u| u.starts_with("https:")) {
            // System roots plus `ca_file`.
            client.tls_certs_merge(extra_roots)
        } else {
            // No https URL: do not require a system certificate store (a
            // minimal container may have none), trust only `ca_file`.
            client.tls_certs_only(extra_roots)
        };

        let mut builder = SrSettings::new_builder(urls[0].clone());
        for url in &urls[1..] {
            builder.add_url(url.clone());
        }
        builder.set_timeout(timeout);
        if let Some(user) = &config.username {
            builder.set_basic_authorization(user, password.as_deref());
        }
        let settings =
            builder.build_with(client).map_err(|e| format!("cannot build the HTTP client for the schema registry: {}", error_chain(&e)))?;

        Ok(Self {
            settings,
            target: urls.join(", "),
            urls,
            username: config.username.clone(),
            by_id: Mutex::new(IdCache::new(config.cache_capacity)),
            inflight: Mutex::new(HashMap::new()),
            registered: Mutex::new(HashMap::new()),
            negative: Mutex::new(NegativeCache::new(config.negative_cache_ms as i64)),
            clock,
        })
    }

    /// The registry URLs, in the order they are tried.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Number of schemas currently in the by-id cache.
    pub fn cached_ids(&self) -> usize {
        lock(&self.by_id).entries.len()
    }

    /// Number of ids currently remembered as unknown or unusable (expired
    /// ones included until they are swept).
    pub fn negative_ids(&self) -> usize {
        lock(&self.negative).entries.len()
    }

    /// The cached answer for `id`, positive or negative.
    fn cached(&self, id: u32) -> Option<Result<Arc<Schema>, RegistryError>> {
        if let Some(schema) = lock(&self.by_id).get(id) {
            return Some(Ok(schema));
        }
        lock(&self.negative).get(id, self.clock.now_ms()).map(Err)
    }

    async fn fetch(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(answer) = self.cached(id) {
            return answer;
        }
        // One fetch per id at a time. Entries nobody holds any more are
        // swept here, so the map stays as small as the number of ids in
        // flight (also when a waiting future is dropped).
        let flight = {
            let mut map = lock(&self.inflight);
            map.retain(|_, m| Arc::strong_count(m) > 1);
            map.entry(id).or_default().clone()
        };
        let _guard = flight.lock_owned().await;
        if let Some(answer) = self.cached(id) {
            return answer;
        }
        let answer = match get_schema_by_id(id, &self.settings).await {
            Ok(registered) => self.parse(id, &registered),
            Err(e) => Err(self.classify(&e, Call::ById(id))),
        };
        let schema = match answer {
            Ok(schema) => Arc::new(schema),
            Err(e @ (RegistryError::UnknownId(_) | RegistryError::Unusable { .. })) => {
                tracing::debug!(id, registry = %self.target, reason = e.code(), "negative answer cached");
                lock(&self.negative).insert(id, e.clone(), self.clock.now_ms());
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(id, registry = %self.target, "fetched schema from the registry");
        lock(&self.by_id).insert(id, schema.clone());
        Ok(schema)
    }

    async fn register_json(&self, subject: String, json: Result<String, String>) -> Result<u32, RegistryError> {
        check_subject(&subject)?;
        let json = json.map_err(|e| RegistryError::Invalid(format!("cannot serialise schema: {e}")))?;
        let key = (subject, json);
        if let Some(&id) = lock(&self.registered).get(&key) {
            return Ok(id);
        }
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, key.1.clone());
        let registered =
            post_schema(&self.settings, key.0.clone(), supplied).await.map_err(|e| self.classify(&e, Call::Register(&key.0)))?;
        tracing::debug!(subject = %key.0, id = registered.id, registry = %self.target, "schema registered");
        let id = registered.id;
        // The id exists now, whatever a look-up said a moment ago.
        lock(&self.negative).entries.remove(&id);
        lock(&self.registered).insert(key, id);
        Ok(id)
    }

    /// A registry answer → an Avro schema. A schema this client cannot
    /// decode with is [`RegistryError::Unusable`]: the records carrying its
    /// id are bad, the registry is fine.
    fn parse(&self, id: u32, registered: &SrRegisteredSchema) -> Result<Schema, RegistryError> {
        let unusable = |problem, message| RegistryError::Unusable { id, problem, message };
        if registered.schema_type != SchemaType::Avro {
            let kind = match &registered.schema_type {
                SchemaType::Json => "JSON".to_string(),
                SchemaType::Protobuf => "PROTOBUF".to_string(),
                SchemaType::Other(other) => other.clone(),
                other => format!("{other:?}"),
            };
            return Err(unusable(
                SchemaProblem::NotAvro,
                format!("schema id {id} at {} is a {kind} schema, not Avro; produce this topic with an Avro serializer", self.target),
            ));
        }
        if !registered.references.is_empty() {
            let refs: Vec<String> = registered.references.iter().map(|r| format!("{} ({} v{})", r.name, r.subject, r.version)).collect();
            return Err(unusable(
                SchemaProblem::References,
                format!(
                    "schema id {id} at {} references other schemas [{}]; schema references are not supported, register self-contained schemas",
                    self.target,
                    refs.join(", ")
                ),
            ));
        }
        Schema::parse_str(&registered.schema)
            .map_err(|e| unusable(SchemaProblem::Unparsable, format!("schema id {id} at {} is not a valid Avro schema: {e}", self.target)))
    }

    /// Sorts a `schema_registry_converter` error into a [`RegistryError`]
    /// (see the table in the module documentation).
    fn classify(&self, e: &SRCError, call: Call<'_>) -> RegistryError {
        let target = &self.target;
        let source = StdError::source(e);
        let id = match call {
            Call::ById(id) => Some(id),
            Call::Register(_) => None,
        };

        // The registry (or something in front of it) answered with a non-2xx status.
        if let Some(raw) = source.and_then(|s| s.downcast_ref::<RawError>()) {
            // error_code 0: the crate could not parse the body as a registry error.
            let from_registry = raw.error_code != 0;
            let detail = if from_registry {
                format!("error_code {}: {}", raw.error_code, raw.message)
            } else {
                "no schema-registry error body".to_string()
            };
            return match http_status(raw, &e.error) {
                Some(404) if from_registry && id.is_some() => RegistryError::UnknownId(id.unwrap_or_default()),
                Some(404) => RegistryError::Invalid(format!(
                    "{target} answered HTTP 404 when {call} ({detail}); check that url is the schema registry root (scheme, host, port, path prefix)"
                )),
                Some(status @ (401 | 403)) => RegistryError::Invalid(format!(
                    "{target} refused access when {call} (HTTP {status}, {detail}); check username and the password in the environment variable named by password_env, and the account's permissions"
                )),
                Some(status @ (408 | 429 | 500..=599)) => {
                    RegistryError::Unavailable(format!("{target} answered HTTP {status} when {call} ({detail})"))
                }
                Some(status) => RegistryError::Invalid(format!("{target} rejected {call} (HTTP {status}, {detail})")),
                None => RegistryError::Unavailable(format!("{target} answered with an error when {call} ({}; {detail})", e.error)),
            };
        }

        if let Some(http) = source.and_then(|s| s.downcast_ref::<reqwest::Error>()) {
            if let Some(tls) = certificate_error(http) {
                return RegistryError::Invalid(format!(
                    "TLS certificate of {target} is not accepted ({tls}); trust its CA with ca_file, or fix the server certificate"
                ));
            }
            let not_json = http.is_decode() && http.source().is_some_and(|s| s.downcast_ref::<serde_json::Error>().is_some());
            if not_json {
                return RegistryError::Invalid(format!(
                    "{target} answered {call} with something that is not schema-registry JSON ({}); check that url points at the schema registry",
                    error_chain(http)
                ));
            }
            if http.is_builder() {
                return RegistryError::Invalid(format!("cannot build a request to {target}: {}", error_chain(http)));
            }
            return RegistryError::Unavailable(format!("request to {target} failed when {call}: {}", error_chain(http)));
        }

        // No source: a 2xx answer lacking the id or schema, or similar. The
        // crate's message may embed the whole request body: keep its start.
        let mut what = e.error.clone();
        if let Some(cut) = what.find(" for Post").or_else(|| what.char_indices().nth(200).map(|(i, _)| i)) {
            what.truncate(cut);
        }
        if e.retriable {
            RegistryError::Unavailable(format!("{target} failed when {call}: {what}"))
        } else {
            RegistryError::Invalid(format!("unusable answer from {target} when {call}: {what}"))
        }
    }
}

impl SchemaRegistry for ConfluentRegistry {
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Arc<Schema>, RegistryError>> {
        Box::pin(self.fetch(id))
    }

    fn register(&self, subject: &str, schema: &Schema) -> BoxFuture<'_, Result<u32, RegistryError>> {
        // The full JSON (docs, defaults, logical types), as FileRegistry stores it.
        let json = serde_json::to_string(schema).map_err(|e| e.to_string());
        Box::pin(self.register_json(subject.to_string(), json))
    }
}

/// What was being done, for error messages.
#[derive(Clone, Copy)]
enum Call<'a> {
    ById(u32),
    Register(&'a str),
}

impl std::fmt::Display for Call<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Call::ById(id) => write!(f, "looking up schema id {id}"),
            Call::Register(subject) => write!(f, "registering a schema under subject `{subject}`"),
        }
    }
}

/// The HTTP status of an error answer: from the crate's message ("... failed
/// with status 404 Not Found"), else from the registry's `error_code`, whose
/// first three digits are the status (40403 → 404).
fn http_status(raw: &RawError, message: &str) -> Option<u16> {
    let from_message = message
        .split("with status ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse::<u16>().ok())
        .filter(|s| (100..=599).contains(s));
    let from_code = match raw.error_code {
        c @ 100..=599 => Some(c as u16),
        c @ 10_000..=59_999 => Some((c / 100) as u16),
        _ => None,
    };
    from_message.or(from_code)
}

/// A rustls certificate error somewhere in the chain of `e`. The TLS error
/// arrives wrapped in `io::Error`s (nested: reqwest's connector wraps
/// tokio-rustls' error), whose `source()` skips the wrapped error itself, so
/// each `io::Error` is also unwrapped with `get_ref`.
fn certificate_error(e: &reqwest::Error) -> Option<String> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = next {
        let mut inner: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(candidate) = inner {
            if let Some(tls @ rustls::Error::InvalidCertificate(_)) = candidate.downcast_ref::<rustls::Error>() {
                return Some(tls.to_string());
            }
            inner = candidate.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|e| e as &(dyn StdError + 'static));
        }
        next = err.source();
    }
    None
}

/// Subjects go into the URL path; the crate escapes only `/`.
fn check_subject(subject: &str) -> Result<(), RegistryError> {
    const ALLOWED: &str = "-._~!$&'()*+,;=:@/";
    if subject.is_empty() {
        return Err(RegistryError::Invalid("subject is empty; use `<topic>-value`".into()));
    }
    if let Some(c) = subject.chars().find(|c| !(c.is_ascii_alphanumeric() || ALLOWED.contains(*c))) {
        return Err(RegistryError::Invalid(format!(
            "subject `{subject}` contains {c:?}, which cannot be sent in a registry URL; use letters, digits and `._-` (e.g. `<topic>-value`)"
        )));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the maps consistent, so a panic in
    // another holder does not make them unusable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// id → a negative answer and when it expires (ms on the registry's clock).
struct NegativeCache {
    ttl_ms: i64,
    entries: HashMap<u32, (RegistryError, i64)>,
}

impl NegativeCache {
    fn new(ttl_ms: i64) -> Self {
        Self { ttl_ms, entries: HashMap::new() }
    }

    /// The answer for `id`, unless it has expired at `now`.
    fn get(&mut self, id: u32, now: i64) -> Option<RegistryError> {
        match self.entries.get(&id) {
            Some((error, expires)) if now < *expires => Some(error.clone()),
            Some(_) => {
                self.entries.remove(&id);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, id: u32, error: RegistryError, now: i64) {
        if self.entries.len() >= NEGATIVE_CACHE_CAPACITY && !self.entries.contains_key(&id) {
            self.entries.retain(|_, (_, expires)| now < *expires);
            while self.entries.len() >= NEGATIVE_CACHE_CAPACITY {
                let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, expires))| *expires).map(|(&k, _)| k) else {
                    break;
                };
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(id, (error, now.saturating_add(self.ttl_ms)));
    }
}

/// id → schema, optionally bounded, least recently used evicted first.
struct IdCache {
    capacity: Option<usize>,
    entries: HashMap<u32, (Arc<Schema>, u64)>,
    clock: u64,
}

impl IdCache {
    fn new(capacity: Option<usize>) -> Self {
        Self { capacity, entries: HashMap::new(), clock: 0 }
    }

    fn get(&mut self, id: u32) -> Option<Arc<Schema>> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(&id).map(|(schema, used)| {
            *used = now;
            schema.clone()
        })
    }

    fn insert(&mut self, id: u32, schema: Arc<Schema>) {
        self.clock += 1;
        if let Some(capacity) = self.capacity
            && !self.entries.contains_key(&id)
        {
            while self.entries.len() >= capacity.max(1) {
                let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(&k, _)| k) else {
                    break;
                };
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(id, (schema, self.clock));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(name: &str) -> Arc<Schema> {
        Arc::new(Schema::parse_str(&format!(r#"{{"type":"record","name":"{name}","fields":[{{"name":"f","type":"long"}}]}}"#)).unwrap())
    }

    #[test]
    fn bounded_cache_evicts_least_recently_used() {
        let mut cache = IdCache::new(Some(2));
        cache.insert(1, schema("A"));
        cache.insert(2, schema("B"));
        assert!(cache.get(1).is_some());
        cache.insert(3, schema("C"));
        assert!(cache.get(2).is_none(), "2 was least recently used");
        assert!(cache.get(1).is_some() && cache.get(3).is_some());
        assert_eq!(cache.entries.len(), 2);
        let mut unbounded = IdCache::new(None);
        for id in 0..100 {
            unbounded.insert(id, schema("A"));
        }
        assert_eq!(unbounded.entries.len(), 100);
    }

    #[test]
    fn negative_answers_expire_and_the_cache_stays_bounded() {
        let mut cache = NegativeCache::new(100);
        cache.insert(1, RegistryError::UnknownId(1), 1_000);
        assert_eq!(cache.get(1, 1_099), Some(RegistryError::UnknownId(1)));
        assert_eq!(cache.get(1, 1_100), None, "expired at insert + ttl");
        assert!(cache.entries.is_empty(), "an expired entry is dropped when seen");
        for id in 0..NEGATIVE_CACHE_CAPACITY as u32 {
            cache.insert(id, RegistryError::UnknownId(id), 2_000 + i64::from(id));
        }
        assert_eq!(cache.entries.len(), NEGATIVE_CACHE_CAPACITY);
        cache.insert(u32::MAX, RegistryError::UnknownId(u32::MAX), 2_050);
        assert_eq!(cache.entries.len(), NEGATIVE_CACHE_CAPACITY, "full: the oldest made room");
        assert_eq!(cache.get(0, 2_050), None, "id 0 expired first and was evicted");
        assert!(cache.get(u32::MAX, 2_050).is_some());
        // Once entries have expired, a full cache sweeps them instead.
        cache.insert(7_777_777, RegistryError::UnknownId(7), 1_000_000);
        assert_eq!(cache.entries.len(), 1);
    }

    #[test]
    fn http_status_from_message_or_error_code() {
        let raw = |code: u32| -> RawError { serde_json::from_value(serde_json::json!({"error_code": code, "message": ""})).unwrap() };
        let msg = "HTTP request to schema registry failed with status 404 Not Found";
        assert_eq!(http_status(&raw(40403), msg), Some(404));
        assert_eq!(http_status(&raw(0), msg), Some(404));
        assert_eq!(http_status(&raw(50001), "other"), Some(500));
        assert_eq!(http_status(&raw(401), "other"), Some(401));
        assert_eq!(http_status(&raw(0), "other"), None);
    }

    #[test]
    fn subjects_that_would_break_the_url_are_rejected() {
        assert!(check_subject("atoms.ingest-value").is_ok());
        assert!(check_subject("io.hartonomous.AtomIngestionRequest").is_ok());
        for bad in ["", "a b", "a?b", "a#b", "a%b"] {
            assert!(matches!(check_subject(bad), Err(RegistryError::Invalid(_))), "{bad:?}");
        }
    }
}
