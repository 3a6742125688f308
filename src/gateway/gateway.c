/* gateway.c: wiring one gateway together and taking it apart (see
 * gateway.h). Runs on the main thread. The order of start and stop is the
 * contract between modules: what a module calls must exist before it starts
 * and outlive it.
 */
#include "gateway/gateway.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_pool.h"
#include "common/mg_time.h"
#include "gateway/grpc_server.h"
#include "gateway/ws_server.h"
#include "router/router.h"

#include <arpa/inet.h>
#include <errno.h>
#include <grpc/grpc.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mg_gateway {
    const mg_config *cfg;
    mg_pool *pool;
    mg_ws_server *ws;
    mg_router *router;
    mg_grpc_server *grpc;
    bool stopped;
};

static int make_stores(const mg_config *cfg, mg_presence **presence, mg_inbox **inbox, char *err,
                       size_t errlen)
{
    if (!strcmp(cfg->presence, "memory")) {
        *presence = mg_presence_memory_create(cfg->id, cfg->region);
        *inbox = mg_inbox_memory_create((size_t)cfg->inbox_max_messages,
                                        cfg->inbox_max_age_seconds);
        mg_log_info("gateway", "presence=memory inbox=memory (single gateway, nothing shared)");
        return 0;
    }
    snprintf(err, errlen, "--presence %s is not available in this build", cfg->presence);
    return -ENOTSUP;
}

int mg_gateway_start(const mg_config *cfg, mg_gateway **out, char *err, size_t errlen)
{
    mg_gateway *gw = mg_new(mg_gateway);
    gw->cfg = cfg;
    mg_presence *presence = NULL;
    mg_inbox *inbox = NULL;
    int rc;

    grpc_init();
    gw->pool = mg_pool_create("worker", (int)cfg->workers, (size_t)cfg->work_queue);
    gw->ws = mg_ws_server_create(cfg, gw->pool, err, errlen);
    if (!gw->ws) {
        rc = -EINVAL;
        goto fail;
    }
    if ((rc = make_stores(cfg, &presence, &inbox, err, errlen)) != 0)
        goto fail;
    mg_router_config rcfg = {
        .gateway_id = cfg->id,
        .region = cfg->region,
        .hot_window_seconds = (int)cfg->hot_window_seconds,
        .hot_threshold = (int)cfg->hot_threshold,
        .hot_capacity = (size_t)cfg->hot_capacity,
        .dedupe_window = (size_t)cfg->dedupe_window,
    };
    mg_local_sink sink = mg_ws_server_sink(gw->ws);
    gw->router = mg_router_create(&rcfg, presence, inbox, &sink);
    presence = NULL;
    inbox = NULL;
    mg_ws_server_set_router(gw->ws, gw->router);

    mg_grpc_server_config gcfg = {
        .listen = cfg->grpc_listen,
        .threads = (int)cfg->grpc_threads,
        .max_message_bytes = (int)cfg->grpc_max_message_bytes,
        .max_content_bytes = (size_t)cfg->max_content_bytes,
        .max_user_bytes = (size_t)cfg->max_user_bytes,
        .max_batch = (size_t)cfg->max_batch,
        .gateway_id = cfg->id,
        .region = cfg->region,
    };
    gw->grpc = mg_grpc_server_create(&gcfg, gw->router, gw->pool, err, errlen);
    if (!gw->grpc) {
        rc = -EINVAL;
        goto fail;
    }
    if ((rc = mg_grpc_server_start(gw->grpc, err, errlen)) != 0)
        goto fail;
    if ((rc = mg_ws_server_start(gw->ws)) != 0) {
        snprintf(err, errlen, "WebSocket listener %s: %s", cfg->ws_listen, strerror(-rc));
        goto fail;
    }
    mg_ws_server_set_ready(gw->ws, true);
    mg_log_info("gateway", "ready id=%s region=%s ws=%s grpc=%s version=%s", cfg->id, cfg->region,
                cfg->ws_listen, cfg->grpc_listen, MG_VERSION);
    *out = gw;
    return 0;

fail:
    mg_presence_free(presence);
    mg_inbox_free(inbox);
    gw->stopped = true;
    mg_gateway_free(gw);
    return rc;
}

int64_t mg_gateway_tick_interval_ms(mg_gateway *gw)
{
    int64_t lease_ms = gw->cfg->presence_lease_seconds * 1000;
    return lease_ms / 3 > 100 ? lease_ms / 3 : 100;
}

void mg_gateway_tick(mg_gateway *gw)
{
    mg_presence *p = mg_router_presence(gw->router);
    int rc = p->ops->renew(p);
    if (rc != 0)
        mg_log_warn("gateway", "presence lease renewal failed err=%s", strerror(-rc));
}

void mg_gateway_stop(mg_gateway *gw)
{
    if (gw->stopped)
        return;
    gw->stopped = true;
    if (gw->ws)
        mg_ws_server_set_ready(gw->ws, false);
    if (gw->grpc)
        mg_grpc_server_set_serving(gw->grpc, false);
    if (gw->ws)
        mg_ws_server_drain(gw->ws, (int)gw->cfg->drain_seconds);
    if (gw->grpc)
        mg_grpc_server_shutdown(gw->grpc, 2000);
    if (gw->ws)
        mg_ws_server_stop(gw->ws);
    mg_pool_free(gw->pool); /* runs the jobs still queued */
    gw->pool = NULL;
    if (gw->router) {
        mg_presence *p = mg_router_presence(gw->router);
        p->ops->remove_gateway(p);
    }
    mg_log_info("gateway", "stopped id=%s", gw->cfg->id);
}

void mg_gateway_free(mg_gateway *gw)
{
    if (!gw)
        return;
    mg_gateway_stop(gw);
    mg_grpc_server_free(gw->grpc);
    mg_ws_server_free(gw->ws);
    mg_router_free(gw->router);
    mg_pool_free(gw->pool);
    grpc_shutdown();
    free(gw);
}
