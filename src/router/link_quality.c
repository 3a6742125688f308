/* link_quality.c: per-peer link quality and the circuit breaker of the gRPC
 * peer path (see link_quality.h).
 *
 * Pure functions over an mg_link the caller owns and serializes (the gRPC
 * transport holds a per-peer mutex around every call). No clocks are read
 * here: callers pass now_ms and latencies, so tests run on synthetic time.
 *
 * Guarantees: a link with fewer than min_samples results is never degraded;
 * a degraded link admits at most one call (the probe) per probe interval;
 * only a successful, fast probe makes it healthy again.
 */
#include "router/link_quality.h"

#include <string.h>

void mg_link_config_defaults(mg_link_config *c)
{
    if (!(c->alpha > 0 && c->alpha <= 1))
        c->alpha = 0.2;
    if (!(c->error_threshold > 0 && c->error_threshold < 1))
        c->error_threshold = 0.5;
    if (c->min_samples <= 0)
        c->min_samples = 10;
    if (c->latency_threshold_us <= 0)
        c->latency_threshold_us = 200 * 1000;
    if (c->probe_interval_ms <= 0)
        c->probe_interval_ms = 2000;
}

void mg_link_init(mg_link *l)
{
    memset(l, 0, sizeof(*l));
}

bool mg_link_would_admit(const mg_link *l, int64_t now_ms)
{
    return !l->degraded || now_ms >= l->next_probe_ms;
}

bool mg_link_admit(mg_link *l, const mg_link_config *c, int64_t now_ms, bool *probe)
{
    if (probe)
        *probe = false;
    if (!l->degraded)
        return true;
    if (now_ms < l->next_probe_ms)
        return false;
    l->next_probe_ms = now_ms + c->probe_interval_ms; /* one probe per interval */
    if (probe)
        *probe = true;
    return true;
}

static void ewma(double *v, double sample, double alpha, bool first)
{
    *v = first ? sample : alpha * sample + (1 - alpha) * *v;
}

static bool poor(const mg_link *l, const mg_link_config *c)
{
    return l->samples >= (uint64_t)c->min_samples &&
           (l->err_ewma > c->error_threshold || l->lat_ewma_us > (double)c->latency_threshold_us);
}

int mg_link_record(mg_link *l, const mg_link_config *c, bool ok, int64_t latency_us, bool probe,
                   int64_t now_ms)
{
    if (latency_us < 0)
        latency_us = 0;
    if (l->degraded) {
        if (probe && ok && latency_us <= c->latency_threshold_us) {
            /* Half-open probe succeeded: close the breaker, start afresh. */
            uint64_t transitions = l->transitions;
            mg_link_init(l);
            l->transitions = transitions;
            l->samples = 1;
            l->lat_ewma_us = (double)latency_us;
            return -1;
        }
        /* Feed the EWMAs so the metrics stay meaningful; state unchanged. */
        ewma(&l->err_ewma, ok ? 0.0 : 1.0, c->alpha, false);
        if (ok)
            ewma(&l->lat_ewma_us, (double)latency_us, c->alpha, false);
        l->samples++;
        if (probe)
            l->next_probe_ms = now_ms + c->probe_interval_ms;
        return 0;
    }
    /* The error average starts at 0 (not seeded): one early error must not
     * weigh as a whole history of them. */
    ewma(&l->err_ewma, ok ? 0.0 : 1.0, c->alpha, false);
    if (ok) /* the first answered call seeds the latency average */
        ewma(&l->lat_ewma_us, (double)latency_us, c->alpha, l->lat_ewma_us == 0);
    l->samples++;
    if (poor(l, c)) {
        l->degraded = true;
        l->next_probe_ms = now_ms + c->probe_interval_ms;
        l->transitions++;
        return 1;
    }
    return 0;
}
