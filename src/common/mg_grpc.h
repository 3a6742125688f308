/* mg_grpc.h: glue between gRPC C core and protobuf-c, and a small
 * synchronous client.
 *
 * The server (gateway/grpc_server.c), the peer transport
 * (router/transport_grpc.c), the CLI (src/cli) and the tests share these:
 * packing a protobuf-c message into a grpc_byte_buffer and back, names of
 * status codes, deadline conversion, and mg_grpc_client, a blocking unary
 * client (insecure, or over given credentials with a bearer token).
 *
 * Thread-safety: every function is thread-safe; one mg_grpc_client may be
 * used by many threads at once (each call has its own completion queue).
 */
#ifndef MG_GRPC_H
#define MG_GRPC_H

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Packs m into a new byte buffer the caller destroys (grpc_byte_buffer_destroy). */
grpc_byte_buffer *mg_grpc_pack(const ProtobufCMessage *m);
/* A byte buffer holding a copy of data[0..len). The caller destroys it. */
grpc_byte_buffer *mg_grpc_buffer_from(const void *data, size_t len);
/* Copies the whole buffer into a fresh allocation (*len bytes; the caller
 * frees it with free()). bb NULL gives NULL and *len 0. */
uint8_t *mg_grpc_buffer_read(grpc_byte_buffer *bb, size_t *len);
/* The whole buffer as one contiguous run of bytes, without a copy when it
 * is one uncompressed slice (a received request usually is): data and len
 * stay valid until mg_grpc_view_release. bb NULL gives data NULL, len 0. */
typedef struct mg_grpc_view {
    const uint8_t *data;
    size_t len;
    grpc_slice slice; /* a reference held by the view */
} mg_grpc_view;
void mg_grpc_view_init(mg_grpc_view *v, grpc_byte_buffer *bb);
void mg_grpc_view_release(mg_grpc_view *v);
/* Decodes bb as message type d. Returns NULL when bb is NULL or does not
 * decode; the caller frees the result with protobuf_c_message_free_unpacked. */
ProtobufCMessage *mg_grpc_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb);

/* "OK", "INVALID_ARGUMENT", ... ("UNKNOWN_CODE" outside 0..16). Static. */
const char *mg_grpc_code_name(grpc_status_code code);
/* The reverse of mg_grpc_code_name (case-insensitive); -1 when unknown. */
int mg_grpc_code_parse(const char *name);

/* Milliseconds left until deadline (any gpr clock) from now; INT64_MAX for
 * an infinite deadline; <= 0 when it has passed. */
int64_t mg_grpc_deadline_left_ms(gpr_timespec deadline);

/* Fills *md with "authorization: Bearer <token>" and returns 1, or returns 0
 * (md untouched) when token is NULL or "". The value is a new slice the
 * caller releases with grpc_slice_unref(md->value) after the calls that send
 * it; the key is static. For GRPC_OP_SEND_INITIAL_METADATA. */
size_t mg_grpc_bearer_metadata(grpc_metadata *md, const char *token);

/* --- one unary call ------------------------------------------------------------------- */

/* A unary call in flight: the one way meshgate makes a client call. Start
 * it on a completion queue with a tag; when the tag comes off the queue
 * (ev.success as ok), mg_grpc_unary_finish reads the outcome and releases
 * the call. The struct must stay put between the two (embed it in the
 * tag's owner). */
typedef struct mg_grpc_unary {
    grpc_call *call;
    grpc_metadata_array md_init, md_trail;
    grpc_byte_buffer *recv;
    grpc_status_code status;
    grpc_slice details;
} mg_grpc_unary;

/* Starts method on ch with req (not taken: the caller destroys it after
 * finish), the nmd initial metadata md (e.g. mg_grpc_bearer_metadata; kept
 * alive by the caller until finish) and a deadline timeout_ms from now. Returns 0 (the tag will
 * complete, by the deadline at the latest) or -EIO (nothing to finish). */
int mg_grpc_unary_start(mg_grpc_unary *u, grpc_channel *ch, grpc_completion_queue *cq,
                        const char *method, grpc_byte_buffer *req, const grpc_metadata *md,
                        size_t nmd, int64_t timeout_ms, void *tag);
/* After the tag completed: returns the status; on OK *resp holds the
 * response (the caller destroys it; may be NULL). details (dlen bytes) gets
 * the status message. */
grpc_status_code mg_grpc_unary_finish(mg_grpc_unary *u, bool ok, grpc_byte_buffer **resp,
                                      char *details, size_t dlen);
/* Start + finish on a queue of its own: blocks the caller up to timeout_ms.
 * For control calls made from worker jobs (never on a message's path). */
grpc_status_code mg_grpc_unary_call(grpc_channel *ch, const char *method, grpc_byte_buffer *req,
                                    const grpc_metadata *md, size_t nmd, int64_t timeout_ms,
                                    grpc_byte_buffer **resp, char *details, size_t dlen);

/* --- one bidirectional stream call ------------------------------------------------------ */

/* A client's bidirectional stream in flight, driven by its owner's
 * completion queue: one send and one receive outstanding at a time (gRPC's
 * rule), each completing with the tag it was started with. The struct must
 * stay put until released. */
typedef struct mg_grpc_stream {
    grpc_call *call;
    grpc_metadata_array md_init, md_trail;
    grpc_status_code status; /* valid once status_tag completed */
    grpc_slice details;
    grpc_byte_buffer *recv; /* the message the last receive got (NULL: the server ended) */
    grpc_byte_buffer *send; /* the message on the wire, destroyed by send_done */
} mg_grpc_stream;
/* Opens method on ch with the nmd initial metadata md and a deadline timeout_ms from now, and
 * starts three operations: the final status (status_tag), the first receive (recv_tag) and the
 * initial metadata (send_tag, a send). Returns how many were started (3; fewer on failure: each
 * started one still completes). */
int mg_grpc_stream_open(mg_grpc_stream *s, grpc_channel *ch, grpc_completion_queue *cq,
                        const char *method, const grpc_metadata *md, size_t nmd, int64_t timeout_ms,
                        void *status_tag, void *recv_tag, void *send_tag);
/* Sends one message (taken: destroyed when the send completed, by send_done) or, with bb NULL,
 * half-closes. Returns true when the operation was started (its tag will complete). */
bool mg_grpc_stream_send(mg_grpc_stream *s, grpc_byte_buffer *bb, void *tag);
void mg_grpc_stream_send_done(mg_grpc_stream *s);
/* The next receive into s->recv (the caller destroys what the last one got first). */
bool mg_grpc_stream_recv(mg_grpc_stream *s, void *tag);
/* Releases the call once no operation is outstanding (cancels it first when the status
 * never came). */
void mg_grpc_stream_release(mg_grpc_stream *s, bool status_came);
/* Shuts cq down, drains and destroys it (after its calls were released). */
void mg_grpc_cq_destroy(grpc_completion_queue *cq);

/* --- the client ------------------------------------------------------------------ */

typedef struct mg_grpc_client mg_grpc_client;

/* An insecure channel to target ("host:port", or any gRPC target URI).
 * Connects lazily. Never NULL. authority may be NULL (default :authority). */
mg_grpc_client *mg_grpc_client_create(const char *target, const char *authority);
/* The same over creds (borrowed; NULL: insecure), sending bearer_token (may
 * be NULL) as "authorization: Bearer" on every call. */
mg_grpc_client *mg_grpc_client_create_with(const char *target, const char *authority,
                                           grpc_channel_credentials *creds,
                                           const char *bearer_token);
void mg_grpc_client_free(mg_grpc_client *c); /* NULL is a no-op */

/* One unary call of method ("/pkg.Service/Method") with raw request bytes,
 * waiting at most timeout_ms (0: 30 s; negative: a deadline already past). Returns the status code;
 * on OK *resp (malloc'd, caller frees; may be NULL for an empty message) and *resp_len hold the
 * response. When details is not NULL, *details receives the status message (malloc'd, caller frees,
 * "" when none). */
grpc_status_code mg_grpc_call_raw(mg_grpc_client *c, const char *method, const void *req,
                                  size_t req_len, int timeout_ms, uint8_t **resp, size_t *resp_len,
                                  char **details);

/* The same with protobuf-c messages: on OK *resp is a new message of type
 * resp_desc (free with protobuf_c_message_free_unpacked); a response that
 * does not decode gives GRPC_STATUS_INTERNAL. */
grpc_status_code mg_grpc_call(mg_grpc_client *c, const char *method, const ProtobufCMessage *req,
                              const ProtobufCMessageDescriptor *resp_desc, int timeout_ms,
                              ProtobufCMessage **resp, char **details);

#endif
