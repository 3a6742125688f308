/* Unit tests for the peer table (src/discovery/peers.c): snapshots,
 * refcounts, channel reuse, bad addresses, the /peers JSON and the metrics. */
#include "common/mg_metrics.h"
#include "discovery/peers.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static mg_peer P(const char *id, const char *addr, const char *region)
{
    return (mg_peer){.id = (char *)id,
                     .address = (char *)addr,
                     .region = (char *)region,
                     .version = "0.1.0",
                     .ws_port = 8080};
}

Test(peers, starts_empty_and_never_null)
{
    mg_peers *p = mg_peers_create("self", NULL, 0);
    mg_peer_set *s = mg_peers_acquire(p);
    cr_assert_not_null(s);
    cr_assert_eq(mg_peer_set_count(s), 0);
    cr_assert_null(mg_peer_set_find(s, "x"));
    cr_assert_null(mg_peer_set_at(s, 0));
    cr_assert_eq(mg_peers_age_ms(p), -1, "no update yet");
    mg_peer_set_release(s);
    mg_peers_free(p);
    mg_peers_free(NULL);
    mg_peer_set_release(NULL);
}

Test(peers, update_skips_self_and_finds_by_id)
{
    mg_peers *p = mg_peers_create("gw1", "", 1 << 20);
    mg_peer in[] = {P("gw1", "127.0.0.1:1", "r1"), P("gw3", "127.0.0.1:3", "r2"),
                    P("gw2", "127.0.0.1:2", "r1")};
    mg_peers_update(p, in, 3);
    mg_peer_set *s = mg_peers_acquire(p);
    cr_assert_eq(mg_peer_set_count(s), 2, "self is skipped");
    cr_assert_null(mg_peer_set_find(s, "gw1"));
    const mg_peer *g2 = mg_peer_set_find(s, "gw2");
    cr_assert_not_null(g2);
    cr_assert_str_eq(g2->address, "127.0.0.1:2");
    cr_assert_str_eq(g2->region, "r1");
    cr_assert_str_eq(g2->version, "0.1.0");
    cr_assert_eq(g2->ws_port, 8080);
    cr_assert_not_null(g2->channel);
    cr_assert_str_eq(mg_peer_set_find(s, "gw3")->region, "r2");
    cr_assert_str_eq(mg_peer_set_at(s, 0)->id, "gw2", "sorted by id");
    cr_assert_geq(mg_peers_age_ms(p), 0);
    mg_peer_set_release(s);
    mg_peers_free(p);
}

Test(peers, channel_kept_when_address_unchanged_and_replaced_when_moved)
{
    mg_peers *p = mg_peers_create("self", "peers.meshgate.svc:50051", 1 << 20);
    mg_peer a[] = {P("gw2", "127.0.0.1:2", "r1"), P("gw3", "127.0.0.1:3", "r1")};
    mg_peers_update(p, a, 2);
    mg_peer_set *s1 = mg_peers_acquire(p);
    const mg_peer *g2a = mg_peer_set_find(s1, "gw2"), *g3a = mg_peer_set_find(s1, "gw3");
    grpc_channel *c2 = g2a->channel, *c3 = g3a->channel;

    /* gw2 unchanged, gw3 changes region only (keeps its channel), gw4 new. */
    mg_peer b[] = {P("gw2", "127.0.0.1:2", "r1"), P("gw3", "127.0.0.1:3", "r9"),
                   P("gw4", "127.0.0.1:4", "r1")};
    mg_peers_update(p, b, 3);
    mg_peer_set *s2 = mg_peers_acquire(p);
    cr_assert_eq(mg_peer_set_find(s2, "gw2"), g2a, "unchanged peer: same node shared");
    cr_assert_eq(mg_peer_set_find(s2, "gw2")->channel, c2);
    cr_assert_eq(mg_peer_set_find(s2, "gw3")->channel, c3, "same address: same channel");
    cr_assert_str_eq(mg_peer_set_find(s2, "gw3")->region, "r9");
    cr_assert_str_eq(g3a->region, "r1", "old snapshot is immutable");

    /* gw2 moves: new channel; gw3 and gw4 go away. The old snapshot still holds them. */
    mg_peer c[] = {P("gw2", "127.0.0.1:22", "r1")};
    mg_peers_update(p, c, 1);
    mg_peer_set *s3 = mg_peers_acquire(p);
    cr_assert_eq(mg_peer_set_count(s3), 1);
    cr_assert_neq(mg_peer_set_find(s3, "gw2")->channel, c2, "moved: new channel");
    cr_assert_str_eq(mg_peer_set_find(s1, "gw3")->address, "127.0.0.1:3", "s1 still valid");
    cr_assert_eq(grpc_channel_check_connectivity_state(g2a->channel, 0), GRPC_CHANNEL_IDLE);

    mg_peer_set_release(s1);
    mg_peer_set_release(s2);
    mg_peer_set_release(s3);
    mg_peers_update(p, NULL, 0);
    s1 = mg_peers_acquire(p);
    cr_assert_eq(mg_peer_set_count(s1), 0, "all gone");
    mg_peer_set_release(s1);
    mg_peers_free(p);
}

Test(peers, bad_addresses_are_skipped_others_kept)
{
    mg_peers *p = mg_peers_create("self", NULL, 0);
    mg_peer in[] = {P("ok1", "10.0.0.1:50051", "r1"),
                    P("bad1", "", "r1"),
                    P("bad2", "no-port", "r1"),
                    P("bad3", "host:0", "r1"),
                    P("bad4", "host:70000", "r1"),
                    P("bad5", "bad host:1", "r1"),
                    P("bad6", "[::1:5", "r1"),
                    P("ok2", "[::1]:5", "r1"),
                    P("ok3", "gw-3.peers.ns.svc.cluster.local:50051", "r1"),
                    P("", "127.0.0.1:9", "r1"),
                    P("ok1", "127.0.0.1:7", "r1") /* duplicate id: first wins */};
    mg_peers_update(p, in, sizeof(in) / sizeof(in[0]));
    mg_peer_set *s = mg_peers_acquire(p);
    cr_assert_eq(mg_peer_set_count(s), 3);
    cr_assert_not_null(mg_peer_set_find(s, "ok2"));
    cr_assert_not_null(mg_peer_set_find(s, "ok3"));
    cr_assert_str_eq(mg_peer_set_find(s, "ok1")->address, "10.0.0.1:50051");
    mg_peer_set_release(s);
    mg_peers_free(p);

    cr_assert(mg_peers_valid_address("127.0.0.1:1"));
    cr_assert(mg_peers_valid_address("localhost:65535"));
    cr_assert_not(mg_peers_valid_address(NULL));
    cr_assert_not(mg_peers_valid_address(":80"));
    cr_assert_not(mg_peers_valid_address("host:"));
    cr_assert_not(mg_peers_valid_address("host:12a"));
    cr_assert_not(mg_peers_valid_address("-host:1"));
    cr_assert_not(mg_peers_valid_address("[]:1"));
}

Test(peers, render_json)
{
    mg_peers *p = mg_peers_create("gw1", NULL, 0);
    mg_peer in[] = {P("gw2", "127.0.0.1:2", "r1")};
    mg_peers_update(p, in, 1);
    char *s = mg_peers_render_json(p);
    json_error_t je;
    json_t *j = json_loads(s, 0, &je);
    cr_assert_not_null(j, "valid JSON: %s", s);
    cr_assert_str_eq(json_string_value(json_object_get(j, "self")), "gw1");
    cr_assert_eq(json_integer_value(json_object_get(j, "count")), 1);
    cr_assert_geq(json_integer_value(json_object_get(j, "age_ms")), 0);
    json_t *e = json_array_get(json_object_get(j, "peers"), 0);
    cr_assert_str_eq(json_string_value(json_object_get(e, "id")), "gw2");
    cr_assert_str_eq(json_string_value(json_object_get(e, "address")), "127.0.0.1:2");
    cr_assert_str_eq(json_string_value(json_object_get(e, "region")), "r1");
    cr_assert_eq(json_integer_value(json_object_get(e, "ws_port")), 8080);
    cr_assert_str_eq(json_string_value(json_object_get(e, "channel")), "IDLE");
    cr_assert_str_eq(json_string_value(json_object_get(e, "buses")), "grpc,kafka",
                     "no meta: what every gateway consumed");
    json_decref(j);
    free(s);
    mg_peers_free(p);
}

Test(peers, a_region_consumes_a_bus_when_every_gateway_does)
{
    mg_peers *p = mg_peers_create("gw1", NULL, 0);
    mg_peer in[] = {P("gw2", "127.0.0.1:2", "r1"), P("gw3", "127.0.0.1:3", "r1"),
                    P("gw4", "127.0.0.1:4", "r2")};
    in[0].buses = "grpc,redis-pubsub";
    in[1].buses = "grpc,kafka";
    in[2].buses = "grpc,kafka,redis-pubsub";
    mg_peers_update(p, in, 3);
    cr_assert_not(mg_peers_region_consumes(p, "r1", "kafka"), "gw2 moved off Kafka");
    cr_assert_not(mg_peers_region_consumes(p, "r1", "redis-pubsub"));
    cr_assert(mg_peers_region_consumes(p, "r1", "grpc"));
    cr_assert(mg_peers_region_consumes(p, "r2", "kafka"));
    cr_assert(mg_peers_region_consumes(p, "r9", "nats"), "no gateway known: not refused here");
    in[1].buses = "grpc,kafka,redis-pubsub"; /* gw3 advertises a new bus */
    mg_peers_update(p, in, 3);
    cr_assert(mg_peers_region_consumes(p, "r1", "redis-pubsub"), "the table follows the meta");
    mg_peers_free(p);
}

Test(peers, metrics_count_and_age)
{
    mg_peers *p = mg_peers_create("gw1", NULL, 0);
    size_t len;
    char *m = mg_metrics_render(&len);
    cr_assert(strstr(m, "meshgate_peers_age_seconds -1"), "%s", m);
    free(m);
    mg_peer in[] = {P("gw2", "127.0.0.1:2", "r1"), P("gw3", "127.0.0.1:3", "r1")};
    mg_peers_update(p, in, 2);
    m = mg_metrics_render(&len);
    cr_assert(strstr(m, "meshgate_peers 2"), "%s", m);
    cr_assert(strstr(m, "meshgate_peers_age_seconds 0"), "%s", m);
    free(m);
    mg_peers_free(p);
    mg_metrics_shutdown();
}

/* Readers hammer acquire/find/release while the updater churns the table. */
struct race {
    mg_peers *p;
    atomic_bool stop;
    atomic_long reads;
};

static void *reader(void *arg)
{
    struct race *r = arg;
    while (!atomic_load(&r->stop)) {
        mg_peer_set *s = mg_peers_acquire(r->p);
        for (size_t i = 0; i < mg_peer_set_count(s); i++) {
            const mg_peer *e = mg_peer_set_at(s, i);
            if (!e->channel || strncmp(e->address, "127.0.0.1:", 10) != 0)
                abort();
            if (mg_peer_set_find(s, e->id) != e)
                abort();
        }
        mg_peer_set_release(s);
        atomic_fetch_add(&r->reads, 1);
    }
    return NULL;
}

Test(peers, concurrent_readers_during_updates)
{
    struct race r = {.p = mg_peers_create("self", NULL, 0)};
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, reader, &r);
    char ids[8][8], addrs[8][32];
    for (int round = 0; round < 300; round++) {
        mg_peer in[8];
        size_t n = 0;
        for (int k = 0; k < 8; k++) {
            if ((round + k) % 3 == 0)
                continue;
            snprintf(ids[k], sizeof(ids[k]), "gw%d", k);
            snprintf(addrs[k], sizeof(addrs[k]), "127.0.0.1:%d", 1000 + k + (round % 2));
            in[n++] = P(ids[k], addrs[k], "r1");
        }
        mg_peers_update(r.p, in, n);
    }
    usleep(10000);
    atomic_store(&r.stop, true);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    cr_assert_gt(atomic_load(&r.reads), 0);
    mg_peers_free(r.p);
}
