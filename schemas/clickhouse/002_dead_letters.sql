-- dead_letters: one row per record sent to a dead-letter topic, keyed by its
-- source position (source_topic, source_partition, source_offset). Same
-- columns, in the same order, as the embedded store's `dead_letters` table,
-- plus `failed_at_ms`.
--
-- Runs unchanged on ClickHouse 18.16 (Debian) and current releases.
-- Avoided, and why:
--   * DateTime64: not in 18.16. `failed_at` is DateTime('UTC') with SECOND
--     precision; the exact milliseconds are kept in `failed_at_ms`.
--   * Bool, Map, column codecs and TTL: not in 18.16. (A TTL to expire old
--     dead letters would be natural on current releases; drop old monthly
--     partitions instead: ALTER TABLE dead_letters DROP PARTITION 202401.)
--   * LowCardinality(String) for topology/stage/reason: 18.16 needs
--     allow_experimental_low_cardinality_type=1; plain String instead.
--   * SETTINGS non_replicated_deduplication_window: unknown to 18.16; added at
--     run time by the store only where supported.
--
-- Engine: ReplacingMergeTree without a version column: re-archiving the same
-- position leaves one row under FINAL (the one inserted last). The store
-- checks which positions are already archived before every insert.
-- `original_key` is Nullable: a Kafka record may have no key at all, which is
-- not the same as an empty key.
CREATE TABLE IF NOT EXISTS dead_letters
(
    topology String,
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    stage String,
    reason String,
    error String,
    attempts UInt32,
    failed_at DateTime('UTC'),
    failed_at_ms Int64,
    original_key Nullable(String),
    original_payload String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(failed_at)
ORDER BY (source_topic, source_partition, source_offset)
