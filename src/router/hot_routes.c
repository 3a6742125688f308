/* hot_routes.c: sliding-window rates of (from, to) pairs in bounded memory
 * (see hot_routes.h).
 *
 * DESIGN: `capacity` slots, each a pair's 64-bit hash, the second of its last
 * touch and one counter per second of the window (a ring indexed by
 * second % window). A pair probes MG_HOT_PROBES slots from its hash; with no
 * match and no empty slot it takes the slot whose window count is lowest.
 * Hash collisions merge two pairs' counts (64-bit: negligible). One mutex:
 * a hit is a handful of arithmetic operations.
 */
#include "router/hot_routes.h"
#include "common/mg_alloc.h"
#include "common/mg_map.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MG_HOT_PROBES     8
#define MG_HOT_MAX_WINDOW 300

struct slot {
    uint64_t key; /* 0: empty */
    int64_t last_sec;
};

struct mg_hot {
    pthread_mutex_t mu;
    int window, threshold;
    size_t cap;
    struct slot *slots;
    uint32_t *counts; /* cap * window */
};

mg_hot *mg_hot_create(int window_seconds, int threshold, size_t capacity)
{
    mg_hot *h = mg_new(mg_hot);
    pthread_mutex_init(&h->mu, NULL);
    h->window = window_seconds < 1                   ? 1
                : window_seconds > MG_HOT_MAX_WINDOW ? MG_HOT_MAX_WINDOW
                                                     : window_seconds;
    h->threshold = threshold < 1 ? 1 : threshold;
    h->cap = capacity < MG_HOT_PROBES ? MG_HOT_PROBES : capacity;
    h->slots = mg_xcalloc(h->cap, sizeof(struct slot));
    h->counts = mg_xcalloc(h->cap * (size_t)h->window, sizeof(uint32_t));
    return h;
}

void mg_hot_free(mg_hot *h)
{
    if (!h)
        return;
    pthread_mutex_destroy(&h->mu);
    free(h->slots);
    free(h->counts);
    free(h);
}

/* Zeroes the buckets of seconds after the slot's last touch, then sums. */
static uint64_t advance_and_sum(mg_hot *h, size_t i, int64_t now_sec)
{
    struct slot *s = &h->slots[i];
    uint32_t *c = &h->counts[i * (size_t)h->window];
    if (now_sec > s->last_sec) {
        int64_t gap = now_sec - s->last_sec;
        if (gap >= h->window)
            memset(c, 0, sizeof(uint32_t) * (size_t)h->window);
        else
            for (int64_t t = s->last_sec + 1; t <= now_sec; t++)
                c[t % h->window] = 0;
        s->last_sec = now_sec;
    }
    uint64_t sum = 0;
    for (int b = 0; b < h->window; b++)
        sum += c[b];
    return sum;
}

bool mg_hot_hit(mg_hot *h, const char *from, const char *to, int64_t now_ms)
{
    size_t fl = strlen(from), tl = strlen(to);
    char stackbuf[512], *buf = fl + tl + 1 <= sizeof(stackbuf) ? stackbuf : mg_xmalloc(fl + tl + 1);
    memcpy(buf, from, fl);
    buf[fl] = '\0'; /* separator: ("ab","c") and ("a","bc") differ */
    memcpy(buf + fl + 1, to, tl);
    uint64_t key = mg_hash(buf, fl + tl + 1) | 1;
    if (buf != stackbuf)
        free(buf);
    int64_t now_sec = now_ms / 1000;

    pthread_mutex_lock(&h->mu);
    size_t found = h->cap, victim = h->cap;
    uint64_t victim_sum = UINT64_MAX;
    for (size_t p = 0; p < MG_HOT_PROBES; p++) {
        size_t i = (key + p) % h->cap;
        if (h->slots[i].key == key) {
            found = i;
            break;
        }
        uint64_t sum = h->slots[i].key ? advance_and_sum(h, i, now_sec) : 0;
        if (sum < victim_sum)
            victim = i, victim_sum = sum;
    }
    if (found == h->cap) {
        found = victim;
        h->slots[found].key = key;
        h->slots[found].last_sec = now_sec;
        memset(&h->counts[found * (size_t)h->window], 0, sizeof(uint32_t) * (size_t)h->window);
    }
    uint64_t sum = advance_and_sum(h, found, now_sec);
    h->counts[found * (size_t)h->window + (size_t)(now_sec % h->window)]++;
    sum++;
    pthread_mutex_unlock(&h->mu);
    return sum >= (uint64_t)h->threshold;
}

size_t mg_hot_count(mg_hot *h, int64_t now_ms)
{
    size_t n = 0;
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->cap; i++)
        if (h->slots[i].key && advance_and_sum(h, i, now_ms / 1000) >= (uint64_t)h->threshold)
            n++;
    pthread_mutex_unlock(&h->mu);
    return n;
}
