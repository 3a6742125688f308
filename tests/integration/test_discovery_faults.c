/* Integration tests of discovery under bad input and faults, with real
 * gateways: a wrong Consul address and a refused ACL token stop the gateway
 * at start with the reason; the right token works (real ACL-enabled agent,
 * tests/infra/consul.sh start-acl on 127.0.0.1:18600); a malformed or
 * truncated Consul answer (a raw TCP server on loopback serving canned
 * HTTP) keeps the last known peers; a peer entry with a bad address in the
 * real Consul is skipped and logged while the others are kept. */
#include "discovery/fake_http.h"
#include "test_discovery_util.h"

static bool exits_with(mg_gw *g, const char *needle)
{
    cr_assert_not_null(g);
    cr_assert(mg_gw_wait(g, 20000), "%s should exit at start", g->name);
    cr_assert_neq(g->exit_status, 0, "non-zero exit");
    return mg_gw_log_contains(g, needle);
}

static const char *const *dargs(const char *consul, const char *token)
{
    static const char *a[16];
    int n = 0;
    a[n++] = "--discovery";
    a[n++] = "consul";
    a[n++] = "--consul-addr";
    a[n++] = consul;
    a[n++] = "--consul-service";
    a[n++] = dt_service();
    a[n++] = "--consul-check-interval-seconds";
    a[n++] = "1";
    if (token) {
        a[n++] = "--consul-token";
        a[n++] = token;
    }
    a[n] = NULL;
    return a;
}

Test(discovery_faults, wrong_consul_address_fails_start)
{
    char addr[64];
    snprintf(addr, sizeof(addr), "http://127.0.0.1:%d", mg_test_free_port()); /* nobody there */
    mg_gw *g = mg_gw_spawn_nowait("dfa", dargs(addr, NULL));
    cr_assert(exits_with(g, "connection refused"), "log says why (see %s)", g->log_path);
    mg_gw_free(g);

    g = mg_gw_spawn_nowait("dfb", dargs("ftp://127.0.0.1:1", NULL));
    cr_assert(exits_with(g, "consul"), "bad address form is reported (see %s)", g->log_path);
    mg_gw_free(g);
}

Test(discovery_faults, acl_token_refused_then_accepted)
{
    const char *acl = mg_test_require_env("MESHGATE_TEST_CONSUL_ACL");
    const char *tok = mg_test_require_env("MESHGATE_TEST_CONSUL_ACL_TOKEN");

    mg_gw *g = mg_gw_spawn_nowait("dacl1", dargs(acl, NULL));
    cr_assert(exits_with(g, "ACL token refused"), "no token: 403 reported (see %s)", g->log_path);
    mg_gw_free(g);
    g = mg_gw_spawn_nowait("dacl2", dargs(acl, "00000000-0000-0000-0000-000000000000"));
    cr_assert(exits_with(g, "ACL token refused"), "unknown token (see %s)", g->log_path);
    mg_gw_free(g);

    /* CONSUL_HTTP_TOKEN as Consul's own tools use it, and the flag. */
    setenv("CONSUL_HTTP_TOKEN", tok, 1);
    mg_gw *a = mg_gw_spawn("dacl3", dargs(acl, NULL));
    unsetenv("CONSUL_HTTP_TOKEN");
    cr_assert_not_null(a, "the env token is used");
    mg_gw *b = mg_gw_spawn("dacl4", dargs(acl, tok));
    cr_assert_not_null(b, "the flag token is used");
    cr_assert_geq(dt_wait_peer(a, "dacl4", true, 10000), 0, "watch works with the token");
    cr_assert_geq(dt_wait_peer(b, "dacl3", true, 10000), 0);
    cr_assert_eq(mg_gw_stop(b), 0);
    cr_assert_eq(mg_gw_stop(a), 0);
    mg_gw_free(a);
    mg_gw_free(b);
}

/* ---- a raw server that registers fine and then answers badly ---- */

struct canned {
    atomic_int phase; /* 0 good, 1 malformed, 2 truncated, 3 good again */
};

static char *canned_consul(fake_http *f, const char *method, const char *path, const char *headers,
                           const char *body)
{
    struct canned *c = f->arg;
    if (strncmp(path, "/v1/agent/", 10) == 0)
        return fake_answer(200, NULL, "{}");
    if (strncmp(path, "/v1/health/service/", 19) != 0)
        return fake_answer(404, NULL, "");
    int ph = atomic_load(&c->phase);
    if (strstr(path, "index=") && strstr(path, "index=5&") && ph == 0)
        return NULL; /* block while nothing changes */
    switch (ph) {
    case 0:
    case 3:
        return fake_answer(200, "X-Consul-Index: 5\r\n",
                           "[{\"Node\":{\"Address\":\"127.0.0.1\"},\"Service\":{\"ID\":\"ghost\","
                           "\"Address\":\"127.0.0.1\",\"Port\":1,\"Meta\":{\"region\":\"r9\"}}}]");
    case 1:
        return fake_answer(200, "X-Consul-Index: 6\r\n", "<html>502 Bad Gateway</html>");
    default:
        return strdup("HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: 4000\r\n"
                      "Connection: close\r\n\r\n[{\"Node\":{\"Address\":");
    }
}

Test(discovery_faults, malformed_and_truncated_answers_keep_last_peers)
{
    struct canned st = {0};
    fake_http *f = fake_http_start(canned_consul, &st);
    cr_assert_not_null(f);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", f->port);
    mg_gw *g = mg_gw_spawn("dmal", dargs(addr, NULL));
    cr_assert_not_null(g);
    cr_assert_geq(dt_wait_peer(g, "ghost", true, 5000), 0);

    for (int ph = 1; ph <= 2; ph++) {
        atomic_store(&st.phase, ph);
        int n0 = fake_http_count(f, "GET /v1/health");
        int64_t end = mg_mono_ms() + 10000;
        while (fake_http_count(f, "GET /v1/health") < n0 + 2 && mg_mono_ms() < end)
            usleep(50000);
        cr_assert_geq(fake_http_count(f, "GET /v1/health"), n0 + 2, "the watcher retries");
        json_t *e = dt_peer(g, "ghost");
        cr_assert_not_null(e, "phase %d: last known peer kept", ph);
        cr_assert_str_eq(json_string_value(json_object_get(e, "region")), "r9");
        json_decref(e);
        cr_assert(mg_gw_log_contains(g, "watch failing"));
    }
    cr_assert(mg_gw_log_contains(g, "malformed JSON"), "the reason is logged (see %s)",
              g->log_path);
    atomic_store(&st.phase, 3);
    int64_t end = mg_mono_ms() + 10000;
    while (!mg_gw_log_contains(g, "watch recovered") && mg_mono_ms() < end)
        usleep(50000);
    cr_assert(mg_gw_log_contains(g, "watch recovered"));
    cr_assert(dt_has_peer(g, "ghost"));
    cr_assert_eq(mg_gw_stop(g), 0);
    cr_assert_geq(fake_http_count(f, "PUT /v1/agent/service/deregister/dmal"), 1);
    mg_gw_free(g);
    fake_http_stop(f);
}

Test(discovery_faults, peer_with_bad_address_is_skipped)
{
    const char *consul = mg_test_require_env("MESHGATE_TEST_CONSUL");
    /* Entries without checks count as passing. */
    char body[512];
    snprintf(body, sizeof(body),
             "{\"ID\":\"bogus1\",\"Name\":\"%s\",\"Address\":\"not a host!\",\"Port\":50051,"
             "\"Meta\":{\"region\":\"r1\"}}",
             dt_service());
    cr_assert_eq(dt_consul_put(consul, NULL, "/v1/agent/service/register", body), 200);
    snprintf(body, sizeof(body),
             "{\"ID\":\"bogus2\",\"Name\":\"%s\",\"Address\":\"127.0.0.1\",\"Port\":0}",
             dt_service());
    cr_assert_eq(dt_consul_put(consul, NULL, "/v1/agent/service/register", body), 200);

    mg_gw *a = dt_spawn("dba", consul, NULL);
    mg_gw *b = dt_spawn("dbb", consul, NULL);
    cr_assert(a && b);
    cr_assert_geq(dt_wait_peer(a, "dbb", true, 10000), 0, "good peers are kept");
    cr_assert_not(dt_has_peer(a, "bogus1"));
    cr_assert_not(dt_has_peer(a, "bogus2"));
    cr_assert(mg_gw_log_contains(a, "bad address peer=bogus1"), "logged (see %s)", a->log_path);
    cr_assert(mg_gw_log_contains(a, "peer=bogus2"));

    dt_consul_put(consul, NULL, "/v1/agent/service/deregister/bogus1", NULL);
    dt_consul_put(consul, NULL, "/v1/agent/service/deregister/bogus2", NULL);
    cr_assert_eq(mg_gw_stop(b), 0);
    cr_assert_eq(mg_gw_stop(a), 0);
    mg_gw_free(a);
    mg_gw_free(b);
}
