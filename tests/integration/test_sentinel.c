/* Gateways with --presence redis-sentinel against the real Sentinel setup of
 * tests/infra/redis-sentinel.sh: two gateways share presence and the inbox on
 * the primary the Sentinels name (a send from one reaches a user of the
 * other by gRPC direct; an offline user's message is STORED and delivered on
 * connect); the primary SIGKILLed: sends are DELIVERED and STORED again
 * within the documented time (MG_SENTINEL_RECOVERY_BOUND_MS, README "Redis
 * Sentinel") and nothing STORED is lost; a bad Sentinel configuration stops
 * the gateway with an error naming it.
 *
 * Isolation: a Consul service name and user names of our own (pid in each);
 * the tests hold the Sentinel lock exclusively (support/mg_sentinel.h). */
#include "common/mg_time.h"
#include "support/grpc_client.h"
#include "support/mg_sentinel.h"
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ST_DELIVERED MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED
#define ST_STORED    MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED

static void setup(void)
{
    mg_sentinel_lock(1);
}

TestSuite(sentinel_gw, .init = setup, .fini = mg_sentinel_unlock, .timeout = 180);

typedef struct sent {
    grpc_status_code code;
    int status, path;
} sent;

static sent send_to(mg_grpc_client *c, const char *to, const char *id)
{
    sent s = {.code = GRPC_STATUS_UNKNOWN, .status = -1, .path = -1};
    Meshgate__V1__SendMessageResponse *r = NULL;
    s.code = mg_tc_send(c, "sentinel-test", to, id, id, 1, 5000, &r, NULL);
    if (s.code == GRPC_STATUS_OK && r && r->result) {
        s.status = (int)r->result->status;
        s.path = (int)r->result->path;
    }
    if (r)
        protobuf_c_message_free_unpacked(&r->base, NULL);
    return s;
}

/* Reads message frames on c until one with id arrives (or timeout_ms). */
static bool got_message(mg_wsc *c, const char *id, int timeout_ms)
{
    int64_t end = mg_mono_ms() + timeout_ms;
    while (mg_mono_ms() < end) {
        json_t *j = mg_wsc_recv_json(c, 500);
        if (!j)
            continue;
        bool hit = !strcmp(mg_json_str(j, "type"), "message") && !strcmp(mg_json_str(j, "id"), id);
        json_decref(j);
        if (hit)
            return true;
    }
    return false;
}

/* Two gateways of one fleet on the Sentinel primary; user u1 connected to
 * gateway 1, a gRPC client of gateway 2. */
typedef struct pair {
    mg_gw *g1, *g2;
    mg_wsc *w1;
    mg_grpc_client *c2;
} pair;

/* Gateways tag-1 and tag-2 with presence and inbox on the primary the
 * Sentinels name, in one Consul fleet (service meshgate-tag), then extra
 * (NULL-terminated): both ready, gateway 2 lists gateway 1, u1 is connected
 * to gateway 1. */
static pair spawn_pair(const char *tag, const char *const *extra, const char *u1)
{
    char svc[64], id1[64], id2[64];
    snprintf(svc, sizeof(svc), "meshgate-%s", tag);
    snprintf(id1, sizeof(id1), "%s-1", tag);
    snprintf(id2, sizeof(id2), "%s-2", tag);
    const char *args[24] = {"--presence",
                            "redis-sentinel",
                            "--sentinel-nodes",
                            mg_test_require_env("MESHGATE_TEST_SENTINEL_NODES"),
                            "--sentinel-master",
                            mg_test_require_env("MESHGATE_TEST_SENTINEL_MASTER"),
                            "--discovery",
                            "consul",
                            "--consul-addr",
                            mg_test_require_env("MESHGATE_TEST_CONSUL"),
                            "--consul-service",
                            svc,
                            "--consul-check-interval-seconds",
                            "1"};
    size_t n = 14;
    for (size_t i = 0; extra[i]; i++) {
        cr_assert_lt(n, sizeof(args) / sizeof(args[0]) - 1, "too many arguments");
        args[n++] = extra[i];
    }
    pair p = {0};
    p.g1 = mg_gw_spawn(id1, args);
    cr_assert_not_null(p.g1, "gateway 1 did not become ready");
    p.g2 = mg_gw_spawn(id2, args);
    cr_assert_not_null(p.g2, "gateway 2 did not become ready");
    cr_assert(mg_gw_wait_peer(p.g2, id1, 20000), "gateway 2 never listed gateway 1");
    int http = 0;
    p.w1 = mg_wsc_connect_user(p.g1->ws_port, u1, 5000, &http);
    cr_assert_not_null(p.w1, "WebSocket to gateway 1: HTTP %d", http);
    p.c2 = mg_grpc_client_create(p.g2->grpc_addr, NULL);
    return p;
}

/* Sends tag-p0, tag-p1, ... to user via c until one is DELIVERED (a fresh
 * connection's presence takes a moment), at most 50, 100 ms apart. The
 * last one's id is left in id. */
static sent send_until_delivered(mg_grpc_client *c, const char *tag, const char *user, char *id,
                                 size_t idlen)
{
    sent s = {0};
    for (int k = 0; k < 50; k++) {
        snprintf(id, idlen, "%s-p%d", tag, k);
        s = send_to(c, user, id);
        if (s.status == ST_DELIVERED)
            break;
        usleep(100 * 1000);
    }
    return s;
}

/* Closes u1 and the client, and stops both gateways (gateway 2 first),
 * each expected to exit cleanly. */
static void stop_pair(pair *p)
{
    mg_grpc_client_free(p->c2);
    mg_wsc_free(p->w1);
    cr_expect_eq(mg_gw_stop(p->g2), 0, "gateway 2 exits cleanly");
    cr_expect_eq(mg_gw_stop(p->g1), 0, "gateway 1 exits cleanly");
    mg_gw_free(p->g2);
    mg_gw_free(p->g1);
}

Test(sentinel_gw, two_gateways_share_presence_and_inbox_across_a_failover)
{
    char tag[32], u1[64], u2[64], u3[64];
    snprintf(tag, sizeof(tag), "st%d", (int)getpid());
    snprintf(u1, sizeof(u1), "%s-online", tag);
    snprintf(u2, sizeof(u2), "%s-offline", tag);
    snprintf(u3, sizeof(u3), "%s-later", tag);
    const char *timeout[] = {"--redis-timeout-ms", "1000", NULL};
    pair p = spawn_pair(tag, timeout, u1);
    cr_assert(mg_gw_log_contains(p.g1, "presence=redis-sentinel"), "see %s", p.g1->log_path);
    int http = 0;

    /* Presence through Sentinel: gateway 2 finds u1 on gateway 1. */
    char id[64];
    sent s = send_until_delivered(p.c2, tag, u1, id, sizeof(id));
    cr_assert_eq(s.status, ST_DELIVERED, "send to u1 via gateway 2: status %d path %d", s.status,
                 s.path);
    cr_expect_eq(s.path, MESHGATE__V1__PATH__PATH_GRPC);
    cr_assert(got_message(p.w1, id, 5000), "u1 did not get %s", id);

    /* The inbox through Sentinel: stored by gateway 2, delivered by gateway 1. */
    snprintf(id, sizeof(id), "%s-i1", tag);
    s = send_to(p.c2, u2, id);
    cr_assert_eq(s.status, ST_STORED, "offline send: status %d", s.status);
    mg_wsc *w2 = mg_wsc_connect_user(p.g1->ws_port, u2, 5000, &http);
    cr_assert_not_null(w2);
    cr_assert(got_message(w2, id, 5000), "u2 did not get %s from the inbox", id);
    mg_wsc_free(w2);

    /* Kill the primary: both kinds of send work again within the bound. */
    char old[64], now[64];
    mg_sentinel_kill_primary(old, sizeof(old));
    int64_t t0 = mg_mono_ms(), recovered = -1;
    int rounds = 0, stored = 0;
    char stored_ids[64][64];
    while (mg_mono_ms() - t0 < 30000) {
        rounds++;
        snprintf(id, sizeof(id), "%s-f%d", tag, rounds);
        sent a = send_to(p.c2, u1, id);
        snprintf(stored_ids[stored], sizeof(stored_ids[0]), "%s-s%d", tag, rounds);
        sent b = send_to(p.c2, u3, stored_ids[stored]);
        if (b.status == ST_STORED && stored < 63)
            stored++;
        if (a.status == ST_DELIVERED && b.status == ST_STORED) {
            recovered = mg_mono_ms() - t0;
            break;
        }
        usleep(100 * 1000);
    }
    mg_sentinel_new_primary(old, now, sizeof(now));
    cr_log_info("sentinel failover under two gateways: %s -> %s, DELIVERED and STORED again after "
                "%lld ms (%d rounds)",
                old, now, (long long)recovered, rounds);
    cr_assert_geq(recovered, 0, "sends not back within 30 s");
    cr_assert_lt(recovered, MG_SENTINEL_RECOVERY_BOUND_MS, "recovery took %lld ms",
                 (long long)recovered);
    cr_assert(got_message(p.w1, id, 5000), "u1 did not get %s after the failover", id);
    /* Every message answered STORED is delivered. */
    mg_wsc *w3 = mg_wsc_connect_user(p.g2->ws_port, u3, 5000, &http);
    cr_assert_not_null(w3);
    for (int k = 0; k < stored; k++)
        cr_expect(got_message(w3, stored_ids[k], 5000), "STORED %s lost", stored_ids[k]);
    mg_wsc_free(w3);

    /* The old primary rejoins as a replica in mg_sentinel_unlock. */
    stop_pair(&p);
}

/* Start-up errors name what is wrong, and the gateway exits non-zero. */
static void expect_start_error(const char *name, const char *const *args, const char *needle)
{
    mg_gw *gw = mg_gw_spawn_nowait(name, args);
    cr_assert_not_null(gw);
    cr_assert(mg_gw_wait(gw, 20000), "%s did not exit", name);
    cr_expect_neq(gw->exit_status, 0, "%s exited 0", name);
    cr_expect(mg_gw_log_contains(gw, needle), "%s: no \"%s\" in %s", name, needle, gw->log_path);
    mg_gw_free(gw);
}

Test(sentinel_gw, bad_sentinel_configuration_stops_the_gateway)
{
    const char *sentinels = mg_test_require_env("MESHGATE_TEST_SENTINEL_NODES");
    char dead[64], name[64];
    snprintf(dead, sizeof(dead), "127.0.0.1:%d", mg_test_free_port());
    const char *unreachable[] = {"--presence", "redis-sentinel",    "--sentinel-nodes",
                                 dead,         "--sentinel-master", "meshgate",
                                 NULL};
    snprintf(name, sizeof(name), "sbad1-%d", (int)getpid());
    expect_start_error(name, unreachable, dead);
    const char *unknown[] = {"--presence", "redis-sentinel",    "--sentinel-nodes",
                             sentinels,    "--sentinel-master", "nobody-monitors-this",
                             NULL};
    snprintf(name, sizeof(name), "sbad2-%d", (int)getpid());
    expect_start_error(name, unknown, "does not know master \"nobody-monitors-this\"");
    const char *missing[] = {"--presence", "redis-sentinel", NULL};
    snprintf(name, sizeof(name), "sbad3-%d", (int)getpid());
    expect_start_error(name, missing, "--presence redis-sentinel needs --sentinel-nodes");
}

/* The scaling guide's stage 2 in one piece: presence and inbox on a
 * Sentinel-managed primary, and the Redis Pub/Sub bus on that same primary
 * (sharded pub/sub works on a single Redis 7): a send between two gateways
 * goes by redis-pubsub and is DELIVERED by the target's receipt. */
Test(sentinel_gw, redis_pubsub_bus_on_the_sentinel_primary)
{
    char tag[32], u1[64];
    snprintf(tag, sizeof(tag), "sp%d", (int)getpid());
    snprintf(u1, sizeof(u1), "%s-user", tag);
    const char *bus[] = {"--redis-pubsub", "true", "--near-route", "redis-pubsub,inbox", NULL};
    pair p = spawn_pair(tag, bus, u1);
    char id[64];
    sent s = send_until_delivered(p.c2, tag, u1, id, sizeof(id));
    cr_assert_eq(s.status, ST_DELIVERED, "status %d path %d", s.status, s.path);
    cr_expect_eq(s.path, MESHGATE__V1__PATH__PATH_REDIS_PUBSUB, "path %d", s.path);
    cr_assert(got_message(p.w1, id, 5000), "u1 did not get %s", id);
    stop_pair(&p);
}
