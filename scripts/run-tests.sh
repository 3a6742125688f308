#!/usr/bin/env bash
# Runs every Criterion binary of a build (build/tests/<dir>/<dir>_test_*),
# then the Python client test against a gateway of that build.
# Usage: run-tests.sh BUILD_DIR [SUMMARY_FILE]
# Appends "<suite> <passed> <failed>" lines to SUMMARY_FILE, and the failing tests' names and
# assertion lines to SUMMARY_FILE.failures (scripts/test.sh prints them last, where a CI tail shows them).
set -uo pipefail
cd "$(dirname "$0")/.."
build=$1
summary=${2:-/dev/null}
failures=/dev/null; [ "$summary" != /dev/null ] && failures=$summary.failures
status=0
label=$(basename "$build")
for bin in $(find "$build/tests" -type f -perm -u+x -name '*_test_*' | sort); do
  name=$(basename "$bin")
  # Integration tests start real processes: one at a time keeps them from
  # competing for the two cores and makes their timing bounds meaningful.
  jobs=2; case "$bin" in */integration/*) jobs=1 ;; esac
  echo "== $label/$name"
  t0=$(date +%s)
  out=$("$bin" --jobs "$jobs" --timeout 300 2>&1); rc=$?
  syn=$(echo "$out" | grep -E 'Synthesis: Tested' | tail -n 1)
  if [ $rc -ne 0 ] || [ -z "$syn" ]; then echo "$out" | tail -n 200; status=1; else echo "$syn ($(( $(date +%s) - t0 )) s)"; fi
  t=$(echo "$syn" | sed -nE 's/.*Tested: ([0-9]+).*/\1/p'); t=${t:-0}
  p=$(echo "$syn" | sed -nE 's/.*Passing: ([0-9]+).*/\1/p'); p=${p:-0}
  f=$(( t - p )); [ $rc -ne 0 ] && [ $f -eq 0 ] && f=1
  echo "$label/$name $p $f" >>"$summary"
  if [ $f -ne 0 ]; then
    { echo "$label/$name:"; echo "$out" | grep -E '^\[(FAIL|----)\]|Assertion|ERROR|Sanitizer|crash' | head -n 20 || true; } >>"$failures"
  fi
done
for py in tests/integration/test_*.py; do
  [ -f "$py" ] || continue
  echo "== $label/$(basename "$py")"
  out=$(timeout 300 /usr/bin/python3 "$py" --binary "$build/meshgate" 2>&1); rc=$?
  echo "$out" | tail -n 20
  line=$(echo "$out" | grep -E '^python: [0-9]+ passed, [0-9]+ failed' | tail -n 1)
  p=$(echo "$line" | sed -nE 's/^python: ([0-9]+) passed.*/\1/p'); p=${p:-0}
  f=$(echo "$line" | sed -nE 's/.* ([0-9]+) failed.*/\1/p'); f=${f:-1}
  [ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1
  [ "$f" -ne 0 ] && status=1
  echo "$label/$(basename "$py") $p $f" >>"$summary"
  if [ "$f" -ne 0 ]; then
    { echo "$label/$(basename "$py"):"; echo "$out" | tail -n 10; } >>"$failures"
  fi
done
exit $status
