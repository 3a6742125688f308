/* Unit tests of the WebSocket JSON protocol (gateway/ws_proto.c). */
#include "gateway/ws_proto.h"

#include <criterion/criterion.h>
#include <jansson.h>
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
