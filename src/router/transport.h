/* transport.h: how a message reaches the recipient's connections on one
 * gateway (the transport interface).
 *
 * The router picks a transport per recipient gateway (route_policy.h):
 *   local  - this gateway: the local sink (the WebSocket hub)
 *   grpc   - GatewayPeer/DeliverMessage straight to the peer (transport_grpc.c)
 *   kafka  - the topic of the recipient's region (transport_kafka.c)
 *
 * Every transport is asynchronous: deliver starts an attempt and returns;
 * its completion continues the router's operation (router.c).
 * Thread-safety: every op may be called from any thread concurrently.
 */
#ifndef MG_TRANSPORT_H
#define MG_TRANSPORT_H

#include "common/mg_trace.h"
#include "router/msg.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct mg_route_target {
    const char *gateway_id;
    const char *region;
} mg_route_target;

typedef struct mg_deliver_outcome {
    mg_status status;   /* DELIVERED, QUEUED, ACCEPTED or FAILED */
    bool not_connected; /* the gateway answered NOT_CONNECTED (presence was stale) */
    bool duplicate;     /* DELIVERED: the (id, recipient) was delivered before */
    uint32_t connections;
    char reason[128];
} mg_deliver_outcome;

/* The completion of one delivery attempt. out lives only for the call. */
typedef void (*mg_deliver_done)(void *arg, const mg_deliver_outcome *out);

typedef struct mg_transport mg_transport;

struct mg_transport_ops {
    const char *name;
    mg_path path;
    /* Whether the target can be tried now (peer known, link not degraded,
     * in-flight calls under the bound; broker configured). May be NULL:
     * always available. Must not block. */
    bool (*available)(mg_transport *t, const mg_route_target *target);
    /* Starts delivering msg (copied as needed: the caller may free msg and
     * target once this returns) and returns at once. Returns 0, and then
     * done(arg, out) runs exactly once, on any thread (a completion queue,
     * a delivery report, the WebSocket thread's write, or the caller's own
     * thread before deliver returns), at the latest shortly after
     * deadline_ms (monotonic, mg_mono_ms) or the transport's own bound; or a
     * negative errno when the transport could not even try, and then done
     * never runs. MG_DELIVER_UNORDERED is 0 but for the order: this one
     * delivery does not fix it, whatever orders_on_return says (a probe of a
     * degraded link). Must not block. */
    int (*deliver)(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                   int64_t deadline_ms, mg_deliver_done done, void *arg);
    /* Closes the user's connections (or one) on the target gateway; returns
     * how many were closed or a negative errno. May block up to the deadline
     * (called from worker jobs only). May be NULL (unsupported). */
    int (*disconnect)(mg_transport *t, const mg_route_target *target, const char *user,
                      const char *conn_id, int code, const char *reason, int64_t deadline_ms);
    void (*free)(mg_transport *t);
    /* One message to n recipients on the same target gateway (a batch's
     * share): out[i] answers to[i] as deliver would. done(arg, out, n) runs
     * exactly once, as deliver's done; same returns. to[] and msg are
     * copied as needed (msg->to is ignored). May be NULL: the router then
     * calls deliver per recipient. */
    int (*deliver_batch)(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                         const char *const *to, size_t n, int64_t deadline_ms,
                         void (*done)(void *arg, const mg_deliver_outcome *out, size_t n),
                         void *arg);
    /* Adds what this transport knows of target to a traced attempt's span
     * (not NULL), by OpenTelemetry's conventions: a bus's
     * messaging.destination.name (topic, subject, channel), a peer's
     * network.peer.address and network.peer.port. Must not block. May be
     * NULL: nothing to add. */
    void (*trace_attrs)(mg_transport *t, const mg_route_target *target, mg_span *span);
    /* Whether deliver() returning 0 fixes the message's order: a later
     * deliver of the same sender's message to the same target and recipient
     * on this transport cannot overtake it, whenever their completions run
     * (local: queued to every connection; kafka: produced into the
     * recipient's partition by the idempotent producer; nats: published on
     * the transport's one connection; redis-pubsub: queued for SPUBLISH on
     * the one connection to the channel's master; grpc: on the peer's lane or
     * queued behind it, transport_grpc.c). The router then tells a
     * sender that asked (mg_router_send_handed) that it may start the next
     * send before this one answered. grpc: with one call at a time per peer
     * (its lane); false with several calls in flight, which can reorder. */
    bool orders_on_return;
};

#define MG_DELIVER_UNORDERED 1 /* see deliver() */

struct mg_transport {
    const struct mg_transport_ops *ops;
};

static inline void mg_transport_free(mg_transport *t)
{
    if (t)
        t->ops->free(t);
}

/* How many of a delivery's connections got its frames (see mg_local_sink). */
typedef void (*mg_written_fn)(void *arg, uint32_t written);
/* The same for n recipients at once: written[i] for the i-th. */
typedef void (*mg_written_many_fn)(void *arg, const uint32_t *written, size_t n);

/* What the local transport writes to: the gateway's connection hub.
 * deliver() queues msg to every local connection of msg->to (or only to
 * conn_id when it is not NULL) and returns how many took it (0: none
 * connected here). When written is not NULL and the return is > 0,
 * written(written_arg, n) runs exactly once when the frames were written to
 * the sockets (or dropped with their connections, or the sink's write wait
 * ended): n counts the connections written, or still queued on a live
 * connection when the wait ended. It may run before deliver returns (on the
 * writing thread, or when the sink does not wait), else on the writing
 * thread. deliver never blocks; any thread may call it. from_inbox marks a
 * message the client must ack to remove from the inbox. */
typedef struct mg_local_sink {
    int (*deliver)(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                   mg_written_fn written, void *written_arg);
    /* Closes the user's local connections (or one, when conn_id is set);
     * returns how many were closed. */
    int (*disconnect)(void *arg, const char *user, const char *conn_id, int code,
                      const char *reason);
    void *arg;
    /* May be NULL. One message to n users (msg->to ignored), as n
     * deliver(..., conn_id NULL, from_inbox false, ...) calls would:
     * queued[i] (the caller's, n of them) gets how many connections of to[i]
     * took it, and the return is their sum. When written is not NULL and the
     * return is > 0, written(written_arg, counts, n) runs exactly once, as
     * deliver's written would for each, with counts[i] for to[i]. */
    int (*deliver_many)(void *arg, const mg_msg *msg, const char *const *to, size_t n,
                        uint32_t *queued, mg_written_many_fn written, void *written_arg);
} mg_local_sink;

/* The local transport: this gateway's own connections, through sink, past
 * the dedupe window of dedupe_window recent (message id, recipient) pairs: a
 * pair seen within it is answered DELIVERED with duplicate set and not
 * written again. A delivery that reached no connection forgets its pair, so
 * a retry goes through. An outcome with no connection reached has
 * not_connected set. */
mg_transport *mg_transport_local_create(const mg_local_sink *sink, size_t dedupe_window);

#endif
