/* transport_redis_pubsub.c: the Redis Pub/Sub bus (see
 * transport_redis_pubsub.h).
 *
 * DESIGN
 * Everything that touches a socket, the pending table or a timer runs on
 * the "redis-pubsub" I/O thread's libev loop. deliver() (any thread) packs
 * the envelope, counts the message against max_pending and posts it to the
 * loop (locked queue + ev_async); the loop gives it a sequence entry in
 * `pending` and a libev timer, and writes SPUBLISH to the connection of the
 * master owning the target channel's slot. Replies come back in order per
 * connection (a FIFO of what each reply answers): 0 receivers fails the
 * message at once, >= 1 answers LOW (ACCEPTED) and leaves HIGH waiting for
 * its receipt, which arrives on this gateway's own subscription. Whatever
 * ends a message (reply, receipt, timer, connection loss, stop) removes it
 * from `pending` first, so a late reply or receipt finds nothing and is
 * dropped: each completion runs exactly once.
 *
 * Connections are non-blocking sockets with hiredis's reader (Debian's
 * hiredis 0.14 async client does not know sharded pub/sub). A publishing
 * connection is opened on first use and again after it failed; the
 * subscription connection is re-opened by a timer with backoff.
 */
#include "router/transport_redis_pubsub.h"
#include "router/bus_metrics.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/redis_cluster.h"

#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAGIC           "MGP1"
#define MAGIC_LEN       4
#define KIND_MSG        'M'
#define KIND_RECEIPT    'R'
#define FLAG_WANT       1
#define FLAG_NOTCONN    1
#define FLAG_DUP        2
#define READ_CHUNK      65536
#define RESUB_MIN_MS    50
#define RESUB_MAX_MS    1000
#define TICK_SECONDS    1.0
#define REFRESH_MIN_US  250000  /* between slot map reloads asked for by events */
#define REFRESH_IDLE_US 2000000 /* a reload at least this often (the tick) */
#define LABEL           "bus=\"redis-pubsub\""

typedef struct trp trp;

/* What a reply on a publishing connection answers. */
enum { E_AUTH, E_PUB, E_RECEIPT };

typedef struct expect {
    uint8_t kind;
    uint64_t seq;
} expect;

typedef struct rconn {
    trp *t;
    char addr[96];
    bool sub; /* the subscription connection */
    int fd;   /* -1: closed */
    bool connected;
    ev_io rio, wio;
    redisReader *reader;
    char *wbuf;
    size_t wlen, woff, wcap;
    expect *q; /* ring of replies awaited */
    size_t qhead, qn, qcap;
    int64_t progress_us; /* last reply, or when the first awaited one was asked */
    struct rconn *next;  /* in t->pubs */
} rconn;

/* A message in flight, or a receipt to publish (done == NULL). */
typedef struct pend {
    trp *t;
    uint64_t seq;
    char key[24];
    char *channel, *target, *id, *to;
    uint8_t *frame;
    size_t len;
    bool high, redirected, published;
    int64_t deadline_ms, start_us;
    mg_deliver_done done;
    void *arg;
    ev_timer timer;
    struct pend *next; /* in the post queue */
} pend;

struct trp {
    mg_transport base;
    char *gateway_id, *channel, *user, *password;
    unsigned slot;
    mg_redis_cluster *rc;
    mg_pool *pool;
    mg_peers *peers;
    int timeout_ms;
    size_t max_bytes, max_pending;
    mg_router *router;

    struct ev_loop *loop;
    ev_async wake;
    ev_timer tick, resub;
    pthread_t thread;

    pthread_mutex_t mu; /* the post queue, the requests, the acks below */
    pthread_cond_t cv;
    pend *qhead, *qtail;
    bool start_req, stop_req, quit_req, stop_acked;
    char sub_err[200];

    atomic_bool subscribed, stopped, refreshing;
    atomic_uint_fast64_t seq;
    atomic_size_t npending;

    /* I/O thread only */
    bool started, io_stopped;
    mg_map *pending;
    rconn *pubs;
    rconn subc;
    char moved_addr[96];
    char left_addr[96]; /* the node that SUNSUBSCRIBEd us: not again before left_until_us */
    int64_t left_until_us;
    int resub_ms, owner_mismatch;
    int64_t sub_since_us, last_pong_us, last_refresh_us;

    mg_metric *sent, *received, *receipt_lat, *local_lat, *resubscribes, *bad_undecodable,
        *bad_oversized, *late_receipts;
    mg_metric *failed_no_sub, *failed_timeout, *failed_error, *failed_overload, *failed_stopping;
};

void mg_pubsub_channel(const char *gateway_id, char *buf, size_t len)
{
    snprintf(buf, len, MG_PUBSUB_CHANNEL_PREFIX "{%s}", gateway_id);
}

static void trp_trace_attrs(mg_transport *t, const mg_route_target *target, mg_span *span)
{
    (void)t;
    char channel[160];
    if (target && target->gateway_id) {
        mg_pubsub_channel(target->gateway_id, channel, sizeof(channel));
        mg_span_attr(span, "messaging.destination.name", channel);
    }
}

static char *channel_of(const char *gateway_id)
{
    size_t n = strlen(gateway_id) + sizeof(MG_PUBSUB_CHANNEL_PREFIX) + 3;
    char *c = mg_xmalloc(n);
    mg_pubsub_channel(gateway_id, c, n);
    return c;
}

/* ---- envelope ------------------------------------------------------------ */

static uint8_t *put_u16(uint8_t *p, size_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return p + 2;
}

static uint8_t *put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--)
        *p++ = (uint8_t)(v >> (8 * i));
    return p;
}

static uint8_t *put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--)
        *p++ = (uint8_t)(v >> (8 * i));
    return p;
}

static uint8_t *put_str(uint8_t *p, const char *s, size_t n)
{
    p = put_u16(p, n);
    memcpy(p, s, n);
    return p + n;
}

/* A reader over a received payload: every get fails once past the end. */
typedef struct rd {
    const uint8_t *p, *end;
    bool bad;
} rd;

static uint64_t get_n(rd *r, int bytes)
{
    if (r->bad || r->end - r->p < bytes) {
        r->bad = true;
        return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | *r->p++;
    return v;
}

/* A length-prefixed string, copied (NULL when bad). */
static char *get_str(rd *r)
{
    size_t n = (size_t)get_n(r, 2);
    if (r->bad || (size_t)(r->end - r->p) < n) {
        r->bad = true;
        return NULL;
    }
    char *s = mg_xstrndup((const char *)r->p, n);
    r->p += n;
    return s;
}

static uint8_t *frame_msg(const mg_msg *msg, uint64_t seq, const char *origin, bool want,
                          size_t *len)
{
    size_t plen;
    uint8_t *packed = mg_msg_pack(msg, &plen);
    size_t olen = strlen(origin);
    *len = MAGIC_LEN + 2 + 8 + 2 + olen + plen;
    uint8_t *f = mg_xmalloc(*len), *p = f;
    memcpy(p, MAGIC, MAGIC_LEN);
    p += MAGIC_LEN;
    *p++ = KIND_MSG;
    *p++ = want ? FLAG_WANT : 0;
    p = put_u64(p, seq);
    p = put_str(p, origin, olen);
    memcpy(p, packed, plen);
    free(packed);
    return f;
}

static uint8_t *frame_receipt(uint64_t seq, const char *id, const char *to,
                              const mg_deliver_outcome *out, size_t *len)
{
    size_t il = strlen(id), tl = strlen(to);
    *len = MAGIC_LEN + 1 + 1 + 1 + 4 + 8 + 2 + il + 2 + tl;
    uint8_t *f = mg_xmalloc(*len), *p = f;
    memcpy(p, MAGIC, MAGIC_LEN);
    p += MAGIC_LEN;
    *p++ = KIND_RECEIPT;
    *p++ = (uint8_t)out->status;
    *p++ = (out->not_connected ? FLAG_NOTCONN : 0) | (out->duplicate ? FLAG_DUP : 0);
    p = put_u32(p, out->connections);
    p = put_u64(p, seq);
    p = put_str(p, id, il);
    put_str(p, to, tl);
    return f;
}

/* ---- posting to the loop ------------------------------------------------- */

static void pend_free(pend *p)
{
    free(p->channel);
    free(p->target);
    free(p->id);
    free(p->to);
    free(p->frame);
    free(p);
}

static void post(trp *t, pend *p)
{
    p->next = NULL;
    pthread_mutex_lock(&t->mu);
    if (t->qtail)
        t->qtail->next = p;
    else
        t->qhead = p;
    t->qtail = p;
    pthread_mutex_unlock(&t->mu);
    ev_async_send(t->loop, &t->wake);
}

/* ---- completions (I/O thread) -------------------------------------------- */

static void finish(pend *p, const mg_deliver_outcome *out)
{
    trp *t = p->t;
    ev_timer_stop(t->loop, &p->timer);
    mg_map_del(t->pending, p->key);
    atomic_fetch_sub(&t->npending, 1);
    p->done(p->arg, out);
    pend_free(p);
}

static void finish_fail(pend *p, mg_metric *m, const char *fmt, ...)
{
    mg_deliver_outcome out = {.status = MG_STATUS_FAILED};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out.reason, sizeof(out.reason), fmt, ap);
    va_end(ap);
    if (m)
        mg_metric_add(m, 1);
    finish(p, &out);
}

static void on_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    pend *p = w->data;
    if (p->published)
        finish_fail(p, p->t->failed_timeout,
                    "redis-pubsub: no receipt from gateway %s within the wait", p->target);
    else
        finish_fail(p, p->t->failed_timeout, "redis-pubsub: no reply from Redis in time");
}

/* ---- topology ------------------------------------------------------------ */

static void refresh_job(void *arg)
{
    trp *t = arg;
    mg_redis_cluster_refresh(t->rc);
    atomic_store(&t->refreshing, false);
}

/* Reloads the slot map (at most every REFRESH_MIN_US): on the store pool,
 * or here without one. Redis 7.0 lets a replica take SPUBLISH and SSUBSCRIBE
 * for its master's slots (SPUBLISH answers 0, no MOVED), so after a
 * failover nothing redirects us: a fresh map is what moves both ends. */
static void request_refresh(trp *t)
{
    int64_t now = mg_mono_us();
    if ((t->io_stopped && t->pool) || now - t->last_refresh_us < REFRESH_MIN_US)
        return; /* stopped: the pool may be gone */
    if (atomic_exchange(&t->refreshing, true))
        return;
    t->last_refresh_us = now;
    if (t->pool) {
        if (mg_pool_submit(t->pool, refresh_job, t) != 0)
            atomic_store(&t->refreshing, false);
        return;
    }
    mg_redis_cluster_refresh(t->rc);
    atomic_store(&t->refreshing, false);
}

static void owner_of(trp *t, unsigned slot, char *buf, size_t len)
{
    mg_redis_cluster_slot_owner(t->rc, slot, buf, len);
}

/* "MOVED 3999 127.0.0.1:6381" / "ASK ..." -> the address; false otherwise. */
static bool redirect_addr(const redisReply *r, char *addr, size_t len)
{
    if (r->type != REDIS_REPLY_ERROR ||
        (strncmp(r->str, "MOVED ", 6) && strncmp(r->str, "ASK ", 4)))
        return false;
    const char *a = strrchr(r->str, ' ');
    if (!a || !a[1])
        return false;
    snprintf(addr, len, "%s", a + 1);
    return true;
}

/* ---- connections --------------------------------------------------------- */

static void conn_close(rconn *c, const char *why);
static void on_read(struct ev_loop *loop, ev_io *w, int revents);
static void on_write(struct ev_loop *loop, ev_io *w, int revents);

static void wbuf_append(rconn *c, const char *s, size_t n)
{
    if (c->wlen + n > c->wcap) {
        c->wcap = (c->wlen + n) * 2 > 4096 ? (c->wlen + n) * 2 : 4096;
        c->wbuf = mg_xrealloc(c->wbuf, c->wcap);
    }
    memcpy(c->wbuf + c->wlen, s, n);
    c->wlen += n;
}

/* Appends one command in RESP and starts the write watcher. */
static void send_cmd(rconn *c, int argc, const char *const *argv, const size_t *lens)
{
    char hdr[32];
    wbuf_append(c, hdr, (size_t)snprintf(hdr, sizeof(hdr), "*%d\r\n", argc));
    for (int i = 0; i < argc; i++) {
        wbuf_append(c, hdr, (size_t)snprintf(hdr, sizeof(hdr), "$%zu\r\n", lens[i]));
        wbuf_append(c, argv[i], lens[i]);
        wbuf_append(c, "\r\n", 2);
    }
    ev_io_start(c->t->loop, &c->wio);
}

static void expect_push(rconn *c, uint8_t kind, uint64_t seq)
{
    if (c->qn == c->qcap) {
        size_t ncap = c->qcap ? c->qcap * 2 : 64;
        expect *nq = mg_xcalloc(ncap, sizeof(*nq));
        for (size_t i = 0; i < c->qn; i++)
            nq[i] = c->q[(c->qhead + i) % c->qcap];
        free(c->q);
        c->q = nq;
        c->qhead = 0;
        c->qcap = ncap;
    }
    if (c->qn == 0)
        c->progress_us = mg_mono_us();
    c->q[(c->qhead + c->qn++) % c->qcap] = (expect){kind, seq};
}

static bool expect_pop(rconn *c, expect *out)
{
    if (c->qn == 0)
        return false;
    *out = c->q[c->qhead];
    c->qhead = (c->qhead + 1) % c->qcap;
    c->qn--;
    return true;
}

static void send_auth(rconn *c)
{
    trp *t = c->t;
    if (!t->password)
        return;
    const char *argv[3] = {"AUTH", t->user ? t->user : t->password, t->password};
    size_t lens[3] = {4, strlen(argv[1]), strlen(argv[2])};
    send_cmd(c, t->user ? 3 : 2, argv, lens);
    if (!c->sub)
        expect_push(c, E_AUTH, 0);
}

/* Opens c to c->addr (non-blocking; the write watcher sees the connect
 * finish). Returns 0 or a negative errno. */
static int conn_open(rconn *c)
{
    char host[96];
    const char *colon = strrchr(c->addr, ':');
    if (!colon || colon == c->addr)
        return -EINVAL;
    snprintf(host, sizeof(host), "%.*s", (int)(colon - c->addr), c->addr);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &ai) != 0 || !ai)
        return -EHOSTUNREACH;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int rc = fd < 0 ? -errno : 0;
    if (rc == 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
            rc = -errno;
            close(fd);
        }
    }
    freeaddrinfo(ai);
    if (rc != 0)
        return rc;
    c->fd = fd;
    c->connected = false;
    c->reader = redisReaderCreate();
    if (c->reader)
        mg_redis_reader_bound(c->reader);
    c->wlen = c->woff = 0;
    c->qhead = c->qn = 0;
    c->progress_us = mg_mono_us();
    ev_io_init(&c->rio, on_read, fd, EV_READ);
    ev_io_init(&c->wio, on_write, fd, EV_WRITE);
    c->rio.data = c->wio.data = c;
    ev_io_start(c->t->loop, &c->rio);
    ev_io_start(c->t->loop, &c->wio);
    send_auth(c);
    return 0;
}

static void on_write(struct ev_loop *loop, ev_io *w, int revents)
{
    rconn *c = w->data;
    if (!c->connected) {
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            conn_close(c, strerror(err));
            return;
        }
        c->connected = true;
    }
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) {
            conn_close(c, strerror(errno));
            return;
        }
        c->woff += (size_t)n;
    }
    c->wlen = c->woff = 0;
    ev_io_stop(loop, w);
}

static void pub_reply(rconn *c, const expect *e, redisReply *r);
static void sub_reply(trp *t, redisReply *r);

static void on_read(struct ev_loop *loop, ev_io *w, int revents)
{
    rconn *c = w->data;
    char buf[READ_CHUNK];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) {
            conn_close(c, n == 0 ? "closed by the server" : strerror(errno));
            return;
        }
        redisReaderFeed(c->reader, buf, (size_t)n);
        void *reply;
        int rc;
        while ((rc = redisReaderGetReply(c->reader, &reply)) == REDIS_OK && reply) {
            if (c->sub) {
                sub_reply(c->t, reply);
            } else {
                expect e;
                if (!expect_pop(c, &e)) {
                    freeReplyObject(reply);
                    conn_close(c, "a reply nobody asked for");
                    return;
                }
                c->progress_us = mg_mono_us();
                pub_reply(c, &e, reply);
            }
            freeReplyObject(reply);
            if (c->fd < 0)
                return; /* closed while handling the reply */
        }
        if (rc != REDIS_OK) {
            conn_close(c, "protocol error");
            return;
        }
        if ((size_t)n < sizeof(buf))
            return;
    }
}

static void sub_schedule(trp *t, int ms);

/* Closes c; what waited for its replies fails (the subscription is opened
 * again by a timer). */
static void conn_close(rconn *c, const char *why)
{
    trp *t = c->t;
    if (c->fd < 0)
        return;
    ev_io_stop(t->loop, &c->rio);
    ev_io_stop(t->loop, &c->wio);
    close(c->fd);
    c->fd = -1;
    c->connected = false;
    redisReaderFree(c->reader);
    c->reader = NULL;
    c->wlen = c->woff = 0;
    if (c->sub) {
        bool was = atomic_exchange(&t->subscribed, false);
        if (!t->io_stopped) {
            mg_log_warn("redis-pubsub", "subscription lost node=%s channel=%s reason=%s%s", c->addr,
                        t->channel, why, was ? "" : " (not subscribed yet)");
            pthread_mutex_lock(&t->mu);
            snprintf(t->sub_err, sizeof(t->sub_err), "%s: %s", c->addr, why);
            pthread_mutex_unlock(&t->mu);
            request_refresh(t);
            sub_schedule(t, t->resub_ms);
            t->resub_ms = t->resub_ms * 2 > RESUB_MAX_MS ? RESUB_MAX_MS : t->resub_ms * 2;
        }
        return;
    }
    mg_log_warn("redis-pubsub", "connection closed node=%s reason=%s awaiting=%zu", c->addr, why,
                c->qn);
    expect e;
    while (expect_pop(c, &e)) {
        pend *p = NULL;
        if (e.kind == E_PUB) {
            char key[24];
            snprintf(key, sizeof(key), "%llx", (unsigned long long)e.seq);
            p = mg_map_get(t->pending, key);
        }
        if (p && !p->published)
            finish_fail(p, t->failed_error, "redis-pubsub: %s: %s", c->addr, why);
    }
    request_refresh(t);
}

/* The publishing connection to addr (opened when closed), or NULL with rc. */
static rconn *pub_conn(trp *t, const char *addr, int *rc)
{
    rconn *c = t->pubs;
    while (c && strcmp(c->addr, addr))
        c = c->next;
    if (!c) {
        c = mg_new(rconn);
        c->t = t;
        c->fd = -1;
        snprintf(c->addr, sizeof(c->addr), "%s", addr);
        c->next = t->pubs;
        t->pubs = c;
    }
    *rc = c->fd < 0 ? conn_open(c) : 0;
    return *rc == 0 ? c : NULL;
}

/* ---- publishing ---------------------------------------------------------- */

/* SPUBLISH of p (a message or a receipt) to addr, or the owner of its slot. */
static void publish(trp *t, pend *p, const char *addr)
{
    char owner[96];
    if (!addr) {
        owner_of(t, mg_redis_key_slot(p->channel, strlen(p->channel)), owner, sizeof(owner));
        addr = owner;
    }
    int rc = -EHOSTUNREACH;
    rconn *c = addr[0] ? pub_conn(t, addr, &rc) : NULL;
    if (!c) {
        request_refresh(t);
        if (p->done)
            finish_fail(p, t->failed_error, "redis-pubsub: %s: %s",
                        addr[0] ? addr : "no master known for the channel's slot", strerror(-rc));
        else
            pend_free(p);
        return;
    }
    const char *argv[3] = {"SPUBLISH", p->channel, (const char *)p->frame};
    size_t lens[3] = {8, strlen(p->channel), p->len};
    send_cmd(c, 3, argv, lens);
    expect_push(c, p->done ? E_PUB : E_RECEIPT, p->seq);
    if (!p->done)
        pend_free(p); /* a receipt: nothing more to do with it */
}

static void pub_reply(rconn *c, const expect *e, redisReply *r)
{
    trp *t = c->t;
    if (e->kind == E_AUTH) {
        if (r->type == REDIS_REPLY_ERROR)
            conn_close(c, r->str);
        return;
    }
    if (e->kind == E_RECEIPT)
        return; /* a lost receipt: the sender's wait ends at its deadline */
    char key[24];
    snprintf(key, sizeof(key), "%llx", (unsigned long long)e->seq);
    pend *p = mg_map_get(t->pending, key);
    if (!p)
        return; /* ended already (its deadline) */
    char addr[96];
    if (r->type == REDIS_REPLY_INTEGER) {
        if (r->integer == 0) {
            request_refresh(t); /* gone, or our map names a demoted master */
            finish_fail(p, t->failed_no_sub, "redis-pubsub: no subscriber on gateway %s's channel",
                        p->target);
            return;
        }
        mg_metric_add(t->sent, 1);
        if (!p->high) {
            mg_deliver_outcome out = {.status = MG_STATUS_ACCEPTED};
            finish(p, &out);
            return;
        }
        p->published = true; /* the receipt ends it */
        free(p->frame);
        p->frame = NULL;
        return;
    }
    if (redirect_addr(r, addr, sizeof(addr)) && !p->redirected) {
        p->redirected = true; /* MOVED: not published; once more on the named node */
        request_refresh(t);
        publish(t, p, addr);
        return;
    }
    finish_fail(p, t->failed_error, "redis-pubsub: %s: %s", c->addr,
                r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
}

/* ---- receiving ----------------------------------------------------------- */

typedef struct rx {
    trp *t;
    char *origin, *id, *to;
    uint64_t seq;
    bool want; /* HIGH: the sender waits for the receipt */
    int64_t start_us;
    mg_span *span; /* "process", when traced (the context is in the payload's envelope) */
} rx;

static void rx_free(rx *x)
{
    free(x->origin);
    free(x->id);
    free(x->to);
    free(x);
}

/* Any thread: the local delivery of a received message answered: its
 * receipt goes back on the sender's channel. */
static void rx_done(void *arg, const mg_deliver_outcome *out)
{
    rx *x = arg;
    mg_histogram_observe_us(x->t->local_lat, mg_mono_us() - x->start_us);
    mg_msg_trace_end(x->span, out->status, MG_PATH_LOCAL, out->connections,
                     out->not_connected ? "not connected" : out->reason);
    if (!x->want) {
        rx_free(x);
        return;
    }
    pend *p = mg_new(pend);
    p->t = x->t;
    p->seq = x->seq;
    p->channel = channel_of(x->origin);
    p->frame = frame_receipt(x->seq, x->id, x->to, out, &p->len);
    post(x->t, p);
    rx_free(x);
}

static void on_message(trp *t, const uint8_t *data, size_t len)
{
    mg_metric_add(t->received, 1);
    if (len > t->max_bytes) {
        mg_metric_add(t->bad_oversized, 1);
        return;
    }
    rd r = {data, data + len, false};
    if (len < MAGIC_LEN + 1 || memcmp(data, MAGIC, MAGIC_LEN)) {
        mg_metric_add(t->bad_undecodable, 1);
        return;
    }
    r.p += MAGIC_LEN;
    int kind = (int)get_n(&r, 1);
    if (kind == KIND_MSG) {
        int flags = (int)get_n(&r, 1);
        uint64_t seq = get_n(&r, 8);
        char *origin = get_str(&r);
        mg_msg *msg = NULL;
        if (r.bad || mg_msg_unpack(r.p, (size_t)(r.end - r.p), &msg) != 0) {
            free(origin);
            mg_metric_add(t->bad_undecodable, 1);
            return;
        }
        rx *x = mg_new(rx);
        *x = (rx){t,
                  origin,
                  mg_xstrdup(msg->id),
                  mg_xstrdup(msg->to),
                  seq,
                  flags & FLAG_WANT,
                  mg_mono_us(),
                  NULL};
        mg_msg hand;
        x->span = mg_msg_trace_process(msg, &hand, "redis", t->channel, t->gateway_id);
        int rc = mg_router_deliver_local(t->router, &hand, rx_done, x);
        if (rc != 0) {
            mg_deliver_outcome out = {.status = MG_STATUS_FAILED};
            snprintf(out.reason, sizeof(out.reason), "%s", strerror(-rc));
            rx_done(x, &out);
        }
        mg_msg_free(msg);
        return;
    }
    if (kind == KIND_RECEIPT) {
        mg_deliver_outcome out = {0};
        out.status = (mg_status)get_n(&r, 1);
        int flags = (int)get_n(&r, 1);
        out.connections = (uint32_t)get_n(&r, 4);
        uint64_t seq = get_n(&r, 8);
        char *id = get_str(&r), *to = get_str(&r);
        char key[24];
        snprintf(key, sizeof(key), "%llx", (unsigned long long)seq);
        /* The receipt may come before SPUBLISH's own reply (the receiver's
         * answer went through another shard): it ends the wait either way,
         * and the reply then finds nothing. */
        pend *p = r.bad ? NULL : mg_map_get(t->pending, key);
        if (r.bad) {
            mg_metric_add(t->bad_undecodable, 1);
        } else if (!p || strcmp(p->id, id) || strcmp(p->to, to)) {
            mg_metric_add(t->late_receipts, 1); /* its wait ended, or not ours */
        } else {
            out.not_connected = flags & FLAG_NOTCONN;
            out.duplicate = flags & FLAG_DUP;
            if (out.status != MG_STATUS_DELIVERED) {
                out.status = MG_STATUS_FAILED;
                snprintf(out.reason, sizeof(out.reason), "gateway %s: %s", p->target,
                         out.not_connected ? "NOT_CONNECTED" : "delivery failed");
            }
            mg_histogram_observe_us(t->receipt_lat, mg_mono_us() - p->start_us);
            finish(p, &out);
        }
        free(id);
        free(to);
        return;
    }
    mg_metric_add(t->bad_undecodable, 1);
}

/* ---- the subscription ---------------------------------------------------- */

static void sub_set_error(trp *t, const char *err)
{
    pthread_mutex_lock(&t->mu);
    snprintf(t->sub_err, sizeof(t->sub_err), "%s", err);
    pthread_mutex_unlock(&t->mu);
}

static void sub_schedule(trp *t, int ms)
{
    ev_timer_stop(t->loop, &t->resub);
    ev_timer_set(&t->resub, ms / 1000.0, 0.);
    ev_timer_start(t->loop, &t->resub);
}

static void sub_backoff(trp *t)
{
    sub_schedule(t, t->resub_ms);
    t->resub_ms = t->resub_ms * 2 > RESUB_MAX_MS ? RESUB_MAX_MS : t->resub_ms * 2;
}

/* Opens the subscription on the master of this gateway's slot (or the
 * node a MOVED named) and sends SSUBSCRIBE. */
static void sub_open(trp *t)
{
    rconn *c = &t->subc;
    if (t->io_stopped || !t->started || c->fd >= 0)
        return;
    char addr[96];
    if (t->moved_addr[0])
        snprintf(addr, sizeof(addr), "%s", t->moved_addr);
    else
        owner_of(t, t->slot, addr, sizeof(addr));
    t->moved_addr[0] = '\0';
    if (!strcmp(addr, t->left_addr) && mg_mono_us() < t->left_until_us) {
        /* the map still names the node that dropped us (a demoted master
         * takes SSUBSCRIBE too): wait for the map to move on */
        request_refresh(t);
        sub_schedule(t, 100);
        return;
    }
    if (!addr[0]) {
        sub_set_error(t, "no master known for the channel's slot");
        request_refresh(t);
        sub_backoff(t);
        return;
    }
    snprintf(c->addr, sizeof(c->addr), "%s", addr);
    int rc = conn_open(c);
    if (rc != 0) {
        char why[160];
        snprintf(why, sizeof(why), "%s: %s", addr, strerror(-rc));
        sub_set_error(t, why);
        request_refresh(t);
        sub_backoff(t);
        return;
    }
    const char *argv[2] = {"SSUBSCRIBE", t->channel};
    size_t lens[2] = {10, strlen(t->channel)};
    send_cmd(c, 2, argv, lens);
    t->sub_since_us = mg_mono_us();
}

static void on_resub(struct ev_loop *loop, ev_timer *w, int revents)
{
    trp *t = w->data;
    if (atomic_load(&t->refreshing)) {
        sub_schedule(t, 20); /* subscribe on the reloaded map's master */
        return;
    }
    if (t->subc.fd < 0)
        mg_metric_add(t->resubscribes, 1);
    sub_open(t);
}

static void sub_reply(trp *t, redisReply *r)
{
    rconn *c = &t->subc;
    char addr[96];
    if (r->type == REDIS_REPLY_STATUS)
        return; /* AUTH */
    if (r->type == REDIS_REPLY_ERROR) {
        if (redirect_addr(r, addr, sizeof(addr))) {
            snprintf(t->moved_addr, sizeof(t->moved_addr), "%s", addr);
            t->resub_ms = RESUB_MIN_MS;
        }
        conn_close(c, r->str);
        return;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 ||
        r->element[0]->type != REDIS_REPLY_STRING)
        return;
    const char *kind = r->element[0]->str;
    if (!strcasecmp(kind, "smessage")) {
        if (r->elements >= 3 && r->element[2]->type == REDIS_REPLY_STRING)
            on_message(t, (const uint8_t *)r->element[2]->str, r->element[2]->len);
        else
            mg_metric_add(t->bad_undecodable, 1);
    } else if (!strcasecmp(kind, "ssubscribe")) {
        atomic_store(&t->subscribed, true);
        t->resub_ms = RESUB_MIN_MS;
        t->last_pong_us = mg_mono_us();
        sub_set_error(t, "");
        mg_log_info("redis-pubsub", "subscribed channel=%s node=%s", t->channel, c->addr);
    } else if (!strcasecmp(kind, "sunsubscribe")) {
        /* the server dropped us: the slot moved (resharding, failover) */
        t->resub_ms = RESUB_MIN_MS;
        snprintf(t->left_addr, sizeof(t->left_addr), "%s", c->addr);
        t->left_until_us = mg_mono_us() + 5000000;
        conn_close(c, "SUNSUBSCRIBE from the server");
    } else if (!strcasecmp(kind, "pong")) {
        t->last_pong_us = mg_mono_us();
    }
}

/* Every second: the subscription is on its slot's master and answers PING;
 * a publishing connection that owes replies for too long is closed. */
static void on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    trp *t = w->data;
    int64_t now = mg_mono_us();
    int64_t bound = (int64_t)(t->timeout_ms > 1000 ? t->timeout_ms : 1000) * 1000;
    rconn *c = &t->subc;
    if (now - t->last_refresh_us >= REFRESH_IDLE_US)
        request_refresh(t);
    if (t->started && !t->io_stopped) {
        if (c->fd < 0) {
            if (!ev_is_active(&t->resub))
                sub_open(t);
        } else if (!atomic_load(&t->subscribed)) {
            if (now - t->sub_since_us > 3 * bound)
                conn_close(c, "no SSUBSCRIBE confirmation");
        } else {
            char owner[96];
            owner_of(t, t->slot, owner, sizeof(owner));
            if (owner[0] && strcmp(owner, c->addr)) {
                request_refresh(t); /* our map may be the stale one: twice in a row */
                t->resub_ms = RESUB_MIN_MS;
                if (++t->owner_mismatch >= 2)
                    conn_close(c, "the channel's slot has another master");
            } else if (now - t->last_pong_us > 3 * bound) {
                conn_close(c, "no PONG");
            } else {
                t->owner_mismatch = 0;
                const char *argv[1] = {"PING"};
                size_t lens[1] = {4};
                send_cmd(c, 1, argv, lens);
            }
        }
    }
    for (rconn *p = t->pubs; p; p = p->next)
        if (p->fd >= 0 && p->qn > 0 && now - p->progress_us > 2 * bound)
            conn_close(p, "no reply in time");
}

/* ---- the loop ------------------------------------------------------------ */

static void io_stop(trp *t)
{
    t->io_stopped = true;
    ev_timer_stop(t->loop, &t->resub);
    conn_close(&t->subc, "stopping");
    size_t n = mg_map_size(t->pending), k = 0, it = 0;
    pend **all = mg_xcalloc(n ? n : 1, sizeof(*all));
    const char *key;
    void *v;
    while (mg_map_next(t->pending, &it, &key, &v) && k < n)
        all[k++] = v;
    for (size_t i = 0; i < k; i++)
        finish_fail(all[i], t->failed_stopping, "redis-pubsub: gateway stopping");
    free(all);
    pthread_mutex_lock(&t->mu);
    t->stop_acked = true;
    pthread_mutex_unlock(&t->mu);
}

static void on_wake(struct ev_loop *loop, ev_async *w, int revents)
{
    trp *t = w->data;
    pthread_mutex_lock(&t->mu);
    pend *q = t->qhead;
    t->qhead = t->qtail = NULL;
    bool start = t->start_req, stop = t->stop_req, quit = t->quit_req;
    t->start_req = false;
    pthread_mutex_unlock(&t->mu);
    if (start && !t->started) {
        t->started = true;
        sub_open(t);
    }
    if (stop && !t->io_stopped)
        io_stop(t);
    int64_t now = mg_mono_ms();
    while (q) {
        pend *p = q;
        q = q->next;
        p->next = NULL;
        if (!p->done) {
            publish(t, p, NULL); /* a receipt: published even while stopping */
            continue;
        }
        ev_timer_init(&p->timer, on_timeout,
                      p->deadline_ms > now ? (p->deadline_ms - now) / 1e3 : 0, 0.);
        p->timer.data = p;
        snprintf(p->key, sizeof(p->key), "%llx", (unsigned long long)p->seq);
        mg_map_put(t->pending, p->key, p);
        ev_timer_start(loop, &p->timer);
        if (t->io_stopped)
            finish_fail(p, t->failed_stopping, "redis-pubsub: gateway stopping");
        else
            publish(t, p, NULL);
    }
    if (quit)
        ev_break(loop, EVBREAK_ALL);
}

static void *io_main(void *arg)
{
    trp *t = arg;
    ev_run(t->loop, 0);
    return NULL;
}

/* ---- transport ops ------------------------------------------------------- */

static bool trp_available(mg_transport *base, const mg_route_target *target)
{
    trp *t = (trp *)base;
    if (atomic_load(&t->stopped) || !atomic_load(&t->subscribed) ||
        atomic_load(&t->npending) >= t->max_pending)
        return false;
    if (!t->peers)
        return true;
    mg_peer_set *s = mg_peers_acquire(t->peers);
    const mg_peer *p = mg_peer_set_find(s, target->gateway_id);
    bool consumes = !p || mg_peer_consumes(p, "redis-pubsub");
    mg_peer_set_release(s);
    return consumes;
}

static int trp_deliver(mg_transport *base, const mg_route_target *target, const mg_msg *msg,
                       int64_t deadline_ms, mg_deliver_done done, void *arg)
{
    trp *t = (trp *)base;
    if (atomic_load(&t->stopped))
        return -ESHUTDOWN;
    if (atomic_fetch_add(&t->npending, 1) >= t->max_pending) {
        atomic_fetch_sub(&t->npending, 1);
        mg_metric_add(t->failed_overload, 1);
        return -EAGAIN;
    }
    pend *p = mg_new(pend);
    p->t = t;
    p->seq = atomic_fetch_add(&t->seq, 1) + 1;
    p->high = msg->priority == MG_PRIO_HIGH;
    p->frame = frame_msg(msg, p->seq, t->gateway_id, p->high, &p->len);
    if (p->len > t->max_bytes) {
        atomic_fetch_sub(&t->npending, 1);
        pend_free(p);
        return -EMSGSIZE;
    }
    p->channel = channel_of(target->gateway_id);
    p->target = mg_xstrdup(target->gateway_id);
    p->id = mg_xstrdup(msg->id);
    p->to = mg_xstrdup(msg->to);
    int64_t now = mg_mono_ms();
    p->deadline_ms = deadline_ms < now + t->timeout_ms ? deadline_ms : now + t->timeout_ms;
    p->start_us = mg_mono_us();
    p->done = done;
    p->arg = arg;
    post(t, p);
    return 0;
}

static double pending_gauge(void *arg)
{
    return (double)atomic_load(&((trp *)arg)->npending);
}

static void conn_release(rconn *c)
{
    if (c->fd >= 0) {
        close(c->fd);
        redisReaderFree(c->reader);
    }
    free(c->wbuf);
    free(c->q);
}

static void trp_free(mg_transport *base)
{
    trp *t = (trp *)base;
    mg_transport_redis_pubsub_stop(base);
    pthread_mutex_lock(&t->mu);
    t->quit_req = true;
    pthread_mutex_unlock(&t->mu);
    ev_async_send(t->loop, &t->wake);
    pthread_join(t->thread, NULL);
    for (pend *p = t->qhead, *next; p; p = next) { /* posted after the loop ended */
        next = p->next;
        if (p->done) {
            mg_deliver_outcome out = {.status = MG_STATUS_FAILED};
            snprintf(out.reason, sizeof(out.reason), "redis-pubsub: gateway stopping");
            p->done(p->arg, &out);
        }
        pend_free(p);
    }
    conn_release(&t->subc);
    for (rconn *c = t->pubs, *next; c; c = next) {
        next = c->next;
        conn_release(c);
        free(c);
    }
    mg_bus_pending_register("redis-pubsub", NULL, NULL);
    ev_loop_destroy(t->loop);
    mg_map_free(t->pending);
    pthread_mutex_destroy(&t->mu);
    free(t->gateway_id);
    free(t->channel);
    free(t->user);
    free(t->password);
    free(t);
}

static const struct mg_transport_ops trp_ops = {
    .name = "redis-pubsub",
    .path = MG_PATH_REDIS_PUBSUB,
    .orders_on_return = true,
    .available = trp_available,
    .deliver = trp_deliver,
    .disconnect = NULL,
    .free = trp_free,
    .deliver_batch = NULL,
    .trace_attrs = trp_trace_attrs,
};

mg_transport *mg_transport_redis_pubsub_create(const mg_transport_redis_pubsub_config *cfg)
{
    trp *t = mg_new(trp);
    t->base.ops = &trp_ops;
    t->gateway_id = mg_xstrdup(cfg->gateway_id);
    t->channel = channel_of(cfg->gateway_id);
    t->slot = mg_redis_key_slot(t->channel, strlen(t->channel));
    t->user = cfg->user && cfg->user[0] ? mg_xstrdup(cfg->user) : NULL;
    t->password = cfg->password && cfg->password[0] ? mg_xstrdup(cfg->password) : NULL;
    t->rc = cfg->cluster;
    t->pool = cfg->refresh_pool;
    t->peers = cfg->peers;
    t->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 500;
    t->max_bytes = cfg->max_bytes ? cfg->max_bytes : 1 << 20;
    t->max_pending = cfg->max_pending ? cfg->max_pending : 65536;
    pthread_mutex_init(&t->mu, NULL);
    t->pending = mg_map_create(1024);
    t->subc = (rconn){.t = t, .sub = true, .fd = -1};
    t->resub_ms = RESUB_MIN_MS;

    t->sent = mg_bus_metric(MG_BUS_SENT, "redis-pubsub", NULL);
    t->received = mg_bus_metric(MG_BUS_RECEIVED, "redis-pubsub", NULL);
    t->receipt_lat = mg_bus_metric(MG_BUS_RECEIPT, "redis-pubsub", NULL);
    t->local_lat = mg_histogram("meshgate_bus_local_delivery_seconds",
                                "A received message to its local outcome (written), by bus", LABEL);
    t->resubscribes = mg_counter("meshgate_bus_resubscribes_total",
                                 "Subscriptions opened again (failover, resharding, loss)", LABEL);
    t->late_receipts = mg_counter("meshgate_bus_late_receipts_total",
                                  "Receipts that came after their wait ended", LABEL);
    t->bad_undecodable = mg_bus_metric(MG_BUS_BAD, "redis-pubsub", "undecodable");
    t->bad_oversized = mg_bus_metric(MG_BUS_BAD, "redis-pubsub", "oversized");
    t->failed_no_sub = mg_bus_metric(MG_BUS_FAILED, "redis-pubsub", "no_subscriber");
    t->failed_timeout = mg_bus_metric(MG_BUS_FAILED, "redis-pubsub", "timeout");
    t->failed_error = mg_bus_metric(MG_BUS_FAILED, "redis-pubsub", "error");
    t->failed_overload = mg_bus_metric(MG_BUS_FAILED, "redis-pubsub", "overload");
    t->failed_stopping = mg_bus_metric(MG_BUS_FAILED, "redis-pubsub", "stopping");
    mg_bus_pending_register("redis-pubsub", pending_gauge, t);

    t->loop = ev_loop_new(EVBACKEND_EPOLL | EVFLAG_NOSIGMASK | EVFLAG_NOENV);
    ev_async_init(&t->wake, on_wake);
    t->wake.data = t;
    ev_async_start(t->loop, &t->wake);
    ev_timer_init(&t->tick, on_tick, TICK_SECONDS, TICK_SECONDS);
    t->tick.data = t;
    ev_timer_start(t->loop, &t->tick);
    ev_timer_init(&t->resub, on_resub, 0., 0.);
    t->resub.data = t;
    pthread_create(&t->thread, NULL, io_main, t);
    pthread_setname_np(t->thread, "redis-pubsub");
    return &t->base;
}

int mg_transport_redis_pubsub_start(mg_transport *base, mg_router *router, char *err, size_t errlen)
{
    trp *t = (trp *)base;
    pthread_mutex_lock(&t->mu);
    t->router = router;
    t->start_req = true;
    pthread_mutex_unlock(&t->mu);
    ev_async_send(t->loop, &t->wake);
    int64_t end = mg_mono_ms() + (t->timeout_ms * 3 > 2000 ? t->timeout_ms * 3 : 2000);
    while (!atomic_load(&t->subscribed) && mg_mono_ms() < end)
        usleep(10000); /* start-up only */
    if (atomic_load(&t->subscribed)) {
        mg_log_info("redis-pubsub", "bus ready channel=%s timeout_ms=%d max_bytes=%zu", t->channel,
                    t->timeout_ms, t->max_bytes);
        return 0;
    }
    pthread_mutex_lock(&t->mu);
    snprintf(err, errlen, "redis-pubsub: cannot subscribe to %s: %s", t->channel,
             t->sub_err[0] ? t->sub_err : "no confirmation in time");
    pthread_mutex_unlock(&t->mu);
    return -EHOSTUNREACH;
}

void mg_transport_redis_pubsub_stop(mg_transport *base)
{
    trp *t = (trp *)base;
    if (atomic_exchange(&t->stopped, true))
        return;
    pthread_mutex_lock(&t->mu);
    t->stop_req = true;
    pthread_mutex_unlock(&t->mu);
    ev_async_send(t->loop, &t->wake);
    for (int i = 0; i < 500; i++) { /* the loop fails what waits, then acks */
        pthread_mutex_lock(&t->mu);
        bool acked = t->stop_acked;
        pthread_mutex_unlock(&t->mu);
        if (acked)
            break;
        usleep(10000);
    }
    mg_log_info("redis-pubsub", "stopped channel=%s", t->channel);
}

bool mg_transport_redis_pubsub_subscribed(mg_transport *base)
{
    return atomic_load(&((trp *)base)->subscribed);
}
