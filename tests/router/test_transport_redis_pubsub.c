/* Unit tests for transport_redis_pubsub.c against the real Redis Cluster
 * (the shared one of tests/infra): two transports in this process, each
 * with its own router and a scripted local sink, so the receipt carries
 * exactly what the receiving side's local transport answered (DELIVERED,
 * a duplicate, NOT_CONNECTED); LOW answers ACCEPTED; a channel without a
 * subscriber fails at once; an oversized message is refused; stop fails a
 * wait at once and refuses new sends. Gateways over the bus are exercised by
 * tests/integration/test_redis_pubsub.c. */
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "router/router.h"
#include "router/transport_redis_pubsub.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "store/redis_cluster.h"
#include "store/test_redis_util.h"
#include "support/mg_test.h"
#include "support/mg_wait.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static atomic_int online; /* connections every sink has for any user */

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    int n = atomic_load(&online);
    if (n && written)
        written(written_arg, (uint32_t)n);
    return n;
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return 0;
}

typedef struct side {
    char id[64];
    mg_router *router;
    mg_transport *bus; /* owned by the router */
} side;

static mg_redis_cluster *rc;
static side A, B;
static int lock_fd = -1; /* shared: no failover or resharding meanwhile */

static void side_start(side *s, const char *who, size_t max_bytes)
{
    snprintf(s->id, sizeof(s->id), "ut-%s-%d", who, (int)getpid());
    mg_router_config cfg = {s->id, "eu", 10, 1000, 128, 1024, 0, NULL, 0};
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    s->router = mg_router_create(&cfg, mg_presence_memory_create(s->id, "eu"),
                                 mg_inbox_memory_create(10, 3600), &sink, NULL);
    mg_transport_redis_pubsub_config pcfg = {
        .gateway_id = s->id, .cluster = rc, .timeout_ms = 5000, .max_bytes = max_bytes};
    s->bus = mg_transport_redis_pubsub_create(&pcfg);
    mg_router_set_transport(s->router, MG_PATH_REDIS_PUBSUB, s->bus);
    char err[256];
    cr_assert_eq(mg_transport_redis_pubsub_start(s->bus, s->router, err, sizeof(err)), 0, "%s",
                 err);
}

static void setup(void)
{
    char why[256];
    lock_fd = tr_lock(0);
    rc = mg_redis_cluster_create(mg_test_require_env("MESHGATE_TEST_REDIS_NODES"), NULL, NULL, 2000,
                                 why, sizeof(why));
    cr_assert_not_null(rc, "%s", why);
    atomic_store(&online, 1);
    side_start(&A, "a", 0);
    side_start(&B, "b", 0);
}

static void teardown(void)
{
    mg_router_free(A.router);
    mg_router_free(B.router);
    mg_redis_cluster_free(rc);
    mg_metrics_shutdown();
    tr_unlock(lock_fd);
}

TestSuite(transport_redis_pubsub, .init = setup, .fini = teardown, .timeout = 60);

static mg_msg *msg(const char *id, size_t len, mg_priority prio)
{
    static uint8_t body[4096];
    memset(body, 'x', sizeof(body));
    return mg_msg_new(id, "alice", "bob", body, len, "text/plain", mg_now_ms(), prio);
}

static int send_to(const char *gw, const char *id, mg_priority prio, mg_deliver_outcome *out)
{
    mg_msg *m = msg(id, 2, prio);
    mg_route_target target = {gw, "eu"};
    int rc2 = mg_wait_deliver(A.bus, &target, m, mg_mono_ms() + 5000, out);
    mg_msg_free(m);
    return rc2;
}

Test(transport_redis_pubsub, a_receipt_carries_the_receivers_local_outcome)
{
    mg_deliver_outcome out;
    cr_assert_eq(send_to(B.id, "u1", MG_PRIO_HIGH, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_DELIVERED, "%s", out.reason);
    cr_expect_eq(out.connections, 1);
    cr_expect_not(out.duplicate);

    cr_assert_eq(send_to(B.id, "u1", MG_PRIO_HIGH, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_DELIVERED, "a retry is answered");
    cr_expect(out.duplicate, "but not written twice (the receiver's dedupe window)");

    atomic_store(&online, 0);
    cr_assert_eq(send_to(B.id, "u2", MG_PRIO_HIGH, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect(out.not_connected, "NOT_CONNECTED comes back: the router resolves again");

    atomic_store(&online, 1);
    cr_assert_eq(send_to(B.id, "u3", MG_PRIO_LOW, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_ACCEPTED, "LOW: published to a subscriber");
}

Test(transport_redis_pubsub, a_channel_without_subscriber_fails_at_once)
{
    mg_deliver_outcome out;
    char nobody[64];
    snprintf(nobody, sizeof(nobody), "ut-nobody-%d", (int)getpid());
    int64_t t0 = mg_mono_ms();
    cr_assert_eq(send_to(nobody, "n1", MG_PRIO_HIGH, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect(strstr(out.reason, "no subscriber"), "%s", out.reason);
    cr_expect_lt(mg_mono_ms() - t0, 2500, "not at the end of the 5 s receipt wait");
}

static atomic_int stopped_outcome = -1;

static void on_done(void *arg, const mg_deliver_outcome *out)
{
    atomic_store(&stopped_outcome, (int)out->status);
}

Test(transport_redis_pubsub, oversized_is_refused_and_stop_ends_every_wait)
{
    mg_router_free(B.router);
    side_start(&B, "b2", 512);
    mg_msg *big = msg("big", 1000, MG_PRIO_HIGH);
    mg_route_target target = {A.id, "eu"};
    mg_deliver_outcome out;
    cr_expect_eq(mg_wait_deliver(B.bus, &target, big, mg_mono_ms() + 5000, &out), -EMSGSIZE);
    mg_msg_free(big);

    /* a subscriber that never answers: the wait is ended by stop, not the timeout */
    char silent[64], channel[128], owner[96];
    snprintf(silent, sizeof(silent), "ut-silent-%d", (int)getpid());
    mg_pubsub_channel(silent, channel, sizeof(channel));
    mg_redis_cluster_slot_owner(rc, mg_redis_key_slot(channel, strlen(channel)), owner,
                                sizeof(owner));
    char *colon = strrchr(owner, ':');
    *colon = '\0';
    redisContext *sub = redisConnect(owner, atoi(colon + 1));
    cr_assert(sub && !sub->err);
    redisReply *r = redisCommand(sub, "SSUBSCRIBE %s", channel);
    cr_assert_not_null(r);
    freeReplyObject(r);

    mg_msg *m = msg("w1", 2, MG_PRIO_HIGH);
    mg_route_target quiet = {silent, "eu"};
    cr_assert_eq(B.bus->ops->deliver(B.bus, &quiet, m, mg_mono_ms() + 30000, on_done, NULL), 0);
    usleep(200 * 1000);
    cr_expect_eq(atomic_load(&stopped_outcome), -1, "still waiting for the receipt");
    int64_t t0 = mg_mono_ms();
    mg_transport_redis_pubsub_stop(B.bus);
    cr_expect_eq(atomic_load(&stopped_outcome), MG_STATUS_FAILED, "stop ended the wait");
    cr_expect_lt(mg_mono_ms() - t0, 1500);
    cr_expect_not(mg_transport_redis_pubsub_subscribed(B.bus));
    cr_expect_eq(B.bus->ops->deliver(B.bus, &quiet, m, mg_mono_ms() + 1000, on_done, NULL),
                 -ESHUTDOWN);
    mg_msg_free(m);
    redisFree(sub);
}
