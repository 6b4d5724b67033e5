//! Assembles a run of a topology from a connection profile, and reports on it.
//! The CLI, the golden-file tests and the benches all go through here, so
//! they run exactly what users run.

use std::sync::Arc;

use crate::avro::confluent::ConfluentRegistry;
use crate::avro::{FileRegistry, SchemaRegistry, Schemas};
use crate::clock::SharedClock;
use crate::config::{EmbedderProfile, LogProfile, Profile, RegistryProfile, StoreProfile};
use crate::embed::Embedder;
use crate::embed::hashing::HashingEmbedder;
use crate::embed::openai::OpenAiEmbedder;
use crate::flow::Metrics;
use crate::flow::runner::Until;
use crate::log::embedded::EmbeddedLog;
use crate::log::kafka::{KafkaConsumer, KafkaProducer, KafkaScanner, ensure_topics};
use crate::record::OutgoingRecord;
use crate::store::{AtomStore, InferenceStore, RequestLookup};
use crate::store::clickhouse::ClickHouseStore;
use crate::store::embedded::EmbeddedStore;
pub use crate::topology::Summary;
use crate::topology::spec::TopologySpec;
use crate::topology::{self, Deps};

/// The embedded default: in-process log, Parquet store, file registry and
/// the profile's embedder.
pub struct Embedded {
    pub log: EmbeddedLog,
    pub store: Arc<EmbeddedStore>,
    pub registry: Arc<FileRegistry>,
    pub embedder: Arc<dyn Embedder>,
    pub clock: SharedClock,
    /// Model answers to play back or record (replays): the topology's models
    /// answer through it. Set `embedder` through it too.
    pub cassette: Option<Arc<crate::replay::cassette::Cassette>>,
}

impl Embedded {
    pub fn open(profile: &Profile, clock: SharedClock) -> anyhow::Result<Self> {
        let dir = profile.data_dir();
        crate::config::create_private_dir(dir).map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))?;
        let store = Arc::new(EmbeddedStore::open(dir)?);
        let registry = Arc::new(FileRegistry::open(profile.registry_path().unwrap_or_else(|| dir.join("registry.json")))?);
        let embedder = build_embedder(&profile.embedder, clock.clone())?;
        Ok(Self { log: EmbeddedLog::new(clock.clone()), store, registry, embedder, clock, cassette: None })
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
        for (topic, _schema) in spec.topology()?.outputs(spec) {
            self.log.create_topic(&topic, spec.source.partitions);
        }
        for r in records {
            self.log.append(r);
        }
        let metrics = Arc::new(Metrics::new(&spec.name));
        let deps = self.deps(metrics.clone());
        let consumer = self.log.consumer(&spec.group(), &[spec.source.topic.as_str()]);
        let report = topology::run(spec, &deps, consumer, Until::Drained, std::future::pending()).await?;
        Ok(Summary::new(&spec.name, &metrics, report))
    }
}

impl Embedded {
    /// Runs the topology while `records` are appended to its source topic one
    /// by one, until they are all processed. The feed holds at most a bounded
    /// backlog of records the topology has not committed (committed ones are
    /// released), so memory does not grow with the input. A feed error stops
    /// the feed; what was appended is processed, then the error is returned.
    pub async fn run_feed<E: std::fmt::Display>(&self, spec: &TopologySpec, records: impl Iterator<Item = Result<OutgoingRecord, E>>) -> anyhow::Result<Summary> {
        self.register_schemas(spec)?;
        let topic = spec.source.topic.clone();
        let group = spec.group();
        self.log.create_topic(&topic, spec.source.partitions);
        for (t, _schema) in spec.topology()?.outputs(spec) {
            self.log.create_topic(&t, spec.source.partitions);
        }
        self.log.open_feed(&topic);
        let metrics = Arc::new(Metrics::new(&spec.name));
        let deps = self.deps(metrics.clone());
        let consumer = self.log.consumer(&group, &[topic.as_str()]);
        // Room for what is in flight, a window being filled and a commit
        // interval's worth of finished records not committed yet.
        let bound = (2 * spec.limits.in_flight_records + 2 * spec.window.max_records).max(10_000) as i64;
        let feed = async {
            let mut fed = 0u64;
            let mut failed = None;
            for r in records {
                match r {
                    Ok(r) => self.log.append(r),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                };
                fed += 1;
                if fed % 1024 == 0 {
                    self.log.release(&topic, &group);
                    while self.log.backlog(&topic, &group) > bound {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        self.log.release(&topic, &group);
                    }
                    tokio::task::yield_now().await;
                }
            }
            self.log.seal(&topic);
            failed
        };
        let (report, failed) = tokio::join!(topology::run(spec, &deps, consumer, Until::Drained, std::future::pending()), feed);
        let report = report?;
        if let Some(e) = failed {
            anyhow::bail!("{e} (the records before it were processed)");
        }
        Ok(Summary::new(&spec.name, &metrics, report))
    }

    /// [`run_feed`](Self::run_feed), then every bundled topology that reads
    /// what it wrote, as [`run_chain_to_end`](Self::run_chain_to_end) does.
    pub async fn run_chain_feed<E: std::fmt::Display>(&self, spec: &TopologySpec, records: impl Iterator<Item = Result<OutgoingRecord, E>>) -> anyhow::Result<Vec<Summary>> {
        let mut summaries = vec![self.run_feed(spec, records).await?];
        summaries.extend(self.run_followers(spec).await?);
        Ok(summaries)
    }

    /// Every bundled topology, other than `spec`'s, that reads one of its outputs, each until drained.
    async fn run_followers(&self, spec: &TopologySpec) -> anyhow::Result<Vec<Summary>> {
        let outputs: Vec<String> = spec.topology()?.outputs(spec).into_iter().map(|(t, _)| t).collect();
        let mut summaries = Vec::new();
        for t in topology::TOPOLOGIES {
            let next = topology::bundled(t.name())?;
            if next.name != spec.name && outputs.contains(&next.source.topic) {
                summaries.push(self.run_to_end(&next, Vec::new()).await?);
            }
        }
        Ok(summaries)
    }

    fn deps(&self, metrics: Arc<Metrics>) -> Deps {
        Deps {
            producer: Arc::new(self.log.producer()),
            registry: self.registry.clone(),
            store: self.store.clone(),
            inference: self.store.clone(),
            scan: Arc::new(self.log.clone()),
            embedder: self.embedder.clone(),
            clock: self.clock.clone(),
            metrics,
            breakers: Default::default(),
            cassette: self.cassette.clone(),
        }
    }

    /// [`run_to_end`](Self::run_to_end), then every bundled topology that
    /// reads what it wrote (such as `inference-compensation` after
    /// `ensemble-inference`), each until drained, since the embedded log
    /// lives only as long as this process. Summaries in the order run.
    pub async fn run_chain_to_end(&self, spec: &TopologySpec, records: Vec<OutgoingRecord>) -> anyhow::Result<Vec<Summary>> {
        let mut summaries = vec![self.run_to_end(spec, records).await?];
        summaries.extend(self.run_followers(spec).await?);
        Ok(summaries)
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

/// Opens the profile's schema registry for look-ups only: nothing is
/// registered (`record` reads the writer schemas its records name).
pub fn lookup_registry(profile: &Profile) -> anyhow::Result<Arc<dyn SchemaRegistry>> {
    Ok(match &profile.registry {
        RegistryProfile::Confluent(c) => Arc::new(ConfluentRegistry::new(c.clone()).map_err(anyhow::Error::msg)?),
        RegistryProfile::File(_) => Arc::new(FileRegistry::open(profile.registry_path().expect("file registry has a path"))?),
    })
}

/// Opens the profile's store, as both contracts it serves; ClickHouse is
/// migrated first when configured.
pub async fn open_store(profile: &Profile) -> anyhow::Result<(Arc<dyn AtomStore>, Arc<dyn InferenceStore>, Arc<dyn RequestLookup>)> {
    Ok(match &profile.store {
        StoreProfile::Embedded(_) => {
            let dir = profile.data_dir();
            crate::config::create_private_dir(dir).map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))?;
            let store = Arc::new(EmbeddedStore::open(dir)?);
            (store.clone(), store.clone(), store)
        }
        // `connect` applies the DDL itself when `migrate_on_start` is set.
        StoreProfile::Clickhouse(c) => {
            let store = Arc::new(ClickHouseStore::connect(c.clone()).await?);
            (store.clone(), store.clone(), store)
        }
    })
}

/// Runs a topology against Kafka until `shutdown` completes, then drains and
/// commits what finished.
///
/// With `listen` on, `/metrics`, `/health` and `/ready` are served there for
/// the whole run; an address that cannot be bound stops the run before it
/// joins the group.
pub async fn run_kafka(
    profile: &Profile,
    spec: &TopologySpec,
    listen: crate::ops::Listen,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<Summary> {
    run_kafka_with(profile, spec, listen, Until::Shutdown, shutdown, |c| c, |_| {}).await
}

/// [`run_kafka`], ending at `until`, with the Kafka consumer wrapped by
/// `wrap` (a sandbox replay bounds it to a range); `observe` gets the run's
/// metrics before it starts (a progress bar reads them).
pub async fn run_kafka_with<C: crate::log::LogConsumer>(
    profile: &Profile,
    spec: &TopologySpec,
    listen: crate::ops::Listen,
    until: Until,
    shutdown: impl std::future::Future<Output = ()> + Send,
    wrap: impl FnOnce(KafkaConsumer) -> C,
    observe: impl FnOnce(Arc<Metrics>),
) -> anyhow::Result<Summary> {
    let LogProfile::Kafka(kafka) = &profile.log else {
        anyhow::bail!("this profile's log is not Kafka; `run` without --input needs `[log] kind = \"kafka\"`");
    };
    let clock = crate::clock::system();
    let metrics = Arc::new(Metrics::new(&spec.name));
    let breakers = crate::resilience::Breakers::default();
    // `/requests/{id}` answers once the store is open; the other endpoints
    // from the start, so that a processor still connecting is visible.
    let requests = crate::ops::Requests::default();
    let ops = match listen {
        crate::ops::Listen::Off => None,
        crate::ops::Listen::On(addr) => {
            let exporter = Arc::new(crate::ops::Exporter { metrics: metrics.clone(), breakers: breakers.clone(), group: spec.group(), clock: clock.clone() });
            let (_, task) = crate::ops::serve(addr, exporter, requests.clone()).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {addr} for /metrics, /health, /ready and /requests: {e}; choose another address with `--listen HOST:PORT` (or HARTONOMOUS_LISTEN), or turn them off with `--listen off`")
            })?;
            Some(task)
        }
    };
    let registry = open_registry(profile, &spec.source.topic, &spec.source.schema).await?;
    let (store, inference, lookup) = open_store(profile).await?;
    requests.set(lookup);
    let embedder = build_embedder(&profile.embedder, clock.clone())?;
    if kafka.create_topics {
        let mut topics = vec![(spec.source.topic.clone(), spec.source.partitions), (spec.dead_letter.topic.clone(), spec.source.partitions)];
        for (topic, _schema) in spec.topology()?.outputs(spec) {
            topics.push((topic, spec.source.partitions));
        }
        let topics: Vec<(&str, i32)> = topics.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        ensure_topics(kafka, &topics).await?;
    }
    let deps = Deps {
        producer: Arc::new(KafkaProducer::new(kafka)?),
        registry,
        store,
        inference,
        scan: Arc::new(KafkaScanner::new(kafka)),
        embedder,
        clock,
        metrics: metrics.clone(),
        breakers,
        cassette: None,
    };
    let consumer = wrap(KafkaConsumer::new(kafka, &spec.group(), &[spec.source.topic.as_str()])?);
    observe(metrics.clone());
    let report = topology::run(spec, &deps, consumer, until, shutdown).await;
    if let Some(task) = ops {
        task.abort();
    }
    Ok(Summary::new(&spec.name, &metrics, report?))
}

pub fn build_embedder(profile: &EmbedderProfile, clock: SharedClock) -> anyhow::Result<Arc<dyn Embedder>> {
    Ok(match profile {
        EmbedderProfile::Hashing(h) => Arc::new(HashingEmbedder::new(h.dimension, h.max_batch)),
        EmbedderProfile::Openai(o) => Arc::new(OpenAiEmbedder::new(o.clone(), clock).map_err(anyhow::Error::msg)?),
    })
}
