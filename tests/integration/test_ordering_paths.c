/* The order DESIGN.md states for the cross-gateway paths, against real
 * Redis Cluster, Consul and Kafka: a sender that waits for each answer
 * (HIGH) sees its messages arrive in order on the gRPC path (same region)
 * and on the Kafka path (a cold cross-region pair: keyed by recipient, one
 * partition, one consumer); so do a WebSocket sender that does not wait
 * and a SendStream, whose sends overlap on Kafka (the chain goes on at the
 * produce) and not on gRPC direct. */
#include "support/grpc_client.h"
#include "support/grpc_stream_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_MSGS 200

static mg_gw *spawn(const char *tag, const char *name, const char *region)
{
    static char svc[64], topic[64];
    snprintf(svc, sizeof(svc), "meshgate-%s", tag);
    snprintf(topic, sizeof(topic), "meshgate.%s.", tag);
    char id[64];
    snprintf(id, sizeof(id), "%s-%s", tag, name);
    const char *cold[] = {"--hot-threshold", "1000000", /* every pair stays cold */
                          NULL};
    mg_gw *gw = mg_gw_spawn_fleet_kafka(id, svc, region, topic, cold);
    cr_assert_not_null(gw, "gateway %s did not start", id);
    return gw;
}

static mg_wsc *connect_user(const mg_gw *gw, const char *user)
{
    int st = 0;
    mg_wsc *c = mg_wsc_connect_user(gw->ws_port, user, 5000, &st);
    cr_assert_not_null(c, "connect as %s: HTTP %d", user, st);
    return c;
}

/* Sends N_MSGS numbered messages from the gateway of cli to user, each
 * after the previous one was answered, and checks the path taken. */
static void send_numbered(mg_grpc_client *cli, const char *user, int want_path)
{
    for (int i = 0; i < N_MSGS; i++) {
        char text[16];
        snprintf(text, sizeof(text), "%d", i);
        Meshgate__V1__SendMessageResponse *resp = NULL;
        char *details = NULL;
        grpc_status_code rc =
            mg_tc_send(cli, "ord-sender", user, NULL, text, 1, 10000, &resp, &details);
        cr_assert_eq(rc, GRPC_STATUS_OK, "send %d: %s", i, details ? details : "");
        cr_assert_not_null(resp->result);
        cr_assert_eq((int)resp->result->path, want_path, "send %d went by path %d (%s)", i,
                     (int)resp->result->path, resp->result->reason);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        free(details);
    }
}

/* Reads N_MSGS messages and counts those not one more than the previous. */
static int out_of_order(mg_wsc *c)
{
    int bad = 0, last = -1;
    for (int got = 0; got < N_MSGS;) {
        char *text = mg_wsc_recv_text(c, 15000);
        cr_assert_not_null(text, "message %d of %d did not arrive", got, N_MSGS);
        json_t *j = json_loads(text, 0, NULL);
        free(text);
        const char *type = json_string_value(json_object_get(j, "type"));
        if (type && !strcmp(type, "message")) {
            int seq = atoi(json_string_value(json_object_get(j, "content")));
            bad += seq != last + 1;
            last = seq;
            got++;
        }
        json_decref(j);
    }
    return bad;
}

Test(ordering_paths, grpc_and_kafka_keep_a_waiting_senders_order, .timeout = 240)
{
    char tag[32];
    snprintf(tag, sizeof(tag), "op%d", (int)getpid());
    mg_gw *a = spawn(tag, "a", "eu"), *b = spawn(tag, "b", "eu"), *c = spawn(tag, "c", "us");
    mg_gw *fleet[] = {a, b, c};
    cr_assert(mg_gw_wait_mesh(fleet, 3, 10000), "the three gateways see each other");

    char near[64], far[64];
    snprintf(near, sizeof(near), "%s-near", tag);
    snprintf(far, sizeof(far), "%s-far", tag);
    mg_wsc *rx_near = connect_user(b, near), *rx_far = connect_user(c, far);
    usleep(300000); /* presence written by the connect job */
    mg_grpc_client *cli = mg_grpc_client_create(a->grpc_addr, NULL);

    send_numbered(cli, near, MESHGATE__V1__PATH__PATH_GRPC);
    cr_expect_eq(out_of_order(rx_near), 0, "gRPC path: messages out of order");
    send_numbered(cli, far, MESHGATE__V1__PATH__PATH_KAFKA);
    cr_expect_eq(out_of_order(rx_far), 0, "Kafka path: messages out of order");

    /* A WebSocket sender that does not wait for its acks: its sends
     * overlap on both paths (gRPC: queued behind the call in flight on the
     * peer's lane, so they reach b in DeliverMany calls) and still arrive in
     * order. */
    char ws_sender[64];
    snprintf(ws_sender, sizeof(ws_sender), "%s-ws", tag);
    mg_wsc *tx = connect_user(a, ws_sender);
    const char *many = "meshgate_grpc_requests_total{method=\"DeliverMany\",code=\"OK\"}";
    double many_before = mg_gw_metric(b, many);
    mg_wsc_send_acked(tx, near, near, N_MSGS, "delivered");
    cr_expect_eq(out_of_order(rx_near), 0, "gRPC path, pipelined: messages out of order");
    cr_expect_gt(mg_gw_metric(b, many), many_before,
                 "the sends overlapped: some went together behind a call in flight");
    mg_wsc_send_acked(tx, far, far, N_MSGS, "queued");
    cr_expect_eq(out_of_order(rx_far), 0, "Kafka path, pipelined: messages out of order");
    mg_wsc_free(tx);

    /* A connection that leaves with its sends in flight or waiting: each
     * is still routed, in order (the chain lives until its last one ended;
     * the gateways' clean exits below, under ASan, say nothing leaked). */
    tx = connect_user(a, ws_sender);
    for (int i = 0; i < N_MSGS; i++) {
        char frame[256];
        snprintf(frame, sizeof(frame),
                 "{\"type\":\"send\",\"to\":\"%s\",\"content\":\"%d\",\"id\":\"%s-c%d\"}", far, i,
                 far, i);
        cr_assert_eq(mg_wsc_send_text(tx, frame), 0);
    }
    mg_wsc_leave(tx, 5000); /* a close frame behind the sends, not a reset dropping them */
    cr_expect_eq(out_of_order(rx_far), 0, "Kafka path, sender gone: messages out of order");

    /* SendStream: its chain per recipient works the same way */
    uint8_t *reqs[2 * N_MSGS];
    size_t lens[2 * N_MSGS];
    for (int i = 0; i < 2 * N_MSGS; i++) {
        char id[96], text[16];
        const char *to = i % 2 ? far : near;
        snprintf(id, sizeof(id), "%s-s%d", to, i / 2);
        snprintf(text, sizeof(text), "%d", i / 2);
        reqs[i] = mg_tc_stream_request("ord-sender", to, id, text, 1, &lens[i]);
    }
    mg_tc_stream_out out;
    grpc_status_code st = mg_tc_stream(a->grpc_addr, NULL, (const uint8_t *const *)reqs, lens,
                                       2 * N_MSGS, 60000, &out);
    cr_assert_eq(st, GRPC_STATUS_OK, "stream status %d: %s", st, out.details);
    cr_assert_eq(out.n, 2 * N_MSGS, "one result per message (%zu)", out.n);
    for (size_t i = 0; i < out.n; i++)
        cr_assert(out.results[i]->result->status ==
                          MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED ||
                      out.results[i]->result->status ==
                          MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED,
                  "%s: status %d (%s)", out.results[i]->id, out.results[i]->result->status,
                  out.results[i]->result->reason);
    mg_tc_stream_out_free(&out);
    for (int i = 0; i < 2 * N_MSGS; i++)
        free(reqs[i]);
    cr_expect_eq(out_of_order(rx_near), 0, "gRPC path, SendStream: messages out of order");
    cr_expect_eq(out_of_order(rx_far), 0, "Kafka path, SendStream: messages out of order");

    mg_grpc_client_free(cli);
    mg_wsc_free(rx_near);
    mg_wsc_free(rx_far);
    cr_expect_eq(mg_gw_stop(c), 0);
    cr_expect_eq(mg_gw_stop(b), 0);
    cr_expect_eq(mg_gw_stop(a), 0);
    mg_gw_free(c);
    mg_gw_free(b);
    mg_gw_free(a);
}
