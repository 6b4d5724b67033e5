//! The `hartonomous` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use hartonomous::app::Embedded;
use hartonomous::avro::{self, Schemas};
use hartonomous::clock;
use hartonomous::avro::FileRegistry;
use hartonomous::config::{LogProfile, Profile, StoreProfile};
use hartonomous::log::LogProducer;
use hartonomous::store::clickhouse::ClickHouseStore;
use hartonomous::topology;

/// Sample requests for `demo`: distinct texts, repeats and malformed records.
const DEMO_INPUT: &[u8] = include_bytes!("../tests/data/demo-atoms.jsonl");
/// Sample requests for the ensemble-inference half of `demo`.
const DEMO_INFERENCE: &[u8] = include_bytes!("../tests/data/demo-inference.jsonl");
const DEMO_INFERENCE_QUERIES: &[&str] = &[
    "SELECT correlation_id, status, aggregation, label, round(score, 3) AS score, models_counted AS counted, late_outputs AS late FROM inference_results_live ORDER BY correlation_id",
    "SELECT correlation_id, model_id, sequence, label, round(score, 3) AS score, counted, late, coalesced FROM model_outputs_live WHERE correlation_id IN ('demo-1', 'demo-5', 'demo-7') ORDER BY correlation_id, sequence",
];
const DEMO_QUERY: &str = "SELECT source_system, count(*) AS atoms, sum(content_size) AS bytes FROM atoms GROUP BY source_system ORDER BY atoms DESC, source_system";

#[derive(Parser)]
#[command(name = "hartonomous", version, about = "Kafka/Avro stream processing into ClickHouse, with an embedded default that needs no servers")]
struct Cli {
    /// Connection profile (TOML). Default: the built-in embedded profile, as in connectors/embedded.toml.
    #[arg(long, global = true, env = "HARTONOMOUS_CONNECTORS")]
    connectors: Option<PathBuf>,
    /// Log lines on stderr: `human` (coloured on a terminal only) or `json`
    /// (one object per line: timestamp, level, target, fields, spans), for
    /// log shippers. The level comes from RUST_LOG (default: warn).
    #[arg(long, global = true, env = "HARTONOMOUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Export spans (a `batch` span per window, a `stage` span per stage call)
    /// over OTLP/HTTP to this collector URL, e.g. http://127.0.0.1:4318/v1/traces.
    /// Off unless this or OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set.
    #[arg(long, global = true, env = "HARTONOMOUS_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnMissing {
    Fail,
    Call,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run both topologies (atom ingestion, ensemble inference with its compensation) over
    /// bundled sample data on the embedded default and print what they did.
    Demo,
    /// Run a topology: over an input file on the embedded log until it is drained,
    /// or, without --input, against Kafka until SIGINT/SIGTERM (then drain and commit).
    Run {
        /// A bundled topology's name (`hartonomous topology list`), or the path
        /// of a declaration file, e.g. an edited copy of topologies/atom-ingestion.toml.
        #[arg(long, default_value = "atom-ingestion", value_name = "NAME|FILE")]
        topology: String,
        /// JSON lines, or framed wire records written by `produce --output` (embedded log only).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Where to serve /metrics (Prometheus), /health and /ready while running
        /// against Kafka: HOST:PORT (port 0 picks a free one), or `off`.
        #[arg(long, env = "HARTONOMOUS_LISTEN", default_value = hartonomous::ops::DEFAULT_LISTEN, value_name = "HOST:PORT|off")]
        listen: hartonomous::ops::Listen,
    },
    /// Record a range of a Kafka topic to an Avro container file: every record
    /// with its partition, offset, timestamp, key and headers, bytes unchanged,
    /// and the writer schema of each registry id the values name, so that
    /// `replay --input` runs it anywhere. Reads only: joins no group, commits nothing.
    Record {
        #[arg(long)]
        topic: String,
        /// Only this partition (repeatable). Default: every partition.
        #[arg(long)]
        partition: Vec<i32>,
        /// Where to start: an offset, or a time (RFC 3339 such as
        /// 2026-12-01T10:00:00Z, or ms:EPOCH_MILLIS). Default: each partition's start.
        #[arg(long, value_name = "OFFSET|TIME")]
        from: Option<hartonomous::log::kafka::Bound>,
        /// Where to stop (exclusive): an offset or a time. Default: the records
        /// stamped before the command started.
        #[arg(long, value_name = "OFFSET|TIME")]
        to: Option<hartonomous::log::kafka::Bound>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay a recording (`record`), JSON lines or framed wire records through
    /// a topology on the embedded default (no servers), with one frozen clock,
    /// and write or compare every output: the store's tables, each output
    /// topic and the dead letters, as sorted files. Two replays of one file
    /// write the same bytes. Exits with 1 when --expect finds a difference.
    /// Without --input (Kafka profile): replay a range of the source topic
    /// (--from, --to, --partition) into --sandbox NAME: outputs to topics
    /// suffixed `.sandbox.NAME`, a group and a ClickHouse database of their own.
    Replay {
        /// A bundled topology's name, or the path of a declaration file.
        #[arg(long, default_value = "atom-ingestion", value_name = "NAME|FILE")]
        topology: String,
        #[arg(long, required_unless_present = "sandbox", conflicts_with = "sandbox")]
        input: Option<PathBuf>,
        /// Replay from Kafka into this sandbox (with --from/--to/--partition).
        #[arg(long, requires = "from")]
        sandbox: Option<String>,
        /// Sandbox replays: the first offset or time (RFC 3339 or ms:EPOCH_MILLIS).
        #[arg(long, value_name = "OFFSET|TIME")]
        from: Option<hartonomous::log::kafka::Bound>,
        /// Sandbox replays: where to stop (exclusive). Default: the partition's end now.
        #[arg(long, value_name = "OFFSET|TIME")]
        to: Option<hartonomous::log::kafka::Bound>,
        /// Sandbox replays: only this partition (repeatable).
        #[arg(long)]
        partition: Vec<i32>,
        /// Write the outputs under this directory (tables/, topics/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Compare the outputs with this directory (as written by --out) and
        /// print the differences.
        #[arg(long)]
        expect: Option<PathBuf>,
        /// The frozen "now" in ms since the epoch. Default: the recording's time
        /// (2026-01-01T00:00:00Z for other inputs).
        #[arg(long)]
        now_ms: Option<i64>,
        /// Model and embedding answers: recorded into this file when it does
        /// not exist yet (the models are called), played back when it does
        /// (no model is called).
        #[arg(long)]
        cassette: Option<PathBuf>,
        /// What a played-back cassette does for an input it lacks: `fail` the
        /// run, naming the model and the input's hash, or `call` the model and
        /// keep the answer.
        #[arg(long, value_enum, default_value_t = OnMissing::Fail)]
        on_missing: OnMissing,
    },
    /// A consumer group's lag per partition: committed offset, log end and
    /// lag (Kafka profiles). Reads only: it joins nothing and commits nothing.
    Lag {
        /// The consumer group; the processor's is its topology's name (e.g. atom-ingestion).
        #[arg(long)]
        group: String,
        /// Topics to report (repeatable). Default: every topic the group has committed on.
        #[arg(long)]
        topic: Vec<String>,
        /// Print the table again every --interval seconds until interrupted.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        interval: u64,
    },
    /// Encode JSON lines as Avro in the Confluent wire format.
    Produce {
        /// Topic whose value schema (subject `<topic>-value`) encodes the records.
        #[arg(long)]
        topic: String,
        #[arg(long)]
        input: PathBuf,
        /// Write framed wire records to this file instead of producing to Kafka
        /// (required with the embedded log, which lives only inside one command).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Bundled schema to encode with; default: the source schema of the topology reading `--topic`.
        #[arg(long)]
        schema: Option<String>,
        /// Schema version to write with (default: the current one).
        #[arg(long)]
        schema_version: Option<u32>,
    },
    /// Run read-only SQL against the store (tables: atoms, dead_letters; on ClickHouse also
    /// atoms_per_source_hour). Creates nothing and migrates nothing; works for a read-only ClickHouse user.
    Query { sql: String },
    /// What happened to one request, by its correlation id, as JSON (the same
    /// answer as a running processor's GET /requests/{correlation_id}): stored,
    /// matched, dead-lettered with the reason, completed or compensated.
    /// Reads only, like `query`.
    Status { correlation_id: String },
    /// Apply the ClickHouse DDL in schemas/clickhouse/ (idempotent).
    Migrate,
    /// Register the bundled schemas of every bundled topology's source topic in the
    /// profile's registry file (a no-op when present) and list them with their ids,
    /// for producers written in other languages.
    Schemas,
    /// Inspect or redrive a dead-letter topic (Kafka profiles).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Check or draw a topology declaration.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// The dead letters of a topic grouped by stage and reason, with their provenance.
    Inspect {
        #[arg(long)]
        topic: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Examples shown per group.
        #[arg(long, default_value_t = 3)]
        examples: usize,
    },
    /// Copy dead letters (original key, payload and headers) back to their source
    /// topic and partition, or to --to, adding a redrive count; records redriven
    /// --max-redrives times already are refused. Resumes where the last redrive
    /// of --group stopped.
    Redrive {
        #[arg(long)]
        topic: String,
        /// Only dead letters with this reason (e.g. embed.unavailable).
        #[arg(long)]
        reason: Option<String>,
        /// Copy to this topic instead of each record's source topic.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
        /// The consumer group that keeps the redrive's place in the topic.
        #[arg(long, default_value = "hartonomous-redrive")]
        group: String,
    },
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// List the bundled topologies.
    List,
    /// Check a declaration (a bundled name or a file); prints nothing but "ok" when it is valid.
    Validate {
        #[arg(value_name = "NAME|FILE")]
        topology: String,
    },
    /// Print the graph of stages of a declaration (a bundled name or a file).
    Show {
        #[arg(value_name = "NAME|FILE")]
        topology: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    // Logs go to stderr (stdout carries results), coloured only on a
    // terminal: no escape codes in files, pipes and CI logs.
    let format = match cli.log_format {
        LogFormat::Human => hartonomous::telemetry::LogFormat::Human,
        LogFormat::Json => hartonomous::telemetry::LogFormat::Json,
    };
    let endpoint = hartonomous::telemetry::otlp_endpoint(cli.otlp_endpoint.clone());
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "hartonomous".into());
    let telemetry = match rt.block_on(async { hartonomous::telemetry::init(format, endpoint.as_deref(), &service) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot set up logs and traces: {e}");
            return ExitCode::FAILURE;
        }
    };
    hartonomous::avro::wire::limit_allocations();
    let result = rt.block_on(dispatch(cli));
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives
/// while a run is still connecting is not the default action (an immediate
/// exit) but a request to stop as soon as the run starts.
fn interrupted() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

/// [`interrupted`], saying that the run now drains and commits.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    let signal = interrupted();
    async move {
        signal.await;
        eprintln!("shutting down: draining in-flight records and committing");
    }
}

/// `hartonomous record`: reads the range on a blocking thread and writes
/// each record as it arrives, with a progress bar on a terminal.
async fn record(
    kafka: hartonomous::log::kafka::KafkaConfig,
    registry: std::sync::Arc<dyn hartonomous::avro::SchemaRegistry>,
    topic: String,
    partitions: Vec<i32>,
    from: Option<hartonomous::log::kafka::Bound>,
    to: Option<hartonomous::log::kafka::Bound>,
    out: PathBuf,
) -> anyhow::Result<String> {
    use hartonomous::replay::recording::{RecordingInfo, RecordingWriter, wire_schema_id};
    let spec = hartonomous::log::kafka::RangeSpec { topic: topic.clone(), partitions: partitions.clone(), from, to };
    let info = RecordingInfo {
        format_version: 1,
        topic: topic.clone(),
        from: from.map(|b| format!("{b:?}")),
        to: to.map(|b| format!("{b:?}")),
        partitions,
        recorded_at_ms: clock::system().now_ms(),
        tool: format!("hartonomous {}", env!("CARGO_PKG_VERSION")),
    };
    let handle = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let (report, written, info) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut info = info;
        let mut writer = RecordingWriter::create(&out, &info)?;
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {pos} records  {per_sec}  {elapsed}").expect("valid template"));
        let mut sink = |r: hartonomous::record::Record| -> Result<(), String> {
            let schema = match wire_schema_id(&r.payload) {
                Some(id) if writer.needs_schema(id) => match handle.block_on(registry.schema_by_id(id)) {
                    Ok(s) => Some((id, s.canonical_form())),
                    // An id the registry does not know is recorded as it is:
                    // the replay dead-letters it, as production would.
                    Err(e) => {
                        tracing::warn!(id, error = %e, "a record names a schema id the registry cannot give; recorded without its schema");
                        None
                    }
                },
                _ => None,
            };
            writer.append(&r, schema).map_err(|e| e.to_string())
        };
        let report = hartonomous::log::kafka::read_range(&kafka, &spec, &mut sink, &mut |n| bar.set_position(n))?;
        bar.finish_and_clear();
        let written = writer.finish()?;
        info.partitions = report.partitions.keys().copied().collect();
        Ok((report, written, info))
    })
    .await??;
    let secs = started.elapsed().as_secs_f64();
    let mut s = format!("recorded {written} records of {} in {secs:.2} s ({:.0} records/s)", info.topic, written as f64 / secs.max(1e-9));
    for (p, r) in &report.partitions {
        let range = match (r.first, r.last) {
            (Some(a), Some(b)) => format!("offsets {a}..={b}"),
            _ => "nothing in range".to_string(),
        };
        s.push_str(&format!("\n  partition {p}: {} records, {range} (read from {})", r.records, r.started_at));
    }
    for w in &report.warnings {
        s.push_str(&format!("\n  warning: {w}"));
    }
    Ok(s)
}

/// Now in UTC, for `lag --watch`'s headings.
fn chrono_now() -> String {
    let ms = clock::system().now_ms();
    arrow::temporal_conversions::timestamp_ms_to_datetime(ms).map_or_else(|| ms.to_string(), |t| format!("{} UTC", t.format("%Y-%m-%d %H:%M:%S")))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Topology { command: TopologyCommand::List } => {
            for t in topology::TOPOLOGIES {
                let spec = topology::bundled(t.name())?;
                println!("{:<20} {} -> {}", t.name(), spec.source.topic, spec.description);
            }
        }
        Command::Topology { command: TopologyCommand::Validate { topology: t } } => {
            topology::resolve(&t)?;
            println!("ok: {t}");
        }
        Command::Topology { command: TopologyCommand::Show { topology: t } } => println!("{}", topology::resolve(&t)?.render()?),
        Command::Demo => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let spec = topology::bundled("atom-ingestion")?;
            let app = Embedded::open(&profile, clock::system())?;
            println!("atom-ingestion demo on the embedded default (data directory: {})", profile.data_dir().display());
            let records = hartonomous::input::json_lines(DEMO_INPUT, &spec.source.topic);
            let summary = app.run_to_end(&spec, records).await?;
            println!("{}", summary.render());
            println!("\n{DEMO_QUERY}");
            println!("{}", app.store.query_to_string(DEMO_QUERY).await?);
            println!("Run it again: every atom is already stored, so nothing is embedded twice.");

            let spec = topology::bundled("ensemble-inference")?;
            println!("\nensemble-inference demo: 10 requests to three built-in models (similarity, keywords, lexicon)");
            let records = hartonomous::input::json_lines(DEMO_INFERENCE, &spec.source.topic);
            for summary in app.run_chain_to_end(&spec, records).await? {
                println!("{}", summary.render());
            }
            for sql in DEMO_INFERENCE_QUERIES {
                println!("\n{sql}");
                println!("{}", app.store.query_to_string(sql).await?);
            }
            println!("\nInferenceCompensated on inference.compensated (the request whose quorum was not reached):");
            let announced = app.log.records("inference.compensated");
            if announced.is_empty() {
                println!("  none this time: it was compensated and announced by an earlier run (see the table inference_compensations)");
            }
            for record in announced {
                let (_, value) = hartonomous::avro::Decoder::new(app.registry.clone(), Schemas::current(avro::INFERENCE_COMPENSATED).expect("bundled").schema.clone())
                    .decode(&record.payload)
                    .await?;
                let event: hartonomous::inference::InferenceCompensated = hartonomous::topology::decode::to_typed(&value).map_err(|r| anyhow::anyhow!("{}", r.message))?;
                println!("  {event:?}");
            }
        }
        Command::Run { topology: name, input, listen } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let spec = topology::resolve(&name)?;
            match (input, &profile.log) {
                (Some(input), LogProfile::Embedded(_)) => {
                    let records = hartonomous::input::stream(&input, &spec.source.topic)?;
                    let app = Embedded::open(&profile, clock::system())?;
                    for summary in app.run_chain_feed(&spec, records).await? {
                        println!("{}", summary.render());
                    }
                }
                (Some(_), LogProfile::Kafka(_)) => {
                    anyhow::bail!("--input loads the embedded log; with Kafka, write the records with `hartonomous produce` and run without --input")
                }
                (None, LogProfile::Kafka(_)) => {
                    let shutdown = shutdown_signal();
                    let summary = hartonomous::app::run_kafka(&profile, &spec, listen, shutdown).await?;
                    println!("{}", summary.render());
                }
                (None, LogProfile::Embedded(_)) => anyhow::bail!("the embedded log starts empty: pass --input FILE, or use a Kafka profile with --connectors"),
            }
        }
        Command::Record { topic, partition, from, to, out } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let LogProfile::Kafka(k) = &profile.log else {
                anyhow::bail!("`record` reads a Kafka topic: pass a Kafka profile with --connectors (the embedded log lives only inside one command)")
            };
            let registry = hartonomous::app::lookup_registry(&profile)?;
            let summary = record(k.clone(), registry, topic, partition, from, to, out).await?;
            println!("{summary}");
        }
        Command::Replay { topology: name, input: None, sandbox: Some(sandbox), from, to, partition, .. } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let spec = topology::resolve(&name)?;
            let started = std::time::Instant::now();
            let r = hartonomous::replay::sandbox::replay_kafka(&profile, &spec, &sandbox, &partition, from, to).await?;
            let secs = started.elapsed().as_secs_f64();
            println!("{}", r.summary.render());
            let records: i64 = r.ranges.values().map(|(a, b)| b - a).sum();
            println!("\nreplayed {records} records of {} into sandbox `{sandbox}` in {secs:.2} s ({:.0} records/s, group join included)", spec.source.topic, records as f64 / secs.max(1e-9));
            for (tp, (a, b)) in &r.ranges {
                println!("  {tp}: offsets [{a}, {b})");
            }
            println!("outputs: topics {:?}, dead letters {}, group {}", r.spec.topology()?.outputs(&r.spec).into_iter().map(|(t, _)| t).collect::<Vec<_>>(), r.spec.dead_letter.topic, r.spec.group());
            match &r.profile.store {
                StoreProfile::Clickhouse(c) => println!("store: ClickHouse database {}", c.database),
                StoreProfile::Embedded(_) => println!("store: {}", r.profile.data_dir().display()),
            }
        }
        Command::Replay { input: None, .. } => anyhow::bail!("replay needs --input FILE, or --sandbox NAME with --from (Kafka)"),
        Command::Replay { topology: name, input: Some(input), out, expect, now_ms, cassette, on_missing, .. } => {
            use hartonomous::replay::cassette::{Cassette, Mode};
            let profile = Profile::load(cli.connectors.as_deref())?;
            let spec = topology::resolve(&name)?;
            let cassette = match &cassette {
                Some(path) if path.exists() => Some(Cassette::open(path, Mode::Replay(match on_missing {
                    OnMissing::Fail => hartonomous::replay::cassette::OnMissing::Fail,
                    OnMissing::Call => hartonomous::replay::cassette::OnMissing::Call,
                }))?),
                Some(path) => Some(Cassette::open(path, Mode::Record)?),
                None => None,
            };
            let started = std::time::Instant::now();
            let replay = hartonomous::replay::replay_file(&profile, &spec, &input, now_ms, cassette.clone()).await?;
            if let Some(c) = &cassette {
                use std::sync::atomic::Ordering;
                if c.mode() == Mode::Record || c.misses.load(Ordering::Relaxed) > 0 {
                    c.save()?;
                }
                let (hits, misses) = (c.hits.load(Ordering::Relaxed), c.misses.load(Ordering::Relaxed));
                match c.mode() {
                    Mode::Record => println!("cassette: recorded {} answers", c.len()),
                    Mode::Replay(_) => println!("cassette: {hits} answers played back, {misses} not in it (called)"),
                }
            }
            let secs = started.elapsed().as_secs_f64();
            for summary in &replay.summaries {
                println!("{}", summary.render());
            }
            println!("\nreplayed {} records in {secs:.2} s ({:.0} records/s), clock frozen at {} ms", replay.records, replay.records as f64 / secs.max(1e-9), replay.now_ms);
            for (file, lines) in &replay.outputs {
                println!("  {file}: {} lines", lines.len());
            }
            if let Some(dir) = &out {
                hartonomous::replay::outputs::write(dir, &replay.outputs)?;
                println!("outputs written under {}", dir.display());
            }
            if let Some(dir) = &expect {
                let expected = hartonomous::replay::outputs::read(dir).map_err(|e| anyhow::anyhow!("--expect {}: {e}", dir.display()))?;
                if expected.is_empty() {
                    anyhow::bail!("--expect {}: no tables/ or topics/ files there; write them with --out first", dir.display());
                }
                let diff = hartonomous::replay::outputs::diff(&expected, &replay.outputs);
                if !diff.is_empty() {
                    eprintln!("the outputs differ from {}:\n{diff}", dir.display());
                    std::process::exit(1);
                }
                println!("outputs match {}", dir.display());
            }
        }
        Command::Produce { topic, input, output, schema, schema_version } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let name = match schema {
                Some(s) => s,
                None => topology::TOPOLOGIES
                    .iter()
                    .filter_map(|t| topology::bundled(t.name()).ok())
                    .find(|s| s.source.topic == topic)
                    .map(|s| s.source.schema)
                    .ok_or_else(|| anyhow::anyhow!("no bundled topology reads `{topic}`; pass --schema NAME (one of {:?})", Schemas::names()))?,
            };
            let version = match schema_version {
                Some(v) => Schemas::version(&name, v),
                None => Schemas::current(&name),
            }
            .ok_or_else(|| anyhow::anyhow!("no bundled schema {name} (version {schema_version:?}); known: {:?}", Schemas::names()))?;
            let registry = hartonomous::app::open_registry(&profile, &topic, &name).await?;
            let id = registry.register(&Schemas::subject(&topic), &version.schema).await?;
            let lines = std::fs::read(&input).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let mut out = Vec::new();
            for (n, line) in lines.split(|b| *b == b'\n').enumerate().filter(|(_, l)| l.iter().any(|b| !b.is_ascii_whitespace())) {
                let at = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}:{}: {e}", input.display(), n + 1);
                let json = avro::parse_line(line).map_err(|e| at(&e))?;
                let value = avro::json_to_avro(&json, &version.schema).map_err(|e| at(&e))?;
                let payload = avro::encode(id, &version.schema, &value).map_err(|e| at(&e))?;
                let key = json.get("correlation_id").and_then(|v| v.as_str()).map(|s| s.as_bytes().to_vec());
                out.push((key, payload));
            }
            match (output, &profile.log) {
                (Some(output), _) => {
                    hartonomous::input::write_wire(&output, &out).map_err(|e| anyhow::anyhow!("{}: {e}", output.display()))?;
                    println!("wrote {} records ({} v{}, schema id {id}) to {}", out.len(), name, version.version, output.display());
                }
                (None, LogProfile::Kafka(k)) => {
                    let producer = hartonomous::log::kafka::KafkaProducer::new(k)?;
                    let sends = out.into_iter().map(|(key, payload)| {
                        producer.send(hartonomous::record::OutgoingRecord { topic: topic.clone(), key, payload, ..Default::default() })
                    });
                    let n = futures::future::try_join_all(sends).await?.len();
                    println!("produced {n} records ({} v{}, schema id {id}) to {topic}", name, version.version);
                }
                (None, LogProfile::Embedded(_)) => {
                    anyhow::bail!("the embedded log lives only inside one command: pass --output FILE.wire, then `hartonomous run --input FILE.wire`")
                }
            }
        }
        Command::Lag { group, topic, watch, interval } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let LogProfile::Kafka(k) = &profile.log else {
                anyhow::bail!("`lag` reads a Kafka consumer group: pass a Kafka profile with --connectors (the embedded log has no groups)")
            };
            let stop = interrupted();
            tokio::pin!(stop);
            loop {
                let rows = hartonomous::log::kafka::group_lag(k, &group, &topic).await?;
                if watch {
                    println!("{}", chrono_now());
                }
                print!("{}", hartonomous::log::kafka::render_lag(&group, &rows));
                if !watch {
                    break;
                }
                println!();
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))) => {}
                }
            }
        }
        Command::Dlq { command } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let LogProfile::Kafka(k) = &profile.log else {
                anyhow::bail!("`dlq` reads a Kafka dead-letter topic: pass a Kafka profile with --connectors (the embedded log lives only inside one command; its dead letters are in the store's dead_letters table: `hartonomous query`)")
            };
            match command {
                DlqCommand::Inspect { topic, json, examples } => {
                    let scan = hartonomous::log::kafka::KafkaScanner::new(k);
                    let report = hartonomous::dlq::inspect_topic(&scan, &topic, examples).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", report.render());
                    }
                }
                DlqCommand::Redrive { topic, reason, to, max_redrives, group } => {
                    let plan = hartonomous::dlq::RedrivePlan { reason, to, max_redrives };
                    let report = hartonomous::dlq::redrive_topic(k, &topic, &group, &plan).await?;
                    println!("{}", report.render(max_redrives));
                }
            }
        }
        Command::Migrate => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            match &profile.store {
                StoreProfile::Clickhouse(c) => {
                    let store = ClickHouseStore::connect(hartonomous::store::clickhouse::ClickHouseConfig { migrate_on_start: false, ..c.clone() }).await?;
                    let applied = store.migrate().await?;
                    println!("{} migration(s) applied to {}{}", applied.len(), c.database, if applied.is_empty() { " (already up to date)" } else { "" });
                    for f in applied {
                        println!("  {f}");
                    }
                }
                StoreProfile::Embedded(_) => println!("the embedded store needs no migration"),
            }
        }
        Command::Schemas => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let path = profile.registry_path().ok_or_else(|| anyhow::anyhow!("the profile's registry is not a file registry"))?;
            if let Some(parent) = path.parent() {
                hartonomous::config::create_private_dir(parent)
                    .map_err(|e| anyhow::anyhow!("cannot create the registry's directory {}: {e}", parent.display()))?;
            }
            let registry = FileRegistry::open(&path)?;
            for t in topology::TOPOLOGIES {
                let spec = topology::bundled(t.name())?;
                registry.register_bundled(&[(spec.source.topic.as_str(), spec.source.schema.as_str())])?;
            }
            println!("  id  subject  version  schema (canonical form) -- registry file {}", path.display());
            for s in registry.list() {
                println!("{:>4}  {}  v{}  {}", s.id, s.subject, s.version, s.schema.canonical_form());
            }
        }
        Command::Status { correlation_id } => {
            use hartonomous::store::RequestLookup;
            let profile = Profile::load(cli.connectors.as_deref())?;
            let status = match &profile.store {
                StoreProfile::Embedded(_) => {
                    hartonomous::store::embedded::EmbeddedStore::open_read_only(profile.data_dir())?.request_status(&correlation_id).await?
                }
                StoreProfile::Clickhouse(c) => ClickHouseStore::connect_for_query(c.clone()).await?.request_status(&correlation_id).await?,
            };
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        // Reads only: creates no directory, file, database or table, and
        // runs no migration, so a read-only ClickHouse user can run it.
        Command::Query { sql } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            match &profile.store {
                StoreProfile::Embedded(_) => {
                    let store = hartonomous::store::embedded::EmbeddedStore::open_read_only(profile.data_dir())?;
                    println!("{}", store.query_to_string(&sql).await?);
                }
                StoreProfile::Clickhouse(c) => {
                    let store = ClickHouseStore::connect_for_query(c.clone()).await?;
                    print!("{}", store.query_text(&sql).await?);
                }
            }
        }
    }
    Ok(())
}
