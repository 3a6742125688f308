/* Fan-out: one SendBatch to 10,000 connected users, on one gateway and
 * spread over two (Redis Cluster presence, Consul discovery, the peer's
 * share in DeliverBatch calls). The users are real WebSocket connections
 * held by bench/mgload (one epoll thread; a Criterion test could not hold
 * 10,000 sockets of its own under the fd limit), which checks that every
 * user received the message, counts each SendBatch result, and reports
 * them as JSON that this test reads back. */
#include "support/mg_test.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define USERS 10000

static void raise_nofile(void)
{
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    cr_assert_geq(rl.rlim_cur, 2 * USERS / 2 + 1000, "fd limit %llu too low for this test",
                  (unsigned long long)rl.rlim_cur);
}

/* Runs mgload fanout; returns its round line (json_decref it). */
static json_t *fanout(const char *tag, int port, int port2, const char *grpc)
{
    char json[512], cmd[2048], p2[32] = "";
    snprintf(json, sizeof(json), "%s/%s-%d.jsonl", mg_test_env("MESHGATE_RUN"), tag, (int)getpid());
    unlink(json);
    if (port2)
        snprintf(p2, sizeof(p2), "--port2 %d", port2);
    snprintf(cmd, sizeof(cmd),
             "timeout -k 5 120 %s/bench/mgload fanout --port %d %s --grpc %s --conns %d "
             "--rounds 1 --timeout 30 --prefix %s%d- --json %s >%s.log 2>&1",
             MG_BUILD_DIR, port, p2, grpc, USERS, tag, (int)getpid(), json, json);
    int rc = system(cmd);
    FILE *f = fopen(json, "r");
    cr_assert_not_null(f, "mgload wrote no results (exit %d); see %s.log", rc, json);
    json_t *round = NULL;
    char line[8192];
    while (fgets(line, sizeof(line), f)) {
        json_t *j = json_loads(line, 0, NULL);
        if (j && json_object_get(j, "round")) {
            json_decref(round);
            round = j;
        } else {
            json_decref(j);
        }
    }
    fclose(f);
    cr_assert_not_null(round, "no fan-out round in %s (mgload exit %d)", json, rc);
    return round;
}

static long field(json_t *j, const char *k)
{
    return (long)json_integer_value(json_object_get(j, k));
}

static void check_all_delivered(json_t *r)
{
    cr_assert_eq(field(r, "open"), USERS, "users connected");
    cr_assert_eq(field(r, "grpc_status"), 0, "SendBatch answered OK within its deadline");
    cr_assert_eq(field(r, "result_delivered"), USERS, "every result DELIVERED (other: %ld)",
                 field(r, "result_other"));
    cr_assert_eq(field(r, "received"), USERS, "every user received it");
    cr_assert_eq(field(r, "errors"), 0);
    cr_assert_eq(field(r, "closed"), 0, "nobody was closed (slow consumer)");
}

Test(fanout, send_batch_to_10000_users_on_one_gateway, .timeout = 180)
{
    raise_nofile();
    mg_gw *gw = mg_gw_spawn("fo1", NULL);
    cr_assert_not_null(gw);
    json_t *r = fanout("fo1", gw->ws_port, 0, gw->grpc_addr);
    check_all_delivered(r);
    json_decref(r);
    cr_assert_eq(mg_gw_stop(gw), 0, "clean exit");
    mg_gw_free(gw);
}

Test(fanout, send_batch_to_10000_users_over_two_gateways, .timeout = 240)
{
    raise_nofile();
    char svc[64], ida[32], idb[32];
    snprintf(svc, sizeof(svc), "meshgate-fo%d", (int)getpid());
    snprintf(ida, sizeof(ida), "fo%d-a", (int)getpid());
    snprintf(idb, sizeof(idb), "fo%d-b", (int)getpid());
    mg_gw *a = mg_gw_spawn_fleet(ida, svc, "r1", NULL);
    cr_assert_not_null(a);
    mg_gw *b = mg_gw_spawn_fleet(idb, svc, "r1", NULL);
    cr_assert_not_null(b);
    /* Each must see the other in Consul before the peer path exists. */
    cr_assert(mg_gw_wait_peer(a, idb, 15000), "gateway a never listed b as a peer");
    json_t *r = fanout("fo2", a->ws_port, b->ws_port, a->grpc_addr);
    check_all_delivered(r);
    json_decref(r);
    /* b's half came in DeliverBatch calls, not 5,000 DeliverMessage calls. */
    char *metrics = NULL;
    cr_assert_eq(mg_http_get(b->ws_port, "/metrics", &metrics), 200);
    cr_assert(strstr(metrics, "method=\"DeliverBatch\",code=\"OK\"") != NULL,
              "no DeliverBatch reached b");
    cr_assert_null(strstr(metrics, "method=\"DeliverMessage\",code=\"OK\""),
                   "recipients were delivered one call each");
    free(metrics);
    cr_assert_eq(mg_gw_stop(a), 0);
    cr_assert_eq(mg_gw_stop(b), 0);
    mg_gw_free(a);
    mg_gw_free(b);
}
