//! Reads: key lookups by hash and by source position (the idempotency checks,
//! `find_atoms`, `arrival_outcomes`) and the read-only queries of `query`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Serialize, Serializer};

use super::ClickHouseStore;
use super::error::truncate;
use super::migrate::split_statements;
use crate::atom::{ArrivalOutcome, ContentHash, SourcePosition};
use crate::store::{DeadLetterRow, StoreError};

/// Offsets per `IN (...)` tuple query (arrival and dead-letter look-ups by
/// position, a few per window at most: only redeliveries ask). Content
/// hashes go in as an array, see [`HASHES_PER_QUERY`].
const KEYS_PER_QUERY: usize = 2_000;

/// Content hashes per look-up. The hashes go in as one array literal,
/// `content_hash IN (SELECT arrayJoin([...]))`, which ClickHouse parses in
/// one pass, instead of a tuple, whose every element becomes a syntax-tree
/// node: measured on 18.16 against 100,000 atoms, 5,000 hashes cost the
/// server about 17 ms of CPU as an array and 60–75 ms as a tuple (a window's
/// look-up was 13 µs of ClickHouse CPU per record, the largest cost
/// Hartonomous adds over a bare insert loop). Each query reads the table's
/// hash column once, so fewer, larger queries are cheaper: as many keys as
/// fit the default 256 KiB `max_query_size` (67 bytes each, quoted with a
/// comma), with room for the rest of the statement.
const HASHES_PER_QUERY: usize = 3_600;

/// `keys` in at most [`HASHES_PER_QUERY`]-sized chunks of near-equal size
/// (5,000 keys: two queries of 2,500, not 3,600 and 1,400).
fn hash_chunks<T>(keys: &[T]) -> impl Iterator<Item = &[T]> {
    let queries = keys.len().div_ceil(HASHES_PER_QUERY).max(1);
    keys.chunks(keys.len().div_ceil(queries).max(1))
}

/// A slice bound as an SQL tuple `(a, b, c)` (the crate binds a slice as an
/// array `[a, b, c]`, which 18.16 does not accept on the right of `IN`).
pub(super) struct SqlTuple<'a, T>(pub(super) &'a [T]);

impl<T: Serialize> Serialize for SqlTuple<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = s.serialize_tuple(self.0.len())?;
        for item in self.0 {
            tuple.serialize_element(item)?;
        }
        tuple.end()
    }
}

/// The first keyword of a statement, upper-cased, after whitespace,
/// comments and opening parentheses.
fn first_keyword(sql: &str) -> String {
    let statements = split_statements(sql);
    let Some(first) = statements.first() else { return String::new() };
    first
        .trim_start_matches(|c: char| c.is_whitespace() || c == '(')
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// Statements [`ClickHouseStore::query_text`] accepts.
const READ_ONLY_KEYWORDS: &[&str] = &["SELECT", "WITH", "SHOW", "DESC", "DESCRIBE", "EXISTS", "EXPLAIN"];

impl ClickHouseStore {
    /// `SELECT count() FROM atoms FINAL`: stored atoms, each once.
    pub async fn count_atoms_final(&self) -> Result<u64, StoreError> {
        self.query_scalar_u64("SELECT count() FROM atoms FINAL").await
    }

    /// `SELECT count() FROM dead_letters FINAL`: archived dead letters, each once.
    pub async fn count_dead_letters_final(&self) -> Result<u64, StoreError> {
        self.query_scalar_u64("SELECT count() FROM dead_letters FINAL").await
    }

    /// Runs a read-only query (in the store's database) that returns one row
    /// with one unsigned integer, of any integer type, and returns it.
    pub async fn query_scalar_u64(&self, sql: &str) -> Result<u64, StoreError> {
        let text = self.read_only(sql, "TabSeparated").await?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        value.parse::<u64>().map_err(|_| {
            StoreError::Fatal(format!("query `{}` returned `{}`, not one unsigned integer", truncate(sql, 200), truncate(value, 200)))
        })
    }

    /// Runs a read-only query (in the store's database) and returns the
    /// result as text in ClickHouse's `PrettyCompactMonoBlock` format, without
    /// colours (for the CLI). Only statements starting with SELECT, WITH,
    /// SHOW, DESC[RIBE], EXISTS or EXPLAIN are sent. A result with no rows is
    /// empty text.
    ///
    /// The server refuses writes and DDL too: a user who may write
    /// (`readonly` 0, see [`Capabilities::readonly`](super::Capabilities::readonly)) gets `readonly=2` for
    /// the query; a user whose profile is read-only already gets no
    /// `readonly` setting, since the server refuses to change it. A
    /// `readonly = 1` user may change no setting at all, so colours cannot be
    /// turned off server-side for it: its answer has them stripped here.
    pub async fn query_text(&self, sql: &str) -> Result<String, StoreError> {
        self.read_only(sql, "PrettyCompactMonoBlock").await
    }

    async fn read_only(&self, sql: &str, format: &str) -> Result<String, StoreError> {
        let keyword = first_keyword(sql);
        if !READ_ONLY_KEYWORDS.contains(&keyword.as_str()) {
            return Err(StoreError::Fatal(format!(
                "query: only read-only statements are allowed ({}); this one starts with `{keyword}`",
                READ_ONLY_KEYWORDS.join(", ")
            )));
        }
        let mut query = self.client.query_raw(sql);
        match self.capabilities.readonly {
            0 => query = query.with_setting("readonly", "2").with_setting("output_format_pretty_color", "0"),
            1 => {}
            _ => query = query.with_setting("output_format_pretty_color", "0"),
        }
        let context = format!("query `{}` in database `{}`", truncate(sql, 200), self.config.database);
        let bytes = self
            .timed(&context, async {
                let mut cursor = query.fetch_bytes(format)?;
                cursor.collect().await
            })
            .await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(if self.capabilities.readonly == 1 { strip_ansi_styles(&text) } else { text })
    }

    pub(super) async fn existing_hashes_impl(&self, hashes: &[ContentHash]) -> Result<HashSet<ContentHash>, StoreError> {
        let mut seen = HashSet::with_capacity(hashes.len());
        let unique: Vec<String> = hashes.iter().filter(|h| seen.insert(**h)).map(ContentHash::to_hex).collect();
        let mut found = HashSet::new();
        for chunk in hash_chunks(&unique) {
            let rows: Vec<String> = self
                .timed(
                    &format!("look up {} content hashes in {}", chunk.len(), self.table("atoms")),
                    self.client.query("SELECT content_hash FROM atoms WHERE content_hash IN (SELECT arrayJoin(?))").bind(chunk).fetch_all::<String>(),
                )
                .await?;
            found.extend(rows.iter().filter_map(|h| ContentHash::from_hex(h)));
        }
        Ok(found)
    }

    /// Every physical row's lineage for the given hashes (no FINAL: a row a
    /// racing writer added is visible until a merge removes it).
    pub(super) async fn find_atoms_impl(&self, hashes: &[ContentHash]) -> Result<HashMap<ContentHash, Vec<SourcePosition>>, StoreError> {
        let mut seen = HashSet::with_capacity(hashes.len());
        let unique: Vec<String> = hashes.iter().filter(|h| seen.insert(**h)).map(ContentHash::to_hex).collect();
        let mut found: HashMap<ContentHash, Vec<SourcePosition>> = HashMap::new();
        for chunk in hash_chunks(&unique) {
            let rows: Vec<(String, String, i32, i64)> = self
                .timed(
                    &format!("look up {} content hashes in {}", chunk.len(), self.table("atoms")),
                    self.client
                        .query(
                            "SELECT content_hash, source_topic, source_partition, source_offset FROM atoms \
                             WHERE content_hash IN (SELECT arrayJoin(?))",
                        )
                        .bind(chunk)
                        .fetch_all::<(String, String, i32, i64)>(),
                )
                .await?;
            for (hash, topic, partition, offset) in rows {
                if let Some(h) = ContentHash::from_hex(&hash) {
                    let p = SourcePosition::new(topic, partition, offset);
                    let list = found.entry(h).or_default();
                    if !list.contains(&p) {
                        list.push(p);
                    }
                }
            }
        }
        Ok(found)
    }

    /// Recorded outcomes by position, one query per (topic, partition) and
    /// 2,000 offsets. A position with several physical rows (a replay racing
    /// a merge) answers with the row written first, as FINAL would.
    pub(super) async fn arrival_outcomes_impl(&self, positions: &[SourcePosition]) -> Result<HashMap<SourcePosition, ArrivalOutcome>, StoreError> {
        let mut by_place: BTreeMap<(&str, i32), Vec<i64>> = BTreeMap::new();
        for p in positions {
            by_place.entry((p.topic.as_str(), p.partition)).or_default().push(p.offset);
        }
        let mut found = HashMap::new();
        for ((topic, partition), mut offsets) in by_place {
            offsets.sort_unstable();
            offsets.dedup();
            for chunk in offsets.chunks(KEYS_PER_QUERY) {
                let rows: Vec<(i64, u8)> = self
                    .timed(
                        &format!("look up {} arrivals of {topic}/{partition} in {}", chunk.len(), self.table("atom_arrivals")),
                        self.client
                            .query(
                                "SELECT source_offset, argMax(outcome = 'created', first_wins_rank) FROM atom_arrivals \
                                 WHERE source_topic = ? AND source_partition = ? AND source_offset IN ? GROUP BY source_offset",
                            )
                            .bind(topic)
                            .bind(partition)
                            .bind(SqlTuple(chunk))
                            .fetch_all::<(i64, u8)>(),
                    )
                    .await?;
                for (offset, created) in rows {
                    let outcome = if created != 0 { ArrivalOutcome::Created } else { ArrivalOutcome::Matched };
                    found.insert(SourcePosition::new(topic, partition, offset), outcome);
                }
            }
        }
        Ok(found)
    }

    pub(super) async fn existing_dead_letter_keys(&self, rows: &[&DeadLetterRow]) -> Result<HashSet<(String, i32, i64)>, StoreError> {
        let mut by_place: BTreeMap<(&str, i32), Vec<i64>> = BTreeMap::new();
        for row in rows {
            by_place.entry((row.source_topic.as_str(), row.source_partition)).or_default().push(row.source_offset);
        }
        let mut found = HashSet::new();
        for ((topic, partition), mut offsets) in by_place {
            offsets.sort_unstable();
            offsets.dedup();
            for chunk in offsets.chunks(KEYS_PER_QUERY) {
                let stored: Vec<i64> = self
                    .timed(
                        &format!("look up {} dead letters of {topic}/{partition} in {}", chunk.len(), self.table("dead_letters")),
                        self.client
                            .query(
                                "SELECT source_offset FROM dead_letters \
                                 WHERE source_topic = ? AND source_partition = ? AND source_offset IN ?",
                            )
                            .bind(topic)
                            .bind(partition)
                            .bind(SqlTuple(chunk))
                            .fetch_all::<i64>(),
                    )
                    .await?;
                found.extend(stored.into_iter().map(|offset| (topic.to_string(), partition, offset)));
            }
        }
        Ok(found)
    }
}

/// `text` without ANSI SGR sequences (`ESC [ digits;... m`), the only escape
/// sequences ClickHouse's Pretty formats write (bold headers, colours).
fn strip_ansi_styles(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('\u{1b}') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let params = after.strip_prefix('[').map(|p| p.find(|c: char| !(c.is_ascii_digit() || c == ';')).map(|end| (p, end)));
        match params {
            Some(Some((p, end))) if p[end..].starts_with('m') => rest = &p[end + 1..],
            _ => {
                out.push('\u{1b}');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_styles_are_stripped() {
        // As 18.16 answers PrettyCompactMonoBlock to a `readonly = 1` user.
        let coloured = "\u{250c}\u{2500}\u{1b}[1mx\u{1b}[0m\u{2500}\u{2510}\n\u{2502} 1 \u{2502}\n";
        assert_eq!(strip_ansi_styles(coloured), "\u{250c}\u{2500}x\u{2500}\u{2510}\n\u{2502} 1 \u{2502}\n");
        assert_eq!(strip_ansi_styles("a\u{1b}[1;31mb\u{1b}[0mc"), "abc");
        assert_eq!(strip_ansi_styles("no escapes"), "no escapes");
        assert_eq!(strip_ansi_styles("lone \u{1b} and \u{1b}[12"), "lone \u{1b} and \u{1b}[12");
    }

    #[test]
    fn only_read_only_statements_pass_the_keyword_check() {
        assert_eq!(first_keyword("  select 1"), "SELECT");
        assert_eq!(first_keyword("-- hi\n(SELECT 1)"), "SELECT");
        assert_eq!(first_keyword("/* x */ WITH a AS (SELECT 1) SELECT * FROM a"), "WITH");
        assert_eq!(first_keyword("SYSTEM STOP MERGES"), "SYSTEM");
        assert_eq!(first_keyword("insert into atoms values (1)"), "INSERT");
        assert_eq!(first_keyword(""), "");
    }

    #[test]
    fn hash_look_ups_split_evenly_and_fit_the_default_query_size() {
        let sizes = |n: usize| hash_chunks(&vec![0u8; n]).map(<[u8]>::len).collect::<Vec<_>>();
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), vec![1]);
        assert_eq!(sizes(3_600), vec![3_600]);
        assert_eq!(sizes(5_000), vec![2_500, 2_500]);
        assert_eq!(sizes(7_201), vec![2_401, 2_401, 2_399]);
        // 64 hex digits, two quotes and a comma per key, under 18.16's
        // default max_query_size of 262,144 bytes with room for the statement.
        assert!(HASHES_PER_QUERY * 67 + 200 < 262_144);
    }
}
