/* Integration tests of the Redis Cluster client against the real 6-node
 * cluster (tests/infra/redis-cluster.sh): routing over all masters, single
 * and pipelined commands, AUTH with an ACL user, Redis unreachable at start,
 * a hung node (calls fail within the timeout). */
#include "test_redis_util.h"

#include <errno.h>
#include <pthread.h>

Test(redis_cluster, routes_to_every_master)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    char owners[3][64] = {{0}};
    int counts[3] = {0}, nown = 0;
    char key[64];
    for (int i = 0; i < 300; i++) {
        snprintf(key, sizeof(key), "mgt:spread:{u%d-%d}", (int)getpid(), i);
        redisReply *r = NULL;
        cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "SET %s %d EX 60", key, i), 0);
        cr_assert_eq(r->type, REDIS_REPLY_STATUS, "%s", r->str);
        freeReplyObject(r);
        char owner[64];
        tr_owner(rc, key, owner, sizeof(owner));
        int k;
        for (k = 0; k < nown && strcmp(owners[k], owner) != 0; k++)
            ;
        cr_assert_lt(k, 3, "more than 3 masters?");
        if (k == nown)
            snprintf(owners[nown++], 64, "%s", owner);
        counts[k]++;
        if (i % 50 == 0) { /* the key physically lives on that master */
            redisContext *c = tr_direct(owner);
            redisReply *e = redisCommand(c, "EXISTS %s", key);
            cr_assert_eq(e->integer, 1, "%s not on %s", key, owner);
            freeReplyObject(e);
            redisFree(c);
        }
    }
    cr_assert_eq(nown, 3, "keys landed on %d masters", nown);
    for (int k = 0; k < 3; k++)
        cr_assert_gt(counts[k], 50, "master %s got only %d of 300 keys", owners[k], counts[k]);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(redis_cluster, pipelined_batch_over_nodes)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_redis_batch *b = mg_redis_batch_new();
    mg_redis_batch_reserve(b, 300); /* less than it takes: grows past it */
    char key[64];
    for (int i = 0; i < 500; i++) {
        snprintf(key, sizeof(key), "mgt:batch:{%d-%d}", (int)getpid(), i);
        mg_redis_batch_add(b, key, "SET %s v%d EX 60", key, i);
    }
    cr_assert_eq(mg_redis_cluster_exec(rc, b), 0);
    mg_redis_batch_reserve(b, 500); /* exactly what follows */
    for (int i = 0; i < 500; i++) {
        snprintf(key, sizeof(key), "mgt:batch:{%d-%d}", (int)getpid(), i);
        mg_redis_batch_add(b, key, "GET %s", key);
    }
    cr_assert_eq(mg_redis_cluster_exec(rc, b), 0); /* runs only the 500 new ones */
    for (int i = 0; i < 500; i++) {
        redisReply *r = mg_redis_batch_reply(b, 500 + (size_t)i);
        char want[16];
        snprintf(want, sizeof(want), "v%d", i);
        cr_assert_eq(mg_redis_batch_status(b, 500 + (size_t)i), 0);
        cr_assert_eq(r->type, REDIS_REPLY_STRING);
        cr_assert_str_eq(r->str, want, "reply %d out of order", i);
    }
    /* an error reply is a reply, not a failure of the batch */
    mg_redis_batch_add(b, "mgt:x", "HGET %s", "mgt:x");
    cr_assert_eq(mg_redis_cluster_exec(rc, b), 0);
    cr_assert_eq(mg_redis_batch_reply(b, 1000)->type, REDIS_REPLY_ERROR);
    mg_redis_batch_free(b);

    /* keyless command goes to some master */
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, NULL, "PING"), 0);
    cr_assert_str_eq(r->str, "PONG");
    freeReplyObject(r);
    mg_redis_cluster_stats st;
    mg_redis_cluster_stats_get(rc, &st);
    cr_assert_geq(st.commands, 1002);
    cr_assert_lt(st.reconnects, 20, "pool should reuse connections (%llu opened)",
                 (unsigned long long)st.reconnects);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

struct mt {
    mg_redis_cluster *rc;
    int id, fails;
};

static void *mt_run(void *arg)
{
    struct mt *m = arg;
    char key[64], val[32];
    for (int i = 0; i < 300; i++) {
        snprintf(key, sizeof(key), "mgt:mt:{%d-%d-%d}", (int)getpid(), m->id, i);
        snprintf(val, sizeof(val), "%d-%d", m->id, i);
        redisReply *r = NULL;
        if (mg_redis_cluster_command(m->rc, &r, key, "SET %s %s EX 60", key, val) != 0) {
            m->fails++;
            continue;
        }
        freeReplyObject(r);
        if (mg_redis_cluster_command(m->rc, &r, key, "GET %s", key) != 0) {
            m->fails++;
            continue;
        }
        if (r->type != REDIS_REPLY_STRING || strcmp(r->str, val) != 0)
            m->fails++;
        freeReplyObject(r);
    }
    return NULL;
}

Test(redis_cluster, concurrent_callers)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    pthread_t th[8];
    struct mt m[8];
    for (int i = 0; i < 8; i++) {
        m[i] = (struct mt){.rc = rc, .id = i};
        pthread_create(&th[i], NULL, mt_run, &m[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(m[i].fails, 0, "thread %d: %d failures", i, m[i].fails);
    }
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(redis_cluster, unreachable_at_start_is_a_clear_error)
{
    int p1 = mg_test_free_port(), p2 = mg_test_free_port();
    char nodes[64], err[512], a1[32], a2[32];
    snprintf(nodes, sizeof(nodes), "127.0.0.1:%d,127.0.0.1:%d", p1, p2);
    snprintf(a1, sizeof(a1), "127.0.0.1:%d", p1);
    snprintf(a2, sizeof(a2), "127.0.0.1:%d", p2);
    int64_t t0 = mg_mono_ms();
    mg_redis_cluster *rc = mg_redis_cluster_create(nodes, NULL, NULL, 500, err, sizeof(err));
    cr_assert_null(rc);
    cr_assert_lt(mg_mono_ms() - t0, 1500);
    cr_assert(strstr(err, "no Redis Cluster node reachable"), "%s", err);
    cr_assert(strstr(err, a1) && strstr(err, a2), "error must list the nodes tried: %s", err);
    cr_assert(strstr(err, "refused"), "error must say why: %s", err);
}

Test(redis_cluster, first_dead_seed_is_skipped)
{
    int lk = tr_lock(0);
    char nodes[512], err[512];
    snprintf(nodes, sizeof(nodes), "127.0.0.1:%d,%s", mg_test_free_port(), tr_nodes());
    mg_redis_cluster *rc = mg_redis_cluster_create(nodes, NULL, NULL, 1000, err, sizeof(err));
    cr_assert_not_null(rc, "%s", err);
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, "mgt:seed", "SET mgt:seed 1 EX 10"), 0);
    freeReplyObject(r);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(redis_cluster, auth_acl_user_and_password)
{
    int lk = tr_lock(0);
    char user[32], err[512];
    snprintf(user, sizeof(user), "mgtest%d", (int)getpid());
    tr_acl_user(user, "s3cret", TR_ACL_ALL);
    mg_redis_cluster *rc =
        mg_redis_cluster_create(tr_nodes(), user, "s3cret", 1000, err, sizeof(err));
    cr_assert_not_null(rc, "%s", err);
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, NULL, "ACL WHOAMI"), 0);
    cr_assert_str_eq(r->str, user);
    freeReplyObject(r);
    mg_redis_cluster_free(rc);

    rc = mg_redis_cluster_create(tr_nodes(), user, "wrong", 1000, err, sizeof(err));
    cr_assert_null(rc);
    cr_assert(strstr(err, "AUTH refused"), "%s", err);
    /* a password where the server has none */
    rc = mg_redis_cluster_create(tr_nodes(), NULL, "nopass", 1000, err, sizeof(err));
    cr_assert_null(rc);
    cr_assert(strstr(err, "AUTH refused"), "%s", err);
    tr_acl_user(user, NULL, TR_ACL_DEL);
    tr_unlock(lk);
}

Test(redis_cluster, hung_node_fails_within_timeout, .timeout = 30)
{
    int lk = tr_lock(1);
    mg_redis_cluster *rc = tr_cluster(300);
    const char *key = "mgt:hung:{x}";
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "SET %s 1 EX 30", key), 0);
    freeReplyObject(r);
    char owner[64];
    tr_owner(rc, key, owner, sizeof(owner));
    /* the owner stops answering clients for 1.5 s (less than the cluster's
     * node timeout, so no failover) */
    redisContext *c = tr_direct(owner);
    r = redisCommand(c, "CLIENT PAUSE 1500 ALL");
    cr_assert(r && r->type == REDIS_REPLY_STATUS, "CLIENT PAUSE: %s", r ? r->str : c->errstr);
    freeReplyObject(r);
    int64_t t0 = mg_mono_ms();
    int rv = mg_redis_cluster_command(rc, &r, key, "GET %s", key);
    int64_t took = mg_mono_ms() - t0;
    cr_assert_eq(rv, -ETIMEDOUT, "rv=%d", rv);
    cr_assert_null(r);
    cr_assert_geq(took, 250);
    cr_assert_lt(took, 700, "took %lld ms for a 300 ms budget", (long long)took);
    redisFree(c);
    /* and it recovers by itself once the node answers again */
    int ok = 0;
    for (int i = 0; i < 50 && !ok; i++) {
        if (mg_redis_cluster_command(rc, &r, key, "GET %s", key) == 0) {
            ok = r->type == REDIS_REPLY_STRING && strcmp(r->str, "1") == 0;
            freeReplyObject(r);
        } else {
            usleep(100000);
        }
    }
    cr_assert(ok, "no recovery after the pause");
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}
