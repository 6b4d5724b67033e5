#!/usr/bin/env python3
"""Every file of schemas/clickhouse/ on a current ClickHouse engine.

The test services run Debian's ClickHouse 18.16; users run current releases.
This script runs the same schema files on the current engine that the
`chdb-core` wheel embeds in-process (ClickHouse 26.x), in a chdb session on a
temporary directory, and checks what they build:

  fresh       every file applied in name order to an empty database, the way
              `ClickHouseStore::migrate` applies them (src/store/clickhouse/:
              `split_steps`, `execute_script`, `guard_holds`, and the
              `non_replicated_deduplication_window` it sets on current
              servers); the tables, their columns and types (compared with
              ATOMS_COLUMNS, ARRIVALS_COLUMNS and DEAD_LETTERS_COLUMNS, parsed
              out of the Rust source), engines, keys and the view.
  upgrade     000..003 applied, rows stored in the old `atoms` (two contents
              stored twice, one of them in another month), then 004 and 005:
              every row kept (bar a same-partition repeat that the copy's
              insert collapses to the first row, see expected_after_copy), the
              FIRST stored row wins under FINAL, the view recreated on the new
              table, no temporary table left.
  races       005 stopped after each of its engine calls and run again (a
              crash), and, for information, two migrators running 005 at once
              without the migration lock that `migrate` takes (A makes a calls,
              B makes b, then A finishes, then B, for every a and b): it
              reports the interleavings the lock prevents.
  idempotent  every file run a second time, on a fresh and on an upgraded
              database holding rows: nothing changes; nor does a second
              `migrate`.
  queries     sample rows in `atoms`, `atom_arrivals` and `dead_letters`, then
              every ```sql block of schemas/clickhouse/README.md, each checked
              against the exact answer the sample rows give. No block is
              skipped or adapted: the sample rows carry the literal values the
              blocks look for (source 'crm', the hash of 'abc', the dead letter
              at atoms.requests/0/42, correlation id 'req-42'). A block this
              script has no answer for still has to run; an answer whose query
              is gone from the README fails.

Usage: python3 tests/chdb/check_ddl.py [--group NAME]...   (default: all)
Needs `chdb` importable: PYTHONPATH=$HARTONOMOUS_TEST_CHDB_PATH, installed by
`tests/services.sh up` (see `tests/services.sh env`). Standard library
otherwise. Prints one line per check and ends with `chdb checks: ok. N
passed; 0 failed` (not cargo's `test result:` form: tests/run.sh totals cargo
tests, and the Rust wrapper is the test); exits 1 when any check fails, 2 when
it cannot run at all.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "schemas" / "clickhouse"
RUST_STORE = ROOT / "src" / "store" / "clickhouse"
SCHEMA_README = SCHEMA_DIR / "README.md"

# 2^62, the base of `first_wins_rank` (DEFAULT toUInt64(2^62 - *_ms)).
RANK_BASE = 4611686018427387904

try:
    import chdb
    from chdb import session as chdb_session
except ImportError as e:  # pragma: no cover - the message is the point
    print(
        f"error: cannot import chdb ({e}). Install it with `tests/services.sh up` and put its "
        "directory on PYTHONPATH: PYTHONPATH=$HARTONOMOUS_TEST_CHDB_PATH "
        "(eval \"$(tests/services.sh env)\")",
        file=sys.stderr,
    )
    sys.exit(2)


def die(message: str) -> None:
    """This script cannot run at all (not a failed check): exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class CheckFailed(Exception):
    """A check's assertion did not hold; the message says what and why."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def expect_eq(actual, expected, what: str) -> None:
    if actual != expected:
        raise CheckFailed(f"{what}:\n      expected {expected!r}\n      actual   {actual!r}")


# ---------------------------------------------------------------------------
# What the Rust store says (parsed, so that it cannot drift from this script)
# ---------------------------------------------------------------------------


class RustStore:
    """Constants of the ClickHouse store (src/store/clickhouse/*.rs), read
    from its source text. Every file of the folder is read, so a constant may
    move between them; include_str! paths are relative to the folder."""

    def __init__(self, folder: Path):
        self.path = folder
        files = sorted(folder.glob("*.rs"))
        if not files:
            die(f"no Rust files in {folder}; update RUST_STORE in {__file__}")
        self.text = "\n".join(f.read_text(encoding="utf-8") for f in files)
        self.bootstrap = self._include("BOOTSTRAP", single=True)[0]
        self.migrations = self._include("MIGRATIONS", single=False)
        self.run_if = self._str_const("RUN_IF")
        self.atoms_columns = self._columns("ATOMS_COLUMNS")
        self.arrivals_columns = self._columns("ARRIVALS_COLUMNS")
        self.dead_letters_columns = self._columns("DEAD_LETTERS_COLUMNS")
        self.dedup_window = int(self._find(r"const DEDUP_WINDOW: u32 = ([0-9_]+);", "DEDUP_WINDOW").replace("_", ""))
        self.dedup_alter = self._find(r'format!\(\s*"(ALTER TABLE \{table\} MODIFY SETTING [^"]*)"', "the ALTER of enable_dedup_window")
        tables = self._find(r"for table in \[([^\]]*)\]\s*\{\s*self\.enable_dedup_window", "the tables of enable_dedup_window")
        self.dedup_tables = re.findall(r'"([^"]+)"', tables)

    def _find(self, pattern: str, what: str) -> str:
        m = re.search(pattern, self.text, re.S)
        if not m:
            die(f"cannot find {what} in {self.path} (pattern {pattern!r}); update {__file__}")
        return m.group(1)

    def _str_const(self, name: str) -> str:
        return self._find(rf'pub const {name}: &str = "([^"]*)";', name)

    def _block(self, name: str) -> str:
        body = self._find(rf"pub const {name}: [^=]*= &\[(.*?)\n\];", name)
        return "\n".join(line.split("//", 1)[0] for line in body.splitlines())

    def _columns(self, name: str) -> list[tuple[str, str]]:
        cols = re.findall(r'\(\s*"([^"]+)"\s*,\s*"([^"]+)"\s*\)', self._block(name))
        if not cols:
            die(f"{name} in {self.path} has no (\"column\", \"type\") pairs")
        return cols

    def _include(self, name: str, single: bool) -> list[tuple[str, str]]:
        body = self._find(rf"pub const {name}: [^=]*=\s*(.*?\)\)?);", name) if single else self._block(name)
        pairs = re.findall(r'\(\s*"([^"]+)"\s*,\s*include_str!\("([^"]+)"\)\s*\)', body)
        if not pairs:
            die(f"{name} in {self.path} has no (\"file\", include_str!(...)) entries")
        return [(file, str((self.path / inc).resolve())) for file, inc in pairs]


RUST = RustStore(RUST_STORE)


# ---------------------------------------------------------------------------
# The migrator, as src/store/clickhouse/ has it
# ---------------------------------------------------------------------------


def split_statements(script: str) -> list[str]:
    """`split_statements`: at `;` outside quotes (with backslash escapes) and
    outside `--` and `/* */` comments; comments are dropped."""
    out: list[str] = []
    current: list[str] = []
    quote = None
    i, n = 0, len(script)

    def flush() -> None:
        statement = "".join(current).strip()
        if statement:
            out.append(statement)
        current.clear()

    while i < n:
        c = script[i]
        i += 1
        if quote is not None:
            current.append(c)
            if c == "\\":
                if i < n:
                    current.append(script[i])
                    i += 1
            elif c == quote:
                quote = None
            continue
        if c in "'\"`":
            quote = c
            current.append(c)
        elif c == "-" and i < n and script[i] == "-":
            end = script.find("\n", i)
            if end < 0:
                i = n
            else:
                current.append("\n")
                i = end + 1
        elif c == "/" and i < n and script[i] == "*":
            end = script.find("*/", i + 1)
            i = n if end < 0 else end + 2
            current.append(" ")
        elif c == ";":
            flush()
        else:
            current.append(c)
    flush()
    return out


@dataclass
class Step:
    guard: str | None
    sql: str


def split_steps(script: str) -> list[Step]:
    """`split_steps`: statements, each with the `-- hartonomous:run-if:` guard
    written on the line before it (the guard applies to the first statement
    after it only)."""
    steps: list[Step] = []
    segment: list[str] = []
    guard: str | None = None

    def flush(guard: str | None) -> None:
        for k, sql in enumerate(split_statements("".join(segment))):
            steps.append(Step(guard if k == 0 else None, sql))
        segment.clear()

    lines = script.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # Rust's str::lines() yields no empty last line
    for line in lines:
        line = line.removesuffix("\r")
        stripped = line.lstrip()
        if stripped.startswith(RUST.run_if):
            flush(guard)
            guard = stripped[len(RUST.run_if):].strip()
        else:
            segment.append(line + "\n")
    flush(guard)
    return steps


class MigrationError(Exception):
    pass


class Engine:
    """One chdb session (the current engine, in-process) on a temporary directory."""

    def __init__(self, path: str):
        self.session = chdb_session.Session(path)

    def run(self, sql: str, fmt: str = "TabSeparated") -> str:
        return str(self.session.query(sql, fmt))

    def table(self, sql: str) -> list[dict[str, str]]:
        """The rows of a query as dicts, from TabSeparatedWithNames, unescaped."""
        text = self.run(sql, "TabSeparatedWithNames")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            return []
        names = [tsv_unescape(v) for v in lines[0].split("\t")]
        return [dict(zip(names, (tsv_unescape(v) for v in line.split("\t")))) for line in lines[1:]]

    def rows(self, sql: str) -> list[list[str]]:
        text = self.run(sql)
        return [[tsv_unescape(v) for v in line.split("\t")] for line in text.split("\n") if line != ""]

    def scalar(self, sql: str) -> str:
        rows = self.rows(sql)
        expect(len(rows) == 1 and len(rows[0]) == 1, f"`{sql}` returned {rows!r}, not one value")
        return rows[0][0]

    def use(self, database: str) -> None:
        self.run(f"USE {database}")

    def fresh_database(self, name: str) -> None:
        """A new empty database (the engine's default kind: Atomic), made current."""
        self.run(f"DROP DATABASE IF EXISTS {name}")
        self.run(f"CREATE DATABASE {name}")
        self.use(name)


TSV_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "b": "\b", "f": "\f", "0": "\0", "\\": "\\", "'": "'"}


def tsv_unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return re.sub(r"\\(.)", lambda m: TSV_ESCAPES.get(m.group(1), "\\" + m.group(1)), value)


def guard_holds(engine: Engine, query: str) -> bool:
    """`guard_holds`: the guard query, as `SELECT toUInt64((query))`, is non-zero."""
    return int(engine.scalar(f"SELECT toUInt64(({query}))")) != 0


def migrate_calls(engine: Engine, name: str, script: str, events: list[str]) -> Iterator[str]:
    """`execute_script`, one engine call per resumption: it yields after each
    call (saying which), so that a driver can stop it there (a crash) or run
    another migrator in between (a race). Appends what it did per step to
    `events`; raises MigrationError where `execute_script` returns an error."""
    for i, step in enumerate(split_steps(script), 1):
        where = f"schemas/clickhouse/{name} statement {i}"
        if step.guard is not None:
            holds = guard_holds(engine, step.guard)
            yield f"{i}:guard"
            if not holds:
                events.append(f"{i}:skipped")
                continue
        try:
            engine.run(step.sql)
            error = None
        except chdb.ChdbError as e:
            error = e
        yield f"{i}:run"
        if error is None:
            events.append(f"{i}:ran")
            continue
        if step.guard is None:
            raise MigrationError(f"{where} failed on the current engine: {error}\n      statement: {one_line(step.sql)}")
        holds = guard_holds(engine, step.guard)
        yield f"{i}:recheck"
        if holds:
            raise MigrationError(f"{where} failed and its run-if guard still holds: {error}\n      statement: {one_line(step.sql)}")
        events.append(f"{i}:failed-but-done")


def apply_file(engine: Engine, name: str, events: list[str] | None = None) -> list[str]:
    events = [] if events is None else events
    for _ in migrate_calls(engine, name, schema_text(name), events):
        pass
    return events


def record_file(engine: Engine, name: str) -> None:
    """What `migrate` writes after applying a numbered file."""
    digest = hashlib.sha256(schema_text(name).encode("utf-8")).hexdigest()
    engine.run(f"INSERT INTO hartonomous_migrations (name, checksum, applied_at) VALUES ({lit(name)}, {lit(digest)}, now())")


def migrate(engine: Engine, names: list[str], dedup_window: bool = True) -> dict[str, list[str]]:
    """`ClickHouseStore::migrate` on the current database for the numbered
    files `names` (the bootstrap file always runs first and is not recorded;
    recorded files are skipped), then, as on every server with insert
    deduplication tokens, the non_replicated_deduplication_window setting.
    Returns the steps run per applied file."""
    applied = {}
    apply_file(engine, RUST.bootstrap[0])
    recorded = {r[0] for r in engine.rows("SELECT name FROM hartonomous_migrations")}
    for name in names:
        if name in recorded:
            continue
        applied[name] = apply_file(engine, name)
        record_file(engine, name)
    if dedup_window:
        # Only tables that exist: a build from before 004 had no atom_arrivals.
        existing = {r[0] for r in engine.rows("SELECT name FROM system.tables WHERE database = currentDatabase()")}
        for table in RUST.dedup_tables:
            if table in existing:
                engine.run(RUST.dedup_alter.replace("{table}", table).replace("{DEDUP_WINDOW}", str(RUST.dedup_window)))
    return applied


def one_line(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= 160 else text[:157] + "..."


def schema_files() -> list[str]:
    return sorted(p.name for p in SCHEMA_DIR.glob("*.sql"))


def schema_text(name: str) -> str:
    return (SCHEMA_DIR / name).read_text(encoding="utf-8")


NUMBERED = [name for name, _ in RUST.migrations]
UPGRADE_FROM = [n for n in NUMBERED if n[:3] <= "003"]  # what a database had before 004
UPGRADE_TO = [n for n in NUMBERED if n[:3] > "003"]
# The guarded rebuild of `atoms` that the races group interrupts and interleaves.
REBUILD = next((n for n in NUMBERED if n.startswith("005_")), "005 (missing)")
BEFORE_REBUILD = [n for n in UPGRADE_TO if n < REBUILD]
AFTER_REBUILD = [n for n in UPGRADE_TO if n > REBUILD]


# ---------------------------------------------------------------------------
# SQL literals and sample rows
# ---------------------------------------------------------------------------


def lit(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        raise TypeError("no Bool on 18.16")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(lit(x) for x in v) + "]"
    if isinstance(v, bytes):
        return "'" + "".join(f"\\x{b:02X}" for b in v) + "'"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def datetime_secs(ms: int) -> int:
    """The store's `datetime_secs`: the DateTime column's clamped seconds."""
    return max(0, min(ms // 1000, 2**32 - 1))


def fmt_dt(ms: int) -> str:
    return dt.datetime.fromtimestamp(datetime_secs(ms), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


ATOM_COLUMNS_WRITTEN = [
    "content_hash", "content_type", "content", "content_size", "source_system", "correlation_id", "metadata",
    "embedding", "embedding_model", "embedding_dimension", "event_time", "event_time_ms", "source_topic",
    "source_partition", "source_offset", "ingested_at", "ingested_at_ms", "trace_id",
]
ARRIVAL_COLUMNS_WRITTEN = [
    "source_topic", "source_partition", "source_offset", "content_hash", "outcome", "content_type", "content_size",
    "source_system", "correlation_id", "event_time", "event_time_ms", "arrived_at", "arrived_at_ms", "trace_id",
]
DEAD_LETTER_COLUMNS_WRITTEN = [
    "topology", "source_topic", "source_partition", "source_offset", "stage", "reason", "error", "attempts",
    "failed_at", "failed_at_ms", "original_key", "original_payload",
]


def atom(content: str, source: str, corr: str, partition: int, offset: int, ingested_ms: int, *,
         content_type: str = "text/plain", event_ms: int | None = None, trace: str = "") -> dict:
    event_ms = ingested_ms - 1500 if event_ms is None else event_ms
    return {
        "content_hash": sha256_hex(content), "content_type": content_type, "content": content,
        "content_size": len(content.encode("utf-8")), "source_system": source, "correlation_id": corr,
        "metadata": '{"k":"v"}', "embedding": [0.5, 0.25], "embedding_model": "hashing-2",
        "embedding_dimension": 2, "event_time": datetime_secs(event_ms), "event_time_ms": event_ms,
        "source_topic": "atoms.requests", "source_partition": partition, "source_offset": offset,
        "ingested_at": datetime_secs(ingested_ms), "ingested_at_ms": ingested_ms, "trace_id": trace or f"trace-{corr}",
    }


def arrival(a_content: str, outcome: str, source: str, corr: str, partition: int, offset: int, arrived_ms: int,
            *, content_type: str = "text/plain", trace: str = "") -> dict:
    return {
        "source_topic": "atoms.requests", "source_partition": partition, "source_offset": offset,
        "content_hash": sha256_hex(a_content), "outcome": outcome, "content_type": content_type,
        "content_size": len(a_content.encode("utf-8")), "source_system": source, "correlation_id": corr,
        "event_time": datetime_secs(arrived_ms - 1500), "event_time_ms": arrived_ms - 1500,
        "arrived_at": datetime_secs(arrived_ms), "arrived_at_ms": arrived_ms, "trace_id": trace or f"trace-{corr}",
    }


def dead_letter(partition: int, offset: int, stage: str, reason: str, error: str, failed_ms: int, *,
                attempts: int = 1, key: bytes | None = None, payload: bytes = b"\x01\x02") -> dict:
    return {
        "topology": "atom_ingestion", "source_topic": "atoms.requests", "source_partition": partition,
        "source_offset": offset, "stage": stage, "reason": reason, "error": error, "attempts": attempts,
        "failed_at": datetime_secs(failed_ms), "failed_at_ms": failed_ms, "original_key": key,
        "original_payload": payload,
    }


def insert(engine: Engine, table: str, columns: list[str], rows: list[dict]) -> None:
    """One INSERT (one block) with an explicit column list, as the store writes:
    `first_wins_rank` is left to its DEFAULT. async_insert off, as the store sets it."""
    values = ", ".join("(" + ", ".join(lit(r[c]) for c in columns) + ")" for r in rows)
    engine.run(f"INSERT INTO {table} ({', '.join(columns)}) SETTINGS async_insert = 0 VALUES {values}")


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def check(self, name: str, fn: Callable[[], str | None]) -> bool:
        started = time.monotonic()
        try:
            note = fn()
        except CheckFailed as e:
            return self._fail(name, str(e))
        except (MigrationError, chdb.ChdbError) as e:
            return self._fail(name, f"{type(e).__name__}: {e}")
        except Exception:  # a bug in this script: show where
            return self._fail(name, traceback.format_exc().rstrip())
        self.passed += 1
        extra = f" ({note})" if note else ""
        print(f"test {name} ... ok{extra} [{time.monotonic() - started:.2f}s]", flush=True)
        return True

    def _fail(self, name: str, message: str) -> bool:
        self.failed.append(name)
        print(f"test {name} ... FAILED\n    {message}", flush=True)
        return False


def schema_snapshot(engine: Engine, db: str) -> dict:
    """Everything the DDL decides, plus row counts, of one database."""
    tables = engine.rows(
        "SELECT name, engine, engine_full, sorting_key, partition_key, primary_key, create_table_query "
        f"FROM system.tables WHERE database = {lit(db)} ORDER BY name"
    )
    columns = engine.rows(
        "SELECT table, position, name, type, default_kind, default_expression "
        f"FROM system.columns WHERE database = {lit(db)} ORDER BY table, position"
    )
    counts = {}
    for name, engine_name, *_ in tables:
        if "MergeTree" in engine_name:
            counts[name] = engine.scalar(f"SELECT count() FROM {db}.{name}")
            if engine_name != "MergeTree":
                counts[name + " FINAL"] = engine.scalar(f"SELECT count() FROM {db}.{name} FINAL")
    return {"tables": tables, "columns": columns, "counts": counts}


def stop_merges(engine: Engine, db: str) -> None:
    """Stops background merges on every table of `db`, so that physical row
    counts only change by what a statement does (a merge changes no answer
    under FINAL, but it does change count() without FINAL)."""
    for (name,) in engine.rows(f"SELECT name FROM system.tables WHERE database = {lit(db)} AND engine LIKE '%MergeTree'"):
        engine.run(f"SYSTEM STOP MERGES {db}.{name}")


def columns_of(engine: Engine, db: str, table: str) -> list[tuple[str, str]]:
    """(name, type) of each column of `table`, in order."""
    rows = engine.rows(f"SELECT name, type FROM system.columns WHERE database = {lit(db)} AND table = {lit(table)} ORDER BY position")
    return [(name, ty) for name, ty in rows]


def table_names(engine: Engine, db: str) -> list[str]:
    return [r[0] for r in engine.rows(f"SELECT name FROM system.tables WHERE database = {lit(db)} ORDER BY name")]


EXPECTED_TABLES = sorted(
    [
        "hartonomous_migrations",
        "atoms",
        "dead_letters",
        "atoms_per_source_hour",
        "atoms_per_source_hour_mv",
        "atom_arrivals",
        # ensemble inference (006-008)
        "inference_results",
        "model_outputs",
        "inference_results_live",
        "model_outputs_live",
        "inference_compensations",
    ]
)


def summary_vs_atoms(engine: Engine) -> tuple[list, list]:
    """Per source: the hourly summary's atoms and bytes, and the same from atoms FINAL."""
    summary = engine.rows(
        "SELECT source_system, uniqExactMerge(atoms), arraySum(arrayMap(t -> t.2, groupUniqArrayMerge(bytes))) "
        "FROM atoms_per_source_hour GROUP BY source_system ORDER BY source_system"
    )
    final = engine.rows(
        "SELECT source_system, count(), sum(content_size) FROM atoms FINAL GROUP BY source_system ORDER BY source_system"
    )
    return summary, final


# --- group: fresh -----------------------------------------------------------


def group_fresh(c: Checks, engine: Engine) -> None:
    db = "fresh"

    def files_match_rust():
        on_disk = schema_files()
        bundled = [RUST.bootstrap[0]] + NUMBERED
        expect_eq(bundled, on_disk, "BOOTSTRAP + MIGRATIONS of src/store/clickhouse/ vs schemas/clickhouse/*.sql in name order")
        for name, path in [RUST.bootstrap] + RUST.migrations:
            expect_eq(path, str(SCHEMA_DIR / name), f"include_str! path of {name}")
        return f"{len(on_disk)} files"

    c.check("fresh::schema_files_are_the_bundled_ones_in_name_order", files_match_rust)

    engine.fresh_database(db)
    applied: list[str] = []
    for name in schema_files():

        def apply(name=name):
            expect_eq(engine.scalar("SELECT currentDatabase()"), db, "current database")
            events = apply_file(engine, name)
            if name != RUST.bootstrap[0]:
                record_file(engine, name)
            applied.append(name)
            return f"{len(events)} statements: {' '.join(events)}"

        c.check(f"fresh::apply_{name.removesuffix('.sql')}", apply)

    def dedup_window():
        # What `connect` detects before `migrate` sets the window (supports_dedup_token).
        for table, setting in [
            ("system.settings", "insert_deduplication_token"),
            ("system.merge_tree_settings", "non_replicated_deduplication_window"),
            ("system.settings", "async_insert"),  # the store turns it off per insert
        ]:
            expect_eq(engine.scalar(f"SELECT count() FROM {table} WHERE name = {lit(setting)}"), "1", f"{setting} in {table}")
        for table in RUST.dedup_tables:
            engine.run(RUST.dedup_alter.replace("{table}", table).replace("{DEDUP_WINDOW}", str(RUST.dedup_window)))
            full = engine.scalar(f"SELECT engine_full FROM system.tables WHERE database = '{db}' AND name = {lit(table)}")
            expect(f"non_replicated_deduplication_window = {RUST.dedup_window}" in full, f"{table}: setting not in engine_full: {full}")
        return f"ALTER TABLE ... MODIFY SETTING on {', '.join(RUST.dedup_tables)}"

    c.check("fresh::migrate_sets_the_dedup_window", dedup_window)

    c.check("fresh::exactly_the_schema_tables", lambda: expect_eq(table_names(engine, db), EXPECTED_TABLES, "tables"))

    store_lists = [("atoms", RUST.atoms_columns), ("atom_arrivals", RUST.arrivals_columns), ("dead_letters", RUST.dead_letters_columns)]
    for table, columns in store_lists:

        def check_columns(table=table, columns=columns):
            actual = columns_of(engine, db, table)
            expect_eq(actual, columns, f"columns of {table} (name, type) in order, vs the list in src/store/clickhouse/")
            return f"{len(columns)} columns"

        c.check(f"fresh::columns_of_{table}_match_the_store", check_columns)

    POSITION = "source_topic, source_partition, source_offset"
    engines = {
        "atoms": ("ReplacingMergeTree", "ReplacingMergeTree(first_wins_rank)", "content_hash", "toYYYYMM(ingested_at)"),
        "atom_arrivals": ("ReplacingMergeTree", "ReplacingMergeTree(first_wins_rank)", POSITION, "toYYYYMM(arrived_at)"),
        "dead_letters": ("ReplacingMergeTree", "ReplacingMergeTree", POSITION, "toYYYYMM(failed_at)"),
        "atoms_per_source_hour": ("AggregatingMergeTree", "AggregatingMergeTree", "source_system, hour", "toYYYYMM(hour)"),
        "hartonomous_migrations": ("MergeTree", "MergeTree", "name, applied_at", ""),
    }
    for table, (engine_name, full_prefix, sorting, partition) in engines.items():

        def check_engine(table=table, engine_name=engine_name, full_prefix=full_prefix, sorting=sorting, partition=partition):
            r = engine.table(
                f"SELECT engine, engine_full, sorting_key, partition_key FROM system.tables WHERE database = '{db}' AND name = {lit(table)}"
            )
            expect(len(r) == 1, f"{table} is missing")
            r = r[0]
            expect_eq(r["engine"], engine_name, f"engine of {table}")
            starts = re.match(re.escape(full_prefix) + r"(\s|$)", r["engine_full"]) is not None
            expect(starts, f"engine_full of {table} should start with {full_prefix!r}: {r['engine_full']}")
            expect_eq(r["sorting_key"], sorting, f"ORDER BY of {table}")
            expect_eq(r["partition_key"], partition, f"PARTITION BY of {table}")
            return full_prefix

        c.check(f"fresh::engine_of_{table}", check_engine)

    def check_view():
        r = engine.table(
            f"SELECT engine, create_table_query FROM system.tables WHERE database = '{db}' AND name = 'atoms_per_source_hour_mv'"
        )
        expect(len(r) == 1, "atoms_per_source_hour_mv is missing")
        expect_eq(r[0]["engine"], "MaterializedView", "engine of atoms_per_source_hour_mv")
        q = r[0]["create_table_query"]
        expect(f"TO {db}.atoms_per_source_hour" in q, f"the view does not write to atoms_per_source_hour: {q}")
        expect(f"FROM {db}.atoms" in q, f"the view does not read atoms: {q}")
        return "TO atoms_per_source_hour, FROM atoms"

    c.check("fresh::view_feeds_atoms_per_source_hour", check_view)

    def no_rows_yet():
        for table in ["atoms", "atom_arrivals", "dead_letters", "atoms_per_source_hour"]:
            expect_eq(engine.scalar(f"SELECT count() FROM {table}"), "0", f"rows in {table}")
        recorded = [r[0] for r in engine.rows("SELECT name FROM hartonomous_migrations ORDER BY name")]
        expect_eq(recorded, NUMBERED, "files recorded in hartonomous_migrations")

    c.check("fresh::empty_and_recorded", no_rows_yet)

    def rank_default():
        t = 1_763_000_000_000
        insert(engine, "atoms", ATOM_COLUMNS_WRITTEN, [atom("rank", "crm", "r-1", 0, 1, t)])
        insert(engine, "atom_arrivals", ARRIVAL_COLUMNS_WRITTEN, [arrival("rank", "created", "crm", "r-1", 0, 1, t + 7)])
        expect_eq(engine.rows("SELECT first_wins_rank FROM atoms"), [[str(RANK_BASE - t)]], "atoms.first_wins_rank")
        expect_eq(engine.rows("SELECT first_wins_rank FROM atom_arrivals"), [[str(RANK_BASE - t - 7)]], "atom_arrivals.first_wins_rank")
        engine.run("TRUNCATE TABLE atoms")
        engine.run("TRUNCATE TABLE atom_arrivals")
        engine.run("TRUNCATE TABLE atoms_per_source_hour")
        return "2^62 - ingested_at_ms / arrived_at_ms, filled on insert"

    c.check("fresh::first_wins_rank_is_filled_by_its_default", rank_default)

    def dedup_token():
        # What the store relies on where supports_dedup_token: a retried chunk
        # (same token, async_insert off) is dropped by the server.
        t = 1_763_000_000_000
        row = atom("tok", "crm", "t-1", 0, 9, t)
        values = "(" + ", ".join(lit(row[col]) for col in ATOM_COLUMNS_WRITTEN) + ")"
        sql = (f"INSERT INTO atoms ({', '.join(ATOM_COLUMNS_WRITTEN)}) SETTINGS async_insert = 0, "
               f"insert_deduplication_token = 'hartonomous-atoms-test' VALUES {values}")
        engine.run(sql)
        engine.run(sql)
        n = engine.scalar("SELECT count() FROM atoms")
        engine.run("TRUNCATE TABLE atoms")
        engine.run("TRUNCATE TABLE atoms_per_source_hour")
        expect_eq(n, "1", "physical rows after the same chunk was inserted twice with one insert_deduplication_token")
        return "second insert dropped"

    c.check("fresh::retried_chunk_with_the_same_token_is_dropped", dedup_token)

    def hash_look_ups():
        # The store's content-hash look-ups (src/store/clickhouse/query.rs)
        # bind the window's hashes as one array literal for `?`: the shape
        # must select exactly the stored rows on a current engine too.
        source = (ROOT / "src/store/clickhouse/query.rs").read_text(encoding="utf-8")
        literals = [re.sub(r"\\\n\s*", "", m) for m in re.findall(r'"(SELECT content_hash[^"]*)"', source, re.S)]
        look_ups = [q for q in literals if "IN (SELECT arrayJoin(?))" in q]
        expect_eq(len(look_ups), 2, f"content-hash look-ups in query.rs: {literals}")
        t = 1_763_000_000_000
        stored = [atom(f"look-{i}", "crm", f"l-{i}", 0, i, t) for i in range(3)]
        insert(engine, "atoms", ATOM_COLUMNS_WRITTEN, stored)
        asked = [stored[0]["content_hash"], sha256_hex("absent"), stored[2]["content_hash"]]
        array = "[" + ", ".join(lit(h) for h in asked) + "]"
        for q in look_ups:
            got = sorted(r[0] for r in engine.rows(q.replace("?", array)))
            expect_eq(got, sorted([stored[0]["content_hash"], stored[2]["content_hash"]]), f"hashes found by {q}")
        engine.run("TRUNCATE TABLE atoms")
        engine.run("TRUNCATE TABLE atoms_per_source_hour")
        return f"{len(look_ups)} look-ups, 2 of 3 asked found"

    c.check("fresh::content_hash_look_ups_find_exactly_the_stored", hash_look_ups)

    def zero_datetime():
        # 001_atoms.sql: the clamped zero DateTime prints as 1970-01-01 00:00:00
        # on current releases (0000-00-00 00:00:00 on 18.16).
        expect_eq(engine.scalar("SELECT toDateTime(0, 'UTC')"), "1970-01-01 00:00:00", "the zero DateTime")

    c.check("fresh::zero_datetime_prints_as_1970", zero_datetime)


# --- group: upgrade ---------------------------------------------------------

# A fixed time in November 2026; 40 days earlier is another month (partition).
T_UPGRADE = int(dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.timezone.utc).timestamp() * 1000)


def upgrade_rows() -> list[dict]:
    """Rows as a processor on 001..003 stored them, in storing order. "alpha"
    was stored twice in one month (a race), "beta" twice across months (a
    replay after 40 days); the first row of each is the one that must win."""
    t = T_UPGRADE
    return [
        atom("beta", "crm", "u-beta-first", 1, 10, t - 40 * 86_400_000),
        atom("alpha", "crm", "u-alpha-first", 0, 1, t),
        atom("gamma", "erp", "u-gamma", 2, 5, t + 1_000, content_type="application/json"),
        atom("alpha", "crm", "u-alpha-second", 1, 4, t + 60_000),
        atom("beta", "crm", "u-beta-second", 0, 2, t + 90_000),
    ]


def build_pre_004(engine: Engine, db: str) -> list[dict]:
    """A database as 001..003 left it, holding upgrade_rows() (one insert per row)."""
    engine.fresh_database(db)
    migrate(engine, UPGRADE_FROM, dedup_window=True)
    # The precondition: both rows of a content stored twice are still there
    # when 005 runs. On a live server a background merge may already have
    # collapsed such a pair to the LATER row (the old version column), which
    # no migration can undo; here merges of the old table are stopped.
    engine.run(f"SYSTEM STOP MERGES {db}.atoms")
    rows = upgrade_rows()
    for r in rows:
        insert(engine, "atoms", ATOM_COLUMNS_WRITTEN, [r])
    return rows


def winners(engine: Engine) -> dict[str, str]:
    return {h: corr for h, corr in engine.rows("SELECT content_hash, correlation_id FROM atoms FINAL")}


def partition_of(r: dict) -> str:
    return dt.datetime.fromtimestamp(r["ingested_at"], dt.timezone.utc).strftime("%Y%m")


def expected_after_copy(rows: list[dict]) -> list[str]:
    """The correlation ids of the rows 005's copy leaves in the new atoms:
    every stored row, except that rows of one content within one partition
    arrive in one inserted block, and current releases collapse such rows on
    insert (optimize_on_insert = 1 by default) to the one the new engine keeps,
    the first stored. 18.16 keeps all of them until a merge."""
    keep: dict[tuple[str, str], dict] = {}
    for r in rows:
        k = (partition_of(r), r["content_hash"])
        if k not in keep or r["ingested_at_ms"] < keep[k]["ingested_at_ms"]:
            keep[k] = r
    return sorted(r["correlation_id"] for r in keep.values())


def expected_first_winners(rows: list[dict]) -> dict[str, str]:
    first: dict[str, dict] = {}
    for r in rows:
        if r["content_hash"] not in first or r["ingested_at_ms"] < first[r["content_hash"]]["ingested_at_ms"]:
            first[r["content_hash"]] = r
    return {h: r["correlation_id"] for h, r in first.items()}


def check_upgraded(engine: Engine, db: str, rows: list[dict], *, allow_copies: bool = False) -> str:
    """The state 004 + 005 must leave, whatever interruptions or races happened."""
    names = table_names(engine, db)
    leftovers = [n for n in names if n not in EXPECTED_TABLES]
    expect(not leftovers, f"tables left behind: {leftovers}")
    expect_eq(names, EXPECTED_TABLES, "tables")
    expect_eq(columns_of(engine, db, "atoms"), RUST.atoms_columns, "columns of atoms")
    full = engine.scalar(f"SELECT engine_full FROM system.tables WHERE database = '{db}' AND name = 'atoms'")
    expect(full.startswith("ReplacingMergeTree(first_wins_rank) "), f"atoms engine: {full}")
    physical = int(engine.scalar("SELECT count() FROM atoms"))
    kept = expected_after_copy(rows)
    present = [r[0] for r in engine.rows("SELECT DISTINCT correlation_id FROM atoms ORDER BY correlation_id")]
    expect_eq(present, kept, "rows physically in atoms (every stored row, same-partition repeats collapsed to the first on insert)")
    expect_eq(int(engine.scalar("SELECT count() FROM (SELECT DISTINCT * FROM atoms)")), len(kept), "distinct physical rows in atoms")
    if allow_copies:
        expect(physical >= len(kept), f"{physical} physical rows in atoms, fewer than {len(kept)}")
    else:
        expect_eq(physical, len(kept), "physical rows in atoms")
    expect_eq(winners(engine), expected_first_winners(rows), "content_hash -> correlation_id under FINAL (the first stored row wins)")
    bad_rank = engine.scalar(f"SELECT count() FROM atoms WHERE first_wins_rank != toUInt64({RANK_BASE} - ingested_at_ms)")
    expect_eq(bad_rank, "0", "rows whose first_wins_rank is not 2^62 - ingested_at_ms")
    q = engine.scalar(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' AND name = 'atoms_per_source_hour_mv'")
    expect(f"FROM {db}.atoms " in q or q.endswith(f"FROM {db}.atoms"), f"the view does not read the new atoms: {q}")
    summary, final = summary_vs_atoms(engine)
    expect_eq(summary, final, "per source: atoms_per_source_hour (uniqExactMerge, bytes) vs atoms FINAL (count, sum(content_size))")
    return f"{physical} physical rows, {len(final)} sources"


def group_upgrade(c: Checks, engine: Engine) -> None:
    db = "upgraded"
    rows: list[dict] = []

    def before():
        rows.extend(build_pre_004(engine, db))
        expect_eq(engine.scalar("SELECT count() FROM atoms"), str(len(rows)), "physical rows in the old atoms")
        # The bug 005 fixes: under ReplacingMergeTree(ingested_at_ms) the LATER row wins.
        later = {r["content_hash"]: r["correlation_id"] for r in sorted(rows, key=lambda r: r["ingested_at_ms"])}
        expect_eq(winners(engine), later, "old atoms under FINAL: the later row wins, across partitions too")
        partitions = engine.scalar("SELECT uniqExact(_partition_id) FROM atoms WHERE correlation_id LIKE 'u-beta-%'")
        expect_eq(partitions, "2", "partitions holding the two beta rows")
        summary, final = summary_vs_atoms(engine)
        expect_eq(summary, final, "the old view's summary vs atoms FINAL")
        return f"001..003 applied; {len(rows)} rows, {len(later)} contents; FINAL keeps the later row, also across months"

    if not c.check("upgrade::old_atoms_keep_the_later_row", before):
        return

    events: dict[str, list[str]] = {}

    def apply_new():
        events.update(migrate(engine, NUMBERED))
        expect_eq(list(events), UPGRADE_TO, "files applied by the upgrade")
        return "; ".join(f"{n}: {' '.join(e)}" for n, e in events.items())

    if not c.check("upgrade::apply_004_and_005", apply_new):
        return

    c.check("upgrade::every_row_kept_and_the_first_stored_row_wins", lambda: check_upgraded(engine, db, rows))

    def no_temporary_tables():
        for name in ["atoms_rebuild_005", "atoms_before_005"]:
            expect(name not in table_names(engine, db), f"{name} left behind")
        # On this upgrade every step of 005 ran (none was skipped by its guard).
        expect(all(e.endswith(":ran") for e in events[REBUILD]), f"005 steps: {events[REBUILD]}")

    c.check("upgrade::no_temporary_table_left", no_temporary_tables)

    def view_on_new_table():
        new = atom("delta", "web", "u-delta", 2, 6, T_UPGRADE + 120_000, content_type="text/html")
        insert(engine, "atoms", ATOM_COLUMNS_WRITTEN, [new])
        rows.append(new)
        summary, final = summary_vs_atoms(engine)
        expect_eq(summary, final, "summary vs atoms FINAL after an insert into the rebuilt atoms")
        expect(["web", "1", str(new["content_size"])] in summary, f"the view did not see the new atom: {summary}")
        return "an atom stored after 005 reaches atoms_per_source_hour"

    c.check("upgrade::view_recreated_on_the_rebuilt_atoms", view_on_new_table)

    def same_schema_as_fresh():
        engine.fresh_database("fresh_for_upgrade")
        migrate(engine, NUMBERED)
        fresh = schema_snapshot(engine, "fresh_for_upgrade")
        upgraded = schema_snapshot(engine, db)
        norm = lambda snap, name: [[v.replace(f"{name}.", "DB.") for v in r] for r in snap["tables"]]
        expect_eq(norm(upgraded, db), norm(fresh, "fresh_for_upgrade"), "system.tables of the upgraded vs a fresh database")
        expect_eq(upgraded["columns"], fresh["columns"], "system.columns of the upgraded vs a fresh database")
        engine.use(db)
        return "tables, engines, keys, columns and defaults identical"

    c.check("upgrade::same_schema_as_a_fresh_database", same_schema_as_fresh)

    def recorded():
        names = [r[0] for r in engine.rows("SELECT name FROM hartonomous_migrations ORDER BY name")]
        expect_eq(names, NUMBERED, "files recorded in hartonomous_migrations")

    c.check("upgrade::all_files_recorded", recorded)


# --- group: races -----------------------------------------------------------


def calls_of_005(engine: Engine) -> int:
    """Engine calls 005 makes on an uninterrupted upgrade."""
    prepare_005(engine, "count_calls")
    n = sum(1 for _ in migrate_calls(engine, REBUILD, schema_text(REBUILD), []))
    engine.run("DROP DATABASE count_calls SYNC")
    return n


def prepare_005(engine: Engine, db: str) -> list[dict]:
    rows = build_pre_004(engine, db)
    for name in BEFORE_REBUILD:
        apply_file(engine, name)
    return rows


def finish_after_005(engine: Engine) -> None:
    for name in AFTER_REBUILD:
        apply_file(engine, name)


def drive(calls: Iterator[str], label: str, limit: int | None, trace: list[str]) -> int:
    """Lets one migrator make up to `limit` engine calls (all when None),
    logging each in `trace`; returns how many it made."""
    made = 0
    for call in islice(calls, limit):
        trace.append(label + call)
        made += 1
    return made


def group_races(c: Checks, engine: Engine) -> None:
    last = REBUILD
    n_calls = calls_of_005(engine)

    def crash_and_rerun():
        done = []
        for k in range(n_calls + 1):
            db = f"crash_{k}"
            rows = prepare_005(engine, db)
            calls = migrate_calls(engine, last, schema_text(last), [])
            made = list(islice(calls, k))  # k calls made, then the process dies
            calls.close()
            expect_eq(len(made), k, "engine calls made before the crash")
            rerun = apply_file(engine, last)
            finish_after_005(engine)
            try:
                check_upgraded(engine, db, rows, allow_copies=True)
            except CheckFailed as e:
                raise CheckFailed(f"005 stopped after {k} of {n_calls} engine calls, then run again ({' '.join(rerun)}): {e}") from None
            copies = int(engine.scalar("SELECT count() FROM atoms")) - len(expected_after_copy(rows))
            done.append(f"{k}{'+' + str(copies) + ' copies' if copies else ''}")
            engine.run(f"DROP DATABASE {db} SYNC")
        return f"stopped after 0..{n_calls} calls: {', '.join(done)}"

    c.check(f"races::{last.removesuffix('.sql')}_rerun_after_a_crash_at_every_call", crash_and_rerun)

    def two_migrators():
        # Two processes starting at once (a deploy of several instances) both
        # run 005. Migrator A makes `a` engine calls, then B makes `b`, then A
        # finishes, then B does (a = 0: B goes first). Each schedule must end
        # as one migrator alone ends: both succeed, the same tables, every
        # row, the first stored row wins.
        results: dict[str, list[str]] = {}
        details: dict[str, str] = {}  # the first schedule of each kind of failure, in detail
        recovered = 0
        for a in range(n_calls):
            b_done = False
            for b in range(1, n_calls + 1):
                if b_done:
                    break  # B finished within fewer calls: the same schedule as the last
                db = f"race_{a}_{b}"
                rows = prepare_005(engine, db)
                ea: list[str] = []
                eb: list[str] = []
                ga = migrate_calls(engine, last, schema_text(last), ea)
                gb = migrate_calls(engine, last, schema_text(last), eb)
                trace: list[str] = []
                error = None
                try:
                    drive(ga, "A", a, trace)
                    b_done = drive(gb, "B", b, trace) < b
                    drive(ga, "A", None, trace)
                    drive(gb, "B", None, trace)
                    finish_after_005(engine)
                except MigrationError as e:
                    error = f"a migrator stopped: {e}"
                if error is None:
                    try:
                        check_upgraded(engine, db, rows, allow_copies=True)
                    except CheckFailed as e:
                        error = str(e)
                if error is None:
                    results.setdefault("ok", []).append(f"A{a}B{b}")
                    recovered += sum(1 for e in ea + eb if e.endswith("failed-but-done"))
                else:
                    tables = ", ".join(table_names(engine, db))
                    kind = error.split(":", 1)[0] if error.startswith("a migrator") else error.split("\n", 1)[0]
                    kind = f"{kind} [tables after: {tables}]"
                    results.setdefault(kind, []).append(f"A{a}B{b}")
                    details.setdefault(kind, f"A{a}B{b}: {error}\n      calls: {' '.join(trace)}\n      A: {ea}\n      B: {eb}")
                engine.run(f"DROP DATABASE {db} SYNC")
        # Guards alone cannot make every interleaving safe (a multi-pair
        # RENAME is not atomic, and a guard checked before another migrator
        # acts is stale after it). That is why `ClickHouseStore::migrate`
        # takes the database's migration lock before it applies any file, so
        # two migrators never interleave; tests/clickhouse_store.rs
        # (concurrent_migrations_of_an_old_database_are_serialized) runs four
        # at once on 18.16. This simulation of the unlocked files shows what
        # the lock prevents, and that the guards still make most schedules safe.
        broken = sum(len(v) for k, v in results.items() if k != "ok")
        expect(recovered > 0, "no schedule made a guarded step fail after the other migrator did it")
        return (
            f"{len(results.get('ok', []))} of {len(results.get('ok', [])) + broken} unlocked interleavings end as one migrator alone does; "
            f"{broken} would not ({'; '.join(k for k in results if k != 'ok') or 'none'}): the migration lock prevents them"
        )

    c.check(f"races::two_migrators_run_{last.removesuffix('.sql')}_at_once", two_migrators)


# --- group: idempotent ------------------------------------------------------


def group_idempotent(c: Checks, engine: Engine) -> None:
    def rerun(db: str) -> str:
        stop_merges(engine, db)
        before = schema_snapshot(engine, db)
        engine.use(db)
        all_events = []
        for name in schema_files():
            events = apply_file(engine, name)
            all_events.append(f"{name[:3]}: {' '.join(events)}")
        after = schema_snapshot(engine, db)
        expect_eq(after["tables"], before["tables"], f"system.tables of {db} after running every file again")
        expect_eq(after["columns"], before["columns"], f"system.columns of {db} after running every file again")
        expect_eq(after["counts"], before["counts"], f"row counts of {db} after running every file again")
        summary, final = summary_vs_atoms(engine)
        expect_eq(summary, final, "summary vs atoms FINAL")
        return "; ".join(all_events)

    def fresh_with_rows():
        engine.fresh_database("again_fresh")
        migrate(engine, NUMBERED)
        insert(engine, "atoms", ATOM_COLUMNS_WRITTEN, upgrade_rows())
        insert(engine, "atom_arrivals", ARRIVAL_COLUMNS_WRITTEN, [arrival("alpha", "created", "crm", "i-1", 0, 1, T_UPGRADE)])
        insert(engine, "dead_letters", DEAD_LETTER_COLUMNS_WRITTEN, [dead_letter(0, 2, "decode", "bad_magic_byte", "x", T_UPGRADE)])
        return rerun("again_fresh")

    c.check("idempotent::every_file_again_on_a_fresh_database_with_rows", fresh_with_rows)

    def upgraded():
        build_pre_004(engine, "again_upgraded")
        migrate(engine, NUMBERED)
        return rerun("again_upgraded")

    c.check("idempotent::every_file_again_on_an_upgraded_database", upgraded)

    def migrate_again():
        engine.use("again_upgraded")
        stop_merges(engine, "again_upgraded")
        before = schema_snapshot(engine, "again_upgraded")
        recorded = engine.scalar("SELECT count() FROM hartonomous_migrations")
        migrate(engine, NUMBERED)
        expect_eq(engine.scalar("SELECT count() FROM hartonomous_migrations"), recorded, "rows in hartonomous_migrations")
        expect_eq(schema_snapshot(engine, "again_upgraded"), before, "the database after a second migrate")
        return "recorded files skipped; the bootstrap file and the dedup-window ALTERs change nothing"

    c.check("idempotent::second_migrate_changes_nothing", migrate_again)


# --- group: queries ---------------------------------------------------------


@dataclass
class Expected:
    """The answer one README query must give on the sample rows."""

    marker: str  # a piece of the query text (whitespace-normalized) that identifies it
    rows: list[dict[str, str]]  # the rows, restricted to the columns given
    ordered: bool = True  # compare in order (the query's ORDER BY is total)
    what: str = ""


def sample(now_ms: int):
    """Sample rows in one hour, three hours ago (inside every README time
    filter); a few sources, repeats, a race and replays. Returns the rows and
    the expected answers of the README's queries, computed here, not by SQL."""
    hour_ms = (now_ms // 3_600_000 - 3) * 3_600_000
    t = hour_ms + 600_000  # 10 minutes into that hour
    s = lambda k: t + k * 1_000

    abc = "abc"  # sha256 = ba7816bf...: the README's by-hash example
    inv, order = '{"invoice": 7}', '{"order": 9}'
    atoms = [
        atom(abc, "crm", "req-1", 0, 1, s(1)),
        atom("hello", "crm", "req-2", 0, 2, s(2)),
        # Event time before 1970: clamped to the zero DateTime, exact in event_time_ms.
        atom("note", "crm", "req-11", 0, 6, s(3), event_ms=-5_000),
        atom(inv, "erp", "req-3", 1, 0, s(4), content_type="application/json"),
        atom(order, "erp", "req-5", 1, 1, s(5), content_type="application/json"),
        atom("<p>pixel</p>", "web", "req-4", 2, 0, s(6), content_type="text/html"),
    ]
    # A race: another instance stored "abc" again, 30 s later, from p1/7.
    race = atom(abc, "crm", "req-9", 1, 7, s(30))
    arrivals = [
        arrival(abc, "created", "crm", "req-1", 0, 1, s(1)),
        arrival("hello", "created", "crm", "req-2", 0, 2, s(2)),
        arrival("note", "created", "crm", "req-11", 0, 6, s(3)),
        arrival(inv, "created", "erp", "req-3", 1, 0, s(4), content_type="application/json"),
        arrival(order, "created", "erp", "req-5", 1, 1, s(5), content_type="application/json"),
        arrival("<p>pixel</p>", "created", "web", "req-4", 2, 0, s(6), content_type="text/html"),
        arrival(abc, "created", "crm", "req-9", 1, 7, s(30)),  # the race: both report created
        arrival("hello", "matched", "crm", "req-6", 0, 3, s(40)),
        arrival(abc, "matched", "crm", "req-42", 0, 4, s(41)),
        arrival(inv, "matched", "erp", "req-7", 1, 2, s(42), content_type="application/json"),
        arrival("<p>pixel</p>", "matched", "web", "req-8", 2, 1, s(43), content_type="text/html"),
    ]
    # One position written twice, the later arrival first ("the wrong order").
    # Their outcomes differ only so that the duplicate rate shows which row won.
    replay_second = arrival("hello", "created", "crm", "req-10", 0, 5, s(70), trace="trace-replay")
    replay_first = arrival("hello", "matched", "crm", "req-10", 0, 5, s(50), trace="trace-first")
    day = 86_400_000
    dead = [
        dead_letter(0, 42, "decode", "bad_magic_byte", "first byte 0x01, expected 0x00", s(60), payload=b"\x01\x00\xffpoison"),
        dead_letter(1, 10, "decode", "bad_magic_byte", "first byte 0x7b", s(61), key=b"k-10"),
        dead_letter(1, 9, "decode", "unknown_schema_id", "schema id 77 not found", s(62)),
        dead_letter(0, 50, "decode", "unknown_schema_id", "schema id 78 not found", s(63)),
        dead_letter(2, 8, "decode", "unknown_schema_id", "schema id 79 not found", s(64)),
        dead_letter(2, 3, "validate", "empty_content", "content is empty", s(65)),
        dead_letter(1, 1, "decode", "bad_magic_byte", "old", s(66) - 10 * day),  # outside the 7-day window
    ]
    # Re-archived later (inserted last): dead_letters keeps the LAST row.
    dead_again = dead_letter(0, 42, "decode", "bad_magic_byte", "first byte 0x01, expected 0x00 (again)", s(80),
                             attempts=2, payload=b"\x01\x00\xffpoison!")

    by_hash = {a["content_hash"]: a for a in atoms}  # the first stored row of each content
    crm = sorted((a for a in atoms if a["source_system"] == "crm"), key=lambda a: -a["ingested_at_ms"])
    hour = fmt_dt(hour_ms)
    day_str = hour[:10]
    per_source, per_type = {}, {}
    for a in atoms:
        g = per_type.setdefault((a["source_system"], a["content_type"]), {"atoms": 0, "bytes": 0})
        g["atoms"] += 1
        g["bytes"] += a["content_size"]
        p = per_source.setdefault(a["source_system"], {"atoms": 0, "bytes": 0})
        p["atoms"] += 1
        p["bytes"] += a["content_size"]
    final_arrivals = arrivals + [replay_first]  # atom_arrivals FINAL
    rates = {}
    for a in final_arrivals:
        r = rates.setdefault(a["source_system"], {"requests": 0, "created": 0, "matched": 0, "contents": set()})
        r["requests"] += 1
        r[a["outcome"]] += 1
        r["contents"].add(a["content_hash"])

    def rate(r):
        x = round(r["matched"] / r["requests"], 4)
        return repr(x).removesuffix(".0")

    recent_dead = {}
    # dead_letters FINAL over the last 7 days: dead_again replaced dead[0], dead[-1] is older.
    for d in [dead_again] + dead[1:-1]:
        g = recent_dead.setdefault((d["topology"], d["stage"], d["reason"]), {"records": 0, "last": 0})
        g["records"] += 1
        g["last"] = max(g["last"], d["failed_at_ms"])

    sources = sorted(per_source)

    def per_source_str(src: str) -> dict[str, str]:
        return {"atoms": str(per_source[src]["atoms"]), "bytes": str(per_source[src]["bytes"])}

    expected = [
        Expected("SELECT count() FROM atoms FINAL;", [{"count()": str(len(atoms))}], what="stored atoms"),
        Expected(
            "sum(content_size) AS bytes FROM atoms FINAL GROUP BY source_system, content_type",
            [{"source_system": src, "content_type": ct, "atoms": str(g["atoms"]), "bytes": str(g["bytes"])}
             for (src, ct), g in sorted(per_type.items(), key=lambda kv: -kv[1]["atoms"])],
            what="atoms per source and type",
        ),
        Expected(
            "WHERE source_system = 'crm' ORDER BY ingested_at_ms DESC",
            [{"content_hash": a["content_hash"], "content_type": a["content_type"], "content_size": str(a["content_size"]),
              "event_time": fmt_dt(a["event_time_ms"]), "ingested_at": fmt_dt(a["ingested_at_ms"]),
              "source_topic": a["source_topic"], "source_partition": str(a["source_partition"]),
              "source_offset": str(a["source_offset"]), "trace_id": a["trace_id"]} for a in crm],
            what="latest crm atoms (the race row of abc is not one of them; note's event_time is the zero DateTime)",
        ),
        Expected(
            "SELECT * FROM atoms FINAL WHERE content_hash =",
            [{"content_hash": sha256_hex(abc), "correlation_id": "req-1", "source_partition": "0", "source_offset": "1",
              "content": abc, "embedding": "[0.5,0.25]", "ingested_at_ms": str(by_hash[sha256_hex(abc)]["ingested_at_ms"]),
              "first_wins_rank": str(RANK_BASE - by_hash[sha256_hex(abc)]["ingested_at_ms"])}],
            what="one atom by hash: the first stored row, not the race's",
        ),
        Expected(
            "FROM atoms_per_source_hour WHERE hour >= now() - INTERVAL 1 DAY",
            [{"source_system": src, "hour": hour, **per_source_str(src)} for src in sources],
            what="ingestion per source and hour",
        ),
        Expected(
            "toDate(hour) AS day",
            [{"source_system": src, "day": day_str, **per_source_str(src)} for src in sources],
            what="ingestion per source and day",
        ),
        Expected(
            "SELECT source_system, uniqExactMerge(atoms) AS atoms FROM atoms_per_source_hour GROUP BY source_system;",
            [{"source_system": src, "atoms": str(per_source[src]["atoms"])} for src in sources],
            ordered=False,
            what="all time per source",
        ),
        Expected(
            "FROM dead_letters FINAL WHERE failed_at >= now() - INTERVAL 7 DAY",
            [{"topology": k[0], "stage": k[1], "reason": k[2], "records": str(g["records"]), "last_seen": fmt_dt(g["last"])}
             for k, g in sorted(recent_dead.items(), key=lambda kv: -kv[1]["records"])],
            what="dead letters by reason, last week (the 10-day-old one left out)",
        ),
        Expected(
            "hex(original_payload)",
            [{"error": dead_again["error"], "attempts": "2", "hex(original_payload)": dead_again["original_payload"].hex().upper()}],
            what="one dead letter's payload: the row archived last",
        ),
        Expected(
            "AS duplicate_rate",
            [{"source_system": src, "requests": str(r["requests"]), "new_atoms": str(r["created"]),
              "repeats": str(r["matched"]), "duplicate_rate": rate(r)}
             for src, r in sorted(rates.items(), key=lambda kv: -kv[1]["requests"])],
            what="duplicate rate per source (the first of the two rows at p0/5 counts)",
        ),
        Expected(
            "toStartOfHour(arrived_at) AS hour",
            [{"source_system": src, "hour": hour, "requests": str(r["requests"]), "contents": str(len(r["contents"]))}
             for src, r in sorted(rates.items())],
            what="arrivals per source and hour",
        ),
        Expected(
            "WHERE correlation_id = 'req-42'",
            [{"source_topic": "atoms.requests", "source_partition": "0", "source_offset": "4", "outcome": "matched",
              "content_hash": sha256_hex(abc), "arrived_at": fmt_dt(s(41))}],
            what="one request by correlation id",
        ),
        Expected(
            "INNER JOIN (SELECT * FROM atom_arrivals FINAL) AS r",
            [{"content_hash": a["content_hash"], "r.correlation_id": a["correlation_id"], "r.source_system": a["source_system"],
              "arrived_at": fmt_dt(a["ingested_at_ms"])} for a in atoms],
            ordered=False,
            what="the request that created each atom (req-1 for abc, not the race's req-9)",
        ),
        Expected(
            "SELECT (SELECT count() FROM atom_arrivals FINAL) - (SELECT count() FROM atoms FINAL) AS repeats;",
            [{"repeats": str(len(final_arrivals) - len(atoms))}],
            what="exact duplicate count",
        ),
        Expected(
            "FROM hartonomous_migrations ORDER BY name;",
            [{"name": n, "checksum": hashlib.sha256(schema_text(n).encode()).hexdigest()} for n in NUMBERED],
            what="applied schema files",
        ),
        Expected("INSERT INTO atoms_per_source_hour SELECT", [], what="backfill (checked below: it changes no answer)"),
    ]
    inserts = [
        ("atoms", ATOM_COLUMNS_WRITTEN, atoms),
        ("atoms", ATOM_COLUMNS_WRITTEN, [race]),
        ("atom_arrivals", ARRIVAL_COLUMNS_WRITTEN, arrivals),
        ("atom_arrivals", ARRIVAL_COLUMNS_WRITTEN, [replay_second]),
        ("atom_arrivals", ARRIVAL_COLUMNS_WRITTEN, [replay_first]),
        ("dead_letters", DEAD_LETTER_COLUMNS_WRITTEN, dead),
        ("dead_letters", DEAD_LETTER_COLUMNS_WRITTEN, [dead_again]),
    ]
    return inserts, expected, per_source


def readme_sql_blocks() -> list[str]:
    return re.findall(r"^```sql[ \t]*\n(.*?)^```[ \t]*$", SCHEMA_README.read_text(encoding="utf-8"), re.S | re.M)


def normalize(sql: str) -> str:
    return " ".join(sql.split())


def compare(actual: list[dict[str, str]], e: Expected) -> None:
    cols = list(dict.fromkeys(k for r in e.rows for k in r))
    missing = [k for k in cols if actual and k not in actual[0]]
    expect(not missing, f"the answer has no columns {missing}; it has {list(actual[0]) if actual else []}")
    got = [{k: r[k] for k in cols} for r in actual]
    want = [{k: r[k] for k in cols} for r in e.rows]
    if not e.ordered:
        key = lambda r: [r[k] for k in cols]
        got, want = sorted(got, key=key), sorted(want, key=key)
    expect_eq(got, want, f"answer ({e.what})")


def group_queries(c: Checks, engine: Engine) -> None:
    db = "analyst"
    now_ms = int(time.time() * 1000)
    inserts, expected, per_source = sample(now_ms)

    def setup():
        engine.fresh_database(db)
        migrate(engine, NUMBERED)
        for table, columns, rows in inserts:
            insert(engine, table, columns, rows)
        return f"{sum(len(r) for t, _, r in inserts if t == 'atoms')} atom rows, " \
               f"{sum(len(r) for t, _, r in inserts if t == 'atom_arrivals')} arrival rows, " \
               f"{sum(len(r) for t, _, r in inserts if t == 'dead_letters')} dead-letter rows"

    if not c.check("queries::sample_rows", setup):
        return

    blocks = readme_sql_blocks()
    def has_blocks():
        expect(len(blocks) >= len(expected), f"only {len(blocks)} ```sql blocks in {SCHEMA_README}")
        return f"{len(blocks)} blocks"

    c.check("queries::readme_has_sql_blocks", has_blocks)
    used: set[int] = set()
    for i, block in enumerate(blocks, 1):
        text = normalize(block)
        matches = [k for k, e in enumerate(expected) if normalize(e.marker) in text]

        def run_block(i=i, block=block, text=text, matches=matches):
            expect(len(matches) <= 1, f"block {i} matches several expectations: {[expected[k].marker for k in matches]}")
            statements = split_statements(block)
            expect(len(statements) == 1, f"block {i} holds {len(statements)} statements")
            sql = statements[0]
            if not matches:
                engine.table(sql)
                return "ran; no expected answer known for it"
            e = expected[matches[0]]
            used.add(matches[0])
            if sql.lstrip().upper().startswith("INSERT"):
                before = summary_vs_atoms(engine)
                engine.run(sql)
                after = summary_vs_atoms(engine)
                expect_eq(after, before, "summary and atoms FINAL after the backfill (it must be replay-safe)")
                expect_eq(after[0], after[1], "summary vs atoms FINAL")
                return f"{e.what}; answers unchanged"
            actual = engine.table(sql)
            compare(actual, e)
            return f"{e.what}: {len(actual)} rows"

        first = block.strip().splitlines()[0]
        c.check(f"queries::readme_block_{i:02d} `{first[:60]}`", run_block)

    def all_expectations_used():
        unused = [expected[k].marker for k in range(len(expected)) if k not in used]
        expect(not unused, f"queries this script expects in {SCHEMA_README.name} but did not find (update both): {unused}")

    c.check("queries::every_expected_query_is_in_the_readme", all_expectations_used)

    def readme_claim_all_time():
        # README: the all-time summary "equals count() ... FROM atoms FINAL GROUP BY source_system".
        summary, final = summary_vs_atoms(engine)
        expect_eq(summary, final, "summary vs atoms FINAL, per source")

    c.check("queries::summary_equals_atoms_final_per_source", readme_claim_all_time)


# ---------------------------------------------------------------------------

GROUPS = {
    "fresh": group_fresh,
    "upgrade": group_upgrade,
    "races": group_races,
    "idempotent": group_idempotent,
    "queries": group_queries,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", choices=sorted(GROUPS), help="run only these groups (repeatable)")
    args = parser.parse_args()
    groups = args.group or list(GROUPS)
    c = Checks()
    # The session's files are scratch: on tmpfs when there is one (DDL there
    # is about 3x faster than on disk, which fsyncs table metadata).
    shm = Path("/dev/shm")
    scratch = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="hartonomous-chdb-", dir=scratch) as tmp:
        engine = Engine(tmp)
        version = engine.scalar("SELECT version()")
        print(f"chdb {chdb.__version__} (ClickHouse {version}, in-process) on {tmp}: schemas/clickhouse/, {', '.join(groups)}", flush=True)
        try:
            for g in groups:
                GROUPS[g](c, engine)
        finally:
            engine.session.close()
    status = "ok" if not c.failed else "FAILED"
    print(f"\nchdb checks: {status}. {c.passed} passed; {len(c.failed)} failed", flush=True)
    if c.failed:
        print("failed checks:\n" + "\n".join(f"    {n}" for n in c.failed), flush=True)
    return 0 if not c.failed else 1


if __name__ == "__main__":
    sys.exit(main())
