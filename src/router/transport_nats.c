/* transport_nats.c: the NATS JetStream path: publisher to region streams
 * and the region's shared durable pull consumer (see transport_nats.h for
 * the contract).
 *
 * DESIGN
 * Publisher. One nats.c connection per gateway. A publish is a plain NATS
 * publish to the region's subject with a Nats-Msg-Id header and a reply
 * subject of our own, "<inbox>.<token>"; the stream answers it there with
 * its PubAck, which the transport's reply subscription ("<inbox>.*") takes
 * on nats.c's delivery thread. (nats.c's JetStream async publish does the
 * same with more per message: it keeps the message until the PubAck, in a
 * map of its own, and parses each PubAck into JSON objects; its MaxWait
 * keeps a timeout entry the PubAck does not remove.) Every publish puts a
 * small report (for HIGH the caller's done callback) in `reports`, keyed by
 * its token, before the publish (the PubAck may come back before the
 * publish returns), and in the deadline heap, due at min(deadline,
 * timeout_ms); the PubAck handler takes it out of both and answers: QUEUED,
 * or FAILED with the stream's error. "nats-timeout" sleeps until the
 * earliest deadline (woken only when a publish becomes the earliest),
 * takes what is due out of both and answers FAILED; a PubAck that comes
 * later finds no report and is dropped. Nothing is kept for a PubAck that
 * never comes. `pending` counts publishes awaiting a PubAck and refuses
 * beyond max_pending. Published and handled messages are destroyed in
 * bursts (dead_flush).
 *
 * Consumer. The "nats-consume" thread fetches up to the free room of
 * max_inflight messages (a no-wait pull of what the stream has or, when it
 * has nothing, a pull waiting at most FETCH_WAIT_MS for one message: it
 * waits for the server, not for operations) and decodes each. Messages are
 * chained per recipient, as the Kafka consumer's records are: a message
 * whose recipient has an earlier one from this consumer still in its
 * operation waits behind it, every other message starts at once, the
 * batch's starts together (mg_router_deliver_from_queue_many: their
 * recipients resolved in one pipelined presence lookup, one store-pool
 * hand-off instead of one per message). So a backlog for one user (after a
 * restart, a thaw, a service's burst) reaches that user's connections one
 * message at a time, each written before the next starts, instead of all
 * of a fetch landing on the outbound queue at once and closing a reading
 * client as a slow consumer. An operation's completion, on whatever thread
 * ends it, acknowledges the message (natsMsg_Ack is a publish: it does not
 * block) or NAKs it with a backoff; the last delivery of a failed message
 * (max_deliver) is handed back to "nats-consume", which writes it to the
 * inbox (the one blocking store call here, on a failure path, as the Kafka
 * consumer does) and acknowledges it. Once a message is over (acknowledged,
 * NAKed, in the inbox or undeliverable) its recipient's next one is handed
 * to "nats-chain" (a one-thread mg_pool), which starts what became free
 * together: the completion may run on a WebSocket service loop, where a
 * delivery does not wait for its write, so starting the next there would
 * pace nothing. Waiting messages count against max_inflight (they are
 * unacknowledged) and "nats-consume" tells the server they are in progress
 * every ack_wait/4, so none is redelivered while it waits. Order: within
 * one gateway a recipient's messages are handled one at a time in fetch
 * (stream) order, except that a NAKed message is redelivered after the
 * ones behind it; across the region's gateways (each fetches its own share
 * of the shared consumer) there is no order. On stop the messages still
 * waiting are dropped unacknowledged: the server redelivers them.
 *
 * Threads: deliver()/available() from any router thread; the PubAck handler
 * on nats.c's thread; "nats-consume" and "nats-chain" owned here;
 * create/start/stop/free from the control thread. nats.c's own threads
 * (read loop, flusher, reconnect) run the connection callbacks, which only
 * log.
 */
#include "router/transport_nats.h"
#include "router/bus_metrics.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_pool.h"
#include "common/mg_time.h"
#include "common/mg_trace.h"

#include <ctype.h>
#include <errno.h>
#include <nats/nats.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FETCH_MAX             256 /* messages asked for in one fetch */
#define FETCH_WAIT_MS         200 /* a fetch's wait for the server */
#define NAK_DELAY_MIN_MS      100 /* first redelivery backoff, doubled per delivery */
#define NAK_DELAY_MAX_MS      5000
#define DUPLICATE_WINDOW_NS   (120LL * 1000000000LL)
#define ERROR_LOG_INTERVAL_MS 5000
#define BAD_MSG_LOG_EVERY     100
#define LAG_INTERVAL_MS       2000      /* the consumer's pending count, read this often */
#define DESTROY_BURST         64        /* handled messages destroyed together, at most */
#define DESTROY_BURST_BYTES   (1 << 20) /* ... or once they hold this much */

/* A publish awaiting its PubAck (done is NULL for LOW): in `reports` and
 * in the deadline heap until its PubAck or its deadline. */
typedef struct report {
    mg_deliver_done done;
    void *arg;
    int64_t start_us;
    int64_t due_ms;
    size_t heap_i; /* index in heap */
    char key[24];  /* its token: the last part of its reply subject */
} report;

typedef struct tn {
    mg_transport base;
    char *urls, *prefix, *region, *gateway_id, *stream, *subject, *durable;
    int replicas, max_age_seconds, timeout_ms, ack_wait_ms, max_deliver, max_pending, max_inflight;
    size_t max_message_bytes;
    mg_peers *peers; /* borrowed; NULL: every region consumes NATS */

    natsOptions *opts;
    natsConnection *nc;
    jsCtx *js;
    natsSubscription *ack_sub; /* "<inbox>.*": the PubAcks */
    char *reply_prefix;        /* "<inbox>." */
    size_t reply_prefix_len;
    atomic_ullong next_token;
    pthread_mutex_t done_mu; /* ack_sub_done; signals done_cond */
    pthread_cond_t done_cond;
    bool ack_sub_done;      /* its delivery thread is over: no handler runs any more */
    pthread_mutex_t rep_mu; /* reports, heap; signals t_cond */
    mg_map *reports;        /* token -> report */
    report **heap;          /* min-heap on due_ms */
    size_t heap_n, heap_cap;
    int64_t timer_until;   /* when nats-timeout wakes next (mono ms; 0: running) */
    pthread_cond_t t_cond; /* CLOCK_MONOTONIC: a new earliest deadline, or stop */
    pthread_t timeout_thread;
    bool timeout_started, timeout_stop;
    atomic_int pending;

    natsSubscription *sub;
    mg_router *router;
    bool opened;         /* counted in nats_users */
    atomic_bool closing; /* tn_free closes the connection: no "reconnecting" */
    pthread_t consume_thread;
    bool consume_started;
    atomic_bool consume_run;
    atomic_int in_flight;
    pthread_mutex_t c_mu; /* room, parked */
    pthread_cond_t c_cond;
    struct rec *parked;             /* last deliveries that failed: for the inbox */
    pthread_mutex_t chain_mu;       /* chains, waiting, ready, chain_queued */
    mg_map *chains;                 /* recipient -> its last message in flight here */
    struct rec *waiting;            /* chained messages not started yet (wprev/wnext) */
    struct rec *ready, *ready_tail; /* chained messages free to start: nats-chain's */
    bool chain_queued;              /* a chain_job is queued */
    mg_pool *chain_pool;            /* "nats-chain": starts the chained messages */
    int64_t keep_at_ms;             /* nats-consume: when the waiting messages were last kept */
    pthread_mutex_t dead_mu;        /* dead, ndead, dead_bytes */
    natsMsg *dead[DESTROY_BURST];
    size_t ndead, dead_bytes;

    atomic_llong last_error_log_ms;
    /* meshgate_bus_*{bus="nats"} (bus_metrics.h) */
    mg_metric *sent, *failed_timeout, *failed_error, *failed_overload, *failed_stopping,
        *puback_latency, *dropped, *received, *bad_undecodable, *bad_oversized, *redeliveries,
        *retries, *parked_count, *undeliverable, *inflight_gauge, *lag_gauge;
    bool pending_registered;
    int64_t lag_at_ms; /* nats-consume: when the consumer's pending count was last read */
} tn;

/* One consumed message being handled, or waiting behind its recipient's
 * earlier one (chain_add). */
typedef struct rec {
    struct rec *next;          /* in parked or ready */
    struct rec *after;         /* its recipient's next message, waiting for this one */
    struct rec *wprev, *wnext; /* in waiting */
    tn *n;
    natsMsg *m; /* kept until acknowledged */
    mg_msg *msg;
    mg_msg hand;        /* msg as handed to the router (its trace names span) */
    int64_t kept_ms;    /* fetched, or last told in progress (keep_waiting) */
    uint64_t delivered; /* this delivery's number (1 = first) */
    mg_send_result res;
    struct mg_span *span; /* "process", when traced */
} rec;

static int nats_users; /* nats_Open / nats_Close pairs across transports */
static pthread_mutex_t nats_users_mu = PTHREAD_MUTEX_INITIALIZER;

/* ---- small helpers ------------------------------------------------------- */

static bool error_log_due(tn *n)
{
    int64_t now = mg_mono_ms();
    long long last = atomic_load(&n->last_error_log_ms);
    return now - last >= ERROR_LOG_INTERVAL_MS &&
           atomic_compare_exchange_strong(&n->last_error_log_ms, &last, now);
}

static void set_reason(mg_deliver_outcome *out, mg_status st, const char *fmt, const char *arg)
{
    out->status = st;
    snprintf(out->reason, sizeof(out->reason), fmt, arg);
}

/* "eu-west.1" -> "EU_WEST_1" style: what stream and durable names allow. */
static char *name_part(const char *region, bool upper)
{
    char *s = mg_xstrdup(region);
    for (char *p = s; *p; p++) {
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_')
            *p = '_';
        else if (upper)
            *p = (char)toupper((unsigned char)*p);
    }
    return s;
}

/* A publish's token in hex (by hand: snprintf was 1 % of the sender's CPU). */
static void token_key(unsigned long long v, char key[24])
{
    static const char hex[] = "0123456789abcdef";
    int i = 0;
    do {
        key[i++] = hex[v & 15];
        v >>= 4;
    } while (v);
    key[i] = '\0';
}

/* CLOCK_REALTIME ms from now: a deadline for the timed waits below. */
static struct timespec realtime_in_ms(long ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += ms * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    return ts;
}

static const char *status_text(natsStatus s, const char *fallback)
{
    const char *t = nats_GetLastError(NULL);
    if (t && t[0] == '(' && strstr(t, "): ")) /* "(conn.c:2088): text": the text */
        t = strstr(t, "): ") + 3;
    return t && t[0] ? t : s != NATS_OK ? natsStatus_GetText(s) : fallback;
}

static void conn_disconnected(natsConnection *nc, void *closure)
{
    tn *n = closure;
    if (!atomic_load(&n->closing))
        mg_log_warn("nats", "disconnected from the server gateway=%s (reconnecting)",
                    n->gateway_id);
}

static void conn_reconnected(natsConnection *nc, void *closure)
{
    tn *n = closure;
    char url[256] = "";
    natsConnection_GetConnectedUrl(nc, url, sizeof(url));
    mg_log_info("nats", "reconnected gateway=%s server=%s", n->gateway_id, url);
}

static void conn_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure)
{
    tn *n = closure;
    if (error_log_due(n))
        mg_log_warn("nats", "async error gateway=%s err=%s", n->gateway_id,
                    natsStatus_GetText(err));
}

/* Messages are destroyed in bursts: natsMsg_Destroy hands a message to
 * nats.c's collector thread and wakes it when it sleeps, so messages
 * destroyed one at a time (published ones, PubAcks, consumed ones as their
 * operations end) cost a wake-up each (7 % of the consuming gateway's CPU
 * flat out); a burst costs one. At most DESTROY_BURST messages
 * (DESTROY_BURST_BYTES) wait; nats-consume and nats-timeout destroy what
 * waits at each turn. last: one more to destroy; NULL: destroy what waits
 * now. Any thread. */
static void dead_flush(tn *n, natsMsg *last)
{
    natsMsg *burst[DESTROY_BURST];
    size_t k = 0;
    pthread_mutex_lock(&n->dead_mu);
    if (last) {
        n->dead[n->ndead++] = last;
        n->dead_bytes += (size_t)natsMsg_GetDataLength(last);
    }
    if (!last || n->ndead == DESTROY_BURST || n->dead_bytes >= DESTROY_BURST_BYTES) {
        k = n->ndead;
        memcpy(burst, n->dead, k * sizeof(*burst));
        n->ndead = n->dead_bytes = 0;
    }
    pthread_mutex_unlock(&n->dead_mu);
    for (size_t i = 0; i < k; i++)
        natsMsg_Destroy(burst[i]);
}

/* ---- publisher ----------------------------------------------------------- */

/* ---- PubAck deadlines (rep_mu held) ------------------------------------- */

static void heap_set(tn *n, size_t i, report *w)
{
    n->heap[i] = w;
    w->heap_i = i;
}

static void heap_up(tn *n, size_t i)
{
    report *w = n->heap[i];
    while (i > 0 && n->heap[(i - 1) / 2]->due_ms > w->due_ms) {
        heap_set(n, i, n->heap[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
    heap_set(n, i, w);
}

static void heap_down(tn *n, size_t i)
{
    report *w = n->heap[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n->heap_n)
            break;
        if (c + 1 < n->heap_n && n->heap[c + 1]->due_ms < n->heap[c]->due_ms)
            c++;
        if (n->heap[c]->due_ms >= w->due_ms)
            break;
        heap_set(n, i, n->heap[c]);
        i = c;
    }
    heap_set(n, i, w);
}

/* Adds w; wakes nats-timeout only when w is due before it wakes anyway
 * (rare: a send whose deadline is nearer than timeout_ms). */
static void heap_push(tn *n, report *w)
{
    if (n->heap_n == n->heap_cap) {
        n->heap_cap = n->heap_cap ? n->heap_cap * 2 : 1024;
        n->heap = mg_xrealloc(n->heap, n->heap_cap * sizeof(*n->heap));
    }
    heap_set(n, n->heap_n++, w);
    heap_up(n, n->heap_n - 1);
    if (n->timer_until && w->due_ms < n->timer_until) {
        n->timer_until = 0;
        pthread_cond_signal(&n->t_cond);
    }
}

static void heap_remove(tn *n, report *w)
{
    size_t i = w->heap_i;
    report *last = n->heap[--n->heap_n];
    if (i == n->heap_n)
        return;
    heap_set(n, i, last);
    heap_up(n, i);
    heap_down(n, last->heap_i);
}

/* Takes report key out of reports and the heap: NULL when there is none
 * (answered as due already). */
static report *take_report(tn *n, const char *key)
{
    report *w = mg_map_del(n->reports, key);
    if (w)
        heap_remove(n, w);
    return w;
}

static void fail_no_puback(tn *n, mg_deliver_done done, void *arg)
{
    mg_metric_add(n->failed_timeout, 1);
    if (!done)
        return;
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    set_reason(&out, MG_STATUS_FAILED, "nats: %s", "no PubAck in time (server unreachable?)");
    done(arg, &out);
}

/* "nats-timeout": answers FAILED for publishes whose PubAck is due. */
static void *timeout_main(void *arg)
{
    tn *n = arg;
    pthread_mutex_lock(&n->rep_mu);
    while (!n->timeout_stop) {
        int64_t now = mg_mono_ms();
        struct {
            mg_deliver_done done;
            void *arg;
        } due[64];
        int nd = 0;
        while (n->heap_n > 0 && n->heap[0]->due_ms <= now && nd < 64) {
            report *w = n->heap[0];
            heap_remove(n, w);
            mg_map_del(n->reports, w->key); /* a late PubAck finds nothing */
            due[nd].done = w->done;
            due[nd++].arg = w->arg;
            free(w);
        }
        if (nd > 0) {
            pthread_mutex_unlock(&n->rep_mu);
            atomic_fetch_sub(&n->pending, nd);
            for (int i = 0; i < nd; i++)
                fail_no_puback(n, due[i].done, due[i].arg);
            pthread_mutex_lock(&n->rep_mu);
            continue;
        }
        pthread_mutex_unlock(&n->rep_mu);
        dead_flush(n, NULL); /* at most a second late when traffic stops */
        pthread_mutex_lock(&n->rep_mu);
        int64_t until = n->heap_n > 0 ? n->heap[0]->due_ms : now + 1000;
        n->timer_until = until;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t ns = ts.tv_nsec + (until - now) * 1000000LL;
        ts.tv_sec += (time_t)(ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        pthread_cond_timedwait(&n->t_cond, &n->rep_mu, &ts);
        n->timer_until = 0;
    }
    pthread_mutex_unlock(&n->rep_mu);
    return NULL;
}

/* Why the stream did not store a publish, from its PubAck msg: NULL when
 * it did. A PubAck is {"stream":..,"seq":..[,"duplicate":true]} or
 * {"error":{"code":..,"err_code":..,"description":".."}}; a subject no
 * stream listens on answers "no responders" (a 503 status, no data). */
static const char *puback_error(natsMsg *msg, char *why, size_t len)
{
    const char *d = natsMsg_GetData(msg);
    int dl = natsMsg_GetDataLength(msg);
    if (dl <= 0 || !d)
        return natsMsg_IsNoResponders(msg) ? natsStatus_GetText(NATS_NO_RESPONDERS)
                                           : "empty PubAck";
    if (!memmem(d, (size_t)dl, "\"error\"", 7))
        return NULL;
    static const char key[] = "\"description\":\"";
    const char *p = memmem(d, (size_t)dl, key, sizeof(key) - 1);
    if (!p) {
        snprintf(why, len, "%.*s", dl, d);
        return why;
    }
    p += sizeof(key) - 1;
    size_t k = 0;
    for (; p < d + dl && *p != '"' && k + 1 < len; p++)
        why[k++] = *p == '\\' && p + 1 < d + dl ? *++p : *p;
    why[k] = '\0';
    return why;
}

/* nats.c's delivery thread of ack_sub: one PubAck. Takes msg. */
static void puback_cb(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
    (void)nc;
    (void)sub;
    tn *n = closure;
    const char *subject = natsMsg_GetSubject(msg);
    report *w = NULL;
    if (subject && strncmp(subject, n->reply_prefix, n->reply_prefix_len) == 0) {
        pthread_mutex_lock(&n->rep_mu);
        w = take_report(n, subject + n->reply_prefix_len);
        pthread_mutex_unlock(&n->rep_mu);
    }
    if (!w) {
        dead_flush(n, msg);
        return; /* answered as due already */
    }
    atomic_fetch_sub(&n->pending, 1);
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    char buf[sizeof(out.reason) - 8]; /* after "nats: " */
    const char *why = puback_error(msg, buf, sizeof(buf));
    if (!why) {
        mg_metric_add(n->sent, 1);
        out.status = MG_STATUS_QUEUED;
    } else {
        mg_metric_add(n->failed_error, 1);
        set_reason(&out, MG_STATUS_FAILED, "nats: %s", why);
        if (!w->done && error_log_due(n))
            mg_log_warn("nats", "LOW message not stored gateway=%s err=%s", n->gateway_id, why);
    }
    dead_flush(n, msg);
    if (w->done) {
        mg_histogram_observe_us(n->puback_latency, mg_mono_us() - w->start_us);
        w->done(w->arg, &out);
    }
    free(w);
}

/* nats.c's delivery thread of ack_sub is over: no puback_cb runs any more. */
static void ack_sub_complete(void *closure)
{
    tn *n = closure;
    pthread_mutex_lock(&n->done_mu);
    n->ack_sub_done = true;
    pthread_cond_signal(&n->done_cond);
    pthread_mutex_unlock(&n->done_mu);
}

static bool tn_available(mg_transport *t, const mg_route_target *target)
{
    tn *n = (tn *)t;
    return n->nc && natsConnection_Status(n->nc) == NATS_CONN_STATUS_CONNECTED &&
           (!n->peers || !target || mg_peers_region_consumes(n->peers, target->region, "nats"));
}

/* The subject of region's messages. */
static void subject_of(const tn *n, const char *region, char *buf, size_t len)
{
    snprintf(buf, len, "%s%s", n->prefix, region ? region : "");
}

static void tn_trace_attrs(mg_transport *t, const mg_route_target *target, mg_span *span)
{
    char subject[256];
    subject_of((tn *)t, target ? target->region : NULL, subject, sizeof(subject));
    mg_span_attr(span, "messaging.destination.name", subject);
}

static int tn_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                      int64_t deadline_ms, mg_deliver_done done, void *arg)
{
    tn *n = (tn *)t;
    if (!n->nc)
        return -ENOTCONN;
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    bool high = msg->priority != MG_PRIO_LOW;
    int64_t wait = n->timeout_ms;
    if (!target || !target->region || !target->region[0]) {
        set_reason(&out, MG_STATUS_FAILED, "nats: %s", "recipient's region unknown");
        goto now;
    }
    if (high) {
        int64_t left = deadline_ms - mg_mono_ms();
        if (left <= 0) {
            set_reason(&out, MG_STATUS_FAILED, "nats: %s", "deadline exceeded before publish");
            goto now;
        }
        wait = left < wait ? left : wait;
    }
    if (atomic_fetch_add(&n->pending, 1) >= n->max_pending) {
        atomic_fetch_sub(&n->pending, 1);
        mg_metric_add(n->dropped, 1);
        mg_metric_add(n->failed_overload, 1);
        set_reason(&out, MG_STATUS_FAILED, "%s", "dropped: overload");
        goto now;
    }
    char subject[256], msg_id[512];
    subject_of(n, target->region, subject, sizeof(subject));
    snprintf(msg_id, sizeof(msg_id), "%s/%s", msg->id, msg->to);
    size_t len = 0;
    uint8_t *val = mg_msg_pack(msg, &len);
    char key[24], reply[256];
    token_key(atomic_fetch_add(&n->next_token, 1), key);
    snprintf(reply, sizeof(reply), "%s%s", n->reply_prefix, key);
    natsMsg *m = NULL;
    natsStatus s = natsMsg_Create(&m, subject, reply, (const char *)val, (int)len);
    free(val);
    if (s == NATS_OK)
        s = natsMsgHeader_Set(m, "Nats-Msg-Id", msg_id); /* the stream's duplicate window */
    char tp[MG_TRACEPARENT_LEN + 1];
    if (s == NATS_OK && mg_traceparent_format(&msg->trace, tp))
        s = natsMsgHeader_Set(m, "traceparent", tp); /* W3C Trace Context as a NATS header */
    bool registered = false;
    if (s == NATS_OK) { /* registered first: the PubAck may beat the return */
        report *w = mg_new(report);
        w->done = high ? done : NULL;
        w->arg = arg;
        w->start_us = mg_mono_us();
        w->due_ms = mg_mono_ms() + wait;
        memcpy(w->key, key, sizeof(key));
        pthread_mutex_lock(&n->rep_mu);
        mg_map_put(n->reports, w->key, w);
        heap_push(n, w);
        pthread_mutex_unlock(&n->rep_mu);
        registered = true; /* w is puback_cb's or nats-timeout's from here */
        s = natsConnection_PublishMsg(n->nc, m);
    }
    if (m)
        dead_flush(n, m); /* the connection's buffer holds the bytes */
    if (s == NATS_OK) {
        if (high)
            return 0; /* puback_cb or nats-timeout answers */
        out.status = MG_STATUS_ACCEPTED;
        goto now;
    }
    bool answered = false; /* by nats-timeout, when the wait was over already */
    if (registered) {
        pthread_mutex_lock(&n->rep_mu);
        report *still = take_report(n, key);
        pthread_mutex_unlock(&n->rep_mu);
        answered = !still;
        free(still);
    }
    if (answered && high)
        return 0;
    if (!answered) {
        atomic_fetch_sub(&n->pending, 1);
        mg_metric_add(n->failed_error, 1);
    }
    set_reason(&out, MG_STATUS_FAILED, "nats: %s", status_text(s, "publish failed"));
now:
    done(arg, &out);
    return 0;
}

/* ---- stream and consumer set-up (control thread, blocking) --------------- */

static int ensure_stream(tn *n, char *err, size_t errlen)
{
    jsStreamConfig sc;
    jsStreamConfig_Init(&sc);
    const char *subjects[1] = {n->subject};
    sc.Name = n->stream;
    sc.Subjects = subjects;
    sc.SubjectsLen = 1;
    sc.Retention = js_WorkQueuePolicy;
    sc.Storage = js_FileStorage;
    sc.Replicas = n->replicas;
    sc.MaxAge = (int64_t)n->max_age_seconds * 1000000000LL;
    sc.Duplicates = DUPLICATE_WINDOW_NS;
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_AddStream(&si, n->js, &sc, NULL, &jerr);
    if (s != NATS_OK && jerr == JSStreamNameExistErr) {
        jerr = 0;
        s = js_UpdateStream(&si, n->js, &sc, NULL, &jerr);
    }
    if (s != NATS_OK) {
        snprintf(err, errlen, "nats: stream %s (subject %s, replicas %d): %s (code %d)", n->stream,
                 n->subject, n->replicas, status_text(s, "failed"), (int)jerr);
        return -EIO;
    }
    jsStreamInfo_Destroy(si);
    mg_log_info("nats", "stream ready stream=%s subject=%s replicas=%d max_age_s=%d", n->stream,
                n->subject, n->replicas, n->max_age_seconds);
    return 0;
}

static int ensure_consumer(tn *n, char *err, size_t errlen)
{
    jsConsumerConfig cc;
    jsConsumerConfig_Init(&cc);
    cc.Durable = n->durable;
    cc.AckPolicy = js_AckExplicit;
    cc.AckWait = (int64_t)n->ack_wait_ms * 1000000LL;
    cc.MaxDeliver = n->max_deliver;
    cc.FilterSubject = n->subject;
    cc.DeliverPolicy = js_DeliverAll;
    cc.MaxAckPending = (int64_t)n->max_inflight * 64; /* shared by the region's gateways */
    jsConsumerInfo *ci = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_AddConsumer(&ci, n->js, n->stream, &cc, NULL, &jerr);
    if (s != NATS_OK && jerr != 0) { /* exists with another configuration: take ours */
        jsErrCode first = jerr;
        jerr = 0;
        s = js_UpdateConsumer(&ci, n->js, n->stream, &cc, NULL, &jerr);
        if (s != NATS_OK && !jerr)
            jerr = first;
    }
    if (s != NATS_OK) {
        snprintf(err, errlen, "nats: consumer %s on stream %s: %s (code %d)", n->durable, n->stream,
                 status_text(s, "failed"), (int)jerr);
        return -EIO;
    }
    jsConsumerInfo_Destroy(ci);
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = n->stream;
    so.Consumer = n->durable; /* bound: never created or deleted by the library */
    s = js_PullSubscribe(&n->sub, n->js, n->subject, n->durable, NULL, &so, &jerr);
    if (s != NATS_OK) {
        snprintf(err, errlen, "nats: pull subscription %s: %s (code %d)", n->durable,
                 status_text(s, "failed"), (int)jerr);
        return -EIO;
    }
    return 0;
}

/* ---- consumer ------------------------------------------------------------ */

static void rec_free(rec *r)
{
    dead_flush(r->n, r->m);
    mg_msg_free(r->msg);
    free(r);
}

/* r is over: freed, its room in max_inflight given back. */
static void rec_retire(tn *n, rec *r)
{
    rec_free(r);
    mg_metric_add(n->inflight_gauge, -1);
    /* Only the completion that makes room wakes nats-consume (it waits for
     * room when max_inflight operations are out, never for one message). */
    if (atomic_fetch_sub(&n->in_flight, 1) == n->max_inflight) {
        pthread_mutex_lock(&n->c_mu);
        pthread_cond_signal(&n->c_cond);
        pthread_mutex_unlock(&n->c_mu);
    }
}

/* ---- per-recipient chains (chain_mu) -------------------------------------- */

static void waiting_link(tn *n, rec *r)
{
    r->wprev = NULL;
    r->wnext = n->waiting;
    if (n->waiting)
        n->waiting->wprev = r;
    n->waiting = r;
}

static void waiting_unlink(tn *n, rec *r)
{
    if (r->wprev)
        r->wprev->wnext = r->wnext;
    else
        n->waiting = r->wnext;
    if (r->wnext)
        r->wnext->wprev = r->wprev;
    r->wprev = r->wnext = NULL;
}

/* nats-consume: true when r may start now; false when an earlier message
 * of its recipient is still in its operation here: r then waits behind the
 * last of them and starts when that one is over (chain_release). */
static bool chain_add(tn *n, rec *r)
{
    pthread_mutex_lock(&n->chain_mu);
    rec *last = mg_map_put(n->chains, r->msg->to, r);
    if (last) {
        last->after = r;
        waiting_link(n, r);
    }
    pthread_mutex_unlock(&n->chain_mu);
    return !last;
}

static void chain_job(void *arg);

/* Any thread: r's operation is over (acknowledged, NAKed, in the inbox or
 * undeliverable). Its recipient's next message is handed to nats-chain,
 * which starts it: not here, where r's completion may run on a WebSocket
 * service loop (a delivery made there does not wait for its write, so the
 * chain would run through at once and pace nothing). While the consumer
 * stops, the messages behind r are dropped unacknowledged instead: the
 * server redelivers them. */
static void chain_release(tn *n, rec *r)
{
    rec *drop = NULL;
    bool post = false;
    pthread_mutex_lock(&n->chain_mu);
    rec *next = r->after;
    r->after = NULL;
    if (!next) {
        mg_map_del(n->chains, r->msg->to); /* r was its recipient's last */
    } else if (!atomic_load(&n->consume_run)) {
        drop = next;
        for (rec *q = next; q; q = q->after) {
            waiting_unlink(n, q);
            if (!q->after)
                mg_map_del(n->chains, q->msg->to);
        }
    } else {
        waiting_unlink(n, next);
        next->next = NULL;
        if (n->ready_tail)
            n->ready_tail->next = next;
        else
            n->ready = next;
        n->ready_tail = next;
        /* submitted under chain_mu: stop frees the pool only after it saw
         * consume_run false under chain_mu, so no submit comes later */
        if (!n->chain_queued)
            post = mg_pool_submit(n->chain_pool, chain_job, n) != 0;
        n->chain_queued = true;
    }
    pthread_mutex_unlock(&n->chain_mu);
    while (drop) {
        rec *q = drop;
        drop = q->after;
        rec_retire(n, q); /* never started: no span */
    }
    if (post)
        chain_job(n); /* never: one job is queued at most, and only while consuming */
}

/* nats-consume: chained messages waiting for their turn tell the server
 * they are in progress (natsMsg_InProgress: a publish that restarts the
 * ack wait), so it does not redeliver one while it waits here; each at
 * most every ack_wait/4, the list walked as often. */
static void keep_waiting(tn *n)
{
    int64_t now = mg_mono_ms(), every = n->ack_wait_ms / 4;
    if (now - n->keep_at_ms < every)
        return;
    n->keep_at_ms = now;
    pthread_mutex_lock(&n->chain_mu);
    for (rec *r = n->waiting; r; r = r->wnext) {
        if (now - r->kept_ms >= every) {
            natsMsg_InProgress(r->m, NULL);
            r->kept_ms = now;
        }
    }
    pthread_mutex_unlock(&n->chain_mu);
}

/* r is over: its recipient's next message goes on, and r is retired. */
static void rec_finish(tn *n, rec *r)
{
    chain_release(n, r);
    rec_retire(n, r);
}

/* Any thread: the message's operation answered. */
static void rec_done(void *arg, const mg_send_result *res)
{
    rec *r = arg;
    tn *n = r->n;
    mg_msg_trace_end(r->span, res->status, res->path, res->connections, res->reason);
    r->span = NULL;
    if (res->status != MG_STATUS_FAILED) {
        natsStatus s = natsMsg_Ack(r->m, NULL);
        if (s != NATS_OK && error_log_due(n)) /* it is redelivered: the dedupe window drops it */
            mg_log_warn("nats", "ack failed msg_id=%s err=%s", r->msg->id, natsStatus_GetText(s));
        rec_finish(n, r);
        return;
    }
    if (r->delivered < (uint64_t)n->max_deliver) {
        int64_t delay = NAK_DELAY_MIN_MS;
        for (uint64_t i = 1; i < r->delivered && delay < NAK_DELAY_MAX_MS; i++)
            delay *= 2;
        delay = delay > NAK_DELAY_MAX_MS ? NAK_DELAY_MAX_MS : delay;
        if (r->delivered == 1 || error_log_due(n))
            mg_log_warn("nats",
                        "delivery from the stream failed, redelivery in %lld ms msg_id=%s "
                        "user=%s delivery=%llu/%d reason=%s",
                        (long long)delay, r->msg->id, r->msg->to, (unsigned long long)r->delivered,
                        n->max_deliver, res->reason);
        natsMsg_NakWithDelay(r->m, delay, NULL);
        mg_metric_add(n->retries, 1);
        rec_finish(n, r);
        return;
    }
    r->res = *res; /* the last delivery: to the inbox, on nats-consume */
    pthread_mutex_lock(&n->c_mu);
    r->next = n->parked;
    n->parked = r;
    pthread_cond_signal(&n->c_cond);
    pthread_mutex_unlock(&n->c_mu);
}

/* nats-consume: last deliveries that failed go to the inbox. */
static void park_failed(tn *n)
{
    pthread_mutex_lock(&n->c_mu);
    rec *r = n->parked;
    n->parked = NULL;
    pthread_mutex_unlock(&n->c_mu);
    while (r) {
        rec *next = r->next;
        mg_inbox *ib = mg_router_inbox(n->router);
        if (ib->ops->store(ib, r->msg) == 0) {
            natsMsg_Ack(r->m, NULL);
            mg_metric_add(n->parked_count, 1);
            mg_log_warn("nats",
                        "message put in the inbox after %d deliveries msg_id=%s user=%s "
                        "reason=%s",
                        n->max_deliver, r->msg->id, r->msg->to, r->res.reason);
        } else {
            mg_metric_add(n->undeliverable, 1);
            mg_log_error("nats",
                         "message undeliverable after %d deliveries and the inbox refused it "
                         "(left in stream %s until its max age) msg_id=%s user=%s reason=%s",
                         n->max_deliver, n->stream, r->msg->id, r->msg->to, r->res.reason);
        }
        rec_finish(n, r);
        r = next;
    }
}

/* The delivery count in a JetStream message's ack subject, read in place
 * (natsMsg_GetMetaData copies every field, four allocations a message):
 * "$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>"
 * (v1) or "$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>...."
 * (v2: 9 tokens or more after "$JS.ACK."). 1 when it does not parse. */
static uint64_t delivery_count(const char *reply)
{
    static const char prefix[] = "$JS.ACK.";
    if (!reply || strncmp(reply, prefix, sizeof(prefix) - 1) != 0)
        return 1;
    const char *tok[10];
    int nt = 0;
    for (const char *p = reply + sizeof(prefix) - 1; p && nt < 10; nt++) {
        tok[nt] = p;
        p = strchr(p, '.');
        if (p)
            p++;
    }
    if (nt != 7 && nt < 9)
        return 1;
    const char *d = tok[nt == 7 ? 2 : 4];
    char *end = NULL;
    unsigned long long v = strtoull(d, &end, 10);
    return end != d && *end == '.' && v > 0 ? (uint64_t)v : 1;
}

/* nats-consume: one fetched message, decoded into a rec (NULL: a bad
 * message, terminated). Takes m. */
static rec *consume_one(tn *n, natsMsg *m)
{
    const char *data = natsMsg_GetData(m);
    int len = natsMsg_GetDataLength(m);
    uint64_t delivered = delivery_count(natsMsg_GetReply(m));
    mg_metric_add(n->received, 1);
    mg_msg *msg = NULL;
    bool oversized = len < 0 || (size_t)len > n->max_message_bytes;
    if (oversized || mg_msg_unpack((const uint8_t *)data, (size_t)len, &msg) != 0) {
        mg_metric_add(oversized ? n->bad_oversized : n->bad_undecodable, 1);
        int64_t c = mg_metric_value(n->bad_oversized) + mg_metric_value(n->bad_undecodable);
        if (c % BAD_MSG_LOG_EVERY == 1)
            mg_log_warn("nats",
                        "skipping a message that %s stream=%s bytes=%d (logged once per %d, "
                        "total=%lld)",
                        oversized ? "is over the size bound" : "does not decode", n->stream, len,
                        BAD_MSG_LOG_EVERY, (long long)c);
        natsMsg_Term(m, NULL); /* never redelivered */
        natsMsg_Destroy(m);
        return NULL;
    }
    if (delivered > 1)
        mg_metric_add(n->redeliveries, 1);
    rec *r = mg_new(rec);
    r->n = n;
    r->m = m;
    r->msg = msg;
    r->delivered = delivered;
    r->kept_ms = mg_mono_ms();
    atomic_fetch_add(&n->in_flight, 1);
    mg_metric_add(n->inflight_gauge, 1);
    const char *tp = NULL; /* the header, else the envelope's */
    if (natsMsgHeader_Get(m, "traceparent", &tp) == NATS_OK && tp)
        mg_traceparent_parse(tp, strlen(tp), &msg->trace);
    return r;
}

/* nats-consume (a fetch's messages) or nats-chain (chained ones whose turn
 * came): starts the operations of recs[0..k) together, so the router
 * resolves their recipients in one pipelined presence lookup. A message
 * that waited (kept_ms old) first tells the server it is in progress. */
static void start_recs(tn *n, rec **recs, size_t k)
{
    if (k == 0)
        return;
    mg_msg *hp[FETCH_MAX];
    int64_t now = mg_mono_ms();
    for (size_t i = 0; i < k; i++) {
        rec *r = recs[i];
        if (now - r->kept_ms >= n->ack_wait_ms / 4)
            natsMsg_InProgress(r->m, NULL);
        r->span =
            mg_msg_trace_process(r->msg, &r->hand, "nats", natsMsg_GetSubject(r->m), n->gateway_id);
        hp[i] = &r->hand;
    }
    /* The operations end well before the server would redeliver. */
    int64_t deadline = now + (int64_t)n->ack_wait_ms * 3 / 4;
    mg_router_deliver_from_queue_many(n->router, hp, k, deadline, rec_done, (void *const *)recs);
}

/* "nats-chain" (the one thread of chain_pool): starts the chained messages
 * chain_release made free, together; while the consumer stops, drops them
 * unacknowledged (the server redelivers them). */
static void chain_job(void *arg)
{
    tn *n = arg;
    pthread_mutex_lock(&n->chain_mu);
    rec *r = n->ready;
    n->ready = n->ready_tail = NULL;
    n->chain_queued = false;
    pthread_mutex_unlock(&n->chain_mu);
    while (r) {
        rec *recs[FETCH_MAX];
        size_t k = 0;
        for (; r && k < FETCH_MAX; r = r->next) /* next read before any start */
            recs[k++] = r;
        if (atomic_load(&n->consume_run)) {
            start_recs(n, recs, k);
            continue;
        }
        for (size_t i = 0; i < k; i++)
            rec_finish(n, recs[i]);
    }
}

/* nats-consume: a fetched batch. A message whose recipient has an earlier
 * one in its operation here waits behind it (chain_add); the others start
 * together. Takes the list's messages. */
static void consume_batch(tn *n, natsMsgList *list)
{
    rec *recs[FETCH_MAX];
    size_t k = 0;
    for (int i = 0; i < list->Count; i++) {
        natsMsg *m = list->Msgs[i];
        list->Msgs[i] = NULL;
        if (i >= FETCH_MAX) { /* never: a fetch asks for at most FETCH_MAX */
            natsMsg_Nak(m, NULL);
            natsMsg_Destroy(m);
            continue;
        }
        rec *r = consume_one(n, m);
        if (r && chain_add(n, r))
            recs[k++] = r;
    }
    start_recs(n, recs, k);
}

/* nats-consume: what the stream has for us now, up to batch, at once (a
 * no-wait pull); when it has nothing, one waiting pull for a single message
 * (at most FETCH_WAIT_MS), so a message is handed over when it arrives
 * rather than when a whole batch has gathered. */
static natsStatus fetch(tn *n, natsMsgList *list, int batch)
{
    /* Messages (and status replies) of an earlier pull that came after its
     * fetch gave up (a loaded machine) wait in the subscription, and a fetch
     * takes those first. nats.c before 3.10 (Debian's 3.4) then asks the
     * server for batch minus the ones it took but reads until it holds that
     * many more: with more than half a batch taken, it writes past its array
     * (nats.c #749, a heap overflow an ASan gateway hit here). A fetch of one
     * cannot: it ends at its first message. So while some wait, they are
     * taken one fetch at a time (no round trip: a fetch that finds one sends
     * no pull). */
    int waiting = 0;
    if (natsSubscription_GetPending(n->sub, &waiting, NULL) == NATS_OK && waiting > 0)
        batch = 1;
    jsFetchRequest req;
    jsFetchRequest_Init(&req);
    req.Batch = batch;
    req.NoWait = true;
    /* Bounds the wait for the answer: the server holds a no-wait pull with an expiry that long
     * when it has nothing (measured: the whole 5 s of --nats-timeout-ms, which a stop waited out).
     */
    req.Expires = (int64_t)FETCH_WAIT_MS * 1000000LL;
    natsStatus s = natsSubscription_FetchRequest(list, n->sub, &req);
    if (s == NATS_OK && list->Count > 0)
        return s;
    natsMsgList_Destroy(list);
    if (s != NATS_NOT_FOUND && s != NATS_TIMEOUT && s != NATS_OK)
        return s;
    return natsSubscription_Fetch(list, n->sub, 1, FETCH_WAIT_MS, NULL);
}

/* nats-consume: the stream's messages not yet delivered to the region's
 * consumer (meshgate_bus_consumer_lag), at most every LAG_INTERVAL_MS; a
 * request to the server, bounded by timeout_ms. */
static void read_lag(tn *n)
{
    int64_t now = mg_mono_ms();
    if (now - n->lag_at_ms < LAG_INTERVAL_MS ||
        natsConnection_Status(n->nc) != NATS_CONN_STATUS_CONNECTED)
        return; /* reconnecting: the request would only wait out timeout_ms */
    n->lag_at_ms = now;
    jsConsumerInfo *ci = NULL;
    jsErrCode jerr = 0;
    if (js_GetConsumerInfo(&ci, n->js, n->stream, n->durable, NULL, &jerr) == NATS_OK) {
        mg_metric_set(n->lag_gauge, (int64_t)ci->NumPending);
        jsConsumerInfo_Destroy(ci);
    }
}

static void *consume_main(void *arg)
{
    tn *n = arg;
    while (atomic_load(&n->consume_run)) {
        park_failed(n);
        dead_flush(n, NULL);
        read_lag(n);
        keep_waiting(n);
        int room = n->max_inflight - atomic_load(&n->in_flight);
        if (room <= 0) {
            /* Flow control: max_inflight operations are out. Sleep until the
             * completion that makes room (or a parked message) signals; the
             * 100 ms bound only re-checks. No message is waited for. */
            pthread_mutex_lock(&n->c_mu);
            if (n->max_inflight - atomic_load(&n->in_flight) <= 0 && !n->parked) {
                struct timespec ts = realtime_in_ms(100);
                pthread_cond_timedwait(&n->c_cond, &n->c_mu, &ts);
            }
            pthread_mutex_unlock(&n->c_mu);
            continue;
        }
        natsMsgList list = {0};
        natsStatus s = fetch(n, &list, room < FETCH_MAX ? room : FETCH_MAX);
        if (s != NATS_OK && s != NATS_TIMEOUT && s != NATS_NOT_FOUND) {
            if (error_log_due(n))
                mg_log_warn("nats", "fetch failed stream=%s consumer=%s err=%s", n->stream,
                            n->durable, status_text(s, "fetch failed"));
            natsMsgList_Destroy(&list);
            usleep(100 * 1000);
            continue;
        }
        consume_batch(n, &list);
        natsMsgList_Destroy(&list);
    }
    /* Stopping: the operations in flight answer (bounded by their deadline). */
    int64_t end = mg_mono_ms() + n->ack_wait_ms;
    while (atomic_load(&n->in_flight) > 0 && mg_mono_ms() < end) {
        park_failed(n);
        usleep(2000);
    }
    park_failed(n);
    dead_flush(n, NULL);
    if (atomic_load(&n->in_flight) > 0)
        mg_log_error("nats", "operations still in flight at consumer stop count=%d",
                     atomic_load(&n->in_flight));
    return NULL;
}

/* ---- lifecycle ----------------------------------------------------------- */

static void tn_free(mg_transport *t);

static const struct mg_transport_ops nats_ops = {
    .name = "nats",
    .path = MG_PATH_NATS,
    .orders_on_return = true,
    .available = tn_available,
    .deliver = tn_deliver,
    .disconnect = NULL,
    .free = tn_free,
    .trace_attrs = tn_trace_attrs,
};

static double pending_now(void *arg)
{
    return (double)atomic_load(&((tn *)arg)->pending);
}

static int connect_servers(tn *n, char *err, size_t errlen)
{
    char *list = mg_xstrdup(n->urls), *save = NULL;
    const char *servers[64];
    int count = 0;
    for (char *tok = strtok_r(list, ",", &save); tok && count < 64;
         tok = strtok_r(NULL, ",", &save))
        if (*tok)
            servers[count++] = tok;
    natsStatus s = natsOptions_Create(&n->opts);
    if (s == NATS_OK)
        s = natsOptions_SetServers(n->opts, servers, count);
    free(list);
    if (s == NATS_OK)
        s = natsOptions_SetName(n->opts, n->gateway_id);
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(n->opts, 2000);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(n->opts, -1); /* forever */
    if (s == NATS_OK)
        s = natsOptions_SetReconnectWait(n->opts, 250);
    if (s == NATS_OK)
        s = natsOptions_SetDisconnectedCB(n->opts, conn_disconnected, n);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectedCB(n->opts, conn_reconnected, n);
    if (s == NATS_OK)
        s = natsOptions_SetErrorHandler(n->opts, conn_error, n);
    if (s != NATS_OK) {
        snprintf(err, errlen, "nats: --nats-url %s: %s", n->urls, status_text(s, "bad option"));
        return -EINVAL;
    }
    s = natsConnection_Connect(&n->nc, n->opts);
    if (s != NATS_OK) {
        snprintf(err, errlen, "nats: cannot connect to %s: %s", n->urls,
                 status_text(s, "connect failed"));
        n->nc = NULL;
        return -EHOSTUNREACH;
    }
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = n->timeout_ms;
    s = natsConnection_JetStream(&n->js, n->nc, &jo);
    if (s != NATS_OK) {
        snprintf(err, errlen, "nats: JetStream context: %s", status_text(s, "failed"));
        return -EIO;
    }
    natsInbox *inbox = NULL;
    s = natsInbox_Create(&inbox);
    if (s == NATS_OK) {
        n->reply_prefix = mg_xasprintf("%s.", inbox);
        n->reply_prefix_len = strlen(n->reply_prefix);
        char *all = mg_xasprintf("%s*", n->reply_prefix);
        s = natsConnection_Subscribe(&n->ack_sub, n->nc, all, puback_cb, n);
        free(all);
    }
    natsInbox_Destroy(inbox);
    if (s == NATS_OK)
        s = natsSubscription_SetPendingLimits(n->ack_sub, -1, -1); /* max_pending bounds it */
    if (s == NATS_OK)
        s = natsSubscription_SetOnCompleteCB(n->ack_sub, ack_sub_complete, n);
    if (s != NATS_OK) {
        snprintf(err, errlen, "nats: PubAck subscription: %s", status_text(s, "failed"));
        return -EIO;
    }
    return 0;
}

mg_transport *mg_transport_nats_create(const mg_transport_nats_config *cfg, char *err,
                                       size_t errlen)
{
    tn *n = mg_new(tn);
    n->urls = mg_xstrdup(cfg->urls ? cfg->urls : "");
    n->prefix = mg_xstrdup(cfg->subject_prefix ? cfg->subject_prefix : "meshgate.deliver.");
    n->region = mg_xstrdup(cfg->region && cfg->region[0] ? cfg->region : "local");
    n->gateway_id =
        mg_xstrdup(cfg->gateway_id && cfg->gateway_id[0] ? cfg->gateway_id : "meshgate");
    char *up = name_part(n->region, true), *low = name_part(n->region, false);
    n->stream = mg_xasprintf("MESHGATE_%s", up);
    n->durable = mg_xasprintf("meshgate-%s", low);
    free(up);
    free(low);
    n->subject = mg_xasprintf("%s%s", n->prefix, n->region);
    n->replicas = cfg->replicas > 0 ? cfg->replicas : 1;
    n->max_age_seconds = cfg->max_age_seconds > 0 ? cfg->max_age_seconds : 86400;
    n->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 5000;
    n->ack_wait_ms = cfg->ack_wait_ms > 0 ? cfg->ack_wait_ms : 30000;
    n->max_deliver = cfg->max_deliver > 0 ? cfg->max_deliver : 5;
    n->max_pending = cfg->max_pending > 0 ? cfg->max_pending : 65536;
    n->max_inflight = cfg->max_inflight > 0 ? cfg->max_inflight : 1024;
    n->max_message_bytes = cfg->max_message_bytes ? cfg->max_message_bytes : 4u << 20;
    n->peers = cfg->peers;
    n->reports = mg_map_create(1024);
    pthread_mutex_init(&n->rep_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&n->t_cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&n->c_mu, NULL);
    pthread_mutex_init(&n->dead_mu, NULL);
    pthread_mutex_init(&n->chain_mu, NULL);
    n->chains = mg_map_create(256);
    pthread_mutex_init(&n->done_mu, NULL);
    pthread_cond_init(&n->done_cond, NULL);
    pthread_cond_init(&n->c_cond, NULL);
    n->sent = mg_bus_metric(MG_BUS_SENT, "nats", NULL);
    n->failed_timeout = mg_bus_metric(MG_BUS_FAILED, "nats", "timeout");
    n->failed_error = mg_bus_metric(MG_BUS_FAILED, "nats", "error");
    n->failed_overload = mg_bus_metric(MG_BUS_FAILED, "nats", "overload");
    n->failed_stopping = mg_bus_metric(MG_BUS_FAILED, "nats", "stopping");
    n->puback_latency = mg_bus_metric(MG_BUS_RECEIPT, "nats", NULL);
    n->dropped = mg_counter("meshgate_dropped_total", "Messages dropped, by reason",
                            "reason=\"nats_pending_full\"");
    n->received = mg_bus_metric(MG_BUS_RECEIVED, "nats", NULL);
    n->bad_undecodable = mg_bus_metric(MG_BUS_BAD, "nats", "undecodable");
    n->bad_oversized = mg_bus_metric(MG_BUS_BAD, "nats", "oversized");
    n->redeliveries = mg_bus_metric(MG_BUS_REDELIVERIES, "nats", NULL);
    n->retries = mg_bus_metric(MG_BUS_RETRIES, "nats", NULL);
    n->parked_count = mg_bus_metric(MG_BUS_PARKED, "nats", NULL);
    n->undeliverable = mg_bus_metric(MG_BUS_UNDELIVERABLE, "nats", NULL);
    n->inflight_gauge = mg_bus_metric(MG_BUS_CONSUMER_INFLIGHT, "nats", NULL);
    n->lag_gauge = mg_bus_metric(MG_BUS_CONSUMER_LAG, "nats", NULL);
    n->base.ops = &nats_ops;

    if (!n->urls[0]) {
        mg_log_info("nats", "no servers configured: the NATS path is off");
        return &n->base;
    }
    pthread_mutex_lock(&nats_users_mu);
    if (nats_users++ == 0)
        nats_Open(-1);
    pthread_mutex_unlock(&nats_users_mu);
    n->opened = true;
    mg_bus_pending_register("nats", pending_now, n);
    n->pending_registered = true;
    if (connect_servers(n, err, errlen) != 0 || ensure_stream(n, err, errlen) != 0) {
        tn_free(&n->base);
        return NULL;
    }
    if (pthread_create(&n->timeout_thread, NULL, timeout_main, n) != 0) {
        snprintf(err, errlen, "nats: cannot start the PubAck timeout thread");
        tn_free(&n->base);
        return NULL;
    }
    pthread_setname_np(n->timeout_thread, "nats-timeout");
    n->timeout_started = true;
    char url[256] = "";
    natsConnection_GetConnectedUrl(n->nc, url, sizeof(url));
    mg_log_info("nats", "publisher ready server=%s subject=%s timeout_ms=%d max_pending=%d", url,
                n->subject, n->timeout_ms, n->max_pending);
    return &n->base;
}

int mg_transport_nats_start_consumer(mg_transport *t, mg_router *router, char *err, size_t errlen)
{
    tn *n = (tn *)t;
    if (!n || !router)
        return -EINVAL;
    if (!n->nc)
        return 0;
    if (n->consume_started)
        return -EALREADY;
    int rc = ensure_consumer(n, err, errlen);
    if (rc != 0)
        return rc;
    n->router = router;
    n->chain_pool = mg_pool_create("nats-chain", 1, 16); /* one job queued at most */
    atomic_store(&n->consume_run, true);
    if (pthread_create(&n->consume_thread, NULL, consume_main, n) != 0) {
        atomic_store(&n->consume_run, false);
        mg_pool_free(n->chain_pool);
        n->chain_pool = NULL;
        natsSubscription_Destroy(n->sub);
        n->sub = NULL;
        snprintf(err, errlen, "nats: cannot start the consumer thread");
        return -EAGAIN;
    }
    pthread_setname_np(n->consume_thread, "nats-consume");
    n->consume_started = true;
    mg_log_info("nats", "consumer started stream=%s consumer=%s ack_wait_ms=%d max_deliver=%d",
                n->stream, n->durable, n->ack_wait_ms, n->max_deliver);
    return 0;
}

void mg_transport_nats_stop(mg_transport *t, int flush_ms)
{
    tn *n = (tn *)t;
    if (!n)
        return;
    if (n->consume_started) {
        atomic_store(&n->consume_run, false);
        /* a chain_release that saw consume_run true has submitted by now */
        pthread_mutex_lock(&n->chain_mu);
        pthread_mutex_unlock(&n->chain_mu);
        pthread_join(n->consume_thread, NULL);
        n->consume_started = false;
        mg_pool_free(n->chain_pool); /* its last jobs drop what they hold */
        n->chain_pool = NULL;
        natsConnection_Flush(n->nc);      /* the acks go out before the subscription does */
        natsSubscription_Destroy(n->sub); /* not Unsubscribe: the durable stays */
        n->sub = NULL;
        mg_log_info("nats", "consumer stopped stream=%s", n->stream);
    }
    if (n->ack_sub && flush_ms > 0 && atomic_load(&n->pending) > 0) {
        int64_t end = mg_mono_ms() + flush_ms; /* the control thread: a bounded poll */
        while (atomic_load(&n->pending) > 0 && mg_mono_ms() < end)
            usleep(2000);
        if (atomic_load(&n->pending) > 0)
            mg_log_warn("nats", "publishes still awaiting PubAcks after %d ms count=%d", flush_ms,
                        atomic_load(&n->pending));
    }
}

static void tn_free(mg_transport *t)
{
    tn *n = (tn *)t;
    if (!n)
        return;
    mg_transport_nats_stop(t, n->js ? 1000 : 0);
    atomic_store(&n->closing, true);
    if (n->nc)
        natsConnection_Close(n->nc);
    if (n->ack_sub) { /* shutdown: its handler may run until its delivery thread ends */
        struct timespec until = realtime_in_ms(2000); /* signalled by ack_sub_complete */
        pthread_mutex_lock(&n->done_mu);
        int rc = 0;
        while (!n->ack_sub_done && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&n->done_cond, &n->done_mu, &until);
        pthread_mutex_unlock(&n->done_mu);
    }
    dead_flush(n, NULL); /* before nats.c closes: its collector frees them */
    if (n->timeout_started) {
        pthread_mutex_lock(&n->rep_mu);
        n->timeout_stop = true;
        pthread_cond_signal(&n->t_cond);
        pthread_mutex_unlock(&n->rep_mu);
        pthread_join(n->timeout_thread, NULL);
    }
    jsCtx_Destroy(n->js);
    natsSubscription_Destroy(n->ack_sub);
    natsConnection_Destroy(n->nc);
    natsOptions_Destroy(n->opts);
    if (n->pending_registered)
        mg_bus_pending_register("nats", NULL, NULL);
    if (n->opened) {
        pthread_mutex_lock(&nats_users_mu);
        if (--nats_users == 0)
            nats_CloseAndWait(2000);
        pthread_mutex_unlock(&nats_users_mu);
    }
    /* Reports never answered (closed before their PubAck) fail now. */
    const char *key;
    void *v;
    for (size_t it = 0; mg_map_next(n->reports, &it, &key, &v);) {
        report *w = v;
        if (w->done) {
            mg_metric_add(n->failed_stopping, 1);
            mg_deliver_outcome out;
            memset(&out, 0, sizeof(out));
            set_reason(&out, MG_STATUS_FAILED, "nats: %s", "connection closed before the PubAck");
            w->done(w->arg, &out);
        }
        free(w);
    }
    mg_map_free(n->reports);
    free(n->heap);
    pthread_mutex_destroy(&n->rep_mu);
    pthread_cond_destroy(&n->t_cond);
    pthread_mutex_destroy(&n->c_mu);
    pthread_mutex_destroy(&n->dead_mu);
    mg_map_free(n->chains);
    pthread_mutex_destroy(&n->chain_mu);
    pthread_mutex_destroy(&n->done_mu);
    pthread_cond_destroy(&n->done_cond);
    free(n->reply_prefix);
    pthread_cond_destroy(&n->c_cond);
    free(n->urls);
    free(n->prefix);
    free(n->region);
    free(n->gateway_id);
    free(n->stream);
    free(n->subject);
    free(n->durable);
    free(n);
}
