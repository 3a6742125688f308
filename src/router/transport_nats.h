/* transport_nats.h: the NATS JetStream path (publisher to region streams and
 * the region's shared durable pull consumer).
 *
 * Stream. Region R's messages go to subject <prefix>R (default
 * "meshgate.deliver.R"), stored by the stream MESHGATE_<R> (work-queue
 * retention: a message leaves the stream once one gateway acknowledged it;
 * replicas and max age configurable; a 2 min duplicate window). Each gateway
 * creates (or updates) its own region's stream when the transport is
 * created; another region's stream is that region's gateways' to create.
 *
 * Publisher: the mg_msg_pack envelope, with Nats-Msg-Id = "<id>/<recipient>",
 * so the stream drops a producer retry of the same (message, recipient).
 * Asynchronous JetStream publish (no thread waits for the PubAck; the
 * PubAck comes back on the transport's own reply subject):
 *   HIGH: QUEUED when the stream's PubAck arrives, FAILED "nats: <error>" on
 *         an error or no PubAck within min(deadline, timeout_ms) (the
 *         transport's own deadline, not nats.c's), so the plan's next step
 *         runs.
 *   LOW:  ACCEPTED once handed to the connection; a failed PubAck is only
 *         counted.
 * Metrics: the bus families of bus_metrics.h with bus="nats".
 * Publishes awaiting their PubAck are bounded by max_pending: beyond it a
 * send fails at once ("dropped: overload", meshgate_dropped_total
 * {reason="nats_pending_full"}). While the connection is down the transport
 * is not available (the plan moves on at once).
 *
 * Consumer: durable pull consumer "meshgate-<R>" on the region's stream,
 * shared by the region's gateways (each message is handled by one of them).
 * A fetched message whose recipient has an earlier one still in its
 * operation on this gateway waits behind it (one at a time per recipient,
 * in fetch order; stop leaves the waiting ones unacknowledged); the others
 * start together (mg_router_deliver_from_queue_many: one presence lookup
 * for them); each message is acknowledged from its operation's completion (at-least-once: a gateway
 * that dies before acknowledging leaves its messages to be redelivered to another gateway after
 * ack_wait_ms; the local transport's dedupe window drops what was already shown). A failed
 * operation is NAKed with a backoff, up to max_deliver deliveries; the last one puts the message in
 * the recipient's inbox (if that fails too it is counted in meshgate_bus_undeliverable_total and
 * left unacknowledged in the stream until max age). Undecodable or oversized payloads are counted,
 * terminated (never redelivered) and skipped.
 *
 * Threads: deliver()/available() from any thread; PubAck handlers run on
 * nats.c's delivery thread of the transport's reply subscription, missed
 * deadlines on "nats-timeout" (both start the next step); "nats-consume"
 * fetches (a blocking fetch waits for the server, never for an operation)
 * and starts operations; their completions acknowledge on whatever thread
 * they run and hand a recipient's next message to "nats-chain", which
 * starts it. create/start/stop/free from one control thread.
 */
#ifndef MG_TRANSPORT_NATS_H
#define MG_TRANSPORT_NATS_H

#include "router/router.h"
#include "discovery/peers.h"
#include "router/transport.h"

#include <stddef.h>

typedef struct mg_transport_nats_config {
    const char *urls;           /* "nats://host:port,..."; NULL or "": inert (not available) */
    const char *subject_prefix; /* "meshgate.deliver." when NULL */
    const char *region;         /* this gateway's region (its stream and consumer) */
    const char *gateway_id;     /* the connection name */
    int replicas;               /* of the stream this gateway creates; <= 0: 1 */
    int max_age_seconds;        /* stream max age; <= 0: 86400 */
    int timeout_ms;             /* HIGH PubAck wait bound; <= 0: 5000 */
    int ack_wait_ms;            /* consumer: redelivery after this without an ack; <= 0: 30000 */
    int max_deliver;            /* consumer: deliveries of one message, then inbox; <= 0: 5 */
    int max_pending;            /* publishes awaiting a PubAck; <= 0: 65536 */
    int max_inflight;           /* consumed messages being handled at once; <= 0: 1024 */
    size_t max_message_bytes;   /* consumed payloads above it are skipped; 0: 4 MiB */
    /* Discovery (may be NULL): a region's stream is used only while every known gateway of
     * that region consumes NATS (its Consul "buses"; a region with none known: yes). */
    mg_peers *peers;
} mg_transport_nats_config;

/* Connects to the servers and creates or updates this region's stream.
 * Strings of cfg are copied. Returns NULL with err filled ("nats: cannot
 * connect to <urls>: ..." for unreachable servers, or the stream's error).
 * Free with mg_transport_free() (or hand it to the router). */
mg_transport *mg_transport_nats_create(const mg_transport_nats_config *cfg, char *err,
                                       size_t errlen);

/* Creates (or updates) the region's durable consumer and starts
 * "nats-consume" delivering through router, which must outlive the consumer.
 * Returns 0 (also for an inert transport), -EALREADY, or a negative errno
 * with err filled. */
int mg_transport_nats_start_consumer(mg_transport *t, mg_router *router, char *err, size_t errlen);

/* Stops fetching, waits (bounded by ack_wait_ms) for the operations in
 * flight to answer and be acknowledged, and waits up to flush_ms for
 * publishes awaiting PubAcks. Messages fetched and not handled are
 * redelivered to the region's other gateways after ack_wait_ms. deliver()
 * keeps working after it. Idempotent. */
void mg_transport_nats_stop(mg_transport *t, int flush_ms);

#endif
