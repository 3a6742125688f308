/* Integration tests of the Sentinel mode of redis_cluster.c (presence and
 * inbox on one primary found through Redis Sentinel) against the real setup
 * of tests/infra/redis-sentinel.sh (one primary, one replica, three
 * Sentinels; MESHGATE_TEST_SENTINEL_NODES / _MASTER): presence and inbox
 * work through it and their keys are on the primary the Sentinels name; bad
 * configuration is a clear error; the primary SIGKILLed: the replica is
 * promoted and presence and inbox work again within the documented time
 * (MG_SENTINEL_RECOVERY_BOUND_MS, README "Redis Sentinel"), with what was
 * acknowledged kept; a planned failover (SENTINEL FAILOVER) is followed
 * through the +switch-master subscription before any call is made.
 *
 * The failover test holds the Sentinel lock exclusively, the others shared
 * (support/mg_sentinel.h). */
#include "common/mg_time.h"
#include "store/redis_store.h"
#include "support/mg_sentinel.h"
#include "support/mg_test.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void setup_shared(void)
{
    mg_sentinel_lock(0);
}

static void setup_exclusive(void)
{
    mg_sentinel_lock(1);
}

TestSuite(sentinel, .init = setup_shared, .fini = mg_sentinel_unlock, .timeout = 60);
TestSuite(sentinel_chaos, .init = setup_exclusive, .fini = mg_sentinel_unlock, .timeout = 180);

static mg_redis_cluster *sentinel_client(int timeout_ms)
{
    char err[512];
    mg_redis_cluster *rc =
        mg_redis_sentinel_create(mg_test_require_env("MESHGATE_TEST_SENTINEL_NODES"),
                                 mg_test_require_env("MESHGATE_TEST_SENTINEL_MASTER"), NULL, NULL,
                                 timeout_ms, err, sizeof(err));
    cr_assert_not_null(rc, "sentinel create: %s", err);
    return rc;
}

/* Whether key exists on the node at addr ("host:port"), asked directly. */
static bool exists_on(const char *addr, const char *key)
{
    char host[128];
    snprintf(host, sizeof(host), "%s", addr);
    char *colon = strrchr(host, ':');
    cr_assert_not_null(colon);
    *colon = '\0';
    struct timeval tv = {5, 0};
    redisContext *c = redisConnectWithTimeout(host, atoi(colon + 1), tv);
    cr_assert(c && !c->err, "connect %s", addr);
    redisReply *r = redisCommand(c, "EXISTS %s", key);
    cr_assert_not_null(r);
    bool yes = r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    freeReplyObject(r);
    redisFree(c);
    return yes;
}

static void store_msg(mg_inbox *ib, const char *id, const char *user, int want)
{
    mg_msg *m =
        mg_msg_new(id, "bob", user, (const uint8_t *)id, strlen(id), "text/plain", 1, MG_PRIO_HIGH);
    cr_assert_eq(ib->ops->store(ib, m), want, "store %s", id);
    mg_msg_free(m);
}

/* The inbox ids of user, in order, joined with ','. */
static void inbox_ids(mg_inbox *ib, const char *user, char *buf, size_t len)
{
    mg_msg **items = NULL;
    size_t n = 0, used = 0;
    buf[0] = '\0';
    cr_assert_eq(ib->ops->fetch(ib, user, 100, &items, &n), 0);
    for (size_t i = 0; i < n; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%s", i ? "," : "", items[i]->id);
    mg_inbox_items_free(items, n);
}

Test(sentinel, presence_and_inbox_on_the_primary)
{
    mg_redis_cluster *rc = sentinel_client(1000);
    char gw[64], user[96], key[160], primary[64], owner[64];
    snprintf(gw, sizeof(gw), "sA-%d", (int)getpid());
    snprintf(user, sizeof(user), "s-user-%d-%lld", (int)getpid(), (long long)mg_mono_us());
    cr_assert_eq(mg_sentinel_infra("primary", primary, sizeof(primary)), 0);
    mg_redis_cluster_slot_owner(rc, 0, owner, sizeof(owner));
    cr_assert_str_eq(owner, primary, "client uses %s, Sentinels name %s", owner, primary);
    mg_redis_cluster_slot_owner(rc, MG_REDIS_SLOTS - 1, owner, sizeof(owner));
    cr_assert_str_eq(owner, primary, "every slot is on the primary");

    mg_presence *p = mg_presence_redis_create(rc, gw, "eu", 30);
    cr_assert_not_null(p);
    cr_assert_eq(p->ops->connect(p, user, "c-1", 42), 0);
    mg_presence_list l = {0};
    cr_assert_eq(p->ops->lookup(p, user, &l), 0);
    cr_assert_eq(l.n, 1);
    cr_expect_str_eq(l.items[0].gateway_id, gw);
    cr_expect_str_eq(l.items[0].conn_id, "c-1");
    mg_presence_list_clear(&l);
    snprintf(key, sizeof(key), "mg:p:{%s}", user);
    cr_expect(exists_on(primary, key), "presence key %s not on the primary %s", key, primary);

    /* The inbox, durable: WAIT for the one replica. */
    mg_inbox *ib = mg_inbox_redis_create_durable(rc, 100, 3600, 1);
    cr_assert_not_null(ib);
    store_msg(ib, "sm1", user, 0);
    store_msg(ib, "sm2", user, 0);
    store_msg(ib, "sm1", user, 0); /* idempotent */
    char ids[256];
    inbox_ids(ib, user, ids, sizeof(ids));
    cr_expect_str_eq(ids, "sm1,sm2");
    snprintf(key, sizeof(key), "mg:i:{%s}", user);
    cr_expect(exists_on(primary, key), "inbox key not on the primary");
    cr_assert_eq(ib->ops->ack(ib, user, "sm1"), 0);
    cr_assert_eq(ib->ops->ack(ib, user, "sm2"), 0);
    inbox_ids(ib, user, ids, sizeof(ids));
    cr_expect_str_eq(ids, "");

    cr_assert_eq(p->ops->disconnect(p, user, "c-1"), 0);
    cr_assert_eq(p->ops->remove_gateway(p), 0);
    mg_inbox_free(ib);
    mg_presence_free(p);
    mg_redis_cluster_free(rc);
}

Test(sentinel, bad_configuration_is_a_clear_error)
{
    char err[512];
    const char *sentinels = mg_test_require_env("MESHGATE_TEST_SENTINEL_NODES");
    /* A master name the Sentinels do not monitor. */
    mg_redis_cluster *rc =
        mg_redis_sentinel_create(sentinels, "no-such-master", NULL, NULL, 1000, err, sizeof(err));
    cr_assert_null(rc);
    cr_expect(strstr(err, "does not know master \"no-such-master\""), "%s", err);
    /* Nothing listening: every Sentinel tried is named. */
    int a = mg_test_free_port(), b = mg_test_free_port();
    char csv[64];
    snprintf(csv, sizeof(csv), "127.0.0.1:%d,127.0.0.1:%d", a, b);
    rc = mg_redis_sentinel_create(csv, "meshgate", NULL, NULL, 500, err, sizeof(err));
    cr_assert_null(rc);
    char want[64];
    snprintf(want, sizeof(want), "tried 127.0.0.1:%d, 127.0.0.1:%d", a, b);
    cr_expect(strstr(err, "no Redis Sentinel") && strstr(err, want), "%s", err);
    /* Malformed addresses and missing arguments. */
    rc = mg_redis_sentinel_create("127.0.0.1", "meshgate", NULL, NULL, 500, err, sizeof(err));
    cr_assert_null(rc);
    cr_expect(strstr(err, "bad node address \"127.0.0.1\""), "%s", err);
    rc = mg_redis_sentinel_create(sentinels, "", NULL, NULL, 500, err, sizeof(err));
    cr_assert_null(rc);
    cr_expect(strstr(err, "master name"), "%s", err);
    /* A Redis node that is no Sentinel. */
    char primary[64];
    cr_assert_eq(mg_sentinel_infra("primary", primary, sizeof(primary)), 0);
    rc = mg_redis_sentinel_create(primary, "meshgate", NULL, NULL, 500, err, sizeof(err));
    cr_assert_null(rc);
    cr_expect(strstr(err, "unusable"), "%s", err);
}

Test(sentinel_chaos, primary_killed_replica_promoted_store_keeps_working)
{
    const int timeout_ms = 1000;
    mg_redis_cluster *rc = sentinel_client(timeout_ms);
    char gw[64], user[96], old[64];
    snprintf(gw, sizeof(gw), "sF-%d", (int)getpid());
    snprintf(user, sizeof(user), "s-fail-%d-%lld", (int)getpid(), (long long)mg_mono_us());

    mg_presence *p = mg_presence_redis_create(rc, gw, "eu", 30);
    cr_assert_not_null(p);
    cr_assert_eq(p->ops->connect(p, user, "f-1", 42), 0);
    mg_inbox *durable = mg_inbox_redis_create_durable(rc, 100, 3600, 1);
    mg_inbox *ib = mg_inbox_redis_create(rc, 100, 3600);
    store_msg(durable, "fm1", user, 0); /* acknowledged by the replica: survives */

    mg_sentinel_kill_primary(old, sizeof(old));
    int64_t t0 = mg_mono_ms(), recovered = -1, worst = 0;
    int failures = 0;
    while (mg_mono_ms() - t0 < 30000) {
        mg_presence_list l = {0};
        int64_t c0 = mg_mono_ms();
        int rv = p->ops->lookup(p, user, &l);
        /* A write too: the new primary takes it (no replica until the old one rejoins). */
        mg_msg *m =
            rv == 0 ? mg_msg_new("fm2", "bob", user, (const uint8_t *)"x", 1, NULL, 1, MG_PRIO_HIGH)
                    : NULL;
        int wrv = m ? ib->ops->store(ib, m) : -1;
        mg_msg_free(m);
        int64_t took = mg_mono_ms() - c0;
        if (took > worst)
            worst = took;
        bool ok = rv == 0 && l.n == 1 && strcmp(l.items[0].conn_id, "f-1") == 0 && wrv == 0;
        mg_presence_list_clear(&l);
        if (ok) {
            recovered = mg_mono_ms() - t0;
            break;
        }
        cr_assert(rv == 0 || rv == -EIO || rv == -ETIMEDOUT, "unexpected rv=%d", rv);
        failures++;
        usleep(100000);
    }
    char now[64];
    mg_sentinel_new_primary(old, now, sizeof(now));
    mg_redis_cluster_stats st;
    mg_redis_cluster_stats_get(rc, &st);
    cr_log_info("sentinel failover: %s -> %s, presence and inbox back after %lld ms, %d failed "
                "rounds, slowest round %lld ms, primary look-ups %llu",
                old, now, (long long)recovered, failures, (long long)worst,
                (unsigned long long)st.refreshes);
    cr_assert_geq(recovered, 0, "presence and inbox not back within 30 s");
    cr_assert_lt(recovered, MG_SENTINEL_RECOVERY_BOUND_MS, "recovery took %lld ms",
                 (long long)recovered);
    cr_assert_str_neq(now, old, "the Sentinels still name the killed primary");
    char owner[64];
    mg_redis_cluster_slot_owner(rc, 0, owner, sizeof(owner));
    cr_assert_str_eq(owner, now, "client uses %s, Sentinels name %s", owner, now);
    /* A round is two calls, each within its budget (plus the last connect). */
    cr_assert_leq(worst, 2 * timeout_ms + 600, "a round took %lld ms", (long long)worst);
    char ids[256];
    inbox_ids(ib, user, ids, sizeof(ids));
    cr_expect_str_eq(ids, "fm1,fm2", "the acknowledged message survived the failover");

    /* The old primary rejoins as a replica in mg_sentinel_unlock. */
    cr_assert_eq(p->ops->remove_gateway(p), 0);
    cr_assert_eq(ib->ops->ack(ib, user, "fm1"), 0);
    cr_assert_eq(ib->ops->ack(ib, user, "fm2"), 0);
    mg_inbox_free(durable);
    mg_inbox_free(ib);
    mg_presence_free(p);
    mg_redis_cluster_free(rc);
}

Test(sentinel_chaos, planned_failover_followed_without_a_call)
{
    mg_redis_cluster *rc = sentinel_client(1000);
    cr_assert_eq(mg_sentinel_infra("wait", NULL, 0), 0, "Sentinel setup not healthy before");
    char old[64], now[64], owner[64];
    cr_assert_eq(mg_sentinel_infra("primary", old, sizeof(old)), 0);
    mg_redis_cluster_slot_owner(rc, 0, owner, sizeof(owner));
    cr_assert_str_eq(owner, old);
    usleep(500 * 1000); /* the subscription is made by the client's own thread */
    int64_t t0 = mg_mono_ms();
    cr_assert_eq(mg_sentinel_infra("failover", NULL, 0), 0);
    /* No command is sent: only the subscription can move the client. */
    int64_t followed = -1;
    while (mg_mono_ms() - t0 < 10000) {
        mg_redis_cluster_slot_owner(rc, 0, owner, sizeof(owner));
        if (strcmp(owner, old) != 0) {
            followed = mg_mono_ms() - t0;
            break;
        }
        usleep(20 * 1000);
    }
    mg_sentinel_new_primary(old, now, sizeof(now));
    cr_log_info("planned failover: %s -> %s, client followed after %lld ms without a call", old,
                now, (long long)followed);
    cr_assert_geq(followed, 0, "the client did not follow +switch-master within 10 s");
    cr_assert_str_eq(owner, now);
    /* And it works there. */
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, "mg:t:{planned}", "SET mg:t:{planned} 1"), 0);
    cr_expect(r->type == REDIS_REPLY_STATUS, "SET on the new primary: %s", r->str);
    freeReplyObject(r);
    cr_assert_eq(mg_redis_cluster_command(rc, &r, "mg:t:{planned}", "DEL mg:t:{planned}"), 0);
    freeReplyObject(r);
    cr_assert_eq(mg_sentinel_infra("wait", NULL, 0), 0, "setup not healthy after the failover");
    mg_redis_cluster_free(rc);
}
