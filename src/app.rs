//! Assembles a run of a topology from a connection profile, and reports on it.
//! The CLI, the golden-file tests and the benches all go through here, so
//! they run exactly what users run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use crate::avro::confluent::ConfluentRegistry;
use crate::avro::{FileRegistry, SchemaRegistry, Schemas};
use crate::clock::SharedClock;
use crate::config::{EmbedderProfile, LogProfile, Profile, RegistryProfile, StoreProfile};
use crate::embed::Embedder;
use crate::embed::hashing::HashingEmbedder;
use crate::embed::openai::OpenAiEmbedder;
use crate::flow::Metrics;
use crate::flow::runner::{RunReport, Until};
use crate::log::embedded::EmbeddedLog;
use crate::log::kafka::{KafkaConsumer, KafkaProducer, ensure_topics};
use crate::record::{OutgoingRecord, TopicPartition};
use crate::store::AtomStore;
use crate::store::clickhouse::ClickHouseStore;
use crate::store::embedded::EmbeddedStore;
use crate::topology::Deps;
use crate::topology::spec::{StageSpec, TopologySpec};

/// The embedded default: in-process log, Parquet store, file registry and
/// the profile's embedder.
pub struct Embedded {
    pub log: EmbeddedLog,
    pub store: Arc<EmbeddedStore>,
    pub registry: Arc<FileRegistry>,
    pub embedder: Arc<dyn Embedder>,
    pub clock: SharedClock,
}

impl Embedded {
    pub fn open(profile: &Profile, clock: SharedClock) -> anyhow::Result<Self> {
        let dir = profile.data_dir();
        crate::config::create_private_dir(dir).map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))?;
        let store = Arc::new(EmbeddedStore::open(dir)?);
        let registry = Arc::new(FileRegistry::open(profile.registry_path().unwrap_or_else(|| dir.join("registry.json")))?);
        let embedder = build_embedder(&profile.embedder, clock.clone())?;
        Ok(Self { log: EmbeddedLog::new(clock.clone()), store, registry, embedder, clock })
    }

    /// Registers the bundled schemas for the topology's topics, so that ids are
    /// assigned in a stable order and records written with older versions decode.
    pub fn register_schemas(&self, spec: &TopologySpec) -> anyhow::Result<()> {
        self.registry.register_bundled(&[(spec.source.topic.as_str(), spec.source.schema.as_str())])?;
        Ok(())
    }

    /// Loads `records` into the source topic and runs the topology until they
    /// are all processed.
    pub async fn run_to_end(&self, spec: &TopologySpec, records: Vec<OutgoingRecord>) -> anyhow::Result<Summary> {
        self.register_schemas(spec)?;
        self.log.create_topic(&spec.source.topic, spec.source.partitions);
        for r in records {
            self.log.append(r);
        }
        let metrics = Arc::new(Metrics::default());
        let deps = Deps {
            producer: Arc::new(self.log.producer()),
            registry: self.registry.clone(),
            store: self.store.clone(),
            embedder: self.embedder.clone(),
            clock: self.clock.clone(),
            metrics: metrics.clone(),
            breakers: Default::default(),
        };
        let consumer = self.log.consumer(&spec.group(), &[spec.source.topic.as_str()]);
        let report = crate::topology::atom_ingestion::run(spec, &deps, consumer, Until::Drained, std::future::pending()).await?;
        Ok(Summary::new(spec, &metrics, report))
    }
}

/// Opens the profile's schema registry and registers every bundled version of
/// schema `name` under `<topic>-value`, oldest first (a no-op when they are
/// registered already), so ids are the same whichever command runs first.
pub async fn open_registry(profile: &Profile, topic: &str, name: &str) -> anyhow::Result<Arc<dyn SchemaRegistry>> {
    match &profile.registry {
        RegistryProfile::Confluent(c) => {
            let registry = ConfluentRegistry::new(c.clone()).map_err(anyhow::Error::msg)?;
            for version in Schemas::versions(name).unwrap_or_default() {
                registry.register(&Schemas::subject(topic), &version.schema).await?;
            }
            Ok(Arc::new(registry))
        }
        RegistryProfile::File(_) => {
            let path = profile.registry_path().expect("file registry has a path");
            if let Some(parent) = path.parent() {
                crate::config::create_private_dir(parent)
                    .map_err(|e| anyhow::anyhow!("cannot create the registry's directory {}: {e}", parent.display()))?;
            }
            let registry = FileRegistry::open(&path)?;
            registry.register_bundled(&[(topic, name)])?;
            Ok(Arc::new(registry))
        }
    }
}

/// Opens the profile's store; ClickHouse is migrated first when configured.
pub async fn open_store(profile: &Profile) -> anyhow::Result<Arc<dyn AtomStore>> {
    Ok(match &profile.store {
        StoreProfile::Embedded(_) => {
            let dir = profile.data_dir();
            crate::config::create_private_dir(dir).map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))?;
            Arc::new(EmbeddedStore::open(dir)?)
        }
        // `connect` applies the DDL itself when `migrate_on_start` is set.
        StoreProfile::Clickhouse(c) => Arc::new(ClickHouseStore::connect(c.clone()).await?),
    })
}

/// Runs a topology against Kafka until `shutdown` completes, then drains and
/// commits what finished.
pub async fn run_kafka(profile: &Profile, spec: &TopologySpec, shutdown: impl std::future::Future<Output = ()> + Send) -> anyhow::Result<Summary> {
    let LogProfile::Kafka(kafka) = &profile.log else {
        anyhow::bail!("this profile's log is not Kafka; `run` without --input needs `[log] kind = \"kafka\"`");
    };
    let clock = crate::clock::system();
    let registry = open_registry(profile, &spec.source.topic, &spec.source.schema).await?;
    let store = open_store(profile).await?;
    let embedder = build_embedder(&profile.embedder, clock.clone())?;
    if kafka.create_topics {
        let mut topics = vec![(spec.source.topic.clone(), spec.source.partitions), (spec.dead_letter.topic.clone(), spec.source.partitions)];
        if let Some(p) = spec.stage(|s| if let StageSpec::Publish(p) = s { Some(p) } else { None }) {
            topics.push((p.topic.clone(), spec.source.partitions));
        }
        let topics: Vec<(&str, i32)> = topics.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        ensure_topics(kafka, &topics).await?;
    }
    let metrics = Arc::new(Metrics::default());
    let deps = Deps {
        producer: Arc::new(KafkaProducer::new(kafka)?),
        registry,
        store,
        embedder,
        clock,
        metrics: metrics.clone(),
        breakers: Default::default(),
    };
    let consumer = KafkaConsumer::new(kafka, &spec.group(), &[spec.source.topic.as_str()])?;
    let report = crate::topology::atom_ingestion::run(spec, &deps, consumer, Until::Shutdown, shutdown).await?;
    Ok(Summary::new(spec, &metrics, report))
}

pub fn build_embedder(profile: &EmbedderProfile, clock: SharedClock) -> anyhow::Result<Arc<dyn Embedder>> {
    Ok(match profile {
        EmbedderProfile::Hashing(h) => Arc::new(HashingEmbedder::new(h.dimension, h.max_batch)),
        EmbedderProfile::Openai(o) => Arc::new(OpenAiEmbedder::new(o.clone(), clock).map_err(anyhow::Error::msg)?),
    })
}

/// What one run did, as printed by `demo` and `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub topology: String,
    pub records_in: u64,
    pub atoms_stored: u64,
    /// Accepted requests recorded in `atom_arrivals` by this run (a
    /// redelivered request recorded before is not counted again).
    pub arrivals_stored: u64,
    /// Requests whose content was already stored or admitted, by `duplicate.*` reason.
    pub duplicates_matched: u64,
    pub matched_by_reason: BTreeMap<String, u64>,
    pub skipped_by_reason: BTreeMap<String, u64>,
    pub embedding_calls: u64,
    pub embedded_contents: u64,
    pub dead_lettered: u64,
    pub dead_letters_by_reason: BTreeMap<String, u64>,
    pub events_published: u64,
    pub committed: BTreeMap<TopicPartition, i64>,
}

impl Summary {
    pub fn new(spec: &TopologySpec, m: &Metrics, report: RunReport) -> Self {
        let skipped: BTreeMap<String, u64> = m.skipped_by_reason().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let matched: BTreeMap<String, u64> = m.matched_by_reason().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let dead = m.dead_letters_by_reason();
        Self {
            topology: spec.name.clone(),
            records_in: Metrics::get(&m.records_in),
            atoms_stored: Metrics::get(&m.atoms_stored),
            arrivals_stored: Metrics::get(&m.arrivals_stored),
            duplicates_matched: matched.values().sum(),
            matched_by_reason: matched,
            skipped_by_reason: skipped,
            embedding_calls: Metrics::get(&m.embedding_calls),
            embedded_contents: Metrics::get(&m.embedded_texts),
            dead_lettered: dead.values().sum(),
            dead_letters_by_reason: dead,
            events_published: Metrics::get(&m.events_published),
            committed: report.committed,
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{} summary", self.topology);
        let _ = writeln!(s, "  records in            {:>8}", self.records_in);
        let _ = writeln!(s, "  atoms stored          {:>8}", self.atoms_stored);
        let _ = writeln!(s, "  arrivals recorded     {:>8}", self.arrivals_stored);
        let _ = writeln!(s, "  duplicates matched    {:>8}  (stored nothing, no embedding call)", self.duplicates_matched);
        for (reason, n) in &self.matched_by_reason {
            let _ = writeln!(s, "    {reason:<22}{n:>6}");
        }
        for (reason, n) in &self.skipped_by_reason {
            let _ = writeln!(s, "  skipped {reason:<14}{n:>8}");
        }
        let _ = writeln!(s, "  embedding calls       {:>8}  ({} contents embedded)", self.embedding_calls, self.embedded_contents);
        let _ = writeln!(s, "  dead-lettered         {:>8}", self.dead_lettered);
        for (reason, n) in &self.dead_letters_by_reason {
            let _ = writeln!(s, "    {reason:<22}{n:>6}");
        }
        let _ = writeln!(s, "  events published      {:>8}  (one per accepted request)", self.events_published);
        let committed: Vec<String> = self.committed.iter().map(|(tp, o)| format!("{tp}@{o}")).collect();
        let _ = write!(s, "  committed             {}", if committed.is_empty() { "nothing".to_string() } else { committed.join(" ") });
        s
    }
}
