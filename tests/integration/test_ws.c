/* Integration tests of the WebSocket front end against the real gateway
 * binary (embedded default: memory presence and inbox; one test on Redis
 * Cluster): delivery, the ready frame, fan-out,
 * offline inbox with acks, protocol errors, size limits, JWT auth at upgrade,
 * slow consumers, drain, and the HTTP endpoints. */
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <jansson.h>
#include <jwt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define T_MS 5000

static mg_wsc *connect_q(const mg_gw *gw, const char *query, const char *const *headers,
                         int *status)
{
    char url[4096];
    snprintf(url, sizeof(url), "ws://127.0.0.1:%d/ws%s%s", gw->ws_port, query ? "?" : "",
             query ? query : "");
    return mg_wsc_connect(url, headers, T_MS, status);
}

static mg_wsc *connect_user(const mg_gw *gw, const char *user)
{
    char q[300];
    snprintf(q, sizeof(q), "user=%s", user);
    int st;
    mg_wsc *c = connect_q(gw, q, NULL, &st);
    cr_assert_not_null(c, "connect as %s: HTTP %d", user, st);
    return c;
}

/* The next frame as JSON, failing the test on timeout. */
static json_t *recv_json(mg_wsc *c)
{
    return mg_wsc_recv_json(c, T_MS);
}

static const char *str(json_t *j, const char *k)
{
    return mg_json_str(j, k);
}

static void send_msg(mg_wsc *c, const char *id, const char *to, const char *content)
{
    char buf[4096];
    snprintf(buf, sizeof(buf), "{\"type\":\"send\",\"id\":\"%s\",\"to\":\"%s\",\"content\":\"%s\"}",
             id, to, content);
    cr_assert_eq(mg_wsc_send_text(c, buf), 0);
}

static void expect_ack(mg_wsc *c, const char *id, const char *status, const char *path)
{
    json_t *j = recv_json(c);
    cr_assert_str_eq(str(j, "type"), "ack", "got %s", json_dumps(j, 0));
    cr_assert_str_eq(str(j, "id"), id);
    cr_assert_str_eq(str(j, "status"), status, "ack %s: %s (%s)", id, str(j, "status"),
                     str(j, "reason"));
    cr_assert_str_eq(str(j, "path"), path);
    json_decref(j);
}

static void expect_message(mg_wsc *c, const char *id, const char *from, const char *content,
                           bool inbox)
{
    json_t *j = recv_json(c);
    cr_assert_str_eq(str(j, "type"), "message", "got type %s", str(j, "type"));
    cr_assert_str_eq(str(j, "id"), id);
    cr_assert_str_eq(str(j, "from"), from);
    cr_assert_str_eq(str(j, "content"), content);
    cr_assert(json_is_integer(json_object_get(j, "sent_at_ms")));
    cr_assert_eq(json_is_true(json_object_get(j, "inbox")), inbox);
    json_decref(j);
}

static void expect_error(mg_wsc *c, const char *code)
{
    json_t *j = recv_json(c);
    cr_assert_str_eq(str(j, "type"), "error");
    cr_assert_str_eq(str(j, "code"), code, "error code %s (%s)", str(j, "code"), str(j, "reason"));
    cr_assert(strlen(str(j, "reason")) > 0);
    json_decref(j);
}

static void expect_silence(mg_wsc *c, int ms)
{
    char *s = mg_wsc_recv_text(c, ms);
    cr_assert_null(s, "unexpected frame: %s", s);
}

Test(ws, send_receive_and_ack, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("ws-basic", NULL);
    cr_assert_not_null(gw);
    mg_wsc *alice = connect_user(gw, "alice"), *bob = connect_user(gw, "bob");
    cr_assert(mg_wsc_wait_ready(bob, T_MS)); /* presence has bob */
    send_msg(alice, "m-1", "bob", "hello bob");
    expect_ack(alice, "m-1", "delivered", "local");
    expect_message(bob, "m-1", "alice", "hello bob", false);

    /* a send without id gets one from the server, acked with it */
    cr_assert_eq(mg_wsc_send_text(bob, "{\"type\":\"send\",\"to\":\"alice\",\"content\":\"yo\"}"),
                 0);
    json_t *ack = recv_json(bob);
    cr_assert_str_eq(str(ack, "type"), "ack");
    cr_assert_str_eq(str(ack, "status"), "delivered");
    json_t *m = recv_json(alice);
    cr_assert_str_eq(str(m, "id"), str(ack, "id"));
    cr_assert_str_eq(str(m, "content"), "yo");
    json_decref(ack);
    json_decref(m);
    mg_wsc_free(alice);
    mg_wsc_free(bob);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws, every_connection_of_a_user_receives, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("ws-multi", NULL);
    cr_assert_not_null(gw);
    mg_wsc *alice = connect_user(gw, "alice");
    mg_wsc *bob[3];
    for (int i = 0; i < 3; i++) {
        bob[i] = connect_user(gw, "bob");
        cr_assert(mg_wsc_wait_ready(bob[i], T_MS));
    }
    send_msg(alice, "fan-1", "bob", "to all devices");
    expect_ack(alice, "fan-1", "delivered", "local");
    for (int i = 0; i < 3; i++) {
        expect_message(bob[i], "fan-1", "alice", "to all devices", false);
        mg_wsc_free(bob[i]);
    }
    mg_wsc_free(alice);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws, offline_inbox_in_order_until_acked, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("ws-inbox", NULL);
    cr_assert_not_null(gw);
    mg_wsc *alice = connect_user(gw, "alice");
    send_msg(alice, "in-1", "carol", "first");
    expect_ack(alice, "in-1", "stored", "inbox");
    send_msg(alice, "in-2", "carol", "second");
    expect_ack(alice, "in-2", "stored", "inbox");

    mg_wsc *carol = connect_user(gw, "carol");
    expect_message(carol, "in-1", "alice", "first", true);
    expect_message(carol, "in-2", "alice", "second", true);
    mg_wsc_free(carol); /* no ack: both come again */
    usleep(200 * 1000);

    carol = connect_user(gw, "carol");
    expect_message(carol, "in-1", "alice", "first", true);
    expect_message(carol, "in-2", "alice", "second", true);
    cr_assert_eq(mg_wsc_send_text(carol, "{\"type\":\"ack\",\"id\":\"in-1\"}"), 0);
    usleep(300 * 1000); /* the ack is applied by a worker job */
    mg_wsc_free(carol);
    usleep(200 * 1000);

    carol = connect_user(gw, "carol");
    expect_message(carol, "in-2", "alice", "second", true);
    expect_silence(carol, 300);
    cr_assert_eq(mg_wsc_send_text(carol, "{\"type\":\"ack\",\"id\":\"in-2\"}"), 0);
    usleep(300 * 1000);
    mg_wsc_free(carol);
    usleep(200 * 1000);
    carol = connect_user(gw, "carol");
    expect_silence(carol, 300);
    mg_wsc_free(carol);
    mg_wsc_free(alice);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws, bad_input_gets_errors_and_connection_stays, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("ws-errors", NULL);
    cr_assert_not_null(gw);
    mg_wsc *alice = connect_user(gw, "alice");
    cr_assert_eq(mg_wsc_send_text(alice, "{not json"), 0);
    expect_error(alice, "bad_json");
    cr_assert_eq(mg_wsc_send_text(alice, "{\"type\":\"subscribe\"}"), 0);
    expect_error(alice, "unknown_type");
    cr_assert_eq(mg_wsc_send_text(alice, "{\"type\":\"send\",\"content\":\"x\"}"), 0);
    expect_error(alice, "missing_field");
    cr_assert_eq(mg_wsc_send_text(alice, "{\"type\":\"send\",\"to\":\"\",\"content\":\"x\"}"), 0);
    expect_error(alice, "bad_field");
    cr_assert_eq(mg_wsc_send_text(alice, "{\"type\":\"send\",\"to\":\"bob\",\"content\":7}"), 0);
    expect_error(alice, "bad_field");
    /* still open and working */
    send_msg(alice, "ok-1", "alice", "self");
    bool got_ack = false, got_msg = false;
    for (int i = 0; i < 2; i++) {
        json_t *j = recv_json(alice);
        got_ack |= !strcmp(str(j, "type"), "ack") && !strcmp(str(j, "status"), "delivered");
        got_msg |= !strcmp(str(j, "type"), "message") && !strcmp(str(j, "id"), "ok-1");
        json_decref(j);
    }
    cr_assert(got_ack && got_msg);
    cr_assert_eq(mg_wsc_close_code(alice), 0);
    mg_wsc_free(alice);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws, oversized_and_binary_frames_close, .timeout = 60)
{
    const char *args[] = {"--max-frame-bytes", "1024", NULL};
    mg_gw *gw = mg_gw_spawn("ws-limits", args);
    cr_assert_not_null(gw);
    mg_wsc *a = connect_user(gw, "alice");
    char *big = malloc(4096 + 1);
    memset(big, 'x', 4096);
    big[4096] = 0;
    cr_assert_eq(mg_wsc_send_text(a, big), 0);
    cr_assert_eq(mg_wsc_wait_close(a, T_MS), 1009);
    mg_wsc_free(a);
    free(big);

    a = connect_user(gw, "alice");
    cr_assert_eq(mg_wsc_send_frame(a, MG_WSC_BINARY, "\x01\x02", 2), 0);
    cr_assert_eq(mg_wsc_wait_close(a, T_MS), 1003);
    mg_wsc_free(a);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

static char *token(const char *secret, const char *sub, long exp)
{
    return mg_test_jwt_hs256(secret, sub, exp);
}

Test(ws, jwt_auth_at_upgrade, .timeout = 60)
{
    const char *secret = "integration-secret-123456";
    const char *args[] = {"--jwt-secret", secret, NULL};
    mg_gw *gw = mg_gw_spawn("ws-jwt", args);
    cr_assert_not_null(gw);
    int st;
    cr_assert_null(connect_q(gw, NULL, NULL, &st));
    cr_assert_eq(st, 401, "missing token: %d", st);
    cr_assert_null(connect_q(gw, "user=alice", NULL, &st));
    cr_assert_eq(st, 401, "?user= with auth configured: %d", st);

    char *bad = token("another-secret-xxxxxxxxx", "alice", time(NULL) + 300);
    char *expired = token(secret, "alice", time(NULL) - 60);
    char *good = token(secret, "alice", time(NULL) + 300);
    char hdr[2048], q[2048];
    snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s", bad);
    const char *h1[] = {hdr, NULL};
    cr_assert_null(connect_q(gw, NULL, h1, &st));
    cr_assert_eq(st, 401, "bad signature: %d", st);
    snprintf(q, sizeof(q), "token=%s", expired);
    cr_assert_null(connect_q(gw, q, NULL, &st));
    cr_assert_eq(st, 401, "expired: %d", st);

    snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s", good);
    mg_wsc *a = connect_q(gw, NULL, h1, &st);
    cr_assert_not_null(a, "good token in header: %d", st);
    snprintf(q, sizeof(q), "token=%s", good);
    mg_wsc *b = connect_q(gw, q, NULL, &st);
    cr_assert_not_null(b, "good token in query: %d", st);
    usleep(200 * 1000);
    send_msg(a, "j-1", "nobody-online", "hi");
    expect_ack(a, "j-1", "stored", "inbox");
    mg_wsc_free(a);
    mg_wsc_free(b);
    free(bad);
    free(expired);
    free(good);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

static long metric(const mg_gw *gw, const char *name)
{
    char *body = NULL;
    if (mg_http_get(gw->ws_port, "/metrics", &body) != 200) {
        free(body);
        return -1;
    }
    long v = -1;
    char *p = body;
    size_t nl = strlen(name);
    while ((p = strstr(p, name))) {
        if ((p == body || p[-1] == '\n') && p[nl] == ' ') {
            v = strtol(p + nl + 1, NULL, 10);
            break;
        }
        p += nl;
    }
    free(body);
    return v;
}

Test(ws, slow_consumer_closed_4008, .timeout = 120)
{
    const char *args[] = {"--outbound-queue", "4", "--outbound-queue-bytes", "1048576", NULL};
    mg_gw *gw = mg_gw_spawn("ws-slow", args);
    cr_assert_not_null(gw);
    mg_wsc *alice = connect_user(gw, "alice"), *bob = connect_user(gw, "bob");
    cr_assert(mg_wsc_wait_ready(bob, T_MS));
    /* bob never reads: after the kernel buffers fill, his queue overflows */
    char *content = malloc(60001);
    memset(content, 'z', 60000);
    content[60000] = 0;
    char *frame = malloc(61000);
    int sent = 0;
    for (; sent < 2000; sent++) {
        snprintf(frame, 61000, "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"%s\"}", content);
        cr_assert_eq(mg_wsc_send_text(alice, frame), 0);
        json_t *j = recv_json(alice); /* alice keeps reading her acks */
        json_decref(j);
        if (sent % 10 == 9 && metric(gw, "meshgate_ws_slow_consumer_closes_total") >= 1)
            break;
    }
    cr_assert_lt(sent, 2000, "bob was never closed as a slow consumer");
    cr_assert_eq(mg_wsc_wait_close(bob, 20000), 4008);
    cr_assert_eq(mg_wsc_close_code(alice), 0, "alice is unaffected");
    free(content);
    free(frame);
    mg_wsc_free(alice);
    mg_wsc_free(bob);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws, http_endpoints_and_drain, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("ws-http", NULL);
    cr_assert_not_null(gw);
    char *body = NULL;
    cr_assert_eq(mg_http_get(gw->ws_port, "/healthz", NULL), 200);
    cr_assert_eq(mg_http_get(gw->ws_port, "/readyz", NULL), 200);
    cr_assert_eq(mg_http_get(gw->ws_port, "/nothing-here", NULL), 404);
    mg_wsc *a = connect_user(gw, "alice");
    cr_assert_eq(mg_http_get(gw->ws_port, "/metrics", &body), 200);
    cr_assert(strstr(body, "meshgate_ws_connections 1"), "metrics: %s", body);
    cr_assert(strstr(body, "meshgate_ws_messages_in_total"));
    free(body);
    /* SIGTERM: clients are closed with 1012 within the drain window */
    mg_gw_kill(gw, SIGTERM);
    cr_assert_eq(mg_wsc_wait_close(a, 10000), 1012);
    mg_wsc_free(a);
    cr_assert(mg_gw_wait(gw, 30000));
    cr_assert_eq(gw->exit_status, 0);
    mg_gw_free(gw);
}

Test(ws, refuses_non_loopback_without_auth, .timeout = 30)
{
    char listen[64];
    snprintf(listen, sizeof(listen), "0.0.0.0:%d", mg_test_free_port());
    const char *args[] = {"--ws-listen", listen, NULL};
    mg_gw *gw = mg_gw_spawn_nowait("ws-noauth", args);
    cr_assert_not_null(gw);
    cr_assert(mg_gw_wait(gw, 10000), "gateway started without auth on 0.0.0.0");
    cr_assert_neq(gw->exit_status, 0);
    cr_assert(mg_gw_log_contains(gw, "without client authentication"));
    mg_gw_free(gw);
}

/* A TCP connect to ip:port: 0 when accepted, else the errno. */
static int tcp_connect_errno(const char *ip, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    cr_assert_eq(inet_pton(AF_INET, ip, &sa.sin_addr), 1);
    int rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 ? 0 : errno;
    close(fd);
    return rc;
}

/* Issue 14 item 1: --ws-listen 127.0.0.1:P used to bind [::]:P (every
 * address), so a client reaching the host on another address got ?user= and
 * /metrics although the rule says loopback only. */
Test(ws, binds_only_the_address_given, .timeout = 30)
{
    const char *loops[] = {"--ws-threads", "2", NULL};
    mg_gw *gw = mg_gw_spawn("ws-bind", loops); /* --ws-listen 127.0.0.1:P */
    cr_assert_not_null(gw);
    /* SO_REUSEPORT listeners: a second gateway on the port still fails */
    const char *dup[] = {"--ws-listen", gw->ws_addr, "--ws-threads", "2", NULL};
    mg_gw *gw2 = mg_gw_spawn_nowait("ws-bind-dup", dup);
    cr_assert(mg_gw_wait(gw2, 20000), "a second gateway on the same WebSocket port kept running");
    cr_assert_neq(gw2->exit_status, 0);
    cr_assert(mg_gw_log_contains(gw2, "Address already in use"), "see %s", gw2->log_path);
    mg_gw_free(gw2);
    cr_assert_eq(tcp_connect_errno("127.0.0.1", gw->ws_port), 0);
    cr_assert_eq(tcp_connect_errno("127.0.0.2", gw->ws_port), ECONNREFUSED,
                 "127.0.0.2:%d accepted a connection: the listener is not bound to 127.0.0.1",
                 gw->ws_port);
    char url[128];
    snprintf(url, sizeof(url), "ws://127.0.0.2:%d/ws?user=alice", gw->ws_port);
    int st = 0;
    mg_wsc *c = mg_wsc_connect(url, NULL, T_MS, &st);
    cr_assert_null(c, "?user=alice was accepted through 127.0.0.2");
    cr_assert_eq(st, -1);
    mg_wsc_free(connect_user(gw, "alice")); /* and 127.0.0.1 still serves */
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws, ping_keeps_live_clients_and_drops_dead_ones, .timeout = 60)
{
    const char *args[] = {"--ping-seconds", "1", NULL};
    mg_gw *gw = mg_gw_spawn("ws-ping", args);
    cr_assert_not_null(gw);
    mg_wsc *live = connect_user(gw, "live"), *dead = connect_user(gw, "dead");
    /* live answers pings while it waits; dead does not read for 4 s */
    expect_silence(live, 4000);
    cr_assert_eq(mg_wsc_close_code(live), 0, "a client answering pings was closed");
    int code = mg_wsc_wait_close(dead, 3000);
    cr_assert_neq(code, 0, "a client not answering pings is still open");
    mg_wsc_free(live);
    mg_wsc_free(dead);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws, jwt_audience_and_issuer_required_when_configured, .timeout = 60)
{
    const char *secret = "integration-secret-123456";
    const char *args[] = {"--jwt-secret",       secret, "--jwt-audience", "chat", "--jwt-issuer",
                          "https://id.example", NULL};
    mg_gw *gw = mg_gw_spawn("ws-jwt-aud", args);
    cr_assert_not_null(gw);
    jwt_t *j = NULL;
    char q[2048];
    int st;
    /* a good signature without aud/iss is refused */
    char *plain = token(secret, "alice", time(NULL) + 300);
    snprintf(q, sizeof(q), "token=%s", plain);
    cr_assert_null(connect_q(gw, q, NULL, &st));
    cr_assert_eq(st, 401, "no aud/iss: %d", st);
    /* wrong audience */
    cr_assert_eq(jwt_new(&j), 0);
    jwt_set_alg(j, JWT_ALG_HS256, (const unsigned char *)secret, (int)strlen(secret));
    jwt_add_grant(j, "sub", "alice");
    jwt_add_grant_int(j, "exp", time(NULL) + 300);
    jwt_add_grant(j, "iss", "https://id.example");
    jwt_add_grant(j, "aud", "billing");
    char *wrong = jwt_encode_str(j);
    jwt_del_grants(j, "aud");
    jwt_add_grant(j, "aud", "chat");
    char *right = jwt_encode_str(j);
    jwt_free(j);
    snprintf(q, sizeof(q), "token=%s", wrong);
    cr_assert_null(connect_q(gw, q, NULL, &st));
    cr_assert_eq(st, 401, "wrong audience: %d", st);
    snprintf(q, sizeof(q), "token=%s", right);
    mg_wsc *a = connect_q(gw, q, NULL, &st);
    cr_assert_not_null(a, "right audience and issuer: %d", st);
    mg_wsc_free(a);
    free(plain);
    free(wrong);
    free(right);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* Coalesced writes (one lws_write per writable event) across a socket that
 * takes a few bytes at a time: bob's receive buffer is tiny and he reads
 * slowly, so the gateway's writes end partial and resume on the next
 * writable event. Every frame must arrive whole, in each sender's order.
 * (16 KB: with 1 KB, loopback TCP itself stalls in zero-window probing for
 * seconds, with the per-frame writer as with this one.) */
Test(ws, partial_writes_resume_whole_and_in_order, .timeout = 120)
{
    const char *args[] = {"--outbound-queue", "2048", "--outbound-queue-bytes", "16777216", NULL};
    mg_gw *gw = mg_gw_spawn("ws-partial", args);
    cr_assert_not_null(gw);
    mg_wsc *bob = connect_user(gw, "bob");
    int small = 16384;
    cr_assert_eq(setsockopt(mg_wsc_fd(bob), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)), 0);
    mg_wsc *snd[2] = {connect_user(gw, "alice"), connect_user(gw, "carol")};
    const char *names[2] = {"alice", "carol"};
    enum { N = 150 };
    static const size_t sizes[] = {20, 1500, 9000, 130, 60000};
    char *content = malloc(70001), *frame = malloc(71000);
    for (int i = 0; i < N; i++) { /* the senders interleave, acks read later */
        for (int s = 0; s < 2; s++) {
            size_t n = sizes[(i + s) % 5];
            memset(content, 'a' + (char)((i + s) % 26), n);
            content[n] = 0;
            snprintf(frame, 71000,
                     "{\"type\":\"send\",\"id\":\"%s-%d\",\"to\":\"bob\",\"content\":\"%s\"}",
                     names[s], i, content);
            cr_assert_eq(mg_wsc_send_text(snd[s], frame), 0);
        }
    }
    int next[2] = {0, 0};
    for (int got = 0; got < 2 * N; got++) {
        if (got % 8 == 0)
            usleep(5000); /* a slow reader */
        char *t = mg_wsc_recv_text(bob, T_MS);
        cr_assert_not_null(t, "frame %d of %d did not come (close code %d)", got, 2 * N,
                           mg_wsc_close_code(bob));
        json_t *j = json_loads(t, 0, NULL);
        cr_assert_not_null(j, "frame %d is not JSON", got);
        free(t);
        cr_assert_str_eq(str(j, "type"), "message");
        const char *from = str(j, "from");
        int s = strcmp(from, "carol") == 0;
        cr_assert(s || strcmp(from, "alice") == 0, "from %s", from);
        char want[64];
        snprintf(want, sizeof(want), "%s-%d", names[s], next[s]);
        cr_assert_str_eq(str(j, "id"), want, "out of order or lost: got %s", str(j, "id"));
        size_t n = sizes[(next[s] + s) % 5];
        const char *c = str(j, "content");
        cr_assert_eq(strlen(c), n, "frame %s cut: %zu of %zu bytes", want, strlen(c), n);
        for (size_t k = 0; k < n; k++)
            cr_assert_eq(c[k], 'a' + (char)((next[s] + s) % 26), "frame %s corrupted", want);
        next[s]++;
        json_decref(j);
    }
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < N; i++) {
            char id[64];
            snprintf(id, sizeof(id), "%s-%d", names[s], i);
            expect_ack(snd[s], id, "delivered", "local");
        }
    cr_assert_eq(mg_wsc_close_code(bob), 0);
    free(content);
    free(frame);
    mg_wsc_free(bob);
    mg_wsc_free(snd[0]);
    mg_wsc_free(snd[1]);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* An inbox longer than the connection's queue (600 messages, 64 frames)
 * goes out a page at a time as the client acks: every message once, in
 * order, and the connection is never closed as a slow consumer (the chaos
 * schedule saw 4008 on reconnect when the whole inbox was queued at once). */
Test(ws, long_inbox_is_paged_to_the_queue, .timeout = 120)
{
    const char *args[] = {"--outbound-queue", "64", "--inbox-max-messages", "1000", NULL};
    mg_gw *gw = mg_gw_spawn("ws-inbox-pages", args);
    cr_assert_not_null(gw);
    enum { N = 600 };
    mg_wsc *alice = connect_user(gw, "alice");
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "pg-%03d", i);
        send_msg(alice, id, "carol", "x");
        json_t *j = recv_json(alice);
        cr_assert_not_null(j);
        cr_assert_str_eq(str(j, "status"), "stored", "%s", str(j, "reason"));
        json_decref(j);
    }
    mg_wsc *carol = connect_user(gw, "carol");
    int next = 0;
    while (next < N) {
        json_t *j = mg_wsc_recv_json(carol, 10000);
        cr_assert_not_null(j, "stalled after %d of %d (close code %d)", next, N,
                           mg_wsc_close_code(carol));
        char want[32];
        snprintf(want, sizeof(want), "pg-%03d", next);
        cr_assert_str_eq(str(j, "type"), "message");
        cr_assert_str_eq(str(j, "id"), want, "in order, once");
        cr_assert(json_is_true(json_object_get(j, "inbox")));
        char ack[64];
        snprintf(ack, sizeof(ack), "{\"type\":\"ack\",\"id\":\"%s\"}", want);
        cr_assert_eq(mg_wsc_send_text(carol, ack), 0);
        json_decref(j);
        next++;
    }
    char *more = mg_wsc_recv_text(carol, 1000);
    cr_assert_null(more, "nothing after the last: %s", more);
    cr_assert_eq(mg_wsc_close_code(carol), 0, "not closed as a slow consumer");
    mg_wsc_free(carol);
    carol = connect_user(gw, "carol");
    more = mg_wsc_recv_text(carol, 1000);
    cr_assert_null(more, "all acked: nothing comes again: %s", more);
    mg_wsc_free(carol);
    mg_wsc_free(alice);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* Waits for c's ready frame and checks it: type, user, a conn id of gateway
 * gw_id, and "degraded" absent. Returns how many frames came before it. */
static unsigned expect_ready(mg_wsc *c, const char *gw_id, const char *user)
{
    cr_assert(mg_wsc_wait_ready(c, T_MS), "no ready frame for %s (close code %d)", user,
              mg_wsc_close_code(c));
    unsigned before;
    json_t *j = json_loads(mg_wsc_ready(c, &before), 0, NULL);
    cr_assert_not_null(j);
    cr_assert_str_eq(str(j, "type"), "ready");
    cr_assert_str_eq(str(j, "user"), user);
    const char *conn = str(j, "conn");
    size_t n = strlen(gw_id);
    cr_assert(!strncmp(conn, gw_id, n) && conn[n] == '-' && conn[n + 1], "conn id %s", conn);
    cr_assert_null(json_object_get(j, "degraded"));
    json_decref(j);
    return before;
}

/* Embedded default (memory stores, jobs inline on the service loop): the
 * ready frame comes after the inbox's first page, and a send to the user
 * right after it is delivered. */
Test(ws, ready_frame_follows_the_inbox_page_embedded, .timeout = 60)
{
    mg_gw *gw = mg_gw_spawn("ws-ready", NULL);
    cr_assert_not_null(gw);
    mg_wsc *alice = connect_user(gw, "alice");
    cr_assert_eq(expect_ready(alice, "ws-ready", "alice"), 0);
    send_msg(alice, "rd-1", "carol", "first");
    expect_ack(alice, "rd-1", "stored", "inbox");
    send_msg(alice, "rd-2", "carol", "second");
    expect_ack(alice, "rd-2", "stored", "inbox");
    mg_wsc *carol = connect_user(gw, "carol");
    cr_assert_eq(expect_ready(carol, "ws-ready", "carol"), 2, "the inbox page comes first");
    send_msg(alice, "rd-3", "carol", "live");
    expect_ack(alice, "rd-3", "delivered", "local");
    expect_message(carol, "rd-1", "alice", "first", true);
    expect_message(carol, "rd-2", "alice", "second", true);
    expect_message(carol, "rd-3", "alice", "live", false);
    mg_wsc_free(carol);
    mg_wsc_free(alice);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* Redis Cluster presence and inbox: the connect job runs on the worker
 * pool, after the 101 (the racy case). A send made as soon as the ready
 * frame came is delivered, connection after connection; and the inbox page
 * still comes before the ready frame. */
Test(ws, ready_frame_means_presence_has_it_redis_cluster, .timeout = 90)
{
    char gwid[64], alice_u[64], user[80];
    snprintf(gwid, sizeof(gwid), "ws-ready-rc-%d", (int)getpid());
    snprintf(alice_u, sizeof(alice_u), "rdalice-%d", (int)getpid());
    const char *args[] = {"--presence", "redis-cluster", "--redis-nodes",
                          mg_test_require_env("MESHGATE_TEST_REDIS_NODES"), NULL};
    mg_gw *gw = mg_gw_spawn(gwid, args);
    cr_assert_not_null(gw);
    mg_wsc *alice = connect_user(gw, alice_u);
    expect_ready(alice, gwid, alice_u);
    enum { ROUNDS = 10 };
    for (int i = 0; i < ROUNDS; i++) {
        char id[32];
        snprintf(user, sizeof(user), "rdbob-%d-%d", (int)getpid(), i);
        mg_wsc *bob = connect_user(gw, user);
        cr_assert_eq(expect_ready(bob, gwid, user), 0);
        snprintf(id, sizeof(id), "rdc-%d", i);
        send_msg(alice, id, user, "right after ready");
        expect_ack(alice, id, "delivered", "local");
        expect_message(bob, id, alice_u, "right after ready", false);
        mg_wsc_free(bob);
    }
    snprintf(user, sizeof(user), "rdcarol-%d", (int)getpid());
    send_msg(alice, "rdc-in", user, "kept");
    expect_ack(alice, "rdc-in", "stored", "inbox");
    mg_wsc *carol = connect_user(gw, user);
    cr_assert_eq(expect_ready(carol, gwid, user), 1, "the inbox page comes first");
    expect_message(carol, "rdc-in", alice_u, "kept", true);
    cr_assert_eq(mg_wsc_send_text(carol, "{\"type\":\"ack\",\"id\":\"rdc-in\"}"), 0);
    mg_wsc_free(carol);
    mg_wsc_free(alice);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}
