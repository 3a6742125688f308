/* config.c: parsing the one configuration table (see config.h). */
#include "gateway/config.h"
#include "common/mg_alloc.h"
#include "router/route_policy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

struct option_desc {
    enum mg_config_type type;
    const char *flag, *env, *def, *unit, *help;
    size_t offset;
};

static const struct option_desc options[] = {
#define X(type, field, flag, env, def, unit, help)                                                 \
    {MG_CFG_##type, flag, env, def, unit, help, offsetof(mg_config, field)},
    MG_CONFIG_OPTIONS(X)
#undef X
};
#define NOPTIONS (sizeof(options) / sizeof(options[0]))

static int set_value(mg_config *cfg, const struct option_desc *o, const char *v, const char *from,
                     char *err, size_t errlen)
{
    void *slot = (char *)cfg + o->offset;
    switch (o->type) {
    case MG_CFG_STR:
        free(*(char **)slot);
        *(char **)slot = mg_xstrdup(v);
        return 0;
    case MG_CFG_INT: {
        char *end;
        errno = 0;
        long long n = strtoll(v, &end, 10);
        if (errno || end == v || *end || n < 0) {
            snprintf(err, errlen, "%s: --%s wants a non-negative integer (%s), got '%s'", from,
                     o->flag, o->unit, v);
            return -EINVAL;
        }
        *(int64_t *)slot = n;
        return 0;
    }
    case MG_CFG_RATIO: {
        char *end;
        errno = 0;
        double d = strtod(v, &end);
        if (errno || end == v || *end || !(d >= 0 && d <= 1)) {
            snprintf(err, errlen, "%s: --%s wants a number from 0 to 1, got '%s'", from, o->flag,
                     v);
            return -EINVAL;
        }
        *(double *)slot = d;
        return 0;
    }
    case MG_CFG_BOOL:
        if (!strcasecmp(v, "true") || !strcmp(v, "1") || !strcasecmp(v, "yes"))
            *(bool *)slot = true;
        else if (!strcasecmp(v, "false") || !strcmp(v, "0") || !strcasecmp(v, "no"))
            *(bool *)slot = false;
        else {
            snprintf(err, errlen, "%s: --%s wants true or false, got '%s'", from, o->flag, v);
            return -EINVAL;
        }
        return 0;
    }
    return -EINVAL;
}

void mg_config_print_help(FILE *out, int markdown)
{
    if (markdown) {
        fprintf(out, "| flag | environment | default | unit | meaning |\n|---|---|---|---|---|\n");
        for (size_t i = 0; i < NOPTIONS; i++) {
            const struct option_desc *o = &options[i];
            fprintf(out, "| `--%s` | `%s` | %s%s%s | %s | %s |\n", o->flag, o->env,
                    o->def[0] ? "`" : "", o->def[0] ? o->def : "(empty)", o->def[0] ? "`" : "",
                    o->unit, o->help);
        }
        return;
    }
    fprintf(out, "usage: meshgate [--option value | --option=value]...\n\n"
                 "Real-time messaging gateway. With no options: one gateway on loopback with\n"
                 "in-memory presence and inbox, no external services.\n\n"
                 "Options (environment variable in brackets; flags win over the environment):\n");
    for (size_t i = 0; i < NOPTIONS; i++) {
        const struct option_desc *o = &options[i];
        fprintf(out, "  --%-30s %s\n  %32s[%s] default: %s%s%s\n", o->flag, o->help, "", o->env,
                o->def[0] ? o->def : "(empty)", o->unit[0] ? " " : "", o->unit);
    }
    fprintf(out, "  --%-30s %s\n  --%-30s %s\n  --%-30s %s\n", "help", "this text", "help-markdown",
            "the options as a Markdown table", "version", "print the version");
}

int mg_config_load(mg_config *cfg, int argc, char **argv, FILE *out, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof(*cfg));
    int rc = 0;
    for (size_t i = 0; i < NOPTIONS && rc == 0; i++)
        rc = set_value(cfg, &options[i], options[i].def, "default", err, errlen);
    for (size_t i = 0; i < NOPTIONS && rc == 0; i++) {
        const char *v = getenv(options[i].env);
        if (v)
            rc = set_value(cfg, &options[i], v, options[i].env, err, errlen);
    }
    for (int a = 1; a < argc && rc == 0; a++) {
        const char *arg = argv[a];
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
            mg_config_print_help(out, 0);
            return 1;
        }
        if (!strcmp(arg, "--help-markdown")) {
            mg_config_print_help(out, 1);
            return 1;
        }
        if (!strcmp(arg, "--version")) {
            fprintf(out, "meshgate %s\n", MG_VERSION);
            return 1;
        }
        if (strncmp(arg, "--", 2) != 0) {
            snprintf(err, errlen, "unexpected argument '%s' (see --help)", arg);
            return -EINVAL;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const struct option_desc *o = NULL;
        for (size_t i = 0; i < NOPTIONS; i++)
            if (strlen(options[i].flag) == nlen && !strncmp(options[i].flag, name, nlen))
                o = &options[i];
        if (!o) {
            snprintf(err, errlen, "unknown option '--%.*s' (see --help)", (int)nlen, name);
            return -EINVAL;
        }
        const char *v = eq ? eq + 1 : NULL;
        if (!v) {
            if (a + 1 >= argc) {
                snprintf(err, errlen, "option '--%s' needs a value", o->flag);
                return -EINVAL;
            }
            v = argv[++a];
        }
        rc = set_value(cfg, o, v, "flag", err, errlen);
    }
    if (rc == 0 && cfg->id[0] == '\0') {
        char host[HOST_NAME_MAX + 1] = "meshgate";
        gethostname(host, sizeof(host));
        host[HOST_NAME_MAX] = '\0';
        free(cfg->id);
        cfg->id = mg_xstrdup(host);
    }
    return rc;
}

int mg_parse_hostport(const char *s, char **host, int *port)
{
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s)
        return -EINVAL;
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || p < 0 || p > 65535)
        return -EINVAL;
    const char *h = s;
    size_t hl = (size_t)(colon - s);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']')
        h++, hl -= 2;
    if (host)
        *host = mg_xstrndup(h, hl);
    if (port)
        *port = (int)p;
    return 0;
}

bool mg_host_is_loopback(const char *h)
{
    struct in_addr a4;
    struct in6_addr a6;
    if (strcmp(h, "localhost") == 0)
        return true;
    if (inet_pton(AF_INET, h, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, h, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6);
    return false;
}

int mg_config_validate(const mg_config *cfg, char *err, size_t errlen)
{
#define FAIL(...)                                                                                  \
    do {                                                                                           \
        snprintf(err, errlen, __VA_ARGS__);                                                        \
        return -EINVAL;                                                                            \
    } while (0)
    if (mg_parse_hostport(cfg->ws_listen, NULL, NULL))
        FAIL("--ws-listen: want host:port, got '%s'", cfg->ws_listen);
    if (mg_parse_hostport(cfg->grpc_listen, NULL, NULL))
        FAIL("--grpc-listen: want host:port, got '%s'", cfg->grpc_listen);
    if (strcmp(cfg->presence, "memory") && strcmp(cfg->presence, "redis-cluster") &&
        strcmp(cfg->presence, "redis-sentinel"))
        FAIL("--presence: want memory, redis-cluster or redis-sentinel, got '%s'", cfg->presence);
    if (!strcmp(cfg->presence, "redis-cluster") && !cfg->redis_nodes[0])
        FAIL("--presence redis-cluster needs --redis-nodes");
    if (!strcmp(cfg->presence, "redis-sentinel") && !cfg->sentinel_nodes[0])
        FAIL("--presence redis-sentinel needs --sentinel-nodes");
    if (!strcmp(cfg->presence, "redis-sentinel") && !cfg->sentinel_master[0])
        FAIL("--presence redis-sentinel needs --sentinel-master");
    if (cfg->redis_pubsub && !cfg->redis_nodes[0] && strcmp(cfg->presence, "redis-sentinel") != 0)
        FAIL("--redis-pubsub needs --redis-nodes");
    if (cfg->redis_pubsub_timeout_ms < 1 || cfg->redis_pubsub_max_bytes < 256)
        FAIL("--redis-pubsub-timeout-ms must be >= 1 and --redis-pubsub-max-bytes >= 256");
    if (strcmp(cfg->discovery, "none") && strcmp(cfg->discovery, "consul"))
        FAIL("--discovery: want none or consul, got '%s'", cfg->discovery);
    if (strcmp(cfg->log_level, "debug") && strcmp(cfg->log_level, "info") &&
        strcmp(cfg->log_level, "warn") && strcmp(cfg->log_level, "error"))
        FAIL("--log-level: want debug, info, warn or error, got '%s'", cfg->log_level);
    if (strcmp(cfg->log_format, "text") && strcmp(cfg->log_format, "json"))
        FAIL("--log-format: want text or json, got '%s'", cfg->log_format);
    if (cfg->grpc_threads < 1 || cfg->workers < 1 || cfg->work_queue < 1)
        FAIL("--grpc-threads, --workers and --work-queue must be at least 1");
    if (cfg->outbound_queue < 1 || cfg->outbound_queue_bytes < 1024)
        FAIL("--outbound-queue must be >= 1 and --outbound-queue-bytes >= 1024");
    if (cfg->max_frame_bytes < 256 || cfg->max_content_bytes < 1)
        FAIL("--max-frame-bytes must be >= 256 and --max-content-bytes >= 1");
    if (cfg->max_user_bytes < 1 || cfg->max_user_bytes > 4096)
        FAIL("--max-user-bytes must be within 1..4096");
    if (cfg->inbox_memory_bytes < 1 || cfg->inbox_memory_users < 1)
        FAIL("--inbox-memory-bytes and --inbox-memory-users must be at least 1");
    if (cfg->presence_cache_users < 0)
        FAIL("--presence-cache-users must be >= 0");
    if (cfg->inbox_min_replicas > 64)
        FAIL("--inbox-min-replicas must be within 0..64");
    if (cfg->presence_sync && (!strcmp(cfg->presence, "memory") || !cfg->kafka_brokers[0]))
        FAIL("--presence-sync needs --presence redis-cluster and --kafka-brokers");
    if (cfg->presence_sync && (!cfg->presence_sync_topic[0] || strchr(cfg->region, '|')))
        FAIL("--presence-sync needs a --presence-sync-topic and a --region without '|'");
    if (strlen(cfg->id) > 128 || strpbrk(cfg->id, " \t\n/"))
        FAIL("--id must be at most 128 characters without spaces or '/'");
    if (cfg->ws_max_header_bytes < 1024 || cfg->ws_max_header_bytes > 65535)
        FAIL("--ws-max-header-bytes must be within 1024..65535");
    if (cfg->ws_threads < 0 || cfg->ws_threads > 64)
        FAIL("--ws-threads must be within 0..64 (0: one per CPU this process may use)");
    if (cfg->ws_handshake_timeout_ms < 0 || cfg->ws_max_handshakes < 0 || cfg->fd_reserve < 0 ||
        cfg->ws_send_rate < 0 || cfg->ws_send_burst < 0 || cfg->max_connections_per_ip < 0)
        FAIL("--ws-handshake-timeout-ms, --ws-max-handshakes, --fd-reserve, --ws-send-rate, "
             "--ws-send-burst and --max-connections-per-ip must not be negative");
    if (!!cfg->jwt_secret[0] + !!cfg->jwt_public_key_file[0] + !!cfg->jwks_url[0] > 1)
        FAIL("--jwt-secret, --jwt-public-key-file and --jwks-url are exclusive: pick one key "
             "source");
    mg_route_lists routes;
    if (mg_route_lists_parse(cfg->near_route, cfg->far_route, &routes, err, errlen))
        return -EINVAL;
    if (cfg->jwks_refresh_seconds < 1 || cfg->jwks_min_refetch_seconds < 1)
        FAIL("--jwks-refresh-seconds and --jwks-min-refetch-seconds must be at least 1");
    if (cfg->nats_replicas < 1 || cfg->nats_replicas > 5)
        FAIL("--nats-replicas must be within 1..5 (JetStream's limit)");
    if (cfg->nats_max_age_seconds < 1 || cfg->nats_timeout_ms < 1 || cfg->nats_ack_wait_ms < 1 ||
        cfg->nats_max_deliver < 1 || cfg->nats_max_pending < 1)
        FAIL("--nats-max-age-seconds, --nats-timeout-ms, --nats-ack-wait-ms, --nats-max-deliver "
             "and --nats-max-pending must be at least 1");
    if (cfg->otlp_endpoint[0] && strncmp(cfg->otlp_endpoint, "http://", 7) != 0 &&
        strncmp(cfg->otlp_endpoint, "https://", 8) != 0)
        FAIL("--otlp-endpoint must be an http:// or https:// URL, e.g. http://127.0.0.1:4318");
    if (cfg->trace_max_spans < 1 || cfg->trace_max_spans > 1000000)
        FAIL("--trace-max-spans must be within 1..1000000");
    return 0;
#undef FAIL
}

void mg_config_clear(mg_config *cfg)
{
    for (size_t i = 0; i < NOPTIONS; i++)
        if (options[i].type == MG_CFG_STR) {
            char **slot = (char **)((char *)cfg + options[i].offset);
            free(*slot);
            *slot = NULL;
        }
}

int64_t mg_config_send_deadline_ms(const mg_config *cfg)
{
    int64_t bus =
        cfg->kafka_timeout_ms > cfg->nats_timeout_ms ? cfg->kafka_timeout_ms : cfg->nats_timeout_ms;
    return cfg->peer_deadline_ms + bus + 1000;
}
