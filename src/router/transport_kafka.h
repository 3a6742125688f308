/* transport_kafka.h: the Kafka path (producer + consumer of region topics).
 *
 * Producer: a message for a gateway in region R is produced to the topic
 * <prefix>R, key = recipient user id (one recipient's messages stay ordered
 * within a partition), value = the mg_msg_pack envelope, header "origin" =
 * this gateway's id. Idempotent, acks=all.
 *   HIGH: deliver() waits for the delivery report, at most
 *         min(deadline, timeout_ms): QUEUED once the broker acknowledged
 *         (acks=all), else FAILED "kafka: <error>".
 *   LOW:  deliver() hands the message to librdkafka's queue and answers
 *         ACCEPTED; a full local queue drops it (FAILED "dropped: overload",
 *         meshgate_dropped_total{reason="kafka_queue_full"}).
 * While the broker is down librdkafka keeps messages queued: HIGH sends fail
 * at their timeout (FAILED "kafka: ..."), LOW sends stay ACCEPTED and go out
 * once the broker is back (or expire after timeout_ms, counted).
 *
 * Consumer: group "meshgate-<region>" on <prefix><region>, so each message is
 * handled by ONE gateway of the region. Each record is passed to
 * mg_router_deliver_from_queue_many() with the others a consumer turn starts
 * (one record in flight per recipient, in
 * offset order: a recipient's later records wait behind it; other
 * recipients' records run meanwhile; no thread waits); a partition's
 * committed offset never passes a record not yet handled (at-least-once;
 * the router's dedupe window drops the duplicates a redelivery brings). Transient failures are
 * retried on the same record with backoff; after retry_budget_ms the message is put in the
 * recipient's offline inbox (never dropped) and its next records go on.
 * At most MG_KAFKA_CONSUME_INFLIGHT_MAX operations are in flight from the
 * consumer; records free to start beyond it wait, in order.
 *
 * Threads: "kafka-poll" serves producer delivery reports and admin results;
 * "kafka-consume" runs the consumer. deliver()/available() are thread-safe
 * (router workers); create/start/stop/free from one control thread.
 */
#ifndef MG_TRANSPORT_KAFKA_H
#define MG_TRANSPORT_KAFKA_H

#include "discovery/peers.h"
#include "router/router.h"
#include "router/transport.h"

#include <stddef.h>

#define MG_KAFKA_CONSUME_INFLIGHT_MAX 1024

typedef struct mg_transport_kafka_config {
    const char *brokers;      /* "host:port,..."; NULL or "": an inert transport (not available) */
    const char *topic_prefix; /* "meshgate.deliver." when NULL */
    const char *region;       /* this gateway's region (its topic and consumer group) */
    const char *gateway_id;   /* client.id and the "origin" header */
    int partitions;           /* of topics this gateway creates; <= 0: 6 */
    int linger_ms;            /* producer linger.ms; < 0: 1 */
    int batch_bytes;          /* producer batch.size; <= 0: librdkafka's default */
    int timeout_ms;           /* HIGH wait bound and message.timeout.ms; <= 0: 5000 */
    int queue_max_messages;   /* producer queue bound (queue.buffering.max.messages); 0: 100000 */
    int retry_budget_ms;      /* consumer: retry a record this long, then inbox; <= 0: 30000 */
    /* Discovery (may be NULL): a region's topic is used only while every known gateway of
     * that region consumes Kafka (its Consul "buses"; a region with none known: yes). */
    mg_peers *peers;
} mg_transport_kafka_config;

/* Creates the producer (and its "kafka-poll" thread) and asks the broker to
 * create this region's topic (asynchronously; an existing topic is fine).
 * Strings of cfg are copied. Does not wait for the broker: a broker that is
 * down at start is retried by librdkafka. Returns NULL with err filled on a
 * configuration error. Free with mg_transport_free() (or hand it to
 * mg_router_set_transport(r, MG_PATH_KAFKA, t), which owns it then). */
mg_transport *mg_transport_kafka_create(const mg_transport_kafka_config *cfg, char *err,
                                        size_t errlen);

/* Starts the consumer ("kafka-consume") delivering through router, which must
 * outlive the consumer (stop or free the transport before freeing the
 * router's other parts; the router frees the transport itself).
 * Returns 0 (also for an inert transport), -EALREADY, or -EINVAL. */
int mg_transport_kafka_start_consumer(mg_transport *t, mg_router *router);

/* Stops consuming (the record being handled finishes or stays uncommitted;
 * what was handled is committed synchronously, then the group is left) and
 * flushes the producer for up to flush_ms. deliver() keeps working after it
 * (HIGH still waits for acks). Idempotent. */
void mg_transport_kafka_stop(mg_transport *t, int flush_ms);

/* Partitions currently assigned to this consumer (-1: consumer not running).
 * For readiness checks and tests. */
int mg_transport_kafka_assigned(mg_transport *t);

#endif
