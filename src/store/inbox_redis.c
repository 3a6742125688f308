/* inbox_redis.c: the offline inbox in Redis Cluster.
 *
 * Threads: router worker threads, concurrently; never the WebSocket service
 * thread.
 *
 * DESIGN (keys in redis_store.h): per user a sorted set of ids (arrival
 * order) and a hash id -> protobuf envelope, both tagged {user} so they live
 * in one slot and one Lua script touches both atomically:
 * - store: nothing when the id is already there (idempotent); else ZADD with
 *   a score strictly above the newest (arrival_ms * 1024, bumped), HSET the
 *   envelope, drop what is older than max_age, pop the oldest beyond
 *   max_messages, PEXPIRE both keys to max_age.
 * - fetch: drop the expired, then the oldest `max` envelopes in order.
 * - ack: ZREM + HDEL; 0 removed -> -ENOENT.
 * Guarantees: order by arrival per user (across gateways, even with skewed
 * clocks, since scores only grow); a message leaves only by ack, cap or age.
 * Durability (--inbox-min-replicas > 0): a store returns 0 (STORED) only
 * after WAIT on the connection that ran the script says that many replicas
 * have it, within the Redis timeout; fewer gives -EREMOTEIO (FAILED "offline
 * inbox not replicated"), never a STORED that a failover can take back. The
 * message may still be on the master and reach the user later: FAILED means
 * "not known to be durable", and a retry with the same id is idempotent.
 */
#include "store/redis_store.h"

#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_time.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MG_IR_FETCH_MAX 4096 /* messages per fetch at most */

/* ARGV: id, envelope, now*1024, max_messages, max_age_ms, "(" cutoff */
static const char STORE_LUA[] =
    "if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end "
    "local score = tonumber(ARGV[3]) "
    "local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES') "
    "if last[2] and tonumber(last[2]) >= score then score = tonumber(last[2]) + 1 end "
    "redis.call('ZADD', KEYS[1], score, ARGV[1]) "
    "redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) "
    "local maxage = tonumber(ARGV[5]) "
    "if maxage > 0 then "
    "  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[6])) do "
    "    redis.call('ZREM', KEYS[1], id) redis.call('HDEL', KEYS[2], id) end "
    "  redis.call('PEXPIRE', KEYS[1], maxage) redis.call('PEXPIRE', KEYS[2], maxage) "
    "end "
    "local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4]) "
    "if over > 0 then "
    "  local popped = redis.call('ZPOPMIN', KEYS[1], over) "
    "  for i = 1, #popped, 2 do redis.call('HDEL', KEYS[2], popped[i]) end "
    "end "
    "return 1";

/* ARGV: max_age_ms, "(" cutoff, max */
static const char FETCH_LUA[] =
    "if tonumber(ARGV[1]) > 0 then "
    "  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do "
    "    redis.call('ZREM', KEYS[1], id) redis.call('HDEL', KEYS[2], id) end "
    "end "
    "local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1) "
    "local out = {} "
    "for _, id in ipairs(ids) do "
    "  local v = redis.call('HGET', KEYS[2], id) "
    "  if v then out[#out + 1] = v else redis.call('ZREM', KEYS[1], id) end "
    "end "
    "return out";

static const char ACK_LUA[] = "local n = redis.call('ZREM', KEYS[1], ARGV[1]) "
                              "redis.call('HDEL', KEYS[2], ARGV[1]) return n";

typedef struct inbox_redis {
    mg_inbox base;
    mg_redis_cluster *rc;
    size_t max_messages;
    int64_t max_age_ms;
    int min_replicas;
} inbox_redis;

static int user_ok(const char *u)
{
    return u && *u && strnlen(u, MG_REDIS_MAX_ID + 1) <= MG_REDIS_MAX_ID;
}

/* "(<(now - max_age) * 1024>": the exclusive upper bound of expired scores. */
static void cutoff(const inbox_redis *ib, int64_t now, char *buf, size_t len)
{
    snprintf(buf, len, "(%" PRId64, (now - ib->max_age_ms) * 1024);
}

/* Runs script on user's keys; wait > 0: and WAITs for that many replicas
 * (a shortfall is -EREMOTEIO). */
static int eval(inbox_redis *ib, redisReply **out, const char *user, const char *script, int nargs,
                const char **args, const size_t *arglens, int wait)
{
    char *k1 = mg_xasprintf("mg:i:{%s}", user), *k2 = mg_xasprintf("mg:im:{%s}", user);
    const char *argv[16];
    size_t lens[16];
    argv[0] = "EVAL";
    argv[1] = script;
    argv[2] = "2";
    argv[3] = k1;
    argv[4] = k2;
    for (int i = 0; i < 5; i++)
        lens[i] = strlen(argv[i]);
    for (int i = 0; i < nargs; i++) {
        argv[5 + i] = args[i];
        lens[5 + i] = arglens ? arglens[i] : strlen(args[i]);
    }
    int acked = -1;
    int rv =
        mg_redis_cluster_command_argv_wait(ib->rc, out, k1, 5 + nargs, argv, lens, wait, &acked);
    if (rv == 0 && (*out)->type == REDIS_REPLY_ERROR) {
        mg_log_warn("inbox", "script failed user=%s err=\"%s\"", user, (*out)->str);
        freeReplyObject(*out);
        *out = NULL;
        rv = -EIO;
    } else if (rv == 0 && wait > 0 && acked < wait) {
        mg_log_warn("inbox", "write not replicated user=%s replicas=%d wanted=%d", user, acked,
                    wait);
        freeReplyObject(*out);
        *out = NULL;
        rv = -EREMOTEIO;
    }
    free(k1);
    free(k2);
    return rv;
}

static int ir_store(mg_inbox *base, const mg_msg *msg)
{
    inbox_redis *ib = (inbox_redis *)base;
    if (!msg || !user_ok(msg->to) || !msg->id || !*msg->id || strlen(msg->id) > MG_REDIS_MAX_ID)
        return -EINVAL;
    size_t envlen = 0;
    uint8_t *env = mg_msg_pack(msg, &envlen);
    int64_t now = mg_now_ms();
    char score[32], maxn[32], maxage[32], cut[40];
    snprintf(score, sizeof(score), "%" PRId64, now * 1024);
    snprintf(maxn, sizeof(maxn), "%zu", ib->max_messages);
    snprintf(maxage, sizeof(maxage), "%" PRId64, ib->max_age_ms);
    cutoff(ib, now, cut, sizeof(cut));
    const char *args[] = {msg->id, (const char *)env, score, maxn, maxage, cut};
    size_t lens[] = {strlen(msg->id), envlen,         strlen(score),
                     strlen(maxn),    strlen(maxage), strlen(cut)};
    redisReply *r = NULL;
    int rv = eval(ib, &r, msg->to, STORE_LUA, 6, args, lens, ib->min_replicas);
    if (r)
        freeReplyObject(r);
    free(env);
    return rv;
}

static int ir_fetch(mg_inbox *base, const char *user, size_t max, mg_msg ***out, size_t *n)
{
    inbox_redis *ib = (inbox_redis *)base;
    *out = NULL;
    *n = 0;
    if (!user_ok(user))
        return -EINVAL;
    if (max == 0)
        return 0;
    if (max > MG_IR_FETCH_MAX)
        max = MG_IR_FETCH_MAX;
    char maxage[32], cut[40], maxs[32];
    snprintf(maxage, sizeof(maxage), "%" PRId64, ib->max_age_ms);
    cutoff(ib, mg_now_ms(), cut, sizeof(cut));
    snprintf(maxs, sizeof(maxs), "%zu", max);
    const char *args[] = {maxage, cut, maxs};
    redisReply *r = NULL;
    int rv = eval(ib, &r, user, FETCH_LUA, 3, args, NULL, 0);
    if (rv != 0)
        return rv;
    if (r->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(r);
        return -EIO;
    }
    mg_msg **items = r->elements ? mg_xcalloc(r->elements, sizeof(*items)) : NULL;
    size_t k = 0;
    for (size_t i = 0; i < r->elements; i++) {
        redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_STRING)
            continue;
        if (mg_msg_unpack((const uint8_t *)e->str, e->len, &items[k]) == 0)
            k++;
        else
            mg_log_warn("inbox", "undecodable inbox entry skipped user=%s", user);
    }
    freeReplyObject(r);
    if (k == 0) {
        free(items);
        items = NULL;
    }
    *out = items;
    *n = k;
    return 0;
}

static int ir_ack(mg_inbox *base, const char *user, const char *msg_id)
{
    inbox_redis *ib = (inbox_redis *)base;
    if (!user_ok(user) || !msg_id || !*msg_id || strlen(msg_id) > MG_REDIS_MAX_ID)
        return -EINVAL;
    const char *args[] = {msg_id};
    redisReply *r = NULL;
    int rv = eval(ib, &r, user, ACK_LUA, 1, args, NULL, 0);
    if (rv != 0)
        return rv;
    rv = r->type == REDIS_REPLY_INTEGER && r->integer > 0 ? 0 : -ENOENT;
    freeReplyObject(r);
    return rv;
}

static void ir_free(mg_inbox *base)
{
    free(base);
}

static const struct mg_inbox_ops inbox_redis_ops = {
    .name = "redis-cluster",
    .store = ir_store,
    .fetch = ir_fetch,
    .ack = ir_ack,
    .free = ir_free,
};

mg_inbox *mg_inbox_redis_create(mg_redis_cluster *rc, size_t max_messages, int64_t max_age_seconds)
{
    return mg_inbox_redis_create_durable(rc, max_messages, max_age_seconds, 0);
}

mg_inbox *mg_inbox_redis_create_durable(mg_redis_cluster *rc, size_t max_messages,
                                        int64_t max_age_seconds, int min_replicas)
{
    if (!rc || max_messages == 0 || min_replicas < 0)
        return NULL;
    inbox_redis *ib = mg_new(inbox_redis);
    ib->base.ops = &inbox_redis_ops;
    ib->rc = rc;
    ib->max_messages = max_messages;
    ib->max_age_ms = max_age_seconds > 0 ? max_age_seconds * 1000 : 0;
    ib->min_replicas = min_replicas;
    return &ib->base;
}
