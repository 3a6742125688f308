/* grpc_server.c: the gRPC engine on gRPC C core (see grpc_server.h): the
 * listener, the completion queue and its threads, the call state machine.
 * The services it serves are in grpc_services.c (contract: grpc_call.h).
 *
 * DESIGN
 * Threads: cfg->threads threads "grpc-<i>" all poll one completion queue
 * (gRPC core binds every call of a connection to one queue, so a queue per
 * thread would serialize a client's calls on one thread). Each thread
 * arms MG_GRPC_REQUESTS_PER_CQ generic request_call slots, and as many for
 * each registered method (SendMessage and the GatewayPeer deliveries: the
 * calls made per message, whose request arrives with the call), so new
 * calls are matched while others run; a slot is re-armed as soon as it is
 * matched. A call is a small state machine driven by its completion-queue
 * events, each state one batch: REQUESTED -> (RECV_MESSAGE, generic calls
 * only) -> RECEIVED -> auth
 * check, handler -> (SEND_INITIAL_METADATA + SEND_MESSAGE + SEND_STATUS +
 * RECV_CLOSE, started by mg_grpc_answer from whichever thread completed the
 * call's work: grpc_call_start_batch may be called from any thread) ->
 * FINISHING -> call unref'd and freed. Handlers never block these threads
 * (those that wait on Redis or peers run as worker pool jobs), so calls in
 * flight are bounded by the router's --max-inflight-sends, not by threads.
 * Deadlines: the client's deadline becomes a monotonic ms deadline for the
 * router, capped at cfg->max_deadline_ms (also for none). gRPC core itself ends a
 * call whose deadline passes (the client sees DEADLINE_EXCEEDED).
 * Shutdown: shutdown_and_notify, then cancel_all_calls after the grace,
 * then each queue is shut down and drained by its thread, which exits.
 */
#include "gateway/grpc_call.h"
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
#include <grpc/support/alloc.h>
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

#define MG_GRPC_REQUESTS_PER_CQ 16

const struct mg_grpc_method mg_grpc_methods[M_COUNT] = {
    [M_SEND_MESSAGE] = {"/meshgate.v1.Messaging/SendMessage", "SendMessage"},
    [M_SEND_BATCH] = {"/meshgate.v1.Messaging/SendBatch", "SendBatch"},
    [M_GET_PRESENCE] = {"/meshgate.v1.Messaging/GetPresence", "GetPresence"},
    [M_DISCONNECT] = {"/meshgate.v1.Messaging/Disconnect", "Disconnect"},
    [M_DELIVER_MESSAGE] = {"/meshgate.v1.GatewayPeer/DeliverMessage", "DeliverMessage"},
    [M_DISCONNECT_LOCAL] = {"/meshgate.v1.GatewayPeer/DisconnectLocal", "DisconnectLocal"},
    [M_DELIVER_BATCH] = {"/meshgate.v1.GatewayPeer/DeliverBatch", "DeliverBatch"},
    [M_DELIVER_MANY] = {"/meshgate.v1.GatewayPeer/DeliverMany", "DeliverMany"},
    [M_HEALTH_CHECK] = {"/grpc.health.v1.Health/Check", "HealthCheck"},
    [M_HEALTH_WATCH] = {"/grpc.health.v1.Health/Watch", "HealthWatch"},
    [M_SEND_STREAM] = {"/meshgate.v1.Messaging/SendStream", "SendStream"},
    [M_UNKNOWN] = {NULL, "unknown"},
};

/* ---- metrics ------------------------------------------------------------------ */

static void count_request(mg_grpc_server *s, enum method m, grpc_status_code code, int64_t micros)
{
    int ci = ((int)code >= 0 && (int)code < MG_GRPC_NCODES) ? (int)code : GRPC_STATUS_UNKNOWN;
    mg_metric *ctr = atomic_load(&s->requests[m][ci]);
    if (!ctr) {
        char labels[128];
        snprintf(labels, sizeof(labels), "method=\"%s\",code=\"%s\"", mg_grpc_methods[m].label,
                 mg_grpc_code_name((grpc_status_code)ci));
        ctr = mg_counter("meshgate_grpc_requests_total", "gRPC calls by method and status code",
                         labels);
        atomic_store(&s->requests[m][ci], ctr);
    }
    mg_metric_add(ctr, 1);
    mg_histogram_observe_us(s->latency[m], micros);
}

static enum method method_of(grpc_slice path)
{
    size_t n = GRPC_SLICE_LENGTH(path);
    const char *p = (const char *)GRPC_SLICE_START_PTR(path);
    for (int m = 0; m < M_UNKNOWN; m++)
        if (strlen(mg_grpc_methods[m].path) == n && memcmp(mg_grpc_methods[m].path, p, n) == 0)
            return (enum method)m;
    return M_UNKNOWN;
}

/* The gRPC status for a negative errno from the router or a store. */

static void finish(struct rpc *c, grpc_status_code code, const char *details);

/* Ends the call with code (logged when it is a server-side failure). Any thread. */
void mg_grpc_answer(struct rpc *c, grpc_status_code code, const char *err)
{
    if (c->span) {
        mg_span_attr_int(c->span, "rpc.grpc.status_code", code);
        mg_span_end(c->span, code != GRPC_STATUS_OK, err);
        c->span = NULL;
    }
    if (code != GRPC_STATUS_OK && code != GRPC_STATUS_NOT_FOUND &&
        code != GRPC_STATUS_INVALID_ARGUMENT && code != GRPC_STATUS_UNIMPLEMENTED)
        mg_log_warn("grpc", "call failed method=%s code=%s details=\"%s\"",
                    mg_grpc_methods[c->method].label, mg_grpc_code_name(code), err ? err : "");
    finish(c, code, err);
}

/* ---- the call state machine ----------------------------------------------------------- */

void mg_grpc_rpc_free(struct rpc *c)
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

/* A call ended (its final batch completed): counted, then freed. */
void mg_grpc_rpc_done(struct rpc *c)
{
    mg_grpc_server *s = c->t->s;
    count_request(s, c->method, c->code, mg_mono_us() - c->start_us);
    mg_metric_add(s->inflight, -1);
    mg_grpc_rpc_free(c);
}

/* The unary methods a service calls per message: registered, so a call
 * arrives with its request (one completion-queue event and one batch per
 * call fewer than a generic call's separate RECV_MESSAGE). */
static bool registers(enum method m)
{
    return m == M_SEND_MESSAGE || m == M_DELIVER_MESSAGE || m == M_DELIVER_BATCH ||
           m == M_DELIVER_MANY;
}

/* Puts one request slot on t's queue (unless shutting down): for method m
 * when it is registered, else (m == M_UNKNOWN) for any other method. */
static void arm(struct cq_thread *t, enum method m)
{
    mg_grpc_server *s = t->s;
    struct rpc *c = mg_new(struct rpc);
    c->t = t;
    c->state = RPC_REQUESTED;
    c->status_details = grpc_empty_slice();
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    if (m != M_UNKNOWN) {
        c->method = m;
        c->registered = true;
        c->details.method = grpc_slice_from_static_string(mg_grpc_methods[m].path);
    }
    pthread_mutex_lock(&s->mu);
    s->live++;
    grpc_call_error e = GRPC_CALL_ERROR;
    if (!s->stopping && c->registered)
        e = grpc_server_request_registered_call(s->server, s->registered[m], &c->call,
                                                &c->details.deadline, &c->md, &c->req, s->cq, s->cq,
                                                c);
    else if (!s->stopping)
        e = grpc_server_request_call(s->server, &c->call, &c->details, &c->md, s->cq, s->cq, c);
    pthread_mutex_unlock(&s->mu);
    if (e != GRPC_CALL_OK)
        mg_grpc_rpc_free(c);
}

/* Every slot kind of a thread, n of each. */
static void arm_all(struct cq_thread *t, int n)
{
    for (int m = 0; m < M_COUNT; m++)
        if (m == M_UNKNOWN || t->s->registered[m])
            for (int i = 0; i < n; i++)
                arm(t, (enum method)m);
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
        mg_grpc_rpc_free(c);
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
        mg_grpc_rpc_free(c);
    }
}

/* Runs the call's handler; answers unless the handler left it PENDING. */
static void run_handler(struct rpc *c)
{
    mg_grpc_server *s = c->t->s;
    char err[256] = "";
    mg_grpc_view req; /* the request's bytes where they arrived: no copy */
    mg_grpc_view_init(&req, c->req);
    grpc_status_code code = mg_grpc_handlers[c->method](s, c, req.data, req.len, err, sizeof(err));
    mg_grpc_view_release(&req);
    if (code != MG_GRPC_PENDING)
        mg_grpc_answer(c, code, err);
}

static void handler_job(void *arg)
{
    run_handler(arg);
}

/* The server span of a send or a peer delivery: a Messaging call continues
 * its `traceparent` metadata or starts a trace by the sampling ratio; a
 * GatewayPeer call only continues the sender gateway's. */
void mg_grpc_trace_metadata(const grpc_metadata_array *md, mg_trace_ctx *out)
{
    memset(out, 0, sizeof(*out));
    for (size_t i = 0; i < md->count; i++)
        if (grpc_slice_str_cmp(md->metadata[i].key, "traceparent") == 0) {
            grpc_slice v = md->metadata[i].value;
            mg_traceparent_parse((const char *)GRPC_SLICE_START_PTR(v), GRPC_SLICE_LENGTH(v), out);
            return;
        }
}

static void trace_call(mg_grpc_server *s, struct rpc *c)
{
    mg_trace_ctx in;
    mg_grpc_trace_metadata(&c->md, &in);
    if (c->method == M_SEND_MESSAGE || c->method == M_SEND_BATCH)
        mg_trace_begin(&in); /* else a sampled new trace, by the ratio */
    const char *path = mg_grpc_methods[c->method].path;
    c->span = mg_span_start(&in, path + 1, MG_SPAN_SERVER, &c->trace);
    if (!c->span)
        return;
    const char *slash = strrchr(path, '/');
    char service[64];
    snprintf(service, sizeof(service), "%.*s", (int)(slash - path - 1), path + 1);
    mg_span_attr(c->span, "rpc.system", "grpc");
    mg_span_attr(c->span, "rpc.service", service);
    mg_span_attr(c->span, "rpc.method", slash + 1);
    char *peer = grpc_call_get_peer(c->call); /* "ipv4:127.0.0.1:5678" */
    const char *addr = peer && strchr(peer, ':') ? strchr(peer, ':') + 1 : peer;
    mg_span_attr_peer(c->span, addr);
    gpr_free(peer);
    mg_span_attr(c->span, "meshgate.gateway", s->gateway_id);
}

static void handle(struct rpc *c)
{
    mg_grpc_server *s = c->t->s;
    char err[256] = "";
    grpc_status_code code;
    int64_t left = mg_grpc_deadline_left_ms(c->details.deadline);
    if (left > s->max_deadline_ms)
        left = s->max_deadline_ms;
    c->deadline_ms = mg_mono_ms() + left;

    if (c->method == M_UNKNOWN || !mg_grpc_handlers[c->method]) {
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
    } else if (!mg_grpc_handler_blocks(s, c->method)) {
        if (c->method == M_SEND_MESSAGE || c->method == M_SEND_BATCH ||
            c->method == M_DELIVER_MESSAGE || c->method == M_DELIVER_BATCH)
            trace_call(s, c);
        run_handler(c);
        return;
    } else if (mg_pool_submit(s->pool, handler_job, c) == 0) {
        return;
    } else {
        code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        snprintf(err, sizeof(err), "gateway overloaded: worker queue full");
    }
    mg_grpc_answer(c, code, err);
}

static void on_event(struct cq_thread *t, void *tag, bool ok)
{
    mg_grpc_server *s = t->s;
    struct rpc *c = tag;
    switch (*(enum rpc_state *)tag) {
    case RPC_REQUESTED:
        if (!ok) { /* the server is shutting down */
            mg_grpc_rpc_free(c);
            return;
        }
        arm(t, c->registered ? c->method : M_UNKNOWN); /* keep the slot count */
        if (!c->registered)
            c->method = method_of(c->details.method);
        c->start_us = mg_mono_us();
        mg_metric_add(s->inflight, 1);
        if (c->registered)
            handle(c); /* the request came with the call */
        else if (c->method == M_SEND_STREAM)
            mg_grpc_stream_begin(c); /* many messages: the stream receives them */
        else
            start_recv(c);
        return;
    case RPC_RECEIVED:
        handle(c);
        return;
    case RPC_FINISHING:
        mg_grpc_rpc_done(c);
        return;
    case RPC_STREAM_OP:
        mg_grpc_stream_event(tag, ok);
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
    arm_all(t, MG_GRPC_REQUESTS_PER_CQ);
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
    if (cfg->max_deadline_ms < 1 || cfg->low_deadline_ms < 1) {
        snprintf(err, errlen, "grpc: max and LOW deadlines must be set (> 0 ms)");
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
    s->max_deadline_ms = cfg->max_deadline_ms;
    s->low_deadline_ms = cfg->low_deadline_ms;
    s->auth = cfg->auth;
    s->port = -1;
    atomic_init(&s->serving, true);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    for (int m = 0; m < M_COUNT; m++) {
        for (int k = 0; k < MG_GRPC_NCODES; k++)
            atomic_init(&s->requests[m][k], NULL);
        char labels[64];
        snprintf(labels, sizeof(labels), "method=\"%s\"", mg_grpc_methods[m].label);
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
    for (int m = 0; m < M_COUNT; m++)
        if (registers((enum method)m))
            s->registered[m] =
                grpc_server_register_method(s->server, mg_grpc_methods[m].path, NULL,
                                            GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
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
