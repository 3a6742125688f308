/* route_policy.c: the route decision (see route_policy.h). Pure and
 * thread-safe. */
#include "router/route_policy.h"

#include <string.h>

mg_path mg_route_decide(const mg_route_input *in)
{
    if (!strcmp(in->target_gateway, in->self_gateway))
        return MG_PATH_LOCAL;
    bool same_region = in->target_region && !strcmp(in->target_region, in->self_region);
    if (in->grpc_usable && (same_region || in->hot))
        return MG_PATH_GRPC;
    if (in->kafka_usable)
        return MG_PATH_KAFKA;
    if (in->grpc_usable)
        return MG_PATH_GRPC;
    return MG_PATH_NONE;
}

size_t mg_route_plan(const mg_route_input *in, mg_path plan[MG_PLAN_MAX])
{
    mg_path first = mg_route_decide(in);
    if (first == MG_PATH_NONE)
        return 0;
    size_t n = 0;
    plan[n++] = first;
    if (first == MG_PATH_GRPC && in->kafka_usable)
        plan[n++] = MG_PATH_KAFKA;
    return n;
}
