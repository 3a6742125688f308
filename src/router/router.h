/* router.h: where a message goes.
 *
 * The router resolves the recipient's presence, groups their connections by
 * gateway, and for each gateway walks the route policy's plan (an ordered
 * list of transports, route_policy.h); when a recipient is offline it
 * stores the message in the inbox. It owns the presence store, the inbox,
 * the transports and the hot-pair tracker.
 *
 * A send is an operation continued by completions: mg_router_send returns
 * at once, and the operation moves through lookup -> plan -> each transport
 * -> fallback / re-resolve -> inbox -> done, each step started by the
 * completion of the one before. Steps that may block (a Redis presence
 * lookup, an inbox write) run as jobs on the store pool; every other step
 * runs on the thread whose completion started it. No thread waits for a
 * message.
 *
 * Thread-safety: every function may be called from any thread, the
 * WebSocket service thread included, unless it says otherwise.
 */
#ifndef MG_ROUTER_H
#define MG_ROUTER_H

#include "store/inbox.h"
#include "router/msg.h"
#include "router/route_policy.h"
#include "store/presence.h"
#include "router/transport.h"
#include "common/mg_pool.h"

#include <stdint.h>

typedef struct mg_router mg_router;

typedef struct mg_router_config {
    const char *gateway_id; /* copied */
    const char *region;     /* copied */
    int hot_window_seconds;
    int hot_threshold;
    size_t hot_capacity;
    size_t dedupe_window;
    /* Recipients being routed at once (a batch counts each); beyond it a
     * send is refused with -EAGAIN. 0: unbounded. */
    size_t max_inflight;
    /* The near and far route lists (route_policy.h; copied). NULL: the
     * defaults, today's grpc,kafka / kafka,grpc. */
    const mg_route_lists *routes;
    /* Inbox messages a connecting user is sent before acking any: the rest
     * follow as acks come (keep it under the connection's queue). 0: 100. */
    size_t inbox_page;
} mg_router_config;

/* Takes ownership of presence and inbox; sink (copied) is where local
 * deliveries go; store_pool runs the steps that block on a store (presence
 * lookups, inbox writes) and must outlive the router's operations (it is
 * not owned; NULL only when presence and inbox never block). */
mg_router *mg_router_create(const mg_router_config *cfg, mg_presence *presence, mg_inbox *inbox,
                            const mg_local_sink *sink, mg_pool *store_pool);
/* Installs the transport of a peer path: grpc, kafka, redis-pubsub, nats
 * (ownership passes; replaces and frees a previous one). A route list step
 * whose path has no transport is skipped. Call before traffic starts. */
void mg_router_set_transport(mg_router *r, mg_path path, mg_transport *t);
/* Whether a transport is installed for path (local and inbox always are). */
bool mg_router_has_path(mg_router *r, mg_path path);
/* Waits (polling, up to timeout_ms) until no operation is in flight: for
 * shutdown, after the ingresses stopped and before the store pool goes.
 * Returns the number still in flight. */
size_t mg_router_drain(mg_router *r, int timeout_ms);
/* Frees the router; operations must be over (mg_router_drain). */
void mg_router_free(mg_router *r);

mg_presence *mg_router_presence(mg_router *r);
mg_inbox *mg_router_inbox(mg_router *r);

/* True when presence and inbox are in memory: an operation then never
 * leaves the calling thread until it waits for a transport or a write. */
bool mg_router_nonblocking(mg_router *r);

/* The answer to one send; res lives only for the call. */
typedef void (*mg_send_done)(void *arg, const mg_send_result *res);
/* The answer to a batch: res[i] is recipient i's result. */
typedef void (*mg_batch_done)(void *arg, const mg_send_result *res, size_t n);

/* Sends msg (copied) to msg->to: all of the recipient's connections,
 * wherever they are, or the inbox. deadline_ms is monotonic (mg_mono_ms).
 * Returns 0, and then done(arg, res) runs exactly once, on any thread,
 * possibly before mg_router_send returns: res->status says what happened
 * (REJECTED with a reason for a message the router cannot take). Returns
 * -EAGAIN when max_inflight recipients are already being routed, and then
 * done never runs. */
int mg_router_send(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_done done,
                   void *arg);
/* The moment a send's order is fixed (see mg_router_send_handed). */
typedef void (*mg_send_handed)(void *arg);

/* As mg_router_send, plus handed(arg), which runs exactly once and before
 * done(arg, res), on any thread, possibly before this returns: as soon as
 * the message's order is fixed, i.e. every recipient gateway of the first
 * resolution was handed to a transport that fixes order on return
 * (transport.h, orders_on_return) or already answered DELIVERED, QUEUED or
 * ACCEPTED; otherwise (a gRPC attempt, a fallback, the inbox, a re-resolve)
 * just before done. A sender that starts its next send from handed keeps
 * its order on every path that fixes it (DESIGN.md, "Order"). Returns as
 * mg_router_send; on -EAGAIN neither callback runs. */
int mg_router_send_handed(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_done done,
                          mg_send_handed handed, void *arg);
/* As mg_router_send_handed, but msg is taken as by mg_router_send_msg. */
int mg_router_send_msg_handed(mg_router *r, mg_msg *msg, int64_t deadline_ms, mg_send_done done,
                              mg_send_handed handed, void *arg);
/* As mg_router_send, but msg (from mg_msg_new or a dup, recipient msg->to)
 * is taken instead of copied: the router frees it, whatever the return. For
 * a front end that made the message for this send only. */
int mg_router_send_msg(mg_router *r, mg_msg *msg, int64_t deadline_ms, mg_send_done done,
                       void *arg);

/* One payload to n recipients (to[] copied); presence is looked up in one
 * batch and every recipient is routed in parallel; done(arg, res, n) runs
 * once, when the last recipient's result is in. Returns 0 or -EAGAIN as
 * mg_router_send (the batch counts n recipients). */
int mg_router_send_batch(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                         int64_t deadline_ms, mg_batch_done done, void *arg);

/* The receiving end of the peer path: delivers msg to this gateway's
 * connections of msg->to through the local transport (its dedupe window
 * drops a duplicate (id, recipient)); done(arg, out) as in transport.h:
 * DELIVERED (duplicate set for one), or not_connected. Returns 0 or a
 * negative errno (then done never runs). */
int mg_router_deliver_local(mg_router *r, const mg_msg *msg, mg_deliver_done done, void *arg);
/* The same for one message to n users (msg->to ignored): done(arg, out, n)
 * runs once, out[i] answering to[i] (the local transport's deliver_batch:
 * one hub call). Returns 0 or a negative errno (then done never runs). */
int mg_router_deliver_local_many(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                                 void (*done)(void *arg, const mg_deliver_outcome *out, size_t n),
                                 void *arg);

/* Closes this gateway's connections of user (or one); returns how many. */
int mg_router_disconnect_local(mg_router *r, const char *user, const char *conn_id, int code,
                               const char *reason);

/* Queue consumer entry (Kafka, NATS): resolve presence afresh and deliver
 * locally, by a direct path or to the inbox, never by a queue path again
 * (mg_path_is_queue). As mg_router_send; a result of
 * FAILED (presence store down included) is transient: the consumer retries
 * before committing the offset. */
int mg_router_deliver_from_queue(mg_router *r, const mg_msg *msg, int64_t deadline_ms,
                                 mg_send_done done, void *arg);

/* A queue consumer's fetched messages at once: as n calls of
 * mg_router_deliver_from_queue (done(args[i], res) answers msgs[i], copied),
 * but their presence lookups join the store pool's queue together, so the
 * lot goes out in one pipelined round trip and one hand-off instead of one
 * per message. A message beyond max_inflight is answered FAILED ("router
 * overloaded": transient, the consumer retries it) and the others go on. */
void mg_router_deliver_from_queue_many(mg_router *r, mg_msg *const *msgs, size_t n,
                                       int64_t deadline_ms, mg_send_done done, void *const *args);

/* Closes a user's connections (or one) on every gateway they are on.
 * Returns the number closed (>= 0) or a negative errno. Blocks on presence
 * and peers: call from a worker job. */
int mg_router_disconnect(mg_router *r, const char *user, const char *conn_id, int code,
                         const char *reason);

/* A user connected here: record presence, then hand the inbox to the local
 * sink (as inbox messages, oldest first), one page (inbox_page) at a time.
 * These three block on the stores: call them from a worker job, one
 * connection's calls in order. */
int mg_router_user_connected(mg_router *r, const char *user, const char *conn_id, int64_t now_ms);
int mg_router_user_disconnected(mg_router *r, const char *user, const char *conn_id);
/* The client of conn_id (NULL: not known) acked msg_id: removed from the
 * inbox, and when that connection is still being fed a long inbox, the next
 * page goes out once half of the last one is acked. */
int mg_router_inbox_ack(mg_router *r, const char *user, const char *conn_id, const char *msg_id);

/* Multi-region (presence_sync.h): the user connected in another region, so
 * this region's inbox of theirs moves there. Sends the messages (up to
 * 1,000) one after another, oldest first, through the normal route (the view
 * now names their gateways there), and acks each here once it was delivered
 * or queued; stops at the first that is not (the rest stays here). Returns
 * the number of messages it started with, or a negative errno. Blocks on the
 * inbox fetch: call from a thread that may (the presence sync consumer). */
int mg_router_handover_inbox(mg_router *r, const char *user);

#endif
