#!/usr/bin/env bash
# Presence lookup benchmark: mg_presence (presence_redis.c, single and
# pipelined batch) against redis-benchmark's raw HGETALL on the same cluster.
# Usage: bench/presence.sh [threads=8] [seconds=5] [users=10000] [batch=100]
#   BUILD (default build): a configured build dir; mg_router and mg_common are built in it
#   MESHGATE_REDIS_NODES / MESHGATE_TEST_REDIS_NODES (default: tests/infra/redis-cluster.sh nodes)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build}
THREADS=${1:-8} SECS=${2:-5} USERS=${3:-10000} BATCH=${4:-100}
NODES=${MESHGATE_REDIS_NODES:-${MESHGATE_TEST_REDIS_NODES:-$("$ROOT/tests/infra/redis-cluster.sh" nodes)}}
FIRST=${NODES%%,*}

cmake --build "$BUILD" --target mg_router mg_common mg_proto >/dev/null
BIN=$BUILD/bench/presence_bench
mkdir -p "$BUILD/bench"
cc -O2 -std=gnu11 -D_GNU_SOURCE -I"$ROOT/src" -I"$BUILD/gen" "$ROOT/bench/presence_bench.c" \
  "$BUILD/libmg_store.a" "$BUILD/libmg_router.a" "$BUILD/libmg_store.a" "$BUILD/libmg_common.a" \
  "$BUILD/libmg_proto.a" \
  $(pkg-config --libs hiredis libprotobuf-c) -lpthread -o "$BIN"

echo "== mg_presence: $THREADS threads, ${SECS}s each, $USERS users, batch $BATCH"
out=$("$BIN" "$NODES" "$THREADS" "$SECS" "$USERS" "$BATCH")
echo "$out"
single=$(awk '/^single/{print $2}' <<<"$out")
batch=$(awk '/^batch/{print $2}' <<<"$out")

# redis-benchmark --cluster replaces {tag} by a hash tag of each master, so
# its load spreads over the masters as ours does (its keys are empty hashes).
echo "== redis-benchmark --cluster: HGETALL, 50 clients"
rbench() {
  timeout 300 redis-benchmark --cluster -h "${FIRST%:*}" -p "${FIRST#*:}" -c 50 -q "$@" \
    HGETALL "mg:p:{tag}" 2>&1 | tr '\r' '\n' | sed -n 's/.* \([0-9.]*\) requests per second.*/\1/p' | tail -n 1
}
rb=$(rbench -n 200000)
rbp=$(rbench -n 1000000 -P 16)
echo "redis-benchmark HGETALL      $rb/s (no pipelining)"
echo "redis-benchmark HGETALL -P16 $rbp/s (pipelined)"
awk -v s="$single" -v b="$batch" -v r="$rb" -v rp="$rbp" 'BEGIN{
  printf "ratio single lookup / redis-benchmark        %.2f\n", s / r
  printf "ratio batch lookup  / redis-benchmark -P16   %.2f\n", b / rp }'
