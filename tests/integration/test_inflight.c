/* No thread cap (the asynchronous router): 2,000 HIGH sends in flight at
 * once to a peer that answers none of them (SIGSTOPped) finish in about one
 * peer deadline, not 2,000 / threads deadlines as when a thread waited for
 * each peer call. Two gateways, Redis Cluster presence, Consul discovery, no
 * Kafka (so a failed peer call is answered FAILED, not moved). The calls are
 * made asynchronously from one completion queue, as a busy service would. */
#include "common/mg_grpc.h"
#include "common/mg_time.h"
#include "meshgate/v1/messaging.pb-c.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CALLS       2000
#define PEER_DEADLN 1000 /* ms */

typedef struct call {
    mg_grpc_unary u;
    grpc_byte_buffer *req;
} call;

static grpc_byte_buffer *send_request(int i)
{
    char id[48];
    snprintf(id, sizeof(id), "nc-%d-%d", (int)getpid(), i);
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.id = id;
    m.from = "svc";
    m.to = "bob";
    m.content.data = (uint8_t *)"x";
    m.content.len = 1;
    Meshgate__V1__SendMessageRequest rq = MESHGATE__V1__SEND_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    return mg_grpc_pack(&rq.base);
}

static long peer_calls(const mg_gw *gw, const char *result)
{
    char *body = NULL, needle[96];
    long total = 0;
    if (mg_http_get(gw->ws_port, "/metrics", &body) == 200 && body) {
        snprintf(needle, sizeof(needle), "result=\"%s\"} ", result);
        for (char *p = body; (p = strstr(p, "meshgate_peer_calls_total{")); p++) {
            char *eol = strchr(p, '\n');
            char *hit = strstr(p, needle);
            if (hit && (!eol || hit < eol))
                total += strtol(hit + strlen(needle), NULL, 10);
        }
    }
    free(body);
    return total;
}

Test(inflight, thousands_of_sends_to_a_stuck_peer_finish_in_about_one_deadline, .timeout = 180)
{
    char svc[64], ida[32], idb[32], deadline[16];
    snprintf(svc, sizeof(svc), "meshgate-nc%d", (int)getpid());
    snprintf(ida, sizeof(ida), "nc%d-a", (int)getpid());
    snprintf(idb, sizeof(idb), "nc%d-b", (int)getpid());
    snprintf(deadline, sizeof(deadline), "%d", PEER_DEADLN);
    /* Consul's default 2 s check, not the fleet's 1 s: the stopped b fails
     * its health check (and leaves a's peers) later. */
    const char *args[] = {"--peer-deadline-ms",
                          deadline,
                          "--peer-max-inflight",
                          "4096",
                          "--consul-check-interval-seconds",
                          "2",
                          NULL};
    mg_gw *a = mg_gw_spawn_fleet(ida, svc, "r1", args);
    cr_assert_not_null(a);
    mg_gw *b = mg_gw_spawn_fleet(idb, svc, "r1", args);
    cr_assert_not_null(b);
    mg_wsc *bob = mg_wsc_connect_user(b->ws_port, "bob", 5000, NULL);
    cr_assert_not_null(bob);
    cr_assert(mg_gw_wait_peer(a, idb, 15000), "a never listed b as a peer");
    usleep(300000); /* bob's presence is in Redis */

    mg_gw_kill(b, SIGSTOP); /* b accepts connections but answers nothing */
    grpc_init();
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(a->grpc_addr, creds, NULL);
    grpc_channel_credentials_release(creds);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    int64_t start = mg_mono_ms();
    for (int i = 0; i < CALLS; i++) {
        call *c = calloc(1, sizeof(*c));
        c->req = send_request(i);
        cr_assert_eq(mg_grpc_unary_start(&c->u, ch, cq, "/meshgate.v1.Messaging/SendMessage",
                                         c->req, NULL, 0, 60000, c),
                     0);
    }
    int answered = 0, failed_results = 0;
    while (answered < CALLS) {
        grpc_event ev = grpc_completion_queue_next(
            cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(90, GPR_TIMESPAN)),
            NULL);
        cr_assert_eq(ev.type, GRPC_OP_COMPLETE, "calls still unanswered after 90 s");
        call *c = ev.tag;
        grpc_byte_buffer *resp = NULL;
        char details[128];
        grpc_status_code code =
            mg_grpc_unary_finish(&c->u, ev.success != 0, &resp, details, sizeof(details));
        cr_assert_eq(code, GRPC_STATUS_OK, "call %d: %s %s", answered, mg_grpc_code_name(code),
                     details);
        Meshgate__V1__SendMessageResponse *r = (Meshgate__V1__SendMessageResponse *)mg_grpc_unpack(
            &meshgate__v1__send_message_response__descriptor, resp);
        cr_assert_not_null(r);
        failed_results +=
            r->result->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_FAILED;
        protobuf_c_message_free_unpacked(&r->base, NULL);
        grpc_byte_buffer_destroy(resp);
        grpc_byte_buffer_destroy(c->req);
        free(c);
        answered++;
    }
    int64_t took = mg_mono_ms() - start;
    long timed_out = peer_calls(a, "deadline_exceeded");
    mg_gw_kill(b, SIGCONT);

    cr_assert_eq(failed_results, CALLS, "the stuck peer's recipient: FAILED, not DELIVERED");
    /* One peer deadline each; with a thread held per call (4 gRPC threads)
     * this took CALLS / 4 deadlines, 500 s. */
    cr_assert_lt(took, 8 * PEER_DEADLN, "%d sends took %lld ms", CALLS, (long long)took);
    /* They were in flight together: as single calls, or (--peer-coalesce-calls) queued behind
     * the calls in flight, each failing when its own peer deadline passed. */
    cr_assert_geq(timed_out, 1, "the stuck peer's calls ran into their deadline");
    cr_log_info("%d sends to a stuck peer answered in %lld ms (%ld peer calls timed out)", CALLS,
                (long long)took, timed_out);

    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    grpc_channel_destroy(ch);
    grpc_shutdown();
    mg_wsc_free(bob);
    cr_assert_eq(mg_gw_stop(a), 0);
    cr_assert_eq(mg_gw_stop(b), 0);
    mg_gw_free(a);
    mg_gw_free(b);
}
