/* Unit tests for the Consul client and watcher (consul_http.c, consul.c)
 * against a raw loopback HTTP server serving canned answers: status and
 * error mapping, the ACL header, truncated and malformed answers (the table
 * is kept), blocking-query index use, re-registration when the agent forgets
 * us, and mg_consul_stop not waiting for a blocking query. The real agent is
 * exercised by tests/integration/test_discovery*.c. */
#include "common/mg_time.h"
#include "discovery/consul.h"
#include "discovery/consul_internal.h"
#include "discovery/fake_http.h"
#include "discovery/peers.h"

#include <criterion/criterion.h>
#include <errno.h>

static const char ONE_PEER[] =
    "[{\"Node\":{\"Node\":\"n\",\"Address\":\"127.0.0.1\"},\"Service\":{\"ID\":\"gw2\","
    "\"Address\":\"127.0.0.1\",\"Port\":50052,\"Meta\":{\"region\":\"r1\"}}}]";

/* ---- plain requests ---- */

static char *answer_by_path(fake_http *f, const char *method, const char *path, const char *headers,
                            const char *body)
{
    if (strstr(path, "/ok"))
        return fake_answer(200, "X-Consul-Index: 77\r\n", "[]");
    if (strstr(path, "/forbidden"))
        return fake_answer(403, NULL, "ACL not found");
    if (strstr(path, "/missing"))
        return fake_answer(404, NULL, "");
    if (strstr(path, "/truncated"))
        return strdup("HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n[{\"Se");
    if (strstr(path, "/garbage"))
        return strdup("SSH-2.0-OpenSSH\r\n\r\n");
    if (strstr(path, "/badindex"))
        return fake_answer(200, "X-Consul-Index: abc\r\n", "[]");
    if (strstr(path, "/echo"))
        return fake_answer(200, NULL, body);
    return NULL; /* hang */
}

Test(consul_client, status_and_error_mapping)
{
    fake_http *f = fake_http_start(answer_by_path, NULL);
    cr_assert_not_null(f);
    char addr[64];
    snprintf(addr, sizeof(addr), "http://127.0.0.1:%d/", f->port);
    mg_consul_http h;
    cr_assert_eq(mg_consul__http_init(&h, addr, "s3cret", NULL), 0);
    mg_consul_resp r;

    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/ok", NULL, 2000, &r), 0, "%s", r.err);
    cr_assert_eq(r.status, 200);
    cr_assert_eq(r.index, 77);
    cr_assert_str_eq(r.body, "[]");
    mg_consul__resp_free(&r);
    cr_assert_str_eq(f->token, "s3cret", "X-Consul-Token sent");

    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/forbidden", NULL, 2000, &r), -EACCES);
    cr_assert(strstr(r.err, "403"), "%s", r.err);
    mg_consul__resp_free(&r);
    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/missing", NULL, 2000, &r), -ENOENT);
    mg_consul__resp_free(&r);
    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/truncated", NULL, 2000, &r), -EPROTO);
    cr_assert_neq(r.err[0], '\0');
    mg_consul__resp_free(&r);
    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/garbage", NULL, 2000, &r), -EPROTO);
    mg_consul__resp_free(&r);
    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/badindex", NULL, 2000, &r), 0);
    cr_assert_eq(r.index, -1, "a non-numeric index is ignored");
    mg_consul__resp_free(&r);
    cr_assert_eq(mg_consul__request(&h, "PUT", "/v1/echo", "{\"a\":1}", 2000, &r), 0);
    cr_assert_str_eq(r.body, "{\"a\":1}");
    mg_consul__resp_free(&r);

    int64_t t0 = mg_mono_ms();
    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/hang", NULL, 300, &r), -ETIMEDOUT);
    cr_assert_lt(mg_mono_ms() - t0, 1500);
    mg_consul__resp_free(&r);
    mg_consul__http_cleanup(&h);

    /* nothing listens on this port any more */
    int port = f->port;
    fake_http_stop(f);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    cr_assert_eq(mg_consul__http_init(&h, addr, "", NULL), 0);
    cr_assert_eq(mg_consul__request(&h, "GET", "/v1/ok", NULL, 2000, &r), -ECONNREFUSED);
    mg_consul__resp_free(&r);
    mg_consul__http_cleanup(&h);

    cr_assert_eq(mg_consul__http_init(&h, "nope://x", "", NULL), -EINVAL);
    cr_assert_eq(mg_consul__http_init(&h, "127.0.0.1:1", "a\r\nb", NULL), -EINVAL);
}

/* ---- the watcher ---- */

struct script {
    atomic_int phase;       /* what the health endpoint answers */
    atomic_int agent_knows; /* 0: /v1/agent/service/<id> answers 404 */
    atomic_int register_status;
    atomic_int max_index_seen;
};

static char *consul_like(fake_http *f, const char *method, const char *path, const char *headers,
                         const char *body)
{
    struct script *s = f->arg;
    if (strstr(path, "/v1/agent/service/register")) {
        int st = atomic_load(&s->register_status);
        if (st == 200)
            atomic_store(&s->agent_knows, 1);
        return fake_answer(st, NULL, st == 200 ? "" : "Permission denied");
    }
    if (strstr(path, "/v1/agent/service/deregister/"))
        return fake_answer(200, NULL, "");
    if (strstr(path, "/v1/agent/service/"))
        return atomic_load(&s->agent_knows) ? fake_answer(200, NULL, "{}")
                                            : fake_answer(404, NULL, "unknown service ID");
    if (strstr(path, "/v1/health/service/meshgate?passing")) {
        const char *ix = strstr(path, "index=");
        int want = ix ? atoi(ix + 6) : 0;
        if (want > atomic_load(&s->max_index_seen))
            atomic_store(&s->max_index_seen, want);
        switch (atomic_load(&s->phase)) {
        case 0: /* good, index 10; blocks when asked for > 10 */
            if (want >= 10)
                return NULL;
            return fake_answer(200, "X-Consul-Index: 10\r\n", ONE_PEER);
        case 1:
            return fake_answer(200, "X-Consul-Index: 11\r\n",
                               "[{\"Service\":"); /* truncated JSON */
        case 2:
            return strdup("HTTP/1.1 200 OK\r\nContent-Length: 500\r\nConnection: close\r\n\r\n[");
        case 3:
            return fake_answer(500, NULL, "rpc error: No cluster leader");
        default: /* agent restarted: small index, empty */
            return fake_answer(200, "X-Consul-Index: 3\r\n", "[]");
        }
    }
    return fake_answer(404, NULL, "");
}

static mg_consul_config cfg_for(int port, char *addr, size_t addrlen)
{
    snprintf(addr, addrlen, "127.0.0.1:%d", port);
    return (mg_consul_config){.addr = addr,
                              .token = "tok",
                              .service = "meshgate",
                              .gateway_id = "gw1",
                              .region = "r1",
                              .version = "0.1.0",
                              .advertise_addr = "127.0.0.1",
                              .grpc_port = 50051,
                              .ws_port = 8080,
                              .check_interval_seconds = 1,
                              .deregister_after_seconds = 60};
}

static size_t peer_count(mg_peers *p)
{
    mg_peer_set *s = mg_peers_acquire(p);
    size_t n = mg_peer_set_count(s);
    mg_peer_set_release(s);
    return n;
}

static bool wait_count(mg_peers *p, size_t n, int ms)
{
    int64_t end = mg_mono_ms() + ms;
    while (mg_mono_ms() < end) {
        if (peer_count(p) == n)
            return true;
        usleep(20000);
    }
    return peer_count(p) == n;
}

Test(consul_client, watcher_keeps_peers_on_bad_answers_and_stops_fast)
{
    struct script s = {.register_status = 200};
    fake_http *f = fake_http_start(consul_like, &s);
    char addr[64];
    mg_consul_config cfg = cfg_for(f->port, addr, sizeof(addr));
    mg_peers *p = mg_peers_create("gw1", NULL, 0);
    mg_consul *c = mg_consul_create(&cfg, p);
    cr_assert_eq(mg_consul_start(c), 0);
    cr_assert_str_eq(f->token, "tok");
    cr_assert(wait_count(p, 1, 3000), "the peer arrives");
    /* Then the watcher blocks on index 10. */
    int64_t end = mg_mono_ms() + 3000;
    while (atomic_load(&s.max_index_seen) < 10 && mg_mono_ms() < end)
        usleep(20000);
    cr_assert_eq(atomic_load(&s.max_index_seen), 10, "blocking query uses X-Consul-Index");

    for (int phase = 1; phase <= 3; phase++) {
        int before = fake_http_count(f, "GET /v1/health");
        atomic_store(&s.phase, phase);
        /* the blocking query in flight gets the bad answer at once; then
         * the watcher retries with backoff (up to 5 s plus jitter, and
         * it keeps growing across phases: two retries may take 11 s) */
        end = mg_mono_ms() + 15000;
        while (fake_http_count(f, "GET /v1/health") < before + 2 && mg_mono_ms() < end)
            usleep(20000);
        cr_assert_geq(fake_http_count(f, "GET /v1/health"), before + 2, "phase %d: retries", phase);
        cr_assert_eq(peer_count(p), 1, "phase %d: last known peers kept", phase);
    }
    atomic_store(&s.phase, 0);
    /* recovered: the watcher blocks on index 10 again */
    int before = fake_http_count(f, "GET /v1/health");
    end = mg_mono_ms() + 8000;
    while (fake_http_count(f, "GET /v1/health") < before + 2 && mg_mono_ms() < end)
        usleep(20000);
    cr_assert_geq(fake_http_count(f, "GET /v1/health"), before + 2);
    cr_assert_eq(peer_count(p), 1);
    usleep(300000); /* let it enter the blocking query */

    int64_t t0 = mg_mono_ms();
    mg_consul_stop(c);
    int64_t took = mg_mono_ms() - t0;
    cr_assert_lt(took, 1000, "stop does not wait for the blocking query (%lld ms)",
                 (long long)took);
    cr_assert_eq(fake_http_count(f, "PUT /v1/agent/service/deregister/gw1"), 1);
    mg_consul_free(c);
    mg_peers_free(p);
    fake_http_stop(f);
}

Test(consul_client, reregisters_when_the_agent_forgot_us)
{
    struct script s = {.register_status = 200, .phase = 4};
    fake_http *f = fake_http_start(consul_like, &s);
    char addr[64];
    mg_consul_config cfg = cfg_for(f->port, addr, sizeof(addr));
    mg_peers *p = mg_peers_create("gw1", NULL, 0);
    mg_consul *c = mg_consul_create(&cfg, p);
    cr_assert_eq(mg_consul_start(c), 0);
    cr_assert_eq(fake_http_count(f, "PUT /v1/agent/service/register"), 1);
    atomic_store(&s.agent_knows, 0); /* the agent restarted and lost us */
    int64_t end = mg_mono_ms() + 6000;
    while (fake_http_count(f, "PUT /v1/agent/service/register") < 2 && mg_mono_ms() < end)
        usleep(20000);
    cr_assert_eq(fake_http_count(f, "PUT /v1/agent/service/register"), 2,
                 "self missing from ?passing -> agent check -> re-register");
    mg_consul_free(c); /* stops and deregisters */
    cr_assert_eq(fake_http_count(f, "PUT /v1/agent/service/deregister/gw1"), 1);
    mg_peers_free(p);
    fake_http_stop(f);
}

Test(consul_client, start_reports_why_it_cannot_register)
{
    struct script s = {.register_status = 403};
    fake_http *f = fake_http_start(consul_like, &s);
    char addr[64];
    mg_consul_config cfg = cfg_for(f->port, addr, sizeof(addr));
    mg_peers *p = mg_peers_create("gw1", NULL, 0);
    mg_consul *c = mg_consul_create(&cfg, p);
    cr_assert_eq(mg_consul_start(c), -EACCES);
    mg_consul_free(c);

    atomic_store(&s.register_status, 500);
    c = mg_consul_create(&cfg, p);
    cr_assert_eq(mg_consul_start(c), -EPROTO);
    mg_consul_free(c);
    int port = f->port;
    fake_http_stop(f);

    c = mg_consul_create(&cfg, p); /* nobody listens there now */
    cr_assert_eq(mg_consul_start(c), -ECONNREFUSED);
    mg_consul_free(c);
    (void)port;

    mg_consul_config bad = cfg;
    bad.addr = "ftp://x";
    c = mg_consul_create(&bad, p);
    cr_assert_eq(mg_consul_start(c), -EINVAL);
    mg_consul_free(c);
    bad = cfg;
    bad.gateway_id = "";
    c = mg_consul_create(&bad, p);
    cr_assert_eq(mg_consul_start(c), -EINVAL);
    mg_consul_free(c);
    mg_consul_free(NULL);
    mg_peers_free(p);
}
