/* redis_cluster_internal.h: what redis_cluster.c shares with redis_track.c
 * (the node table, the connection opener, and the tracking hooks the
 * command engine calls). Not for other modules: they use redis_cluster.h.
 */
#ifndef MG_REDIS_CLUSTER_INTERNAL_H
#define MG_REDIS_CLUSTER_INTERNAL_H

#include "store/redis_cluster.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

typedef struct rc_track rc_track;

typedef struct rc_node {
    char *host;
    int port;
    char *name; /* "host:port" */
    pthread_mutex_t mu;
    redisContext *idle[MG_REDIS_POOL_IDLE];
    /* The tracking redirect each idle connection has on (0: none), as the
     * CLIENT ID of the subscription it was pointed at. */
    long long idle_track[MG_REDIS_POOL_IDLE];
    int nidle;
    atomic_bool down; /* last connect failed (for logging transitions) */
    bool sentinel;    /* a Sentinel: no AUTH */
    /* The CLIENT ID of redis_track.c's subscription on this node; 0 while
     * there is none. Set by the "redis-track" thread, read by the engine. */
    atomic_llong track_id;
    atomic_bool track_refused; /* a subscription was refused (for logging it once) */
} rc_node;

struct mg_redis_cluster {
    char *user, *password;
    int timeout_ms;
    pthread_rwlock_t lock;
    rc_node **nodes;
    size_t nnodes, capnodes;
    int16_t slots[MG_REDIS_SLOTS]; /* node index, -1 when unknown */
    pthread_mutex_t refresh_mu;
    atomic_llong last_refresh_us;
    atomic_bool need_refresh;
    atomic_uint refresh_rr; /* round-robin start for refresh */
    atomic_ullong st_commands, st_moved, st_ask, st_refreshes, st_reconnects, st_io_errors,
        st_retries;
    /* Sentinel mode (master_name set): the Sentinels, asked in turn; primary
     * is the node index every slot maps to (-1 before the first answer). */
    char *master_name;
    rc_node **sentinels;
    size_t nsentinels;
    int primary;
    /* The "redis-sentinel" thread: SUBSCRIBE +switch-master on one Sentinel. */
    pthread_t sub_thread;
    bool sub_started;
    atomic_bool sub_stop;
    /* Client-side caching (redis_track.c); NULL while nobody tracks. */
    _Atomic(rc_track *) track;
};

/* Opens an authenticated connection to n within the deadline; NULL with
 * *err (-errno) and why in msg. */
redisContext *mg_rc_conn_open(mg_redis_cluster *rc, rc_node *n, int64_t deadline_us, int *err,
                              char *msg, size_t msglen);

/* A command ran, or is about to, on a connection whose reads Redis does not
 * track (its node has no subscription yet, or CLIENT TRACKING failed):
 * whatever a reader cached meanwhile may miss a change, so the tracking
 * epoch moves on and those reads are not kept. */
void mg_rc_track_untracked(mg_redis_cluster *rc);

#endif
