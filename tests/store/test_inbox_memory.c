/* Tests of inbox_memory.c's overall bounds (--inbox-memory-bytes,
 * --inbox-memory-users): the inbox fills to the bound, refuses beyond it
 * with -ENOSPC (counted), never evicts what it stored for a newcomer, and
 * acks and the per-user cap give the room back; through the router the
 * refusal is FAILED "offline inbox full". */
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "store/inbox.h"
#include "store/presence.h"
#include "router/router.h"
#include "support/mg_wait.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static char content[1000];

static mg_msg *msg(const char *id, const char *to)
{
    return mg_msg_new(id, "alice", to, (const uint8_t *)content, sizeof(content), "text/plain",
                      mg_now_ms(), MG_PRIO_HIGH);
}

static int store(mg_inbox *ib, const char *id, const char *to)
{
    mg_msg *m = msg(id, to);
    int rc = ib->ops->store(ib, m);
    mg_msg_free(m);
    return rc;
}

static int64_t full_count(void)
{
    return mg_metric_value(mg_counter("meshgate_inbox_full_total", "", "store=\"memory\""));
}

static void fini(void)
{
    mg_metrics_shutdown();
}

TestSuite(inbox_memory, .fini = fini);

Test(inbox_memory, fills_to_the_byte_bound_refuses_and_acks_free_room)
{
    /* about 1.1 KB a message: 10 fit in 12,000 bytes, the 11th does not */
    mg_inbox *ib = mg_inbox_memory_create_bounded(1000, 3600, 12000, 0);
    char id[16], user[16];
    int stored = 0;
    for (int i = 0; i < 100; i++) {
        snprintf(id, sizeof(id), "m%d", i);
        snprintf(user, sizeof(user), "u%d", i % 3);
        int rc = store(ib, id, user);
        if (rc == -ENOSPC)
            break;
        cr_assert_eq(rc, 0, "store %s", id);
        stored++;
    }
    cr_assert(stored >= 9 && stored <= 10, "stored %d before the bound", stored);
    cr_assert_eq(full_count(), 1);
    /* refused again, for a known user and for a new one; nothing was evicted */
    cr_assert_eq(store(ib, "late", "u0"), -ENOSPC);
    cr_assert_eq(store(ib, "late", "newcomer"), -ENOSPC);
    cr_assert_eq(full_count(), 3);
    mg_msg **items = NULL;
    size_t n = 0;
    cr_assert_eq(ib->ops->fetch(ib, "u0", 1000, &items, &n), 0);
    cr_assert_eq(n, (size_t)(stored + 2) / 3);
    cr_assert_str_eq(items[0]->id, "m0");
    /* a duplicate of a stored id is still answered (idempotent) */
    cr_assert_eq(store(ib, "m0", "u0"), 0);
    /* acks give the room back */
    cr_assert_eq(ib->ops->ack(ib, "u0", items[0]->id), 0);
    cr_assert_eq(ib->ops->ack(ib, "u0", items[1]->id), 0);
    mg_inbox_items_free(items, n);
    cr_assert_eq(store(ib, "late", "newcomer"), 0);
    mg_inbox_free(ib);
}

Test(inbox_memory, a_full_box_makes_room_by_its_own_oldest)
{
    /* per-user cap 2: the third message replaces the first within the byte bound */
    mg_inbox *ib = mg_inbox_memory_create_bounded(2, 3600, 2600, 0);
    cr_assert_eq(store(ib, "a", "bob"), 0);
    cr_assert_eq(store(ib, "b", "bob"), 0);
    cr_assert_eq(store(ib, "x", "carol"), -ENOSPC);
    cr_assert_eq(store(ib, "c", "bob"), 0);
    mg_msg **items = NULL;
    size_t n = 0;
    cr_assert_eq(ib->ops->fetch(ib, "bob", 10, &items, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(items[0]->id, "b");
    cr_assert_str_eq(items[1]->id, "c");
    mg_inbox_items_free(items, n);
    mg_inbox_free(ib);
}

Test(inbox_memory, bounds_the_users_with_messages)
{
    mg_inbox *ib = mg_inbox_memory_create_bounded(10, 3600, 0, 2);
    cr_assert_eq(store(ib, "a", "u1"), 0);
    cr_assert_eq(store(ib, "b", "u2"), 0);
    cr_assert_eq(store(ib, "c", "u2"), 0); /* a known user still fits */
    cr_assert_eq(store(ib, "d", "u3"), -ENOSPC);
    cr_assert_eq(full_count(), 1);
    cr_assert_eq(ib->ops->ack(ib, "u1", "a"), 0); /* u1's box goes: a user's room */
    cr_assert_eq(store(ib, "d", "u3"), 0);
    mg_inbox_free(ib);
}

static int sink_deliver(void *arg, const mg_msg *m, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    return 0; /* nobody online */
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    return 0;
}

Test(inbox_memory, the_router_answers_failed_offline_inbox_full)
{
    mg_router_config cfg = {"gw-a", "eu", 10, 3, 128, 1024, 0, NULL, 0};
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    mg_router *r = mg_router_create(&cfg, mg_presence_memory_create("gw-a", "eu"),
                                    mg_inbox_memory_create_bounded(100, 3600, 0, 1), &sink, NULL);
    mg_send_result res;
    mg_msg *m = msg("m1", "bob");
    cr_assert_eq(mg_wait_send(r, m, mg_mono_ms() + 5000, &res), 0);
    cr_assert_eq(res.status, MG_STATUS_STORED);
    mg_msg_free(m);
    m = msg("m2", "carol");
    cr_assert_eq(mg_wait_send(r, m, mg_mono_ms() + 5000, &res), 0);
    cr_assert_eq(res.status, MG_STATUS_FAILED);
    cr_assert_str_eq(res.reason, "offline inbox full");
    mg_msg_free(m);
    mg_router_free(r);
}
