/* What order a recipient sees a sender's messages in, tested as DESIGN.md
 * states it for the local path: one connection's sends arrive in the order
 * they were sent, even flat out with several router workers; so do the
 * inbox's, on the next connection; so do they across the recipient's
 * connect (stored ones first, then live ones); and a user whose
 * connections sit on different WebSocket loops (--ws-threads) gets every
 * sender's messages in order on each. (The cross-gateway paths are covered in test_routing.c.)
 * Real gateway binary, embedded default. */
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    /* the local path only: a send that raced rx's connect could be stored
     * (that transition is the next test's) */
    cr_assert(mg_wsc_wait_ready(rx, 10000), "rx ready");
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

/* ---- a sender's messages across the recipient's connect ---- */

#define N_CONNECT 3000

typedef struct stream_sender {
    mg_wsc *tx;
    const char *to;
    atomic_int sent;
    atomic_int failed; /* the send that failed + 1, or 0 */
} stream_sender;

static void *send_all(void *arg)
{
    stream_sender *s = arg;
    char frame[128];
    for (int i = 0; i < N_CONNECT; i++) {
        snprintf(frame, sizeof(frame), "{\"type\":\"send\",\"to\":\"%s\",\"content\":\"%d\"}",
                 s->to, i);
        if (mg_wsc_send_text(s->tx, frame) != 0) {
            atomic_store(&s->failed, i + 1);
            break;
        }
        atomic_store(&s->sent, i + 1);
        if (i % 50 == 49)
            usleep(1000); /* spread over ~60 ms: the connect lands inside the stream */
    }
    return NULL;
}

/* The recipient connects while a sender is flat out: the sends before it
 * are stored, the ones during its presence record and inbox fetch race it,
 * the later ones are live. Each message is seen first in the order sent
 * (the inbox page, then the live ones held behind the ready frame); a
 * stored message may come twice (its page entry and its live copy), never
 * out of place. */
Test(ordering, a_senders_messages_keep_their_order_across_the_recipients_connect, .timeout = 120)
{
    const char *args[] = {"--workers",
                          "4",
                          "--outbound-queue",
                          "100000",
                          "--outbound-queue-bytes",
                          "100000000",
                          "--inbox-max-messages",
                          "10000",
                          NULL};
    mg_gw *gw = mg_gw_spawn("order-connect", args);
    cr_assert_not_null(gw);
    stream_sender s = {.tx = connect_user(gw, "ordc-tx"), .to = "ordc-rx"};
    cr_assert(mg_wsc_wait_ready(s.tx, 10000));
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, send_all, &s), 0);
    while (atomic_load(&s.sent) < N_CONNECT / 4 && !atomic_load(&s.failed))
        usleep(200);
    mg_wsc *rx = connect_user(gw, "ordc-rx");
    char *seen = calloc(N_CONNECT, 1);
    long next = 0, misplaced = 0, repeats = 0, first_bad = -1;
    const char *why = NULL;
    while (next < N_CONNECT) {
        long seq = next_message_seq(rx, &why);
        if (seq < 0 || seq >= N_CONNECT)
            break;
        if (seen[seq]) {
            repeats++;
            continue;
        }
        seen[seq] = 1;
        if (seq != next) {
            misplaced++;
            if (first_bad < 0)
                first_bad = seq;
        }
        next++;
    }
    pthread_join(th, NULL);
    cr_assert_eq(s.failed, 0, "send %d failed", s.failed - 1);
    cr_assert_eq(next, N_CONNECT, "%ld of %d messages seen (%s)", next, N_CONNECT, why ? why : "");
    cr_expect_eq(misplaced, 0, "%ld of %d messages first seen out of order (the first: %ld)",
                 misplaced, N_CONNECT, first_bad);
    cr_log_info("repeats (a page entry and its live copy): %ld", repeats);
    free(seen);
    mg_wsc_free(s.tx);
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

/* ---- a user whose connections live on different service loops ---- */

#define LOOPS        4
#define SENDERS      3
#define PER_SENDER   300
#define MAX_RX_CONNS 12

/* The loop each open connection sits on, from meshgate_ws_loop_connections:
 * waits until the gauges add up to want, then returns the loop whose count
 * grew since before[] (or -1). */
static int landed_on(const mg_gw *gw, double before[LOOPS], double want)
{
    char key[64];
    double now[LOOPS];
    for (int tries = 0; tries < 500; tries++) { /* 500 x 10 ms */
        double sum = 0;
        for (int l = 0; l < LOOPS; l++) {
            snprintf(key, sizeof(key), "meshgate_ws_loop_connections{loop=\"%d\"}", l);
            now[l] = mg_gw_metric(gw, key);
            sum += now[l];
        }
        if (sum == want) {
            int grew = -1;
            for (int l = 0; l < LOOPS; l++) {
                if (now[l] > before[l])
                    grew = l;
                before[l] = now[l];
            }
            return grew;
        }
        usleep(10000);
    }
    return -1;
}

/* Reads one "message" frame's content ("<sender>:<seq>") from c. */
static bool next_content(mg_wsc *c, int *sender, long *seq)
{
    for (int frames = 0; frames < 10; frames++) {
        char *text = mg_wsc_recv_text(c, 10000);
        if (!text)
            return false;
        json_t *j = json_loads(text, 0, NULL);
        free(text);
        const char *type = json_string_value(json_object_get(j, "type"));
        if (type && !strcmp(type, "message")) {
            const char *content = json_string_value(json_object_get(j, "content"));
            bool ok = content && sscanf(content, "%d:%ld", sender, seq) == 2;
            json_decref(j);
            return ok;
        }
        json_decref(j);
    }
    return false;
}

Test(ordering, user_on_several_loops_gets_every_message_in_order_per_sender, .timeout = 120)
{
    /* 4 loops whatever MESHGATE_TEST_WS_THREADS says; queues deep enough for
     * the reader below, which drains one connection after the other */
    const char *args[] = {
        "--ws-threads", "4", "--outbound-queue", "100000", "--outbound-queue-bytes",
        "100000000",    NULL};
    mg_gw *gw = mg_gw_spawn("order-loops", args);
    cr_assert_not_null(gw);
    /* connect the recipient until two of its connections sit on different
     * loops (SO_REUSEPORT spreads them by address and port) */
    double before[LOOPS] = {0};
    mg_wsc *rx[MAX_RX_CONNS];
    int nrx = 0, first_loop = -1;
    bool spread = false;
    while (!spread && nrx < MAX_RX_CONNS) {
        rx[nrx] = connect_user(gw, "ord-multi");
        nrx++;
        int loop = landed_on(gw, before, nrx);
        cr_assert_geq(loop, 0, "connection %d: no loop's gauge grew", nrx);
        if (first_loop < 0)
            first_loop = loop;
        else if (loop != first_loop)
            spread = true;
    }
    cr_assert(spread, "%d connections all landed on loop %d", nrx, first_loop);
    /* several senders, flat out, each on a connection of its own */
    mg_wsc *tx[SENDERS];
    for (int s = 0; s < SENDERS; s++) {
        char user[32];
        snprintf(user, sizeof(user), "ord-sender-%d", s);
        tx[s] = connect_user(gw, user);
    }
    char frame[128];
    for (long i = 0; i < PER_SENDER; i++) {
        for (int s = 0; s < SENDERS; s++) {
            snprintf(frame, sizeof(frame),
                     "{\"type\":\"send\",\"to\":\"ord-multi\",\"content\":\"%d:%ld\"}", s, i);
            cr_assert_eq(mg_wsc_send_text(tx[s], frame), 0);
        }
    }
    /* every connection of the recipient gets every message, each sender's
     * in the order it sent them */
    for (int c = 0; c < nrx; c++) {
        long next[SENDERS] = {0};
        for (int k = 0; k < SENDERS * PER_SENDER; k++) {
            int s = -1;
            long seq = -1;
            cr_assert(next_content(rx[c], &s, &seq), "connection %d: message %d of %d missing", c,
                      k, SENDERS * PER_SENDER);
            cr_assert(s >= 0 && s < SENDERS, "connection %d: sender %d", c, s);
            cr_assert_eq(seq, next[s], "connection %d: sender %d's message %ld came after %ld", c,
                         s, seq, next[s] - 1);
            next[s]++;
        }
    }
    for (int s = 0; s < SENDERS; s++)
        mg_wsc_free(tx[s]);
    /* SIGTERM: the drain closes every connection with 1012, whatever its loop */
    mg_gw_kill(gw, SIGTERM);
    for (int c = 0; c < nrx; c++) {
        cr_expect_eq(mg_wsc_wait_close(rx[c], 10000), 1012, "connection %d", c);
        mg_wsc_free(rx[c]);
    }
    cr_assert(mg_gw_wait(gw, 30000));
    cr_expect_eq(gw->exit_status, 0, "clean stop of every loop");
    mg_gw_free(gw);
}
