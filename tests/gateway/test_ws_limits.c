/* Unit tests of ws_limits.c's pure parts: the token bucket, the fd budget and
 * the close payload check (the lws-facing parts are tested by
 * tests/integration/test_ws_limits.c); and ws_server.c's --ws-threads default. */
#include "gateway/ws_limits.h"
#include "gateway/ws_server.h"
#include "common/mg_time.h"

#include <criterion/criterion.h>
#include <sched.h>

Test(ws_limits, token_bucket_burst_refill_and_close)
{
    mg_ws_limiter_config cfg = {.send_rate = 10, .send_burst = 3};
    mg_ws_limiter *l = mg_ws_limiter_create(&cfg);
    mg_ws_limiter_conn *c = mg_ws_limiter_conn_open(l, "127.0.0.1");
    cr_assert_not_null(c);
    int64_t t = mg_mono_ms() + 10000; /* well after the open: the bucket is full */
    for (int i = 0; i < 3; i++)
        cr_assert_eq(mg_ws_limiter_frame(l, c, t), MG_WS_RATE_OK, "burst frame %d", i);
    cr_assert_eq(mg_ws_limiter_frame(l, c, t), MG_WS_RATE_LIMITED);
    t += 100; /* 10/s: one token per 100 ms */
    cr_assert_eq(mg_ws_limiter_frame(l, c, t), MG_WS_RATE_OK);
    cr_assert_eq(mg_ws_limiter_frame(l, c, t), MG_WS_RATE_LIMITED);
    /* that was refusal #2 within the second; #3..#19 stay LIMITED, #20 closes */
    for (int i = 3; i < MG_WS_RATE_CLOSE_AFTER; i++)
        cr_assert_eq(mg_ws_limiter_frame(l, c, t), MG_WS_RATE_LIMITED, "refusal %d", i);
    cr_assert_eq(mg_ws_limiter_frame(l, c, t), MG_WS_RATE_CLOSE);
    mg_ws_limiter_conn_close(l, c);
    mg_ws_limiter_free(l);
}

Test(ws_limits, off_by_default_and_per_ip_counts)
{
    mg_ws_limiter_config off = {0};
    mg_ws_limiter *l = mg_ws_limiter_create(&off);
    cr_assert_null(mg_ws_limiter_conn_open(l, "10.0.0.1"));
    cr_assert_eq(mg_ws_limiter_frame(l, NULL, 0), MG_WS_RATE_OK);
    cr_assert_not(mg_ws_limiter_ip_full(l, "10.0.0.1"));
    mg_ws_limiter_free(l);

    mg_ws_limiter_config ip = {.max_per_ip = 2};
    l = mg_ws_limiter_create(&ip);
    mg_ws_limiter_conn *a = mg_ws_limiter_conn_open(l, "10.0.0.1");
    mg_ws_limiter_conn *b = mg_ws_limiter_conn_open(l, "10.0.0.1");
    cr_assert(mg_ws_limiter_ip_full(l, "10.0.0.1"));
    cr_assert_not(mg_ws_limiter_ip_full(l, "10.0.0.2"));
    mg_ws_limiter_conn_close(l, a);
    cr_assert_not(mg_ws_limiter_ip_full(l, "10.0.0.1"));
    mg_ws_limiter_conn_close(l, b);
    mg_ws_limiter_free(l);
}

Test(ws_limits, fd_budget)
{
    size_t conns, hs;
    unsigned fds;
    /* plenty of descriptors: the option stands */
    mg_ws_fd_budget(1048576, 256, 1000000, 1024, &conns, &hs, &fds);
    cr_assert_eq(conns, 1000000);
    cr_assert_eq(hs, 1024);
    cr_assert_eq(fds, 1048576 - 256);
    /* few: everything fits below nofile - reserve */
    mg_ws_fd_budget(300, 64, 1000000, 1024, &conns, &hs, &fds);
    cr_assert_eq(fds, 236);
    cr_assert_lt(conns + hs, fds);
    cr_assert_gt(conns, 100);
    cr_assert_geq(hs, 1);
    /* a reserve above half the table is cut to a quarter */
    mg_ws_fd_budget(1024, 4096, 1000000, 0, &conns, &hs, &fds);
    cr_assert_eq(fds, 768);
    cr_assert_eq(hs, 0);
    cr_assert_lt(conns, fds);
}

Test(ws_limits, close_payloads)
{
    cr_assert(mg_ws_close_payload_valid(NULL, 0));
    cr_assert_not(mg_ws_close_payload_valid((const unsigned char *)"\x03", 1));
    cr_assert(mg_ws_close_payload_valid((const unsigned char *)"\x03\xe8ok", 4));
    cr_assert_not(mg_ws_close_payload_valid((const unsigned char *)"\x03\xe8\xff\xfe", 4));
    cr_assert_not(mg_ws_close_payload_valid((const unsigned char *)"\x03\xed", 2)); /* 1005 */
    cr_assert_not(mg_ws_close_payload_valid((const unsigned char *)"\x00\x01", 2));
    cr_assert(mg_ws_close_payload_valid((const unsigned char *)"\x0f\xa0", 2)); /* 4000 */
}

/* --ws-threads 0: one loop per CPU this thread may run on (its affinity mask,
 * capped by the cgroup quota, which is never below one CPU). */
Test(ws_threads, default_follows_the_affinity_mask)
{
    cpu_set_t saved, one;
    cr_assert_eq(sched_getaffinity(0, sizeof(saved), &saved), 0);
    unsigned all = mg_ws_default_threads();
    cr_assert(all >= 1 && all <= (unsigned)CPU_COUNT(&saved), "%u loops for %d CPUs", all,
              CPU_COUNT(&saved));
    int first = 0;
    while (!CPU_ISSET(first, &saved))
        first++;
    CPU_ZERO(&one);
    CPU_SET(first, &one);
    cr_assert_eq(sched_setaffinity(0, sizeof(one), &one), 0);
    unsigned pinned = mg_ws_default_threads();
    sched_setaffinity(0, sizeof(saved), &saved);
    cr_assert_eq(pinned, 1, "pinned to one CPU: %u loops", pinned);
}

Test(ws_limits, admit_checks_and_counts_in_one_step)
{
    mg_ws_limiter_config cfg = {.max_per_ip = 2};
    mg_ws_limiter *l = mg_ws_limiter_create(&cfg);
    mg_ws_limiter_conn *a, *b, *c;
    cr_assert(mg_ws_limiter_conn_admit(l, "10.0.0.1", &a));
    cr_assert(mg_ws_limiter_conn_admit(l, "10.0.0.1", &b));
    cr_assert_not(mg_ws_limiter_conn_admit(l, "10.0.0.1", &c), "the cap is 2");
    cr_assert_null(c);
    cr_assert(mg_ws_limiter_ip_full(l, "10.0.0.1"));
    mg_ws_limiter_conn_close(l, a);
    cr_assert(mg_ws_limiter_conn_admit(l, "10.0.0.1", &c), "a closed slot is free again");
    mg_ws_limiter_conn_close(l, b);
    mg_ws_limiter_conn_close(l, c);
    cr_assert_not(mg_ws_limiter_ip_full(l, "10.0.0.1"));
    mg_ws_limiter_free(l);
}
