/* consul.c: registration with Consul and the watcher of healthy peers.
 *
 * Owns this gateway's registration (service `meshgate`, ID = gateway id, a
 * GRPC health check on grpc.health.v1.Health) and the "consul-watch" thread.
 *
 * Threads: mg_consul_create/start/stop/free run on the main thread. start
 * registers synchronously (so a gateway that cannot register says why and
 * exits) and then starts "consul-watch", which alone feeds the mg_peers table.
 *
 * DESIGN: the watcher follows /v1/health/service/<service>?passing with
 * blocking queries (index + wait=30s) and applies the index rules of
 * Consul's "Blocking Queries" doc (mg_consul__next_index). Queries start at
 * most every 200 ms. On any error (agent down, slow, 403, malformed or
 * truncated answer) the last known peers stay in the table, the index resets
 * to 0, the thread backs off (250 ms doubling to 5 s, with jitter) and logs
 * once per change of state, not per retry. The agent forgets services when it
 * restarts (and -dev agents lose everything), so the watcher checks
 * /v1/agent/service/<id> after every recovery, whenever the index went
 * backwards, whenever this gateway is missing from the healthy set (at most
 * every 2 s) and every 30 s, and re-registers when it is missing.
 *
 * Stopping: mg_consul_stop sets the abort flag and wakes the watcher's curl
 * multi handle, so an in-flight 30 s blocking query ends within one poll
 * round (milliseconds); then it deregisters (bounded by 2 s).
 */
#include "discovery/consul.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "discovery/consul_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WAIT_S             30  /* blocking query wait */
#define MIN_QUERY_GAP_MS   200 /* rate limit between query starts */
#define BACKOFF_MIN_MS     250
#define BACKOFF_MAX_MS     5000
#define AGENT_CHECK_MS     30000 /* periodic "am I still registered?" */
#define SELF_CHECK_MS      2000  /* same, when we are missing from ?passing */
#define REGISTER_TIMEOUT   5000
#define DEREGISTER_TIMEOUT 2000
#define READ_TIMEOUT       10000 /* non-blocking reads */

struct mg_consul {
    mg_consul_config cfg; /* strings owned */
    mg_peers *peers;
    char *reg_json;
    char *reg_path;            /* /v1/agent/service/register?replace-existing-checks=true */
    char *dereg_path;          /* /v1/agent/service/deregister/<id> */
    char *agent_path;          /* /v1/agent/service/<id> */
    char *health_path;         /* /v1/health/service/<service>?passing */
    mg_consul_http main_http;  /* main thread: register, deregister */
    mg_consul_http watch_http; /* consul-watch thread (wakeup from main) */
    atomic_bool stop;
    bool running, registered, http_ok;
    pthread_t thread;
    mg_metric *m_errors, *m_registrations, *m_up;
};

static char *dup_or_empty(const char *s)
{
    return mg_xstrdup(s ? s : "");
}

static char *escape(const char *s)
{
    char *e = curl_easy_escape(NULL, s, 0);
    if (!e)
        abort();
    char *out = mg_xstrdup(e);
    curl_free(e);
    return out;
}

mg_consul *mg_consul_create(const mg_consul_config *cfg, mg_peers *peers)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    mg_consul *c = mg_new(mg_consul);
    c->cfg = *cfg;
    c->cfg.addr = dup_or_empty(cfg->addr);
    c->cfg.token = dup_or_empty(cfg->token);
    c->cfg.service = dup_or_empty(cfg->service && cfg->service[0] ? cfg->service : "meshgate");
    c->cfg.tags = dup_or_empty(cfg->tags);
    c->cfg.gateway_id = dup_or_empty(cfg->gateway_id);
    c->cfg.region = dup_or_empty(cfg->region);
    c->cfg.version = dup_or_empty(cfg->version);
    c->cfg.buses = dup_or_empty(cfg->buses && cfg->buses[0] ? cfg->buses : "grpc");
    c->cfg.advertise_addr = dup_or_empty(cfg->advertise_addr);
    c->peers = peers;
    atomic_init(&c->stop, false);

    char *id = escape(c->cfg.gateway_id), *svc = escape(c->cfg.service);
    c->reg_path = mg_xstrdup("/v1/agent/service/register?replace-existing-checks=true");
    c->dereg_path = mg_xasprintf("/v1/agent/service/deregister/%s", id);
    c->agent_path = mg_xasprintf("/v1/agent/service/%s", id);
    c->health_path = mg_xasprintf("/v1/health/service/%s?passing", svc);
    free(id);
    free(svc);
    c->reg_json = mg_consul__registration_json(&c->cfg);

    c->m_errors = mg_counter("meshgate_consul_errors_total",
                             "failed Consul requests (watch, register, deregister)", NULL);
    c->m_registrations = mg_counter("meshgate_consul_registrations_total",
                                    "registrations of this gateway with Consul (re-registrations "
                                    "after an agent restart included)",
                                    NULL);
    c->m_up = mg_gauge("meshgate_consul_up", "1 when the last Consul watch query succeeded", NULL);
    return c;
}

static const char *why(int rc)
{
    switch (rc) {
    case -ECONNREFUSED:
        return "connection refused (is the Consul agent running at this address?)";
    case -EHOSTUNREACH:
        return "host name does not resolve";
    case -ETIMEDOUT:
        return "timed out";
    case -EACCES:
        return "ACL token refused (HTTP 403): set --consul-token / CONSUL_HTTP_TOKEN to a token "
               "with service:write on the service";
    case -ENOENT:
        return "not found (HTTP 404)";
    case -EMSGSIZE:
        return "answer too large";
    case -ECANCELED:
        return "cancelled";
    default:
        return "protocol error";
    }
}

/* Registers with `h`; logs failures only when `quiet` is false. */
static int do_register(mg_consul *c, mg_consul_http *h, bool quiet)
{
    mg_consul_resp r;
    int rc = mg_consul__request(h, "PUT", c->reg_path, c->reg_json, REGISTER_TIMEOUT, &r);
    if (rc == 0) {
        mg_metric_add(c->m_registrations, 1);
        mg_log_info("consul",
                    "registered service=%s id=%s address=%s:%d region=%s check_interval=%ds "
                    "consul=%s",
                    c->cfg.service, c->cfg.gateway_id, c->cfg.advertise_addr, c->cfg.grpc_port,
                    c->cfg.region, c->cfg.check_interval_seconds, h->base);
    } else {
        mg_metric_add(c->m_errors, 1);
        if (!quiet)
            mg_log_error("consul", "cannot register with Consul: %s consul=%s detail=\"%s\"",
                         why(rc), h->base, r.err);
    }
    mg_consul__resp_free(&r);
    return rc;
}

/* --- the watcher --------------------------------------------------------- */

enum wstate { WS_START, WS_OK, WS_DOWN };

struct watch {
    mg_consul *c;
    enum wstate state;
    int down_rc;
    int failures;
    int64_t index;
    char *last_body;
    unsigned seed;
    int64_t last_agent_check_ms;
    bool check_agent;
};

static int64_t backoff_ms(struct watch *w)
{
    int64_t b = BACKOFF_MIN_MS;
    for (int i = 1; i < w->failures && b < BACKOFF_MAX_MS; i++)
        b *= 2;
    if (b > BACKOFF_MAX_MS)
        b = BACKOFF_MAX_MS;
    /* jitter: uniform in [b/2, b] */
    return b / 2 + (int64_t)(rand_r(&w->seed) % (unsigned)(b / 2 + 1));
}

static void watch_failed(struct watch *w, int rc, const char *detail)
{
    mg_consul *c = w->c;
    mg_metric_add(c->m_errors, 1);
    mg_metric_set(c->m_up, 0);
    if (w->state != WS_DOWN || w->down_rc != rc) {
        mg_peer_set *s = mg_peers_acquire(c->peers);
        mg_log_warn("consul",
                    "watch failing, keeping %zu last known peers, retrying with backoff: %s "
                    "consul=%s detail=\"%s\"",
                    mg_peer_set_count(s), why(rc), c->watch_http.base, detail);
        mg_peer_set_release(s);
    }
    w->state = WS_DOWN;
    w->down_rc = rc;
    w->failures++;
    w->index = 0;
    w->check_agent = true;
}

/* Re-registers when the agent does not know this gateway any more. */
static void check_registration(struct watch *w)
{
    mg_consul *c = w->c;
    w->check_agent = false;
    w->last_agent_check_ms = mg_mono_ms();
    mg_consul_resp r;
    int rc = mg_consul__request(&c->watch_http, "GET", c->agent_path, NULL, READ_TIMEOUT, &r);
    mg_consul__resp_free(&r);
    if (rc == -ENOENT) {
        mg_log_warn("consul",
                    "agent no longer knows this gateway (restarted?): re-registering "
                    "id=%s",
                    c->cfg.gateway_id);
        if (do_register(c, &c->watch_http, false) != 0)
            w->check_agent = true; /* next round */
    } else if (rc != 0 && rc != -ECANCELED) {
        w->check_agent = true;
    }
}

static void handle_answer(struct watch *w, mg_consul_resp *r)
{
    mg_consul *c = w->c;
    mg_peer *peers;
    size_t n;
    char err[256];
    if (mg_consul__parse_health(r->body, r->len, &peers, &n, err, sizeof(err)) != 0) {
        watch_failed(w, -EPROTO, err);
        return;
    }
    bool self_seen = false;
    for (size_t i = 0; i < n; i++)
        self_seen |= strcmp(peers[i].id, c->cfg.gateway_id) == 0;

    int64_t next = mg_consul__next_index(w->index, r->index);
    if (w->index > 0 && next == 0)
        w->check_agent = true; /* index went backwards: the agent's state was reset */
    w->index = next;

    if (!w->last_body || strcmp(w->last_body, r->body) != 0) {
        mg_peers_update(c->peers, peers, n);
        free(w->last_body);
        w->last_body = mg_xstrdup(r->body);
    } else {
        mg_peers_mark_fresh(c->peers);
    }
    mg_consul__peers_free(peers, n);
    mg_metric_set(c->m_up, 1);

    if (w->state != WS_OK) {
        mg_peer_set *s = mg_peers_acquire(c->peers);
        if (w->state == WS_DOWN)
            mg_log_info("consul", "watch recovered peers=%zu consul=%s", mg_peer_set_count(s),
                        c->watch_http.base);
        else
            mg_log_info("consul", "watching service=%s peers=%zu", c->cfg.service,
                        mg_peer_set_count(s));
        mg_peer_set_release(s);
        if (w->state == WS_DOWN)
            w->check_agent = true;
        w->state = WS_OK;
    }
    w->failures = 0;
    int64_t now = mg_mono_ms();
    if (!self_seen && now - w->last_agent_check_ms >= SELF_CHECK_MS)
        w->check_agent = true;
    if (now - w->last_agent_check_ms >= AGENT_CHECK_MS)
        w->check_agent = true;
}

static void *watch_main(void *arg)
{
    mg_consul *c = arg;
    struct watch w = {.c = c, .state = WS_START, .index = 0};
    w.seed = (unsigned)(mg_mono_us() ^ (getpid() << 16));
    w.last_agent_check_ms = mg_mono_ms();
    int64_t last_start = 0;

    while (!atomic_load(&c->stop)) {
        int64_t gap = MIN_QUERY_GAP_MS - (mg_mono_ms() - last_start);
        if (gap > 0 && mg_consul__http_sleep(&c->watch_http, gap) != 0)
            break;
        last_start = mg_mono_ms();

        char *path;
        long timeout;
        if (w.index > 0) {
            path =
                mg_xasprintf("%s&index=%lld&wait=%ds", c->health_path, (long long)w.index, WAIT_S);
            /* Consul adds up to wait/16 of jitter; leave room for a slow answer. */
            timeout = WAIT_S * 1000 + WAIT_S * 1000 / 16 + 5000;
        } else {
            path = mg_xstrdup(c->health_path);
            timeout = READ_TIMEOUT;
        }
        mg_consul_resp r;
        int rc = mg_consul__request(&c->watch_http, "GET", path, NULL, timeout, &r);
        free(path);
        if (rc == -ECANCELED) {
            mg_consul__resp_free(&r);
            break;
        }
        if (rc == 0)
            handle_answer(&w, &r);
        else
            watch_failed(&w, rc, r.err);
        mg_consul__resp_free(&r);

        if (w.state == WS_DOWN) {
            if (mg_consul__http_sleep(&c->watch_http, backoff_ms(&w)) != 0)
                break;
            continue;
        }
        if (w.check_agent)
            check_registration(&w);
    }
    free(w.last_body);
    return NULL;
}

/* --- lifecycle ----------------------------------------------------------- */

int mg_consul_start(mg_consul *c)
{
    if (c->running)
        return -EALREADY;
    const char *adv = c->cfg.advertise_addr;
    if (!strcmp(adv, "0.0.0.0") || !strcmp(adv, "::") || !strcmp(adv, "[::]")) {
        mg_log_error("consul",
                     "cannot register the wildcard address %s: peers could not dial "
                     "it; set --advertise-addr (MESHGATE_ADVERTISE_ADDR, the pod IP)",
                     adv);
        return -EINVAL;
    }
    if (!c->cfg.gateway_id[0] || !adv[0] || c->cfg.grpc_port <= 0 || c->cfg.grpc_port > 65535) {
        mg_log_error("consul", "cannot register: gateway id, advertise address and gRPC port "
                               "are required (--id, --advertise-addr or --grpc-listen)");
        return -EINVAL;
    }
    if (!c->http_ok) {
        int rc = mg_consul__http_init(&c->main_http, c->cfg.addr, c->cfg.token, NULL);
        if (rc == 0) {
            rc = mg_consul__http_init(&c->watch_http, c->cfg.addr, c->cfg.token, &c->stop);
            if (rc != 0)
                mg_consul__http_cleanup(&c->main_http);
        }
        if (rc != 0) {
            mg_log_error("consul",
                         "bad Consul address or token: --consul-addr/CONSUL_HTTP_ADDR "
                         "must be host:port or http(s)://host:port addr=\"%s\"",
                         c->cfg.addr);
            return rc;
        }
        c->http_ok = true;
    }
    int rc = do_register(c, &c->main_http, false);
    if (rc != 0)
        return rc;
    c->registered = true;

    atomic_store(&c->stop, false);
    int err = pthread_create(&c->thread, NULL, watch_main, c);
    if (err != 0) {
        mg_log_error("consul", "cannot start the watcher thread: %s", strerror(err));
        mg_consul_stop(c);
        return -err;
    }
    pthread_setname_np(c->thread, "consul-watch");
    c->running = true;
    return 0;
}

void mg_consul_stop(mg_consul *c)
{
    if (!c)
        return;
    if (c->running) {
        atomic_store(&c->stop, true);
        mg_consul__http_wakeup(&c->watch_http);
        pthread_join(c->thread, NULL);
        c->running = false;
    }
    if (c->registered) {
        mg_consul_resp r;
        int rc =
            mg_consul__request(&c->main_http, "PUT", c->dereg_path, NULL, DEREGISTER_TIMEOUT, &r);
        if (rc == 0 || rc == -ENOENT) {
            mg_log_info("consul", "deregistered id=%s", c->cfg.gateway_id);
        } else {
            mg_metric_add(c->m_errors, 1);
            mg_log_warn("consul",
                        "deregister failed (Consul removes this gateway once its check is "
                        "critical): %s id=%s detail=\"%s\"",
                        why(rc), c->cfg.gateway_id, r.err);
        }
        mg_consul__resp_free(&r);
        c->registered = false;
    }
}

void mg_consul_free(mg_consul *c)
{
    if (!c)
        return;
    mg_consul_stop(c);
    if (c->http_ok) {
        mg_consul__http_cleanup(&c->main_http);
        mg_consul__http_cleanup(&c->watch_http);
    }
    free((char *)c->cfg.addr);
    free((char *)c->cfg.token);
    free((char *)c->cfg.service);
    free((char *)c->cfg.tags);
    free((char *)c->cfg.gateway_id);
    free((char *)c->cfg.region);
    free((char *)c->cfg.version);
    free((char *)c->cfg.buses);
    free((char *)c->cfg.advertise_addr);
    free(c->reg_json);
    free(c->reg_path);
    free(c->dereg_path);
    free(c->agent_path);
    free(c->health_path);
    free(c);
    curl_global_cleanup();
}
