/* ws_limits.c: the WebSocket listener's abuse limits (see ws_limits.h).
 *
 * Owns the handshake table, the per-address connection counts and each
 * connection's token bucket. A handshake table belongs to one WebSocket
 * service loop (ws_server.c keeps a limiter per loop for them); the
 * per-address counts of the server's shared limiter are used by every loop,
 * under ip_mu. The rest runs on the loop owning the connection.
 *
 * DESIGN
 * - Handshakes are a small array (at most max_handshakes entries, scanned
 *   linearly: handshakes are rare next to frames) in arrival order by
 *   start time. A timer of the service thread, armed only while handshakes
 *   are open, closes those past their deadline. lws has its own timeouts in
 *   this phase (timeout_secs, timeout_secs_ah_idle), but it re-arms them as
 *   a slow request makes progress, so a client sending a byte a second is
 *   never caught by them: our deadline counts from the accept and is never
 *   re-armed.
 * - At the cap the oldest handshake is closed rather than the new one
 *   refused: the attacker's connections are the old ones, a health probe is
 *   the new one, and it completes its request within milliseconds. lws's
 *   header pool is sized above the cap (ws_server.c), so a new connection
 *   always gets a header table at once.
 * - The token bucket is refilled lazily on each frame (no timer).
 */
#include "gateway/ws_limits.h"
#include "common/mg_alloc.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"
#include "gateway/ws_proto.h"

#include <libwebsockets.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TIMER_US       (100 * 1000) /* deadline check period */
#define HANDSHAKE_ROOM 64           /* fds kept for handshakes when max_handshakes is 0 */
#define LIMIT_HELP     "connections or frames refused by a WebSocket limit or protocol check"
#define FD_SLACK       16 /* listener, cancel pipe, lws internals */

typedef struct hs {
    struct lws *wsi;
    int64_t start_ms;
    bool doomed; /* evicted: the timer closes it next */
} hs;

struct mg_ws_limiter_conn {
    double tokens;
    int64_t last_ms;
    int64_t window_ms; /* start of the current one-second refusal window */
    uint32_t refused;  /* in that window */
    char ip[];
};

struct mg_ws_limiter {
    mg_ws_limiter_config cfg;
    hs *hs;
    size_t nhs, cap_hs, ndoomed;
    /* live handshakes (not doomed) against max_handshakes: this limiter's
     * own count, or the one it shares with the other loops' limiters */
    atomic_size_t own_live, *live;
    pthread_mutex_t ip_mu; /* per_ip: the loops share it */
    mg_map *per_ip;        /* ip -> count (as a pointer-sized integer, never 0) */
    struct lws_context *ctx;
    lws_sorted_usec_list_t timer;
    bool timer_armed;
};

void mg_ws_limit_count(const char *limit)
{
    char labels[64];
    snprintf(labels, sizeof(labels), "limit=\"%s\"", limit);
    mg_metric_add(mg_counter("meshgate_ws_limit_total", LIMIT_HELP, labels), 1);
}

mg_ws_limiter *mg_ws_limiter_create(const mg_ws_limiter_config *cfg)
{
    mg_ws_limiter *l = mg_new(mg_ws_limiter);
    l->cfg = *cfg;
    if (l->cfg.send_rate > 0 && l->cfg.send_burst < 1)
        l->cfg.send_burst = l->cfg.send_rate < 1 ? 1 : l->cfg.send_rate;
    l->per_ip = mg_map_create(64);
    l->live = &l->own_live;
    pthread_mutex_init(&l->ip_mu, NULL);
    /* registers the series at 0 so dashboards see them before the first refusal */
    static const char *const names[] = {"handshake_timeout", "handshakes",      "per_ip",
                                        "send_rate",         "send_rate_close", "connections"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char labels[64];
        snprintf(labels, sizeof(labels), "limit=\"%s\"", names[i]);
        mg_counter("meshgate_ws_limit_total", LIMIT_HELP, labels);
    }
    return l;
}

void mg_ws_limiter_free(mg_ws_limiter *l)
{
    if (!l)
        return;
    mg_map_free(l->per_ip); /* values are integers, not owned pointers */
    pthread_mutex_destroy(&l->ip_mu);
    free(l->hs);
    free(l);
}

/* ---- handshakes ------------------------------------------------------------ */

/* Closes at once, from the timer only (outside any callback of the wsi). An
 * asynchronous kill is not used: lws re-arms a wsi's timeout when it hands it
 * a header table, which would cancel the kill. */
static void kill_wsi(struct lws *wsi)
{
    lws_set_timeout(wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_SYNC);
}

static void hs_remove_at(mg_ws_limiter *l, size_t i)
{
    if (l->hs[i].doomed)
        l->ndoomed--;
    else
        atomic_fetch_sub(l->live, 1);
    l->hs[i] = l->hs[--l->nhs];
}

static void timer_cb(lws_sorted_usec_list_t *sul);

static void arm(mg_ws_limiter *l, lws_usec_t us)
{
    if (!l->ctx)
        return;
    l->timer_armed = true;
    lws_sul_schedule(l->ctx, 0, &l->timer, timer_cb, us);
}

static void timer_cb(lws_sorted_usec_list_t *sul)
{
    mg_ws_limiter *l = lws_container_of(sul, mg_ws_limiter, timer);
    l->timer_armed = false;
    int64_t now = mg_mono_ms();
    for (size_t i = 0; i < l->nhs;) {
        bool doomed = l->hs[i].doomed;
        if (doomed || (l->cfg.handshake_timeout_ms > 0 &&
                       now - l->hs[i].start_ms >= l->cfg.handshake_timeout_ms)) {
            struct lws *wsi = l->hs[i].wsi;
            hs_remove_at(l, i); /* before the kill: its destroy finds nothing */
            if (!doomed)
                mg_ws_limit_count("handshake_timeout");
            kill_wsi(wsi);
            continue;
        }
        i++;
    }
    if (l->nhs && l->cfg.handshake_timeout_ms > 0)
        arm(l, TIMER_US);
}

void mg_ws_limiter_set_max_handshakes(mg_ws_limiter *l, size_t max)
{
    l->cfg.max_handshakes = max;
}

void mg_ws_limiter_share_handshakes(mg_ws_limiter *l, mg_ws_limiter *with)
{
    l->live = &with->own_live;
}

void mg_ws_limiter_attach(mg_ws_limiter *l, struct lws_context *ctx)
{
    l->ctx = ctx;
}

void mg_ws_limiter_detach(mg_ws_limiter *l)
{
    if (l->timer_armed)
        lws_sul_cancel(&l->timer);
    l->timer_armed = false;
    l->ctx = NULL;
}

void mg_ws_limiter_handshake_begin(mg_ws_limiter *l, struct lws *wsi)
{
    /* at the cap (counted over every loop sharing it), this loop's oldest
     * goes; a loop with none of its own lets the others close theirs */
    if (l->cfg.max_handshakes && atomic_load(l->live) >= l->cfg.max_handshakes &&
        l->nhs > l->ndoomed) {
        size_t oldest = SIZE_MAX;
        for (size_t i = 0; i < l->nhs; i++)
            if (!l->hs[i].doomed &&
                (oldest == SIZE_MAX || l->hs[i].start_ms < l->hs[oldest].start_ms))
                oldest = i;
        l->hs[oldest].doomed = true;
        l->ndoomed++;
        atomic_fetch_sub(l->live, 1);
        mg_ws_limit_count("handshakes");
        if (l->timer_armed)
            lws_sul_cancel(&l->timer);
        arm(l, 1); /* closes it on the next turn of the loop */
    }
    if (l->nhs == l->cap_hs) {
        l->cap_hs = l->cap_hs ? l->cap_hs * 2 : 64;
        l->hs = mg_xrealloc(l->hs, l->cap_hs * sizeof(*l->hs));
    }
    l->hs[l->nhs++] = (hs){wsi, mg_mono_ms(), false};
    atomic_fetch_add(l->live, 1);
    if (l->cfg.handshake_timeout_ms > 0 && !l->timer_armed)
        arm(l, TIMER_US);
}

void mg_ws_limiter_handshake_end(mg_ws_limiter *l, struct lws *wsi)
{
    for (size_t i = 0; i < l->nhs; i++) {
        if (l->hs[i].wsi == wsi) {
            hs_remove_at(l, i);
            return;
        }
    }
}

size_t mg_ws_limiter_handshakes(const mg_ws_limiter *l)
{
    return l->nhs - l->ndoomed;
}

size_t mg_ws_limiter_live(const mg_ws_limiter *l)
{
    return atomic_load(l->live);
}

/* ---- per address and per connection ------------------------------------------ */

bool mg_ws_limiter_ip_full(mg_ws_limiter *l, const char *ip)
{
    if (!l->cfg.max_per_ip)
        return false;
    pthread_mutex_lock(&l->ip_mu);
    uintptr_t n = (uintptr_t)mg_map_get(l->per_ip, ip);
    pthread_mutex_unlock(&l->ip_mu);
    if (n < l->cfg.max_per_ip)
        return false;
    mg_ws_limit_count("per_ip");
    return true;
}

/* Counts ip's connection unless cap (0: none) is reached; under ip_mu, so
 * loops racing for an address's last slot cannot both take it. */
static mg_ws_limiter_conn *conn_take(mg_ws_limiter *l, const char *ip, size_t cap, bool *full)
{
    *full = false;
    if (!l->cfg.max_per_ip && l->cfg.send_rate <= 0)
        return NULL;
    if (l->cfg.max_per_ip) {
        pthread_mutex_lock(&l->ip_mu);
        uintptr_t k = (uintptr_t)mg_map_get(l->per_ip, ip);
        if (cap && k >= cap) {
            pthread_mutex_unlock(&l->ip_mu);
            *full = true;
            return NULL;
        }
        mg_map_put(l->per_ip, ip, (void *)(k + 1));
        pthread_mutex_unlock(&l->ip_mu);
    }
    size_t n = strlen(ip);
    mg_ws_limiter_conn *c = mg_xcalloc(1, sizeof(*c) + n + 1);
    memcpy(c->ip, ip, n + 1);
    c->tokens = l->cfg.send_burst;
    c->last_ms = c->window_ms = mg_mono_ms();
    return c;
}

mg_ws_limiter_conn *mg_ws_limiter_conn_open(mg_ws_limiter *l, const char *ip)
{
    bool full;
    return conn_take(l, ip, 0, &full);
}

bool mg_ws_limiter_conn_admit(mg_ws_limiter *l, const char *ip, mg_ws_limiter_conn **out)
{
    bool full;
    *out = conn_take(l, ip, l->cfg.max_per_ip, &full);
    if (full)
        mg_ws_limit_count("per_ip");
    return !full;
}

void mg_ws_limiter_conn_close(mg_ws_limiter *l, mg_ws_limiter_conn *c)
{
    if (!c)
        return;
    if (l->cfg.max_per_ip) {
        pthread_mutex_lock(&l->ip_mu);
        uintptr_t k = (uintptr_t)mg_map_get(l->per_ip, c->ip);
        if (k <= 1)
            mg_map_del(l->per_ip, c->ip);
        else
            mg_map_put(l->per_ip, c->ip, (void *)(k - 1));
        pthread_mutex_unlock(&l->ip_mu);
    }
    free(c);
}

mg_ws_rate mg_ws_limiter_frame(mg_ws_limiter *l, mg_ws_limiter_conn *c, int64_t now_ms)
{
    if (!c || l->cfg.send_rate <= 0)
        return MG_WS_RATE_OK;
    if (now_ms > c->last_ms) {
        c->tokens += (double)(now_ms - c->last_ms) * l->cfg.send_rate / 1000.0;
        if (c->tokens > l->cfg.send_burst)
            c->tokens = l->cfg.send_burst;
        c->last_ms = now_ms;
    }
    if (c->tokens >= 1.0) {
        c->tokens -= 1.0;
        return MG_WS_RATE_OK;
    }
    if (now_ms - c->window_ms >= 1000) {
        c->window_ms = now_ms;
        c->refused = 0;
    }
    if (++c->refused >= MG_WS_RATE_CLOSE_AFTER) {
        mg_ws_limit_count("send_rate_close");
        return MG_WS_RATE_CLOSE;
    }
    mg_ws_limit_count("send_rate");
    return MG_WS_RATE_LIMITED;
}

/* ---- the fd budget ------------------------------------------------------------ */

void mg_ws_fd_budget(unsigned nofile, size_t reserve, size_t max_conns, size_t max_handshakes,
                     size_t *conns, size_t *handshakes, unsigned *lws_fds)
{
    /* a reserve that leaves lws less than half of the table is cut to a quarter */
    if (reserve > nofile / 2)
        reserve = nofile / 4;
    size_t usable = nofile - reserve;
    size_t room = max_handshakes ? max_handshakes : HANDSHAKE_ROOM;
    if (room + FD_SLACK > usable / 4)
        room = usable / 4 > FD_SLACK ? usable / 4 - FD_SLACK : 1;
    size_t cap = usable - room - FD_SLACK;
    *conns = max_conns && max_conns < cap ? max_conns : cap;
    *handshakes = max_handshakes ? room : 0;
    *lws_fds = (unsigned)usable;
}

/* ---- strict upgrade arguments ---------------------------------------------------- */

int mg_ws_query_arg_strict(struct lws *wsi, const char *name, char *reason, size_t reasonlen)
{
    char frag[1024];
    size_t nlen = strlen(name);
    int seen = 0;
    for (int i = 0;; i++) {
        int n = lws_hdr_copy_fragment(wsi, frag, sizeof(frag), WSI_TOKEN_HTTP_URI_ARGS, i);
        if (n < 0)
            break;
        if ((size_t)n < nlen || memcmp(frag, name, nlen) != 0)
            continue;
        if (++seen > 1) {
            snprintf(reason, reasonlen, "?%.*s given more than once", (int)nlen - 1, name);
            return -1;
        }
        for (int k = 0; k < n; k++) {
            unsigned char ch = (unsigned char)frag[k];
            if (ch < 0x20 || ch == 0x7f) {
                snprintf(reason, reasonlen, "control character in ?%.*s", (int)nlen - 1, name);
                return -1;
            }
        }
    }
    return 0;
}

static bool b64_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
           c == '/';
}

int mg_ws_upgrade_strict(struct lws *wsi, char *reason, size_t reasonlen)
{
    char buf[64];
    int n = lws_hdr_copy(wsi, buf, sizeof(buf), WSI_TOKEN_HTTP);
    if (n != 8 || memcmp(buf, "HTTP/1.1", 8) != 0) {
        snprintf(reason, reasonlen, "the upgrade needs an HTTP/1.1 request line");
        return -1;
    }
    n = lws_hdr_copy(wsi, buf, sizeof(buf), WSI_TOKEN_VERSION);
    if (n != 2 || memcmp(buf, "13", 2) != 0) {
        snprintf(reason, reasonlen, "Sec-WebSocket-Version must be 13");
        return -1;
    }
    /* 16 bytes in base64: 22 characters and "==" */
    n = lws_hdr_copy(wsi, buf, sizeof(buf), WSI_TOKEN_KEY);
    bool ok = n == 24 && buf[22] == '=' && buf[23] == '=';
    for (int i = 0; ok && i < 22; i++)
        ok = b64_char((unsigned char)buf[i]);
    /* the last character before the padding carries 2 bits: A, Q, g or w */
    if (ok && !strchr("AQgw", buf[21]))
        ok = false;
    if (!ok) {
        snprintf(reason, reasonlen, "Sec-WebSocket-Key must be 16 bytes in base64");
        return -1;
    }
    return 0;
}

/* ---- close frames ------------------------------------------------------------ */

bool mg_ws_close_payload_valid(const unsigned char *p, size_t len)
{
    if (len == 0)
        return true;
    if (len == 1)
        return false;
    unsigned code = (unsigned)p[0] << 8 | p[1];
    bool ok = (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
              (code >= 3000 && code <= 4999);
    return ok && mg_utf8_valid(p + 2, len - 2);
}

int mg_ws_peer_close_check(struct lws *wsi, const void *payload, size_t len)
{
    if (mg_ws_close_payload_valid(payload, len))
        return 0;
    static const char reason[] = "bad close frame";
    lws_close_reason(wsi, LWS_CLOSE_STATUS_PROTOCOL_ERR, (unsigned char *)reason,
                     sizeof(reason) - 1);
    mg_ws_limit_count("bad_close");
    return -1;
}
