//! Topology declarations (`topologies/*.toml`): parsed, then checked before
//! anything runs. Errors name the file, the field and the fix.

use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::flow::runner::Limits;
use crate::flow::window::WindowConfig;
use crate::resilience::RetryConfig;

/// A whole topology file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub source: SourceSpec,
    pub dead_letter: DeadLetterSpec,
    #[serde(default)]
    pub window: WindowConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub commit_interval_ms: Option<u64>,
    #[serde(rename = "stage")]
    pub stages: Vec<StageSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub topic: String,
    /// Avro record name of the value schema (see `schemas/avro/`).
    pub schema: String,
    /// Partitions to create the topic with where the topology creates it.
    #[serde(default = "one")]
    pub partitions: i32,
    /// Consumer group; defaults to `hartonomous-<topology name>`.
    #[serde(default)]
    pub group: Option<String>,
}

fn one() -> i32 {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSpec {
    pub topic: String,
    /// Also archive dead letters in the store's `dead_letters` table.
    #[serde(default = "yes")]
    pub archive: bool,
}

fn yes() -> bool {
    true
}

/// One stage entry, `[[stage]]` with `name = "..."` and that stage's settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum StageSpec {
    Decode(DecodeSpec),
    Validate(ValidateSpec),
    Hash(HashSpec),
    Dedup(DedupSpec),
    Embed(EmbedSpec),
    Persist(PersistSpec),
    Publish(PublishSpec),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecodeSpec {}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateSpec {
    /// Content types accepted. Types starting with `text/` and the JSON, XML
    /// and YAML application types are text: their content must be UTF-8 and
    /// they are embedded. Others are stored and hashed but not embedded.
    pub allowed_content_types: Vec<String>,
    pub max_content_bytes: usize,
}

impl Default for ValidateSpec {
    fn default() -> Self {
        Self {
            allowed_content_types: ["text/plain", "text/markdown", "text/html", "text/csv", "application/json"]
                .map(String::from)
                .to_vec(),
            max_content_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashSpec {}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DedupSpec {
    /// Contents admitted recently and possibly not yet stored, remembered so
    /// a repeat in a later window that is still in flight is matched too
    /// (and answered with that content's fate). At least
    /// `limits.in_flight_records`.
    pub recent_capacity: usize,
    pub retry: RetryConfig,
}

impl Default for DedupSpec {
    fn default() -> Self {
        Self { recent_capacity: 100_000, retry: RetryConfig { max_attempts: 0, ..RetryConfig::default() } }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedSpec {
    /// Embedding calls in flight at once (windows are split into calls of the
    /// embedder's `max_batch`).
    pub concurrency: usize,
}

impl Default for EmbedSpec {
    fn default() -> Self {
        Self { concurrency: 2 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PersistSpec {
    /// Store writes retry forever by default: an outage becomes backpressure.
    pub retry: RetryConfig,
}

impl Default for PersistSpec {
    fn default() -> Self {
        Self { retry: RetryConfig { max_attempts: 0, ..RetryConfig::default() } }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    pub topic: String,
    /// Avro record name of the event schema.
    pub schema: String,
    #[serde(default = "forever")]
    pub retry: RetryConfig,
}

fn forever() -> RetryConfig {
    RetryConfig { max_attempts: 0, ..RetryConfig::default() }
}

impl StageSpec {
    pub fn name(&self) -> &'static str {
        match self {
            StageSpec::Decode(_) => "decode",
            StageSpec::Validate(_) => "validate",
            StageSpec::Hash(_) => "hash",
            StageSpec::Dedup(_) => "dedup",
            StageSpec::Embed(_) => "embed",
            StageSpec::Persist(_) => "persist",
            StageSpec::Publish(_) => "publish",
        }
    }
}

/// The stages a topology understands, in the only order they can run, and
/// which of them a declaration may leave out.
pub struct StageRule {
    pub name: &'static str,
    pub required: bool,
}

pub const ATOM_INGESTION: &[StageRule] = &[
    StageRule { name: "decode", required: true },
    StageRule { name: "validate", required: true },
    StageRule { name: "hash", required: true },
    StageRule { name: "dedup", required: false },
    StageRule { name: "embed", required: false },
    StageRule { name: "persist", required: true },
    StageRule { name: "publish", required: false },
];

impl TopologySpec {
    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses and checks a declaration; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let spec: TopologySpec = toml::from_str(text).map_err(|e| ConfigError::toml(path, e))?;
        spec.check(path)?;
        Ok(spec)
    }

    fn rules(&self) -> Option<&'static [StageRule]> {
        match self.name.as_str() {
            "atom-ingestion" => Some(ATOM_INGESTION),
            _ => None,
        }
    }

    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| Err(ConfigError::invalid(path, field, msg));
        let Some(rules) = self.rules() else {
            return err("name", format!("unknown topology `{}`; known topologies: atom-ingestion", self.name));
        };
        if self.source.topic.trim().is_empty() {
            return err("source.topic", "is empty; name the topic to read".into());
        }
        if self.source.partitions < 1 {
            return err("source.partitions", format!("is {}; use at least 1", self.source.partitions));
        }
        if self.dead_letter.topic == self.source.topic {
            return err("dead_letter.topic", "equals source.topic; dead letters need a topic of their own, e.g. `<source>.dlq`".into());
        }
        if let Err(e) = self.window.check() {
            return err("window", e);
        }
        if let Err(e) = self.limits.check() {
            return err("limits", e);
        }
        if self.limits.in_flight_records < self.window.max_records {
            return err(
                "limits.in_flight_records",
                format!("({}) is below window.max_records ({}); a window could never fill. Raise it", self.limits.in_flight_records, self.window.max_records),
            );
        }
        // Order and presence against the topology's rules.
        let mut next_rule = 0;
        for (i, stage) in self.stages.iter().enumerate() {
            let field = format!("stage[{i}] (name = \"{}\")", stage.name());
            let Some(pos) = rules.iter().position(|r| r.name == stage.name()) else {
                let known: Vec<_> = rules.iter().map(|r| r.name).collect();
                return err(&field, format!("is not a stage of {}; use one of {known:?}", self.name));
            };
            if pos < next_rule {
                let order: Vec<_> = rules.iter().map(|r| r.name).collect();
                return err(&field, format!("is out of order or repeated; stages run in this order: {order:?}"));
            }
            if let Some(missing) = rules[next_rule..pos].iter().find(|r| r.required) {
                return err(&field, format!("comes before required stage `{}`; add `[[stage]] name = \"{}\"` above it", missing.name, missing.name));
            }
            next_rule = pos + 1;
            let settings = match stage {
                StageSpec::Validate(v) if v.allowed_content_types.is_empty() => Err("allowed_content_types is empty; list at least one type, e.g. \"text/plain\"".to_string()),
                StageSpec::Validate(v) if v.max_content_bytes == 0 => Err("max_content_bytes is 0; set the largest content you accept".to_string()),
                StageSpec::Dedup(d) if d.recent_capacity < self.limits.in_flight_records => Err(format!(
                    "recent_capacity ({}) is below limits.in_flight_records ({}); a content still in flight could be forgotten and embedded twice. Raise it to at least {}",
                    d.recent_capacity, self.limits.in_flight_records, self.limits.in_flight_records
                )),
                StageSpec::Dedup(d) => d.retry.check().map_err(|e| format!("retry: {e}")),
                StageSpec::Embed(e) if e.concurrency == 0 => Err("concurrency is 0; use at least 1".to_string()),
                StageSpec::Persist(p) => p.retry.check().map_err(|e| format!("retry: {e}")),
                StageSpec::Publish(p) if p.topic == self.source.topic || p.topic == self.dead_letter.topic => {
                    Err("topic must differ from source.topic and dead_letter.topic".to_string())
                }
                StageSpec::Publish(p) => p.retry.check().map_err(|e| format!("retry: {e}")),
                _ => Ok(()),
            };
            if let Err(e) = settings {
                return err(&field, e);
            }
        }
        if let Some(missing) = rules[next_rule..].iter().find(|r| r.required) {
            return err("stage", format!("required stage `{}` is missing; add `[[stage]] name = \"{}\"`", missing.name, missing.name));
        }
        Ok(())
    }

    pub fn group(&self) -> String {
        self.source.group.clone().unwrap_or_else(|| format!("hartonomous-{}", self.name))
    }

    pub fn stage<T>(&self, pick: impl Fn(&StageSpec) -> Option<&T>) -> Option<&T> {
        self.stages.iter().find_map(pick)
    }

    /// The graph of stages, for `hartonomous topology show`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "topology {}", self.name);
        if !self.description.is_empty() {
            let _ = writeln!(s, "  {}", self.description);
        }
        let _ = writeln!(s, "  source     {} (value schema {}, {} partition(s), group {})", self.source.topic, self.source.schema, self.source.partitions, self.group());
        let w = &self.window;
        let _ = writeln!(s, "  window     closes at {} records | {} bytes | {} ms", w.max_records, w.max_bytes, w.max_age_ms);
        let l = &self.limits;
        let _ = writeln!(s, "  in flight  at most {} records | {} bytes; {} batches per edge", l.in_flight_records, l.in_flight_bytes, l.edge_batches);
        for (i, stage) in self.stages.iter().enumerate() {
            let detail = match stage {
                StageSpec::Decode(_) => format!("Confluent wire format (or JSON by content-type header) -> {}", self.source.schema),
                StageSpec::Validate(v) => format!("allow {:?}, at most {} bytes, non-empty, UTF-8 for text", v.allowed_content_types, v.max_content_bytes),
                StageSpec::Hash(_) => "SHA-256 of the content = atom identity".to_string(),
                StageSpec::Dedup(d) => format!("created or matched: against the store, then in window and the last {} admitted", d.recent_capacity),
                StageSpec::Embed(e) => format!("batched embedding calls, {} in flight", e.concurrency),
                StageSpec::Persist(_) => "idempotent inserts: new atoms into `atoms` (by content hash), then every request into `atom_arrivals` (by position)".to_string(),
                StageSpec::Publish(p) => format!("-> {} ({}): one event per accepted request, created or matched", p.topic, p.schema),
            };
            let _ = writeln!(s, "  {:>2}. {:<9} {}", i + 1, stage.name(), detail);
        }
        let _ = writeln!(s, "  invalid -> {}{}", self.dead_letter.topic, if self.dead_letter.archive { " (archived in table dead_letters)" } else { "" });
        let _ = write!(s, "  commit     highest contiguous acknowledged offset per partition");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../../topologies/atom-ingestion.toml");

    fn parse(text: &str) -> Result<TopologySpec, String> {
        TopologySpec::parse(Path::new("t.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn bundled_declaration_is_valid() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.stages.len(), 7);
        assert!(spec.render().contains("publish"));
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_fix() {
        let e = parse(&GOOD.replace("name = \"hash\"", "name = \"hsah\"")).unwrap_err();
        assert!(e.contains("t.toml") && e.contains("hsah"), "{e}");

        let without_hash = GOOD.replace("[[stage]]\nname = \"hash\"\n", "");
        let e = parse(&without_hash).unwrap_err();
        assert!(e.contains("required stage `hash`") && e.contains("add `[[stage]]"), "{e}");

        let e = parse(&GOOD.replace("max_records = 5000", "max_records = 0")).unwrap_err();
        assert!(e.contains("window") && e.contains("at least 1"), "{e}");

        let e = parse(&GOOD.replace("max_content_bytes", "max_content_byte")).unwrap_err();
        assert!(e.contains("t.toml") && e.contains("max_content_byte"), "{e}");
    }

    #[test]
    fn order_is_enforced() {
        let head = GOOD.split("[[stage]]").next().unwrap();
        let stages = |names: &[&str]| names.iter().map(|n| format!("[[stage]]\nname = \"{n}\"\n")).collect::<String>();
        let ok = parse(&format!("{head}{}", stages(&["decode", "validate", "hash", "persist"])));
        assert!(ok.is_ok(), "optional stages may be left out: {ok:?}");
        let e = parse(&format!("{head}{}", stages(&["decode", "validate", "hash", "persist", "dedup"]))).unwrap_err();
        assert!(e.contains("stage[4]") && e.contains("out of order"), "{e}");
        let e = parse(&format!("{head}{}", stages(&["decode", "hash", "validate", "persist"]))).unwrap_err();
        assert!(e.contains("required stage `validate`"), "{e}");
    }
}
