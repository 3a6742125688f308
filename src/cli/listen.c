/* listen.c: `meshgate-cli listen`, a WebSocket client on libwebsockets.
 *
 * Connects to the gateway's /ws as a user (?user=U, accepted on loopback
 * without auth, or a JWT as Authorization: Bearer), prints every text frame
 * from the server as one line on stdout, and acks inbox messages so the
 * gateway removes them. Single-threaded: the lws service loop runs on the
 * calling thread until --count messages arrived, --seconds passed, or the
 * server closed.
 */
#include "cli/cli.h"
#include "common/mg_alloc.h"

#include <getopt.h>
#include <jansson.h>
#include <libwebsockets.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MG_CLI_MAX_FRAME (1 << 20)
#define MG_CLI_MAX_ACKS  1024

struct listen_state {
    const char *token;
    int want;     /* messages to receive before exiting (0: no limit) */
    int received; /* "message" frames */
    bool connected, done, failed;
    char *frame; /* the text frame being assembled */
    size_t frame_len;
    char *acks[MG_CLI_MAX_ACKS]; /* ack frames waiting for WRITEABLE */
    size_t nacks;
};

static void on_text(struct lws *wsi, struct listen_state *st, const char *text, size_t len)
{
    printf("%.*s\n", (int)len, text);
    fflush(stdout);
    json_t *j = json_loadb(text, len, 0, NULL);
    if (!j)
        return;
    const char *type = json_string_value(json_object_get(j, "type"));
    if (type && strcmp(type, "message") == 0) {
        st->received++;
        const char *id = json_string_value(json_object_get(j, "id"));
        if (id && json_is_true(json_object_get(j, "inbox")) && st->nacks < MG_CLI_MAX_ACKS) {
            json_t *ack = json_pack("{s:s, s:s}", "type", "ack", "id", id);
            st->acks[st->nacks++] = json_dumps(ack, JSON_COMPACT);
            json_decref(ack);
            lws_callback_on_writable(wsi);
        }
    }
    json_decref(j);
    if (st->want > 0 && st->received >= st->want && st->nacks == 0)
        st->done = true;
}

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                    size_t len)
{
    struct listen_state *st = lws_context_user(lws_get_context(wsi));
    switch (reason) {
    case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER:
        if (st->token && *st->token) {
            unsigned char **p = (unsigned char **)in, *end = (*p) + len;
            char *val = mg_xasprintf("Bearer %s", st->token);
            int rc = lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_AUTHORIZATION,
                                                  (unsigned char *)val, (int)strlen(val), p, end);
            free(val);
            if (rc)
                return -1;
        }
        break;
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
        st->connected = true;
        fprintf(stderr, "connected\n");
        break;
    case LWS_CALLBACK_CLIENT_RECEIVE:
        if (lws_frame_is_binary(wsi))
            break;
        if (st->frame_len + len > MG_CLI_MAX_FRAME) {
            fprintf(stderr, "error: frame larger than %d bytes\n", MG_CLI_MAX_FRAME);
            st->failed = st->done = true;
            return -1;
        }
        st->frame = mg_xrealloc(st->frame, st->frame_len + len + 1);
        memcpy(st->frame + st->frame_len, in, len);
        st->frame_len += len;
        if (lws_is_final_fragment(wsi)) {
            on_text(wsi, st, st->frame, st->frame_len);
            st->frame_len = 0;
        }
        break;
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        if (st->nacks > 0) {
            char *a = st->acks[0];
            size_t n = strlen(a);
            unsigned char *buf = mg_xmalloc(LWS_PRE + n);
            memcpy(buf + LWS_PRE, a, n);
            int w = lws_write(wsi, buf + LWS_PRE, n, LWS_WRITE_TEXT);
            free(buf);
            free(a);
            memmove(st->acks, st->acks + 1, (st->nacks - 1) * sizeof(char *));
            st->nacks--;
            if (w < (int)n)
                return -1;
            if (st->nacks > 0)
                lws_callback_on_writable(wsi);
            else if (st->want > 0 && st->received >= st->want)
                st->done = true;
        }
        break;
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
        fprintf(stderr, "error: WebSocket connection failed: %s\n",
                in ? (const char *)in : "unknown");
        st->failed = st->done = true;
        break;
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        if (len >= 2) {
            const unsigned char *b = in;
            fprintf(stderr, "closed by the server: %d %.*s\n", (b[0] << 8) | b[1], (int)len - 2,
                    (const char *)in + 2);
        }
        break;
    case LWS_CALLBACK_CLIENT_CLOSED:
        fprintf(stderr, "closed\n");
        st->done = true;
        if (st->want > 0 && st->received < st->want)
            st->failed = true;
        break;
    default:
        break;
    }
    return 0;
}

/* A timer that fires every 200 ms so lws_service returns and the loop can
 * check the clock (lws_service's own timeout is ignored in lws 4). */
static struct lws_context *tick_ctx;
static lws_sorted_usec_list_t tick_sul;

static void tick(lws_sorted_usec_list_t *sul)
{
    lws_sul_schedule(tick_ctx, 0, &tick_sul, tick, 200 * (LWS_USEC_PER_SEC / 1000));
}

static const struct lws_protocols protocols[] = {
    {"meshgate-cli", callback, 0, 0, 0, NULL, 0},
    {NULL, NULL, 0, 0, 0, NULL, 0},
};

int mg_cli_listen(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"user", required_argument, NULL, 'u'},    {"ws", required_argument, NULL, 'w'},
        {"token", required_argument, NULL, 'k'},   {"count", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 's'}, {NULL, 0, NULL, 0}};
    const char *user = NULL, *ws = "ws://127.0.0.1:8080/ws";
    struct listen_state st;
    memset(&st, 0, sizeof(st));
    int seconds = 0, ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "u:w:k:n:s:", longopts, NULL)) != -1) {
        switch (ch) {
        case 'u':
            user = optarg;
            break;
        case 'w':
            ws = optarg;
            break;
        case 'k':
            st.token = optarg;
            break;
        case 'n':
            st.want = atoi(optarg);
            break;
        case 's':
            seconds = atoi(optarg);
            break;
        default:
            return MG_CLI_USAGE;
        }
    }
    if ((!user && !st.token) || optind != argc) {
        fprintf(stderr, "error: listen wants --user U (or --token JWT)\n");
        return MG_CLI_USAGE;
    }

    char *url = mg_xstrdup(ws);
    const char *proto = NULL, *host = NULL, *path = NULL;
    int port = 0;
    if (lws_parse_uri(url, &proto, &host, &port, &path) ||
        (strcmp(proto, "ws") != 0 && strcmp(proto, "wss") != 0)) {
        fprintf(stderr, "error: --ws wants ws://host:port/path, got %s\n", ws);
        free(url);
        return MG_CLI_USAGE;
    }
    bool tls = strcmp(proto, "wss") == 0;
    char *full;
    if (st.token && *st.token)
        full = mg_xasprintf("/%s", path);
    else
        full = mg_xasprintf("/%s%suser=%s", path, strchr(path, '?') ? "&" : "?", user);

    lws_set_log_level(LLL_ERR, NULL);
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof(info));
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.protocols = protocols;
    info.user = &st;
    info.gid = -1;
    info.uid = -1;
    if (tls)
        info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    struct lws_context *ctx = lws_create_context(&info);
    if (!ctx) {
        fprintf(stderr, "error: cannot create the libwebsockets context\n");
        free(full);
        free(url);
        return MG_CLI_RPC;
    }
    struct lws_client_connect_info cc;
    memset(&cc, 0, sizeof(cc));
    cc.context = ctx;
    cc.address = host;
    cc.port = port;
    cc.path = full;
    cc.host = host;
    cc.origin = host;
    cc.ssl_connection = tls ? LCCSCF_USE_SSL : 0;
    cc.protocol = NULL;
    if (!lws_client_connect_via_info(&cc)) {
        fprintf(stderr, "error: cannot connect to %s\n", ws);
        st.failed = st.done = true;
    }
    tick_ctx = ctx;
    tick(&tick_sul);
    time_t end = seconds > 0 ? time(NULL) + seconds : 0;
    while (!st.done && (end == 0 || time(NULL) < end))
        lws_service(ctx, 100);
    lws_context_destroy(ctx);

    int rc = st.failed ? MG_CLI_RPC : MG_CLI_OK;
    if (!st.failed && st.want > 0 && st.received < st.want) {
        fprintf(stderr, "error: %d of %d messages before the time ran out\n", st.received, st.want);
        rc = MG_CLI_RPC;
    }
    for (size_t i = 0; i < st.nacks; i++)
        free(st.acks[i]);
    free(st.frame);
    free(full);
    free(url);
    return rc;
}
