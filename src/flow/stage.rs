//! Stages: one required method, run as tasks joined by bounded edges.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tracing::Instrument;
use tokio::sync::{mpsc, watch};

use super::batch::{Batch, End, Item, Slot};
use super::metrics::Metrics;
use crate::clock::SharedClock;
use crate::outcome::{Fatal, Outcome};
use crate::resilience::Breakers;

/// One step of a topology.
///
/// Contract: `process` receives the live records of one window in source
/// order and returns exactly one [`Outcome`] per record, in the same order.
/// Per-record problems are `Outcome::Invalid` (dead-lettered with the reason)
/// or `Outcome::Skip`; only a failure that makes every later record fail too
/// is `Err(Fatal)`. Transient failures are retried inside the stage (see
/// [`crate::resilience::Resilient`]), never surfaced as a batch error.
pub trait Stage: Send + 'static {
    type In: Send + 'static;
    type Out: Send + 'static;

    fn process(&mut self, items: Vec<Item<Self::In>>) -> impl Future<Output = Result<Vec<Outcome<Self::Out>>, Fatal>> + Send;
}

/// A per-record closure as a stage: `FnStage::new(|item| Outcome::Continue(..))`.
pub struct FnStage<I, O, F> {
    f: F,
    _types: std::marker::PhantomData<fn(I) -> O>,
}

impl<I, O, F> FnStage<I, O, F>
where
    F: FnMut(Item<I>) -> Outcome<O> + Send + 'static,
{
    pub fn new(f: F) -> Self {
        Self { f, _types: std::marker::PhantomData }
    }
}

impl<I, O, F> Stage for FnStage<I, O, F>
where
    I: Send + 'static,
    O: Send + 'static,
    F: FnMut(Item<I>) -> Outcome<O> + Send + 'static,
{
    type In = I;
    type Out = O;

    fn process(&mut self, items: Vec<Item<I>>) -> impl Future<Output = Result<Vec<Outcome<O>>, Fatal>> + Send {
        let out: Vec<Outcome<O>> = items.into_iter().map(&mut self.f).collect();
        async move { Ok(out) }
    }
}

/// What every stage task shares: its name, the metrics, the clock, and the
/// place where a fatal error is reported so the runner can stop.
#[derive(Clone)]
pub struct StageContext {
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    pub fatal: Arc<watch::Sender<Option<Fatal>>>,
    /// Capacity of each edge, in batches. Batch bytes are bounded by the
    /// window, so an edge holds at most `edge_batches * window.max_bytes`.
    pub edge_batches: usize,
    /// The run's circuit breakers: the runner pauses the partitions while one is open.
    pub breakers: Breakers,
}

impl StageContext {
    pub fn new(metrics: Arc<Metrics>, clock: SharedClock, edge_batches: usize) -> Self {
        Self { metrics, clock, fatal: Arc::new(watch::channel(None).0), edge_batches: edge_batches.max(1), breakers: Breakers::default() }
    }

    pub fn with_breakers(mut self, breakers: Breakers) -> Self {
        self.breakers = breakers;
        self
    }

    pub fn edge<T>(&self) -> (mpsc::Sender<Batch<T>>, mpsc::Receiver<Batch<T>>) {
        mpsc::channel(self.edge_batches)
    }

    fn report(&self, fatal: Fatal) {
        use crate::ops::events::{Event, FatalStop};
        FatalStop { stage: &fatal.stage, error: &fatal.message }.emit();
        self.fatal.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(fatal);
                true
            } else {
                false
            }
        });
    }
}

/// Splits a batch into the live items the stage sees and a template that
/// puts the outcomes back in place.
fn split<T>(batch: Batch<T>) -> (Vec<Item<T>>, Vec<Option<Slot<()>>>, u64, usize, tracing::Span) {
    let mut live = Vec::new();
    let mut template = Vec::with_capacity(batch.slots.len());
    for slot in batch.slots {
        match slot {
            Slot::Live(item) => {
                live.push(item);
                template.push(None);
            }
            Slot::Done { record, end } => template.push(Some(Slot::Done { record, end })),
        }
    }
    (live, template, batch.seq, batch.bytes, batch.span)
}

/// The span of one stage call on one window, a child of the window's span.
fn stage_span(name: &'static str, ctx: &StageContext, parent: &tracing::Span, seq: u64, records: usize) -> tracing::Span {
    tracing::info_span!(parent: parent, "stage", otel.name = name, topology = %ctx.metrics.topology, stage = name, batch = seq, records)
}

fn merge<I, O>(
    stage: &str,
    ctx: &StageContext,
    records: Vec<Arc<crate::record::Record>>,
    template: Vec<Option<Slot<()>>>,
    outcomes: Vec<Outcome<O>>,
    seq: u64,
    bytes: usize,
    span: tracing::Span,
) -> Result<Batch<O>, Fatal> {
    if outcomes.len() != records.len() {
        return Err(Fatal::new(stage, format!("returned {} outcomes for {} records (a stage bug)", outcomes.len(), records.len())));
    }
    let mut outcomes = records.into_iter().zip(outcomes);
    let now = ctx.clock.now_ms();
    let slots = template
        .into_iter()
        .map(|t| match t {
            Some(Slot::Done { record, end }) => Slot::Done { record, end },
            Some(Slot::Live(_)) => unreachable!("template holds no live slots"),
            None => {
                let (record, outcome) = outcomes.next().expect("counts checked above");
                match outcome {
                    Outcome::Continue(value) => Slot::Live(Item { record, value }),
                    Outcome::Skip(reason) => {
                        ctx.metrics.skipped(reason);
                        Slot::Done { record, end: End::Skipped(reason) }
                    }
                    Outcome::Invalid(rejection) => {
                        Slot::Done { record, end: End::Dead { stage: stage.to_string(), rejection, failed_at_ms: now } }
                    }
                }
            }
        })
        .collect();
    Ok(Batch { seq, slots, bytes, span })
}

/// Counts one `process` call in the stage's tallies (records in and out,
/// latency on the run's clock, batch size).
fn tally<O>(name: &'static str, ctx: &StageContext, records_in: usize, outcomes: &[Outcome<O>], started_ms: i64) {
    if records_in == 0 {
        return;
    }
    let out = outcomes.iter().filter(|o| matches!(o, Outcome::Continue(_))).count();
    let seconds = (ctx.clock.now_ms() - started_ms).max(0) as f64 / 1000.0;
    ctx.metrics.stage_batch(name, records_in, out, seconds);
}

/// Lets the stage that was just handed a batch start on it now.
///
/// Sending a batch wakes the next stage's task, and tokio runs a task woken
/// from a worker next on that same worker (its LIFO slot), where the other
/// workers do not steal it. A stage whose `process` computes without awaiting (a
/// local embedding model, decoding a window) would keep that worker until it
/// waits for input again, so the next stage could not start although the
/// other core was idle: measured in the embedded topology, persist of window
/// 1 began only after embed had finished windows 2 to 4. Yielding puts this
/// task behind the woken one, where an idle worker can take it.
async fn hand_over() {
    tokio::task::yield_now().await;
}

/// Runs `stage` over every batch from `rx`, one batch at a time, and returns
/// the stage's output edge.
pub fn spawn<S: Stage>(name: &'static str, mut stage: S, mut rx: mpsc::Receiver<Batch<S::In>>, ctx: &StageContext) -> mpsc::Receiver<Batch<S::Out>> {
    let (tx, out) = ctx.edge();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        while let Some(batch) = rx.recv().await {
            let (live, template, seq, bytes, span) = split(batch);
            let records: Vec<_> = live.iter().map(|i| i.record.clone()).collect();
            let started = ctx.clock.now_ms();
            let result = match stage.process(live).instrument(stage_span(name, &ctx, &span, seq, records.len())).await {
                Ok(outcomes) => {
                    tally(name, &ctx, records.len(), &outcomes, started);
                    merge::<S::In, S::Out>(name, &ctx, records, template, outcomes, seq, bytes, span)
                }
                Err(f) => Err(f),
            };
            match result {
                Ok(b) => {
                    if tx.send(b).await.is_err() {
                        return; // downstream stopped; it reported why
                    }
                    hand_over().await;
                }
                Err(f) => return ctx.report(f),
            }
        }
    });
    out
}

/// Like [`spawn`], but runs up to `concurrency` batches at once, each on its
/// own clone of the stage, and still emits them in input order. For stages
/// whose work is waiting on a remote service (embedding, model calls).
pub fn spawn_concurrent<S: Stage + Clone>(
    name: &'static str,
    stage: S,
    concurrency: usize,
    mut rx: mpsc::Receiver<Batch<S::In>>,
    ctx: &StageContext,
) -> mpsc::Receiver<Batch<S::Out>> {
    let (tx, out) = ctx.edge();
    let ctx = ctx.clone();
    let concurrency = concurrency.max(1);
    tokio::spawn(async move {
        let mut running = FuturesOrdered::new();
        let mut input_open = true;
        loop {
            tokio::select! {
                biased;
                Some(result) = running.next(), if !running.is_empty() => {
                    match result {
                        Ok(b) => {
                            if tx.send(b).await.is_err() {
                                return;
                            }
                            hand_over().await;
                        }
                        Err(f) => return ctx.report(f),
                    }
                }
                next = rx.recv(), if input_open && running.len() < concurrency => {
                    let Some(batch) = next else { input_open = false; continue };
                    let mut s = stage.clone();
                    let ctx2 = ctx.clone();
                    running.push_back(async move {
                        let (live, template, seq, bytes, span) = split(batch);
                        let records: Vec<_> = live.iter().map(|i| i.record.clone()).collect();
                        let started = ctx2.clock.now_ms();
                        let outcomes = s.process(live).instrument(stage_span(name, &ctx2, &span, seq, records.len())).await?;
                        tally(name, &ctx2, records.len(), &outcomes, started);
                        merge::<S::In, S::Out>(name, &ctx2, records, template, outcomes, seq, bytes, span)
                    });
                }
                else => return,
            }
        }
    });
    out
}
