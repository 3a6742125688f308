/* The presence cache through real gateways (Redis Cluster presence, Consul,
 * three gateways of one region): the API on gateway a keeps bob's
 * connections after its first send to him; each time bob opens a second
 * device on gateway c, a send through a made right after that device's
 * ready frame reaches both devices: Redis told a of c's connect before the
 * send could start. With the cache off (--presence-cache-users 0) the same
 * holds and a never answers from memory.
 */
#include "common/mg_time.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The next message frame on ws is id (other frames skipped, 5 s each). */
static void expect_message(mg_wsc *ws, const char *id, const char *who)
{
    for (int frames = 0; frames < 16; frames++) {
        json_t *j = mg_wsc_recv_json(ws, 5000);
        const char *got = mg_wsc_take_message(ws, j);
        if (got) {
            cr_assert_str_eq(got, id, "%s", who);
            json_decref(j);
            return;
        }
        json_decref(j);
    }
    cr_assert_fail("%s: no message frame among the next 16", who);
}

/* Sends id to user through cli: DELIVERED to `conns` connections. */
static void send_delivered(mg_grpc_client *cli, const char *user, const char *id, uint32_t conns)
{
    Meshgate__V1__SendMessageResponse *r = NULL;
    cr_assert_eq(mg_tc_send(cli, "alice", user, id, "hi", 1, 5000, &r, NULL), GRPC_STATUS_OK);
    cr_assert_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED,
                 "%s: status %d", id, r->result->status);
    cr_assert_eq(r->result->connections, conns, "%s: written to %u connections, not %u", id,
                 r->result->connections, conns);
    protobuf_c_message_free_unpacked(&r->base, NULL);
}

static mg_wsc *device(mg_gw *gw, const char *user)
{
    mg_wsc *ws = mg_wsc_connect_user(gw->ws_port, user, 5000, NULL);
    cr_assert_not_null(ws);
    cr_assert(mg_wsc_wait_ready(ws, 5000), "no ready frame on %s", gw->name);
    return ws;
}

static void run(const char *tag, const char *cache_users, bool cached)
{
    char svc[64], id[3][40], user[48];
    snprintf(svc, sizeof(svc), "meshgate-pc%s%d", tag, (int)getpid());
    snprintf(user, sizeof(user), "pc%s%d-bob", tag, (int)getpid());
    const char *args[] = {"--presence-cache-users", cache_users, NULL};
    mg_gw *gw[3];
    for (int i = 0; i < 3; i++) {
        snprintf(id[i], sizeof(id[i]), "pc%s%d-%c", tag, (int)getpid(), 'a' + i);
        gw[i] = mg_gw_spawn_fleet(id[i], svc, "r1", args);
        cr_assert_not_null(gw[i]);
    }
    cr_assert(mg_gw_wait_peer(gw[0], id[1], 15000) && mg_gw_wait_peer(gw[0], id[2], 15000),
              "gateway a never listed b and c as peers");
    mg_grpc_client *cli = mg_tc_client(gw[0]->grpc_addr, NULL, NULL, NULL, NULL);

    mg_wsc *d1 = device(gw[1], user);
    send_delivered(cli, user, "pc-first", 1);
    expect_message(d1, "pc-first", "device 1");
    enum { ROUNDS = 5 };
    for (int k = 0; k < ROUNDS; k++) {
        char mid[32];
        for (int j = 0; j < 2; j++) { /* the second is answered from a's cache */
            snprintf(mid, sizeof(mid), "pc-only-%d-%d", k, j);
            send_delivered(cli, user, mid, 1); /* a knows bob: device 1 on b */
            expect_message(d1, mid, "device 1");
        }
        mg_wsc *d2 = device(gw[2], user);
        snprintf(mid, sizeof(mid), "pc-both-%d", k);
        send_delivered(cli, user, mid, 2);
        expect_message(d1, mid, "device 1");
        expect_message(d2, mid, "device 2 (right after its ready frame)");
        mg_wsc_leave(d2, 2000); /* closes and frees */
    }
    double hits = mg_gw_metric(gw[0], "meshgate_presence_cache_hits_total ");
    if (cached)
        cr_assert_geq(hits, 1, "a never answered from its cache");
    else
        cr_assert_eq(hits, 0, "no cache: never answered from memory");
    mg_wsc_free(d1);
    mg_grpc_client_free(cli);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(mg_gw_stop(gw[i]), 0);
        mg_gw_free(gw[i]);
    }
}

Test(presence_cache, a_second_device_elsewhere_is_reached_right_after_ready, .timeout = 120)
{
    run("c", "100000", true);
}

Test(presence_cache, off_reads_redis_every_time, .timeout = 120)
{
    run("o", "0", false);
}
