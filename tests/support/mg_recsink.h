/* mg_recsink.h: a local sink for in-process routers in tests that records
 * what it was given: how many times each message id was delivered, the
 * total, and (for messages whose content is the 8-byte mg_mono_us() of their
 * send) the send-to-delivery latencies. Writes are reported at once. */
#ifndef MG_TEST_RECSINK_H
#define MG_TEST_RECSINK_H

#include "common/mg_map.h"
#include "router/transport.h"

#include <pthread.h>
#include <stdint.h>

#define MG_RECSINK_LAT_MAX 1024

typedef struct mg_recsink {
    pthread_mutex_t mu; /* everything below */
    mg_map *seen;       /* message id -> times delivered */
    int total;
    int64_t lat_us[MG_RECSINK_LAT_MAX];
    int nlat;
} mg_recsink;

void mg_recsink_init(mg_recsink *r);
void mg_recsink_destroy(mg_recsink *r);
/* The sink to hand to mg_router_create; r must outlive the router. */
mg_local_sink mg_recsink_sink(mg_recsink *r);
int mg_recsink_count(mg_recsink *r, const char *id);
int mg_recsink_total(mg_recsink *r);
/* Waits up to timeout_ms for the total to reach n; returns whether it did. */
bool mg_recsink_wait_total(mg_recsink *r, int n, int timeout_ms);

typedef struct mg_router mg_router;
/* An in-process router (memory presence and inbox, no store pool) writing to
 * r, with users "u0".."u<users-1>" connected as "<gw>-c<i>". */
mg_router *mg_recsink_router(const char *gw, const char *region, mg_recsink *r, int users);
/* The same router writing to any sink (copied). */
mg_router *mg_sink_router(const char *gw, const char *region, const mg_local_sink *sink, int users);

#endif
