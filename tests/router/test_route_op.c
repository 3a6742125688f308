/* The route operation of router.c driven by scripted asynchronous
 * transports, no network: completions arrive later, from another thread, as
 * they do from peer-cq, kafka-poll and the WebSocket thread's writes. */
#include "common/mg_alloc.h"
#include "common/mg_metrics.h"
#include "common/mg_pool.h"
#include "common/mg_time.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "router/router.h"
#include "support/mg_wait.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- a completer thread: runs callbacks at their time ---- */

typedef struct later_cb {
    struct later_cb *next;
    int64_t at_ms;
    mg_deliver_done done;
    mg_written_fn written;
    void *arg;
    mg_deliver_outcome out;
    uint32_t n;
    void (*batch_done)(void *arg, const mg_deliver_outcome *out, size_t n);
    mg_deliver_outcome *outs;
    mg_written_many_fn written_many;
    uint32_t *counts;
} later_cb;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    later_cb *head;
    bool stop;
    int pending, max_pending;
    pthread_t thread;
} cq = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static atomic_int completions; /* transport completions run so far */

static void *completer(void *arg)
{
    pthread_mutex_lock(&cq.mu);
    while (!cq.stop || cq.head) {
        int64_t now = mg_mono_ms();
        later_cb **pp = &cq.head, *due = NULL;
        while (*pp) {
            if ((*pp)->at_ms <= now) {
                later_cb *c = *pp;
                *pp = c->next;
                c->next = due;
                due = c;
            } else {
                pp = &(*pp)->next;
            }
        }
        if (due) {
            pthread_mutex_unlock(&cq.mu);
            while (due) {
                later_cb *n = due->next;
                if (due->batch_done)
                    due->batch_done(due->arg, due->outs, due->n);
                else if (due->written_many)
                    due->written_many(due->arg, due->counts, due->n);
                else if (due->done) {
                    atomic_fetch_add(&completions, 1);
                    due->done(due->arg, &due->out);
                } else
                    due->written(due->arg, due->n);
                free(due->outs);
                free(due->counts);
                free(due);
                pthread_mutex_lock(&cq.mu);
                cq.pending--;
                pthread_mutex_unlock(&cq.mu);
                due = n;
            }
            pthread_mutex_lock(&cq.mu);
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 2 * 1000000;
        if (ts.tv_nsec >= 1000000000)
            ts.tv_sec++, ts.tv_nsec -= 1000000000;
        pthread_cond_timedwait(&cq.cv, &cq.mu, &ts);
    }
    pthread_mutex_unlock(&cq.mu);
    return NULL;
}

static void schedule(later_cb *c, int delay_ms)
{
    c->at_ms = mg_mono_ms() + delay_ms;
    pthread_mutex_lock(&cq.mu);
    c->next = cq.head;
    cq.head = c;
    if (++cq.pending > cq.max_pending)
        cq.max_pending = cq.pending;
    pthread_cond_signal(&cq.cv);
    pthread_mutex_unlock(&cq.mu);
}

/* ---- a local sink whose writes are reported later ---- */

static atomic_int local_writes;

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    if (strncmp(msg->to, "local-", 6) != 0)
        return 0;
    atomic_fetch_add(&local_writes, 1);
    if (written) {
        later_cb *c = mg_new(later_cb);
        c->written = written;
        c->arg = written_arg;
        c->n = 1;
        schedule(c, 1);
    }
    return 1;
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return 0;
}

static atomic_int many_calls; /* deliver_many calls to the sink */

/* local-* users are here, with one connection each; the rest are not */
static int sink_deliver_many(void *arg, const mg_msg *msg, const char *const *to, size_t n,
                             uint32_t *queued, mg_written_many_fn written, void *written_arg)
{
    atomic_fetch_add(&many_calls, 1);
    int total = 0;
    for (size_t i = 0; i < n; i++) {
        queued[i] = strncmp(to[i], "local-", 6) == 0;
        total += (int)queued[i];
    }
    atomic_fetch_add(&local_writes, total);
    if (written && total > 0) {
        later_cb *c = mg_new(later_cb);
        c->written_many = written;
        c->arg = written_arg;
        c->n = (uint32_t)n;
        c->counts = mg_xmemdup(queued, n * sizeof(*queued));
        schedule(c, 1);
    }
    return total;
}

/* ---- presence by name: local-* here, peer-* on gw-b (same region), far-*
 * on gw-c (region us), stale-* claimed by gw-b but not there, gone-* claimed
 * here but not here (the sink has no connection for it), else offline ---- */

static int tp_lookup(mg_presence *p, const char *user, mg_presence_list *out)
{
    if (!strncmp(user, "local-", 6) || !strncmp(user, "gone-", 5))
        mg_presence_list_add(out, "gw-a-1", "gw-a", "eu", 1);
    else if (!strncmp(user, "peer-", 5) || !strncmp(user, "stale-", 6))
        mg_presence_list_add(out, "gw-b-1", "gw-b", "eu", 1);
    else if (!strncmp(user, "far-", 4))
        mg_presence_list_add(out, "gw-c-1", "gw-c", "us", 1);
    return 0;
}

static int tp_batch(mg_presence *p, const char *const *users, size_t n, mg_presence_list *outs)
{
    for (size_t i = 0; i < n; i++)
        tp_lookup(p, users[i], &outs[i]);
    return 0;
}

static int tp_conn(mg_presence *p, const char *u, const char *c, int64_t now)
{
    return 0;
}
static int tp_disc(mg_presence *p, const char *u, const char *c)
{
    return 0;
}
static int tp_noop(mg_presence *p)
{
    return 0;
}
static void tp_free(mg_presence *p)
{
    free(p);
}

/* The same table behind a store that takes 5 ms a round trip. */
static atomic_int round_trips;

static int slow_lookup(mg_presence *p, const char *user, mg_presence_list *out)
{
    atomic_fetch_add(&round_trips, 1);
    usleep(5000);
    return tp_lookup(p, user, out);
}

static int slow_batch(mg_presence *p, const char *const *users, size_t n, mg_presence_list *outs)
{
    atomic_fetch_add(&round_trips, 1);
    usleep(5000);
    return tp_batch(p, users, n, outs);
}

static const struct mg_presence_ops slow_ops = {"slow-table", tp_conn, tp_disc, slow_lookup,
                                                slow_batch,   tp_noop, tp_noop, tp_free,
                                                false,        NULL};

/* The slow store with a cache in front that knows every user but the
 * offline ones (so stale-* comes from the cache, as a stale entry would). */
static atomic_int cache_hits;

static int cached_lookup(mg_presence *p, const char *user, mg_presence_list *out)
{
    if (!strncmp(user, "off-", 4))
        return 0;
    atomic_fetch_add(&cache_hits, 1);
    tp_lookup(p, user, out);
    return 1;
}

static const struct mg_presence_ops cached_ops = {
    "cached-table", tp_conn, tp_disc, slow_lookup, slow_batch,
    tp_noop,        tp_noop, tp_free, false,       cached_lookup};

static const struct mg_presence_ops tp_ops = {"table", tp_conn, tp_disc, tp_lookup, tp_batch,
                                              tp_noop, tp_noop, tp_free, true,      NULL};

/* ---- scripted transports that answer later ---- */

typedef struct script {
    mg_transport base;
    atomic_int calls, batch_calls;
    mg_status answer;
    int delay_ms;
} script;

static int sc_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                      int64_t deadline, mg_deliver_done done, void *arg)
{
    script *s = (script *)t;
    atomic_fetch_add(&s->calls, 1);
    later_cb *c = mg_new(later_cb);
    c->done = done;
    c->arg = arg;
    c->out.status = s->answer;
    c->out.connections = s->answer == MG_STATUS_DELIVERED;
    /* a peer that does not have the user answers NOT_CONNECTED */
    c->out.not_connected = !strncmp(msg->to, "stale-", 6);
    if (c->out.not_connected)
        c->out.status = MG_STATUS_FAILED;
    else if (s->answer == MG_STATUS_FAILED)
        snprintf(c->out.reason, sizeof(c->out.reason), "peer gw-b: UNAVAILABLE");
    schedule(c, s->delay_ms);
    return 0;
}

static int sc_deliver_batch(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                            const char *const *to, size_t n, int64_t deadline,
                            void (*done)(void *arg, const mg_deliver_outcome *out, size_t n),
                            void *arg)
{
    script *s = (script *)t;
    atomic_fetch_add(&s->batch_calls, 1);
    later_cb *c = mg_new(later_cb);
    c->batch_done = done;
    c->arg = arg;
    c->n = (uint32_t)n;
    c->outs = mg_xcalloc(n, sizeof(*c->outs));
    for (size_t i = 0; i < n; i++) {
        c->outs[i].status = s->answer;
        c->outs[i].connections = s->answer == MG_STATUS_DELIVERED;
        if (s->answer == MG_STATUS_FAILED)
            snprintf(c->outs[i].reason, sizeof(c->outs[i].reason), "peer gw-b: UNAVAILABLE");
    }
    schedule(c, s->delay_ms);
    return 0;
}

static bool sc_available(mg_transport *t, const mg_route_target *target)
{
    return true;
}

static void sc_free(mg_transport *t) {}

static const struct mg_transport_ops grpc_ops = {.name = "grpc-script",
                                                 .path = MG_PATH_GRPC,
                                                 .available = sc_available,
                                                 .deliver = sc_deliver,
                                                 .free = sc_free,
                                                 .deliver_batch = sc_deliver_batch};
static const struct mg_transport_ops kafka_ops = {.name = "kafka-script",
                                                  .path = MG_PATH_KAFKA,
                                                  .available = sc_available,
                                                  .deliver = sc_deliver,
                                                  .free = sc_free,
                                                  .orders_on_return = true};

static script grpc_t, kafka_t;
static mg_router *router;

static mg_router *make_router(size_t max_inflight)
{
    mg_presence *p = mg_xcalloc(1, sizeof(mg_presence));
    p->ops = &tp_ops;
    mg_router_config cfg = {.gateway_id = "gw-a",
                            .region = "eu",
                            .hot_window_seconds = 10,
                            .hot_threshold = 1000,
                            .hot_capacity = 64,
                            .dedupe_window = 100000,
                            .max_inflight = max_inflight};
    mg_local_sink sink = {.deliver = sink_deliver,
                          .disconnect = sink_disconnect,
                          .arg = NULL,
                          .deliver_many = sink_deliver_many};
    mg_router *r = mg_router_create(&cfg, p, mg_inbox_memory_create(100, 3600), &sink, NULL);
    mg_router_set_transport(r, MG_PATH_GRPC, &grpc_t.base);
    mg_router_set_transport(r, MG_PATH_KAFKA, &kafka_t.base);
    return r;
}

static void setup(void)
{
    atomic_store(&local_writes, 0);
    atomic_store(&many_calls, 0);
    grpc_t = (script){.base = {&grpc_ops}, .answer = MG_STATUS_DELIVERED, .delay_ms = 5};
    kafka_t = (script){.base = {&kafka_ops}, .answer = MG_STATUS_QUEUED, .delay_ms = 5};
    cq.stop = false;
    cq.pending = cq.max_pending = 0;
    pthread_create(&cq.thread, NULL, completer, NULL);
    router = make_router(0);
}

static void teardown(void)
{
    cr_assert_eq(mg_router_drain(router, 5000), 0, "every operation answered");
    mg_router_free(router);
    pthread_mutex_lock(&cq.mu);
    cq.stop = true;
    pthread_cond_signal(&cq.cv);
    pthread_mutex_unlock(&cq.mu);
    pthread_join(cq.thread, NULL);
    mg_metrics_shutdown();
}

TestSuite(route_op, .init = setup, .fini = teardown, .timeout = 60);

static mg_msg *msg(const char *id, const char *to)
{
    return mg_msg_new(id, "alice", to, (const uint8_t *)"hi", 2, "", mg_now_ms(), MG_PRIO_HIGH);
}

static int64_t later(void)
{
    return mg_mono_ms() + 5000;
}

Test(route_op, each_path_answers_from_its_completion)
{
    mg_send_result res;
    mg_msg *m = msg("l1", "local-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_DELIVERED);
    cr_assert_eq(res.path, MG_PATH_LOCAL);
    cr_assert_eq(res.connections, 1);
    mg_msg_free(m);

    m = msg("p1", "peer-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_DELIVERED);
    cr_assert_eq(res.path, MG_PATH_GRPC);
    mg_msg_free(m);

    m = msg("f1", "far-bob"); /* cold pair in another region */
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_QUEUED);
    cr_assert_eq(res.path, MG_PATH_KAFKA);
    mg_msg_free(m);

    m = msg("o1", "off-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_STORED);
    cr_assert_eq(res.path, MG_PATH_INBOX);
    mg_msg_free(m);
}

Test(route_op, failed_peer_falls_back_to_kafka_from_the_completion)
{
    grpc_t.answer = MG_STATUS_FAILED;
    mg_send_result res;
    mg_msg *m = msg("fb1", "peer-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_QUEUED);
    cr_assert_eq(res.path, MG_PATH_KAFKA);
    cr_assert(res.paths & (1u << MG_PATH_GRPC), "the gRPC attempt is recorded");
    cr_assert_eq(atomic_load(&grpc_t.calls), 1);
    cr_assert_eq(atomic_load(&kafka_t.calls), 1);
    mg_msg_free(m);
}

Test(route_op, not_connected_resolves_again_then_stores)
{
    mg_send_result res;
    mg_msg *m = msg("s1", "stale-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_STORED, "the second look still names gw-b: inbox");
    cr_assert_eq(atomic_load(&grpc_t.calls), 2, "one attempt per resolution");
    cr_assert_eq(atomic_load(&kafka_t.calls), 0, "NOT_CONNECTED is not a failure to fall back on");
    mg_msg_free(m);
}

Test(route_op, a_duplicate_is_answered_but_not_written_twice)
{
    mg_send_result res;
    mg_msg *m = msg("d1", "local-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_DELIVERED);
    cr_assert_eq(atomic_load(&local_writes), 1);
    mg_msg_free(m);
}

#define NSLOW 2000

static atomic_int answered;

static void count_answer(void *arg, const mg_send_result *res)
{
    if (res->status == MG_STATUS_DELIVERED)
        atomic_fetch_add(&answered, 1);
}

/* No thread cap: every send is in flight at the peer at once. */
Test(route_op, thousands_in_flight_at_once_without_threads)
{
    grpc_t.delay_ms = 300; /* the peer answers only after 300 ms */
    atomic_store(&answered, 0);
    int64_t start = mg_mono_ms();
    for (int i = 0; i < NSLOW; i++) {
        char id[32];
        snprintf(id, sizeof(id), "slow-%d", i);
        mg_msg *m = msg(id, "peer-bob");
        cr_assert_eq(mg_router_send(router, m, later(), count_answer, NULL), 0);
        mg_msg_free(m);
    }
    for (int i = 0; i < 1000 && atomic_load(&answered) < NSLOW; i++)
        usleep(10000);
    cr_assert_eq(atomic_load(&answered), NSLOW);
    cr_assert_geq(cq.max_pending, NSLOW, "all %d calls were at the peer at once (max %d)", NSLOW,
                  cq.max_pending);
    cr_assert_lt(mg_mono_ms() - start, 5000, "about one peer delay, not %d of them", NSLOW);
}

static void batch_answer(void *arg, const mg_send_result *res, size_t n)
{
    size_t *counts = arg;
    for (size_t i = 0; i < n; i++)
        counts[res[i].status]++;
    counts[0] = n; /* status NONE never occurs: slot 0 carries n */
}

Test(route_op, batch_answers_once_with_every_recipient)
{
    size_t n = 10000;
    char **to = mg_xcalloc(n, sizeof(char *));
    for (size_t i = 0; i < n; i++)
        to[i] = mg_xasprintf("%s-%zu",
                             i % 4 == 0   ? "local"
                             : i % 4 == 1 ? "peer"
                             : i % 4 == 2 ? "far"
                                          : "off",
                             i);
    mg_msg *m = msg("b1", "");
    mg_send_result *res = mg_xcalloc(n, sizeof(*res));
    cr_assert_eq(mg_wait_send_batch(router, m, (const char *const *)to, n, later(), res), 0);
    size_t st[MG_STATUS_ACCEPTED + 1] = {0};
    for (size_t i = 0; i < n; i++)
        st[res[i].status]++;
    cr_assert_eq(st[MG_STATUS_DELIVERED], n / 2, "local and peer recipients");
    cr_assert_eq(st[MG_STATUS_QUEUED], n / 4);
    cr_assert_eq(st[MG_STATUS_STORED], n / 4);
    cr_assert_eq(res[0].path, MG_PATH_LOCAL);
    cr_assert_eq(res[1].path, MG_PATH_GRPC);
    cr_assert_eq(atomic_load(&grpc_t.batch_calls), 3,
                 "2,500 peer recipients in calls of 1,000 (%d)", atomic_load(&grpc_t.batch_calls));
    cr_assert_eq(atomic_load(&grpc_t.calls), 0, "none one by one");
    cr_assert_eq(atomic_load(&many_calls), 3, "2,500 local recipients in hub calls of 1,000");
    cr_assert_eq(atomic_load(&local_writes), 2500);
    for (size_t i = 0; i < n; i++)
        free(to[i]);
    free(to);
    free(res);
    mg_msg_free(m);
}

Test(route_op, a_batch_repeated_is_answered_but_written_once)
{
    const char *to[] = {"local-1", "local-2", "local-1"};
    mg_msg *m = msg("bd", "");
    mg_send_result res[3];
    cr_assert_eq(mg_wait_send_batch(router, m, to, 3, later(), res), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(res[i].status, MG_STATUS_DELIVERED, "recipient %d", i);
    cr_assert_eq(atomic_load(&local_writes), 2, "local-1 named twice is written once");
    cr_assert_eq(mg_wait_send_batch(router, m, to, 3, later(), res), 0); /* a retry */
    for (int i = 0; i < 3; i++)
        cr_assert_eq(res[i].status, MG_STATUS_DELIVERED, "recipient %d, again", i);
    cr_assert_eq(atomic_load(&local_writes), 2, "nothing written twice");
    cr_assert_eq(atomic_load(&many_calls), 1, "the retry's recipients were all duplicates");
    mg_msg_free(m);
}

/* A batch's local share goes to the hub in one call; a recipient it finds
 * no connection for (a stale entry naming this gateway) is resolved again
 * and, still not here, stored, while the others are answered as written. */
Test(route_op, a_batch_recipient_gone_from_here_is_resolved_again_then_stored)
{
    const char *to[] = {"local-1", "gone-1", "peer-1", "local-2"};
    mg_msg *m = msg("bg", "");
    mg_send_result res[4];
    cr_assert_eq(mg_wait_send_batch(router, m, to, 4, later(), res), 0);
    cr_assert_eq(res[0].status, MG_STATUS_DELIVERED);
    cr_assert_eq(res[0].path, MG_PATH_LOCAL);
    cr_assert_eq(res[0].connections, 1);
    cr_assert_eq(res[1].status, MG_STATUS_STORED, "gone-1: %s", res[1].reason);
    cr_assert_eq(res[1].path, MG_PATH_INBOX);
    cr_assert_eq(res[2].status, MG_STATUS_DELIVERED);
    cr_assert_eq(res[2].path, MG_PATH_GRPC);
    cr_assert_eq(res[3].status, MG_STATUS_DELIVERED);
    cr_assert_eq(atomic_load(&many_calls), 1, "the local share in one hub call");
    cr_assert_eq(atomic_load(&local_writes), 2);
    mg_msg_free(m);
}

Test(route_op, a_failed_batch_call_falls_back_per_recipient)
{
    grpc_t.answer = MG_STATUS_FAILED;
    const char *to[] = {"peer-1", "peer-2", "local-3"};
    mg_msg *m = msg("bf", "");
    mg_send_result res[3];
    cr_assert_eq(mg_wait_send_batch(router, m, to, 3, later(), res), 0);
    cr_assert_eq(res[0].status, MG_STATUS_QUEUED);
    cr_assert_eq(res[1].status, MG_STATUS_QUEUED);
    cr_assert_eq(res[2].status, MG_STATUS_DELIVERED);
    cr_assert_eq(atomic_load(&grpc_t.batch_calls), 1);
    cr_assert_eq(atomic_load(&kafka_t.calls), 2);
    mg_msg_free(m);
}

/* Replaces the router by one whose presence store blocks (slow_ops) and
 * whose lookups run on pool. */
static void presence_router(const struct mg_presence_ops *ops, mg_pool *pool, size_t max_inflight)
{
    mg_router_free(router);
    mg_presence *p = mg_xcalloc(1, sizeof(mg_presence));
    p->ops = ops;
    mg_router_config cfg = {.gateway_id = "gw-a",
                            .region = "eu",
                            .hot_window_seconds = 10,
                            .hot_threshold = 1000,
                            .hot_capacity = 64,
                            .dedupe_window = 10000,
                            .max_inflight = max_inflight};
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    router = mg_router_create(&cfg, p, mg_inbox_memory_create(100, 3600), &sink, pool);
    mg_router_set_transport(router, MG_PATH_GRPC, &grpc_t.base);
    mg_router_set_transport(router, MG_PATH_KAFKA, &kafka_t.base);
    atomic_store(&round_trips, 0);
    atomic_store(&cache_hits, 0);
}

static void slow_router(mg_pool *pool, size_t max_inflight)
{
    presence_router(&slow_ops, pool, max_inflight);
}

/* A cached answer is routed without a store round trip; a second lookup
 * after a peer's NOT_CONNECTED reads the store; a miss reads it too. */
Test(route_op, the_presence_cache_answers_first_lookups_only)
{
    mg_pool *pool = mg_pool_create("store", 2, 100);
    presence_router(&cached_ops, pool, 0);
    mg_send_result res;
    mg_msg *m = msg("c1", "peer-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_DELIVERED, "%d %s", res.status, res.reason);
    cr_assert_eq(atomic_load(&round_trips), 0, "answered from the cache");
    cr_assert_eq(atomic_load(&cache_hits), 1);
    mg_msg_free(m);

    m = msg("c2", "stale-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_STORED);
    cr_assert_eq(atomic_load(&cache_hits), 2, "the second lookup never asks the cache");
    cr_assert_eq(atomic_load(&round_trips), 2,
                 "it reads the store (and so does the live copy "
                 "after the inbox write)");
    cr_assert_eq(atomic_load(&grpc_t.calls), 3);
    mg_msg_free(m);

    m = msg("c3", "off-bob");
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
    cr_assert_eq(res.status, MG_STATUS_STORED);
    cr_assert_eq(atomic_load(&round_trips), 4, "a miss reads the store");
    mg_msg_free(m);
    mg_router_free(router);
    mg_pool_free(pool);
    router = make_router(0);
}

/* A store that blocks: lookups go through the pool and share round trips. */
Test(route_op, concurrent_lookups_share_pipelined_round_trips)
{
    mg_pool *pool = mg_pool_create("store", 2, 10000);
    slow_router(pool, 0);
    atomic_store(&answered, 0);
    for (int i = 0; i < 2000; i++) {
        char id[32];
        snprintf(id, sizeof(id), "pl-%d", i);
        mg_msg *m = msg(id, "local-bob");
        cr_assert_eq(mg_router_send(router, m, later(), count_answer, NULL), 0);
        mg_msg_free(m);
    }
    cr_assert_eq(mg_router_drain(router, 20000), 0);
    cr_assert_eq(atomic_load(&answered), 2000);
    cr_assert_lt(atomic_load(&round_trips), 200, "2,000 lookups in %d round trips",
                 atomic_load(&round_trips));
    mg_router_free(router);
    mg_pool_free(pool);
    router = make_router(0);
}

Test(route_op, refused_beyond_the_bound_and_free_again_after)
{
    mg_router_free(router);
    router = make_router(3);
    grpc_t.delay_ms = 200;
    atomic_store(&answered, 0);
    mg_msg *m = msg("bound", "peer-bob");
    for (int i = 0; i < 3; i++)
        cr_assert_eq(mg_router_send(router, m, later(), count_answer, NULL), 0);
    cr_assert_eq(mg_router_send(router, m, later(), count_answer, NULL), -EAGAIN);
    const char *to[] = {"peer-x", "peer-y"};
    cr_assert_eq(mg_router_send_batch(router, m, to, 2, later(), batch_answer, NULL), -EAGAIN,
                 "a batch counts each recipient");
    cr_assert_eq(mg_router_drain(router, 5000), 0);
    cr_assert_eq(atomic_load(&answered), 3);
    mg_send_result res;
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0, "room again");
    mg_msg_free(m);
}

/* A queue consumer's fetched batch: one answer per message, and one
 * pipelined presence round trip for the lot. */
typedef struct slot {
    atomic_int calls;
    mg_status status;
} slot;

static void slot_answer(void *arg, const mg_send_result *res)
{
    slot *s = arg;
    s->status = res->status;
    atomic_fetch_add(&s->calls, 1);
}

#define NMANY 256

Test(route_op, a_fetched_batch_shares_one_lookup_and_answers_each)
{
    mg_pool *pool = mg_pool_create("store", 2, 10000);
    slow_router(pool, NMANY * 3 / 4); /* the valid ones, exactly */
    mg_router_set_transport(router, MG_PATH_GRPC, &grpc_t.base);
    mg_router_set_transport(router, MG_PATH_KAFKA, &kafka_t.base);
    static const char *const kinds[] = {"local-", "peer-", "nobody-", ""};
    mg_msg *msgs[NMANY + 1];
    slot *slots = mg_xcalloc(NMANY + 1, sizeof(*slots));
    void *args[NMANY + 1];
    for (int i = 0; i < NMANY; i++) {
        char id[32], to[32];
        snprintf(id, sizeof(id), "fb-%d", i);
        snprintf(to, sizeof(to), "%s%d", kinds[i % 4], i);
        msgs[i] = msg(id, i % 4 == 3 ? "" : to); /* every fourth: no recipient */
        args[i] = &slots[i];
    }
    mg_router_deliver_from_queue_many(router, msgs, NMANY, later(), slot_answer, args);
    cr_assert_eq(mg_router_drain(router, 20000), 0);
    for (int i = 0; i < NMANY; i++) {
        static const mg_status want[] = {MG_STATUS_DELIVERED, MG_STATUS_DELIVERED, MG_STATUS_STORED,
                                         MG_STATUS_REJECTED};
        cr_assert_eq(atomic_load(&slots[i].calls), 1, "message %d answered once", i);
        cr_assert_eq(slots[i].status, want[i % 4], "message %d: %s", i,
                     mg_status_name(slots[i].status));
    }
    cr_assert_eq(atomic_load(&kafka_t.calls), 0, "a queue delivery never takes a queue path");
    /* Plus one look per stored message, after its store (live_copy): did
     * the user connect meanwhile? */
    cr_assert_eq(atomic_load(&round_trips), 1 + NMANY / 4,
                 "%d messages, one lookup round trip and one per stored message (%d)",
                 NMANY * 3 / 4, atomic_load(&round_trips));

    /* Beyond the bound: the ones over it answer FAILED (transient, the
     * consumer retries them), the others go on. */
    for (int i = 0; i < NMANY; i++)
        atomic_store(&slots[i].calls, 0);
    msgs[NMANY] = msg("fb-extra", "peer-x");
    args[NMANY] = &slots[NMANY];
    mg_router_deliver_from_queue_many(router, msgs, NMANY + 1, later(), slot_answer, args);
    cr_assert_eq(mg_router_drain(router, 20000), 0);
    for (int i = 0; i <= NMANY; i++) {
        cr_assert_eq(atomic_load(&slots[i].calls), 1, "message %d answered once", i);
        if (i == NMANY)
            cr_assert_eq(slots[i].status, MG_STATUS_FAILED, "the one over the bound");
        else
            cr_assert_neq(slots[i].status, MG_STATUS_FAILED, "message %d", i);
    }
    for (int i = 0; i <= NMANY; i++)
        mg_msg_free(msgs[i]);
    free(slots);
    mg_router_free(router);
    mg_pool_free(pool);
    router = make_router(0);
}

/* ---- handed: when a sender may start its next send ---- */

typedef struct probe {
    atomic_int handed, done;
    int completions_at_handed;
    bool handed_before_done;
    mg_status status;
} probe;

static void probe_handed(void *arg)
{
    probe *p = arg;
    p->completions_at_handed = atomic_load(&completions);
    atomic_fetch_add(&p->handed, 1);
}

static void probe_done(void *arg, const mg_send_result *res)
{
    probe *p = arg;
    p->handed_before_done = atomic_load(&p->handed) == 1;
    p->status = res->status;
    atomic_fetch_add(&p->done, 1);
}

/* Sends m with a probe; returns whether handed ran before the send returned. */
static bool probe_send(probe *p, const char *id, const char *to)
{
    memset(p, 0, sizeof(*p));
    atomic_store(&completions, 0);
    mg_msg *m = msg(id, to);
    cr_assert_eq(mg_router_send_handed(router, m, later(), probe_done, probe_handed, p), 0);
    mg_msg_free(m);
    bool early = atomic_load(&p->handed) == 1;
    for (int i = 0; i < 500 && atomic_load(&p->done) == 0; i++) /* 500 x 10 ms */
        usleep(10000);
    cr_assert_eq(atomic_load(&p->done), 1, "%s answered once", id);
    cr_assert_eq(atomic_load(&p->handed), 1, "%s handed once", id);
    cr_assert(p->handed_before_done, "%s: handed before its answer", id);
    return early;
}

Test(route_op, handed_at_an_ordering_hand_off_else_at_the_answer)
{
    probe p;
    kafka_t.delay_ms = 50;
    /* local (queued to the connections) and Kafka (produced): before the answer */
    cr_assert(probe_send(&p, "h-local", "local-bob"), "local: handed at the hub's queue");
    cr_assert_eq(p.status, MG_STATUS_DELIVERED);
    cr_assert(probe_send(&p, "h-kafka", "far-bob"), "kafka: handed at the produce");
    cr_assert_eq(p.status, MG_STATUS_QUEUED);
    /* gRPC direct: separate calls may reorder, so only its answer frees the sender */
    probe_send(&p, "h-grpc", "peer-bob");
    cr_assert_eq(p.status, MG_STATUS_DELIVERED);
    cr_assert_geq(p.completions_at_handed, 1, "gRPC: handed only after the peer answered");
    /* NOT_CONNECTED, a second lookup, the inbox: handed with the answer */
    probe_send(&p, "h-stale", "stale-bob");
    cr_assert_eq(p.status, MG_STATUS_STORED);
    cr_assert_eq(p.completions_at_handed, 2, "second lookup: handed after both attempts");
    /* gRPC failed, then Kafka: a fallback is not a hand-off; nor is the inbox */
    grpc_t.answer = MG_STATUS_FAILED;
    probe_send(&p, "h-fallback", "peer-bob");
    cr_assert_eq(p.status, MG_STATUS_QUEUED);
    cr_assert_eq(p.completions_at_handed, 2, "fallback: handed at the Kafka answer");
    probe_send(&p, "h-inbox", "off-bob"); /* the memory inbox answers at once */
    cr_assert_eq(p.status, MG_STATUS_STORED);
    /* rejected: handed, then the answer */
    probe_send(&p, "h-empty", "");
    cr_assert_eq(p.status, MG_STATUS_REJECTED);
}
