/* route_policy.c: the route lists and the plan (see route_policy.h). Pure
 * and thread-safe. */
#include "router/route_policy.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* The paths a route list may name: every peer path but local. */
static mg_path path_by_name(const char *name, size_t len)
{
    for (int p = MG_PATH_GRPC; p < MG_PATH_COUNT; p++) {
        const char *n = mg_path_name((mg_path)p);
        if (strlen(n) == len && !strncmp(n, name, len))
            return (mg_path)p;
    }
    return MG_PATH_NONE;
}

int mg_route_list_parse(const char *s, mg_route_list *out, char *err, size_t errlen)
{
    out->n = 0;
    const char *p = s ? s : "";
    for (;;) {
        while (*p == ' ')
            p++;
        const char *end = p + strcspn(p, ",");
        const char *e = end;
        while (e > p && e[-1] == ' ')
            e--;
        size_t len = (size_t)(e - p);
        if (len == 0) {
            snprintf(err, errlen, "%s", s && *s ? "empty path name in the list" : "empty list");
            return -EINVAL;
        }
        mg_path path = path_by_name(p, len);
        if (path == MG_PATH_NONE) {
            snprintf(err, errlen,
                     "unknown path '%.*s' (want grpc, kafka, redis-pubsub, nats or inbox)",
                     (int)len, p);
            return -EINVAL;
        }
        for (size_t i = 0; i < out->n; i++)
            if (out->step[i] == path) {
                snprintf(err, errlen, "'%s' is named twice", mg_path_name(path));
                return -EINVAL;
            }
        if (out->n > 0 && out->step[out->n - 1] == MG_PATH_INBOX) {
            snprintf(err, errlen, "inbox ends the list ('%.*s' follows it)", (int)len, p);
            return -EINVAL;
        }
        out->step[out->n++] = path;
        if (!*end)
            return 0;
        p = end + 1;
    }
}

int mg_route_lists_parse(const char *near_route, const char *far_route, mg_route_lists *out,
                         char *err, size_t errlen)
{
    char why[160];
    if (mg_route_list_parse(near_route ? near_route : MG_NEAR_ROUTE_DEFAULT, &out->near_route, why,
                            sizeof(why))) {
        snprintf(err, errlen, "--near-route: %s", why);
        return -EINVAL;
    }
    if (mg_route_list_parse(far_route ? far_route : MG_FAR_ROUTE_DEFAULT, &out->far_route, why,
                            sizeof(why))) {
        snprintf(err, errlen, "--far-route: %s", why);
        return -EINVAL;
    }
    return 0;
}

void mg_route_list_format(const mg_route_list *l, char *buf, size_t len)
{
    size_t off = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < l->n && off < len; i++) {
        int w = snprintf(buf + off, len - off, "%s%s", i ? "," : "", mg_path_name(l->step[i]));
        if (w < 0)
            break;
        off += (size_t)w;
    }
}

bool mg_path_is_queue(mg_path p)
{
    return p == MG_PATH_KAFKA || p == MG_PATH_NATS;
}

static const mg_route_lists *default_lists(void)
{
    static mg_route_lists lists = {
        .near_route = {{MG_PATH_GRPC, MG_PATH_KAFKA}, 2},
        .far_route = {{MG_PATH_KAFKA, MG_PATH_GRPC}, 2},
    };
    return &lists;
}

size_t mg_route_plan(const mg_route_input *in, mg_path plan[MG_PLAN_MAX])
{
    if (!strcmp(in->target_gateway, in->self_gateway)) {
        plan[0] = MG_PATH_LOCAL;
        return 1;
    }
    const mg_route_lists *lists = in->lists ? in->lists : default_lists();
    bool near = in->target_region && !strcmp(in->target_region, in->self_region);
    const mg_route_list *l = near ? &lists->near_route : &lists->far_route;
    size_t n = 0;
    unsigned taken = 0;
    if (!near && in->hot && (in->usable & (1u << MG_PATH_GRPC))) {
        plan[n++] = MG_PATH_GRPC;
        taken |= 1u << MG_PATH_GRPC;
    }
    for (size_t i = 0; i < l->n && n < MG_PLAN_MAX; i++) {
        mg_path p = l->step[i];
        if (p == MG_PATH_INBOX) {
            plan[n++] = p;
            break;
        }
        if ((in->usable & (1u << p)) && !(taken & (1u << p))) {
            plan[n++] = p;
            taken |= 1u << p;
        }
    }
    return n;
}

mg_path mg_route_decide(const mg_route_input *in)
{
    mg_path plan[MG_PLAN_MAX];
    return mg_route_plan(in, plan) ? plan[0] : MG_PATH_NONE;
}
