/* ws_proto.c: the WebSocket JSON protocol (see ws_proto.h).
 *
 * Owns nothing: pure parse/encode functions, called on the WebSocket service
 * thread (parse, errors) and on whatever thread delivers a message (encode:
 * router workers, gRPC threads, the Kafka consumer).
 * Guarantees: a parse either fills the whole mg_ws_in or leaves it empty and
 * names the problem with a stable error code; encoders never fail (allocation
 * failure aborts, as mg_alloc does).
 *
 * DESIGN. Every delivered message is encoded here, so the encoders build no
 * jansson tree.
 * - Encoders describe a frame as a short list of fields (jframe), compute its
 *   exact length, and write the text straight into the buffer: byte for byte
 *   what json_dumps(JSON_COMPACT) wrote before them (same field order; only
 *   the escapes jansson writes: \" \\ \b \f \n \r \t and \u00XX in upper case
 *   for other control characters; "?" for a string field that is not valid
 *   UTF-8). tests/gateway/test_ws_proto.c compares them with the old jansson
 *   encoders.
 * The parser still reads frames into a jansson tree.
 */
#include "gateway/ws_proto.h"
#include "common/mg_alloc.h"

#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Length of the UTF-8 sequence starting with the non-ASCII byte s[0] (avail
 * bytes available), or 0 when it is not valid: overlong forms, surrogates and
 * code points above U+10FFFF are rejected, as jansson rejects them. */
static size_t utf8_seq(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0];
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
        return 0;
    }
    if (avail - 1 < n)
        return 0;
    for (size_t k = 1; k <= n; k++) {
        if ((s[k] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n + 1;
}

bool mg_utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if (len - i >= 8) { /* most text is ASCII: eight bytes at a time */
            uint64_t w;
            memcpy(&w, s + i, 8);
            if ((w & UINT64_C(0x8080808080808080)) == 0) {
                i += 8;
                continue;
            }
        }
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = utf8_seq(s + i, len - i);
        if (n == 0)
            return false;
        i += n;
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

/* ---- encoders ------------------------------------------------------------ */

typedef enum { J_STR, J_B64, J_INT, J_BOOL } jkind;

typedef struct jfield {
    const char *key; /* a literal that needs no escaping */
    jkind kind;
    const char *s; /* J_STR: valid UTF-8 without NUL; J_B64: the bytes */
    size_t n;
    int64_t i; /* J_INT, J_BOOL */
} jfield;

#define MAX_FIELDS 8

typedef struct jframe {
    jfield f[MAX_FIELDS];
    size_t n;
} jframe;

static void add_field(jframe *fr, const char *key, jkind kind, const char *s, size_t n, int64_t i)
{
    fr->f[fr->n++] = (jfield){.key = key, .kind = kind, .s = s, .n = n, .i = i};
}

/* A string field as jansson's json_string took it: NULL is "", and text that
 * is not valid UTF-8 (from a trusted source) becomes "?" rather than a crash. */
static void add_str(jframe *fr, const char *key, const char *v)
{
    if (!v)
        v = "";
    size_t n = strlen(v);
    if (!mg_utf8_valid((const unsigned char *)v, n)) {
        v = "?";
        n = 1;
    }
    add_field(fr, key, J_STR, v, n, 0);
}

/* Extra bytes a byte takes in a JSON string: 1 for \" \\ \b \f \n \r \t, 5 for
 * \u00XX (the other control characters), 0 for everything else. */
static const uint8_t esc_extra[256] = {
    [0x00 ... 0x07] = 5, ['\b'] = 1, ['\t'] = 1,          ['\n'] = 1, [0x0B] = 5,
    ['\f'] = 1,          ['\r'] = 1, [0x0E ... 0x1F] = 5, ['"'] = 1,  ['\\'] = 1,
};

static size_t esc_len(const char *s, size_t n)
{
    size_t len = n;
    for (size_t i = 0; i < n; i++)
        len += esc_extra[(unsigned char)s[i]];
    return len;
}

static char *esc_put(char *d, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t i = 0;
    for (;;) {
        size_t j = i;
        while (j < n && !esc_extra[(unsigned char)s[j]])
            j++;
        memcpy(d, s + i, j - i);
        d += j - i;
        if (j == n)
            return d;
        unsigned char c = (unsigned char)s[j];
        *d++ = '\\';
        switch (c) {
        case '"':
        case '\\':
            *d++ = (char)c;
            break;
        case '\b':
            *d++ = 'b';
            break;
        case '\f':
            *d++ = 'f';
            break;
        case '\n':
            *d++ = 'n';
            break;
        case '\r':
            *d++ = 'r';
            break;
        case '\t':
            *d++ = 't';
            break;
        default:
            memcpy(d, "u00", 3);
            d[3] = hex[c >> 4];
            d[4] = hex[c & 15];
            d += 5;
        }
        i = j + 1;
    }
}

static size_t b64_len(size_t n)
{
    return 4 * ((n + 2) / 3);
}

/* Standard base64 with padding. */
static char *b64_put(char *d, const uint8_t *in, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *d++ = tbl[v >> 18];
        *d++ = tbl[(v >> 12) & 63];
        *d++ = tbl[(v >> 6) & 63];
        *d++ = tbl[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        *d++ = tbl[v >> 18];
        *d++ = tbl[(v >> 12) & 63];
        *d++ = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        *d++ = '=';
    }
    return d;
}

/* Decimal digits of v with its sign, as jansson prints a json_int_t. */
static char *int_put(char *d, int64_t v)
{
    char tmp[20];
    size_t k = 0;
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    if (v < 0)
        *d++ = '-';
    do {
        tmp[k++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    while (k)
        *d++ = tmp[--k];
    return d;
}

static size_t int_len(int64_t v)
{
    char tmp[24];
    return (size_t)(int_put(tmp, v) - tmp);
}

static size_t frame_len(const jframe *fr)
{
    size_t len = 2; /* {} */
    for (size_t k = 0; k < fr->n; k++) {
        const jfield *f = &fr->f[k];
        len += (k > 0) + strlen(f->key) + 3; /* ,"key": */
        switch (f->kind) {
        case J_STR:
            len += esc_len(f->s, f->n) + 2;
            break;
        case J_B64:
            len += b64_len(f->n) + 2;
            break;
        case J_INT:
            len += int_len(f->i);
            break;
        case J_BOOL:
            len += f->i ? 4 : 5;
            break;
        }
    }
    return len;
}

/* Writes exactly frame_len(fr) bytes at d; returns the end. */
static char *frame_put(char *d, const jframe *fr)
{
    *d++ = '{';
    for (size_t k = 0; k < fr->n; k++) {
        const jfield *f = &fr->f[k];
        size_t kn = strlen(f->key);
        if (k > 0)
            *d++ = ',';
        *d++ = '"';
        memcpy(d, f->key, kn);
        d += kn;
        memcpy(d, "\":", 2);
        d += 2;
        switch (f->kind) {
        case J_STR:
        case J_B64:
            *d++ = '"';
            d = f->kind == J_STR ? esc_put(d, f->s, f->n) : b64_put(d, (const uint8_t *)f->s, f->n);
            *d++ = '"';
            break;
        case J_INT:
            d = int_put(d, f->i);
            break;
        case J_BOOL:
            memcpy(d, f->i ? "true" : "false", f->i ? 4 : 5);
            d += f->i ? 4 : 5;
            break;
        }
    }
    *d++ = '}';
    return d;
}

static char *encode(const jframe *fr, size_t *len)
{
    size_t n = frame_len(fr);
    char *s = mg_xmalloc(n + 1);
    *frame_put(s, fr) = 0;
    if (len)
        *len = n;
    return s;
}

char *mg_ws_proto_encode_ack(const char *id, mg_status status, mg_path path, const char *reason,
                             size_t *len)
{
    jframe fr = {.n = 0};
    add_str(&fr, "type", "ack");
    add_str(&fr, "id", id);
    add_str(&fr, "status", mg_status_name(status));
    add_str(&fr, "path", mg_path_name(path));
    if (reason && reason[0])
        add_str(&fr, "reason", reason);
    return encode(&fr, len);
}

/* Content that is not UTF-8 text (or holds a NUL) goes as content_b64. */
static void message_frame(jframe *fr, const mg_msg *m, bool from_inbox)
{
    const char *c = (const char *)m->content;
    fr->n = 0;
    add_str(fr, "type", "message");
    add_str(fr, "id", m->id);
    add_str(fr, "from", m->from);
    if (m->content_len == 0)
        add_field(fr, "content", J_STR, "", 0, 0);
    else if (!memchr(c, 0, m->content_len) && mg_utf8_valid(m->content, m->content_len))
        add_field(fr, "content", J_STR, c, m->content_len, 0);
    else
        add_field(fr, "content_b64", J_B64, c, m->content_len, 0);
    if (m->content_type && m->content_type[0])
        add_str(fr, "content_type", m->content_type);
    add_field(fr, "sent_at_ms", J_INT, NULL, 0, m->sent_at_ms);
    add_field(fr, "inbox", J_BOOL, NULL, 0, from_inbox);
}

char *mg_ws_proto_encode_message(const mg_msg *m, bool from_inbox, size_t *len)
{
    jframe fr;
    message_frame(&fr, m, from_inbox);
    return encode(&fr, len);
}

size_t mg_ws_proto_message_len(const mg_msg *m, bool from_inbox)
{
    jframe fr;
    message_frame(&fr, m, from_inbox);
    return frame_len(&fr);
}

size_t mg_ws_proto_render_message(char *dst, const mg_msg *m, bool from_inbox)
{
    jframe fr;
    message_frame(&fr, m, from_inbox);
    return (size_t)(frame_put(dst, &fr) - dst);
}

char *mg_ws_proto_encode_error(const char *code, const char *reason, const char *id, size_t *len)
{
    jframe fr = {.n = 0};
    add_str(&fr, "type", "error");
    add_str(&fr, "code", code);
    add_str(&fr, "reason", reason);
    if (id && id[0])
        add_str(&fr, "id", id);
    return encode(&fr, len);
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
