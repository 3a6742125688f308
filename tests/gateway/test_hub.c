/* Unit tests of the connection hub (gateway/hub.c): registry, fan-out,
 * bounded queues and slow consumers, disconnects, the wake signal, and the
 * write span of each connection (exported to a loopback OTLP endpoint). */
#include "common/mg_time.h"
#include "common/mg_trace.h"
#include "discovery/fake_http.h"
#include "gateway/hub.h"

#include <criterion/criterion.h>
#include <stdint.h>
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int wakes;
static void on_wake(void *arg, unsigned shard)
{
    (void)shard;
    (*(int *)arg)++;
}

static mg_hub *make(size_t frames, size_t bytes)
{
    wakes = 0;
    mg_hub_config c = {.gateway_id = "gw1",
                       .max_frames = frames,
                       .max_bytes = bytes,
                       .headroom = 16,
                       .wake = on_wake,
                       .wake_arg = &wakes};
    return mg_hub_create(&c);
}

static mg_msg *msg(const char *id, const char *to)
{
    return mg_msg_new(id, "alice", to, (const uint8_t *)"hello", 5, NULL, 42, MG_PRIO_HIGH);
}

static char *pop_text(mg_hub *h, mg_hub_conn *c, int *close_code)
{
    bool more;
    char reason[64];
    mg_hub_frame *f = mg_hub_pop(h, c, &more, close_code, reason, sizeof(reason));
    if (!f)
        return NULL;
    char *s = strndup((char *)f->data + 16, f->len);
    mg_hub_frame_done(h, f, true);
    return s;
}

static void collect(void *handle, int close_code, void *arg)
{
    (void)close_code;
    int *n = arg;
    (*n)++;
    (void)handle;
}

Test(hub, register_ids_and_unregister)
{
    mg_hub *h = make(8, 1 << 20);
    int dummy;
    mg_hub_conn *a = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *b = mg_hub_register(h, 0, "bob", &dummy);
    cr_assert_str_eq(mg_hub_conn_id(a), "gw1-1");
    cr_assert_str_eq(mg_hub_conn_id(b), "gw1-2");
    cr_assert_str_eq(mg_hub_conn_user(a), "bob");
    cr_assert_eq(mg_hub_count(h), 2);
    char **ids;
    size_t n = mg_hub_conn_ids(h, &ids);
    cr_assert_eq(n, 2);
    mg_hub_ids_free(ids, n);
    mg_hub_unregister(h, a);
    cr_assert_eq(mg_hub_count(h), 1);
    mg_msg *m = msg("m1", "bob");
    cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 1, "remaining conn of bob gets it");
    mg_hub_unregister(h, b);
    cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 0);
    cr_assert_eq(mg_hub_post(h, "gw1-1", "x", 1), -ENOENT);
    mg_msg_free(m);
    mg_hub_free(h);
    mg_hub_free(NULL);
}

/* A wake that takes the ready set at once, as a woken loop does: it could
 * not under the shard's mutex (the mutex is not recursive: a hang). */
static void on_wake_take(void *arg, unsigned shard)
{
    void **a = arg;
    mg_hub_take_ready(a[0], shard, SIZE_MAX, collect, a[1]);
}

Test(hub, wake_comes_after_the_shard_mutex_is_released, .timeout = 10)
{
    int ready = 0, dummy;
    void *arg[2] = {NULL, &ready};
    mg_hub_config cfg = {.gateway_id = "gw1",
                         .max_frames = 8,
                         .max_bytes = 1 << 20,
                         .headroom = 16,
                         .wake = on_wake_take,
                         .wake_arg = arg};
    mg_hub *h = mg_hub_create(&cfg);
    arg[0] = h;
    mg_hub_conn *c = mg_hub_register(h, 0, "bob", &dummy);
    mg_msg *m = msg("m1", "bob");
    cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 1);
    cr_assert_eq(ready, 1, "the wake took the ready connection");
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(c), "{}", 2), 0);
    cr_assert_eq(ready, 2, "taken, the set was empty again: the post woke it");
    mg_msg_free(m);
    mg_hub_free(h);
}

Test(hub, deliver_to_all_connections_of_a_user)
{
    mg_hub *h = make(8, 1 << 20);
    int dummy;
    mg_hub_conn *c[3];
    for (int i = 0; i < 3; i++)
        c[i] = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *other = mg_hub_register(h, 0, "carol", &dummy);
    mg_msg *m = msg("m1", "bob");
    cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 3);
    cr_assert_eq(wakes, 1, "one wake per burst, got %d", wakes);
    /* a loop takes its ready connections a bounded batch at a time: the
     * rest stay ready (no second wake: the loop asks while more remain) */
    int ready = 0;
    cr_assert(mg_hub_take_ready(h, 0, 2, collect, &ready), "1 still ready");
    cr_assert_eq(ready, 2);
    cr_assert_not(mg_hub_take_ready(h, 0, 2, collect, &ready), "none left");
    cr_assert_eq(ready, 3);
    cr_assert_not(mg_hub_take_ready(h, 0, SIZE_MAX, collect, &ready));
    cr_assert_eq(ready, 3, "each taken once");
    for (int i = 0; i < 3; i++) {
        int code;
        char *s = pop_text(h, c[i], &code);
        cr_assert_not_null(s);
        json_t *j = json_loads(s, 0, NULL);
        cr_assert_str_eq(json_string_value(json_object_get(j, "type")), "message");
        cr_assert_str_eq(json_string_value(json_object_get(j, "id")), "m1");
        cr_assert_str_eq(json_string_value(json_object_get(j, "content")), "hello");
        cr_assert(json_is_false(json_object_get(j, "inbox")));
        json_decref(j);
        free(s);
        cr_assert_null(pop_text(h, c[i], &code));
        cr_assert_eq(code, 0);
    }
    int code;
    cr_assert_null(pop_text(h, other, &code));

    /* to one connection only (inbox delivery) */
    cr_assert_eq(mg_hub_deliver(h, m, mg_hub_conn_id(c[1]), true, NULL, NULL), 1);
    cr_assert_eq(mg_hub_deliver(h, m, mg_hub_conn_id(other), true, NULL, NULL), 0,
                 "conn of another user");
    cr_assert_eq(mg_hub_deliver(h, m, "gw1-999", true, NULL, NULL), 0);
    char *s = pop_text(h, c[1], &code);
    cr_assert(strstr(s, "\"inbox\":true"));
    free(s);
    cr_assert_null(pop_text(h, c[0], &code));

    mg_hub_stats st;
    mg_hub_get_stats(h, &st);
    cr_assert_eq(st.delivered, 4);
    mg_msg_free(m);
    mg_hub_free(h); /* frees the remaining connections */
}

Test(hub, bounded_queue_slow_consumer)
{
    mg_hub *h = make(3, 1 << 20);
    int dummy;
    mg_hub_conn *slow = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *fast = mg_hub_register(h, 0, "bob", &dummy);
    mg_msg *m = msg("m", "bob");
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 2);
        int code;
        free(pop_text(h, fast, &code)); /* fast keeps up */
    }
    cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 1,
                 "the overflowing conn does not count");
    cr_assert(mg_hub_is_slow(h, mg_hub_conn_id(slow)));
    cr_assert_not(mg_hub_is_slow(h, mg_hub_conn_id(fast)));
    int code;
    cr_assert_null(pop_text(h, slow, &code), "queue dropped");
    cr_assert_eq(code, MG_WS_CLOSE_SLOW_CONSUMER);
    cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 1,
                 "still closed, still not counted");
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(slow), "x", 1), -ENOENT);
    mg_hub_stats st;
    mg_hub_get_stats(h, &st);
    cr_assert_eq(st.slow_closes, 1);
    cr_assert_eq(st.delivered, 3 * 2 + 1 + 1);
    mg_msg_free(m);
    mg_hub_free(h);
}

Test(hub, byte_bound)
{
    mg_hub *h = make(1000, 10);
    int dummy;
    mg_hub_conn *c = mg_hub_register(h, 0, "bob", &dummy);
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(c), "12345", 5), 0);
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(c), "12345", 5), 0);
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(c), "1", 1), -ENOBUFS);
    cr_assert(mg_hub_is_slow(h, mg_hub_conn_id(c)));
    mg_hub_unregister(h, c);
    mg_hub_free(h);
}

Test(hub, disconnect_flushes_then_closes)
{
    mg_hub *h = make(8, 1 << 20);
    int dummy;
    mg_hub_conn *a = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *b = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *c = mg_hub_register(h, 0, "carol", &dummy);
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(a), "ack", 3), 0);
    cr_assert_eq(mg_hub_disconnect(h, "bob", NULL, 4000, "kicked"), 2);
    cr_assert_eq(mg_hub_disconnect(h, "bob", NULL, 4000, "kicked"), 0, "already closing");
    cr_assert_eq(mg_hub_disconnect(h, "bob", mg_hub_conn_id(c), 4000, "x"), 0, "user mismatch");
    cr_assert_eq(mg_hub_disconnect(h, NULL, mg_hub_conn_id(c), 1012, "restart"), 1);
    bool more;
    int code;
    char reason[64];
    mg_hub_frame *f = mg_hub_pop(h, a, &more, &code, reason, sizeof(reason));
    cr_assert_not_null(f, "queued frames go first");
    free(f);
    cr_assert_null(mg_hub_pop(h, a, &more, &code, reason, sizeof(reason)));
    cr_assert_eq(code, 4000);
    cr_assert_str_eq(reason, "kicked");
    cr_assert_null(mg_hub_pop(h, c, &more, &code, reason, sizeof(reason)));
    cr_assert_eq(code, 1012);
    mg_hub_sink(h).disconnect(h, "nobody", NULL, 1000, "");
    int ready = 0;
    mg_hub_take_ready(h, 0, SIZE_MAX, collect, &ready);
    cr_assert_eq(ready, 3);
    mg_hub_unregister(h, b); /* unregister while ready: removed from the ready list */
    mg_hub_unregister(h, a);
    mg_hub_unregister(h, c);
    cr_assert_eq(mg_hub_count(h), 0);
    mg_hub_free(h);
}

Test(hub, unregister_removes_from_ready_list)
{
    mg_hub *h = make(8, 1 << 20);
    int dummy;
    mg_hub_conn *a = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *b = mg_hub_register(h, 0, "carol", &dummy);
    mg_hub_post(h, mg_hub_conn_id(a), "x", 1);
    mg_hub_post(h, mg_hub_conn_id(b), "x", 1);
    mg_hub_unregister(h, a);
    int ready = 0;
    mg_hub_take_ready(h, 0, SIZE_MAX, collect, &ready);
    cr_assert_eq(ready, 1);
    mg_hub_free(h);
}

/* Concurrent deliveries from several threads while the owner drains. */
static void *producer(void *arg)
{
    mg_hub *h = arg;
    mg_msg *m = msg("p", "bob");
    for (int i = 0; i < 2000; i++)
        mg_hub_deliver(h, m, NULL, false, NULL, NULL);
    mg_msg_free(m);
    return NULL;
}

Test(hub, concurrent_deliveries)
{
    mg_hub *h = make(100000, 1 << 30);
    int dummy;
    mg_hub_conn *c = mg_hub_register(h, 0, "bob", &dummy);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, producer, h);
    size_t got = 0;
    for (int spin = 0; spin < 2000000 && got < 8000; spin++) {
        int code;
        char *s = pop_text(h, c, &code);
        if (s)
            got++;
        free(s);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    int code;
    char *s;
    while ((s = pop_text(h, c, &code))) {
        got++;
        free(s);
    }
    cr_assert_eq(got, 8000);
    mg_hub_free(h);
}

/* ---- deliveries reported when written (delivery-write-wait-ms) ---- */

static void on_written(void *arg, uint32_t n)
{
    int *result = arg;
    cr_assert_eq(*result, -1, "reported exactly once");
    *result = (int)n;
}

static int deliver_reported(mg_hub *h, int *result)
{
    mg_msg *m = msg("w1", "bob");
    *result = -1;
    int n = mg_hub_deliver(h, m, NULL, false, on_written, result);
    mg_msg_free(m);
    return n;
}

static mg_hub *make_waiting(int wait_ms)
{
    mg_hub_config c = {.gateway_id = "gw1",
                       .max_frames = 8,
                       .max_bytes = 1 << 20,
                       .headroom = 16,
                       .write_wait_ms = wait_ms};
    return mg_hub_create(&c);
}

static mg_hub_frame *pop_one(mg_hub *h, mg_hub_conn *c)
{
    bool more;
    int code;
    return mg_hub_pop(h, c, &more, &code, NULL, 0);
}

Test(hub, delivery_reported_after_the_write)
{
    mg_hub *h = make_waiting(5000);
    int dummy, result;
    mg_hub_conn *c = mg_hub_register(h, 0, "bob", &dummy);
    cr_assert_eq(deliver_reported(h, &result), 1, "queued to the one connection");
    cr_assert_eq(result, -1, "not reported before the write");
    cr_assert(mg_hub_waiting(h, 0));
    mg_hub_frame *f = pop_one(h, c);
    cr_assert_not_null(f);
    cr_assert_eq(result, -1, "taken is not written");
    mg_hub_frame_done(h, f, true);
    cr_assert_eq(result, 1, "written to the one connection");
    cr_assert_not(mg_hub_waiting(h, 0));
    mg_hub_unregister(h, c);
    mg_hub_free(h);
}

Test(hub, delivery_dropped_with_its_connection_counts_nothing)
{
    mg_hub *h = make_waiting(5000);
    int dummy, result;
    mg_hub_conn *c1 = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *c2 = mg_hub_register(h, 0, "bob", &dummy);
    cr_assert_eq(deliver_reported(h, &result), 2);
    mg_hub_frame_done(h, pop_one(h, c1), true);
    cr_assert_eq(result, -1, "still waiting for the second connection");
    mg_hub_unregister(h, c2); /* it goes before its frame was written */
    cr_assert_eq(result, 1, "only the written frame counts");
    mg_hub_unregister(h, c1);
    mg_hub_free(h);
}

Test(hub, slow_write_still_counts_a_live_connection)
{
    mg_hub *h = make_waiting(100);
    int dummy, result;
    mg_hub_conn *c = mg_hub_register(h, 0, "bob", &dummy);
    cr_assert_eq(deliver_reported(h, &result), 1);
    cr_assert(mg_hub_expire_waits(h, 0, mg_mono_ms()), "the wait is not over yet");
    cr_assert_eq(result, -1);
    cr_assert_not(mg_hub_expire_waits(h, 0, mg_mono_ms() + 150), "nobody wrote: the wait ended");
    cr_assert_eq(result, 1, "still queued on a live connection");
    mg_hub_frame *f = pop_one(h, c);
    mg_hub_frame_done(h, f, true); /* written later: reported once only */
    mg_hub_unregister(h, c);
    mg_hub_free(h);
}

Test(hub, stopping_reports_every_wait_and_later_ones_at_once)
{
    mg_hub *h = make_waiting(5000);
    int dummy, r1, r2;
    mg_hub_conn *c = mg_hub_register(h, 0, "bob", &dummy);
    cr_assert_eq(deliver_reported(h, &r1), 1);
    mg_hub_stop_waits(h);
    cr_assert_eq(r1, 1, "reported by the stop");
    cr_assert_eq(deliver_reported(h, &r2), 1);
    cr_assert_eq(r2, 1, "reported before mg_hub_deliver returned");
    mg_hub_unregister(h, c);
    mg_hub_free(h);
}

Test(hub, nobody_connected_is_never_reported)
{
    mg_hub *h = make_waiting(5000);
    int result;
    cr_assert_eq(deliver_reported(h, &result), 0);
    cr_assert_eq(result, -1);
    cr_assert_not(mg_hub_waiting(h, 0));
    mg_hub_free(h);
}

/* ---- shards: one per WebSocket service loop ---- */

static unsigned woken[4];
static void on_wake_shard(void *arg, unsigned shard)
{
    (void)arg;
    woken[shard]++;
}

static mg_hub *make_sharded(unsigned shards, int wait_ms)
{
    memset(woken, 0, sizeof(woken));
    mg_hub_config c = {.gateway_id = "gw-a",
                       .max_frames = 8,
                       .max_bytes = 1 << 20,
                       .headroom = 16,
                       .shards = shards,
                       .wake = on_wake_shard,
                       .write_wait_ms = wait_ms};
    return mg_hub_create(&c);
}

Test(hub, a_users_connections_on_several_shards_all_receive)
{
    mg_hub *h = make_sharded(4, 5000);
    int dummy, result;
    mg_hub_conn *a = mg_hub_register(h, 1, "bob", &dummy);
    mg_hub_conn *b = mg_hub_register(h, 3, "bob", &dummy);
    mg_hub_conn *c = mg_hub_register(h, 3, "carol", &dummy);
    cr_assert_eq(mg_hub_count(h), 3);
    /* the id names the shard (post and disconnect by id find it) */
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(a), "x", 1), 0);
    cr_assert_eq(mg_hub_post(h, mg_hub_conn_id(b), "y", 1), 0);
    cr_assert_eq(mg_hub_post(h, "gw-a-15", "z", 1), -ENOENT, "nobody has that id");
    cr_assert_eq(woken[1], 1);
    cr_assert_eq(woken[3], 1);
    cr_assert_eq(woken[0] + woken[2], 0, "only the owning loops are woken");
    free(pop_text(h, a, &(int){0}));
    free(pop_text(h, b, &(int){0}));
    /* one delivery: one report, after both shards' writes */
    cr_assert_eq(deliver_reported(h, &result), 2);
    mg_hub_frame *fa = pop_one(h, a), *fb = pop_one(h, b);
    cr_assert(fa && fb);
    cr_assert_eq(fa->len, fb->len);
    cr_assert_eq(memcmp(fa->data + 16, fb->data + 16, fa->len), 0, "the same frame on both");
    mg_hub_frame_done(h, fb, true);
    cr_assert_eq(result, -1, "shard 1 has not written yet");
    mg_hub_frame_done(h, fa, true);
    cr_assert_eq(result, 2, "written on both shards");
    cr_assert_not(mg_hub_waiting(h, 1));
    cr_assert_not(mg_hub_waiting(h, 3));
    /* a disconnect by user reaches every shard */
    cr_assert_eq(mg_hub_disconnect(h, "bob", NULL, 1012, "restart"), 2);
    char **ids;
    size_t n = mg_hub_conn_ids(h, &ids);
    cr_assert_eq(n, 3);
    mg_hub_ids_free(ids, n);
    mg_hub_unregister(h, a);
    mg_hub_unregister(h, b);
    mg_hub_unregister(h, c);
    cr_assert_eq(mg_hub_count(h), 0);
    mg_hub_free(h);
}

Test(hub, a_wait_ends_on_its_home_shard_and_drops_count_nothing)
{
    mg_hub *h = make_sharded(2, 100);
    int dummy, result;
    mg_hub_conn *a = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *b = mg_hub_register(h, 1, "bob", &dummy);
    cr_assert_eq(deliver_reported(h, &result), 2);
    cr_assert(mg_hub_waiting(h, 0), "homed on the first shard that took it");
    cr_assert_not(mg_hub_waiting(h, 1));
    mg_hub_unregister(h, b); /* dropped on shard 1 */
    cr_assert_eq(result, -1);
    cr_assert_not(mg_hub_expire_waits(h, 0, mg_mono_ms() + 150));
    cr_assert_eq(result, 1, "the live connection's queued frame counts, the dropped one not");
    mg_hub_unregister(h, a);
    mg_hub_free(h);
}

/* ---- one message to many users (a fan-out's local share) ---- */

typedef struct many_report {
    int calls;
    uint32_t counts[8];
    size_t n;
} many_report;

static void on_written_many(void *arg, const uint32_t *written, size_t n)
{
    many_report *r = arg;
    r->calls++;
    r->n = n;
    for (size_t i = 0; i < n && i < 8; i++)
        r->counts[i] = written[i];
}

Test(hub, many_users_one_report_with_a_count_per_user)
{
    mg_hub *h = make_sharded(2, 5000);
    int dummy;
    mg_hub_conn *b0 = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *b1 = mg_hub_register(h, 1, "bob", &dummy);
    mg_hub_conn *c1 = mg_hub_register(h, 1, "carol", &dummy);
    mg_hub_conn *d0 = mg_hub_register(h, 0, "dave", &dummy);
    mg_msg *m = msg("many-1", "ignored");
    const char *to[] = {"bob", "nobody", "carol", "", "dave"};
    uint32_t queued[5];
    many_report rep = {0};
    cr_assert_eq(mg_hub_deliver_many(h, m, to, 5, queued, on_written_many, &rep), 4);
    cr_assert_eq(queued[0], 2, "both of bob's connections, on two shards");
    cr_assert_eq(queued[1] + queued[3], 0, "an unknown user and an empty name take nothing");
    cr_assert_eq(queued[2], 1);
    cr_assert_eq(queued[4], 1);
    cr_assert_eq(woken[1], 1, "one wake-up per shard, not one per user");
    cr_assert_eq(woken[0], 2, "its frames, and the wait homed there (to arm its timer)");
    /* every connection gets the same text, which does not name the recipient */
    mg_hub_frame *f[4] = {pop_one(h, b0), pop_one(h, b1), pop_one(h, c1), pop_one(h, d0)};
    for (int i = 0; i < 4; i++) {
        cr_assert_not_null(f[i]);
        cr_assert_eq(f[i]->len, f[0]->len);
        cr_assert_eq(memcmp(f[i]->data + 16, f[0]->data + 16, f[0]->len), 0);
    }
    cr_assert_null(strstr((const char *)f[0]->data + 16, "ignored"));
    mg_hub_frame_done(h, f[0], true);
    mg_hub_frame_done(h, f[2], true);
    mg_hub_frame_done(h, f[3], false); /* dave's write failed */
    cr_assert_eq(rep.calls, 0, "bob's second connection has not written yet");
    mg_hub_frame_done(h, f[1], true);
    cr_assert_eq(rep.calls, 1, "one report for the whole delivery");
    cr_assert_eq(rep.n, 5);
    uint32_t want[5] = {2, 0, 1, 0, 0};
    for (int i = 0; i < 5; i++)
        cr_assert_eq(rep.counts[i], want[i], "user %d: %u written, not %u", i, want[i],
                     rep.counts[i]);
    cr_assert_not(mg_hub_waiting(h, 0));
    mg_msg_free(m);
    mg_hub_unregister(h, b0);
    mg_hub_unregister(h, b1);
    mg_hub_unregister(h, c1);
    mg_hub_unregister(h, d0);
    mg_hub_free(h);
}

Test(hub, many_users_wait_ends_counting_what_is_queued_on_live_connections)
{
    mg_hub *h = make_sharded(2, 100);
    int dummy;
    mg_hub_conn *a = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *b = mg_hub_register(h, 1, "carol", &dummy);
    mg_hub_conn *c = mg_hub_register(h, 1, "dave", &dummy);
    mg_msg *m = msg("many-2", "");
    const char *to[] = {"bob", "carol", "dave"};
    uint32_t queued[3];
    many_report rep = {0};
    cr_assert_eq(mg_hub_deliver_many(h, m, to, 3, queued, on_written_many, &rep), 3);
    mg_hub_frame_done(h, pop_one(h, a), true);
    mg_hub_unregister(h, c); /* dave leaves before his write */
    cr_assert_eq(rep.calls, 0);
    cr_assert_not(mg_hub_expire_waits(h, 0, mg_mono_ms() + 150), "the wait ended");
    cr_assert_eq(rep.calls, 1);
    cr_assert_eq(rep.counts[0], 1, "written");
    cr_assert_eq(rep.counts[1], 1, "still queued on a live connection");
    cr_assert_eq(rep.counts[2], 0, "dropped with its connection");
    mg_hub_frame_done(h, pop_one(h, b), true); /* written later: reported once only */
    cr_assert_eq(rep.calls, 1);
    /* nobody here: no report at all; not waiting: reported before the return */
    const char *none[] = {"nobody"};
    cr_assert_eq(mg_hub_deliver_many(h, m, none, 1, queued, on_written_many, &rep), 0);
    mg_hub_stop_waits(h);
    cr_assert_eq(mg_hub_deliver_many(h, m, to, 2, queued, on_written_many, &rep), 2);
    cr_assert_eq(rep.calls, 2, "reported at once after the stop");
    cr_assert_eq(rep.counts[0] + rep.counts[1], 2);
    cr_assert_eq(rep.calls, 2);
    mg_msg_free(m);
    mg_hub_unregister(h, a);
    mg_hub_unregister(h, b);
    mg_hub_free(h);
}

typedef struct shard_writer {
    mg_hub *h;
    mg_hub_conn *c;
    atomic_int *stop;
    int got;
} shard_writer;

/* A loop's thread: writes whatever its connection gets until told to stop. */
static void *shard_writer_main(void *arg)
{
    shard_writer *w = arg;
    while (!atomic_load(w->stop)) {
        mg_hub_frame *f = pop_one(w->h, w->c);
        if (f) {
            w->got++;
            mg_hub_frame_done(w->h, f, true);
        }
    }
    mg_hub_frame *f;
    while ((f = pop_one(w->h, w->c))) {
        w->got++;
        mg_hub_frame_done(w->h, f, true);
    }
    return NULL;
}

static atomic_int reports, reported_frames;
static void count_report(void *arg, uint32_t n)
{
    (void)arg;
    atomic_fetch_add(&reports, 1);
    atomic_fetch_add(&reported_frames, (int)n);
}

Test(hub, concurrent_writers_on_two_shards_report_each_delivery_once)
{
    mg_hub_config cfg = {.gateway_id = "gw",
                         .max_frames = 100000,
                         .max_bytes = 1 << 30,
                         .headroom = 16,
                         .shards = 2,
                         .write_wait_ms = 60000};
    mg_hub *h = mg_hub_create(&cfg);
    int dummy;
    atomic_int stop = 0;
    atomic_store(&reports, 0);
    atomic_store(&reported_frames, 0);
    shard_writer w[2] = {{h, mg_hub_register(h, 0, "bob", &dummy), &stop, 0},
                         {h, mg_hub_register(h, 1, "bob", &dummy), &stop, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, shard_writer_main, &w[i]);
    mg_msg *m = msg("m", "bob");
    for (int i = 0; i < 5000; i++)
        cr_assert_eq(mg_hub_deliver(h, m, NULL, false, count_report, NULL), 2);
    mg_msg_free(m);
    for (int spin = 0; spin < 1000 && atomic_load(&reports) < 5000; spin++)
        usleep(2000);
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(w[0].got, 5000);
    cr_assert_eq(w[1].got, 5000);
    cr_assert_eq(atomic_load(&reports), 5000, "each delivery reported once");
    cr_assert_eq(atomic_load(&reported_frames), 10000, "two written frames each");
    mg_hub_unregister(h, w[0].c);
    mg_hub_unregister(h, w[1].c);
    mg_hub_free(h);
}

/* ---- write spans -------------------------------------------------------------- */

static pthread_mutex_t otlp_mu = PTHREAD_MUTEX_INITIALIZER;
static json_t *otlp_spans; /* every span the collector was sent */

/* The OTLP endpoint: keeps the spans of each POST to /v1/traces. */
static char *otlp_collect(fake_http *f, const char *method, const char *path, const char *headers,
                          const char *body)
{
    (void)f;
    (void)headers;
    if (strcmp(method, "POST") || strcmp(path, "/v1/traces"))
        return fake_answer(404, NULL, "{}");
    json_t *doc = json_loads(body, 0, NULL);
    json_t *rs, *ss, *sp;
    size_t i, j, k;
    pthread_mutex_lock(&otlp_mu);
    json_array_foreach(json_object_get(doc, "resourceSpans"), i, rs)
        json_array_foreach(json_object_get(rs, "scopeSpans"), j, ss)
            json_array_foreach(json_object_get(ss, "spans"), k, sp)
                json_array_append(otlp_spans, sp);
    pthread_mutex_unlock(&otlp_mu);
    json_decref(doc);
    return fake_answer(200, NULL, "{}");
}

/* A span attribute's value as text ("" when absent). */
static const char *span_attr(json_t *span, const char *key, char *buf, size_t len)
{
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(span, "attributes"), i, a)
    {
        if (strcmp(json_string_value(json_object_get(a, "key")), key))
            continue;
        json_t *v = json_object_get(a, "value");
        json_t *sv = json_object_get(v, "stringValue"), *iv = json_object_get(v, "intValue");
        snprintf(buf, len, "%s", sv ? json_string_value(sv) : json_string_value(iv));
        return buf;
    }
    return "";
}

/* The exported span whose meshgate.connection.id is conn_id and whose
 * messaging.message.id is id, or NULL. */
static json_t *write_span_of(const char *conn_id, const char *id)
{
    size_t i;
    json_t *sp;
    char a[64], b[64];
    json_array_foreach(otlp_spans, i, sp)
    {
        if (!strcmp(span_attr(sp, "meshgate.connection.id", a, sizeof(a)), conn_id) &&
            !strcmp(span_attr(sp, "messaging.message.id", b, sizeof(b)), id))
            return sp;
    }
    return NULL;
}

/* The span id in a message frame's traceparent. */
static void frame_span_id(const char *frame, char out[17])
{
    json_t *j = json_loads(frame, 0, NULL);
    const char *tp = json_string_value(json_object_get(j, "traceparent"));
    cr_assert(tp && strlen(tp) == MG_TRACEPARENT_LEN, "a traced frame has a traceparent: %s",
              frame);
    memcpy(out, tp + 36, 16);
    out[16] = '\0';
    json_decref(j);
}

Test(hub, a_traced_message_gets_a_write_span_per_connection)
{
    otlp_spans = json_array();
    fake_http *col = fake_http_start(otlp_collect, NULL);
    char ep[64];
    snprintf(ep, sizeof(ep), "http://127.0.0.1:%d", col->port);
    mg_trace_config tc = {.endpoint = ep,
                          .sample_ratio = 1,
                          .service_name = "meshgate",
                          .instance_id = "gw1",
                          .region = "eu",
                          .slots = 64};
    cr_assert_eq(mg_trace_start(&tc), 0);
    mg_hub_config cfg = {
        .gateway_id = "gw1", .max_frames = 1, .max_bytes = 1 << 20, .headroom = 16, .shards = 2};
    mg_hub *h = mg_hub_create(&cfg);
    int dummy;
    /* bob's devices on both shards; carol's takes one frame at most */
    mg_hub_conn *w = mg_hub_register(h, 0, "bob", &dummy);
    mg_hub_conn *d = mg_hub_register(h, 1, "bob", &dummy);
    mg_hub_conn *s = mg_hub_register(h, 0, "carol", &dummy);
    char wid[64], did[64], sid[64];
    snprintf(wid, sizeof(wid), "%s", mg_hub_conn_id(w));
    snprintf(did, sizeof(did), "%s", mg_hub_conn_id(d));
    snprintf(sid, sizeof(sid), "%s", mg_hub_conn_id(s));

    mg_msg *m = msg("t1", "bob");
    cr_assert_eq(mg_traceparent_parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                                      MG_TRACEPARENT_LEN, &m->trace),
                 0);
    cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 2);
    int code;
    char *fw = pop_text(h, w, &code); /* written */
    mg_hub_unregister(h, d);          /* its frame dropped with the connection */
    /* carol: the first frame waits, the second overflows her queue: both dropped */
    mg_msg *m2 = msg("t2", "carol");
    m2->trace = m->trace;
    cr_assert_eq(mg_hub_deliver(h, m2, NULL, false, NULL, NULL), 1);
    cr_assert_eq(mg_hub_deliver(h, m2, NULL, false, NULL, NULL), 0);
    cr_assert(mg_hub_is_slow(h, sid));
    /* an untraced message: no span, no traceparent */
    mg_msg *m3 = msg("t3", "bob");
    cr_assert_eq(mg_hub_deliver(h, m3, NULL, false, NULL, NULL), 1);
    char *fu = pop_text(h, w, &code);
    cr_assert_null(strstr(fu, "traceparent"), "%s", fu);
    mg_trace_stop(2000); /* exports what ended */

    json_t *sw = write_span_of(wid, "t1"), *sd = write_span_of(did, "t1"),
           *ss = write_span_of(sid, "t2");
    cr_assert(sw && sd && ss, "a write span per connection: %zu spans",
              json_array_size(otlp_spans));
    cr_assert_eq(json_array_size(otlp_spans), 3, "one span per traced frame, none for untraced");
    char buf[64], fid[17];
    frame_span_id(fw, fid);
    cr_assert_str_eq(json_string_value(json_object_get(sw, "spanId")), fid,
                     "the frame names its own connection's span (the ack's parent)");
    cr_assert_str_neq(json_string_value(json_object_get(sd, "spanId")), fid);
    json_t *all[] = {sw, sd, ss};
    for (int i = 0; i < 3; i++) {
        cr_assert_str_eq(json_string_value(json_object_get(all[i], "name")), "ws write");
        cr_assert_str_eq(json_string_value(json_object_get(all[i], "traceId")),
                         "4bf92f3577b34da6a3ce929d0e0e4736");
        cr_assert_str_eq(json_string_value(json_object_get(all[i], "parentSpanId")),
                         "00f067aa0ba902b7", "a child of the delivery");
    }
    cr_assert_str_eq(span_attr(sw, "meshgate.status", buf, sizeof(buf)), "written");
    cr_assert_null(json_object_get(sw, "status"), "a written frame is no error");
    cr_assert_str_eq(span_attr(sd, "meshgate.status", buf, sizeof(buf)), "dropped");
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(sd, "status"), "message")),
                     "connection closed");
    cr_assert_str_eq(span_attr(ss, "meshgate.status", buf, sizeof(buf)), "dropped");
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(ss, "status"), "message")),
                     "slow consumer");
    free(fw);
    free(fu);
    mg_msg_free(m);
    mg_msg_free(m2);
    mg_msg_free(m3);
    mg_hub_unregister(h, w);
    mg_hub_unregister(h, s);
    mg_hub_free(h);
    fake_http_stop(col);
    json_decref(otlp_spans);
}

/* ---- an opening connection (mg_hub_register_opening / mg_hub_open) ---- */

/* The "id" of a message frame's text, or the frame's "type" otherwise. */
static char *frame_name(char *text)
{
    cr_assert_not_null(text);
    json_t *j = json_loads(text, 0, NULL);
    cr_assert_not_null(j, "not JSON: %s", text);
    const char *v = json_string_value(json_object_get(j, "id"));
    if (!v)
        v = json_string_value(json_object_get(j, "type"));
    char *name = strdup(v ? v : "?");
    json_decref(j);
    free(text);
    return name;
}

static void expect_next(mg_hub *h, mg_hub_conn *c, const char *want)
{
    int code;
    char *got = frame_name(pop_text(h, c, &code));
    cr_assert_str_eq(got, want);
    free(got);
}

static void deliver_id(mg_hub *h, const char *id, const char *conn_id, bool inbox)
{
    mg_msg *m = msg(id, "bob");
    cr_assert_eq(mg_hub_deliver(h, m, conn_id, inbox, NULL, NULL), 1, "%s queued", id);
    mg_msg_free(m);
}

Test(hub, an_opening_connection_gets_its_page_then_ready_then_the_live_messages)
{
    mg_hub *h = make(16, 1 << 20);
    int dummy, code;
    mg_hub_conn *c = mg_hub_register_opening(h, 0, "bob", &dummy);
    const char *id = mg_hub_conn_id(c);
    deliver_id(h, "live-1", NULL, false); /* raced the inbox fetch */
    deliver_id(h, "copy-1", NULL, true);  /* a stored message's live copy: held too */
    cr_assert_eq(mg_hub_post(h, id, "{\"type\":\"ack\"}", 14), 0);
    deliver_id(h, "page-1", id, true); /* the connect job's page */
    deliver_id(h, "page-2", id, true);
    deliver_id(h, "live-2", NULL, false);
    /* the ack and the page may go before the opening ends; nothing else */
    expect_next(h, c, "ack");
    expect_next(h, c, "page-1");
    expect_next(h, c, "page-2");
    cr_assert_null(pop_text(h, c, &code), "live messages wait for the opening");
    cr_assert_eq(mg_hub_open(h, id, "{\"type\":\"ready\"}", 16), 0);
    deliver_id(h, "live-3", NULL, false);
    expect_next(h, c, "ready");
    expect_next(h, c, "live-1");
    expect_next(h, c, "copy-1");
    expect_next(h, c, "live-2");
    expect_next(h, c, "live-3");
    cr_assert_null(pop_text(h, c, &code));
    mg_hub_unregister(h, c);
    mg_hub_free(h);
}

Test(hub, held_messages_count_in_the_bound_and_go_with_their_connection)
{
    mg_hub_config cfg = {.gateway_id = "gw1",
                         .max_frames = 3,
                         .max_bytes = 1 << 20,
                         .headroom = 16,
                         .write_wait_ms = 5000};
    mg_hub *h = mg_hub_create(&cfg);
    int dummy, r1, r2;
    mg_hub_conn *c = mg_hub_register_opening(h, 0, "bob", &dummy);
    mg_hub_conn *other = mg_hub_register(h, 0, "bob", &dummy);
    cr_assert_eq(deliver_reported(h, &r1), 2, "queued to both (held on the opening one)");
    mg_hub_frame_done(h, pop_one(h, other), true);
    cr_assert_eq(r1, -1, "the held frame is not written yet");
    mg_hub_unregister(h, c); /* gone before it opened */
    cr_assert_eq(r1, 1, "only the open connection's write counts");
    /* the bound counts held frames: the fourth overflows */
    c = mg_hub_register_opening(h, 0, "carol", &dummy);
    for (int i = 0; i < 3; i++) {
        mg_msg *m =
            mg_msg_new("x", "alice", "carol", (const uint8_t *)"x", 1, NULL, 1, MG_PRIO_HIGH);
        cr_assert_eq(mg_hub_deliver(h, m, NULL, false, NULL, NULL), 1);
        mg_msg_free(m);
    }
    cr_assert_eq(mg_hub_open(h, mg_hub_conn_id(c), "{}", 2), -ENOBUFS, "4 frames > 3");
    cr_assert(mg_hub_is_slow(h, mg_hub_conn_id(c)));
    cr_assert_eq(deliver_reported(h, &r2), 1, "bob's open connection only");
    mg_hub_frame_done(h, pop_one(h, other), true);
    cr_assert_eq(r2, 1);
    mg_hub_unregister(h, c);
    mg_hub_unregister(h, other);
    mg_hub_free(h);
}
