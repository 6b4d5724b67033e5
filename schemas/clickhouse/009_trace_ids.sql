-- trace_id in every table the processor writes, as atoms (001) and
-- atom_arrivals (004) have had from the start: the W3C trace id (32 hex
-- characters) of the input record's `traceparent` Kafka header, or '' when
-- the record had none (see README "Logs and traces"). For dead letters it is
-- the failed record's; for inference results, model outputs and
-- compensations, the request's (a retraction row keeps the trace of the
-- compensation that wrote it).
--
-- Portability: ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`, so each
-- ALTER runs only while its column is missing (the `run-if` guard, as in
-- 005): after a crash mid-file the repeat skips the tables already altered.
-- A plain view keeps the columns it had when it was created (18.16 and
-- current releases alike), so the two views of 007 are created again to
-- show the new column; between the DROP and the CREATE a query on them
-- fails, so migrate while analysts are not reading them.
--
-- Runs unchanged on ClickHouse 18.16 and current releases; avoids what 001
-- avoids (no DateTime64, LowCardinality, Map, Bool, codecs, TTL, settings).

-- hartonomous:run-if: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'dead_letters' AND name = 'trace_id'
ALTER TABLE dead_letters ADD COLUMN trace_id String DEFAULT '';

-- hartonomous:run-if: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'inference_results' AND name = 'trace_id'
ALTER TABLE inference_results ADD COLUMN trace_id String DEFAULT '';

-- hartonomous:run-if: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'model_outputs' AND name = 'trace_id'
ALTER TABLE model_outputs ADD COLUMN trace_id String DEFAULT '';

-- hartonomous:run-if: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'inference_compensations' AND name = 'trace_id'
ALTER TABLE inference_compensations ADD COLUMN trace_id String DEFAULT '';

DROP TABLE IF EXISTS inference_results_live;

CREATE VIEW IF NOT EXISTS inference_results_live AS
SELECT * FROM inference_results FINAL WHERE deleted = 0;

DROP TABLE IF EXISTS model_outputs_live;

CREATE VIEW IF NOT EXISTS model_outputs_live AS
SELECT * FROM model_outputs FINAL WHERE deleted = 0
