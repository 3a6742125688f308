/* Unit tests for the route decision, the hot-pair tracker and dedupe. */
#include "router/dedupe.h"
#include "router/hot_routes.h"
#include "router/route_policy.h"

#include <criterion/criterion.h>
#include <stdio.h>

#include <errno.h>
#include <string.h>

#define BIT(p) (1u << (p))

static mg_path decide(const char *gw, const char *region, bool hot, bool grpc, bool kafka)
{
    unsigned usable = (grpc ? BIT(MG_PATH_GRPC) : 0) | (kafka ? BIT(MG_PATH_KAFKA) : 0);
    mg_route_input in = {"gw-a", "eu", gw, region, hot, usable, NULL};
    return mg_route_decide(&in);
}

Test(route_policy, follows_the_design_table)
{
    cr_assert_eq(decide("gw-a", "eu", false, true, true), MG_PATH_LOCAL);
    cr_assert_eq(decide("gw-b", "eu", false, true, true), MG_PATH_GRPC, "same region: direct");
    cr_assert_eq(decide("gw-c", "us", true, true, true), MG_PATH_GRPC, "hot cross-region: direct");
    cr_assert_eq(decide("gw-c", "us", false, true, true), MG_PATH_KAFKA, "cold cross-region");
    cr_assert_eq(decide("gw-b", "eu", false, false, true), MG_PATH_KAFKA, "degraded peer");
    cr_assert_eq(decide("gw-c", "us", true, false, true), MG_PATH_KAFKA, "hot but degraded");
    cr_assert_eq(decide("gw-c", "us", false, true, false), MG_PATH_GRPC, "no Kafka configured");
    cr_assert_eq(decide("gw-c", "us", false, false, false), MG_PATH_NONE);
}

/* The plan for a target under lists (NULL: defaults) as "a,b,c". */
static const char *plan_of(const char *near_route, const char *far_route, const char *gw,
                           const char *region, bool hot, unsigned usable)
{
    static char buf[128];
    mg_route_lists lists;
    char err[160];
    cr_assert_eq(mg_route_lists_parse(near_route, far_route, &lists, err, sizeof(err)), 0, "%s",
                 err);
    mg_route_input in = {"gw-a", "eu", gw, region, hot, usable, &lists};
    mg_route_list l = {.n = 0};
    l.n = mg_route_plan(&in, l.step);
    mg_route_list_format(&l, buf, sizeof(buf));
    return buf;
}

#define ALL                                                                                        \
    (BIT(MG_PATH_GRPC) | BIT(MG_PATH_KAFKA) | BIT(MG_PATH_REDIS_PUBSUB) | BIT(MG_PATH_NATS) |      \
     BIT(MG_PATH_INBOX))

Test(route_policy, default_lists_are_the_fixed_policy)
{
    cr_assert_str_eq(plan_of(NULL, NULL, "gw-b", "eu", false, ALL), "grpc,kafka");
    cr_assert_str_eq(plan_of(NULL, NULL, "gw-c", "us", false, ALL), "kafka,grpc");
    cr_assert_str_eq(plan_of(NULL, NULL, "gw-c", "us", true, ALL), "grpc,kafka");
    cr_assert_str_eq(plan_of(NULL, NULL, "gw-c", NULL, false, ALL), "kafka,grpc",
                     "an unknown region is far");
    cr_assert_str_eq(plan_of(NULL, NULL, "gw-a", "eu", true, ALL), "local");
    cr_assert_str_eq(plan_of(NULL, NULL, "gw-b", "eu", false, 0), "", "nothing usable: no path");
}

Test(route_policy, lists_are_walked_in_order_skipping_unusable_paths)
{
    const char *near = "redis-pubsub,nats,grpc,inbox", *far = "nats,kafka";
    cr_assert_str_eq(plan_of(near, far, "gw-b", "eu", false, ALL), "redis-pubsub,nats,grpc,inbox");
    cr_assert_str_eq(plan_of(near, far, "gw-b", "eu", false, ALL & ~BIT(MG_PATH_REDIS_PUBSUB)),
                     "nats,grpc,inbox", "a bus not configured is skipped");
    cr_assert_str_eq(plan_of(near, far, "gw-b", "eu", false, BIT(MG_PATH_INBOX)), "inbox",
                     "nothing usable: straight to the inbox");
    cr_assert_str_eq(plan_of(near, far, "gw-c", "us", false, ALL), "nats,kafka");
    cr_assert_str_eq(plan_of(near, far, "gw-c", "us", false, BIT(MG_PATH_GRPC)), "",
                     "grpc is not on the far list: no path");
}

Test(route_policy, hot_pairs_try_grpc_first_on_far_routes_only)
{
    cr_assert_str_eq(plan_of("kafka,grpc", "nats,grpc,inbox", "gw-c", "us", true, ALL),
                     "grpc,nats,inbox", "grpc moves to the front, once");
    cr_assert_str_eq(plan_of("kafka,grpc", "nats,inbox", "gw-c", "us", true, ALL),
                     "grpc,nats,inbox", "even when the far list does not name it");
    cr_assert_str_eq(
        plan_of("kafka,grpc", "nats,inbox", "gw-c", "us", true, ALL & ~BIT(MG_PATH_GRPC)),
        "nats,inbox", "not when the peer is unusable");
    cr_assert_str_eq(plan_of("kafka,grpc", "nats", "gw-b", "eu", true, ALL), "kafka,grpc",
                     "a near route keeps its order");
}

Test(route_policy, bad_lists_are_refused_with_a_clear_error)
{
    static const struct {
        const char *list, *want;
    } bad[] = {
        {"", "empty list"},
        {"grpc,,kafka", "empty path name"},
        {"grpc,", "empty path name"},
        {"grpc,rabbitmq", "unknown path 'rabbitmq'"},
        {"local", "unknown path 'local'"},
        {"grpc,kafka,grpc", "'grpc' is named twice"},
        {"inbox,grpc", "inbox ends the list"},
    };
    char err[160];
    mg_route_lists lists;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cr_assert_eq(mg_route_lists_parse(bad[i].list, NULL, &lists, err, sizeof(err)), -EINVAL,
                     "%s", bad[i].list);
        cr_assert(strstr(err, "--near-route: ") && strstr(err, bad[i].want), "'%s' -> %s",
                  bad[i].list, err);
        cr_assert_eq(mg_route_lists_parse(NULL, bad[i].list, &lists, err, sizeof(err)), -EINVAL);
        cr_assert(strstr(err, "--far-route: "), "%s", err);
    }
    cr_assert_eq(
        mg_route_lists_parse(" grpc , redis-pubsub,inbox ", "nats", &lists, err, sizeof(err)), 0,
        "spaces around names are fine");
    cr_assert_eq(lists.near_route.n, 3);
    cr_assert_eq(lists.near_route.step[1], MG_PATH_REDIS_PUBSUB);
}

Test(hot_routes, pair_turns_hot_at_threshold_and_cools_after_window)
{
    mg_hot *h = mg_hot_create(2, 5, 64);
    int64_t t = 1000000;
    for (int i = 0; i < 4; i++)
        cr_assert_not(mg_hot_hit(h, "alice", "bob", t), "hit %d is below the threshold", i);
    cr_assert(mg_hot_hit(h, "alice", "bob", t + 10), "5th hit within the window is hot");
    cr_assert_not(mg_hot_hit(h, "bob", "alice", t), "pairs are directed");
    cr_assert_eq(mg_hot_count(h, t + 10), 1);
    cr_assert_eq(mg_hot_count(h, t + 5000), 0, "the window slid past it");
    cr_assert_not(mg_hot_hit(h, "alice", "bob", t + 5000));
    mg_hot_free(h);
}

Test(hot_routes, memory_is_bounded_and_heavy_pairs_survive_churn)
{
    mg_hot *h = mg_hot_create(10, 50, 64);
    int64_t t = 5000000;
    char from[32];
    for (int round = 0; round < 100; round++) {
        mg_hot_hit(h, "heavy", "pair", t);
        for (int i = 0; i < 20; i++) {
            snprintf(from, sizeof(from), "u%d-%d", round, i);
            mg_hot_hit(h, from, "x", t);
        }
    }
    cr_assert(mg_hot_hit(h, "heavy", "pair", t), "the heavy pair kept its slot through churn");
    mg_hot_free(h);
}

Test(dedupe, window_drops_repeats_and_forgets_oldest)
{
    mg_dedupe *d = mg_dedupe_create(3);
    cr_assert_not(mg_dedupe_check_and_add(d, "a"));
    cr_assert(mg_dedupe_check_and_add(d, "a"));
    cr_assert_not(mg_dedupe_check_and_add(d, "b"));
    cr_assert_not(mg_dedupe_check_and_add(d, "c"));
    cr_assert_not(mg_dedupe_check_and_add(d, "d"), "evicts a");
    cr_assert_not(mg_dedupe_check_and_add(d, "a"), "a left the window");
    mg_dedupe_forget(d, "d");
    cr_assert_not(mg_dedupe_check_and_add(d, "d"));
    mg_dedupe_free(d);

    /* A window split into stripes (the default 65,536): the most recent ids
     * are all still in it, the oldest left. */
    d = mg_dedupe_create(65536);
    char id[32];
    for (int i = 0; i < 200000; i++) {
        snprintf(id, sizeof(id), "m-%d", i);
        cr_assert_not(mg_dedupe_check_and_add(d, id), "%s is new", id);
    }
    for (int i = 200000 - 20000; i < 200000; i++) {
        snprintf(id, sizeof(id), "m-%d", i);
        cr_assert(mg_dedupe_check_and_add(d, id), "%s is recent", id);
    }
    cr_assert_not(mg_dedupe_check_and_add(d, "m-0"), "the oldest left");
    mg_dedupe_forget(d, "m-199999");
    cr_assert_not(mg_dedupe_check_and_add(d, "m-199999"), "forgotten");
    mg_dedupe_free(d);
}
