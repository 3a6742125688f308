/* Unit tests of the WebSocket JSON protocol (gateway/ws_proto.c, included to
 * reach its statics).
 *
 * The encoders once built jansson trees; their code is kept below as the
 * reference (ref_*) the direct encoders must agree with byte for byte (its
 * helper that did not change, base64, is the one in ws_proto.c). */
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
