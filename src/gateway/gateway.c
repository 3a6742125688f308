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
#include "common/mg_trace.h"
#include "discovery/consul.h"
#include "discovery/peers.h"
#include "gateway/grpc_auth.h"
#include "gateway/grpc_server.h"
#include "gateway/ws_server.h"
#include "store/redis_store.h"
#include "router/router.h"
#include "store/presence_sync.h"
#include "router/transport_grpc.h"
#include "router/transport_kafka.h"
#include "router/transport_redis_pubsub.h"
#include "router/transport_nats.h"

#include <arpa/inet.h>
#include <stddef.h>
#include <errno.h>
#include <grpc/grpc.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mg_gateway {
    const mg_config *cfg;
    bool tracing; /* this gateway started the process's tracer (mg_trace.h) */
    mg_pool *pool;
    mg_ws_server *ws;
    mg_router *router;
    mg_grpc_server *grpc;
    mg_grpc_auth *auth;      /* gRPC credentials: the listener's and the peer channels' */
    mg_redis_cluster *redis; /* shared by the Redis presence and inbox */
    mg_peers *peers;
    mg_consul *consul;
    mg_transport *kafka;  /* owned by the router; kept to stop its consumer */
    mg_transport *pubsub; /* owned by the router; kept to unsubscribe */
    mg_transport *nats;   /* owned by the router; kept to stop its consumer */
    mg_presence *sync;    /* --presence-sync: the router's presence store, kept to stop it */
    char *advertise;
    bool stopped;
};

static void register_redis_metrics(mg_gateway *gw, bool on);

/* Another region says the user is online there: their inbox here follows. */
static void handover_inbox(void *arg, const char *user, const char *region)
{
    int n = mg_router_handover_inbox(arg, user);
    if (n > 0)
        mg_log_info("gateway", "handing over inbox user=%s to region=%s messages=%d", user, region,
                    n);
}

/* The Redis Cluster client shared by presence, inbox and the Pub/Sub bus. */
static int connect_redis(mg_gateway *gw, const char *what, char *err, size_t errlen)
{
    const mg_config *cfg = gw->cfg;
    if (gw->redis)
        return 0;
    char why[400] = "";
    const char *user = cfg->redis_user[0] ? cfg->redis_user : NULL;
    gw->redis = !strcmp(cfg->presence, "redis-sentinel")
                    ? mg_redis_sentinel_create(cfg->sentinel_nodes, cfg->sentinel_master, user,
                                               cfg->redis_password, (int)cfg->redis_timeout_ms, why,
                                               sizeof(why))
                    : mg_redis_cluster_create(cfg->redis_nodes, user, cfg->redis_password,
                                              (int)cfg->redis_timeout_ms, why, sizeof(why));
    if (!gw->redis) {
        snprintf(err, errlen, "%s: %s", what, why);
        return -EHOSTUNREACH;
    }
    register_redis_metrics(gw, true);
    return 0;
}

static int make_stores(mg_gateway *gw, mg_presence **presence, mg_inbox **inbox, char *err,
                       size_t errlen)
{
    const mg_config *cfg = gw->cfg;
    if (!strcmp(cfg->presence, "memory")) {
        *presence = mg_presence_memory_create(cfg->id, cfg->region);
        *inbox = mg_inbox_memory_create_bounded(
            (size_t)cfg->inbox_max_messages, cfg->inbox_max_age_seconds,
            (size_t)cfg->inbox_memory_bytes, (size_t)cfg->inbox_memory_users);
        mg_log_info("gateway", "presence=memory inbox=memory (single gateway, nothing shared)");
        return 0;
    }
    int rc = connect_redis(gw, "presence store", err, errlen);
    if (rc != 0)
        return rc;
    bool sentinel = !strcmp(cfg->presence, "redis-sentinel");
    *presence =
        mg_presence_redis_create(gw->redis, cfg->id, cfg->region, (int)cfg->presence_lease_seconds);
    *inbox =
        mg_inbox_redis_create_durable(gw->redis, (size_t)cfg->inbox_max_messages,
                                      cfg->inbox_max_age_seconds, (int)cfg->inbox_min_replicas);
    if (!*presence || !*inbox) {
        snprintf(err, errlen, "presence store: %s",
                 !*presence ? "cannot write this gateway's lease to Redis"
                            : "--inbox-max-messages must be at least 1");
        return -EIO;
    }
    if (cfg->presence_cache_users > 0 && !cfg->presence_sync) {
        int crc = mg_presence_redis_cache(*presence, (size_t)cfg->presence_cache_users);
        if (crc != 0) /* sends still work: each reads Redis */
            mg_log_warn("gateway", "presence cache off err=%d", crc);
    }
    mg_log_info("gateway", "presence=%s nodes=%s lease_seconds=%lld", cfg->presence,
                sentinel ? cfg->sentinel_nodes : cfg->redis_nodes,
                (long long)cfg->presence_lease_seconds);
    if (cfg->presence_sync) {
        mg_presence_sync_config scfg = {
            .brokers = cfg->kafka_brokers,
            .topic = cfg->presence_sync_topic,
            .region = cfg->region,
            .gateway_id = cfg->id,
            .partitions = (int)cfg->kafka_partitions,
        };
        *presence = mg_presence_sync_create(*presence, gw->redis, &scfg, err, errlen);
        if (!*presence)
            return -EINVAL;
        gw->sync = *presence; /* started once the router exists */
        mg_log_info("gateway", "presence sync topic=%s (region %s's view in its own cluster)",
                    cfg->presence_sync_topic, cfg->region);
    }
    return 0;
}

/* The Redis Pub/Sub bus: subscribed before the gateway says it is ready. */
static int make_pubsub(mg_gateway *gw, char *err, size_t errlen)
{
    const mg_config *cfg = gw->cfg;
    int rc = connect_redis(gw, "redis-pubsub", err, errlen);
    if (rc != 0)
        return rc;
    mg_transport_redis_pubsub_config pcfg = {
        .gateway_id = cfg->id,
        .cluster = gw->redis,
        .user = cfg->redis_user,
        .password = cfg->redis_password,
        .timeout_ms = (int)cfg->redis_pubsub_timeout_ms,
        .max_bytes = (size_t)cfg->redis_pubsub_max_bytes,
        .refresh_pool = gw->pool,
        .peers = gw->peers,
    };
    gw->pubsub = mg_transport_redis_pubsub_create(&pcfg);
    mg_router_set_transport(gw->router, MG_PATH_REDIS_PUBSUB, gw->pubsub);
    return mg_transport_redis_pubsub_start(gw->pubsub, gw->router, err, errlen);
}

/* Peer transports: gRPC direct (needs discovery), Kafka (needs brokers) and
 * Redis Pub/Sub (--redis-pubsub). */

/* The NATS JetStream bus (needs servers): its region stream and consumer. */
static int make_nats(mg_gateway *gw, char *err, size_t errlen)
{
    const mg_config *cfg = gw->cfg;
    mg_transport_nats_config ncfg = {
        .urls = cfg->nats_url,
        .region = cfg->region,
        .gateway_id = cfg->id,
        .replicas = (int)cfg->nats_replicas,
        .max_age_seconds = (int)cfg->nats_max_age_seconds,
        .timeout_ms = (int)cfg->nats_timeout_ms,
        .ack_wait_ms = (int)cfg->nats_ack_wait_ms,
        .max_deliver = (int)cfg->nats_max_deliver,
        .max_pending = (int)cfg->nats_max_pending,
        .max_message_bytes = (size_t)cfg->grpc_max_message_bytes,
        .peers = gw->peers,
    };
    mg_transport *n = mg_transport_nats_create(&ncfg, err, errlen);
    if (!n)
        return -EHOSTUNREACH;
    mg_router_set_transport(gw->router, MG_PATH_NATS, n);
    gw->nats = n;
    return mg_transport_nats_start_consumer(n, gw->router, err, errlen);
}

/* Peer transports: gRPC direct (needs discovery), Kafka (needs brokers) and
 * NATS (needs servers). */
static int make_transports(mg_gateway *gw, char *err, size_t errlen)
{
    const mg_config *cfg = gw->cfg;
    if (!strcmp(cfg->discovery, "consul")) {
        gw->peers = mg_peers_create(cfg->id, cfg->peer_authority, (int)cfg->grpc_max_message_bytes);
        mg_peers_set_credentials(gw->peers, mg_grpc_auth_channel_credentials(gw->auth));
        mg_transport_grpc_config tcfg = {
            .gateway_id = cfg->id,
            .region = cfg->region,
            .peer_deadline_ms = (int)cfg->peer_deadline_ms,
            .peer_max_inflight = (int)cfg->peer_max_inflight,
            .coalesce_calls = (int)cfg->peer_coalesce_calls,
            .cq_threads = (int)cfg->peer_cq_threads,
            .peer_token = mg_grpc_auth_peer_token(gw->auth),
            .link =
                {
                    .error_threshold = (double)cfg->peer_degrade_error_pct / 100.0,
                    .min_samples = (int)cfg->peer_degrade_min_calls,
                    .latency_threshold_us = cfg->peer_degrade_latency_ms * 1000,
                    .probe_interval_ms = cfg->peer_probe_interval_ms,
                },
        };
        mg_router_set_transport(gw->router, MG_PATH_GRPC,
                                mg_transport_grpc_create(gw->peers, &tcfg));
    }
    if (cfg->kafka_brokers[0]) {
        mg_transport_kafka_config kcfg = {
            .brokers = cfg->kafka_brokers,
            .topic_prefix = cfg->kafka_topic_prefix,
            .region = cfg->region,
            .gateway_id = cfg->id,
            .partitions = (int)cfg->kafka_partitions,
            .linger_ms = (int)cfg->kafka_linger_ms,
            .batch_bytes = (int)cfg->kafka_batch_bytes,
            .timeout_ms = (int)cfg->kafka_timeout_ms,
            .queue_max_messages = (int)cfg->kafka_queue_max_messages,
            .retry_budget_ms = (int)cfg->kafka_retry_budget_ms,
            .peers = gw->peers,
        };
        mg_transport *k = mg_transport_kafka_create(&kcfg, err, errlen);
        if (!k)
            return -EINVAL;
        mg_router_set_transport(gw->router, MG_PATH_KAFKA, k);
        gw->kafka = k;
        int rc = mg_transport_kafka_start_consumer(k, gw->router);
        if (rc != 0) {
            snprintf(err, errlen, "kafka consumer: %s", strerror(-rc));
            return rc;
        }
    }
    if (cfg->redis_pubsub) {
        int rc = make_pubsub(gw, err, errlen);
        if (rc != 0)
            return rc;
    }
    if (cfg->nats_url[0])
        return make_nats(gw, err, errlen);
    return 0;
}

/* A route list set by hand may name a path this gateway has no transport
 * for (the same lists across a fleet): it is skipped; say so once. */
static void warn_unconfigured(mg_gateway *gw, const char *option, const mg_route_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        if (!mg_router_has_path(gw->router, l->step[i]))
            mg_log_warn("gateway", "--%s names %s, which is not configured here: skipped", option,
                        mg_path_name(l->step[i]));
}

static double redis_stat(mg_gateway *gw, size_t offset)
{
    mg_redis_cluster_stats st;
    mg_redis_cluster_stats_get(gw->redis, &st);
    return (double)*(uint64_t *)((char *)&st + offset);
}

#define REDIS_STAT_FN(field)                                                                       \
    static double redis_##field(void *arg)                                                         \
    {                                                                                              \
        return redis_stat(arg, offsetof(mg_redis_cluster_stats, field));                           \
    }
REDIS_STAT_FN(commands)
REDIS_STAT_FN(moved)
REDIS_STAT_FN(ask)
REDIS_STAT_FN(refreshes)
REDIS_STAT_FN(io_errors)

static void register_redis_metrics(mg_gateway *gw, bool on)
{
    static const struct {
        const char *name, *help;
        mg_gauge_fn fn;
    } stats[] = {
        {"meshgate_redis_commands_total", "Redis commands sent (each attempt)", redis_commands},
        {"meshgate_redis_moved_total", "MOVED redirections followed", redis_moved},
        {"meshgate_redis_ask_total", "ASK redirections followed", redis_ask},
        {"meshgate_redis_slot_refreshes_total", "Slot map reloads", redis_refreshes},
        {"meshgate_redis_io_errors_total", "Redis connection failures", redis_io_errors},
    };
    for (size_t i = 0; i < sizeof(stats) / sizeof(stats[0]); i++)
        mg_gauge_fn_register(stats[i].name, stats[i].help, NULL, on ? stats[i].fn : NULL,
                             on ? gw : NULL);
}

static char *render_peers(void *arg, const char **content_type)
{
    mg_gateway *gw = arg;
    *content_type = "application/json";
    return gw->peers ? mg_peers_render_json(gw->peers) : mg_xstrdup("{\"peers\":[]}");
}

static int start_discovery(mg_gateway *gw, char *err, size_t errlen)
{
    const mg_config *cfg = gw->cfg;
    if (!gw->peers)
        return 0;
    char *host = NULL;
    mg_parse_hostport(cfg->grpc_listen, &host, NULL);
    gw->advertise = cfg->advertise_addr[0] ? mg_xstrdup(cfg->advertise_addr) : host;
    if (gw->advertise != host)
        free(host);
    char buses[96]; /* what this gateway consumes, for senders choosing a bus */
    snprintf(buses, sizeof(buses), "grpc%s%s%s", cfg->kafka_brokers[0] ? ",kafka" : "",
             cfg->redis_pubsub ? ",redis-pubsub" : "", cfg->nats_url[0] ? ",nats" : "");
    mg_consul_config ccfg = {
        .addr = cfg->consul_addr,
        .token = cfg->consul_token,
        .service = cfg->consul_service,
        .tags = cfg->consul_tags,
        .gateway_id = cfg->id,
        .region = cfg->region,
        .version = MG_VERSION,
        .buses = buses,
        .advertise_addr = gw->advertise,
        .grpc_port = mg_grpc_server_port(gw->grpc),
        .ws_port = mg_ws_server_port(gw->ws),
        .grpc_tls = cfg->grpc_tls_cert[0] != '\0',
        .check_interval_seconds = (int)cfg->consul_check_interval_seconds,
        .deregister_after_seconds = (int)cfg->consul_deregister_seconds,
    };
    gw->consul = mg_consul_create(&ccfg, gw->peers);
    int rc = mg_consul_start(gw->consul);
    if (rc != 0)
        snprintf(err, errlen, "cannot register with Consul at %s: %s", cfg->consul_addr,
                 rc == -EACCES ? "ACL token refused" : strerror(-rc));
    return rc;
}

int mg_gateway_start(const mg_config *cfg, mg_gateway **out, char *err, size_t errlen)
{
    mg_gateway *gw = mg_new(mg_gateway);
    gw->cfg = cfg;
    mg_presence *presence = NULL;
    mg_inbox *inbox = NULL;
    int rc;

    grpc_init();
    mg_trace_config tcfg = {
        .endpoint = cfg->otlp_endpoint,
        .sample_ratio = cfg->trace_sample_ratio,
        .service_name = "meshgate",
        .instance_id = cfg->id,
        .region = cfg->region,
        .slots = (size_t)cfg->trace_max_spans,
    };
    gw->tracing = mg_trace_start(&tcfg) == 0; /* one tracer per process (tests run several) */
    if (gw->tracing && cfg->otlp_endpoint[0])
        mg_log_info("gateway", "tracing otlp_endpoint=%s sample_ratio=%g", cfg->otlp_endpoint,
                    cfg->trace_sample_ratio);
    gw->pool = mg_pool_create("worker", (int)cfg->workers, (size_t)cfg->work_queue);
    gw->ws = mg_ws_server_create(cfg, gw->pool, err, errlen);
    if (!gw->ws) {
        rc = -EINVAL;
        goto fail;
    }
    gw->auth = mg_grpc_auth_create(cfg, err, errlen);
    if (!gw->auth) {
        rc = -EINVAL;
        goto fail;
    }
    if ((rc = make_stores(gw, &presence, &inbox, err, errlen)) != 0)
        goto fail;
    mg_route_lists routes;
    if ((rc = mg_route_lists_parse(cfg->near_route, cfg->far_route, &routes, err, errlen)) != 0)
        goto fail;
    mg_router_config rcfg = {
        .gateway_id = cfg->id,
        .region = cfg->region,
        .hot_window_seconds = (int)cfg->hot_window_seconds,
        .hot_threshold = (int)cfg->hot_threshold,
        .hot_capacity = (size_t)cfg->hot_capacity,
        .dedupe_window = (size_t)cfg->dedupe_window,
        .max_inflight = (size_t)cfg->max_inflight_sends,
        /* half the connection's queue: room for live messages next to the inbox */
        .inbox_page = cfg->outbound_queue > 1 ? (size_t)cfg->outbound_queue / 2 : 1,
        .routes = &routes,
    };
    mg_local_sink sink = mg_ws_server_sink(gw->ws);
    gw->router = mg_router_create(&rcfg, presence, inbox, &sink, gw->pool);
    presence = NULL;
    inbox = NULL;
    mg_ws_server_set_router(gw->ws, gw->router);
    mg_ws_server_set_http_hook(gw->ws, "/peers", render_peers, gw);
    if (gw->sync && mg_presence_sync_start(gw->sync, handover_inbox, gw->router) != 0) {
        snprintf(err, errlen, "presence sync: cannot start the consumer of %s",
                 cfg->presence_sync_topic);
        rc = -EINVAL;
        goto fail;
    }
    if ((rc = make_transports(gw, err, errlen)) != 0)
        goto fail;
    if (strcmp(cfg->near_route, MG_NEAR_ROUTE_DEFAULT))
        warn_unconfigured(gw, "near-route", &routes.near_route);
    if (strcmp(cfg->far_route, MG_FAR_ROUTE_DEFAULT))
        warn_unconfigured(gw, "far-route", &routes.far_route);

    mg_grpc_server_config gcfg = {
        .listen = cfg->grpc_listen,
        .threads = (int)cfg->grpc_threads,
        .max_message_bytes = (int)cfg->grpc_max_message_bytes,
        .max_content_bytes = (size_t)cfg->max_content_bytes,
        .max_user_bytes = (size_t)cfg->max_user_bytes,
        .max_batch = (size_t)cfg->max_batch,
        .max_deadline_ms = (int)cfg->grpc_max_deadline_ms,
        .low_deadline_ms = (int)mg_config_send_deadline_ms(cfg),
        .gateway_id = cfg->id,
        .region = cfg->region,
        .auth = gw->auth,
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
    if ((rc = start_discovery(gw, err, errlen)) != 0)
        goto fail;
    mg_ws_server_set_ready(gw->ws, true);
    mg_log_info("gateway",
                "ready id=%s region=%s ws=%s grpc=%s near_route=%s far_route=%s version=%s",
                cfg->id, cfg->region, cfg->ws_listen, cfg->grpc_listen, cfg->near_route,
                cfg->far_route, MG_VERSION);
    *out = gw;
    return 0;

fail:
    mg_presence_free(presence);
    mg_inbox_free(inbox);
    mg_gateway_free(gw); /* stops what was started, in order */
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
    if (gw->consul)
        mg_consul_stop(gw->consul); /* deregister first: peers stop routing here */
    if (gw->ws)
        mg_ws_server_drain(gw->ws, (int)gw->cfg->drain_seconds);
    if (gw->grpc)
        mg_grpc_server_shutdown(gw->grpc, 2000);
    if (gw->ws)
        mg_ws_server_stop(gw->ws);
    if (gw->kafka)
        mg_transport_kafka_stop(gw->kafka, 5000); /* commit handled offsets, flush */
    if (gw->sync)
        mg_presence_sync_stop(gw->sync); /* no new inbox hand-over */
    if (gw->pubsub)
        mg_transport_redis_pubsub_stop(gw->pubsub); /* unsubscribe; waits go the next step */
    if (gw->nats)
        mg_transport_nats_stop(gw->nats, 5000); /* ack handled messages, await PubAcks */
    if (gw->router)
        mg_router_drain(gw->router, 35000); /* operations in flight need the pool */
    mg_pool_free(gw->pool);                 /* runs the jobs still queued */
    gw->pool = NULL;
    if (gw->tracing)
        mg_trace_stop(2000); /* every span has ended: export what is queued, 2 s at most */
    gw->tracing = false;
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
    mg_router_free(gw->router); /* frees presence, inbox and transports */
    mg_consul_free(gw->consul);
    mg_peers_free(gw->peers);
    mg_grpc_auth_free(gw->auth); /* after the server that checks with it */
    if (gw->redis)
        register_redis_metrics(gw, false);
    mg_redis_cluster_free(gw->redis);
    mg_pool_free(gw->pool);
    free(gw->advertise);
    grpc_shutdown();
    free(gw);
}
