/* What order a recipient sees a sender's messages in, tested as DESIGN.md
 * states it for the local path: one connection's sends arrive in the order
 * they were sent, even flat out with several router workers; so do the
 * inbox's, on the next connection. (The cross-gateway paths are covered in
 * test_routing.c.) Real gateway binary, embedded default. */
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_MSGS 2000

static mg_wsc *connect_user(const mg_gw *gw, const char *user)
{
    int st = 0;
    mg_wsc *c = mg_wsc_connect_user(gw->ws_port, user, 5000, &st);
    cr_assert_not_null(c, "connect as %s: HTTP %d", user, st);
    return c;
}

/* Reads frames until a "message" arrives; returns its content as a number. */
static long next_message_seq(mg_wsc *c, const char **why)
{
    for (int frames = 0; frames < 10; frames++) {
        char *text = mg_wsc_recv_text(c, 10000);
        if (!text) {
            *why = "timed out";
            return -1;
        }
        json_t *j = json_loads(text, 0, NULL);
        free(text);
        const char *type = json_string_value(json_object_get(j, "type"));
        if (type && !strcmp(type, "message")) {
            long seq = strtol(json_string_value(json_object_get(j, "content")), NULL, 10);
            json_decref(j);
            return seq;
        }
        json_decref(j);
    }
    *why = "no message among 10 frames";
    return -1;
}

Test(ordering, one_connections_sends_arrive_in_order, .timeout = 120)
{
    const char *args[] = {"--workers", "4", "--outbound-queue", "100000", "--outbound-queue-bytes",
                          "100000000", NULL};
    mg_gw *gw = mg_gw_spawn("order-local", args);
    cr_assert_not_null(gw);
    mg_wsc *rx = connect_user(gw, "ord-rx");
    mg_wsc *tx = connect_user(gw, "ord-tx");
    /* Flat out, not waiting for acks: the worker pool is free to run them
     * on any thread unless the gateway keeps one connection's order. */
    char frame[128];
    for (int i = 0; i < N_MSGS; i++) {
        snprintf(frame, sizeof(frame), "{\"type\":\"send\",\"to\":\"ord-rx\",\"content\":\"%d\"}",
                 i);
        cr_assert_eq(mg_wsc_send_text(tx, frame), 0);
    }
    long out_of_order = 0, last = -1;
    for (int i = 0; i < N_MSGS; i++) {
        const char *why = NULL;
        long seq = next_message_seq(rx, &why);
        cr_assert_geq(seq, 0, "message %d of %d: %s", i, N_MSGS, why);
        if (seq != last + 1)
            out_of_order++;
        last = seq;
    }
    cr_expect_eq(out_of_order, 0, "%ld of %d messages arrived out of order", out_of_order, N_MSGS);
    mg_wsc_free(tx);
    mg_wsc_free(rx);
    cr_expect_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ordering, inbox_arrives_in_send_order_on_connect, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("order-inbox", NULL);
    cr_assert_not_null(gw);
    mg_wsc *tx = connect_user(gw, "ord-tx2");
    char frame[128];
    for (int i = 0; i < 50; i++) {
        snprintf(frame, sizeof(frame),
                 "{\"type\":\"send\",\"to\":\"ord-offline\",\"content\":\"%d\"}", i);
        cr_assert_eq(mg_wsc_send_text(tx, frame), 0);
    }
    /* every send is acked (stored) before the recipient connects */
    for (int acks = 0; acks < 50;) {
        char *text = mg_wsc_recv_text(tx, 10000);
        cr_assert_not_null(text, "ack %d", acks);
        if (strstr(text, "\"stored\""))
            acks++;
        free(text);
    }
    mg_wsc *rx = connect_user(gw, "ord-offline");
    for (long i = 0; i < 50; i++) {
        const char *why = NULL;
        cr_assert_eq(next_message_seq(rx, &why), i, "inbox message %ld (%s)", i, why ? why : "");
    }
    mg_wsc_free(tx);
    mg_wsc_free(rx);
    cr_expect_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}
