/* transport.h: how a message reaches the recipient's connections on one
 * gateway (the transport interface).
 *
 * The router picks a transport per recipient gateway (route_policy.h):
 *   local  - this gateway: the local sink (the WebSocket hub)
 *   grpc   - GatewayPeer/DeliverMessage straight to the peer (transport_grpc.c)
 *   kafka  - the topic of the recipient's region (transport_kafka.c)
 *
 * Thread-safety: deliver may be called from any router worker concurrently;
 * it may block up to the deadline, never on the WebSocket service thread.
 */
#ifndef MG_TRANSPORT_H
#define MG_TRANSPORT_H

#include "router/msg.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct mg_route_target {
    const char *gateway_id;
    const char *region;
} mg_route_target;

typedef struct mg_deliver_outcome {
    mg_status status;   /* DELIVERED, QUEUED, ACCEPTED or FAILED */
    bool not_connected; /* the peer answered NOT_CONNECTED (presence was stale) */
    uint32_t connections;
    char reason[128];
} mg_deliver_outcome;

typedef struct mg_transport mg_transport;

struct mg_transport_ops {
    const char *name;
    mg_path path;
    /* Whether the target can be tried now (peer known, link not degraded,
     * in-flight calls under the bound; broker configured). May be NULL:
     * always available. Must not block. */
    bool (*available)(mg_transport *t, const mg_route_target *target);
    /* Returns 0 with *out filled (its status says what happened), or a
     * negative errno when the transport could not even try. deadline is
     * monotonic milliseconds (mg_mono_ms). */
    int (*deliver)(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                   int64_t deadline_ms, mg_deliver_outcome *out);
    /* Closes the user's connections (or one) on the target gateway; returns
     * how many were closed or a negative errno. May be NULL (unsupported). */
    int (*disconnect)(mg_transport *t, const mg_route_target *target, const char *user,
                      const char *conn_id, int code, const char *reason, int64_t deadline_ms);
    void (*free)(mg_transport *t);
};

struct mg_transport {
    const struct mg_transport_ops *ops;
};

static inline void mg_transport_free(mg_transport *t)
{
    if (t)
        t->ops->free(t);
}

/* What the local transport writes to: the gateway's connection hub.
 * deliver() writes msg to every local connection of msg->to (or only to
 * conn_id when it is not NULL) and returns how many took it (0: none
 * connected here). It must not block; it is called from router workers, gRPC
 * threads and the Kafka consumer. from_inbox marks a message the client must
 * ack to remove from the inbox. */
typedef struct mg_local_sink {
    int (*deliver)(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox);
    /* Closes the user's local connections (or one, when conn_id is set);
     * returns how many were closed. */
    int (*disconnect)(void *arg, const char *user, const char *conn_id, int code,
                      const char *reason);
    void *arg;
} mg_local_sink;

mg_transport *mg_transport_local_create(const mg_local_sink *sink);

#endif
