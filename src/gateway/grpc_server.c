/* grpc_server.c: the gRPC front end on gRPC C core (see grpc_server.h).
 *
 * DESIGN
 * Threads: cfg->threads threads "grpc-<i>" all poll one completion queue
 * (gRPC core binds every call of a connection to one queue, so a queue per
 * thread would serialize a client's calls on one thread). Each thread
 * arms MG_GRPC_REQUESTS_PER_CQ generic request_call slots, so new calls are
 * matched while others run, and a slot is re-armed as soon as it is matched. A call is a small
 * state machine driven by its completion-queue events, each state one batch: REQUESTED ->
 * (RECV_MESSAGE) -> RECEIVED -> handler runs -> (SEND_INITIAL_METADATA + SEND_MESSAGE + SEND_STATUS
 * + RECV_CLOSE) -> FINISHING -> call unref'd and freed. Handlers run on the gRPC thread that
 * received the request and never block: a send starts a router operation and returns PENDING;
 * the operation's callback (on whichever thread completed it: a store pool worker, peer-cq,
 * kafka-poll or the WebSocket thread's write report) packs the response and starts the final
 * batch (grpc_call_start_batch may be called from any thread). So sends in flight are bounded by
 * the router's --max-inflight-sends, not by these threads. A LOW send is answered ACCEPTED at
 * once and its operation runs on. GetPresence and Disconnect block on Redis and peers: they run
 * as worker pool jobs, which answer the same way. Deadlines: the client's deadline becomes a
 * monotonic ms deadline for the router; none means MG_GRPC_DEFAULT_DEADLINE_MS. gRPC core itself
 * ends a call whose deadline passes (the client sees DEADLINE_EXCEEDED).
 * Shutdown: shutdown_and_notify, then cancel_all_calls after the grace,
 * then each queue is shut down and drained by its thread, which exits.
 */
#include "gateway/grpc_server.h"
#include "common/mg_alloc.h"
#include "common/mg_id.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_pbwire.h"
#include "common/mg_time.h"
#include "gateway/config.h"
#include "common/mg_grpc.h"
#include "gateway/ws_proto.h"

#include "grpc/health/v1/health.pb-c.h"
#include "meshgate/v1/messaging.pb-c.h"
#include "meshgate/v1/peer.pb-c.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MG_GRPC_REQUESTS_PER_CQ     16
#define MG_GRPC_DEFAULT_DEADLINE_MS 30000
#define MG_GRPC_LOW_DEADLINE_MS     10000 /* a LOW send's router deadline */
#define MG_GRPC_MAX_ID_BYTES        128
#define MG_GRPC_MAX_TYPE_BYTES      128
#define MG_GRPC_MAX_REASON_BYTES    123 /* WebSocket close reason limit */
#define MG_GRPC_DEFAULT_CLOSE_CODE  4001

enum method {
    M_SEND_MESSAGE,
    M_SEND_BATCH,
    M_GET_PRESENCE,
    M_DISCONNECT,
    M_DELIVER_MESSAGE,
    M_DISCONNECT_LOCAL,
    M_DELIVER_BATCH,
    M_HEALTH_CHECK,
    M_HEALTH_WATCH,
    M_UNKNOWN,
    M_COUNT
};

static const struct {
    const char *path;  /* the :path of the call */
    const char *label; /* metric label */
} methods[M_COUNT] = {
    [M_SEND_MESSAGE] = {"/meshgate.v1.Messaging/SendMessage", "SendMessage"},
    [M_SEND_BATCH] = {"/meshgate.v1.Messaging/SendBatch", "SendBatch"},
    [M_GET_PRESENCE] = {"/meshgate.v1.Messaging/GetPresence", "GetPresence"},
    [M_DISCONNECT] = {"/meshgate.v1.Messaging/Disconnect", "Disconnect"},
    [M_DELIVER_MESSAGE] = {"/meshgate.v1.GatewayPeer/DeliverMessage", "DeliverMessage"},
    [M_DISCONNECT_LOCAL] = {"/meshgate.v1.GatewayPeer/DisconnectLocal", "DisconnectLocal"},
    [M_DELIVER_BATCH] = {"/meshgate.v1.GatewayPeer/DeliverBatch", "DeliverBatch"},
    [M_HEALTH_CHECK] = {"/grpc.health.v1.Health/Check", "HealthCheck"},
    [M_HEALTH_WATCH] = {"/grpc.health.v1.Health/Watch", "HealthWatch"},
    [M_UNKNOWN] = {NULL, "unknown"},
};

#define MG_GRPC_NCODES 17

/* The limits the validators need (a subset of the config). */
struct limits {
    size_t max_content_bytes;
    size_t max_user_bytes;
    size_t max_batch;
};

struct cq_thread {
    mg_grpc_server *s;
    int index;
    pthread_t thread;
    bool running;
};

struct mg_grpc_server {
    char *listen;
    char *gateway_id;
    char *region;
    int nthreads;
    int max_message_bytes;
    struct limits lim;
    mg_router *router;
    mg_pool *pool;
    const mg_grpc_auth *auth; /* grpc_auth.h: who may call what */

    grpc_server *server;
    grpc_completion_queue *cq; /* shared by every thread */
    struct cq_thread *threads;
    int port;
    bool started;
    bool stopped;
    atomic_bool serving;

    pthread_mutex_t mu; /* guards the fields below */
    pthread_cond_t cv;
    bool stopping;      /* shutdown began: do not re-arm request slots */
    bool shutdown_done; /* the shutdown tag arrived */
    size_t live;        /* struct rpc allocated (slots and calls) */

    int shutdown_tag; /* its address is the tag */

    _Atomic(mg_metric *) requests[M_COUNT][MG_GRPC_NCODES];
    mg_metric *latency[M_COUNT];
    mg_metric *dropped_overload;
    mg_metric *inflight;
};

enum rpc_state { RPC_REQUESTED, RPC_RECEIVED, RPC_FINISHING };

/* One call, from request_call to its final batch. */
struct rpc {
    enum rpc_state state;
    struct cq_thread *t;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *req;
    grpc_byte_buffer *resp;
    grpc_slice status_details;
    int cancelled;
    enum method method;
    grpc_status_code code;
    int64_t start_us;
    int64_t deadline_ms; /* monotonic */
};

/* A handler fills c->resp (on OK) and returns the status; err gets details.
 * MG_GRPC_PENDING: the handler started work whose completion answers the
 * call with answer(). */
#define MG_GRPC_PENDING ((grpc_status_code)-1)
typedef grpc_status_code (*handler_fn)(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                       size_t len, char *err, size_t errlen);

/* ---- metrics ------------------------------------------------------------------ */

static void count_request(mg_grpc_server *s, enum method m, grpc_status_code code, int64_t micros)
{
    int ci = ((int)code >= 0 && (int)code < MG_GRPC_NCODES) ? (int)code : GRPC_STATUS_UNKNOWN;
    mg_metric *ctr = atomic_load(&s->requests[m][ci]);
    if (!ctr) {
        char labels[128];
        snprintf(labels, sizeof(labels), "method=\"%s\",code=\"%s\"", methods[m].label,
                 mg_grpc_code_name((grpc_status_code)ci));
        ctr = mg_counter("meshgate_grpc_requests_total", "gRPC calls by method and status code",
                         labels);
        atomic_store(&s->requests[m][ci], ctr);
    }
    mg_metric_add(ctr, 1);
    mg_histogram_observe_us(s->latency[m], micros);
}

/* ---- conversions and validation ------------------------------------------------ */

static enum method method_of(grpc_slice path)
{
    size_t n = GRPC_SLICE_LENGTH(path);
    const char *p = (const char *)GRPC_SLICE_START_PTR(path);
    for (int m = 0; m < M_UNKNOWN; m++)
        if (strlen(methods[m].path) == n && memcmp(methods[m].path, p, n) == 0)
            return (enum method)m;
    return M_UNKNOWN;
}

/* The gRPC status for a negative errno from the router or a store. */
static grpc_status_code status_of_errno(int err)
{
    switch (err) {
    case -EINVAL:
    case -EBADMSG:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case -ETIMEDOUT:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    case -EAGAIN:
    case -ENOBUFS:
    case -ENOMEM:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case -ENOSYS:
    case -EOPNOTSUPP:
        return GRPC_STATUS_UNIMPLEMENTED;
    case -EIO:
    case -ECONNREFUSED:
    case -ECONNRESET:
    case -ENOTCONN:
    case -EHOSTUNREACH:
    case -ESHUTDOWN:
    case -ENETDOWN:
        return GRPC_STATUS_UNAVAILABLE;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

/* Checks a user id: non-empty, at most max_user_bytes. what names the field. */
static bool valid_user(const struct limits *lim, const char *user, const char *what, char *err,
                       size_t errlen)
{
    if (!user || !*user) {
        snprintf(err, errlen, "%s is required", what);
        return false;
    }
    size_t n = strlen(user);
    if (n > lim->max_user_bytes) {
        snprintf(err, errlen, "%s is %zu bytes, longer than the limit of %zu", what, n,
                 lim->max_user_bytes);
        return false;
    }
    /* The same rule as the WebSocket front end: UTF-8, no control characters. */
    if (!mg_ws_proto_valid_user(user, lim->max_user_bytes)) {
        snprintf(err, errlen, "%s is not valid UTF-8 or holds control characters", what);
        return false;
    }
    return true;
}

/* Checks a Message (need_to: message.to must be set) and turns it into an
 * mg_msg: an empty id gets a new UUIDv7, sent_at_ms 0 gets now, priority
 * UNSPECIFIED becomes HIGH. Returns NULL with err filled when invalid. */
static mg_msg *msg_from_pb(const struct limits *lim, const Meshgate__V1__Message *pb, bool need_to,
                           char *err, size_t errlen)
{
    if (!pb) {
        snprintf(err, errlen, "message is required");
        return NULL;
    }
    if (need_to && !valid_user(lim, pb->to, "message.to", err, errlen))
        return NULL;
    size_t from_len = pb->from ? strlen(pb->from) : 0;
    if (from_len > lim->max_user_bytes) {
        snprintf(err, errlen, "message.from is %zu bytes, longer than the limit of %zu", from_len,
                 lim->max_user_bytes);
        return NULL;
    }
    /* from and id reach recipients' frames and logs: the user rule (UTF-8, no
     * control characters) for both. */
    if (from_len && !mg_ws_proto_valid_user(pb->from, from_len)) {
        snprintf(err, errlen, "message.from is not valid UTF-8 or holds control characters");
        return NULL;
    }
    if (pb->content.len > lim->max_content_bytes) {
        snprintf(err, errlen, "message.content is %zu bytes, more than the limit of %zu",
                 pb->content.len, lim->max_content_bytes);
        return NULL;
    }
    size_t id_len = pb->id ? strlen(pb->id) : 0;
    if (id_len > MG_GRPC_MAX_ID_BYTES) {
        snprintf(err, errlen, "message.id is %zu bytes, longer than the limit of %d", id_len,
                 MG_GRPC_MAX_ID_BYTES);
        return NULL;
    }
    if (id_len && !mg_ws_proto_valid_user(pb->id, id_len)) {
        snprintf(err, errlen, "message.id is not valid UTF-8 or holds control characters");
        return NULL;
    }
    if (pb->content_type && strlen(pb->content_type) > MG_GRPC_MAX_TYPE_BYTES) {
        snprintf(err, errlen, "message.content_type is longer than %d bytes",
                 MG_GRPC_MAX_TYPE_BYTES);
        return NULL;
    }
    if (pb->sent_at_ms < 0) {
        snprintf(err, errlen, "message.sent_at_ms is negative");
        return NULL;
    }
    mg_priority prio;
    switch (pb->priority) {
    case MESHGATE__V1__PRIORITY__PRIORITY_UNSPECIFIED:
    case MESHGATE__V1__PRIORITY__PRIORITY_HIGH:
        prio = MG_PRIO_HIGH;
        break;
    case MESHGATE__V1__PRIORITY__PRIORITY_LOW:
        prio = MG_PRIO_LOW;
        break;
    default:
        snprintf(err, errlen, "message.priority %d is not a known priority", (int)pb->priority);
        return NULL;
    }
    char id[MG_ID_LEN + 1];
    const char *use_id = pb->id;
    if (id_len == 0) {
        mg_id_new(id);
        use_id = id;
    }
    return mg_msg_new(use_id, pb->from, need_to ? pb->to : "", pb->content.data, pb->content.len,
                      pb->content_type, pb->sent_at_ms ? pb->sent_at_ms : mg_now_ms(), prio);
}

/* Fills a RecipientResult from a router result; paths must hold MG_PATH_COUNT. */
static void result_to_pb(const char *user, const mg_send_result *res,
                         Meshgate__V1__RecipientResult *out, Meshgate__V1__Path *paths)
{
    meshgate__v1__recipient_result__init(out);
    out->user = (char *)user;
    out->status = (Meshgate__V1__DeliveryStatus)res->status;
    out->path = (Meshgate__V1__Path)res->path;
    out->reason = (char *)res->reason;
    out->connections = res->connections;
    size_t n = 0;
    for (int p = MG_PATH_LOCAL; p < MG_PATH_COUNT; p++)
        if (res->paths & (1u << p))
            paths[n++] = (Meshgate__V1__Path)p;
    if (n == 0 && res->path != MG_PATH_NONE)
        paths[n++] = (Meshgate__V1__Path)res->path;
    out->n_paths = n;
    out->paths = paths;
}

static void reject(mg_send_result *res, const char *reason)
{
    memset(res, 0, sizeof(*res));
    res->status = MG_STATUS_REJECTED;
    snprintf(res->reason, sizeof(res->reason), "%s", reason);
}

static void accepted(mg_send_result *res)
{
    memset(res, 0, sizeof(*res));
    res->status = MG_STATUS_ACCEPTED;
}

/* ---- answering later ------------------------------------------------------------------ */

static void finish(struct rpc *c, grpc_status_code code, const char *details);

/* Ends the call with code (logged when it is a server-side failure). Any thread. */
static void answer(struct rpc *c, grpc_status_code code, const char *err)
{
    if (code != GRPC_STATUS_OK && code != GRPC_STATUS_NOT_FOUND &&
        code != GRPC_STATUS_INVALID_ARGUMENT && code != GRPC_STATUS_UNIMPLEMENTED)
        mg_log_warn("grpc", "call failed method=%s code=%s details=\"%s\"",
                    methods[c->method].label, mg_grpc_code_name(code), err ? err : "");
    finish(c, code, err);
}

static grpc_status_code overloaded(mg_grpc_server *s, char *err, size_t errlen, bool low)
{
    if (low)
        mg_metric_add(s->dropped_overload, 1);
    snprintf(err, errlen, "gateway overloaded: too many sends in flight%s",
             low ? " (LOW priority message dropped)" : "");
    return GRPC_STATUS_RESOURCE_EXHAUSTED;
}

/* A LOW send's operation: nobody waits for it; failures are logged. */
static void low_done(void *arg, const mg_send_result *res)
{
    (void)arg;
    if (res->status == MG_STATUS_FAILED)
        mg_log_warn("grpc", "low priority send failed reason=%s", res->reason);
}

static void low_batch_done(void *arg, const mg_send_result *res, size_t n)
{
    (void)arg;
    size_t failed = 0;
    for (size_t i = 0; i < n; i++)
        failed += res[i].status == MG_STATUS_FAILED;
    if (failed)
        mg_log_warn("grpc", "low priority batch: %zu of %zu recipients failed", failed, n);
}

/* ---- handlers ----------------------------------------------------------------------- */

#define UNPACK(type, var, desc)                                                                    \
    type *var = (type *)protobuf_c_message_unpack(&desc, NULL, len, req ? req : (uint8_t *)"");    \
    if (!var) {                                                                                    \
        snprintf(err, errlen, "request does not decode as %s", desc.name);                         \
        return GRPC_STATUS_INVALID_ARGUMENT;                                                       \
    }

/* A HIGH SendMessage waiting for its operation. */
struct send_ctx {
    struct rpc *c;
    char *id, *to;
};

static void send_done(void *arg, const mg_send_result *res)
{
    struct send_ctx *x = arg;
    Meshgate__V1__SendMessageResponse out = MESHGATE__V1__SEND_MESSAGE_RESPONSE__INIT;
    Meshgate__V1__RecipientResult rr;
    Meshgate__V1__Path paths[MG_PATH_COUNT];
    result_to_pb(x->to, res, &rr, paths);
    out.id = x->id;
    out.result = &rr;
    x->c->resp = mg_grpc_pack(&out.base);
    answer(x->c, GRPC_STATUS_OK, NULL);
    free(x->id);
    free(x->to);
    free(x);
}

static grpc_status_code h_send_message(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                       size_t len, char *err, size_t errlen)
{
    UNPACK(Meshgate__V1__SendMessageRequest, rq, meshgate__v1__send_message_request__descriptor);
    mg_msg *msg = msg_from_pb(&s->lim, rq->message, true, err, errlen);
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    if (!msg)
        return GRPC_STATUS_INVALID_ARGUMENT;
    grpc_status_code code = MG_GRPC_PENDING;
    bool low = msg->priority == MG_PRIO_LOW;
    struct send_ctx *x = NULL;
    int rc;
    if (low) {
        rc = mg_router_send(s->router, msg, mg_mono_ms() + MG_GRPC_LOW_DEADLINE_MS, low_done, NULL);
    } else {
        x = mg_new(struct send_ctx);
        x->c = c;
        x->id = mg_xstrdup(msg->id);
        x->to = mg_xstrdup(msg->to);
        rc = mg_router_send(s->router, msg, c->deadline_ms, send_done, x);
    }
    if (rc < 0) {
        code = overloaded(s, err, errlen, low);
        if (x) {
            free(x->id);
            free(x->to);
            free(x);
        }
    } else if (low) {
        mg_send_result res;
        accepted(&res);
        Meshgate__V1__SendMessageResponse out = MESHGATE__V1__SEND_MESSAGE_RESPONSE__INIT;
        Meshgate__V1__RecipientResult rr;
        Meshgate__V1__Path paths[MG_PATH_COUNT];
        result_to_pb(msg->to, &res, &rr, paths);
        out.id = msg->id;
        out.result = &rr;
        c->resp = mg_grpc_pack(&out.base);
        code = GRPC_STATUS_OK;
    }
    mg_msg_free(msg);
    return code;
}

/* A SendBatch: the request stays decoded until the answer (the response
 * points into it); res holds every recipient's result, the valid ones
 * filled by the router's batch. */
struct batch_ctx {
    struct rpc *c;
    Meshgate__V1__SendBatchRequest *rq;
    char *id;
    mg_send_result *res;
    size_t *valid_idx;
};

static void batch_ctx_free(struct batch_ctx *x)
{
    protobuf_c_message_free_unpacked(&x->rq->base, NULL);
    free(x->id);
    free(x->res);
    free(x->valid_idx);
    free(x);
}

static void batch_respond(struct batch_ctx *x)
{
    size_t n = x->rq->n_to;
    Meshgate__V1__SendBatchResponse out = MESHGATE__V1__SEND_BATCH_RESPONSE__INIT;
    Meshgate__V1__RecipientResult *rr = mg_xcalloc(n, sizeof(*rr));
    Meshgate__V1__RecipientResult **rrp = mg_xcalloc(n, sizeof(*rrp));
    Meshgate__V1__Path *paths = mg_xcalloc(n * MG_PATH_COUNT, sizeof(*paths));
    for (size_t i = 0; i < n; i++) {
        result_to_pb(x->rq->to[i], &x->res[i], &rr[i], &paths[i * MG_PATH_COUNT]);
        rrp[i] = &rr[i];
    }
    out.id = x->id;
    out.n_results = n;
    out.results = rrp;
    x->c->resp = mg_grpc_pack(&out.base);
    free(paths);
    free(rrp);
    free(rr);
}

static void batch_done(void *arg, const mg_send_result *vres, size_t nvalid)
{
    struct batch_ctx *x = arg;
    for (size_t k = 0; k < nvalid; k++)
        x->res[x->valid_idx[k]] = vres[k];
    batch_respond(x);
    answer(x->c, GRPC_STATUS_OK, NULL);
    batch_ctx_free(x);
}

#define MG_GRPC_BATCH_TO_FIELD 2 /* SendBatchRequest.to, proto/meshgate/v1/messaging.proto */

static grpc_status_code h_send_batch(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                     size_t len, char *err, size_t errlen)
{
    /* Bound the recipients before protobuf-c copies each of them: one pass
     * over the bytes, stopping just past the limit. */
    size_t nto = 0;
    if (mg_pb_count_field(req ? req : (const uint8_t *)"", len, MG_GRPC_BATCH_TO_FIELD,
                          s->lim.max_batch + 1, &nto) == 0 &&
        nto > s->lim.max_batch) {
        snprintf(err, errlen, "to: more than the limit of %zu recipients", s->lim.max_batch);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    UNPACK(Meshgate__V1__SendBatchRequest, rq, meshgate__v1__send_batch_request__descriptor);
    if (rq->n_to == 0 || rq->n_to > s->lim.max_batch) {
        if (rq->n_to == 0)
            snprintf(err, errlen, "to: at least one recipient is required");
        else
            snprintf(err, errlen, "to: %zu recipients, more than the limit of %zu", rq->n_to,
                     s->lim.max_batch);
        protobuf_c_message_free_unpacked(&rq->base, NULL);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    mg_msg *msg = msg_from_pb(&s->lim, rq->message, false, err, errlen);
    if (!msg) {
        protobuf_c_message_free_unpacked(&rq->base, NULL);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    struct batch_ctx *x = mg_new(struct batch_ctx);
    x->c = c;
    x->rq = rq;
    x->id = mg_xstrdup(msg->id);
    x->res = mg_xcalloc(rq->n_to, sizeof(*x->res));
    x->valid_idx = mg_xcalloc(rq->n_to, sizeof(*x->valid_idx));
    const char **valid = mg_xcalloc(rq->n_to, sizeof(*valid));
    size_t nvalid = 0;
    for (size_t i = 0; i < rq->n_to; i++) {
        char why[160];
        if (!valid_user(&s->lim, rq->to[i], "recipient", why, sizeof(why))) {
            reject(&x->res[i], why);
            continue;
        }
        valid[nvalid] = rq->to[i];
        x->valid_idx[nvalid++] = i;
    }
    grpc_status_code code = GRPC_STATUS_OK;
    bool low = msg->priority == MG_PRIO_LOW;
    if (nvalid > 0 && low) {
        if (mg_router_send_batch(s->router, msg, valid, nvalid,
                                 mg_mono_ms() + MG_GRPC_LOW_DEADLINE_MS, low_batch_done, NULL) < 0)
            code = overloaded(s, err, errlen, true);
        for (size_t k = 0; k < nvalid; k++)
            accepted(&x->res[x->valid_idx[k]]);
    } else if (nvalid > 0) {
        if (mg_router_send_batch(s->router, msg, valid, nvalid, c->deadline_ms, batch_done, x) < 0)
            code = overloaded(s, err, errlen, false);
        else
            code = MG_GRPC_PENDING; /* x belongs to the batch now */
    }
    free(valid);
    mg_msg_free(msg);
    if (code == MG_GRPC_PENDING)
        return code;
    if (code == GRPC_STATUS_OK)
        batch_respond(x);
    batch_ctx_free(x);
    return code;
}

static grpc_status_code h_get_presence(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                       size_t len, char *err, size_t errlen)
{
    UNPACK(Meshgate__V1__GetPresenceRequest, rq, meshgate__v1__get_presence_request__descriptor);
    grpc_status_code code = GRPC_STATUS_OK;
    size_t n = rq->n_users;
    if (n > s->lim.max_batch) {
        snprintf(err, errlen, "users: %zu, more than the limit of %zu", n, s->lim.max_batch);
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if (!valid_user(&s->lim, rq->users[i], "users[]", err, errlen)) {
            code = GRPC_STATUS_INVALID_ARGUMENT;
            goto out;
        }
    mg_presence_list *lists = mg_xcalloc(n ? n : 1, sizeof(*lists));
    mg_presence *p = mg_router_presence(s->router);
    int rc = n ? p->ops->lookup_batch(p, (const char *const *)rq->users, n, lists) : 0;
    if (rc < 0) {
        code = status_of_errno(rc);
        snprintf(err, errlen, "presence store: %s", strerror(-rc));
    } else {
        size_t nconn = 0;
        for (size_t i = 0; i < n; i++)
            nconn += lists[i].n;
        Meshgate__V1__UserPresence *ups = mg_xcalloc(n ? n : 1, sizeof(*ups));
        Meshgate__V1__UserPresence **upp = mg_xcalloc(n ? n : 1, sizeof(*upp));
        Meshgate__V1__Connection *conns = mg_xcalloc(nconn ? nconn : 1, sizeof(*conns));
        Meshgate__V1__Connection **connp = mg_xcalloc(nconn ? nconn : 1, sizeof(*connp));
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            meshgate__v1__user_presence__init(&ups[i]);
            ups[i].user = rq->users[i];
            ups[i].online = lists[i].n > 0;
            ups[i].n_connections = lists[i].n;
            ups[i].connections = &connp[k];
            for (size_t j = 0; j < lists[i].n; j++, k++) {
                const mg_conn_ref *ref = &lists[i].items[j];
                meshgate__v1__connection__init(&conns[k]);
                conns[k].conn_id = ref->conn_id ? ref->conn_id : "";
                conns[k].gateway_id = ref->gateway_id ? ref->gateway_id : "";
                conns[k].region = ref->region ? ref->region : "";
                conns[k].connected_at_ms = ref->connected_at_ms;
                connp[k] = &conns[k];
            }
            upp[i] = &ups[i];
        }
        Meshgate__V1__GetPresenceResponse out = MESHGATE__V1__GET_PRESENCE_RESPONSE__INIT;
        out.n_users = n;
        out.users = upp;
        c->resp = mg_grpc_pack(&out.base);
        free(connp);
        free(conns);
        free(upp);
        free(ups);
    }
    for (size_t i = 0; i < n; i++)
        mg_presence_list_clear(&lists[i]);
    free(lists);
out:
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    return code;
}

/* Shared by Disconnect (every gateway) and DisconnectLocal (this one). */
static grpc_status_code disconnect_common(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                          size_t len, char *err, size_t errlen, bool local)
{
    UNPACK(Meshgate__V1__DisconnectRequest, rq, meshgate__v1__disconnect_request__descriptor);
    grpc_status_code code = GRPC_STATUS_OK;
    uint32_t wscode = rq->code ? rq->code : MG_GRPC_DEFAULT_CLOSE_CODE;
    if (!valid_user(&s->lim, rq->user, "user", err, errlen)) {
        code = GRPC_STATUS_INVALID_ARGUMENT;
    } else if (wscode < 1000 || wscode > 4999 || (wscode >= 1004 && wscode <= 1006) ||
               wscode == 1015) {
        snprintf(err, errlen, "code %u is not a WebSocket close code a server may send", wscode);
        code = GRPC_STATUS_INVALID_ARGUMENT;
    } else if (rq->reason && strlen(rq->reason) > MG_GRPC_MAX_REASON_BYTES) {
        snprintf(err, errlen, "reason is longer than %d bytes", MG_GRPC_MAX_REASON_BYTES);
        code = GRPC_STATUS_INVALID_ARGUMENT;
    } else if (rq->conn_id && strlen(rq->conn_id) > MG_GRPC_MAX_ID_BYTES) {
        snprintf(err, errlen, "conn_id is longer than %d bytes", MG_GRPC_MAX_ID_BYTES);
        code = GRPC_STATUS_INVALID_ARGUMENT;
    } else {
        const char *conn = rq->conn_id && *rq->conn_id ? rq->conn_id : NULL;
        const char *reason = rq->reason ? rq->reason : "";
        int rc = local ? mg_router_disconnect_local(s->router, rq->user, conn, (int)wscode, reason)
                       : mg_router_disconnect(s->router, rq->user, conn, (int)wscode, reason);
        if (rc < 0) {
            code = status_of_errno(rc);
            snprintf(err, errlen, "disconnect: %s", strerror(-rc));
        } else {
            Meshgate__V1__DisconnectResponse out = MESHGATE__V1__DISCONNECT_RESPONSE__INIT;
            out.disconnected = (uint32_t)rc;
            c->resp = mg_grpc_pack(&out.base);
        }
    }
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    return code;
}

static grpc_status_code h_disconnect(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                     size_t len, char *err, size_t errlen)
{
    return disconnect_common(s, c, req, len, err, errlen, false);
}

static grpc_status_code h_disconnect_local(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                           size_t len, char *err, size_t errlen)
{
    return disconnect_common(s, c, req, len, err, errlen, true);
}

static void deliver_done(void *arg, const mg_deliver_outcome *o)
{
    struct rpc *c = arg;
    Meshgate__V1__DeliverMessageResponse out = MESHGATE__V1__DELIVER_MESSAGE_RESPONSE__INIT;
    out.status = o->status == MG_STATUS_DELIVERED
                     ? MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED
                     : MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED;
    out.connections = o->connections;
    out.duplicate = o->duplicate;
    c->resp = mg_grpc_pack(&out.base);
    answer(c, GRPC_STATUS_OK, NULL);
}

/* Answered when the frames were written (DELIVERED means written, hub.h). */
static grpc_status_code h_deliver_message(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                          size_t len, char *err, size_t errlen)
{
    UNPACK(Meshgate__V1__DeliverMessageRequest, rq,
           meshgate__v1__deliver_message_request__descriptor);
    grpc_status_code code = MG_GRPC_PENDING;
    mg_msg *msg = NULL;
    if (rq->message && (!rq->message->id || !*rq->message->id)) {
        snprintf(err, errlen, "message.id is required on the peer path");
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    msg = msg_from_pb(&s->lim, rq->message, true, err, errlen);
    if (!msg) {
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    int rc = mg_router_deliver_local(s->router, msg, deliver_done, c);
    if (rc < 0) {
        code = status_of_errno(rc);
        snprintf(err, errlen, "deliver: %s", strerror(-rc));
    }
out:
    mg_msg_free(msg);
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    return code;
}

/* A DeliverBatch: one local delivery per recipient, answered when the last
 * one's frames were written (or dropped). */
struct dbatch {
    struct rpc *c;
    atomic_size_t left;
    size_t n;
    Meshgate__V1__DeliverMessageResponse *res;
    struct dbatch_slot {
        struct dbatch *b;
        size_t i;
    } slots[];
};

static void dbatch_settle(struct dbatch *b)
{
    if (atomic_fetch_sub(&b->left, 1) != 1)
        return;
    Meshgate__V1__DeliverMessageResponse **rp = mg_xcalloc(b->n, sizeof(*rp));
    for (size_t i = 0; i < b->n; i++)
        rp[i] = &b->res[i];
    Meshgate__V1__DeliverBatchResponse out = MESHGATE__V1__DELIVER_BATCH_RESPONSE__INIT;
    out.n_results = b->n;
    out.results = rp;
    b->c->resp = mg_grpc_pack(&out.base);
    answer(b->c, GRPC_STATUS_OK, NULL);
    free(rp);
    free(b->res);
    free(b);
}

static void dbatch_done(void *arg, const mg_deliver_outcome *o)
{
    struct dbatch_slot *sl = arg;
    Meshgate__V1__DeliverMessageResponse *r = &sl->b->res[sl->i];
    r->status = o->status == MG_STATUS_DELIVERED
                    ? MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED
                    : MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED;
    r->connections = o->connections;
    r->duplicate = o->duplicate;
    dbatch_settle(sl->b);
}

static grpc_status_code h_deliver_batch(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                        size_t len, char *err, size_t errlen)
{
    UNPACK(Meshgate__V1__DeliverBatchRequest, rq, meshgate__v1__deliver_batch_request__descriptor);
    grpc_status_code code = MG_GRPC_PENDING;
    mg_msg *msg = NULL;
    if (rq->n_to == 0 || rq->n_to > s->lim.max_batch) {
        snprintf(err, errlen, "to: %zu recipients, want 1..%zu", rq->n_to, s->lim.max_batch);
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    if (!rq->message || !rq->message->id || !*rq->message->id) {
        snprintf(err, errlen, "message.id is required on the peer path");
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    for (size_t i = 0; i < rq->n_to; i++)
        if (!valid_user(&s->lim, rq->to[i], "to[]", err, errlen)) {
            code = GRPC_STATUS_INVALID_ARGUMENT;
            goto out;
        }
    msg = msg_from_pb(&s->lim, rq->message, false, err, errlen);
    if (!msg) {
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    struct dbatch *b = mg_xcalloc(1, sizeof(*b) + rq->n_to * sizeof(b->slots[0]));
    b->c = c;
    b->n = rq->n_to;
    b->res = mg_xcalloc(b->n, sizeof(*b->res));
    atomic_init(&b->left, b->n + 1); /* + this handler's guard */
    char *to0 = msg->to;
    for (size_t i = 0; i < b->n; i++) {
        meshgate__v1__deliver_message_response__init(&b->res[i]);
        b->slots[i] = (struct dbatch_slot){b, i};
        msg->to = rq->to[i];
        if (mg_router_deliver_local(s->router, msg, dbatch_done, &b->slots[i]) != 0) {
            b->res[i].status = MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED;
            dbatch_settle(b);
        }
    }
    msg->to = to0;
    dbatch_settle(b);
out:
    mg_msg_free(msg);
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    return code;
}

static bool known_service(const char *name)
{
    return !name || !*name || strcmp(name, "meshgate.v1.Messaging") == 0 ||
           strcmp(name, "meshgate.v1.GatewayPeer") == 0 ||
           strcmp(name, "grpc.health.v1.Health") == 0;
}

static grpc_status_code h_health_check(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                       size_t len, char *err, size_t errlen)
{
    UNPACK(Grpc__Health__V1__HealthCheckRequest, rq,
           grpc__health__v1__health_check_request__descriptor);
    grpc_status_code code = GRPC_STATUS_OK;
    if (!known_service(rq->service)) {
        snprintf(err, errlen, "unknown service %s", rq->service);
        code = GRPC_STATUS_NOT_FOUND;
    } else {
        Grpc__Health__V1__HealthCheckResponse out = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        out.status = atomic_load(&s->serving)
                         ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                         : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
        c->resp = mg_grpc_pack(&out.base);
    }
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    return code;
}

static const handler_fn handlers[M_COUNT] = {
    [M_SEND_MESSAGE] = h_send_message,       [M_SEND_BATCH] = h_send_batch,
    [M_GET_PRESENCE] = h_get_presence,       [M_DISCONNECT] = h_disconnect,
    [M_DELIVER_MESSAGE] = h_deliver_message, [M_DISCONNECT_LOCAL] = h_disconnect_local,
    [M_DELIVER_BATCH] = h_deliver_batch,     [M_HEALTH_CHECK] = h_health_check,
};

/* ---- the call state machine ----------------------------------------------------------- */

static void rpc_free(struct rpc *c)
{
    mg_grpc_server *s = c->t->s;
    if (c->call)
        grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    if (c->req)
        grpc_byte_buffer_destroy(c->req);
    if (c->resp)
        grpc_byte_buffer_destroy(c->resp);
    grpc_slice_unref(c->status_details);
    free(c);
    pthread_mutex_lock(&s->mu);
    if (--s->live == 0)
        pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Puts one request_call slot on t's queue (unless shutting down). */
static void arm(struct cq_thread *t)
{
    mg_grpc_server *s = t->s;
    struct rpc *c = mg_new(struct rpc);
    c->t = t;
    c->state = RPC_REQUESTED;
    c->status_details = grpc_empty_slice();
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    pthread_mutex_lock(&s->mu);
    s->live++;
    grpc_call_error e = GRPC_CALL_ERROR;
    if (!s->stopping)
        e = grpc_server_request_call(s->server, &c->call, &c->details, &c->md, s->cq, s->cq, c);
    pthread_mutex_unlock(&s->mu);
    if (e != GRPC_CALL_OK)
        rpc_free(c);
}

static void start_recv(struct rpc *c)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->req;
    c->state = RPC_RECEIVED;
    if (grpc_call_start_batch(c->call, &op, 1, c, NULL) != GRPC_CALL_OK) {
        mg_log_error("grpc", "cannot start RECV_MESSAGE batch");
        rpc_free(c);
    }
}

static void finish(struct rpc *c, grpc_status_code code, const char *details)
{
    grpc_op ops[4];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (code == GRPC_STATUS_OK && c->resp) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->resp;
    }
    grpc_slice_unref(c->status_details);
    c->status_details = grpc_slice_from_copied_string(details ? details : "");
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n].data.send_status_from_server.status_details =
        (details && *details) ? &c->status_details : NULL;
    n++;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    c->code = code;
    c->state = RPC_FINISHING;
    if (grpc_call_start_batch(c->call, ops, n, c, NULL) != GRPC_CALL_OK) {
        mg_log_error("grpc", "cannot start the final batch");
        rpc_free(c);
    }
}

/* Runs the call's handler; answers unless the handler left it PENDING. */
static void run_handler(struct rpc *c)
{
    mg_grpc_server *s = c->t->s;
    char err[256] = "";
    size_t len;
    uint8_t *data = mg_grpc_buffer_read(c->req, &len);
    grpc_status_code code = handlers[c->method](s, c, data, len, err, sizeof(err));
    free(data);
    if (code != MG_GRPC_PENDING)
        answer(c, code, err);
}

static void handler_job(void *arg)
{
    run_handler(arg);
}

/* GetPresence and Disconnect wait for Redis and peers: not on these threads. */
static bool handler_blocks(mg_grpc_server *s, enum method m)
{
    return (m == M_GET_PRESENCE || m == M_DISCONNECT) && !mg_router_nonblocking(s->router);
}

static void handle(struct rpc *c)
{
    mg_grpc_server *s = c->t->s;
    char err[256] = "";
    grpc_status_code code;
    int64_t left = mg_grpc_deadline_left_ms(c->details.deadline);
    if (left > MG_GRPC_DEFAULT_DEADLINE_MS)
        left = MG_GRPC_DEFAULT_DEADLINE_MS;
    c->deadline_ms = mg_mono_ms() + left;

    if (c->method == M_UNKNOWN || !handlers[c->method]) {
        code = GRPC_STATUS_UNIMPLEMENTED;
        size_t n = GRPC_SLICE_LENGTH(c->details.method);
        snprintf(err, sizeof(err), "method %.*s is not implemented", (int)(n > 200 ? 200 : n),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
    } else if ((code = mg_grpc_auth_check(s->auth, c->call, c->details.method, &c->md, err,
                                          sizeof(err))) != GRPC_STATUS_OK) {
        /* refused before the request is looked at; err says why */
    } else if (left <= 0) {
        code = GRPC_STATUS_DEADLINE_EXCEEDED;
        snprintf(err, sizeof(err), "deadline expired before the call was handled");
    } else if (!c->req) {
        /* No message: the client half-closed without one, or the call was
         * cancelled (e.g. larger than the receive limit: core answered). */
        code = GRPC_STATUS_INVALID_ARGUMENT;
        snprintf(err, sizeof(err), "request message missing");
    } else if (!handler_blocks(s, c->method)) {
        run_handler(c);
        return;
    } else if (mg_pool_submit(s->pool, handler_job, c) == 0) {
        return;
    } else {
        code = overloaded(s, err, sizeof(err), false);
    }
    answer(c, code, err);
}

static void on_event(struct cq_thread *t, struct rpc *c, bool ok)
{
    mg_grpc_server *s = t->s;
    switch (c->state) {
    case RPC_REQUESTED:
        if (!ok) { /* the server is shutting down */
            rpc_free(c);
            return;
        }
        arm(t); /* keep the slot count */
        c->method = method_of(c->details.method);
        c->start_us = mg_mono_us();
        mg_metric_add(s->inflight, 1);
        start_recv(c);
        return;
    case RPC_RECEIVED:
        handle(c);
        return;
    case RPC_FINISHING:
        count_request(s, c->method, c->code, mg_mono_us() - c->start_us);
        mg_metric_add(s->inflight, -1);
        rpc_free(c);
        return;
    }
}

static void *cq_main(void *arg)
{
    struct cq_thread *t = arg;
    mg_grpc_server *s = t->s;
    char name[16];
    snprintf(name, sizeof(name), "grpc-%d", t->index);
    pthread_setname_np(pthread_self(), name);
    for (int i = 0; i < MG_GRPC_REQUESTS_PER_CQ; i++)
        arm(t);
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        if (ev.tag == &s->shutdown_tag) {
            pthread_mutex_lock(&s->mu);
            s->shutdown_done = true;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        on_event(t, ev.tag, ev.success != 0);
    }
    return NULL;
}

/* ---- lifecycle -------------------------------------------------------------------------- */

mg_grpc_server *mg_grpc_server_create(const mg_grpc_server_config *cfg, mg_router *router,
                                      mg_pool *pool, char *err, size_t errlen)
{
    if (!cfg || !router || !pool || !cfg->listen || !*cfg->listen) {
        snprintf(err, errlen, "grpc: listen address, router and pool are required");
        return NULL;
    }
    if (cfg->threads < 1 || cfg->threads > 256) {
        snprintf(err, errlen, "grpc: threads must be 1..256 (got %d)", cfg->threads);
        return NULL;
    }
    if (cfg->max_message_bytes < 64 || cfg->max_user_bytes < 1 || cfg->max_batch < 1) {
        snprintf(err, errlen,
                 "grpc: max message bytes (>= 64), max user bytes and max batch (>= 1) must be "
                 "set");
        return NULL;
    }
    grpc_init();
    mg_grpc_server *s = mg_new(mg_grpc_server);
    s->listen = mg_xstrdup(cfg->listen);
    s->gateway_id = mg_xstrdup(cfg->gateway_id ? cfg->gateway_id : "");
    s->region = mg_xstrdup(cfg->region ? cfg->region : "");
    s->nthreads = cfg->threads;
    s->max_message_bytes = cfg->max_message_bytes;
    s->lim.max_content_bytes = cfg->max_content_bytes;
    s->lim.max_user_bytes = cfg->max_user_bytes;
    s->lim.max_batch = cfg->max_batch;
    s->router = router;
    s->pool = pool;
    s->auth = cfg->auth;
    s->port = -1;
    atomic_init(&s->serving, true);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    for (int m = 0; m < M_COUNT; m++) {
        for (int k = 0; k < MG_GRPC_NCODES; k++)
            atomic_init(&s->requests[m][k], NULL);
        char labels[64];
        snprintf(labels, sizeof(labels), "method=\"%s\"", methods[m].label);
        s->latency[m] = mg_histogram("meshgate_grpc_request_duration_seconds",
                                     "gRPC call latency by method", labels);
    }
    s->dropped_overload =
        mg_counter("meshgate_dropped_total", "messages dropped, by reason", "reason=\"overload\"");
    s->inflight = mg_gauge("meshgate_grpc_inflight", "gRPC calls in progress", "");
    return s;
}

/* Why host:port cannot be bound, by trying it: a negative errno. */
static int probe_bind(const char *listen)
{
    char *host = NULL;
    int port = 0;
    if (mg_parse_hostport(listen, &host, &port) != 0)
        return -EINVAL;
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    char ps[16];
    snprintf(ps, sizeof(ps), "%d", port);
    int rc = getaddrinfo(*host ? host : NULL, ps, &hints, &ai);
    free(host);
    if (rc != 0)
        return -EADDRNOTAVAIL;
    int result = -EIO;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) != 0)
            result = -errno;
        close(fd);
        if (result != -EIO)
            break;
    }
    freeaddrinfo(ai);
    return result;
}

int mg_grpc_server_start(mg_grpc_server *s, char *err, size_t errlen)
{
    if (s->started) {
        snprintf(err, errlen, "grpc: already started");
        return -EALREADY;
    }
    grpc_arg args[2];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = s->max_message_bytes;
    /* No SO_REUSEPORT: a second gateway on the same port must fail, not share it. */
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_ALLOW_REUSEPORT;
    args[1].value.integer = 0;
    grpc_channel_args ca = {.num_args = 2, .args = args};

    s->server = grpc_server_create(&ca, NULL);
    s->threads = mg_xcalloc((size_t)s->nthreads, sizeof(*s->threads));
    for (int i = 0; i < s->nthreads; i++) {
        s->threads[i].s = s;
        s->threads[i].index = i;
    }
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    grpc_server_credentials *creds = mg_grpc_auth_server_credentials(s->auth);
    int port = grpc_server_add_http2_port(s->server, s->listen, creds);
    grpc_server_credentials_release(creds);
    if (port <= 0) {
        int rc = probe_bind(s->listen);
        if (rc == -EIO || rc == 0)
            rc = -EIO;
        snprintf(err, errlen, "gRPC listener %s: %s", s->listen, strerror(-rc));
        /* No listener was added, so the server may be destroyed unstarted. */
        grpc_server_destroy(s->server);
        s->server = NULL;
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(s->cq);
        s->cq = NULL;
        free(s->threads);
        s->threads = NULL;
        return rc;
    }
    s->port = port;
    grpc_server_start(s->server);
    s->started = true;
    for (int i = 0; i < s->nthreads; i++) {
        if (pthread_create(&s->threads[i].thread, NULL, cq_main, &s->threads[i]) != 0) {
            mg_log_error("grpc", "cannot start thread grpc-%d", i);
            continue;
        }
        s->threads[i].running = true;
    }
    mg_log_info("grpc", "listening addr=%s port=%d threads=%d max_message_bytes=%d", s->listen,
                port, s->nthreads, s->max_message_bytes);
    return 0;
}

int mg_grpc_server_port(const mg_grpc_server *s)
{
    return s ? s->port : -1;
}

void mg_grpc_server_set_serving(mg_grpc_server *s, bool serving)
{
    if (!s)
        return;
    bool was = atomic_exchange(&s->serving, serving);
    if (was != serving)
        mg_log_info("grpc", "health status=%s", serving ? "SERVING" : "NOT_SERVING");
}

/* Waits for the shutdown tag until deadline (monotonic ms; < 0: forever). */
static bool wait_shutdown(mg_grpc_server *s, int64_t deadline_ms)
{
    pthread_mutex_lock(&s->mu);
    while (!s->shutdown_done) {
        if (deadline_ms < 0) {
            pthread_cond_wait(&s->cv, &s->mu);
            continue;
        }
        int64_t left = deadline_ms - mg_mono_ms();
        if (left <= 0)
            break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += left / 1000;
        ts.tv_nsec += (left % 1000) * 1000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    bool done = s->shutdown_done;
    pthread_mutex_unlock(&s->mu);
    return done;
}

void mg_grpc_server_shutdown(mg_grpc_server *s, int grace_ms)
{
    if (!s || !s->started || s->stopped)
        return;
    s->stopped = true;
    mg_grpc_server_set_serving(s, false);
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    pthread_mutex_unlock(&s->mu);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
    if (!wait_shutdown(s, mg_mono_ms() + (grace_ms > 0 ? grace_ms : 0))) {
        mg_log_info("grpc", "grace of %d ms over: cancelling calls in flight", grace_ms);
        grpc_server_cancel_all_calls(s->server);
        /* Handlers are bounded by their deadlines, so this ends. */
        wait_shutdown(s, -1);
    }
    /* A handler may still run after the server is down (its call was
     * cancelled); it starts its final batch on the queue, so the queue stays
     * open until every call is freed. */
    pthread_mutex_lock(&s->mu);
    while (s->live > 0)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    grpc_completion_queue_shutdown(s->cq);
    for (int i = 0; i < s->nthreads; i++)
        if (s->threads[i].running)
            pthread_join(s->threads[i].thread, NULL);
    grpc_server_destroy(s->server);
    s->server = NULL;
    grpc_completion_queue_destroy(s->cq);
    s->cq = NULL;
    mg_log_info("grpc", "stopped");
}

void mg_grpc_server_free(mg_grpc_server *s)
{
    if (!s)
        return;
    mg_grpc_server_shutdown(s, 0);
    free(s->threads);
    free(s->listen);
    free(s->gateway_id);
    free(s->region);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
    grpc_shutdown();
}
