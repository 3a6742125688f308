/* Integration tests that disturb the real Redis Cluster (they hold the
 * exclusive chaos lock, see test_redis_util.h, and leave the cluster healthy):
 * - resharding while a thread writes and reads: MOVED and ASK are followed,
 *   nothing is lost;
 * - a master is stopped: calls fail within the timeout with -EIO/-ETIMEDOUT,
 *   its replica takes over and the client recovers by itself within 10 s
 *   (cluster-node-timeout 2000), presence written before is still found;
 *   the node is restarted afterwards. */
#include "store/redis_store.h"
#include "test_redis_util.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>

static char *cmd_str(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    cr_assert(r, "command failed: %s", c->errstr);
    cr_assert_neq(r->type, REDIS_REPLY_ERROR, "%s", r->str);
    char *s = r->str ? strdup(r->str) : NULL;
    freeReplyObject(r);
    return s;
}

struct writer {
    mg_redis_cluster *rc;
    const char *tag;
    atomic_int stop;
    int n, errors, mismatches;
};

static void *writer_run(void *arg)
{
    struct writer *w = arg;
    char key[128], val[32];
    while (!atomic_load(&w->stop) && w->n < 200000) {
        int i = w->n;
        snprintf(key, sizeof(key), "{%s}:%d", w->tag, i);
        snprintf(val, sizeof(val), "v%d", i);
        redisReply *r = NULL;
        if (mg_redis_cluster_command(w->rc, &r, key, "SET %s %s EX 120", key, val) != 0) {
            w->errors++;
            continue;
        }
        if (r->type != REDIS_REPLY_STATUS)
            w->errors++;
        freeReplyObject(r);
        w->n++;
        int j = i / 2; /* read back an older key too */
        snprintf(key, sizeof(key), "{%s}:%d", w->tag, j);
        snprintf(val, sizeof(val), "v%d", j);
        if (mg_redis_cluster_command(w->rc, &r, key, "GET %s", key) != 0) {
            w->errors++;
            continue;
        }
        if (r->type != REDIS_REPLY_STRING || strcmp(r->str, val) != 0)
            w->mismatches++;
        freeReplyObject(r);
    }
    return NULL;
}

/* Moves slot from src to dst by hand (CLUSTER SETSLOT + MIGRATE), slowly
 * enough that the writer meets both the MIGRATING (ASK) and the final (MOVED)
 * state. */
static void move_slot(unsigned slot, const char *src, const char *dst, const char *nodes_csv)
{
    redisContext *s = tr_direct(src), *d = tr_direct(dst);
    char *sid = cmd_str(s, "CLUSTER MYID"), *did = cmd_str(d, "CLUSTER MYID");
    free(cmd_str(d, "CLUSTER SETSLOT %u IMPORTING %s", slot, sid));
    free(cmd_str(s, "CLUSTER SETSLOT %u MIGRATING %s", slot, did));
    usleep(300000);
    char dhost[64];
    snprintf(dhost, sizeof(dhost), "%s", dst);
    *strrchr(dhost, ':') = '\0';
    int dport = atoi(strrchr(dst, ':') + 1);
    for (int round = 0; round < 10000; round++) {
        redisReply *keys = redisCommand(s, "CLUSTER GETKEYSINSLOT %u 50", slot);
        cr_assert(keys && keys->type == REDIS_REPLY_ARRAY);
        size_t nk = keys->elements;
        if (nk) {
            const char **argv = calloc(nk + 8, sizeof(*argv));
            char port[16];
            snprintf(port, sizeof(port), "%d", dport);
            int a = 0;
            argv[a++] = "MIGRATE";
            argv[a++] = dhost;
            argv[a++] = port;
            argv[a++] = "";
            argv[a++] = "0";
            argv[a++] = "5000";
            argv[a++] = "KEYS";
            for (size_t k = 0; k < nk; k++)
                argv[a++] = keys->element[k]->str;
            redisReply *m = redisCommandArgv(s, a, argv, NULL);
            cr_assert(m && m->type != REDIS_REPLY_ERROR, "MIGRATE: %s", m ? m->str : s->errstr);
            freeReplyObject(m);
            free(argv);
        }
        freeReplyObject(keys);
        if (!nk)
            break;
        usleep(20000);
    }
    usleep(200000);
    free(cmd_str(d, "CLUSTER SETSLOT %u NODE %s", slot, did));
    free(cmd_str(s, "CLUSTER SETSLOT %u NODE %s", slot, did));
    char *csv = strdup(nodes_csv), *save = NULL;
    for (char *t = strtok_r(csv, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        redisContext *o = tr_direct(t);
        redisReply *r = redisCommand(o, "CLUSTER SETSLOT %u NODE %s", slot, did);
        freeReplyObject(r); /* replicas refuse: fine, the bus tells them */
        redisFree(o);
    }
    free(csv);
    usleep(500000);
    free(sid);
    free(did);
    redisFree(s);
    redisFree(d);
}

Test(redis_chaos, resharding_while_traffic_flows, .timeout = 120)
{
    int lk = tr_lock(1);
    mg_redis_cluster *rc = tr_cluster(2000);
    char tag[64];
    snprintf(tag, sizeof(tag), "mgt-reshard-%d-%lld", (int)getpid(), (long long)mg_mono_us());
    unsigned slot = mg_redis_key_slot(tag, strlen(tag));
    char src[64], dst[64];
    mg_redis_cluster_refresh(rc);
    mg_redis_cluster_slot_owner(rc, slot, src, sizeof(src));
    dst[0] = '\0';
    for (unsigned s = 0; s < MG_REDIS_SLOTS && !dst[0]; s += 512) {
        mg_redis_cluster_slot_owner(rc, s, dst, sizeof(dst));
        if (strcmp(dst, src) == 0)
            dst[0] = '\0';
    }
    cr_assert(src[0] && dst[0]);

    struct writer w = {.rc = rc, .tag = tag};
    pthread_t th;
    pthread_create(&th, NULL, writer_run, &w);
    usleep(300000);
    move_slot(slot, src, dst, tr_nodes());
    usleep(300000);
    move_slot(slot, dst, src, tr_nodes()); /* and back: the cluster as it was */
    usleep(300000);
    atomic_store(&w.stop, 1);
    pthread_join(th, NULL);

    mg_redis_cluster_stats st;
    mg_redis_cluster_stats_get(rc, &st);
    cr_log_info("reshard: writes=%d moved=%llu ask=%llu refreshes=%llu errors=%d", w.n,
                (unsigned long long)st.moved, (unsigned long long)st.ask,
                (unsigned long long)st.refreshes, w.errors);
    cr_assert_eq(w.errors, 0);
    cr_assert_eq(w.mismatches, 0);
    cr_assert_gt(w.n, 100, "too little traffic: %d", w.n);
    cr_assert_gt(st.moved, 0, "no MOVED seen");
    cr_assert_gt(st.ask, 0, "no ASK seen");
    /* nothing lost: every key written is there with its value */
    mg_redis_batch *b = mg_redis_batch_new();
    char key[128];
    for (int i = 0; i < w.n; i++) {
        snprintf(key, sizeof(key), "{%s}:%d", tag, i);
        mg_redis_batch_add(b, key, "GET %s", key);
    }
    cr_assert_eq(mg_redis_cluster_exec(rc, b), 0);
    for (int i = 0; i < w.n; i++) {
        char want[32];
        snprintf(want, sizeof(want), "v%d", i);
        redisReply *r = mg_redis_batch_reply(b, (size_t)i);
        cr_assert(r->type == REDIS_REPLY_STRING && strcmp(r->str, want) == 0, "key %d lost", i);
    }
    mg_redis_batch_free(b);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}

Test(redis_chaos, master_failover_recovers_by_itself, .timeout = 120)
{
    int lk = tr_lock(1);
    const int timeout_ms = 1000;
    mg_redis_cluster *rc = tr_cluster(timeout_ms);
    char gwid[64], user[64], key[128], owner[64];
    snprintf(gwid, sizeof(gwid), "tF-%d", (int)getpid());
    snprintf(user, sizeof(user), "failover-%d-%lld", (int)getpid(), (long long)mg_mono_us());
    snprintf(key, sizeof(key), "mg:p:{%s}", user);
    mg_presence *p = mg_presence_redis_create(rc, gwid, "eu", 30);
    cr_assert_not_null(p);
    mg_inbox *ib = mg_inbox_redis_create(rc, 10, 600);
    cr_assert_eq(p->ops->connect(p, user, "f-1", 42), 0);
    mg_msg *m = mg_msg_new("fm1", "x", user, (const uint8_t *)"hi", 2, NULL, 1, MG_PRIO_HIGH);
    cr_assert_eq(ib->ops->store(ib, m), 0);
    mg_msg_free(m);
    tr_owner(rc, key, owner, sizeof(owner));
    usleep(500000); /* let the replica catch up (asynchronous replication) */
    const char *port = strrchr(owner, ':') + 1;
    char args[64];
    snprintf(args, sizeof(args), "stop-node %s", port);
    cr_assert_eq(tr_infra(args), 0);
    int64_t t0 = mg_mono_ms(), recovered = -1;
    int failures = 0;
    int64_t worst = 0;
    while (mg_mono_ms() - t0 < 20000) {
        mg_presence_list l = {0};
        int64_t c0 = mg_mono_ms();
        int rv = p->ops->lookup(p, user, &l);
        int64_t took = mg_mono_ms() - c0;
        if (took > worst)
            worst = took;
        if (rv == 0 && l.n == 1 && strcmp(l.items[0].conn_id, "f-1") == 0) {
            recovered = mg_mono_ms() - t0;
            mg_presence_list_clear(&l);
            break;
        }
        mg_presence_list_clear(&l);
        cr_assert(rv == -EIO || rv == -ETIMEDOUT, "unexpected rv=%d n=%zu", rv, l.n);
        failures++;
        usleep(100000);
    }
    cr_log_info("failover: recovered after %lld ms, %d failed calls, slowest call %lld ms",
                (long long)recovered, failures, (long long)worst);
    cr_assert_geq(recovered, 0, "no recovery within 20 s");
    cr_assert_lt(recovered, 10000, "recovery took %lld ms", (long long)recovered);
    cr_assert_leq(worst, timeout_ms + 300, "a call took %lld ms (timeout %d)", (long long)worst,
                  timeout_ms);
    /* the inbox message survived too */
    mg_msg **items = NULL;
    size_t n = 0;
    cr_assert_eq(ib->ops->fetch(ib, user, 10, &items, &n), 0);
    cr_assert_eq(n, 1);
    mg_inbox_items_free(items, n);
    cr_assert_eq(ib->ops->ack(ib, user, "fm1"), 0);

    /* restore: the old master rejoins as a replica */
    snprintf(args, sizeof(args), "start-node %s", port);
    cr_assert_eq(tr_infra(args), 0);
    cr_assert_eq(tr_infra("wait"), 0);
    cr_assert_eq(p->ops->remove_gateway(p), 0);
    mg_inbox_free(ib);
    mg_presence_free(p);
    mg_redis_cluster_free(rc);
    tr_unlock(lk);
}
