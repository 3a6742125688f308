/* Integration tests of presence_redis.c against the real Redis Cluster:
 * several devices on several gateways, pipelined batch lookups, gateway
 * leases (a gateway that stops renewing drops out within its lease and its
 * keys expire), graceful removal, key spread, huge ids rejected. */
#include "store/redis_store.h"
#include "common/mg_alloc.h"
#include "test_redis_util.h"

#include <errno.h>

static char gwname[64];

static const char *gw(const char *tag)
{
    snprintf(gwname, sizeof(gwname), "t%s-%d-%lld", tag, (int)getpid(), (long long)mg_mono_us());
    return gwname;
}

static const mg_conn_ref *find(const mg_presence_list *l, const char *conn)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->items[i].conn_id, conn) == 0)
            return &l->items[i];
    return NULL;
}

Test(presence_redis, devices_on_several_gateways)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_presence *a = mg_presence_redis_create(rc, gw("A"), "eu", 30);
    char gwa[64];
    snprintf(gwa, sizeof(gwa), "%s", gwname);
    mg_presence *b = mg_presence_redis_create(rc, gw("B"), "us", 30);
    char gwb[64];
    snprintf(gwb, sizeof(gwb), "%s", gwname);
    cr_assert(a && b);
    char user[64];
    snprintf(user, sizeof(user), "alice-%d", (int)getpid());
    cr_assert_eq(a->ops->connect(a, user, "a-1", 1000), 0);
    cr_assert_eq(a->ops->connect(a, user, "a-2", 2000), 0);
    cr_assert_eq(b->ops->connect(b, user, "b-1", 3000), 0);

    mg_presence_list l = {0};
    cr_assert_eq(b->ops->lookup(b, user, &l), 0);
    cr_assert_eq(l.n, 3);
    const mg_conn_ref *c = find(&l, "a-2");
    cr_assert_not_null(c);
    cr_assert_str_eq(c->gateway_id, gwa);
    cr_assert_str_eq(c->region, "eu");
    cr_assert_eq(c->connected_at_ms, 2000);
    c = find(&l, "b-1");
    cr_assert_str_eq(c->gateway_id, gwb);
    cr_assert_str_eq(c->region, "us");
    mg_presence_list_clear(&l);

    cr_assert_eq(a->ops->disconnect(a, user, "a-2"), 0);
    cr_assert_eq(a->ops->lookup(a, user, &l), 0);
    cr_assert_eq(l.n, 2);
    cr_assert_null(find(&l, "a-2"));
    mg_presence_list_clear(&l);

    /* unknown user: nothing, no error */
    cr_assert_eq(a->ops->lookup(a, "nobody-ever-here", &l), 0);
    cr_assert_eq(l.n, 0);

    /* graceful shutdown of A removes only A's entries */
    cr_assert_eq(a->ops->remove_gateway(a), 0);
    cr_assert_eq(b->ops->lookup(b, user, &l), 0);
    cr_assert_eq(l.n, 1);
    cr_assert_str_eq(l.items[0].conn_id, "b-1");
    mg_presence_list_clear(&l);
    cr_assert_eq(b->ops->remove_gateway(b), 0);
    cr_assert_eq(b->ops->lookup(b, user, &l), 0);
    cr_assert_eq(l.n, 0);
    mg_presence_free(a);
    mg_presence_free(b);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(presence_redis, batch_lookup_and_spread_over_masters)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_presence *p = mg_presence_redis_create(rc, gw("S"), "eu", 30);
    enum { N = 300 };
    char *users[N];
    char owners[3][64] = {{0}};
    int nown = 0, counts[3] = {0};
    for (int i = 0; i < N; i++) {
        users[i] = mg_xasprintf("spread-%d-%d", (int)getpid(), i);
        if (i % 2 == 0)
            cr_assert_eq(p->ops->connect(p, users[i], "c1", i), 0);
        char key[128], owner[64];
        snprintf(key, sizeof(key), "mg:p:{%s}", users[i]);
        tr_owner(rc, key, owner, sizeof(owner));
        int k;
        for (k = 0; k < nown && strcmp(owners[k], owner) != 0; k++)
            ;
        if (k == nown)
            snprintf(owners[nown++], 64, "%s", owner);
        counts[k]++;
    }
    cr_assert_eq(nown, 3, "user keys on %d masters", nown);
    for (int k = 0; k < 3; k++)
        cr_assert_gt(counts[k], 50, "%s holds %d of %d user keys", owners[k], counts[k], N);
    /* each master really holds its share (EXISTS on the master itself) */
    for (int k = 0; k < 3; k++) {
        redisContext *c = tr_direct(owners[k]);
        int here = 0;
        for (int i = 0; i < N; i += 2) {
            char key[128], owner[64];
            snprintf(key, sizeof(key), "mg:p:{%s}", users[i]);
            mg_redis_cluster_slot_owner(rc, mg_redis_key_slot(key, strlen(key)), owner,
                                        sizeof(owner));
            if (strcmp(owner, owners[k]) != 0)
                continue;
            redisReply *r = redisCommand(c, "EXISTS %s", key);
            cr_assert_eq(r->integer, 1);
            freeReplyObject(r);
            here++;
        }
        cr_assert_gt(here, 20);
        redisFree(c);
    }
    mg_presence_list outs[N];
    memset(outs, 0, sizeof(outs));
    cr_assert_eq(p->ops->lookup_batch(p, (const char *const *)users, N, outs), 0);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(outs[i].n, i % 2 == 0 ? 1u : 0u, "user %d", i);
        if (i % 2 == 0)
            cr_assert_eq(outs[i].items[0].connected_at_ms, i);
        mg_presence_list_clear(&outs[i]);
    }
    cr_assert_eq(p->ops->remove_gateway(p), 0);
    for (int i = 0; i < N; i++)
        free(users[i]);
    mg_presence_free(p);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(presence_redis, dead_gateway_vanishes_within_lease, .timeout = 60)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    /* the "crashing" gateway: lease 2 s, never renewed, never cleaned up */
    mg_presence *dead = mg_presence_redis_create(rc, gw("D"), "eu", 2);
    int64_t lease_written = mg_mono_ms();
    mg_presence *live = mg_presence_redis_create(rc, gw("L"), "eu", 30);
    char user[64], key[96];
    snprintf(user, sizeof(user), "lease-%d", (int)getpid());
    snprintf(key, sizeof(key), "mg:p:{%s}", user);
    cr_assert_eq(dead->ops->connect(dead, user, "d-1", 1), 0);
    cr_assert_eq(live->ops->connect(live, user, "l-1", 2), 0);

    /* the user key expires by itself: TTL <= 3 x lease of the last writer */
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "PTTL %s", key), 0);
    cr_assert(r->integer > 0 && r->integer <= 90000, "pttl %lld", r->integer);
    freeReplyObject(r);

    mg_presence_list l = {0};
    cr_assert_eq(live->ops->lookup(live, user, &l), 0);
    cr_assert_eq(l.n, 2);
    mg_presence_list_clear(&l);
    int64_t gone_at = -1;
    while (mg_mono_ms() - lease_written < 4000) {
        cr_assert_eq(live->ops->lookup(live, user, &l), 0);
        int has_dead = find(&l, "d-1") != NULL;
        cr_assert_not_null(find(&l, "l-1"), "the live gateway's entry must stay");
        mg_presence_list_clear(&l);
        if (!has_dead) {
            gone_at = mg_mono_ms() - lease_written;
            break;
        }
        usleep(50000);
    }
    cr_assert_geq(gone_at, 0, "dead gateway still returned after 4 s (lease 2 s)");
    cr_assert_leq(gone_at, 2000 + 100, "dead gateway returned for %lld ms (lease 2000 ms)",
                  (long long)gone_at);
    /* and the lookup removed the dead entry from Redis */
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "HEXISTS %s d-1", key), 0);
    cr_assert_eq(r->integer, 0);
    freeReplyObject(r);
    mg_presence_free(dead); /* crashed: no remove_gateway */
    cr_assert_eq(live->ops->remove_gateway(live), 0);
    mg_presence_free(live);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(presence_redis, renew_keeps_entries_and_keys_expire_unread, .timeout = 60)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_presence *g = mg_presence_redis_create(rc, gw("R"), "eu", 1);
    mg_presence *reader = mg_presence_redis_create(rc, gw("Q"), "eu", 30);
    char user[64], key[96];
    snprintf(user, sizeof(user), "renew-%d", (int)getpid());
    snprintf(key, sizeof(key), "mg:p:{%s}", user);
    cr_assert_eq(g->ops->connect(g, user, "r-1", 1), 0);
    /* renewed every lease/3 for 3 leases: still there */
    for (int i = 0; i < 9; i++) {
        usleep(333000);
        cr_assert_eq(g->ops->renew(g), 0);
    }
    mg_presence_list l = {0};
    cr_assert_eq(reader->ops->lookup(reader, user, &l), 0);
    cr_assert_eq(l.n, 1);
    mg_presence_list_clear(&l);
    /* renew re-asserts an entry lost in Redis (e.g. by a failover) */
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "DEL %s", key), 0);
    freeReplyObject(r);
    cr_assert_eq(g->ops->renew(g), 0);
    cr_assert_eq(reader->ops->lookup(reader, user, &l), 0);
    cr_assert_eq(l.n, 1);
    mg_presence_list_clear(&l);
    /* renew does not resurrect a connection closed meanwhile */
    cr_assert_eq(g->ops->disconnect(g, user, "r-1"), 0);
    cr_assert_eq(g->ops->connect(g, user, "r-2", 2), 0);
    cr_assert_eq(g->ops->renew(g), 0);
    cr_assert_eq(reader->ops->lookup(reader, user, &l), 0);
    cr_assert_eq(l.n, 1);
    cr_assert_str_eq(l.items[0].conn_id, "r-2");
    mg_presence_list_clear(&l);
    /* the gateway dies; nobody reads: the key leaves Redis within 3 x lease */
    mg_presence_free(g);
    int64_t t0 = mg_mono_ms();
    int exists = 1;
    while (exists && mg_mono_ms() - t0 < 5000) {
        cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "EXISTS %s", key), 0);
        exists = (int)r->integer;
        freeReplyObject(r);
        if (exists)
            usleep(100000);
    }
    cr_assert_eq(exists, 0, "user key still in Redis %lld ms after the last renew",
                 (long long)(mg_mono_ms() - t0));
    cr_assert_leq(mg_mono_ms() - t0, 3000 + 200);
    cr_assert_eq(reader->ops->remove_gateway(reader), 0);
    mg_presence_free(reader);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(presence_redis, huge_and_empty_ids_rejected)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_presence *p = mg_presence_redis_create(rc, gw("H"), "eu", 30);
    size_t big = 1 << 20;
    char *huge = malloc(big + 1);
    memset(huge, 'u', big);
    huge[big] = '\0';
    mg_presence_list l = {0};
    cr_assert_eq(p->ops->connect(p, huge, "c", 1), -EINVAL);
    cr_assert_eq(p->ops->connect(p, "ok", huge, 1), -EINVAL);
    cr_assert_eq(p->ops->lookup(p, huge, &l), -EINVAL);
    cr_assert_eq(p->ops->disconnect(p, huge, "c"), -EINVAL);
    const char *users[] = {"fine", huge};
    mg_presence_list outs[2] = {{0}};
    cr_assert_eq(p->ops->lookup_batch(p, users, 2, outs), -EINVAL);
    huge[MG_REDIS_MAX_ID + 1] = '\0';
    cr_assert_eq(p->ops->connect(p, huge, "c", 1), -EINVAL);
    huge[MG_REDIS_MAX_ID] = '\0'; /* exactly the limit is fine */
    cr_assert_eq(p->ops->connect(p, huge, "c", 1), 0);
    cr_assert_eq(p->ops->connect(p, "", "c", 1), -EINVAL);
    cr_assert_eq(p->ops->lookup(p, "", &l), -EINVAL);
    cr_assert_null(mg_presence_redis_create(rc, "bad|gw", "eu", 30));
    cr_assert_null(mg_presence_redis_create(rc, "gw", "e|u", 30));
    cr_assert_eq(p->ops->remove_gateway(p), 0);
    free(huge);
    mg_presence_free(p);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}
