#!/usr/bin/env bash
# Real Jaeger v2 (the OpenTelemetry-Collector-based `jaeger` binary) on loopback, built from its
# Go module github.com/jaegertracing/jaeger v1.76.0 (module v1.x is the Jaeger v2 binary): the
# OTLP/HTTP collector and query API that tests/integration/test_tracing.c reads traces back from.
# Usage: tests/infra/jaeger.sh build|start|stop|status|otlp|query
#   MESHGATE_CACHE (default ~/.cache/meshgate): binary at $MESHGATE_CACHE/bin/jaeger
#   MESHGATE_RUN   (default /tmp/meshgate-run): config, pid, log in $MESHGATE_RUN/jaeger
#   Ports: MESHGATE_JAEGER_OTLP_PORT 18701 (OTLP/HTTP receiver), _QUERY_PORT 18702 (query HTTP:
#     /api/traces/<id>, /api/v3/...), _QUERY_GRPC_PORT 18703.
#   In-memory storage (max 100000 traces), nothing else listens (no OTLP gRPC, Jaeger or Zipkin
#   receivers, no telemetry or health port).
# `go install ...@v1.76.0` refuses the module (its go.mod has a replace directive), so the build
# downloads the module from the proxy (`go mod download`), copies it out of the read-only module
# cache and builds in the copy as the main module, its replace and go.sum applying. It builds not
# upstream's ./cmd/jaeger (some thirty collector components and every storage backend) but our
# tests/infra/jaeger/main.go, copied to cmd/jaeger/meshgate: only the components the config
# below names. Two stand-ins of ours keep the storage backends out of the link: the
# jaeger_storage extension's package is replaced by a memory-only one
# (tests/infra/jaeger/jaegerstorage), and cmd/query/app's one import of the v1 storage factory
# (for a type only the v1 binaries use) is pointed at tests/infra/jaeger/archive. A new VERSION
# whose files moved makes the build stop with a message, not build something else.
# Build time measured 2026-11-30 on the 2-vCPU VM (Go 1.26.8, empty GOMODCACHE and GOCACHE,
# tests/infra/cold-build-times.sh; the machine shared with other helpers' builds and benchmarks,
# load average 15-24, so the wall times are pessimistic and the CPU seconds are what compares):
#   this build:          122-137 CPU s (module download included), 458-590 s wall;
#   upstream cmd/jaeger: 428 CPU s for the go build alone (1597 s wall at that load; 1118 s
#                        wall beside the cold Consul build; 705 s measured before at a lighter load).
# Binary 32 MB instead of 85 MB. Binary present: 0 s (skipped). A cached upstream binary runs
# this config as well.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MESHGATE_CACHE:-$HOME/.cache/meshgate}
RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
BIN=$CACHE/bin/jaeger
VERSION=v1.76.0
HOST=127.0.0.1
OTLP=${MESHGATE_JAEGER_OTLP_PORT:-18701}
QUERY=${MESHGATE_JAEGER_QUERY_PORT:-18702}
QUERY_GRPC=${MESHGATE_JAEGER_QUERY_GRPC_PORT:-18703}
TIMEOUT=${MESHGATE_JAEGER_TIMEOUT:-60}
DIR=$RUN/jaeger
PIDF=$DIR/jaeger.pid
LOG=$DIR/jaeger.log

# true if PID exists and is not a zombie (containers may reap orphans late)
pid_alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
die() { echo "jaeger: $*" >&2; exit 1; }

find_go() {
  GO=$(command -v go || true)
  [ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; } || die "go not found"
}

cmd_build() {
  if [ -x "$BIN" ] && "$BIN" version >/dev/null 2>&1; then return 0; fi
  find_go
  local src=$CACHE/jaeger-src log=$CACHE/jaeger-build.log dir flags
  mkdir -p "$CACHE/bin"
  dir=$(cd "$CACHE" && GOFLAGS=-mod=mod "$GO" mod download -json "github.com/jaegertracing/jaeger@$VERSION" \
        | sed -n 's/.*"Dir": "\(.*\)",/\1/p') || die "go mod download github.com/jaegertracing/jaeger@$VERSION failed"
  [ -n "$dir" ] && [ -d "$dir" ] || die "module github.com/jaegertracing/jaeger@$VERSION not downloaded"
  rm -rf "$src"; cp -r "$dir" "$src"; chmod -R u+w "$src"
  # Our main package and its two stand-ins (tests/infra/jaeger, see the comment at the top).
  rm -f "$src"/cmd/jaeger/internal/extension/jaegerstorage/*.go
  cp "$HERE/jaeger/jaegerstorage/jaegerstorage.go" "$src/cmd/jaeger/internal/extension/jaegerstorage/"
  mkdir -p "$src/cmd/jaeger/meshgate/archive"
  cp "$HERE/jaeger/main.go" "$src/cmd/jaeger/meshgate/"
  cp "$HERE/jaeger/archive/archive.go" "$src/cmd/jaeger/meshgate/archive/"
  flags=$src/cmd/query/app/flags.go
  grep -q "^	storage \"github.com/jaegertracing/jaeger/internal/storage/v1/factory\"$" "$flags" ||
    die "$flags no longer imports internal/storage/v1/factory as storage: redo tests/infra/jaeger for $VERSION"
  sed -i 's#^\tstorage "github.com/jaegertracing/jaeger/internal/storage/v1/factory"$#\tstorage "github.com/jaegertracing/jaeger/cmd/jaeger/meshgate/archive"#' "$flags"
  if ! (cd "$src" && GOFLAGS=-mod=mod timeout 3600 "$GO" build -trimpath -ldflags '-s -w' \
          -o "$BIN.tmp" ./cmd/jaeger/meshgate) >"$log" 2>&1; then
    tail -n 40 "$log" >&2; rm -f "$BIN.tmp"
    die "build failed (full log: $log)"
  fi
  mv "$BIN.tmp" "$BIN"
  rm -rf "$src"
  "$BIN" version >/dev/null 2>&1 || die "built $BIN but 'jaeger version' fails"
}

running_pid() {
  local pid
  [ -f "$PIDF" ] || return 1
  pid=$(cat "$PIDF" 2>/dev/null) || return 1
  [ -n "$pid" ] && pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'jaeger' || return 1
  echo "$pid"
}

ready() {
  curl -fsS --max-time 2 "http://$HOST:$QUERY/api/services" >/dev/null 2>&1 &&
    curl -sS --max-time 2 -o /dev/null -X POST -H 'Content-Type: application/json' -d '{}' \
      "http://$HOST:$OTLP/v1/traces" 2>/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

cmd_start() {
  running_pid >/dev/null && ready && return 0
  cmd_build
  cmd_stop
  local p
  for p in "$OTLP" "$QUERY" "$QUERY_GRPC"; do port_open "$p" && die "port $p already in use"; done
  mkdir -p "$DIR"
  cat >"$DIR/config.yaml" <<YAML
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: "$HOST:$QUERY"
    grpc:
      endpoint: "$HOST:$QUERY_GRPC"
receivers:
  otlp:
    protocols:
      http:
        endpoint: "$HOST:$OTLP"
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
YAML
  nohup "$BIN" --config "$DIR/config.yaml" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDF"
  local pid=$! end=$((SECONDS + TIMEOUT))
  until ready; do
    pid_alive "$pid" || { tail -n 30 "$LOG" >&2; die "exited during startup (log: $LOG)"; }
    [ $SECONDS -lt $end ] || { tail -n 30 "$LOG" >&2; die "not answering within ${TIMEOUT}s (log: $LOG)"; }
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
  pid=$(running_pid) || { echo "jaeger: not running"; return 1; }
  ready || { echo "jaeger: pid $pid, not answering on $HOST:$QUERY / $HOST:$OTLP"; return 1; }
  echo "jaeger: pid $pid, OTLP http://$HOST:$OTLP, query http://$HOST:$QUERY"
}

case "${1:-}" in
  build) cmd_build; echo "$BIN" ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  otlp) echo "http://$HOST:$OTLP" ;;
  query) echo "http://$HOST:$QUERY" ;;
  *) echo "usage: $0 build|start|stop|status|otlp|query" >&2; exit 2 ;;
esac
