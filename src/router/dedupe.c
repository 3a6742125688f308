/* dedupe.c: a bounded window of recent message ids (see dedupe.h).
 *
 * A ring of the last `capacity` ids plus a map for membership, under one
 * mutex. When the ring is full the oldest id leaves both.
 */
#include "router/dedupe.h"
#include "common/mg_alloc.h"
#include "common/mg_map.h"

#include <pthread.h>
#include <stdlib.h>

struct mg_dedupe {
    pthread_mutex_t mu;
    mg_map *seen;
    char **ring;
    size_t cap, head, len;
};

mg_dedupe *mg_dedupe_create(size_t capacity)
{
    mg_dedupe *d = mg_new(mg_dedupe);
    pthread_mutex_init(&d->mu, NULL);
    d->cap = capacity ? capacity : 1;
    d->ring = mg_xcalloc(d->cap, sizeof(char *));
    d->seen = mg_map_create(d->cap);
    return d;
}

void mg_dedupe_free(mg_dedupe *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->len; i++)
        free(d->ring[(d->head + i) % d->cap]);
    free(d->ring);
    mg_map_free(d->seen);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

bool mg_dedupe_check_and_add(mg_dedupe *d, const char *id)
{
    pthread_mutex_lock(&d->mu);
    bool seen = mg_map_get(d->seen, id) != NULL;
    if (!seen) {
        if (d->len == d->cap) {
            char *old = d->ring[d->head];
            mg_map_del(d->seen, old);
            free(old);
            d->head = (d->head + 1) % d->cap;
            d->len--;
        }
        d->ring[(d->head + d->len) % d->cap] = mg_xstrdup(id);
        d->len++;
        mg_map_put(d->seen, id, (void *)1);
    }
    pthread_mutex_unlock(&d->mu);
    return seen;
}

void mg_dedupe_forget(mg_dedupe *d, const char *id)
{
    /* The ring keeps its copy until it ages out; only membership goes. A
     * later add of the same id re-enters the map and the ring, and the stale
     * ring copy then removes it early: acceptable, the window is a bound on
     * memory, not a promise of exact length. */
    pthread_mutex_lock(&d->mu);
    mg_map_del(d->seen, id);
    pthread_mutex_unlock(&d->mu);
}
