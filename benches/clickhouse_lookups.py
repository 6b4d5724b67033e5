#!/usr/bin/env python3
"""What one dedup look-up costs ClickHouse, by table layout.

The ClickHouse store asks, per window, which of the window's content hashes
are stored (`content_hash IN (SELECT arrayJoin([...]))`, see
src/store/clickhouse/query.rs). This script builds key tables of ROWS random
SHA-256 hashes in a scratch database, in three layouts, and runs the
look-up of 2,500 hashes (half stored, half not) against each:

  k8192  ORDER BY content_hash, the default granularity (what `atoms` is)
  k256   the same with index_granularity = 256
  p64    ORDER BY cityHash64(content_hash), index_granularity = 64

and prints, per layout, the rows ClickHouse read and its CPU for the query
(`system.query_log`, UserTimeMicroseconds), the median of REPEAT runs. It
also prints the look-up against an empty table (parsing the array and
building the set) and a bare scan of the hash column.

    eval "$(tests/services.sh env)"      # after `tests/services.sh up`
    python3 benches/clickhouse_lookups.py [ROWS] [REPEAT]
    PYTHONPATH=$HARTONOMOUS_TEST_CHDB_PATH python3 benches/clickhouse_lookups.py --chdb [ROWS] [REPEAT]

The server is $HARTONOMOUS_TEST_CLICKHOUSE (default http://127.0.0.1:18123);
the scratch database `hartonomous_lookup_bench` is dropped at the end. With
`--chdb` the same runs in current ClickHouse embedded in this process
(chDB, a temporary directory, one thread per query); there is no query log,
so the CPU column is this process's CPU time around the query and the rows
column is empty.
"""
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request

SERVER = os.environ.get("HARTONOMOUS_TEST_CLICKHOUSE", "http://127.0.0.1:18123").rstrip("/") + "/"
DB = "hartonomous_lookup_bench"
CHDB = "--chdb" in sys.argv[1:]
ARGS = [a for a in sys.argv[1:] if a != "--chdb"]
ROWS = int(ARGS[0]) if ARGS else 1_000_000
REPEAT = int(ARGS[1]) if len(ARGS) > 1 else 5
SESSION = None
HASHES = 2_500
COLUMNS = "content_hash String, source_topic String, source_partition Int32, source_offset Int64"


def query(sql, **params):
    if CHDB:
        return str(SESSION.query(f"{sql} SETTINGS max_query_size = 4000000, max_threads = 1" if sql.startswith("SELECT") else sql, "TSV"))
    url = SERVER + "?" + urllib.parse.urlencode({"max_query_size": 4_000_000, **params})
    with urllib.request.urlopen(urllib.request.Request(url, data=sql.encode())) as r:
        return r.read().decode()


def setup():
    query(f"DROP DATABASE IF EXISTS {DB}")
    query(f"CREATE DATABASE {DB}")
    query(f"CREATE TABLE {DB}.k8192 ({COLUMNS}) ENGINE = MergeTree ORDER BY content_hash")
    query(f"CREATE TABLE {DB}.k256 ({COLUMNS}) ENGINE = MergeTree ORDER BY content_hash SETTINGS index_granularity = 256")
    query(f"CREATE TABLE {DB}.p64 (hash_key UInt64, {COLUMNS}) ENGINE = MergeTree ORDER BY hash_key SETTINGS index_granularity = 64")
    query(f"CREATE TABLE {DB}.empty ({COLUMNS}) ENGINE = MergeTree ORDER BY content_hash")
    query(
        f"INSERT INTO {DB}.k8192 SELECT lower(hex(SHA256(toString(number)))), 'atoms.ingest', "
        f"toInt32(number % 3), toInt64(number) FROM system.numbers LIMIT {ROWS}"
    )
    query(f"INSERT INTO {DB}.k256 SELECT * FROM {DB}.k8192")
    query(f"INSERT INTO {DB}.p64 SELECT cityHash64(content_hash), * FROM {DB}.k8192")
    for table in ("k8192", "k256", "p64"):
        query(f"OPTIMIZE TABLE {DB}.{table} FINAL")


def cases():
    rng = random.Random(1)
    stored = [hashlib.sha256(str(rng.randrange(ROWS)).encode()).hexdigest() for _ in range(HASHES // 2)]
    new = [hashlib.sha256(f"new-{i}".encode()).hexdigest() for i in range(HASHES - HASHES // 2)]
    array = "[" + ",".join(f"'{h}'" for h in stored + new) + "]"
    lineage = "content_hash, source_topic, source_partition, source_offset"
    return [
        ("empty table (parse + set)", f"SELECT {lineage} FROM {DB}.empty WHERE content_hash IN (SELECT arrayJoin({array}))"),
        ("scan of the hash column", f"SELECT count() FROM {DB}.k8192 WHERE NOT ignore(content_hash)"),
        ("k8192 (as atoms)", f"SELECT {lineage} FROM {DB}.k8192 WHERE content_hash IN (SELECT arrayJoin({array}))"),
        ("k256", f"SELECT {lineage} FROM {DB}.k256 WHERE content_hash IN (SELECT arrayJoin({array}))"),
        ("p64 (64-bit key)", f"SELECT {lineage} FROM {DB}.p64 WHERE hash_key IN (SELECT cityHash64(arrayJoin({array})))"),
    ]


def main_chdb():
    global SESSION
    from chdb import session

    with tempfile.TemporaryDirectory() as path:
        SESSION = session.Session(path)
        setup()
        cpu = {}
        for _ in range(REPEAT):
            for name, sql in cases():
                start = time.process_time()
                query(sql)
                cpu.setdefault(name, []).append((time.process_time() - start) * 1000)
        print(f"{ROWS:,} stored hashes, look-up of {HASHES:,} (half stored), median of {REPEAT}, chDB")
        print(f"{'layout':<28}{'rows read':>12}{'CPU ms':>9}")
        for name, ms in cpu.items():
            print(f"{name:<28}{'':>12}{statistics.median(ms):>9.1f}")
        SESSION.close()


def main():
    if CHDB:
        return main_chdb()
    setup()
    runs = {}
    for _ in range(REPEAT):
        for name, sql in cases():
            qid = f"lookup-bench-{time.time_ns()}"
            query(sql, log_queries=1, query_id=qid)
            runs.setdefault(name, []).append(qid)
    query("SYSTEM FLUSH LOGS")
    print(f"{ROWS:,} stored hashes, look-up of {HASHES:,} (half stored), median of {REPEAT}")
    print(f"{'layout':<28}{'rows read':>12}{'CPU ms':>9}")
    for name, ids in runs.items():
        rows, cpu = [], []
        for qid in ids:
            line = query(
                "SELECT read_rows, ProfileEvents.Values[indexOf(ProfileEvents.Names, 'UserTimeMicroseconds')] "
                f"FROM system.query_log WHERE query_id = '{qid}' AND type = 2 FORMAT TSV"
            ).split()
            rows.append(int(line[0]))
            cpu.append(int(line[1]) / 1000)
        print(f"{name:<28}{int(statistics.median(rows)):>12,}{statistics.median(cpu):>9.1f}")
    query(f"DROP DATABASE {DB}")


if __name__ == "__main__":
    main()
