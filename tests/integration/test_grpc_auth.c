/* test_grpc_auth.c: who may call the gRPC API of a real gateway
 * (gateway/grpc_auth.h; issue 14, item 2).
 *
 * - a listener off loopback without caller authentication refuses to start;
 * - bearer tokens: none or a wrong one is UNAUTHENTICATED, a service token
 *   may call Messaging but not GatewayPeer (PERMISSION_DENIED), a peer token
 *   the reverse; health stays open;
 * - mTLS with a throwaway CA, server and client certificates made here with
 *   the openssl CLI: a client certificate works, none fails the handshake;
 * - two gateways with peer tokens (Redis Cluster presence, Consul) deliver
 *   to each other by gRPC, and a gateway with a token they do not know is
 *   refused.
 */
#include "support/grpc_client.h"
#include "support/grpc_stream_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define T_MS 5000

#define API_TOKEN         "svc-token-0123456789abcdef0123456789"
#define API_TOKEN_2       "other-svc-token-fedcba9876543210fe"
#define PEER_TOKEN        "peer-token-a1b2c3d4e5f6a7b8c9d0e1f2"
#define ST_DELIVERED_PEER MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED
#define ST_NOT_CONNECTED  MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED

static char dir[256];

/* A private temp directory for token files and certificates. */
static const char *tmpdir(void)
{
    if (!dir[0]) {
        snprintf(dir, sizeof(dir), "/tmp/mg-grpc-auth-XXXXXX");
        cr_assert_not_null(mkdtemp(dir));
    }
    return dir;
}

static void cleanup(void)
{
    if (dir[0]) {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        cr_expect_eq(system(cmd), 0);
        dir[0] = '\0';
    }
}

/* Writes text to <tmpdir>/name; returns the path (static per name slot). */
static const char *write_file(const char *name, const char *text)
{
    static char paths[8][320];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, 320, "%s/%s", tmpdir(), name);
    FILE *f = fopen(p, "w");
    cr_assert_not_null(f, "cannot write %s", p);
    fputs(text, f);
    fclose(f);
    return p;
}

static const char *api_tokens(void)
{
    return write_file("api-tokens", "# services\nsvc-a:" API_TOKEN "\nsvc-b:" API_TOKEN_2 "\n");
}

static const char *peer_tokens(void)
{
    return write_file("peer-tokens", "gw:" PEER_TOKEN "\n");
}

static grpc_status_code send_with(mg_grpc_client *c, const char *to, char **details)
{
    Meshgate__V1__SendMessageResponse *r = NULL;
    grpc_status_code st = mg_tc_send(c, "svc", to, NULL, "hi", 1, T_MS, &r, details);
    if (r)
        protobuf_c_message_free_unpacked(&r->base, NULL);
    return st;
}

static long metric(const mg_gw *gw, const char *series)
{
    char *body = NULL;
    long v = -1;
    if (mg_http_get(gw->ws_port, "/metrics", &body) == 200 && body) {
        const char *p = strstr(body, series);
        if (p)
            v = strtol(p + strlen(series), NULL, 10);
    }
    free(body);
    return v;
}

static void stop(mg_gw *gw)
{
    cr_assert_eq(mg_gw_stop(gw), 0, "gateway %s exit status", gw->name);
    mg_gw_free(gw);
}

TestSuite(grpc_auth, .fini = cleanup);

Test(grpc_auth, refuses_unauthenticated_listener_off_loopback, .timeout = 30)
{
    char listen[64];
    snprintf(listen, sizeof(listen), "0.0.0.0:%d", mg_test_free_port());
    const char *args[] = {"--grpc-listen", listen, NULL};
    mg_gw *gw = mg_gw_spawn_nowait("ga-open", args);
    cr_assert_not_null(gw);
    cr_assert(mg_gw_wait(gw, 10000), "gateway started gRPC on 0.0.0.0 without authentication");
    cr_assert_neq(gw->exit_status, 0);
    cr_assert(mg_gw_log_contains(gw, "without caller authentication"));
    mg_gw_free(gw);
}

Test(grpc_auth, bearer_tokens, .timeout = 60)
{
    const char *args[] = {"--api-token-file", api_tokens(), "--peer-token-file", peer_tokens(),
                          NULL};
    mg_gw *gw = mg_gw_spawn("ga-tokens", args);
    cr_assert_not_null(gw);
    mg_grpc_client *none = mg_tc_client(gw->grpc_addr, NULL, NULL, NULL, NULL);
    mg_grpc_client *wrong = mg_tc_client(gw->grpc_addr, API_TOKEN "x", NULL, NULL, NULL);
    mg_grpc_client *svc = mg_tc_client(gw->grpc_addr, API_TOKEN, NULL, NULL, NULL);
    mg_grpc_client *svc2 = mg_tc_client(gw->grpc_addr, API_TOKEN_2, NULL, NULL, NULL);
    mg_grpc_client *peer = mg_tc_client(gw->grpc_addr, PEER_TOKEN, NULL, NULL, NULL);
    char *d = NULL;

    cr_assert_eq(send_with(none, "bob", &d), GRPC_STATUS_UNAUTHENTICATED, "no token: %s", d);
    free(d);
    cr_assert_eq(send_with(wrong, "bob", &d), GRPC_STATUS_UNAUTHENTICATED, "wrong token: %s", d);
    free(d);
    cr_assert_eq(send_with(svc, "bob", &d), GRPC_STATUS_OK, "service token: %s", d);
    free(d);
    cr_assert_eq(send_with(svc2, "bob", &d), GRPC_STATUS_OK, "second service token: %s", d);
    free(d);
    /* a peer token is no service */
    cr_assert_eq(send_with(peer, "bob", &d), GRPC_STATUS_PERMISSION_DENIED, "%s", d);
    free(d);

    int st = -1;
    cr_assert_eq(mg_tc_deliver(none, "x", "bob", NULL, T_MS, &st, NULL),
                 GRPC_STATUS_UNAUTHENTICATED);
    cr_assert_eq(mg_tc_deliver(svc, "x", "bob", NULL, T_MS, &st, &d), GRPC_STATUS_PERMISSION_DENIED,
                 "service token on GatewayPeer: %s", d);
    free(d);
    /* a peer token delivers: to a connected user, and NOT_CONNECTED otherwise */
    mg_wsc *bob = mg_wsc_connect_user(gw->ws_port, "bob", T_MS, NULL);
    cr_assert_not_null(bob);
    cr_assert_eq(mg_tc_deliver(peer, "x", "nobody", NULL, T_MS, &st, &d), GRPC_STATUS_OK, "%s", d);
    free(d);
    cr_assert_eq(st, ST_NOT_CONNECTED);
    /* bob's connection reaches its loop's hub shard just after the upgrade: retry briefly */
    for (int i = 0; i < 100; i++) {
        cr_assert_eq(mg_tc_deliver(peer, "x", "bob", NULL, T_MS, &st, &d), GRPC_STATUS_OK, "%s", d);
        free(d);
        if (st == ST_DELIVERED_PEER)
            break;
        usleep(20 * 1000);
    }
    cr_assert_eq(st, ST_DELIVERED_PEER);
    char *frame = NULL;
    for (int i = 0; i < 5 && !(frame && strstr(frame, "delivered by a peer")); i++) {
        free(frame); /* bob first gets the inbox messages the services sent */
        frame = mg_wsc_recv_text(bob, T_MS);
    }
    cr_assert(frame && strstr(frame, "delivered by a peer"), "bob got %s", frame);
    free(frame);
    mg_wsc_free(bob);

    /* health stays open (Kubernetes probes) */
    int hs = -1;
    cr_assert_eq(mg_tc_health(none, "", T_MS, &hs, NULL), GRPC_STATUS_OK);
    cr_assert_eq(hs, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);

    /* counted by the token's name */
    cr_assert_eq(metric(gw, "meshgate_grpc_auth_total{client=\"svc-a\",result=\"ok\"} "), 1);
    cr_assert_eq(metric(gw, "meshgate_grpc_auth_total{client=\"svc-a\",result=\"permission_"
                            "denied\"} "),
                 1);
    cr_assert_eq(metric(gw, "meshgate_grpc_auth_total{client=\"gw\",result=\"ok\"} "), 2);
    cr_assert_eq(metric(gw, "meshgate_grpc_auth_total{client=\"unknown\",result="
                            "\"unauthenticated\"} "),
                 1);
    cr_assert_eq(metric(gw, "meshgate_grpc_auth_total{client=\"none\",result="
                            "\"unauthenticated\"} "),
                 2);

    /* SendStream: the same rule, checked before any message is taken */
    size_t len;
    uint8_t *rq = mg_tc_stream_request("svc", "bob", "st-auth", "x", 1, &len);
    const uint8_t *rqs[] = {rq};
    mg_tc_stream_out so;
    cr_expect_eq(mg_tc_stream(gw->grpc_addr, NULL, rqs, &len, 1, T_MS, &so),
                 GRPC_STATUS_UNAUTHENTICATED, "stream without a token: %s", so.details);
    cr_expect_eq(so.n, 0);
    mg_tc_stream_out_free(&so);
    cr_expect_eq(mg_tc_stream(gw->grpc_addr, PEER_TOKEN, rqs, &len, 1, T_MS, &so),
                 GRPC_STATUS_PERMISSION_DENIED, "stream with a peer token: %s", so.details);
    mg_tc_stream_out_free(&so);
    cr_expect_eq(mg_tc_stream(gw->grpc_addr, API_TOKEN, rqs, &len, 1, T_MS, &so), GRPC_STATUS_OK,
                 "stream with a service token: %s", so.details);
    cr_expect_eq(so.n, 1);
    mg_tc_stream_out_free(&so);
    free(rq);

    mg_grpc_client_free(none);
    mg_grpc_client_free(wrong);
    mg_grpc_client_free(svc);
    mg_grpc_client_free(svc2);
    mg_grpc_client_free(peer);
    stop(gw);
}

Test(grpc_auth, bad_token_file_refuses_to_start, .timeout = 30)
{
    const char *args[] = {"--api-token-file", write_file("short", "svc:tooshort\n"), NULL};
    mg_gw *gw = mg_gw_spawn_nowait("ga-badfile", args);
    cr_assert_not_null(gw);
    cr_assert(mg_gw_wait(gw, 10000));
    cr_assert_neq(gw->exit_status, 0);
    cr_assert(mg_gw_log_contains(gw, "line 1: want name:token"));
    mg_gw_free(gw);
}

/* ---- mTLS ---------------------------------------------------------------------- */

/* A CA and three certificates signed by it in <tmpdir>: server (CN
 * meshgate-peer-server, SAN 127.0.0.1: this gateway's own, also used as a
 * peer's client certificate), svc (CN orders-api: a service) and a
 * self-signed rogue one. */
static void make_certs(void)
{
    char cmd[4096];
    snprintf(cmd, sizeof(cmd),
             "set -e; cd '%s'; exec >openssl.log 2>&1\n"
             "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext\n"
             "k='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'\n"
             "openssl req -x509 $k -keyout ca.key -out ca.pem -days 1 -subj /CN=mg-test-ca\n"
             "for c in server svc; do\n"
             "  cn=orders-api; [ $c = server ] && cn=meshgate-peer-server\n"
             "  openssl req $k -keyout $c.key -out $c.csr -subj /CN=$cn\n"
             "  openssl x509 -req -in $c.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
             "-days 1 -out $c.pem -extfile san.ext\n"
             "done\n"
             "openssl req -x509 $k -keyout rogue.key -out rogue.pem -days 1 -subj /CN=rogue\n",
             tmpdir());
    int rc = system(cmd);
    cr_assert_eq(rc, 0, "openssl failed: see %s/openssl.log", tmpdir());
}

static char *in_dir(const char *name)
{
    char *p = malloc(320);
    snprintf(p, 320, "%s/%s", tmpdir(), name);
    return p;
}

Test(grpc_auth, mtls_client_certificates, .timeout = 60)
{
    make_certs();
    char *ca = in_dir("ca.pem"), *scert = in_dir("server.pem"), *skey = in_dir("server.key");
    char *ccert = in_dir("svc.pem"), *ckey = in_dir("svc.key");
    char *rcert = in_dir("rogue.pem"), *rkey = in_dir("rogue.key");
    const char *args[] = {"--grpc-tls-cert",
                          scert,
                          "--grpc-tls-key",
                          skey,
                          "--grpc-client-ca",
                          ca,
                          "--grpc-peer-identity",
                          "meshgate-peer-",
                          NULL};
    mg_gw *gw = mg_gw_spawn("ga-mtls", args);
    cr_assert_not_null(gw);
    char *d = NULL;

    mg_grpc_client *svc = mg_tc_client(gw->grpc_addr, NULL, ca, ccert, ckey);
    cr_assert_eq(send_with(svc, "bob", &d), GRPC_STATUS_OK, "service certificate: %s", d);
    free(d);
    int st = -1;
    cr_assert_eq(mg_tc_deliver(svc, "x", "bob", NULL, T_MS, &st, &d), GRPC_STATUS_PERMISSION_DENIED,
                 "a service certificate on GatewayPeer: %s", d);
    free(d);

    mg_grpc_client *peer = mg_tc_client(gw->grpc_addr, NULL, ca, scert, skey);
    cr_assert_eq(mg_tc_deliver(peer, "x", "bob", NULL, T_MS, &st, &d), GRPC_STATUS_OK, "%s", d);
    free(d);
    cr_assert_eq(st, ST_NOT_CONNECTED);
    cr_assert_eq(send_with(peer, "bob", &d), GRPC_STATUS_PERMISSION_DENIED, "%s", d);
    free(d);

    /* no client certificate, an unknown one, or no TLS: the handshake fails */
    mg_grpc_client *nocert = mg_tc_client(gw->grpc_addr, NULL, ca, NULL, NULL);
    mg_grpc_client *rogue = mg_tc_client(gw->grpc_addr, NULL, ca, rcert, rkey);
    mg_grpc_client *plain = mg_tc_client(gw->grpc_addr, NULL, NULL, NULL, NULL);
    cr_assert_eq(send_with(nocert, "bob", &d), GRPC_STATUS_UNAVAILABLE, "no cert: %s", d);
    free(d);
    cr_assert_eq(send_with(rogue, "bob", &d), GRPC_STATUS_UNAVAILABLE, "rogue cert: %s", d);
    free(d);
    cr_assert_eq(send_with(plain, "bob", &d), GRPC_STATUS_UNAVAILABLE, "plaintext: %s", d);
    free(d);
    cr_assert_eq(metric(gw, "meshgate_grpc_auth_total{client=\"mtls-service\",result=\"ok\"} "), 1);

    mg_grpc_client_free(svc);
    mg_grpc_client_free(peer);
    mg_grpc_client_free(nocert);
    mg_grpc_client_free(rogue);
    mg_grpc_client_free(plain);
    stop(gw);
    free(ca), free(scert), free(skey), free(ccert), free(ckey), free(rcert), free(rkey);
}

/* ---- two gateways with peer tokens ----------------------------------------------- */

static mg_gw *meshed[3];

/* A gateway of the fleet under service svc (region: the default), then the
 * NULL-terminated auth arguments of tail. */
static mg_gw *spawn_meshed_with(const char *id, const char *svc, const char *const *tail)
{
    mg_gw *gw = mg_gw_spawn_fleet(id, svc, NULL, tail);
    cr_assert_not_null(gw, "gateway %s did not become ready", id);
    return gw;
}

static mg_gw *spawn_meshed(const char *id, const char *svc, const char *peer_file)
{
    const char *tail[] = {"--api-token-file", api_tokens(), "--peer-token-file", peer_file, NULL};
    return spawn_meshed_with(id, svc, tail);
}

/* SendMessage via c until the result is not STORED (presence of a fresh
 * connection may take a moment to be visible); the last result. */
static void send_until_routed(mg_grpc_client *c, const char *to, int *status, int *path,
                              char *reason, size_t rlen)
{
    for (int i = 0; i < 50; i++) {
        Meshgate__V1__SendMessageResponse *r = NULL;
        char *d = NULL;
        grpc_status_code st = mg_tc_send(c, "svc", to, NULL, "over the mesh", 1, 10000, &r, &d);
        cr_assert_eq(st, GRPC_STATUS_OK, "SendMessage: %s", d);
        free(d);
        *status = (int)r->result->status;
        *path = (int)r->result->path;
        snprintf(reason, rlen, "%s", r->result->reason ? r->result->reason : "");
        protobuf_c_message_free_unpacked(&r->base, NULL);
        if (*status != MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED)
            return;
        usleep(100 * 1000);
    }
}

Test(grpc_auth, peers_with_tokens_deliver_to_each_other, .timeout = 120)
{
    char svc[64], a_id[64], b_id[64], c_id[64], bob[64], ann[64];
    int pid = (int)getpid();
    snprintf(svc, sizeof(svc), "meshgate-ga%d", pid);
    snprintf(a_id, sizeof(a_id), "ga%d-a", pid);
    snprintf(b_id, sizeof(b_id), "ga%d-b", pid);
    snprintf(c_id, sizeof(c_id), "ga%d-c", pid);
    snprintf(bob, sizeof(bob), "bob-ga%d", pid);
    snprintf(ann, sizeof(ann), "ann-ga%d", pid);
    const char *peers = peer_tokens();
    meshed[0] = spawn_meshed(a_id, svc, peers);
    meshed[1] = spawn_meshed(b_id, svc, peers);
    cr_assert(mg_gw_wait_mesh(meshed, 2, 15000), "the gateways never saw each other");

    mg_wsc *wb = mg_wsc_connect_user(meshed[1]->ws_port, bob, T_MS, NULL);
    mg_wsc *wa = mg_wsc_connect_user(meshed[0]->ws_port, ann, T_MS, NULL);
    cr_assert(wb && wa);
    mg_grpc_client *ca = mg_tc_client(meshed[0]->grpc_addr, API_TOKEN, NULL, NULL, NULL);
    mg_grpc_client *cb = mg_tc_client(meshed[1]->grpc_addr, API_TOKEN, NULL, NULL, NULL);
    int status, path;
    char reason[200];
    send_until_routed(ca, bob, &status, &path, reason, sizeof(reason));
    cr_assert_eq(status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED, "a->b: %s",
                 reason);
    cr_assert_eq(path, MESHGATE__V1__PATH__PATH_GRPC, "a->b path %d", path);
    send_until_routed(cb, ann, &status, &path, reason, sizeof(reason));
    cr_assert_eq(status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED, "b->a: %s",
                 reason);
    cr_assert_eq(path, MESHGATE__V1__PATH__PATH_GRPC, "b->a path %d", path);
    cr_assert_geq(metric(meshed[1], "meshgate_grpc_auth_total{client=\"gw\",result=\"ok\"} "), 1);

    /* A gateway whose peer token the others do not know is refused by them:
     * its delivery fails (no Kafka to fall back to) with UNAUTHENTICATED. */
    meshed[2] = spawn_meshed(c_id, svc,
                             write_file("rogue-peer-tokens", "gw:rogue-peer-token-0123456789ab\n"));
    cr_assert(mg_gw_wait_mesh(meshed, 3, 15000), "the third gateway never joined");
    mg_grpc_client *cc = mg_tc_client(meshed[2]->grpc_addr, API_TOKEN, NULL, NULL, NULL);
    send_until_routed(cc, bob, &status, &path, reason, sizeof(reason));
    cr_assert_neq(status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED);
    cr_assert(strstr(reason, "UNAUTHENTICATED"), "c->b: status %d reason %s", status, reason);

    mg_grpc_client_free(ca);
    mg_grpc_client_free(cb);
    mg_grpc_client_free(cc);
    mg_wsc_free(wa);
    mg_wsc_free(wb);
    for (int i = 0; i < 3; i++)
        stop(meshed[i]);
}

/* Two gateways whose gRPC listeners are mTLS only: Consul's check (HTTP
 * /readyz, since the agent has no client certificate) passes, they list each
 * other, and a delivery goes over the peers' mutual TLS. */
Test(grpc_auth, mtls_peers_are_discovered_and_deliver, .timeout = 120)
{
    make_certs();
    char *ca = in_dir("ca.pem"), *scert = in_dir("server.pem"), *skey = in_dir("server.key");
    char *ccert = in_dir("svc.pem"), *ckey = in_dir("svc.key");
    char svc[64], ids[2][64], bob[64];
    int pid = (int)getpid();
    snprintf(svc, sizeof(svc), "meshgate-gt%d", pid);
    snprintf(bob, sizeof(bob), "bob-gt%d", pid);
    for (int i = 0; i < 2; i++) {
        snprintf(ids[i], sizeof(ids[i]), "gt%d-%c", pid, 'a' + i);
        const char *tail[] = {"--grpc-tls-cert",
                              scert,
                              "--grpc-tls-key",
                              skey,
                              "--grpc-client-ca",
                              ca,
                              "--grpc-peer-identity",
                              "meshgate-peer-",
                              NULL};
        meshed[i] = spawn_meshed_with(ids[i], svc, tail);
    }
    cr_assert(mg_gw_wait_mesh(meshed, 2, 20000),
              "the TLS gateways never passed Consul's check / saw each other");
    mg_wsc *wb = mg_wsc_connect_user(meshed[1]->ws_port, bob, T_MS, NULL);
    cr_assert_not_null(wb);
    mg_grpc_client *ca_cli = mg_tc_client(meshed[0]->grpc_addr, NULL, ca, ccert, ckey);
    int status, path;
    char reason[200];
    send_until_routed(ca_cli, bob, &status, &path, reason, sizeof(reason));
    cr_assert_eq(status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED, "a->b: %s",
                 reason);
    cr_assert_eq(path, MESHGATE__V1__PATH__PATH_GRPC, "a->b path %d", path);
    cr_assert_geq(
        metric(meshed[1], "meshgate_grpc_auth_total{client=\"mtls-peer\",result=\"ok\"} "), 1);
    mg_grpc_client_free(ca_cli);
    mg_wsc_free(wb);
    for (int i = 0; i < 2; i++)
        stop(meshed[i]);
    free(ca), free(scert), free(skey), free(ccert), free(ckey);
}
