/* Integration tests of redis_track.c and the presence cache of
 * presence_redis.c against the real Redis Cluster: another gateway's
 * connect and disconnect reach the cache through Redis's invalidations, this
 * gateway's own at once; offline users are kept and told of too; a lost
 * subscription forgets everything and tracking comes back by itself. */
#include "store/redis_store.h"
#include "test_redis_util.h"

#include <errno.h>

static void gwid(char *buf, size_t len, const char *tag)
{
    snprintf(buf, len, "tk%s-%d-%lld", tag, (int)getpid(), (long long)mg_mono_us());
}

/* "mg:p:{user}" (presence_redis.c's key) into buf. */
static const char *user_key_of(const char *user, char *buf, size_t len)
{
    snprintf(buf, len, "mg:p:{%s}", user);
    return buf;
}

/* Polls until tracking covers every master (bounded). */
static void wait_armed(mg_redis_cluster *rc)
{
    int64_t until = mg_mono_ms() + 5000;
    while (!mg_redis_cluster_track_epoch(rc) && mg_mono_ms() < until)
        usleep(10 * 1000);
    cr_assert_neq(mg_redis_cluster_track_epoch(rc), 0, "tracking never armed");
}

/* -1: the cache cannot answer; else the number of connections it knows. */
static int cached(mg_presence *p, const char *user, const char *want_conn)
{
    mg_presence_list l = {0};
    int hit = p->ops->lookup_cached(p, user, &l);
    int n = hit ? (int)l.n : -1;
    if (hit && want_conn) {
        bool found = false;
        for (size_t i = 0; i < l.n; i++)
            found |= !strcmp(l.items[i].conn_id, want_conn);
        n = found ? n : -2;
    }
    mg_presence_list_clear(&l);
    return n;
}

/* Polls until the cache, quiet (no invalidation on its way), no longer
 * answers `stale` (bounded): a change made elsewhere reaches it through
 * Redis, not at once. A miss while an invalidation is still unapplied does
 * not count: it says nothing of whether the invalidation is applied. */
static int cached_until_not(mg_redis_cluster *rc, mg_presence *p, const char *user, int stale)
{
    int64_t until = mg_mono_ms() + 3000;
    int got = stale;
    while (mg_mono_ms() < until) {
        if (mg_redis_cluster_track_quiet(rc) && (got = cached(p, user, NULL)) != stale &&
            mg_redis_cluster_track_quiet(rc))
            break;
        usleep(2 * 1000);
    }
    return got;
}

/* cached(), judged only while the cache is quiet (bounded): the cache answers nothing while
 * an invalidation is on its way, and every SET of a lease key it read is one. */
static int cached_quiet(mg_redis_cluster *rc, mg_presence *p, const char *user,
                        const char *want_conn)
{
    int64_t until = mg_mono_ms() + 1000;
    for (;;) {
        bool quiet = mg_redis_cluster_track_quiet(rc);
        int got = cached(p, user, want_conn);
        if (got >= 0 || (quiet && mg_redis_cluster_track_quiet(rc)) || mg_mono_ms() >= until)
            return got; /* a miss counts when the cache was quiet all through it */
        usleep(1000);
    }
}

static void fill(mg_presence *p, const char *user, size_t want)
{
    mg_presence_list l = {0};
    cr_assert_eq(p->ops->lookup(p, user, &l), 0);
    cr_assert_eq(l.n, want);
    mg_presence_list_clear(&l);
}

/* Reads user (want connections, conn among them) until the cache keeps the
 * read (bounded): an invalidation still on its way when a read starts (this
 * gateway's own writes cause one too) makes the cache drop that read. */
static void fill_kept(mg_presence *p, const char *user, int want, const char *conn)
{
    int64_t until = mg_mono_ms() + 3000;
    int got;
    do {
        fill(p, user, (size_t)want);
    } while ((got = cached(p, user, conn)) != want && mg_mono_ms() < until && !usleep(2000));
    cr_assert_eq(got, want, "the cache never kept a read of %s: %d", user, got);
}

/* Two gateways' presence stores, each on its own cluster client: a with the
 * cache (tracking armed), b without; leases of lease_s. */
typedef struct two_gw {
    int lk;
    mg_redis_cluster *rca, *rcb;
    mg_presence *a, *b;
    char a_id[64], b_id[64];
} two_gw;

static void two_gw_open(two_gw *g, const char *tag_a, const char *tag_b, int lease_s)
{
    g->lk = tr_lock(0);
    g->rca = tr_cluster(2000);
    g->rcb = tr_cluster(2000);
    gwid(g->a_id, sizeof(g->a_id), tag_a);
    gwid(g->b_id, sizeof(g->b_id), tag_b);
    g->a = mg_presence_redis_create(g->rca, g->a_id, "eu", lease_s);
    g->b = mg_presence_redis_create(g->rcb, g->b_id, "eu", lease_s);
    cr_assert(g->a && g->b);
    cr_assert_eq(mg_presence_redis_cache(g->a, 1000), 0);
}

/* Removes both gateways' entries and frees everything. */
static void two_gw_close(two_gw *g)
{
    cr_assert_eq(g->b->ops->remove_gateway(g->b), 0);
    cr_assert_eq(g->a->ops->remove_gateway(g->a), 0);
    mg_presence_free(g->a);
    mg_presence_free(g->b);
    mg_redis_cluster_free(g->rca);
    mg_redis_cluster_free(g->rcb);
    tr_unlock(g->lk);
}

Test(redis_track, cache_follows_changes_made_anywhere, .timeout = 60)
{
    two_gw g;
    two_gw_open(&g, "A", "B", 30);
    mg_redis_cluster *rca = g.rca;
    mg_presence *a = g.a, *b = g.b;
    char user[64];
    snprintf(user, sizeof(user), "trk-%d-%lld", (int)getpid(), (long long)mg_mono_us());
    cr_assert_eq(mg_presence_redis_cache(a, 1000), -EINVAL, "one cache per store");
    cr_assert_eq(cached(b, user, NULL), -1, "a store without a cache never answers from memory");
    wait_armed(rca);

    cr_assert_eq(cached(a, user, NULL), -1, "nothing read yet");
    fill(a, user, 0);
    cr_assert_eq(cached(a, user, NULL), 0, "offline, as read, is kept");

    /* another gateway's connect: Redis tells A */
    cr_assert_eq(b->ops->connect(b, user, "b-1", 1000), 0);
    cr_assert_eq(cached_until_not(rca, a, user, 0), -1, "the offline answer was forgotten");
    fill_kept(a, user, 1, "b-1");

    /* B's renew writes nothing that did not change: A keeps bob. A marker
     * user on bob's slot, kept by A as offline and then connected on B,
     * orders it: its invalidation follows any of the renew's on that
     * master's one subscription. */
    char marker[96];
    unsigned slot = mg_redis_key_slot(user_key_of(user, marker, sizeof(marker)), strlen(marker));
    char mk[96];
    for (int i = 0;; i++) {
        snprintf(marker, sizeof(marker), "%s-m%d", user, i);
        if (mg_redis_key_slot(user_key_of(marker, mk, sizeof(mk)), strlen(mk)) == slot)
            break;
    }
    fill_kept(a, marker, 0, NULL);
    cr_assert_eq(b->ops->renew(b), 0);
    cr_assert_eq(b->ops->connect(b, marker, "b-m", 1500), 0);
    cr_assert_eq(cached_until_not(rca, a, marker, 0), -1);
    cr_assert_eq(cached(a, user, "b-1"), 1, "a renew that changed nothing invalidated bob");
    cr_assert_eq(b->ops->disconnect(b, marker, "b-m"), 0);

    /* A's own connect: forgotten before connect returns */
    cr_assert_eq(a->ops->connect(a, user, "a-1", 2000), 0);
    cr_assert_eq(cached(a, user, NULL), -1);
    fill_kept(a, user, 2, "a-1");

    /* another gateway's disconnect */
    cr_assert_eq(b->ops->disconnect(b, user, "b-1"), 0);
    cr_assert_eq(cached_until_not(rca, a, user, 2), -1);
    fill_kept(a, user, 1, "a-1");

    /* A's own disconnect */
    cr_assert_eq(a->ops->disconnect(a, user, "a-1"), 0);
    cr_assert_eq(cached(a, user, NULL), -1);

    /* a batch lookup keeps each user it read */
    char other[80];
    snprintf(other, sizeof(other), "%s-other", user);
    cr_assert_eq(b->ops->connect(b, other, "b-2", 3000), 0);
    const char *users[] = {user, other};
    int64_t until = mg_mono_ms() + 3000;
    int kept;
    do { /* as fill_kept: until a read of both is kept */
        mg_presence_list outs[2] = {{0}, {0}};
        cr_assert_eq(a->ops->lookup_batch(a, users, 2, outs), 0);
        cr_assert_eq(outs[0].n + outs[1].n, 1);
        mg_presence_list_clear(&outs[0]);
        mg_presence_list_clear(&outs[1]);
        kept = (cached(a, user, NULL) == 0) + (cached(a, other, "b-2") == 1);
    } while (kept < 2 && mg_mono_ms() < until && !usleep(2000));
    cr_assert_eq(kept, 2);
    two_gw_close(&g);
}

/* Kills this process's tracking subscriptions on a node (CLIENT LIST names
 * them meshgate-track-<pid>), counting them in *arg. */
static void kill_subscriptions_on(redisContext *c, const char *addr, void *arg)
{
    char name[64];
    snprintf(name, sizeof(name), "name=meshgate-track-%d ", (int)getpid());
    redisReply *r = redisCommand(c, "CLIENT LIST TYPE pubsub");
    cr_assert(r && r->type == REDIS_REPLY_STRING, "CLIENT LIST on %s", addr);
    for (char *ls = NULL, *line = strtok_r(r->str, "\n", &ls); line;
         line = strtok_r(NULL, "\n", &ls)) {
        if (!strstr(line, name))
            continue;
        long long id = strtoll(line + 3, NULL, 10); /* "id=N ..." */
        redisReply *k = redisCommand(c, "CLIENT KILL ID %lld", id);
        *(int *)arg += k && k->type == REDIS_REPLY_INTEGER && k->integer == 1;
        if (k)
            freeReplyObject(k);
    }
    freeReplyObject(r);
}

Test(redis_track, lost_subscription_forgets_and_comes_back, .timeout = 60)
{
    int lk = tr_lock(0);
    mg_redis_cluster *rc = tr_cluster(2000);
    char a_id[64], user[64];
    gwid(a_id, sizeof(a_id), "L");
    snprintf(user, sizeof(user), "trl-%d-%lld", (int)getpid(), (long long)mg_mono_us());
    mg_presence *a = mg_presence_redis_create(rc, a_id, "eu", 30);
    cr_assert_not_null(a);
    cr_assert_eq(mg_presence_redis_cache(a, 1000), 0);
    wait_armed(rc);
    fill(a, user, 0);
    cr_assert_eq(cached(a, user, NULL), 0);
    uint64_t before = mg_redis_cluster_track_epoch(rc);

    int killed = 0;
    tr_each_node(kill_subscriptions_on, &killed);
    cr_assert_geq(killed, 1);
    /* the change that follows can no longer be heard: everything goes */
    cr_assert_eq(cached_until_not(rc, a, user, 0), -1);
    wait_armed(rc);
    cr_assert_neq(mg_redis_cluster_track_epoch(rc), before, "a new epoch after the loss");

    /* and caching works again, invalidations included */
    fill_kept(a, user, 0, NULL);
    mg_redis_cluster *rcb = tr_cluster(2000);
    char b_id[64];
    gwid(b_id, sizeof(b_id), "M");
    mg_presence *b = mg_presence_redis_create(rcb, b_id, "eu", 30);
    cr_assert_eq(b->ops->connect(b, user, "b-1", 1000), 0);
    cr_assert_eq(cached_until_not(rc, a, user, 0), -1);
    cr_assert_eq(b->ops->remove_gateway(b), 0);
    mg_presence_free(b);
    mg_redis_cluster_free(rcb);
    mg_presence_free(a);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

/* A renew asks again for the leases it holds alive: a peer that keeps its
 * lease (here set by hand every lease/3, as its renew would, so its users'
 * keys are not written meanwhile) stays known, and the cache keeps
 * answering for its users past the deadline of the first PTTL. Without
 * that, every hit on them misses once that deadline passes. */
Test(redis_track, renew_keeps_a_peers_lease_known, .timeout = 60)
{
    two_gw g;
    two_gw_open(&g, "R", "S", 2); /* b's user keys live 6 s */
    mg_presence *a = g.a, *b = g.b;
    char user[64];
    snprintf(user, sizeof(user), "trr-%d-%lld", (int)getpid(), (long long)mg_mono_us());
    wait_armed(g.rca);
    int64_t key_end = mg_mono_ms() + 6000; /* at the latest: the key is written after this */
    cr_assert_eq(b->ops->connect(b, user, "b-1", 1000), 0);
    char lease_key[96];
    snprintf(lease_key, sizeof(lease_key), "mg:gw:{%s}", g.b_id);
    redisReply *r = NULL; /* the lease a's cache first reads: 1 s, as each one set below */
    cr_assert_eq(mg_redis_cluster_command(g.rcb, &r, lease_key, "SET %s eu PX 1000", lease_key), 0);
    freeReplyObject(r);
    fill_kept(a, user, 1, "b-1");

    /* 2.4 of the 1 s leases set below, while the user key lives (its expiry would be heard
     * as an invalidation: a right miss, not the one this test looks for). A slow start (a
     * loaded sanitizer run) takes from the window, not from the key's life. */
    int64_t until = mg_mono_ms() + 2400;
    if (until > key_end - 1000)
        until = key_end - 1000;
    int checks = 0, misses = 0;
    while (mg_mono_ms() < until) {
        r = NULL;
        cr_assert_eq(mg_redis_cluster_command(g.rcb, &r, lease_key, "SET %s eu PX 1000", lease_key),
                     0); /* shorter than b's own 2 s: a's cache must ask again to keep up */
        freeReplyObject(r);
        cr_assert_eq(a->ops->renew(a), 0);
        for (int i = 0; i < 3; i++, checks++) {
            if (cached_quiet(g.rca, a, user, "b-1") != 1)
                misses++;
            usleep(100 * 1000);
        }
    }
    cr_assert_geq(checks, 15);
    cr_assert_eq(misses, 0, "%d of %d cache checks missed: the peer's lease ran out here", misses,
                 checks);
    two_gw_close(&g);
}

/* An ACL user that may not subscribe to __redis__:invalidate: tracking
 * never arms, so the cache never answers, and presence works as without
 * it (every lookup reads Redis, connects and disconnects show at once). */
Test(redis_track, refused_subscription_means_no_cache_not_wrong_answers, .timeout = 60)
{
    int lk = tr_lock(0);
    char acl[32], user[64], a_id[64];
    snprintf(acl, sizeof(acl), "mgtrk%d", (int)getpid());
    snprintf(user, sizeof(user), "tra-%d-%lld", (int)getpid(), (long long)mg_mono_us());
    gwid(a_id, sizeof(a_id), "R");
    tr_acl_user(acl, "pw", TR_ACL_NO_CHANNELS); /* every command and key, no channel */
    char err[512];
    mg_redis_cluster *rc = mg_redis_cluster_create(tr_nodes(), acl, "pw", 2000, err, sizeof(err));
    cr_assert_not_null(rc, "%s", err);
    mg_presence *a = mg_presence_redis_create(rc, a_id, "eu", 30);
    cr_assert_not_null(a);
    cr_assert_eq(mg_presence_redis_cache(a, 1000), 0);
    for (int i = 0; i < 20; i++) { /* ~200 ms: the tracker tries every master meanwhile */
        bool on = i % 2 == 0;
        cr_assert_eq(
            on ? a->ops->connect(a, user, "r-1", 1000) : a->ops->disconnect(a, user, "r-1"), 0);
        fill(a, user, on ? 1 : 0);
        cr_assert_eq(cached(a, user, NULL), -1, "answered from a cache Redis cannot keep right");
        cr_assert_eq(mg_redis_cluster_track_epoch(rc), 0);
        usleep(10 * 1000);
    }
    cr_assert_eq(a->ops->remove_gateway(a), 0);
    mg_presence_free(a);
    mg_redis_cluster_free(rc);
    tr_acl_user(acl, NULL, TR_ACL_DEL);
    tr_unlock(lk);
}
