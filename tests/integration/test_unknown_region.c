/* A recipient in a region no gateway serves yet (real Redis Cluster, Consul
 * and Kafka). Its presence names a gateway that discovery does not know, in
 * a region with no consumer: the send is not lost but QUEUED on that
 * region's topic, and delivered once a gateway of the region starts (its new
 * consumer group reads from the earliest offset) and the user connects. */
#include "store/redis_store.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Gateway tag-name of region, in tag's fleet. */
static mg_gw *spawn(const char *tag, const char *name, const char *region)
{
    char svc[64], topic[64], id[64];
    snprintf(svc, sizeof(svc), "meshgate-%s", tag);
    snprintf(topic, sizeof(topic), "meshgate.%s.", tag);
    snprintf(id, sizeof(id), "%s-%s", tag, name);
    const char *default_check[] = {"--consul-check-interval-seconds", "2", NULL};
    return mg_gw_spawn_fleet_kafka(id, svc, region, topic, default_check);
}

Test(unknown_region, queued_until_the_region_has_a_gateway, .timeout = 180)
{
    char tag[32], region[48], user[64], ghost[64], id[80];
    snprintf(tag, sizeof(tag), "ur%d", (int)getpid());
    snprintf(region, sizeof(region), "mars%d", (int)getpid());
    snprintf(user, sizeof(user), "%s-bob", tag);
    snprintf(ghost, sizeof(ghost), "%s-ghost", tag);
    snprintf(id, sizeof(id), "%s-m1", tag);

    mg_gw *a = spawn(tag, "a", "eu");
    cr_assert_not_null(a);

    /* Presence says bob is on a gateway nobody discovered, in a region
     * nobody serves (written through the real Redis presence store). */
    char err[256] = "";
    mg_redis_cluster *rc = mg_redis_cluster_create(mg_test_require_env("MESHGATE_TEST_REDIS_NODES"),
                                                   NULL, NULL, 2000, err, sizeof(err));
    cr_assert_not_null(rc, "%s", err);
    mg_presence *ghost_presence = mg_presence_redis_create(rc, ghost, region, 30);
    cr_assert_not_null(ghost_presence);
    cr_assert_eq(ghost_presence->ops->connect(ghost_presence, user, "ghost-1", 1), 0);

    mg_grpc_client *cli = mg_grpc_client_create(a->grpc_addr, NULL);
    Meshgate__V1__SendMessageResponse *resp = NULL;
    char *details = NULL;
    cr_assert_eq(mg_tc_send(cli, "alice", user, id, "to mars", 1, 10000, &resp, &details),
                 GRPC_STATUS_OK, "%s", details ? details : "");
    cr_assert_eq(resp->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED,
                 "status %d reason %s", resp->result->status, resp->result->reason);
    cr_assert_eq(resp->result->path, MESHGATE__V1__PATH__PATH_KAFKA);
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    free(details);

    /* The ghost leaves; a real gateway of the region starts and bob
     * connects to it: the queued message reaches him. */
    cr_assert_eq(ghost_presence->ops->remove_gateway(ghost_presence), 0);
    mg_presence_free(ghost_presence);
    mg_gw *m = spawn(tag, "m", region);
    cr_assert_not_null(m);
    mg_wsc *ws = mg_wsc_connect_user(m->ws_port, user, 5000, NULL);
    cr_assert_not_null(ws);
    bool got = false;
    for (int frames = 0; frames < 20 && !got; frames++) {
        char *text = mg_wsc_recv_text(ws, 60000);
        if (!text)
            break;
        got = strstr(text, id) != NULL && strstr(text, "\"message\"") != NULL;
        free(text);
    }
    cr_expect(got, "the message queued for region %s arrived once it had a gateway", region);

    mg_wsc_free(ws);
    mg_grpc_client_free(cli);
    mg_redis_cluster_free(rc);
    cr_expect_eq(mg_gw_stop(m), 0);
    cr_expect_eq(mg_gw_stop(a), 0);
    mg_gw_free(m);
    mg_gw_free(a);
}
