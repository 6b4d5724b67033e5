-- inference_results: the decided answer to one InferenceRequest, keyed by
-- the request's source position (source_topic, source_partition,
-- source_offset), so a replayed request writes the same row again.
--
-- models lists the models asked, comma-separated, in ensemble order.
--
-- Saga retraction: when a request is compensated, the compensation consumer
-- writes the same key again with deleted = 1 and version = 2. Live rows are
-- always version 1, so ReplacingMergeTree(version) keeps the retraction
-- whatever order the two land in, and a replay of the request after its
-- compensation never brings the row back. Read with
--     SELECT ... FROM inference_results FINAL WHERE deleted = 0
-- or through the view inference_results_live (007), which does just that.
--
-- No PARTITION BY: ReplacingMergeTree only collapses rows within one
-- partition, and a retraction written months later must meet its row.
--
-- Runs unchanged on ClickHouse 18.16 (Debian) and current releases. Avoided:
--   * DateTime64: not in 18.16; completed_at is DateTime('UTC') with the
--     exact milliseconds in completed_at_ms.
--   * Nullable score: a plain Float64 with has_score (0/1) keeps the
--     RowBinary layout the same on both versions and FINAL cheap.
--   * Bool, Map, LowCardinality, codecs, TTL, table SETTINGS: not in 18.16.
--     status is a String: COMPLETE or PARTIAL.
CREATE TABLE IF NOT EXISTS inference_results
(
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    request_id String,
    correlation_id String,
    status String,
    aggregation String,
    label String,
    score Float64,
    has_score UInt8,
    models_asked UInt32,
    models String,
    models_counted UInt32,
    models_failed UInt32,
    late_outputs UInt32,
    flags String,
    ensemble String,
    completed_at DateTime('UTC') DEFAULT toDateTime(intDiv(completed_at_ms, 1000), 'UTC'),
    completed_at_ms UInt64,
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (source_topic, source_partition, source_offset)
