/* mg_pool.h: worker threads fed by a bounded queue.
 *
 * This is meshgate's one hand-off from a thread that must not block (the
 * WebSocket service thread, Kafka callbacks, gRPC completion threads) to
 * work that may block on I/O (Redis, Kafka, peer gRPC). The reverse
 * direction, into the WebSocket service thread, goes through the hub
 * (gateway/hub.h).
 *
 * Ordering: each thread has its own FIFO queue. Jobs submitted with the same
 * key run on the same thread, one after another, in submission order: the
 * WebSocket front end keys a connection's jobs by its id, so one device's
 * sends are routed in the order it sent them. Unkeyed jobs go to the
 * shortest queue and have no order among themselves.
 *
 * Thread-safety: mg_pool_submit may be called from any thread.
 */
#ifndef MG_POOL_H
#define MG_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct mg_pool mg_pool;
typedef void (*mg_job_fn)(void *arg);

/* Starts nthreads threads named "<name>-<i>". max_queue bounds the jobs
 * waiting in all queues together (split evenly between the threads). */
mg_pool *mg_pool_create(const char *name, int nthreads, size_t max_queue);

/* Queues fn(arg). Returns 0, or -EAGAIN when the queue is full, or -ESHUTDOWN
 * after mg_pool_free began; on failure fn is never called and arg stays the
 * caller's. */
int mg_pool_submit(mg_pool *p, mg_job_fn fn, void *arg);
/* Same, on the thread chosen by key: same key, same thread, FIFO. */
int mg_pool_submit_keyed(mg_pool *p, uint64_t key, mg_job_fn fn, void *arg);

/* Jobs waiting (not yet running). */
size_t mg_pool_queued(mg_pool *p);

/* Runs every job already queued, joins the threads and frees. NULL is a no-op. */
void mg_pool_free(mg_pool *p);

#endif
