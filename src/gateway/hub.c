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

#include "common/mg_time.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
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

/* A delivery waiting for its frames to be written (see mg_hub_deliver).
 * pending/written/fired and the list links are guarded by the hub mutex;
 * refs (every queued frame that points at it, plus one until its callback
 * has run) is atomic, so the callback can run outside the mutex. */
struct mg_hub_receipt {
    mg_written_fn done;
    void *arg;
    int64_t deadline_ms; /* monotonic: the write wait ends */
    uint32_t pending, written, result;
    bool fired, listed;
    atomic_int refs;
    mg_hub_receipt *prev, *next; /* the waiting list, oldest first */
    mg_hub_receipt *fire_next;   /* the list of callbacks to run */
};

struct mg_hub {
    pthread_mutex_t mu;
    int write_wait_ms;
    bool stop_waits;
    mg_hub_receipt *wait_head, *wait_tail; /* receipts waiting for writes */
    mg_hub_receipt *fire_head;             /* fired, callbacks not run yet */
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

static void receipt_unref(mg_hub_receipt *r)
{
    if (atomic_fetch_sub(&r->refs, 1) == 1)
        free(r);
}

/* Under the lock: r's wait is over; its callback runs at the next
 * unlock_fire. Frames still queued on live connections count as written. */
static void fire(mg_hub *h, mg_hub_receipt *r)
{
    if (r->fired)
        return;
    r->fired = true;
    r->result = r->written + r->pending;
    if (!r->listed)
        ;
    else if (r->prev)
        r->prev->next = r->next;
    else
        h->wait_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        h->wait_tail = r->prev;
    r->prev = r->next = NULL;
    r->fire_next = h->fire_head;
    h->fire_head = r;
}

/* Unlocks the hub, then runs the callbacks of the receipts fired under it
 * (never under the mutex: they continue operations that call the hub). */
static void unlock_fire(mg_hub *h)
{
    mg_hub_receipt *r = h->fire_head;
    h->fire_head = NULL;
    pthread_mutex_unlock(&h->mu);
    /* fired LIFO: run them in the order they fired */
    mg_hub_receipt *rev = NULL;
    while (r) {
        mg_hub_receipt *n = r->fire_next;
        r->fire_next = rev;
        rev = r;
        r = n;
    }
    r = rev;
    while (r) {
        mg_hub_receipt *n = r->fire_next;
        r->done(r->arg, r->result);
        receipt_unref(r);
        r = n;
    }
}

/* Under the lock (or with no other thread left): the frame's fate reaches
 * the delivery waiting for it. */
static void settle(mg_hub *h, mg_hub_frame *f, bool written)
{
    mg_hub_receipt *r = f->receipt;
    if (!r)
        return;
    f->receipt = NULL;
    if (!r->fired) {
        r->pending--;
        r->written += written;
        if (r->pending == 0)
            fire(h, r);
    }
    receipt_unref(r);
}

void mg_hub_frame_done(mg_hub *h, mg_hub_frame *f, bool written)
{
    if (f->receipt) {
        pthread_mutex_lock(&h->mu);
        settle(h, f, written);
        unlock_fire(h);
    }
    free(f);
}

void mg_hub_stop_waits(mg_hub *h)
{
    pthread_mutex_lock(&h->mu);
    h->stop_waits = true;
    while (h->wait_head)
        fire(h, h->wait_head);
    unlock_fire(h);
}

bool mg_hub_waiting(mg_hub *h)
{
    pthread_mutex_lock(&h->mu);
    bool w = h->wait_head != NULL;
    pthread_mutex_unlock(&h->mu);
    return w;
}

bool mg_hub_expire_waits(mg_hub *h, int64_t now_ms)
{
    pthread_mutex_lock(&h->mu);
    while (h->wait_head && h->wait_head->deadline_ms <= now_ms)
        fire(h, h->wait_head);
    bool more = h->wait_head != NULL;
    unlock_fire(h);
    return more;
}

static void queue_clear(mg_hub *h, mg_hub_conn *c)
{
    mg_hub_frame *f = c->qhead;
    while (f) {
        mg_hub_frame *n = f->next;
        settle(h, f, false);
        free(f);
        f = n;
    }
    c->qhead = c->qtail = NULL;
    c->qcount = 0;
    c->qbytes = 0;
}

static void conn_free(mg_hub *h, mg_hub_conn *c)
{
    queue_clear(h, c);
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
    pthread_mutex_lock(&h->mu);
    for (size_t it = 0; mg_map_next(h->by_id, &it, &k, &v);)
        conn_free(h, v);
    while (h->wait_head)
        fire(h, h->wait_head);
    unlock_fire(h);
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
    queue_clear(h, c); /* under the lock: waiting deliveries learn of the drop */
    unlock_fire(h);
    conn_free(h, c);
}

const char *mg_hub_conn_id(const mg_hub_conn *c)
{
    return c->id;
}

const char *mg_hub_conn_user(const mg_hub_conn *c)
{
    return c->user;
}

void *mg_hub_conn_handle(const mg_hub_conn *c)
{
    return c->handle;
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

/* A frame of len payload bytes after the headroom, NUL-terminated. */
static mg_hub_frame *frame_new(mg_hub *h, size_t len, mg_frame_kind kind)
{
    mg_hub_frame *f = mg_xmalloc(sizeof(*f) + h->headroom + len + 1);
    f->next = NULL;
    f->receipt = NULL;
    f->len = len;
    f->kind = kind;
    f->data[h->headroom + len] = 0;
    return f;
}

/* Under the lock: 0 when c can take a frame of len bytes, else -EPIPE
 * (closing) or -ENOBUFS (now marked slow). */
static int admit(mg_hub *h, mg_hub_conn *c, size_t len)
{
    if (c->close_code)
        return -EPIPE;
    if (c->qcount + 1 > h->max_frames || c->qbytes + len > h->max_bytes) {
        queue_clear(h, c);
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
    return 0;
}

/* Under the lock: appends f (taken) to c's queue, admitted before. */
static void push(mg_hub *h, mg_hub_conn *c, mg_hub_frame *f, mg_hub_receipt *r)
{
    size_t len = f->len;
    f->receipt = r;
    if (r) {
        atomic_fetch_add(&r->refs, 1);
        r->pending++;
    }
    if (c->qtail)
        c->qtail->next = f;
    else
        c->qhead = f;
    c->qtail = f;
    c->qcount++;
    c->qbytes += len;
    mark_ready(h, c);
}

/* Under the lock: queues a copy of text to c, or marks it slow. */
static int enqueue(mg_hub *h, mg_hub_conn *c, const char *text, size_t len, mg_frame_kind kind,
                   mg_hub_receipt *r)
{
    int rc = admit(h, c, len);
    if (rc)
        return rc;
    mg_hub_frame *f = frame_new(h, len, kind);
    memcpy(f->data + h->headroom, text, len);
    push(h, c, f, r);
    return 0;
}

/* Under the lock: queues the rendered message to c, or marks it slow. The
 * first connection takes *rendered itself; the others a copy of its text,
 * which stays readable while the lock is held (only the service thread
 * frees a queued frame, after mg_hub_pop under this lock). */
static int enqueue_message(mg_hub *h, mg_hub_conn *c, mg_hub_frame **rendered,
                           const unsigned char *text, size_t len, mg_hub_receipt *r)
{
    if (admit(h, c, len))
        return -1;
    mg_hub_frame *f = *rendered;
    if (f) {
        *rendered = NULL;
    } else {
        f = frame_new(h, len, MG_FRAME_MESSAGE);
        memcpy(f->data + h->headroom, text, len);
    }
    push(h, c, f, r);
    return 0;
}

int mg_hub_deliver(mg_hub *h, const mg_msg *msg, const char *conn_id, bool from_inbox,
                   mg_written_fn written, void *arg)
{
    if (!msg || !msg->to)
        return 0;
    /* rendered once, straight after the headroom, outside the lock */
    size_t len = mg_ws_proto_message_len(msg, from_inbox);
    mg_hub_frame *rendered = frame_new(h, len, MG_FRAME_MESSAGE);
    mg_ws_proto_render_message((char *)rendered->data + h->headroom, msg, from_inbox);
    const unsigned char *text = rendered->data + h->headroom;
    int n = 0;
    mg_hub_receipt *r = NULL;
    pthread_mutex_lock(&h->mu);
    if (written && !from_inbox && !on_service_thread && h->write_wait_ms > 0 && !h->stop_waits) {
        r = mg_new(mg_hub_receipt);
        r->done = written;
        r->arg = arg;
        atomic_init(&r->refs, 1);
    }
    if (conn_id) {
        mg_hub_conn *c = mg_map_get(h->by_id, conn_id);
        if (c && strcmp(c->user, msg->to) == 0 &&
            enqueue_message(h, c, &rendered, text, len, r) == 0)
            n++;
    } else {
        for (mg_hub_conn *c = mg_map_get(h->by_user, msg->to); c; c = c->user_next)
            if (enqueue_message(h, c, &rendered, text, len, r) == 0)
                n++;
    }
    h->delivered += (uint64_t)n;
    bool wait = r && r->pending > 0;
    if (wait) {
        r->deadline_ms = mg_mono_ms() + h->write_wait_ms;
        r->listed = true;
        r->prev = h->wait_tail;
        if (h->wait_tail)
            h->wait_tail->next = r;
        else
            h->wait_head = r;
        h->wait_tail = r;
    } else if (r) {
        /* nothing queued (or a slow consumer dropped it at once): no report */
        r->fired = true;
        receipt_unref(r);
    }
    unlock_fire(h);
    free(rendered); /* no connection took it (NULL when one did) */
    if (!wait && written && n > 0)
        written(arg, (uint32_t)n);
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

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    return mg_hub_deliver(arg, msg, conn_id, from_inbox, written, written_arg);
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
