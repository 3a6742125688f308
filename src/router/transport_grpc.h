/* transport_grpc.h: the gRPC peer transport, GatewayPeer/DeliverMessage
 * straight to the gateway the recipient is connected to.
 *
 * Peers and their channels come from the peer table (discovery/peers.h).
 * Calls are asynchronous on one shared completion queue drained by
 * cq_threads threads named "peer-cq"; deliver() and deliver_batch() start a
 * call and return, and its completion runs the caller's callback on a
 * peer-cq thread (no thread per call). deliver_batch() carries a batch's
 * share for one peer in one DeliverBatch call (per-recipient results). Per peer: a bound on calls
 * in flight and a link-quality circuit breaker (link_quality.h); when either says no, available()
 * is false and the router goes by Kafka.
 *
 * deliver() outcomes:
 *   DELIVERED (connections, a duplicate counts)     -> MG_STATUS_DELIVERED
 *   NOT_CONNECTED                                   -> FAILED + not_connected
 *   gRPC error, deadline, undecodable response      -> FAILED, reason
 *       "peer <id>: <CODE_NAME>: <details>"
 *   peer unknown                                    -> FAILED "peer <id>: unknown peer"
 *   in-flight bound reached                         -> FAILED "peer <id>: busy"
 *   one call at a time (coalesce_calls 1), peer_max_inflight deliveries
 *   queued behind it                                -> deliver() returns -EBUSY
 * DeliverMessage is idempotent on the receiver (dedupe by message id), so
 * one retry after a fast UNAVAILABLE is safe and is made when time allows.
 *
 * Metrics: meshgate_peer_latency_seconds{peer} (histogram of answered
 * calls), meshgate_peer_degraded{peer} (0/1), meshgate_peer_calls_total
 * {peer,result} (result: delivered, not_connected, busy, or the lower-case
 * gRPC code name such as unavailable, deadline_exceeded, internal).
 *
 * Thread-safety: available/deliver/deliver_batch from any thread (they
 * never block); disconnect blocks up to its deadline (worker jobs only).
 * Lifetime: peers must outlive the transport; free it (mg_transport_free,
 * normally through mg_router_free) before mg_peers_free, after the callers
 * (router workers) have stopped. free() waits for calls in flight.
 */
#ifndef MG_TRANSPORT_GRPC_H
#define MG_TRANSPORT_GRPC_H

#include "discovery/peers.h"
#include "router/link_quality.h"
#include "router/transport.h"

#define MG_PEER_RPC_DELIVER       "/meshgate.v1.GatewayPeer/DeliverMessage"
#define MG_PEER_RPC_DISCONNECT    "/meshgate.v1.GatewayPeer/DisconnectLocal"
#define MG_PEER_RPC_DELIVER_BATCH "/meshgate.v1.GatewayPeer/DeliverBatch"
#define MG_PEER_RPC_DELIVER_MANY  "/meshgate.v1.GatewayPeer/DeliverMany"

typedef struct mg_transport_grpc_config {
    const char *gateway_id; /* this gateway, sent as origin_gateway (copied) */
    const char *region;     /* this gateway's region, origin_region (copied) */
    int peer_deadline_ms;   /* per call, capped by the router's deadline; <= 0: 500 */
    int peer_max_inflight;  /* calls in flight per peer, and deliveries queued; <= 0: 1024 */
    int coalesce_calls;     /* calls in flight to a peer before the next deliveries queue for
                               one DeliverMany; <= 0: never; 1: one call at a time, which keeps
                               the order deliver() returned in (orders_on_return) */
    int cq_threads;         /* "peer-cq" threads draining the queue; <= 0: 1 */
    mg_link_config link;    /* zero fields take link_quality.h defaults */
    const char *peer_token; /* sent as "authorization: Bearer" on peer calls; NULL: none (copied) */
} mg_transport_grpc_config;

/* Creates the transport and starts its completion-queue threads. peers is
 * borrowed (must outlive the transport); cfg is copied. Never NULL. */
mg_transport *mg_transport_grpc_create(mg_peers *peers, const mg_transport_grpc_config *cfg);

#endif
