//! Replaying a range of a Kafka topic through a topology into a sandbox:
//! `hartonomous replay --topology NAME --from X --to Y [--partition P]
//! --sandbox NAME` with a Kafka profile.
//!
//! What the sandbox is, and what it never touches:
//! - the source topic is read, never written;
//! - every output topic and the dead-letter topic get the suffix
//!   `.sandbox.<name>`;
//! - the consumer group is `<group>.sandbox.<name>`, so the production
//!   group's committed offsets never move;
//! - the store is ClickHouse database `<database>_sandbox_<name>` (created
//!   and migrated if missing), or, on the embedded store, the data directory
//!   `<data_dir>/sandbox/<name>`.
//!
//! The range is `[from, to)` per partition, resolved before the run: an
//! offset as given, a time as the first record stamped at or after it (read
//! from the partition, as `record` does: offsets-for-times answers are not
//! trusted, see `crate::log::kafka::read_range`), and `to` is capped at the
//! partition's end (the last record actually there, not the broker's high
//! watermark, which tansu reports low). The sandbox group starts at `from`
//! (committed before the run); [`Bounded`] hands out only records inside the
//! range and reports each partition as ended at `to`, so the run stops by
//! itself once every range is processed and acknowledged.

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use crate::config::{LogProfile, Profile, StoreProfile};
use crate::log::kafka::{Bound, KafkaConfig, RangeSpec};
use crate::log::{LogConsumer, LogError, PartitionPosition, PollLimit, RevokeHandler};
use crate::record::{Record, TopicPartition};
use crate::topology::spec::TopologySpec;

/// The sandbox's name, checked: letters, digits, `_` and `-` (it ends up in
/// topic, group and database names).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 40 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("--sandbox `{name}`: use 1 to 40 letters, digits, `_` or `-` (it names topics, a group and a database)"));
    }
    Ok(())
}

pub fn suffix(name: &str) -> String {
    format!(".sandbox.{name}")
}

/// `spec` with every output topic, the dead-letter topic and the group moved into the sandbox.
pub fn sandbox_spec(spec: &TopologySpec, name: &str) -> anyhow::Result<TopologySpec> {
    let outputs: Vec<String> = spec.topology()?.outputs(spec).into_iter().map(|(t, _)| t).collect();
    let mut s = spec.clone();
    for stage in &mut s.stages {
        for (_, value) in stage.iter_mut() {
            if let toml::Value::String(v) = value {
                if outputs.contains(&*v) {
                    *v = format!("{v}{}", suffix(name));
                }
            }
        }
    }
    s.dead_letter.topic = format!("{}{}", spec.dead_letter.topic, suffix(name));
    s.source.group = Some(format!("{}{}", spec.group(), suffix(name)));
    let moved: Vec<String> = s.topology()?.outputs(&s).into_iter().map(|(t, _)| t).collect();
    if let Some(t) = moved.iter().find(|t| !t.ends_with(&suffix(name))) {
        anyhow::bail!("output topic `{t}` of {} could not be moved into the sandbox; not replaying into production", spec.name);
    }
    Ok(s)
}

/// `profile` with its store moved into the sandbox.
pub fn sandbox_profile(profile: &Profile, name: &str) -> Profile {
    let mut p = profile.clone();
    match &mut p.store {
        StoreProfile::Clickhouse(c) => c.database = format!("{}_sandbox_{}", c.database, name.replace('-', "_")),
        StoreProfile::Embedded(_) => p.data_dir = profile.data_dir().join("sandbox").join(name),
    }
    p
}

/// Resolves `[from, to)` per partition of `topic` (all, or `partitions`).
pub async fn resolve_ranges(kafka: &KafkaConfig, topic: &str, partitions: &[i32], from: Option<Bound>, to: Option<Bound>) -> anyhow::Result<BTreeMap<TopicPartition, (i64, i64)>> {
    // The partitions and their true ends: `lag`'s reading (the broker's
    // answer raised to one past the last record actually there).
    let rows = crate::log::kafka::group_lag(kafka, "hartonomous-replay-ends", &[topic.to_string()]).await?;
    let mut out = BTreeMap::new();
    for row in rows {
        if !partitions.is_empty() && !partitions.contains(&row.tp.partition) {
            continue;
        }
        let start = match from {
            Some(b) => first_at(kafka, &row.tp, b, row.end).await?.max(row.start),
            None => row.start,
        };
        let end = match to {
            Some(b) => first_at(kafka, &row.tp, b, row.end).await?.min(row.end),
            None => row.end,
        };
        out.insert(row.tp.clone(), (start, end.max(start)));
    }
    if out.is_empty() {
        anyhow::bail!("topic `{topic}` has no partition {partitions:?}");
    }
    Ok(out)
}

/// A bound as an offset of `tp`: an offset as given, a time as the first
/// record stamped at or after it (`end` when none is).
async fn first_at(kafka: &KafkaConfig, tp: &TopicPartition, b: Bound, end: i64) -> anyhow::Result<i64> {
    match b {
        Bound::Offset(o) => Ok(o),
        Bound::TimeMs(_) => Ok(first_offset_at(kafka, tp, b).await?.unwrap_or(end)),
    }
}

/// The first offset of `tp` stamped at or after the time `b`, read from the
/// partition; `None` when no record is.
async fn first_offset_at(kafka: &KafkaConfig, tp: &TopicPartition, b: Bound) -> anyhow::Result<Option<i64>> {
    let spec = RangeSpec { topic: tp.topic.to_string(), partitions: vec![tp.partition], from: Some(b), to: None };
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut first = None;
        // The sink stops the read at the first record in range.
        let stop = "found";
        let r = crate::log::kafka::read_range(
            &kafka,
            &spec,
            &mut |rec: Record| {
                first = Some(rec.position.offset);
                Err(stop.to_string())
            },
            &mut |_| {},
        );
        match r {
            Ok(_) => Ok(first),
            Err(LogError::Fatal(m)) if m == stop => Ok(first),
            Err(e) => Err(anyhow::anyhow!("finding the first record at a time: {e}")),
        }
    })
    .await?
}

/// A consumer that hands out only records inside its ranges and reports
/// each range's end as the partition's end, so a run `Until::Drained` stops
/// when every range is processed. Partitions without a range are paused and
/// count as read to their end.
pub struct Bounded<C> {
    pub inner: C,
    pub ranges: BTreeMap<TopicPartition, (i64, i64)>,
}

impl<C: LogConsumer> LogConsumer for Bounded<C> {
    fn poll_bounded(&mut self, limit: PollLimit, wait: std::time::Duration) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move {
            let got = self.inner.poll_bounded(limit, wait).await?;
            let mut done = Vec::new();
            let kept = got
                .into_iter()
                .filter(|r| match self.ranges.get(&r.position.tp) {
                    Some((from, to)) if r.position.offset >= *from && r.position.offset < *to => true,
                    _ => {
                        done.push(r.position.tp.clone());
                        false
                    }
                })
                .collect();
            if !done.is_empty() {
                done.sort();
                done.dedup();
                // Past its range (or outside every range): nothing more is wanted from it.
                let finished: Vec<TopicPartition> = done.into_iter().filter(|tp| self.ranges.get(tp).is_none_or(|(_, to)| self.inner.positions().get(tp).is_some_and(|p| p.next >= *to))).collect();
                self.inner.pause(&finished)?;
            }
            Ok(kept)
        })
    }

    fn commit(&mut self, offsets: &BTreeMap<TopicPartition, i64>) -> BoxFuture<'_, Result<(), LogError>> {
        self.inner.commit(offsets)
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError> {
        self.inner.pause(partitions)
    }

    /// Partitions whose range is read stay paused.
    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError> {
        let positions = self.inner.positions();
        let open: Vec<TopicPartition> = partitions
            .iter()
            .filter(|tp| self.ranges.get(*tp).is_some_and(|(_, to)| positions.get(*tp).is_none_or(|p| p.next < *to)))
            .cloned()
            .collect();
        self.inner.resume(&open)
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.inner.assignment()
    }

    /// Every range appears, assigned yet or not (a range not assigned yet
    /// is not read), so a run never ends before every range is read.
    fn positions(&self) -> BTreeMap<TopicPartition, PartitionPosition> {
        let mut out: BTreeMap<TopicPartition, PartitionPosition> = self
            .inner
            .positions()
            .into_iter()
            .map(|(tp, p)| {
                let position = match self.ranges.get(&tp) {
                    Some((_, to)) => PartitionPosition { next: p.next.min(*to), end: Some(*to) },
                    None => PartitionPosition { next: p.next, end: Some(p.next) },
                };
                (tp, position)
            })
            .collect();
        for (tp, (from, to)) in &self.ranges {
            out.entry(tp.clone()).or_insert(PartitionPosition { next: (*from).min(*to - 1).max(0), end: Some(*to) });
        }
        out
    }

    fn describe(&self) -> String {
        format!("ranges {:?}; {}", self.ranges, self.inner.describe())
    }

    fn unstick(&self) -> BoxFuture<'static, Result<Vec<(TopicPartition, i64)>, LogError>> {
        self.inner.unstick()
    }

    fn set_revoke_handler(&mut self, handler: RevokeHandler) {
        self.inner.set_revoke_handler(handler)
    }
}

/// What a sandbox replay did.
pub struct SandboxReplay {
    pub summary: crate::topology::Summary,
    pub ranges: BTreeMap<TopicPartition, (i64, i64)>,
    pub spec: TopologySpec,
    pub profile: Profile,
}

/// Runs `spec` over the ranges into the sandbox `name` (see the module doc).
pub async fn replay_kafka(profile: &Profile, spec: &TopologySpec, name: &str, partitions: &[i32], from: Option<Bound>, to: Option<Bound>) -> anyhow::Result<SandboxReplay> {
    check_name(name).map_err(anyhow::Error::msg)?;
    let LogProfile::Kafka(kafka) = &profile.log else {
        anyhow::bail!("a replay from Kafka needs a Kafka profile (--connectors); to replay a file, pass --input")
    };
    let sandbox = sandbox_spec(spec, name)?;
    let sprofile = sandbox_profile(profile, name);
    let ranges = resolve_ranges(kafka, &spec.source.topic, partitions, from, to).await?;
    let starts: BTreeMap<TopicPartition, i64> = ranges.iter().map(|(tp, (from, _))| (tp.clone(), *from)).collect();
    crate::log::kafka::group_commit(kafka, &sandbox.group(), &starts).await?;
    let bounded = ranges.clone();
    // A progress bar (records in, rate, ETA), drawn only on a terminal.
    let total: i64 = ranges.values().map(|(a, b)| b - a).sum();
    let bar = indicatif::ProgressBar::new(total.max(0) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} records  {per_sec}  eta {eta}").expect("valid template"));
    let mut ticker = None;
    let summary = crate::app::run_kafka_with(
        &sprofile,
        &sandbox,
        crate::ops::Listen::Off,
        crate::flow::runner::Until::Drained,
        std::future::pending(),
        move |consumer| Bounded { inner: consumer, ranges: bounded },
        |metrics| {
            let bar = bar.clone();
            ticker = Some(tokio::spawn(async move {
                loop {
                    bar.set_position(metrics.records_in.load(std::sync::atomic::Ordering::Relaxed));
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }));
        },
    )
    .await;
    if let Some(t) = ticker {
        t.abort();
    }
    bar.finish_and_clear();
    let summary = summary?;
    Ok(SandboxReplay { summary, ranges, spec: sandbox, profile: sprofile })
}
