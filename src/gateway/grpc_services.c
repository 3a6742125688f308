/* grpc_services.c: the Messaging, GatewayPeer and Health services on the
 * gRPC engine (grpc_call.h), and the conversions between their protobuf
 * messages and the router's (message validation included).
 *
 * DESIGN
 * Handlers never block on a message: a send starts a router operation and
 * returns MG_GRPC_PENDING; the operation's callback (on whichever thread
 * completed it) packs the response and calls mg_grpc_answer. A LOW send is
 * answered ACCEPTED at once and its operation runs on. SendBatch answers
 * when the last recipient's result is in; DeliverMessage and DeliverBatch
 * when the frames were written (DELIVERED means written, hub.h). GetPresence
 * and Disconnect wait on Redis and peers: mg_grpc_handler_blocks sends them
 * to the worker pool, which answers the same way.
 */
#include "gateway/grpc_call.h"
#include "common/mg_alloc.h"
#include "common/mg_pbarena.h"
#include "common/mg_grpc.h"
#include "common/mg_id.h"
#include "common/mg_log.h"
#include "common/mg_pbwire.h"
#include "common/mg_time.h"
#include "gateway/ws_proto.h"

#include "grpc/health/v1/health.pb-c.h"
#include "meshgate/v1/messaging.pb-c.h"
#include "meshgate/v1/peer.pb-c.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MG_GRPC_MAX_ID_BYTES       128
#define MG_GRPC_MAX_TYPE_BYTES     128
#define MG_GRPC_MAX_REASON_BYTES   123 /* WebSocket close reason limit */
#define MG_GRPC_DEFAULT_CLOSE_CODE 4001

/* ---- conversions and validation ------------------------------------------------ */

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
mg_msg *mg_grpc_msg_from_pb(const struct limits *lim, const Meshgate__V1__Message *pb, bool need_to,
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
void mg_grpc_result_to_pb(const char *user, const mg_send_result *res,
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
    char *id, *to; /* in buf */
    char buf[];
};

static void send_done(void *arg, const mg_send_result *res)
{
    struct send_ctx *x = arg;
    Meshgate__V1__SendMessageResponse out = MESHGATE__V1__SEND_MESSAGE_RESPONSE__INIT;
    Meshgate__V1__RecipientResult rr;
    Meshgate__V1__Path paths[MG_PATH_COUNT];
    mg_grpc_result_to_pb(x->to, res, &rr, paths);
    out.id = x->id;
    out.result = &rr;
    mg_span_attr(x->c->span, "meshgate.status", mg_status_name(res->status));
    mg_span_attr(x->c->span, "meshgate.path", mg_path_name(res->path));
    x->c->resp = mg_grpc_pack(&out.base);
    mg_grpc_answer(x->c, GRPC_STATUS_OK, NULL);
    free(x);
}

static grpc_status_code h_send_message(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                       size_t len, char *err, size_t errlen)
{
    mg_pb_arena ar; /* decoded on the stack: the message copies what it keeps */
    ProtobufCAllocator *pa = mg_pb_arena_init(&ar);
    Meshgate__V1__SendMessageRequest *rq =
        meshgate__v1__send_message_request__unpack(pa, len, req ? req : (const uint8_t *)"");
    if (!rq) {
        snprintf(err, errlen, "request does not decode as %s",
                 meshgate__v1__send_message_request__descriptor.name);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    mg_msg *msg = mg_grpc_msg_from_pb(&s->lim, rq->message, true, err, errlen);
    protobuf_c_message_free_unpacked(&rq->base, pa);
    if (!msg)
        return GRPC_STATUS_INVALID_ARGUMENT;
    msg->trace = c->trace;
    grpc_status_code code = MG_GRPC_PENDING;
    bool low = msg->priority == MG_PRIO_LOW;
    struct send_ctx *x = NULL;
    int rc;
    if (low) {
        rc = mg_router_send(s->router, msg, mg_mono_ms() + s->low_deadline_ms, low_done, NULL);
    } else {
        size_t il = strlen(msg->id) + 1, tl = strlen(msg->to) + 1;
        x = mg_xmalloc(sizeof(*x) + il + tl);
        x->c = c;
        x->id = memcpy(x->buf, msg->id, il);
        x->to = memcpy(x->buf + il, msg->to, tl);
        rc = mg_router_send_msg(s->router, msg, c->deadline_ms, send_done, x);
        msg = NULL; /* the router's now */
    }
    if (rc < 0) {
        code = overloaded(s, err, errlen, low);
        free(x);
    } else if (low) {
        mg_send_result res;
        accepted(&res);
        Meshgate__V1__SendMessageResponse out = MESHGATE__V1__SEND_MESSAGE_RESPONSE__INIT;
        Meshgate__V1__RecipientResult rr;
        Meshgate__V1__Path paths[MG_PATH_COUNT];
        mg_grpc_result_to_pb(msg->to, &res, &rr, paths);
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

/* The call's span: the worst status (of the recipient that did least well,
 * ranked as a recipient's attempts are), the recipients and how many were
 * delivered (written to a device). */
static void batch_trace(struct batch_ctx *x)
{
    if (!x->c->span)
        return;
    size_t n = x->rq->n_to, delivered = 0;
    mg_status worst = MG_STATUS_DELIVERED;
    for (size_t i = 0; i < n; i++) {
        delivered += x->res[i].status == MG_STATUS_DELIVERED;
        if (mg_status_rank(x->res[i].status) < mg_status_rank(worst))
            worst = x->res[i].status;
    }
    mg_span_attr(x->c->span, "meshgate.status", mg_status_name(worst));
    mg_span_attr_int(x->c->span, "meshgate.recipients", (int64_t)n);
    mg_span_attr_int(x->c->span, "meshgate.delivered", (int64_t)delivered);
}

static void batch_respond(struct batch_ctx *x)
{
    batch_trace(x);
    size_t n = x->rq->n_to;
    Meshgate__V1__SendBatchResponse out = MESHGATE__V1__SEND_BATCH_RESPONSE__INIT;
    Meshgate__V1__RecipientResult *rr = mg_xcalloc(n, sizeof(*rr));
    Meshgate__V1__RecipientResult **rrp = mg_xcalloc(n, sizeof(*rrp));
    Meshgate__V1__Path *paths = mg_xcalloc(n * MG_PATH_COUNT, sizeof(*paths));
    for (size_t i = 0; i < n; i++) {
        mg_grpc_result_to_pb(x->rq->to[i], &x->res[i], &rr[i], &paths[i * MG_PATH_COUNT]);
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
    mg_grpc_answer(x->c, GRPC_STATUS_OK, NULL);
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
                          s->lim.max_batch + 1, &nto) != 0) {
        snprintf(err, errlen, "malformed SendBatchRequest");
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (nto > s->lim.max_batch) {
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
    mg_msg *msg = mg_grpc_msg_from_pb(&s->lim, rq->message, false, err, errlen);
    if (!msg) {
        protobuf_c_message_free_unpacked(&rq->base, NULL);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    msg->trace = c->trace;
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
        if (mg_router_send_batch(s->router, msg, valid, nvalid, mg_mono_ms() + s->low_deadline_ms,
                                 low_batch_done, NULL) < 0)
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
    mg_grpc_answer(c, GRPC_STATUS_OK, NULL);
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
    msg = mg_grpc_msg_from_pb(&s->lim, rq->message, true, err, errlen);
    if (!msg) {
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    msg->trace = c->trace;
    msg->inbox = rq->inbox;
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
    mg_grpc_answer(b->c, GRPC_STATUS_OK, NULL);
    free(rp);
    free(b->res);
    free(b);
}

static void dbatch_fill(struct dbatch *b, size_t i, const mg_deliver_outcome *o)
{
    Meshgate__V1__DeliverMessageResponse *r = &b->res[i];
    r->status = o->status == MG_STATUS_DELIVERED
                    ? MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED
                    : MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED;
    r->connections = o->connections;
    r->duplicate = o->duplicate;
}

static void dbatch_done(void *arg, const mg_deliver_outcome *o)
{
    struct dbatch_slot *sl = arg;
    dbatch_fill(sl->b, sl->i, o);
    dbatch_settle(sl->b);
}

static void dbatch_many_done(void *arg, const mg_deliver_outcome *out, size_t n)
{
    struct dbatch *b = arg;
    for (size_t i = 0; i < n && i < b->n; i++)
        dbatch_fill(b, i, &out[i]);
    dbatch_settle(b);
}

/* n results, each NOT_CONNECTED until its delivery reports; settled n + 1
 * times (the last by the handler that fills it). */
static struct dbatch *dbatch_new(struct rpc *c, size_t n)
{
    struct dbatch *b = mg_xcalloc(1, sizeof(*b) + n * sizeof(b->slots[0]));
    b->c = c;
    b->n = n;
    b->res = mg_xcalloc(n, sizeof(*b->res));
    atomic_init(&b->left, n + 1); /* + the handler's guard */
    for (size_t i = 0; i < n; i++) {
        meshgate__v1__deliver_message_response__init(&b->res[i]);
        b->slots[i] = (struct dbatch_slot){b, i};
    }
    return b;
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
    msg = mg_grpc_msg_from_pb(&s->lim, rq->message, false, err, errlen);
    if (!msg) {
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    msg->trace = c->trace;
    /* one hub call for the lot: settled by its report and the handler */
    struct dbatch *b = dbatch_new(c, rq->n_to);
    atomic_store(&b->left, 2);
    if (mg_router_deliver_local_many(s->router, msg, (const char *const *)rq->to, b->n,
                                     dbatch_many_done, b) != 0) {
        for (size_t i = 0; i < b->n; i++)
            b->res[i].status = MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED;
        dbatch_settle(b);
    }
    dbatch_settle(b);
out:
    mg_msg_free(msg);
    protobuf_c_message_free_unpacked(&rq->base, NULL);
    return code;
}

/* A DeliverMany: one local delivery per message, answered like a
 * DeliverBatch. Every message is checked before any is delivered, so a bad
 * one fails the call as a whole (the sender then falls back for all). */
static grpc_status_code h_deliver_many(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                       size_t len, char *err, size_t errlen)
{
    mg_pb_block blk; /* hundreds of messages: one block, not a malloc per field */
    ProtobufCAllocator *pa = mg_pb_block_init(&blk, len);
    Meshgate__V1__DeliverManyRequest *rq =
        (Meshgate__V1__DeliverManyRequest *)protobuf_c_message_unpack(
            &meshgate__v1__deliver_many_request__descriptor, pa, len, req ? req : (uint8_t *)"");
    if (!rq) {
        mg_pb_block_done(&blk);
        snprintf(err, errlen, "request does not decode as %s",
                 meshgate__v1__deliver_many_request__descriptor.name);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    grpc_status_code code = MG_GRPC_PENDING;
    size_t n = rq->n_deliveries;
    mg_msg **msgs = NULL;
    if (n == 0 || n > s->lim.max_batch) {
        snprintf(err, errlen, "deliveries: %zu, want 1..%zu", n, s->lim.max_batch);
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    msgs = mg_xcalloc(n, sizeof(*msgs));
    for (size_t i = 0; i < n; i++) {
        const Meshgate__V1__Message *m = rq->deliveries[i]->message;
        char why[192];
        if (m && (!m->id || !*m->id))
            snprintf(why, sizeof(why), "message.id is required on the peer path");
        else if ((msgs[i] = mg_grpc_msg_from_pb(&s->lim, m, true, why, sizeof(why))) != NULL) {
            if (m->traceparent && m->traceparent[0]) /* each message's own trace */
                mg_traceparent_parse(m->traceparent, strlen(m->traceparent), &msgs[i]->trace);
            msgs[i]->inbox = rq->deliveries[i]->inbox;
            continue;
        }
        snprintf(err, errlen, "deliveries[%zu]: %s", i, why);
        code = GRPC_STATUS_INVALID_ARGUMENT;
        goto out;
    }
    struct dbatch *b = dbatch_new(c, n);
    for (size_t i = 0; i < n; i++)
        if (mg_router_deliver_local(s->router, msgs[i], dbatch_done, &b->slots[i]) != 0) {
            b->res[i].status = MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED;
            dbatch_settle(b);
        }
    dbatch_settle(b);
out:
    for (size_t i = 0; msgs && i < n; i++)
        mg_msg_free(msgs[i]);
    free(msgs);
    protobuf_c_message_free_unpacked(&rq->base, pa);
    mg_pb_block_done(&blk);
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

const handler_fn mg_grpc_handlers[M_COUNT] = {
    [M_SEND_MESSAGE] = h_send_message,       [M_SEND_BATCH] = h_send_batch,
    [M_GET_PRESENCE] = h_get_presence,       [M_DISCONNECT] = h_disconnect,
    [M_DELIVER_MESSAGE] = h_deliver_message, [M_DISCONNECT_LOCAL] = h_disconnect_local,
    [M_DELIVER_BATCH] = h_deliver_batch,     [M_HEALTH_CHECK] = h_health_check,
    [M_DELIVER_MANY] = h_deliver_many,
};

/* GetPresence and Disconnect wait for Redis and peers: not on these threads. */
bool mg_grpc_handler_blocks(mg_grpc_server *s, enum method m)
{
    return (m == M_GET_PRESENCE || m == M_DISCONNECT) && !mg_router_nonblocking(s->router);
}
