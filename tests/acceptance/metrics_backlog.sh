#!/usr/bin/env bash
# The operations acceptance check, by hand (not part of tests/run.sh): a
# backlog of N atom-ingestion requests (default 100,000, about 1 KiB each) on
# a fresh 3-partition topic, then the processor (release build) drains it
# into ClickHouse while this script scrapes /metrics every 2 s and prints
# the lag and the rate of records in, as a dashboard would show them. At the
# end it checks that the lag is 0, that records in equals N, and that the
# stored atoms and arrivals equal N, and prints the average rate.
#
#   tests/services.sh up && eval "$(tests/services.sh env)"
#   tests/acceptance/metrics_backlog.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-100000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hartonomous/target}"
cargo build --release --locked --bin hartonomous >/dev/null
BIN="$CARGO_TARGET_DIR/release/hartonomous"
KAFKA="${HARTONOMOUS_TEST_KAFKA:-127.0.0.1:19092}"
CH="${HARTONOMOUS_TEST_CLICKHOUSE:-http://127.0.0.1:18123}"
ID="acc$(date +%s)"
WORK="$(mktemp -d)"
trap 'kill $PROC 2>/dev/null || true; rm -rf "$WORK"' EXIT

cat >"$WORK/profile.toml" <<EOF
data_dir = "$WORK/data"
[log]
kind = "kafka"
bootstrap_servers = "$KAFKA"
session_timeout_ms = 6000
heartbeat_interval_ms = 500
create_topics = true
[store]
kind = "clickhouse"
url = "$CH"
database = "$ID"
[registry]
kind = "file"
[embedder]
kind = "hashing"
dimension = 384
max_batch = 256
EOF
sed -e "s/\"atoms.ingest\"/\"$ID.ingest\"/" -e "s/\"atoms.ingest.dlq\"/\"$ID.dlq\"/" -e "s/\"atoms.ingested\"/\"$ID.ingested\"/" \
  topologies/atom-ingestion.toml >"$WORK/topology.toml"
printf '\n' >>"$WORK/topology.toml"
sed -i "s/^\[source\]$/[source]\ngroup = \"$ID\"/" "$WORK/topology.toml"

python3 - "$N" >"$WORK/requests.jsonl" <<'EOF'
import json, sys
filler = "stream processing into clickhouse " * 30
for i in range(int(sys.argv[1])):
    print(json.dumps({"content_type": "text/plain", "content": f"acceptance record {i}: " + filler[:900],
                      "metadata": {"i": str(i)}, "source_system": ["wiki", "crm", "support"][i % 3], "correlation_id": f"acc-{i}"}))
EOF
echo "producing $N requests to $ID.ingest"
# Create the topic with 3 partitions first (produce would create it with the broker's default).
"$BIN" --connectors "$WORK/profile.toml" run --topology "$WORK/topology.toml" --listen off >/dev/null 2>&1 &
PROC=$!
sleep 8
kill -TERM $PROC; wait $PROC || true
"$BIN" --connectors "$WORK/profile.toml" produce --topic "$ID.ingest" --schema AtomIngestionRequest --input "$WORK/requests.jsonl"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" --connectors "$WORK/profile.toml" run --topology "$WORK/topology.toml" --listen "127.0.0.1:$PORT" >"$WORK/run.out" 2>"$WORK/run.err" &
PROC=$!
metric() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" { s += $2 } END { printf "%d", s }'; }
start=$(date +%s.%N); last_in=0; last_t=$start; seen_lag=0
printf '%8s %12s %12s %12s\n' "t (s)" "lag" "records in" "rate (/s)"
while true; do
  sleep 2
  now=$(date +%s.%N)
  lag=$(metric hartonomous_consumer_lag_records); in=$(metric hartonomous_records_in_total)
  rate=$(python3 -c "print(round(($in-$last_in)/($now-$last_t)))")
  printf '%8.1f %12s %12s %12s\n' "$(python3 -c "print($now-$start)")" "$lag" "$in" "$rate"
  last_in=$in; last_t=$now
  [ "$lag" -gt 0 ] && seen_lag=1
  if [ "$in" -ge "$N" ] && [ "$lag" -eq 0 ] && [ "$seen_lag" -eq 1 ]; then break; fi
  if ! kill -0 $PROC 2>/dev/null; then echo "the processor stopped:"; tail -20 "$WORK/run.err"; exit 1; fi
done
end=$(date +%s.%N)
kill -TERM $PROC; wait $PROC || true
atoms=$(curl -s "$CH/" --data-binary "SELECT count() FROM $ID.atoms FINAL")
arrivals=$(curl -s "$CH/" --data-binary "SELECT count() FROM $ID.atom_arrivals FINAL")
echo "records in $in of $N; lag 0; atoms $atoms; arrivals $arrivals; average $(python3 -c "print(round($N/($end-$start)))") records/s (first scrape to lag 0, group join included)"
[ "$in" -eq "$N" ] && [ "$atoms" -eq "$N" ] && [ "$arrivals" -eq "$N" ] || { echo "MISMATCH"; exit 1; }
