/* ws_proto.c: the WebSocket JSON protocol (see ws_proto.h).
 *
 * Owns nothing: pure parse/encode functions, called on the WebSocket service
 * thread (parse, errors) and on whatever thread delivers a message (encode:
 * router workers, gRPC threads, the Kafka consumer).
 * Guarantees: a parse either fills the whole mg_ws_in or leaves it empty and
 * names the problem with a stable error code; encoders never fail (allocation
 * failure aborts, as mg_alloc does).
 *
 * DESIGN. Both directions are on the message path, so neither builds a
 * jansson tree for the frames clients actually send and receive.
 * - Encoders describe a frame as a short list of fields (jframe), compute its
 *   exact length, and write the text straight into the buffer: byte for byte
 *   what json_dumps(JSON_COMPACT) wrote before them (same field order; only
 *   the escapes jansson writes: \" \\ \b \f \n \r \t and \u00XX in upper case
 *   for other control characters; "?" for a string field that is not valid
 *   UTF-8). tests/gateway/test_ws_proto.c compares them with the old jansson
 *   encoders.
 * - The parser reads the frame in one pass (scan_frame) when it has the
 *   common shape: one object whose values are strings, null, true, false,
 *   integers of up to 18 digits, or arrays of those at most MAX_ARRAY_DEPTH
 *   deep (a counter, no recursion), with unescaped keys, at most
 *   MAX_UNKNOWN_KEYS of them unknown. It validates what jansson validates
 *   (UTF-8, escapes, surrogate pairs, no \u0000, duplicate keys, nothing after
 *   the object) and records where the six known fields are. Anything else,
 *   malformed or merely unusual (nested objects, reals), is handed to jansson
 *   with the flags used before, so a malformed frame gets jansson's own
 *   reason. Both readers feed one set of field checks (check_fields), so they
 *   cannot disagree on codes or reasons; the test file keeps the old parser
 *   and compares the two on generated frames.
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

/* A JWT is compact ASCII (base64url and dots); anything else is refused
 * before it reaches the verifier. */
static bool valid_token(const char *s, size_t n)
{
    if (!s || n == 0 || n > MG_WS_MAX_TOKEN_BYTES || n != strlen(s))
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7F)
            return false;
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
    free(in->token);
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

#define MAX_FIELDS 10

typedef struct jframe {
    jfield f[MAX_FIELDS];
    size_t n;
    char trace_id[33], traceparent[MG_TRACEPARENT_LEN + 1]; /* a traced message's */
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
    if (mg_trace_valid(&m->trace) && mg_trace_sampled(&m->trace)) { /* last: see below */
        mg_trace_id_hex(&m->trace, fr->trace_id);
        mg_traceparent_format(&m->trace, fr->traceparent);
        add_field(fr, "trace_id", J_STR, fr->trace_id, 32, 0);
        add_field(fr, "traceparent", J_STR, fr->traceparent, MG_TRACEPARENT_LEN, 0);
    }
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

size_t mg_ws_proto_traceparent_at(const char *text, size_t len)
{
    static const char key[] = "\"traceparent\":\"";
    size_t kn = sizeof(key) - 1, tail = MG_TRACEPARENT_LEN + 2; /* the value, then "} */
    if (len < kn + tail || memcmp(text + len - tail - kn, key, kn) != 0 ||
        memcmp(text + len - 2, "\"}", 2) != 0)
        return 0;
    return len - tail;
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

char *mg_ws_proto_encode_refreshed(int64_t exp, size_t *len)
{
    jframe fr = {.n = 0};
    add_str(&fr, "type", "refreshed");
    add_field(&fr, "exp", J_INT, NULL, 0, exp);
    return encode(&fr, len);
}

char *mg_ws_proto_encode_ready(const char *conn_id, const char *user, bool degraded, size_t *len)
{
    jframe fr = {.n = 0};
    add_str(&fr, "type", "ready");
    add_str(&fr, "conn", conn_id);
    add_str(&fr, "user", user);
    if (degraded)
        add_field(&fr, "degraded", J_BOOL, NULL, 0, 1);
    return encode(&fr, len);
}

/* ---- parser -------------------------------------------------------------- */

#define MAX_ARRAY_DEPTH  32
#define MAX_UNKNOWN_KEYS 16

enum { F_TYPE, F_ID, F_TO, F_CONTENT, F_CONTENT_TYPE, F_PRIORITY, F_TOKEN, F_TRACEPARENT, F_COUNT };
static const char *const field_names[F_COUNT] = {
    "type", "id", "to", "content", "content_type", "priority", "token", "traceparent"};

typedef enum { V_ABSENT = 0, V_NULL, V_STR, V_OTHER } vkind;

/* A known field as found. V_STR: p[0..n) is the string, with its JSON escapes
 * still in it when esc (already checked: unescape cannot fail). */
typedef struct jval {
    vkind kind;
    bool esc;
    const char *p;
    size_t n;
} jval;

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static bool hex4(const char *p, uint32_t *v)
{
    *v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p[k];
        uint32_t d;
        if (c >= '0' && c <= '9')
            d = (uint32_t)(c - '0');
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
            d = (uint32_t)((c | 0x20) - 'a' + 10);
        else
            return false;
        *v = *v << 4 | d;
    }
    return true;
}

/* Reads \uXXXX at p, and the low surrogate escape after a high one, into *cp.
 * Returns the byte after, or NULL for what jansson rejects: bad hex digits, a
 * lone surrogate, \u0000. */
static const char *read_u(const char *p, const char *end, uint32_t *cp)
{
    uint32_t hi, lo;
    if (end - p < 6 || !hex4(p + 2, &hi))
        return NULL;
    p += 6;
    if (hi == 0 || (hi >= 0xDC00 && hi <= 0xDFFF))
        return NULL;
    if (hi >= 0xD800 && hi <= 0xDBFF) {
        if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &lo) || lo < 0xDC00 ||
            lo > 0xDFFF)
            return NULL;
        hi = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
        p += 6;
    }
    *cp = hi;
    return p;
}

/* Byte classes inside a string: 0 plain ASCII, 1 '"', 2 '\\', 3 a control
 * character (rejected), 4 the start of a UTF-8 sequence. */
static const uint8_t str_class[256] = {
    [0x00 ... 0x1F] = 3,
    ['"'] = 1,
    ['\\'] = 2,
    [0x80 ... 0xFF] = 4,
};

/* Scans a string body from p (just after its opening quote) as jansson would
 * accept it. Returns the byte after the closing quote, or NULL; sets *esc when
 * the body holds escapes. */
static const char *scan_string(const char *p, const char *end, bool *esc)
{
    uint32_t cp;
    size_t k;
    for (;;) {
        while (p < end && str_class[(unsigned char)*p] == 0)
            p++;
        if (p == end)
            return NULL;
        switch (str_class[(unsigned char)*p]) {
        case 1:
            return p + 1;
        case 2:
            *esc = true;
            if (end - p < 2)
                return NULL;
            if (p[1] == 'u')
                p = read_u(p, end, &cp);
            else if (p[1] && strchr("\"\\/bfnrt", p[1]))
                p += 2;
            else
                return NULL;
            if (!p)
                return NULL;
            break;
        case 3:
            return NULL;
        default:
            k = utf8_seq((const unsigned char *)p, (size_t)(end - p));
            if (k == 0)
                return NULL;
            p += k;
        }
    }
}

static char *utf8_put(char *d, uint32_t cp)
{
    if (cp < 0x80) {
        *d++ = (char)cp;
    } else if (cp < 0x800) {
        *d++ = (char)(0xC0 | cp >> 6);
        *d++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *d++ = (char)(0xE0 | cp >> 12);
        *d++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *d++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *d++ = (char)(0xF0 | cp >> 18);
        *d++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *d++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *d++ = (char)(0x80 | (cp & 0x3F));
    }
    return d;
}

/* Writes v's string to d (room for v->n + 1 bytes: unescaping only shrinks),
 * NUL-terminated; returns its length. */
static size_t unescape(char *d, const jval *v)
{
    const char *p = v->p, *end = v->p + v->n;
    char *d0 = d;
    while (p < end) {
        const char *b = v->esc ? memchr(p, '\\', (size_t)(end - p)) : NULL;
        size_t run = (size_t)((b ? b : end) - p);
        memcpy(d, p, run);
        d += run;
        p += run;
        if (!b)
            break;
        uint32_t cp;
        switch (p[1]) {
        case 'u':
            p = read_u(p, end, &cp);
            d = utf8_put(d, cp);
            continue;
        case 'b':
            *d++ = '\b';
            break;
        case 'f':
            *d++ = '\f';
            break;
        case 'n':
            *d++ = '\n';
            break;
        case 'r':
            *d++ = '\r';
            break;
        case 't':
            *d++ = '\t';
            break;
        default: /* " \ / */
            *d++ = p[1];
        }
        p += 2;
    }
    *d = 0;
    return (size_t)(d - d0);
}

/* A malloc'd copy of v's string; *n receives its length. */
static char *take(const jval *v, size_t *n)
{
    char *s = mg_xmalloc(v->n + 1);
    *n = unescape(s, v);
    return s;
}

/* v's string in buf when it fits, else in a malloc'd copy (the caller frees
 * what is not buf). */
static char *peek(const jval *v, char *buf, size_t bufsize)
{
    char *s = v->n < bufsize ? buf : mg_xmalloc(v->n + 1);
    unescape(s, v);
    return s;
}

/* Skips a scalar that is not a string: null, true, false, or an integer of at
 * most 18 digits (reals and longer integers are left to jansson, which
 * rejects overflow). *kind is V_NULL for null. */
static const char *skip_scalar(const char *p, const char *end, vkind *kind)
{
    size_t left = (size_t)(end - p);
    *kind = V_OTHER;
    if (*p == '-' || (*p >= '0' && *p <= '9')) {
        const char *q = p + (*p == '-'), *digits = q;
        if (q < end && *q == '0')
            q++;
        else
            while (q < end && *q >= '0' && *q <= '9')
                q++;
        if (q == digits || q - digits > 18 || (q < end && (*q == '.' || *q == 'e' || *q == 'E')))
            return NULL;
        return q;
    }
    if (left >= 4 && memcmp(p, "null", 4) == 0) {
        *kind = V_NULL;
        return p + 4;
    }
    if (left >= 4 && memcmp(p, "true", 4) == 0)
        return p + 4;
    if (left >= 5 && memcmp(p, "false", 5) == 0)
        return p + 5;
    return NULL; /* an object, a malformed token, or the end */
}

/* Skips a value that is not an object: a scalar or arrays of scalars and
 * arrays, nested at most MAX_ARRAY_DEPTH deep (a counter, no recursion).
 * Returns the byte after it, or NULL. *kind is V_NULL for null. */
static const char *skip_value(const char *p, const char *end, vkind *kind)
{
    int depth = 0;
    *kind = V_OTHER;
    for (;;) {
        if (p == end)
            return NULL;
        if (*p == '[') {
            if (++depth > MAX_ARRAY_DEPTH)
                return NULL;
            p = skip_ws(p + 1, end);
            if (p == end || *p != ']')
                continue; /* at the first element */
            p++;
            depth--;
        } else if (*p == '"') {
            bool esc = false;
            p = scan_string(p + 1, end, &esc);
        } else {
            vkind k;
            p = skip_scalar(p, end, &k);
            if (depth == 0)
                *kind = k;
        }
        if (!p)
            return NULL;
        /* A value ended: close arrays, or go on to the next element. */
        for (;;) {
            if (depth == 0)
                return p;
            p = skip_ws(p, end);
            if (p == end)
                return NULL;
            if (*p == ']') {
                p++;
                depth--;
                continue;
            }
            if (*p != ',')
                return NULL;
            p = skip_ws(p + 1, end);
            break;
        }
    }
}

static int field_index(const char *k, size_t n)
{
    for (int f = 0; f < F_COUNT; f++)
        if (strlen(field_names[f]) == n && memcmp(field_names[f], k, n) == 0)
            return f;
    return -1;
}

/* Reads a frame of the common shape (see DESIGN above) in one pass, filling
 * v[F_COUNT]. Returns false when jansson must decide: the frame is malformed
 * (a duplicate key included) or just unusual. */
static bool scan_frame(const char *data, size_t len, jval *v)
{
    const char *p = data, *end = data + len;
    const char *unknown[MAX_UNKNOWN_KEYS];
    size_t unknown_len[MAX_UNKNOWN_KEYS], nunknown = 0;
    memset(v, 0, F_COUNT * sizeof(*v));
    p = skip_ws(p, end);
    if (p == end || *p != '{')
        return false;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}')
        return skip_ws(p + 1, end) == end;
    for (;;) {
        bool esc = false;
        if (p == end || *p != '"')
            return false;
        const char *key = p + 1;
        p = scan_string(key, end, &esc);
        if (!p || esc)
            return false;
        size_t kn = (size_t)(p - 1 - key);
        int f = field_index(key, kn);
        if (f >= 0 && v[f].kind != V_ABSENT)
            return false;
        if (f < 0) {
            for (size_t i = 0; i < nunknown; i++)
                if (unknown_len[i] == kn && memcmp(unknown[i], key, kn) == 0)
                    return false;
            if (nunknown == MAX_UNKNOWN_KEYS)
                return false;
            unknown[nunknown] = key;
            unknown_len[nunknown++] = kn;
        }
        p = skip_ws(p, end);
        if (p == end || *p != ':')
            return false;
        p = skip_ws(p + 1, end);
        jval val = {.kind = V_STR, .esc = false};
        if (p < end && *p == '"') {
            val.p = p + 1;
            p = scan_string(val.p, end, &val.esc);
            val.n = p ? (size_t)(p - 1 - val.p) : 0;
        } else {
            p = skip_value(p, end, &val.kind);
        }
        if (!p)
            return false;
        if (f >= 0)
            v[f] = val;
        p = skip_ws(p, end);
        if (p == end)
            return false;
        if (*p == '}')
            return skip_ws(p + 1, end) == end;
        if (*p != ',')
            return false;
        p = skip_ws(p + 1, end);
    }
}

/* An optional traceparent (send, ack): a valid one is kept, anything else
 * (not a string, not W3C) is ignored, never an error for the sender. */
static void take_trace(const jval *v, mg_trace_ctx *out)
{
    char buf[64];
    if (v->kind != V_STR || v->n > 6 * 64) /* room for escapes; longer is never valid */
        return;
    char *s = peek(v, buf, sizeof(buf));
    mg_traceparent_parse(s, strlen(s), out);
    if (s != buf)
        free(s);
}

/* 0 absent or null, 1 a string, -1 another type: how the protocol reads an
 * optional field. */
static int str_kind(const jval *v)
{
    return v->kind == V_STR ? 1 : v->kind == V_OTHER ? -1 : 0;
}

#define FAIL(c, ...)                                                                               \
    do {                                                                                           \
        *code = (c);                                                                               \
        snprintf(reason, reasonlen, __VA_ARGS__);                                                  \
        goto out;                                                                                  \
    } while (0)

/* The protocol's checks over the fields of a frame, whichever reader found
 * them. Fills *out (empty on entry) or leaves it empty and names the problem. */
static int check_fields(const jval *v, const mg_ws_limits *lim, mg_ws_in *out, const char **code,
                        char *reason, size_t reasonlen)
{
    char tbuf[64], pbuf[16], *type = NULL, *prio = NULL;
    size_t n = 0;
    int rc = -EINVAL, r = str_kind(&v[F_TYPE]);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: type");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "type must be a string");
    type = peek(&v[F_TYPE], tbuf, sizeof(tbuf));

    if (strcmp(type, "ack") == 0) {
        out->type = MG_WS_IN_ACK;
        r = str_kind(&v[F_ID]);
        if (r == 0)
            FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: id");
        if (r > 0)
            out->id = take(&v[F_ID], &n);
        if (r < 0 || !valid_id(out->id, n))
            FAIL(MG_WS_ERR_BAD_FIELD, "id must be a string of 1..%d printable bytes",
                 MG_WS_MAX_ID_BYTES);
        take_trace(&v[F_TRACEPARENT], &out->trace);
        rc = 0;
        goto out;
    }
    if (strcmp(type, "refresh") == 0) {
        out->type = MG_WS_IN_REFRESH;
        r = str_kind(&v[F_TOKEN]);
        if (r == 0)
            FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: token");
        if (r > 0)
            out->token = take(&v[F_TOKEN], &n);
        if (r < 0 || !valid_token(out->token, n))
            FAIL(MG_WS_ERR_BAD_FIELD, "token must be a string of 1..%d printable ASCII bytes",
                 MG_WS_MAX_TOKEN_BYTES);
        rc = 0;
        goto out;
    }
    if (strcmp(type, "send") != 0)
        FAIL(MG_WS_ERR_UNKNOWN_TYPE, "unknown type: %.40s", type);

    out->type = MG_WS_IN_SEND;
    out->priority = MG_PRIO_HIGH;
    r = str_kind(&v[F_ID]);
    if (r > 0)
        out->id = take(&v[F_ID], &n);
    if (r < 0 || (r > 0 && !valid_id(out->id, n)))
        FAIL(MG_WS_ERR_BAD_FIELD, "id must be a string of 1..%d printable bytes",
             MG_WS_MAX_ID_BYTES);

    r = str_kind(&v[F_TO]);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: to");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "to must be a string");
    out->to = take(&v[F_TO], &n);
    if (n != strlen(out->to) || !mg_ws_proto_valid_user(out->to, lim->max_user_bytes))
        FAIL(MG_WS_ERR_BAD_FIELD, "to must be a user id of 1..%zu bytes without control characters",
             lim->max_user_bytes);

    r = str_kind(&v[F_CONTENT]);
    if (r == 0)
        FAIL(MG_WS_ERR_MISSING_FIELD, "missing field: content");
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "content must be a string");
    out->content = take(&v[F_CONTENT], &n);
    out->content_len = n;
    if (n > lim->max_content_bytes)
        FAIL(MG_WS_ERR_TOO_LARGE, "content is %zu bytes, the limit is %zu", n,
             lim->max_content_bytes);

    r = str_kind(&v[F_CONTENT_TYPE]);
    if (r > 0)
        out->content_type = take(&v[F_CONTENT_TYPE], &n);
    if (r < 0 || (r > 0 && (n > 255 || n != strlen(out->content_type))))
        FAIL(MG_WS_ERR_BAD_FIELD, "content_type must be a string of at most 255 bytes");

    r = str_kind(&v[F_PRIORITY]);
    if (r < 0)
        FAIL(MG_WS_ERR_BAD_FIELD, "priority must be \"high\" or \"low\"");
    if (r > 0) {
        prio = peek(&v[F_PRIORITY], pbuf, sizeof(pbuf));
        if (strcmp(prio, "high") == 0)
            out->priority = MG_PRIO_HIGH;
        else if (strcmp(prio, "low") == 0)
            out->priority = MG_PRIO_LOW;
        else
            FAIL(MG_WS_ERR_BAD_FIELD, "priority must be \"high\" or \"low\"");
    }
    take_trace(&v[F_TRACEPARENT], &out->trace);
    rc = 0;
out:
    if (type != tbuf)
        free(type);
    if (prio != pbuf)
        free(prio);
    if (rc != 0)
        mg_ws_in_clear(out);
    return rc;
}

/* The reader for everything scan_frame leaves alone: a jansson tree, with the
 * flags (and so the error texts) the protocol has always used. */
static int parse_jansson(const char *data, size_t len, const mg_ws_limits *lim, mg_ws_in *out,
                         const char **code, char *reason, size_t reasonlen)
{
    json_error_t jerr;
    json_t *root = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        *code = MG_WS_ERR_BAD_JSON;
        snprintf(reason, reasonlen, "invalid JSON: %s (line %d column %d)", jerr.text, jerr.line,
                 jerr.column);
        return -EINVAL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        *code = MG_WS_ERR_BAD_JSON;
        snprintf(reason, reasonlen, "a frame must be a JSON object");
        return -EINVAL;
    }
    jval v[F_COUNT];
    for (int f = 0; f < F_COUNT; f++) {
        json_t *j = json_object_get(root, field_names[f]);
        v[f] = (jval){.kind = !j                  ? V_ABSENT
                              : json_is_null(j)   ? V_NULL
                              : json_is_string(j) ? V_STR
                                                  : V_OTHER};
        if (v[f].kind == V_STR) {
            v[f].p = json_string_value(j);
            v[f].n = json_string_length(j);
        }
    }
    int r = check_fields(v, lim, out, code, reason, reasonlen);
    json_decref(root);
    return r;
}

int mg_ws_proto_parse(const char *data, size_t len, const mg_ws_limits *lim, mg_ws_in *out,
                      const char **code, char *reason, size_t reasonlen)
{
    jval v[F_COUNT];
    memset(out, 0, sizeof(*out));
    if (len > 0 && scan_frame(data, len, v))
        return check_fields(v, lim, out, code, reason, reasonlen);
    return parse_jansson(data, len, lim, out, code, reason, reasonlen);
}
