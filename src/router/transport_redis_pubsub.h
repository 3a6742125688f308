/* transport_redis_pubsub.h: the Redis Pub/Sub bus (path redis-pubsub):
 * sharded pub/sub on the Redis Cluster, one channel per gateway.
 *
 * Each gateway SSUBSCRIBEs its own channel "meshgate:gw:{<gateway id>}" (the
 * hash tag puts it on the shard of that slot) and a sender SPUBLISHes a
 * message to the target gateway's channel, on the master owning its slot.
 * The receiving gateway hands the message to its local transport
 * (mg_router_deliver_local) and, for HIGH, SPUBLISHes a receipt (message id,
 * recipient, the local outcome) on the sender's own channel.
 *
 * deliver() outcomes:
 *   SPUBLISH reached 0 subscribers            -> FAILED "... no subscriber" at once
 *   LOW, SPUBLISH reached >= 1 subscriber     -> ACCEPTED (not awaited further)
 *   HIGH, receipt DELIVERED before the wait   -> DELIVERED (connections, duplicate)
 *   HIGH, receipt NOT_CONNECTED               -> FAILED + not_connected
 *   HIGH, no receipt within min(deadline, timeout_ms), Redis error, connection
 *   lost before the reply, pending bound reached -> FAILED, reason
 * Pub/Sub is at-most-once on the wire: a message published while the
 * target's shard fails over may be lost; only a receipt makes it DELIVERED,
 * so the router's next step (another bus, the inbox) carries what was not
 * confirmed. A message that went both ways is shown once per gateway (the
 * local transport's dedupe window).
 *
 * Envelope (binary, big-endian): "MGP1", then
 *   'M' flags(1: receipt wanted) seq(8) origin_len(2) origin  mg_msg_pack bytes
 *   'R' status(1) flags(1: not_connected, 2: duplicate) connections(4) seq(8)
 *       id_len(2) id  to_len(2) to
 * A payload that does not decode, or is larger than max_bytes, is counted
 * (meshgate_bus_bad_payloads_total{bus,reason}) and skipped; the
 * subscription keeps going.
 *
 * Topology: the slot map of the shared cluster client (redis_cluster.h),
 * reloaded on the store pool every 2 s and after MOVED, 0 receivers,
 * SUNSUBSCRIBE or a lost connection (Redis 7.0 lets a demoted master take
 * SSUBSCRIBE and SPUBLISH without MOVED, so a fresh map is what moves both
 * ends after a failover). MOVED on SPUBLISH retries once on the named node.
 * The subscription follows SUNSUBSCRIBE from the server, MOVED, connection
 * loss and a change of its slot's owner (checked every second, with a PING)
 * by subscribing again on the slot's master, not on the node that dropped
 * it until the map names another (5 s at most).
 *
 * Threads: one I/O thread "redis-pubsub" runs a libev loop over
 * non-blocking connections (one per master it publishes to, one for the
 * subscription; hiredis's reader parses replies). deliver() (any thread)
 * posts to it through a locked queue and ev_async; completions run on it; a
 * libev timer per pending message ends its wait at the deadline. No thread
 * waits for a message.
 *
 * Metrics (label bus="redis-pubsub"): meshgate_bus_sent_total,
 * meshgate_bus_failed_total{reason}, meshgate_bus_receipt_seconds,
 * meshgate_bus_pending, meshgate_bus_received_total, meshgate_bus_local_delivery_seconds,
 * meshgate_bus_bad_payloads_total{reason}, meshgate_bus_resubscribes_total.
 */
#ifndef MG_TRANSPORT_REDIS_PUBSUB_H
#define MG_TRANSPORT_REDIS_PUBSUB_H

#include "common/mg_pool.h"
#include "discovery/peers.h"
#include "router/router.h"
#include "router/transport.h"
#include "store/redis_cluster.h"

#include <stddef.h>

#define MG_PUBSUB_CHANNEL_PREFIX "meshgate:gw:"

typedef struct mg_transport_redis_pubsub_config {
    const char *gateway_id;      /* this gateway: its channel (copied) */
    mg_redis_cluster *cluster;   /* slot map and refreshes (borrowed, outlives the transport) */
    const char *user, *password; /* AUTH on every connection; NULL/"" none (copied) */
    int timeout_ms;              /* HIGH receipt wait, connect and reply bound; <= 0: 500 */
    size_t max_bytes;            /* largest envelope sent or accepted; 0: 1 MiB */
    size_t max_pending;          /* messages in flight; beyond: deliver -EAGAIN; 0: 65536 */
    mg_pool *refresh_pool;       /* runs slot map reloads; NULL: on the I/O thread */
    mg_peers *peers; /* discovery: a target advertising buses without redis-pubsub is not
                      * available (mixed fleets); NULL or a target not listed: try it */
} mg_transport_redis_pubsub_config;

/* Creates the transport and its I/O thread (not subscribed yet). Never NULL. */
mg_transport *mg_transport_redis_pubsub_create(const mg_transport_redis_pubsub_config *cfg);

/* Subscribes to this gateway's channel, delivering what arrives through
 * router (which must outlive the transport). Waits for the subscription up
 * to 3 x timeout_ms (at least 2 s): returns 0, or -EHOSTUNREACH with err
 * naming the channel, the node and the error (it keeps trying after). */
int mg_transport_redis_pubsub_start(mg_transport *t, mg_router *router, char *err, size_t errlen);

/* Stops: unsubscribes (senders fall through at once), fails the messages
 * waiting for receipts (the router's next step takes them), refuses new
 * sends (-ESHUTDOWN). Receipts of deliveries still finishing here are still
 * published. Idempotent; the I/O thread ends in free. */
void mg_transport_redis_pubsub_stop(mg_transport *t);

/* Whether the subscription is live (for readiness and tests). */
bool mg_transport_redis_pubsub_subscribed(mg_transport *t);

/* The channel of a gateway, "meshgate:gw:{<id>}", into buf. */
void mg_pubsub_channel(const char *gateway_id, char *buf, size_t len);

#endif
