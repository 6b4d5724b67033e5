//! Inserts: rows as sent (RowBinary), their approximate sizes and chunks, the
//! deduplication tokens, and the insert paths for atoms, arrivals and dead letters.

use std::collections::HashSet;
use std::ops::Range;

use clickhouse::Row;
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::ClickHouseStore;
use crate::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};
use crate::store::{DeadLetterRow, InsertReport, StoreError};

/// Bytes serialized as a ClickHouse `String` (length + raw bytes).
struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

#[derive(Row, Serialize)]
struct AtomInsert<'a> {
    content_hash: String,
    content_type: &'a str,
    content: RawBytes<'a>,
    content_size: u64,
    source_system: &'a str,
    correlation_id: &'a str,
    metadata: &'a str,
    embedding: &'a [f32],
    embedding_model: &'a str,
    embedding_dimension: u32,
    event_time: u32,
    event_time_ms: i64,
    source_topic: &'a str,
    source_partition: i32,
    source_offset: i64,
    ingested_at: u32,
    ingested_at_ms: u64,
    trace_id: &'a str,
}

#[derive(Row, Serialize)]
struct DeadLetterInsert<'a> {
    topology: &'a str,
    source_topic: &'a str,
    source_partition: i32,
    source_offset: i64,
    stage: &'a str,
    reason: &'a str,
    error: &'a str,
    attempts: u32,
    failed_at: u32,
    failed_at_ms: i64,
    original_key: Option<RawBytes<'a>>,
    original_payload: RawBytes<'a>,
    trace_id: &'a str,
}

#[derive(Row, Serialize)]
struct ArrivalInsert<'a> {
    source_topic: &'a str,
    source_partition: i32,
    source_offset: i64,
    content_hash: String,
    /// Enum8 travels as its Int8 value in RowBinary: 1 created, 2 matched.
    outcome: i8,
    content_type: &'a str,
    content_size: u64,
    source_system: &'a str,
    correlation_id: &'a str,
    event_time: u32,
    event_time_ms: i64,
    arrived_at: u32,
    arrived_at_ms: u64,
    trace_id: &'a str,
}

fn outcome_code(o: ArrivalOutcome) -> i8 {
    match o {
        ArrivalOutcome::Created => 1,
        ArrivalOutcome::Matched => 2,
    }
}

/// Milliseconds since the epoch as a ClickHouse `DateTime` (seconds, UInt32),
/// clamped to what a DateTime can hold (1970-01-01 .. 2106-02-07).
pub fn datetime_secs(ms: i64) -> u32 {
    ms.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32
}

fn describe_atom(row: &AtomRow) -> String {
    format!("atom {} ({}/{}@{})", row.content_hash, row.source_topic, row.source_partition, row.source_offset)
}

fn describe_dead_letter(row: &DeadLetterRow) -> String {
    format!("dead letter {}/{}@{}", row.source_topic, row.source_partition, row.source_offset)
}

/// Upper bound of a RowBinary string's length prefix.
const LEN_PREFIX: usize = 10;

/// Approximate RowBinary size of an atom row (strings with their length
/// prefixes, fixed-width columns exactly).
fn atom_wire_size(row: &AtomRow) -> usize {
    let strings = [
        64,
        row.content_type.len(),
        row.content.len(),
        row.source_system.len(),
        row.correlation_id.len(),
        row.metadata_json.len(),
        row.embedding_model.len(),
        row.source_topic.len(),
        row.trace_id.len(),
    ];
    let fixed = 8 + 4 + 4 + 8 + 4 + 8 + 4 + 8; // size, dimension, event_time(+ms), partition, offset, ingested_at(+ms)
    strings.iter().map(|n| n + LEN_PREFIX).sum::<usize>() + LEN_PREFIX + 4 * row.embedding.len() + fixed
}

fn arrival_wire_size(row: &ArrivalRow) -> usize {
    let strings = [row.source_topic.len(), 64, row.content_type.len(), row.source_system.len(), row.correlation_id.len(), row.trace_id.len()];
    let fixed = 4 + 8 + 1 + 8 + 4 + 8 + 4 + 8; // partition, offset, outcome, size, event_time(+ms), arrived_at(+ms)
    strings.iter().map(|n| n + LEN_PREFIX).sum::<usize>() + fixed
}

fn describe_arrival(row: &ArrivalRow) -> String {
    format!("arrival {}/{}@{}", row.source_topic, row.source_partition, row.source_offset)
}

fn dead_letter_wire_size(row: &DeadLetterRow) -> usize {
    let strings = [
        row.topology.len(),
        row.source_topic.len(),
        row.stage.len(),
        row.reason.len(),
        row.error.len(),
        row.original_key.as_ref().map_or(0, Vec::len),
        row.original_payload.len(),
        row.trace_id.len(),
    ];
    let fixed = 4 + 8 + 4 + 4 + 8 + 1; // partition, offset, attempts, failed_at(+ms), null flag
    strings.iter().map(|n| n + LEN_PREFIX).sum::<usize>() + fixed
}

/// Splits rows of the given sizes into consecutive chunks of at most
/// `max_rows` rows and `max_bytes` bytes (a row larger than `max_bytes` gets
/// a chunk of its own; callers reject such rows first).
fn plan_chunks(sizes: &[usize], max_rows: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        let rows = i - start;
        if rows > 0 && (rows >= max_rows || bytes + size > max_bytes) {
            chunks.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        chunks.push(start..sizes.len());
    }
    chunks
}

/// `prefix:topic:partition:min-max:digest` when all rows share a topic and
/// partition, `prefix:mixed:digest` otherwise. The digest is a SHA-256 over
/// every row's key material in order, so the same rows in the same order
/// always give the same token, and different rows a different one.
fn dedup_token<'r, R: 'r>(
    prefix: &str,
    rows: &[&'r R],
    position: impl Fn(&'r R) -> (&'r str, i32, i64),
    key: impl Fn(&'r R, &mut Sha256),
) -> String {
    let mut digest = Sha256::new();
    digest.update(prefix.as_bytes());
    for row in rows {
        let (topic, partition, offset) = position(*row);
        digest.update((topic.len() as u64).to_le_bytes());
        digest.update(topic.as_bytes());
        digest.update(partition.to_le_bytes());
        digest.update(offset.to_le_bytes());
        key(*row, &mut digest);
    }
    let digest: [u8; 32] = digest.finalize().into();
    let digest = hex::encode(&digest[..16]);
    let first = rows.first().map(|r| position(*r));
    let same_place = first.is_some_and(|(t, p, _)| {
        rows.iter().all(|r| {
            let (t2, p2, _) = position(*r);
            t2 == t && p2 == p
        })
    });
    match first {
        Some((topic, partition, _)) if same_place => {
            let offsets = rows.iter().map(|r| position(*r).2);
            let (min, max) = offsets.fold((i64::MAX, i64::MIN), |(lo, hi), o| (lo.min(o), hi.max(o)));
            format!("{prefix}:{topic}:{partition}:{min}-{max}:{digest}")
        }
        _ => format!("{prefix}:mixed:{digest}"),
    }
}

/// The deduplication token of one chunk of atoms: from the rows' source
/// positions and content hashes.
pub fn atoms_dedup_token(rows: &[&AtomRow]) -> String {
    dedup_token(
        "hartonomous-atoms",
        rows,
        |r| (r.source_topic.as_str(), r.source_partition, r.source_offset),
        |r, d| d.update(r.content_hash.0),
    )
}

/// The deduplication token of one chunk of arrivals: from their source positions.
pub fn arrivals_dedup_token(rows: &[&ArrivalRow]) -> String {
    dedup_token("hartonomous-arrivals", rows, |r| (r.source_topic.as_str(), r.source_partition, r.source_offset), |_, _| {})
}

/// The deduplication token of one chunk of dead letters: from their source
/// positions (a dead letter's identity).
pub fn dead_letters_dedup_token(rows: &[&DeadLetterRow]) -> String {
    dedup_token("hartonomous-dead-letters", rows, |r| (r.source_topic.as_str(), r.source_partition, r.source_offset), |_, _| {})
}

impl ClickHouseStore {
    /// `check`: look up which positions are recorded first (see
    /// `AtomStore::insert_new_arrivals` for when a caller may skip it).
    pub(super) async fn insert_arrivals_impl(&self, rows: &[ArrivalRow], check: bool) -> Result<InsertReport, StoreError> {
        if rows.is_empty() {
            return Ok(InsertReport::default());
        }
        let _writer = self.arrivals_writer.lock().await;
        let mut seen = HashSet::with_capacity(rows.len());
        let unique: Vec<&ArrivalRow> = rows.iter().filter(|r| seen.insert(r.position())).collect();
        let positions: Vec<SourcePosition> = unique.iter().map(|r| r.position()).collect();
        let stored = if check { self.arrival_outcomes_impl(&positions).await? } else { Default::default() };
        let fresh: Vec<&ArrivalRow> = unique.into_iter().filter(|r| !stored.contains_key(&r.position())).collect();
        let report = InsertReport { inserted: fresh.len(), already_present: rows.len() - fresh.len() };
        if fresh.is_empty() {
            return Ok(report);
        }
        let mut sizes = Vec::with_capacity(fresh.len());
        for row in &fresh {
            if row.arrived_at_ms < 0 {
                return Err(StoreError::RowRejected(format!("{}: arrived_at_ms is {}, before 1970", describe_arrival(row), row.arrived_at_ms)));
            }
            sizes.push(arrival_wire_size(row));
        }
        for range in plan_chunks(&sizes, self.config.max_rows_per_insert, self.config.max_bytes_per_insert) {
            let chunk = &fresh[range];
            let token = self.capabilities.supports_dedup_token.then(|| arrivals_dedup_token(chunk));
            let context = format!("insert {} arrivals into {}", chunk.len(), self.table("atom_arrivals"));
            self.timed(&context, async {
                let insert = self.client.insert::<ArrivalInsert<'_>>("atom_arrivals").await?;
                let mut insert = self.insert_settings(insert, token.as_deref());
                for row in chunk {
                    insert
                        .write(&ArrivalInsert {
                            source_topic: &row.source_topic,
                            source_partition: row.source_partition,
                            source_offset: row.source_offset,
                            content_hash: row.content_hash.to_hex(),
                            outcome: outcome_code(row.outcome),
                            content_type: &row.content_type,
                            content_size: row.content_size,
                            source_system: &row.source_system,
                            correlation_id: &row.correlation_id,
                            event_time: datetime_secs(row.event_time_ms),
                            event_time_ms: row.event_time_ms,
                            arrived_at: datetime_secs(row.arrived_at_ms),
                            arrived_at_ms: row.arrived_at_ms as u64,
                            trace_id: &row.trace_id,
                        })
                        .await?;
                }
                insert.end().await
            })
            .await?;
        }
        Ok(report)
    }

    /// `check`: look up which hashes are stored first (see
    /// `AtomStore::insert_new_atoms` for when a caller may skip it).
    pub(super) async fn insert_atoms_impl(&self, rows: &[AtomRow], check: bool) -> Result<InsertReport, StoreError> {
        if rows.is_empty() {
            return Ok(InsertReport::default());
        }
        let _writer = self.atoms_writer.lock().await;
        let mut seen = HashSet::with_capacity(rows.len());
        let unique: Vec<&AtomRow> = rows.iter().filter(|r| seen.insert(r.content_hash)).collect();
        let hashes: Vec<ContentHash> = unique.iter().map(|r| r.content_hash).collect();
        let stored = if check { self.existing_hashes_impl(&hashes).await? } else { HashSet::new() };
        let fresh: Vec<&AtomRow> = unique.into_iter().filter(|r| !stored.contains(&r.content_hash)).collect();
        let report = InsertReport { inserted: fresh.len(), already_present: rows.len() - fresh.len() };
        if fresh.is_empty() {
            return Ok(report);
        }

        let mut sizes = Vec::with_capacity(fresh.len());
        for row in &fresh {
            if row.ingested_at_ms < 0 {
                return Err(StoreError::RowRejected(format!(
                    "{}: ingested_at_ms is {}, before 1970",
                    describe_atom(row),
                    row.ingested_at_ms
                )));
            }
            if u32::try_from(row.embedding.len()).is_err() {
                return Err(StoreError::RowRejected(format!("{}: embedding too long", describe_atom(row))));
            }
            let size = atom_wire_size(row);
            if size > self.config.max_bytes_per_insert {
                return Err(StoreError::RowRejected(format!(
                    "{} is about {size} bytes, over max_bytes_per_insert ({}); raise it to store rows this large",
                    describe_atom(row),
                    self.config.max_bytes_per_insert
                )));
            }
            sizes.push(size);
        }

        for range in plan_chunks(&sizes, self.config.max_rows_per_insert, self.config.max_bytes_per_insert) {
            let chunk = &fresh[range];
            let token = self.capabilities.supports_dedup_token.then(|| atoms_dedup_token(chunk));
            let context = format!("insert {} atoms into {}", chunk.len(), self.table("atoms"));
            self.timed(&context, async {
                let insert = self.client.insert::<AtomInsert<'_>>("atoms").await?;
                let mut insert = self.insert_settings(insert, token.as_deref());
                for row in chunk {
                    insert
                        .write(&AtomInsert {
                            content_hash: row.content_hash.to_hex(),
                            content_type: &row.content_type,
                            content: RawBytes(&row.content),
                            content_size: row.content.len() as u64,
                            source_system: &row.source_system,
                            correlation_id: &row.correlation_id,
                            metadata: &row.metadata_json,
                            embedding: &row.embedding,
                            embedding_model: &row.embedding_model,
                            embedding_dimension: row.embedding.len() as u32,
                            event_time: datetime_secs(row.event_time_ms),
                            event_time_ms: row.event_time_ms,
                            source_topic: &row.source_topic,
                            source_partition: row.source_partition,
                            source_offset: row.source_offset,
                            ingested_at: datetime_secs(row.ingested_at_ms),
                            ingested_at_ms: row.ingested_at_ms as u64,
                            trace_id: &row.trace_id,
                        })
                        .await?;
                }
                insert.end().await
            })
            .await?;
        }
        Ok(report)
    }

    pub(super) async fn insert_dead_letters_impl(&self, rows: &[DeadLetterRow]) -> Result<InsertReport, StoreError> {
        if rows.is_empty() {
            return Ok(InsertReport::default());
        }
        let _writer = self.dead_letters_writer.lock().await;
        let mut seen = HashSet::with_capacity(rows.len());
        let unique: Vec<&DeadLetterRow> =
            rows.iter().filter(|r| seen.insert((r.source_topic.as_str(), r.source_partition, r.source_offset))).collect();
        let stored = self.existing_dead_letter_keys(&unique).await?;
        let fresh: Vec<&DeadLetterRow> =
            unique.into_iter().filter(|r| !stored.contains(&(r.source_topic.clone(), r.source_partition, r.source_offset))).collect();
        let report = InsertReport { inserted: fresh.len(), already_present: rows.len() - fresh.len() };
        if fresh.is_empty() {
            return Ok(report);
        }

        let mut sizes = Vec::with_capacity(fresh.len());
        for row in &fresh {
            let size = dead_letter_wire_size(row);
            if size > self.config.max_bytes_per_insert {
                return Err(StoreError::RowRejected(format!(
                    "{} is about {size} bytes, over max_bytes_per_insert ({}); raise it to store rows this large",
                    describe_dead_letter(row),
                    self.config.max_bytes_per_insert
                )));
            }
            sizes.push(size);
        }

        for range in plan_chunks(&sizes, self.config.max_rows_per_insert, self.config.max_bytes_per_insert) {
            let chunk = &fresh[range];
            let token = self.capabilities.supports_dedup_token.then(|| dead_letters_dedup_token(chunk));
            let context = format!("insert {} dead letters into {}", chunk.len(), self.table("dead_letters"));
            self.timed(&context, async {
                let insert = self.client.insert::<DeadLetterInsert<'_>>("dead_letters").await?;
                let mut insert = self.insert_settings(insert, token.as_deref());
                for row in chunk {
                    insert
                        .write(&DeadLetterInsert {
                            topology: &row.topology,
                            source_topic: &row.source_topic,
                            source_partition: row.source_partition,
                            source_offset: row.source_offset,
                            stage: &row.stage,
                            reason: &row.reason,
                            error: &row.error,
                            attempts: row.attempts,
                            failed_at: datetime_secs(row.failed_at_ms),
                            failed_at_ms: row.failed_at_ms,
                            original_key: row.original_key.as_deref().map(RawBytes),
                            original_payload: RawBytes(&row.original_payload),
                            trace_id: &row.trace_id,
                        })
                        .await?;
                }
                insert.end().await
            })
            .await?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_rows_and_bytes() {
        assert_eq!(plan_chunks(&[], 10, 100), Vec::<Range<usize>>::new());
        assert_eq!(plan_chunks(&[1; 25], 10, 1_000), vec![0..10, 10..20, 20..25]);
        assert_eq!(plan_chunks(&[40, 40, 40, 10, 90], 10, 100), vec![0..2, 2..4, 4..5]);
        // A row over the byte limit still goes, alone.
        assert_eq!(plan_chunks(&[10, 500, 10], 10, 100), vec![0..1, 1..2, 2..3]);
        let sizes: Vec<usize> = (0..1000).map(|i| 1 + i % 97).collect();
        let chunks = plan_chunks(&sizes, 33, 700);
        assert_eq!(chunks.first().unwrap().start, 0);
        assert_eq!(chunks.last().unwrap().end, 1000);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        for c in &chunks {
            assert!(c.len() <= 33 && sizes[c.clone()].iter().sum::<usize>() <= 700, "{c:?}");
        }
    }

    fn atom(content: &str, topic: &str, partition: i32, offset: i64) -> AtomRow {
        AtomRow {
            content_hash: ContentHash::of(content.as_bytes()),
            content_type: "text/plain".into(),
            content: content.as_bytes().to_vec(),
            source_system: "tests".into(),
            correlation_id: "c".into(),
            metadata_json: "{}".into(),
            embedding: vec![0.5; 4],
            embedding_model: "m".into(),
            event_time_ms: 1,
            source_topic: topic.into(),
            source_partition: partition,
            source_offset: offset,
            ingested_at_ms: 2,
            trace_id: String::new(),
        }
    }

    #[test]
    fn dedup_tokens_are_deterministic_and_distinct() {
        let a = [atom("a", "in", 0, 10), atom("b", "in", 0, 11), atom("c", "in", 0, 12)];
        let refs: Vec<&AtomRow> = a.iter().collect();
        let token = atoms_dedup_token(&refs);
        assert!(token.starts_with("hartonomous-atoms:in:0:10-12:"), "{token}");
        // The same rows, rebuilt (other ingestion time, other trace): the same token.
        let mut again = a.clone();
        for r in &mut again {
            r.ingested_at_ms += 60_000;
            r.trace_id = "retry".into();
        }
        assert_eq!(atoms_dedup_token(&again.iter().collect::<Vec<_>>()), token);
        // Different rows, or the same rows at other positions: different tokens.
        assert_ne!(atoms_dedup_token(&refs[..2]), token);
        let moved = [atom("a", "in", 0, 10), atom("b", "in", 0, 11), atom("c", "in", 0, 13)];
        assert_ne!(atoms_dedup_token(&moved.iter().collect::<Vec<_>>()), token);
        let other = [atom("a", "in", 0, 10), atom("b", "in", 0, 11), atom("d", "in", 0, 12)];
        assert_ne!(atoms_dedup_token(&other.iter().collect::<Vec<_>>()), token);
        let mixed = [atom("a", "in", 0, 10), atom("b", "in", 1, 10)];
        assert!(atoms_dedup_token(&mixed.iter().collect::<Vec<_>>()).starts_with("hartonomous-atoms:mixed:"));

        let dl = |offset| DeadLetterRow {
            topology: "t".into(),
            source_topic: "in".into(),
            source_partition: 2,
            source_offset: offset,
            stage: "s".into(),
            reason: "r".into(),
            error: "e".into(),
            attempts: 1,
            failed_at_ms: 0,
            original_key: None,
            original_payload: vec![],
            trace_id: String::new(),
        };
        let rows = [dl(5), dl(6)];
        let token = dead_letters_dedup_token(&rows.iter().collect::<Vec<_>>());
        assert!(token.starts_with("hartonomous-dead-letters:in:2:5-6:"), "{token}");
        let mut changed = rows.clone();
        changed[0].error = "another message".into();
        assert_eq!(dead_letters_dedup_token(&changed.iter().collect::<Vec<_>>()), token, "keyed by position");
    }

    #[test]
    fn datetimes_are_seconds_clamped_to_the_datetime_range() {
        assert_eq!(datetime_secs(1_700_000_000_999), 1_700_000_000);
        assert_eq!(datetime_secs(0), 0);
        assert_eq!(datetime_secs(-1), 0);
        assert_eq!(datetime_secs(i64::MAX), u32::MAX);
    }
}
