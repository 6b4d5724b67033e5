//! The `hartonomous` binary as users run it, on the embedded default.

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn hartonomous(data_dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .args(args)
        .env("HARTONOMOUS_DATA_DIR", data_dir)
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
