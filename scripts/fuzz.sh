#!/usr/bin/env bash
# `make fuzz`: libFuzzer (cargo-fuzz, Rust nightly) on the filter's native logic. Each target runs
# for FUZZ_SECONDS (default 45: about 3 minutes in all); a crash fails the run and leaves its
# input under fuzz/artifacts/<target>/. Installs nightly and cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${FUZZ_SECONDS:-45}"
TARGETS="${FUZZ_TARGETS:-token config webdis_replies request jwks gateway_file}"

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo +nightly install cargo-fuzz --locked

cd fuzz
for t in $TARGETS; do
  mkdir -p "corpus/$t" "artifacts/$t"
  # A copy of the committed seeds grows in target/; the seeds stay small.
  work="../target/fuzz-corpus/$t"
  mkdir -p "$work"
  cp -n "corpus/$t"/* "$work"/ 2>/dev/null || true
  echo "== $t (${SECONDS_EACH}s)"
  # A target that does not build fails the run (its output is shown); only the run's own
  # output is filtered.
  if ! cargo +nightly fuzz build "$t" >"../target/fuzz-build-$t.log" 2>&1; then
    cat "../target/fuzz-build-$t.log" >&2
    echo "fuzz: $t does not build" >&2
    exit 1
  fi
  status=0
  cargo +nightly fuzz run "$t" "$work" -- -max_total_time="$SECONDS_EACH" -max_len=4096 \
    -print_final_stats=1 >"../target/fuzz-run-$t.log" 2>&1 || status=$?
  grep -E "stat::number_of_executed_units|stat::average_exec_per_sec|ERROR|panicked|Done" "../target/fuzz-run-$t.log" || true
  if [ "$status" -ne 0 ] || ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $t found a crash: fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
