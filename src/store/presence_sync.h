/* presence_sync.h: presence across regions (a presence store that wraps the
 * region's own one).
 *
 * Each region keeps presence, leases and the inbox in its own Redis Cluster.
 * What a region needs of the others is a directory of where users are, and
 * that is replicated, never looked up across regions:
 *
 *   publish   every connect and disconnect of a local user takes a snapshot
 *             of the user's gateways in this region with a new version
 *             (one Lua script on the user's slot: version = max(last + 1,
 *             now_ms * 1000), so versions only grow, even after the counter
 *             was lost), writes it into this region's view and produces it
 *             to the replication topic (log-compacted, key
 *             "<region>/<user>"), asynchronously.
 *   consume   one consumer group per region ("meshgate-presence-<region>")
 *             applies the other regions' records to this region's view by
 *             compare-and-set on the version, so a late or repeated record
 *             never wins over a newer one (thread "presence-sync").
 *   lookup    the wrapped store's live local connections, plus, for every
 *             other region whose entry names gateways, one reference per
 *             gateway (conn_id ""). The list's home_region is the region the
 *             user was last seen in when that is not this one: where the
 *             user's inbox lives (router.c hands offline sends there).
 *
 * Keys (this region's cluster): mg:v:{<user>} hash region ->
 *   "<version>|<at_ms>|<gw>,<gw>..." (gateways empty: offline there), and
 *   "#<region>" -> the last version this region gave the user.
 * Record (JSON): {"user","region","version","at_ms","gateways":[...]}.
 *
 * A stale view costs a hop, never a message: the far region resolves
 * locally and routes on (router.c: a message from the queue is delivered
 * there, by gRPC, or to that region's inbox).
 *
 * Thread-safety: as presence.h (ops may block on Redis; never on the
 * WebSocket thread).
 */
#ifndef MG_PRESENCE_SYNC_H
#define MG_PRESENCE_SYNC_H

#include "store/presence.h"
#include "store/redis_cluster.h"

typedef struct mg_presence_sync_config {
    const char *brokers;    /* Kafka bootstrap servers */
    const char *topic;      /* the replication topic ("meshgate.presence" when NULL or "") */
    const char *region;     /* this gateway's region */
    const char *gateway_id; /* this gateway */
    int partitions;         /* of the topic when this gateway creates it; <= 0: 6 */
} mg_presence_sync_config;

/* Wraps inner (ownership passes, also on failure) whose entries live in rc
 * (borrowed; must outlive the store). Creates the producer and, when
 * missing, the compacted topic (waits up to 5 s for the broker's answer; a
 * topic that cannot be created is logged, not fatal). NULL with err filled
 * on a configuration error. */
mg_presence *mg_presence_sync_create(mg_presence *inner, mg_redis_cluster *rc,
                                     const mg_presence_sync_config *cfg, char *err, size_t errlen);

/* Called on the "presence-sync" thread when another region's record says
 * user is now online there (applied, newer than what the view had): where
 * this region hands over the user's inbox (mg_router_handover_inbox). */
typedef void (*mg_presence_online_fn)(void *arg, const char *user, const char *region);

/* Starts consuming the other regions' records ("presence-sync" thread);
 * online (may be NULL) as above, arg must outlive the consumer. Returns 0 or
 * a negative errno. */
int mg_presence_sync_start(mg_presence *p, mg_presence_online_fn online, void *arg);
/* Stops the consumer (the record being applied finishes, what was applied
 * is committed). Idempotent; free also stops it. */
void mg_presence_sync_stop(mg_presence *p);

#endif
