/* router.h: where a message goes.
 *
 * The router resolves the recipient's presence, groups their connections by
 * gateway, and for each gateway picks a path (route_policy.h) and a
 * transport (transport.h); when a recipient is offline it stores the message
 * in the inbox. It owns the presence store, the inbox, the transports, the
 * hot-pair tracker and the dedupe window.
 *
 * Thread-safety: every function may be called from any thread except the
 * WebSocket service thread (they block on presence, Kafka and peer I/O);
 * the WebSocket front end hands sends to a worker pool (common/mg_pool.h).
 */
#ifndef MG_ROUTER_H
#define MG_ROUTER_H

#include "router/inbox.h"
#include "router/msg.h"
#include "router/presence.h"
#include "router/transport.h"

#include <stdint.h>

typedef struct mg_router mg_router;

typedef struct mg_router_config {
    const char *gateway_id; /* copied */
    const char *region;     /* copied */
    int hot_window_seconds;
    int hot_threshold;
    size_t hot_capacity;
    size_t dedupe_window;
} mg_router_config;

/* Takes ownership of presence and inbox; sink (copied) is where local
 * deliveries go. All required. */
mg_router *mg_router_create(const mg_router_config *cfg, mg_presence *presence, mg_inbox *inbox,
                            const mg_local_sink *sink);
/* Installs the grpc or kafka transport (ownership passes; replaces and frees
 * a previous one). Call before traffic starts. */
void mg_router_set_transport(mg_router *r, mg_path path, mg_transport *t);
void mg_router_free(mg_router *r);

mg_presence *mg_router_presence(mg_router *r);
mg_inbox *mg_router_inbox(mg_router *r);

/* True when routing never blocks: presence and inbox are in memory and no
 * peer transport (gRPC, Kafka) is installed. The WebSocket thread then
 * routes its connections' sends itself instead of handing them to a worker
 * (no thread hop, same order guarantees). Constant once traffic starts. */
bool mg_router_nonblocking(mg_router *r);

/* Sends msg to msg->to: all of the recipient's connections, wherever they
 * are, or the inbox. deadline_ms is monotonic (mg_mono_ms). Returns 0 with
 * *res filled (its status says what happened), or -EINVAL for a message the
 * router cannot take (then res->reason says why). */
int mg_router_send(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_result *res);

/* One payload to n recipients; res[i] is recipient to[i]'s result. Presence
 * is looked up in one batch. */
int mg_router_send_batch(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                         int64_t deadline_ms, mg_send_result *res);

/* The receiving end of the peer path (and every local delivery): delivers
 * msg to this gateway's connections of msg->to, dropping a duplicate
 * (id, recipient) seen within the dedupe window. Returns the number of
 * connections written (0: not connected here, or a duplicate); *duplicate
 * tells whether it was one. */
int mg_router_deliver_local(mg_router *r, const mg_msg *msg, bool *duplicate);

/* Closes this gateway's connections of user (or one); returns how many. */
int mg_router_disconnect_local(mg_router *r, const char *user, const char *conn_id, int code,
                               const char *reason);

/* Kafka consumer entry: resolve presence afresh and deliver locally, by gRPC
 * or to the inbox, never by Kafka again. Returns 0 or a negative errno
 * (transient: the caller retries before committing the offset). */
int mg_router_deliver_from_queue(mg_router *r, const mg_msg *msg, mg_send_result *res);

/* Closes a user's connections (or one) on every gateway they are on.
 * Returns the number closed (>= 0) or a negative errno. */
int mg_router_disconnect(mg_router *r, const char *user, const char *conn_id, int code,
                         const char *reason);

/* A user connected here: record presence, then hand the inbox to the local
 * sink (as inbox messages, oldest first). Call from a worker thread. */
int mg_router_user_connected(mg_router *r, const char *user, const char *conn_id, int64_t now_ms);
int mg_router_user_disconnected(mg_router *r, const char *user, const char *conn_id);
int mg_router_inbox_ack(mg_router *r, const char *user, const char *msg_id);

#endif
