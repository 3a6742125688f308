/* mg_pool.c: bounded worker pool (see mg_pool.h).
 *
 * DESIGN: one ring buffer of jobs per thread, each under its own mutex and
 * condition variable, so submitters contend only per queue and a key maps to
 * one thread (per-key FIFO). Unkeyed jobs pick the shorter of two queues
 * (the "power of two choices"), which keeps queues even without scanning.
 */
#include "common/mg_pool.h"
#include "common/mg_alloc.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

struct job {
    mg_job_fn fn;
    void *arg;
};

struct queue {
    pthread_mutex_t mu;
    pthread_cond_t nonempty;
    struct job *ring;
    size_t cap, head, len;
    bool stopping;
    pthread_t thread;
} __attribute__((aligned(64)));

struct mg_pool {
    int n;
    struct queue *q;
    atomic_uint_fast64_t rr;
};

static void *worker(void *arg)
{
    struct queue *q = arg;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        while (q->len == 0 && !q->stopping)
            pthread_cond_wait(&q->nonempty, &q->mu);
        if (q->len == 0)
            break; /* stopping and drained */
        struct job j = q->ring[q->head];
        q->head = (q->head + 1) % q->cap;
        q->len--;
        pthread_mutex_unlock(&q->mu);
        j.fn(j.arg);
        pthread_mutex_lock(&q->mu);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

mg_pool *mg_pool_create(const char *name, int nthreads, size_t max_queue)
{
    mg_pool *p = mg_new(mg_pool);
    p->n = nthreads > 0 ? nthreads : 1;
    p->q = mg_xcalloc((size_t)p->n, sizeof(struct queue));
    size_t per = max_queue / (size_t)p->n;
    for (int i = 0; i < p->n; i++) {
        struct queue *q = &p->q[i];
        pthread_mutex_init(&q->mu, NULL);
        pthread_cond_init(&q->nonempty, NULL);
        q->cap = per ? per : 1;
        q->ring = mg_xcalloc(q->cap, sizeof(struct job));
        if (pthread_create(&q->thread, NULL, worker, q) != 0)
            abort();
        char tname[32]; /* the kernel keeps 15 characters */
        snprintf(tname, sizeof(tname), "%.10s-%d", name, i);
        tname[15] = '\0';
        pthread_setname_np(q->thread, tname);
    }
    return p;
}

static int push(struct queue *q, mg_job_fn fn, void *arg)
{
    int rc = 0;
    pthread_mutex_lock(&q->mu);
    if (q->stopping)
        rc = -ESHUTDOWN;
    else if (q->len == q->cap)
        rc = -EAGAIN;
    else {
        q->ring[(q->head + q->len) % q->cap] = (struct job){fn, arg};
        q->len++;
        pthread_cond_signal(&q->nonempty);
    }
    pthread_mutex_unlock(&q->mu);
    return rc;
}

int mg_pool_submit_keyed(mg_pool *p, uint64_t key, mg_job_fn fn, void *arg)
{
    return push(&p->q[key % (uint64_t)p->n], fn, arg);
}

int mg_pool_submit(mg_pool *p, mg_job_fn fn, void *arg)
{
    uint64_t r = atomic_fetch_add_explicit(&p->rr, 1, memory_order_relaxed);
    struct queue *a = &p->q[r % (uint64_t)p->n], *b = &p->q[(r + 1) % (uint64_t)p->n];
    /* An unlocked peek is enough to choose; push() decides under the lock. */
    size_t la = __atomic_load_n(&a->len, __ATOMIC_RELAXED);
    size_t lb = __atomic_load_n(&b->len, __ATOMIC_RELAXED);
    int rc = push(lb < la ? b : a, fn, arg);
    if (rc == -EAGAIN && p->n > 1)
        rc = push(lb < la ? a : b, fn, arg);
    return rc;
}

size_t mg_pool_queued(mg_pool *p)
{
    size_t n = 0;
    for (int i = 0; i < p->n; i++) {
        pthread_mutex_lock(&p->q[i].mu);
        n += p->q[i].len;
        pthread_mutex_unlock(&p->q[i].mu);
    }
    return n;
}

void mg_pool_free(mg_pool *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n; i++) {
        pthread_mutex_lock(&p->q[i].mu);
        p->q[i].stopping = true;
        pthread_cond_broadcast(&p->q[i].nonempty);
        pthread_mutex_unlock(&p->q[i].mu);
    }
    for (int i = 0; i < p->n; i++) {
        pthread_join(p->q[i].thread, NULL);
        pthread_mutex_destroy(&p->q[i].mu);
        pthread_cond_destroy(&p->q[i].nonempty);
        free(p->q[i].ring);
    }
    free(p->q);
    free(p);
}
