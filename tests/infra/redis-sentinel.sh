#!/usr/bin/env bash
# Redis with Sentinel (the scaling guide's stage-2 HA) of Debian's redis-server on loopback:
# one primary, one replica and three Sentinels (redis-server --sentinel) watching master
# "meshgate" (quorum 2, down-after 1000 ms, failover-timeout 5000 ms).
# Usage: tests/infra/redis-sentinel.sh start|stop|status|wait|sentinels|master|primary|replica|
#                                      failover|kill-node PORT|start-node PORT
#   primary / replica: host:port of the current primary / a replica, as the Sentinels say.
#   failover: a planned failover (SENTINEL FAILOVER: the replica promoted, the primary demoted).
#   kill-node PORT: SIGKILL a data node (a crashed primary); start-node PORT: start it again
#   (it rejoins as a replica once a Sentinel reconfigures it).
#   wait: block (bounded) until the Sentinels agree on a primary that has a synced replica.
#   MESHGATE_SENTINEL_BASE_PORT (default 17400): data nodes BASE, BASE+1; Sentinels BASE+10..12
#   MESHGATE_RUN (default /tmp/meshgate-run): data in $MESHGATE_RUN/sentinel/<port>
set -euo pipefail

BASE=${MESHGATE_SENTINEL_BASE_PORT:-17400}
RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
DIR=$RUN/sentinel
HOST=127.0.0.1
MASTER=meshgate
DATA=("$BASE" $((BASE + 1)))
SENTINELS=($((BASE + 10)) $((BASE + 11)) $((BASE + 12)))
TIMEOUT=${MESHGATE_SENTINEL_TIMEOUT:-30}

pid_alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
die() { echo "redis-sentinel: $*" >&2; exit 1; }
rcli() { local p=$1; shift; timeout 5 redis-cli -h "$HOST" -p "$p" "$@" 2>/dev/null; }
alive() { [ "$(rcli "$1" ping)" = PONG ]; }

command -v redis-server >/dev/null || die "redis-server not installed (run tests/infra/install-deps.sh)"

# 0 when port p answers and it is our process (its pid file names a live process); dies when
# something else holds the port (never adopt, let alone fail over, another setup's Redis).
ours_alive() {
  local p=$1 pid
  alive "$p" || return 1
  pid=$(cat "$DIR/$p/redis.pid" 2>/dev/null) && pid_alive "$pid" && return 0
  die "port $p is in use by a process this script did not start (set MESHGATE_SENTINEL_BASE_PORT)"
}

wait_alive() {
  local p=$1 end=$((SECONDS + 10))
  until alive "$p"; do
    [ $SECONDS -lt $end ] || { tail -n 20 "$DIR/$p/redis.log" >&2; die "$p did not answer PING within 10s"; }
    sleep 0.1
  done
}

# Starts the data node (kind "data") or Sentinel ("sentinel") on port p. Its config is written
# on the first start only: Sentinel rewrites both kinds (replicaof, the known primary), so a
# restarted node comes back as it was last told. The replica first follows DATA[0].
start_node() {
  local kind=$1 p=$2 d=$DIR/$2 conf
  ours_alive "$p" && return 0
  mkdir -p "$d"
  conf=$d/$kind.conf
  if [ ! -s "$conf" ]; then
    printf '%s\n' "bind $HOST" "port $p" "protected-mode no" "dir $d" "daemonize yes" \
      "pidfile $d/redis.pid" "logfile $d/redis.log" >"$conf"
    if [ "$kind" = data ]; then
      printf '%s\n' 'appendonly no' 'save ""' "replica-announce-ip $HOST" >>"$conf"
      [ "$p" = "${DATA[0]}" ] || echo "replicaof $HOST ${DATA[0]}" >>"$conf"
    else
      printf '%s\n' "sentinel announce-ip $HOST" "sentinel monitor $MASTER $HOST ${DATA[0]} 2" \
        "sentinel down-after-milliseconds $MASTER 1000" "sentinel failover-timeout $MASTER 5000" \
        "sentinel parallel-syncs $MASTER 1" >>"$conf"
    fi
  fi
  if [ "$kind" = data ]; then redis-server "$conf"; else redis-server "$conf" --sentinel; fi ||
    die "$kind node failed on port $p (see $d/redis.log)"
  wait_alive "$p"
}

stop_node() {
  local p=$1 d=$DIR/$1 pid=""
  pid=$(cat "$d/redis.pid" 2>/dev/null) || return 0   # not started by us: leave it alone
  pid_alive "$pid" || { rm -f "$d/redis.pid"; return 0; }
  rcli "$p" shutdown nosave >/dev/null || true
  local end=$((SECONDS + 10))
  while alive "$p" || { [ -n "$pid" ] && pid_alive "$pid"; }; do
    if [ $SECONDS -ge $end ]; then [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; sleep 0.2; break; fi
    sleep 0.1
  done
  rm -f "$d/redis.pid"
}

primary() { rcli "${1:-${SENTINELS[0]}}" sentinel get-master-addr-by-name "$MASTER" | paste -sd: -; }

# 0 when every Sentinel names the same primary, that node says master and has a synced replica
# the Sentinels know about.
healthy() {
  local s p first=""
  for s in "${SENTINELS[@]}"; do
    p=$(primary "$s") || return 1
    [ -n "$p" ] || return 1
    [ -z "$first" ] && first=$p
    [ "$p" = "$first" ] || return 1
    [ "$(rcli "$s" sentinel master "$MASTER" | awk 'NR % 2 == 1 {k=$0} NR % 2 == 0 && k == "num-other-sentinels" {print}')" = 2 ] || return 1
  done
  local port=${first##*:}
  rcli "$port" role | head -1 | grep -qx master || return 1
  rcli "$port" info replication | grep -qE '^slave0:.*state=online' || return 1
  [ "$(rcli "${SENTINELS[0]}" sentinel replicas "$MASTER" | grep -cx "$HOST:$(other "$port")")" = 1 ] || return 1
}

other() { if [ "$1" = "${DATA[0]}" ]; then echo "${DATA[1]}"; else echo "${DATA[0]}"; fi; }

wait_healthy() {
  local end=$((SECONDS + TIMEOUT))
  until healthy; do
    [ $SECONDS -lt $end ] || { cmd_status >&2 || true; die "Sentinel setup not healthy within ${TIMEOUT}s"; }
    sleep 0.2
  done
}

cmd_start() {
  local q any=0
  for q in "${DATA[@]}" "${SENTINELS[@]}"; do alive "$q" && ours_alive "$q" && any=1; done
  healthy && return 0
  # Nothing of ours running: start from scratch (configs left by a crashed run may hold a
  # half-done failover that Sentinel would have to untangle).
  [ $any = 1 ] || rm -rf "${DIR:?}"
  local p
  for p in "${DATA[@]}"; do start_node data "$p"; done
  for p in "${SENTINELS[@]}"; do start_node sentinel "$p"; done
  wait_healthy
}

cmd_stop() {
  local p pids=()
  for p in "${SENTINELS[@]}" "${DATA[@]}"; do stop_node "$p" & pids+=($!); done
  wait "${pids[@]}" || true
  rm -rf "${DIR:?}"
}

cmd_status() {
  local p
  for p in "${DATA[@]}"; do
    if alive "$p"; then printf '%s:%s %s\n' "$HOST" "$p" "$(rcli "$p" role | head -1)"; else printf '%s:%s down\n' "$HOST" "$p"; fi
  done
  for p in "${SENTINELS[@]}"; do
    if alive "$p"; then printf '%s:%s sentinel primary=%s\n' "$HOST" "$p" "$(primary "$p")"; else printf '%s:%s sentinel down\n' "$HOST" "$p"; fi
  done
  healthy
}

kill_node() {
  local p=$1 pid
  pid=$(cat "$DIR/$p/redis.pid" 2>/dev/null) || die "no pid file for $p"
  kill -9 "$pid" 2>/dev/null || true
  local end=$((SECONDS + 5))
  while pid_alive "$pid" && [ $SECONDS -lt $end ]; do sleep 0.05; done
  rm -f "$DIR/$p/redis.pid"
}

check_port() { [ "${1:-}" = "${DATA[0]}" ] || [ "${1:-}" = "${DATA[1]}" ] || die "port must be ${DATA[0]} or ${DATA[1]}"; }

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  wait) wait_healthy ;;
  sentinels) (IFS=,; echo "${SENTINELS[*]/#/$HOST:}") ;;
  master) echo "$MASTER" ;;
  primary) primary ;;
  replica) p=$(primary); echo "$HOST:$(other "${p##*:}")" ;;
  failover) [ "$(rcli "${SENTINELS[0]}" sentinel failover "$MASTER")" = OK ] || die "SENTINEL FAILOVER refused" ;;
  kill-node) check_port "${2:-}"; kill_node "$2" ;;
  start-node) check_port "${2:-}"; [ -s "$DIR/$2/data.conf" ] || die "no config for $2 (never started?)"; start_node data "$2" ;;
  *) echo "usage: $0 start|stop|status|wait|sentinels|master|primary|replica|failover|kill-node PORT|start-node PORT" >&2; exit 2 ;;
esac
