//! The configuration of a [`ClickHouseStore`](super::ClickHouseStore) and its
//! checks, including the `ca_file` of extra roots for `https://` urls.

use std::path::PathBuf;

use serde::Deserialize;

use crate::store::StoreError;

/// Configuration of a [`ClickHouseStore`](super::ClickHouseStore).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint, e.g. `http://127.0.0.1:8123`, or
    /// `https://clickhouse.example:8443` for the server's `https_port`. Over
    /// https the server's certificate must chain to a system root or to a
    /// certificate in `ca_file`, and name the URL's host.
    pub url: String,
    /// PEM file of extra root certificates (e.g. a private CA) trusted for an
    /// `https://` url, in addition to the system's roots. Read and checked
    /// (it must hold PEM certificates) when the profile is loaded, and read
    /// again when the store connects. A server certificate that chains to
    /// neither is a fatal error that names this field.
    pub ca_file: Option<PathBuf>,
    /// Database holding the tables; created if missing (except by `query`,
    /// which never creates anything: see [`ClickHouseStore::connect_for_query`](super::ClickHouseStore::connect_for_query)).
    pub database: String,
    /// User name sent with every request (empty: the server's default user).
    pub user: String,
    /// Name of an environment variable holding the password. It is read once,
    /// when the store is built, and never logged.
    pub password_env: Option<String>,
    /// Most rows sent in one INSERT; larger calls are split.
    pub max_rows_per_insert: usize,
    /// Most bytes (RowBinary, approximately) sent in one INSERT; larger calls
    /// are split, and a single row larger than this is rejected.
    pub max_bytes_per_insert: usize,
    /// Apply the bundled schema when connecting.
    pub migrate_on_start: bool,
    /// Deadline for each request (query, or one INSERT chunk); an expired
    /// request counts as `Unavailable`.
    pub request_timeout_ms: u64,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            ca_file: None,
            database: "hartonomous".into(),
            user: "default".into(),
            password_env: None,
            max_rows_per_insert: 10_000,
            max_bytes_per_insert: 16 * 1024 * 1024,
            migrate_on_start: true,
            request_timeout_ms: 30_000,
        }
    }
}

impl ClickHouseConfig {
    /// A configuration for `url` and `database` with defaults for the rest.
    pub fn new(url: impl Into<String>, database: impl Into<String>) -> Self {
        Self { url: url.into(), database: database.into(), ..Self::default() }
    }

    /// Checks that the values make sense; the error names the field and the
    /// fix. Reads `ca_file`, if set, to check that it holds PEM certificates.
    pub fn check(&self) -> Result<(), String> {
        let example = "use e.g. http://127.0.0.1:8123, or https://HOST:8443 for the server's https_port";
        if self.url.trim().is_empty() {
            return Err(format!("url is empty; {example}"));
        }
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("url `{}` is not a valid URL ({e}); {example}", self.url))?;
        match (url.scheme(), &self.ca_file) {
            ("https", Some(path)) => crate::tls::read_ca_file(path).map(drop)?,
            ("https", None) => {}
            ("http", None) => {}
            ("http", Some(_)) => {
                return Err(format!(
                    "ca_file is set, but url `{}` uses plain http, where no certificate is checked; \
                     use https:// with the server's https_port, or remove ca_file",
                    self.url
                ));
            }
            (other, _) => return Err(format!("url `{}` has scheme `{other}`; {example}", self.url)),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("url `{}` has no host; {example}", self.url));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("url contains credentials; remove them and set `user` and `password_env` instead".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("url `{}` has a query or fragment; remove it (set the database with `database`)", self.url));
        }
        if !is_plain_identifier(&self.database) {
            return Err(format!(
                "database `{}` is not a plain name; use letters, digits and `_`, not starting with a digit \
                 (e.g. hartonomous)",
                self.database
            ));
        }
        if let Some(var) = &self.password_env
            && var.trim().is_empty()
        {
            return Err("password_env is empty; name an environment variable, or remove the field".into());
        }
        if self.max_rows_per_insert == 0 {
            return Err("max_rows_per_insert is 0; use at least 1 (10000 is typical)".into());
        }
        if self.max_bytes_per_insert < 1024 {
            return Err(format!("max_bytes_per_insert is {}; use at least 1024 (16777216 = 16 MiB is typical)", self.max_bytes_per_insert));
        }
        if self.request_timeout_ms == 0 {
            return Err("request_timeout_ms is 0; give each request at least 1 ms (30000 is typical)".into());
        }
        Ok(())
    }

    /// The password from the environment variable named by `password_env`,
    /// if any. A named but unset variable is an error that names it.
    pub fn password(&self) -> Result<Option<String>, StoreError> {
        let Some(var) = &self.password_env else { return Ok(None) };
        match std::env::var(var) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Err(StoreError::Fatal(format!(
                "clickhouse password_env names `{var}`, but that environment variable is not set; \
                 set it, or remove password_env"
            ))),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(StoreError::Fatal(format!("clickhouse password_env: environment variable `{var}` is not valid UTF-8")))
            }
        }
    }
}

fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_checks() {
        let c = ClickHouseConfig::default();
        assert_eq!(c.database, "hartonomous");
        assert_eq!(c.user, "default");
        assert_eq!(c.max_rows_per_insert, 10_000);
        assert_eq!(c.max_bytes_per_insert, 16 * 1024 * 1024);
        assert!(c.migrate_on_start);
        c.check().unwrap();

        let parsed: ClickHouseConfig = toml::from_str("url = \"http://ch:8123\"\ndatabase = \"x\"").unwrap();
        assert_eq!(parsed, ClickHouseConfig { url: "http://ch:8123".into(), database: "x".into(), ..c.clone() });
        let unknown = toml::from_str::<ClickHouseConfig>("pasword_env = \"X\"").unwrap_err();
        assert!(unknown.to_string().contains("pasword_env"), "{unknown}");

        let bad = |f: fn(&mut ClickHouseConfig), field: &str| {
            let mut c = ClickHouseConfig::default();
            f(&mut c);
            let err = c.check().unwrap_err();
            assert!(err.starts_with(field), "{err}");
        };
        bad(|c| c.url = "".into(), "url");
        bad(|c| c.url = "ftp://x".into(), "url");
        ClickHouseConfig { url: "https://x:8443".into(), ..ClickHouseConfig::default() }.check().unwrap();
        bad(|c| c.ca_file = Some("/nonexistent/hartonomous-ca.pem".into()), "ca_file");
        bad(
            |c| {
                c.url = "https://x:8443".into();
                c.ca_file = Some("/nonexistent/hartonomous-ca.pem".into());
            },
            "ca_file",
        );
        bad(|c| c.url = "http://u:p@x:8123".into(), "url");
        bad(|c| c.url = "http://x:8123/?database=y".into(), "url");
        bad(|c| c.database = "my-db".into(), "database");
        bad(|c| c.database = "1db".into(), "database");
        bad(|c| c.password_env = Some(" ".into()), "password_env");
        bad(|c| c.max_rows_per_insert = 0, "max_rows_per_insert");
        bad(|c| c.max_bytes_per_insert = 10, "max_bytes_per_insert");
        bad(|c| c.request_timeout_ms = 0, "request_timeout_ms");
    }

    #[test]
    fn a_missing_password_variable_is_named() {
        let c = ClickHouseConfig { password_env: Some("HARTONOMOUS_TEST_SURELY_UNSET_7f3a".into()), ..Default::default() };
        let err = c.password().unwrap_err();
        assert!(matches!(&err, StoreError::Fatal(m) if m.contains("HARTONOMOUS_TEST_SURELY_UNSET_7f3a")), "{err:?}");
        assert_eq!(ClickHouseConfig::default().password().unwrap(), None);
    }
}
