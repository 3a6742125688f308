/* mg_test.h: what integration tests share: the real services' addresses,
 * free loopback ports, and real gateway processes.
 *
 * Services are started by tests/infra/services.sh, which writes
 * ${MESHGATE_RUN:-/tmp/meshgate-run}/services.env; mg_test_env() reads the
 * process environment first, then that file. Gateways are the real
 * build/meshgate binary (of the same build, so sanitizer builds test
 * sanitized gateways), with logs in ${MESHGATE_RUN}/logs/<name>.log.
 */
#ifndef MG_TEST_H
#define MG_TEST_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* The value of a service variable (MESHGATE_TEST_REDIS_NODES, _KAFKA,
 * _CONSUL, ...), or NULL. The string lives until exit. */
const char *mg_test_env(const char *name);
/* Same, but fails the current test with a clear message when missing. */
const char *mg_test_require_env(const char *name);

/* A TCP port on 127.0.0.1 that was free a moment ago. */
int mg_test_free_port(void);

typedef struct mg_gw {
    pid_t pid;
    int ws_port, grpc_port;
    char name[64];
    char log_path[512];
    char ws_addr[64], grpc_addr[64]; /* "127.0.0.1:port" */
    int exit_status;                 /* after mg_gw_stop/wait: exit code, or 128+signal */
    bool exited;
} mg_gw;

/* Starts build/meshgate with --id name, free --ws-listen/--grpc-listen ports,
 * --drain-seconds 1, then the NULL-terminated extra args (which may override
 * any of these), and waits up to 20 s for GET /readyz to answer 200.
 * Returns NULL (after logging the gateway's log tail) when it does not. */
mg_gw *mg_gw_spawn(const char *name, const char *const *extra_args);
/* As mg_gw_spawn, as one gateway of a fleet on the shared services: Redis
 * Cluster presence (MESHGATE_TEST_REDIS_NODES), Consul discovery
 * (MESHGATE_TEST_CONSUL) under service svc, a 1 s check interval, region
 * (NULL: the gateway's default), then extra_args (NULL-terminated, may be
 * NULL). The gateway takes the last of a repeated flag, so extra_args may
 * override any of these (another cluster's --redis-nodes, Consul's default
 * check interval). Gateways see each other only under the same svc: a
 * per-test name keeps tests apart. The strings need live only for the call. */
mg_gw *mg_gw_spawn_fleet(const char *name, const char *svc, const char *region,
                         const char *const *extra_args);
/* mg_gw_spawn_fleet with the Kafka bus as well: --kafka-brokers
 * (MESHGATE_TEST_KAFKA) and --kafka-topic-prefix topic_prefix (per test, so
 * that no test reads another's topics), before extra_args. A NULL
 * topic_prefix is mg_gw_spawn_fleet: no Kafka. */
mg_gw *mg_gw_spawn_fleet_kafka(const char *name, const char *svc, const char *region,
                               const char *topic_prefix, const char *const *extra_args);
/* Like mg_gw_spawn but does not wait for readiness (for start-up failures). */
mg_gw *mg_gw_spawn_nowait(const char *name, const char *const *extra_args);
void mg_gw_kill(mg_gw *gw, int sig);
/* Waits up to timeout_ms for exit; returns true when it exited. */
bool mg_gw_wait(mg_gw *gw, int timeout_ms);
/* SIGTERM and wait (up to 30 s, then SIGKILL); returns the exit status
 * (0 for a clean exit; sanitizer builds exit non-zero on leaks). */
int mg_gw_stop(mg_gw *gw);
/* Stops it if running and frees. NULL is a no-op. */
void mg_gw_free(mg_gw *gw);
/* Whether the gateway's log contains needle. */
bool mg_gw_log_contains(const mg_gw *gw, const char *needle);

/* The value of the /metrics sample "name{labels} " (or "name ", with the
 * space) of gw, or 0 when absent or unreachable. */
double mg_gw_metric(const mg_gw *gw, const char *name_labels);

/* A plain HTTP/1.0 GET on 127.0.0.1:port. Returns the status code (or -1)
 * and, when body is not NULL, the body (caller frees). */
int mg_http_get(int port, const char *path, char **body);

/* Polls cond(arg) every 20 ms until true or timeout_ms; returns the result. */
bool mg_wait_until(bool (*cond)(void *arg), void *arg, int timeout_ms);
/* Waits up to timeout_ms until gw's GET /peers lists peer_id (Consul
 * discovery has made the peer path). Returns whether it did. */
bool mg_gw_wait_peer(const mg_gw *gw, const char *peer_id, int timeout_ms);
/* How many peers gw's GET /peers counts, or -1 when it does not answer. */
int mg_gw_peer_count(const mg_gw *gw);
/* Waits up to timeout_ms until each of the n gateways gws counts n - 1
 * peers (discovery has shown them to each other). Returns whether it did. */
bool mg_gw_wait_mesh(mg_gw *const *gws, int n, int timeout_ms);
/* Whether gw's GET /peers lists peer_id with exactly these buses (its
 * Consul meta, "grpc,kafka"). */
bool mg_gw_peer_has_buses(const mg_gw *gw, const char *peer_id, const char *buses);

#endif
