//! The keyword model: labels described by words, for the embedded default
//! and for rules an operator can read.
//!
//! Each label lists keywords. The input is split into words (runs of
//! letters and digits, lower-cased); a label's hits are how many of its
//! distinct keywords occur. The label with the most hits wins; a tie goes to
//! the label declared first. The score is the winner's share of all hits.
//! With no hit the answer is `default_label` with score 0.

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{Model, ModelError, Prediction};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordConfig {
    pub id: String,
    #[serde(default = "super::default_version")]
    pub version: String,
    pub default_label: String,
    /// Labels in declaration order (the tie-breaker).
    pub labels: Vec<KeywordLabel>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordLabel {
    pub label: String,
    pub keywords: Vec<String>,
}

impl KeywordConfig {
    /// The error names the field and the fix.
    pub fn check(&self) -> Result<(), String> {
        if self.labels.is_empty() {
            return Err("labels is empty; add at least one `[[labels]]` with `label` and `keywords`".into());
        }
        for (i, l) in self.labels.iter().enumerate() {
            if l.keywords.iter().all(|k| words(k).is_empty()) {
                return Err(format!("labels[{i}] (`{}`) has no keyword with a letter or digit; list words that indicate it", l.label));
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct KeywordModel {
    config: KeywordConfig,
    /// Per label, its keywords as lower-cased words.
    keywords: Vec<Vec<String>>,
}

impl KeywordModel {
    pub fn new(config: KeywordConfig) -> Result<Self, String> {
        config.check()?;
        let keywords = config.labels.iter().map(|l| l.keywords.iter().flat_map(|k| words(k)).collect()).collect();
        Ok(Self { config, keywords })
    }

    fn classify(&self, input: &str) -> Prediction {
        let seen: std::collections::HashSet<String> = words(input).into_iter().collect();
        let hits: Vec<usize> = self.keywords.iter().map(|ks| ks.iter().filter(|k| seen.contains(*k)).count()).collect();
        let total: usize = hits.iter().sum();
        // max_by_key keeps the last maximum; iterate in reverse so the first declared wins a tie.
        let best = hits.iter().enumerate().rev().max_by_key(|(_, h)| **h).map(|(i, h)| (i, *h));
        match best {
            Some((i, h)) if h > 0 => Prediction { label: self.config.labels[i].label.clone(), score: Some(h as f64 / total as f64) },
            _ => Prediction { label: self.config.default_label.clone(), score: Some(0.0) },
        }
    }
}

impl Model for KeywordModel {
    fn id(&self) -> &str {
        &self.config.id
    }

    fn version(&self) -> &str {
        &self.config.version
    }

    fn predict<'a>(&'a self, input: &'a str) -> BoxFuture<'a, Result<Prediction, ModelError>> {
        let p = self.classify(input);
        Box::pin(async move { Ok(p) })
    }
}

/// Lower-cased runs of letters and digits.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> KeywordModel {
        KeywordModel::new(KeywordConfig {
            id: "rules".into(),
            version: "1".into(),
            default_label: "ham".into(),
            labels: vec![
                KeywordLabel { label: "spam".into(), keywords: vec!["free".into(), "winner".into(), "click here".into()] },
                KeywordLabel { label: "urgent".into(), keywords: vec!["now".into(), "asap".into()] },
            ],
        })
        .unwrap()
    }

    #[test]
    fn most_hits_wins_with_its_share_as_score() {
        let m = model();
        // spam: free, winner, click, here = 4; urgent: now = 1.
        assert_eq!(m.classify("FREE prize, winner! Click here now."), Prediction { label: "spam".into(), score: Some(0.8) });
        assert_eq!(m.classify("meeting notes"), Prediction { label: "ham".into(), score: Some(0.0) });
    }

    #[test]
    fn a_tie_goes_to_the_label_declared_first() {
        assert_eq!(model().classify("free asap").label, "spam");
        assert_eq!(model().classify("asap free").label, "spam");
    }

    #[test]
    fn a_label_without_usable_keywords_is_refused() {
        let mut c = model().config.clone();
        c.labels[1].keywords = vec!["!!".into()];
        assert!(KeywordModel::new(c).unwrap_err().contains("labels[1]"));
    }
}
