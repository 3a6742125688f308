/* ws_proto.c: the WebSocket JSON protocol (see ws_proto.h).
 *
 * Owns nothing: pure parse/encode functions over jansson, called on the
 * WebSocket service thread (parse, errors) and on whatever thread delivers a
 * message (encode: router workers, gRPC threads, the Kafka consumer).
 * Guarantees: a parse either fills the whole mg_ws_in or leaves it empty and
 * names the problem with a stable error code; encoders never fail (jansson
 * allocation failure aborts, as mg_alloc does).
 */
#include "gateway/ws_proto.h"
#include "common/mg_alloc.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool mg_utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint32_t cp;
        if ((c & 0xE0) == 0xC0) {
            n = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            n = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (len - i - 1 < n)
            return false;
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += n + 1;
    }
    return true;
}

bool mg_ws_proto_valid_user(const char *user, size_t max)
{
    if (!user)
        return false;
    size_t n = strlen(user);
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)user[i];
        if (c < 0x20 || c == 0x7F)
            return false;
    }
    return mg_utf8_valid((const unsigned char *)user, n);
}

static bool valid_id(const char *s, size_t n)
{
    if (n == 0 || n > MG_WS_MAX_ID_BYTES)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7F)
            return false;
    }
    return true;
}

void mg_ws_in_clear(mg_ws_in *in)
{
    if (!in)
        return;
    free(in->id);
    free(in->to);
    free(in->content);
    free(in->content_type);
    memset(in, 0, sizeof(*in));
}

/* Fetches an optional string member: 0 absent, 1 present (value in *s, *n),
 * -1 present but not a string. */
static int get_str(json_t *o, const char *key, const char **s, size_t *n)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return -1;
    *s = json_string_value(v);
    *n = json_string_length(v);
    return 1;
}

#define FAIL(c, ...)                                                                               \
    do {                                                                                           \
        *code = (c);                                                                               \
        snprintf(reason, reasonlen, __VA_ARGS__);                                                  \
        goto fail;                                                                                 \
    } while (0)

int mg_ws_proto_parse(const char *data, size_t len, const mg_ws_limits *lim, mg_ws_in *out,
                      const char **code, char *reason, size_t reasonlen)
{
    memset(out, 0, sizeof(*out));
    json_error_t jerr;
    json_t *root = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    const char *s;
    size_t n;
    int r;
    if (!root) {
        *code = MG_WS_ERR_BAD_JSON;
        snprintf(reason, reasonlen, "invalid JSON: %s (line %d column %d)", jerr.text, jerr.line,
                 jerr.column);
        return -EINVAL;
    }
    if (!json_is_object(root))
        FAIL(MG_WS_ERR_BAD_JSON, "a frame must be a JSON object");

    r = get_str(root, "type", &s, &n);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: type");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "type must be a string");

    if (strcmp(s, "ack") == 0) {
        out->type = MG_WS_IN_ACK;
        r = get_str(root, "id", &s, &n);
        if (r == 0)
            FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: id");
        if (r < 0 || !valid_id(s, n))
            FAIL(MG_WS_ERR_BAD_FIELD, "id must be a string of 1..%d printable bytes",
                 MG_WS_MAX_ID_BYTES);
        out->id = mg_xstrndup(s, n);
        json_decref(root);
        return 0;
    }
    if (strcmp(s, "send") != 0)
        FAIL(MG_WS_ERR_UNKNOWN_TYPE, "unknown type: %.40s", s);

    out->type = MG_WS_IN_SEND;
    out->priority = MG_PRIO_HIGH;
    r = get_str(root, "id", &s, &n);
    if (r < 0 || (r > 0 && !valid_id(s, n)))
        FAIL(MG_WS_ERR_BAD_FIELD, "id must be a string of 1..%d printable bytes",
             MG_WS_MAX_ID_BYTES);
    if (r > 0)
        out->id = mg_xstrndup(s, n);

    r = get_str(root, "to", &s, &n);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: to");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "to must be a string");
    if (n != strlen(s) || !mg_ws_proto_valid_user(s, lim->max_user_bytes))
        FAIL(MG_WS_ERR_BAD_FIELD, "to must be a user id of 1..%zu bytes without control characters",
             lim->max_user_bytes);
    out->to = mg_xstrndup(s, n);

    r = get_str(root, "content", &s, &n);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: content");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "content must be a string");
    if (n > lim->max_content_bytes)
        FAIL(MG_WS_ERR_TOO_LARGE, "content is %zu bytes, the limit is %zu", n,
             lim->max_content_bytes);
    out->content = mg_xmemdup(s, n + 1);
    out->content_len = n;

    r = get_str(root, "content_type", &s, &n);
    if (r < 0 || (r > 0 && (n > 255 || n != strlen(s))))
        FAIL(MG_WS_ERR_BAD_FIELD, "content_type must be a string of at most 255 bytes");
    if (r > 0)
        out->content_type = mg_xstrndup(s, n);

    r = get_str(root, "priority", &s, &n);
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "priority must be \"high\" or \"low\"");
    if (r > 0) {
        if (strcmp(s, "high") == 0)
            out->priority = MG_PRIO_HIGH;
        else if (strcmp(s, "low") == 0)
            out->priority = MG_PRIO_LOW;
        else
            FAIL(MG_WS_ERR_BAD_FIELD, "priority must be \"high\" or \"low\"");
    }
    json_decref(root);
    return 0;

fail:
    json_decref(root);
    mg_ws_in_clear(out);
    return -EINVAL;
}

static char *dump(json_t *o, size_t *len)
{
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s)
        abort();
    if (len)
        *len = strlen(s);
    return s;
}

/* json_string copies; a NULL from jansson means allocation failure or bad
 * UTF-8, which callers exclude, so treat it as fatal. */
static void set_str(json_t *o, const char *k, const char *v)
{
    json_t *s = json_string(v ? v : "");
    if (!s)
        s = json_string("?"); /* non-UTF-8 from a trusted source: never crash */
    json_object_set_new(o, k, s);
}

char *mg_ws_proto_encode_ack(const char *id, mg_status status, mg_path path, const char *reason,
                             size_t *len)
{
    json_t *o = json_object();
    set_str(o, "type", "ack");
    set_str(o, "id", id);
    set_str(o, "status", mg_status_name(status));
    set_str(o, "path", mg_path_name(path));
    if (reason && reason[0])
        set_str(o, "reason", reason);
    return dump(o, len);
}

static char *b64(const uint8_t *in, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = mg_xmalloc(4 * ((n + 2) / 3) + 1), *p = out;
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *p++ = tbl[v >> 18];
        *p++ = tbl[(v >> 12) & 63];
        *p++ = tbl[(v >> 6) & 63];
        *p++ = tbl[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        *p++ = tbl[v >> 18];
        *p++ = tbl[(v >> 12) & 63];
        *p++ = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        *p++ = '=';
    }
    *p = 0;
    return out;
}

char *mg_ws_proto_encode_message(const mg_msg *m, bool from_inbox, size_t *len)
{
    json_t *o = json_object();
    set_str(o, "type", "message");
    set_str(o, "id", m->id);
    set_str(o, "from", m->from);
    json_t *c = NULL;
    if (m->content_len == 0)
        c = json_string("");
    else if (!memchr(m->content, 0, m->content_len) && mg_utf8_valid(m->content, m->content_len))
        c = json_stringn((const char *)m->content, m->content_len);
    if (c) {
        json_object_set_new(o, "content", c);
    } else {
        char *e = b64(m->content, m->content_len);
        json_object_set_new(o, "content_b64", json_string(e));
        free(e);
    }
    if (m->content_type && m->content_type[0])
        set_str(o, "content_type", m->content_type);
    json_object_set_new(o, "sent_at_ms", json_integer(m->sent_at_ms));
    json_object_set_new(o, "inbox", json_boolean(from_inbox));
    return dump(o, len);
}

char *mg_ws_proto_encode_error(const char *code, const char *reason, const char *id, size_t *len)
{
    json_t *o = json_object();
    set_str(o, "type", "error");
    set_str(o, "code", code);
    set_str(o, "reason", reason);
    if (id && id[0])
        set_str(o, "id", id);
    return dump(o, len);
}
