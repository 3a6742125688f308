/* Unit tests for router.c decisions with the in-memory stores. The local
 * sink records what the hub would write; a scripted transport stands in for
 * a peer so the fallback rules can be driven (the real gRPC and Kafka paths
 * are exercised by the integration tests). */
#include "common/mg_alloc.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "router/router.h"
#include "support/mg_wait.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a recording local sink ---- */
static struct {
    int online; /* connections the hub has for any user */
    int delivered, inbox_delivered, disconnects;
    char last_conn[64];
    char inbox_ids[64][16]; /* the first 64 inbox messages delivered, in order */
} hub;

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    if (!hub.online)
        return 0;
    if (from_inbox && hub.inbox_delivered < 64)
        snprintf(hub.inbox_ids[hub.inbox_delivered], sizeof(hub.inbox_ids[0]), "%s", msg->id);
    if (from_inbox)
        hub.inbox_delivered++;
    else
        hub.delivered++;
    snprintf(hub.last_conn, sizeof(hub.last_conn), "%s", conn_id ? conn_id : "");
    int n = conn_id ? 1 : hub.online;
    if (written)
        written(written_arg, (uint32_t)n); /* as the hub on its own thread: written at once */
    return n;
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    hub.disconnects++;
    return hub.online;
}

/* ---- a scripted peer transport ---- */
typedef struct script {
    mg_transport base;
    mg_path path;
    int calls;
    mg_status answer;
    bool not_connected, available;
} script;

static bool sc_available(mg_transport *t, const mg_route_target *target)
{
    return ((script *)t)->available;
}

static int sc_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                      int64_t deadline, mg_deliver_done done, void *arg)
{
    script *s = (script *)t;
    s->calls++;
    mg_deliver_outcome out = {0};
    out.status = s->answer;
    out.not_connected = s->not_connected;
    out.connections = s->answer == MG_STATUS_DELIVERED;
    if (s->answer == MG_STATUS_FAILED)
        snprintf(out.reason, sizeof(out.reason), "UNAVAILABLE");
    done(arg, &out);
    return 0;
}

static void sc_free(mg_transport *t) {}

static const struct mg_transport_ops grpc_ops = {
    "grpc-script", MG_PATH_GRPC, sc_available, sc_deliver, NULL, sc_free, NULL, NULL, false};
static const struct mg_transport_ops kafka_ops = {
    "kafka-script", MG_PATH_KAFKA, sc_available, sc_deliver, NULL, sc_free, NULL, NULL, true};

static mg_router *router;
static mg_presence *presence;
static script grpc_t, kafka_t;

static void setup(void)
{
    memset(&hub, 0, sizeof(hub));
    presence = mg_presence_memory_create("gw-a", "eu");
    mg_router_config cfg = {"gw-a", "eu", 10, 3, 128, 1024, 0, NULL, 0};
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    router = mg_router_create(&cfg, presence, mg_inbox_memory_create(3, 3600), &sink, NULL);
    grpc_t = (script){{&grpc_ops}, MG_PATH_GRPC, 0, MG_STATUS_DELIVERED, false, true};
    kafka_t = (script){{&kafka_ops}, MG_PATH_KAFKA, 0, MG_STATUS_QUEUED, false, true};
}

static void teardown(void)
{
    mg_router_free(router);
    mg_metrics_shutdown();
}

static mg_msg *msg(const char *id, const char *to)
{
    return mg_msg_new(id, "alice", to, (const uint8_t *)"hi", 2, "text/plain", mg_now_ms(),
                      MG_PRIO_HIGH);
}

static int64_t later(void)
{
    return mg_mono_ms() + 5000;
}

TestSuite(router, .init = setup, .fini = teardown);

Test(router, offline_recipient_is_stored_and_delivered_in_order_on_connect)
{
    mg_send_result res;
    for (int i = 0; i < 4; i++) {
        char id[8];
        snprintf(id, sizeof(id), "m%d", i);
        mg_msg *m = msg(id, "bob");
        cr_assert_eq(mg_wait_send(router, m, later(), &res), 0);
        cr_assert_eq(res.status, MG_STATUS_STORED);
        cr_assert_eq(res.path, MG_PATH_INBOX);
        mg_msg_free(m);
    }
    /* cap is 3: m0 was dropped */
    mg_msg **items;
    size_t n;
    mg_inbox *ib = mg_router_inbox(router);
    cr_assert_eq(ib->ops->fetch(ib, "bob", 10, &items, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(items[0]->id, "m1");
    cr_assert_str_eq(items[2]->id, "m3");
    mg_inbox_items_free(items, n);

    hub.online = 1;
    cr_assert_eq(mg_router_user_connected(router, "bob", "gw-a-1", mg_now_ms()), 0);
    cr_assert_eq(hub.inbox_delivered, 3);
    cr_assert_str_eq(hub.last_conn, "gw-a-1", "inbox goes to the new connection only");
    cr_assert_eq(mg_router_inbox_ack(router, "bob", "gw-a-1", "m1"), 0);
    cr_assert_eq(mg_router_inbox_ack(router, "bob", "gw-a-1", "m1"), -ENOENT);
    cr_assert_eq(ib->ops->fetch(ib, "bob", 10, &items, &n), 0);
    cr_assert_eq(n, 2, "unacked ones stay");
    mg_inbox_items_free(items, n);
}

Test(router, online_local_recipient_is_delivered_once_per_id)
{
    hub.online = 2;
    mg_router_user_connected(router, "bob", "gw-a-1", mg_now_ms());
    mg_router_user_connected(router, "bob", "gw-a-2", mg_now_ms());
    mg_msg *m = msg("x1", "bob");
    mg_send_result res;
    mg_wait_send(router, m, later(), &res);
    cr_assert_eq(res.status, MG_STATUS_DELIVERED);
    cr_assert_eq(res.path, MG_PATH_LOCAL);
    cr_assert_eq(res.connections, 2);
    cr_assert_eq(hub.delivered, 1, "one hand-off to the hub for both connections");
    mg_wait_send(router, m, later(), &res);
    cr_assert_eq(res.status, MG_STATUS_DELIVERED, "a retry is answered as delivered");
    cr_assert_eq(hub.delivered, 1, "but not written again");
    mg_msg_free(m);
}

Test(router, rejects_empty_recipient)
{
    mg_msg *m = msg("x", "");
    mg_send_result res;
    cr_assert_eq(mg_wait_send(router, m, later(), &res), 0, "answered, not refused");
    cr_assert_eq(res.status, MG_STATUS_REJECTED);
    cr_assert_str_eq(res.reason, "empty recipient");
    mg_msg_free(m);
}

Test(router, expired_deadline_fails_clearly)
{
    mg_msg *m = msg("x", "bob");
    mg_send_result res;
    mg_wait_send(router, m, mg_mono_ms() - 1, &res);
    cr_assert_eq(res.status, MG_STATUS_FAILED);
    cr_assert_str_eq(res.reason, "deadline exceeded");
    mg_msg_free(m);
}

/* A presence store that also knows remote gateways (a test double of the
 * interface only; the Redis backend has its own tests). */
typedef struct remote_presence {
    mg_presence base;
    const char *gw, *region;
} remote_presence;

static int rp_lookup(mg_presence *p, const char *user, mg_presence_list *out)
{
    remote_presence *rp = (remote_presence *)p;
    if (rp->gw)
        mg_presence_list_add(out, "c1", rp->gw, rp->region, 0);
    return 0;
}

static int rp_batch(mg_presence *p, const char *const *users, size_t n, mg_presence_list *outs)
{
    for (size_t i = 0; i < n; i++)
        rp_lookup(p, users[i], &outs[i]);
    return 0;
}

static int rp_noop(mg_presence *p)
{
    return 0;
}

static int rp_conn(mg_presence *p, const char *u, const char *c, int64_t t)
{
    return 0;
}

static int rp_disc(mg_presence *p, const char *u, const char *c)
{
    return 0;
}

static void rp_free(mg_presence *p)
{
    free(p);
}

static const struct mg_presence_ops rp_ops = {"remote", rp_conn, rp_disc, rp_lookup, rp_batch,
                                              rp_noop,  rp_noop, rp_free, false,     NULL};

static mg_router *routed_router(const char *gw, const char *region, const mg_route_lists *routes)
{
    remote_presence *rp = mg_new(remote_presence);
    rp->base.ops = &rp_ops;
    rp->gw = gw;
    rp->region = region;
    mg_router_config cfg = {"gw-a", "eu", 10, 3, 128, 1024, 0, routes, 0};
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    mg_router *r = mg_router_create(&cfg, &rp->base, mg_inbox_memory_create(10, 3600), &sink, NULL);
    mg_router_set_transport(r, MG_PATH_GRPC, &grpc_t.base);
    mg_router_set_transport(r, MG_PATH_KAFKA, &kafka_t.base);
    return r;
}

static mg_router *remote_router(const char *gw, const char *region)
{
    return routed_router(gw, region, NULL);
}

Test(router, same_region_goes_grpc_and_falls_back_to_kafka)
{
    mg_router *r = remote_router("gw-b", "eu");
    mg_msg *m = msg("s1", "bob");
    mg_send_result res;
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.path, MG_PATH_GRPC);
    cr_assert_eq(res.status, MG_STATUS_DELIVERED);

    grpc_t.answer = MG_STATUS_FAILED;
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.path, MG_PATH_KAFKA, "a failed peer call goes by Kafka");
    cr_assert_eq(res.status, MG_STATUS_QUEUED);
    cr_assert_eq(kafka_t.calls, 1);

    grpc_t.available = false; /* degraded link */
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.path, MG_PATH_KAFKA);
    cr_assert_eq(grpc_t.calls, 2, "a degraded peer is not tried");
    mg_msg_free(m);
    mg_router_free(r);
}

Test(router, cross_region_cold_goes_kafka_hot_goes_grpc)
{
    mg_router *r = remote_router("gw-c", "us");
    mg_send_result res;
    mg_msg *m = msg("c1", "bob");
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.path, MG_PATH_KAFKA, "cold pair");
    mg_wait_send(r, m, later(), &res);
    mg_wait_send(r, m, later(), &res); /* threshold 3 */
    cr_assert_eq(res.path, MG_PATH_GRPC, "third message in the window makes it hot");
    mg_msg_free(m);
    mg_router_free(r);
}

Test(router, not_connected_reresolves_then_inbox)
{
    mg_router *r = remote_router("gw-b", "eu");
    grpc_t.answer = MG_STATUS_FAILED;
    grpc_t.not_connected = true;
    mg_send_result res;
    mg_msg *m = msg("n1", "bob");
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(grpc_t.calls, 2, "tried again after resolving presence once more");
    cr_assert_eq(res.status, MG_STATUS_STORED);
    cr_assert_eq(res.path, MG_PATH_INBOX);
    mg_msg_free(m);
    mg_router_free(r);
}

Test(router, queue_delivery_never_uses_kafka_again)
{
    mg_router *r = remote_router("gw-c", "us");
    grpc_t.answer = MG_STATUS_FAILED;
    mg_send_result res;
    mg_msg *m = msg("q1", "bob");
    cr_assert_eq(mg_wait_from_queue(r, m, later(), &res), -EAGAIN,
                 "the consumer must retry, not commit");
    cr_assert_eq(kafka_t.calls, 0);
    mg_msg_free(m);
    mg_router_free(r);
}

static const struct mg_transport_ops bus_ops = {
    "bus-script", MG_PATH_REDIS_PUBSUB, sc_available, sc_deliver, NULL, sc_free, NULL, NULL, true};

Test(router, route_lists_pick_a_new_bus_and_end_in_the_inbox)
{
    mg_route_lists routes;
    char err[160];
    cr_assert_eq(
        mg_route_lists_parse("redis-pubsub,grpc,inbox", "kafka", &routes, err, sizeof(err)), 0);
    mg_router *r = routed_router("gw-b", "eu", &routes);
    script bus = {{&bus_ops}, MG_PATH_REDIS_PUBSUB, 0, MG_STATUS_DELIVERED, false, true};
    mg_router_set_transport(r, MG_PATH_REDIS_PUBSUB, &bus.base);
    mg_send_result res;
    mg_msg *m = msg("l1", "bob");
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.path, MG_PATH_REDIS_PUBSUB, "the list's first bus");
    cr_assert_eq(res.status, MG_STATUS_DELIVERED);
    cr_assert_eq(grpc_t.calls, 0);

    bus.answer = MG_STATUS_FAILED;
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.path, MG_PATH_GRPC, "a failed bus step moves on to the next");
    cr_assert_eq(bus.calls, 2);

    grpc_t.answer = MG_STATUS_FAILED;
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.status, MG_STATUS_STORED, "inbox ends the list");
    cr_assert_eq(res.path, MG_PATH_INBOX);
    cr_assert(res.paths & (1u << MG_PATH_REDIS_PUBSUB) && res.paths & (1u << MG_PATH_GRPC),
              "the result names the paths tried");
    cr_assert_eq(kafka_t.calls, 0, "kafka is not on the near list");

    bus.available = false;
    grpc_t.answer = MG_STATUS_DELIVERED;
    mg_wait_send(r, m, later(), &res);
    cr_assert_eq(res.path, MG_PATH_GRPC, "an unavailable bus is skipped");
    cr_assert_eq(bus.calls, 3);
    mg_msg_free(m);
    mg_router_free(r);
}

Test(router, envelope_round_trips)
{
    mg_msg *m = msg("e1", "bob");
    size_t len;
    uint8_t *buf = mg_msg_pack(m, &len);
    mg_msg *back = NULL;
    cr_assert_eq(mg_msg_unpack(buf, len, &back), 0);
    cr_assert_str_eq(back->id, "e1");
    cr_assert_str_eq(back->to, "bob");
    cr_assert_eq(back->content_len, 2);
    cr_assert_eq(memcmp(back->content, "hi", 2), 0);
    cr_assert_eq(mg_msg_unpack((const uint8_t *)"\xff\xff\xff", 3, &back), -EBADMSG);
    free(buf);
    mg_msg_free(m);
    mg_msg_free(back);
}

Test(router, only_all_memory_routing_counts_as_nonblocking)
{
    cr_assert(mg_router_nonblocking(router), "memory presence and inbox, no peers");
    mg_router *r = remote_router("gw-b", "eu");
    cr_assert_not(mg_router_nonblocking(r), "its presence store may block");
    mg_router_free(r);
}

/* A long inbox goes out a page at a time: page messages outstanding at most,
 * the next ones once half of them are acked, each once, oldest first. */
Test(router, a_long_inbox_is_sent_a_page_at_a_time)
{
    mg_router_free(router);
    mg_metrics_shutdown();
    presence = mg_presence_memory_create("gw-a", "eu");
    mg_router_config cfg = {"gw-a", "eu", 10, 3, 128, 1024, 0, NULL, 10};
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    router = mg_router_create(&cfg, presence, mg_inbox_memory_create(100, 3600), &sink, NULL);
    mg_inbox *ib = mg_router_inbox(router);
    for (int i = 0; i < 25; i++) {
        char id[16];
        snprintf(id, sizeof(id), "p%02d", i);
        mg_msg *m = msg(id, "bob");
        cr_assert_eq(ib->ops->store(ib, m), 0);
        mg_msg_free(m);
    }
    hub.online = 1;
    cr_assert_eq(mg_router_user_connected(router, "bob", "gw-a-1", mg_now_ms()), 0);
    cr_assert_eq(hub.inbox_delivered, 10, "one page");
    for (int i = 0; i < 4; i++)
        cr_assert_eq(mg_router_inbox_ack(router, "bob", "gw-a-1", hub.inbox_ids[i]), 0);
    cr_assert_eq(hub.inbox_delivered, 10, "6 outstanding: no new page yet");
    cr_assert_eq(mg_router_inbox_ack(router, "bob", "gw-a-1", hub.inbox_ids[4]), 0);
    cr_assert_eq(hub.inbox_delivered, 15, "5 outstanding: topped up to 10");
    /* the rest, acked as they come */
    for (int acked = 5; acked < hub.inbox_delivered; acked++)
        cr_assert_eq(mg_router_inbox_ack(router, "bob", "gw-a-1", hub.inbox_ids[acked]), 0);
    cr_assert_eq(hub.inbox_delivered, 25, "every message once");
    for (int i = 0; i < 25; i++) {
        char id[16];
        snprintf(id, sizeof(id), "p%02d", i);
        cr_assert_str_eq(hub.inbox_ids[i], id, "oldest first");
    }
    mg_msg **items;
    size_t n;
    cr_assert_eq(ib->ops->fetch(ib, "bob", 100, &items, &n), 0);
    cr_assert_eq(n, 0, "all acked");
    mg_inbox_items_free(items, n);
}
