//! Cassettes: model and embedding answers recorded once and played back,
//! so a replay calls no model and answers the same every time.
//!
//! An entry is keyed by kind (`embedding` or `prediction`), model, model
//! version and the SHA-256 of the input text. Embedding models have no
//! version of their own; their dimension stands in for it. The file is JSON
//! lines, sorted by key, so recording the same answers twice writes the same
//! bytes. Only final answers are kept: a prediction that was unusable or
//! rejected is kept as that error (it is the model's answer for the input);
//! a transient failure (unavailable) is never recorded.
//!
//! Modes: [`Mode::Record`] calls the models and keeps every answer (saved by
//! [`Cassette::save`]); [`Mode::Replay`] answers from the file and, for an
//! input it lacks, either fails the run, naming the model and the input's
//! hash ([`OnMissing::Fail`]), or calls the model and keeps the answer
//! ([`OnMissing::Call`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::embed::{EmbedError, Embedder};
use crate::model::{Model, ModelError, Prediction};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    Fail,
    Call,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Record,
    Replay(OnMissing),
}

/// One recorded answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum Answer {
    Embedding { vector: Vec<f32> },
    Prediction { label: String, score: Option<f64> },
    BadAnswer { message: String },
    Rejected { message: String },
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    #[serde(flatten)]
    answer: Answer,
}

/// The answers of one cassette file, shared by every wrapped model.
pub struct Cassette {
    path: PathBuf,
    mode: Mode,
    entries: Mutex<BTreeMap<String, Answer>>,
    /// Answers served from the file.
    pub hits: AtomicU64,
    /// Inputs the file lacked (each one called the model, or failed the run).
    pub misses: AtomicU64,
}

fn key(kind: &str, model: &str, version: &str, input: &str) -> String {
    format!("{kind}/{model}/{version}/{}", hex::encode(Sha256::digest(input.as_bytes())))
}

impl Cassette {
    /// Opens `path` for `mode`. Replaying needs the file; recording starts
    /// from it when it exists (answers already there are kept).
    pub fn open(path: &Path, mode: Mode) -> anyhow::Result<Arc<Self>> {
        let mut entries = BTreeMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let l: Line = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{} line {}: not a cassette entry: {e}", path.display(), i + 1))?;
                    entries.insert(l.key, l.answer);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && mode == Mode::Record => {}
            Err(e) => anyhow::bail!("cassette {}: {e}", path.display()),
        }
        Ok(Arc::new(Self { path: path.to_path_buf(), mode, entries: Mutex::new(entries), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes every answer, sorted by key, through a temporary file renamed
    /// over the old one.
    pub fn save(&self) -> std::io::Result<()> {
        let text: String = self
            .entries
            .lock()
            .unwrap()
            .iter()
            .map(|(k, a)| serde_json::to_string(&Line { key: k.clone(), answer: a.clone() }).expect("serialisable") + "\n")
            .collect();
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }

    fn get(&self, key: &str) -> Option<Answer> {
        if self.mode == Mode::Record {
            return None;
        }
        let found = self.entries.lock().unwrap().get(key).cloned();
        match found {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    fn put(&self, key: String, answer: Answer) {
        self.entries.lock().unwrap().insert(key, answer);
    }

    fn missing(&self, what: &str, key: &str) -> String {
        format!(
            "cassette {} has no {what} for `{key}`; record it (replay with a new --cassette file), or pass --on-missing call to call the model",
            self.path.display()
        )
    }

    /// `inner`, answering from this cassette.
    pub fn embedder(self: &Arc<Self>, inner: Arc<dyn Embedder>) -> Arc<dyn Embedder> {
        Arc::new(CassetteEmbedder { cassette: self.clone(), version: inner.dimension().to_string(), inner })
    }

    /// `inner`, answering from this cassette.
    pub fn model(self: &Arc<Self>, inner: Arc<dyn Model>) -> Arc<dyn Model> {
        Arc::new(CassetteModel { cassette: self.clone(), inner })
    }
}

struct CassetteEmbedder {
    cassette: Arc<Cassette>,
    inner: Arc<dyn Embedder>,
    version: String,
}

impl Embedder for CassetteEmbedder {
    fn model(&self) -> &str {
        self.inner.model()
    }

    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }

    fn breaker(&self) -> Option<Arc<crate::resilience::CircuitBreaker>> {
        self.inner.breaker()
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        Box::pin(async move {
            let keys: Vec<String> = texts.iter().map(|t| key("embedding", self.inner.model(), &self.version, t)).collect();
            let mut out: Vec<Option<Vec<f32>>> = keys
                .iter()
                .map(|k| match self.cassette.get(k) {
                    Some(Answer::Embedding { vector }) => Some(vector),
                    _ => None,
                })
                .collect();
            let missing: Vec<usize> = (0..texts.len()).filter(|i| out[*i].is_none()).collect();
            if missing.is_empty() {
                return Ok(out.into_iter().map(|v| v.expect("all present")).collect());
            }
            if self.cassette.mode == Mode::Replay(OnMissing::Fail) {
                return Err(EmbedError::Misconfigured { message: self.cassette.missing("embedding", &keys[missing[0]]) });
            }
            let asked: Vec<String> = missing.iter().map(|i| texts[*i].clone()).collect();
            let got = self.inner.embed(&asked).await?;
            for (i, v) in missing.into_iter().zip(got) {
                self.cassette.put(keys[i].clone(), Answer::Embedding { vector: v.clone() });
                out[i] = Some(v);
            }
            Ok(out.into_iter().map(|v| v.expect("filled")).collect())
        })
    }
}

struct CassetteModel {
    cassette: Arc<Cassette>,
    inner: Arc<dyn Model>,
}

impl Model for CassetteModel {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn version(&self) -> &str {
        self.inner.version()
    }

    fn predict<'a>(&'a self, input: &'a str) -> BoxFuture<'a, Result<Prediction, ModelError>> {
        Box::pin(async move {
            let k = key("prediction", self.inner.id(), self.inner.version(), input);
            match self.cassette.get(&k) {
                Some(Answer::Prediction { label, score }) => return Ok(Prediction { label, score }),
                Some(Answer::BadAnswer { message }) => return Err(ModelError::BadAnswer(message)),
                Some(Answer::Rejected { message }) => return Err(ModelError::Rejected(message)),
                Some(Answer::Embedding { .. }) | None => {}
            }
            if self.cassette.mode == Mode::Replay(OnMissing::Fail) {
                return Err(ModelError::Misconfigured(self.cassette.missing("prediction", &k)));
            }
            let answer = self.inner.predict(input).await;
            match &answer {
                Ok(p) => self.cassette.put(k, Answer::Prediction { label: p.label.clone(), score: p.score }),
                Err(ModelError::BadAnswer(m)) => self.cassette.put(k, Answer::BadAnswer { message: m.clone() }),
                Err(ModelError::Rejected(m)) => self.cassette.put(k, Answer::Rejected { message: m.clone() }),
                Err(_) => {}
            }
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::hashing::HashingEmbedder;

    #[tokio::test]
    async fn recorded_answers_play_back_and_a_missing_one_fails_or_calls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let inner: Arc<dyn Embedder> = Arc::new(HashingEmbedder::new(8, 16));
        let texts = vec!["a".to_string(), "b".to_string()];

        let rec = Cassette::open(&path, Mode::Record).unwrap();
        let want = rec.embedder(inner.clone()).embed(&texts).await.unwrap();
        rec.save().unwrap();
        let first = std::fs::read(&path).unwrap();
        rec.save().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first, "saving twice writes the same bytes");

        let play = Cassette::open(&path, Mode::Replay(OnMissing::Fail)).unwrap();
        assert_eq!(play.embedder(inner.clone()).embed(&texts).await.unwrap(), want);
        assert_eq!((play.hits.load(Ordering::Relaxed), play.misses.load(Ordering::Relaxed)), (2, 0));
        let e = play.embedder(inner.clone()).embed(&["c".to_string()]).await.unwrap_err().to_string();
        assert!(e.contains("has no embedding for `embedding/hashing") && e.contains("--on-missing call"), "{e}");

        let call = Cassette::open(&path, Mode::Replay(OnMissing::Call)).unwrap();
        let got = call.embedder(inner.clone()).embed(&["a".to_string(), "c".to_string()]).await.unwrap();
        assert_eq!(got, inner.embed(&["a".to_string(), "c".to_string()]).await.unwrap());
        assert_eq!(call.len(), 3, "the answer it called for is kept");
        assert!(Cassette::open(&dir.path().join("absent"), Mode::Replay(OnMissing::Fail)).is_err());
    }

    /// A model that counts its calls and answers by input length.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Model for Counting {
        fn id(&self) -> &str {
            "m"
        }
        fn version(&self) -> &str {
            "7"
        }
        fn predict<'a>(&'a self, input: &'a str) -> BoxFuture<'a, Result<Prediction, ModelError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match input.len() {
                    0 => Err(ModelError::BadAnswer("empty".into())),
                    1 => Err(ModelError::Unavailable("flaky".into())),
                    n => Ok(Prediction { label: format!("len{n}"), score: Some(n as f64 / 10.0) }),
                }
            })
        }
    }

    #[tokio::test]
    async fn predictions_and_final_errors_play_back_without_a_call_and_transient_ones_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let inner = Arc::new(Counting(Default::default()));
        let rec = Cassette::open(&path, Mode::Record).unwrap();
        let m = rec.model(inner.clone());
        assert_eq!(m.predict("abc").await.unwrap(), Prediction { label: "len3".into(), score: Some(0.3) });
        assert_eq!(m.predict("").await.unwrap_err(), ModelError::BadAnswer("empty".into()));
        assert!(matches!(m.predict("x").await, Err(ModelError::Unavailable(_))));
        rec.save().unwrap();
        assert_eq!(rec.len(), 2, "the transient failure is not kept");

        let calls = inner.0.load(Ordering::SeqCst);
        let play = Cassette::open(&path, Mode::Replay(OnMissing::Fail)).unwrap();
        let m = play.model(inner.clone());
        assert_eq!(m.predict("abc").await.unwrap().label, "len3");
        assert_eq!(m.predict("").await.unwrap_err(), ModelError::BadAnswer("empty".into()));
        assert_eq!(inner.0.load(Ordering::SeqCst), calls, "played back without a call");
        let e = m.predict("x").await.unwrap_err();
        assert!(matches!(&e, ModelError::Misconfigured(msg) if msg.contains("has no prediction for `prediction/m/7/")), "{e}");
    }
}
