-- hartonomous_migrations: which numbered schema files `migrate` has applied
-- to this database, with the SHA-256 of each file's text as it was applied.
-- `migrate` always runs this file first (it is idempotent) and does not
-- record it; every numbered file after it is recorded once applied, and a
-- recorded file whose bundled text has changed since is refused by name.
--
-- Runs unchanged on ClickHouse 18.16 (Debian) and current releases.
-- Avoided, and why:
--   * DateTime64: not in 18.16; applied_at is a DateTime (second precision).
--   * LowCardinality, Bool, Map, codecs, TTL: not in 18.16 (LowCardinality
--     only behind allow_experimental_low_cardinality_type=1).
--   * A Replacing engine: concurrent migrations may record a file twice; the
--     store reads every row and compares each checksum, so duplicates are
--     harmless and a plain MergeTree keeps them visible for audit.
-- Names are unqualified: `migrate` runs every statement with the configured
-- database as the default database.
CREATE TABLE IF NOT EXISTS hartonomous_migrations
(
    name String,
    checksum String,
    applied_at DateTime('UTC')
)
ENGINE = MergeTree
ORDER BY (name, applied_at)
