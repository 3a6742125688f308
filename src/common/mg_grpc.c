/* mg_grpc.c: byte buffers <-> protobuf-c, status names, deadlines, and a
 * blocking unary client (see mg_grpc.h).
 *
 * Runs on the caller's thread. The client makes one completion queue per
 * call, so calls on one channel from many threads never share a queue; the
 * channel itself is thread-safe in gRPC core. Every call is bounded by its
 * deadline (30 s when the caller gives none).
 */
#include "common/mg_grpc.h"
#include "common/mg_alloc.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MG_GRPC_DEFAULT_TIMEOUT_MS 30000

grpc_byte_buffer *mg_grpc_buffer_from(const void *data, size_t len)
{
    grpc_slice s = grpc_slice_malloc(len);
    if (len)
        memcpy(GRPC_SLICE_START_PTR(s), data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

grpc_byte_buffer *mg_grpc_pack(const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(len);
    if (len)
        protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

uint8_t *mg_grpc_buffer_read(grpc_byte_buffer *bb, size_t *len)
{
    *len = 0;
    if (!bb)
        return NULL;
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, bb))
        return NULL;
    grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    size_t n = GRPC_SLICE_LENGTH(all);
    uint8_t *out = mg_xmalloc(n ? n : 1);
    if (n)
        memcpy(out, GRPC_SLICE_START_PTR(all), n);
    grpc_slice_unref(all);
    *len = n;
    return out;
}

void mg_grpc_view_init(mg_grpc_view *v, grpc_byte_buffer *bb)
{
    v->slice = grpc_empty_slice();
    if (bb && bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE &&
        bb->data.raw.slice_buffer.count == 1) {
        v->slice = grpc_slice_ref(bb->data.raw.slice_buffer.slices[0]);
    } else if (bb) {
        grpc_byte_buffer_reader rd;
        if (grpc_byte_buffer_reader_init(&rd, bb)) {
            v->slice = grpc_byte_buffer_reader_readall(&rd);
            grpc_byte_buffer_reader_destroy(&rd);
        }
    }
    v->len = GRPC_SLICE_LENGTH(v->slice);
    v->data = bb ? GRPC_SLICE_START_PTR(v->slice) : NULL;
}

void mg_grpc_view_release(mg_grpc_view *v)
{
    grpc_slice_unref(v->slice);
    v->slice = grpc_empty_slice();
    v->data = NULL;
    v->len = 0;
}

ProtobufCMessage *mg_grpc_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb)
{
    if (!bb)
        return NULL;
    size_t len;
    uint8_t *data = mg_grpc_buffer_read(bb, &len);
    if (!data)
        return NULL;
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, data);
    free(data);
    return m;
}

static const char *const code_names[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *mg_grpc_code_name(grpc_status_code code)
{
    if ((int)code < 0 || (size_t)code >= sizeof(code_names) / sizeof(code_names[0]))
        return "UNKNOWN_CODE";
    return code_names[code];
}

int mg_grpc_code_parse(const char *name)
{
    for (size_t i = 0; i < sizeof(code_names) / sizeof(code_names[0]); i++)
        if (strcasecmp(name, code_names[i]) == 0)
            return (int)i;
    return -1;
}

int64_t mg_grpc_deadline_left_ms(gpr_timespec deadline)
{
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0)
        return INT64_MAX;
    gpr_timespec d = gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC);
    gpr_timespec left = gpr_time_sub(d, gpr_now(GPR_CLOCK_MONOTONIC));
    if (left.tv_sec > INT64_MAX / 2000)
        return INT64_MAX;
    /* Round up so 0.4 ms left is not mistaken for an expired deadline. */
    return left.tv_sec * 1000 + (left.tv_nsec + 999999) / 1000000;
}

/* --- the client ------------------------------------------------------------------ */

size_t mg_grpc_bearer_metadata(grpc_metadata *md, const char *token)
{
    if (!token || !*token)
        return 0;
    memset(md, 0, sizeof(*md));
    md->key = grpc_slice_from_static_string("authorization");
    char *v = mg_xasprintf("Bearer %s", token);
    md->value = grpc_slice_from_copied_string(v);
    free(v);
    return 1;
}

struct mg_grpc_client {
    grpc_channel *channel;
    grpc_metadata auth; /* the bearer token, when nauth is 1 */
    size_t nauth;
};

mg_grpc_client *mg_grpc_client_create(const char *target, const char *authority)
{
    return mg_grpc_client_create_with(target, authority, NULL, NULL);
}

mg_grpc_client *mg_grpc_client_create_with(const char *target, const char *authority,
                                           grpc_channel_credentials *creds,
                                           const char *bearer_token)
{
    grpc_init();
    mg_grpc_client *c = mg_new(mg_grpc_client);
    grpc_arg args[2];
    size_t nargs = 0;
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[nargs].value.integer = -1;
    nargs++;
    if (authority && *authority) {
        args[nargs].type = GRPC_ARG_STRING;
        args[nargs].key = GRPC_ARG_DEFAULT_AUTHORITY;
        args[nargs].value.string = (char *)authority;
        nargs++;
    }
    grpc_channel_args ca = {.num_args = nargs, .args = args};
    grpc_channel_credentials *insecure = creds ? NULL : grpc_insecure_credentials_create();
    c->channel = grpc_channel_create(target, creds ? creds : insecure, &ca);
    if (insecure)
        grpc_channel_credentials_release(insecure);
    c->nauth = mg_grpc_bearer_metadata(&c->auth, bearer_token);
    return c;
}

void mg_grpc_client_free(mg_grpc_client *c)
{
    if (!c)
        return;
    grpc_channel_destroy(c->channel);
    if (c->nauth)
        grpc_slice_unref(c->auth.value);
    free(c);
    grpc_shutdown();
}

/* A call of method on ch, completing on cq, with a deadline timeout_ms from now. */
static grpc_call *create_call(grpc_channel *ch, grpc_completion_queue *cq, const char *method,
                              int64_t timeout_ms)
{
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
    grpc_slice m = grpc_slice_from_copied_string(method);
    grpc_call *call =
        grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL, deadline, NULL);
    grpc_slice_unref(m);
    return call;
}

int mg_grpc_unary_start(mg_grpc_unary *u, grpc_channel *ch, grpc_completion_queue *cq,
                        const char *method, grpc_byte_buffer *req, const grpc_metadata *md,
                        size_t nmd, int64_t timeout_ms, void *tag)
{
    memset(u, 0, sizeof(*u));
    u->call = create_call(ch, cq, method, timeout_ms);
    if (!u->call)
        return -EIO;
    grpc_metadata_array_init(&u->md_init);
    grpc_metadata_array_init(&u->md_trail);
    u->status = GRPC_STATUS_UNKNOWN;
    u->details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = nmd;
    ops[0].data.send_initial_metadata.metadata = (grpc_metadata *)md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &u->md_init;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &u->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &u->md_trail;
    ops[5].data.recv_status_on_client.status = &u->status;
    ops[5].data.recv_status_on_client.status_details = &u->details;
    if (grpc_call_start_batch(u->call, ops, 6, tag, NULL) != GRPC_CALL_OK) {
        grpc_metadata_array_destroy(&u->md_init);
        grpc_metadata_array_destroy(&u->md_trail);
        grpc_call_unref(u->call);
        u->call = NULL;
        return -EIO;
    }
    return 0;
}

grpc_status_code mg_grpc_unary_finish(mg_grpc_unary *u, bool ok, grpc_byte_buffer **resp,
                                      char *details, size_t dlen)
{
    grpc_status_code status = u->status;
    if (!ok && status == GRPC_STATUS_OK)
        status = GRPC_STATUS_INTERNAL;
    if (details && dlen) {
        size_t n = GRPC_SLICE_LENGTH(u->details);
        if (n >= dlen)
            n = dlen - 1;
        memcpy(details, GRPC_SLICE_START_PTR(u->details), n);
        details[n] = '\0';
    }
    *resp = NULL;
    if (status == GRPC_STATUS_OK) {
        *resp = u->recv;
        u->recv = NULL;
    }
    if (u->recv)
        grpc_byte_buffer_destroy(u->recv);
    grpc_slice_unref(u->details);
    grpc_metadata_array_destroy(&u->md_init);
    grpc_metadata_array_destroy(&u->md_trail);
    grpc_call_unref(u->call);
    memset(u, 0, sizeof(*u));
    return status;
}

grpc_status_code mg_grpc_unary_call(grpc_channel *ch, const char *method, grpc_byte_buffer *req,
                                    const grpc_metadata *md, size_t nmd, int64_t timeout_ms,
                                    grpc_byte_buffer **resp, char *details, size_t dlen)
{
    *resp = NULL;
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    mg_grpc_unary u;
    grpc_status_code status;
    if (mg_grpc_unary_start(&u, ch, cq, method, req, md, nmd, timeout_ms, &u) != 0) {
        status = GRPC_STATUS_INTERNAL;
        if (details && dlen)
            snprintf(details, dlen, "call could not start");
    } else {
        grpc_event ev; /* the batch always completes, by the deadline at the latest */
        do
            ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        while (ev.type != GRPC_OP_COMPLETE || ev.tag != &u);
        status = mg_grpc_unary_finish(&u, ev.success != 0, resp, details, dlen);
    }
    mg_grpc_cq_destroy(cq);
    return status;
}

static bool stream_batch(mg_grpc_stream *s, const grpc_op *ops, size_t n, void *tag)
{
    return grpc_call_start_batch(s->call, ops, n, tag, NULL) == GRPC_CALL_OK;
}

int mg_grpc_stream_open(mg_grpc_stream *s, grpc_channel *ch, grpc_completion_queue *cq,
                        const char *method, const grpc_metadata *md, size_t nmd, int64_t timeout_ms,
                        void *status_tag, void *recv_tag, void *send_tag)
{
    memset(s, 0, sizeof(*s));
    s->call = create_call(ch, cq, method, timeout_ms);
    grpc_metadata_array_init(&s->md_init);
    grpc_metadata_array_init(&s->md_trail);
    s->status = GRPC_STATUS_UNKNOWN;
    s->details = grpc_empty_slice();
    if (!s->call)
        return 0;
    int started = 0;
    grpc_op ops[2];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &s->md_trail;
    ops[0].data.recv_status_on_client.status = &s->status;
    ops[0].data.recv_status_on_client.status_details = &s->details;
    started += stream_batch(s, ops, 1, status_tag);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[0].data.recv_initial_metadata.recv_initial_metadata = &s->md_init;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &s->recv;
    started += stream_batch(s, ops, 2, recv_tag);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = nmd;
    ops[0].data.send_initial_metadata.metadata = (grpc_metadata *)md;
    started += stream_batch(s, ops, 1, send_tag);
    return started;
}

bool mg_grpc_stream_send(mg_grpc_stream *s, grpc_byte_buffer *bb, void *tag)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    if (bb) {
        op.op = GRPC_OP_SEND_MESSAGE;
        op.data.send_message.send_message = bb;
    } else {
        op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    }
    s->send = bb;
    if (stream_batch(s, &op, 1, tag))
        return true;
    mg_grpc_stream_send_done(s);
    return false;
}

void mg_grpc_stream_send_done(mg_grpc_stream *s)
{
    if (s->send)
        grpc_byte_buffer_destroy(s->send);
    s->send = NULL;
}

bool mg_grpc_stream_recv(mg_grpc_stream *s, void *tag)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &s->recv;
    return stream_batch(s, &op, 1, tag);
}

void mg_grpc_stream_release(mg_grpc_stream *s, bool status_came)
{
    if (s->call && !status_came)
        grpc_call_cancel(s->call, NULL);
    mg_grpc_stream_send_done(s);
    if (s->recv)
        grpc_byte_buffer_destroy(s->recv);
    s->recv = NULL;
    grpc_slice_unref(s->details);
    s->details = grpc_empty_slice();
    grpc_metadata_array_destroy(&s->md_init);
    grpc_metadata_array_destroy(&s->md_trail);
    if (s->call)
        grpc_call_unref(s->call);
    s->call = NULL;
}

void mg_grpc_cq_destroy(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
}

grpc_status_code mg_grpc_call_raw(mg_grpc_client *c, const char *method, const void *req,
                                  size_t req_len, int timeout_ms, uint8_t **resp, size_t *resp_len,
                                  char **details)
{
    if (resp)
        *resp = NULL;
    if (resp_len)
        *resp_len = 0;
    if (details)
        *details = NULL;
    if (timeout_ms == 0)
        timeout_ms = MG_GRPC_DEFAULT_TIMEOUT_MS; /* negative: already expired (tests) */
    grpc_byte_buffer *send_bb = mg_grpc_buffer_from(req, req_len);
    grpc_byte_buffer *recv_bb = NULL;
    char dbuf[1024];
    grpc_status_code status = mg_grpc_unary_call(c->channel, method, send_bb, &c->auth, c->nauth,
                                                 timeout_ms, &recv_bb, dbuf, sizeof(dbuf));
    if (status == GRPC_STATUS_OK && recv_bb && resp) {
        size_t n;
        *resp = mg_grpc_buffer_read(recv_bb, &n);
        if (resp_len)
            *resp_len = n;
    }
    if (details)
        *details = mg_xstrdup(dbuf);
    if (recv_bb)
        grpc_byte_buffer_destroy(recv_bb);
    grpc_byte_buffer_destroy(send_bb);
    return status;
}

grpc_status_code mg_grpc_call(mg_grpc_client *c, const char *method, const ProtobufCMessage *req,
                              const ProtobufCMessageDescriptor *resp_desc, int timeout_ms,
                              ProtobufCMessage **resp, char **details)
{
    *resp = NULL;
    size_t len = protobuf_c_message_get_packed_size(req);
    uint8_t *buf = mg_xmalloc(len ? len : 1);
    protobuf_c_message_pack(req, buf);
    uint8_t *out = NULL;
    size_t out_len = 0;
    grpc_status_code st =
        mg_grpc_call_raw(c, method, buf, len, timeout_ms, &out, &out_len, details);
    free(buf);
    if (st == GRPC_STATUS_OK) {
        *resp = protobuf_c_message_unpack(resp_desc, NULL, out_len, out ? out : (uint8_t *)"");
        if (!*resp) {
            st = GRPC_STATUS_INTERNAL;
            if (details) {
                free(*details);
                *details = mg_xstrdup("response does not decode");
            }
        }
    }
    free(out);
    return st;
}
