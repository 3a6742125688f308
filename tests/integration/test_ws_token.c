/* Integration tests of token lifetimes on the WebSocket front end, against
 * the real gateway binary: a connection ends when its JWT's exp passes (close
 * 4401, within half --ping-seconds), unless a {"type":"refresh"} with a valid
 * token of the same sub moved its expiry; a refused refresh changes nothing.
 * JWKS (--jwks-url) rotation, refusal of unknown kids and the refresh rate
 * limit, against a python3 http.server serving a document written here. */
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <jwt.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#define T_MS     5000
#define SECRET   "token-lifetime-secret-0123456789"
#define PING_S   2 /* the wheel visits each connection every PING_S/2 s */
#define BOUND_MS (PING_S * 1000 / 2 + 200)

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static mg_wsc *connect_token(const mg_gw *gw, const char *tok, int *status)
{
    char url[4096];
    snprintf(url, sizeof(url), "ws://127.0.0.1:%d/ws?token=%s", gw->ws_port, tok);
    return mg_wsc_connect(url, NULL, T_MS, status);
}

static void send_refresh(mg_wsc *c, const char *tok)
{
    char *f = malloc(strlen(tok) + 64);
    sprintf(f, "{\"type\":\"refresh\",\"token\":\"%s\"}", tok);
    cr_assert_eq(mg_wsc_send_text(c, f), 0);
    free(f);
}

static void expect_bad_token(mg_wsc *c, const char *what)
{
    json_t *j = mg_wsc_recv_json(c, T_MS);
    cr_assert_str_eq(mg_json_str(j, "type"), "error", "%s: got %s", what, json_dumps(j, 0));
    cr_assert_str_eq(mg_json_str(j, "code"), "bad_token", "%s: code %s", what,
                     mg_json_str(j, "code"));
    json_decref(j);
}

/* The server closes c with 4401, never before exp, at most BOUND_MS (plus
 * 300 ms of scheduling slack) after it. */
static void expect_expiry_close(mg_wsc *c, long exp)
{
    int code = mg_wsc_wait_close(c, 10000);
    int64_t at = wall_ms();
    cr_assert_eq(code, 4401, "close code %d", code);
    cr_assert_geq(at, (int64_t)exp * 1000, "closed %lld ms before exp",
                  (long long)(exp * 1000 - at));
    cr_assert_leq(at, (int64_t)exp * 1000 + BOUND_MS + 300, "closed %lld ms after exp",
                  (long long)(at - exp * 1000));
}

static mg_gw *spawn_hs(const char *name)
{
    const char *args[] = {"--jwt-secret", SECRET, "--ping-seconds", "2", NULL};
    mg_gw *gw = mg_gw_spawn(name, args);
    cr_assert_not_null(gw);
    return gw;
}

Test(ws_token, expired_token_closes_4401_within_bound, .timeout = 60)
{
    mg_gw *gw = spawn_hs("tok-exp");
    long exp = (long)(wall_ms() / 1000) + 3;
    char *tok = mg_test_jwt_hs256(SECRET, "alice", exp);
    int st;
    mg_wsc *c = connect_token(gw, tok, &st);
    cr_assert_not_null(c, "connect: %d", st);
    expect_expiry_close(c, exp);
    mg_wsc_free(c);
    free(tok);
    char *m = NULL;
    cr_assert_eq(mg_http_get(gw->ws_port, "/metrics", &m), 200);
    cr_assert(strstr(m, "meshgate_ws_token_expired_total 1"), "metrics: %s", m);
    free(m);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws_token, refresh_moves_the_expiry, .timeout = 60)
{
    mg_gw *gw = spawn_hs("tok-refresh");
    long now = (long)(wall_ms() / 1000);
    long exp = now + 3;
    char *tok = mg_test_jwt_hs256(SECRET, "alice", exp);
    char *fresh = mg_test_jwt_hs256(SECRET, "alice", now + 60);
    int st;
    mg_wsc *c = connect_token(gw, tok, &st);
    cr_assert_not_null(c, "connect: %d", st);
    send_refresh(c, fresh);
    json_t *j = mg_wsc_recv_json(c, T_MS);
    cr_assert_str_eq(mg_json_str(j, "type"), "refreshed", "got %s", json_dumps(j, 0));
    cr_assert_eq(json_integer_value(json_object_get(j, "exp")), now + 60);
    json_decref(j);
    /* well past the old exp and the bound: still open */
    int64_t until = (int64_t)exp * 1000 + BOUND_MS + 1500;
    while (wall_ms() < until) {
        char *s = mg_wsc_recv_text(c, 200);
        cr_assert_null(s, "unexpected frame %s", s);
        cr_assert_eq(mg_wsc_close_code(c), 0, "closed with %d after a refresh",
                     mg_wsc_close_code(c));
    }
    mg_wsc_free(c);
    free(tok);
    free(fresh);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws_token, refused_refresh_keeps_the_old_expiry, .timeout = 60)
{
    mg_gw *gw = spawn_hs("tok-refused");
    long now = (long)(wall_ms() / 1000);
    long exp = now + 4;
    char *tok = mg_test_jwt_hs256(SECRET, "alice", exp);
    char *other = mg_test_jwt_hs256(SECRET, "mallory", now + 60);
    char *forged = mg_test_jwt_hs256("another-secret-abcdefghijklmnop", "alice", now + 60);
    char *expired = mg_test_jwt_hs256(SECRET, "alice", now - 10);
    int st;
    mg_wsc *c = connect_token(gw, tok, &st);
    cr_assert_not_null(c, "connect: %d", st);
    send_refresh(c, other);
    expect_bad_token(c, "another user's token");
    send_refresh(c, forged);
    expect_bad_token(c, "bad signature");
    send_refresh(c, expired);
    expect_bad_token(c, "expired token");
    send_refresh(c, "garbage.not.ajwt");
    expect_bad_token(c, "garbage");
    cr_assert_eq(mg_wsc_send_text(c, "{\"type\":\"refresh\",\"token\":42}"), 0);
    json_t *j = mg_wsc_recv_json(c, T_MS);
    cr_assert_str_eq(mg_json_str(j, "code"), "bad_field");
    json_decref(j);
    expect_expiry_close(c, exp);
    mg_wsc_free(c);
    free(tok);
    free(other);
    free(forged);
    free(expired);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

Test(ws_token, user_connections_have_no_expiry, .timeout = 60)
{
    const char *args[] = {"--ping-seconds", "2", NULL};
    mg_gw *gw = mg_gw_spawn("tok-user", args);
    cr_assert_not_null(gw);
    int st;
    mg_wsc *c = mg_wsc_connect_user(gw->ws_port, "alice", T_MS, &st);
    cr_assert_not_null(c, "connect: %d", st);
    send_refresh(c, "a.b.c");
    expect_bad_token(c, "refresh without --jwt-secret");
    int64_t until = mono_ms() + 2500;
    while (mono_ms() < until) {
        char *s = mg_wsc_recv_text(c, 200);
        cr_assert_null(s, "unexpected frame %s", s);
        cr_assert_eq(mg_wsc_close_code(c), 0);
    }
    mg_wsc_free(c);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* ---- JWKS ------------------------------------------------------------------ */

typedef struct jwks_env {
    char dir[64];
    int http_port;
    pid_t http_pid;
} jwks_env;

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "open %s", path);
    char *b = calloc(1, 65536);
    size_t n = fread(b, 1, 65535, f);
    fclose(f);
    b[n] = 0;
    return b;
}

static void run(const char *cmd)
{
    int rc = system(cmd);
    cr_assert_eq(rc, 0, "%s: exit %d", cmd, rc);
}

/* base64url of the key's modulus (from `openssl rsa -modulus`, hex). */
static char *modulus_b64url(const jwks_env *e, const char *name)
{
    char cmd[512], path[256];
    snprintf(path, sizeof(path), "%s/%s.mod", e->dir, name);
    snprintf(cmd, sizeof(cmd), "openssl rsa -in %s/%s.pem -noout -modulus > %s 2>/dev/null", e->dir,
             name, path);
    run(cmd);
    char *hex = slurp(path);
    const char *h = strchr(hex, '=');
    cr_assert_not_null(h);
    h++;
    size_t nh = strcspn(h, "\n"), nb = nh / 2;
    unsigned char *bin = malloc(nb);
    for (size_t i = 0; i < nb; i++)
        sscanf(h + 2 * i, "%2hhx", &bin[i]);
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = calloc(1, nb * 4 / 3 + 4);
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < nb; i++) {
        acc = (acc << 8) | bin[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            out[o++] = tbl[(acc >> bits) & 63];
        }
    }
    if (bits > 0)
        out[o++] = tbl[(acc << (6 - bits)) & 63];
    free(bin);
    free(hex);
    return out;
}

/* Writes the JWKS document with the keys named (kid = key name), atomically. */
static void write_jwks(const jwks_env *e, const char *const *names)
{
    char tmp[256], path[256];
    snprintf(tmp, sizeof(tmp), "%s/jwks.json.tmp", e->dir);
    snprintf(path, sizeof(path), "%s/jwks.json", e->dir);
    FILE *f = fopen(tmp, "w");
    cr_assert_not_null(f);
    fprintf(f, "{\"keys\":[");
    for (int i = 0; names[i]; i++) {
        char *n = modulus_b64url(e, names[i]);
        fprintf(f,
                "%s{\"kty\":\"RSA\",\"use\":\"sig\",\"alg\":\"RS256\",\"kid\":\"%s\",\"n\":\"%s\","
                "\"e\":\"AQAB\"}",
                i ? "," : "", names[i], n);
        free(n);
    }
    fprintf(f, "]}\n");
    fclose(f);
    cr_assert_eq(rename(tmp, path), 0);
}

static char *rs_token(const jwks_env *e, const char *kid, const char *sub, long exp)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s.pem", e->dir, kid);
    char *key = slurp(path);
    jwt_t *j = NULL;
    cr_assert_eq(jwt_new(&j), 0);
    cr_assert_eq(jwt_set_alg(j, JWT_ALG_RS256, (unsigned char *)key, (int)strlen(key)), 0);
    jwt_add_header(j, "kid", kid);
    jwt_add_grant(j, "sub", sub);
    jwt_add_grant_int(j, "exp", exp);
    char *t = jwt_encode_str(j);
    cr_assert_not_null(t);
    jwt_free(j);
    free(key);
    return t;
}

static bool http_up(void *arg)
{
    return mg_http_get(*(int *)arg, "/", NULL) == 200;
}

static void jwks_env_start(jwks_env *e)
{
    snprintf(e->dir, sizeof(e->dir), "/tmp/mg-jwks-XXXXXX");
    cr_assert_not_null(mkdtemp(e->dir));
    static const char *const keys[] = {"k1", "k2", "k9"};
    for (int i = 0; i < 3; i++) {
        char cmd[512];
        snprintf(cmd, sizeof(cmd), "openssl genrsa -out %s/%s.pem 2048 2>/dev/null", e->dir,
                 keys[i]);
        run(cmd);
    }
    const char *const only_k1[] = {"k1", NULL};
    write_jwks(e, only_k1);
    e->http_port = mg_test_free_port();
    e->http_pid = fork();
    cr_assert_geq(e->http_pid, 0);
    if (e->http_pid == 0) {
        char port[16], log[256];
        snprintf(port, sizeof(port), "%d", e->http_port);
        snprintf(log, sizeof(log), "%s/http.log", e->dir);
        freopen(log, "w", stderr);
        freopen("/dev/null", "w", stdout);
        execlp("python3", "python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
               e->dir, port, (char *)NULL);
        _exit(127);
    }
    cr_assert(mg_wait_until(http_up, &e->http_port, 10000), "python3 http.server did not start");
}

static void jwks_env_stop(jwks_env *e)
{
    kill(e->http_pid, SIGTERM);
    waitpid(e->http_pid, NULL, 0);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", e->dir);
    run(cmd);
}

static double fetches(const mg_gw *gw)
{
    char *body = NULL;
    cr_assert_eq(mg_http_get(gw->ws_port, "/metrics", &body), 200);
    double sum = 0;
    for (const char *p = body; (p = strstr(p, "meshgate_jwks_fetches_total{")); p++) {
        const char *sp = strchr(p, ' ');
        sum += sp ? strtod(sp + 1, NULL) : 0;
    }
    free(body);
    return sum;
}

static int try_connect(const mg_gw *gw, const char *tok)
{
    int st = 0;
    mg_wsc *c = connect_token(gw, tok, &st);
    if (c) {
        mg_wsc_free(c);
        return 101;
    }
    return st;
}

/* Starts the JWKS server (k1 published) and a gateway using it, with one
 * more option (flag, value). */
static mg_gw *spawn_jwks(jwks_env *e, const char *name, const char *flag, const char *value)
{
    jwks_env_start(e);
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/jwks.json", e->http_port);
    const char *args[] = {"--jwks-url", url, flag, value, NULL};
    mg_gw *gw = mg_gw_spawn(name, args);
    cr_assert_not_null(gw);
    return gw;
}

Test(ws_token, jwks_rotation_unknown_kid_and_rate_limit, .timeout = 120)
{
    jwks_env e;
    mg_gw *gw = spawn_jwks(&e, "tok-jwks", "--jwks-min-refetch-seconds", "3");
    long exp = (long)(wall_ms() / 1000) + 300;
    char *t1 = rs_token(&e, "k1", "alice", exp), *t2 = rs_token(&e, "k2", "bob", exp),
         *t9 = rs_token(&e, "k9", "eve", exp);
    cr_assert_eq(try_connect(gw, t1), 101, "a k1 token is accepted");
    cr_assert_eq(fetches(gw), 1, "one fetch at start");

    /* a token with an unknown kid: 401, and a burst of them costs at most
     * one early fetch per --jwks-min-refetch-seconds */
    int64_t t0 = mono_ms();
    for (int i = 0; i < 20; i++)
        cr_assert_eq(try_connect(gw, t9), 401, "unknown kid");
    usleep(500 * 1000);
    double f = fetches(gw);
    int64_t el = mono_ms() - t0;
    cr_assert_leq(f, 1 + 1 + el / 3000, "%g fetches in %lld ms", f, (long long)el);
    /* the log of the server agrees */
    char logp[256];
    snprintf(logp, sizeof(logp), "%s/http.log", e.dir);
    char *log = slurp(logp);
    int gets = 0;
    for (const char *p = log; (p = strstr(p, "GET /jwks.json")); p++)
        gets++;
    free(log);
    cr_assert_eq(gets, (int)f, "http.server saw %d fetches, the metric says %g", gets, f);

    /* rotation: k2 is published; a k2 token is accepted once the gateway
     * fetched again (an unknown kid asks for that), without a restart */
    const char *const both[] = {"k1", "k2", NULL};
    write_jwks(&e, both);
    int st = 0;
    int64_t until = mono_ms() + 3000 + 3000;
    while ((st = try_connect(gw, t2)) != 101 && mono_ms() < until)
        usleep(200 * 1000);
    cr_assert_eq(st, 101, "a k2 token after rotation: %d", st);
    cr_assert_eq(try_connect(gw, t1), 101, "k1 still accepted");
    cr_assert_eq(try_connect(gw, t9), 401, "k9 still unknown");

    free(t1);
    free(t2);
    free(t9);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
    jwks_env_stop(&e);
}

/* The periodic refresh runs without any token asking for it. */
Test(ws_token, jwks_periodic_refresh, .timeout = 60)
{
    jwks_env e;
    mg_gw *gw = spawn_jwks(&e, "tok-jwks-periodic", "--jwks-refresh-seconds", "1");
    const char *const both[] = {"k1", "k2", NULL};
    write_jwks(&e, both);
    int64_t until = mono_ms() + 10000;
    while (fetches(gw) < 3 && mono_ms() < until)
        usleep(100 * 1000);
    cr_assert_geq(fetches(gw), 3, "periodic fetches");
    char *t2 = rs_token(&e, "k2", "bob", (long)(wall_ms() / 1000) + 300);
    cr_assert_eq(try_connect(gw, t2), 101, "k2 known from a periodic fetch");
    free(t2);
    cr_assert_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
    jwks_env_stop(&e);
}
