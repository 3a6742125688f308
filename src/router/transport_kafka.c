/* transport_kafka.c: the Kafka path: producer to region topics and the
 * region's consumer (see transport_kafka.h for the contract).
 *
 * DESIGN
 * Producer. One idempotent librdkafka producer (acks=all) per gateway. A
 * HIGH send attaches a small report (the caller's done callback) as the
 * message opaque and returns; the delivery report, on "kafka-poll", runs
 * the callback: QUEUED once the broker acknowledged, else FAILED.
 * message.timeout.ms equals timeout_ms, so every report comes within it. A
 * full local queue fails the send at once (the queue is the bound on
 * messages in flight). A LOW send only enqueues. Delivery reports and admin
 * (CreateTopics) results are served by the "kafka-poll" thread, which is
 * the only thread calling rd_kafka_poll() on the producer.
 *
 * Topics. This region's topic is created through the Admin API when the
 * transport is created (retried every few seconds from "kafka-poll" until the
 * broker answers; TOPIC_ALREADY_EXISTS counts as done). The first produce to
 * another region's topic fires one asynchronous CreateTopics as well (that
 * region's gateways, or broker auto-create, usually got there first).
 *
 * Consumer. Group "meshgate-<region>", auto commit and auto offset store off.
 * The "kafka-consume" thread is an ingress that never waits for a record:
 * it polls, decodes and starts each record's operation, the turn's starts
 * handed to the router together (mg_router_deliver_from_queue_many: one
 * pipelined presence lookup for them); the operation's answer (any thread) is
 * queued back and wakes the poll (rd_kafka_queue_yield), and the consumer
 * thread settles it. Records are pipelined per recipient, not per
 * partition: a record whose recipient has an earlier record not yet done
 * waits behind it (chained; it starts when that one is done), every other
 * record starts at once. So one recipient's records are handled one at a
 * time in offset order (the order DESIGN.md promises: a recipient's
 * messages share a partition by key) while a partition has as many
 * records in flight as it has recipients with work. Each partition keeps
 * a window of its fetched records in offset order; the offset stored (and
 * so committed) is the one after the longest done prefix of the window,
 * i.e. never past the lowest record not yet handled (delivered, forwarded
 * by gRPC, put in the inbox, or skipped as undecodable): a gateway killed
 * mid-run loses nothing, the next owner redelivers from there and the
 * dedupe window drops what was shown already. A partition whose window
 * holds PART_WINDOW_MAX records is paused until it is down to half
 * (pausing drops librdkafka's prefetched records and refetches from the one
 * after the last fetched: pausing per record would cost a fetch round trip
 * per record); at most CONSUME_INFLIGHT_MAX operations are in flight from
 * the consumer (the same bound as a peer's calls by default), the records
 * free to start beyond it wait in order. Stored offsets are
 * committed asynchronously at most every COMMIT_INTERVAL_MS (at once when
 * the consumer is idle), synchronously on partition revocation and on stop.
 * A transient failure retries the same record with exponential backoff (the
 * recipient's later records wait; others go on); after
 * retry_budget_ms the message is parked in the recipient's inbox (if that
 * fails too, retrying goes on: nothing acknowledged is dropped); the retry
 * waits on a due time checked by the loop, not on a sleeping thread. On stop
 * the operations in flight are awaited (bounded by their deadline) before the
 * consumer closes; what was not handled stays uncommitted and is redelivered.
 *
 * Threads: deliver()/available() from any router worker; "kafka-poll" and
 * "kafka-consume" are owned here; create/start/stop/free from the control
 * thread. librdkafka's own threads run the log and error callbacks.
 */
#include "router/transport_kafka.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "common/mg_trace.h"

#include <errno.h>
#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define COMMIT_INTERVAL_MS    200
#define LAG_INTERVAL_MS       2000
#define TOPIC_RETRY_MS        5000
#define BAD_RECORD_LOG_EVERY  100
#define MAX_FOREIGN_TOPICS    1024
#define RETRY_DELAY_MIN_MS    50
#define RETRY_DELAY_MAX_MS    2000
#define ERROR_LOG_INTERVAL_MS 5000
#define PART_WINDOW_MAX       1024 /* records fetched and not yet stored past, per partition */
#define CONSUME_INFLIGHT_MAX  MG_KAFKA_CONSUME_INFLIGHT_MAX /* from the consumer, all partitions */

enum { TOPIC_UNKNOWN = 0, TOPIC_PENDING = 1, TOPIC_READY = 2 };

/* A HIGH send's delivery report: the caller's callback (the message opaque). */
typedef struct report {
    mg_deliver_done done;
    void *arg;
    int64_t start_us;
} report;

typedef struct tk {
    mg_transport base;
    char *brokers, *prefix, *region, *gateway_id, *own_topic;
    int partitions, linger_ms, batch_bytes, timeout_ms, queue_max, retry_budget_ms;
    mg_peers *peers; /* borrowed; NULL: every region consumes Kafka */

    rd_kafka_t *producer;
    rd_kafka_queue_t *admin_q;
    pthread_t poll_thread;
    bool poll_started;
    atomic_bool poll_run;
    atomic_int own_topic_state;
    int64_t own_topic_retry_at; /* kafka-poll only */
    pthread_mutex_t topics_mu;
    mg_map *topics; /* foreign topic -> (void *)TOPIC_PENDING/READY */

    rd_kafka_t *consumer;
    rd_kafka_queue_t *consumer_q; /* yielded by record_done to wake the poll */
    pthread_t consume_thread;
    bool consume_started;
    atomic_bool consume_run;
    mg_router *router;
    atomic_int assigned;
    struct part *parts; /* by partition number: kafka-consume only */
    mg_map *chains;     /* recipient -> its last record not done: kafka-consume only */
    struct record *ready_head, *ready_tail;   /* free to start, over CONSUME_INFLIGHT_MAX */
    struct record *launch_head, *launch_tail; /* started this turn: records_launch */
    size_t nparts;
    struct record *retrying; /* kafka-consume only */
    pthread_mutex_t rec_mu;  /* answered */
    struct record *answered; /* operations that answered, for kafka-consume */
    atomic_int in_flight;

    atomic_llong last_error_log_ms;
    mg_metric *dropped, *bad_records, *consumed, *retries, *parked, *produce_errors, *ack_latency;
    mg_metric *held; /* records fetched and not yet committed past */
    size_t nheld;    /* kafka-consume only */
} tk;

/* ---- small helpers ------------------------------------------------------- */

static void set_reason(mg_deliver_outcome *out, mg_status st, const char *fmt, const char *arg)
{
    out->status = st;
    snprintf(out->reason, sizeof(out->reason), fmt, arg);
}

static bool conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *err,
                     size_t errlen)
{
    char e[256];
    if (rd_kafka_conf_set(conf, name, value, e, sizeof(e)) == RD_KAFKA_CONF_OK)
        return true;
    snprintf(err, errlen, "kafka: %.60s=%.60s: %.120s", name, value, e);
    return false;
}

static bool conf_set_int(rd_kafka_conf_t *conf, const char *name, long long v, char *err,
                         size_t errlen)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%lld", v);
    return conf_set(conf, name, buf, err, errlen);
}

/* Rate-limited: true when a warning may be logged now. */
static bool error_log_due(tk *k)
{
    int64_t now = mg_mono_ms();
    long long last = atomic_load(&k->last_error_log_ms);
    return now - last >= ERROR_LOG_INTERVAL_MS &&
           atomic_compare_exchange_strong(&k->last_error_log_ms, &last, now);
}

static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    /* Broker connection failures come as LOG_ERR; they are transient, and
     * error_cb sees them too, so they are warnings here. */
    if (level <= 4)
        mg_log_warn("kafka", "librdkafka %s: %s client=%s", fac, buf, rd_kafka_name(rk));
    else
        mg_log_info("kafka", "librdkafka %s: %s client=%s", fac, buf, rd_kafka_name(rk));
}

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    tk *k = opaque;
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char fatal[256];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
        mg_log_error("kafka", "fatal error client=%s err=%s reason=%s", rd_kafka_name(rk),
                     rd_kafka_err2name(ferr), fatal);
        return;
    }
    if (error_log_due(k))
        mg_log_warn("kafka", "client=%s err=%s reason=%s", rd_kafka_name(rk),
                    rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

static void fail_err(tk *k, mg_deliver_outcome *out, rd_kafka_resp_err_t err)
{
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char fatal[96];
        rd_kafka_fatal_error(k->producer, fatal, sizeof(fatal));
        set_reason(out, MG_STATUS_FAILED, "kafka: fatal producer error: %s", fatal);
        return;
    }
    set_reason(out, MG_STATUS_FAILED, "kafka: %s", rd_kafka_err2str(err));
}

/* kafka-poll thread (or whoever polls the producer): one delivery report. */
static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    tk *k = opaque;
    report *w = m->_private;
    if (m->err) {
        mg_metric_add(k->produce_errors, 1);
        if (!w && error_log_due(k))
            mg_log_warn("kafka", "LOW message not delivered topic=%s err=%s",
                        rd_kafka_topic_name(m->rkt), rd_kafka_err2str(m->err));
    }
    if (!w)
        return;
    int64_t waited_us = mg_mono_us() - w->start_us;
    mg_histogram_observe_us(k->ack_latency, waited_us);
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
        out.status = MG_STATUS_QUEUED;
    else if (m->err == RD_KAFKA_RESP_ERR__MSG_TIMED_OUT)
        set_reason(&out, MG_STATUS_FAILED, "kafka: %s",
                   "no acknowledgement in time (broker unreachable?)");
    else
        fail_err(k, &out, m->err);
    w->done(w->arg, &out);
    free(w);
}

/* ---- topics -------------------------------------------------------------- */

static void create_topic_async(tk *k, const char *topic)
{
    char e[256];
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topic, k->partitions, -1, e, sizeof(e));
    if (!nt) {
        mg_log_warn("kafka", "cannot describe topic=%s err=%s", topic, e);
        return;
    }
    rd_kafka_AdminOptions_t *opt =
        rd_kafka_AdminOptions_new(k->producer, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_AdminOptions_set_request_timeout(opt, k->timeout_ms, e, sizeof(e));
    rd_kafka_AdminOptions_set_operation_timeout(opt, k->timeout_ms, e, sizeof(e));
    rd_kafka_CreateTopics(k->producer, &nt, 1, opt, k->admin_q);
    rd_kafka_AdminOptions_destroy(opt);
    rd_kafka_NewTopic_destroy(nt);
}

/* Router worker: fires one CreateTopics for a region topic never seen. */
static void ensure_topic(tk *k, const char *topic)
{
    if (!strcmp(topic, k->own_topic))
        return;
    bool fire = false;
    pthread_mutex_lock(&k->topics_mu);
    if (!mg_map_get(k->topics, topic) && mg_map_size(k->topics) < MAX_FOREIGN_TOPICS) {
        mg_map_put(k->topics, topic, (void *)(intptr_t)TOPIC_PENDING);
        fire = true;
    }
    pthread_mutex_unlock(&k->topics_mu);
    if (fire)
        create_topic_async(k, topic);
}

static void topic_result(tk *k, const char *name, rd_kafka_resp_err_t err, const char *msg)
{
    bool ok = err == RD_KAFKA_RESP_ERR_NO_ERROR || err == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS;
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
        mg_log_info("kafka", "topic created topic=%s partitions=%d", name, k->partitions);
    else if (!ok)
        mg_log_warn("kafka", "topic create failed topic=%s err=%s reason=%s", name,
                    rd_kafka_err2name(err), msg ? msg : "");
    if (!strcmp(name, k->own_topic)) {
        atomic_store(&k->own_topic_state, ok ? TOPIC_READY : TOPIC_UNKNOWN);
        k->own_topic_retry_at = mg_mono_ms() + TOPIC_RETRY_MS;
        return;
    }
    pthread_mutex_lock(&k->topics_mu);
    if (ok)
        mg_map_put(k->topics, name, (void *)(intptr_t)TOPIC_READY);
    else
        mg_map_del(k->topics, name); /* the next produce asks again */
    pthread_mutex_unlock(&k->topics_mu);
}

static void admin_event(tk *k, rd_kafka_event_t *ev)
{
    if (rd_kafka_event_type(ev) != RD_KAFKA_EVENT_CREATETOPICS_RESULT)
        return;
    const rd_kafka_CreateTopics_result_t *res = rd_kafka_event_CreateTopics_result(ev);
    size_t n = 0;
    const rd_kafka_topic_result_t **topics = rd_kafka_CreateTopics_result_topics(res, &n);
    for (size_t i = 0; i < n; i++)
        topic_result(k, rd_kafka_topic_result_name(topics[i]),
                     rd_kafka_topic_result_error(topics[i]),
                     rd_kafka_topic_result_error_string(topics[i]));
    if (n == 0 && rd_kafka_event_error(ev)) {
        /* The request as a whole failed (broker unreachable): ask again. */
        if (error_log_due(k))
            mg_log_warn("kafka", "create topics failed err=%s", rd_kafka_event_error_string(ev));
        if (atomic_load(&k->own_topic_state) == TOPIC_PENDING) {
            atomic_store(&k->own_topic_state, TOPIC_UNKNOWN);
            k->own_topic_retry_at = mg_mono_ms() + TOPIC_RETRY_MS;
        }
        pthread_mutex_lock(&k->topics_mu);
        const char *key;
        void *v;
        char *pending[16];
        size_t np = 0;
        for (size_t it = 0; np < 16 && mg_map_next(k->topics, &it, &key, &v);)
            if ((intptr_t)v == TOPIC_PENDING)
                pending[np++] = mg_xstrdup(key);
        for (size_t i = 0; i < np; i++) {
            mg_map_del(k->topics, pending[i]);
            free(pending[i]);
        }
        pthread_mutex_unlock(&k->topics_mu);
    }
}

static void drain_admin(tk *k)
{
    rd_kafka_event_t *ev;
    while ((ev = rd_kafka_queue_poll(k->admin_q, 0)) != NULL) {
        admin_event(k, ev);
        rd_kafka_event_destroy(ev);
    }
}

static void *poll_main(void *arg)
{
    tk *k = arg;
    while (atomic_load(&k->poll_run)) {
        rd_kafka_poll(k->producer, 50);
        drain_admin(k);
        if (atomic_load(&k->own_topic_state) == TOPIC_UNKNOWN &&
            mg_mono_ms() >= k->own_topic_retry_at) {
            atomic_store(&k->own_topic_state, TOPIC_PENDING);
            create_topic_async(k, k->own_topic);
        }
    }
    return NULL;
}

/* ---- producer ------------------------------------------------------------ */

/* On success librdkafka owns val (RD_KAFKA_MSG_F_FREE); on failure the caller
 * still does. Headers: origin (this gateway) and, for a traced message, its
 * W3C traceparent. */
static rd_kafka_resp_err_t produce(tk *k, const char *topic, const mg_msg *msg, uint8_t *val,
                                   size_t len, report *w)
{
    char tp[MG_TRACEPARENT_LEN + 1];
    size_t tpl = mg_traceparent_format(&msg->trace, tp);
    rd_kafka_headers_t *h = rd_kafka_headers_new(2);
    rd_kafka_header_add(h, "origin", -1, k->gateway_id, -1);
    if (tpl)
        rd_kafka_header_add(h, "traceparent", -1, tp, (ssize_t)tpl);
    rd_kafka_resp_err_t err = rd_kafka_producev(
        k->producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(msg->to, strlen(msg->to)),
        RD_KAFKA_V_VALUE(val, len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_FREE), RD_KAFKA_V_HEADERS(h),
        RD_KAFKA_V_OPAQUE(w), RD_KAFKA_V_END);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
        rd_kafka_headers_destroy(h); /* librdkafka took them only on success */
    return err;
}

static bool tk_available(mg_transport *t, const mg_route_target *target)
{
    tk *k = (tk *)t;
    return k->producer != NULL &&
           (!k->peers || !target || mg_peers_region_consumes(k->peers, target->region, "kafka"));
}

/* The topic of region's records: -ENAMETOOLONG when it does not fit. */
static int topic_of(const tk *k, const char *region, char *buf, size_t len)
{
    return (size_t)snprintf(buf, len, "%s%s", k->prefix, region) >= len ? -ENAMETOOLONG : 0;
}

static void tk_trace_attrs(mg_transport *t, const mg_route_target *target, mg_span *span)
{
    char topic[256];
    if (target && target->region && topic_of((tk *)t, target->region, topic, sizeof(topic)) == 0)
        mg_span_attr(span, "messaging.destination.name", topic);
}

static int tk_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                      int64_t deadline_ms, mg_deliver_done done, void *arg)
{
    tk *k = (tk *)t;
    if (!k->producer)
        return -ENOTCONN;
    mg_deliver_outcome out;
    memset(&out, 0, sizeof(out));
    char topic[256];
    if (!target || !target->region || !target->region[0]) {
        set_reason(&out, MG_STATUS_FAILED, "kafka: %s", "recipient's region unknown");
        goto now;
    }
    if (topic_of(k, target->region, topic, sizeof(topic)) != 0) {
        set_reason(&out, MG_STATUS_FAILED, "kafka: %s", "topic name too long");
        goto now;
    }
    if (msg->priority != MG_PRIO_LOW && deadline_ms <= mg_mono_ms()) {
        set_reason(&out, MG_STATUS_FAILED, "kafka: %s", "deadline exceeded before produce");
        goto now;
    }
    ensure_topic(k, topic);

    size_t len = 0;
    uint8_t *val = mg_msg_pack(msg, &len);
    report *w = NULL;
    if (msg->priority != MG_PRIO_LOW) { /* HIGH: answered by the acks=all report */
        w = mg_new(report);
        w->done = done;
        w->arg = arg;
        w->start_us = mg_mono_us();
    }
    rd_kafka_resp_err_t err = produce(k, topic, msg, val, len, w);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        if (w)
            return 0; /* the report runs done */
        out.status = MG_STATUS_ACCEPTED;
        goto now;
    }
    free(val);
    free(w);
    if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
        mg_metric_add(k->dropped, 1);
        set_reason(&out, MG_STATUS_FAILED, "%s", "dropped: overload");
    } else {
        fail_err(k, &out, err);
    }
now:
    done(arg, &out);
    return 0;
}

/* ---- consumer ------------------------------------------------------------ */

static void set_lag(const char *topic, int32_t partition, int64_t lag)
{
    char labels[48];
    snprintf(labels, sizeof(labels), "partition=\"%d\"", (int)partition);
    mg_metric_set(mg_gauge("meshgate_kafka_consumer_lag",
                           "Records of this region's topic not yet handled, per partition", labels),
                  lag);
}

static void update_assigned(tk *k, rd_kafka_t *rk)
{
    rd_kafka_topic_partition_list_t *a = NULL;
    if (rd_kafka_assignment(rk, &a) == RD_KAFKA_RESP_ERR_NO_ERROR && a) {
        atomic_store(&k->assigned, a->cnt);
        rd_kafka_topic_partition_list_destroy(a);
    }
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    tk *k = opaque;
    bool coop = !strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE");
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        if (coop) {
            rd_kafka_error_t *e = rd_kafka_incremental_assign(rk, parts);
            if (e)
                rd_kafka_error_destroy(e);
        } else {
            rd_kafka_assign(rk, parts);
        }
        /* The series exists from the assignment on: 0 until the consumer's position is known
         * (update_lag, every LAG_INTERVAL_MS, needs a fetched position). */
        for (int i = 0; i < parts->cnt; i++)
            set_lag(parts->elems[i].topic, parts->elems[i].partition, 0);
        mg_log_info("kafka", "partitions assigned topic=%s count=%d group=meshgate-%s",
                    k->own_topic, parts->cnt, k->region);
    } else {
        if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS && !rd_kafka_assignment_lost(rk)) {
            rd_kafka_resp_err_t cerr = rd_kafka_commit(rk, NULL, 0); /* stored offsets */
            if (cerr && cerr != RD_KAFKA_RESP_ERR__NO_OFFSET)
                mg_log_warn("kafka", "commit on revoke failed err=%s", rd_kafka_err2str(cerr));
        } else if (err != RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
            mg_log_error("kafka", "rebalance error err=%s", rd_kafka_err2str(err));
        }
        for (int i = 0; i < parts->cnt; i++)
            set_lag(parts->elems[i].topic, parts->elems[i].partition, 0);
        if (coop) {
            rd_kafka_error_t *e = rd_kafka_incremental_unassign(rk, parts);
            if (e)
                rd_kafka_error_destroy(e);
        } else {
            rd_kafka_assign(rk, NULL);
        }
        mg_log_info("kafka", "partitions revoked topic=%s count=%d", k->own_topic, parts->cnt);
    }
    update_assigned(k, rk);
}

static void commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    tk *k = opaque;
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET && error_log_due(k))
        mg_log_warn("kafka", "offset commit failed err=%s (records will be redelivered)",
                    rd_kafka_err2str(err));
}

static void update_lag(tk *k)
{
    rd_kafka_topic_partition_list_t *a = NULL;
    if (rd_kafka_assignment(k->consumer, &a) != RD_KAFKA_RESP_ERR_NO_ERROR || !a)
        return;
    rd_kafka_position(k->consumer, a);
    for (int i = 0; i < a->cnt; i++) {
        int64_t lo = -1, hi = -1, pos = a->elems[i].offset;
        if (rd_kafka_get_watermark_offsets(k->consumer, a->elems[i].topic, a->elems[i].partition,
                                           &lo, &hi) != RD_KAFKA_RESP_ERR_NO_ERROR ||
            hi < 0 || pos < 0)
            continue;
        set_lag(a->elems[i].topic, a->elems[i].partition, hi > pos ? hi - pos : 0);
    }
    rd_kafka_topic_partition_list_destroy(a);
}

static void store_offset(tk *k, const rd_kafka_message_t *m)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, rd_kafka_topic_name(m->rkt), m->partition)->offset =
        m->offset + 1;
    rd_kafka_resp_err_t err = rd_kafka_offsets_store(k->consumer, l);
    if (err)
        mg_log_warn("kafka", "offset store failed partition=%d offset=%lld err=%s",
                    (int)m->partition, (long long)m->offset, rd_kafka_err2str(err));
    rd_kafka_topic_partition_list_destroy(l);
}

/* ---- the consumer's records in flight --------------------------------------- */

enum {
    REC_WAITING, /* behind an earlier record of the same recipient */
    REC_READY,   /* free to start, on k->ready while CONSUME_INFLIGHT_MAX are in flight */
    REC_RUNNING, /* its operation in flight */
    REC_RETRY,   /* failed; on k->retrying until its due time */
    REC_DONE,    /* handled: its offset may be stored once every record before it is done */
};

/* A fetched record, from its fetch until every record before it in its
 * partition is done too. The consumer thread owns every field but `res`,
 * which the operation's callback fills before handing the record back. */
typedef struct record {
    struct record *next;  /* k->answered, k->retrying or k->ready */
    struct record *wnext; /* the partition's window, in offset order */
    struct record *after; /* the same recipient's next record, waiting for this one */
    tk *k;
    rd_kafka_message_t *m; /* kept until its offset is stored */
    mg_msg *msg;           /* NULL: undecodable, only its offset to store in order */
    int state;
    int64_t start_ms, retry_at_ms;
    int attempt, delay_ms;
    mg_send_result res;
    mg_span *span; /* the attempt's "process" span, when traced */
    mg_msg hand;   /* msg as handed to the router (the span's context) */
} record;

/* Per partition: the window of records fetched and not yet stored past,
 * in offset order (head: the lowest one not stored). */
typedef struct part {
    record *head, *tail;
    size_t count;
    bool paused;
    bool moved; /* a record of it is done since the window last advanced */
} part;

static part *part_of(tk *k, int32_t p)
{
    if (p < 0)
        return NULL;
    if ((size_t)p >= k->nparts) {
        size_t n = (size_t)p + 1;
        k->parts = mg_xrealloc(k->parts, n * sizeof(*k->parts));
        memset(k->parts + k->nparts, 0, (n - k->nparts) * sizeof(*k->parts));
        k->nparts = n;
    }
    return &k->parts[p];
}

static void set_paused(tk *k, const rd_kafka_message_t *m, bool pause)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, rd_kafka_topic_name(m->rkt), m->partition);
    rd_kafka_resp_err_t err = pause ? rd_kafka_pause_partitions(k->consumer, l)
                                    : rd_kafka_resume_partitions(k->consumer, l);
    if (err)
        mg_log_debug("kafka", "%s partition=%d err=%s", pause ? "pause" : "resume",
                     (int)m->partition, rd_kafka_err2str(err));
    rd_kafka_topic_partition_list_destroy(l);
}

/* Any thread: the record's operation answered; the consumer thread takes
 * it from here (record_settle). Only the first answer of a batch wakes the
 * poll: the consumer thread takes the whole list when it wakes. */
static void record_done(void *arg, const mg_send_result *res)
{
    record *r = arg;
    tk *k = r->k;
    r->res = *res;
    mg_msg_trace_end(r->span, res->status, res->path, res->connections, res->reason);
    r->span = NULL;
    pthread_mutex_lock(&k->rec_mu);
    bool wake = k->answered == NULL;
    r->next = k->answered;
    k->answered = r;
    pthread_mutex_unlock(&k->rec_mu);
    if (wake)
        rd_kafka_queue_yield(k->consumer_q);
}

/* Starts the record's operation: running from now on; the router gets it
 * with the turn's other starts (records_launch). */
static void record_start(tk *k, record *r)
{
    r->state = REC_RUNNING;
    r->attempt++;
    r->next = NULL;
    atomic_fetch_add(&k->in_flight, 1);
    /* the operation continues the record's process span */
    r->span = mg_msg_trace_process(r->msg, &r->hand, "kafka", rd_kafka_topic_name(r->m->rkt),
                                   k->gateway_id);
    if (k->launch_tail)
        k->launch_tail->next = r;
    else
        k->launch_head = r;
    k->launch_tail = r;
}

#define LAUNCH_MAX 256 /* operations handed to the router in one call */

/* Consumer thread, once a turn: hands the records started this turn to the
 * router together, so their recipients are resolved in one pipelined
 * presence lookup instead of one hand-off each. Taken off the list first:
 * an answer may come (and reuse r->next) before the call returns. */
static void records_launch(tk *k)
{
    while (k->launch_head) {
        record *recs[LAUNCH_MAX];
        mg_msg *hands[LAUNCH_MAX];
        size_t n = 0;
        for (; k->launch_head && n < LAUNCH_MAX; n++) {
            recs[n] = k->launch_head;
            hands[n] = &recs[n]->hand;
            k->launch_head = recs[n]->next;
        }
        if (!k->launch_head)
            k->launch_tail = NULL;
        mg_router_deliver_from_queue_many(k->router, hands, n, mg_mono_ms() + k->timeout_ms,
                                          record_done, (void *const *)recs);
    }
}

static void record_free(record *r)
{
    mg_msg_free(r->msg);
    rd_kafka_message_destroy(r->m);
    free(r);
}

/* Starts r, or queues it behind the records already waiting for room while
 * CONSUME_INFLIGHT_MAX operations are in flight (a recipient has at most
 * one record here or running, so its order holds). */
static void record_go(tk *k, record *r)
{
    if (!k->ready_head && atomic_load(&k->in_flight) < CONSUME_INFLIGHT_MAX) {
        record_start(k, r);
        return;
    }
    r->state = REC_READY;
    r->next = NULL;
    if (k->ready_tail)
        k->ready_tail->next = r;
    else
        k->ready_head = r;
    k->ready_tail = r;
}

/* A new decodable record: it starts now unless an earlier record of the
 * same recipient is not done yet, in which case it waits behind the last
 * of them (a recipient's records are handled one at a time, in offset
 * order; different recipients' records run at once). */
static void record_chain(tk *k, record *r)
{
    record *last = mg_map_put(k->chains, r->msg->to, r);
    if (last) {
        last->after = r;
        r->state = REC_WAITING;
        return;
    }
    record_go(k, r);
}

/* The record is handled: the recipient's next record starts (not while
 * stopping: it stays uncommitted and the partition's next owner redelivers
 * it), and its partition's window may advance. */
static void record_finish(tk *k, record *r)
{
    r->state = REC_DONE;
    part_of(k, r->m->partition)->moved = true;
    if (!r->msg)
        return;
    record *n = r->after;
    r->after = NULL;
    if (!n) {
        mg_map_del(k->chains, r->msg->to); /* r was the recipient's last */
        return;
    }
    if (atomic_load(&k->consume_run))
        record_go(k, n);
}

/* Appends r to its partition's window; a partition with PART_WINDOW_MAX
 * records in its window is paused (fetching stops; it resumes from the
 * record after the last one fetched, so nothing is skipped or fetched
 * twice) until the window is down to half. */
static void part_add(tk *k, part *pt, record *r)
{
    if (pt->tail)
        pt->tail->wnext = r;
    else
        pt->head = r;
    pt->tail = r;
    k->nheld++;
    if (++pt->count >= PART_WINDOW_MAX && !pt->paused) {
        pt->paused = true;
        set_paused(k, r->m, true);
    }
}

/* Drops the done records at the head of the window and stores the offset
 * after the last of them: the stored (and so committed) offset never
 * passes a record that is not done. Returns true when an offset was
 * stored. */
static bool part_advance(tk *k, part *pt)
{
    pt->moved = false;
    record *last = NULL;
    while (pt->head && pt->head->state == REC_DONE) {
        record *r = pt->head;
        pt->head = r->wnext;
        pt->count--;
        k->nheld--;
        if (last)
            record_free(last);
        last = r;
    }
    if (!last)
        return false;
    if (!pt->head)
        pt->tail = NULL;
    store_offset(k, last->m);
    if (pt->paused && pt->count <= PART_WINDOW_MAX / 2) {
        pt->paused = false;
        set_paused(k, last->m, false);
    }
    record_free(last);
    return true;
}

/* Consumer thread: an answered record. */
static void record_settle(tk *k, record *r)
{
    atomic_fetch_sub(&k->in_flight, 1);
    const rd_kafka_message_t *m = r->m;
    bool handled = r->res.status != MG_STATUS_FAILED;
    if (!handled) {
        mg_metric_add(k->retries, 1);
        if (r->attempt == 1 || r->attempt % 20 == 0)
            mg_log_warn("kafka",
                        "delivery from queue failed, retrying msg_id=%s user=%s "
                        "partition=%d offset=%lld attempt=%d reason=%s",
                        r->msg->id, r->msg->to, (int)m->partition, (long long)m->offset, r->attempt,
                        r->res.reason);
        if (mg_mono_ms() - r->start_ms >= k->retry_budget_ms) {
            mg_inbox *ib = mg_router_inbox(k->router);
            if (ib->ops->store(ib, r->msg) == 0) { /* a store job's worth, on a failure path */
                mg_metric_add(k->parked, 1);
                mg_log_warn("kafka",
                            "record parked in the inbox after %lld ms of retries "
                            "msg_id=%s user=%s partition=%d offset=%lld",
                            (long long)(mg_mono_ms() - r->start_ms), r->msg->id, r->msg->to,
                            (int)m->partition, (long long)m->offset);
                handled = true;
            }
        }
    }
    if (!handled) { /* try again after a backoff; the recipient's next records wait */
        r->state = REC_RETRY;
        r->retry_at_ms = mg_mono_ms() + r->delay_ms;
        r->delay_ms = r->delay_ms * 2 > RETRY_DELAY_MAX_MS ? RETRY_DELAY_MAX_MS : r->delay_ms * 2;
        r->next = k->retrying;
        k->retrying = r;
        return;
    }
    mg_metric_add(k->consumed, 1);
    record_finish(k, r);
}

/* Consumer thread: answered records, retries that are due, then the
 * windows that moved. Returns true when an offset was stored. */
static bool records_progress(tk *k)
{
    pthread_mutex_lock(&k->rec_mu);
    record *r = k->answered;
    k->answered = NULL;
    pthread_mutex_unlock(&k->rec_mu);
    while (r) {
        record *n = r->next;
        record_settle(k, r);
        r = n;
    }
    int64_t now = mg_mono_ms();
    record **pp = &k->retrying;
    while (*pp) {
        record *q = *pp;
        if (q->retry_at_ms <= now && atomic_load(&k->consume_run)) {
            *pp = q->next;
            record_go(k, q);
        } else {
            pp = &q->next;
        }
    }
    while (k->ready_head && atomic_load(&k->in_flight) < CONSUME_INFLIGHT_MAX &&
           atomic_load(&k->consume_run)) {
        record *q = k->ready_head;
        k->ready_head = q->next;
        if (!k->ready_head)
            k->ready_tail = NULL;
        record_start(k, q);
    }
    records_launch(k);
    bool stored = false;
    for (size_t i = 0; i < k->nparts; i++)
        if (k->parts[i].moved)
            stored |= part_advance(k, &k->parts[i]);
    return stored;
}

/* Takes m: decodes it and starts it, or queues it behind its recipient. */
static void consume_one(tk *k, rd_kafka_message_t *m)
{
    if (m->err) {
        if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF && error_log_due(k))
            mg_log_warn("kafka", "consumer error topic=%s err=%s",
                        m->rkt ? rd_kafka_topic_name(m->rkt) : k->own_topic,
                        rd_kafka_message_errstr(m));
        rd_kafka_message_destroy(m);
        return;
    }
    part *pt = part_of(k, m->partition);
    record *r = mg_new(record);
    r->k = k;
    r->m = m;
    part_add(k, pt, r);
    if (mg_msg_unpack(m->payload, m->len, &r->msg) != 0) {
        r->msg = NULL;
        mg_metric_add(k->bad_records, 1);
        int64_t n = mg_metric_value(k->bad_records);
        if (n % BAD_RECORD_LOG_EVERY == 1)
            mg_log_warn("kafka",
                        "skipping a record that does not decode topic=%s partition=%d "
                        "offset=%lld bytes=%zu (logged once per %d, total=%lld)",
                        rd_kafka_topic_name(m->rkt), (int)m->partition, (long long)m->offset,
                        m->len, BAD_RECORD_LOG_EVERY, (long long)n);
        record_finish(k, r); /* its offset is stored in its turn */
        return;
    }
    rd_kafka_headers_t *hdrs;
    const void *tp;
    size_t tpl;
    if (rd_kafka_message_headers(m, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR &&
        rd_kafka_header_get_last(hdrs, "traceparent", &tp, &tpl) == RD_KAFKA_RESP_ERR_NO_ERROR)
        mg_traceparent_parse(tp, tpl, &r->msg->trace); /* the header, else the envelope's */
    r->start_ms = mg_mono_ms();
    r->delay_ms = RETRY_DELAY_MIN_MS;
    record_chain(k, r);
}

/* Waits (bounded) for the operations in flight, then frees every record:
 * what was not handled stays uncommitted and is redelivered to the
 * partition's next owner. */
static void records_drain(tk *k)
{
    int64_t end = mg_mono_ms() + k->timeout_ms + 5000;
    while (atomic_load(&k->in_flight) > 0 && mg_mono_ms() < end) {
        records_progress(k);
        usleep(2000);
    }
    records_progress(k);
    if (atomic_load(&k->in_flight) > 0) /* their callbacks would find freed records: kept */
        mg_log_error("kafka", "operations still in flight at consumer stop count=%d",
                     atomic_load(&k->in_flight));
    k->retrying = NULL; /* those records are in their windows, as the ready ones */
    k->ready_head = k->ready_tail = NULL;
    for (size_t i = 0; i < k->nparts; i++) {
        for (record *r = k->parts[i].head, *n; r; r = n) {
            n = r->wnext;
            if (r->state != REC_RUNNING)
                record_free(r);
        }
    }
    free(k->parts);
    k->parts = NULL;
    k->nparts = 0;
    k->nheld = 0;
    mg_metric_set(k->held, 0);
    mg_map_free(k->chains);
    k->chains = NULL;
}

/* Records taken from the consumer per turn before the answers are settled. */
#define POLL_BATCH 256

static void *consume_main(void *arg)
{
    tk *k = arg;
    int64_t last_commit = 0, next_lag = 0;
    bool dirty = false;
    while (atomic_load(&k->consume_run)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(k->consumer, 100);
        bool got = m != NULL;
        for (int n = 0; m; m = ++n < POLL_BATCH ? rd_kafka_consumer_poll(k->consumer, 0) : NULL)
            consume_one(k, m);
        dirty |= records_progress(k);
        mg_metric_set(k->held, (int64_t)k->nheld);
        int64_t now = mg_mono_ms();
        /* At most every COMMIT_INTERVAL_MS under load (answers wake the poll
         * all the time); at once when everything fetched is handled. */
        if (dirty && (now - last_commit >= COMMIT_INTERVAL_MS ||
                      (!got && atomic_load(&k->in_flight) == 0))) {
            rd_kafka_resp_err_t err = rd_kafka_commit(k->consumer, NULL, 1);
            if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET && error_log_due(k))
                mg_log_warn("kafka", "offset commit failed err=%s", rd_kafka_err2str(err));
            dirty = false;
            last_commit = now;
        }
        if (now >= next_lag) {
            update_lag(k);
            next_lag = now + LAG_INTERVAL_MS;
        }
    }
    records_drain(k);
    return NULL;
}

/* ---- lifecycle ----------------------------------------------------------- */

static rd_kafka_conf_t *base_conf(tk *k, const char *client_id, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_opaque(conf, k);
    rd_kafka_conf_set_log_cb(conf, log_cb);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    if (conf_set(conf, "bootstrap.servers", k->brokers, err, errlen) &&
        conf_set(conf, "client.id", client_id, err, errlen) &&
        conf_set(conf, "socket.nagle.disable", "true", err, errlen) &&
        conf_set(conf, "reconnect.backoff.ms", "100", err, errlen) &&
        conf_set(conf, "reconnect.backoff.max.ms", "1000", err, errlen))
        return conf;
    rd_kafka_conf_destroy(conf);
    return NULL;
}

static void tk_free(mg_transport *t);

static const struct mg_transport_ops kafka_ops = {
    .name = "kafka",
    .path = MG_PATH_KAFKA,
    .orders_on_return = true,
    .available = tk_available,
    .deliver = tk_deliver,
    .disconnect = NULL,
    .free = tk_free,
    .trace_attrs = tk_trace_attrs,
};

mg_transport *mg_transport_kafka_create(const mg_transport_kafka_config *cfg, char *err,
                                        size_t errlen)
{
    tk *k = mg_new(tk);
    k->brokers = mg_xstrdup(cfg->brokers ? cfg->brokers : "");
    k->prefix = mg_xstrdup(cfg->topic_prefix ? cfg->topic_prefix : "meshgate.deliver.");
    k->region = mg_xstrdup(cfg->region && cfg->region[0] ? cfg->region : "local");
    k->gateway_id =
        mg_xstrdup(cfg->gateway_id && cfg->gateway_id[0] ? cfg->gateway_id : "meshgate");
    k->own_topic = mg_xasprintf("%s%s", k->prefix, k->region);
    k->partitions = cfg->partitions > 0 ? cfg->partitions : 6;
    k->linger_ms = cfg->linger_ms >= 0 ? cfg->linger_ms : 1;
    k->batch_bytes = cfg->batch_bytes;
    k->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 5000;
    k->queue_max = cfg->queue_max_messages;
    k->retry_budget_ms = cfg->retry_budget_ms > 0 ? cfg->retry_budget_ms : 30000;
    k->peers = cfg->peers;
    k->topics = mg_map_create(16);
    pthread_mutex_init(&k->topics_mu, NULL);
    pthread_mutex_init(&k->rec_mu, NULL);
    atomic_init(&k->in_flight, 0);
    atomic_init(&k->assigned, -1);
    k->dropped = mg_counter("meshgate_dropped_total", "Messages dropped, by reason",
                            "reason=\"kafka_queue_full\"");
    k->bad_records = mg_counter("meshgate_kafka_bad_records_total",
                                "Consumed Kafka records that did not decode (skipped)", NULL);
    k->consumed = mg_counter("meshgate_kafka_consumed_total",
                             "Kafka records handled by this gateway's consumer", NULL);
    k->retries = mg_counter("meshgate_kafka_consumer_retries_total",
                            "Transient failures retried by the Kafka consumer", NULL);
    k->parked = mg_counter("meshgate_kafka_parked_total",
                           "Consumed records put in the inbox after the retry budget", NULL);
    k->produce_errors = mg_counter("meshgate_kafka_produce_errors_total",
                                   "Produced messages the broker did not acknowledge", NULL);
    k->held = mg_gauge("meshgate_kafka_consumer_records",
                       "Records fetched by this gateway's consumer and not yet committed past "
                       "(in flight, or waiting for their recipient's earlier record or for room)",
                       NULL);
    k->ack_latency = mg_histogram("meshgate_kafka_ack_seconds",
                                  "Time a HIGH send waited for the broker's acks=all", NULL);
    k->base.ops = &kafka_ops;

    if (!k->brokers[0]) {
        mg_log_info("kafka", "no brokers configured: the Kafka path is off");
        return &k->base;
    }
    if (k->linger_ms >= k->timeout_ms) {
        snprintf(err, errlen, "kafka: linger (%d ms) must be below the timeout (%d ms)",
                 k->linger_ms, k->timeout_ms);
        goto fail;
    }
    rd_kafka_conf_t *conf = base_conf(k, k->gateway_id, err, errlen);
    if (!conf)
        goto fail;
    rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
    if (!conf_set(conf, "enable.idempotence", "true", err, errlen) ||
        !conf_set(conf, "acks", "all", err, errlen) ||
        !conf_set_int(conf, "linger.ms", k->linger_ms, err, errlen) ||
        !conf_set_int(conf, "message.timeout.ms", k->timeout_ms, err, errlen) ||
        (k->batch_bytes > 0 && !conf_set_int(conf, "batch.size", k->batch_bytes, err, errlen)) ||
        (k->queue_max > 0 &&
         !conf_set_int(conf, "queue.buffering.max.messages", k->queue_max, err, errlen))) {
        rd_kafka_conf_destroy(conf);
        goto fail;
    }
    char e[512];
    k->producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, e, sizeof(e));
    if (!k->producer) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "kafka: producer: %s", e);
        goto fail;
    }
    k->admin_q = rd_kafka_queue_new(k->producer);
    atomic_store(&k->own_topic_state, TOPIC_PENDING);
    create_topic_async(k, k->own_topic);
    atomic_store(&k->poll_run, true);
    if (pthread_create(&k->poll_thread, NULL, poll_main, k) != 0) {
        snprintf(err, errlen, "kafka: cannot start the poll thread");
        goto fail;
    }
    pthread_setname_np(k->poll_thread, "kafka-poll");
    k->poll_started = true;
    mg_log_info("kafka", "producer ready brokers=%s topic=%s linger_ms=%d timeout_ms=%d",
                k->brokers, k->own_topic, k->linger_ms, k->timeout_ms);
    return &k->base;
fail:
    tk_free(&k->base);
    return NULL;
}

int mg_transport_kafka_start_consumer(mg_transport *t, mg_router *router)
{
    tk *k = (tk *)t;
    if (!k || !router)
        return -EINVAL;
    if (!k->producer)
        return 0;
    if (k->consume_started)
        return -EALREADY;
    /* Give the topic a moment to exist, so the subscription finds it. */
    for (int64_t end = mg_mono_ms() + (k->timeout_ms < 5000 ? k->timeout_ms : 5000);
         atomic_load(&k->own_topic_state) != TOPIC_READY && mg_mono_ms() < end;)
        usleep(20000);

    char err[256], client_id[160], group[160];
    snprintf(client_id, sizeof(client_id), "%s-consumer", k->gateway_id);
    snprintf(group, sizeof(group), "meshgate-%s", k->region);
    rd_kafka_conf_t *conf = base_conf(k, client_id, err, sizeof(err));
    if (!conf)
        return -EINVAL;
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_offset_commit_cb(conf, commit_cb);
    if (!conf_set(conf, "group.id", group, err, sizeof(err)) ||
        !conf_set(conf, "enable.auto.commit", "false", err, sizeof(err)) ||
        !conf_set(conf, "enable.auto.offset.store", "false", err, sizeof(err)) ||
        !conf_set(conf, "auto.offset.reset", "earliest", err, sizeof(err)) ||
        !conf_set(conf, "session.timeout.ms", "10000", err, sizeof(err)) ||
        !conf_set(conf, "fetch.wait.max.ms", "100", err, sizeof(err)) ||
        !conf_set(conf, "topic.metadata.refresh.interval.ms", "10000", err, sizeof(err))) {
        mg_log_error("kafka", "consumer config: %s", err);
        rd_kafka_conf_destroy(conf);
        return -EINVAL;
    }
    char e[512];
    rd_kafka_t *c = rd_kafka_new(RD_KAFKA_CONSUMER, conf, e, sizeof(e));
    if (!c) {
        mg_log_error("kafka", "consumer: %s", e);
        rd_kafka_conf_destroy(conf);
        return -EINVAL;
    }
    rd_kafka_poll_set_consumer(c);
    k->consumer_q = rd_kafka_queue_get_consumer(c);
    rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(sub, k->own_topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t serr = rd_kafka_subscribe(c, sub);
    rd_kafka_topic_partition_list_destroy(sub);
    if (serr) {
        mg_log_error("kafka", "subscribe topic=%s err=%s", k->own_topic, rd_kafka_err2str(serr));
        rd_kafka_destroy(c);
        return -EINVAL;
    }
    k->consumer = c;
    k->router = router;
    k->chains = mg_map_create(256);
    atomic_store(&k->assigned, 0);
    atomic_store(&k->consume_run, true);
    if (pthread_create(&k->consume_thread, NULL, consume_main, k) != 0) {
        rd_kafka_consumer_close(c);
        rd_kafka_destroy(c);
        k->consumer = NULL;
        atomic_store(&k->assigned, -1);
        return -EAGAIN;
    }
    pthread_setname_np(k->consume_thread, "kafka-consume");
    k->consume_started = true;
    mg_log_info("kafka", "consumer started topic=%s group=%s", k->own_topic, group);
    return 0;
}

void mg_transport_kafka_stop(mg_transport *t, int flush_ms)
{
    tk *k = (tk *)t;
    if (!k)
        return;
    if (k->consume_started) {
        atomic_store(&k->consume_run, false);
        pthread_join(k->consume_thread, NULL);
        k->consume_started = false;
        rd_kafka_resp_err_t err = rd_kafka_commit(k->consumer, NULL, 0);
        if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
            mg_log_warn("kafka", "final commit failed err=%s", rd_kafka_err2str(err));
        rd_kafka_queue_destroy(k->consumer_q);
        k->consumer_q = NULL;
        rd_kafka_consumer_close(k->consumer); /* revokes: commits again, leaves the group */
        rd_kafka_destroy(k->consumer);
        k->consumer = NULL;
        atomic_store(&k->assigned, -1);
        mg_log_info("kafka", "consumer stopped topic=%s", k->own_topic);
    }
    if (k->producer && flush_ms >= 0) {
        if (rd_kafka_flush(k->producer, flush_ms) != RD_KAFKA_RESP_ERR_NO_ERROR)
            mg_log_warn("kafka", "flush incomplete after %d ms: %d messages not acknowledged",
                        flush_ms, rd_kafka_outq_len(k->producer));
    }
}

int mg_transport_kafka_assigned(mg_transport *t)
{
    return t ? atomic_load(&((tk *)t)->assigned) : -1;
}

static void tk_free(mg_transport *t)
{
    tk *k = (tk *)t;
    if (!k)
        return;
    mg_transport_kafka_stop(t, k->producer ? 1000 : -1);
    if (k->poll_started) {
        atomic_store(&k->poll_run, false);
        pthread_join(k->poll_thread, NULL);
    }
    if (k->producer) {
        /* Whatever is left fails now (its waiters get __PURGE_* reports). */
        rd_kafka_purge(k->producer, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        for (int i = 0; i < 100 && rd_kafka_outq_len(k->producer) > 0; i++)
            rd_kafka_poll(k->producer, 10);
        drain_admin(k);
        rd_kafka_queue_destroy(k->admin_q);
        rd_kafka_destroy(k->producer);
    }
    mg_map_free(k->topics);
    pthread_mutex_destroy(&k->topics_mu);
    pthread_mutex_destroy(&k->rec_mu);
    free(k->brokers);
    free(k->prefix);
    free(k->region);
    free(k->gateway_id);
    free(k->own_topic);
    free(k);
}
