/* hub.c: the connection registry and outbound queues (see hub.h).
 *
 * Owns every mg_hub_conn, its id/user strings and its queued frames. The
 * WebSocket service thread creates and destroys connections and drains
 * queues; any thread (router workers, gRPC, Kafka consumer) queues frames
 * and marks connections for close.
 *
 * DESIGN: one mutex guards both indexes (id -> conn, user -> list of conns),
 * every queue and the ready list. Deliveries render JSON before taking the
 * lock and only memcpy under it. The ready list is intrusive (conn->ready_next);
 * the wake callback fires only when it goes from empty to non-empty, so a
 * burst of deliveries costs one lws_cancel_service, not one per frame.
 * Queues are allocated lazily (a NULL head costs nothing), so an idle
 * connection is just this struct plus its id and user strings.
 */
#include "gateway/hub.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "gateway/ws_proto.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct mg_hub_conn {
    void *handle;
    char *user;
    mg_hub_conn *user_prev, *user_next; /* the user's connections */
    mg_hub_conn *ready_next;
    mg_hub_frame *qhead, *qtail;
    uint32_t qcount;
    uint32_t close_code; /* 0: open */
    size_t qbytes;
    char *close_reason;
    bool ready, slow;
    char id[]; /* "<gateway_id>-<seq>" */
};

/* A delivery waiting for its frames to be written. Guarded by the hub mutex;
 * refs: the waiter plus every queued frame that points at it. */
struct mg_hub_receipt {
    pthread_cond_t cv;
    int refs, pending, written;
};

struct mg_hub {
    pthread_mutex_t mu;
    int write_wait_ms;
    bool stop_waits;
    mg_metric *slow_counter;
    char *gateway_id;
    size_t max_frames, max_bytes, headroom;
    void (*wake)(void *arg);
    void *wake_arg;
    mg_map *by_id;   /* id -> conn */
    mg_map *by_user; /* user -> first conn */
    mg_hub_conn *ready_head;
    uint64_t seq;
    size_t count;
    uint64_t delivered, slow_closes;
};

mg_hub *mg_hub_create(const mg_hub_config *cfg)
{
    mg_hub *h = mg_new(mg_hub);
    pthread_mutex_init(&h->mu, NULL);
    h->gateway_id = mg_xstrdup(cfg->gateway_id ? cfg->gateway_id : "gw");
    h->max_frames = cfg->max_frames ? cfg->max_frames : 1;
    h->max_bytes = cfg->max_bytes ? cfg->max_bytes : 1;
    h->headroom = cfg->headroom;
    h->wake = cfg->wake;
    h->wake_arg = cfg->wake_arg;
    h->write_wait_ms = cfg->write_wait_ms;
    h->slow_counter = cfg->slow_counter;
    h->by_id = mg_map_create(1024);
    h->by_user = mg_map_create(1024);
    return h;
}

void mg_hub_set_wake(mg_hub *h, void (*wake)(void *arg), void *arg)
{
    pthread_mutex_lock(&h->mu);
    h->wake = wake;
    h->wake_arg = arg;
    pthread_mutex_unlock(&h->mu);
}

static __thread bool on_service_thread;

void mg_hub_mark_service_thread(void)
{
    on_service_thread = true;
}

/* Under the lock (or with no other thread left): the frame's fate reaches
 * the delivery waiting for it. */
static void settle(mg_hub_frame *f, bool written)
{
    mg_hub_receipt *r = f->receipt;
    if (!r)
        return;
    f->receipt = NULL;
    r->pending--;
    r->written += written;
    if (r->pending == 0)
        pthread_cond_signal(&r->cv);
    if (--r->refs == 0) {
        pthread_cond_destroy(&r->cv);
        free(r);
    }
}

void mg_hub_frame_done(mg_hub *h, mg_hub_frame *f, bool written)
{
    if (f->receipt) {
        pthread_mutex_lock(&h->mu);
        settle(f, written);
        pthread_mutex_unlock(&h->mu);
    }
    free(f);
}

void mg_hub_stop_waits(mg_hub *h)
{
    pthread_mutex_lock(&h->mu);
    h->stop_waits = true;
    pthread_mutex_unlock(&h->mu);
}

static void queue_clear(mg_hub_conn *c)
{
    mg_hub_frame *f = c->qhead;
    while (f) {
        mg_hub_frame *n = f->next;
        settle(f, false);
        free(f);
        f = n;
    }
    c->qhead = c->qtail = NULL;
    c->qcount = 0;
    c->qbytes = 0;
}

static void conn_free(mg_hub_conn *c)
{
    queue_clear(c);
    free(c->user);
    free(c->close_reason);
    free(c);
}

void mg_hub_free(mg_hub *h)
{
    if (!h)
        return;
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(h->by_id, &it, &k, &v);)
        conn_free(v);
    mg_map_free(h->by_id);
    mg_map_free(h->by_user);
    pthread_mutex_destroy(&h->mu);
    free(h->gateway_id);
    free(h);
}

/* Under the lock. */
static void mark_ready(mg_hub *h, mg_hub_conn *c)
{
    if (c->ready)
        return;
    c->ready = true;
    bool was_empty = h->ready_head == NULL;
    c->ready_next = h->ready_head;
    h->ready_head = c;
    if (was_empty && h->wake)
        h->wake(h->wake_arg);
}

mg_hub_conn *mg_hub_register(mg_hub *h, const char *user, void *handle)
{
    pthread_mutex_lock(&h->mu);
    char id[160];
    int n = snprintf(id, sizeof(id), "%.120s-%llu", h->gateway_id, (unsigned long long)++h->seq);
    mg_hub_conn *c = mg_xcalloc(1, sizeof(*c) + (size_t)n + 1);
    memcpy(c->id, id, (size_t)n + 1);
    c->user = mg_xstrdup(user);
    c->handle = handle;
    mg_map_put(h->by_id, c->id, c);
    mg_hub_conn *head = mg_map_get(h->by_user, user);
    if (head) {
        c->user_next = head->user_next;
        c->user_prev = head;
        if (head->user_next)
            head->user_next->user_prev = c;
        head->user_next = c;
    } else {
        mg_map_put(h->by_user, user, c);
    }
    h->count++;
    pthread_mutex_unlock(&h->mu);
    return c;
}

void mg_hub_unregister(mg_hub *h, mg_hub_conn *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&h->mu);
    mg_map_del(h->by_id, c->id);
    if (c->user_prev) {
        c->user_prev->user_next = c->user_next;
        if (c->user_next)
            c->user_next->user_prev = c->user_prev;
    } else if (c->user_next) {
        c->user_next->user_prev = NULL;
        mg_map_put(h->by_user, c->user, c->user_next);
    } else {
        mg_map_del(h->by_user, c->user);
    }
    if (c->ready) {
        for (mg_hub_conn **pp = &h->ready_head; *pp; pp = &(*pp)->ready_next) {
            if (*pp == c) {
                *pp = c->ready_next;
                break;
            }
        }
    }
    h->count--;
    queue_clear(c); /* under the lock: waiting deliveries learn of the drop */
    pthread_mutex_unlock(&h->mu);
    conn_free(c);
}

const char *mg_hub_conn_id(const mg_hub_conn *c)
{
    return c->id;
}

const char *mg_hub_conn_user(const mg_hub_conn *c)
{
    return c->user;
}

mg_hub_frame *mg_hub_pop(mg_hub *h, mg_hub_conn *c, bool *more, int *close_code, char *reason,
                         size_t reasonlen)
{
    pthread_mutex_lock(&h->mu);
    mg_hub_frame *f = c->qhead;
    if (f) {
        c->qhead = f->next;
        if (!c->qhead)
            c->qtail = NULL;
        c->qcount--;
        c->qbytes -= f->len;
        f->next = NULL;
    }
    *more = c->qhead != NULL;
    *close_code = (int)c->close_code;
    if (reason && reasonlen)
        snprintf(reason, reasonlen, "%s", c->close_reason ? c->close_reason : "");
    pthread_mutex_unlock(&h->mu);
    return f;
}

void mg_hub_take_ready(mg_hub *h, void (*fn)(void *handle, int close_code, void *arg), void *arg)
{
    pthread_mutex_lock(&h->mu);
    mg_hub_conn *c = h->ready_head;
    h->ready_head = NULL;
    while (c) {
        mg_hub_conn *n = c->ready_next;
        c->ready = false;
        c->ready_next = NULL;
        fn(c->handle, (int)c->close_code, arg);
        c = n;
    }
    pthread_mutex_unlock(&h->mu);
}

static void set_close(mg_hub *h, mg_hub_conn *c, int code, const char *reason)
{
    if (c->close_code)
        return;
    c->close_code = (uint32_t)code;
    c->close_reason = mg_xstrdup(reason ? reason : "");
    mark_ready(h, c);
}

/* Under the lock: queues a copy of text to c, or marks it slow. */
static int enqueue(mg_hub *h, mg_hub_conn *c, const char *text, size_t len, mg_frame_kind kind,
                   mg_hub_receipt *r)
{
    if (c->close_code)
        return -EPIPE;
    if (c->qcount + 1 > h->max_frames || c->qbytes + len > h->max_bytes) {
        queue_clear(c);
        c->slow = true;
        h->slow_closes++;
        if (h->slow_counter)
            mg_metric_add(h->slow_counter, 1);
        set_close(h, c, MG_WS_CLOSE_SLOW_CONSUMER, "slow consumer");
        mg_log_warn("hub",
                    "slow consumer, closing conn=%s user=%s queue_limit_frames=%zu "
                    "queue_limit_bytes=%zu",
                    c->id, c->user, h->max_frames, h->max_bytes);
        return -ENOBUFS;
    }
    mg_hub_frame *f = mg_xmalloc(sizeof(*f) + h->headroom + len + 1);
    f->next = NULL;
    f->receipt = r;
    if (r) {
        r->refs++;
        r->pending++;
    }
    f->len = len;
    f->kind = kind;
    memcpy(f->data + h->headroom, text, len);
    f->data[h->headroom + len] = 0;
    if (c->qtail)
        c->qtail->next = f;
    else
        c->qhead = f;
    c->qtail = f;
    c->qcount++;
    c->qbytes += len;
    mark_ready(h, c);
    return 0;
}

int mg_hub_deliver(mg_hub *h, const mg_msg *msg, const char *conn_id, bool from_inbox)
{
    if (!msg || !msg->to)
        return 0;
    size_t len;
    char *text = mg_ws_proto_encode_message(msg, from_inbox, &len);
    int n = 0;
    mg_hub_receipt *r = NULL;
    pthread_mutex_lock(&h->mu);
    if (!from_inbox && !on_service_thread && h->write_wait_ms > 0 && !h->stop_waits) {
        r = mg_new(mg_hub_receipt);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&r->cv, &ca);
        pthread_condattr_destroy(&ca);
        r->refs = 1;
    }
    if (conn_id) {
        mg_hub_conn *c = mg_map_get(h->by_id, conn_id);
        if (c && strcmp(c->user, msg->to) == 0 &&
            enqueue(h, c, text, len, MG_FRAME_MESSAGE, r) == 0)
            n++;
    } else {
        for (mg_hub_conn *c = mg_map_get(h->by_user, msg->to); c; c = c->user_next)
            if (enqueue(h, c, text, len, MG_FRAME_MESSAGE, r) == 0)
                n++;
    }
    if (r) {
        struct timespec end;
        clock_gettime(CLOCK_MONOTONIC, &end);
        end.tv_sec += h->write_wait_ms / 1000;
        end.tv_nsec += (long)(h->write_wait_ms % 1000) * 1000000;
        if (end.tv_nsec >= 1000000000)
            end.tv_sec++, end.tv_nsec -= 1000000000;
        /* Short slices, so a stopping service thread releases us early. */
        while (r->pending > 0 && !h->stop_waits) {
            struct timespec now, slice;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec > end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec >= end.tv_nsec))
                break;
            slice = now;
            slice.tv_nsec += 50 * 1000000;
            if (slice.tv_nsec >= 1000000000)
                slice.tv_sec++, slice.tv_nsec -= 1000000000;
            if (slice.tv_sec > end.tv_sec ||
                (slice.tv_sec == end.tv_sec && slice.tv_nsec > end.tv_nsec))
                slice = end;
            pthread_cond_timedwait(&r->cv, &h->mu, &slice);
        }
        n = r->written + r->pending;
        if (--r->refs == 0) {
            pthread_cond_destroy(&r->cv);
            free(r);
        }
    }
    h->delivered += (uint64_t)n;
    pthread_mutex_unlock(&h->mu);
    free(text);
    return n;
}

int mg_hub_post(mg_hub *h, const char *conn_id, const char *text, size_t len)
{
    pthread_mutex_lock(&h->mu);
    mg_hub_conn *c = mg_map_get(h->by_id, conn_id);
    int rc = c ? enqueue(h, c, text, len, MG_FRAME_CONTROL, NULL) : -ENOENT;
    pthread_mutex_unlock(&h->mu);
    return rc == -EPIPE ? -ENOENT : rc;
}

int mg_hub_disconnect(mg_hub *h, const char *user, const char *conn_id, int code,
                      const char *reason)
{
    int n = 0;
    pthread_mutex_lock(&h->mu);
    if (conn_id && conn_id[0]) {
        mg_hub_conn *c = mg_map_get(h->by_id, conn_id);
        if (c && (!user || !user[0] || strcmp(user, c->user) == 0) && !c->close_code) {
            set_close(h, c, code, reason);
            n++;
        }
    } else if (user) {
        for (mg_hub_conn *c = mg_map_get(h->by_user, user); c; c = c->user_next) {
            if (!c->close_code) {
                set_close(h, c, code, reason);
                n++;
            }
        }
    }
    pthread_mutex_unlock(&h->mu);
    return n;
}

size_t mg_hub_count(mg_hub *h)
{
    pthread_mutex_lock(&h->mu);
    size_t n = h->count;
    pthread_mutex_unlock(&h->mu);
    return n;
}

size_t mg_hub_conn_ids(mg_hub *h, char ***ids)
{
    pthread_mutex_lock(&h->mu);
    size_t n = 0;
    char **out = mg_xcalloc(h->count + 1, sizeof(char *));
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(h->by_id, &it, &k, &v);)
        out[n++] = mg_xstrdup(k);
    pthread_mutex_unlock(&h->mu);
    *ids = out;
    return n;
}

void mg_hub_ids_free(char **ids, size_t n)
{
    if (!ids)
        return;
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
}

void mg_hub_get_stats(mg_hub *h, mg_hub_stats *st)
{
    pthread_mutex_lock(&h->mu);
    st->delivered = h->delivered;
    st->slow_closes = h->slow_closes;
    pthread_mutex_unlock(&h->mu);
}

bool mg_hub_is_slow(mg_hub *h, const char *conn_id)
{
    pthread_mutex_lock(&h->mu);
    mg_hub_conn *c = mg_map_get(h->by_id, conn_id);
    bool s = c && c->slow;
    pthread_mutex_unlock(&h->mu);
    return s;
}

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox)
{
    return mg_hub_deliver(arg, msg, conn_id, from_inbox);
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return mg_hub_disconnect(arg, user, conn_id, code, reason);
}

mg_local_sink mg_hub_sink(mg_hub *h)
{
    return (mg_local_sink){.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = h};
}
