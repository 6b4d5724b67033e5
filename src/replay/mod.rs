//! Replays: run a topology over recorded traffic on the embedded default and
//! write every output as files that compare byte for byte.
//!
//! Follow one replay by file name: [`recording`] is the file `hartonomous
//! record` writes from a Kafka topic (`crate::log::kafka::read_range` reads
//! the range); [`replay_file`] loads it into a fresh in-process log, runs the
//! topology (and the bundled topologies that read its outputs, as `run
//! --input` does) with a [`FrozenClock`](crate::clock::FrozenClock) in a
//! fresh data directory; [`outputs`] dumps the store's tables, the output
//! topics and the dead letters as sorted files and diffs them against a
//! golden directory (`--expect`).
//!
//! What makes two replays of one file identical: the same input order (the
//! embedded log hands records out in offset order per partition, and the
//! stages keep window order), one frozen "now" for every time stamped, fresh
//! stores and registries (ids assigned in the same order; writer schemas keep
//! their recorded ids), a deterministic embedder (the built-in hashing one,
//! or a cassette), and outputs sorted before they are written.

pub mod cassette;
pub mod outputs;
pub mod recording;
pub mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::app::Embedded;
use crate::avro::Schemas;
use crate::clock::FrozenClock;
use crate::config::Profile;
use crate::record::OutgoingRecord;
use crate::topology::Summary;
use crate::topology::spec::TopologySpec;
use recording::RecordingReader;

/// The "now" of a replay whose input carries no recording time: 2026-01-01T00:00:00Z.
pub const DEFAULT_NOW_MS: i64 = 1_767_225_600_000;

/// What a replay did.
pub struct Replay {
    pub records: u64,
    pub summaries: Vec<Summary>,
    pub outputs: outputs::Outputs,
    /// The "now" every time was stamped with.
    pub now_ms: i64,
}

/// A data directory removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("hartonomous-replay-{}-{nanos}", std::process::id()));
        crate::config::create_private_dir(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replays `input` (a recording, JSON lines or framed wire records) through
/// `spec` on the embedded default, with `profile`'s embedder, and collects
/// every output; with a `cassette`, the embedder and the models answer
/// through it. `now_ms` overrides the frozen "now" (default: the
/// recording's time, or [`DEFAULT_NOW_MS`]).
pub async fn replay_file(
    profile: &Profile,
    spec: &TopologySpec,
    input: &Path,
    now_ms: Option<i64>,
    cassette: Option<Arc<cassette::Cassette>>,
) -> anyhow::Result<Replay> {
    let scratch = ScratchDir::new().map_err(|e| anyhow::anyhow!("cannot create a scratch data directory: {e}"))?;
    let env = [("HARTONOMOUS_DATA_DIR".to_string(), scratch.0.display().to_string())];
    let mut embedded = Profile::parse(Path::new("connectors/embedded.toml (built in)"), crate::config::EMBEDDED_PROFILE, env.into_iter())?;
    embedded.embedder = profile.embedder.clone();

    let recording = if RecordingReader::sniff(input) { Some(RecordingReader::open(input)?) } else { None };
    let now_ms = now_ms.or_else(|| recording.as_ref().map(|r| r.info().recorded_at_ms)).unwrap_or(DEFAULT_NOW_MS);
    let mut app = Embedded::open(&embedded, Arc::new(FrozenClock(now_ms)))?;
    if let Some(c) = &cassette {
        app.embedder = c.embedder(app.embedder.clone());
        app.cassette = Some(c.clone());
    }

    let topic = spec.source.topic.clone();
    let records = std::cell::Cell::new(0u64);
    let summaries = match recording {
        Some(reader) => {
            // Keep the recorded partitions: the source topic has at least as many.
            let partitions = reader.info().partitions.iter().copied().max().map_or(0, |p| p + 1).max(spec.source.partitions);
            app.log.create_topic(&topic, partitions);
            // The writer schemas keep their recorded ids, so they are imported
            // before the run registers the bundled schemas (which then reuse
            // an imported id for the same schema, and take new ids above the
            // recorded ones for the others). A first pass reads only them.
            for entry in RecordingReader::open(input)? {
                if let Some((id, json)) = entry?.writer_schema {
                    let schema = apache_avro::Schema::parse_str(&json).map_err(|e| anyhow::anyhow!("{}: writer schema {id} does not parse: {e}", input.display()))?;
                    app.registry.import(id, &Schemas::subject(&topic), &schema)?;
                }
            }
            let feed = reader.map(|entry| -> anyhow::Result<OutgoingRecord> {
                let entry = entry?;
                records.set(records.get() + 1);
                let r = entry.record;
                Ok(OutgoingRecord { topic: topic.clone(), partition: Some(r.position.tp.partition), key: r.key, payload: r.payload, headers: r.headers, event_time_ms: Some(r.event_time_ms) })
            });
            app.run_chain_feed(spec, feed).await?
        }
        None => {
            let feed = crate::input::stream(input, &topic)?.inspect(|_| records.set(records.get() + 1));
            app.run_chain_feed(spec, feed).await?
        }
    };
    let records = records.get();

    let mut topics = Vec::new();
    let mut dead_letter_topics = Vec::new();
    for s in &summaries {
        let spec = if s.topology == spec.name { spec.clone() } else { crate::topology::bundled(&s.topology)? };
        topics.extend(spec.topology()?.outputs(&spec));
        dead_letter_topics.push(spec.dead_letter.topic.clone());
    }
    topics.sort();
    topics.dedup();
    dead_letter_topics.sort();
    dead_letter_topics.dedup();
    let outputs = outputs::collect(&app.store, &app.log, app.registry.as_ref(), &topics, &dead_letter_topics).await?;
    drop(app);
    drop(scratch);
    Ok(Replay { records, summaries, outputs, now_ms })
}
