#!/usr/bin/env bash
# One real Apache Kafka 3.9 broker in KRaft mode (combined broker+controller) on loopback.
# Jars come from Maven Central via tests/infra/kafka/pom.xml and are cached.
# Usage: tests/infra/kafka.sh fetch|start|stop|status|restart-broker|topics|create-topic NAME [PARTITIONS]
#   MESHGATE_CACHE (default ~/.cache/meshgate): jars in $MESHGATE_CACHE/kafka-<ver>/libs
#   MESHGATE_RUN   (default /tmp/meshgate-run): config, data, pid, log in $MESHGATE_RUN/kafka
#   MESHGATE_KAFKA_PORT (19092), MESHGATE_KAFKA_CONTROLLER_PORT (19093), MESHGATE_KAFKA_TIMEOUT (60s)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MESHGATE_CACHE:-$HOME/.cache/meshgate}
RUN=${MESHGATE_RUN:-/tmp/meshgate-run}
DIR=$RUN/kafka
PORT=${MESHGATE_KAFKA_PORT:-19092}
CPORT=${MESHGATE_KAFKA_CONTROLLER_PORT:-19093}
TIMEOUT=${MESHGATE_KAFKA_TIMEOUT:-60}
HOST=127.0.0.1
POM=$HERE/kafka/pom.xml
VER=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
LIBS=$CACHE/kafka-$VER/libs
PIDF=$DIR/kafka.pid
LOG=$DIR/kafka.log

# true if PID exists and is not a zombie (containers may reap orphans late)
pid_alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
die() { echo "kafka: $*" >&2; exit 1; }
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
command -v "$JAVA" >/dev/null || die "java not found (run tests/infra/install-deps.sh)"

cmd_fetch() {
  [ -f "$LIBS/.complete" ] && return 0
  command -v mvn >/dev/null || die "mvn not found (run tests/infra/install-deps.sh)"
  local tmp=$LIBS.tmp.$$ log
  log=$(mktemp)
  rm -rf "$tmp"
  if ! timeout 900 mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" >"$log" 2>&1; then
    tail -n 40 "$log" >&2; rm -rf "$tmp" "$log"; die "maven fetch of kafka $VER failed"
  fi
  rm -f "$log"
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka_2.13 jar missing after fetch"
  touch "$tmp/.complete"
  rm -rf "$LIBS"; mkdir -p "$(dirname "$LIBS")"; mv "$tmp" "$LIBS"
}

# Short-lived tool JVMs (StorageTool, TopicCommand): quiet logging, fast startup.
kjava() { "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j.configuration="file:$DIR/tools-log4j.properties" -cp "$LIBS/*" "$@"; }

running_pid() {
  local pid
  [ -f "$PIDF" ] || return 1
  pid=$(cat "$PIDF" 2>/dev/null) || return 1
  [ -n "$pid" ] && pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }


answers() { port_open "$PORT" && timeout 20 "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 \
  -Dlog4j.configuration="file:$DIR/tools-log4j.properties" -cp "$LIBS/*" \
  org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$PORT" --list >/dev/null 2>&1; }

write_config() {
  mkdir -p "$DIR/data"
  cat >"$DIR/server.properties" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CPORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CPORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DIR/data
auto.create.topics.enable=true
num.partitions=3
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=1000000
CONF
  cat >"$DIR/log4j.properties" <<CONF
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
CONF
  cat >"$DIR/tools-log4j.properties" <<CONF
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
CONF
}

launch() {   # start the JVM on an existing, formatted data dir and wait until it serves metadata
  port_open "$PORT" && die "port $PORT already in use by something else"
  : >"$LOG"
  nohup "$JAVA" -Xms256m -Xmx512m -XX:+UseG1GC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$DIR/log4j.properties" -Dkafka.logs.dir="$DIR" \
    -cp "$LIBS/*" kafka.Kafka "$DIR/server.properties" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDF"
  local pid=$! end=$((SECONDS + TIMEOUT))
  # Cheap checks first (no extra JVM competing for CPU), then one real metadata request.
  until port_open "$PORT" && grep -q 'Kafka Server started' "$LOG" 2>/dev/null && answers; do
    pid_alive "$pid" || { tail -n 30 "$LOG" >&2; die "broker exited during startup (log: $LOG)"; }
    [ $SECONDS -lt $end ] || { tail -n 30 "$LOG" >&2; die "broker not ready within ${TIMEOUT}s (log: $LOG)"; }
    sleep 0.5
  done
}

kill_broker() {  # SIGTERM (controlled shutdown), SIGKILL after 30s
  local pid
  pid=$(running_pid) || { rm -f "$PIDF"; return 0; }
  kill "$pid" 2>/dev/null || true
  local end=$((SECONDS + 30))
  while pid_alive "$pid"; do
    [ $SECONDS -lt $end ] || { kill -9 "$pid" 2>/dev/null || true; sleep 0.5; break; }
    sleep 0.2
  done
  rm -f "$PIDF"
}

cmd_start() {
  running_pid >/dev/null && answers && return 0
  cmd_fetch
  kill_broker
  rm -rf "$DIR"; write_config
  local id out
  id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
  out=$(kjava kafka.tools.StorageTool format --cluster-id="$id" --config "$DIR/server.properties" --ignore-formatted 2>&1) \
    || { echo "$out" >&2; die "storage format failed"; }
  launch
}

cmd_restart() {
  [ -f "$DIR/server.properties" ] || die "broker was never started (run: $0 start)"
  [ -f "$DIR/tools-log4j.properties" ] || write_config
  kill_broker
  launch
}

cmd_stop() { kill_broker; rm -rf "$DIR"; }

cmd_status() {
  local pid
  pid=$(running_pid) || { echo "kafka: not running"; return 1; }
  answers || { echo "kafka: pid $pid, not answering on $HOST:$PORT"; return 1; }
  echo "kafka $VER: pid $pid, $HOST:$PORT ok"
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart-broker) cmd_restart ;;
  topics) kjava org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$PORT" --list ;;
  create-topic) [ -n "${2:-}" ] || die "usage: $0 create-topic NAME [PARTITIONS]"
    kjava org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$PORT" --create --if-not-exists \
      --topic "$2" --partitions "${3:-3}" --replication-factor 1 >/dev/null ;;
  *) echo "usage: $0 fetch|start|stop|status|restart-broker|topics|create-topic NAME [PARTITIONS]" >&2; exit 2 ;;
esac
