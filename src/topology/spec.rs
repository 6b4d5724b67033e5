//! Topology declarations (`topologies/*.toml`): parsed, then checked before
//! anything runs. Errors name the file, the field and the fix.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::ConfigError;
use crate::flow::runner::Limits;
use crate::flow::window::WindowConfig;
use crate::topology::Topology;

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
    /// The `[[stage]]` entries, each a table with `name = "..."` and that
    /// stage's settings. Only the topology knows their types: it checks them
    /// ([`crate::topology::Topology::check`]) and reads them with
    /// [`TopologySpec::typed_stages`].
    #[serde(rename = "stage", default)]
    pub stages: Vec<toml::Table>,
    /// The file the declaration came from, named in every error.
    #[serde(skip)]
    pub origin: PathBuf,
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

/// A stage a topology understands, in the only order its stages can run,
/// and whether a declaration may leave it out.
pub struct StageRule {
    pub name: &'static str,
    pub required: bool,
}

impl TopologySpec {
    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses and checks a declaration; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut spec: TopologySpec = toml::from_str(text).map_err(|e| ConfigError::toml(path, e))?;
        spec.origin = path.to_path_buf();
        spec.check()?;
        Ok(spec)
    }

    /// An error about `field` of this declaration.
    pub fn invalid(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(&self.origin, field, message)
    }

    /// The topology this declaration names.
    pub fn topology(&self) -> Result<&'static dyn Topology, ConfigError> {
        crate::topology::find(&self.name).ok_or_else(|| {
            self.invalid("name", format!("unknown topology `{}`; known topologies: {:?}", self.name, crate::topology::names()))
        })
    }

    /// Checks the common part, then the stage order against the topology's
    /// rules, then each stage's settings (by the topology).
    pub fn check(&self) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| Err(self.invalid(field, msg));
        let topology = self.topology()?;
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
        self.check_order(topology.stage_rules())?;
        topology.check(self)
    }

    /// Order and presence of the `[[stage]]` entries against `rules`.
    fn check_order(&self, rules: &[StageRule]) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| Err(self.invalid(field, msg));
        let mut next_rule = 0;
        for i in 0..self.stages.len() {
            let field = self.stage_field(i);
            let Some(name) = self.stage_name(i) else {
                return err(&field, "has no `name`; every `[[stage]]` starts with `name = \"...\"`".into());
            };
            let Some(pos) = rules.iter().position(|r| r.name == name) else {
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
        }
        if let Some(missing) = rules[next_rule..].iter().find(|r| r.required) {
            return err("stage", format!("required stage `{}` is missing; add `[[stage]] name = \"{}\"`", missing.name, missing.name));
        }
        Ok(())
    }

    /// The `name` of stage entry `i`.
    pub fn stage_name(&self, i: usize) -> Option<&str> {
        self.stages.get(i)?.get("name")?.as_str()
    }

    /// How errors name stage entry `i`: `stage[2] (name = "hash")`.
    pub fn stage_field(&self, i: usize) -> String {
        format!("stage[{i}] (name = \"{}\")", self.stage_name(i).unwrap_or("?"))
    }

    /// The stage entries as the topology's own stage type `S`, usually an
    /// enum tagged by `name`. An unknown or mistyped setting is an error
    /// naming the file, the entry and the setting.
    pub fn typed_stages<S: DeserializeOwned>(&self) -> Result<Vec<S>, ConfigError> {
        (0..self.stages.len())
            .map(|i| toml::Value::Table(self.stages[i].clone()).try_into::<S>().map_err(|e| self.invalid(&self.stage_field(i), e.to_string().trim_end().to_string())))
            .collect()
    }

    pub fn group(&self) -> String {
        self.source.group.clone().unwrap_or_else(|| format!("hartonomous-{}", self.name))
    }

    /// The graph of stages, for `hartonomous topology show`.
    pub fn render(&self) -> Result<String, ConfigError> {
        let lines = self.topology()?.describe(self)?;
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
        for (i, (stage, detail)) in lines.iter().enumerate() {
            let _ = writeln!(s, "  {:>2}. {:<9} {}", i + 1, stage, detail);
        }
        let _ = writeln!(s, "  invalid -> {}{}", self.dead_letter.topic, if self.dead_letter.archive { " (archived in table dead_letters)" } else { "" });
        let _ = write!(s, "  commit     highest contiguous acknowledged offset per partition");
        Ok(s)
    }
}

