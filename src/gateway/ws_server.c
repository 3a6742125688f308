/* ws_server.c: the WebSocket front end and the HTTP endpoints (see ws_server.h).
 *
 * Owns the service loops (--ws-threads; each its listener, lws context,
 * libev loop and thread "ws-<i>"), the hub (hub.h, a shard per loop), the
 * JWT verifier and the limits. A loop runs every lws callback of the
 * connections it accepted: upgrades and auth, frame parsing, writes, closes
 * and the small HTTP endpoints; nothing of one connection ever runs on
 * another loop. "This thread" below is the connection's loop.
 *
 * DESIGN
 * - Loops: N SO_REUSEPORT listeners (open_listener), one per loop; the
 *   kernel spreads connections over them and lws adopts each accepted
 *   socket into that loop's context. Shared between loops: the hub (its
 *   shards lock, see hub.c), the connection count (the global cap), the
 *   per-address counts (ws_limits.c, locked), metrics (atomic: summed), the
 *   ticket mutex and the options. Per loop: the ping wheel, the upgrade
 *   stash, the handshake table, the write-wait timer, the write buffers.
 *   Any loop answers the HTTP endpoints; a drain's 1012 closes go through
 *   the hub to every loop; the stop ends every loop, then destroys each
 *   context on the control thread.
 * - Order across loops: a connection's sends are chained (below) and each
 *   delivery is queued to every recipient connection, on whatever loop,
 *   before its order counts as fixed; so each of them sees one sender's
 *   messages in order.
 * - Nothing blocks a loop: a client "send" is parsed here and started as a
 *   router operation (mg_router_send_handed returns at once). One
 *   connection's sends are chained: operation k+1 starts when k's order is
 *   fixed (the router's handed callback: k was queued to the local
 *   connections, produced to Kafka, published to NATS or queued for
 *   SPUBLISH; for gRPC direct, a fallback or the inbox, when k answered),
 *   from whichever thread said so, so the order guarantees hold without a
 *   thread per connection while sends on the buses overlap. Each answer
 *   posts its own ack back through the hub by connection id (acks may come
 *   in any order; the connection may be gone by then, and the hub then drops
 *   it). A LOW send is acked "accepted" at once and chained like the others.
 *   Beyond MAX_CHAINED sends waiting or in flight on one connection, or when
 *   the router is at its bound, the ack is {status:failed,
 *   reason:overloaded}.
 * - Presence changes and inbox acks block on the stores: they are worker
 *   pool jobs keyed by the connection (in order), or run here when the
 *   stores are in memory. The connect job ends with the client's "ready"
 *   frame (ws_proto.h), queued behind the inbox's first page: the 101
 *   comes before presence has the connection, the ready frame after; live
 *   messages that reach the connection before it are held behind it.
 * - Deliveries waiting for their writes (hub.h) are reported by a timer of
 *   this thread when their write wait ends; it runs only while some wait.
 * - Other threads never touch an lws object: they queue frames or closes in
 *   the hub, which wakes this thread with lws_cancel_service; on
 *   LWS_CALLBACK_EVENT_WAIT_CANCELLED we write every ready connection at
 *   once (write_ready): its queued frames (up to WRITE_BURST,
 *   COALESCE_BYTES) framed into one buffer and written with one lws_write,
 *   one send() per connection per wake-up. A connection whose socket holds
 *   unsent bytes, or that is closing, is written from its
 *   LWS_CALLBACK_SERVER_WRITEABLE instead, as are frames left over.
 * - Presence: each connection has a ticket shared with its "connected" pool
 *   job, so "disconnected" always runs after "connected" even when the client
 *   leaves before the connect job ran.
 * - Token expiry: a connection authenticated by a JWT keeps the token's exp
 *   (8 bytes in its pss). The ping wheel, which visits every connection
 *   once per half ping interval anyway, closes those past it with 4401
 *   (ws_proto.h): no timer per connection and no scan of its own, so a close
 *   comes at most half --ping-seconds (plus a 0.1 s tick) after exp. A
 *   {"type":"refresh"} frame with a valid token of the same sub moves it.
 * - Memory per idle connection: the lws wsi and its rx buffer (RX_BUFFER
 *   bytes), a 120-byte pss, the hub entry (id, user, two map slots) and the
 *   presence ticket. Reassembly buffers and outbound queues exist only while
 *   used. Per loop, whatever its connections: lws's descriptor tables
 *   (RLIMIT_NOFILE entries, ~16 bytes each), 67 KB of write buffers, the
 *   wheel's slots.
 */
#include "gateway/ws_server.h"
#include "common/mg_alloc.h"
#include "common/mg_map.h"
#include "common/mg_id.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "common/mg_trace.h"
#include "gateway/hub.h"
#include "gateway/jwt_auth.h"
#include "gateway/ws_limits.h"
#include "gateway/ws_proto.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <libwebsockets.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/resource.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#define RX_BUFFER           1024 /* lws per-connection rx chunk; frames are reassembled */
#define MAX_HOOKS           8
#define MAX_ERR_IN_ROW      20 /* consecutive bad frames before close 1008 */
#define HTTP_CHUNK          16384
#define CLOSE_GRACE_SECONDS 5
#define WRITE_BURST         64          /* frames written per writable callback */
#define READY_BATCH         512         /* ready connections taken from the hub at once */
#define COALESCE_BYTES      65536       /* payload bytes framed into one write */
#define MAX_CHAINED         1024        /* a connection's sends waiting or in flight */
#define WAIT_CHECK_US       (50 * 1000) /* the write-wait timer's period */
#define SUL_TICK_SECONDS    0.1         /* lws timers run at most this late */
#define PING_SLOT_MS        100         /* the ping wheel's step */
#define OBUF_BYTES          (COALESCE_BYTES + 10 * WRITE_BURST)
#define MAX_WS_THREADS      64
#define ACCEPT_BURST        64    /* connections accepted per readable listener */
#define ACCEPT_PAUSE_S      0.1   /* accept(2) out of descriptors: retry after */
#define LISTEN_BACKLOG      65535 /* the kernel caps it at net.core.somaxconn */

typedef struct hook {
    char *path;
    char *(*render)(void *arg, const char **content_type);
    void *arg;
} hook;

/* Shared by the connection (its loop) and its presence jobs; the
 * fields below `mu` in mg_ws_server guard connect_done/closed. */
typedef struct ticket {
    mg_ws_server *ws;
    bool connect_done, closed;
    char *user;
    char conn_id[];
} ticket;

/* Per-session data: lws allocates it per wsi (HTTP and WS share the protocol;
 * on upgrade lws gives the wsi a fresh one). */
typedef struct chain chain;

typedef struct pss {
    mg_hub_conn *conn; /* WS: registered connection */
    chain *ch;         /* WS: the send chain, from the first send on */
    ticket *tk;        /* WS: presence ticket (NULL when none is owned) */
    char *user;        /* WS: between filter and established */
    unsigned char *rx; /* WS: reassembly buffer (NULL when idle) */
    uint32_t rx_len, rx_cap;
    uint16_t errors_in_row;
    bool rx_overflow;
    bool peer_closed; /* WS: the client's close came: only lws writes (its echo) */
    char *body;       /* HTTP: response body */
    size_t body_len, body_off;
    /* WS: rate and per-address state (ws_limits.h) */
    mg_ws_limiter_conn *lc;
    int64_t exp_s;             /* WS: the token's exp, Unix s; 0: no token (?user=) */
    struct pss *wprev, *wnext; /* WS: the ping wheel's slot list */
    uint32_t valid_ds;         /* WS: last frame or pong from the client, mono 1/10 s */
    uint16_t slot;             /* WS: its slot in the ping wheel */
    bool in_wheel, ping_due;
} pss;
/* Per-connection memory (see the top): every idle connection pays for this. */
_Static_assert(sizeof(pss) <= 120, "pss grew: per-connection memory (see the top)");

/* Jobs of one connection share a worker queue, so its sends are routed in
 * the order the client sent them and its connect runs before its sends. */
static uint64_t conn_key(const char *conn_id)
{
    return mg_hash(conn_id, strlen(conn_id));
}

/* One service loop: its own lws context on its own SO_REUSEPORT listener,
 * libev loop and thread; it owns the connections it accepted from accept to
 * close (hub shard idx). Fields below are its thread's only, except where
 * noted. */
typedef struct ws_loop {
    mg_ws_server *ws;
    unsigned idx;
    struct lws_context *ctx; /* set before the thread starts, cleared after it ends */
    struct ev_loop *loop;    /* epoll, lent to lws as its foreign loop */
    ev_timer sul_tick;       /* see sul_tick_cb */
    int lfd;                 /* its listener (SO_REUSEPORT with several loops) */
    ev_io accept_w;          /* lfd readable: accept and hand to lws */
    ev_timer accept_pause;   /* out of descriptors: accept again later */
    struct lws_vhost *vh;
    pthread_t thread;
    bool thread_started;
    mg_ws_limiter *hs; /* this loop's handshakes (ws_limits.h) */

    /* upgrade stash: auth result carried from CONFIRM_UPGRADE to FILTER
     * (both run on this thread for the same wsi, back to back) */
    struct lws *stash_wsi;
    char *stash_user;
    int64_t stash_exp;
    mg_ws_limiter_conn *stash_lc; /* its per-address slot, taken at the upgrade */

    lws_sorted_usec_list_t wait_timer;
    bool wait_timer_armed;

    /* The ping wheel: each connection sits in one of nslots slots (round
     * robin at establish, so pings are spread evenly over the interval
     * whatever the connect pattern); the wheel turns once per half ping
     * interval, one slot per PING_SLOT_MS. */
    pss **wheel;
    uint32_t nslots, next_slot, seq;
    int64_t next_slot_ms;

    mg_metric *m_conns;  /* meshgate_ws_loop_connections{loop="idx"} */
    unsigned char *obuf; /* LWS_PRE + OBUF_BYTES: one connection's coalesced write */
    unsigned char *hbuf; /* LWS_PRE + HTTP_CHUNK: one HTTP body chunk */

    /* the ready connections taken from the hub at a wake-up, READY_BATCH
     * at a time (see write_ready): handles and their close codes. Fixed:
     * a broadcast to every connection must not leave an array as long as
     * the connection count behind. */
    struct lws *ready[READY_BATCH];
    int ready_code[READY_BATCH];
    size_t nready;
} ws_loop;

struct mg_ws_server {
    /* options */
    char *gateway_id, *host;
    int port, bound_port;
    bool loopback;
    bool inline_jobs; /* routing never blocks: run connection jobs on this thread */
    size_t max_frame, max_conns;
    mg_ws_limits limits;
    mg_ws_limiter *lim; /* per address, send rate (ws_limits.h); handshakes: per loop */
    mg_ws_limiter_config lim_cfg;
    size_t fd_reserve, max_handshakes, max_header_bytes;
    int64_t send_deadline_ms;
    int ping_seconds;

    mg_pool *pool;
    mg_router *router;
    mg_hub *hub;
    mg_jwt_auth *auth;

    unsigned nloops; /* --ws-threads */
    ws_loop *loops;
    struct lws_protocols protocols[2];
    lws_retry_bo_t retry;
    bool started;
    atomic_bool stopping, ready, draining;

    hook hooks[MAX_HOOKS];
    int nhooks;

    pthread_mutex_t mu; /* tickets */

    mg_metric *m_in, *m_out, *m_slow, *m_conns_total, *m_conns, *m_expired, *m_refreshed;
};

/* ---- metrics ------------------------------------------------------------ */

static void count_error(const char *code)
{
    char labels[64];
    snprintf(labels, sizeof(labels), "code=\"%s\"", code);
    mg_metric_add(mg_counter("meshgate_ws_errors_total",
                             "WebSocket client errors answered, by error code", labels),
                  1);
}

/* ---- helpers ------------------------------------------------------------ */

/* Monotonic time in tenths of a second (the ping wheel's clock). */
static uint32_t now_ds(void)
{
    return (uint32_t)(mg_mono_ms() / 100);
}

static void post_text(mg_ws_server *ws, const char *conn_id, char *text, size_t len)
{
    mg_hub_post(ws->hub, conn_id, text, len);
    free(text);
}

static void post_error(mg_ws_server *ws, const char *conn_id, const char *code, const char *reason,
                       const char *id)
{
    size_t len;
    char *t = mg_ws_proto_encode_error(code, reason, id, &len);
    count_error(code);
    post_text(ws, conn_id, t, len);
}

/* ---- the send chain of a connection --------------------------------------- */

typedef struct pend {
    struct pend *next;
    mg_msg *msg;
} pend;

/* A connection's sends in order: each starts once the one before was
 * handed to a path that fixes its order (mg_router_send_handed), so at most
 * one operation is not yet handed (it holds the gate) while the handed ones
 * wait for their answers. Shared by the connection (until it closes) and
 * the operations in flight; freed by whichever lets go last. Fields under
 * mu. */
struct chain {
    mg_ws_server *ws;
    pthread_mutex_t mu;
    pend *head, *tail;
    uint32_t queued;   /* sends waiting for the gate */
    uint32_t inflight; /* operations started and not answered */
    bool gate;         /* held by the operation not yet handed, or by chain_run */
    bool closed;       /* the connection is gone */
    bool starting;     /* chain_run is inside mg_router_send_handed ... */
    bool sync_handed;  /* ... and that operation was handed meanwhile */
    char conn_id[];
};

/* One operation of the chain: what its answer needs. */
typedef struct chain_op {
    chain *ch;
    mg_msg *msg;
    mg_span *span; /* its "ws send" span, when traced */
} chain_op;

static void chain_free(chain *ch)
{
    pthread_mutex_destroy(&ch->mu);
    free(ch);
}

/* Under ch->mu: whether nobody holds the chain any more. */
static bool chain_unused(const chain *ch)
{
    return ch->closed && !ch->gate && ch->inflight == 0;
}

static void ack(mg_ws_server *ws, const char *conn_id, const char *id, const mg_send_result *res)
{
    size_t len;
    char *t = mg_ws_proto_encode_ack(
        id, res->status, res->path,
        (res->status == MG_STATUS_REJECTED || res->status == MG_STATUS_FAILED) ? res->reason : NULL,
        &len);
    post_text(ws, conn_id, t, len);
}

static void ack_overloaded(mg_ws_server *ws, const char *conn_id, const char *id)
{
    size_t len;
    char *t =
        mg_ws_proto_encode_ack(id, MG_STATUS_FAILED, MG_PATH_NONE, MG_WS_ERR_OVERLOADED, &len);
    count_error(MG_WS_ERR_OVERLOADED);
    post_text(ws, conn_id, t, len);
}

/* Under ch->mu, gate held: the next message, or NULL after opening the gate
 * (*free_it: and nobody holds the chain any more). */
static mg_msg *chain_next(chain *ch, bool *free_it)
{
    pend *p = ch->head;
    *free_it = false;
    if (!p) {
        ch->gate = false;
        *free_it = chain_unused(ch);
        return NULL;
    }
    ch->head = p->next;
    if (!ch->head)
        ch->tail = NULL;
    ch->queued--;
    mg_msg *m = p->msg;
    free(p);
    return m;
}

static void chain_done(void *arg, const mg_send_result *res);
static void chain_handed(void *arg);

/* Runs m and then the chain's next messages until one is handed later. The
 * caller holds the gate. */
static void chain_run(chain *ch, mg_msg *m)
{
    mg_ws_server *ws = ch->ws;
    while (m) {
        chain_op *l = mg_new(chain_op);
        l->ch = ch;
        l->msg = m;
        l->span = mg_span_start(&m->trace, "ws send", MG_SPAN_SERVER, &m->trace);
        mg_span_attr(l->span, "messaging.message.id", m->id);
        mg_span_attr(l->span, "meshgate.gateway", ws->gateway_id);
        pthread_mutex_lock(&ch->mu);
        ch->inflight++;
        ch->starting = true;
        ch->sync_handed = false;
        pthread_mutex_unlock(&ch->mu);
        int rc = mg_router_send_handed(ws->router, m, mg_mono_ms() + ws->send_deadline_ms,
                                       chain_done, chain_handed, l);
        pthread_mutex_lock(&ch->mu);
        ch->starting = false;
        if (rc < 0)
            ch->inflight--;
        bool later = rc == 0 && !ch->sync_handed; /* chain_handed continues the chain */
        pthread_mutex_unlock(&ch->mu);
        if (rc < 0) {
            if (m->priority != MG_PRIO_LOW)
                ack_overloaded(ws, ch->conn_id, m->id);
            mg_span_end(l->span, true, MG_WS_ERR_OVERLOADED);
            mg_msg_free(m);
            free(l);
        }
        if (later)
            return;
        bool free_it;
        pthread_mutex_lock(&ch->mu);
        m = chain_next(ch, &free_it);
        pthread_mutex_unlock(&ch->mu);
        if (free_it)
            chain_free(ch);
    }
}

/* The order of the operation holding the gate is fixed (any thread; before
 * its answer): the next send may start. */
static void chain_handed(void *arg)
{
    chain *ch = ((chain_op *)arg)->ch;
    pthread_mutex_lock(&ch->mu);
    if (ch->starting) { /* handed inside mg_router_send_handed: chain_run goes on */
        ch->sync_handed = true;
        pthread_mutex_unlock(&ch->mu);
        return;
    }
    bool free_it; /* never: this operation is still in flight */
    mg_msg *next = chain_next(ch, &free_it);
    pthread_mutex_unlock(&ch->mu);
    if (next)
        chain_run(ch, next);
}

/* The answer of one of the chain's operations (any thread, after its
 * chain_handed): its own ack, whatever the order of the others'. */
static void chain_done(void *arg, const mg_send_result *res)
{
    chain_op *l = arg;
    chain *ch = l->ch;
    mg_msg *m = l->msg;
    mg_msg_trace_end(l->span, res->status, res->path, res->connections, res->reason);
    if (m->priority != MG_PRIO_LOW)
        ack(ch->ws, ch->conn_id, m->id, res);
    else if (res->status == MG_STATUS_FAILED)
        mg_log_debug("ws", "low priority send failed conn=%s msg_id=%s reason=%s", ch->conn_id,
                     m->id, res->reason);
    mg_msg_free(m);
    free(l);
    pthread_mutex_lock(&ch->mu);
    ch->inflight--;
    bool free_it = chain_unused(ch);
    pthread_mutex_unlock(&ch->mu);
    if (free_it)
        chain_free(ch);
}

/* [ws] Queues m (taken) behind the connection's sends, or starts it. Sends
 * waiting plus operations in flight stay within MAX_CHAINED; beyond it the
 * send is refused (overloaded). */
static void chain_send(mg_ws_server *ws, pss *p, const char *conn_id, mg_msg *m)
{
    chain *ch = p->ch;
    if (!ch) {
        size_t n = strlen(conn_id);
        ch = mg_xcalloc(1, sizeof(*ch) + n + 1);
        ch->ws = ws;
        pthread_mutex_init(&ch->mu, NULL);
        memcpy(ch->conn_id, conn_id, n + 1);
        p->ch = ch;
    }
    pthread_mutex_lock(&ch->mu);
    if (ch->queued + ch->inflight >= MAX_CHAINED) {
        pthread_mutex_unlock(&ch->mu);
        if (m->priority != MG_PRIO_LOW)
            ack_overloaded(ws, conn_id, m->id);
        mg_msg_free(m);
        return;
    }
    if (!ch->gate) {
        ch->gate = true;
        pthread_mutex_unlock(&ch->mu);
        chain_run(ch, m);
        return;
    }
    pend *e = mg_new(pend);
    e->msg = m;
    if (ch->tail)
        ch->tail->next = e;
    else
        ch->head = e;
    ch->tail = e;
    ch->queued++;
    pthread_mutex_unlock(&ch->mu);
}

/* [ws] The connection is gone: queued sends still run; the last user frees. */
static void chain_release(pss *p)
{
    chain *ch = p->ch;
    if (!ch)
        return;
    p->ch = NULL;
    pthread_mutex_lock(&ch->mu);
    ch->closed = true;
    bool free_now = chain_unused(ch);
    pthread_mutex_unlock(&ch->mu);
    if (free_now)
        chain_free(ch);
}

/* ---- pool jobs ---------------------------------------------------------- */

typedef struct ack_job {
    mg_ws_server *ws;
    char *user, *conn_id;
    mg_span *span; /* "inbox ack", when the ack frame named a sampled traceparent */
    char id[];
} ack_job;

static void job_inbox_ack(void *arg)
{
    ack_job *j = arg;
    int rc = -ENOTCONN;
    if (j->ws->router) {
        rc = mg_router_inbox_ack(j->ws->router, j->user, j->conn_id, j->id);
        if (rc < 0 && rc != -ENOENT)
            mg_log_warn("ws", "inbox ack failed user=%s msg_id=%s rc=%d", j->user, j->id, rc);
    }
    mg_span_attr(j->span, "meshgate.status", rc == 0 ? "acked" : strerror(-rc));
    mg_span_end(j->span, rc < 0 && rc != -ENOENT, rc < 0 ? strerror(-rc) : NULL);
    free(j->user);
    free(j->conn_id);
    free(j);
}

static void ticket_free(ticket *t)
{
    free(t->user);
    free(t);
}

static void job_disconnected(void *arg)
{
    ticket *t = arg;
    if (t->ws->router)
        mg_router_user_disconnected(t->ws->router, t->user, t->conn_id);
    ticket_free(t);
}

/* Records the connection in presence and replays the inbox's first page,
 * then tells the client it is ready (ws_proto.h): queued through the hub
 * behind that page, so the frame follows it; the connection's queue is
 * FIFO. The connection was registered opening (mg_hub_register_opening):
 * live messages that reached it meanwhile (presence had it before the
 * fetch) were held, and follow the ready frame, so a sender whose earlier
 * messages were stored sees them in order. A store failure still says
 * ready, marked degraded: the socket works (its sends route as usual), and
 * the client decides whether to reconnect. A connection gone by now drops
 * it in the hub. */
static void job_connected(void *arg)
{
    ticket *t = arg;
    mg_ws_server *ws = t->ws;
    int rc = 0;
    if (ws->router) {
        rc = mg_router_user_connected(ws->router, t->user, t->conn_id, mg_now_ms());
        if (rc < 0)
            mg_log_warn("ws", "presence connect failed conn=%s user=%s rc=%d; ready degraded",
                        t->conn_id, t->user, rc);
    }
    size_t len;
    char *ready = mg_ws_proto_encode_ready(t->conn_id, t->user, rc < 0, &len);
    mg_hub_open(ws->hub, t->conn_id, ready, len);
    free(ready);
    pthread_mutex_lock(&ws->mu);
    t->connect_done = true;
    bool closed = t->closed;
    pthread_mutex_unlock(&ws->mu);
    if (closed) /* the connection left meanwhile: we own the ticket now */
        job_disconnected(t);
}

/* Runs a connection's job: on this thread when routing never blocks (the
 * embedded default: no hand-off, no wake-ups), else on the connection's
 * worker. Either way one connection's jobs run in order. Returns 0, or the
 * pool's error (the job did not run and arg stays the caller's). */
static int dispatch(mg_ws_server *ws, const char *conn_id, mg_job_fn fn, void *arg)
{
    if (ws->inline_jobs) {
        fn(arg);
        return 0;
    }
    return mg_pool_submit_keyed(ws->pool, conn_key(conn_id), fn, arg);
}

/* ---- WebSocket side ------------------------------------------------------ */

static void close_with(struct lws *wsi, int code, const char *reason)
{
    lws_close_reason(wsi, (enum lws_close_status)code, (unsigned char *)reason, strlen(reason));
}

/* A {"type":"refresh"}: the token is verified as at upgrade (same verifier:
 * key, alg, aud/iss) and must name the connection's user; then the
 * connection's expiry moves to its exp. A refused one leaves the old expiry. */
static void on_refresh(mg_ws_server *ws, pss *p, const char *conn_id, const char *token)
{
    char reason[160];
    char *sub = NULL;
    int64_t exp = 0;
    const char *user = mg_hub_conn_user(p->conn);
    if (!ws->auth || !p->exp_s) {
        post_error(ws, conn_id, MG_WS_ERR_BAD_TOKEN,
                   ws->auth ? "this connection's token already expired"
                            : "this gateway does not authenticate by token",
                   NULL);
        return;
    }
    if (mg_jwt_auth_verify(ws->auth, token, mg_now_ms() / 1000, ws->limits.max_user_bytes, &sub,
                           &exp, reason, sizeof(reason)) != 0) {
        mg_log_info("ws", "refresh refused conn=%s user=%s reason=\"%s\"", conn_id, user, reason);
        post_error(ws, conn_id, MG_WS_ERR_BAD_TOKEN, reason, NULL);
        return;
    }
    if (strcmp(sub, user) != 0) {
        mg_log_info("ws", "refresh refused conn=%s user=%s reason=\"another sub\"", conn_id, user);
        post_error(ws, conn_id, MG_WS_ERR_BAD_TOKEN, "token is for another user", NULL);
        free(sub);
        return;
    }
    free(sub);
    p->exp_s = exp;
    mg_metric_add(ws->m_refreshed, 1);
    size_t len;
    char *t = mg_ws_proto_encode_refreshed(exp, &len);
    post_text(ws, conn_id, t, len);
}

static void handle_text(mg_ws_server *ws, pss *p, const char *data, size_t len, struct lws *wsi,
                        bool *close_now)
{
    const char *conn_id = mg_hub_conn_id(p->conn);
    mg_ws_in in;
    const char *code = NULL;
    char reason[200];
    mg_metric_add(ws->m_in, 1);
    mg_ws_rate rl = mg_ws_limiter_frame(ws->lim, p->lc, mg_mono_ms());
    if (rl != MG_WS_RATE_OK) {
        post_error(ws, conn_id, MG_WS_ERR_RATE_LIMITED, "over --ws-send-rate; slow down", NULL);
        if (rl == MG_WS_RATE_CLOSE) {
            close_with(wsi, LWS_CLOSE_STATUS_POLICY_VIOLATION, "rate limit");
            *close_now = true;
        }
        return;
    }
    if (mg_ws_proto_parse(data, len, &ws->limits, &in, &code, reason, sizeof(reason)) != 0) {
        post_error(ws, conn_id, code, reason, NULL);
        if (++p->errors_in_row >= MAX_ERR_IN_ROW) {
            mg_log_warn("ws", "too many bad frames, closing conn=%s user=%s", conn_id,
                        mg_hub_conn_user(p->conn));
            close_with(wsi, LWS_CLOSE_STATUS_POLICY_VIOLATION, "too many errors");
            *close_now = true;
        }
        return;
    }
    p->errors_in_row = 0;
    const char *user = mg_hub_conn_user(p->conn);
    if (in.type == MG_WS_IN_REFRESH) {
        on_refresh(ws, p, conn_id, in.token);
        mg_ws_in_clear(&in);
        return;
    }
    if (in.type == MG_WS_IN_ACK) {
        size_t n = strlen(in.id);
        ack_job *j = mg_xmalloc(sizeof(*j) + n + 1);
        j->ws = ws;
        j->user = mg_xstrdup(user);
        j->conn_id = mg_xstrdup(conn_id);
        memcpy(j->id, in.id, n + 1);
        j->span = mg_span_start(&in.trace, "inbox ack", MG_SPAN_SERVER, NULL);
        mg_span_attr(j->span, "messaging.message.id", in.id);
        mg_span_attr(j->span, "meshgate.gateway", ws->gateway_id);
        if (dispatch(ws, conn_id, job_inbox_ack, j) != 0) {
            /* the message stays in the inbox and comes again: no loss */
            count_error(MG_WS_ERR_OVERLOADED);
            mg_span_end(j->span, true, MG_WS_ERR_OVERLOADED);
            free(j->user);
            free(j->conn_id);
            free(j);
        }
        mg_ws_in_clear(&in);
        return;
    }
    char idbuf[MG_ID_LEN + 1];
    if (!in.id) {
        mg_id_new(idbuf);
        in.id = mg_xstrdup(idbuf);
    }
    mg_msg *m = mg_msg_new(in.id, user, in.to, (const uint8_t *)in.content, in.content_len,
                           in.content_type, mg_now_ms(), in.priority);
    m->trace = in.trace;
    mg_trace_begin(&m->trace); /* the frame's traceparent, else sampled by the ratio */
    mg_ws_in_clear(&in);
    if (!ws->router) {
        mg_send_result res = {.status = MG_STATUS_FAILED};
        snprintf(res.reason, sizeof(res.reason), "router not ready");
        ack(ws, conn_id, m->id, &res);
        mg_msg_free(m);
        return;
    }
    if (m->priority == MG_PRIO_LOW) { /* README: LOW is answered at once */
        mg_send_result res = {.status = MG_STATUS_ACCEPTED};
        ack(ws, conn_id, m->id, &res);
    }
    chain_send(ws, p, conn_id, m);
}

/* Returns -1 to close the connection. */
static int on_receive(mg_ws_server *ws, struct lws *wsi, pss *p, const void *in, size_t len)
{
    if (!p->conn)
        return -1;
    p->valid_ds = now_ds();
    if (lws_frame_is_binary(wsi)) {
        post_error(ws, mg_hub_conn_id(p->conn), MG_WS_ERR_BINARY,
                   "binary frames are not supported; send JSON text frames", NULL);
        close_with(wsi, LWS_CLOSE_STATUS_UNACCEPTABLE_OPCODE, "binary frames not supported");
        return -1;
    }
    size_t remaining = lws_remaining_packet_payload(wsi);
    if ((size_t)p->rx_len + len + remaining > ws->max_frame) {
        mg_log_info("ws", "frame too large, closing conn=%s user=%s limit=%zu",
                    mg_hub_conn_id(p->conn), mg_hub_conn_user(p->conn), ws->max_frame);
        count_error(MG_WS_ERR_TOO_LARGE);
        close_with(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE, "frame too large");
        return -1;
    }
    bool final = lws_is_final_fragment(wsi) && remaining == 0;
    if (final && p->rx_len == 0) { /* the common case: one chunk, no copy */
        bool close_now = false;
        handle_text(ws, p, in, len, wsi, &close_now);
        return close_now ? -1 : 0;
    }
    if (p->rx_len + len > p->rx_cap) {
        size_t want = (size_t)p->rx_len + len + remaining;
        p->rx = mg_xrealloc(p->rx, want);
        p->rx_cap = (uint32_t)want;
    }
    memcpy(p->rx + p->rx_len, in, len);
    p->rx_len += (uint32_t)len;
    if (!final)
        return 0;
    bool close_now = false;
    handle_text(ws, p, (const char *)p->rx, p->rx_len, wsi, &close_now);
    free(p->rx);
    p->rx = NULL;
    p->rx_len = p->rx_cap = 0;
    return close_now ? -1 : 0;
}

/* The text frame header of an unmasked server frame of len bytes into h;
 * returns its length (2, 4 or 10). */
static size_t frame_header(unsigned char *h, size_t len)
{
    h[0] = 0x81; /* FIN, text */
    if (len < 126) {
        h[1] = (unsigned char)len;
        return 2;
    }
    if (len < 65536) {
        h[1] = 126;
        h[2] = (unsigned char)(len >> 8);
        h[3] = (unsigned char)len;
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; i++)
        h[2 + i] = (unsigned char)((uint64_t)len >> (56 - 8 * i));
    return 10;
}

/* The device's address and port: asked of the socket only for a traced
 * frame's write span, on the loop that owns wsi (the hub keeps no address:
 * an idle connection pays nothing for it). */
static int peer_of(struct lws *wsi, char *addr, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = lws_get_socket_fd(wsi);
    addr[0] = '\0';
    if (fd < 0 || getpeername(fd, (struct sockaddr *)&ss, &sl) != 0)
        return 0;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &in->sin_addr, addr, (socklen_t)len);
        return ntohs(in->sin_port);
    }
    if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, addr, (socklen_t)len);
        return ntohs(in6->sin6_port);
    }
    return 0;
}

/* [ws] A traced frame's write span names the device it went to. */
static void span_peer(struct lws *wsi, mg_hub_frame *f)
{
    if (!f->span)
        return;
    char addr[INET6_ADDRSTRLEN];
    int port = peer_of(wsi, addr, sizeof(addr));
    if (addr[0])
        mg_span_attr(f->span, "network.peer.address", addr);
    if (port > 0)
        mg_span_attr_int(f->span, "network.peer.port", port);
}

/* Settles the n frames of one write to wsi: written when lws took all its
 * bytes. */
static void settle(mg_ws_server *ws, struct lws *wsi, mg_hub_frame **fr, int n, bool written)
{
    for (int i = 0; i < n; i++) {
        if (written && fr[i]->kind == MG_FRAME_MESSAGE)
            mg_metric_add(ws->m_out, 1);
        span_peer(wsi, fr[i]);
        mg_hub_frame_done(ws->hub, fr[i], written);
    }
}

/* Whether lws took all len bytes of a write that returned n: sent, or kept
 * to send later. A write made while lws still holds unsent bytes (the big
 * frame after a coalesced write the socket only took part of) is appended
 * whole to what it holds, and lws returns what the socket took of the
 * oldest part instead of len. */
static bool taken(struct lws *wsi, int n, size_t len)
{
    return n >= 0 && ((size_t)n >= len || lws_partial_buffered(wsi));
}

/* One write per connection per writable event: the queued frames (at most
 * WRITE_BURST of them and COALESCE_BYTES of payload, so one busy connection
 * cannot starve the others) are framed into one buffer and written with one
 * lws_write (LWS_WRITE_RAW: the WebSocket headers are ours, complete frames
 * only). A frame larger than the buffer goes alone, framed by lws. lws keeps
 * what the socket did not take (lws_partial_buffered) and writes it before
 * calling us again, so frames are whole and in order; a frame counts as
 * written (mg_hub_frame_done) once lws took all of its bytes. Queued frames
 * are written before a pending close. */
static int on_writeable(ws_loop *L, struct lws *wsi, pss *p, bool direct)
{
    mg_ws_server *ws = L->ws;
    unsigned char *obuf = L->obuf; /* this loop's: one connection's write at a time */
    if (!p->conn)
        return 0;
    if (p->ping_due) {
        p->ping_due = false;
        /* a payload: lws 4.1 reports no RECEIVE_PONG for an empty pong */
        obuf[LWS_PRE] = 'p';
        if (lws_write(wsi, obuf + LWS_PRE, 1, LWS_WRITE_PING) < 0)
            return -1;
    }
    mg_hub_frame *fr[WRITE_BURST];
    int nf = 0, code = 0;
    bool more, empty = false; /* empty: the queue was seen empty */
    char reason[124];
    size_t used = 0;
    unsigned char *out = obuf + LWS_PRE;
    mg_hub_frame *big = NULL; /* popped, too large for the buffer */
    while (nf < WRITE_BURST) {
        mg_hub_frame *f = mg_hub_pop(ws->hub, p->conn, &more, &code, reason, sizeof(reason));
        if (!f) {
            empty = true;
            break;
        }
        if (f->len > COALESCE_BYTES - used) {
            big = f;
            break;
        }
        used += frame_header(out + used, f->len);
        memcpy(out + used, f->data + LWS_PRE, f->len);
        used += f->len;
        fr[nf++] = f;
        if (!more && !code) { /* the common end: no need to look again */
            empty = true;
            break;
        }
    }
    if (nf > 0) {
        int n = lws_write(wsi, out, used, LWS_WRITE_RAW);
        bool ok = taken(wsi, n, used);
        settle(ws, wsi, fr, nf, ok);
        if (!ok) {
            if (big)
                settle(ws, wsi, &big, 1, false);
            return -1;
        }
    }
    if (big) { /* lws frames it in the frame's own headroom */
        int n = lws_write(wsi, big->data + LWS_PRE, big->len, LWS_WRITE_TEXT);
        bool ok = taken(wsi, n, big->len);
        settle(ws, wsi, &big, 1, ok);
        if (!ok)
            return -1;
    }
    bool wrote = nf > 0 || big;
    if (!empty || (code && wrote && (lws_partial_buffered(wsi) || lws_send_pipe_choked(wsi)))) {
        /* frames left, or the close once lws has written what it holds */
        lws_callback_on_writable(wsi);
        return 0;
    }
    if (code) {
        if (direct) { /* a close is sent from the writable callback */
            lws_callback_on_writable(wsi);
            return 0;
        }
        close_with(wsi, code, reason);
        return -1;
    }
    return 0;
}

/* ---- pings ---------------------------------------------------------------
 *
 * lws's own pings (the retry policy's secs_since_valid_*) keep a timer per
 * connection in one sorted list, and re-inserting one walks the list: with
 * 19,700 idle connections that walk was 90 % of the gateway's CPU (22 % of
 * a core over a ping interval). Here each connection is visited twice per
 * interval by the wheel: silent (no frame, no pong) for an interval, it is
 * pinged once; silent for two, it is hung up (so after 2 to 2.5 intervals).
 * A visit costs a few loads; a busy connection is never pinged. */

static void wheel_add(ws_loop *L, pss *p)
{
    uint32_t k = L->seq++ % L->nslots;
    p->slot = (uint16_t)k;
    p->wprev = NULL;
    p->wnext = L->wheel[k];
    if (p->wnext)
        p->wnext->wprev = p;
    L->wheel[k] = p;
    p->in_wheel = true;
    p->valid_ds = now_ds();
}

static void wheel_remove(ws_loop *L, pss *p)
{
    if (!p->in_wheel)
        return;
    if (p->wprev)
        p->wprev->wnext = p->wnext;
    else
        L->wheel[p->slot] = p->wnext;
    if (p->wnext)
        p->wnext->wprev = p->wprev;
    p->wprev = p->wnext = NULL;
    p->in_wheel = false;
}

/* [ws] Visits the slots that came due (from an lws callback). */
static void wheel_turn(ws_loop *L)
{
    mg_ws_server *ws = L->ws;
    int64_t now = mg_mono_ms();
    if (now < L->next_slot_ms)
        return;
    uint32_t nds = (uint32_t)(now / 100);
    uint32_t ping_ds = (uint32_t)ws->ping_seconds * 10, hup_ds = ping_ds * 2;
    uint32_t turn_ds = L->nslots * PING_SLOT_MS / 100; /* between two visits */
    int64_t wall_s = mg_now_ms() / 1000;
    for (int steps = 0; now >= L->next_slot_ms && steps < (int)L->nslots; steps++) {
        for (pss *p = L->wheel[L->next_slot]; p; p = p->wnext) {
            uint32_t age = nds - p->valid_ds;
            if (p->exp_s && wall_s >= p->exp_s) {
                /* queued frames go first, then the close (hub.h) */
                p->exp_s = 0;
                mg_log_info("ws", "token expired, closing conn=%s user=%s", mg_hub_conn_id(p->conn),
                            mg_hub_conn_user(p->conn));
                mg_metric_add(ws->m_expired, 1);
                mg_hub_disconnect(ws->hub, NULL, mg_hub_conn_id(p->conn), MG_WS_CLOSE_TOKEN_EXPIRED,
                                  "token expired");
            } else if (age >= hup_ds) {
                struct lws *wsi = mg_hub_conn_handle(p->conn);
                mg_log_debug("ws", "no pong, hanging up conn=%s", mg_hub_conn_id(p->conn));
                lws_set_timeout(wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
            } else if (age >= ping_ds && age < ping_ds + turn_ds && !p->ping_due) {
                p->ping_due = true;
                lws_callback_on_writable(mg_hub_conn_handle(p->conn));
            }
        }
        L->next_slot = (L->next_slot + 1) % L->nslots;
        L->next_slot_ms += PING_SLOT_MS;
    }
    if (now >= L->next_slot_ms) /* behind by a whole turn: catch up */
        L->next_slot_ms = now + PING_SLOT_MS;
}

static void on_established(ws_loop *L, struct lws *wsi, pss *p)
{
    mg_ws_server *ws = L->ws;
    const char *user = p->user ? p->user : "";
    p->conn = mg_hub_register_opening(ws->hub, L->idx, user, wsi); /* until job_connected */
    wheel_add(L, p);
    const char *id = mg_hub_conn_id(p->conn);
    size_t n = strlen(id);
    ticket *t = mg_xcalloc(1, sizeof(*t) + n + 1);
    t->ws = ws;
    t->user = p->user;
    p->user = NULL;
    memcpy(t->conn_id, id, n + 1);
    mg_metric_add(ws->m_conns_total, 1);
    mg_metric_add(ws->m_conns, 1);
    mg_metric_add(L->m_conns, 1);
    if (dispatch(ws, id, job_connected, t) != 0) {
        mg_log_warn("ws", "worker pool full, refusing conn=%s user=%s", id, t->user);
        count_error(MG_WS_ERR_OVERLOADED);
        ticket_free(t);
        mg_hub_disconnect(ws->hub, NULL, id, 1013, "overloaded, retry later");
        return;
    }
    p->tk = t;
    mg_log_debug("ws", "connection open conn=%s user=%s", id, t->user);
    if (atomic_load(&ws->draining)) /* its upgrade passed the filter before the drain began */
        mg_hub_disconnect(ws->hub, NULL, id, 1012, "service restart");
}

static void on_closed(ws_loop *L, pss *p)
{
    mg_ws_server *ws = L->ws;
    wheel_remove(L, p);
    if (p->conn) {
        mg_log_debug("ws", "connection closed conn=%s user=%s", mg_hub_conn_id(p->conn),
                     mg_hub_conn_user(p->conn));
        mg_hub_unregister(ws->hub, p->conn);
        mg_metric_add(ws->m_conns, -1);
        mg_metric_add(L->m_conns, -1);
        p->conn = NULL;
    }
    if (p->tk) {
        ticket *t = p->tk;
        p->tk = NULL;
        pthread_mutex_lock(&ws->mu);
        t->closed = true;
        bool done = t->connect_done;
        pthread_mutex_unlock(&ws->mu);
        if (done && dispatch(ws, t->conn_id, job_disconnected, t) != 0) {
            /* presence entry stays until its lease expires */
            mg_log_warn("ws", "worker pool full, presence not removed conn=%s user=%s", t->conn_id,
                        t->user);
            ticket_free(t);
        }
    }
    mg_ws_limiter_conn_close(ws->lim, p->lc);
    p->lc = NULL;
    chain_release(p);
    free(p->rx);
    p->rx = NULL;
    p->rx_len = p->rx_cap = 0;
}

static void pss_release(mg_ws_server *ws, pss *p)
{
    if (!p)
        return;
    if (ws) /* a slot taken at the upgrade of a connection never established */
        mg_ws_limiter_conn_close(ws->lim, p->lc);
    p->lc = NULL;
    free(p->user);
    p->user = NULL;
    free(p->body);
    p->body = NULL;
    free(p->rx);
    p->rx = NULL;
}

/* ---- authentication at upgrade ------------------------------------------ */

/* Returns 0 with *user, or an HTTP status with a reason. */
static int authenticate(mg_ws_server *ws, struct lws *wsi, char **user, int64_t *exp, char *reason,
                        size_t reasonlen)
{
    *user = NULL;
    *exp = 0;
    if (ws->auth) {
        char buf[4096];
        const char *token = NULL;
        int n = lws_hdr_copy(wsi, buf, sizeof(buf), WSI_TOKEN_HTTP_AUTHORIZATION);
        if (n > 7 && strncasecmp(buf, "Bearer ", 7) == 0) {
            token = buf + 7;
            while (*token == ' ')
                token++;
        } else {
            const char *v = lws_get_urlarg_by_name(wsi, "token=", buf, sizeof(buf));
            if (v)
                token = v;
        }
        if (!token || !token[0]) {
            snprintf(reason, reasonlen, "missing token");
            return HTTP_STATUS_UNAUTHORIZED;
        }
        if (mg_jwt_auth_verify(ws->auth, token, mg_now_ms() / 1000, ws->limits.max_user_bytes, user,
                               exp, reason, reasonlen) != 0)
            return HTTP_STATUS_UNAUTHORIZED;
        return 0;
    }
    char buf[1024];
    if (mg_ws_query_arg_strict(wsi, "user=", reason, reasonlen) != 0)
        return HTTP_STATUS_BAD_REQUEST;
    const char *v = lws_get_urlarg_by_name(wsi, "user=", buf, sizeof(buf));
    if (!v || !mg_ws_proto_valid_user(v, ws->limits.max_user_bytes)) {
        snprintf(reason, reasonlen, "missing or invalid ?user=");
        return HTTP_STATUS_UNAUTHORIZED;
    }
    *user = mg_xstrdup(v);
    return 0;
}

static int reject(struct lws *wsi, int status, const char *reason)
{
    if (lws_return_http_status(wsi, (unsigned int)status, reason))
        return -1;
    return 1;
}

static void stash_clear(ws_loop *L)
{
    free(L->stash_user);
    L->stash_user = NULL;
    mg_ws_limiter_conn_close(L->ws->lim, L->stash_lc);
    L->stash_lc = NULL;
    L->stash_wsi = NULL;
}

static int on_confirm_upgrade(ws_loop *L, struct lws *wsi, const char *upgrade)
{
    mg_ws_server *ws = L->ws;
    char uri[256];
    if (!upgrade || strcasecmp(upgrade, "websocket") != 0)
        return reject(wsi, HTTP_STATUS_BAD_REQUEST, "only websocket upgrades");
    if (lws_hdr_copy(wsi, uri, sizeof(uri), WSI_TOKEN_GET_URI) <= 0 || strcmp(uri, "/ws") != 0)
        return reject(wsi, HTTP_STATUS_NOT_FOUND, "not found");
    char bad[96];
    if (mg_ws_upgrade_strict(wsi, bad, sizeof(bad)) != 0) {
        count_error("bad_upgrade");
        return reject(wsi, HTTP_STATUS_BAD_REQUEST, bad);
    }
    if (atomic_load(&ws->draining) || atomic_load(&ws->stopping))
        return reject(wsi, HTTP_STATUS_SERVICE_UNAVAILABLE, "draining");
    if (mg_hub_count(ws->hub) >= ws->max_conns) {
        mg_ws_limit_count("connections");
        return reject(wsi, HTTP_STATUS_SERVICE_UNAVAILABLE, "too many connections");
    }
    char ip[64];
    if (!lws_get_peer_simple(wsi, ip, sizeof(ip)))
        snprintf(ip, sizeof(ip), "?");
    if (mg_ws_limiter_ip_full(ws->lim, ip))
        return reject(wsi, 429, "too many connections from this address");
    char reason[160];
    char *user = NULL;
    int64_t exp = 0;
    int st = authenticate(ws, wsi, &user, &exp, reason, sizeof(reason));
    if (st) {
        count_error("unauthorized");
        mg_log_info("ws", "upgrade refused status=%d reason=\"%s\"", st, reason);
        return reject(wsi, st, reason);
    }
    /* the slot is taken before the 101 goes out: the client's next upgrade,
     * whatever loop takes it, counts this one (the check above is only the
     * cheap refusal before a token is verified) */
    mg_ws_limiter_conn *lc;
    if (!mg_ws_limiter_conn_admit(ws->lim, ip, &lc)) {
        free(user);
        return reject(wsi, 429, "too many connections from this address");
    }
    stash_clear(L);
    L->stash_user = user;
    L->stash_exp = exp;
    L->stash_lc = lc;
    L->stash_wsi = wsi;
    return 0;
}

static int on_filter(ws_loop *L, struct lws *wsi, pss *p)
{
    mg_ws_server *ws = L->ws;
    if (L->stash_wsi == wsi && L->stash_user) {
        p->user = L->stash_user;
        p->exp_s = L->stash_exp;
        p->lc = L->stash_lc;
        L->stash_user = NULL;
        L->stash_lc = NULL;
        L->stash_wsi = NULL;
        return 0;
    }
    /* Not seen at CONFIRM_UPGRADE (should not happen): authenticate here. */
    char reason[160], ip[64];
    if (authenticate(ws, wsi, &p->user, &p->exp_s, reason, sizeof(reason)))
        return -1;
    return mg_ws_limiter_conn_admit(ws->lim, lws_get_peer_simple(wsi, ip, sizeof(ip)) ? ip : "?",
                                    &p->lc)
               ? 0
               : -1;
}

/* ---- HTTP side ------------------------------------------------------------ */

static int http_respond(struct lws *wsi, pss *p, int status, const char *ctype, char *body)
{
    unsigned char hdr[LWS_PRE + 512], *start = hdr + LWS_PRE, *q = start,
                                      *end = hdr + sizeof(hdr) - 1;
    size_t len = body ? strlen(body) : 0;
    free(p->body);
    p->body = body;
    p->body_len = len;
    p->body_off = 0;
    if (lws_add_http_common_headers(wsi, (unsigned int)status, ctype, (lws_filepos_t)len, &q, end))
        return 1;
    if (lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CACHE_CONTROL,
                                     (const unsigned char *)"no-store", 8, &q, end))
        return 1;
    if (lws_finalize_write_http_header(wsi, start, &q, end))
        return 1;
    lws_callback_on_writable(wsi);
    return 0;
}

static int on_http(mg_ws_server *ws, struct lws *wsi, pss *p, const char *path)
{
    if (!lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI)) {
        if (lws_return_http_status(wsi, HTTP_STATUS_METHOD_NOT_ALLOWED, "only GET"))
            return -1;
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    }
    if (strcmp(path, "/healthz") == 0)
        return http_respond(wsi, p, 200, "text/plain", mg_xstrdup("ok\n"));
    if (strcmp(path, "/readyz") == 0) {
        bool ok = atomic_load(&ws->ready) && !atomic_load(&ws->draining);
        return http_respond(wsi, p, ok ? 200 : 503, "text/plain",
                            mg_xstrdup(ok ? "ready\n" : "not ready\n"));
    }
    if (strcmp(path, "/metrics") == 0) {
        size_t n;
        return http_respond(wsi, p, 200, "text/plain; version=0.0.4; charset=utf-8",
                            mg_metrics_render(&n));
    }
    for (int i = 0; i < ws->nhooks; i++) {
        if (strcmp(path, ws->hooks[i].path) == 0) {
            const char *ct = NULL;
            char *body = ws->hooks[i].render(ws->hooks[i].arg, &ct);
            if (!body)
                return http_respond(wsi, p, 500, "text/plain", mg_xstrdup("error\n"));
            return http_respond(wsi, p, 200, ct ? ct : "application/json", body);
        }
    }
    return http_respond(wsi, p, 404, "text/plain", mg_xstrdup("not found\n"));
}

static int on_http_writeable(ws_loop *L, struct lws *wsi, pss *p)
{
    if (!p->body)
        return 0;
    unsigned char *buf = L->hbuf; /* this loop's */
    size_t n = p->body_len - p->body_off;
    if (n > HTTP_CHUNK)
        n = HTTP_CHUNK;
    bool last = p->body_off + n == p->body_len;
    memcpy(buf + LWS_PRE, p->body + p->body_off, n);
    if (lws_write(wsi, buf + LWS_PRE, n, last ? LWS_WRITE_HTTP_FINAL : LWS_WRITE_HTTP) < (int)n)
        return -1;
    p->body_off += n;
    if (!last) {
        lws_callback_on_writable(wsi);
        return 0;
    }
    free(p->body);
    p->body = NULL;
    if (lws_http_transaction_completed(wsi))
        return -1;
    return 0;
}

/* ---- the callback ------------------------------------------------------------ */

static void wait_timer_cb(lws_sorted_usec_list_t *sul)
{
    ws_loop *L = lws_container_of(sul, ws_loop, wait_timer);
    L->wait_timer_armed = false;
    if (mg_hub_expire_waits(L->ws->hub, L->idx, mg_mono_ms())) {
        L->wait_timer_armed = true;
        lws_sul_schedule(L->ctx, 0, &L->wait_timer, wait_timer_cb, WAIT_CHECK_US);
    }
}

/* [ws] Keeps the write-wait timer running while deliveries homed in this
 * loop's shard wait. */
static void arm_wait_timer(ws_loop *L)
{
    if (L->wait_timer_armed || !mg_hub_waiting(L->ws->hub, L->idx))
        return;
    L->wait_timer_armed = true;
    lws_sul_schedule(L->ctx, 0, &L->wait_timer, wait_timer_cb, WAIT_CHECK_US);
}

/* Under the hub shard's mutex: notes a ready connection (written after
 * the mutex is released, by write_ready). */
static void note_ready(void *handle, int close_code, void *arg)
{
    ws_loop *L = arg; /* the hub hands over READY_BATCH at most */
    L->ready[L->nready] = handle;
    L->ready_code[L->nready++] = close_code;
}

static void want_writable(void *handle, int close_code, void *arg);

/* The wake-up's ready connections are written here and now, not from a
 * writable event each: lws_callback_on_writable costs two epoll_ctl calls
 * and a pass of the event loop per connection, as much as the send itself
 * in a fan-out. A connection whose socket holds unsent bytes, or that is
 * closing, waits for its writable event as before (its order and its close
 * frame stay lws's); a failed write kills it as the callback's -1 would. */
static void write_ready(ws_loop *L)
{
    for (size_t i = 0; i < L->nready; i++) {
        struct lws *wsi = L->ready[i];
        pss *p = lws_wsi_user(wsi);
        if (L->ready_code[i] || !p || !p->conn || p->peer_closed || lws_partial_buffered(wsi)) {
            want_writable(wsi, L->ready_code[i], NULL);
            continue;
        }
        if (on_writeable(L, wsi, p, true) < 0)
            lws_set_timeout(wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
    }
    L->nready = 0;
}

static void want_writable(void *handle, int close_code, void *arg)
{
    struct lws *wsi = handle;
    /* A closing connection whose socket never drains (a consumer that stopped
     * reading) is hung up after CLOSE_GRACE_SECONDS even without a close frame. */
    if (close_code)
        lws_set_timeout(wsi, PENDING_TIMEOUT_USER_OK, CLOSE_GRACE_SECONDS);
    lws_callback_on_writable(wsi);
}

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                    size_t len)
{
    ws_loop *L = lws_context_user(lws_get_context(wsi));
    mg_ws_server *ws = L ? L->ws : NULL;
    pss *p = user;
    switch (reason) {
    case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        if (ws && atomic_load(&ws->stopping)) {
            ev_break(L->loop, EVBREAK_ALL); /* service_main returns */
            return 0;
        }
        if (ws) {
            wheel_turn(L);
            bool more;
            do {
                more = mg_hub_take_ready(ws->hub, L->idx, READY_BATCH, note_ready, L);
                write_ready(L);
            } while (more);
            arm_wait_timer(L);
        }
        return 0;
    case LWS_CALLBACK_SERVER_NEW_CLIENT_INSTANTIATED:
        if (ws)
            mg_ws_limiter_handshake_begin(L->hs, wsi);
        return 0;
    case LWS_CALLBACK_HTTP:
        mg_ws_limiter_handshake_end(L->hs, wsi);
        return on_http(ws, wsi, p, in ? (const char *)in : "");
    case LWS_CALLBACK_HTTP_WRITEABLE:
        return on_http_writeable(L, wsi, p);
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        return on_confirm_upgrade(L, wsi, in);
    case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION:
        return on_filter(L, wsi, p);
    case LWS_CALLBACK_ESTABLISHED:
        on_established(L, wsi, p); /* in the hub before it stops counting as a handshake: */
        mg_ws_limiter_handshake_end(L->hs, wsi); /* a drain sees it as one or the other */
        return 0;
    case LWS_CALLBACK_RECEIVE:
        return on_receive(ws, wsi, p, in, len);
    case LWS_CALLBACK_SERVER_WRITEABLE:
        return on_writeable(L, wsi, p, false);
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        if (p)
            p->peer_closed = true;
        return mg_ws_peer_close_check(wsi, in, len);
    case LWS_CALLBACK_RECEIVE_PONG:
        if (p)
            p->valid_ds = now_ds();
        return 0;
    case LWS_CALLBACK_CLOSED:
        on_closed(L, p);
        return 0;
    case LWS_CALLBACK_HTTP_DROP_PROTOCOL:
    case LWS_CALLBACK_CLOSED_HTTP:
        if (p) {
            free(p->body);
            p->body = NULL;
        }
        return 0;
    case LWS_CALLBACK_WSI_DESTROY:
        if (p && p->conn) /* closed without LWS_CALLBACK_CLOSED */
            on_closed(L, p);
        pss_release(ws, p);
        if (ws)
            mg_ws_limiter_handshake_end(L->hs, wsi);
        if (ws && L->stash_wsi == wsi)
            stash_clear(L);
        return 0;
    default:
        return 0;
    }
}

/* ---- lifecycle ------------------------------------------------------------------ */

static void lws_log_emit(int level, const char *line)
{
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    mg_log_warn("lws", "%.*s", (int)n, line);
}

/* lws 4.1's libev glue runs its timers (pings, hang-ups, timeouts, ours)
 * from one ev_timer that it re-arms only after I/O, with ev_timer_start,
 * which does nothing on an active timer: a timer added earlier than the one
 * armed (a new connection's ping) waited for the armed one, or for traffic.
 * Its idle pass after any I/O runs every due timer, so a wake-up of the loop
 * every SUL_TICK_SECONDS bounds the lateness; it costs the same whatever the
 * number of connections (one pipe write and read). */
static void sul_tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    ws_loop *L = lws_container_of(w, ws_loop, sul_tick);
    lws_cancel_service(L->ctx);
}

/* The hub's wake-up of the loop owning shard (just after that shard's
 * mutex was released): lws_cancel_service writes to that context's pipe. */
static void wake(void *arg, unsigned shard)
{
    mg_ws_server *ws = arg;
    ws_loop *L = &ws->loops[shard];
    if (L->ctx)
        lws_cancel_service(L->ctx);
}

#define HANDSHAKES_GAUGE "meshgate_ws_handshakes"
#define HANDSHAKES_HELP  "connections accepted and not yet through their HTTP request or upgrade"

static double handshakes_gauge(void *arg)
{
    return (double)mg_ws_limiter_live(arg);
}

mg_ws_server *mg_ws_server_create(const mg_config *cfg, mg_pool *pool, char *err, size_t errlen)
{
    char *host = NULL;
    int port = 0;
    if (mg_parse_hostport(cfg->ws_listen, &host, &port) != 0) {
        snprintf(err, errlen, "--ws-listen: want host:port, got '%s'", cfg->ws_listen);
        return NULL;
    }
    mg_jwt_auth *auth = NULL;
    if (cfg->jwks_url && cfg->jwks_url[0]) {
        mg_jwks *jwks = mg_jwks_create(cfg->jwks_url, (int)cfg->jwks_refresh_seconds,
                                       (int)cfg->jwks_min_refetch_seconds, err, errlen);
        if (!jwks) {
            free(host);
            return NULL;
        }
        auth = mg_jwt_auth_create_jwks(jwks);
        mg_jwt_auth_require(auth, cfg->jwt_audience, cfg->jwt_issuer);
    } else if ((cfg->jwt_secret && cfg->jwt_secret[0]) ||
               (cfg->jwt_public_key_file && cfg->jwt_public_key_file[0])) {
        auth = mg_jwt_auth_create(cfg->jwt_secret, cfg->jwt_public_key_file, err, errlen);
        if (!auth) {
            free(host);
            return NULL;
        }
        mg_jwt_auth_require(auth, cfg->jwt_audience, cfg->jwt_issuer);
    }
    bool loopback = mg_host_is_loopback(host);
    if (!auth && !loopback) {
        snprintf(err, errlen,
                 "refusing to listen on %s without client authentication: set --jwt-secret, "
                 "--jwt-public-key-file or --jwks-url, or listen on a loopback address",
                 cfg->ws_listen);
        free(host);
        return NULL;
    }
    mg_ws_server *ws = mg_new(mg_ws_server);
    pthread_mutex_init(&ws->mu, NULL);
    ws->gateway_id = mg_xstrdup(cfg->id && cfg->id[0] ? cfg->id : "gw");
    ws->host = host;
    ws->port = port;
    ws->loopback = loopback;
    ws->auth = auth;
    ws->pool = pool;
    ws->max_frame = cfg->max_frame_bytes > 0 ? (size_t)cfg->max_frame_bytes : 131072;
    ws->max_conns = cfg->max_connections > 0 ? (size_t)cfg->max_connections : 1000000;
    ws->limits.max_content_bytes = (size_t)cfg->max_content_bytes;
    ws->limits.max_user_bytes = cfg->max_user_bytes > 0 ? (size_t)cfg->max_user_bytes : 256;
    ws->send_deadline_ms = mg_config_send_deadline_ms(cfg);
    ws->ping_seconds = cfg->ping_seconds > 0 ? (int)cfg->ping_seconds : 30;
    ws->fd_reserve = (size_t)cfg->fd_reserve;
    ws->max_handshakes = (size_t)cfg->ws_max_handshakes;
    ws->max_header_bytes = (size_t)cfg->ws_max_header_bytes;
    mg_ws_limiter_config lc = {
        .handshake_timeout_ms = cfg->ws_handshake_timeout_ms,
        .send_rate = (double)cfg->ws_send_rate,
        .send_burst = (double)cfg->ws_send_burst,
        .max_per_ip = (size_t)cfg->max_connections_per_ip,
    };
    /* ws->lim: the per-address counts (shared by the loops, under its lock)
     * and the send rate; each loop has its own for its handshakes (at start,
     * with the cap from the fd budget) */
    ws->lim = mg_ws_limiter_create(&lc);
    ws->lim_cfg = lc;
    mg_gauge_fn_register(HANDSHAKES_GAUGE, HANDSHAKES_HELP, NULL, handshakes_gauge, ws->lim);
    ws->nloops = cfg->ws_threads > 0 ? (unsigned)cfg->ws_threads : mg_ws_default_threads();
    if (ws->nloops > MAX_WS_THREADS)
        ws->nloops = MAX_WS_THREADS;
    ws->m_slow = mg_counter("meshgate_ws_slow_consumer_closes_total",
                            "connections closed as slow consumers (4008)", NULL);
    mg_hub_config hc = {
        .gateway_id = ws->gateway_id,
        .max_frames = cfg->outbound_queue > 0 ? (size_t)cfg->outbound_queue : 256,
        .max_bytes = cfg->outbound_queue_bytes > 0 ? (size_t)cfg->outbound_queue_bytes : 1 << 20,
        .headroom = LWS_PRE,
        .shards = ws->nloops,
        .wake = wake,
        .wake_arg = ws,
        .write_wait_ms = (int)cfg->delivery_write_wait_ms,
        .slow_counter = ws->m_slow,
    };
    ws->hub = mg_hub_create(&hc);
    ws->m_in =
        mg_counter("meshgate_ws_messages_in_total", "text frames received from clients", NULL);
    ws->m_out =
        mg_counter("meshgate_ws_messages_out_total", "message frames written to clients", NULL);

    ws->m_conns_total = mg_counter("meshgate_ws_connections_opened_total",
                                   "WebSocket connections established", NULL);
    ws->m_conns =
        mg_gauge("meshgate_ws_connections", "open WebSocket connections on this gateway", NULL);
    ws->loops = mg_xcalloc(ws->nloops, sizeof(ws_loop));
    for (unsigned i = 0; i < ws->nloops; i++) {
        char labels[32];
        snprintf(labels, sizeof(labels), "loop=\"%u\"", i);
        ws->loops[i].ws = ws;
        ws->loops[i].idx = i;
        ws->loops[i].lfd = -1;
        ws->loops[i].m_conns =
            mg_gauge("meshgate_ws_loop_connections",
                     "open WebSocket connections by service loop (--ws-threads)", labels);
    }
    ws->m_expired = mg_counter("meshgate_ws_token_expired_total",
                               "connections closed with 4401 because their token expired", NULL);
    ws->m_refreshed = mg_counter("meshgate_ws_token_refreshed_total",
                                 "refresh frames accepted (the connection's expiry moved)", NULL);
    if (!auth)
        mg_log_warn("ws",
                    "NO CLIENT AUTHENTICATION: ?user=NAME is trusted as the user id; "
                    "allowed only because listen=%s is loopback. Set --jwt-secret or "
                    "--jwt-public-key-file for anything but local development",
                    cfg->ws_listen);
    return ws;
}

mg_local_sink mg_ws_server_sink(mg_ws_server *ws)
{
    return mg_hub_sink(ws->hub);
}

void mg_ws_server_set_router(mg_ws_server *ws, mg_router *r)
{
    ws->router = r;
}

void mg_ws_server_set_http_hook(mg_ws_server *ws, const char *path,
                                char *(*render)(void *arg, const char **content_type), void *arg)
{
    if (ws->nhooks == MAX_HOOKS) {
        mg_log_error("ws", "too many http hooks, ignoring path=%s", path);
        return;
    }
    ws->hooks[ws->nhooks++] = (hook){mg_xstrdup(path), render, arg};
}

static void *service_main(void *arg)
{
    ws_loop *L = arg;
    mg_hub_mark_service_thread();
    /* lws's libev glue dispatches each ready descriptor and runs its timers
     * (timeouts, the write-wait timer) from this loop; it returns when the
     * stop's cancel reaches the callback (ev_break). A stop that came before
     * the loop ran is seen here. */
    if (!atomic_load(&L->ws->stopping))
        ev_run(L->loop, 0);
    return NULL;
}

static unsigned raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 1024;
    if (rl.rlim_cur < rl.rlim_max) {
        rlim_t old = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            rl.rlim_cur = old;
    }
    return rl.rlim_cur > 4000000 ? 4000000u : (unsigned)rl.rlim_cur;
}

/* The cgroup v2 CPU quota of this process, rounded up (0: none found). */
static unsigned cgroup_cpus(void)
{
    char path[512] = "/sys/fs/cgroup/cpu.max", line[512];
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (f) {
        while (fgets(line, sizeof(line), f)) {
            if (strncmp(line, "0::", 3) == 0) {
                line[strcspn(line, "\n")] = 0;
                if (strcmp(line + 3, "/") != 0)
                    snprintf(path, sizeof(path), "/sys/fs/cgroup%.400s/cpu.max", line + 3);
                break;
            }
        }
        fclose(f);
    }
    f = fopen(path, "r");
    if (!f && strcmp(path, "/sys/fs/cgroup/cpu.max") != 0) /* a namespaced view */
        f = fopen("/sys/fs/cgroup/cpu.max", "r");
    if (!f)
        return 0;
    char quota[32] = "";
    unsigned long long period = 0;
    int n = fscanf(f, "%31s %llu", quota, &period);
    fclose(f);
    if (n != 2 || strcmp(quota, "max") == 0 || period == 0)
        return 0;
    unsigned long long q = strtoull(quota, NULL, 10);
    return q ? (unsigned)((q + period - 1) / period) : 0;
}

unsigned mg_ws_default_threads(void)
{
    unsigned n = 1;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        n = (unsigned)CPU_COUNT(&set);
    unsigned q = cgroup_cpus();
    if (q && q < n)
        n = q;
    return n < 1 ? 1 : n > MAX_WS_THREADS ? MAX_WS_THREADS : n;
}

/* A listening socket on host:port (port 0: any; the first loop's port for
 * the others). Several loops: one listener each on the same port
 * (SO_REUSEPORT); the kernel spreads new connections over them, and a
 * connection stays on the loop that accepted it. lws's SMP service threads
 * would share one listener, but Debian's lws is built with LWS_MAX_SMP 1,
 * and lws 4.1 sets no SO_REUSEPORT (its ALLOW_LISTEN_SHARE is a Windows
 * option), so the listeners are ours and lws adopts each accepted socket.
 * The host as before: "", "::" and "*" are every address (IPv6 and IPv4),
 * "0.0.0.0" every IPv4 address, "localhost" 127.0.0.1, else the address it
 * resolves to. Returns the fd or -errno (reason in err). */
static int open_listener(const char *host, int port, bool reuseport, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res = NULL;
    char ports[16];
    snprintf(ports, sizeof(ports), "%d", port);
    bool dual = !host[0] || strcmp(host, "::") == 0 || strcmp(host, "*") == 0;
    const char *node = dual ? "::" : strcmp(host, "localhost") == 0 ? "127.0.0.1" : host;
    int rc = getaddrinfo(node, ports, &hints, &res);
    if (rc != 0 || !res) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(rc));
        return -EADDRNOTAVAIL;
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        rc = -errno;
        snprintf(err, errlen, "socket: %s", strerror(errno));
        freeaddrinfo(res);
        return rc;
    }
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (res->ai_family == AF_INET6 && dual)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, LISTEN_BACKLOG) != 0) {
        rc = -errno;
        snprintf(err, errlen, "%s", strerror(errno)); /* "Address already in use" */
        close(fd);
        freeaddrinfo(res);
        return rc;
    }
    freeaddrinfo(res);
    return fd;
}

static int listener_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return -1;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

/* The listener is readable: accept up to ACCEPT_BURST and give each to this
 * loop's lws context, which serves it as if its own listener had accepted
 * it (NEW_CLIENT_INSTANTIATED, HTTP, upgrade). Out of descriptors (EMFILE),
 * accepting pauses for ACCEPT_PAUSE_S instead of spinning on the ready
 * listener; the connection caps (ws_limits.h) keep that rare. */
static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    ws_loop *L = lws_container_of(w, ws_loop, accept_w);
    for (int i = 0; i < ACCEPT_BURST; i++) {
        int fd = accept4(L->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                mg_log_warn("ws", "accept paused loop=%u: %s", L->idx, strerror(errno));
                ev_io_stop(loop, &L->accept_w);
                ev_timer_start(loop, &L->accept_pause);
            }
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        lws_adopt_socket_vhost(L->vh, fd); /* closes fd when it fails */
    }
}

static void accept_resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    ws_loop *L = lws_container_of(w, ws_loop, accept_pause);
    ev_timer_stop(loop, w);
    ev_io_start(loop, &L->accept_w);
}

/* With several loops every listener sets SO_REUSEPORT, which would also let
 * another process of this user (a second gateway given the same port) bind
 * it unnoticed and take a share of the connections. A listener without
 * SO_REUSEPORT first finds the port in use, as one loop would; our own bind
 * follows at once (the other process's probe then fails in turn). Returns 0
 * or -errno (logged). */
static int probe_port(mg_ws_server *ws)
{
    char err[160];
    int fd = open_listener(ws->host, ws->port, false, err, sizeof(err));
    if (fd < 0) {
        mg_log_error("ws", "cannot listen on %s:%d: %s", ws->host, ws->port, err);
        return fd;
    }
    close(fd);
    return 0;
}

/* Frees what loop_create made (no thread running on it). */
static void loop_destroy(ws_loop *L)
{
    if (L->wait_timer_armed) /* its thread is gone: safe from here */
        lws_sul_cancel(&L->wait_timer);
    L->wait_timer_armed = false;
    mg_ws_limiter_detach(L->hs);
    /* The loop has stopped and its thread is gone: lws closes the rest here
     * (CLOSED callbacks run on this thread) and stops its libev watchers,
     * which needs no loop turn; then the loop itself goes. */
    if (L->loop) {
        ev_timer_stop(L->loop, &L->sul_tick);
        ev_io_stop(L->loop, &L->accept_w);
        ev_timer_stop(L->loop, &L->accept_pause);
    }
    if (L->lfd >= 0)
        close(L->lfd);
    L->lfd = -1;
    if (L->ctx)
        lws_context_destroy(L->ctx);
    L->ctx = NULL;
    if (L->loop)
        ev_loop_destroy(L->loop);
    L->loop = NULL;
    mg_ws_limiter_free(L->hs);
    L->hs = NULL;
    free(L->wheel);
    L->wheel = NULL;
    free(L->obuf);
    L->obuf = NULL;
    L->nready = 0;
    free(L->hbuf);
    L->hbuf = NULL;
    stash_clear(L);
}

/* One loop's context on port (0: any; the first loop's port for the
 * others). Returns 0 or a negative errno (the reason is logged). */
static int loop_create(ws_loop *L, int port, size_t hs_cap)
{
    mg_ws_server *ws = L->ws;
    L->nslots = (uint32_t)ws->ping_seconds * 1000 / 2 / PING_SLOT_MS;
    if (L->nslots < 1)
        L->nslots = 1;
    L->wheel = mg_xcalloc(L->nslots, sizeof(*L->wheel));
    L->next_slot_ms = mg_mono_ms() + PING_SLOT_MS;
    L->obuf = mg_xmalloc(LWS_PRE + OBUF_BYTES);
    L->hbuf = mg_xmalloc(LWS_PRE + HTTP_CHUNK);
    L->hs = mg_ws_limiter_create(&ws->lim_cfg);
    mg_ws_limiter_share_handshakes(L->hs, ws->lim);
    mg_ws_limiter_set_max_handshakes(L->hs, hs_cap);
    char err[160];
    L->lfd = open_listener(ws->host, port, ws->nloops > 1, err, sizeof(err));
    if (L->lfd < 0) {
        int rc = L->lfd;
        mg_log_error("ws", "cannot listen on %s:%d: %s", ws->host, port, err);
        L->lfd = -1;
        return rc;
    }
    if (L->idx == 0)
        ws->bound_port = listener_port(L->lfd);
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof(info));
    info.port = CONTEXT_PORT_NO_LISTEN_SERVER; /* the listener is ours (open_listener) */
    info.protocols = ws->protocols;
    info.user = L;
    info.count_threads = 1;
    /* An epoll loop instead of lws's poll(): poll() passes every descriptor
     * on every turn, so a turn cost grew with the idle connections. The loop
     * is ours (foreign to lws): no signal watchers (main takes signals with
     * sigtimedwait, EVFLAG_NOSIGMASK leaves the mask alone), and the stop is
     * ours too (ev_break on its thread, lws_context_destroy after the join,
     * ev_loop_destroy last). */
    L->loop = ev_loop_new(EVBACKEND_EPOLL | EVFLAG_NOSIGMASK | EVFLAG_NOENV);
    if (!L->loop) {
        mg_log_error("ws", "cannot create the epoll loop (libev)");
        return -ENOMEM;
    }
    void *loops[1] = {L->loop};
    info.options |= LWS_SERVER_OPTION_LIBEV;
    info.foreign_loops = loops;
    /* lws's own table stays the process limit: given fd_limit_per_thread, lws
     * 4.1 finds a connection by a linear scan of its table on every event
     * (wsi_from_fd, "max_fds_unrelated_to_ulimit"): 40 % of a 10,000-user
     * fan-out. The global caps keep connections + handshakes within the
     * budget, so the reserve is never taken and accept never meets EMFILE. */
    info.retry_and_idle_policy = &ws->retry;
    /* a header table for every handshake allowed, and some for HTTP probes */
    size_t pool = (hs_cap ? hs_cap : 256) + 32;
    info.max_http_header_pool = pool > 65535 ? 65535 : (unsigned short)pool;
    info.max_http_header_data = (unsigned short)ws->max_header_bytes;
    info.timeout_secs = 10;
    info.pt_serv_buf_size = 16384;
    info.vhost_name = "default";
    L->ctx = lws_create_context(&info);
    if (!L->ctx) {
        mg_log_error("ws",
                     "cannot listen on %s (lws_create_context failed; is lws's libev plugin "
                     "libwebsockets-evlib-ev installed?)",
                     ws->host);
        return -EADDRNOTAVAIL;
    }
    mg_ws_limiter_attach(L->hs, L->ctx);
    L->vh = lws_get_vhost_by_name(L->ctx, "default");
    if (!L->vh) {
        mg_log_error("ws", "lws made no vhost (loop %u)", L->idx);
        return -ENOMEM;
    }
    ev_timer_init(&L->sul_tick, sul_tick_cb, SUL_TICK_SECONDS, SUL_TICK_SECONDS);
    ev_timer_start(L->loop, &L->sul_tick);
    ev_io_init(&L->accept_w, accept_cb, L->lfd, EV_READ);
    ev_io_start(L->loop, &L->accept_w);
    ev_timer_init(&L->accept_pause, accept_resume_cb, ACCEPT_PAUSE_S, 0.);
    return 0;
}

static void stop_loops(mg_ws_server *ws)
{
    for (unsigned i = 0; i < ws->nloops; i++)
        if (ws->loops[i].ctx)
            lws_cancel_service(ws->loops[i].ctx);
    for (unsigned i = 0; i < ws->nloops; i++) {
        if (ws->loops[i].thread_started)
            pthread_join(ws->loops[i].thread, NULL);
        ws->loops[i].thread_started = false;
    }
    mg_hub_set_wake(ws->hub, NULL, NULL);
    for (unsigned i = 0; i < ws->nloops; i++)
        loop_destroy(&ws->loops[i]);
}

int mg_ws_server_start(mg_ws_server *ws)
{
    if (ws->started)
        return -EALREADY;
    ws->inline_jobs = ws->router && mg_router_nonblocking(ws->router);
    lws_set_log_level(LLL_ERR, lws_log_emit);
    ws->protocols[0] = (struct lws_protocols){
        .name = "meshgate",
        .callback = callback,
        .per_session_data_size = sizeof(pss),
        .rx_buffer_size = RX_BUFFER,
        /* lws sends at most this per write (else rx_buffer_size, 1 KB) and
         * buffers the rest: a coalesced write goes out in one send() */
        .tx_packet_size = OBUF_BYTES,
    };
    /* no lws pings (see "pings" above): the wheel pings */
    ws->retry = (lws_retry_bo_t){0};
    unsigned nofile = raise_nofile();
    size_t hs_cap;
    unsigned lws_fds;
    size_t asked = ws->max_conns;
    mg_ws_fd_budget(nofile, ws->fd_reserve, asked, ws->max_handshakes, &ws->max_conns, &hs_cap,
                    &lws_fds);
    if (ws->max_conns < asked)
        mg_log_warn("ws",
                    "connection cap lowered to the fd limit max_connections=%zu nofile=%u "
                    "fd_reserve=%zu handshakes=%zu (raise RLIMIT_NOFILE for more)",
                    ws->max_conns, nofile, ws->fd_reserve, hs_cap);
    /* the handshake cap is the process's: the loops' limiters share one
     * count, and a loop at the cap closes its own oldest */
    size_t hs_loop = hs_cap;
    int rc = 0;
    if (ws->nloops > 1 && ws->port != 0 && (rc = probe_port(ws)) != 0)
        return rc;
    for (unsigned i = 0; i < ws->nloops && rc == 0; i++)
        rc = loop_create(&ws->loops[i], i == 0 ? ws->port : ws->bound_port, hs_loop);
    for (unsigned i = 0; i < ws->nloops && rc == 0; i++) {
        ws_loop *L = &ws->loops[i];
        if (pthread_create(&L->thread, NULL, service_main, L) != 0) {
            rc = -EAGAIN;
            break;
        }
        L->thread_started = true;
        char name[16];
        snprintf(name, sizeof(name), "ws-%u", i);
        pthread_setname_np(L->thread, name);
    }
    if (rc != 0) {
        atomic_store(&ws->stopping, true);
        stop_loops(ws);
        atomic_store(&ws->stopping, false);
        return rc;
    }
    ws->started = true;
    mg_log_info("ws",
                "listening host=%s port=%d auth=%s fd_limit=%u ping_seconds=%d "
                "max_connections=%zu max_handshakes=%zu loops=%u loop=%s",
                ws->host, ws->bound_port, ws->auth ? "jwt" : "none(loopback ?user=)", lws_fds,
                ws->ping_seconds, ws->max_conns, hs_cap, ws->nloops,
                ev_backend(ws->loops[0].loop) == EVBACKEND_EPOLL ? "epoll" : "other");
    return 0;
}

int mg_ws_server_port(mg_ws_server *ws)
{
    return ws->bound_port;
}

void mg_ws_server_set_ready(mg_ws_server *ws, bool ready)
{
    atomic_store(&ws->ready, ready);
}

size_t mg_ws_server_connections(mg_ws_server *ws)
{
    return mg_hub_count(ws->hub);
}

void mg_ws_server_drain(mg_ws_server *ws, int seconds)
{
    atomic_store(&ws->ready, false);
    atomic_store(&ws->draining, true);
    char **ids;
    size_t n = mg_hub_conn_ids(ws->hub, &ids);
    mg_log_info("ws", "draining connections=%zu window_seconds=%d", n, seconds);
    int64_t start = mg_mono_ms();
    int64_t window = seconds > 0 ? (int64_t)seconds * 1000 : 0;
    int64_t spread = window * 8 / 10; /* leave the last fifth for the closes to finish */
    size_t done = 0;
    for (;;) {
        int64_t el = mg_mono_ms() - start;
        size_t target =
            spread > 0 && el < spread ? (size_t)((double)n * (double)el / (double)spread) + 1 : n;
        if (target > n)
            target = n;
        for (; done < target; done++)
            mg_hub_disconnect(ws->hub, NULL, ids[done], 1012, "service restart");
        /* every connection closed, and none still in its handshake: one whose
         * upgrade passed the filter before the drain is closed with 1012 as it
         * opens (on_established) */
        if (done == n && mg_hub_count(ws->hub) == 0 && mg_ws_limiter_live(ws->lim) == 0)
            break;
        if (el >= window)
            break;
        usleep(20000);
    }
    mg_hub_ids_free(ids, n);
    mg_log_info("ws", "drain done remaining=%zu", mg_hub_count(ws->hub));
}

void mg_ws_server_stop(mg_ws_server *ws)
{
    if (!ws || !ws->started)
        return;
    atomic_store(&ws->stopping, true);
    mg_hub_stop_waits(ws->hub); /* nothing will be written any more */
    stop_loops(ws);
    ws->started = false;
}

void mg_ws_server_free(mg_ws_server *ws)
{
    if (!ws)
        return;
    mg_ws_server_stop(ws);
    mg_hub_free(ws->hub);
    mg_jwt_auth_free(ws->auth);
    mg_gauge_fn_register(HANDSHAKES_GAUGE, HANDSHAKES_HELP, NULL, NULL, NULL);
    mg_ws_limiter_free(ws->lim);
    for (int i = 0; i < ws->nhooks; i++)
        free(ws->hooks[i].path);
    free(ws->loops);
    free(ws->gateway_id);
    free(ws->host);
    pthread_mutex_destroy(&ws->mu);
    free(ws);
}
