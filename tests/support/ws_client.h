/* ws_client.h: a tiny synchronous WebSocket client for tests (raw sockets).
 *
 * One connection, one thread. Every call takes a timeout and never blocks
 * longer. Pings from the server are answered with pongs while receiving.
 * Sends are masked as RFC 6455 requires; any size (64-bit lengths) and any
 * opcode, so tests can send oversized and binary frames.
 */
#ifndef MG_WS_CLIENT_H
#define MG_WS_CLIENT_H

#include <stdbool.h>
#include <stddef.h>

typedef struct mg_wsc mg_wsc;

#define MG_WSC_TEXT   0x1
#define MG_WSC_BINARY 0x2
#define MG_WSC_CLOSE  0x8

/* Connects to url ("ws://host:port/path?query", host an IP or localhost) with
 * extra header lines ("Name: value", NULL-terminated array, may be NULL).
 * Returns the client after a 101, or NULL; *http_status (may be NULL)
 * receives the response status (e.g. 401), or -1 when the TCP connection or
 * the response failed. */
mg_wsc *mg_wsc_connect(const char *url, const char *const *headers, int timeout_ms,
                       int *http_status);
/* Sends one frame (FIN set). Returns 0 or -1. */
/* Connects to ws://127.0.0.1:port/ws?user=USER (a gateway without auth on
 * loopback); as mg_wsc_connect otherwise. */
mg_wsc *mg_wsc_connect_user(int port, const char *user, int timeout_ms, int *http_status);

int mg_wsc_send_frame(mg_wsc *c, int opcode, const void *data, size_t len);
int mg_wsc_send_text(mg_wsc *c, const char *text);
/* Next text frame (malloc'd, NUL-terminated; the caller frees), or NULL on
 * timeout or close (then mg_wsc_close_code tells). The gateway's
 * {"type":"ready",...} frame is never returned: it is kept for
 * mg_wsc_ready (tests see the frames they saw before it existed). */
char *mg_wsc_recv_text(mg_wsc *c, int timeout_ms);
/* Reads until the ready frame came (frames read meanwhile are returned by
 * the next mg_wsc_recv_text calls, in order) or timeout_ms. Returns whether
 * it came: from then on presence has the connection. */
bool mg_wsc_wait_ready(mg_wsc *c, int timeout_ms);
/* The ready frame's text (valid until mg_wsc_free), or NULL before it came;
 * *before (may be NULL) receives how many text frames came before it. */
const char *mg_wsc_ready(const mg_wsc *c, unsigned *before);
/* The close code the server sent (0: no close frame yet; 1005: a close frame
 * without a code; -1: the connection dropped without a close frame). */
int mg_wsc_close_code(const mg_wsc *c);
/* Reads (discarding text frames) until the server closes or timeout_ms;
 * returns mg_wsc_close_code. */
int mg_wsc_wait_close(mg_wsc *c, int timeout_ms);
/* The socket, e.g. to shrink its receive buffer. */
int mg_wsc_fd(const mg_wsc *c);
/* Sends a close (1000) when still open, closes the socket, frees. NULL ok.
 * Frames the client left unread (an ack, the ready frame) make the kernel
 * reset the connection, and the server's kernel then drops what the
 * server had not read yet: a client that must not lose its last sends
 * leaves with mg_wsc_leave. */
void mg_wsc_free(mg_wsc *c);
/* The close handshake: sends a close (1000) when still open, reads (and
 * discards) until the server closes or timeout_ms, then mg_wsc_free. */
void mg_wsc_leave(mg_wsc *c, int timeout_ms);

#endif
