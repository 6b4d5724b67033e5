use std::sync::Mutex;

use crate::ops::events::{BreakerClosed, BreakerHalfOpen, BreakerOpened, Event};
use serde::Deserialize;

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive retryable failures that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one trial call is let through.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, open_ms: 5_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { until_ms: i64 },
    /// One trial call is in flight; its result closes or re-opens the breaker.
    HalfOpen,
}

/// A circuit breaker for one external endpoint.
///
/// Contract: while open, [`CircuitBreaker::admit`] refuses without calling the
/// endpoint; after `open_ms` exactly one caller is admitted as a trial. Time is
/// passed in by the caller, so the breaker itself never reads a clock.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    state: Mutex<(BreakerState, u32)>,
}

impl CircuitBreaker {
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        Self { name: name.into(), config, state: Mutex::new((BreakerState::Closed, 0)) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> BreakerState {
        self.state.lock().unwrap().0
    }

    /// `Ok` if a call may go ahead now; otherwise a message saying why not.
    pub fn admit(&self, now_ms: i64) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        match s.0 {
            BreakerState::Closed => Ok(()),
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                s.0 = BreakerState::HalfOpen;
                BreakerHalfOpen { endpoint: &self.name }.emit();
                Ok(())
            }
            BreakerState::Open { until_ms } => {
                Err(format!("circuit breaker `{}` is open for another {} ms", self.name, until_ms - now_ms))
            }
            BreakerState::HalfOpen => Err(format!("circuit breaker `{}` is half-open; a trial call is in flight", self.name)),
        }
    }

    pub fn record_success(&self) {
        let mut s = self.state.lock().unwrap();
        if s.0 != BreakerState::Closed {
            BreakerClosed { endpoint: &self.name }.emit();
        }
        *s = (BreakerState::Closed, 0);
    }

    pub fn record_failure(&self, now_ms: i64) {
        let mut s = self.state.lock().unwrap();
        s.1 = s.1.saturating_add(1);
        let trip = matches!(s.0, BreakerState::HalfOpen) || s.1 >= self.config.failure_threshold;
        if trip && !matches!(s.0, BreakerState::Open { .. }) {
            BreakerOpened { endpoint: &self.name, failures: s.1, open_ms: self.config.open_ms }.emit();
            s.0 = BreakerState::Open { until_ms: now_ms + self.config.open_ms as i64 };
        }
    }
}

impl CircuitBreaker {
    /// Open and not yet due for its trial call at `now_ms`.
    pub fn is_open(&self, now_ms: i64) -> bool {
        matches!(self.state(), BreakerState::Open { until_ms } if now_ms < until_ms)
    }
}

/// Every circuit breaker of a run, so that the runner can pause the
/// partitions while an external dependency is known to be down (and resume
/// them when its breaker half-opens for a trial call). Clones share the list.
#[derive(Debug, Clone, Default)]
pub struct Breakers(std::sync::Arc<Mutex<Vec<std::sync::Arc<CircuitBreaker>>>>);

impl Breakers {
    /// Creates a breaker and registers it.
    pub fn breaker(&self, name: impl Into<String>, config: BreakerConfig) -> std::sync::Arc<CircuitBreaker> {
        self.register(std::sync::Arc::new(CircuitBreaker::new(name, config)))
    }

    /// Registers a breaker made elsewhere (an embedding client's own).
    pub fn register(&self, b: std::sync::Arc<CircuitBreaker>) -> std::sync::Arc<CircuitBreaker> {
        let mut list = self.0.lock().unwrap();
        if !list.iter().any(|x| std::sync::Arc::ptr_eq(x, &b)) {
            list.push(b.clone());
        }
        b
    }

    /// Names of the breakers open at `now_ms`.
    pub fn open(&self, now_ms: i64) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|b| b.is_open(now_ms)).map(|b| b.name().to_string()).collect()
    }

    /// Every registered breaker with its state (for metrics and tests).
    pub fn states(&self) -> Vec<(String, BreakerState)> {
        self.0.lock().unwrap().iter().map(|b| (b.name().to_string(), b.state())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_half_opens_after_cooldown_and_closes_on_success() {
        let b = CircuitBreaker::new("e", BreakerConfig { failure_threshold: 3, open_ms: 1_000 });
        for _ in 0..2 {
            b.admit(0).unwrap();
            b.record_failure(0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record_failure(10);
        assert_eq!(b.state(), BreakerState::Open { until_ms: 1_010 });
        assert!(b.admit(500).is_err());
        b.admit(1_010).unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit(1_011).is_err(), "only one trial call at a time");
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn the_registry_reports_open_breakers_until_they_are_due() {
        let all = Breakers::default();
        let a = all.breaker("a", BreakerConfig { failure_threshold: 1, open_ms: 100 });
        let _b = all.breaker("b", BreakerConfig::default());
        all.register(a.clone());
        assert_eq!(all.states().len(), 2, "registering twice keeps one entry");
        assert!(all.open(0).is_empty());
        a.record_failure(0);
        assert_eq!(all.open(50), vec!["a".to_string()]);
        assert!(all.open(100).is_empty(), "due for its trial call: partitions may resume");
    }

    #[test]
    fn failed_trial_reopens() {
        let b = CircuitBreaker::new("e", BreakerConfig { failure_threshold: 1, open_ms: 100 });
        b.record_failure(0);
        b.admit(100).unwrap();
        b.record_failure(100);
        assert_eq!(b.state(), BreakerState::Open { until_ms: 200 });
    }
}
