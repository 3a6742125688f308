/* msg.c: the message model, its protobuf envelope and result merging
 * (see msg.h). Pure functions, thread-safe. */
#include "router/msg.h"
#include "common/mg_alloc.h"
#include "meshgate/v1/message.pb-c.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One allocation: the struct, then the content, then the four strings
 * (every send copies its message at least twice, and their fields were
 * five mallocs each; a block allocated on one thread and freed on another
 * is one trip through the allocator's shared arena, not six). */
mg_msg *mg_msg_new(const char *id, const char *from, const char *to, const uint8_t *content,
                   size_t content_len, const char *content_type, int64_t sent_at_ms,
                   mg_priority priority)
{
    const char *str[4] = {id ? id : "", from ? from : "", to ? to : "",
                          content_type ? content_type : ""};
    size_t len[4], total = sizeof(mg_msg) + content_len;
    for (int i = 0; i < 4; i++) {
        len[i] = strlen(str[i]) + 1;
        total += len[i];
    }
    mg_msg *m = mg_xmalloc(total);
    memset(m, 0, sizeof(*m));
    char *p = (char *)(m + 1);
    m->content = (uint8_t *)p;
    if (content_len)
        memcpy(p, content, content_len);
    p += content_len;
    char **dst[4] = {&m->id, &m->from, &m->to, &m->content_type};
    for (int i = 0; i < 4; i++) {
        memcpy(p, str[i], len[i]);
        *dst[i] = p;
        p += len[i];
    }
    m->content_len = content_len;
    m->sent_at_ms = sent_at_ms;
    m->priority = priority == MG_PRIO_LOW ? MG_PRIO_LOW : MG_PRIO_HIGH;
    return m;
}

mg_msg *mg_msg_dup_to(const mg_msg *m, const char *to)
{
    mg_msg *d = mg_msg_new(m->id, m->from, to, m->content, m->content_len, m->content_type,
                           m->sent_at_ms, m->priority);
    d->trace = m->trace;
    d->inbox = m->inbox;
    return d;
}

mg_msg *mg_msg_view_to(const mg_msg *m, const char *to)
{
    size_t n = strlen(to) + 1;
    mg_msg *v = mg_xmalloc(sizeof(*v) + n);
    *v = *m;
    v->to = memcpy(v + 1, to, n);
    return v;
}

mg_msg *mg_msg_dup(const mg_msg *m)
{
    return mg_msg_dup_to(m, m->to);
}

void mg_msg_free(mg_msg *m)
{
    free(m); /* its fields live in the same block */
}

uint8_t *mg_msg_pack(const mg_msg *m, size_t *len)
{
    Meshgate__V1__Message pb = MESHGATE__V1__MESSAGE__INIT;
    pb.id = m->id;
    pb.from = m->from;
    pb.to = m->to;
    pb.content.data = m->content;
    pb.content.len = m->content_len;
    pb.content_type = m->content_type;
    pb.sent_at_ms = m->sent_at_ms;
    pb.priority = (Meshgate__V1__Priority)m->priority;
    char tp[MG_TRACEPARENT_LEN + 1];
    mg_traceparent_format(&m->trace, tp);
    pb.traceparent = tp;
    size_t n = meshgate__v1__message__get_packed_size(&pb);
    uint8_t *buf = mg_xmalloc(n);
    meshgate__v1__message__pack(&pb, buf);
    *len = n;
    return buf;
}

int mg_msg_unpack(const uint8_t *data, size_t len, mg_msg **out)
{
    Meshgate__V1__Message *pb = meshgate__v1__message__unpack(NULL, len, data);
    if (!pb)
        return -EBADMSG;
    int rc = -EBADMSG;
    if (pb->id[0] && pb->to[0]) {
        *out = mg_msg_new(pb->id, pb->from, pb->to, pb->content.data, pb->content.len,
                          pb->content_type, pb->sent_at_ms,
                          pb->priority == MESHGATE__V1__PRIORITY__PRIORITY_LOW ? MG_PRIO_LOW
                                                                               : MG_PRIO_HIGH);
        if (pb->traceparent[0])
            mg_traceparent_parse(pb->traceparent, strlen(pb->traceparent), &(*out)->trace);
        rc = 0;
    }
    meshgate__v1__message__free_unpacked(pb, NULL);
    return rc;
}

const char *mg_status_name(mg_status s)
{
    static const char *names[] = {"none",     "delivered", "queued",  "stored",
                                  "rejected", "failed",    "accepted"};
    return (unsigned)s < sizeof(names) / sizeof(names[0]) ? names[s] : "unknown";
}

const char *mg_path_name(mg_path p)
{
    static const char *names[] = {"none",  "local",        "grpc", "kafka",
                                  "inbox", "redis-pubsub", "nats"};
    return (unsigned)p < sizeof(names) / sizeof(names[0]) ? names[p] : "unknown";
}

int mg_status_rank(mg_status s)
{
    switch (s) {
    case MG_STATUS_DELIVERED:
        return 6;
    case MG_STATUS_QUEUED:
        return 5;
    case MG_STATUS_ACCEPTED:
        return 4;
    case MG_STATUS_STORED:
        return 3;
    case MG_STATUS_FAILED:
        return 2;
    case MG_STATUS_REJECTED:
        return 1;
    default:
        return 0;
    }
}

void mg_result_merge(mg_send_result *r, mg_status status, mg_path path, uint32_t conns,
                     const char *reason)
{
    if (path != MG_PATH_NONE)
        r->paths |= 1u << path;
    r->connections += conns;
    if (mg_status_rank(status) > mg_status_rank(r->status)) {
        r->status = status;
        r->path = path;
        if (status == MG_STATUS_FAILED || status == MG_STATUS_REJECTED)
            snprintf(r->reason, sizeof(r->reason), "%s", reason ? reason : "");
        else
            r->reason[0] = '\0';
    } else if (r->status == status && (status == MG_STATUS_FAILED) && reason && !r->reason[0]) {
        snprintf(r->reason, sizeof(r->reason), "%s", reason);
    }
}

mg_span *mg_msg_trace_process(const mg_msg *msg, mg_msg *out, const char *system,
                              const char *destination, const char *gateway_id)
{
    *out = *msg;
    mg_span *s = mg_span_start(&msg->trace, "process", MG_SPAN_CONSUMER, &out->trace);
    mg_span_attr(s, "messaging.system", system);
    mg_span_attr(s, "messaging.operation", "process");
    mg_span_attr(s, "messaging.destination.name", destination);
    mg_span_attr(s, "messaging.message.id", msg->id);
    mg_span_attr(s, "meshgate.gateway", gateway_id);
    return s;
}

void mg_msg_trace_end(mg_span *span, mg_status status, mg_path path, uint32_t connections,
                      const char *reason)
{
    if (!span)
        return;
    mg_span_attr(span, "meshgate.status", mg_status_name(status));
    mg_span_attr(span, "meshgate.path", mg_path_name(path));
    mg_span_attr_int(span, "meshgate.connections", connections);
    bool error = status == MG_STATUS_FAILED || status == MG_STATUS_REJECTED;
    mg_span_end(span, error, error ? reason : NULL);
}
