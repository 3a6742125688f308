/* ws_client.c: a tiny synchronous WebSocket test client (see ws_client.h).
 *
 * Owns one TCP socket, a read buffer, the gateway's ready frame and the text
 * frames read while waiting for it (mg_wsc_wait_ready); runs on the calling
 * test thread.
 * Guarantees: every wait is bounded by the caller's timeout (poll), frames are
 * parsed strictly (server frames must be unmasked), and a connection failure
 * is reported, never hung on.
 */
#include "support/ws_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A text frame read while waiting for the ready frame. */
typedef struct held {
    struct held *next;
    char *text;
} held;

struct mg_wsc {
    int fd;
    int close_code;
    bool close_sent;
    unsigned char *buf;
    size_t len, cap;
    char *ready;       /* the ready frame, once it came */
    unsigned texts;    /* text frames returned or held so far */
    unsigned before;   /* texts when the ready frame came */
    held *head, *tail; /* read by mg_wsc_wait_ready, not returned yet */
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int write_all(int fd, const void *data, size_t len, int timeout_ms)
{
    const unsigned char *p = data;
    int64_t deadline = now_ms() + timeout_ms;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        int left = (int)(deadline - now_ms());
        if (left <= 0)
            return -1;
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        poll(&pfd, 1, left);
    }
    return 0;
}

/* Reads more bytes into the buffer; 1 got data, 0 timeout, -1 EOF/error. */
static int fill(mg_wsc *c, int64_t deadline)
{
    int left = (int)(deadline - now_ms());
    if (left < 0)
        left = 0;
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    int r = poll(&pfd, 1, left);
    if (r <= 0)
        return 0;
    if (c->cap - c->len < 65536) {
        c->cap = c->cap * 2 + 65536;
        c->buf = realloc(c->buf, c->cap);
    }
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n <= 0)
        return -1;
    c->len += (size_t)n;
    return 1;
}

static void consume(mg_wsc *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

mg_wsc *mg_wsc_connect(const char *url, const char *const *headers, int timeout_ms,
                       int *http_status)
{
    if (http_status)
        *http_status = -1;
    if (strncmp(url, "ws://", 5) != 0)
        return NULL;
    const char *hp = url + 5, *slash = strchr(hp, '/');
    char hostport[256], host[256];
    size_t hl = slash ? (size_t)(slash - hp) : strlen(hp);
    if (hl >= sizeof(hostport))
        return NULL;
    memcpy(hostport, hp, hl);
    hostport[hl] = 0;
    const char *path = slash ? slash : "/";
    char *colon = strrchr(hostport, ':');
    if (!colon)
        return NULL;
    int port = atoi(colon + 1);
    snprintf(host, sizeof(host), "%.*s", (int)(colon - hostport), hostport);
    if (strcmp(host, "localhost") == 0)
        snprintf(host, sizeof(host), "127.0.0.1");

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        return NULL;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    int64_t deadline = now_ms() + timeout_ms;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 && errno != EINPROGRESS) {
        close(fd);
        return NULL;
    }
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    int soerr = 0;
    socklen_t sl = sizeof(soerr);
    if (poll(&pfd, 1, timeout_ms) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) ||
        soerr) {
        close(fd);
        return NULL;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    char req[8192];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n",
                     path, hostport);
    for (size_t i = 0; headers && headers[i]; i++)
        n += snprintf(req + n, sizeof(req) - (size_t)n, "%s\r\n", headers[i]);
    n += snprintf(req + n, sizeof(req) - (size_t)n, "\r\n");
    mg_wsc *c = calloc(1, sizeof(*c));
    c->fd = fd;
    if (n >= (int)sizeof(req) || write_all(fd, req, (size_t)n, timeout_ms) != 0)
        goto fail;
    for (;;) {
        unsigned char *end = c->len ? memmem(c->buf, c->len, "\r\n\r\n", 4) : NULL;
        if (end) {
            int st = -1;
            if (sscanf((char *)c->buf, "HTTP/1.%*d %d", &st) != 1)
                st = -1;
            if (http_status)
                *http_status = st;
            if (st != 101)
                goto fail;
            size_t hdr = (size_t)(end - c->buf) + 4;
            /* the fixed key's accept value (RFC 6455 section 1.3) */
            if (!memmem(c->buf, hdr, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", 28))
                goto fail;
            consume(c, hdr);
            return c;
        }
        if (fill(c, deadline) <= 0)
            goto fail;
    }
fail:
    close(fd);
    free(c->buf);
    free(c);
    return NULL;
}

int mg_wsc_fd(const mg_wsc *c)
{
    return c->fd;
}

int mg_wsc_send_frame(mg_wsc *c, int opcode, const void *data, size_t len)
{
    unsigned char hdr[14];
    size_t h = 0;
    hdr[h++] = (unsigned char)(0x80 | (opcode & 0x0F));
    if (len < 126) {
        hdr[h++] = (unsigned char)(0x80 | len);
    } else if (len <= 0xFFFF) {
        hdr[h++] = 0x80 | 126;
        hdr[h++] = (unsigned char)(len >> 8);
        hdr[h++] = (unsigned char)len;
    } else {
        hdr[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            hdr[h++] = (unsigned char)((uint64_t)len >> (8 * i));
    }
    unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    memcpy(hdr + h, mask, 4);
    h += 4;
    unsigned char *out = malloc(h + len + 1);
    memcpy(out, hdr, h);
    const unsigned char *d = data;
    for (size_t i = 0; i < len; i++)
        out[h + i] = d[i] ^ mask[i & 3];
    int rc = write_all(c->fd, out, h + len, 5000);
    free(out);
    if (opcode == MG_WSC_CLOSE)
        c->close_sent = true;
    return rc;
}

int mg_wsc_send_text(mg_wsc *c, const char *text)
{
    return mg_wsc_send_frame(c, MG_WSC_TEXT, text, strlen(text));
}

/* Parses one complete frame from the buffer: 1 done (*op, *payload malloc'd,
 * *plen), 0 incomplete, -1 protocol error. */
static int parse_frame(mg_wsc *c, int *op, unsigned char **payload, size_t *plen, bool *fin)
{
    if (c->len < 2)
        return 0;
    unsigned char b0 = c->buf[0], b1 = c->buf[1];
    if (b1 & 0x80)
        return -1; /* servers never mask */
    size_t h = 2;
    uint64_t len = b1 & 0x7F;
    if (len == 126) {
        if (c->len < 4)
            return 0;
        len = (uint64_t)c->buf[2] << 8 | c->buf[3];
        h = 4;
    } else if (len == 127) {
        if (c->len < 10)
            return 0;
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | c->buf[2 + i];
        h = 10;
    }
    if (c->len < h + len)
        return 0;
    *op = b0 & 0x0F;
    *fin = b0 & 0x80;
    *plen = (size_t)len;
    *payload = malloc((size_t)len + 1);
    memcpy(*payload, c->buf + h, (size_t)len);
    (*payload)[len] = 0;
    consume(c, h + (size_t)len);
    return 1;
}

/* The next text frame from the socket, the ready frame included. */
static char *read_text(mg_wsc *c, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    unsigned char *msg = NULL;
    size_t msg_len = 0;
    while (c->close_code == 0) {
        int op;
        unsigned char *pl;
        size_t plen;
        bool fin;
        int r = parse_frame(c, &op, &pl, &plen, &fin);
        if (r < 0) {
            c->close_code = -1;
            break;
        }
        if (r == 0) {
            int f = fill(c, deadline);
            if (f < 0)
                c->close_code = -1;
            if (f <= 0)
                break;
            continue;
        }
        if (op == 0x9) { /* ping */
            mg_wsc_send_frame(c, 0xA, pl, plen);
            free(pl);
            continue;
        }
        if (op == 0x8) {
            c->close_code = plen >= 2 ? (pl[0] << 8 | pl[1]) : 1005;
            if (!c->close_sent)
                mg_wsc_send_frame(c, MG_WSC_CLOSE, pl, plen >= 2 ? 2 : 0);
            free(pl);
            break;
        }
        if (op == 0x1 || op == 0x0) {
            msg = realloc(msg, msg_len + plen + 1);
            memcpy(msg + msg_len, pl, plen);
            msg_len += plen;
            msg[msg_len] = 0;
            free(pl);
            if (fin)
                return (char *)msg;
            continue;
        }
        free(pl); /* pong, binary: ignored */
    }
    free(msg);
    return NULL;
}

static bool is_ready(const char *text)
{
    static const char prefix[] = "{\"type\":\"ready\""; /* the gateway's compact encoding */
    return strncmp(text, prefix, sizeof(prefix) - 1) == 0;
}

/* The next text frame before deadline, or NULL; the ready frame is kept
 * aside (then *was_ready, and NULL is returned at once). */
static char *read_app_text(mg_wsc *c, int64_t deadline, bool *was_ready)
{
    for (;;) {
        int left = (int)(deadline - now_ms());
        char *t = read_text(c, left > 0 ? left : 0);
        if (!t || c->ready || !is_ready(t)) {
            if (t)
                c->texts++;
            return t;
        }
        c->ready = t;
        c->before = c->texts;
        if (was_ready) {
            *was_ready = true;
            return NULL;
        }
    }
}

char *mg_wsc_recv_text(mg_wsc *c, int timeout_ms)
{
    held *h = c->head;
    if (h) {
        c->head = h->next;
        if (!c->head)
            c->tail = NULL;
        char *t = h->text;
        free(h);
        return t;
    }
    return read_app_text(c, now_ms() + timeout_ms, NULL);
}

bool mg_wsc_wait_ready(mg_wsc *c, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    while (!c->ready) {
        bool was_ready = false;
        char *t = read_app_text(c, deadline, &was_ready);
        if (!t)
            break;
        held *h = calloc(1, sizeof(*h));
        h->text = t;
        if (c->tail)
            c->tail->next = h;
        else
            c->head = h;
        c->tail = h;
    }
    return c->ready != NULL;
}

const char *mg_wsc_ready(const mg_wsc *c, unsigned *before)
{
    if (before)
        *before = c->before;
    return c->ready;
}

int mg_wsc_close_code(const mg_wsc *c)
{
    return c->close_code;
}

int mg_wsc_wait_close(mg_wsc *c, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    while (c->close_code == 0) {
        int left = (int)(deadline - now_ms());
        if (left <= 0)
            break;
        free(mg_wsc_recv_text(c, left));
    }
    return c->close_code;
}

static void send_close(mg_wsc *c)
{
    if (c->close_code == 0 && !c->close_sent) {
        unsigned char code[2] = {1000 >> 8, 1000 & 0xFF};
        mg_wsc_send_frame(c, MG_WSC_CLOSE, code, 2);
    }
}

void mg_wsc_leave(mg_wsc *c, int timeout_ms)
{
    if (!c)
        return;
    send_close(c);
    mg_wsc_wait_close(c, timeout_ms);
    mg_wsc_free(c);
}

void mg_wsc_free(mg_wsc *c)
{
    if (!c)
        return;
    send_close(c);
    close(c->fd);
    while (c->head) {
        held *h = c->head;
        c->head = h->next;
        free(h->text);
        free(h);
    }
    free(c->ready);
    free(c->buf);
    free(c);
}

mg_wsc *mg_wsc_connect_user(int port, const char *user, int timeout_ms, int *http_status)
{
    char url[512];
    snprintf(url, sizeof(url), "ws://127.0.0.1:%d/ws?user=%s", port, user);
    return mg_wsc_connect(url, NULL, timeout_ms, http_status);
}
