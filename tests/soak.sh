#!/usr/bin/env bash
# Long soak variants of the fault suite (tests/connected.rs), for a machine
# with time to spare. Not part of tests/run.sh (CI); nothing here asserts a
# time. Each scenario checks every output, as in the normal suite.
#
#   tests/soak.sh                 # 100 kill -9 over 100,000 records, then every outage twice
#   SOAK_KILLS=300 SOAK_RECORDS=300000 tests/soak.sh
#   HARTONOMOUS_FAULT_SEED=<seed> tests/soak.sh   # repeat the kill moments of an earlier run
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hartonomous/target}"
tests/services.sh up
eval "$(tests/services.sh env)"
export HARTONOMOUS_FAULT_KILLS="${SOAK_KILLS:-100}"
export HARTONOMOUS_FAULT_RECORDS="${SOAK_RECORDS:-100000}"
run() { cargo test --locked --test connected -- --nocapture --test-threads 1 "$@"; }
run kill_dash_nine_at_random_moments
for round in 1 2; do
  echo "== outages, round $round"
  run outage
done
run second_instance
run abort_
