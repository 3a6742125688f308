/* transport_local.c: delivery to this gateway's own connections.
 *
 * Every write to a local connection passes through here, whatever brought
 * the message (a local send, a peer's DeliverMessage, a Kafka record): the
 * dedupe window drops an (id, recipient) pair already delivered, so a
 * client's retry, a gRPC retry or a Kafka redelivery never reaches a device
 * twice. The sink (the WebSocket hub) only queues frames and reports their
 * writes later, so nothing here blocks; the attempt completes from the
 * sink's write report (on the WebSocket thread) or, when nothing waits for
 * a write, on the caller's thread. A traced message's writes are spanned
 * by the sink (the hub: one "ws write" span per connection).
 */
#include "router/transport.h"
#include "common/mg_alloc.h"
#include "common/mg_metrics.h"
#include "router/dedupe.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct transport_local {
    mg_transport base;
    mg_local_sink sink;
    mg_dedupe *dedupe;
    mg_metric *duplicates;
} transport_local;

/* One local attempt waiting for the sink's write report. */
typedef struct local_attempt {
    transport_local *tl;
    mg_deliver_done done;
    void *arg;
    char key[]; /* "<id>\n<recipient>", the dedupe pair */
} local_attempt;

/* Writes the dedupe pair "<id>\n<recipient>" (il: strlen(id)) at k;
 * returns the byte after its NUL. */
static char *pair_put(char *k, const char *id, size_t il, const char *to)
{
    size_t ul = strlen(to);
    memcpy(k, id, il);
    k[il] = '\n';
    memcpy(k + il + 1, to, ul + 1);
    return k + il + ul + 2;
}

static void finish(transport_local *tl, const char *key, uint32_t written, mg_deliver_done done,
                   void *arg)
{
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    if (written > 0) {
        out.status = MG_STATUS_DELIVERED;
        out.connections = written;
    } else {
        mg_dedupe_forget(tl->dedupe, key); /* nobody got it: a retry must go through */
        out.status = MG_STATUS_FAILED;
        out.not_connected = true;
    }
    done(arg, &out);
}

static void on_written(void *arg, uint32_t written)
{
    local_attempt *a = arg;
    finish(a->tl, a->key, written, a->done, a->arg);
    free(a);
}

static int tl_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                      int64_t deadline_ms, mg_deliver_done done, void *arg)
{
    (void)target;
    (void)deadline_ms;
    transport_local *tl = (transport_local *)t;
    if (!msg->id[0] || !msg->to[0])
        return -EINVAL;
    size_t il = strlen(msg->id);
    local_attempt *a = mg_xmalloc(sizeof(*a) + il + strlen(msg->to) + 2);
    a->tl = tl;
    a->done = done;
    a->arg = arg;
    pair_put(a->key, msg->id, il, msg->to);
    if (mg_dedupe_check_and_add(tl->dedupe, a->key)) {
        mg_metric_add(tl->duplicates, 1);
        free(a);
        mg_deliver_outcome out;
        memset(&out, 0, sizeof(out));
        out.status = MG_STATUS_DELIVERED;
        out.duplicate = true;
        done(arg, &out);
        return 0;
    }
    int n = tl->sink.deliver(tl->sink.arg, msg, NULL, msg->inbox, on_written, a);
    if (n <= 0) { /* the report never comes when nothing was queued */
        finish(tl, a->key, 0, done, arg);
        free(a);
    }
    return 0;
}

/* A batch's share waiting for the sink's write report: recipient map[j]
 * went to the sink as its j-th. */
typedef struct local_batch {
    transport_local *tl;
    void (*done)(void *arg, const mg_deliver_outcome *out, size_t n);
    void *arg;
    size_t n, m;
    mg_deliver_outcome *out; /* n; the duplicates' filled in */
    char **keys;             /* n dedupe pairs */
    size_t *map;             /* m */
    const char **sub;        /* m recipients for the sink */
    uint32_t *queued;        /* m */
    /* a sink without deliver_many: one deliver per recipient, counted */
    atomic_size_t left;
    struct one_slot {
        struct local_batch *b;
        size_t j;
    } * slots; /* m */
} local_batch;

static void batch_free(local_batch *b)
{
    free(b->out);
    free(b->keys); /* one block with the pairs */
    free(b->map);
    free(b->sub);
    free(b->queued);
    free(b->slots);
    free(b);
}

static void batch_written(void *arg, const uint32_t *written, size_t m)
{
    local_batch *b = arg;
    for (size_t j = 0; j < m && j < b->m; j++) {
        mg_deliver_outcome *o = &b->out[b->map[j]];
        if (written && written[j] > 0) {
            o->status = MG_STATUS_DELIVERED;
            o->connections = written[j];
        } else {
            mg_dedupe_forget(b->tl->dedupe, b->keys[b->map[j]]);
            o->status = MG_STATUS_FAILED;
            o->not_connected = true;
        }
    }
    b->done(b->arg, b->out, b->n);
    batch_free(b);
}

static void one_settle(local_batch *b)
{
    if (atomic_fetch_sub(&b->left, 1) == 1)
        batch_written(b, b->queued, b->m);
}

static void one_written(void *arg, uint32_t written)
{
    struct one_slot *sl = arg;
    sl->b->queued[sl->j] = written;
    one_settle(sl->b);
}

/* Over a sink without deliver_many (a test's): a deliver per recipient,
 * answered together once every report came. */
static void deliver_each(local_batch *b, const mg_msg *msg)
{
    transport_local *tl = b->tl;
    b->slots = mg_xcalloc(b->m, sizeof(*b->slots));
    atomic_init(&b->left, b->m + 1); /* + this call's guard */
    mg_msg one = *msg;
    for (size_t j = 0; j < b->m; j++) {
        b->slots[j] = (struct one_slot){b, j};
        one.to = (char *)b->sub[j];
        b->queued[j] = 0;
        if (tl->sink.deliver(tl->sink.arg, &one, NULL, false, one_written, &b->slots[j]) <= 0)
            one_settle(b); /* the report never comes when nothing was queued */
    }
    one_settle(b);
}

/* A batch's local share: the dedupe window per recipient, then one
 * deliver_many to the sink (one rendering, one lock hold per shard and
 * chunk) and one report when its writes are done. */
static int tl_deliver_batch(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                            const char *const *to, size_t n, int64_t deadline_ms,
                            void (*done)(void *arg, const mg_deliver_outcome *out, size_t n),
                            void *arg)
{
    (void)target;
    (void)deadline_ms;
    transport_local *tl = (transport_local *)t;
    if (!msg->id[0] || n == 0)
        return -EINVAL;
    size_t il = strlen(msg->id), bytes = n * sizeof(char *);
    for (size_t i = 0; i < n; i++)
        bytes += il + strlen(to[i]) + 2;
    local_batch *b = mg_new(local_batch);
    b->tl = tl;
    b->done = done;
    b->arg = arg;
    b->n = n;
    b->out = mg_xcalloc(n, sizeof(*b->out));
    b->keys = mg_xmalloc(bytes);
    b->map = mg_xmalloc(n * sizeof(*b->map));
    b->sub = mg_xmalloc(n * sizeof(*b->sub));
    b->queued = mg_xmalloc(n * sizeof(*b->queued));
    char *k = (char *)(b->keys + n);
    for (size_t i = 0; i < n; i++) {
        b->keys[i] = k;
        k = pair_put(k, msg->id, il, to[i]);
        if (to[i][0] && mg_dedupe_check_and_add(tl->dedupe, b->keys[i])) {
            mg_metric_add(tl->duplicates, 1);
            b->out[i].status = MG_STATUS_DELIVERED;
            b->out[i].duplicate = true;
            continue;
        }
        b->map[b->m] = i;
        b->sub[b->m++] = to[i];
    }
    if (b->m > 0 && !tl->sink.deliver_many)
        deliver_each(b, msg);
    else if (b->m == 0 || tl->sink.deliver_many(tl->sink.arg, msg, b->sub, b->m, b->queued,
                                                batch_written, b) <= 0)
        batch_written(b, NULL, b->m); /* the report never comes when nothing was queued */
    return 0;
}

static int tl_disconnect(mg_transport *t, const mg_route_target *target, const char *user,
                         const char *conn_id, int code, const char *reason, int64_t deadline_ms)
{
    (void)target;
    (void)deadline_ms;
    transport_local *tl = (transport_local *)t;
    return tl->sink.disconnect(tl->sink.arg, user, conn_id, code, reason);
}

static void tl_free(mg_transport *t)
{
    transport_local *tl = (transport_local *)t;
    mg_dedupe_free(tl->dedupe);
    free(tl);
}

static const struct mg_transport_ops local_ops = {
    .name = "local",
    .path = MG_PATH_LOCAL,
    .orders_on_return = true,
    .deliver = tl_deliver,
    .deliver_batch = tl_deliver_batch,
    .disconnect = tl_disconnect,
    .free = tl_free,
};

mg_transport *mg_transport_local_create(const mg_local_sink *sink, size_t dedupe_window)
{
    transport_local *tl = mg_new(transport_local);
    tl->base.ops = &local_ops;
    tl->sink = *sink;
    tl->dedupe = mg_dedupe_create(dedupe_window);
    tl->duplicates = mg_counter("meshgate_duplicates_dropped_total",
                                "Deliveries dropped because the (id, recipient) was seen", NULL);
    return &tl->base;
}
