//! The `hartonomous` binary as users run it, on the embedded default.

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn hartonomous(data_dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .args(args)
        .env("HARTONOMOUS_DATA_DIR", data_dir)
        .env("HARTONOMOUS_LISTEN", "off")
        .env_remove("HARTONOMOUS_CONNECTORS")
        .output()
        .expect("run hartonomous");
    out
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The number in the summary line that starts with `label`.
fn summary_number(stdout: &str, label: &str) -> u64 {
    let line = stdout.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no `{label}` in:\n{stdout}"));
    line.trim_start()[label.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

/// The single value of a one-cell `query` result.
fn cell(stdout: &str) -> String {
    let row = stdout.lines().filter(|l| l.starts_with('|')).nth(1).unwrap_or_else(|| panic!("no rows in:\n{stdout}"));
    row.trim_matches('|').trim().to_string()
}

#[test]
fn demo_prints_the_summary_and_a_query_result() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(hartonomous(dir.path(), &["demo"]));
    assert_eq!(summary_number(&stdout, "records in"), 27);
    assert_eq!(summary_number(&stdout, "atoms stored"), 16);
    assert_eq!(summary_number(&stdout, "duplicates matched"), 5);
    assert_eq!(summary_number(&stdout, "arrivals recorded"), 21);
    assert_eq!(summary_number(&stdout, "dead-lettered"), 6);
    assert_eq!(summary_number(&stdout, "events published"), 21, "every accepted request is answered");
    assert!(stdout.contains("(16 contents embedded)"), "{stdout}");
    assert!(stdout.contains("validate.content_type") && stdout.contains("decode.json_syntax"), "{stdout}");
    assert!(stdout.contains("| source_system | atoms | bytes |"), "{stdout}");
}

#[test]
fn run_stores_n_minus_d_minus_b_atoms_and_a_rerun_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d, b) = (1200usize, 150usize, 30usize);
    let mut lines = Vec::new();
    let mut unique = Vec::new();
    for i in 0..n - d - b {
        let content = format!("atom number {i} with some words: {}", "alpha beta gamma ".repeat(i % 5));
        unique.push(content.clone());
        lines.push(serde_json::json!({"content_type": "text/markdown", "content": content, "metadata": {"n": i.to_string()}, "source_system": "cli", "correlation_id": format!("c{i}")}).to_string());
    }
    for j in 0..d {
        let content = &unique[(j * 13) % unique.len()];
        lines.push(serde_json::json!({"content_type": "text/markdown", "content": content, "metadata": {}, "source_system": "cli-dup", "correlation_id": format!("d{j}")}).to_string());
    }
    for k in 0..b {
        lines.push(match k % 3 {
            0 => format!("{{\"content_type\": \"text/plain\", \"content\": \"cut off {k}"),
            1 => serde_json::json!({"content_type": "video/mp4", "content": "x", "metadata": {}, "source_system": "cli", "correlation_id": format!("b{k}")}).to_string(),
            _ => serde_json::json!({"content_type": "text/plain", "content": "", "metadata": {}, "source_system": "cli", "correlation_id": format!("b{k}")}).to_string(),
        });
    }
    // Shuffle deterministically so duplicates and bad records are spread out.
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by_key(|i| (i * 7919) % lines.len());
    let input = dir.path().join("requests.jsonl");
    std::fs::write(&input, order.iter().map(|&i| format!("{}\n", lines[i])).collect::<String>()).unwrap();
    let data = dir.path().join("data");
    let input = input.to_str().unwrap();

    let first = ok(hartonomous(&data, &["run", "--topology", "atom-ingestion", "--input", input]));
    assert_eq!(summary_number(&first, "records in") as usize, n);
    assert_eq!(summary_number(&first, "atoms stored") as usize, n - d - b);
    assert_eq!(summary_number(&first, "dead-lettered") as usize, b);
    assert!(first.contains(&format!("({} contents embedded)", n - d - b)), "{first}");

    let atoms = ok(hartonomous(&data, &["query", "SELECT count(*) AS atoms FROM atoms"]));
    assert_eq!(cell(&atoms), (n - d - b).to_string());
    let letters = ok(hartonomous(&data, &["query", "SELECT count(*) FROM dead_letters WHERE reason <> ''"]));
    assert_eq!(cell(&letters), b.to_string());
    let one = &unique[7];
    let hash = hex::encode(Sha256::digest(one.as_bytes()));
    let found = ok(hartonomous(&data, &["query", &format!("SELECT count(*) FROM atoms WHERE content_hash = '{hash}'")]));
    assert_eq!(cell(&found), "1");
    // Every accepted request is recorded and answered, repeats included.
    assert_eq!(summary_number(&first, "events published") as usize, n - b);
    assert_eq!(cell(&ok(hartonomous(&data, &["query", "SELECT count(*) FROM atom_arrivals"]))), (n - b).to_string());
    assert_eq!(cell(&ok(hartonomous(&data, &["query", "SELECT count(*) FROM atom_arrivals WHERE outcome = 'matched'"]))), d.to_string());

    let second = ok(hartonomous(&data, &["run", "--topology", "atom-ingestion", "--input", input]));
    assert_eq!(summary_number(&second, "atoms stored"), 0);
    assert_eq!(summary_number(&second, "embedding calls"), 0);
    assert_eq!(summary_number(&second, "arrivals recorded"), 0);
    assert_eq!(summary_number(&second, "events published") as usize, n - b, "a replay answers again");
    assert_eq!(cell(&ok(hartonomous(&data, &["query", "SELECT count(*) FROM atoms"]))), (n - d - b).to_string());
    assert_eq!(cell(&ok(hartonomous(&data, &["query", "SELECT count(*) FROM atom_arrivals"]))), (n - b).to_string());
}

#[test]
fn produce_writes_wire_records_that_run_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let jsonl = dir.path().join("in.jsonl");
    std::fs::write(
        &jsonl,
        "{\"content_type\":\"text/plain\",\"content\":\"first\",\"metadata\":{},\"source_system\":\"p\",\"correlation_id\":\"1\"}\n\
         {\"content_type\":\"text/plain\",\"content\":\"second\",\"metadata\":{},\"source_system\":\"p\",\"correlation_id\":\"2\"}\n",
    )
    .unwrap();
    let wire = dir.path().join("in.wire");
    let out = ok(hartonomous(&data, &["produce", "--topic", "atoms.ingest", "--input", jsonl.to_str().unwrap(), "--output", wire.to_str().unwrap(), "--schema-version", "1"]));
    assert!(out.contains("wrote 2 records"), "{out}");
    let bytes = std::fs::read(&wire).unwrap();
    assert!(bytes.starts_with(b"HRTN-WIRE1\n"));
    let run = ok(hartonomous(&data, &["run", "--input", wire.to_str().unwrap()]));
    assert_eq!(summary_number(&run, "atoms stored"), 2, "{run}");

    // A line that does not fit the schema is refused with its line number.
    std::fs::write(&jsonl, "{\"content_type\":1}\n").unwrap();
    let bad = hartonomous(&data, &["produce", "--topic", "atoms.ingest", "--input", jsonl.to_str().unwrap(), "--output", wire.to_str().unwrap()]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("in.jsonl:1") && err.contains("content_type"), "{err}");
}

#[test]
fn topology_validate_names_file_field_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let good = concat!(env!("CARGO_MANIFEST_DIR"), "/topologies/atom-ingestion.toml");
    assert!(ok(hartonomous(dir.path(), &["topology", "validate", good])).contains("ok"));
    let shown = ok(hartonomous(dir.path(), &["topology", "show", good]));
    for stage in ["decode", "validate", "hash", "dedup", "embed", "persist", "publish", "atoms.ingest.dlq"] {
        assert!(shown.contains(stage), "{shown}");
    }
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, std::fs::read_to_string(good).unwrap().replace("in_flight_records = 20000", "in_flight_records = 10")).unwrap();
    let out = hartonomous(dir.path(), &["topology", "validate", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.toml") && err.contains("limits.in_flight_records") && err.contains("Raise it"), "{err}");
}

#[test]
fn topology_takes_a_bundled_name_or_a_declaration_file() {
    let dir = tempfile::tempdir().unwrap();
    let bundled = concat!(env!("CARGO_MANIFEST_DIR"), "/topologies/atom-ingestion.toml");
    assert!(ok(hartonomous(dir.path(), &["topology", "list"])).contains("atom-ingestion"));
    assert!(ok(hartonomous(dir.path(), &["topology", "show", "atom-ingestion"])).contains("publish"));

    // An edited copy without the embed stage runs from its path.
    let input = dir.path().join("in.jsonl");
    let line = |i: usize| serde_json::json!({"content_type": "text/plain", "content": format!("text {i}"), "metadata": {}, "source_system": "cli", "correlation_id": format!("c{i}")}).to_string();
    std::fs::write(&input, (0..20).map(|i| line(i) + "\n").collect::<String>()).unwrap();
    let edited = dir.path().join("no-embed.toml");
    std::fs::write(&edited, std::fs::read_to_string(bundled).unwrap().replace("[[stage]]\nname = \"embed\"\nconcurrency = 2\n", "")).unwrap();
    let out = ok(hartonomous(&dir.path().join("data"), &["run", "--topology", edited.to_str().unwrap(), "--input", input.to_str().unwrap()]));
    assert_eq!(summary_number(&out, "atoms stored"), 20, "{out}");
    assert_eq!(summary_number(&out, "embedding calls"), 0, "{out}");

    // Neither a bundled name nor a file: the error says what --topology takes.
    let out = hartonomous(dir.path(), &["run", "--topology", "atom-ingestoin", "--input", input.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--topology") && err.contains("atom-ingestion") && err.contains("declaration file"), "{err}");

    // A misspelt stage setting names the file, the stage entry and the setting.
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, std::fs::read_to_string(bundled).unwrap().replace("max_content_bytes", "max_content_byte")).unwrap();
    let out = hartonomous(dir.path(), &["topology", "validate", typo.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("typo.toml") && err.contains("stage[1]") && err.contains("max_content_byte"), "{err}");
}

#[test]
fn a_bad_profile_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(&profile, hartonomous::config::EMBEDDED_PROFILE.replace("dimension = 384", "dimension = 0")).unwrap();
    let out = hartonomous(dir.path(), &["--connectors", profile.to_str().unwrap(), "demo"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.toml") && err.contains("embedder.dimension") && err.contains("384"), "{err}");
    assert!(!dir.path().join("tables").exists(), "nothing ran");
}

#[test]
fn bundled_profiles_parse_and_check() {
    for name in ["embedded.toml", "kafka-clickhouse.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors").join(name);
        let profile = hartonomous::config::Profile::load(Some(&path));
        assert!(profile.is_ok(), "{name}: {:?}", profile.err());
    }
}

#[test]
fn schemas_lists_stable_ids_for_other_producers() {
    let dir = tempfile::tempdir().unwrap();
    let first = ok(hartonomous(dir.path(), &["schemas"]));
    let second = ok(hartonomous(dir.path(), &["schemas"]));
    assert_eq!(first, second, "ids are stable across runs");
    let ids: Vec<&str> = first.lines().filter(|l| l.contains("atoms.ingest-value")).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(ids, vec!["1", "2"], "{first}");
    assert!(first.contains("created_at_ms"), "version 2 adds created_at_ms: {first}");
}

// --- Side effects: `query` creates nothing, the data directory is private ----

/// Every entry under `dir`, recursively, as paths relative to it (sorted).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn query_on_a_fresh_embedded_data_directory_leaves_the_disk_untouched() {
    let dir = tempfile::tempdir().unwrap();
    // An existing, empty data directory: answered over empty tables.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let out = ok(hartonomous(&fresh, &["query", "SELECT count(*) AS atoms FROM atoms"]));
    assert_eq!(cell(&out), "0");
    ok(hartonomous(&fresh, &["query", "SELECT count(*) FROM dead_letters"]));
    assert_eq!(tree(&fresh), Vec::<String>::new(), "query created something in {}", fresh.display());

    // A data directory that does not exist stays that way.
    let absent = dir.path().join("absent").join("data");
    assert_eq!(cell(&ok(hartonomous(&absent, &["query", "SELECT count(*) FROM atoms"]))), "0");
    assert!(!dir.path().join("absent").exists(), "query created the data directory");

    // A populated one answers from its tables and gains nothing.
    let data = dir.path().join("data");
    ok(hartonomous(&data, &["demo"]));
    let before = tree(&data);
    assert_eq!(cell(&ok(hartonomous(&data, &["query", "SELECT count(*) FROM atoms"]))), "16");
    assert_eq!(tree(&data), before);
}

#[cfg(unix)]
#[test]
fn demo_and_schemas_create_the_data_directory_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("new").join("data");
    ok(hartonomous(&data, &["demo"]));
    assert_eq!(mode(&data), 0o700, "data directory {}", data.display());
    assert_eq!(mode(&dir.path().join("new")), 0o700, "its missing parent too");

    let other = dir.path().join("schemas-data");
    ok(hartonomous(&other, &["schemas"]));
    assert_eq!(mode(&other), 0o700, "the registry file's directory");

    // An existing directory keeps the mode its owner gave it.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o750)).unwrap();
    ok(hartonomous(&shared, &["demo"]));
    assert_eq!(mode(&shared), 0o750);
}

// --- `query` against ClickHouse (tests/services.sh up) ---------------------

fn clickhouse_url() -> String {
    std::env::var("HARTONOMOUS_TEST_CLICKHOUSE").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "http://127.0.0.1:18123".into())
}

/// `sql` POSTed to ClickHouse's HTTP interface as the `default` user; the
/// answer's body. Panics, saying how to start the server, when it is not there.
fn clickhouse(sql: &str) -> String {
    clickhouse_as("default", sql)
}

fn clickhouse_as(user: &str, sql: &str) -> String {
    use std::io::{Read, Write};
    let url = reqwest::Url::parse(&clickhouse_url()).unwrap();
    let (host, port) = (url.host_str().unwrap_or("127.0.0.1").to_string(), url.port_or_known_default().unwrap_or(8123));
    let mut stream = std::net::TcpStream::connect((host.as_str(), port)).unwrap_or_else(|e| {
        panic!("ClickHouse is not reachable at {url} ({e}); start it with `tests/services.sh up`, or set HARTONOMOUS_TEST_CLICKHOUSE")
    });
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(stream, "POST /?user={user} HTTP/1.0\r\nHost: {host}:{port}\r\nContent-Length: {}\r\n\r\n{sql}", sql.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{sql}: {response}");
    body.to_string()
}

/// A database name of its own; dropped on drop.
struct ClickHouseDb(String);

impl ClickHouseDb {
    fn new() -> Self {
        assert_eq!(clickhouse("SELECT 1").trim(), "1");
        Self(format!("hartonomous_cli_{}_{:08x}", std::process::id(), rand::random::<u32>()))
    }

    fn exists(&self) -> bool {
        clickhouse(&format!("SELECT count() FROM system.databases WHERE name = '{}'", self.0)).trim() == "1"
    }

    /// A profile for this database as `user`, written to `dir/<user>.toml`.
    fn profile(&self, dir: &Path, user: &str) -> std::path::PathBuf {
        let path = dir.join(format!("{user}.toml"));
        let text = format!(
            "data_dir = \"{}\"\n[log]\nkind = \"embedded\"\n[store]\nkind = \"clickhouse\"\nurl = \"{}\"\ndatabase = \"{}\"\n\
             user = \"{user}\"\nmigrate_on_start = true\n[embedder]\nkind = \"hashing\"\ndimension = 8\n",
            dir.join("data").display(),
            clickhouse_url(),
            self.0
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for ClickHouseDb {
    fn drop(&mut self) {
        // Not `clickhouse()`: a panic while panicking would abort.
        let _ = std::panic::catch_unwind(|| clickhouse(&format!("DROP DATABASE IF EXISTS {}", self.0)));
    }
}

fn with_profile(dir: &Path, profile: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--connectors", profile.to_str().unwrap()];
    all.extend_from_slice(args);
    hartonomous(&dir.join("data"), &all)
}

#[test]
fn query_works_for_a_readonly_clickhouse_user() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClickHouseDb::new();
    let writer = db.profile(dir.path(), "default");
    let reader = db.profile(dir.path(), "reader");
    // `reader` (tests/services/clickhouse/users.xml) has a `readonly = 1` profile.
    assert_eq!(clickhouse_as("reader", "SELECT value FROM system.settings WHERE name = 'readonly'").trim(), "1");

    // The reader can neither create the database nor migrate it.
    let refused = with_profile(dir.path(), &reader, &["migrate"]);
    assert!(!refused.status.success(), "a readonly = 1 user migrated");
    assert!(!db.exists());

    ok(with_profile(dir.path(), &writer, &["migrate"]));
    clickhouse(&format!(
        "INSERT INTO {}.atoms (content_hash, content_type, content, source_system) VALUES ('{}', 'text/plain', 'hello', 'cli-reader')",
        db.0,
        "a".repeat(64)
    ));

    let out = ok(with_profile(
        dir.path(),
        &reader,
        &["query", "SELECT source_system, count() AS n FROM atoms FINAL GROUP BY source_system"],
    ));
    assert!(out.contains("cli-reader") && out.contains(" 1 "), "{out}");
    assert!(!out.contains('\u{1b}'), "terminal escapes left in: {out:?}");
    let tables = ok(with_profile(dir.path(), &reader, &["query", "SHOW TABLES"]));
    assert!(tables.contains("atoms") && tables.contains("dead_letters"), "{tables}");
    // The first-keyword check still stands in front of the server.
    let write = with_profile(dir.path(), &reader, &["query", "INSERT INTO atoms (content) VALUES ('x')"]);
    assert!(!write.status.success());
    assert!(String::from_utf8_lossy(&write.stderr).contains("only read-only statements"));
    assert!(!dir.path().join("data").exists(), "query on ClickHouse touched the local data directory");
}

#[test]
fn query_against_a_missing_clickhouse_database_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = ClickHouseDb::new();
    // `default` could create it, and migrate_on_start is set: query must do neither.
    let profile = db.profile(dir.path(), "default");
    let out = with_profile(dir.path(), &profile, &["query", "SELECT count() FROM atoms"]);
    assert!(!out.status.success(), "query succeeded on a database that does not exist");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&db.0) && err.contains("does not exist") && err.contains("migrate"), "{err}");
    assert!(!db.exists(), "query created database {}", db.0);
}

/// The inference processor republishes a compensation it recalls after a
/// crash, so the compensation consumer can meet one request's event more
/// than once, in separate windows. The request is announced once. (Whether
/// the windows overlap in the stages depends on timing here; the unit test
/// in `compensation.rs` forces the overlap.)
#[test]
fn a_compensation_event_met_twice_is_announced_once() {
    let dir = tempfile::tempdir().unwrap();
    let declaration = dir.path().join("one-per-window.toml");
    let bundled = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/topologies/inference-compensation.toml")).unwrap();
    std::fs::write(&declaration, bundled.replace("max_records = 500", "max_records = 1")).unwrap();
    let event = |request: &str, offset: i64| {
        serde_json::json!({
            "request_id": request, "correlation_id": format!("c-{request}"), "failed_step": "aggregate",
            "reason_code": "aggregate.no_result", "reason": "no quorum", "done_steps": ["reserve", "invoke"],
            "models": ["keywords", "lexicon"], "reservations": 2, "source_topic": "inference.requests",
            "source_partition": 0, "source_offset": offset, "failed_at_ms": 1_700_000_000_000i64
        })
        .to_string()
    };
    // r1 three times, with another request between its copies.
    let lines = [event("r1", 7), event("r2", 8), event("r1", 7), event("r3", 9), event("r1", 7)];
    let input = dir.path().join("compensations.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = ok(hartonomous(&dir.path().join("data"), &["run", "--topology", declaration.to_str().unwrap(), "--input", input.to_str().unwrap()]));
    assert_eq!(summary_number(&out, "announced"), 3, "{out}");
    assert_eq!(summary_number(&out, "already announced"), 2, "{out}");
    let q = ok(hartonomous(&dir.path().join("data"), &["query", "SELECT count(*) AS n FROM inference_compensations WHERE step = 3"]));
    assert_eq!(cell(&q), "3", "{q}");
}

/// `hartonomous [global_args] demo` in a fresh data directory with debug
/// logs, its stderr and stdout captured (pipes, not a terminal).
fn demo_with_debug_logs(global_args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .args(global_args)
        .arg("demo")
        .env("HARTONOMOUS_DATA_DIR", dir.path())
        .env("RUST_LOG", "hartonomous=debug")
        .env_remove("HARTONOMOUS_CONNECTORS")
        .output()
        .expect("run hartonomous")
}

/// Logs go to stderr without colour codes when stderr is not a terminal
/// (a file, a pipe, a CI log); results stay alone on stdout.
#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let out = demo_with_debug_logs(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.lines().any(|l| l.contains("DEBUG") || l.contains("INFO")), "no log lines on stderr:\n{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in a non-terminal log:\n{}", &stderr[..stderr.len().min(2000)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("DEBUG") && !stdout.contains('\u{1b}'), "logs on stdout:\n{stdout}");
}

/// `--log-format json`: every stderr line is one JSON object with a
/// timestamp, a level, a target and the event's fields; stdout is unchanged.
#[test]
fn json_logs_are_one_object_per_line() {
    let out = demo_with_debug_logs(&["--log-format", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5, "too few log lines:\n{stderr}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target", "fields"] {
            assert!(v.get(field).is_some(), "no `{field}` in {line}");
        }
        assert!(v["fields"].get("message").is_some(), "no message in {line}");
    }
    assert!(lines.iter().any(|l| l.contains("\"level\":\"DEBUG\"")), "no debug line:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("atom-ingestion demo") && !stdout.contains("\"level\""), "stdout changed:\n{stdout}");
}

/// `hartonomous status ID` on the embedded default after the demo: every
/// kind of answer GET /requests/{id} gives, from the same store look-up.
#[test]
fn status_tells_what_happened_to_each_kind_of_request() {
    let dir = tempfile::tempdir().unwrap();
    ok(hartonomous(dir.path(), &["demo"]));
    let status = |id: &str| -> serde_json::Value {
        let out = ok(hartonomous(dir.path(), &["status", id]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{id}: {e}: {out}"))
    };
    let created = status("demo-000");
    assert_eq!(created["state"], "stored", "{created}");
    assert_eq!(created["arrivals"][0]["outcome"], "created", "{created}");
    // Three requests with one content, on different partitions: whichever
    // came first stored it, the other two matched it.
    let same: Vec<serde_json::Value> = ["demo-004", "demo-dup-1", "demo-dup-2"].map(status).into();
    let states: Vec<&str> = same.iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|s| **s == "stored").count(), 1, "{same:?}");
    assert_eq!(states.iter().filter(|s| **s == "matched").count(), 2, "{same:?}");
    assert!(same.iter().all(|s| s["arrivals"][0]["content_hash"] == same[0]["arrivals"][0]["content_hash"]), "{same:?}");
    let dead = status("demo-bad-type");
    assert_eq!(dead["state"], "dead_lettered", "{dead}");
    assert!(dead["dead_letters"][0]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{dead}");
    let completed = status("demo-1");
    assert_eq!(completed["state"], "completed", "{completed}");
    assert_eq!(completed["results"].as_array().map(Vec::len), Some(1), "{completed}");
    assert!(completed["results"][0]["label"].as_str().is_some_and(|l| !l.is_empty()), "{completed}");
    let compensated = status("demo-8");
    assert_eq!(compensated["state"], "compensated", "{compensated}");
    assert_eq!(compensated["compensations"][0]["step"], 3, "announced: {compensated}");
    let unknown = status("nobody");
    assert_eq!(unknown["state"], "unknown", "{unknown}");
    for list in ["arrivals", "dead_letters", "results", "compensations"] {
        assert_eq!(unknown[list].as_array().map(Vec::len), Some(0), "{unknown}");
    }
}
