/* mg_recsink.c: the recording local sink of tests (see mg_recsink.h). */
#include "support/mg_recsink.h"
#include "common/mg_time.h"
#include "router/router.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "support/mg_test.h"

#include <criterion/criterion.h>
#include <stdio.h>

#include <string.h>

void mg_recsink_init(mg_recsink *r)
{
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->mu, NULL);
    r->seen = mg_map_create(64);
}

void mg_recsink_destroy(mg_recsink *r)
{
    mg_map_free(r->seen);
    pthread_mutex_destroy(&r->mu);
}

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    mg_recsink *r = arg;
    int64_t now = mg_mono_us(), sent = 0;
    pthread_mutex_lock(&r->mu);
    intptr_t n = (intptr_t)mg_map_get(r->seen, msg->id);
    mg_map_put(r->seen, msg->id, (void *)(n + 1));
    r->total++;
    if (msg->content_len == sizeof(sent) && r->nlat < MG_RECSINK_LAT_MAX) {
        memcpy(&sent, msg->content, sizeof(sent));
        r->lat_us[r->nlat++] = now - sent;
    }
    pthread_mutex_unlock(&r->mu);
    if (written)
        written(written_arg, 1);
    return 1;
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return 0;
}

mg_local_sink mg_recsink_sink(mg_recsink *r)
{
    return (mg_local_sink){.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = r};
}

int mg_recsink_count(mg_recsink *r, const char *id)
{
    pthread_mutex_lock(&r->mu);
    int n = (int)(intptr_t)mg_map_get(r->seen, id);
    pthread_mutex_unlock(&r->mu);
    return n;
}

int mg_recsink_total(mg_recsink *r)
{
    pthread_mutex_lock(&r->mu);
    int n = r->total;
    pthread_mutex_unlock(&r->mu);
    return n;
}

typedef struct {
    mg_recsink *r;
    int n;
} total_arg;

static bool total_reached(void *arg)
{
    total_arg *a = arg;
    return mg_recsink_total(a->r) >= a->n;
}

bool mg_recsink_wait_total(mg_recsink *r, int n, int timeout_ms)
{
    total_arg a = {r, n};
    return mg_wait_until(total_reached, &a, timeout_ms);
}

mg_router *mg_sink_router(const char *gw, const char *region, const mg_local_sink *sink, int users)
{
    mg_router_config rc = {.gateway_id = gw,
                           .region = region,
                           .hot_window_seconds = 10,
                           .hot_threshold = 100000,
                           .hot_capacity = 64,
                           .dedupe_window = 8192};
    mg_router *rt = mg_router_create(&rc, mg_presence_memory_create(gw, region),
                                     mg_inbox_memory_create(1000, 3600), sink, NULL);
    for (int i = 0; i < users; i++) {
        char user[32], conn[32];
        snprintf(user, sizeof(user), "u%d", i);
        snprintf(conn, sizeof(conn), "%s-c%d", gw, i);
        cr_assert_eq(mg_router_user_connected(rt, user, conn, mg_now_ms()), 0);
    }
    return rt;
}

mg_router *mg_recsink_router(const char *gw, const char *region, mg_recsink *r, int users)
{
    mg_local_sink sink = mg_recsink_sink(r);
    return mg_sink_router(gw, region, &sink, users);
}
