/* presence_cache.h: users' connections kept in-process between lookups, for
 * a presence store whose backend says when they change (presence_redis.c,
 * with Redis tracking: redis_cluster.h).
 *
 * A lookup takes a ticket before it reads the store, and puts what it read
 * with that ticket: the put is dropped when the user (or everything) was
 * forgotten since, so a change the backend reported during the read is never
 * overwritten by the older value. Bounded: past max_users, everything is
 * dropped (the working set refills on its next lookups). An entry is also
 * dropped MG_PCACHE_MAX_AGE_MS after it was read, whatever happened.
 * Thread-safety: every call from any thread; get runs alive() under the
 * cache's lock (so alive must not call back into the cache).
 */
#ifndef MG_PRESENCE_CACHE_H
#define MG_PRESENCE_CACHE_H

#include "store/presence.h"

#include <stddef.h>
#include <stdint.h>

#define MG_PCACHE_MAX_AGE_MS 10000

typedef struct mg_pcache mg_pcache;

typedef struct mg_pcache_conn {
    const char *conn, *gateway, *region;
    int64_t at_ms;
} mg_pcache_conn;

typedef struct mg_pcache_ticket {
    uint64_t gen;
    uint32_t seq;
} mg_pcache_ticket;

typedef struct mg_pcache_stats {
    uint64_t hits, misses, forgotten;
    size_t users;
} mg_pcache_stats;

mg_pcache *mg_pcache_create(size_t max_users);
void mg_pcache_free(mg_pcache *c);

void mg_pcache_take_ticket(mg_pcache *c, const char *user, mg_pcache_ticket *t);
/* Keeps user's n connections (n = 0: offline), unless user was forgotten
 * since t was taken. Strings are copied. */
void mg_pcache_put(mg_pcache *c, const char *user, const mg_pcache_ticket *t,
                   const mg_pcache_conn *conns, size_t n);
/* 1: out got user's kept connections, those alive() says 1 of; 0: nothing
 * kept, or alive() said -1 (unknown) of one (out is then as it was). */
int mg_pcache_get(mg_pcache *c, const char *user, int (*alive)(void *arg, const char *gateway),
                  void *arg, mg_presence_list *out);
/* user: len bytes, not NUL-terminated; NULL: everyone. */
void mg_pcache_forget(mg_pcache *c, const char *user, size_t len);
void mg_pcache_stats_get(mg_pcache *c, mg_pcache_stats *out);

#endif
