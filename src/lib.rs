//! Hartonomous: Kafka/Avro stream processing into ClickHouse, with an
//! embedded default that needs no servers.
pub mod atom;
pub mod inference;
pub mod clock;
pub mod embed;
pub mod model;
pub mod outcome;
pub mod record;
pub mod replay;
pub mod resilience;
pub mod store;
pub mod tls;
pub mod trace;
pub mod telemetry;
pub mod avro;
pub mod dead_letter;
pub mod dlq;
pub mod failpoint;
pub mod flow;
pub mod log;
pub mod ops;
pub mod config;
pub mod topology;
pub mod app;
pub mod input;
