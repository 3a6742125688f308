/* consul_internal.h: pieces shared by the discovery files (not a public API).
 *
 * consul_http.c:  one HTTP request to the Consul agent through a curl multi
 *                 handle that another thread can wake up to abort it.
 * consul_parse.c: Consul's JSON answers in, registration JSON out, the
 *                 blocking-query index rules.
 * Internal names use the mg_consul__ prefix (libuv's uv__ habit).
 */
#ifndef MG_CONSUL_INTERNAL_H
#define MG_CONSUL_INTERNAL_H

#include "discovery/consul.h"
#include "discovery/peers.h"

#include <curl/curl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Largest Consul answer accepted; a larger one fails with -EMSGSIZE. */
#define MG_CONSUL_MAX_BODY (16u * 1024 * 1024)

/* "host:port", "http://host:port", "https://host:port/" -> base URL without
 * a trailing slash ("http://host:port"). NULL for an empty or unusable
 * address. Caller frees. */
char *mg_consul__base_url(const char *addr);

typedef struct mg_consul_http {
    CURLM *multi;       /* owned; one per thread that makes requests */
    char *base;         /* owned, from mg_consul__base_url */
    char *token_header; /* owned, "X-Consul-Token: ..." or NULL */
    atomic_bool *abort; /* borrowed; when set, requests end with -ECANCELED */
} mg_consul_http;

typedef struct mg_consul_resp {
    long status; /* HTTP status, 0 when no answer */
    char *body;  /* owned, NUL-terminated (may be "") */
    size_t len;
    int64_t index; /* X-Consul-Index, -1 when absent or not a number */
    char err[256]; /* human reason when the request failed */
} mg_consul_resp;

/* Returns 0, or -EINVAL for an unusable address or a token with CR/LF. */
int mg_consul__http_init(mg_consul_http *h, const char *addr, const char *token,
                         atomic_bool *abort_flag);
void mg_consul__http_cleanup(mg_consul_http *h);
/* Wakes a request or mg_consul__http_sleep of h from another thread. */
void mg_consul__http_wakeup(mg_consul_http *h);
/* Sleeps up to ms, returning early (-ECANCELED) when *abort is set. */
int mg_consul__http_sleep(mg_consul_http *h, int64_t ms);

/* One request; path starts with "/v1/...". body may be NULL.
 * Returns 0 when an HTTP answer arrived with status 2xx; otherwise
 * -ECONNREFUSED (agent down), -EHOSTUNREACH (name does not resolve),
 * -ETIMEDOUT, -ECANCELED (aborted), -EACCES (HTTP 403: ACL token refused),
 * -ENOENT (404), -EMSGSIZE (answer too large), -EPROTO (other HTTP status or
 * transport error); out->err says why. out is always filled; release it with
 * mg_consul__resp_free. */
int mg_consul__request(mg_consul_http *h, const char *method, const char *path, const char *body,
                       long timeout_ms, mg_consul_resp *out);
void mg_consul__resp_free(mg_consul_resp *r);

/* Parses a /v1/health/service/<name> answer into peers (id = Service.ID,
 * address = Service.Address or else Node.Address, ":" Service.Port; IPv6 in
 * brackets; region/ws_port/version from Service.Meta). Entries missing an
 * ID, an address or a valid port are kept with address "" so that
 * mg_peers_update skips and logs them. Returns 0 and *out (free with
 * mg_consul__peers_free), or -EPROTO with err filled for malformed JSON or
 * a top level that is not an array. */
int mg_consul__parse_health(const char *body, size_t len, mg_peer **out, size_t *n, char *err,
                            size_t errlen);
void mg_consul__peers_free(mg_peer *peers, size_t n);

/* The PUT /v1/agent/service/register body for cfg. Caller frees. */
char *mg_consul__registration_json(const mg_consul_config *cfg);

/* The blocking-query index rules of Consul's "Blocking Queries" doc: an
 * index that went backwards resets to 0 (the next query reads at once); an
 * index <= 0 from the server becomes 1 so the next query still blocks. */
int64_t mg_consul__next_index(int64_t prev, int64_t got);

#endif
