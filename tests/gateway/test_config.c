/* Unit tests for the configuration table (gateway/config.c). */
#include "gateway/config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int load(mg_config *cfg, int argc, char **argv, char *err)
{
    FILE *devnull = fopen("/dev/null", "w");
    int rc = mg_config_load(cfg, argc, argv, devnull, err, 256);
    fclose(devnull);
    return rc;
}

Test(config, defaults_are_the_embedded_gateway)
{
    mg_config cfg;
    char err[256];
    char *argv[] = {"meshgate"};
    unsetenv("MESHGATE_PRESENCE");
    cr_assert_eq(load(&cfg, 1, argv, err), 0);
    cr_assert_str_eq(cfg.ws_listen, "127.0.0.1:8080");
    cr_assert_str_eq(cfg.grpc_listen, "127.0.0.1:50051");
    cr_assert_str_eq(cfg.presence, "memory");
    cr_assert_str_eq(cfg.discovery, "none");
    cr_assert_eq(cfg.presence_lease_seconds, 30);
    cr_assert(cfg.id[0], "id defaults to the host name");
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), 0, "%s", err);
    mg_config_clear(&cfg);
}

Test(config, env_then_flags_win)
{
    mg_config cfg;
    char err[256];
    setenv("MESHGATE_REGION", "eu", 1);
    setenv("MESHGATE_WORKERS", "7", 1);
    char *argv[] = {"meshgate", "--region", "us", "--grpc-listen=127.0.0.1:1"};
    cr_assert_eq(load(&cfg, 4, argv, err), 0, "%s", err);
    cr_assert_str_eq(cfg.region, "us");
    cr_assert_eq(cfg.workers, 7);
    cr_assert_str_eq(cfg.grpc_listen, "127.0.0.1:1");
    mg_config_clear(&cfg);
    unsetenv("MESHGATE_REGION");
    unsetenv("MESHGATE_WORKERS");
}

Test(config, consul_reads_consuls_own_variables)
{
    mg_config cfg;
    char err[256];
    setenv("CONSUL_HTTP_ADDR", "http://127.0.0.1:18500", 1);
    setenv("CONSUL_HTTP_TOKEN", "s3cr3t", 1);
    char *argv[] = {"meshgate"};
    cr_assert_eq(load(&cfg, 1, argv, err), 0);
    cr_assert_str_eq(cfg.consul_addr, "http://127.0.0.1:18500");
    cr_assert_str_eq(cfg.consul_token, "s3cr3t");
    mg_config_clear(&cfg);
    unsetenv("CONSUL_HTTP_ADDR");
    unsetenv("CONSUL_HTTP_TOKEN");
}

Test(config, bad_input_is_a_clear_error)
{
    mg_config cfg;
    char err[256];
    char *a1[] = {"meshgate", "--no-such-thing", "1"};
    cr_assert_eq(load(&cfg, 3, a1, err), -EINVAL);
    cr_assert(strstr(err, "unknown option '--no-such-thing'"), "%s", err);
    mg_config_clear(&cfg);
    char *a2[] = {"meshgate", "--workers", "many"};
    cr_assert_eq(load(&cfg, 3, a2, err), -EINVAL);
    cr_assert(strstr(err, "--workers wants a non-negative integer"), "%s", err);
    mg_config_clear(&cfg);
    char *a3[] = {"meshgate", "--region"};
    cr_assert_eq(load(&cfg, 2, a3, err), -EINVAL);
    mg_config_clear(&cfg);
    char *a4[] = {"meshgate", "--presence", "redis-cluster"};
    cr_assert_eq(load(&cfg, 3, a4, err), 0);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "--redis-nodes"), "%s", err);
    mg_config_clear(&cfg);
    char *a5[] = {"meshgate", "--ws-listen", "nonsense"};
    cr_assert_eq(load(&cfg, 3, a5, err), 0);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), -EINVAL);
    mg_config_clear(&cfg);
    char *a6[] = {"meshgate", "--presence", "redis-sentinel"};
    cr_assert_eq(load(&cfg, 3, a6, err), 0);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "needs --sentinel-nodes"), "%s", err);
    mg_config_clear(&cfg);
    char *a7[] = {"meshgate",
                  "--presence",
                  "redis-sentinel",
                  "--sentinel-nodes",
                  "127.0.0.1:1",
                  "--sentinel-master",
                  ""};
    cr_assert_eq(load(&cfg, 7, a7, err), 0);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "needs --sentinel-master"), "%s", err);
    mg_config_clear(&cfg);
    char *a8[] = {"meshgate", "--presence", "redis"};
    cr_assert_eq(load(&cfg, 3, a8, err), 0);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "want memory, redis-cluster or redis-sentinel"), "%s", err);
    mg_config_clear(&cfg);
}

Test(config, help_lists_every_option_with_its_default)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    mg_config_print_help(f, 1);
    fclose(f);
    cr_assert(
        strstr(buf,
               "| `--presence-lease-seconds` | `MESHGATE_PRESENCE_LEASE_SECONDS` | `30` | s |"),
        "%s", buf);
    cr_assert(strstr(buf, "`CONSUL_HTTP_ADDR`"));
    free(buf);
}

Test(config, readme_table_matches_the_binary)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    mg_config_print_help(f, 1);
    fclose(f);
    FILE *r = fopen(MG_SOURCE_DIR "/README.md", "r");
    cr_assert(r, "README.md not found");
    char *readme = NULL;
    size_t rlen = 0;
    FILE *m = open_memstream(&readme, &rlen);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), r)) > 0)
        fwrite(chunk, 1, n, m);
    fclose(m);
    fclose(r);
    cr_assert(strstr(readme, buf),
              "README's options table is stale: run scripts/readme-options.sh");
    free(buf);
    free(readme);
}

Test(config, tracing_options)
{
    mg_config cfg;
    char err[256];
    char *a0[] = {"meshgate"};
    cr_assert_eq(load(&cfg, 1, a0, err), 0);
    cr_assert_str_eq(cfg.otlp_endpoint, "");
    cr_assert_float_eq(cfg.trace_sample_ratio, 0.01, 1e-12);
    mg_config_clear(&cfg);
    char *a1[] = {"meshgate", "--trace-sample-ratio", "0.25", "--otlp-endpoint",
                  "http://127.0.0.1:4318"};
    cr_assert_eq(load(&cfg, 5, a1, err), 0);
    cr_assert_float_eq(cfg.trace_sample_ratio, 0.25, 1e-12);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), 0, "%s", err);
    mg_config_clear(&cfg);
    static char *bad_ratio[] = {"1.5", "-0.1", "half", "0.5x", "nan", ""};
    for (size_t i = 0; i < sizeof(bad_ratio) / sizeof(bad_ratio[0]); i++) {
        char *a[] = {"meshgate", "--trace-sample-ratio", bad_ratio[i]};
        cr_assert_eq(load(&cfg, 3, a, err), -EINVAL, "accepted %s", bad_ratio[i]);
        cr_assert(strstr(err, "--trace-sample-ratio wants a number from 0 to 1"), "%s", err);
        mg_config_clear(&cfg);
    }
    char *a2[] = {"meshgate", "--otlp-endpoint", "127.0.0.1:4318"};
    cr_assert_eq(load(&cfg, 3, a2, err), 0);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "--otlp-endpoint must be an http://"), "%s", err);
    mg_config_clear(&cfg);
    char *a3[] = {"meshgate", "--trace-max-spans", "0"};
    cr_assert_eq(load(&cfg, 3, a3, err), 0);
    cr_assert_eq(mg_config_validate(&cfg, err, sizeof(err)), -EINVAL);
    mg_config_clear(&cfg);
}
