/* ws_server.h: the WebSocket front end (libwebsockets) and the HTTP endpoints
 * on the same listener.
 *
 *   GET /ws        upgrade; JWT (Authorization: Bearer or ?token=) or, only
 *                  without auth configured and on loopback, ?user=NAME.
 *                  400 malformed upgrade (ws_limits.h: mg_ws_upgrade_strict, one
 *                  ?user= without control characters), 401 missing/bad/expired
 *                  token, 429 too many from the address, 503 draining/full, 404
 *                  other paths.
 *   GET /healthz   200 while the process runs
 *   GET /readyz    200 while ready (set_ready(true) and not draining), else 503
 *   GET /metrics   Prometheus text (common/mg_metrics.h)
 *   hooks          extra GET endpoints (mg_ws_server_set_http_hook)
 *
 * Protocol: ws_proto.h. Close codes: 1002 invalid close frame from the
 * client, 1003 binary frame, 1008 the 20th bad frame in a row or the 20th
 * refused by the send rate within a second, 1009 frame over
 * --max-frame-bytes, 1012 drain (service restart), 1013 overloaded at
 * connect, 4008 slow consumer; 1000/other from Disconnect.
 *
 * Threads: --ws-threads service loops ("ws-<i>"), each an lws context on its
 * own libev loop, thread and SO_REUSEPORT listener (Debian's lws is built
 * with LWS_MAX_SMP 1: no lws service threads). A loop owns the connections
 * it accepted, from accept to close (hub shard i), and answers any HTTP
 * request it accepted. Client sends are parsed there and started as router
 * operations (mg_router_send); acks and deliveries come back through the
 * hub (hub.h), which wakes the owning loop. Presence changes
 * (mg_router_user_connected/disconnected) and inbox acks run on the pool.
 *
 * Lifecycle (main.c): create -> sink (for the local transport) -> router
 * created -> set_router -> set_http_hook* -> start -> set_ready(true) ...
 * SIGTERM: drain -> stop -> mg_pool_free -> mg_router_free -> mg_ws_server_free.
 * All of these are called from one control thread (main).
 */
#ifndef MG_WS_SERVER_H
#define MG_WS_SERVER_H

#include "common/mg_pool.h"
#include "gateway/config.h"
#include "router/router.h"
#include "router/transport.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct mg_ws_server mg_ws_server;

/* Reads the options it needs from cfg (copied; cfg may go after this).
 * pool must outlive the server's stop. Returns NULL with a message in err
 * when the JWT key cannot be loaded, the listen address is malformed, or no
 * auth is configured on a non-loopback address. */
mg_ws_server *mg_ws_server_create(const mg_config *cfg, mg_pool *pool, char *err, size_t errlen);

/* The local sink (hub) for mg_transport_local_create; valid until free. */
mg_local_sink mg_ws_server_sink(mg_ws_server *ws);

/* Set before start. The router must stay alive until mg_pool_free has run
 * every pending job (see the lifecycle above). */
void mg_ws_server_set_router(mg_ws_server *ws, mg_router *r);

/* Adds GET path (exact match, copied): render(arg, &content_type) returns a
 * malloc'd body (freed by the server) and sets *content_type to a static
 * string (NULL: application/json); a NULL body answers 500. render runs on
 * the WebSocket thread, so it must not block. Set before start. */
void mg_ws_server_set_http_hook(mg_ws_server *ws, const char *path,
                                char *(*render)(void *arg, const char **content_type), void *arg);

/* Binds cfg->ws_listen (once per loop) and starts the service loops. Returns 0 or a
 * negative errno (the reason is logged). */
int mg_ws_server_start(mg_ws_server *ws);
/* The bound port (after start; useful with port 0). */
int mg_ws_server_port(mg_ws_server *ws);

void mg_ws_server_set_ready(mg_ws_server *ws, bool ready);

/* Readiness false, refuses new upgrades (503), closes every client with 1012
 * spread over `seconds`; returns when all are closed or the window ended. */
void mg_ws_server_drain(mg_ws_server *ws, int seconds);

/* Stops the service loops and closes remaining connections (their
 * user_disconnected jobs go to the pool). Idempotent. */
void mg_ws_server_stop(mg_ws_server *ws);
/* Stops if needed and frees. NULL is a no-op. */
void mg_ws_server_free(mg_ws_server *ws);

/* --ws-threads 0: the CPUs this process may use (sched_getaffinity), capped
 * by the cgroup v2 cpu.max quota rounded up; within 1..64. */
unsigned mg_ws_default_threads(void);

/* Connections currently registered. Any thread. */
size_t mg_ws_server_connections(mg_ws_server *ws);

#endif
