#!/usr/bin/env bash
# Fuzzes the wire decoder, the depth walker and the JSON bridge with
# cargo-fuzz (libFuzzer + AddressSanitizer) for a bounded time each.
#
#   tests/fuzz.sh                      # every target, 60 s each
#   FUZZ_SECONDS=600 tests/fuzz.sh wire_decoder
#
# Not part of tests/run.sh or CI. The targets live in tests/fuzz/ (see its
# src/lib.rs for what each one checks). Needs the nightly toolchain
# (`rustup toolchain install nightly`); installs cargo-fuzz into ~/.cargo/bin
# when missing. The first build compiles the whole dependency tree
# (DataFusion, librdkafka) with sanitizer flags: it took 50 minutes on 2
# cores with other builds running; later runs rebuild only what changed.
#
# Everything a run writes stays outside the clone, so the working tree is
# clean afterwards:
#   FUZZ_TARGET_DIR  build directory  (default ~/.cache/hartonomous/fuzz-target)
#   FUZZ_HOME        growing corpus, crash artifacts and logs, per target
#                    (default ~/.cache/hartonomous/fuzz); the committed seeds
#                    in tests/fuzz/corpus/<target>/ are read, never written.
# Other knobs: FUZZ_TOOLCHAIN (nightly), FUZZ_MAX_LEN (4096 bytes per input),
# FUZZ_TIMEOUT (30 s per input), FUZZ_CODEGEN_UNITS (16: a faster first build
# for slightly slower runs).
#
# Exits non-zero if any target crashed, aborted, ran out of memory, exceeded
# an allocation limit or hung on one input, and prints where the input that
# did it is and how to replay it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

seconds="${FUZZ_SECONDS:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
home="${FUZZ_HOME:-$HOME/.cache/hartonomous/fuzz}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/hartonomous/fuzz-target}"
max_len="${FUZZ_MAX_LEN:-4096}"
timeout="${FUZZ_TIMEOUT:-30}"
codegen_units="${FUZZ_CODEGEN_UNITS:-16}"
all_targets=(wire_decoder depth_walker json_bridge)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

for t in "${targets[@]}"; do
    [ -f "tests/fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no target '$t' (targets: ${all_targets[*]})" >&2; exit 2; }
done
# (0 would be no limit at all to libFuzzer.)
case "$seconds" in '' | *[!0-9]* | 0) echo "fuzz.sh: FUZZ_SECONDS must be a positive whole number of seconds, not '$seconds'" >&2; exit 2 ;; esac

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: the $toolchain toolchain is missing; install it with: rustup toolchain install $toolchain" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz into ~/.cargo/bin"
    cargo install cargo-fuzz --locked
fi

# Only the Rust code is instrumented. cc (1.11 in Cargo.lock) would otherwise
# build the C dependencies with AddressSanitizer too, and librdkafka's
# configure then fails to link its own checks against that libzstd.
export CFLAGS="${CFLAGS:+$CFLAGS }-fno-sanitize=address"
export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-fno-sanitize=address"

# The fuzz package resolves on its own; start it from the main lock file so
# that both build the same versions (the copy is git-ignored).
if [ ! -f tests/fuzz/Cargo.lock ] || [ Cargo.lock -nt tests/fuzz/Cargo.lock ]; then
    cp Cargo.lock tests/fuzz/Cargo.lock
fi

build=(--fuzz-dir tests/fuzz --codegen-units "$codegen_units")
echo "fuzz.sh: building ${targets[*]} with $toolchain into $CARGO_TARGET_DIR (the first build takes most of an hour)"
for t in "${targets[@]}"; do
    cargo "+$toolchain" fuzz build "${build[@]}" "$t"
done

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus="$home/corpus/$t"
    artifacts="$home/artifacts/$t"
    log="$home/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    marker="$(mktemp)"
    echo "fuzz.sh: $t for ${seconds}s (log: $log)"
    # The first corpus directory receives new inputs; the seeds are only read.
    # A later -artifact_prefix overrides the one cargo-fuzz passes.
    # malloc_limit: no single allocation above 256 MiB (apache-avro's cap is 64 MiB).
    set +e
    cargo "+$toolchain" fuzz run "${build[@]}" "$t" "$corpus" "tests/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len="$max_len" -timeout="$timeout" \
        -rss_limit_mb=2048 -malloc_limit_mb=256 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    rss="$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)"
    line="$t: ${runs:-?} executions, ${rate:-?}/s, peak RSS ${rss:-?} MB, corpus $(find "$corpus" -type f | wc -l) inputs"
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        line="$line: FAILED (exit $status)"
        echo "---- $t: last lines of $log"
        tail -n 40 "$log"
        found="$(find "$artifacts" -type f -newer "$marker" ! -name 'slow-unit-*' | sort)"
        if [ -n "$found" ]; then
            while IFS= read -r f; do
                echo "fuzz.sh: $t: failing input: $f"
                echo "  replay: cargo +$toolchain fuzz run ${build[*]} $t '$f'"
            done <<<"$found"
        else
            echo "fuzz.sh: $t: no failing input was saved; see $log"
        fi
    fi
    rm -f "$marker"
    summary+=("$line")
done

echo "fuzz.sh: summary (${seconds}s per target)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no crash"
