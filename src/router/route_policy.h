/* route_policy.h: which paths a message takes to one recipient gateway.
 *
 * Pure decision, no I/O. The route lists are configuration: an ordered
 * list of paths for near routes (the target is in this gateway's region)
 * and one for far routes (another region), --near-route / --far-route,
 * parsed once at start. mg_route_plan turns them into the plan the router
 * walks for one target:
 *   target is this gateway                  -> local
 *   otherwise, the route's list in order, skipping every path that is not
 *   usable for the target (transport not configured, link degraded, the
 *   target does not consume that bus, a queue consumer re-routing);
 *   a hot (from, to) pair on a far route tries grpc first;
 *   `inbox` ends the list: when no step before it reached the gateway the
 *   router stores the message in the inbox (without it: FAILED).
 * Each failed step moves on to the next. The defaults (grpc,kafka near,
 * kafka,grpc far) are the fixed policy of before: same region or hot pair
 * direct then Kafka; cold cross-region pair Kafka, direct when Kafka is not
 * configured.
 */
#ifndef MG_ROUTE_POLICY_H
#define MG_ROUTE_POLICY_H

#include "router/msg.h"

#include <stdbool.h>
#include <stddef.h>

/* Steps of a plan: every path at most once, plus the hot grpc. */
#define MG_PLAN_MAX 8

#define MG_NEAR_ROUTE_DEFAULT "grpc,kafka"
#define MG_FAR_ROUTE_DEFAULT  "kafka,grpc"

typedef struct mg_route_list {
    mg_path step[MG_PLAN_MAX];
    size_t n;
} mg_route_list;

typedef struct mg_route_lists {
    mg_route_list near_route, far_route;
} mg_route_lists;

/* Parses one comma-separated list of path names (grpc, kafka,
 * redis-pubsub, nats, inbox; spaces around names allowed). Returns 0, or
 * -EINVAL with a message naming what is wrong in err: an empty list or
 * name, an unknown or repeated name, a name after inbox. */
int mg_route_list_parse(const char *s, mg_route_list *out, char *err, size_t errlen);
/* Both lists (NULL: the default); err names the option at fault. */
int mg_route_lists_parse(const char *near_route, const char *far_route, mg_route_lists *out,
                         char *err, size_t errlen);
/* The list as text, "grpc,kafka" (for logs). */
void mg_route_list_format(const mg_route_list *l, char *buf, size_t len);

/* Queue paths (kafka, nats) carry a message to a region's consumers, which
 * route it again: re-routing from a queue never takes a queue path. */
bool mg_path_is_queue(mg_path p);

typedef struct mg_route_input {
    const char *self_gateway, *self_region;
    const char *target_gateway, *target_region;
    bool hot;                    /* the (from, to) pair is hot */
    unsigned usable;             /* bit (1u << path) for each path that can try the target now */
    const mg_route_lists *lists; /* NULL: the defaults */
} mg_route_input;

/* The plan's steps in order, written to plan; returns how many (0: no path). */
size_t mg_route_plan(const mg_route_input *in, mg_path plan[MG_PLAN_MAX]);
/* The plan's first step (MG_PATH_NONE when there is none). */
mg_path mg_route_decide(const mg_route_input *in);

#endif
