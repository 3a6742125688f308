#!/usr/bin/env bash
# Runs every libFuzzer harness of BUILD_DIR/fuzz for SECONDS each, on a copy
# of its seed corpus (tests/fuzz/corpus/<name>) plus the regression inputs
# (tests/fuzz/regress/<name>, replayed first). New inputs go to
# BUILD_DIR/fuzz-corpus/<name>, crashes to BUILD_DIR/fuzz-artifacts/.
# Prints one line per harness: runs, coverage (cov/ft), corpus size.
# Usage: run.sh BUILD_DIR SECONDS [SUMMARY_FILE]
#   appends "fuzz/<name> 1 0" (or "0 1" on a crash or sanitizer report).
set -uo pipefail
cd "$(dirname "$0")/../.."
build=$1
secs=$2
summary=${3:-/dev/null}
status=0
mkdir -p "$build/fuzz-artifacts"
for bin in "$build"/fuzz/fuzz_*; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  name=${name#fuzz_}
  work="$build/fuzz-corpus/$name"
  mkdir -p "$work"
  dirs=("$work")
  [ -d "tests/fuzz/corpus/$name" ] && dirs+=("tests/fuzz/corpus/$name")
  log="$build/fuzz-$name.log"
  ok=1
  if [ -d "tests/fuzz/regress/$name" ] && ls "tests/fuzz/regress/$name"/* >/dev/null 2>&1; then
    "$bin" -runs=0 "tests/fuzz/regress/$name"/* >"$log.regress" 2>&1 || ok=0
  fi
  timeout $((secs + 60)) "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$build/fuzz-artifacts/$name-" \
    "${dirs[@]}" >"$log" 2>&1 || ok=0
  runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
  cov=$(echo "$last" | grep -oE 'cov: [0-9]+' | awk '{print $2}')
  ft=$(echo "$last" | grep -oE 'ft: [0-9]+' | awk '{print $2}')
  corp=$(echo "$last" | grep -oE 'corp: [0-9]+' | awk '{print $2}')
  if [ "$ok" = 1 ]; then
    echo "fuzz $name: ok, ${runs:-?} runs in ${secs} s, cov ${cov:-?} ft ${ft:-?} corpus ${corp:-?}"
    echo "fuzz/$name 1 0" >>"$summary"
  else
    echo "fuzz $name: FAILED (see $log, artifacts in $build/fuzz-artifacts)"
    grep -E 'ERROR|runtime error|SUMMARY' "$log" "$log.regress" 2>/dev/null | head -n 5
    echo "fuzz/$name 0 1" >>"$summary"
    status=1
  fi
done
exit $status
