/* Unit tests of presence_cache.c: hits and lease answers, tickets that a
 * forget since makes stale, forgetting everyone, the size bound, offline
 * users. No Redis: the cache is plain memory. */
#include "store/presence_cache.h"

#include <criterion/criterion.h>
#include <string.h>

static int alive_all(void *arg, const char *gw)
{
    (void)arg;
    (void)gw;
    return 1;
}

/* "gw-dead": no lease; "gw-unknown": not known here; else alive. */
static int alive_some(void *arg, const char *gw)
{
    (void)arg;
    return !strcmp(gw, "gw-dead") ? 0 : !strcmp(gw, "gw-unknown") ? -1 : 1;
}

static void put(mg_pcache *c, const char *user, const mg_pcache_conn *conns, size_t n)
{
    mg_pcache_ticket t;
    mg_pcache_take_ticket(c, user, &t);
    mg_pcache_put(c, user, &t, conns, n);
}

Test(presence_cache, hit_copies_and_leases_filter)
{
    mg_pcache *c = mg_pcache_create(100);
    mg_presence_list l = {0};
    cr_assert_eq(mg_pcache_get(c, "alice", alive_all, NULL, &l), 0, "nothing kept yet");
    mg_pcache_conn conns[] = {{"c1", "gw-a", "eu", 10}, {"c2", "gw-dead", "eu", 20}};
    put(c, "alice", conns, 2);
    cr_assert_eq(mg_pcache_get(c, "alice", alive_some, NULL, &l), 1);
    cr_assert_eq(l.n, 1, "the dead gateway's entry is left out");
    cr_assert_str_eq(l.items[0].conn_id, "c1");
    cr_assert_str_eq(l.items[0].gateway_id, "gw-a");
    cr_assert_str_eq(l.items[0].region, "eu");
    cr_assert_eq(l.items[0].connected_at_ms, 10);
    mg_presence_list_clear(&l);

    mg_pcache_conn unknown[] = {{"c3", "gw-a", "eu", 1}, {"c4", "gw-unknown", "us", 2}};
    put(c, "bob", unknown, 2);
    cr_assert_eq(mg_pcache_get(c, "bob", alive_some, NULL, &l), 0,
                 "a gateway whose lease is not known here: the store is asked");
    cr_assert_eq(l.n, 0, "a partial answer is undone");
    cr_assert_null(l.items, "and its room freed");

    put(c, "carol", NULL, 0); /* offline, as read */
    cr_assert_eq(mg_pcache_get(c, "carol", alive_all, NULL, &l), 1);
    cr_assert_eq(l.n, 0);
    mg_pcache_stats st;
    mg_pcache_stats_get(c, &st);
    cr_assert_eq(st.hits, 2);
    cr_assert_eq(st.misses, 2);
    cr_assert_eq(st.users, 3);
    mg_presence_list_clear(&l);
    free(l.items);
    mg_pcache_free(c);
}

Test(presence_cache, a_read_older_than_a_forget_is_not_kept)
{
    mg_pcache *c = mg_pcache_create(100);
    mg_pcache_conn old[] = {{"c1", "gw-a", "eu", 1}};
    mg_pcache_ticket t;
    mg_pcache_take_ticket(c, "alice", &t); /* the read starts */
    mg_pcache_forget(c, "alice", 5);       /* a change is reported meanwhile */
    mg_pcache_put(c, "alice", &t, old, 1); /* the read's (older) answer */
    mg_presence_list l = {0};
    cr_assert_eq(mg_pcache_get(c, "alice", alive_all, NULL, &l), 0);

    put(c, "alice", old, 1);
    cr_assert_eq(mg_pcache_get(c, "alice", alive_all, NULL, &l), 1);
    mg_presence_list_clear(&l);
    mg_pcache_forget(c, "alice-and-more", 5); /* not NUL-terminated: "alice" */
    cr_assert_eq(mg_pcache_get(c, "alice", alive_all, NULL, &l), 0);

    put(c, "alice", old, 1);
    put(c, "bob", old, 1);
    mg_pcache_take_ticket(c, "carol", &t);
    mg_pcache_forget(c, NULL, 0); /* everyone */
    mg_pcache_put(c, "carol", &t, old, 1);
    cr_assert_eq(mg_pcache_get(c, "alice", alive_all, NULL, &l), 0);
    cr_assert_eq(mg_pcache_get(c, "bob", alive_all, NULL, &l), 0);
    cr_assert_eq(mg_pcache_get(c, "carol", alive_all, NULL, &l), 0, "its read began before");
    free(l.items);
    mg_pcache_free(c);
}

Test(presence_cache, bounded)
{
    mg_pcache *c = mg_pcache_create(2);
    mg_pcache_conn one[] = {{"c1", "gw-a", "eu", 1}};
    put(c, "u1", one, 1);
    put(c, "u2", one, 1);
    put(c, "u3", one, 1); /* over the bound: the rest go */
    mg_pcache_stats st;
    mg_pcache_stats_get(c, &st);
    cr_assert_eq(st.users, 1);
    mg_presence_list l = {0};
    cr_assert_eq(mg_pcache_get(c, "u3", alive_all, NULL, &l), 1);
    cr_assert_eq(mg_pcache_get(c, "u1", alive_all, NULL, &l), 0);
    mg_presence_list_clear(&l);
    free(l.items);
    mg_pcache_free(c);
}
