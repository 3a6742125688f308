/* test_discovery_util.h: helpers shared by the discovery integration tests
 * (test_discovery*.c): gateways started with --discovery consul, their peer
 * tables read through GET /peers, Consul read through its HTTP API, and a
 * private `consul agent -dev` for tests that must restart or reconfigure it.
 */
#ifndef MG_TEST_DISCOVERY_UTIL_H
#define MG_TEST_DISCOVERY_UTIL_H

#include "common/mg_time.h"
#include "discovery/consul_internal.h"
#include "support/mg_test.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* A service name of our own, so that gateways of other tests sharing the
 * agent never show up in our tables. */
static inline const char *dt_service(void)
{
    static char name[64];
    if (!name[0])
        snprintf(name, sizeof(name), "meshgate-dt%d", (int)getpid());
    return name;
}

/* Starts gateway `id` in region r1 against Consul at `consul`, plus extra args. */
static inline mg_gw *dt_spawn(const char *id, const char *consul, const char *const *extra)
{
    const char *args[40] = {"--discovery",
                            "consul",
                            "--consul-addr",
                            consul,
                            "--consul-service",
                            dt_service(),
                            "--region",
                            "r1",
                            "--consul-check-interval-seconds",
                            "1"};
    int n = 10;
    for (int i = 0; extra && extra[i] && n < 38; i++)
        args[n++] = extra[i];
    args[n] = NULL;
    return mg_gw_spawn(id, args);
}

/* The /peers JSON of gw, or NULL. */
static inline json_t *dt_peers(const mg_gw *gw)
{
    char *body = NULL;
    int st = mg_http_get(gw->ws_port, "/peers", &body);
    json_t *j = st == 200 && body ? json_loads(body, 0, NULL) : NULL;
    free(body);
    return j;
}

/* The entry for peer id in gw's table (a new reference), or NULL. */
static inline json_t *dt_peer(const mg_gw *gw, const char *id)
{
    json_t *j = dt_peers(gw), *found = NULL;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(j, "peers"), i, e)
    {
        if (json_is_string(json_object_get(e, "id")) &&
            strcmp(json_string_value(json_object_get(e, "id")), id) == 0) {
            found = json_incref(e);
            break;
        }
    }
    json_decref(j);
    return found;
}

static inline bool dt_has_peer(const mg_gw *gw, const char *id)
{
    json_t *e = dt_peer(gw, id);
    json_decref(e);
    return e != NULL;
}

/* Polls until gw's table has (want=true) or lacks (want=false) id; returns
 * the milliseconds it took, or -1 after timeout_ms. */
static inline int64_t dt_wait_peer(const mg_gw *gw, const char *id, bool want, int timeout_ms)
{
    int64_t t0 = mg_mono_ms();
    while (mg_mono_ms() - t0 < timeout_ms) {
        if (dt_has_peer(gw, id) == want)
            return mg_mono_ms() - t0;
        usleep(50000);
    }
    return -1;
}

/* GET on a Consul agent; returns the HTTP status (0 when unreachable) and
 * the parsed JSON body (or NULL) in *out when out is not NULL. */
static inline long dt_consul_get(const char *consul, const char *token, const char *path,
                                 json_t **out)
{
    mg_consul_http h;
    if (mg_consul__http_init(&h, consul, token, NULL) != 0)
        return 0;
    mg_consul_resp r;
    mg_consul__request(&h, "GET", path, NULL, 5000, &r);
    if (out)
        *out = r.status ? json_loadb(r.body, r.len, JSON_DECODE_ANY, NULL) : NULL;
    long st = r.status;
    mg_consul__resp_free(&r);
    mg_consul__http_cleanup(&h);
    return st;
}

static inline long dt_consul_put(const char *consul, const char *token, const char *path,
                                 const char *body)
{
    mg_consul_http h;
    if (mg_consul__http_init(&h, consul, token, NULL) != 0)
        return 0;
    mg_consul_resp r;
    mg_consul__request(&h, "PUT", path, body, 5000, &r);
    long st = r.status;
    mg_consul__resp_free(&r);
    mg_consul__http_cleanup(&h);
    return st;
}

/* Whether the agent knows service id (any health). */
static inline bool dt_consul_has(const char *consul, const char *id)
{
    char path[256];
    snprintf(path, sizeof(path), "/v1/agent/service/%s", id);
    return dt_consul_get(consul, NULL, path, NULL) == 200;
}

/* ---- a private Consul dev agent (real Consul, own ports and data) ---- */

typedef struct dt_agent {
    pid_t pid;
    int http, grpc, lan, wan, server;
    char addr[64];
    char dir[256];
    char log[300];
    char extra_config[300]; /* "" or a config file */
} dt_agent;

static inline const char *dt_consul_bin(void)
{
    static char path[512];
    const char *cache = getenv("MESHGATE_CACHE");
    if (cache && *cache)
        snprintf(path, sizeof(path), "%s/bin/consul", cache);
    else
        snprintf(path, sizeof(path), "%s/.cache/meshgate/bin/consul",
                 getenv("HOME") ? getenv("HOME") : "/root");
    return path;
}

static inline bool dt_agent_ready(const dt_agent *a)
{
    json_t *j = NULL;
    long st = dt_consul_get(a->addr, NULL, "/v1/status/leader", &j);
    bool ok = st == 200 && json_is_string(j) && json_string_length(j) > 0;
    json_decref(j);
    return ok;
}

/* Starts (or restarts, same ports, fresh state) the agent; fails the test
 * when it has no leader within 30 s. */
static inline void dt_agent_start(dt_agent *a)
{
    if (!a->http) {
        a->http = mg_test_free_port();
        a->grpc = mg_test_free_port();
        a->lan = mg_test_free_port();
        a->wan = mg_test_free_port();
        a->server = mg_test_free_port();
        snprintf(a->addr, sizeof(a->addr), "127.0.0.1:%d", a->http);
        const char *run = getenv("MESHGATE_RUN");
        snprintf(a->dir, sizeof(a->dir), "%s/consul-dt%d-%d",
                 run && *run ? run : "/tmp/meshgate-run", (int)getpid(), a->http);
        snprintf(a->log, sizeof(a->log), "%s.log", a->dir);
    }
    if (access(dt_consul_bin(), X_OK) != 0)
        cr_assert_fail("no Consul binary at %s: run tests/infra/consul.sh build", dt_consul_bin());
    char ports[5][16];
    snprintf(ports[0], 16, "%d", a->http);
    snprintf(ports[1], 16, "%d", a->grpc);
    snprintf(ports[2], 16, "%d", a->lan);
    snprintf(ports[3], 16, "%d", a->wan);
    snprintf(ports[4], 16, "%d", a->server);
    char data[300];
    snprintf(data, sizeof(data), "%s/data", a->dir);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s' && mkdir -p '%s'", a->dir, data);
    if (system(cmd) != 0)
        cr_assert_fail("cannot prepare %s", a->dir);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(a->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a failed test */
        const char *argv[40] = {dt_consul_bin(),
                                "agent",
                                "-dev",
                                "-node",
                                "meshgate-dt",
                                "-bind",
                                "127.0.0.1",
                                "-client",
                                "127.0.0.1",
                                "-data-dir",
                                data,
                                "-http-port",
                                ports[0],
                                "-grpc-port",
                                ports[1],
                                "-grpc-tls-port",
                                "-1",
                                "-dns-port",
                                "-1",
                                "-serf-lan-port",
                                ports[2],
                                "-serf-wan-port",
                                ports[3],
                                "-server-port",
                                ports[4],
                                "-log-level",
                                "warn"};
        int n = 27;
        if (a->extra_config[0]) {
            argv[n++] = "-config-file";
            argv[n++] = a->extra_config;
        }
        argv[n] = NULL;
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    a->pid = pid;
    int64_t end = mg_mono_ms() + 30000;
    while (!dt_agent_ready(a)) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            cr_assert_fail("consul agent exited during start-up (log: %s)", a->log);
        if (mg_mono_ms() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            a->pid = 0;
            cr_assert_fail("consul agent has no leader within 30 s (log: %s)", a->log);
        }
        usleep(100000);
    }
}

static inline void dt_agent_kill(dt_agent *a, int sig)
{
    if (a->pid <= 0)
        return;
    kill(a->pid, sig);
    int64_t end = mg_mono_ms() + 15000;
    int st;
    while (waitpid(a->pid, &st, WNOHANG) != a->pid) {
        if (mg_mono_ms() > end) {
            kill(a->pid, SIGKILL);
            waitpid(a->pid, &st, 0);
            break;
        }
        usleep(50000);
    }
    a->pid = 0;
}

static inline void dt_agent_stop(dt_agent *a)
{
    dt_agent_kill(a, SIGTERM);
    if (a->dir[0]) {
        char cmd[600];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s' '%s'", a->dir, a->log);
        if (system(cmd) != 0)
            fprintf(stderr, "cannot remove %s\n", a->dir);
    }
}

#endif
