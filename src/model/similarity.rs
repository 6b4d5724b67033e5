//! The embedding-similarity classifier: labels described by prototype texts,
//! compared with the input by cosine similarity in the configured embedder's
//! space. With the built-in hashing embedder it is deterministic and needs
//! no server, which makes it the embedded default's second model.
//!
//! Each label's centroid is the normalised mean of its prototypes'
//! embeddings, computed once, on first use. The input's label is the
//! centroid most similar to it; a tie goes to the label declared first. The
//! score is that cosine similarity, floored at 0.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::sync::OnceCell;

use super::{Model, ModelError, Prediction};
use crate::embed::{EmbedError, Embedder};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimilarityConfig {
    pub id: String,
    #[serde(default = "super::default_version")]
    pub version: String,
    /// Labels in declaration order (the tie-breaker).
    pub labels: Vec<Prototype>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prototype {
    pub label: String,
    pub texts: Vec<String>,
}

impl SimilarityConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.labels.len() < 2 {
            return Err("labels needs at least two entries to choose between".into());
        }
        if let Some((i, l)) = self.labels.iter().enumerate().find(|(_, l)| l.texts.iter().all(|t| t.trim().is_empty())) {
            return Err(format!("labels[{i}] (`{}`) has no prototype text; describe the label with example texts", l.label));
        }
        Ok(())
    }
}

pub struct SimilarityModel {
    config: SimilarityConfig,
    embedder: Arc<dyn Embedder>,
    version: String,
    centroids: OnceCell<Vec<Vec<f32>>>,
}

impl SimilarityModel {
    /// The version recorded with outputs names the embedder too, since a
    /// different embedder gives different answers.
    pub fn new(config: SimilarityConfig, embedder: Arc<dyn Embedder>) -> Result<Self, String> {
        config.check()?;
        let version = format!("{}+{}", config.version, embedder.model());
        Ok(Self { config, embedder, version, centroids: OnceCell::new() })
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.embedder.max_batch().max(1)) {
            out.extend(self.embedder.embed(chunk).await.map_err(from_embed)?);
        }
        Ok(out)
    }

    async fn centroids(&self) -> Result<&Vec<Vec<f32>>, ModelError> {
        self.centroids
            .get_or_try_init(|| async {
                let mut centroids = Vec::new();
                for label in &self.config.labels {
                    let texts: Vec<String> = label.texts.iter().filter(|t| !t.trim().is_empty()).cloned().collect();
                    let vectors = self.embed(texts).await?;
                    let mut mean = vec![0f32; self.embedder.dimension()];
                    for v in &vectors {
                        for (m, x) in mean.iter_mut().zip(v) {
                            *m += x;
                        }
                    }
                    normalise(&mut mean);
                    centroids.push(mean);
                }
                Ok(centroids)
            })
            .await
    }

    async fn classify(&self, input: &str) -> Result<Prediction, ModelError> {
        let centroids = self.centroids().await?;
        let mut v = self.embed(vec![input.to_string()]).await?.pop().ok_or_else(|| ModelError::BadAnswer("the embedder returned no vector".into()))?;
        normalise(&mut v);
        let mut best: Option<(usize, f32)> = None;
        for (i, c) in centroids.iter().enumerate() {
            let cos: f32 = c.iter().zip(&v).map(|(a, b)| a * b).sum();
            // Strictly greater: the first declared label keeps a tie.
            if best.is_none_or(|(_, b)| cos > b + 1e-6) {
                best = Some((i, cos));
            }
        }
        let (i, cos) = best.expect("at least two labels");
        Ok(Prediction { label: self.config.labels[i].label.clone(), score: Some(f64::from(cos.max(0.0))) })
    }
}

impl Model for SimilarityModel {
    fn id(&self) -> &str {
        &self.config.id
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn predict<'a>(&'a self, input: &'a str) -> BoxFuture<'a, Result<Prediction, ModelError>> {
        Box::pin(self.classify(input))
    }
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

fn from_embed(e: EmbedError) -> ModelError {
    match e {
        EmbedError::Unavailable { .. } => ModelError::Unavailable(e.to_string()),
        EmbedError::Rejected { .. } => ModelError::Rejected(e.to_string()),
        EmbedError::Misconfigured { .. } => ModelError::Misconfigured(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::hashing::HashingEmbedder;

    fn model() -> SimilarityModel {
        let config = SimilarityConfig {
            id: "proto".into(),
            version: "1".into(),
            labels: vec![
                Prototype { label: "billing".into(), texts: vec!["my invoice is wrong".into(), "refund the payment on my card".into()] },
                Prototype { label: "outage".into(), texts: vec!["the service is down".into(), "cannot connect, site not loading".into()] },
            ],
        };
        SimilarityModel::new(config, Arc::new(HashingEmbedder::new(384, 32))).unwrap()
    }

    #[tokio::test]
    async fn the_nearest_prototype_wins_and_answers_are_deterministic() {
        let m = model();
        let a = m.predict("please refund my invoice payment").await.unwrap();
        assert_eq!(a.label, "billing");
        assert!(a.score.unwrap() > 0.0 && a.score.unwrap() <= 1.0, "{a:?}");
        let b = m.predict("the site is down and not loading").await.unwrap();
        assert_eq!(b.label, "outage");
        assert_eq!(m.predict("please refund my invoice payment").await.unwrap(), a);
        assert_eq!(model().predict("the site is down and not loading").await.unwrap(), b, "a new instance answers the same");
        assert_eq!(m.version(), "1+hashing-v1-d384");
    }

    #[tokio::test]
    async fn a_tie_goes_to_the_label_declared_first() {
        // Two labels described by the same text are equally near any input.
        let same = |label: &str| Prototype { label: label.into(), texts: vec!["the same words".into()] };
        let config = SimilarityConfig { id: "p".into(), version: "1".into(), labels: vec![same("second-best"), same("also")] };
        let m = SimilarityModel::new(config, Arc::new(HashingEmbedder::new(64, 8))).unwrap();
        assert_eq!(m.predict("the same words").await.unwrap().label, "second-best");
        assert_eq!(m.predict("other words").await.unwrap().label, "second-best");
    }

    #[test]
    fn a_label_needs_prototypes() {
        let mut c = model().config.clone();
        c.labels[1].texts = vec!["  ".into()];
        assert!(SimilarityModel::new(c, Arc::new(HashingEmbedder::new(8, 4))).err().unwrap().contains("labels[1]"));
    }
}
