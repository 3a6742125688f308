#!/usr/bin/env bash
# make test: everything from a fresh Debian machine to a verdict.
# 1. install Debian packages, Kafka (Maven Central), Consul and helm (Go
#    module proxy), all cached under ~/.cache/meshgate
# 2. start Redis Cluster, Kafka and Consul on loopback
# 3. build normally and with ASan+UBSan, run every test on both builds, then the
#    JavaScript client SDK's tests (clients/js, node --test + chromium) on the normal build
# 4. a short fault schedule with its history checker (tests/chaos, own services), a short run
#    of every libFuzzer harness (tests/fuzz), offline Helm/Istio validation
# 5. stop the services; print one closing line "N passed, M failed"
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
t0=$(date +%s)
tp=$t0
# phase NAME: prints how long the step that just ended took (the suite's time is a budget).
phase() { local now; now=$(date +%s); echo "-- $1 took $((now - tp)) s"; tp=$now; }

bash tests/infra/install-deps.sh
phase install
export MESHGATE_RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
mkdir -p "$MESHGATE_RUN"
ulimit -n 65536 2>/dev/null || true

bash tests/infra/services.sh up
phase services
# On a cold machine the offline deploy checks first build helm and compile the Kubernetes/Istio
# Go packages of tests/deploy (minutes of CPU). Done here at the lowest priority, that work takes
# the CPU the suites leave idle instead of lengthening the deploy step at the end; warm, it is a
# few seconds. Its failures do not count: tests/deploy/run.sh does the same again and reports.
# Its own process group (setsid), so that an early exit stops all of it.
setsid nice -n 19 bash -c 'bash tests/infra/helm.sh && cd tests/deploy && go test -count=1 -run "^\$" ./...' \
  >"$MESHGATE_RUN/deploy-warm.out" 2>&1 &
warm_pid=$!
trap '[ -z "$warm_pid" ] || kill -- -"$warm_pid" 2>/dev/null; bash "$root/tests/infra/services.sh" down >/dev/null 2>&1 || true' EXIT

gen=""; command -v ninja >/dev/null && gen="-G Ninja"
cmake -S . -B build $gen -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j
cmake -S . -B build-asan $gen -DCMAKE_BUILD_TYPE=Debug -DMG_SANITIZE=ON >/dev/null
cmake --build build-asan -j
phase build

summary="$MESHGATE_RUN/summary.txt"
: >"$summary"
: >"$summary.failures"
status=0
# Every spawned gateway gets --ws-threads from MESHGATE_TEST_WS_THREADS (tests/support/mg_test.c):
# the sanitizer run takes 4 loops, where a frame or receipt crossing loops would show a
# use-after-free or a leak at the stop of all loops; the normal run takes 1, the path of a
# one-core pod. test_ordering.c's loops test asks for 4 in both.
MESHGATE_TEST_WS_THREADS=1 bash scripts/run-tests.sh build "$summary" || status=1
phase "normal suite"
MESHGATE_TEST_WS_THREADS=4 \
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  LSAN_OPTIONS=suppressions=$root/tests/lsan.supp \
  bash scripts/run-tests.sh build-asan "$summary" || status=1
phase "ASan+UBSan suite"
# The JavaScript client SDK and its web-chat demo (in chromium) against build/meshgate.
bash scripts/run-sdk-tests.sh build "$summary" || status=1
phase "JS SDK"
# The short fault schedule (tests/chaos) on its own services, after the shared ones' tests.
bash tests/chaos/run.sh build short "$summary" || status=1
phase chaos
# Offline Helm/Istio/promtool/Dockerfile checks (tests/deploy) run alongside the fuzzing: they
# assert nothing about time, and each harness fuzzes for its fixed seconds either way.
deploy_out=$MESHGATE_RUN/deploy.out
deploy_pid=
if [ -f tests/deploy/run.sh ]; then
  # after the warm-up above (a subshell cannot `wait` for it: it polls its pid), not beside it
  (while kill -0 "$warm_pid" 2>/dev/null; do sleep 1; done; exec bash tests/deploy/run.sh) \
    >"$deploy_out" 2>&1 &
  deploy_pid=$!
fi
# libFuzzer harnesses (tests/fuzz): a short bounded run of each (MG_FUZZ_SECONDS, default 15).
if CC=clang cmake -S . -B build-fuzz $gen -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMG_FUZZ=ON \
     -DMG_BUILD_TESTS=OFF >/dev/null && cmake --build build-fuzz -j >/dev/null; then
  bash tests/fuzz/run.sh build-fuzz "${MG_FUZZ_SECONDS:-15}" "$summary" || status=1
else
  echo "fuzz build failed"; echo "fuzz/build 0 1" >>"$summary"; status=1
fi
phase fuzz
if [ -n "$deploy_pid" ]; then
  if wait "$deploy_pid"; then out=$(cat "$deploy_out"); echo "$out" | tail -n 5; else out=$(cat "$deploy_out"); echo "$out"; status=1; fi
  line=$(echo "$out" | grep -E '^deploy: [0-9]+ passed, [0-9]+ failed' | tail -n 1 || true)
  [ -n "$line" ] && echo "deploy $(echo "$line" | sed -E 's/^deploy: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/')" >>"$summary"
  phase deploy
  warm_pid= # over (deploy started after it): its pid may be another's by the EXIT trap
fi

passed=$(awk '{p+=$2} END {print p+0}' "$summary")
failed=$(awk '{f+=$3} END {print f+0}' "$summary")
echo
echo "make test took $(( $(date +%s) - t0 )) s"
[ "$failed" -eq 0 ] || status=1
# What failed, last, where the tail of a CI log shows it: every suite with a failure, and the
# failing tests' names and assertion lines (scripts/run-tests.sh).
if [ "$failed" -ne 0 ]; then
  echo "failed suites:"; awk '$3 > 0 {print "  " $1 ": " $3 " failed"}' "$summary"
  cat "$summary.failures"
fi
echo "$passed passed, $failed failed"
exit $status
