/* test_grpc_stream.c: Messaging/SendStream (gateway/grpc_stream.c) on a
 * real gateway in its embedded default mode, with WebSocket clients as the
 * recipients.
 *
 * - every message of a stream gets exactly one result with its id: online
 *   users DELIVERED, offline ones STORED, LOW ACCEPTED, and bad requests
 *   (garbage bytes, a message without a recipient, an oversized content)
 *   REJECTED with a reason while the stream goes on;
 * - messages to one recipient arrive in stream order;
 * - a stream cut by its deadline mid-flight ends DEADLINE_EXCEEDED, loses
 *   nothing that was answered, and the gateway stays healthy and leak-free
 *   (its exit status, under ASan, says so);
 * - more messages than the stream's window flow through (back-pressure).
 */
#include "support/grpc_client.h"
#include "support/grpc_stream_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define T_MS 10000

static mg_gw *gw;

static void setup(void)
{
    const char *args[] = {"--max-content-bytes", "1024", "--outbound-queue", "20000", NULL};
    gw = mg_gw_spawn("grpc-stream", args);
    cr_assert_not_null(gw, "gateway did not become ready");
}

static void teardown(void)
{
    if (gw) {
        int st = mg_gw_stop(gw);
        mg_gw_free(gw);
        gw = NULL;
        cr_expect_eq(st, 0, "gateway exit status %d", st);
    }
}

TestSuite(grpc_stream, .init = setup, .fini = teardown, .timeout = 90);

/* Connects user and waits until a SendMessage to them is DELIVERED. */
static mg_wsc *online(const char *user)
{
    mg_wsc *ws = mg_wsc_connect_user(gw->ws_port, user, T_MS, NULL);
    cr_assert_not_null(ws, "%s: WebSocket connect", user);
    mg_grpc_client *c = mg_grpc_client_create(gw->grpc_addr, NULL);
    bool ok = false;
    for (int i = 0; i < 200 && !ok; i++) {
        Meshgate__V1__SendMessageResponse *r = NULL;
        char id[64];
        snprintf(id, sizeof(id), "probe-%s-%d", user, i);
        if (mg_tc_send(c, "probe", user, id, "probe", 1, T_MS, &r, NULL) == GRPC_STATUS_OK)
            ok = r->result->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED;
        if (r)
            protobuf_c_message_free_unpacked(&r->base, NULL);
        if (!ok)
            usleep(20 * 1000);
    }
    mg_grpc_client_free(c);
    cr_assert(ok, "%s never became reachable", user);
    return ws;
}

/* Reads user's frames until every stream message "s-<k>" expected (want of
 * them, ids rising) arrived; returns how many arrived in order. */
static int read_in_order(mg_wsc *ws, int want)
{
    int got = 0, last = -1;
    bool ordered = true;
    while (got < want) {
        json_t *j = mg_wsc_recv_json(ws, T_MS);
        if (!j)
            break;
        const char *id = mg_json_str(j, "id");
        int k;
        if (id && sscanf(id, "s-%d", &k) == 1) {
            ordered = ordered && k > last;
            last = k;
            got++;
        }
        json_decref(j);
    }
    return ordered ? got : -got;
}

Test(grpc_stream, every_message_gets_one_result_in_order_per_recipient)
{
    mg_wsc *wendy = online("wendy"), *will = online("will");
    enum { N = 600 };
    uint8_t *reqs[N + 3];
    size_t lens[N + 3];
    int want_wendy = 0, want_will = 0;
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "s-%d", i);
        const char *to = i % 3 == 0 ? "wendy" : i % 3 == 1 ? "will" : "offline-olga";
        want_wendy += i % 3 == 0;
        want_will += i % 3 == 1;
        reqs[i] = mg_tc_stream_request("svc", to, id, "hello", i == 5 ? 2 : 1, &lens[i]);
    }
    /* the bad ones, in the middle of the stream's life */
    reqs[N] = (uint8_t *)strdup("\x0a\xff\xff garbage");
    lens[N] = strlen((char *)reqs[N]);
    reqs[N + 1] = mg_tc_stream_request("svc", "", "bad-no-to", "x", 1, &lens[N + 1]);
    char big[2048];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    reqs[N + 2] = mg_tc_stream_request("svc", "wendy", "bad-big", big, 1, &lens[N + 2]);

    mg_tc_stream_out out;
    grpc_status_code st =
        mg_tc_stream(gw->grpc_addr, NULL, (const uint8_t *const *)reqs, lens, N + 3, 30000, &out);
    cr_assert_eq(st, GRPC_STATUS_OK, "stream status %d: %s", st, out.details);
    cr_assert_eq(out.n, N + 3, "one result per message (%zu)", out.n);

    static char seen[N];
    int rejected = 0;
    for (size_t i = 0; i < out.n; i++) {
        Meshgate__V1__SendMessageResponse *r = out.results[i];
        cr_assert_not_null(r->result);
        int k;
        if (sscanf(r->id, "s-%d", &k) == 1 && k >= 0 && k < N) {
            cr_expect_eq(seen[k]++, 0, "s-%d answered twice", k);
            int want = k == 5       ? MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_ACCEPTED
                       : k % 3 == 2 ? MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED
                                    : MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED;
            cr_expect_eq(r->result->status, want, "s-%d: status %d (%s)", k, r->result->status,
                         r->result->reason);
        } else {
            cr_expect_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_REJECTED,
                         "%s", r->id);
            cr_expect_gt(strlen(r->result->reason), 0, "a rejection says why");
            rejected++;
        }
    }
    cr_expect_eq(rejected, 3);
    cr_expect_leq(out.responses, out.n, "results share responses");
    mg_tc_stream_out_free(&out);
    for (int i = 0; i < N + 3; i++)
        free(reqs[i]);

    int gw_ = read_in_order(wendy, want_wendy), gv = read_in_order(will, want_will);
    cr_expect_eq(gw_, want_wendy, "wendy: %d of %d in order (negative: out of order)", gw_,
                 want_wendy);
    cr_expect_eq(gv, want_will, "will: %d of %d in order (negative: out of order)", gv, want_will);
    mg_wsc_free(wendy);
    mg_wsc_free(will);
}

Test(grpc_stream, more_than_the_window_flows_and_a_deadline_cuts_cleanly)
{
    mg_wsc *wanda = online("wanda");
    enum { N = 3000 }; /* above the stream's window of 1,024 */
    uint8_t **reqs = calloc(N, sizeof(*reqs));
    size_t *lens = calloc(N, sizeof(*lens));
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "s-%d", i);
        reqs[i] =
            mg_tc_stream_request("svc", i % 2 ? "wanda" : "offline-otto", id, "m", 1, &lens[i]);
    }
    mg_tc_stream_out out;
    grpc_status_code st =
        mg_tc_stream(gw->grpc_addr, NULL, (const uint8_t *const *)reqs, lens, N, 60000, &out);
    cr_assert_eq(st, GRPC_STATUS_OK, "%s", out.details);
    cr_expect_eq(out.n, N);
    mg_tc_stream_out_free(&out);
    cr_expect_eq(read_in_order(wanda, N / 2), N / 2);

    /* the same stream with a deadline far too short: cut mid-flight */
    st = mg_tc_stream(gw->grpc_addr, NULL, (const uint8_t *const *)reqs, lens, N, 5, &out);
    cr_expect_eq(st, GRPC_STATUS_DEADLINE_EXCEEDED, "status %d", st);
    cr_expect_lt(out.n, N);
    size_t answered = out.n;
    mg_tc_stream_out_free(&out);
    (void)answered;
    for (int i = 0; i < N; i++)
        free(reqs[i]);
    free(reqs);
    free(lens);

    /* the gateway goes on: a fresh stream works */
    size_t len;
    uint8_t *rq = mg_tc_stream_request("svc", "wanda", "after-cut", "still here", 1, &len);
    const uint8_t *one[] = {rq};
    cr_assert_eq(mg_tc_stream(gw->grpc_addr, NULL, one, &len, 1, T_MS, &out), GRPC_STATUS_OK);
    cr_assert_eq(out.n, 1);
    cr_expect_eq(out.results[0]->result->status,
                 MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED);
    mg_tc_stream_out_free(&out);
    free(rq);
    mg_wsc_free(wanda);
}
