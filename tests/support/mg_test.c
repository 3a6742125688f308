/* mg_test.c: service addresses, ports and gateway processes for tests
 * (see mg_test.h). */
#include "support/mg_test.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *run_dir(void)
{
    const char *d = getenv("MESHGATE_RUN");
    return d && *d ? d : "/tmp/meshgate-run";
}

const char *mg_test_env(const char *name)
{
    const char *v = getenv(name);
    if (v && *v)
        return v;
    char path[512];
    snprintf(path, sizeof(path), "%s/services.env", run_dir());
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    char line[1024];
    size_t nl = strlen(name);
    const char *found = NULL;
    while (fgets(line, sizeof(line), f)) {
        char *p = line;
        if (!strncmp(p, "export ", 7))
            p += 7;
        if (!strncmp(p, name, nl) && p[nl] == '=') {
            p += nl + 1;
            p[strcspn(p, "\r\n")] = '\0';
            if (*p == '"' || *p == '\'') {
                p++;
                p[strlen(p) ? strlen(p) - 1 : 0] = '\0';
            }
            setenv(name, p, 1); /* cached for the rest of the run */
            found = getenv(name);
            break;
        }
    }
    fclose(f);
    return found;
}

const char *mg_test_require_env(const char *name)
{
    const char *v = mg_test_env(name);
    if (!v)
        cr_assert_fail("%s is not set: start the test services with tests/infra/services.sh up "
                       "(make test does this)",
                       name);
    return v;
}

/* Listening ports for tests come from below the kernel's ephemeral range
 * (32768-60999 by default): a port picked by binding port 0 is an ephemeral
 * one, and any outgoing connection (a Redis, Kafka or gRPC client) may take
 * it between our check and the gateway's bind. */
#define TEST_PORT_LO 20000
#define TEST_PORT_HI 32000

int mg_test_free_port(void)
{
    static __thread unsigned seed;
    if (!seed)
        seed = (unsigned)getpid() * 2654435761u ^ (unsigned)time(NULL);
    for (int tries = 0; tries < 2000; tries++) {
        int port = TEST_PORT_LO + (int)(rand_r(&seed) % (TEST_PORT_HI - TEST_PORT_LO));
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
        if (fd >= 0)
            close(fd);
        if (ok)
            return port;
    }
    cr_assert_fail("cannot find a free port in %d-%d", TEST_PORT_LO, TEST_PORT_HI);
    return -1;
}

int mg_http_get(int port, const char *path, char **body)
{
    if (body)
        *body = NULL;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        close(fd);
        return -1;
    }
    char req[512];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t cap = 8192, len = 0;
    char *buf = malloc(cap);
    ssize_t r;
    while ((r = read(fd, buf + len, cap - len - 1)) > 0) {
        len += (size_t)r;
        if (cap - len < 1024)
            buf = realloc(buf, cap *= 2);
    }
    close(fd);
    buf[len] = '\0';
    int status = -1;
    if (sscanf(buf, "HTTP/%*d.%*d %d", &status) != 1)
        status = -1;
    if (body) {
        char *b = strstr(buf, "\r\n\r\n");
        *body = strdup(b ? b + 4 : "");
    }
    free(buf);
    return status;
}

bool mg_wait_until(bool (*cond)(void *arg), void *arg, int timeout_ms)
{
    for (int waited = 0;; waited += 20) {
        if (cond(arg))
            return true;
        if (waited >= timeout_ms)
            return false;
        usleep(20 * 1000);
    }
}

static bool has_flag(const char *const *args, const char *flag)
{
    for (size_t i = 0; args && args[i]; i++)
        if (!strcmp(args[i], flag) ||
            (!strncmp(args[i], flag, strlen(flag)) && args[i][strlen(flag)] == '='))
            return true;
    return false;
}

static const char *flag_value(const char *const *args, const char *flag)
{
    for (size_t i = 0; args && args[i]; i++) {
        if (!strcmp(args[i], flag) && args[i + 1])
            return args[i + 1];
        size_t fl = strlen(flag);
        if (!strncmp(args[i], flag, fl) && args[i][fl] == '=')
            return args[i] + fl + 1;
    }
    return NULL;
}

static void print_log_tail(const mg_gw *gw)
{
    FILE *f = fopen(gw->log_path, "r");
    if (!f)
        return;
    char line[1024];
    fprintf(stderr, "---- %s log (%s) ----\n", gw->name, gw->log_path);
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fprintf(stderr, "---- end of %s log ----\n", gw->name);
    fclose(f);
}

mg_gw *mg_gw_spawn_nowait(const char *name, const char *const *extra)
{
    mg_gw *gw = calloc(1, sizeof(*gw));
    snprintf(gw->name, sizeof(gw->name), "%s", name);
    char logdir[300];
    snprintf(logdir, sizeof(logdir), "%s/logs", run_dir());
    mkdir(run_dir(), 0755);
    mkdir(logdir, 0755);
    snprintf(gw->log_path, sizeof(gw->log_path), "%s/%s-%d.log", logdir, name, (int)getpid());

    const char *ws = flag_value(extra, "--ws-listen"), *grpc = flag_value(extra, "--grpc-listen");
    gw->ws_port = ws ? atoi(strrchr(ws, ':') + 1) : mg_test_free_port();
    gw->grpc_port = grpc ? atoi(strrchr(grpc, ':') + 1) : mg_test_free_port();
    snprintf(gw->ws_addr, sizeof(gw->ws_addr), "127.0.0.1:%d", gw->ws_port);
    snprintf(gw->grpc_addr, sizeof(gw->grpc_addr), "127.0.0.1:%d", gw->grpc_port);

    const char *argv[128];
    size_t n = 0;
    argv[n++] = MG_BUILD_DIR "/meshgate";
    argv[n++] = "--id";
    argv[n++] = name;
    if (!ws) {
        argv[n++] = "--ws-listen";
        argv[n++] = gw->ws_addr;
    }
    if (!grpc) {
        argv[n++] = "--grpc-listen";
        argv[n++] = gw->grpc_addr;
    }
    if (!has_flag(extra, "--drain-seconds")) {
        argv[n++] = "--drain-seconds";
        argv[n++] = "1";
    }
    /* the suite runs once per build with a loop count of its own (scripts/test.sh) */
    const char *loops = getenv("MESHGATE_TEST_WS_THREADS");
    if (loops && loops[0] && !has_flag(extra, "--ws-threads")) {
        argv[n++] = "--ws-threads";
        argv[n++] = loops;
    }
    for (size_t i = 0; extra && extra[i] && n < 126; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;

    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(gw->log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a crashed test leaves no orphan gateway */
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    gw->pid = pid;
    return gw;
}

static bool gw_ready(void *arg)
{
    mg_gw *gw = arg;
    if (mg_gw_wait(gw, 0))
        return true; /* exited: stop waiting */
    return mg_http_get(gw->ws_port, "/readyz", NULL) == 200;
}

mg_gw *mg_gw_spawn(const char *name, const char *const *extra)
{
    bool own_ports = !flag_value(extra, "--ws-listen") && !flag_value(extra, "--grpc-listen");
    for (int attempt = 1;; attempt++) {
        mg_gw *gw = mg_gw_spawn_nowait(name, extra);
        if (mg_wait_until(gw_ready, gw, 20000) && !gw->exited)
            return gw;
        /* Another process took a port we picked between our check and the
         * gateway's bind: pick others (our ports only, a few times). */
        bool port_taken = gw->exited && (mg_gw_log_contains(gw, "Address already in use") ||
                                         mg_gw_log_contains(gw, "ERROR on binding"));
        if (own_ports && port_taken && attempt < 4) {
            fprintf(stderr, "gateway %s: a picked port was taken, retrying\n", name);
            free(gw);
            continue;
        }
        fprintf(stderr, "gateway %s did not become ready\n", name);
        print_log_tail(gw);
        mg_gw_free(gw);
        return NULL;
    }
}

mg_gw *mg_gw_spawn_fleet_kafka(const char *name, const char *svc, const char *region,
                               const char *topic_prefix, const char *const *extra)
{
    const char *args[64] = {"--presence",
                            "redis-cluster",
                            "--redis-nodes",
                            mg_test_require_env("MESHGATE_TEST_REDIS_NODES"),
                            "--discovery",
                            "consul",
                            "--consul-addr",
                            mg_test_require_env("MESHGATE_TEST_CONSUL"),
                            "--consul-service",
                            svc,
                            "--consul-check-interval-seconds",
                            "1"};
    size_t n = 12;
    if (region) {
        args[n++] = "--region";
        args[n++] = region;
    }
    if (topic_prefix) {
        args[n++] = "--kafka-brokers";
        args[n++] = mg_test_require_env("MESHGATE_TEST_KAFKA");
        args[n++] = "--kafka-topic-prefix";
        args[n++] = topic_prefix;
    }
    for (size_t i = 0; extra && extra[i]; i++) {
        cr_assert_lt(n, sizeof(args) / sizeof(args[0]) - 1, "too many arguments");
        args[n++] = extra[i];
    }
    args[n] = NULL;
    return mg_gw_spawn(name, args);
}

mg_gw *mg_gw_spawn_fleet(const char *name, const char *svc, const char *region,
                         const char *const *extra)
{
    return mg_gw_spawn_fleet_kafka(name, svc, region, NULL, extra);
}

void mg_gw_kill(mg_gw *gw, int sig)
{
    if (gw && !gw->exited)
        kill(gw->pid, sig);
}

bool mg_gw_wait(mg_gw *gw, int timeout_ms)
{
    if (gw->exited)
        return true;
    for (int waited = 0;; waited += 10) {
        int st;
        pid_t r = waitpid(gw->pid, &st, WNOHANG);
        if (r == gw->pid) {
            gw->exited = true;
            gw->exit_status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            return true;
        }
        if (waited >= timeout_ms)
            return false;
        usleep(10 * 1000);
    }
}

int mg_gw_stop(mg_gw *gw)
{
    if (!gw->exited) {
        kill(gw->pid, SIGCONT); /* in case a test stopped it */
        kill(gw->pid, SIGTERM);
        if (!mg_gw_wait(gw, 30000)) {
            fprintf(stderr, "gateway %s ignored SIGTERM for 30 s; killing\n", gw->name);
            kill(gw->pid, SIGKILL);
            mg_gw_wait(gw, 5000);
            gw->exit_status = 255;
        }
    }
    if (gw->exit_status != 0)
        print_log_tail(gw);
    return gw->exit_status;
}

void mg_gw_free(mg_gw *gw)
{
    if (!gw)
        return;
    mg_gw_stop(gw);
    free(gw);
}

bool mg_gw_log_contains(const mg_gw *gw, const char *needle)
{
    FILE *f = fopen(gw->log_path, "r");
    if (!f)
        return false;
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

bool mg_gw_wait_peer(const mg_gw *gw, const char *peer_id, int timeout_ms)
{
    for (int waited = 0;; waited += 100) {
        char *body = NULL;
        bool listed = mg_http_get(gw->ws_port, "/peers", &body) == 200 && body &&
                      strstr(body, peer_id) != NULL;
        free(body);
        if (listed || waited >= timeout_ms)
            return listed;
        usleep(100 * 1000);
    }
}

int mg_gw_peer_count(const mg_gw *gw)
{
    char *body = NULL;
    int st = mg_http_get(gw->ws_port, "/peers", &body);
    json_t *j = st == 200 && body ? json_loads(body, 0, NULL) : NULL;
    free(body);
    int n = j ? (int)json_integer_value(json_object_get(j, "count")) : -1;
    json_decref(j);
    return n;
}

typedef struct mesh {
    mg_gw *const *gws;
    int n;
} mesh;

static bool mesh_complete(void *arg)
{
    const mesh *m = arg;
    for (int i = 0; i < m->n; i++)
        if (mg_gw_peer_count(m->gws[i]) != m->n - 1)
            return false;
    return true;
}

bool mg_gw_wait_mesh(mg_gw *const *gws, int n, int timeout_ms)
{
    mesh m = {gws, n};
    return mg_wait_until(mesh_complete, &m, timeout_ms);
}

bool mg_gw_peer_has_buses(const mg_gw *gw, const char *peer_id, const char *buses)
{
    char *body = NULL;
    bool yes = false;
    if (mg_http_get(gw->ws_port, "/peers", &body) == 200 && body) {
        json_t *j = json_loads(body, 0, NULL);
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(j, "peers"), i, e)
        {
            const char *id = json_string_value(json_object_get(e, "id"));
            const char *b = json_string_value(json_object_get(e, "buses"));
            yes |= id && b && !strcmp(id, peer_id) && !strcmp(b, buses);
        }
        json_decref(j);
    }
    free(body);
    return yes;
}

double mg_gw_metric(const mg_gw *gw, const char *name_labels)
{
    char *body = NULL;
    double v = 0;
    if (mg_http_get(gw->ws_port, "/metrics", &body) == 200 && body) {
        /* A sample line, not the # HELP / # TYPE lines naming it. */
        char key[256];
        snprintf(key, sizeof(key), "\n%s", name_labels);
        char *p = strstr(body, key);
        if (p)
            v = strtod(p + strlen(key), NULL);
    }
    free(body);
    return v;
}
