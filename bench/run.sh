#!/usr/bin/env bash
# bench/run.sh: meshgate benchmark scenarios (see BENCHMARKS.md).
#
#   bench/run.sh [all|idle|local|floor|api|fanout|fanfloor|grpc|kafka|pubsub|nats|presence|presence-sync]... [--long]
#
# `make bench` = `bench/run.sh all` (short: under 3 minutes). --long gives the
# real figures (100,000 idle connections, 30 s load phases, more rounds).
# Every phase is bounded in count and in time (mgload --count/--seconds/--timeout,
# `timeout` around each process). Gateways started here are stopped by pid.
#
# Environment:
#   BUILD          build dir (default: build); targets meshgate, meshgate-cli, mgload are built
#   BENCH_OUT      results dir (default: bench/results)
#   GW_BIN         the gateway binary (default: $BUILD/meshgate): an older build against the
#                  same load generator, for before/after pairs in one sitting
#   GW_ARGS        extra options for every gateway started (split into words), e.g. tracing on:
#                  GW_ARGS="--otlp-endpoint http://127.0.0.1:18701 --trace-sample-ratio 1"
#   WS_THREADS     --ws-threads of every gateway started here (default: the binary's, one
#                  loop per CPU); the idle scenario takes IDLE_WS_THREADS (default 4)
#   BENCH_START_SERVICES=1   `all` starts tests/infra/services.sh when Redis/Kafka/Consul are down
#                  (single grpc/kafka runs always do)
#   FANFLOOR_WRITERS  writer threads of the fan-out floor row (default: WS_THREADS, else one per CPU)
#   FLOOR_RATE     the rate of the floor scenario's second phase (default: the local scenario's
#                  half rate in this run, else half of mgrelay's flat out)
#   GRPC_ROWS=rates  the grpc scenario runs only its fixed-rate rows (GRPC_RATE, then 10,000/s),
#                  each GRPC_REPEAT times (default 1) on the same two gateways: the p99 rows alone;
#                  GRPC_ROWS=api-rates: only the API's rows at 10,000/s, GRPC_REPEAT times
#   IDLE_CONNS, LOCAL_PAIRS, LOCAL_WINDOW, FANOUT_USERS, GRPC_RATE, KAFKA_RATE, PUBSUB_RATE, NATS_RATE,
#                  API_USERS, API_WINDOW, API_RATE, API_STREAM_WINDOW,
#                  PHASE_SECONDS
#                  override the scenario sizes
# Output: $BENCH_OUT/<run>.jsonl (one JSON line per measurement), <run>.md (table),
#   <run>.png (latency percentiles per path), and latest.{jsonl,md,png}.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build}
[[ $BUILD = /* ]] || BUILD=$ROOT/$BUILD
OUT=${BENCH_OUT:-$ROOT/bench/results}
RUN_ENV=${MESHGATE_RUN:-/tmp/meshgate-run}
LONG=0
SCEN=()
for a in "$@"; do
  case $a in
    --long) LONG=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    all|idle|local|floor|api|fanout|fanfloor|grpc|kafka|pubsub|nats|presence|presence-sync) SCEN+=("$a") ;;
    *) echo "run.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
[ ${#SCEN[@]} -eq 0 ] && SCEN=(all)
[ "${SCEN[0]}" = all ] && { ALL=1; SCEN=(idle local floor api fanout grpc kafka pubsub nats presence presence-sync); } || ALL=0

log() { echo "[bench $(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- build -----------------------------------------------------------------
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$ROOT" -B "$BUILD" $(command -v ninja >/dev/null && echo -G Ninja) \
    -DCMAKE_BUILD_TYPE=Release >/dev/null || die "cmake configure failed"
fi
cmake --build "$BUILD" --target meshgate meshgate-cli mgload mgrelay mgfanfloor >/dev/null || die "build failed"
GW=${GW_BIN:-$BUILD/meshgate}
LOAD=$BUILD/bench/mgload
[ -x "$GW" ] && [ -x "$LOAD" ] || die "missing $GW or $LOAD"

# ---- limits and machine ------------------------------------------------------
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
mkdir -p "$OUT"
RUN=$(date -u +%Y%m%dT%H%M%SZ)-$([ $LONG = 1 ] && echo long || echo short)
JSON=$OUT/$RUN.jsonl
: >"$JSON"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo "+dirty" || true)
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
MEM_GB=$(awk '/MemTotal/{printf "%.1f", $2/1048576}' /proc/meminfo)
BTYPE=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
printf '{"scenario":"machine","run":"%s","commit":"%s%s","nproc":%d,"cpu":"%s","mem_gb":%s,"nofile":%s,"build_type":"%s","command":"bench/run.sh %s","load1_start":%s,"ts":%d}\n' \
  "$RUN" "$COMMIT" "$DIRTY" "$(nproc)" "$CPU_MODEL" "$MEM_GB" "$NOFILE" "$BTYPE" "$*" \
  "$(cut -d' ' -f1 /proc/loadavg)" "$(date +%s)" >>"$JSON"
log "run $RUN commit $COMMIT$DIRTY nproc $(nproc) nofile $NOFILE load $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- gateways ------------------------------------------------------------------
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# start_gw VAR WSPORT GRPCPORT [args...]: starts a gateway, waits for /readyz (20 s), VAR=pid
start_gw() {
  local var=$1 ws=$2 grpc=$3; shift 3
  local loops=()
  [ -n "${WS_THREADS:-}" ] && loops=(--ws-threads "$WS_THREADS")
  # shellcheck disable=SC2086 # GW_ARGS: words on purpose
  "$GW" --ws-listen "127.0.0.1:$ws" --grpc-listen "127.0.0.1:$grpc" --log-level warn \
    --drain-seconds 1 "${loops[@]}" ${GW_ARGS:-} "$@" >"$OUT/$RUN.gw-$ws.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:$ws/readyz" >/dev/null 2>&1 && { printf -v "$var" %s "$pid"; return 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  log "gateway on :$ws did not become ready; log:"; tail -n 20 "$OUT/$RUN.gw-$ws.log" >&2
  return 1
}
stop_gws() { cleanup; }

# mgload with a hard wall-clock bound
load() { local bound=$1; shift; timeout -k 5 "$bound" "$LOAD" "$@" --json "$JSON"; }

skip() { # skip SCENARIO REASON
  log "SKIP $1: $2"
  printf '{"scenario":"%s","skipped":true,"reason":"%s","ts":%d}\n' "$1" "$2" "$(date +%s)" >>"$JSON"
}

services_env() {
  [ -f "$RUN_ENV/services.env" ] && . "$RUN_ENV/services.env"
  REDIS_NODES=${MESHGATE_TEST_REDIS_NODES:-}
  KAFKA=${MESHGATE_TEST_KAFKA:-127.0.0.1:19092}
  CONSUL=${MESHGATE_TEST_CONSUL:-127.0.0.1:18500}
  NATS=${MESHGATE_TEST_NATS:-nats://127.0.0.1:14222}
}
services_up() { # bounded: status, else start (when allowed)
  services_env
  if [ -n "$REDIS_NODES" ] && timeout 30 bash "$ROOT/tests/infra/services.sh" status >/dev/null 2>&1; then
    return 0
  fi
  if [ "$ALL" = 1 ] && [ "${BENCH_START_SERVICES:-0}" != 1 ]; then
    return 1
  fi
  log "starting real services (tests/infra/services.sh up)"
  timeout 900 bash "$ROOT/tests/infra/services.sh" up >&2 || return 1
  services_env
  [ -n "$REDIS_NODES" ]
}

P() { if [ $LONG = 1 ]; then echo "$2"; else echo "$1"; fi; } # P short long
SECS=${PHASE_SECONDS:-$(P 5 30)}
LOADB=$((SECS * 3 + 120)) # hard bound of one mgload process

# ---- scenarios -------------------------------------------------------------------
sc_idle() {
  local n=${IDLE_CONNS:-$(P 20000 100000)}
  # The gateway keeps --fd-reserve fds and room for --ws-max-handshakes out of its cap: a small
  # reserve and 256 handshakes (mgload opens at most 200 at once) leave room for NOFILE - 400.
  local cap=$((NOFILE - 400))
  if [ "$n" -gt "$cap" ]; then
    log "idle: $n connections asked, but the file limit (ulimit -Hn) is $NOFILE per process and"
    log "      cannot be raised here (no CAP_SYS_RESOURCE); measuring $cap instead"
    n=$cap
  fi
  # Across IDLE_WS_THREADS loops (issue 11: 15,000 connections over 4): connect, hold, then one
  # broadcast every connection must receive, then a clean close of all (close frames echoed,
  # the gateway back to 0 connections); the JSON line has the connections per loop.
  local port grpc gpid loops=${IDLE_WS_THREADS-4} # set empty: the binary's default (older builds)
  port=$(free_port)
  grpc=$(free_port)
  WS_THREADS=$loops start_gw gpid "$port" "$grpc" --max-connections $((n + 100)) --fd-reserve 64 \
    --ws-max-handshakes 256 --max-batch $((n + 100)) || return 1
  local nsrc=$(((n + 19999) / 20000 + 1))
  load $((LOADB + 300)) idle --port "$port" --conns "$n" --src "$nsrc" --parallel 200 --hold 10 --settle 2 \
    --broadcast --grpc "127.0.0.1:$grpc" --close --timeout 60 \
    --gw-pid "$gpid" --scenario idle --path local --label "idle $n conns, ${loops:-default} loops" \
    --prefix idle$$- >/dev/null
  stop_gws
}

sc_local() {
  local pairs=${LOCAL_PAIRS:-64} win=${LOCAL_WINDOW:-16} port gpid
  port=$(free_port)
  start_gw gpid "$port" "$(free_port)" || return 1
  load $LOADB pairs --port "$port" --pairs "$pairs" --window "$win" --seconds "$SECS" --warmup 1 \
    --count 100000000 --gw-pid "$gpid" --scenario local --path local --label "local flat out" \
    --prefix lf$$- >"$OUT/.flat"
  local rate
  rate=$(sed -n 's/.*"msgs_per_s":\([0-9]*\).*/\1/p' "$OUT/.flat" | tail -1)
  [ -n "$rate" ] && [ "$rate" -gt 0 ] || { log "local: no flat-out rate"; stop_gws; return 1; }
  local half=$((rate / 2))
  LOCAL_HALF=$half # the floor scenario measures the yardstick at this rate
  load $LOADB pairs --port "$port" --pairs "$pairs" --rate "$half" --seconds "$SECS" --warmup 1 \
    --count $((half * (SECS + 2))) --gw-pid "$gpid" --scenario local --path local \
    --label "local at half rate ($half/s)" --prefix lh$$- >/dev/null
  stop_gws
}

# The floor: mgload against mgrelay (bench/mgrelay.c), the least a relay of the gateway's shape
# can do (its loops, one write per connection per turn, cross-loop wake-ups), on the same cores:
# flat out, and at the gateway's half rate from the local scenario of this run (FLOOR_RATE, else
# half of the relay's own flat out). No gateway on these cores can beat these figures.
sc_floor() {
  local port rpid rate loops=${WS_THREADS:-$(nproc)}
  port=$(free_port)
  "$BUILD/bench/mgrelay" --port "$port" --threads "$loops" --seconds $((SECS * 2 + 60)) \
    >"$OUT/$RUN.relay-$port.log" 2>&1 &
  rpid=$!
  PIDS+=("$rpid")
  sleep 0.5
  load $LOADB pairs --port "$port" --pairs "${LOCAL_PAIRS:-64}" --window "${LOCAL_WINDOW:-16}" \
    --seconds "$SECS" --warmup 1 --count 100000000 --gw-pid "$rpid" --scenario floor --path local \
    --label "floor: mgrelay ($loops loops) flat out" --prefix ff$$- >"$OUT/.flat"
  rate=$(sed -n 's/.*"msgs_per_s":\([0-9]*\).*/\1/p' "$OUT/.flat" | tail -1)
  rate=${FLOOR_RATE:-${LOCAL_HALF:-$((${rate:-0} / 2))}}
  [ "$rate" -gt 0 ] || { log "floor: no rate"; stop_gws; return 1; }
  load $LOADB pairs --port "$port" --pairs "${LOCAL_PAIRS:-64}" --rate "$rate" --seconds "$SECS" \
    --warmup 1 --count $((rate * (SECS + 2))) --gw-pid "$rpid" --scenario floor --path local \
    --label "floor: mgrelay at $rate/s" --prefix fh$$- >/dev/null
  stop_gws
}

# a service calling the API: gRPC SendMessage to users connected over WebSocket
sc_api() {
  local users=${API_USERS:-1000} win=${API_WINDOW:-64} rate=${API_RATE:-2000} port grpc gpid
  port=$(free_port)
  grpc=$(free_port)
  start_gw gpid "$port" "$grpc" || return 1
  load $LOADB api --port "$port" --grpc "127.0.0.1:$grpc" --conns "$users" --window "$win" \
    --seconds "$SECS" --warmup 1 --count 100000000 --gw-pid "$gpid" --scenario api --path local \
    --label "API -> user flat out ($win calls in flight)" --prefix af$$- >/dev/null
  load $LOADB api --port "$port" --grpc "127.0.0.1:$grpc" --conns "$users" --rate "$rate" \
    --seconds "$SECS" --warmup 1 --count $((rate * (SECS + 2))) --gw-pid "$gpid" --scenario api \
    --path local --label "API -> user at $rate/s" --prefix ar$$- >/dev/null
  # the same through one SendStream call (an older gateway answers UNIMPLEMENTED: rows fail)
  load $LOADB api --stream --port "$port" --grpc "127.0.0.1:$grpc" --conns "$users" \
    --window "${API_STREAM_WINDOW:-256}" --seconds "$SECS" --warmup 1 --count 100000000 \
    --gw-pid "$gpid" --scenario api --path local \
    --label "API -> user flat out, SendStream (${API_STREAM_WINDOW:-256} unanswered)" \
    --prefix as$$- >/dev/null || true
  load $LOADB api --stream --port "$port" --grpc "127.0.0.1:$grpc" --conns "$users" \
    --rate "$rate" --seconds "$SECS" --warmup 1 --count $((rate * (SECS + 2))) --gw-pid "$gpid" \
    --scenario api --path local --label "API -> user at $rate/s, SendStream" \
    --prefix at$$- >/dev/null || true
  stop_gws
}

sc_fanout() {
  local n=${FANOUT_USERS:-10000} port grpc gpid
  port=$(free_port)
  grpc=$(free_port)
  start_gw gpid "$port" "$grpc" || return 1
  load $LOADB fanout --port "$port" --grpc "127.0.0.1:$grpc" --conns "$n" --rounds "$(P 3 10)" \
    --timeout 30 --gw-pid "$gpid" --scenario fanout --path local --label "SendBatch to $n" \
    --prefix fo$$- >/dev/null
  stop_gws
  # the floor of that row, in the same minute: the same frame to the same N sockets (mgfanfloor)
  fanfloor_row "$n" "$(P 3 10)" "${FANFLOOR_WRITERS:-${WS_THREADS:-$(nproc)}}"
  # the same over two gateways of a region: half the users on B, reached by DeliverBatch calls
  services_up || { skip fanout "two gateways: Redis Cluster/Consul not running"; return 0; }
  two_gws r1 r1 || { stop_gws; return 0; }
  load $LOADB fanout --port "$PA" --port2 "$PB" --grpc "127.0.0.1:$GA" --conns "$n" \
    --rounds "$(P 3 10)" --timeout 30 --gw-pid "$PIDA,$PIDB" --scenario fanout --path grpc \
    --label "SendBatch to $n over two gateways" --prefix f2$$- >/dev/null
  stop_gws
}

# fanfloor_row N ROUNDS WRITERS [--busy]: one row of bench/mgfanfloor.c, the fan-out's floor
# (N loopback writes of the gateway's message frame and their reads, no meshgate code)
fanfloor_row() {
  local n=$1 rounds=$2 w=$3 busy=${4:-} what
  what="$w writer$([ "$w" = 1 ] || echo s), reader $([ -n "$busy" ] && echo busy-polling || echo epoll)"
  # shellcheck disable=SC2086 # $busy: no word or one on purpose
  timeout -k 5 $((rounds * 15 + 60)) "$BUILD/bench/mgfanfloor" --conns "$n" --rounds "$rounds" \
    --writers "$w" $busy --seconds $((rounds * 12 + 30)) --json "$JSON" \
    --label "floor: mgfanfloor, $n loopback writes ($what)" >/dev/null 2>>"$OUT/$RUN.fanfloor.log" ||
    skip fanout "mgfanfloor ($what): $(tail -n 1 "$OUT/$RUN.fanfloor.log")"
}

# the fan-out floor alone, its variants: the gateway's writers, busy-polling reader, one writer
sc_fanfloor() {
  local n=${FANOUT_USERS:-10000} r w=${FANFLOOR_WRITERS:-${WS_THREADS:-$(nproc)}}
  r=$(P 5 20)
  fanfloor_row "$n" "$r" "$w"
  fanfloor_row "$n" "$r" "$w" --busy
  [ "$w" = 1 ] || fanfloor_row "$n" "$r" 1
}

# two gateways; A hosts the senders, B the recipients
two_gws() { # two_gws REGION_A REGION_B extra-args...
  local ra=$1 rb=$2; shift 2
  PA=$(free_port); PB=$(free_port); GA=$(free_port); GB=$(free_port)
  local common=(--presence redis-cluster --redis-nodes "$REDIS_NODES" --discovery consul
    --consul-addr "$CONSUL" "$@")
  start_gw PIDA "$PA" "$GA" --id "bench-a-$PA" --region "$ra" "${common[@]}" || return 1
  start_gw PIDB "$PB" "$GB" --id "bench-b-$PB" --region "$rb" "${common[@]}" || return 1
  sleep 3 # Consul watch: each sees the other
}

# probe: a few messages A -> B; prints the path the acks report
probe_path() {
  local out
  out=$(timeout 60 "$LOAD" pairs --port "$PB" --send-port "$PA" --pairs 1 --window 1 --count 20 \
    --seconds 15 --warmup 0 --settle 2 --drain 10 --prefix "probe$1$$-" 2>/dev/null)
  echo "$out" >>"$OUT/$RUN.probe.jsonl"
  local g k n l d r
  g=$(sed -n 's/.*"ack_path_grpc":\([0-9]*\).*/\1/p' <<<"$out")
  r=$(sed -n 's/.*"ack_path_redis_pubsub":\([0-9]*\).*/\1/p' <<<"$out")
  k=$(sed -n 's/.*"ack_path_kafka":\([0-9]*\).*/\1/p' <<<"$out")
  n=$(sed -n 's/.*"ack_path_nats":\([0-9]*\).*/\1/p' <<<"$out")
  l=$(sed -n 's/.*"ack_path_local":\([0-9]*\).*/\1/p' <<<"$out")
  d=$(sed -n 's/.*"delivered":\([0-9]*\).*/\1/p' <<<"$out")
  echo "grpc=${g:-0} kafka=${k:-0} pubsub=${r:-0} nats=${n:-0} local=${l:-0} delivered=${d:-0}"
}

# probe_by SCENARIO PATH: true when the probe's 20 messages all arrived, 15 or more acked by PATH;
# else skips SCENARIO saying what the probe saw.
probe_by() {
  local pr n
  pr=$(probe_path "${1:0:1}")
  log "$1 probe: $pr"
  n=${pr#*"$2"=}; n=${n%% *}
  [ "${n:-0}" -ge 15 ] && [[ $pr == *"delivered=20"* ]] && return 0
  skip "$1" "gateways do not route A -> B by $2 (probe: $pr)"
  stop_gws
  return 1
}

sc_grpc() {
  services_up || { skip grpc "Redis Cluster/Consul not running (make services-up)"; return 0; }
  two_gws r1 r1 || { skip grpc "gateways did not start with --presence redis-cluster --discovery consul"; stop_gws; return 0; }
  probe_by grpc grpc || return 0
  local rate=${GRPC_RATE:-20000} rows=${GRPC_ROWS:-all} k
  case $rows in all|rates|api-rates) ;; *) log "grpc: GRPC_ROWS is all, rates or api-rates, not $rows"; stop_gws; return 1 ;; esac
  if [ "$rows" = all ]; then
    load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --window 16 --seconds "$SECS" \
      --warmup 1 --count 100000000 --gw-pid "$PIDA,$PIDB" --scenario grpc --path grpc \
      --label "grpc flat out" --prefix gf$$- >/dev/null
    load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --window 16 --low --seconds "$SECS" \
      --warmup 1 --count 100000000 --gw-pid "$PIDA,$PIDB" --scenario grpc --path grpc \
      --label "grpc flat out, priority low" --prefix gl$$- >/dev/null
  fi
  local r
  [ "$rows" = api-rates ] && { grpc_api_rates "${GRPC_REPEAT:-1}"; stop_gws; return 0; }
  for r in $rate 10000; do
    for k in $(seq "${GRPC_REPEAT:-1}"); do
      load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --rate "$r" --seconds "$SECS" \
        --warmup 1 --count $((r * (SECS + 2))) --gw-pid "$PIDA,$PIDB" --scenario grpc --path grpc \
        --label "grpc at $r/s" --prefix gr$r-$k-$$- >/dev/null
    done
    [ "$rate" = 10000 ] && break
  done
  [ "$rows" = all ] || { stop_gws; return 0; }
  # the API on gateway A, its users on gateway B (1,000; issue 10's cross-gateway API goal)
  load $LOADB api --port "$PB" --grpc "127.0.0.1:$GA" --conns "${API_USERS:-1000}" \
    --window "${API_WINDOW:-64}" --seconds "$SECS" --warmup 1 --count 100000000 \
    --gw-pid "$PIDA,$PIDB" --scenario grpc --path grpc \
    --label "grpc API -> user on B flat out (${API_WINDOW:-64} calls in flight)" \
    --prefix ga$$- >/dev/null
  load $LOADB api --stream --port "$PB" --grpc "127.0.0.1:$GA" --conns "${API_USERS:-1000}" \
    --window "${API_STREAM_WINDOW:-256}" --seconds "$SECS" --warmup 1 --count 100000000 \
    --gw-pid "$PIDA,$PIDB" --scenario grpc --path grpc \
    --label "grpc API -> user on B flat out, SendStream" --prefix gs$$- >/dev/null || true
  grpc_api_rates 1
  stop_gws
}

# The grpc scenario's API rows at 10,000/s (SendMessage calls, then one SendStream), $1 times.
grpc_api_rates() {
  local k
  for k in $(seq "$1"); do
    load $LOADB api --port "$PB" --grpc "127.0.0.1:$GA" --conns "${API_USERS:-1000}" \
      --rate 10000 --seconds "$SECS" --warmup 1 --count $((10000 * (SECS + 2))) \
      --gw-pid "$PIDA,$PIDB" --scenario grpc --path grpc \
      --label "grpc API -> user on B at 10000/s, SendMessage" --prefix gu$k-$$- >/dev/null || true
    load $LOADB api --stream --port "$PB" --grpc "127.0.0.1:$GA" --conns "${API_USERS:-1000}" \
      --rate 10000 --seconds "$SECS" --warmup 1 --count $((10000 * (SECS + 2))) \
      --gw-pid "$PIDA,$PIDB" --scenario grpc --path grpc \
      --label "grpc API -> user on B at 10000/s, SendStream" --prefix gt$k-$$- >/dev/null || true
  done
}

sc_kafka() {
  services_up || { skip kafka "Redis Cluster/Kafka/Consul not running (make services-up)"; return 0; }
  local linger=${KAFKA_LINGER_MS:-1}
  # hot threshold out of reach: every pair stays cold, so r1 -> r2 goes by Kafka
  two_gws r1 r2 --kafka-brokers "$KAFKA" --kafka-linger-ms "$linger" --hot-threshold 1000000000 \
    || { skip kafka "gateways did not start with --kafka-brokers"; stop_gws; return 0; }
  probe_by kafka kafka || return 0
  local rate=${KAFKA_RATE:-200}
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --rate "$rate" --seconds "$SECS" \
    --warmup 2 --count $((rate * (SECS + 3))) --drain 15 --gw-pid "$PIDA,$PIDB" --scenario kafka \
    --path kafka --label "kafka cold, $rate/s, linger ${linger} ms" --prefix kr$$- >/dev/null
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --window 8 --seconds "$SECS" \
    --warmup 2 --count 100000000 --drain 15 --gw-pid "$PIDA,$PIDB" --scenario kafka --path kafka \
    --label "kafka cold, flat out, linger ${linger} ms" --prefix kf$$- >/dev/null
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --window 8 --low --seconds "$SECS" \
    --warmup 2 --count 100000000 --drain 15 --gw-pid "$PIDA,$PIDB" --scenario kafka --path kafka \
    --label "kafka cold, flat out, priority low" --prefix kl$$- >/dev/null
  stop_gws
}

# Redis Pub/Sub between two gateways of one region (HIGH: DELIVERED by the target's receipt)
sc_pubsub() {
  services_up || { skip pubsub "Redis Cluster/Consul not running (make services-up)"; return 0; }
  two_gws r1 r1 --redis-pubsub true --near-route redis-pubsub,grpc \
    || { skip pubsub "gateways did not start with --redis-pubsub"; stop_gws; return 0; }
  probe_by pubsub pubsub || return 0
  local rate=${PUBSUB_RATE:-5000}
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --rate "$rate" --seconds "$SECS" \
    --warmup 1 --count $((rate * (SECS + 2))) --gw-pid "$PIDA,$PIDB" --scenario pubsub \
    --path redis-pubsub --label "redis-pubsub at $rate/s" --prefix pr$$- >/dev/null
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --window 16 --seconds "$SECS" \
    --warmup 1 --count 100000000 --gw-pid "$PIDA,$PIDB" --scenario pubsub --path redis-pubsub \
    --label "redis-pubsub flat out" --prefix pf$$- >/dev/null
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --window 16 --low --seconds "$SECS" \
    --warmup 1 --count 100000000 --gw-pid "$PIDA,$PIDB" --scenario pubsub --path redis-pubsub \
    --label "redis-pubsub flat out, priority low" --prefix pl$$- >/dev/null
  stop_gws
}

# the NATS JetStream bus: a cold cross-region pair, --far-route nats (HIGH waits for the PubAck)
sc_nats() {
  services_up || { skip nats "Redis Cluster/Consul/NATS not running (make services-up)"; return 0; }
  two_gws r1 r2 --nats-url "$NATS" --far-route nats,inbox --hot-threshold 1000000000 \
    || { skip nats "gateways did not start with --nats-url $NATS"; stop_gws; return 0; }
  probe_by nats nats || return 0
  local rate=${NATS_RATE:-5000}
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --rate "$rate" --seconds "$SECS" \
    --warmup 2 --count $((rate * (SECS + 3))) --drain 15 --gw-pid "$PIDA,$PIDB" --scenario nats \
    --path nats --label "nats cold, $rate/s" --prefix nr$$- >/dev/null
  load $LOADB pairs --port "$PB" --send-port "$PA" --pairs 64 --window 16 --seconds "$SECS" \
    --warmup 2 --count 100000000 --drain 15 --gw-pid "$PIDA,$PIDB" --scenario nats --path nats \
    --label "nats cold, flat out, HIGH" --prefix nf$$- >/dev/null
  stop_gws
}

sc_presence() {
  if [ ! -x "$ROOT/bench/presence.sh" ] && [ ! -f "$ROOT/bench/presence.sh" ]; then
    skip presence "bench/presence.sh not present"; return 0
  fi
  services_up || { skip presence "Redis Cluster not running (make services-up)"; return 0; }
  local out
  out=$(BUILD=$BUILD MESHGATE_REDIS_NODES=$REDIS_NODES timeout 600 bash "$ROOT/bench/presence.sh" \
    4 "$(P 3 10)" 10000 100 2>&1)
  echo "$out" >"$OUT/$RUN.presence.txt"
  local single batch
  single=$(awk '/^single/{print $2}' <<<"$out")
  batch=$(awk '/^batch/{print $2}' <<<"$out")
  printf '{"scenario":"presence","path":"redis","label":"presence lookups (4 threads)","single_per_s":%s,"batch_users_per_s":%s,"ts":%d}\n' \
    "${single:-0}" "${batch:-0}" "$(date +%s)" >>"$JSON"
}

# Multi-region presence: replication lag of 1,000 presence changes a second from region b's
# cluster to region a's view (bench/presence_sync_bench.c; needs the second Redis Cluster).
sc_presence_sync() {
  services_up || { skip presence-sync "services not running (make services-up)"; return 0; }
  local nodes_b=${MESHGATE_TEST_REDIS_B_NODES:-}
  [ -n "$nodes_b" ] || { skip presence-sync "no second Redis Cluster (tests/infra/services.sh up)"; return 0; }
  cmake --build "$BUILD" --target presence_sync_bench >/dev/null || { skip presence-sync "build failed"; return 0; }
  local out
  out=$(timeout 300 "$BUILD/bench/presence_sync_bench" "$REDIS_NODES" "$nodes_b" "$KAFKA" 1000 "$(P 10 30)" 2>&1 | tail -n 1)
  case $out in
    \{*) printf '%s\n' "$out" | python3 -c 'import json,sys,time; r=json.load(sys.stdin); r.update(scenario="presence-sync",path="kafka",label="presence replication, 1,000 changes/s",ts=int(time.time())); print(json.dumps(r))' >>"$JSON" ;;
    *) skip presence-sync "presence_sync_bench: $out" ;;
  esac
}

for s in "${SCEN[@]}"; do
  log "== $s (load $(cut -d' ' -f1 /proc/loadavg))"
  "sc_${s//-/_}" || log "$s failed"
done

# ---- report: Markdown table and plot ---------------------------------------------------
python3 - "$JSON" "$OUT/$RUN.md" "$OUT/$RUN.dat" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
m = next((r for r in rows if r.get("scenario") == "machine"), {})
o = open(sys.argv[2], "w")
o.write(f"Run {m.get('run')} commit {m.get('commit')} build {m.get('build_type')}: {m.get('nproc')} x {m.get('cpu')}, "
        f"{m.get('mem_gb')} GB, nofile {m.get('nofile')}, load at start {m.get('load1_start')}\n\n"
        f"Command: `{m.get('command')}`\n\n")
o.write("| scenario | what | conns | msg/s | p50 µs | p99 µs | p99.9 µs | max µs | errors | gateway | load1 |\n")
o.write("|---|---|---|---|---|---|---|---|---|---|---|\n")
def f(v, nd=0):
    return "" if v is None else (f"{v:,.{nd}f}" if isinstance(v, (int, float)) else str(v))
dat = open(sys.argv[3], "w")
for r in rows:
    sc = r.get("scenario")
    if sc == "machine":
        continue
    if r.get("skipped"):
        o.write(f"| {sc} | skipped: {r.get('reason')} |||||||||\n")
        continue
    if sc == "presence-sync":
        o.write(f"| presence-sync | {r.get('label')} | | {f(r.get('rate_per_s'))} changes/s, {f(r.get('applied'))} of {f(r.get('changes'))} applied | "
                f"lag <= {f(r.get('lag_p50_ms_le'))} ms | <= {f(r.get('lag_p99_ms_le'))} ms | | <= {f(r.get('lag_max_ms_le'))} ms | | | |\n")
        continue
    if sc == "presence":
        o.write(f"| presence | {r.get('label')} | | {f(r.get('single_per_s'))} single, {f(r.get('batch_users_per_s'))} batched users/s | | | | | | | |\n")
        continue
    if sc == "fanout" and not r.get("summary"):
        continue
    gw = ""
    if r.get("mode") == "idle":
        gw = f"RSS {f(r.get('rss_per_conn_bytes'))} B/conn, idle CPU {f(r.get('gw_cpu_pct'),2)} %"
        if r.get("loop_conns"):
            gw += f", per loop {'/'.join(str(x) for x in r['loop_conns'])}"
        if "broadcast_received" in r:
            gw += f", broadcast {f(r.get('broadcast_received'))} in {f(r.get('broadcast_all_ms'),0)} ms"
        if "closed_clean" in r:
            gw += f", closed clean {f(r.get('closed_clean'))} (left {f(r.get('gw_conns_after_close'))})"
        conns = f"{f(r.get('open'))}/{f(r.get('conns'))}"
    elif sc == "fanout":
        gw = (f"all {f(r.get('conns'))} received in {f(r.get('all_received_ms_mean'),1)} ms mean "
              f"({f(r.get('all_received_ms_best'),1)} best, {f(r.get('all_received_ms_worst'),1)} worst), "
              f"{f(r.get('gw_cpu_ms_per_round'),0)} ms CPU/round")
        if r.get("mode") == "fanfloor": # bench/mgfanfloor.c: the writers' CPU, then the reader's
            gw += (f" of the writers, {f(r.get('load_cpu_ms_per_round'),0)} of the reader; "
                   f"median {f(r.get('all_received_ms_median'),1)} ms")
        conns = f(r.get("conns"))
    else:
        gw = f"CPU {f(r.get('gw_cpu_pct'),0)} %, {f(r.get('gw_cpu_us_per_msg'),1)} µs/msg"
        if r.get("gw_p50_us") is not None: # pairs and api: where the latency went (bench/README.md)
            gw += (f"; p50/p99 µs: mgload late {f(r.get('send_lag_p50_us'))}/{f(r.get('send_lag_p99_us'))}, "
                   f"send -> socket {f(r.get('gw_p50_us'))}/{f(r.get('gw_p99_us'))}, "
                   f"read late {f(r.get('recv_lag_p50_us'))}/{f(r.get('recv_lag_p99_us'))}; "
                   f"mgload CPU {f(r.get('load_cpu_pct'))} %")
        if r.get("gw_rq_wait_us_per_msg") is not None: # the scheduler's share (bench/README.md)
            gw += (f"; run queue {f(r.get('gw_rq_wait_us_per_msg'),1)} µs/msg over "
                   f"{f(r.get('gw_switches_per_msg'),2)} switches")
        conns = f(r.get("conns")) if r.get("mode") == "api" else f(2 * r.get("pairs", 0))
    o.write(f"| {sc} | {r.get('label')} | {conns} | {f(r.get('msgs_per_s'))} | {f(r.get('p50_us'),0)} | "
            f"{f(r.get('p99_us'),0)} | {f(r.get('p999_us'),0)} | {f(r.get('max_us'),0)} | {f(r.get('errors'))} | {gw} | {f(r.get('load1'),1)} |\n")
    if r.get("samples"):
        lab = r.get("label", sc).replace('"', "'")
        dat.write(f"\"{lab}\" {r['p50_us']} {r['p99_us']} {r['p999_us']} {r['max_us']}\n")
o.close(); dat.close()
EOF
cat "$OUT/$RUN.md"

# ---- change against the previous run (latest.jsonl before this one) ---------------------
[ -f "$OUT/latest.jsonl" ] && python3 "$ROOT/bench/compare.py" "$OUT/latest.jsonl" "$JSON" |
  tee "$OUT/$RUN.change.txt"

if ! command -v gnuplot >/dev/null; then
  log "installing gnuplot-nox for the plot"
  (apt-get install -y -q gnuplot-nox >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q gnuplot-nox >/dev/null 2>&1; }) || true
fi
if command -v gnuplot >/dev/null && [ -s "$OUT/$RUN.dat" ]; then
  gnuplot <<EOF 2>/dev/null && log "plot: $OUT/$RUN.png"
set terminal pngcairo size 1100,560 noenhanced
set output "$OUT/$RUN.png"
set title "meshgate end-to-end latency per path ($RUN, commit $COMMIT$DIRTY)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set yrange [10:*]
set ylabel "microseconds (log)"
set xtics rotate by -20 font ",9"
set key top left
set grid ytics
plot "$OUT/$RUN.dat" using 2:xtic(1) title "p50", '' using 3 title "p99", '' using 4 title "p99.9", '' using 5 title "max"
EOF
  [ -f "$OUT/$RUN.png" ] || { command -v gnuplot >/dev/null && gnuplot -e 'set terminal' 2>&1 | grep -q pngcairo || true; }
fi
for e in jsonl md png; do
  [ -f "$OUT/$RUN.$e" ] && cp "$OUT/$RUN.$e" "$OUT/latest.$e"
done
rm -f "$OUT/.flat"
log "results: $OUT/$RUN.{jsonl,md,png}"
