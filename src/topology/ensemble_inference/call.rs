//! Calling one model the way the invoke stage does, the same for every model:
//!
//! - **Quota** ([`Invoker::reserve`]): each model has a number of calls it may
//!   have in flight. A request reserves a slot on every model of its ensemble
//!   before any is called, in model-id order (so two requests can never each
//!   hold what the other waits for). A full quota makes the request wait,
//!   which holds its window and so backs up the stage edges and pauses the
//!   partitions: it is never dropped. Dropping a [`Reservation`] releases it,
//!   so releasing is idempotent by construction.
//! - **Resilience**: every attempt has its own timeout on the injected clock,
//!   retryable failures are retried with backoff, and the model's circuit
//!   breaker stops calls while the model is known to be down
//!   ([`crate::resilience::Resilient`]).
//! - **Hedging**: once enough answers were timed, an attempt that is slower
//!   than the configured latency percentile gets a second, parallel attempt;
//!   the first answer wins and the other is dropped.
//! - **Coalescing**: identical inputs to the same model version, while one is
//!   in flight or within `coalesce_ms` after it answered, share one call. The
//!   calls saved are counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock::SharedClock;
use crate::model::{Model, ModelError, Prediction};
use crate::resilience::{Attempted, BreakerConfig, CircuitBreaker, Resilient, RetryConfig};

/// How one model is called.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallPolicy {
    /// Calls this model may have in flight (its quota).
    pub concurrency: usize,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub hedge: Option<HedgeConfig>,
    /// How long an answer is shared with identical later inputs (0: only
    /// while the first call is in flight).
    pub coalesce_ms: u64,
}

impl Default for CallPolicy {
    fn default() -> Self {
        Self {
            concurrency: 8,
            retry: RetryConfig { max_attempts: 3, attempt_timeout_ms: 10_000, ..RetryConfig::default() },
            breaker: BreakerConfig::default(),
            hedge: None,
            coalesce_ms: 1_000,
        }
    }
}

/// When a second attempt is sent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeConfig {
    /// A second attempt goes out when the first has taken longer than this
    /// percentile of the model's recent answer times (e.g. 95).
    pub percentile: f64,
    /// No hedging until this many answers were timed.
    pub min_samples: usize,
    /// Never hedge sooner than this.
    pub min_delay_ms: u64,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self { percentile: 95.0, min_samples: 20, min_delay_ms: 10 }
    }
}

impl CallPolicy {
    pub fn check(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("concurrency is 0; allow at least 1 call in flight".into());
        }
        self.retry.check().map_err(|e| format!("retry.{e}"))?;
        if let Some(h) = &self.hedge
            && !(h.percentile > 0.0 && h.percentile < 100.0)
        {
            return Err(format!("hedge.percentile is {}; use a value between 0 and 100, e.g. 95", h.percentile));
        }
        Ok(())
    }
}

/// What calling a model for one input came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// The prediction, or why there is none.
    pub outcome: Result<Prediction, String>,
    /// From the call to its answer, on the injected clock.
    pub latency_ms: i64,
    /// Attempts made (0 when the answer was shared from another call).
    pub attempts: u32,
    /// A hedged second attempt was sent for it.
    pub hedged: bool,
    /// The answer was shared from an identical call.
    pub coalesced: bool,
    /// The failure makes every call to this model fail (misconfigured): the
    /// stage stops instead of recording it as this model's output.
    pub fatal: bool,
}

/// Counters of one model's calls.
#[derive(Debug, Default)]
pub struct CallStats {
    pub calls: AtomicU64,
    pub coalesced: AtomicU64,
    pub hedges: AtomicU64,
    pub hedges_won: AtomicU64,
}

/// A held slot of a model's quota; dropping it gives the slot back.
#[derive(Debug)]
pub struct Reservation {
    pub model: String,
    _permit: OwnedSemaphorePermit,
}

type SharedCall = Shared<BoxFuture<'static, Invocation>>;

/// One model, with its quota, resilience, hedging and coalescing.
pub struct Invoker {
    model: Arc<dyn Model>,
    policy: CallPolicy,
    resilient: Resilient,
    clock: SharedClock,
    quota: Arc<Semaphore>,
    /// Recent answer times of successful attempts (at most [`LATENCY_SAMPLES`]).
    latencies: Mutex<VecDeque<i64>>,
    /// Calls in flight or recently answered (see [`Recent`]).
    recent: Mutex<Recent>,
    pub stats: CallStats,
}

/// Calls in flight or recently answered, by input digest, with the time
/// they answered (None while in flight), and the answered ones in answer
/// order, so forgetting expired answers costs nothing per call but the
/// expired ones themselves.
#[derive(Default)]
struct Recent {
    calls: HashMap<[u8; 32], (SharedCall, Option<i64>)>,
    answered: VecDeque<(i64, [u8; 32])>,
}

impl Recent {
    /// Forgets the answered calls whose answer time is before `cutoff`.
    fn forget_before(&mut self, cutoff: i64) {
        while self.answered.front().is_some_and(|&(t, _)| t < cutoff) {
            self.forget_oldest();
        }
    }

    /// Forgets the call answered first, if any.
    fn forget_oldest(&mut self) {
        if let Some((t, key)) = self.answered.pop_front()
            // The same input may have been called again since; keep that one.
            && self.calls.get(&key).is_some_and(|(_, done)| *done == Some(t))
        {
            self.calls.remove(&key);
        }
    }

    fn answered(&mut self, key: [u8; 32], at: i64) {
        if let Some(entry) = self.calls.get_mut(&key) {
            entry.1 = Some(at);
            self.answered.push_back((at, key));
        }
    }
}

const LATENCY_SAMPLES: usize = 256;
/// Most answers kept for coalescing; beyond it the oldest are dropped first.
const COALESCE_CAPACITY: usize = 10_000;

impl Invoker {
    pub fn new(model: Arc<dyn Model>, policy: CallPolicy, clock: SharedClock) -> Arc<Self> {
        let breaker = Arc::new(CircuitBreaker::new(format!("model:{}", model.id()), policy.breaker.clone()));
        let resilient = Resilient::new(policy.retry.clone(), breaker, clock.clone());
        Arc::new(Self {
            quota: Arc::new(Semaphore::new(policy.concurrency)),
            model,
            policy,
            resilient,
            clock,
            latencies: Mutex::new(VecDeque::new()),
            recent: Mutex::new(Recent::default()),
            stats: CallStats::default(),
        })
    }

    pub fn id(&self) -> &str {
        self.model.id()
    }

    pub fn version(&self) -> &str {
        self.model.version()
    }

    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.resilient.breaker.clone()
    }

    /// Free slots of the quota now.
    pub fn available(&self) -> usize {
        self.quota.available_permits()
    }

    /// Waits for a slot of this model's quota.
    pub async fn reserve(&self) -> Reservation {
        let permit = self.quota.clone().acquire_owned().await.expect("the quota is never closed");
        Reservation { model: self.model.id().to_string(), _permit: permit }
    }

    /// Reserves a slot on every invoker, in model-id order, waiting as long
    /// as it takes (see the module doc).
    pub async fn reserve_all(invokers: &[Arc<Invoker>]) -> Vec<Reservation> {
        let mut ordered: Vec<&Arc<Invoker>> = invokers.iter().collect();
        ordered.sort_by(|a, b| a.id().cmp(b.id()));
        ordered.dedup_by(|a, b| a.id() == b.id());
        let mut held = Vec::with_capacity(ordered.len());
        for i in ordered {
            held.push(i.reserve().await);
        }
        held
    }

    /// Calls the model for `input`, sharing the call with an identical one
    /// in flight or recently answered.
    pub async fn invoke(self: &Arc<Self>, input: &str) -> Invocation {
        let key = digest(self.model.version(), input);
        let now = self.clock.now_ms();
        let (call, shared) = {
            let mut recent = self.recent.lock().unwrap();
            let window = self.policy.coalesce_ms as i64;
            // Answers older than the window are forgotten; with a window of
            // 0 only calls still in flight are shared.
            recent.forget_before(now - window + 1);
            match recent.calls.get(&key) {
                Some((call, _)) => (call.clone(), true),
                None => {
                    if recent.calls.len() >= COALESCE_CAPACITY {
                        recent.forget_oldest();
                    }
                    let me = self.clone();
                    let input = input.to_string();
                    let call = async move {
                        let out = me.call(&input).await;
                        let at = me.clock.now_ms();
                        me.recent.lock().unwrap().answered(key, at);
                        out
                    }
                    .boxed()
                    .shared();
                    recent.calls.insert(key, (call.clone(), None));
                    (call, false)
                }
            }
        };
        let mut out = call.await;
        if shared {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            out.coalesced = true;
            out.attempts = 0;
            out.hedged = false;
            out.latency_ms = self.clock.now_ms() - now;
        }
        out
    }

    /// One call with retries, the breaker and hedging.
    async fn call(self: &Arc<Self>, input: &str) -> Invocation {
        let started = self.clock.now_ms();
        let attempts = &AtomicU64::new(0);
        let hedged = &std::sync::atomic::AtomicBool::new(false);
        let result = self
            .resilient
            .call(move || {
                attempts.fetch_add(1, Ordering::Relaxed);
                self.hedged_attempt(input, hedged)
            })
            .await;
        let latency_ms = self.clock.now_ms() - started;
        let (outcome, fatal) = match result {
            Ok(p) => (Ok(p), false),
            Err(Attempted::Rejected { error, .. }) => {
                let fatal = matches!(error, ModelError::Misconfigured(_));
                (Err(error.to_string()), fatal)
            }
            Err(e @ Attempted::Exhausted { .. }) => (Err(e.to_string()), false),
        };
        Invocation { outcome, latency_ms, attempts: attempts.load(Ordering::Relaxed) as u32, hedged: hedged.load(Ordering::Relaxed), coalesced: false, fatal }
    }

    /// One attempt, plus a second one if the first is slower than the hedge
    /// delay; the first to answer wins.
    async fn hedged_attempt(self: &Arc<Self>, input: &str, hedged: &std::sync::atomic::AtomicBool) -> Result<Prediction, ModelError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = self.clock.now_ms();
        let first = self.model.predict(input);
        let result = match self.hedge_delay() {
            None => first.await,
            Some(delay) => {
                tokio::pin!(first);
                tokio::select! {
                    biased;
                    r = &mut first => r,
                    _ = self.clock.sleep(delay) => {
                        hedged.store(true, Ordering::Relaxed);
                        self.stats.calls.fetch_add(1, Ordering::Relaxed);
                        self.stats.hedges.fetch_add(1, Ordering::Relaxed);
                        let second = self.model.predict(input);
                        tokio::pin!(second);
                        tokio::select! {
                            biased;
                            r = &mut first => r,
                            r = &mut second => {
                                self.stats.hedges_won.fetch_add(1, Ordering::Relaxed);
                                r
                            }
                        }
                    }
                }
            }
        };
        if result.is_ok() {
            let mut l = self.latencies.lock().unwrap();
            if l.len() == LATENCY_SAMPLES {
                l.pop_front();
            }
            l.push_back(self.clock.now_ms() - started);
        }
        result
    }

    /// The hedge delay: the configured percentile of recent answer times,
    /// once there are enough of them.
    pub fn hedge_delay(&self) -> Option<Duration> {
        let h = self.policy.hedge.as_ref()?;
        let l = self.latencies.lock().unwrap();
        if l.len() < h.min_samples.max(1) {
            return None;
        }
        let mut sorted: Vec<i64> = l.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((h.percentile / 100.0) * sorted.len() as f64).ceil() as usize;
        let p = sorted[rank.clamp(1, sorted.len()) - 1].max(0) as u64;
        Some(Duration::from_millis(p.max(h.min_delay_ms)))
    }
}

fn digest(version: &str, input: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    h.update([0u8]);
    h.update(input.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::clock::ManualClock;
    use crate::resilience::BreakerState;

    /// A model scripted per call: each call takes `delay_ms` on the manual
    /// clock and answers from the script (then `Ok("x")` forever).
    struct Scripted {
        clock: ManualClock,
        delays: Mutex<VecDeque<u64>>,
        answers: Mutex<VecDeque<Result<&'static str, ModelError>>>,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(clock: &ManualClock, delays: &[u64], answers: Vec<Result<&'static str, ModelError>>) -> Arc<Self> {
            Arc::new(Self { clock: clock.clone(), delays: Mutex::new(delays.iter().copied().collect()), answers: Mutex::new(answers.into()), calls: AtomicUsize::new(0) })
        }
    }

    impl Model for Scripted {
        fn id(&self) -> &str {
            "scripted"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn predict<'a>(&'a self, _input: &'a str) -> BoxFuture<'a, Result<Prediction, ModelError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let delay = self.delays.lock().unwrap().pop_front().unwrap_or(0);
            let answer = self.answers.lock().unwrap().pop_front().unwrap_or(Ok("x"));
            let sleep = crate::clock::Clock::sleep(&self.clock, Duration::from_millis(delay));
            Box::pin(async move {
                sleep.await;
                answer.map(|l| Prediction { label: l.to_string(), score: None })
            })
        }
    }

    fn policy() -> CallPolicy {
        CallPolicy {
            concurrency: 2,
            retry: RetryConfig { max_attempts: 3, initial_backoff_ms: 100, max_backoff_ms: 100, multiplier: 1.0, jitter: 0.0, attempt_timeout_ms: 1_000 },
            breaker: BreakerConfig { failure_threshold: 3, open_ms: 5_000 },
            hedge: None,
            coalesce_ms: 0,
        }
    }

    /// Time passes only on the injected clock, 10 ms at a time.
    async fn drive<T: Send + 'static>(clock: &ManualClock, fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
        clock.drive(Duration::from_millis(10), fut).await
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_and_garbage_is_not() {
        let clock = ManualClock::new(0);
        let model = Scripted::new(&clock, &[], vec![Err(ModelError::Unavailable("503".into())), Err(ModelError::Unavailable("503".into())), Ok("spam")]);
        let inv = Invoker::new(model.clone(), policy(), clock.shared());
        let out = drive(&clock, async move { inv.invoke("a").await }).await;
        assert_eq!(out.outcome.unwrap().label, "spam");
        assert_eq!(out.attempts, 3);
        assert_eq!(out.latency_ms, 200, "two backoffs of 100 ms on the injected clock");

        let model = Scripted::new(&clock, &[], vec![Err(ModelError::BadAnswer("not JSON".into()))]);
        let inv = Invoker::new(model.clone(), policy(), clock.shared());
        let out = drive(&clock, async move { inv.invoke("a").await }).await;
        assert!(out.outcome.unwrap_err().contains("not JSON"));
        assert_eq!((out.attempts, out.fatal), (1, false));
    }

    #[tokio::test]
    async fn a_slow_attempt_times_out_on_the_clock_and_the_next_one_answers() {
        let clock = ManualClock::new(0);
        let model = Scripted::new(&clock, &[5_000, 50], vec![]);
        let inv = Invoker::new(model.clone(), policy(), clock.shared());
        let out = drive(&clock, async move { inv.invoke("a").await }).await;
        assert!(out.outcome.is_ok());
        assert_eq!(out.attempts, 2);
        assert_eq!(out.latency_ms, 1_000 + 100 + 50, "timeout, backoff, answer");
    }

    #[tokio::test]
    async fn the_breaker_opens_after_failures_and_closes_after_a_good_trial() {
        let clock = ManualClock::new(0);
        let failing: Vec<_> = (0..3).map(|_| Err(ModelError::Unavailable("down".into()))).collect();
        let model = Scripted::new(&clock, &[], failing);
        let inv = Invoker::new(model.clone(), CallPolicy { retry: RetryConfig { max_attempts: 3, ..policy().retry }, ..policy() }, clock.shared());
        let i = inv.clone();
        let out = drive(&clock, async move { i.invoke("a").await }).await;
        assert!(out.outcome.is_err());
        assert!(matches!(inv.breaker().state(), BreakerState::Open { .. }), "3 failures open it");
        // While open, nothing reaches the model.
        let calls = model.calls.load(Ordering::SeqCst);
        let i = inv.clone();
        let out = drive(&clock, async move { i.invoke("b").await }).await;
        assert!(out.outcome.unwrap_err().contains("open"));
        assert_eq!(model.calls.load(Ordering::SeqCst), calls);
        // After open_ms the trial call goes through and closes it.
        clock.advance(Duration::from_millis(5_000));
        let i = inv.clone();
        let out = drive(&clock, async move { i.invoke("c").await }).await;
        assert!(out.outcome.is_ok());
        assert_eq!(inv.breaker().state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_slow_answer_is_hedged_at_the_latency_percentile() {
        let clock = ManualClock::new(0);
        // 20 answers of 100 ms set the p95 at 100 ms; then a call that would take 900 ms.
        let mut delays = vec![100; 20];
        delays.extend([900, 30]);
        let model = Scripted::new(&clock, &delays, vec![]);
        let hedge = HedgeConfig { percentile: 95.0, min_samples: 20, min_delay_ms: 10 };
        let inv = Invoker::new(model.clone(), CallPolicy { hedge: Some(hedge), ..policy() }, clock.shared());
        for i in 0..20 {
            let inv = inv.clone();
            let out = drive(&clock, async move { inv.invoke(&format!("warm-{i}")).await }).await;
            assert!(!out.hedged);
        }
        assert_eq!(inv.hedge_delay(), Some(Duration::from_millis(100)));
        let i = inv.clone();
        let out = drive(&clock, async move { i.invoke("slow").await }).await;
        assert!(out.hedged && out.outcome.is_ok());
        assert_eq!(out.latency_ms, 130, "hedge at 100 ms, answered 30 ms later instead of at 900 ms");
        assert_eq!((inv.stats.hedges.load(Ordering::Relaxed), inv.stats.hedges_won.load(Ordering::Relaxed)), (1, 1));
    }

    #[tokio::test]
    async fn identical_inputs_share_one_call() {
        let clock = ManualClock::new(0);
        let model = Scripted::new(&clock, &[100; 10], vec![]);
        let inv = Invoker::new(model.clone(), CallPolicy { coalesce_ms: 1_000, ..policy() }, clock.shared());
        let i = inv.clone();
        let outs = drive(&clock, async move { futures::future::join_all((0..5).map(|_| i.invoke("same"))).await }).await;
        assert!(outs.iter().all(|o| o.outcome.is_ok()));
        assert_eq!(model.calls.load(Ordering::SeqCst), 1, "five identical inputs, one call");
        assert_eq!(outs.iter().filter(|o| o.coalesced).count(), 4);
        assert_eq!(inv.stats.coalesced.load(Ordering::Relaxed), 4);
        // Within the window the answer is still shared; after it, a new call.
        let i = inv.clone();
        drive(&clock, async move { i.invoke("same").await }).await;
        assert_eq!(model.calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_millis(1_000));
        let i = inv.clone();
        drive(&clock, async move { i.invoke("same").await }).await;
        assert_eq!(model.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn expired_answers_are_forgotten_oldest_first_and_a_new_call_of_the_same_input_is_kept() {
        let call = || futures::future::ready(Invocation { outcome: Err("x".into()), latency_ms: 0, attempts: 1, hedged: false, coalesced: false, fatal: false }).boxed().shared();
        let mut r = Recent::default();
        for (k, t) in [(1u8, 10), (2, 20), (3, 30)] {
            r.calls.insert([k; 32], (call(), None));
            r.answered([k; 32], t);
        }
        // Input 1 is called again (after its answer expired from another path).
        r.calls.insert([1; 32], (call(), None));
        r.forget_before(25);
        assert!(r.calls.contains_key(&[1; 32]), "the new call of input 1 stays");
        assert!(!r.calls.contains_key(&[2; 32]) && r.calls.contains_key(&[3; 32]));
        r.forget_oldest();
        assert!(!r.calls.contains_key(&[3; 32]));
        assert_eq!(r.calls.len(), 1);
    }

    #[tokio::test]
    async fn a_full_quota_holds_the_request_back_until_a_slot_is_released() {
        let clock = ManualClock::new(0);
        let a = Invoker::new(Scripted::new(&clock, &[], vec![]), CallPolicy { concurrency: 1, ..policy() }, clock.shared());
        let held = Invoker::reserve_all(&[a.clone()]).await;
        assert_eq!(a.available(), 0);
        let a2 = a.clone();
        let waiting = tokio::spawn(async move { Invoker::reserve_all(&[a2]).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "held back, not dropped");
        drop(held);
        let second = waiting.await.unwrap();
        assert_eq!(second.len(), 1);
        drop(second);
        assert_eq!(a.available(), 1, "dropping a reservation releases it");
    }
}
