/* presence_redis.c: the presence store in Redis Cluster, with gateway leases.
 *
 * Threads: every op runs on router worker threads (renew on the gateway's
 * lease timer), concurrently; never on the WebSocket service thread.
 *
 * DESIGN (keys in redis_store.h)
 * - connect: one Lua script on the user's slot: HSET the entry and PEXPIRE
 *   the user key to 3 x lease. The connection is also remembered in-process
 *   (user -> this gateway's connections) so renew can re-assert it.
 * - renew (every lease/3): SET the lease key PX lease, then, pipelined, the
 *   renew script for every local connection: an entry lost in a failover
 *   (or different) is written again, and a user key's TTL is pushed back to
 *   3 x lease once it fell under 2 x lease, so user keys stay alive while
 *   this gateway is. Nothing else is written: each write would be a change
 *   to every gateway caching the user (an invalidation, see the cache).
 *   A connection closed while renew ran is deleted again afterwards (renew
 *   re-checks the local table once its writes are acknowledged).
 * - lookup: HGETALL the user key(s), pipelined for batches; entries whose
 *   gateway has no live lease are dropped (and removed by a compare-and-
 *   delete script, so a restarted gateway's fresh entry is never hit).
 *   Leases are checked with PTTL (pipelined) and cached in-process: alive
 *   until the deadline PTTL gave (so a dead gateway is never believed alive
 *   past its lease), dead for MG_PR_DEAD_CACHE_MS. The renew also asks
 *   again for the leases cached alive, so a busy peer's lease is known
 *   before it runs out (else every cache hit on its users would miss until
 *   a lookup asked).
 * Guarantees: a gateway that dies stops appearing in lookups at most
 * lease_seconds after its last renew; its users' keys expire within 3 x
 * lease once no live gateway renews them. On an error nothing local changes.
 */
#include "store/redis_store.h"

#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/presence_cache.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MG_PR_DEAD_CACHE_MS   500 /* a missing lease is re-checked after this */
#define MG_PR_LEASE_CACHE_MAX 4096
#define MG_PR_RENEW_CHUNK     1000 /* connections re-asserted per pipeline */
#define MG_PR_SCRATCH_MAX     4096 /* lookups a kept scratch has room for, at most */

static const char CONNECT_LUA[] = "local n = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) "
                                  "redis.call('PEXPIRE', KEYS[1], ARGV[3]) return n";
/* A renew writes only what is missing or different, and pushes the TTL out
 * only once it fell under two leases: a write is a change to every gateway
 * that caches the user (an invalidation), and a replicated write. */
static const char RENEW_LUA[] = "local n = 0 "
                                "if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then "
                                "n = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end "
                                "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then "
                                "redis.call('PEXPIRE', KEYS[1], ARGV[3]) end return n";
static const char DEL_IF_LUA[] = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then "
                                 "return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";

typedef struct local_conn {
    char *conn_id;
    int64_t at_ms;
} local_conn;

typedef struct local_user {
    local_conn *c;
    size_t n, cap;
} local_user;

typedef struct lease_entry {
    int64_t alive_until; /* mono ms */
    int64_t dead_until;  /* mono ms */
} lease_entry;

typedef struct scratch scratch;

typedef struct presence_redis {
    mg_presence base;
    mg_redis_cluster *rc;
    char *gw, *region, *lease_key;
    int lease_s;
    pthread_mutex_t mu; /* guards local and leases */
    mg_map *local;      /* user -> local_user* */
    mg_map *leases;     /* gateway id -> lease_entry* */
    pthread_mutex_t scratch_mu;
    scratch *scratch; /* idle ones (see scratch_take) */
    mg_pcache *cache; /* NULL: no cache (mg_presence_redis_cache) */
    mg_metric *cache_hits, *cache_misses;
} presence_redis;

static bool id_ok(const char *s)
{
    if (!s || !*s)
        return false;
    size_t n = strnlen(s, MG_REDIS_MAX_ID + 1);
    return n <= MG_REDIS_MAX_ID;
}

static char *user_key(const char *user)
{
    return mg_xasprintf("mg:p:{%s}", user);
}

static char *entry_value(presence_redis *p, int64_t at_ms)
{
    return mg_xasprintf("%s|%s|%" PRId64, p->gw, p->region, at_ms);
}

/* The connect script (renew: the renew script) for conn in user key `key`. */
static void add_connect(presence_redis *p, mg_redis_batch *b, const char *key, const char *conn,
                        const char *val, bool renew)
{
    char ttl[32], floor[32];
    snprintf(ttl, sizeof(ttl), "%lld", (long long)p->lease_s * 3000);
    snprintf(floor, sizeof(floor), "%lld", (long long)p->lease_s * 2000);
    const char *argv[] = {"EVAL", renew ? RENEW_LUA : CONNECT_LUA, "1", key, conn, val, ttl, floor};
    mg_redis_batch_add_argv(b, key, renew ? 8 : 7, argv, NULL);
}

/* ---- local table --------------------------------------------------------- */

static void local_add(presence_redis *p, const char *user, const char *conn, int64_t at)
{
    local_user *u = mg_map_get(p->local, user);
    if (!u) {
        u = mg_new(local_user);
        mg_map_put(p->local, user, u);
    }
    for (size_t i = 0; i < u->n; i++)
        if (strcmp(u->c[i].conn_id, conn) == 0) {
            u->c[i].at_ms = at;
            return;
        }
    if (u->n == u->cap) {
        u->cap = u->cap ? u->cap * 2 : 2;
        u->c = mg_xrealloc(u->c, u->cap * sizeof(*u->c));
    }
    u->c[u->n].conn_id = mg_xstrdup(conn);
    u->c[u->n].at_ms = at;
    u->n++;
}

static bool local_has(presence_redis *p, const char *user, const char *conn)
{
    local_user *u = mg_map_get(p->local, user);
    for (size_t i = 0; u && i < u->n; i++)
        if (strcmp(u->c[i].conn_id, conn) == 0)
            return true;
    return false;
}

static void local_user_free(local_user *u)
{
    for (size_t i = 0; i < u->n; i++)
        free(u->c[i].conn_id);
    free(u->c);
    free(u);
}

static void local_del(presence_redis *p, const char *user, const char *conn)
{
    local_user *u = mg_map_get(p->local, user);
    if (!u)
        return;
    for (size_t i = 0; i < u->n; i++)
        if (strcmp(u->c[i].conn_id, conn) == 0) {
            free(u->c[i].conn_id);
            u->c[i] = u->c[--u->n];
            break;
        }
    if (u->n == 0)
        local_user_free(mg_map_del(p->local, user));
}

static void local_clear(presence_redis *p)
{
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(p->local, &it, &k, &v);)
        local_user_free(v);
    mg_map_free(p->local);
    p->local = mg_map_create(64);
}

/* ---- the cache ----------------------------------------------------------- */

/* This gateway's own writes are forgotten at once (Redis's word of them
 * comes a moment later, on the tracking thread): a send right after a
 * connect here must see it. */
static void forget(presence_redis *p, const char *user)
{
    if (p->cache)
        mg_pcache_forget(p->cache, user, strlen(user));
}

/* Redis's word that a key changed ("mg:p:{user}"), or of everything (NULL). */
static void on_invalidate(void *arg, const char *key, size_t len)
{
    presence_redis *p = arg;
    static const char prefix[] = "mg:p:{";
    size_t pl = sizeof(prefix) - 1;
    if (!key)
        mg_pcache_forget(p->cache, NULL, 0);
    else if (len > pl + 1 && !memcmp(key, prefix, pl) && key[len - 1] == '}')
        mg_pcache_forget(p->cache, key + pl, len - pl - 1);
}

/* 1: gateway holds a live lease, 0: it does not, -1: not known here (the
 * cache cannot answer without a PTTL). */
static int lease_alive(void *arg, const char *gateway)
{
    presence_redis *p = arg;
    int64_t now = mg_mono_ms();
    pthread_mutex_lock(&p->mu);
    lease_entry *le = mg_map_get(p->leases, gateway);
    int a = le && now < le->alive_until ? 1 : le && now < le->dead_until ? 0 : -1;
    pthread_mutex_unlock(&p->mu);
    return a;
}

/* The reads of a lookup that may be kept: tickets taken before it, and the
 * tracking epoch then (0: not to be kept). */
typedef struct keep_plan {
    uint64_t epoch;
    mg_pcache_ticket *tickets;
} keep_plan;

static void keep_begin(presence_redis *p, const char *const *users, size_t n, keep_plan *kp)
{
    kp->epoch = p->cache ? mg_redis_cluster_track_epoch(p->rc) : 0;
    kp->tickets = NULL;
    if (!kp->epoch)
        return;
    kp->tickets = mg_xcalloc(n, sizeof(*kp->tickets));
    for (size_t i = 0; i < n; i++)
        mg_pcache_take_ticket(p->cache, users[i], &kp->tickets[i]);
}

/* ---- ops ----------------------------------------------------------------- */

static int pr_connect(mg_presence *base, const char *user, const char *conn_id, int64_t now_ms)
{
    presence_redis *p = (presence_redis *)base;
    if (!id_ok(user) || !id_ok(conn_id))
        return -EINVAL;
    char *key = user_key(user), *val = entry_value(p, now_ms);
    mg_redis_batch *b = mg_redis_batch_new();
    add_connect(p, b, key, conn_id, val, false);
    int rv = mg_redis_cluster_exec(p->rc, b);
    redisReply *r = mg_redis_batch_reply(b, 0);
    if (rv == 0 && r->type == REDIS_REPLY_ERROR) {
        mg_log_warn("presence", "connect failed user=%s conn=%s err=\"%s\"", user, conn_id, r->str);
        rv = -EIO;
    }
    if (rv == 0) {
        pthread_mutex_lock(&p->mu);
        local_add(p, user, conn_id, now_ms);
        pthread_mutex_unlock(&p->mu);
        forget(p, user);
    }
    mg_redis_batch_free(b);
    free(key);
    free(val);
    return rv;
}

static int pr_disconnect(mg_presence *base, const char *user, const char *conn_id)
{
    presence_redis *p = (presence_redis *)base;
    if (!id_ok(user) || !id_ok(conn_id))
        return -EINVAL;
    /* Local first, so a concurrent renew either skips it or deletes it again. */
    pthread_mutex_lock(&p->mu);
    local_del(p, user, conn_id);
    pthread_mutex_unlock(&p->mu);
    char *key = user_key(user);
    redisReply *r = NULL;
    int rv = mg_redis_cluster_command(p->rc, &r, key, "HDEL %s %s", key, conn_id);
    if (rv == 0 && r->type == REDIS_REPLY_ERROR)
        rv = -EIO;
    forget(p, user); /* even on an error: the HDEL may have run */
    if (r)
        freeReplyObject(r);
    free(key);
    return rv;
}

/* One parsed entry of a user hash: "gw|region|at", cut in place in the
 * reply (ours until the batch is reset), so gw and region need no copies;
 * entry_restore puts the separators back when val is needed whole. */
typedef struct entry {
    const char *conn, *val; /* point into the reply */
    char *gw, *region;      /* ... into val, cut */
    char *cut[2];           /* the separators cut */
    int64_t at;
    size_t user; /* index of the user it belongs to */
} entry;

static bool parse_entry(char *val, entry *e)
{
    char *last = strrchr(val, '|');
    if (!last || last == val)
        return false;
    char *mid = last - 1;
    while (mid > val && *mid != '|')
        mid--;
    if (*mid != '|' || mid == val)
        return false;
    e->at = strtoll(last + 1, NULL, 10);
    *mid = *last = '\0';
    e->cut[0] = mid;
    e->cut[1] = last;
    e->gw = val;
    e->region = mid + 1;
    e->val = val;
    return true;
}

static void entry_restore(entry *e)
{
    *e->cut[0] = *e->cut[1] = '|';
}

/* Asks Redis for the leases of the nask gateways in ask (PTTL, pipelined)
 * and caches the answers: alive until the deadline PTTL gave, dead for
 * MG_PR_DEAD_CACHE_MS. */
static int ask_leases(presence_redis *p, char *const *ask, size_t nask)
{
    mg_redis_batch *b = mg_redis_batch_new();
    for (size_t k = 0; k < nask; k++) {
        char *lk = mg_xasprintf("mg:gw:{%s}", ask[k]);
        mg_redis_batch_add(b, lk, "PTTL %s", lk);
        free(lk);
    }
    int64_t sent = mg_mono_ms();
    int rv = mg_redis_cluster_exec(p->rc, b);
    if (rv == 0) {
        pthread_mutex_lock(&p->mu);
        if (mg_map_size(p->leases) > MG_PR_LEASE_CACHE_MAX) {
            const char *key;
            void *v;
            for (size_t it = 0; mg_map_next(p->leases, &it, &key, &v);)
                free(v);
            mg_map_free(p->leases);
            p->leases = mg_map_create(64);
        }
        for (size_t k = 0; k < nask; k++) {
            redisReply *r = mg_redis_batch_reply(b, k);
            lease_entry *le = mg_map_get(p->leases, ask[k]);
            if (!le) {
                le = mg_new(lease_entry);
                mg_map_put(p->leases, ask[k], le);
            }
            le->alive_until = le->dead_until = 0;
            if (r->type == REDIS_REPLY_INTEGER && r->integer > 0)
                le->alive_until = sent + r->integer;
            else if (r->type == REDIS_REPLY_INTEGER && r->integer == -1) /* no TTL: odd, re-check */
                le->alive_until = sent + 1000;
            else
                le->dead_until = sent + MG_PR_DEAD_CACHE_MS;
        }
        pthread_mutex_unlock(&p->mu);
    }
    mg_redis_batch_free(b);
    return rv;
}

/* Fills alive[i] for each entry: cached leases first, the rest by PTTL. */
static int check_leases(presence_redis *p, entry *es, size_t n, bool *alive)
{
    int64_t now = mg_mono_ms();
    char **ask = NULL;
    size_t nask = 0;
    pthread_mutex_lock(&p->mu);
    for (size_t i = 0; i < n; i++) {
        lease_entry *le = mg_map_get(p->leases, es[i].gw);
        if (le && now < le->alive_until) {
            alive[i] = true;
            continue;
        }
        if (le && now < le->dead_until) {
            alive[i] = false;
            continue;
        }
        size_t k;
        for (k = 0; k < nask && strcmp(ask[k], es[i].gw) != 0; k++)
            ;
        if (k == nask) {
            ask = mg_xrealloc(ask, (nask + 1) * sizeof(*ask));
            ask[nask++] = es[i].gw;
        }
    }
    pthread_mutex_unlock(&p->mu);
    if (!nask) {
        free(ask);
        return 0;
    }
    int rv = ask_leases(p, ask, nask);
    if (rv == 0) {
        pthread_mutex_lock(&p->mu);
        for (size_t i = 0; i < n; i++) {
            lease_entry *le = mg_map_get(p->leases, es[i].gw);
            alive[i] = le && le->alive_until > 0;
        }
        pthread_mutex_unlock(&p->mu);
    }
    free(ask);
    return rv;
}

/* From the renew (every lease/3): the leases cached alive are asked again
 * before they run out, so the presence cache's hits on those gateways'
 * users never find a lease it does not know (a miss for every send to them
 * until one lookup asked). Bounded by MG_PR_LEASE_CACHE_MAX. */
static void refresh_leases(presence_redis *p)
{
    char **ask = NULL;
    size_t nask = 0, cap = 0;
    const char *k;
    void *v;
    pthread_mutex_lock(&p->mu);
    for (size_t it = 0; mg_map_next(p->leases, &it, &k, &v);) {
        if (((lease_entry *)v)->alive_until <= 0)
            continue;
        if (nask == cap) {
            cap = cap ? cap * 2 : 16;
            ask = mg_xrealloc(ask, cap * sizeof(*ask));
        }
        ask[nask++] = mg_xstrdup(k);
    }
    pthread_mutex_unlock(&p->mu);
    if (nask > 0 && ask_leases(p, ask, nask) != 0)
        mg_log_debug("presence", "lease refresh failed gateway=%s", p->gw);
    for (size_t i = 0; i < nask; i++)
        free(ask[i]);
    free(ask);
}

/* A lookup's arrays, kept between lookups: a store worker looking up
 * batches of hundreds of users allocated them afresh each time, and glibc
 * answers each allocation that large by consolidating its free lists (7 %
 * of the consuming gateway's CPU flat out). One per lookup running at once
 * (the store workers); freed with the store. */
struct scratch {
    scratch *next;
    mg_redis_batch *b;
    entry *es;
    size_t capes;
};

static scratch *scratch_take(presence_redis *p)
{
    pthread_mutex_lock(&p->scratch_mu);
    scratch *sc = p->scratch;
    if (sc)
        p->scratch = sc->next;
    pthread_mutex_unlock(&p->scratch_mu);
    if (!sc) {
        sc = mg_new(scratch);
        sc->b = mg_redis_batch_new();
    }
    return sc;
}

static void scratch_free(scratch *sc)
{
    mg_redis_batch_free(sc->b);
    free(sc->es);
    free(sc);
}

/* Keeps sc for the next lookup, unless an unusually large one grew it. */
static void scratch_give(presence_redis *p, scratch *sc)
{
    mg_redis_batch_reset(sc->b);
    if (sc->capes > MG_PR_SCRATCH_MAX || mg_redis_batch_room(sc->b) > MG_PR_SCRATCH_MAX) {
        scratch_free(sc);
        return;
    }
    pthread_mutex_lock(&p->scratch_mu);
    sc->next = p->scratch;
    p->scratch = sc;
    pthread_mutex_unlock(&p->scratch_mu);
}

/* Keeps each user's entries as read, when the epoch held over the read.
 * es is in user order (lookup_many appends user by user). */
static void keep_end(presence_redis *p, const char *const *users, size_t n, const entry *es,
                     size_t nes, keep_plan *kp, bool ok)
{
    if (ok && kp->epoch && kp->epoch == mg_redis_cluster_track_epoch(p->rc)) {
        mg_pcache_conn *conns = mg_xmalloc((nes ? nes : 1) * sizeof(*conns));
        for (size_t e = 0; e < nes; e++)
            conns[e] = (mg_pcache_conn){es[e].conn, es[e].gw, es[e].region, es[e].at};
        for (size_t i = 0, e = 0; i < n; i++) {
            size_t from = e;
            while (e < nes && es[e].user == i)
                e++;
            mg_pcache_put(p->cache, users[i], &kp->tickets[i], conns + from, e - from);
        }
        free(conns);
    }
    free(kp->tickets);
}

/* Lookup of users[0..n) into outs[0..n). */
static int lookup_many(presence_redis *p, const char *const *users, size_t n,
                       mg_presence_list *outs)
{
    for (size_t i = 0; i < n; i++)
        if (!id_ok(users[i]))
            return -EINVAL;
    if (n == 0)
        return 0;
    scratch *sc = scratch_take(p);
    mg_redis_batch *b = sc->b;
    mg_redis_batch_reserve(b, n);
    for (size_t i = 0; i < n; i++) {
        char *key = user_key(users[i]);
        const char *argv[] = {"HGETALL", key}; /* no format string to parse */
        mg_redis_batch_add_argv(b, key, 2, argv, NULL);
        free(key);
    }
    keep_plan kp;
    keep_begin(p, users, n, &kp);
    int rv = mg_redis_cluster_exec(p->rc, b);
    size_t nes = 0; /* most users online hold one connection */
    if (sc->capes < n) {
        free(sc->es);
        sc->capes = n;
        sc->es = mg_xcalloc(sc->capes, sizeof(*sc->es));
    }
    entry *es = sc->es;
    for (size_t i = 0; rv == 0 && i < n; i++) {
        redisReply *r = mg_redis_batch_reply(b, i);
        if (r->type != REDIS_REPLY_ARRAY) {
            rv = -EIO;
            break;
        }
        for (size_t k = 0; k + 1 < r->elements; k += 2) {
            if (nes == sc->capes) {
                sc->capes *= 2;
                es = sc->es = mg_xrealloc(sc->es, sc->capes * sizeof(*es));
            }
            entry *e = &es[nes];
            memset(e, 0, sizeof(*e));
            e->conn = r->element[k]->str;
            e->user = i;
            if (r->element[k + 1]->type == REDIS_REPLY_STRING &&
                parse_entry(r->element[k + 1]->str, e))
                nes++;
        }
    }
    keep_end(p, users, n, es, nes, &kp, rv == 0);
    bool *alive = NULL;
    if (rv == 0 && nes) {
        alive = mg_xcalloc(nes, sizeof(bool));
        rv = check_leases(p, es, nes, alive);
    }
    if (rv == 0) {
        mg_redis_batch *del = NULL;
        for (size_t i = 0; i < nes; i++) {
            if (alive[i]) {
                mg_presence_list_add(&outs[es[i].user], es[i].conn, es[i].gw, es[i].region,
                                     es[i].at);
                continue;
            }
            if (!del)
                del = mg_redis_batch_new();
            entry_restore(&es[i]); /* compare-and-delete the value as stored */
            char *key = user_key(users[es[i].user]);
            const char *argv[] = {"EVAL", DEL_IF_LUA, "1", key, es[i].conn, es[i].val};
            mg_redis_batch_add_argv(del, key, 6, argv, NULL);
            free(key);
        }
        if (del) { /* best effort: the next lookup tries again */
            mg_redis_cluster_exec(p->rc, del);
            mg_redis_batch_free(del);
        }
    }
    free(alive);
    scratch_give(p, sc);
    return rv;
}

static int pr_lookup(mg_presence *base, const char *user, mg_presence_list *out)
{
    return lookup_many((presence_redis *)base, &user, 1, out);
}

static int pr_lookup_cached(mg_presence *base, const char *user, mg_presence_list *out)
{
    presence_redis *p = (presence_redis *)base;
    if (!p->cache)
        return 0;
    int hit = id_ok(user) && mg_redis_cluster_track_epoch(p->rc) &&
              mg_redis_cluster_track_quiet(p->rc) &&
              mg_pcache_get(p->cache, user, lease_alive, p, out);
    mg_metric_add(hit ? p->cache_hits : p->cache_misses, 1);
    return hit;
}

static int pr_lookup_batch(mg_presence *base, const char *const *users, size_t n,
                           mg_presence_list *outs)
{
    return lookup_many((presence_redis *)base, users, n, outs);
}

static int write_lease(presence_redis *p)
{
    redisReply *r = NULL;
    int rv = mg_redis_cluster_command(p->rc, &r, p->lease_key, "SET %s %s PX %lld", p->lease_key,
                                      p->region, (long long)p->lease_s * 1000);
    if (rv == 0 && r->type == REDIS_REPLY_ERROR)
        rv = -EIO;
    if (r)
        freeReplyObject(r);
    return rv;
}

typedef struct snap {
    char *user, *conn;
    int64_t at;
} snap;

static int pr_renew(mg_presence *base)
{
    presence_redis *p = (presence_redis *)base;
    int rv = write_lease(p);
    if (rv != 0) {
        mg_log_warn("presence", "lease renew failed gateway=%s err=%d", p->gw, rv);
        return rv;
    }
    /* snapshot this gateway's connections */
    snap *s = NULL;
    size_t ns = 0;
    pthread_mutex_lock(&p->mu);
    size_t cap = 0;
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(p->local, &it, &k, &v);) {
        local_user *u = v;
        for (size_t i = 0; i < u->n; i++) {
            if (ns == cap) {
                cap = cap ? cap * 2 : 64;
                s = mg_xrealloc(s, cap * sizeof(*s));
            }
            s[ns].user = mg_xstrdup(k);
            s[ns].conn = mg_xstrdup(u->c[i].conn_id);
            s[ns].at = u->c[i].at_ms;
            ns++;
        }
    }
    pthread_mutex_unlock(&p->mu);

    for (size_t off = 0; off < ns && rv == 0; off += MG_PR_RENEW_CHUNK) {
        size_t end = off + MG_PR_RENEW_CHUNK < ns ? off + MG_PR_RENEW_CHUNK : ns;
        mg_redis_batch *b = mg_redis_batch_new();
        for (size_t i = off; i < end; i++) {
            char *key = user_key(s[i].user), *val = entry_value(p, s[i].at);
            add_connect(p, b, key, s[i].conn, val, true);
            free(key);
            free(val);
        }
        rv = mg_redis_cluster_exec(p->rc, b);
        mg_redis_batch_free(b);
        /* connections closed meanwhile: delete them again */
        mg_redis_batch *del = NULL;
        pthread_mutex_lock(&p->mu);
        for (size_t i = off; i < end; i++)
            if (!local_has(p, s[i].user, s[i].conn)) {
                if (!del)
                    del = mg_redis_batch_new();
                char *key = user_key(s[i].user);
                mg_redis_batch_add(del, key, "HDEL %s %s", key, s[i].conn);
                free(key);
            }
        pthread_mutex_unlock(&p->mu);
        if (del) {
            mg_redis_cluster_exec(p->rc, del);
            mg_redis_batch_free(del);
        }
    }
    for (size_t i = 0; i < ns; i++) {
        free(s[i].user);
        free(s[i].conn);
    }
    free(s);
    if (rv != 0)
        mg_log_warn("presence", "renew of entries failed gateway=%s err=%d", p->gw, rv);
    refresh_leases(p);
    return rv;
}

static int pr_remove_gateway(mg_presence *base)
{
    presence_redis *p = (presence_redis *)base;
    mg_redis_batch *b = mg_redis_batch_new();
    pthread_mutex_lock(&p->mu);
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(p->local, &it, &k, &v);) {
        local_user *u = v;
        char *key = user_key(k);
        for (size_t i = 0; i < u->n; i++)
            mg_redis_batch_add(b, key, "HDEL %s %s", key, u->c[i].conn_id);
        free(key);
    }
    pthread_mutex_unlock(&p->mu);
    mg_redis_batch_add(b, p->lease_key, "DEL %s", p->lease_key);
    int rv = mg_redis_cluster_exec(p->rc, b);
    size_t n = mg_redis_batch_count(b) - 1;
    mg_redis_batch_free(b);
    if (rv == 0) {
        pthread_mutex_lock(&p->mu);
        local_clear(p);
        pthread_mutex_unlock(&p->mu);
        mg_log_info("presence", "gateway removed gateway=%s entries=%zu", p->gw, n);
    } else {
        mg_log_warn("presence",
                    "remove gateway failed gateway=%s err=%d (entries expire with "
                    "the lease)",
                    p->gw, rv);
    }
    return rv;
}

static void pr_free(mg_presence *base)
{
    presence_redis *p = (presence_redis *)base;
    if (p->cache) {
        mg_redis_cluster_untrack(p->rc);
        mg_pcache_free(p->cache);
    }
    local_clear(p);
    mg_map_free(p->local);
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(p->leases, &it, &k, &v);)
        free(v);
    mg_map_free(p->leases);
    while (p->scratch) {
        scratch *next = p->scratch->next;
        scratch_free(p->scratch);
        p->scratch = next;
    }
    pthread_mutex_destroy(&p->scratch_mu);
    pthread_mutex_destroy(&p->mu);
    free(p->gw);
    free(p->region);
    free(p->lease_key);
    free(p);
}

static const struct mg_presence_ops presence_redis_ops = {
    .name = "redis-cluster",
    .connect = pr_connect,
    .disconnect = pr_disconnect,
    .lookup = pr_lookup,
    .lookup_batch = pr_lookup_batch,
    .lookup_cached = pr_lookup_cached,
    .renew = pr_renew,
    .remove_gateway = pr_remove_gateway,
    .free = pr_free,
};

mg_presence *mg_presence_redis_create(mg_redis_cluster *rc, const char *gateway_id,
                                      const char *region, int lease_seconds)
{
    if (!rc || !id_ok(gateway_id) || !region || strchr(gateway_id, '|') || strchr(region, '|') ||
        lease_seconds < 0) {
        mg_log_error("presence", "bad redis presence arguments gateway=%s",
                     gateway_id ? gateway_id : "(null)");
        return NULL;
    }
    presence_redis *p = mg_new(presence_redis);
    p->base.ops = &presence_redis_ops;
    p->rc = rc;
    p->gw = mg_xstrdup(gateway_id);
    p->region = mg_xstrdup(region);
    p->lease_key = mg_xasprintf("mg:gw:{%s}", gateway_id);
    p->lease_s = lease_seconds ? lease_seconds : 30;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->scratch_mu, NULL);
    p->local = mg_map_create(64);
    p->leases = mg_map_create(64);
    int rv = write_lease(p);
    if (rv != 0) {
        mg_log_error("presence", "cannot write gateway lease gateway=%s err=%d", gateway_id, rv);
        pr_free(&p->base);
        return NULL;
    }
    mg_log_info("presence", "redis presence ready gateway=%s region=%s lease_s=%d", p->gw,
                p->region, p->lease_s);
    return &p->base;
}

int mg_presence_redis_cache(mg_presence *base, size_t max_users)
{
    presence_redis *p = (presence_redis *)base;
    if (!p || base->ops != &presence_redis_ops || max_users == 0 || p->cache)
        return -EINVAL;
    p->cache = mg_pcache_create(max_users);
    p->cache_hits = mg_counter("meshgate_presence_cache_hits_total",
                               "Presence lookups answered from the in-process cache", NULL);
    p->cache_misses = mg_counter("meshgate_presence_cache_misses_total",
                                 "Presence lookups the in-process cache could not answer", NULL);
    int rv = mg_redis_cluster_track(p->rc, on_invalidate, p);
    if (rv != 0) {
        mg_pcache_free(p->cache);
        p->cache = NULL;
        return rv;
    }
    mg_log_info("presence", "presence cache on max_users=%zu", max_users);
    return 0;
}
