/* presence_cache.c: the presence cache (see presence_cache.h).
 *
 * DESIGN
 * - One mutex over a map user -> entry (one allocation: the connections and
 *   their strings), a counter per bucket of users (MG_PCACHE_BUCKETS) moved
 *   on by each forget of a user of that bucket, and a generation moved on
 *   by each forget of everyone. A ticket is the bucket's counter and the
 *   generation; a put whose ticket no longer matches is dropped. Buckets
 *   keep the counters bounded: a forget of another user of the bucket only
 *   costs a put.
 */
#include "store/presence_cache.h"

#include "common/mg_alloc.h"
#include "common/mg_map.h"
#include "common/mg_time.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MG_PCACHE_BUCKETS 4096

typedef struct pentry {
    int64_t read_ms;
    size_t n;
    mg_pcache_conn conns[]; /* then the strings */
} pentry;

struct mg_pcache {
    pthread_mutex_t mu;
    mg_map *users; /* user -> pentry* */
    size_t max_users;
    uint64_t gen;
    uint32_t seq[MG_PCACHE_BUCKETS];
    uint64_t hits, misses, forgotten;
};

static unsigned bucket_of(const char *user, size_t len)
{
    return (unsigned)(mg_hash(user, len) % MG_PCACHE_BUCKETS);
}

mg_pcache *mg_pcache_create(size_t max_users)
{
    mg_pcache *c = mg_new(mg_pcache);
    pthread_mutex_init(&c->mu, NULL);
    c->users = mg_map_create(64);
    c->max_users = max_users;
    return c;
}

static void drop_all_locked(mg_pcache *c)
{
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(c->users, &it, &k, &v);)
        free(v);
    mg_map_free(c->users);
    c->users = mg_map_create(64);
}

void mg_pcache_free(mg_pcache *c)
{
    if (!c)
        return;
    drop_all_locked(c);
    mg_map_free(c->users);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

void mg_pcache_take_ticket(mg_pcache *c, const char *user, mg_pcache_ticket *t)
{
    unsigned b = bucket_of(user, strlen(user));
    pthread_mutex_lock(&c->mu);
    t->gen = c->gen;
    t->seq = c->seq[b];
    pthread_mutex_unlock(&c->mu);
}

static pentry *entry_new(const mg_pcache_conn *conns, size_t n)
{
    size_t strs = 0;
    for (size_t i = 0; i < n; i++)
        strs += strlen(conns[i].conn) + strlen(conns[i].gateway) + strlen(conns[i].region) + 3;
    pentry *e = mg_xmalloc(sizeof(*e) + n * sizeof(e->conns[0]) + strs);
    e->read_ms = mg_mono_ms();
    e->n = n;
    char *at = (char *)&e->conns[n];
    for (size_t i = 0; i < n; i++) {
        const char *src[3] = {conns[i].conn, conns[i].gateway, conns[i].region};
        const char **dst[3] = {&e->conns[i].conn, &e->conns[i].gateway, &e->conns[i].region};
        for (int k = 0; k < 3; k++) {
            size_t len = strlen(src[k]) + 1;
            memcpy(at, src[k], len);
            *dst[k] = at;
            at += len;
        }
        e->conns[i].at_ms = conns[i].at_ms;
    }
    return e;
}

void mg_pcache_put(mg_pcache *c, const char *user, const mg_pcache_ticket *t,
                   const mg_pcache_conn *conns, size_t n)
{
    unsigned b = bucket_of(user, strlen(user));
    pentry *e = entry_new(conns, n);
    pthread_mutex_lock(&c->mu);
    if (t->gen != c->gen || t->seq != c->seq[b]) {
        pthread_mutex_unlock(&c->mu);
        free(e);
        return;
    }
    if (mg_map_size(c->users) >= c->max_users)
        drop_all_locked(c);
    free(mg_map_put(c->users, user, e));
    pthread_mutex_unlock(&c->mu);
}

int mg_pcache_get(mg_pcache *c, const char *user, int (*alive)(void *arg, const char *gateway),
                  void *arg, mg_presence_list *out)
{
    size_t had = out->n;
    int rv = 0;
    pthread_mutex_lock(&c->mu);
    pentry *e = mg_map_get(c->users, user);
    if (e && mg_mono_ms() - e->read_ms > MG_PCACHE_MAX_AGE_MS) {
        free(mg_map_del(c->users, user));
        e = NULL;
    }
    if (e) {
        rv = 1;
        for (size_t i = 0; i < e->n && rv; i++) {
            int a = alive(arg, e->conns[i].gateway);
            if (a > 0)
                mg_presence_list_add(out, e->conns[i].conn, e->conns[i].gateway, e->conns[i].region,
                                     e->conns[i].at_ms);
            rv = a >= 0;
        }
    }
    if (rv)
        c->hits++;
    else
        c->misses++;
    pthread_mutex_unlock(&c->mu);
    while (!rv && out->n > had) /* undo a partial answer */
        mg_conn_ref_free(&out->items[--out->n]);
    if (!rv && had == 0 && out->items) { /* and the room it made */
        free(out->items);
        out->items = NULL;
        out->cap = 0;
    }
    return rv;
}

void mg_pcache_forget(mg_pcache *c, const char *user, size_t len)
{
    char small[256];
    char *name = NULL;
    if (user) {
        name = len < sizeof(small) ? small : mg_xmalloc(len + 1);
        memcpy(name, user, len);
        name[len] = '\0';
    }
    pthread_mutex_lock(&c->mu);
    if (name) {
        c->seq[bucket_of(name, len)]++;
        pentry *e = mg_map_del(c->users, name);
        c->forgotten += e != NULL;
        free(e);
    } else {
        c->gen++;
        c->forgotten += mg_map_size(c->users);
        drop_all_locked(c);
    }
    pthread_mutex_unlock(&c->mu);
    if (name != small)
        free(name);
}

void mg_pcache_stats_get(mg_pcache *c, mg_pcache_stats *out)
{
    pthread_mutex_lock(&c->mu);
    out->hits = c->hits;
    out->misses = c->misses;
    out->forgotten = c->forgotten;
    out->users = mg_map_size(c->users);
    pthread_mutex_unlock(&c->mu);
}
