/* consul_parse.c: Consul's JSON answers in, registration JSON out (jansson).
 *
 * Pure functions, no I/O, callable from any thread. A malformed answer is an
 * error for the whole answer (the caller keeps its last table); a malformed
 * entry inside a well-formed answer is passed on with an empty address so
 * that mg_peers_update skips it with a warning and keeps the others.
 */
#include "discovery/consul_internal.h"
#include "common/mg_alloc.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *str_or(json_t *o, const char *key, const char *dflt)
{
    json_t *v = json_is_object(o) ? json_object_get(o, key) : NULL;
    return json_is_string(v) ? json_string_value(v) : dflt;
}

static int meta_port(json_t *meta)
{
    const char *s = str_or(meta, "ws_port", "");
    char *end;
    long v = strtol(s, &end, 10);
    return (*s && !*end && v > 0 && v <= 65535) ? (int)v : 0;
}

int mg_consul__parse_health(const char *body, size_t len, mg_peer **out, size_t *n, char *err,
                            size_t errlen)
{
    *out = NULL;
    *n = 0;
    json_error_t je;
    json_t *root = json_loadb(body ? body : "", body ? len : 0, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        snprintf(err, errlen, "malformed JSON at line %d column %d: %s", je.line, je.column,
                 je.text);
        return -EPROTO;
    }
    if (!json_is_array(root)) {
        snprintf(err, errlen, "expected a JSON array of service entries");
        json_decref(root);
        return -EPROTO;
    }
    size_t cnt = json_array_size(root);
    mg_peer *peers = cnt ? mg_xcalloc(cnt, sizeof(*peers)) : NULL;
    size_t k = 0;
    for (size_t i = 0; i < cnt; i++) {
        json_t *entry = json_array_get(root, i);
        json_t *svc = json_is_object(entry) ? json_object_get(entry, "Service") : NULL;
        json_t *node = json_is_object(entry) ? json_object_get(entry, "Node") : NULL;
        json_t *meta = json_is_object(svc) ? json_object_get(svc, "Meta") : NULL;
        json_t *port = json_is_object(svc) ? json_object_get(svc, "Port") : NULL;
        const char *id = str_or(svc, "ID", "");
        const char *host = str_or(svc, "Address", "");
        if (!host[0])
            host = str_or(node, "Address", "");
        json_int_t p = json_is_integer(port) ? json_integer_value(port) : 0;

        mg_peer *e = &peers[k++];
        e->id = mg_xstrdup(id[0] ? id : "(no ID)");
        if (!id[0] || !host[0] || p <= 0 || p > 65535)
            e->address = mg_xstrdup("");
        else if (strchr(host, ':') && host[0] != '[')
            e->address = mg_xasprintf("[%s]:%d", host, (int)p);
        else
            e->address = mg_xasprintf("%s:%d", host, (int)p);
        e->region = mg_xstrdup(str_or(meta, "region", ""));
        e->version = mg_xstrdup(str_or(meta, "version", ""));
        e->buses = mg_xstrdup(str_or(meta, "buses", ""));
        e->ws_port = meta_port(meta);
        e->channel = NULL;
    }
    json_decref(root);
    *out = peers;
    *n = k;
    return 0;
}

void mg_consul__peers_free(mg_peer *peers, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(peers[i].id);
        free(peers[i].address);
        free(peers[i].region);
        free(peers[i].version);
        free(peers[i].buses);
    }
    free(peers);
}

char *mg_consul__registration_json(const mg_consul_config *cfg)
{
    const char *host = cfg->advertise_addr ? cfg->advertise_addr : "";
    int interval = cfg->check_interval_seconds > 0 ? cfg->check_interval_seconds : 2;
    int timeout = interval < 10 ? interval : 10;
    int dereg = cfg->deregister_after_seconds > 0 ? cfg->deregister_after_seconds : 60;
    char *target = strchr(host, ':') && host[0] != '['
                       ? mg_xasprintf("[%s]:%d", host, cfg->grpc_port)
                       : mg_xasprintf("%s:%d", host, cfg->grpc_port);
    char ws[16], iv[16], to[16], dr[16];
    snprintf(ws, sizeof(ws), "%d", cfg->ws_port);
    snprintf(iv, sizeof(iv), "%ds", interval);
    snprintf(to, sizeof(to), "%ds", timeout);
    snprintf(dr, sizeof(dr), "%ds", dereg);

    json_t *tags = json_array();
    const char *t = cfg->tags ? cfg->tags : "";
    while (*t) {
        const char *comma = strchr(t, ',');
        size_t len = comma ? (size_t)(comma - t) : strlen(t);
        while (len && (*t == ' ')) {
            t++;
            len--;
        }
        while (len && t[len - 1] == ' ')
            len--;
        if (len)
            json_array_append_new(tags, json_stringn(t, len));
        t = comma ? comma + 1 : t + strlen(t);
    }
    char *check_name =
        mg_xasprintf("%s %s", cfg->service, cfg->grpc_tls ? "readiness" : "gRPC health");
    json_t *check = json_pack("{s:s, s:s, s:s, s:s}", "Name", check_name, "Interval", iv, "Timeout",
                              to, "DeregisterCriticalServiceAfter", dr);
    if (cfg->grpc_tls) {
        /* target is host:grpc_port with IPv6 brackets; the check wants the ws port */
        char *url = mg_xasprintf("http://%.*s:%d/readyz", (int)(strrchr(target, ':') - target),
                                 target, cfg->ws_port);
        json_object_set_new(check, "HTTP", json_string(url));
        free(url);
    } else {
        json_object_set_new(check, "GRPC", json_string(target));
        json_object_set_new(check, "GRPCUseTLS", json_false());
    }
    json_t *root = json_pack(
        "{s:s, s:s, s:s, s:i, s:o, s:{s:s, s:s, s:s, s:s}, s:o}", "ID", cfg->gateway_id, "Name",
        cfg->service, "Address", host, "Port", cfg->grpc_port, "Tags", tags, "Meta", "region",
        cfg->region ? cfg->region : "", "ws_port", ws, "version", cfg->version ? cfg->version : "",
        "buses", cfg->buses ? cfg->buses : "grpc", "Check", check);
    free(check_name);
    free(target);
    if (!root)
        abort(); /* only on OOM or a NULL string in cfg, a programming error */
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!s)
        abort();
    return s;
}

int64_t mg_consul__next_index(int64_t prev, int64_t got)
{
    if (got < 0)
        return 0; /* no index header: read afresh */
    if (prev > 0 && got < prev)
        return 0; /* went backwards (agent restarted, snapshot restored): reset */
    if (got == 0)
        return 1; /* never block on index 0: it would return at once, forever */
    return got;
}
