/* Unit tests of the WebSocket JSON protocol (gateway/ws_proto.c, included to
 * see which frames its one-pass scanner reads without jansson).
 *
 * The encoders and the parser once were jansson trees; their code is kept
 * below as the reference (ref_*) the direct encoders and the one-pass parser
 * must agree with, byte for byte and code for code (its helpers that did not
 * change, valid_id and base64, are the ones in ws_proto.c). */
#include "gateway/ws_proto.c"

#include <criterion/criterion.h>
#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const mg_ws_limits lim = {.max_content_bytes = 64, .max_user_bytes = 16};

static int parse(const char *s, mg_ws_in *in, const char **code)
{
    char reason[200];
    *code = NULL;
    return mg_ws_proto_parse(s, strlen(s), &lim, in, code, reason, sizeof(reason));
}

static void expect_error(const char *frame, const char *want)
{
    mg_ws_in in;
    const char *code;
    cr_assert_lt(parse(frame, &in, &code), 0, "accepted: %s", frame);
    cr_assert_str_eq(code, want, "frame %s gave %s, want %s", frame, code, want);
    cr_assert_null(in.id);
    cr_assert_null(in.to);
    cr_assert_null(in.content);
}

Test(ws_proto, send_full)
{
    mg_ws_in in;
    const char *code;
    cr_assert_eq(parse("{\"type\":\"send\",\"id\":\"m1\",\"to\":\"bob\",\"content\":\"hi\","
                       "\"priority\":\"low\",\"content_type\":\"text/plain\"}",
                       &in, &code),
                 0);
    cr_assert_eq(in.type, MG_WS_IN_SEND);
    cr_assert_str_eq(in.id, "m1");
    cr_assert_str_eq(in.to, "bob");
    cr_assert_eq(in.content_len, 2);
    cr_assert_str_eq(in.content, "hi");
    cr_assert_str_eq(in.content_type, "text/plain");
    cr_assert_eq(in.priority, MG_PRIO_LOW);
    mg_ws_in_clear(&in);
}

Test(ws_proto, send_minimal_defaults)
{
    mg_ws_in in;
    const char *code;
    cr_assert_eq(parse("{\"type\":\"send\",\"to\":\"bob\",\"content\":\"\"}", &in, &code), 0);
    cr_assert_null(in.id);
    cr_assert_null(in.content_type);
    cr_assert_eq(in.priority, MG_PRIO_HIGH);
    cr_assert_eq(in.content_len, 0);
    mg_ws_in_clear(&in);
}

Test(ws_proto, ack)
{
    mg_ws_in in;
    const char *code;
    cr_assert_eq(parse("{\"type\":\"ack\",\"id\":\"abc\"}", &in, &code), 0);
    cr_assert_eq(in.type, MG_WS_IN_ACK);
    cr_assert_str_eq(in.id, "abc");
    mg_ws_in_clear(&in);
}

/* A refresh frame through the one-pass scanner and through jansson (an
 * escaped key or an unusual shape sends it there): both readers agree. */
Test(ws_proto, refresh)
{
    static const char *frames[] = {
        "{\"type\":\"refresh\",\"token\":\"aaa.bbb.ccc\"}",
        " { \"token\" : \"aaa.bbb.ccc\" , \"type\" : \"refresh\" } ",
        "{\"type\":\"refresh\",\"tok\\u0065n\":\"aaa.bbb.ccc\"}",
        "{\"type\":\"refresh\",\"token\":\"aaa.bbb.ccc\",\"x\":[1,{\"y\":2}]}",
    };
    for (size_t i = 0; i < sizeof(frames) / sizeof(frames[0]); i++) {
        jval v[F_COUNT];
        if (i == 0)
            cr_assert(scan_frame(frames[i], strlen(frames[i]), v), "scanner reads %s", frames[i]);
        if (i == 2)
            cr_assert_not(scan_frame(frames[i], strlen(frames[i]), v), "jansson reads %s",
                          frames[i]);
        mg_ws_in in;
        const char *code;
        cr_assert_eq(parse(frames[i], &in, &code), 0, "%s: %s", frames[i], code);
        cr_assert_eq(in.type, MG_WS_IN_REFRESH);
        cr_assert_str_eq(in.token, "aaa.bbb.ccc");
        cr_assert_null(in.id);
        mg_ws_in_clear(&in);
    }
    expect_error("{\"type\":\"refresh\"}", MG_WS_ERR_MISSING_FIELD);
    expect_error("{\"type\":\"refresh\",\"token\":null}", MG_WS_ERR_MISSING_FIELD);
    expect_error("{\"type\":\"refresh\",\"token\":\"\"}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"refresh\",\"token\":7}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"refresh\",\"token\":\"a b\"}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"refresh\",\"token\":\"a\\u00e9\"}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"refresh\",\"token\":\"a\",\"token\":\"b\"}", MG_WS_ERR_BAD_JSON);
    size_t big = MG_WS_MAX_TOKEN_BYTES + 1;
    char *f = malloc(big + 64);
    int n = snprintf(f, 64, "{\"type\":\"refresh\",\"token\":\"");
    memset(f + n, 'a', big);
    strcpy(f + n + big, "\"}");
    mg_ws_in in;
    const char *code;
    cr_assert_lt(parse(f, &in, &code), 0);
    cr_assert_str_eq(code, MG_WS_ERR_BAD_FIELD);
    cr_assert_null(in.token);
    f[n + big - 1] = '"';
    f[n + big] = '}';
    f[n + big + 1] = 0;
    cr_assert_eq(parse(f, &in, &code), 0, "a token of the limit: %s", code);
    cr_assert_eq(strlen(in.token), MG_WS_MAX_TOKEN_BYTES);
    mg_ws_in_clear(&in);
    free(f);
}

Test(ws_proto, encode_refreshed)
{
    size_t len;
    char *s = mg_ws_proto_encode_refreshed(1700000123, &len);
    cr_assert_str_eq(s, "{\"type\":\"refreshed\",\"exp\":1700000123}");
    cr_assert_eq(len, strlen(s));
    free(s);
}

Test(ws_proto, encode_ready)
{
    size_t len;
    char *s = mg_ws_proto_encode_ready("gw-a-17", "al\"ice", false, &len);
    cr_assert_str_eq(s, "{\"type\":\"ready\",\"conn\":\"gw-a-17\",\"user\":\"al\\\"ice\"}");
    cr_assert_eq(len, strlen(s));
    free(s);
    s = mg_ws_proto_encode_ready("gw-a-18", "bob", true, NULL);
    cr_assert_str_eq(
        s, "{\"type\":\"ready\",\"conn\":\"gw-a-18\",\"user\":\"bob\",\"degraded\":true}");
    free(s);
}

Test(ws_proto, malformed)
{
    expect_error("{", MG_WS_ERR_BAD_JSON);
    expect_error("", MG_WS_ERR_BAD_JSON);
    expect_error("[1,2]", MG_WS_ERR_BAD_JSON);
    expect_error("\"send\"", MG_WS_ERR_BAD_JSON);
    expect_error("{\"type\":\"send\",\"type\":\"ack\"}", MG_WS_ERR_BAD_JSON);
    expect_error("{\"type\":\"send\",\"to\":\"b\",\"content\":\"a\\u0000b\"}", MG_WS_ERR_BAD_JSON);
}

Test(ws_proto, unknown_type)
{
    expect_error("{\"type\":\"subscribe\"}", MG_WS_ERR_UNKNOWN_TYPE);
    expect_error("{\"type\":\"\"}", MG_WS_ERR_UNKNOWN_TYPE);
}

Test(ws_proto, missing_fields)
{
    expect_error("{}", MG_WS_ERR_MISSING_FIELD);
    expect_error("{\"type\":\"send\",\"content\":\"x\"}", MG_WS_ERR_MISSING_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"bob\"}", MG_WS_ERR_MISSING_FIELD);
    expect_error("{\"type\":\"ack\"}", MG_WS_ERR_MISSING_FIELD);
    expect_error("{\"type\":\"send\",\"to\":null,\"content\":\"x\"}", MG_WS_ERR_MISSING_FIELD);
}

Test(ws_proto, wrong_types)
{
    expect_error("{\"type\":1}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":5,\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"b\",\"content\":{}}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"id\":7}",
                 MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"priority\":\"urgent\"}",
                 MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"priority\":1}",
                 MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"content_type\":[]}",
                 MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"ack\",\"id\":\"\"}", MG_WS_ERR_BAD_FIELD);
}

Test(ws_proto, bad_recipient)
{
    expect_error("{\"type\":\"send\",\"to\":\"\",\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"a\\nb\",\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD);
    expect_error("{\"type\":\"send\",\"to\":\"aaaaaaaaaaaaaaaaa\",\"content\":\"x\"}",
                 MG_WS_ERR_BAD_FIELD); /* 17 > 16 bytes */
}

Test(ws_proto, oversized_content)
{
    char frame[512];
    char big[100];
    memset(big, 'x', 65);
    big[65] = 0;
    snprintf(frame, sizeof(frame), "{\"type\":\"send\",\"to\":\"b\",\"content\":\"%s\"}", big);
    expect_error(frame, MG_WS_ERR_TOO_LARGE);
    big[64] = 0; /* exactly the limit is fine */
    snprintf(frame, sizeof(frame), "{\"type\":\"send\",\"to\":\"b\",\"content\":\"%s\"}", big);
    mg_ws_in in;
    const char *code;
    cr_assert_eq(parse(frame, &in, &code), 0);
    mg_ws_in_clear(&in);
}

Test(ws_proto, valid_user)
{
    cr_assert(mg_ws_proto_valid_user("alice", 16));
    cr_assert(mg_ws_proto_valid_user("élodie", 16));
    cr_assert_not(mg_ws_proto_valid_user("", 16));
    cr_assert_not(mg_ws_proto_valid_user(NULL, 16));
    cr_assert_not(mg_ws_proto_valid_user("a\tb", 16));
    cr_assert_not(mg_ws_proto_valid_user("a\x7f", 16));
    cr_assert_not(mg_ws_proto_valid_user("\xff\xfe", 16));
    cr_assert_not(mg_ws_proto_valid_user("aaaaaaaaaaaaaaaaa", 16));
}

Test(ws_proto, utf8)
{
    cr_assert(mg_utf8_valid((const unsigned char *)"h\xc3\xa9", 3));
    cr_assert(mg_utf8_valid((const unsigned char *)"\xf0\x9f\x98\x80", 4));
    cr_assert_not(mg_utf8_valid((const unsigned char *)"\xc3", 1));
    cr_assert_not(mg_utf8_valid((const unsigned char *)"\xc0\x80", 2));         /* overlong */
    cr_assert_not(mg_utf8_valid((const unsigned char *)"\xed\xa0\x80", 3));     /* surrogate */
    cr_assert_not(mg_utf8_valid((const unsigned char *)"\xf4\x90\x80\x80", 4)); /* > U+10FFFF */
}

static json_t *load(const char *s)
{
    json_error_t e;
    json_t *j = json_loads(s, 0, &e);
    cr_assert_not_null(j, "not JSON: %s", s);
    return j;
}

Test(ws_proto, encode_ack)
{
    size_t len;
    char *s = mg_ws_proto_encode_ack("m1", MG_STATUS_STORED, MG_PATH_INBOX, NULL, &len);
    cr_assert_eq(len, strlen(s));
    json_t *j = load(s);
    cr_assert_str_eq(json_string_value(json_object_get(j, "type")), "ack");
    cr_assert_str_eq(json_string_value(json_object_get(j, "id")), "m1");
    cr_assert_str_eq(json_string_value(json_object_get(j, "status")), "stored");
    cr_assert_str_eq(json_string_value(json_object_get(j, "path")), "inbox");
    cr_assert_null(json_object_get(j, "reason"));
    json_decref(j);
    free(s);
    s = mg_ws_proto_encode_ack("m\"2", MG_STATUS_FAILED, MG_PATH_NONE, "overloaded", NULL);
    j = load(s);
    cr_assert_str_eq(json_string_value(json_object_get(j, "id")), "m\"2");
    cr_assert_str_eq(json_string_value(json_object_get(j, "status")), "failed");
    cr_assert_str_eq(json_string_value(json_object_get(j, "path")), "none");
    cr_assert_str_eq(json_string_value(json_object_get(j, "reason")), "overloaded");
    json_decref(j);
    free(s);
}

Test(ws_proto, encode_message_text_and_binary)
{
    mg_msg *m = mg_msg_new("id1", "alice", "bob", (const uint8_t *)"h\xc3\xa9", 3, "text/plain",
                           1234, MG_PRIO_HIGH);
    char *s = mg_ws_proto_encode_message(m, true, NULL);
    json_t *j = load(s);
    cr_assert_str_eq(json_string_value(json_object_get(j, "type")), "message");
    cr_assert_str_eq(json_string_value(json_object_get(j, "id")), "id1");
    cr_assert_str_eq(json_string_value(json_object_get(j, "from")), "alice");
    cr_assert_str_eq(json_string_value(json_object_get(j, "content")), "h\xc3\xa9");
    cr_assert_str_eq(json_string_value(json_object_get(j, "content_type")), "text/plain");
    cr_assert_eq(json_integer_value(json_object_get(j, "sent_at_ms")), 1234);
    cr_assert(json_is_true(json_object_get(j, "inbox")));
    json_decref(j);
    free(s);
    mg_msg_free(m);

    m = mg_msg_new("id2", "svc", "bob", (const uint8_t *)"\xff\x00\x01", 3, NULL, 1, MG_PRIO_LOW);
    s = mg_ws_proto_encode_message(m, false, NULL);
    j = load(s);
    cr_assert_null(json_object_get(j, "content"));
    cr_assert_str_eq(json_string_value(json_object_get(j, "content_b64")), "/wAB");
    cr_assert_null(json_object_get(j, "content_type"));
    cr_assert(json_is_false(json_object_get(j, "inbox")));
    json_decref(j);
    free(s);
    mg_msg_free(m);
}

Test(ws_proto, encode_error)
{
    char *s = mg_ws_proto_encode_error(MG_WS_ERR_BAD_JSON, "line 1", NULL, NULL);
    json_t *j = load(s);
    cr_assert_str_eq(json_string_value(json_object_get(j, "type")), "error");
    cr_assert_str_eq(json_string_value(json_object_get(j, "code")), "bad_json");
    cr_assert_str_eq(json_string_value(json_object_get(j, "reason")), "line 1");
    cr_assert_null(json_object_get(j, "id"));
    json_decref(j);
    free(s);
}

/* ---- the reference: ws_proto.c's jansson implementation before the direct
 * encoders and the one-pass parser, unchanged but for the names ---------- */

static int ref_get_str(json_t *o, const char *key, const char **s, size_t *n)
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

#undef FAIL
#define FAIL(c, ...)                                                                               \
    do {                                                                                           \
        *code = (c);                                                                               \
        snprintf(reason, reasonlen, __VA_ARGS__);                                                  \
        goto fail;                                                                                 \
    } while (0)

static int ref_parse(const char *data, size_t len, const mg_ws_limits *limits, mg_ws_in *out,
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

    r = ref_get_str(root, "type", &s, &n);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: type");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "type must be a string");

    if (strcmp(s, "ack") == 0) {
        out->type = MG_WS_IN_ACK;
        r = ref_get_str(root, "id", &s, &n);
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
    r = ref_get_str(root, "id", &s, &n);
    if (r < 0 || (r > 0 && !valid_id(s, n)))
        FAIL(MG_WS_ERR_BAD_FIELD, "id must be a string of 1..%d printable bytes",
             MG_WS_MAX_ID_BYTES);
    if (r > 0)
        out->id = mg_xstrndup(s, n);

    r = ref_get_str(root, "to", &s, &n);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: to");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "to must be a string");
    if (n != strlen(s) || !mg_ws_proto_valid_user(s, limits->max_user_bytes))
        FAIL(MG_WS_ERR_BAD_FIELD, "to must be a user id of 1..%zu bytes without control characters",
             limits->max_user_bytes);
    out->to = mg_xstrndup(s, n);

    r = ref_get_str(root, "content", &s, &n);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: content");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "content must be a string");
    if (n > limits->max_content_bytes)
        FAIL(MG_WS_ERR_TOO_LARGE, "content is %zu bytes, the limit is %zu", n,
             limits->max_content_bytes);
    out->content = mg_xmemdup(s, n + 1);
    out->content_len = n;

    r = ref_get_str(root, "content_type", &s, &n);
    if (r < 0 || (r > 0 && (n > 255 || n != strlen(s))))
        FAIL(MG_WS_ERR_BAD_FIELD, "content_type must be a string of at most 255 bytes");
    if (r > 0)
        out->content_type = mg_xstrndup(s, n);

    r = ref_get_str(root, "priority", &s, &n);
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

static char *ref_dump(json_t *o, size_t *len)
{
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s)
        abort();
    if (len)
        *len = strlen(s);
    return s;
}

static void ref_set_str(json_t *o, const char *k, const char *v)
{
    json_t *s = json_string(v ? v : "");
    if (!s)
        s = json_string("?");
    json_object_set_new(o, k, s);
}

static char *ref_encode_ack(const char *id, mg_status status, mg_path path, const char *reason,
                            size_t *len)
{
    json_t *o = json_object();
    ref_set_str(o, "type", "ack");
    ref_set_str(o, "id", id);
    ref_set_str(o, "status", mg_status_name(status));
    ref_set_str(o, "path", mg_path_name(path));
    if (reason && reason[0])
        ref_set_str(o, "reason", reason);
    return ref_dump(o, len);
}

static char *ref_encode_message(const mg_msg *m, bool from_inbox, size_t *len)
{
    json_t *o = json_object();
    ref_set_str(o, "type", "message");
    ref_set_str(o, "id", m->id);
    ref_set_str(o, "from", m->from);
    json_t *c = NULL;
    if (m->content_len == 0)
        c = json_string("");
    else if (!memchr(m->content, 0, m->content_len) && mg_utf8_valid(m->content, m->content_len))
        c = json_stringn((const char *)m->content, m->content_len);
    if (c) {
        json_object_set_new(o, "content", c);
    } else {
        char *e = mg_xmalloc(b64_len(m->content_len) + 1); /* base64 did not change */
        *b64_put(e, m->content, m->content_len) = 0;
        json_object_set_new(o, "content_b64", json_string(e));
        free(e);
    }
    if (m->content_type && m->content_type[0])
        ref_set_str(o, "content_type", m->content_type);
    json_object_set_new(o, "sent_at_ms", json_integer(m->sent_at_ms));
    json_object_set_new(o, "inbox", json_boolean(from_inbox));
    return ref_dump(o, len);
}

static char *ref_encode_error(const char *code, const char *reason, const char *id, size_t *len)
{
    json_t *o = json_object();
    ref_set_str(o, "type", "error");
    ref_set_str(o, "code", code);
    ref_set_str(o, "reason", reason);
    if (id && id[0])
        ref_set_str(o, "id", id);
    return ref_dump(o, len);
}

/* ---- encoders against the reference ----------------------------------- */

/* Contents that need care: every one is also tried inside the others. */
static const struct {
    const char *s;
    size_t n;
} contents[] = {
#define C(lit)                                                                                     \
    {                                                                                              \
        lit, sizeof(lit) - 1                                                                       \
    }
    C(""),
    C("plain text"),
    C("quote \" and backslash \\ and slash /"),
    C("\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f"
      "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f"),
    C("del \x7f"),
    C("caf\xc3\xa9 \xe2\x82\xac \xe6\x97\xa5"),
    C("emoji \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf"),
    C("line sep \xe2\x80\xa8 para sep \xe2\x80\xa9"),
    C("nul \x00 inside"),
    C("\xff\xfe"),
    C("lone continuation \x80"),
    C("overlong \xc0\xaf"),
    C("surrogate \xed\xa0\x80"),
    C("truncated \xe2\x82"),
    C("too high \xf4\x90\x80\x80"),
    C("\x00"),
    C("a"),
    C("ab"),
    C("abc"),
#undef C
};
#define NCONTENTS (sizeof(contents) / sizeof(contents[0]))

/* Decodes standard base64; returns the byte count or -1. */
static long b64_decode(const char *s, uint8_t *out)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = strlen(s), o = 0;
    if (n % 4)
        return -1;
    for (size_t i = 0; i < n; i += 4) {
        uint32_t v = 0;
        int pad = 0;
        for (int k = 0; k < 4; k++) {
            const char *c = s[i + k] == '=' ? NULL : strchr(tbl, s[i + k]);
            if (s[i + k] == '=')
                pad++;
            else if (!c || !s[i + k] || pad)
                return -1;
            v = v << 6 | (c ? (uint32_t)(c - tbl) : 0);
        }
        out[o++] = (uint8_t)(v >> 16);
        if (pad < 2)
            out[o++] = (uint8_t)(v >> 8);
        if (pad < 1)
            out[o++] = (uint8_t)v;
    }
    return (long)o;
}

/* Encodes m every way there is and checks each against the reference, then
 * reads the text back with jansson. */
static void check_message(const mg_msg *m, bool inbox)
{
    size_t len, rlen;
    char *s = mg_ws_proto_encode_message(m, inbox, &len);
    char *ref = ref_encode_message(m, inbox, &rlen);
    cr_assert_str_eq(s, ref);
    cr_assert_eq(len, rlen);
    cr_assert_eq(mg_ws_proto_message_len(m, inbox), len);

    /* render at headroom, with guard bytes either side */
    enum { HEAD = 16, GUARD = 8 };
    char *buf = mg_xmalloc(HEAD + len + GUARD);
    memset(buf, 0x5a, HEAD + len + GUARD);
    cr_assert_eq(mg_ws_proto_render_message(buf + HEAD, m, inbox), len);
    cr_assert_eq(memcmp(buf + HEAD, s, len), 0);
    for (size_t i = 0; i < HEAD; i++)
        cr_assert_eq(buf[i], 0x5a);
    for (size_t i = 0; i < GUARD; i++)
        cr_assert_eq(buf[HEAD + len + i], 0x5a);
    free(buf);

    json_error_t e;
    json_t *j = json_loadb(s, len, JSON_REJECT_DUPLICATES, &e);
    cr_assert_not_null(j, "not JSON (%s): %s", e.text, s);
    json_t *c = json_object_get(j, "content"), *b = json_object_get(j, "content_b64");
    cr_assert((c != NULL) != (b != NULL));
    if (c) {
        cr_assert_eq(json_string_length(c), m->content_len);
        cr_assert(m->content_len == 0 ||
                  memcmp(json_string_value(c), m->content, m->content_len) == 0);
    } else {
        uint8_t *bytes = mg_xmalloc(m->content_len + 3);
        cr_assert_eq(b64_decode(json_string_value(b), bytes), (long)m->content_len);
        cr_assert_eq(memcmp(bytes, m->content, m->content_len), 0);
        free(bytes);
    }
    cr_assert_eq(json_integer_value(json_object_get(j, "sent_at_ms")), m->sent_at_ms);
    cr_assert_eq(json_is_true(json_object_get(j, "inbox")), inbox);
    json_decref(j);
    free(s);
    free(ref);
}

Test(ws_proto, encode_message_matches_reference)
{
    static const char *ids[] = {"id1", "", "q\"\\\x01", "\xff", "\xf0\x9f\x98\x80"};
    static const char *ctypes[] = {NULL, "", "text/plain", "a\"b\tc", "\xc3"};
    static const int64_t times[] = {0, 1, -1, 1732600000123, INT64_MAX, INT64_MIN};
    for (size_t c = 0; c < NCONTENTS; c++)
        for (size_t k = 0; k < 5; k++) {
            mg_msg *m = mg_msg_new(ids[k], ids[(k + 1) % 5], "bob", (const uint8_t *)contents[c].s,
                                   contents[c].n, ctypes[k], times[(c + k) % 6], MG_PRIO_HIGH);
            check_message(m, (c + k) % 2);
            mg_msg_free(m);
        }
    /* NULL id and from, and content NULL with length 0 */
    mg_msg m = {.id = NULL, .from = NULL, .content = NULL, .content_len = 0};
    check_message(&m, false);
}

Test(ws_proto, encode_message_each_control_character)
{
    for (int c = 0; c <= 0x7f; c++) {
        uint8_t text[3] = {'<', (uint8_t)c, '>'};
        mg_msg *m = mg_msg_new("i", "f", "t", text, 3, NULL, 7, MG_PRIO_HIGH);
        check_message(m, false);
        char *s = mg_ws_proto_encode_message(m, false, NULL);
        cr_assert_eq(strstr(s, "content_b64") != NULL, c == 0, "byte %#x: %s", c, s);
        free(s);
        mg_msg_free(m);
    }
}

Test(ws_proto, encode_message_golden)
{
    mg_msg *m = mg_msg_new("id1", "alice", "bob",
                           (const uint8_t *)"a\"\\/\b\f\n\r\t\x01\x1f\x7f\xc3\xa9\xf0\x9f\x98\x80",
                           18, "text/plain", -42, MG_PRIO_HIGH);
    char *s = mg_ws_proto_encode_message(m, true, NULL);
    cr_assert_str_eq(s, "{\"type\":\"message\",\"id\":\"id1\",\"from\":\"alice\","
                        "\"content\":\"a\\\"\\\\/\\b\\f\\n\\r\\t\\u0001\\u001F\x7f\xc3\xa9"
                        "\xf0\x9f\x98\x80\",\"content_type\":\"text/plain\",\"sent_at_ms\":-42,"
                        "\"inbox\":true}");
    free(s);
    mg_msg_free(m);
}

Test(ws_proto, encode_ack_and_error_match_reference)
{
    static const char *strs[] = {
        NULL, "", "m1", "q\"\\\n\x01\x7f", "\xff", "\xe2\x80\xa8", "\xf0\x9f\x98\x80"};
    size_t ns = sizeof(strs) / sizeof(strs[0]);
    for (size_t a = 0; a < ns; a++)
        for (size_t b = 0; b < ns; b++) {
            size_t len, rlen;
            char *s = mg_ws_proto_encode_ack(strs[a], (mg_status)(b % 8), (mg_path)(a % 6), strs[b],
                                             &len);
            char *ref =
                ref_encode_ack(strs[a], (mg_status)(b % 8), (mg_path)(a % 6), strs[b], &rlen);
            cr_assert_str_eq(s, ref);
            cr_assert_eq(len, rlen);
            free(s);
            free(ref);
            for (size_t c = 0; c < ns; c += 2) {
                s = mg_ws_proto_encode_error(strs[a], strs[b], strs[c], &len);
                ref = ref_encode_error(strs[a], strs[b], strs[c], &rlen);
                cr_assert_str_eq(s, ref);
                cr_assert_eq(len, rlen);
                free(s);
                free(ref);
            }
        }
}

/* ---- parser against the reference ------------------------------------- */

static const mg_ws_limits wide = {.max_content_bytes = 4096, .max_user_bytes = 64};

static bool same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Parses data with both parsers; they must agree on everything. Returns the
 * result; *got (may be NULL) receives the new parser's frame. */
static int scanned; /* frames agree() saw the scanner read without jansson */

static int agree(const char *data, size_t len, const mg_ws_limits *l, mg_ws_in *got)
{
    jval fields[F_COUNT];
    scanned += len > 0 && scan_frame(data, len, fields);
    mg_ws_in a, b;
    const char *ca = NULL, *cb = NULL;
    char ra[200] = "", rb[200] = "";
    int x = mg_ws_proto_parse(data, len, l, &a, &ca, ra, sizeof(ra));
    int y = ref_parse(data, len, l, &b, &cb, rb, sizeof(rb));
    cr_assert_eq(x, y, "frame %.*s: %d vs reference %d (%s)", (int)len, data, x, y, x ? ra : rb);
    if (x != 0) {
        cr_assert_str_eq(ca, cb, "frame %.*s", (int)len, data);
        cr_assert_str_eq(ra, rb, "frame %.*s", (int)len, data);
    }
    cr_assert_eq(a.type, b.type);
    cr_assert(same_str(a.id, b.id), "frame %.*s: id", (int)len, data);
    cr_assert(same_str(a.to, b.to), "frame %.*s: to", (int)len, data);
    cr_assert(same_str(a.content_type, b.content_type));
    cr_assert_eq(a.content_len, b.content_len, "frame %.*s: content", (int)len, data);
    cr_assert_eq(!a.content, !b.content);
    if (a.content)
        cr_assert_eq(memcmp(a.content, b.content, a.content_len + 1), 0);
    cr_assert_eq(a.priority, b.priority);
    mg_ws_in_clear(&b);
    if (got)
        *got = a;
    else
        mg_ws_in_clear(&a);
    return x;
}

static int agree_str(const char *frame, const mg_ws_limits *l)
{
    return agree(frame, strlen(frame), l, NULL);
}

Test(ws_proto, parse_content_as_jansson_escapes_it)
{
    static const size_t flags[] = {JSON_COMPACT, 0, JSON_ENSURE_ASCII, JSON_ESCAPE_SLASH,
                                   JSON_ENSURE_ASCII | JSON_ESCAPE_SLASH | JSON_INDENT(2)};
    for (size_t c = 0; c < NCONTENTS; c++) {
        json_t *v = json_stringn(contents[c].s, contents[c].n);
        if (!v || memchr(contents[c].s, 0, contents[c].n)) { /* not text */
            json_decref(v);
            continue;
        }
        for (size_t f = 0; f < sizeof(flags) / sizeof(flags[0]); f++) {
            json_t *o = json_pack("{s:s,s:s,s:O,s:s}", "type", "send", "to", "b\xc3\xa9", "content",
                                  v, "id", contents[c].n ? "x\\y\"" : "1");
            char *text = json_dumps(o, flags[f]);
            mg_ws_in in;
            cr_assert_eq(agree(text, strlen(text), &wide, &in), 0, "%s", text);
            cr_assert_eq(in.content_len, contents[c].n);
            cr_assert_eq(memcmp(in.content, contents[c].s, contents[c].n), 0, "%s", text);
            cr_assert_str_eq(in.to, "b\xc3\xa9");
            mg_ws_in_clear(&in);
            free(text);
            json_decref(o);
        }
        json_decref(v);
    }
}

Test(ws_proto, parse_escapes)
{
    mg_ws_in in;
    const char *f = "{\"type\":\"\\u0073end\",\"to\":\"b\",\"content\":"
                    "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u20AC\\ud83d\\ude00\\uDBFF\\uDFFF\","
                    "\"priority\":\"\\u006cow\"}";
    cr_assert_eq(agree(f, strlen(f), &wide, &in), 0);
    cr_assert_str_eq(in.content, "\"\\/\b\f\n\r\t\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"
                                 "\xf4\x8f\xbf\xbf");
    cr_assert_eq(in.priority, MG_PRIO_LOW);
    mg_ws_in_clear(&in);
}

Test(ws_proto, parse_malformed_like_reference)
{
    static const struct {
        const char *frame;
        const char *code;
    } rows[] = {
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"abc", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"abc\\", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"abc\"", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"abc\",", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"a\\x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"a\\u12\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"a\\u12G4\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\\ud800\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\\ud800x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\\ud800\\u0041\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\\udc00\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\\ud800\\ud800\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\\u0000\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"tab\there\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\xff\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\xed\xa0\x80\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"\xc0\xaf\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\"}x", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\"}{}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\" \"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":'x'}", MG_WS_ERR_BAD_JSON},
        {"{type:\"send\",\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"to\":\"c\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":null,\"to\":\"c\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":1,\"x\":2,\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"\\u0078\":1,\"x\":2,\"to\":\"b\",\"content\":\"x\"}",
         MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":{\"a\":1,\"a\":2},\"to\":\"b\",\"content\":\"x\"}",
         MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":[1,],\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":01,\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":-,\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":1.,\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":1e999,\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":99999999999999999999,\"to\":\"b\",\"content\":\"x\"}",
         MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":truex,\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":nul,\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"x\":[\"a\" \"b\"],\"to\":\"b\",\"content\":\"x\"}",
         MG_WS_ERR_BAD_JSON},
        {"\xef\xbb\xbf{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\"}\x0b", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\"}\n\t\r ", NULL},
        {"{\"type\":\"send\",\"x\":[[1,[true,false,null,\"\\u00e9\"]],-0,{}],\"y\":{\"a\":[{}]},"
         "\"z\":1.5e3,\"to\":\"b\",\"content\":\"x\"}",
         NULL},
        {"{\"type\":\"send\",\"to\":12,\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"send\",\"to\":1.5,\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"send\",\"to\":true,\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"send\",\"to\":[\"b\"],\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"send\",\"to\":{\"b\":1},\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":false}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":[],\"to\":\"b\",\"content\":\"x\"}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"ack\",\"id\":5}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"ack\",\"id\":\"a\\u0001\"}", MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"priority\":\"\\u0068igh\"}", NULL},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"priority\":\"HIGH\"}",
         MG_WS_ERR_BAD_FIELD},
        {"{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"content_type\":null}", NULL},
        {"{\"type\":\"send\",\"to\":\"b\"}", MG_WS_ERR_MISSING_FIELD},
        {"{\"type\":\"send\",\"content\":\"x\",\"to\":null}", MG_WS_ERR_MISSING_FIELD},
        {"{\"type\":null}", MG_WS_ERR_MISSING_FIELD},
        {" { } ", MG_WS_ERR_MISSING_FIELD},
        {"{\"type\":\"ack\",\"id\":null}", MG_WS_ERR_MISSING_FIELD},
        {"{\"type\":\"Send\"}", MG_WS_ERR_UNKNOWN_TYPE},
        {"{\"type\":\"send\\u0000\"}", MG_WS_ERR_BAD_JSON},
        {"{\"type\":\"a very long type name that goes on and on and on and on and on and on "
         "and on\"}",
         MG_WS_ERR_UNKNOWN_TYPE},
        {"[{\"type\":\"ack\",\"id\":\"a\"}]", MG_WS_ERR_BAD_JSON},
        {"null", MG_WS_ERR_BAD_JSON},
        {"", MG_WS_ERR_BAD_JSON},
        {"   ", MG_WS_ERR_BAD_JSON},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        mg_ws_in in;
        const char *code = NULL;
        char reason[200];
        const char *f = rows[i].frame;
        int r = mg_ws_proto_parse(f, strlen(f), &wide, &in, &code, reason, sizeof(reason));
        if (rows[i].code) {
            cr_assert_lt(r, 0, "accepted: %s", f);
            cr_assert_str_eq(code, rows[i].code, "%s: %s (%s)", f, code, reason);
        } else {
            cr_assert_eq(r, 0, "%s: %s (%s)", f, code, reason);
        }
        mg_ws_in_clear(&in);
        agree_str(f, &wide);
    }
}

Test(ws_proto, parse_content_limit)
{
    /* 4096 bytes is the limit: escapes count as what they decode to */
    size_t cap = 8 * 4096 + 200;
    char *f = mg_xmalloc(cap);
    for (int extra = -1; extra <= 1; extra++) {
        for (int esc = 0; esc < 3; esc++) {
            static const char *unit[] = {"x", "\\u0078", "\\n"};
            char *p = f + sprintf(f, "{\"type\":\"send\",\"to\":\"b\",\"content\":\"");
            for (int i = 0; i < 4096 + extra; i++)
                p += sprintf(p, "%s", unit[esc]);
            strcpy(p, "\"}");
            int r = agree(f, strlen(f), &wide, NULL);
            cr_assert_eq(r == 0, extra <= 0);
        }
    }
    free(f);
}

Test(ws_proto, parse_deep_nesting)
{
    /* within the scanner's depth, beyond it (jansson decides), beyond jansson's */
    static const int depths[] = {1, 31, 32, 33, 100, 2047, 2048, 5000, 100000};
    for (size_t d = 0; d < sizeof(depths) / sizeof(depths[0]); d++) {
        for (int obj = 0; obj < 2; obj++) {
            int n = depths[d];
            char *f = mg_xmalloc((size_t)n * 6 + 100);
            char *p = f + sprintf(f, "{\"type\":\"send\",\"x\":");
            for (int i = 0; i < n; i++)
                p += sprintf(p, obj && i % 2 ? "{\"k\":" : "[");
            for (int i = n - 1; i >= 0; i--)
                *p++ = obj && i % 2 ? '}' : ']';
            strcpy(p, ",\"to\":\"b\",\"content\":\"x\"}");
            agree(f, strlen(f), &wide, NULL);
            /* unterminated */
            f[strlen(f) / 2] = 0;
            agree(f, strlen(f), &wide, NULL);
            free(f);
        }
    }
}

Test(ws_proto, scanner_reads_common_frames)
{
    static const char *fast[] = {
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\"}",
        "{\"type\":\"ack\",\"id\":\"0192f3a0\"}",
        " {\n  \"content\": \"\\u00e9\\ud83d\\ude00\\n\",\r\n\t\"to\" : \"bob\", "
        "\"type\":\"send\"} ",
        "{\"type\":\"send\",\"to\":\"b\",\"content\":\"x\",\"id\":null,\"priority\":\"low\","
        "\"content_type\":\"text/plain\"}",
        "{\"type\":\"send\",\"to\":5,\"content\":\"x\",\"seq\":-12,\"tags\":[\"a\",[true,false,"
        "null]],"
        "\"\":[]}",
        "{}",
    };
    static const char *jansson[] = {
        "{\"type\":\"send\",\"meta\":{\"k\":1}}",          /* nested object */
        "{\"type\":\"send\",\"seq\":1.5}",                 /* real */
        "{\"type\":\"send\",\"seq\":1234567890123456789}", /* 19 digits */
        "{\"\\u0074ype\":\"send\"}",                       /* escaped key */
        "{\"type\":\"send\",\"type\":\"send\"}",           /* duplicate */
        "[]",
        "{\"type\":\"send\"",
        "{\"type\":\"send\"}x",
    };
    jval v[F_COUNT];
    for (size_t i = 0; i < sizeof(fast) / sizeof(fast[0]); i++)
        cr_assert(scan_frame(fast[i], strlen(fast[i]), v), "%s", fast[i]);
    for (size_t i = 0; i < sizeof(jansson) / sizeof(jansson[0]); i++)
        cr_assert_not(scan_frame(jansson[i], strlen(jansson[i]), v), "%s", jansson[i]);
    char deep[2 * MAX_ARRAY_DEPTH + 40];
    for (int d = MAX_ARRAY_DEPTH; d <= MAX_ARRAY_DEPTH + 1; d++) {
        int n = sprintf(deep, "{\"x\":");
        for (int i = 0; i < d; i++)
            deep[n++] = '[';
        for (int i = 0; i < d; i++)
            deep[n++] = ']';
        deep[n++] = '}';
        cr_assert_eq(scan_frame(deep, (size_t)n, v), d == MAX_ARRAY_DEPTH);
    }
}

/* ---- differential: generated frames ------------------------------------ */

static uint64_t rng_state;

static uint32_t rnd(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static void put(sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = mg_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void puts_(sbuf *b, const char *s)
{
    put(b, s, strlen(s));
}

static void ws(sbuf *b)
{
    static const char *w[] = {"", "", "", " ", "\n", "\t ", "\r\n  "};
    puts_(b, w[rnd(7)]);
}

/* A JSON string: letters, escapes of every kind, UTF-8 of every length, and
 * now and then something jansson rejects. */
static void gen_string(sbuf *b, int maxlen, bool faults)
{
    static const char *atoms[] = {
        "a",
        "b",
        "Z",
        "0",
        " ",
        "\\\"",
        "\\\\",
        "\\/",
        "\\b",
        "\\f",
        "\\n",
        "\\r",
        "\\t",
        "\\u0001",
        "\\u001f",
        "\\u007F",
        "\x7f",
        "\\u00e9",
        "\xc3\xa9",
        "\\u20ac",
        "\xe2\x82\xac",
        "\\u2028",
        "\xe2\x80\xa8",
        "\\ud83d\\ude00",
        "\\uD83D\\uDE00",
        "\xf0\x9f\x98\x80",
        "/",
        "\\u0041",
    };
    static const char *bad[] = {"\\x",          "\\u12",          "\\ud800", "\\udc00",
                                "\\u0000",      "\x01",           "\xff",    "\xc3",
                                "\xed\xa0\x80", "\\ud800\\u0041", "\t"};
    puts_(b, "\"");
    int n = (int)rnd((uint32_t)maxlen + 1);
    for (int i = 0; i < n; i++) {
        if (faults && rnd(200) == 0)
            puts_(b, bad[rnd(sizeof(bad) / sizeof(bad[0]))]);
        else
            puts_(b, atoms[rnd(sizeof(atoms) / sizeof(atoms[0]))]);
    }
    puts_(b, "\"");
}

/* Any JSON value, nested at most depth deep. */
static void gen_value(sbuf *b, int depth)
{
    static const char *scalars[] = {
        "0",    "-0",   "7",     "-12",  "123456789012345678",  "1.5",   "-2e3",
        "1E-7", "true", "false", "null", "9223372036854775807", "1e999", "99999999999999999999"};
    uint32_t k = rnd(depth > 0 ? 6 : 4);
    if (k == 0 || k == 1) { /* the last two overflow: now and then */
        puts_(b, scalars[rnd(sizeof(scalars) / sizeof(scalars[0]) - (rnd(10) ? 2 : 0))]);
    } else if (k == 2 || k == 3) {
        gen_string(b, 6, true);
    } else {
        bool obj = k == 5;
        int n = (int)rnd(4);
        puts_(b, obj ? "{" : "[");
        for (int i = 0; i < n; i++) {
            if (i)
                puts_(b, ",");
            ws(b);
            if (obj) {
                static const char *keys[] = {"\"a\"", "\"b\"", "\"type\"", "\"\""};
                puts_(b, keys[rnd(10) ? (uint32_t)i : rnd(4)]); /* now and then a duplicate */
                ws(b);
                puts_(b, ":");
                ws(b);
            }
            gen_value(b, depth - 1);
            ws(b);
        }
        puts_(b, obj ? "}" : "]");
    }
}

/* One field, "key":value, the way the frame's shape asks for it. */
static void gen_field(sbuf *b, int k, bool chaotic)
{
    static const char *keys[] = {"type", "id",   "to",       "content", "content_type", "priority",
                                 "x",    "meta", "\xc3\xa9", "Type",    "\\u0074ag",    "content "};
    static const char *types[] = {
        "\"send\"", "\"ack\"", "\"\\u0073end\"", "\"sub\"", "\"\"", "null", "1", "[]"};
    static const char *prios[] = {"\"high\"",   "\"low\"", "\"\\u006Cow\"",
                                  "\"urgent\"", "null",    "2"};
    static const char *tos[] = {
        "\"bob\"",
        "\"b\\u00e9\"",
        "\"\xf0\x9f\x98\x80\"",
        "\"\"",
        "\"a\\nb\"",
        "\"a\\u007f\"",
        "\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdefX\"",
        "null",
        "3",
        "{\"u\":\"bob\"}"};
    static const char *ids[] = {"\"m1\"", "\"0192f3a0-7c1e\"", "\"\\u0041b\"",
                                "\"\"",   "\"a\\tb\"",         "7"};
    ws(b);
    puts_(b, "\"");
    puts_(b, keys[k]);
    puts_(b, "\"");
    ws(b);
    puts_(b, ":");
    ws(b);
    switch (chaotic && rnd(10) == 0 ? -1 : k) {
    case 0:
        puts_(b, types[chaotic ? rnd(8) : 0]);
        break;
    case 1:
        if (chaotic)
            gen_string(b, rnd(8) ? 10 : 140, true);
        else
            puts_(b, ids[rnd(3)]);
        break;
    case 2:
        puts_(b, tos[rnd(chaotic ? 10 : 3)]);
        break;
    case 3:
        gen_string(b, chaotic && !rnd(8) ? 300 : 30, chaotic);
        break;
    case 4:
        if (rnd(2))
            puts_(b, "\"text/plain\"");
        else
            gen_string(b, chaotic && !rnd(8) ? 300 : 10, chaotic);
        break;
    case 5:
        puts_(b, prios[rnd(chaotic ? 6 : 3)]);
        break;
    default:
        gen_value(b, 3);
    }
    ws(b);
}

/* Mostly well-formed sends and acks with their fields in any order and
 * unknown fields between them; the rest anything, and some of it damaged. */
static void gen_frame(sbuf *b)
{
    int order[12], n = 0;
    uint32_t shape = rnd(10);
    bool chaotic = shape >= 7;
    if (shape <= 5) {
        order[n++] = 0;
        order[n++] = 2;
        order[n++] = 3;
        for (int k = 1; k < 6; k += 3)
            if (rnd(2))
                order[n++] = k == 1 ? 1 : (rnd(2) ? 4 : 5);
    } else if (shape == 6) {
        order[n++] = 0;
        order[n++] = 1;
    } else {
        for (int k = (int)rnd(8); k > 0; k--)
            order[n++] = (int)rnd(12);
    }
    for (int k = (int)rnd(4), u = (int)rnd(6); k > 0 && n < 12; k--) /* seldom a duplicate */
        order[n++] = 6 + (rnd(10) ? u++ : (int)rnd(6)) % 6;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)rnd((uint32_t)i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    b->len = 0;
    ws(b);
    puts_(b, "{");
    for (int i = 0; i < n; i++) {
        if (i)
            puts_(b, ",");
        gen_field(b, order[i], chaotic);
    }
    puts_(b, "}");
    ws(b);
    uint32_t d = rnd(30);
    if (d == 0 && b->len > 1)
        b->len = rnd((uint32_t)b->len);
    else if (d == 1)
        b->p[rnd((uint32_t)b->len)] = "x\"\\{}[],:\x01\xff 0"[rnd(13)];
    else if (d == 2)
        puts_(b, rnd(2) ? "x" : "{}");
}

Test(ws_proto, differential_generated_frames)
{
    static const mg_ws_limits small = {.max_content_bytes = 100, .max_user_bytes = 64};
    sbuf b = {0};
    int ok = 0, failed = 0;
    rng_state = 0x9E3779B97F4A7C15ull;
    scanned = 0;
    for (int i = 0; i < 1000; i++) {
        gen_frame(&b);
        if (agree(b.p, b.len, &small, NULL) == 0)
            ok++;
        else
            failed++;
    }
    free(b.p);
    /* a mix of outcomes, and most well-formed frames read without jansson */
    cr_assert_gt(ok, 300, "only %d of the frames parse", ok);
    cr_assert_gt(failed, 300, "only %d of the frames fail", failed);
    cr_assert_gt(scanned, 250, "only %d frames read by the scanner", scanned);
}

#define TP "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

/* "traceparent" of a send or an ack: read by both readers, and a bad one is
 * ignored, never an error for the sender. */
Test(ws_proto, traceparent_is_read_and_never_refuses)
{
    static const char *ok[] = {
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\",\"traceparent\":\"" TP "\"}",
        /* an object value sends the frame to jansson */
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\",\"x\":{\"y\":1},\"traceparent\":\"" TP
        "\"}",
        /* an escape in the value (\u0030 is '0') */
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\",\"traceparent\":"
        "\"\\u00300-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}",
        "{\"type\":\"ack\",\"id\":\"m1\",\"traceparent\":\"" TP "\"}",
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        mg_ws_in in;
        const char *code;
        cr_assert_eq(parse(ok[i], &in, &code), 0, "refused %s", ok[i]);
        cr_assert(mg_trace_valid(&in.trace) && mg_trace_sampled(&in.trace), "no trace: %s", ok[i]);
        cr_assert_eq(in.trace.trace_id[0], 0x4b);
        mg_ws_in_clear(&in);
    }
    static const char *ignored[] = {
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\",\"traceparent\":\"00-ABC\"}",
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\",\"traceparent\":17}",
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\",\"traceparent\":null}",
        "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"hi\",\"traceparent\":\"" TP TP "\"}",
        "{\"type\":\"ack\",\"id\":\"m1\",\"traceparent\":[1]}",
    };
    for (size_t i = 0; i < sizeof(ignored) / sizeof(ignored[0]); i++) {
        mg_ws_in in;
        const char *code;
        cr_assert_eq(parse(ignored[i], &in, &code), 0, "refused %s", ignored[i]);
        cr_assert_not(mg_trace_valid(&in.trace), "kept a trace from %s", ignored[i]);
        mg_ws_in_clear(&in);
    }
}

Test(ws_proto, message_frame_names_a_sampled_trace)
{
    mg_msg *m = mg_msg_new("m1", "alice", "bob", (const uint8_t *)"hi", 2, NULL, 7, MG_PRIO_HIGH);
    size_t len;
    char *plain = mg_ws_proto_encode_message(m, false, &len);
    cr_assert_null(strstr(plain, "trace"), "an untraced message names no trace: %s", plain);
    free(plain);
    cr_assert_eq(mg_traceparent_parse(TP, strlen(TP), &m->trace), 0);
    char *t = mg_ws_proto_encode_message(m, false, &len);
    cr_assert_eq(len, strlen(t));
    cr_assert_eq(mg_ws_proto_message_len(m, false), len);
    cr_assert_str_eq(t, "{\"type\":\"message\",\"id\":\"m1\",\"from\":\"alice\",\"content\":\"hi\","
                        "\"sent_at_ms\":7,\"inbox\":false,"
                        "\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\","
                        "\"traceparent\":\"" TP "\"}");
    /* where the hub writes each connection's span id */
    size_t at = mg_ws_proto_traceparent_at(t, len);
    cr_assert(at > 0 && !memcmp(t + at, TP, MG_TRACEPARENT_LEN), "traceparent at %zu", at);
    free(t);
    m->trace.flags = 0; /* continued but not sampled: nothing to join */
    t = mg_ws_proto_encode_message(m, false, &len);
    cr_assert_null(strstr(t, "trace"));
    cr_assert_eq(mg_ws_proto_traceparent_at(t, len), 0, "no traceparent: nothing to write over");
    free(t);
    /* content that looks like the field is not taken for it */
    static const char fake[] = "{\"content\":\"\\\"traceparent\\\":\\\"" TP "\"}";
    cr_assert_eq(mg_ws_proto_traceparent_at(fake, strlen(fake)), 0, "%s", fake);
    mg_msg_free(m);
}
