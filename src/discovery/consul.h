/* consul.h: registration with Consul and the watcher of healthy peers.
 *
 * mg_consul_start registers service `service` (ID = gateway id, address and
 * gRPC port, meta region/ws_port/version/buses, tags) with a Consul GRPC check on
 * grpc.health.v1.Health and DeregisterCriticalServiceAfter, then starts the
 * watcher thread ("consul-watch") that follows
 * /v1/health/service/<service>?passing with blocking queries and feeds the
 * peer table (peers.h). Consul down: the last known peers stay, retries back
 * off with jitter, one log line per state change. mg_consul_stop deregisters
 * and joins the thread.
 *
 * Thread-safety: create/start/stop/free from the main thread only.
 */
#ifndef MG_CONSUL_H
#define MG_CONSUL_H

#include <stdbool.h>

#include "discovery/peers.h"

#include <stdint.h>

typedef struct mg_consul_config {
    const char *addr;    /* host:port or http(s)://host:port (CONSUL_HTTP_ADDR) */
    const char *token;   /* ACL token, "" for none (CONSUL_HTTP_TOKEN) */
    const char *service; /* "meshgate" */
    const char *tags;    /* comma-separated */
    const char *gateway_id, *region, *version;
    const char *buses;          /* meta "buses": the paths this gateway consumes, "grpc,kafka" */
    const char *advertise_addr; /* host peers dial */
    int grpc_port, ws_port;
    /* The gRPC listener is TLS (--grpc-tls-cert): Consul's agent cannot
     * present a client certificate, so the check is HTTP GET /readyz on the
     * WebSocket listener instead of grpc.health.v1. */
    bool grpc_tls;
    int check_interval_seconds;
    int deregister_after_seconds;
} mg_consul_config;

typedef struct mg_consul mg_consul;

/* Copies cfg. peers must outlive the mg_consul. */
mg_consul *mg_consul_create(const mg_consul_config *cfg, mg_peers *peers);
/* Registers and starts the watcher. Returns 0, or a negative errno with the
 * reason logged (Consul unreachable, token refused: -EACCES). */
int mg_consul_start(mg_consul *c);
/* Deregisters (best effort, bounded by a short timeout) and stops the watcher. */
void mg_consul_stop(mg_consul *c);
void mg_consul_free(mg_consul *c); /* NULL is a no-op; stops first if running */

#endif
