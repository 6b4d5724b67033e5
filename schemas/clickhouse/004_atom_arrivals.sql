-- atom_arrivals: one row per accepted AtomIngestionRequest (every request
-- that passed decoding and validation), keyed by its source position
-- (source_topic, source_partition, source_offset), so a replay never doubles
-- it. `atoms` holds each content once; this table keeps what each source
-- sent, repeats included, and the answer each request got:
--   outcome = 'created': this request stored the atom (its position is the
--                        atom's lineage in `atoms`);
--   outcome = 'matched': the content was already stored (or admitted earlier
--                        in the stream): nothing new was stored and no
--                        embedding call was made.
-- The processor writes a window's arrivals only after the window's atoms are
-- stored, and publishes the AtomIngested events only after both, so an
-- arrival always has its atom and every event has its arrival.
--
-- Engine: ReplacingMergeTree(first_wins_rank). A replayed arrival keeps the
-- row written first: first_wins_rank is 2^62 minus arrived_at_ms (a DEFAULT,
-- so nobody writes it), and ReplacingMergeTree keeps the highest version.
-- Query with FINAL for exact counts.
--
-- Runs unchanged on ClickHouse 18.16 (Debian) and current releases. Avoided:
--   * DateTime64: not in 18.16; arrived_at / event_time are DateTime('UTC')
--     with the exact milliseconds in arrived_at_ms / event_time_ms.
--   * LowCardinality(String) for source_system / content_type: needs an
--     experimental setting on 18.16; plain String.
--   * Bool, Map, codecs, TTL, table SETTINGS: not in 18.16. `outcome` is an
--     Enum8, which both understand.
-- Names are unqualified: `migrate` runs every statement with the configured
-- database as the default database.
CREATE TABLE IF NOT EXISTS atom_arrivals
(
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    content_hash String,
    outcome Enum8('created' = 1, 'matched' = 2),
    content_type String,
    content_size UInt64,
    source_system String,
    correlation_id String,
    event_time DateTime('UTC'),
    event_time_ms Int64,
    arrived_at DateTime('UTC'),
    arrived_at_ms UInt64,
    trace_id String,
    first_wins_rank UInt64 DEFAULT toUInt64(4611686018427387904 - arrived_at_ms)
)
ENGINE = ReplacingMergeTree(first_wins_rank)
PARTITION BY toYYYYMM(arrived_at)
ORDER BY (source_topic, source_partition, source_offset)
