/* Unit tests of the per-peer link quality / circuit breaker
 * (src/router/link_quality.c) on a synthetic clock. */
#include "router/link_quality.c"

#include <criterion/criterion.h>

static mg_link_config cfg(void)
{
    mg_link_config c = {
        .alpha = 0.2,
        .error_threshold = 0.5,
        .min_samples = 5,
        .latency_threshold_us = 200 * 1000,
        .probe_interval_ms = 2000,
    };
    return c;
}

Test(link_quality, defaults_fill_zero_fields)
{
    mg_link_config c = {0};
    mg_link_config_defaults(&c);
    cr_expect_float_eq(c.alpha, 0.2, 1e-9);
    cr_expect_float_eq(c.error_threshold, 0.5, 1e-9);
    cr_expect_eq(c.min_samples, 10);
    cr_expect_eq(c.latency_threshold_us, 200000);
    cr_expect_eq(c.probe_interval_ms, 2000);
    mg_link_config keep = {.alpha = 0.5, .min_samples = 3};
    mg_link_config_defaults(&keep);
    cr_expect_float_eq(keep.alpha, 0.5, 1e-9);
    cr_expect_eq(keep.min_samples, 3);
}

Test(link_quality, healthy_link_admits_and_stays_healthy)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    int64_t now = 1000;
    for (int i = 0; i < 100; i++, now += 10) {
        bool probe = true;
        cr_assert(mg_link_admit(&l, &c, now, &probe));
        cr_expect_not(probe);
        cr_assert_eq(mg_link_record(&l, &c, true, 1500, false, now), 0);
    }
    cr_expect_not(l.degraded);
    cr_expect_float_eq(l.err_ewma, 0.0, 1e-9);
    cr_expect_float_eq(l.lat_ewma_us, 1500.0, 1e-6);
}

Test(link_quality, errors_degrade_only_after_min_samples)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    int64_t now = 1000;
    /* The first 4 errors: EWMA 1.0 but fewer than min_samples results. */
    for (int i = 0; i < 4; i++)
        cr_assert_eq(mg_link_record(&l, &c, false, 0, false, now), 0);
    cr_expect_not(l.degraded);
    cr_assert_eq(mg_link_record(&l, &c, false, 0, false, now), 1);
    cr_expect(l.degraded);
    cr_expect_eq(l.transitions, 1);
    cr_expect_not(mg_link_admit(&l, &c, now, NULL));
    cr_expect_not(mg_link_would_admit(&l, now + 1999));
}

Test(link_quality, occasional_errors_do_not_degrade)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    int64_t now = 0;
    /* One error in four: the EWMA stays well under 0.5. */
    for (int i = 0; i < 400; i++, now += 5) {
        cr_assert_eq(mg_link_record(&l, &c, i % 4 != 0, 1000, false, now), 0, "i=%d", i);
    }
    cr_expect_not(l.degraded);
    cr_expect_lt(l.err_ewma, 0.5);
}

Test(link_quality, slow_answers_degrade)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    int64_t now = 0;
    for (int i = 0; i < 5; i++)
        mg_link_record(&l, &c, true, 10 * 1000, false, now);
    cr_expect_not(l.degraded);
    int changed = 0;
    for (int i = 0; i < 30 && !changed; i++, now += 10)
        changed = mg_link_record(&l, &c, true, 400 * 1000, false, now);
    cr_expect_eq(changed, 1);
    cr_expect(l.degraded);
    cr_expect_gt(l.lat_ewma_us, 200 * 1000.0);
    cr_expect_float_eq(l.err_ewma, 0.0, 1e-9);
}

Test(link_quality, degraded_link_grants_one_probe_per_interval)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    int64_t now = 10000;
    for (int i = 0; i < 5; i++)
        mg_link_record(&l, &c, false, 0, false, now);
    cr_assert(l.degraded);
    bool probe = false;
    cr_expect_not(mg_link_admit(&l, &c, now + 1000, &probe));
    cr_expect(mg_link_would_admit(&l, now + 2000));
    cr_assert(mg_link_admit(&l, &c, now + 2000, &probe));
    cr_expect(probe);
    /* The slot is taken: nobody else until the next interval. */
    cr_expect_not(mg_link_admit(&l, &c, now + 2001, &probe));
    cr_expect_not(mg_link_admit(&l, &c, now + 3999, &probe));
    /* The probe fails: still degraded, next probe one interval after it. */
    cr_expect_eq(mg_link_record(&l, &c, false, 0, true, now + 2100), 0);
    cr_expect(l.degraded);
    cr_expect_not(mg_link_admit(&l, &c, now + 4000, &probe));
    cr_expect(mg_link_admit(&l, &c, now + 4100, &probe));
    cr_expect(probe);
}

Test(link_quality, successful_probe_recovers)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    int64_t now = 0;
    for (int i = 0; i < 5; i++)
        mg_link_record(&l, &c, false, 0, false, now);
    cr_assert(l.degraded);
    bool probe;
    cr_assert(mg_link_admit(&l, &c, now + 2000, &probe));
    cr_assert(probe);
    cr_expect_eq(mg_link_record(&l, &c, true, 3000, true, now + 2003), -1);
    cr_expect_not(l.degraded);
    cr_expect_float_eq(l.err_ewma, 0.0, 1e-9);
    cr_expect_eq(l.samples, 1);
    cr_expect_eq(l.transitions, 1);
    /* Healthy again: everything is admitted, and it takes min_samples
     * results to degrade again. */
    cr_expect(mg_link_admit(&l, &c, now + 2004, &probe));
    cr_expect_not(probe);
    for (int i = 0; i < 3; i++)
        cr_expect_eq(mg_link_record(&l, &c, false, 0, false, now + 2010), 0);
    cr_expect_not(l.degraded);
}

Test(link_quality, slow_probe_does_not_recover)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    for (int i = 0; i < 10; i++)
        mg_link_record(&l, &c, true, 500 * 1000, false, 0);
    cr_assert(l.degraded);
    cr_assert(mg_link_admit(&l, &c, 2000, NULL));
    cr_expect_eq(mg_link_record(&l, &c, true, 300 * 1000, true, 2300), 0);
    cr_expect(l.degraded);
    cr_expect_not(mg_link_admit(&l, &c, 4000, NULL));
    cr_expect(mg_link_admit(&l, &c, 4300, NULL));
}

Test(link_quality, late_non_probe_success_does_not_recover)
{
    mg_link_config c = cfg();
    mg_link l;
    mg_link_init(&l);
    for (int i = 0; i < 5; i++)
        mg_link_record(&l, &c, false, 0, false, 0);
    cr_assert(l.degraded);
    /* A call started before the link degraded answers fast: EWMAs move,
     * the breaker stays open until a probe says otherwise. */
    cr_expect_eq(mg_link_record(&l, &c, true, 1000, false, 10), 0);
    cr_expect(l.degraded);
    cr_expect_lt(l.err_ewma, 1.0);
}
