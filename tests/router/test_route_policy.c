/* Unit tests for the route decision, the hot-pair tracker and dedupe. */
#include "router/dedupe.h"
#include "router/hot_routes.h"
#include "router/route_policy.h"

#include <criterion/criterion.h>
#include <stdio.h>

static mg_path decide(const char *gw, const char *region, bool hot, bool grpc, bool kafka)
{
    mg_route_input in = {"gw-a", "eu", gw, region, hot, grpc, kafka};
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
}
