/* Unit tests for transport_kafka.c against librdkafka's mock cluster
 * (rdkafka_mock.h): HIGH -> QUEUED after acks, LOW -> ACCEPTED, injected
 * broker errors and a down broker -> FAILED with a "kafka: " reason, a full
 * local queue drops LOW ("dropped: overload", counted), and the consumer
 * path through a real router with in-memory stores. The real broker is
 * exercised by tests/integration/test_kafka.c. */
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "router/router.h"
#include "router/transport_kafka.h"

#include "support/mg_wait.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define PRODUCE_API_KEY 0 /* RD_KAFKAP_Produce */

static rd_kafka_t *mock_rk;
static rd_kafka_mock_cluster_t *mc;
static char bootstraps[256];

static void setup(void)
{
    char e[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", e, sizeof(e));
    mock_rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, e, sizeof(e));
    cr_assert(mock_rk, "mock handle: %s", e);
    mc = rd_kafka_mock_cluster_new(mock_rk, 1);
    cr_assert(mc);
    snprintf(bootstraps, sizeof(bootstraps), "%s", rd_kafka_mock_cluster_bootstraps(mc));
    rd_kafka_mock_topic_create(mc, "ut.deliver.r1", 3, 1);
    rd_kafka_mock_topic_create(mc, "ut.deliver.r2", 3, 1);
}

static void teardown(void)
{
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(mock_rk);
    cr_expect_eq(rd_kafka_wait_destroyed(5000), 0, "librdkafka handles left behind");
    mg_metrics_shutdown();
}

TestSuite(transport_kafka, .init = setup, .fini = teardown, .timeout = 60);

static mg_transport *make(int timeout_ms, int linger_ms, int queue_max)
{
    mg_transport_kafka_config cfg = {
        .brokers = bootstraps,
        .topic_prefix = "ut.deliver.",
        .region = "r1",
        .gateway_id = "gw-a",
        .partitions = 3,
        .linger_ms = linger_ms,
        .timeout_ms = timeout_ms,
        .queue_max_messages = queue_max,
    };
    char err[256] = "";
    mg_transport *t = mg_transport_kafka_create(&cfg, err, sizeof(err));
    cr_assert(t, "create: %s", err);
    return t;
}

static mg_deliver_outcome send_one(mg_transport *t, const char *region, const char *id,
                                   mg_priority prio, int64_t deadline)
{
    mg_msg *m =
        mg_msg_new(id, "alice", "bob", (const uint8_t *)"hi", 2, "text/plain", mg_now_ms(), prio);
    mg_route_target target = {"gw-b", region};
    mg_deliver_outcome out = {0};
    int rc = mg_wait_deliver(t, &target, m, deadline, &out);
    mg_msg_free(m);
    cr_assert_eq(rc, 0, "deliver rc=%d", rc);
    return out;
}

static int64_t counter(const char *name, const char *labels)
{
    return mg_metric_value(mg_counter(name, "", labels));
}

Test(transport_kafka, high_is_queued_after_ack)
{
    mg_transport *t = make(5000, 1, 0);
    cr_assert(t->ops->available(t, &(mg_route_target){"gw-b", "r2"}));
    mg_deliver_outcome out = send_one(t, "r2", "m1", MG_PRIO_HIGH, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "status=%d reason=%s", out.status, out.reason);
    mg_transport_free(t);
}

Test(transport_kafka, low_is_accepted_without_waiting)
{
    mg_transport *t = make(5000, 500, 0); /* linger 500 ms: an ack cannot come sooner */
    int64_t start = mg_mono_ms();
    mg_deliver_outcome out = send_one(t, "r2", "m1", MG_PRIO_LOW, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_ACCEPTED, "status=%d reason=%s", out.status, out.reason);
    cr_assert_lt(mg_mono_ms() - start, 200, "LOW waited");
    int64_t errs = counter("meshgate_kafka_produce_errors_total", NULL);
    mg_transport_kafka_stop(t, 3000); /* flush: the LOW message reaches the broker */
    cr_assert_eq(counter("meshgate_kafka_produce_errors_total", NULL), errs);
    mg_transport_free(t);
}

Test(transport_kafka, injected_broker_error_fails_with_reason)
{
    mg_transport *t = make(5000, 1, 0);
    mg_deliver_outcome out = send_one(t, "r2", "warm", MG_PRIO_HIGH, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "warm-up: %s", out.reason);
    rd_kafka_mock_push_request_errors(mc, PRODUCE_API_KEY, 1, RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE);
    out = send_one(t, "r2", "m2", MG_PRIO_HIGH, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_FAILED);
    cr_assert(strstr(out.reason, "kafka: ") == out.reason, "reason=%s", out.reason);
    cr_assert(strstr(out.reason, "too large"), "reason=%s", out.reason);
    /* The producer is still usable afterwards. */
    out = send_one(t, "r2", "m3", MG_PRIO_HIGH, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "after error: %s", out.reason);
    mg_transport_free(t);
}

Test(transport_kafka, broker_down_high_fails_within_timeout)
{
    mg_transport *t = make(1000, 1, 0);
    /* Warm-up: the first produce also fetches metadata and creates the topic,
     * which can take longer than the 1 s timeout on a busy machine. */
    mg_deliver_outcome out = {0};
    for (int i = 0; i < 10 && out.status != MG_STATUS_QUEUED; i++) {
        char id[16];
        snprintf(id, sizeof(id), "warm%d", i);
        out = send_one(t, "r2", id, MG_PRIO_HIGH, mg_mono_ms() + 5000);
    }
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "warm-up: %s", out.reason);
    rd_kafka_mock_broker_set_down(mc, 1);
    int64_t start = mg_mono_ms();
    out = send_one(t, "r2", "m2", MG_PRIO_HIGH, mg_mono_ms() + 10000);
    int64_t took = mg_mono_ms() - start;
    cr_assert_eq(out.status, MG_STATUS_FAILED);
    cr_assert(strncmp(out.reason, "kafka: ", 7) == 0, "reason=%s", out.reason);
    cr_assert_lt(took, 3000, "took %lld ms (timeout 1000 ms)", (long long)took);
    cr_assert_geq(took, 500, "took %lld ms", (long long)took);
    rd_kafka_mock_broker_set_up(mc, 1);
    /* Back up: HIGH succeeds again (bounded retries). */
    bool queued = false;
    for (int i = 0; i < 10 && !queued; i++) {
        char id[16];
        snprintf(id, sizeof(id), "m%d", i + 3);
        out = send_one(t, "r2", id, MG_PRIO_HIGH, mg_mono_ms() + 5000);
        queued = out.status == MG_STATUS_QUEUED;
    }
    cr_assert(queued, "no success after the broker came back: %s", out.reason);
    mg_transport_free(t);
}

Test(transport_kafka, deadline_bounds_the_wait)
{
    mg_transport *t = make(5000, 1, 0);
    mg_deliver_outcome out = send_one(t, "r2", "m1", MG_PRIO_HIGH, mg_mono_ms() - 1);
    cr_assert_eq(out.status, MG_STATUS_FAILED);
    cr_assert(strstr(out.reason, "deadline"), "reason=%s", out.reason);
    mg_transport_free(t);
}

Test(transport_kafka, full_queue_drops_low)
{
    /* One message fits; linger keeps it in the queue. */
    mg_transport *t = make(5000, 2000, 1);
    int64_t dropped = counter("meshgate_dropped_total", "reason=\"kafka_queue_full\"");
    mg_deliver_outcome out = send_one(t, "r2", "m1", MG_PRIO_LOW, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_ACCEPTED, "first: %s", out.reason);
    out = send_one(t, "r2", "m2", MG_PRIO_LOW, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_FAILED);
    cr_assert_str_eq(out.reason, "dropped: overload");
    cr_assert_eq(counter("meshgate_dropped_total", "reason=\"kafka_queue_full\""), dropped + 1);
    mg_transport_free(t);
}

Test(transport_kafka, no_brokers_is_inert)
{
    mg_transport_kafka_config cfg = {.brokers = "", .region = "r1", .gateway_id = "gw-a"};
    char err[128];
    mg_transport *t = mg_transport_kafka_create(&cfg, err, sizeof(err));
    cr_assert(t);
    cr_assert_not(t->ops->available(t, &(mg_route_target){"gw-b", "r2"}));
    mg_msg *m = mg_msg_new("m1", "a", "b", NULL, 0, NULL, 0, MG_PRIO_HIGH);
    mg_deliver_outcome out = {0};
    cr_assert_eq(mg_wait_deliver(t, &(mg_route_target){"gw-b", "r2"}, m, mg_mono_ms() + 100, &out),
                 -ENOTCONN);
    mg_msg_free(m);
    cr_assert_eq(mg_transport_kafka_assigned(t), -1);
    mg_transport_kafka_stop(t, 0);
    mg_transport_free(t);
    mg_transport_free(NULL);
}

Test(transport_kafka, bad_config_is_reported)
{
    mg_transport_kafka_config cfg = {
        .brokers = bootstraps, .region = "r1", .linger_ms = 5000, .timeout_ms = 1000};
    char err[256] = "";
    cr_assert_null(mg_transport_kafka_create(&cfg, err, sizeof(err)));
    cr_assert(strstr(err, "linger"), "err=%s", err);
}

/* ---- consumer through a real router (mock broker) ---- */

static atomic_int sink_count;

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    atomic_fetch_add(&sink_count, 1);
    if (written)
        written(written_arg, 1);
    return 1;
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return 0;
}

Test(transport_kafka, consumer_hands_records_to_the_router)
{
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    mg_router_config rc = {.gateway_id = "gw-a",
                           .region = "r1",
                           .hot_window_seconds = 10,
                           .hot_threshold = 1000,
                           .hot_capacity = 64,
                           .dedupe_window = 1024};
    mg_router *r = mg_router_create(&rc, mg_presence_memory_create("gw-a", "r1"),
                                    mg_inbox_memory_create(100, 3600), &sink, NULL);
    mg_transport *t = make(5000, 1, 0);
    mg_router_set_transport(r, MG_PATH_KAFKA, t);
    cr_assert_eq(mg_router_user_connected(r, "bob", "c1", mg_now_ms()), 0);
    cr_assert_eq(mg_transport_kafka_start_consumer(t, r), 0);
    cr_assert_eq(mg_transport_kafka_start_consumer(t, r), -EALREADY);
    for (int i = 0; i < 5; i++) {
        char id[16];
        snprintf(id, sizeof(id), "c%d", i);
        mg_deliver_outcome out = send_one(t, "r1", id, MG_PRIO_HIGH, mg_mono_ms() + 5000);
        cr_assert_eq(out.status, MG_STATUS_QUEUED, "%s", out.reason);
    }
    /* A duplicate id: the router's dedupe drops it. */
    mg_deliver_outcome out = send_one(t, "r1", "c0", MG_PRIO_HIGH, mg_mono_ms() + 5000);
    cr_assert_eq(out.status, MG_STATUS_QUEUED);
    for (int i = 0; i < 300 && atomic_load(&sink_count) < 5; i++)
        usleep(50000);
    usleep(500000);
    cr_assert_eq(atomic_load(&sink_count), 5);
    cr_assert_eq(counter("meshgate_kafka_consumed_total", NULL), 6);
    cr_assert_gt(mg_transport_kafka_assigned(t), 0);
    mg_transport_kafka_stop(t, 1000);
    cr_assert_eq(mg_transport_kafka_assigned(t), -1);
    mg_router_free(r);
}

/* Mixed fleets (issue 12): a region's topic is used only while every known
 * gateway of that region consumes Kafka (Consul "buses"; none known, or an
 * older gateway without the meta, counts as consuming it). */
Test(transport_kafka, a_region_is_reached_only_when_all_its_gateways_consume_kafka)
{
    mg_peers *peers = mg_peers_create("gw-a", "", 1 << 20);
    mg_transport_kafka_config cfg = {
        .brokers = bootstraps,
        .topic_prefix = "ut.deliver.",
        .region = "r1",
        .gateway_id = "gw-a",
        .peers = peers,
    };
    char err[256] = "";
    mg_transport *t = mg_transport_kafka_create(&cfg, err, sizeof(err));
    cr_assert(t, "create: %s", err);
    mg_route_target r2 = {"gw-b", "r2"}, r3 = {"gw-x", "r3"};
    cr_assert(t->ops->available(t, &r2), "no gateway of r2 known: its topic is used");
    mg_peer in[] = {
        {.id = "gw-b",
         .address = "127.0.0.1:1",
         .region = "r2",
         .version = "",
         .buses = "grpc,kafka"},
        {.id = "gw-c",
         .address = "127.0.0.1:2",
         .region = "r2",
         .version = "",
         .buses = "grpc,redis-pubsub"},
        {.id = "gw-d", .address = "127.0.0.1:3", .region = "r3", .version = "", .buses = ""},
    };
    mg_peers_update(peers, in, 3);
    cr_assert_not(t->ops->available(t, &r2), "gw-c of r2 does not consume Kafka");
    cr_assert(t->ops->available(t, &r3), "gw-d has no buses meta: an older gateway, Kafka");
    in[1].buses = "grpc,kafka,redis-pubsub";
    mg_peers_update(peers, in, 3);
    cr_assert(t->ops->available(t, &r2), "every gateway of r2 consumes Kafka now");
    mg_transport_free(t);
    mg_peers_free(peers);
}
