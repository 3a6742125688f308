/* main.c: the meshgate process: configuration, wiring, signals, lifecycle.
 *
 * Threads: main (this file: start-up, presence lease renewal, signals,
 * shutdown), "ws" (WebSocket service), "grpc-<i>" (gRPC completion queues),
 * "worker-<i>" (router jobs), plus the discovery watcher and Kafka threads
 * when configured. SIGTERM/SIGINT are blocked in every thread and taken here
 * with sigtimedwait, so no handler runs in an arbitrary thread.
 *
 * Shutdown (SIGTERM) follows DESIGN.md: readiness and gRPC health go
 * NOT_SERVING, deregister from Consul, close clients with 1012 spread over
 * the drain window, stop gRPC, flush Kafka, remove presence, free, exit 0.
 */
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_pool.h"
#include "common/mg_time.h"
#include "gateway/config.h"
#include "gateway/gateway.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    mg_config cfg;
    char err[512] = "";
    int rc = mg_config_load(&cfg, argc, argv, stdout, err, sizeof(err));
    if (rc == 1) {
        mg_config_clear(&cfg);
        return 0;
    }
    if (rc == 0)
        rc = mg_config_validate(&cfg, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "meshgate: %s\n", err);
        mg_config_clear(&cfg);
        return 2;
    }
    mg_log_configure(cfg.log_level, cfg.log_format);

    /* Before any thread starts, so every thread inherits the mask. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    mg_gateway *gw = NULL;
    rc = mg_gateway_start(&cfg, &gw, err, sizeof(err));
    if (rc != 0) {
        mg_log_error("main", "cannot start: %s", err);
        mg_config_clear(&cfg);
        mg_metrics_shutdown();
        return 1;
    }

    int64_t tick_ms = mg_gateway_tick_interval_ms(gw);
    int sig = 0;
    while (sig != SIGTERM && sig != SIGINT) {
        struct timespec ts = {tick_ms / 1000, (tick_ms % 1000) * 1000000};
        sig = sigtimedwait(&sigs, NULL, &ts);
        if (sig < 0 && errno == EAGAIN)
            mg_gateway_tick(gw);
    }
    mg_log_info("main", "signal=%s: draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    mg_gateway_stop(gw);
    mg_gateway_free(gw);
    mg_config_clear(&cfg);
    mg_metrics_shutdown();
    return 0;
}
