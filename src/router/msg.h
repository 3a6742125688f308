/* msg.h: the message model inside the router, and results of a send.
 *
 * mg_msg mirrors meshgate.v1.Message (proto/meshgate/v1/message.proto) with
 * plain C types; enum values equal the proto's, so converting is a cast.
 * mg_msg_pack/unpack produce the protobuf envelope carried by Kafka and the
 * inbox. Every string of an mg_msg is owned by it and freed by mg_msg_free.
 */
#ifndef MG_MSG_H
#define MG_MSG_H

#include "common/mg_trace.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { MG_PRIO_HIGH = 1, MG_PRIO_LOW = 2 } mg_priority;

typedef enum {
    MG_STATUS_NONE = 0,
    MG_STATUS_DELIVERED = 1,
    MG_STATUS_QUEUED = 2,
    MG_STATUS_STORED = 3,
    MG_STATUS_REJECTED = 4,
    MG_STATUS_FAILED = 5,
    MG_STATUS_ACCEPTED = 6,
} mg_status;

typedef enum {
    MG_PATH_NONE = 0,
    MG_PATH_LOCAL = 1,
    MG_PATH_GRPC = 2,
    MG_PATH_KAFKA = 3,
    MG_PATH_INBOX = 4,
    MG_PATH_REDIS_PUBSUB = 5,
    MG_PATH_NATS = 6,
    MG_PATH_COUNT
} mg_path;

typedef struct mg_msg {
    char *id;
    char *from;
    char *to;
    char *content_type; /* may be "" */
    uint8_t *content;
    size_t content_len;
    int64_t sent_at_ms;
    mg_priority priority;
    mg_trace_ctx trace; /* zero: not traced; else the span that handed it on */
    bool inbox;         /* a copy of a message held in the recipient's inbox: written as an
                           inbox message, which the client acks to remove it there */
} mg_msg;

typedef struct mg_send_result {
    mg_status status;
    mg_path path;         /* the path of the best outcome */
    unsigned paths;       /* bit (1 << path) for every path taken */
    uint32_t connections; /* live connections written to, where known */
    char reason[160];     /* set for REJECTED and FAILED */
} mg_send_result;

/* Creates a message owning copies of every argument (content_type and from
 * may be NULL, meaning ""); not traced. mg_msg_dup and mg_msg_dup_to copy
 * the trace context too. The copies live in the message's own block: its
 * fields are never freed or replaced one by one. */
mg_msg *mg_msg_new(const char *id, const char *from, const char *to, const uint8_t *content,
                   size_t content_len, const char *content_type, int64_t sent_at_ms,
                   mg_priority priority);
mg_msg *mg_msg_dup(const mg_msg *m);
/* A copy addressed to another recipient. */
mg_msg *mg_msg_dup_to(const mg_msg *m, const char *to);
/* m addressed to another recipient without copying it: only to is the
 * view's own, every other field points into m, which must outlive the
 * view (a SendBatch's recipients share its one message: 100,000 copies of
 * 64 KB would be 6.5 GB). Freed with mg_msg_free like any message. */
mg_msg *mg_msg_view_to(const mg_msg *m, const char *to);
void mg_msg_free(mg_msg *m); /* NULL is a no-op */

/* The protobuf envelope (meshgate.v1.Message, the trace as its traceparent).
 * The caller frees the result. */
uint8_t *mg_msg_pack(const mg_msg *m, size_t *len);
/* Returns 0 and a new message in *out, or -EBADMSG when data does not decode
 * or lacks id/to (an invalid traceparent is ignored: not traced). */
int mg_msg_unpack(const uint8_t *data, size_t len, mg_msg **out);

const char *mg_status_name(mg_status s); /* "delivered", "queued", ... */
const char *
mg_path_name(mg_path p); /* "local", "grpc", "kafka", "inbox", "redis-pubsub", "nats", "none" */

/* How good a status is, in the order below (higher is better; NONE: 0). */
int mg_status_rank(mg_status s);
/* Records one outcome into a result: the best status wins
 * (DELIVERED > QUEUED > ACCEPTED > STORED > FAILED > REJECTED). */
void mg_result_merge(mg_send_result *r, mg_status status, mg_path path, uint32_t conns,
                     const char *reason);

/* Tracing a queue consumer's handling of msg (Kafka, NATS, redis-pubsub):
 * starts a "process" CONSUMER span as a child of msg->trace with the
 * OpenTelemetry messaging attributes, and sets *out to a shallow copy of
 * msg whose trace names that span (hand out to the router). Returns the span
 * (NULL when not traced); end it with mg_msg_trace_end. */
struct mg_span *mg_msg_trace_process(const mg_msg *msg, mg_msg *out, const char *system,
                                     const char *destination, const char *gateway_id);
/* Ends span (NULL: no-op) with meshgate.status, meshgate.path and
 * meshgate.connections; FAILED and REJECTED are errors with reason. */
void mg_msg_trace_end(struct mg_span *span, mg_status status, mg_path path, uint32_t connections,
                      const char *reason);

#endif
