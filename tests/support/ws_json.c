/* ws_json.c: JSON frames and JWTs for WebSocket integration tests (see
 * ws_json.h). */
#include "support/ws_json.h"
#include "common/mg_alloc.h"

#include <criterion/criterion.h>
#include <jwt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

json_t *mg_wsc_recv_json(mg_wsc *c, int timeout_ms)
{
    char *s = mg_wsc_recv_text(c, timeout_ms);
    cr_assert_not_null(s, "no frame within %d ms (close code %d)", timeout_ms,
                       mg_wsc_close_code(c));
    json_t *j = json_loads(s, 0, NULL);
    cr_assert_not_null(j, "not JSON: %s", s);
    free(s);
    return j;
}

const char *mg_json_str(json_t *j, const char *k)
{
    json_t *v = json_object_get(j, k);
    return v && json_is_string(v) ? json_string_value(v) : "";
}

const char *mg_wsc_take_message(mg_wsc *c, json_t *j)
{
    const char *type = json_string_value(json_object_get(j, "type"));
    const char *id = json_string_value(json_object_get(j, "id"));
    if (!type || !id || strcmp(type, "message") != 0)
        return NULL;
    if (json_is_true(json_object_get(j, "inbox"))) {
        char ack[256];
        snprintf(ack, sizeof(ack), "{\"type\":\"ack\",\"id\":\"%s\"}", id);
        mg_wsc_send_text(c, ack);
    }
    return id;
}

char *mg_test_jwt_hs256(const char *secret, const char *sub, long exp)
{
    jwt_t *j = NULL;
    cr_assert_eq(jwt_new(&j), 0);
    jwt_set_alg(j, JWT_ALG_HS256, (const unsigned char *)secret, (int)strlen(secret));
    jwt_add_grant(j, "sub", sub);
    jwt_add_grant_int(j, "exp", exp);
    char *t = jwt_encode_str(j);
    jwt_free(j);
    cr_assert_not_null(t);
    return t;
}

void mg_wsc_send_acked(mg_wsc *tx, const char *user, const char *prefix, int n,
                       const char *want_status)
{
    for (int i = 0; i < n; i++) {
        char *frame =
            mg_xasprintf("{\"type\":\"send\",\"to\":\"%s\",\"content\":\"%d\",\"id\":\"%s-%d\"}",
                         user, i, prefix, i);
        cr_assert_eq(mg_wsc_send_text(tx, frame), 0, "send %d of %d", i, n);
        free(frame);
    }
    char *acked = mg_xcalloc((size_t)n, 1);
    size_t plen = strlen(prefix);
    for (int got = 0; got < n;) {
        json_t *j = mg_wsc_recv_json(tx, 15000);
        if (!strcmp(mg_json_str(j, "type"), "ack")) {
            const char *id = mg_json_str(j, "id");
            cr_assert(!strcmp(mg_json_str(j, "status"), want_status), "ack of %s: %s (%s)", id,
                      mg_json_str(j, "status"), mg_json_str(j, "reason"));
            int i = !strncmp(id, prefix, plen) && id[plen] == '-' ? atoi(id + plen + 1) : -1;
            cr_assert(i >= 0 && i < n && !acked[i], "ack of %s: not sent, or acked twice", id);
            acked[i] = 1;
            got++;
        }
        json_decref(j);
    }
    free(acked);
}
