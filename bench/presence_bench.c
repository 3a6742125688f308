/* presence_bench.c: presence lookups per second through mg_presence
 * (presence_redis.c on the real Redis Cluster), single and pipelined batch,
 * from several threads, as the router's worker threads would call it.
 * bench/presence.sh builds and runs it next to redis-benchmark and prints
 * the ratio.
 *
 * Usage: presence_bench NODES [threads=8] [seconds=5] [users=10000] [batch=100]
 * Prints: "single <lookups/s>" and "batch <users looked up/s>" lines.
 */
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_time.h"
#include "store/redis_store.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static mg_presence *p;
static int nusers, batch, seconds;
static char **users;
static atomic_llong done_lookups, failed;

static void *run(void *arg)
{
    int mode = (int)(intptr_t)arg >> 16;
    unsigned seed = (unsigned)(intptr_t)arg & 0xffff;
    int64_t end = mg_mono_ms() + seconds * 1000;
    const char **bu = mg_xcalloc((size_t)batch, sizeof(*bu));
    mg_presence_list *outs = mg_xcalloc((size_t)batch, sizeof(*outs));
    long long n = 0;
    while (mg_mono_ms() < end) {
        if (mode == 0) {
            mg_presence_list l = {0};
            if (p->ops->lookup(p, users[rand_r(&seed) % nusers], &l) != 0 || l.n != 1)
                atomic_fetch_add(&failed, 1);
            mg_presence_list_clear(&l);
            n++;
        } else {
            for (int i = 0; i < batch; i++)
                bu[i] = users[rand_r(&seed) % nusers];
            if (p->ops->lookup_batch(p, bu, (size_t)batch, outs) != 0)
                atomic_fetch_add(&failed, 1);
            for (int i = 0; i < batch; i++) {
                if (outs[i].n != 1)
                    atomic_fetch_add(&failed, 1);
                mg_presence_list_clear(&outs[i]);
            }
            n += batch;
        }
    }
    atomic_fetch_add(&done_lookups, n);
    free(bu);
    free(outs);
    return NULL;
}

static double measure(int mode, int threads)
{
    pthread_t th[64];
    atomic_store(&done_lookups, 0);
    int64_t t0 = mg_mono_us();
    for (int i = 0; i < threads; i++)
        pthread_create(&th[i], NULL, run, (void *)(intptr_t)((mode << 16) | (i + 1)));
    for (int i = 0; i < threads; i++)
        pthread_join(th[i], NULL);
    double secs = (double)(mg_mono_us() - t0) / 1e6;
    return (double)atomic_load(&done_lookups) / secs;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s NODES [threads] [seconds] [users] [batch]\n", argv[0]);
        return 2;
    }
    int threads = argc > 2 ? atoi(argv[2]) : 8;
    seconds = argc > 3 ? atoi(argv[3]) : 5;
    nusers = argc > 4 ? atoi(argv[4]) : 10000;
    batch = argc > 5 ? atoi(argv[5]) : 100;
    if (threads < 1 || threads > 64 || seconds < 1 || nusers < 1 || batch < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    mg_log_set_level(MG_LOG_WARN);
    char err[512];
    mg_redis_cluster *rc =
        mg_redis_cluster_create(argv[1], getenv("MESHGATE_REDIS_USER"),
                                getenv("MESHGATE_REDIS_PASSWORD"), 2000, err, sizeof(err));
    if (!rc) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    p = mg_presence_redis_create(rc, "bench-gw", "bench", 60);
    if (!p)
        return 1;
    users = mg_xcalloc((size_t)nusers, sizeof(*users));
    for (int i = 0; i < nusers; i++) {
        users[i] = mg_xasprintf("bench-%d", i);
        if (p->ops->connect(p, users[i], "c1", mg_now_ms()) != 0) {
            fprintf(stderr, "connect failed\n");
            return 1;
        }
    }
    double single = measure(0, threads);
    double batched = measure(1, threads);
    printf("single %.0f\nbatch %.0f\nfailed %lld\n", single, batched,
           (long long)atomic_load(&failed));
    p->ops->remove_gateway(p);
    for (int i = 0; i < nusers; i++)
        free(users[i]);
    free(users);
    mg_presence_free(p);
    mg_redis_cluster_free(rc);
    return atomic_load(&failed) ? 1 : 0;
}
