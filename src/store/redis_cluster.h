/* redis_cluster.h: a small Redis Cluster client on top of hiredis 0.14.
 *
 * Debian's hiredis has no cluster support, so this module routes each command
 * to the master owning its key's hash slot (CRC16 with {hash tags}), follows
 * MOVED and ASK redirections, refreshes the slot map (CLUSTER SLOTS) after
 * errors and failovers, and pipelines batches (grouped by node, written to
 * every node before any reply is read).
 *
 * Connections: a small pool per node (idle connections are kept, up to
 * MG_REDIS_POOL_IDLE per node; more are opened while callers are busy), so
 * several worker threads run commands concurrently without sharing a socket.
 * Every connection is opened with redisConnectWithTimeout, then
 * AUTH [user] password when a password is given.
 *
 * Deadlines: every call (single command or batch) has an overall budget of
 * timeout_ms, spent on connects, writes, reads, redirections and retries;
 * when it runs out the call fails with -ETIMEDOUT (no answer in time) or
 * -EIO (connection refused/reset, cluster down), never later.
 * Commands may be retried within the budget after a connection error, so
 * they should be idempotent (every command meshgate sends is).
 *
 * Thread-safety: every function may be called from any thread concurrently
 * except _free. Calls block on the network: never call them from the
 * WebSocket service thread.
 * Returns: 0 or a negative errno. A Redis error reply (-ERR ...) is NOT a
 * failure of the call: it comes back as a REDIS_REPLY_ERROR reply.
 */
#ifndef MG_REDIS_CLUSTER_H
#define MG_REDIS_CLUSTER_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MG_REDIS_SLOTS     16384
#define MG_REDIS_POOL_IDLE 8 /* idle connections kept per node */

typedef struct mg_redis_cluster mg_redis_cluster;

/* Connects to the cluster: tries the seed nodes of nodes_csv
 * ("host:port,host:port", at least one) in order until one answers
 * CLUSTER SLOTS. user may be NULL (AUTH password only); password NULL or ""
 * means no AUTH. timeout_ms (> 0) is the budget of every later call.
 * Returns NULL when no seed answers (or the first that answers is not a
 * cluster, or refuses AUTH), with a message in err naming the nodes tried
 * and the last error, e.g. "no Redis Cluster node reachable (tried
 * 127.0.0.1:17000, 127.0.0.1:17001): Connection refused".
 * The strings are copied. */
mg_redis_cluster *mg_redis_cluster_create(const char *nodes_csv, const char *user,
                                          const char *password, int timeout_ms, char *err,
                                          size_t errlen);
/* Sentinel mode: the same client on a single primary that Redis Sentinel
 * names (SENTINEL get-master-addr-by-name master_name, asking the Sentinels
 * of sentinels_csv in turn; the node must answer ROLE master). Every slot
 * maps to that primary, so everything below works unchanged (MOVED/ASK never
 * happen; multi-key commands need no hash tag). The primary is asked for
 * again after I/O errors, READONLY and the other retryable errors, every
 * 2 s anyway, and at once on a Sentinel's +switch-master (one thread,
 * "redis-sentinel", holds that subscription), so a failover is followed
 * within the Sentinels' own failover time plus one call's retries. Sentinels are asked without
 * AUTH; user and password are for the Redis nodes. NULL when no Sentinel names a master that
 * answers, with a message in err naming the Sentinels tried. */
mg_redis_cluster *mg_redis_sentinel_create(const char *sentinels_csv, const char *master_name,
                                           const char *user, const char *password, int timeout_ms,
                                           char *err, size_t errlen);

/* The most elements a reply array may declare (1M: far above any reply meshgate asks for). */
#define MG_REDIS_MAX_ARRAY (1 << 20)

/* Makes reader refuse a reply array declaring more than MG_REDIS_MAX_ARRAY elements (a protocol
 * error on that connection) instead of allocating what a broken or hostile server claims:
 * hiredis 0.14 has no such bound, and `*555555555` alone asks for 4.4 GB. Every reader
 * meshgate creates goes through this. */
void mg_redis_reader_bound(redisReader *reader);

/* Closes every connection. NULL is a no-op. No call may be running. */
void mg_redis_cluster_free(mg_redis_cluster *rc);

/* Runs one command on the master owning key (key NULL: any master) with
 * printf-like hiredis formatting (%s, %b, ...). On 0, *out is the reply (the
 * caller frees it with freeReplyObject; it may be a REDIS_REPLY_ERROR). */
int mg_redis_cluster_command(mg_redis_cluster *rc, redisReply **out, const char *key,
                             const char *fmt, ...);
/* Same with an argument vector (argvlen NULL: strlen of each). */
int mg_redis_cluster_command_argv(mg_redis_cluster *rc, redisReply **out, const char *key, int argc,
                                  const char **argv, const size_t *argvlen);

/* Same, and then, when the reply is not an error reply, WAIT numreplicas
 * on the same connection (the node that took the write), with a timeout
 * inside what is left of the call's budget. *replicas gets WAIT's answer
 * (how many replicas acknowledged this connection's writes so far), or -1
 * when WAIT itself failed or was not sent (numreplicas <= 0, error reply);
 * the reply is returned either way, since the master did run the command.
 * A write redirected by MOVED/ASK is waited for on the node that ran it. */
int mg_redis_cluster_command_argv_wait(mg_redis_cluster *rc, redisReply **out, const char *key,
                                       int argc, const char **argv, const size_t *argvlen,
                                       int numreplicas, int *replicas);

/* A batch of commands run pipelined: grouped by node, each group written in
 * one go, replies read back; redirected or failed commands are resent within
 * the budget. Not thread-safe itself (one caller builds and runs it). */
typedef struct mg_redis_batch mg_redis_batch;

mg_redis_batch *mg_redis_batch_new(void);
void mg_redis_batch_free(mg_redis_batch *b); /* frees the replies too; NULL no-op */
/* Empties b for reuse (its commands and replies are freed): what it has
 * room for stays allocated, so a caller running batches in a loop does not
 * allocate their arrays again. */
void mg_redis_batch_reset(mg_redis_batch *b);
/* How many commands b has room for without growing. */
size_t mg_redis_batch_room(const mg_redis_batch *b);
/* Adds one command; returns its index. key as in mg_redis_cluster_command. */
size_t mg_redis_batch_add(mg_redis_batch *b, const char *key, const char *fmt, ...);
size_t mg_redis_batch_add_argv(mg_redis_batch *b, const char *key, int argc, const char **argv,
                               const size_t *argvlen);
size_t mg_redis_batch_count(const mg_redis_batch *b);
/* Room for n more commands in one allocation (a caller that knows how many
 * it adds: no growth, no copies). */
void mg_redis_batch_reserve(mg_redis_batch *b, size_t n);
/* Runs every command not run yet. Returns 0 when every command got a reply
 * (possibly an error reply), else the first command's error (-EIO,
 * -ETIMEDOUT); the other commands' replies are still available. */
int mg_redis_cluster_exec(mg_redis_cluster *rc, mg_redis_batch *b);
/* The reply of command i (owned by the batch; NULL when it failed) and its
 * status (0 or a negative errno). */
redisReply *mg_redis_batch_reply(const mg_redis_batch *b, size_t i);
int mg_redis_batch_status(const mg_redis_batch *b, size_t i);

/* Counters since create (for tests, metrics and logs). */
typedef struct mg_redis_cluster_stats {
    uint64_t commands;   /* commands sent (each attempt counts) */
    uint64_t moved;      /* MOVED redirections followed */
    uint64_t ask;        /* ASK redirections followed */
    uint64_t refreshes;  /* slot map reloads (Sentinel mode: primary look-ups) */
    uint64_t reconnects; /* connections opened */
    uint64_t io_errors;  /* connection failures (refused, reset, timeout) */
    uint64_t retries;    /* TRYAGAIN / CLUSTERDOWN / LOADING retries */
} mg_redis_cluster_stats;

void mg_redis_cluster_stats_get(mg_redis_cluster *rc, mg_redis_cluster_stats *out);

/* Reloads the slot map now (normally done by itself after errors). */
int mg_redis_cluster_refresh(mg_redis_cluster *rc);

/* "host:port" of the master serving slot, or "" when unknown, into buf. */
void mg_redis_cluster_slot_owner(mg_redis_cluster *rc, unsigned slot, char *buf, size_t len);

/* Server-assisted client-side caching (Redis tracking, RESP2 redirect mode;
 * redis_track.c).
 *
 * _track starts one thread, "redis-track", that holds a connection to every
 * master of the slot map, subscribed to __redis__:invalidate. Every
 * connection this client then sends commands on has CLIENT TRACKING on,
 * redirected to its master's subscription, so Redis tells of each later
 * change to a key read through it: fn(arg, key, len) runs on that thread
 * for each changed key, and fn(arg, NULL, 0) when everything read so far
 * must be forgotten (Redis flushed, a subscription was lost, a master left
 * the slot map).
 * A reader may keep what it read only when _track_epoch gave the same
 * nonzero value before the read and after it (0: some master has no
 * subscription yet, so reads are not all tracked), and forgets it on fn.
 * _track_quiet: no invalidation has reached this process unapplied (none
 * waits on a subscription's socket, none is being applied): a kept value
 * may be used. Both may be called from any thread and never block.
 * _untrack stops the thread (fn is not called after it returns); _free
 * does it too. _track returns -EALREADY when tracking already runs. */
typedef void (*mg_redis_inval_fn)(void *arg, const char *key, size_t len);
int mg_redis_cluster_track(mg_redis_cluster *rc, mg_redis_inval_fn fn, void *arg);
void mg_redis_cluster_untrack(mg_redis_cluster *rc);
uint64_t mg_redis_cluster_track_epoch(mg_redis_cluster *rc);
bool mg_redis_cluster_track_quiet(mg_redis_cluster *rc);

/* CRC16 (XMODEM, as Redis Cluster) and the hash slot of a key, honouring the
 * first non-empty {hash tag}. */
uint16_t mg_redis_crc16(const char *buf, size_t len);
unsigned mg_redis_key_slot(const char *key, size_t len);

#endif
