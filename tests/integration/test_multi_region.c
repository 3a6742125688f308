/* Multi-region presence (presence_sync.h) against real services: two Redis
 * Clusters (region a: MESHGATE_TEST_REDIS_NODES, region b:
 * MESHGATE_TEST_REDIS_B_NODES), Kafka and Consul. Each region's gateways
 * keep presence and inbox in their own cluster and learn of the other
 * region's users through the replication topic:
 * - a far user is reached by the cold path (the region's topic) and, once
 *   the pair is hot, by gRPC direct to the gateway the view names;
 * - region b's own traffic never touches region a's cluster (MONITOR);
 * - an offline far user's message goes to their region (its inbox), not
 *   the sender's;
 * - late, repeated and undecodable replication records: the view converges
 *   to the newest state and the consumer keeps going. */
#include "common/mg_time.h"
#include "store/redis_cluster.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The presence-replication topic of tag's fleet. */
static void sync_topic(const char *tag, char *out, size_t len)
{
    snprintf(out, len, "meshgate.%s.presence", tag);
}

/* Gateway tag-name of region in tag's fleet, with presence and inbox in the
 * Redis Cluster of redis_env: the region's own. */
static mg_gw *spawn(const char *tag, const char *name, const char *region, const char *redis_env)
{
    char svc[64], topic[64], sync[64], id[64];
    snprintf(svc, sizeof(svc), "meshgate-%s", tag);
    snprintf(topic, sizeof(topic), "meshgate.%s.", tag);
    sync_topic(tag, sync, sizeof(sync));
    snprintf(id, sizeof(id), "%s-%s", tag, name);
    const char *args[] = {"--redis-nodes", /* the fleet's, or region b's cluster */
                          mg_test_require_env(redis_env),
                          "--presence-sync",
                          "true",
                          "--presence-sync-topic",
                          sync,
                          "--kafka-partitions",
                          "2",
                          "--hot-threshold",
                          "3",
                          "--presence-lease-seconds",
                          "3",
                          "--consul-check-interval-seconds", /* Consul's default */
                          "2",
                          NULL};
    return mg_gw_spawn_fleet_kafka(id, svc, region, topic, args);
}

/* The view entry of user for region in the cluster of redis_env ("" when absent). */
static void view_entry(mg_redis_cluster *rc, const char *user, const char *region, char *out,
                       size_t len)
{
    char key[160];
    snprintf(key, sizeof(key), "mg:v:{%s}", user);
    redisReply *r = NULL;
    out[0] = '\0';
    if (mg_redis_cluster_command(rc, &r, key, "HGET %s %s", key, region) == 0 &&
        r->type == REDIS_REPLY_STRING)
        snprintf(out, len, "%s", r->str);
    freeReplyObject(r);
}

/* Waits until the view entry of (user, region) ends with suffix ("|gw" or
 * "|" for offline). */
static bool wait_view(mg_redis_cluster *rc, const char *user, const char *region,
                      const char *suffix, int timeout_ms)
{
    char v[512];
    for (int waited = 0; waited <= timeout_ms; waited += 100) {
        view_entry(rc, user, region, v, sizeof(v));
        size_t n = strlen(v), m = strlen(suffix);
        if (n >= m && !strcmp(v + n - m, suffix))
            return true;
        usleep(100 * 1000);
    }
    return false;
}

static bool recv_message(mg_wsc *ws, const char *id, int timeout_ms)
{
    for (int frames = 0; frames < 50; frames++) {
        char *text = mg_wsc_recv_text(ws, timeout_ms);
        if (!text)
            return false;
        bool got = strstr(text, id) && strstr(text, "\"message\"");
        free(text);
        if (got)
            return true;
    }
    return false;
}

static mg_redis_cluster *cluster(const char *env)
{
    char err[256] = "";
    mg_redis_cluster *rc =
        mg_redis_cluster_create(mg_test_require_env(env), NULL, NULL, 2000, err, sizeof(err));
    cr_assert_not_null(rc, "%s", err);
    return rc;
}

/* MONITOR on every node of a cluster: what region a's cluster is asked. */
typedef struct monitor {
    redisContext *c[8];
    size_t n;
} monitor;

static void monitor_start(monitor *m, const char *nodes)
{
    char *copy = strdup(nodes), *save = NULL;
    m->n = 0;
    for (char *hp = strtok_r(copy, ",", &save); hp && m->n < 8; hp = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(hp, ':');
        *colon = '\0';
        redisContext *c = redisConnect(hp, atoi(colon + 1));
        cr_assert(c && !c->err);
        redisReply *r = redisCommand(c, "MONITOR");
        cr_assert(r && r->type == REDIS_REPLY_STATUS);
        freeReplyObject(r);
        struct timeval tv = {0, 200 * 1000};
        redisSetTimeout(c, tv);
        m->c[m->n++] = c;
    }
    free(copy);
}

/* Drains what the nodes saw; true when a command named needle. */
static bool monitor_saw(monitor *m, const char *needle)
{
    bool saw = false;
    for (size_t i = 0; i < m->n; i++) {
        for (int lines = 0; lines < 100000; lines++) {
            void *rep = NULL;
            if (redisGetReply(m->c[i], &rep) != REDIS_OK || !rep)
                break;
            redisReply *r = rep;
            if (r->type == REDIS_REPLY_STATUS && strstr(r->str, needle))
                saw = true;
            freeReplyObject(r);
        }
        redisFree(m->c[i]);
    }
    m->n = 0;
    return saw;
}

static int send_status(mg_grpc_client *cli, const char *from, const char *to, const char *id,
                       int *path)
{
    Meshgate__V1__SendMessageResponse *resp = NULL;
    char *details = NULL;
    int st = -1;
    grpc_status_code gs = mg_tc_send(cli, from, to, id, "hi", 1, 15000, &resp, &details);
    cr_assert_eq(gs, GRPC_STATUS_OK, "%s", details ? details : "");
    st = resp->result->status;
    *path = resp->result->path;
    cr_log_info("send %s -> %s: status %d path %d reason %s", from, to, st, *path,
                resp->result->reason);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    free(details);
    return st;
}

Test(multi_region, far_paths_local_stores_and_the_home_inbox, .timeout = 240)
{
    char tag[32], ra_name[48], rb_name[48], bob[64], id[96];
    snprintf(tag, sizeof(tag), "mr%d", (int)getpid());
    snprintf(ra_name, sizeof(ra_name), "%sa", tag);
    snprintf(rb_name, sizeof(rb_name), "%sb", tag);
    snprintf(bob, sizeof(bob), "%s-bob", tag);
    mg_gw *a1 = spawn(tag, "a1", ra_name, "MESHGATE_TEST_REDIS_NODES");
    mg_gw *b1 = spawn(tag, "b1", rb_name, "MESHGATE_TEST_REDIS_B_NODES");
    mg_gw *b2 = spawn(tag, "b2", rb_name, "MESHGATE_TEST_REDIS_B_NODES");
    cr_assert(a1 && b1 && b2);
    cr_assert(mg_gw_wait_peer(a1, b1->name, 20000), "a1 discovers b1");
    cr_assert(mg_gw_wait_peer(b2, b1->name, 20000), "b2 discovers b1");
    mg_redis_cluster *rca = cluster("MESHGATE_TEST_REDIS_NODES");
    mg_redis_cluster *rcb = cluster("MESHGATE_TEST_REDIS_B_NODES");

    /* bob connects in region b: presence in b's cluster only, and a's view
     * learns of him through the topic. */
    mg_wsc *ws = mg_wsc_connect_user(b1->ws_port, bob, 5000, NULL);
    cr_assert_not_null(ws);
    char suffix[80];
    snprintf(suffix, sizeof(suffix), "|%s", b1->name);
    cr_assert(wait_view(rca, bob, rb_name, suffix, 30000), "region a's view shows bob on b1");
    char pkey[96];
    snprintf(pkey, sizeof(pkey), "mg:p:{%s}", bob);
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rca, &r, pkey, "EXISTS %s", pkey), 0);
    cr_expect_eq(r->integer, 0, "bob's presence is not written to region a's cluster");
    freeReplyObject(r);

    /* Far and cold: region b's topic. Then hot: gRPC direct to b1. */
    mg_grpc_client *ca = mg_grpc_client_create(a1->grpc_addr, NULL);
    int path = 0, st;
    snprintf(id, sizeof(id), "%s-cold", tag);
    st = send_status(ca, "alice", bob, id, &path);
    cr_expect_eq(st, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED);
    cr_expect_eq(path, MESHGATE__V1__PATH__PATH_KAFKA);
    cr_expect(recv_message(ws, id, 30000), "the cold far message arrived");
    bool hot = false;
    for (int i = 0; i < 6 && !hot; i++) {
        snprintf(id, sizeof(id), "%s-hot%d", tag, i);
        st = send_status(ca, "alice", bob, id, &path);
        cr_expect(recv_message(ws, id, 30000), "far message %d arrived", i);
        hot = st == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED &&
              path == MESHGATE__V1__PATH__PATH_GRPC;
    }
    cr_expect(hot, "the hot pair went by gRPC direct to the gateway the view names");

    /* Region b's own traffic never reaches region a's cluster. */
    monitor mon, mon_b; /* mon_b: the control, region b's cluster does see them */
    monitor_start(&mon, mg_test_require_env("MESHGATE_TEST_REDIS_NODES"));
    monitor_start(&mon_b, mg_test_require_env("MESHGATE_TEST_REDIS_B_NODES"));
    mg_grpc_client *cb = mg_grpc_client_create(b2->grpc_addr, NULL);
    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof(id), "%s-near%d", tag, i);
        st = send_status(cb, "carol", bob, id, &path);
        cr_expect_eq(st, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED);
        cr_expect_eq(path, MESHGATE__V1__PATH__PATH_GRPC);
        cr_expect(recv_message(ws, id, 10000));
    }
    cr_expect(!monitor_saw(&mon, bob), "region a's cluster saw a command about bob");
    cr_expect(monitor_saw(&mon_b, bob), "region b's cluster served bob's lookups");

    /* bob leaves: a's view keeps region b as his home; a message for him goes
     * to region b and waits in b's inbox, not a's. */
    mg_wsc_free(ws);
    cr_assert(wait_view(rca, bob, rb_name, "|", 30000), "region a's view shows bob offline");
    snprintf(id, sizeof(id), "%s-home", tag);
    st = send_status(ca, "alice", bob, id, &path);
    cr_expect_eq(st, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED);
    cr_expect_eq(path, MESHGATE__V1__PATH__PATH_KAFKA);
    char ikey[96];
    snprintf(ikey, sizeof(ikey), "mg:i:{%s}", bob);
    bool stored = false;
    for (int i = 0; i < 150 && !stored; i++) {
        r = NULL;
        cr_assert_eq(mg_redis_cluster_command(rcb, &r, ikey, "ZCARD %s", ikey), 0);
        stored = r->type == REDIS_REPLY_INTEGER && r->integer >= 1;
        freeReplyObject(r);
        if (!stored)
            usleep(100 * 1000);
    }
    cr_expect(stored, "the message waits in region b's inbox");
    r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rca, &r, ikey, "EXISTS %s", ikey), 0);
    cr_expect_eq(r->integer, 0, "nothing was stored in region a's inbox");
    freeReplyObject(r);
    ws = mg_wsc_connect_user(b2->ws_port, bob, 5000, NULL);
    cr_assert_not_null(ws);
    cr_expect(recv_message(ws, id, 10000), "bob gets it from region b's inbox");
    mg_wsc_free(ws);

    char *metrics = NULL;
    cr_assert_eq(mg_http_get(a1->ws_port, "/metrics", &metrics), 200);
    cr_expect(strstr(metrics, "meshgate_presence_sync_lag_seconds"));
    cr_expect(strstr(metrics, "meshgate_presence_sync_records_total{kind=\"applied\"}"));
    free(metrics);

    mg_grpc_client_free(ca);
    mg_grpc_client_free(cb);
    mg_redis_cluster_free(rca);
    mg_redis_cluster_free(rcb);
    cr_expect_eq(mg_gw_stop(b2), 0);
    cr_expect_eq(mg_gw_stop(b1), 0);
    cr_expect_eq(mg_gw_stop(a1), 0);
    mg_gw_free(b2);
    mg_gw_free(b1);
    mg_gw_free(a1);
}

static void produce(rd_kafka_t *rk, const char *topic, const char *key, const char *value)
{
    cr_assert_eq(rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, strlen(key)),
                                   RD_KAFKA_V_VALUE((void *)value, strlen(value)),
                                   RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END),
                 RD_KAFKA_RESP_ERR_NO_ERROR);
}

Test(multi_region, late_repeated_and_bad_records_converge_to_the_newest, .timeout = 120)
{
    char tag[32], ra_name[48], carol[64];
    snprintf(tag, sizeof(tag), "mo%d", (int)getpid());
    snprintf(ra_name, sizeof(ra_name), "%sa", tag);
    snprintf(carol, sizeof(carol), "%s-carol", tag);
    mg_gw *a1 = spawn(tag, "a1", ra_name, "MESHGATE_TEST_REDIS_NODES");
    cr_assert_not_null(a1);

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char e[256];
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers",
                                   mg_test_require_env("MESHGATE_TEST_KAFKA"), e, sizeof(e)),
                 RD_KAFKA_CONF_OK);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, e, sizeof(e));
    cr_assert_not_null(rk, "%s", e);
    const char *rz = "zz";
    char key[96], rec[512], sync[64];
    sync_topic(tag, sync, sizeof(sync));
    snprintf(key, sizeof(key), "%s/%s", rz, carol);
    /* Versions 5, 3 (late), 5 (repeated), garbage, 7, 6 (late): 7 wins. */
    static const struct {
        int version;
        const char *gw;
    } seq[] = {{5, "g5"}, {3, "g3"}, {5, "g5"}, {0, NULL}, {7, "g7"}, {6, "g6"}};
    for (size_t i = 0; i < sizeof(seq) / sizeof(seq[0]); i++) {
        if (!seq[i].gw)
            snprintf(rec, sizeof(rec), "{\"user\":\"%s\",\"version\":\"x\"", carol);
        else
            snprintf(rec, sizeof(rec),
                     "{\"user\":\"%s\",\"region\":\"%s\",\"version\":%d,\"at_ms\":%d,"
                     "\"gateways\":[\"%s\"]}",
                     carol, rz, seq[i].version, 1000 + seq[i].version, seq[i].gw);
        produce(rk, sync, key, rec);
    }
    cr_assert_eq(rd_kafka_flush(rk, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_destroy(rk);

    mg_redis_cluster *rca = cluster("MESHGATE_TEST_REDIS_NODES");
    cr_expect(wait_view(rca, carol, rz, "|g7", 30000), "the view holds version 7");
    usleep(1500 * 1000); /* the late 6 has been consumed by now */
    char v[256];
    view_entry(rca, carol, rz, v, sizeof(v));
    cr_expect_str_eq(v, "7|1007|g7", "the newest record stays");
    char *metrics = NULL;
    cr_assert_eq(mg_http_get(a1->ws_port, "/metrics", &metrics), 200);
    cr_expect(strstr(metrics, "meshgate_presence_sync_records_total{kind=\"undecodable\"} 1"),
              "the bad record is counted");
    cr_expect(strstr(metrics, "meshgate_presence_sync_records_total{kind=\"stale\"} 3"),
              "3, the repeated 5 and 6 are stale");
    free(metrics);
    mg_redis_cluster_free(rca);
    cr_expect_eq(mg_gw_stop(a1), 0);
    mg_gw_free(a1);
}

Test(multi_region, the_inbox_follows_the_user_to_another_region, .timeout = 180)
{
    char tag[32], ra_name[48], rb_name[48], dave[64], id[96];
    snprintf(tag, sizeof(tag), "mh%d", (int)getpid());
    snprintf(ra_name, sizeof(ra_name), "%sa", tag);
    snprintf(rb_name, sizeof(rb_name), "%sb", tag);
    snprintf(dave, sizeof(dave), "%s-dave", tag);
    mg_gw *a1 = spawn(tag, "a1", ra_name, "MESHGATE_TEST_REDIS_NODES");
    mg_gw *b1 = spawn(tag, "b1", rb_name, "MESHGATE_TEST_REDIS_B_NODES");
    cr_assert(a1 && b1);
    cr_assert(mg_gw_wait_peer(a1, b1->name, 20000), "a1 discovers b1");

    /* 50 messages for dave, offline and never seen anywhere: region a's inbox. */
    enum { N = 50 };
    mg_grpc_client *ca = mg_grpc_client_create(a1->grpc_addr, NULL);
    int path = 0;
    for (int i = 0; i < N; i++) {
        snprintf(id, sizeof(id), "%s-m%02d", tag, i);
        cr_assert_eq(send_status(ca, "alice", dave, id, &path),
                     MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED);
    }
    mg_redis_cluster *rca = cluster("MESHGATE_TEST_REDIS_NODES");
    char ikey[96];
    snprintf(ikey, sizeof(ikey), "mg:i:{%s}", dave);

    /* dave connects in region b: region a hands his inbox over, in order. */
    mg_wsc *ws = mg_wsc_connect_user(b1->ws_port, dave, 5000, NULL);
    cr_assert_not_null(ws);
    int next = 0, dup = 0, out_of_order = 0;
    for (int frames = 0; frames < 4 * N && next < N; frames++) {
        char *text = mg_wsc_recv_text(ws, 30000);
        if (!text)
            break;
        char *p = strstr(text, "-m");
        if (strstr(text, "\"message\"") && p && strstr(text, tag)) {
            int k = atoi(p + 2);
            if (k == next)
                next++;
            else if (k < next)
                dup++;
            else
                out_of_order++;
        }
        free(text);
    }
    cr_expect_eq(next, N, "all %d messages arrived in order (got %d)", N, next);
    cr_expect_eq(dup, 0, "none twice");
    cr_expect_eq(out_of_order, 0, "none out of order");
    char *extra = mg_wsc_recv_text(ws, 1500);
    cr_expect(!extra || !strstr(extra, "\"message\""), "nothing more: %s", extra ? extra : "");
    free(extra);
    long long left = -1;
    for (int i = 0; i < 50 && left != 0; i++) {
        redisReply *r = NULL;
        cr_assert_eq(mg_redis_cluster_command(rca, &r, ikey, "ZCARD %s", ikey), 0);
        left = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
        freeReplyObject(r);
        if (left != 0)
            usleep(100 * 1000);
    }
    cr_expect_eq(left, 0, "nothing is left in region a's inbox");

    mg_wsc_free(ws);
    mg_grpc_client_free(ca);
    mg_redis_cluster_free(rca);
    cr_expect_eq(mg_gw_stop(b1), 0);
    cr_expect_eq(mg_gw_stop(a1), 0);
    mg_gw_free(b1);
    mg_gw_free(a1);
}

/* Runs redis-cluster.sh for region b's cluster (17100 unless configured). */
static int cluster_b(const char *what)
{
    const char *nodes = mg_test_require_env("MESHGATE_TEST_REDIS_B_NODES");
    int base = atoi(strchr(nodes, ':') + 1);
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "MESHGATE_REDIS_BASE_PORT=%d bash %s/redis-cluster.sh %s >/dev/null",
             base, mg_test_require_env("MESHGATE_TEST_INFRA"), what);
    return system(cmd);
}

Test(multi_region, a_region_store_outage_stays_in_its_region, .timeout = 240)
{
    char tag[32], ra_name[48], rb_name[48], bob[64], xena[64], id[96];
    snprintf(tag, sizeof(tag), "mx%d", (int)getpid());
    snprintf(ra_name, sizeof(ra_name), "%sa", tag);
    snprintf(rb_name, sizeof(rb_name), "%sb", tag);
    snprintf(bob, sizeof(bob), "%s-bob", tag);
    snprintf(xena, sizeof(xena), "%s-xena", tag);
    mg_gw *a1 = spawn(tag, "a1", ra_name, "MESHGATE_TEST_REDIS_NODES");
    mg_gw *b1 = spawn(tag, "b1", rb_name, "MESHGATE_TEST_REDIS_B_NODES");
    cr_assert(a1 && b1);
    cr_assert(mg_gw_wait_peer(a1, b1->name, 20000), "a1 discovers b1");
    mg_redis_cluster *rca = cluster("MESHGATE_TEST_REDIS_NODES");
    mg_wsc *wx = mg_wsc_connect_user(a1->ws_port, xena, 5000, NULL); /* local to a1 */
    mg_wsc *wb = mg_wsc_connect_user(b1->ws_port, bob, 5000, NULL);  /* far, in region b */
    cr_assert(wx && wb);
    char suffix[80];
    snprintf(suffix, sizeof(suffix), "|%s", b1->name);
    cr_assert(wait_view(rca, bob, rb_name, suffix, 30000), "region a's view shows bob on b1");

    /* Region b's whole cluster goes away for 20 s while a1 sends to both. */
    static const int ports_off[] = {0, 1, 2, 3, 4, 5};
    const char *nodes = mg_test_require_env("MESHGATE_TEST_REDIS_B_NODES");
    int base = atoi(strchr(nodes, ':') + 1);
    for (size_t i = 0; i < 6; i++) {
        char what[64];
        snprintf(what, sizeof(what), "stop-node %d", base + ports_off[i]);
        cr_assert_eq(cluster_b(what), 0);
    }
    mg_grpc_client *ca = mg_grpc_client_create(a1->grpc_addr, NULL);
    enum { MAXN = 400 };
    static char far_ids[MAXN][96];
    int nfar = 0, local_ok = 0, local_sent = 0, path = 0;
    for (int64_t end = mg_mono_ms() + 20000; mg_mono_ms() < end && nfar < MAXN;) {
        snprintf(id, sizeof(id), "%s-x%d", tag, local_sent++);
        local_ok += send_status(ca, "alice", xena, id, &path) ==
                    MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED;
        snprintf(far_ids[nfar], sizeof(far_ids[nfar]), "%s-b%d", tag, nfar);
        int st = send_status(ca, "alice", bob, far_ids[nfar], &path);
        cr_expect(st == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED ||
                      st == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED,
                  "far send %d answered %d", nfar, st);
        nfar++;
        usleep(100 * 1000);
    }
    cr_expect_eq(local_ok, local_sent, "every local send was delivered during the outage");
    for (size_t i = 0; i < 6; i++) {
        char what[64];
        snprintf(what, sizeof(what), "start-node %d", base + ports_off[i]);
        cr_assert_eq(cluster_b(what), 0);
    }
    cr_assert_eq(cluster_b("wait"), 0, "region b's cluster is healthy again");

    /* Every far message reaches bob: live on his connection, or from region
     * b's inbox once he reconnects (a message handled while b1's renew had
     * not yet re-asserted him waits there). */
    static bool got[MAXN];
    memset(got, 0, sizeof(got));
    int have = 0;
    for (int pass = 0; pass < 2 && have < nfar; pass++) {
        mg_wsc *w = pass == 0 ? wb : mg_wsc_connect_user(b1->ws_port, bob, 5000, NULL);
        cr_assert_not_null(w);
        for (int frames = 0; frames < 4 * MAXN && have < nfar; frames++) {
            char *text = mg_wsc_recv_text(w, pass == 0 ? 20000 : 5000);
            if (!text)
                break;
            char *p = strstr(text, "-b");
            if (strstr(text, "\"message\"") && p && strstr(text, tag)) {
                int k = atoi(p + 2);
                if (k >= 0 && k < nfar && !got[k]) {
                    got[k] = true;
                    have++;
                }
            }
            free(text);
        }
        mg_wsc_free(w);
    }
    cr_expect_eq(have, nfar, "all %d messages for region b arrived (got %d)", nfar, have);

    mg_wsc_free(wx);
    mg_grpc_client_free(ca);
    mg_redis_cluster_free(rca);
    cr_expect_eq(mg_gw_stop(b1), 0);
    cr_expect_eq(mg_gw_stop(a1), 0);
    mg_gw_free(b1);
    mg_gw_free(a1);
}
