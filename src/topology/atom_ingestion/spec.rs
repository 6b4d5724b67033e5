//! What `topologies/atom-ingestion.toml` may say: its stages, their
//! settings and the checks on them, run before anything starts.

use serde::Deserialize;

use crate::config::ConfigError;
use crate::resilience::RetryConfig;
use crate::topology::spec::{StageRule, TopologySpec};

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
        Self { recent_capacity: 100_000, retry: RetryConfig::forever() }
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
        Self { retry: RetryConfig::forever() }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    pub topic: String,
    /// Avro record name of the event schema.
    pub schema: String,
    #[serde(default = "RetryConfig::forever")]
    pub retry: RetryConfig,
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

/// The stages of atom ingestion, in the only order they run.
pub const RULES: &[StageRule] = &[
    StageRule { name: "decode", required: true },
    StageRule { name: "validate", required: true },
    StageRule { name: "hash", required: true },
    StageRule { name: "dedup", required: false },
    StageRule { name: "embed", required: false },
    StageRule { name: "persist", required: true },
    StageRule { name: "publish", required: false },
];

/// The declaration's stages, typed.
pub struct Stages(pub Vec<StageSpec>);

impl Stages {
    pub fn of(spec: &TopologySpec) -> Result<Self, ConfigError> {
        spec.typed_stages().map(Self)
    }

    pub fn get<T>(&self, pick: impl Fn(&StageSpec) -> Option<&T>) -> Option<&T> {
        self.0.iter().find_map(pick)
    }

    pub fn validate(&self) -> Option<&ValidateSpec> {
        self.get(|s| if let StageSpec::Validate(v) = s { Some(v) } else { None })
    }

    pub fn dedup(&self) -> Option<&DedupSpec> {
        self.get(|s| if let StageSpec::Dedup(d) = s { Some(d) } else { None })
    }

    pub fn embed(&self) -> Option<&EmbedSpec> {
        self.get(|s| if let StageSpec::Embed(e) = s { Some(e) } else { None })
    }

    pub fn persist(&self) -> Option<&PersistSpec> {
        self.get(|s| if let StageSpec::Persist(p) = s { Some(p) } else { None })
    }

    pub fn publish(&self) -> Option<&PublishSpec> {
        self.get(|s| if let StageSpec::Publish(p) = s { Some(p) } else { None })
    }

    /// Each stage's settings, against the rest of the declaration.
    pub fn check(&self, spec: &TopologySpec) -> Result<(), ConfigError> {
        for (i, stage) in self.0.iter().enumerate() {
            let settings = match stage {
                StageSpec::Validate(v) if v.allowed_content_types.is_empty() => Err("allowed_content_types is empty; list at least one type, e.g. \"text/plain\"".to_string()),
                StageSpec::Validate(v) if v.max_content_bytes == 0 => Err("max_content_bytes is 0; set the largest content you accept".to_string()),
                StageSpec::Dedup(d) if d.recent_capacity < spec.limits.in_flight_records => Err(format!(
                    "recent_capacity ({}) is below limits.in_flight_records ({}); a content still in flight could be forgotten and embedded twice. Raise it to at least {}",
                    d.recent_capacity, spec.limits.in_flight_records, spec.limits.in_flight_records
                )),
                StageSpec::Dedup(d) => d.retry.check().map_err(|e| format!("retry: {e}")),
                StageSpec::Embed(e) if e.concurrency == 0 => Err("concurrency is 0; use at least 1".to_string()),
                StageSpec::Persist(p) => p.retry.check().map_err(|e| format!("retry: {e}")),
                StageSpec::Publish(p) if p.topic == spec.source.topic || p.topic == spec.dead_letter.topic => {
                    Err("topic must differ from source.topic and dead_letter.topic".to_string())
                }
                StageSpec::Publish(p) => p.retry.check().map_err(|e| format!("retry: {e}")),
                _ => Ok(()),
            };
            if let Err(e) = settings {
                return Err(spec.invalid(&spec.stage_field(i), e));
            }
        }
        Ok(())
    }

    /// One line per stage for `topology show`.
    pub fn describe(&self, spec: &TopologySpec) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|stage| {
                let detail = match stage {
                    StageSpec::Decode(_) => format!("Confluent wire format (or JSON by content-type header) -> {}", spec.source.schema),
                    StageSpec::Validate(v) => format!("allow {:?}, at most {} bytes, non-empty, UTF-8 for text", v.allowed_content_types, v.max_content_bytes),
                    StageSpec::Hash(_) => "SHA-256 of the content = atom identity".to_string(),
                    StageSpec::Dedup(d) => format!("created or matched: against the store, then in window and the last {} admitted", d.recent_capacity),
                    StageSpec::Embed(e) => format!("batched embedding calls, {} in flight", e.concurrency),
                    StageSpec::Persist(_) => "idempotent inserts: new atoms into `atoms` (by content hash), then every request into `atom_arrivals` (by position), as two tasks (`persist`, `arrivals`) so one window's arrivals overlap the next window's atoms".to_string(),
                    StageSpec::Publish(p) => format!("-> {} ({}): one event per accepted request, created or matched", p.topic, p.schema),
                };
                (stage.name().to_string(), detail)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::topology::spec::TopologySpec;

    const GOOD: &str = include_str!("../../../topologies/atom-ingestion.toml");

    fn parse(text: &str) -> Result<TopologySpec, String> {
        TopologySpec::parse(Path::new("t.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn bundled_declaration_is_valid() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.stages.len(), 7);
        assert!(spec.render().unwrap().contains("publish"));
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
