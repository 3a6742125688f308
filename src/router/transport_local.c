/* transport_local.c: delivery to this gateway's own connections.
 *
 * A thin adapter from the transport interface to the local sink (the
 * WebSocket hub). Never blocks: the hub only queues frames.
 */
#include "router/transport.h"
#include "common/mg_alloc.h"

#include <stdlib.h>

typedef struct transport_local {
    mg_transport base;
    mg_local_sink sink;
} transport_local;

static int tl_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                      int64_t deadline_ms, mg_deliver_outcome *out)
{
    transport_local *tl = (transport_local *)t;
    int n = tl->sink.deliver(tl->sink.arg, msg, NULL, false);
    out->connections = n > 0 ? (uint32_t)n : 0;
    out->not_connected = n <= 0;
    out->status = n > 0 ? MG_STATUS_DELIVERED : MG_STATUS_FAILED;
    return 0;
}

static int tl_disconnect(mg_transport *t, const mg_route_target *target, const char *user,
                         const char *conn_id, int code, const char *reason, int64_t deadline_ms)
{
    transport_local *tl = (transport_local *)t;
    return tl->sink.disconnect(tl->sink.arg, user, conn_id, code, reason);
}

static void tl_free(mg_transport *t)
{
    free(t);
}

static const struct mg_transport_ops local_ops = {
    .name = "local",
    .path = MG_PATH_LOCAL,
    .deliver = tl_deliver,
    .disconnect = tl_disconnect,
    .free = tl_free,
};

mg_transport *mg_transport_local_create(const mg_local_sink *sink)
{
    transport_local *tl = mg_new(transport_local);
    tl->base.ops = &local_ops;
    tl->sink = *sink;
    return &tl->base;
}
