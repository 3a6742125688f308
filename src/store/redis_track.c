/* redis_track.c: server-assisted client-side caching for the Redis Cluster
 * client (the "redis-track" thread and the epoch readers check).
 *
 * Threads: one, "redis-track", owns the subscriptions; the epoch and quiet
 * checks run on any thread; the command engine (redis_cluster.c) reads each
 * node's subscription id.
 *
 * DESIGN
 * - hiredis 0.14 speaks RESP2 only, so tracking uses the redirect mode: a
 *   subscription connection per master (CLIENT ID, then SUBSCRIBE
 *   __redis__:invalidate), and every command connection to that master
 *   turns CLIENT TRACKING on, redirected to it (redis_cluster.c puts the
 *   command in front of the first batch a connection carries after the
 *   subscription changed). Redis then sends the names of changed keys that
 *   were read through any of them, once per read.
 * - The masters are the nodes the slot map names, looked at every
 *   MG_TRACK_SCAN_MS. A master without a subscription is connected (again
 *   MG_TRACK_RETRY_MS after a failure); a subscription whose node left the
 *   map, or whose connection failed, is dropped, and everything is
 *   forgotten (fn(NULL)): changes on that node can no longer be heard.
 * - The epoch: a counter moved on whenever a read may have gone untracked
 *   (a subscription lost, a command on a node with none, CLIENT TRACKING
 *   refused), and "armed" while every master has a subscription. A reader
 *   keeps a value only when the epoch was the same nonzero value before and
 *   after its read (mg_redis_cluster_track_epoch is 0 while unarmed).
 * - Quiet: the thread raises busy before it reads a subscription and lowers
 *   it after applying what it read, so an invalidation is always either
 *   readable on a subscription socket (the epoll set says so) or under busy,
 *   until applied. A reader checks readability first, then busy.
 * Guarantees: a value kept under a matching epoch was read on a tracked
 * connection whose subscription was alive; its change reaches fn, or fn(NULL)
 * runs, and a quiet check after Redis sent the change fails until fn ran.
 */
#include "store/redis_cluster_internal.h"

#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_time.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define MG_TRACK_SCAN_MS  100 /* the slot map is looked at this often */
#define MG_TRACK_RETRY_MS 500 /* a master that refused a subscription is tried again after */
#define MG_TRACK_EVENTS   16

typedef struct tsub {
    rc_node *node;
    redisContext *c;
} tsub;

struct rc_track {
    mg_redis_cluster *rc;
    mg_redis_inval_fn fn;
    void *arg;
    int epfd, wakefd;
    pthread_t thread;
    atomic_bool stop, busy, armed;
    atomic_ullong epoch;
    /* the thread's own */
    tsub **subs;
    size_t nsubs, capsubs;
    int64_t retry_at_ms;
};

void mg_rc_track_untracked(mg_redis_cluster *rc)
{
    rc_track *t = atomic_load(&rc->track);
    if (t)
        atomic_fetch_add(&t->epoch, 1);
}

uint64_t mg_redis_cluster_track_epoch(mg_redis_cluster *rc)
{
    rc_track *t = atomic_load(&rc->track);
    if (!t)
        return 0;
    uint64_t e1 = atomic_load(&t->epoch);
    bool armed = atomic_load(&t->armed);
    uint64_t e2 = atomic_load(&t->epoch);
    return armed && e1 == e2 ? e1 : 0;
}

bool mg_redis_cluster_track_quiet(mg_redis_cluster *rc)
{
    rc_track *t = atomic_load(&rc->track);
    if (!t)
        return false;
    struct epoll_event ev;
    if (epoll_wait(t->epfd, &ev, 1, 0) != 0) /* something to read, or an error */
        return false;
    return !atomic_load(&t->busy);
}

/* Everything read so far may have missed a change: readers forget it. */
static void forget_all(rc_track *t)
{
    atomic_store(&t->armed, false);
    atomic_fetch_add(&t->epoch, 1);
    t->fn(t->arg, NULL, 0);
}

static void sub_drop(rc_track *t, size_t i, const char *why)
{
    tsub *s = t->subs[i];
    mg_log_warn("redis", "tracking subscription dropped node=%s why=\"%s\"", s->node->name, why);
    atomic_store(&s->node->track_id, 0);
    epoll_ctl(t->epfd, EPOLL_CTL_DEL, s->c->fd, NULL);
    redisFree(s->c);
    free(s);
    t->subs[i] = t->subs[--t->nsubs];
    forget_all(t);
}

/* Connects, names and subscribes a connection to node n. */
static bool sub_open(rc_track *t, rc_node *n)
{
    mg_redis_cluster *rc = t->rc;
    char msg[256];
    int err = 0;
    redisContext *c = mg_rc_conn_open(rc, n, mg_mono_us() + (int64_t)rc->timeout_ms * 1000, &err,
                                      msg, sizeof(msg));
    if (!c) {
        mg_log_debug("redis", "tracking connect failed node=%s err=\"%s\"", n->name, msg);
        return false;
    }
    long long id = 0;
    redisReply *r = redisCommand(c, "CLIENT SETNAME meshgate-track-%d", (int)getpid());
    if (r) /* a name for CLIENT LIST; an older server's refusal changes nothing */
        freeReplyObject(r);
    r = redisCommand(c, "CLIENT ID");
    if (r && r->type == REDIS_REPLY_INTEGER)
        id = r->integer;
    if (r)
        freeReplyObject(r);
    r = id > 0 ? redisCommand(c, "SUBSCRIBE __redis__:invalidate") : NULL;
    bool ok = r && r->type == REDIS_REPLY_ARRAY;
    if (r)
        freeReplyObject(r);
    struct epoll_event ev = {.events = EPOLLIN};
    tsub *s = mg_new(tsub);
    s->node = n;
    s->c = c;
    ev.data.ptr = s;
    if (!ok || epoll_ctl(t->epfd, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        /* once per node until it works: it is tried again every MG_TRACK_RETRY_MS */
        if (!atomic_exchange(&n->track_refused, true))
            mg_log_warn("redis",
                        "tracking subscription refused node=%s err=\"%s\" (no presence cache "
                        "until it works; the ACL user needs CLIENT ID/TRACKING/SETNAME and "
                        "SUBSCRIBE __redis__:invalidate)",
                        n->name, c->err ? c->errstr : "CLIENT ID / SUBSCRIBE answered an error");
        redisFree(c);
        free(s);
        return false;
    }
    if (t->nsubs == t->capsubs) {
        t->capsubs = t->capsubs ? t->capsubs * 2 : 4;
        t->subs = mg_xrealloc(t->subs, t->capsubs * sizeof(*t->subs));
    }
    t->subs[t->nsubs++] = s;
    atomic_store(&n->track_id, id);
    atomic_store(&n->track_refused, false);
    mg_log_debug("redis", "tracking subscribed node=%s client_id=%lld", n->name, id);
    return true;
}

/* Subscriptions follow the slot map: one per master, none elsewhere. */
static void sync_subs(rc_track *t)
{
    mg_redis_cluster *rc = t->rc;
    size_t nwant = 0;
    bool all_known = true;
    pthread_rwlock_rdlock(&rc->lock);
    rc_node **want = mg_xcalloc(rc->nnodes ? rc->nnodes : 1, sizeof(*want));
    for (unsigned s = 0; s < MG_REDIS_SLOTS; s++) {
        int idx = rc->slots[s];
        if (idx < 0) {
            all_known = false;
            continue;
        }
        rc_node *n = rc->nodes[idx];
        size_t k;
        for (k = 0; k < nwant && want[k] != n; k++)
            ;
        if (k == nwant)
            want[nwant++] = n;
    }
    pthread_rwlock_unlock(&rc->lock);
    for (size_t i = 0; i < t->nsubs;) {
        size_t k;
        for (k = 0; k < nwant && want[k] != t->subs[i]->node; k++)
            ;
        if (k == nwant)
            sub_drop(t, i, "no longer a master in the slot map");
        else
            i++;
    }
    bool armed = all_known && nwant > 0;
    int64_t now = mg_mono_ms();
    for (size_t k = 0; k < nwant; k++) {
        size_t i;
        for (i = 0; i < t->nsubs && t->subs[i]->node != want[k]; i++)
            ;
        if (i < t->nsubs)
            continue;
        if (now < t->retry_at_ms || !sub_open(t, want[k])) {
            if (now >= t->retry_at_ms)
                t->retry_at_ms = now + MG_TRACK_RETRY_MS;
            armed = false;
        }
    }
    if (armed != atomic_load(&t->armed)) {
        if (!armed)
            atomic_fetch_add(&t->epoch, 1);
        atomic_store(&t->armed, armed);
        mg_log_info("redis", "client-side caching %s masters=%zu", armed ? "armed" : "paused",
                    nwant);
    }
    free(want);
}

/* ["message", "__redis__:invalidate", [key, ...] | nil] */
static void apply(rc_track *t, const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_STRING || strcmp(r->element[0]->str, "message") != 0)
        return; /* the subscribe confirmation */
    const redisReply *keys = r->element[2];
    if (keys->type == REDIS_REPLY_ARRAY) {
        for (size_t i = 0; i < keys->elements; i++)
            if (keys->element[i]->type == REDIS_REPLY_STRING)
                t->fn(t->arg, keys->element[i]->str, keys->element[i]->len);
        return;
    }
    t->fn(t->arg, NULL, 0); /* FLUSHALL / FLUSHDB */
}

/* Reads what one subscription has; false when it failed. */
static bool sub_read(rc_track *t, tsub *s)
{
    if (redisBufferRead(s->c) != REDIS_OK)
        return false;
    for (;;) {
        redisReply *r = NULL;
        if (redisGetReplyFromReader(s->c, (void **)&r) != REDIS_OK)
            return false;
        if (!r)
            return true;
        apply(t, r);
        freeReplyObject(r);
    }
}

static void *track_main(void *arg)
{
    rc_track *t = arg;
    int64_t scan_at = 0;
    while (!atomic_load(&t->stop)) {
        int64_t now = mg_mono_ms();
        if (now >= scan_at) {
            sync_subs(t);
            scan_at = now + MG_TRACK_SCAN_MS;
        }
        struct epoll_event ev[MG_TRACK_EVENTS];
        int n = epoll_wait(t->epfd, ev, MG_TRACK_EVENTS, MG_TRACK_SCAN_MS);
        if (n <= 0)
            continue;
        atomic_store(&t->busy, true);
        for (int i = 0; i < n; i++) {
            tsub *s = ev[i].data.ptr;
            if (!s) { /* the wake-up: stop */
                uint64_t v;
                if (read(t->wakefd, &v, sizeof(v)) < 0)
                    mg_log_debug("redis", "tracking wake-up read failed errno=%d", errno);
                continue;
            }
            size_t k;
            for (k = 0; k < t->nsubs && t->subs[k] != s; k++)
                ; /* it may have been dropped by an earlier event of this round */
            if (k < t->nsubs && !sub_read(t, s)) {
                sub_drop(t, k, s->c->errstr[0] ? s->c->errstr : "connection closed");
                scan_at = 0; /* subscribe again at once */
            }
        }
        atomic_store(&t->busy, false);
    }
    return NULL;
}

int mg_redis_cluster_track(mg_redis_cluster *rc, mg_redis_inval_fn fn, void *arg)
{
    if (!rc || !fn)
        return -EINVAL;
    if (atomic_load(&rc->track))
        return -EALREADY;
    rc_track *t = mg_new(rc_track);
    t->rc = rc;
    t->fn = fn;
    t->arg = arg;
    atomic_store(&t->epoch, 1);
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    t->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (t->epfd < 0 || t->wakefd < 0 || epoll_ctl(t->epfd, EPOLL_CTL_ADD, t->wakefd, &ev) != 0) {
        int e = -errno;
        if (t->epfd >= 0)
            close(t->epfd);
        if (t->wakefd >= 0)
            close(t->wakefd);
        free(t);
        return e;
    }
    atomic_store(&rc->track, t);
    int e = pthread_create(&t->thread, NULL, track_main, t);
    if (e != 0) {
        atomic_store(&rc->track, NULL);
        close(t->epfd);
        close(t->wakefd);
        free(t);
        return -e;
    }
    pthread_setname_np(t->thread, "redis-track");
    return 0;
}

void mg_redis_cluster_untrack(mg_redis_cluster *rc)
{
    rc_track *t = rc ? atomic_load(&rc->track) : NULL;
    if (!t)
        return;
    atomic_store(&t->stop, true);
    uint64_t one = 1;
    if (write(t->wakefd, &one, sizeof(one)) < 0)
        mg_log_debug("redis", "tracking wake-up write failed errno=%d", errno);
    pthread_join(t->thread, NULL);
    atomic_store(&rc->track, NULL);
    for (size_t i = 0; i < t->nsubs; i++) {
        atomic_store(&t->subs[i]->node->track_id, 0);
        redisFree(t->subs[i]->c);
        free(t->subs[i]);
    }
    free(t->subs);
    close(t->epfd);
    close(t->wakefd);
    free(t);
}
