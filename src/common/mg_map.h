/* mg_map.h: a string-keyed hash map (open addressing, linear probing).
 *
 * Keys are copied; values are opaque pointers the caller owns. Not
 * thread-safe: the owner serializes access. Iteration order is unspecified.
 */
#ifndef MG_MAP_H
#define MG_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct mg_map mg_map;

mg_map *mg_map_create(size_t initial_capacity);
/* Frees the map and its key copies; values are not touched. NULL is a no-op. */
void mg_map_free(mg_map *m);
void *mg_map_get(const mg_map *m, const char *key);
/* Inserts or replaces; returns the previous value or NULL. */
void *mg_map_put(mg_map *m, const char *key, void *value);
/* Removes; returns the value or NULL when absent. */
void *mg_map_del(mg_map *m, const char *key);
size_t mg_map_size(const mg_map *m);

/* Iterate: for (size_t it = 0; mg_map_next(m, &it, &k, &v);) ...
 * The map must not be modified while iterating (backward-shift deletion may
 * move a later entry into a visited slot): collect keys first, then delete. */
int mg_map_next(const mg_map *m, size_t *it, const char **key, void **value);

/* The maps' hash: seeded per process (so only stable within one), eight
 * bytes a step. */
uint64_t mg_hash(const void *data, size_t len);

#endif
