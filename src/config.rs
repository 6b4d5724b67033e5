//! Connection profiles (`connectors/*.toml`): which log, store, registry and
//! embedder a run uses. Parsed with unknown fields denied, overridden from
//! the environment, then checked before anything runs. Every error names the
//! file, the field and the fix.
//!
//! Environment overrides:
//! - `HARTONOMOUS_DATA_DIR` sets `store.data_dir` (for every command);
//! - `HARTONOMOUS__<SECTION>__<FIELD>=value` sets any field, e.g.
//!   `HARTONOMOUS__EMBEDDER__DIMENSION=768`. The value is read as TOML
//!   (a number, a boolean, a quoted string) and otherwise as a bare string.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::avro::confluent::ConfluentRegistryConfig;
use crate::embed::openai::OpenAiConfig;
use crate::log::kafka::KafkaConfig;
use crate::store::clickhouse::ClickHouseConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: field `{field}` {message}")]
    Invalid { file: String, field: String, message: String },
}

impl ConfigError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { file: path.display().to_string(), source }
    }

    pub fn toml(path: &Path, e: toml::de::Error) -> Self {
        Self::Parse { file: path.display().to_string(), message: e.to_string().trim_end().to_string() }
    }

    pub fn invalid(path: &Path, field: &str, message: impl Into<String>) -> Self {
        Self::Invalid { file: path.display().to_string(), field: field.to_string(), message: message.into() }
    }
}

/// The built-in profile, identical to `connectors/embedded.toml`.
pub const EMBEDDED_PROFILE: &str = include_str!("../connectors/embedded.toml");

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Local state: the embedded store's tables and the file registry.
    /// `HARTONOMOUS_DATA_DIR` overrides it.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    pub log: LogProfile,
    pub store: StoreProfile,
    #[serde(default)]
    pub registry: RegistryProfile,
    pub embedder: EmbedderProfile,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("hartonomous-data")
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LogProfile {
    /// The in-process log: topics live in memory for the length of one command.
    Embedded(EmbeddedLogProfile),
    /// Any Kafka-protocol broker, through librdkafka.
    Kafka(KafkaConfig),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedLogProfile {}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StoreProfile {
    /// Parquet files under `data_dir/tables`, queried with DataFusion SQL.
    Embedded(EmbeddedStoreProfile),
    /// ClickHouse over HTTP.
    Clickhouse(ClickHouseConfig),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedStoreProfile {}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RegistryProfile {
    /// A JSON file (default `<data_dir>/registry.json`); ids stay stable across runs.
    File(FileRegistryProfile),
    /// A Confluent-compatible Schema Registry.
    Confluent(ConfluentRegistryConfig),
}

impl Default for RegistryProfile {
    fn default() -> Self {
        RegistryProfile::File(FileRegistryProfile::default())
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileRegistryProfile {
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EmbedderProfile {
    /// The built-in feature-hashing model: deterministic, local, no server.
    Hashing(HashingProfile),
    /// Any OpenAI-compatible `/v1/embeddings` service.
    Openai(OpenAiConfig),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashingProfile {
    pub dimension: usize,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
}

fn default_max_batch() -> usize {
    256
}

impl Profile {
    /// Loads `path`, or the built-in embedded profile when `None`, applies the
    /// environment overrides, and checks the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (name, text) = match path {
            Some(p) => (p.to_path_buf(), std::fs::read_to_string(p).map_err(|e| ConfigError::io(p, e))?),
            None => (PathBuf::from("connectors/embedded.toml (built in)"), EMBEDDED_PROFILE.to_string()),
        };
        Self::parse(&name, &text, std::env::vars())
    }

    pub fn parse(path: &Path, text: &str, env: impl Iterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::toml(path, e))?;
        for (key, value) in env {
            let fields: Vec<String> = if key == "HARTONOMOUS_DATA_DIR" {
                vec!["data_dir".into()]
            } else if let Some(rest) = key.strip_prefix("HARTONOMOUS__") {
                rest.split("__").map(str::to_lowercase).collect()
            } else {
                continue;
            };
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            set_path(&mut doc, &fields, parsed).map_err(|m| ConfigError::invalid(path, &key, m))?;
        }
        let profile: Profile = doc.try_into().map_err(|e| ConfigError::toml(path, e))?;
        profile.check(path)?;
        Ok(profile)
    }

    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(path, "data_dir", "is empty; set a directory, or HARTONOMOUS_DATA_DIR"));
        }
        if let LogProfile::Kafka(k) = &self.log {
            k.check().map_err(|m| ConfigError::invalid(path, "log", m))?;
        }
        if let StoreProfile::Clickhouse(c) = &self.store {
            c.check().map_err(|m| ConfigError::invalid(path, "store", m))?;
        }
        if let RegistryProfile::Confluent(r) = &self.registry {
            r.check().map_err(|m| ConfigError::invalid(path, "registry", m))?;
        }
        match &self.embedder {
            EmbedderProfile::Hashing(h) if h.dimension == 0 || h.dimension > 16_384 => {
                Err(ConfigError::invalid(path, "embedder.dimension", format!("is {}; use 1..=16384 (384 is typical)", h.dimension)))
            }
            EmbedderProfile::Hashing(h) if h.max_batch == 0 => Err(ConfigError::invalid(path, "embedder.max_batch", "is 0; use at least 1")),
            EmbedderProfile::Openai(o) => o.check().map_err(|m| ConfigError::invalid(path, "embedder", m)),
            EmbedderProfile::Hashing(_) => Ok(()),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the file registry lives, when the profile uses one.
    pub fn registry_path(&self) -> Option<PathBuf> {
        match &self.registry {
            RegistryProfile::File(f) => Some(f.path.clone().unwrap_or_else(|| self.data_dir.join("registry.json"))),
            RegistryProfile::Confluent(_) => None,
        }
    }
}

/// Creates `dir`, and any missing parent, readable only by its owner (mode
/// 0700 on Unix, lowered further by the umask, never widened): the data
/// directory holds the stored content and the schema registry. An existing
/// directory is left as it is, mode included: an operator who widened it on
/// purpose keeps that. Every place that creates the data directory or the
/// registry file's directory goes through here.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn set_path(doc: &mut toml::Table, fields: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = fields.split_last().ok_or("names no field")?;
    let mut table = doc;
    for f in parents {
        table = table
            .entry(f.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| format!("cannot set `{f}`: it is not a section"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn builtin_profile_parses_and_env_overrides_apply() {
        let p = Profile::parse(Path::new("e.toml"), EMBEDDED_PROFILE, env(&[("HARTONOMOUS_DATA_DIR", "/tmp/x"), ("HARTONOMOUS__EMBEDDER__DIMENSION", "64")])).unwrap();
        assert_eq!(p.data_dir(), Path::new("/tmp/x"));
        assert!(matches!(p.embedder, EmbedderProfile::Hashing(HashingProfile { dimension: 64, .. })));
    }

    #[cfg(unix)]
    #[test]
    fn private_dirs_are_owner_only_and_existing_ones_are_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let nested = tmp.path().join("a").join("data");
        create_private_dir(&nested).unwrap();
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700, "missing parents too");
        create_private_dir(&nested).unwrap();

        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o755, "an existing directory keeps its mode");
    }

    #[test]
    fn errors_name_file_field_and_fix() {
        let e = Profile::parse(Path::new("e.toml"), EMBEDDED_PROFILE, env(&[("HARTONOMOUS__EMBEDDER__DIMENSION", "0")])).unwrap_err().to_string();
        assert!(e.contains("e.toml") && e.contains("embedder.dimension") && e.contains("use 1..=16384"), "{e}");
        let e = Profile::parse(Path::new("e.toml"), &EMBEDDED_PROFILE.replace("max_batch", "max_btach"), env(&[])).unwrap_err().to_string();
        assert!(e.contains("e.toml") && e.contains("max_btach"), "{e}");
    }
}
