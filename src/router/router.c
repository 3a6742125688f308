/* router.c: where a message goes (see router.h).
 *
 * DESIGN
 * One recipient's send is a route_op, a small state machine continued by
 * completions:
 *
 *   lookup (store pool job, or inline when presence is in memory)
 *     -> one attempt per recipient gateway, all in parallel; each walks
 *        its plan (route_policy.h: local, or the near or far route list),
 *        starting the next transport from the completion of the failed one;
 *        a plan that reaches its `inbox` step asks for the inbox
 *     -> when the last attempt completed: a gateway that answered
 *        NOT_CONNECTED and nothing reached -> resolve once more (one more
 *        round); nothing reached and nothing failed (or a plan asked for
 *        it) -> inbox (store pool job, or inline)
 *     -> done(arg, result): the best outcome over the gateways
 *        (DELIVERED > QUEUED > ... see msg.h).
 *
 * `pending` counts the attempts in flight plus one held by whoever starts
 * a round, so a completion that arrives before the round is fully started
 * cannot end it. Results merge under the op's mutex (completions arrive on
 * the peer-cq, kafka-poll and WebSocket threads at once). A batch shares
 * one presence lookup and one answer, counted down as its recipients are
 * answered; nothing waits for any of them. Its recipients whose every
 * connection is here (its local share) take no route_op: they go to the
 * local transport together and its report answers them (see "a batch's
 * local share"); every other recipient is a route_op.
 *
 * A send with a handed callback (mg_router_send_handed) learns when its
 * order is fixed: each first-round attempt has a slot (op->hs) set once,
 * by whichever comes first of the return of the deliver that started it
 * (HANDED on a transport with orders_on_return, else UNORDERED) and its
 * first completion (REACHED or FAILED); op_route, still holding the round,
 * reads the slots once every attempt started and calls handed when all are
 * HANDED or REACHED; otherwise op_complete calls it just before done.
 *
 * Every local write goes through the local transport (transport_local.c),
 * which holds the dedupe window.
 *
 * Tracing (mg_trace.h): a traced operation records a "route" span (op_new
 * to op_complete), its "presence lookup", and one span per transport
 * attempt on a peer path (a->span, started before deliver, ended in
 * attempt_done); the transport is handed a shallow copy of the message
 * whose trace names the attempt span, and carries it to the next gateway.
 * Local writes are spanned by transport_local.c.
 *
 * Operations in flight are bounded by max_inflight recipients (-EAGAIN
 * beyond), never by threads. A recipient leaves the bound just before its
 * answer (a sender that has it may send again at once) and the drain's
 * count (`live`) once the operation is freed.
 */
#include "router/router.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "common/mg_trace.h"
#include "router/hot_routes.h"
#include "router/route_policy.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define INBOX_FETCH_MAX    1000
#define INBOX_PAGE_DEFAULT 100

struct mg_router {
    char *gateway_id, *region;
    mg_presence *presence;
    mg_inbox *inbox;
    mg_local_sink sink;
    mg_pool *pool;
    mg_transport *transports[MG_PATH_COUNT];
    mg_route_lists routes;
    mg_hot *hot;
    size_t max_inflight;
    atomic_size_t inflight; /* recipients not answered: the bound */
    atomic_size_t live;     /* recipients whose operation is not freed: what drain waits for */
    pthread_mutex_t lk_mu;  /* the lookup queue (start_lookup) */
    struct route_op *lk_head, *lk_tail;
    int lk_jobs;
    size_t lk_queued; /* lookups in the queue */
    mg_metric *outcomes[MG_PATH_COUNT][MG_STATUS_ACCEPTED + 1];
    mg_metric *latency[MG_PATH_COUNT];
    mg_metric *fallbacks, *presence_errors, *reresolves, *refused, *inflight_gauge;
    mg_metric *inbox_copies;
    mg_metric *lookup_batches, *handed_over;
    atomic_bool draining; /* mg_router_drain started: no new hand-over step */
    size_t inbox_page;    /* inbox messages outstanding on a connection at once */
    pthread_mutex_t pages_mu;
    mg_map *pages; /* conn_id -> inbox_page*: connections still being fed their inbox */
};

static double hot_pairs_gauge(void *arg)
{
    mg_router *r = arg;
    return (double)mg_hot_count(r->hot, mg_now_ms());
}

mg_router *mg_router_create(const mg_router_config *cfg, mg_presence *presence, mg_inbox *inbox,
                            const mg_local_sink *sink, mg_pool *store_pool)
{
    mg_router *r = mg_new(mg_router);
    r->gateway_id = mg_xstrdup(cfg->gateway_id);
    r->region = mg_xstrdup(cfg->region);
    r->presence = presence;
    r->inbox = inbox;
    r->sink = *sink;
    r->pool = store_pool;
    r->transports[MG_PATH_LOCAL] = mg_transport_local_create(sink, cfg->dedupe_window);
    if (cfg->routes)
        r->routes = *cfg->routes;
    else
        mg_route_lists_parse(NULL, NULL, &r->routes, NULL, 0); /* the defaults always parse */
    r->hot = mg_hot_create(cfg->hot_window_seconds, cfg->hot_threshold, cfg->hot_capacity);
    r->max_inflight = cfg->max_inflight;
    atomic_init(&r->inflight, 0);
    atomic_init(&r->live, 0);
    pthread_mutex_init(&r->lk_mu, NULL);
    r->inbox_page = cfg->inbox_page ? cfg->inbox_page : INBOX_PAGE_DEFAULT;
    if (r->inbox_page > INBOX_FETCH_MAX)
        r->inbox_page = INBOX_FETCH_MAX;
    pthread_mutex_init(&r->pages_mu, NULL);
    r->pages = mg_map_create(16);
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
    r->refused = mg_counter("meshgate_route_refused_total",
                            "Sends refused because --max-inflight-sends were being routed", NULL);
    r->lookup_batches = mg_counter("meshgate_presence_lookup_round_trips_total",
                                   "Pipelined presence lookups made for routed sends", NULL);
    r->inflight_gauge =
        mg_gauge("meshgate_route_inflight", "Recipients being routed right now", NULL);
    r->fallbacks = mg_counter("meshgate_grpc_fallbacks_total",
                              "gRPC peer deliveries that failed over to Kafka", NULL);
    r->presence_errors =
        mg_counter("meshgate_presence_errors_total", "Presence store calls that failed", NULL);
    r->inbox_copies = mg_counter(
        "meshgate_inbox_live_copies_total",
        "Stored messages also sent to a connection of the user found right after the store", NULL);
    r->handed_over = mg_counter("meshgate_inbox_handed_over_total",
                                "Inbox messages handed to the region the user connected in", NULL);
    r->reresolves = mg_counter("meshgate_presence_reresolves_total",
                               "Second presence lookups after a peer said NOT_CONNECTED", NULL);
    mg_gauge_fn_register("meshgate_hot_pairs", "(from, to) pairs currently hot", NULL,
                         hot_pairs_gauge, r);
    return r;
}

void mg_router_set_transport(mg_router *r, mg_path path, mg_transport *t)
{
    if (path <= MG_PATH_LOCAL || path >= MG_PATH_COUNT || path == MG_PATH_INBOX)
        return;
    mg_transport_free(r->transports[path]);
    r->transports[path] = t;
}

bool mg_router_has_path(mg_router *r, mg_path path)
{
    return path == MG_PATH_INBOX ||
           (path > MG_PATH_NONE && path < MG_PATH_COUNT && r->transports[path]);
}

size_t mg_router_drain(mg_router *r, int timeout_ms)
{
    int64_t end = mg_mono_ms() + timeout_ms;
    size_t n;
    atomic_store(&r->draining, true);
    while ((n = atomic_load(&r->live)) > 0 && mg_mono_ms() < end)
        usleep(2000);
    if (n > 0)
        mg_log_warn("router", "operations still in flight at shutdown count=%zu", n);
    return n;
}

typedef struct inbox_page inbox_page;
static void page_free(inbox_page *pg);

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
    pthread_mutex_destroy(&r->lk_mu);
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(r->pages, &it, &k, &v);)
        page_free(v);
    mg_map_free(r->pages);
    pthread_mutex_destroy(&r->pages_mu);
    free(r->gateway_id);
    free(r->region);
    free(r);
}

bool mg_router_nonblocking(mg_router *r)
{
    return r->presence->ops->nonblocking && r->inbox->ops->nonblocking;
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

int mg_router_deliver_local(mg_router *r, const mg_msg *msg, mg_deliver_done done, void *arg)
{
    mg_transport *t = r->transports[MG_PATH_LOCAL];
    mg_route_target self = {r->gateway_id, r->region};
    return t->ops->deliver(t, &self, msg, 0, done, arg);
}

int mg_router_deliver_local_many(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                                 void (*done)(void *arg, const mg_deliver_outcome *out, size_t n),
                                 void *arg)
{
    mg_transport *t = r->transports[MG_PATH_LOCAL];
    mg_route_target self = {r->gateway_id, r->region};
    return t->ops->deliver_batch(t, &self, msg, to, n, 0, done, arg);
}

int mg_router_disconnect_local(mg_router *r, const char *user, const char *conn_id, int code,
                               const char *reason)
{
    return r->sink.disconnect(r->sink.arg, user, conn_id, code, reason);
}

/* ---- the operation -------------------------------------------------------- */

typedef struct batch batch;

typedef struct route_op {
    mg_router *r;
    mg_msg *msg;
    int64_t deadline, start_us;
    bool queue_mode; /* from a queue consumer: never a queue path again */
    bool to_inbox;   /* a plan reached its inbox step (under mu) */
    bool hot;
    bool home_tried; /* handed to the region of the user's inbox (presence_sync.h) */
    int round;       /* 0: first resolution; 1: after a NOT_CONNECTED */
    int presence_rc;
    mg_presence_list conns;
    struct route_op *lk_next; /* in the router's lookup queue */
    atomic_int pending;       /* attempts in flight + the round's starter */
    pthread_mutex_t mu;       /* res, stale */
    mg_send_result res;
    size_t stale; /* gateways that answered NOT_CONNECTED this round */
    mg_send_done done;
    mg_send_handed handed; /* or NULL (mg_router_send_handed) */
    bool handed_fired;
    _Atomic unsigned char *hs; /* round 0's attempts' hand state (hand_state), when handed */
    size_t nhs;
    void *arg;
    batch *b; /* or part of a batch: its slot */
    size_t index;
    mg_span *span, *lookup_span; /* "route", "presence lookup"; NULL: not traced */
} route_op;

struct batch {
    mg_router *r;
    mg_msg *msg; /* the message every op's msg is a view of */
    mg_send_result *res;
    size_t n;
    atomic_size_t left; /* slots not answered + the lookup's guard */
    mg_batch_done done;
    void *arg;
    int64_t deadline, start_us;
    const char **users; /* the recipients routed (nusers), their strings in the same block */
    size_t *slot;       /* users[k] answers res[slot[k]] */
    size_t nusers;
};

/* Where a first-round attempt of an operation with a handed callback is:
 * set once from RUNNING, by whichever comes first of its first completion
 * (attempt_done) and the return of the deliver that started it. */
enum hand_state { HS_RUNNING, HS_HANDED, HS_UNORDERED, HS_REACHED, HS_FAILED };

/* One recipient gateway: the plan being walked. */
typedef struct attempt {
    route_op *op;
    mg_route_target target;
    mg_path plan[MG_PLAN_MAX];
    size_t nplan, step;
    mg_span *span;             /* the current step's transport attempt, when traced */
    _Atomic unsigned char *hs; /* its slot in op->hs until its first completion, or NULL */
} attempt;

static void op_route(route_op *op);

static bool admit(mg_router *r, size_t n)
{
    size_t was = atomic_fetch_add(&r->inflight, n);
    if (r->max_inflight && was + n > r->max_inflight) {
        atomic_fetch_sub(&r->inflight, n);
        mg_metric_add(r->refused, 1);
        return false;
    }
    atomic_fetch_add(&r->live, n);
    mg_metric_add(r->inflight_gauge, (double)n);
    return true;
}

/* n recipients are about to be answered: they leave the bound first, so a
 * sender that has its answer is never refused for its own send's slot. */
static void answered(mg_router *r, size_t n)
{
    atomic_fetch_sub(&r->inflight, n);
    mg_metric_add(r->inflight_gauge, -(double)n);
}

/* n recipients' operations are over and freed (drain waits for these). */
static void release(mg_router *r, size_t n)
{
    atomic_fetch_sub(&r->live, n);
}

static bool usable(mg_router *r, mg_path path, const mg_route_target *t)
{
    mg_transport *tr = r->transports[path];
    return tr && (!tr->ops->available || tr->ops->available(tr, t));
}

static bool reached(const mg_send_result *res)
{
    return res->status == MG_STATUS_DELIVERED || res->status == MG_STATUS_QUEUED ||
           res->status == MG_STATUS_ACCEPTED;
}

static void record(mg_router *r, mg_send_result *res, mg_status st, mg_path path, uint32_t conns,
                   const char *reason)
{
    mg_result_merge(res, st, path, conns, reason);
    if (st >= 1 && st <= MG_STATUS_ACCEPTED)
        mg_metric_add(r->outcomes[path][st], 1);
}

static void op_record(route_op *op, mg_status st, mg_path path, uint32_t conns, const char *reason)
{
    pthread_mutex_lock(&op->mu);
    record(op->r, &op->res, st, path, conns, reason);
    pthread_mutex_unlock(&op->mu);
}

/* owned: msg itself becomes the op's (its recipient is to), else a copy. */
static route_op *op_new(mg_router *r, const mg_msg *msg, const char *to, int64_t deadline,
                        bool queue_mode, mg_msg *owned)
{
    route_op *op = mg_new(route_op);
    op->r = r;
    op->msg = owned ? owned : mg_msg_dup_to(msg, to);
    op->span = mg_span_start(&msg->trace, "route", MG_SPAN_INTERNAL, &op->msg->trace);
    mg_span_attr(op->span, "messaging.message.id", msg->id);
    mg_span_attr(op->span, "meshgate.gateway", r->gateway_id);
    op->deadline = deadline;
    op->start_us = mg_mono_us();
    op->queue_mode = queue_mode;
    atomic_init(&op->pending, 0);
    pthread_mutex_init(&op->mu, NULL);
    return op;
}

/* k of the batch's slots (or its guard) are answered; the last answers the batch. */
static void batch_release(batch *b, size_t k)
{
    if (k == 0 || atomic_fetch_sub(&b->left, k) != k)
        return;
    b->done(b->arg, b->res, b->n);
    mg_msg_free(b->msg);
    free(b->res);
    free(b->users);
    free(b->slot);
    free(b);
}

static void batch_slot_done(batch *b, size_t i, const mg_send_result *res)
{
    if (res)
        b->res[i] = *res;
    batch_release(b, 1);
}

/* The operation's order is fixed: tells the sender, once. Runs from
 * op_route (round 0, before its op_settle) or op_complete, never both at
 * once: the round's guard keeps op_complete out until op_route is over. */
static void op_handed(route_op *op)
{
    if (op->handed && !op->handed_fired) {
        op->handed_fired = true;
        op->handed(op->arg);
    }
}

/* The operation's end: its answer, then it is freed. */
static void op_complete(route_op *op)
{
    mg_router *r = op->r;
    op_handed(op);
    mg_histogram_observe_us(r->latency[op->res.path], mg_mono_us() - op->start_us);
    if (op->lookup_span) /* its job never ran (the store pool refused it) */
        mg_span_end(op->lookup_span, true, "not started");
    mg_msg_trace_end(op->span, op->res.status, op->res.path, op->res.connections, op->res.reason);
    answered(r, 1);
    if (op->b)
        batch_slot_done(op->b, op->index, &op->res);
    else
        op->done(op->arg, &op->res);
    mg_presence_list_clear(&op->conns);
    mg_msg_free(op->msg);
    pthread_mutex_destroy(&op->mu);
    free(op->hs);
    free(op);
    release(r, 1);
}

/* ---- the store steps (lookups and inbox writes may block) ----------------- */

#define LIVE_COPY_DEADLINE_MS 2000

static void live_copy_done(void *arg, const mg_deliver_outcome *out)
{
    (void)arg;
    (void)out; /* not delivered: the message waits in the inbox, as it would have */
}

/* The lookup that sent a message to the inbox may have run just before its
 * user connected, and the new connection's inbox fetch just before the
 * store: then nothing would carry the message until the next connection.
 * So after the store, presence is read again (a connection reads the inbox
 * after registering in presence; each side writes before it reads, so one
 * of the two sees the other), and every gateway holding a connection of
 * the user gets the inbox's copy: an inbox frame the client acks. Not the
 * connections the operation's last lookup listed when a gateway answered
 * it NOT_CONNECTED (stale entries). A peer that timed out but wrote the
 * message answers the copy from its dedupe window, without a second write.
 * Runs on the store pool (the lookup may block). */
static bool has_conn(const mg_presence_list *l, const char *conn_id)
{
    for (size_t k = 0; k < l->n; k++)
        if (!strcmp(l->items[k].conn_id, conn_id))
            return true;
    return false;
}

static void live_copy(route_op *op)
{
    mg_router *r = op->r;
    mg_presence_list now = {0};
    pthread_mutex_lock(&op->mu);
    bool stale = op->stale > 0;
    pthread_mutex_unlock(&op->mu);
    if (r->presence->ops->lookup(r->presence, op->msg->to, &now) == 0) {
        mg_msg m = *op->msg;
        m.inbox = true;
        for (size_t i = 0; i < now.n; i++) {
            mg_route_target target = {now.items[i].gateway_id, now.items[i].region};
            bool seen = stale && has_conn(&op->conns, now.items[i].conn_id);
            for (size_t k = 0; k < i && !seen; k++) /* one copy per gateway (it writes to */
                seen = !strcmp(now.items[k].gateway_id, target.gateway_id) && /* all there) */
                       !(stale && has_conn(&op->conns, now.items[k].conn_id));
            mg_path p = strcmp(target.gateway_id, r->gateway_id) ? MG_PATH_GRPC : MG_PATH_LOCAL;
            mg_transport *t = r->transports[p];
            if (!seen && usable(r, p, &target) &&
                t->ops->deliver(t, &target, &m, mg_mono_ms() + LIVE_COPY_DEADLINE_MS,
                                live_copy_done, NULL) >= 0)
                mg_metric_add(r->inbox_copies, 1);
        }
    }
    mg_presence_list_clear(&now);
}

static void store_run(route_op *op)
{
    mg_router *r = op->r;
    int rc = r->inbox->ops->store(r->inbox, op->msg);
    if (rc == 0) {
        op_record(op, MG_STATUS_STORED, MG_PATH_INBOX, 0, NULL);
        live_copy(op);
    } else
        op_record(op, MG_STATUS_FAILED, MG_PATH_INBOX, 0,
                  rc == -ENOSPC      ? "offline inbox full"
                  : rc == -EREMOTEIO ? "offline inbox not replicated"
                                     : "offline inbox unavailable");
    op_complete(op);
}

static void store_job(void *arg)
{
    store_run(arg);
}

static void lookup_run(route_op *op)
{
    op->presence_rc = op->r->presence->ops->lookup(op->r->presence, op->msg->to, &op->conns);
    op_route(op);
}

/* Lookups waiting for a pipeline (see start_lookup). */
#define LOOKUP_PIPELINES 4   /* pool jobs draining the queue at once, at most */
#define LOOKUP_BATCH_MAX 512 /* users in one pipelined round trip, at most */

/* A pool job: takes every lookup queued (up to LOOKUP_BATCH_MAX), resolves
 * them in one pipelined lookup_batch, routes each, and goes on while more
 * queued up meanwhile. */
static void lookup_job(void *arg)
{
    mg_router *r = arg;
    route_op *got[LOOKUP_BATCH_MAX];
    const char *users[LOOKUP_BATCH_MAX];
    mg_presence_list lists[LOOKUP_BATCH_MAX];
    for (;;) {
        size_t n = 0;
        pthread_mutex_lock(&r->lk_mu);
        while (n < LOOKUP_BATCH_MAX && r->lk_head) {
            route_op *op = r->lk_head;
            r->lk_head = op->lk_next;
            got[n++] = op;
        }
        r->lk_queued -= n;
        if (!r->lk_head)
            r->lk_tail = NULL;
        if (n == 0)
            r->lk_jobs--;
        pthread_mutex_unlock(&r->lk_mu);
        if (n == 0)
            return;
        for (size_t i = 0; i < n; i++) {
            users[i] = got[i]->msg->to;
            memset(&lists[i], 0, sizeof(lists[i]));
        }
        int rc = n == 1 ? r->presence->ops->lookup(r->presence, users[0], &lists[0])
                        : r->presence->ops->lookup_batch(r->presence, users, n, lists);
        mg_metric_add(r->lookup_batches, 1);
        for (size_t i = 0; i < n; i++) {
            got[i]->presence_rc = rc;
            got[i]->conns = lists[i];
            op_route(got[i]);
        }
    }
}

/* Runs fn(op) now when the store never blocks, else as a store pool job. */
static void store_step(route_op *op, bool nonblocking, void (*run)(route_op *), mg_job_fn job,
                       const char *what)
{
    mg_router *r = op->r;
    if (nonblocking || !r->pool) {
        run(op);
        return;
    }
    if (mg_pool_submit(r->pool, job, op) != 0) {
        char reason[96];
        snprintf(reason, sizeof(reason), "overloaded: %s not started", what);
        op_record(op, MG_STATUS_FAILED, MG_PATH_NONE, 0, reason);
        op_complete(op);
    }
}

/* Presence in memory: resolved here. Otherwise the lookup joins the queue
 * that pipeline jobs drain: lookups arriving while a round trip is in
 * flight go together in the next one, so concurrent sends share round trips
 * instead of each holding a worker for its own. */
static void lookup_enqueue(mg_router *r, route_op *first, route_op *last, size_t n);

/* The presence cache's answer, routed here; false when it has none. Never
 * for a second lookup: that one follows a gateway's NOT_CONNECTED, so it
 * reads the store. */
static bool cached_lookup(route_op *op)
{
    mg_presence *p = op->r->presence;
    if (op->round != 0 || !p->ops->lookup_cached ||
        p->ops->lookup_cached(p, op->msg->to, &op->conns) != 1)
        return false;
    op->presence_rc = 0;
    op_route(op);
    return true;
}

static void start_lookup(route_op *op)
{
    mg_router *r = op->r;
    op->lookup_span = mg_span_start(&op->msg->trace, "presence lookup", MG_SPAN_INTERNAL, NULL);
    if (r->presence->ops->nonblocking || !r->pool) {
        lookup_run(op);
        return;
    }
    if (cached_lookup(op))
        return;
    op->lk_next = NULL;
    lookup_enqueue(r, op, op, 1);
}

/* Appends the n lookups first..last (linked by lk_next) to the lookup queue
 * and starts a pipeline job when none runs, or when the queue holds more
 * than one round trip takes (LOOKUP_BATCH_MAX) and fewer than
 * LOOKUP_PIPELINES run. While one runs, what queues up meanwhile goes out
 * together in its next round trip: a pipeline per lookup arriving while
 * another is in flight made round trips of a few users each (Redis and the
 * store workers then spent most of their time in syscalls). A chain queued
 * at once goes out in one round trip (up to LOOKUP_BATCH_MAX). */
static void lookup_enqueue(mg_router *r, route_op *first, route_op *last, size_t n)
{
    pthread_mutex_lock(&r->lk_mu);
    if (r->lk_tail)
        r->lk_tail->lk_next = first;
    else
        r->lk_head = first;
    r->lk_tail = last;
    r->lk_queued += n;
    bool start =
        r->lk_jobs == 0 || (r->lk_jobs < LOOKUP_PIPELINES && r->lk_queued > LOOKUP_BATCH_MAX);
    if (start)
        r->lk_jobs++;
    pthread_mutex_unlock(&r->lk_mu);
    if (start && mg_pool_submit(r->pool, lookup_job, r) != 0) {
        pthread_mutex_lock(&r->lk_mu);
        r->lk_jobs--;
        bool none = r->lk_jobs == 0;
        route_op *q = none ? r->lk_head : NULL;
        if (none) {
            r->lk_head = r->lk_tail = NULL;
            r->lk_queued = 0;
        }
        pthread_mutex_unlock(&r->lk_mu);
        while (q) { /* nobody will drain them: each fails now */
            route_op *next = q->lk_next;
            op_record(q, MG_STATUS_FAILED, MG_PATH_NONE, 0,
                      "overloaded: presence lookup not started");
            op_complete(q);
            q = next;
        }
    }
}

/* ---- attempts: one recipient gateway ---------------------------------------- */

static void op_settle(route_op *op);

static void attempt_end(attempt *a)
{
    route_op *op = a->op;
    free(a);
    op_settle(op);
}

static void attempt_done(void *arg, const mg_deliver_outcome *out);
static void attempt_next(attempt *a);

/* A traced attempt on a peer path: its span, named for the operation on the
 * wire, and in *m (a shallow copy of the op's message) the context the
 * transport carries to the next gateway. many: a DeliverBatch share. */
static void attempt_trace(attempt *a, mg_transport *t, mg_msg *m, bool many)
{
    static const char *systems[MG_PATH_COUNT] = {
        [MG_PATH_KAFKA] = "kafka",
        [MG_PATH_REDIS_PUBSUB] = "redis",
        [MG_PATH_NATS] = "nats",
    };
    *m = *a->op->msg;
    mg_path p = t ? t->ops->path : MG_PATH_NONE;
    if (p != MG_PATH_GRPC && !systems[p]) /* local: the hub spans each write */
        return;
    const char *method = many ? "DeliverBatch" : "DeliverMessage";
    if (p == MG_PATH_GRPC) {
        a->span = mg_span_start(&a->op->msg->trace,
                                many ? "meshgate.v1.GatewayPeer/DeliverBatch"
                                     : "meshgate.v1.GatewayPeer/DeliverMessage",
                                MG_SPAN_CLIENT, &m->trace);
        mg_span_attr(a->span, "rpc.system", "grpc");
        mg_span_attr(a->span, "rpc.service", "meshgate.v1.GatewayPeer");
        mg_span_attr(a->span, "rpc.method", method);
    } else {
        a->span = mg_span_start(&a->op->msg->trace, "publish", MG_SPAN_PRODUCER, &m->trace);
        mg_span_attr(a->span, "messaging.system", systems[p]);
        mg_span_attr(a->span, "messaging.operation", "publish");
    }
    mg_span_attr(a->span, "meshgate.path", mg_path_name(p));
    mg_span_attr(a->span, "meshgate.gateway", a->target.gateway_id);
    mg_span_attr(a->span, "meshgate.region", a->target.region);
    if (a->span && t->ops->trace_attrs)
        t->ops->trace_attrs(t, &a->target, a->span);
}

static void attempt_trace_end(attempt *a, const mg_deliver_outcome *out, const char *why)
{
    if (!a->span)
        return;
    mg_span_attr(a->span, "meshgate.status",
                 out ? (out->not_connected ? "not_connected" : mg_status_name(out->status))
                     : "failed");
    bool ok = out && (out->status == MG_STATUS_DELIVERED || out->status == MG_STATUS_QUEUED ||
                      out->status == MG_STATUS_ACCEPTED);
    mg_span_end(a->span, !ok, ok ? NULL : why);
    a->span = NULL;
}

/* ---- a batch's peer attempts, one call per peer ------------------------------- */

#define PEER_BATCH_MAX 1000 /* recipients per DeliverBatch call */

/* While a batch is being routed on this thread, first attempts on a
 * transport that can carry many recipients are collected per target
 * gateway instead of started one by one; batch_flush starts one call per
 * gateway (per PEER_BATCH_MAX recipients). */
typedef struct peer_group {
    mg_transport *t;
    char *gateway_id, *region; /* copies: a flushed call's ops may end before the next */
    attempt **a;
    size_t n, cap;
} peer_group;

typedef struct collector {
    peer_group *g;
    size_t n, cap;
} collector;

static __thread collector *collecting;

static void group_flush(peer_group *g);

static bool collect(attempt *a, mg_transport *t)
{
    collector *c = collecting;
    if (!c || !t->ops->deliver_batch || a->step != 0)
        return false;
    peer_group *g = NULL;
    for (size_t i = 0; i < c->n && !g; i++)
        if (c->g[i].t == t && !strcmp(c->g[i].gateway_id, a->target.gateway_id))
            g = &c->g[i];
    if (!g) {
        if (c->n == c->cap) {
            c->cap = c->cap ? c->cap * 2 : 4;
            c->g = mg_xrealloc(c->g, c->cap * sizeof(*c->g));
        }
        g = &c->g[c->n++];
        *g = (peer_group){
            t, mg_xstrdup(a->target.gateway_id), mg_xstrdup(a->target.region), NULL, 0, 0};
    }
    if (g->n == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 64;
        g->a = mg_xrealloc(g->a, g->cap * sizeof(*g->a));
    }
    g->a[g->n++] = a;
    if (g->n == PEER_BATCH_MAX) /* a full call: started now, while the rest is routed */
        group_flush(g);
    return true;
}

typedef struct group_call {
    attempt **a;
    size_t n;
} group_call;

static void group_done(void *arg, const mg_deliver_outcome *out, size_t n)
{
    group_call *gc = arg;
    for (size_t i = 0; i < n && i < gc->n; i++)
        attempt_done(gc->a[i], &out[i]);
    free(gc->a);
    free(gc);
}

/* Starts one call for the group's collected attempts (at most
 * PEER_BATCH_MAX) and empties it. */
static void group_flush(peer_group *g)
{
    size_t n = g->n;
    if (n == 0)
        return;
    g->n = 0;
    group_call *gc = mg_new(group_call);
    gc->a = mg_xmemdup(g->a, n * sizeof(*gc->a));
    gc->n = n;
    const char **to = mg_xcalloc(n, sizeof(*to));
    mg_msg m0, m;
    for (size_t i = 0; i < n; i++) {
        to[i] = gc->a[i]->op->msg->to;
        attempt_trace(gc->a[i], g->t, i ? &m : &m0, true); /* the call carries a[0]'s */
    }
    route_op *op0 = gc->a[0]->op;
    mg_route_target target = {g->gateway_id, g->region};
    int rc = g->t->ops->deliver_batch(g->t, &target, &m0, to, n, op0->deadline, group_done, gc);
    free(to);
    if (rc != 0) { /* could not even try: each attempt moves on */
        attempt **as = gc->a;
        free(gc);
        for (size_t i = 0; i < n; i++) {
            attempt_trace_end(as[i], NULL, "could not start");
            as[i]->step++;
            attempt_next(as[i]);
        }
        free(as);
    }
}

static void batch_flush(collector *c)
{
    for (size_t gi = 0; gi < c->n; gi++) {
        group_flush(&c->g[gi]);
        free(c->g[gi].a);
        free(c->g[gi].gateway_id);
        free(c->g[gi].region);
    }
    free(c->g);
}

/* Starts the plan's current step, moving on past transports that cannot
 * even try. Must not touch a after a deliver returned 0 (it may be gone). */
static void attempt_next(attempt *a)
{
    route_op *op = a->op;
    mg_router *r = op->r;
    char reason[160] = "";
    while (a->step < a->nplan) {
        mg_path p = a->plan[a->step];
        if (p == MG_PATH_INBOX) { /* nothing before it reached the gateway */
            pthread_mutex_lock(&op->mu);
            op->to_inbox = true;
            pthread_mutex_unlock(&op->mu);
            break;
        }
        mg_transport *t = r->transports[p];
        if (t && collect(a, t))
            return; /* batch_flush starts it */
        mg_msg m;
        attempt_trace(a, t, &m, false);
        _Atomic unsigned char *hs = a->hs; /* op_route's guard keeps it alive past deliver */
        int rc = t ? t->ops->deliver(t, &a->target, &m, op->deadline, attempt_done, a) : -ENOSYS;
        if (rc >= 0) {
            unsigned char running = HS_RUNNING;
            bool ordered = rc == 0 && t->ops->orders_on_return;
            if (hs)
                atomic_compare_exchange_strong(hs, &running, ordered ? HS_HANDED : HS_UNORDERED);
            return;
        }
        snprintf(reason, sizeof(reason), "%s: %s", mg_path_name(p), strerror(-rc));
        attempt_trace_end(a, NULL, reason);
        if (a->step + 1 == a->nplan)
            op_record(op, MG_STATUS_FAILED, p, 0, reason);
        a->step++;
    }
    if (a->nplan == 0) {
        snprintf(reason, sizeof(reason), "no path to gateway %s in region %s", a->target.gateway_id,
                 a->target.region);
        op_record(op, MG_STATUS_FAILED, MG_PATH_NONE, 0, reason);
    }
    attempt_end(a);
}

static void attempt_done(void *arg, const mg_deliver_outcome *out)
{
    attempt *a = arg;
    route_op *op = a->op;
    mg_router *r = op->r;
    mg_path p = a->plan[a->step];
    attempt_trace_end(a, out, out->reason[0] ? out->reason : "delivery failed");
    bool ok = out->status == MG_STATUS_DELIVERED || out->status == MG_STATUS_QUEUED ||
              out->status == MG_STATUS_ACCEPTED;
    if (a->hs) { /* its first completion: it moves on (or ends) unless deliver said otherwise */
        unsigned char running = HS_RUNNING;
        atomic_compare_exchange_strong(a->hs, &running, ok ? HS_REACHED : HS_FAILED);
        a->hs = NULL;
    }
    if (ok) {
        op_record(op, out->status, p, out->connections, NULL);
        attempt_end(a);
        return;
    }
    if (out->not_connected) {
        pthread_mutex_lock(&op->mu);
        op->stale++;
        pthread_mutex_unlock(&op->mu);
        attempt_end(a);
        return;
    }
    const char *why = out->reason[0] ? out->reason : "delivery failed";
    bool more = a->step + 1 < a->nplan;
    if (p != MG_PATH_KAFKA) /* librdkafka reports broker trouble itself */
        mg_log_warn("router", "%s delivery failed peer=%s msg_id=%s reason=%s%s", mg_path_name(p),
                    a->target.gateway_id, op->msg->id, why, more ? ", falling back" : "");
    if (more) {
        pthread_mutex_lock(&op->mu);
        op->res.paths |= 1u << p; /* tried: the result says so */
        pthread_mutex_unlock(&op->mu);
        if (p == MG_PATH_GRPC)
            mg_metric_add(r->fallbacks, 1);
        a->step++;
        attempt_next(a);
        return;
    }
    op_record(op, MG_STATUS_FAILED, p, 0, why);
    attempt_end(a);
}

static void attempt_start(route_op *op, const char *gateway_id, const char *region)
{
    mg_router *r = op->r;
    attempt *a = mg_new(attempt);
    a->op = op;
    if (op->hs && op->round == 0) /* a second lookup's attempts are never early */
        a->hs = &op->hs[op->nhs++];
    a->target = (mg_route_target){gateway_id, region};
    if (op->presence_rc != 0) {
        a->plan[0] = MG_PATH_LOCAL; /* presence is down: our own connections still work */
        a->nplan = 1;
    } else {
        mg_route_input in = {
            .self_gateway = r->gateway_id,
            .self_region = r->region,
            .target_gateway = gateway_id,
            .target_region = region,
            .hot = op->hot,
            .usable = 1u << MG_PATH_INBOX,
            .lists = &r->routes,
        };
        for (int p = MG_PATH_GRPC; p < MG_PATH_COUNT; p++)
            if (!(op->queue_mode && mg_path_is_queue((mg_path)p)) &&
                usable(r, (mg_path)p, &a->target))
                in.usable |= 1u << p;
        a->nplan = mg_route_plan(&in, a->plan);
    }
    atomic_fetch_add(&op->pending, 1);
    attempt_next(a);
}

/* ---- rounds ------------------------------------------------------------------- */

/* Presence is resolved (op->conns, op->presence_rc): start one attempt per
 * gateway. Runs on the thread that finished the lookup. */
static void op_route(route_op *op)
{
    mg_router *r = op->r;
    if (op->lookup_span) {
        mg_span_attr_int(op->lookup_span, "meshgate.presence.connections", op->conns.n);
        mg_span_end(op->lookup_span, op->presence_rc != 0,
                    op->presence_rc ? strerror(-op->presence_rc) : NULL);
        op->lookup_span = NULL;
    }
    if (op->round == 0 && mg_mono_ms() > op->deadline) {
        op_record(op, MG_STATUS_FAILED, MG_PATH_NONE, 0, "deadline exceeded");
        op_complete(op);
        return;
    }
    if (op->presence_rc != 0)
        mg_metric_add(r->presence_errors, 1);
    if (op->round > 0 && op->presence_rc != 0) {
        op->presence_rc = 0; /* a failed second look: straight to the inbox */
        mg_presence_list_clear(&op->conns);
    }
    atomic_store(&op->pending, 1);
    if (op->handed && op->round == 0) /* a slot per attempt: at most one per connection */
        op->hs = mg_xcalloc(op->conns.n ? op->conns.n : 1, sizeof(*op->hs));
    if (op->presence_rc != 0) {
        if (!op->queue_mode)
            attempt_start(op, r->gateway_id, r->region);
    } else {
        if (op->round == 0)
            op->hot = mg_hot_hit(r->hot, op->msg->from, op->msg->to, mg_now_ms());
        for (size_t i = 0; i < op->conns.n; i++) {
            bool seen = false; /* one delivery per gateway, not per connection */
            for (size_t j = 0; j < i && !seen; j++)
                seen = !strcmp(op->conns.items[j].gateway_id, op->conns.items[i].gateway_id);
            if (!seen)
                attempt_start(op, op->conns.items[i].gateway_id, op->conns.items[i].region);
        }
    }
    if (op->hs && op->round == 0) {
        /* every attempt's order fixed (or reached): the sender may go on */
        bool fixed = op->nhs > 0;
        for (size_t i = 0; i < op->nhs && fixed; i++) {
            unsigned char st = atomic_load(&op->hs[i]);
            fixed = st == HS_HANDED || st == HS_REACHED;
        }
        if (fixed)
            op_handed(op);
    }
    op_settle(op);
}

/* Nothing reached the user and their inbox lives in another region (the
 * multi-region view says they were last seen there): hand the message to
 * that region's queue bus (the far route's first: kafka or nats); its
 * gateway delivers it there or stores it in that region's inbox. Returns
 * false when there is no such region or no usable queue bus. */
static bool start_home_handoff(route_op *op)
{
    mg_router *r = op->r;
    const char *home = op->conns.home_region;
    if (!home || op->queue_mode || op->home_tried)
        return false;
    attempt *a = mg_new(attempt);
    a->op = op;
    a->target = (mg_route_target){"", home}; /* home lives in op->conns until the op ends */
    /* the far route's first queue bus that can take it (kafka, nats) */
    const mg_route_list *far = &r->routes.far_route;
    for (size_t i = 0; i < far->n && a->nplan == 0; i++)
        if (mg_path_is_queue(far->step[i]) && usable(r, far->step[i], &a->target))
            a->plan[a->nplan++] = far->step[i];
    if (a->nplan == 0) {
        free(a);
        return false;
    }
    op->home_tried = true;
    atomic_store(&op->pending, 1); /* this attempt; its end settles the op again */
    attempt_next(a);
    return true;
}

/* The last attempt of a round completed: decide the next step. */
static void op_settle(route_op *op)
{
    if (atomic_fetch_sub(&op->pending, 1) != 1)
        return;
    mg_router *r = op->r;
    /* every attempt is over: no other thread touches op any more */
    if (op->presence_rc != 0) {
        if (!reached(&op->res))
            record(r, &op->res, MG_STATUS_FAILED, MG_PATH_NONE, 0, "presence store unavailable");
        op_complete(op);
        return;
    }
    if (op->stale > 0 && !reached(&op->res) && op->round == 0) {
        /* presence was stale: resolve once more */
        mg_metric_add(r->reresolves, 1);
        op->round = 1;
        op->stale = 0;
        mg_presence_list_clear(&op->conns);
        start_lookup(op);
        return;
    }
    if (!reached(&op->res) && (op->res.status != MG_STATUS_FAILED || op->to_inbox)) {
        if (start_home_handoff(op))
            return;
        store_step(op, r->inbox->ops->nonblocking, store_run, store_job, "inbox write");
        return;
    }
    op_complete(op);
}

/* ---- entry points ---------------------------------------------------------------- */

/* A message the router cannot take (no recipient or id): answered REJECTED
 * (handed first, when given). */
static bool rejected(mg_router *r, const mg_msg *msg, mg_send_done done, mg_send_handed handed,
                     void *arg)
{
    if (msg->to[0] && msg->id[0])
        return false;
    if (handed)
        handed(arg);
    if (done) {
        mg_send_result res;
        memset(&res, 0, sizeof(res));
        record(r, &res, MG_STATUS_REJECTED, MG_PATH_NONE, 0,
               !msg->to[0] ? "empty recipient" : "empty message id");
        done(arg, &res);
    }
    return true;
}

/* owned: msg itself when the operation takes it (mg_router_send_msg), else
 * NULL (the operation copies msg). */
static int send_one(mg_router *r, const mg_msg *msg, int64_t deadline_ms, bool queue_mode,
                    mg_send_done done, mg_send_handed handed, void *arg, mg_msg *owned)
{
    if (rejected(r, msg, done, handed, arg)) {
        mg_msg_free(owned);
        return 0;
    }
    if (!admit(r, 1)) {
        mg_msg_free(owned);
        return -EAGAIN;
    }
    route_op *op = op_new(r, msg, msg->to, deadline_ms, queue_mode, owned);
    op->done = done;
    op->handed = handed;
    op->arg = arg;
    start_lookup(op);
    return 0;
}

int mg_router_send(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_done done,
                   void *arg)
{
    return send_one(r, msg, deadline_ms, false, done, NULL, arg, NULL);
}

int mg_router_send_handed(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_done done,
                          mg_send_handed handed, void *arg)
{
    return send_one(r, msg, deadline_ms, false, done, handed, arg, NULL);
}

int mg_router_send_msg_handed(mg_router *r, mg_msg *msg, int64_t deadline_ms, mg_send_done done,
                              mg_send_handed handed, void *arg)
{
    return send_one(r, msg, deadline_ms, false, done, handed, arg, msg);
}

int mg_router_send_msg(mg_router *r, mg_msg *msg, int64_t deadline_ms, mg_send_done done, void *arg)
{
    return send_one(r, msg, deadline_ms, false, done, NULL, arg, msg);
}

int mg_router_deliver_from_queue(mg_router *r, const mg_msg *msg, int64_t deadline_ms,
                                 mg_send_done done, void *arg)
{
    return send_one(r, msg, deadline_ms, true, done, NULL, arg, NULL);
}

void mg_router_deliver_from_queue_many(mg_router *r, mg_msg *const *msgs, size_t n,
                                       int64_t deadline_ms, mg_send_done done, void *const *args)
{
    bool queue = !r->presence->ops->nonblocking && r->pool;
    route_op *first = NULL, *last = NULL;
    size_t queued = 0;
    for (size_t i = 0; i < n; i++) {
        const mg_msg *msg = msgs[i];
        if (rejected(r, msg, done, NULL, args[i]))
            continue;
        if (!admit(r, 1)) {
            mg_send_result res;
            memset(&res, 0, sizeof(res));
            res.status = MG_STATUS_FAILED;
            snprintf(res.reason, sizeof(res.reason), "router overloaded");
            done(args[i], &res);
            continue;
        }
        route_op *op = op_new(r, msg, msg->to, deadline_ms, true, NULL);
        op->done = done;
        op->arg = args[i];
        op->lookup_span = mg_span_start(&op->msg->trace, "presence lookup", MG_SPAN_INTERNAL, NULL);
        if (!queue) {
            lookup_run(op);
            continue;
        }
        if (cached_lookup(op))
            continue;
        op->lk_next = NULL;
        if (last)
            last->lk_next = op;
        else
            first = op;
        last = op;
        queued++;
    }
    if (first)
        lookup_enqueue(r, first, last, queued);
}

/* ---- a batch's local share -------------------------------------------------------- */

/* A batch's recipients whose every connection is on this gateway need no
 * operation: the lookup said where they are and the plan for this gateway
 * is the local transport alone. They go to it together (one deliver_batch
 * per LOCAL_SHARE_MAX), and its report fills their slots. One whose write
 * found no connection (the entry was stale) becomes an operation at its
 * second resolution, as an operation's NOT_CONNECTED does. Traced messages
 * take the operations (their spans are per recipient). */
#define LOCAL_SHARE_MAX 1000

typedef struct local_share {
    batch *b;
    size_t n;
    size_t slot[LOCAL_SHARE_MAX];
    const char *to[LOCAL_SHARE_MAX];
} local_share;

static void batch_op_start(batch *b, const char *user, size_t slot, int round);

static void share_done(void *arg, const mg_deliver_outcome *out, size_t n)
{
    local_share *sh = arg;
    batch *b = sh->b;
    mg_router *r = b->r;
    int64_t took = mg_mono_us() - b->start_us;
    size_t done = 0;
    for (size_t j = 0; j < n && j < sh->n; j++) {
        if (out[j].not_connected) {
            mg_metric_add(r->reresolves, 1);
            batch_op_start(b, sh->to[j], sh->slot[j], 1); /* answers its slot itself */
            continue;
        }
        record(r, &b->res[sh->slot[j]], out[j].status, MG_PATH_LOCAL, out[j].connections,
               out[j].status == MG_STATUS_DELIVERED ? NULL : out[j].reason);
        mg_histogram_observe_us(r->latency[MG_PATH_LOCAL], took);
        done++;
    }
    free(sh);
    answered(r, done);
    batch_release(b, done);
    release(r, done);
}

static void share_flush(local_share **shp)
{
    local_share *sh = *shp;
    *shp = NULL;
    if (!sh)
        return;
    batch *b = sh->b;
    mg_router *r = b->r;
    mg_transport *t = r->transports[MG_PATH_LOCAL];
    mg_route_target self = {r->gateway_id, r->region};
    size_t n = sh->n;
    if (t->ops->deliver_batch(t, &self, b->msg, sh->to, n, b->deadline, share_done, sh) == 0)
        return;
    for (size_t j = 0; j < n; j++) /* could not even try: each takes an operation */
        batch_op_start(b, sh->to[j], sh->slot[j], 0);
    free(sh);
}

static bool all_here(const mg_router *r, const mg_presence_list *l)
{
    for (size_t k = 0; k < l->n; k++)
        if (strcmp(l->items[k].gateway_id, r->gateway_id))
            return false;
    return l->n > 0;
}

/* An operation for one of the batch's recipients, answering its slot when
 * it completes. */
static route_op *batch_op(batch *b, const char *user, size_t slot)
{
    route_op *op = op_new(b->r, b->msg, user, b->deadline, false, mg_msg_view_to(b->msg, user));
    op->b = b;
    op->index = slot;
    op->start_us = b->start_us;
    return op;
}

/* ... started at its own lookup: round 1 when its write found no connection
 * here (presence is read again, as after a NOT_CONNECTED). */
static void batch_op_start(batch *b, const char *user, size_t slot, int round)
{
    route_op *op = batch_op(b, user, slot);
    op->round = round;
    start_lookup(op);
}

/* The batch's shared presence lookup (one pipelined round trip per node),
 * then its local share and an operation for every other recipient. Holds
 * the batch's guard until it is over. */
static void batch_lookup_run(batch *b)
{
    mg_router *r = b->r;
    size_t nu = b->nusers;
    mg_presence_list *lists = mg_xcalloc(nu, sizeof(*lists));
    int rc = r->presence->ops->lookup_batch(r->presence, b->users, nu, lists);
    mg_route_target self = {r->gateway_id, r->region};
    bool share = rc == 0 && !mg_trace_sampled(&b->msg->trace) && usable(r, MG_PATH_LOCAL, &self) &&
                 mg_mono_ms() <= b->deadline;
    int64_t now_ms = mg_now_ms();
    local_share *sh = NULL;
    collector c = {0};
    collecting = &c;
    for (size_t k = 0; k < nu; k++) {
        if (share && all_here(r, &lists[k])) {
            mg_hot_hit(r->hot, b->msg->from, b->users[k], now_ms); /* as op_route's round 0 */
            mg_presence_list_clear(&lists[k]);
            if (!sh) {
                sh = mg_xmalloc(sizeof(*sh));
                sh->b = b;
                sh->n = 0;
            }
            sh->slot[sh->n] = b->slot[k];
            sh->to[sh->n++] = b->users[k];
            if (sh->n == LOCAL_SHARE_MAX) /* written while the rest is routed */
                share_flush(&sh);
            continue;
        }
        route_op *op = batch_op(b, b->users[k], b->slot[k]);
        op->presence_rc = rc;
        op->conns = lists[k];
        op_route(op);
    }
    share_flush(&sh);
    collecting = NULL;
    batch_flush(&c);
    free(lists);
    batch_release(b, 1); /* the guard */
}

static void batch_lookup_job(void *arg)
{
    batch_lookup_run(arg);
}

int mg_router_send_batch(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                         int64_t deadline_ms, mg_batch_done done, void *arg)
{
    if (!admit(r, n))
        return -EAGAIN;
    batch *b = mg_new(batch);
    b->r = r;
    b->msg = mg_msg_dup(msg);
    b->res = mg_xcalloc(n ? n : 1, sizeof(*b->res));
    b->n = n;
    b->done = done;
    b->arg = arg;
    b->deadline = deadline_ms;
    b->start_us = mg_mono_us();
    /* the recipients, copied in one block: the caller's may go once this returns */
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += strlen(to[i]) + 1;
    b->users = mg_xmalloc((n ? n : 1) * sizeof(*b->users) + bytes);
    b->slot = mg_xmalloc((n ? n : 1) * sizeof(*b->slot));
    char *p = (char *)(b->users + (n ? n : 1));
    atomic_init(&b->left, n + 1); /* + the guard, dropped when the lookup's work is over */
    size_t empty = 0;
    for (size_t i = 0; i < n; i++) {
        if (!to[i][0]) {
            record(r, &b->res[i], MG_STATUS_REJECTED, MG_PATH_NONE, 0, "empty recipient");
            empty++;
            continue;
        }
        size_t len = strlen(to[i]) + 1;
        b->users[b->nusers] = memcpy(p, to[i], len);
        b->slot[b->nusers++] = i;
        p += len;
    }
    answered(r, empty);
    release(r, empty);
    batch_release(b, empty); /* never the last: the guard holds */
    if (b->nusers == 0) {
        batch_release(b, 1);
    } else if (r->presence->ops->nonblocking || !r->pool) {
        batch_lookup_run(b);
    } else if (mg_pool_submit(r->pool, batch_lookup_job, b) != 0) {
        size_t nu = b->nusers;
        for (size_t k = 0; k < nu; k++)
            record(r, &b->res[b->slot[k]], MG_STATUS_FAILED, MG_PATH_NONE, 0,
                   "overloaded: presence lookup not started");
        answered(r, nu);
        batch_release(b, nu + 1);
        release(r, nu);
    }
    return 0;
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
            /* 0: the transport's own bound (--peer-deadline-ms) */
            int n = g->ops->disconnect(g, &t, user, conn_id, code, reason, 0);
            if (n > 0)
                total += n;
        }
    }
    if (!local_done)
        total += mg_router_disconnect_local(r, user, conn_id, code, reason);
    mg_presence_list_clear(&conns);
    return total;
}

/* ---- the inbox of a connecting user, a page at a time ------------------------- */

/* A connection whose inbox did not fit in one page: the ids it was sent and
 * has not acked yet. Only the connection's own jobs touch it (they run in
 * order on one worker); the map itself is shared under pages_mu. */
typedef struct inbox_page {
    char **sent;
    size_t n, cap;
} inbox_page;

static void page_free(inbox_page *pg)
{
    for (size_t i = 0; i < pg->n; i++)
        free(pg->sent[i]);
    free(pg->sent);
    free(pg);
}

static bool page_has(const inbox_page *pg, const char *id)
{
    for (size_t i = 0; i < pg->n; i++)
        if (!strcmp(pg->sent[i], id))
            return true;
    return false;
}

/* Sends the connection the oldest inbox messages it was not sent yet, until
 * page of them are outstanding. Returns whether more wait in the inbox
 * beyond what was fetched (then the connection keeps its page), or a
 * negative errno from the fetch. */
static int page_feed(mg_router *r, const char *user, const char *conn_id, inbox_page *pg)
{
    size_t want = r->inbox_page + pg->n; /* the outstanding ones come first: oldest */
    if (want > INBOX_FETCH_MAX)
        want = INBOX_FETCH_MAX;
    mg_msg **items = NULL;
    size_t n = 0;
    int rc = r->inbox->ops->fetch(r->inbox, user, want, &items, &n);
    if (rc != 0) {
        mg_log_warn("router", "inbox fetch failed user=%s conn=%s err=%s", user, conn_id,
                    strerror(-rc));
        return rc;
    }
    for (size_t i = 0; i < n && pg->n < r->inbox_page; i++) {
        if (page_has(pg, items[i]->id))
            continue;
        if (r->sink.deliver(r->sink.arg, items[i], conn_id, true, NULL, NULL) <= 0)
            break; /* the connection is gone */
        if (pg->n == pg->cap) {
            pg->cap = pg->cap ? pg->cap * 2 : 16;
            pg->sent = mg_xrealloc(pg->sent, pg->cap * sizeof(*pg->sent));
        }
        pg->sent[pg->n++] = mg_xstrdup(items[i]->id);
    }
    mg_inbox_items_free(items, n);
    return n == want;
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
     * the fetch; one stored after it is sent here by its live copy (live_copy
     * reads presence after the store). A page at a time, so
     * a long inbox never overflows the connection's queue: the next page goes
     * out as the client acks (mg_router_inbox_ack). */
    inbox_page *pg = mg_new(inbox_page);
    int more = page_feed(r, user, conn_id, pg);
    if (more > 0) {
        pthread_mutex_lock(&r->pages_mu);
        inbox_page *old = mg_map_put(r->pages, conn_id, pg); /* a reused id: not expected */
        pthread_mutex_unlock(&r->pages_mu);
        if (old)
            page_free(old);
    } else {
        page_free(pg);
    }
    return rc ? rc : more < 0 ? more : 0;
}

static inbox_page *page_take(mg_router *r, const char *conn_id)
{
    pthread_mutex_lock(&r->pages_mu);
    inbox_page *pg = mg_map_del(r->pages, conn_id);
    pthread_mutex_unlock(&r->pages_mu);
    return pg;
}

int mg_router_user_disconnected(mg_router *r, const char *user, const char *conn_id)
{
    inbox_page *pg = page_take(r, conn_id);
    if (pg)
        page_free(pg);
    int rc = r->presence->ops->disconnect(r->presence, user, conn_id);
    return rc == -ENOENT ? 0 : rc;
}

int mg_router_inbox_ack(mg_router *r, const char *user, const char *conn_id, const char *msg_id)
{
    int rc = r->inbox->ops->ack(r->inbox, user, msg_id);
    inbox_page *pg = conn_id ? page_take(r, conn_id) : NULL;
    if (!pg)
        return rc;
    for (size_t i = 0; i < pg->n; i++)
        if (!strcmp(pg->sent[i], msg_id)) {
            free(pg->sent[i]);
            pg->sent[i] = pg->sent[--pg->n];
            break;
        }
    int more = 1;
    if (pg->n <= r->inbox_page / 2)
        more = page_feed(r, user, conn_id, pg);
    if (more != 0 || pg->n > 0) { /* still paging (a failed fetch retries on the next ack) */
        pthread_mutex_lock(&r->pages_mu);
        mg_map_put(r->pages, conn_id, pg);
        pthread_mutex_unlock(&r->pages_mu);
    } else {
        page_free(pg);
    }
    return rc;
}

/* ---- inbox hand-over (multi-region) ------------------------------------------ */

#define HANDOVER_DEADLINE_MS 30000

/* One user's inbox on its way to the region they connected in: one message
 * at a time, in order; each is acked here once it was delivered or queued
 * there, then the next one goes. The chain holds one in-flight slot so
 * mg_router_drain waits for it. */
typedef struct handover {
    mg_router *r;
    char *user;
    mg_msg **items;
    size_t n, i;
} handover;

static void handover_end(handover *h, const char *why)
{
    if (h->i < h->n)
        mg_log_info("router", "inbox hand-over stopped user=%s moved=%zu left=%zu reason=%s",
                    h->user, h->i, h->n - h->i, why);
    release(h->r, 1);
    mg_inbox_items_free(h->items, h->n);
    free(h->user);
    free(h);
}

static void handover_step(handover *h);

static void handover_ack_job(void *arg)
{
    handover *h = arg;
    int rc = h->r->inbox->ops->ack(h->r->inbox, h->user, h->items[h->i]->id);
    if (rc != 0 && rc != -ENOENT) {
        handover_end(h, "inbox ack failed"); /* the next hand-over sends it again: same id */
        return;
    }
    mg_metric_add(h->r->handed_over, 1);
    h->i++;
    handover_step(h);
}

static void handover_sent(void *arg, const mg_send_result *res)
{
    handover *h = arg;
    if (!reached(res)) { /* stored back here, or failed: the rest waits here */
        handover_end(h, res->status == MG_STATUS_STORED ? "user not reachable" : res->reason);
        return;
    }
    if (mg_pool_submit(h->r->pool, handover_ack_job, h) != 0)
        handover_end(h, "store pool full");
}

static void handover_step(handover *h)
{
    if (h->i == h->n) {
        mg_log_info("router", "inbox handed over user=%s messages=%zu", h->user, h->n);
        handover_end(h, "");
        return;
    }
    if (atomic_load(&h->r->draining)) {
        handover_end(h, "shutting down");
        return;
    }
    if (send_one(h->r, h->items[h->i], mg_mono_ms() + HANDOVER_DEADLINE_MS, false, handover_sent,
                 NULL, h, NULL) != 0)
        handover_end(h, "overloaded");
}

int mg_router_handover_inbox(mg_router *r, const char *user)
{
    if (!r->pool || atomic_load(&r->draining))
        return 0;
    mg_msg **items = NULL;
    size_t n = 0;
    int rc = r->inbox->ops->fetch(r->inbox, user, INBOX_FETCH_MAX, &items, &n);
    if (rc != 0 || n == 0) {
        mg_inbox_items_free(items, n);
        return rc;
    }
    if (!admit(r, 1)) {
        mg_inbox_items_free(items, n);
        return -EAGAIN;
    }
    handover *h = mg_new(handover);
    h->r = r;
    h->user = mg_xstrdup(user);
    h->items = items;
    h->n = n;
    handover_step(h);
    return (int)n;
}
