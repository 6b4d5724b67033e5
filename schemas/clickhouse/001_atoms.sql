-- atoms: one row per stored atom, keyed by content_hash (64 lowercase hex
-- chars of the SHA-256 of `content`). Same columns, in the same order, as the
-- embedded store's `atoms` table, plus `event_time_ms` and `ingested_at_ms`.
--
-- Runs unchanged on ClickHouse 18.16 (Debian) and current releases.
-- Avoided, and why:
--   * DateTime64: not in 18.16. `event_time` and `ingested_at` are
--     DateTime('UTC') with SECOND precision (what partitioning and the hourly
--     summary use); the exact milliseconds are kept in `event_time_ms` and
--     `ingested_at_ms`. Instants before 1970 or after 2106 cannot be held by
--     a DateTime: the store clamps the DateTime column and keeps the exact
--     value in the *_ms column. (18.16 prints the clamped zero DateTime as
--     0000-00-00 00:00:00, current releases as 1970-01-01 00:00:00.)
--   * Map: not in 18.16; `metadata` is the request's metadata map as a JSON
--     object in a String.
--   * Bool, column codecs (CODEC(...)) and TTL: not in 18.16.
--   * LowCardinality(String): 18.16 needs
--     allow_experimental_low_cardinality_type=1 for it; plain String instead.
--   * SETTINGS non_replicated_deduplication_window: unknown to 18.16. The store
--     adds it with ALTER TABLE ... MODIFY SETTING only on servers that have it
--     (together with per-insert insert_deduplication_token).
--
-- Engine: ReplacingMergeTree(ingested_at_ms) ORDER BY content_hash. A replayed
-- insert of an atom already stored leaves two rows until a merge; `FINAL`
-- (or a merge) keeps one, the one with the latest ingested_at_ms. Background
-- merges only happen inside a partition, so a replay that lands in another
-- month stays as two physical rows; SELECT ... FINAL still returns one (it
-- collapses across partitions on 18.16 and, by default, on current releases).
-- The store checks for existing hashes before every insert, so such
-- duplicates only arise from concurrent writers or a write racing a crash.
--
-- Names are unqualified: `migrate` runs every statement with the configured
-- database as the default database.
CREATE TABLE IF NOT EXISTS atoms
(
    content_hash String,
    content_type String,
    content String,
    content_size UInt64,
    source_system String,
    correlation_id String,
    metadata String,
    embedding Array(Float32),
    embedding_model String,
    embedding_dimension UInt32,
    event_time DateTime('UTC'),
    event_time_ms Int64,
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    ingested_at DateTime('UTC'),
    ingested_at_ms UInt64,
    trace_id String
)
ENGINE = ReplacingMergeTree(ingested_at_ms)
PARTITION BY toYYYYMM(ingested_at)
ORDER BY content_hash
