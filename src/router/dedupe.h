/* dedupe.h: a bounded window of recent message ids.
 *
 * The receiving side of the peer and Kafka paths remembers the last
 * `capacity` ids it delivered, so a retry (gRPC retry, Kafka redelivery after
 * a rebalance) never shows a client the same message twice. Oldest ids leave
 * first. Thread-safe.
 */
#ifndef MG_DEDUPE_H
#define MG_DEDUPE_H

#include <stdbool.h>
#include <stddef.h>

typedef struct mg_dedupe mg_dedupe;

mg_dedupe *mg_dedupe_create(size_t capacity);
void mg_dedupe_free(mg_dedupe *d);
/* Returns true when id was seen within the window; otherwise records it and
 * returns false. */
bool mg_dedupe_check_and_add(mg_dedupe *d, const char *id);
/* Forgets id (delivery failed after the check, so a retry must go through). */
void mg_dedupe_forget(mg_dedupe *d, const char *id);

#endif
