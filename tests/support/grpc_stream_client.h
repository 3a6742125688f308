/* grpc_stream_client.h: a Messaging/SendStream call for tests (and the
 * shape of a client of it: one send and one receive outstanding on a
 * completion queue of its own).
 */
#ifndef MG_TEST_GRPC_STREAM_CLIENT_H
#define MG_TEST_GRPC_STREAM_CLIENT_H

#include "common/mg_grpc.h"
#include "meshgate/v1/messaging.pb-c.h"

#define MG_RPC_SEND_STREAM "/meshgate.v1.Messaging/SendStream"

typedef struct mg_tc_stream_out {
    Meshgate__V1__SendMessageResponse **results; /* in arrival order (point into resp) */
    size_t n;
    Meshgate__V1__SendStreamResponse **resp; /* the responses they came in */
    size_t responses;
    char *details; /* the status message ("" when none) */
} mg_tc_stream_out;

/* Opens SendStream on target (insecure; token, when set, as the bearer token), sends the n requests
 * in order (raw bytes: a test sends garbage this way), half-closes and reads results until the
 * server ends the stream, all within timeout_ms. Returns the final status; out gets what arrived
 * (free it with mg_tc_stream_out_free). */
grpc_status_code mg_tc_stream(const char *target, const char *token, const uint8_t *const *reqs,
                              const size_t *lens, size_t n, int timeout_ms, mg_tc_stream_out *out);
/* The same with the call's metadata md[nmd] (e.g. a traceparent), kept by the caller. */
grpc_status_code mg_tc_stream_md(const char *target, const grpc_metadata *md, size_t nmd,
                                 const uint8_t *const *reqs, const size_t *lens, size_t n,
                                 int timeout_ms, mg_tc_stream_out *out);
void mg_tc_stream_out_free(mg_tc_stream_out *out);

/* A packed SendMessageRequest of a text from -> to with id (malloc'd; *len its size). */
uint8_t *mg_tc_stream_request(const char *from, const char *to, const char *id, const char *text,
                              int priority, size_t *len);

#endif
