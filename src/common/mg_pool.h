/* mg_pool.h: worker threads fed by a bounded queue.
 *
 * This is meshgate's one hand-off from a thread that must not block (the
 * WebSocket service thread, Kafka callbacks, gRPC completion threads) to
 * work that may block on I/O (Redis, Kafka, peer gRPC). Jobs run in FIFO order
 * of submission, on any of the pool's threads. The reverse direction, into the
 * WebSocket service thread, goes through the hub (gateway/hub.h).
 *
 * Thread-safety: mg_pool_submit may be called from any thread.
 */
#ifndef MG_POOL_H
#define MG_POOL_H

#include <stddef.h>

typedef struct mg_pool mg_pool;
typedef void (*mg_job_fn)(void *arg);

/* Starts nthreads threads named "<name>-<i>". max_queue bounds the jobs
 * waiting (0: unbounded is not allowed; pass the configured limit). */
mg_pool *mg_pool_create(const char *name, int nthreads, size_t max_queue);

/* Queues fn(arg). Returns 0, or -EAGAIN when the queue is full, or -ESHUTDOWN
 * after mg_pool_free began; on failure fn is never called and arg stays the
 * caller's. */
int mg_pool_submit(mg_pool *p, mg_job_fn fn, void *arg);

/* Jobs waiting (not yet running). */
size_t mg_pool_queued(mg_pool *p);

/* Runs every job already queued, joins the threads and frees. NULL is a no-op. */
void mg_pool_free(mg_pool *p);

#endif
