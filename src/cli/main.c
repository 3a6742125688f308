/* main.c: meshgate-cli, a command-line client of a meshgate gateway.
 *
 * Calls the gRPC API (Messaging, Health) with the blocking client of
 * common/mg_grpc.h, reads /peers over HTTP (libcurl), and listens on the
 * WebSocket front end (listen.c). Single-threaded; every call is bounded by
 * --timeout. Exit codes: 0 ok, 1 RPC error (or health not SERVING), 2 usage.
 */
#include "cli/cli.h"
#include "common/mg_alloc.h"
#include "common/mg_grpc.h"
#include "router/msg.h"

#include "grpc/health/v1/health.pb-c.h"
#include "meshgate/v1/messaging.pb-c.h"

#include <curl/curl.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *addr = "127.0.0.1:50051";
static int timeout_ms = 5000;

static void usage(FILE *out)
{
    fprintf(out, "usage: meshgate-cli [--addr HOST:PORT] [--timeout MS] COMMAND ...\n"
                 "\n"
                 "commands:\n"
                 "  send --from A --to B [--priority high|low] [--id X] [--content-type T] TEXT\n"
                 "  batch --from A --to B,C,D [--priority high|low] [--id X] TEXT\n"
                 "  presence USER...\n"
                 "  disconnect USER [--conn ID] [--code N] [--reason TEXT]\n"
                 "  health [--service NAME]          exit 0 only when SERVING\n"
                 "  peers [--http HOST:PORT]         GET /peers of the gateway (default "
                 "127.0.0.1:8080)\n"
                 "  listen --user U [--ws URL] [--token JWT] [--count N] [--seconds S]\n"
                 "                                   print each WebSocket message as a line\n"
                 "\n"
                 "--addr defaults to 127.0.0.1:50051 (env MESHGATE_ADDR), --timeout to 5000 ms.\n"
                 "exit codes: 0 ok, 1 RPC error, 2 usage\n");
}

/* Prints a failed call; returns MG_CLI_RPC. */
static int rpc_failed(grpc_status_code st, char *details)
{
    fprintf(stderr, "error: %s: %s\n", mg_grpc_code_name(st), details ? details : "");
    free(details);
    return MG_CLI_RPC;
}

static const char *status_name(int s)
{
    static const char *const names[] = {"unspecified", "delivered", "queued",  "stored",
                                        "rejected",    "failed",    "accepted"};
    return s >= 0 && s <= 6 ? names[s] : "unknown";
}

static const char *path_name(int p)
{
    return mg_path_name((mg_path)p); /* the proto's Path values are mg_path's */
}

static void print_result(const Meshgate__V1__RecipientResult *r)
{
    printf("%s: %s", r->user, status_name(r->status));
    if (r->path)
        printf(" via %s", path_name(r->path));
    if (r->connections)
        printf(" (%u connection%s)", r->connections, r->connections == 1 ? "" : "s");
    if (r->reason && *r->reason)
        printf(": %s", r->reason);
    printf("\n");
}

static bool failed_status(int s)
{
    return s == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_REJECTED ||
           s == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_FAILED;
}

/* Options of send and batch. */
struct send_opts {
    const char *from, *to, *id, *content_type;
    int priority;
    const char *text;
};

static int parse_send(int argc, char **argv, struct send_opts *o)
{
    static const struct option longopts[] = {
        {"from", required_argument, NULL, 'f'},         {"to", required_argument, NULL, 't'},
        {"priority", required_argument, NULL, 'p'},     {"id", required_argument, NULL, 'i'},
        {"content-type", required_argument, NULL, 'c'}, {NULL, 0, NULL, 0}};
    memset(o, 0, sizeof(*o));
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "f:t:p:i:c:", longopts, NULL)) != -1) {
        switch (ch) {
        case 'f':
            o->from = optarg;
            break;
        case 't':
            o->to = optarg;
            break;
        case 'i':
            o->id = optarg;
            break;
        case 'c':
            o->content_type = optarg;
            break;
        case 'p':
            if (strcmp(optarg, "high") == 0)
                o->priority = MESHGATE__V1__PRIORITY__PRIORITY_HIGH;
            else if (strcmp(optarg, "low") == 0)
                o->priority = MESHGATE__V1__PRIORITY__PRIORITY_LOW;
            else {
                fprintf(stderr, "error: --priority wants high or low\n");
                return -1;
            }
            break;
        default:
            return -1;
        }
    }
    if (!o->to || optind != argc - 1) {
        fprintf(stderr, "error: want --to and exactly one TEXT\n");
        return -1;
    }
    o->text = argv[optind];
    return 0;
}

static void fill_message(Meshgate__V1__Message *m, const struct send_opts *o)
{
    m->id = (char *)(o->id ? o->id : "");
    m->from = (char *)(o->from ? o->from : "");
    m->content.data = (uint8_t *)o->text;
    m->content.len = strlen(o->text);
    m->content_type = (char *)(o->content_type ? o->content_type : "text/plain");
    m->priority = (Meshgate__V1__Priority)o->priority;
}

static int cmd_send(mg_grpc_client *c, int argc, char **argv)
{
    struct send_opts o;
    if (parse_send(argc, argv, &o) != 0)
        return MG_CLI_USAGE;
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    fill_message(&m, &o);
    m.to = (char *)o.to;
    Meshgate__V1__SendMessageRequest rq = MESHGATE__V1__SEND_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    ProtobufCMessage *out = NULL;
    char *details = NULL;
    grpc_status_code st =
        mg_grpc_call(c, "/meshgate.v1.Messaging/SendMessage", &rq.base,
                     &meshgate__v1__send_message_response__descriptor, timeout_ms, &out, &details);
    if (st != GRPC_STATUS_OK)
        return rpc_failed(st, details);
    free(details);
    Meshgate__V1__SendMessageResponse *r = (Meshgate__V1__SendMessageResponse *)out;
    printf("id %s\n", r->id);
    int rc = MG_CLI_OK;
    if (r->result) {
        print_result(r->result);
        if (failed_status(r->result->status))
            rc = MG_CLI_RPC;
    }
    protobuf_c_message_free_unpacked(out, NULL);
    return rc;
}

static int cmd_batch(mg_grpc_client *c, int argc, char **argv)
{
    struct send_opts o;
    if (parse_send(argc, argv, &o) != 0)
        return MG_CLI_USAGE;
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    fill_message(&m, &o);
    char *list = mg_xstrdup(o.to);
    size_t n = 0, cap = 8;
    char **to = mg_xcalloc(cap, sizeof(char *));
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (n == cap)
            to = mg_xrealloc(to, (cap *= 2) * sizeof(char *));
        to[n++] = tok;
    }
    Meshgate__V1__SendBatchRequest rq = MESHGATE__V1__SEND_BATCH_REQUEST__INIT;
    rq.message = &m;
    rq.n_to = n;
    rq.to = to;
    ProtobufCMessage *out = NULL;
    char *details = NULL;
    grpc_status_code st =
        mg_grpc_call(c, "/meshgate.v1.Messaging/SendBatch", &rq.base,
                     &meshgate__v1__send_batch_response__descriptor, timeout_ms, &out, &details);
    free(to);
    free(list);
    if (st != GRPC_STATUS_OK)
        return rpc_failed(st, details);
    free(details);
    Meshgate__V1__SendBatchResponse *r = (Meshgate__V1__SendBatchResponse *)out;
    printf("id %s\n", r->id);
    int rc = MG_CLI_OK;
    for (size_t i = 0; i < r->n_results; i++) {
        print_result(r->results[i]);
        if (failed_status(r->results[i]->status))
            rc = MG_CLI_RPC;
    }
    protobuf_c_message_free_unpacked(out, NULL);
    return rc;
}

static int cmd_presence(mg_grpc_client *c, int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "error: presence wants at least one USER\n");
        return MG_CLI_USAGE;
    }
    Meshgate__V1__GetPresenceRequest rq = MESHGATE__V1__GET_PRESENCE_REQUEST__INIT;
    rq.n_users = (size_t)argc - 1;
    rq.users = argv + 1;
    ProtobufCMessage *out = NULL;
    char *details = NULL;
    grpc_status_code st =
        mg_grpc_call(c, "/meshgate.v1.Messaging/GetPresence", &rq.base,
                     &meshgate__v1__get_presence_response__descriptor, timeout_ms, &out, &details);
    if (st != GRPC_STATUS_OK)
        return rpc_failed(st, details);
    free(details);
    Meshgate__V1__GetPresenceResponse *r = (Meshgate__V1__GetPresenceResponse *)out;
    for (size_t i = 0; i < r->n_users; i++) {
        const Meshgate__V1__UserPresence *u = r->users[i];
        printf("%s: %s", u->user, u->online ? "online" : "offline");
        if (u->online)
            printf(", %zu connection%s", u->n_connections, u->n_connections == 1 ? "" : "s");
        printf("\n");
        for (size_t j = 0; j < u->n_connections; j++) {
            const Meshgate__V1__Connection *cn = u->connections[j];
            printf("  conn %s on gateway %s (region %s) since %lld ms\n", cn->conn_id,
                   cn->gateway_id, cn->region, (long long)cn->connected_at_ms);
        }
    }
    protobuf_c_message_free_unpacked(out, NULL);
    return MG_CLI_OK;
}

static int cmd_disconnect(mg_grpc_client *c, int argc, char **argv)
{
    static const struct option longopts[] = {{"conn", required_argument, NULL, 'c'},
                                             {"code", required_argument, NULL, 'k'},
                                             {"reason", required_argument, NULL, 'r'},
                                             {NULL, 0, NULL, 0}};
    Meshgate__V1__DisconnectRequest rq = MESHGATE__V1__DISCONNECT_REQUEST__INIT;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "c:k:r:", longopts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            rq.conn_id = optarg;
            break;
        case 'k':
            rq.code = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'r':
            rq.reason = optarg;
            break;
        default:
            return MG_CLI_USAGE;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "error: disconnect wants exactly one USER\n");
        return MG_CLI_USAGE;
    }
    rq.user = argv[optind];
    ProtobufCMessage *out = NULL;
    char *details = NULL;
    grpc_status_code st =
        mg_grpc_call(c, "/meshgate.v1.Messaging/Disconnect", &rq.base,
                     &meshgate__v1__disconnect_response__descriptor, timeout_ms, &out, &details);
    if (st != GRPC_STATUS_OK)
        return rpc_failed(st, details);
    free(details);
    printf("disconnected %u connection(s) of %s\n",
           ((Meshgate__V1__DisconnectResponse *)out)->disconnected, rq.user);
    protobuf_c_message_free_unpacked(out, NULL);
    return MG_CLI_OK;
}

static int cmd_health(mg_grpc_client *c, int argc, char **argv)
{
    static const struct option longopts[] = {{"service", required_argument, NULL, 's'},
                                             {NULL, 0, NULL, 0}};
    Grpc__Health__V1__HealthCheckRequest rq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "s:", longopts, NULL)) != -1) {
        if (ch != 's')
            return MG_CLI_USAGE;
        rq.service = optarg;
    }
    if (optind != argc) {
        fprintf(stderr, "error: health takes no arguments\n");
        return MG_CLI_USAGE;
    }
    ProtobufCMessage *out = NULL;
    char *details = NULL;
    grpc_status_code st = mg_grpc_call(c, "/grpc.health.v1.Health/Check", &rq.base,
                                       &grpc__health__v1__health_check_response__descriptor,
                                       timeout_ms, &out, &details);
    if (st != GRPC_STATUS_OK)
        return rpc_failed(st, details);
    free(details);
    int s = ((Grpc__Health__V1__HealthCheckResponse *)out)->status;
    protobuf_c_message_free_unpacked(out, NULL);
    static const char *const names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    printf("%s\n", s >= 0 && s <= 3 ? names[s] : "UNKNOWN");
    return s == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? MG_CLI_OK
                                                                                 : MG_CLI_RPC;
}

static size_t write_stdout(char *ptr, size_t size, size_t nmemb, void *arg)
{
    return fwrite(ptr, size, nmemb, stdout);
}

static int cmd_peers(int argc, char **argv)
{
    static const struct option longopts[] = {{"http", required_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    const char *http = "127.0.0.1:8080";
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h:", longopts, NULL)) != -1) {
        if (ch != 'h')
            return MG_CLI_USAGE;
        http = optarg;
    }
    if (optind != argc)
        return MG_CLI_USAGE;
    char *url = strstr(http, "://") ? mg_xasprintf("%s/peers", http)
                                    : mg_xasprintf("http://%s/peers", http);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURL *cu = curl_easy_init();
    curl_easy_setopt(cu, CURLOPT_URL, url);
    curl_easy_setopt(cu, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(cu, CURLOPT_WRITEFUNCTION, write_stdout);
    CURLcode cc = curl_easy_perform(cu);
    long code = 0;
    curl_easy_getinfo(cu, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(cu);
    curl_global_cleanup();
    int rc = MG_CLI_OK;
    if (cc != CURLE_OK) {
        fprintf(stderr, "error: GET %s: %s\n", url, curl_easy_strerror(cc));
        rc = MG_CLI_RPC;
    } else if (code != 200) {
        fprintf(stderr, "\nerror: GET %s: HTTP %ld\n", url, code);
        rc = MG_CLI_RPC;
    } else {
        printf("\n");
    }
    free(url);
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"addr", required_argument, NULL, 'a'},
                                             {"timeout", required_argument, NULL, 't'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    if (getenv("MESHGATE_ADDR") && *getenv("MESHGATE_ADDR"))
        addr = getenv("MESHGATE_ADDR");
    int ch;
    /* "+": stop at the command, whose options are its own. */
    while ((ch = getopt_long(argc, argv, "+a:t:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'a':
            addr = optarg;
            break;
        case 't':
            timeout_ms = atoi(optarg);
            if (timeout_ms <= 0) {
                fprintf(stderr, "error: --timeout wants milliseconds > 0\n");
                return MG_CLI_USAGE;
            }
            break;
        case 'h':
            usage(stdout);
            return MG_CLI_OK;
        default:
            usage(stderr);
            return MG_CLI_USAGE;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return MG_CLI_USAGE;
    }
    const char *cmd = argv[optind];
    int cargc = argc - optind;
    char **cargv = argv + optind;
    /* --addr and --timeout may also follow the command
     * (`meshgate-cli health --addr host:port`, as the Helm test pod runs it). */
    int kept = 1;
    for (int i = 1; i < cargc; i++) {
        const char *a = cargv[i];
        const char **dst = !strncmp(a, "--addr", 6) ? &addr : NULL;
        bool is_timeout = !strncmp(a, "--timeout", 9);
        if ((dst && (a[6] == '=' || a[6] == '\0')) ||
            (is_timeout && (a[9] == '=' || a[9] == '\0'))) {
            const char *v =
                strchr(a, '=') ? strchr(a, '=') + 1 : (i + 1 < cargc ? cargv[++i] : NULL);
            if (!v) {
                fprintf(stderr, "error: %s needs a value\n", a);
                return MG_CLI_USAGE;
            }
            if (dst) {
                *dst = v;
            } else if ((timeout_ms = atoi(v)) <= 0) {
                fprintf(stderr, "error: --timeout wants milliseconds > 0\n");
                return MG_CLI_USAGE;
            }
            continue;
        }
        cargv[kept++] = cargv[i];
    }
    cargc = kept;
    cargv[cargc] = NULL;
    if (strcmp(cmd, "peers") == 0)
        return cmd_peers(cargc, cargv);
    if (strcmp(cmd, "listen") == 0)
        return mg_cli_listen(cargc, cargv);

    int (*fn)(mg_grpc_client *, int, char **) = NULL;
    if (strcmp(cmd, "send") == 0)
        fn = cmd_send;
    else if (strcmp(cmd, "batch") == 0)
        fn = cmd_batch;
    else if (strcmp(cmd, "presence") == 0)
        fn = cmd_presence;
    else if (strcmp(cmd, "disconnect") == 0)
        fn = cmd_disconnect;
    else if (strcmp(cmd, "health") == 0)
        fn = cmd_health;
    if (!fn) {
        fprintf(stderr, "error: unknown command %s\n", cmd);
        usage(stderr);
        return MG_CLI_USAGE;
    }
    mg_grpc_client *c = mg_grpc_client_create(addr, NULL);
    int rc = fn(c, cargc, cargv);
    mg_grpc_client_free(c);
    return rc;
}
