//! The record-flow core on the embedded log: windows driven by an injected
//! clock, backpressure by pausing partitions, and fatal errors.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hartonomous::clock::{ManualClock, SharedClock};
use hartonomous::flow::runner::{self, DeadLetterSink, Limits, RunConfig, RunError, Until};
use hartonomous::flow::stage::{self, StageContext};
use hartonomous::flow::window::WindowConfig;
use hartonomous::flow::{Item, Metrics, Stage};
use hartonomous::log::embedded::EmbeddedLog;
use hartonomous::outcome::{Fatal, Outcome};
use hartonomous::record::{OutgoingRecord, TopicPartition};
use hartonomous::resilience::RetryConfig;

/// Records the size of every batch it sees, waits for `gate` to open, and can fail.
#[derive(Clone)]
struct Probe {
    seen: Arc<Mutex<Vec<usize>>>,
    gate: tokio::sync::watch::Receiver<bool>,
    fail_on_batch: Option<usize>,
}

impl Stage for Probe {
    type In = ();
    type Out = ();

    fn process(&mut self, items: Vec<Item<()>>) -> impl Future<Output = Result<Vec<Outcome<()>>, Fatal>> + Send {
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(items.len());
            seen.len()
        };
        let mut gate = self.gate.clone();
        let fail = self.fail_on_batch == Some(n);
        async move {
            gate.wait_for(|open| *open).await.unwrap();
            if fail {
                return Err(Fatal::new("probe", "the model endpoint answered with garbage"));
            }
            Ok(items.into_iter().map(|_| Outcome::Continue(())).collect())
        }
    }
}

struct Harness {
    log: EmbeddedLog,
    metrics: Arc<Metrics>,
    seen: Arc<Mutex<Vec<usize>>>,
    open_gate: tokio::sync::watch::Sender<bool>,
}

fn harness(clock: SharedClock, records: usize, gate_open: bool) -> (Harness, Probe) {
    let log = EmbeddedLog::new(clock);
    log.create_topic("in", 1);
    for i in 0..records {
        log.append(OutgoingRecord { topic: "in".into(), payload: vec![b'x'; 10], key: Some(i.to_string().into_bytes()), ..Default::default() });
    }
    let (open_gate, gate) = tokio::sync::watch::channel(gate_open);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let probe = Probe { seen: seen.clone(), gate, fail_on_batch: None };
    (Harness { log, metrics: Arc::new(Metrics::default()), seen, open_gate }, probe)
}

fn config(window: WindowConfig, limits: Limits, until: Until) -> RunConfig {
    RunConfig {
        topology: "test".into(),
        dead_letter_topic: "in.dlq".into(),
        window,
        limits,
        poll_wait: Duration::from_millis(50),
        commit_interval: Duration::from_millis(10),
        drain_timeout: Duration::from_secs(5),
        revoke_timeout: Duration::from_secs(1),
        until,
    }
}

fn start(h: &Harness, probe: Probe, clock: SharedClock, cfg: RunConfig) -> (tokio::task::JoinHandle<Result<runner::RunReport, RunError>>, tokio::sync::oneshot::Sender<()>) {
    let ctx = StageContext::new(h.metrics.clone(), clock, cfg.limits.edge_batches);
    let (head, rx) = ctx.edge::<()>();
    let tail = stage::spawn("probe", probe, rx, &ctx);
    let dlq = DeadLetterSink { producer: Arc::new(h.log.producer()), archive: None, retry: RetryConfig::default() };
    let consumer = h.log.consumer("g", &["in"]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(runner::run(consumer, head, tail, dlq, ctx, cfg, async move {
        let _ = stopped.await;
    }));
    (run, stop)
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_partial_window_closes_only_when_the_clock_reaches_its_age() {
    let clock = ManualClock::new(1_000_000);
    let (h, probe) = harness(clock.shared(), 3, true);
    let window = WindowConfig { max_records: 10, max_bytes: 1 << 20, max_age_ms: 200 };
    let (run, stop) = start(&h, probe, clock.shared(), config(window, Limits::default(), Until::Shutdown));
    settle().await;
    assert_eq!(Metrics::get(&h.metrics.records_in), 3, "records were polled");
    assert!(h.seen.lock().unwrap().is_empty(), "no batch before the window's age");
    clock.advance(Duration::from_millis(199));
    settle().await;
    assert!(h.seen.lock().unwrap().is_empty(), "still no batch at 199 ms");
    clock.advance(Duration::from_millis(1));
    settle().await;
    assert_eq!(*h.seen.lock().unwrap(), vec![3]);
    // Commits also run on the injected clock.
    clock.advance(Duration::from_millis(50));
    settle().await;
    assert_eq!(h.log.committed("g", &TopicPartition::new("in", 0)), Some(3));
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn full_windows_close_on_count_without_time_passing() {
    let clock = ManualClock::new(0);
    let (h, probe) = harness(clock.shared(), 7, true);
    let window = WindowConfig { max_records: 3, max_bytes: 1 << 20, max_age_ms: 60_000 };
    let (run, stop) = start(&h, probe, clock.shared(), config(window, Limits::default(), Until::Shutdown));
    settle().await;
    assert_eq!(*h.seen.lock().unwrap(), vec![3, 3], "two full windows; the seventh record waits for its age");
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    assert_eq!(*h.seen.lock().unwrap(), vec![3, 3, 1], "shutdown drains the partial window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_pauses_partitions_and_nothing_is_lost() {
    let clock = hartonomous::clock::system();
    let (h, probe) = harness(clock.clone(), 40, false);
    let window = WindowConfig { max_records: 2, max_bytes: 1 << 20, max_age_ms: 5 };
    let limits = Limits { in_flight_records: 6, in_flight_bytes: 1 << 20, edge_batches: 1 };
    let (run, _stop) = start(&h, probe, clock, config(window, limits, Until::Drained));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(Metrics::get(&h.metrics.records_in), 6, "no more than the in-flight budget was polled");
    assert!(Metrics::get(&h.metrics.partition_pauses) >= 1);
    h.open_gate.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(Metrics::get(&h.metrics.records_in), 40);
    assert_eq!(Metrics::get(&h.metrics.records_done), 40);
    assert_eq!(h.metrics.end_to_end().count, 40, "every finished record's end-to-end latency is observed");
    assert_eq!(report.committed.get(&TopicPartition::new("in", 0)), Some(&40));
    assert!(h.seen.lock().unwrap().iter().all(|n| *n <= 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_stage_error_stops_the_run_and_commits_only_what_finished() {
    let clock = hartonomous::clock::system();
    let (h, mut probe) = harness(clock.clone(), 10, true);
    probe.fail_on_batch = Some(3);
    let window = WindowConfig { max_records: 2, max_bytes: 1 << 20, max_age_ms: 5 };
    let limits = Limits { in_flight_records: 2, in_flight_bytes: 1 << 20, edge_batches: 1 };
    let (run, _stop) = start(&h, probe, clock, config(window, limits, Until::Drained));
    let err = run.await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("probe") && msg.contains("garbage"), "{msg}");
    assert_eq!(h.log.committed("g", &TopicPartition::new("in", 0)), Some(4), "batches 1 and 2 finished; batch 3 failed");
}
