/* mg_metrics.c: the Prometheus registry (see mg_metrics.h).
 *
 * DESIGN: registration takes a mutex and appends to a list kept sorted by
 * name (so HELP/TYPE lines group); updates are relaxed atomics on the metric
 * itself, so the hot path never takes a lock.
 */
#include "common/mg_metrics.h"
#include "common/mg_alloc.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum kind { K_COUNTER, K_GAUGE, K_GAUGE_FN, K_HISTOGRAM };

static const int64_t bucket_us[] = {100,     250,     500,     1000,    2500,   5000,
                                    10000,   25000,   50000,   100000,  250000, 500000,
                                    1000000, 2500000, 5000000, 10000000};
#define NBUCKETS (sizeof(bucket_us) / sizeof(bucket_us[0]))

struct mg_metric {
    char *name, *help, *labels;
    enum kind kind;
    _Atomic int64_t value;
    mg_gauge_fn fn;
    void *arg;
    _Atomic int64_t buckets[NBUCKETS];
    _Atomic int64_t count, sum_us;
    struct mg_metric *next;
};

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static mg_metric *reg_head;

static mg_metric *reg(const char *name, const char *help, const char *labels, enum kind k)
{
    labels = labels ? labels : "";
    pthread_mutex_lock(&reg_mu);
    mg_metric **pp = &reg_head;
    for (; *pp; pp = &(*pp)->next) {
        int c = strcmp((*pp)->name, name);
        if (c == 0 && strcmp((*pp)->labels, labels) == 0) {
            mg_metric *m = *pp;
            pthread_mutex_unlock(&reg_mu);
            return m;
        }
        if (c > 0)
            break;
    }
    mg_metric *m = mg_new(mg_metric);
    m->name = mg_xstrdup(name);
    m->help = mg_xstrdup(help);
    m->labels = mg_xstrdup(labels);
    m->kind = k;
    m->next = *pp;
    *pp = m;
    pthread_mutex_unlock(&reg_mu);
    return m;
}

mg_metric *mg_counter(const char *name, const char *help, const char *labels)
{
    return reg(name, help, labels, K_COUNTER);
}

mg_metric *mg_gauge(const char *name, const char *help, const char *labels)
{
    return reg(name, help, labels, K_GAUGE);
}

mg_metric *mg_gauge_fn_register(const char *name, const char *help, const char *labels,
                                mg_gauge_fn fn, void *arg)
{
    mg_metric *m = reg(name, help, labels, K_GAUGE_FN);
    pthread_mutex_lock(&reg_mu);
    m->fn = fn;
    m->arg = arg;
    pthread_mutex_unlock(&reg_mu);
    return m;
}

mg_metric *mg_histogram(const char *name, const char *help, const char *labels)
{
    return reg(name, help, labels, K_HISTOGRAM);
}

void mg_metric_add(mg_metric *m, int64_t delta)
{
    atomic_fetch_add_explicit(&m->value, delta, memory_order_relaxed);
}

void mg_metric_set(mg_metric *m, int64_t value)
{
    atomic_store_explicit(&m->value, value, memory_order_relaxed);
}

int64_t mg_metric_value(const mg_metric *m)
{
    return atomic_load_explicit(&m->value, memory_order_relaxed);
}

void mg_histogram_observe_us(mg_metric *m, int64_t us)
{
    for (size_t i = 0; i < NBUCKETS; i++)
        if (us <= bucket_us[i]) {
            atomic_fetch_add_explicit(&m->buckets[i], 1, memory_order_relaxed);
            break;
        }
    atomic_fetch_add_explicit(&m->count, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&m->sum_us, us, memory_order_relaxed);
}

struct buf {
    char *p;
    size_t len, cap;
};

static void bprintf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(struct buf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        b->cap = b->cap * 2 + (size_t)n;
        b->p = mg_xrealloc(b->p, b->cap);
    }
}

static const char *type_name(enum kind k)
{
    return k == K_COUNTER ? "counter" : k == K_HISTOGRAM ? "histogram" : "gauge";
}

char *mg_metrics_render(size_t *len)
{
    struct buf b = {mg_xmalloc(4096), 0, 4096};
    b.p[0] = '\0';
    pthread_mutex_lock(&reg_mu);
    const char *last = "";
    for (mg_metric *m = reg_head; m; m = m->next) {
        if (strcmp(last, m->name) != 0)
            bprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name,
                    type_name(m->kind));
        last = m->name;
        const char *lb = m->labels[0] ? "{" : "", *le = m->labels[0] ? "}" : "";
        if (m->kind == K_HISTOGRAM) {
            int64_t cum = 0;
            const char *sep = m->labels[0] ? "," : "";
            for (size_t i = 0; i < NBUCKETS; i++) {
                cum += atomic_load_explicit(&m->buckets[i], memory_order_relaxed);
                bprintf(&b, "%s_bucket{%s%sle=\"%g\"} %lld\n", m->name, m->labels, sep,
                        (double)bucket_us[i] / 1e6, (long long)cum);
            }
            int64_t count = atomic_load_explicit(&m->count, memory_order_relaxed);
            bprintf(&b, "%s_bucket{%s%sle=\"+Inf\"} %lld\n", m->name, m->labels, sep,
                    (long long)count);
            bprintf(&b, "%s_sum%s%s%s %g\n", m->name, lb, m->labels, le,
                    (double)atomic_load_explicit(&m->sum_us, memory_order_relaxed) / 1e6);
            bprintf(&b, "%s_count%s%s%s %lld\n", m->name, lb, m->labels, le, (long long)count);
        } else if (m->kind == K_GAUGE_FN) {
            bprintf(&b, "%s%s%s%s %g\n", m->name, lb, m->labels, le, m->fn ? m->fn(m->arg) : 0.0);
        } else {
            bprintf(&b, "%s%s%s%s %lld\n", m->name, lb, m->labels, le,
                    (long long)mg_metric_value(m));
        }
    }
    pthread_mutex_unlock(&reg_mu);
    if (len)
        *len = b.len;
    return b.p;
}

void mg_metrics_shutdown(void)
{
    pthread_mutex_lock(&reg_mu);
    mg_metric *m = reg_head;
    reg_head = NULL;
    pthread_mutex_unlock(&reg_mu);
    while (m) {
        mg_metric *next = m->next;
        free(m->name);
        free(m->help);
        free(m->labels);
        free(m);
        m = next;
    }
}
