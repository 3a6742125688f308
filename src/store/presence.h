/* presence.h: where users are connected (the presence store interface).
 *
 * A user may hold several connections on several gateways. A backend is
 * created for one gateway (its id and region are stamped on the entries it
 * writes) and answers lookups for all users. Backends: presence_memory.c
 * (single gateway, the embedded default) and presence_redis.c (Redis Cluster,
 * with gateway leases so a crashed gateway's entries vanish on their own).
 *
 * Thread-safety: every op may be called from any thread concurrently, but
 * may block on I/O, so never from the WebSocket service thread.
 * Return values: 0 or a negative errno (-EIO, -ETIMEDOUT: store unreachable;
 * -EINVAL: bad argument). On failure nothing has changed.
 */
#ifndef MG_PRESENCE_H
#define MG_PRESENCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One allocation: conn_id owns it, gateway_id and region point into it
 * (mg_presence_list_add); freed by mg_conn_ref_free. */
typedef struct mg_conn_ref {
    char *conn_id;
    char *gateway_id;
    char *region;
    int64_t connected_at_ms;
} mg_conn_ref;

typedef struct mg_presence_list {
    mg_conn_ref *items;
    size_t n, cap;
    /* The region where the user's offline inbox lives when it is not this
     * gateway's (set by the multi-region store, presence_sync.h); NULL: here. */
    char *home_region;
} mg_presence_list;

void mg_presence_list_add(mg_presence_list *l, const char *conn_id, const char *gateway_id,
                          const char *region, int64_t connected_at_ms);
void mg_presence_list_clear(mg_presence_list *l); /* frees the items, keeps l usable */
void mg_conn_ref_free(mg_conn_ref *ref);

typedef struct mg_presence mg_presence;

struct mg_presence_ops {
    const char *name;
    int (*connect)(mg_presence *p, const char *user, const char *conn_id, int64_t now_ms);
    int (*disconnect)(mg_presence *p, const char *user, const char *conn_id);
    /* Appends the user's live connections to out (nothing when offline). */
    int (*lookup)(mg_presence *p, const char *user, mg_presence_list *out);
    /* outs[i] receives users[i]'s connections; pipelined where the backend can. */
    int (*lookup_batch)(mg_presence *p, const char *const *users, size_t n, mg_presence_list *outs);
    /* Extends this gateway's lease; the gateway calls it every lease/3. */
    int (*renew)(mg_presence *p);
    /* Drops every entry of this gateway (graceful shutdown). */
    int (*remove_gateway)(mg_presence *p);
    void (*free)(mg_presence *p);
    /* Every op is in memory and never blocks (the embedded default): the
     * WebSocket thread may then route its own sends without a hand-off. */
    bool nonblocking;
    /* Answers from memory, never blocking, on any thread: 1 with the user's
     * connections appended to out, 0 when it cannot (then call lookup).
     * NULL: the backend has no cache. */
    int (*lookup_cached)(mg_presence *p, const char *user, mg_presence_list *out);
};

struct mg_presence {
    const struct mg_presence_ops *ops;
};

/* The in-memory backend: one gateway, no lease needed. */
mg_presence *mg_presence_memory_create(const char *gateway_id, const char *region);

static inline void mg_presence_free(mg_presence *p)
{
    if (p)
        p->ops->free(p);
}

#endif
