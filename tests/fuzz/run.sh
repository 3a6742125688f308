#!/usr/bin/env bash
# Runs every libFuzzer harness of BUILD_DIR/fuzz for SECONDS each, on a copy
# of its seed corpus (tests/fuzz/corpus/<name>) plus the regression inputs
# (tests/fuzz/regress/<name>, replayed first). New inputs go to
# BUILD_DIR/fuzz-corpus/<name>, crashes to BUILD_DIR/fuzz-artifacts/.
# Harnesses run side by side, one per CPU (libFuzzer uses one core each), so
# the wall time is about SECONDS x harnesses / CPUs.
# Prints one line per harness: runs, coverage (cov/ft), corpus size.
# Usage: run.sh BUILD_DIR SECONDS [SUMMARY_FILE]
#   appends "fuzz/<name> 1 0" (or "0 1" on a crash or sanitizer report).
set -uo pipefail
cd "$(dirname "$0")/../.."
build=$1
secs=$2
summary=${3:-/dev/null}
mkdir -p "$build/fuzz-artifacts"

# run_one BIN: fuzzes one harness; writes its report to $build/fuzz-<name>.result
run_one() {
  local bin=$1 name ok=1
  name=$(basename "$bin")
  name=${name#fuzz_}
  local work="$build/fuzz-corpus/$name" log="$build/fuzz-$name.log"
  mkdir -p "$work"
  local dirs=("$work")
  [ -d "tests/fuzz/corpus/$name" ] && dirs+=("tests/fuzz/corpus/$name")
  if [ -d "tests/fuzz/regress/$name" ] && ls "tests/fuzz/regress/$name"/* >/dev/null 2>&1; then
    "$bin" -runs=0 "tests/fuzz/regress/$name"/* >"$log.regress" 2>&1 || ok=0
  fi
  timeout $((secs + 60)) "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$build/fuzz-artifacts/$name-" \
    "${dirs[@]}" >"$log" 2>&1 || ok=0
  local runs last cov ft corp
  runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
  cov=$(echo "$last" | grep -oE 'cov: [0-9]+' | awk '{print $2}')
  ft=$(echo "$last" | grep -oE 'ft: [0-9]+' | awk '{print $2}')
  corp=$(echo "$last" | grep -oE 'corp: [0-9]+' | awk '{print $2}')
  {
    if [ "$ok" = 1 ]; then
      echo "fuzz $name: ok, ${runs:-?} runs in ${secs} s, cov ${cov:-?} ft ${ft:-?} corpus ${corp:-?}"
    else
      echo "fuzz $name: FAILED (see $log, artifacts in $build/fuzz-artifacts)"
      grep -E 'ERROR|runtime error|SUMMARY' "$log" "$log.regress" 2>/dev/null | head -n 5
    fi
  } >"$build/fuzz-$name.result"
}

bins=()
for bin in "$build"/fuzz/fuzz_*; do
  [ -x "$bin" ] && bins+=("$bin")
done
par=$(nproc 2>/dev/null || echo 1)
for bin in "${bins[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$par" ]; do wait -n; done
  run_one "$bin" &
done
wait

status=0
for bin in "${bins[@]}"; do
  name=$(basename "$bin")
  name=${name#fuzz_}
  cat "$build/fuzz-$name.result"
  if head -n 1 "$build/fuzz-$name.result" | grep -q ': ok,'; then
    echo "fuzz/$name 1 0" >>"$summary"
  else
    echo "fuzz/$name 0 1" >>"$summary"
    status=1
  fi
done
exit $status
