/* mg_pool.c: bounded worker pool (see mg_pool.h).
 *
 * DESIGN: a ring buffer of jobs under one mutex with two condition variables.
 * Jobs are short (one route decision and its I/O), so one lock is not the
 * bottleneck next to the I/O they do; profile before sharding it.
 */
#include "common/mg_pool.h"
#include "common/mg_alloc.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

struct job {
    mg_job_fn fn;
    void *arg;
};

struct mg_pool {
    pthread_mutex_t mu;
    pthread_cond_t nonempty;
    struct job *ring;
    size_t cap, head, len;
    bool stopping;
    int nthreads;
    pthread_t *threads;
};

static void *worker(void *arg)
{
    mg_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->len == 0 && !p->stopping)
            pthread_cond_wait(&p->nonempty, &p->mu);
        if (p->len == 0)
            break; /* stopping and drained */
        struct job j = p->ring[p->head];
        p->head = (p->head + 1) % p->cap;
        p->len--;
        pthread_mutex_unlock(&p->mu);
        j.fn(j.arg);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

mg_pool *mg_pool_create(const char *name, int nthreads, size_t max_queue)
{
    mg_pool *p = mg_new(mg_pool);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->nonempty, NULL);
    p->cap = max_queue ? max_queue : 1;
    p->ring = mg_xcalloc(p->cap, sizeof(struct job));
    p->nthreads = nthreads > 0 ? nthreads : 1;
    p->threads = mg_xcalloc((size_t)p->nthreads, sizeof(pthread_t));
    for (int i = 0; i < p->nthreads; i++) {
        if (pthread_create(&p->threads[i], NULL, worker, p) != 0)
            abort();
        char tname[32]; /* the kernel keeps 15 characters */
        snprintf(tname, sizeof(tname), "%.10s-%d", name, i);
        tname[15] = '\0';
        pthread_setname_np(p->threads[i], tname);
    }
    return p;
}

int mg_pool_submit(mg_pool *p, mg_job_fn fn, void *arg)
{
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    if (p->stopping)
        rc = -ESHUTDOWN;
    else if (p->len == p->cap)
        rc = -EAGAIN;
    else {
        p->ring[(p->head + p->len) % p->cap] = (struct job){fn, arg};
        p->len++;
        pthread_cond_signal(&p->nonempty);
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

size_t mg_pool_queued(mg_pool *p)
{
    pthread_mutex_lock(&p->mu);
    size_t n = p->len;
    pthread_mutex_unlock(&p->mu);
    return n;
}

void mg_pool_free(mg_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->nonempty);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->nonempty);
    free(p->threads);
    free(p->ring);
    free(p);
}
