/* mg_trace.h: W3C Trace Context and spans exported over OTLP/HTTP.
 *
 * A message carries an mg_trace_ctx (router/msg.h): the trace id, the id of
 * the span that handed it on (the parent of the next one) and the flags.
 * Ingresses (a gRPC send, a WebSocket send frame) continue a valid
 * `traceparent` (its sampled flag decides) or start a new trace with
 * probability --trace-sample-ratio; every hop then records its span as a
 * child and hands its own context on (gRPC metadata, Kafka and NATS headers,
 * the protobuf envelope for the inbox and redis-pubsub).
 *
 * Cost on a message's path: an unsampled message costs a branch (mg_span_start
 * returns NULL and every other call takes NULL). A sampled span is a
 * preallocated slot taken from a free list (mg_span_start), a few stores
 * (attributes), and a push onto the export queue (mg_span_end), each under
 * one short mutex. When no slot is free the span is dropped and counted
 * (meshgate_trace_spans_dropped_total); the context still propagates.
 *
 * The exporter thread (`otlp-export`) takes ended spans in batches (up to
 * 512, or every 500 ms), encodes them as OTLP/JSON and POSTs them to
 * <endpoint>/v1/traces (libcurl, 2 s timeout); its slots return to the free
 * list before the POST, so a dead or slow collector costs only dropped
 * spans (counted as failed: meshgate_trace_spans_failed_total), never a
 * wait on a message's path.
 *
 * Thread-safety: every function may be called from any thread once
 * mg_trace_start returned; mg_trace_start and mg_trace_stop are called once
 * each, from the main thread. Without mg_trace_start (tests, the CLI) spans
 * are never recorded and contexts still propagate.
 */
#ifndef MG_TRACE_H
#define MG_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MG_TRACEPARENT_LEN 55 /* "00-<32 hex>-<16 hex>-<2 hex>" */
#define MG_TRACE_SAMPLED   0x01

typedef struct mg_trace_ctx {
    uint8_t trace_id[16]; /* all zero: no trace */
    uint8_t span_id[8];   /* the span that handed the message on */
    uint8_t flags;        /* W3C trace-flags; bit 0: sampled */
} mg_trace_ctx;

/* Whether c names a trace (a non-zero trace id). */
bool mg_trace_valid(const mg_trace_ctx *c);
static inline bool mg_trace_sampled(const mg_trace_ctx *c)
{
    return (c->flags & MG_TRACE_SAMPLED) != 0;
}

/* Parses a W3C traceparent strictly: version 00, lowercase hex, exactly 55
 * characters, trace id and parent id not all zero (a higher version is
 * read by its first four fields, as the spec says). Returns 0 with *out
 * filled, or -EINVAL (then *out is zeroed). s need not be NUL-terminated. */
int mg_traceparent_parse(const char *s, size_t len, mg_trace_ctx *out);
/* Writes c as a traceparent (55 characters and a NUL) and returns 55, or
 * writes "" and returns 0 when c is not valid. */
size_t mg_traceparent_format(const mg_trace_ctx *c, char out[MG_TRACEPARENT_LEN + 1]);
/* The trace id as 32 lowercase hex digits and a NUL. */
void mg_trace_id_hex(const mg_trace_ctx *c, char out[33]);

/* Where a message enters: continues traceparent (s, len; NULL or invalid:
 * ignored) or starts a new trace sampled with the configured ratio. *out
 * is zeroed when the message is not traced. Never fails. */
void mg_trace_ingress(const char *s, size_t len, mg_trace_ctx *out);

/* The same for a context already parsed (e.g. from a WebSocket frame):
 * kept when valid, else a new trace by the ratio, else zeroed. */
void mg_trace_begin(mg_trace_ctx *c);

typedef struct mg_trace_config {
    const char *endpoint;     /* "http://host:4318" ("/v1/traces" is appended); "": no export */
    double sample_ratio;      /* new traces started at ingress: 0..1 (none without an endpoint) */
    const char *service_name; /* resource service.name */
    const char *instance_id;  /* resource service.instance.id (the gateway id) */
    const char *region;       /* resource meshgate.region */
    size_t slots;             /* spans recorded and not yet exported, at most */
} mg_trace_config;

/* Starts tracing (and, with an endpoint, the exporter thread). Returns 0 or
 * -EINVAL (a bad endpoint or ratio: nothing started). */
int mg_trace_start(const mg_trace_config *cfg);
/* Exports what is queued (at most timeout_ms in all; what is left then is
 * counted as failed), stops the exporter and frees the slots. Call it when
 * every span has ended (after the message paths stopped). A no-op when
 * tracing was not started. */
void mg_trace_stop(int timeout_ms);

typedef enum {
    MG_SPAN_INTERNAL = 1, /* OTLP Span.SpanKind values */
    MG_SPAN_SERVER = 2,
    MG_SPAN_CLIENT = 3,
    MG_SPAN_PRODUCER = 4,
    MG_SPAN_CONSUMER = 5,
} mg_span_kind;

typedef struct mg_span mg_span;

/* Starts a span named name (a static string) as a child of parent. child
 * (may be NULL) receives the context to hand on: the new span's id when
 * parent is sampled, else parent itself (an unsampled or absent trace
 * propagates unchanged). Returns the span, or NULL when nothing is recorded
 * (not sampled, tracing off, or no free slot: then dropped and counted).
 * child may point to parent (a message's context replaced in place). */
mg_span *mg_span_start(const mg_trace_ctx *parent, const char *name, mg_span_kind kind,
                       mg_trace_ctx *child);
/* Attributes (at most 12; more are ignored): key is a static string, val
 * is copied (up to 63 bytes). s NULL: no-op. */
void mg_span_attr(mg_span *s, const char *key, const char *val);
void mg_span_attr_int(mg_span *s, const char *key, int64_t val);
/* network.peer.address and network.peer.port from "host:port" or
 * "[v6]:port" (a value without a port: the address alone). */
void mg_span_attr_peer(mg_span *s, const char *hostport);
/* Ends the span and queues it for export; error sets the OTLP status to
 * ERROR with message (may be NULL). s NULL: no-op. s is gone after this. */
void mg_span_end(mg_span *s, bool error, const char *message);

#endif
