/* The chart's Grafana dashboard and alert rules name only metrics the gateway
 * really exports. Reads helm/meshgate/files/dashboard.json (every panel's
 * query, every template variable) and helm/meshgate/files/alerts.yaml, takes
 * each metric name out of the PromQL, and looks for it in /metrics of a real
 * gateway running with Redis Cluster presence, Kafka and Consul, after a send
 * to a user on a second gateway (so the per-peer families exist) and once its
 * Kafka partitions are assigned (so the consumer lag does).
 *
 * Isolation: a Consul service name, a Kafka topic prefix, a region and user
 * names of our own (pid in each). */
#include "common/mg_time.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"

#include <criterion/criterion.h>
#include <ctype.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_NAMES 256
#define NAME_LEN  96

typedef struct names {
    char v[MAX_NAMES][NAME_LEN];
    char where[MAX_NAMES][NAME_LEN]; /* panel title or "alerts.yaml" */
    int n;
} names;

static void add_name(names *ns, const char *s, size_t len, const char *where)
{
    if (len >= NAME_LEN)
        len = NAME_LEN - 1;
    for (int i = 0; i < ns->n; i++)
        if (strlen(ns->v[i]) == len && !strncmp(ns->v[i], s, len))
            return;
    cr_assert_lt(ns->n, MAX_NAMES, "more than %d metric names", MAX_NAMES);
    memcpy(ns->v[ns->n], s, len);
    ns->v[ns->n][len] = '\0';
    snprintf(ns->where[ns->n], NAME_LEN, "%s", where);
    ns->n++;
}

/* p at an opening bracket; returns just past its match (strings skipped). */
static const char *skip_group(const char *p, char open, char close)
{
    int depth = 0;
    for (; *p; p++) {
        if (*p == '"' || *p == '\'' || *p == '`') {
            char q = *p++;
            while (*p && *p != q) {
                if (*p == '\\' && p[1])
                    p++;
                p++;
            }
            if (!*p)
                return p;
        } else if (*p == open) {
            depth++;
        } else if (*p == close && --depth == 0) {
            return p + 1;
        }
    }
    return p;
}

static bool is_ident(int c)
{
    return isalnum(c) || c == '_' || c == ':';
}

/* Every metric name of a PromQL expression: identifiers that are not a
 * function call, a keyword, a grouping label list, a label matcher, a range
 * or a string. */
static void promql_names(const char *e, names *ns, const char *where)
{
    /* Aggregation operators count as keywords: "sum by (x) (...)" is not a call. */
    static const char *const keywords[] = {
        "and",      "or",     "unless",      "bool",         "offset",     "inf",
        "nan",      "sum",    "min",         "max",          "avg",        "group",
        "stddev",   "stdvar", "count",       "count_values", "bottomk",    "topk",
        "quantile", "limitk", "limit_ratio", "group_left",   "group_right"};
    static const char *const grouping[] = {"by",       "without",    "on",
                                           "ignoring", "group_left", "group_right"};
    const char *p = e;
    while (*p) {
        char c = *p;
        if (c == '"' || c == '\'' || c == '`') {
            char q = *p++;
            while (*p && *p != q)
                p += (*p == '\\' && p[1]) ? 2 : 1;
            if (*p)
                p++;
        } else if (c == '{') {
            p = skip_group(p, '{', '}');
        } else if (c == '[') {
            p = skip_group(p, '[', ']');
        } else if (isdigit((unsigned char)c) || (c == '.' && isdigit((unsigned char)p[1]))) {
            while (isalnum((unsigned char)*p) || *p == '.')
                p++;
        } else if (isalpha((unsigned char)c) || c == '_' || c == ':') {
            const char *s = p;
            while (is_ident((unsigned char)*p))
                p++;
            size_t len = (size_t)(p - s);
            const char *q = p;
            while (*q == ' ' || *q == '\t' || *q == '\n')
                q++;
            bool is_group = false, is_kw = false;
            for (size_t i = 0; i < sizeof(grouping) / sizeof(grouping[0]); i++)
                if (strlen(grouping[i]) == len && !strncmp(s, grouping[i], len))
                    is_group = true;
            for (size_t i = 0; i < sizeof(keywords) / sizeof(keywords[0]); i++)
                if (strlen(keywords[i]) == len && !strncmp(s, keywords[i], len))
                    is_kw = true;
            if (*q == '(' && is_group)
                p = skip_group(q, '(', ')'); /* by (pod, le): labels, not metrics */
            else if (*q != '(' && !is_kw && !is_group)
                add_name(ns, s, len, where); /* not a function call */
        } else {
            p++;
        }
    }
}

/* Every meshgate_* token of a text (template variable queries, the rules file). */
static void meshgate_tokens(const char *text, names *ns, const char *where)
{
    for (const char *p = text; (p = strstr(p, "meshgate_")) != NULL;) {
        const char *s = p;
        p += strlen("meshgate_");
        if (s > text && is_ident((unsigned char)s[-1]))
            continue;
        while (is_ident((unsigned char)*p))
            p++;
        if (p - s > (long)strlen("meshgate_"))
            add_name(ns, s, (size_t)(p - s), where);
    }
}

static void panel_names(json_t *panels, names *ns, int *queries)
{
    size_t i;
    json_t *panel;
    json_array_foreach(panels, i, panel)
    {
        const char *title = json_string_value(json_object_get(panel, "title"));
        panel_names(json_object_get(panel, "panels"), ns, queries); /* rows */
        size_t k;
        json_t *t;
        json_array_foreach(json_object_get(panel, "targets"), k, t)
        {
            const char *expr = json_string_value(json_object_get(t, "expr"));
            cr_assert_not_null(expr, "panel %s: a target without expr", title ? title : "?");
            names mine = {0};
            promql_names(expr, &mine, title ? title : "?");
            cr_expect_gt(mine.n, 0, "panel %s: no metric in %s", title, expr);
            for (int m = 0; m < mine.n; m++)
                add_name(ns, mine.v[m], strlen(mine.v[m]), mine.where[m]);
            (*queries)++;
        }
    }
}

static char *read_file(const char *rel)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", MG_SOURCE_DIR, rel);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* Whether /metrics text has a sample of this exact name. */
static bool exported(const char *metrics, const char *name)
{
    size_t len = strlen(name);
    for (const char *p = metrics; p && *p;) {
        if (!strncmp(p, name, len) && (p[len] == '{' || p[len] == ' '))
            return true;
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return false;
}

static int missing(const char *metrics, const names *ns, char *out, size_t outlen)
{
    int n = 0;
    size_t used = 0;
    out[0] = '\0';
    for (int i = 0; i < ns->n; i++) {
        if (exported(metrics, ns->v[i]))
            continue;
        n++;
        int w = snprintf(out + used, outlen - used, " %s (%s)", ns->v[i], ns->where[i]);
        if (w > 0 && (size_t)w < outlen - used)
            used += (size_t)w;
    }
    return n;
}

Test(dashboard, promql_names_takes_metrics_only)
{
    names ns = {0};
    promql_names("histogram_quantile(0.99, sum by (le, path) (rate(meshgate_route_seconds_bucket"
                 "{namespace=~\"$ns\", pod=~\"a|b\"}[$__rate_interval]))) / on (pod) group_left "
                 "foo_total offset 5m and bool 1e3 > 0.5 unless max without(x)(bar:rate5m)",
                 &ns, "t");
    cr_assert_eq(ns.n, 3, "got %d names: %s %s %s %s", ns.n, ns.v[0], ns.v[1], ns.v[2], ns.v[3]);
    cr_expect_str_eq(ns.v[0], "meshgate_route_seconds_bucket");
    cr_expect_str_eq(ns.v[1], "foo_total");
    cr_expect_str_eq(ns.v[2], "bar:rate5m");
    /* A name the gateway does not export is reported. */
    char miss[256];
    cr_expect_eq(missing("meshgate_route_seconds_bucket{le=\"1\"} 0\n", &ns, miss, sizeof(miss)),
                 2);
    cr_expect(strstr(miss, "foo_total") != NULL);
}

Test(dashboard, every_panel_and_alert_names_an_exported_metric, .timeout = 120)
{
    /* The names, from the chart's files. */
    names ns = {0};
    char *text = read_file("helm/meshgate/files/dashboard.json");
    json_error_t jerr;
    json_t *dash = json_loads(text, 0, &jerr);
    cr_assert_not_null(dash, "dashboard.json: %s (line %d)", jerr.text, jerr.line);
    free(text);
    int queries = 0;
    panel_names(json_object_get(dash, "panels"), &ns, &queries);
    cr_assert_gt(queries, 10, "only %d panel queries", queries);
    size_t i;
    json_t *var;
    json_array_foreach(json_object_get(json_object_get(dash, "templating"), "list"), i, var)
    {
        const char *def = json_string_value(json_object_get(var, "definition"));
        if (def)
            meshgate_tokens(def, &ns, "template variable");
    }
    json_decref(dash);
    text = read_file("helm/meshgate/files/alerts.yaml");
    names in_alerts = {0};
    meshgate_tokens(text, &in_alerts, "alerts.yaml");
    free(text);
    cr_assert_gt(in_alerts.n, 3, "alerts.yaml names %d metrics", in_alerts.n);
    for (int k = 0; k < in_alerts.n; k++)
        add_name(&ns, in_alerts.v[k], strlen(in_alerts.v[k]), "alerts.yaml");

    /* Two gateways of one region: a send from a to a user of b goes gRPC direct. */
    char tag[32], svc[64], topic[64], region[48], ida[64], idb[64], user[64];
    snprintf(tag, sizeof(tag), "db%d", (int)getpid());
    snprintf(svc, sizeof(svc), "meshgate-%s", tag);
    snprintf(topic, sizeof(topic), "meshgate.%s.", tag);
    char sync_topic[80];
    snprintf(sync_topic, sizeof(sync_topic), "meshgate.%s.presence", tag);
    snprintf(region, sizeof(region), "%s-r", tag);
    snprintf(ida, sizeof(ida), "%s-a", tag);
    snprintf(idb, sizeof(idb), "%s-b", tag);
    snprintf(user, sizeof(user), "%s-user", tag);
    const char *args[] = {"--presence-sync", /* the multi-region panels' metrics */
                          "true",
                          "--presence-sync-topic",
                          sync_topic,
                          "--redis-pubsub", /* and the buses' */
                          "true",
                          "--nats-url",
                          mg_test_require_env("MESHGATE_TEST_NATS"),
                          NULL};
    mg_gw *a = mg_gw_spawn_fleet_kafka(ida, svc, region, topic, args);
    cr_assert_not_null(a, "gateway a did not become ready");
    mg_gw *b = mg_gw_spawn_fleet_kafka(idb, svc, region, topic, args);
    cr_assert_not_null(b, "gateway b did not become ready");
    cr_assert(mg_gw_wait_peer(a, idb, 20000), "a never listed b as a peer");
    int http = 0;
    mg_wsc *ws = mg_wsc_connect_user(b->ws_port, user, 5000, &http);
    cr_assert_not_null(ws, "WebSocket to b: HTTP %d", http);
    mg_grpc_client *cli = mg_grpc_client_create(a->grpc_addr, NULL);
    bool via_peer = false;
    for (int k = 0; k < 100 && !via_peer; k++) {
        Meshgate__V1__SendMessageResponse *r = NULL;
        if (mg_tc_send(cli, "dash-probe", user, NULL, "hi", 1, 5000, &r, NULL) == GRPC_STATUS_OK &&
            r && r->result &&
            r->result->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED)
            via_peer = r->result->path == MESHGATE__V1__PATH__PATH_GRPC;
        if (r)
            protobuf_c_message_free_unpacked(&r->base, NULL);
        if (!via_peer)
            usleep(100 * 1000);
    }
    cr_expect(via_peer, "no send from a to b's user went gRPC direct");

    /* Poll a's /metrics (bounded) until every name is there: the consumer lag
     * appears once Kafka assigns a's partitions. */
    char miss[4096];
    int nmiss = -1;
    int64_t end = mg_mono_ms() + 30000;
    do {
        char *body = NULL;
        if (mg_http_get(a->ws_port, "/metrics", &body) == 200 && body)
            nmiss = missing(body, &ns, miss, sizeof(miss));
        free(body);
        if (nmiss != 0)
            usleep(200 * 1000);
    } while (nmiss != 0 && mg_mono_ms() < end);
    cr_expect_eq(nmiss, 0, "%d of %d names not in a gateway's /metrics:%s", nmiss, ns.n, miss);

    mg_grpc_client_free(cli);
    mg_wsc_free(ws);
    cr_expect_eq(mg_gw_stop(b), 0, "gateway b exits cleanly");
    cr_expect_eq(mg_gw_stop(a), 0, "gateway a exits cleanly");
    mg_gw_free(b);
    mg_gw_free(a);
}
