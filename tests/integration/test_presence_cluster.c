/* The gateway with --presence redis-cluster against the real Redis Cluster:
 * a WebSocket user shows up in presence; when the gateway is SIGKILLed (no
 * cleanup at all) the user disappears from lookups within the lease (2 s
 * here) and the user's key leaves Redis on its own; a SIGTERMed gateway
 * removes its entries at once. Presence is read with the same store
 * (presence_redis.c) from the test process, as another gateway would. */
#include "common/mg_time.h"
#include "store/redis_store.h"
#include "support/mg_test.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* A WebSocket connection as user (handshake only; held open). */
static int ws_open(int port, const char *user)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    char req[512];
    int n = snprintf(req, sizeof(req),
                     "GET /ws?user=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     user, port);
    cr_assert_eq(write(fd, req, (size_t)n), n);
    char resp[2048];
    size_t got = 0;
    while (got < sizeof(resp) - 1) {
        ssize_t r = read(fd, resp + got, sizeof(resp) - 1 - got);
        cr_assert_gt(r, 0, "no handshake answer");
        got += (size_t)r;
        resp[got] = '\0';
        if (strstr(resp, "\r\n\r\n"))
            break;
    }
    cr_assert(strncmp(resp, "HTTP/1.1 101", 12) == 0, "handshake: %s", resp);
    return fd;
}

static mg_redis_cluster *rc;
static mg_presence *reader;

static size_t conns_on(const char *user, const char *gwid)
{
    mg_presence_list l = {0};
    cr_assert_eq(reader->ops->lookup(reader, user, &l), 0);
    size_t n = 0;
    for (size_t i = 0; i < l.n; i++)
        n += strcmp(l.items[i].gateway_id, gwid) == 0;
    mg_presence_list_clear(&l);
    return n;
}

/* ws_open as user on gw, once presence (read as another gateway would)
 * shows the connection on gw: within 5 s. */
static int ws_open_seen(const mg_gw *gw, const char *user)
{
    int fd = ws_open(gw->ws_port, user);
    int64_t t0 = mg_mono_ms();
    while (conns_on(user, gw->name) == 0 && mg_mono_ms() - t0 < 5000)
        usleep(50000);
    cr_assert_eq(conns_on(user, gw->name), 1, "user never appeared in presence");
    return fd;
}

static void setup(void)
{
    char err[512];
    rc = mg_redis_cluster_create(mg_test_require_env("MESHGATE_TEST_REDIS_NODES"), NULL, NULL, 2000,
                                 err, sizeof(err));
    cr_assert_not_null(rc, "%s", err);
    char id[64];
    snprintf(id, sizeof(id), "test-reader-%d", (int)getpid());
    reader = mg_presence_redis_create(rc, id, "eu", 30);
    cr_assert_not_null(reader);
}

static void teardown(void)
{
    if (reader)
        reader->ops->remove_gateway(reader);
    mg_presence_free(reader);
    mg_redis_cluster_free(rc);
}

Test(presence_cluster, sigkilled_gateway_vanishes_within_lease, .init = setup, .fini = teardown,
     .timeout = 90)
{
    char gwid[64], user[64];
    snprintf(gwid, sizeof(gwid), "pc-kill-%d", (int)getpid());
    snprintf(user, sizeof(user), "pcuser-%d", (int)getpid());
    const char *args[] = {"--presence",
                          "redis-cluster",
                          "--redis-nodes",
                          mg_test_require_env("MESHGATE_TEST_REDIS_NODES"),
                          "--presence-lease-seconds",
                          "2",
                          "--region",
                          "eu",
                          NULL};
    mg_gw *gw = mg_gw_spawn(gwid, args);
    cr_assert_not_null(gw);
    int fd = ws_open_seen(gw, user);
    usleep(1500000); /* a few lease renewals go by: the user stays */
    cr_assert_eq(conns_on(user, gwid), 1, "user dropped while the gateway lives");

    mg_gw_kill(gw, SIGKILL);
    int64_t killed = mg_mono_ms();
    cr_assert(mg_gw_wait(gw, 5000));
    int64_t gone = -1;
    while (mg_mono_ms() - killed < 6000) {
        if (conns_on(user, gwid) == 0) {
            gone = mg_mono_ms() - killed;
            break;
        }
        usleep(50000);
    }
    cr_log_info("SIGKILLed gateway's user gone from lookups after %lld ms (lease 2000 ms)",
                (long long)gone);
    cr_assert_geq(gone, 0, "user still present 6 s after SIGKILL (lease 2 s)");
    cr_assert_leq(gone, 2000 + 150, "user present %lld ms after SIGKILL (lease 2000 ms)",
                  (long long)gone);
    close(fd);
    mg_gw_free(gw);
}

Test(presence_cluster, sigterm_removes_entries_at_once, .init = setup, .fini = teardown,
     .timeout = 90)
{
    char gwid[64], user[64];
    snprintf(gwid, sizeof(gwid), "pc-term-%d", (int)getpid());
    snprintf(user, sizeof(user), "pcterm-%d", (int)getpid());
    const char *args[] = {"--presence", "redis-cluster", "--redis-nodes",
                          mg_test_require_env("MESHGATE_TEST_REDIS_NODES"), NULL};
    mg_gw *gw = mg_gw_spawn(gwid, args);
    cr_assert_not_null(gw);
    int fd = ws_open_seen(gw, user);
    cr_assert_eq(mg_gw_stop(gw), 0, "gateway did not exit cleanly");
    /* lease is 30 s: only remove_gateway can explain an immediate absence */
    cr_assert_eq(conns_on(user, gwid), 0);
    char key[128];
    snprintf(key, sizeof(key), "mg:gw:{%s}", gwid);
    redisReply *r = NULL;
    cr_assert_eq(mg_redis_cluster_command(rc, &r, key, "EXISTS %s", key), 0);
    cr_assert_eq(r->integer, 0, "lease key left behind");
    freeReplyObject(r);
    close(fd);
    mg_gw_free(gw);
}

Test(presence_cluster, redis_unreachable_at_start_exits_with_clear_error, .timeout = 60)
{
    char nodes[64];
    snprintf(nodes, sizeof(nodes), "127.0.0.1:%d", mg_test_free_port());
    const char *args[] = {"--presence", "redis-cluster", "--redis-nodes", nodes, NULL};
    mg_gw *gw = mg_gw_spawn_nowait("pc-noredis", args);
    cr_assert_not_null(gw);
    cr_assert(mg_gw_wait(gw, 20000), "gateway kept running without Redis");
    cr_assert_neq(gw->exit_status, 0);
    cr_assert(mg_gw_log_contains(gw, "no Redis Cluster node reachable"), "see %s", gw->log_path);
    cr_assert(mg_gw_log_contains(gw, nodes), "the log must name the node tried");
    mg_gw_free(gw);
}
