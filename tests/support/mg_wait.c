/* mg_wait.c: see mg_wait.h. One waiter per call, on the test's stack. */
#include "support/mg_wait.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    mg_send_result *res;
    size_t n;
    mg_deliver_outcome *out;
} waiter;

static void w_init(waiter *w)
{
    memset(w, 0, sizeof(*w));
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
}

static void w_signal(waiter *w)
{
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void w_wait(waiter *w)
{
    pthread_mutex_lock(&w->mu);
    while (!w->done)
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
}

static void on_send(void *arg, const mg_send_result *res)
{
    waiter *w = arg;
    *w->res = *res;
    w_signal(w);
}

static void on_batch(void *arg, const mg_send_result *res, size_t n)
{
    waiter *w = arg;
    memcpy(w->res, res, n * sizeof(*res));
    w_signal(w);
}

static void on_deliver(void *arg, const mg_deliver_outcome *out)
{
    waiter *w = arg;
    *w->out = *out;
    w_signal(w);
}

int mg_wait_send(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_result *res)
{
    waiter w;
    w_init(&w);
    w.res = res;
    memset(res, 0, sizeof(*res));
    int rc = mg_router_send(r, msg, deadline_ms, on_send, &w);
    if (rc == 0)
        w_wait(&w);
    return rc;
}

int mg_wait_send_batch(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                       int64_t deadline_ms, mg_send_result *res)
{
    waiter w;
    w_init(&w);
    w.res = res;
    int rc = mg_router_send_batch(r, msg, to, n, deadline_ms, on_batch, &w);
    if (rc == 0)
        w_wait(&w);
    return rc;
}

int mg_wait_from_queue(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_result *res)
{
    waiter w;
    w_init(&w);
    w.res = res;
    memset(res, 0, sizeof(*res));
    int rc = mg_router_deliver_from_queue(r, msg, deadline_ms, on_send, &w);
    if (rc != 0)
        return rc;
    w_wait(&w);
    return res->status == MG_STATUS_FAILED ? -EAGAIN : 0;
}

int mg_wait_deliver_local(mg_router *r, const mg_msg *msg, mg_deliver_outcome *out)
{
    mg_deliver_outcome o;
    waiter w;
    w_init(&w);
    w.out = out ? out : &o;
    int rc = mg_router_deliver_local(r, msg, on_deliver, &w);
    if (rc != 0)
        return rc;
    w_wait(&w);
    return (int)w.out->connections;
}

int mg_wait_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                    int64_t deadline_ms, mg_deliver_outcome *out)
{
    waiter w;
    w_init(&w);
    w.out = out;
    memset(out, 0, sizeof(*out));
    int rc = t->ops->deliver(t, target, msg, deadline_ms, on_deliver, &w);
    if (rc >= 0) /* MG_DELIVER_UNORDERED too: done runs */
        w_wait(&w);
    return rc;
}
