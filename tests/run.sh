#!/usr/bin/env bash
# Runs every test of the project: unit, golden-file topology, integration and
# the benches in test mode (each benchmark once, as a smoke test; no timings
# are asserted anywhere).
#
# Build output goes to a cache outside the clone (CARGO_TARGET_DIR, default
# ~/.cache/hartonomous/target) so later runs on the same machine are warm.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hartonomous/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

echo "== starting test services (tansu, ClickHouse)"
trap 'status=$?; [ "$status" -eq 0 ] || tests/services.sh logs >&2 || true' EXIT
tests/services.sh up
eval "$(tests/services.sh env)"

echo "== building (target dir: $CARGO_TARGET_DIR)"
cargo build --locked --all-targets
echo "== running tests"
cargo test --locked --all-targets 2>&1 | tee "$CARGO_TARGET_DIR/last-test-run.log"
status=${PIPESTATUS[0]}

# One line that totals every test binary, so a skipped or missing suite shows.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "total: %d passed, %d failed, %d skipped\n", p, f, i }' "$CARGO_TARGET_DIR/last-test-run.log"
# How many tests ran against the real services (their test binaries).
awk '/Running tests\/(kafka|clickhouse|connected|store_contract)/ { svc = 1; next } /Running / { svc = 0 } svc && /^test result:/ { p += $4 } END { printf "tests in suites against Kafka and ClickHouse: %d passed\n", p }' "$CARGO_TARGET_DIR/last-test-run.log"
if grep -q '^test result:.* [1-9][0-9]* ignored' "$CARGO_TARGET_DIR/last-test-run.log"; then
  echo "error: some tests are ignored; every test must run" >&2
  exit 1
fi
exit "$status"
