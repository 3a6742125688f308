/* grpc_server.h: the gRPC front end (Messaging, GatewayPeer, grpc.health.v1).
 *
 * Serves meshgate.v1.Messaging (SendMessage, SendBatch, GetPresence,
 * Disconnect), meshgate.v1.GatewayPeer (DeliverMessage, DisconnectLocal) and
 * grpc.health.v1.Health/Check on gRPC C core, with cfg->threads completion
 * queue threads named "grpc-<i>". A HIGH send runs on the gRPC thread and
 * answers with the router's result; a LOW send is answered ACCEPTED at once
 * and runs on the worker pool (dropped with RESOURCE_EXHAUSTED when the pool
 * is full). Health/Watch answers UNIMPLEMENTED.
 *
 * Lifecycle: create -> start -> (set_serving false on drain) -> shutdown -> free.
 * Thread-safety: set_serving and port may be called from any thread; the
 * others from the owning (main) thread only.
 */
#ifndef MG_GRPC_SERVER_H
#define MG_GRPC_SERVER_H

#include "common/mg_pool.h"
#include "gateway/grpc_auth.h"
#include "router/router.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct mg_grpc_server mg_grpc_server;

typedef struct mg_grpc_server_config {
    const char *listen;       /* "host:port"; port 0 picks a free one (copied) */
    int threads;              /* completion-queue threads (>= 1) */
    int max_message_bytes;    /* largest request; above: RESOURCE_EXHAUSTED */
    size_t max_content_bytes; /* largest message.content */
    size_t max_user_bytes;    /* longest user id */
    size_t max_batch;         /* most recipients of SendBatch / users of GetPresence */
    const char *gateway_id;   /* copied */
    const char *region;       /* copied */
    const mg_grpc_auth *auth; /* borrowed, outlives the server; NULL: insecure, no checks */
    int max_deadline_ms;      /* a call's router deadline: the client's, at most this (> 0) */
    int low_deadline_ms;      /* a LOW send's router deadline (nobody waits for it) (> 0) */
} mg_grpc_server_config;

/* Creates the server (nothing is bound yet). router and pool are borrowed:
 * they must outlive the server (free the server first). Returns NULL with a
 * message in err on a bad config. */
mg_grpc_server *mg_grpc_server_create(const mg_grpc_server_config *cfg, mg_router *router,
                                      mg_pool *pool, char *err, size_t errlen);

/* Binds the listener and starts the threads. Returns 0, or -EADDRINUSE,
 * -EADDRNOTAVAIL, -EACCES, -EINVAL (bad address) or -EIO, with a message
 * naming the address and the reason in err. */
int mg_grpc_server_start(mg_grpc_server *s, char *err, size_t errlen);

/* The bound port (after a successful start), or -1. */
int mg_grpc_server_port(const mg_grpc_server *s);

/* Health status of "", "meshgate.v1.Messaging" and "meshgate.v1.GatewayPeer":
 * SERVING (true, the state after start) or NOT_SERVING (drain). */
void mg_grpc_server_set_serving(mg_grpc_server *s, bool serving);

/* Stops accepting calls, lets calls in flight finish for up to grace_ms,
 * cancels the rest, drains the queues and joins the threads. Idempotent. */
void mg_grpc_server_shutdown(mg_grpc_server *s, int grace_ms);

/* Shuts down (grace 0) when still running, then frees. NULL is a no-op. */
void mg_grpc_server_free(mg_grpc_server *s);

#endif
