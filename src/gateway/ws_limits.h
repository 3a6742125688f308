/* ws_limits.h: the WebSocket listener's abuse limits (issue 14).
 *
 *   handshakes   connections accepted but not yet through their HTTP request
 *                or WebSocket upgrade: at most max_handshakes at once (at the
 *                cap the oldest is closed to make room, so a fresh /healthz
 *                probe gets in while slow attackers hold the rest) and each
 *                for at most handshake_timeout_ms (then closed).
 *   per address  established WebSocket connections per client address.
 *   send rate    a token bucket per connection: send_rate frames/s, burst
 *                send_burst; a frame over it is refused (error rate_limited),
 *                and more than MG_WS_RATE_CLOSE_AFTER refused within one
 *                second close the connection (1008).
 *   fd budget    the connection caps derived from RLIMIT_NOFILE.
 *
 * Every refusal is counted in meshgate_ws_limit_total{limit=...}.
 *
 * Threads: everything here runs on a WebSocket service loop, except
 * create/free and mg_ws_fd_budget (control thread, before start / after
 * stop). A limiter's handshakes belong to one loop (the one whose context it
 * is attached to); its per-address counts (ip_full, conn_open, conn_close)
 * may be shared by every loop: they lock (mg_ws_limiter_conn_admit checks
 * and counts in one step). Handles are lws wsi
 * pointers; the limiter closes one only through lws_set_timeout(LWS_TO_KILL_ASYNC) on the service
 * thread.
 */
#ifndef MG_WS_LIMITS_H
#define MG_WS_LIMITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct lws;
struct lws_context;

#define MG_WS_RATE_CLOSE_AFTER 20 /* refused frames within one second that close (1008) */

typedef struct mg_ws_limiter mg_ws_limiter;
typedef struct mg_ws_limiter_conn mg_ws_limiter_conn;

typedef struct mg_ws_limiter_config {
    int64_t handshake_timeout_ms; /* 0: no deadline of ours */
    size_t max_handshakes;        /* 0: unbounded */
    double send_rate;             /* frames per second; 0: off */
    double send_burst;            /* bucket size; < 1 is taken as max(1, send_rate) */
    size_t max_per_ip;            /* 0: off */
} mg_ws_limiter_config;

typedef enum { MG_WS_RATE_OK = 0, MG_WS_RATE_LIMITED, MG_WS_RATE_CLOSE } mg_ws_rate;

/* Copies cfg. Free with mg_ws_limiter_free (NULL is a no-op). */
mg_ws_limiter *mg_ws_limiter_create(const mg_ws_limiter_config *cfg);
void mg_ws_limiter_free(mg_ws_limiter *l);

/* The handshake cap (from mg_ws_fd_budget), before start. 0: unbounded. */
void mg_ws_limiter_set_max_handshakes(mg_ws_limiter *l, size_t max);
/* Counts l's handshakes against max_handshakes together with every limiter
 * sharing with's count (one per loop: the cap is the process's). with must
 * outlive l's handshakes. Before start. */
void mg_ws_limiter_share_handshakes(mg_ws_limiter *l, mg_ws_limiter *with);
/* Gives the limiter the context for its deadline timer (at start). */
void mg_ws_limiter_attach(mg_ws_limiter *l, struct lws_context *ctx);
/* Cancels the timer; call after the service thread ended, before the
 * context is destroyed. Later handshake calls are bookkeeping only. */
void mg_ws_limiter_detach(mg_ws_limiter *l);

/* [ws] A new connection (LWS_CALLBACK_SERVER_NEW_CLIENT_INSTANTIATED). At the
 * cap, the oldest handshake is closed first. */
void mg_ws_limiter_handshake_begin(mg_ws_limiter *l, struct lws *wsi);
/* [ws] Its request arrived (HTTP or upgrade) or it is gone. Unknown wsi: no-op. */
void mg_ws_limiter_handshake_end(mg_ws_limiter *l, struct lws *wsi);
size_t mg_ws_limiter_handshakes(const mg_ws_limiter *l);
/* Handshakes in progress over every limiter sharing l's count (the
 * server's: all loops). Any thread. */
size_t mg_ws_limiter_live(const mg_ws_limiter *l);

/* [ws] Whether an upgrade from ip must be refused (per-address cap reached). */
bool mg_ws_limiter_ip_full(mg_ws_limiter *l, const char *ip);
/* [ws] An established connection from ip (copied); NULL when no limit needs
 * per-connection state. Close it with mg_ws_limiter_conn_close (NULL ok). */
mg_ws_limiter_conn *mg_ws_limiter_conn_open(mg_ws_limiter *l, const char *ip);
void mg_ws_limiter_conn_close(mg_ws_limiter *l, mg_ws_limiter_conn *c);
/* [ws] conn_open at the per-address cap in one step (the check and the count
 * under one lock, so loops racing for an address's last slot cannot both
 * take it): false at the cap (counted as per_ip, *out NULL); else true and
 * *out as conn_open's. Taken at the upgrade, before the 101 goes out, so a
 * client's next upgrade, on whatever loop, already counts it. */
bool mg_ws_limiter_conn_admit(mg_ws_limiter *l, const char *ip, mg_ws_limiter_conn **out);
/* [ws] One client frame at now_ms (monotonic). c NULL: always OK. */
mg_ws_rate mg_ws_limiter_frame(mg_ws_limiter *l, mg_ws_limiter_conn *c, int64_t now_ms);

/* Counts one refusal in meshgate_ws_limit_total{limit=...} (any thread). */
void mg_ws_limit_count(const char *limit);

/* The fd budget. With nofile descriptors and reserve kept for everything
 * else (Redis, Kafka, peers, logs), lws may hold nofile - reserve; of those,
 * room for handshakes (and refusals, and HTTP probes) is kept, the rest is
 * the connection cap. Results: *conns <= max_conns, *handshakes <=
 * max_handshakes (0 stays 0 = derived), *lws_fds for fd_limit_per_thread. */
void mg_ws_fd_budget(unsigned nofile, size_t reserve, size_t max_conns, size_t max_handshakes,
                     size_t *conns, size_t *handshakes, unsigned *lws_fds);

/* [ws] Strict checks of an upgrade's ?name= argument: present once, and its
 * raw (still %-encoded) value decodes to no control character. Returns 0, or
 * -1 with a reason. */
int mg_ws_query_arg_strict(struct lws *wsi, const char *name, char *reason, size_t reasonlen);

/* [ws] RFC 6455 section 4.1/4.2.1 checks lws 4.1 leaves out: the request line ends in
 * exactly HTTP/1.1 (lws accepts HTTP/1.0, and drops the version of a line cut
 * by a %0d%0a in the URI), Sec-WebSocket-Version is 13 (lws also takes 7 and
 * 8), and Sec-WebSocket-Key is base64 of 16 bytes. Returns 0, or -1 with a
 * reason (answer 400). */
int mg_ws_upgrade_strict(struct lws *wsi, char *reason, size_t reasonlen);

/* A client's close frame payload is valid (RFC 6455 5.5.1, 7.4): empty, or a
 * status code a peer may send followed by a UTF-8 reason. Pure. */
bool mg_ws_close_payload_valid(const unsigned char *p, size_t len);
/* [ws] LWS_CALLBACK_WS_PEER_INITIATED_CLOSE: a valid payload returns 0 (lws
 * echoes it and closes); an invalid one is answered with close 1002 here and
 * returns -1 (lws closes without the echo). Counted as bad_close. */
int mg_ws_peer_close_check(struct lws *wsi, const void *payload, size_t len);

#endif
