//! Combining the answers of an ensemble into one result.
//!
//! Pure functions over the answers that have arrived, in arrival order, so
//! the aggregate stage can ask after every arrival whether it may decide
//! ([`ready`]) and then decide ([`aggregate`]). Nothing here reads a clock:
//! the deadline is the caller's, and at the deadline it calls [`aggregate`]
//! with whatever arrived.
//!
//! # Strategies
//! - **Majority vote:** each answering model is one vote for its label.
//! - **Weighted vote:** each answering model votes with its configured weight
//!   (1.0 when not configured); the score is the winner's share of the
//!   weight that answered.
//! - **Mean score** (soft voting): each label's score is the mean, over the
//!   models that answered, of their score for it: a model's own score
//!   (1.0 when it gave none) for the label it chose, 0 for every other label.
//!   The highest mean wins and is the result's score.
//! - **First success:** the first model to answer successfully, in arrival order.
//! - **Quorum (k of n):** the first label that k models agree on.
//!
//! # Ties
//! Between labels with the same support (votes, weight or mean score), the
//! label chosen by the model listed **earliest in the ensemble** wins. The
//! ensemble's order is the request's `model_ids` order, or the configured
//! ensemble's. That rule depends on neither timing nor label spelling, and
//! an operator can put the model they trust most first.

use std::collections::BTreeMap;

/// How answers are combined. `WeightedVote` carries the weight per model id
/// (a model not listed weighs 1.0); `Quorum` carries k.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    MajorityVote,
    WeightedVote(BTreeMap<String, f64>),
    MeanScore,
    FirstSuccess,
    Quorum(usize),
}

impl Strategy {
    /// The Avro `Aggregation` symbol.
    pub fn symbol(&self) -> &'static str {
        match self {
            Strategy::MajorityVote => "MAJORITY_VOTE",
            Strategy::WeightedVote(_) => "WEIGHTED_VOTE",
            Strategy::MeanScore => "MEAN_SCORE",
            Strategy::FirstSuccess => "FIRST_SUCCESS",
            Strategy::Quorum(_) => "QUORUM",
        }
    }

    fn weight(&self, model: &str) -> f64 {
        match self {
            Strategy::WeightedVote(w) => w.get(model).copied().unwrap_or(1.0),
            _ => 1.0,
        }
    }
}

/// One model's answer, as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub model: String,
    /// The model's place in the ensemble (0 = listed first): the tie-breaker.
    pub position: usize,
    /// The label and the model's score for it, or why the model failed.
    pub outcome: Result<(String, Option<f64>), String>,
}

impl Answer {
    pub fn ok(model: &str, position: usize, label: &str, score: Option<f64>) -> Self {
        Self { model: model.to_string(), position, outcome: Ok((label.to_string(), score)) }
    }

    pub fn failed(model: &str, position: usize, error: &str) -> Self {
        Self { model: model.to_string(), position, outcome: Err(error.to_string()) }
    }

    fn label(&self) -> Option<&str> {
        self.outcome.as_ref().ok().map(|(l, _)| l.as_str())
    }
}

/// How a decided result stands against the ensemble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every model asked answered successfully.
    Complete,
    /// A result, but some models failed or had not answered.
    Partial,
}

/// The combined answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub label: String,
    /// Strategy-specific (see the module doc): the winner's share of votes or
    /// weight, its mean score, the first success's own score, or k/n.
    pub score: Option<f64>,
    pub status: Status,
    /// The models whose answers were counted, in arrival order.
    pub counted: Vec<String>,
}

/// The verdict on an ensemble: a decision, or none (then the saga compensates).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Decided(Decision),
    NoResult(String),
}

/// Whether the result can no longer change, so the stage may decide before
/// every model has answered: all `asked` models answered; or (first success)
/// one succeeded; or (quorum) a label reached k, or no label can reach k any
/// more; or (majority and weighted vote) one label holds more than half of
/// all votes or weight, answered or not. Mean score waits for every model.
pub fn ready(strategy: &Strategy, asked: &[&str], arrived: &[Answer]) -> bool {
    if arrived.len() >= asked.len() {
        return true;
    }
    let waiting = asked.len() - arrived.len();
    match strategy {
        Strategy::FirstSuccess => arrived.iter().any(|a| a.outcome.is_ok()),
        Strategy::Quorum(k) => {
            let best = tally(arrived, |_| 1.0).into_iter().map(|t| t.support).fold(0.0, f64::max) as usize;
            best >= *k || best + waiting < *k
        }
        Strategy::MajorityVote | Strategy::WeightedVote(_) => {
            let total: f64 = asked.iter().map(|m| strategy.weight(m)).sum();
            tally(arrived, |m| strategy.weight(m)).iter().any(|t| t.support * 2.0 > total)
        }
        Strategy::MeanScore => false,
    }
}

/// Combines the answers that arrived (in arrival order) from the `asked`
/// models. Call it when [`ready`] says so, or at the deadline.
pub fn aggregate(strategy: &Strategy, asked: &[&str], arrived: &[Answer]) -> Verdict {
    let ok: Vec<&Answer> = arrived.iter().filter(|a| a.outcome.is_ok()).collect();
    if ok.is_empty() {
        return Verdict::NoResult(format!("none of the {} models answered successfully ({} failed)", asked.len(), arrived.len()));
    }
    let status = if ok.len() == asked.len() { Status::Complete } else { Status::Partial };
    let counted = |answers: &[&Answer]| answers.iter().map(|a| a.model.clone()).collect::<Vec<_>>();
    match strategy {
        Strategy::FirstSuccess => {
            let first = ok[0];
            let (label, score) = first.outcome.clone().expect("filtered ok");
            Verdict::Decided(Decision { label, score, status, counted: vec![first.model.clone()] })
        }
        Strategy::Quorum(k) => {
            // The first label to reach k, in arrival order.
            let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
            let mut agreeing: Vec<&Answer> = Vec::new();
            for a in &ok {
                let label = a.label().expect("ok");
                let n = votes.entry(label).or_default();
                *n += 1;
                if *n == *k {
                    agreeing = ok.iter().copied().filter(|b| b.label() == Some(label)).collect();
                    break;
                }
            }
            match agreeing.first() {
                Some(a) => Verdict::Decided(Decision {
                    label: a.label().expect("ok").to_string(),
                    score: Some(*k as f64 / asked.len() as f64),
                    status,
                    counted: counted(&agreeing),
                }),
                None => Verdict::NoResult(format!(
                    "no quorum: no label reached {k} of {} models (best {})",
                    asked.len(),
                    votes.values().max().copied().unwrap_or(0)
                )),
            }
        }
        Strategy::MajorityVote | Strategy::WeightedVote(_) => {
            let tallies = tally(arrived, |m| strategy.weight(m));
            let total: f64 = tallies.iter().map(|t| t.support).sum();
            let win = winner(tallies);
            Verdict::Decided(Decision { score: (total > 0.0).then(|| win.support / total), label: win.label, status, counted: counted(&ok) })
        }
        Strategy::MeanScore => {
            let n = ok.len() as f64;
            let tallies = tally(arrived, |_| 1.0)
                .into_iter()
                .map(|mut t| {
                    let sum: f64 = ok.iter().filter(|a| a.label() == Some(t.label.as_str())).map(|a| a.outcome.as_ref().expect("ok").1.unwrap_or(1.0)).sum();
                    t.support = sum / n;
                    t
                })
                .collect();
            let win = winner(tallies);
            Verdict::Decided(Decision { score: Some(win.support), label: win.label, status, counted: counted(&ok) })
        }
    }
}

struct Tally {
    label: String,
    support: f64,
    /// The earliest ensemble position among the models that chose it.
    first_position: usize,
}

/// Support per label over the successful answers.
fn tally(arrived: &[Answer], weight: impl Fn(&str) -> f64) -> Vec<Tally> {
    let mut out: Vec<Tally> = Vec::new();
    for a in arrived {
        let Some(label) = a.label() else { continue };
        match out.iter_mut().find(|t| t.label == label) {
            Some(t) => {
                t.support += weight(&a.model);
                t.first_position = t.first_position.min(a.position);
            }
            None => out.push(Tally { label: label.to_string(), support: weight(&a.model), first_position: a.position }),
        }
    }
    out
}

/// The highest support; a tie goes to the label chosen by the model listed
/// earliest in the ensemble. Supports within 1e-9 of each other are equal,
/// so that float sums in a different order cannot break a tie differently.
fn winner(tallies: Vec<Tally>) -> Tally {
    tallies
        .into_iter()
        .reduce(|best, t| {
            let better = t.support > best.support + 1e-9 || ((t.support - best.support).abs() <= 1e-9 && t.first_position < best.first_position);
            if better { t } else { best }
        })
        .expect("at least one successful answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &[&str] = &["a", "b", "c"];

    fn decided(v: Verdict) -> Decision {
        match v {
            Verdict::Decided(d) => d,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn majority_vote_counts_one_vote_per_model() {
        let arrived = [Answer::ok("b", 1, "spam", None), Answer::ok("a", 0, "ham", None), Answer::ok("c", 2, "spam", None)];
        let d = decided(aggregate(&Strategy::MajorityVote, ABC, &arrived));
        assert_eq!(d.label, "spam");
        assert!(close(d.score, 2.0 / 3.0), "{:?}", d.score);
        assert_eq!(d.status, Status::Complete);
    }

    #[test]
    fn majority_vote_tie_goes_to_the_model_listed_first() {
        // a (position 0) says ham, b says spam, c failed: 1-1; a is listed first.
        let arrived = [Answer::ok("b", 1, "spam", None), Answer::failed("c", 2, "timeout"), Answer::ok("a", 0, "ham", None)];
        let d = decided(aggregate(&Strategy::MajorityVote, ABC, &arrived));
        assert_eq!(d.label, "ham");
        assert!(close(d.score, 0.5));
        assert_eq!(d.status, Status::Partial);
        assert_eq!(d.counted, vec!["b", "a"]);
        // The same answers in another arrival order decide the same.
        let reversed: Vec<Answer> = arrived.iter().rev().cloned().collect();
        assert_eq!(decided(aggregate(&Strategy::MajorityVote, ABC, &reversed)).label, "ham");
    }

    #[test]
    fn weighted_vote_uses_configured_weights_and_one_for_the_rest() {
        // a: 0.5 ham; b: 2.0 spam; c: 1.0 (not configured) ham -> ham 1.5, spam 2.0.
        let w = Strategy::WeightedVote(BTreeMap::from([("a".to_string(), 0.5), ("b".to_string(), 2.0)]));
        let arrived = [Answer::ok("a", 0, "ham", None), Answer::ok("b", 1, "spam", None), Answer::ok("c", 2, "ham", None)];
        let d = decided(aggregate(&w, ABC, &arrived));
        assert_eq!(d.label, "spam");
        assert!(close(d.score, 2.0 / 3.5), "{:?}", d.score);
    }

    #[test]
    fn weighted_vote_tie_goes_to_the_model_listed_first() {
        // a: 1.0 ham; b: 0.25 spam; c: 0.75 spam -> 1.0 each; ham's a is listed first.
        let w = Strategy::WeightedVote(BTreeMap::from([("b".to_string(), 0.25), ("c".to_string(), 0.75)]));
        let arrived = [Answer::ok("c", 2, "spam", None), Answer::ok("b", 1, "spam", None), Answer::ok("a", 0, "ham", None)];
        assert_eq!(decided(aggregate(&w, ABC, &arrived)).label, "ham");
    }

    #[test]
    fn mean_score_is_soft_voting() {
        // spam: (0.9 + 0.6 + 0) / 3 = 0.5; ham: (0 + 0 + 0.8) / 3 = 0.2667.
        let arrived = [Answer::ok("a", 0, "spam", Some(0.9)), Answer::ok("b", 1, "spam", Some(0.6)), Answer::ok("c", 2, "ham", Some(0.8))];
        let d = decided(aggregate(&Strategy::MeanScore, ABC, &arrived));
        assert_eq!(d.label, "spam");
        assert!(close(d.score, 0.5), "{:?}", d.score);
        // One confident model can outweigh two unsure ones: spam 0.3, ham 0.95/3 = 0.3167.
        let arrived = [Answer::ok("a", 0, "spam", Some(0.5)), Answer::ok("b", 1, "spam", Some(0.4)), Answer::ok("c", 2, "ham", Some(0.95))];
        let d = decided(aggregate(&Strategy::MeanScore, ABC, &arrived));
        assert_eq!(d.label, "ham");
        assert!(close(d.score, 0.95 / 3.0));
    }

    #[test]
    fn mean_score_tie_and_missing_scores() {
        // a: ham (no score = 1.0); b: spam 0.5; c: spam 0.5 -> 1/3 each; a is listed first.
        let arrived = [Answer::ok("b", 1, "spam", Some(0.5)), Answer::ok("c", 2, "spam", Some(0.5)), Answer::ok("a", 0, "ham", None)];
        let d = decided(aggregate(&Strategy::MeanScore, ABC, &arrived));
        assert_eq!(d.label, "ham");
        assert!(close(d.score, 1.0 / 3.0));
        // A failed model is left out of the mean.
        let arrived = [Answer::ok("a", 0, "ham", Some(0.6)), Answer::failed("b", 1, "HTTP 500")];
        let d = decided(aggregate(&Strategy::MeanScore, ABC, &arrived));
        assert!(close(d.score, 0.6));
        assert_eq!(d.status, Status::Partial);
    }

    #[test]
    fn first_success_takes_the_earliest_arrival_that_succeeded() {
        let arrived = [Answer::failed("a", 0, "timeout"), Answer::ok("c", 2, "spam", Some(0.7)), Answer::ok("b", 1, "ham", Some(0.99))];
        let d = decided(aggregate(&Strategy::FirstSuccess, ABC, &arrived));
        assert_eq!((d.label.as_str(), d.score, d.counted), ("spam", Some(0.7), vec!["c".to_string()]));
        assert!(ready(&Strategy::FirstSuccess, ABC, &arrived[..2]));
        assert!(!ready(&Strategy::FirstSuccess, ABC, &arrived[..1]));
    }

    #[test]
    fn quorum_is_the_first_label_k_models_agree_on() {
        let q = Strategy::Quorum(2);
        let arrived = [Answer::ok("a", 0, "ham", None), Answer::ok("b", 1, "spam", None), Answer::ok("c", 2, "spam", None)];
        let d = decided(aggregate(&q, ABC, &arrived));
        assert_eq!(d.label, "spam");
        assert!(close(d.score, 2.0 / 3.0));
        assert_eq!(d.counted, vec!["b", "c"]);
    }

    #[test]
    fn quorum_reached_while_a_model_is_still_out() {
        // c has not answered (it will time out); a and b agree: decide now.
        let q = Strategy::Quorum(2);
        let arrived = [Answer::ok("b", 1, "spam", None), Answer::ok("a", 0, "spam", None)];
        assert!(ready(&q, ABC, &arrived));
        let d = decided(aggregate(&q, ABC, &arrived));
        assert_eq!((d.label.as_str(), d.status), ("spam", Status::Partial));
        // Not yet after one answer.
        assert!(!ready(&q, ABC, &arrived[..1]));
    }

    #[test]
    fn quorum_that_can_no_longer_be_reached_is_no_result() {
        let q = Strategy::Quorum(3);
        let arrived = [Answer::ok("a", 0, "ham", None), Answer::ok("b", 1, "spam", None)];
        // Best is 1 with 1 model out: 3 is out of reach, so decide now.
        assert!(ready(&q, ABC, &arrived));
        assert!(matches!(aggregate(&q, ABC, &arrived), Verdict::NoResult(r) if r.contains("no quorum")));
    }

    #[test]
    fn majority_is_ready_once_no_later_answer_can_change_it() {
        let five = ["a", "b", "c", "d", "e"];
        let arrived = [Answer::ok("a", 0, "x", None), Answer::ok("b", 1, "x", None)];
        assert!(!ready(&Strategy::MajorityVote, &five, &arrived), "2 of 5 is not a majority");
        let arrived = [Answer::ok("a", 0, "x", None), Answer::ok("b", 1, "x", None), Answer::ok("c", 2, "x", None)];
        assert!(ready(&Strategy::MajorityVote, &five, &arrived), "3 of 5 is");
        assert!(!ready(&Strategy::MeanScore, &five, &arrived), "mean score waits for everyone");
    }

    #[test]
    fn nobody_answering_is_no_result() {
        let arrived = [Answer::failed("a", 0, "timeout"), Answer::failed("b", 1, "HTTP 503")];
        for s in [Strategy::MajorityVote, Strategy::MeanScore, Strategy::FirstSuccess, Strategy::Quorum(1)] {
            assert!(matches!(aggregate(&s, ABC, &arrived), Verdict::NoResult(_)), "{s:?}");
        }
    }
}
