/* Integration tests of transport_nats.c against REAL nats-server processes
 * (tests/infra/nats.sh), never mocks:
 *   suite nats (the single server of MESHGATE_TEST_NATS, in-process routers):
 *     HIGH waits for the PubAck (QUEUED) and LOW does not; publish -> the
 *     region's durable consumer -> the router -> the local sink, each once
 *     (a producer retry with the same id is dropped by the stream's duplicate
 *     window); undecodable and oversized payloads published straight to the
 *     subject are counted and skipped and the consumer keeps going; a message
 *     whose handling fails at every delivery is NAKed up to max_deliver and
 *     then put in the inbox (real Redis Cluster presence and inbox); an
 *     unreachable server is a clear error naming it; one recipient's
 *     messages fetched together are handled one at a time in stream order
 *     (another recipient's meanwhile), and a stop leaves the one still
 *     waiting unacknowledged; a server of the test's
 *     own, stopped (SIGSTOP) and then killed holding a publish: the HIGH
 *     send fails at its PubAck deadline and the bus goes on.
 *   suite nats_gw (real gateways with Redis presence, Consul discovery and
 *     --near-route / --far-route selecting nats): delivery between two
 *     gateways of a region; a gateway SIGKILLed while holding pulled,
 *     unacknowledged messages (the other one frozen for 700 ms, so the
 *     first pulls the region's messages and its forwarding calls wait): they
 *     are redelivered to the other gateway of the region, every QUEUED
 *     message is shown, none twice; a backlog of 1,000 messages (8 KiB) for
 *     one user, published while his gateway is frozen, reaches him paced
 *     within the default outbound bounds: each once, in publish order, his
 *     connection open; a gateway whose
 *     --nats-url is unreachable exits naming it.
 *   suite nats_cluster (a 3-node JetStream cluster of its own, R3 stream):
 *     one node SIGKILLed mid-run: every QUEUED message is delivered, once.
 * Every test uses its own region ("<pid>-<name>": its own stream and
 * consumer) and deletes its stream at the end. */
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "store/redis_store.h"
#include "router/bus_metrics.h"
#include "router/router.h"
#include "router/transport_nats.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/mg_recsink.h"
#include "support/mg_wait.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <nats/nats.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static void teardown(void)
{
    mg_metrics_shutdown();
}

TestSuite(nats, .fini = teardown, .timeout = 120);
TestSuite(nats_gw, .fini = teardown, .timeout = 180);

/* ---- helpers ---- */

static const char *server(void)
{
    return mg_test_require_env("MESHGATE_TEST_NATS");
}

static void region_name(char *buf, size_t len, const char *test)
{
    snprintf(buf, len, "%d-%s", (int)getpid(), test);
}

/* This process's value of a meshgate_bus_*{bus="nats"} family. */
static int64_t nats_metric(mg_bus_family f, const char *reason)
{
    return mg_metric_value(mg_bus_metric(f, "nats", reason));
}

static int64_t bad_payloads(void)
{
    return nats_metric(MG_BUS_BAD, "undecodable") + nats_metric(MG_BUS_BAD, "oversized");
}

static mg_transport *make_transport_at(const char *urls, const char *gw, const char *region,
                                       int replicas, size_t max_bytes)
{
    mg_transport_nats_config cfg = {
        .urls = urls,
        .region = region,
        .gateway_id = gw,
        .replicas = replicas,
        .timeout_ms = 5000,
        .ack_wait_ms = 3000,
        .max_deliver = 5,
        .max_message_bytes = max_bytes,
    };
    char err[256] = "";
    mg_transport *t = mg_transport_nats_create(&cfg, err, sizeof(err));
    cr_assert(t, "create: %s", err);
    return t;
}

/* Gateway gw of region in-process: a router recording into r with users
 * u0..u<users-1> connected, the NATS transport on urls, its consumer
 * started. Returns the transport (the router owns it). */
static mg_transport *consumer_at(const char *urls, const char *gw, const char *region,
                                 mg_recsink *r, int users, int replicas, size_t max_bytes,
                                 mg_router **rt)
{
    *rt = mg_recsink_router(gw, region, r, users);
    mg_transport *t = make_transport_at(urls, gw, region, replicas, max_bytes);
    mg_router_set_transport(*rt, MG_PATH_NATS, t);
    char err[256] = "";
    cr_assert_eq(mg_transport_nats_start_consumer(t, *rt, err, sizeof(err)), 0, "%s", err);
    return t;
}

/* Publishes a message of len bytes of body to user in region. */
static mg_deliver_outcome send_body(mg_transport *t, const char *region, const char *id,
                                    const char *user, mg_priority prio, const char *body,
                                    size_t len)
{
    mg_msg *m =
        mg_msg_new(id, "sender", user, (const uint8_t *)body, len, "text/plain", mg_now_ms(), prio);
    mg_route_target target = {"gw-far", region};
    mg_deliver_outcome out = {0};
    int rc = mg_wait_deliver(t, &target, m, mg_mono_ms() + 10000, &out);
    mg_msg_free(m);
    cr_assert_eq(rc, 0);
    return out;
}

static mg_deliver_outcome send_to(mg_transport *t, const char *region, const char *id,
                                  const char *user, mg_priority prio)
{
    return send_body(t, region, id, user, prio, "hi", 2);
}

/* A plain nats.c connection of the test's own (raw publishes, clean-up). */
static natsConnection *raw_connect(const char *url)
{
    natsConnection *nc = NULL;
    natsStatus s = natsConnection_ConnectTo(&nc, url);
    cr_assert_eq(s, NATS_OK, "connect %s: %s", url, natsStatus_GetText(s));
    return nc;
}

/* Polls region's durable consumer (bounded by timeout_ms) until want_ack
 * messages wait for an acknowledgement and none waits to be fetched; g, when
 * given, must stay up meanwhile. The last counts go to *ack_pending, *pending. */
static void wait_consumer(const char *region, int64_t want_ack, int timeout_ms, mg_gw *g,
                          int64_t *ack_pending, int64_t *pending)
{
    natsConnection *nc = raw_connect(server());
    jsCtx *js = NULL;
    cr_assert_eq(natsConnection_JetStream(&js, nc, NULL), NATS_OK);
    char stream[160], durable[160];
    snprintf(stream, sizeof(stream), "MESHGATE_%s", region);
    for (char *p = stream; *p; p++)
        *p = *p >= 'a' && *p <= 'z' ? (char)(*p - 'a' + 'A') : *p;
    snprintf(durable, sizeof(durable), "meshgate-%s", region);
    *ack_pending = *pending = -1;
    for (int64_t end = mg_mono_ms() + timeout_ms; mg_mono_ms() < end; usleep(20 * 1000)) {
        if (g)
            cr_assert(!mg_gw_wait(g, 0), "the gateway died (exit %d)", g->exit_status);
        jsConsumerInfo *ci = NULL;
        cr_assert_eq(js_GetConsumerInfo(&ci, js, stream, durable, NULL, NULL), NATS_OK);
        *ack_pending = ci->NumAckPending;
        *pending = (int64_t)ci->NumPending;
        jsConsumerInfo_Destroy(ci);
        if (*ack_pending == want_ack && *pending == 0)
            break;
    }
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
}

/* Deletes the stream of region (the shared server keeps no litter). */
static void delete_stream(const char *urls, const char *region)
{
    natsConnection *nc = NULL;
    if (natsConnection_ConnectTo(&nc, urls) != NATS_OK)
        return;
    jsCtx *js = NULL;
    if (natsConnection_JetStream(&js, nc, NULL) == NATS_OK) {
        char name[160];
        snprintf(name, sizeof(name), "MESHGATE_%s", region);
        for (char *p = name; *p; p++)
            *p = *p >= 'a' && *p <= 'z' ? (char)(*p - 'a' + 'A') : *p;
        js_DeleteStream(js, name, NULL, NULL);
    }
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
}

/* ---- suite nats: one server, in-process routers ---- */

Test(nats, high_waits_for_the_puback_low_does_not)
{
    char region[64];
    region_name(region, sizeof(region), "puback");
    mg_transport *t = make_transport_at(server(), "gw-a", region, 1, 0);
    cr_assert(t->ops->available(t, &(mg_route_target){"gw-b", region}));
    int64_t acked = nats_metric(MG_BUS_SENT, NULL);
    mg_deliver_outcome out = send_to(t, region, "m1", "u0", MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "status=%d reason=%s", out.status, out.reason);
    /* QUEUED was answered by the PubAck: it is counted by then. */
    cr_assert_eq(nats_metric(MG_BUS_SENT, NULL), acked + 1);
    out = send_to(t, region, "m2", "u0", MG_PRIO_LOW);
    cr_assert_eq(out.status, MG_STATUS_ACCEPTED, "status=%d reason=%s", out.status, out.reason);
    mg_transport_nats_stop(t, 5000); /* the LOW one's PubAck comes in */
    cr_assert_eq(nats_metric(MG_BUS_SENT, NULL), acked + 2);
    /* A region whose stream nobody created: FAILED with the server's reason. */
    char other[80];
    region_name(other, sizeof(other), "nostream");
    out = send_to(t, other, "m3", "u0", MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_FAILED);
    cr_assert(strncmp(out.reason, "nats: ", 6) == 0, "reason=%s", out.reason);
    fprintf(stderr, "no stream: %s\n", out.reason);
    mg_transport_free(t);
    delete_stream(server(), region);
}

/* The stream stores no more: the PubAck's error fails a HIGH send with
 * the server's own description (what an operator reads in the result). */
Test(nats, a_stream_that_refuses_a_message_fails_it_with_the_servers_reason)
{
    char region[64];
    region_name(region, sizeof(region), "refuse");
    mg_transport *t = make_transport_at(server(), "gw-a", region, 1, 0);
    mg_deliver_outcome out = send_to(t, region, "r1", "u0", MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "reason=%s", out.reason);
    /* the stream now keeps one message and refuses new ones */
    natsConnection *nc = raw_connect(server());
    jsCtx *js = NULL;
    cr_assert_eq(natsConnection_JetStream(&js, nc, NULL), NATS_OK);
    char name[160];
    snprintf(name, sizeof(name), "MESHGATE_%s", region);
    for (char *p = name; *p; p++)
        *p = *p >= 'a' && *p <= 'z' ? (char)(*p - 'a' + 'A') : *p;
    jsStreamInfo *si = NULL, *upd = NULL;
    jsErrCode jerr = 0;
    cr_assert_eq(js_GetStreamInfo(&si, js, name, NULL, &jerr), NATS_OK, "stream %s: %d", name,
                 (int)jerr);
    si->Config->MaxMsgs = 1;
    si->Config->Discard = js_DiscardNew;
    cr_assert_eq(js_UpdateStream(&upd, js, si->Config, NULL, &jerr), NATS_OK, "update: %d",
                 (int)jerr);
    jsStreamInfo_Destroy(upd);
    jsStreamInfo_Destroy(si);
    int64_t failed = nats_metric(MG_BUS_FAILED, "error");
    out = send_to(t, region, "r2", "u0", MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_FAILED, "status=%d reason=%s", out.status, out.reason);
    cr_assert(strstr(out.reason, "nats: ") == out.reason, "reason=%s", out.reason);
    cr_assert(strstr(out.reason, "maximum messages"), "the server's description: %s", out.reason);
    cr_assert_null(strchr(out.reason, '{'), "the description, not the JSON: %s", out.reason);
    cr_assert_eq(nats_metric(MG_BUS_FAILED, "error"), failed + 1);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    mg_transport_free(t);
    delete_stream(server(), region);
}

/* A nats-server of the test's own on port (JetStream in dir); its pid. */
/* SIGSTOPs a server and waits (bounded) until it is stopped: kill() returns
 * before a process running on the other CPU stops, and a publish sent in
 * that gap is still answered. */
static void stop_server(pid_t pid)
{
    kill(pid, SIGSTOP);
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    for (int i = 0; i < 2000; i++) {
        char st = 0;
        FILE *f = fopen(path, "r");
        if (f) {
            if (fscanf(f, "%*d (%*[^)]) %c", &st) != 1)
                st = 0;
            fclose(f);
        }
        if (st == 'T' || st == 't')
            return;
        usleep(1000);
    }
}

static pid_t own_server(int port, const char *dir)
{
    char bin[512], p[16];
    snprintf(bin, sizeof(bin), "%s/nats-server", mg_test_require_env("MESHGATE_TEST_BIN"));
    snprintf(p, sizeof(p), "%d", port);
    mkdir(dir, 0755);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        execl(bin, bin, "-a", "127.0.0.1", "-p", p, "-js", "-sd", dir, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* The PubAck deadline is the transport's own (not nats.c's MaxWait): a
 * server that stops answering fails a HIGH send at it, the late PubAck is
 * taken quietly, and a PubAck lost with the server (killed, restarted) does
 * not stop the bus. */
Test(nats, a_puback_that_does_not_come_fails_at_the_deadline)
{
    char region[64], url[64], dir[300];
    region_name(region, sizeof(region), "stall");
    int port = mg_test_free_port();
    snprintf(url, sizeof(url), "nats://127.0.0.1:%d", port);
    snprintf(dir, sizeof(dir), "%s/nats-stall-%d", mg_test_env("MESHGATE_TEST_RUN"), (int)getpid());
    pid_t srv = own_server(port, dir);
    mg_transport_nats_config cfg = {
        .urls = url, .region = region, .gateway_id = "gw-a", .timeout_ms = 400};
    char err[256] = "";
    mg_transport *t = NULL;
    for (int64_t end = mg_mono_ms() + 15000; !t && mg_mono_ms() < end;) {
        t = mg_transport_nats_create(&cfg, err, sizeof(err));
        if (!t)
            usleep(100 * 1000);
    }
    cr_assert(t, "create on our own server: %s", err);
    mg_deliver_outcome out = send_to(t, region, "s1", "u0", MG_PRIO_HIGH);
    cr_expect_eq(out.status, MG_STATUS_QUEUED, "reason=%s", out.reason);

    stop_server(srv); /* takes the publish, answers nothing */
    int64_t errors = nats_metric(MG_BUS_FAILED, "timeout"), t0 = mg_mono_ms();
    out = send_to(t, region, "s2", "u0", MG_PRIO_HIGH);
    int64_t took = mg_mono_ms() - t0;
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect(strstr(out.reason, "no PubAck in time"), "reason=%s", out.reason);
    cr_expect_lt(took, 5000, "answered at its deadline, not the send's (%lld ms)", (long long)took);
    cr_expect_eq(nats_metric(MG_BUS_FAILED, "timeout"), errors + 1);
    kill(srv, SIGCONT); /* the late PubAck comes: nothing to answer */
    out = send_to(t, region, "s3", "u0", MG_PRIO_HIGH);
    cr_expect_eq(out.status, MG_STATUS_QUEUED, "after the stall: %s", out.reason);

    /* a PubAck that never comes: the server dies holding the publish */
    stop_server(srv);
    out = send_to(t, region, "s4", "u0", MG_PRIO_HIGH);
    cr_expect_eq(out.status, MG_STATUS_FAILED, "reason=%s", out.reason);
    kill(srv, SIGKILL);
    waitpid(srv, NULL, 0);
    srv = own_server(port, dir);
    out.status = MG_STATUS_FAILED;
    for (int i = 0; i < 100 && out.status != MG_STATUS_QUEUED; i++) {
        char id[32];
        snprintf(id, sizeof(id), "s5-%d", i);
        out = send_to(t, region, id, "u0", MG_PRIO_HIGH);
        if (out.status != MG_STATUS_QUEUED)
            usleep(100 * 1000);
    }
    cr_expect_eq(out.status, MG_STATUS_QUEUED, "the restarted server takes publishes: %s",
                 out.reason);
    mg_transport_free(t); /* sanitizer builds: nothing nats.c kept for a lost PubAck leaks */
    kill(srv, SIGTERM);
    waitpid(srv, NULL, 0);
    char rm[400];
    snprintf(rm, sizeof(rm), "rm -rf '%s'", dir);
    cr_expect_eq(system(rm), 0);
}

Test(nats, consumer_delivers_each_message_once)
{
    char region[64];
    region_name(region, sizeof(region), "once");
    mg_recsink r;
    mg_recsink_init(&r);
    mg_router *rt = NULL;
    mg_transport *t = consumer_at(server(), "gw-a", region, &r, 10, 1, 0, &rt);
    char err[256] = "";
    cr_assert_eq(mg_transport_nats_start_consumer(t, rt, err, sizeof(err)), -EALREADY);
    enum { N = 300 };
    for (int i = 0; i < N; i++) {
        char id[32], user[16];
        snprintf(id, sizeof(id), "h%d", i);
        snprintf(user, sizeof(user), "u%d", i % 10);
        mg_deliver_outcome out = send_to(t, region, id, user, MG_PRIO_HIGH);
        cr_assert_eq(out.status, MG_STATUS_QUEUED, "msg %d: %s", i, out.reason);
    }
    /* A producer retry of h0 (same id and recipient): QUEUED, and the
     * stream's duplicate window keeps one copy. */
    mg_deliver_outcome out = send_to(t, region, "h0", "u0", MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "%s", out.reason);
    cr_assert(mg_recsink_wait_total(&r, N, 30000), "delivered %d of %d", mg_recsink_total(&r), N);
    usleep(1000 * 1000); /* nothing more may come */
    cr_assert_eq(mg_recsink_total(&r), N);
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "h%d", i);
        cr_assert_eq(mg_recsink_count(&r, id), 1, "%s delivered %d times", id,
                     mg_recsink_count(&r, id));
    }
    cr_assert_eq(nats_metric(MG_BUS_RECEIVED, NULL), N);
    mg_transport_nats_stop(t, 5000);
    mg_router_free(rt);
    mg_recsink_destroy(&r);
    delete_stream(server(), region);
}

Test(nats, bad_payloads_are_skipped_and_the_consumer_goes_on)
{
    char region[64];
    region_name(region, sizeof(region), "bad");
    mg_recsink r;
    mg_recsink_init(&r);
    mg_router *rt = NULL;
    mg_transport *t = consumer_at(server(), "gw-a", region, &r, 1, 1, 4096, &rt);

    natsConnection *nc = raw_connect(server());
    jsCtx *js = NULL;
    cr_assert_eq(natsConnection_JetStream(&js, nc, NULL), NATS_OK);
    char subject[128];
    snprintf(subject, sizeof(subject), "meshgate.deliver.%s", region);
    static const char junk[] = "\xff\xff\xff\x0f not a protobuf";
    jsPubAck *pa = NULL;
    cr_assert_eq(js_Publish(&pa, js, subject, junk, (int)sizeof(junk), NULL, NULL), NATS_OK);
    jsPubAck_Destroy(pa);
    /* A well-formed envelope over the consumer's bound (4 KiB). */
    static uint8_t big[8192];
    memset(big, 'x', sizeof(big));
    mg_msg *m =
        mg_msg_new("big", "sender", "u0", big, sizeof(big), NULL, mg_now_ms(), MG_PRIO_HIGH);
    size_t len = 0;
    uint8_t *packed = mg_msg_pack(m, &len);
    mg_msg_free(m);
    pa = NULL;
    cr_assert_eq(js_Publish(&pa, js, subject, packed, (int)len, NULL, NULL), NATS_OK);
    jsPubAck_Destroy(pa);
    free(packed);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);

    mg_deliver_outcome out = send_to(t, region, "good", "u0", MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "%s", out.reason);
    cr_assert(mg_recsink_wait_total(&r, 1, 20000), "the good message after the bad ones");
    cr_assert_eq(mg_recsink_count(&r, "good"), 1);
    cr_assert_eq(mg_recsink_count(&r, "big"), 0);
    cr_assert_eq(bad_payloads(), 2);
    /* Terminated: not redelivered after the ack wait (3 s). */
    usleep(4000 * 1000);
    cr_assert_eq(bad_payloads(), 2);
    cr_assert_eq(mg_recsink_total(&r), 1);
    mg_transport_nats_stop(t, 5000);
    mg_router_free(rt);
    mg_recsink_destroy(&r);
    delete_stream(server(), region);
}

/* A message whose handling fails at every delivery (its recipient is on a
 * gateway this one has no path to: no grpc, and a queue consumer never
 * re-routes by a queue) is NAKed, redelivered up to max_deliver times, then
 * put in the recipient's inbox (real Redis Cluster presence and inbox). */
Test(nats, max_deliver_then_the_inbox)
{
    char region[64], ghost[64], user[64], err[256] = "";
    region_name(region, sizeof(region), "park");
    snprintf(ghost, sizeof(ghost), "%d-ghost", (int)getpid());
    snprintf(user, sizeof(user), "%d-parked-user", (int)getpid());
    mg_redis_cluster *rc = mg_redis_cluster_create(mg_test_require_env("MESHGATE_TEST_REDIS_NODES"),
                                                   NULL, NULL, 1000, err, sizeof(err));
    cr_assert(rc, "redis: %s", err);
    /* The recipient is connected on another gateway of the region. */
    mg_presence *other = mg_presence_redis_create(rc, ghost, region, 30);
    cr_assert(other);
    cr_assert_eq(other->ops->connect(other, user, "c1", mg_now_ms()), 0);
    mg_recsink r;
    mg_recsink_init(&r);
    mg_local_sink sink = mg_recsink_sink(&r);
    mg_router_config rcfg = {.gateway_id = "gw-a",
                             .region = region,
                             .hot_window_seconds = 10,
                             .hot_threshold = 100000,
                             .hot_capacity = 64,
                             .dedupe_window = 1024};
    mg_router *rt = mg_router_create(&rcfg, mg_presence_redis_create(rc, "gw-a", region, 30),
                                     mg_inbox_redis_create(rc, 100, 3600), &sink, NULL);
    mg_transport_nats_config cfg = {.urls = server(),
                                    .region = region,
                                    .gateway_id = "gw-a",
                                    .ack_wait_ms = 3000,
                                    .max_deliver = 3};
    mg_transport *t = mg_transport_nats_create(&cfg, err, sizeof(err));
    cr_assert(t, "%s", err);
    mg_router_set_transport(rt, MG_PATH_NATS, t);
    cr_assert_eq(mg_transport_nats_start_consumer(t, rt, err, sizeof(err)), 0, "%s", err);
    mg_deliver_outcome out = send_to(t, region, "parked-1", user, MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "%s", out.reason);
    int64_t end = mg_mono_ms() + 20000;
    while (nats_metric(MG_BUS_PARKED, NULL) < 1 && mg_mono_ms() < end)
        usleep(50 * 1000);
    cr_assert_eq(nats_metric(MG_BUS_PARKED, NULL), 1, "not parked after 3 deliveries");
    cr_assert_eq(nats_metric(MG_BUS_RETRIES, NULL), 2, "deliveries 1 and 2 NAKed");
    cr_assert_eq(nats_metric(MG_BUS_REDELIVERIES, NULL), 2);
    mg_inbox *ib = mg_router_inbox(rt);
    mg_msg **items = NULL;
    size_t n = 0;
    cr_assert_eq(ib->ops->fetch(ib, user, 10, &items, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_str_eq(items[0]->id, "parked-1");
    cr_assert_eq(ib->ops->ack(ib, user, "parked-1"), 0);
    mg_inbox_items_free(items, n);
    /* Acknowledged: never delivered again. */
    usleep(4000 * 1000);
    cr_assert_eq(nats_metric(MG_BUS_PARKED, NULL), 1);
    mg_transport_nats_stop(t, 5000);
    mg_presence *mine = mg_router_presence(rt);
    mine->ops->remove_gateway(mine);
    mg_router_free(rt);
    other->ops->remove_gateway(other);
    mg_presence_free(other);
    mg_recsink_destroy(&r);
    mg_redis_cluster_free(rc);
    delete_stream(server(), region);
}

/* A local sink that holds the writes of u0's deliveries until the test
 * releases them (other users' are written at once): u0's operations stay
 * in flight meanwhile. */
typedef struct held {
    pthread_mutex_t mu;
    char ids[8][32]; /* u0's delivered ids, in order */
    int n, out;      /* how many; how many not yet written */
    int overlap;     /* deliveries to u0 while another one was not written */
    int others;
    mg_written_fn written; /* the one held */
    void *warg;
} held;

static int held_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *warg)
{
    held *h = arg;
    pthread_mutex_lock(&h->mu);
    bool hold = !strcmp(msg->to, "u0") && written && h->n < 8;
    if (hold) {
        snprintf(h->ids[h->n++], sizeof(h->ids[0]), "%s", msg->id);
        h->overlap += h->out > 0;
        h->out++;
        h->written = written;
        h->warg = warg;
    } else {
        h->others++;
    }
    pthread_mutex_unlock(&h->mu);
    if (!hold && written)
        written(warg, 1);
    return 1;
}

static int held_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return 0;
}

/* Writes the held delivery (its operation answers: the message is acked). */
static void held_release(held *h)
{
    pthread_mutex_lock(&h->mu);
    mg_written_fn w = h->written;
    void *a = h->warg;
    h->written = NULL;
    h->out--;
    pthread_mutex_unlock(&h->mu);
    cr_assert_not_null(w);
    w(a, 1);
}

static bool held_wait(held *h, int n, int timeout_ms)
{
    for (int64_t end = mg_mono_ms() + timeout_ms;; usleep(5 * 1000)) {
        pthread_mutex_lock(&h->mu);
        bool ok = h->n >= n && h->written;
        pthread_mutex_unlock(&h->mu);
        if (ok || mg_mono_ms() >= end)
            return ok;
    }
}

static void *held_release_late(void *arg)
{
    usleep(500 * 1000); /* after the stop below began */
    held_release(arg);
    return NULL;
}

/* One recipient's messages fetched together are handled one at a time, in
 * stream order, while another recipient's go on; a stop with one still
 * waiting leaves it unacknowledged in the stream (freed here). */
Test(nats, a_recipients_messages_go_one_at_a_time_and_stop_leaves_the_waiting_ones)
{
    char region[64];
    region_name(region, sizeof(region), "chain");
    mg_transport *t = make_transport_at(server(), "gw-a", region, 1, 0);
    enum { N = 5 };
    for (int i = 0; i < N; i++) { /* published before the consumer: one fetch */
        char id[16];
        snprintf(id, sizeof(id), "m%d", i);
        cr_assert_eq(send_to(t, region, id, "u0", MG_PRIO_HIGH).status, MG_STATUS_QUEUED);
    }
    cr_assert_eq(send_to(t, region, "x0", "u1", MG_PRIO_HIGH).status, MG_STATUS_QUEUED);
    held h = {.mu = PTHREAD_MUTEX_INITIALIZER};
    mg_local_sink sink = {.deliver = held_deliver, .disconnect = held_disconnect, .arg = &h};
    mg_router *rt = mg_sink_router("gw-a", region, &sink, 2);
    mg_router_set_transport(rt, MG_PATH_NATS, t);
    char err[256] = "";
    cr_assert_eq(mg_transport_nats_start_consumer(t, rt, err, sizeof(err)), 0, "%s", err);
    for (int i = 0; i < N - 1; i++) {
        cr_assert(held_wait(&h, i + 1, 10000), "m%d never delivered (%d)", i, h.n);
        char id[16];
        snprintf(id, sizeof(id), "m%d", i);
        cr_assert_str_eq(h.ids[i], id, "delivery %d", i);
        if (i < N - 2)
            held_release(&h);
    }
    /* m3 is held, m4 waits behind it: stop; m3 is written meanwhile. */
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, held_release_late, &h), 0);
    mg_transport_nats_stop(t, 5000);
    pthread_join(th, NULL);
    cr_assert_eq(h.n, N - 1, "m4 was started after the stop");
    cr_assert_eq(h.overlap, 0, "two of u0's messages were out at once");
    cr_assert_eq(h.others, 1, "u1's message did not wait for u0's");
    /* m4: delivered to the consumer, never acknowledged; the others acked. */
    int64_t ack_pending, pending;
    wait_consumer(region, 1, 5000, NULL, &ack_pending, &pending);
    cr_assert_eq(ack_pending, 1, "unacknowledged: %lld", (long long)ack_pending);
    cr_assert_eq(pending, 0);
    mg_router_free(rt);
    delete_stream(server(), region);
}

Test(nats, unreachable_server_is_a_clear_error)
{
    char url[64];
    snprintf(url, sizeof(url), "nats://127.0.0.1:%d", mg_test_free_port());
    mg_transport_nats_config cfg = {.urls = url, .region = "r1", .gateway_id = "gw-a"};
    char err[256] = "";
    int64_t start = mg_mono_ms();
    cr_assert_null(mg_transport_nats_create(&cfg, err, sizeof(err)));
    cr_assert(strstr(err, "cannot connect to") && strstr(err, url), "err=%s", err);
    cr_assert_lt(mg_mono_ms() - start, 10000);
    /* No servers: inert, not available, deliver cannot even try. */
    mg_transport_nats_config none = {.urls = "", .region = "r1"};
    mg_transport *t = mg_transport_nats_create(&none, err, sizeof(err));
    cr_assert(t);
    cr_assert_not(t->ops->available(t, &(mg_route_target){"gw-b", "r1"}));
    mg_msg *m = mg_msg_new("m1", "a", "b", NULL, 0, NULL, 0, MG_PRIO_HIGH);
    mg_deliver_outcome out = {0};
    cr_assert_eq(mg_wait_deliver(t, &(mg_route_target){"gw-b", "r1"}, m, mg_mono_ms() + 100, &out),
                 -ENOTCONN);
    mg_msg_free(m);
    mg_transport_free(t);
}

/* ---- suite nats_gw: real gateways ---- */

typedef struct wsuser {
    mg_wsc *ws;
    pthread_t th;
    atomic_bool stop;
    pthread_mutex_t mu;
    mg_map *got; /* message id -> times shown */
    int total, dups;
    const char *seq; /* ids "<seq><i>" are checked to come in order of i (NULL: none) */
    int next_seq, disorder;
} wsuser;

static void *wsuser_main(void *arg)
{
    wsuser *u = arg;
    while (!atomic_load(&u->stop)) {
        char *f = mg_wsc_recv_text(u->ws, 100);
        if (!f)
            continue;
        json_t *j = json_loads(f, 0, NULL);
        free(f);
        const char *type = j ? json_string_value(json_object_get(j, "type")) : NULL;
        const char *id = j ? json_string_value(json_object_get(j, "id")) : NULL;
        if (type && id && !strcmp(type, "message")) {
            pthread_mutex_lock(&u->mu);
            intptr_t n = (intptr_t)mg_map_get(u->got, id);
            mg_map_put(u->got, id, (void *)(n + 1));
            u->total++;
            u->dups += n >= 1;
            size_t sl = u->seq ? strlen(u->seq) : 0;
            if (sl && n == 0 && !strncmp(id, u->seq, sl)) {
                int i = atoi(id + sl);
                u->disorder += i != u->next_seq;
                u->next_seq = i + 1;
            }
            pthread_mutex_unlock(&u->mu);
        }
        json_decref(j);
    }
    return NULL;
}

static void wsuser_start(wsuser *u, const mg_gw *gw, const char *name)
{
    memset(u, 0, sizeof(*u));
    pthread_mutex_init(&u->mu, NULL);
    u->got = mg_map_create(1024);
    u->ws = mg_wsc_connect_user(gw->ws_port, name, 3000, NULL);
    cr_assert_not_null(u->ws, "user %s cannot connect", name);
    cr_assert_eq(pthread_create(&u->th, NULL, wsuser_main, u), 0);
}

static void wsuser_stop(wsuser *u)
{
    atomic_store(&u->stop, true);
    pthread_join(u->th, NULL);
    mg_wsc_free(u->ws);
    mg_map_free(u->got);
    pthread_mutex_destroy(&u->mu);
}

static int wsuser_count(wsuser *u, const char *id)
{
    pthread_mutex_lock(&u->mu);
    int n = (int)(intptr_t)mg_map_get(u->got, id);
    pthread_mutex_unlock(&u->mu);
    return n;
}

/* A gateway of region in the fleet under service svc, on the NATS bus;
 * extra (NULL-terminated, up to 8) appended. */
static mg_gw *spawn_gw(const char *id, const char *region, const char *svc, const char *nats_url,
                       const char *const *extra)
{
    const char *args[16] = {
        "--nats-url", nats_url, "--nats-ack-wait-ms", "3000", "--presence-lease-seconds", "5"};
    int n = 6;
    for (int i = 0; extra && extra[i] && n < 15; i++)
        args[n++] = extra[i];
    args[n] = NULL;
    return mg_gw_spawn_fleet(id, svc, region, args);
}

Test(nats_gw, two_gateways_of_a_region_deliver_over_nats)
{
    char region[64], svc[64], id1[64], id2[64], user[64];
    region_name(region, sizeof(region), "gw2");
    snprintf(svc, sizeof(svc), "meshgate-nats%d", (int)getpid());
    snprintf(id1, sizeof(id1), "nats%d-g1", (int)getpid());
    snprintf(id2, sizeof(id2), "nats%d-g2", (int)getpid());
    snprintf(user, sizeof(user), "nats%d-bob", (int)getpid());
    /* nats first; a gateway whose consumer pulls a message for a user on
     * the other one forwards it by grpc (a queue never re-routes by a queue).
     * The default 256-frame outbound bound: each consumer hands bob one
     * message at a time (its chain per recipient). */
    const char *extra[] = {"--near-route", "nats,grpc,inbox", NULL};
    mg_gw *g1 = spawn_gw(id1, region, svc, server(), extra);
    cr_assert_not_null(g1);
    mg_gw *g2 = spawn_gw(id2, region, svc, server(), extra);
    cr_assert_not_null(g2);
    cr_assert(mg_gw_wait_peer(g1, id2, 20000), "g1 never listed g2");
    cr_assert(mg_gw_wait_peer(g2, id1, 20000), "g2 never listed g1");
    wsuser u;
    wsuser_start(&u, g2, user);
    usleep(300 * 1000); /* presence written */
    mg_grpc_client *cli = mg_grpc_client_create(g1->grpc_addr, NULL);
    enum { N = 50 };
    for (int i = 0; i < N; i++) {
        char id[48];
        snprintf(id, sizeof(id), "n2-%d", i);
        Meshgate__V1__SendMessageResponse *resp = NULL;
        char *details = NULL;
        grpc_status_code st = mg_tc_send(cli, "alice", user, id, "hi", 1, 10000, &resp, &details);
        cr_assert_eq(st, GRPC_STATUS_OK, "send %d: %s", i, details ? details : "");
        cr_assert_eq(resp->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED,
                     "send %d: status %d reason %s", i, resp->result->status, resp->result->reason);
        cr_assert_eq(resp->result->path, MESHGATE__V1__PATH__PATH_NATS);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        free(details);
    }
    int64_t end = mg_mono_ms() + 20000;
    while (mg_mono_ms() < end) {
        pthread_mutex_lock(&u.mu);
        int total = u.total;
        pthread_mutex_unlock(&u.mu);
        if (total >= N)
            break;
        usleep(50 * 1000);
    }
    usleep(500 * 1000);
    for (int i = 0; i < N; i++) {
        char id[48];
        snprintf(id, sizeof(id), "n2-%d", i);
        cr_assert_eq(wsuser_count(&u, id), 1, "%s shown %d times", id, wsuser_count(&u, id));
    }
    cr_assert_geq(mg_gw_metric(g1, "meshgate_bus_sent_total{bus=\"nats\"} "), N);
    cr_assert_eq(mg_gw_metric(g1, "meshgate_bus_received_total{bus=\"nats\"} ") +
                     mg_gw_metric(g2, "meshgate_bus_received_total{bus=\"nats\"} "),
                 N, "each message handled by one gateway of the region");

    /* A WebSocket sender that does not wait for its acks: its sends overlap
     * (the next starts once the one before was published); each is acked
     * QUEUED on its own and shown once. */
    enum { NW = 300 };
    char tx_user[64], prefix[80];
    snprintf(tx_user, sizeof(tx_user), "nats%d-ws", (int)getpid());
    snprintf(prefix, sizeof(prefix), "%s-p", user);
    mg_wsc *tx = mg_wsc_connect_user(g1->ws_port, tx_user, 3000, NULL);
    cr_assert_not_null(tx);
    mg_wsc_send_acked(tx, user, prefix, NW, "queued");
    mg_wsc_free(tx);
    for (int i = 0; i < NW; i++) {
        char id[112];
        snprintf(id, sizeof(id), "%s-%d", prefix, i);
        for (int w = 0; w < 400 && wsuser_count(&u, id) == 0; w++) /* 400 x 50 ms */
            usleep(50 * 1000);
        cr_assert_eq(wsuser_count(&u, id), 1, "%s shown %d times", id, wsuser_count(&u, id));
    }
    wsuser_stop(&u);
    mg_grpc_client_free(cli);
    cr_expect_eq(mg_gw_stop(g1), 0);
    cr_expect_eq(mg_gw_stop(g2), 0);
    mg_gw_free(g1);
    mg_gw_free(g2);
    delete_stream(server(), region);
}

/* The senders of the kill test: HIGH sends through g3 (another region, far
 * route nats), SENDERS threads at once; records which were answered QUEUED. */
#define SENDERS 4
typedef struct sender {
    mg_grpc_client *cli;
    const char *user;
    int n, no;
    atomic_int sent;
    char (*queued)[48];
    int nqueued;
    int other;       /* answered something else than QUEUED */
    char first[160]; /* the first of those */
} sender;

static void *sender_main(void *arg)
{
    sender *s = arg;
    for (int i = 0; i < s->n; i++) {
        char id[48];
        snprintf(id, sizeof(id), "k%d-%d", s->no, i);
        Meshgate__V1__SendMessageResponse *resp = NULL;
        grpc_status_code st = mg_tc_send(s->cli, "alice", s->user, id, "hi", 1, 10000, &resp, NULL);
        if (st == GRPC_STATUS_OK &&
            resp->result->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED)
            snprintf(s->queued[s->nqueued++], 48, "%s", id);
        else if (s->other++ == 0)
            snprintf(s->first, sizeof(s->first), "grpc %d, status %d: %s", (int)st,
                     resp ? (int)resp->result->status : -1,
                     resp && resp->result->reason ? resp->result->reason : "");
        if (resp)
            protobuf_c_message_free_unpacked(&resp->base, NULL);
        atomic_store(&s->sent, i + 1);
    }
    return NULL;
}

Test(nats_gw, killed_gateway_leaves_its_pulled_messages_to_the_region)
{
    char region[64], far[64], svc[64], id1[64], id2[64], id3[64], user[64];
    region_name(region, sizeof(region), "kill");
    region_name(far, sizeof(far), "killsrc");
    snprintf(svc, sizeof(svc), "meshgate-natsk%d", (int)getpid());
    snprintf(id1, sizeof(id1), "natsk%d-g1", (int)getpid());
    snprintf(id2, sizeof(id2), "natsk%d-g2", (int)getpid());
    snprintf(id3, sizeof(id3), "natsk%d-g3", (int)getpid());
    snprintf(user, sizeof(user), "natsk%d-bob", (int)getpid());
    /* The thaw below leaves a backlog for bob: g2 hands it to him one
     * message at a time, within the default outbound bound. */
    const char *near_args[] = {"--near-route", "nats,grpc,inbox", NULL};
    /* Never hot: a hot far pair would go by grpc first. */
    const char *far_args[] = {"--far-route", "nats,inbox", "--hot-threshold", "1000000", NULL};
    /* g1 waits long for g2's answers: what it forwards while g2 is frozen
     * stays in flight, unacknowledged, until g1 is killed. */
    const char *g1_args[] = {"--near-route",
                             "nats,grpc,inbox",
                             "--peer-deadline-ms",
                             "20000",
                             "--peer-max-inflight",
                             "4096",
                             NULL};
    mg_gw *g1 = spawn_gw(id1, region, svc, server(), g1_args);
    cr_assert_not_null(g1);
    mg_gw *g2 = spawn_gw(id2, region, svc, server(), near_args);
    cr_assert_not_null(g2);
    mg_gw *g3 = spawn_gw(id3, far, svc, server(), far_args);
    cr_assert_not_null(g3);
    cr_assert(mg_gw_wait_peer(g1, id2, 20000), "g1 never listed g2");
    wsuser u;
    wsuser_start(&u, g2, user);
    usleep(300 * 1000);

    enum { N = 1000 }; /* per sender */
    mg_grpc_client *cli = mg_grpc_client_create(g3->grpc_addr, NULL);
    sender s[SENDERS];
    pthread_t th[SENDERS];
    for (int k = 0; k < SENDERS; k++) {
        s[k] = (sender){.cli = cli, .user = user, .n = N, .no = k};
        s[k].queued = calloc(N, sizeof(*s[k].queued));
        cr_assert_eq(pthread_create(&th[k], NULL, sender_main, &s[k]), 0);
    }
    /* g1 consumes about half the region's traffic and forwards it to g2.
     * Mid-run g2 is frozen for 700 ms (SIGSTOP: it pulls nothing, and g1's
     * forwarding calls wait), so g1 pulls the region's messages and holds
     * them unacknowledged; then g1 is SIGKILLed and g2 thawed. */
    while (atomic_load(&s[0].sent) < N / 3)
        usleep(10 * 1000);
    double g1_consumed = mg_gw_metric(g1, "meshgate_bus_received_total{bus=\"nats\"} ");
    mg_gw_kill(g2, SIGSTOP);
    usleep(700 * 1000);
    mg_gw_kill(g1, SIGKILL);
    mg_gw_kill(g2, SIGCONT);
    cr_assert(mg_gw_wait(g1, 5000));
    int nq = 0, other = 0;
    for (int k = 0; k < SENDERS; k++) {
        pthread_join(th[k], NULL);
        nq += s[k].nqueued;
        other += s[k].other;
    }
    cr_assert_gt(nq, SENDERS * N * 9 / 10, "only %d of %d queued (%d not, e.g. %s)", nq,
                 SENDERS * N, other, s[0].first[0] ? s[0].first : s[1].first);
    /* Redelivery after the ack wait (3 s): every QUEUED message is shown. */
    int64_t end = mg_mono_ms() + 30000;
    int missing = nq;
    while (missing > 0 && mg_mono_ms() < end) {
        missing = 0;
        for (int k = 0; k < SENDERS; k++)
            for (int i = 0; i < s[k].nqueued; i++)
                missing += wsuser_count(&u, s[k].queued[i]) == 0;
        if (missing)
            usleep(200 * 1000);
    }
    cr_assert_eq(missing, 0, "%d of %d QUEUED messages never shown", missing, nq);
    /* What g1 forwarded before it died may have reached bob already; the
     * stream redelivers it to g2 after the ack wait all the same. */
    double redelivered = 0;
    for (int64_t until = mg_mono_ms() + 15000; redelivered == 0 && mg_mono_ms() < until;) {
        redelivered = mg_gw_metric(g2, "meshgate_bus_redeliveries_total{bus=\"nats\"} ");
        if (redelivered == 0)
            usleep(200 * 1000);
    }
    usleep(1000 * 1000); /* the redelivered ones are handled (and not shown again) */
    pthread_mutex_lock(&u.mu);
    int dups = u.dups;
    pthread_mutex_unlock(&u.mu);
    cr_assert_eq(dups, 0, "%d messages shown twice", dups);
    fprintf(stderr,
            "nats kill: %d queued, g1 had handled %.0f before SIGKILL, g2 received %.0f "
            "redeliveries\n",
            nq, g1_consumed, redelivered);
    cr_assert_gt(redelivered, 0, "g1's unacknowledged messages came back to g2");

    wsuser_stop(&u);
    mg_grpc_client_free(cli);
    for (int k = 0; k < SENDERS; k++)
        free(s[k].queued);
    cr_expect_eq(mg_gw_stop(g2), 0);
    cr_expect_eq(mg_gw_stop(g3), 0);
    mg_gw_free(g1);
    mg_gw_free(g2);
    mg_gw_free(g3);
    delete_stream(server(), region);
    delete_stream(server(), far);
}

/* A backlog for one user (published while his gateway is frozen) reaches
 * him one message at a time, within the default outbound bounds (256
 * frames, 1 MiB): every message once, in publish order, and his
 * connection stays open. Without the consumer's chain per recipient a
 * fetch lands on his queue at once and he is closed with 4008. */
Test(nats_gw, a_backlog_for_one_user_is_paced_in_order)
{
    char region[64], svc[64], id[64], user[64], seq[80];
    region_name(region, sizeof(region), "burst");
    snprintf(svc, sizeof(svc), "meshgate-natsb%d", (int)getpid());
    snprintf(id, sizeof(id), "natsb%d-g1", (int)getpid());
    snprintf(user, sizeof(user), "natsb%d-bob", (int)getpid());
    snprintf(seq, sizeof(seq), "%s-b", user);
    /* bob's presence outlives the freeze */
    const char *args[] = {"--presence-lease-seconds", "30", NULL};
    mg_gw *g = spawn_gw(id, region, svc, server(), args);
    cr_assert_not_null(g);
    wsuser u;
    wsuser_start(&u, g, user);
    pthread_mutex_lock(&u.mu);
    u.seq = seq;
    pthread_mutex_unlock(&u.mu);
    mg_transport *pub = make_transport_at(server(), "natsb-pub", region, 1, 0);
    /* A first message shown: bob's presence is written and g consumes. */
    char probe[112];
    snprintf(probe, sizeof(probe), "%s-probe", user);
    cr_assert_eq(send_to(pub, region, probe, user, MG_PRIO_HIGH).status, MG_STATUS_QUEUED);
    for (int64_t end = mg_mono_ms() + 10000; !wsuser_count(&u, probe) && mg_mono_ms() < end;)
        usleep(20 * 1000);
    cr_assert_eq(wsuser_count(&u, probe), 1, "the probe was never shown");

    /* About 4 fetches of 256, each 2 MiB: well past the bounds of 256 frames
     * and 1 MiB when a fetch lands on bob's queue at once. */
    enum { N = 1000, BODY = 8192 };
    char *body = malloc(BODY);
    memset(body, 'x', BODY);
    mg_gw_kill(g, SIGSTOP);
    for (int i = 0; i < N; i++) {
        char mid[112];
        snprintf(mid, sizeof(mid), "%s%d", seq, i);
        mg_deliver_outcome out = send_body(pub, region, mid, user, MG_PRIO_HIGH, body, BODY);
        cr_assert_eq(out.status, MG_STATUS_QUEUED, "send %d: %s", i, out.reason);
    }
    mg_gw_kill(g, SIGCONT);
    free(body);
    int total = 0;
    for (int64_t end = mg_mono_ms() + 30000; total < N + 1 && mg_mono_ms() < end;) {
        usleep(50 * 1000);
        pthread_mutex_lock(&u.mu);
        total = u.total;
        pthread_mutex_unlock(&u.mu);
        if (mg_wsc_close_code(u.ws) != 0)
            break;
    }
    cr_assert_eq(mg_wsc_close_code(u.ws), 0, "bob's connection was closed (%d) after %d messages",
                 mg_wsc_close_code(u.ws), total);
    for (int i = 0; i < N; i++) {
        char mid[112];
        snprintf(mid, sizeof(mid), "%s%d", seq, i);
        cr_assert_eq(wsuser_count(&u, mid), 1, "%s shown %d times", mid, wsuser_count(&u, mid));
    }
    pthread_mutex_lock(&u.mu);
    int disorder = u.disorder, dups = u.dups;
    pthread_mutex_unlock(&u.mu);
    cr_assert_eq(disorder, 0, "%d messages out of publish order", disorder);
    cr_assert_eq(dups, 0);
    cr_assert_eq(mg_gw_metric(g, "meshgate_ws_slow_consumer_closes_total "), 0);
    mg_transport_free(pub);
    wsuser_stop(&u);
    cr_expect_eq(mg_gw_stop(g), 0);
    mg_gw_free(g);
    delete_stream(server(), region);
}

/* A gateway frozen again and again while it drains a backlog (SIGSTOP for
 * longer than a fetch waits): its fetches give up while the server's
 * answers sit in the socket, and those come after, into the subscription,
 * where the next fetch finds them. Debian's nats.c 3.4 overran its array
 * when that was more than half a batch (transport_nats.c, fetch); the
 * gateway must take them all, stay up and lose none. */
Test(nats_gw, late_answers_of_a_frozen_gateways_fetches_are_taken_whole)
{
    char region[64], svc[64], id[64];
    region_name(region, sizeof(region), "late");
    snprintf(svc, sizeof(svc), "meshgate-natsl%d", (int)getpid());
    snprintf(id, sizeof(id), "natsl%d-g1", (int)getpid());
    mg_gw *g = spawn_gw(id, region, svc, server(), NULL);
    cr_assert_not_null(g);
    mg_transport *pub = make_transport_at(server(), "natsl-pub", region, 1, 0);
    /* Offline users (each message ends in the inbox and is acknowledged),
     * 8 KiB each: a full fetch is 2 MiB, some milliseconds on the wire. */
    enum { N = 3000, USERS = 100, BODY = 8192 };
    char *body = malloc(BODY);
    memset(body, 'x', BODY);
    mg_gw_kill(g, SIGSTOP);
    for (int i = 0; i < N; i++) {
        char mid[64], user[64];
        snprintf(mid, sizeof(mid), "late-%d", i);
        snprintf(user, sizeof(user), "natsl%d-u%d", (int)getpid(), i % USERS);
        mg_deliver_outcome out = send_body(pub, region, mid, user, MG_PRIO_HIGH, body, BODY);
        cr_assert_eq(out.status, MG_STATUS_QUEUED, "send %d: %s", i, out.reason);
    }
    free(body);
    /* 40 turns of 20 ms running, 250 ms frozen (a fetch waits 200 ms). */
    for (int k = 0; k < 40; k++) {
        mg_gw_kill(g, SIGCONT);
        usleep(20 * 1000);
        mg_gw_kill(g, SIGSTOP);
        usleep(250 * 1000);
    }
    mg_gw_kill(g, SIGCONT);
    /* every message acknowledged: nothing pending, nothing waiting for an ack */
    int64_t ack_pending, pending;
    wait_consumer(region, 0, 60000, g, &ack_pending, &pending);
    cr_assert_eq(pending, 0, "never fetched: %lld", (long long)pending);
    cr_assert_eq(ack_pending, 0, "never acknowledged: %lld", (long long)ack_pending);
    double got = mg_gw_metric(g, "meshgate_bus_received_total{bus=\"nats\"} ");
    cr_assert_geq(got, N, "received %.0f of %d", got, N);
    mg_transport_free(pub);
    cr_assert_eq(mg_gw_stop(g), 0, "the gateway's exit (an ASan report is a failure)");
    cr_assert_not(mg_gw_log_contains(g, "AddressSanitizer"));
    mg_gw_free(g);
    delete_stream(server(), region);
}

Test(nats_gw, unreachable_server_at_start_exits_naming_it)
{
    char url[64];
    snprintf(url, sizeof(url), "nats://127.0.0.1:%d", mg_test_free_port());
    const char *args[] = {"--nats-url", url, NULL};
    mg_gw *g = mg_gw_spawn_nowait("nats-down", args);
    cr_assert_not_null(g);
    cr_assert(mg_gw_wait(g, 20000), "the gateway should exit at start");
    cr_assert_neq(g->exit_status, 0);
    char needle[96];
    snprintf(needle, sizeof(needle), "cannot connect to %s", url);
    cr_assert(mg_gw_log_contains(g, needle), "the log names %s", url);
    mg_gw_free(g);
}

/* ---- suite nats_cluster: a 3-node JetStream cluster of its own ---- */

static char cluster_run[256];

static int cluster_cmd(const char *what)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd),
             "MESHGATE_RUN=%s %s/tests/infra/nats.sh %s >>%s/nats-cluster.out 2>&1", cluster_run,
             MG_SOURCE_DIR, what, cluster_run);
    return system(cmd);
}

static void cluster_up(void)
{
    const char *run = getenv("MESHGATE_RUN");
    snprintf(cluster_run, sizeof(cluster_run), "%s/nats-cluster-test",
             run && *run ? run : "/tmp/meshgate-run");
    mkdir(cluster_run, 0755);
    cr_assert_eq(cluster_cmd("start-cluster"), 0, "cannot start the 3-node cluster (see %s)",
                 cluster_run);
}

static void cluster_down(void)
{
    cluster_cmd("stop-cluster"); /* every server this suite started */
    mg_metrics_shutdown();
}

TestSuite(nats_cluster, .init = cluster_up, .fini = cluster_down, .timeout = 240);

typedef struct publisher {
    mg_transport *t;
    const char *region;
    int n;
    atomic_int sent;
    char (*queued)[32];
    int nqueued, other;
    char first_reason[128]; /* of the first send not QUEUED */
} publisher;

static void *publisher_main(void *arg)
{
    publisher *p = arg;
    for (int i = 0; i < p->n; i++) {
        char id[32], user[16];
        snprintf(id, sizeof(id), "c%d", i);
        snprintf(user, sizeof(user), "u%d", i % 10);
        mg_deliver_outcome out = send_to(p->t, p->region, id, user, MG_PRIO_HIGH);
        if (out.status == MG_STATUS_QUEUED)
            snprintf(p->queued[p->nqueued++], 32, "%s", id);
        else if (p->other++ == 0)
            snprintf(p->first_reason, sizeof(p->first_reason), "%s", out.reason);
        atomic_store(&p->sent, i + 1);
        usleep(1000);
    }
    return NULL;
}

Test(nats_cluster, r3_stream_survives_a_node_killed_mid_run)
{
    /* Node 1 only: the client learns the others from the cluster, and node 1
     * is the one killed, so the connection must fail over mid-run. */
    const char *urls = "nats://127.0.0.1:14223";
    char region[64];
    region_name(region, sizeof(region), "r3");
    mg_recsink r;
    mg_recsink_init(&r);
    mg_router *rt = NULL;
    mg_transport *t = consumer_at(urls, "gw-a", region, &r, 10, 3, 0, &rt);
    enum { N = 3000 };
    publisher p = {.t = t, .region = region, .n = N};
    p.queued = calloc(N + 1, sizeof(*p.queued));
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, publisher_main, &p), 0);
    while (atomic_load(&p.sent) < N / 3)
        usleep(10 * 1000);
    cr_assert_eq(cluster_cmd("kill-node 1"), 0, "kill node 1");
    pthread_join(th, NULL);
    cr_assert_gt(p.nqueued, N / 3 - 50, "only %d of %d queued (%d not, first: %s)", p.nqueued, N,
                 p.other, p.first_reason);
    /* The bus is back: a send is QUEUED again within 30 s of the run's end. */
    mg_deliver_outcome out = {0};
    char after[32] = "";
    for (int64_t until = mg_mono_ms() + 30000;
         out.status != MG_STATUS_QUEUED && mg_mono_ms() < until;) {
        snprintf(after, sizeof(after), "after-%lld", (long long)mg_mono_ms());
        out = send_to(t, region, after, "u0", MG_PRIO_HIGH);
        if (out.status != MG_STATUS_QUEUED)
            usleep(200 * 1000);
    }
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "not recovered: %s", out.reason);
    snprintf(p.queued[p.nqueued++], 32, "%s", after);
    int64_t end = mg_mono_ms() + 60000;
    int missing = p.nqueued;
    while (missing > 0 && mg_mono_ms() < end) {
        missing = 0;
        for (int i = 0; i < p.nqueued; i++)
            missing += mg_recsink_count(&r, p.queued[i]) == 0;
        if (missing)
            usleep(200 * 1000);
    }
    cr_assert_eq(missing, 0, "%d of %d QUEUED messages never delivered", missing, p.nqueued);
    for (int i = 0; i < p.nqueued; i++)
        cr_assert_eq(mg_recsink_count(&r, p.queued[i]), 1, "%s delivered %d times", p.queued[i],
                     mg_recsink_count(&r, p.queued[i]));
    fprintf(stderr,
            "nats R3 node kill: %d of %d queued, %d not (first: %s), all queued delivered once\n",
            p.nqueued, N, p.other, p.first_reason);
    mg_transport_nats_stop(t, 5000);
    mg_router_free(rt);
    mg_recsink_destroy(&r);
    free(p.queued);
    delete_stream(urls, region);
}
