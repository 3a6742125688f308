/* Integration tests of Consul discovery with real gateways and the real
 * Consul agent (tests/infra/consul.sh, 127.0.0.1:18500): registration,
 * peers seeing each other, departures (SIGKILL, SIGSTOP, SIGTERM) and
 * arrivals within stated bounds, and recovery after a Consul restart (on a
 * private agent so other tests are not disturbed).
 *
 * Bounds (check interval 1 s, check timeout 1 s):
 *   a new gateway appears in the others' tables  < 5 s after it is ready
 *   a SIGKILLed or SIGSTOPped gateway leaves them < 8 s
 *   SIGTERM deregisters: gone from Consul       < 3 s after the signal
 *   after a Consul restart, re-registered and seen again < 15 s
 * Measured figures are printed on stderr ("discovery: ...").
 * No Criterion .timeout: every wait here is bounded, and with .timeout
 * Criterion 2.4's parallel runner leaks 48 bytes that ASan reports.
 */
#include "test_discovery_util.h"

#define APPEAR_MS  5000
#define VANISH_MS  8000
#define DEREG_MS   3000
#define RESTART_MS 15000

static const char *consul(void)
{
    return mg_test_require_env("MESHGATE_TEST_CONSUL");
}

static void assert_sees(const mg_gw *gw, const mg_gw *other)
{
    json_t *e = dt_peer(gw, other->name);
    cr_assert_not_null(e, "%s does not see %s", gw->name, other->name);
    cr_assert_str_eq(json_string_value(json_object_get(e, "address")), other->grpc_addr);
    cr_assert_str_eq(json_string_value(json_object_get(e, "region")), "r1");
    cr_assert_eq(json_integer_value(json_object_get(e, "ws_port")), other->ws_port);
    json_decref(e);
}

static mg_gw *spawn_or_fail(const char *id, const char *addr)
{
    mg_gw *g = dt_spawn(id, addr, NULL);
    cr_assert_not_null(g, "gateway %s did not become ready", id);
    return g;
}

Test(discovery, gateways_register_and_see_each_other)
{
    mg_gw *a = spawn_or_fail("dta", consul());
    mg_gw *b = spawn_or_fail("dtb", consul());
    int64_t ab = dt_wait_peer(a, "dtb", true, APPEAR_MS + 5000);
    int64_t ba = dt_wait_peer(b, "dta", true, APPEAR_MS + 5000);
    cr_assert_geq(ab, 0, "a never saw b");
    cr_assert_geq(ba, 0, "b never saw a");
    assert_sees(a, b);
    assert_sees(b, a);

    /* Consul's own view: both passing, with our meta. */
    char path[256];
    snprintf(path, sizeof(path), "/v1/health/service/%s?passing", dt_service());
    json_t *j = NULL;
    cr_assert_eq(dt_consul_get(consul(), NULL, path, &j), 200);
    cr_assert_eq(json_array_size(j), 2);
    json_t *svc = json_object_get(json_array_get(j, 0), "Service");
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(svc, "Meta"), "region")),
                     "r1");
    cr_assert_eq(json_integer_value(json_object_get(svc, "Port")) > 0, 1);
    json_decref(j);

    /* A third gateway appears in both tables. */
    mg_gw *c = spawn_or_fail("dtc", consul());
    int64_t ac = dt_wait_peer(a, "dtc", true, APPEAR_MS);
    int64_t bc = dt_wait_peer(b, "dtc", true, APPEAR_MS);
    cr_assert(ac >= 0 && bc >= 0, "dtc not seen within %d ms (a=%lld b=%lld)", APPEAR_MS,
              (long long)ac, (long long)bc);
    cr_assert_geq(dt_wait_peer(c, "dta", true, APPEAR_MS), 0);
    cr_assert_geq(dt_wait_peer(c, "dtb", true, APPEAR_MS), 0);
    assert_sees(c, a);
    assert_sees(a, c);
    fprintf(stderr, "discovery: new gateway seen by peers %lld / %lld ms after it was ready\n",
            (long long)ac, (long long)bc);

    json_t *pa = dt_peers(a);
    cr_assert_eq(json_integer_value(json_object_get(pa, "count")), 2, "self is not a peer");
    json_decref(pa);
    char *metrics = NULL;
    cr_assert_eq(mg_http_get(a->ws_port, "/metrics", &metrics), 200);
    cr_assert(strstr(metrics, "meshgate_peers 2"), "peer count metric");
    cr_assert(strstr(metrics, "meshgate_peers_age_seconds "), "table age metric");
    free(metrics);

    cr_assert_eq(mg_gw_stop(c), 0);
    cr_assert_eq(mg_gw_stop(b), 0);
    cr_assert_eq(mg_gw_stop(a), 0);
    mg_gw_free(a);
    mg_gw_free(b);
    mg_gw_free(c);
}

/* Gateways <p>a, <p>b, <p>c; <p>c leaves by `sig`. Ids differ per test: the
 * agent keys services by ID alone, whatever their name. */
static void departure(int sig, const char *what, const char *p)
{
    char ia[16], ib[16], ic[16];
    snprintf(ia, sizeof(ia), "%sa", p);
    snprintf(ib, sizeof(ib), "%sb", p);
    snprintf(ic, sizeof(ic), "%sc", p);
    mg_gw *a = spawn_or_fail(ia, consul());
    mg_gw *b = spawn_or_fail(ib, consul());
    mg_gw *c = spawn_or_fail(ic, consul());
    cr_assert_geq(dt_wait_peer(a, ic, true, APPEAR_MS + 5000), 0);
    cr_assert_geq(dt_wait_peer(b, ic, true, APPEAR_MS + 5000), 0);

    mg_gw_kill(c, sig);
    int64_t t0 = mg_mono_ms();
    int64_t ta = dt_wait_peer(a, ic, false, VANISH_MS);
    int64_t tb = dt_wait_peer(b, ic, false, VANISH_MS - (int)(mg_mono_ms() - t0));
    cr_assert(ta >= 0 && tb >= 0, "%s gateway still in tables after %d ms", what, VANISH_MS);
    fprintf(stderr, "discovery: %s gateway left peers' tables after %lld ms (both: %lld ms)\n",
            what, (long long)ta, (long long)(mg_mono_ms() - t0));
    cr_assert(dt_has_peer(a, ib) && dt_has_peer(b, ia), "the others stay");
    cr_assert(dt_consul_has(consul(), ic), "critical, not yet deregistered");

    if (sig == SIGSTOP) {
        mg_gw_kill(c, SIGCONT);
        int64_t back = dt_wait_peer(a, ic, true, APPEAR_MS);
        cr_assert_geq(back, 0, "a resumed gateway comes back");
        fprintf(stderr, "discovery: resumed gateway back after %lld ms\n", (long long)back);
        cr_assert_eq(mg_gw_stop(c), 0);
    } else {
        /* it stays registered (critical) until DeregisterCriticalServiceAfter */
        char path[64];
        snprintf(path, sizeof(path), "/v1/agent/service/deregister/%s", ic);
        dt_consul_put(consul(), NULL, path, NULL); /* tidy up */
    }
    cr_assert_eq(mg_gw_stop(b), 0);
    cr_assert_eq(mg_gw_stop(a), 0);
    mg_gw_free(a);
    mg_gw_free(b);
    mg_gw_free(c);
}

Test(discovery, sigkilled_gateway_leaves_tables)
{
    departure(SIGKILL, "SIGKILLed", "dk");
}

Test(discovery, sigstopped_gateway_leaves_tables_and_comes_back)
{
    departure(SIGSTOP, "SIGSTOPped", "dp");
}

Test(discovery, sigterm_deregisters_at_once)
{
    mg_gw *a = spawn_or_fail("dsa", consul());
    mg_gw *b = spawn_or_fail("dsb", consul());
    cr_assert_geq(dt_wait_peer(a, "dsb", true, APPEAR_MS + 5000), 0);
    cr_assert(dt_consul_has(consul(), "dsb"));
    int64_t t0 = mg_mono_ms();
    mg_gw_kill(b, SIGTERM);
    int64_t gone = -1;
    while (mg_mono_ms() - t0 < DEREG_MS) {
        if (!dt_consul_has(consul(), "dsb")) {
            gone = mg_mono_ms() - t0;
            break;
        }
        usleep(20000);
    }
    cr_assert_geq(gone, 0, "still registered %d ms after SIGTERM", DEREG_MS);
    int64_t left = dt_wait_peer(a, "dsb", false, DEREG_MS);
    cr_assert_geq(left, 0);
    fprintf(stderr,
            "discovery: SIGTERM -> deregistered in %lld ms, out of peer table %lld ms later\n",
            (long long)gone, (long long)left);
    cr_assert(mg_gw_wait(b, 30000));
    cr_assert_eq(b->exit_status, 0);
    cr_assert(mg_gw_log_contains(b, "deregistered id=dsb"));
    cr_assert_eq(mg_gw_stop(a), 0);
    mg_gw_free(a);
    mg_gw_free(b);
}

Test(discovery, consul_restart_reregisters_and_watch_recovers)
{
    dt_agent ag = {0};
    dt_agent_start(&ag);
    mg_gw *a = spawn_or_fail("dra", ag.addr);
    mg_gw *b = spawn_or_fail("drb", ag.addr);
    cr_assert_geq(dt_wait_peer(a, "drb", true, APPEAR_MS + 5000), 0);
    cr_assert_geq(dt_wait_peer(b, "dra", true, APPEAR_MS + 5000), 0);

    /* Consul goes away: the last known peers stay. */
    dt_agent_kill(&ag, SIGKILL);
    usleep(3000000);
    cr_assert(dt_has_peer(a, "drb") && dt_has_peer(b, "dra"), "peers kept while Consul is down");
    json_t *pa = dt_peers(a);
    cr_assert_geq(json_integer_value(json_object_get(pa, "age_ms")), 2000, "the table ages");
    json_decref(pa);
    cr_assert(mg_gw_log_contains(a, "watch failing"));

    /* A fresh dev agent on the same port knows nothing: both re-register. */
    dt_agent_start(&ag);
    int64_t t0 = mg_mono_ms();
    int64_t reg = -1;
    while (mg_mono_ms() - t0 < RESTART_MS) {
        if (dt_consul_has(ag.addr, "dra") && dt_consul_has(ag.addr, "drb")) {
            reg = mg_mono_ms() - t0;
            break;
        }
        usleep(100000);
    }
    cr_assert_geq(reg, 0, "not re-registered within %d ms", RESTART_MS);
    cr_assert_geq(dt_wait_peer(a, "drb", true, RESTART_MS), 0);
    cr_assert_geq(dt_wait_peer(b, "dra", true, RESTART_MS), 0);
    pa = dt_peers(a);
    cr_assert_lt(json_integer_value(json_object_get(pa, "age_ms")), 2000, "fresh again");
    json_decref(pa);
    cr_assert(mg_gw_log_contains(a, "watch recovered"));
    cr_assert(mg_gw_log_contains(a, "re-registering"));
    fprintf(stderr, "discovery: after a Consul restart both re-registered in %lld ms\n",
            (long long)reg);

    /* The watchers really recovered: a new gateway is seen. */
    mg_gw *c = spawn_or_fail("drc", ag.addr);
    cr_assert_geq(dt_wait_peer(a, "drc", true, APPEAR_MS), 0);
    cr_assert_geq(dt_wait_peer(b, "drc", true, APPEAR_MS), 0);

    cr_assert_eq(mg_gw_stop(c), 0);
    cr_assert_eq(mg_gw_stop(b), 0);
    cr_assert_eq(mg_gw_stop(a), 0);
    mg_gw_free(a);
    mg_gw_free(b);
    mg_gw_free(c);
    dt_agent_stop(&ag);
}
