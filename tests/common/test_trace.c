/* Tests of mg_trace.c: the W3C traceparent parser and formatter (valid and
 * invalid forms row by row), sampling at ingress, span contexts, the
 * OTLP/JSON encoding, and an exporter whose collector is gone. Includes the
 * .c to reach the encoder and the span slots. */
#include "common/mg_trace.c"
#include "router/msg.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#define TP_OK "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

static int closed_port(void);

static int parse(const char *s, mg_trace_ctx *c)
{
    return mg_traceparent_parse(s, strlen(s), c);
}

Test(trace, parses_and_formats_a_valid_traceparent)
{
    mg_trace_ctx c;
    cr_assert_eq(parse(TP_OK, &c), 0);
    cr_assert(mg_trace_valid(&c));
    cr_assert(mg_trace_sampled(&c));
    cr_assert_eq(c.trace_id[0], 0x4b);
    cr_assert_eq(c.trace_id[15], 0x36);
    cr_assert_eq(c.span_id[0], 0x00);
    cr_assert_eq(c.span_id[7], 0xb7);
    char out[MG_TRACEPARENT_LEN + 1];
    cr_assert_eq(mg_traceparent_format(&c, out), MG_TRACEPARENT_LEN);
    cr_assert_str_eq(out, TP_OK);
    char hex[33];
    mg_trace_id_hex(&c, hex);
    cr_assert_str_eq(hex, "4bf92f3577b34da6a3ce929d0e0e4736");

    cr_assert_eq(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", &c), 0);
    cr_assert_not(mg_trace_sampled(&c));
    /* unknown flags are dropped, sampled kept */
    cr_assert_eq(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09", &c), 0);
    cr_assert_eq(c.flags, MG_TRACE_SAMPLED);
    /* a later version: its first four fields, extra fields after a '-' */
    cr_assert_eq(parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what", &c), 0);
    cr_assert(mg_trace_sampled(&c));
}

Test(trace, refuses_every_invalid_form)
{
    static const char *bad[] = {
        "",
        "00",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",      /* no flags */
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", /* 00 has 4 fields */
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",    /* short flags */
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",   /* uppercase */
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",   /* zero trace id */
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",   /* zero parent id */
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   /* version ff */
        "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   /* not hex */
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   /* separator */
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",   /* misplaced '-' */
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", /* later version, no '-' */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        mg_trace_ctx c;
        memset(&c, 0xab, sizeof(c));
        cr_assert_eq(parse(bad[i], &c), -EINVAL, "accepted \"%s\"", bad[i]);
        cr_assert_not(mg_trace_valid(&c), "left a context for \"%s\"", bad[i]);
    }
    mg_trace_ctx c;
    cr_assert_eq(mg_traceparent_parse(NULL, 0, &c), -EINVAL);
    char out[MG_TRACEPARENT_LEN + 1] = "x";
    cr_assert_eq(mg_traceparent_format(&c, out), 0); /* no trace: "" */
    cr_assert_str_eq(out, "");
}

Test(trace, ingress_continues_or_samples_by_ratio)
{
    mg_trace_ctx c;
    /* not started: ratio 0, a valid traceparent is still continued */
    mg_trace_ingress(TP_OK, strlen(TP_OK), &c);
    cr_assert(mg_trace_sampled(&c));
    mg_trace_ingress(NULL, 0, &c);
    cr_assert_not(mg_trace_valid(&c));
    /* no endpoint: no new traces, whatever the ratio; callers' are continued */
    mg_trace_config cfg = {.endpoint = "", .sample_ratio = 1.0};
    cr_assert_eq(mg_trace_start(&cfg), 0);
    mg_trace_ingress(NULL, 0, &c);
    cr_assert_not(mg_trace_valid(&c));
    mg_trace_ingress(TP_OK, strlen(TP_OK), &c);
    cr_assert(mg_trace_sampled(&c));
    mg_trace_stop(0);
    /* invalid: a new trace by the ratio, never an error */
    char dead[64];
    snprintf(dead, sizeof(dead), "http://127.0.0.1:%d", closed_port());
    cfg.endpoint = dead;
    cr_assert_eq(mg_trace_start(&cfg), 0);
    mg_trace_ingress("00-zz", 5, &c);
    cr_assert(mg_trace_valid(&c) && mg_trace_sampled(&c));
    cr_assert(all_zero(c.span_id, 8)); /* a root: the first span has no parent */
    mg_trace_ctx d;
    mg_trace_ingress(NULL, 0, &d);
    cr_assert(memcmp(c.trace_id, d.trace_id, 16) != 0);
    mg_trace_stop(0);
    cfg.sample_ratio = 0.5;
    cr_assert_eq(mg_trace_start(&cfg), 0);
    int sampled = 0;
    for (int i = 0; i < 4000; i++) {
        mg_trace_ingress(NULL, 0, &c);
        sampled += mg_trace_valid(&c);
    }
    cr_assert(sampled > 1600 && sampled < 2400, "sampled %d of 4000 at 0.5", sampled);
    mg_trace_stop(0);
    cfg.sample_ratio = 1.5;
    cr_assert_eq(mg_trace_start(&cfg), -EINVAL);
    cfg.sample_ratio = 1;
    cfg.endpoint = "127.0.0.1:4318"; /* no scheme */
    cr_assert_eq(mg_trace_start(&cfg), -EINVAL);
}

Test(trace, span_contexts_chain_and_unsampled_propagate)
{
    mg_trace_ctx root, child, grand;
    cr_assert_eq(parse(TP_OK, &root), 0);
    /* not exporting: nothing recorded, the child context still chains */
    cr_assert_null(mg_span_start(&root, "a", MG_SPAN_SERVER, &child));
    cr_assert_eq(memcmp(child.trace_id, root.trace_id, 16), 0);
    cr_assert_neq(memcmp(child.span_id, root.span_id, 8), 0);
    mg_span_start(&child, "b", MG_SPAN_INTERNAL, &grand);
    cr_assert_neq(memcmp(grand.span_id, child.span_id, 8), 0);
    mg_trace_ctx same = child; /* in place: the new span id replaces the parent's */
    mg_span_start(&same, "c", MG_SPAN_INTERNAL, &same);
    cr_assert_eq(memcmp(same.trace_id, child.trace_id, 16), 0);
    cr_assert_neq(memcmp(same.span_id, child.span_id, 8), 0);
    /* unsampled: propagates unchanged */
    cr_assert_eq(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", &root), 0);
    cr_assert_null(mg_span_start(&root, "a", MG_SPAN_SERVER, &child));
    cr_assert_eq(memcmp(&child, &root, sizeof(root)), 0);
    /* no trace */
    memset(&root, 0, sizeof(root));
    cr_assert_null(mg_span_start(&root, "a", MG_SPAN_SERVER, &child));
    cr_assert_not(mg_trace_valid(&child));
    mg_span_attr(NULL, "k", "v"); /* NULL spans are no-ops */
    mg_span_end(NULL, false, NULL);
}

/* network.peer.* from the forms gRPC and Consul give a peer in. */
Test(trace, peer_address_and_port_are_split)
{
    static const char *const rows[][3] = {
        {"127.0.0.1:5678", "127.0.0.1", "5678"},
        {"[::1]:443", "::1", "443"},
        {"::1", "::1", NULL},
        {"gw-b.internal:7000", "gw-b.internal", "7000"},
        {"10.0.0.1", "10.0.0.1", NULL},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        mg_span s;
        memset(&s, 0, sizeof(s));
        mg_span_attr_peer(&s, rows[i][0]);
        cr_assert_str_eq(s.attr[0].key, "network.peer.address");
        cr_assert_str_eq(s.attr[0].s, rows[i][1], "%s: address %s", rows[i][0], s.attr[0].s);
        if (rows[i][2]) {
            cr_assert_eq(s.nattr, 2, "%s: a port", rows[i][0]);
            cr_assert_str_eq(s.attr[1].key, "network.peer.port");
            cr_assert_eq(s.attr[1].i, atoi(rows[i][2]));
        } else {
            cr_assert_eq(s.nattr, 1, "%s: no port", rows[i][0]);
        }
    }
    mg_span_attr_peer(NULL, "127.0.0.1:1"); /* no-ops */
}

Test(trace, encodes_otlp_json)
{
    mg_span s;
    memset(&s, 0, sizeof(s));
    mg_trace_ctx c;
    parse(TP_OK, &c);
    memcpy(s.trace_id, c.trace_id, 16);
    memcpy(s.parent_id, c.span_id, 8);
    memset(s.span_id, 0x11, 8);
    s.kind = MG_SPAN_CLIENT;
    s.flags = 1;
    s.name = "meshgate.v1.GatewayPeer/DeliverMessage";
    s.start_ns = 1700000000000000000;
    s.end_ns = 1700000000000500000;
    mg_span_attr(&s, "rpc.system", "grpc");
    mg_span_attr(&s, "messaging.message.id", "q\"b\\s\x01\xc3\xa9"); /* escaped, UTF-8 kept */
    mg_span_attr_int(&s, "meshgate.connections", 3);
    s.error = 1;
    snprintf(s.message, sizeof(s.message), "peer gw-b: UNAVAILABLE");
    for (int i = 0; i < 20; i++) /* capped */
        mg_span_attr(&s, "x", "y");
    cr_assert_eq(s.nattr, SPAN_ATTRS);
    mg_span root;
    memset(&root, 0, sizeof(root));
    memcpy(root.trace_id, c.trace_id, 16);
    memset(root.span_id, 0x22, 8);
    root.name = "route";
    root.kind = MG_SPAN_INTERNAL;
    mg_span *spans[] = {&s, &root};
    jbuf out = {0};
    encode_otlp(&out, spans, 2, "meshgate", "gw-a", "eu");
    char *text = out.p;
    json_error_t e;
    json_t *doc = json_loads(text, 0, &e);
    cr_assert_not_null(doc, "%s: %s", e.text, text);
    json_t *rs = json_array_get(json_object_get(doc, "resourceSpans"), 0);
    json_t *rattr = json_object_get(json_object_get(rs, "resource"), "attributes");
    cr_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_array_get(rattr, 0), "value"), "stringValue")),
                     "meshgate");
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(rattr, 1), "key")),
                     "service.instance.id");
    json_t *sp = json_object_get(json_array_get(json_object_get(rs, "scopeSpans"), 0), "spans");
    cr_assert_eq(json_array_size(sp), 2);
    json_t *a = json_array_get(sp, 0);
    cr_assert_str_eq(json_string_value(json_object_get(a, "traceId")),
                     "4bf92f3577b34da6a3ce929d0e0e4736");
    cr_assert_str_eq(json_string_value(json_object_get(a, "spanId")), "1111111111111111");
    cr_assert_str_eq(json_string_value(json_object_get(a, "parentSpanId")), "00f067aa0ba902b7");
    cr_assert_eq(json_integer_value(json_object_get(a, "kind")), 3);
    cr_assert_str_eq(json_string_value(json_object_get(a, "startTimeUnixNano")),
                     "1700000000000000000");
    cr_assert_str_eq(json_string_value(json_object_get(a, "endTimeUnixNano")),
                     "1700000000000500000");
    json_t *attrs = json_object_get(a, "attributes");
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(attrs, 0), "key")),
                     "rpc.system");
    cr_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_array_get(attrs, 1), "value"), "stringValue")),
                     "q\"b\\s\x01\xc3\xa9");
    cr_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_array_get(attrs, 2), "value"), "intValue")),
                     "3");
    json_t *st = json_object_get(a, "status");
    cr_assert_eq(json_integer_value(json_object_get(st, "code")), 2);
    cr_assert_str_eq(json_string_value(json_object_get(st, "message")), "peer gw-b: UNAVAILABLE");
    json_t *b = json_array_get(sp, 1);
    cr_assert_null(json_object_get(b, "parentSpanId")); /* a root has none */
    cr_assert_null(json_object_get(b, "status"));
    json_decref(doc);
    free(text);
}

/* A port nothing listens on: bound, then closed. */
static int closed_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(fd, (struct sockaddr *)&a, sizeof(a));
    socklen_t n = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &n);
    close(fd);
    return ntohs(a.sin_port);
}

Test(trace, a_dead_collector_costs_dropped_spans_only)
{
    char ep[64];
    snprintf(ep, sizeof(ep), "http://127.0.0.1:%d", closed_port());
    mg_trace_config cfg = {.endpoint = ep, .sample_ratio = 1.0, .slots = 64};
    cr_assert_eq(mg_trace_start(&cfg), 0);
    int64_t dropped0 = mg_metric_value(T.dropped), failed0 = mg_metric_value(T.failed);
    mg_trace_ctx root, child;
    int recorded = 0;
    for (int i = 0; i < 1000; i++) { /* far more than the slots, at once */
        mg_trace_ingress(NULL, 0, &root);
        mg_span *s = mg_span_start(&root, "send", MG_SPAN_SERVER, &child);
        recorded += s != NULL;
        mg_span_attr(s, "meshgate.path", "local");
        mg_span_end(s, false, NULL);
    }
    cr_assert_geq(recorded, 64, "recorded %d", recorded);
    int64_t t0 = mg_mono_ms();
    mg_trace_stop(1000);
    cr_assert_lt(mg_mono_ms() - t0, 5000, "stop is bounded");
    int64_t dropped = mg_metric_value(T.dropped) - dropped0;
    int64_t failed = mg_metric_value(T.failed) - failed0;
    cr_assert_eq(dropped + recorded, 1000);
    cr_assert_eq(failed, recorded, "every recorded span failed to export (%lld of %d)",
                 (long long)failed, recorded);
}

Test(trace, the_envelope_carries_the_context)
{
    mg_msg *m = mg_msg_new("m1", "a", "b", (const uint8_t *)"x", 1, NULL, 1, MG_PRIO_HIGH);
    size_t len;
    uint8_t *buf = mg_msg_pack(m, &len);
    mg_msg *back = NULL;
    cr_assert_eq(mg_msg_unpack(buf, len, &back), 0);
    cr_assert_not(mg_trace_valid(&back->trace));
    free(buf);
    mg_msg_free(back);
    cr_assert_eq(parse(TP_OK, &m->trace), 0);
    buf = mg_msg_pack(m, &len);
    cr_assert_eq(mg_msg_unpack(buf, len, &back), 0);
    cr_assert_eq(memcmp(&back->trace, &m->trace, sizeof(m->trace)), 0);
    mg_msg *d = mg_msg_dup_to(back, "c");
    cr_assert_eq(memcmp(&d->trace, &m->trace, sizeof(m->trace)), 0);
    mg_msg_free(d);
    free(buf);
    mg_msg_free(back);
    mg_msg_free(m);
}
