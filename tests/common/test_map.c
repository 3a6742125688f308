/* Unit tests for common/mg_map.c, mg_pool.c, mg_id.c, mg_metrics.c. */
#include "common/mg_alloc.h"
#include "common/mg_id.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_pool.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

Test(map, put_get_delete_under_churn)
{
    mg_map *m = mg_map_create(4);
    char key[32];
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        cr_assert_null(mg_map_put(m, key, (void *)(intptr_t)(i + 1)));
    }
    cr_assert_eq(mg_map_size(m), 5000);
    for (int i = 0; i < 5000; i += 2) {
        snprintf(key, sizeof(key), "k%d", i);
        cr_assert_eq((intptr_t)mg_map_del(m, key), i + 1);
    }
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        void *v = mg_map_get(m, key);
        if (i % 2)
            cr_assert_eq((intptr_t)v, i + 1, "lost %s after deletions", key);
        else
            cr_assert_null(v);
    }
    size_t n = 0;
    for (size_t it = 0; mg_map_next(m, &it, NULL, NULL);)
        n++;
    cr_assert_eq(n, 2500);
    cr_assert_eq((intptr_t)mg_map_put(m, "k1", (void *)7), 2, "replace returns the previous");
    mg_map_free(m);
    mg_map_free(NULL);
}

static atomic_int ran;
static void job(void *arg)
{
    atomic_fetch_add(&ran, (int)(intptr_t)arg);
}

static void slow_job(void *arg)
{
    usleep(50000);
}

/* mg_hash reads eight bytes a step plus a tail: every byte, and the
 * length, must count (a key that differs only in its tail, or is another's
 * prefix padded with NULs, hashes elsewhere), and the low bits the maps use
 * spread 20,000 dedupe-shaped keys ("<id>\n<user>") evenly. */
Test(map, hash_counts_every_byte_and_spreads_the_low_bits)
{
    char a[80], b[80];
    memset(a, 'x', sizeof(a));
    for (size_t len = 1; len <= 40; len++) {
        memcpy(b, a, sizeof(b));
        b[len - 1] = 'y'; /* the last byte of this length */
        cr_assert_neq(mg_hash(a, len), mg_hash(b, len), "a change at byte %zu of %zu", len - 1,
                      len);
        cr_assert_neq(mg_hash(a, len), mg_hash(a, len - 1), "length %zu against %zu", len, len - 1);
    }
    char z[16] = {0};
    cr_assert_neq(mg_hash(z, 3), mg_hash(z, 4), "NUL padding must not collide");
    enum { N = 20000, BUCKETS = 32768 };
    static unsigned short hits[BUCKETS];
    unsigned most = 0;
    for (int i = 0; i < N; i++) {
        char k[96];
        int n = snprintf(k, sizeof(k), "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a6\nuser-%d", i);
        unsigned h = (unsigned)(mg_hash(k, (size_t)n) & (BUCKETS - 1));
        if (++hits[h] > most)
            most = hits[h];
    }
    /* 20,000 balls in 32,768 bins: the fullest holds ~6 when the hash is uniform */
    cr_assert_leq(most, 10, "a bucket of the low bits holds %u of %d keys", most, N);
}

Test(pool, runs_every_job_and_bounds_the_queue)
{
    mg_pool *p = mg_pool_create("t", 3, 1000);
    for (int i = 0; i < 1000; i++)
        while (mg_pool_submit(p, job, (void *)1) == -EAGAIN)
            usleep(100);
    mg_pool_free(p);
    cr_assert_eq(atomic_load(&ran), 1000);

    p = mg_pool_create("t", 1, 2);
    cr_assert_eq(mg_pool_submit(p, slow_job, NULL), 0);
    for (int i = 0; i < 200 && mg_pool_queued(p) > 0; i++)
        usleep(1000); /* until the worker takes it */
    cr_assert_eq(mg_pool_submit(p, slow_job, NULL), 0);
    cr_assert_eq(mg_pool_submit(p, slow_job, NULL), 0);
    cr_assert_eq(mg_pool_submit(p, slow_job, NULL), -EAGAIN, "a full queue refuses");
    mg_pool_free(p);
}

Test(id, uuidv7_is_well_formed_and_unique)
{
    char a[MG_ID_LEN + 1], b[MG_ID_LEN + 1];
    mg_id_new(a);
    mg_id_new(b);
    cr_assert_eq(strlen(a), 36);
    cr_assert_eq(a[14], '7', "version nibble: %s", a);
    cr_assert(strchr("89ab", a[19]), "variant: %s", a);
    cr_assert_str_neq(a, b);
    cr_assert(strncmp(a, b, 8) <= 0, "time-ordered prefix");
}

Test(metrics, renders_prometheus_text)
{
    mg_metric *c = mg_counter("test_things_total", "Things", "kind=\"a\"");
    mg_metric_add(c, 3);
    mg_metric *h = mg_histogram("test_latency_seconds", "Latency", NULL);
    mg_histogram_observe_us(h, 700);
    char *text = mg_metrics_render(NULL);
    cr_assert(strstr(text, "# TYPE test_things_total counter\n"));
    cr_assert(strstr(text, "test_things_total{kind=\"a\"} 3\n"), "%s", text);
    cr_assert(strstr(text, "test_latency_seconds_bucket{le=\"0.001\"} 1\n"), "%s", text);
    cr_assert(strstr(text, "test_latency_seconds_bucket{le=\"0.0005\"} 0\n"), "%s", text);
    cr_assert(strstr(text, "test_latency_seconds_count 1\n"));
    free(text);
    mg_metrics_shutdown();
}

static int order_seen[4][200];
static atomic_int order_len[4];

struct ordered {
    int key, seq;
};

static void ordered_job(void *arg)
{
    struct ordered *o = arg;
    int i = atomic_fetch_add(&order_len[o->key], 1);
    order_seen[o->key][i] = o->seq;
    free(o);
}

Test(pool, same_key_runs_in_submission_order)
{
    mg_pool *p = mg_pool_create("t", 3, 4000);
    for (int seq = 0; seq < 200; seq++)
        for (int key = 0; key < 4; key++) {
            struct ordered *o = malloc(sizeof(*o));
            *o = (struct ordered){key, seq};
            cr_assert_eq(mg_pool_submit_keyed(p, (uint64_t)key * 7919, ordered_job, o), 0);
        }
    mg_pool_free(p);
    for (int key = 0; key < 4; key++) {
        cr_assert_eq(atomic_load(&order_len[key]), 200);
        for (int i = 0; i < 200; i++)
            cr_assert_eq(order_seen[key][i], i, "key %d: job %d ran out of order", key, i);
    }
}
