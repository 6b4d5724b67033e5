-- atoms, rebuilt so that the FIRST stored row of a content hash wins.
--
-- 001_atoms.sql made `atoms` a ReplacingMergeTree(ingested_at_ms): when two
-- processes raced on the same new content and both inserted it, a merge (or
-- FINAL) kept the LATER row, so the atom's lineage (source position,
-- correlation id, source system) flipped to the later arrival. A
-- ReplacingMergeTree keeps the row with the highest version, and its version
-- column cannot be changed by ALTER, so this file rebuilds the table with
-- `first_wins_rank UInt64 DEFAULT 2^62 - ingested_at_ms`: the earliest
-- stored row has the highest rank and is the one kept. Nobody writes the
-- column; its DEFAULT computes it for every insert, the processor's and
-- hand-written ones alike.
--
-- How the rebuild runs (each step can be repeated; `migrate` evaluates a
-- step's `-- hartonomous:run-if:` query before it, skips the step when the
-- query returns 0, and treats a step that fails while its condition has
-- meanwhile turned 0 as done by a concurrent migrator):
--   1. create the new table under a temporary name;
--   2. drop the materialized view that feeds atoms_per_source_hour;
--   3. swap the names (RENAME is one statement), keeping the old table as
--      atoms_before_005;
--   4. recreate the view on the new `atoms`;
--   5. copy the old rows into the new table (the view sees them again, which
--      its replay-safe aggregates absorb), then drop the old table.
-- On a fresh database every step is instant. On a database holding atoms,
-- stop the processors first: rows inserted between steps 2 and 4 would not
-- reach atoms_per_source_hour (they are not lost from atoms).
--
-- Runs unchanged on ClickHouse 18.16 (Debian) and current releases; avoids
-- what 001_atoms.sql avoids (DateTime64, Map, Bool, codecs, TTL,
-- LowCardinality, table SETTINGS). Names are unqualified: `migrate` runs
-- every statement with the configured database as the default database.

-- hartonomous:run-if: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'atoms' AND name = 'first_wins_rank'
CREATE TABLE IF NOT EXISTS atoms_rebuild_005
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
    trace_id String,
    first_wins_rank UInt64 DEFAULT toUInt64(4611686018427387904 - ingested_at_ms)
)
ENGINE = ReplacingMergeTree(first_wins_rank)
PARTITION BY toYYYYMM(ingested_at)
ORDER BY content_hash;

-- hartonomous:run-if: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'atoms' AND name = 'first_wins_rank'
DROP TABLE IF EXISTS atoms_per_source_hour_mv;

-- hartonomous:run-if: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'atoms' AND name = 'first_wins_rank'
RENAME TABLE atoms TO atoms_before_005, atoms_rebuild_005 TO atoms;

CREATE MATERIALIZED VIEW IF NOT EXISTS atoms_per_source_hour_mv
TO atoms_per_source_hour
AS SELECT
    source_system,
    toStartOfHour(ingested_at) AS hour,
    uniqExactState(content_hash) AS atoms,
    groupUniqArrayState((sipHash128(content_hash), content_size)) AS bytes
FROM atoms
GROUP BY source_system, hour;

-- hartonomous:run-if: SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'atoms_before_005'
INSERT INTO atoms (content_hash, content_type, content, content_size, source_system, correlation_id, metadata, embedding, embedding_model, embedding_dimension, event_time, event_time_ms, source_topic, source_partition, source_offset, ingested_at, ingested_at_ms, trace_id)
SELECT content_hash, content_type, content, content_size, source_system, correlation_id, metadata, embedding, embedding_model, embedding_dimension, event_time, event_time_ms, source_topic, source_partition, source_offset, ingested_at, ingested_at_ms, trace_id
FROM atoms_before_005;

DROP TABLE IF EXISTS atoms_before_005
