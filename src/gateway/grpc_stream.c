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
 * Threads: a stream's completions come on the grpc-<i> threads, its results
 * on whichever thread completed the operation (a WebSocket loop for a local
 * delivery). A result is pushed on a lock-free list and whoever takes the
 * send token (send_out: an atomic flag, held from a send's start to its
 * completion) sends every result pushed so far; the mutex guards only the
 * receive side (chains, ready list, receive and status flags), so a loop
 * completing a delivery never waits for the thread that receives.
 * Allocation: one block per message (its chain link, the routing context,
 * then its result), a chain table sized for the window, a response's
 * structs and its bytes kept for the next; a request is decoded from the
 * received slice.
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
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define MG_STREAM_WINDOW 1024
/* The chain table: a chain per recipient with a message in the window, so
 * at most MG_STREAM_WINDOW; four times that keeps probes short. */
#define MG_STREAM_SLOTS 4096

enum op_kind { OP_RECV, OP_SEND, OP_CLOSE, OP_STATUS };

struct stream;

/* A completion-queue tag of the stream: starts with its state (grpc_call.h). */
struct stream_op {
    enum rpc_state state; /* RPC_STREAM_OP */
    enum op_kind kind;
    struct stream *st;
};

/* One message of the stream, one block from its receipt to its result's
 * send: waiting in its recipient's chain, then routed, then a result. */
struct item {
    struct item *next;                  /* chain, ready list, then the result list */
    struct item *wait_head, *wait_tail; /* as its recipient's chain: the ones behind it */
    struct stream *st;
    mg_msg *msg;   /* until handed to the router */
    uint64_t hash; /* of to */
    char *id, *to; /* in buf */
    mg_send_result res;
    char buf[];
};

struct stream {
    struct rpc *c;
    mg_grpc_server *s;
    int64_t call_deadline_ms; /* monotonic; each message also gets at most max_deadline_ms */
    mg_trace_ctx trace;       /* the call's traceparent: every message's parent; zero: none */

    atomic_int refs;
    atomic_size_t held; /* HIGH messages routed or waiting, plus results not yet sent */
    atomic_bool dead, half_closed, status_started;
    atomic_bool recv_wait;          /* a receive waits for room in the window */
    _Atomic(struct item *) results; /* pushed, newest first */
    atomic_bool send_out;           /* the send token (see DESIGN) */
    void *scratch;                  /* a response's protobuf structs (the token holder's) */
    size_t scratch_cap;
    struct packbuf *pack;       /* the last response's bytes (the token holder's) */
    grpc_byte_buffer *send_buf; /* the token holder's */

    pthread_mutex_t mu; /* guards the receive side below */
    bool recv_out, pumping;
    struct item **chains;                 /* MG_STREAM_SLOTS: a chain's first message, by to */
    struct item *ready_head, *ready_tail; /* messages whose turn came, to start */

    grpc_byte_buffer *recv_buf;
    int cancelled;
    struct stream_op op_recv, op_send, op_close, op_status;
};

/* A response's bytes, lent to gRPC as a slice and packed into again once
 * gRPC let go of them: a response of many results is kilobytes, and a
 * malloc that large consolidated malloc's bins every time. */
struct packbuf {
    atomic_int refs; /* the stream's, plus one while a slice holds it */
    size_t cap;
    uint8_t data[];
};

static void packbuf_unref(void *p)
{
    struct packbuf *b = p;
    if (b && atomic_fetch_sub(&b->refs, 1) == 1)
        free(b);
}

/* A message's block, with copies of id and to (NULL: ""). */
static struct item *item_new(struct stream *st, const char *id, const char *to)
{
    id = id ? id : "";
    to = to ? to : "";
    size_t il = strlen(id) + 1, tl = strlen(to) + 1;
    struct item *x = mg_xmalloc(sizeof(*x) + il + tl);
    memset(x, 0, sizeof(*x));
    x->st = st;
    x->id = memcpy(x->buf, id, il);
    x->to = memcpy(x->buf + il, to, tl);
    return x;
}

/* ---- the chain table (under mu) ------------------------------------------------------ */

/* The slot of to's chain, or the empty slot where it goes. */
static size_t chain_slot(const struct stream *st, const char *to, uint64_t h)
{
    size_t mask = MG_STREAM_SLOTS - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        const struct item *o = st->chains[i];
        if (!o || (o->hash == h && strcmp(o->to, to) == 0))
            return i;
    }
}

/* Empties slot i, shifting back the entries that probed past it. */
static void chain_del(struct stream *st, size_t i)
{
    size_t mask = MG_STREAM_SLOTS - 1;
    st->chains[i] = NULL;
    for (size_t j = (i + 1) & mask; st->chains[j]; j = (j + 1) & mask) {
        size_t home = st->chains[j]->hash & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            st->chains[i] = st->chains[j];
            st->chains[j] = NULL;
            i = j;
        }
    }
}

static void ready_push(struct stream *st, struct item *x)
{
    x->next = NULL;
    if (st->ready_tail)
        st->ready_tail->next = x;
    else
        st->ready_head = x;
    st->ready_tail = x;
}

/* ---- references and the call's end ----------------------------------------------- */

static void free_list(struct item *x)
{
    for (struct item *n; x; x = n) {
        n = x->next;
        free(x);
    }
}

static void stream_free(struct stream *st)
{
    struct rpc *c = st->c;
    c->code = st->cancelled || atomic_load(&st->dead) ? GRPC_STATUS_CANCELLED : GRPC_STATUS_OK;
    free_list(atomic_load(&st->results));
    free(st->chains); /* empty: every chain ended with its last message */
    free(st->scratch);
    packbuf_unref(st->pack);
    if (st->recv_buf)
        grpc_byte_buffer_destroy(st->recv_buf);
    if (st->send_buf)
        grpc_byte_buffer_destroy(st->send_buf);
    pthread_mutex_destroy(&st->mu);
    free(st);
    mg_grpc_rpc_done(c);
}

static void unref(struct stream *st)
{
    if (atomic_fetch_sub(&st->refs, 1) == 1)
        stream_free(st);
}

/* Starts a batch; its completion holds a reference. The caller holds one. */
static bool start_batch(struct stream *st, const grpc_op *ops, size_t n, struct stream_op *tag)
{
    atomic_fetch_add(&st->refs, 1);
    if (grpc_call_start_batch(st->c->call, ops, n, tag, NULL) != GRPC_CALL_OK) {
        mg_log_error("grpc", "SendStream: cannot start a batch (op %d)", (int)tag->kind);
        atomic_store(&st->dead, true);
        atomic_fetch_sub(&st->refs, 1);
        return false;
    }
    return true;
}

/* The next receive, when the stream has room and the client may send. Under
 * mu. recv_wait is raised before held is read, and a send lowers held before
 * it reads recv_wait: one of the two sees the other. */
static void maybe_recv(struct stream *st)
{
    if (st->recv_out || atomic_load(&st->half_closed) || atomic_load(&st->dead))
        return;
    atomic_store(&st->recv_wait, true);
    if (atomic_load(&st->held) >= MG_STREAM_WINDOW)
        return; /* the send that makes room starts it */
    atomic_store(&st->recv_wait, false);
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &st->recv_buf;
    st->recv_out = start_batch(st, &op, 1, &st->op_recv);
}

/* ---- results: a lock-free list and the send token ----------------------------------- */

static void push_result(struct stream *st, struct item *x)
{
    struct item *head = atomic_load(&st->results);
    do
        x->next = head;
    while (!atomic_compare_exchange_weak(&st->results, &head, x));
}

/* m packed into a byte buffer on the stream's packbuf, or on a new one when
 * gRPC still holds it or it is too small. The token holder's. */
static grpc_byte_buffer *pack(struct stream *st, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    struct packbuf *b = st->pack;
    if (b && (atomic_load(&b->refs) > 1 || b->cap < len)) {
        packbuf_unref(b); /* the slice holding it frees it */
        b = NULL;
    }
    if (!b) {
        size_t cap = len < 2048 ? 4096 : len * 2;
        b = mg_xmalloc(sizeof(*b) + cap);
        atomic_init(&b->refs, 1);
        b->cap = cap;
        st->pack = b;
    }
    protobuf_c_message_pack(m, b->data);
    atomic_fetch_add(&b->refs, 1);
    grpc_slice sl = grpc_slice_new_with_user_data(b->data, len, packbuf_unref, b);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

/* Sends the results in list (newest first) in one response. The token
 * holder's; true when the send started (the token stays held until its
 * completion). A dead stream's results are dropped. */
static bool send_results(struct stream *st, struct item *list)
{
    struct item *fifo = NULL;
    size_t n = 0;
    for (struct item *x = list, *next; x; x = next, n++) {
        next = x->next;
        x->next = fifo;
        fifo = x;
    }
    if (!atomic_load(&st->dead)) {
        Meshgate__V1__SendStreamResponse out = MESHGATE__V1__SEND_STREAM_RESPONSE__INIT;
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
        for (struct item *x = fifo; x; x = x->next, i++) {
            meshgate__v1__send_message_response__init(&rs[i]);
            mg_grpc_result_to_pb(x->to, &x->res, &rr[i], &paths[i * MG_PATH_COUNT]);
            rs[i].id = x->id;
            rs[i].result = &rr[i];
            rp[i] = &rs[i];
        }
        out.n_results = n;
        out.results = rp;
        st->send_buf = pack(st, &out.base);
    }
    free_list(fifo);
    /* held drops before the send starts: its completion may come at once, on
     * another thread, and find the stream ready for its status */
    atomic_fetch_sub(&st->held, n);
    if (atomic_load(&st->recv_wait)) { /* the results sent made room */
        pthread_mutex_lock(&st->mu);
        maybe_recv(st);
        pthread_mutex_unlock(&st->mu);
    }
    if (!st->send_buf)
        return false;
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = st->send_buf;
    if (start_batch(st, &op, 1, &st->op_send))
        return true;
    grpc_byte_buffer_destroy(st->send_buf);
    st->send_buf = NULL;
    return false;
}

/* The final status, once the client half-closed and every result was sent.
 * The token holder's, with no send out; true when it started (the token is
 * then kept: nothing is sent after it). */
static bool maybe_status(struct stream *st)
{
    if (atomic_load(&st->dead) || !atomic_load(&st->half_closed) || atomic_load(&st->held) > 0 ||
        atomic_load(&st->status_started))
        return false;
    bool started = false;
    pthread_mutex_lock(&st->mu);
    if (!st->recv_out) {
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        op.data.send_status_from_server.status = GRPC_STATUS_OK;
        started = start_batch(st, &op, 1, &st->op_status);
        atomic_store(&st->status_started, started);
    }
    pthread_mutex_unlock(&st->mu);
    return started;
}

/* Whether the token's holder has something to do. */
static bool send_wanted(struct stream *st)
{
    return atomic_load(&st->results) ||
           (!atomic_load(&st->dead) && atomic_load(&st->half_closed) &&
            atomic_load(&st->held) == 0 && !atomic_load(&st->status_started));
}

/* Sends what is queued, unless another thread holds the token: it looks
 * again after letting go, so nothing pushed meanwhile waits. Any thread. */
static void kick(struct stream *st)
{
    while (!atomic_exchange(&st->send_out, true)) {
        struct item *list = atomic_exchange(&st->results, NULL);
        if (list ? send_results(st, list) : maybe_status(st))
            return;
        atomic_store(&st->send_out, false);
        if (!send_wanted(st))
            return;
    }
}

/* ---- routing ------------------------------------------------------------------------ */

static void pump(struct stream *st);

/* A HIGH message's order is fixed (before its result): start the
 * recipient's next message. */
static void routed_handed(void *arg)
{
    struct item *x = arg;
    struct stream *st = x->st;
    pthread_mutex_lock(&st->mu);
    size_t i = chain_slot(st, x->to, x->hash);
    struct item *next = x->wait_head;
    if (next) { /* next heads the chain now */
        next->wait_head = next->next;
        next->wait_tail = next->next ? x->wait_tail : NULL;
        st->chains[i] = next;
        ready_push(st, next);
    } else {
        chain_del(st, i);
    }
    pthread_mutex_unlock(&st->mu);
    if (next)
        pump(st);
}

/* A HIGH message's result (after routed_handed): it leaves the window as a
 * message and enters it as a result; x is the sender's from here. */
static void routed_done(void *arg, const mg_send_result *res)
{
    struct item *x = arg;
    struct stream *st = x->st;
    x->res = *res;
    push_result(st, x);
    kick(st);
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
        struct item *x = st->ready_head;
        if (!x)
            break;
        st->ready_head = x->next;
        if (!st->ready_head)
            st->ready_tail = NULL;
        pthread_mutex_unlock(&st->mu);

        mg_msg *msg = x->msg;
        x->msg = NULL;
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

/* A result known at once (rejected, LOW accepted or overloaded). */
static void push_now(struct stream *st, const char *id, const char *to, const mg_send_result *res)
{
    struct item *x = item_new(st, id, to);
    x->res = *res;
    atomic_fetch_add(&st->held, 1);
    push_result(st, x);
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
        push_now(st, m && m->id && strlen(m->id) <= 128 ? m->id : "",
                 m && m->to && strlen(m->to) <= s->lim.max_user_bytes ? m->to : "", &res);
    } else if (msg->priority == MG_PRIO_LOW) {
        if (mg_router_send(s->router, msg, mg_mono_ms() + s->low_deadline_ms, low_done, NULL) < 0) {
            res.status = MG_STATUS_FAILED;
            snprintf(res.reason, sizeof(res.reason),
                     "gateway overloaded: too many sends in flight (LOW priority message dropped)");
            mg_metric_add(s->dropped_overload, 1);
        } else {
            res.status = MG_STATUS_ACCEPTED;
        }
        push_now(st, msg->id, msg->to, &res);
        mg_msg_free(msg);
    } else {
        struct item *x = item_new(st, msg->id, msg->to);
        x->msg = msg;
        x->hash = mg_hash(x->to, strlen(x->to));
        atomic_fetch_add(&st->held, 1);
        atomic_fetch_add(&st->refs, 1);
        pthread_mutex_lock(&st->mu);
        size_t i = chain_slot(st, x->to, x->hash);
        struct item *head = st->chains[i];
        if (head) { /* the recipient has one in flight: wait behind it */
            if (head->wait_tail)
                head->wait_tail->next = x;
            else
                head->wait_head = x;
            head->wait_tail = x;
        } else {
            st->chains[i] = x;
            ready_push(st, x);
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
        mg_grpc_view v; /* decoded where it arrived: no copy */
        mg_grpc_view_init(&v, buf);
        take_request(st, v.data, v.len);
        mg_grpc_view_release(&v);
        pump(st);
    }
    if (buf)
        grpc_byte_buffer_destroy(buf);
    pthread_mutex_lock(&st->mu);
    st->recv_out = false;
    if (!ok)
        atomic_store(&st->dead, true); /* the call is over (cancelled or broken) */
    else if (!buf)
        atomic_store(&st->half_closed, true);
    maybe_recv(st);
    pthread_mutex_unlock(&st->mu);
    kick(st);
}

/* The send token's holder: the send is done, the next may start. */
static void on_send(struct stream *st, bool ok)
{
    grpc_byte_buffer_destroy(st->send_buf);
    st->send_buf = NULL;
    if (!ok)
        atomic_store(&st->dead, true);
    atomic_store(&st->send_out, false);
    kick(st);
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
        if (st->cancelled)
            atomic_store(&st->dead, true);
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
    st->chains = mg_xcalloc(MG_STREAM_SLOTS, sizeof(*st->chains));
    struct stream_op *ops[] = {&st->op_recv, &st->op_send, &st->op_close, &st->op_status};
    enum op_kind kinds[] = {OP_RECV, OP_SEND, OP_CLOSE, OP_STATUS};
    for (int i = 0; i < 4; i++)
        *ops[i] = (struct stream_op){.state = RPC_STREAM_OP, .kind = kinds[i], .st = st};

    atomic_init(&st->refs, 1); /* ours, until the first operations are started */
    grpc_op first[2];
    memset(first, 0, sizeof(first));
    first[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    first[1].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    first[1].data.recv_close_on_server.cancelled = &st->cancelled;
    pthread_mutex_lock(&st->mu);
    if (start_batch(st, first, 2, &st->op_close))
        maybe_recv(st);
    pthread_mutex_unlock(&st->mu);
    unref(st);
}
