/* config.h: the one table of configuration.
 *
 * Every option has a name (the flag is --name), an environment variable, a
 * default, a unit and help text, all in MG_CONFIG_OPTIONS below. `--help`,
 * `--help-markdown` (the README table) and the parser all read this table, so
 * they cannot disagree. Precedence: default < environment < flag.
 *
 * Types: STR (string, "" = unset), INT (integer in the stated unit),
 * BOOL (true/false/1/0/yes/no), RATIO (a decimal number from 0 to 1).
 */
#ifndef MG_CONFIG_H
#define MG_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* X(type, field, flag, env, default, unit, help) */
#define MG_CONFIG_OPTIONS(X)                                                                       \
    X(STR, id, "id", "MESHGATE_ID", "", "",                                                        \
      "gateway id, unique in the mesh (default: the host name)")                                   \
    X(STR, region, "region", "MESHGATE_REGION", "local", "", "region this gateway serves")         \
    X(STR, ws_listen, "ws-listen", "MESHGATE_WS_LISTEN", "127.0.0.1:8080", "host:port",            \
      "WebSocket (/ws) and HTTP (/healthz /readyz /metrics) listener")                             \
    X(STR, grpc_listen, "grpc-listen", "MESHGATE_GRPC_LISTEN", "127.0.0.1:50051", "host:port",     \
      "gRPC listener (Messaging, GatewayPeer, grpc.health.v1.Health)")                             \
    X(STR, advertise_addr, "advertise-addr", "MESHGATE_ADVERTISE_ADDR", "", "host",                \
      "address peers dial, registered in Consul (default: the gRPC listen host)")                  \
    X(INT, ws_threads, "ws-threads", "MESHGATE_WS_THREADS", "0", "threads",                        \
      "WebSocket service loops, each its own SO_REUSEPORT listener and thread owning the "         \
      "connections it accepted; 0: the CPUs this process may use (affinity mask, capped by "       \
      "the cgroup v2 cpu.max quota, rounded up)")                                                  \
    X(INT, grpc_threads, "grpc-threads", "MESHGATE_GRPC_THREADS", "4", "threads",                  \
      "gRPC completion-queue polling threads")                                                     \
    X(INT, workers, "workers", "MESHGATE_WORKERS", "4", "threads",                                 \
      "store pool threads: blocking Redis presence and inbox calls run here")                      \
    X(INT, work_queue, "work-queue", "MESHGATE_WORK_QUEUE", "65536", "jobs",                       \
      "store jobs waiting before new ones are refused (overloaded)")                               \
    X(INT, max_inflight_sends, "max-inflight-sends", "MESHGATE_MAX_INFLIGHT_SENDS", "200000",      \
      "recipients",                                                                                \
      "recipients being routed at once before sends are refused (RESOURCE_EXHAUSTED)")             \
    X(INT, max_content_bytes, "max-content-bytes", "MESHGATE_MAX_CONTENT_BYTES", "65536", "bytes", \
      "largest message content accepted")                                                          \
    X(INT, max_frame_bytes, "max-frame-bytes", "MESHGATE_MAX_FRAME_BYTES", "131072", "bytes",      \
      "largest WebSocket frame accepted from a client; larger closes with 1009")                   \
    X(INT, grpc_max_message_bytes, "grpc-max-message-bytes", "MESHGATE_GRPC_MAX_MESSAGE_BYTES",    \
      "4194304", "bytes", "largest gRPC request accepted (RESOURCE_EXHAUSTED above)")              \
    X(INT, grpc_max_deadline_ms, "grpc-max-deadline-ms", "MESHGATE_GRPC_MAX_DEADLINE_MS", "30000", \
      "ms",                                                                                        \
      "a gRPC send is routed within the caller's deadline, at most this long (also when "          \
      "the caller set none)")                                                                      \
    X(INT, max_user_bytes, "max-user-bytes", "MESHGATE_MAX_USER_BYTES", "256", "bytes",            \
      "longest user id accepted")                                                                  \
    X(INT, max_batch, "max-batch", "MESHGATE_MAX_BATCH", "100000", "recipients",                   \
      "most recipients in one SendBatch")                                                          \
    X(INT, outbound_queue, "outbound-queue", "MESHGATE_OUTBOUND_QUEUE", "256", "frames",           \
      "frames queued per connection before it is closed as a slow consumer (4008)")                \
    X(INT, outbound_queue_bytes, "outbound-queue-bytes", "MESHGATE_OUTBOUND_QUEUE_BYTES",          \
      "1048576", "bytes", "bytes queued per connection before it is closed as a slow consumer")    \
    X(INT, delivery_write_wait_ms, "delivery-write-wait-ms", "MESHGATE_DELIVERY_WRITE_WAIT_MS",    \
      "1000", "ms",                                                                                \
      "a delivery is answered when its frame reached the socket, or after this long (0: at once)") \
    X(INT, ping_seconds, "ping-seconds", "MESHGATE_PING_SECONDS", "30", "s",                       \
      "WebSocket ping interval; a connection silent for 2 intervals is closed")                    \
    X(INT, max_connections, "max-connections", "MESHGATE_MAX_CONNECTIONS", "1000000", "conns",     \
      "WebSocket connections accepted before new ones are refused (503)")                          \
    X(INT, fd_reserve, "fd-reserve", "MESHGATE_FD_RESERVE", "256", "fds",                          \
      "descriptors kept for Redis, Kafka, peers and logs: --max-connections is capped at "         \
      "RLIMIT_NOFILE minus this and the handshake room (logged at start)")                         \
    X(INT, max_connections_per_ip, "max-connections-per-ip", "MESHGATE_MAX_CONNECTIONS_PER_IP",    \
      "0", "conns",                                                                                \
      "WebSocket connections per client address before new ones are refused (429); "               \
      "0: no limit (behind a NAT or L4 proxy every client shares an address)")                     \
    X(INT, ws_handshake_timeout_ms, "ws-handshake-timeout-ms", "MESHGATE_WS_HANDSHAKE_TIMEOUT_MS", \
      "10000", "ms",                                                                               \
      "a connection that has not sent its whole HTTP request or upgrade by then "                  \
      "is closed (slowloris)")                                                                     \
    X(INT, ws_max_handshakes, "ws-max-handshakes", "MESHGATE_WS_MAX_HANDSHAKES", "1024", "conns",  \
      "connections still sending their request at once; beyond it the oldest is closed")           \
    X(INT, ws_max_header_bytes, "ws-max-header-bytes", "MESHGATE_WS_MAX_HEADER_BYTES", "4096",     \
      "bytes",                                                                                     \
      "HTTP request line and headers kept per request (lws header buffer, at most 65535)")         \
    X(INT, ws_send_rate, "ws-send-rate", "MESHGATE_WS_SEND_RATE", "0", "frames/s",                 \
      "client frames per second per connection (token bucket); over it: error rate_limited, "      \
      "20 refused within a second close with 1008; 0: no limit")                                   \
    X(INT, ws_send_burst, "ws-send-burst", "MESHGATE_WS_SEND_BURST", "0", "frames",                \
      "token bucket size of --ws-send-rate (0: one second's worth)")                               \
    X(STR, jwt_secret, "jwt-secret", "MESHGATE_JWT_SECRET", "", "",                                \
      "HS256 secret for client JWTs")                                                              \
    X(STR, jwt_public_key_file, "jwt-public-key-file", "MESHGATE_JWT_PUBLIC_KEY_FILE", "", "path", \
      "RS256 public key (PEM) for client JWTs")                                                    \
    X(STR, jwt_audience, "jwt-audience", "MESHGATE_JWT_AUDIENCE", "", "",                          \
      "client JWTs must name this in \"aud\" (off when empty)")                                    \
    X(STR, jwt_issuer, "jwt-issuer", "MESHGATE_JWT_ISSUER", "", "",                                \
      "client JWTs must carry this \"iss\" (off when empty)")                                      \
    X(STR, jwks_url, "jwks-url", "MESHGATE_JWKS_URL", "", "URL",                                   \
      "JWKS document (http/https) whose RS256 keys verify client JWTs, picked by the token's "     \
      "\"kid\"; instead of --jwt-secret / --jwt-public-key-file")                                  \
    X(INT, jwks_refresh_seconds, "jwks-refresh-seconds", "MESHGATE_JWKS_REFRESH_SECONDS", "300",   \
      "s", "--jwks-url is fetched again this often")                                               \
    X(INT, jwks_min_refetch_seconds, "jwks-min-refetch-seconds",                                   \
      "MESHGATE_JWKS_MIN_REFETCH_SECONDS", "30", "s",                                              \
      "a token with an unknown kid fetches --jwks-url early, at most once per this long "          \
      "(the token is refused meanwhile)")                                                          \
    X(STR, grpc_tls_cert, "grpc-tls-cert", "MESHGATE_GRPC_TLS_CERT", "", "path",                   \
      "TLS certificate chain (PEM) of the gRPC listener, also this gateway's client certificate "  \
      "on peer calls")                                                                             \
    X(STR, grpc_tls_key, "grpc-tls-key", "MESHGATE_GRPC_TLS_KEY", "", "path",                      \
      "private key (PEM) of --grpc-tls-cert")                                                      \
    X(STR, grpc_client_ca, "grpc-client-ca", "MESHGATE_GRPC_CLIENT_CA", "", "path",                \
      "CA (PEM): the gRPC listener requires a client certificate it signed (mTLS); peer calls "    \
      "verify peers against it")                                                                   \
    X(STR, grpc_peer_identity, "grpc-peer-identity", "MESHGATE_GRPC_PEER_IDENTITY", "", "prefix",  \
      "a verified client certificate whose CN or a SAN starts with this is a peer (GatewayPeer); " \
      "other verified certificates are services (Messaging)")                                      \
    X(STR, api_token_file, "api-token-file", "MESHGATE_API_TOKEN_FILE", "", "path",                \
      "bearer tokens of services calling Messaging, one name:token per line")                      \
    X(STR, peer_token_file, "peer-token-file", "MESHGATE_PEER_TOKEN_FILE", "", "path",             \
      "bearer tokens of peers calling GatewayPeer, one name:token per line; the first is sent on " \
      "this gateway's peer calls")                                                                 \
    X(BOOL, grpc_mesh_mtls, "grpc-mesh-mtls", "MESHGATE_GRPC_MESH_MTLS", "false", "",              \
      "a mesh sidecar (Istio STRICT mTLS) authenticates gRPC callers: lets the gRPC listener off " \
      "loopback run without the credentials above")                                                \
    X(INT, drain_seconds, "drain-seconds", "MESHGATE_DRAIN_SECONDS", "10", "s",                    \
      "on SIGTERM, close clients (1012) spread over this window")                                  \
    X(STR, log_level, "log-level", "MESHGATE_LOG_LEVEL", "info", "", "debug, info, warn or error") \
    X(STR, log_format, "log-format", "MESHGATE_LOG_FORMAT", "text", "", "text or json")            \
    X(STR, presence, "presence", "MESHGATE_PRESENCE", "memory", "",                                \
      "presence and inbox store: memory (single gateway), redis-cluster, or redis-sentinel (one "  \
      "primary found through Sentinel)")                                                           \
    X(STR, redis_nodes, "redis-nodes", "MESHGATE_REDIS_NODES", "", "host:port,...",                \
      "Redis Cluster seed nodes")                                                                  \
    X(STR, sentinel_nodes, "sentinel-nodes", "MESHGATE_SENTINEL_NODES", "", "host:port,...",       \
      "Redis Sentinels (--presence redis-sentinel), asked in turn for the primary")                \
    X(STR, sentinel_master, "sentinel-master", "MESHGATE_SENTINEL_MASTER", "mymaster", "",         \
      "master name the Sentinels monitor (--presence redis-sentinel)")                             \
    X(STR, redis_user, "redis-user", "MESHGATE_REDIS_USER", "", "", "Redis ACL user")              \
    X(STR, redis_password, "redis-password", "MESHGATE_REDIS_PASSWORD", "", "",                    \
      "Redis password (AUTH)")                                                                     \
    X(INT, redis_timeout_ms, "redis-timeout-ms", "MESHGATE_REDIS_TIMEOUT_MS", "1000", "ms",        \
      "timeout of every Redis call")                                                               \
    X(INT, presence_lease_seconds, "presence-lease-seconds", "MESHGATE_PRESENCE_LEASE_SECONDS",    \
      "30", "s", "a crashed gateway's users vanish from presence within this lease")               \
    X(INT, presence_cache_users, "presence-cache-users", "MESHGATE_PRESENCE_CACHE_USERS",          \
      "100000", "users",                                                                           \
      "Redis presence: users whose connections are kept in-process between sends, kept right by "  \
      "Redis client-side caching (tracking); 0: every send reads Redis (not with "                 \
      "--presence-sync)")                                                                          \
    X(BOOL, presence_sync, "presence-sync", "MESHGATE_PRESENCE_SYNC", "false", "",                 \
      "multi-region: --redis-nodes is this region's own cluster; presence changes are replicated " \
      "to the other regions through Kafka (needs --kafka-brokers)")                                \
    X(STR, presence_sync_topic, "presence-sync-topic", "MESHGATE_PRESENCE_SYNC_TOPIC",             \
      "meshgate.presence", "topic", "log-compacted topic of the presence replication")             \
    X(INT, inbox_max_messages, "inbox-max-messages", "MESHGATE_INBOX_MAX_MESSAGES", "1000",        \
      "messages", "offline inbox cap per user; the oldest are dropped beyond it")                  \
    X(INT, inbox_max_age_seconds, "inbox-max-age-seconds", "MESHGATE_INBOX_MAX_AGE_SECONDS",       \
      "604800", "s", "offline messages older than this are dropped")                               \
    X(INT, inbox_memory_bytes, "inbox-memory-bytes", "MESHGATE_INBOX_MEMORY_BYTES", "268435456",   \
      "bytes",                                                                                     \
      "memory inbox (--presence memory): bytes of messages held in all; beyond it stores fail "    \
      "(FAILED \"offline inbox full\")")                                                           \
    X(INT, inbox_memory_users, "inbox-memory-users", "MESHGATE_INBOX_MEMORY_USERS", "1000000",     \
      "users", "memory inbox: users with messages held; beyond it stores fail the same way")       \
    X(INT, inbox_min_replicas, "inbox-min-replicas", "MESHGATE_INBOX_MIN_REPLICAS", "0",           \
      "replicas",                                                                                  \
      "Redis inbox: a write is STORED only after this many replicas acknowledged it (WAIT, "       \
      "within --redis-timeout-ms); fewer: FAILED")                                                 \
    X(STR, discovery, "discovery", "MESHGATE_DISCOVERY", "none", "",                               \
      "peer discovery: none or consul")                                                            \
    X(STR, consul_addr, "consul-addr", "CONSUL_HTTP_ADDR", "127.0.0.1:8500", "host:port or URL",   \
      "Consul HTTP API")                                                                           \
    X(STR, consul_token, "consul-token", "CONSUL_HTTP_TOKEN", "", "", "Consul ACL token")          \
    X(STR, consul_service, "consul-service", "MESHGATE_CONSUL_SERVICE", "meshgate", "",            \
      "service name registered and watched")                                                       \
    X(STR, consul_tags, "consul-tags", "MESHGATE_CONSUL_TAGS", "", "tag,...", "service tags")      \
    X(INT, consul_check_interval_seconds, "consul-check-interval-seconds",                         \
      "MESHGATE_CONSUL_CHECK_INTERVAL_SECONDS", "2", "s", "Consul health check interval")          \
    X(INT, consul_deregister_seconds, "consul-deregister-seconds",                                 \
      "MESHGATE_CONSUL_DEREGISTER_SECONDS", "60", "s",                                             \
      "Consul removes a gateway critical for this long")                                           \
    X(STR, peer_authority, "peer-authority", "MESHGATE_PEER_AUTHORITY", "", "host:port",           \
      ":authority sent on peer calls (the headless peer Service name under Istio)")                \
    X(INT, peer_deadline_ms, "peer-deadline-ms", "MESHGATE_PEER_DEADLINE_MS", "500", "ms",         \
      "deadline of a DeliverMessage call; past it the message goes by Kafka")                      \
    X(INT, peer_max_inflight, "peer-max-inflight", "MESHGATE_PEER_MAX_INFLIGHT", "1024", "calls",  \
      "DeliverMessage calls in flight per peer; beyond it messages go by Kafka")                   \
    X(INT, peer_coalesce_calls, "peer-coalesce-calls", "MESHGATE_PEER_COALESCE_CALLS", "1",        \
      "calls",                                                                                     \
      "DeliverMessage calls in flight to one peer before the next deliveries wait and go "         \
      "together in one DeliverMany (1: one call at a time, which keeps a sender's order and "      \
      "lets its next send start at once; 0: never)")                                               \
    X(INT, peer_cq_threads, "peer-cq-threads", "MESHGATE_PEER_CQ_THREADS", "1", "threads",         \
      "threads draining the peer completion queue")                                                \
    X(INT, peer_degrade_error_pct, "peer-degrade-error-pct", "MESHGATE_PEER_DEGRADE_ERROR_PCT",    \
      "50", "%", "peer error average above which its link is degraded (routed around via Kafka)")  \
    X(INT, peer_degrade_latency_ms, "peer-degrade-latency-ms", "MESHGATE_PEER_DEGRADE_LATENCY_MS", \
      "200", "ms", "peer latency average above which its link is degraded")                        \
    X(INT, peer_degrade_min_calls, "peer-degrade-min-calls", "MESHGATE_PEER_DEGRADE_MIN_CALLS",    \
      "10", "calls", "calls needed before a peer can be degraded")                                 \
    X(INT, peer_probe_interval_ms, "peer-probe-interval-ms", "MESHGATE_PEER_PROBE_INTERVAL_MS",    \
      "2000", "ms", "one probe call per interval while a peer is degraded")                        \
    X(BOOL, redis_pubsub, "redis-pubsub", "MESHGATE_REDIS_PUBSUB", "false", "",                    \
      "the Redis Pub/Sub bus (path redis-pubsub): subscribe to this gateway's channel "            \
      "meshgate:gw:{id} on the Redis Cluster of --redis-nodes, or the Sentinel primary of "        \
      "--presence redis-sentinel (SSUBSCRIBE), and publish to peers'")                             \
    X(INT, redis_pubsub_timeout_ms, "redis-pubsub-timeout-ms", "MESHGATE_REDIS_PUBSUB_TIMEOUT_MS", \
      "500", "ms",                                                                                 \
      "how long a HIGH send over redis-pubsub waits for the target gateway's receipt (then the "   \
      "route list's next step)")                                                                   \
    X(INT, redis_pubsub_max_bytes, "redis-pubsub-max-bytes", "MESHGATE_REDIS_PUBSUB_MAX_BYTES",    \
      "1048576", "bytes",                                                                          \
      "largest redis-pubsub payload sent or accepted (larger: skipped, counted)")                  \
    X(STR, near_route, "near-route", "MESHGATE_NEAR_ROUTE", "grpc,kafka", "path,...",              \
      "paths tried in order to a gateway of this region (grpc, kafka, redis-pubsub, nats; inbox "  \
      "last: store when none delivered); a path not configured or not usable is skipped")          \
    X(STR, far_route, "far-route", "MESHGATE_FAR_ROUTE", "kafka,grpc", "path,...",                 \
      "paths tried in order to a gateway of another region; a hot pair tries grpc first")          \
    X(STR, kafka_brokers, "kafka-brokers", "MESHGATE_KAFKA_BROKERS", "", "host:port,...",          \
      "Kafka bootstrap servers (empty: no Kafka path)")                                            \
    X(STR, kafka_topic_prefix, "kafka-topic-prefix", "MESHGATE_KAFKA_TOPIC_PREFIX",                \
      "meshgate.deliver.", "", "topic of region R is <prefix>R")                                   \
    X(INT, kafka_partitions, "kafka-partitions", "MESHGATE_KAFKA_PARTITIONS", "6", "partitions",   \
      "partitions of topics meshgate creates")                                                     \
    X(INT, kafka_linger_ms, "kafka-linger-ms", "MESHGATE_KAFKA_LINGER_MS", "1", "ms",              \
      "producer linger (batching delay)")                                                          \
    X(INT, kafka_batch_bytes, "kafka-batch-bytes", "MESHGATE_KAFKA_BATCH_BYTES", "262144",         \
      "bytes", "producer batch size")                                                              \
    X(INT, kafka_timeout_ms, "kafka-timeout-ms", "MESHGATE_KAFKA_TIMEOUT_MS", "5000", "ms",        \
      "how long a HIGH send waits for the broker's acknowledgement")                               \
    X(INT, kafka_queue_max_messages, "kafka-queue-max-messages",                                   \
      "MESHGATE_KAFKA_QUEUE_MAX_MESSAGES", "100000", "messages",                                   \
      "producer queue bound; LOW messages are dropped beyond it")                                  \
    X(INT, kafka_retry_budget_ms, "kafka-retry-budget-ms", "MESHGATE_KAFKA_RETRY_BUDGET_MS",       \
      "30000", "ms", "consumer retries one record this long, then puts it in the inbox")           \
    X(STR, nats_url, "nats-url", "MESHGATE_NATS_URL", "", "nats://host:port,...",                  \
      "NATS servers with JetStream, comma-separated (empty: no NATS path); "                       \
      "unreachable at start: the gateway exits naming them")                                       \
    X(INT, nats_replicas, "nats-replicas", "MESHGATE_NATS_REPLICAS", "1", "replicas",              \
      "replicas of the region's stream this gateway creates (3 on a 3-node cluster)")              \
    X(INT, nats_max_age_seconds, "nats-max-age-seconds", "MESHGATE_NATS_MAX_AGE_SECONDS", "86400", \
      "s", "messages older than this leave the region's stream unhandled")                         \
    X(INT, nats_timeout_ms, "nats-timeout-ms", "MESHGATE_NATS_TIMEOUT_MS", "5000", "ms",           \
      "how long a HIGH send waits for the stream's PubAck, then the next step")                    \
    X(INT, nats_ack_wait_ms, "nats-ack-wait-ms", "MESHGATE_NATS_ACK_WAIT_MS", "30000", "ms",       \
      "a consumed message not acknowledged this long is redelivered (to any gateway of "           \
      "the region)")                                                                               \
    X(INT, nats_max_deliver, "nats-max-deliver", "MESHGATE_NATS_MAX_DELIVER", "5", "deliveries",   \
      "deliveries of one stream message whose handling fails; the last puts it in the inbox")      \
    X(INT, nats_max_pending, "nats-max-pending", "MESHGATE_NATS_MAX_PENDING", "65536", "messages", \
      "publishes awaiting their PubAck; beyond it a send fails at once (LOW dropped)")             \
    X(INT, hot_window_seconds, "hot-window-seconds", "MESHGATE_HOT_WINDOW_SECONDS", "10", "s",     \
      "sliding window of hot-pair rates")                                                          \
    X(INT, hot_threshold, "hot-threshold", "MESHGATE_HOT_THRESHOLD", "20", "messages",             \
      "messages of a (from, to) pair within the window that make it hot")                          \
    X(INT, hot_capacity, "hot-capacity", "MESHGATE_HOT_CAPACITY", "4096", "pairs",                 \
      "pairs tracked (bounded memory)")                                                            \
    X(INT, dedupe_window, "dedupe-window", "MESHGATE_DEDUPE_WINDOW", "65536", "ids",               \
      "recent message ids remembered to drop duplicates")                                          \
    X(STR, otlp_endpoint, "otlp-endpoint", "MESHGATE_OTLP_ENDPOINT", "", "http://host:port",       \
      "OpenTelemetry collector for traces, OTLP/HTTP JSON to <endpoint>/v1/traces (empty: "        \
      "spans are not recorded; trace context still propagates)")                                   \
    X(RATIO, trace_sample_ratio, "trace-sample-ratio", "MESHGATE_TRACE_SAMPLE_RATIO", "0.01",      \
      "0..1",                                                                                      \
      "share of sends without a traceparent that start a trace, with --otlp-endpoint (0: none; "   \
      "a caller's traceparent is always continued)")                                               \
    X(INT, trace_max_spans, "trace-max-spans", "MESHGATE_TRACE_MAX_SPANS", "8192", "spans",        \
      "spans recorded and not yet exported; beyond it spans are dropped and counted")

enum mg_config_type { MG_CFG_STR, MG_CFG_INT, MG_CFG_BOOL, MG_CFG_RATIO };

typedef struct mg_config {
#define MG_CFG_FIELD_STR(f)                        char *f;
#define MG_CFG_FIELD_INT(f)                        int64_t f;
#define MG_CFG_FIELD_BOOL(f)                       bool f;
#define MG_CFG_FIELD_RATIO(f)                      double f;
#define X(type, field, flag, env, def, unit, help) MG_CFG_FIELD_##type(field)
    MG_CONFIG_OPTIONS(X)
#undef X
} mg_config;

/* Fills cfg from defaults, the environment and argv (argv[0] skipped).
 * Returns 0; 1 when --help/--help-markdown/--version was printed to out (the
 * caller exits 0); -EINVAL on a bad option, with a message in err (size errlen).
 * The caller owns cfg and frees it with mg_config_clear. */
int mg_config_load(mg_config *cfg, int argc, char **argv, FILE *out, char *err, size_t errlen);
/* Checks values that depend on each other. Returns 0 or -EINVAL with err. */
int mg_config_validate(const mg_config *cfg, char *err, size_t errlen);
void mg_config_clear(mg_config *cfg);
void mg_config_print_help(FILE *out, int markdown);

/* The deadline of a send nobody waits for (a WebSocket send, a LOW gRPC
 * send): long enough for a peer attempt and its Kafka fallback,
 * --peer-deadline-ms + the longer of --kafka-timeout-ms and --nats-timeout-ms + 1 s. */
int64_t mg_config_send_deadline_ms(const mg_config *cfg);

/* Splits "host:port" into host (caller frees) and port. -EINVAL when malformed. */
int mg_parse_hostport(const char *s, char **host, int *port);
/* Whether host (as mg_parse_hostport gives it) is loopback: localhost,
 * 127.0.0.0/8 or ::1. "" (every address) is not. */
bool mg_host_is_loopback(const char *host);

#endif
