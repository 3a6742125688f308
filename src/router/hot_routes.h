/* hot_routes.h: which (from, to) pairs are hot.
 *
 * A pair is hot when it sent at least `threshold` messages within the last
 * `window_seconds` (a sliding window of one-second buckets). Memory is
 * bounded: a fixed table of `capacity` pairs; when a pair finds no free slot
 * among its probe sequence it replaces the coldest one there (the
 * Space-Saving idea), so heavy pairs stay tracked and light ones churn.
 *
 * Thread-safety: all calls may come from any thread (striped locks).
 */
#ifndef MG_HOT_ROUTES_H
#define MG_HOT_ROUTES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct mg_hot mg_hot;

mg_hot *mg_hot_create(int window_seconds, int threshold, size_t capacity);
void mg_hot_free(mg_hot *h);
/* Counts one message of the pair at now_ms and returns whether the pair is
 * hot counting this message. */
bool mg_hot_hit(mg_hot *h, const char *from, const char *to, int64_t now_ms);
/* Pairs currently hot (for the meshgate_hot_pairs gauge). */
size_t mg_hot_count(mg_hot *h, int64_t now_ms);

#endif
