use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

use super::CircuitBreaker;
use crate::clock::SharedClock;
use crate::outcome::{Classify, ErrorClass};

/// Backoff and attempt limits for one external endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, including the first. 0 means retry forever, which is
    /// right for sinks: an outage then turns into backpressure, not data loss.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    /// Fraction of each backoff that is randomised (0 = none, 1 = "full jitter").
    pub jitter: f64,
    /// Deadline for one attempt; an attempt that exceeds it counts as a retryable failure.
    pub attempt_timeout_ms: u64,
}

impl RetryConfig {
    /// Retries without end (with the default backoff): for sinks and
    /// outputs, where an outage must become backpressure, never data loss.
    /// Also the serde default of such settings.
    pub fn forever() -> Self {
        Self { max_attempts: 0, ..Self::default() }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff_ms: 100,
            max_backoff_ms: 10_000,
            multiplier: 2.0,
            jitter: 0.2,
            attempt_timeout_ms: 30_000,
        }
    }
}

impl RetryConfig {
    /// Checks that the values make sense; the error names the field and the fix.
    pub fn check(&self) -> Result<(), String> {
        if self.multiplier < 1.0 {
            return Err(format!("multiplier is {}; use a value >= 1.0", self.multiplier));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("jitter is {}; use a value between 0.0 and 1.0", self.jitter));
        }
        if self.attempt_timeout_ms == 0 {
            return Err("attempt_timeout_ms is 0; give each attempt at least 1 ms".into());
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err("initial_backoff_ms exceeds max_backoff_ms; lower it or raise max_backoff_ms".into());
        }
        Ok(())
    }

    /// The backoff before attempt `attempt + 1`, given that `attempt` (1-based) failed,
    /// before jitter.
    pub fn base_backoff(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(63) as i32);
        let ms = (self.initial_backoff_ms as f64 * exp).min(self.max_backoff_ms as f64);
        Duration::from_millis(ms as u64)
    }

    /// `base_backoff` with jitter: uniformly in `[base * (1 - jitter), base]`.
    pub fn backoff(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let base = self.base_backoff(attempt).as_millis() as f64;
        let low = base * (1.0 - self.jitter);
        let ms = if base > low { rng.random_range(low..=base) } else { base };
        Duration::from_millis(ms as u64)
    }
}

/// The result of a resilient call that did not succeed.
#[derive(Debug)]
pub enum Attempted<E> {
    /// The call failed with an error classified Invalid or Fatal; no retry was made after it.
    Rejected { error: E, class: ErrorClass, attempts: u32 },
    /// Every allowed attempt failed with a retryable error (or timed out).
    Exhausted { last: String, attempts: u32 },
}

impl<E: std::fmt::Display> std::fmt::Display for Attempted<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempted::Rejected { error, attempts, .. } => write!(f, "{error} (after {attempts} attempt(s))"),
            Attempted::Exhausted { last, attempts } => write!(f, "gave up after {attempts} attempt(s): {last}"),
        }
    }
}

/// Retry policy + circuit breaker + attempt timeout for one endpoint.
#[derive(Clone)]
pub struct Resilient {
    pub retry: RetryConfig,
    pub breaker: Arc<CircuitBreaker>,
    pub clock: SharedClock,
}

impl Resilient {
    pub fn new(retry: RetryConfig, breaker: Arc<CircuitBreaker>, clock: SharedClock) -> Self {
        Self { retry, breaker, clock }
    }

    /// Calls `op` until it succeeds, fails with a non-retryable class, or the
    /// attempts run out. While the breaker is open no call is made; the wait
    /// counts as a failed attempt, so an open breaker with bounded attempts
    /// still ends.
    pub async fn call<T, E, F, Fut>(&self, mut op: F) -> Result<T, Attempted<E>>
    where
        E: Classify + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let failure = if let Err(open) = self.breaker.admit(self.clock.now_ms()) {
                open
            } else {
                let timeout = Duration::from_millis(self.retry.attempt_timeout_ms);
                match crate::clock::timeout(self.clock.as_ref(), timeout, op()).await {
                    Some(Ok(v)) => {
                        self.breaker.record_success();
                        return Ok(v);
                    }
                    Some(Err(e)) => match e.class() {
                        ErrorClass::Retry => {
                            self.breaker.record_failure(self.clock.now_ms());
                            e.to_string()
                        }
                        class => {
                            // The endpoint answered; the input or the setup is at fault.
                            self.breaker.record_success();
                            return Err(Attempted::Rejected { error: e, class, attempts: attempt });
                        }
                    },
                    None => {
                        self.breaker.record_failure(self.clock.now_ms());
                        format!("attempt timed out after {} ms", self.retry.attempt_timeout_ms)
                    }
                }
            };
            if self.retry.max_attempts != 0 && attempt >= self.retry.max_attempts {
                return Err(Attempted::Exhausted { last: failure, attempts: attempt });
            }
            tracing::debug!(attempt, error = %failure, "retrying");
            let pause = self.retry.backoff(attempt, &mut rand::rng());
            self.clock.sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::resilience::BreakerConfig;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct E(ErrorClass);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl Classify for E {
        fn class(&self) -> ErrorClass {
            self.0
        }
    }

    fn cfg(max_attempts: u32) -> RetryConfig {
        RetryConfig { max_attempts, initial_backoff_ms: 100, max_backoff_ms: 1_000, multiplier: 2.0, jitter: 0.5, attempt_timeout_ms: 500 }
    }

    #[test]
    fn backoff_grows_exponentially_caps_and_jitters_downwards() {
        let c = cfg(0);
        assert_eq!(c.base_backoff(1), Duration::from_millis(100));
        assert_eq!(c.base_backoff(2), Duration::from_millis(200));
        assert_eq!(c.base_backoff(4), Duration::from_millis(800));
        assert_eq!(c.base_backoff(9), Duration::from_millis(1_000));
        let mut rng = rand::rng();
        for attempt in 1..10 {
            for _ in 0..50 {
                let b = c.backoff(attempt, &mut rng);
                let base = c.base_backoff(attempt);
                assert!(b <= base && b >= base / 2, "{b:?} outside [{:?}, {base:?}]", base / 2);
            }
        }
    }

    /// Drives a resilient call on a manual clock: each time the call is waiting,
    /// time jumps forward by one second. No real sleeping happens.
    async fn drive<T: Send + 'static>(clock: &ManualClock, fut: impl Future<Output = T> + Send + 'static) -> T {
        clock.drive(Duration::from_secs(1), fut).await
    }

    #[tokio::test]
    async fn retries_retryable_errors_then_succeeds() {
        let clock = ManualClock::new(0);
        let r = Resilient::new(cfg(5), Arc::new(CircuitBreaker::new("t", BreakerConfig::default())), clock.shared());
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let out = drive(&clock, async move {
            r.call(|| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move { if n < 2 { Err(E(ErrorClass::Retry)) } else { Ok(n) } }
            })
            .await
        })
        .await;
        assert_eq!(out.unwrap(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn invalid_is_not_retried_and_exhaustion_counts_attempts() {
        let clock = ManualClock::new(0);
        let r = Resilient::new(cfg(3), Arc::new(CircuitBreaker::new("t", BreakerConfig::default())), clock.shared());
        let r2 = r.clone();
        let out = drive(&clock, async move { r2.call(|| async { Err::<(), _>(E(ErrorClass::Invalid)) }).await }).await;
        assert!(matches!(out, Err(Attempted::Rejected { class: ErrorClass::Invalid, attempts: 1, .. })));
        let out = drive(&clock, async move { r.call(|| async { Err::<(), _>(E(ErrorClass::Retry)) }).await }).await;
        assert!(matches!(out, Err(Attempted::Exhausted { attempts: 3, .. })));
    }

    #[tokio::test]
    async fn slow_attempt_times_out_on_the_injected_clock() {
        let clock = ManualClock::new(0);
        let r = Resilient::new(cfg(2), Arc::new(CircuitBreaker::new("t", BreakerConfig::default())), clock.shared());
        let out = drive(&clock, async move { r.call(|| futures::future::pending::<Result<(), E>>()).await }).await;
        match out {
            Err(Attempted::Exhausted { last, attempts: 2 }) => assert!(last.contains("timed out"), "{last}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
