#!/usr/bin/env bash
# Real nats-server with JetStream on loopback, built from its Go module
# (github.com/nats-io/nats-server/v2 at $NATS_VERSION, `go install` into the cache).
# Usage: tests/infra/nats.sh build|start|stop|status|start-cluster|stop-cluster|status-cluster
#        tests/infra/nats.sh kill-node N|start-node N   (cluster node 1-3, for fault tests)
#   MESHGATE_CACHE (default ~/.cache/meshgate): binary at $MESHGATE_CACHE/bin/nats-server
#   MESHGATE_RUN   (default /tmp/meshgate-run): store, pid, log in $MESHGATE_RUN/nats[-cluster]
#   Ports: single server MESHGATE_NATS_PORT 14222 (monitoring MESHGATE_NATS_HTTP_PORT 18222);
#     cluster client ports MESHGATE_NATS_CLUSTER_PORT_BASE+1..3 (14223-14225), route ports
#     MESHGATE_NATS_ROUTE_PORT_BASE+1..3 (16223-16225), monitoring 18223-18225.
# Build time measured 2026-11 on a 2-vCPU VM (Go 1.26.8, shared with other builds): module
# download + go build ~3 min cold; binary present: 0 s (skipped).
set -euo pipefail

CACHE=${MESHGATE_CACHE:-$HOME/.cache/meshgate}
RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
NATS_VERSION=${MESHGATE_NATS_VERSION:-v2.15.2}
BIN=$CACHE/bin/nats-server
HOST=127.0.0.1
PORT=${MESHGATE_NATS_PORT:-14222}
HTTP_PORT=${MESHGATE_NATS_HTTP_PORT:-18222}
CBASE=${MESHGATE_NATS_CLUSTER_PORT_BASE:-14222}
RBASE=${MESHGATE_NATS_ROUTE_PORT_BASE:-16222}
HBASE=${MESHGATE_NATS_CLUSTER_HTTP_BASE:-18222}
TIMEOUT=${MESHGATE_NATS_TIMEOUT:-30}

pid_alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
die() { echo "nats: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

find_go() {
  GO=$(command -v go || true)
  [ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; } || die "go not found"
}

cmd_build() {
  if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "${NATS_VERSION#v}"; then return 0; fi
  find_go
  mkdir -p "$CACHE/bin" "$CACHE/nats-gobin"
  local log=$CACHE/nats-build.log
  # go install module@version: no go.mod of ours, nothing fetched lands in the repo.
  if ! (cd "$CACHE" && GOBIN=$CACHE/nats-gobin GOFLAGS=-mod=mod timeout 3600 "$GO" install -trimpath \
          -ldflags '-s -w' "github.com/nats-io/nats-server/v2@$NATS_VERSION") >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "build failed (full log: $log)"
  fi
  mv "$CACHE/nats-gobin/nats-server" "$BIN"
  "$BIN" --version >/dev/null 2>&1 || die "built $BIN but 'nats-server --version' fails"
}

# pid of a running server whose pid file is $1
running_pid() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q nats-server || return 1
  echo "$pid"
}

# ready HTTP_PORT: JetStream current (clustered: the meta group has a leader)
ready() { curl -fsS --max-time 2 "http://$HOST:$1/healthz" >/dev/null 2>&1; }

# start_server NAME DIR CLIENT_PORT HTTP_PORT [cluster args...]
start_server() {
  local name=$1 dir=$2 port=$3 http=$4; shift 4
  local pidf=$dir/nats.pid log=$dir/nats.log
  running_pid "$pidf" >/dev/null && ready "$http" && return 0
  port_open "$port" && die "port $port already in use"
  mkdir -p "$dir/store"
  nohup "$BIN" -a "$HOST" -p "$port" -m "$http" -n "$name" -js -sd "$dir/store" "$@" \
    >"$log" 2>&1 </dev/null &
  echo $! >"$pidf"
}

wait_ready() { # DIR HTTP_PORT
  local pidf=$1/nats.pid log=$1/nats.log end=$((SECONDS + TIMEOUT)) pid
  pid=$(cat "$pidf")
  until ready "$2"; do
    pid_alive "$pid" || { tail -n 30 "$log" >&2; die "nats-server exited during startup (log: $log)"; }
    [ $SECONDS -lt $end ] || { tail -n 30 "$log" >&2; die "nats-server not ready within ${TIMEOUT}s (log: $log)"; }
    sleep 0.2
  done
}

stop_dir() { # DIR: stops the server of that directory, removes its store
  local pid
  if pid=$(running_pid "$1/nats.pid"); then
    kill "$pid" 2>/dev/null || true
    local end=$((SECONDS + 15))
    while pid_alive "$pid"; do
      [ $SECONDS -lt $end ] || { kill -9 "$pid" 2>/dev/null || true; sleep 0.3; break; }
      sleep 0.1
    done
  fi
}

cmd_start() {
  cmd_build
  start_server meshgate-nats "$RUN/nats" "$PORT" "$HTTP_PORT"
  wait_ready "$RUN/nats" "$HTTP_PORT"
}

cmd_stop() { stop_dir "$RUN/nats"; rm -rf "${RUN:?}/nats"; }

cmd_status() {
  local pid
  pid=$(running_pid "$RUN/nats/nats.pid") || { echo "nats: not running"; return 1; }
  ready "$HTTP_PORT" || { echo "nats: pid $pid, JetStream not ready on $HOST:$PORT"; return 1; }
  echo "nats: pid $pid, nats://$HOST:$PORT (JetStream)"
}

routes() { echo "nats://$HOST:$((RBASE + 1)),nats://$HOST:$((RBASE + 2)),nats://$HOST:$((RBASE + 3))"; }

start_node() { # N
  local n=$1
  start_server "meshgate-nats-$n" "$RUN/nats-cluster/n$n" $((CBASE + n)) $((HBASE + n)) \
    --cluster_name meshgate-nats --cluster "nats://$HOST:$((RBASE + n))" --routes "$(routes)"
}

cmd_start_cluster() {
  cmd_build
  local n
  for n in 1 2 3; do start_node "$n"; done
  for n in 1 2 3; do wait_ready "$RUN/nats-cluster/n$n" $((HBASE + n)); done
}

cmd_stop_cluster() {
  local n
  for n in 1 2 3; do stop_dir "$RUN/nats-cluster/n$n"; done
  rm -rf "${RUN:?}/nats-cluster"
}

cmd_status_cluster() {
  local n rc=0
  for n in 1 2 3; do
    if running_pid "$RUN/nats-cluster/n$n/nats.pid" >/dev/null && ready $((HBASE + n)); then
      echo "nats-cluster node $n: nats://$HOST:$((CBASE + n))"
    else
      echo "nats-cluster node $n: not ready"; rc=1
    fi
  done
  return $rc
}

case "${1:-}" in
  build) cmd_build; echo "$BIN" ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  url) echo "nats://$HOST:$PORT" ;;
  start-cluster) cmd_start_cluster ;;
  stop-cluster) cmd_stop_cluster ;;
  status-cluster) cmd_status_cluster ;;
  cluster-urls) echo "nats://$HOST:$((CBASE + 1)),nats://$HOST:$((CBASE + 2)),nats://$HOST:$((CBASE + 3))" ;;
  kill-node) [ -n "${2:-}" ] || die "kill-node N"; pid=$(running_pid "$RUN/nats-cluster/n$2/nats.pid") && kill -9 "$pid" ;;
  start-node) [ -n "${2:-}" ] || die "start-node N"; cmd_build; start_node "$2"; wait_ready "$RUN/nats-cluster/n$2" $((HBASE + $2)) ;;
  *) echo "usage: $0 build|start|stop|status|url|start-cluster|stop-cluster|status-cluster|cluster-urls|kill-node N|start-node N" >&2; exit 2 ;;
esac
