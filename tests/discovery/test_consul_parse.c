/* Unit tests for Consul's JSON answers (consul_parse.c): good, malformed,
 * truncated; the registration body; the blocking-query index rules; the
 * agent address forms of CONSUL_HTTP_ADDR. */
#include "discovery/consul_internal.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* Shape of a real /v1/health/service/meshgate?passing answer (Consul 1.22). */
static const char GOOD[] =
    "[{\"Node\":{\"ID\":\"0d5c\",\"Node\":\"n1\",\"Address\":\"127.0.0.1\",\"Datacenter\":\"dc1\"},"
    "\"Service\":{\"ID\":\"gw1\",\"Service\":\"meshgate\",\"Tags\":[\"a\"],\"Address\":\"10.1.2."
    "3\","
    "\"Meta\":{\"region\":\"eu\",\"ws_port\":\"8080\",\"version\":\"0.1.0\",\"buses\":\"grpc,"
    "redis-pubsub\"},\"Port\":50051,"
    "\"Weights\":{\"Passing\":1,\"Warning\":1}},"
    "\"Checks\":[{\"CheckID\":\"serfHealth\",\"Status\":\"passing\"},"
    "{\"CheckID\":\"service:gw1\",\"Status\":\"passing\"}]},"
    "{\"Node\":{\"Node\":\"n2\",\"Address\":\"10.9.9.9\"},"
    "\"Service\":{\"ID\":\"gw2\",\"Service\":\"meshgate\",\"Address\":\"\",\"Meta\":{\"region\":"
    "\"us\"},\"Port\":50052},\"Checks\":[]},"
    "{\"Node\":{\"Node\":\"n3\",\"Address\":\"::1\"},"
    "\"Service\":{\"ID\":\"gw6\",\"Service\":\"meshgate\",\"Address\":\"fd00::6\",\"Meta\":null,"
    "\"Port\":7}}]";

Test(consul_parse, good_answer)
{
    mg_peer *p;
    size_t n;
    char err[256];
    cr_assert_eq(mg_consul__parse_health(GOOD, strlen(GOOD), &p, &n, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(p[0].id, "gw1");
    cr_assert_str_eq(p[0].address, "10.1.2.3:50051");
    cr_assert_str_eq(p[0].region, "eu");
    cr_assert_str_eq(p[0].version, "0.1.0");
    cr_assert_eq(p[0].ws_port, 8080);
    cr_assert_str_eq(p[0].buses, "grpc,redis-pubsub");
    cr_assert(mg_peer_consumes(&p[0], "redis-pubsub"));
    cr_assert_not(mg_peer_consumes(&p[0], "kafka"));
    cr_assert_not(mg_peer_consumes(&p[0], "redis"), "whole names only");
    cr_assert_str_eq(p[1].buses, "", "an older gateway advertises none");
    cr_assert(mg_peer_consumes(&p[1], "kafka") && mg_peer_consumes(&p[1], "grpc"),
              "and consumes what every gateway did: grpc and kafka");
    cr_assert_not(mg_peer_consumes(&p[1], "redis-pubsub"));
    cr_assert_str_eq(p[1].address, "10.9.9.9:50052", "empty Service.Address: Node.Address");
    cr_assert_str_eq(p[1].region, "us");
    cr_assert_eq(p[1].ws_port, 0);
    cr_assert_str_eq(p[2].address, "[fd00::6]:7", "IPv6 in brackets");
    cr_assert_str_eq(p[2].region, "");
    mg_consul__peers_free(p, n);
}

Test(consul_parse, empty_array)
{
    mg_peer *p;
    size_t n = 9;
    char err[256];
    cr_assert_eq(mg_consul__parse_health("[]", 2, &p, &n, err, sizeof(err)), 0);
    cr_assert_eq(n, 0);
    mg_consul__peers_free(p, n);
}

Test(consul_parse, bad_entries_come_out_with_empty_address)
{
    static const char J[] = "[{\"Service\":{\"ID\":\"a\",\"Address\":\"1.2.3.4\",\"Port\":0}},"
                            "{\"Service\":{\"ID\":\"b\",\"Address\":\"1.2.3.4\",\"Port\":\"80\"}},"
                            "{\"Service\":{\"ID\":\"c\",\"Port\":80}},"
                            "{\"Service\":{\"Address\":\"1.2.3.4\",\"Port\":80}},"
                            "42, null, {\"Service\":[]},"
                            "{\"Service\":{\"ID\":\"ok\",\"Address\":\"1.2.3.4\",\"Port\":80,"
                            "\"Meta\":{\"ws_port\":\"x\",\"region\":5}}}]";
    mg_peer *p;
    size_t n;
    char err[256];
    cr_assert_eq(mg_consul__parse_health(J, strlen(J), &p, &n, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(n, 8);
    for (size_t i = 0; i < 7; i++)
        cr_assert_str_eq(p[i].address, "", "entry %zu", i);
    cr_assert_str_eq(p[3].id, "(no ID)");
    cr_assert_str_eq(p[7].address, "1.2.3.4:80");
    cr_assert_eq(p[7].ws_port, 0);
    cr_assert_str_eq(p[7].region, "");
    mg_consul__peers_free(p, n);
}

static void expect_error(const char *body, size_t len)
{
    mg_peer *p = (mg_peer *)1;
    size_t n = 5;
    char err[256] = "";
    cr_assert_eq(mg_consul__parse_health(body, len, &p, &n, err, sizeof(err)), -EPROTO,
                 "body: %.*s", (int)len, body);
    cr_assert_null(p);
    cr_assert_eq(n, 0);
    cr_assert_neq(err[0], '\0', "a reason is given");
}

Test(consul_parse, malformed_and_truncated)
{
    expect_error("", 0);
    expect_error("not json", 8);
    expect_error("{\"a\":1}", 7); /* not an array */
    expect_error("\"str\"", 5);
    expect_error("[1,2", 4); /* truncated */
    for (size_t cut = 1; cut < strlen(GOOD); cut += 7)
        expect_error(GOOD, cut); /* every truncation of a good answer */
    expect_error("[{\"Service\":{\"ID\":\"a\",\"ID\":\"b\"}}]", 33); /* duplicate keys */
    expect_error(NULL, 0);
}

Test(consul_parse, registration_body)
{
    mg_consul_config cfg = {.service = "meshgate",
                            .tags = " a, b ,,c",
                            .gateway_id = "gw1",
                            .region = "eu",
                            .version = "0.1.0",
                            .buses = "grpc,kafka,redis-pubsub",
                            .advertise_addr = "127.0.0.1",
                            .grpc_port = 50051,
                            .ws_port = 8080,
                            .check_interval_seconds = 1,
                            .deregister_after_seconds = 60};
    char *s = mg_consul__registration_json(&cfg);
    json_t *j = json_loads(s, 0, NULL);
    cr_assert_not_null(j, "%s", s);
    cr_assert_str_eq(json_string_value(json_object_get(j, "ID")), "gw1");
    cr_assert_str_eq(json_string_value(json_object_get(j, "Name")), "meshgate");
    cr_assert_str_eq(json_string_value(json_object_get(j, "Address")), "127.0.0.1");
    cr_assert_eq(json_integer_value(json_object_get(j, "Port")), 50051);
    json_t *tags = json_object_get(j, "Tags");
    cr_assert_eq(json_array_size(tags), 3, "%s", s);
    cr_assert_str_eq(json_string_value(json_array_get(tags, 1)), "b");
    json_t *meta = json_object_get(j, "Meta");
    cr_assert_str_eq(json_string_value(json_object_get(meta, "region")), "eu");
    cr_assert_str_eq(json_string_value(json_object_get(meta, "ws_port")), "8080");
    cr_assert_str_eq(json_string_value(json_object_get(meta, "version")), "0.1.0");
    cr_assert_str_eq(json_string_value(json_object_get(meta, "buses")), "grpc,kafka,redis-pubsub");
    json_t *chk = json_object_get(j, "Check");
    cr_assert_str_eq(json_string_value(json_object_get(chk, "GRPC")), "127.0.0.1:50051");
    cr_assert(json_is_false(json_object_get(chk, "GRPCUseTLS")));
    cr_assert_str_eq(json_string_value(json_object_get(chk, "Interval")), "1s");
    cr_assert_str_eq(json_string_value(json_object_get(chk, "Timeout")), "1s");
    cr_assert_str_eq(json_string_value(json_object_get(chk, "DeregisterCriticalServiceAfter")),
                     "60s");
    json_decref(j);
    free(s);

    cfg.advertise_addr = "fd00::1";
    cfg.tags = "";
    cfg.check_interval_seconds = 30;
    s = mg_consul__registration_json(&cfg);
    j = json_loads(s, 0, NULL);
    chk = json_object_get(j, "Check");
    cr_assert_str_eq(json_string_value(json_object_get(chk, "GRPC")), "[fd00::1]:50051");
    cr_assert_str_eq(json_string_value(json_object_get(chk, "Timeout")), "10s", "capped");
    cr_assert_eq(json_array_size(json_object_get(j, "Tags")), 0);
    json_decref(j);
    free(s);

    /* A TLS gRPC listener: Consul cannot present a client certificate, so the
     * check is the WebSocket listener's /readyz. */
    cfg.grpc_tls = true;
    s = mg_consul__registration_json(&cfg);
    j = json_loads(s, 0, NULL);
    chk = json_object_get(j, "Check");
    cr_assert_null(json_object_get(chk, "GRPC"), "%s", s);
    cr_assert_str_eq(json_string_value(json_object_get(chk, "HTTP")),
                     "http://[fd00::1]:8080/readyz");
    cr_assert_str_eq(json_string_value(json_object_get(chk, "Interval")), "30s");
    json_decref(j);
    free(s);
}

Test(consul_parse, index_rules)
{
    cr_assert_eq(mg_consul__next_index(0, 42), 42, "first read");
    cr_assert_eq(mg_consul__next_index(42, 42), 42, "timeout, no change");
    cr_assert_eq(mg_consul__next_index(42, 50), 50);
    cr_assert_eq(mg_consul__next_index(50, 7), 0, "went backwards: reset");
    cr_assert_eq(mg_consul__next_index(50, 0), 0, "backwards to 0: reset");
    cr_assert_eq(mg_consul__next_index(0, 0), 1, "never block on 0");
    cr_assert_eq(mg_consul__next_index(5, -1), 0, "no index header: read afresh");
}

Test(consul_parse, base_url_forms)
{
    struct {
        const char *in, *out;
    } cases[] = {{"127.0.0.1:8500", "http://127.0.0.1:8500"},
                 {"http://127.0.0.1:8500", "http://127.0.0.1:8500"},
                 {"https://consul.example:8501/", "https://consul.example:8501"},
                 {" localhost:8500 ", "http://localhost:8500"},
                 {"[::1]:8500", "http://[::1]:8500"},
                 {"", NULL},
                 {"http://", NULL},
                 {"unix:///var/run/consul.sock", NULL},
                 {"host:8500/v1", NULL}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *u = mg_consul__base_url(cases[i].in);
        if (cases[i].out)
            cr_assert_str_eq(u, cases[i].out, "in=%s", cases[i].in);
        else
            cr_assert_null(u, "in=%s", cases[i].in);
        free(u);
    }
}
