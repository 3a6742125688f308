/* ws_user.c: a test user's WebSocket connection read by its own thread (see
 * ws_user.h). */
#include "support/ws_user.h"
#include "common/mg_map.h"
#include "common/mg_time.h"
#include "support/ws_json.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

struct mg_wsuser {
    mg_wsc *ws; /* the reader's; its fd may be shut down by any thread */
    mg_wsuser_dial_fn dial;
    void *arg;
    pthread_t th;
    atomic_bool stop, connected;
    atomic_int reconnects, fd;
    pthread_mutex_t mu;
    mg_map *got; /* message id -> times shown (intptr_t) */
    int dups;
};

static void on_frame(mg_wsuser *u, const char *text)
{
    json_t *j = json_loads(text, 0, NULL);
    const char *id = j ? mg_wsc_take_message(u->ws, j) : NULL;
    if (id) {
        pthread_mutex_lock(&u->mu);
        intptr_t n = (intptr_t)mg_map_get(u->got, id);
        mg_map_put(u->got, id, (void *)(n + 1));
        u->dups += n >= 1;
        pthread_mutex_unlock(&u->mu);
    }
    json_decref(j);
}

static void *reader_main(void *arg)
{
    mg_wsuser *u = arg;
    while (!atomic_load(&u->stop)) {
        char *f = mg_wsc_recv_text(u->ws, 100);
        if (f) {
            on_frame(u, f);
            free(f);
            continue;
        }
        if (mg_wsc_close_code(u->ws) == 0)
            continue; /* a timeout */
        atomic_store(&u->connected, false);
        mg_wsc *ws = NULL;
        for (int64_t end = mg_mono_ms() + 60000;
             !ws && !atomic_load(&u->stop) && mg_mono_ms() < end;) {
            ws = u->dial(u->arg);
            if (!ws)
                usleep(100 * 1000);
        }
        if (!ws)
            break;
        mg_wsc_free(u->ws);
        u->ws = ws;
        atomic_store(&u->fd, mg_wsc_fd(ws));
        atomic_fetch_add(&u->reconnects, 1);
        atomic_store(&u->connected, true);
    }
    return NULL;
}

mg_wsuser *mg_wsuser_start(mg_wsc *ws, mg_wsuser_dial_fn dial, void *arg)
{
    mg_wsuser *u = calloc(1, sizeof(*u));
    u->ws = ws;
    u->dial = dial;
    u->arg = arg;
    pthread_mutex_init(&u->mu, NULL);
    u->got = mg_map_create(1024);
    atomic_store(&u->fd, mg_wsc_fd(ws));
    atomic_store(&u->connected, true);
    pthread_create(&u->th, NULL, reader_main, u);
    return u;
}

int mg_wsuser_count(mg_wsuser *u, const char *id)
{
    pthread_mutex_lock(&u->mu);
    int n = (int)(intptr_t)mg_map_get(u->got, id);
    pthread_mutex_unlock(&u->mu);
    return n;
}

bool mg_wsuser_got(mg_wsuser *u, const char *id, int timeout_ms)
{
    int64_t end = mg_mono_ms() + timeout_ms;
    while (mg_wsuser_count(u, id) == 0 && mg_mono_ms() < end)
        usleep(20 * 1000);
    return mg_wsuser_count(u, id) > 0;
}

int mg_wsuser_dups(mg_wsuser *u)
{
    pthread_mutex_lock(&u->mu);
    int n = u->dups;
    pthread_mutex_unlock(&u->mu);
    return n;
}

int mg_wsuser_reconnects(mg_wsuser *u)
{
    return atomic_load(&u->reconnects);
}

bool mg_wsuser_connected(mg_wsuser *u)
{
    return atomic_load(&u->connected);
}

void mg_wsuser_redial(mg_wsuser *u)
{
    shutdown(atomic_load(&u->fd), SHUT_RDWR);
}

void mg_wsuser_free(mg_wsuser *u)
{
    if (!u)
        return;
    atomic_store(&u->stop, true);
    pthread_join(u->th, NULL);
    mg_wsc_free(u->ws);
    mg_map_free(u->got);
    pthread_mutex_destroy(&u->mu);
    free(u);
}
