-- inference_compensations: where the compensation of each compensated
-- request stands, keyed by the request's source position, with the whole
-- compensation event (so a redelivered request is answered with the same
-- event, never decided again). One row per step:
--   step 0 requested:  written by ensemble-inference just before it
--                      publishes the InferenceCompensation event;
-- and by the compensation consumer:
--   step 1 retracted:  its result and output rows are retracted;
--   step 2 announcing: InferenceCompensated is about to be sent, and
--                      announce_partition / announce_offset are the output
--                      partition and its end offset just before the send;
--   step 3 announced:  InferenceCompensated is acknowledged.
-- version is the step, so FINAL (or argMax(step, version)) gives the
-- furthest step. After a crash in step 2 the consumer reads the output
-- partition from announce_offset for the event before sending it again,
-- so InferenceCompensated goes out exactly once without transactions.
--
-- Runs unchanged on ClickHouse 18.16 and current releases (plain types only).
CREATE TABLE IF NOT EXISTS inference_compensations
(
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    correlation_id String,
    step UInt8,
    request_id String,
    failed_step String,
    reason_code String,
    reason String,
    done_steps String,
    models String,
    reservations UInt32,
    failed_at_ms UInt64,
    retracted_outputs UInt32,
    retracted_result UInt8,
    announce_partition Int32,
    announce_offset Int64,
    updated_at_ms UInt64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (source_topic, source_partition, source_offset)
