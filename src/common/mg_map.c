/* mg_map.c: string-keyed open-addressing hash map (see mg_map.h).
 *
 * Deletion uses backward-shift, so there are no tombstones and lookups stay
 * short under churn (presence and dedupe maps see constant insert/delete).
 */
#include "common/mg_map.h"
#include "common/mg_alloc.h"

#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

struct slot {
    char *key; /* NULL: empty */
    uint64_t hash;
    void *value;
};

struct mg_map {
    struct slot *slots;
    size_t cap; /* power of two */
    size_t size;
};

/* 64 x 64 -> 128-bit multiply, the halves folded: the mixing step. */
static inline uint64_t fold_mul(uint64_t a, uint64_t b)
{
    unsigned __int128 r = (unsigned __int128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

/* Seeded once per process from the kernel's exec-time random bytes, so a
 * client cannot pick user ids that collide in every gateway's tables. */
static uint64_t hash_seed(void)
{
    static uint64_t seed;
    uint64_t s = __atomic_load_n(&seed, __ATOMIC_RELAXED);
    if (!s) {
        const unsigned char *r = (const unsigned char *)getauxval(AT_RANDOM);
        if (r)
            memcpy(&s, r, sizeof(s));
        s |= 1;
        __atomic_store_n(&seed, s, __ATOMIC_RELAXED);
    }
    return s;
}

uint64_t mg_hash(const void *data, size_t len)
{
    /* Eight bytes a step (a key is a user or connection id, or a message id
     * and a recipient: 10 to 80 bytes); byte-at-a-time FNV-1a was a visible
     * share of a fan-out's CPU. */
    const unsigned char *p = data;
    uint64_t h = hash_seed() ^ (len * 0x9e3779b97f4a7c15ULL);
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = fold_mul(h ^ w, 0xbf58476d1ce4e5b9ULL);
    }
    uint64_t w = 0;
    memcpy(&w, p, len);
    h = fold_mul(h ^ w, 0x94d049bb133111ebULL);
    return fold_mul(h, 0x9e3779b97f4a7c15ULL);
}

mg_map *mg_map_create(size_t initial_capacity)
{
    mg_map *m = mg_new(mg_map);
    m->cap = 16;
    while (m->cap < initial_capacity * 2)
        m->cap <<= 1;
    m->slots = mg_xcalloc(m->cap, sizeof(struct slot));
    return m;
}

void mg_map_free(mg_map *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->cap; i++)
        free(m->slots[i].key);
    free(m->slots);
    free(m);
}

static size_t find(const mg_map *m, const char *key, uint64_t h)
{
    size_t mask = m->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        struct slot *s = &m->slots[i];
        if (!s->key || (s->hash == h && strcmp(s->key, key) == 0))
            return i;
    }
}

static void grow(mg_map *m)
{
    struct slot *old = m->slots;
    size_t oldcap = m->cap;
    m->cap <<= 1;
    m->slots = mg_xcalloc(m->cap, sizeof(struct slot));
    for (size_t i = 0; i < oldcap; i++)
        if (old[i].key)
            m->slots[find(m, old[i].key, old[i].hash)] = old[i];
    free(old);
}

void *mg_map_get(const mg_map *m, const char *key)
{
    uint64_t h = mg_hash(key, strlen(key));
    struct slot *s = &m->slots[find(m, key, h)];
    return s->key ? s->value : NULL;
}

void *mg_map_put(mg_map *m, const char *key, void *value)
{
    if ((m->size + 1) * 4 > m->cap * 3)
        grow(m);
    uint64_t h = mg_hash(key, strlen(key));
    struct slot *s = &m->slots[find(m, key, h)];
    if (s->key) {
        void *prev = s->value;
        s->value = value;
        return prev;
    }
    s->key = mg_xstrdup(key);
    s->hash = h;
    s->value = value;
    m->size++;
    return NULL;
}

void *mg_map_del(mg_map *m, const char *key)
{
    uint64_t h = mg_hash(key, strlen(key));
    size_t mask = m->cap - 1, i = find(m, key, h);
    if (!m->slots[i].key)
        return NULL;
    void *value = m->slots[i].value;
    free(m->slots[i].key);
    m->slots[i].key = NULL;
    m->size--;
    /* Backward-shift the cluster that follows. */
    for (size_t j = (i + 1) & mask; m->slots[j].key; j = (j + 1) & mask) {
        size_t home = m->slots[j].hash & mask;
        /* Move j into the hole i unless home lies cyclically in (i, j]. */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            m->slots[i] = m->slots[j];
            m->slots[j].key = NULL;
            i = j;
        }
    }
    return value;
}

size_t mg_map_size(const mg_map *m)
{
    return m->size;
}

int mg_map_next(const mg_map *m, size_t *it, const char **key, void **value)
{
    while (*it < m->cap) {
        struct slot *s = &m->slots[(*it)++];
        if (s->key) {
            if (key)
                *key = s->key;
            if (value)
                *value = s->value;
            return 1;
        }
    }
    return 0;
}
