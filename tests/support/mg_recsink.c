/* mg_recsink.c: the recording local sink of tests (see mg_recsink.h). */
#include "support/mg_recsink.h"
#include "common/mg_time.h"
#include "support/mg_test.h"

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
    return (mg_local_sink){sink_deliver, sink_disconnect, r};
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
