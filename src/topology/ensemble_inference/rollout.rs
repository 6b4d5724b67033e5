//! Percentage rollout: a new model joins an ensemble for a configured share
//! of requests, chosen by correlation id so a caller always gets the same
//! ensemble, and the share can change while the processor runs.
//!
//! The flag file is TOML:
//!
//! ```toml
//! [[flag]]
//! name = "gpt-judge"      # a model id
//! ensemble = "moderation" # the ensemble it joins
//! percent = 10.0          # 0..=100, share of correlation ids that get it
//! ```
//!
//! Assignment is sticky: bucket = the first 8 bytes of
//! SHA-256(flag name, 0x00, correlation id) as a big-endian integer, mod
//! 10,000; a request is in when bucket < percent × 100. The same id is in or
//! out on every instance and after every restart; raising the percentage
//! only adds ids, lowering it only removes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::ConfigError;

/// The bucket of `correlation_id` for flag `flag`, in 0..10_000.
pub fn bucket(flag: &str, correlation_id: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(flag.as_bytes());
    h.update([0u8]);
    h.update(correlation_id.as_bytes());
    let d = h.finalize();
    (u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % 10_000) as u32
}

/// Whether `correlation_id` is in the `percent` share of flag `flag`.
pub fn assigned(flag: &str, correlation_id: &str, percent: f64) -> bool {
    (bucket(flag, correlation_id) as f64) < percent * 100.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flag {
    /// The model id that joins.
    pub name: String,
    /// The configured ensemble it joins.
    pub ensemble: String,
    pub percent: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagFile {
    #[serde(default)]
    flag: Vec<Flag>,
}

/// Flags by name, as last loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagSet(pub BTreeMap<String, Flag>);

impl FlagSet {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: FlagFile = toml::from_str(text).map_err(|e| ConfigError::toml(path, e))?;
        let mut out = BTreeMap::new();
        for (i, f) in file.flag.into_iter().enumerate() {
            if !(0.0..=100.0).contains(&f.percent) || f.percent.is_nan() {
                return Err(ConfigError::invalid(path, &format!("flag[{i}].percent"), format!("is {}; use a share between 0 and 100", f.percent)));
            }
            if out.contains_key(&f.name) {
                return Err(ConfigError::invalid(path, &format!("flag[{i}].name"), format!("`{}` is declared twice; keep one", f.name)));
            }
            out.insert(f.name.clone(), f);
        }
        Ok(Self(out))
    }

    /// The flagged models that join `ensemble` for `correlation_id`, and the
    /// state of every flag of that ensemble for it (`name=on|off`, the label
    /// kept on the result and in the per-flag metrics).
    pub fn joining(&self, ensemble: &str, correlation_id: &str) -> (Vec<String>, Vec<String>) {
        let mut models = Vec::new();
        let mut states = Vec::new();
        for f in self.0.values().filter(|f| f.ensemble == ensemble) {
            let on = assigned(&f.name, correlation_id, f.percent);
            if on {
                models.push(f.name.clone());
            }
            states.push(format!("{}={}", f.name, if on { "on" } else { "off" }));
        }
        (models, states)
    }
}

/// A flag file that reloads when it changes. `refresh` is cheap (one
/// `stat`) and is called by the stage on its clock ticks, so no thread or
/// file watcher is needed; a file that fails to parse keeps the flags that
/// were loaded last and is reported once per change.
pub struct Flags {
    path: PathBuf,
    current: RwLock<(Arc<FlagSet>, Option<SystemTime>)>,
}

impl Flags {
    /// Loads `path`; an unreadable or invalid file is an error here, before
    /// anything runs.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        let set = FlagSet::parse(path, &text)?;
        Ok(Self { path: path.to_path_buf(), current: RwLock::new((Arc::new(set), modified(path))) })
    }

    /// Flags that never change (no file).
    pub fn fixed(set: FlagSet) -> Self {
        Self { path: PathBuf::new(), current: RwLock::new((Arc::new(set), None)) }
    }

    pub fn current(&self) -> Arc<FlagSet> {
        self.current.read().unwrap().0.clone()
    }

    /// Re-reads the file if its modification time changed. Returns true when
    /// new flags were taken.
    pub fn refresh(&self) -> bool {
        if self.path.as_os_str().is_empty() {
            return false;
        }
        let seen = self.current.read().unwrap().1;
        let now = modified(&self.path);
        if now == seen {
            return false;
        }
        let mut cur = self.current.write().unwrap();
        cur.1 = now;
        match std::fs::read_to_string(&self.path).map_err(|e| ConfigError::io(&self.path, e)).and_then(|t| FlagSet::parse(&self.path, &t)) {
            Ok(set) if set == *cur.0 => false,
            Ok(set) => {
                tracing::info!(path = %self.path.display(), flags = set.0.len(), "rollout flags reloaded");
                cur.0 = Arc::new(set);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "rollout flag file changed but is invalid; keeping the flags loaded before");
                false
            }
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_ids_land_within_two_points_of_the_share() {
        for percent in [1.0, 10.0, 25.0, 50.0, 90.0] {
            let on = (0..10_000).filter(|i| assigned("new-model", &format!("corr-{i}"), percent)).count();
            let share = on as f64 / 100.0;
            assert!((share - percent).abs() <= 2.0, "{percent}%: got {share}%");
        }
    }

    #[test]
    fn assignment_is_sticky_and_monotonic() {
        for i in 0..2_000 {
            let id = format!("c{i}");
            assert_eq!(assigned("m", &id, 30.0), assigned("m", &id, 30.0));
            if assigned("m", &id, 30.0) {
                assert!(assigned("m", &id, 31.0), "raising the share never drops an id");
            }
        }
        assert!(!assigned("m", "x", 0.0) && assigned("m", "x", 100.0));
        // Different flags bucket independently.
        let both = (0..10_000).filter(|i| assigned("a", &format!("{i}"), 50.0) && assigned("b", &format!("{i}"), 50.0)).count();
        assert!((2_300..=2_700).contains(&both), "{both}");
    }

    #[test]
    fn the_flag_file_reloads_when_it_changes_and_a_bad_edit_keeps_the_old_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flags.toml");
        std::fs::write(&path, "[[flag]]\nname = \"new\"\nensemble = \"e\"\npercent = 0.0\n").unwrap();
        let flags = Flags::load(&path).unwrap();
        assert_eq!(flags.current().joining("e", "id-1").0, Vec::<String>::new());
        assert!(!flags.refresh(), "unchanged");

        // Modification times can be coarse: make sure the new one differs.
        std::fs::write(&path, "[[flag]]\nname = \"new\"\nensemble = \"e\"\npercent = 100.0\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert!(flags.refresh());
        let (models, states) = flags.current().joining("e", "id-1");
        assert_eq!((models, states), (vec!["new".to_string()], vec!["new=on".to_string()]));

        std::fs::write(&path, "[[flag]]\nname = \"new\"\npercent = 250.0\n").unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later + std::time::Duration::from_secs(2)).unwrap();
        assert!(!flags.refresh(), "an invalid file is not taken");
        assert_eq!(flags.current().0["new"].percent, 100.0);
    }

    #[test]
    fn invalid_flags_name_the_field() {
        let e = FlagSet::parse(Path::new("f.toml"), "[[flag]]\nname = \"m\"\nensemble = \"e\"\npercent = 101.0\n").unwrap_err().to_string();
        assert!(e.contains("f.toml") && e.contains("flag[0].percent"), "{e}");
        let e = FlagSet::parse(Path::new("f.toml"), "[[flag]]\nname = \"m\"\nensemble = \"e\"\npercent = 1.0\n[[flag]]\nname = \"m\"\nensemble = \"e\"\npercent = 2.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("declared twice"), "{e}");
    }
}
