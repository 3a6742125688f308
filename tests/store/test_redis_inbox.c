/* Integration tests of inbox_redis.c against the real Redis Cluster: order,
 * count cap, age cap, ack, unacked messages come again, idempotent store,
 * envelopes round-trip, users spread over masters. */
#include "store/redis_store.h"
#include "test_redis_util.h"

#include <errno.h>

static char user[64];

static mg_msg *msg(const char *id, const char *content)
{
    return mg_msg_new(id, "bob", user, (const uint8_t *)content, strlen(content), "text/plain",
                      1234, MG_PRIO_HIGH);
}

static void store(mg_inbox *ib, const char *id, const char *content)
{
    mg_msg *m = msg(id, content);
    cr_assert_eq(ib->ops->store(ib, m), 0, "store %s", id);
    mg_msg_free(m);
}

/* Fetches and compares the ids in order with want (NULL-terminated). */
static void expect(mg_inbox *ib, size_t max, const char *const *want)
{
    mg_msg **items = NULL;
    size_t n = 0, k = 0;
    cr_assert_eq(ib->ops->fetch(ib, user, max, &items, &n), 0);
    for (; want[k]; k++) {
        cr_assert_lt(k, n, "missing %s (got %zu)", want[k], n);
        cr_assert_str_eq(items[k]->id, want[k], "position %zu", k);
    }
    cr_assert_eq(n, k, "got %zu messages, want %zu", n, k);
    mg_inbox_items_free(items, n);
}

static void fresh_user(const char *tag)
{
    snprintf(user, sizeof(user), "ib-%s-%d-%lld", tag, (int)getpid(), (long long)mg_mono_us());
}

Test(inbox_redis, order_ack_and_redelivery)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_inbox *ib = mg_inbox_redis_create(rc, 100, 3600);
    fresh_user("o");
    /* ids deliberately not in lexical order: arrival order wins */
    store(ib, "m3", "three");
    store(ib, "m1", "one");
    store(ib, "m2", "two");
    expect(ib, 10, (const char *[]){"m3", "m1", "m2", NULL});
    expect(ib, 2, (const char *[]){"m3", "m1", NULL});

    /* the envelope round-trips */
    mg_msg **items = NULL;
    size_t n = 0;
    cr_assert_eq(ib->ops->fetch(ib, user, 1, &items, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_str_eq(items[0]->from, "bob");
    cr_assert_str_eq(items[0]->to, user);
    cr_assert_str_eq(items[0]->content_type, "text/plain");
    cr_assert_eq(items[0]->content_len, 5);
    cr_assert_eq(memcmp(items[0]->content, "three", 5), 0);
    cr_assert_eq(items[0]->sent_at_ms, 1234);
    mg_inbox_items_free(items, n);

    /* ack removes; unacked come again on the next fetch */
    cr_assert_eq(ib->ops->ack(ib, user, "m1"), 0);
    cr_assert_eq(ib->ops->ack(ib, user, "m1"), -ENOENT);
    cr_assert_eq(ib->ops->ack(ib, user, "nope"), -ENOENT);
    expect(ib, 10, (const char *[]){"m3", "m2", NULL});
    expect(ib, 10, (const char *[]){"m3", "m2", NULL});
    cr_assert_eq(ib->ops->ack(ib, user, "m3"), 0);
    cr_assert_eq(ib->ops->ack(ib, user, "m2"), 0);
    expect(ib, 10, (const char *[]){NULL});
    /* nothing left behind */
    char key[128];
    snprintf(key, sizeof(key), "mg:im:{%s}", user);
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "EXISTS %s mg:i:{%s}", key, user), 0);
    cr_assert_eq(r->integer, 0);
    freeReplyObject(r);
    mg_inbox_free(ib);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(inbox_redis, idempotent_store)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_inbox *ib = mg_inbox_redis_create(rc, 100, 3600);
    fresh_user("i");
    store(ib, "a", "first");
    store(ib, "b", "b");
    store(ib, "a", "retry of a"); /* same id: not added twice, not moved */
    expect(ib, 10, (const char *[]){"a", "b", NULL});
    mg_msg **items = NULL;
    size_t n = 0;
    cr_assert_eq(ib->ops->fetch(ib, user, 1, &items, &n), 0);
    cr_assert_eq(memcmp(items[0]->content, "first", 5), 0);
    mg_inbox_items_free(items, n);
    mg_inbox_free(ib);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(inbox_redis, capped_by_count_oldest_go_first)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_inbox *ib = mg_inbox_redis_create(rc, 3, 3600);
    fresh_user("c");
    const char *ids[] = {"x1", "x2", "x3", "x4", "x5"};
    for (int i = 0; i < 5; i++)
        store(ib, ids[i], ids[i]);
    expect(ib, 10, (const char *[]){"x3", "x4", "x5", NULL});
    cr_assert_eq(ib->ops->ack(ib, user, "x1"), -ENOENT);
    /* the key expires with the age limit */
    char key[128];
    snprintf(key, sizeof(key), "mg:i:{%s}", user);
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "PTTL %s", key), 0);
    cr_assert(r->integer > 3500000 && r->integer <= 3600000, "pttl %lld", r->integer);
    freeReplyObject(r);
    mg_inbox_free(ib);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(inbox_redis, capped_by_age, .timeout = 30)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    mg_inbox *ib = mg_inbox_redis_create(rc, 100, 1);
    fresh_user("a");
    store(ib, "old1", "o");
    store(ib, "old2", "o");
    usleep(1200000);
    store(ib, "new", "n"); /* store trims the expired */
    expect(ib, 10, (const char *[]){"new", NULL});
    usleep(1200000); /* fetch trims too */
    expect(ib, 10, (const char *[]){NULL});
    mg_inbox_free(ib);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(inbox_redis, bad_arguments)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    cr_assert_null(mg_inbox_redis_create(rc, 0, 10));
    mg_inbox *ib = mg_inbox_redis_create(rc, 10, 0); /* no age limit */
    fresh_user("b");
    char *huge = malloc(MG_REDIS_MAX_ID + 2);
    memset(huge, 'h', MG_REDIS_MAX_ID + 1);
    huge[MG_REDIS_MAX_ID + 1] = '\0';
    mg_msg **items = NULL;
    size_t n = 0;
    cr_assert_eq(ib->ops->fetch(ib, huge, 10, &items, &n), -EINVAL);
    cr_assert_eq(ib->ops->ack(ib, huge, "x"), -EINVAL);
    mg_msg *m = mg_msg_new("id", "f", huge, (const uint8_t *)"c", 1, NULL, 1, MG_PRIO_LOW);
    cr_assert_eq(ib->ops->store(ib, m), -EINVAL);
    mg_msg_free(m);
    store(ib, "keep", "k");
    expect(ib, 10, (const char *[]){"keep", NULL});
    char key[128];
    snprintf(key, sizeof(key), "mg:i:{%s}", user);
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "PTTL %s", key), 0);
    cr_assert_eq(r->integer, -1); /* no age limit: no TTL */
    freeReplyObject(r);
    cr_assert_eq(ib->ops->ack(ib, user, "keep"), 0);
    free(huge);
    mg_inbox_free(ib);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

/* --inbox-min-replicas: the test cluster has one replica per master
 * (tests/infra/redis-cluster.sh), so 1 is met and 2 never is: that store
 * fails with -EREMOTEIO within the client's timeout, not later. */
Test(inbox_redis, durable_store_waits_for_replicas)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(800);
    mg_inbox *one = mg_inbox_redis_create_durable(rc, 100, 3600, 1);
    mg_inbox *two = mg_inbox_redis_create_durable(rc, 100, 3600, 2);
    cr_assert_null(mg_inbox_redis_create_durable(rc, 100, 3600, -1));
    fresh_user("w");
    store(one, "d1", "durable");
    mg_msg *m = msg("d2", "not durable enough");
    int64_t t0 = mg_mono_ms();
    cr_assert_eq(two->ops->store(two, m), -EREMOTEIO);
    int64_t took = mg_mono_ms() - t0;
    cr_assert_lt(took, 1000, "took %lld ms, budget 800", (long long)took);
    cr_assert_geq(took, 300, "WAIT gave up after %lld ms", (long long)took);
    mg_msg_free(m);
    /* d1 is there; d2 reached the master even though it was not acknowledged */
    expect(one, 10, (const char *[]){"d1", "d2", NULL});
    mg_inbox_free(one);
    mg_inbox_free(two);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}
