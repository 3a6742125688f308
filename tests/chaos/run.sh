#!/usr/bin/env bash
# The fault schedule with a history checker (tests/chaos, README "Reliability").
# Starts its OWN Redis Cluster, Kafka and Consul (other ports, other run dir: the faults kill
# them, so never the shared ones), runs driver.py (four gateways, two regions, load + faults,
# settle), then check.py on the history; also proves the checker on this run's own history
# with one delivered message removed (it must fail), and runs the checker's unit test.
# Usage: tests/chaos/run.sh BUILD_DIR short|full [SUMMARY_FILE]
#   short: about 60 s of load, 6,000 messages (make test); full: 120 s, 20,000 (make chaos)
#   Appends "chaos <passed> <failed>" to SUMMARY_FILE. Results in $MESHGATE_CHAOS_RUN/<stamp>/.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${1:?usage: run.sh BUILD_DIR short|full [SUMMARY_FILE]}
mode=${2:-short}
summary=${3:-/dev/null}
case "$mode" in
  short) seconds=60 messages=6000 settle=60 ;;
  full) seconds=120 messages=20000 settle=120 ;;
  *) echo "run.sh: mode must be short or full" >&2; exit 2 ;;
esac

# Our own services: ports and run dir apart from the shared ones (defaults 17000, 19092, 18500).
export MESHGATE_RUN=${MESHGATE_CHAOS_RUN:-/tmp/meshgate-chaos}
export MESHGATE_REDIS_BASE_PORT=${MESHGATE_CHAOS_REDIS_BASE_PORT:-22000} # bus ports +10000: below 32768
export MESHGATE_KAFKA_PORT=${MESHGATE_CHAOS_KAFKA_PORT:-29092}
export MESHGATE_KAFKA_CONTROLLER_PORT=${MESHGATE_CHAOS_KAFKA_CONTROLLER_PORT:-29093}
export MESHGATE_CONSUL_HTTP_PORT=${MESHGATE_CHAOS_CONSUL_HTTP_PORT:-28500}
export MESHGATE_CONSUL_GRPC_PORT=$((MESHGATE_CONSUL_HTTP_PORT + 2))
export MESHGATE_CONSUL_SERVER_PORT=$((MESHGATE_CONSUL_HTTP_PORT - 200))
export MESHGATE_CONSUL_SERF_LAN_PORT=$((MESHGATE_CONSUL_HTTP_PORT - 199))
export MESHGATE_CONSUL_SERF_WAN_PORT=$((MESHGATE_CONSUL_HTTP_PORT - 198))
export MESHGATE_SERVICES_ACL=0
export MESHGATE_SERVICES="redis kafka consul" # of its own: never the shared ones' ports
port_base=${MESHGATE_CHAOS_PORT_BASE:-28600}   # gateways: +0..3 ws, +10..13 grpc (us2 also on 127.0.0.2: the relay)

passed=0 failed=0
result() { if [ "$1" = 0 ]; then passed=$((passed + 1)); echo "ok   $2"; else failed=$((failed + 1)); echo "FAIL $2"; fi; }
finish() {
  bash tests/infra/services.sh down >/dev/null 2>&1 || true
  echo "chaos $passed $failed" >>"$summary"
  echo "chaos: $passed passed, $failed failed"
}

# The checker must catch what it is there to catch (no services needed).
/usr/bin/python3 tests/chaos/test_check.py; result $? "checker unit test (lost, duplicate, misdelivery, order)"

[ -x "$build/meshgate" ] || { echo "run.sh: no $build/meshgate"; result 1 "build"; finish; exit 1; }
mkdir -p "$MESHGATE_RUN"
out=$MESHGATE_RUN/$(date -u +%Y%m%dT%H%M%SZ)-$mode
mkdir -p "$out"
ulimit -n 65536 2>/dev/null || true
trap finish EXIT
t0=$(date +%s)
if ! bash tests/infra/services.sh up >"$out/services.log" 2>&1; then
  tail -n 30 "$out/services.log"; result 1 "chaos services up"; exit 1
fi
echo "chaos: services up in $(( $(date +%s) - t0 )) s (run dir $MESHGATE_RUN, results $out)"

timeout $((seconds + settle + 300)) /usr/bin/python3 tests/chaos/driver.py --binary "$build/meshgate" \
  --run "$MESHGATE_RUN" --history "$out/history.jsonl" --logs "$out/logs" \
  --seconds "$seconds" --messages "$messages" --settle-seconds "$settle" \
  --port-base "$port_base" --redis-base "$MESHGATE_REDIS_BASE_PORT" 2>&1 | tee "$out/driver.log"
drc=${PIPESTATUS[0]}
result "$drc" "driver: $mode schedule ran to the end"
for f in "$out"/logs/*.log; do   # a gateway that crashed by itself (not our SIGKILL) is a finding
  if grep -qE 'AddressSanitizer|runtime error:|Segmentation|Assertion' "$f"; then
    echo "chaos: $(basename "$f"):"; grep -E -m5 'AddressSanitizer|runtime error:|Segmentation|Assertion' "$f"
    drc=1; result 1 "gateway log $(basename "$f") clean"
  fi
done
if [ -s "$out/history.jsonl" ]; then
  /usr/bin/python3 tests/chaos/check.py "$out/history.jsonl" --json "$out/check.json" | tee "$out/check.log"
  result "${PIPESTATUS[0]}" "history check: nothing lost, misdelivered, duplicated on a connection or reordered"
  # The same history with one shown message removed must fail the check.
  /usr/bin/python3 tests/chaos/test_check.py --mutate "$out/history.jsonl"
  result $? "checker fails this history with one delivered message removed"
fi
echo "chaos: took $(( $(date +%s) - t0 )) s"
