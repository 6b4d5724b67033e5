-- model_outputs: every model's answer to every InferenceRequest, keyed by
-- the request's source position and the model id. late = 1 marks an answer
-- that arrived after the result was decided (recorded, never counted);
-- counted = 1 marks the answers the aggregation used. Retraction, versions
-- and the reason for no PARTITION BY are as in inference_results (006).
-- Read with FINAL WHERE deleted = 0, or through model_outputs_live.
--
-- Also creates the two views analysts query, which hide retracted rows.
--
-- Runs unchanged on ClickHouse 18.16 and current releases; avoided the
-- same features as 006 (label and error are '' when absent).
CREATE TABLE IF NOT EXISTS model_outputs
(
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    model_id String,
    request_id String,
    correlation_id String,
    model_version String,
    sequence UInt32,
    label String,
    score Float64,
    has_score UInt8,
    error String,
    latency_ms UInt64,
    attempts UInt32,
    hedged UInt8,
    coalesced UInt8,
    late UInt8,
    counted UInt8,
    flags String,
    answered_at DateTime('UTC') DEFAULT toDateTime(intDiv(answered_at_ms, 1000), 'UTC'),
    answered_at_ms UInt64,
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (source_topic, source_partition, source_offset, model_id);

CREATE VIEW IF NOT EXISTS inference_results_live AS
SELECT * FROM inference_results FINAL WHERE deleted = 0;

CREATE VIEW IF NOT EXISTS model_outputs_live AS
SELECT * FROM model_outputs FINAL WHERE deleted = 0
