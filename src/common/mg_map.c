/* mg_map.c: string-keyed open-addressing hash map (see mg_map.h).
 *
 * Deletion uses backward-shift, so there are no tombstones and lookups stay
 * short under churn (presence and dedupe maps see constant insert/delete).
 */
#include "common/mg_map.h"
#include "common/mg_alloc.h"

#include <stdlib.h>
#include <string.h>

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

uint64_t mg_hash(const void *data, size_t len)
{
    /* FNV-1a then a murmur finalizer for the low bits. */
    const unsigned char *p = data;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
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
