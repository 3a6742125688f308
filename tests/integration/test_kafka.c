/* Integration tests of transport_kafka.c against the REAL broker of
 * tests/infra/kafka.sh (MESHGATE_TEST_KAFKA): produce -> consume -> the
 * router's deliver_from_queue -> a recording local sink, undecodable records
 * skipped and committed past, one consumer group per region (each message
 * handled once), redelivery after a consumer died without committing
 * (dropped by dedupe), records of other recipients passing a slow one
 * while each recipient's order holds and the committed offset stays below
 * the record not done, the consumer's bound on operations in flight, and a broker restart mid-run
 * (HIGH fails clearly or succeeds; nothing answered QUEUED is lost).
 *
 * Every test uses its own region (so its own topic and consumer group):
 * "<pid>-<name>". The restart test holds an exclusive flock on
 * $MESHGATE_RUN/kafka-chaos.lock, the others a shared one, so they never
 * overlap (also across test binaries that take the same lock). */
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "router/router.h"
#include "router/transport_kafka.h"
#include "support/mg_test.h"

#include "support/mg_recsink.h"
#include "support/mg_wait.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#define PREFIX     "mgtest.deliver."
#define PARTITIONS 6

static int lock_fd = -1;

static void take_lock(int exclusive)
{
    const char *run = getenv("MESHGATE_RUN");
    char path[512];
    snprintf(path, sizeof(path), "%s/kafka-chaos.lock", run && *run ? run : "/tmp/meshgate-run");
    lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    cr_assert(lock_fd >= 0, "cannot open %s", path);
    cr_assert_eq(flock(lock_fd, exclusive ? LOCK_EX : LOCK_SH), 0);
}

static void setup_shared(void)
{
    take_lock(0);
}

static void setup_exclusive(void)
{
    take_lock(1);
}

static void teardown(void)
{
    if (lock_fd >= 0)
        close(lock_fd);
    cr_expect_eq(rd_kafka_wait_destroyed(10000), 0, "librdkafka handles left behind");
    mg_metrics_shutdown();
}

TestSuite(kafka, .init = setup_shared, .fini = teardown, .timeout = 120);
TestSuite(kafka_chaos, .init = setup_exclusive, .fini = teardown, .timeout = 240);

/* ---- helpers ---- */

static const char *broker(void)
{
    return mg_test_require_env("MESHGATE_TEST_KAFKA");
}

static void region_name(char *buf, size_t len, const char *test)
{
    snprintf(buf, len, "%d-%s", (int)getpid(), test);
}

static mg_transport *make_transport(const char *gw, const char *region, int timeout_ms)
{
    mg_transport_kafka_config cfg = {
        .brokers = broker(),
        .topic_prefix = PREFIX,
        .region = region,
        .gateway_id = gw,
        .partitions = PARTITIONS,
        .linger_ms = 1,
        .batch_bytes = 262144,
        .timeout_ms = timeout_ms,
    };
    char err[256] = "";
    mg_transport *t = mg_transport_kafka_create(&cfg, err, sizeof(err));
    cr_assert(t, "create: %s", err);
    return t;
}

static mg_deliver_outcome send_to(mg_transport *t, const char *region, const char *id,
                                  const char *user, mg_priority prio)
{
    int64_t now = mg_mono_us();
    mg_msg *m = mg_msg_new(id, "sender", user, (const uint8_t *)&now, sizeof(now), "x/ts",
                           mg_now_ms(), prio);
    mg_route_target target = {"gw-far", region};
    mg_deliver_outcome out = {0};
    int rc = mg_wait_deliver(t, &target, m, mg_mono_ms() + 10000, &out);
    mg_msg_free(m);
    cr_assert_eq(rc, 0);
    return out;
}

typedef struct {
    mg_transport *t[2];
    int want;
} assign_arg;

static bool assigned(void *arg)
{
    assign_arg *a = arg;
    int sum = 0;
    for (int i = 0; i < 2 && a->t[i]; i++) {
        int n = mg_transport_kafka_assigned(a->t[i]);
        if (n <= 0)
            return false;
        sum += n;
    }
    return sum == a->want;
}

static int64_t counter(const char *name)
{
    return mg_metric_value(mg_counter(name, "", NULL));
}

static int64_t gauge(const char *name)
{
    return mg_metric_value(mg_gauge(name, "", NULL));
}

typedef struct {
    const char *name;
    int64_t want;
} gauge_wait;

static bool gauge_reached(void *arg)
{
    gauge_wait *w = arg;
    return gauge(w->name) == w->want;
}

static int cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Deletes the test's topic (the shared broker keeps no litter). Best effort. */
static void delete_topic(const char *region)
{
    char e[512], topic[160];
    snprintf(topic, sizeof(topic), PREFIX "%s", region);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", broker(), e, sizeof(e));
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, e, sizeof(e));
    if (!rk)
        return;
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_DeleteTopic_t *dt = rd_kafka_DeleteTopic_new(topic);
    rd_kafka_DeleteTopics(rk, &dt, 1, NULL, q);
    rd_kafka_DeleteTopic_destroy(dt);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 10000);
    if (ev)
        rd_kafka_event_destroy(ev);
    rd_kafka_queue_destroy(q);
    rd_kafka_destroy(rk);
}

/* ---- tests ---- */

Test(kafka, produce_consume_delivers_once)
{
    char region[64];
    region_name(region, sizeof(region), "once");
    mg_recsink r;
    mg_recsink_init(&r);
    mg_router *rt = mg_recsink_router("gw-a", region, &r, 10);
    mg_transport *t = make_transport("gw-a", region, 5000);
    mg_router_set_transport(rt, MG_PATH_KAFKA, t);
    cr_assert_eq(mg_transport_kafka_start_consumer(t, rt), 0);
    assign_arg aa = {{t, NULL}, PARTITIONS};
    cr_assert(mg_wait_until(assigned, &aa, 30000), "no partitions assigned");

    /* Sequential HIGH sends: each QUEUED only after acks=all. */
    enum { N = 200 };
    int64_t ack_us[N];
    for (int i = 0; i < N; i++) {
        char id[32], user[16];
        snprintf(id, sizeof(id), "h%d", i);
        snprintf(user, sizeof(user), "u%d", i % 10);
        int64_t t0 = mg_mono_us();
        mg_deliver_outcome out = send_to(t, region, id, user, MG_PRIO_HIGH);
        ack_us[i] = mg_mono_us() - t0;
        cr_assert_eq(out.status, MG_STATUS_QUEUED, "msg %d: %s", i, out.reason);
    }
    qsort(ack_us, N, sizeof(int64_t), cmp64);
    cr_assert(mg_recsink_wait_total(&r, N, 30000), "delivered %d of %d", mg_recsink_total(&r), N);
    usleep(1000000); /* nothing more may come */
    cr_assert_eq(mg_recsink_total(&r), N);
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "h%d", i);
        cr_assert_eq(mg_recsink_count(&r, id), 1, "%s delivered %d times", id,
                     mg_recsink_count(&r, id));
    }
    pthread_mutex_lock(&r.mu);
    qsort(r.lat_us, (size_t)r.nlat, sizeof(int64_t), cmp64);
    int64_t p50 = r.lat_us[r.nlat / 2], p99 = r.lat_us[r.nlat * 99 / 100];
    pthread_mutex_unlock(&r.mu);

    /* A LOW burst: ACCEPTED at once, delivered without waiting per message. */
    int low0 = mg_recsink_total(&r);
    pthread_mutex_lock(&r.mu);
    r.nlat = 0;
    pthread_mutex_unlock(&r.mu);
    for (int i = 0; i < N; i++) {
        char id[32], user[16];
        snprintf(id, sizeof(id), "l%d", i);
        snprintf(user, sizeof(user), "u%d", i % 10);
        mg_deliver_outcome out = send_to(t, region, id, user, MG_PRIO_LOW);
        cr_assert_eq(out.status, MG_STATUS_ACCEPTED, "msg %d: %s", i, out.reason);
    }
    cr_assert(mg_recsink_wait_total(&r, low0 + N, 30000), "LOW delivered %d of %d",
              mg_recsink_total(&r) - low0, N);
    pthread_mutex_lock(&r.mu);
    qsort(r.lat_us, (size_t)r.nlat, sizeof(int64_t), cmp64);
    int64_t lp50 = r.lat_us[r.nlat / 2], lp99 = r.lat_us[r.nlat * 99 / 100];
    pthread_mutex_unlock(&r.mu);
    fprintf(stderr,
            "kafka produce->consume latency (linger.ms=1, acks=all, %d msgs each): "
            "HIGH sequential p50=%.2f ms p99=%.2f ms (acks=all answered: p50=%.2f ms "
            "p99=%.2f ms); LOW burst p50=%.2f ms p99=%.2f ms\n",
            N, p50 / 1000.0, p99 / 1000.0, ack_us[N / 2] / 1000.0, ack_us[N * 99 / 100] / 1000.0,
            lp50 / 1000.0, lp99 / 1000.0);

    mg_transport_kafka_stop(t, 5000);
    mg_router_free(rt);
    delete_topic(region);
    mg_recsink_destroy(&r);
}

/* Committed offsets of group meshgate-<region> on its topic, by partition
 * (< 0: none committed). */
static void committed_offsets(const char *region, int64_t off[PARTITIONS])
{
    char e[512], group[128], topic[160];
    snprintf(group, sizeof(group), "meshgate-%s", region);
    snprintf(topic, sizeof(topic), PREFIX "%s", region);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers", broker(), e, sizeof(e)), 0);
    cr_assert_eq(rd_kafka_conf_set(conf, "group.id", group, e, sizeof(e)), 0);
    rd_kafka_t *c = rd_kafka_new(RD_KAFKA_CONSUMER, conf, e, sizeof(e));
    cr_assert(c, "%s", e);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(PARTITIONS);
    for (int p = 0; p < PARTITIONS; p++)
        rd_kafka_topic_partition_list_add(l, topic, p);
    rd_kafka_resp_err_t err = rd_kafka_committed(c, l, 10000);
    for (int p = 0; p < PARTITIONS; p++)
        off[p] = -1;
    for (int i = 0; i < l->cnt; i++)
        off[l->elems[i].partition] = l->elems[i].offset;
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_consumer_close(c);
    rd_kafka_destroy(c);
    cr_assert_eq(err, 0, "committed: %s", rd_kafka_err2str(err));
}

/* Committed offsets of group meshgate-<region> on its topic, summed. */
static int64_t committed_sum(const char *region)
{
    int64_t off[PARTITIONS], sum = 0;
    committed_offsets(region, off);
    for (int p = 0; p < PARTITIONS; p++)
        if (off[p] > 0)
            sum += off[p];
    return sum;
}

static rd_kafka_t *raw_producer(void)
{
    char e[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers", broker(), e, sizeof(e)), 0);
    rd_kafka_t *p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, e, sizeof(e));
    cr_assert(p, "%s", e);
    return p;
}

Test(kafka, undecodable_record_is_skipped_counted_and_committed)
{
    char region[64], topic[160];
    region_name(region, sizeof(region), "bad");
    snprintf(topic, sizeof(topic), PREFIX "%s", region);
    mg_recsink r;
    mg_recsink_init(&r);
    mg_router *rt = mg_recsink_router("gw-a", region, &r, 1);
    mg_transport *t = make_transport("gw-a", region, 5000);
    mg_router_set_transport(rt, MG_PATH_KAFKA, t);
    cr_assert_eq(mg_transport_kafka_start_consumer(t, rt), 0);
    assign_arg aa = {{t, NULL}, PARTITIONS};
    cr_assert(mg_wait_until(assigned, &aa, 30000), "no partitions assigned");
    int64_t bad0 = counter("meshgate_kafka_bad_records_total");

    /* Garbage bytes straight to the topic, keyed like the good message so
     * both land in one partition, garbage first. */
    rd_kafka_t *p = raw_producer();
    static const char garbage[] = "\xff\xff\xff not a protobuf envelope";
    cr_assert_eq(rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY("u0", 2),
                                   RD_KAFKA_V_VALUE((void *)garbage, sizeof(garbage) - 1),
                                   RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END),
                 0);
    cr_assert_eq(rd_kafka_flush(p, 10000), 0);
    rd_kafka_destroy(p);

    mg_deliver_outcome out = send_to(t, region, "good-1", "u0", MG_PRIO_HIGH);
    cr_assert_eq(out.status, MG_STATUS_QUEUED, "%s", out.reason);
    cr_assert(mg_recsink_wait_total(&r, 1, 30000), "the good record after the bad one "
                                                   "was not delivered");
    cr_assert_eq(mg_recsink_count(&r, "good-1"), 1);
    cr_assert_eq(counter("meshgate_kafka_bad_records_total"), bad0 + 1);
    mg_transport_kafka_stop(t, 5000);
    cr_assert_eq(committed_sum(region), 2, "offsets did not move past both records");
    mg_router_free(rt);
    delete_topic(region);
    mg_recsink_destroy(&r);
}

Test(kafka, one_group_per_region_handles_each_message_once)
{
    char region[64];
    region_name(region, sizeof(region), "group");
    mg_recsink ra, rb;
    mg_recsink_init(&ra);
    mg_recsink_init(&rb);
    enum { USERS = 24, N = 120 };
    mg_router *a = mg_recsink_router("gw-a", region, &ra, USERS);
    mg_router *b = mg_recsink_router("gw-b", region, &rb, USERS);
    mg_transport *ta = make_transport("gw-a", region, 5000);
    mg_transport *tb = make_transport("gw-b", region, 5000);
    mg_router_set_transport(a, MG_PATH_KAFKA, ta);
    mg_router_set_transport(b, MG_PATH_KAFKA, tb);
    cr_assert_eq(mg_transport_kafka_start_consumer(ta, a), 0);
    cr_assert_eq(mg_transport_kafka_start_consumer(tb, b), 0);
    assign_arg aa = {{ta, tb}, PARTITIONS};
    cr_assert(mg_wait_until(assigned, &aa, 40000), "group did not settle: a=%d b=%d",
              mg_transport_kafka_assigned(ta), mg_transport_kafka_assigned(tb));

    for (int i = 0; i < N; i++) {
        char id[32], user[16];
        snprintf(id, sizeof(id), "g%d", i);
        snprintf(user, sizeof(user), "u%d", i % USERS);
        mg_deliver_outcome out = send_to(i % 2 ? ta : tb, region, id, user, MG_PRIO_HIGH);
        cr_assert_eq(out.status, MG_STATUS_QUEUED, "%s", out.reason);
    }
    int64_t end = mg_mono_ms() + 30000;
    while (mg_recsink_total(&ra) + mg_recsink_total(&rb) < N && mg_mono_ms() < end)
        usleep(20000);
    usleep(1000000);
    cr_assert_eq(mg_recsink_total(&ra) + mg_recsink_total(&rb), N, "a=%d b=%d",
                 mg_recsink_total(&ra), mg_recsink_total(&rb));
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "g%d", i);
        cr_assert_eq(mg_recsink_count(&ra, id) + mg_recsink_count(&rb, id), 1,
                     "%s handled %d times", id,
                     mg_recsink_count(&ra, id) + mg_recsink_count(&rb, id));
    }
    cr_assert_gt(mg_recsink_total(&ra), 0, "gateway a handled nothing");
    cr_assert_gt(mg_recsink_total(&rb), 0, "gateway b handled nothing");
    mg_transport_kafka_stop(ta, 5000);
    mg_transport_kafka_stop(tb, 5000);
    mg_router_free(a);
    mg_router_free(b);
    delete_topic(region);
    mg_recsink_destroy(&ra);
    mg_recsink_destroy(&rb);
}

Test(kafka, redelivery_after_a_consumer_died_reaches_the_client_once)
{
    char region[64], topic[160], group[128], e[512];
    region_name(region, sizeof(region), "redeliver");
    snprintf(topic, sizeof(topic), PREFIX "%s", region);
    snprintf(group, sizeof(group), "meshgate-%s", region);
    mg_recsink r;
    mg_recsink_init(&r);
    mg_router *rt = mg_recsink_router("gw-a", region, &r, 5);
    mg_transport *t = make_transport("gw-a", region, 5000);
    mg_router_set_transport(rt, MG_PATH_KAFKA, t);
    enum { N = 20 };
    for (int i = 0; i < N; i++) {
        char id[32], user[16];
        snprintf(id, sizeof(id), "d%d", i);
        snprintf(user, sizeof(user), "u%d", i % 5);
        mg_deliver_outcome out = send_to(t, region, id, user, MG_PRIO_HIGH);
        cr_assert_eq(out.status, MG_STATUS_QUEUED, "%s", out.reason);
    }

    /* A gateway of the group handles every record, then dies: no commit, no
     * LeaveGroup. */
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers", broker(), e, sizeof(e)), 0);
    cr_assert_eq(rd_kafka_conf_set(conf, "group.id", group, e, sizeof(e)), 0);
    cr_assert_eq(rd_kafka_conf_set(conf, "enable.auto.commit", "false", e, sizeof(e)), 0);
    cr_assert_eq(rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", e, sizeof(e)), 0);
    cr_assert_eq(rd_kafka_conf_set(conf, "session.timeout.ms", "6000", e, sizeof(e)), 0);
    rd_kafka_t *dying = rd_kafka_new(RD_KAFKA_CONSUMER, conf, e, sizeof(e));
    cr_assert(dying, "%s", e);
    rd_kafka_poll_set_consumer(dying);
    rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(sub, topic, RD_KAFKA_PARTITION_UA);
    cr_assert_eq(rd_kafka_subscribe(dying, sub), 0);
    rd_kafka_topic_partition_list_destroy(sub);
    int handled = 0;
    for (int64_t end = mg_mono_ms() + 40000; handled < N && mg_mono_ms() < end;) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(dying, 100);
        if (!m)
            continue;
        mg_msg *msg = NULL;
        if (!m->err && mg_msg_unpack(m->payload, m->len, &msg) == 0) {
            mg_send_result res;
            cr_assert_eq(mg_wait_from_queue(rt, msg, mg_mono_ms() + 10000, &res), 0);
            mg_msg_free(msg);
            handled++;
        }
        rd_kafka_message_destroy(m);
    }
    rd_kafka_destroy_flags(dying, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    cr_assert_eq(handled, N, "the first consumer handled %d of %d", handled, N);
    cr_assert_eq(mg_recsink_total(&r), N);

    /* The region's next consumer gets the partitions once the dead member's
     * session expires and handles every record again; dedupe drops them. */
    int64_t consumed0 = counter("meshgate_kafka_consumed_total");
    int64_t dups0 = counter("meshgate_duplicates_dropped_total");
    cr_assert_eq(mg_transport_kafka_start_consumer(t, rt), 0);
    int64_t end = mg_mono_ms() + 60000;
    while (counter("meshgate_kafka_consumed_total") - consumed0 < N && mg_mono_ms() < end)
        usleep(50000);
    cr_assert_eq(counter("meshgate_kafka_consumed_total") - consumed0, N, "redelivered %lld of %d",
                 (long long)(counter("meshgate_kafka_consumed_total") - consumed0), N);
    cr_assert_eq(counter("meshgate_duplicates_dropped_total") - dups0, N);
    cr_assert_eq(mg_recsink_total(&r), N, "the client saw %d deliveries of %d messages",
                 mg_recsink_total(&r), N);
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "d%d", i);
        cr_assert_eq(mg_recsink_count(&r, id), 1);
    }
    mg_transport_kafka_stop(t, 5000);
    cr_assert_eq(committed_sum(region), N);
    mg_router_free(rt);
    delete_topic(region);
    mg_recsink_destroy(&r);
}

/* ---- pipelining: each recipient's order, commits below the lowest record not done ---- */

/* A local sink that keeps the write reports of users u0..u<hold_users - 1>
 * while `holding` (slow deliveries) and reports the others at once; it
 * records the message numbers ("p<n>") of u0..u<HOLD_USERS - 1> in arrival
 * order. */
enum { HOLD_USERS = 5, HOLD_N = 60 };

typedef struct holdsink {
    pthread_mutex_t mu;
    int hold_users;
    bool holding;
    int seq[HOLD_USERS][HOLD_N + 1], nseq[HOLD_USERS];
    int total;
    mg_written_fn *held_fn;
    void **held_arg;
    int nheld, held_max;
} holdsink;

static holdsink *holdsink_new(int hold_users, int held_max)
{
    holdsink *s = calloc(1, sizeof(*s));
    pthread_mutex_init(&s->mu, NULL);
    s->hold_users = hold_users;
    s->holding = true;
    s->held_max = held_max;
    s->held_fn = calloc((size_t)held_max, sizeof(*s->held_fn));
    s->held_arg = calloc((size_t)held_max, sizeof(*s->held_arg));
    return s;
}

static void holdsink_free(holdsink *s)
{
    pthread_mutex_destroy(&s->mu);
    free(s->held_fn);
    free(s->held_arg);
    free(s);
}

static int hold_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    holdsink *s = arg;
    int u = atoi(msg->to + 1), n = -1;
    sscanf(msg->id, "p%d", &n);
    pthread_mutex_lock(&s->mu);
    if (u < HOLD_USERS) {
        cr_assert(s->nseq[u] <= HOLD_N);
        s->seq[u][s->nseq[u]++] = n;
    }
    s->total++;
    bool hold = written && u < s->hold_users && s->holding && s->nheld < s->held_max;
    if (hold) {
        s->held_fn[s->nheld] = written;
        s->held_arg[s->nheld++] = written_arg;
    }
    pthread_mutex_unlock(&s->mu);
    if (written && !hold)
        written(written_arg, 1);
    return 1;
}

static int hold_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return 0;
}

static void hold_release(holdsink *s)
{
    pthread_mutex_lock(&s->mu);
    s->holding = false;
    int n = s->nheld;
    s->nheld = 0;
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < n; i++)
        s->held_fn[i](s->held_arg[i], 1);
}

typedef struct {
    holdsink *s;
    int user, n; /* user < 0: the total */
} hold_wait;

static bool hold_seen(void *arg)
{
    hold_wait *w = arg;
    pthread_mutex_lock(&w->s->mu);
    bool ok = (w->user < 0 ? w->s->total : w->s->nseq[w->user]) >= w->n;
    pthread_mutex_unlock(&w->s->mu);
    return ok;
}

static void produce_to_partition(rd_kafka_t *p, const char *topic, int partition, const char *id,
                                 const char *user)
{
    mg_msg *m =
        mg_msg_new(id, "sender", user, (const uint8_t *)"x", 1, NULL, mg_now_ms(), MG_PRIO_HIGH);
    size_t len = 0;
    uint8_t *val = mg_msg_pack(m, &len);
    mg_msg_free(m);
    cr_assert_eq(rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(partition),
                                   RD_KAFKA_V_KEY(user, strlen(user)), RD_KAFKA_V_VALUE(val, len),
                                   RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_FREE), RD_KAFKA_V_END),
                 0);
}

typedef struct {
    const char *region;
    int partition;
    int64_t at_least;
} committed_wait;

static bool committed_reached(void *arg)
{
    committed_wait *w = arg;
    int64_t off[PARTITIONS];
    committed_offsets(w->region, off);
    return off[w->partition] >= w->at_least;
}

/* Gateway "gw-a" of its own region, consuming, its writes going to a
 * holdsink; users u0..u<users - 1> connected. */
typedef struct held_gw {
    char region[64], topic[160];
    holdsink *s;
    mg_router *rt;
    mg_transport *t;
} held_gw;

static void held_gw_start(held_gw *g, const char *name, int users, int hold_users, int held_max)
{
    region_name(g->region, sizeof(g->region), name);
    snprintf(g->topic, sizeof(g->topic), PREFIX "%s", g->region);
    g->s = holdsink_new(hold_users, held_max);
    mg_local_sink sink = {.deliver = hold_deliver, .disconnect = hold_disconnect, .arg = g->s};
    g->rt = mg_sink_router("gw-a", g->region, &sink, users);
    g->t = make_transport("gw-a", g->region, 5000);
    mg_router_set_transport(g->rt, MG_PATH_KAFKA, g->t);
    cr_assert_eq(mg_transport_kafka_start_consumer(g->t, g->rt), 0);
    assign_arg aa = {{g->t, NULL}, PARTITIONS};
    cr_assert(mg_wait_until(assigned, &aa, 30000), "no partitions assigned");
}

static void held_gw_free(held_gw *g)
{
    mg_router_free(g->rt);
    delete_topic(g->region);
    holdsink_free(g->s);
}

Test(kafka, records_of_other_recipients_pass_a_slow_one_in_order_and_commits_wait_for_it)
{
    held_gw g;
    held_gw_start(&g, "pipeline", HOLD_USERS, 1, HOLD_N);
    holdsink *s = g.s;
    const char *region = g.region, *topic = g.topic;

    /* HOLD_N records in partition 0, users round robin, u0's first: its
     * write is held, so every later record of u0 must wait behind it while
     * the other users' records go through. */
    rd_kafka_t *p = raw_producer();
    for (int i = 0; i < HOLD_N; i++) {
        char id[16], user[16];
        snprintf(id, sizeof(id), "p%d", i);
        snprintf(user, sizeof(user), "u%d", i % HOLD_USERS);
        produce_to_partition(p, topic, 0, id, user);
    }
    cr_assert_eq(rd_kafka_flush(p, 10000), 0);
    for (int u = 1; u < HOLD_USERS; u++) {
        hold_wait w = {s, u, HOLD_N / HOLD_USERS};
        cr_assert(mg_wait_until(hold_seen, &w, 30000),
                  "u%d's records did not pass u0's held one (%d of %d)", u, s->nseq[u], w.n);
    }
    pthread_mutex_lock(&s->mu);
    cr_assert_eq(s->nseq[0], 1, "u0's later records did not wait for its first (%d seen)",
                 s->nseq[0]);
    pthread_mutex_unlock(&s->mu);

    /* A record of partition 1, produced now: once its offset is committed,
     * that commit carried partition 0's stored offset too, which must not
     * pass u0's first record (offset 0). */
    produce_to_partition(p, topic, 1, "p-marker", "u1");
    cr_assert_eq(rd_kafka_flush(p, 10000), 0);
    rd_kafka_destroy(p);
    committed_wait cw = {region, 1, 1};
    cr_assert(mg_wait_until(committed_reached, &cw, 20000), "partition 1 was not committed");
    int64_t off[PARTITIONS];
    committed_offsets(region, off);
    cr_assert_leq(off[0], 0, "partition 0 committed to %lld past a record not done",
                  (long long)off[0]);

    hold_release(s);
    hold_wait all = {s, -1, HOLD_N + 1};
    cr_assert(mg_wait_until(hold_seen, &all, 30000), "%d of %d delivered after the release",
              s->total, HOLD_N + 1);
    for (int u = 0; u < HOLD_USERS; u++) {
        int want = u == 1 ? HOLD_N / HOLD_USERS + 1 : HOLD_N / HOLD_USERS;
        cr_assert_eq(s->nseq[u], want, "u%d got %d of %d", u, s->nseq[u], want);
        for (int i = 1; i < HOLD_N / HOLD_USERS; i++)
            cr_assert_gt(s->seq[u][i], s->seq[u][i - 1], "u%d: p%d arrived after p%d", u,
                         s->seq[u][i - 1], s->seq[u][i]);
    }
    mg_transport_kafka_stop(g.t, 5000);
    committed_offsets(region, off);
    cr_assert_eq(off[0], HOLD_N, "partition 0 committed to %lld", (long long)off[0]);
    held_gw_free(&g);
}

Test(kafka, operations_in_flight_from_the_consumer_are_bounded)
{
    enum { USERS = MG_KAFKA_CONSUME_INFLIGHT_MAX + 76 };
    held_gw g;
    held_gw_start(&g, "bound", USERS, USERS, USERS);
    holdsink *s = g.s;

    /* One record per user, every write held: each could start at once, but
     * only the bound may be in flight; the rest wait until room is made. */
    rd_kafka_t *p = raw_producer();
    for (int i = 0; i < USERS; i++) {
        char id[16], user[16];
        snprintf(id, sizeof(id), "p%d", i);
        snprintf(user, sizeof(user), "u%d", i);
        produce_to_partition(p, g.topic, i % PARTITIONS, id, user);
    }
    cr_assert_eq(rd_kafka_flush(p, 10000), 0);
    rd_kafka_destroy(p);
    /* Every record fetched and handed to the consumer's logic (started or
     * waiting): the gauge is set after each turn of the consumer loop. */
    gauge_wait gw = {"meshgate_kafka_consumer_records", USERS};
    cr_assert(mg_wait_until(gauge_reached, &gw, 30000), "the consumer holds %lld of %d records",
              (long long)gauge("meshgate_kafka_consumer_records"), USERS);
    pthread_mutex_lock(&s->mu);
    int started = s->total;
    pthread_mutex_unlock(&s->mu);
    cr_assert_eq(started, MG_KAFKA_CONSUME_INFLIGHT_MAX, "%d operations in flight", started);

    hold_release(s);
    hold_wait all = {s, -1, USERS};
    cr_assert(mg_wait_until(hold_seen, &all, 30000), "%d of %d delivered after the release",
              s->total, USERS);
    mg_transport_kafka_stop(g.t, 5000);
    cr_assert_eq(committed_sum(g.region), USERS);
    cr_assert_eq(gauge("meshgate_kafka_consumer_records"), 0);
    held_gw_free(&g);
}

/* ---- broker restart mid-run ---- */

typedef struct sent {
    char id[32];
    mg_status status;
    char reason[128];
    int64_t started_ms, took_ms;
} sent;

typedef struct sender {
    mg_transport *t;
    const char *region;
    atomic_bool run;
    sent items[4000];
    int n;
} sender;

static void *sender_main(void *arg)
{
    sender *s = arg;
    while (atomic_load(&s->run) && s->n < 4000) {
        sent *it = &s->items[s->n];
        snprintf(it->id, sizeof(it->id), "k%d", s->n);
        char user[16];
        snprintf(user, sizeof(user), "u%d", s->n % 8);
        it->started_ms = mg_mono_ms();
        int64_t now = mg_mono_us();
        mg_msg *m = mg_msg_new(it->id, "sender", user, (const uint8_t *)&now, sizeof(now), NULL,
                               mg_now_ms(), MG_PRIO_HIGH);
        mg_route_target target = {"gw-far", s->region};
        mg_deliver_outcome out = {0};
        int rc = mg_wait_deliver(s->t, &target, m, mg_mono_ms() + 30000, &out);
        mg_msg_free(m);
        it->took_ms = mg_mono_ms() - it->started_ms;
        it->status = rc == 0 ? out.status : MG_STATUS_NONE;
        snprintf(it->reason, sizeof(it->reason), "%s", out.reason);
        s->n++;
        usleep(20000);
    }
    return NULL;
}

Test(kafka_chaos, broker_restart_high_fails_clearly_and_nothing_queued_is_lost)
{
    enum { TIMEOUT_MS = 3000 };
    char region[64], cmd[1024];
    region_name(region, sizeof(region), "restart");
    const char *infra = mg_test_env("MESHGATE_TEST_INFRA");
    snprintf(cmd, sizeof(cmd), "%s/kafka.sh restart-broker >/dev/null 2>&1",
             infra ? infra : MG_SOURCE_DIR "/tests/infra");
    mg_recsink r;
    mg_recsink_init(&r);
    mg_router *rt = mg_recsink_router("gw-a", region, &r, 8);
    mg_transport *t = make_transport("gw-a", region, TIMEOUT_MS);
    mg_router_set_transport(rt, MG_PATH_KAFKA, t);
    cr_assert_eq(mg_transport_kafka_start_consumer(t, rt), 0);
    assign_arg aa = {{t, NULL}, PARTITIONS};
    cr_assert(mg_wait_until(assigned, &aa, 30000), "no partitions assigned");

    sender *s = calloc(1, sizeof(*s));
    s->t = t;
    s->region = region;
    atomic_store(&s->run, true);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, sender_main, s), 0);
    usleep(1000000);
    int64_t restart_at = mg_mono_ms();
    int rc = system(cmd);
    int64_t restarted_at = mg_mono_ms();
    usleep(8000000); /* sends go on after the broker is back */
    atomic_store(&s->run, false);
    pthread_join(th, NULL);
    cr_assert_eq(rc, 0, "%s failed", cmd);

    int queued = 0, failed = 0, queued_after = 0;
    for (int i = 0; i < s->n; i++) {
        sent *it = &s->items[i];
        if (it->status == MG_STATUS_QUEUED) {
            queued++;
            if (it->started_ms > restarted_at)
                queued_after++;
        } else {
            failed++;
            cr_assert_eq(it->status, MG_STATUS_FAILED, "%s: status %d", it->id, it->status);
            cr_assert(strncmp(it->reason, "kafka: ", 7) == 0, "%s: reason=%s", it->id, it->reason);
            cr_assert_leq(it->took_ms, TIMEOUT_MS + 1000, "%s failed after %lld ms", it->id,
                          (long long)it->took_ms);
        }
    }
    fprintf(stderr,
            "kafka restart: broker down+up took %lld ms; %d HIGH sends: %d QUEUED, %d FAILED "
            "(each within %d ms), %d QUEUED after the restart\n",
            (long long)(restarted_at - restart_at), s->n, queued, failed, TIMEOUT_MS + 1000,
            queued_after);
    cr_assert_gt(queued_after, 0, "no HIGH send succeeded after the restart");

    /* Nothing answered QUEUED is lost. */
    int64_t end = mg_mono_ms() + 60000;
    int missing = queued;
    while (missing > 0 && mg_mono_ms() < end) {
        missing = 0;
        for (int i = 0; i < s->n; i++)
            if (s->items[i].status == MG_STATUS_QUEUED && mg_recsink_count(&r, s->items[i].id) == 0)
                missing++;
        if (missing)
            usleep(100000);
    }
    cr_assert_eq(missing, 0, "%d messages answered QUEUED were never delivered", missing);
    for (int i = 0; i < s->n; i++)
        cr_assert_leq(mg_recsink_count(&r, s->items[i].id), 1, "%s delivered twice",
                      s->items[i].id);
    mg_transport_kafka_stop(t, 5000);
    mg_router_free(rt);
    delete_topic(region);
    mg_recsink_destroy(&r);
    free(s);
}
