//! The `hartonomous` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use hartonomous::app::Embedded;
use hartonomous::avro::{self, Schemas};
use hartonomous::clock;
use hartonomous::config::Profile;
use hartonomous::topology::{self, spec::TopologySpec};

/// Sample requests for `demo`: distinct texts, repeats and malformed records.
const DEMO_INPUT: &[u8] = include_bytes!("../tests/data/demo-atoms.jsonl");
const DEMO_QUERY: &str = "SELECT source_system, count(*) AS atoms, sum(content_size) AS bytes FROM atoms GROUP BY source_system ORDER BY atoms DESC, source_system";

#[derive(Parser)]
#[command(name = "hartonomous", version, about = "Kafka/Avro stream processing into ClickHouse, with an embedded default that needs no servers")]
struct Cli {
    /// Connection profile (TOML). Default: the built-in embedded profile, as in connectors/embedded.toml.
    #[arg(long, global = true, env = "HARTONOMOUS_CONNECTORS")]
    connectors: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run atom ingestion over bundled sample data on the embedded default and print a summary.
    Demo,
    /// Run a topology over an input file until it is drained, then print a summary.
    Run {
        /// Bundled topology name.
        #[arg(long, default_value = "atom-ingestion")]
        topology: String,
        /// Run this declaration file instead of the bundled one.
        #[arg(long)]
        topology_file: Option<PathBuf>,
        /// JSON lines, or framed wire records written by `produce --output`.
        #[arg(long)]
        input: PathBuf,
    },
    /// Encode JSON lines as Avro in the Confluent wire format.
    Produce {
        /// Topic whose value schema (subject `<topic>-value`) encodes the records.
        #[arg(long)]
        topic: String,
        #[arg(long)]
        input: PathBuf,
        /// Write framed wire records to this file (the embedded log lives only inside one command).
        #[arg(long)]
        output: PathBuf,
        /// Bundled schema to encode with; default: the source schema of the topology reading `--topic`.
        #[arg(long)]
        schema: Option<String>,
        /// Schema version to write with (default: the current one).
        #[arg(long)]
        schema_version: Option<u32>,
    },
    /// Run SQL against the store (tables: atoms, dead_letters).
    Query { sql: String },
    /// Check or draw a topology declaration.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Check a declaration; prints nothing but "ok" when it is valid.
    Validate { file: PathBuf },
    /// Print the graph of stages.
    Show { file: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    hartonomous::avro::wire::limit_allocations();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Topology { command: TopologyCommand::Validate { file } } => {
            TopologySpec::load(&file)?;
            println!("ok: {}", file.display());
        }
        Command::Topology { command: TopologyCommand::Show { file } } => println!("{}", TopologySpec::load(&file)?.render()),
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
        }
        Command::Run { topology: name, topology_file, input } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let spec = match topology_file {
                Some(f) => TopologySpec::load(&f)?,
                None => topology::bundled(&name)?,
            };
            let records = hartonomous::input::read(&input, &spec.source.topic)?;
            let app = Embedded::open(&profile, clock::system())?;
            println!("{}", app.run_to_end(&spec, records).await?.render());
        }
        Command::Produce { topic, input, output, schema, schema_version } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let name = match schema {
                Some(s) => s,
                None => topology::BUNDLED
                    .iter()
                    .filter_map(|(n, _)| topology::bundled(n).ok())
                    .find(|s| s.source.topic == topic)
                    .map(|s| s.source.schema)
                    .ok_or_else(|| anyhow::anyhow!("no bundled topology reads `{topic}`; pass --schema NAME (one of {:?})", Schemas::names()))?,
            };
            let version = match schema_version {
                Some(v) => Schemas::version(&name, v),
                None => Schemas::current(&name),
            }
            .ok_or_else(|| anyhow::anyhow!("no bundled schema {name} (version {schema_version:?}); known: {:?}", Schemas::names()))?;
            let app = Embedded::open(&profile, clock::system())?;
            let id = app.registry.register_schema(&Schemas::subject(&topic), &version.schema)?;
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
            hartonomous::input::write_wire(&output, &out).map_err(|e| anyhow::anyhow!("{}: {e}", output.display()))?;
            println!("wrote {} records ({} v{}, schema id {id}) to {}", out.len(), name, version.version, output.display());
        }
        Command::Query { sql } => {
            let profile = Profile::load(cli.connectors.as_deref())?;
            let store = hartonomous::store::embedded::EmbeddedStore::open(profile.data_dir())?;
            println!("{}", store.query_to_string(&sql).await?);
        }
    }
    Ok(())
}
