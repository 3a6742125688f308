/* presence_memory.c: in-memory presence for the embedded single gateway.
 *
 * One map user -> list of connections under one mutex. Every entry is this
 * gateway's, so there is no lease: entries leave when connections close.
 * Thread-safety: all ops from any thread.
 */
#include "store/presence.h"
#include "common/mg_alloc.h"
#include "common/mg_map.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct conn {
    char *conn_id;
    int64_t connected_at_ms;
    struct conn *next;
};

typedef struct presence_memory {
    mg_presence base;
    pthread_mutex_t mu;
    mg_map *users; /* user -> struct conn list */
    char *gateway_id, *region;
} presence_memory;

void mg_presence_list_add(mg_presence_list *l, const char *conn_id, const char *gateway_id,
                          const char *region, int64_t connected_at_ms)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 4;
        l->items = mg_xrealloc(l->items, l->cap * sizeof(*l->items));
    }
    /* one block for the three strings (a fan-out adds one entry per
     * recipient): conn_id owns it, the other two point into it */
    size_t lc = strlen(conn_id) + 1, lg = strlen(gateway_id) + 1, lr = strlen(region) + 1;
    char *b = mg_xmalloc(lc + lg + lr);
    memcpy(b, conn_id, lc);
    memcpy(b + lc, gateway_id, lg);
    memcpy(b + lc + lg, region, lr);
    l->items[l->n++] = (mg_conn_ref){b, b + lc, b + lc + lg, connected_at_ms};
}

void mg_conn_ref_free(mg_conn_ref *ref)
{
    free(ref->conn_id);
    *ref = (mg_conn_ref){0};
}

void mg_presence_list_clear(mg_presence_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        mg_conn_ref_free(&l->items[i]);
    free(l->items);
    free(l->home_region);
    l->items = NULL;
    l->home_region = NULL;
    l->n = l->cap = 0;
}

static int pm_connect(mg_presence *p, const char *user, const char *conn_id, int64_t now_ms)
{
    presence_memory *pm = (presence_memory *)p;
    struct conn *c = mg_new(struct conn);
    c->conn_id = mg_xstrdup(conn_id);
    c->connected_at_ms = now_ms;
    pthread_mutex_lock(&pm->mu);
    c->next = mg_map_get(pm->users, user);
    mg_map_put(pm->users, user, c);
    pthread_mutex_unlock(&pm->mu);
    return 0;
}

static int pm_disconnect(mg_presence *p, const char *user, const char *conn_id)
{
    presence_memory *pm = (presence_memory *)p;
    int rc = -ENOENT;
    pthread_mutex_lock(&pm->mu);
    struct conn *head = mg_map_get(pm->users, user), **pp = &head;
    for (; *pp; pp = &(*pp)->next)
        if (!strcmp((*pp)->conn_id, conn_id)) {
            struct conn *gone = *pp;
            *pp = gone->next;
            free(gone->conn_id);
            free(gone);
            rc = 0;
            break;
        }
    if (head)
        mg_map_put(pm->users, user, head);
    else
        mg_map_del(pm->users, user);
    pthread_mutex_unlock(&pm->mu);
    return rc;
}

static void lookup_locked(presence_memory *pm, const char *user, mg_presence_list *out)
{
    for (struct conn *c = mg_map_get(pm->users, user); c; c = c->next)
        mg_presence_list_add(out, c->conn_id, pm->gateway_id, pm->region, c->connected_at_ms);
}

static int pm_lookup(mg_presence *p, const char *user, mg_presence_list *out)
{
    presence_memory *pm = (presence_memory *)p;
    pthread_mutex_lock(&pm->mu);
    lookup_locked(pm, user, out);
    pthread_mutex_unlock(&pm->mu);
    return 0;
}

static int pm_lookup_batch(mg_presence *p, const char *const *users, size_t n,
                           mg_presence_list *outs)
{
    presence_memory *pm = (presence_memory *)p;
    pthread_mutex_lock(&pm->mu);
    for (size_t i = 0; i < n; i++)
        lookup_locked(pm, users[i], &outs[i]);
    pthread_mutex_unlock(&pm->mu);
    return 0;
}

static int pm_renew(mg_presence *p)
{
    return 0;
}

static void free_all(presence_memory *pm)
{
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(pm->users, &it, &k, &v);)
        for (struct conn *c = v, *next; c; c = next) {
            next = c->next;
            free(c->conn_id);
            free(c);
        }
}

static int pm_remove_gateway(mg_presence *p)
{
    presence_memory *pm = (presence_memory *)p;
    pthread_mutex_lock(&pm->mu);
    free_all(pm);
    mg_map_free(pm->users);
    pm->users = mg_map_create(64);
    pthread_mutex_unlock(&pm->mu);
    return 0;
}

static void pm_free(mg_presence *p)
{
    presence_memory *pm = (presence_memory *)p;
    free_all(pm);
    mg_map_free(pm->users);
    pthread_mutex_destroy(&pm->mu);
    free(pm->gateway_id);
    free(pm->region);
    free(pm);
}

static const struct mg_presence_ops memory_ops = {
    .name = "memory",
    .nonblocking = true,
    .connect = pm_connect,
    .disconnect = pm_disconnect,
    .lookup = pm_lookup,
    .lookup_batch = pm_lookup_batch,
    .renew = pm_renew,
    .remove_gateway = pm_remove_gateway,
    .free = pm_free,
};

mg_presence *mg_presence_memory_create(const char *gateway_id, const char *region)
{
    presence_memory *pm = mg_new(presence_memory);
    pm->base.ops = &memory_ops;
    pthread_mutex_init(&pm->mu, NULL);
    pm->users = mg_map_create(64);
    pm->gateway_id = mg_xstrdup(gateway_id);
    pm->region = mg_xstrdup(region);
    return &pm->base;
}
