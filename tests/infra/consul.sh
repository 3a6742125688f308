#!/usr/bin/env bash
# Real HashiCorp Consul (`consul agent -dev`) on loopback, built from its Go module
# (tests/infra/consul: our own module requiring github.com/hashicorp/consul v1.22.3).
# Usage: tests/infra/consul.sh build|start|stop|status|start-acl|stop-acl|status-acl
#   MESHGATE_CACHE (default ~/.cache/meshgate): binary at $MESHGATE_CACHE/bin/consul
#   MESHGATE_RUN   (default /tmp/meshgate-run): data, pid, log in $MESHGATE_RUN/consul[-acl]
#   Ports (dev agent): MESHGATE_CONSUL_HTTP_PORT 18500, _GRPC_PORT 18502, _SERF_LAN_PORT 18301,
#     _SERF_WAN_PORT 18302, _SERVER_PORT 18300. ACL agent: MESHGATE_CONSUL_ACL_HTTP_PORT 18600,
#     _ACL_GRPC_PORT 18602, _ACL_SERF_LAN_PORT 18401, _ACL_SERF_WAN_PORT 18402, _ACL_SERVER_PORT 18400;
#     management token MESHGATE_CONSUL_ACL_TOKEN (default below), default_policy deny.
# Build time measured 2026-11 on a 2-vCPU VM (Go 1.26.8, empty module + build cache, machine
# heavily loaded by parallel C builds, load avg 10-18): module download ~90 s + go build 1148 s
# (~21 min total). Relink with warm Go build cache: 53 s. Binary present: 0 s (skipped).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MESHGATE_CACHE:-$HOME/.cache/meshgate}
RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
BIN=$CACHE/bin/consul
HOST=127.0.0.1
TIMEOUT=${MESHGATE_CONSUL_TIMEOUT:-60}
ACL_TOKEN=${MESHGATE_CONSUL_ACL_TOKEN:-6d3f1f8e-6a2b-4c1d-9e7f-0a1b2c3d4e5f}

# true if PID exists and is not a zombie (containers may reap orphans late)
pid_alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
die() { echo "consul: $*" >&2; exit 1; }

find_go() {
  GO=$(command -v go || true)
  [ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; } || die "go not found"
}

cmd_build() {
  if [ -x "$BIN" ] && "$BIN" version >/dev/null 2>&1; then return 0; fi
  find_go
  local src=$CACHE/consul-src log
  # Build in a copy so the source tree is never modified by -mod=mod.
  rm -rf "$src"; mkdir -p "$src" "$CACHE/bin"
  cp "$HERE/consul/go.mod" "$HERE/consul/main.go" "$src/"
  [ -f "$HERE/consul/go.sum" ] && cp "$HERE/consul/go.sum" "$src/"
  log=$CACHE/consul-build.log
  if ! (cd "$src" && GOFLAGS=-mod=mod timeout 3600 "$GO" build -trimpath \
          -ldflags '-s -w' -o "$BIN.tmp" .) >"$log" 2>&1; then
    tail -n 40 "$log" >&2; rm -f "$BIN.tmp"
    die "build failed (full log: $log; see tests/infra/CONSUL_BUILD_NOTES.md)"
  fi
  mv "$BIN.tmp" "$BIN"
  "$BIN" version >/dev/null 2>&1 || die "built $BIN but 'consul version' fails"
}

# Select instance: plain dev agent or the ACL-enabled one.
setup() {
  if [ "$1" = acl ]; then
    NAME=consul-acl
    HTTP=${MESHGATE_CONSUL_ACL_HTTP_PORT:-18600}; GRPC=${MESHGATE_CONSUL_ACL_GRPC_PORT:-18602}
    LAN=${MESHGATE_CONSUL_ACL_SERF_LAN_PORT:-18401}; WAN=${MESHGATE_CONSUL_ACL_SERF_WAN_PORT:-18402}
    SRV=${MESHGATE_CONSUL_ACL_SERVER_PORT:-18400}
  else
    NAME=consul
    HTTP=${MESHGATE_CONSUL_HTTP_PORT:-18500}; GRPC=${MESHGATE_CONSUL_GRPC_PORT:-18502}
    LAN=${MESHGATE_CONSUL_SERF_LAN_PORT:-18301}; WAN=${MESHGATE_CONSUL_SERF_WAN_PORT:-18302}
    SRV=${MESHGATE_CONSUL_SERVER_PORT:-18300}
  fi
  MODE=$1; DIR=$RUN/$NAME; PIDF=$DIR/consul.pid; LOG=$DIR/consul.log
}

running_pid() {
  local pid
  [ -f "$PIDF" ] || return 1
  pid=$(cat "$PIDF" 2>/dev/null) || return 1
  [ -n "$pid" ] && pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'consul agent' || return 1
  echo "$pid"
}

ready() {
  local leader
  leader=$(curl -fsS --max-time 2 "http://$HOST:$HTTP/v1/status/leader" 2>/dev/null) || return 1
  [ -n "$leader" ] && [ "$leader" != '""' ] || return 1
  if [ "$MODE" = acl ]; then  # management token must be usable (ACL bootstrap done)
    curl -fsS --max-time 2 -H "X-Consul-Token: $ACL_TOKEN" "http://$HOST:$HTTP/v1/acl/token/self" >/dev/null 2>&1 || return 1
  fi
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

cmd_start() {
  running_pid >/dev/null && ready && return 0
  cmd_build
  cmd_stop
  local p
  for p in "$HTTP" "$GRPC" "$LAN" "$SRV"; do port_open "$p" && die "port $p already in use"; done
  mkdir -p "$DIR/data"
  local extra=()
  if [ "$MODE" = acl ]; then
    cat >"$DIR/acl.hcl" <<HCL
acl {
  enabled = true
  default_policy = "deny"
  enable_token_persistence = false
  tokens {
    initial_management = "$ACL_TOKEN"
    agent = "$ACL_TOKEN"
  }
}
HCL
    extra=(-config-file "$DIR/acl.hcl")
  fi
  nohup "$BIN" agent -dev -node "meshgate-$NAME" -bind "$HOST" -client "$HOST" -data-dir "$DIR/data" \
    -http-port "$HTTP" -grpc-port "$GRPC" -grpc-tls-port -1 -dns-port -1 -serf-lan-port "$LAN" -serf-wan-port "$WAN" \
    -server-port "$SRV" -log-level warn "${extra[@]}" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDF"
  local pid=$! end=$((SECONDS + TIMEOUT))
  until ready; do
    pid_alive "$pid" || { tail -n 30 "$LOG" >&2; die "$NAME exited during startup (log: $LOG)"; }
    [ $SECONDS -lt $end ] || { tail -n 30 "$LOG" >&2; die "$NAME has no leader within ${TIMEOUT}s (log: $LOG)"; }
    sleep 0.2
  done
}

cmd_stop() {
  local pid
  if pid=$(running_pid); then
    kill "$pid" 2>/dev/null || true
    local end=$((SECONDS + 15))
    while pid_alive "$pid"; do
      [ $SECONDS -lt $end ] || { kill -9 "$pid" 2>/dev/null || true; sleep 0.3; break; }
      sleep 0.1
    done
  fi
  rm -rf "${DIR:?}"
}

cmd_status() {
  local pid
  pid=$(running_pid) || { echo "$NAME: not running"; return 1; }
  ready || { echo "$NAME: pid $pid, no leader on $HOST:$HTTP"; return 1; }
  echo "$NAME: pid $pid, http://$HOST:$HTTP leader $(curl -fsS --max-time 2 "http://$HOST:$HTTP/v1/status/leader")"
}

case "${1:-}" in
  build) cmd_build; echo "$BIN" ;;
  start) setup dev; cmd_start ;;
  stop) setup dev; cmd_stop ;;
  status) setup dev; cmd_status ;;
  start-acl) setup acl; cmd_start ;;
  stop-acl) setup acl; cmd_stop ;;
  status-acl) setup acl; cmd_status ;;
  token) echo "$ACL_TOKEN" ;;
  *) echo "usage: $0 build|start|stop|status|start-acl|stop-acl|status-acl|token" >&2; exit 2 ;;
esac
