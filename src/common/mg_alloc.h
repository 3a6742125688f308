/* mg_alloc.h: the allocation family.
 *
 * Allocation failure aborts, as in Redis and h2o: memory is bounded by design
 * (queue limits, caps, leases) rather than by checking every malloc. Every
 * allocation in meshgate goes through these, so a test build can count them.
 */
#ifndef MG_ALLOC_H
#define MG_ALLOC_H

#include <stddef.h>

void *mg_xmalloc(size_t n);
void *mg_xcalloc(size_t count, size_t n);
void *mg_xrealloc(void *p, size_t n);
char *mg_xstrdup(const char *s);
char *mg_xstrndup(const char *s, size_t n);
void *mg_xmemdup(const void *p, size_t n);
/* printf into a fresh string the caller frees. */
char *mg_xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define mg_new(type) ((type *)mg_xcalloc(1, sizeof(type)))

#endif
