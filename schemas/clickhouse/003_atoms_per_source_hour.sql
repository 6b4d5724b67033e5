-- atoms_per_source_hour: distinct atoms and their bytes per source system and
-- hour of ingestion, kept up to date by a materialized view on `atoms`.
--
-- Why these aggregate functions: the view sees every block inserted into
-- `atoms`, including a replayed insert of rows already stored (ReplacingMergeTree
-- removes those only later, at merge or FINAL time, and the view never sees
-- that). So every aggregate here must be idempotent, giving the same answer
-- when a row is added twice:
--   * atoms: uniqExact(content_hash). Exact and replay-safe. Read it with
--     uniqExactMerge(atoms).
--   * bytes: a set of (sipHash128(content_hash), content_size) pairs,
--     groupUniqArray. A plain sum(content_size) would count a replayed row
--     twice. Read it with
--       arraySum(arrayMap(t -> t.2, groupUniqArrayMerge(bytes))).
--     The 128-bit hash keeps the state at 24 bytes per atom; uniqExact itself
--     also works on 128-bit hashes of the strings.
-- Cost: both states hold one entry per distinct atom per (source_system,
-- hour), about 40 bytes per atom on disk and in memory when merged. For
-- sources with many millions of atoms per hour, an approximate but still
-- replay-safe alternative is uniqCombined.
--
-- Hour boundaries: a replay re-ingests an atom with a new `ingested_at`. If
-- that falls in a later hour, the atom appears in both hours; any rollup over
-- a range containing both (uniqExactMerge over several hours) still counts it
-- once, and the total over all hours equals count() FROM atoms FINAL.
--
-- Runs unchanged on ClickHouse 18.16 (Debian) and current releases. Avoided:
--   * LowCardinality(String) for source_system (needs an experimental
--     setting on 18.16), DateTime64, codecs, TTL (not in 18.16).
--   * CREATE MATERIALIZED VIEW ... ENGINE = ... (an inner table with a
--     generated name); `TO atoms_per_source_hour` keeps the target table
--     explicit, so it can be queried, altered and backfilled by name.
--   * POPULATE: it would miss rows inserted while it runs. To backfill after
--     creating this on a database that already holds atoms:
--       INSERT INTO atoms_per_source_hour
--       SELECT source_system, toStartOfHour(ingested_at) AS hour,
--              uniqExactState(content_hash),
--              groupUniqArrayState((sipHash128(content_hash), content_size))
--       FROM atoms GROUP BY source_system, hour
--     (replay-safe for the same reason as the view itself).
CREATE TABLE IF NOT EXISTS atoms_per_source_hour
(
    source_system String,
    hour DateTime('UTC'),
    atoms AggregateFunction(uniqExact, String),
    bytes AggregateFunction(groupUniqArray, Tuple(FixedString(16), UInt64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (source_system, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS atoms_per_source_hour_mv
TO atoms_per_source_hour
AS SELECT
    source_system,
    toStartOfHour(ingested_at) AS hour,
    uniqExactState(content_hash) AS atoms,
    groupUniqArrayState((sipHash128(content_hash), content_size)) AS bytes
FROM atoms
GROUP BY source_system, hour;
