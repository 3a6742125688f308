/* peers.h: the peer table, gateways known through discovery.
 *
 * The discovery watcher (consul_watch.c) builds a new immutable snapshot
 * (mg_peer_set) whenever the healthy set changes and swaps it in; readers
 * (router workers choosing a gRPC peer) take a reference to the current
 * snapshot, never blocking on the watcher. Each peer owns one gRPC channel,
 * created when the peer appears and destroyed when the last snapshot that
 * holds it is released.
 *
 * Thread-safety: all functions may be called from any thread.
 */
#ifndef MG_PEERS_H
#define MG_PEERS_H

#include <grpc/grpc.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct mg_peer {
    char *id;      /* gateway id */
    char *address; /* host:port of its gRPC listener */
    char *region;
    char *version; /* Consul meta "version", "" when absent */
    char *buses; /* Consul meta "buses": paths it consumes, "grpc,kafka,redis-pubsub"; "" absent */
    int ws_port;
    grpc_channel *channel; /* owned by the peer; valid while a reference is held */
} mg_peer;

typedef struct mg_peer_set mg_peer_set; /* immutable snapshot */
typedef struct mg_peers mg_peers;

/* authority: sent as :authority on peer calls (GRPC_ARG_DEFAULT_AUTHORITY),
 * "" or NULL for the default. max_message_bytes bounds peer call sizes. */
mg_peers *mg_peers_create(const char *self_id, const char *authority, int max_message_bytes);
void mg_peers_free(mg_peers *p); /* NULL is a no-op; snapshots must be released first */
/* Peer channels are insecure unless given creds here (taken over, released
 * by mg_peers_free), e.g. grpc_auth.h's mTLS credentials. Call before the
 * first mg_peers_update: channels made earlier keep the old credentials. */
void mg_peers_set_credentials(mg_peers *p, grpc_channel_credentials *creds);

/* The current snapshot with a reference the caller releases. Never NULL. */
mg_peer_set *mg_peers_acquire(mg_peers *p);
void mg_peer_set_release(mg_peer_set *s);
size_t mg_peer_set_count(const mg_peer_set *s);
const mg_peer *mg_peer_set_at(const mg_peer_set *s, size_t i);
/* The peer with that id, valid while s is held; NULL when unknown. */
const mg_peer *mg_peer_set_find(const mg_peer_set *s, const char *id);

/* Replaces the table with these peers (self is skipped). Peers whose id and
 * address are unchanged keep their channel. Entries with an address that does
 * not parse as host:port are skipped with a warning. Arrays are copied. */
void mg_peers_update(mg_peers *p, const mg_peer *peers, size_t n);
/* Milliseconds since the last successful update or mark_fresh (the
 * meshgate_peers_age_seconds gauge); -1 before the first one.
 * mg_peers_mark_fresh records a successful Consul answer that changed nothing. */
int64_t mg_peers_age_ms(mg_peers *p);
void mg_peers_mark_fresh(mg_peers *p);

/* Whether the peer consumes bus (a path name: grpc, kafka, redis-pubsub,
 * nats), by its "buses" meta; a peer without it (an older gateway) consumes
 * grpc and kafka. */
bool mg_peer_consumes(const mg_peer *peer, const char *bus);
/* Whether every known peer of region consumes bus (true when none is known):
 * a region-wide bus is usable only when all of the region takes it. */
bool mg_peers_region_consumes(mg_peers *p, const char *region, const char *bus);

/* 1 when addr is host:port (hostname, IPv4, or [IPv6]; port 1..65535). */
int mg_peers_valid_address(const char *addr);

/* The table as JSON for the admin view GET /peers and `meshgate-cli peers`:
 * {"self":..,"age_ms":..,"count":..,"peers":[{"id","address","region",
 * "ws_port","version","buses","channel"}]}. Returns a malloc'd string the caller
 * frees with free(). */
char *mg_peers_render_json(mg_peers *p);

#endif
