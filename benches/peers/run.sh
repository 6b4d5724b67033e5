#!/usr/bin/env bash
# The peers bench in one command, from a fresh clone: starts the test
# services (tests/services.sh), installs cmake and curl's headers if they are
# missing, builds in release and prints one table.
#
#   benches/peers/run.sh
#   HARTONOMOUS_PEERS_RECORDS=20000 benches/peers/run.sh       # fewer records
#   HARTONOMOUS_PEERS_ROWS=raw-consume,raw-insert,bare,hartonomous benches/peers/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hartonomous/target}"
# sentry_arroyo builds librdkafka with cmake, whose build includes curl's
# headers whatever its options say (librdkafka 2.12): both from Debian.
have_curl_headers() { [ -e /usr/include/curl/curl.h ] || compgen -G '/usr/include/*/curl/curl.h' >/dev/null; }
if ! command -v cmake >/dev/null || ! have_curl_headers; then
  echo "== installing cmake and libcurl4-openssl-dev (apt)"
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo
  # A stale package index can ask for versions the mirror no longer has
  # (libcurl4-openssl-dev against an upgraded libcurl4): refresh and retry.
  $sudo_ apt-get install -y cmake libcurl4-openssl-dev >/dev/null \
    || { $sudo_ apt-get update >/dev/null && $sudo_ apt-get install -y cmake libcurl4-openssl-dev >/dev/null; }
fi
tests/services.sh up
eval "$(tests/services.sh env)"
exec cargo bench --locked --features peers --bench peers
