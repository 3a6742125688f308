/* A stored message reaches a user who is connected: against the real
 * services (Redis Cluster presence and inbox, Consul), two gateways of one
 * region. Gateway a routes its region's traffic to the inbox only
 * (--near-route inbox), so a message to a user connected on b is stored
 * while that user is online: the situation a lookup that ran just before
 * the user connected (or a peer that did not answer in time) leaves behind.
 * After the store, a reads presence again and sends b the inbox's copy,
 * which the user gets at once as an inbox message and acks away; without
 * it the message would wait for the user's next connection.
 */
#include "common/mg_time.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Sends id to user through a: answered STORED (a routes to the inbox). */
static void send_stored(mg_grpc_client *a, const char *user, const char *id)
{
    Meshgate__V1__SendMessageResponse *r = NULL;
    cr_assert_eq(mg_tc_send(a, "alice", user, id, "kept for you", 1, 5000, &r, NULL),
                 GRPC_STATUS_OK);
    cr_assert_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED,
                 "%s: status %d", id, r->result->status);
    protobuf_c_message_free_unpacked(&r->base, NULL);
}

/* The next message frame on ws within 5 s (other frames skipped): its id,
 * and its "inbox" flag in *inbox. NULL when none came. */
static char *next_message(mg_wsc *ws, bool *inbox)
{
    int64_t until = mg_mono_ms() + 5000;
    while (mg_mono_ms() < until) {
        char *t = mg_wsc_recv_text(ws, (int)(until - mg_mono_ms()));
        if (!t)
            return NULL;
        json_t *j = json_loads(t, 0, NULL);
        free(t);
        const char *type = json_string_value(json_object_get(j, "type"));
        if (type && !strcmp(type, "message")) {
            char *id = strdup(json_string_value(json_object_get(j, "id")));
            *inbox = json_is_true(json_object_get(j, "inbox"));
            json_decref(j);
            return id;
        }
        json_decref(j);
    }
    return NULL;
}

Test(inbox_live, a_message_stored_while_its_user_is_connected_reaches_them_at_once, .timeout = 90)
{
    char svc[64], ida[32], idb[32], user[32];
    snprintf(svc, sizeof(svc), "meshgate-il%d", (int)getpid());
    snprintf(ida, sizeof(ida), "il%d-a", (int)getpid());
    snprintf(idb, sizeof(idb), "il%d-b", (int)getpid());
    snprintf(user, sizeof(user), "il%d-u", (int)getpid());
    const char *inbox_only[] = {"--near-route", "inbox", NULL};
    mg_gw *a = mg_gw_spawn_fleet(ida, svc, "r1", inbox_only);
    cr_assert_not_null(a);
    mg_gw *b = mg_gw_spawn_fleet(idb, svc, "r1", inbox_only);
    cr_assert_not_null(b);
    cr_assert(mg_gw_wait_peer(a, idb, 15000), "gateway a never listed b as a peer");
    mg_grpc_client *cli = mg_tc_client(a->grpc_addr, NULL, NULL, NULL, NULL);

    mg_wsc *ws = mg_wsc_connect_user(b->ws_port, user, 5000, NULL);
    cr_assert_not_null(ws);
    cr_assert(mg_tc_wait_presence(cli, user, true, 10000), "%s never came online", user);
    send_stored(cli, user, "il-1");
    bool inbox = false;
    char *id = next_message(ws, &inbox);
    cr_assert_not_null(id, "the stored message did not reach the connected user");
    cr_assert_str_eq(id, "il-1");
    cr_assert(inbox, "sent as an inbox message: the client acks it away");
    free(id);
    cr_assert_eq(mg_gw_metric(a, "meshgate_inbox_live_copies_total"), 1.0);
    cr_assert_eq(mg_wsc_send_text(ws, "{\"type\":\"ack\",\"id\":\"il-1\"}"), 0);

    /* Acked, it is gone from the inbox: the next connection is sent the
     * next stored message first, not il-1 again (a connection's inbox page
     * goes out as soon as it is registered, before a's store of il-2). */
    mg_wsc_free(ws);
    /* the ack's job ran before the disconnect's */
    cr_assert(mg_tc_wait_presence(cli, user, false, 10000), "%s never went offline", user);
    ws = mg_wsc_connect_user(b->ws_port, user, 5000, NULL);
    cr_assert_not_null(ws);
    cr_assert(mg_tc_wait_presence(cli, user, true, 10000), "%s never came online", user);
    send_stored(cli, user, "il-2");
    id = next_message(ws, &inbox);
    cr_assert_not_null(id);
    cr_assert_str_eq(id, "il-2", "the acked message came again");
    free(id);
    mg_wsc_free(ws);

    mg_grpc_client_free(cli);
    cr_assert_eq(mg_gw_stop(a), 0);
    cr_assert_eq(mg_gw_stop(b), 0);
    mg_gw_free(a);
    mg_gw_free(b);
}
