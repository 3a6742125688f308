#!/usr/bin/env bash
# Times the steps a cold `make test` spends downloading and building third-party programs,
# with every cache empty and apart from the real ones, and no port opened (nothing is started):
#   services phase: kafka.sh fetch, nats.sh build, jaeger.sh build, consul.sh build, in
#                   parallel as tests/infra/services.sh up runs them;
#   deploy phase:   tests/deploy/run.sh (helm.sh's go install, then go test of the chart),
#                   which scripts/test.sh runs alongside the fuzzing;
#   JS SDK phase:   npm ci in a copy of clients/js (scripts/run-sdk-tests.sh).
# Usage: tests/infra/cold-build-times.sh [ROOT] [PHASE...]   (ROOT default /tmp/meshgate-cold,
#   emptied first; PHASE any of services deploy npm, default all three, run one after another)
#   MESHGATE_COLD_SERVICES: the services phase's steps (default "kafka nats jaeger consul").
# Prints one "cold: STEP took N s, CPU M s" line per step, one per phase; logs in ROOT/logs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${1:-/tmp/meshgate-cold}
shift || true
PHASES=" ${*:-services deploy npm} "
STEPS=${MESHGATE_COLD_SERVICES:-kafka nats jaeger consul}

[ -x /usr/bin/time ] || { echo "cold: needs /usr/bin/time (Debian package time)" >&2; exit 2; }
case "$ROOT" in /tmp/*) ;; *) echo "cold: ROOT must be under /tmp (it is emptied)" >&2; exit 2 ;; esac
# Go's module cache is read-only on disk: make it writable before removing it.
[ -d "$ROOT" ] && chmod -R u+w "$ROOT" 2>/dev/null
rm -rf "$ROOT"
mkdir -p "$ROOT/logs"
export MESHGATE_CACHE=$ROOT/meshgate GOCACHE=$ROOT/go-build GOMODCACHE=$ROOT/mod GOPATH=$ROOT/go
export MAVEN_OPTS="${MAVEN_OPTS:-} -Dmaven.repo.local=$ROOT/m2" NPM_CACHE=$ROOT/npm

# step NAME CMD...: run and time one step (wall, and CPU of the step and all it ran: on a shared
# machine the CPU seconds compare across runs, the wall seconds do not), output to ROOT/logs/NAME.log
step() {
  local n=$1 rc=0 t
  shift
  /usr/bin/time -f '%e %U %S' -o "$ROOT/logs/$n.time" "$@" >"$ROOT/logs/$n.log" 2>&1 || rc=$?
  t=$(tail -n 1 "$ROOT/logs/$n.time")
  echo "cold: $n took $(echo "$t" | awk '{printf "%.0f s, CPU %.0f s", $1, $2 + $3}')$([ $rc = 0 ] ||
    echo " (FAILED rc=$rc, log $ROOT/logs/$n.log)")"
  return $rc
}

on() { [[ $PHASES == *" $1 "* ]]; }
status=0
t_all=$(date +%s)

if on services; then
  t0=$(date +%s)
  pids=()
  for s in $STEPS; do
    case $s in
      kafka) step kafka bash "$HERE/kafka.sh" fetch & ;;
      *) step "$s" bash "$HERE/$s.sh" build & ;;
    esac
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  echo "cold: services phase took $(($(date +%s) - t0)) s"
fi

if on deploy; then
  step deploy bash "$REPO/tests/deploy/run.sh" || status=1
fi

if on npm; then
  rm -rf "$ROOT/js" && mkdir -p "$ROOT/js"
  cp "$REPO/clients/js/package.json" "$REPO/clients/js/package-lock.json" "$ROOT/js/"
  step npm-ci bash -c 'cd "$1" && PUPPETEER_SKIP_DOWNLOAD=1 npm_config_cache="$2" \
    timeout 600 npm ci --prefer-offline --no-audit --no-fund' _ "$ROOT/js" "$NPM_CACHE" || status=1
fi

echo "cold: all took $(($(date +%s) - t_all)) s (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
exit $status
