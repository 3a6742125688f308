/* test_redis_util.h: helpers shared by the Redis Cluster integration tests
 * (tests/router/test_redis_*.c), against the real cluster of
 * tests/infra/redis-cluster.sh (MESHGATE_TEST_REDIS_NODES).
 *
 * Tests that disturb the cluster (failover, resharding, CLIENT PAUSE) hold an
 * exclusive flock on $MESHGATE_RUN/redis-chaos.lock; the others hold it
 * shared, so the two kinds never overlap, even across test binaries.
 */
#ifndef MG_TEST_REDIS_UTIL_H
#define MG_TEST_REDIS_UTIL_H

#include "common/mg_time.h"
#include "store/redis_cluster.h"
#include "support/mg_test.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

static inline int tr_lock(int exclusive)
{
    const char *run = getenv("MESHGATE_RUN");
    char path[512];
    snprintf(path, sizeof(path), "%s/redis-chaos.lock", run && *run ? run : "/tmp/meshgate-run");
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    cr_assert(fd >= 0, "cannot open %s", path);
    cr_assert_eq(flock(fd, exclusive ? LOCK_EX : LOCK_SH), 0);
    return fd;
}

static inline void tr_unlock(int fd)
{
    if (fd >= 0)
        close(fd);
}

static inline const char *tr_nodes(void)
{
    return mg_test_require_env("MESHGATE_TEST_REDIS_NODES");
}

static inline mg_redis_cluster *tr_cluster(int timeout_ms)
{
    char err[512];
    mg_redis_cluster *rc =
        mg_redis_cluster_create(tr_nodes(), NULL, NULL, timeout_ms, err, sizeof(err));
    cr_assert_not_null(rc, "cluster create: %s", err);
    return rc;
}

/* A direct (non-cluster) connection to "host:port". */
static inline redisContext *tr_direct(const char *addr)
{
    char host[256];
    snprintf(host, sizeof(host), "%.200s", addr);
    char *colon = strrchr(host, ':');
    cr_assert_not_null(colon, "bad address %s", addr);
    *colon = '\0';
    struct timeval tv = {5, 0};
    redisContext *c = redisConnectWithTimeout(host, atoi(colon + 1), tv);
    cr_assert(c && !c->err, "connect %s: %s", addr, c ? c->errstr : "oom");
    redisSetTimeout(c, tv);
    return c;
}

/* Calls fn(c, addr, arg) with a direct connection to each node of
 * MESHGATE_TEST_REDIS_NODES, in order. */
static inline void tr_each_node(void (*fn)(redisContext *c, const char *addr, void *arg), void *arg)
{
    char *nodes = strdup(tr_nodes()), *save = NULL;
    for (char *t = strtok_r(nodes, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        redisContext *c = tr_direct(t);
        fn(c, t, arg);
        redisFree(c);
    }
    free(nodes);
}

/* A test ACL user on every node: TR_ACL_ALL (every command, key and
 * channel), TR_ACL_NO_CHANNELS (the same but no Pub/Sub channel), or
 * TR_ACL_DEL (deleted). */
enum tr_acl { TR_ACL_DEL, TR_ACL_ALL, TR_ACL_NO_CHANNELS };
struct tr_acl_req {
    const char *user, *pw;
    enum tr_acl mode;
};

static inline void tr_acl_on(redisContext *c, const char *addr, void *arg)
{
    const struct tr_acl_req *q = arg;
    redisReply *r =
        q->mode == TR_ACL_ALL
            ? redisCommand(c, "ACL SETUSER %s reset on >%s ~* &* +@all", q->user, q->pw)
        : q->mode == TR_ACL_NO_CHANNELS
            ? redisCommand(c, "ACL SETUSER %s reset on >%s ~* resetchannels +@all", q->user, q->pw)
            : redisCommand(c, "ACL DELUSER %s", q->user);
    cr_assert(r && r->type != REDIS_REPLY_ERROR, "ACL on %s: %s", addr, r ? r->str : c->errstr);
    freeReplyObject(r);
}

static inline void tr_acl_user(const char *user, const char *pw, enum tr_acl mode)
{
    struct tr_acl_req q = {user, pw ? pw : "", mode};
    tr_each_node(tr_acl_on, &q);
}

/* The master owning key's slot, "host:port" into buf. */
static inline void tr_owner(mg_redis_cluster *rc, const char *key, char *buf, size_t len)
{
    mg_redis_cluster_refresh(rc);
    mg_redis_cluster_slot_owner(rc, mg_redis_key_slot(key, strlen(key)), buf, len);
    cr_assert(buf[0], "no owner for %s", key);
}

/* Runs tests/infra/redis-cluster.sh with args; returns its exit status. */
static inline int tr_infra(const char *args)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "%s/tests/infra/redis-cluster.sh %s >&2", MG_SOURCE_DIR, args);
    return system(cmd);
}

#endif
