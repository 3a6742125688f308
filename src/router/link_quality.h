/* link_quality.h: how good the link to one peer is (error rate and latency
 * as EWMAs) and whether the gRPC peer path should be used (a circuit
 * breaker).
 *
 * States:
 *   healthy  - every call may go; each result updates the EWMAs.
 *   degraded - entered when, with at least min_samples results, the error
 *              EWMA exceeds error_threshold or the latency EWMA exceeds
 *              latency_threshold_us. Calls are refused (the router goes by
 *              Kafka) except one probe per probe_interval_ms (half-open).
 *              A probe that succeeds under the latency threshold closes the
 *              breaker (healthy again, EWMAs restarted from that probe); a
 *              failed probe keeps it open until the next interval.
 *
 * Pure logic on caller-supplied clocks (tests drive synthetic time).
 * Thread-safety: none; the owner serializes calls on one mg_link (the gRPC
 * transport holds a per-peer mutex).
 */
#ifndef MG_LINK_QUALITY_H
#define MG_LINK_QUALITY_H

#include <stdbool.h>
#include <stdint.h>

typedef struct mg_link_config {
    double alpha;                 /* EWMA weight of a new sample, (0,1]; default 0.2 */
    double error_threshold;       /* degraded above this error EWMA; default 0.5 */
    int min_samples;              /* results needed before degrading; default 10 */
    int64_t latency_threshold_us; /* degraded above this latency EWMA; default 200 ms */
    int64_t probe_interval_ms;    /* one probe per interval while degraded; default 2000 */
} mg_link_config;

/* Fills zero (or out-of-range) fields of c with the defaults above. */
void mg_link_config_defaults(mg_link_config *c);

typedef struct mg_link {
    double err_ewma;    /* 0..1 */
    double lat_ewma_us; /* over answered calls */
    uint64_t samples;   /* results since the last (re)start */
    bool degraded;
    int64_t next_probe_ms; /* while degraded: when the next probe may go */
    uint64_t transitions;  /* times it became degraded (for tests and logs) */
} mg_link;

/* Resets l to healthy with no samples. */
void mg_link_init(mg_link *l);

/* Whether a call may go now. While degraded it grants one probe per
 * interval (and *probe, when not NULL, says whether this is the probe). */
bool mg_link_admit(mg_link *l, const mg_link_config *c, int64_t now_ms, bool *probe);

/* Whether a call would be admitted now, without taking a probe slot. */
bool mg_link_would_admit(const mg_link *l, int64_t now_ms);

/* Records one result: ok means the peer answered (DELIVERED or
 * NOT_CONNECTED); latency_us is how long the call took (ignored for the
 * latency EWMA when !ok). probe says the call went as the probe of a
 * degraded link: only a probe's result can close the breaker (late results
 * of calls started before the link degraded only feed the EWMAs). Returns +1
 * when the link became degraded, -1 when it recovered, 0 otherwise. */
int mg_link_record(mg_link *l, const mg_link_config *c, bool ok, int64_t latency_us, bool probe,
                   int64_t now_ms);

#endif
