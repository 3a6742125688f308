/* redis_cluster.c: the Redis Cluster client (slot routing, redirections,
 * failover recovery, pipelining) on top of blocking hiredis 0.14 contexts,
 * and its Sentinel mode (one primary named by Redis Sentinel).
 *
 * Threads: called by router worker threads (and the presence renew timer),
 * concurrently; never by the WebSocket service thread. Sentinel mode adds
 * its own "redis-sentinel" thread (the +switch-master subscription).
 *
 * DESIGN
 * - Nodes are only ever added (never freed before mg_redis_cluster_free), so a
 *   node pointer read under the map lock stays valid after the lock is gone.
 *   rc->lock (rwlock) guards the node array and the slot map (slot -> node
 *   index). Each node has its own mutex guarding its idle connection stack.
 * - One engine runs everything: a single command is a batch of one. A round
 *   assigns each pending command to a node (the ASK target, else the slot's
 *   master), takes one connection per node, appends every command of that
 *   node (ASKING first where needed), writes all nodes, then reads the
 *   replies node by node. MOVED updates the slot in place and schedules a
 *   full refresh; ASK resends to the target with ASKING; TRYAGAIN,
 *   CLUSTERDOWN, LOADING, MASTERDOWN and I/O errors back off and retry;
 *   everything stops at the call's deadline (now + timeout_ms).
 * - Slot map refresh (CLUSTER SLOTS) happens at create, after I/O errors and
 *   after MOVED, at most every MG_RC_REFRESH_MIN_US, by one thread at a time
 *   (others keep using the current map), asking known nodes in turn.
 * - A connection that saw any error is closed, never returned to the pool.
 * - Sentinel mode (mg_redis_sentinel_create): the "slot map" is every slot on
 *   the one primary. A refresh asks the Sentinels in turn for
 *   get-master-addr-by-name and accepts the answer only when that node says
 *   ROLE master; it runs after I/O errors, READONLY (we reached a demoted
 *   primary) and the other retryable errors, and at most every
 *   MG_RC_SENTINEL_RECHECK_US anyway (a switch nobody noticed: reads on a
 *   demoted primary still answers). Sentinels are asked without AUTH.
 *   One dedicated thread ("redis-sentinel") holds a SUBSCRIBE +switch-master
 *   on one Sentinel at a time (the next one after an error) and refreshes
 *   at once when the master switches, so a planned failover is followed
 *   before any call hits the demoted primary.
 * Guarantees: a call returns within its budget (plus one connect/read that
 * started before the deadline was known to be short, bounded by the same
 * socket timeouts); replies come back in the order commands were added.
 */
#include "store/redis_cluster_internal.h"

#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_time.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MG_RC_REFRESH_MIN_US      100000 /* at most one slot map reload per 100 ms */
#define MG_RC_MAX_ROUNDS          32     /* redirection/retry rounds per call */
#define MG_RC_HOST_MAX            256
#define MG_RC_SENTINEL_RECHECK_US 2000000 /* Sentinel mode: re-ask for the primary every 2 s */

typedef struct rc_cmd {
    bool keyed; /* false: any master */
    unsigned slot;
    char *buf; /* the formatted RESP command */
    int len;
    redisReply *reply;
    int status;        /* 0, or -errno; 1 while pending */
    rc_node *ask;      /* ASK target for the next attempt */
    bool run;          /* taken by an exec */
    int wait_replicas; /* > 0: WAIT for this many replicas after the reply */
    long long acked;   /* WAIT's answer; -1 when not asked or it failed */
} rc_cmd;

typedef struct rc_group rc_group;

/* run()'s per-node groups, kept by a batch across resets (no allocation on
 * the next run of a reused batch). */
typedef struct rc_groups {
    rc_group *g;
    size_t cap;
    char *wbuf; /* a group's commands, written in one go */
    size_t wcap;
} rc_groups;

struct mg_redis_batch {
    rc_cmd *cmds;
    size_t n, cap;
    rc_groups groups;
};

static const char ASKING_CMD[] = "*1\r\n$6\r\nASKING\r\n";

/* ---- CRC16 / key slot ---------------------------------------------------- */

/* CRC16-CCITT (XMODEM): poly 0x1021, init 0, as the Redis Cluster spec. */
uint16_t mg_redis_crc16(const char *buf, size_t len)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)((uint8_t)buf[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

unsigned mg_redis_key_slot(const char *key, size_t len)
{
    size_t s, e;
    for (s = 0; s < len; s++)
        if (key[s] == '{')
            break;
    if (s < len) {
        for (e = s + 1; e < len; e++)
            if (key[e] == '}')
                break;
        if (e < len && e != s + 1) /* a non-empty tag */
            return mg_redis_crc16(key + s + 1, e - s - 1) & (MG_REDIS_SLOTS - 1);
    }
    return mg_redis_crc16(key, len) & (MG_REDIS_SLOTS - 1);
}

/* ---- small helpers ------------------------------------------------------- */

static struct timeval tv_of_us(int64_t us)
{
    if (us < 1000)
        us = 1000;
    struct timeval tv = {.tv_sec = us / 1000000, .tv_usec = us % 1000000};
    return tv;
}

/* Maps a failed context to -ETIMEDOUT / -EIO (errno is read right after the
 * failing call by the caller and passed in). */
static int ctx_errno(const redisContext *c, int saved_errno)
{
    if (c && c->err == REDIS_ERR_IO &&
        (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK || saved_errno == ETIMEDOUT ||
         saved_errno == EINPROGRESS))
        return -ETIMEDOUT;
    if (c && (strstr(c->errstr, "timed out") || strstr(c->errstr, "temporarily unavailable")))
        return -ETIMEDOUT;
    return -EIO;
}

static bool reply_is_err(const redisReply *r, const char *prefix)
{
    size_t n = strlen(prefix);
    return r && r->type == REDIS_REPLY_ERROR && r->len >= n && memcmp(r->str, prefix, n) == 0 &&
           (r->len == n || r->str[n] == ' ');
}

/* Parses "MOVED 3999 127.0.0.1:6381" / "ASK ..." into slot, host, port. */
static int parse_redirect(const char *s, unsigned *slot, char *host, size_t hostlen, int *port)
{
    const char *p = strchr(s, ' ');
    if (!p)
        return -1;
    char *end;
    long sl = strtol(p + 1, &end, 10);
    if (end == p + 1 || *end != ' ' || sl < 0 || sl >= MG_REDIS_SLOTS)
        return -1;
    const char *addr = end + 1;
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= hostlen)
        return -1;
    long pt = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || pt <= 0 || pt > 65535)
        return -1;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    *slot = (unsigned)sl;
    *port = (int)pt;
    return 0;
}

/* ---- nodes and the connection pool -------------------------------------- */

static rc_node *node_new(const char *host, int port)
{
    rc_node *n = mg_new(rc_node);
    n->host = mg_xstrdup(host);
    n->port = port;
    n->name = mg_xasprintf("%s:%d", host, port);
    pthread_mutex_init(&n->mu, NULL);
    return n;
}

static void node_free(rc_node *n)
{
    for (int i = 0; i < n->nidle; i++)
        redisFree(n->idle[i]);
    pthread_mutex_destroy(&n->mu);
    free(n->host);
    free(n->name);
    free(n);
}

/* Index of host:port in the node array, adding it when unknown. Caller holds
 * the write lock. */
static int node_index_locked(mg_redis_cluster *rc, const char *host, int port)
{
    for (size_t i = 0; i < rc->nnodes; i++)
        if (rc->nodes[i]->port == port && strcmp(rc->nodes[i]->host, host) == 0)
            return (int)i;
    if (rc->nnodes == rc->capnodes) {
        rc->capnodes = rc->capnodes ? rc->capnodes * 2 : 8;
        rc->nodes = mg_xrealloc(rc->nodes, rc->capnodes * sizeof(*rc->nodes));
    }
    rc->nodes[rc->nnodes] = node_new(host, port);
    return (int)rc->nnodes++;
}

static rc_node *node_get(mg_redis_cluster *rc, const char *host, int port)
{
    pthread_rwlock_rdlock(&rc->lock);
    for (size_t i = 0; i < rc->nnodes; i++) {
        rc_node *n = rc->nodes[i];
        if (n->port == port && strcmp(n->host, host) == 0) {
            pthread_rwlock_unlock(&rc->lock);
            return n;
        }
    }
    pthread_rwlock_unlock(&rc->lock);
    pthread_rwlock_wrlock(&rc->lock);
    int idx = node_index_locked(rc, host, port); /* may move rc->nodes: index first */
    rc_node *n = rc->nodes[idx];
    pthread_rwlock_unlock(&rc->lock);
    return n;
}

static const redisReplyObjectFunctions *hiredis_fns; /* hiredis's own, saved once */
static redisReplyObjectFunctions bounded_fns;
static pthread_once_t bounded_once = PTHREAD_ONCE_INIT;

static void *bounded_array(const redisReadTask *task, int elements)
{
    if (elements < 0 || elements > MG_REDIS_MAX_ARRAY)
        return NULL; /* the reader reports an error and the connection is dropped */
    return hiredis_fns->createArray(task, elements);
}

static void bounded_init(void)
{
    redisReader *r = redisReaderCreate();
    hiredis_fns = r->fn;
    redisReaderFree(r);
    bounded_fns = *hiredis_fns;
    bounded_fns.createArray = bounded_array;
}

void mg_redis_reader_bound(redisReader *reader)
{
    pthread_once(&bounded_once, bounded_init);
    reader->fn = &bounded_fns;
}

/* Opens a connection to n within the deadline and authenticates it. */
redisContext *mg_rc_conn_open(mg_redis_cluster *rc, rc_node *n, int64_t deadline_us, int *err,
                              char *msg, size_t msglen)
{
    int64_t left = deadline_us - mg_mono_us();
    if (left <= 0) {
        *err = -ETIMEDOUT;
        snprintf(msg, msglen, "%s: timed out", n->name);
        return NULL;
    }
    atomic_fetch_add(&rc->st_reconnects, 1);
    redisContext *c = redisConnectWithTimeout(n->host, n->port, tv_of_us(left));
    int saved = errno;
    if (!c || c->err) {
        *err = c ? ctx_errno(c, saved) : -ENOMEM;
        snprintf(msg, msglen, "%s: %s", n->name, c ? c->errstr : "out of memory");
        goto fail;
    }
    mg_redis_reader_bound(c->reader);
    redisSetTimeout(c, tv_of_us(deadline_us - mg_mono_us()));
    redisEnableKeepAlive(c);
    if (rc->password && *rc->password && !n->sentinel) {
        redisReply *r = rc->user && *rc->user
                            ? redisCommand(c, "AUTH %s %s", rc->user, rc->password)
                            : redisCommand(c, "AUTH %s", rc->password);
        saved = errno;
        if (!r) {
            *err = ctx_errno(c, saved);
            snprintf(msg, msglen, "%s: AUTH: %s", n->name, c->errstr);
            goto fail;
        }
        if (r->type == REDIS_REPLY_ERROR) {
            *err = -EACCES;
            snprintf(msg, msglen, "%s: AUTH refused: %.*s", n->name, (int)r->len, r->str);
            freeReplyObject(r);
            goto fail;
        }
        freeReplyObject(r);
    }
    if (atomic_exchange(&n->down, false))
        mg_log_info("redis", "node reachable again node=%s", n->name);
    return c;
fail:
    if (c)
        redisFree(c);
    atomic_fetch_add(&rc->st_io_errors, 1);
    if (!atomic_exchange(&n->down, true))
        mg_log_warn("redis", "node connect failed node=%s err=\"%s\"", n->name, msg);
    return NULL;
}

/* A pooled connection to n, or a new one; *track: the tracking redirect it
 * has on (0: none), to be given back with it. */
static redisContext *conn_take(mg_redis_cluster *rc, rc_node *n, int64_t deadline_us, int *err,
                               char *msg, size_t msglen, long long *track)
{
    redisContext *c = NULL;
    *track = 0;
    pthread_mutex_lock(&n->mu);
    if (n->nidle > 0) {
        n->nidle--;
        c = n->idle[n->nidle];
        *track = n->idle_track[n->nidle];
    }
    pthread_mutex_unlock(&n->mu);
    if (c) {
        redisSetTimeout(c, tv_of_us(deadline_us - mg_mono_us()));
        return c;
    }
    return mg_rc_conn_open(rc, n, deadline_us, err, msg, msglen);
}

static void conn_give(rc_node *n, redisContext *c, long long track)
{
    if (!c)
        return;
    if (c->err) {
        redisFree(c);
        return;
    }
    pthread_mutex_lock(&n->mu);
    if (n->nidle < MG_REDIS_POOL_IDLE) {
        n->idle_track[n->nidle] = track;
        n->idle[n->nidle++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&n->mu);
    if (c)
        redisFree(c);
}

/* ---- slot map ------------------------------------------------------------ */

/* Asks node n for CLUSTER SLOTS and installs the map. */
static int refresh_from(mg_redis_cluster *rc, rc_node *n, int64_t deadline_us, char *msg,
                        size_t msglen)
{
    int err = 0;
    long long track;
    redisContext *c = conn_take(rc, n, deadline_us, &err, msg, msglen, &track);
    if (!c)
        return err;
    redisReply *r = redisCommand(c, "CLUSTER SLOTS");
    int saved = errno;
    if (!r) {
        err = ctx_errno(c, saved);
        snprintf(msg, msglen, "%s: %s", n->name, c->errstr);
        redisFree(c);
        return err;
    }
    conn_give(n, c, track);
    if (r->type != REDIS_REPLY_ARRAY) {
        snprintf(msg, msglen, "%s: CLUSTER SLOTS: %.*s", n->name,
                 r->type == REDIS_REPLY_ERROR ? (int)r->len : 14,
                 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        freeReplyObject(r);
        return -EPROTO;
    }
    if (r->elements == 0) {
        snprintf(msg, msglen, "%s: CLUSTER SLOTS is empty (cluster not set up?)", n->name);
        freeReplyObject(r);
        return -EPROTO;
    }
    int16_t *map = mg_xmalloc(sizeof(int16_t) * MG_REDIS_SLOTS);
    for (int i = 0; i < MG_REDIS_SLOTS; i++)
        map[i] = -1;
    size_t covered = 0;
    pthread_rwlock_wrlock(&rc->lock);
    for (size_t i = 0; i < r->elements; i++) {
        redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
            e->element[0]->type != REDIS_REPLY_INTEGER ||
            e->element[1]->type != REDIS_REPLY_INTEGER ||
            e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2)
            continue;
        redisReply *m = e->element[2];
        if (m->element[0]->type != REDIS_REPLY_STRING || m->element[1]->type != REDIS_REPLY_INTEGER)
            continue;
        const char *host = m->element[0]->str;
        if (!*host || strcmp(host, "?") == 0) /* unknown endpoint: the node we asked */
            host = n->host;
        int idx = node_index_locked(rc, host, (int)m->element[1]->integer);
        long long lo = e->element[0]->integer, hi = e->element[1]->integer;
        for (long long s = lo; s <= hi && s < MG_REDIS_SLOTS; s++)
            if (s >= 0) {
                map[s] = (int16_t)idx;
                covered++;
            }
    }
    memcpy(rc->slots, map, sizeof(int16_t) * MG_REDIS_SLOTS);
    pthread_rwlock_unlock(&rc->lock);
    free(map);
    freeReplyObject(r);
    atomic_fetch_add(&rc->st_refreshes, 1);
    if (covered < MG_REDIS_SLOTS)
        mg_log_warn("redis", "slot map incomplete covered=%zu node=%s", covered, n->name);
    return 0;
}

/* Runs one command on a fresh-or-pooled connection to n (for refreshes). On
 * 0, *out is the reply; the connection goes back to the pool. */
static int node_ask(mg_redis_cluster *rc, rc_node *n, int64_t deadline_us, redisReply **out,
                    char *msg, size_t msglen, const char *fmt, ...)
{
    int err = 0;
    long long track;
    redisContext *c = conn_take(rc, n, deadline_us, &err, msg, msglen, &track);
    if (!c)
        return err;
    va_list ap;
    va_start(ap, fmt);
    *out = redisvCommand(c, fmt, ap);
    va_end(ap);
    int saved = errno;
    if (!*out) {
        err = ctx_errno(c, saved);
        snprintf(msg, msglen, "%s: %s", n->name, c->errstr);
        redisFree(c);
        atomic_fetch_add(&rc->st_io_errors, 1);
        return err;
    }
    conn_give(n, c, track);
    return 0;
}

/* Sentinel mode: asks Sentinel s where the primary is, checks that node says
 * ROLE master, and points every slot at it. */
static int refresh_from_sentinel(mg_redis_cluster *rc, rc_node *s, int64_t deadline_us, char *msg,
                                 size_t msglen)
{
    redisReply *r = NULL;
    int err = node_ask(rc, s, deadline_us, &r, msg, msglen, "SENTINEL get-master-addr-by-name %s",
                       rc->master_name);
    if (err)
        return err;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING) {
        if (r->type == REDIS_REPLY_ERROR)
            snprintf(msg, msglen, "sentinel %s: %.*s", s->name, (int)r->len, r->str);
        else
            snprintf(msg, msglen, "sentinel %s does not know master \"%s\"", s->name,
                     rc->master_name);
        freeReplyObject(r);
        return -EPROTO;
    }
    char host[MG_RC_HOST_MAX];
    snprintf(host, sizeof(host), "%s", r->element[0]->str);
    char *end = NULL;
    long port = strtol(r->element[1]->str, &end, 10);
    bool bad = !*host || *end || port <= 0 || port > 65535;
    freeReplyObject(r);
    if (bad) {
        snprintf(msg, msglen, "sentinel %s: bad primary address", s->name);
        return -EPROTO;
    }
    rc_node *p = node_get(rc, host, (int)port);
    err = node_ask(rc, p, deadline_us, &r, msg, msglen, "ROLE");
    if (err)
        return err; /* the Sentinel's answer is stale (failover not done yet) */
    bool master = r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
                  r->element[0]->type == REDIS_REPLY_STRING &&
                  !strcmp(r->element[0]->str, "master");
    if (!master) {
        snprintf(msg, msglen, "sentinel %s names %s, which is not a master (%.*s)", s->name,
                 p->name, r->type == REDIS_REPLY_ERROR ? (int)r->len : 7,
                 r->type == REDIS_REPLY_ERROR ? r->str : "replica");
        freeReplyObject(r);
        return -EAGAIN;
    }
    freeReplyObject(r);
    pthread_rwlock_wrlock(&rc->lock);
    int idx = node_index_locked(rc, host, (int)port);
    int was = rc->primary;
    for (int i = 0; i < MG_REDIS_SLOTS; i++)
        rc->slots[i] = (int16_t)idx;
    rc->primary = idx;
    const char *was_name = was >= 0 ? rc->nodes[was]->name : "none";
    if (was != idx)
        mg_log_info("redis", "sentinel primary master=%s node=%s was=%s sentinel=%s",
                    rc->master_name, p->name, was_name, s->name);
    pthread_rwlock_unlock(&rc->lock);
    atomic_fetch_add(&rc->st_refreshes, 1);
    return 0;
}

/* Reloads the map from the first node that answers. force: ignore the rate
 * limit (still one thread at a time; a concurrent caller returns at once). */
static int refresh(mg_redis_cluster *rc, int64_t deadline_us, bool force, char *msg, size_t msglen)
{
    int64_t now = mg_mono_us();
    if (!force && now - atomic_load(&rc->last_refresh_us) < MG_RC_REFRESH_MIN_US)
        return 0;
    if (force)
        pthread_mutex_lock(&rc->refresh_mu);
    else if (pthread_mutex_trylock(&rc->refresh_mu) != 0)
        return 0;
    atomic_store(&rc->last_refresh_us, now);
    atomic_store(&rc->need_refresh, false);
    rc_node **nodes;
    size_t nn;
    if (rc->master_name) { /* the Sentinels never change */
        nodes = rc->sentinels;
        nn = rc->nsentinels;
    } else {
        pthread_rwlock_rdlock(&rc->lock);
        nn = rc->nnodes;
        nodes = mg_xmemdup(rc->nodes, nn * sizeof(*nodes));
        pthread_rwlock_unlock(&rc->lock);
    }
    int err = -EIO;
    unsigned start = atomic_fetch_add(&rc->refresh_rr, 1);
    /* Two passes: nodes not known to be down first, then the rest. */
    for (int pass = 0; pass < 2 && err != 0; pass++) {
        for (size_t k = 0; k < nn && err != 0; k++) {
            rc_node *n = nodes[(start + k) % nn];
            if (atomic_load(&n->down) != (pass == 1))
                continue;
            if (mg_mono_us() >= deadline_us)
                break;
            err = rc->master_name ? refresh_from_sentinel(rc, n, deadline_us, msg, msglen)
                                  : refresh_from(rc, n, deadline_us, msg, msglen);
        }
    }
    if (!rc->master_name)
        free(nodes);
    if (err != 0)
        atomic_store(&rc->need_refresh, true);
    pthread_mutex_unlock(&rc->refresh_mu);
    return err;
}

int mg_redis_cluster_refresh(mg_redis_cluster *rc)
{
    char msg[256];
    return refresh(rc, mg_mono_us() + (int64_t)rc->timeout_ms * 1000, true, msg, sizeof(msg));
}

void mg_redis_cluster_slot_owner(mg_redis_cluster *rc, unsigned slot, char *buf, size_t len)
{
    pthread_rwlock_rdlock(&rc->lock);
    int idx = rc->slots[slot % MG_REDIS_SLOTS];
    snprintf(buf, len, "%s", idx >= 0 ? rc->nodes[idx]->name : "");
    pthread_rwlock_unlock(&rc->lock);
}

/* ---- create / free ------------------------------------------------------- */

/* Splits "host:port" in place (tok keeps the host); 0, or -1 when malformed. */
static int split_addr(char *tok, int *port)
{
    char *colon = strrchr(tok, ':');
    char *end = NULL;
    long p = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == tok || *end || p <= 0 || p > 65535 || colon - tok >= MG_RC_HOST_MAX)
        return -1;
    *colon = '\0';
    *port = (int)p;
    return 0;
}

static mg_redis_cluster *rc_new(const char *user, const char *password, int timeout_ms)
{
    mg_redis_cluster *rc = mg_new(mg_redis_cluster);
    rc->user = user && *user ? mg_xstrdup(user) : NULL;
    rc->password = password && *password ? mg_xstrdup(password) : NULL;
    rc->timeout_ms = timeout_ms;
    rc->primary = -1;
    pthread_rwlock_init(&rc->lock, NULL);
    pthread_mutex_init(&rc->refresh_mu, NULL);
    for (int i = 0; i < MG_REDIS_SLOTS; i++)
        rc->slots[i] = -1;
    return rc;
}

/* Adds every address of csv (as Sentinels or seed nodes), then refreshes
 * from them until one answers. what names them in err. */
static int rc_connect(mg_redis_cluster *rc, const char *csv_in, bool sentinels, const char *what,
                      char *err, size_t errlen)
{
    char *csv = mg_xstrdup(csv_in), *save = NULL;
    for (char *tok = strtok_r(csv, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        int port = 0;
        if (split_addr(tok, &port) != 0) {
            snprintf(err, errlen, "%s: bad node address \"%s\" (want host:port)", what, tok);
            free(csv);
            return -EINVAL;
        }
        if (sentinels) {
            rc->sentinels =
                mg_xrealloc(rc->sentinels, (rc->nsentinels + 1) * sizeof(*rc->sentinels));
            rc->sentinels[rc->nsentinels++] = node_new(tok, port);
            rc->sentinels[rc->nsentinels - 1]->sentinel = true;
        } else {
            pthread_rwlock_wrlock(&rc->lock);
            node_index_locked(rc, tok, port);
            pthread_rwlock_unlock(&rc->lock);
        }
    }
    free(csv);
    /* A copy of the seeds: refreshing adds nodes, which may move rc->nodes. */
    size_t nn = sentinels ? rc->nsentinels : rc->nnodes;
    rc_node **nodes = mg_xmemdup(sentinels ? rc->sentinels : rc->nodes, nn * sizeof(*nodes));
    char tried[512] = "", msg[512] = "no answer";
    size_t tried_len = 0;
    int rv = -EINVAL;
    for (size_t i = 0; i < nn && rv != 0; i++) {
        int64_t deadline = mg_mono_us() + (int64_t)rc->timeout_ms * 1000;
        rv = sentinels ? refresh_from_sentinel(rc, nodes[i], deadline, msg, sizeof(msg))
                       : refresh_from(rc, nodes[i], deadline, msg, sizeof(msg));
        if (rv != 0 && tried_len < sizeof(tried) - 1)
            tried_len += (size_t)snprintf(tried + tried_len, sizeof(tried) - tried_len, "%s%s",
                                          tried_len ? ", " : "", nodes[i]->name);
        if (rv == -EACCES || (rv == -EPROTO && !sentinels))
            break; /* it answered, but is no usable cluster: say so */
    }
    free(nodes);
    if (rv == -EPROTO || rv == -EACCES)
        snprintf(err, errlen, "%s unusable: %s", what, msg);
    else if (rv != 0)
        snprintf(err, errlen, "no %s node reachable (tried %s): %s", what, tried, msg);
    return rv;
}

mg_redis_cluster *mg_redis_cluster_create(const char *nodes_csv, const char *user,
                                          const char *password, int timeout_ms, char *err,
                                          size_t errlen)
{
    if (errlen)
        err[0] = '\0';
    if (!nodes_csv || !*nodes_csv || timeout_ms <= 0) {
        snprintf(err, errlen, "redis cluster: need at least one host:port and a timeout > 0");
        return NULL;
    }
    mg_redis_cluster *rc = rc_new(user, password, timeout_ms);
    if (rc_connect(rc, nodes_csv, false, "Redis Cluster", err, errlen) != 0) {
        mg_redis_cluster_free(rc);
        return NULL;
    }
    atomic_store(&rc->last_refresh_us, mg_mono_us());
    pthread_rwlock_rdlock(&rc->lock);
    mg_log_info("redis", "cluster connected nodes=%zu timeout_ms=%d auth=%s", rc->nnodes,
                timeout_ms, rc->password ? (rc->user ? "acl" : "password") : "none");
    pthread_rwlock_unlock(&rc->lock);
    return rc;
}

/* Whether a pub/sub message is a switch of our master:
 * ["message", "+switch-master", "<name> <old-ip> <old-port> <new-ip> <new-port>"]. */
static bool is_our_switch(mg_redis_cluster *rc, const redisReply *r)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[2]->type != REDIS_REPLY_STRING ||
        strcmp(r->element[0]->str, "message") != 0)
        return false;
    size_t n = strlen(rc->master_name);
    return r->element[2]->len > n && !strncmp(r->element[2]->str, rc->master_name, n) &&
           r->element[2]->str[n] == ' ';
}

/* Subscribed to Sentinel s until an error or stop; returns after either. */
static void subscribe_on(mg_redis_cluster *rc, rc_node *s)
{
    struct timeval tv = tv_of_us((int64_t)rc->timeout_ms * 1000);
    redisContext *c = redisConnectWithTimeout(s->host, s->port, tv);
    if (!c || c->err) {
        mg_log_debug("redis", "sentinel subscribe connect failed sentinel=%s", s->name);
        if (c)
            redisFree(c);
        return;
    }
    mg_redis_reader_bound(c->reader);
    redisEnableKeepAlive(c);
    redisSetTimeout(c, tv);
    redisReply *r = redisCommand(c, "SUBSCRIBE +switch-master");
    bool ok = r && r->type == REDIS_REPLY_ARRAY;
    if (r)
        freeReplyObject(r);
    if (ok)
        mg_log_debug("redis", "sentinel subscribed sentinel=%s", s->name);
    while (ok && !atomic_load(&rc->sub_stop)) {
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        int pr = poll(&pfd, 1, 200); /* wakes to see sub_stop */
        if (pr < 0 && errno != EINTR)
            break;
        if (pr <= 0)
            continue;
        r = NULL;
        if (redisGetReply(c, (void **)&r) != REDIS_OK)
            break; /* the Sentinel went away: the caller moves on */
        if (is_our_switch(rc, r)) {
            mg_log_info("redis", "sentinel switch-master %s sentinel=%s", r->element[2]->str,
                        s->name);
            char msg[256];
            if (refresh(rc, mg_mono_us() + (int64_t)rc->timeout_ms * 1000, true, msg,
                        sizeof(msg)) != 0)
                mg_log_warn("redis", "primary look-up after switch failed err=\"%s\"", msg);
        }
        freeReplyObject(r);
    }
    redisFree(c);
}

static void *subscriber_main(void *arg)
{
    mg_redis_cluster *rc = arg;
    for (size_t k = 0; !atomic_load(&rc->sub_stop); k++) {
        subscribe_on(rc, rc->sentinels[k % rc->nsentinels]);
        for (int i = 0; i < 5 && !atomic_load(&rc->sub_stop); i++)
            usleep(100 * 1000); /* 0.5 s between Sentinels */
    }
    return NULL;
}

mg_redis_cluster *mg_redis_sentinel_create(const char *sentinels_csv, const char *master_name,
                                           const char *user, const char *password, int timeout_ms,
                                           char *err, size_t errlen)
{
    if (errlen)
        err[0] = '\0';
    if (!sentinels_csv || !*sentinels_csv || !master_name || !*master_name || timeout_ms <= 0) {
        snprintf(err, errlen,
                 "redis sentinel: need at least one Sentinel host:port, a master name and a "
                 "timeout > 0");
        return NULL;
    }
    mg_redis_cluster *rc = rc_new(user, password, timeout_ms);
    rc->master_name = mg_xstrdup(master_name);
    char what[160];
    snprintf(what, sizeof(what), "Redis Sentinel (master \"%.100s\")", master_name);
    if (rc_connect(rc, sentinels_csv, true, what, err, errlen) != 0) {
        mg_redis_cluster_free(rc);
        return NULL;
    }
    atomic_store(&rc->last_refresh_us, mg_mono_us());
    if (pthread_create(&rc->sub_thread, NULL, subscriber_main, rc) == 0) {
        rc->sub_started = true;
        pthread_setname_np(rc->sub_thread, "redis-sentinel");
    } else {
        mg_log_warn("redis", "no +switch-master subscriber thread: switches are found on errors");
    }
    mg_log_info("redis", "sentinel connected master=%s sentinels=%zu timeout_ms=%d auth=%s",
                master_name, rc->nsentinels, timeout_ms,
                rc->password ? (rc->user ? "acl" : "password") : "none");
    return rc;
}

void mg_redis_cluster_free(mg_redis_cluster *rc)
{
    if (!rc)
        return;
    mg_redis_cluster_untrack(rc);
    if (rc->sub_started) { /* it wakes every 200 ms (or within one Redis timeout) */
        atomic_store(&rc->sub_stop, true);
        pthread_join(rc->sub_thread, NULL);
    }
    for (size_t i = 0; i < rc->nnodes; i++)
        node_free(rc->nodes[i]);
    free(rc->nodes);
    for (size_t i = 0; i < rc->nsentinels; i++)
        node_free(rc->sentinels[i]);
    free(rc->sentinels);
    free(rc->master_name);
    pthread_rwlock_destroy(&rc->lock);
    pthread_mutex_destroy(&rc->refresh_mu);
    free(rc->user);
    free(rc->password);
    free(rc);
}

void mg_redis_cluster_stats_get(mg_redis_cluster *rc, mg_redis_cluster_stats *out)
{
    out->commands = atomic_load(&rc->st_commands);
    out->moved = atomic_load(&rc->st_moved);
    out->ask = atomic_load(&rc->st_ask);
    out->refreshes = atomic_load(&rc->st_refreshes);
    out->reconnects = atomic_load(&rc->st_reconnects);
    out->io_errors = atomic_load(&rc->st_io_errors);
    out->retries = atomic_load(&rc->st_retries);
}

/* ---- the engine ---------------------------------------------------------- */

struct rc_group {
    rc_node *node;
    redisContext *c;
    long long track;    /* the tracking redirect c has on (0: none) */
    long long track_to; /* nonzero: CLIENT TRACKING on REDIRECT this, first */
    size_t *idx;        /* indices into the command array, in order */
    size_t n, cap;
    int err;
};

static void groups_free(rc_groups *gs)
{
    for (size_t g = 0; g < gs->cap; g++)
        free(gs->g[g].idx);
    free(gs->g);
    free(gs->wbuf);
}

/* Appends len bytes to the groups' write buffer at *at, growing it. */
static void wbuf_put(rc_groups *gs, size_t *at, const char *buf, size_t len)
{
    if (*at + len > gs->wcap) {
        gs->wcap = (*at + len) * 2;
        gs->wbuf = mg_xrealloc(gs->wbuf, gs->wcap);
    }
    memcpy(gs->wbuf + *at, buf, len);
    *at += len;
}

/* Writes a group's commands to its connection in one go (blocking, bounded
 * by the connection's timeouts), from the caller's kept buffer rather than
 * hiredis's output buffer, which is freed after every write and grown again
 * by doubling and copying for the next batch (10 % of a store worker's
 * samples for batches of hundreds of lookups). 0, or -ETIMEDOUT / -EIO with
 * why in msg. */
static int group_write(rc_groups *gs, rc_group *gr, rc_cmd *cmds, char *msg, size_t msglen)
{
    const char *buf = cmds[gr->idx[0]].buf;
    size_t len = (size_t)cmds[gr->idx[0]].len;
    if (gr->n > 1 || cmds[gr->idx[0]].ask || gr->track_to) {
        len = 0;
        if (gr->track_to) {
            char id[24], track[96];
            int idlen = snprintf(id, sizeof(id), "%lld", gr->track_to);
            int tl = snprintf(track, sizeof(track),
                              "*5\r\n$6\r\nCLIENT\r\n$8\r\nTRACKING\r\n$2\r\non\r\n"
                              "$8\r\nREDIRECT\r\n$%d\r\n%s\r\n",
                              idlen, id);
            wbuf_put(gs, &len, track, (size_t)tl);
        }
        for (size_t k = 0; k < gr->n; k++) {
            rc_cmd *cmd = &cmds[gr->idx[k]];
            if (cmd->ask)
                wbuf_put(gs, &len, ASKING_CMD, sizeof(ASKING_CMD) - 1);
            wbuf_put(gs, &len, cmd->buf, (size_t)cmd->len);
        }
        buf = gs->wbuf;
    }
    while (len > 0) {
        ssize_t w = write(gr->c->fd, buf, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            snprintf(msg, msglen, "%s: %s", gr->node->name, strerror(e));
            return e == EAGAIN || e == EWOULDBLOCK || e == ETIMEDOUT ? -ETIMEDOUT : -EIO;
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

static rc_node *route(mg_redis_cluster *rc, rc_cmd *cmd)
{
    if (cmd->ask)
        return cmd->ask;
    rc_node *n = NULL;
    pthread_rwlock_rdlock(&rc->lock);
    int idx = -1;
    if (cmd->keyed)
        idx = rc->slots[cmd->slot];
    else /* any master: the owner of some slot, rotating */
        for (unsigned k = 0; k < MG_REDIS_SLOTS && idx < 0; k += 1024)
            idx = rc->slots[(k + (unsigned)(uintptr_t)cmd) % MG_REDIS_SLOTS];
    if (idx >= 0)
        n = rc->nodes[idx];
    pthread_rwlock_unlock(&rc->lock);
    return n;
}

static void set_slot(mg_redis_cluster *rc, unsigned slot, const char *host, int port)
{
    pthread_rwlock_wrlock(&rc->lock);
    rc->slots[slot] = (int16_t)node_index_locked(rc, host, port);
    pthread_rwlock_unlock(&rc->lock);
}

/* After a group's replies: when a command that just got a non-error reply
 * asked for replicas, one WAIT on the same connection (so it covers that
 * write), for the most any of them asked, with a timeout a little inside
 * what is left of the budget (so WAIT answers before the socket times out).
 * A failed WAIT closes the connection and leaves acked at -1; the replies
 * stand (the write happened on the master). */
static void wait_replicas(rc_group *gr, rc_cmd *cmds, int64_t deadline)
{
    int want = 0;
    for (size_t k = 0; k < gr->n; k++) {
        rc_cmd *cmd = &cmds[gr->idx[k]];
        if (cmd->status == 0 && cmd->wait_replicas > want && cmd->acked < 0 &&
            cmd->reply->type != REDIS_REPLY_ERROR)
            want = cmd->wait_replicas;
    }
    if (!want)
        return;
    int64_t left_ms = (deadline - mg_mono_us()) / 1000;
    long long wait_ms = left_ms - left_ms / 10;
    if (wait_ms < 1)
        wait_ms = 1;
    redisReply *w = redisCommand(gr->c, "WAIT %d %lld", want, wait_ms);
    long long acked = w && w->type == REDIS_REPLY_INTEGER ? w->integer : -1;
    if (!w) {
        mg_log_warn("redis", "WAIT failed node=%s err=\"%s\"", gr->node->name, gr->c->errstr);
        redisFree(gr->c);
        gr->c = NULL;
    }
    if (w)
        freeReplyObject(w);
    for (size_t k = 0; k < gr->n; k++) {
        rc_cmd *cmd = &cmds[gr->idx[k]];
        if (cmd->status == 0 && cmd->wait_replicas > 0 && cmd->acked < 0)
            cmd->acked = acked;
    }
}

/* A group's connection failed: closed, with why in msg. */
static void group_io_error(rc_group *gr, char *msg, size_t msglen)
{
    gr->err = ctx_errno(gr->c, errno);
    snprintf(msg, msglen, "%s: %s", gr->node->name, gr->c->errstr);
    redisFree(gr->c);
    gr->c = NULL;
}

/* Reads the answer to the CLIENT TRACKING that group_write put first. A
 * refusal (the subscription it names just went away) leaves the reads
 * untracked, and says so. false on an I/O error. */
static bool track_reply(mg_redis_cluster *rc, rc_group *gr)
{
    redisReply *r = NULL;
    if (redisGetReply(gr->c, (void **)&r) != REDIS_OK)
        return false;
    if (r->type == REDIS_REPLY_ERROR) {
        mg_log_debug("redis", "tracking refused node=%s err=\"%s\"", gr->node->name, r->str);
        mg_rc_track_untracked(rc);
        gr->track = 0;
    } else {
        gr->track = gr->track_to;
    }
    freeReplyObject(r);
    return true;
}

/* Runs cmds[0..n) (status 1 = pending) until each has a reply or the
 * deadline passes. gs: the groups' room, kept by the caller (grown here). */
static int run(mg_redis_cluster *rc, rc_cmd *cmds, size_t n, rc_groups *gs)
{
    int64_t deadline = mg_mono_us() + (int64_t)rc->timeout_ms * 1000;
    char msg[256];
    int last_err = -ETIMEDOUT;
    int backoff_ms = 10;
    rc_group *groups = gs->g;
    size_t ngroups = 0, capgroups = gs->cap;

    for (int round = 0; round < MG_RC_MAX_ROUNDS; round++) {
        size_t pending = 0;
        for (size_t i = 0; i < n; i++)
            pending += cmds[i].status == 1;
        if (!pending || mg_mono_us() >= deadline)
            break;
        if (rc->master_name &&
            mg_mono_us() - atomic_load(&rc->last_refresh_us) > MG_RC_SENTINEL_RECHECK_US)
            atomic_store(&rc->need_refresh, true);
        if (atomic_load(&rc->need_refresh))
            refresh(rc, deadline, false, msg, sizeof(msg));

        /* group pending commands by node */
        ngroups = 0;
        bool transient = false;
        for (size_t i = 0; i < n; i++) {
            if (cmds[i].status != 1)
                continue;
            rc_node *node = route(rc, &cmds[i]);
            if (!node) { /* slot not covered: the map is stale or the cluster is down */
                atomic_store(&rc->need_refresh, true);
                last_err = -EIO;
                transient = true;
                continue;
            }
            size_t g;
            for (g = 0; g < ngroups && groups[g].node != node; g++)
                ;
            if (g == ngroups) {
                if (ngroups == capgroups) {
                    capgroups = capgroups ? capgroups * 2 : 4;
                    groups = mg_xrealloc(groups, capgroups * sizeof(*groups));
                    memset(groups + ngroups, 0, (capgroups - ngroups) * sizeof(*groups));
                    gs->g = groups;
                    gs->cap = capgroups;
                }
                groups[g].node = node;
                groups[g].c = NULL;
                groups[g].n = 0;
                groups[g].err = 0;
                ngroups++;
            }
            rc_group *gr = &groups[g];
            if (gr->n == gr->cap) { /* room for every command at once: no growth */
                gr->cap = gr->cap * 2 > n ? gr->cap * 2 : n;
                gr->idx = mg_xrealloc(gr->idx, gr->cap * sizeof(*gr->idx));
            }
            gr->idx[gr->n++] = i;
        }

        /* write every group */
        for (size_t g = 0; g < ngroups; g++) {
            rc_group *gr = &groups[g];
            gr->c = conn_take(rc, gr->node, deadline, &gr->err, msg, sizeof(msg), &gr->track);
            if (!gr->c)
                continue;
            gr->track_to = 0;
            if (atomic_load(&rc->track)) { /* reads on it must be tracked, or said not to be */
                long long want = atomic_load(&gr->node->track_id);
                if (!want)
                    mg_rc_track_untracked(rc);
                else if (want != gr->track)
                    gr->track_to = want;
            }
            atomic_fetch_add(&rc->st_commands, gr->n);
            int err = group_write(gs, gr, cmds, msg, sizeof(msg));
            if (err) {
                gr->err = err;
                redisFree(gr->c);
                gr->c = NULL;
            }
        }

        /* read every group */
        for (size_t g = 0; g < ngroups; g++) {
            rc_group *gr = &groups[g];
            if (gr->c && gr->track_to && !track_reply(rc, gr))
                group_io_error(gr, msg, sizeof(msg));
            for (size_t k = 0; gr->c && k < gr->n; k++) {
                rc_cmd *cmd = &cmds[gr->idx[k]];
                redisReply *r = NULL;
                bool asked = cmd->ask != NULL;
                cmd->ask = NULL;
                if (asked) { /* the ASKING reply */
                    if (redisGetReply(gr->c, (void **)&r) != REDIS_OK)
                        goto io_error;
                    freeReplyObject(r);
                    r = NULL;
                }
                if (redisGetReply(gr->c, (void **)&r) != REDIS_OK)
                    goto io_error;
                if (reply_is_err(r, "MOVED") || reply_is_err(r, "ASK")) {
                    char host[MG_RC_HOST_MAX];
                    int port;
                    unsigned slot;
                    bool moved = r->str[0] == 'M';
                    if (parse_redirect(r->str, &slot, host, sizeof(host), &port) == 0) {
                        if (moved) {
                            atomic_fetch_add(&rc->st_moved, 1);
                            set_slot(rc, slot, host, port);
                            atomic_store(&rc->need_refresh, true);
                        } else {
                            atomic_fetch_add(&rc->st_ask, 1);
                            cmd->ask = node_get(rc, host, port);
                        }
                        freeReplyObject(r);
                        continue; /* stays pending */
                    }
                } else if (reply_is_err(r, "TRYAGAIN") || reply_is_err(r, "CLUSTERDOWN") ||
                           reply_is_err(r, "LOADING") || reply_is_err(r, "MASTERDOWN") ||
                           reply_is_err(r, "READONLY")) { /* READONLY: a demoted primary */
                    atomic_fetch_add(&rc->st_retries, 1);
                    snprintf(msg, sizeof(msg), "%s: %.*s", gr->node->name, (int)r->len, r->str);
                    freeReplyObject(r);
                    last_err = -EIO;
                    transient = true;
                    atomic_store(&rc->need_refresh, true);
                    continue;
                }
                cmd->reply = r;
                cmd->status = 0;
                continue;
            io_error:
                group_io_error(gr, msg, sizeof(msg));
            }
            if (gr->c)
                wait_replicas(gr, cmds, deadline);
            if (gr->c) {
                conn_give(gr->node, gr->c, gr->track);
                gr->c = NULL;
            } else if (gr->err) {
                atomic_fetch_add(&rc->st_io_errors, 1);
                atomic_store(&rc->need_refresh, true);
                last_err = gr->err;
                transient = true;
            }
        }

        if (transient) { /* back off, bounded by the deadline */
            int64_t left = deadline - mg_mono_us();
            int64_t sleep_us = (int64_t)backoff_ms * 1000;
            if (sleep_us > left)
                sleep_us = left;
            if (sleep_us > 0)
                usleep((useconds_t)sleep_us);
            if (backoff_ms < 200)
                backoff_ms *= 2;
        }
    }

    int rv = 0;
    for (size_t i = 0; i < n; i++)
        if (cmds[i].status == 1) {
            cmds[i].status = last_err;
            if (!rv)
                rv = last_err;
        } else if (cmds[i].status < 0 && !rv) {
            rv = cmds[i].status;
        }
    if (rv)
        mg_log_warn("redis", "command failed err=%s last=\"%s\"",
                    rv == -ETIMEDOUT ? "timeout" : "io", msg);
    return rv;
}

/* ---- commands and batches ------------------------------------------------ */

static void cmd_init(rc_cmd *cmd, const char *key, char *buf, int len)
{
    memset(cmd, 0, sizeof(*cmd));
    if (key) {
        cmd->keyed = true;
        cmd->slot = mg_redis_key_slot(key, strlen(key));
    }
    cmd->buf = buf;
    cmd->len = len;
    cmd->status = len > 0 ? 1 : -EINVAL;
    cmd->acked = -1;
}

static void cmd_clear(rc_cmd *cmd)
{
    if (cmd->buf)
        redisFreeCommand(cmd->buf);
    if (cmd->reply)
        freeReplyObject(cmd->reply);
}

static int run_one(mg_redis_cluster *rc, redisReply **out, const char *key, char *buf, int len,
                   int wait, int *acked)
{
    rc_cmd cmd;
    cmd_init(&cmd, key, buf, len);
    cmd.wait_replicas = wait;
    *out = NULL;
    rc_groups gs = {0};
    int rv = cmd.status < 0 ? cmd.status : run(rc, &cmd, 1, &gs);
    groups_free(&gs);
    if (rv == 0) {
        *out = cmd.reply;
        cmd.reply = NULL;
    }
    if (acked)
        *acked = cmd.acked > INT32_MAX ? INT32_MAX : (int)cmd.acked;
    cmd_clear(&cmd);
    return rv;
}

int mg_redis_cluster_command(mg_redis_cluster *rc, redisReply **out, const char *key,
                             const char *fmt, ...)
{
    char *buf = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&buf, fmt, ap);
    va_end(ap);
    return run_one(rc, out, key, len > 0 ? buf : NULL, len, 0, NULL);
}

int mg_redis_cluster_command_argv(mg_redis_cluster *rc, redisReply **out, const char *key, int argc,
                                  const char **argv, const size_t *argvlen)
{
    char *buf = NULL;
    int len = redisFormatCommandArgv(&buf, argc, argv, argvlen);
    return run_one(rc, out, key, len > 0 ? buf : NULL, len, 0, NULL);
}

int mg_redis_cluster_command_argv_wait(mg_redis_cluster *rc, redisReply **out, const char *key,
                                       int argc, const char **argv, const size_t *argvlen,
                                       int numreplicas, int *replicas)
{
    char *buf = NULL;
    int len = redisFormatCommandArgv(&buf, argc, argv, argvlen);
    return run_one(rc, out, key, len > 0 ? buf : NULL, len, numreplicas > 0 ? numreplicas : 0,
                   replicas);
}

mg_redis_batch *mg_redis_batch_new(void)
{
    return mg_new(mg_redis_batch);
}

void mg_redis_batch_reset(mg_redis_batch *b)
{
    for (size_t i = 0; i < b->n; i++)
        cmd_clear(&b->cmds[i]);
    b->n = 0;
}

size_t mg_redis_batch_room(const mg_redis_batch *b)
{
    return b->cap;
}

void mg_redis_batch_free(mg_redis_batch *b)
{
    if (!b)
        return;
    mg_redis_batch_reset(b);
    groups_free(&b->groups);
    free(b->cmds);
    free(b);
}

void mg_redis_batch_reserve(mg_redis_batch *b, size_t n)
{
    if (b->n + n <= b->cap)
        return;
    b->cap = b->n + n;
    b->cmds = mg_xrealloc(b->cmds, b->cap * sizeof(*b->cmds));
}

static size_t batch_push(mg_redis_batch *b, const char *key, char *buf, int len)
{
    if (b->n == b->cap)
        mg_redis_batch_reserve(b, b->cap ? b->cap : 16);
    cmd_init(&b->cmds[b->n], key, len > 0 ? buf : NULL, len);
    return b->n++;
}

size_t mg_redis_batch_add(mg_redis_batch *b, const char *key, const char *fmt, ...)
{
    char *buf = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&buf, fmt, ap);
    va_end(ap);
    return batch_push(b, key, buf, len);
}

size_t mg_redis_batch_add_argv(mg_redis_batch *b, const char *key, int argc, const char **argv,
                               const size_t *argvlen)
{
    char *buf = NULL;
    int len = redisFormatCommandArgv(&buf, argc, argv, argvlen);
    return batch_push(b, key, buf, len);
}

size_t mg_redis_batch_count(const mg_redis_batch *b)
{
    return b->n;
}

int mg_redis_cluster_exec(mg_redis_cluster *rc, mg_redis_batch *b)
{
    size_t first = 0;
    while (first < b->n && b->cmds[first].run)
        first++;
    if (first == b->n)
        return 0;
    for (size_t i = first; i < b->n; i++)
        b->cmds[i].run = true;
    int rv = run(rc, b->cmds + first, b->n - first, &b->groups);
    return rv;
}

redisReply *mg_redis_batch_reply(const mg_redis_batch *b, size_t i)
{
    return i < b->n ? b->cmds[i].reply : NULL;
}

int mg_redis_batch_status(const mg_redis_batch *b, size_t i)
{
    if (i >= b->n)
        return -EINVAL;
    return b->cmds[i].status == 1 ? -EAGAIN : b->cmds[i].status;
}
