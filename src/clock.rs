//! Injected time. Everything that waits or stamps goes through a [`Clock`],
//! so that window and retry tests advance time themselves instead of sleeping.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

/// A source of "now" and of sleeps.
///
/// Contract: `now_ms` never goes backwards for a given clock, and a sleep of
/// `d` completes no earlier than `now_ms() + d` as seen by the same clock.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Completes once `d` has elapsed on this clock.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
}

pub type SharedClock = Arc<dyn Clock>;

/// Wall-clock time with tokio timers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}

pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock whose "now" never moves, with real sleeps. Replays run on it:
/// every time a run stamps (ingestion times, dead-letter times, latencies
/// measured as differences) is the same value in every run, so two runs over
/// one input write the same bytes. Sleeps (retry backoff) still take real
/// time. What waits for "now" to pass a deadline (a window's age, a breaker's
/// open period, a model deadline) never sees it pass: windows then close by
/// size or when the input is drained.
#[derive(Debug, Clone, Copy)]
pub struct FrozenClock(pub i64);

impl Clock for FrozenClock {
    fn now_ms(&self) -> i64 {
        self.0
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when told to. Sleepers wake when [`ManualClock::advance`]
/// carries the time past their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<i64>>,
}

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        Self { now: Arc::new(watch::channel(start_ms).0) }
    }

    pub fn advance(&self, d: Duration) {
        self.now.send_modify(|t| *t += d.as_millis() as i64);
    }

    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        *self.now.borrow()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        let deadline = self.now_ms() + d.as_millis() as i64;
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            // `wait_for` checks the current value first, so a zero sleep is immediate.
            let _ = rx.wait_for(|t| *t >= deadline).await;
        })
    }
}

#[cfg(test)]
impl ManualClock {
    /// Runs `fut` on its own task and, whenever nothing else can run, moves
    /// this clock forward by `step`, so retries, timeouts and backoffs pass
    /// without any real waiting. For the unit tests of code that sleeps on
    /// the injected clock.
    pub async fn drive<T: Send + 'static>(&self, step: Duration, fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
        let handle = tokio::spawn(fut);
        loop {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            if handle.is_finished() {
                return handle.await.unwrap();
            }
            self.advance(step);
        }
    }
}

/// Runs `fut` with a deadline measured on `clock`. `None` means it timed out.
pub async fn timeout<F: std::future::Future>(clock: &dyn Clock, d: Duration, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = clock.sleep(d) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleep_wakes_only_after_advance() {
        let clock = ManualClock::new(1_000);
        let sleep = clock.sleep(Duration::from_millis(50));
        tokio::pin!(sleep);
        assert!(futures::poll!(sleep.as_mut()).is_pending());
        clock.advance(Duration::from_millis(49));
        assert!(futures::poll!(sleep.as_mut()).is_pending());
        clock.advance(Duration::from_millis(1));
        sleep.await;
        assert_eq!(clock.now_ms(), 1_050);
    }

    #[tokio::test]
    async fn timeout_reports_expiry_on_manual_clock() {
        let clock = ManualClock::new(0);
        let c2 = clock.clone();
        let never = futures::future::pending::<()>();
        let t = tokio::spawn(async move { timeout(&c2, Duration::from_secs(1), never).await });
        tokio::task::yield_now().await;
        clock.advance(Duration::from_secs(1));
        assert_eq!(t.await.unwrap(), None);
    }
}
