//! librdkafka's statistics: per partition, the log end, the lag and the
//! committed offset, read from the JSON report.

use std::collections::HashMap;

use serde::Deserialize;

/// Per partition, from the last statistics report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PartitionStats {
    /// The log end librdkafka measures lag against: the last stable offset
    /// (read_committed) or the high watermark (read_uncommitted).
    pub(super) end: Option<i64>,
    /// `end - committed`, as librdkafka computes `consumer_lag`.
    pub(super) lag: Option<i64>,
    pub(super) committed: Option<i64>,
    /// Next offset librdkafka will fetch, and how many records it holds fetched.
    pub(super) next_fetch: Option<i64>,
    pub(super) fetched: i64,
    /// The log start.
    pub(super) start: Option<i64>,
    /// librdkafka's fetch state for the partition (`active` while it fetches;
    /// `offset-query`, `offset-wait`, `stopped`, ... otherwise), for the
    /// stall diagnostics.
    pub(super) fetch_state: &'static str,
}

/// librdkafka's fetch-state names (rdkafka_partition.c), so the stats stay `Copy`.
fn fetch_state(s: &str) -> &'static str {
    const KNOWN: [&str; 8] = ["none", "stopping", "stopped", "offset-query", "offset-wait", "validate-epoch-wait", "active", ""];
    KNOWN.into_iter().find(|k| *k == s).unwrap_or("other")
}

/// The subset of librdkafka's statistics JSON read here.
#[derive(Deserialize)]
struct RawStats {
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
}

#[derive(Deserialize)]
struct RawTopic {
    #[serde(default)]
    partitions: HashMap<String, RawPartition>,
}

fn invalid_offset() -> i64 {
    -1001
}

#[derive(Deserialize)]
struct RawPartition {
    partition: i32,
    #[serde(default = "invalid_offset")]
    hi_offset: i64,
    #[serde(default = "invalid_offset")]
    ls_offset: i64,
    #[serde(default = "invalid_offset")]
    lo_offset: i64,
    #[serde(default = "invalid_offset")]
    committed_offset: i64,
    #[serde(default = "invalid_offset")]
    next_offset: i64,
    #[serde(default = "invalid_offset")]
    consumer_lag: i64,
    #[serde(default)]
    fetchq_cnt: i64,
    #[serde(default)]
    fetch_state: String,
}

fn valid(offset: i64) -> Option<i64> {
    (offset >= 0).then_some(offset)
}

impl RawPartition {
    fn to_stats(&self, read_committed: bool) -> PartitionStats {
        PartitionStats {
            end: valid(if read_committed { self.ls_offset } else { self.hi_offset }),
            lag: valid(self.consumer_lag),
            committed: valid(self.committed_offset),
            next_fetch: valid(self.next_offset),
            fetched: self.fetchq_cnt,
            start: valid(self.lo_offset),
            fetch_state: fetch_state(&self.fetch_state),
        }
    }
}

/// Parses one statistics report: (topic, partition) → stats. Internal
/// partitions (-1) are skipped.
pub(super) fn parse_stats(json: &[u8], read_committed: bool) -> Result<Vec<(String, i32, PartitionStats)>, serde_json::Error> {
    let raw: RawStats = serde_json::from_slice(json)?;
    let mut out = Vec::new();
    for (topic, t) in raw.topics {
        for p in t.partitions.values() {
            if p.partition >= 0 {
                out.push((topic.clone(), p.partition, p.to_stats(read_committed)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_give_the_end_lag_and_committed_offset_per_partition() {
        let json = br#"{"name":"c","topics":{"t":{"topic":"t","partitions":{
            "0":{"partition":0,"hi_offset":20,"ls_offset":18,"lo_offset":0,"committed_offset":5,"next_offset":20,"consumer_lag":13,"fetchq_cnt":3,"fetch_state":"active","unknown_field":1},
            "-1":{"partition":-1,"hi_offset":-1001,"ls_offset":-1001,"lo_offset":-1001,"committed_offset":-1001,"next_offset":0,"consumer_lag":-1,"fetchq_cnt":0}}}}}"#;
        let parsed = parse_stats(json, true).unwrap();
        assert_eq!(parsed.len(), 1, "the internal partition -1 is skipped");
        let (topic, partition, s) = &parsed[0];
        assert_eq!((topic.as_str(), *partition), ("t", 0));
        assert_eq!(
            *s,
            PartitionStats { end: Some(18), lag: Some(13), committed: Some(5), next_fetch: Some(20), fetched: 3, start: Some(0), fetch_state: "active" }
        );
        assert_eq!(parse_stats(json, false).unwrap()[0].2.end, Some(20));
        assert!(parse_stats(br#"{"name":"p"}"#, true).unwrap().is_empty());
    }
}
