//! Atom-ingestion throughput, in records per second, each bench next to the
//! raw ceiling it is bounded by, measured in the same run (the machine is
//! small and noisy, so absolute numbers only mean something beside their
//! ceilings).
//!
//! # Benches
//!
//! Group `per_record` (N = 10 000 records of ~1 KiB text, ~10 % of them repeat
//! an earlier record's content, all Avro in the Confluent wire format, written
//! with the bundled `AtomIngestionRequest` schema registered in a
//! `FileRegistry`; single thread, no runtime):
//! - `decode`: `avro::decoder::Decoder::decode`, one decoder for the run as
//!   the decode stage has (split the header, the writer schema's checks and
//!   one-pass program once per schema id, decode, resolve to the reader
//!   schema) + `FromAvro::from_avro` (the value → the request, as the stage);
//! - `decode_hash`: the same + `ContentHash::of` (SHA-256 of the content);
//! - `decode_hash_dedup`: the same + the dedup stage's in-memory checks per
//!   500-record window (an in-window `HashSet`, then the admission `ledger`), as
//!   `dedup::Dedup` does them; the store look-up is not included;
//! - `sha256_only`: `ContentHash::of` over the same contents, nothing else;
//! - `embed_hashing_384`: the built-in hashing embedder (384 dimensions) over
//!   the same contents, nothing else;
//! - `event_encode_value` / `event_encode_direct`: one `AtomIngested` event
//!   per record framed for the output topic, the old way (`to_value`,
//!   `resolve`, `wire::encode`) and the `topology::emit::Emitter`'s, which
//!   every topology's events take (`wire::encode_ser`).
//!
//! Group `embedded_topology` (N = 5 000 unique records of ~1 KiB text):
//! - `atom_ingestion`: the whole bundled `atom-ingestion` topology (decode →
//!   validate → hash → dedup → embed → persist → publish, then dead letters
//!   and commits) on the embedded default, through `app::Embedded::run_to_end`
//!   exactly as `hartonomous run` does: framed wire records appended to the
//!   in-process log, hashing embedder with dimension 384, Parquet store in a
//!   fresh temporary data directory per iteration (directory creation,
//!   `Embedded::open` and schema registration are set-up and not timed;
//!   removing the directory is not timed either). The timed part includes the
//!   run's drain at the end (the source loop's last poll waits up to 100 ms);
//! - `raw_consume`: the log ceiling: append the same N records to a fresh
//!   `EmbeddedLog` (3 partitions) and drain them with an `EmbeddedConsumer`
//!   through `LogConsumer::poll`, 500 at a time, with no processing;
//! - `raw_insert`: the store ceiling: insert N equivalent `AtomRow`s (same
//!   content, 384-dim embeddings) into a fresh `EmbeddedStore` with
//!   `AtomStore::insert_atoms`, in batches of 500 (the window size).
//!
//! # Running
//!
//! ```text
//! export CARGO_TARGET_DIR=/root/.cache/hartonomous/target
//! cargo bench --bench ingest             # release build, full measurement
//! cargo bench --bench ingest -- per_record   # one group (criterion filter)
//! cargo test  --bench ingest             # smoke test: each bench runs once
//! ```
//!
//! `cargo test --bench ingest` (and `cargo test --all-targets`) runs every
//! benchmark once, unoptimised, with smaller inputs (1 000 and 500 records)
//! so that it takes seconds, and asserts that the pipeline did its job (every
//! record decoded and equal to what was encoded, every unique atom stored,
//! nothing dead-lettered, every event published). The same assertions run in
//! `cargo bench` too; they are checks of results, never of timings.
//!
//! # Reading the numbers
//!
//! Every bench sets `Throughput::Elements(N)`, so criterion's `thrpt` line is
//! in elem/s = records/s. The machine has 2 cores. `per_record` runs on one
//! thread, so its records/s are per core. The topology runs on a tokio
//! multi-thread runtime with 2 worker threads (stages are separate tasks and
//! the store does some work on blocking threads), so it uses up to both
//! cores: records/s per core is at best the value / 2, and it is honest to
//! quote it that way. `raw_consume` runs on one thread; `raw_insert` awaits
//! each insert in turn but the store may use blocking threads. Compare
//! `atom_ingestion` with min(`raw_consume`, `raw_insert`): that ratio is how
//! close the topology gets to its slowest ceiling.

use std::collections::{BTreeMap, HashSet};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tempfile::TempDir;

use hartonomous::topology::atom_ingestion::counters;
use hartonomous::app::{Embedded, Summary};
use apache_avro::writer::datum::GenericDatumWriter;
use hartonomous::atom::{ArrivalOutcome, AtomIngested, AtomIngestionRequest, AtomRow, ContentHash};
use hartonomous::avro::decoder::Decoder;
use hartonomous::avro::{self, FileRegistry, Schemas};
use hartonomous::clock;
use hartonomous::config::{EMBEDDED_PROFILE, EmbedderProfile, Profile};
use hartonomous::embed::Embedder;
use hartonomous::embed::hashing::HashingEmbedder;
use hartonomous::log::LogConsumer;
use hartonomous::log::embedded::EmbeddedLog;
use hartonomous::record::{Headers, OutgoingRecord};
use hartonomous::store::AtomStore;
use hartonomous::store::embedded::EmbeddedStore;
use hartonomous::topology::atom_ingestion::ledger;
use hartonomous::topology::decode::FromAvro;
use hartonomous::topology::{self, spec::TopologySpec};

/// Records in the `per_record` group (bench mode).
const PER_RECORD_N: usize = 10_000;
/// Records in the `embedded_topology` group (bench mode).
/// Several windows, so the stages overlap as they do in a long run.
const TOPOLOGY_N: usize = 20_000;
/// Embedding dimension of the hashing embedder.
const DIMENSION: usize = 384;
/// The bundled topology's window size (`[window] max_records`), used for the
/// dedup windows and the raw insert batches.
const WINDOW: usize = 5_000;
/// `recent_capacity` of the bundled topology's dedup stage.
const RECENT_CAPACITY: usize = 100_000;

/// Criterion runs benchmarks once each ("test mode") unless the binary got
/// `--bench` without `--test`, which is what `cargo bench` passes. The same
/// rule as criterion's own, so test runs can use small inputs.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

fn sizes() -> (usize, usize) {
    if test_mode() {
        return (1_000, 500);
    }
    // HARTONOMOUS_INGEST_TOPOLOGY_RECORDS: more records than one window
    // (5,000), so that the stages overlap as they do on a stream.
    let topology_n = std::env::var("HARTONOMOUS_INGEST_TOPOLOGY_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(TOPOLOGY_N);
    (PER_RECORD_N, topology_n)
}

// ---------------------------------------------------------------------------
// Input data
// ---------------------------------------------------------------------------

/// SplitMix64: a deterministic generator, so every run measures the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "this", "are", "from", "or",
    "have", "an", "which", "not", "at", "but", "we", "can", "all", "their", "has", "been", "data", "stream", "record", "partition",
    "offset", "schema", "registry", "window", "batch", "latency", "throughput", "consumer", "producer", "broker", "replica", "leader",
    "commit", "atom", "content", "hash", "embedding", "vector", "model", "dimension", "token", "query", "table", "column", "parquet",
    "cluster", "shard", "index", "retention", "compaction", "snapshot", "checkpoint", "watermark", "event", "time", "processing",
    "pipeline", "stage", "operator", "backpressure", "buffer", "memory", "disk", "network", "request", "response", "timeout", "retry",
    "circuit", "breaker", "failure", "recovery", "idempotent", "exactly", "once", "delivery", "ordering", "guarantee", "customer",
    "invoice", "shipment", "warehouse", "report", "quarterly", "revenue", "forecast", "analysis", "summary", "meeting", "notes",
    "decision", "action", "owner", "deadline", "review", "approved", "rejected", "pending", "incident", "postmortem", "root", "cause",
];

const SOURCES: &[&str] = &["crm", "wiki", "ticketing", "mail-archive", "docs-site"];

/// About 1 KiB (900..1150 bytes) of word-salad English; unique by its first line.
fn text(i: usize, rng: &mut Rng) -> String {
    let target = 900 + rng.below(250);
    let mut s = format!("Document {i} from the benchmark corpus.\n");
    let mut in_sentence = 0;
    while s.len() < target {
        let w = WORDS[rng.below(WORDS.len())];
        if in_sentence == 0 {
            let mut c = w.chars();
            s.extend(c.next().map(|f| f.to_ascii_uppercase()));
            s.push_str(c.as_str());
        } else {
            s.push_str(w);
        }
        in_sentence += 1;
        if in_sentence > 6 && rng.below(8) == 0 {
            s.push_str(". ");
            in_sentence = 0;
        } else {
            s.push(' ');
        }
    }
    s.push('.');
    s
}

/// `n` requests; with `repeat_every = Some(k)`, every k-th request repeats the
/// content of an earlier one (some in the same 500-record window, most in an
/// earlier one). Returns the requests and how many distinct contents they hold.
fn requests(n: usize, repeat_every: Option<usize>) -> (Vec<AtomIngestionRequest>, usize) {
    let mut rng = Rng(0x4854_524e); // "HTRN"
    let mut out: Vec<AtomIngestionRequest> = Vec::with_capacity(n);
    for i in 0..n {
        let repeat = repeat_every.is_some_and(|k| i % k == k - 1);
        let content = if repeat {
            let back = 1 + rng.below(i.min(2_000));
            out[i - back].content.clone()
        } else {
            text(i, &mut rng).into_bytes()
        };
        let source = SOURCES[rng.below(SOURCES.len())];
        out.push(AtomIngestionRequest {
            content_type: "text/plain".into(),
            content,
            metadata: BTreeMap::from([
                ("lang".to_string(), "en".to_string()),
                ("doc".to_string(), format!("{source}/doc-{}", rng.below(100_000))),
            ]),
            source_system: source.into(),
            correlation_id: format!("bench-{i:06}"),
            created_at_ms: Some(1_750_000_000_000 + i as i64),
        });
    }
    let unique = out.iter().map(|r| ContentHash::of(&r.content)).collect::<HashSet<_>>().len();
    (out, unique)
}

/// Requests encoded as they arrive from Kafka: framed records whose payload
/// is Avro in the Confluent wire format, keyed by correlation id (what
/// `hartonomous produce` writes).
struct Corpus {
    requests: Vec<AtomIngestionRequest>,
    unique: usize,
    records: Vec<OutgoingRecord>,
    /// Id of the current `AtomIngestionRequest` under `<topic>-value`.
    schema_id: u32,
    registry: Arc<FileRegistry>,
    _dir: TempDir,
}

fn register(registry: &FileRegistry, topic: &str) -> u32 {
    let current = Schemas::current(avro::ATOM_INGESTION_REQUEST).expect("bundled schema");
    registry
        .register_bundled(&[(topic, avro::ATOM_INGESTION_REQUEST)])
        .expect("register bundled schemas")
        .into_iter()
        .find(|r| r.bundle_version == current.version)
        .expect("current version registered")
        .id
}

fn corpus(n: usize, repeat_every: Option<usize>, topic: &str) -> Corpus {
    let (requests, unique) = requests(n, repeat_every);
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = FileRegistry::open(dir.path().join("registry.json")).expect("open registry");
    let schema_id = register(&registry, topic);
    let schema = &Schemas::current(avro::ATOM_INGESTION_REQUEST).unwrap().schema;
    let records = requests
        .iter()
        .map(|req| {
            let value = apache_avro::to_value(req).expect("to avro value").resolve(schema).expect("resolve to schema");
            OutgoingRecord {
                topic: topic.to_string(),
                partition: None,
                key: Some(req.correlation_id.clone().into_bytes()),
                payload: avro::encode(schema_id, schema, &value).expect("encode"),
                headers: Headers::new(),
                event_time_ms: None,
            }
        })
        .collect();
    Corpus { requests, unique, records, schema_id, registry: Arc::new(registry), _dir: dir }
}

// ---------------------------------------------------------------------------
// Group `per_record`
// ---------------------------------------------------------------------------

fn decode_one(decoder: &Decoder, payload: &[u8]) -> AtomIngestionRequest {
    // FileRegistry answers from memory with a ready future, so polling it on
    // the current thread measures the decode, not a runtime.
    let (_, value) = futures::executor::block_on(decoder.decode(payload)).expect("decode");
    AtomIngestionRequest::from_avro(value).expect("from_avro")
}

fn per_record(c: &mut Criterion) {
    let (n, _) = sizes();
    let spec = topology::bundled("atom-ingestion").expect("bundled topology");
    let corpus = corpus(n, Some(10), &spec.source.topic);
    let reader = Schemas::current(&spec.source.schema).expect("reader schema").schema.clone();
    // As the decode stage: one decoder, its verdict per writer schema id kept.
    let decoder = Decoder::new(corpus.registry.clone(), reader);
    let payloads: Vec<&[u8]> = corpus.records.iter().map(|r| r.payload.as_slice()).collect();
    let contents: Vec<&[u8]> = corpus.requests.iter().map(|r| r.content.as_slice()).collect();

    // Once, untimed: what is measured decodes to exactly what was encoded.
    for (p, req) in payloads.iter().zip(&corpus.requests) {
        assert_eq!(&decode_one(&decoder, p), req);
    }
    let mean = contents.iter().map(|c| c.len()).sum::<usize>() / n;
    assert!((900..=1200).contains(&mean), "mean content size {mean}");
    let mean_payload = payloads.iter().map(|p| p.len()).sum::<usize>() / n;
    eprintln!(
        "per_record: {n} records, mean content {mean} B, mean wire payload {mean_payload} B, {} unique contents, schema id {}",
        corpus.unique, corpus.schema_id
    );

    let mut g = c.benchmark_group("per_record");
    g.throughput(Throughput::Elements(n as u64));
    // One iteration is 10-50 ms; flat sampling keeps the group within its time budget.
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));

    let total_bytes: usize = contents.iter().map(|c| c.len()).sum();
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut bytes = 0usize;
            for p in &payloads {
                bytes += decode_one(&decoder, black_box(p)).content.len();
            }
            assert_eq!(bytes, total_bytes);
            bytes
        })
    });

    g.bench_function("decode_hash", |b| {
        b.iter(|| {
            let mut hashes = Vec::with_capacity(n);
            for p in &payloads {
                let req = decode_one(&decoder, black_box(p));
                hashes.push(ContentHash::of(&req.content));
            }
            assert_eq!(hashes.len(), n);
            hashes
        })
    });

    g.bench_function("decode_hash_dedup", |b| {
        b.iter(|| {
            let mut recent = ledger::Ledger::new(RECENT_CAPACITY);
            let (mut admitted, mut in_window, mut in_recent) = (0usize, 0usize, 0usize);
            for window in payloads.chunks(WINDOW) {
                let hashed: Vec<(AtomIngestionRequest, ContentHash)> = window
                    .iter()
                    .map(|p| {
                        let req = decode_one(&decoder, black_box(p));
                        let h = ContentHash::of(&req.content);
                        (req, h)
                    })
                    .collect();
                // As dedup::Dedup::process: within the window, then recently admitted.
                let mut seen = HashSet::with_capacity(hashed.len());
                for (req, h) in &hashed {
                    if !seen.insert(*h) {
                        in_window += 1;
                    } else if recent.is_admitted(h) {
                        in_recent += 1;
                    } else {
                        recent.admit(*h);
                        admitted += 1;
                        black_box(req);
                    }
                }
            }
            assert_eq!(admitted, corpus.unique, "admitted {admitted}, in window {in_window}, recent {in_recent}");
            assert_eq!(admitted + in_window + in_recent, n);
            admitted
        })
    });

    g.bench_function("sha256_only", |b| {
        b.iter(|| {
            let mut acc = 0u8;
            for c in &contents {
                acc ^= ContentHash::of(black_box(c)).0[0];
            }
            acc
        })
    });

    // The publish stage's encoding of each request's answer.
    let event_schema = Schemas::current("AtomIngested").expect("event schema").schema.clone();
    let events: Vec<AtomIngested> = corpus
        .requests
        .iter()
        .enumerate()
        .map(|(i, req)| AtomIngested {
            content_hash: ContentHash::of(&req.content).to_hex(),
            content_type: req.content_type.clone(),
            content_size: req.content.len() as i64,
            source_system: req.source_system.clone(),
            correlation_id: req.correlation_id.clone(),
            embedding_model: "hashing-v1-d384".into(),
            embedding_dimension: 384,
            source_topic: spec.source.topic.clone(),
            source_partition: (i % 3) as i32,
            source_offset: i as i64,
            ingested_at_ms: 1_796_000_000_000 + i as i64,
            outcome: ArrivalOutcome::Created,
        })
        .collect();
    g.bench_function("event_encode_value", |b| {
        b.iter(|| {
            let mut bytes = 0usize;
            for e in &events {
                let value = apache_avro::to_value(black_box(e)).unwrap().resolve(&event_schema).unwrap();
                bytes += avro::wire::encode(1, &event_schema, &value).unwrap().len();
            }
            bytes
        })
    });
    g.bench_function("event_encode_direct", |b| {
        b.iter(|| {
            let writer = GenericDatumWriter::builder(&event_schema).build().unwrap();
            let mut bytes = 0usize;
            for e in &events {
                bytes += avro::wire::encode_ser(1, &writer, black_box(e)).unwrap().len();
            }
            bytes
        })
    });

    let embedder = hartonomous::embed::hashing::HashingEmbedder::new(384, 256);
    let texts: Vec<String> = contents.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    g.bench_function("embed_hashing_384", |b| {
        b.iter(|| {
            let mut acc = 0.0f32;
            for t in &texts {
                acc += embedder.embed_one(black_box(t))[0];
            }
            acc
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// Group `embedded_topology`
// ---------------------------------------------------------------------------

/// The built-in embedded profile (`connectors/embedded.toml`), as users run
/// it, with its data directory and embedder pinned through the documented
/// environment overrides (passed explicitly: the process environment is not read).
fn profile(data_dir: &Path) -> Profile {
    let env = [
        ("HARTONOMOUS_DATA_DIR".to_string(), format!("{:?}", data_dir.display().to_string())),
        ("HARTONOMOUS__EMBEDDER__KIND".to_string(), "\"hashing\"".to_string()),
        ("HARTONOMOUS__EMBEDDER__DIMENSION".to_string(), DIMENSION.to_string()),
        ("HARTONOMOUS__EMBEDDER__MAX_BATCH".to_string(), "256".to_string()),
    ];
    let profile = Profile::parse(Path::new("connectors/embedded.toml (built in)"), EMBEDDED_PROFILE, env.into_iter()).expect("embedded profile");
    assert_eq!(profile.data_dir(), data_dir);
    assert!(matches!(&profile.embedder, EmbedderProfile::Hashing(h) if h.dimension == DIMENSION), "{:?}", profile.embedder);
    profile
}

/// One topology run's input: a fresh embedded default in its own directory.
struct Fresh {
    dir: TempDir,
    app: Embedded,
    records: Vec<OutgoingRecord>,
}

fn check_summary(s: &Summary, n: usize) {
    let n = n as u64;
    assert_eq!(s.records_in, n, "{}", s.render());
    assert_eq!(s.count(counters::ATOMS_STORED), n, "{}", s.render());
    assert_eq!(s.dead_lettered, 0, "{}", s.render());
    assert_eq!(counters::duplicates_matched(&s), 0, "{}", s.render());
    assert_eq!(s.count(counters::EMBEDDED_TEXTS), n, "{}", s.render());
    assert_eq!(s.count(counters::EVENTS_PUBLISHED), n, "{}", s.render());
}

fn embedded_topology(c: &mut Criterion) {
    let (_, n) = sizes();
    let spec: TopologySpec = topology::bundled("atom-ingestion").expect("bundled topology");
    let topic = spec.source.topic.clone();
    let corpus = corpus(n, None, &topic);
    assert_eq!(corpus.unique, n, "all contents unique");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");

    // Rows as persist would write them, for the store ceiling.
    let embedder = HashingEmbedder::new(DIMENSION, 256);
    let now = clock::system().now_ms();
    let rows: Vec<AtomRow> = corpus
        .requests
        .iter()
        .enumerate()
        .map(|(i, req)| AtomRow {
            content_hash: ContentHash::of(&req.content),
            content_type: req.content_type.clone(),
            content: req.content.clone(),
            source_system: req.source_system.clone(),
            correlation_id: req.correlation_id.clone(),
            metadata_json: serde_json::to_string(&req.metadata).unwrap(),
            embedding: embedder.embed_one(std::str::from_utf8(&req.content).unwrap()),
            embedding_model: embedder.model().to_string(),
            event_time_ms: req.created_at_ms.unwrap(),
            source_topic: topic.clone(),
            source_partition: (i % spec.source.partitions as usize) as i32,
            source_offset: (i / spec.source.partitions as usize) as i64,
            ingested_at_ms: now,
            trace_id: String::new(),
        })
        .collect();

    let mut g = c.benchmark_group("embedded_topology");
    g.throughput(Throughput::Elements(n as u64));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));

    g.bench_function("atom_ingestion", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let app = Embedded::open(&profile(&dir.path().join("data")), clock::system()).expect("Embedded::open");
                // Registration order is fixed, so a fresh registry gives the
                // ids the corpus was encoded with; check rather than assume.
                assert_eq!(register(&app.registry, &topic), corpus.schema_id);
                Fresh { dir, app, records: corpus.records.clone() }
            },
            |f| {
                let summary = rt.block_on(f.app.run_to_end(&spec, f.records)).expect("run_to_end");
                check_summary(&summary, n);
                assert_eq!(f.app.store.atom_count(), n);
                // Returned so that closing the store and removing the
                // directory happen after the clock stops.
                (summary, f.app, f.dir)
            },
            BatchSize::PerIteration,
        )
    });

    g.bench_function("raw_consume", |b| {
        b.iter_batched(
            || corpus.records.clone(),
            |records| {
                let log = EmbeddedLog::new(clock::system());
                log.create_topic(&topic, spec.source.partitions);
                for r in records {
                    log.append(r);
                }
                let mut consumer = log.consumer(&spec.group(), &[topic.as_str()]);
                let got = rt.block_on(async {
                    let mut got = 0usize;
                    let mut bytes = 0usize;
                    while got < n {
                        let batch = consumer.poll(WINDOW, Duration::ZERO).await.expect("poll");
                        assert!(!batch.is_empty(), "log ran dry after {got} of {n} records");
                        got += batch.len();
                        bytes += batch.iter().map(|r| r.byte_len()).sum::<usize>();
                    }
                    black_box(bytes);
                    got
                });
                assert_eq!(got, n);
                log
            },
            BatchSize::PerIteration,
        )
    });

    g.bench_function("raw_insert", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = EmbeddedStore::open(dir.path()).expect("EmbeddedStore::open");
                (dir, store, rows.clone())
            },
            |(dir, store, rows)| {
                let inserted = rt.block_on(async {
                    let mut inserted = 0usize;
                    for chunk in rows.chunks(WINDOW) {
                        inserted += store.insert_atoms(chunk).await.expect("insert_atoms").inserted;
                    }
                    inserted
                });
                assert_eq!(inserted, n);
                assert_eq!(store.atom_count(), n);
                (store, rows, dir)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    drop(rt);
}

criterion_group!(benches, per_record, embedded_topology);
criterion_main!(benches);
