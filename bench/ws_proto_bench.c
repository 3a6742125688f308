/* ws_proto_bench.c: nanoseconds per frame of the WebSocket JSON protocol's
 * encoders and parser (gateway/ws_proto.c), one thread, no I/O: the CPU the
 * gateway spends per message on JSON, apart from the network.
 *
 * Usage: ws_proto_bench [iterations=200000] [rounds=5]
 * Prints one line per case: "<case> <frame bytes> B <ns> ns/frame", the best
 * of the rounds (the machine is shared; the best round is the least disturbed).
 */
#include "common/mg_alloc.h"
#include "gateway/ws_proto.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long iters;
static int rounds;

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Runs fn iters times per round and prints the best round's ns per call. */
static void run(const char *name, size_t bytes, void (*fn)(void *), void *arg)
{
    double best = 0;
    for (int r = 0; r < rounds; r++) {
        double t0 = now_ns();
        for (long i = 0; i < iters; i++)
            fn(arg);
        double ns = (now_ns() - t0) / (double)iters;
        if (r == 0 || ns < best)
            best = ns;
    }
    printf("%-28s %6zu B %9.1f ns/frame\n", name, bytes, best);
}

static void enc_message(void *arg)
{
    free(mg_ws_proto_encode_message(arg, false, NULL));
}

/* What the hub would do: render into a frame buffer it owns, after headroom. */
static void render_message(void *arg)
{
    const mg_msg *m = arg;
    size_t n = mg_ws_proto_message_len(m, false);
    char *buf = mg_xmalloc(16 + n);
    mg_ws_proto_render_message(buf + 16, m, false);
    free(buf);
}

static void enc_ack(void *arg)
{
    free(mg_ws_proto_encode_ack(arg, MG_STATUS_DELIVERED, MG_PATH_LOCAL, NULL, NULL));
}

static void enc_error(void *arg)
{
    free(mg_ws_proto_encode_error(MG_WS_ERR_BAD_FIELD, "to must be a string", arg, NULL));
}

static const mg_ws_limits lim = {.max_content_bytes = 65536, .max_user_bytes = 128};

static void parse_frame(void *arg)
{
    const char *s = arg, *code;
    char reason[160];
    mg_ws_in in;
    if (mg_ws_proto_parse(s, strlen(s), &lim, &in, &code, reason, sizeof(reason)) != 0)
        abort();
    mg_ws_in_clear(&in);
}

int main(int argc, char **argv)
{
    iters = argc > 1 ? atol(argv[1]) : 200000;
    rounds = argc > 2 ? atoi(argv[2]) : 5;
    const char *id = "0192f3a0-7c1e-7a55-8d2e-3b9c4f1a2b3c";
    const char *short_text = "mgb 1234567890123 hello, how are you?";
    char *long_text = mg_xmalloc(1025);
    for (int i = 0; i < 1024; i++)
        long_text[i] = "abcdefghijklmnopqrstuvwxyz ,.\"\n"[i % 31];
    long_text[1024] = 0;
    const char *utf8_text =
        "caf\xc3\xa9 \xf0\x9f\x98\x80 \xe2\x82\xac 100 \xe6\x97\xa5\xe6\x9c\xac";

    mg_msg *ms = mg_msg_new(id, "alice", "bob", (const uint8_t *)short_text, strlen(short_text),
                            "text/plain", 1732600000123, MG_PRIO_HIGH);
    mg_msg *ml = mg_msg_new(id, "alice", "bob", (const uint8_t *)long_text, 1024, NULL,
                            1732600000123, MG_PRIO_HIGH);
    mg_msg *mu = mg_msg_new(id, "alice", "bob", (const uint8_t *)utf8_text, strlen(utf8_text), NULL,
                            1732600000123, MG_PRIO_HIGH);
    size_t n;
    char *t;
#define ENC(name, m)                                                                               \
    t = mg_ws_proto_encode_message(m, false, &n);                                                  \
    free(t);                                                                                       \
    run(name, n, enc_message, m)
    ENC("encode message short", ms);
    ENC("encode message 1k escapes", ml);
    ENC("encode message utf8", mu);
    run("render message short", mg_ws_proto_message_len(ms, false), render_message, ms);
    t = mg_ws_proto_encode_ack(id, MG_STATUS_DELIVERED, MG_PATH_LOCAL, NULL, &n);
    free(t);
    run("encode ack", n, enc_ack, (void *)id);
    t = mg_ws_proto_encode_error(MG_WS_ERR_BAD_FIELD, "to must be a string", id, &n);
    free(t);
    run("encode error", n, enc_error, (void *)id);

    char *send_short = mg_xmalloc(256), *send_long = mg_xmalloc(4096), *send_utf8 = mg_xmalloc(256);
    snprintf(send_short, 256, "{\"type\":\"send\",\"id\":\"%s\",\"to\":\"bob\",\"content\":\"%s\"}",
             id, short_text);
    /* the 1k content as a client would escape it */
    char *p = send_long + sprintf(send_long, "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"");
    for (int i = 0; i < 1024; i++) {
        if (long_text[i] == '"')
            p += sprintf(p, "\\\"");
        else if (long_text[i] == '\n')
            p += sprintf(p, "\\n");
        else
            *p++ = long_text[i];
    }
    strcpy(p, "\",\"priority\":\"low\"}");
    snprintf(send_utf8, 256,
             "{\"type\":\"send\",\"to\":\"bob\",\"content\":\"%s \\u00e9\\ud83d\\ude00\"}",
             utf8_text);
    run("parse send short", strlen(send_short), parse_frame, send_short);
    run("parse send 1k escapes", strlen(send_long), parse_frame, send_long);
    run("parse send utf8", strlen(send_utf8), parse_frame, send_utf8);
    const char *ack = "{\"type\":\"ack\",\"id\":\"0192f3a0-7c1e-7a55-8d2e-3b9c4f1a2b3c\"}";
    run("parse ack", strlen(ack), parse_frame, (void *)ack);

    mg_msg_free(ms);
    mg_msg_free(ml);
    mg_msg_free(mu);
    free(long_text);
    free(send_short);
    free(send_long);
    free(send_utf8);
    return 0;
}
