/* Tracing end to end against the REAL Jaeger v2 of tests/infra/jaeger.sh
 * (MESHGATE_TEST_JAEGER_OTLP, _QUERY), Redis Cluster, Consul and Kafka:
 *
 * - a gRPC send with a traceparent, across two gateways of one region
 *   (gRPC direct) and to a gateway of another region (Kafka), shows up in
 *   Jaeger as one trace each, with every span and its parent: the API call,
 *   route, presence lookup, the transport attempt, the remote gateway's
 *   handling, the write to the device and the device's inbox ack (the
 *   client echoes the message frame's traceparent);
 * - the buses without a gRPC hop do the same: redis-pubsub to a gateway of
 *   the region (the context in the payload's envelope), NATS to another
 *   region (a message header);
 * - a WebSocket send with a traceparent continues the caller's trace, one
 *   with an invalid traceparent starts a new one (and is delivered);
 * - each device of the recipient gets its own `ws write` span (its connection
 *   and address, written), and each device's ack is a child of its own write;
 *   a message stored for an offline user gets its `ws write` when the inbox
 *   page is sent on connect;
 * - a SendStream call with a traceparent: every message of the stream is in
 *   that trace, each `route` a child of the caller's span; a SendBatch's
 *   server span sums its recipients up (worst status, recipients, delivered);
 * - the attempt spans name where they went: the peer's network.peer.* for
 *   gRPC, messaging.destination.name (topic, subject, channel) for the buses;
 * - a dead collector (an endpoint on a closed port) leaves sends answered
 *   within their deadline, and the spans are counted failed or dropped.
 *
 * Gateways trace everything (--trace-sample-ratio 1). Spans reach Jaeger
 * within the exporter's 500 ms flush plus Jaeger's batch; every wait polls
 * with a bound. */
#include "common/mg_grpc.h"
#include "common/mg_time.h"
#include "common/mg_trace.h"
#include "support/grpc_client.h"
#include "support/grpc_stream_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_json.h"

#include <criterion/criterion.h>
#include <grpc/grpc_security.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tag[32];

static int url_port(const char *url)
{
    const char *c = strrchr(url, ':');
    return c ? atoi(c + 1) : -1;
}

/* more: further NULL-terminated flags (later ones win), may be NULL. */
static mg_gw *spawn_with(const char *name, const char *region, const char *otlp,
                         const char *const *more)
{
    static char svc[64], topic[64];
    snprintf(svc, sizeof(svc), "meshgate-%s", tag);
    snprintf(topic, sizeof(topic), "meshgate.%s.", tag);
    char id[64];
    snprintf(id, sizeof(id), "%s-%s", tag, name);
    const char *args[24] = {
        "--hot-threshold", "1000000", /* every pair stays cold: far goes by Kafka */
        "--otlp-endpoint", otlp,      "--trace-sample-ratio", "1"};
    size_t n = 6;
    for (size_t i = 0; more && more[i] && n + 1 < sizeof(args) / sizeof(args[0]); i++)
        args[n++] = more[i];
    mg_gw *gw = mg_gw_spawn_fleet_kafka(id, svc, region, topic, args);
    cr_assert_not_null(gw, "gateway %s did not start", id);
    return gw;
}

static mg_gw *spawn(const char *name, const char *region, const char *otlp)
{
    return spawn_with(name, region, otlp, NULL);
}

/* SIGTERM to all at once (a NATS gateway takes seconds to stop), then each
 * must exit cleanly (sanitizer builds: leak-free). */
static void stop_all(mg_gw **gws, int n)
{
    for (int i = 0; i < n; i++)
        mg_gw_kill(gws[i], SIGTERM);
    for (int i = 0; i < n; i++)
        cr_expect_eq(mg_gw_stop(gws[i]), 0, "gateway %s did not exit cleanly", gws[i]->name);
}

static mg_wsc *connect_user(const mg_gw *gw, const char *user)
{
    int st = 0;
    mg_wsc *c = mg_wsc_connect_user(gw->ws_port, user, 5000, &st);
    cr_assert_not_null(c, "connect as %s: HTTP %d", user, st);
    return c;
}

/* A unary call of method on gw with `traceparent` metadata (NULL: none);
 * returns the status, *resp the answer's bytes (malloc'd, NULL: none). */
static grpc_status_code call_traced(const mg_gw *gw, const char *method, const ProtobufCMessage *rq,
                                    const char *traceparent, int timeout_ms, uint8_t **resp,
                                    size_t *resp_len)
{
    grpc_init();
    grpc_channel_credentials *cr = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(gw->grpc_addr, cr, NULL);
    grpc_channel_credentials_release(cr);
    grpc_metadata md = {0};
    md.key = grpc_slice_from_static_string("traceparent");
    md.value = grpc_slice_from_copied_string(traceparent ? traceparent : "");
    grpc_byte_buffer *req = mg_grpc_pack(rq), *rb = NULL;
    char details[256] = "";
    grpc_status_code st = mg_grpc_unary_call(ch, method, req, &md, traceparent ? 1 : 0, timeout_ms,
                                             &rb, details, sizeof(details));
    grpc_slice_unref(md.value);
    grpc_byte_buffer_destroy(req);
    *resp = rb ? mg_grpc_buffer_read(rb, resp_len) : NULL;
    grpc_byte_buffer_destroy(rb);
    grpc_channel_destroy(ch);
    grpc_shutdown();
    return st;
}

/* SendMessage with `traceparent` metadata (NULL: none); returns the status
 * and the result's path. */
static grpc_status_code send_traced(const mg_gw *gw, const char *to, const char *traceparent,
                                    int timeout_ms, int *path)
{
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.from = "trace-sender";
    m.to = (char *)to;
    m.content.data = (uint8_t *)"traced";
    m.content.len = 6;
    Meshgate__V1__SendMessageRequest rq = MESHGATE__V1__SEND_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    size_t len = 0;
    uint8_t *data = NULL;
    grpc_status_code st =
        call_traced(gw, MG_RPC_SEND_MESSAGE, &rq.base, traceparent, timeout_ms, &data, &len);
    *path = -1;
    if (data) {
        Meshgate__V1__SendMessageResponse *r =
            meshgate__v1__send_message_response__unpack(NULL, len, data);
        if (r && r->result)
            *path = (int)r->result->path;
        if (r)
            protobuf_c_message_free_unpacked(&r->base, NULL);
        free(data);
    }
    return st;
}

/* SendBatch of one message to to[n] with `traceparent` metadata. */
static grpc_status_code send_batch_traced(const mg_gw *gw, char **to, size_t n,
                                          const char *traceparent)
{
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.from = "trace-sender";
    m.content.data = (uint8_t *)"batch";
    m.content.len = 5;
    Meshgate__V1__SendBatchRequest rq = MESHGATE__V1__SEND_BATCH_REQUEST__INIT;
    rq.message = &m;
    rq.to = to;
    rq.n_to = n;
    size_t len = 0;
    uint8_t *data = NULL;
    grpc_status_code st =
        call_traced(gw, MG_RPC_SEND_BATCH, &rq.base, traceparent, 10000, &data, &len);
    free(data);
    return st;
}

/* Reads frames until a message frame; returns it (caller decrefs). */
static json_t *recv_message(mg_wsc *c)
{
    for (int i = 0; i < 20; i++) {
        json_t *j = mg_wsc_recv_json(c, 15000);
        cr_assert_not_null(j, "no message frame arrived");
        const char *type = mg_json_str(j, "type");
        if (type && !strcmp(type, "message"))
            return j;
        json_decref(j);
    }
    cr_assert_fail("no message frame among 20 frames");
    return NULL;
}

/* The device acks the message, echoing its traceparent (the inbox ack span). */
static void ack_traced(mg_wsc *c, json_t *msg)
{
    char frame[256];
    snprintf(frame, sizeof(frame), "{\"type\":\"ack\",\"id\":\"%s\",\"traceparent\":\"%s\"}",
             mg_json_str(msg, "id"), mg_json_str(msg, "traceparent"));
    cr_assert_eq(mg_wsc_send_text(c, frame), 0);
}

/* ---- Jaeger's answer --------------------------------------------------------- */

/* The value of tag key in a Jaeger tag list, or "". */
static const char *tag_of(json_t *tags, const char *key)
{
    for (size_t i = 0; i < json_array_size(tags); i++) {
        json_t *t = json_array_get(tags, i);
        if (!strcmp(mg_json_str(t, "key"), key))
            return mg_json_str(t, "value");
    }
    return "";
}

/* A tag's value as text (Jaeger gives int64 tags as numbers), "" when absent. */
static const char *tag_text(json_t *span, const char *key, char *buf, size_t len)
{
    size_t i;
    json_t *t;
    buf[0] = '\0';
    json_array_foreach(json_object_get(span, "tags"), i, t)
    {
        if (strcmp(mg_json_str(t, "key"), key))
            continue;
        json_t *v = json_object_get(t, "value");
        if (json_is_string(v))
            snprintf(buf, len, "%s", json_string_value(v));
        else if (json_is_integer(v))
            snprintf(buf, len, "%lld", (long long)json_integer_value(v));
    }
    return buf;
}

/* A span of a trace as Jaeger's /api/traces gives it: "<operation>|<span.kind>|<gateway id>". */
static void span_key(json_t *trace, json_t *span, char *out, size_t len)
{
    json_t *proc =
        json_object_get(json_object_get(trace, "processes"), mg_json_str(span, "processID"));
    snprintf(out, len, "%s|%s|%s", mg_json_str(span, "operationName"),
             tag_of(json_object_get(span, "tags"), "span.kind"),
             tag_of(json_object_get(proc, "tags"), "service.instance.id"));
}

static json_t *jaeger_trace(const char *trace_id)
{
    char path[96];
    snprintf(path, sizeof(path), "/api/traces/%s", trace_id);
    char *body = NULL;
    json_t *tr = NULL;
    if (mg_http_get(url_port(mg_test_require_env("MESHGATE_TEST_JAEGER_QUERY")), path, &body) ==
        200) {
        json_t *doc = json_loads(body, 0, NULL);
        tr = json_incref(json_array_get(json_object_get(doc, "data"), 0));
        json_decref(doc);
    }
    free(body);
    return tr;
}

/* The span whose key is key, or NULL. */
static json_t *find_span(json_t *trace, const char *key)
{
    size_t i;
    json_t *s;
    json_array_foreach(json_object_get(trace, "spans"), i, s)
    {
        char k[256];
        span_key(trace, s, k, sizeof(k));
        if (!strcmp(k, key))
            return s;
    }
    return NULL;
}

static const char *parent_of(json_t *span)
{
    json_t *ref = json_array_get(json_object_get(span, "references"), 0);
    return ref ? mg_json_str(ref, "spanID") : "";
}

/* rows: {span key, its parent's key} ending with {NULL}; the first row's
 * parent is the caller's span id (hex). Waits up to 15 s for every span. */
static void expect_trace(const char *trace_id, const char *caller_span, const char *const rows[][2])
{
    json_t *tr = NULL;
    const char *missing = NULL;
    for (int64_t end = mg_mono_ms() + 15000; mg_mono_ms() < end; usleep(200000)) {
        json_decref(tr);
        tr = jaeger_trace(trace_id);
        missing = NULL;
        for (int i = 0; rows[i][0] && !missing; i++)
            if (!tr || !find_span(tr, rows[i][0]))
                missing = rows[i][0];
        if (!missing)
            break;
    }
    cr_assert_null(missing, "trace %s has no span %s", trace_id, missing);
    for (int i = 0; rows[i][0]; i++) {
        json_t *s = find_span(tr, rows[i][0]);
        const char *want = i == 0 ? caller_span : mg_json_str(find_span(tr, rows[i][1]), "spanID");
        cr_expect_str_eq(parent_of(s), want, "span %s: parent %s is not %s", rows[i][0],
                         parent_of(s), i == 0 ? "the caller's span" : rows[i][1]);
    }
    json_decref(tr);
}

#define KEY(op, kind, gw) op "|" kind "|%s-" gw

/* The span of the trace whose id is span_id, or NULL. */
static json_t *span_by_id(json_t *trace, const char *span_id)
{
    size_t i;
    json_t *s;
    json_array_foreach(json_object_get(trace, "spans"), i, s)
    {
        if (!strcmp(mg_json_str(s, "spanID"), span_id))
            return s;
    }
    return NULL;
}

/* How many spans of the trace have key (tagged) and the parent parent_id. */
static int count_children(json_t *trace, const char *key_fmt, const char *parent_id)
{
    char want[256], k[256];
    snprintf(want, sizeof(want), key_fmt, tag);
    size_t i;
    json_t *s;
    int n = 0;
    json_array_foreach(json_object_get(trace, "spans"), i, s)
    {
        span_key(trace, s, k, sizeof(k));
        n += !strcmp(k, want) && !strcmp(parent_of(s), parent_id);
    }
    return n;
}

/* Polls Jaeger (15 s at most) until ready(trace, arg) holds; returns the
 * trace (caller decrefs) or fails. */
static json_t *wait_trace(const char *trace_id, bool (*ready)(json_t *tr, void *arg), void *arg,
                          const char *what)
{
    json_t *tr = NULL;
    for (int64_t end = mg_mono_ms() + 15000; mg_mono_ms() < end; usleep(200000)) {
        json_decref(tr);
        tr = jaeger_trace(trace_id);
        if (tr && ready(tr, arg))
            return tr;
    }
    json_decref(tr);
    cr_assert_fail("trace %s: %s", trace_id, what);
    return NULL;
}

/* The tag of the span keyed key_fmt (tagged) is want. */
static void expect_tag(json_t *trace, const char *key_fmt, const char *name, const char *want)
{
    char key[256], buf[128];
    snprintf(key, sizeof(key), key_fmt, tag);
    json_t *s = find_span(trace, key);
    cr_assert_not_null(s, "no span %s", key);
    cr_expect_str_eq(tag_text(s, name, buf, sizeof(buf)), want, "%s: %s is \"%s\", not %s", key,
                     name, buf, want);
}

/* Devices whose frames (traceparents) name their write spans. */
typedef struct devices {
    const char *span[4]; /* each frame's traceparent span id */
    size_t n;
    bool acked;
} devices;

static bool devices_ready(json_t *tr, void *arg)
{
    devices *d = arg;
    for (size_t i = 0; i < d->n; i++) {
        if (!span_by_id(tr, d->span[i]))
            return false;
        if (d->acked && count_children(tr, KEY("inbox ack", "server", "b"), d->span[i]) != 1)
            return false;
    }
    return true;
}

/* Each device's frame (frames[i], on gateway b) names its own `ws write`
 * span: a child of parent_key, written, with the device's connection and
 * address; with acked, each device's `inbox ack` is its own write's child. */
static void expect_device_writes(const char *trace_id, json_t *const *frames, size_t n,
                                 const char *parent_key, bool acked)
{
    devices d = {.n = n, .acked = acked};
    char ids[4][17];
    for (size_t i = 0; i < n; i++) {
        const char *tp = mg_json_str(frames[i], "traceparent");
        cr_assert(tp && strlen(tp) == MG_TRACEPARENT_LEN, "frame %zu has a traceparent", i);
        snprintf(ids[i], sizeof(ids[i]), "%.16s", tp + 36);
        d.span[i] = ids[i];
    }
    json_t *tr = wait_trace(trace_id, devices_ready, &d, "a write span per device");
    char pkey[256], conn0[128] = "", buf[128], k[256];
    snprintf(pkey, sizeof(pkey), parent_key, tag);
    json_t *parent = find_span(tr, pkey);
    cr_assert_not_null(parent, "no span %s", pkey);
    for (size_t i = 0; i < n; i++) {
        json_t *s = span_by_id(tr, ids[i]);
        span_key(tr, s, k, sizeof(k));
        cr_expect(strstr(k, "ws write|internal|") == k, "device %zu's frame names %s", i, k);
        cr_expect_str_eq(parent_of(s), mg_json_str(parent, "spanID"), "a child of %s", pkey);
        cr_expect_str_eq(tag_text(s, "meshgate.status", buf, sizeof(buf)), "written");
        cr_expect_str_eq(tag_text(s, "network.peer.address", buf, sizeof(buf)), "127.0.0.1");
        cr_expect_gt(atoi(tag_text(s, "network.peer.port", buf, sizeof(buf))), 0);
        tag_text(s, "meshgate.connection.id", buf, sizeof(buf));
        cr_expect(buf[0] && strcmp(buf, conn0), "device %zu: its own connection (%s)", i, buf);
        if (i == 0)
            snprintf(conn0, sizeof(conn0), "%s", buf);
    }
    json_decref(tr);
}

/* Expands the "%s-" of each key with the test's tag. */
static void expect_trace_tagged(const char *trace_id, const char *caller_span,
                                const char *const rows[][2])
{
    static char buf[32][2][256];
    const char *r[32][2];
    int i = 0;
    for (; rows[i][0]; i++)
        for (int k = 0; k < 2; k++) {
            r[i][k] = NULL;
            if (rows[i][k]) {
                snprintf(buf[i][k], sizeof(buf[i][k]), rows[i][k], tag);
                r[i][k] = buf[i][k];
            }
        }
    r[i][0] = r[i][1] = NULL;
    expect_trace(trace_id, caller_span, r);
}

static void new_traceparent(char tp[MG_TRACEPARENT_LEN + 1], char trace_id[33], char span_id[17])
{
    mg_trace_ctx c = {.flags = MG_TRACE_SAMPLED};
    for (int i = 0; i < 16; i++)
        c.trace_id[i] = (uint8_t)(rand() | 1);
    for (int i = 0; i < 8; i++)
        c.span_id[i] = (uint8_t)(rand() | 1);
    mg_traceparent_format(&c, tp);
    memcpy(trace_id, tp + 3, 32);
    trace_id[32] = '\0';
    memcpy(span_id, tp + 36, 16);
    span_id[16] = '\0';
}

/* Reads frames until the message frame of trace tid (others are skipped). */
static json_t *recv_traced(mg_wsc *c, const char *tid)
{
    for (int i = 0; i < 20; i++) {
        json_t *m = recv_message(c);
        const char *t = mg_json_str(m, "trace_id");
        if (t && !strcmp(t, tid))
            return m;
        json_decref(m);
    }
    cr_assert_fail("no message of trace %s among 20", tid);
    return NULL;
}

/* Sends traced messages from gw to `to` until one goes by want_path (a bus
 * is usable once the peer table lists the target's buses: shortly after the
 * peers are known), at most 10 s; returns its trace's ids in tp/tid/sid.
 * Messages that went another way are read off rx. */
static void send_by_path(const mg_gw *gw, const char *to, mg_wsc *rx, int want_path,
                         char tp[MG_TRACEPARENT_LEN + 1], char tid[33], char sid[17])
{
    int path = -1;
    for (int64_t end = mg_mono_ms() + 10000; path != want_path && mg_mono_ms() < end;) {
        new_traceparent(tp, tid, sid);
        cr_assert_eq(send_traced(gw, to, tp, 10000, &path), GRPC_STATUS_OK);
        if (path != want_path) {
            json_decref(recv_message(rx));
            usleep(100000);
        }
    }
    cr_assert_eq(path, want_path, "no send went by path %d within 10 s", want_path);
}

/* The stream's trace: two routes under the caller's span, and the write
 * of each message to each of near's two devices. */
static bool stream_ready(json_t *tr, void *caller)
{
    char k[256];
    int writes = 0;
    size_t i;
    json_t *s;
    json_array_foreach(json_object_get(tr, "spans"), i, s)
    {
        span_key(tr, s, k, sizeof(k));
        writes += strstr(k, "ws write|internal|") == k;
    }
    return count_children(tr, KEY("route", "internal", "a"), caller) == 2 && writes == 4;
}

/* The span span_id and its parent are in (spans reach Jaeger from each
 * gateway on its own schedule). */
static bool has_span_and_parent(json_t *tr, void *span_id)
{
    json_t *s = span_by_id(tr, span_id);
    return s && span_by_id(tr, parent_of(s)) != NULL;
}

Test(tracing, one_trace_across_gateways_by_grpc_and_kafka, .timeout = 120)
{
    snprintf(tag, sizeof(tag), "tr%d", (int)getpid());
    srand((unsigned)getpid());
    const char *otlp = mg_test_require_env("MESHGATE_TEST_JAEGER_OTLP");
    mg_gw *a = spawn("a", "eu", otlp), *b = spawn("b", "eu", otlp), *c = spawn("c", "us", otlp);
    mg_gw *fleet[] = {a, b, c};
    cr_assert(mg_gw_wait_mesh(fleet, 3, 10000), "the three gateways see each other");
    char near[64], far[64], tx[64];
    snprintf(near, sizeof(near), "%s-near", tag);
    snprintf(far, sizeof(far), "%s-far", tag);
    snprintf(tx, sizeof(tx), "%s-tx", tag);
    /* near has two devices on b */
    mg_wsc *rx_near = connect_user(b, near), *rx_far = connect_user(c, far),
           *rx_near2 = connect_user(b, near);
    usleep(300000); /* presence written by the connect job */

    /* gRPC direct: a -> b */
    char tp[MG_TRACEPARENT_LEN + 1], tid[33], sid[17];
    send_by_path(a, near, rx_near, MESHGATE__V1__PATH__PATH_GRPC, tp, tid, sid);
    json_t *m = recv_message(rx_near);
    cr_assert_str_eq(mg_json_str(m, "trace_id"), tid, "the frame names the trace");
    json_t *m2 = recv_traced(rx_near2, tid);
    cr_assert_str_neq(mg_json_str(m, "traceparent"), mg_json_str(m2, "traceparent"),
                      "each device's frame names its own write");
    ack_traced(rx_near, m);
    ack_traced(rx_near2, m2);
    const char *const grpc_rows[][2] = {
        {KEY("meshgate.v1.Messaging/SendMessage", "server", "a"), NULL},
        {KEY("route", "internal", "a"), KEY("meshgate.v1.Messaging/SendMessage", "server", "a")},
        {KEY("presence lookup", "internal", "a"), KEY("route", "internal", "a")},
        {KEY("meshgate.v1.GatewayPeer/DeliverMessage", "client", "a"),
         KEY("route", "internal", "a")},
        {KEY("meshgate.v1.GatewayPeer/DeliverMessage", "server", "b"),
         KEY("meshgate.v1.GatewayPeer/DeliverMessage", "client", "a")},
        {KEY("ws write", "internal", "b"),
         KEY("meshgate.v1.GatewayPeer/DeliverMessage", "server", "b")},
        {NULL, NULL}};
    expect_trace_tagged(tid, sid, grpc_rows);
    json_t *near_frames[] = {m, m2};
    expect_device_writes(tid, near_frames, 2,
                         KEY("meshgate.v1.GatewayPeer/DeliverMessage", "server", "b"), true);
    json_decref(m);
    json_decref(m2);
    json_t *tr = jaeger_trace(tid);
    char port[16];
    snprintf(port, sizeof(port), "%d", url_port(b->grpc_addr));
    expect_tag(tr, KEY("meshgate.v1.GatewayPeer/DeliverMessage", "client", "a"),
               "network.peer.address", "127.0.0.1");
    expect_tag(tr, KEY("meshgate.v1.GatewayPeer/DeliverMessage", "client", "a"),
               "network.peer.port", port);
    json_decref(tr);

    /* Kafka: a (eu) -> c (us) */
    send_by_path(a, far, rx_far, MESHGATE__V1__PATH__PATH_KAFKA, tp, tid, sid);
    m = recv_message(rx_far);
    cr_assert_str_eq(mg_json_str(m, "trace_id"), tid);
    ack_traced(rx_far, m);
    json_decref(m);
    const char *const kafka_rows[][2] = {
        {KEY("meshgate.v1.Messaging/SendMessage", "server", "a"), NULL},
        {KEY("route", "internal", "a"), KEY("meshgate.v1.Messaging/SendMessage", "server", "a")},
        {KEY("presence lookup", "internal", "a"), KEY("route", "internal", "a")},
        {KEY("publish", "producer", "a"), KEY("route", "internal", "a")},
        {KEY("process", "consumer", "c"), KEY("publish", "producer", "a")},
        {KEY("route", "internal", "c"), KEY("process", "consumer", "c")},
        {KEY("presence lookup", "internal", "c"), KEY("route", "internal", "c")},
        {KEY("ws write", "internal", "c"), KEY("route", "internal", "c")},
        {KEY("inbox ack", "server", "c"), KEY("ws write", "internal", "c")},
        {NULL, NULL}};
    expect_trace_tagged(tid, sid, kafka_rows);
    char topic[96];
    snprintf(topic, sizeof(topic), "meshgate.%s.us", tag);
    tr = jaeger_trace(tid);
    expect_tag(tr, KEY("publish", "producer", "a"), "messaging.destination.name", topic);
    json_decref(tr);

    /* WebSocket: a caller's traceparent is continued; an invalid one starts a new trace */
    mg_wsc *sender = connect_user(a, tx);
    new_traceparent(tp, tid, sid);
    char frame[512];
    snprintf(frame, sizeof(frame),
             "{\"type\":\"send\",\"to\":\"%s\",\"content\":\"ws\",\"traceparent\":\"%s\"}", near,
             tp);
    cr_assert_eq(mg_wsc_send_text(sender, frame), 0);
    m = recv_message(rx_near);
    cr_assert_str_eq(mg_json_str(m, "trace_id"), tid, "the WebSocket send continued the trace");
    json_decref(m);
    const char *const ws_rows[][2] = {
        {KEY("ws send", "server", "a"), NULL},
        {KEY("route", "internal", "a"), KEY("ws send", "server", "a")},
        {KEY("ws write", "internal", "b"),
         KEY("meshgate.v1.GatewayPeer/DeliverMessage", "server", "b")},
        {NULL, NULL}};
    expect_trace_tagged(tid, sid, ws_rows);

    char bad[64];
    snprintf(bad, sizeof(bad), "00-%s-0000000000000000-01", tid); /* zero parent id: invalid */
    snprintf(frame, sizeof(frame),
             "{\"type\":\"send\",\"to\":\"%s\",\"content\":\"ws\",\"traceparent\":\"%s\"}", near,
             bad);
    cr_assert_eq(mg_wsc_send_text(sender, frame), 0);
    m = recv_message(rx_near);
    const char *got = mg_json_str(m, "trace_id");
    cr_assert(got && strlen(got) == 32, "a new trace was started");
    cr_assert_str_neq(got, tid, "an invalid traceparent is not continued");
    char newtid[33];
    snprintf(newtid, sizeof(newtid), "%s", got);
    json_decref(m);
    const char *const new_rows[][2] = {{KEY("ws send", "server", "a"), NULL}, {NULL, NULL}};
    expect_trace_tagged(newtid, "", new_rows); /* a root: no parent */

    /* SendStream with a traceparent: every message of the stream is in the
     * trace, each route a child of the caller's span */
    new_traceparent(tp, tid, sid);
    grpc_init();
    grpc_metadata md = {.key = grpc_slice_from_static_string("traceparent"),
                        .value = grpc_slice_from_copied_string(tp)};
    size_t len[2];
    uint8_t *rq[2] = {mg_tc_stream_request("s", near, NULL, "one", 1, &len[0]),
                      mg_tc_stream_request("s", near, NULL, "two", 1, &len[1])};
    mg_tc_stream_out out;
    cr_assert_eq(
        mg_tc_stream_md(a->grpc_addr, &md, 1, (const uint8_t *const *)rq, len, 2, 10000, &out),
        GRPC_STATUS_OK);
    cr_assert_eq(out.n, 2);
    mg_tc_stream_out_free(&out);
    grpc_slice_unref(md.value);
    grpc_shutdown();
    free(rq[0]);
    free(rq[1]);
    for (int i = 0; i < 2; i++) { /* both messages reach both devices, in the trace */
        json_decref(recv_traced(rx_near, tid));
        json_decref(recv_traced(rx_near2, tid));
    }
    json_decref(wait_trace(tid, stream_ready, sid, "two routes under the caller, four writes"));

    /* SendBatch: its server span sums up the recipients (worst status:
     * the empty recipient's rejected; one of two delivered) */
    new_traceparent(tp, tid, sid);
    char *batch_to[] = {near, ""};
    cr_assert_eq(send_batch_traced(a, batch_to, 2, tp), GRPC_STATUS_OK);
    json_decref(recv_traced(rx_near, tid));
    json_decref(recv_traced(rx_near2, tid));
    const char *const batch_rows[][2] = {
        {KEY("meshgate.v1.Messaging/SendBatch", "server", "a"), NULL}, {NULL, NULL}};
    expect_trace_tagged(tid, sid, batch_rows);
    tr = jaeger_trace(tid);
    expect_tag(tr, KEY("meshgate.v1.Messaging/SendBatch", "server", "a"), "meshgate.status",
               "rejected");
    expect_tag(tr, KEY("meshgate.v1.Messaging/SendBatch", "server", "a"), "meshgate.recipients",
               "2");
    expect_tag(tr, KEY("meshgate.v1.Messaging/SendBatch", "server", "a"), "meshgate.delivered",
               "1");
    json_decref(tr);

    /* An offline user's message is stored with its context; sent on connect,
     * it gets its ws write (meshgate.inbox) in the trace */
    char off[64];
    snprintf(off, sizeof(off), "%s-off", tag);
    new_traceparent(tp, tid, sid);
    int path;
    cr_assert_eq(send_traced(a, off, tp, 10000, &path), GRPC_STATUS_OK);
    cr_assert_eq(path, MESHGATE__V1__PATH__PATH_INBOX, "stored for the offline user");
    mg_wsc *rx_off = connect_user(b, off);
    m = recv_traced(rx_off, tid);
    cr_assert(json_is_true(json_object_get(m, "inbox")), "sent from the inbox");
    char wid[17];
    snprintf(wid, sizeof(wid), "%.16s", mg_json_str(m, "traceparent") + 36);
    json_decref(m);
    tr = wait_trace(tid, has_span_and_parent, wid, "the inbox page's ws write and its parent");
    json_t *w = span_by_id(tr, wid);
    char key[256], want[256], buf[32];
    span_key(tr, w, key, sizeof(key));
    snprintf(want, sizeof(want), KEY("ws write", "internal", "b"), tag);
    cr_expect_str_eq(key, want);
    cr_expect_str_eq(tag_text(w, "meshgate.inbox", buf, sizeof(buf)), "1");
    span_key(tr, span_by_id(tr, parent_of(w)), key, sizeof(key));
    snprintf(want, sizeof(want), KEY("route", "internal", "a"), tag);
    cr_expect_str_eq(key, want, "a child of the route that stored it, not %s", key);
    json_decref(tr);

    mg_wsc_free(rx_off);
    mg_wsc_free(sender);
    mg_wsc_free(rx_near);
    mg_wsc_free(rx_near2);
    mg_wsc_free(rx_far);
    mg_gw *all[] = {a, b, c};
    stop_all(all, 3);
    mg_gw_free(a);
    mg_gw_free(b);
    mg_gw_free(c);
}

static bool spans_lost(void *arg)
{
    const mg_gw *gw = arg;
    return mg_gw_metric(gw, "meshgate_trace_spans_failed_total ") +
               mg_gw_metric(gw, "meshgate_trace_spans_dropped_total ") >=
           1;
}

Test(tracing, a_dead_collector_does_not_slow_sends, .timeout = 60)
{
    char dead[64];
    snprintf(dead, sizeof(dead), "http://127.0.0.1:%d", mg_test_free_port()); /* nobody listens */
    const char *args[] = {
        "--otlp-endpoint", dead, "--trace-sample-ratio", "1", "--trace-max-spans", "64", NULL};
    mg_gw *gw = mg_gw_spawn("trace-dead", args);
    cr_assert_not_null(gw);
    mg_wsc *rx = connect_user(gw, "dead-rx");
    /* 300 sends, each answered within its normal deadline (2 s here) */
    for (int i = 0; i < 300; i++) {
        int path;
        cr_assert_eq(send_traced(gw, "dead-rx", NULL, 2000, &path), GRPC_STATUS_OK,
                     "send %d was not answered within its deadline", i);
        cr_assert_eq(path, MESHGATE__V1__PATH__PATH_LOCAL);
    }
    for (int i = 0; i < 300; i++) {
        json_t *m = recv_message(rx);
        cr_assert_not_null(mg_json_str(m, "trace_id"));
        json_decref(m);
    }
    cr_assert(mg_wait_until(spans_lost, gw, 10000), "spans counted as failed or dropped");

    /* SendStream without a traceparent: each message is a trace of its own */
    size_t len[2];
    uint8_t *rq[2] = {mg_tc_stream_request("s", "dead-rx", NULL, "one", 1, &len[0]),
                      mg_tc_stream_request("s", "dead-rx", NULL, "two", 1, &len[1])};
    mg_tc_stream_out out;
    cr_assert_eq(mg_tc_stream(gw->grpc_addr, NULL, (const uint8_t *const *)rq, len, 2, 10000, &out),
                 GRPC_STATUS_OK);
    mg_tc_stream_out_free(&out);
    free(rq[0]);
    free(rq[1]);
    json_t *m1 = recv_message(rx), *m2 = recv_message(rx);
    cr_assert(mg_json_str(m1, "trace_id") && mg_json_str(m2, "trace_id"));
    cr_assert_str_neq(mg_json_str(m1, "trace_id"), mg_json_str(m2, "trace_id"));
    json_decref(m1);
    json_decref(m2);
    mg_wsc_free(rx);
    cr_expect_eq(mg_gw_stop(gw), 0);
    mg_gw_free(gw);
}

/* The buses without a gRPC hop: redis-pubsub to a gateway of the region
 * (the context in the payload's envelope) and NATS to another region (a
 * message header): one trace each, parent links across the bus. */
Test(tracing, redis_pubsub_and_nats_carry_the_context, .timeout = 120)
{
    snprintf(tag, sizeof(tag), "tb%d", (int)getpid());
    srand((unsigned)getpid() + 1);
    const char *otlp = mg_test_require_env("MESHGATE_TEST_JAEGER_OTLP");
    char eu[48], us[48];
    snprintf(eu, sizeof(eu), "%seu", tag);
    snprintf(us, sizeof(us), "%sus", tag);
    const char *buses[] = {"--redis-pubsub",
                           "true",
                           "--nats-url",
                           mg_test_require_env("MESHGATE_TEST_NATS"),
                           "--near-route",
                           "redis-pubsub,grpc",
                           "--far-route",
                           "nats,kafka",
                           NULL};
    mg_gw *d = spawn_with("d", eu, otlp, buses), *e = spawn_with("e", eu, otlp, buses),
          *f = spawn_with("f", us, otlp, buses);
    mg_gw *fleet[] = {d, e, f};
    cr_assert(mg_gw_wait_mesh(fleet, 3, 10000), "the three gateways see each other");
    char near[64], far[64];
    snprintf(near, sizeof(near), "%s-near", tag);
    snprintf(far, sizeof(far), "%s-far", tag);
    mg_wsc *rx_near = connect_user(e, near), *rx_far = connect_user(f, far);
    usleep(300000); /* presence written by the connect job */

    char tp[MG_TRACEPARENT_LEN + 1], tid[33], sid[17];
    send_by_path(d, near, rx_near, MESHGATE__V1__PATH__PATH_REDIS_PUBSUB, tp, tid, sid);
    json_t *m = recv_message(rx_near);
    cr_assert_str_eq(mg_json_str(m, "trace_id"), tid);
    json_decref(m);
    const char *const redis_rows[][2] = {
        {KEY("meshgate.v1.Messaging/SendMessage", "server", "d"), NULL},
        {KEY("route", "internal", "d"), KEY("meshgate.v1.Messaging/SendMessage", "server", "d")},
        {KEY("publish", "producer", "d"), KEY("route", "internal", "d")},
        {KEY("process", "consumer", "e"), KEY("publish", "producer", "d")},
        {KEY("ws write", "internal", "e"), KEY("process", "consumer", "e")},
        {NULL, NULL}};
    expect_trace_tagged(tid, sid, redis_rows);
    char dest[96];
    snprintf(dest, sizeof(dest), "meshgate:gw:{%s-e}", tag);
    json_t *tr = jaeger_trace(tid);
    expect_tag(tr, KEY("publish", "producer", "d"), "messaging.destination.name", dest);
    json_decref(tr);

    send_by_path(d, far, rx_far, MESHGATE__V1__PATH__PATH_NATS, tp, tid, sid);
    m = recv_message(rx_far);
    cr_assert_str_eq(mg_json_str(m, "trace_id"), tid);
    json_decref(m);
    const char *const nats_rows[][2] = {
        {KEY("meshgate.v1.Messaging/SendMessage", "server", "d"), NULL},
        {KEY("route", "internal", "d"), KEY("meshgate.v1.Messaging/SendMessage", "server", "d")},
        {KEY("publish", "producer", "d"), KEY("route", "internal", "d")},
        {KEY("process", "consumer", "f"), KEY("publish", "producer", "d")},
        {KEY("route", "internal", "f"), KEY("process", "consumer", "f")},
        {KEY("ws write", "internal", "f"), KEY("route", "internal", "f")},
        {NULL, NULL}};
    expect_trace_tagged(tid, sid, nats_rows);
    snprintf(dest, sizeof(dest), "meshgate.deliver.%s", us);
    tr = jaeger_trace(tid);
    expect_tag(tr, KEY("publish", "producer", "d"), "messaging.destination.name", dest);
    json_decref(tr);

    mg_wsc_free(rx_near);
    mg_wsc_free(rx_far);
    mg_gw *all[] = {d, e, f};
    stop_all(all, 3);
    mg_gw_free(d);
    mg_gw_free(e);
    mg_gw_free(f);
}
