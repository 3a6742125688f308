/* Tests of the gRPC peer transport (src/router/transport_grpc.c) against a
 * REAL peer: the meshgate binary of this build, put into a peer table by
 * hand, with a WebSocket client connected to it; and against raw TCP
 * servers in this process that answer garbage or never answer. */
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "discovery/peers.h"
#include "router/transport_grpc.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include "support/mg_wait.h"

#include <criterion/criterion.h>
#include <grpc/grpc_security.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- helpers -------------------------------------------------------------- */

static void set_peer(mg_peers *peers, const char *id, const char *addr)
{
    mg_peer p = {.id = (char *)id, .address = (char *)addr, .region = "r1", .version = ""};
    mg_peers_update(peers, &p, 1);
}

static mg_msg *text_msg(const char *id, const char *to)
{
    return mg_msg_new(id, "alice", to, (const uint8_t *)"hello", 5, "text/plain", mg_now_ms(),
                      MG_PRIO_HIGH);
}

static mg_wsc *ws_user(const mg_gw *gw, const char *user)
{
    char url[160];
    snprintf(url, sizeof(url), "ws://%s/ws?user=%s", gw->ws_addr, user);
    int st = 0;
    mg_wsc *c = mg_wsc_connect(url, NULL, 3000, &st);
    cr_assert_not_null(c, "ws connect %s: http status %d", url, st);
    return c;
}

/* Reads frames until a "message" frame carrying id, or timeout. */
static bool ws_got(mg_wsc *c, const char *id, int timeout_ms)
{
    int64_t end = mg_mono_ms() + timeout_ms;
    char needle[160];
    snprintf(needle, sizeof(needle), "\"id\":\"%s\"", id);
    while (mg_mono_ms() < end) {
        char *f = mg_wsc_recv_text(c, (int)(end - mg_mono_ms()));
        if (!f)
            return false;
        bool hit = strstr(f, "\"type\":\"message\"") && strstr(f, needle);
        free(f);
        if (hit)
            return true;
    }
    return false;
}

static int deliver(mg_transport *t, const char *peer, const char *id, const char *to,
                   int64_t deadline_ms, mg_deliver_outcome *out)
{
    mg_route_target tg = {peer, "r1"};
    mg_msg *m = text_msg(id, to);
    int rc = mg_wait_deliver(t, &tg, m, deadline_ms, out);
    mg_msg_free(m);
    return rc;
}

static bool avail(mg_transport *t, const char *peer)
{
    mg_route_target tg = {peer, "r1"};
    return t->ops->available(t, &tg);
}

/* ---- a raw TCP "peer" that answers garbage or nothing --------------------- */

struct raw_server {
    int fd, port;
    bool garbage;
    atomic_bool stop;
    pthread_t th;
    int conns[64];
    int nconns;
};

static void *raw_main(void *arg)
{
    struct raw_server *s = arg;
    while (!atomic_load(&s->stop)) {
        struct pollfd p = {.fd = s->fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0)
            continue;
        int c = accept(s->fd, NULL, NULL);
        if (c < 0)
            continue;
        if (s->garbage) {
            static const char junk[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\n"
                                       "\xff\xfe\x00junk\x01\x02\x03\x04\x05\x06\x07\x08";
            ssize_t w = write(c, junk, sizeof(junk) - 1);
            (void)w;
        }
        if (s->nconns < 64)
            s->conns[s->nconns++] = c; /* held open (a hanging peer never answers) */
        else
            close(c);
    }
    return NULL;
}

static struct raw_server *raw_start(bool garbage)
{
    struct raw_server *s = calloc(1, sizeof(*s));
    s->garbage = garbage;
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    cr_assert(bind(s->fd, (struct sockaddr *)&a, sizeof(a)) == 0);
    cr_assert(listen(s->fd, 16) == 0);
    getsockname(s->fd, (struct sockaddr *)&a, &len);
    s->port = ntohs(a.sin_port);
    pthread_create(&s->th, NULL, raw_main, s);
    return s;
}

static void raw_stop(struct raw_server *s)
{
    atomic_store(&s->stop, true);
    pthread_join(s->th, NULL);
    for (int i = 0; i < s->nconns; i++)
        close(s->conns[i]);
    close(s->fd);
    free(s);
}

static mg_transport *make_transport(mg_peers *peers, int deadline_ms, int max_inflight,
                                    int min_samples, int probe_ms)
{
    mg_transport_grpc_config cfg = {
        .gateway_id = "self-test",
        .region = "r1",
        .peer_deadline_ms = deadline_ms,
        .peer_max_inflight = max_inflight,
        .cq_threads = 1,
        .link = {.min_samples = min_samples, .probe_interval_ms = probe_ms},
    };
    return mg_transport_grpc_create(peers, &cfg);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* ---- tests ---------------------------------------------------------------- */

Test(transport_grpc, delivers_to_a_real_peer_and_reports_not_connected, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("tg-peer1", NULL);
    cr_assert_not_null(gw);
    mg_wsc *bob = ws_user(gw, "bob");
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "peer1", gw->grpc_addr);
    mg_transport *t = make_transport(peers, 1000, 0, 0, 0);

    cr_expect(avail(t, "peer1"));
    cr_expect_not(avail(t, "nobody"), "a peer not in the table is not available");

    /* The WebSocket registration races the first call: retry briefly. */
    mg_deliver_outcome out;
    int64_t end = mg_mono_ms() + 3000;
    do {
        cr_assert_eq(deliver(t, "peer1", "m-1", "bob", mg_mono_ms() + 1000, &out), 0);
        if (out.status == MG_STATUS_DELIVERED)
            break;
        usleep(20000);
    } while (mg_mono_ms() < end);
    cr_assert_eq(out.status, MG_STATUS_DELIVERED, "reason=%s", out.reason);
    cr_expect_eq(out.connections, 1);
    cr_expect(ws_got(bob, "m-1", 2000), "bob received m-1 over the peer path");

    /* A retry of the same id is answered DELIVERED (duplicate) and not
     * written again. */
    cr_assert_eq(deliver(t, "peer1", "m-1", "bob", mg_mono_ms() + 1000, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_DELIVERED);
    cr_expect_eq(out.connections, 0);
    cr_expect_not(ws_got(bob, "m-1", 300), "a duplicate must not reach the device");

    /* Nobody called carol on that gateway. */
    cr_assert_eq(deliver(t, "peer1", "m-2", "carol", mg_mono_ms() + 1000, &out), 0);
    cr_expect(out.not_connected);
    cr_expect_neq(out.status, MG_STATUS_DELIVERED);

    /* Unknown peer: FAILED at once, no call. */
    cr_assert_eq(deliver(t, "nobody", "m-3", "bob", mg_mono_ms() + 1000, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect(strstr(out.reason, "peer nobody: unknown peer"), "reason=%s", out.reason);

    /* Latency of the direct path (loopback, sequential calls). */
    enum { N = 300 };
    static int64_t lat[N];
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "lat-%d", i);
        int64_t s = mg_mono_us();
        deliver(t, "peer1", id, "bob", mg_mono_ms() + 1000, &out);
        lat[i] = mg_mono_us() - s;
        cr_assert_eq(out.status, MG_STATUS_DELIVERED, "i=%d reason=%s", i, out.reason);
    }
    qsort(lat, N, sizeof(lat[0]), cmp_i64);
    printf("grpc peer DeliverMessage latency over loopback: p50=%.3f ms p99=%.3f ms max=%.3f ms "
           "(n=%d)\n",
           lat[N / 2] / 1000.0, lat[N * 99 / 100] / 1000.0, lat[N - 1] / 1000.0, N);
    fflush(stdout);

    /* Metrics recorded per peer and result. */
    char *m = mg_metrics_render(NULL);
    cr_expect(strstr(m, "meshgate_peer_calls_total{peer=\"peer1\",result=\"delivered\"}"));
    cr_expect(strstr(m, "meshgate_peer_calls_total{peer=\"peer1\",result=\"not_connected\"} 1"));
    cr_expect(strstr(m, "meshgate_peer_degraded{peer=\"peer1\"} 0"));
    cr_expect(strstr(m, "meshgate_peer_latency_seconds_bucket{peer=\"peer1\""));
    free(m);

    /* DisconnectLocal closes bob's connection on the peer. */
    mg_route_target tg = {"peer1", "r1"};
    int n = t->ops->disconnect(t, &tg, "bob", NULL, 4001, "test", mg_mono_ms() + 1000);
    cr_expect_eq(n, 1);
    cr_expect_eq(mg_wsc_wait_close(bob, 2000), 4001);

    mg_transport_free(t);
    mg_peers_free(peers);
    mg_wsc_free(bob);
    cr_expect_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

static void expect_fails_within(mg_transport *t, const char *peer, int64_t budget_ms,
                                int64_t slack_ms, const char *what)
{
    mg_deliver_outcome out;
    int64_t s = mg_mono_ms();
    cr_assert_eq(deliver(t, peer, "g-1", "bob", s + budget_ms, &out), 0);
    int64_t took = mg_mono_ms() - s;
    cr_expect_eq(out.status, MG_STATUS_FAILED, "%s: status %d", what, out.status);
    cr_expect_not(out.not_connected);
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "peer %s: ", peer);
    cr_expect(!strncmp(out.reason, prefix, strlen(prefix)), "%s: reason=%s", what, out.reason);
    cr_expect_leq(took, budget_ms + slack_ms, "%s: took %lld ms (reason=%s)", what, (long long)took,
                  out.reason);
    printf("%s: failed in %lld ms: %s\n", what, (long long)took, out.reason);
    fflush(stdout);
}

Test(transport_grpc, a_peer_answering_garbage_fails_within_the_deadline, .timeout = 30)
{
    struct raw_server *raw = raw_start(true);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", raw->port);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "junk", addr);
    mg_transport *t = make_transport(peers, 400, 0, 0, 0);
    for (int i = 0; i < 3; i++)
        expect_fails_within(t, "junk", 400, 150, "garbage peer");
    mg_transport_free(t);
    mg_peers_free(peers);
    raw_stop(raw);
}

Test(transport_grpc, a_hanging_peer_fails_with_deadline_exceeded, .timeout = 30)
{
    struct raw_server *raw = raw_start(false);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", raw->port);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "hang", addr);
    /* The peer deadline (300 ms) is tighter than the router's (2 s). */
    mg_transport *t = make_transport(peers, 300, 0, 0, 0);
    mg_deliver_outcome out;
    int64_t s = mg_mono_ms();
    cr_assert_eq(deliver(t, "hang", "h-1", "bob", s + 2000, &out), 0);
    int64_t took = mg_mono_ms() - s;
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect(strstr(out.reason, "peer hang: DEADLINE_EXCEEDED"), "reason=%s", out.reason);
    cr_expect_geq(took, 250);
    cr_expect_leq(took, 450, "took %lld ms", (long long)took);
    /* And the router's deadline when it is the tighter one. */
    s = mg_mono_ms();
    cr_assert_eq(deliver(t, "hang", "h-2", "bob", s + 100, &out), 0);
    took = mg_mono_ms() - s;
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect_leq(took, 250, "took %lld ms", (long long)took);
    mg_transport_free(t);
    mg_peers_free(peers);
    raw_stop(raw);
}

/* Whether pid reached the stopped state (/proc/<pid>/stat state T) in 2 s:
 * kill(SIGSTOP) returns before every thread of the target has stopped. */
static bool wait_stopped(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    for (int i = 0; i < 200; i++) {
        FILE *f = fopen(path, "r");
        char buf[512] = "";
        if (f) {
            size_t n = fread(buf, 1, sizeof(buf) - 1, f);
            buf[n] = '\0';
            fclose(f);
        }
        const char *p = strrchr(buf, ')');
        if (p && p[1] == ' ' && (p[2] == 'T' || p[2] == 't'))
            return true;
        usleep(10 * 1000);
    }
    return false;
}

struct bg_call {
    mg_transport *t;
    const char *peer;
    int64_t budget_ms;
    mg_deliver_outcome out;
    int64_t took_ms;
};

static void *bg_deliver(void *arg)
{
    struct bg_call *b = arg;
    int64_t s = mg_mono_ms();
    deliver(b->t, b->peer, "bg-1", "bob", s + b->budget_ms, &b->out);
    b->took_ms = mg_mono_ms() - s;
    return NULL;
}

Test(transport_grpc, a_peer_killed_mid_flight_fails_unavailable_quickly, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("tg-peer2", NULL);
    cr_assert_not_null(gw);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "peer2", gw->grpc_addr);
    mg_transport *t = make_transport(peers, 5000, 0, 0, 0);
    mg_deliver_outcome out;
    cr_assert_eq(deliver(t, "peer2", "k-0", "bob", mg_mono_ms() + 2000, &out), 0);
    cr_assert(out.not_connected, "the channel works before the kill: %s", out.reason);

    /* Freeze the peer so the next call is in flight, then kill it. */
    mg_gw_kill(gw, SIGSTOP);
    cr_assert(wait_stopped(gw->pid), "the peer is frozen");
    struct bg_call b = {.t = t, .peer = "peer2", .budget_ms = 5000};
    pthread_t th;
    pthread_create(&th, NULL, bg_deliver, &b);
    usleep(300 * 1000);
    mg_gw_kill(gw, SIGKILL);
    pthread_join(th, NULL);
    cr_expect_eq(b.out.status, MG_STATUS_FAILED);
    cr_expect_not(b.out.not_connected, "a frozen peer cannot answer (took %lld ms)",
                  (long long)b.took_ms);
    cr_expect(strstr(b.out.reason, "peer peer2: UNAVAILABLE"), "reason=%s", b.out.reason);
    cr_expect_leq(b.took_ms, 300 + 1000, "took %lld ms after a 300 ms freeze",
                  (long long)b.took_ms);
    printf("killed mid-flight: failed after %lld ms (300 ms of it frozen): %s\n",
           (long long)b.took_ms, b.out.reason);

    /* Calls after the kill fail fast too. */
    int64_t s = mg_mono_ms();
    cr_assert_eq(deliver(t, "peer2", "k-2", "bob", s + 5000, &out), 0);
    int64_t took = mg_mono_ms() - s;
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect(strstr(out.reason, "UNAVAILABLE"), "reason=%s", out.reason);
    cr_expect_leq(took, 1000, "took %lld ms", (long long)took);
    printf("after the kill: failed in %lld ms: %s\n", (long long)took, out.reason);
    fflush(stdout);

    mg_transport_free(t);
    mg_peers_free(peers);
    mg_gw_wait(gw, 2000);
    mg_gw_free(gw);
}

Test(transport_grpc, in_flight_bound_refuses_with_busy, .timeout = 30)
{
    struct raw_server *raw = raw_start(false);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", raw->port);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "slow", addr);
    mg_transport *t = make_transport(peers, 600, 1, 0, 0);
    cr_expect(avail(t, "slow"));
    struct bg_call b = {.t = t, .peer = "slow", .budget_ms = 600};
    pthread_t th;
    pthread_create(&th, NULL, bg_deliver, &b);
    usleep(150 * 1000);
    cr_expect_not(avail(t, "slow"), "one call in flight of at most one");
    mg_deliver_outcome out;
    int64_t s = mg_mono_ms();
    cr_assert_eq(deliver(t, "slow", "b-2", "bob", s + 600, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect_str_eq(out.reason, "peer slow: busy");
    cr_expect_leq(mg_mono_ms() - s, 20, "busy is answered at once");
    pthread_join(th, NULL);
    cr_expect_eq(b.out.status, MG_STATUS_FAILED);
    cr_expect(avail(t, "slow"), "the slot is free again");
    char *m = mg_metrics_render(NULL);
    cr_expect(strstr(m, "meshgate_peer_calls_total{peer=\"slow\",result=\"busy\"} 1"));
    free(m);
    mg_transport_free(t);
    mg_peers_free(peers);
    raw_stop(raw);
}

Test(transport_grpc, degraded_peer_is_routed_around_then_probed_back, .timeout = 60)
{
    /* "flip" starts at a port nobody listens on (UNAVAILABLE at once). */
    int dead = mg_test_free_port();
    char dead_addr[64];
    snprintf(dead_addr, sizeof(dead_addr), "127.0.0.1:%d", dead);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "flip", dead_addr);
    mg_transport *t = make_transport(peers, 300, 0, 4, 400);
    mg_deliver_outcome out;
    int calls = 0;
    while (avail(t, "flip") && calls < 20) {
        deliver(t, "flip", "f-1", "bob", mg_mono_ms() + 300, &out);
        cr_expect_eq(out.status, MG_STATUS_FAILED);
        calls++;
    }
    cr_expect_leq(calls, 4, "degraded after min_samples failures (%d calls)", calls);
    cr_expect_not(avail(t, "flip"), "degraded: no calls until the probe interval passes");
    char *m = mg_metrics_render(NULL);
    cr_expect(strstr(m, "meshgate_peer_degraded{peer=\"flip\"} 1"), "metrics:\n%s", m);
    free(m);

    /* The peer comes back (here: at a new address, a real gateway). */
    mg_gw *gw = mg_gw_spawn("tg-peer3", NULL);
    cr_assert_not_null(gw);
    mg_wsc *bob = ws_user(gw, "bob");
    set_peer(peers, "flip", gw->grpc_addr);
    int64_t end = mg_mono_ms() + 3000;
    bool probed = false;
    while (mg_mono_ms() < end && !(probed = avail(t, "flip")))
        usleep(20 * 1000);
    cr_assert(probed, "a probe is granted within the interval");
    cr_expect_not(avail(t, "flip"), "one probe per interval");
    cr_assert_eq(deliver(t, "flip", "f-2", "bob", mg_mono_ms() + 1000, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_DELIVERED, "reason=%s", out.reason);
    cr_expect(avail(t, "flip"), "recovered after a good probe");
    cr_expect(avail(t, "flip"));
    m = mg_metrics_render(NULL);
    cr_expect(strstr(m, "meshgate_peer_degraded{peer=\"flip\"} 0"));
    free(m);

    mg_transport_free(t);
    mg_peers_free(peers);
    mg_wsc_free(bob);
    cr_expect_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* ---- a real gRPC server that answers OK with bytes that do not decode, or
 * accepts calls and never answers ------------------------------------------- */

enum { EV_NEW = 1, EV_DONE, EV_SHUTDOWN };

struct fake_ev {
    int kind;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
    int cancelled;
};

struct fake_grpc {
    grpc_server *srv;
    grpc_completion_queue *cq;
    pthread_t th;
    int port;
    bool hang;
    bool old; /* a gateway of before DeliverMany: UNIMPLEMENTED to it, DELIVERED to the rest */
    atomic_int calls, many_calls;
    atomic_bool shut; /* the shutdown tag came out of the queue */
};

static void fake_request(struct fake_grpc *f)
{
    struct fake_ev *ev = calloc(1, sizeof(*ev));
    ev->kind = EV_NEW;
    grpc_call_details_init(&ev->details);
    grpc_metadata_array_init(&ev->md);
    grpc_server_request_call(f->srv, &ev->call, &ev->details, &ev->md, f->cq, f->cq, ev);
}

static void *fake_main(void *arg)
{
    struct fake_grpc *f = arg;
    fake_request(f);
    for (;;) {
        grpc_event e = grpc_completion_queue_next(f->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (e.type == GRPC_QUEUE_SHUTDOWN)
            break;
        struct fake_ev *ev = e.tag;
        if (ev->kind == EV_SHUTDOWN) {
            atomic_store(&f->shut, true);
            continue;
        }
        if (ev->kind == EV_NEW) {
            bool many = !grpc_slice_str_cmp(ev->details.method, MG_PEER_RPC_DELIVER_MANY);
            grpc_call_details_destroy(&ev->details);
            grpc_metadata_array_destroy(&ev->md);
            if (!e.success) { /* server shutting down */
                free(ev);
                continue;
            }
            atomic_fetch_add(&f->calls, 1);
            fake_request(f);
            ev->kind = EV_DONE;
            grpc_op ops[4];
            memset(ops, 0, sizeof(ops));
            size_t n = 0;
            atomic_fetch_add(&f->many_calls, many);
            if (f->old) {
                /* DeliverMessageResponse{status: DELIVERED, connections: 1} */
                static const unsigned char ok[] = {0x08, 0x01, 0x10, 0x01};
                grpc_slice sl = grpc_slice_from_copied_buffer((const char *)ok, sizeof(ok));
                ev->payload = many ? NULL : grpc_raw_byte_buffer_create(&sl, 1);
                grpc_slice_unref(sl);
                ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
                if (!many) {
                    ops[n].op = GRPC_OP_SEND_MESSAGE;
                    ops[n++].data.send_message.send_message = ev->payload;
                }
                ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
                ops[n++].data.send_status_from_server.status =
                    many ? GRPC_STATUS_UNIMPLEMENTED : GRPC_STATUS_OK;
            } else if (!f->hang) {
                static const unsigned char junk[] = {0xff, 0xff, 0xff, 0x07, 0x01};
                grpc_slice sl = grpc_slice_from_copied_buffer((const char *)junk, sizeof(junk));
                ev->payload = grpc_raw_byte_buffer_create(&sl, 1);
                grpc_slice_unref(sl);
                ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
                ops[n].op = GRPC_OP_SEND_MESSAGE;
                ops[n++].data.send_message.send_message = ev->payload;
                ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
                ops[n++].data.send_status_from_server.status = GRPC_STATUS_OK;
            }
            ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
            ops[n++].data.recv_close_on_server.cancelled = &ev->cancelled;
            grpc_call_start_batch(ev->call, ops, n, ev, NULL);
        } else if (ev->kind == EV_DONE) {
            if (ev->payload)
                grpc_byte_buffer_destroy(ev->payload);
            grpc_call_unref(ev->call);
            free(ev);
        }
    }
    return NULL;
}

static struct fake_grpc *fake_start(bool hang, bool old)
{
    grpc_init();
    struct fake_grpc *f = calloc(1, sizeof(*f));
    f->hang = hang;
    f->old = old;
    f->cq = grpc_completion_queue_create_for_next(NULL);
    f->srv = grpc_server_create(NULL, NULL);
    grpc_server_register_completion_queue(f->srv, f->cq, NULL);
    grpc_server_credentials *cr = grpc_insecure_server_credentials_create();
    f->port = grpc_server_add_http2_port(f->srv, "127.0.0.1:0", cr);
    grpc_server_credentials_release(cr);
    cr_assert_gt(f->port, 0);
    grpc_server_start(f->srv);
    pthread_create(&f->th, NULL, fake_main, f);
    return f;
}

static void fake_stop(struct fake_grpc *f)
{
    struct fake_ev sd = {.kind = EV_SHUTDOWN};
    grpc_server_shutdown_and_notify(f->srv, f->cq, &sd);
    grpc_server_cancel_all_calls(f->srv);
    for (int i = 0; i < 500 && !atomic_load(&f->shut); i++)
        usleep(10 * 1000);
    cr_assert(atomic_load(&f->shut), "the fake server shut down");
    grpc_server_destroy(f->srv);
    grpc_completion_queue_shutdown(f->cq);
    pthread_join(f->th, NULL);
    grpc_completion_queue_destroy(f->cq);
    free(f);
    grpc_shutdown();
}

Test(transport_grpc, a_grpc_peer_answering_undecodable_bytes_fails, .timeout = 30)
{
    struct fake_grpc *f = fake_start(false, false);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", f->port);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "bytes", addr);
    mg_transport *t = make_transport(peers, 500, 0, 0, 0);
    mg_deliver_outcome out;
    int64_t s = mg_mono_ms();
    cr_assert_eq(deliver(t, "bytes", "u-1", "bob", s + 2000, &out), 0);
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect_not(out.not_connected);
    cr_expect_str_eq(out.reason, "peer bytes: INTERNAL: response does not decode");
    cr_expect_leq(mg_mono_ms() - s, 500);
    cr_expect_eq(atomic_load(&f->calls), 1, "no retry after an answer");
    mg_transport_free(t);
    mg_peers_free(peers);
    fake_stop(f);
}

Test(transport_grpc, a_grpc_peer_holding_the_call_fails_at_the_deadline, .timeout = 30)
{
    struct fake_grpc *f = fake_start(true, false);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", f->port);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "holder", addr);
    mg_transport *t = make_transport(peers, 250, 0, 0, 0);
    mg_deliver_outcome out;
    int64_t s = mg_mono_ms();
    cr_assert_eq(deliver(t, "holder", "w-1", "bob", s + 5000, &out), 0);
    int64_t took = mg_mono_ms() - s;
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    cr_expect(strstr(out.reason, "peer holder: DEADLINE_EXCEEDED"), "reason=%s", out.reason);
    cr_expect_geq(took, 200);
    cr_expect_leq(took, 400, "took %lld ms", (long long)took);
    cr_expect_eq(atomic_load(&f->calls), 1, "the call reached the server");
    mg_transport_free(t);
    mg_peers_free(peers);
    fake_stop(f);
}

/* ---- coalescing: the deliveries queued behind calls in flight ---------------- */

struct many_out {
    atomic_int done, delivered, not_connected, failed;
};

static void many_done(void *arg, const mg_deliver_outcome *o)
{
    struct many_out *m = arg;
    if (o->status == MG_STATUS_DELIVERED)
        atomic_fetch_add(&m->delivered, 1);
    else if (o->not_connected)
        atomic_fetch_add(&m->not_connected, 1);
    else
        atomic_fetch_add(&m->failed, 1);
    atomic_fetch_add(&m->done, 1);
}

/* A transport that queues behind one call in flight to a peer. */
static mg_transport *coalescing_transport(mg_peers *peers)
{
    mg_transport_grpc_config cfg = {.gateway_id = "self-test",
                                    .region = "r1",
                                    .peer_deadline_ms = 5000,
                                    .cq_threads = 1,
                                    .coalesce_calls = 1};
    return mg_transport_grpc_create(peers, &cfg);
}

/* Starts n deliveries <prefix>-1..n to peer at once (every fourth to carol
 * when with_carol) and waits until each was answered. */
static void burst(mg_transport *t, const char *peer, const char *prefix, int n, bool with_carol,
                  struct many_out *m)
{
    mg_route_target tg = {peer, "r1"};
    for (int i = 0; i < n; i++) {
        char id[32];
        snprintf(id, sizeof(id), "%s-%d", prefix, i + 1);
        mg_msg *msg = text_msg(id, with_carol && i % 4 == 3 ? "carol" : "bob");
        cr_assert_eq(t->ops->deliver(t, &tg, msg, mg_mono_ms() + 5000, many_done, m), 0);
        mg_msg_free(msg);
    }
    for (int i = 0; i < 500 && atomic_load(&m->done) < n; i++)
        usleep(10 * 1000);
    cr_assert_eq(atomic_load(&m->done), n, "every delivery answered once");
}

Test(transport_grpc, deliveries_behind_calls_in_flight_go_together_in_one_deliver_many,
     .timeout = 60)
{
    const char *args[] = {"--outbound-queue", "4096", NULL}; /* bob reads only at the end */
    mg_gw *gw = mg_gw_spawn("tg-many", args);
    cr_assert_not_null(gw);
    mg_wsc *bob = ws_user(gw, "bob");
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "peerm", gw->grpc_addr);
    mg_transport *t = coalescing_transport(peers);
    mg_deliver_outcome out;
    int64_t end = mg_mono_ms() + 3000; /* bob's registration races the first call */
    do {
        cr_assert_eq(deliver(t, "peerm", "mw-0", "bob", mg_mono_ms() + 1000, &out), 0);
    } while (out.status != MG_STATUS_DELIVERED && mg_mono_ms() < end && usleep(20000) == 0);
    cr_assert_eq(out.status, MG_STATUS_DELIVERED, "%s", out.reason);

    /* 400 deliveries started at once: with one call in flight allowed before
     * queueing, nearly all of them wait and go in DeliverMany calls. */
    enum { N = 400 };
    struct many_out m = {0};
    burst(t, "peerm", "mw", N, true, &m); /* carol: not connected there */
    cr_expect_eq(atomic_load(&m.delivered), N * 3 / 4);
    cr_expect_eq(atomic_load(&m.not_connected), N / 4);
    cr_expect_eq(atomic_load(&m.failed), 0);
    int got = 0;
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "mw-%d", i + 1);
        if (i % 4 != 3)
            got += ws_got(bob, id, 2000);
    }
    cr_expect_eq(got, N * 3 / 4, "bob received each of his, in order");
    double many =
        mg_gw_metric(gw, "meshgate_grpc_requests_total{method=\"DeliverMany\",code=\"OK\"}");
    double one =
        mg_gw_metric(gw, "meshgate_grpc_requests_total{method=\"DeliverMessage\",code=\"OK\"}");
    printf("coalescing: %d deliveries in %.0f DeliverMany and %.0f DeliverMessage calls\n", N, many,
           one - 1);
    cr_expect_gt(many, 0, "queued deliveries went together");
    cr_expect_lt(many + one, N / 2, "far fewer calls than deliveries");

    mg_transport_free(t);
    mg_peers_free(peers);
    mg_wsc_free(bob);
    cr_expect_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* A transport sending a peer one call at a time (its lane), peer deadline 300 ms. */
static mg_transport *lane_transport(mg_peers *peers, int max_inflight, int min_samples,
                                    int probe_ms)
{
    mg_transport_grpc_config cfg = {
        .gateway_id = "self-test",
        .region = "r1",
        .peer_deadline_ms = 300,
        .peer_max_inflight = max_inflight,
        .cq_threads = 1,
        .coalesce_calls = 1,
        .link = {.min_samples = min_samples, .probe_interval_ms = probe_ms},
    };
    return mg_transport_grpc_create(peers, &cfg);
}

/* Ordered (coalesce_calls 1): one call in flight to a peer, the rest queued
 * behind it; past the bound the next delivery fails at once (the plan's next
 * step), never a second call that could overtake the first. */
Test(transport_grpc, ordered_deliveries_wait_behind_one_call_and_fail_busy_past_the_bound,
     .timeout = 30)
{
    struct fake_grpc *f = fake_start(true, false); /* holds every call until its deadline */
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", f->port);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "lane", addr);
    mg_transport *t = lane_transport(peers, 4, 0, 0);
    cr_expect(t->ops->orders_on_return, "one call at a time keeps the order");
    mg_route_target tg = {"lane", "r1"};
    struct many_out m = {0};
    for (int i = 0; i < 6; i++) {
        char id[32];
        snprintf(id, sizeof(id), "lane-%d", i + 1);
        mg_msg *msg = text_msg(id, "bob");
        int rc = t->ops->deliver(t, &tg, msg, mg_mono_ms() + 5000, many_done, &m);
        mg_msg_free(msg);
        if (i < 5)
            cr_expect_eq(rc, 0, "delivery %d: on the lane or queued behind it", i + 1);
        else
            cr_expect_eq(rc, -EBUSY, "past 4 queued: busy at once, not a second call");
    }
    for (int i = 0; i < 300 && atomic_load(&m.done) < 5; i++)
        usleep(10 * 1000);
    cr_expect_eq(atomic_load(&m.done), 5, "every delivery answered once");
    cr_expect_eq(atomic_load(&m.failed), 5, "the peer never answered");
    cr_expect_eq(atomic_load(&f->calls), 1, "the queued ones failed with the lane's call");
    mg_transport_free(t);

    t = make_transport(peers, 300, 4, 0, 0); /* a call per delivery */
    cr_expect_not(t->ops->orders_on_return, "calls in flight together can overtake");
    mg_transport_free(t);
    mg_peers_free(peers);
    fake_stop(f);
}

/* Ordered: a degraded link's probe goes on the lane but does not fix the
 * order (the sender's next message goes by the next step meanwhile). */
Test(transport_grpc, an_ordered_probe_of_a_degraded_link_does_not_fix_the_order, .timeout = 30)
{
    int dead = mg_test_free_port(); /* nobody listens: UNAVAILABLE at once */
    char dead_addr[64];
    snprintf(dead_addr, sizeof(dead_addr), "127.0.0.1:%d", dead);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "gone", dead_addr);
    mg_transport *t = lane_transport(peers, 0, 2, 200);
    mg_deliver_outcome out;
    int calls = 0;
    for (; avail(t, "gone") && calls < 20; calls++)
        cr_expect_eq(deliver(t, "gone", "g-1", "bob", mg_mono_ms() + 300, &out), 0,
                     "healthy: on the lane, order fixed");
    cr_assert_lt(calls, 20, "degraded after a few failures");
    int64_t end = mg_mono_ms() + 3000;
    while (mg_mono_ms() < end && !avail(t, "gone"))
        usleep(20 * 1000);
    cr_expect_eq(deliver(t, "gone", "g-2", "bob", mg_mono_ms() + 300, &out), MG_DELIVER_UNORDERED,
                 "the probe");
    cr_expect_eq(out.status, MG_STATUS_FAILED);
    mg_transport_free(t);
    mg_peers_free(peers);
}

Test(transport_grpc, a_peer_without_deliver_many_gets_one_call_each, .timeout = 30)
{
    struct fake_grpc *f = fake_start(false, true);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", f->port);
    mg_peers *peers = mg_peers_create("self-test", NULL, 0);
    set_peer(peers, "old", addr);
    mg_transport *t = coalescing_transport(peers);
    mg_deliver_outcome out;
    cr_assert_eq(deliver(t, "old", "o-0", "bob", mg_mono_ms() + 2000, &out), 0);
    cr_assert_eq(out.status, MG_STATUS_DELIVERED, "%s", out.reason);
    enum { N = 100 };
    struct many_out m = {0};
    burst(t, "old", "o", N, false, &m);
    cr_expect_eq(atomic_load(&m.delivered), N, "none lost to the UNIMPLEMENTED");
    cr_expect_eq(atomic_load(&f->many_calls), 1, "asked once, then never again");
    cr_expect_eq(atomic_load(&f->calls), 1 + N + 1, "then one call each");
    mg_transport_free(t);
    mg_peers_free(peers);
    fake_stop(f);
}
