/* dedupe.c: a bounded window of recent message ids (see dedupe.h).
 *
 * Stripes, each a ring of its last ids plus a map for membership under its
 * own mutex; an id belongs to the stripe its hash names. Every local write
 * passes here (transport_local.c), from every thread that delivers, so one
 * mutex for all was a fifth of the gateway's CPU at 160,000 msg/s (lock
 * waits and their futex calls). A window of fewer than 2 * STRIPE_MIN ids
 * is one stripe: exactly the last `capacity` ids. A larger one is split
 * evenly: each stripe keeps its share, so which id leaves first is decided
 * per stripe, and the window holds up to `capacity` ids in all (the most
 * recent ones of every stripe).
 */
#include "router/dedupe.h"
#include "common/mg_alloc.h"
#include "common/mg_map.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define STRIPES_MAX 16   /* a power of two */
#define STRIPE_MIN  1024 /* ids per stripe, at least */

typedef struct stripe {
    pthread_mutex_t mu;
    mg_map *seen;
    char **ring;
    size_t cap, head, len;
} stripe;

struct mg_dedupe {
    size_t nstripes; /* a power of two */
    stripe s[];
};

mg_dedupe *mg_dedupe_create(size_t capacity)
{
    if (capacity == 0)
        capacity = 1;
    size_t n = 1;
    while (n < STRIPES_MAX && capacity / (n * 2) >= STRIPE_MIN)
        n *= 2;
    mg_dedupe *d = mg_xcalloc(1, sizeof(*d) + n * sizeof(d->s[0]));
    d->nstripes = n;
    for (size_t i = 0; i < n; i++) {
        stripe *s = &d->s[i];
        pthread_mutex_init(&s->mu, NULL);
        s->cap = capacity / n + (i < capacity % n); /* the shares add up to capacity */
        s->ring = mg_xcalloc(s->cap, sizeof(char *));
        s->seen = mg_map_create(s->cap);
    }
    return d;
}

void mg_dedupe_free(mg_dedupe *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->nstripes; i++) {
        stripe *s = &d->s[i];
        for (size_t k = 0; k < s->len; k++)
            free(s->ring[(s->head + k) % s->cap]);
        free(s->ring);
        mg_map_free(s->seen);
        pthread_mutex_destroy(&s->mu);
    }
    free(d);
}

static stripe *stripe_of(mg_dedupe *d, const char *id)
{
    if (d->nstripes == 1)
        return &d->s[0];
    /* high bits: the stripe's map takes its slots from the low ones */
    return &d->s[(mg_hash(id, strlen(id)) >> 48) & (d->nstripes - 1)];
}

bool mg_dedupe_check_and_add(mg_dedupe *d, const char *id)
{
    stripe *s = stripe_of(d, id);
    pthread_mutex_lock(&s->mu);
    bool seen = mg_map_get(s->seen, id) != NULL;
    if (!seen) {
        if (s->len == s->cap) {
            char *old = s->ring[s->head];
            mg_map_del(s->seen, old);
            free(old);
            s->head = (s->head + 1) % s->cap;
            s->len--;
        }
        s->ring[(s->head + s->len) % s->cap] = mg_xstrdup(id);
        s->len++;
        mg_map_put(s->seen, id, (void *)1);
    }
    pthread_mutex_unlock(&s->mu);
    return seen;
}

void mg_dedupe_forget(mg_dedupe *d, const char *id)
{
    /* The ring keeps its copy until it ages out; only membership goes. A
     * later add of the same id re-enters the map and the ring, and the stale
     * ring copy then removes it early: acceptable, the window is a bound on
     * memory, not a promise of exact length. */
    stripe *s = stripe_of(d, id);
    pthread_mutex_lock(&s->mu);
    mg_map_del(s->seen, id);
    pthread_mutex_unlock(&s->mu);
}
