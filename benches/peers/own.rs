//! Hartonomous' row: the atom-ingestion topology as `hartonomous run` runs
//! it (the bundled declaration, its default windows and limits), reading the
//! bench's topic into the row's database and output topic.

use std::path::Path;

use hartonomous::config::{EmbedderProfile, FileRegistryProfile, HashingProfile, LogProfile, Profile, RegistryProfile, StoreProfile};
use hartonomous::log::kafka::KafkaConfig;
use hartonomous::store::clickhouse::ClickHouseConfig;
use hartonomous::topology::spec::TopologySpec;

use super::Args;
use super::work::DIMENSION;

/// The bundled declaration on the bench's topics, and a profile for the
/// test services.
fn setup(args: &Args) -> (Profile, TopologySpec) {
    let text = hartonomous::topology::TOPOLOGIES[0]
        .declaration()
        .replace("\"atoms.ingest.dlq\"", &format!("\"{}.dlq\"", args.out_topic))
        .replace("\"atoms.ingested\"", &format!("\"{}\"", args.out_topic))
        .replace("\"atoms.ingest\"", &format!("\"{}\"", args.topic));
    let mut spec = TopologySpec::parse(Path::new("peers"), &text).unwrap();
    spec.source.group = Some(args.group.clone());
    // Experiments: HARTONOMOUS_PEERS_WINDOW=records, HARTONOMOUS_PEERS_WINDOW_AGE_MS=ms,
    // HARTONOMOUS_PEERS_IN_FLIGHT=records.
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    if let Some(w) = env("HARTONOMOUS_PEERS_WINDOW") {
        spec.window.max_records = w;
        spec.window.max_bytes = spec.window.max_bytes.max(w * 2048);
    }
    if let Some(ms) = env("HARTONOMOUS_PEERS_WINDOW_AGE_MS") {
        spec.window.max_age_ms = ms as u64;
    }
    if let Some(n) = env("HARTONOMOUS_PEERS_IN_FLIGHT") {
        spec.limits.in_flight_records = n;
        spec.limits.in_flight_bytes = spec.limits.in_flight_bytes.max(n * 4096);
    }
    let mut kafka = KafkaConfig::new(args.kafka.clone());
    kafka.session_timeout_ms = 6000;
    kafka.heartbeat_interval_ms = 500;
    kafka.create_topics = true;
    // Experiments (this row only): HARTONOMOUS_PEERS_LINGER=ms (the
    // producer's linger.ms), HARTONOMOUS_PEERS_QUEUED_KB=kB (the consumer's
    // prefetch, queued.max.messages.kbytes), HARTONOMOUS_PEERS_FETCH_WAIT_MS=ms
    // (the consumer's fetch.wait.max.ms).
    for (name, key) in [
        ("HARTONOMOUS_PEERS_LINGER", "linger.ms"),
        ("HARTONOMOUS_PEERS_QUEUED_KB", "queued.max.messages.kbytes"),
        ("HARTONOMOUS_PEERS_FETCH_WAIT_MS", "fetch.wait.max.ms"),
    ] {
        if let Ok(v) = std::env::var(name) {
            kafka.properties.insert(key.to_string(), v);
        }
    }
    let mut store = ClickHouseConfig::new(args.clickhouse.clone(), args.database.clone());
    store.migrate_on_start = true;
    let profile = Profile {
        data_dir: args.registry.parent().unwrap().to_path_buf(),
        log: LogProfile::Kafka(kafka),
        store: StoreProfile::Clickhouse(store),
        registry: RegistryProfile::File(FileRegistryProfile { path: Some(args.registry.clone()) }),
        embedder: EmbedderProfile::Hashing(HashingProfile { dimension: DIMENSION, max_batch: 256 }),
    };
    (profile, spec)
}

/// Runs until the process is killed.
pub async fn run(args: &Args) {
    let (profile, spec) = setup(args);
    let listen = args.listen.map_or(hartonomous::ops::Listen::Off, hartonomous::ops::Listen::On);
    hartonomous::app::run_kafka(&profile, &spec, listen, std::future::pending()).await.unwrap();
}

/// The latency row: the topology runs caught up on an empty topic, then
/// `args.n` requests arrive at `rate` per second (paced every 10 ms); it
/// prints the quantiles of `hartonomous_record_end_to_end_seconds` over
/// them (from each request's timestamp, set when it was produced, to the
/// acknowledgement of its row and its event), as `LATENCY p50 p99 max`
/// (bucket bounds, seconds) after checking that every one was stored and
/// answered.
pub async fn latency(args: &Args, rate: f64) {
    use hartonomous::flow::Metrics;
    use hartonomous::flow::metrics::E2E_BUCKETS;
    use hartonomous::topology::atom_ingestion::counters;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let (profile, spec) = setup(args);
    let seen: Arc<Mutex<Option<Arc<Metrics>>>> = Arc::default();
    let slot = seen.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        hartonomous::app::run_kafka_with(
            &profile,
            &spec,
            hartonomous::ops::Listen::Off,
            hartonomous::flow::runner::Until::Shutdown,
            async move {
                let _ = stopped.await;
            },
            |c| c,
            move |m| *slot.lock().unwrap() = Some(m),
        )
        .await
    });
    let producer = super::Producer::new(args);
    let metrics = loop {
        if let Some(m) = seen.lock().unwrap().clone() {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let done = |m: &Metrics| Metrics::get(&m.records_done);
    // Warm up: one request through, so the group join is not measured.
    producer.send(u64::MAX as usize).await;
    let waited = Instant::now();
    while done(&metrics) < 1 {
        assert!(waited.elapsed() < Duration::from_secs(120), "the warm-up request was not processed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = metrics.end_to_end();
    let started = Instant::now();
    let mut sends = futures::stream::FuturesUnordered::new();
    for i in 0..args.n {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        if due > Instant::now() + Duration::from_millis(10) {
            // Deliveries are awaited while waiting for the next tick.
            let _ = tokio::time::timeout_at(due.into(), async {
                while futures::StreamExt::next(&mut sends).await.is_some() {}
                std::future::pending::<()>().await
            })
            .await;
        }
        sends.push(producer.send(i));
    }
    while futures::StreamExt::next(&mut sends).await.is_some() {}
    let sent_in = started.elapsed();
    while done(&metrics) < args.n as u64 + 1 {
        assert!(started.elapsed() < Duration::from_secs(600), "{} of {} processed", done(&metrics), args.n + 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = metrics.end_to_end();
    let mut t = after.clone();
    for (b, was) in t.buckets.iter_mut().zip(before.buckets.iter().chain(std::iter::repeat(&0))) {
        *b -= was;
    }
    t.count -= before.count;
    // Where a window's time goes at this rate (means over the whole run).
    let stages: Vec<String> = metrics
        .stages()
        .iter()
        .map(|(stage, s)| format!("{stage} {:.0} ms × {}", 1000.0 * s.latency.sum / s.latency.count.max(1) as f64, s.latency.count))
        .collect();
    eprintln!("peers: latency, mean time per window: {}", stages.join(", "));
    stop.send(()).unwrap();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.count(counters::ATOMS_STORED), args.n as u64 + 1, "{}", summary.render());
    assert_eq!(summary.count(counters::EVENTS_PUBLISHED), args.n as u64 + 1, "{}", summary.render());
    let q = |q| t.quantile_bound(&E2E_BUCKETS, q).map_or("over 300".to_string(), |b| format!("{b}"));
    println!("LATENCY {} {} {} {:.0}", q(0.5), q(0.99), q(1.0), args.n as f64 / sent_in.as_secs_f64());
}
