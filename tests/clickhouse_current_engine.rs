//! Every file of `schemas/clickhouse/` on a current ClickHouse engine, not
//! only on the test services' 18.16: `tests/chdb/check_ddl.py` runs them on
//! the engine that the `chdb-core` wheel embeds in-process (ClickHouse 26.9),
//! and checks the tables against the column lists of `src/store/clickhouse/`,
//! the upgrade through 005, crashes and races in 005, a second run of every
//! file, and every analyst query of `schemas/clickhouse/README.md` on sample
//! rows. One test per check group; the script's own output (one line per
//! check, then a `chdb checks:` total) streams through.
//!
//! A Rust test rather than a step of tests/run.sh, so that a plain
//! `cargo test` runs these checks too, and a failure shows up as a named
//! failing test next to the others.
//!
//! Needs Python 3 and chdb, installed by `tests/services.sh up` into the
//! directory that `tests/services.sh env` exports as
//! `HARTONOMOUS_TEST_CHDB_PATH`. When chdb is missing every test fails, saying
//! so; none is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The groups run one at a time: each is CPU-bound on a 2-core machine, and
/// their streamed output stays readable.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `HARTONOMOUS_TEST_CHDB_PATH`, or the path `tests/services.sh env` prints.
fn chdb_path() -> PathBuf {
    if let Some(path) = std::env::var_os("HARTONOMOUS_TEST_CHDB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let script = root().join("tests/services.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("env")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{} env` to find chdb: {e}", script.display()));
    assert!(out.status.success(), "`{} env` failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export HARTONOMOUS_TEST_CHDB_PATH="))
        .map(|p| PathBuf::from(p.trim()))
        .unwrap_or_else(|| panic!("`{} env` exports no HARTONOMOUS_TEST_CHDB_PATH", script.display()))
}

fn run_group(group: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let chdb = chdb_path();
    assert!(
        chdb.join("chdb/__init__.py").is_file(),
        "chdb (the current ClickHouse engine, in-process) is not installed at {}: run `tests/services.sh up`, \
         which installs it, or point HARTONOMOUS_TEST_CHDB_PATH at a directory holding the chdb package",
        chdb.display()
    );
    let script = root().join("tests/chdb/check_ddl.py");
    // stdout and stderr are inherited: the checks stream as they run.
    let status = Command::new("python3")
        .arg(&script)
        .args(["--group", group])
        .current_dir(root())
        .env("PYTHONPATH", &chdb)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot start python3 (needed for {}): {e}", relative(&script)));
    assert!(status.success(), "{} --group {group} failed ({status}); its output above names each failed check", relative(&script));
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// Every file applied in name order as `migrate` applies them; tables,
/// columns and types (vs `ATOMS_COLUMNS`, `ARRIVALS_COLUMNS`,
/// `DEAD_LETTERS_COLUMNS`), engines, keys, the view, the dedup window.
#[test]
fn fresh_database() {
    run_group("fresh");
}

/// 000..003 with rows in the old `atoms`, then 004 and 005: every row kept,
/// the first stored row wins under FINAL, the view recreated, nothing left.
#[test]
fn upgrade_through_005() {
    run_group("upgrade");
}

/// 005 stopped after each of its engine calls and run again, and two
/// migrators running 005 at the same time, interleaved call by call.
#[test]
fn crashes_and_races_in_005() {
    run_group("races");
}

/// Every file run a second time on migrated databases holding rows changes
/// nothing; a second `migrate` changes nothing.
#[test]
fn every_file_twice() {
    run_group("idempotent");
}

/// Every ```sql block of schemas/clickhouse/README.md on sample rows, with
/// the exact answers they must give.
#[test]
fn readme_analyst_queries() {
    run_group("queries");
}
