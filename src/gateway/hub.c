/* hub.c: the connection registry and outbound queues (see hub.h).
 *
 * Owns every mg_hub_conn, its id/user strings and its queued frames. Each
 * WebSocket service loop creates and destroys the connections of its shard
 * and drains their queues; any thread (router workers, gRPC, Kafka consumer,
 * the other loops) queues frames and marks connections for close.
 *
 * DESIGN: the hub is sharded by service loop. A shard's mutex guards its
 * indexes (id -> conn, user -> list of its conns in this shard), its queues,
 * its ready list and its list of deliveries waiting for writes; no code path
 * holds two shard mutexes at once. A connection id names its shard (its
 * sequence number modulo the shard count), so a post or disconnect by id
 * locks one shard; a delivery to a user visits every shard (a user's
 * connections may live on different loops). Deliveries render JSON before
 * taking a lock and only memcpy under it. The ready list is intrusive
 * (conn->ready_next); the shard's wake callback fires only when it goes from
 * empty to non-empty, so a burst of deliveries costs one wake-up of that
 * loop, not one per frame, and only after the mutex is released
 * (shard_unlock). Queues are allocated lazily (a NULL head costs
 * nothing), so an idle connection is just this struct plus its id and user
 * strings.
 *
 * Opening: a WebSocket connection is registered opening; until its connect
 * job ends (mg_hub_open, with its ready frame) a message queued to it,
 * other than its own inbox page, goes to a second list (hhead) that the
 * loop does not pop, counted in the same bounds, and is spliced behind the
 * ready frame. Control frames are never held.
 *
 * Write spans: a traced message's frame to each connection holds its own
 * "ws write" span (started under the shard's mutex as the frame is queued,
 * its span id written over the traceparent of that connection's copy of
 * the rendered text); the span ends where the frame is settled: written or
 * failed on its loop (mg_hub_frame_done), dropped with its connection
 * (unregister) or as a slow consumer's queue. An untraced delivery never
 * looks at spans beyond one test of the message's flags.
 *
 * Write receipts: a delivery that waits for its writes holds one receipt
 * shared by its frames on every shard; its counters are atomic, so a frame
 * settles without a lock. The receipt sits on one shard's waiting list (its
 * home: the first shard that took a frame), whose loop reports it when the
 * wait ends; whichever settles its last frame (or ends its wait) first
 * reports it, outside every mutex.
 */
#include "gateway/hub.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_trace.h"
#include "gateway/ws_proto.h"

#include "common/mg_time.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct mg_hub_conn {
    void *handle;
    char *user;
    mg_hub_conn *user_prev, *user_next; /* the user's connections in this shard */
    mg_hub_conn *ready_next;
    mg_hub_frame *qhead, *qtail;
    mg_hub_frame *hhead, *htail; /* messages held while opening (mg_hub_open) */
    uint32_t qcount;             /* both lists */
    uint32_t close_code;         /* 0: open */
    size_t qbytes;
    char *close_reason;
    uint16_t shard;
    bool ready, slow, opening;
    char id[]; /* "<gateway_id>-<seq>" */
};

/* A delivery waiting for its frames to be written (see mg_hub_deliver and
 * mg_hub_deliver_many): one slot per recipient, each frame naming its slot
 * (frame->slot). pending (frames not settled, plus one while the delivery
 * is still queueing), the slots' counters and fired are atomic; prev/next/
 * listed are guarded by the home shard's mutex. refs (every queued frame
 * that points at it, plus one until its callback has run) is atomic. The
 * slots' results are written once, by whoever claims the report. */
typedef struct receipt_slot {
    atomic_uint queued, written, settled;
    uint32_t result;
} receipt_slot;

struct mg_hub_receipt {
    mg_written_fn done;           /* one recipient, or */
    mg_written_many_fn done_many; /* a deliver_many's */
    void *arg;
    int64_t deadline_ms; /* monotonic: the write wait ends */
    atomic_uint pending;
    atomic_bool fired;
    unsigned home;
    bool listed;
    atomic_int refs;
    mg_hub_receipt *prev, *next; /* the home shard's waiting list, oldest first */
    mg_hub_receipt *fire_next;   /* a list of callbacks to run */
    size_t n;
    uint32_t *results; /* n of them, for done_many */
    receipt_slot slot[];
};

typedef void (*wake_fn)(void *arg, unsigned shard);

typedef struct shard {
    _Alignas(64) pthread_mutex_t mu;
    mg_map *by_id;   /* id -> conn */
    mg_map *by_user; /* user -> first conn */
    mg_hub_conn *ready_head;
    mg_hub_receipt *wait_head, *wait_tail; /* receipts waiting for writes */
    _Atomic(wake_fn) wake;
    void *wake_arg;
    atomic_bool wake_due; /* set under mu: wake the loop once mu is released */
    atomic_int waking;    /* wake callbacks running (mg_hub_set_wake waits for them) */
    uint64_t seq, delivered, slow_closes;
} shard;

struct mg_hub {
    int write_wait_ms;
    atomic_bool stop_waits;
    mg_metric *slow_counter;
    char *gateway_id;
    size_t max_frames, max_bytes, headroom;
    atomic_size_t count;
    unsigned nshards;
    shard *shards;
};

mg_hub *mg_hub_create(const mg_hub_config *cfg)
{
    mg_hub *h = mg_new(mg_hub);
    h->gateway_id = mg_xstrdup(cfg->gateway_id ? cfg->gateway_id : "gw");
    h->max_frames = cfg->max_frames ? cfg->max_frames : 1;
    h->max_bytes = cfg->max_bytes ? cfg->max_bytes : 1;
    h->headroom = cfg->headroom;
    h->write_wait_ms = cfg->write_wait_ms;
    h->slow_counter = cfg->slow_counter;
    h->nshards = cfg->shards ? cfg->shards : 1;
    h->shards = aligned_alloc(64, sizeof(shard) * h->nshards);
    if (!h->shards)
        abort();
    memset(h->shards, 0, sizeof(shard) * h->nshards);
    size_t cap = h->nshards > 1 ? 256 : 1024;
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        pthread_mutex_init(&s->mu, NULL);
        s->by_id = mg_map_create(cap);
        s->by_user = mg_map_create(cap);
        s->wake_arg = cfg->wake_arg;
        atomic_init(&s->wake, cfg->wake);
        atomic_init(&s->wake_due, false);
        atomic_init(&s->waking, 0);
    }
    return h;
}

unsigned mg_hub_shards(const mg_hub *h)
{
    return h->nshards;
}

void mg_hub_set_wake(mg_hub *h, void (*wake)(void *arg, unsigned shard), void *arg)
{
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        pthread_mutex_lock(&s->mu);
        s->wake_arg = arg;
        atomic_store(&s->wake, wake);
        pthread_mutex_unlock(&s->mu);
        while (atomic_load(&s->waking)) /* a wake with the old callback is still running */
            sched_yield();
    }
}

/* Releases s's mutex, then wakes its loop when something done under it made
 * the ready set non-empty or listed the first waiting delivery. Woken under
 * the mutex, the loop's first act (taking its ready set) waited for the
 * waker to let go: a futex wait and wake for most cross-loop deliveries at
 * 160,000 msg/s, and a stall of a scheduler slice when the waker lost its
 * CPU meanwhile. A wake after the loop already took the set is harmless. */
static void shard_unlock(mg_hub *h, shard *s)
{
    /* The callback and its argument are taken, and counted as running,
     * under the mutex mg_hub_set_wake writes them under: a wake never pairs
     * an old callback with a new argument, and set_wake waits for it. */
    wake_fn fn = NULL;
    void *arg = NULL;
    if (atomic_load_explicit(&s->wake_due, memory_order_relaxed) &&
        atomic_exchange(&s->wake_due, false)) {
        fn = atomic_load(&s->wake);
        arg = s->wake_arg;
        if (fn)
            atomic_fetch_add(&s->waking, 1);
    }
    pthread_mutex_unlock(&s->mu);
    if (fn) {
        fn(arg, (unsigned)(s - h->shards));
        atomic_fetch_sub(&s->waking, 1);
    }
}

static __thread bool on_service_thread;

void mg_hub_mark_service_thread(void)
{
    on_service_thread = true;
}

static void receipt_unref(mg_hub_receipt *r)
{
    if (atomic_fetch_sub(&r->refs, 1) == 1) {
        free(r->results);
        free(r);
    }
}

/* Takes the right to report r (exactly one caller gets it). */
static bool claim(mg_hub_receipt *r)
{
    return !atomic_exchange(&r->fired, true);
}

/* Under the home shard's mutex. */
static void unlink_wait(shard *s, mg_hub_receipt *r)
{
    if (!r->listed)
        return;
    if (r->prev)
        r->prev->next = r->next;
    else
        s->wait_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        s->wait_tail = r->prev;
    r->prev = r->next = NULL;
    r->listed = false;
}

/* Reports the claimed receipts of list fl (pushed LIFO: run in the order
 * they were claimed). Never under a shard mutex: the callbacks continue
 * operations that call the hub, and the home shard is locked here to take
 * each off its waiting list. */
static void run_fired(mg_hub *h, mg_hub_receipt *fl)
{
    mg_hub_receipt *rev = NULL;
    while (fl) {
        mg_hub_receipt *n = fl->fire_next;
        fl->fire_next = rev;
        rev = fl;
        fl = n;
    }
    for (mg_hub_receipt *r = rev; r;) {
        mg_hub_receipt *n = r->fire_next;
        shard *home = &h->shards[r->home];
        pthread_mutex_lock(&home->mu);
        unlink_wait(home, r);
        pthread_mutex_unlock(&home->mu);
        if (r->done_many) {
            for (size_t i = 0; i < r->n; i++)
                r->results[i] = r->slot[i].result;
            r->done_many(r->arg, r->results, r->n);
        } else {
            r->done(r->arg, r->slot[0].result);
        }
        receipt_unref(r);
        r = n;
    }
}

/* Ends f's write span, if any: written, or dropped (why). */
static void span_settle(mg_hub_frame *f, bool written, const char *why)
{
    if (!f->span)
        return;
    mg_span_attr(f->span, "meshgate.status", written ? "written" : "dropped");
    mg_span_end(f->span, !written, written ? NULL : why);
    f->span = NULL;
}

/* Claimed: fixes each slot's result, written plus (when the wait ended
 * first) what is still queued on a live connection. */
static void fix_results(mg_hub_receipt *r, bool count_queued)
{
    for (size_t i = 0; i < r->n; i++) {
        receipt_slot *sl = &r->slot[i];
        uint32_t w = atomic_load(&sl->written);
        if (count_queued)
            w += atomic_load(&sl->queued) - atomic_load(&sl->settled);
        sl->result = w;
    }
}

/* The frame's fate reaches the delivery waiting for it (no lock needed);
 * when that was its last frame, the receipt goes on *fl to be reported. */
static void settle(mg_hub_frame *f, bool written, mg_hub_receipt **fl)
{
    mg_hub_receipt *r = f->receipt;
    if (!r)
        return;
    f->receipt = NULL;
    receipt_slot *sl = &r->slot[f->slot];
    if (written)
        atomic_fetch_add(&sl->written, 1);
    atomic_fetch_add(&sl->settled, 1);
    if (atomic_fetch_sub(&r->pending, 1) == 1 && claim(r)) {
        fix_results(r, false);
        r->fire_next = *fl;
        *fl = r; /* run_fired drops the reference held for the report */
    }
    receipt_unref(r); /* the frame's */
}

/* Under s's mutex: r's wait is over; frames still queued on live
 * connections count as written. Pushed on *fl when this call claimed it. */
static void end_wait(shard *s, mg_hub_receipt *r, mg_hub_receipt **fl)
{
    unlink_wait(s, r);
    if (!claim(r))
        return;
    fix_results(r, true);
    r->fire_next = *fl;
    *fl = r;
}

void mg_hub_frame_done(mg_hub *h, mg_hub_frame *f, bool written)
{
    span_settle(f, written, "write failed");
    if (f->receipt) {
        mg_hub_receipt *fl = NULL;
        settle(f, written, &fl);
        run_fired(h, fl);
    }
    free(f);
}

/* Ends every wait of every shard now. */
static void end_all_waits(mg_hub *h)
{
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        mg_hub_receipt *fl = NULL;
        pthread_mutex_lock(&s->mu);
        while (s->wait_head)
            end_wait(s, s->wait_head, &fl);
        shard_unlock(h, s);
        run_fired(h, fl);
    }
}

void mg_hub_stop_waits(mg_hub *h)
{
    atomic_store(&h->stop_waits, true);
    end_all_waits(h);
}

bool mg_hub_waiting(mg_hub *h, unsigned sh)
{
    shard *s = &h->shards[sh % h->nshards];
    pthread_mutex_lock(&s->mu);
    bool w = s->wait_head != NULL;
    shard_unlock(h, s);
    return w;
}

bool mg_hub_expire_waits(mg_hub *h, unsigned sh, int64_t now_ms)
{
    shard *s = &h->shards[sh % h->nshards];
    mg_hub_receipt *fl = NULL;
    pthread_mutex_lock(&s->mu);
    while (s->wait_head && s->wait_head->deadline_ms <= now_ms)
        end_wait(s, s->wait_head, &fl);
    bool more = s->wait_head != NULL;
    shard_unlock(h, s);
    run_fired(h, fl);
    return more;
}

/* Under the conn's shard mutex (or with no other thread left): drops c's
 * frames; their spans end as dropped (why), or are abandoned when why is
 * NULL (the hub is freed: tracing may have stopped). */
static void frames_clear(mg_hub_frame *f, mg_hub_receipt **fl, const char *why)
{
    while (f) {
        mg_hub_frame *n = f->next;
        if (why)
            span_settle(f, false, why);
        settle(f, false, fl);
        free(f);
        f = n;
    }
}

static void queue_clear(mg_hub_conn *c, mg_hub_receipt **fl, const char *why)
{
    frames_clear(c->qhead, fl, why);
    frames_clear(c->hhead, fl, why);
    c->qhead = c->qtail = NULL;
    c->hhead = c->htail = NULL;
    c->qcount = 0;
    c->qbytes = 0;
}

static void conn_free(mg_hub_conn *c, mg_hub_receipt **fl)
{
    queue_clear(c, fl, NULL);
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
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        mg_hub_receipt *fl = NULL;
        pthread_mutex_lock(&s->mu);
        for (size_t it = 0; mg_map_next(s->by_id, &it, &k, &v);)
            conn_free(v, &fl);
        pthread_mutex_unlock(&s->mu);
        run_fired(h, fl);
    }
    end_all_waits(h);
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        mg_map_free(s->by_id);
        mg_map_free(s->by_user);
        pthread_mutex_destroy(&s->mu);
    }
    free(h->shards);
    free(h->gateway_id);
    free(h);
}

/* Under s's mutex. */
static void mark_ready(mg_hub *h, mg_hub_conn *c)
{
    if (c->ready)
        return;
    shard *s = &h->shards[c->shard];
    c->ready = true;
    bool was_empty = s->ready_head == NULL;
    c->ready_next = s->ready_head;
    s->ready_head = c;
    if (was_empty)
        atomic_store_explicit(&s->wake_due, true, memory_order_relaxed);
}

static mg_hub_conn *conn_register(mg_hub *h, unsigned sh, const char *user, void *handle,
                                  bool opening)
{
    sh %= h->nshards;
    shard *s = &h->shards[sh];
    pthread_mutex_lock(&s->mu);
    /* the sequence number names the shard: seq % nshards == sh */
    uint64_t seq = s->seq++ * h->nshards + sh + h->nshards;
    char id[160];
    int n = snprintf(id, sizeof(id), "%.120s-%llu", h->gateway_id, (unsigned long long)seq);
    mg_hub_conn *c = mg_xcalloc(1, sizeof(*c) + (size_t)n + 1);
    memcpy(c->id, id, (size_t)n + 1);
    c->user = mg_xstrdup(user);
    c->handle = handle;
    c->shard = (uint16_t)sh;
    c->opening = opening;
    mg_map_put(s->by_id, c->id, c);
    mg_hub_conn *head = mg_map_get(s->by_user, user);
    if (head) {
        c->user_next = head->user_next;
        c->user_prev = head;
        if (head->user_next)
            head->user_next->user_prev = c;
        head->user_next = c;
    } else {
        mg_map_put(s->by_user, user, c);
    }
    atomic_fetch_add(&h->count, 1);
    shard_unlock(h, s);
    return c;
}

mg_hub_conn *mg_hub_register(mg_hub *h, unsigned sh, const char *user, void *handle)
{
    return conn_register(h, sh, user, handle, false);
}

mg_hub_conn *mg_hub_register_opening(mg_hub *h, unsigned sh, const char *user, void *handle)
{
    return conn_register(h, sh, user, handle, true);
}

/* The shard a connection id names, or NULL when it cannot be ours. */
static shard *shard_of_id(mg_hub *h, const char *conn_id)
{
    if (!conn_id)
        return NULL;
    if (h->nshards == 1)
        return &h->shards[0];
    const char *dash = strrchr(conn_id, '-');
    if (!dash || !dash[1])
        return NULL;
    char *end;
    unsigned long long seq = strtoull(dash + 1, &end, 10);
    if (*end)
        return NULL;
    return &h->shards[seq % h->nshards];
}

void mg_hub_unregister(mg_hub *h, mg_hub_conn *c)
{
    if (!c)
        return;
    shard *s = &h->shards[c->shard];
    mg_hub_receipt *fl = NULL;
    pthread_mutex_lock(&s->mu);
    mg_map_del(s->by_id, c->id);
    if (c->user_prev) {
        c->user_prev->user_next = c->user_next;
        if (c->user_next)
            c->user_next->user_prev = c->user_prev;
    } else if (c->user_next) {
        c->user_next->user_prev = NULL;
        mg_map_put(s->by_user, c->user, c->user_next);
    } else {
        mg_map_del(s->by_user, c->user);
    }
    if (c->ready) {
        for (mg_hub_conn **pp = &s->ready_head; *pp; pp = &(*pp)->ready_next) {
            if (*pp == c) {
                *pp = c->ready_next;
                break;
            }
        }
    }
    atomic_fetch_sub(&h->count, 1);
    queue_clear(c, &fl, "connection closed"); /* under the lock: waiting deliveries learn */
    shard_unlock(h, s);
    run_fired(h, fl);
    fl = NULL;
    conn_free(c, &fl); /* its queue is empty: nothing more to report */
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
    shard *s = &h->shards[c->shard];
    pthread_mutex_lock(&s->mu);
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
    shard_unlock(h, s);
    return f;
}

bool mg_hub_take_ready(mg_hub *h, unsigned sh, size_t max,
                       void (*fn)(void *handle, int close_code, void *arg), void *arg)
{
    shard *s = &h->shards[sh % h->nshards];
    pthread_mutex_lock(&s->mu);
    mg_hub_conn *c = s->ready_head;
    for (size_t i = 0; c && i < max; i++) {
        mg_hub_conn *n = c->ready_next;
        c->ready = false;
        c->ready_next = NULL;
        fn(c->handle, (int)c->close_code, arg);
        c = n;
    }
    s->ready_head = c;
    shard_unlock(h, s);
    return c != NULL;
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
    f->span = NULL;
    f->len = len;
    f->kind = kind;
    f->data[h->headroom + len] = 0;
    return f;
}

/* Under c's shard mutex: 0 when c can take a frame of len bytes, else
 * -EPIPE (closing) or -ENOBUFS (now marked slow). */
static int admit(mg_hub *h, mg_hub_conn *c, size_t len, mg_hub_receipt **fl)
{
    if (c->close_code)
        return -EPIPE;
    if (c->qcount + 1 > h->max_frames || c->qbytes + len > h->max_bytes) {
        queue_clear(c, fl, "slow consumer");
        c->slow = true;
        h->shards[c->shard].slow_closes++;
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

/* Under c's shard mutex: appends f (taken) to c's queue, admitted before,
 * or to its held messages (hold: c is opening and f is not its inbox page);
 * a delivery waiting for the write counts it in its slot. */
static void push(mg_hub *h, mg_hub_conn *c, mg_hub_frame *f, mg_hub_receipt *r, uint32_t slot,
                 bool hold)
{
    size_t len = f->len;
    f->receipt = r;
    f->slot = slot;
    if (r) {
        atomic_fetch_add(&r->refs, 1);
        atomic_fetch_add(&r->pending, 1);
        atomic_fetch_add(&r->slot[slot].queued, 1);
    }
    c->qcount++;
    c->qbytes += len;
    mg_hub_frame **head = hold ? &c->hhead : &c->qhead, **tail = hold ? &c->htail : &c->qtail;
    if (*tail)
        (*tail)->next = f;
    else
        *head = f;
    *tail = f;
    if (!hold)
        mark_ready(h, c);
}

/* What a delivery queues: the rendered text and, for a traced message,
 * where its traceparent sits (tp_at > 0). */
typedef struct delivery {
    const mg_msg *msg;
    const unsigned char *text;
    size_t len, tp_at;
    bool from_inbox;
    bool page;      /* a connection's inbox page (to one conn_id, from_inbox) */
    const char *to; /* the recipient */
    mg_hub_receipt *r;
    uint32_t slot; /* the recipient's, in r */
} delivery;

/* Under c's shard mutex: f (queued to c next) gets c's write span, and its
 * text the span's traceparent. */
static void write_span(mg_hub *h, mg_hub_conn *c, mg_hub_frame *f, const delivery *d)
{
    mg_trace_ctx child;
    f->span = mg_span_start(&d->msg->trace, "ws write", MG_SPAN_INTERNAL, &child);
    char tp[MG_TRACEPARENT_LEN + 1];
    if (mg_traceparent_format(&child, tp) == MG_TRACEPARENT_LEN)
        memcpy(f->data + h->headroom + d->tp_at, tp, MG_TRACEPARENT_LEN);
    if (!f->span)
        return;
    mg_span_attr(f->span, "messaging.message.id", d->msg->id);
    mg_span_attr(f->span, "meshgate.path", "local");
    mg_span_attr(f->span, "meshgate.connection.id", c->id);
    mg_span_attr(f->span, "meshgate.gateway", h->gateway_id);
    mg_span_attr_int(f->span, "meshgate.inbox", d->from_inbox);
}

/* Under c's shard mutex: queues the rendered message to c, or marks it
 * slow. With rendered not NULL, the first connection takes *rendered itself
 * and the others a copy of its text, which stays readable while the lock is
 * held (only c's loop frees a queued frame, after mg_hub_pop under this
 * lock); with rendered NULL every connection takes a copy. A traced
 * message's copy then gets the connection's span id (write_span). */
static int enqueue_message(mg_hub *h, mg_hub_conn *c, mg_hub_frame **rendered, const delivery *d,
                           mg_hub_receipt **fl)
{
    const unsigned char *text = d->text;
    size_t len = d->len;
    if (admit(h, c, len, fl))
        return -1;
    mg_hub_frame *f = rendered ? *rendered : NULL;
    if (f) {
        *rendered = NULL;
    } else {
        f = frame_new(h, len, MG_FRAME_MESSAGE);
        memcpy(f->data + h->headroom, text, len);
    }
    if (d->tp_at)
        write_span(h, c, f, d);
    push(h, c, f, d->r, d->slot, c->opening && !d->page);
    return 0;
}

/* Under s's mutex: queues the message to d->to's connections in s (or to
 * conn_id only); returns how many took it. */
static int deliver_shard(mg_hub *h, shard *s, const char *conn_id, mg_hub_frame **rendered,
                         const delivery *d, mg_hub_receipt **fl)
{
    int n = 0;
    if (conn_id) {
        mg_hub_conn *c = mg_map_get(s->by_id, conn_id);
        if (c && strcmp(c->user, d->to) == 0 && enqueue_message(h, c, rendered, d, fl) == 0)
            n++;
    } else {
        for (mg_hub_conn *c = mg_map_get(s->by_user, d->to); c; c = c->user_next)
            if (enqueue_message(h, c, rendered, d, fl) == 0)
                n++;
    }
    s->delivered += (uint64_t)n;
    return n;
}

/* msg rendered once, straight after the headroom of a frame of its own,
 * outside every lock; d describes it (its recipient and receipt unset). */
static mg_hub_frame *render(mg_hub *h, const mg_msg *msg, bool from_inbox, delivery *d)
{
    size_t len = mg_ws_proto_message_len(msg, from_inbox);
    mg_hub_frame *f = frame_new(h, len, MG_FRAME_MESSAGE);
    mg_ws_proto_render_message((char *)f->data + h->headroom, msg, from_inbox);
    *d =
        (delivery){.msg = msg, .text = f->data + h->headroom, .len = len, .from_inbox = from_inbox};
    if (mg_trace_sampled(&msg->trace) && !atomic_load(&h->stop_waits)) /* untraced: this branch */
        d->tp_at = mg_ws_proto_traceparent_at((const char *)d->text, len);
    return f;
}

/* A receipt of n slots, held (pending 1) until every shard was visited; or
 * NULL when the delivery does not wait for its writes. */
static mg_hub_receipt *receipt_new(mg_hub *h, size_t n, bool from_inbox)
{
    if (from_inbox || on_service_thread || h->write_wait_ms <= 0 || atomic_load(&h->stop_waits))
        return NULL;
    mg_hub_receipt *r = mg_xcalloc(1, sizeof(*r) + n * sizeof(r->slot[0]));
    r->n = n;
    atomic_init(&r->refs, 1);
    atomic_init(&r->pending, 1);
    return r;
}

/* After the delivery visited every shard: a receipt that took frames is
 * listed on its home shard, then its hold is dropped (frames settled
 * meanwhile could not report it early); one that took none is dropped
 * unreported. Returns whether a report will come. */
static bool receipt_start(mg_hub *h, mg_hub_receipt *r, int home)
{
    if (home < 0) {
        /* nothing queued (or a slow consumer dropped it at once): no report */
        atomic_store(&r->fired, true);
        receipt_unref(r);
        return false;
    }
    shard *s = &h->shards[home];
    r->home = (unsigned)home;
    r->deadline_ms = mg_mono_ms() + h->write_wait_ms;
    pthread_mutex_lock(&s->mu);
    r->listed = true;
    r->prev = s->wait_tail;
    if (s->wait_tail) {
        s->wait_tail->next = r;
    } else {
        /* its loop may have looked for waits before this one was listed:
         * wake it to arm its timer */
        s->wait_head = r;
        atomic_store_explicit(&s->wake_due, true, memory_order_relaxed);
    }
    s->wait_tail = r;
    shard_unlock(h, s);
    if (atomic_fetch_sub(&r->pending, 1) == 1 && claim(r)) { /* all written already */
        fix_results(r, false);
        r->fire_next = NULL;
        run_fired(h, r);
    }
    return true;
}

int mg_hub_deliver(mg_hub *h, const mg_msg *msg, const char *conn_id, bool from_inbox,
                   mg_written_fn written, void *arg)
{
    if (!msg || !msg->to)
        return 0;
    delivery d;
    mg_hub_frame *rendered = render(h, msg, from_inbox, &d);
    d.to = msg->to;
    d.page = conn_id && from_inbox;
    mg_hub_receipt *r = written ? receipt_new(h, 1, from_inbox) : NULL;
    if (r) {
        r->done = written;
        r->arg = arg;
    }
    d.r = r;
    int n = 0;
    int home = -1;
    shard *only = conn_id ? shard_of_id(h, conn_id) : NULL;
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        if (conn_id && s != only)
            continue;
        /* the frame itself goes to the last shard visited: once this
         * shard's lock is released its loop may write and free it */
        bool last = conn_id || i + 1 == h->nshards;
        mg_hub_receipt *fl = NULL;
        pthread_mutex_lock(&s->mu);
        int k = deliver_shard(h, s, conn_id, last ? &rendered : NULL, &d, &fl);
        shard_unlock(h, s);
        run_fired(h, fl);
        if (k > 0 && home < 0)
            home = (int)i;
        n += k;
    }
    free(rendered); /* no connection took it (NULL when one did) */
    bool wait = r && receipt_start(h, r, home);
    if (!wait && written && n > 0)
        written(arg, (uint32_t)n);
    return n;
}

/* Recipients queued per lock hold: the shard's loop starts writing the
 * first of a large batch while the rest are queued. */
#define MANY_CHUNK 256

int mg_hub_deliver_many(mg_hub *h, const mg_msg *msg, const char *const *to, size_t n,
                        uint32_t *queued, mg_written_many_fn written, void *arg)
{
    memset(queued, 0, n * sizeof(*queued));
    if (!msg || n == 0)
        return 0;
    delivery d;
    mg_hub_frame *tmpl = render(h, msg, false, &d);
    mg_hub_receipt *r = written ? receipt_new(h, n, false) : NULL;
    if (r) {
        r->done_many = written;
        r->arg = arg;
        r->results = mg_xcalloc(n, sizeof(*r->results));
    }
    d.r = r;
    int total = 0, home = -1;
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        for (size_t off = 0; off < n; off += MANY_CHUNK) {
            size_t end = n - off < MANY_CHUNK ? n : off + MANY_CHUNK;
            mg_hub_receipt *fl = NULL;
            int k = 0;
            pthread_mutex_lock(&s->mu);
            for (size_t j = off; j < end; j++) {
                if (!to[j] || !to[j][0])
                    continue;
                d.to = to[j];
                d.slot = (uint32_t)j;
                int got = deliver_shard(h, s, NULL, NULL, &d, &fl);
                queued[j] += (uint32_t)got;
                k += got;
            }
            shard_unlock(h, s);
            run_fired(h, fl);
            if (k > 0 && home < 0)
                home = (int)i;
            total += k;
        }
    }
    free(tmpl);
    bool wait = r && receipt_start(h, r, home);
    if (!wait && written && total > 0)
        written(arg, queued, n);
    return total;
}

/* Queues a control frame to conn_id; with open, then the messages held
 * while it was opening, behind it, and it is open from now on. */
static int post_control(mg_hub *h, const char *conn_id, const char *text, size_t len, bool open)
{
    shard *s = shard_of_id(h, conn_id);
    if (!s)
        return -ENOENT;
    mg_hub_receipt *fl = NULL;
    pthread_mutex_lock(&s->mu);
    mg_hub_conn *c = mg_map_get(s->by_id, conn_id);
    int rc = -ENOENT;
    if (c && (rc = admit(h, c, len, &fl)) == 0) {
        mg_hub_frame *f = frame_new(h, len, MG_FRAME_CONTROL);
        memcpy(f->data + h->headroom, text, len);
        push(h, c, f, NULL, 0, false);
        if (open && c->hhead) { /* in the order they came */
            c->qtail->next = c->hhead;
            c->qtail = c->htail;
            c->hhead = c->htail = NULL;
        }
    }
    if (c && open)
        c->opening = false; /* held ones not moved: the connection is closing */
    shard_unlock(h, s);
    run_fired(h, fl);
    return rc == -EPIPE ? -ENOENT : rc;
}

int mg_hub_post(mg_hub *h, const char *conn_id, const char *text, size_t len)
{
    return post_control(h, conn_id, text, len, false);
}

int mg_hub_open(mg_hub *h, const char *conn_id, const char *text, size_t len)
{
    return post_control(h, conn_id, text, len, true);
}

int mg_hub_disconnect(mg_hub *h, const char *user, const char *conn_id, int code,
                      const char *reason)
{
    int n = 0;
    if (conn_id && conn_id[0]) {
        shard *s = shard_of_id(h, conn_id);
        if (!s)
            return 0;
        pthread_mutex_lock(&s->mu);
        mg_hub_conn *c = mg_map_get(s->by_id, conn_id);
        if (c && (!user || !user[0] || strcmp(user, c->user) == 0) && !c->close_code) {
            set_close(h, c, code, reason);
            n++;
        }
        shard_unlock(h, s);
        return n;
    }
    if (!user)
        return 0;
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        pthread_mutex_lock(&s->mu);
        for (mg_hub_conn *c = mg_map_get(s->by_user, user); c; c = c->user_next) {
            if (!c->close_code) {
                set_close(h, c, code, reason);
                n++;
            }
        }
        shard_unlock(h, s);
    }
    return n;
}

size_t mg_hub_count(mg_hub *h)
{
    return atomic_load(&h->count);
}

size_t mg_hub_conn_ids(mg_hub *h, char ***ids)
{
    size_t n = 0, cap = atomic_load(&h->count) + 16;
    char **out = mg_xcalloc(cap, sizeof(char *));
    const char *k;
    void *v;
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        pthread_mutex_lock(&s->mu);
        for (size_t it = 0; mg_map_next(s->by_id, &it, &k, &v);) {
            if (n == cap) {
                cap *= 2;
                out = mg_xrealloc(out, cap * sizeof(char *));
            }
            out[n++] = mg_xstrdup(k);
        }
        shard_unlock(h, s);
    }
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
    memset(st, 0, sizeof(*st));
    for (unsigned i = 0; i < h->nshards; i++) {
        shard *s = &h->shards[i];
        pthread_mutex_lock(&s->mu);
        st->delivered += s->delivered;
        st->slow_closes += s->slow_closes;
        shard_unlock(h, s);
    }
}

bool mg_hub_is_slow(mg_hub *h, const char *conn_id)
{
    shard *s = shard_of_id(h, conn_id);
    if (!s)
        return false;
    pthread_mutex_lock(&s->mu);
    mg_hub_conn *c = mg_map_get(s->by_id, conn_id);
    bool slow = c && c->slow;
    shard_unlock(h, s);
    return slow;
}

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    return mg_hub_deliver(arg, msg, conn_id, from_inbox, written, written_arg);
}

static int sink_deliver_many(void *arg, const mg_msg *msg, const char *const *to, size_t n,
                             uint32_t *queued, mg_written_many_fn written, void *written_arg)
{
    return mg_hub_deliver_many(arg, msg, to, n, queued, written, written_arg);
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return mg_hub_disconnect(arg, user, conn_id, code, reason);
}

mg_local_sink mg_hub_sink(mg_hub *h)
{
    return (mg_local_sink){.deliver = sink_deliver,
                           .disconnect = sink_disconnect,
                           .arg = h,
                           .deliver_many = sink_deliver_many};
}
