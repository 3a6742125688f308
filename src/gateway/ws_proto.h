/* ws_proto.h: the WebSocket JSON protocol, parse and encode (pure functions).
 *
 * Client -> server text frames:
 *   {"type":"send","id"?:S,"to":S,"content":S,"priority"?:"high"|"low","content_type"?:S,
 *    "traceparent"?:S}
 *   {"type":"ack","id":S,"traceparent"?:S}      (removes an inbox message)
 *        traceparent: W3C Trace Context (version 00); a send continues that
 *        trace, an ack records its span in it (echo the message frame's).
 *        Not a valid traceparent: ignored (a send may start a new trace).
 *   {"type":"refresh","token":S}                (a new JWT for this connection:
 *        verified as at upgrade, same "sub"; moves the connection's expiry)
 * Server -> client text frames:
 *   {"type":"ack","id":S,"status":"delivered|queued|stored|rejected|failed|accepted",
 *    "path":"local|grpc|kafka|inbox|none","reason"?:S}
 *   {"type":"message","id":S,"from":S,"content":S,"content_type"?:S,"sent_at_ms":N,
 *    "inbox":B,"trace_id"?:S,"traceparent"?:S}
 *                 -- trace_id and traceparent when the message is traced
 *                    (sampled): the 32-hex trace id to join client reports to
 *                    the trace, and the context of the write to this device.
 *                 -- a payload that is not valid UTF-8 (possible from gRPC, where
 *                    content is bytes) is sent as "content_b64" (standard base64)
 *                    instead of "content".
 *   {"type":"error","code":S,"reason":S,"id"?:S}
 *   {"type":"refreshed","exp":N}   -- a refresh was accepted; N is the token's
 *                    new exp (Unix seconds). A refused one gets an error frame
 *                    with code bad_token and the old expiry stays.
 *   {"type":"ready","conn":S,"user":S,"degraded"?:true}
 *                 -- once per connection: presence has it (conn is its id,
 *                    user the connected user), so a send to the user made
 *                    after this frame finds this connection ("delivered"),
 *                    not the inbox. Before it, the upgrade's 101 only means
 *                    the socket is open. Order: after the inbox's first page
 *                    (those message frames, "inbox":true, come before it;
 *                    later pages follow acks); live messages sent to the user
 *                    meanwhile may come before it too. "degraded": the
 *                    presence or inbox store failed during the connect, so
 *                    this connection may miss live messages (they wait in
 *                    the inbox) or its inbox replay; reconnect to retry.
 *                    A connection refused or closed before that gets none.
 *
 * Close codes of the server (besides RFC 6455's): 4008 slow consumer, 4401
 * token expired (the JWT's exp passed without a refresh; sent within half a
 * --ping-seconds interval after exp, the ping wheel's turn).
 *
 * Thread-safety: every function is pure (no shared state) and may be called
 * from any thread. Returned strings are malloc'd; the caller frees them.
 */
#ifndef MG_WS_PROTO_H
#define MG_WS_PROTO_H

#include "router/msg.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MG_WS_MAX_ID_BYTES 128

typedef enum { MG_WS_IN_SEND = 1, MG_WS_IN_ACK = 2, MG_WS_IN_REFRESH = 3 } mg_ws_in_type;

/* The close code of a connection whose token expired (see the top). */
#define MG_WS_CLOSE_TOKEN_EXPIRED 4401
/* Longest token a refresh frame may carry (as at upgrade). */
#define MG_WS_MAX_TOKEN_BYTES 16384

/* A parsed client frame; strings are owned and freed by mg_ws_in_clear. */
typedef struct mg_ws_in {
    mg_ws_in_type type;
    char *id;      /* NULL when a send has none (the server makes one) */
    char *to;      /* send only */
    char *content; /* send only; UTF-8, content_len bytes (NUL-terminated too) */
    size_t content_len;
    char *content_type; /* NULL when absent */
    mg_priority priority;
    char *token;        /* refresh only: the JWT, 1..MG_WS_MAX_TOKEN_BYTES printable ASCII */
    mg_trace_ctx trace; /* send, ack: a valid "traceparent" field, else zero */
} mg_ws_in;

typedef struct mg_ws_limits {
    size_t max_content_bytes;
    size_t max_user_bytes;
} mg_ws_limits;

/* Error codes sent in {"type":"error"} frames. */
#define MG_WS_ERR_BAD_JSON      "bad_json"
#define MG_WS_ERR_UNKNOWN_TYPE  "unknown_type"
#define MG_WS_ERR_MISSING_FIELD "missing_field"
#define MG_WS_ERR_BAD_FIELD     "bad_field"
#define MG_WS_ERR_TOO_LARGE     "too_large"
#define MG_WS_ERR_OVERLOADED    "overloaded"
#define MG_WS_ERR_RATE_LIMITED  "rate_limited"
#define MG_WS_ERR_BINARY        "binary_unsupported"
#define MG_WS_ERR_INTERNAL      "internal"
#define MG_WS_ERR_BAD_TOKEN     "bad_token" /* a refresh refused (see the top) */

/* Parses one text frame. Returns 0 with *out filled, or -EINVAL with *code
 * set to one of the MG_WS_ERR_* strings (static) and a human reason in
 * reason (reasonlen bytes); *out is then empty. out->priority defaults to HIGH.
 * A frame must be one JSON object without duplicate keys and with nothing but
 * whitespace after it, its strings valid UTF-8 without \u0000 (else bad_json);
 * a null field counts as absent; fields other than those above are ignored,
 * whatever their value (and "token" of a refresh; "traceparent" never refuses a frame). data need
 * not be NUL-terminated and is not kept. */
int mg_ws_proto_parse(const char *data, size_t len, const mg_ws_limits *lim, mg_ws_in *out,
                      const char **code, char *reason, size_t reasonlen);
void mg_ws_in_clear(mg_ws_in *in);

/* A user id is acceptable: non-empty, at most max bytes, valid UTF-8, no
 * control characters. */
bool mg_ws_proto_valid_user(const char *user, size_t max);
bool mg_utf8_valid(const unsigned char *s, size_t len);

/* Encoders: return a malloc'd NUL-terminated JSON text; *len (may be NULL)
 * receives its length. Compact JSON, fields in the order shown at the top,
 * optional ones left out when NULL or ""; strings escape only '"', '\\' and
 * control characters (\b \f \n \r \t, else \u00XX), everything else is
 * UTF-8 as is. A string argument that is not valid UTF-8 is sent as "?" (the
 * message content goes as content_b64 instead). */
char *mg_ws_proto_encode_ack(const char *id, mg_status status, mg_path path, const char *reason,
                             size_t *len);
char *mg_ws_proto_encode_message(const mg_msg *m, bool from_inbox, size_t *len);
char *mg_ws_proto_encode_error(const char *code, const char *reason, const char *id, size_t *len);
char *mg_ws_proto_encode_refreshed(int64_t exp, size_t *len);
/* The ready frame (see the top); "degraded" only when degraded. */
char *mg_ws_proto_encode_ready(const char *conn_id, const char *user, bool degraded, size_t *len);

/* The message frame written into the caller's buffer, e.g. after LWS_PRE
 * bytes of headroom, to save a copy:
 *     size_t n = mg_ws_proto_message_len(m, from_inbox);
 *     char *buf = mg_xmalloc(LWS_PRE + n);
 *     mg_ws_proto_render_message(buf + LWS_PRE, m, from_inbox);
 * mg_ws_proto_message_len is the exact length of the text, the same as
 * mg_ws_proto_encode_message's *len. mg_ws_proto_render_message writes that
 * text (no NUL after it) to dst, which must have room for
 * mg_ws_proto_message_len bytes of the same unchanged m, and returns its
 * length. Neither keeps a pointer to m or dst. */
size_t mg_ws_proto_message_len(const mg_msg *m, bool from_inbox);
size_t mg_ws_proto_render_message(char *dst, const mg_msg *m, bool from_inbox);
/* Where the traceparent's value starts in a rendered message frame (text,
 * len), or 0 when it has none: the hub writes each connection's own span
 * id over it (the same length), so a frame rendered once names the write
 * span of every device it reaches. */
size_t mg_ws_proto_traceparent_at(const char *text, size_t len);

#endif
