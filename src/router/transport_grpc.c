/* transport_grpc.c: the gRPC peer transport (see transport_grpc.h).
 *
 * Owns one completion queue, the "peer-cq" threads that drain it, and a
 * small state per peer id (link quality, calls in flight, metric handles).
 *
 * DESIGN
 * A call is a struct pcall on the heap, its tag on our completion queue.
 * deliver() takes a call slot on the peer, holds a reference to the peer
 * table snapshot (so the channel lives while the call does), starts one
 * batch of the six client ops (common/mg_grpc.h, mg_grpc_unary) with a
 * deadline of min(router deadline, now + peer_deadline_ms) and returns. A
 * "peer-cq" thread takes the completion off the queue, decodes the answer,
 * records it, and either retries once (a fast UNAVAILABLE with time left) by
 * starting the next call from the same thread, or releases the slot and runs
 * the caller's done callback. gRPC completes every call by its deadline, so
 * every pcall ends; no thread waits for one.
 *
 * Coalescing: with coalesce_calls calls in flight to a peer, deliver()
 * queues the delivery on the peer (packed, with its callback); the next call
 * to end hands its slot to a DeliverMany carrying the queue (up to
 * MANY_MAX_BYTES per call; results[i] answers deliveries[i]). Handing the
 * slot over keeps the queue ahead of deliveries that come after it and
 * keeps free() (which waits for the slots) from passing it. UNIMPLEMENTED
 * from the peer (a gateway of before DeliverMany) sends the queue one call
 * each and turns coalescing off for that peer.
 *
 * Ordered (coalesce_calls 1): a peer's deliveries go by one call at a time,
 * its "lane". deliver() takes the lane when it is free (the queue is then
 * empty), else queues behind it; the lane's call, when it ends, sends the
 * queue's first DeliverMany's worth (one delivery each to a peer that took
 * no DeliverMany) on the same slot, and frees the lane once the queue is
 * empty. The receiver hands a call's deliveries to its hub in order and
 * answers when they are written, so a delivery queued behind another cannot
 * overtake it: deliver() returning 0 fixes the order (orders_on_return),
 * and a WebSocket sender's next message to the peer starts at once. Past
 * max_inflight queued deliveries deliver() fails -EBUSY (the plan's next
 * step). DeliverBatch and DisconnectLocal calls do not take the lane.
 * When the lane's call fails (after its retry), or a delivery expires in the
 * queue, everything queued fails with it, in order, before the failure is
 * recorded (lane_drain): so the deliveries behind it take the plan's next
 * step in the order they came, ahead of any that the link's turning
 * degraded sends there directly. A degraded link's probe goes on the lane
 * but does not fix order (deliver returns MG_DELIVER_UNORDERED): the
 * sender's next message, which goes by the next step at once, waits for it;
 * nor does a delivery to another region's gateway (a hot pair's: when the
 * pair cools, its next message goes by Kafka). A peer that left the table
 * stays available while its lane holds deliveries, so the next one queues
 * behind them and fails after them.
 *
 * Per peer: `inflight` is bounded by peer_max_inflight (beyond: available()
 * false, deliver() FAILED "busy"); `link` is the circuit breaker of
 * link_quality.h, updated with every attempt's result under the state's
 * mutex. Peer states are created on first use and kept until free (one small
 * entry per peer id ever seen, as the metrics registry keeps its series).
 *
 * Threads: available/deliver from any thread (they never block);
 * disconnect blocks on its own queue (worker jobs only); the peer-cq threads
 * run completions and the callbacks they lead to. free() refuses new calls,
 * waits for the ones in flight (each ends by its deadline), shuts the queue
 * down and joins the threads.
 */
#include "router/transport_grpc.h"
#include "common/mg_grpc.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "common/mg_trace.h"
#include "meshgate/v1/messaging.pb-c.h"
#include "meshgate/v1/peer.pb-c.h"

#include <ctype.h>
#include <errno.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIN_RETRY_MS    50        /* time left needed to retry after UNAVAILABLE */
#define MANY_MAX_BYTES  (1 << 20) /* a DeliverMany's request, well under the receive limit */
#define N_CODES         17        /* GRPC_STATUS_OK .. GRPC_STATUS_UNAUTHENTICATED */
#define R_DELIVERED     N_CODES
#define R_NOT_CONNECTED (N_CODES + 1)
#define R_BUSY          (N_CODES + 2)
#define R_COUNT         (N_CODES + 3)

/* A delivery waiting behind its peer's calls in flight, to go out in the
 * next DeliverMany (see DESIGN). */
struct queued {
    struct queued *next;
    uint8_t *req; /* its DeliverMessageRequest, packed */
    size_t len;
    int64_t deadline_ms;
    mg_deliver_done done;
    void *arg;
    mg_trace_ctx trace; /* for the metadata, when it goes alone after all */
};

struct peer_state {
    pthread_mutex_t mu;
    char *id;
    mg_link link;
    int inflight;
    struct queued *qhead, *qtail; /* deliveries waiting for a call to end */
    int qn;
    bool no_many; /* the peer answered UNIMPLEMENTED to DeliverMany (an older gateway) */
    bool lane;    /* ordered: a delivery call is in flight; the next ones queue behind it */
    mg_metric *latency, *degraded;
    mg_metric *calls[R_COUNT]; /* created on first use, under mu */
};

typedef struct mg_transport_grpc {
    mg_transport base;
    struct mg_transport_ops ops; /* grpc_ops; orders_on_return when ordered */
    mg_peers *peers;
    char *gateway_id, *region;
    int peer_deadline_ms, max_inflight, coalesce_calls;
    bool ordered; /* coalesce_calls == 1: one delivery call per peer at a time (see DESIGN) */
    mg_link_config link_cfg;
    grpc_metadata auth; /* the peer token (cfg->peer_token), sent when nauth is 1 */
    size_t nauth;

    grpc_completion_queue *cq;
    pthread_t *threads;
    int nthreads;

    pthread_mutex_t mu; /* guards states, active, closing */
    pthread_cond_t idle;
    mg_map *states; /* peer id -> struct peer_state* */
    int active;     /* calls in flight over all peers */
    bool closing;
} mg_transport_grpc;

/* One DeliverMessage or DeliverBatch in flight (see DESIGN). */
struct pcall {
    mg_grpc_unary u;
    const char *method;
    size_t n; /* recipients: 1 for DeliverMessage */
    void (*batch_done)(void *arg, const mg_deliver_outcome *out, size_t n); /* DeliverBatch */
    mg_transport_grpc *t;
    struct peer_state *st;
    mg_peer_set *set; /* holds the peer's channel */
    const mg_peer *peer;
    grpc_byte_buffer *req;
    int64_t deadline_ms, start_us;
    int attempt;
    bool probe;
    mg_deliver_done done;
    void *arg;
    struct queued *many; /* DeliverMany: its n deliveries, each answered on its own */
    bool held;           /* started on a slot handed over by slot_release (st set) */
    bool lane;           /* ordered: this call holds its peer's lane */
    grpc_metadata md[2]; /* the peer token, then traceparent (of tp) when traced */
    size_t nmd;
    char tp[MG_TRACEPARENT_LEN + 1];
};

static void call_complete(struct pcall *pc, bool ok);
static void deliver_one(mg_transport_grpc *t, struct peer_state *st, struct queued *q, bool held);

/* ---- small helpers ------------------------------------------------------ */

static const char *result_name(int r, char *buf, size_t len)
{
    if (r == R_DELIVERED)
        return "delivered";
    if (r == R_NOT_CONNECTED)
        return "not_connected";
    if (r == R_BUSY)
        return "busy";
    const char *n = mg_grpc_code_name((grpc_status_code)r);
    size_t i = 0;
    for (; n[i] && i + 1 < len; i++)
        buf[i] = (char)tolower((unsigned char)n[i]);
    buf[i] = '\0';
    return buf;
}

/* A Prometheus label value: backslash, quote and newline escaped. */
static void label_escape(const char *in, char *out, size_t len)
{
    size_t o = 0;
    for (; *in && o + 3 < len; in++) {
        if (*in == '\\' || *in == '"') {
            out[o++] = '\\';
            out[o++] = *in;
        } else if (*in == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *in;
        }
    }
    out[o] = '\0';
}

/* ---- the completion-queue threads ---------------------------------------- */

static void *cq_main(void *arg)
{
    mg_transport_grpc *t = arg;
    pthread_setname_np(pthread_self(), "peer-cq");
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(t->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        call_complete(ev.tag, ev.success != 0);
    }
    return NULL;
}

/* ---- peer state ----------------------------------------------------------- */

static struct peer_state *state_get(mg_transport_grpc *t, const char *id)
{
    pthread_mutex_lock(&t->mu);
    struct peer_state *st = mg_map_get(t->states, id);
    if (!st) {
        st = mg_new(struct peer_state);
        pthread_mutex_init(&st->mu, NULL);
        st->id = mg_xstrdup(id);
        mg_link_init(&st->link);
        char esc[192], labels[224];
        label_escape(id, esc, sizeof(esc));
        snprintf(labels, sizeof(labels), "peer=\"%s\"", esc);
        st->latency = mg_histogram("meshgate_peer_latency_seconds",
                                   "Latency of answered GatewayPeer calls, by peer", labels);
        st->degraded =
            mg_gauge("meshgate_peer_degraded",
                     "1 while the link to the peer is degraded (traffic goes by Kafka)", labels);
        mg_metric_set(st->degraded, 0);
        mg_map_put(t->states, id, st);
    }
    pthread_mutex_unlock(&t->mu);
    return st;
}

static void count_result(struct peer_state *st, int r)
{
    /* caller holds st->mu */
    if (!st->calls[r]) {
        char esc[192], labels[256], rb[32];
        label_escape(st->id, esc, sizeof(esc));
        snprintf(labels, sizeof(labels), "peer=\"%s\",result=\"%s\"", esc,
                 result_name(r, rb, sizeof(rb)));
        st->calls[r] =
            mg_counter("meshgate_peer_calls_total", "GatewayPeer calls by peer and result", labels);
    }
    mg_metric_add(st->calls[r], 1);
}

/* Counts a call (or a lane reserved for one) that free() waits for; false
 * while closing. */
static bool active_take(mg_transport_grpc *t)
{
    pthread_mutex_lock(&t->mu);
    bool ok = !t->closing;
    if (ok)
        t->active++;
    pthread_mutex_unlock(&t->mu);
    return ok;
}

static void active_drop(mg_transport_grpc *t)
{
    pthread_mutex_lock(&t->mu);
    if (--t->active == 0)
        pthread_cond_broadcast(&t->idle);
    pthread_mutex_unlock(&t->mu);
}

/* Takes a call slot on the peer; false when the bound is reached (counted
 * as "busy") or the transport is closing. *probe: the link is degraded and
 * this call is its probe. */
static bool slot_take(mg_transport_grpc *t, struct peer_state *st, bool *probe)
{
    if (!active_take(t))
        return false;
    pthread_mutex_lock(&st->mu);
    bool ok = st->inflight < t->max_inflight;
    if (ok)
        st->inflight++;
    else
        count_result(st, R_BUSY);
    *probe = st->link.degraded;
    pthread_mutex_unlock(&st->mu);
    if (!ok)
        active_drop(t);
    return ok;
}

/* Detaches what goes out next from the peer's queue (caller holds st->mu):
 * all of it; ordered, only the first call's worth (one DeliverMany, or one
 * delivery to a peer that takes no DeliverMany), the rest waiting for that
 * call to end. */
static struct queued *queue_take(mg_transport_grpc *t, struct peer_state *st)
{
    struct queued *q = st->qhead;
    if (!q || !t->ordered) {
        st->qhead = st->qtail = NULL;
        st->qn = 0;
        return q;
    }
    struct queued *last = q, *e = q->next;
    size_t bytes = q->len + 11; /* the tag and at most 10 bytes of length */
    int n = 1;
    for (; e && !st->no_many && bytes + e->len + 11 <= MANY_MAX_BYTES; e = e->next, n++) {
        bytes += e->len + 11;
        last = e;
    }
    last->next = NULL;
    st->qhead = e;
    if (!e)
        st->qtail = NULL;
    st->qn -= n;
    return q;
}

static void flush_queue(mg_transport_grpc *t, struct peer_state *st, struct queued *q);

/* Gives a call's slot back, or, when deliveries queued behind the peer's
 * calls, hands it to the first call that sends them (so they go before any
 * delivery that comes after them, and free(), which waits for the slots,
 * cannot pass them). Ordered, only the lane's call (lane) sends the queue,
 * and the lane is free again once the queue is empty. */
static void slot_release(mg_transport_grpc *t, struct peer_state *st, bool lane)
{
    pthread_mutex_lock(&st->mu);
    struct queued *q = !t->ordered || lane ? queue_take(t, st) : NULL;
    if (!q) {
        st->inflight--;
        if (lane)
            st->lane = false;
    }
    pthread_mutex_unlock(&st->mu);
    if (q) { /* the slot passes to the queue's first call: the queue stays ahead of new calls */
        flush_queue(t, st, q);
        return;
    }
    active_drop(t);
}

/* Records one attempt: r is R_DELIVERED, R_NOT_CONNECTED or a gRPC code. */
struct link_change {
    int change; /* mg_link_record's */
    double err, lat;
    int64_t latency_us;
};

/* record() with st->mu held; the change is logged (link_log) once it is released. */
static struct link_change record_locked(mg_transport_grpc *t, struct peer_state *st, int r,
                                        int64_t latency_us, bool probe)
{
    bool ok = r == R_DELIVERED || r == R_NOT_CONNECTED;
    count_result(st, r);
    if (ok)
        mg_histogram_observe_us(st->latency, latency_us);
    struct link_change c = {
        mg_link_record(&st->link, &t->link_cfg, ok, latency_us, probe, mg_mono_ms()),
        st->link.err_ewma, st->link.lat_ewma_us, latency_us};
    if (c.change)
        mg_metric_set(st->degraded, c.change > 0 ? 1 : 0);
    return c;
}

static void link_log(const struct peer_state *st, struct link_change c)
{
    double err = c.err, lat = c.lat;
    int change = c.change;
    int64_t latency_us = c.latency_us;
    if (change > 0)
        mg_log_warn("peer",
                    "link degraded, routing around it by kafka peer=%s err_ewma=%.2f "
                    "latency_ewma_ms=%.1f",
                    st->id, err, lat / 1000.0);
    else if (change < 0)
        mg_log_info("peer", "link recovered peer=%s latency_ms=%.1f", st->id,
                    (double)latency_us / 1000.0);
}

static void record(mg_transport_grpc *t, struct peer_state *st, int r, int64_t latency_us,
                   bool probe)
{
    pthread_mutex_lock(&st->mu);
    struct link_change c = record_locked(t, st, r, latency_us, probe);
    pthread_mutex_unlock(&st->mu);
    link_log(st, c);
}

/* Answers every delivery of list q FAILED with reason (one %s: the peer). */
static void fail_list(struct peer_state *st, struct queued *q, const char *reason)
{
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    out.status = MG_STATUS_FAILED;
    snprintf(out.reason, sizeof(out.reason), reason, st->id);
    for (struct queued *next; q; q = next) {
        next = q->next;
        q->done(q->arg, &out);
        free(q->req);
        free(q);
    }
}

/* Ordered: the lane's call failed, or a delivery waiting for it expired
 * (see DESIGN). Everything still queued fails now, in order, until the
 * queue is empty; then the call's attempt is recorded (when rec: it may
 * turn the link degraded, which sends the next deliveries by the next step
 * at once) and the lane is freed. So the deliveries behind a failed one take
 * the plan's next step after it, in the order they came, and none that
 * comes later gets there first by the link's turning degraded meanwhile. */
static void lane_drain(mg_transport_grpc *t, struct peer_state *st, const int *rec,
                       int64_t latency_us, bool probe)
{
    for (;;) {
        struct link_change c = {0};
        pthread_mutex_lock(&st->mu);
        struct queued *q = st->qhead;
        st->qhead = st->qtail = NULL;
        st->qn = 0;
        if (!q) {
            if (rec)
                c = record_locked(t, st, *rec, latency_us, probe);
            st->lane = false;
            st->inflight--;
        }
        pthread_mutex_unlock(&st->mu);
        if (!q) {
            link_log(st, c);
            break;
        }
        fail_list(st, q, "peer %s: queued behind a failed call");
    }
    active_drop(t);
}

/* ---- the transport ops -------------------------------------------------- */

static bool tg_available(mg_transport *base, const mg_route_target *target)
{
    mg_transport_grpc *t = (mg_transport_grpc *)base;
    if (!target || !target->gateway_id || !target->gateway_id[0])
        return false;
    mg_peer_set *set = mg_peers_acquire(t->peers);
    bool known = mg_peer_set_find(set, target->gateway_id) != NULL;
    mg_peer_set_release(set);
    struct peer_state *st = NULL;
    if (!known && t->ordered) { /* a peer that left with deliveries on its lane */
        pthread_mutex_lock(&t->mu);
        st = mg_map_get(t->states, target->gateway_id);
        pthread_mutex_unlock(&t->mu);
    }
    if (!known && !st)
        return false;
    if (!st)
        st = state_get(t, target->gateway_id);
    pthread_mutex_lock(&st->mu);
    bool ok;
    if (!known) /* they fail when they come out; this one waits behind them, to fail after them */
        ok = st->lane;
    else
        ok = st->inflight < t->max_inflight &&
             mg_link_admit(&st->link, &t->link_cfg, mg_mono_ms(), NULL);
    pthread_mutex_unlock(&st->mu);
    return ok;
}

/* The peer's gRPC listener as network.peer.*. */
static void tg_trace_attrs(mg_transport *base, const mg_route_target *target, mg_span *span)
{
    mg_transport_grpc *t = (mg_transport_grpc *)base;
    mg_peer_set *set = mg_peers_acquire(t->peers);
    const mg_peer *p =
        target && target->gateway_id ? mg_peer_set_find(set, target->gateway_id) : NULL;
    if (p)
        mg_span_attr_peer(span, p->address);
    mg_peer_set_release(set);
}

/* Milliseconds this call may take: min(deadline, now + peer deadline). */
static int64_t budget_ms(mg_transport_grpc *t, int64_t deadline_ms)
{
    int64_t now = mg_mono_ms();
    int64_t until = now + t->peer_deadline_ms;
    if (deadline_ms > 0 && deadline_ms < until)
        until = deadline_ms;
    return until - now;
}

static int call_start(struct pcall *pc)
{
    int64_t left = budget_ms(pc->t, pc->deadline_ms);
    if (left <= 0)
        return -ETIMEDOUT;
    pc->start_us = mg_mono_us();
    return mg_grpc_unary_start(&pc->u, pc->peer->channel, pc->t->cq, pc->method, pc->req, pc->md,
                               pc->nmd, left, pc);
}

/* Answers every caller of pc (out holds pc->n outcomes) and frees it. */
static void call_answer(struct pcall *pc, const mg_deliver_outcome *out)
{
    if (pc->many) {
        size_t i = 0;
        for (struct queued *q = pc->many, *next; q; q = next, i++) {
            next = q->next;
            q->done(q->arg, &out[i]);
            free(q->req);
            free(q);
        }
    } else if (pc->batch_done) {
        pc->batch_done(pc->arg, out, pc->n);
    } else {
        pc->done(pc->arg, out);
    }
    free(pc);
}

/* The call is over: its slot is released (and what queued behind it goes
 * out), then, when out is not NULL, its callers hear the outcome. */
static void call_end(struct pcall *pc, const mg_deliver_outcome *out)
{
    mg_transport_grpc *t = pc->t;
    struct peer_state *st = pc->st;
    grpc_byte_buffer_destroy(pc->req);
    mg_peer_set_release(pc->set);
    /* The slot is free before the caller hears the outcome (its next call may
     * take it at once); free() still cannot pass this callback: it joins the
     * peer-cq threads, and the callback touches nothing of the transport. */
    slot_release(t, st, pc->lane);
    if (out)
        call_answer(pc, out);
    else
        free(pc);
}

/* One DeliverMessageResponse as an outcome; false when it has no status. */
static bool outcome_of(const Meshgate__V1__DeliverMessageResponse *dr, mg_deliver_outcome *out)
{
    memset(out, 0, sizeof(*out));
    out->status = MG_STATUS_FAILED;
    if (dr && dr->status == MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED) {
        out->status = MG_STATUS_DELIVERED;
        out->connections = dr->connections;
        out->duplicate = dr->duplicate;
        return true;
    }
    if (dr && dr->status == MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED) {
        out->not_connected = true;
        return true;
    }
    return false;
}

/* A DeliverBatch answer: fills outs[0..n); returns R_DELIVERED or a gRPC
 * code for an answer that does not fit the request. */
static int batch_outcomes(grpc_byte_buffer *resp, mg_deliver_outcome *outs, size_t n, char *details,
                          size_t dlen)
{
    Meshgate__V1__DeliverBatchResponse *br = (Meshgate__V1__DeliverBatchResponse *)mg_grpc_unpack(
        &meshgate__v1__deliver_batch_response__descriptor, resp);
    int r = R_DELIVERED;
    if (!br || br->n_results != n) {
        snprintf(details, dlen, "%s",
                 br ? "answer does not match the batch" : "response does not decode");
        r = GRPC_STATUS_INTERNAL;
    } else {
        for (size_t i = 0; i < n; i++)
            if (!outcome_of(br->results[i], &outs[i])) {
                snprintf(details, dlen, "result without a delivery status");
                r = GRPC_STATUS_INTERNAL;
                break;
            }
    }
    if (br)
        protobuf_c_message_free_unpacked(&br->base, NULL);
    return r;
}

/* On a peer-cq thread: the call's batch completed. */
static void call_complete(struct pcall *pc, bool ok)
{
    mg_transport_grpc *t = pc->t;
    const char *id = pc->st->id;
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    out.status = MG_STATUS_FAILED;
    char details[96];
    grpc_byte_buffer *resp = NULL;
    grpc_status_code code = mg_grpc_unary_finish(&pc->u, ok, &resp, details, sizeof(details));
    int64_t took = mg_mono_us() - pc->start_us;
    int r = (int)code;
    mg_deliver_outcome *outs =
        pc->n > 1 || pc->batch_done || pc->many ? mg_xcalloc(pc->n, sizeof(*outs)) : &out;
    if (code == GRPC_STATUS_UNIMPLEMENTED && pc->many) {
        /* An older gateway: it gets its deliveries one call each from now on. */
        pthread_mutex_lock(&pc->st->mu);
        pc->st->no_many = true;
        pthread_mutex_unlock(&pc->st->mu);
        mg_log_info("peer", "peer does not know DeliverMany, delivering one call each peer=%s", id);
        if (resp)
            grpc_byte_buffer_destroy(resp);
        free(outs);
        struct queued *q = pc->many;
        pc->many = NULL;
        struct peer_state *st = pc->st;
        if (t->ordered) { /* back to the queue's head: the lane sends them one by one */
            struct queued *last = q;
            int n = 1;
            for (; last->next; last = last->next)
                n++;
            pthread_mutex_lock(&st->mu);
            last->next = st->qhead;
            st->qhead = q;
            if (!st->qtail)
                st->qtail = last;
            st->qn += n;
            pthread_mutex_unlock(&st->mu);
            q = NULL;
        }
        call_end(pc, NULL);
        for (struct queued *next; q; q = next) {
            next = q->next;
            deliver_one(t, st, q, false);
        }
        return;
    }
    if (code == GRPC_STATUS_OK && (pc->batch_done || pc->many)) {
        r = batch_outcomes(resp, outs, pc->n, details, sizeof(details));
        if (r != R_DELIVERED)
            code = (grpc_status_code)r;
    } else if (code == GRPC_STATUS_OK) {
        Meshgate__V1__DeliverMessageResponse *dr =
            (Meshgate__V1__DeliverMessageResponse *)mg_grpc_unpack(
                &meshgate__v1__deliver_message_response__descriptor, resp);
        if (outcome_of(dr, &out)) {
            r = out.not_connected ? R_NOT_CONNECTED : R_DELIVERED;
        } else {
            code = GRPC_STATUS_INTERNAL;
            r = (int)code;
            snprintf(details, sizeof(details), "%s",
                     dr ? "response without a delivery status" : "response does not decode");
        }
        if (dr)
            protobuf_c_message_free_unpacked(&dr->base, NULL);
    }
    if (resp)
        grpc_byte_buffer_destroy(resp);
    bool probe = pc->probe && pc->attempt == 0;
    bool lane_failed = pc->lane && code != GRPC_STATUS_OK; /* recorded by lane_drain */
    if (!lane_failed)
        record(t, pc->st, r, took, probe);
    if (code != GRPC_STATUS_OK) {
        snprintf(out.reason, sizeof(out.reason), "peer %s: %s: %s", id, mg_grpc_code_name(code),
                 details[0] ? details : "no details");
        /* Idempotent on the receiver: one retry after a fast UNAVAILABLE. */
        int64_t left = budget_ms(t, pc->deadline_ms);
        if (code == GRPC_STATUS_UNAVAILABLE && pc->attempt == 0 && !pc->probe &&
            left >= MIN_RETRY_MS && left >= 2 * took / 1000) {
            pc->attempt++;
            if (call_start(pc) == 0) {
                if (outs != &out)
                    free(outs);
                return;
            }
        }
        for (size_t i = 0; outs != &out && i < pc->n; i++)
            outs[i] = out; /* the call failed: every recipient's attempt did */
    }
    if (lane_failed) {
        struct peer_state *st = pc->st;
        grpc_byte_buffer_destroy(pc->req);
        mg_peer_set_release(pc->set);
        call_answer(pc, outs); /* frees pc */
        lane_drain(t, st, &r, took, probe);
    } else {
        call_end(pc, outs);
    }
    if (outs != &out)
        free(outs);
}

/* Takes a call slot on the target and starts method with req (taken).
 * Answers through pc's callbacks, at once when it cannot start. */
static int call_begin(mg_transport_grpc *t, const mg_route_target *target, struct pcall *pc,
                      grpc_byte_buffer *req, int64_t deadline_ms, const mg_trace_ctx *trace)
{
    const char *id = target && target->gateway_id ? target->gateway_id : "";
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    out.status = MG_STATUS_FAILED;
    pc->t = t;
    pc->req = req;
    pc->deadline_ms = deadline_ms;
    if (t->nauth)
        pc->md[pc->nmd++] = t->auth; /* borrowed: lives as long as the transport */
    if (trace && mg_traceparent_format(trace, pc->tp)) { /* W3C Trace Context over gRPC metadata */
        pc->md[pc->nmd].key = grpc_slice_from_static_string("traceparent");
        pc->md[pc->nmd++].value = grpc_slice_from_static_buffer(pc->tp, MG_TRACEPARENT_LEN);
    }
    if (budget_ms(t, deadline_ms) <= 0) {
        snprintf(out.reason, sizeof(out.reason), "peer %s: DEADLINE_EXCEEDED: no time left", id);
        goto now;
    }
    pc->set = mg_peers_acquire(t->peers);
    pc->peer = mg_peer_set_find(pc->set, id);
    if (!pc->peer) {
        snprintf(out.reason, sizeof(out.reason), "peer %s: unknown peer", id);
        goto now;
    }
    pc->st = state_get(t, id);
    if (pc->held) {
        pthread_mutex_lock(&pc->st->mu);
        pc->probe = pc->st->link.degraded;
        pthread_mutex_unlock(&pc->st->mu);
        pc->held = false; /* the call owns it now: call_end releases it */
    } else if (!slot_take(t, pc->st, &pc->probe)) {
        snprintf(out.reason, sizeof(out.reason), "peer %s: busy", id);
        goto now;
    }
    if (call_start(pc) == 0)
        return 0;
    snprintf(out.reason, sizeof(out.reason), "peer %s: call could not start", id);
    record(t, pc->st, GRPC_STATUS_INTERNAL, 0, pc->probe);
    call_end(pc, &out); /* releases the slot */
    return 0;
now:
    mg_peer_set_release(pc->set);
    grpc_byte_buffer_destroy(req);
    if (pc->held)
        slot_release(t, pc->st, pc->lane); /* the handed-over slot, unused */
    mg_deliver_outcome *outs = pc->n > 1 ? mg_xcalloc(pc->n, sizeof(*outs)) : &out;
    for (size_t k = 0; outs != &out && k < pc->n; k++)
        outs[k] = out; /* one outcome per recipient */
    call_answer(pc, outs);
    if (outs != &out)
        free(outs);
    return 0;
}

static void message_to_pb(const mg_msg *msg, const char *to, Meshgate__V1__Message *pm)
{
    meshgate__v1__message__init(pm);
    pm->id = msg->id;
    pm->from = msg->from ? msg->from : "";
    pm->to = (char *)to;
    pm->content.data = msg->content;
    pm->content.len = msg->content_len;
    pm->content_type = msg->content_type ? msg->content_type : "";
    pm->sent_at_ms = msg->sent_at_ms;
    pm->priority = (Meshgate__V1__Priority)msg->priority;
}

/* A queued delivery that goes alone: one DeliverMessage call. */
static void deliver_one(mg_transport_grpc *t, struct peer_state *st, struct queued *q, bool held)
{
    struct pcall *pc = mg_new(struct pcall);
    pc->method = MG_PEER_RPC_DELIVER;
    pc->n = 1;
    pc->done = q->done;
    pc->arg = q->arg;
    pc->st = st;
    pc->held = held;
    pc->lane = held && t->ordered;
    mg_route_target target = {.gateway_id = st->id};
    call_begin(t, &target, pc, mg_grpc_buffer_from(q->req, q->len), q->deadline_ms, &q->trace);
    free(q->req);
    free(q);
}

/* A protobuf varint of v at p; returns its length. */
static size_t put_varint(uint8_t *p, size_t v)
{
    size_t n = 0;
    for (; v >= 0x80; v >>= 7)
        p[n++] = (uint8_t)(v | 0x80);
    p[n++] = (uint8_t)v;
    return n;
}

/* Sends the deliveries that queued behind a peer's calls: DeliverMany calls
 * of up to MANY_MAX_BYTES each (a DeliverManyRequest is the packed requests,
 * each as field 1), one that is alone as a DeliverMessage; one whose
 * deadline passed while it waited fails now. */
static void flush_queue(mg_transport_grpc *t, struct peer_state *st, struct queued *q)
{
    int64_t now = mg_mono_ms();
    bool held = true; /* the slot slot_release handed over, for the first call */
    pthread_mutex_lock(&st->mu);
    bool one_each = st->no_many; /* queued while the peer said UNIMPLEMENTED */
    pthread_mutex_unlock(&st->mu);
    bool expired = false;
    for (struct queued *e = q; t->ordered && e; e = e->next)
        expired = expired || (e->deadline_ms > 0 && e->deadline_ms <= now);
    if (expired) { /* the lane is late: all of it takes the next step, in order */
        fail_list(st, q, "peer %s: DEADLINE_EXCEEDED: expired while queued");
        lane_drain(t, st, NULL, 0, false);
        return;
    }
    for (struct queued *next; one_each && q; q = next, held = false) {
        next = q->next;
        deliver_one(t, st, q, held);
    }
    while (q) {
        struct queued *head = NULL, **tail = &head;
        size_t n = 0, bytes = 0;
        int64_t deadline = 0;
        while (q && (n == 0 || bytes + q->len + 11 <= MANY_MAX_BYTES)) {
            struct queued *e = q;
            q = q->next;
            e->next = NULL;
            if (e->deadline_ms > 0 && e->deadline_ms <= now) {
                mg_deliver_outcome out;
                memset(&out, 0, sizeof(out));
                out.status = MG_STATUS_FAILED;
                snprintf(out.reason, sizeof(out.reason),
                         "peer %s: DEADLINE_EXCEEDED: expired while queued", st->id);
                e->done(e->arg, &out);
                free(e->req);
                free(e);
                continue;
            }
            *tail = e;
            tail = &e->next;
            n++;
            bytes += e->len + 11; /* the tag and at most 10 bytes of length */
            if (e->deadline_ms > 0 && (deadline == 0 || e->deadline_ms < deadline))
                deadline = e->deadline_ms;
        }
        if (n == 1)
            deliver_one(t, st, head, held);
        if (n == 1)
            held = false;
        if (n <= 1)
            continue;
        uint8_t *buf = mg_xmalloc(bytes);
        size_t off = 0;
        for (struct queued *e = head; e; e = e->next) {
            buf[off++] = 0x0a; /* field 1 (deliveries), length-delimited */
            off += put_varint(buf + off, e->len);
            memcpy(buf + off, e->req, e->len);
            off += e->len;
        }
        struct pcall *pc = mg_new(struct pcall);
        pc->method = MG_PEER_RPC_DELIVER_MANY;
        pc->n = n;
        pc->many = head;
        pc->st = st;
        pc->held = held;
        pc->lane = held && t->ordered;
        held = false;
        mg_route_target target = {.gateway_id = st->id};
        /* each message carries its own context (Message.traceparent): none on the call */
        call_begin(t, &target, pc, mg_grpc_buffer_from(buf, off), deadline, NULL);
        free(buf);
    }
    if (held)
        slot_release(t, st, t->ordered); /* every delivery had expired: no call took the slot */
}

/* How tg_deliver sends a delivery (see DESIGN). */
enum how { H_CALL, H_LANE, H_PROBE, H_QUEUED, H_BUSY };

/* Decides how a delivery to peer id goes: a call of its own (H_CALL; call_begin takes
 * the slot); ordered, a call on the peer's lane, slot taken (H_LANE, *stp set); queued
 * behind the peer's calls in flight, to go in the DeliverMany the next one to end sends
 * (H_QUEUED; unordered: when there are coalesce_calls of them already; ordered: while
 * the lane is taken); H_BUSY: ordered, max_inflight deliveries wait already. */
static enum how route_delivery(mg_transport_grpc *t, const char *id,
                               Meshgate__V1__DeliverMessageRequest *rq, const mg_trace_ctx *trace,
                               int64_t deadline_ms, mg_deliver_done done, void *arg,
                               struct peer_state **stp)
{
    if (t->coalesce_calls <= 0 || !*id)
        return H_CALL;
    struct peer_state *st;
    if (t->ordered) {
        st = state_get(t, id);
    } else {
        pthread_mutex_lock(&t->mu);
        st = mg_map_get(t->states, id); /* none yet: nothing in flight */
        pthread_mutex_unlock(&t->mu);
        if (!st)
            return H_CALL;
    }
    bool active = t->ordered && active_take(t); /* for the lane's call, if it takes it */
    enum how how = H_CALL;
    pthread_mutex_lock(&st->mu);
    if (!t->ordered) {
        if (!st->no_many && st->inflight >= t->coalesce_calls && st->qn < t->max_inflight)
            how = H_QUEUED;
    } else if (!active) {
        how = H_CALL;       /* closing: call_begin refuses it */
    } else if (!st->lane) { /* a free lane has an empty queue: slot_release keeps it so */
        how = st->inflight < t->max_inflight ? H_LANE : H_BUSY;
        if (how == H_LANE && st->link.degraded)
            how = H_PROBE; /* it may fail after later deliveries went by the next step */
        if (how != H_BUSY) {
            st->lane = true;
            st->inflight++;
        }
    } else {
        how = st->qn < t->max_inflight ? H_QUEUED : H_BUSY;
    }
    if (how == H_BUSY)
        count_result(st, R_BUSY);
    if (how == H_QUEUED) {
        struct queued *e = mg_new(struct queued);
        char tp[MG_TRACEPARENT_LEN + 1];
        if (trace && mg_traceparent_format(trace, tp))
            rq->message->traceparent = tp; /* one call carries many traces: each in its message */
        e->trace = trace ? *trace : (mg_trace_ctx){0};
        e->len = meshgate__v1__deliver_message_request__get_packed_size(rq);
        e->req = mg_xmalloc(e->len ? e->len : 1);
        meshgate__v1__deliver_message_request__pack(rq, e->req);
        rq->message->traceparent = NULL;
        /* The peer deadline runs from now, queued or not: past it the message takes the next
         * step (a stuck peer's queue fails when its calls do, not a peer deadline later). */
        int64_t peer_by = mg_mono_ms() + t->peer_deadline_ms;
        e->deadline_ms = deadline_ms > 0 && deadline_ms < peer_by ? deadline_ms : peer_by;
        e->done = done;
        e->arg = arg;
        if (st->qtail)
            st->qtail->next = e;
        else
            st->qhead = e;
        st->qtail = e;
        st->qn++;
    }
    pthread_mutex_unlock(&st->mu);
    if (active && how != H_LANE && how != H_PROBE)
        active_drop(t);
    *stp = st;
    return how;
}

static int tg_deliver(mg_transport *base, const mg_route_target *target, const mg_msg *msg,
                      int64_t deadline_ms, mg_deliver_done done, void *arg)
{
    mg_transport_grpc *t = (mg_transport_grpc *)base;
    Meshgate__V1__Message pm;
    message_to_pb(msg, msg->to, &pm);
    Meshgate__V1__DeliverMessageRequest rq = MESHGATE__V1__DELIVER_MESSAGE_REQUEST__INIT;
    rq.message = &pm;
    rq.origin_gateway = t->gateway_id;
    rq.origin_region = t->region;
    rq.inbox = msg->inbox;
    /* Another region's gateway is a hot pair's (or a fallback's) target: the
     * pair's next message may go by Kafka when it cools, past this one.
     * Read before the delivery is queued: once it is, the lane's call may
     * answer it on another thread, and target lives in the caller's attempt. */
    bool far = target && target->region && target->region[0] && strcmp(target->region, t->region);
    struct peer_state *st = NULL;
    enum how how = route_delivery(t, target && target->gateway_id ? target->gateway_id : "", &rq,
                                  &msg->trace, deadline_ms, done, arg, &st);
    if (how == H_QUEUED)
        return far ? MG_DELIVER_UNORDERED : 0;
    if (how == H_BUSY)
        return -EBUSY; /* the plan's next step, at once */
    struct pcall *pc = mg_new(struct pcall);
    pc->method = MG_PEER_RPC_DELIVER;
    pc->n = 1;
    pc->done = done;
    pc->arg = arg;
    if (how == H_LANE || how == H_PROBE) {
        pc->st = st;
        pc->held = pc->lane = true;
    }
    int rc = call_begin(t, target, pc, mg_grpc_pack(&rq.base), deadline_ms, &msg->trace);
    return rc == 0 && (how == H_PROBE || (far && how == H_LANE)) ? MG_DELIVER_UNORDERED : rc;
}

static int tg_deliver_batch(mg_transport *base, const mg_route_target *target, const mg_msg *msg,
                            const char *const *to, size_t n, int64_t deadline_ms,
                            void (*done)(void *arg, const mg_deliver_outcome *out, size_t n),
                            void *arg)
{
    mg_transport_grpc *t = (mg_transport_grpc *)base;
    if (n == 0)
        return -EINVAL;
    Meshgate__V1__Message pm;
    message_to_pb(msg, "", &pm);
    Meshgate__V1__DeliverBatchRequest rq = MESHGATE__V1__DELIVER_BATCH_REQUEST__INIT;
    rq.message = &pm;
    rq.n_to = n;
    rq.to = (char **)to;
    rq.origin_gateway = t->gateway_id;
    rq.origin_region = t->region;
    struct pcall *pc = mg_new(struct pcall);
    pc->method = MG_PEER_RPC_DELIVER_BATCH;
    pc->n = n;
    pc->batch_done = done;
    pc->arg = arg;
    return call_begin(t, target, pc, mg_grpc_pack(&rq.base), deadline_ms, &msg->trace);
}

static int tg_disconnect(mg_transport *base, const mg_route_target *target, const char *user,
                         const char *conn_id, int code, const char *reason, int64_t deadline_ms)
{
    mg_transport_grpc *t = (mg_transport_grpc *)base;
    const char *id = target && target->gateway_id ? target->gateway_id : "";
    int64_t left = budget_ms(t, deadline_ms);
    if (left <= 0)
        return -ETIMEDOUT;
    mg_peer_set *set = mg_peers_acquire(t->peers);
    const mg_peer *peer = mg_peer_set_find(set, id);
    if (!peer) {
        mg_peer_set_release(set);
        return -EHOSTUNREACH;
    }
    struct peer_state *st = state_get(t, id);
    bool probe;
    if (!slot_take(t, st, &probe)) {
        mg_peer_set_release(set);
        return -EBUSY;
    }
    Meshgate__V1__DisconnectRequest rq = MESHGATE__V1__DISCONNECT_REQUEST__INIT;
    rq.user = (char *)user;
    rq.conn_id = (char *)(conn_id ? conn_id : "");
    rq.code = code > 0 ? (uint32_t)code : 0;
    rq.reason = (char *)(reason ? reason : "");
    grpc_byte_buffer *req = mg_grpc_pack(&rq.base);
    grpc_byte_buffer *resp = NULL;
    char details[96];
    int64_t start = mg_mono_us();
    grpc_status_code st_code =
        mg_grpc_unary_call(peer->channel, MG_PEER_RPC_DISCONNECT, req, &t->auth, t->nauth, left,
                           &resp, details, sizeof(details));
    int64_t took = mg_mono_us() - start;
    int rc;
    if (st_code == GRPC_STATUS_OK) {
        Meshgate__V1__DisconnectResponse *dr = (Meshgate__V1__DisconnectResponse *)mg_grpc_unpack(
            &meshgate__v1__disconnect_response__descriptor, resp);
        if (dr) {
            rc = (int)dr->disconnected;
            protobuf_c_message_free_unpacked(&dr->base, NULL);
            record(t, st, R_NOT_CONNECTED, took, false); /* answered: counts as ok */
        } else {
            rc = -EBADMSG;
            record(t, st, GRPC_STATUS_INTERNAL, took, false);
        }
    } else {
        rc = st_code == GRPC_STATUS_DEADLINE_EXCEEDED ? -ETIMEDOUT
             : st_code == GRPC_STATUS_UNAVAILABLE     ? -ECONNREFUSED
                                                      : -EIO;
        record(t, st, (int)st_code, took, false);
        mg_log_warn("peer", "DisconnectLocal failed peer=%s user=%s code=%s details=%s", id, user,
                    mg_grpc_code_name(st_code), details);
    }
    if (resp)
        grpc_byte_buffer_destroy(resp);
    grpc_byte_buffer_destroy(req);
    slot_release(t, st, false);
    mg_peer_set_release(set);
    return rc;
}

static void tg_free(mg_transport *base)
{
    mg_transport_grpc *t = (mg_transport_grpc *)base;
    pthread_mutex_lock(&t->mu);
    t->closing = true;
    while (t->active > 0) /* bounded: every call ends by its deadline */
        pthread_cond_wait(&t->idle, &t->mu);
    pthread_mutex_unlock(&t->mu);
    grpc_completion_queue_shutdown(t->cq);
    for (int i = 0; i < t->nthreads; i++)
        pthread_join(t->threads[i], NULL);
    grpc_completion_queue_destroy(t->cq);
    free(t->threads);
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(t->states, &it, &k, &v);) {
        struct peer_state *st = v;
        pthread_mutex_destroy(&st->mu);
        free(st->id);
        free(st);
    }
    mg_map_free(t->states);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->idle);
    free(t->gateway_id);
    free(t->region);
    if (t->nauth)
        grpc_slice_unref(t->auth.value);
    free(t);
    grpc_shutdown();
}

static const struct mg_transport_ops grpc_ops = {
    .name = "grpc",
    .path = MG_PATH_GRPC,
    .available = tg_available,
    .deliver = tg_deliver,
    .disconnect = tg_disconnect,
    .free = tg_free,
    .deliver_batch = tg_deliver_batch,
    .trace_attrs = tg_trace_attrs,
};

mg_transport *mg_transport_grpc_create(mg_peers *peers, const mg_transport_grpc_config *cfg)
{
    grpc_init();
    mg_transport_grpc *t = mg_new(mg_transport_grpc);
    t->ops = grpc_ops;
    t->base.ops = &t->ops;
    t->peers = peers;
    t->gateway_id = mg_xstrdup(cfg->gateway_id ? cfg->gateway_id : "");
    t->region = mg_xstrdup(cfg->region ? cfg->region : "");
    t->peer_deadline_ms = cfg->peer_deadline_ms > 0 ? cfg->peer_deadline_ms : 500;
    t->max_inflight = cfg->peer_max_inflight > 0 ? cfg->peer_max_inflight : 1024;
    t->coalesce_calls = cfg->coalesce_calls > 0 ? cfg->coalesce_calls : 0;
    t->ordered = t->coalesce_calls == 1;
    t->ops.orders_on_return = t->ordered;
    t->link_cfg = cfg->link;
    mg_link_config_defaults(&t->link_cfg);
    t->nauth = mg_grpc_bearer_metadata(&t->auth, cfg->peer_token);
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->idle, NULL);
    t->states = mg_map_create(16);
    t->cq = grpc_completion_queue_create_for_next(NULL);
    t->nthreads = cfg->cq_threads > 0 ? cfg->cq_threads : 1;
    t->threads = mg_xcalloc((size_t)t->nthreads, sizeof(*t->threads));
    for (int i = 0; i < t->nthreads; i++)
        if (pthread_create(&t->threads[i], NULL, cq_main, t) != 0)
            abort(); /* as allocation failure: no threads, no process */
    mg_log_info("peer",
                "grpc peer transport ready deadline_ms=%d max_inflight=%d coalesce_calls=%d "
                "cq_threads=%d",
                t->peer_deadline_ms, t->max_inflight, t->coalesce_calls, t->nthreads);
    return &t->base;
}
