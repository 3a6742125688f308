/* mg_trace.c: W3C Trace Context, span slots and the OTLP/HTTP exporter
 * (see mg_trace.h).
 *
 * DESIGN
 * One process-wide tracer. `slots` spans are allocated at start; a free
 * list and the export queue (a FIFO) share one mutex, held for a pointer
 * move. mg_span_start takes a slot, mg_span_end appends it to the queue and
 * signals the exporter when a batch is full. The `otlp-export` thread wakes
 * on a full batch, every FLUSH_MS, or at stop; it detaches up to BATCH
 * spans, encodes them (jansson) and gives the slots back before it POSTs,
 * so the slots a message needs are never held by a network wait. A failed
 * POST (refused, timeout, non-2xx) counts its spans as failed and is not
 * retried: traces are best effort, and a retry queue would only move the
 * drops elsewhere.
 */
#include "common/mg_trace.h"
#include "common/mg_alloc.h"
#include "common/mg_id.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SPAN_ATTRS    12
#define ATTR_BYTES    64
#define BATCH         512
#define FLUSH_MS      500
#define POST_TIMEOUT  2000
#define SLOTS_DEFAULT 8192

typedef struct span_attr {
    const char *key;
    bool is_int;
    int64_t i;
    char s[ATTR_BYTES];
} span_attr;

struct mg_span {
    uint8_t trace_id[16], span_id[8], parent_id[8];
    uint8_t flags, kind, error, nattr;
    const char *name;
    int64_t start_ns, end_ns; /* Unix time */
    span_attr attr[SPAN_ATTRS];
    char message[96];
    mg_span *next; /* free list or export queue */
};

static struct tracer {
    bool started, exporting, stopping;
    double ratio;
    char *url, *service, *instance, *region;
    mg_span *slots;
    size_t nslots;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mg_span *free_list;
    mg_span *q_head, *q_tail;
    size_t queued, wake_at; /* wake the exporter at wake_at queued */
    pthread_t thread;
    int64_t stop_deadline_ms; /* monotonic: queued spans left then are failed */
    mg_metric *dropped, *exported, *failed;
} T = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* ---- trace context ------------------------------------------------------ */

static bool all_zero(const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return false;
    return true;
}

bool mg_trace_valid(const mg_trace_ctx *c)
{
    return !all_zero(c->trace_id, sizeof(c->trace_id));
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1; /* uppercase is invalid in traceparent */
}

static bool hex_decode(const char *s, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return false;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return true;
}

static void hex_encode(const uint8_t *b, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

int mg_traceparent_parse(const char *s, size_t len, mg_trace_ctx *out)
{
    memset(out, 0, sizeof(*out));
    uint8_t version, flags;
    mg_trace_ctx c;
    /* version 00 is exactly 55 characters; a later version may append
     * "-..." fields after them (W3C: parse the first four, ignore the rest). */
    if (!s || len < MG_TRACEPARENT_LEN || !hex_decode(s, &version, 1) || version == 0xff)
        return -EINVAL;
    if (len != MG_TRACEPARENT_LEN && (version == 0 || s[MG_TRACEPARENT_LEN] != '-'))
        return -EINVAL;
    if (s[2] != '-' || s[35] != '-' || s[52] != '-' || !hex_decode(s + 3, c.trace_id, 16) ||
        !hex_decode(s + 36, c.span_id, 8) || !hex_decode(s + 53, &flags, 1))
        return -EINVAL;
    if (all_zero(c.trace_id, 16) || all_zero(c.span_id, 8))
        return -EINVAL;
    c.flags = flags & MG_TRACE_SAMPLED; /* the only flag version 00 defines */
    *out = c;
    return 0;
}

size_t mg_traceparent_format(const mg_trace_ctx *c, char out[MG_TRACEPARENT_LEN + 1])
{
    if (!mg_trace_valid(c)) {
        out[0] = '\0';
        return 0;
    }
    memcpy(out, "00-", 3);
    hex_encode(c->trace_id, 16, out + 3);
    out[35] = '-';
    hex_encode(c->span_id, 8, out + 36);
    out[52] = '-';
    uint8_t f = c->flags & MG_TRACE_SAMPLED;
    hex_encode(&f, 1, out + 53);
    return MG_TRACEPARENT_LEN;
}

void mg_trace_id_hex(const mg_trace_ctx *c, char out[33])
{
    hex_encode(c->trace_id, 16, out);
}

static void random_bytes(uint8_t *b, size_t n)
{
    while (n > 0) {
        uint64_t r = mg_random64();
        size_t k = n < 8 ? n : 8;
        memcpy(b, &r, k);
        b += k;
        n -= k;
    }
}

static void new_id(uint8_t *b, size_t n)
{
    do
        random_bytes(b, n);
    while (all_zero(b, n));
}

void mg_trace_ingress(const char *s, size_t len, mg_trace_ctx *out)
{
    if (!s || mg_traceparent_parse(s, len, out) != 0)
        memset(out, 0, sizeof(*out));
    mg_trace_begin(out);
}

void mg_trace_begin(mg_trace_ctx *out)
{
    if (mg_trace_valid(out))
        return;
    memset(out, 0, sizeof(*out));
    if (T.ratio <= 0 || (T.ratio < 1 && (double)(mg_random64() >> 11) * 0x1p-53 >= T.ratio))
        return;
    /* a new root: the ingress's span becomes its first span, parented on
     * nothing (span_id stays zero until mg_span_start gives one) */
    new_id(out->trace_id, sizeof(out->trace_id));
    out->flags = MG_TRACE_SAMPLED;
}

/* ---- spans ------------------------------------------------------------------ */

static int64_t unix_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

mg_span *mg_span_start(const mg_trace_ctx *parent_in, const char *name, mg_span_kind kind,
                       mg_trace_ctx *child)
{
    mg_trace_ctx pc; /* child may be parent_in itself */
    const mg_trace_ctx *parent = parent_in ? (pc = *parent_in, &pc) : NULL;
    if (!parent || !mg_trace_sampled(parent) || !mg_trace_valid(parent)) { /* flags first */
        if (child) {
            if (parent)
                *child = *parent;
            else
                memset(child, 0, sizeof(*child));
        }
        return NULL;
    }
    uint8_t id[8];
    new_id(id, sizeof(id));
    if (child) {
        mg_trace_ctx c = *parent;
        memcpy(c.span_id, id, sizeof(id));
        *child = c;
    }
    if (!T.exporting)
        return NULL;
    pthread_mutex_lock(&T.mu);
    mg_span *s = T.stopping ? NULL : T.free_list;
    if (s)
        T.free_list = s->next;
    pthread_mutex_unlock(&T.mu);
    if (!s) {
        mg_metric_add(T.dropped, 1);
        return NULL;
    }
    memcpy(s->trace_id, parent->trace_id, 16);
    memcpy(s->parent_id, parent->span_id, 8);
    memcpy(s->span_id, id, 8);
    s->flags = parent->flags;
    s->kind = (uint8_t)kind;
    s->error = 0;
    s->nattr = 0;
    s->name = name;
    s->message[0] = '\0';
    s->start_ns = unix_ns();
    s->next = NULL;
    return s;
}

static span_attr *attr_add(mg_span *s, const char *key)
{
    if (!s || s->nattr >= SPAN_ATTRS)
        return NULL;
    span_attr *a = &s->attr[s->nattr++];
    a->key = key;
    return a;
}

void mg_span_attr(mg_span *s, const char *key, const char *val)
{
    span_attr *a = attr_add(s, key);
    if (!a)
        return;
    a->is_int = false;
    snprintf(a->s, sizeof(a->s), "%s", val ? val : "");
}

void mg_span_attr_int(mg_span *s, const char *key, int64_t val)
{
    span_attr *a = attr_add(s, key);
    if (!a)
        return;
    a->is_int = true;
    a->i = val;
}

void mg_span_attr_peer(mg_span *s, const char *hostport)
{
    if (!s || !hostport)
        return;
    const char *colon = strrchr(hostport, ':');
    if (colon && hostport[0] != '[' && strchr(hostport, ':') != colon)
        colon = NULL; /* a bare IPv6 address */
    size_t hl = colon ? (size_t)(colon - hostport) : strlen(hostport);
    const char *host = hostport;
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        host++;
        hl -= 2;
    }
    char addr[64];
    snprintf(addr, sizeof(addr), "%.*s", (int)hl, host);
    mg_span_attr(s, "network.peer.address", addr);
    if (colon && colon[1])
        mg_span_attr_int(s, "network.peer.port", strtol(colon + 1, NULL, 10));
}

void mg_span_end(mg_span *s, bool error, const char *message)
{
    if (!s)
        return;
    s->end_ns = unix_ns();
    s->error = error;
    if (message)
        snprintf(s->message, sizeof(s->message), "%s", message);
    pthread_mutex_lock(&T.mu);
    if (T.q_tail)
        T.q_tail->next = s;
    else
        T.q_head = s;
    T.q_tail = s;
    bool wake = ++T.queued == T.wake_at;
    pthread_mutex_unlock(&T.mu);
    if (wake)
        pthread_cond_signal(&T.cv);
}

/* ---- OTLP/JSON ----------------------------------------------------------------- */

/* Written straight into a growing buffer (the exporter's: reused across
 * batches): jansson's object per value cost the exporter thread most of its
 * time at one sampled trace per message. */
typedef struct jbuf {
    char *p;
    size_t n, cap;
} jbuf;

static void jb_put(jbuf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = mg_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void jb_lit(jbuf *b, const char *s)
{
    jb_put(b, s, strlen(s));
}

/* A JSON string: '"', '\\' and control characters escaped; other bytes as
 * they are (attribute values are UTF-8 checked where they enter). */
static void jb_str(jbuf *b, const char *s)
{
    jb_put(b, "\"", 1);
    const char *run = s;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        jb_put(b, run, (size_t)(s - run));
        char esc[8];
        if (c == '"' || c == '\\')
            snprintf(esc, sizeof(esc), "\\%c", c);
        else
            snprintf(esc, sizeof(esc), "\\u%04x", c);
        jb_lit(b, esc);
        run = s + 1;
    }
    jb_put(b, run, (size_t)(s - run));
    jb_put(b, "\"", 1);
}

static void jb_kv(jbuf *b, const char *key, const char *val, bool first)
{
    jb_lit(b, first ? "{\"key\":" : ",{\"key\":");
    jb_str(b, key);
    jb_lit(b, ",\"value\":{\"stringValue\":");
    jb_str(b, val);
    jb_lit(b, "}}");
}

static void span_json(jbuf *b, const mg_span *s)
{
    char hex[33], num[64];
    jb_lit(b, "{\"traceId\":\"");
    hex_encode(s->trace_id, 16, hex);
    jb_lit(b, hex);
    jb_lit(b, "\",\"spanId\":\"");
    hex_encode(s->span_id, 8, hex);
    jb_lit(b, hex);
    if (!all_zero(s->parent_id, 8)) {
        jb_lit(b, "\",\"parentSpanId\":\"");
        hex_encode(s->parent_id, 8, hex);
        jb_lit(b, hex);
    }
    jb_lit(b, "\",\"name\":");
    jb_str(b, s->name);
    snprintf(num, sizeof(num), ",\"kind\":%d,\"flags\":%d,\"startTimeUnixNano\":\"%lld\"", s->kind,
             0x100 | s->flags, (long long)s->start_ns); /* flags bit 8: known */
    jb_lit(b, num);
    snprintf(num, sizeof(num), ",\"endTimeUnixNano\":\"%lld\",\"attributes\":[",
             (long long)s->end_ns);
    jb_lit(b, num);
    for (unsigned i = 0; i < s->nattr; i++) {
        const span_attr *a = &s->attr[i];
        if (a->is_int) {
            jb_lit(b, i ? ",{\"key\":" : "{\"key\":");
            jb_str(b, a->key);
            snprintf(num, sizeof(num), ",\"value\":{\"intValue\":\"%lld\"}}", (long long)a->i);
            jb_lit(b, num);
        } else {
            jb_kv(b, a->key, a->s, i == 0);
        }
    }
    jb_lit(b, "]");
    if (s->error) {
        jb_lit(b, ",\"status\":{\"code\":2,\"message\":");
        jb_str(b, s->message);
        jb_lit(b, "}");
    }
    jb_lit(b, "}");
}

/* The OTLP/JSON ExportTraceServiceRequest of n spans into b (emptied first). */
static void encode_otlp(jbuf *b, mg_span *const *spans, size_t n, const char *service,
                        const char *instance, const char *region)
{
    b->n = 0;
    jb_lit(b, "{\"resourceSpans\":[{\"resource\":{\"attributes\":[");
    jb_kv(b, "service.name", service ? service : "meshgate", true);
    if (instance && *instance)
        jb_kv(b, "service.instance.id", instance, false);
    if (region && *region)
        jb_kv(b, "meshgate.region", region, false);
    jb_lit(b, "]},\"scopeSpans\":[{\"scope\":{\"name\":\"meshgate\"},\"spans\":[");
    for (size_t i = 0; i < n; i++) {
        if (i)
            jb_put(b, ",", 1);
        span_json(b, spans[i]);
    }
    jb_lit(b, "]}]}]}");
}

/* ---- the exporter -------------------------------------------------------------- */

static size_t discard(char *p, size_t size, size_t n, void *arg)
{
    (void)p;
    (void)arg;
    return size * n;
}

/* POSTs body; returns whether the collector took it (2xx). */
static bool post(CURL *curl, const char *body, long timeout_ms)
{
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(curl, CURLOPT_URL, T.url);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);
    CURLcode rc = curl_easy_perform(curl);
    long code = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &code);
    curl_slist_free_all(h);
    return rc == CURLE_OK && code >= 200 && code < 300;
}

static void *export_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "otlp-export");
    CURL *curl = curl_easy_init();
    mg_span *batch[BATCH];
    jbuf body = {0};
    int64_t fail_log_ms = 0;
    pthread_mutex_lock(&T.mu);
    for (;;) {
        if (T.queued < T.wake_at && !T.stopping) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += (long)FLUSH_MS * 1000000;
            ts.tv_sec += ts.tv_nsec / 1000000000;
            ts.tv_nsec %= 1000000000;
            pthread_cond_timedwait(&T.cv, &T.mu, &ts);
        }
        size_t n = 0;
        if (T.stopping && mg_mono_ms() >= T.stop_deadline_ms) { /* out of time: give up */
            mg_metric_add(T.failed, (int64_t)T.queued);
            T.q_head = T.q_tail = NULL;
            T.queued = 0;
            break;
        }
        while (n < BATCH && T.q_head) {
            batch[n++] = T.q_head;
            T.q_head = T.q_head->next;
        }
        if (!T.q_head)
            T.q_tail = NULL;
        T.queued -= n;
        bool stop = T.stopping && !T.q_head;
        long timeout = POST_TIMEOUT;
        if (T.stopping && T.stop_deadline_ms - mg_mono_ms() < timeout)
            timeout = (long)(T.stop_deadline_ms - mg_mono_ms());
        pthread_mutex_unlock(&T.mu);
        if (n > 0) {
            encode_otlp(&body, batch, n, T.service, T.instance, T.region);
            pthread_mutex_lock(&T.mu); /* the slots are free again before the POST */
            for (size_t i = 0; i < n; i++) {
                batch[i]->next = T.free_list;
                T.free_list = batch[i];
            }
            pthread_mutex_unlock(&T.mu);
            if (curl && post(curl, body.p, timeout > 0 ? timeout : 1)) {
                mg_metric_add(T.exported, (int64_t)n);
            } else {
                mg_metric_add(T.failed, (int64_t)n);
                int64_t now = mg_mono_ms();
                if (now - fail_log_ms > 10000) { /* a dead collector: one line per 10 s */
                    fail_log_ms = now;
                    mg_log_warn("trace", "OTLP export failed url=%s spans=%zu", T.url, n);
                }
            }
        }
        pthread_mutex_lock(&T.mu);
        if (stop)
            break;
    }
    pthread_mutex_unlock(&T.mu);
    curl_easy_cleanup(curl);
    free(body.p);
    return NULL;
}

int mg_trace_start(const mg_trace_config *cfg)
{
    if (T.started || cfg->sample_ratio < 0 || cfg->sample_ratio > 1)
        return -EINVAL;
    const char *ep = cfg->endpoint ? cfg->endpoint : "";
    if (*ep && strncmp(ep, "http://", 7) != 0 && strncmp(ep, "https://", 8) != 0)
        return -EINVAL;
    T.dropped = mg_counter("meshgate_trace_spans_dropped_total",
                           "Spans not recorded because every span slot was in use", NULL);
    T.exported = mg_counter("meshgate_trace_spans_exported_total",
                            "Spans the OTLP collector accepted", NULL);
    T.failed = mg_counter("meshgate_trace_spans_failed_total",
                          "Spans lost because the OTLP export failed", NULL);
    T.started = true;
    if (!*ep)
        return 0; /* nothing to export to: start no traces, carry the callers' on */
    T.ratio = cfg->sample_ratio;
    size_t n = strlen(ep);
    while (n > 0 && ep[n - 1] == '/')
        n--;
    T.url = mg_xasprintf("%.*s/v1/traces", (int)n, ep);
    T.service = mg_xstrdup(cfg->service_name ? cfg->service_name : "meshgate");
    T.instance = mg_xstrdup(cfg->instance_id ? cfg->instance_id : "");
    T.region = mg_xstrdup(cfg->region ? cfg->region : "");
    T.nslots = cfg->slots ? cfg->slots : SLOTS_DEFAULT;
    T.slots = mg_xcalloc(T.nslots, sizeof(*T.slots));
    T.wake_at = T.nslots / 2 < BATCH ? (T.nslots + 1) / 2 : BATCH;
    for (size_t i = 0; i < T.nslots; i++) {
        T.slots[i].next = T.free_list;
        T.free_list = &T.slots[i];
    }
    T.stopping = false;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (pthread_create(&T.thread, NULL, export_main, NULL) != 0) {
        mg_log_error("trace", "cannot start the exporter thread: spans are not exported");
        return 0;
    }
    T.exporting = true;
    return 0;
}

void mg_trace_stop(int timeout_ms)
{
    if (!T.started)
        return;
    if (T.exporting) {
        pthread_mutex_lock(&T.mu);
        T.stopping = true;
        T.stop_deadline_ms = mg_mono_ms() + timeout_ms;
        pthread_mutex_unlock(&T.mu);
        pthread_cond_signal(&T.cv);
        pthread_join(T.thread, NULL);
        T.exporting = false;
        free(T.slots);
        free(T.url);
        free(T.service);
        free(T.instance);
        free(T.region);
        T.slots = T.free_list = T.q_head = T.q_tail = NULL;
        T.url = T.service = T.instance = T.region = NULL;
        T.queued = 0;
    }
    T.started = false;
    T.ratio = 0;
}
