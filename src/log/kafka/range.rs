//! Reading a range of a topic, record by record, from outside any group
//! (`hartonomous record`): assign-only, nothing joined, nothing committed.
//!
//! A range is `[from, to)` per partition. A bound is an offset or a time:
//! - a time `from` resolves through offsets-for-times (the first offset whose
//!   timestamp is at or after it), and is then enforced record by record:
//!   records before the first one stamped at or after it are skipped. So an
//!   answer that is too low (tansu always answers 0, ../shared/INFRA.md)
//!   costs a longer read, never a wrong range. An answer that is too high
//!   would skip records; the record just before it is read to check, and if
//!   it is stamped at or after the time too, the broker answered wrongly:
//!   that is said in a warning and the partition is read from its start.
//! - a time `to` ends the partition at its first record stamped at or after it.
//! - without `to`, a partition ends at its first record stamped after the
//!   read began (records that arrive meanwhile are not part of it), or when
//!   nothing has arrived for [`IDLE_END`]. The end-of-partition signal is not
//!   used: tansu raises it early (its high watermark lags).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::error::{classify, with_context};
use super::{KafkaConfig, LogContext};
use crate::log::LogError;
use crate::record::{Position, Record, TopicPartition};

/// Bound on each metadata, offset and watermark request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A partition without an upper bound ends when nothing arrived for this long.
pub const IDLE_END: Duration = Duration::from_secs(3);

/// One end of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Offset(i64),
    /// Milliseconds since the Unix epoch.
    TimeMs(i64),
}

impl std::str::FromStr for Bound {
    type Err = String;

    /// An offset (`1200`) or a time: RFC 3339 (`2026-12-01T10:00:00Z`) or
    /// milliseconds since the epoch with a `ms:` prefix (`ms:1764583200000`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(ms) = s.strip_prefix("ms:") {
            return ms.parse().map(Bound::TimeMs).map_err(|e| format!("`{s}`: milliseconds after `ms:` ({e})"));
        }
        if let Ok(o) = s.parse::<i64>() {
            return if o >= 0 { Ok(Bound::Offset(o)) } else { Err(format!("`{s}`: an offset is 0 or more")) };
        }
        chrono_free_rfc3339(s).map(Bound::TimeMs).ok_or_else(|| {
            format!("`{s}` is neither an offset (e.g. 1200) nor a time (RFC 3339, e.g. 2026-12-01T10:00:00Z, or ms:1764583200000)")
        })
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` into epoch milliseconds,
/// through arrow's parser (already a dependency).
fn chrono_free_rfc3339(s: &str) -> Option<i64> {
    if !s.contains('T') {
        return None;
    }
    let ns = arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(s).ok()?;
    Some(ns / 1_000_000)
}

/// What to read.
#[derive(Debug, Clone)]
pub struct RangeSpec {
    pub topic: String,
    /// Partitions to read; empty means every partition of the topic.
    pub partitions: Vec<i32>,
    pub from: Option<Bound>,
    pub to: Option<Bound>,
}

/// What a read did, per partition: the offsets it resolved and the records it kept.
#[derive(Debug, Clone, Default)]
pub struct RangeReport {
    pub partitions: BTreeMap<i32, PartitionRead>,
    /// Warnings about broker answers that could not be trusted.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PartitionRead {
    /// Where the read began (after resolving a time).
    pub started_at: i64,
    /// Records handed to the sink.
    pub records: u64,
    /// The first and last offsets handed to the sink.
    pub first: Option<i64>,
    pub last: Option<i64>,
}

impl RangeReport {
    pub fn records(&self) -> u64 {
        self.partitions.values().map(|p| p.records).sum()
    }
}

/// Per partition: where it is in the range.
struct Cursor {
    /// A time `from` not reached yet: records are skipped until one is stamped at or after it.
    skip_until_ms: Option<i64>,
    /// The offset read to check an offsets-for-times answer (the one before it), if any.
    check_at: Option<i64>,
    done: bool,
}

/// Reads `spec` and hands each record, in offset order per partition, to
/// `sink`; `progress` is called with the running count. Blocking: call it
/// from `spawn_blocking`. A sink error ends the read with that error.
pub fn read_range(
    config: &KafkaConfig,
    spec: &RangeSpec,
    sink: &mut dyn FnMut(Record) -> Result<(), String>,
    progress: &mut dyn FnMut(u64),
) -> Result<RangeReport, LogError> {
    let mut c = config.client_config()?;
    // A group id is required by librdkafka; this client only assigns.
    c.set("group.id", "hartonomous-record").set("enable.auto.commit", "false").set("enable.partition.eof", "false");
    let consumer: BaseConsumer<LogContext> = c.create_with_context(LogContext { name: "record" }).map_err(|e| with_context(classify(&e), "creating the kafka reader"))?;
    let kafka = |what: &'static str| move |e: rdkafka::error::KafkaError| with_context(classify(&e), what);

    let md = consumer.fetch_metadata(Some(&spec.topic), REQUEST_TIMEOUT).map_err(kafka("reading topic metadata"))?;
    let all: Vec<i32> = md.topics().iter().filter(|t| t.name() == spec.topic).flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if all.is_empty() {
        return Err(LogError::Fatal(format!("the broker lists no topic `{}` (or it has no partitions); check --topic", spec.topic)));
    }
    let wanted: Vec<i32> = if spec.partitions.is_empty() { all.clone() } else { spec.partitions.clone() };
    if let Some(p) = wanted.iter().find(|p| !all.contains(p)) {
        return Err(LogError::Fatal(format!("topic `{}` has partitions {all:?}; there is no partition {p}", spec.topic)));
    }
    let began_ms = crate::clock::system().now_ms();

    let mut report = RangeReport::default();
    let mut cursors: BTreeMap<i32, Cursor> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &wanted {
        let (low, _high) = consumer.fetch_watermarks(&spec.topic, p, REQUEST_TIMEOUT).map_err(kafka("reading watermarks"))?;
        let (start, skip_until_ms, check_at) = match spec.from {
            None => (low, None, None),
            Some(Bound::Offset(o)) => (o.max(low), None, None),
            Some(Bound::TimeMs(t)) => {
                let mut q = TopicPartitionList::new();
                q.add_partition_offset(&spec.topic, p, Offset::Offset(t)).map_err(kafka("asking offsets for times"))?;
                let answer = consumer.offsets_for_times(q, REQUEST_TIMEOUT).map_err(kafka("asking offsets for times"))?;
                let resolved = answer.elements().first().and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                match resolved {
                    // Read one before the answer, to check it (see the module doc).
                    Some(o) if o > low => (o - 1, Some(t), Some(o - 1)),
                    Some(_) => (low, Some(t), None),
                    // "No record at or after t": still verified by reading from the start is too
                    // costly; Kafka answers this only when it holds no such record.
                    None => (low, Some(t), None),
                }
            }
        };
        tpl.add_partition_offset(&spec.topic, p, Offset::Offset(start)).map_err(kafka("assigning partitions"))?;
        report.partitions.insert(p, PartitionRead { started_at: start, ..Default::default() });
        cursors.insert(p, Cursor { skip_until_ms, check_at, done: false });
    }
    consumer.assign(&tpl).map_err(kafka("assigning partitions"))?;

    let mut last_arrival = Instant::now();
    let mut count = 0u64;
    while cursors.values().any(|c| !c.done) {
        let msg = match consumer.poll(Duration::from_millis(200)) {
            None => {
                if last_arrival.elapsed() >= IDLE_END && !matches!(spec.to, Some(Bound::Offset(_))) {
                    break;
                }
                if last_arrival.elapsed() >= IDLE_END * 10 {
                    // An offset bound beyond the end: say where it stopped rather than wait forever.
                    report.warnings.push(format!("nothing arrived for {} s before reaching --to; the range ends at the log end", (IDLE_END * 10).as_secs()));
                    break;
                }
                continue;
            }
            Some(Err(e)) => return Err(with_context(classify(&e), "reading the range")),
            Some(Ok(m)) => m,
        };
        last_arrival = Instant::now();
        let p = msg.partition();
        let Some(cursor) = cursors.get_mut(&p) else { continue };
        if cursor.done {
            continue;
        }
        let offset = msg.offset();
        let ts = msg.timestamp().to_millis().unwrap_or(0);
        if let Some(check) = cursor.check_at.take() {
            if offset == check {
                let t = cursor.skip_until_ms.expect("a check only comes with a time bound");
                if ts >= t {
                    let w = format!(
                        "partition {p}: the broker's offsets-for-times answer {} is too high (offset {check} before it is stamped {ts}, not before {t}); reading partition {p} from its start instead",
                        check + 1
                    );
                    tracing::warn!("{w}");
                    report.warnings.push(w);
                    let (low, _) = consumer.fetch_watermarks(&spec.topic, p, REQUEST_TIMEOUT).map_err(kafka("reading watermarks"))?;
                    consumer.seek(&spec.topic, p, Offset::Offset(low), REQUEST_TIMEOUT).map_err(kafka("seeking to the partition start"))?;
                    report.partitions.get_mut(&p).expect("known").started_at = low;
                    continue;
                }
                continue; // the checked record is before the range
            }
        }
        if let Some(t) = cursor.skip_until_ms {
            if ts < t {
                continue;
            }
            cursor.skip_until_ms = None;
        }
        let past_end = match spec.to {
            Some(Bound::Offset(o)) => offset >= o,
            Some(Bound::TimeMs(t)) => ts >= t,
            None => ts > began_ms,
        };
        if past_end {
            cursor.done = true;
            continue;
        }
        let record = Record {
            position: Position { tp: TopicPartition::new(spec.topic.as_str(), p), offset },
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: super::consumer::read_headers(&msg),
            event_time_ms: ts,
        };
        sink(record).map_err(LogError::Fatal)?;
        let read = report.partitions.get_mut(&p).expect("known");
        read.records += 1;
        read.first.get_or_insert(offset);
        read.last = Some(offset);
        if let Some(Bound::Offset(o)) = spec.to {
            if offset + 1 >= o {
                cursor.done = true;
            }
        }
        count += 1;
        progress(count);
    }
    let _ = consumer.unassign();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse_as_offsets_or_times_with_a_readable_error() {
        assert_eq!("1200".parse::<Bound>(), Ok(Bound::Offset(1200)));
        assert_eq!("ms:1764583200000".parse::<Bound>(), Ok(Bound::TimeMs(1_764_583_200_000)));
        assert_eq!("2025-12-01T10:00:00Z".parse::<Bound>(), Ok(Bound::TimeMs(1_764_583_200_000)));
        assert_eq!("2025-12-01T11:00:00+01:00".parse::<Bound>(), Ok(Bound::TimeMs(1_764_583_200_000)));
        let e = "yesterday".parse::<Bound>().unwrap_err();
        assert!(e.contains("neither an offset") && e.contains("RFC 3339"), "{e}");
        assert!("-3".parse::<Bound>().unwrap_err().contains("0 or more"));
    }
}
