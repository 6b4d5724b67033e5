//! The Prometheus exposition of a run, built at scrape time from the run's
//! own counters (`crate::flow::Metrics`), partition gauges and breakers.
//!
//! Names follow Prometheus conventions: a `hartonomous_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters. Every metric is declared
//! once, in [`names`], with its type and labels; dashboards, alert rules and
//! tests refer to these names.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use crate::clock::SharedClock;
use crate::flow::Metrics;
use crate::flow::metrics::{BATCH_BUCKETS, E2E_BUCKETS, LATENCY_BUCKETS, Tally};
use crate::resilience::{BreakerState, Breakers};

/// Every exported metric: name, type, labels and help, declared once.
pub mod names {
    use prometheus::proto::MetricType::{self, COUNTER, GAUGE, HISTOGRAM};

    /// One exported metric.
    #[derive(Debug, Clone, Copy)]
    pub struct Def {
        pub name: &'static str,
        pub kind: MetricType,
        pub labels: &'static [&'static str],
        pub help: &'static str,
    }

    const fn def(name: &'static str, kind: MetricType, labels: &'static [&'static str], help: &'static str) -> Def {
        Def { name, kind, labels, help }
    }

    pub const RECORDS_IN: Def = def("hartonomous_records_in_total", COUNTER, &["topology"], "Records polled from the source log.");
    pub const BYTES_IN: Def = def("hartonomous_bytes_in_total", COUNTER, &["topology"], "Bytes (payload, key, headers) polled from the source log.");
    pub const RECORDS_OUT: Def =
        def("hartonomous_records_out_total", COUNTER, &["topology"], "Records that passed every stage with all their writes acknowledged.");
    pub const RECORDS_SKIPPED: Def = def("hartonomous_records_skipped_total", COUNTER, &["topology", "reason"], "Records a stage ended on purpose (duplicates, for example).");
    pub const DEAD_LETTERS: Def =
        def("hartonomous_dead_letters_total", COUNTER, &["topology", "stage", "reason"], "Records written to the dead-letter topic, by stage and reason.");
    pub const BATCHES: Def = def("hartonomous_batches_total", COUNTER, &["topology"], "Windows that went through every stage.");
    pub const COMMITS: Def = def("hartonomous_commits_total", COUNTER, &["topology"], "Offset commits acknowledged by the log.");
    pub const PAUSES: Def = def("hartonomous_partition_pauses_total", COUNTER, &["topology"], "Times backpressure paused the partitions.");
    pub const STAGE_IN: Def = def("hartonomous_stage_records_in_total", COUNTER, &["topology", "stage"], "Live records handed to a stage.");
    pub const STAGE_OUT: Def = def("hartonomous_stage_records_out_total", COUNTER, &["topology", "stage"], "Records a stage passed on to the next.");
    pub const STAGE_EVENTS: Def = def(
        "hartonomous_stage_events_total",
        COUNTER,
        &["topology", "stage", "event"],
        "What a stage counted: stored rows, published events, embedding and model calls made and avoided, saga outcomes.",
    );
    pub const END_TO_END: Def = def(
        "hartonomous_record_end_to_end_seconds",
        HISTOGRAM,
        &["topology"],
        "Time from a record's timestamp to the acknowledgement of all its outputs (store rows, events, dead letters).",
    );
    pub const STAGE_LATENCY: Def = def("hartonomous_stage_latency_seconds", HISTOGRAM, &["topology", "stage"], "Time a stage took per window.");
    pub const STAGE_BATCH: Def = def("hartonomous_stage_batch_records", HISTOGRAM, &["topology", "stage"], "Live records per window a stage processed.");
    pub const IN_FLIGHT_RECORDS: Def = def("hartonomous_in_flight_records", GAUGE, &["topology"], "Records polled and not yet acknowledged.");
    pub const IN_FLIGHT_BYTES: Def = def("hartonomous_in_flight_bytes", GAUGE, &["topology"], "Bytes polled and not yet acknowledged.");
    pub const ASSIGNED: Def = def("hartonomous_assigned_partitions", GAUGE, &["topology", "group"], "Partitions assigned to this process.");
    pub const PAUSED: Def = def("hartonomous_paused_partitions", GAUGE, &["topology", "group"], "Assigned partitions paused by backpressure.");
    pub const POSITION: Def =
        def("hartonomous_consumer_position", GAUGE, &["group", "topic", "partition"], "The next offset the consumer hands to the pipeline.");
    pub const COMMITTED: Def = def("hartonomous_consumer_committed_offset", GAUGE, &["group", "topic", "partition"], "The offset this process committed last.");
    pub const END: Def = def(
        "hartonomous_log_end_offset",
        GAUGE,
        &["group", "topic", "partition"],
        "The partition's end offset, from the Kafka client's statistics.",
    );
    pub const LAG_RECORDS: Def = def(
        "hartonomous_consumer_lag_records",
        GAUGE,
        &["group", "topic", "partition"],
        "Records between the committed offset and the log end.",
    );
    pub const LAG_SECONDS: Def = def(
        "hartonomous_consumer_lag_seconds",
        GAUGE,
        &["group", "topic", "partition"],
        "Age of the newest record handed out while records remain; 0 when caught up.",
    );
    pub const BREAKER: Def = def(
        "hartonomous_circuit_breaker_state",
        GAUGE,
        &["endpoint", "state"],
        "1 for the breaker's current state (closed, open or half_open), 0 for the others.",
    );
    pub const LAST_PROGRESS: Def =
        def("hartonomous_last_progress_timestamp_seconds", GAUGE, &["topology"], "When the last window finished (Unix time; 0 before the first).");

    /// Every metric the exporter declares, for documentation and tests.
    pub const ALL: &[Def] = &[
        RECORDS_IN,
        BYTES_IN,
        RECORDS_OUT,
        RECORDS_SKIPPED,
        DEAD_LETTERS,
        BATCHES,
        COMMITS,
        PAUSES,
        STAGE_IN,
        STAGE_OUT,
        STAGE_EVENTS,
        STAGE_LATENCY,
        STAGE_BATCH,
        END_TO_END,
        IN_FLIGHT_RECORDS,
        IN_FLIGHT_BYTES,
        ASSIGNED,
        PAUSED,
        POSITION,
        COMMITTED,
        END,
        LAG_RECORDS,
        LAG_SECONDS,
        BREAKER,
        LAST_PROGRESS,
    ];
}

use names::Def;

/// A run stuck this long while records wait makes `/ready` fail.
pub const STUCK_AFTER_MS: i64 = 60_000;

/// Reads one run for `/metrics` and `/ready`.
pub struct Exporter {
    pub metrics: Arc<Metrics>,
    pub breakers: Breakers,
    /// The consumer group (a label on partition metrics).
    pub group: String,
    pub clock: SharedClock,
}

/// One metric family under construction.
struct Family {
    def: Def,
    metrics: Vec<Metric>,
}

impl Family {
    fn new(def: Def) -> Self {
        Self { def, metrics: Vec::new() }
    }

    fn labels(&self, values: &[&str]) -> Vec<LabelPair> {
        debug_assert_eq!(values.len(), self.def.labels.len(), "{}: label values", self.def.name);
        self.def
            .labels
            .iter()
            .zip(values)
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect()
    }

    fn value(&mut self, labels: &[&str], v: f64) -> &mut Self {
        let mut m = Metric::default();
        m.set_label(self.labels(labels));
        match self.def.kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
        }
        self.metrics.push(m);
        self
    }

    fn histogram(&mut self, labels: &[&str], bounds: &[f64], t: &Tally) -> &mut Self {
        let mut h = Histogram::default();
        let mut cumulative = 0;
        let buckets = bounds
            .iter()
            .enumerate()
            .map(|(i, b)| {
                cumulative += t.buckets.get(i).copied().unwrap_or(0);
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(*b);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        h.set_bucket(buckets);
        h.set_sample_count(t.count);
        h.set_sample_sum(t.sum);
        let mut m = Metric::default();
        m.set_label(self.labels(labels));
        m.set_histogram(h);
        self.metrics.push(m);
        self
    }

    fn done(self, out: &mut Vec<MetricFamily>) {
        if self.metrics.is_empty() {
            return; // the text format has no empty families
        }
        let mut f = MetricFamily::default();
        f.set_name(self.def.name.to_string());
        f.set_help(self.def.help.to_string());
        f.set_field_type(self.def.kind);
        f.set_metric(self.metrics);
        out.push(f);
    }
}

/// The three states a breaker is shown in. An open breaker whose open
/// period has passed lets the next call through as a trial: half open.
const STATES: [&str; 3] = ["closed", "open", "half_open"];

fn state_name(s: &BreakerState, now_ms: i64) -> &'static str {
    match s {
        BreakerState::Closed => "closed",
        BreakerState::Open { until_ms } if *until_ms > now_ms => "open",
        BreakerState::Open { .. } | BreakerState::HalfOpen => "half_open",
    }
}

impl Exporter {
    /// Every family, in [`names::ALL`] order.
    pub fn families(&self) -> Vec<MetricFamily> {
        use names::*;
        let m = &self.metrics;
        let topo = m.topology.as_str();
        let group = self.group.as_str();
        let now_ms = self.clock.now_ms();
        let mut out = Vec::new();
        let single = |def: Def, v: u64, out: &mut Vec<MetricFamily>| {
            let mut f = Family::new(def);
            f.value(&[topo], v as f64);
            f.done(out);
        };
        single(RECORDS_IN, Metrics::get(&m.records_in), &mut out);
        single(BYTES_IN, Metrics::get(&m.bytes_in), &mut out);
        single(RECORDS_OUT, Metrics::get(&m.records_done), &mut out);

        let mut f = Family::new(RECORDS_SKIPPED);
        for (reason, n) in m.skipped_by_reason() {
            f.value(&[topo, reason], n as f64);
        }
        f.done(&mut out);
        let mut f = Family::new(DEAD_LETTERS);
        for ((stage, reason), n) in m.dead_letters_by_stage_and_reason() {
            f.value(&[topo, &stage, &reason], n as f64);
        }
        f.done(&mut out);

        single(BATCHES, Metrics::get(&m.batches), &mut out);
        single(COMMITS, Metrics::get(&m.commits), &mut out);
        single(PAUSES, Metrics::get(&m.partition_pauses), &mut out);

        let stages = m.stages();
        let (mut fin, mut fout, mut flat, mut fbatch) = (Family::new(STAGE_IN), Family::new(STAGE_OUT), Family::new(STAGE_LATENCY), Family::new(STAGE_BATCH));
        for (stage, t) in &stages {
            fin.value(&[topo, stage], t.records_in as f64);
            fout.value(&[topo, stage], t.records_out as f64);
            flat.histogram(&[topo, stage], &LATENCY_BUCKETS, &t.latency);
            fbatch.histogram(&[topo, stage], &BATCH_BUCKETS, &t.batch_records);
        }
        fin.done(&mut out);
        fout.done(&mut out);
        let mut f = Family::new(STAGE_EVENTS);
        for (c, n) in m.counters() {
            f.value(&[topo, c.stage, c.name], n as f64);
        }
        f.done(&mut out);
        flat.done(&mut out);
        fbatch.done(&mut out);
        let mut f = Family::new(END_TO_END);
        f.histogram(&[topo], &E2E_BUCKETS, &m.end_to_end());
        f.done(&mut out);

        single(IN_FLIGHT_RECORDS, Metrics::get(&m.in_flight_records), &mut out);
        single(IN_FLIGHT_BYTES, Metrics::get(&m.in_flight_bytes), &mut out);

        let parts = m.partitions();
        let mut f = Family::new(ASSIGNED);
        f.value(&[topo, group], parts.len() as f64);
        f.done(&mut out);
        let mut f = Family::new(PAUSED);
        f.value(&[topo, group], parts.values().filter(|p| p.paused).count() as f64);
        f.done(&mut out);
        let (mut fpos, mut fcom, mut fend, mut flag, mut fsec) =
            (Family::new(POSITION), Family::new(COMMITTED), Family::new(END), Family::new(LAG_RECORDS), Family::new(LAG_SECONDS));
        for (tp, p) in &parts {
            let partition = tp.partition.to_string();
            let labels = [group, &*tp.topic, partition.as_str()];
            fpos.value(&labels, p.position as f64);
            if let Some(c) = p.committed {
                fcom.value(&labels, c as f64);
            }
            // No lag series before the log end is known (librdkafka's first
            // statistics report): a 0 would claim "caught up" while records wait.
            if let Some(e) = p.end {
                fend.value(&labels, e as f64);
                flag.value(&labels, p.lag_records() as f64);
                fsec.value(&labels, p.lag_seconds(now_ms));
            }
        }
        for f in [fpos, fcom, fend, flag, fsec] {
            f.done(&mut out);
        }

        let mut f = Family::new(BREAKER);
        for (endpoint, state) in self.breakers.states() {
            let current = state_name(&state, now_ms);
            for s in STATES {
                f.value(&[&endpoint, s], if s == current { 1.0 } else { 0.0 });
            }
        }
        f.done(&mut out);
        let last = m.last_progress_ms.load(std::sync::atomic::Ordering::Relaxed);
        let mut f = Family::new(LAST_PROGRESS);
        f.value(&[topo], last.max(0) as f64 / 1000.0);
        f.done(&mut out);
        out
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Families are built above with names and at least one metric, so
        // encoding cannot fail; a failure would be a bug worth showing.
        if let Err(e) = TextEncoder::new().encode(&self.families(), &mut buf) {
            return format!("# encoding the metrics failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// `Ok(summary)` when the run is ready: partitions are assigned and, if
    /// records are waiting, a window finished within [`STUCK_AFTER_MS`].
    pub fn readiness(&self) -> Result<String, String> {
        let parts = self.metrics.partitions();
        if parts.is_empty() {
            return Err("not ready: no partitions assigned yet (the consumer group is joining or rebalancing)".into());
        }
        let lag: i64 = parts.values().map(|p| p.lag_records()).sum();
        let now = self.clock.now_ms();
        let last = self.metrics.last_progress_ms.load(std::sync::atomic::Ordering::Relaxed);
        let since = last.max(self.metrics.started_ms.load(std::sync::atomic::Ordering::Relaxed));
        if lag > 0 && now - since > STUCK_AFTER_MS {
            return Err(format!("not ready: no progress for {} s while {lag} records wait", (now - since) / 1000));
        }
        Ok(format!("ready: {} partitions assigned, lag {lag} records", parts.len()))
    }

    /// Per-partition lag in records, for logs and tests.
    pub fn lag(&self) -> BTreeMap<String, i64> {
        self.metrics.partitions().iter().map(|(tp, p)| (format!("{tp}"), p.lag_records())).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::flow::metrics::PartitionGauges;
    use crate::record::TopicPartition;
    use crate::resilience::BreakerConfig;

    fn exporter(clock: &ManualClock) -> Exporter {
        let metrics = Arc::new(Metrics::new("atom-ingestion"));
        metrics.started_ms.store(clock.now_ms(), std::sync::atomic::Ordering::Relaxed);
        Exporter { metrics, breakers: Breakers::default(), group: "g".into(), clock: clock.shared() }
    }

    fn line<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
    }

    #[test]
    fn counters_gauges_and_histograms_render_in_the_text_format() {
        let clock = ManualClock::new(1_700_000_010_000);
        let e = exporter(&clock);
        let m = &e.metrics;
        Metrics::add(&m.records_in, 7);
        Metrics::add(&m.records_done, 5);
        m.dead_lettered_in("decode", "decode.bad_magic");
        m.stage_batch("persist", 4, 3, 0.02);
        m.stage_batch("persist", 2, 2, 3.0);
        m.count(crate::flow::Counter::new("embed", "calls"), 2);
        let tp = TopicPartition::new("t", 1);
        m.set_partitions(BTreeMap::from([(
            tp,
            PartitionGauges { position: 90, end: Some(100), committed: Some(80), paused: true, newest_event_ms: Some(1_700_000_000_000) },
        )]));
        e.breakers.breaker("store", BreakerConfig::default());
        let text = e.render();
        assert!(text.contains("# TYPE hartonomous_records_in_total counter"), "{text}");
        assert_eq!(line(&text, r#"hartonomous_records_in_total{topology="atom-ingestion"}"#), Some(r#"hartonomous_records_in_total{topology="atom-ingestion"} 7"#));
        assert!(line(&text, r#"hartonomous_records_out_total{topology="atom-ingestion"}"#).unwrap().ends_with(" 5"));
        assert!(line(&text, r#"hartonomous_dead_letters_total{topology="atom-ingestion",stage="decode",reason="decode.bad_magic"}"#).unwrap().ends_with(" 1"));
        assert!(line(&text, r#"hartonomous_stage_events_total{topology="atom-ingestion",stage="embed",event="calls"}"#).unwrap().ends_with(" 2"));
        assert!(line(&text, r#"hartonomous_stage_records_in_total{topology="atom-ingestion",stage="persist"}"#).unwrap().ends_with(" 6"));
        assert!(line(&text, r#"hartonomous_stage_records_out_total{topology="atom-ingestion",stage="persist"}"#).unwrap().ends_with(" 5"));
        // Buckets are cumulative: 0.02 s falls in le=0.025, 3 s in le=5.
        let bucket = |le: &str| line(&text, &format!(r#"hartonomous_stage_latency_seconds_bucket{{topology="atom-ingestion",stage="persist",le="{le}"}}"#)).unwrap();
        assert!(bucket("0.01").ends_with(" 0"), "{text}");
        assert!(bucket("0.025").ends_with(" 1"));
        assert!(bucket("2.5").ends_with(" 1"));
        assert!(bucket("5").ends_with(" 2"));
        assert!(bucket("+Inf").ends_with(" 2"));
        assert!(line(&text, r#"hartonomous_stage_latency_seconds_count{topology="atom-ingestion",stage="persist"}"#).unwrap().ends_with(" 2"));
        // Lag: end 100 minus committed 80; the newest record handed out is 10 s old.
        assert!(line(&text, r#"hartonomous_consumer_lag_records{group="g",topic="t",partition="1"}"#).unwrap().ends_with(" 20"));
        assert!(line(&text, r#"hartonomous_consumer_lag_seconds{group="g",topic="t",partition="1"}"#).unwrap().ends_with(" 10"));
        assert!(line(&text, r#"hartonomous_consumer_position{group="g",topic="t",partition="1"}"#).unwrap().ends_with(" 90"));
        // Before the first statistics report the end is unknown: no lag series, not a 0.
        m.set_partitions(BTreeMap::from([(
            TopicPartition::new("t", 2),
            PartitionGauges { position: 0, end: None, committed: None, paused: false, newest_event_ms: None },
        )]));
        let early = e.render();
        assert!(line(&early, r#"hartonomous_consumer_position{group="g",topic="t",partition="2"}"#).is_some(), "{early}");
        assert!(line(&early, r#"hartonomous_consumer_lag_records{group="g",topic="t",partition="2"}"#).is_none(), "{early}");
        assert!(line(&early, r#"hartonomous_consumer_lag_seconds{group="g",topic="t",partition="2"}"#).is_none(), "{early}");
        m.set_partitions(BTreeMap::from([(
            TopicPartition::new("t", 1),
            PartitionGauges { position: 90, end: Some(100), committed: Some(80), paused: true, newest_event_ms: Some(1_700_000_000_000) },
        )]));
        assert!(line(&text, r#"hartonomous_paused_partitions{topology="atom-ingestion",group="g"}"#).unwrap().ends_with(" 1"));
        assert!(line(&text, r#"hartonomous_circuit_breaker_state{endpoint="store",state="closed"}"#).unwrap().ends_with(" 1"));
        assert!(line(&text, r#"hartonomous_circuit_breaker_state{endpoint="store",state="open"}"#).unwrap().ends_with(" 0"));
        // Every family rendered is declared in `names::ALL`, with its type.
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = l["# TYPE ".len()..].split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            let def = names::ALL.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} is not declared"));
            assert_eq!(format!("{:?}", def.kind).to_lowercase(), kind, "{name}");
        }
    }

    #[test]
    fn an_open_breaker_shows_open_until_its_period_passes() {
        let clock = ManualClock::new(0);
        let e = exporter(&clock);
        let b = e.breakers.breaker("model:a", BreakerConfig { failure_threshold: 1, open_ms: 1_000 });
        b.record_failure(clock.now_ms());
        assert!(e.render().contains(r#"hartonomous_circuit_breaker_state{endpoint="model:a",state="open"} 1"#));
        clock.advance(Duration::from_millis(1_000));
        assert!(e.render().contains(r#"hartonomous_circuit_breaker_state{endpoint="model:a",state="half_open"} 1"#));
    }

    #[test]
    fn ready_needs_partitions_and_progress_while_records_wait() {
        let clock = ManualClock::new(1_000_000);
        let e = exporter(&clock);
        assert!(e.readiness().unwrap_err().contains("no partitions assigned"));
        let waiting = PartitionGauges { position: 10, end: Some(50), committed: Some(10), ..Default::default() };
        e.metrics.set_partitions(BTreeMap::from([(TopicPartition::new("t", 0), waiting.clone())]));
        assert!(e.readiness().is_ok(), "just started: not stuck yet");
        clock.advance(Duration::from_millis(STUCK_AFTER_MS as u64 + 1));
        let err = e.readiness().unwrap_err();
        assert!(err.contains("no progress for 60 s while 40 records wait"), "{err}");
        // A window finishing makes it ready again; so does having nothing to do.
        e.metrics.last_progress_ms.store(clock.now_ms(), std::sync::atomic::Ordering::Relaxed);
        assert!(e.readiness().is_ok());
        clock.advance(Duration::from_millis(STUCK_AFTER_MS as u64 + 1));
        let caught_up = PartitionGauges { position: 50, end: Some(50), committed: Some(50), ..Default::default() };
        e.metrics.set_partitions(BTreeMap::from([(TopicPartition::new("t", 0), caught_up)]));
        assert_eq!(e.readiness().unwrap(), "ready: 1 partitions assigned, lag 0 records");
    }
}
