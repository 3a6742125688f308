/* grpc_call.h: what the gRPC engine (grpc_server.c: completion queue,
 * call state machine, lifecycle) and the services (grpc_services.c:
 * Messaging, GatewayPeer, Health) share. Internal to src/gateway.
 *
 * A handler runs on a grpc-<i> thread (or a worker job, when
 * mg_grpc_handler_blocks says it waits on Redis or peers), decodes its
 * request and either answers at once (returns a status; c->resp holds the
 * response on OK) or returns MG_GRPC_PENDING after starting work whose
 * completion calls mg_grpc_answer from any thread, exactly once.
 */
#ifndef MG_GRPC_CALL_H
#define MG_GRPC_CALL_H

#include "common/mg_metrics.h"
#include "common/mg_pool.h"
#include "common/mg_trace.h"
#include "gateway/grpc_auth.h"
#include "gateway/grpc_server.h"
#include "router/msg.h"

#include "meshgate/v1/message.pb-c.h"

#include <grpc/grpc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum method {
    M_SEND_MESSAGE,
    M_SEND_BATCH,
    M_GET_PRESENCE,
    M_DISCONNECT,
    M_DELIVER_MESSAGE,
    M_DISCONNECT_LOCAL,
    M_DELIVER_BATCH,
    M_DELIVER_MANY,
    M_HEALTH_CHECK,
    M_HEALTH_WATCH,
    M_SEND_STREAM,
    M_UNKNOWN,
    M_COUNT
};

/* A method's :path and metric label (grpc_server.c). */
struct mg_grpc_method {
    const char *path;
    const char *label;
};
extern const struct mg_grpc_method mg_grpc_methods[M_COUNT];

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
    int max_deadline_ms, low_deadline_ms;

    grpc_server *server;
    void *registered[M_COUNT]; /* methods whose request comes with the call (NULL: generic) */
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

/* What a completion-queue tag is: every tag starts with its state, so the
 * queue's threads dispatch on it (a struct rpc, or one of a stream's ops). */
enum rpc_state { RPC_REQUESTED, RPC_RECEIVED, RPC_FINISHING, RPC_STREAM_OP };

/* One call, from request_call to its final batch. */
struct rpc {
    enum rpc_state state; /* first: the tag's kind */
    struct cq_thread *t;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *req;
    grpc_byte_buffer *resp;
    grpc_slice status_details;
    int cancelled;
    enum method method;
    bool registered; /* a registered method's slot: method known, request in req */
    grpc_status_code code;
    int64_t start_us;
    int64_t deadline_ms; /* monotonic */
    mg_trace_ctx trace;  /* the call's server span (what its messages carry), or none */
    mg_span *span;       /* ended by mg_grpc_answer; NULL: not traced */
};

/* A handler fills c->resp (on OK) and returns the status; err gets details.
 * MG_GRPC_PENDING: the handler started work whose completion answers the
 * call with answer(). */
#define MG_GRPC_PENDING ((grpc_status_code)-1)
typedef grpc_status_code (*handler_fn)(mg_grpc_server *s, struct rpc *c, const uint8_t *req,
                                       size_t len, char *err, size_t errlen);

/* The services' handlers by method (grpc_services.c); NULL: unimplemented. */
extern const handler_fn mg_grpc_handlers[M_COUNT];
/* Whether m's handler waits on Redis or peers (it then runs as a pool job). */
bool mg_grpc_handler_blocks(mg_grpc_server *s, enum method m);
/* Ends the call: status code, details err (logged when it is a server-side
 * failure), c->resp as the response on OK. Any thread; exactly once. */
void mg_grpc_answer(struct rpc *c, grpc_status_code code, const char *err);
/* Frees a call that never started (no request arrived). */
void mg_grpc_rpc_free(struct rpc *c);
/* A started call ended (its final batch completed, c->code set): counted
 * in the metrics, then freed. */
void mg_grpc_rpc_done(struct rpc *c);

/* The SendStream call (grpc_stream.c). begin takes over c once its request
 * arrived (instead of a RECV_MESSAGE): from then on the stream's own tags
 * (state RPC_STREAM_OP) come back through mg_grpc_stream_event, and the
 * stream frees c when its last operation ended. */
void mg_grpc_stream_begin(struct rpc *c);
/* The call's `traceparent` metadata in *out (zeroed when absent or invalid). */
void mg_grpc_trace_metadata(const grpc_metadata_array *md, mg_trace_ctx *out);
void mg_grpc_stream_event(void *tag, bool ok);

/* Shared by the services (grpc_services.c): a Message checked and turned
 * into an mg_msg (NULL with err filled when invalid), and a router result
 * as a RecipientResult (paths must hold MG_PATH_COUNT). */
mg_msg *mg_grpc_msg_from_pb(const struct limits *lim, const Meshgate__V1__Message *pb, bool need_to,
                            char *err, size_t errlen);
void mg_grpc_result_to_pb(const char *user, const mg_send_result *res,
                          Meshgate__V1__RecipientResult *out, Meshgate__V1__Path *paths);

#endif
