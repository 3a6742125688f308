/* mg_metrics.h: Prometheus metrics.
 *
 * A process-wide registry of counters, gauges and histograms. Metrics are
 * created once (at module start) and updated lock-free with atomics from any
 * thread. mg_metrics_render() writes the Prometheus text exposition format.
 *
 * Names follow Prometheus conventions (meshgate_*_total for counters); labels
 * are a preformatted string such as `path="local",status="delivered"`.
 * Creating the same name+labels twice returns the same metric.
 */
#ifndef MG_METRICS_H
#define MG_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct mg_metric mg_metric;
typedef double (*mg_gauge_fn)(void *arg);

mg_metric *mg_counter(const char *name, const char *help, const char *labels);
mg_metric *mg_gauge(const char *name, const char *help, const char *labels);
/* A gauge read by calling fn(arg) at render time (fn must be thread-safe). */
mg_metric *mg_gauge_fn_register(const char *name, const char *help, const char *labels,
                                mg_gauge_fn fn, void *arg);
/* Latency histogram in seconds, fixed buckets from 100 us to 10 s. */
mg_metric *mg_histogram(const char *name, const char *help, const char *labels);

void mg_metric_add(mg_metric *m, int64_t delta);
void mg_metric_set(mg_metric *m, int64_t value);
int64_t mg_metric_value(const mg_metric *m);
void mg_histogram_observe_us(mg_metric *m, int64_t micros);

/* Renders every metric; returns a malloc'd string the caller frees. */
char *mg_metrics_render(size_t *len);

/* Frees the registry (at exit, for leak checkers). Metrics become invalid. */
void mg_metrics_shutdown(void);

#endif
