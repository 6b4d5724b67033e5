//! Connecting: the HTTP(S) client (rustls, system roots plus `ca_file`), the
//! server's version and capabilities found at connect time, and the database.

use std::fmt;
use std::time::Duration;

use clickhouse::Client;
use clickhouse::sql::Identifier;
use tokio::sync::Mutex;

use super::error::timed;
use super::{ClickHouseConfig, ClickHouseStore};
use crate::store::StoreError;

/// `major.minor` of a ClickHouse server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    /// Parses the leading `major.minor` of `SELECT version()` (`18.16.1`,
    /// `24.8.4.13`, `25.3.1.2703-testing`).
    pub fn parse(version: &str) -> Option<Self> {
        let mut parts = version.trim().split(['.', '-']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self { major, minor })
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What the connected server can do, found out at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// `SELECT version()` as the server reported it.
    pub version_string: String,
    pub version: ServerVersion,
    /// The server has both the `insert_deduplication_token` query setting
    /// (ClickHouse 22.x on; documented for 22.2) and the
    /// `non_replicated_deduplication_window` table setting (21.x on), read
    /// from `system.settings` and `system.merge_tree_settings`. False on 18.16.
    pub supports_dedup_token: bool,
    /// The server has the `async_insert` setting (21.11 on; on by default
    /// since 26.2). The store's inserts are already batched, so it turns
    /// asynchronous inserts off for them where the setting exists: an insert
    /// returns once its rows are in a part, and tokens apply per insert.
    pub has_async_insert: bool,
    /// The connected user's own `readonly` setting, from `system.settings`:
    /// 0 may write; 1 may only read and change no setting at all (not even
    /// `readonly`); 2 may only read, but may change settings. Read-only
    /// queries send `readonly=2` only when this is 0.
    pub readonly: u8,
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Ingestion and `migrate`: the database is created if missing, and
    /// `migrate_on_start` applies the schema.
    Write,
    /// `hartonomous query`: nothing is created or migrated.
    Query,
}

/// Idle pooled connections are dropped after this, below the server's
/// `keep_alive_timeout` (3 s before ClickHouse 23.11), as in the crate's own client.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The `clickhouse` crate client for `config.url`. For `http://` it is the
/// crate's own (plain HTTP: the crate is built without TLS features). For
/// `https://` the hyper client under it is built here: the crate's TLS
/// features fix the trusted roots, and `ca_file` must be added to them.
/// It uses rustls on ring, HTTP/1.1, the system roots plus `ca_file`, and
/// refuses plain HTTP (a redirect cannot downgrade it).
fn http_client(config: &ClickHouseConfig) -> Result<Client, StoreError> {
    let https = reqwest::Url::parse(&config.url).is_ok_and(|u| u.scheme() == "https");
    if !https {
        return Ok(Client::default());
    }
    let fatal = |m: String| StoreError::Fatal(format!("clickhouse config: {m}"));
    let extra = match &config.ca_file {
        Some(path) => crate::tls::read_ca_file(path).map_err(fatal)?,
        None => Vec::new(),
    };
    let roots = crate::tls::root_store(extra).map_err(fatal)?;
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| fatal(format!("cannot set up TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.set_keepalive(Some(TCP_KEEPALIVE));
    tcp.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().wrap_connector(tcp);
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector);
    Ok(Client::with_http_client(hyper))
}

impl ClickHouseStore {
    /// Connects: checks the configuration, reads the password from
    /// `password_env`, then as [`connect_with_password`](Self::connect_with_password).
    pub async fn connect(config: ClickHouseConfig) -> Result<Self, StoreError> {
        config.check().map_err(|m| StoreError::Fatal(format!("clickhouse config: {m}")))?;
        let password = config.password()?;
        Self::connect_with_password(config, password).await
    }

    /// Connects with an explicit password (ignoring `password_env`): builds
    /// the client, reads `SELECT version()`, detects the server's
    /// capabilities and the user's `readonly` level, creates the database if
    /// it is missing, and applies the schema when `migrate_on_start` is set.
    pub async fn connect_with_password(config: ClickHouseConfig, password: Option<String>) -> Result<Self, StoreError> {
        Self::open(config, password, Purpose::Write).await
    }

    /// Connects for reading only, as `hartonomous query` does: like
    /// [`connect`](Self::connect), but it creates nothing and migrates
    /// nothing, whatever `migrate_on_start` says, and a missing database is a
    /// fatal error that names it. Works for a user whose profile has
    /// `readonly = 1` (see [`query_text`](Self::query_text)).
    pub async fn connect_for_query(config: ClickHouseConfig) -> Result<Self, StoreError> {
        config.check().map_err(|m| StoreError::Fatal(format!("clickhouse config: {m}")))?;
        let password = config.password()?;
        Self::open(config, password, Purpose::Query).await
    }

    async fn open(config: ClickHouseConfig, password: Option<String>, purpose: Purpose) -> Result<Self, StoreError> {
        config.check().map_err(|m| StoreError::Fatal(format!("clickhouse config: {m}")))?;
        let timeout = Duration::from_millis(config.request_timeout_ms);
        // RowBinary without validation: 18.16 lacks RowBinaryWithNamesAndTypes
        // and the settings the validating mode sends.
        let mut server = http_client(&config)?.with_url(config.url.as_str()).with_validation(false);
        if !config.user.is_empty() {
            server = server.with_user(config.user.as_str());
        }
        if let Some(password) = password {
            server = server.with_password(password);
        }
        let at = format!("ClickHouse at {}", config.url);

        let version_string: String =
            timed(timeout, &format!("SELECT version() on {at}"), server.query("SELECT version()").fetch_one::<String>()).await?;
        let version = ServerVersion::parse(&version_string)
            .ok_or_else(|| StoreError::Fatal(format!("{at} reported version `{version_string}`, which is not major.minor[...]")))?;
        let has_token =
            count(timeout, &server, "SELECT count() FROM system.settings WHERE name = ?", "insert_deduplication_token").await? > 0;
        let has_window =
            count(timeout, &server, "SELECT count() FROM system.merge_tree_settings WHERE name = ?", "non_replicated_deduplication_window")
                .await?
                > 0;
        let has_async_insert = count(timeout, &server, "SELECT count() FROM system.settings WHERE name = ?", "async_insert").await? > 0;
        let readonly: String = timed(
            timeout,
            &format!("read the `readonly` setting of user `{}` on {at}", config.user),
            server.query("SELECT value FROM system.settings WHERE name = 'readonly'").fetch_one::<String>(),
        )
        .await?;
        let readonly = readonly
            .trim()
            .parse::<u8>()
            .map_err(|_| StoreError::Fatal(format!("{at} reported the `readonly` setting as `{readonly}`, which is not 0, 1 or 2")))?;
        let capabilities =
            Capabilities { version_string, version, supports_dedup_token: has_token && has_window, has_async_insert, readonly };

        let database = config.database.as_str();
        let exists = count(timeout, &server, "SELECT count() FROM system.databases WHERE name = ?", database).await? > 0;
        if !exists && purpose == Purpose::Query {
            return Err(StoreError::Fatal(format!(
                "database `{database}` does not exist on {at}; query creates nothing: run `hartonomous migrate` \
                 (or `run`) with this profile first, or fix store.database"
            )));
        }
        if !exists {
            timed(
                timeout,
                &format!("create database `{database}` on {at}"),
                server.query("CREATE DATABASE IF NOT EXISTS ?").bind(Identifier(database)).execute(),
            )
            .await?;
            tracing::info!(database, "created ClickHouse database");
        }

        let client = server.with_database(database);
        let store = Self { config, client, capabilities, timeout, atoms_writer: Mutex::new(()), arrivals_writer: Mutex::new(()), dead_letters_writer: Mutex::new(()) };
        tracing::info!(
            url = %store.config.url,
            database = %store.config.database,
            server = %store.capabilities.version_string,
            dedup_token = store.capabilities.supports_dedup_token,
            "connected to ClickHouse"
        );
        if store.config.migrate_on_start && purpose == Purpose::Write {
            store.migrate().await?;
        }
        Ok(store)
    }
}

async fn count(timeout: Duration, client: &Client, sql: &str, value: &str) -> Result<u64, StoreError> {
    timed(timeout, &format!("`{sql}` with `{value}`"), client.query(sql).bind(value).fetch_one::<u64>()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(ServerVersion::parse("18.16.1"), Some(ServerVersion { major: 18, minor: 16 }));
        assert_eq!(ServerVersion::parse("24.8.4.13"), Some(ServerVersion { major: 24, minor: 8 }));
        assert_eq!(ServerVersion::parse("25.3.1.2703-testing"), Some(ServerVersion { major: 25, minor: 3 }));
        assert_eq!(ServerVersion::parse("26.9.2.1\n"), Some(ServerVersion { major: 26, minor: 9 }));
        assert_eq!(ServerVersion::parse("banana"), None);
        assert!(ServerVersion::parse("18.16.1").unwrap() < ServerVersion::parse("22.2.1").unwrap());
    }
}
