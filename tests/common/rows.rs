//! Store rows for the store tests: deterministic atoms and dead letters.

use hartonomous::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash};
use hartonomous::store::DeadLetterRow;

/// 2023-11-14 22:13:20 UTC.
pub const T0_MS: i64 = 1_700_000_000_000;

pub fn atom(content: &str, offset: i64) -> AtomRow {
    let content = content.as_bytes().to_vec();
    AtomRow {
        content_hash: ContentHash::of(&content),
        content_type: "text/plain".into(),
        content,
        source_system: "tests".into(),
        correlation_id: format!("corr-{offset}"),
        metadata_json: format!(r#"{{"n":"{offset}"}}"#),
        embedding: vec![offset as f32, 0.5, -1.25],
        embedding_model: "test-model".into(),
        event_time_ms: T0_MS + offset,
        source_topic: "atoms.requests".into(),
        source_partition: 0,
        source_offset: offset,
        ingested_at_ms: T0_MS + 1_000 + offset,
        trace_id: format!("trace-{offset}"),
    }
}

pub fn atoms(prefix: &str, n: usize) -> Vec<AtomRow> {
    (0..n).map(|i| atom(&format!("{prefix}-{i}"), i as i64)).collect()
}

pub fn dead_letter(topic: &str, partition: i32, offset: i64) -> DeadLetterRow {
    DeadLetterRow {
        topology: "atom-ingestion".into(),
        source_topic: topic.into(),
        source_partition: partition,
        source_offset: offset,
        stage: "validate".into(),
        reason: "validate.content_type".into(),
        error: "unsupported content type".into(),
        attempts: 1,
        failed_at_ms: T0_MS + 2_000 + offset,
        // Even offsets have a key, odd ones none (which is not an empty key).
        original_key: if offset % 2 == 0 { Some(vec![1, 2, 3]) } else { None },
        original_payload: vec![0xde, 0xad, offset as u8, 0x00, 0xff],
        trace_id: if offset % 2 == 0 { format!("{offset:032x}") } else { String::new() },
    }
}

/// The arrival of the request at `offset` of partition 0, for `content`.
pub fn arrival(content: &str, offset: i64, outcome: ArrivalOutcome) -> ArrivalRow {
    ArrivalRow {
        source_topic: "atoms.requests".into(),
        source_partition: 0,
        source_offset: offset,
        content_hash: ContentHash::of(content.as_bytes()),
        outcome,
        content_type: "text/plain".into(),
        content_size: content.len() as u64,
        source_system: "tests".into(),
        correlation_id: format!("corr-{offset}"),
        event_time_ms: T0_MS + offset,
        arrived_at_ms: T0_MS + 1_000 + offset,
        trace_id: format!("trace-{offset}"),
    }
}
