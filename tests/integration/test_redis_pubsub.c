/* The Redis Pub/Sub bus against the real Redis Cluster: two gateways of one
 * region whose near route is forced onto it (--near-route
 * redis-pubsub,inbox, no discovery, no Kafka):
 *   - HIGH is DELIVERED by the target's receipt, LOW ACCEPTED on SPUBLISH;
 *   - a dead target (no subscriber) falls through to the inbox at once;
 *   - garbage published on a gateway's channel is counted and skipped;
 *   - a manual failover of the channel shard's master during traffic loses
 *     nothing that was answered DELIVERED or STORED (what was not confirmed
 *     went to the inbox), and the bus carries messages again after it. The
 *     cluster is failed back to its original masters at the end (others
 *     share it).
 * Isolation: gateway and user names carry the pid.
 */
#include "common/mg_map.h"
#include "common/mg_time.h"
#include "router/transport_redis_pubsub.h"
#include "store/redis_cluster.h"
#include "store/test_redis_util.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ST_DELIVERED MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED
#define ST_STORED    MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED
#define ST_ACCEPTED  MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_ACCEPTED
#define P_PUBSUB     MESHGATE__V1__PATH__PATH_REDIS_PUBSUB
#define P_INBOX      MESHGATE__V1__PATH__PATH_INBOX

static char tag[32];

/* A gateway of region eu on the bus, alone or (svc not NULL) one of svc's
 * fleet on Consul; more: further NULL-terminated flags (later ones win). */
static mg_gw *spawn_with(const char *who, const char *max_bytes, const char *svc,
                         const char *const *more)
{
    char id[64];
    snprintf(id, sizeof(id), "%s-%s", tag, who);
    const char *args[40] = {"--presence", /* these six a fleet gateway has already */
                            "redis-cluster",
                            "--redis-nodes",
                            mg_test_require_env("MESHGATE_TEST_REDIS_NODES"),
                            "--region",
                            "eu",
                            "--redis-pubsub",
                            "true",
                            "--redis-pubsub-max-bytes",
                            max_bytes ? max_bytes : "1048576",
                            "--near-route",
                            "redis-pubsub,inbox",
                            "--log-level",
                            "info",
                            "--outbound-queue", /* bob's inbox replay after the failover */
                            "2048",
                            "--inbox-max-messages", /* keeps every message of the run */
                            "5000",
                            NULL};
    size_t n = 0;
    while (args[n])
        n++;
    for (size_t i = 0; more && more[i] && n < 39; i++)
        args[n++] = more[i];
    mg_gw *gw = svc ? mg_gw_spawn_fleet(id, svc, "eu", args + 6) : mg_gw_spawn(id, args);
    cr_assert_not_null(gw, "gateway %s did not become ready", id);
    return gw;
}

static mg_gw *spawn(const char *who, const char *max_bytes)
{
    return spawn_with(who, max_bytes, NULL, NULL);
}

/* The value of a /metrics sample `name{labels}` (0 when absent). */
static double metric(const mg_gw *gw, const char *name_labels)
{
    char *body = NULL, key[256];
    double v = 0;
    snprintf(key, sizeof(key), "\n%s ", name_labels);
    if (mg_http_get(gw->ws_port, "/metrics", &body) == 200 && body) {
        char *p = strstr(body, key);
        if (p)
            v = strtod(p + strlen(key), NULL);
    }
    free(body);
    return v;
}

typedef struct sent {
    int code, status, path;
    char reason[200];
} sent;

static sent send_msg(mg_grpc_client *c, const char *to, const char *id, int priority)
{
    sent s = {.code = GRPC_STATUS_UNKNOWN};
    Meshgate__V1__SendMessageResponse *r = NULL;
    char *details = NULL;
    s.code = mg_tc_send(c, "alice", to, id, "hello", priority, 10000, &r, &details);
    if (s.code == GRPC_STATUS_OK && r && r->result) {
        s.status = (int)r->result->status;
        s.path = (int)r->result->path;
        snprintf(s.reason, sizeof(s.reason), "%s", r->result->reason ? r->result->reason : "");
    } else {
        snprintf(s.reason, sizeof(s.reason), "grpc %d: %s", s.code, details ? details : "");
    }
    free(details);
    if (r)
        protobuf_c_message_free_unpacked(&r->base, NULL);
    return s;
}

/* ---- a user: one WebSocket connection read by its own thread ------------------- */

typedef struct user {
    char name[64];
    mg_wsc *ws;
    pthread_t th;
    atomic_bool stop;
    pthread_mutex_t mu;
    mg_map *got; /* message id -> (void *)1 */
} user;

static void *user_main(void *arg)
{
    user *u = arg;
    while (!atomic_load(&u->stop)) {
        char *f = mg_wsc_recv_text(u->ws, 100);
        if (!f)
            continue;
        json_t *j = json_loads(f, 0, NULL);
        const char *type = json_string_value(json_object_get(j, "type"));
        const char *id = json_string_value(json_object_get(j, "id"));
        if (type && id && !strcmp(type, "message")) {
            pthread_mutex_lock(&u->mu);
            mg_map_put(u->got, id, (void *)1);
            pthread_mutex_unlock(&u->mu);
        }
        json_decref(j);
        free(f);
    }
    return NULL;
}

static void user_connect(user *u, const mg_gw *gw)
{
    u->ws = mg_wsc_connect_user(gw->ws_port, u->name, 3000, NULL);
    cr_assert_not_null(u->ws, "%s connects to %s", u->name, gw->name);
    atomic_store(&u->stop, false);
    pthread_create(&u->th, NULL, user_main, u);
}

static user *user_new(const char *who, const mg_gw *gw)
{
    user *u = calloc(1, sizeof(*u));
    snprintf(u->name, sizeof(u->name), "%s-%s", tag, who);
    pthread_mutex_init(&u->mu, NULL);
    u->got = mg_map_create(64);
    user_connect(u, gw);
    return u;
}

static void user_disconnect(user *u)
{
    atomic_store(&u->stop, true);
    pthread_join(u->th, NULL);
    mg_wsc_free(u->ws);
    u->ws = NULL;
}

static bool user_got(user *u, const char *id, int timeout_ms)
{
    int64_t end = mg_mono_ms() + timeout_ms;
    for (;;) {
        pthread_mutex_lock(&u->mu);
        bool got = mg_map_get(u->got, id) != NULL;
        pthread_mutex_unlock(&u->mu);
        if (got || mg_mono_ms() >= end)
            return got;
        usleep(20 * 1000);
    }
}

static void user_free(user *u)
{
    if (u->ws)
        user_disconnect(u);
    mg_map_free(u->got);
    pthread_mutex_destroy(&u->mu);
    free(u);
}

/* Sends until one goes by the bus (presence of a fresh connection is
 * written by a worker job, and a fresh subscription may lag); bounded. */
static bool bus_ready(mg_grpc_client *c, user *u)
{
    char id[96];
    for (int i = 0; i < 100; i++) {
        snprintf(id, sizeof(id), "%s-warm-%d", u->name, i);
        sent s = send_msg(c, u->name, id, 1);
        if (s.code == GRPC_STATUS_OK && s.status == ST_DELIVERED && s.path == P_PUBSUB)
            return true;
        usleep(100 * 1000);
    }
    return false;
}

/* Gateways a and b, a client of a, bob on b, a cluster client and b's
 * channel, the bus checked working. */
typedef struct pair {
    mg_gw *a, *b;
    mg_grpc_client *cli;
    user *bob;
    mg_redis_cluster *rc;
    char channel_b[128];
} pair;

static void pair_start(pair *p, const char *prefix, const char *b_max_bytes)
{
    snprintf(tag, sizeof(tag), "%s%d", prefix, (int)getpid());
    p->a = spawn("a", NULL);
    p->b = spawn("b", b_max_bytes);
    p->cli = mg_grpc_client_create(p->a->grpc_addr, NULL);
    p->bob = user_new("bob", p->b);
    cr_assert(bus_ready(p->cli, p->bob), "a HIGH send goes by redis-pubsub");
    char why[256], bid[64];
    snprintf(bid, sizeof(bid), "%s-b", tag);
    mg_pubsub_channel(bid, p->channel_b, sizeof(p->channel_b));
    p->rc = mg_redis_cluster_create(mg_test_require_env("MESHGATE_TEST_REDIS_NODES"), NULL, NULL,
                                    2000, why, sizeof(why));
    cr_assert_not_null(p->rc, "%s", why);
}

static void pair_stop(pair *p)
{
    mg_redis_cluster_free(p->rc);
    user_free(p->bob);
    mg_grpc_client_free(p->cli);
    cr_expect_eq(mg_gw_stop(p->a), 0, "a exits cleanly");
    if (!p->b->exited)
        cr_expect_eq(mg_gw_stop(p->b), 0, "b exits cleanly");
    mg_gw_free(p->a);
    mg_gw_free(p->b);
}

/* A burst of HIGH sends from several threads at once. */
typedef struct burst {
    mg_grpc_client *cli;
    const char *to;
    int thread, delivered_by_bus;
} burst;

#define BURST_THREADS 8
#define BURST_EACH    250

static void *burst_main(void *arg)
{
    burst *b = arg;
    for (int i = 0; i < BURST_EACH; i++) {
        char id[64];
        snprintf(id, sizeof(id), "burst-%d-%d", b->thread, i);
        sent s = send_msg(b->cli, b->to, id, 1);
        b->delivered_by_bus += s.status == ST_DELIVERED && s.path == P_PUBSUB;
    }
    return NULL;
}

/* The cluster is shared: the failover holds the chaos lock of the store
 * tests exclusively, the others shared (tests/store/test_redis_util.h). */
static int lock_fd = -1;

static void lock_shared(void)
{
    lock_fd = tr_lock(0);
}

static void lock_exclusive(void)
{
    lock_fd = tr_lock(1);
}

static void unlock(void)
{
    tr_unlock(lock_fd);
}

TestSuite(redis_pubsub, .init = lock_shared, .fini = unlock, .timeout = 240);
TestSuite(redis_pubsub_failover, .init = lock_exclusive, .fini = unlock, .timeout = 240);

Test(redis_pubsub, high_is_delivered_by_receipt_low_accepted_and_a_dead_target_falls_through)
{
    pair p = {0};
    pair_start(&p, "rp", NULL);
    mg_gw *a = p.a, *b = p.b;
    mg_grpc_client *cli = p.cli;
    user *bob = p.bob;

    sent s = send_msg(cli, bob->name, "rp-high", 1);
    cr_expect_eq(s.code, GRPC_STATUS_OK, "%s", s.reason);
    cr_expect_eq(s.status, ST_DELIVERED, "HIGH: the receipt says delivered (%s)", s.reason);
    cr_expect_eq(s.path, P_PUBSUB);
    cr_expect(user_got(bob, "rp-high", 5000), "bob got the HIGH message");

    s = send_msg(cli, bob->name, "rp-low", 2);
    cr_expect_eq(s.status, ST_ACCEPTED, "LOW: accepted once published (%s)", s.reason);
    cr_expect(user_got(bob, "rp-low", 5000), "bob got the LOW message");
    cr_expect_geq(metric(a, "meshgate_bus_sent_total{bus=\"redis-pubsub\"}"), 2);
    cr_expect_geq(metric(a, "meshgate_bus_receipt_seconds_count{bus=\"redis-pubsub\"}"), 1);
    cr_expect_geq(metric(b, "meshgate_bus_received_total{bus=\"redis-pubsub\"}"), 2);
    cr_expect_eq(metric(a, "meshgate_messages_total{path=\"redis-pubsub\",status=\"accepted\"}"),
                 1);

    /* many at once: a receipt that overtakes its SPUBLISH's reply (the two
     * channels live on different shards) still ends the wait */
    burst bs[BURST_THREADS];
    pthread_t th[BURST_THREADS];
    for (int i = 0; i < BURST_THREADS; i++) {
        bs[i] = (burst){cli, bob->name, i, 0};
        pthread_create(&th[i], NULL, burst_main, &bs[i]);
    }
    int by_bus = 0;
    for (int i = 0; i < BURST_THREADS; i++) {
        pthread_join(th[i], NULL);
        by_bus += bs[i].delivered_by_bus;
    }
    cr_expect_eq(by_bus, BURST_THREADS * BURST_EACH,
                 "every HIGH of the burst DELIVERED by the bus");
    cr_expect_eq(metric(a, "meshgate_bus_late_receipts_total{bus=\"redis-pubsub\"}"), 0);
    cr_expect_eq(metric(a, "meshgate_bus_failed_total{bus=\"redis-pubsub\",reason=\"timeout\"}"),
                 0);

    /* b dies; presence still lists bob there (its lease), nobody listens */
    user_disconnect(bob);
    mg_gw_kill(b, SIGKILL);
    cr_expect(mg_gw_wait(b, 5000));
    double before =
        metric(a, "meshgate_bus_failed_total{bus=\"redis-pubsub\",reason=\"no_subscriber\"}");
    s = send_msg(cli, bob->name, "rp-dead", 1);
    cr_expect_eq(s.status, ST_STORED, "no subscriber: the next step, the inbox (%s)", s.reason);
    cr_expect_eq(s.path, P_INBOX);
    cr_expect_eq(
        metric(a, "meshgate_bus_failed_total{bus=\"redis-pubsub\",reason=\"no_subscriber\"}"),
        before + 1, "SPUBLISH reached 0 subscribers: failed at once, not at the wait's end");
    cr_expect_eq(metric(a, "meshgate_bus_failed_total{bus=\"redis-pubsub\",reason=\"timeout\"}"),
                 0);

    pair_stop(&p);
}

Test(redis_pubsub, garbage_on_a_channel_is_counted_and_skipped)
{
    pair p = {0};
    pair_start(&p, "rq", "4096");
    const char *channel = p.channel_b;
    static char big[10000];
    memset(big, 'x', sizeof(big));
    memcpy(big, "MGP1M", 5);
    const struct {
        const char *data;
        size_t len;
    } bad[] = {
        {"not an envelope", 15},
        {"MGP1M\x01", 6},                                   /* truncated header */
        {"MGP1M\x01\0\0\0\0\0\0\0\x01\0\x01g\xff\xff", 19}, /* header, then no message */
        {"MGP1R\x01", 6},                                   /* truncated receipt */
        {big, sizeof(big)},                                 /* over --redis-pubsub-max-bytes */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        redisReply *r = NULL;
        cr_assert_eq(mg_redis_cluster_command(p.rc, &r, channel, "SPUBLISH %s %b", channel,
                                              bad[i].data, bad[i].len),
                     0);
        cr_expect_eq(r->type, REDIS_REPLY_INTEGER);
        cr_expect_eq(r->integer, 1, "b is subscribed");
        freeReplyObject(r);
    }
    sent s = send_msg(p.cli, p.bob->name, "rq-after", 1);
    cr_expect_eq(s.status, ST_DELIVERED, "the subscription keeps going (%s)", s.reason);
    cr_expect(user_got(p.bob, "rq-after", 5000));
    cr_expect_eq(
        metric(p.b, "meshgate_bus_bad_payloads_total{bus=\"redis-pubsub\",reason=\"undecodable\"}"),
        4);
    cr_expect_eq(
        metric(p.b, "meshgate_bus_bad_payloads_total{bus=\"redis-pubsub\",reason=\"oversized\"}"),
        1);

    pair_stop(&p);
}

/* ---- failover ------------------------------------------------------------------------ */

static redisContext *node(const char *addr)
{
    char host[64];
    int port = 0;
    const char *colon = strrchr(addr, ':');
    snprintf(host, sizeof(host), "%.*s", (int)(colon - addr), addr);
    port = atoi(colon + 1);
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout(host, port, tv);
    cr_assert(c && !c->err, "connect %s", addr);
    redisSetTimeout(c, tv);
    return c;
}

/* "host:port" of a replica of the master at addr, into out. */
static bool replica_of(const char *addr, char *out, size_t len)
{
    redisContext *c = node(addr);
    redisReply *id = redisCommand(c, "CLUSTER MYID");
    redisReply *r = id ? redisCommand(c, "CLUSTER REPLICAS %s", id->str) : NULL;
    bool ok = false;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements > 0) {
        /* "<id> <ip:port@cport> slave ..." */
        const char *line = r->element[0]->str, *sp = strchr(line, ' ');
        const char *at = sp ? strchr(sp + 1, '@') : NULL;
        if (sp && at) {
            snprintf(out, len, "%.*s", (int)(at - sp - 1), sp + 1);
            ok = true;
        }
    }
    if (r)
        freeReplyObject(r);
    if (id)
        freeReplyObject(id);
    redisFree(c);
    return ok;
}

/* Whether the node at addr answers cmd with a reply whose text (the first
 * element of an array) contains want. */
static bool node_says(const char *addr, const char *cmd, const char *want)
{
    redisContext *c = node(addr);
    redisReply *r = redisCommand(c, cmd);
    const redisReply *s = r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 ? r->element[0] : r;
    bool yes = s && s->type == REDIS_REPLY_STRING && strstr(s->str, want);
    if (r)
        freeReplyObject(r);
    redisFree(c);
    return yes;
}

static bool is_master(const char *addr)
{
    return node_says(addr, "ROLE", "master");
}

/* CLUSTER FAILOVER on replica; waits (bounded) until it is a master. */
static bool fail_over_to(const char *replica)
{
    redisContext *c = node(replica);
    redisReply *r = redisCommand(c, "CLUSTER FAILOVER");
    bool ok = r && r->type == REDIS_REPLY_STATUS;
    if (r)
        freeReplyObject(r);
    redisFree(c);
    for (int i = 0; ok && i < 150 && !is_master(replica); i++)
        usleep(100 * 1000);
    return ok && is_master(replica);
}

static bool cluster_ok(const char *addr)
{
    return node_says(addr, "CLUSTER INFO", "cluster_state:ok");
}

#define FAILOVER_MSGS 1500

typedef struct traffic {
    mg_grpc_client *cli;
    const char *to;
    atomic_int sent;
    int status[FAILOVER_MSGS];
    int path[FAILOVER_MSGS];
} traffic;

static void *traffic_main(void *arg)
{
    traffic *tr = arg;
    int64_t end = mg_mono_ms() + 90000;
    for (int i = 0; i < FAILOVER_MSGS && mg_mono_ms() < end; i++) {
        char id[64];
        snprintf(id, sizeof(id), "fo-%d", i);
        sent s = send_msg(tr->cli, tr->to, id, 1);
        tr->status[i] = s.code == GRPC_STATUS_OK ? s.status : -1;
        tr->path[i] = s.path;
        atomic_store(&tr->sent, i + 1);
        usleep(2000);
    }
    return NULL;
}

/* Starts FAILOVER_MSGS HIGH sends to `to` on their own thread; returns once
 * a quarter of them went. */
static traffic *traffic_start(mg_grpc_client *cli, const char *to, pthread_t *th)
{
    traffic *tr = calloc(1, sizeof(*tr));
    tr->cli = cli;
    tr->to = to;
    pthread_create(th, NULL, traffic_main, tr);
    while (atomic_load(&tr->sent) < FAILOVER_MSGS / 4)
        usleep(10 * 1000);
    return tr;
}

/* Every message of tr answered DELIVERED or STORED reaches u: live, or
 * from the inbox on a new connection to gw. Prints the counts; returns how
 * many never arrived. */
static int check_accepted(traffic *tr, user *u, const mg_gw *gw, const char *what)
{
    int n = atomic_load(&tr->sent);
    cr_expect_eq(n, FAILOVER_MSGS, "the traffic ran to its end");
    usleep(500 * 1000);
    user_disconnect(u);
    user_connect(u, gw);
    int delivered = 0, stored = 0, other = 0, missing = 0, by_bus = 0;
    for (int i = 0; i < n; i++) {
        char id[64];
        snprintf(id, sizeof(id), "fo-%d", i);
        delivered += tr->status[i] == ST_DELIVERED;
        stored += tr->status[i] == ST_STORED;
        other += tr->status[i] != ST_DELIVERED && tr->status[i] != ST_STORED;
        by_bus += tr->path[i] == P_PUBSUB;
        if ((tr->status[i] == ST_DELIVERED || tr->status[i] == ST_STORED) &&
            !user_got(u, id, missing ? 0 : 10000)) {
            missing++;
            cr_expect(false, "%s answered %d by path %d never reached %s", id, tr->status[i],
                      tr->path[i], u->name);
        }
    }
    printf("%s: %d sent, %d delivered (%d by redis-pubsub), %d stored, %d other (not accepted), "
           "%d lost\n",
           what, n, delivered, by_bus, stored, other, missing);
    return missing;
}

Test(redis_pubsub_failover, the_channel_shard_fails_over_and_nothing_accepted_is_lost)
{
    pair p = {0};
    pair_start(&p, "rf", NULL);
    mg_gw *b = p.b;
    mg_grpc_client *cli = p.cli;
    user *bob = p.bob;
    const char *channel = p.channel_b;
    char master[96], replica[96];
    mg_redis_cluster_slot_owner(p.rc, mg_redis_key_slot(channel, strlen(channel)), master,
                                sizeof(master));
    cr_assert(replica_of(master, replica, sizeof(replica)), "a replica of %s", master);

    pthread_t th;
    traffic *tr = traffic_start(cli, bob->name, &th);
    bool moved = fail_over_to(replica);
    cr_expect(moved, "%s took over from %s", replica, master);
    pthread_join(th, NULL);

    /* after the failover the bus carries messages again */
    bool again = false;
    for (int i = 0; i < 200 && !again; i++) {
        char id[64];
        snprintf(id, sizeof(id), "fo-after-%d", i);
        sent s = send_msg(cli, bob->name, id, 1);
        again = s.status == ST_DELIVERED && s.path == P_PUBSUB;
        if (!again)
            usleep(100 * 1000);
    }
    cr_expect(again, "redis-pubsub delivers again after the failover");

    int missing = check_accepted(tr, bob, b, "failover");
    printf("failover: b resubscribed %.0f times\n",
           metric(b, "meshgate_bus_resubscribes_total{bus=\"redis-pubsub\"}"));
    cr_expect_eq(missing, 0);

    /* give the shard back to its first master: others share the cluster */
    if (moved)
        cr_expect(fail_over_to(master), "%s is master again", master);
    for (int i = 0; i < 100 && !cluster_ok(master); i++)
        usleep(100 * 1000);
    cr_expect(cluster_ok(master));

    free(tr);
    pair_stop(&p);
}

Test(redis_pubsub, an_unreachable_cluster_at_start_is_a_clear_error)
{
    snprintf(tag, sizeof(tag), "ru%d", (int)getpid());
    int port = mg_test_free_port();
    char nodes[64], id[64];
    snprintf(nodes, sizeof(nodes), "127.0.0.1:%d", port);
    snprintf(id, sizeof(id), "%s-a", tag);
    const char *args[] = {"--redis-pubsub", "true", "--redis-nodes", nodes, NULL};
    mg_gw *gw = mg_gw_spawn_nowait(id, args);
    cr_assert_not_null(gw);
    cr_assert(mg_gw_wait(gw, 20000), "the gateway exits");
    cr_expect_neq(gw->exit_status, 0);
    char want[128];
    snprintf(want, sizeof(want), "redis-pubsub: no Redis Cluster node reachable (tried %s)", nodes);
    cr_expect(mg_gw_log_contains(gw, want), "the log names the nodes tried");
    mg_gw_free(gw);

    const char *no_nodes[] = {"--redis-pubsub", "true", NULL};
    snprintf(id, sizeof(id), "%s-b", tag);
    gw = mg_gw_spawn_nowait(id, no_nodes);
    cr_assert(mg_gw_wait(gw, 20000));
    cr_expect_neq(gw->exit_status, 0);
    cr_expect(mg_gw_log_contains(gw, "--redis-pubsub needs --redis-nodes"));
    mg_gw_free(gw);
}

/* ---- mixed fleets ----------------------------------------------------------------- */

Test(redis_pubsub, a_sender_takes_the_bus_only_to_gateways_that_consume_it)
{
    snprintf(tag, sizeof(tag), "rm%d", (int)getpid());
    char svc[64], bid[64], cid[64];
    snprintf(svc, sizeof(svc), "meshgate-%s", tag);
    snprintf(bid, sizeof(bid), "%s-b", tag);
    snprintf(cid, sizeof(cid), "%s-c", tag);
    const char *more[] = {"--near-route", "redis-pubsub,grpc,inbox", NULL, NULL, NULL};
    mg_gw *a = spawn_with("a", NULL, svc, more), *b = spawn_with("b", NULL, svc, more);
    more[2] = "--redis-pubsub"; /* c stays off the bus */
    more[3] = "false";
    mg_gw *c = spawn_with("c", NULL, svc, more);
    cr_assert(mg_gw_wait_peer(a, bid, 20000) && mg_gw_wait_peer(a, cid, 20000), "a lists b and c");
    cr_expect(mg_gw_peer_has_buses(a, bid, "grpc,redis-pubsub"), "b advertises the bus");
    cr_expect(mg_gw_peer_has_buses(a, cid, "grpc"), "c does not");

    mg_grpc_client *cli = mg_grpc_client_create(a->grpc_addr, NULL);
    user *bob = user_new("bob", b), *carol = user_new("carol", c);
    cr_assert(bus_ready(cli, bob), "to b: redis-pubsub");
    sent s = {0};
    for (int i = 0; i < 100 && s.status != ST_DELIVERED; i++) { /* carol's presence lands */
        char id[64];
        snprintf(id, sizeof(id), "rm-carol-%d", i);
        s = send_msg(cli, carol->name, id, 1);
        if (s.status != ST_DELIVERED)
            usleep(100 * 1000);
    }
    cr_expect_eq(s.status, ST_DELIVERED, "%s", s.reason);
    cr_expect_eq(s.path, MESHGATE__V1__PATH__PATH_GRPC, "to c: the bus is skipped, gRPC direct");
    cr_expect_eq(
        metric(a, "meshgate_bus_failed_total{bus=\"redis-pubsub\",reason=\"no_subscriber\"}"), 0,
        "c's channel was never tried");

    /* migration: b leaves the bus under traffic (restarted without it) */
    pthread_t th;
    traffic *tr = traffic_start(cli, bob->name, &th);
    user_disconnect(bob);
    cr_expect_eq(mg_gw_stop(b), 0, "b exits cleanly");
    mg_gw_free(b);
    b = spawn_with("b", NULL, svc, more); /* now with --redis-pubsub false */
    user_connect(bob, b);
    pthread_join(th, NULL);
    bool moved = false;
    for (int i = 0; i < 200 && !moved; i++) {
        moved = mg_gw_peer_has_buses(a, bid, "grpc");
        if (!moved)
            usleep(100 * 1000);
    }
    cr_expect(moved, "a sees b's new buses");
    s = send_msg(cli, bob->name, "rm-after", 1);
    cr_expect_eq(s.path, MESHGATE__V1__PATH__PATH_GRPC, "b off the bus: gRPC direct (%s)",
                 s.reason);
    cr_expect_eq(check_accepted(tr, bob, b, "migration"), 0);
    cr_expect_eq(tr->path[0], P_PUBSUB, "the first messages went by the bus");
    free(tr);

    user_free(bob);
    user_free(carol);
    mg_grpc_client_free(cli);
    mg_gw *all[] = {a, b, c};
    for (int i = 0; i < 3; i++) {
        cr_expect_eq(mg_gw_stop(all[i]), 0, "%s exits cleanly", all[i]->name);
        mg_gw_free(all[i]);
    }
}
