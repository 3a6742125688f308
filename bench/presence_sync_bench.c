/* presence_sync_bench.c: the replication lag of multi-region presence
 * (presence_sync.c) at a fixed rate of presence changes, on the real
 * services: region b's store (on cluster B) publishes `rate` connects and
 * disconnects a second for `seconds`; region a's consumer (on cluster A)
 * applies them to its view. Lag is from the change (its record's at_ms) to
 * its view entry in region a (meshgate_presence_sync_apply_seconds).
 *
 * Usage: presence_sync_bench NODES_A NODES_B BROKERS [rate=1000] [seconds=10]
 * Prints one JSON line: changes, applied, achieved rate, lag p50/p99/max
 * bucket bounds in ms (the histogram's buckets: 1, 2.5, 5, 10, 25, 50 ms...).
 */
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/presence_sync.h"
#include "store/redis_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Cumulative bucket counts of one histogram from the metrics text. */
static int read_hist(const char *text, const char *name, double *le, long long *cum, int max)
{
    int n = 0;
    char pat[128];
    snprintf(pat, sizeof(pat), "%s_bucket{le=\"", name);
    for (const char *p = strstr(text, pat); p && n < max; p = strstr(p + 1, pat)) {
        const char *v = p + strlen(pat);
        le[n] = strncmp(v, "+Inf", 4) == 0 ? 1e9 : strtod(v, NULL);
        const char *sp = strchr(v, ' ');
        cum[n++] = sp ? atoll(sp + 1) : 0;
    }
    return n;
}

static double quantile_ms(const double *le, const long long *cum, int n, double q)
{
    long long total = n ? cum[n - 1] : 0;
    for (int i = 0; i < n; i++)
        if ((double)cum[i] >= q * (double)total)
            return le[i] * 1000.0;
    return -1;
}

static long long applied_count(void)
{
    size_t len;
    char *t = mg_metrics_render(&len);
    long long n = 0;
    const char *p = strstr(t, "meshgate_presence_sync_records_total{kind=\"applied\"} ");
    if (p)
        n = atoll(strchr(p, '}') + 2);
    free(t);
    return n;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s NODES_A NODES_B BROKERS [rate] [seconds]\n", argv[0]);
        return 2;
    }
    int rate = argc > 4 ? atoi(argv[4]) : 1000;
    int seconds = argc > 5 ? atoi(argv[5]) : 10;
    if (rate < 1 || rate > 100000 || seconds < 1 || seconds > 600) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    mg_log_set_level(MG_LOG_WARN);
    char err[512], topic[64], ra[32], rb[32];
    snprintf(topic, sizeof(topic), "meshgate.bench%d.presence", (int)getpid());
    snprintf(ra, sizeof(ra), "bencha%d", (int)getpid());
    snprintf(rb, sizeof(rb), "benchb%d", (int)getpid());
    mg_redis_cluster *rca = mg_redis_cluster_create(argv[1], NULL, NULL, 2000, err, sizeof(err));
    mg_redis_cluster *rcb =
        rca ? mg_redis_cluster_create(argv[2], NULL, NULL, 2000, err, sizeof(err)) : NULL;
    if (!rca || !rcb) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    mg_presence_sync_config ca = {argv[3], topic, ra, "bench-a1", 2};
    mg_presence_sync_config cb = {argv[3], topic, rb, "bench-b1", 2};
    mg_presence *pa = mg_presence_sync_create(mg_presence_redis_create(rca, "bench-a1", ra, 60),
                                              rca, &ca, err, sizeof(err));
    mg_presence *pb =
        pa ? mg_presence_sync_create(mg_presence_redis_create(rcb, "bench-b1", rb, 60), rcb, &cb,
                                     err, sizeof(err))
           : NULL;
    if (!pa || !pb || mg_presence_sync_start(pa, NULL, NULL) != 0) {
        fprintf(stderr, "presence sync: %s\n", err);
        return 1;
    }
    /* Wait until region a's consumer is assigned and applying. */
    int64_t ready_by = mg_mono_ms() + 60000;
    while (applied_count() == 0 && mg_mono_ms() < ready_by) {
        pb->ops->connect(pb, "bench-probe", "c0", mg_now_ms());
        usleep(500 * 1000);
    }
    long long base = applied_count();
    if (base == 0) {
        fprintf(stderr, "region a's consumer applied nothing within 60 s\n");
        return 1;
    }
    /* Histogram and counter so far belong to the warm-up: remember them. */
    double le0[32];
    long long cum0[32];
    size_t len;
    char *t0 = mg_metrics_render(&len);
    int n0 = read_hist(t0, "meshgate_presence_sync_apply_seconds", le0, cum0, 32);
    free(t0);

    enum { USERS = 1000 };
    bool on[USERS] = {false};
    long long changes = 0;
    int64_t start = mg_mono_us(), end = start + (int64_t)seconds * 1000000;
    while (mg_mono_us() < end) {
        int64_t due = start + changes * 1000000 / rate;
        int64_t now = mg_mono_us();
        if (due > now)
            usleep((useconds_t)(due - now));
        int u = (int)(changes % USERS);
        char user[32];
        snprintf(user, sizeof(user), "bench-u%d", u);
        int rc = on[u] ? pb->ops->disconnect(pb, user, "c1")
                       : pb->ops->connect(pb, user, "c1", mg_now_ms());
        if (rc == 0)
            on[u] = !on[u];
        changes++;
    }
    double took = (double)(mg_mono_us() - start) / 1e6;
    int64_t settle_by = mg_mono_ms() + 30000;
    while (applied_count() - base < changes && mg_mono_ms() < settle_by)
        usleep(100 * 1000);
    long long applied = applied_count() - base;

    double le[32];
    long long cum[32];
    char *t = mg_metrics_render(&len);
    int n = read_hist(t, "meshgate_presence_sync_apply_seconds", le, cum, 32);
    free(t);
    for (int i = 0; i < n && i < n0; i++)
        cum[i] -= cum0[i];
    printf("{\"changes\":%lld,\"applied\":%lld,\"rate_per_s\":%.0f,\"lag_p50_ms_le\":%g,"
           "\"lag_p99_ms_le\":%g,\"lag_max_ms_le\":%g}\n",
           changes, applied, (double)changes / took, quantile_ms(le, cum, n, 0.50),
           quantile_ms(le, cum, n, 0.99), quantile_ms(le, cum, n, 1.0));
    for (int u = 0; u < USERS; u++) {
        char user[32];
        snprintf(user, sizeof(user), "bench-u%d", u);
        if (on[u])
            pb->ops->disconnect(pb, user, "c1");
    }
    pb->ops->disconnect(pb, "bench-probe", "c0");
    mg_presence_free(pb);
    mg_presence_free(pa);
    mg_redis_cluster_free(rcb);
    mg_redis_cluster_free(rca);
    return applied >= changes ? 0 : 1;
}
