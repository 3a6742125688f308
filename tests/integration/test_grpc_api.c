/* test_grpc_api.c: the gRPC API of a real gateway process.
 *
 * Starts build/meshgate in its embedded default mode (memory presence and
 * inbox, no discovery) with small limits, and calls it with the C-core
 * client of common/mg_grpc.h; a WebSocket test client plays the online
 * recipient.
 */
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static mg_gw *gw;
static mg_grpc_client *client;

static void setup(void)
{
    const char *args[] = {"--max-content-bytes",
                          "1024",
                          "--grpc-max-message-bytes",
                          "4096",
                          "--grpc-threads",
                          "4",
                          "--max-batch",
                          "8",
                          NULL};
    gw = mg_gw_spawn("grpc-api", args);
    cr_assert_not_null(gw, "gateway did not become ready");
    client = mg_grpc_client_create(gw->grpc_addr, NULL);
}

static void teardown(void)
{
    mg_grpc_client_free(client);
    client = NULL;
    if (gw) {
        int st = mg_gw_stop(gw);
        mg_gw_free(gw);
        gw = NULL;
        cr_expect_eq(st, 0, "gateway exit status %d", st);
    }
}

TestSuite(grpc_api, .init = setup, .fini = teardown, .timeout = 90);

Test(grpc_api, health_serving)
{
    int st = -1;
    cr_assert_eq(mg_tc_health(client, "", 5000, &st, NULL), GRPC_STATUS_OK);
    cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    cr_assert_eq(mg_tc_health(client, "meshgate.v1.Messaging", 5000, &st, NULL), GRPC_STATUS_OK);
    cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    cr_assert_eq(mg_tc_health(client, "nope.Service", 5000, &st, NULL), GRPC_STATUS_NOT_FOUND);
}

Test(grpc_api, offline_user_is_stored)
{
    Meshgate__V1__SendMessageResponse *r = NULL;
    char *d = NULL;
    cr_assert_eq(mg_tc_send(client, "alice", "offline-olga", NULL, "later", 1, 5000, &r, &d),
                 GRPC_STATUS_OK, "%s", d);
    free(d);
    cr_assert_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED);
    cr_assert_eq(r->result->path, MESHGATE__V1__PATH__PATH_INBOX);
    cr_assert_str_eq(r->result->user, "offline-olga");
    cr_assert_gt(strlen(r->id), 0);
    protobuf_c_message_free_unpacked(&r->base, NULL);
}

/* user's WebSocket, once presence has it (a worker writes it after the
 * upgrade: GetPresence says when). */
static mg_wsc *online(const char *user)
{
    char url[128];
    snprintf(url, sizeof(url), "ws://127.0.0.1:%d/ws?user=%s", gw->ws_port, user);
    int http = 0;
    mg_wsc *ws = mg_wsc_connect(url, NULL, 5000, &http);
    cr_assert_not_null(ws, "WebSocket connect: HTTP %d", http);
    cr_assert(mg_tc_wait_presence(client, user, true, 2000), "%s never showed up in presence",
              user);
    return ws;
}

Test(grpc_api, online_user_gets_it_over_websocket)
{
    mg_wsc *ws = online("wendy");

    Meshgate__V1__SendMessageResponse *r = NULL;
    cr_assert_eq(
        mg_tc_send(client, "alice", "wendy", "grpc-live-1", "hello wendy", 1, 5000, &r, NULL),
        GRPC_STATUS_OK);
    cr_assert_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED);
    cr_assert_eq(r->result->path, MESHGATE__V1__PATH__PATH_LOCAL);
    cr_assert_eq(r->result->connections, 1);
    protobuf_c_message_free_unpacked(&r->base, NULL);

    char *frame = NULL;
    for (int i = 0; i < 10 && !(frame && strstr(frame, "grpc-live-1")); i++) {
        free(frame);
        frame = mg_wsc_recv_text(ws, 2000);
    }
    cr_assert_not_null(frame);
    cr_assert(strstr(frame, "\"hello wendy\""), "%s", frame);
    cr_assert(strstr(frame, "\"from\":\"alice\""), "%s", frame);
    free(frame);
    mg_wsc_free(ws);
}

/* A peer's DeliverBatch: one result per recipient, in order; a name given
 * twice, or the whole call again (a retry), is written once. */
Test(grpc_api, peer_deliver_batch_answers_each_recipient_and_writes_once)
{
    mg_wsc *ws = online("vera");
    Meshgate__V1__Message m = mg_tc_text_message("alice", "", "db-1", "to many", 1);
    char *to[] = {"vera", "nobody-here", "vera"};
    Meshgate__V1__DeliverBatchRequest rq = MESHGATE__V1__DELIVER_BATCH_REQUEST__INIT;
    rq.message = &m;
    rq.n_to = 3;
    rq.to = to;
    for (int call = 0; call < 2; call++) {
        ProtobufCMessage *out = NULL;
        char *d = NULL;
        cr_assert_eq(mg_grpc_call(client, "/meshgate.v1.GatewayPeer/DeliverBatch", &rq.base,
                                  &meshgate__v1__deliver_batch_response__descriptor, 5000, &out,
                                  &d),
                     GRPC_STATUS_OK, "%s", d);
        free(d);
        Meshgate__V1__DeliverBatchResponse *br = (Meshgate__V1__DeliverBatchResponse *)out;
        cr_assert_eq(br->n_results, 3);
        cr_assert_eq(br->results[0]->status,
                     MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED);
        cr_assert_eq(br->results[0]->connections, call == 0 ? 1 : 0);
        cr_assert_eq(br->results[0]->duplicate, call == 1, "the retry is a duplicate");
        cr_assert_eq(br->results[1]->status,
                     MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED);
        cr_assert_eq(br->results[2]->status,
                     MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED);
        cr_assert(br->results[2]->duplicate, "vera named twice");
        protobuf_c_message_free_unpacked(out, NULL);
    }
    int got = 0;
    for (char *f; (f = mg_wsc_recv_text(ws, got ? 300 : 2000)) != NULL; free(f))
        got += strstr(f, "\"db-1\"") != NULL;
    cr_assert_eq(got, 1, "vera got db-1 %d times", got);
    mg_wsc_free(ws);
}

Test(grpc_api, bad_inputs_get_the_right_codes)
{
    char *d = NULL;
    cr_assert_eq(mg_tc_send(client, "alice", "", NULL, "x", 1, 5000, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "message.to"), "%s", d);
    free(d);

    char big[2000];
    memset(big, 'b', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    cr_assert_eq(mg_tc_send(client, "alice", "bob", NULL, big, 1, 5000, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "message.content"), "%s", d);
    free(d);

    uint8_t *huge = calloc(1, 10000); /* > --grpc-max-message-bytes 4096 */
    cr_assert_eq(mg_grpc_call_raw(client, MG_RPC_SEND_MESSAGE, huge, 10000, 5000, NULL, NULL, &d),
                 GRPC_STATUS_RESOURCE_EXHAUSTED, "%s", d);
    free(d);
    free(huge);

    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    cr_assert_eq(
        mg_grpc_call_raw(client, MG_RPC_SEND_MESSAGE, junk, sizeof(junk), 5000, NULL, NULL, &d),
        GRPC_STATUS_INVALID_ARGUMENT);
    free(d);

    cr_assert_eq(
        mg_grpc_call_raw(client, "/meshgate.v1.Messaging/Teleport", "", 0, 5000, NULL, NULL, NULL),
        GRPC_STATUS_UNIMPLEMENTED);

    /* GatewayPeer/DeliverMany: nothing, garbage, or one delivery without an id refuse the call */
    const char *many = "/meshgate.v1.GatewayPeer/DeliverMany";
    cr_assert_eq(mg_grpc_call_raw(client, many, "", 0, 5000, NULL, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "deliveries: 0"), "%s", d);
    free(d);
    cr_assert_eq(mg_grpc_call_raw(client, many, junk, sizeof(junk), 5000, NULL, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    free(d);
    Meshgate__V1__Message good = mg_tc_text_message("a", "bob", "dm-1", "x", 1),
                          noid = mg_tc_text_message("a", "bob", NULL, "x", 1);
    Meshgate__V1__DeliverMessageRequest d0 = MESHGATE__V1__DELIVER_MESSAGE_REQUEST__INIT,
                                        d1 = MESHGATE__V1__DELIVER_MESSAGE_REQUEST__INIT;
    d0.message = &good;
    d1.message = &noid;
    Meshgate__V1__DeliverMessageRequest *ds[] = {&d0, &d1};
    Meshgate__V1__DeliverManyRequest mr = MESHGATE__V1__DELIVER_MANY_REQUEST__INIT;
    mr.n_deliveries = 2;
    mr.deliveries = ds;
    ProtobufCMessage *mout = NULL;
    cr_assert_eq(mg_grpc_call(client, many, &mr.base,
                              &meshgate__v1__deliver_batch_response__descriptor, 5000, &mout, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "deliveries[1]: message.id is required"), "%s", d);
    free(d);
    mr.n_deliveries = 1; /* the good one alone: bob is not connected here */
    cr_assert_eq(mg_grpc_call(client, many, &mr.base,
                              &meshgate__v1__deliver_batch_response__descriptor, 5000, &mout, &d),
                 GRPC_STATUS_OK, "%s", d);
    free(d);
    Meshgate__V1__DeliverBatchResponse *br = (Meshgate__V1__DeliverBatchResponse *)mout;
    cr_assert_eq(br->n_results, 1);
    cr_expect_eq(br->results[0]->status,
                 MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED);
    protobuf_c_message_free_unpacked(mout, NULL);

    /* A deadline already in the past. */
    cr_assert_eq(mg_tc_send(client, "alice", "bob", NULL, "x", 1, -1, NULL, NULL),
                 GRPC_STATUS_DEADLINE_EXCEEDED);

    /* SendBatch: more than --max-batch recipients. */
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.content.data = (uint8_t *)"g";
    m.content.len = 1;
    Meshgate__V1__SendBatchRequest brq = MESHGATE__V1__SEND_BATCH_REQUEST__INIT;
    char *nine[] = {"a", "b", "c", "d", "e", "f", "g", "h", "i"};
    brq.message = &m;
    brq.n_to = 9;
    brq.to = nine;
    ProtobufCMessage *out = NULL;
    cr_assert_eq(mg_grpc_call(client, MG_RPC_SEND_BATCH, &brq.base,
                              &meshgate__v1__send_batch_response__descriptor, 5000, &out, NULL),
                 GRPC_STATUS_INVALID_ARGUMENT);

    /* SendBatch whose first key is a non-minimal encoding of field 0 (0x82 0x00):
     * protobuf-c decodes it as an unknown field, the recipient scan cannot
     * walk it; refused before 1,001 recipients are decoded (fuzz_grpc found it). */
    uint8_t odd[3 + 2 * 1001] = {0x82, 0x00, 0x00};
    for (size_t i = 3; i < sizeof(odd); i += 2) {
        odd[i] = 0x12; /* field 2 (to), length-delimited */
        odd[i + 1] = 0x00;
    }
    d = NULL;
    cr_assert_eq(
        mg_grpc_call_raw(client, MG_RPC_SEND_BATCH, odd, sizeof(odd), 5000, NULL, NULL, &d),
        GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(d && strstr(d, "malformed"), "detail: %s", d ? d : "(none)");
    free(d);

    int st;
    cr_assert_eq(mg_tc_health(client, "", 5000, &st, NULL), GRPC_STATUS_OK, "still serving");
}

#define NCONC 32

static void *conc_send(void *arg)
{
    char to[32];
    snprintf(to, sizeof(to), "conc-user-%d", (int)(intptr_t)arg);
    return (void *)(intptr_t)mg_tc_send(client, "alice", to, NULL, "c", 1, 20000, NULL, NULL);
}

Test(grpc_api, concurrent_calls_complete)
{
    pthread_t th[NCONC];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < NCONC; i++)
        pthread_create(&th[i], NULL, conc_send, (void *)(intptr_t)i);
    int ok = 0;
    for (int i = 0; i < NCONC; i++) {
        void *rv;
        pthread_join(th[i], &rv);
        ok += (intptr_t)rv == GRPC_STATUS_OK;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    cr_assert_eq(ok, NCONC);
    cr_log_info("%d concurrent SendMessage calls in %.1f ms", NCONC,
                (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6);
}

Test(grpc_api, port_in_use_fails_clearly)
{
    const char *args[] = {"--grpc-listen", gw->grpc_addr, NULL};
    mg_gw *gw2 = mg_gw_spawn_nowait("grpc-api-dup", args);
    cr_assert_not_null(gw2);
    cr_assert(mg_gw_wait(gw2, 20000), "a second gateway on the same gRPC port kept running");
    cr_assert_neq(gw2->exit_status, 0);
    cr_assert(mg_gw_log_contains(gw2, "Address already in use"), "see %s", gw2->log_path);
    mg_gw_free(gw2);
}

/* ---- a client that never reads, fed over gRPC ---- */

#define SLOW_SENDS   400
#define SLOW_THREADS 8
#define SLOW_BYTES   32768

static mg_grpc_client *slow_cli;

/* A metric's value from /metrics (the unlabelled series), -1 when absent. */
static long gauge(const mg_gw *g, const char *name)
{
    char *body = NULL, *p;
    long v = -1;
    if (mg_http_get(g->ws_port, "/metrics", &body) == 200 && body) {
        size_t nl = strlen(name);
        for (p = body; (p = strstr(p, name)); p += nl)
            if ((p == body || p[-1] == '\n') && p[nl] == ' ') {
                v = strtol(p + nl + 1, NULL, 10);
                break;
            }
    }
    free(body);
    return v;
}
static char *slow_text;

static void *slow_feed(void *arg)
{
    long ok = 0;
    for (int i = 0; i < SLOW_SENDS / SLOW_THREADS; i++)
        ok += mg_tc_send(slow_cli, "feeder", "sink", NULL, slow_text, 1, 10000, NULL, NULL) ==
              GRPC_STATUS_OK;
    return (void *)ok;
}

/* The outbound bound holds for gRPC-fed deliveries too, and nobody else
 * waits meanwhile: no thread is held by the stuck connection's writes. */
Test(grpc_slow, never_reading_client_is_closed_and_others_are_served, .timeout = 120)
{
    mg_gw *g = mg_gw_spawn("grpc-slow", NULL);
    cr_assert_not_null(g);
    slow_cli = mg_grpc_client_create(g->grpc_addr, NULL);
    mg_wsc *sink = mg_wsc_connect_user(g->ws_port, "sink", 5000, NULL);
    mg_wsc *watch = mg_wsc_connect_user(g->ws_port, "watch", 5000, NULL);
    cr_assert(sink && watch);
    int small = 4096;
    setsockopt(mg_wsc_fd(sink), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    usleep(200 * 1000);
    slow_text = malloc(SLOW_BYTES + 1);
    memset(slow_text, 's', SLOW_BYTES);
    slow_text[SLOW_BYTES] = 0;
    pthread_t th[SLOW_THREADS];
    for (int i = 0; i < SLOW_THREADS; i++)
        pthread_create(&th[i], NULL, slow_feed, NULL);
    /* Meanwhile another user is served promptly, call after call. */
    int served = 0;
    for (int i = 0; i < 50; i++) {
        served += mg_tc_send(slow_cli, "feeder", "watch", NULL, "hi", 1, 3000, NULL, NULL) ==
                  GRPC_STATUS_OK;
        char *m = mg_wsc_recv_text(watch, 3000);
        served -= m == NULL;
        free(m);
    }
    long fed = 0;
    for (int i = 0; i < SLOW_THREADS; i++) {
        void *rv;
        pthread_join(th[i], &rv);
        fed += (long)rv;
    }
    cr_assert_eq(served, 50, "every other send answered and received while the sink was stuck");
    cr_assert_eq(fed, SLOW_SENDS, "every send to the stuck sink was answered too");
    /* Marked slow at its bound; it reads nothing, so the close frame cannot
     * reach it: the server hangs up after the close grace. */
    cr_assert_eq(gauge(g, "meshgate_ws_slow_consumer_closes_total"), 1,
                 "closed as a slow consumer");
    long open = -1;
    for (int i = 0; i < 150 && open != 1; i++) {
        open = gauge(g, "meshgate_ws_connections");
        if (open != 1)
            usleep(100 * 1000);
    }
    cr_assert_eq(open, 1, "the stuck connection is gone, the other stays");
    cr_assert_eq(mg_wsc_close_code(watch), 0);
    mg_wsc_free(sink);
    mg_wsc_free(watch);
    free(slow_text);
    mg_grpc_client_free(slow_cli);
    cr_assert_eq(mg_gw_stop(g), 0);
    mg_gw_free(g);
}
