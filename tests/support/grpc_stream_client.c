/* grpc_stream_client.c: the test client of Messaging/SendStream (see
 * grpc_stream_client.h). Runs on the calling thread, bounded by its timeout. */
#include "support/grpc_stream_client.h"
#include "support/grpc_client.h"
#include "common/mg_alloc.h"

#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <stdlib.h>
#include <string.h>

enum { TAG_SEND = 1, TAG_RECV, TAG_STATUS };

uint8_t *mg_tc_stream_request(const char *from, const char *to, const char *id, const char *text,
                              int priority, size_t *len)
{
    Meshgate__V1__Message m = mg_tc_text_message(from, to, id, text, priority);
    Meshgate__V1__SendMessageRequest rq = MESHGATE__V1__SEND_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    *len = meshgate__v1__send_message_request__get_packed_size(&rq);
    uint8_t *buf = mg_xmalloc(*len ? *len : 1);
    meshgate__v1__send_message_request__pack(&rq, buf);
    return buf;
}

static void take_response(mg_tc_stream_out *out, grpc_byte_buffer *bb)
{
    Meshgate__V1__SendStreamResponse *r = (Meshgate__V1__SendStreamResponse *)mg_grpc_unpack(
        &meshgate__v1__send_stream_response__descriptor, bb);
    if (!r)
        return;
    out->resp = mg_xrealloc(out->resp, (out->responses + 1) * sizeof(*out->resp));
    out->resp[out->responses++] = r;
    out->results = mg_xrealloc(out->results, (out->n + r->n_results) * sizeof(*out->results));
    for (size_t i = 0; i < r->n_results; i++)
        out->results[out->n++] = r->results[i];
}

grpc_status_code mg_tc_stream(const char *target, const char *token, const uint8_t *const *reqs,
                              const size_t *lens, size_t n, int timeout_ms, mg_tc_stream_out *out)
{
    grpc_metadata auth;
    size_t nauth = mg_grpc_bearer_metadata(&auth, token);
    grpc_status_code st = mg_tc_stream_md(target, &auth, nauth, reqs, lens, n, timeout_ms, out);
    if (nauth)
        grpc_slice_unref(auth.value);
    return st;
}

grpc_status_code mg_tc_stream_md(const char *target, const grpc_metadata *md, size_t nmd,
                                 const uint8_t *const *reqs, const size_t *lens, size_t n,
                                 int timeout_ms, mg_tc_stream_out *out)
{
    memset(out, 0, sizeof(*out));
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, creds, NULL);
    grpc_channel_credentials_release(creds);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    mg_grpc_stream s;
    int outstanding = mg_grpc_stream_open(&s, ch, cq, MG_RPC_SEND_STREAM, md, nmd, timeout_ms,
                                          (void *)(intptr_t)TAG_STATUS, (void *)(intptr_t)TAG_RECV,
                                          (void *)(intptr_t)TAG_SEND);
    gpr_timespec stop = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                     gpr_time_from_millis(timeout_ms + 5000, GPR_TIMESPAN));
    size_t next = 0;
    bool closed = false, close_sent = false;
    while (outstanding > 0) {
        grpc_event ev = grpc_completion_queue_next(cq, stop, NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            break; /* the call's deadline ends everything well before this */
        outstanding--;
        switch ((int)(intptr_t)ev.tag) {
        case TAG_SEND:
            mg_grpc_stream_send_done(&s);
            if (!ev.success || close_sent)
                break;
            grpc_byte_buffer *bb = NULL;
            if (next < n) {
                bb = mg_grpc_buffer_from(reqs[next], lens[next]);
                next++;
            } else {
                close_sent = true;
            }
            outstanding += mg_grpc_stream_send(&s, bb, (void *)(intptr_t)TAG_SEND);
            break;
        case TAG_RECV:
            if (!ev.success || !s.recv)
                break;
            take_response(out, s.recv);
            grpc_byte_buffer_destroy(s.recv);
            s.recv = NULL;
            outstanding += mg_grpc_stream_recv(&s, (void *)(intptr_t)TAG_RECV);
            break;
        case TAG_STATUS:
            closed = true;
            break;
        }
    }
    grpc_status_code status = closed ? s.status : GRPC_STATUS_DEADLINE_EXCEEDED;
    size_t dl = GRPC_SLICE_LENGTH(s.details);
    out->details = mg_xmalloc(dl + 1);
    memcpy(out->details, GRPC_SLICE_START_PTR(s.details), dl);
    out->details[dl] = '\0';
    mg_grpc_stream_release(&s, closed);
    mg_grpc_cq_destroy(cq);
    grpc_channel_destroy(ch);
    return status;
}

void mg_tc_stream_out_free(mg_tc_stream_out *out)
{
    for (size_t i = 0; i < out->responses; i++)
        protobuf_c_message_free_unpacked(&out->resp[i]->base, NULL);
    free(out->resp);
    free(out->results);
    free(out->details);
    memset(out, 0, sizeof(out[0]));
}
