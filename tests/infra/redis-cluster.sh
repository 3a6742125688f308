#!/usr/bin/env bash
# Real 6-node Redis Cluster (3 masters + 3 replicas) of Debian's redis-server on loopback.
# Usage: tests/infra/redis-cluster.sh start|stop|status|wait|nodes|stop-node PORT|kill-node PORT|start-node PORT
#   wait: block (bounded) until cluster_state:ok everywhere and every master has a synced replica.
#   MESHGATE_REDIS_BASE_PORT (default 17000): nodes use BASE..BASE+5
#   MESHGATE_RUN (default /tmp/meshgate-run): data in $MESHGATE_RUN/redis/<port>
set -euo pipefail

BASE=${MESHGATE_REDIS_BASE_PORT:-17000}
RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
DIR=$RUN/redis
HOST=127.0.0.1
PORTS=($(seq "$BASE" $((BASE + 5))))
TIMEOUT=${MESHGATE_REDIS_TIMEOUT:-30}

# true if PID exists and is not a zombie (containers may reap orphans late)
pid_alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
die() { echo "redis-cluster: $*" >&2; exit 1; }
rcli() { local p=$1; shift; timeout 5 redis-cli -h "$HOST" -p "$p" "$@" 2>/dev/null; }
alive() { [ "$(rcli "$1" ping)" = PONG ]; }

command -v redis-server >/dev/null || die "redis-server not installed (run tests/infra/install-deps.sh)"

# Each node's cluster bus listens on port + 10000. Inside the kernel's ephemeral range an
# outgoing connection may already hold it ("Address already in use" at random): refuse.
eph_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ $((BASE + 10005)) -lt "$eph_low" ] ||
  die "base port $BASE puts the cluster bus ($((BASE + 10000))-$((BASE + 10005))) in the ephemeral range (from $eph_low)"

start_node() {
  local p=$1 d=$DIR/$1
  alive "$p" && return 0
  mkdir -p "$d"
  cat >"$d/redis.conf" <<CONF
bind $HOST
port $p
protected-mode no
dir $d
daemonize yes
pidfile $d/redis.pid
logfile $d/redis.log
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout 2000
cluster-require-full-coverage yes
appendonly no
save ""
CONF
  redis-server "$d/redis.conf" || die "redis-server failed on port $p (see $d/redis.log)"
  local end=$((SECONDS + 10))
  until alive "$p"; do
    [ $SECONDS -lt $end ] || { tail -n 20 "$d/redis.log" >&2; die "node $p did not answer PING within 10s"; }
    sleep 0.1
  done
}

stop_node() {
  local p=$1 d=$DIR/$1 pid=""
  [ -f "$d/redis.pid" ] && pid=$(cat "$d/redis.pid" 2>/dev/null || true)
  rcli "$p" shutdown nosave now >/dev/null || true
  local end=$((SECONDS + 10))
  while alive "$p" || { [ -n "$pid" ] && pid_alive "$pid"; }; do
    if [ $SECONDS -ge $end ]; then [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; sleep 0.2; break; fi
    sleep 0.1
  done
  rm -f "$d/redis.pid"
}

# 0 when every node reports cluster_state:ok, 3 masters each with a connected replica.
healthy() {
  local p
  for p in "${PORTS[@]}"; do
    rcli "$p" cluster info | grep -q '^cluster_state:ok' || return 1
  done
  local nodes masters replicas
  nodes=$(rcli "${PORTS[0]}" cluster nodes) || return 1
  masters=$(awk '$3 ~ /master/ && $3 !~ /fail/ && $8 == "connected" && NF >= 9 {print $1}' <<<"$nodes")
  [ "$(wc -l <<<"$masters")" -eq 3 ] || return 1
  local m
  for m in $masters; do
    awk -v m="$m" '$3 ~ /slave/ && $3 !~ /fail/ && $4 == m && $8 == "connected"' <<<"$nodes" | grep -q . || return 1
  done
  # replicas must have finished their initial sync
  for p in "${PORTS[@]}"; do
    if rcli "$p" role | head -1 | grep -q slave; then
      rcli "$p" info replication | grep -q '^master_link_status:up' || return 1
    fi
  done
}

wait_healthy() {
  local end=$((SECONDS + TIMEOUT))
  until healthy; do
    [ $SECONDS -lt $end ] || { rcli "${PORTS[0]}" cluster nodes >&2 || true; die "cluster not healthy within ${TIMEOUT}s"; }
    sleep 0.2
  done
}

cmd_start() {
  if healthy; then return 0; fi
  local p fresh=1
  for p in "${PORTS[@]}"; do [ -s "$DIR/$p/nodes.conf" ] && fresh=0; done
  for p in "${PORTS[@]}"; do start_node "$p"; done
  if [ $fresh -eq 1 ] || [ "$(rcli "${PORTS[0]}" cluster info | awk -F: '/^cluster_known_nodes/{print $2}' | tr -d '\r')" != 6 ]; then
    if [ $fresh -eq 0 ]; then  # half-initialized leftovers: start over
      for p in "${PORTS[@]}"; do stop_node "$p"; rm -rf "${DIR:?}/$p"; done
      for p in "${PORTS[@]}"; do start_node "$p"; done
    fi
    local addrs=() out
    for p in "${PORTS[@]}"; do addrs+=("$HOST:$p"); done
    out=$(timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes 2>&1) \
      || { echo "$out" >&2; die "redis-cli --cluster create failed"; }
  fi
  wait_healthy
}

cmd_stop() {
  local p pids=()
  for p in "${PORTS[@]}"; do stop_node "$p" & pids+=($!); done
  wait "${pids[@]}" || true
  rm -rf "${DIR:?}"
}

kill_node() {  # SIGKILL: simulated crash, keeps nodes.conf
  local p=$1 pid
  pid=$(cat "$DIR/$p/redis.pid" 2>/dev/null) || die "no pid file for $p"
  kill -9 "$pid" 2>/dev/null || true
  local end=$((SECONDS + 5))
  while pid_alive "$pid" && [ $SECONDS -lt $end ]; do sleep 0.05; done
  rm -f "$DIR/$p/redis.pid"
}

cmd_status() {
  local p
  for p in "${PORTS[@]}"; do
    if alive "$p"; then
      printf '%s:%s %s %s\n' "$HOST" "$p" "$(rcli "$p" role | head -1)" \
        "$(rcli "$p" cluster info | grep '^cluster_state' | tr -d '\r')"
    else
      printf '%s:%s down\n' "$HOST" "$p"
    fi
  done
  healthy
}

check_port() { [[ "${1:-}" =~ ^[0-9]+$ ]] && [ "$1" -ge "$BASE" ] && [ "$1" -le $((BASE + 5)) ] || die "port must be in $BASE..$((BASE + 5))"; }

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  wait) wait_healthy ;;
  nodes) (IFS=,; echo "${PORTS[*]/#/$HOST:}") ;;
  stop-node) check_port "${2:-}"; stop_node "$2" ;;           # clean shutdown, keeps nodes.conf
  kill-node) check_port "${2:-}"; kill_node "$2" ;;           # SIGKILL, keeps nodes.conf
  start-node) check_port "${2:-}"; [ -s "$DIR/$2/nodes.conf" ] || die "no nodes.conf for $2 (cluster never started?)"
              start_node "$2" ;;                                # rejoins with its existing identity
  *) echo "usage: $0 start|stop|status|wait|nodes|stop-node PORT|kill-node PORT|start-node PORT" >&2; exit 2 ;;
esac
