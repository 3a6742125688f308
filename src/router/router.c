/* router.c: where a message goes (see router.h).
 *
 * DESIGN
 * A send resolves the recipient's connections (presence), groups them by
 * gateway and, per gateway, asks the route policy for a path:
 *   local  -> the hub of this gateway (never blocks)
 *   grpc   -> GatewayPeer/DeliverMessage; on failure, Kafka; on NOT_CONNECTED
 *             presence is resolved once more
 *   kafka  -> the recipient region's topic (HIGH waits for acks=all)
 * and falls back to the offline inbox when no connection is left. The result
 * is the best outcome over the gateways (DELIVERED > QUEUED > ... see msg.h).
 *
 * Every write to a local connection goes through deliver_here(), which drops
 * an (id, recipient) already delivered within the dedupe window: a client's
 * retry, a gRPC retry or a Kafka redelivery never reaches a device twice.
 *
 * Threads: any caller thread but the WebSocket service thread. The router's
 * own state is immutable after setup except for the hot tracker and the
 * dedupe window, which lock internally.
 */
#include "router/router.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "router/dedupe.h"
#include "router/hot_routes.h"
#include "router/route_policy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INBOX_FETCH_MAX 1000

struct mg_router {
    char *gateway_id, *region;
    mg_presence *presence;
    mg_inbox *inbox;
    mg_local_sink sink;
    mg_transport *transports[MG_PATH_COUNT];
    mg_hot *hot;
    mg_dedupe *dedupe;
    mg_metric *outcomes[MG_PATH_COUNT][MG_STATUS_ACCEPTED + 1];
    mg_metric *latency[MG_PATH_COUNT];
    mg_metric *duplicates, *fallbacks, *presence_errors, *reresolves;
};

static double hot_pairs_gauge(void *arg)
{
    mg_router *r = arg;
    return (double)mg_hot_count(r->hot, mg_now_ms());
}

mg_router *mg_router_create(const mg_router_config *cfg, mg_presence *presence, mg_inbox *inbox,
                            const mg_local_sink *sink)
{
    mg_router *r = mg_new(mg_router);
    r->gateway_id = mg_xstrdup(cfg->gateway_id);
    r->region = mg_xstrdup(cfg->region);
    r->presence = presence;
    r->inbox = inbox;
    r->sink = *sink;
    r->transports[MG_PATH_LOCAL] = mg_transport_local_create(sink);
    r->hot = mg_hot_create(cfg->hot_window_seconds, cfg->hot_threshold, cfg->hot_capacity);
    r->dedupe = mg_dedupe_create(cfg->dedupe_window);
    for (int p = 0; p < MG_PATH_COUNT; p++) {
        for (int s = 1; s <= MG_STATUS_ACCEPTED; s++) {
            char labels[96];
            snprintf(labels, sizeof(labels), "path=\"%s\",status=\"%s\"", mg_path_name((mg_path)p),
                     mg_status_name((mg_status)s));
            r->outcomes[p][s] =
                mg_counter("meshgate_messages_total",
                           "Per-recipient send outcomes by path and status", labels);
        }
        char labels[48];
        snprintf(labels, sizeof(labels), "path=\"%s\"", mg_path_name((mg_path)p));
        r->latency[p] =
            mg_histogram("meshgate_route_seconds",
                         "Time to route one recipient, by the path of its outcome", labels);
    }
    r->duplicates = mg_counter("meshgate_duplicates_dropped_total",
                               "Deliveries dropped because the (id, recipient) was seen", NULL);
    r->fallbacks = mg_counter("meshgate_grpc_fallbacks_total",
                              "gRPC peer deliveries that failed over to Kafka", NULL);
    r->presence_errors =
        mg_counter("meshgate_presence_errors_total", "Presence store calls that failed", NULL);
    r->reresolves = mg_counter("meshgate_presence_reresolves_total",
                               "Second presence lookups after a peer said NOT_CONNECTED", NULL);
    mg_gauge_fn_register("meshgate_hot_pairs", "(from, to) pairs currently hot", NULL,
                         hot_pairs_gauge, r);
    return r;
}

void mg_router_set_transport(mg_router *r, mg_path path, mg_transport *t)
{
    if (path <= MG_PATH_LOCAL || path >= MG_PATH_COUNT)
        return;
    mg_transport_free(r->transports[path]);
    r->transports[path] = t;
}

void mg_router_free(mg_router *r)
{
    if (!r)
        return;
    mg_gauge_fn_register("meshgate_hot_pairs", "(from, to) pairs currently hot", NULL, NULL, NULL);
    for (int p = 0; p < MG_PATH_COUNT; p++)
        mg_transport_free(r->transports[p]);
    mg_presence_free(r->presence);
    mg_inbox_free(r->inbox);
    mg_hot_free(r->hot);
    mg_dedupe_free(r->dedupe);
    free(r->gateway_id);
    free(r->region);
    free(r);
}

bool mg_router_nonblocking(mg_router *r)
{
    return r->presence->ops->nonblocking && r->inbox->ops->nonblocking &&
           !r->transports[MG_PATH_GRPC] && !r->transports[MG_PATH_KAFKA];
}

mg_presence *mg_router_presence(mg_router *r)
{
    return r->presence;
}

mg_inbox *mg_router_inbox(mg_router *r)
{
    return r->inbox;
}

/* ---- local delivery ----------------------------------------------------- */

static int deliver_here(mg_router *r, const mg_msg *msg, bool *duplicate)
{
    size_t il = strlen(msg->id), tl = strlen(msg->to);
    char stackbuf[512], *key = il + tl + 2 <= sizeof(stackbuf) ? stackbuf : mg_xmalloc(il + tl + 2);
    memcpy(key, msg->id, il);
    key[il] = '\n';
    memcpy(key + il + 1, msg->to, tl + 1);
    int n = 0;
    *duplicate = mg_dedupe_check_and_add(r->dedupe, key);
    if (*duplicate) {
        mg_metric_add(r->duplicates, 1);
    } else {
        n = r->sink.deliver(r->sink.arg, msg, NULL, false);
        if (n <= 0)
            mg_dedupe_forget(r->dedupe, key); /* nobody got it: a retry must go through */
    }
    if (key != stackbuf)
        free(key);
    return n < 0 ? 0 : n;
}

int mg_router_deliver_local(mg_router *r, const mg_msg *msg, bool *duplicate)
{
    return deliver_here(r, msg, duplicate);
}

int mg_router_disconnect_local(mg_router *r, const char *user, const char *conn_id, int code,
                               const char *reason)
{
    return r->sink.disconnect(r->sink.arg, user, conn_id, code, reason);
}

/* ---- routing one recipient ---------------------------------------------- */

static bool usable(mg_router *r, mg_path path, const mg_route_target *t)
{
    mg_transport *tr = r->transports[path];
    return tr && (!tr->ops->available || tr->ops->available(tr, t));
}

static void record(mg_router *r, mg_send_result *res, mg_status st, mg_path path, uint32_t conns,
                   const char *reason)
{
    mg_result_merge(res, st, path, conns, reason);
    if (st >= 1 && st <= MG_STATUS_ACCEPTED)
        mg_metric_add(r->outcomes[path][st], 1);
}

/* Sends to the recipient's connections on one gateway. Returns true when the
 * gateway (a peer) said the recipient is not connected there after all. */
static bool route_gateway(mg_router *r, const mg_msg *msg, const mg_conn_ref *c, bool hot,
                          bool allow_kafka, int64_t deadline, mg_send_result *res)
{
    mg_route_target target = {c->gateway_id, c->region};
    mg_route_input in = {
        .self_gateway = r->gateway_id,
        .self_region = r->region,
        .target_gateway = c->gateway_id,
        .target_region = c->region,
        .hot = hot,
        .grpc_usable = usable(r, MG_PATH_GRPC, &target),
        .kafka_usable = allow_kafka && usable(r, MG_PATH_KAFKA, &target),
    };
    mg_path path = mg_route_decide(&in);
    mg_deliver_outcome out = {0};

    if (path == MG_PATH_LOCAL) {
        bool dup;
        int n = deliver_here(r, msg, &dup);
        if (n > 0 || dup)
            record(r, res, MG_STATUS_DELIVERED, MG_PATH_LOCAL, (uint32_t)n, NULL);
        return n == 0 && !dup;
    }
    if (path == MG_PATH_GRPC) {
        int rc = r->transports[MG_PATH_GRPC]->ops->deliver(r->transports[MG_PATH_GRPC], &target,
                                                           msg, deadline, &out);
        if (rc == 0 && out.status == MG_STATUS_DELIVERED) {
            record(r, res, MG_STATUS_DELIVERED, MG_PATH_GRPC, out.connections, NULL);
            return false;
        }
        if (rc == 0 && out.not_connected)
            return true;
        mg_log_warn("router", "grpc delivery failed peer=%s msg_id=%s reason=%s%s", c->gateway_id,
                    msg->id, rc ? strerror(-rc) : out.reason,
                    in.kafka_usable || (allow_kafka && r->transports[MG_PATH_KAFKA])
                        ? ", falling back to kafka"
                        : "");
        if (!(allow_kafka && r->transports[MG_PATH_KAFKA])) {
            record(r, res, MG_STATUS_FAILED, MG_PATH_GRPC, 0,
                   rc ? strerror(-rc) : (out.reason[0] ? out.reason : "peer delivery failed"));
            return false;
        }
        mg_metric_add(r->fallbacks, 1);
        path = MG_PATH_KAFKA;
        memset(&out, 0, sizeof(out));
    }
    if (path == MG_PATH_KAFKA) {
        int rc = r->transports[MG_PATH_KAFKA]->ops->deliver(r->transports[MG_PATH_KAFKA], &target,
                                                            msg, deadline, &out);
        if (rc == 0 && (out.status == MG_STATUS_QUEUED || out.status == MG_STATUS_ACCEPTED))
            record(r, res, out.status, MG_PATH_KAFKA, 0, NULL);
        else
            record(r, res, MG_STATUS_FAILED, MG_PATH_KAFKA, 0,
                   rc ? strerror(-rc) : (out.reason[0] ? out.reason : "kafka produce failed"));
        return false;
    }
    char reason[160];
    snprintf(reason, sizeof(reason), "no path to gateway %s in region %s", c->gateway_id,
             c->region);
    record(r, res, MG_STATUS_FAILED, MG_PATH_NONE, 0, reason);
    return false;
}

static void store_offline(mg_router *r, const mg_msg *msg, mg_send_result *res)
{
    int rc = r->inbox->ops->store(r->inbox, msg);
    if (rc == 0)
        record(r, res, MG_STATUS_STORED, MG_PATH_INBOX, 0, NULL);
    else
        record(r, res, MG_STATUS_FAILED, MG_PATH_INBOX, 0,
               rc == -ENOSPC ? "offline inbox full" : "offline inbox unavailable");
}

/* Routes to every gateway of conns; returns how many said NOT_CONNECTED. */
static size_t route_all(mg_router *r, const mg_msg *msg, const mg_presence_list *conns, bool hot,
                        bool allow_kafka, int64_t deadline, mg_send_result *res)
{
    size_t stale = 0;
    for (size_t i = 0; i < conns->n; i++) {
        bool seen = false; /* one delivery per gateway, not per connection */
        for (size_t j = 0; j < i && !seen; j++)
            seen = !strcmp(conns->items[j].gateway_id, conns->items[i].gateway_id);
        if (!seen && route_gateway(r, msg, &conns->items[i], hot, allow_kafka, deadline, res))
            stale++;
    }
    return stale;
}

static bool reached(const mg_send_result *res)
{
    return res->status == MG_STATUS_DELIVERED || res->status == MG_STATUS_QUEUED ||
           res->status == MG_STATUS_ACCEPTED;
}

/* The whole decision for one recipient whose presence is already in conns. */
static void route_one(mg_router *r, const mg_msg *msg, mg_presence_list *conns, int presence_rc,
                      bool allow_kafka, int64_t deadline, mg_send_result *res)
{
    int64_t start = mg_mono_us();
    memset(res, 0, sizeof(*res));
    if (mg_mono_ms() > deadline) {
        record(r, res, MG_STATUS_FAILED, MG_PATH_NONE, 0, "deadline exceeded");
        return;
    }
    if (presence_rc != 0) {
        /* Presence store down: this gateway's own connections still work. */
        mg_metric_add(r->presence_errors, 1);
        bool dup;
        int n = deliver_here(r, msg, &dup);
        if (n > 0 || dup)
            record(r, res, MG_STATUS_DELIVERED, MG_PATH_LOCAL, (uint32_t)n, NULL);
        else
            record(r, res, MG_STATUS_FAILED, MG_PATH_NONE, 0, "presence store unavailable");
        goto out;
    }
    bool hot = mg_hot_hit(r->hot, msg->from, msg->to, mg_now_ms());
    size_t stale = route_all(r, msg, conns, hot, allow_kafka, deadline, res);
    if (stale > 0 && !reached(res)) {
        /* Presence was stale: resolve once more, then inbox. */
        mg_metric_add(r->reresolves, 1);
        mg_presence_list again = {0};
        if (r->presence->ops->lookup(r->presence, msg->to, &again) == 0 && again.n > 0)
            route_all(r, msg, &again, hot, allow_kafka, deadline, res);
        mg_presence_list_clear(&again);
    }
    if (!reached(res) && res->status != MG_STATUS_FAILED)
        store_offline(r, msg, res);
out:
    mg_histogram_observe_us(r->latency[res->path], mg_mono_us() - start);
}

int mg_router_send(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_result *res)
{
    memset(res, 0, sizeof(*res));
    if (!msg->to[0] || !msg->id[0]) {
        record(r, res, MG_STATUS_REJECTED, MG_PATH_NONE, 0,
               !msg->to[0] ? "empty recipient" : "empty message id");
        return -EINVAL;
    }
    mg_presence_list conns = {0};
    int rc = r->presence->ops->lookup(r->presence, msg->to, &conns);
    route_one(r, msg, &conns, rc, true, deadline_ms, res);
    mg_presence_list_clear(&conns);
    return 0;
}

int mg_router_send_batch(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                         int64_t deadline_ms, mg_send_result *res)
{
    mg_presence_list *lists = mg_xcalloc(n, sizeof(*lists));
    int rc = r->presence->ops->lookup_batch(r->presence, to, n, lists);
    for (size_t i = 0; i < n; i++) {
        if (!to[i][0]) {
            memset(&res[i], 0, sizeof(res[i]));
            record(r, &res[i], MG_STATUS_REJECTED, MG_PATH_NONE, 0, "empty recipient");
            continue;
        }
        mg_msg one = *msg;
        one.to = (char *)to[i];
        route_one(r, &one, &lists[i], rc, true, deadline_ms, &res[i]);
    }
    for (size_t i = 0; i < n; i++)
        mg_presence_list_clear(&lists[i]);
    free(lists);
    return 0;
}

int mg_router_deliver_from_queue(mg_router *r, const mg_msg *msg, mg_send_result *res)
{
    mg_presence_list conns = {0};
    int rc = r->presence->ops->lookup(r->presence, msg->to, &conns);
    if (rc != 0) {
        mg_presence_list_clear(&conns);
        memset(res, 0, sizeof(*res));
        return rc; /* transient: the consumer retries before committing */
    }
    route_one(r, msg, &conns, 0, false, mg_mono_ms() + 5000, res);
    mg_presence_list_clear(&conns);
    return res->status == MG_STATUS_FAILED ? -EAGAIN : 0;
}

/* ---- connections and disconnects ---------------------------------------- */

int mg_router_disconnect(mg_router *r, const char *user, const char *conn_id, int code,
                         const char *reason)
{
    mg_presence_list conns = {0};
    int total = 0;
    if (r->presence->ops->lookup(r->presence, user, &conns) != 0) {
        mg_presence_list_clear(&conns);
        return mg_router_disconnect_local(r, user, conn_id, code, reason);
    }
    bool local_done = false;
    for (size_t i = 0; i < conns.n; i++) {
        const mg_conn_ref *c = &conns.items[i];
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = !strcmp(conns.items[j].gateway_id, c->gateway_id);
        if (seen || (conn_id && conn_id[0] && strcmp(conn_id, c->conn_id) != 0 &&
                     !strcmp(c->gateway_id, r->gateway_id)))
            continue;
        if (!strcmp(c->gateway_id, r->gateway_id)) {
            local_done = true;
            total += mg_router_disconnect_local(r, user, conn_id, code, reason);
            continue;
        }
        mg_transport *g = r->transports[MG_PATH_GRPC];
        mg_route_target t = {c->gateway_id, c->region};
        if (g && g->ops->disconnect) {
            int n = g->ops->disconnect(g, &t, user, conn_id, code, reason, mg_mono_ms() + 2000);
            if (n > 0)
                total += n;
        }
    }
    if (!local_done)
        total += mg_router_disconnect_local(r, user, conn_id, code, reason);
    mg_presence_list_clear(&conns);
    return total;
}

int mg_router_user_connected(mg_router *r, const char *user, const char *conn_id, int64_t now_ms)
{
    int rc = r->presence->ops->connect(r->presence, user, conn_id, now_ms);
    if (rc != 0) {
        mg_metric_add(r->presence_errors, 1);
        mg_log_warn("router", "presence connect failed user=%s conn=%s err=%s", user, conn_id,
                    strerror(-rc));
    }
    /* Presence first, inbox second: a message stored before this point is in
     * the fetch; one sent after it finds the connection. */
    mg_msg **items = NULL;
    size_t n = 0;
    int irc = r->inbox->ops->fetch(r->inbox, user, INBOX_FETCH_MAX, &items, &n);
    if (irc != 0)
        mg_log_warn("router", "inbox fetch failed user=%s conn=%s err=%s", user, conn_id,
                    strerror(-irc));
    for (size_t i = 0; i < n; i++)
        r->sink.deliver(r->sink.arg, items[i], conn_id, true);
    mg_inbox_items_free(items, n);
    return rc ? rc : irc;
}

int mg_router_user_disconnected(mg_router *r, const char *user, const char *conn_id)
{
    int rc = r->presence->ops->disconnect(r->presence, user, conn_id);
    return rc == -ENOENT ? 0 : rc;
}

int mg_router_inbox_ack(mg_router *r, const char *user, const char *msg_id)
{
    return r->inbox->ops->ack(r->inbox, user, msg_id);
}
