#!/usr/bin/env bash
# The JavaScript client SDK (clients/js) against a gateway binary of the build:
# npm ci (cache under ~/.cache/meshgate/npm), npm run build, node --test (TAP),
# then one "<suite> <passed> <failed>" line appended to SUMMARY_FILE.
# Usage: run-sdk-tests.sh BUILD_DIR [SUMMARY_FILE]
# Tests write gateway logs and the browser screenshots to $MESHGATE_RUN/sdk/.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=$1
summary=${2:-/dev/null}
label="$(basename "$build")/sdk-js"
export MESHGATE_RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
out="$MESHGATE_RUN/sdk"
mkdir -p "$out"
rm -f "$out"/*.log "$out"/*.png "$out"/tap.txt  # only this run's output
fail() { echo "sdk-js: $*" >&2; echo "$label 0 1" >>"$summary"; exit 1; }

command -v node >/dev/null && command -v npm >/dev/null || fail "node/npm missing (tests/infra/install-deps.sh installs them)"
[ -x "$build/meshgate" ] || fail "no gateway binary at $build/meshgate"
t0=$(date +%s)
cd clients/js
# Nothing here downloads a browser: puppeteer-core drives Debian's /usr/bin/chromium.
export PUPPETEER_SKIP_DOWNLOAD=1 npm_config_cache="${NPM_CACHE:-${HOME:-/root}/.cache/meshgate/npm}"
npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
export npm_config_update_notifier npm_config_fund npm_config_audit
# Reuse node_modules while it matches the lock file; else a clean install (offline first).
stamp=node_modules/.lock-sha
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  timeout 600 npm ci --prefer-offline --no-audit --no-fund >"$out/npm-ci.log" 2>&1 ||
    { tail -n 30 "$out/npm-ci.log"; fail "npm ci failed"; }
  echo "$want" >"$stamp"
fi
timeout 300 npm run build >"$out/build.log" 2>&1 || { tail -n 30 "$out/build.log"; fail "npm run build failed"; }
t1=$(date +%s)

# One test file at a time: each starts gateways and chromium, and the machine has two cores.
MESHGATE_BINARY="$root/$build/meshgate" timeout 900 \
  node --test --test-concurrency=1 --test-reporter=tap test/*.test.mjs >"$out/tap.txt" 2>&1
rc=$?
grep -E '^not ok|^# (tests|pass|fail|skipped|duration)' "$out/tap.txt"
if [ $rc -ne 0 ]; then
  # the failures in full
  awk '/^not ok/{p=1} p&&/^  \.\.\./{print; p=0} p' "$out/tap.txt" | head -n 200
fi
# Count the top-level tests (subtests are indented).
p=$(grep -cE '^ok ' "$out/tap.txt")
f=$(grep -cE '^not ok ' "$out/tap.txt")
[ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1
echo "sdk-js: $p passed, $f failed (npm ci + build $((t1 - t0)) s, tests $(( $(date +%s) - t1 )) s; output in $out)"
echo "$label $p $f" >>"$summary"
[ "$f" -eq 0 ]
