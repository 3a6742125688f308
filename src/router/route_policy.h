/* route_policy.h: which path a message takes to one recipient gateway.
 *
 * Pure decision, no I/O, exactly DESIGN.md's table:
 *   target is this gateway                          -> local
 *   same region, peer usable                        -> grpc
 *   other region, hot (from, to) pair, peer usable  -> grpc
 *   other region, cold pair (or peer unusable)      -> kafka
 *   no Kafka configured                             -> grpc when usable, else none
 * mg_route_plan turns the decision into the ordered list the router walks:
 * a failed gRPC attempt falls back to Kafka; the router stores in the inbox
 * when no path is left.
 */
#ifndef MG_ROUTE_POLICY_H
#define MG_ROUTE_POLICY_H

#include "router/msg.h"

#include <stdbool.h>

typedef struct mg_route_input {
    const char *self_gateway, *self_region;
    const char *target_gateway, *target_region;
    bool hot;          /* the (from, to) pair is hot */
    bool grpc_usable;  /* a peer channel exists and its link is healthy */
    bool kafka_usable; /* a Kafka producer is configured */
} mg_route_input;

mg_path mg_route_decide(const mg_route_input *in);

#define MG_PLAN_MAX 4
/* The plan: the transports to try in order until one reaches the
 * gateway: the decision above, then Kafka after a failed gRPC attempt when
 * Kafka is usable. Returns the number of steps written to plan (0: no path). */
size_t mg_route_plan(const mg_route_input *in, mg_path plan[MG_PLAN_MAX]);

#endif
