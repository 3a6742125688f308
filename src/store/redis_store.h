/* redis_store.h: the Redis Cluster backends of presence and inbox.
 *
 * Both borrow a mg_redis_cluster (redis_cluster.h) that the caller creates
 * first and frees last, after freeing every store made on it.
 * Threads and returns: as presence.h and inbox.h (worker threads only).
 */
#ifndef MG_REDIS_STORE_H
#define MG_REDIS_STORE_H

#include "store/inbox.h"
#include "store/presence.h"
#include "store/redis_cluster.h"

#include <stddef.h>
#include <stdint.h>

/* Longest user id / connection id the Redis stores accept (longer: -EINVAL).
 * The router applies its own, smaller, configured limit first. */
#define MG_REDIS_MAX_ID 4096

/* Presence in Redis Cluster.
 *
 * Keys (each user's keys share a {hash tag}, so they spread over every master):
 *   mg:p:{<user>}     hash conn_id -> "<gateway_id>|<region>|<connected_at_ms>",
 *                     TTL 3 x lease, pushed out by connect and by this gateway's renew
 *   mg:gw:{<gateway>} this gateway's lease, TTL = lease, renewed by ops->renew
 * A lookup returns only entries whose gateway holds a live lease (lease
 * deadlines are cached in-process until they pass), and removes the others
 * with HDEL. So a gateway that dies without cleaning up drops out of lookups
 * within lease_seconds, and its users' keys expire within 3 x lease once no
 * live gateway renews them; no janitor is needed.
 * gateway_id and region must not contain '|'. lease_seconds >= 1 (0: 30).
 * create writes the lease once (so the gateway is live at once) and returns
 * NULL when that fails (err logged). rc is borrowed: it must outlive the
 * store. */
mg_presence *mg_presence_redis_create(mg_redis_cluster *rc, const char *gateway_id,
                                      const char *region, int lease_seconds);

/* Keeps looked-up users' connections in-process (up to max_users, > 0),
 * told of every change by Redis itself (client-side caching with tracking,
 * redis_cluster.h: one subscription per master on the "redis-track"
 * thread), and answers lookup_cached from them without blocking. Plain
 * lookups always read Redis (and refresh the cache). Connects and
 * disconnects through p are forgotten at once; another gateway's reach p
 * when Redis says so, before any later read here could see them. Whenever
 * tracking lapses (a subscription lost, a master not yet subscribed),
 * everything is forgotten and nothing is kept until it is back.
 * At most one cache per mg_redis_cluster. 0, or -EINVAL / -EALREADY /
 * -errno. */
int mg_presence_redis_cache(mg_presence *p, size_t max_users);

/* The offline inbox in Redis Cluster.
 *
 *   mg:i:{<user>}   sorted set of message ids, score = arrival order
 *                   (arrival_ms * 1024, bumped to stay strictly increasing)
 *   mg:im:{<user>}  hash id -> protobuf envelope (mg_msg_pack)
 * Store, fetch and ack are Lua scripts on the user's slot, so they are
 * atomic: store is idempotent by message id and trims by count (oldest
 * first) and age; fetch trims by age first; keys expire max_age after the
 * last store. max_age_seconds <= 0: no age limit (and no TTL).
 * rc is borrowed: it must outlive the store. */
mg_inbox *mg_inbox_redis_create(mg_redis_cluster *rc, size_t max_messages, int64_t max_age_seconds);
/* The same, and a store succeeds only once min_replicas replicas
 * acknowledged it (WAIT on the write's connection, within the cluster
 * client's timeout); fewer: -EREMOTEIO, though the master may keep the
 * message (a retry with the same id does not add it twice). 0: no WAIT.
 * _create is _create_durable with 0. NULL when min_replicas < 0. */
mg_inbox *mg_inbox_redis_create_durable(mg_redis_cluster *rc, size_t max_messages,
                                        int64_t max_age_seconds, int min_replicas);

#endif
