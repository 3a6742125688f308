/* grpc_stream.c: the Messaging/SendStream call, many sends on one gRPC call.
 *
 * DESIGN
 * A service that sends a lot pays gRPC core's per-call cost (an HTTP/2
 * stream, metadata, several completion-queue events and thread wake-ups)
 * once per stream instead of once per message; results travel back
 * coalesced: every result known while a response is on the wire goes out in
 * the next one.
 *
 * A stream is a set of operations on the call, each with its own tag (state
 * RPC_STREAM_OP, dispatched by grpc_server.c): at most one RECV_MESSAGE and
 * one SEND_MESSAGE outstanding, the RECV_CLOSE_ON_SERVER started with the
 * initial metadata (it completes when the call ends, and says whether it was
 * cancelled), and the final status. Nothing waits: a received message starts
 * its router operation and the next receive; a routing result queues the
 * result and starts a send when none is outstanding; a send's completion
 * starts the next.
 *
 * Order: messages to one recipient are started one after another in stream
 * order (a chain per recipient with a message whose order is not yet
 * fixed): the next starts once the router says the one before reached a
 * path that fixes its order (mg_router_send_msg_handed: queued to the local
 * connections, produced to Kafka, published to NATS or queued for SPUBLISH),
 * or else once it answered (gRPC direct, a fallback, the inbox); different
 * recipients in parallel. The window bounds a stream: when
 * MG_STREAM_WINDOW messages are being routed, waiting for their turn or
 * waiting for their result to be sent, no receive is started, so HTTP/2
 * flow control holds the client back. The router's --max-inflight-sends
 * bounds all streams together: a message refused by it gets a FAILED result
 * ("overloaded") and the stream goes on.
 *
 * Tracing: a `traceparent` in the call's metadata is every message's
 * parent (the stream is one trace); without one each message starts its
 * own by --trace-sample-ratio, its "route" span the root.
 *
 * Lifetime: a reference per outstanding gRPC operation and per HIGH message
 * in the window; the last one frees the stream and its call. LOW messages
 * are answered ACCEPTED at once and routed on without the stream.
 * The stream ends with OK once the client half-closed and every result was
 * sent; a cancelled call (the client went away, its deadline, the server's
 * shutdown after its grace) drops the results not yet sent.
 */
#include "common/mg_alloc.h"
#include "common/mg_grpc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_pbarena.h"
#include "common/mg_time.h"
#include "gateway/grpc_call.h"

#include "meshgate/v1/messaging.pb-c.h"

#include <grpc/grpc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MG_STREAM_WINDOW 1024

enum op_kind { OP_RECV, OP_SEND, OP_CLOSE, OP_STATUS };

struct stream;

/* A completion-queue tag of the stream: starts with its state (grpc_call.h). */
struct stream_op {
    enum rpc_state state; /* RPC_STREAM_OP */
    enum op_kind kind;
    struct stream *st;
};

/* A message waiting for its turn (its recipient has one in flight). */
struct waiting {
    struct waiting *next;
    mg_msg *msg;
};

/* A recipient with a message whose order is not yet fixed: the ones queued
 * behind it. */
struct chain {
    struct waiting *head, *tail;
};

/* A result waiting to be sent. */
struct result {
    struct result *next;
    char *id, *to; /* in buf */
    mg_send_result res;
    char buf[];
};

/* One HIGH message being routed. */
struct routed {
    struct stream *st;
    char *id, *to; /* in buf */
    char buf[];
};

/* A block of size bytes whose tail (from offset) holds the strings id and
 * to (NULL: ""), pointed at by *pid and *pto: one allocation per routed
 * message and per result. */
static void *with_strings(size_t size, const char *id, const char *to, char **pid, char **pto)
{
    id = id ? id : "";
    to = to ? to : "";
    size_t il = strlen(id) + 1, tl = strlen(to) + 1;
    char *b = mg_xmalloc(size + il + tl);
    memset(b, 0, size);
    *pid = memcpy(b + size, id, il);
    *pto = memcpy(b + size + il, to, tl);
    return b;
}

struct stream {
    struct rpc *c;
    mg_grpc_server *s;
    int64_t call_deadline_ms; /* monotonic; each message also gets at most max_deadline_ms */
    mg_trace_ctx trace;       /* the call's traceparent: every message's parent; zero: none */

    pthread_mutex_t mu; /* guards everything below */
    int refs;
    size_t held; /* HIGH messages routed or waiting, plus results not yet sent */
    bool recv_out, send_out, half_closed, dead, status_started, pumping;
    mg_map *chains;                          /* recipient -> struct chain */
    struct waiting *ready_head, *ready_tail; /* messages whose turn came, to start */
    struct result *res_head, *res_tail;
    size_t nres;
    void *scratch; /* a response's protobuf structs, kept for the next (under mu) */
    size_t scratch_cap;

    grpc_byte_buffer *recv_buf, *send_buf;
    int cancelled;
    struct stream_op op_recv, op_send, op_close, op_status;
};

/* ---- references and the call's end ----------------------------------------------- */

static void stream_free(struct stream *st)
{
    struct rpc *c = st->c;
    c->code = st->cancelled || st->dead ? GRPC_STATUS_CANCELLED : GRPC_STATUS_OK;
    for (struct result *r = st->res_head, *n; r; r = n) {
        n = r->next;
        free(r);
    }
    mg_map_free(st->chains); /* empty: every chain ended with its last message */
    free(st->scratch);
    if (st->recv_buf)
        grpc_byte_buffer_destroy(st->recv_buf);
    pthread_mutex_destroy(&st->mu);
    free(st);
    mg_grpc_rpc_done(c);
}

static void unref(struct stream *st)
{
    pthread_mutex_lock(&st->mu);
    bool last = --st->refs == 0;
    pthread_mutex_unlock(&st->mu);
    if (last)
        stream_free(st);
}

static bool start_batch(struct stream *st, const grpc_op *ops, size_t n, struct stream_op *tag)
{
    if (grpc_call_start_batch(st->c->call, ops, n, tag, NULL) != GRPC_CALL_OK) {
        mg_log_error("grpc", "SendStream: cannot start a batch (op %d)", (int)tag->kind);
        st->dead = true;
        return false;
    }
    st->refs++;
    return true;
}

/* The next receive, when the stream has room and the client may send. Under mu. */
static void maybe_recv(struct stream *st)
{
    if (st->recv_out || st->half_closed || st->dead || st->held >= MG_STREAM_WINDOW)
        return;
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &st->recv_buf;
    st->recv_out = start_batch(st, &op, 1, &st->op_recv);
}

/* Sends every queued result in one response when no send is outstanding; the
 * final status once the client half-closed and nothing is left. Under mu. */
static void maybe_send(struct stream *st)
{
    if (st->send_out || st->dead)
        return;
    if (st->nres > 0) {
        Meshgate__V1__SendStreamResponse out = MESHGATE__V1__SEND_STREAM_RESPONSE__INIT;
        size_t n = st->nres;
        /* one block, grown as needed and kept: a response of many results
         * was four large callocs, each a consolidation of malloc's bins */
        size_t need =
            n * (sizeof(Meshgate__V1__SendMessageResponse) + sizeof(Meshgate__V1__RecipientResult) +
                 sizeof(Meshgate__V1__SendMessageResponse *) +
                 MG_PATH_COUNT * sizeof(Meshgate__V1__Path));
        if (need > st->scratch_cap) {
            free(st->scratch);
            st->scratch_cap = need * 2;
            st->scratch = mg_xmalloc(st->scratch_cap);
        }
        Meshgate__V1__SendMessageResponse *rs = st->scratch;
        Meshgate__V1__RecipientResult *rr = (Meshgate__V1__RecipientResult *)(rs + n);
        Meshgate__V1__SendMessageResponse **rp = (Meshgate__V1__SendMessageResponse **)(rr + n);
        Meshgate__V1__Path *paths = (Meshgate__V1__Path *)(rp + n);
        memset(paths, 0, n * MG_PATH_COUNT * sizeof(*paths));
        size_t i = 0;
        for (struct result *r = st->res_head; r; r = r->next, i++) {
            meshgate__v1__send_message_response__init(&rs[i]);
            mg_grpc_result_to_pb(r->to, &r->res, &rr[i], &paths[i * MG_PATH_COUNT]);
            rs[i].id = r->id;
            rs[i].result = &rr[i];
            rp[i] = &rs[i];
        }
        out.n_results = n;
        out.results = rp;
        st->send_buf = mg_grpc_pack(&out.base);
        for (struct result *r = st->res_head, *next; r; r = next) {
            next = r->next;
            free(r);
        }
        st->res_head = st->res_tail = NULL;
        st->nres = 0;
        st->held -= n;
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_SEND_MESSAGE;
        op.data.send_message.send_message = st->send_buf;
        st->send_out = start_batch(st, &op, 1, &st->op_send);
        if (!st->send_out) {
            grpc_byte_buffer_destroy(st->send_buf);
            st->send_buf = NULL;
        }
        maybe_recv(st); /* the results sent made room */
        return;
    }
    if (st->half_closed && st->held == 0 && !st->recv_out && !st->status_started) {
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        op.data.send_status_from_server.status = GRPC_STATUS_OK;
        st->status_started = start_batch(st, &op, 1, &st->op_status);
    }
}

/* Queues a result (takes nothing: copies id and to). Under mu. */
static void push_result(struct stream *st, const char *id, const char *to,
                        const mg_send_result *res)
{
    if (st->dead)
        return;
    char *rid, *rto;
    struct result *r = with_strings(sizeof(*r), id, to, &rid, &rto);
    r->id = rid;
    r->to = rto;
    r->res = *res;
    if (st->res_tail)
        st->res_tail->next = r;
    else
        st->res_head = r;
    st->res_tail = r;
    st->nres++;
    st->held++;
}

/* ---- routing ------------------------------------------------------------------------ */

static void pump(struct stream *st);

/* A HIGH message's order is fixed (before its result): start the
 * recipient's next message. */
static void routed_handed(void *arg)
{
    struct routed *x = arg;
    struct stream *st = x->st;
    pthread_mutex_lock(&st->mu);
    struct chain *ch = mg_map_get(st->chains, x->to);
    struct waiting *next = ch ? ch->head : NULL;
    if (next) {
        ch->head = next->next;
        if (!ch->head)
            ch->tail = NULL;
        next->next = NULL;
        if (st->ready_tail)
            st->ready_tail->next = next;
        else
            st->ready_head = next;
        st->ready_tail = next;
    } else if (ch) {
        mg_map_del(st->chains, x->to);
        free(ch);
    }
    pthread_mutex_unlock(&st->mu);
    if (next)
        pump(st);
}

/* A HIGH message's result (after routed_handed): queue it. */
static void routed_done(void *arg, const mg_send_result *res)
{
    struct routed *x = arg;
    struct stream *st = x->st;
    pthread_mutex_lock(&st->mu);
    st->held--; /* the message leaves the window, its result (if kept) enters it */
    push_result(st, x->id, x->to, res);
    maybe_send(st);
    pthread_mutex_unlock(&st->mu);
    free(x);
    unref(st);
}

/* Starts the messages whose turn came, one thread at a time (a message
 * handed inside mg_router_send_msg_handed queues its successor here instead
 * of recursing). */
static void pump(struct stream *st)
{
    pthread_mutex_lock(&st->mu);
    if (st->pumping) {
        pthread_mutex_unlock(&st->mu);
        return;
    }
    st->pumping = true;
    for (;;) {
        struct waiting *w = st->ready_head;
        if (!w)
            break;
        st->ready_head = w->next;
        if (!st->ready_head)
            st->ready_tail = NULL;
        pthread_mutex_unlock(&st->mu);

        mg_msg *msg = w->msg;
        free(w);
        char *xid, *xto;
        struct routed *x = with_strings(sizeof(*x), msg->id, msg->to, &xid, &xto);
        x->st = st;
        x->id = xid;
        x->to = xto;
        int64_t deadline = mg_mono_ms() + st->s->max_deadline_ms;
        if (deadline > st->call_deadline_ms)
            deadline = st->call_deadline_ms;
        if (mg_router_send_msg_handed(st->s->router, msg, deadline, routed_done, routed_handed, x) <
            0) {
            routed_handed(x);
            mg_send_result res;
            memset(&res, 0, sizeof(res));
            res.status = MG_STATUS_FAILED;
            snprintf(res.reason, sizeof(res.reason),
                     "gateway overloaded: too many sends in flight");
            routed_done(x, &res);
        }
        pthread_mutex_lock(&st->mu);
    }
    st->pumping = false;
    pthread_mutex_unlock(&st->mu);
}

static void low_done(void *arg, const mg_send_result *res)
{
    (void)arg;
    if (res->status == MG_STATUS_FAILED)
        mg_log_warn("grpc", "SendStream: low priority send failed reason=%s", res->reason);
}

/* One request of the stream: a result at once (rejected, LOW accepted or
 * overloaded) or a HIGH message into its recipient's chain. */
static void take_request(struct stream *st, const uint8_t *data, size_t len)
{
    mg_grpc_server *s = st->s;
    mg_send_result res;
    memset(&res, 0, sizeof(res));
    mg_pb_arena ar; /* decoded on the stack: the message copies what it keeps */
    ProtobufCAllocator *pa = mg_pb_arena_init(&ar);
    Meshgate__V1__SendMessageRequest *rq =
        meshgate__v1__send_message_request__unpack(pa, len, data ? data : (const uint8_t *)"");
    char err[sizeof(res.reason)] = "";
    mg_msg *msg = NULL;
    if (!rq)
        snprintf(err, sizeof(err), "request does not decode as meshgate.v1.SendMessageRequest");
    else
        msg = mg_grpc_msg_from_pb(&s->lim, rq->message, true, err, sizeof(err));
    if (msg) { /* the call's trace, else each message sampled on its own */
        msg->trace = st->trace;
        mg_trace_begin(&msg->trace);
    }
    if (!msg) {
        res.status = MG_STATUS_REJECTED;
        memcpy(res.reason, err, sizeof(res.reason));
        const Meshgate__V1__Message *m = rq ? rq->message : NULL;
        pthread_mutex_lock(&st->mu);
        push_result(st, m && m->id && strlen(m->id) <= 128 ? m->id : "",
                    m && m->to && strlen(m->to) <= s->lim.max_user_bytes ? m->to : "", &res);
        pthread_mutex_unlock(&st->mu);
    } else if (msg->priority == MG_PRIO_LOW) {
        if (mg_router_send(s->router, msg, mg_mono_ms() + s->low_deadline_ms, low_done, NULL) < 0) {
            res.status = MG_STATUS_FAILED;
            snprintf(res.reason, sizeof(res.reason),
                     "gateway overloaded: too many sends in flight (LOW priority message dropped)");
            mg_metric_add(s->dropped_overload, 1);
        } else {
            res.status = MG_STATUS_ACCEPTED;
        }
        pthread_mutex_lock(&st->mu);
        push_result(st, msg->id, msg->to, &res);
        pthread_mutex_unlock(&st->mu);
        mg_msg_free(msg);
    } else {
        struct waiting *w = mg_new(struct waiting);
        w->msg = msg;
        pthread_mutex_lock(&st->mu);
        st->held++;
        st->refs++;
        struct chain *ch = mg_map_get(st->chains, msg->to);
        if (ch) { /* the recipient has one in flight: wait behind it */
            if (ch->tail)
                ch->tail->next = w;
            else
                ch->head = w;
            ch->tail = w;
        } else {
            mg_map_put(st->chains, msg->to, mg_new(struct chain));
            if (st->ready_tail)
                st->ready_tail->next = w;
            else
                st->ready_head = w;
            st->ready_tail = w;
        }
        pthread_mutex_unlock(&st->mu);
    }
    if (rq)
        protobuf_c_message_free_unpacked(&rq->base, pa);
}

/* ---- completions ------------------------------------------------------------------- */

static void on_recv(struct stream *st, bool ok)
{
    grpc_byte_buffer *buf = st->recv_buf; /* only this op writes it, and it is done */
    st->recv_buf = NULL;
    if (ok && buf) {
        size_t len;
        uint8_t *data = mg_grpc_buffer_read(buf, &len);
        take_request(st, data, len);
        free(data);
        pump(st);
    }
    if (buf)
        grpc_byte_buffer_destroy(buf);
    pthread_mutex_lock(&st->mu);
    st->recv_out = false;
    if (!ok)
        st->dead = true; /* the call is over (cancelled or broken) */
    else if (!buf)
        st->half_closed = true;
    maybe_recv(st);
    maybe_send(st);
    pthread_mutex_unlock(&st->mu);
}

static void on_send(struct stream *st, bool ok)
{
    pthread_mutex_lock(&st->mu);
    grpc_byte_buffer_destroy(st->send_buf);
    st->send_buf = NULL;
    st->send_out = false;
    if (!ok)
        st->dead = true;
    maybe_send(st);
    pthread_mutex_unlock(&st->mu);
}

void mg_grpc_stream_event(void *tag, bool ok)
{
    struct stream_op *op = tag;
    struct stream *st = op->st;
    switch (op->kind) {
    case OP_RECV:
        on_recv(st, ok);
        break;
    case OP_SEND:
        on_send(st, ok);
        break;
    case OP_CLOSE: /* the call is over: results not yet sent have nobody to go to */
        pthread_mutex_lock(&st->mu);
        if (st->cancelled)
            st->dead = true;
        pthread_mutex_unlock(&st->mu);
        break;
    case OP_STATUS:
        break;
    }
    unref(st);
}

void mg_grpc_stream_begin(struct rpc *c)
{
    mg_grpc_server *s = c->t->s;
    char err[256] = "";
    grpc_status_code code =
        mg_grpc_auth_check(s->auth, c->call, c->details.method, &c->md, err, sizeof(err));
    int64_t left = mg_grpc_deadline_left_ms(c->details.deadline);
    if (code == GRPC_STATUS_OK && left <= 0) {
        code = GRPC_STATUS_DEADLINE_EXCEEDED;
        snprintf(err, sizeof(err), "deadline expired before the call was handled");
    }
    if (code != GRPC_STATUS_OK) {
        mg_grpc_answer(c, code, err);
        return;
    }
    struct stream *st = mg_new(struct stream);
    st->c = c;
    st->s = s;
    st->call_deadline_ms = mg_mono_ms() + left;
    mg_grpc_trace_metadata(&c->md, &st->trace);
    pthread_mutex_init(&st->mu, NULL);
    st->chains = mg_map_create(16);
    struct stream_op *ops[] = {&st->op_recv, &st->op_send, &st->op_close, &st->op_status};
    enum op_kind kinds[] = {OP_RECV, OP_SEND, OP_CLOSE, OP_STATUS};
    for (int i = 0; i < 4; i++)
        *ops[i] = (struct stream_op){.state = RPC_STREAM_OP, .kind = kinds[i], .st = st};

    pthread_mutex_lock(&st->mu);
    st->refs = 1; /* ours, until the first operations are started */
    grpc_op first[2];
    memset(first, 0, sizeof(first));
    first[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    first[1].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    first[1].data.recv_close_on_server.cancelled = &st->cancelled;
    if (start_batch(st, first, 2, &st->op_close))
        maybe_recv(st);
    pthread_mutex_unlock(&st->mu);
    unref(st);
}
